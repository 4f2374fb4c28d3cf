//! User: who may claim what (quota, allowed pools, SSH keys, API token).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Condition;

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
    /// An operator: their token (or their password, in the web console) opens everything the
    /// admin token does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
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
    /// Instead of `tokenSha256` (Kubernetes mode): a key of a Secret in the User's namespace
    /// that holds the user's API token. Read when the user is applied and at each resync; only
    /// its SHA-256 is kept in memory. The `TokenReady` condition says whether it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// The user's password for the web console, as an argon2id hash in the PHC string format
    /// (`$argon2id$v=19$m=...,t=...,p=...$SALT$HASH`): the password itself is never stored.
    /// `poolkeeper user passwd NAME` sets it. Without it the user signs in with a token only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

/// A key of a Secret in the referring object's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
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
// Status is written whole by the controller; a field it leaves out reads as its default
// (nothing in it is required of a writer).
#[serde(rename_all = "camelCase", default)]
pub struct UserStatus {
    pub observed_generation: Option<i64>,
    pub active_claims: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
