//! Pool: a warm pool of ready instances of one template, and what instances are made of
//! (template, ports, probes, resources), shared with deployments' containers.

use std::borrow::Cow;
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::Condition;

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
    // `kubectl scale pool/NAME --replicas=N` sets `warm`: with `autoscale`, the floor.
    scale(
        spec_replicas_path = ".spec.warm",
        status_replicas_path = ".status.warm",
        label_selector_path = ".status.selector"
    ),
    shortname = "pl",
    category = "poolkeeper",
    printcolumn(name = "Warm", type_ = "integer", json_path = ".status.warm"),
    printcolumn(name = "Bound", type_ = "integer", json_path = ".status.bound"),
    printcolumn(name = "Queued", type_ = "integer", json_path = ".status.queued"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        json_path = ".spec.template.image",
        priority = 1
    ),
    printcolumn(
        name = "Instances",
        type_ = "integer",
        json_path = ".status.instances",
        priority = 1
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
    /// Default and longest lease of claims on this pool (e.g. `2h`, `30m`); claims may ask for
    /// less, not for more.
    #[serde(default, rename = "claimTTL", skip_serializing_if = "Option::is_none")]
    pub claim_ttl: Option<String>,
    /// When the runtime may pull the template's image.
    #[serde(default)]
    pub pull_policy: PullPolicy,
    /// Let the pool size its warm instances itself: a buffer above the bound ones, schedules,
    /// demand (docs/autoscale.md). Without it, `warm` alone decides, as always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::autoscale::Autoscale>,
    /// How clients reach an instance on the Kubernetes runtime (`ClusterIP` when not given).
    /// The Docker runtime always publishes `hostPorts` on its host and refuses the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposure: Option<Exposure>,
    /// The most cpu and memory a claim may give its instance (the Claim's `resources`, a
    /// webhook reservation's `cpu_limit`/`memory_limit`), applied in place when it is bound
    /// (a Kubernetes in-place pod resize, `docker update`) and undone by its reset. Each bound
    /// needs the template to declare the same resource. Without it, claims cannot change
    /// resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_resources: Option<Resources>,
}

/// How clients reach a pool's instance on the Kubernetes runtime.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Exposure {
    /// A Service per instance; the endpoint is its DNS name and the container port.
    #[default]
    ClusterIP,
    /// A Service per instance with node ports taken from `hostPorts` (which must lie inside the
    /// cluster's node-port range); the endpoint is the node's address.
    NodePort,
    /// The pod's own `hostPort`s from `hostPorts`, as the Docker runtime publishes them.
    HostPort,
    /// A Service of type LoadBalancer per instance; the endpoint is its ingress address.
    LoadBalancer,
}

impl Exposure {
    pub fn as_str(self) -> &'static str {
        match self {
            Exposure::ClusterIP => "ClusterIP",
            Exposure::NodePort => "NodePort",
            Exposure::HostPort => "HostPort",
            Exposure::LoadBalancer => "LoadBalancer",
        }
    }
}

/// What a cluster needs of the pods the Kubernetes runtime makes (ignored by Docker).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Names of Secrets in the pod's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
}

/// A pod toleration, as Kubernetes declares it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `Exists` or `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
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
    /// Scheduling and pull settings for the Kubernetes runtime's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_overrides: Option<PodOverrides>,
    /// The Linux capabilities the instance keeps (all others dropped), e.g. `[NET_BIND_SERVICE]`.
    /// Not given: the runtime's default set (Docker's; on Kubernetes the baseline Pod Security
    /// Standard's, which is Docker's without `NET_RAW`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
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

impl Protocol {
    /// As Kubernetes spells it (`TCP`, `UDP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
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

impl Resources {
    /// Cpu in millicores and memory in bytes; what does not parse (validation refuses it) is
    /// `None`, as is what is not given.
    pub fn limits(&self) -> (Option<u64>, Option<u64>) {
        use crate::units::{parse_cpu_millis, parse_memory_bytes};
        (
            self.cpu.as_deref().and_then(|c| parse_cpu_millis(c).ok()),
            self.memory
                .as_deref()
                .and_then(|m| parse_memory_bytes(m).ok()),
        )
    }
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
// Status is written whole by the controller; a field it leaves out reads as its default
// (nothing in it is required of a writer).
#[serde(rename_all = "camelCase", default)]
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
    /// Warm instances the pool keeps now: `warm`, or what `autoscale` decided.
    pub desired_warm: u32,
    /// With `autoscale`: which policy decided `desiredWarm`, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    /// Ready instances that waited unbound, summed over time (instance-seconds): what the
    /// warm pool has cost. Brought up to date once a minute.
    pub idle_instance_seconds: u64,
    /// The label selector of the pool's instances (`poolkeeper.dev/pool=NAME`), served by the
    /// `scale` subresource (a HorizontalPodAutoscaler needs one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// What `autoscale` decided and what it decided from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Scaling {
    /// The policy that asked for the most: `warm`, `min`, `buffer`, `schedule`, `demand`.
    pub policy: String,
    /// Why, in words (`demand: 0.42 claims/s x 3.1 s fill time -> 5 warm for 99% hits`).
    pub reason: String,
    /// Claims arriving per second, over `demand.window`.
    pub arrival_rate: f64,
    /// How long the pool takes to make a new instance ready, as measured (seconds).
    pub fill_time_seconds: f64,
}
