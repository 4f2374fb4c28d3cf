//! Durable writes and removals of small files (the API's claim files).
//!
//! Each write goes to a hidden temporary beside its file (the watcher ignores it), is made
//! durable, and is renamed over the file; a removal unlinks. Then the folder is synced, so that
//! the rename or removal survives a crash, before anyone is told it is done.
//!
//! All of it runs on one thread of its own, in rounds: a round takes every change asked for
//! while the previous one ran. Its temporaries are written, then made durable together by one
//! `syncfs` of their filesystem (one journal commit, where a sync per file would make one
//! each), which also makes the previous round's renames and removals durable; then come this
//! round's renames and removals, in the order they were asked. When no more changes come, the
//! folders touched are synced. So under load one flush serves many claims, and with no load
//! nothing waits for a timer. The price of `syncfs`: it also flushes whatever else is dirty on
//! that filesystem at the time.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

/// A handle to the writer thread; cloning shares it. The thread ends with the last handle.
#[derive(Clone)]
pub struct FileWriter {
    tx: mpsc::Sender<Job>,
}

struct Job {
    path: PathBuf,
    /// The new content, or None for a removal.
    bytes: Option<Vec<u8>>,
    reply: oneshot::Sender<std::io::Result<()>>,
}

impl FileWriter {
    pub fn new() -> std::io::Result<FileWriter> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("poolkeeper-files".into())
            .spawn(move || run(&rx))?;
        Ok(FileWriter { tx })
    }

    /// Writes `path` atomically and durably.
    pub async fn write(&self, path: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
        self.ask(path, Some(bytes)).await
    }

    /// Removes `path` durably (`NotFound` when it was not there).
    pub async fn remove(&self, path: PathBuf) -> std::io::Result<()> {
        self.ask(path, None).await
    }

    async fn ask(&self, path: PathBuf, bytes: Option<Vec<u8>>) -> std::io::Result<()> {
        let (reply, done) = oneshot::channel();
        let stopped = || std::io::Error::other("the file writer has stopped");
        self.tx
            .send(Job { path, bytes, reply })
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

/// A change applied (renamed or removed) and the outcome so far: answered once durable.
type Applied = (Job, std::io::Result<()>);

/// The writer thread. Each round takes a batch (every change waiting, up to a second change
/// of one path, which waits for the next round: changes of a path stay in order), writes its
/// temporaries, and flushes their filesystems once: that flush also makes the previous round's
/// renames and removals durable, whose changes are then answered. Then this round's renames
/// and removals are applied. When nothing new arrives, the changes applied last are made
/// durable by syncing their folders. Under load, one flush per round serves two rounds.
fn run(rx: &mpsc::Receiver<Job>) {
    let mut next: Option<Job> = None;
    let mut applied: Vec<Applied> = Vec::new();
    loop {
        let first = match next.take() {
            Some(j) => Some(j),
            None if applied.is_empty() => match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            },
            None => rx.try_recv().ok(),
        };
        let Some(first) = first else {
            answer_after_folder_syncs(std::mem::take(&mut applied));
            continue;
        };
        let mut paths = HashSet::from([first.path.clone()]);
        let mut batch = vec![first];
        while let Ok(j) = rx.try_recv() {
            if !paths.insert(j.path.clone()) {
                next = Some(j);
                break;
            }
            batch.push(j);
        }
        let mut results: Vec<std::io::Result<()>> = batch
            .iter()
            .map(|j| match &j.bytes {
                Some(bytes) => stage(&j.path, bytes),
                None => Ok(()),
            })
            .collect();
        // The new temporaries' data, durable before any rename can be; and last round's
        // renames and removals with it.
        let staged = batch
            .iter()
            .zip(&results)
            .filter(|(j, r)| j.bytes.is_some() && r.is_ok())
            .map(|(j, _)| j);
        let folders: BTreeSet<&Path> = staged
            .chain(applied.iter().map(|(j, _)| j))
            .filter_map(|j| j.path.parent())
            .collect();
        let failed = flush_filesystems(&folders);
        let failure = |path: &Path| {
            failed
                .iter()
                .find(|(fs, _)| fs.iter().any(|f| path.starts_with(f)))
                .map(|(_, e)| std::io::Error::new(e.kind(), format!("syncing: {e}")))
        };
        for (j, mut res) in applied.drain(..) {
            if res.is_ok()
                && let Some(e) = failure(&j.path)
            {
                res = Err(e);
            }
            let _ = j.reply.send(res);
        }
        for (j, res) in batch.iter().zip(results.iter_mut()) {
            if j.bytes.is_some()
                && res.is_ok()
                && let Some(e) = failure(&j.path)
            {
                *res = Err(e);
            }
            if res.is_ok() {
                *res = match j.bytes {
                    Some(_) => std::fs::rename(temporary(&j.path), &j.path),
                    None => std::fs::remove_file(&j.path),
                };
            } else if j.bytes.is_some() {
                let _ = std::fs::remove_file(temporary(&j.path));
            }
        }
        applied.extend(batch.into_iter().zip(results));
    }
}

