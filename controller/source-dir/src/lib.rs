//! Desired state from a watched directory of YAML/JSON files.
//!
//! - [`loader`]: files to objects, with diagnostics that name the file, line, column and field;
//! - [`watch`]: the watcher that keeps the engine's view equal to the folder's;
//! - [`files`]: what objects refer to in the folder (`filesFrom`, `tokenSecretFile`);
//! - [`declare`]: people's changes (API claims as files, admin edits, records);
//! - [`status`]: the status file that `get` and `describe` read;
//! - [`filewriter`]: durable writes, in groups; [`edit`]: edits of people's YAML that keep the
//!   rest of the file as it was; [`layout`]: where things live in the folder.

pub mod declare;
pub mod edit;
pub mod files;
pub mod filewriter;
pub mod layout;
pub mod loader;
pub mod status;
pub mod watch;

use std::path::PathBuf;

/// Why the directory source could not start.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot open directory {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch {dir}: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error(transparent)]
    Engine(#[from] poolkeeper_engine::EngineError),
}
