//! The declared kinds (group `poolkeeper.dev`, version `v1alpha1`).
//!
//! These types are the single source of truth: the CRDs under `crds/` are generated from them
//! (`poolkeeper crds`), and the directory source parses files into the same spec types. Specs
//! deny unknown fields so that a typo in a file is an error rather than a silently ignored key
//! (kube strips the resulting `additionalProperties: false` from the CRD schema, where the API
//! server's pruning does that job).

use std::borrow::Cow;
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "poolkeeper.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "poolkeeper.dev/v1alpha1";

// ---------------------------------------------------------------------------------------------
// Pool

/// A warm pool of ready, identical instances, kept at `warm` unassigned ones within `max`.
// kube's `printcolumn(type_ = "integer", ...)` repeats keys by design; clippy reads them as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "poolkeeper.dev",
    version = "v1alpha1",
    kind = "Pool",
    doc = "A warm pool of ready instances of one template, kept at the declared size.",
    namespaced,
    status = "PoolStatus",
    shortname = "pl",
    category = "poolkeeper",
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.template.image"),
    printcolumn(name = "Warm", type_ = "integer", json_path = ".status.warm"),
    printcolumn(name = "Bound", type_ = "integer", json_path = ".status.bound"),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances"),
    printcolumn(name = "Queued", type_ = "integer", json_path = ".status.queued"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpec {
    /// What every instance of the pool runs.
    pub template: InstanceTemplate,
    /// Ready, unassigned instances to keep.
    #[serde(default)]
    pub warm: u32,
    /// Cap on all instances of the pool (warm, bound, resetting). Defaults to what `hostPorts`
    /// can serve, or no cap without `hostPorts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Host ports handed to instances, one per declared container port, from this inclusive range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ports: Option<PortRange>,
    /// What happens to an instance when its claim ends.
    #[serde(default)]
    pub reset: ResetPolicy,
    /// Command run inside the instance when `reset` is `Exec`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reset_command: Vec<String>,
    /// Default lease of claims on this pool (e.g. `2h`, `30m`); claims may ask for less.
    #[serde(default, rename = "claimTTL", skip_serializing_if = "Option::is_none")]
    pub claim_ttl: Option<String>,
    /// When the runtime may pull the template's image.
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceTemplate {
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesTarget>,
    /// SSH access: on bind, the claiming user's `sshKeys` are installed as the login user's
    /// authorized keys, and the claim's status says how to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshAccess>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SshAccess {
    /// The declared port sshd listens on (name or number).
    #[serde(default = "default_ssh_port")]
    pub port: PortRef,
    /// Login user; keys go to its `~/.ssh/authorized_keys` (`/root` for root, else `/home/USER`).
    #[serde(default = "default_ssh_user")]
    pub user: String,
}

fn default_ssh_port() -> PortRef {
    PortRef::Name("ssh".to_owned())
}

fn default_ssh_user() -> String {
    "root".to_owned()
}

impl SshAccess {
    pub fn ssh_dir(&self) -> String {
        if self.user == "root" {
            "/root/.ssh".to_owned()
        } else {
            format!("/home/{}/.ssh", self.user)
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    pub name: String,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn len(&self) -> u32 {
        if self.end < self.start {
            0
        } else {
            u32::from(self.end - self.start) + 1
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

/// CPU and memory limits, in Kubernetes quantity notation (`500m`, `1`, `256Mi`, `1G`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// Where a claim's files land inside the instance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilesTarget {
    pub mount_path: String,
}

/// Readiness probe: exactly one of `httpGet`, `tcpSocket`, `exec`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetProbe {
    #[serde(default = "default_http_path")]
    pub path: String,
    pub port: PortRef,
}

fn default_http_path() -> String {
    "/".to_owned()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocketProbe {
    pub port: PortRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecProbe {
    pub command: Vec<String>,
}

/// A container port given by number or by the name of a declared port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl JsonSchema for PortRef {
    fn schema_name() -> Cow<'static, str> {
        "PortRef".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(s) => f.write_str(s),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ResetPolicy {
    /// Destroy the instance and let the pool create a fresh one.
    #[default]
    Recreate,
    /// Restart the instance in place (its writable layer survives: use only for stateless images).
    Restart,
    /// Run `resetCommand` inside the instance; a non-zero exit quarantines it.
    Exec,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Use a local image; pull only when it is missing.
    #[default]
    IfNotPresent,
    /// Never pull: a missing image is a condition on the pool.
    Never,
    /// Pull before every creation.
    Always,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    pub observed_generation: Option<i64>,
    /// Instances that exist (warm, bound, starting, resetting, quarantined).
    pub instances: u32,
    /// Instances whose readiness probe passes.
    pub ready: u32,
    /// Ready, unbound instances.
    pub warm: u32,
    pub bound: u32,
    pub starting: u32,
    pub quarantined: u32,
    /// Claims waiting for an instance.
    pub queued: u32,
    /// Claims bound at once from a warm instance.
    pub hits: u64,
    /// Claims that had to wait.
    pub misses: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

// ---------------------------------------------------------------------------------------------
// Claim

/// A request for one instance of a pool, for a user, for a while.
// kube's `printcolumn(type_ = "integer", ...)` repeats keys by design; clippy reads them as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "poolkeeper.dev",
    version = "v1alpha1",
    kind = "Claim",
    doc = "A request for one instance of a pool, for a user, for a while.",
    namespaced,
    status = "ClaimStatus",
    shortname = "cl",
    category = "poolkeeper",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "User", type_ = "string", json_path = ".spec.user"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Instance", type_ = "string", json_path = ".status.instance"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimSpec {
    pub pool: String,
    pub user: String,
    /// Lease (e.g. `1h`); defaults to the pool's `claimTTL`; no lease when neither is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Files to place under the pool's `files.mountPath`: relative path -> content.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// A local folder or `.tar` whose contents are placed under the pool's `files.mountPath`
    /// (relative paths are resolved against the claim file's folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_from: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ClaimPhase {
    #[default]
    Pending,
    Bound,
    Released,
    Expired,
    Failed,
}

impl ClaimPhase {
    /// A terminal claim holds no instance and never binds again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ClaimPhase::Released | ClaimPhase::Expired | ClaimPhase::Failed
        )
    }
}

impl std::fmt::Display for ClaimPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimStatus {
    pub observed_generation: Option<i64>,
    pub phase: ClaimPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// 1-based position among the pool's waiting claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub host: String,
    /// Port name -> host port.
    pub ports: BTreeMap<String, u16>,
    /// How to log in, for pools with `ssh` (e.g. `ssh -p 8400 root@10.0.0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// User

/// Who may claim what.
// See PoolSpec: kube's printcolumn syntax repeats keys.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "poolkeeper.dev",
    version = "v1alpha1",
    kind = "User",
    doc = "Who may claim what: quota, allowed pools, SSH keys.",
    namespaced,
    status = "UserStatus",
    shortname = "pku",
    category = "poolkeeper",
    printcolumn(name = "Email", type_ = "string", json_path = ".spec.email"),
    printcolumn(name = "Claims", type_ = "integer", json_path = ".status.activeClaims"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    /// SHA-256 (hex) of the user's API token: the token itself is never stored.
    /// `printf %s TOKEN | sha256sum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// Instead of `tokenSha256`: a file holding the user's API token itself (as a secret
    /// would; whitespace around it is ignored). A relative path is taken from the folder of the
    /// file that declares the user. Read when the user is applied and at each resync (a
    /// rotated token works from then on); only its SHA-256 is kept in memory. The User's
    /// `TokenReady` condition says whether it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_file: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quota {
    /// Claims that may be Pending or Bound at once.
    #[serde(default = "default_max_claims")]
    pub max_claims: u32,
    /// Pools this user may claim from; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
}

/// Why 3: the old PaaS gave each user a handful of containers; an explicit quota raises it.
fn default_max_claims() -> u32 {
    3
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            max_claims: default_max_claims(),
            pools: Vec::new(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserStatus {
    pub observed_generation: Option<i64>,
    pub active_claims: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

// ---------------------------------------------------------------------------------------------
// Deployment

/// A set of containers kept running as declared.
// See PoolSpec: kube's printcolumn syntax repeats keys.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "poolkeeper.dev",
    version = "v1alpha1",
    kind = "Deployment",
    doc = "A set of containers kept running as declared.",
    namespaced,
    status = "DeploymentStatus",
    shortname = "pkd",
    category = "poolkeeper",
    printcolumn(
        name = "Containers",
        type_ = "integer",
        json_path = ".status.containers"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentSpec {
    /// A network of the deployment's own, on which containers reach each other by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    pub containers: Vec<ContainerSpec>,
    #[serde(default)]
    pub strategy: UpdateStrategy,
    /// Keep named volumes when the deployment is deleted.
    #[serde(default)]
    pub retain_volumes: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `"<containerPort>/<tcp|udp>"` -> host port, as in Pod Manager and Docker's SDK.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Named volume or host path -> mount.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, VolumeMount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    /// Health check while running: after `failureThreshold` failures in a row the container
    /// is killed, and its `restartPolicy` restarts it (counted, with crash-loop backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    /// Run a tiny init as PID 1 that forwards signals and reaps zombies (Docker's `--init`):
    /// for programs that do not stop on SIGTERM by themselves when they are PID 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// Patterns watched in the container's output, each with a response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_triggers: Vec<LogTrigger>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default = "default_replicas")]
    pub replicas: u32,
}

fn default_replicas() -> u32 {
    1
}

/// A pattern in a container's output and what to do when it appears. Matching lines that
/// follow each other with less than `quietSeconds` between them are one burst, and a burst
/// fires the trigger once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogTrigger {
    pub name: String,
    /// Text a line must contain.
    pub contains: String,
    pub action: LogAction,
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_seconds: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum LogAction {
    /// Restart the container (counted as a restart).
    Restart,
    /// Set the deployment's condition `LogTriggered` (and an event).
    Condition,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMount {
    pub bind: String,
    #[serde(default)]
    pub mode: VolumeMode,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeMode {
    #[default]
    Rw,
    Ro,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UpdateStrategy {
    #[default]
    RollingUpdate,
    Recreate,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    pub observed_generation: Option<i64>,
    pub containers: u32,
    pub ready: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerStatus>,
    /// How often each log trigger fired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_triggers: Vec<LogTriggerStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogTriggerStatus {
    pub container: String,
    pub name: String,
    /// Bursts that fired it.
    pub fired: u32,
    /// Matching lines seen.
    pub matches: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_line: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fired_at: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    pub replica: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Waiting | Starting | Running | Exited | CrashLoopBackOff
    pub state: String,
    pub ready: bool,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Conditions

/// A condition as in the Kubernetes API conventions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
