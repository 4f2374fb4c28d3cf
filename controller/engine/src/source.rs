//! The engine's side of a source. A source (a watched directory; a Kubernetes API server)
//! tells the engine what is declared ([`SourceEvent`]); the engine asks it what a declared
//! object refers to outside itself ([`Resolve`]: a claim's files, a user's token); and people
//! change what is declared through it ([`Declare`]: the HTTP API, reservation webhooks and admin
//! commands), so that nothing above a source names a file or an API path.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use poolkeeper_kinds::{ClaimSpec, Diagnostic, ObjKey, Object, Origin, UserSpec};

/// What a source tells the engine.
// `Apply` carries a whole object; events are moved once through a channel, so boxing would only
// add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// An object was declared or changed.
    Apply(Object),
    /// An object is no longer declared.
    Delete(ObjKey),
    /// The problems found in one file now (empty: the file is clean or gone).
    Diagnostics {
        file: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
    /// The initial load is complete: deletions of what is not declared may begin.
    Synced,
}

/// A user's API token as a source resolves it: a digest, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserToken {
    None,
    Digest([u8; 32]),
    /// The token the user refers to could not be read: why (where it is, and the error).
    Unreadable(String),
}

impl UserToken {
    /// The digest a `tokenSha256` declares (validation has checked its form).
    pub fn from_sha256(hex_digest: &str) -> UserToken {
        hex::decode(hex_digest)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .map_or(UserToken::None, UserToken::Digest)
    }
}

/// What a declared object refers to outside itself, resolved by its source: the engine calls
/// these when an object is applied, and at each resync (a rotated token works from then on).
pub trait Resolve: Send + Sync + 'static {
    /// The files a claim carries (its inline `files`, and what its `filesFrom` names), sorted
    /// by path; an error says why they cannot be had (shown on the claim).
    fn claim_files(
        &self,
        spec: &ClaimSpec,
        origin: &Origin,
    ) -> Result<Vec<(String, Vec<u8>)>, String>;
    /// The token a user declares (`tokenSha256`, or a secret it refers to).
    fn user_token(&self, spec: &UserSpec, origin: &Origin) -> UserToken;
}

/// What every source resolves without help: inline files and `tokenSha256`. References to
/// files (`filesFrom`, `tokenSecretFile`) are the directory source's, which resolves them.
#[derive(Debug, Default, Clone, Copy)]
pub struct InlineOnly;

impl Resolve for InlineOnly {
    fn claim_files(
        &self,
        spec: &ClaimSpec,
        _origin: &Origin,
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        if let Some(from) = &spec.files_from {
            return Err(format!(
                "filesFrom {from}: this source does not read files (declare them inline)"
            ));
        }
        Ok(inline_files(spec))
    }

    fn user_token(&self, spec: &UserSpec, _origin: &Origin) -> UserToken {
        match (
            &spec.token_sha256,
            &spec.token_secret_file,
            &spec.token_secret_ref,
        ) {
            (Some(h), ..) => UserToken::from_sha256(h),
            (None, Some(f), _) => UserToken::Unreadable(format!(
                "tokenSecretFile {f}: this source does not read files (declare tokenSha256)"
            )),
            (None, None, Some(r)) => UserToken::Unreadable(format!(
                "tokenSecretRef {}: this source does not read Secrets (declare tokenSha256)",
                r.name
            )),
            (None, None, None) => UserToken::None,
        }
    }
}

/// A claim's inline `files`, each path as a copy writes it (`./a` is `a`, see
/// `normal_relative_path`; validation refused the claim if one is not a path).
pub fn inline_files(spec: &ClaimSpec) -> Vec<(String, Vec<u8>)> {
    spec.files
        .iter()
        .map(|(k, v)| {
            let path =
                poolkeeper_kinds::validate::normal_relative_path(k).unwrap_or_else(|_| k.clone());
            (path, v.clone().into_bytes())
        })
        .collect()
}

/// Whether a source can reach what it reads from (a Kubernetes API server, say): the HTTP API's
/// `/readyz` reports it. Cheap to clone; a directory source is always healthy.
#[derive(Clone, Debug, Default)]
pub struct Health(std::sync::Arc<std::sync::RwLock<Option<String>>>);

