//! The status file (`DIR/.poolkeeper/status.json`): the engine's snapshot, rewritten atomically
//! whenever it changes, for `get`, `describe` and the container commands to read without a
//! running API.

use std::path::Path;
use std::time::Duration;

use poolkeeper_engine::EngineHandle;
use poolkeeper_engine::status::Snapshot;

use crate::layout::status_file;

/// How often the snapshot is compared with what was last written. Why 100 ms: `get` right after
/// a change sees it, and an unchanged snapshot costs one comparison.
const EVERY: Duration = Duration::from_millis(100);

/// Writes the engine's snapshot to `DIR/.poolkeeper/status.json` whenever it changes, until the
/// engine stops. `api`: the HTTP API's address, shown in the file.
pub async fn spawn_writer(
    handle: EngineHandle,
    dir: &Path,
    api: Option<String>,
) -> tokio::task::JoinHandle<()> {
    let path = status_file(dir);
    // The first one written before this returns: once `run` says it serves, `get` reads it.
    let mut last = Vec::new();
    let first = write_changed(&handle, &path, &api, &mut last).await;
    tokio::spawn(async move {
        if first.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            if write_changed(&handle, &path, &api, &mut last)
                .await
                .is_none()
            {
                break;
            }
        }
    })
}

/// Writes the engine's snapshot to `path` if it changed since `last` (the timestamp aside).
/// None once the engine has stopped.
async fn write_changed(
    handle: &EngineHandle,
    path: &Path,
    api: &Option<String>,
    last: &mut Vec<u8>,
) -> Option<()> {
    let mut snap = handle.snapshot().await.ok()?;
    // Compare without the timestamp, which changes every time.
    snap.controller.updated_at.clear();
    snap.controller.api.clone_from(api);
    let Ok(cmp) = serde_json::to_vec(&snap) else {
        return Some(());
    };
    if cmp == *last {
        return Some(());
    }
    *last = cmp;
    snap.controller.updated_at = poolkeeper_engine::status::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    );
    if let Err(e) = write_atomic(path, &snap) {
        tracing::warn!(file = %path.display(), error = %e, "writing status failed");
    }
    Some(())
}

fn write_atomic(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
