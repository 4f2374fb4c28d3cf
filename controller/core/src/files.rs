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

/// The regular files of a tar archive, as (relative path, bytes): refused, naming the entry,
/// when an entry is a link or device, or its path is absolute or leaves the folder (`..`).
/// Errors start with `what`.
pub fn parse_tar(reader: impl std::io::Read, what: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    use std::io::Read;
    let fail = |e: &dyn std::fmt::Display| format!("{what}: {e}");
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
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
        if kind.is_dir() {
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
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| fail(&e))?;
        out.push((clean.to_string_lossy().into_owned(), bytes));
    }
    Ok(out)
}
