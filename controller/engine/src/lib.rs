//! The reconcile engine: one task owns all state, joins what is declared (from a source) with
//! what runs (from a runtime), asks the pure decisions in `poolkeeper_core` for plans, and executes
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

//!
//! Where things are: `run` (the loop), `objects` (declared objects applied), `claims`, `pools`,
//! `deployments`, `instances` (what the runtime reports), `pass` (reconcile and commit),
//! `report` and [`status`] (status), `tokens`, [`durable`] (the ops kept in the store),
//! [`EngineHandle`] (the engine's API), [`source`] (what a source plugs into).

mod autoscale;
mod claims;
mod clock;
mod deployments;
pub mod durable;
mod handle;
mod instances;
pub mod limits;
pub mod metrics;
mod objects;
mod pass;
mod pools;
mod report;
mod run;
pub mod source;
pub mod status;
mod storedown;
mod tokens;

pub use clock::{Clock, ManualClock, SystemClock, TokioClock};
pub use handle::{
    ClaimBrief, ClaimChange, ContainerAction, Creation, EngineHandle, InstanceLogs, PutFilesError,
    TokenOwner, Tokens,
};
pub use source::SourceEvent;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{error, warn};

use poolkeeper_core::claims::Verdict;
use poolkeeper_core::pool::{InstancePhase, Slot};
use poolkeeper_core::ports::PortBook;
use poolkeeper_kinds::{
    ClaimPhase, ClaimSpec, Condition, DeploymentSpec, Diagnostic, Origin, PoolSpec, UserSpec,
};
use poolkeeper_runtime::Runtime;
use poolkeeper_store::Store;

use crate::durable::{Durable, Op};
use crate::handle::Input;
use crate::source::UserToken;
use crate::status::Events;

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
    /// Failures injected into the state store's writes (tests of a full disk).
    pub store_faults: Option<Arc<poolkeeper_store::Faults>>,
    /// Resolves what declared objects refer to (a claim's `filesFrom`, a user's token secret):
    /// the source's own resolver ([`source::InlineOnly`] by default).
    pub resolve: Arc<dyn source::Resolve>,
}

impl EngineConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            state_dir: state_dir.into(),
            resync_every: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            sync: true,
            on_flush: None,
            store_faults: None,
            resolve: Arc::new(source::InlineOnly),
        }
    }
}

