//! Tar uploads (`PUT /api/v1/claims/NAME/files`, a claim's `filesFrom` tar): raw bytes, and
//! archives built from fuzzed entries (paths with `..`, `./`, repeats, links). What is accepted
//! is only plain relative paths, each once, none both a file and a folder; a refusal names what.
#![no_main]

use std::collections::BTreeSet;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use poolkeeper_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut f = Fields(data);
    let archive = if f.byte() % 2 == 0 {
        f.rest().to_vec()
    } else {
        built(&mut f)
    };
    match poolkeeper_core::files::parse_tar(archive.as_slice(), "upload") {
        Ok(files) => {
            let mut seen = BTreeSet::new();
            for (path, _) in &files {
                let p = Path::new(path);
                assert!(
                    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_))),
                    "accepted a path that is not plain and relative: {path:?}"
                );
                assert!(seen.insert(path.clone()), "accepted {path:?} twice");
            }
            for path in &seen {
                for parent in Path::new(path).ancestors().skip(1) {
                    let parent = parent.to_string_lossy();
                    assert!(
                        parent.is_empty() || !seen.contains(parent.as_ref()),
                        "accepted {parent:?} as a file and as the folder of {path:?}"
                    );
                }
            }
        }
        Err(e) => assert!(
            e.starts_with("upload: "),
            "an error not naming its upload: {e}"
        ),
    }
});

/// An archive of up to 8 fuzzed entries: a type, a path written raw into the header, content.
fn built(f: &mut Fields<'_>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for _ in 0..(f.byte() % 8) {
        let kind = match f.byte() % 6 {
            0 | 1 | 2 => tar::EntryType::Regular,
            3 => tar::EntryType::Directory,
            4 => tar::EntryType::Symlink,
            _ => tar::EntryType::Link,
        };
        let path = f.bytes();
        let content = f.bytes();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        let n = path.len().min(99);
        h.as_old_mut().name[..n].copy_from_slice(&path[..n]);
        h.set_cksum();
        if b.append(&h, content).is_err() {
            break;
        }
    }
    b.into_inner().unwrap_or_default()
}
