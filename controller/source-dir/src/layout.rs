//! Where things live in a watched folder `DIR`: people's spec files anywhere in it, claims made
//! through the API in `DIR/managed/claims/`, and poolkeeper's own state in `DIR/.poolkeeper/`
//! (never loaded as specs).

use std::path::{Path, PathBuf};

pub use crate::loader::STATE_DIR;

/// Where claims made through the API (or a webhook) live, under the watched folder.
pub const MANAGED_CLAIMS: &str = "managed/claims";

/// `DIR/.poolkeeper`: the state store, the status file, records, instances' files folders.
pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join(STATE_DIR)
}

/// The status snapshot that `get` and `describe` read, rewritten by the running controller.
pub fn status_file(dir: &Path) -> PathBuf {
    state_dir(dir).join("status.json")
}

/// The engine's crash-safe store.
pub fn store_dir(dir: &Path) -> PathBuf {
    state_dir(dir).join("state")
}

/// Where users registered through the web console live, under the watched folder.
pub const MANAGED_USERS: &str = "managed/users";

/// The file of user `name` registered through the web console.
pub fn managed_user_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(MANAGED_USERS).join(format!("{name}.yaml"))
}

/// Where the web console declares the example flows it runs, one file per flow.
pub const MANAGED_FLOWS: &str = "managed/flows";

/// The file of group (flow) `group`.
pub fn managed_group_file(dir: &Path, group: &str) -> PathBuf {
    dir.join(MANAGED_FLOWS).join(format!("{group}.yaml"))
}

pub fn managed_dir(dir: &Path) -> PathBuf {
    dir.join(MANAGED_CLAIMS)
}

/// The file of claim `name` made through the API (or a webhook).
pub fn managed_file(dir: &Path, name: &str) -> PathBuf {
    managed_dir(dir).join(format!("{name}.yaml"))
}
