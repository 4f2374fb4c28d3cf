//! The rules for a claim's files, wherever they come from (a claim's `files`, a `filesFrom`
//! folder or tar, an upload): regular files with plain relative paths, so that joined to the
//! pool's mount path they stay inside it.

use std::path::{Component, Path, PathBuf};

/// Whether `path` is made of plain names only: relative, with no `..` or `.`, so that joined
/// to a folder it stays inside it (the rule for the paths of a claim's files).
pub fn is_plain_relative(path: &std::path::Path) -> bool {
    path.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// A path as uploads may name it: `./a` is `a`; anything else must be plain and relative.
/// None for a path that leaves the mount path (or names nothing).
pub fn clean_relative(name: &str) -> Option<PathBuf> {
    let clean: PathBuf = Path::new(name)
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    (is_plain_relative(&clean) && !clean.as_os_str().is_empty()).then_some(clean)
}

/// The paths of one set of files, each checked as it is added: a path given twice (`x` and
/// `./x` are one path), or a file where another is a folder (`a` and `a/b`), would make which
/// content lands depend on the order of writing, so it is refused.
#[derive(Debug, Default)]
pub struct PathSet(std::collections::BTreeSet<PathBuf>);

impl PathSet {
    /// Adds `path` (already clean): the reason when it collides with one added before, or is
    /// longer than a copy can write (a name over 255 bytes, a path over 1024: the copy would
    /// fail and take the instance out of service).
    pub fn add(&mut self, path: &Path) -> Result<(), String> {
        let shown = path.display();
        let long_name = path.components().any(|c| c.as_os_str().len() > 255);
        if long_name || path.as_os_str().len() > 1024 {
            return Err(format!(
                "{shown:?} is too long (names of at most 255 bytes, 1024 bytes in all)"
            ));
        }
        if self.0.contains(path) {
            return Err(format!("{shown:?} is given twice"));
        }
        if let Some(parent) = path.ancestors().skip(1).find(|a| self.0.contains(*a)) {
            return Err(format!(
                "{shown:?} is inside {:?}, which is a file",
                parent.display()
            ));
        }
        // A path already added below this one: the first after it in order, if it is inside.
        if let Some(below) = self
            .0
            .range::<Path, _>((std::ops::Bound::Excluded(path), std::ops::Bound::Unbounded))
            .next()
            .filter(|b| b.starts_with(path))
        {
            return Err(format!(
                "{shown:?} is a file and also the folder of {:?}",
                below.display()
            ));
        }
        self.0.insert(path.to_path_buf());
        Ok(())
    }
}

/// The regular files of a tar archive, as (relative path, bytes): refused, naming the entry,
/// when an entry is a link or device, its path is absolute or leaves the folder (`..`), or it
/// collides with an earlier entry (see [`PathSet`]). Errors start with `what`.
pub fn parse_tar(reader: impl std::io::Read, what: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    use std::io::Read;
    let fail = |e: &dyn std::fmt::Display| format!("{what}: {e}");
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    let mut paths = PathSet::default();
    for entry in archive
        .entries()
        .map_err(|e| fail(&format!("not a tar archive ({e})")))?
    {
        let mut entry = entry.map_err(|e| fail(&format!("not a tar archive ({e})")))?;
        let name = entry
            .path()
            .map_err(|e| fail(&e))?
            .to_string_lossy()
            .into_owned();
        let kind = entry.header().entry_type();
        // Folders are made as needed; a pax global header (`git archive` starts with one) says
        // something of the archive, not a file.
        if kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(fail(&format!(
                "{name}: only regular files are copied (links, devices and the like are not)"
            )));
        }
        let Some(clean) = clean_relative(&name) else {
            return Err(fail(&format!(
                "{name}: paths must be relative and stay inside the mount path"
            )));
        };
        paths
            .add(&clean)
            .map_err(|e| fail(&format!("entry {name:?}: {e}")))?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| fail(&e))?;
        out.push((clean.to_string_lossy().into_owned(), bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar archive of regular files `(path, content)`, paths written as given.
    fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // Written raw: `set_path` would clean `./x` itself.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, content.as_bytes()).expect("appended");
        }
        b.into_inner().expect("finished")
    }

    #[test]
    fn a_path_too_long_for_a_copy_is_refused_naming_it() {
        let mut set = PathSet::default();
        let long_name = "n".repeat(256);
        let e = set.add(Path::new(&long_name)).expect_err("a long name");
        assert!(e.contains("too long"), "{e}");
        let long_path = ["d"; 600].join("/");
        assert!(set.add(Path::new(&long_path)).is_err());
        assert_eq!(set.add(Path::new(&"n".repeat(255))), Ok(()));
    }

    #[test]
    fn a_git_archive_s_pax_global_header_is_no_file_and_is_skipped() {
        let mut b = tar::Builder::new(Vec::new());
        let comment = b"52 comment=0123456789abcdef0123456789abcdef01234567\n";
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XGlobalHeader);
        h.set_path("pax_global_header").expect("path");
        h.set_size(comment.len() as u64);
        h.set_cksum();
        b.append(&h, &comment[..]).expect("appended");
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path("a").expect("path");
        h.set_cksum();
        b.append(&h, &b"1"[..]).expect("appended");
        let archive = b.into_inner().expect("finished");
        let files = parse_tar(&archive[..], "t").expect("read");
        assert_eq!(files, vec![("a".to_owned(), b"1".to_vec())]);
    }

    #[test]
    fn a_tar_of_plain_files_is_read_with_clean_paths() {
        let files = parse_tar(&tar_of(&[("./a", "1"), ("d/b", "2")])[..], "t").expect("read");
        assert_eq!(
            files,
            vec![
                ("a".to_owned(), b"1".to_vec()),
                ("d/b".to_owned(), b"2".to_vec())
            ]
        );
    }

    #[test]
    fn a_tar_naming_one_path_twice_is_refused_naming_the_entry() {
        for (files, want) in [
            (
                vec![("x", "1"), ("x", "2")],
                r#"t: entry "x": "x" is given twice"#,
            ),
            (
                vec![("x", "1"), ("./x", "2")],
                r#"t: entry "./x": "x" is given twice"#,
            ),
            (
                vec![("a", "1"), ("a/b", "2")],
                r#"t: entry "a/b": "a/b" is inside "a", which is a file"#,
            ),
            (
                vec![("a/b", "1"), ("a", "2")],
                r#"t: entry "a": "a" is a file and also the folder of "a/b""#,
            ),
            (vec![("../x", "1")], "stay inside"),
        ] {
            let e = parse_tar(&tar_of(&files)[..], "t").expect_err("refused");
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        // Neighbours that only share a prefix of characters are distinct paths.
        parse_tar(&tar_of(&[("a", "1"), ("a.b", "2"), ("ab/c", "3")])[..], "t").expect("read");
    }
}
