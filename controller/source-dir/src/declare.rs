//! People's changes to declared state, made in the folder ([`Declare`] for the directory
//! source):
//!
//! - Claims made through the API (or a webhook) are files like any other spec,
//!   `DIR/managed/claims/NAME.yaml`, written durably, picked up by the watcher, kept across
//!   restarts and visible to `get`. Releasing one removes its file; a claim declared in a
//!   person's own file is released there.
//! - Admin operations edit the file that declares the object (a pool's `warm`, a user's or a
//!   claim's document removed), keeping the rest of the file as it was.
//! - Records (reservations, webhook signatures seen) live in `DIR/.poolkeeper/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use tracing::info;

use poolkeeper_engine::source::{
    BoxFuture, Created, Declare, DeclareError, Record, Records, Scaled, UserDeleted,
};
use poolkeeper_engine::status::{ObjectView, Snapshot};
use poolkeeper_engine::{Creation, EngineHandle};
use poolkeeper_kinds::{ClaimSpec, Kind, ObjKey, Object, Origin, Spec, UserSpec};

use crate::edit;
use crate::filewriter::{self, FileWriter};
use crate::layout::{
    MANAGED_CLAIMS, managed_dir, managed_file, managed_group_file, managed_user_file, state_dir,
};
use crate::watch::Prepared;

/// The directory source's [`Declare`] (and [`Records`]).
pub struct DirDeclare {
    handle: EngineHandle,
    /// The watched folder, canonical (as the watcher names files: origins are compared).
    dir: PathBuf,
    /// Claim files are written and removed through it (folder syncs in groups).
    files: FileWriter,
    /// Edits of declared files (admin operations) one at a time.
    edits: tokio::sync::Mutex<()>,
    /// Claim files written here, for the watcher to take without parsing them again.
    prepared: Prepared,
}

impl DirDeclare {
    /// `prepared` is shared with the watcher (see [`Prepared`]).
    pub fn new(handle: EngineHandle, dir: &Path, prepared: Prepared) -> std::io::Result<Self> {
        Ok(DirDeclare {
            handle,
            dir: std::fs::canonicalize(dir)?,
            files: FileWriter::new()?,
            edits: tokio::sync::Mutex::new(()),
            prepared,
        })
    }

    async fn snapshot(&self) -> Result<Snapshot, DeclareError> {
        self.handle
            .snapshot()
            .await
            .map_err(|_| DeclareError::Stopped)
    }

    /// Removes the file of a claim made through the API (durably), and what the watcher was to
    /// take from it: whether it was there.
    async fn remove_claim_file(&self, path: &Path) -> std::io::Result<bool> {
        self.prepared.forget(path);
        self.files.remove_if_present(path.to_path_buf()).await
    }

    /// A declared object's file, which must lie in the watched folder.
    fn declared_file(&self, o: &ObjectView) -> Result<PathBuf, DeclareError> {
        let file = o.origin.file.clone();
        if file.as_os_str().is_empty() || !file.starts_with(&self.dir) {
            return Err(DeclareError::Conflict(format!(
                "{:?} {} is not declared in a file of the watched folder",
                o.kind, o.name
            )));
        }
        Ok(file)
    }

    fn relative(&self, file: &Path) -> String {
        file.strip_prefix(&self.dir)
            .unwrap_or(file)
            .display()
            .to_string()
    }

    /// Edits `file`: `edit` gets its text and returns the new text (None: the file goes). The
    /// new text is written atomically where the file lives (a link stays a link), and only if
    /// the file still holds the text `edit` got: an edit saved by hand meanwhile is read and
    /// `edit` made again on it, up to [`EDIT_ATTEMPTS`] times, then it is a conflict. (Callers
    /// hold `edits`: the controller makes one edit at a time.)
    async fn rewrite(
        &self,
        file: &Path,
        edit: impl Fn(&str) -> Result<edit::Edited, DeclareError>,
    ) -> Result<(), DeclareError> {
        let target = std::fs::canonicalize(file)
            .map_err(|e| declare_failed(&format!("reading {}", file.display()), &e))?;
        for _ in 0..EDIT_ATTEMPTS {
            let text = read_declared(file)?;
            let written = match edit(&text)? {
                Some(new) => {
                    (self.files)
                        .write_unless_changed(target.clone(), new.into_bytes(), text.into_bytes())
                        .await
                }
                None => {
                    (self.files)
                        .remove_unless_changed(file.to_path_buf(), text.into_bytes())
                        .await
                }
            };
            match written {
                Err(e) if filewriter::changed_meanwhile(&e) => {
                    info!(file = %file.display(), "changed by hand while being edited: edited again");
                }
                other => return other.map_err(|e| changing(file, e)),
            }
        }
        Err(DeclareError::Conflict(format!(
            "{} kept changing while it was being edited: nothing was changed; try again",
            file.display()
        )))
    }

