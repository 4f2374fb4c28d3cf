//! Desired state from a watched directory of YAML/JSON files.
//!
//! - Every file is loaded on start, then `notify` reports changes; a change is read after a short
//!   debounce (editors write a file in several steps), well within the 200 ms users expect.
//! - A file that turns invalid keeps its objects at their last valid version: nothing it declared
//!   is deleted until it parses cleanly again (or is removed). Its problems are reported.
//! - An object declared in two files belongs to the one whose path sorts first, whichever was
//!   read first (a restart decides the same); the other is reported.
//! - An object that moves between files (a rename, a hand-over from a deleted duplicate) is
//!   applied with its new origin, never deleted and re-created: deletions are decided at the end
//!   of an update, once every file it touched has been read.
//! - A full rescan runs periodically, so an event lost by the OS costs latency, not correctness.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use poolkeeper_engine::{EngineHandle, SourceEvent};
use poolkeeper_kinds::validate::validate_set;
use poolkeeper_kinds::{ObjKey, Object};

use crate::DirError;
use crate::loader::{self, Diagnostic, STATE_DIR};

/// The folder, in the state folder, of each file's last valid copy (see
/// [`DirState::with_last_good`]).
pub const LAST_GOOD: &str = "last-good";

/// Why 20 ms: editors' save sequences (write temp, rename, chmod) finish within a few ms; the
/// whole pick-up stays far under the 200 ms budget.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// A file written to in place and not closed is read once no write came for this long (a
/// writer that keeps it open; see `DirState::writing`).
pub const WRITE_QUIET: Duration = Duration::from_secs(2);

#[derive(Default)]
struct FileState {
    /// The objects this file owns now (its last valid versions).
    owned: BTreeSet<ObjKey>,
    parse_diagnostics: Vec<Diagnostic>,
    /// Declares an object that another file already declares (re-read when files go away).
    shadowed: bool,
    /// The size at which it was last refused as too large: reading it again at that size (a
    /// second event of one write, a rescan) is not another refusal, counted and logged.
    refused_size: Option<u64>,
    /// What was last sent for this file (parse and cross-object problems).
    sent: Vec<Diagnostic>,
    /// The objects (`Kind/name`) that `sent` names: the engine marks them SpecValid=False until
    /// they are applied again.
    flagged: BTreeSet<String>,
    /// A digest of the text last kept as its last valid copy (see `DirState::with_last_good`).
    saved: Option<u64>,
}

/// Files whose text was just written by poolkeeper itself (claims made through the API), with
/// the objects that text declares: when the watcher reads such a file and finds that very
/// text, it takes these objects instead of parsing it again. Any other content is parsed as
/// usual, so a file changed in between is never mistaken for what was written.
#[derive(Clone, Default)]
pub struct Prepared(Arc<Mutex<HashMap<PathBuf, Written>>>);

/// A text as written, and the objects it declares.
type Written = (Vec<u8>, Vec<Object>);

/// Entries the watcher has not read back yet (their files removed meanwhile, say) are dropped
/// beyond this many: they only cost a parse.
const PREPARED_MAX: usize = 4096;

impl Prepared {
    /// `path` is about to hold `text`, which declares `objects`.
    pub fn put(&self, path: PathBuf, text: Vec<u8>, objects: Vec<Object>) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= PREPARED_MAX {
            m.clear();
        }
        m.insert(path, (text, objects));
    }

    pub fn forget(&self, path: &Path) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
    }

    /// The objects of `path` if `bytes` is the text that was put for it (taken once).
    fn take(&self, path: &Path, bytes: &[u8]) -> Option<Vec<Object>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (text, objects) = m.remove(path)?;
        (text == bytes).then_some(objects)
    }
}

