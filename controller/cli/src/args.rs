//! The command line's arguments (clap), and what `run` reads from them: the API's tokens and
//! secrets, the Docker runtime's nodes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use poolkeeper_kinds::units::parse_duration;
use poolkeeper_runtime_docker::{DockerConfig, NodeConfig};

#[derive(Parser, Debug)]
#[command(
    name = "poolkeeper",
    version,
    about = "Declarative warm container pools, claims and deployments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CustomResourceDefinitions generated from the types.
    Crds,
    /// Print the admission policy (Kubernetes 1.36+) that gives Pools, Claims and Deployments
    /// the controller's finalizer as they are created, saving the controller that write
    /// (optional: without it the controller adds the finalizer itself).
    Admission {
        /// Bind it to this namespace only (repeatable; as the controller's `run --namespace`):
        /// an object in a namespace no controller watches would keep a finalizer nobody
        /// removes. Default: every namespace.
        #[arg(long = "namespace")]
        namespaces: Vec<String>,
    },
    /// Print the least-privilege RBAC of `run --source kube`: the (Cluster)Role and bindings
    /// for a ServiceAccount.
    Rbac {
        /// The controller's ServiceAccount.
        #[arg(long, default_value = "poolkeeper")]
        service_account: String,
        /// Its namespace (where the Lease and records live).
        #[arg(long = "controller-namespace", default_value = "poolkeeper")]
        controller_namespace: String,
        /// A namespace the controller watches (repeat); default: all (a ClusterRole).
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// Also what the web console's registration needs (`run --allow-registration`).
        #[arg(long)]
        allow_registration: bool,
        /// Also what the web console's example flows need (`run --flows DIR`).
        #[arg(long)]
        flows: bool,
        /// Also what the Kubernetes runtime needs (`run --runtime kube`) in the namespace of
        /// its pods.
        #[arg(long, value_name = "NS")]
        pod_namespace: Option<String>,
    },
    /// What a host needs to run poolkeeper as a systemd service without Ansible (docs/vm.md):
    /// the unit the Ansible role installs, and a first specs folder.
    Install {
        /// Print the systemd unit (`Type=notify`, watchdog, hardened).
        #[arg(long, required_unless_present = "print_specs")]
        print_unit: bool,
        /// Print the old PaaS's four pools, one file for the watched specs folder.
        #[arg(long, conflicts_with = "print_unit")]
        print_specs: bool,
        #[command(flatten)]
        unit: crate::install::UnitOptions,
    },
    /// Check files or folders without running anything.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run the controller on a watched directory (`--dir`), or on a Kubernetes API server's
    /// custom resources (`--source kube`).
    Run {
        /// The watched folder (the directory source).
        #[arg(long, required_unless_present = "source")]
        dir: Option<PathBuf>,
        /// Where desired state comes from.
        #[arg(long, value_enum, default_value_t = SourceKind::Dir)]
        source: SourceKind,
        #[command(flatten)]
        kube: KubeArgs,
        #[command(flatten)]
        pods: PodArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long, value_enum, default_value_t = RuntimeKind::Docker)]
        runtime: RuntimeKind,
        /// How often to relist the runtime and rescan the directory, whatever events said.
        #[arg(long, default_value = "30s", value_parser = duration_arg)]
        resync: Duration,
        #[command(flatten)]
        docker: DockerArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List objects with their status.
    Get {
        /// pools, claims, users or deployments
        kind: String,
        name: Option<String>,
        /// A watched folder (reads the status its controller writes).
        #[arg(long, required_unless_present = "server", conflicts_with = "server")]
        dir: Option<PathBuf>,
        /// Or a running controller's API, `http://HOST:PORT` (with `--token`).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        #[arg(
            long,
            env = "POOLKEEPER_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Claims through the API: create one, or release one.
    Claim {
        #[command(subcommand)]
        action: ClaimAction,
    },
    /// Admin: set a pool's warm size in the file that declares it (`scale pool NAME --warm N`).
    Scale {
        /// pool
        kind: String,
        name: String,
        #[arg(long)]
        warm: u32,
        #[command(flatten)]
        server: crate::client::ServerArgs,
    },
    /// Admin: replace a pool's warm instances with fresh ones (`reinitialise pool NAME`).
    #[command(alias = "reinit")]
    Reinitialise {
        /// pool
        kind: String,
        name: String,
        #[command(flatten)]
        server: crate::client::ServerArgs,
    },
    /// Admin: delete a user (`delete user NAME`): their claims are released, and the user's
    /// document is removed from the file that declares it.
    Delete {
        /// user
        kind: String,
        name: String,
        #[command(flatten)]
        server: crate::client::ServerArgs,
    },
    /// Users through the API: `user passwd NAME` sets the password they sign in to the web
    /// console with.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Copy a file, a folder, or a `.tar` into a bound claim's instance (through the API).
    Upload {
        /// claim/NAME
        target: String,
        path: PathBuf,
        #[command(flatten)]
        server: crate::client::ServerArgs,
    },
    /// Show one object in detail: spec, status, conditions, events.
    Describe {
        kind: String,
        name: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Measure claim binding and resync through the real reconcile path.
    Bench(BenchArgs),
    /// Print a container's output. TARGET: deployment/NAME[/CONTAINER[/REPLICA]], claim/NAME
    /// or instance/NAME.
    Logs {
        target: String,
        /// The directory the controller watches (its status names the container).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// On the Kubernetes runtime without a directory (`run --source kube`): the namespace
        /// of the pods; `claim/` and `deployment/` targets are read from the cluster.
        #[arg(long, conflicts_with = "dir")]
        pod_namespace: Option<String>,
        /// With `--pod-namespace`: the namespace of the Claim or Deployment (default: the
        /// pods' namespace).
        #[arg(short = 'n', long, requires = "pod_namespace")]
        namespace: Option<String>,
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only output newer than this (e.g. 10m, 2h).
        #[arg(long, value_parser = duration_arg)]
        since: Option<Duration>,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Run a command in a container, passing its output and exit code through; `-it` gives an
    /// interactive shell with a terminal. With `--steps FILE`, run a script of checked steps.
    Exec {
        target: String,
        /// The directory the controller watches (its status names the container).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// On the Kubernetes runtime without a directory (`run --source kube`): the namespace
        /// of the pods; `claim/` and `deployment/` targets are read from the cluster.
        #[arg(long, conflicts_with = "dir")]
        pod_namespace: Option<String>,
        /// With `--pod-namespace`: the namespace of the Claim or Deployment (default: the
        /// pods' namespace).
        #[arg(short = 'n', long, requires = "pod_namespace")]
        namespace: Option<String>,
        /// Keep standard input open and send it to the command.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Give the command a terminal (the local one in raw mode, resized along).
        #[arg(short = 't', long)]
        tty: bool,
        /// A YAML file of steps (`steps: [{name, run, expect: {exitCode, outputContains}}]`)
        /// run in order; the first failure stops with exit code 1.
        #[arg(long, conflicts_with_all = ["interactive", "tty"])]
        steps: Option<PathBuf>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// CPU and memory use of a container.
    Stats {
        target: String,
        /// The directory the controller watches (its status names the container).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// On the Kubernetes runtime without a directory (`run --source kube`): the namespace
        /// of the pods; `claim/` and `deployment/` targets are read from the cluster.
        #[arg(long, conflicts_with = "dir")]
        pod_namespace: Option<String>,
        /// With `--pod-namespace`: the namespace of the Claim or Deployment (default: the
        /// pods' namespace).
        #[arg(short = 'n', long, requires = "pod_namespace")]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Back up a deployment's named volume to a tar, or restore one.
    Volume {
        #[command(subcommand)]
        action: VolumeAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserAction {
    /// Set a user's console password: read from standard input (asked for twice, without
    /// echo, on a terminal), hashed here with argon2id; only the hash is sent and stored
    /// (`spec.passwordHash`, in the file or object that declares the user).
    Passwd {
        name: String,
        #[command(flatten)]
        server: crate::client::ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClaimAction {
    /// Claim an instance from POOL; prints the claim's name (and, with --wait, its endpoint).
    Create {
        pool: String,
        /// Default: USER-POOL-xxxxxx.
        #[arg(long)]
        name: Option<String>,
        /// Whose claim (admins must say; a user's token claims for that user).
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        ttl: Option<String>,
        /// A file to place in the instance: `PATH=LOCAL_FILE` (repeatable).
        #[arg(long = "file", value_name = "PATH=LOCAL_FILE")]
        files: Vec<String>,
        /// Wait until the claim is Bound (or Failed) and print where it runs.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        server: crate::client::ServerArgs,
    },
    /// Release a claim made through the API, or (admin) every claim of a user (`--user`).
    Release {
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        name: Option<String>,
        /// Release all of this user's claims, wherever they are declared.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        server: crate::client::ServerArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeAction {
    /// Write the volume's files to a tar (default: DIR/.poolkeeper/backups/).
    Backup {
        /// deployment/NAME
        deployment: String,
        volume: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Write a backup's files into the volume (files the backup does not hold are kept).
    Restore {
        deployment: String,
        volume: String,
        file: PathBuf,
        #[arg(long)]
        dir: PathBuf,
    },
}

/// The HTTP API of `run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// Address the HTTP API listens on (`off` serves none).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7080")]
    pub listen: String,
    /// A file holding the admin token (one line). Without it, only users' tokens work.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A file holding the secret that signs reservation webhooks and their callbacks; enables
    /// `POST /webhooks/reservations`.
    #[arg(long, value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Where reservation callbacks are POSTed (`https://HOST[:PORT]/PATH`, or `http://`).
    #[arg(long, value_name = "URL", requires = "webhook_secret_file")]
    pub notify_url: Option<String>,
    /// Certificate authorities (PEM) trusted for an `https://` notification URL, besides the
    /// system's.
    #[arg(long, value_name = "FILE", requires = "notify_url")]
    pub notify_ca_file: Option<PathBuf>,
    /// An image booking systems may ask for (repeat; default: the images of declared pools).
    #[arg(
        long = "webhook-image",
        value_name = "IMAGE",
        requires = "webhook_secret_file"
    )]
    pub webhook_images: Vec<String>,
    /// Let people register in the web console (`/ui/register`): each registration declares a
    /// User through the source (a file in the watched folder; a User object in Kubernetes
    /// mode) with a password and `--registration-quota`.
    #[arg(long)]
    pub allow_registration: bool,
    /// The number of instances a registered user may hold at once.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        requires = "allow_registration"
    )]
    pub registration_quota: u32,
    /// Mark the console's session cookie `Secure` (the API is reached over https, through a
    /// TLS-terminating proxy, say).
    #[arg(long)]
    pub console_secure_cookie: bool,
    /// A folder of example flows (one folder each, with a README and YAML specs, e.g.
    /// `examples/flows`) that operators may run from the web console.
    #[arg(long, value_name = "DIR")]
    pub flows: Option<PathBuf>,
}

impl ApiArgs {
    /// The web console's settings; the flows are read (and checked) now.
    pub(crate) fn console(&self) -> anyhow::Result<poolkeeper_http::console::ConsoleConfig> {
        let flows = match &self.flows {
            Some(dir) => crate::flows::load(dir)?,
            None => Vec::new(),
        };
        Ok(poolkeeper_http::console::ConsoleConfig {
            allow_registration: self.allow_registration,
            registration_quota: self.registration_quota,
            secure_cookie: self.console_secure_cookie,
            flows,
        })
    }

    pub(crate) fn admin_token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.admin_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the admin token from {}", path.display()))?;
        let token = text.trim().to_owned();
        if token.len() < 16 {
            bail!(
                "{}: the admin token must be at least 16 characters",
                path.display()
            );
        }
        Ok(Some(token))
    }

    pub(crate) fn webhooks(&self) -> anyhow::Result<Option<poolkeeper_http::WebhookConfig>> {
        let Some(path) = &self.webhook_secret_file else {
            return Ok(None);
        };
        let secret = std::fs::read_to_string(path)
            .with_context(|| format!("reading the webhook secret from {}", path.display()))?
            .trim()
            .to_owned();
        if secret.len() < 16 {
            bail!(
                "{}: the webhook secret must be at least 16 characters",
                path.display()
            );
        }
        let notify = match &self.notify_url {
            Some(url) => Some(
                poolkeeper_http::notify::Target::new(url, self.notify_ca_file.as_deref())
                    .map_err(|e| anyhow::anyhow!("--notify-url: {e}"))?,
            ),
            None => None,
        };
        Ok(Some(poolkeeper_http::WebhookConfig {
            secret: secret.into_bytes(),
            allowed_images: self.webhook_images.clone(),
            notify,
        }))
    }
}

/// Where the Docker runtime runs instances.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DockerArgs {
    /// Docker Engine URL (`unix:///var/run/docker.sock`, `tcp://HOST:2375`); repeat for several
    /// nodes. Default: `$DOCKER_HOST`, else the local socket.
    #[arg(long = "docker-host", value_name = "URL")]
    pub docker_hosts: Vec<String>,
    /// Controller configuration (YAML): `nodes: [{name, url, listenAddress, advertiseAddress}]`,
    /// `nodeDownAfter`, `listenAddress`, `advertiseAddress`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Host address that published ports bind to (default 0.0.0.0).
    #[arg(long, value_name = "ADDR")]
    pub listen_address: Option<String>,
    /// Address that claims report and probes use to reach instances (default 127.0.0.1 for a
    /// local socket, the host of a tcp URL).
    #[arg(long, value_name = "ADDR")]
    pub advertise_address: Option<String>,
    /// This controller's identity on shared Docker daemons: it adopts and removes only the
    /// containers it labelled with it (default `default`).
    #[arg(long, value_name = "ID")]
    pub controller_id: Option<String>,
}

/// The controller configuration file.
#[derive(serde::Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerConfig {
    #[serde(default)]
    pub nodes: Vec<poolkeeper_runtime_docker::NodeConfig>,
    /// How long a node may be unreachable before its instances are replaced elsewhere.
    #[serde(default)]
    pub node_down_after: Option<String>,
    #[serde(default)]
    pub listen_address: Option<String>,
    #[serde(default)]
    pub advertise_address: Option<String>,
    #[serde(default)]
    pub controller_id: Option<String>,
}

impl DockerArgs {
    /// The runtime configuration these flags and the config file describe; `state` is the
    /// folder bind mounts must stay in.
    pub fn docker_config(&self, state: &Path) -> anyhow::Result<DockerConfig> {
        // The daemon resolves mount sources on its own, so they must be absolute (`run --dir`
        // is often given relative to the working directory).
        let state = std::path::absolute(state)
            .with_context(|| format!("resolving the state folder {}", state.display()))?;
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_saphyr::from_str::<ControllerConfig>(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => ControllerConfig::default(),
        };
        let mut config = DockerConfig::default();
        let mut nodes = file.nodes.clone();
        let declared = nodes.len();
        for (i, url) in self.docker_hosts.iter().enumerate() {
            let name = if self.docker_hosts.len() == 1 && declared == 0 {
                "local".to_owned()
            } else {
                format!("node{}", declared + i + 1)
            };
            nodes.push(NodeConfig::from_url(&name, url));
        }
        if !nodes.is_empty() {
            config.nodes = nodes;
        }
        let listen = self.listen_address.clone().or(file.listen_address);
        let advertise = self.advertise_address.clone().or(file.advertise_address);
        for n in &mut config.nodes {
            if n.listen_address.is_none() {
                n.listen_address.clone_from(&listen);
            }
            if n.advertise_address.is_none() {
                n.advertise_address.clone_from(&advertise);
            }
        }
        if let Some(d) = &file.node_down_after {
            config.node_down_after =
                parse_duration(d).map_err(|e| anyhow::anyhow!("nodeDownAfter: {e}"))?;
        }
        config.allowed_bind_root = Some(state.clone());
        config.files_root = Some(state.join("files"));
        config.placements_file = Some(state.join("docker-placements.json"));
        if let Some(id) = self.controller_id.clone().or(file.controller_id) {
            if poolkeeper_kinds::units::check_name(&id).is_err() {
                bail!("controller id {id:?} must be a DNS label (lowercase letters, digits, '-')");
            }
            config.controller_id = id;
        }
        Ok(config)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A watched directory of YAML/JSON files.
    Dir,
    /// A Kubernetes API server's custom resources (credentials from KUBECONFIG, else
    /// in-cluster).
    Kube,
}

/// `run --source kube`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// A namespace to watch (repeat); default: all namespaces.
    #[arg(long = "namespace", value_name = "NS")]
    pub namespaces: Vec<String>,
    /// Where the engine's state store and the instances' files live (default
    /// `./poolkeeper-state`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The Lease that elects the one replica that acts.
    #[arg(long, default_value = "poolkeeper", value_name = "NAME")]
    pub lease_name: String,
    /// The Lease's namespace, which also holds the controller's records (default: the current
    /// context's namespace; in a pod, its own).
    #[arg(long, value_name = "NS")]
    pub lease_namespace: Option<String>,
    /// This replica's name in the Lease (default: `$POD_NAME`, else the host name and pid).
    #[arg(long, value_name = "ID")]
    pub identity: Option<String>,
    /// Act without electing a leader (one replica only).
    #[arg(long)]
    pub no_leader_election: bool,
}

/// Where the Kubernetes runtime (`--runtime kube`) makes its pods.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PodArgs {
    /// The namespace of the runtime's pods and Services (default: the current context's
    /// namespace; in a pod, its own).
    #[arg(long, value_name = "NS")]
    pub pod_namespace: Option<String>,
    /// How long a deleted pod may take to stop (its termination grace period), in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub pod_grace_seconds: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    Memory,
    Docker,
    /// Pods on the Kubernetes cluster KUBECONFIG (or the pod's service account) names.
    Kube,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Wide,
    Yaml,
    Json,
}

pub(crate) fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod docker_args_tests {
    use super::*;

    #[test]
    fn docker_hosts_are_named_in_order() {
        let args = DockerArgs {
            docker_hosts: vec!["unix:///a.sock".into(), "tcp://10.0.0.2:2375".into()],
            ..Default::default()
        };
        let c = args.docker_config(Path::new("/state")).unwrap();
        let names: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["node1", "node2"]);
        let one = DockerArgs {
            docker_hosts: vec!["unix:///a.sock".into()],
            ..Default::default()
        };
        assert_eq!(
            one.docker_config(Path::new("/s")).unwrap().nodes[0].name,
            "local"
        );
    }

    #[test]
    fn mount_sources_are_absolute_when_the_folder_is_given_relative() {
        let c = DockerArgs::default()
            .docker_config(Path::new("examples/quickstart/.poolkeeper"))
            .unwrap();
        let cwd = std::env::current_dir().unwrap();
        let state = cwd.join("examples/quickstart/.poolkeeper");
        assert_eq!(c.files_root, Some(state.join("files")));
        assert_eq!(
            c.placements_file,
            Some(state.join("docker-placements.json"))
        );
        assert_eq!(c.allowed_bind_root, Some(state));
    }
}

