//! The status file (`DIR/.poolkeeper/status.json`): the engine's snapshot, rewritten atomically
//! whenever it changes, for `get`, `describe` and the container commands to read without a
//! running API.

use std::path::Path;
use std::time::Duration;

use poolkeeper_engine::EngineHandle;

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
    let mut written = Written::default();
    let first = write_changed(&handle, &path, &api, &mut written).await;
    tokio::spawn(async move {
        if first.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            if write_changed(&handle, &path, &api, &mut written)
                .await
                .is_none()
            {
                break;
            }
        }
    })
}

/// Writes the engine's snapshot to `path` if it changed since it was last written (the
/// timestamp aside). None once the engine has stopped.
async fn write_changed(
    handle: &EngineHandle,
    path: &Path,
    api: &Option<String>,
    written: &mut Written,
) -> Option<()> {
    let mut snap = handle.snapshot().await.ok()?;
    // Compare without the timestamp, which changes every time.
    snap.controller.updated_at.clear();
    snap.controller.api.clone_from(api);
    let Ok(cmp) = serde_json::to_vec(&snap) else {
        return Some(());
    };
    written.offer(path, cmp, || {
        snap.controller.updated_at = poolkeeper_engine::status::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        );
        serde_json::to_vec(&snap).map_err(std::io::Error::other)
    });
    Some(())
}

/// What the status file holds: a text is written when it differs from the last one written
/// (compared as `cmp`, without what changes every time). A write that failed (a full disk) is
/// tried again at the next offer, however unchanged the text, and logged once.
#[derive(Default)]
struct Written {
    last: Vec<u8>,
    failing: bool,
}

impl Written {
    fn offer(
        &mut self,
        path: &Path,
        cmp: Vec<u8>,
        text: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) {
        if cmp == self.last {
            return;
        }
        match text().and_then(|bytes| write_atomic(path, &bytes)) {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!(file = %path.display(), "status written again");
                }
                self.last = cmp;
            }
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(file = %path.display(), error = %e,
                    "writing status failed; trying again until it is written");
            }
            Err(_) => {}
        }
    }
}

/// Replaces `path` with `bytes` whole or not at all (written beside it as `PATH.tmp`, then
/// renamed over it), without a flush: for what is derived again if a crash loses it.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A part written on a full disk holds the space the next try needs.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::Written;

    #[test]
    fn a_status_that_could_not_be_written_is_written_at_the_next_offer_though_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Its folder missing: every write fails, as on a full disk.
        let path = dir.path().join("gone").join("status.json");
        let mut w = Written::default();
        let text = || Ok(b"{\"x\":1}".to_vec());
        w.offer(&path, b"1".to_vec(), text);
        w.offer(&path, b"1".to_vec(), text);
        assert!(!path.exists());
        std::fs::create_dir(dir.path().join("gone")).expect("mkdir");
        w.offer(&path, b"1".to_vec(), text);
        assert_eq!(std::fs::read(&path).expect("written"), b"{\"x\":1}");
        // Written: the same text again is not written again.
        std::fs::remove_file(&path).expect("rm");
        w.offer(&path, b"1".to_vec(), text);
        assert!(!path.exists());
    }
}
