//! Durable writes and removals of small files (the API's claim files).
//!
//! Each write goes to a hidden temporary beside its file (the watcher ignores it) and is
//! renamed into place; a removal unlinks. A replacement's data is made durable before its
//! rename, so that a crash leaves the old content or the new; a new file's data and name are
//! made durable together (a crash before that can leave it empty: [`remove_unfinished`]).
//! Nobody is told a change is done before it would survive a crash.
//!
//! All of it runs on one thread of its own, in rounds: a round takes every change asked for
//! while the previous one ran. Its temporaries are written, its new files named and its
//! removals applied, then made durable together by one `syncfs` of their filesystem (one
//! journal commit, where a sync per file would make one each), which also makes the previous
//! round's replacing renames durable; then come this round's replacing renames. When no more changes come, the folders touched are synced. So under
//! load one flush serves many claims, and with no load nothing waits for a timer. The price of `syncfs`: it also flushes whatever else is dirty on
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
    change: Change,
    reply: oneshot::Sender<std::io::Result<()>>,
}

enum Change {
    /// A new file: renamed into place (never over another) before the round's flush, which
    /// makes its data and its name durable together.
    Create(Vec<u8>),
    /// New content for a file that may exist: its data is made durable before the rename, so
    /// that a crash leaves the old content or the new, never an empty file.
    Replace(Vec<u8>),
    Remove,
}

impl FileWriter {
    pub fn new() -> std::io::Result<FileWriter> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("poolkeeper-files".into())
            .spawn(move || run(&rx))?;
        Ok(FileWriter { tx })
    }

    /// Writes `path` atomically and durably, replacing what is there.
    pub async fn write(&self, path: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
        self.ask(path, Change::Replace(bytes)).await
    }

    /// Creates `path` durably (`AlreadyExists` when it is there), in half the time of a
    /// [`FileWriter::write`]: one flush, not two. Until it is answered, a crash may leave the
    /// file empty (on some filesystems, cut short): see [`remove_unfinished`].
    pub async fn create(&self, path: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
        self.ask(path, Change::Create(bytes)).await
    }

    /// Removes `path` durably (`NotFound` when it was not there).
    pub async fn remove(&self, path: PathBuf) -> std::io::Result<()> {
        self.ask(path, Change::Remove).await
    }

    async fn ask(&self, path: PathBuf, change: Change) -> std::io::Result<()> {
        let (reply, done) = oneshot::channel();
        let stopped = || std::io::Error::other("the file writer has stopped");
        self.tx
            .send(Job {
                path,
                change,
                reply,
            })
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

/// A write renamed into place and the outcome so far: answered once durable.
type Applied = (Job, std::io::Result<()>);

/// The writer thread. Each round takes a batch (every change waiting, up to a second change
/// of one path, which waits for the next round: changes of a path stay in order), writes its
/// temporaries, renames its new files into place, applies its removals, and flushes their
/// filesystems once: that flush makes those durable, and the previous round's replacing
/// renames, and those changes are answered. Then this round's replacing renames are applied.
/// When nothing new arrives, the renames applied last are made durable by syncing their
/// folders. Under load, one flush per round serves two rounds: a creation or a removal waits
/// for one flush, a replacement for two.
///
/// (Applying the next round's changes while a flush runs, on a second thread, was measured
/// slower: `syncfs` then also writes back the files created meanwhile.)
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
        // A write's temporary is written now; a new file is also renamed into place and a
        // removal applied, all made durable by this round's flush.
        let results: Vec<std::io::Result<()>> = batch
            .iter()
            .map(|j| match &j.change {
                Change::Create(bytes) => stage(&j.path, bytes).and_then(|()| {
                    rename_new(&temporary(&j.path), &j.path).inspect_err(|_| {
                        let _ = std::fs::remove_file(temporary(&j.path));
                    })
                }),
                Change::Replace(bytes) => stage(&j.path, bytes),
                Change::Remove => std::fs::remove_file(&j.path),
            })
            .collect();
        // The new temporaries' data, durable before any rename can be; this round's removals,
        // and last round's renames with them.
        let folders: BTreeSet<&Path> = batch
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(j, _)| j)
            .chain(applied.iter().map(|(j, _)| j))
            .filter_map(|j| j.path.parent())
            .collect();
        let failed = flush_filesystems(&folders);
        let after_flush = |path: &Path, res: std::io::Result<()>| {
            res.and_then(|()| {
                match failed
                    .iter()
                    .find(|(fs, _)| fs.iter().any(|f| path.starts_with(f)))
                {
                    Some((_, e)) => Err(std::io::Error::new(e.kind(), format!("syncing: {e}"))),
                    None => Ok(()),
                }
            })
        };
        for (j, res) in applied.drain(..) {
            let res = after_flush(&j.path, res);
            let _ = j.reply.send(res);
        }
        for (j, res) in batch.into_iter().zip(results) {
            let res = after_flush(&j.path, res);
            if !matches!(j.change, Change::Replace(_)) {
                let _ = j.reply.send(res);
                continue;
            }
            let res = match res {
                Ok(()) => std::fs::rename(temporary(&j.path), &j.path),
                Err(e) => {
                    let _ = std::fs::remove_file(temporary(&j.path));
                    Err(e)
                }
            };
            applied.push((j, res));
        }
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

