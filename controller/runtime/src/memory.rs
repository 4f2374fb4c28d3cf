//! An in-memory runtime: a real implementation of [`Runtime`] whose instances live in a map,
//! with configurable latency and injectable faults, deterministic for a given seed (fault
//! decisions are drawn from a seeded generator in call order).
//!
//! It outlives the engines that use it, so simulations can "restart the controller" against the
//! same running instances, as a real controller restarts against a running Docker daemon.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use super::{
    ExecOutput, Instance, InstanceSpec, InstanceState, Result, Runtime, RuntimeError, RuntimeEvent,
};

#[derive(Clone, Debug)]
pub struct MemoryConfig {
    pub seed: u64,
    /// Time a create takes before it returns.
    pub create_latency: Duration,
    /// Time from start to passing readiness.
    pub ready_delay: Duration,
    /// Probability that a create fails.
    pub create_failure_rate: f64,
    /// Name of the node instances are placed on.
    pub node: String,
    /// Record bindings on the instances (a label), as the Kubernetes runtime does on pods.
    pub keep_bindings: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            seed: 0,
            create_latency: Duration::ZERO,
            ready_delay: Duration::ZERO,
            create_failure_rate: 0.0,
            node: "memory".to_owned(),
            keep_bindings: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Sim {
    instance: Instance,
    files: BTreeMap<String, Vec<u8>>,
    /// Bumped on every (re)start so that a stale readiness timer does nothing.
    incarnation: u64,
    logs: Vec<String>,
    /// Its cpu (millicores) and memory (bytes) limits: the spec's, then as resized.
    resources: (Option<u64>, Option<u64>),
}

#[derive(Debug)]
struct Inner {
    config: MemoryConfig,
    rng: SmallRng,
    /// Boxed: the table's empty slots then cost a pointer, not a whole `Sim`.
    instances: HashMap<String, Box<Sim>>,
    subscribers: Vec<mpsc::UnboundedSender<RuntimeEvent>>,
    networks: BTreeSet<String>,
    /// Named volumes (created by the first container mounting them), with their deployment.
    volumes: BTreeMap<String, Option<String>>,
    images_missing: BTreeSet<String>,
    foreign_ports: BTreeSet<u16>,
    /// Host ports bound by instances (a daemon refuses a second bind of the same port).
    bound_ports: std::collections::HashSet<u16>,
    fail_next_creates: u32,
    /// Creates fail Unavailable (a node down) while set.
    unavailable: bool,
    fail_exec: bool,
    fail_restart: bool,
    fail_files: Option<(u32, RuntimeError)>,
    /// A list is taken at once and returned this much later (a slow daemon).
    list_latency: Duration,
    hold_readiness: bool,
    drop_events: bool,
    creates: u64,
    removes: u64,
    /// How long a removal takes (a container's graceful stop).
    remove_latency: Duration,
    /// How long an exec takes before it runs.
    exec_latency: Duration,
    /// How long a copy of files takes before it lands.
    files_latency: Duration,
    /// Each removal, in order, with the instances that still existed when it began (kept
    /// only after `record_removals`: it costs the world's size per removal).
    removal_log: Vec<(String, BTreeSet<String>)>,
    log_removals: bool,
    log_followers: HashMap<String, Vec<mpsc::UnboundedSender<String>>>,
}

/// The in-memory runtime. Cloning shares the same simulated world.
#[derive(Clone, Debug)]
pub struct MemoryRuntime {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemoryRuntime {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl MemoryRuntime {
    pub fn new(config: MemoryConfig) -> Self {
        let rng = SmallRng::seed_from_u64(config.seed);
        MemoryRuntime {
            inner: Arc::new(Mutex::new(Inner {
                config,
                rng,
                instances: HashMap::new(),
                subscribers: Vec::new(),
                networks: BTreeSet::new(),
                volumes: BTreeMap::new(),
                images_missing: BTreeSet::new(),
                foreign_ports: BTreeSet::new(),
                bound_ports: std::collections::HashSet::new(),
                fail_next_creates: 0,
                unavailable: false,
                fail_exec: false,
                fail_restart: false,
                fail_files: None,
                list_latency: Duration::ZERO,
                hold_readiness: false,
                drop_events: false,
                creates: 0,
                remove_latency: Duration::ZERO,
                exec_latency: Duration::ZERO,
                files_latency: Duration::ZERO,
                removal_log: Vec::new(),
                log_removals: false,
                log_followers: HashMap::new(),
                removes: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- fault injection and inspection (tests, benchmarks) ----

    /// The next `n` creates fail.
    pub fn fail_next_creates(&self, n: u32) {
        self.lock().fail_next_creates = n;
    }

    /// While set, every create fails Unavailable, as the Docker runtime's does for a deployment
    /// whose node (and its named volumes) is down.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.lock().unavailable = unavailable;
    }

    pub fn set_create_failure_rate(&self, p: f64) {
        self.lock().config.create_failure_rate = p;
    }

    pub fn set_create_latency(&self, d: Duration) {
        self.lock().config.create_latency = d;
    }

    /// How many followers the instance's output has.
    pub fn log_followers(&self, name: &str) -> usize {
        self.lock().log_followers.get(name).map_or(0, |f| f.len())
    }

    /// The instance prints `line` (seen by `logs` and by followers).
    pub fn emit_log(&self, name: &str, line: &str) -> bool {
        let mut inner = self.lock();
        let Some(sim) = inner.instances.get_mut(name) else {
            return false;
        };
        sim.logs.push(line.to_owned());
        if let Some(followers) = inner.log_followers.get_mut(name) {
            followers.retain(|f| f.send(line.to_owned()).is_ok());
        }
        true
    }

    /// Removals take this long (real time): a graceful stop.
    pub fn set_remove_latency(&self, d: Duration) {
        self.lock().remove_latency = d;
    }

    /// Execs wait this long (real time) before they run.
    pub fn set_exec_latency(&self, d: Duration) {
        self.lock().exec_latency = d;
    }

    /// Copies of files wait this long (real time) before they land.
    pub fn set_files_latency(&self, d: Duration) {
        self.lock().files_latency = d;
    }

    /// From now on, log each removal with the instances that still exist (`removal_log`).
    pub fn record_removals(&self) {
        self.lock().log_removals = true;
    }

    /// Each removal so far (since `record_removals`), in the order they began, with the
    /// instances that still existed at that moment.
    pub fn removal_log(&self) -> Vec<(String, BTreeSet<String>)> {
        self.lock().removal_log.clone()
    }

    pub fn set_ready_delay(&self, d: Duration) {
        self.lock().config.ready_delay = d;
    }

    /// While held, started instances do not become ready.
    pub fn hold_readiness(&self, hold: bool) {
        let mut inner = self.lock();
        inner.hold_readiness = hold;
        if !hold {
            let ready: Vec<Instance> = inner
                .instances
                .values_mut()
                .filter(|s| s.instance.state == InstanceState::Running && !s.instance.ready)
                .map(|s| {
                    s.instance.ready = true;
                    s.instance.clone()
                })
                .collect();
            for i in ready {
                inner.emit(RuntimeEvent::Changed(i));
            }
        }
    }

    pub fn set_image_missing(&self, image: &str, missing: bool) {
        let mut inner = self.lock();
        if missing {
            inner.images_missing.insert(image.to_owned());
        } else {
            inner.images_missing.remove(image);
        }
    }

    /// A process outside poolkeeper holds `port`.
    pub fn hold_foreign_port(&self, port: u16) {
        self.lock().foreign_ports.insert(port);
    }

    pub fn fail_exec(&self, fail: bool) {
        self.lock().fail_exec = fail;
    }

    pub fn fail_restart(&self, fail: bool) {
        self.lock().fail_restart = fail;
    }

    /// Lists are taken at once and returned `d` later.
    pub fn set_list_latency(&self, d: Duration) {
        self.lock().list_latency = d;
    }

    /// Asks the engine to list again, as a runtime does after its event stream reconnects.
    pub fn request_relist(&self) {
        self.lock().emit(RuntimeEvent::Relist);
    }

    /// Reports the instance again as it is, as a watch that lists again reports each pod
    /// before it says the list is done. False when there is no such instance.
    pub fn report_again(&self, name: &str) -> bool {
        let mut inner = self.lock();
        let Some(i) = inner.instances.get(name).map(|s| s.instance.clone()) else {
            return false;
        };
        inner.emit(RuntimeEvent::Changed(i));
        true
    }

    /// Sets (or with `None` removes) a label of the instance, as another version of the
    /// controller might have left it. False when there is no such instance.
    pub fn set_label(&self, name: &str, key: &str, value: Option<&str>) -> bool {
        let mut inner = self.lock();
        let Some(sim) = inner.instances.get_mut(name) else {
            return false;
        };
        let mut labels = (*sim.instance.labels).clone();
        match value {
            Some(v) => labels.insert(key.to_owned(), v.to_owned()),
            None => labels.remove(key),
        };
        sim.instance.labels = Arc::new(labels);
        let i = sim.instance.clone();
        inner.emit(RuntimeEvent::Changed(i));
        true
    }

    /// The next `n` file copies fail with `error`.
    pub fn fail_next_files(&self, n: u32, error: RuntimeError) {
        self.lock().fail_files = (n > 0).then_some((n, error));
    }

    /// While set, changes happen but no events are delivered (a lossy event stream).
    pub fn drop_events(&self, drop: bool) {
        self.lock().drop_events = drop;
    }

    /// The instance exits with `code`, as a crash or `docker kill` would.
    pub fn crash(&self, name: &str, code: i64) -> bool {
        let mut inner = self.lock();
        let Some(sim) = inner.instances.get_mut(name) else {
            return false;
        };
        sim.instance.state = InstanceState::Exited { code: Some(code) };
        sim.instance.ready = false;
        let i = sim.instance.clone();
        inner.emit(RuntimeEvent::Changed(i));
        true
    }

    /// The instance disappears behind the controller's back (`docker rm -f`).
    pub fn remove_behind_back(&self, name: &str) -> bool {
        let mut inner = self.lock();
        let removed = inner.instances.remove(name);
        let existed = removed.is_some();
        if let Some(sim) = removed {
            for p in &sim.instance.ports {
                inner.bound_ports.remove(&p.host_port);
            }
            inner.emit(RuntimeEvent::Removed(name.to_owned()));
        }
        existed
    }

    /// How many instances there are, and how many of them are ready (no copies).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        let ready = inner
            .instances
            .values()
            .filter(|s| s.instance.ready)
            .count();
        (inner.instances.len(), ready)
    }

    /// A snapshot of every instance.
    /// An instance's cpu (millicores) and memory (bytes) limits, as created or resized.
    pub fn resources(&self, name: &str) -> Option<(Option<u64>, Option<u64>)> {
        self.lock().instances.get(name).map(|s| s.resources)
    }

    pub fn instances(&self) -> Vec<Instance> {
        let mut v: Vec<Instance> = self
            .lock()
            .instances
            .values()
            .map(|s| s.instance.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn files(&self, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        self.lock().instances.get(name).map(|s| s.files.clone())
    }

    pub fn networks(&self) -> BTreeSet<String> {
        self.lock().networks.clone()
    }

    /// Named volumes that exist.
    pub fn volumes(&self) -> BTreeSet<String> {
        self.lock().volumes.keys().cloned().collect()
    }

    /// (creates, removes) performed so far.
    pub fn counters(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.creates, inner.removes)
    }

    /// Instance is running: mark ready now, or after the configured delay.
    fn schedule_ready(&self, name: &str) {
        let (delay, incarnation) = {
            let mut inner = self.lock();
            let hold = inner.hold_readiness;
            let delay = inner.config.ready_delay;
            let Some(sim) = inner.instances.get_mut(name) else {
                return;
            };
            sim.incarnation += 1;
            if hold {
                return;
            }
            if delay.is_zero() {
                sim.instance.ready = true;
                let i = sim.instance.clone();
                inner.emit(RuntimeEvent::Changed(i));
                return;
            }
            (delay, sim.incarnation)
        };
        let this = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut inner = this.lock();
            if inner.hold_readiness {
                return;
            }
            let Some(sim) = inner.instances.get_mut(&name) else {
                return;
            };
            if sim.incarnation == incarnation && sim.instance.state == InstanceState::Running {
                sim.instance.ready = true;
                let i = sim.instance.clone();
                inner.emit(RuntimeEvent::Changed(i));
            }
        });
    }
}

impl Inner {
    fn emit(&mut self, ev: RuntimeEvent) {
        if self.drop_events {
            return;
        }
        self.subscribers.retain(|s| s.send(ev.clone()).is_ok());
    }
}

impl Runtime for MemoryRuntime {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn keeps_bindings(&self) -> bool {
        self.lock().config.keep_bindings
    }

    /// As the pod runtime: the claim label set (or cleared), refused while another claim's.
    async fn bind(&self, name: &str, binding: Option<crate::RecordedBinding<'_>>) -> Result<u64> {
        let claim = binding.map(|b| b.claim);
        let mut inner = self.lock();
        if !inner.config.keep_bindings {
            return Ok(0);
        }
        let Some(sim) = inner.instances.get_mut(name) else {
            return Err(RuntimeError::NotFound(name.to_owned()));
        };
        let current = sim.instance.label(crate::LABEL_CLAIM).map(str::to_owned);
        if current.as_deref() == claim {
            return Ok(0);
        }
        if let (Some(other), Some(_)) = (&current, claim) {
            return Err(RuntimeError::Conflict {
                instance: name.to_owned(),
                reason: format!("{name} is bound to claim {other}"),
                holder: Some(other.clone()),
            });
        }
        let mut labels = (*sim.instance.labels).clone();
        match binding {
            Some(b) => labels.extend(b.labels().map(|(k, v)| (k.to_owned(), v))),
            None => crate::RESET_CLEARS.iter().for_each(|k| {
                labels.remove(*k);
            }),
        }
        sim.instance.labels = Arc::new(labels);
        let i = sim.instance.clone();
        inner.emit(RuntimeEvent::Changed(i));
        Ok(0)
    }

    async fn quarantine(&self, name: &str) -> Result<()> {
        if !self.lock().config.keep_bindings
            || self.set_label(name, crate::LABEL_QUARANTINED, Some("true"))
        {
            return Ok(());
        }
        Err(RuntimeError::NotFound(name.to_owned()))
    }

    fn endpoint_host(&self, _node: &str) -> String {
        "127.0.0.1".to_owned()
    }

    async fn list(&self) -> Result<Vec<Instance>> {
        let list = self.instances();
        let latency = self.lock().list_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        Ok(list)
    }

    async fn create(&self, spec: InstanceSpec) -> Result<Instance> {
        let latency = self.lock().config.create_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        // As Docker: a container whose host port another process holds is made, fails to
        // start, and is removed (and reported removed) before the creation returns, which
        // takes the time of that removal.
        let foreign = {
            let mut inner = self.lock();
            let port = spec
                .ports
                .iter()
                .map(|p| p.host_port)
                .find(|p| inner.foreign_ports.contains(p));
            let made = !inner.instances.contains_key(&spec.name)
                && !inner.images_missing.contains(&spec.image);
            if port.is_some() && made {
                inner.emit(RuntimeEvent::Removed(spec.name.clone()));
            }
            port
        };
        if let Some(port) = foreign {
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Err(RuntimeError::PortInUse { port });
        }
        let instance = {
            let mut inner = self.lock();
            if inner.instances.contains_key(&spec.name) {
                return Err(RuntimeError::Failed(format!(
                    "an instance named {} already exists",
                    spec.name
                )));
            }
            if inner.images_missing.contains(&spec.image) {
                return Err(RuntimeError::ImageMissing {
                    image: spec.image,
                    reason: "not present, and the pull policy does not allow pulling it".to_owned(),
                });
            }
            if let Some(p) = spec
                .ports
                .iter()
                .find(|p| inner.bound_ports.contains(&p.host_port))
            {
                return Err(RuntimeError::PortInUse { port: p.host_port });
            }
            if inner.unavailable {
                return Err(RuntimeError::Unavailable("injected: node down".into()));
            }
            if inner.fail_next_creates > 0 {
                inner.fail_next_creates -= 1;
                return Err(RuntimeError::Failed("injected create failure".into()));
            }
            let p = inner.config.create_failure_rate;
            if p > 0.0 && inner.rng.random_bool(p.min(1.0)) {
                return Err(RuntimeError::Failed(
                    "injected random create failure".into(),
                ));
            }
            if let Some(net) = &spec.network
                && !inner.networks.contains(net)
            {
                return Err(RuntimeError::Failed(format!("network {net} not found")));
            }
            let deployment = spec.labels.get(crate::LABEL_DEPLOYMENT).cloned();
            for source in spec.volumes.keys() {
                if !poolkeeper_core::deployment::is_host_path(source) {
                    inner
                        .volumes
                        .entry(source.clone())
                        .or_insert_with(|| deployment.clone());
                }
            }
            let instance = Instance {
                name: spec.name.clone(),
                labels: spec.labels.clone(),
                state: InstanceState::Running,
                ready: false,
                ports: spec.ports.clone(),
                host_ports: true,
                node: inner.config.node.clone(),
                revision: 0,
            };
            inner.creates += 1;
            inner
                .bound_ports
                .extend(spec.ports.iter().map(|p| p.host_port));
            inner.instances.insert(
                spec.name.clone(),
                Box::new(Sim {
                    instance: instance.clone(),
                    files: BTreeMap::new(),
                    incarnation: 0,
                    logs: Vec::new(),
                    resources: (spec.cpu_millis, spec.memory_bytes),
                }),
            );
            inner.emit(RuntimeEvent::Changed(instance.clone()));
            instance
        };
        self.schedule_ready(&spec.name);
        // Return the freshest view (it may already be ready).
        let inner = self.lock();
        Ok(inner
            .instances
            .get(&spec.name)
            .map(|s| s.instance.clone())
            .unwrap_or(instance))
    }

    async fn remove(&self, name: &str) -> Result<()> {
        let latency = {
            let mut inner = self.lock();
            if inner.log_removals && inner.instances.contains_key(name) {
                let others = inner
                    .instances
                    .keys()
                    .filter(|n| *n != name)
                    .cloned()
                    .collect();
                inner.removal_log.push((name.to_owned(), others));
            }
            inner.remove_latency
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut inner = self.lock();
        inner.log_followers.remove(name);
        if let Some(sim) = inner.instances.remove(name) {
            for p in &sim.instance.ports {
                inner.bound_ports.remove(&p.host_port);
            }
            inner.removes += 1;
            inner.emit(RuntimeEvent::Removed(name.to_owned()));
        }
        Ok(())
    }

    async fn restart(&self, name: &str) -> Result<()> {
        {
            let mut inner = self.lock();
            if inner.fail_restart {
                return Err(RuntimeError::Failed("injected restart failure".into()));
            }
            let Some(sim) = inner.instances.get_mut(name) else {
                return Err(RuntimeError::NotFound(name.to_owned()));
            };
            sim.instance.state = InstanceState::Running;
            sim.instance.ready = false;
            sim.logs.push("restarted".into());
            let i = sim.instance.clone();
            inner.emit(RuntimeEvent::Changed(i));
        }
        self.schedule_ready(name);
        Ok(())
    }

    async fn resize(
        &self,
        name: &str,
        cpu_millis: Option<u64>,
        memory_bytes: Option<u64>,
    ) -> Result<()> {
        let mut inner = self.lock();
        let Some(sim) = inner.instances.get_mut(name) else {
            return Err(RuntimeError::NotFound(name.to_owned()));
        };
        if let Some(c) = cpu_millis {
            sim.resources.0 = Some(c);
        }
        if let Some(m) = memory_bytes {
            sim.resources.1 = Some(m);
        }
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let Some(sim) = inner.instances.get_mut(name) else {
            return Err(RuntimeError::NotFound(name.to_owned()));
        };
        if sim.instance.state == InstanceState::Running {
            sim.instance.state = InstanceState::Exited { code: Some(0) };
            sim.instance.ready = false;
            sim.logs.push("stopped".into());
            let i = sim.instance.clone();
            inner.emit(RuntimeEvent::Changed(i));
        }
        Ok(())
    }

    async fn exec(&self, name: &str, command: &[String]) -> Result<ExecOutput> {
        let latency = self.lock().exec_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut inner = self.lock();
        let fail = inner.fail_exec;
        let Some(sim) = inner.instances.get_mut(name) else {
            return Err(RuntimeError::NotFound(name.to_owned()));
        };
        if sim.instance.state != InstanceState::Running {
            return Err(RuntimeError::NotRunning(name.to_owned()));
        }
        if fail {
            return Ok(ExecOutput {
                exit_code: 1,
                output: "injected exec failure\n".into(),
            });
        }
        // The simulator understands one reset idiom: `rm -rf DIR` empties files under DIR.
        if let [rm, flag, dir] = command
            && rm == "rm"
            && flag == "-rf"
        {
            let prefix = dir.trim_end_matches('/').to_owned() + "/";
            sim.files.retain(|k, _| !k.starts_with(&prefix));
        }
        Ok(ExecOutput {
            exit_code: 0,
            output: String::new(),
        })
    }

    async fn put_files(&self, name: &str, dir: &str, files: &[(String, Vec<u8>)]) -> Result<()> {
        let latency = self.lock().files_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut inner = self.lock();
        if let Some((n, e)) = inner.fail_files.take() {
            if n > 1 {
                inner.fail_files = Some((n - 1, e.clone()));
            }
            return Err(e);
        }
        let Some(sim) = inner.instances.get_mut(name) else {
            return Err(RuntimeError::NotFound(name.to_owned()));
        };
        for (path, bytes) in files {
            let full = format!("{}/{}", dir.trim_end_matches('/'), path);
            sim.files.insert(full, bytes.clone());
        }
        Ok(())
    }

    async fn logs(&self, name: &str, tail: usize) -> Result<String> {
        let inner = self.lock();
        let Some(sim) = inner.instances.get(name) else {
            return Err(RuntimeError::NotFound(name.to_owned()));
        };
        let start = sim.logs.len().saturating_sub(tail);
        Ok(sim.logs[start..].join("\n"))
    }

    fn follow_logs(&self, name: &str) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        if inner.instances.contains_key(name) {
            inner
                .log_followers
                .entry(name.to_owned())
                .or_default()
                .push(tx);
        }
        rx
    }

    async fn ensure_network(&self, name: &str) -> Result<()> {
        self.lock().networks.insert(name.to_owned());
        Ok(())
    }

    async fn remove_volumes(&self, deployment: &str) -> Result<()> {
        self.lock()
            .volumes
            .retain(|_, d| d.as_deref() != Some(deployment));
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        self.lock().networks.remove(name);
        Ok(())
    }

    fn subscribe(&self) -> mpsc::UnboundedReceiver<RuntimeEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().subscribers.push(tx);
        rx
    }
}
