//! The engine's handle: what sources, the HTTP API and tests send it and ask of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use poolkeeper_kinds::{ClaimPhase, ClaimSpec, ObjKey, Object, Origin};
use poolkeeper_runtime::{Instance, Result as RtResult, RuntimeEvent};

use crate::EngineError;
use crate::source::SourceEvent;
use crate::status::{InstanceView, ObjectView, Snapshot};

/// Why files could not be put into a claim's instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PutFilesError {
    #[error("claim {0} is not bound")]
    NotBound(String),
    #[error("pool {0} declares no files.mountPath")]
    NoMountPath(String),
    #[error("writing the files failed: {0}")]
    Runtime(String),
}

/// An instance's output: its last lines, then each new line as it comes (until the instance
/// is gone or the receiver dropped). A line written at the seam may show in both.
#[derive(Debug)]
pub struct InstanceLogs {
    pub recent: String,
    pub follow: mpsc::UnboundedReceiver<String>,
}

/// What an operator may do to a deployment's container: the declaration stays as it is, so a
/// removed container is replaced by a fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerAction {
    /// Restart the container in place (its restart count grows).
    Restart,
    /// Remove the container; the deployment makes a fresh one, as after any loss.
    Remove,
}

/// A claim's reported phase changed (for watchers: the API's stream, benchmarks, tests).
#[derive(Clone, Debug)]
pub struct ClaimChange {
    pub name: String,
    /// The claim's user (watchers show users only their own claims).
    pub user: String,
    pub phase: ClaimPhase,
    pub at: Instant,
}

// See SourceEvent: inputs are moved once; boxing the large ones buys nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Input {
    Source(SourceEvent),
    Runtime(RuntimeEvent),
    Done(Completion),
    Listed(u32, RtResult<Vec<Instance>>),
    Tick,
    Snapshot(oneshot::Sender<Snapshot>),
    /// These objects as status shows them (None: not held).
    Views(Vec<ObjKey>, oneshot::Sender<Vec<Option<ObjectView>>>),
    /// These instances as status shows them (None: gone).
    Instances(Vec<String>, oneshot::Sender<Vec<Option<InstanceView>>>),
    PoolStatus(
        String,
        oneshot::Sender<Option<poolkeeper_kinds::PoolStatus>>,
    ),
    /// List the runtime and reconcile everything now; answers how long that took.
    Resync(oneshot::Sender<Duration>),
    Subscribe(mpsc::UnboundedSender<ClaimChange>),
    /// Answered once the engine has started: the source synced, the runtime listed, and what
    /// the store says checked against what runs.
    Started(oneshot::Sender<()>),
    Reinitialise(String, oneshot::Sender<Option<usize>>),
    Claim(String, oneshot::Sender<Option<ClaimBrief>>),
    CreateClaim {
        claim: Object,
        reply: oneshot::Sender<Creation>,
    },
    Shutdown(oneshot::Sender<()>),
    PutFiles {
        claim: String,
        /// The claim's user, as the caller saw it (None: an admin's, any user's).
        user: Option<String>,
        files: Vec<(String, Vec<u8>)>,
        reply: oneshot::Sender<Result<usize, PutFilesError>>,
    },
    /// An instance's output, recent and followed (None: no such instance).
    Logs {
        instance: String,
        tail: usize,
        reply: oneshot::Sender<Option<Result<InstanceLogs, String>>>,
    },
    /// A command run in a deployment's container (None: no such container).
    Exec {
        instance: String,
        command: Vec<String>,
        reply: oneshot::Sender<Option<Result<poolkeeper_runtime::ExecOutput, String>>>,
    },
    /// An operator's action on a deployment's container (None: no such container).
    Container {
        instance: String,
        action: ContainerAction,
        reply: oneshot::Sender<Option<Result<(), String>>>,
    },
    /// A line of a deployment container's output matched one of its log triggers.
    LogMatch {
        instance: String,
        trigger: String,
        line: String,
    },
}

