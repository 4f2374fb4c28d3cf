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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
    /// A replacement or removal only if the file still holds these bytes then (checked right
    /// before its rename or removal): an edit made by hand meanwhile is not overwritten.
    unless_changed_from: Option<Vec<u8>>,
    reply: oneshot::Sender<std::io::Result<()>>,
}

/// The file changed since its content was read for an edit: the edit is not applied (see
/// [`FileWriter::write_unless_changed`]).
#[derive(Debug, thiserror::Error)]
#[error("{0} changed while it was being edited")]
pub struct ChangedMeanwhile(pub PathBuf);

/// Whether `e` is a [`ChangedMeanwhile`].
pub fn changed_meanwhile(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<ChangedMeanwhile>())
}

/// Whether `path` still holds `was` (one read, right before the rename or removal; what a
/// person saves in the microseconds after it is still overwritten).
fn still(path: &Path, was: Option<&[u8]>) -> std::io::Result<()> {
    match was {
        Some(was) if std::fs::read(path)? != was => {
            Err(std::io::Error::other(ChangedMeanwhile(path.to_path_buf())))
        }
        _ => Ok(()),
    }
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

    /// [`FileWriter::write`] if `path` still holds `was` right before the new content is
    /// renamed over it; else nothing is written and the error is a [`ChangedMeanwhile`].
    pub async fn write_unless_changed(
        &self,
        path: PathBuf,
        bytes: Vec<u8>,
        was: Vec<u8>,
    ) -> std::io::Result<()> {
        self.send(path, Change::Replace(bytes), Some(was)).await
    }

    /// [`FileWriter::remove`] if `path` still holds `was`; else nothing is removed and the
    /// error is a [`ChangedMeanwhile`].
    pub async fn remove_unless_changed(&self, path: PathBuf, was: Vec<u8>) -> std::io::Result<()> {
        self.send(path, Change::Remove, Some(was)).await
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

    /// Removes `path` durably if it is there: whether it was.
    pub async fn remove_if_present(&self, path: PathBuf) -> std::io::Result<bool> {
        match self.remove(path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn ask(&self, path: PathBuf, change: Change) -> std::io::Result<()> {
        self.send(path, change, None).await
    }

    async fn send(
        &self,
        path: PathBuf,
        change: Change,
        unless_changed_from: Option<Vec<u8>>,
    ) -> std::io::Result<()> {
        let (reply, done) = oneshot::channel();
        let stopped = || std::io::Error::other("the file writer has stopped");
        self.tx
            .send(Job {
                path,
                change,
                unless_changed_from,
                reply,
            })
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

/// A write renamed into place and the outcome so far: answered once durable.
type Applied = (Job, std::io::Result<()>);

/// How a change stands once its round's files are written, before the round's flush.
enum Staged {
    /// Applied whole (a new file named, a removal): answered after this round's flush.
    Done,
    /// Its temporary written: renamed into place after this round's flush.
    Temporary,
    /// A new file's content written into this spare: named after this round's flush.
    Spare(PathBuf),
}

/// Files removed, kept under hidden names (`.spare-N`, which the watcher ignores) so that a
/// new file can take one over instead of the filesystem making and freeing an inode each time
/// (on ext4 without a journal, making an inode scans past every one freed in the last minute:
/// under a steady churn of claims that cost most of the writer's time). A spare is handed out
/// only after the flush that made its renaming durable, so that what is written into it can
/// never land under the name it had. At most [`Spares::MAX`] in all; the rest are removed, and
/// all of them when the writer ends (or, after a crash, at the next start).
#[derive(Default)]
struct Spares {
    /// Folders this writer creates files in: only there are removed files kept (elsewhere,
    /// in people's folders, say, nothing would take them over).
    creating: HashSet<PathBuf>,
    ready: HashMap<PathBuf, Vec<PathBuf>>,
    /// Made in this round: ready once its flush succeeded.
    made: Vec<PathBuf>,
    count: usize,
    next: u64,
}

impl Spares {
    const MAX: usize = 256;

    /// Keeps the file at `path` as a spare, or removes it when there are enough or when
    /// nothing is created in its folder.
    fn remove(&mut self, path: &Path) -> std::io::Result<()> {
        let Some(folder) = path.parent() else {
            return std::fs::remove_file(path);
        };
        if self.count >= Self::MAX || !self.creating.contains(folder) {
            return std::fs::remove_file(path);
        }
        self.next += 1;
        let spare = folder.join(format!(".spare-{}", self.next));
        std::fs::rename(path, &spare)?;
        self.count += 1;
        self.made.push(spare);
        Ok(())
    }

    /// Removes every spare (the writer is ending).
    fn clear(&mut self) {
        for spare in self
            .ready
            .drain()
            .flat_map(|(_, v)| v)
            .chain(self.made.drain(..))
        {
            let _ = std::fs::remove_file(spare);
        }
        self.count = 0;
    }

    /// A spare for a new file in `folder`, if one is ready.
    fn take(&mut self, folder: &Path) -> Option<PathBuf> {
        if !self.creating.contains(folder) {
            self.creating.insert(folder.to_path_buf());
        }
        let spare = self.ready.get_mut(folder)?.pop()?;
        self.count -= 1;
        Some(spare)
    }

    fn put_back(&mut self, spare: PathBuf) {
        if let Some(folder) = spare.parent() {
            self.count += 1;
            self.ready
                .entry(folder.to_path_buf())
                .or_default()
                .push(spare);
        }
    }

    /// The round's flush ended: its spares are ready, but those of a folder it failed to make
    /// durable, which are forgotten (left as hidden files until the next start).
    fn flushed(&mut self, failed: impl Fn(&Path) -> bool) {
        for spare in std::mem::take(&mut self.made) {
            match spare.parent() {
                Some(folder) if !failed(&spare) => self
                    .ready
                    .entry(folder.to_path_buf())
                    .or_default()
                    .push(spare),
                _ => self.count -= 1,
            }
        }
    }
}

/// Writes `bytes` over what `spare` holds.
fn overwrite(spare: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Not truncated to nothing first: on ext4 that starts a writeback at once.
    let mut f = std::fs::OpenOptions::new().write(true).open(spare)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)
}

/// The writer thread. Each round takes a batch (every change waiting, up to a second change
/// of one path, which waits for the next round: changes of a path stay in order), writes its
/// files, and flushes their filesystems once; then it answers what that flush made durable,
/// and applies the renames that had to wait for it. Within a round:
/// - a removal renames its file to a spare (or removes it): answered after this flush;
/// - a creation writes into a spare when there is one, renamed into place (never over another
///   file) after this flush, so answered after the next; without a spare it writes a
///   temporary and renames it at once, both made durable by this flush (a crash before can
///   leave the file empty: [`remove_unfinished`]);
/// - a replacement writes a temporary, renamed over the file after this flush, so answered
///   after the next (a crash leaves the old content or the new).
///
/// When nothing new arrives, the renames applied last are made durable by syncing their
/// folders.
///
/// (Applying the next round's changes while a flush runs, on a second thread, was measured
/// slower: `syncfs` then also writes back the files created meanwhile.)
fn run(rx: &mpsc::Receiver<Job>) {
    let mut next: Option<Job> = None;
    let mut applied: Vec<Applied> = Vec::new();
    let mut spares = Spares::default();
    loop {
        let first = match next.take() {
            Some(j) => Some(j),
            None if applied.is_empty() => match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => {
                    spares.clear();
                    return;
                }
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
        let results: Vec<std::io::Result<Staged>> = batch
            .iter()
            .map(|j| match &j.change {
                Change::Create(bytes) => match j.path.parent().and_then(|f| spares.take(f)) {
                    Some(spare) => match overwrite(&spare, bytes) {
                        Ok(()) => Ok(Staged::Spare(spare)),
                        Err(e) => {
                            let _ = std::fs::remove_file(&spare);
                            Err(e)
                        }
                    },
                    None => stage(&j.path, bytes)
                        .and_then(|()| rename_new(&temporary(&j.path), &j.path))
                        .map(|()| Staged::Done)
                        .inspect_err(|_| {
                            let _ = std::fs::remove_file(temporary(&j.path));
                        }),
                },
                Change::Replace(bytes) => stage(&j.path, bytes).map(|()| Staged::Temporary),
                Change::Remove => still(&j.path, j.unless_changed_from.as_deref())
                    .and_then(|()| spares.remove(&j.path))
                    .map(|()| Staged::Done),
            })
            .collect();
        // What this round wrote and named, and last round's renames: durable together.
        let folders: BTreeSet<&Path> = batch
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(j, _)| j)
            .chain(applied.iter().map(|(j, _)| j))
            .filter_map(|j| j.path.parent())
            .collect();
        let failed = flush_filesystems(&folders);
        let flush_error = |path: &Path| {
            failed
                .iter()
                .find(|(fs, _)| fs.iter().any(|f| path.starts_with(f)))
                .map(|(_, e)| std::io::Error::new(e.kind(), format!("syncing: {e}")))
        };
        spares.flushed(|spare| flush_error(spare).is_some());
        for (j, res) in applied.drain(..) {
            let res = res.and_then(|()| flush_error(&j.path).map_or(Ok(()), Err));
            let _ = j.reply.send(res);
        }
        for (j, res) in batch.into_iter().zip(results) {
            let res = res.and_then(|s| match flush_error(&j.path) {
                Some(e) => {
                    match s {
                        Staged::Temporary => {
                            let _ = std::fs::remove_file(temporary(&j.path));
                        }
                        Staged::Spare(spare) => spares.put_back(spare),
                        Staged::Done => {}
                    }
                    Err(e)
                }
                None => Ok(s),
            });
            let renamed = match res {
                Err(e) => Err(e),
                Ok(Staged::Done) => {
                    let _ = j.reply.send(Ok(()));
                    continue;
                }
                Ok(Staged::Temporary) => still(&j.path, j.unless_changed_from.as_deref())
                    .and_then(|()| std::fs::rename(temporary(&j.path), &j.path))
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(temporary(&j.path));
                    }),
                Ok(Staged::Spare(spare)) => {
                    rename_new(&spare, &j.path).inspect_err(|_| spares.put_back(spare.clone()))
                }
            };
            match renamed {
                Ok(()) => applied.push((j, Ok(()))),
                Err(e) => {
                    let _ = j.reply.send(Err(e));
                }
            }
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
/// and spares (removed), and empty files, which only a [`FileWriter::create`] cut short leaves (removed:
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
        let spare = name.starts_with(".spare-");
        if temporary || spare || meta.len() == 0 {
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
    // A file replaced keeps its permissions (a users file kept 0600 stays so).
    if let Ok(meta) = std::fs::metadata(path) {
        f.set_permissions(meta.permissions())?;
    }
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `folder` but the writer's spares.
    fn visible(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".spare-"))
            .collect();
        names.sort();
        names
    }

    /// Removed files are kept as hidden spares and new files take them over (the same inode,
    /// with exactly the new content, shorter than the old); at most `Spares::MAX`; all gone
    /// when the writer ends.
    #[tokio::test]
    async fn removed_files_are_recycled_for_new_ones_and_cleared_at_the_end() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let w = FileWriter::new().expect("writer");
        // Where nothing is created, a removal removes.
        let elsewhere = dir.path().join("people/theirs.yaml");
        w.write(elsewhere.clone(), b"x".to_vec())
            .await
            .expect("write");
        w.remove(elsewhere).await.expect("remove");
        assert_eq!(
            std::fs::read_dir(dir.path().join("people"))
                .expect("dir")
                .count(),
            0,
            "no spare where nothing is created"
        );
        let old = dir.path().join("old.yaml");
        w.create(old.clone(), vec![b'o'; 3000])
            .await
            .expect("create");
        let inode = std::fs::metadata(&old).expect("old").ino();
        w.remove(old.clone()).await.expect("remove");
        let spares = || {
            std::fs::read_dir(dir.path())
                .expect("dir")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(".spare-"))
                })
                .count()
        };
        assert_eq!(spares(), 1);
        let new = dir.path().join("new.yaml");
        w.create(new.clone(), b"kind: Claim\n".to_vec())
            .await
            .expect("create");
        assert_eq!(std::fs::read(&new).expect("new"), b"kind: Claim\n");
        assert_eq!(std::fs::metadata(&new).expect("new").ino(), inode);
        assert_eq!(spares(), 0);
        // Over the bound, removals remove.
        let many: Vec<PathBuf> = (0..Spares::MAX + 10)
            .map(|i| dir.path().join(format!("m{i}.yaml")))
            .collect();
        for r in
            futures::future::join_all(many.iter().map(|p| w.create(p.clone(), b"m".to_vec()))).await
        {
            r.expect("create");
        }
        for r in futures::future::join_all(many.iter().map(|p| w.remove(p.clone()))).await {
            r.expect("remove");
        }
        assert_eq!(spares(), Spares::MAX);
        assert_eq!(
            visible(dir.path()),
            vec!["new.yaml".to_owned(), "people".to_owned()]
        );
        drop(w);
        let start = std::time::Instant::now();
        while spares() > 0 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "spares left"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn a_replaced_file_keeps_its_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let w = FileWriter::new().expect("writer");
        let p = dir.path().join("users.yaml");
        std::fs::write(&p, "a").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        w.write(p.clone(), b"b".to_vec()).await.expect("replaced");
        assert_eq!(std::fs::read(&p).expect("read"), b"b");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn an_edit_of_a_file_changed_meanwhile_is_not_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = FileWriter::new().expect("writer");
        let p = dir.path().join("pools.yaml");
        std::fs::write(&p, "by hand").expect("write");
        let e = (w.write_unless_changed(p.clone(), b"edited".to_vec(), b"as read".to_vec()))
            .await
            .expect_err("changed meanwhile");
        assert!(changed_meanwhile(&e), "{e}");
        let e = (w.remove_unless_changed(p.clone(), b"as read".to_vec()))
            .await
            .expect_err("changed meanwhile");
        assert!(changed_meanwhile(&e), "{e}");
        assert_eq!(std::fs::read(&p).expect("read"), b"by hand");
        assert_eq!(visible(dir.path()), vec!["pools.yaml"], "no temporary left");
        (w.write_unless_changed(p.clone(), b"edited".to_vec(), b"by hand".to_vec()))
            .await
            .expect("unchanged: written");
        assert_eq!(std::fs::read(&p).expect("read"), b"edited");
        (w.remove_unless_changed(p.clone(), b"edited".to_vec()))
            .await
            .expect("unchanged: removed");
        assert!(!p.exists());
    }

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
        let names = visible(&dir.path().join("sub"));
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
        assert_eq!(visible(dir.path()).len(), 11);
    }

    #[test]
    fn what_a_crash_left_unfinished_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("done.yaml"), "kind: Claim\n").expect("write");
        std::fs::write(p("cut.yaml"), "").expect("write");
        std::fs::write(p(".done.yaml.tmp"), "kind: Cl").expect("write");
        std::fs::write(p(".hidden.yaml"), "").expect("write");
        std::fs::write(p(".spare-3"), "kind: Claim\n").expect("write");
        std::fs::create_dir(p("sub")).expect("mkdir");
        std::fs::write(p("sub/empty.yaml"), "").expect("write");
        let removed = remove_unfinished(dir.path()).expect("tidy");
        // An empty hidden file is empty all the same.
        assert_eq!(
            removed,
            vec![
                p(".done.yaml.tmp"),
                p(".hidden.yaml"),
                p(".spare-3"),
                p("cut.yaml")
            ]
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
            visible(dir.path()).len(),
            model.len(),
            "no temporary is left"
        );
    }
}
