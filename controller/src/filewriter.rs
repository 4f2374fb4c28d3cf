//! Durable writes and removals of small files (the API's claim files).
//!
//! Each write goes to a hidden temporary beside its file (the watcher ignores it), is synced,
//! and renamed over the file; a removal unlinks. Then the folder is synced, so that the rename
//! or removal survives a crash, before anyone is told it is done. The folder syncs are
//! committed in groups: a change that finds a sync in progress waits for the next one, which
//! covers every change made meanwhile, so under load one folder sync serves many claims, and
//! with no load nothing waits for a timer. The files' own syncs run in parallel on the blocking
//! pool (the block layer merges concurrent flushes), never on the async workers.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// A handle to the writer; cloning shares it.
#[derive(Clone, Default)]
pub struct FileWriter {
    folders: Arc<Mutex<HashMap<PathBuf, Arc<FolderSync>>>>,
}

/// Group commit of one folder's syncs.
#[derive(Default)]
struct FolderSync {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Changes made in the folder so far (each takes the next number).
    changed: u64,
    /// Every change up to this number is durable.
    synced: u64,
    /// A sync is running; it covers the changes up to the number it started with.
    running: bool,
    /// The last sync failed: the changes it covered are told so.
    failed: Option<(u64, String)>,
    /// The folder, open (opened once: each open is an event for the watcher).
    handle: Option<Arc<std::fs::File>>,
}

impl FolderSync {
    /// Makes the changes made so far in `folder` durable; returns once one sync that began
    /// after this call's change covers it.
    fn sync(&self, folder: &Path) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.changed += 1;
        let mine = st.changed;
        loop {
            if st.synced >= mine {
                return match &st.failed {
                    Some((upto, e)) if *upto >= mine => {
                        Err(std::io::Error::other(format!("syncing the folder: {e}")))
                    }
                    _ => Ok(()),
                };
            }
            if st.running {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.running = true;
            let upto = st.changed;
            let handle = st.handle.clone();
            drop(st);
            // The open folder is used while it is still the folder at that path (one made
            // again under the same name is opened anew).
            let r = match handle.filter(|h| same_file(h, folder)) {
                Some(h) => Ok(h),
                None => std::fs::File::open(folder).map(Arc::new),
            };
            let r = r.and_then(|h| h.sync_all().map(|()| h));
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.running = false;
            st.synced = upto;
            match r {
                Ok(h) => st.handle = Some(h),
                Err(e) => {
                    // Opened again next time (the folder may have been made again).
                    st.handle = None;
                    st.failed = Some((upto, e.to_string()));
                }
            }
            self.done.notify_all();
        }
    }
}

fn same_file(open: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (open.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl FileWriter {
    pub fn new() -> FileWriter {
        FileWriter::default()
    }

    /// Writes `path` atomically and durably, off the async workers; the folder sync is shared
    /// with the changes made meanwhile.
    pub async fn write(&self, path: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
        let this = self.clone();
        blocking(move || {
            stage(&path, &bytes)?;
            std::fs::rename(temporary(&path), &path)?;
            this.sync_folder(&path)
        })
        .await
    }

    /// Removes `path` durably (`NotFound` when it was not there).
    pub async fn remove(&self, path: PathBuf) -> std::io::Result<()> {
        let this = self.clone();
        blocking(move || {
            std::fs::remove_file(&path)?;
            this.sync_folder(&path)
        })
        .await
    }

    fn sync_folder(&self, path: &Path) -> std::io::Result<()> {
        let Some(folder) = path.parent() else {
            return Ok(());
        };
        let sync = {
            let mut folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
            folders.entry(folder.to_path_buf()).or_default().clone()
        };
        sync.sync(folder)
    }
}

/// Writes `path` atomically and durably now, on the calling thread (for rare writes, such as a
/// reservation's record); the folder is synced for this write alone.
pub fn write_now(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    stage(path, bytes)?;
    std::fs::rename(temporary(path), path)?;
    match path.parent() {
        Some(folder) => std::fs::File::open(folder)?.sync_all(),
        None => Ok(()),
    }
}

async fn blocking(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> std::io::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes and syncs the temporary of a write.
fn stage(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::File::create(temporary(path))?;
    f.write_all(bytes)?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_and_removals_are_atomic_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = FileWriter::new();
        let a = dir.path().join("sub/a.yaml");
        let b = dir.path().join("sub/b.yaml");
        // Many at once: each waits for a folder sync that covers it.
        let many: Vec<_> = (0..40)
            .map(|i| w.write(dir.path().join(format!("sub/m{i}.yaml")), vec![b'x'; i]))
            .collect();
        for r in futures::future::join_all(many).await {
            r.expect("write");
        }
        for i in 0..40 {
            let p = dir.path().join(format!("sub/m{i}.yaml"));
            assert_eq!(std::fs::read(&p).expect("m").len(), i);
            w.remove(p).await.expect("remove");
        }
        w.write(a.clone(), b"one".to_vec()).await.expect("write a");
        w.write(b.clone(), b"two".to_vec()).await.expect("write b");
        w.remove(b.clone()).await.expect("remove b");
        assert_eq!(std::fs::read(&a).expect("a"), b"one");
        assert!(!b.exists(), "b was removed after its write");
        // No temporary is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("sub"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a.yaml".to_owned()]);
        w.write(a.clone(), b"three".to_vec())
            .await
            .expect("rewrite");
        assert_eq!(std::fs::read(&a).expect("a"), b"three");
        let e = w.remove(b).await.expect_err("b is gone");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
