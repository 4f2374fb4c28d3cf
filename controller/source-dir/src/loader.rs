//! Reads declared objects from YAML and JSON files.
//!
//! Each file may hold many documents (`---`). Every document is parsed on its own, so one bad
//! document does not hide the others, and every problem is reported as
//! `FILE:LINE:COL: KIND/NAME: field.path: message`. Positions come from an index of the YAML
//! event stream (JSON is parsed as YAML, which it is a subset of), so that checks made after
//! deserialisation (`warm > max`, a missing pool) still point at the offending line.
//!
//! A `.json` file without `apiVersion`/`kind` is read as a Pod Manager config (one object or a
//! list) and becomes one Deployment named after the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_saphyr::granit_parser::{Event, Parser};

pub use poolkeeper_kinds::Diagnostic;
use poolkeeper_kinds::validate::{duplicates, validate_object, validate_set};
use poolkeeper_kinds::{
    ContainerSpec, DeploymentSpec, FieldError, Kind, Object, Origin, RestartPolicy, Spec,
    VolumeMode, VolumeMount,
};

/// The folder inside a watched directory that holds poolkeeper's own state; never loaded.
pub const STATE_DIR: &str = ".poolkeeper";

/// What one file yielded.
#[derive(Clone, Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub diagnostics: Vec<Diagnostic>,
}

impl ParsedFile {
    pub fn is_clean(&self) -> bool {
        self.diagnostics.is_empty()
    }
}

/// Line/column (1-based) of a key and of its value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pos {
    line: u64,
    col: u64,
}

#[derive(Debug, Default)]
struct DocIndex {
    /// First line (1-based) of the document's text.
    first_line: usize,
    /// Path -> position of the key (or of the value for sequence items and the root).
    keys: HashMap<String, Pos>,
    /// Key position -> path, for every mapping key (repeated ones too).
    key_paths: HashMap<(u64, u64), String>,
    /// Value position -> path, to name the field of a deserialisation error.
    values: HashMap<(u64, u64), String>,
    root: Pos,
    empty: bool,
}

impl DocIndex {
    /// The position of `path`, or of its nearest declared ancestor.
    fn locate(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.keys.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.root,
            }
        }
    }
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

/// Walks the YAML event stream once, splitting documents and indexing field positions.
fn index_documents(text: &str) -> Result<Vec<DocIndex>, (Pos, String)> {
    let mut docs: Vec<DocIndex> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    for ev in Parser::new_from_str(text) {
        let (event, span) = ev.map_err(|e| {
            let m = e.marker();
            (
                Pos {
                    line: m.line() as u64,
                    col: m.col() as u64 + 1,
                },
                e.info().to_string(),
            )
        })?;
        let pos = Pos {
            line: span.start.line() as u64,
            col: span.start.col() as u64 + 1,
        };
        let is_node = matches!(
            event,
            Event::Scalar(..)
                | Event::MappingStart(..)
                | Event::SequenceStart(..)
                | Event::Alias(_)
        );
        match &event {
            Event::DocumentStart(..) => {
                docs.push(DocIndex {
                    first_line: span.start.line(),
                    root: pos,
                    empty: true,
                    ..DocIndex::default()
                });
                stack.clear();
                continue;
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                continue;
            }
            _ if !is_node => continue,
            _ => {}
        }
        let Some(doc) = docs.last_mut() else { continue };
        if matches!(event, Event::Scalar(..) | Event::Alias(_)) && stack.is_empty() {
            // A bare scalar document (`null`, `~`, or a stray word).
            if let Event::Scalar(v, ..) = &event
                && !matches!(v.as_ref(), "" | "~" | "null")
            {
                doc.empty = false;
            }
            continue;
        }
        doc.empty = false;
        // Work out this node's path from its parent.
        let path = match stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    // This node is a key.
                    let k = match &event {
                        Event::Scalar(v, ..) => v.to_string(),
                        _ => "?".to_owned(),
                    };
                    let full = join_key(path, &k);
                    doc.key_paths.insert((pos.line, pos.col), full.clone());
                    doc.keys.entry(full).or_insert(pos);
                    *key = Some(k);
                    continue;
                }
                Some(k) => join_key(path, &k),
            },
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                doc.keys.entry(p.clone()).or_insert(pos);
                p
            }
        };
        doc.values.insert((pos.line, pos.col), path.clone());
        if path.is_empty() {
            doc.root = pos;
        }
        match event {
            Event::MappingStart(..) => stack.push(Frame::Map { path, key: None }),
            Event::SequenceStart(..) => stack.push(Frame::Seq { path, next: 0 }),
            _ => {}
        }
    }
    Ok(docs)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<HeaderMeta>,
}