/// The directory's view: which file declares what.
pub struct DirState {
    root: PathBuf,
    prepared: Prepared,
    files: BTreeMap<PathBuf, FileState>,
    objects: HashMap<ObjKey, (PathBuf, Object)>,
    /// Objects that a file let go of during the current update (removed, renamed away, or no
    /// longer declared). Deleted when the update ends unless another file declares them by then.
    released: BTreeMap<ObjKey, Object>,
    /// The largest spec file read.
    limit: loader::SpecLimit,
    /// Where each file's last valid text is kept (see [`DirState::with_last_good`]).
    last_good: Option<PathBuf>,
    /// Folders that could not be listed at the last rescan, with why: the files known under
    /// them are kept (what such a folder holds is unknown, not gone).
    unreadable: BTreeMap<PathBuf, String>,
    /// Files that an object was taken from during the current update (a file that sorts
    /// before them declared it too): read again when it ends, to report the duplicate.
    overtaken: BTreeSet<PathBuf>,
    /// Files being written in place (written to, and not closed since): what they hold is
    /// not read, by events or rescans, until the writer closes them or stops writing for
    /// [`WRITE_QUIET`]. Read half-written, a file declares only its first objects (or a field
    /// cut short), and the rest would be deleted (claims released) or changed.
    writing: BTreeMap<PathBuf, std::time::Instant>,
}

/// What a (re)load changed, in the order to tell the engine.
#[derive(Default, Debug)]
pub struct Changes {
    pub events: Vec<SourceEvent>,
}