impl Health {
    /// The source reaches what it reads from.
    pub fn ok(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// It does not: why (naming what it cannot reach).
    pub fn failing(&self, why: impl Into<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(why.into());
    }

    /// None when healthy; else why not.
    pub fn problem(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A boxed future, so that [`Declare`] and [`Records`] can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a change to declared state was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclareError {
    /// No such object (of the kind asked for).
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with what is declared (an object declared where this source does
    /// not change it, a file that holds something else, a name taken).
    #[error("{0}")]
    Conflict(String),
    /// The source could not record the change (a failed write): nothing was changed.
    #[error("{0}")]
    Failed(String),
    /// The source could not record the change for want of space (a full disk): nothing was
    /// changed; the same request succeeds once there is room.
    #[error("{0}")]
    NoSpace(String),
    /// The engine is stopping.
    #[error("the controller is stopping")]
    Stopped,
}

/// A new claim's outcome (see [`Declare::create_claim`]).
#[derive(Debug, Clone)]
pub enum Created {
    /// Admitted, applied and recorded durably; `at` says where (shown to the caller).
    New { at: String },
    /// A claim of that name exists already; nothing was changed.
    Exists(crate::ClaimBrief),
    /// The engine's admission refused it: the reason and the message.
    Refused(&'static str, String),
}

/// A record kept with declared state, written before the claim it belongs to (a reservation's
/// callback state, say): `key` names it in [`Declare::records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub bytes: Vec<u8>,
}

/// Changes to declared state that people ask for. The directory source writes and edits files
/// in its folder; a Kubernetes source creates, patches and deletes objects.
pub trait Declare: Send + Sync + 'static {
    /// Declares a new claim. The engine admits and applies it in one step (two requests at a
    /// user's quota cannot both pass), then `record` (if any) and the claim are recorded
    /// durably; should that fail, the engine forgets the claim again and nothing is left.
    fn create_claim<'a>(
        &'a self,
        name: &'a str,
        spec: ClaimSpec,
        record: Option<Record>,
    ) -> BoxFuture<'a, Result<Created, DeclareError>>;
    /// Whether claim `name`, declared at `origin`, was made through [`Declare::create_claim`]
    /// (only those are released through [`Declare::delete_claim`]).
    fn made_here(&self, name: &str, origin: &Origin) -> bool;
    /// Whether claim `name` made through [`Declare::create_claim`] is still recorded.
    fn is_recorded(&self, name: &str) -> bool;
    /// Releases a claim made through [`Declare::create_claim`]: true when it was recorded.
    fn delete_claim<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, DeclareError>>;
    /// Whether a claim of `user` may be created under `name` now: false while a claim of that
    /// name is still where [`Declare::create_claim`] would declare it (in Kubernetes, an object
    /// being deleted holds its name until its finalizers are removed). Sources that remove at
    /// once need not say.
    fn claim_name_free<'a>(
        &'a self,
        _name: &'a str,
        _user: &'a str,
    ) -> BoxFuture<'a, Result<bool, DeclareError>> {
        Box::pin(async { Ok(true) })
    }
    /// Sets a pool's declared `warm`; returns what it was and where the pool is declared.
    fn scale_pool<'a>(
        &'a self,
        name: &'a str,
        warm: u32,
    ) -> BoxFuture<'a, Result<Scaled, DeclareError>>;
    /// Releases every claim of `user`, wherever it is declared; returns their names, sorted.
    fn release_claims_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, DeclareError>>;
    /// Deletes a user: their claims are released first. Returns where the user was declared
    /// and the claims released.
    fn delete_user<'a>(&'a self, name: &'a str)
    -> BoxFuture<'a, Result<UserDeleted, DeclareError>>;
    /// Declares a new user (the web console's registration). A user of that name declared
    /// already is a [`DeclareError::Conflict`]; nothing is changed then. Returns where it is
    /// declared.
    fn create_user<'a>(
        &'a self,
        name: &'a str,
        spec: UserSpec,
    ) -> BoxFuture<'a, Result<String, DeclareError>>;
    /// Sets a declared user's `passwordHash` (a PHC string), where the user is declared.
    /// Returns where that is.
    fn set_password<'a>(
        &'a self,
        name: &'a str,
        hash: &'a str,
    ) -> BoxFuture<'a, Result<String, DeclareError>>;
    /// Sets a declared user's `disabled`, where the user is declared. Returns where that is.
    fn set_user_disabled<'a>(
        &'a self,
        name: &'a str,
        disabled: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>>;
    /// Declares container `container` of deployment `deployment` stopped (or not), where the
    /// deployment is declared. Returns where that is.
    fn set_container_stopped<'a>(
        &'a self,
        deployment: &'a str,
        container: &'a str,
        stopped: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>>;
    /// Declares `objects` as one group (an example flow run from the web console), replacing
    /// what the group declared before. An object of the same kind and name declared elsewhere
    /// is a [`DeclareError::Conflict`] naming where; nothing is changed then. Returns where
    /// the group is declared.
    fn declare_group<'a>(
        &'a self,
        group: &'a str,
        objects: Vec<Object>,
    ) -> BoxFuture<'a, Result<String, DeclareError>>;
    /// Removes what group `group` declared (`objects`, as it declared them): true when there
    /// was something.
    fn remove_group<'a>(
        &'a self,
        group: &'a str,
        objects: Vec<ObjKey>,
    ) -> BoxFuture<'a, Result<bool, DeclareError>>;
    /// Records kept beside declared state (reservations, webhook signatures seen).
    fn records(&self) -> &dyn Records;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    pub was: Option<u64>,
    /// Where the pool is declared (a file relative to the watched folder, say).
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDeleted {
    pub at: String,
    pub released: Vec<String>,
}

/// Small records kept durably beside declared state, by key (`reservations/NAME.json`). Every
/// write is durable when it returns.
pub trait Records: Send + Sync {
    /// The record's bytes; None when there is none.
    fn get(&self, key: &str) -> std::io::Result<Option<Vec<u8>>>;
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, std::io::Result<()>>;
    /// Removes it; true when it was there.
    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<bool>>;
    /// The keys under `prefix` (`reservations/`), without it.
    fn keys(&self, prefix: &str) -> Vec<String>;
    /// Where the record is kept, for messages (a file's path, say).
    fn location(&self, key: &str) -> String;
}