#[derive(Deserialize)]
struct HeaderMeta {
    name: Option<String>,
}

/// A document as written in a file: Kubernetes' envelope around one of our specs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileDoc<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: FileMeta,
    spec: S,
    /// Status is the controller's to write; a copy pasted from `get -o yaml` is ignored.
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    _labels: BTreeMap<String, String>,
    #[serde(default)]
    _annotations: BTreeMap<String, String>,
}

struct DocCtx<'a> {
    file: &'a Path,
    index: &'a DocIndex,
    text: &'a str,
}

impl DocCtx<'_> {
    fn diag(&self, object: Option<String>, path: &str, message: impl Into<String>) -> Diagnostic {
        let pos = self.index.locate(path);
        Diagnostic {
            file: self.file.to_path_buf(),
            line: pos.line,
            col: pos.col,
            object,
            path: path.to_owned(),
            message: message.into(),
        }
    }

    /// Turns a serde-saphyr error into a located diagnostic naming the field when possible.
    fn de_error(&self, object: Option<String>, err: &serde_saphyr::Error) -> Diagnostic {
        let offset = self.index.first_line.saturating_sub(1) as u64;
        let (line, col) = match err.location() {
            Some(l) => (l.line() + offset, l.column()),
            None => (self.index.root.line, self.index.root.col),
        };
        let message = short_message(err);
        let value_at = || self.index.values.get(&(line, col)).cloned();
        // Unknown-field and duplicate-key errors point at the key. A block mapping starts where
        // its first key does, so for unknown fields the key must win over the enclosing
        // mapping's value (`spec.tll`, not `spec`).
        let key_at = || self.index.key_paths.get(&(line, col)).cloned();
        let path = if message.starts_with("unknown field") {
            key_at().or_else(value_at)
        } else {
            value_at().or_else(key_at)
        }
        .unwrap_or_default();
        Diagnostic {
            file: self.file.to_path_buf(),
            line,
            col,
            object,
            path,
            message,
        }
    }

    fn parse<S: DeserializeOwned>(&self, object: &str) -> Result<(String, S), Diagnostic> {
        let doc: FileDoc<S> = serde_saphyr::from_str(self.text)
            .map_err(|e| self.de_error(Some(object.to_owned()), &e))?;
        if let Some(ns) = &doc.metadata.namespace
            && ns != "default"
        {
            return Err(self.diag(
                Some(object.to_owned()),
                "metadata.namespace",
                format!(
                    "namespace {ns:?}: a watched directory has one namespace; remove the field \
                     or use \"default\""
                ),
            ));
        }
        Ok((doc.metadata.name, doc.spec))
    }
}

/// The first line of serde-saphyr's message, without its own location suffix or snippet.
fn short_message(err: &serde_saphyr::Error) -> String {
    let full = err.to_string();
    let mut first = full.lines().next().unwrap_or("invalid document").trim();
    first = first.strip_prefix("error: ").unwrap_or(first);
    // Advice about the library's own options means nothing to someone editing a file.
    if let Some(i) = first.find(", set DuplicateKeyPolicy") {
        first = &first[..i];
    }
    // Drop a leading "line N column M: " (we print our own, file-relative position).
    if first.starts_with("line ")
        && let Some(i) = first.find(": ")
    {
        first = &first[i + 2..];
    }
    match first.find(" at line ") {
        Some(i) => first[..i].to_owned(),
        None => first.to_owned(),
    }
}

/// The position of `field` (a dotted path such as `spec.pool`) in the document of `origin`, or
/// of its nearest declared ancestor; for problems found after loading (missing references,
/// overlapping ports). Falls back to the document's start.
pub fn locate_field(origin: &poolkeeper_kinds::Origin, field: &str) -> (u64, u64) {
    let fallback = (origin.line, origin.col);
    let Ok(text) = std::fs::read_to_string(&origin.file) else {
        return fallback;
    };
    let Ok(docs) = index_documents(&text) else {
        return fallback;
    };
    docs.iter()
        .find(|d| d.root.line == origin.line && d.root.col == origin.col)
        .map(|d| {
            let p = d.locate(field);
            (p.line, p.col)
        })
        .unwrap_or(fallback)
}