/// The bounds on what comes from outside (`poolkeeper_engine::limits::Limits`; refusals are
/// counted in `/metrics` as `poolkeeper_refusals_total{reason}`).
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// The largest spec file read (`8Mi`, `512Ki`, bytes): a larger one is reported, not read.
    #[arg(long, value_name = "SIZE", default_value = "8Mi", value_parser = size_arg)]
    pub max_spec_file_size: u64,
    /// The time a client has to send a request's headers (also a kept connection's idle time).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration_arg)]
    pub header_timeout: Duration,
    /// The time a client has to send a request's body, once its headers are in.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration_arg)]
    pub body_timeout: Duration,
    /// Connections the HTTP API serves at once; one more is answered 503 and closed.
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

impl LimitArgs {
    pub fn limits(&self) -> poolkeeper_engine::limits::Limits {
        poolkeeper_engine::limits::Limits {
            max_spec_file: self.max_spec_file_size,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            max_connections: self.max_connections as usize,
            ..Default::default()
        }
    }
}

fn size_arg(s: &str) -> Result<u64, String> {
    poolkeeper_kinds::units::parse_memory_bytes(s)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: a size such as 8Mi, 512Ki or 1000000 (bytes)"))
}

/// `poolkeeper bench` (see [`crate::bench`]).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = RuntimeKind::Memory)]
    pub runtime: RuntimeKind,
    /// `kube`: claims as Claim objects on the API server KUBECONFIG names, created at `--rate`
    /// by `--concurrency` clients, Bound seen by a watch (a controller runs in-process on the
    /// memory runtime, in a namespace of the bench's own).
    #[arg(long, value_enum, default_value_t = SourceKind::Dir)]
    pub source: SourceKind,
    /// Warm instances in the pool (default 1000 on memory, 50 on docker).
    #[arg(long)]
    pub instances: Option<u32>,
    /// Claims to bind (default 10000 on memory; on docker 200 without files, then 200 with).
    #[arg(long)]
    pub claims: Option<u32>,
    /// Claims outstanding at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Users the claims are spread over.
    #[arg(long, default_value_t = 1000)]
    pub users: u32,
    /// Pools for the resync figure (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub resync_pools: u32,
    /// Bound claims for the resync figure.
    #[arg(long, default_value_t = 100_000)]
    pub resync_claims: u32,
    /// Release each claim as soon as it is bound (steady state: the pool refills behind the
    /// traffic). Without it every claim keeps its instance until the end.
    #[arg(long)]
    pub release: bool,
    /// With `--source kube`: leave each claim bound instead of deleting it once bound, so that
    /// only the path to Bound is measured (the pool is sized to the claims, and its `max` holds
    /// it there: nothing is made while claims arrive, unless `--refill`).
    #[arg(long)]
    pub keep: bool,
    /// With `--keep`: no `max` on the pool, so that it makes a new instance for each one bound
    /// while claims arrive (a warm pool's refill sharing the API server with the binds).
    #[arg(long, requires = "keep")]
    pub refill: bool,
    /// Which scenario to run; `all` runs each in a process of its own, so that every figure's
    /// resident memory is its own.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// Docker: the image of the pool and of the baselines. It must answer HTTP 2xx on
    /// `--http-path` at `--http-port` (the default, the project's workload image, is built by
    /// `e2e/build-workload-image.sh`).
    #[arg(long, default_value = "poolkeeper-workload:test")]
    pub image: String,
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    #[arg(long, default_value = "/healthz")]
    pub http_path: String,
    /// Docker: the first host port used (the pool takes `--instances` ports from here, the
    /// baselines the ones after).
    #[arg(long, default_value_t = 31000)]
    pub port_base: u16,
    /// Docker: cold starts timed for the baseline.
    #[arg(long, default_value_t = 10)]
    pub cold: u32,
    #[command(flatten)]
    pub docker: DockerArgs,
    /// Drive claims through the HTTP API (POST, Bound seen on the status stream, release):
    /// `--claims` (default 20000 on memory, 500 on docker) with `--concurrency` clients, on a
    /// pool of `--instances` warm (default 1000 / 50).
    #[arg(long)]
    pub api: bool,
    /// With `--api`: offer claims at this rate (claims per second, arrivals evenly spaced)
    /// instead of as fast as the clients go. A pool refills only as fast as its runtime
    /// recreates instances: a rate below that measures binding, one above measures the queue.
    #[arg(long)]
    pub rate: Option<f64>,
    /// With `--api`: how the pool resets a released instance (`recreate`, the default, makes a
    /// fresh container; `exec` runs `--reset-command` in it and hands it on in place).
    #[arg(long, value_enum, default_value_t = BenchReset::Recreate)]
    pub reset: BenchReset,
    /// The command of `--reset exec` (words; the default suits the project's workload image).
    #[arg(long, num_args = 1.., default_values_t = ["/pk-workload".to_owned(), "clean".to_owned(), "/srv".to_owned()])]
    pub reset_command: Vec<String>,
    /// `--scenario autoscale`: how long a new instance takes to be ready (the memory
    /// runtime's readiness delay; measure it on Docker with `bench --runtime docker`).
    #[arg(long, default_value = "3s", value_parser = duration_arg)]
    pub fill_time: std::time::Duration,
    /// `--scenario autoscale`: the seed its traces are generated from.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `--scenario autoscale`: also replay this trace (`ARRIVAL_SECONDS HOLD_SECONDS` per line).
    #[arg(long)]
    pub trace_file: Option<std::path::PathBuf>,
    /// `--scenario autoscale`: the demand policy's target hit rate.
    #[arg(long, default_value_t = 0.99)]
    pub hit_rate: f64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchReset {
    Recreate,
    Restart,
    Exec,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    All,
    Claim,
    Resync,
    /// Warm-pool policies against arrival traces, in virtual time (not part of `all`).
    Autoscale,
}