    /// Edits the file that declares object `name` of `kind` (one edit at a time): `edit` gets
    /// the file and its text and returns the new text, which is written as
    /// [`DirDeclare::rewrite`] says. Returns where that is (relative to the watched folder)
    /// and the object as it was.
    async fn edit_declared(
        &self,
        kind: Kind,
        name: &str,
        edit: impl Fn(&Path, &str) -> Result<String, String>,
    ) -> Result<(String, ObjectView), DeclareError> {
        let _one = self.edits.lock().await;
        let snap = self.snapshot().await?;
        let o = snap
            .objects
            .into_iter()
            .find(|o| o.kind == kind && o.name == name && !o.spec.is_null())
            .ok_or_else(|| DeclareError::NotFound(format!("no {kind} {name:?}")))?;
        let file = self.declared_file(&o)?;
        self.rewrite(&file, |text| {
            edit(&file, text).map(Some).map_err(DeclareError::Conflict)
        })
        .await?;
        Ok((self.relative(&file), o))
    }

    /// Writes a file of the managed folders atomically (a crash leaves it whole or absent),
    /// making its folder if need be: where it is, relative to the watched folder.
    async fn write_managed(
        &self,
        path: &Path,
        text: String,
        what: &str,
    ) -> Result<String, DeclareError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| declare_failed(&format!("creating {}", parent.display()), &e))?;
        }
        self.files
            .write(path.to_path_buf(), text.into_bytes())
            .await
            .map_err(|e| declare_failed(what, &e))?;
        Ok(self.relative(path))
    }

    /// Releases every claim of `user` in `snap`: API claims lose their files, claims declared
    /// in other files lose their documents (the rest of each file is kept).
    async fn release_claims_in(
        &self,
        snap: &Snapshot,
        user: &str,
    ) -> Result<Vec<String>, DeclareError> {
        let managed = managed_dir(&self.dir);
        let mut by_file: BTreeMap<PathBuf, Vec<&ObjectView>> = BTreeMap::new();
        for o in snap.claims_of(user) {
            by_file.entry(self.declared_file(o)?).or_default().push(o);
        }
        let mut released = Vec::new();
        for (file, claims) in by_file {
            if file.parent() == Some(managed.as_path()) {
                self.remove_claim_file(&file)
                    .await
                    .map_err(|e| changing(&file, e))?;
            } else {
                self.rewrite(&file, |text| {
                    let mut text = Some(text.to_owned());
                    for c in &claims {
                        let Some(t) = &text else { break };
                        text = edit::remove_object(&file, t, &ObjKey::new(Kind::Claim, &c.name))
                            .map_err(DeclareError::Conflict)?;
                    }
                    Ok(text)
                })
                .await?;
            }
            for c in claims {
                let _ = self.handle.delete(ObjKey::new(Kind::Claim, &c.name));
                released.push(c.name.clone());
            }
        }
        released.sort();
        Ok(released)
    }

    fn record_path(&self, key: &str) -> Result<PathBuf, std::io::Error> {
        let rel = Path::new(key);
        if !poolkeeper_core::files::is_plain_relative(rel) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{key:?} is not a plain relative record key"),
            ));
        }
        Ok(state_dir(&self.dir).join(rel))
    }
}

