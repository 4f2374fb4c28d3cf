//! Where instances run. One trait, implemented by the in-memory simulator (tests, benchmarks)
//! and, in later layers, by Docker and Kubernetes.
//!
//! Ownership lives in labels, so a restarted controller rebuilds its view with [`Runtime::list`]
//! and adopts what it made. Bindings are not labels (Docker labels are immutable): they live in
//! the engine's durable store.

pub mod memory;
pub mod probe;

pub use probe::find_port;

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use poolkeeper_kinds::{
    ContainerPort, Exposure, PodOverrides, Probe, Protocol, PullPolicy, VolumeMount,
};

pub const LABEL_MANAGED: &str = "poolkeeper.dev/managed";
pub const LABEL_POOL: &str = "poolkeeper.dev/pool";
pub const LABEL_HASH: &str = "poolkeeper.dev/template-hash";
pub const LABEL_DEPLOYMENT: &str = "poolkeeper.dev/deployment";
pub const LABEL_CONTAINER: &str = "poolkeeper.dev/container";
pub const LABEL_REPLICA: &str = "poolkeeper.dev/replica";
/// Which controller owns the instance (several controllers may share one daemon).
pub const LABEL_CONTROLLER: &str = "poolkeeper.dev/controller";
/// Published ports, `name:containerPort:hostPort/protocol` comma-separated, so that an exited
/// container adopted after a restart still tells which host ports it holds.
pub const LABEL_PORTS: &str = "poolkeeper.dev/ports";
/// The readiness probe as JSON, so that probing resumes for adopted containers.
pub const LABEL_READINESS: &str = "poolkeeper.dev/readiness";
/// The liveness probe as JSON (deployments' containers).
pub const LABEL_LIVENESS: &str = "poolkeeper.dev/liveness";
/// The mount path of a host-backed files folder (see `runtime::hostfiles`).
pub const LABEL_FILES_DIR: &str = "poolkeeper.dev/files-dir";
/// The claim an instance is bound to, on runtimes that keep bindings themselves
/// ([`Runtime::keeps_bindings`]: Kubernetes pods, whose labels can change).
pub const LABEL_CLAIM: &str = "poolkeeper.dev/claim";
/// When that binding was made (milliseconds since the epoch, the binding controller's clock):
/// of two instances recording one claim name (a claim deleted and declared again while the old
/// instance's reset had not cleared it), the later binding is the claim's.
pub const LABEL_BOUND_AT: &str = "poolkeeper.dev/bound-at";
/// The user of the claim recorded there, when it was bound: a claim moved to another user while
/// no store remembered its binding is not handed the instance its old user had (and may have
/// left data in). Instances bound by earlier versions record no user.
pub const LABEL_USER: &str = "poolkeeper.dev/user";
/// The bound-at of the binding [`LABEL_USER`] was written with: a user label left from an
/// earlier binding (an earlier version rebound the instance and did not know the label) does
/// not match the binding's bound-at, and is not taken for its user.
pub const LABEL_USER_BOUND_AT: &str = "poolkeeper.dev/user-bound-at";

/// Set on an instance taken out of service (a failed reset or copy of files), on runtimes that
/// keep bindings: a controller that lost its store (a new pod) keeps it out of service too.
pub const LABEL_QUARANTINED: &str = "poolkeeper.dev/quarantined";

/// A binding as a runtime that keeps bindings records it on the instance
/// ([`Runtime::keeps_bindings`]): [`LABEL_CLAIM`], [`LABEL_BOUND_AT`], [`LABEL_USER`] and
/// [`LABEL_USER_BOUND_AT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedBinding<'a> {
    pub claim: &'a str,
    pub user: &'a str,
    /// When it was bound: milliseconds since the epoch, on the binding controller's clock.
    pub at_ms: u64,
}

impl<'a> RecordedBinding<'a> {
    pub fn new(claim: &'a str, user: &'a str, at_ms: u64) -> Self {
        RecordedBinding { claim, user, at_ms }
    }

