//! Claim: a request for one instance of a pool, for a user, for a while.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Condition;

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
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "User", type_ = "string", json_path = ".spec.user"),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint.address"
    ),
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".status.instance",
        priority = 1
    ),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.expiresAt",
        priority = 1
    ),
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
    /// Lease (e.g. `1h`); defaults to the pool's `claimTTL`, which is also the longest; no
    /// lease when neither is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Files to place under the pool's `files.mountPath`: relative path -> content.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// A local folder or `.tar` whose contents are placed under the pool's `files.mountPath`
    /// (relative paths are resolved against the claim file's folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_from: Option<String>,
    /// The instance's cpu and memory while this claim holds it, within the pool's
    /// `claimResources` (what is not given stays the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<crate::Resources>,
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
// Status is written whole by the controller; a field it leaves out reads as its default
// (nothing in it is required of a writer).
#[serde(rename_all = "camelCase", default)]
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
    /// `host:port` of its first port (by name): what `kubectl get claims` shows. All ports
    /// are in `ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port name -> host port.
    pub ports: BTreeMap<String, u16>,
    /// How to log in, for pools with `ssh` (e.g. `ssh -p 8400 root@10.0.0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
}
