//! Shared harness for the simulation tests: an engine on the in-memory runtime with a manual
//! clock, a "source" that remembers what is declared (so a restarted controller is fed the same
//! objects), builders for specs, and polling helpers that wait for conditions with a deadline.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use poolkeeper_engine::status::{EventRecord, Snapshot};
use poolkeeper_engine::{EngineConfig, EngineHandle, ManualClock, SourceEvent};
use poolkeeper_kinds::{
    ClaimPhase, ClaimSpec, ClaimStatus, Condition, ContainerSpec, DeploymentSpec, DeploymentStatus,
    FilesTarget, InstanceTemplate, PoolSpec, PoolStatus, PortRange, PullPolicy, Quota, ResetPolicy,
    UserSpec,
};
use poolkeeper_kinds::{Kind, ObjKey, Object, Origin, Spec};
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_runtime::{
    ExecOutput, Instance, InstanceSpec, InstanceState, LABEL_HASH, LABEL_POOL, RecordedBinding,
    Result as RtResult, Runtime, RuntimeEvent,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long any condition may take to come true before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Where the manual clock starts (2023-11-14, a plausible wall-clock time).
pub const T0_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// A runtime wrapper that counts create attempts (failed ones included), which `counters()` of
// the memory runtime does not.

pub struct Counting {
    pub mem: MemoryRuntime,
    create_calls: AtomicU64,
    creates_done: AtomicU64,
    /// The most create calls outstanding at once.
    max_in_flight: AtomicU64,
    /// Binds still to answer with a conflict (another controller took the instance first).
    pub bind_conflicts: AtomicU64,
    /// Binds still to answer with a conflict and no holder (the instance kept changing while
    /// it was being bound): nothing lands on it.
    pub bind_races: AtomicU64,
    /// How long a bind takes (a patch to an API server), in milliseconds.
    pub bind_delay_ms: AtomicU64,
    /// How long a listing takes (a busy Docker daemon), in milliseconds.
    pub list_delay_ms: AtomicU64,
}

impl Counting {
    pub fn create_calls(&self) -> u64 {
        self.create_calls.load(Ordering::SeqCst)
    }

    pub fn max_creates_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Create calls that have not returned (possibly made by a controller since killed).
    pub fn creates_in_flight(&self) -> u64 {
        self.create_calls() - self.creates_done.load(Ordering::SeqCst)
    }
}

impl Runtime for Counting {
    fn name(&self) -> &'static str {
        self.mem.name()
    }

    fn endpoint_host(&self, node: &str) -> String {
        self.mem.endpoint_host(node)
    }

    fn keeps_bindings(&self) -> bool {
        self.mem.keeps_bindings()
    }

    async fn resize(
        &self,
        name: &str,
        cpu_millis: Option<u64>,
        memory_bytes: Option<u64>,
    ) -> RtResult<()> {
        self.mem.resize(name, cpu_millis, memory_bytes).await
    }

    async fn quarantine(&self, name: &str) -> RtResult<()> {
        self.mem.quarantine(name).await
    }

    async fn bind(&self, name: &str, claim: Option<RecordedBinding<'_>>) -> RtResult<u64> {
        let delay = self.bind_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if claim.is_some()
            && self
                .bind_conflicts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            // Another controller's claim lands on the instance first.
            let theirs = RecordedBinding::new("taken-elsewhere", "someone", 0);
            self.mem.bind(name, Some(theirs)).await?;
            return Err(poolkeeper_runtime::RuntimeError::Conflict {
                instance: name.to_owned(),
                reason: format!("{name} is bound to claim taken-elsewhere"),
                holder: Some("taken-elsewhere".to_owned()),
            });
        }
        if claim.is_some()
            && self
                .bind_races
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(poolkeeper_runtime::RuntimeError::Conflict {
                instance: name.to_owned(),
                reason: format!("{name} kept changing while it was being bound"),
                holder: None,
            });
        }
        self.mem.bind(name, claim).await
    }

    async fn list(&self) -> RtResult<Vec<Instance>> {
        let delay = self.list_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.mem.list().await
    }

    async fn create(&self, spec: InstanceSpec) -> RtResult<Instance> {
        let calls = self.create_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let outstanding = calls - self.creates_done.load(Ordering::SeqCst);
        self.max_in_flight.fetch_max(outstanding, Ordering::SeqCst);
        let r = self.mem.create(spec).await;
        self.creates_done.fetch_add(1, Ordering::SeqCst);
        r
    }

    async fn remove(&self, name: &str) -> RtResult<()> {
        self.mem.remove(name).await
    }

    async fn restart(&self, name: &str) -> RtResult<()> {
        self.mem.restart(name).await
    }

    async fn stop(&self, name: &str) -> RtResult<()> {
        self.mem.stop(name).await
    }

    async fn exec(&self, name: &str, command: &[String]) -> RtResult<ExecOutput> {
        self.mem.exec(name, command).await
    }

    async fn put_files(&self, name: &str, dir: &str, files: &[(String, Vec<u8>)]) -> RtResult<()> {
        self.mem.put_files(name, dir, files).await
    }

    async fn logs(&self, name: &str, tail: usize) -> RtResult<String> {
        self.mem.logs(name, tail).await
    }

    async fn ensure_network(&self, name: &str) -> RtResult<()> {
        self.mem.ensure_network(name).await
    }

    async fn remove_network(&self, name: &str) -> RtResult<()> {
        self.mem.remove_network(name).await
    }

    fn follow_logs(&self, name: &str) -> mpsc::UnboundedReceiver<String> {
        self.mem.follow_logs(name)
    }

    async fn remove_volumes(&self, deployment: &str) -> RtResult<()> {
        self.mem.remove_volumes(deployment).await
    }

    fn subscribe(&self) -> mpsc::UnboundedReceiver<RuntimeEvent> {
        self.mem.subscribe()
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation

pub struct Sim {
    /// The simulated world; outlives controller restarts.
    pub mem: MemoryRuntime,
    pub rt: Arc<Counting>,
    pub clock: ManualClock,
    pub dir: tempfile::TempDir,
    pub handle: EngineHandle,
    join: Option<JoinHandle<()>>,
    /// What the source declares now (fed again to a restarted controller).
    pub declared: BTreeMap<ObjKey, Object>,
    generation: i64,
    /// The state store's last flush: its log and the length that a power loss keeps.
    flushed: Arc<Mutex<Option<(PathBuf, u64)>>>,
    /// Failures injected into the state store's writes (a full disk).
    pub store_faults: Arc<poolkeeper_store::Faults>,
}

impl Sim {
    /// An engine on a fresh in-memory runtime, fed `Synced` at once.
    pub fn new() -> Sim {
        Self::with_config(MemoryConfig::default())
    }

    pub fn with_config(config: MemoryConfig) -> Sim {
        let mem = MemoryRuntime::new(config);
        let rt = Arc::new(Counting {
            mem: mem.clone(),
            create_calls: AtomicU64::new(0),
            creates_done: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            bind_conflicts: AtomicU64::new(0),
            bind_races: AtomicU64::new(0),
            bind_delay_ms: AtomicU64::new(0),
            list_delay_ms: AtomicU64::new(0),
        });
        let clock = ManualClock::new(T0_MS);
        let dir = tempfile::tempdir().unwrap();
        let flushed = Arc::default();
        let store_faults = Arc::default();
        let (handle, join) = start_engine(&rt, &clock, &dir, &flushed, &store_faults);
        handle.send(SourceEvent::Synced).unwrap();
        Sim {
            mem,
            rt,
            clock,
            dir,
            handle,
            join: Some(join),
            declared: BTreeMap::new(),
            generation: 0,
            flushed,
            store_faults,
        }
    }

    pub fn apply(&mut self, name: &str, spec: Spec) {
        self.generation += 1;
        let obj = declared(name, spec, self.generation);
        self.declared.insert(obj.key(), obj.clone());
        self.handle.apply(obj).unwrap();
    }

    pub fn delete(&mut self, kind: Kind, name: &str) {
        let key = ObjKey::new(kind, name);
        self.declared.remove(&key);
        self.handle.delete(key).unwrap();
    }

    /// Moves the manual clock and runs a pass.
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
        self.handle.tick().unwrap();
    }

    /// A graceful controller restart: shut down, start again on the same runtime and state
    /// directory, feed every declared object (in `order` if given, else by key) and `Synced`.
    pub async fn restart(&mut self) {
        self.handle.shutdown().await;
        if let Some(j) = self.join.take() {
            j.await.unwrap();
        }
        self.start_again(false);
    }

    /// An abrupt stop: the engine task is aborted wherever it is, its handle dropped.
    pub async fn kill_and_restart(&mut self) {
        self.abort_engine().await;
        self.start_again(false);
    }

    async fn abort_engine(&mut self) {
        if let Some(j) = self.join.take() {
            j.abort();
            let _ = j.await;
        }
    }

    /// A power loss: the engine is aborted wherever it is, and the state store keeps only what
    /// it had flushed (every write after its last flush is lost, as the page cache is).
    /// Returns how many bytes of the store's log were lost.
    pub async fn power_loss_and_restart(&mut self) -> u64 {
        self.abort_engine().await;
        let flushed = self.flushed.lock().unwrap().clone();
        let mut lost = 0;
        if let Some((log, len)) = flushed
            && log.exists()
        {
            let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
            lost = f.metadata().unwrap().len() - len;
            f.set_len(len).unwrap();
        }
        self.start_again(false);
        lost
    }

    /// A controller started again with an empty state folder (a new pod): what it knows of
    /// bindings comes from the runtime only.
    pub async fn restart_with_empty_store(&mut self) {
        self.abort_engine().await;
        self.dir = tempfile::tempdir().unwrap();
        self.start_again(false);
    }

    /// Like `restart`, but the objects are fed in reverse key order (a source may list files in
    /// any order; arrival order must come from the store, not from the feed).
    pub async fn restart_feeding_in_reverse(&mut self) {
        self.handle.shutdown().await;
        if let Some(j) = self.join.take() {
            j.await.unwrap();
        }
        self.start_again(true);
    }

    /// A graceful restart where `feed` runs after the declared objects and before `Synced`
    /// (what a source might send while the controller starts).
    pub async fn restart_then(&mut self, feed: impl FnOnce(&EngineHandle)) {
        self.handle.shutdown().await;
        if let Some(j) = self.join.take() {
            j.await.unwrap();
        }
        self.start_feeding(feed);
    }

    /// Like `restart_with_empty_store`, with `feed` run as in `restart_then`.
    pub async fn restart_with_empty_store_then(&mut self, feed: impl FnOnce(&EngineHandle)) {
        self.abort_engine().await;
        self.dir = tempfile::tempdir().unwrap();
        self.start_feeding(feed);
    }

    fn start_feeding(&mut self, feed: impl FnOnce(&EngineHandle)) {
        self.start_with(false, feed);
    }

    fn start_again(&mut self, reverse: bool) {
        self.start_with(reverse, |_| {});
    }

    /// Starts the engine again on the same runtime and state folder: the declared objects (in
    /// reverse key order if `reverse`), then `feed`, then `Synced`.
    fn start_with(&mut self, reverse: bool, feed: impl FnOnce(&EngineHandle)) {
        // Wall-clock time passes across a restart.
        self.clock.advance(Duration::from_secs(1));
        let (handle, join) = start_engine(
            &self.rt,
            &self.clock,
            &self.dir,
            &self.flushed,
            &self.store_faults,
        );
        let mut objs: Vec<&Object> = self.declared.values().collect();
        if reverse {
            objs.reverse();
        }
        for o in objs {
            handle.apply(o.clone()).unwrap();
        }
        feed(&handle);
        handle.send(SourceEvent::Synced).unwrap();
        self.handle = handle;
        self.join = Some(join);
    }

    /// Stops the controller gracefully and reads its state store as its next start would.
    pub async fn stop_and_read_store(&mut self) -> poolkeeper_engine::durable::Durable {
        self.handle.shutdown().await;
        if let Some(j) = self.join.take() {
            j.await.unwrap();
        }
        let dir = self.dir.path().join("state");
        let store = poolkeeper_store::Store::<poolkeeper_engine::durable::Durable>::open(&dir);
        store.unwrap().state().clone()
    }

    pub async fn snapshot(&self) -> Snapshot {
        self.handle.snapshot().await.unwrap()
    }

    /// Polls until `cond` holds on (snapshot, runtime instances); panics with `what` and the
    /// state after [`DEADLINE`].
    pub async fn wait_until(
        &self,
        what: &str,
        mut cond: impl FnMut(&Snapshot, &[Instance]) -> bool,
    ) -> Snapshot {
        let start = StdInstant::now();
        loop {
            let snap = self.snapshot().await;
            let insts = self.mem.instances();
            if cond(&snap, &insts) {
                return snap;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out waiting until {what}\n{}",
                    describe(&snap, &insts)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Like `wait_until`, but moves the manual clock by `step` on every poll (so that backoffs
    /// pass while waiting).
    pub async fn wait_advancing(
        &self,
        what: &str,
        step: Duration,
        mut cond: impl FnMut(&Snapshot, &[Instance]) -> bool,
    ) -> Snapshot {
        let start = StdInstant::now();
        loop {
            let snap = self.snapshot().await;
            let insts = self.mem.instances();
            if cond(&snap, &insts) {
                return snap;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out waiting until {what}\n{}",
                    describe(&snap, &insts)
                );
            }
            self.advance(step);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the pool shows `warm` warm instances.
    pub async fn wait_warm(&self, pool: &str, warm: u32) -> Snapshot {
        self.wait_until(&format!("pool {pool} has {warm} warm"), |s, _| {
            pool_status(s, pool).is_some_and(|p| p.warm == warm)
        })
        .await
    }

    /// Waits until the claim reports `phase`; returns its status.
    pub async fn wait_phase(&self, claim: &str, phase: ClaimPhase) -> ClaimStatus {
        let snap = self
            .wait_until(&format!("claim {claim} is {phase}"), |s, _| {
                claim_status(s, claim).is_some_and(|c| c.phase == phase)
            })
            .await;
        claim_status(&snap, claim).unwrap()
    }

    /// Waits until the claim is Bound; returns its instance.
    pub async fn wait_bound(&self, claim: &str) -> String {
        self.wait_phase(claim, ClaimPhase::Bound)
            .await
            .instance
            .unwrap()
    }

    /// Asks the engine for a full resync and returns its snapshot afterwards.
    pub async fn resync(&self) -> Snapshot {
        self.handle.resync().await.unwrap();
        self.snapshot().await
    }
}

fn start_engine(
    rt: &Arc<Counting>,
    clock: &ManualClock,
    dir: &tempfile::TempDir,
    flushed: &Arc<Mutex<Option<(PathBuf, u64)>>>,
    store_faults: &Arc<poolkeeper_store::Faults>,
) -> (EngineHandle, JoinHandle<()>) {
    let mut cfg = EngineConfig::new(dir.path().join("state"));
    cfg.clock = Arc::new(clock.clone());
    // A test's fsyncs cost time on a loaded machine without testing anything more (the store
    // still reports where it would have flushed, which a simulated power loss cuts at).
    cfg.sync = false;
    let flushed = flushed.clone();
    cfg.on_flush = Some(Arc::new(move |log: &std::path::Path, len: u64| {
        *flushed.lock().unwrap() = Some((log.to_path_buf(), len));
    }));
    cfg.store_faults = Some(store_faults.clone());
    poolkeeper_engine::start(rt.clone(), cfg).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Reading a snapshot

fn status_of<T: serde::de::DeserializeOwned>(snap: &Snapshot, kind: Kind, name: &str) -> Option<T> {
    snap.objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .map(|o| serde_json::from_value(o.status.clone()).unwrap())
}

pub fn claim_status(snap: &Snapshot, name: &str) -> Option<ClaimStatus> {
    status_of(snap, Kind::Claim, name)
}

pub fn pool_status(snap: &Snapshot, name: &str) -> Option<PoolStatus> {
    status_of(snap, Kind::Pool, name)
}

pub fn deployment_status(snap: &Snapshot, name: &str) -> Option<DeploymentStatus> {
    status_of(snap, Kind::Deployment, name)
}

pub fn events_of(snap: &Snapshot, kind: Kind, name: &str) -> Vec<EventRecord> {
    snap.objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .map(|o| o.events.clone())
        .unwrap_or_default()
}

pub fn condition<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Every claim by phase: name -> (phase, instance).
pub fn claims(snap: &Snapshot) -> BTreeMap<String, (ClaimPhase, Option<String>)> {
    snap.objects
        .iter()
        .filter(|o| o.kind == Kind::Claim)
        .map(|o| {
            let s: ClaimStatus = serde_json::from_value(o.status.clone()).unwrap();
            (o.name.clone(), (s.phase, s.instance))
        })
        .collect()
}

/// Bound claims -> their instance.
pub fn bindings(snap: &Snapshot) -> BTreeMap<String, String> {
    claims(snap)
        .into_iter()
        .filter_map(|(c, (p, i))| (p == ClaimPhase::Bound).then_some((c, i?)))
        .collect()
}

/// Runtime instances of a pool.
pub fn of_pool<'a>(insts: &'a [Instance], pool: &str) -> Vec<&'a Instance> {
    insts
        .iter()
        .filter(|i| i.label(LABEL_POOL) == Some(pool))
        .collect()
}

pub fn hash_label(i: &Instance) -> String {
    i.label(LABEL_HASH).unwrap_or_default().to_owned()
}

pub fn is_running(i: &Instance) -> bool {
    i.state == InstanceState::Running
}

/// A readable dump of the state for failure messages.
pub fn describe(snap: &Snapshot, insts: &[Instance]) -> String {
    let mut out = String::new();
    for o in &snap.objects {
        let _ = writeln!(out, "  {} {}: {}", o.kind, o.name, o.status);
        for e in o.events.iter().rev().take(4) {
            let _ = writeln!(
                out,
                "      event {} {}: {} (x{})",
                e.type_, e.reason, e.message, e.count
            );
        }
    }
    let _ = writeln!(out, "  engine instances:");
    for i in &snap.instances {
        let _ = writeln!(
            out,
            "    {} pool={:?} dep={:?} phase={} claim={:?} ports={:?} q={:?}",
            i.name, i.pool, i.deployment, i.phase, i.claim, i.ports, i.quarantined
        );
    }
    let _ = writeln!(out, "  runtime instances:");
    for i in insts {
        let ports: Vec<u16> = i.ports.iter().map(|p| p.host_port).collect();
        let _ = writeln!(
            out,
            "    {} {:?} ready={} ports={:?} hash={}",
            i.name,
            i.state,
            i.ready,
            ports,
            hash_label(i)
        );
    }
    out
}

/// Panics if two runtime instances publish the same host port.
pub fn assert_host_ports_unique(insts: &[Instance]) {
    for (a_idx, a) in insts.iter().enumerate() {
        for b in &insts[a_idx + 1..] {
            for pa in &a.ports {
                for pb in &b.ports {
                    assert_ne!(
                        pa.host_port, pb.host_port,
                        "instances {} and {} both publish host port {}",
                        a.name, b.name, pa.host_port
                    );
                }
            }
        }
        let mut own = BTreeSet::new();
        for p in &a.ports {
            assert!(
                own.insert(p.host_port),
                "instance {} publishes {} twice",
                a.name,
                p.host_port
            );
        }
    }
}

/// Panics if one instance is held by two claims, or a Bound claim's instance does not run.
pub fn assert_bindings_sound(snap: &Snapshot, insts: &[Instance]) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for i in &snap.instances {
        if let Some(c) = &i.claim
            && let Some(other) = seen.insert(c.as_str(), i.name.as_str())
        {
            panic!(
                "claim {c} is held by two instances ({other} and {})\n{}",
                i.name,
                describe(snap, insts)
            );
        }
    }
    let mut holders: BTreeMap<String, String> = BTreeMap::new();
    for (claim, inst) in bindings(snap) {
        if let Some(other) = holders.insert(inst.clone(), claim.clone()) {
            panic!(
                "instance {inst} is bound to claims {other} and {claim}\n{}",
                describe(snap, insts)
            );
        }
        let running = insts.iter().any(|i| i.name == inst && is_running(i));
        assert!(
            running,
            "claim {claim} is Bound to {inst}, which does not run\n{}",
            describe(snap, insts)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Specs

/// An object as the simulated source declares it (from `/sim/NAME.yaml`).
pub fn declared(name: &str, spec: Spec, generation: i64) -> Object {
    Object {
        name: name.to_owned(),
        spec,
        origin: Origin {
            file: format!("/sim/{name}.yaml").into(),
            line: 1,
            col: 1,
        },
        generation,
    }
}

pub fn pool(image: &str, warm: u32, max: Option<u32>) -> PoolSpec {
    PoolSpec {
        template: InstanceTemplate {
            image: image.to_owned(),
            ..InstanceTemplate::default()
        },
        warm,
        max,
        host_ports: None,
        reset: ResetPolicy::Recreate,
        reset_command: Vec::new(),
        claim_ttl: None,
        pull_policy: PullPolicy::IfNotPresent,
        autoscale: None,
        exposure: None,
        claim_resources: None,
    }
}

/// A pool whose instances publish one port each from `start..=end`.
pub fn pool_with_ports(image: &str, warm: u32, max: Option<u32>, start: u16, end: u16) -> PoolSpec {
    let mut p = pool(image, warm, max);
    p.template.ports = vec![poolkeeper_kinds::ContainerPort {
        name: "http".into(),
        container_port: 80,
        protocol: poolkeeper_kinds::Protocol::Tcp,
    }];
    p.host_ports = Some(PortRange { start, end });
    p
}

pub fn with_files(mut p: PoolSpec, mount: &str) -> PoolSpec {
    p.template.files = Some(FilesTarget {
        mount_path: mount.to_owned(),
    });
    p
}

pub fn claim(pool: &str, user: &str) -> ClaimSpec {
    ClaimSpec {
        pool: pool.to_owned(),
        user: user.to_owned(),
        ttl: None,
        files: BTreeMap::new(),
        files_from: None,
        resources: None,
    }
}

pub fn user(max_claims: u32) -> UserSpec {
    UserSpec {
        quota: Quota {
            max_claims,
            pools: Vec::new(),
        },
        ..UserSpec::default()
    }
}

pub fn container(name: &str, image: &str, deps: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: image.to_owned(),
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
        replicas: 1,
        ..ContainerSpec::default()
    }
}

pub fn deployment(network: Option<&str>, containers: Vec<ContainerSpec>) -> DeploymentSpec {
    DeploymentSpec {
        network: network.map(str::to_owned),
        containers,
        ..DeploymentSpec::default()
    }
}