/// Parses one file's text. `path` is used for messages and Pod Manager naming.
pub fn parse_text(path: &Path, text: &str) -> ParsedFile {
    let mut out = ParsedFile::default();
    let docs = match index_documents(text) {
        Ok(d) => d,
        Err((pos, msg)) => {
            out.diagnostics.push(Diagnostic {
                file: path.to_path_buf(),
                line: pos.line,
                col: pos.col,
                object: None,
                path: String::new(),
                message: format!("invalid YAML: {msg}"),
            });
            return out;
        }
    };
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let is_json = path.extension().is_some_and(|e| e == "json");
    for (i, index) in docs.iter().enumerate() {
        if index.empty {
            continue;
        }
        let start = index.first_line.saturating_sub(1);
        let end = docs
            .get(i + 1)
            .map(|d| d.first_line.saturating_sub(1))
            .unwrap_or(lines.len())
            .max(start);
        let doc_text: String = lines[start.min(lines.len())..end.min(lines.len())].concat();
        let ctx = DocCtx {
            file: path,
            index,
            text: &doc_text,
        };
        parse_document(&ctx, is_json, &mut out);
    }
    out
}

fn parse_document(ctx: &DocCtx<'_>, is_json: bool, out: &mut ParsedFile) {
    // A document that is a list, or a JSON object without `kind`, is a Pod Manager config.
    let header: Result<Header, _> = serde_saphyr::from_str(ctx.text);
    let header = match header {
        Ok(h) => h,
        Err(_) if is_json => return parse_pod_manager(ctx, out),
        Err(e) => {
            out.diagnostics.push(ctx.de_error(None, &e));
            return;
        }
    };
    let Some(kind_name) = header.kind else {
        if is_json && header.api_version.is_none() {
            return parse_pod_manager(ctx, out);
        }
        out.diagnostics
            .push(ctx.diag(None, "kind", "missing field `kind`"));
        return;
    };
    let name = header.metadata.and_then(|m| m.name).unwrap_or_default();
    let label = format!("{kind_name}/{name}");
    match header.api_version.as_deref() {
        Some(poolkeeper_kinds::API_VERSION) => {}
        Some(other) => {
            out.diagnostics.push(ctx.diag(
                Some(label),
                "apiVersion",
                format!(
                    "unsupported apiVersion {other:?} (expected {:?})",
                    poolkeeper_kinds::API_VERSION
                ),
            ));
            return;
        }
        None => {
            out.diagnostics
                .push(ctx.diag(Some(label), "apiVersion", "missing field `apiVersion`"));
            return;
        }
    }
    let parsed = match kind_name.as_str() {
        "Pool" => ctx.parse(&label).map(|(n, s)| (n, Spec::Pool(s))),
        "Claim" => ctx.parse(&label).map(|(n, s)| (n, Spec::Claim(s))),
        "User" => ctx.parse(&label).map(|(n, s)| (n, Spec::User(s))),
        "Deployment" => ctx.parse(&label).map(|(n, s)| (n, Spec::Deployment(s))),
        other => Err(ctx.diag(
            Some(label.clone()),
            "kind",
            format!("unknown kind {other:?} (expected Pool, Claim, User or Deployment)"),
        )),
    };
    match parsed {
        Ok((name, spec)) => push_valid(ctx, out, name, spec),
        Err(d) => out.diagnostics.push(d),
    }
}

fn push_valid(ctx: &DocCtx<'_>, out: &mut ParsedFile, name: String, spec: Spec) {
    let label = format!("{}/{}", spec.kind(), name);
    let errs: Vec<FieldError> = validate_object(&name, &spec);
    if !errs.is_empty() {
        for e in errs {
            out.diagnostics
                .push(ctx.diag(Some(label.clone()), &e.path, e.message));
        }
        return;
    }
    out.objects.push(Object {
        name,
        spec,
        origin: Origin {
            file: ctx.file.to_path_buf(),
            line: ctx.index.root.line,
            col: ctx.index.root.col,
        },
        generation: 1,
    });
}

// ---------------------------------------------------------------------------------------------
// Pod Manager configs