impl DirState {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_prepared(root, Prepared::default())
    }

    pub fn with_prepared(root: impl Into<PathBuf>, prepared: Prepared) -> Self {
        DirState {
            root: root.into(),
            prepared,
            files: BTreeMap::new(),
            objects: HashMap::new(),
            released: BTreeMap::new(),
            limit: loader::SpecLimit::default(),
            last_good: None,
            unreadable: BTreeMap::new(),
            overtaken: BTreeSet::new(),
            writing: BTreeMap::new(),
        }
    }

    /// File `path` is being written (an event said so): not read until [`DirState::written`].
    pub fn writing(&mut self, path: &Path) {
        self.writing
            .insert(path.to_path_buf(), std::time::Instant::now());
    }

    /// File `path` was closed, renamed or removed: read again from now.
    pub fn written(&mut self, path: &Path) {
        self.writing.remove(path);
    }

    /// Files written to without a close for `quiet` or longer: taken for written (a writer that
    /// keeps its file open, or a close the OS did not report). They are read from now; their
    /// paths, to be read.
    pub fn quiet_for(&mut self, quiet: Duration) -> BTreeSet<PathBuf> {
        let done: BTreeSet<PathBuf> = self
            .writing
            .iter()
            .filter(|(_, at)| at.elapsed() >= quiet)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &done {
            self.writing.remove(p);
        }
        done
    }

    /// Keeps a copy of each file's last valid text under `dir` (in the state folder). A file
    /// that is invalid, unreadable, empty or in a folder that cannot be read when the
    /// controller starts declares what its copy declares, as a running controller keeps the
    /// last valid version of a file that turns invalid: a restart must not delete what the
    /// file declared (a claim released, a pool drained) because the file was being edited.
    /// Files poolkeeper writes itself (claims made through the API) are written whole, once,
    /// and get no copy.
    pub fn with_last_good(mut self, dir: PathBuf) -> Self {
        self.last_good = Some(dir);
        self
    }

    /// Where `file`'s last valid copy is kept, if it gets one.
    fn last_good_of(&self, file: &Path) -> Option<PathBuf> {
        let rel = file.strip_prefix(&self.root).ok()?;
        if rel.starts_with(crate::layout::MANAGED_CLAIMS) {
            return None;
        }
        Some(self.last_good.as_ref()?.join(rel))
    }

    /// `file`'s last valid copy, parsed (its origins name `file`, where the objects came from).
    fn read_last_good(&self, file: &Path) -> Option<loader::ParsedFile> {
        let copy = self.last_good_of(file)?;
        let bytes = std::fs::read(&copy).ok()?;
        let parsed = loader::parse_bytes(file, bytes);
        parsed.is_clean().then_some(parsed)
    }

    /// Keeps `bytes`, `file`'s valid text, as its last valid copy (written whole or not at all).
    fn save_last_good(&mut self, file: &Path, bytes: &[u8], digest: u64) {
        let Some(copy) = self.last_good_of(file) else {
            return;
        };
        let written = copy
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| crate::status::write_atomic(&copy, bytes));
        match written {
            Ok(()) => {
                if let Some(state) = self.files.get_mut(file) {
                    state.saved = Some(digest);
                }
            }
            Err(e) => {
                warn!(file = %file.display(), copy = %copy.display(), error = %e,
                    "cannot keep the file's last valid copy; a restart while it is invalid would not know what it declared");
            }
        }
    }

    /// `file` is gone for good: so is its last valid copy.
    fn forget_last_good(&self, file: &Path) {
        if let Some(copy) = self.last_good_of(file) {
            let _ = std::fs::remove_file(copy);
        }
    }

    /// Reads no spec file larger than `limit` (default: [`loader::SpecLimit::default`]).
    pub fn with_limit(mut self, limit: loader::SpecLimit) -> Self {
        self.limit = limit;
        self
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values().map(|(_, o)| o)
    }

    /// Reads every spec file under the root (and forgets files that are gone).
    pub fn rescan(&mut self) -> Changes {
        let mut changes = Changes::default();
        self.rescan_into(&mut changes);
        self.finish(&mut changes);
        changes
    }

    fn rescan_into(&mut self, changes: &mut Changes) {
        let listing = match loader::list_spec_files(&self.root) {
            Ok(l) => l,
            Err(e) => {
                warn!(dir = %self.root.display(), error = %e, "cannot list the directory");
                return;
            }
        };
        let unreadable: BTreeMap<PathBuf, String> = (listing.unreadable.into_iter())
            .map(|(dir, e)| (dir, e.to_string()))
            .collect();
        for (dir, e) in &unreadable {
            if !self.unreadable.contains_key(dir) {
                warn!(folder = %dir.display(), error = %e,
                    "cannot list a folder; the files known under it are kept as they are");
            }
        }
        self.unreadable = unreadable;
        let under_unreadable =
            |f: &Path, u: &BTreeMap<PathBuf, String>| u.keys().any(|dir| f.starts_with(dir));
        let found: BTreeSet<PathBuf> = listing.files.into_iter().collect();
        let known: Vec<PathBuf> = self.files.keys().cloned().collect();
        for f in known {
            if !found.contains(&f) && !under_unreadable(&f, &self.unreadable) {
                self.remove_file(&f, changes);
            }
        }
        for f in &found {
            // Being written: what it declared stays until it is written.
            if self.writing.contains_key(f) {
                continue;
            }
            self.load_file(f, changes);
        }
        self.prune_last_good(&found);
        // Files under a folder that cannot be read, never read since the start: what their
        // last valid copies declare.
        let dirs: Vec<PathBuf> = self.unreadable.keys().cloned().collect();
        for dir in dirs {
            for file in self.last_good_files_under(&dir) {
                if !self.files.contains_key(&file) {
                    let why = self.unreadable.get(&dir).cloned().unwrap_or_default();
                    let e = std::io::Error::other(format!(
                        "its folder {} cannot be listed: {why}",
                        dir.display()
                    ));
                    self.apply_read(&file, loader::unreadable(&file, &e), None, None, changes);
                }
            }
        }
    }

    /// Forgets the copies of files that are gone (deleted or renamed while the controller was
    /// down, say): a file made later under that name must not declare what they did. Files under
    /// a folder that cannot be listed are not known to be gone.
    fn prune_last_good(&self, found: &BTreeSet<PathBuf>) {
        for file in self.last_good_files_under(&self.root) {
            let unknown = self.unreadable.keys().any(|dir| file.starts_with(dir));
            if !found.contains(&file) && !unknown {
                self.forget_last_good(&file);
            }
        }
    }

    /// The files under `dir` that have a last valid copy.
    fn last_good_files_under(&self, dir: &Path) -> Vec<PathBuf> {
        let Some(copies) = self.last_good_of(dir) else {
            return Vec::new();
        };
        let Some(base) = self.last_good.clone() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut stack = vec![copies];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&base)
                    && loader::is_spec_file(&self.root.join(rel))
                {
                    out.push(self.root.join(rel));
                }
            }
        }
        out.sort();
        out
    }

    /// Ends an update: objects let go of pass to a file that declared them too, the rest are
    /// deleted; then the files' problems are reported.
    fn finish(&mut self, changes: &mut Changes) {
        for f in std::mem::take(&mut self.overtaken) {
            if self.files.contains_key(&f) {
                self.load_file(&f, changes);
            }
        }
        // Each round can only hand over objects released in the round before; it ends.
        let mut handled = 0;
        while self.released.len() > handled {
            handled = self.released.len();
            self.reclaim_shadowed(changes);
        }
        for (key, _) in std::mem::take(&mut self.released) {
            if !self.objects.contains_key(&key) {
                changes.events.push(SourceEvent::Delete(key));
            }
        }
        self.cross_check(changes);
    }

    /// Handles paths that an event named: files are (re)loaded or removed; folders rescanned.
    pub fn paths_changed(&mut self, paths: &BTreeSet<PathBuf>) -> Changes {
        let mut changes = Changes::default();
        let mut full = false;
        // Removals first, so that a file renamed to a name that sorts earlier takes its objects
        // over instead of being reported as a duplicate of its own old name.
        let mut loads = Vec::new();
        for p in paths {
            if p.components().any(|c| c.as_os_str() == STATE_DIR) {
                continue;
            }
            if p.is_dir() {
                full = true;
            } else if loader::is_spec_file(p) {
                if !self.listed(p) {
                    continue;
                }
                if p.exists() {
                    if self.writing.contains_key(p) {
                        continue;
                    }
                    loads.push(p);
                } else {
                    self.remove_file(p, &mut changes);
                }
            } else if !p.exists() {
                // A folder was removed or renamed away: drop the files we knew under it.
                let under: Vec<PathBuf> = self
                    .files
                    .keys()
                    .filter(|f| f.starts_with(p))
                    .cloned()
                    .collect();
                for f in under {
                    self.remove_file(&f, &mut changes);
                }
            }
        }
        for p in loads {
            self.load_file(p, &mut changes);
        }
        if full {
            self.rescan_into(&mut changes);
        }
        self.finish(&mut changes);
        changes
    }

    /// Whether a rescan lists `file`: not in a hidden folder, nor reached through a linked
    /// folder. Events name such files too (the OS reports what happens in hidden folders, and
    /// notify follows links); taken from an event and not from a rescan, their objects would
    /// come and go with each rescan.
    fn listed(&self, file: &Path) -> bool {
        let Ok(rel) = file.strip_prefix(&self.root) else {
            return false;
        };
        let mut dir = self.root.clone();
        for part in rel.parent().into_iter().flat_map(Path::components) {
            if part.as_os_str().to_string_lossy().starts_with('.') {
                return false;
            }
            dir.push(part);
            if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
                return false;
            }
        }
        true
    }

    fn remove_file(&mut self, file: &Path, changes: &mut Changes) {
        self.forget_last_good(file);
        let Some(state) = self.files.remove(file) else {
            return;
        };
        for key in state.owned {
            self.release(&key);
        }
        changes.events.push(SourceEvent::Diagnostics {
            file: file.to_path_buf(),
            diagnostics: Vec::new(),
        });
        info!(file = %file.display(), "file removed; its objects are deleted");
    }

    /// A file no longer declares `key`: deleted at the end of the update unless another file
    /// declares it by then.
    fn release(&mut self, key: &ObjKey) {
        if let Some((_, obj)) = self.objects.remove(key) {
            self.released.insert(key.clone(), obj);
        }
    }

    fn reclaim_shadowed(&mut self, changes: &mut Changes) {
        let files: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, s)| s.shadowed)
            .map(|(f, _)| f.clone())
            .collect();
        for f in files {
            self.load_file(&f, changes);
        }
    }

    fn load_file(&mut self, file: &Path, changes: &mut Changes) {
        let mut refused_size = None;
        // The text read, to keep as the last valid copy if it is valid and not kept yet.
        let mut keep = None;
        let parsed = match loader::read_spec(file, self.limit.max_bytes) {
            loader::Read::Bytes(bytes) => match self.prepared.take(file, &bytes) {
                Some(objects) => loader::ParsedFile {
                    objects,
                    diagnostics: Vec::new(),
                },
                None if bytes.is_empty() && self.holds_objects(file) => {
                    // Truncated, to be written again (`cmd > file`, an editor's save): no
                    // way to delete what it declares (deleting the file is).
                    loader::being_written(file)
                }
                None => {
                    let digest = digest_of(&bytes);
                    let saved = self.files.get(file).and_then(|s| s.saved);
                    if saved != Some(digest) && self.last_good_of(file).is_some() {
                        keep = Some((bytes.clone(), digest));
                    }
                    loader::parse_bytes(file, bytes)
                }
            },
            loader::Read::TooLarge(size) => {
                refused_size = Some(size);
                let again = self
                    .files
                    .get(file)
                    .is_some_and(|s| s.refused_size == Some(size));
                if !again {
                    self.limit
                        .refusals
                        .count(poolkeeper_engine::limits::Refusal::SpecFileTooLarge);
                    warn!(file = %file.display(), size, max = self.limit.max_bytes,
                        "a spec file over the largest size is not read");
                }
                loader::too_large(file, size, self.limit.max_bytes)
            }
            loader::Read::Failed(e) => loader::unreadable(file, &e),
        };
        self.apply_read(file, parsed, refused_size, keep, changes);
    }

    /// Whether `file` declares objects now, or declared some when a copy of it was last kept.
    fn holds_objects(&self, file: &Path) -> bool {
        match self.files.get(file) {
            Some(s) => !s.owned.is_empty(),
            None => self
                .read_last_good(file)
                .is_some_and(|p| !p.objects.is_empty()),
        }
    }

    /// Takes what `file` declares now. Read for the first time since the start and not valid:
    /// first what its last valid copy declares, so that its problems keep those objects as a
    /// running controller would have kept them.
    fn apply_read(
        &mut self,
        file: &Path,
        mut parsed: loader::ParsedFile,
        refused_size: Option<u64>,
        keep: Option<(Vec<u8>, u64)>,
        changes: &mut Changes,
    ) {
        if !parsed.is_clean()
            && !self.files.contains_key(file)
            && let Some(good) = self.read_last_good(file)
        {
            info!(file = %file.display(), "not valid at the start: what its last valid copy declares is kept");
            self.take_parsed(file, good, None, changes);
            parsed.diagnostics.push(loader::kept_from_last_good(file));
        }
        let clean = parsed.is_clean();
        self.take_parsed(file, parsed, refused_size, changes);
        if clean && let Some((bytes, digest)) = keep {
            self.save_last_good(file, &bytes, digest);
        }
    }

    fn take_parsed(
        &mut self,
        file: &Path,
        parsed: loader::ParsedFile,
        refused_size: Option<u64>,
        changes: &mut Changes,
    ) {
        let mut diagnostics = parsed.diagnostics.clone();
        let clean = parsed.is_clean();
        let mut now_owned = BTreeSet::new();
        let mut shadowed = false;
        // Declared twice in this file: the first is used, as `validate` says (taking each in
        // turn would apply both at every read, a claim moving back and forth).
        let mut here: HashMap<ObjKey, String> = HashMap::new();
        for mut obj in parsed.objects {
            let key = obj.key();
            if let Some(first) = here.get(&key) {
                diagnostics.push(declared_before(file, &obj, first));
                continue;
            }
            here.insert(key.clone(), obj.origin.to_string());
            // Declared in another file too: the file whose path sorts first has it, whichever
            // was read first, so that a restart (which reads them in that order) decides the
            // same.
            if let Some((owner, prev)) = self.objects.get(&key)
                && owner != file
            {
                if owner.as_path() < file {
                    diagnostics.push(declared_before(file, &obj, &prev.origin));
                    shadowed = true;
                    continue;
                }
                let owner = owner.clone();
                info!(object = %key, from = %owner.display(), to = %file.display(),
                    "declared in a file that sorts first: taken over by it");
                if let Some(st) = self.files.get_mut(&owner) {
                    st.owned.remove(&key);
                }
                self.overtaken.insert(owner);
            }
            now_owned.insert(key.clone());
            let current = self.objects.get(&key).map(|(_, p)| p);
            // An object let go of earlier in this update (moving between files) keeps counting
            // its generations.
            let prev = current.or_else(|| self.released.get(&key));
            obj.generation = match prev {
                Some(p) if p.spec == obj.spec => p.generation,
                Some(p) => p.generation + 1,
                None => 1,
            };
            let unchanged = current.is_some_and(|p| p.spec == obj.spec && p.origin == obj.origin);
            if !unchanged {
                self.objects
                    .insert(key.clone(), (file.to_path_buf(), obj.clone()));
                changes.events.push(SourceEvent::Apply(obj));
            }
        }
        let state = self.files.entry(file.to_path_buf()).or_default();
        let before: Vec<ObjKey> = state.owned.iter().cloned().collect();
        for key in before {
            if now_owned.contains(&key) {
                continue;
            }
            if clean {
                state.owned.remove(&key);
                // As `release` (split borrows: `state` lives in `self.files`).
                if let Some((_, obj)) = self.objects.remove(&key) {
                    self.released.insert(key, obj);
                }
            } else {
                // Invalid file: keep the last valid version of what it declared.
                debug!(%key, "kept at its last valid version");
            }
        }
        state.owned.extend(now_owned);
        state.parse_diagnostics = diagnostics;
        state.shadowed = shadowed;
        state.refused_size = refused_size;
    }

    /// Cross-object checks (overlapping host ports) are reported on the files that declare
    /// the objects; references to missing pools and users become claim conditions instead.
    fn cross_check(&mut self, changes: &mut Changes) {
        let set_errors = validate_set(self.objects.values().map(|(_, o)| o));
        let mut per_file: BTreeMap<PathBuf, Vec<Diagnostic>> = BTreeMap::new();
        for e in set_errors {
            if !e.error.path.starts_with("spec.hostPorts")
                && !e.error.path.starts_with("spec.containers")
            {
                continue;
            }
            if let Some((file, obj)) = self.objects.get(&e.key) {
                per_file.entry(file.clone()).or_default().push(Diagnostic {
                    file: file.clone(),
                    line: obj.origin.line,
                    col: obj.origin.col,
                    object: Some(e.key.to_string()),
                    path: e.error.path,
                    message: e.error.message,
                });
            }
        }
        let mut cleared = Vec::new();
        for (file, state) in self.files.iter_mut() {
            let mut all = state.parse_diagnostics.clone();
            all.extend(per_file.remove(file).unwrap_or_default());
            if all != state.sent {
                let named: BTreeSet<String> = all.iter().filter_map(|d| d.object.clone()).collect();
                cleared.extend(state.flagged.difference(&named).cloned());
                state.flagged = named;
                state.sent = all.clone();
                changes.events.push(SourceEvent::Diagnostics {
                    file: file.clone(),
                    diagnostics: all,
                });
            }
        }
        // An object no longer named by any problem is applied again, even when its text went
        // back to the last valid version: the engine clears SpecValid=False on apply.
        for label in cleared {
            let key = label
                .split_once('/')
                .and_then(|(k, n)| Some(ObjKey::new(poolkeeper_kinds::Kind::parse(k)?, n)));
            if let Some((_, obj)) = key.and_then(|k| self.objects.get(&k)) {
                changes.events.push(SourceEvent::Apply(obj.clone()));
            }
        }
    }
}

