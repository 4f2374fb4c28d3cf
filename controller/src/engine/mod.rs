//! The reconcile engine: one task owns all state, joins what is declared (from a source) with
//! what runs (from a runtime), asks the pure decisions in [`crate::core`] for plans, and executes
//! them.
//!
//! - Level-triggered: every pass works from the whole current state of the objects it touches;
//!   a periodic relist and source rescan close any drift that events missed.
//! - Expectations: creations in flight are `Creating` instances and removals `Deleting`, so a
//!   slow runtime never causes a second creation or removal.
//! - Group commit: a pass collects its binding changes and writes them with one fsync before it
//!   reports any claim Bound or starts any reset, so a crash loses nothing that was reported.
//!   A batch that a restart would derive again (a deleted claim's end, an instance gone or
//!   reset: [`durable::needs_flush`]) is written without a flush of its own; the next flush
//!   covers it, at most [`DEFERRED_FLUSH_MS`] later.

pub mod durable;
pub mod metrics;
mod pass;
pub mod status;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use poolkeeper_store::Store;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::api::{ClaimPhase, ClaimSpec, Condition, DeploymentSpec, PoolSpec, UserSpec};
use crate::core::claims::Verdict;
use crate::core::pool::{InstancePhase, Slot};
use crate::core::ports::PortBook;
use crate::loader::Diagnostic;
use crate::model::{Kind, ObjKey, Object, Origin, Spec};
use crate::runtime::{Instance, Result as RtResult, Runtime, RuntimeEvent};
use durable::{Durable, Op};
use status::{Events, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("state store in {dir}: {source}")]
    Store {
        dir: PathBuf,
        #[source]
        source: poolkeeper_store::StoreError,
    },
    #[error("the engine has stopped")]
    Stopped,
}

/// Wall-clock milliseconds, injectable so that simulations can move time (TTLs, backoffs).
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start_ms)))
    }

    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
pub struct EngineConfig {
    /// Where the durable store lives (e.g. `DIR/.poolkeeper/state`).
    pub state_dir: PathBuf,
    /// How often to list the runtime again, whatever the events said.
    pub resync_every: Duration,
    pub clock: Arc<dyn Clock>,
    /// fsync each commit (only a benchmark of the store's cost would turn this off).
    pub sync: bool,
    /// Told of each flush of the state store, with the log and its durable length (tests that
    /// simulate a power loss cut the log there).
    pub on_flush: Option<poolkeeper_store::FlushObserver>,
}

impl EngineConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            state_dir: state_dir.into(),
            resync_every: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            sync: true,
            on_flush: None,
        }
    }
}

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
enum Input {
    Source(SourceEvent),
    Runtime(RuntimeEvent),
    Done(Completion),
    Listed(u32, RtResult<Vec<Instance>>),
    Tick,
    Snapshot(oneshot::Sender<Snapshot>),
    PoolStatus(String, oneshot::Sender<Option<crate::api::PoolStatus>>),
    /// List the runtime and reconcile everything now; answers how long that took.
    Resync(oneshot::Sender<Duration>),
    Subscribe(mpsc::UnboundedSender<ClaimChange>),
    Reinitialise(String, oneshot::Sender<Option<usize>>),
    Claim(String, oneshot::Sender<Option<ClaimBrief>>),
    CreateClaim {
        claim: Object,
        reply: oneshot::Sender<Creation>,
    },
    Shutdown(oneshot::Sender<()>),
    PutFiles {
        claim: String,
        files: Vec<(String, Vec<u8>)>,
        reply: oneshot::Sender<Result<usize, PutFilesError>>,
    },
    /// A line of a deployment container's output matched one of its log triggers.
    LogMatch {
        instance: String,
        trigger: String,
        line: String,
    },
}

#[derive(Debug)]
enum Completion {
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
        result: Result<(), String>,
    },
    Files {
        claim: String,
        instance: String,
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
    tx: mpsc::UnboundedSender<Input>,
    tokens: Tokens,
}

