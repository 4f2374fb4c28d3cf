//! Deployment: a set of containers kept running as declared.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Condition, Probe, Resources};

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
    /// Declared stopped (an operator's Stop in the web console): its running container is
    /// stopped and kept, and not started again whatever its restart policy, until this is
    /// false again (Start), when it is started in place. Not part of the container's identity:
    /// toggling it never replaces the container.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
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
// Status is written whole by the controller; a field it leaves out reads as its default
// (nothing in it is required of a writer).
#[serde(rename_all = "camelCase", default)]
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