/// `obj`, in `file`, is declared at `first` too, which is used. Not tied to the object
/// (`object: None`): the object in use is valid, and the engine would mark it SpecValid=False.
/// The text keeps the usual shape.
fn declared_before(file: &Path, obj: &Object, first: &dyn std::fmt::Display) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line: obj.origin.line,
        col: obj.origin.col,
        object: None,
        path: String::new(),
        message: format!(
            "{}: metadata.name: also declared in {first}; that one is used",
            obj.key()
        ),
    }
}

/// A digest of a file's text, to tell whether its last valid copy is up to date.
fn digest_of(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Loads `root`, tells the engine, then watches until the engine stops.
/// Returns after the initial load has been handed to the engine; the watch runs in a task.
/// `prepared`: texts the API writes (see [`Prepared`]).
pub async fn run(
    root: PathBuf,
    engine: EngineHandle,
    rescan_every: Duration,
    prepared: Prepared,
    limit: loader::SpecLimit,
) -> Result<tokio::task::JoinHandle<()>, DirError> {
    let root = std::fs::canonicalize(&root).map_err(|source| DirError::Open {
        dir: root.clone(),
        source,
    })?;
    let watch_error = |source| DirError::Watch {
        dir: root.clone(),
        source,
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    // Linked folders are not followed (a rescan does not read them either): a link to a folder
    // in the directory gave it a second watch sharing the first's, whose events then named the
    // link (and were dropped) and which went with the link; a link loop watched the state
    // folder.
    let mut watcher = notify::RecommendedWatcher::new(
        move |res| {
            let _ = tx.send(res);
        },
        notify::Config::default().with_follow_symlinks(false),
    )
    .map_err(watch_error)?;
    // The state folder (status, store, instances' files folders) is not watched: it changes all
    // the time and holds nothing to load. So the root is watched alone, and each folder in it
    // but that one recursively.
    watcher
        .watch(&root, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    let mut watched = BTreeSet::new();
    watch_folders(&mut watcher, &root, &mut watched);
    // Nothing known is better than everything deleted: a directory that cannot be listed is an
    // error at the start (at run time a failed listing changes nothing).
    loader::list_spec_files(&root).map_err(|source| DirError::Open {
        dir: root.clone(),
        source,
    })?;
    let mut state = DirState::with_prepared(root.clone(), prepared)
        .with_limit(limit)
        .with_last_good(root.join(STATE_DIR).join(LAST_GOOD));
    let initial = state.rescan();
    let objects = state.objects.len();
    for ev in initial.events {
        engine.send(ev)?;
    }
    engine.send(SourceEvent::Synced)?;
    info!(dir = %root.display(), objects, "directory loaded; watching for changes");
    let task = tokio::spawn(async move {
        // The watcher lives as long as this task.
        let mut watcher = watcher;
        let mut rescan = tokio::time::interval(rescan_every);
        rescan.tick().await;
        // Files being written that went quiet are read at this pace.
        let mut quiet = tokio::time::interval(WRITE_QUIET / 4);
        quiet.tick().await;
        loop {
            let mut paths = BTreeSet::new();
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    collect(ev, &mut paths, &root, &mut state);
                    // Debounce: take what else arrives shortly after.
                    let deadline = tokio::time::sleep(DEBOUNCE);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            more = rx.recv() => match more {
                                Some(ev) => collect(ev, &mut paths, &root, &mut state),
                                None => break,
                            },
                        }
                    }
                    // A new folder is watched before it is read, so that nothing written into it
                    // is missed (the folder's own event makes `paths_changed` rescan).
                    // (A folder removed and made again under the same name needs a new watch.)
                    let new_folders: Vec<&PathBuf> = paths
                        .iter()
                        .filter(|p| p.parent() == Some(root.as_path()) && is_real_dir(p))
                        .collect();
                    if !new_folders.is_empty() {
                        for p in new_folders {
                            watched.remove(p);
                        }
                        watch_folders(&mut watcher, &root, &mut watched);
                    }
                    let changes = state.paths_changed(&paths);
                    if send_all(&engine, changes).is_err() { break; }
                }
                _ = rescan.tick() => {
                    watch_folders(&mut watcher, &root, &mut watched);
                    let changes = state.rescan();
                    if send_all(&engine, changes).is_err() { break; }
                }
                _ = quiet.tick() => {
                    let done = state.quiet_for(WRITE_QUIET);
                    if !done.is_empty() {
                        let changes = state.paths_changed(&done);
                        if send_all(&engine, changes).is_err() { break; }
                    }
                }
            }
        }
    });
    Ok(task)
}

