//! What declared objects refer to in the folder, resolved for the engine: a claim's `filesFrom`
//! (a folder, or a plain `.tar`) and a user's `tokenSecretFile`, both relative to the folder of
//! the file that declares them.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use poolkeeper_core::files::parse_tar;
use poolkeeper_engine::source::{Resolve, UserToken};
use poolkeeper_kinds::{ClaimSpec, Origin, UserSpec};

/// The directory source's [`Resolve`].
#[derive(Debug, Default, Clone, Copy)]
pub struct DirResolve;

impl Resolve for DirResolve {
    fn claim_files(
        &self,
        spec: &ClaimSpec,
        origin: &Origin,
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        read_claim_files(spec, origin)
    }

    /// Its `tokenSha256`, or the digest of what its `tokenSecretFile` holds.
    fn user_token(&self, spec: &UserSpec, origin: &Origin) -> UserToken {
        if let Some(h) = &spec.token_sha256 {
            return UserToken::from_sha256(h);
        }
        let Some(file) = &spec.token_secret_file else {
            return match &spec.token_secret_ref {
                Some(r) => UserToken::Unreadable(format!(
                    "tokenSecretRef {}: a Kubernetes Secret, which only the Kubernetes source \
                     reads (in a folder, use tokenSecretFile)",
                    r.name
                )),
                None => UserToken::None,
            };
        };
        let path = origin
            .file
            .parent()
            .map_or_else(|| PathBuf::from(file), |d| d.join(file));
        match std::fs::read_to_string(&path) {
            Ok(t) if t.trim().is_empty() => {
                UserToken::Unreadable(format!("{}: the file is empty", path.display()))
            }
            Ok(t) => UserToken::Digest(Sha256::digest(t.trim().as_bytes()).into()),
            Err(e) => UserToken::Unreadable(format!("{}: {e}", path.display())),
        }
    }
}

/// Reads the files a claim asks for. `files_from` is resolved against the claim file's folder.
pub fn read_claim_files(
    spec: &ClaimSpec,
    origin: &Origin,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = poolkeeper_engine::source::inline_files(spec);
    if let Some(from) = &spec.files_from {
        let base = origin.file.parent().unwrap_or(Path::new("."));
        let root = base.join(from);
        let meta =
            std::fs::metadata(&root).map_err(|e| format!("filesFrom {}: {e}", root.display()))?;
        if meta.is_file() {
            out.extend(read_tar(&root)?);
        } else if meta.is_dir() {
            out.extend(read_folder(&root)?);
        } else {
            return Err(format!(
                "filesFrom {}: neither a folder nor a tar archive",
                root.display()
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The regular files under `root`, as paths relative to it. Symbolic links are refused.
fn read_folder(root: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("filesFrom {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("filesFrom {}: {e}", dir.display()))?;
            let path = entry.path();
            let ft = entry
                .file_type()
                .map_err(|e| format!("filesFrom {}: {e}", path.display()))?;
            if ft.is_symlink() {
                return Err(format!(
                    "filesFrom {}: symbolic links are not copied",
                    path.display()
                ));
            } else if ft.is_dir() {
                stack.push(path);
            } else if !ft.is_file() {
                // A FIFO would block the read (and the engine with it), a device is no file.
                return Err(format!(
                    "filesFrom {}: only regular files are copied (not FIFOs, sockets or devices)",
                    path.display()
                ));
            } else {
                let rel = path
                    .strip_prefix(root)
                    .map_err(|e| e.to_string())?
                    .to_string_lossy()
                    .replace('\\', "/");
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("filesFrom {}: {e}", path.display()))?;
                out.push((rel, bytes));
            }
        }
    }
    Ok(out)
}

/// The regular files of a plain (uncompressed) tar archive, as relative paths. Links, devices
/// and paths that would leave the mount path are refused, as in a folder.
fn read_tar(path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let what = format!("filesFrom {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| format!("{what}: {e}"))?;
    parse_tar(file, &what)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn claim_from(from: &str) -> ClaimSpec {
        ClaimSpec {
            pool: "p".to_owned(),
            user: "u".to_owned(),
            ttl: None,
            files_from: Some(from.to_owned()),
            resources: None,
            files: BTreeMap::from([("inline.txt".to_owned(), "inline".to_owned())]),
        }
    }

    fn origin(dir: &Path) -> Origin {
        Origin {
            file: dir.join("claim.yaml"),
            line: 1,
            col: 1,
        }
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // `append_data` would refuse `..`: write the name raw, as a hostile archive does.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn a_folder_and_a_tar_give_the_same_files() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("site/css")).expect("mkdir");
        std::fs::write(t.path().join("site/index.html"), "hi").expect("write");
        std::fs::write(t.path().join("site/css/a.css"), "b{}").expect("write");
        let tar = tar_with(&[
            ("./index.html", tar::EntryType::Regular, b"hi"),
            ("css/", tar::EntryType::Directory, b""),
            ("css/a.css", tar::EntryType::Regular, b"b{}"),
        ]);
        std::fs::write(t.path().join("site.tar"), tar).expect("write");
        let from_dir = read_claim_files(&claim_from("site"), &origin(t.path())).expect("dir");
        let from_tar = read_claim_files(&claim_from("site.tar"), &origin(t.path())).expect("tar");
        assert_eq!(from_dir, from_tar);
        let names: Vec<&str> = from_tar.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["css/a.css", "index.html", "inline.txt"]);
    }

    #[test]
    fn a_tar_that_leaves_the_mount_path_or_holds_links_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        for (name, kind) in [
            ("../escape", tar::EntryType::Regular),
            ("/etc/passwd", tar::EntryType::Regular),
            ("link", tar::EntryType::Symlink),
            ("hard", tar::EntryType::Link),
        ] {
            std::fs::write(t.path().join("bad.tar"), tar_with(&[(name, kind, b"x")]))
                .expect("write");
            let e = read_claim_files(&claim_from("bad.tar"), &origin(t.path()))
                .expect_err("must be refused");
            assert!(e.contains("bad.tar") && e.contains(name), "{name}: {e}");
        }
    }

    #[test]
    fn a_file_that_is_no_tar_is_an_error_naming_it() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            t.path().join("notes.txt"),
            "just text, not an archive at all",
        )
        .expect("write");
        let e =
            read_claim_files(&claim_from("notes.txt"), &origin(t.path())).expect_err("not a tar");
        assert!(e.contains("notes.txt"), "{e}");
        let e = read_claim_files(&claim_from("missing"), &origin(t.path())).expect_err("missing");
        assert!(e.contains("missing"), "{e}");
    }
}