#[derive(Debug)]
pub(crate) enum Completion {
    Created {
        name: String,
        result: RtResult<Instance>,
    },
    Removed {
        name: String,
        result: RtResult<()>,
    },
    Reset {
        name: String,
        /// The instance's revision as the reset left it (see `Runtime::bind`).
        result: Result<u64, crate::instances::ResetFailed>,
    },
    Files {
        claim: String,
        instance: String,
        /// The step that failed (`copying files into`, `resizing`), when one did.
        step: &'static str,
        /// The claim's limits given to the instance, if any (see `claims::claim_limits`).
        limits: Option<(Option<u64>, Option<u64>)>,
        result: RtResult<()>,
    },
    /// Files uploaded into a bound claim's instance (answered to the caller already).
    Uploaded {
        instance: String,
    },
    /// A bound claim's changed `resources` given to its instance in place.
    Resized {
        claim: String,
        instance: String,
        cpu: Option<u64>,
        memory: Option<u64>,
        result: RtResult<()>,
    },
    Stopped {
        name: String,
        result: RtResult<()>,
    },
    Restarted {
        name: String,
        result: RtResult<()>,
    },
    Network {
        deployment: String,
        result: RtResult<()>,
    },
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) tx: mpsc::UnboundedSender<Input>,
    pub(crate) tokens: Tokens,
}

/// The declared users' token digests, published by the engine each time a user changes, so
/// that the API authenticates a request without asking the engine (see
/// [`EngineHandle::token_owner`]).
pub type Tokens = Arc<std::sync::RwLock<HashMap<[u8; 32], TokenOwner>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOwner {
    pub user: String,
    pub disabled: bool,
    /// The user is an operator (`admin: true`).
    pub admin: bool,
}