struct PoolEntry {
    /// None: no longer declared; draining until its last instance is gone.
    spec: Option<PoolSpec>,
    origin: Origin,
    generation: i64,
    /// Its template's hash, shared with the records of its instances of that template.
    hash: Arc<str>,
    conditions: Vec<Condition>,
    events: Events,
    hits: u64,
    misses: u64,
    create_failures: u32,
    create_backoff_until: u64,
    /// The last failure to create was the runtime's Unavailable: see `CreateBackoff::unavailable`.
    create_unavailable: bool,
    /// Last failure to create, shown as a condition until a creation succeeds.
    create_error: Option<(&'static str, String)>,
    ports_exhausted: bool,
    /// The labels of instances of the current template (shared by all of them).
    labels: Option<poolkeeper_runtime::Labels>,
    /// What `autoscale` observed and decided (see `autoscale`).
    scale: autoscale::ScaleState,
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
    /// Bound durably, files still being copied (or the binding still being recorded on the
    /// instance, on runtimes that keep bindings): not reported Bound yet.
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
    lost: Option<Box<(String, u64)>>,
    /// The latest text of its file is invalid (the last valid spec is in use).
    invalid: Option<Box<(String, u64)>>,
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
    /// Slots whose instance the engine stopped (declared `stopped`): started again in place
    /// once no longer declared so.
    stopped: std::collections::BTreeSet<String>,
    /// (container, trigger) -> what its log trigger saw.
    triggers: HashMap<(String, String), TriggerState>,
    /// (container, replica) -> the creations that failed in a row, when the next may be tried,
    /// and the last failure: a slot whose container cannot be made backs off as a pool does.
    create_backoff: BTreeMap<(String, u32), CreateBackoff>,
    /// When ensuring the network may be tried again after it failed.
    network_retry_at: u64,
    /// When a NameConflict is looked at again (one wakeup pending at a time).
    conflict_retry_at: u64,
    conditions: Vec<Condition>,
    events: Events,
}

impl DeploymentEntry {
    fn new(origin: Origin, generation: i64) -> DeploymentEntry {
        DeploymentEntry {
            spec: None,
            last_spec: None,
            origin,
            generation,
            hashes: BTreeMap::new(),
            network_ready: None,
            network_pending: false,
            restarts: HashMap::new(),
            stopped: Default::default(),
            triggers: HashMap::new(),
            create_backoff: BTreeMap::new(),
            network_retry_at: 0,
            conflict_retry_at: 0,
            conditions: Vec::new(),
            events: Events::default(),
        }
    }
}

/// A deployment slot's creations that failed in a row.
struct CreateBackoff {
    /// The container's spec hash the failures were of: a changed spec is tried at once.
    hash: String,
    failures: u32,
    until: u64,
    error: String,
    /// The last failure was the runtime's Unavailable (a node down): the wait ends early when the
    /// runtime asks for a relist, which it does when a node returns.
    unavailable: bool,
}

/// How long a creation that failed `failures` times in a row waits before the next.
fn create_backoff_ms(failures: u32) -> u64 {
    (500u64 << failures.min(10)).min(CREATE_BACKOFF_MAX_MS)
}

/// The longest wait between two creations that fail. Why 60 s: long enough that a pool or a
/// container with a broken image does not hammer the runtime, short enough that a fixed image is
/// picked up within a minute.
const CREATE_BACKOFF_MAX_MS: u64 = 60_000;

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
    /// Boxed (with the deployment's name, the container's and the replica): most instances
    /// are a pool's, and the record of each of 100k pool instances is 48 bytes smaller.
    deployment: Option<Box<(String, String, u32)>>,
    /// The pool entry's own string when the instance is of the pool's template (made by this
    /// engine, or first reported once the pool was declared): one string per template, not one
    /// per instance. Compared by content, so a record made before its pool was declared, which
    /// holds a string of its own, compares the same.
    hash: Arc<str>,
    phase: InstancePhase,
    exit_code: Option<i64>,
    /// The host ports it holds in the engine's table (none where its runtime gives each
    /// instance an address of its own, see `Instance::host_ports`).
    ports: Vec<u16>,
    /// Interned (see `Engine::nodes`): one string per node, shared by its instances.
    node: Arc<str>,
    /// Published ports, as the runtime reports them.
    bindings: Vec<poolkeeper_runtime::PortBinding>,
    claim: Option<String>,
    /// The binding the runtime records on the instance (runtimes that keep bindings, see
    /// `Runtime::keeps_bindings`): it is nobody else's while it says so. Boxed: most instances
    /// record none, and a record is 32 bytes smaller.
    recorded: Option<Box<Recorded>>,
    /// Its reset is scheduled or in flight. A removal asked for meanwhile waits for it (the
    /// record is `Deleting` and `resetting`): a reset may make the instance again under its
    /// name (a pod's restart), after a removal that ran beside it.
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
    /// When this engine asked for it, until it is first ready (its pool's fill time).
    created_ms: Option<u64>,
}

/// Work on a claim's instance in flight (see `Engine::claim_work`).
#[derive(Debug, Default)]
struct ClaimWork {
    in_flight: u32,
    /// Since when the instance's reset, due, waits for the work to end (at most
    /// `CLAIM_WORK_WAIT_MS`).
    reset_waits_since: Option<u64>,
}