/// One container as the Pod Manager tool wrote it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodManagerConfig {
    name: String,
    image: String,
    #[serde(default)]
    ports: BTreeMap<String, PodManagerPort>,
    #[serde(default)]
    environment: Option<PodManagerEnv>,
    #[serde(default)]
    command: Option<PodManagerCommand>,
    #[serde(default)]
    volumes: Option<PodManagerVolumes>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PodManagerPort {
    Port(u16),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PodManagerEnv {
    Map(BTreeMap<String, serde_json::Value>),
    List(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PodManagerCommand {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PodManagerVolumes {
    Map(BTreeMap<String, PodManagerBind>),
    List(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodManagerBind {
    bind: String,
    #[serde(default)]
    mode: Option<String>,
}

fn parse_pod_manager(ctx: &DocCtx<'_>, out: &mut ParsedFile) {
    let stem = ctx
        .file
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .to_ascii_lowercase()
                .replace(['_', '.', ' '], "-")
        })
        .unwrap_or_default();
    let label = format!("Deployment/{stem}");
    // Parse through serde_json for exact JSON semantics; map its errors onto the index.
    // A list or a single object, told apart by the first non-blank character.
    let list = ctx.text.trim_start().starts_with('[');
    let parsed = if list {
        serde_json::from_str::<Vec<PodManagerConfig>>(ctx.text)
    } else {
        serde_json::from_str::<PodManagerConfig>(ctx.text).map(|c| vec![c])
    };
    let configs = match parsed {
        Ok(f) => f,
        Err(e) => {
            let msg = if e.is_data() {
                format!("Pod Manager config: {e}")
            } else {
                format!("invalid JSON: {e}")
            };
            let offset = ctx.index.first_line.saturating_sub(1) as u64;
            // serde_json's line and column may be 0 (before any input, at a newline).
            let at = Pos {
                line: e.line().max(1) as u64 + offset,
                col: e.column().max(1) as u64,
            };
            // serde_json gives no path: name the field from the index, as for YAML.
            let (path, pos, better) =
                json_error_field(ctx.index, &msg, at).unwrap_or((String::new(), at, None));
            out.diagnostics.push(Diagnostic {
                file: ctx.file.to_path_buf(),
                line: pos.line,
                col: pos.col,
                object: Some(label),
                path,
                message: better.unwrap_or_else(|| strip_serde_json_position(&msg)),
            });
            return;
        }
    };
    let mut containers = Vec::new();
    let mut errors = Vec::new();
    for (i, c) in configs.into_iter().enumerate() {
        let base = if list {
            format!("[{i}]")
        } else {
            String::new()
        };
        let at = |field: &str| {
            if base.is_empty() {
                field.to_owned()
            } else {
                format!("{base}.{field}")
            }
        };
        match pod_manager_container(c) {
            Ok(spec) => containers.push(spec),
            Err((field, msg)) => errors.push(ctx.diag(Some(label.clone()), &at(field), msg)),
        }
    }
    if !errors.is_empty() {
        out.diagnostics.extend(errors);
        return;
    }
    let spec = DeploymentSpec {
        network: None,
        containers,
        ..DeploymentSpec::default()
    };
    push_valid(ctx, out, stem, Spec::Deployment(spec));
}

/// Path, position and (when clearer than serde's) message of a Pod Manager error.
type JsonErrorField = (String, Pos, Option<String>);

/// The field of a serde_json data error at `at`, where it starts, and a clearer message when
/// serde's is about our own types. serde_json reports an unknown field just past its key, a
/// wrong scalar at its end, a wrong map or list just before it, and an untagged enum (the
/// fields that take several shapes) at the end of the value.
fn json_error_field(index: &DocIndex, msg: &str, at: Pos) -> Option<JsonErrorField> {
    // The last key named `field` at or before the error.
    let key_named = |field: &str| {
        let suffix = format!(".{field}");
        index
            .key_paths
            .iter()
            .filter(|((l, c), k)| {
                (k.as_str() == field || k.ends_with(&suffix)) && (*l, *c) <= (at.line, at.col)
            })
            .max_by_key(|(lc, _)| **lc)
            .map(|((l, c), k)| (k.clone(), Pos { line: *l, col: *c }))
    };
    if let Some(rest) = msg
        .split("unknown field `")
        .nth(1)
        .or_else(|| msg.split("duplicate field `").nth(1))
    {
        let (path, pos) = key_named(rest.split('`').next()?)?;
        return Some((path, pos, None));
    }
    if let Some(rest) = msg.split("untagged enum PodManager").nth(1) {
        let (field, expected) = match rest.split_whitespace().next()? {
            "Port" => (
                "ports",
                "a host port must be a number or \"[IP:]PORT\" text",
            ),
            "Env" => (
                "environment",
                "expected a map of names to values or a list of \"KEY=VALUE\" strings",
            ),
            "Command" => ("command", "expected a string or a list of strings"),
            "Volumes" => (
                "volumes",
                "expected a map of source to {bind, mode} or a list of \"SOURCE:TARGET[:MODE]\" \
                 strings",
            ),
            _ => return None,
        };
        let (path, pos) = key_named(field)?;
        return Some((path, pos, Some(format!("Pod Manager config: {expected}"))));
    }
    if msg.contains("invalid type") || msg.contains("invalid value") {
        // The last value starting on the error's line at or just after it.
        return index
            .values
            .iter()
            .filter(|((l, c), path)| !path.is_empty() && *l == at.line && *c <= at.col + 1)
            .max_by_key(|((_, c), _)| *c)
            .map(|((l, c), path)| (path.clone(), Pos { line: *l, col: *c }, None));
    }
    None
}

fn strip_serde_json_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Pod Manager started containers detached with no restart policy, and its one-shot configs
/// (hello-world) exit 0: `OnFailure` keeps servers running and lets one-shots finish.
const POD_MANAGER_RESTART: RestartPolicy = RestartPolicy::OnFailure;

fn pod_manager_container(c: PodManagerConfig) -> Result<ContainerSpec, (&'static str, String)> {
    let mut ports = BTreeMap::new();
    for (k, v) in c.ports {
        let host = match v {
            PodManagerPort::Port(p) => p,
            PodManagerPort::Text(s) => {
                let (ip, port) = match s.rsplit_once(':') {
                    Some((ip, port)) => {
                        (Some(ip.trim_start_matches('[').trim_end_matches(']')), port)
                    }
                    None => (None, s.as_str()),
                };
                // Published on every interface, as a port alone is: an address that narrows it
                // (127.0.0.1: only this machine) would be widened without a word.
                if let Some(ip) = ip.filter(|ip| !matches!(*ip, "" | "0.0.0.0" | "::")) {
                    return Err((
                        "ports",
                        format!(
                            "host port {s:?} for {k:?} binds to the address {ip}, which poolkeeper \
                             does not do (it publishes on every interface): give the port alone, \
                             or 0.0.0.0:PORT, to accept that"
                        ),
                    ));
                }
                port.parse().map_err(|_| {
                    (
                        "ports",
                        format!("host port {s:?} for {k:?} is not a number"),
                    )
                })?
            }
        };
        let key = if k.contains('/') {
            k
        } else {
            format!("{k}/tcp")
        };
        ports.insert(key, host);
    }
    let environment = match c.environment {
        None => BTreeMap::new(),
        Some(PodManagerEnv::Map(m)) => m
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect(),
        Some(PodManagerEnv::List(l)) => l
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
                None => Err(("environment", format!("{kv:?} is not KEY=VALUE"))),
            })
            .collect::<Result<_, _>>()?,
    };
    let command = match c.command {
        None => Vec::new(),
        Some(PodManagerCommand::Argv(v)) => v,
        Some(PodManagerCommand::Shell(s)) => shlex::split(&s).ok_or((
            "command",
            format!("cannot split {s:?} into words (unbalanced quotes)"),
        ))?,
    };
    let mut volumes = BTreeMap::new();
    match c.volumes {
        None => {}
        Some(PodManagerVolumes::Map(m)) => {
            for (src, b) in m {
                let mode = parse_mode(b.mode.as_deref())?;
                volumes.insert(src, VolumeMount { bind: b.bind, mode });
            }
        }
        Some(PodManagerVolumes::List(l)) => {
            for v in l {
                let mut parts = v.splitn(3, ':');
                let (Some(src), Some(bind)) = (parts.next(), parts.next()) else {
                    return Err(("volumes", format!("{v:?} is not SOURCE:TARGET[:MODE]")));
                };
                let mode = parse_mode(parts.next())?;
                volumes.insert(
                    src.to_owned(),
                    VolumeMount {
                        bind: bind.to_owned(),
                        mode,
                    },
                );
            }
        }
    }
    Ok(ContainerSpec {
        name: c.name,
        image: c.image,
        ports,
        environment,
        command,
        volumes,
        restart_policy: POD_MANAGER_RESTART,
        replicas: 1,
        ..ContainerSpec::default()
    })
}

fn parse_mode(mode: Option<&str>) -> Result<VolumeMode, (&'static str, String)> {
    match mode {
        None | Some("rw") => Ok(VolumeMode::Rw),
        Some("ro") => Ok(VolumeMode::Ro),
        Some(other) => Err(("volumes", format!("unknown mode {other:?} (rw or ro)"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Files and folders

/// Whether a path is one the loader reads: `.yaml`, `.yml`, `.json`, not hidden, not an editor's
/// temporary file, not under the state folder.
pub fn is_spec_file(path: &Path) -> bool {
    if path.components().any(|c| c.as_os_str() == STATE_DIR) {
        return false;
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') || name.starts_with('#') || name.ends_with('~') {
        return false;
    }
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Reads one file from disk (at most the default largest spec file).
pub fn parse_file(path: &Path) -> ParsedFile {
    match read_spec(path, SpecLimit::default().max_bytes) {
        Read::Bytes(bytes) => parse_bytes(path, bytes),
        Read::TooLarge(size) => too_large(path, size, SpecLimit::default().max_bytes),
        Read::Failed(e) => unreadable(path, &e),
    }
}

/// The largest spec file read, and where refusals are counted.
#[derive(Clone, Debug)]
pub struct SpecLimit {
    pub max_bytes: u64,
    pub refusals: std::sync::Arc<poolkeeper_engine::limits::Refusals>,
}

impl Default for SpecLimit {
    fn default() -> Self {
        SpecLimit {
            max_bytes: poolkeeper_engine::limits::Limits::default().max_spec_file,
            refusals: Default::default(),
        }
    }
}

/// A spec file's content, if it is not larger than the limit.
#[derive(Debug)]
pub enum Read {
    Bytes(Vec<u8>),
    /// Larger than the limit: its size (it was not read).
    TooLarge(u64),
    Failed(std::io::Error),
}

/// Reads `path` if it holds at most `max` bytes: a larger file is not read at all (its size is
/// taken from the file system, and a file that grows while it is read stops at `max + 1`).
pub fn read_spec(path: &Path, max: u64) -> Read {
    use std::io::Read as _;
    // Only a regular file (or a link to one) is opened: opening a FIFO would wait for a writer,
    // and the watcher with it.
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Read::Failed(std::io::Error::other("not a regular file"));
        }
        Ok(_) => {}
        Err(e) => return Read::Failed(e),
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return Read::Failed(e),
    };
    match file.metadata() {
        Ok(m) if m.len() > max => return Read::TooLarge(m.len()),
        Ok(_) => {}
        Err(e) => return Read::Failed(e),
    }
    let mut bytes = Vec::new();
    match file.take(max.saturating_add(1)).read_to_end(&mut bytes) {
        Ok(n) if n as u64 > max => Read::TooLarge(n as u64),
        Ok(_) => Read::Bytes(bytes),
        Err(e) => Read::Failed(e),
    }
}

/// A file over the largest spec file read.
pub fn too_large(path: &Path, size: u64, max: u64) -> ParsedFile {
    whole_file_problem(
        path,
        format!(
            "not read: {size} bytes, over the largest spec file of {max} bytes \
             (--max-spec-file-size); split it into several files"
        ),
    )
}

/// Parses a file's content as read.
pub fn parse_bytes(path: &Path, bytes: Vec<u8>) -> ParsedFile {
    match String::from_utf8(bytes) {
        Ok(text) => parse_text(path, &text),
        Err(e) => ParsedFile {
            objects: Vec::new(),
            diagnostics: vec![Diagnostic {
                file: path.to_path_buf(),
                line: 1,
                col: 1,
                object: None,
                path: String::new(),
                message: format!("not UTF-8 text: {e}"),
            }],
        },
    }
}

/// A file that could not be read.
pub fn unreadable(path: &Path, e: &std::io::Error) -> ParsedFile {
    whole_file_problem(path, format!("cannot read: {e}"))
}

/// A file that declared objects, found empty: truncated to be written again (`cmd > file`, some
/// editors' saves), not a way to delete them. They are kept until it holds text again.
pub fn being_written(path: &Path) -> ParsedFile {
    whole_file_problem(
        path,
        "empty: taken for a file being written, so what it declared is kept; delete the file to \
         delete its objects"
            .to_owned(),
    )
}

/// The note added to the problems of a file found invalid at the start: its objects are those
/// of its last valid version, which the state folder kept.
pub fn kept_from_last_good(path: &Path) -> Diagnostic {
    Diagnostic {
        file: path.to_path_buf(),
        line: 0,
        col: 0,
        object: None,
        path: String::new(),
        message: "its last valid version (kept in the state folder) is in use until it is fixed"
            .to_owned(),
    }
}

/// A file that yields nothing, for `message` (about the whole file, no line in it).
fn whole_file_problem(path: &Path, message: String) -> ParsedFile {
    ParsedFile {
        objects: Vec::new(),
        diagnostics: vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            object: None,
            path: String::new(),
            message,
        }],
    }
}

/// Lists the spec files under `root` (a file or a folder, recursively), sorted; an error when
/// any folder under it cannot be read.
pub fn spec_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let listing = list_spec_files(root)?;
    match listing.unreadable.into_iter().next() {
        Some((dir, e)) => Err(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", dir.display()),
        )),
        None => Ok(listing.files),
    }
}

/// The spec files under a folder, and the folders under it that could not be read (what they
/// hold is unknown, not gone).
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<PathBuf>,
    pub unreadable: Vec<(PathBuf, std::io::Error)>,
}

/// Lists the spec files under `root` (a file or a folder, recursively), sorted. Only `root`
/// itself failing is an error: a folder under it that cannot be read (its permissions, or
/// removed while it was listed) is listed as such, and the rest is read.
pub fn list_spec_files(root: &Path) -> std::io::Result<Listing> {
    let meta = std::fs::metadata(root)?;
    if meta.is_file() {
        return Ok(Listing {
            files: vec![root.to_path_buf()],
            unreadable: Vec::new(),
        });
    }
    let mut out = Listing::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if dir == root => return Err(e),
            Err(e) => {
                out.unreadable.push((dir, e));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    out.unreadable.push((dir.clone(), e));
                    break;
                }
            };
            let path = entry.path();
            let ft = match entry.file_type() {
                Ok(ft) => ft,
                Err(e) => {
                    out.unreadable.push((dir.clone(), e));
                    break;
                }
            };
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if ft.is_dir() && !hidden {
                stack.push(path);
            } else if (ft.is_file() || ft.is_symlink()) && is_spec_file(&path) {
                out.files.push(path);
            }
        }
    }
    out.files.sort();
    Ok(out)
}