/// Makes applied changes durable by syncing each folder they touched once, then answers them.
fn answer_after_folder_syncs(applied: Vec<Applied>) {
    let mut folders: BTreeMap<PathBuf, std::io::Result<()>> = BTreeMap::new();
    for (j, res) in &applied {
        if let (Ok(()), Some(folder)) = (res, j.path.parent()) {
            folders
                .entry(folder.to_path_buf())
                .or_insert_with(|| std::fs::File::open(folder).and_then(|f| f.sync_all()));
        }
    }
    for (j, mut res) in applied {
        if res.is_ok()
            && let Some(Err(e)) = j.path.parent().and_then(|f| folders.get(f))
        {
            res = Err(std::io::Error::new(
                e.kind(),
                format!("syncing the folder: {e}"),
            ));
        }
        let _ = j.reply.send(res);
    }
}

/// `syncfs` once per filesystem holding one of `folders` (each opened once); the failures,
/// with the folders of the filesystem that failed.
fn flush_filesystems(folders: &BTreeSet<&Path>) -> Vec<(Vec<PathBuf>, std::io::Error)> {
    use std::os::unix::fs::MetadataExt;
    let mut by_device: BTreeMap<u64, (std::io::Result<std::fs::File>, Vec<PathBuf>)> =
        BTreeMap::new();
    for folder in folders {
        let open = std::fs::File::open(folder);
        let dev = match open.as_ref().map(|f| f.metadata()) {
            Ok(Ok(m)) => m.dev(),
            _ => u64::MAX,
        };
        let entry = by_device.entry(dev).or_insert_with(|| (open, Vec::new()));
        entry.1.push(folder.to_path_buf());
    }
    let mut failed = Vec::new();
    for (_, (file, folders)) in by_device {
        let r = file.and_then(|f| rustix::fs::syncfs(&f).map_err(std::io::Error::from));
        if let Err(e) = r {
            failed.push((folders, e));
        }
    }
    failed
}

/// Writes `path` atomically and durably now, on the calling thread (for rare writes, such as a
/// reservation's record); the folder is synced for this write alone.
pub fn write_now(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    stage(path, bytes)?;
    std::fs::File::open(temporary(path))?.sync_data()?;
    std::fs::rename(temporary(path), path)?;
    match path.parent() {
        Some(folder) => std::fs::File::open(folder)?.sync_all(),
        None => Ok(()),
    }
}

fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes the temporary of a write (not yet durable).
fn stage(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::File::create(temporary(path))?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_and_removals_are_atomic_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = FileWriter::new().expect("writer");
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

    /// Changes of one path asked for at once are applied in the order asked (a path appears
    /// once per batch), whatever else shares their batches.
    #[tokio::test]
    async fn changes_of_one_path_keep_their_order_across_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = FileWriter::new().expect("writer");
        let x = dir.path().join("x.yaml");
        let others = (0..10).map(|i| dir.path().join(format!("o{i}.yaml")));
        let mut jobs = vec![
            Box::pin(w.write(x.clone(), b"1".to_vec()))
                as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>,
            Box::pin(w.remove(x.clone())),
        ];
        jobs.extend(others.map(|o| {
            Box::pin(w.write(o, b"o".to_vec()))
                as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>
        }));
        jobs.push(Box::pin(w.write(x.clone(), b"2".to_vec())));
        for r in futures::future::join_all(jobs).await {
            r.expect("each change succeeds in its turn");
        }
        assert_eq!(std::fs::read(&x).expect("x"), b"2");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 11);
    }
}