/// How long a reset waits for the claim's work on the instance (a copy of files, an upload, a
/// resize). Why 60 s: far longer than a 16 MiB copy takes; a copy that hangs (an exec whose
/// command never ends) must not hold the instance for good: it is replaced instead.
const CLAIM_WORK_WAIT_MS: u64 = 60_000;

/// A binding as the runtime records it on an instance (see `RecordedBinding`).
#[derive(Debug, PartialEq, Eq)]
struct Recorded {
    claim: String,
    /// The claim's user when it was bound (`LABEL_USER`); none on instances bound by versions
    /// that did not record it.
    user: Option<String>,
    /// When it was bound (`LABEL_BOUND_AT`).
    at: Option<u64>,
}

impl Recorded {
    /// The binding `instance`'s labels record, if any. Its user only if the user label was
    /// written with this binding (an earlier version rebinding it left the label as it was).
    fn of(instance: &poolkeeper_runtime::Instance) -> Option<(&str, Option<&str>, Option<u64>)> {
        use poolkeeper_runtime::{LABEL_BOUND_AT, LABEL_CLAIM, LABEL_USER, LABEL_USER_BOUND_AT};
        let claim = instance.label(LABEL_CLAIM)?;
        let at_label = instance.label(LABEL_BOUND_AT);
        let at = at_label.and_then(|v| v.parse().ok());
        let user = instance
            .label(LABEL_USER)
            .filter(|_| at_label.is_some() && instance.label(LABEL_USER_BOUND_AT) == at_label);
        Some((claim, user, at))
    }

    fn is(&self, (claim, user, at): (&str, Option<&str>, Option<u64>)) -> bool {
        self.claim == claim && self.user.as_deref() == user && self.at == at
    }
}

impl PoolEntry {
    fn new(origin: Origin, generation: i64, hash: Arc<str>) -> Self {
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
            create_unavailable: false,
            create_error: None,
            ports_exhausted: false,
            labels: None,
            scale: Default::default(),
        }
    }
}

impl InstRec {
    /// Bound here, or recorded by the runtime as a claim's (another controller's, or a binding
    /// not adopted yet) while it lives: nobody else may have it, and it counts as bound.
    fn held(&self) -> bool {
        self.claim.is_some() || (self.recorded.is_some() && self.phase != InstancePhase::Dead)
    }

    /// The ports a client dials, as status shows them: the runtime's last report, or the host
    /// ports handed out at creation before the first.
    fn client_ports(&self) -> Vec<u16> {
        if self.bindings.is_empty() {
            self.ports.clone()
        } else {
            self.bindings.iter().map(|b| b.host_port).collect()
        }
    }