/// Watches, recursively, every folder directly in `root` except the state folder that is not
/// watched yet; forgets folders that are gone (their watches went with them).
fn watch_folders(watcher: &mut impl Watcher, root: &Path, watched: &mut BTreeSet<PathBuf>) {
    watched.retain(|p| is_real_dir(p));
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        // Hidden folders (the state folder, `.git`) hold nothing to load: their changes are not
        // watched (a rescan does not read them either).
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        // A link to a folder is not one (not followed; see `run`).
        let folder = e.file_type().is_ok_and(|t| t.is_dir());
        if hidden || !folder || watched.contains(&path) {
            continue;
        }
        match watcher.watch(&path, RecursiveMode::Recursive) {
            Ok(()) => {
                watched.insert(path);
            }
            Err(e) => {
                warn!(folder = %path.display(), error = %e, "cannot watch; the periodic rescan will catch up");
            }
        }
    }
}

/// A folder, not a link to one.
fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

fn collect(
    ev: notify::Result<notify::Event>,
    paths: &mut BTreeSet<PathBuf>,
    root: &Path,
    state: &mut DirState,
) {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
    match ev {
        // The OS dropped events (its queue overflowed): anything may have changed. The root
        // named as changed rescans it all (see `paths_changed`).
        Ok(ev) if ev.need_rescan() => {
            warn!("the OS dropped file events; rescanning the directory");
            paths.insert(root.to_path_buf());
        }
        // Written in place: read once closed (or quiet), not half-written.
        Ok(ev)
            if matches!(
                ev.kind,
                EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_))
            ) =>
        {
            for p in ev.paths {
                state.writing(&p);
                paths.insert(p);
            }
        }
        // Closed after writing, renamed, removed: whole (or gone) now.
        Ok(ev)
            if matches!(
                ev.kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Modify(ModifyKind::Name(_))
                    | EventKind::Remove(_)
            ) =>
        {
            for p in ev.paths {
                state.written(&p);
                paths.insert(p);
            }
        }
        // Reading a file or opening a folder (to sync it) changes nothing.
        Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => {}
        Ok(ev) => paths.extend(ev.paths),
        Err(e) => warn!(error = %e, "watch error; the periodic rescan will catch up"),
    }
}