impl Declare for DirDeclare {
    fn create_claim<'a>(
        &'a self,
        name: &'a str,
        spec: ClaimSpec,
        record: Option<Record>,
    ) -> BoxFuture<'a, Result<Created, DeclareError>> {
        Box::pin(async move {
            let path = managed_file(&self.dir, name);
            let text = claim_file_text(name, &spec).map_err(DeclareError::Failed)?;
            let claim = Object {
                name: name.to_owned(),
                spec: Spec::Claim(spec),
                origin: claim_file_origin(&path),
                generation: 1,
            };
            match self
                .handle
                .create_claim(claim.clone())
                .await
                .map_err(|_| DeclareError::Stopped)?
            {
                Creation::Created => {}
                Creation::Exists(brief) => return Ok(Created::Exists(brief)),
                Creation::Refused(reason, message) => {
                    return Ok(Created::Refused(reason, message));
                }
            }
            let text = text.into_bytes();
            self.prepared.put(path.clone(), text.clone(), vec![claim]);
            // The record before the claim's file: a crash between the two leaves a record
            // without a claim (harmless), never a claim whose record is missing.
            let written = match &record {
                Some(r) => self
                    .record_path(&r.key)
                    .and_then(|p| filewriter::write_now(&p, &r.bytes)),
                None => Ok(()),
            };
            let written = match written {
                Ok(()) => self.files.create(path.clone(), text).await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                self.prepared.forget(&path);
                let _ = self.handle.delete(ObjKey::new(Kind::Claim, name));
                // A file of that name that holds no claim (one that does not load, say) is
                // someone's to look at: it is left as it is.
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    return Err(DeclareError::Conflict(format!(
                        "{} exists but holds no claim {name} that loaded: fix or remove it",
                        path.display()
                    )));
                }
                if path.exists() {
                    let _ = self.files.remove(path.clone()).await;
                }
                return Err(declare_failed("writing the claim", &e));
            }
            Ok(Created::New {
                at: format!("{MANAGED_CLAIMS}/{name}.yaml"),
            })
        })
    }

    fn made_here(&self, name: &str, origin: &Origin) -> bool {
        origin.file == managed_file(&self.dir, name)
    }

    fn is_recorded(&self, name: &str) -> bool {
        managed_file(&self.dir, name).exists()
    }

    fn delete_claim<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, DeclareError>> {
        Box::pin(async move {
            let path = managed_file(&self.dir, name);
            let existed = self
                .remove_claim_file(&path)
                .await
                .map_err(|e| DeclareError::Failed(format!("removing the claim: {e}")))?;
            // Not there: released by an earlier call the watcher has not reported yet, which
            // told the engine already.
            if existed {
                let _ = self.handle.delete(ObjKey::new(Kind::Claim, name));
            }
            Ok(existed)
        })
    }

    /// Sets the pool's `spec.warm` in the file that declares it (the declared spec, not just
    /// the running state); the watcher applies it like any other edit.
    fn scale_pool<'a>(
        &'a self,
        name: &'a str,
        warm: u32,
    ) -> BoxFuture<'a, Result<Scaled, DeclareError>> {
        Box::pin(async move {
            let (at, pool) = self
                .edit_declared(Kind::Pool, name, |file, text| {
                    edit::scale_pool(file, text, name, warm)
                })
                .await?;
            Ok(Scaled {
                was: pool.spec.get("warm").and_then(Value::as_u64),
                at,
            })
        })
    }

    fn release_claims_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, DeclareError>> {
        Box::pin(async move {
            let _one = self.edits.lock().await;
            let snap = self.snapshot().await?;
            find_user(&snap, user)?;
            self.release_claims_in(&snap, user).await
        })
    }

    /// The user's claims are released, then the user's document is removed from the file that
    /// declares it.
    fn delete_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<UserDeleted, DeclareError>> {
        Box::pin(async move {
            let _one = self.edits.lock().await;
            let snap = self.snapshot().await?;
            let user = find_user(&snap, name)?;
            let file = self.declared_file(user)?;
            // Checked before any claim is released: a user who cannot be removed keeps
            // everything.
            let text = read_declared(&file)?;
            let key = ObjKey::new(Kind::User, name);
            edit::remove_object(&file, &text, &key).map_err(DeclareError::Conflict)?;
            let released = self.release_claims_in(&snap, name).await?;
            // Read again: releasing claims may have edited the same file.
            self.rewrite(&file, |text| {
                edit::remove_object(&file, text, &key).map_err(DeclareError::Conflict)
            })
            .await?;
            let _ = self.handle.delete(key);
            Ok(UserDeleted {
                at: self.relative(&file),
                released,
            })
        })
    }

    /// Writes `DIR/managed/users/NAME.yaml` (atomically, never over an existing file) and applies
    /// the user at once, so that who registered can sign in before the watcher reads the file.
    fn create_user<'a>(
        &'a self,
        name: &'a str,
        spec: UserSpec,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            let _one = self.edits.lock().await;
            let snap = self.snapshot().await?;
            if find_user(&snap, name).is_ok() {
                return Err(DeclareError::Conflict(format!("a User {name:?} exists")));
            }
            let path = managed_user_file(&self.dir, name);
            let text = object_file_text("User", name, &spec).map_err(DeclareError::Failed)?;
            // The edits lock keeps two registrations of one name apart.
            if path.exists() {
                return Err(DeclareError::Conflict(format!(
                    "{} exists: a User {name:?} is declared there",
                    path.display()
                )));
            }
            let at = self.write_managed(&path, text, "writing the user").await?;
            let _ = self.handle.apply(Object {
                name: name.to_owned(),
                spec: Spec::User(spec),
                origin: claim_file_origin(&path),
                generation: 1,
            });
            Ok(at)
        })
    }

    /// Sets `spec.passwordHash` in the file that declares the user (the rest of it kept).
    fn set_password<'a>(
        &'a self,
        name: &'a str,
        hash: &'a str,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            self.edit_declared(Kind::User, name, |file, text| {
                edit::set_password(file, text, name, hash)
            })
            .await
            .map(|(at, _)| at)
        })
    }

    /// Sets `spec.disabled` in the file that declares the user (the rest of it kept).
    fn set_user_disabled<'a>(
        &'a self,
        name: &'a str,
        disabled: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            self.edit_declared(Kind::User, name, |file, text| {
                edit::set_disabled(file, text, name, disabled)
            })
            .await
            .map(|(at, _)| at)
        })
    }

    /// Sets the container's `stopped` in the file that declares the deployment.
    fn set_container_stopped<'a>(
        &'a self,
        deployment: &'a str,
        container: &'a str,
        stopped: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            self.edit_declared(Kind::Deployment, deployment, |file, text| {
                edit::set_container_stopped(file, text, deployment, container, stopped)
            })
            .await
            .map(|(at, _)| at)
        })
    }

    /// Writes `DIR/managed/flows/GROUP.yaml` (atomically) with the group's objects, replacing
    /// what it held; the watcher applies the difference like any other edit.
    fn declare_group<'a>(
        &'a self,
        group: &'a str,
        objects: Vec<Object>,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            let _one = self.edits.lock().await;
            let path = managed_group_file(&self.dir, group);
            let snap = self.snapshot().await?;
            for o in &objects {
                let kind = o.spec.kind();
                if let Some(other) = snap.objects.iter().find(|v| {
                    v.kind == kind && v.name == o.name && !v.origin.file.as_os_str().is_empty()
                }) && other.origin.file != path
                {
                    return Err(DeclareError::Conflict(format!(
                        "{kind} {} is declared in {} already",
                        o.name,
                        self.relative(&other.origin.file)
                    )));
                }
            }
            let mut text = format!(
                "# Declared by the web console: the example flow {group}. Stopping it there removes this file.\n"
            );
            for (i, o) in objects.iter().enumerate() {
                if i > 0 {
                    text.push_str("---\n");
                }
                let doc = object_file_text(&o.spec.kind().to_string(), &o.name, &o.spec.to_json())
                    .map_err(DeclareError::Failed)?;
                text.push_str(&doc);
            }
            self.write_managed(&path, text, "writing the flow").await
        })
    }

    /// Removes `DIR/managed/flows/GROUP.yaml`: the watcher deletes its objects.
    fn remove_group<'a>(
        &'a self,
        group: &'a str,
        _objects: Vec<ObjKey>,
    ) -> BoxFuture<'a, Result<bool, DeclareError>> {
        Box::pin(async move {
            let _one = self.edits.lock().await;
            let path = managed_group_file(&self.dir, group);
            self.files
                .remove_if_present(path.clone())
                .await
                .map_err(|e| changing(&path, e))
        })
    }

    fn records(&self) -> &dyn Records {
        self
    }
}