    /// A record with nothing known yet beyond its identity and phase.
    fn new(
        name: String,
        pool: Option<String>,
        deployment: Option<(String, String, u32)>,
        hash: Arc<str>,
        phase: InstancePhase,
        now: u64,
    ) -> Self {
        InstRec {
            name,
            pool,
            deployment: deployment.map(Box::new),
            hash,
            phase,
            exit_code: None,
            ports: Vec::new(),
            node: no_node(),
            bindings: Vec::new(),
            claim: None,
            recorded: None,
            resetting: false,
            used: false,
            quarantined: None,
            ready_since: now,
            slot: None,
            create_in_flight: false,
            revision: 0,
            seen_epoch: 0,
            created_ms: None,
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

    fn counts(&self) -> poolkeeper_core::pool::PoolCounts {
        poolkeeper_core::pool::PoolCounts {
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
    /// The instance is quarantined durably: record it on the instance too.
    Quarantine { instance: String },
}

pub struct Engine<R: Runtime> {
    rt: Arc<R>,
    store: Store<Durable>,
    tx: mpsc::UnboundedSender<Input>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    /// Boxed: a node of the tree then holds pointers, not eleven 1 KB entries, most of them
    /// empty slots.
    pools: BTreeMap<String, Box<PoolEntry>>,
    claims: HashMap<String, Box<ClaimEntry>>,
    users: BTreeMap<String, UserEntry>,
    deployments: BTreeMap<String, DeploymentEntry>,
    instances: HashMap<String, Box<InstRec>>,
    pool_index: HashMap<String, PoolIndex>,
    /// Instances changed since they were last classified into their pool's index.
    touched: std::collections::HashSet<String>,
    /// The latest binding's time (see `Engine::bind_stamp`).
    last_bound_at: u64,
    /// The node names instances were reported on, each held once (see `InstRec::node`); a
    /// name no record holds any more is dropped at the next list.
    nodes: std::collections::HashSet<Arc<str>>,
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
    /// Users whose claims are all admitted again at the next pass.
    dirty_users: BTreeSet<String>,
    /// Claims that arrived since the last pass after all their user's others (by arrival): each
    /// is admitted from its user's tally alone, unless its user is in `dirty_users`.
    arrivals: BTreeSet<(u64, String)>,
    /// Per user, the verdicts of its claims counted (see [`claims::Tally`]).
    tallies: HashMap<String, claims::Tally>,
    /// Debug builds only: users whose tally changed one claim at a time since the last pass,
    /// checked against a full count after it.
    counted_alone: BTreeSet<String>,
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
    /// The store's failed compactions already logged.
    compaction_failures_told: u64,
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
    /// Work on a claim's instance in flight (its binding's files, an upload, a resize), by
    /// instance: a reset waits for it, or what it writes would land on the fresh instance and
    /// be handed to the next claim (see `Engine::claim_work_ended`).
    claim_work: HashMap<String, ClaimWork>,
    create_queue: std::collections::VecDeque<(String, Box<poolkeeper_runtime::InstanceSpec>)>,
    started: bool,
    subscribers: Vec<mpsc::UnboundedSender<ClaimChange>>,
    /// Who waits for the engine to have started (see [`EngineHandle::started`]).
    started_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    no_files: Arc<Vec<(String, Vec<u8>)>>,
    started_at_ms: u64,
    name_counter: u64,
    /// Claims forgotten in this pass: their store records are stale until the commit.
    forgotten: std::collections::HashSet<String>,
    /// Instances released before the runtime was first listed (a claim changed or deleted
    /// before the first pass), to be reset at startup if they exist.
    unlisted_resets: BTreeSet<String>,
    /// Tasks following the output of instances whose container has log triggers.
    log_followers: HashMap<String, tokio::task::AbortHandle>,
    metrics: metrics::EngineMetrics,
    /// The state store failed to write, and since when (None: it writes).
    store_down: Option<storedown::StoreDown>,
    /// When autoscaled pools are next decided again (see `autoscale`).
    autoscale_next_ms: u64,
    /// The users' token digests, as the API reads them (see [`Tokens`]).
    tokens: Tokens,
    /// A user or its token changed since `tokens` was last published: it is, once per batch
    /// of inputs (not once per user: a start applying thousands would rebuild it each time).
    tokens_stale: bool,
}

impl<R: Runtime> Engine<R> {
    /// An engine on `store` with nothing declared, nothing listed, nothing started.
    fn new(
        rt: Arc<R>,
        store: Store<Durable>,
        tx: mpsc::UnboundedSender<Input>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        tokens: Tokens,
    ) -> Self {
        let next_seq = store.state().next_seq;
        let now = clock.now_ms();
        Engine {
            tokens,
            tokens_stale: false,
            rt,
            store,
            tx,
            clock,
            config,
            pools: BTreeMap::new(),
            claims: HashMap::new(),
            users: BTreeMap::new(),
            deployments: BTreeMap::new(),
            instances: HashMap::new(),
            pool_index: HashMap::new(),
            touched: std::collections::HashSet::new(),
            nodes: std::collections::HashSet::new(),
            last_bound_at: 0,
            claims_by_pool: HashMap::new(),
            claims_by_user: HashMap::new(),
            queues: HashMap::new(),
            to_report: BTreeSet::new(),
            ports: PortBook::default(),
            diagnostics: BTreeMap::new(),
            dirty_pools: BTreeSet::new(),
            dirty_users: BTreeSet::new(),
            arrivals: BTreeSet::new(),
            tallies: HashMap::new(),
            counted_alone: BTreeSet::new(),
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
            compaction_failures_told: 0,
            synced: false,
            listed: false,
            list_epoch: 0,
            recently_gone: HashMap::new(),
            creates_in_flight: 0,
            claim_work: HashMap::new(),
            create_queue: std::collections::VecDeque::new(),
            started: false,
            subscribers: Vec::new(),
            started_waiters: Vec::new(),
            no_files: Arc::new(Vec::new()),
            started_at_ms: now,
            // A million names per millisecond of start time: two controllers sharing a daemon,
            // started a millisecond apart, make different names (the runtime refuses to replace
            // a container it did not make, but each refusal costs a creation's backoff).
            name_counter: now << 20,
            forgotten: std::collections::HashSet::new(),
            unlisted_resets: BTreeSet::new(),
            log_followers: HashMap::new(),
            metrics: Default::default(),
            store_down: None,
            autoscale_next_ms: 0,
        }
    }
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
            faults: config.store_faults.clone(),
            ..poolkeeper_store::Options::default()
        },
    )
    .map_err(|source| EngineError::Store {
        dir: config.state_dir.clone(),
        source,
    })?;
    let recovery = *store.recovery();
    if let Some(at) = recovery.damaged_at {
        error!(
            store = %store.dir().display(),
            offset = at,
            dropped_bytes = recovery.dropped_tail_bytes,
            whole_records_after = recovery.records_after_damage,
            kept_beside_the_log = recovery.damaged_kept,
            "state store: a bad log record was followed by whole records, which were cut with \
             it. After a power cut these are records never flushed (never acknowledged); if \
             the log was damaged since it was written, they may hold acknowledged claims and \
             bindings: check the instances' claims. The cut bytes are kept beside the log as \
             wal-*.log.damaged-OFFSET when kept_beside_the_log is true"
        );
    } else if recovery.dropped_tail_bytes > 0 {
        warn!(
            dropped_bytes = recovery.dropped_tail_bytes,
            "state store: dropped a torn tail (a batch that was never acknowledged)"
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let tokens = Tokens::default();
    let clock = config.clock.clone();
    let engine = Engine::new(rt, store, tx.clone(), clock, config, tokens.clone());
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
    let mut engine = engine;
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

/// The node of an instance not reported yet: one allocation shared by all of them.
fn no_node() -> Arc<str> {
    static EMPTY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    EMPTY.clone()
}

/// `s` as held in `set`, added if new.
fn intern(set: &mut std::collections::HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(held) = set.get(s) {
        return held.clone();
    }
    let held: Arc<str> = Arc::from(s);
    set.insert(held.clone());
    held
}

/// Drops from `set` the strings nothing else holds any more.
fn forget_unheld(set: &mut std::collections::HashSet<Arc<str>>) {
    set.retain(|s| Arc::strong_count(s) > 1);
}

/// The hash that marks instances made from one template.
pub fn hash_of<T: serde::Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interned_string_is_held_once_and_dropped_once_nothing_else_holds_it() {
        let mut set = std::collections::HashSet::new();
        let a = intern(&mut set, "node-a");
        let again = intern(&mut set, "node-a");
        assert!(Arc::ptr_eq(&a, &again), "one allocation per name");
        let b = intern(&mut set, "node-b");
        assert_eq!(set.len(), 2);
        drop(b);
        forget_unheld(&mut set);
        assert_eq!(set.len(), 1, "node-b is held by nothing but the set");
        drop((a, again));
        forget_unheld(&mut set);
        assert!(set.is_empty());
    }
}