fn send_all(engine: &EngineHandle, changes: Changes) -> Result<(), poolkeeper_engine::EngineError> {
    for ev in changes.events {
        engine.send(ev)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_the_os_dropped_rescan_the_whole_directory() {
        let root = Path::new("/specs");
        let mut st = DirState::new(root);
        let mut paths = BTreeSet::new();
        let overflow =
            notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan);
        collect(Ok(overflow), &mut paths, root, &mut st);
        assert_eq!(paths, BTreeSet::from([root.to_path_buf()]));
        // A read changes nothing; a write names its file.
        let mut paths = BTreeSet::new();
        let read = notify::Event::new(notify::EventKind::Access(notify::event::AccessKind::Any))
            .add_path(root.join("a.yaml"));
        collect(Ok(read), &mut paths, root, &mut st);
        assert!(paths.is_empty());
    }

    #[test]
    fn a_write_marks_its_file_being_written_until_its_close_or_rename() {
        use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
        let root = Path::new("/specs");
        let a = root.join("a.yaml");
        let mut st = DirState::new(root);
        let mut paths = BTreeSet::new();
        let ev = |kind| notify::Event::new(kind).add_path(a.clone());
        collect(
            Ok(ev(notify::EventKind::Modify(ModifyKind::Data(
                notify::event::DataChange::Any,
            )))),
            &mut paths,
            root,
            &mut st,
        );
        assert!(st.writing.contains_key(&a) && paths.contains(&a));
        collect(
            Ok(ev(notify::EventKind::Access(AccessKind::Close(
                AccessMode::Write,
            )))),
            &mut paths,
            root,
            &mut st,
        );
        assert!(!st.writing.contains_key(&a));
        st.writing(&a);
        collect(
            Ok(ev(notify::EventKind::Modify(ModifyKind::Name(
                RenameMode::To,
            )))),
            &mut paths,
            root,
            &mut st,
        );
        assert!(!st.writing.contains_key(&a));
    }
}