/// Records are files under `DIR/.poolkeeper/`, the key their relative path.
impl Records for DirDeclare {
    fn get(&self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.record_path(key)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let path = self.record_path(key)?;
            self.files.write(path, bytes).await
        })
    }

    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<bool>> {
        Box::pin(async move {
            let path = self.record_path(key)?;
            self.files.remove_if_present(path).await
        })
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        let Ok(folder) = self.record_path(prefix.trim_end_matches('/')) else {
            return Vec::new();
        };
        std::fs::read_dir(folder)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    fn location(&self, key: &str) -> String {
        self.record_path(key)
            .map_or_else(|_| key.to_owned(), |p| p.display().to_string())
    }
}

/// Removes what a crash left of the API's claim files while they were being created: never
/// acknowledged, so removed before the folder is read. Returns the files removed.
pub fn remove_unfinished_claims(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    filewriter::remove_unfinished(&managed_dir(dir))
}

/// How many times [`DirDeclare::rewrite`] makes an edit again on a file changed meanwhile.
const EDIT_ATTEMPTS: usize = 3;

fn changing(file: &Path, e: std::io::Error) -> DeclareError {
    declare_failed(&format!("changing {}", file.display()), &e)
}

fn read_declared(file: &Path) -> Result<String, DeclareError> {
    std::fs::read_to_string(file)
        .map_err(|e| DeclareError::Conflict(format!("reading {}: {e}", file.display())))
}

