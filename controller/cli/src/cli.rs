//! The command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{info, warn};

use poolkeeper_engine::EngineConfig;
use poolkeeper_engine::status::{ObjectView, Snapshot};
use poolkeeper_kinds::units::parse_duration;
use poolkeeper_kinds::{Kind, Object};
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_runtime_docker::{DockerConfig, DockerRuntime, NodeConfig};
use poolkeeper_source_dir::declare::{self, DirDeclare};
use poolkeeper_source_dir::files::DirResolve;
use poolkeeper_source_dir::layout::{self, state_dir, status_file};
use poolkeeper_source_dir::loader::validate_paths;
use poolkeeper_source_dir::{status, watch};

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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CustomResourceDefinitions generated from the types.
    Crds,
    /// Check files or folders without running anything.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run the controller on a watched directory.
    Run {
        #[arg(long)]
        dir: PathBuf,
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
    Bench(crate::bench::BenchArgs),
    /// Print a container's output. TARGET: deployment/NAME[/CONTAINER[/REPLICA]], claim/NAME
    /// or instance/NAME.
    Logs {
        target: String,
        #[arg(long)]
        dir: PathBuf,
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
        #[arg(long)]
        dir: PathBuf,
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
        #[arg(long)]
        dir: PathBuf,
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
}

impl ApiArgs {
    fn admin_token(&self) -> anyhow::Result<Option<String>> {
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

    fn webhooks(&self) -> anyhow::Result<Option<poolkeeper_http::WebhookConfig>> {
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
pub enum RuntimeKind {
    Memory,
    Docker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Wide,
    Yaml,
    Json,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POOLKEEPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The controller runs on one thread: the engine is a single task that owns all state, and
/// everything else it waits on is I/O. One thread means no lock contention, no cross-thread
/// wake-ups on the hot path, and one allocator arena (a large share of resident memory when
/// 100k objects are spread over per-thread arenas). The file watcher has its own thread.
fn controller_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Crds => {
            print!("{}", poolkeeper_kinds::crd::crds_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { paths } => validate_cmd(&paths),
        Command::Run {
            dir,
            runtime,
            resync,
            docker,
            api,
        } => {
            let rt = controller_runtime()?;
            rt.block_on(run_cmd(dir, runtime, resync, docker, api))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind,
            name,
            dir,
            server,
            token,
            output,
        } => {
            let snap = match (dir, server) {
                (Some(dir), _) => {
                    if kind == "nodes" || kind == "node" {
                        return nodes_cmd(&load_snapshot(&dir)?.0, output);
                    }
                    load_snapshot(&dir)?.0
                }
                (None, Some(server)) => {
                    let Some(token) = token else {
                        bail!("--server needs --token (or POOLKEEPER_TOKEN)");
                    };
                    let args = crate::client::ServerArgs { server, token };
                    let segment = api_segment(parse_kind(&kind)?);
                    crate::client::snapshot_of(&args, segment)?
                }
                (None, None) => bail!("get needs --dir or --server"),
            };
            get_cmd(&kind, name.as_deref(), snap, output)
        }
        Command::Claim { action } => claim_cmd(action),
        cmd @ (Command::Scale { .. } | Command::Reinitialise { .. } | Command::Delete { .. }) => {
            admin_cmd(cmd)
        }
        Command::Upload {
            target,
            path,
            server,
        } => {
            let claim = target
                .strip_prefix("claim/")
                .filter(|n| !n.is_empty() && !n.contains('/'))
                .ok_or_else(|| anyhow::anyhow!("{target}: expected claim/NAME"))?;
            let archive = crate::client::tar_of_path(&path)?;
            let answer = crate::client::request_bytes(
                &server.server,
                &server.token,
                "PUT",
                &format!("/api/v1/claims/{claim}/files"),
                "application/x-tar",
                &archive,
            )?;
            let v = crate::client::ok_or_error(answer)?;
            println!("copied {} file(s) into claim {claim}", v["files"]);
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe { kind, name, dir } => describe_cmd(&kind, &name, &dir),
        Command::Bench(args) => {
            let rt = controller_runtime()?;
            rt.block_on(crate::bench::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            target,
            dir,
            follow,
            since,
            tail,
        } => {
            let t = reach_target(&dir, &target)?;
            controller_runtime()?.block_on(crate::access::logs(&t, follow, since, tail))
        }
        Command::Exec {
            target,
            dir,
            interactive,
            tty,
            steps,
            command,
        } => {
            let t = reach_target(&dir, &target)?;
            let rt = controller_runtime()?;
            match steps {
                Some(file) => rt.block_on(crate::access::run_steps(&t, &file)),
                None => rt.block_on(crate::access::exec(&t, &command, interactive, tty)),
            }
        }
        Command::Stats {
            target,
            dir,
            output,
        } => {
            let t = reach_target(&dir, &target)?;
            let s = controller_runtime()?.block_on(crate::access::stats(&t))?;
            crate::access::print_stats(&s, output == Some(Output::Json))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Volume { action } => volume_cmd(action),
    }
}

/// The container a target names, from the running controller's status.
fn reach_target(dir: &Path, target: &str) -> anyhow::Result<crate::access::Target> {
    let (snap, _) = load_snapshot(dir)?;
    crate::access::resolve(&snap, target)
}

fn deployment_arg(s: &str) -> anyhow::Result<&str> {
    s.strip_prefix("deployment/")
        .or_else(|| s.strip_prefix("pkd/"))
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| anyhow::anyhow!("{s}: expected deployment/NAME"))
}

fn volume_cmd(action: VolumeAction) -> anyhow::Result<ExitCode> {
    let rt = controller_runtime()?;
    match action {
        VolumeAction::Backup {
            deployment,
            volume,
            dir,
            to,
        } => {
            let dep = deployment_arg(&deployment)?;
            let (snap, _) = load_snapshot(&dir)?;
            let path = rt.block_on(crate::access::backup_volume(&snap, &dir, dep, &volume, to))?;
            println!("{}", path.display());
        }
        VolumeAction::Restore {
            deployment,
            volume,
            file,
            dir,
        } => {
            let dep = deployment_arg(&deployment)?;
            let (snap, _) = load_snapshot(&dir)?;
            rt.block_on(crate::access::restore_volume(&snap, dep, &volume, &file))?;
            println!("restored {} into {dep}/{volume}", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn validate_cmd(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let (objects, problems) = validate_paths(paths);
    let mut out = std::io::stdout().lock();
    for p in &problems {
        writeln!(out, "{p}")?;
    }
    if problems.is_empty() {
        eprintln!("{} object(s) valid", objects.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} problem(s)", problems.len());
        Ok(ExitCode::from(1))
    }
}

async fn run_cmd(
    dir: PathBuf,
    runtime: RuntimeKind,
    resync: Duration,
    docker: DockerArgs,
    api: ApiArgs,
) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    match runtime {
        RuntimeKind::Memory => {
            let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
            run_with(rt, dir, resync, api).await
        }
        RuntimeKind::Docker => {
            let config = docker.docker_config(&state_dir(&dir))?;
            let rt = Arc::new(DockerRuntime::connect(config).await?);
            run_with(rt, dir, resync, api).await
        }
    }
}

async fn run_with<R: poolkeeper_runtime::Runtime>(
    rt: Arc<R>,
    dir: PathBuf,
    resync: Duration,
    api: ApiArgs,
) -> anyhow::Result<()> {
    let sdir = state_dir(&dir);
    std::fs::create_dir_all(&sdir).with_context(|| format!("creating {}", sdir.display()))?;
    let admin_token = api.admin_token()?;
    let webhooks = api.webhooks()?;
    let unfinished = declare::remove_unfinished_claims(&dir).with_context(|| {
        format!(
            "removing unfinished files from {}",
            layout::managed_dir(&dir).display()
        )
    })?;
    for path in unfinished {
        warn!(file = %path.display(), "removed a file a crash left unfinished (its creation was never acknowledged)");
    }
    // Bound before anything starts, so that a taken address is an error at once.
    let listener = match api.listen.as_str() {
        "off" => None,
        addr => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr} (--listen; `off` serves no API)"))?,
        ),
    };
    let api_addr = listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    let mut config = EngineConfig::new(layout::store_dir(&dir));
    config.resync_every = resync;
    config.resolve = Arc::new(DirResolve);
    let (handle, task) = poolkeeper_engine::start(rt, config)?;
    let prepared = watch::Prepared::default();
    let watch = watch::run(dir.clone(), handle.clone(), resync, prepared.clone()).await?;
    let server = match listener {
        Some(l) => {
            let declare = DirDeclare::new(handle.clone(), &dir, prepared)
                .with_context(|| format!("opening {}", dir.display()))?;
            let state = poolkeeper_http::ApiState::new(
                handle.clone(),
                Arc::new(declare),
                admin_token.as_deref(),
                webhooks,
            )
            .context("starting the HTTP API")?;
            info!(address = ?api_addr, "HTTP API listening");
            Some(poolkeeper_http::spawn(l, state).context("starting the HTTP API")?)
        }
        None => None,
    };
    // SIGTERM (what service managers and `docker stop` send) stops as cleanly as Ctrl-C.
    // Registered before the status file first names this process.
    #[cfg(unix)]
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(not(unix))]
    let mut sigterm = ();
    let writer = status::spawn_writer(handle.clone(), &dir, api_addr);
    info!(dir = %dir.display(), "poolkeeper running; Ctrl-C to stop");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("stopping"),
        _ = terminated(&mut sigterm) => info!("stopping (SIGTERM)"),
        r = task => { writer.abort(); watch.abort(); r?; bail!("the engine stopped"); }
    }
    if let Some(s) = server {
        s.stop();
    }
    handle.shutdown().await;
    writer.abort();
    watch.abort();
    Ok(())
}

#[cfg(unix)]
async fn terminated(s: &mut tokio::signal::unix::Signal) {
    s.recv().await;
}

#[cfg(not(unix))]
async fn terminated(_: &mut ()) {
    std::future::pending::<()>().await
}

/// The controller's last snapshot, or one built from the files when none is running.
fn load_snapshot(dir: &Path) -> anyhow::Result<(Snapshot, bool)> {
    let path = status_file(dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let snap: Snapshot = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            let live = Path::new(&format!("/proc/{}", snap.controller.pid)).exists();
            if !live {
                eprintln!(
                    "warning: the controller that wrote {} (pid {}) is not running; status is as of {}",
                    path.display(),
                    snap.controller.pid,
                    snap.controller.updated_at
                );
            }
            Ok((snap, live))
        }
        Err(_) => {
            eprintln!(
                "warning: no status in {} (is `poolkeeper run --dir {}` running?); showing specs only",
                path.display(),
                dir.display()
            );
            let (objects, problems) = validate_paths(&[dir.to_path_buf()]);
            let objects = objects
                .into_iter()
                .map(|o| ObjectView {
                    kind: o.spec.kind(),
                    name: o.name.clone(),
                    origin: o.origin.clone(),
                    spec: spec_value(&o),
                    status: serde_json::Value::Null,
                    events: Vec::new(),
                })
                .collect();
            Ok((
                Snapshot {
                    controller: poolkeeper_engine::status::ControllerInfo {
                        pid: 0,
                        runtime: String::new(),
                        started_at: String::new(),
                        updated_at: String::new(),
                        state_dir: state_dir(dir),
                        api: None,
                    },
                    objects,
                    diagnostics: problems,
                    instances: Vec::new(),
                    nodes: Vec::new(),
                    metrics: Default::default(),
                },
                false,
            ))
        }
    }
}

fn spec_value(o: &Object) -> serde_json::Value {
    use poolkeeper_kinds::Spec;
    match &o.spec {
        Spec::Pool(s) => serde_json::to_value(s),
        Spec::Claim(s) => serde_json::to_value(s),
        Spec::User(s) => serde_json::to_value(s),
        Spec::Deployment(s) => serde_json::to_value(s),
    }
    .unwrap_or(serde_json::Value::Null)
}

fn print_released(v: &serde_json::Value) {
    let names: Vec<&str> = v["released"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
        .unwrap_or_default();
    if names.is_empty() {
        println!("no claims to release");
    }
    for n in names {
        println!("released {n}");
    }
}

/// The one kind an admin command acts on.
fn expect_kind(kind: &str, want: Kind, command: &str) -> anyhow::Result<()> {
    if parse_kind(kind)? != want {
        bail!(
            "{command} acts on {}s only",
            want.to_string().to_lowercase()
        );
    }
    Ok(())
}

fn admin_cmd(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Scale {
            kind,
            name,
            warm,
            server,
        } => {
            expect_kind(&kind, Kind::Pool, "scale")?;
            let body = serde_json::json!({ "warm": warm });
            let v = crate::client::call(
                &server,
                "POST",
                &format!("/api/v1/pools/{name}/scale"),
                Some(&body),
            )?;
            println!(
                "pool {name}: warm {} -> {warm} (in {})",
                v["was"],
                v["file"].as_str().unwrap_or("?")
            );
        }
        Command::Reinitialise { kind, name, server } => {
            expect_kind(&kind, Kind::Pool, "reinitialise")?;
            let v = crate::client::call(
                &server,
                "POST",
                &format!("/api/v1/pools/{name}/reinitialise"),
                None,
            )?;
            println!(
                "pool {name}: {} warm instances being replaced",
                v["replaced"]
            );
        }
        Command::Delete { kind, name, server } => {
            expect_kind(&kind, Kind::User, "delete")?;
            let v = crate::client::call(&server, "DELETE", &format!("/api/v1/users/{name}"), None)?;
            print_released(&v);
            println!(
                "deleted user {name} (from {})",
                v["file"].as_str().unwrap_or("?")
            );
        }
        other => bail!("not an admin command: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_kind(kind: &str) -> anyhow::Result<Kind> {
    Kind::parse(kind)
        .with_context(|| format!("unknown kind {kind:?} (pools, claims, users or deployments)"))
}

/// An object in Kubernetes' shape, for `-o yaml|json`.
fn k8s_shape(v: &ObjectView) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": poolkeeper_kinds::API_VERSION,
        "kind": v.kind.to_string(),
        "metadata": { "name": v.name, "annotations": { "poolkeeper.dev/source": v.origin.to_string() } },
        "spec": v.spec,
        "status": v.status,
    })
}

/// `get nodes`: the runtime's nodes and their health.
fn nodes_cmd(snap: &Snapshot, output: Option<Output>) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match output {
        Some(Output::Json) => writeln!(out, "{}", serde_json::to_string_pretty(&snap.nodes)?)?,
        Some(Output::Yaml) => write!(out, "{}", serde_saphyr::to_string(&snap.nodes)?)?,
        _ => {
            let mut rows = vec![vec![
                "NAME".to_owned(),
                "STATE".to_owned(),
                "INSTANCES".to_owned(),
                "ADDRESS".to_owned(),
                "URL".to_owned(),
                "MESSAGE".to_owned(),
            ]];
            for n in &snap.nodes {
                rows.push(vec![
                    n.name.clone(),
                    n.state.clone(),
                    n.instances.to_string(),
                    n.address.clone(),
                    n.url.clone(),
                    n.message.clone().unwrap_or_else(|| "-".to_owned()),
                ]);
            }
            write!(out, "{}", crate::table::render(&rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The API's path segment for a kind.
fn api_segment(kind: Kind) -> &'static str {
    match kind {
        Kind::Pool => "pools",
        Kind::Claim => "claims",
        Kind::User => "users",
        Kind::Deployment => "deployments",
    }
}

fn claim_cmd(action: ClaimAction) -> anyhow::Result<ExitCode> {
    match action {
        ClaimAction::Create {
            pool,
            name,
            user,
            ttl,
            files,
            wait,
            server,
        } => {
            let mut contents = serde_json::Map::new();
            for f in &files {
                let (path, local) = f
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--file {f}: expected PATH=LOCAL_FILE"))?;
                let text = std::fs::read_to_string(local)
                    .with_context(|| format!("--file {f}: reading {local}"))?;
                contents.insert(path.to_owned(), serde_json::Value::String(text));
            }
            let mut body = serde_json::json!({"pool": pool, "files": contents});
            for (k, v) in [("name", name), ("user", user), ("ttl", ttl)] {
                if let Some(v) = v {
                    body[k] = serde_json::Value::String(v);
                }
            }
            let v = crate::client::call(&server, "POST", "/api/v1/claims", Some(&body))?;
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            println!("{name}");
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let start = std::time::Instant::now();
            let path = format!("/api/v1/claims/{name}");
            loop {
                // Just written, and not yet picked up by the watcher: give it a moment.
                let (code, _) =
                    crate::client::request(&server.server, &server.token, "GET", &path, None)?;
                if code == 404 && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                let c = crate::client::call(&server, "GET", &path, None)?;
                match c["status"]["phase"].as_str() {
                    Some("Bound") => {
                        let e = &c["status"]["endpoint"];
                        println!("{} {}", e["host"].as_str().unwrap_or(""), e["ports"]);
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some("Failed") => {
                        eprintln!("error: claim {name} failed: {}", c["status"]["conditions"]);
                        return Ok(ExitCode::from(1));
                    }
                    _ => {}
                }
                if start.elapsed() > Duration::from_secs(300) {
                    bail!("claim {name} was not bound within 5 minutes");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        ClaimAction::Release {
            name: Some(name),
            server,
            ..
        } => {
            crate::client::call(&server, "DELETE", &format!("/api/v1/claims/{name}"), None)?;
            println!("released {name}");
            Ok(ExitCode::SUCCESS)
        }
        ClaimAction::Release {
            name: None,
            user,
            server,
        } => {
            let user = user.unwrap_or_default();
            let v = crate::client::call(
                &server,
                "POST",
                &format!("/api/v1/users/{user}/release"),
                None,
            )?;
            print_released(&v);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn get_cmd(
    kind: &str,
    name: Option<&str>,
    snap: Snapshot,
    output: Option<Output>,
) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let items: Vec<&ObjectView> = snap
        .objects
        .iter()
        .filter(|o| o.kind == kind && name.is_none_or(|n| n == o.name))
        .collect();
    for d in &snap.diagnostics {
        eprintln!("problem: {d}");
    }
    if let Some(n) = name
        && items.is_empty()
    {
        eprintln!("error: {kind} {n:?} not found");
        return Ok(ExitCode::from(1));
    }
    let mut out = std::io::stdout().lock();
    match output {
        Some(Output::Json) | Some(Output::Yaml) => {
            let value = if name.is_some() && items.len() == 1 {
                k8s_shape(items[0])
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items.iter().map(|v| k8s_shape(v)).collect::<Vec<_>>()})
            };
            if output == Some(Output::Json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                write!(out, "{}", serde_saphyr::to_string(&value)?)?;
            }
        }
        _ => {
            let wide = output == Some(Output::Wide);
            let rows = crate::table::rows(kind, &items, wide);
            write!(out, "{}", crate::table::render(&rows))?;
            if items.is_empty() {
                eprintln!("No {} found.", kind.plural());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_cmd(kind: &str, name: &str, dir: &Path) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let (snap, _) = load_snapshot(dir)?;
    let Some(v) = snap
        .objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
    else {
        eprintln!("error: {kind} {name:?} not found");
        return Ok(ExitCode::from(1));
    };
    let problems: Vec<&String> = snap
        .diagnostics
        .iter()
        .filter(|d| d.contains(&format!("{kind}/{name}:")))
        .collect();
    print!("{}", crate::table::describe(v, &problems, &snap));
    Ok(ExitCode::SUCCESS)
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
        assert_eq!(c.allowed_bind_root, Some(state));
    }
}
