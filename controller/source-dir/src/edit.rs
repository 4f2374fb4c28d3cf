//! Edits of declared files, for the admin operations that change what is declared (scale a
//! pool, delete a user, release a user's claims): the file stays the source of truth, so the
//! change is made there, with the rest of the file (comments, order, other documents) left as
//! it was.
//!
//! Every edit is checked by parsing the result: it must declare exactly what the original did,
//! but for the change asked. An edit that would do anything else is refused, and the file is
//! not touched.

use std::path::Path;

use serde_saphyr::granit_parser::{Event, Parser};

use poolkeeper_kinds::{Kind, ObjKey, Object};

use crate::loader::parse_text;

/// The result of an edit: the new text, or None when no object is left (remove the file).
pub type Edited = Option<String>;

/// Lines that begin a document (`---`, alone or followed by a space or a comment).
fn is_separator(line: &str) -> bool {
    let rest = line.trim_end_matches(['\n', '\r']);
    rest == "---" || rest.starts_with("--- ") || rest.starts_with("---\t")
}

/// The object `key` as `text` declares it.
fn find<'a>(objects: &'a [Object], key: &ObjKey) -> Option<&'a Object> {
    objects.iter().find(|o| &o.key() == key)
}

/// The object `key` among those the file at `path` declares, or the error saying it is not.
fn declared<'a>(path: &Path, objects: &'a [Object], key: &ObjKey) -> Result<&'a Object, String> {
    find(objects, key).ok_or_else(|| format!("{} does not declare {key}", path.display()))
}

/// Whether every object of `before` but `key` is in `after`, with the same spec.
fn others_unchanged(before: &[Object], after: &[Object], key: &ObjKey) -> bool {
    before
        .iter()
        .filter(|o| &o.key() != key)
        .all(|e| find(after, &e.key()).is_some_and(|a| a.spec == e.spec))
}

fn parse_clean(path: &Path, text: &str, what: &str) -> Result<Vec<Object>, String> {
    let parsed = parse_text(path, text);
    if let Some(d) = parsed.diagnostics.first() {
        return Err(format!(
            "{}:{}:{}: {what} has a problem ({}); fix it first",
            d.file.display(),
            d.line,
            d.col,
            d.message
        ));
    }
    Ok(parsed.objects)
}

/// Removes the document that declares `key` from the file's text.
pub fn remove_object(path: &Path, text: &str, key: &ObjKey) -> Result<Edited, String> {
    let before = parse_clean(path, text, "the file")?;
    let line = declared(path, &before, key)?.origin.line as usize;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    // The document runs from the last separator before its first line to the next separator.
    let start = (0..line.saturating_sub(1).min(lines.len()))
        .rev()
        .find(|&i| is_separator(lines[i]))
        .unwrap_or(0);
    let end = (line.min(lines.len())..lines.len())
        .find(|&i| is_separator(lines[i]))
        .unwrap_or(lines.len());
    let mut kept: Vec<&str> = Vec::with_capacity(lines.len());
    kept.extend_from_slice(&lines[..start]);
    kept.extend_from_slice(&lines[end..]);
    let new: String = kept.concat();
    let others = before.iter().filter(|o| &o.key() != key).count();
    if others == 0 {
        return Ok(None);
    }
    let after = parse_clean(path, &new, "the edited file")?;
    if after.len() != others || !others_unchanged(&before, &after, key) {
        return Err(format!(
            "{}: could not remove {key} without changing the other documents; edit the file by hand",
            path.display()
        ));
    }
    Ok(Some(new))
}

/// Byte offset of the character index `chars` in `text`.
fn byte_at(text: &str, chars: usize) -> usize {
    text.char_indices()
        .nth(chars)
        .map(|(b, _)| b)
        .unwrap_or(text.len())
}

/// Where, in the document declaring `key`, the scalar at `path` (for instance
/// `["spec", "warm"]`) is (byte range), or where a new key would go under its parent: the
/// position of the parent's first key, and whether the parent is in flow style (`{ ... }`).
enum Spot {
    Value(std::ops::Range<usize>),
    Insert { at: usize, col: usize, flow: bool },
}