/// Renames `from` to `to`, which must not exist (`AlreadyExists` if it does), in one step.
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // A filesystem without RENAME_NOREPLACE: a hard link also fails on an existing name.
        Err(rustix::io::Errno::INVAL) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// What a crash left in `folder` (not its sub-folders) of changes never answered: temporaries
/// (removed), and empty files, which only a [`FileWriter::create`] cut short leaves (removed:
/// nothing was lost, as its caller was never told it was done). A file cut short with some of
/// its content, which some filesystems can leave, is kept: it is not this writer's to judge,
/// and whoever reads it reports it. The paths removed are returned.
pub fn remove_unfinished(folder: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(folder) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let temporary = name.starts_with('.') && name.ends_with(".tmp");
        if temporary || meta.len() == 0 {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        std::fs::File::open(folder)?.sync_all()?;
    }
    removed.sort();
    Ok(removed)
}

fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes the temporary of a write (not yet durable), making its folder first if need be.
fn stage(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    let mut f = match std::fs::File::create(&tmp) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(&tmp)?
        }
        other => other?,
    };
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

    #[test]
    fn what_a_crash_left_unfinished_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("done.yaml"), "kind: Claim\n").expect("write");
        std::fs::write(p("cut.yaml"), "").expect("write");
        std::fs::write(p(".done.yaml.tmp"), "kind: Cl").expect("write");
        std::fs::write(p(".hidden.yaml"), "").expect("write");
        std::fs::create_dir(p("sub")).expect("mkdir");
        std::fs::write(p("sub/empty.yaml"), "").expect("write");
        let removed = remove_unfinished(dir.path()).expect("tidy");
        // An empty hidden file is empty all the same.
        assert_eq!(
            removed,
            vec![p(".done.yaml.tmp"), p(".hidden.yaml"), p("cut.yaml")]
        );
        assert!(p("done.yaml").exists() && p("sub/empty.yaml").exists());
        assert_eq!(
            remove_unfinished(&p("absent")).expect("absent folder"),
            Vec::<PathBuf>::new()
        );
    }

    /// Many changes of a few paths, asked for in one go in a random order: each is answered
    /// as if they had been applied one by one in the order asked, and each file ends as the
    /// last change of it left it.
    #[tokio::test]
    async fn changes_are_answered_as_if_applied_one_by_one_in_order() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().expect("tempdir");
        let w = FileWriter::new().expect("writer");
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let paths: Vec<PathBuf> = (0..4)
            .map(|i| dir.path().join(format!("p{i}.yaml")))
            .collect();
        let mut model: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        // Per change, the error kind it must get, if any.
        let mut expected: Vec<Option<std::io::ErrorKind>> = Vec::new();
        let mut jobs = Vec::new();
        for n in 0..300 {
            let i = rng.random_range(0..paths.len());
            let bytes = format!("change {n}").into_bytes();
            let path = paths[i].clone();
            match rng.random_range(0..10) {
                0..3 => {
                    let exists = model.contains_key(&i);
                    expected.push(exists.then_some(std::io::ErrorKind::AlreadyExists));
                    model.entry(i).or_insert_with(|| bytes.clone());
                    jobs.push(Box::pin(w.create(path, bytes))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>);
                }
                3..6 => {
                    model.insert(i, bytes.clone());
                    expected.push(None);
                    jobs.push(Box::pin(w.write(path, bytes)));
                }
                _ => {
                    let existed = model.remove(&i).is_some();
                    expected.push((!existed).then_some(std::io::ErrorKind::NotFound));
                    jobs.push(Box::pin(w.remove(path)));
                }
            }
        }
        // Each is asked for, in order, by its first poll.
        for job in &mut jobs {
            assert!(futures::poll!(job.as_mut()).is_pending());
        }
        let results = futures::future::join_all(jobs).await;
        for (n, (r, want)) in results.iter().zip(expected).enumerate() {
            assert_eq!(
                r.as_ref().err().map(std::io::Error::kind),
                want,
                "change {n}: {r:?}"
            );
        }
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(
                std::fs::read(p).ok(),
                model.get(&i).cloned(),
                "{}",
                p.display()
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            model.len(),
            "no temporary is left"
        );
    }
}