/// The declared users' token digests, published by the engine each time a user changes, so
/// that the API authenticates a request without asking the engine (see [`EngineHandle::token_owner`]).
pub type Tokens = Arc<std::sync::RwLock<HashMap<[u8; 32], TokenOwner>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOwner {
    pub user: String,
    pub disabled: bool,
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

    pub async fn snapshot(&self) -> Result<Snapshot, EngineError> {
        self.ask(Input::Snapshot).await
    }

    /// Writes files into the instance bound to `claim`, under its pool's `files.mountPath`.
    pub async fn put_files(
        &self,
        claim: &str,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<Result<usize, PutFilesError>, EngineError> {
        self.ask(|reply| Input::PutFiles {
            claim: claim.to_owned(),
            files,
            reply,
        })
        .await
    }

    pub async fn pool_status(
        &self,
        name: &str,
    ) -> Result<Option<crate::api::PoolStatus>, EngineError> {
        self.ask(|tx| Input::PoolStatus(name.to_owned(), tx)).await
    }

    /// A full resync: list the runtime, reconcile every object. Returns its duration.
    pub async fn resync(&self) -> Result<Duration, EngineError> {
        self.ask(Input::Resync).await
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

// ---------------------------------------------------------------------------------------------
// In-memory state

struct PoolEntry {
    /// None: no longer declared; draining until its last instance is gone.
    spec: Option<PoolSpec>,
    origin: Origin,
    generation: i64,
    hash: String,
    conditions: Vec<Condition>,
    events: Events,
    hits: u64,
    misses: u64,
    create_failures: u32,
    create_backoff_until: u64,
    /// Last failure to create, shown as a condition until a creation succeeds.
    create_error: Option<(&'static str, String)>,
    ports_exhausted: bool,
    /// The labels of instances of the current template (shared by all of them).
    labels: Option<crate::runtime::Labels>,
}

struct ClaimEntry {
    spec: ClaimSpec,
    origin: Origin,
    generation: i64,
    seq: u64,
    verdict: Verdict,
    files: Arc<Vec<(String, Vec<u8>)>>,
    files_error: Option<String>,
    /// Consecutive failed copies of its files into instances (two fail the claim).
    copy_failures: u32,
    /// The instance it holds: the durable binding, or one decided in this pass.
    instance: Option<String>,
    /// Bound durably, files still being copied: not reported Bound yet.
    files_pending: bool,
    /// Has waited in the queue (a bind after that is a miss).
    waited: bool,
    queue_position: Option<u32>,
    reported: ClaimPhase,
    /// When `reported` last changed, and when the admission verdict last changed: the
    /// conditions' transition times (conditions are derived when status is read).
    phase_since: u64,
    verdict_since: u64,
    /// Why its last instance was lost, and when.
    lost: Option<(String, u64)>,
    /// The latest text of its file is invalid (the last valid spec is in use).
    invalid: Option<(String, u64)>,
    events: Events,
}

struct UserEntry {
    spec: UserSpec,
    origin: Origin,
    generation: i64,
    events: Events,
    token: UserToken,
    conditions: Vec<Condition>,
}

/// A user's API token as the engine holds it: a digest, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UserToken {
    None,
    Digest([u8; 32]),
    /// `tokenSecretFile` could not be used: why (the file and the error).
    Unreadable(String),
}

impl UserToken {
    /// The token `spec` declares: its `tokenSha256`, or the digest of what its
    /// `tokenSecretFile` holds (relative to the folder of `origin`'s file).
    fn of(spec: &UserSpec, origin: &Origin) -> UserToken {
        if let Some(h) = &spec.token_sha256 {
            return hex::decode(h)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .map_or(UserToken::None, UserToken::Digest);
        }
        let Some(file) = &spec.token_secret_file else {
            return UserToken::None;
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

struct DeploymentEntry {
    spec: Option<DeploymentSpec>,
    /// The last spec applied, kept after deletion: it orders the shutdown and says whether the
    /// volumes stay. None for a deployment found only through its containers.
    last_spec: Option<DeploymentSpec>,
    origin: Origin,
    generation: i64,
    /// Container name -> hash of its spec (and the network).
    hashes: BTreeMap<String, String>,
    network_ready: Option<String>,
    network_pending: bool,
    /// Slot -> (restarts, exited at ms).
    restarts: HashMap<String, (u32, u64)>,
    /// (container, trigger) -> what its log trigger saw.
    triggers: HashMap<(String, String), TriggerState>,
    conditions: Vec<Condition>,
    events: Events,
}

#[derive(Default)]
struct TriggerState {
    fired: u32,
    matches: u32,
    last_match_ms: Option<u64>,
    last_fired_ms: Option<u64>,
    last_line: Option<String>,
}

struct InstRec {
    name: String,
    pool: Option<String>,
    deployment: Option<(String, String, u32)>,
    hash: String,
    phase: InstancePhase,
    exit_code: Option<i64>,
    ports: Vec<u16>,
    node: String,
    /// Published ports, as the runtime reports them.
    bindings: Vec<crate::runtime::PortBinding>,
    claim: Option<String>,
    resetting: bool,
    /// A claim held it and it has not been reset since (mirrors `Durable::used`).
    used: bool,
    quarantined: Option<String>,
    ready_since: u64,
    /// Where it is filed in its pool's index (pool members only).
    slot: Option<(Slot, u64)>,
    /// Our create call has not returned. A removal asked for meanwhile waits for it: removing
    /// before the runtime has the instance would remove nothing, and the creation would land
    /// unseen.
    create_in_flight: bool,
    /// The runtime's revision of the last report applied (see `Instance::revision`).
    revision: u64,
    /// The list epoch when it was last reported: a list begun before that cannot tell that it
    /// is gone (see `Engine::list_epoch`).
    seen_epoch: u32,
}

impl PoolEntry {
    fn new(origin: Origin, generation: i64, hash: String) -> Self {
        PoolEntry {
            spec: None,
            origin,
            generation,
            hash,
            conditions: Vec::new(),
            events: Events::default(),
            hits: 0,
            misses: 0,
            create_failures: 0,
            create_backoff_until: 0,
            create_error: None,
            ports_exhausted: false,
            labels: None,
        }
    }
}

impl InstRec {
    /// A record with nothing known yet beyond its identity and phase.
    fn new(
        name: String,
        pool: Option<String>,
        deployment: Option<(String, String, u32)>,
        hash: String,
        phase: InstancePhase,
        now: u64,
    ) -> Self {
        InstRec {
            name,
            pool,
            deployment,
            hash,
            phase,
            exit_code: None,
            ports: Vec::new(),
            node: String::new(),
            bindings: Vec::new(),
            claim: None,
            resetting: false,
            used: false,
            quarantined: None,
            ready_since: now,
            slot: None,
            create_in_flight: false,
            revision: 0,
            seen_epoch: 0,
        }
    }
}

/// A pool's instances by slot, kept up to date as instances change, so that a pass over a pool
/// costs what changed, not the size of the pool.
#[derive(Default)]
struct PoolIndex {
    members: std::collections::HashSet<String>,
    /// Oldest ready first.
    warm: BTreeSet<(u64, String)>,
    starting: BTreeSet<String>,
    doomed: BTreeSet<String>,
    occupied: usize,
}

impl PoolIndex {
    fn file(&mut self, slot: Slot, since: u64, name: &str, add: bool) {
        match slot {
            Slot::Warm => {
                if add {
                    self.warm.insert((since, name.to_owned()));
                } else {
                    self.warm.remove(&(since, name.to_owned()));
                }
            }
            Slot::Starting => {
                if add {
                    self.starting.insert(name.to_owned());
                } else {
                    self.starting.remove(name);
                }
            }
            Slot::Doomed(_) => {
                if add {
                    self.doomed.insert(name.to_owned());
                } else {
                    self.doomed.remove(name);
                }
            }
            Slot::Occupied => {
                if add {
                    self.occupied += 1;
                } else {
                    self.occupied = self.occupied.saturating_sub(1);
                }
            }
            Slot::Deleting => {}
        }
    }

    fn counts(&self) -> crate::core::pool::PoolCounts {
        crate::core::pool::PoolCounts {
            warm: self.warm.len() as u32,
            starting: self.starting.len() as u32,
            doomed: self.doomed.len() as u32,
            occupied: self.occupied as u32,
        }
    }
}

/// Work that may start only once the pass's ops are durable.
enum AfterCommit {
    /// The claim is bound durably: copy its files, then report it.
    Bound { claim: String, instance: String },
    /// The instance's claim ended durably: reset it per the pool's policy.
    Reset { instance: String },
}

pub struct Engine<R: Runtime> {
    rt: Arc<R>,
    store: Store<Durable>,
    tx: mpsc::UnboundedSender<Input>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    pools: BTreeMap<String, PoolEntry>,
    claims: HashMap<String, Box<ClaimEntry>>,
    users: BTreeMap<String, UserEntry>,
    deployments: BTreeMap<String, DeploymentEntry>,
    instances: HashMap<String, Box<InstRec>>,
    pool_index: HashMap<String, PoolIndex>,
    /// Instances changed since they were last classified into their pool's index.
    touched: std::collections::HashSet<String>,
    /// Non-terminal claims per pool and per user, by arrival.
    claims_by_pool: HashMap<String, BTreeSet<(u64, String)>>,
    claims_by_user: HashMap<String, BTreeSet<(u64, String)>>,
    /// Claims without an instance, per pool, by arrival: the queues.
    queues: HashMap<String, BTreeSet<(u64, String)>>,
    /// Claims whose reported status may have changed in this pass.
    to_report: BTreeSet<String>,
    ports: PortBook,
    diagnostics: BTreeMap<PathBuf, Vec<Diagnostic>>,
    dirty_pools: BTreeSet<String>,
    dirty_users: BTreeSet<String>,
    dirty_deployments: BTreeSet<String>,
    ops: Vec<Op>,
    after_commit: Vec<AfterCommit>,
    expiries: BinaryHeap<Reverse<(u64, String)>>,
    wakeups: BinaryHeap<Reverse<u64>>,
    /// Removals that failed (runtime unreachable), retried at the given time; the instance
    /// stays `Deleting` meanwhile, so nothing retries them in a tight loop.
    removal_retries: Vec<(u64, String)>,
    /// Released instances retired for recreation, whose removal waits (see `retire`): when
    /// they were retired, the pass they were retired in, the instance.
    held_removals: Vec<(u64, u64, String)>,
    /// When a creation last answered (held removals wait while creations make progress).
    last_create_answer_ms: u64,
    /// Passes run so far (orders `held_removals` against the pass that retired them).
    passes: u64,
    /// A pass is asked for (an input is on its way) and not run yet.
    nudged: bool,
    /// Release every held removal at the end of this pass (a pool ran out of host ports).
    release_held: bool,
    next_seq: u64,
    /// When the oldest batch written without a flush was committed (see `DEFERRED_FLUSH_MS`).
    deferred_since_ms: Option<u64>,
    synced: bool,
    listed: bool,
    /// Bumped each time the runtime is listed; a list result carries the epoch it began in.
    list_epoch: u32,
    /// Instances reported gone, and when (ms): a list cannot bring them back for
    /// `FORGOTTEN_KEPT_MS`. A list begun before the removal saw them, and a daemon's list can
    /// lag its removals; names are never reused (random suffixes).
    recently_gone: HashMap<String, u64>,
    /// Creations handed to the runtime and not answered yet; beyond `MAX_CREATES_IN_FLIGHT`
    /// they wait in `create_queue` (their records are `Creating` all the same).
    creates_in_flight: usize,
    create_queue: std::collections::VecDeque<(String, Box<crate::runtime::InstanceSpec>)>,
    started: bool,
    subscribers: Vec<mpsc::UnboundedSender<ClaimChange>>,
    no_files: Arc<Vec<(String, Vec<u8>)>>,
    started_at_ms: u64,
    name_counter: u64,
    /// Claims forgotten in this pass: their store records are stale until the commit.
    forgotten: std::collections::HashSet<String>,
    /// Tasks following the output of instances whose container has log triggers.
    log_followers: HashMap<String, tokio::task::AbortHandle>,
    metrics: metrics::EngineMetrics,
    /// The users' token digests, as the API reads them (see [`Tokens`]).
    tokens: Tokens,
    /// A user or its token changed since `tokens` was last published: it is, once per batch
    /// of inputs (not once per user: a start applying thousands would rebuild it each time).
    tokens_stale: bool,
}

/// Starts an engine on `rt`. Returns its handle and the task running it.
pub fn start<R: Runtime>(
    rt: Arc<R>,
    config: EngineConfig,
) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), EngineError> {
    let store = poolkeeper_store::Store::<Durable>::open_with(
        &config.state_dir,
        poolkeeper_store::Options {
            sync: config.sync,
            on_flush: config.on_flush.clone(),
            ..poolkeeper_store::Options::default()
        },
    )
    .map_err(|source| EngineError::Store {
        dir: config.state_dir.clone(),
        source,
    })?;
    let recovery = *store.recovery();
    if recovery.dropped_tail_bytes > 0 {
        warn!(
            dropped_bytes = recovery.dropped_tail_bytes,
            "state store: dropped a torn tail (a batch that was never acknowledged)"
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let next_seq = store.state().next_seq;
    let clock = config.clock.clone();
    let now = clock.now_ms();
    let tokens = Tokens::default();
    let mut engine = Engine {
        tokens: tokens.clone(),
        tokens_stale: false,
        rt,
        store,
        tx: tx.clone(),
        clock,
        config,
        pools: BTreeMap::new(),
        claims: HashMap::new(),
        users: BTreeMap::new(),
        deployments: BTreeMap::new(),
        instances: HashMap::new(),
        pool_index: HashMap::new(),
        touched: std::collections::HashSet::new(),
        claims_by_pool: HashMap::new(),
        claims_by_user: HashMap::new(),
        queues: HashMap::new(),
        to_report: BTreeSet::new(),
        ports: PortBook::default(),
        diagnostics: BTreeMap::new(),
        dirty_pools: BTreeSet::new(),
        dirty_users: BTreeSet::new(),
        dirty_deployments: BTreeSet::new(),
        ops: Vec::new(),
        after_commit: Vec::new(),
        expiries: BinaryHeap::new(),
        wakeups: BinaryHeap::new(),
        removal_retries: Vec::new(),
        held_removals: Vec::new(),
        last_create_answer_ms: 0,
        passes: 0,
        nudged: false,
        release_held: false,
        next_seq,
        deferred_since_ms: None,
        synced: false,
        listed: false,
        list_epoch: 0,
        recently_gone: HashMap::new(),
        creates_in_flight: 0,
        create_queue: std::collections::VecDeque::new(),
        started: false,
        subscribers: Vec::new(),
        no_files: Arc::new(Vec::new()),
        started_at_ms: now,
        name_counter: now,
        forgotten: std::collections::HashSet::new(),
        log_followers: HashMap::new(),
        metrics: Default::default(),
    };
    // Subscribe before listing, so nothing falls between the list and the stream.
    let mut events = engine.rt.subscribe();
    let fwd = tx.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if fwd.send(Input::Runtime(ev)).is_err() {
                break;
            }
        }
    });
    engine.spawn_list();
    let task = tokio::spawn(engine.run(rx));
    Ok((EngineHandle { tx, tokens }, task))
}

/// How long a batch written without a flush of its own ([`durable::needs_flush`]) may wait for
/// one: a busy engine flushes it with the next binding long before.
pub const DEFERRED_FLUSH_MS: u64 = 1_000;

/// Why 4096: large enough that a burst of claims is bound in a few passes (one fsync each),
/// small enough that one pass stays within a few milliseconds.
const MAX_BATCH: usize = 4096;

impl<R: Runtime> Engine<R> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut resync = tokio::time::interval(self.config.resync_every);
        resync.tick().await;
        loop {
            let sleep = self.next_wakeup();
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = resync.tick() => {
                    // Ports once found held by another process are tried again each resync:
                    // a creation that still hits one marks it again.
                    self.ports.clear_all_foreign();
                    self.spawn_list();
                    continue;
                }
                _ = tokio::time::sleep(sleep) => Some(Input::Tick),
            };
            let Some(first) = first else { break };
            let mut shutdown = None;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            for input in batch {
                match input {
                    Input::Shutdown(tx) => shutdown = Some(tx),
                    Input::Resync(tx) => {
                        let t = Instant::now();
                        // Listed inline: nothing is observed meanwhile.
                        self.list_epoch += 1;
                        let listed = self.rt.list().await;
                        self.on_listed(self.list_epoch, listed);
                        self.publish_tokens();
                        self.mark_all_dirty();
                        self.pass();
                        let _ = tx.send(t.elapsed());
                    }
                    other => self.handle(other),
                }
            }
            self.publish_tokens();
            self.pass();
            if let Some(tx) = shutdown {
                // What waited for a flush is durable before the engine says it has stopped.
                if let Err(e) = self.store.flush() {
                    error!(error = %e, "state store failed to flush at shutdown");
                }
                let _ = tx.send(());
                break;
            }
        }
    }

    /// How long until something is due (a lease ends, a backoff passes).
    fn next_wakeup(&mut self) -> Duration {
        let now = self.clock.now_ms();
        let mut next = u64::MAX;
        if let Some(Reverse((t, _))) = self.expiries.peek() {
            next = next.min(*t);
        }
        // An overdue wakeup means a pass now (the tick it causes pops it): never dropped here,
        // or what it was for would wait for an unrelated pass.
        if let Some(Reverse(t)) = self.wakeups.peek() {
            next = next.min(*t);
        }
        if next == u64::MAX {
            return Duration::from_secs(3600);
        }
        Duration::from_millis(next.saturating_sub(now).max(1))
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Source(ev) => self.on_source(ev),
            Input::Runtime(ev) => self.on_runtime(ev),
            Input::Done(c) => self.on_done(c),
            Input::Listed(epoch, r) => self.on_listed(epoch, r),
            Input::Tick => {
                self.nudged = false;
                let now = self.clock.now_ms();
                while let Some(Reverse(t)) = self.wakeups.peek() {
                    if *t > now {
                        break;
                    }
                    self.wakeups.pop();
                    // A backoff passed: look at everything again (cheap, and never wrong).
                    self.mark_all_dirty();
                }
                self.retry_removals(now);
            }
            Input::Snapshot(tx) => {
                let _ = tx.send(self.snapshot());
            }
            Input::PoolStatus(name, tx) => {
                let _ = tx.send(self.pool_status(&name));
            }
            Input::PutFiles {
                claim,
                files,
                reply,
            } => self.put_claim_files(&claim, files, reply),
            Input::Subscribe(tx) => self.subscribers.push(tx),
            Input::Reinitialise(pool, reply) => {
                let _ = reply.send(self.reinitialise(&pool));
            }
            Input::Claim(name, reply) => {
                let _ = reply.send(self.claim_brief(&name));
            }
            Input::CreateClaim { claim, reply } => {
                let _ = reply.send(self.create_claim(claim));
            }
            Input::LogMatch {
                instance,
                trigger,
                line,
            } => self.on_log_match(&instance, &trigger, line),
            Input::Shutdown(_) | Input::Resync(_) => {}
        }
    }

    /// Reads user `name`'s token again (its `tokenSecretFile` may have changed) and sets its
    /// `TokenReady` condition. True when the token changed.
    fn refresh_token(&mut self, name: &str, now: u64) -> bool {
        let Some(u) = self.users.get_mut(name) else {
            return false;
        };
        let token = UserToken::of(&u.spec, &u.origin);
        let changed = token != u.token;
        let (ready, reason, message) = match (&token, &u.spec.token_secret_file) {
            (UserToken::Unreadable(why), _) => (false, "TokenFileUnreadable", why.clone()),
            (UserToken::Digest(_), Some(f)) => {
                (true, "TokenFileRead", format!("token read from {f}"))
            }
            (UserToken::Digest(_), None) => (true, "TokenSha256", "token digest declared".into()),
            (UserToken::None, _) => {
                u.conditions.retain(|c| c.type_ != "TokenReady");
                u.token = token;
                return changed;
            }
        };
        if status::set_condition(
            &mut u.conditions,
            "TokenReady",
            ready,
            reason,
            &message,
            now,
        ) && !ready
        {
            warn!(user = name, "{message}");
            u.events.push(true, reason, message, now);
        }
        u.token = token;
        changed
    }

    /// Reads every `tokenSecretFile` again (at each resync): a rotated token works from then on.
    fn reload_token_files(&mut self) {
        let now = self.clock.now_ms();
        let names: Vec<String> = self
            .users
            .iter()
            .filter(|(_, u)| u.spec.token_secret_file.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if self.refresh_token(&name, now) {
                self.tokens_stale = true;
            }
        }
    }

    /// Rebuilds the token index the API reads, if a user changed since it was last built. A
    /// digest that two users declare authenticates neither (and says so): a token must name
    /// one user.
    fn publish_tokens(&mut self) {
        if !std::mem::take(&mut self.tokens_stale) {
            return;
        }
        let mut index: HashMap<[u8; 32], TokenOwner> = HashMap::new();
        let mut ambiguous = std::collections::HashSet::new();
        for (name, u) in &self.users {
            let UserToken::Digest(digest) = u.token else {
                continue;
            };
            let owner = TokenOwner {
                user: name.clone(),
                disabled: u.spec.disabled,
            };
            if let Some(first) = index.insert(digest, owner) {
                warn!(
                    users = %format!("{}, {name}", first.user),
                    "two users declare the same token: it authenticates neither"
                );
                ambiguous.insert(digest);
            }
        }
        for d in ambiguous {
            index.remove(&d);
        }
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = index;
    }

    /// See [`EngineHandle::reinitialise`]: the warm instances are retired like released
    /// ones, and the pool's next pass creates their replacements.
    fn reinitialise(&mut self, pool: &str) -> Option<usize> {
        let declared = self.pools.get(pool).is_some_and(|p| p.spec.is_some());
        if !declared {
            return None;
        }
        let warm: Vec<String> = self
            .pool_index
            .get(pool)
            .map(|idx| idx.warm.iter().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default();
        let now = self.clock.now_ms();
        if let Some(p) = self.pools.get_mut(pool) {
            p.events.push(
                false,
                "Reinitialised",
                format!("{} warm instances replaced by fresh ones", warm.len()),
                now,
            );
        }
        for name in &warm {
            self.retire(name);
        }
        self.dirty_pools.insert(pool.to_owned());
        Some(warm.len())
    }

    /// See [`EngineHandle::create_claim`].
    fn create_claim(&mut self, claim: Object) -> Creation {
        let Spec::Claim(spec) = &claim.spec else {
            return Creation::Refused("NotAClaim", format!("{} is not a claim", claim.key()));
        };
        if let Some(existing) = self.claim_brief(&claim.name) {
            return Creation::Exists(existing);
        }
        if let Some((reason, message)) = self.refusal_of_new(&spec.user, &spec.pool) {
            return Creation::Refused(reason, message);
        }
        let now = self.clock.now_ms();
        self.apply_object(claim, now);
        Creation::Created
    }

    fn claim_brief(&self, name: &str) -> Option<ClaimBrief> {
        self.claims.get(name).map(|c| ClaimBrief {
            spec: c.spec.clone(),
            origin: c.origin.clone(),
        })
    }

    /// Why a new claim of `user` on `pool` would be refused now: the engine's own admission
    /// over the user's claims that are not over (in arrival order) followed by the new one.
    fn refusal_of_new(&self, user: &str, pool: &str) -> Option<(&'static str, String)> {
        let new = crate::core::claims::ClaimFacts {
            name: "",
            pool,
            user,
            bound: false,
        };
        match self.admit_claims_of(user, Some(new)).1.pop()? {
            Verdict::Refuse { reason, message } => Some((reason, message)),
            Verdict::Admit => None,
        }
    }

    fn spawn_list(&mut self) {
        self.list_epoch += 1;
        let epoch = self.list_epoch;
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let r = rt.list().await;
            let _ = tx.send(Input::Listed(epoch, r));
        });
    }

    fn mark_all_dirty(&mut self) {
        self.dirty_pools.extend(self.pools.keys().cloned());
        self.dirty_pools.extend(self.pool_index.keys().cloned());
        self.dirty_users.extend(self.claims_by_user.keys().cloned());
        self.dirty_deployments
            .extend(self.deployments.keys().cloned());
    }

    fn new_instance_name(&mut self, pool: &str) -> String {
        // Unique across restarts: derived from the clock at start and a counter, mixed so that
        // names do not look sequential.
        loop {
            self.name_counter = self.name_counter.wrapping_add(1);
            let h = Sha256::digest(self.name_counter.to_le_bytes());
            let suffix: String = h
                .iter()
                .take(5)
                .map(|b| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(*b % 36) as usize]))
                .collect();
            let name = format!("{pool}-{suffix}");
            if !self.instances.contains_key(&name) && !self.recently_gone.contains_key(&name) {
                return name;
            }
        }
    }

    fn notify(&mut self, name: &str, phase: ClaimPhase) {
        if self.subscribers.is_empty() {
            return;
        }
        let at = Instant::now();
        let user = self
            .claims
            .get(name)
            .map(|c| c.spec.user.clone())
            .unwrap_or_default();
        self.subscribers.retain(|s| {
            s.send(ClaimChange {
                name: name.to_owned(),
                user: user.clone(),
                phase,
                at,
            })
            .is_ok()
        });
    }
}