fn locate(text: &str, doc_line: usize, path: &[&str]) -> Option<Spot> {
    let (_, parent) = path.split_last()?;
    // Walk the document's events, keeping the path of mapping keys.
    enum Frame {
        Map {
            key: Option<String>,
            first_key: Option<(usize, usize)>,
        },
        /// The index the next item gets (`[0]`, `[1]`, ...).
        Seq(usize),
    }
    let mut stack: Vec<(Vec<String>, Frame)> = Vec::new();
    let mut in_doc = false;
    // The depth of the parent mapping once found, and whether it is in flow style.
    let mut found_parent: Option<(usize, bool)> = None;
    for ev in Parser::new_from_str(text) {
        let Ok((event, span)) = ev else { return None };
        match event {
            Event::DocumentStart(..) => {
                if in_doc {
                    break;
                }
                stack.clear();
            }
            Event::DocumentEnd if in_doc => break,
            Event::MappingStart(..) | Event::SequenceStart(..) | Event::Scalar(..) => {
                let start_line = span.start.line();
                if stack.is_empty() && !in_doc {
                    // A document's root node: the one at the object's origin line.
                    if start_line != doc_line {
                        if let Event::MappingStart(..) | Event::SequenceStart(..) = event {
                            stack.push((vec!["<skip>".into()], Frame::Seq(0)));
                        }
                        continue;
                    }
                    in_doc = true;
                }
                // This node's path, and whether it is a key.
                let (here, is_key) = match stack.last_mut() {
                    None => (Vec::new(), false),
                    Some((p, Frame::Map { key, first_key })) => match key.take() {
                        None => {
                            let k = match &event {
                                Event::Scalar(v, ..) => v.to_string(),
                                _ => "?".into(),
                            };
                            if first_key.is_none() {
                                *first_key = Some((span.start.index(), span.start.col()));
                            }
                            *key = Some(k.clone());
                            let mut full = p.clone();
                            full.push(k);
                            (full, true)
                        }
                        Some(k) => {
                            let mut full = p.clone();
                            full.push(k);
                            (full, false)
                        }
                    },
                    Some((p, Frame::Seq(next))) => {
                        let mut full = p.clone();
                        full.push(format!("[{next}]"));
                        *next += 1;
                        (full, false)
                    }
                };
                if is_key {
                    continue;
                }
                let matches = |want: &[&str]| {
                    here.len() == want.len() && here.iter().zip(want).all(|(a, b)| a == b)
                };
                match event {
                    Event::Scalar(..) => {
                        if matches(path) {
                            return Some(Spot::Value(span.start.index()..span.end.index()));
                        }
                    }
                    Event::MappingStart(..) => {
                        let flow = text
                            .chars()
                            .nth(span.start.index())
                            .is_some_and(|c| c == '{');
                        if matches(parent) {
                            found_parent = Some((stack.len() + 1, flow));
                        }
                        stack.push((
                            here,
                            Frame::Map {
                                key: None,
                                first_key: None,
                            },
                        ));
                    }
                    _ => stack.push((here, Frame::Seq(0))),
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                let depth = stack.len();
                let popped = stack.pop();
                if let (Some((want_depth, flow)), Some((_, Frame::Map { first_key, .. }))) =
                    (found_parent, popped)
                    && want_depth == depth
                    && in_doc
                {
                    let (at, col) = first_key?;
                    return Some(Spot::Insert { at, col, flow });
                }
                if stack.is_empty() && in_doc {
                    break;
                }
            }
            _ => {}
        }
    }
    None
}

/// Sets the integer at `path` (under the object's document) to `value`; a missing key is
/// added beside its parent's first key.
pub fn set_integer(
    path: &Path,
    text: &str,
    key: &ObjKey,
    field: &[&str],
    value: u64,
    check: impl Fn(&Object) -> bool,
) -> Result<String, String> {
    set_scalar(path, text, key, field, &value.to_string(), check)
}

/// Sets the scalar at `path` (under the object's document) to `value`, YAML text as it is
/// written (a number, or a quoted string); a missing key is added beside its parent's first
/// key. `check` says whether the edited object is what was meant.
pub fn set_scalar(
    path: &Path,
    text: &str,
    key: &ObjKey,
    field: &[&str],
    value: &str,
    check: impl Fn(&Object) -> bool,
) -> Result<String, String> {
    let before = parse_clean(path, text, "the file")?;
    let obj = declared(path, &before, key)?;
    let spot = locate(text, obj.origin.line as usize, field).ok_or_else(|| {
        format!(
            "{}:{}: cannot find where {} goes in {key}; edit the file by hand",
            path.display(),
            obj.origin.line,
            field.join(".")
        )
    })?;
    let new = match spot {
        Spot::Value(r) => {
            let (a, b) = (byte_at(text, r.start), byte_at(text, r.end));
            format!("{}{value}{}", &text[..a], &text[b..])
        }
        Spot::Insert { at, col, flow } => {
            let a = byte_at(text, at);
            let leaf = field.last().copied().unwrap_or_default();
            let insert = if flow {
                format!("{leaf}: {value}, ")
            } else {
                format!("{leaf}: {value}\n{}", " ".repeat(col))
            };
            format!("{}{insert}{}", &text[..a], &text[a..])
        }
    };
    let after = parse_clean(path, &new, "the edited file")?;
    let edited = find(&after, key);
    if after.len() != before.len()
        || !others_unchanged(&before, &after, key)
        || !edited.is_some_and(&check)
    {
        return Err(format!(
            "{}: could not set {} of {key} without changing anything else; edit the file by hand",
            path.display(),
            field.join(".")
        ));
    }
    Ok(new)
}

/// The pool's `spec.warm` set to `warm`.
pub fn scale_pool(path: &Path, text: &str, pool: &str, warm: u32) -> Result<String, String> {
    let key = ObjKey::new(Kind::Pool, pool);
    set_integer(
        path,
        text,
        &key,
        &["spec", "warm"],
        u64::from(warm),
        |o| matches!(&o.spec, poolkeeper_kinds::Spec::Pool(p) if p.warm == warm),
    )
}

/// The user's `spec.passwordHash` set to `hash` (a PHC string, written double-quoted).
pub fn set_password(path: &Path, text: &str, user: &str, hash: &str) -> Result<String, String> {
    let key = ObjKey::new(Kind::User, user);
    let quoted = serde_json::to_string(hash).map_err(|e| e.to_string())?;
    set_scalar(
        path,
        text,
        &key,
        &["spec", "passwordHash"],
        &quoted,
        |o| matches!(&o.spec, poolkeeper_kinds::Spec::User(u) if u.password_hash.as_deref() == Some(hash)),
    )
}

/// Container `container` of deployment `deployment` declared `stopped` (or not).
pub fn set_container_stopped(
    path: &Path,
    text: &str,
    deployment: &str,
    container: &str,
    stopped: bool,
) -> Result<String, String> {
    let key = ObjKey::new(Kind::Deployment, deployment);
    let before = parse_clean(path, text, "the file")?;
    let index = match &declared(path, &before, &key)?.spec {
        poolkeeper_kinds::Spec::Deployment(d) => {
            d.containers.iter().position(|c| c.name == container)
        }
        _ => None,
    }
    .ok_or_else(|| format!("{}: {key} has no container {container:?}", path.display()))?;
    let item = format!("[{index}]");
    set_scalar(
        path,
        text,
        &key,
        &["spec", "containers", &item, "stopped"],
        &stopped.to_string(),
        |o| {
            matches!(&o.spec, poolkeeper_kinds::Spec::Deployment(d)
                if d.containers.get(index).is_some_and(|c| c.stopped == stopped))
        },
    )
}

/// The user's `spec.disabled` set to `disabled`.
pub fn set_disabled(path: &Path, text: &str, user: &str, disabled: bool) -> Result<String, String> {
    let key = ObjKey::new(Kind::User, user);
    set_scalar(
        path,
        text,
        &key,
        &["spec", "disabled"],
        &disabled.to_string(),
        |o| matches!(&o.spec, poolkeeper_kinds::Spec::User(u) if u.disabled == disabled),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file() -> PathBuf {
        PathBuf::from("/srv/pk/people.yaml")
    }

    const TEXT: &str = "# the team's pools and people
apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata:
  name: web
spec:
  # how many are kept ready
  warm: 3
  template:
    image: nginx
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {name: alice}
spec: {quota: {maxClaims: 2}}
--- # bob
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {name: bob}
spec:
  quota:
    maxClaims: 1
";

    const HASH: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g";

    #[test]
    fn a_password_is_added_to_a_flow_or_block_spec_and_replaced_in_place() {
        let new = set_password(&file(), TEXT, "alice", HASH).expect("alice");
        assert!(
            new.contains(&format!(
                "spec: {{passwordHash: \"{HASH}\", quota: {{maxClaims: 2}}}}"
            )),
            "{new}"
        );
        let new = set_password(&file(), &new, "bob", HASH).expect("bob");
        assert!(
            new.contains(&format!("spec:\n  passwordHash: \"{HASH}\"\n  quota:\n")),
            "{new}"
        );
        // Set again: the value is replaced, the rest of the file is as it was.
        let other = HASH.replace("aGFz", "QUJD");
        let again = set_password(&file(), &new, "bob", &other).expect("again");
        assert_eq!(
            again,
            new.replacen(
                &format!("\"{HASH}\"\n  quota"),
                &format!("\"{other}\"\n  quota"),
                1
            )
        );
        let err = set_password(&file(), TEXT, "carol", HASH).expect_err("no carol");
        assert!(err.contains("carol"), "{err}");
    }

    #[test]
    fn a_deployments_container_is_stopped_and_started_in_place() {
        let text = "apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {name: shop}
spec:
  containers:
  - name: web
    image: nginx
  - {name: db, image: postgres}
";
        let f = PathBuf::from("/srv/pk/shop.yaml");
        let new = set_container_stopped(&f, text, "shop", "web", true).expect("web");
        assert!(
            new.contains("  - stopped: true\n    name: web\n    image: nginx\n"),
            "{new}"
        );
        let new = set_container_stopped(&f, &new, "shop", "db", true).expect("db");
        assert!(
            new.contains("  - {stopped: true, name: db, image: postgres}"),
            "{new}"
        );
        let back = set_container_stopped(&f, &new, "shop", "web", false).expect("web again");
        assert!(back.contains("  - stopped: false\n    name: web"), "{back}");
        let err = set_container_stopped(&f, text, "shop", "cache", true).expect_err("no cache");
        assert!(err.contains("cache"), "{err}");
    }

    #[test]
    fn a_user_is_disabled_and_enabled_in_place() {
        let new = set_disabled(&file(), TEXT, "bob", true).expect("bob");
        assert!(new.contains("spec:\n  disabled: true\n  quota:"), "{new}");
        let back = set_disabled(&file(), &new, "bob", false).expect("bob again");
        assert!(back.contains("  disabled: false\n"), "{back}");
        let alice = set_disabled(&file(), TEXT, "alice", true).expect("alice");
        assert!(
            alice.contains("spec: {disabled: true, quota: {maxClaims: 2}}"),
            "{alice}"
        );
    }

    #[test]
    fn scaling_changes_the_number_and_nothing_else() {
        let new = scale_pool(&file(), TEXT, "web", 12).expect("scaled");
        assert_eq!(new, TEXT.replace("warm: 3", "warm: 12"));
    }

    #[test]
    fn scaling_a_pool_without_warm_adds_the_key_in_the_style_of_its_mapping() {
        let block = TEXT.replace("  # how many are kept ready\n  warm: 3\n", "");
        let new = scale_pool(&file(), &block, "web", 2).expect("scaled");
        assert!(
            new.contains("spec:\n  warm: 2\n  template:\n"),
            "block style keeps its indentation:\n{new}"
        );
        let flow = "kind: Pool\napiVersion: poolkeeper.dev/v1alpha1\nmetadata: {name: web}\nspec: {template: {image: nginx}}\n";
        let new = scale_pool(&file(), flow, "web", 4).expect("scaled");
        assert!(
            new.contains("spec: {warm: 4, template: {image: nginx}}"),
            "{new}"
        );
    }

    #[test]
    fn removing_a_document_keeps_the_others_and_their_comments() {
        let key = ObjKey::new(Kind::User, "alice");
        let new = remove_object(&file(), TEXT, &key)
            .expect("removed")
            .expect("objects left");
        assert!(!new.contains("alice"));
        assert!(new.contains("# how many are kept ready") && new.contains("--- # bob"));
        let objects = parse_text(&file(), &new).objects;
        assert_eq!(objects.len(), 2);
        // The first document, then the last one.
        let key = ObjKey::new(Kind::Pool, "web");
        let new = remove_object(&file(), TEXT, &key)
            .expect("removed")
            .expect("left");
        assert!(!new.contains("kind: Pool"));
        assert_eq!(parse_text(&file(), &new).objects.len(), 2);
        let key = ObjKey::new(Kind::User, "bob");
        let new = remove_object(&file(), TEXT, &key)
            .expect("removed")
            .expect("left");
        assert!(!new.contains("bob"));
        assert_eq!(parse_text(&file(), &new).objects.len(), 2);
    }

    #[test]
    fn removing_the_last_object_asks_for_the_file_to_go() {
        let one =
            "kind: User\napiVersion: poolkeeper.dev/v1alpha1\nmetadata: {name: carol}\nspec: {}\n";
        let key = ObjKey::new(Kind::User, "carol");
        assert_eq!(remove_object(&file(), one, &key), Ok(None));
    }

    #[test]
    fn an_object_declared_twice_in_a_file_is_not_half_removed() {
        let twice = format!(
            "{TEXT}---\nkind: User\napiVersion: poolkeeper.dev/v1alpha1\nmetadata: {{name: alice}}\nspec: {{}}\n"
        );
        let key = ObjKey::new(Kind::User, "alice");
        let e = remove_object(&file(), &twice, &key).expect_err("one of two removed");
        assert!(e.contains("edit the file by hand"), "{e}");
    }

    #[test]
    fn a_file_with_problems_or_without_the_object_is_not_edited() {
        let key = ObjKey::new(Kind::User, "dave");
        let e = remove_object(&file(), TEXT, &key).expect_err("not declared");
        assert!(e.contains("does not declare User/dave"), "{e}");
        let broken =
            format!("{TEXT}---\nkind: Pool\nmetadata: {{name: x}}\nspec: {{warm: many}}\n");
        let e = scale_pool(&file(), &broken, "web", 1).expect_err("broken file");
        assert!(
            e.contains("people.yaml:") && e.contains("fix it first"),
            "{e}"
        );
    }
}