    /// The labels that record it, with their values.
    pub fn labels(&self) -> [(&'static str, String); 4] {
        let at = self.at_ms.to_string();
        [
            (LABEL_CLAIM, self.claim.to_owned()),
            (LABEL_BOUND_AT, at.clone()),
            (LABEL_USER, self.user.to_owned()),
            (LABEL_USER_BOUND_AT, at),
        ]
    }
}

/// The labels a reset clears: its binding's, and any [`LABEL_QUARANTINED`] (a quarantined
/// instance is never reset, so one on an instance being reset stands for no quarantine).
pub const RESET_CLEARS: [&str; 5] = [
    LABEL_CLAIM,
    LABEL_BOUND_AT,
    LABEL_USER,
    LABEL_USER_BOUND_AT,
    LABEL_QUARANTINED,
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBinding {
    pub name: String,
    pub container_port: u16,
    pub host_port: u16,
    pub protocol: Protocol,
}

/// Labels are shared: every instance of one pool template carries the same map.
pub type Labels = std::sync::Arc<BTreeMap<String, String>>;

/// Everything a runtime needs to create and start one instance.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSpec {
    /// Unique name; also the instance's id in every runtime call.
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<PortBinding>,
    /// The template's ports, published or not (a Kubernetes Service exposes them).
    pub container_ports: Vec<ContainerPort>,
    /// How clients reach the instance; `None`: the runtime's default (Docker: host ports,
    /// Kubernetes: a ClusterIP Service).
    pub exposure: Option<Exposure>,
    /// Scheduling and pull settings for Kubernetes pods (Docker has none to apply).
    pub pod_overrides: Option<PodOverrides>,
    /// The capabilities kept (all others dropped); `None`: the runtime's default set.
    pub capabilities: Option<Vec<String>>,
    pub labels: Labels,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub readiness: Option<Probe>,
    /// Failing it `failureThreshold` times in a row kills the instance (its exit is reported).
    pub liveness: Option<Probe>,
    /// An init process as PID 1 (signals forwarded, zombies reaped).
    pub init: bool,
    pub network: Option<String>,
    /// Named volume or host path -> mount.
    pub volumes: BTreeMap<String, VolumeMount>,
    pub pull_policy: PullPolicy,
    /// Where claims' files go (the pool's `files.mountPath`): a runtime may back it with a
    /// folder it writes directly.
    pub files_dir: Option<String>,
}

impl InstanceSpec {
    /// An instance of `image` with nothing else declared: no ports, command, limits or probes.
    pub fn plain(name: &str, image: &str, labels: Labels) -> Self {
        InstanceSpec {
            name: name.to_owned(),
            image: image.to_owned(),
            command: Vec::new(),
            env: BTreeMap::new(),
            ports: Vec::new(),
            container_ports: Vec::new(),
            exposure: None,
            pod_overrides: None,
            capabilities: None,
            labels,
            cpu_millis: None,
            memory_bytes: None,
            readiness: None,
            liveness: None,
            init: false,
            network: None,
            volumes: BTreeMap::new(),
            pull_policy: PullPolicy::default(),
            files_dir: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    Running,
    Exited { code: Option<i64> },
}

/// An instance as the runtime reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub labels: Labels,
    pub state: InstanceState,
    /// Running and passing its readiness probe (or running, when it has none).
    pub ready: bool,
    pub ports: Vec<PortBinding>,
    /// Whether `ports` are taken on the node itself (Docker's published ports, a pod's
    /// `hostPort`s, node ports), so that each belongs to one instance at a time. False where each
    /// instance has an address of its own (a Service per pod): the ports then only say what a
    /// client dials there, and many instances share them.
    pub host_ports: bool,
    /// Which runtime node holds it.
    pub node: String,
    /// Runtime-wide sequence number of the instance's last change. Events and list results
    /// travel different paths to the engine; a report older than one already seen is stale and
    /// ignored. 0 means "unordered" (always applied).
    pub revision: u64,
}

impl Instance {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// A node's health as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub url: String,
    pub address: String,
    /// `Ready`, `Unreachable` (within the grace period) or `Down`.
    pub state: String,
    pub instances: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// The namespace of its pods (the Kubernetes runtime): where `logs`, `exec` and `stats`
    /// find them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// Created, started, became ready or not, exited.
    Changed(Instance),
    /// Removed (by us or behind our back).
    Removed(String),
    /// The event stream lost events (reconnected): the engine must list again.
    Relist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub output: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error("instance {0} not found")]
    NotFound(String),
    #[error("image {image} is not available: {reason}")]
    ImageMissing { image: String, reason: String },
    #[error("host port {port} is in use by another process")]
    PortInUse { port: u16 },
    /// The instance is bound to another claim (`holder`, when the runtime read it), or it
    /// changed under us (a stale view).
    #[error("instance {instance} is taken: {reason}")]
    Conflict {
        instance: String,
        reason: String,
        holder: Option<String>,
    },
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
    /// The instance is there but not running (exited, failed, not started yet, or being
    /// removed): what needs its process (an exec, files copied by exec) cannot be done. It
    /// says nothing against the instance but that it is down; its own events say the rest.
    #[error("instance {0} is not running")]
    NotRunning(String),
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// A runtime: every call is idempotent where that makes sense (removing a missing instance
/// succeeds), and every change is also reported through [`Runtime::subscribe`].
pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The nodes instances run on, with their health (none for single-node runtimes).
    fn nodes(&self) -> Vec<NodeStatus> {
        Vec::new()
    }
    /// The host address clients use to reach published ports of instances on `node`.
    fn endpoint_host(&self, node: &str) -> String;
    /// Every instance carrying `poolkeeper.dev/managed=true`.
    fn list(&self) -> impl Future<Output = Result<Vec<Instance>>> + Send;
    /// Creates and starts an instance; returns once it runs (readiness comes later as events).
    fn create(&self, spec: InstanceSpec) -> impl Future<Output = Result<Instance>> + Send;
    /// Stops and removes an instance; succeeds when it is already gone.
    fn remove(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Restarts (or starts an exited) instance in place.
    fn restart(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Stops a running instance gracefully and keeps it (its filesystem stays): it shows as
    /// exited until restarted. Stopping a stopped instance is not an error.
    fn stop(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    fn exec(
        &self,
        name: &str,
        command: &[String],
    ) -> impl Future<Output = Result<ExecOutput>> + Send;
    /// Writes files (relative path -> bytes) under `dir` inside the instance.
    fn put_files(
        &self,
        name: &str,
        dir: &str,
        files: &[(String, Vec<u8>)],
    ) -> impl Future<Output = Result<()>> + Send;
    fn logs(&self, name: &str, tail: usize) -> impl Future<Output = Result<String>> + Send;
    /// Follows the instance's output, line by line, from now on (across restarts) until the
    /// instance is removed or the receiver dropped.
    fn follow_logs(&self, name: &str) -> mpsc::UnboundedReceiver<String>;
    /// Whether the runtime records bindings on the instances themselves (a label the engine
    /// sets with [`Runtime::bind`] before a claim is reported Bound, and reads back from
    /// [`Runtime::list`] when its own store has lost them). Docker's labels are immutable, so
    /// its bindings live in the engine's store only.
    fn keeps_bindings(&self) -> bool {
        false
    }
    /// Records a binding on the instance (see [`RecordedBinding`]), or clears it with `None`
    /// (after a reset: with any [`LABEL_QUARANTINED`], since a quarantined instance is never
    /// reset), failing when another claim holds it or the instance changed since it was last
    /// seen (so that two controllers never bind one instance twice). A no-op on runtimes that do
    /// not keep bindings. Returns the instance's [`Instance::revision`] once written (0 where
    /// reports are unordered): a report older than that shows the instance as it was before,
    /// and is stale.
    fn bind(
        &self,
        name: &str,
        binding: Option<RecordedBinding<'_>>,
    ) -> impl Future<Output = Result<u64>> + Send {
        let _ = (name, binding);
        async { Ok(0) }
    }
    /// Records on the instance that it is quarantined ([`LABEL_QUARANTINED`]), on runtimes that
    /// keep bindings. A no-op elsewhere (the engine's store keeps it).
    fn quarantine(&self, name: &str) -> impl Future<Output = Result<()>> + Send {
        let _ = name;
        async { Ok(()) }
    }
    /// Sets the instance's cpu (millicores) and memory (bytes) limits in place, while it runs;
    /// `None` leaves that one as it is. Runtimes that cannot say so.
    fn resize(
        &self,
        name: &str,
        cpu_millis: Option<u64>,
        memory_bytes: Option<u64>,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (cpu_millis, memory_bytes);
        let msg = format!(
            "{name}: the {} runtime cannot change an instance's resources in place",
            self.name()
        );
        async move { Err(RuntimeError::Failed(msg)) }
    }
    /// Creates a network if it does not exist.
    fn ensure_network(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Removes the named volumes this controller made for deployment `deployment`.
    fn remove_volumes(&self, deployment: &str) -> impl Future<Output = Result<()>> + Send;
    /// A new stream of events; every subscriber sees every event from now on.
    fn subscribe(&self) -> mpsc::UnboundedReceiver<RuntimeEvent>;
}

/// A tar archive placing `files` (relative paths) under `dir`, extracted at `/`. Paths that
/// would leave `dir` are refused.
pub fn tar_of(dir: &str, files: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let base = dir.trim_start_matches('/').trim_end_matches('/');
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in files {
        let rel = std::path::Path::new(path);
        if !poolkeeper_core::files::is_plain_relative(rel) {
            return Err(RuntimeError::Failed(format!(
                "file path {path:?} must be relative and stay inside {dir}"
            )));
        }
        let full = if base.is_empty() {
            path.clone()
        } else {
            format!("{base}/{path}")
        };
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, &full, bytes.as_slice())
            .map_err(|e| RuntimeError::Failed(format!("packing {path}: {e}")))?;
    }
    builder
        .into_inner()
        .map_err(|e| RuntimeError::Failed(format!("packing files: {e}")))
}

/// A protocol as Docker spells it in port keys and labels (`tcp`, `udp`).
pub fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `name:containerPort:hostPort/protocol`, comma-separated.
pub fn encode_ports(ports: &[PortBinding]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "{}:{}:{}/{}",
                p.name,
                p.container_port,
                p.host_port,
                proto(p.protocol)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn decode_ports(s: &str) -> Vec<PortBinding> {
    s.split(',')
        .filter_map(|item| {
            let (rest, protocol) = item.rsplit_once('/')?;
            let mut parts = rest.split(':');
            let name = parts.next()?.to_owned();
            let container_port = parts.next()?.parse().ok()?;
            let host_port = parts.next()?.parse().ok()?;
            Some(PortBinding {
                name,
                container_port,
                host_port,
                protocol: if protocol == "udp" {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
            })
        })
        .collect()
}