impl<R: Runtime> Engine<R> {
    /// Files every touched instance into its pool's index.
    fn reindex_touched(&mut self) {
        for name in std::mem::take(&mut self.touched) {
            self.reindex(&name);
        }
    }

    fn reindex(&mut self, name: &str) {
        let Some(rec) = self.instances.get(name) else {
            return;
        };
        let Some(pool) = rec.pool.clone() else { return };
        let current = self.pools.get(&pool).is_some_and(|p| p.hash == rec.hash);
        let slot = crate::core::pool::classify(
            rec.phase,
            current,
            rec.claim.is_some(),
            rec.resetting,
            rec.quarantined.is_some(),
        );
        let key = (slot, rec.ready_since);
        if rec.slot == Some(key) {
            return;
        }
        let old = rec.slot;
        let idx = self.pool_index.entry(pool.clone()).or_default();
        if let Some((s, since)) = old {
            idx.file(s, since, name, false);
        }
        idx.file(slot, key.1, name, true);
        idx.members.insert(name.to_owned());
        if let Some(rec) = self.instances.get_mut(name) {
            rec.slot = Some(key);
        }
        self.dirty_pools.insert(pool);
    }

    /// Takes a removed instance out of its pool's index.
    fn unindex_instance(&mut self, rec: &InstRec) {
        let Some(pool) = &rec.pool else { return };
        if let Some(idx) = self.pool_index.get_mut(pool) {
            if let Some((s, since)) = rec.slot {
                idx.file(s, since, &rec.name, false);
            }
            idx.members.remove(&rec.name);
        }
        self.touched.remove(&rec.name);
        self.dirty_pools.insert(pool.clone());
    }
}

