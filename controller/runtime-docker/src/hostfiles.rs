//! Host-backed files folders: a claim's files written by the controller straight into a folder
//! that the instance sees at its pool's `files.mountPath`, instead of one `PUT /archive` per
//! claim through the daemon (which serves those one at a time: ~60 per second here, whatever
//! the concurrency).
//!
//! Only for daemons that share this machine's filesystem (a local socket). The folder is
//! `ROOT/<instance>`, under the state directory; Docker mounts it as a `local` volume with bind
//! options, so it is populated from the image's content at `mountPath` when the container is
//! created (as any empty named volume is), and nothing outside the state directory is mounted.
//!
//! Writing must never leave the folder: the image's own content, or a process in the
//! container, may have put symbolic links there. Every path is resolved component by component
//! with `O_NOFOLLOW` relative to the folder's descriptor (no check-then-use race), and a file
//! is written to a fresh temporary name and renamed over the target, which replaces a link
//! rather than following it.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use poolkeeper_core::files::is_plain_relative;

/// Where host-backed files folders live, one per instance.
#[derive(Clone, Debug)]
pub struct HostFiles {
    root: PathBuf,
}

impl HostFiles {
    pub fn new(root: PathBuf) -> Self {
        HostFiles { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir_of(&self, instance: &str) -> PathBuf {
        self.root.join(instance)
    }

    /// An empty folder for `instance` (whatever an earlier one of that name left is removed).
    /// The root is private to this user (claims' files may be secrets): the daemon, as root,
    /// still mounts what is under it.
    pub fn prepare(&self, instance: &str) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !self.root.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.root)?;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        }
        let dir = self.dir_of(instance);
        self.remove(instance)?;
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    /// Removes `instance`'s folder; a folder already gone is fine.
    pub fn remove(&self, instance: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.dir_of(instance)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The instances that have a folder here.
    pub fn instances(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }
}

/// Where `dir` (a path inside the instance) falls under `mount` (the folder's mount path):
/// the relative part, or `None` when `dir` is not under it.
pub fn under_mount(mount: &str, dir: &str) -> Option<PathBuf> {
    let rel = Path::new(dir).strip_prefix(Path::new(mount)).ok()?;
    is_plain_relative(rel).then(|| rel.to_path_buf())
}

/// Writes `files` (paths relative to `sub`, itself relative to `folder`) into `folder`,
/// creating parent folders, never following a symbolic link.
pub fn write_files(folder: &Path, sub: &Path, files: &[(String, Vec<u8>)]) -> Result<(), String> {
    let root = rustix::fs::open(
        folder,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening {}: {e}", folder.display()))?;
    for (path, bytes) in files {
        let rel = Path::new(path);
        if path.is_empty() || !is_plain_relative(rel) {
            return Err(format!(
                "file path {path:?} must be relative and stay inside the mount path"
            ));
        }
        let full = sub.join(rel);
        write_one(&root, &full, bytes).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

fn write_one(root: &OwnedFd, rel: &Path, bytes: &[u8]) -> Result<(), String> {
    let parts: Vec<&std::ffi::OsStr> = rel.iter().collect();
    let Some((file, parents)) = parts.split_last() else {
        return Err("empty path".to_owned());
    };
    let mut dir: Option<OwnedFd> = None;
    for part in parents {
        let at = dir.as_ref().unwrap_or(root);
        match rustix::fs::mkdirat(at, *part, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(format!("creating folder {}: {e}", part.to_string_lossy())),
        }
        let next = rustix::fs::openat(
            at,
            *part,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => format!(
                "{} is a symbolic link or not a folder; refusing to follow it",
                part.to_string_lossy()
            ),
            e => format!("opening folder {}: {e}", part.to_string_lossy()),
        })?;
        dir = Some(next);
    }
    let at = dir.as_ref().unwrap_or(root);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = format!(".pk-{}-{n}.tmp", std::process::id());
    let fd = rustix::fs::openat(
        at,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| format!("creating a temporary file: {e}"))?;
    let mut f = std::fs::File::from(fd);
    let written = f.write_all(bytes).and_then(|()| f.flush());
    drop(f);
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(at, tmp.as_str(), rustix::fs::AtFlags::empty());
        return Err(e.to_string());
    }
    // Replaces what is at the target, a symbolic link included, without following it.
    rustix::fs::renameat(at, tmp.as_str(), at, *file).map_err(|e| {
        let _ = rustix::fs::unlinkat(at, tmp.as_str(), rustix::fs::AtFlags::empty());
        match e {
            Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST => {
                format!("{} is a folder", file.to_string_lossy())
            }
            e => e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(p, c)| ((*p).to_owned(), c.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn writes_nested_files_and_replaces_existing_ones() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("index.html"), "old").expect("seed");
        write_files(
            t.path(),
            Path::new(""),
            &files(&[("index.html", "new"), ("a/b/c.txt", "deep")]),
        )
        .expect("write");
        assert_eq!(
            std::fs::read_to_string(t.path().join("index.html")).expect("read"),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("a/b/c.txt")).expect("read"),
            "deep"
        );
        let leftovers: Vec<_> = std::fs::read_dir(t.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn never_follows_a_symbolic_link_out_of_the_folder() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let folder = t.path().join("f");
        std::fs::create_dir(&folder).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), folder.join("escape")).expect("symlink");
        std::os::unix::fs::symlink(outside.path().join("victim"), folder.join("link.txt"))
            .expect("symlink");
        let e = write_files(&folder, Path::new(""), &files(&[("escape/x", "no")]))
            .expect_err("a folder link must be refused");
        assert!(e.contains("symbolic link"), "{e}");
        // A link as the file itself is replaced, not written through.
        write_files(&folder, Path::new(""), &files(&[("link.txt", "mine")])).expect("write");
        assert!(!outside.path().join("victim").exists());
        let meta = std::fs::symlink_metadata(folder.join("link.txt")).expect("meta");
        assert!(meta.is_file());
        assert_eq!(std::fs::read_dir(outside.path()).expect("list").count(), 0);
    }

    #[test]
    fn refuses_paths_that_leave_the_folder() {
        let t = tempfile::tempdir().expect("tempdir");
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(
                write_files(t.path(), Path::new(""), &files(&[(bad, "x")])).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn the_folder_itself_must_not_be_a_link() {
        let t = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/tmp", t.path().join("f")).expect("symlink");
        assert!(write_files(&t.path().join("f"), Path::new(""), &files(&[("x", "x")])).is_err());
    }

    #[test]
    fn paths_under_the_mount() {
        assert_eq!(under_mount("/srv", "/srv"), Some(PathBuf::new()));
        assert_eq!(under_mount("/srv", "/srv/a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(under_mount("/srv/", "/srv/a"), Some(PathBuf::from("a")));
        assert_eq!(under_mount("/srv", "/srvx"), None);
        assert_eq!(under_mount("/srv", "/root/.ssh"), None);
        assert_eq!(under_mount("/srv", "/srv/../etc"), None);
    }

    #[test]
    fn prepare_empties_and_remove_tolerates_absence() {
        let t = tempfile::tempdir().expect("tempdir");
        let h = HostFiles::new(t.path().join("files"));
        let d = h.prepare("i1").expect("prepare");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(h.root()).expect("root").permissions(),
        );
        assert_eq!(mode & 0o777, 0o700, "the root is private");
        std::fs::write(d.join("x"), "x").expect("write");
        let d = h.prepare("i1").expect("prepare again");
        assert_eq!(std::fs::read_dir(&d).expect("list").count(), 0);
        assert_eq!(h.instances(), vec!["i1".to_owned()]);
        h.remove("i1").expect("remove");
        h.remove("i1").expect("remove again");
        assert!(h.instances().is_empty());
    }
}