/// The engine's answer to [`EngineHandle::create_claim`].
#[derive(Debug, Clone)]
pub enum Creation {
    /// Admitted and applied.
    Created,
    /// A claim of that name exists already (nothing was changed).
    Exists(ClaimBrief),
    /// Admission refused it: the reason and the message.
    Refused(&'static str, String),
}

/// What the API needs to know of one claim, asked of the engine for each request about it
/// (costs one lookup, not a snapshot of the whole state).
#[derive(Debug, Clone)]
pub struct ClaimBrief {
    pub spec: ClaimSpec,
    pub origin: Origin,
}

impl EngineHandle {
    /// Asks the engine something and waits for its answer (inputs are handled in order).
    async fn ask<T>(
        &self,
        input: impl FnOnce(oneshot::Sender<T>) -> Input,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(input(tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    pub fn send(&self, ev: SourceEvent) -> Result<(), EngineError> {
        self.tx
            .send(Input::Source(ev))
            .map_err(|_| EngineError::Stopped)
    }

    pub fn apply(&self, obj: Object) -> Result<(), EngineError> {
        self.send(SourceEvent::Apply(obj))
    }

    pub fn delete(&self, key: ObjKey) -> Result<(), EngineError> {
        self.send(SourceEvent::Delete(key))
    }

    /// Runs a pass now (after moving a [`ManualClock`], for instance).
    pub fn tick(&self) -> Result<(), EngineError> {
        self.tx.send(Input::Tick).map_err(|_| EngineError::Stopped)
    }

    /// The user whose declared `tokenSha256` is `digest`, as of the last user the engine applied.
    pub fn token_owner(&self, digest: &[u8; 32]) -> Option<TokenOwner> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens.get(digest).cloned()
    }

    /// Claim `name` as it stands. Inputs are handled in order, so a claim applied before this
    /// call is seen.
    pub async fn claim(&self, name: &str) -> Result<Option<ClaimBrief>, EngineError> {
        self.ask(|reply| Input::Claim(name.to_owned(), reply)).await
    }

    /// Admits and applies a new claim in one step, so that two requests at a user's quota
    /// cannot both pass: the second is judged with the first one counted. The caller then
    /// writes the claim's record (its file) and, should that fail, deletes the claim again.
    pub async fn create_claim(&self, mut claim: Object) -> Result<Creation, EngineError> {
        claim.generation = 1;
        self.ask(|reply| Input::CreateClaim { claim, reply }).await
    }

    /// Replaces every warm instance of `pool` with a fresh one (bound instances are reset
    /// when their claims end, as always). Returns how many were retired, or None when no such
    /// pool is declared.
    pub async fn reinitialise(&self, pool: &str) -> Result<Option<usize>, EngineError> {
        self.ask(|tx| Input::Reinitialise(pool.to_owned(), tx))
            .await
    }

    /// Instance `instance`'s last `tail` lines of output and its new ones as they come; None
    /// when the engine holds no such instance.
    pub async fn logs(
        &self,
        instance: &str,
        tail: usize,
    ) -> Result<Option<Result<InstanceLogs, String>>, EngineError> {
        self.ask(|reply| Input::Logs {
            instance: instance.to_owned(),
            tail,
            reply,
        })
        .await
    }

    /// Restarts or removes a deployment's container (see [`ContainerAction`]); None when the
    /// engine holds no such deployment container.
    pub async fn container_action(
        &self,
        instance: &str,
        action: ContainerAction,
    ) -> Result<Option<Result<(), String>>, EngineError> {
        self.ask(|reply| Input::Container {
            instance: instance.to_owned(),
            action,
            reply,
        })
        .await
    }

    /// Runs `command` in a deployment's container (a flow's checked steps); None when the
    /// engine holds no such deployment container.
    pub async fn exec(
        &self,
        instance: &str,
        command: Vec<String>,
    ) -> Result<Option<Result<poolkeeper_runtime::ExecOutput, String>>, EngineError> {
        self.ask(|reply| Input::Exec {
            instance: instance.to_owned(),
            command,
            reply,
        })
        .await
    }

    pub async fn snapshot(&self) -> Result<Snapshot, EngineError> {
        self.ask(Input::Snapshot).await
    }

    /// Some objects as status shows them (None for one the engine does not hold): what a
    /// source that writes status per object needs, at the cost of those objects only.
    pub async fn views(&self, keys: Vec<ObjKey>) -> Result<Vec<Option<ObjectView>>, EngineError> {
        self.ask(|tx| Input::Views(keys, tx)).await
    }

    /// One object as status shows it (None when the engine does not hold it): [`Self::views`]
    /// of one key.
    pub async fn view(&self, key: ObjKey) -> Result<Option<ObjectView>, EngineError> {
        Ok(self.views(vec![key]).await?.into_iter().next().flatten())
    }

    /// Some instances as status shows them (None for one that is gone).
    pub async fn instances(
        &self,
        names: Vec<String>,
    ) -> Result<Vec<Option<InstanceView>>, EngineError> {
        self.ask(|tx| Input::Instances(names, tx)).await
    }

    /// Writes files into the instance bound to `claim`, under its pool's `files.mountPath`;
    /// with `user`, only while the claim is that user's (a claim deleted and made again under
    /// its name by another user meanwhile is not).
    pub async fn put_files(
        &self,
        claim: &str,
        user: Option<&str>,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<Result<usize, PutFilesError>, EngineError> {
        self.ask(|reply| Input::PutFiles {
            claim: claim.to_owned(),
            user: user.map(str::to_owned),
            files,
            reply,
        })
        .await
    }

    pub async fn pool_status(
        &self,
        name: &str,
    ) -> Result<Option<poolkeeper_kinds::PoolStatus>, EngineError> {
        self.ask(|tx| Input::PoolStatus(name.to_owned(), tx)).await
    }

    /// A full resync: list the runtime, reconcile every object. Returns its duration.
    pub async fn resync(&self) -> Result<Duration, EngineError> {
        self.ask(Input::Resync).await
    }

    /// Waits until the engine has started (the source synced, the runtime listed, the store
    /// checked against what runs): before that, a claim the store holds as bound shows
    /// Pending, which a status reader must not take for the truth.
    pub async fn started(&self) -> Result<(), EngineError> {
        self.ask(Input::Started).await
    }

    pub fn subscribe(&self) -> Result<mpsc::UnboundedReceiver<ClaimChange>, EngineError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Input::Subscribe(tx))
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// Stops the engine after its current pass.
    pub async fn shutdown(&self) {
        let _ = self.ask(Input::Shutdown).await;
    }
}