/// The hash that marks instances made from one template.
pub fn hash_of<T: serde::Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..6])
}

/// Reads the files a claim asks for. `files_from` is resolved against the claim file's folder.
fn read_claim_files(spec: &ClaimSpec, origin: &Origin) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out: Vec<(String, Vec<u8>)> = spec
        .files
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
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
        let Some(clean) = crate::upload::clean_relative(&name) else {
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

impl<R: Runtime> Engine<R> {
    fn on_source(&mut self, ev: SourceEvent) {
        let now = self.clock.now_ms();
        match ev {
            SourceEvent::Synced => {
                self.synced = true;
            }
            SourceEvent::Diagnostics { file, diagnostics } => {
                // An object whose latest text is invalid keeps its last valid version and says so.
                let mut invalid: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for d in &diagnostics {
                    if let Some(label) = &d.object {
                        invalid
                            .entry(label.clone())
                            .or_default()
                            .push(d.to_string());
                    }
                }
                for (label, msgs) in invalid {
                    let Some((kind, name)) = label.split_once('/') else {
                        continue;
                    };
                    let msg = msgs.join("; ");
                    match Kind::parse(kind) {
                        Some(Kind::Pool) => {
                            if let Some(p) = self.pools.get_mut(name) {
                                status::set_condition(
                                    &mut p.conditions,
                                    "SpecValid",
                                    false,
                                    "InvalidSpec",
                                    &msg,
                                    now,
                                );
                                p.events.push(true, "InvalidSpec", msg, now);
                            }
                        }
                        Some(Kind::Claim) => {
                            if let Some(c) = self.claims.get_mut(name) {
                                c.invalid = Some((msg.clone(), now));
                                c.events.push(true, "InvalidSpec", msg, now);
                            }
                        }
                        Some(Kind::Deployment) => {
                            if let Some(d) = self.deployments.get_mut(name) {
                                status::set_condition(
                                    &mut d.conditions,
                                    "SpecValid",
                                    false,
                                    "InvalidSpec",
                                    &msg,
                                    now,
                                );
                                d.events.push(true, "InvalidSpec", msg, now);
                            }
                        }
                        _ => {}
                    }
                }
                for d in &diagnostics {
                    warn!(file = %d.file.display(), "{d}");
                }
                if diagnostics.is_empty() {
                    self.diagnostics.remove(&file);
                } else {
                    self.diagnostics.insert(file, diagnostics);
                }
            }
            SourceEvent::Apply(obj) => self.apply_object(obj, now),
            SourceEvent::Delete(key) => self.delete_object(&key, now),
        }
    }

    fn apply_object(&mut self, obj: Object, now: u64) {
        let generation = obj.generation;
        let name = obj.name.clone();
        // The same claim again (the API applies what it writes, and the watcher then sees the
        // file): nothing changed.
        if let Spec::Claim(spec) = &obj.spec
            && self.claims.get(&name).is_some_and(|c| {
                c.spec == *spec
                    && c.origin == obj.origin
                    && c.generation == generation
                    && c.invalid.is_none()
            })
        {
            return;
        }
        match obj.spec {
            Spec::Pool(spec) => {
                let hash = hash_of(&spec.template);
                let entry = self.pools.entry(name.clone()).or_insert_with(|| {
                    PoolEntry::new(obj.origin.clone(), generation, hash.clone())
                });
                if entry.spec.as_ref() != Some(&spec) {
                    let what = if entry.spec.is_none() {
                        "declared"
                    } else {
                        "changed"
                    };
                    entry.events.push(
                        false,
                        "SpecApplied",
                        format!("spec {what} ({})", obj.origin),
                        now,
                    );
                    if entry.hash != hash {
                        entry.events.push(
                            false,
                            "TemplateChanged",
                            format!(
                                "template {} -> {hash}: unbound instances will be replaced",
                                entry.hash
                            ),
                            now,
                        );
                        if let Some(idx) = self.pool_index.get(&name) {
                            self.touched.extend(idx.members.iter().cloned());
                        }
                    }
                }
                entry.spec = Some(spec);
                entry.hash = hash;
                entry.origin = obj.origin;
                entry.generation = generation;
                status::remove_condition(&mut entry.conditions, "SpecValid");
                self.dirty_pools.insert(name.clone());
                // Claims on this pool may change verdict (PoolNotFound).
                let users: Vec<String> = self.users_of_pool(&name);
                self.dirty_users.extend(users);
            }
            Spec::User(spec) => {
                let entry = self.users.entry(name.clone()).or_insert_with(|| UserEntry {
                    spec: spec.clone(),
                    origin: obj.origin.clone(),
                    generation,
                    events: Events::default(),
                    token: UserToken::None,
                    conditions: Vec::new(),
                });
                entry.spec = spec;
                entry.origin = obj.origin;
                entry.generation = generation;
                self.dirty_users.insert(name.clone());
                self.refresh_token(&name, now);
                self.tokens_stale = true;
            }
            Spec::Deployment(spec) => {
                let hashes = spec
                    .containers
                    .iter()
                    .map(|c| (c.name.clone(), hash_of(&(c, &spec.network))))
                    .collect();
                let entry =
                    self.deployments
                        .entry(name.clone())
                        .or_insert_with(|| DeploymentEntry {
                            spec: None,
                            last_spec: None,
                            origin: obj.origin.clone(),
                            generation,
                            hashes: BTreeMap::new(),
                            network_ready: None,
                            network_pending: false,
                            restarts: HashMap::new(),
                            triggers: HashMap::new(),
                            conditions: Vec::new(),
                            events: Events::default(),
                        });
                if entry.spec.as_ref() != Some(&spec) {
                    entry.events.push(
                        false,
                        "SpecApplied",
                        format!("spec applied ({})", obj.origin),
                        now,
                    );
                }
                entry.last_spec = Some(spec.clone());
                entry.spec = Some(spec);
                entry.hashes = hashes;
                entry.origin = obj.origin;
                entry.generation = generation;
                status::remove_condition(&mut entry.conditions, "SpecValid");
                self.dirty_deployments.insert(name);
            }
            Spec::Claim(spec) => self.apply_claim(name, spec, obj.origin, generation, now),
        }
    }

    fn users_of_pool(&self, pool: &str) -> Vec<String> {
        self.claims_by_pool
            .get(pool)
            .into_iter()
            .flatten()
            .filter_map(|(_, c)| self.claims.get(c).map(|e| e.spec.user.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn apply_claim(
        &mut self,
        name: String,
        spec: ClaimSpec,
        origin: Origin,
        generation: i64,
        now: u64,
    ) {
        let (files, files_error) = match read_claim_files(&spec, &origin) {
            // Most claims have no files: they share one empty list rather than allocate one each.
            Ok(f) if f.is_empty() => (self.no_files.clone(), None),
            Ok(f) => (Arc::new(f), None),
            Err(e) => (self.no_files.clone(), Some(e)),
        };
        if let Some((old_pool, old_user, seq)) = self
            .claims
            .get(&name)
            .map(|c| (c.spec.pool.clone(), c.spec.user.clone(), c.seq))
        {
            let moved = old_pool != spec.pool || old_user != spec.user;
            if moved {
                // A claim moved to another pool or user: end its binding and queue it anew.
                self.unindex_claim(&name);
                if let Some(inst) = self.bound_instance(&name) {
                    self.end_binding(
                        &name,
                        &inst,
                        durable::RecPhase::Waiting,
                        "ClaimChanged",
                        now,
                    );
                    // end_binding queued it on the old pool; it is queued on the new one below.
                    self.dequeue(&name);
                }
                // The record follows (its arrival number stays), so that a restart knows the
                // claim for the same one.
                self.ops.push(Op::Admit {
                    claim: name.clone(),
                    pool: spec.pool.clone(),
                    user: Some(spec.user.clone()),
                });
            }
            if let Some(entry) = self.claims.get_mut(&name) {
                entry.spec = spec;
                entry.origin = origin;
                entry.generation = generation;
                entry.files = files;
                entry.files_error = files_error;
                entry.copy_failures = 0;
                entry.invalid = None;
                self.dirty_users.insert(old_user);
                self.dirty_pools.insert(old_pool);
            }
            if moved {
                self.index_claim(&name, seq);
            }
            self.touch_claim(&name);
            return;
        }
        // New to this engine: known to the store (a restart), or admitted now. A claim deleted
        // earlier in this pass is new again: its record is only forgotten at the commit.
        let mut stored = if self.forgotten.contains(&name) {
            None
        } else {
            self.store.state().claims.get(&name).cloned()
        };
        if let Some(rec) = &stored
            && (rec.pool != spec.pool || rec.user.as_ref().is_some_and(|u| *u != spec.user))
        {
            // The record is another claim's: one of this name was deleted and this one declared
            // (for another user or pool) while this engine did not see it, or the deletion was
            // lost with a batch that waited for a flush. Its binding ends and its instance is
            // reset (at the first pass, once it is listed); this claim is admitted anew.
            warn!(
                claim = %name,
                stored_pool = %rec.pool,
                stored_user = rec.user.as_deref().unwrap_or("?"),
                "the stored record of this name belongs to an earlier claim; ending its binding"
            );
            if let Some(i) = &rec.instance {
                self.end_binding(&name, i, durable::RecPhase::Released, "NameReused", now);
            }
            self.forget_record(&name);
            stored = None;
        }
        let seq = match &stored {
            Some(rec) => rec.seq,
            None => {
                self.ops.push(Op::Admit {
                    claim: name.clone(),
                    pool: spec.pool.clone(),
                    user: Some(spec.user.clone()),
                });
                let s = self.next_seq;
                self.next_seq += 1;
                s
            }
        };
        let events = Events::default();
        let instance = stored.as_ref().and_then(|r| r.instance.clone());
        let entry = ClaimEntry {
            spec,
            origin,
            generation,
            seq,
            verdict: Verdict::Admit,
            files,
            files_error,
            copy_failures: 0,
            instance,
            files_pending: false,
            waited: false,
            queue_position: None,
            reported: ClaimPhase::Pending,
            phase_since: now,
            verdict_since: now,
            lost: None,
            invalid: None,
            events,
        };
        let terminal = stored.as_ref().is_some_and(|r| {
            matches!(
                r.phase,
                durable::RecPhase::Released | durable::RecPhase::Expired
            )
        });
        self.claims.insert(name.clone(), Box::new(entry));
        if !terminal {
            self.index_claim(&name, seq);
        }
        self.touch_claim(&name);
    }

    fn index_claim(&mut self, name: &str, seq: u64) {
        let Some(c) = self.claims.get(name) else {
            return;
        };
        if c.instance.is_none() {
            self.queues
                .entry(c.spec.pool.clone())
                .or_default()
                .insert((seq, name.to_owned()));
        }
        self.claims_by_pool
            .entry(c.spec.pool.clone())
            .or_default()
            .insert((seq, name.to_owned()));
        self.claims_by_user
            .entry(c.spec.user.clone())
            .or_default()
            .insert((seq, name.to_owned()));
    }

    fn unindex_claim(&mut self, name: &str) {
        self.dequeue(name);
        let Some(c) = self.claims.get(name) else {
            return;
        };
        let key = (c.seq, name.to_owned());
        if let Some(s) = self.claims_by_pool.get_mut(&c.spec.pool) {
            s.remove(&key);
            if s.is_empty() {
                self.claims_by_pool.remove(&c.spec.pool);
            }
        }
        if let Some(s) = self.claims_by_user.get_mut(&c.spec.user) {
            s.remove(&key);
            if s.is_empty() {
                self.claims_by_user.remove(&c.spec.user);
            }
        }
    }

    fn touch_claim(&mut self, name: &str) {
        if let Some(c) = self.claims.get(name) {
            self.dirty_users.insert(c.spec.user.clone());
            self.dirty_pools.insert(c.spec.pool.clone());
        }
    }

    /// The instance a claim holds (or is being handed in this pass).
    fn bound_instance(&self, claim: &str) -> Option<String> {
        self.claims.get(claim).and_then(|c| c.instance.clone())
    }

    /// Puts a claim without an instance in its pool's queue (idempotent).
    fn enqueue(&mut self, claim: &str) {
        if let Some(c) = self.claims.get(claim) {
            self.queues
                .entry(c.spec.pool.clone())
                .or_default()
                .insert((c.seq, claim.to_owned()));
            self.dirty_pools.insert(c.spec.pool.clone());
        }
    }

    fn dequeue(&mut self, claim: &str) {
        if let Some(c) = self.claims.get(claim)
            && let Some(q) = self.queues.get_mut(&c.spec.pool)
        {
            q.remove(&(c.seq, claim.to_owned()));
            if q.is_empty() {
                self.queues.remove(&c.spec.pool);
            }
        }
    }

    fn delete_object(&mut self, key: &ObjKey, now: u64) {
        match key.kind {
            Kind::Pool => {
                if let Some(p) = self.pools.get_mut(&key.name) {
                    p.spec = None;
                    p.events.push(false, "Draining", "pool no longer declared: removing unbound instances; bound ones stay until their claims end".into(), now);
                    self.dirty_pools.insert(key.name.clone());
                    let users = self.users_of_pool(&key.name);
                    self.dirty_users.extend(users);
                }
            }
            Kind::User => {
                if self.users.remove(&key.name).is_some() {
                    self.dirty_users.insert(key.name.clone());
                    self.tokens_stale = true;
                }
            }
            Kind::Deployment => {
                if let Some(d) = self.deployments.get_mut(&key.name) {
                    d.spec = None;
                    self.dirty_deployments.insert(key.name.clone());
                }
            }
            Kind::Claim => {
                if !self.claims.contains_key(&key.name) {
                    return;
                }
                let inst = self.bound_instance(&key.name);
                if let Some(inst) = inst {
                    self.end_binding(
                        &key.name,
                        &inst,
                        durable::RecPhase::Released,
                        "Deleted",
                        now,
                    );
                }
                self.touch_claim(&key.name);
                self.unindex_claim(&key.name);
                self.claims.remove(&key.name);
                self.forget_record(&key.name);
                self.notify(&key.name, ClaimPhase::Released);
            }
        }
    }

    /// Forgets the claim's store record at this pass's commit; until then it is stale, and a
    /// claim of this name declared again meanwhile is new.
    fn forget_record(&mut self, claim: &str) {
        self.ops.push(Op::Forget {
            claim: claim.to_owned(),
        });
        self.forgotten.insert(claim.to_owned());
    }

    /// Ends a claim's hold on `instance` (durably, in this pass's commit) and schedules the
    /// instance's reset for after the commit.
    fn end_binding(
        &mut self,
        claim: &str,
        instance: &str,
        to: durable::RecPhase,
        reason: &'static str,
        now: u64,
    ) {
        self.ops.push(Op::Unbind {
            claim: claim.to_owned(),
            to,
        });
        if let Some(p) = self.instances.get(instance).and_then(|r| r.pool.clone()) {
            self.dirty_pools.insert(p);
        }
        self.reset_released(instance);
        if let Some(c) = self.claims.get_mut(claim) {
            c.files_pending = false;
            c.instance = None;
            c.events
                .push(false, reason, format!("released instance {instance}"), now);
        }
        if to == durable::RecPhase::Waiting {
            self.enqueue(claim);
        }
        self.to_report.insert(claim.to_owned());
        info!(claim, instance, reason, "binding ended");
    }

    /// `instance` is no claim's any more and may hold a claim's data: it is used, and reset
    /// (after this pass's commit) before anyone gets it.
    fn reset_released(&mut self, instance: &str) {
        let Some(rec) = self.instances.get_mut(instance) else {
            return;
        };
        rec.claim = None;
        rec.resetting = true;
        rec.used = true;
        self.touched.insert(instance.to_owned());
        self.after_commit.push(AfterCommit::Reset {
            instance: instance.to_owned(),
        });
    }
}

#[cfg(test)]
mod files_from_tests {
    use super::*;

    fn claim_from(from: &str) -> ClaimSpec {
        ClaimSpec {
            pool: "p".to_owned(),
            user: "u".to_owned(),
            ttl: None,
            files_from: Some(from.to_owned()),
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