/// Kind of an object label `Kind/name`, for tests and messages.
pub fn kind_of_label(label: &str) -> Option<Kind> {
    label.split('/').next().and_then(Kind::parse)
}

/// Loads every path; returns the objects and one line per problem.
pub fn validate_paths(paths: &[PathBuf]) -> (Vec<Object>, Vec<String>) {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for p in paths {
        match spec_files(p) {
            Ok(files) => {
                for f in files {
                    let parsed = parse_file(&f);
                    problems.extend(parsed.diagnostics.iter().map(|d| d.to_string()));
                    objects.extend(parsed.objects);
                }
            }
            Err(e) => problems.push(format!("{}: cannot read: {e}", p.display())),
        }
    }
    for (dup, first) in duplicates(&objects) {
        problems.push(format!(
            "{}: {}: metadata.name: also declared at {}",
            dup.origin,
            dup.key(),
            first.origin
        ));
    }
    // Duplicates are reported above; cross-object checks see each object once (its first
    // declaration), so a problem is never placed at another object's location.
    let firsts: Vec<Object> = {
        let mut seen = std::collections::HashSet::new();
        objects
            .iter()
            .filter(|o| seen.insert(o.key()))
            .cloned()
            .collect()
    };
    for e in validate_set(&firsts) {
        let Some(obj) = firsts.iter().find(|o| o.key() == e.key) else {
            continue;
        };
        let (line, col) = locate_field(&obj.origin, &e.error.path);
        problems.push(format!(
            "{}:{line}:{col}: {}: {}: {}",
            obj.origin.file.display(),
            e.key,
            e.error.path,
            e.error.message
        ));
    }
    (objects, problems)
}