fn find_user<'a>(snap: &'a Snapshot, name: &str) -> Result<&'a ObjectView, DeclareError> {
    snap.objects
        .iter()
        .find(|o| o.kind == Kind::User && o.name == name)
        .ok_or_else(|| DeclareError::NotFound(format!("no User {name:?}")))
}

/// The text of a claim's file.
pub fn claim_file_text(name: &str, spec: &ClaimSpec) -> Result<String, String> {
    object_file_text("Claim", name, spec)
}

/// The text of a file declaring one object.
fn object_file_text<S: Serialize>(kind: &str, name: &str, spec: &S) -> Result<String, String> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc<'a, S> {
        api_version: &'a str,
        kind: &'a str,
        metadata: BTreeMap<&'a str, &'a str>,
        spec: &'a S,
    }
    let doc = Doc {
        api_version: poolkeeper_kinds::API_VERSION,
        kind,
        metadata: BTreeMap::from([("name", name)]),
        spec,
    };
    serde_saphyr::to_string(&doc).map_err(|e| e.to_string())
}

/// Where a claim file's one document starts, as the loader reports it: the claim applied
/// from the API and the one the watcher then reads are the same object.
pub fn claim_file_origin(path: &Path) -> Origin {
    Origin {
        file: path.to_path_buf(),
        line: 1,
        col: 1,
    }
}

/// A failed write as the API reports it: for want of space (507, retry once there is room),
/// or otherwise.
pub(crate) fn declare_failed(what: &str, e: &std::io::Error) -> DeclareError {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    if matches!(e.kind(), StorageFull | QuotaExceeded) {
        DeclareError::NoSpace(format!(
            "{what}: {e} (nothing was changed; the same request succeeds once there is room)"
        ))
    } else {
        DeclareError::Failed(format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A person saves the file between the controller's read and its write: the edit is made
    /// again on what they saved (theirs is kept); a file that keeps changing is a conflict,
    /// and what they saved last stays.
    #[tokio::test]
    async fn an_edit_is_made_again_on_a_hand_edit_saved_meanwhile() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(tmp.path()).expect("root");
        let (handle, _task) = poolkeeper_engine::start(
            std::sync::Arc::new(poolkeeper_runtime::memory::MemoryRuntime::default()),
            poolkeeper_engine::EngineConfig::new(root.join(".poolkeeper/state")),
        )
        .expect("engine");
        let d = DirDeclare::new(handle, &root, Prepared::default()).expect("declare");
        let file = root.join("pools.yaml");
        std::fs::write(&file, "a: 1\n").expect("write");
        let calls = AtomicUsize::new(0);
        d.rewrite(&file, |text| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                std::fs::write(&file, format!("{text}b: 2\n")).expect("hand edit");
            }
            Ok(Some(format!("{text}edited: true\n")))
        })
        .await
        .expect("edited");
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "a: 1\nb: 2\nedited: true\n"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let r = d
            .rewrite(&file, |text| {
                std::fs::write(&file, format!("{text}x\n")).expect("hand edit");
                Ok(Some("mine\n".to_owned()))
            })
            .await;
        assert!(
            matches!(&r, Err(DeclareError::Conflict(m)) if m.contains("kept changing")),
            "{r:?}"
        );
        let kept = std::fs::read_to_string(&file).expect("read");
        assert!(kept.ends_with("x\nx\nx\n"), "{kept}");
    }

    #[test]
    fn a_claim_file_reads_back_as_the_claim() {
        let spec = ClaimSpec {
            pool: "web".into(),
            user: "alice".into(),
            ttl: None,
            files: BTreeMap::from([("index.html".into(), "<h1>hi</h1>\n".into())]),
            files_from: None,
            resources: None,
        };
        let text = claim_file_text("alice-web-1", &spec).expect("yaml");
        let path = Path::new("managed/claims/alice-web-1.yaml");
        let parsed = crate::loader::parse_text(path, &text);
        assert!(parsed.is_clean(), "{:?}", parsed.diagnostics);
        let objs = parsed.objects;
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].name, "alice-web-1");
        assert_eq!(objs[0].spec, Spec::Claim(spec));
        // What the API hands the engine is what the watcher will read.
        assert_eq!(objs[0].origin, claim_file_origin(path));
    }
}
