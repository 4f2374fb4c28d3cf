//! The Docker runtime: one or more Docker Engines (unix socket or tcp), driven through bollard.
//!
//! - **Ownership** is in labels (`poolkeeper.dev/managed=true` and the rest); a restarted
//!   controller lists them and adopts what it made. Published ports and the readiness probe are
//!   labels too, so an adopted container is probed and accounted for like a fresh one.
//! - **Events**: one `/events` stream per node, filtered to managed containers; a reconnect asks
//!   the engine to list again, and replays from the last event seen, so nothing is lost.
//! - **Readiness** is probed by the controller (HTTP GET and TCP against the published port, or
//!   exec inside the container): an instance is reported ready only after its probe passes.
//! - **Nodes**: instances are placed on the least-loaded reachable node. A node unreachable for
//!   longer than `node_down_after` is declared down: its instances are reported removed (the
//!   engine replaces them elsewhere and re-binds their claims), and when the node comes back the
//!   containers left on it are removed, so that no stale instance, with a former user's files,
//!   is ever handed out again.
//! - **Safety**: containers never run privileged, get `no-new-privileges`, and bind-mount only
//!   paths under the configured allowed root.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, ContainerSummaryStateEnum,
    EndpointSettings, EventMessage, ExecConfig, HostConfig, Mount, MountType, MountVolumeOptions,
    MountVolumeOptionsDriverConfig, NetworkCreateRequest, NetworkingConfig,
    PortBinding as DockerPortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, ListVolumesOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptions, RestartContainerOptionsBuilder,
    StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::NodeStatus;
use super::hostfiles::{self, HostFiles};
use super::probe;
use super::{
    ExecOutput, Instance, InstanceSpec, InstanceState, LABEL_CONTAINER, LABEL_CONTROLLER,
    LABEL_DEPLOYMENT, LABEL_FILES_DIR, LABEL_LIVENESS, LABEL_MANAGED, LABEL_PORTS, LABEL_READINESS,
    Labels, PortBinding, Result, Runtime, RuntimeError, RuntimeEvent,
};
use crate::api::{Probe, Protocol, PullPolicy, VolumeMode};

/// One Docker Engine.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Shown in status and on instances.
    pub name: String,
    /// `unix:///var/run/docker.sock`, `tcp://10.0.0.2:2375`, or a socket path.
    pub url: String,
    /// Host address published ports bind to (default `0.0.0.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_address: Option<String>,
    /// Address clients (and probes) use to reach published ports. Default: `127.0.0.1` for a
    /// local socket, the URL's host for tcp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,
    /// Whether the daemon sees this machine's filesystem, so that claims' files are written
    /// into a host-backed folder rather than uploaded through the API (see
    /// `runtime::hostfiles`). Default: true for a unix socket, false for tcp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_files: Option<bool>,
}

impl NodeConfig {
    /// A node from a `DOCKER_HOST`-style URL, named `name`.
    pub fn from_url(name: &str, url: &str) -> Self {
        NodeConfig {
            name: name.to_owned(),
            url: url.to_owned(),
            listen_address: None,
            advertise_address: None,
            shared_files: None,
        }
    }

    fn shares_files(&self) -> bool {
        self.shared_files
            .unwrap_or_else(|| self.normalized_url().starts_with("unix://"))
    }

    fn normalized_url(&self) -> String {
        if self.url.starts_with('/') {
            format!("unix://{}", self.url)
        } else {
            self.url.clone()
        }
    }

    fn advertise(&self) -> String {
        if let Some(a) = &self.advertise_address {
            return a.clone();
        }
        let url = self.normalized_url();
        for scheme in ["tcp://", "http://", "https://"] {
            if let Some(rest) = url.strip_prefix(scheme) {
                let host = rest.split(['/', ':']).next().unwrap_or("");
                if !host.is_empty() {
                    return host.to_owned();
                }
            }
        }
        match self.listen_address.as_deref() {
            Some(l) if l != "0.0.0.0" && l != "::" => l.to_owned(),
            _ => "127.0.0.1".to_owned(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct DockerConfig {
    pub nodes: Vec<NodeConfig>,
    /// A node unreachable for this long is declared down and its instances replaced elsewhere.
    pub node_down_after: Duration,
    /// Bind mounts must resolve under this folder (the state directory by default).
    pub allowed_bind_root: Option<PathBuf>,
    /// Seconds `docker restart` waits for a graceful stop (the `Restart` reset policy).
    pub restart_grace_secs: i32,
    /// Seconds a deployment's container may take to stop (SIGTERM, then SIGKILL) before it is
    /// removed. Pool instances are removed at once: they hold no state worth a clean stop.
    pub stop_grace_secs: i32,
    /// Where host-backed files folders are made (under the state directory); `None` uploads
    /// every claim's files through the API.
    pub files_root: Option<PathBuf>,
    /// This controller's identity on shared daemons: it sees and removes only containers
    /// labelled `poolkeeper.dev/controller=<id>`.
    pub controller_id: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            nodes: vec![NodeConfig::from_url(
                "local",
                &std::env::var("DOCKER_HOST")
                    .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned()),
            )],
            node_down_after: Duration::from_secs(30),
            allowed_bind_root: None,
            restart_grace_secs: 2,
            stop_grace_secs: 10,
            files_root: None,
            controller_id: "default".to_owned(),
        }
    }
}

struct Node {
    config: NodeConfig,
    address: String,
    docker: Docker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Ready,
    Unreachable(Instant),
    Down,
}

/// What the runtime knows of one managed container.
#[derive(Clone, Debug)]
struct Tracked {
    node: usize,
    labels: Labels,
    ports: Vec<PortBinding>,
    probe: Option<Probe>,
    liveness: Option<Probe>,
    running: bool,
    ready: bool,
    exit_code: Option<i64>,
    /// Bumped on every start and stop so that a stale probe loop ends.
    incarnation: u64,
    /// Container IPs by network, for probes of ports that are not published.
    ip: Option<String>,
    /// Revision of the last change (see `Instance::revision`).
    revision: u64,
    /// Mount path of its host-backed files folder, if it has one.
    files_mount: Option<String>,
}

struct State {
    subscribers: Vec<mpsc::UnboundedSender<RuntimeEvent>>,
    instances: HashMap<String, Tracked>,
    health: Vec<Health>,
    messages: Vec<Option<String>>,
    /// Creations in flight, by name, with their node. Placement counts them; and between its
    /// creation and its start a container is listed `created`, which is not an exit: the
    /// creation's result tells what it is.
    creating: HashMap<String, usize>,
    /// Containers reported removed, and when: a list must not track them again. A list begun
    /// before the removal saw them, and the daemon's list is served from a view that can lag
    /// its removals (seen with 20.10 under load: a container listed `running` after `destroy`).
    gone: HashMap<String, Instant>,
    /// Nodes declared down whose leftover containers must be removed when they return.
    sweep: HashSet<usize>,
}

struct Inner {
    nodes: Vec<Node>,
    host_files: Option<HostFiles>,
    /// Source of `Tracked::revision`.
    revisions: std::sync::atomic::AtomicU64,
    config: DockerConfig,
    state: Mutex<State>,
}

/// The Docker runtime. Cloning shares the connections and the view.
#[derive(Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("nodes", &self.inner.nodes.len())
            .finish()
    }
}

/// How long to wait for one Docker API call (seconds).
const API_TIMEOUT_SECS: u64 = 60;
/// Probe period until the first success, so that readiness is noticed within tens of ms.
const PROBE_FAST: Duration = Duration::from_millis(50);
/// How long a removed container's name is remembered against stale lists. Names are unique
/// (random suffixes), and a create of the same name clears the mark.
const GONE_KEPT: Duration = Duration::from_secs(120);

/// A files folder with no container is swept once this old (see `sweep_files_folders`).
const FILES_SWEEP_AFTER: Duration = Duration::from_secs(60);

impl DockerRuntime {
    /// Connects to every node, negotiating the API version with each daemon (they may be older
    /// than bollard's default). Fails when no node is reachable; unreachable ones start
    /// `Unreachable` and are retried.
    pub async fn connect(config: DockerConfig) -> anyhow::Result<Self> {
        if config.nodes.is_empty() {
            anyhow::bail!("no Docker nodes configured");
        }
        let mut names = HashSet::new();
        let mut nodes = Vec::new();
        let mut health = Vec::new();
        let mut messages = Vec::new();
        for n in &config.nodes {
            if !names.insert(n.name.clone()) {
                anyhow::bail!("node name {:?} is used twice", n.name);
            }
            let url = n.normalized_url();
            let docker =
                connect_url(&url).map_err(|e| anyhow::anyhow!("node {} ({url}): {e}", n.name))?;
            let (docker, h, msg) = match docker.clone().negotiate_version().await {
                Ok(d) => match d.ping().await {
                    Ok(_) => (d, Health::Ready, None),
                    Err(e) => (
                        docker,
                        Health::Unreachable(Instant::now()),
                        Some(e.to_string()),
                    ),
                },
                Err(e) => (
                    docker,
                    Health::Unreachable(Instant::now()),
                    Some(e.to_string()),
                ),
            };
            if let Some(m) = &msg {
                warn!(node = %n.name, url = %url, error = %m, "Docker node unreachable");
            } else {
                info!(node = %n.name, url = %url, api = %docker.client_version(), "connected to Docker");
            }
            nodes.push(Node {
                address: n.advertise(),
                config: n.clone(),
                docker,
            });
            health.push(h);
            messages.push(msg);
        }
        if health.iter().all(|h| *h != Health::Ready) {
            let detail: Vec<String> = nodes
                .iter()
                .zip(&messages)
                .map(|(n, m)| {
                    format!(
                        "{} ({}): {}",
                        n.config.name,
                        n.config.normalized_url(),
                        m.as_deref().unwrap_or("unreachable")
                    )
                })
                .collect();
            anyhow::bail!(
                "cannot reach any Docker Engine: {}; is dockerd running, and may this user use its socket?",
                detail.join("; ")
            );
        }
        let count = nodes.len();
        let host_files = config.files_root.clone().map(HostFiles::new);
        let rt = DockerRuntime {
            inner: Arc::new(Inner {
                nodes,
                host_files,
                revisions: std::sync::atomic::AtomicU64::new(1),
                config,
                state: Mutex::new(State {
                    subscribers: Vec::new(),
                    instances: HashMap::new(),
                    health,
                    messages,
                    creating: HashMap::new(),
                    gone: HashMap::new(),
                    sweep: HashSet::new(),
                }),
            }),
        };
        for i in 0..count {
            tokio::spawn(rt.clone().watch_node(i));
        }
        Ok(rt)
    }

    /// The client of the first node (benchmarks compare against raw Docker calls through it).
    pub fn first_client(&self) -> Docker {
        self.inner.nodes[0].docker.clone()
    }

    /// The controller id its containers are labelled with.
    pub fn controller_id(&self) -> &str {
        &self.inner.config.controller_id
    }

    /// Label filters selecting this controller's containers.
    fn owner_filter(&self) -> Vec<String> {
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_CONTROLLER}={}", self.inner.config.controller_id),
        ]
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Health of every node, for status.
    fn node_status(&self) -> Vec<NodeStatus> {
        let st = self.lock();
        self.inner
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeStatus {
                name: n.config.name.clone(),
                url: n.config.normalized_url(),
                address: n.address.clone(),
                state: match st.health[i] {
                    Health::Ready => "Ready",
                    Health::Unreachable(_) => "Unreachable",
                    Health::Down => "Down",
                }
                .to_owned(),
                instances: st.instances.values().filter(|t| t.node == i).count(),
                message: st.messages[i].clone(),
                api_version: Some(n.docker.client_version().to_string()),
            })
            .collect()
    }

    fn next_revision(&self) -> u64 {
        self.inner
            .revisions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Container `name` on node `i` no longer exists: reported removed if it was tracked there,
    /// and remembered as gone either way, so that lists of the next [`GONE_KEPT`] do not track
    /// it again (a list may have dropped it before its removal was reported, and a later stale
    /// list must not bring it back).
    fn container_gone(&self, st: &mut State, i: usize, name: &str) {
        st.gone.insert(name.to_owned(), Instant::now());
        if st.instances.get(name).is_some_and(|t| t.node == i) {
            st.instances.remove(name);
            Self::emit(&mut st.subscribers, RuntimeEvent::Removed(name.to_owned()));
        }
    }

    fn emit(subscribers: &mut Vec<mpsc::UnboundedSender<RuntimeEvent>>, ev: RuntimeEvent) {
        subscribers.retain(|s| s.send(ev.clone()).is_ok());
    }

    fn instance_of(&self, name: &str, t: &Tracked) -> Instance {
        Instance {
            name: name.to_owned(),
            labels: t.labels.clone(),
            state: if t.running {
                InstanceState::Running
            } else {
                InstanceState::Exited { code: t.exit_code }
            },
            ready: t.running && t.ready,
            ports: t.ports.clone(),
            node: self.inner.nodes[t.node].config.name.clone(),
            revision: t.revision,
        }
    }

    fn node_of(&self, name: &str) -> Result<usize> {
        self.lock()
            .instances
            .get(name)
            .map(|t| t.node)
            .ok_or_else(|| RuntimeError::NotFound(name.to_owned()))
    }

    fn docker_of(&self, name: &str) -> Result<(usize, Docker)> {
        let i = self.node_of(name)?;
        Ok((i, self.inner.nodes[i].docker.clone()))
    }

    // ---- the event stream ------------------------------------------------------------------

    async fn watch_node(self, i: usize) {
        let docker = self.inner.nodes[i].docker.clone();
        let name = self.inner.nodes[i].config.name.clone();
        let mut since: Option<i64> = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            let reachable = match docker.ping().await {
                Ok(_) => true,
                Err(e) => {
                    self.unreachable(i, &e.to_string());
                    false
                }
            };
            if !reachable {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            backoff = Duration::from_millis(200);
            let start = since.unwrap_or_else(|| jiff::Timestamp::now().as_second()) - 1;
            let mut filters = HashMap::new();
            filters.insert("type", vec!["container".to_owned()]);
            filters.insert("label", self.owner_filter());
            let opts = EventsOptionsBuilder::default()
                .since(&start.to_string())
                .filters(&filters)
                .build();
            let mut stream = docker.events(Some(opts));
            // The stream is open once the daemon answers; a relist now covers whatever happened
            // while it was not (the replay from `since` covers the gap in between).
            self.reachable(i).await;
            debug!(node = %name, "watching Docker events");
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        if let Some(t) = ev.time {
                            since = Some(t);
                        }
                        self.on_event(i, ev).await;
                    }
                    Err(e) => {
                        warn!(node = %name, error = %e, "Docker event stream failed");
                        break;
                    }
                }
            }
            self.unreachable(i, "event stream ended");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A node answered: mark it ready, sweep what was left on it while it was down, relist.
    async fn reachable(&self, i: usize) {
        let sweep = {
            let mut guard = self.lock();
            let st = &mut *guard;
            st.messages[i] = None;
            let was = std::mem::replace(&mut st.health[i], Health::Ready);
            if was != Health::Ready {
                info!(node = %self.inner.nodes[i].config.name, "Docker node reachable");
            }
            st.sweep.remove(&i)
        };
        if sweep {
            // Everything on this node was reported gone while it was down: make that true.
            match self.list_node(i).await {
                Ok(found) => {
                    for (name, _) in found {
                        info!(instance = %name, node = %self.inner.nodes[i].config.name,
                            "removing a container left on a node that was down");
                        let _ = self.remove_on(i, &name).await;
                    }
                }
                Err(e) => warn!(error = %e, "sweeping a returned node failed"),
            }
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        Self::emit(&mut st.subscribers, RuntimeEvent::Relist);
    }

    fn unreachable(&self, i: usize, why: &str) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.messages[i] = Some(why.to_owned());
        match st.health[i] {
            Health::Ready => {
                warn!(node = %self.inner.nodes[i].config.name, error = %why, "Docker node unreachable");
                st.health[i] = Health::Unreachable(Instant::now());
            }
            Health::Unreachable(since) if since.elapsed() >= self.inner.config.node_down_after => {
                warn!(node = %self.inner.nodes[i].config.name,
                    "Docker node down; its instances will be replaced on other nodes");
                st.health[i] = Health::Down;
                st.sweep.insert(i);
                let gone: Vec<String> = st
                    .instances
                    .iter()
                    .filter(|(_, t)| t.node == i)
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in gone {
                    self.container_gone(st, i, &n);
                }
            }
            _ => {}
        }
    }

    async fn on_event(&self, i: usize, ev: EventMessage) {
        let action = ev.action.unwrap_or_default();
        let Some(actor) = ev.actor else { return };
        let attrs = actor.attributes.unwrap_or_default();
        let Some(name) = attrs.get("name").cloned() else {
            return;
        };
        debug!(node = i, instance = %name, action = %action, "Docker event");
        match action.as_str() {
            "start" => {
                let known = self
                    .lock()
                    .instances
                    .get(&name)
                    .is_some_and(|t| t.node == i);
                if !known {
                    match self.inspect(i, &name).await {
                        Ok(Some(mut t)) => {
                            let probe = {
                                let mut guard = self.lock();
                                if guard.gone.contains_key(&name) {
                                    return;
                                }
                                // Tracked and started at once: never seen half-made.
                                t.revision = self.next_revision();
                                let ip = t.ip.clone();
                                guard.instances.entry(name.clone()).or_insert(t);
                                self.started_locked(&mut guard, &name, ip)
                            };
                            self.spawn_probe(&name, probe);
                            return;
                        }
                        Ok(None) => return,
                        Err(e) => {
                            warn!(instance = %name, error = %e, "inspect after start failed");
                            return;
                        }
                    }
                }
                self.mark_started(&name, None);
            }
            "die" => {
                let code = attrs.get("exitCode").and_then(|c| c.parse().ok());
                let mut guard = self.lock();
                let st = &mut *guard;
                if let Some(t) = st.instances.get_mut(&name)
                    && t.node == i
                {
                    t.running = false;
                    t.ready = false;
                    t.exit_code = code;
                    t.incarnation += 1;
                    t.revision = self.next_revision();
                    let inst = self.instance_of(&name, t);
                    Self::emit(&mut st.subscribers, RuntimeEvent::Changed(inst));
                }
            }
            "destroy" => {
                let recreating = {
                    let mut guard = self.lock();
                    self.container_gone(&mut guard, i, &name);
                    guard.creating.contains_key(&name)
                };
                // Removed behind our back (`docker rm -f`): its files folder goes too, unless
                // a container of that name is being made again (which prepared its own).
                if !recreating {
                    self.drop_files_folder(&[i], &name).await;
                }
            }
            _ => {}
        }
    }

    /// Marks a tracked container running (once per start) and starts probing it. `ip` updates
    /// the container's address when known.
    fn mark_started(&self, name: &str, ip: Option<String>) {
        let probe = {
            let mut guard = self.lock();
            self.started_locked(&mut guard, name, ip)
        };
        self.spawn_probe(name, probe);
    }

    /// [`Self::mark_started`] under the lock the caller holds; returns the incarnation to probe.
    fn started_locked(&self, st: &mut State, name: &str, ip: Option<String>) -> Option<u64> {
        let t = st.instances.get_mut(name)?;
        if ip.is_some() {
            t.ip = ip;
        }
        if t.running {
            return None;
        }
        t.running = true;
        t.exit_code = None;
        t.incarnation += 1;
        t.ready = t.probe.is_none();
        t.revision = self.next_revision();
        let probe = (t.probe.is_some() || t.liveness.is_some()).then_some(t.incarnation);
        let inst = self.instance_of(name, t);
        Self::emit(&mut st.subscribers, RuntimeEvent::Changed(inst));
        probe
    }

    fn spawn_probe(&self, name: &str, incarnation: Option<u64>) {
        if let Some(incarnation) = incarnation {
            tokio::spawn(self.clone().probe_loop(name.to_owned(), incarnation));
            tokio::spawn(self.clone().liveness_loop(name.to_owned(), incarnation));
        }
    }

    /// Kills the container once its liveness probe failed `failureThreshold` times in a row;
    /// its exit is reported as any other, and the engine's restart policy takes it from there.
    async fn liveness_loop(self, name: String, incarnation: u64) {
        let Some((probe, node)) = self.liveness_of(&name, incarnation) else {
            return;
        };
        let (timeout, period, threshold) = probe_timing(&probe, 10).await;
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(period).await;
            let Some(ok) = self
                .probe_once(&name, incarnation, &probe, node, timeout)
                .await
            else {
                return;
            };
            failures = if ok { 0 } else { failures + 1 };
            if failures < threshold {
                continue;
            }
            if self.liveness_of(&name, incarnation).is_none() {
                return;
            }
            warn!(instance = %name, failures, "liveness probe failed: killing the container");
            let docker = self.inner.nodes[node].docker.clone();
            if let Err(e) = docker
                .kill_container(
                    &name,
                    None::<bollard::query_parameters::KillContainerOptions>,
                )
                .await
            {
                warn!(instance = %name, error = %e, "killing an unhealthy container failed");
            }
            return;
        }
    }

    fn liveness_of(&self, name: &str, incarnation: u64) -> Option<(Probe, usize)> {
        let st = self.lock();
        let t = st.instances.get(name)?;
        (t.incarnation == incarnation && t.running)
            .then(|| t.liveness.clone().map(|p| (p, t.node)))
            .flatten()
    }

    // ---- readiness ---------------------------------------------------------------------------

    async fn probe_loop(self, name: String, incarnation: u64) {
        let Some((probe, node)) = self.probe_of(&name, incarnation) else {
            return;
        };
        let (timeout, period, threshold) = probe_timing(&probe, 5).await;
        let mut failures = 0u32;
        loop {
            let Some(ok) = self
                .probe_once(&name, incarnation, &probe, node, timeout)
                .await
            else {
                return;
            };
            let ready = {
                let mut guard = self.lock();
                let st = &mut *guard;
                let Some(t) = st.instances.get_mut(&name) else {
                    return;
                };
                if t.incarnation != incarnation {
                    return;
                }
                let was = t.ready;
                if ok {
                    failures = 0;
                    t.ready = true;
                } else {
                    failures += 1;
                    if failures >= threshold {
                        t.ready = false;
                    }
                }
                if was != t.ready {
                    debug!(instance = %name, ready = t.ready, "readiness changed");
                    t.revision = self.next_revision();
                    let inst = self.instance_of(&name, t);
                    Self::emit(&mut st.subscribers, RuntimeEvent::Changed(inst));
                }
                t.ready
            };
            tokio::time::sleep(if ready { period } else { PROBE_FAST }).await;
        }
    }

    fn probe_of(&self, name: &str, incarnation: u64) -> Option<(Probe, usize)> {
        let st = self.lock();
        let t = st.instances.get(name)?;
        (t.incarnation == incarnation)
            .then(|| t.probe.clone().map(|p| (p, t.node)))
            .flatten()
    }

    /// One probe; `None` when the instance is gone or restarted (the loop ends).
    async fn probe_once(
        &self,
        name: &str,
        incarnation: u64,
        probe: &Probe,
        node: usize,
        timeout: Duration,
    ) -> Option<bool> {
        let target = |port: &crate::api::PortRef| -> Option<Option<String>> {
            let st = self.lock();
            let t = st.instances.get(name)?;
            if t.incarnation != incarnation {
                return None;
            }
            Some(match probe::find_port(&t.ports, port) {
                Some(b) if b.host_port != 0 => Some(format!(
                    "{}:{}",
                    self.inner.nodes[node].address, b.host_port
                )),
                _ => {
                    let cport = match port {
                        crate::api::PortRef::Number(n) => Some(*n),
                        crate::api::PortRef::Name(_) => {
                            probe::find_port(&t.ports, port).map(|b| b.container_port)
                        }
                    };
                    t.ip.clone().zip(cport).map(|(ip, p)| format!("{ip}:{p}"))
                }
            })
        };
        if let Some(h) = &probe.http_get {
            return Some(match target(&h.port)? {
                Some(addr) => probe::http_get(&addr, &h.path, timeout).await,
                None => false,
            });
        }
        if let Some(tcp) = &probe.tcp_socket {
            return Some(match target(&tcp.port)? {
                Some(addr) => probe::tcp(&addr, timeout).await,
                None => false,
            });
        }
        if let Some(e) = &probe.exec {
            let out = tokio::time::timeout(timeout, self.exec(name, &e.command)).await;
            return Some(matches!(out, Ok(Ok(o)) if o.exit_code == 0));
        }
        Some(true)
    }

    // ---- Docker calls ------------------------------------------------------------------------

    /// The container's address, when `wanted` (and it can be read).
    async fn ip_if(&self, wanted: bool, i: usize, name: &str) -> Option<String> {
        if !wanted {
            return None;
        }
        self.inspect(i, name)
            .await
            .ok()
            .flatten()
            .and_then(|t| t.ip)
    }

    async fn inspect(&self, i: usize, name: &str) -> Result<Option<Tracked>> {
        let docker = &self.inner.nodes[i].docker;
        match docker.inspect_container(name, None).await {
            Ok(r) => Ok(tracked_from_inspect(i, &r)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(map_err(e, name)),
        }
    }

    async fn list_node(&self, i: usize) -> Result<Vec<(String, ContainerSummary)>> {
        let mut filters = HashMap::new();
        filters.insert("label", self.owner_filter());
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.inner.nodes[i]
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| map_err(e, &self.inner.nodes[i].config.name))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c
                    .names
                    .as_ref()?
                    .first()?
                    .trim_start_matches('/')
                    .to_owned();
                Some((name, c))
            })
            .collect())
    }

    /// The least-loaded reachable node for creation `name`, which is in flight from here on.
    fn pick_node(&self, name: &str) -> Result<usize> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut load = vec![0usize; self.inner.nodes.len()];
        for node in st
            .instances
            .values()
            .map(|t| t.node)
            .chain(st.creating.values().copied())
        {
            load[node] += 1;
        }
        let best = (0..self.inner.nodes.len())
            .filter(|i| st.health[*i] == Health::Ready)
            .min_by_key(|i| (load[*i], *i));
        match best {
            Some(i) => {
                st.creating.insert(name.to_owned(), i);
                Ok(i)
            }
            None => Err(RuntimeError::Unavailable(
                "no Docker node is reachable".to_owned(),
            )),
        }
    }

    async fn ensure_image(&self, docker: &Docker, image: &str, policy: PullPolicy) -> Result<()> {
        let present = match docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if status_of(&e) == Some(404) => false,
            Err(e) => return Err(map_err(e, image)),
        };
        let pull = match policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Never => false,
        };
        if !pull {
            return if present {
                Ok(())
            } else {
                Err(RuntimeError::ImageMissing {
                    image: image.to_owned(),
                    reason: "not present on the node, and pullPolicy is Never".to_owned(),
                })
            };
        }
        info!(image, "pulling image");
        let opts = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut stream = docker.create_image(Some(opts), None, None);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                // A failed pull of an image that is present (pullPolicy Always) keeps the
                // local copy; a missing one is a condition on the pool.
                if present {
                    warn!(image, error = %e, "pull failed; using the local image");
                    return Ok(());
                }
                return Err(RuntimeError::ImageMissing {
                    image: image.to_owned(),
                    reason: format!("not present, and pulling it failed: {}", docker_message(&e)),
                });
            }
        }
        Ok(())
    }

    fn check_binds(&self, spec: &InstanceSpec) -> Result<Vec<String>> {
        let mut binds = Vec::new();
        for (source, mount) in &spec.volumes {
            let mode = match mount.mode {
                VolumeMode::Rw => "rw",
                VolumeMode::Ro => "ro",
            };
            if crate::core::deployment::is_host_path(source) {
                let Some(root) = &self.inner.config.allowed_bind_root else {
                    return Err(RuntimeError::Failed(format!(
                        "bind mount of host path {source} refused: no allowed bind root is configured"
                    )));
                };
                let path = Path::new(source);
                let resolved = if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    root.join(path)
                };
                if !within(root, &resolved) {
                    return Err(RuntimeError::Failed(format!(
                        "bind mount of host path {source} refused: it is outside the allowed root {}",
                        root.display()
                    )));
                }
                binds.push(format!("{}:{}:{mode}", resolved.display(), mount.bind));
            } else {
                binds.push(format!("{source}:{}:{mode}", mount.bind));
            }
        }
        Ok(binds)
    }

    async fn create_on(&self, i: usize, spec: &InstanceSpec) -> Result<Instance> {
        let began = Instant::now();
        let node = &self.inner.nodes[i];
        let docker = &node.docker;
        self.ensure_image(docker, &spec.image, spec.pull_policy)
            .await?;
        let binds = self.check_binds(spec)?;
        self.ensure_volumes(docker, spec).await?;
        let files = self.files_folder(i, spec)?;
        let mut labels: HashMap<String, String> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend(self.ownership_labels());
        labels.insert(LABEL_PORTS.to_owned(), encode_ports(&spec.ports));
        if let Some((mount, _)) = &files {
            labels.insert(LABEL_FILES_DIR.to_owned(), mount.clone());
        }
        for (label, probe) in [
            (LABEL_READINESS, &spec.readiness),
            (LABEL_LIVENESS, &spec.liveness),
        ] {
            if let Some(p) = probe {
                labels.insert(
                    label.to_owned(),
                    serde_json::to_string(p).map_err(|e| RuntimeError::Failed(e.to_string()))?,
                );
            }
        }
        // What the runtime tracks is read back from the labels, exactly as for an adopted
        // container after a restart.
        let mut fresh = tracked(i, Some(&labels), None, None);
        fresh.revision = self.next_revision();
        let listen = node
            .config
            .listen_address
            .clone()
            .unwrap_or_else(|| "0.0.0.0".to_owned());
        let mut port_bindings = HashMap::new();
        let mut exposed = Vec::new();
        for p in &spec.ports {
            let key = format!("{}/{}", p.container_port, proto(p.protocol));
            exposed.push(key.clone());
            if p.host_port != 0 {
                port_bindings.insert(
                    key,
                    Some(vec![DockerPortBinding {
                        host_ip: Some(listen.clone()),
                        host_port: Some(p.host_port.to_string()),
                    }]),
                );
            }
        }
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let host_config = HostConfig {
            port_bindings: Some(port_bindings),
            privileged: Some(false),
            init: spec.init.then_some(true),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            nano_cpus: spec
                .cpu_millis
                .map(|m| i64::try_from(m.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            memory: spec
                .memory_bytes
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            binds: (!binds.is_empty()).then_some(binds),
            mounts: files
                .as_ref()
                .map(|(mount, dir)| vec![self.files_mount(&spec.name, mount, dir)]),
            network_mode: spec.network.clone(),
            ..Default::default()
        };
        // On a deployment's network, a container answers to its name in the deployment
        // ("db"), as in Compose, besides its container name.
        let networking_config = spec.network.as_ref().and_then(|net| {
            let alias = spec.labels.get(LABEL_CONTAINER)?;
            Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    net.clone(),
                    EndpointSettings {
                        aliases: Some(vec![alias.clone()]),
                        ..Default::default()
                    },
                )])),
            })
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            networking_config,
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: (!env.is_empty()).then_some(env),
            labels: Some(labels),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            host_config: Some(host_config),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        match docker
            .create_container(Some(opts.clone()), body.clone())
            .await
        {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(409) => {
                // A container of that name exists: a create that timed out earlier, or one left
                // by a crash. Creates are idempotent: replace it.
                self.remove_on(i, &spec.name).await?;
                // The removal took the files folder with it.
                self.files_folder(i, spec)?;
                docker
                    .create_container(Some(opts), body)
                    .await
                    .map_err(|e| map_err(e, &spec.name))?;
            }
            Err(e) if status_of(&e) == Some(404) => {
                return Err(RuntimeError::ImageMissing {
                    image: spec.image.clone(),
                    reason: docker_message(&e),
                });
            }
            Err(e) => return Err(map_err(e, &spec.name)),
        }
        {
            let mut st = self.lock();
            // Not gone any more (a removal of an earlier container of this name marked it).
            st.gone.remove(&spec.name);
            st.instances.insert(spec.name.clone(), fresh);
        }
        if let Err(e) = docker.start_container(&spec.name, None).await {
            let err = start_error(e, &spec.name);
            // Leave nothing half-made behind.
            let _ = self.remove_on(i, &spec.name).await;
            return Err(err);
        }
        let ip = self.ip_if(spec.readiness.is_some(), i, &spec.name).await;
        self.mark_started(&spec.name, ip);
        debug!(instance = %spec.name, ms = began.elapsed().as_millis(), "container created and started");
        let st = self.lock();
        st.instances
            .get(&spec.name)
            .map(|t| self.instance_of(&spec.name, t))
            .ok_or_else(|| RuntimeError::NotFound(spec.name.clone()))
    }

    async fn remove_on(&self, i: usize, name: &str) -> Result<()> {
        let began = Instant::now();
        let graceful = self
            .lock()
            .instances
            .get(name)
            .is_some_and(|t| t.labels.contains_key(LABEL_DEPLOYMENT));
        if graceful {
            let opts = StopContainerOptionsBuilder::default()
                .t(self.inner.config.stop_grace_secs)
                .build();
            match self.inner.nodes[i]
                .docker
                .stop_container(name, Some(opts))
                .await
            {
                // 304: already stopped.
                Ok(()) => {}
                Err(e) if matches!(status_of(&e), Some(304 | 404)) => {}
                Err(e) => debug!(instance = %name, error = %e, "graceful stop failed; removing"),
            }
        }
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let r = self.inner.nodes[i]
            .docker
            .remove_container(name, Some(opts))
            .await;
        match r {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            // Already being removed by an earlier call.
            Err(e) if status_of(&e) == Some(409) && docker_message(&e).contains("in progress") => {}
            Err(e) => return Err(map_err(e, name)),
        }
        debug!(instance = %name, ms = began.elapsed().as_millis(), "container removed");
        {
            let mut guard = self.lock();
            self.container_gone(&mut guard, i, name);
        }
        self.drop_files_folder(&[i], name).await;
        Ok(())
    }

    /// Creates the named volumes `spec` mounts that do not exist yet, labelled as this
    /// controller's and its deployment's, so that deleting the deployment finds them.
    async fn ensure_volumes(&self, docker: &Docker, spec: &InstanceSpec) -> Result<()> {
        for source in spec.volumes.keys() {
            if crate::core::deployment::is_host_path(source) {
                continue;
            }
            match docker.inspect_volume(source).await {
                Ok(_) => continue,
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(map_err(e, source)),
            }
            let mut labels = self.ownership_labels();
            if let Some(d) = spec.labels.get(LABEL_DEPLOYMENT) {
                labels.insert(LABEL_DEPLOYMENT.to_owned(), d.clone());
            }
            let req = VolumeCreateRequest {
                name: Some(source.clone()),
                labels: Some(labels),
                ..Default::default()
            };
            docker
                .create_volume(req)
                .await
                .map_err(|e| map_err(e, source))?;
        }
        Ok(())
    }

    /// The labels that mark what this controller makes (containers, volumes, networks) as its
    /// own.
    fn ownership_labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (
                LABEL_CONTROLLER.to_owned(),
                self.inner.config.controller_id.clone(),
            ),
        ])
    }

    /// The host-backed files folder for `spec`'s instance on node `i`, freshly emptied:
    /// `(mount path, folder)`, or `None` when its files go through the API.
    fn files_folder(&self, i: usize, spec: &InstanceSpec) -> Result<Option<(String, PathBuf)>> {
        let (Some(mount), Some(hf)) = (&spec.files_dir, &self.inner.host_files) else {
            return Ok(None);
        };
        if !self.inner.nodes[i].config.shares_files() {
            return Ok(None);
        }
        let dir = hf.prepare(&spec.name).map_err(|e| {
            RuntimeError::Failed(format!(
                "preparing the files folder {}: {e}",
                hf.dir_of(&spec.name).display()
            ))
        })?;
        Ok(Some((mount.clone(), dir)))
    }

    /// A `local` volume bound to `dir`, mounted at `mount`: Docker fills it from the image's
    /// content at `mount` when the container is created, as any empty named volume.
    fn files_mount(&self, name: &str, mount: &str, dir: &Path) -> Mount {
        Mount {
            target: Some(mount.to_owned()),
            source: Some(files_volume(name)),
            typ: Some(MountType::VOLUME),
            volume_options: Some(MountVolumeOptions {
                no_copy: Some(false),
                labels: Some(self.ownership_labels()),
                driver_config: Some(MountVolumeOptionsDriverConfig {
                    name: Some("local".to_owned()),
                    options: Some(HashMap::from([
                        ("type".to_owned(), "none".to_owned()),
                        ("o".to_owned(), "bind".to_owned()),
                        ("device".to_owned(), dir.display().to_string()),
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Removes `name`'s files volume (from `nodes`) and folder, if it has them.
    async fn drop_files_folder(&self, nodes: &[usize], name: &str) {
        let Some(hf) = &self.inner.host_files else {
            return;
        };
        if !hf.dir_of(name).exists() {
            return;
        }
        for &i in nodes {
            if !self.inner.nodes[i].config.shares_files() {
                continue;
            }
            match self.inner.nodes[i]
                .docker
                .remove_volume(&files_volume(name), None::<RemoveVolumeOptions>)
                .await
            {
                Ok(()) => {}
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => {
                    // Still in use (a container of that name exists again) or unreachable: the
                    // folder stays; a later list sweeps it.
                    debug!(instance = %name, error = %e, "files volume not removed");
                    return;
                }
            }
        }
        if let Err(e) = hf.remove(name) {
            warn!(instance = %name, folder = %hf.dir_of(name).display(), error = %e,
                "removing the files folder failed");
        }
    }

    /// Files folders of containers that no longer exist (removed by hand, or left by a crash):
    /// removed once they are older than [`FILES_SWEEP_AFTER`], so that a creation in flight
    /// (folder made, container not yet listed) keeps its own.
    async fn sweep_files_folders(&self, listed: &HashSet<String>) {
        let Some(hf) = &self.inner.host_files else {
            return;
        };
        let stale: Vec<String> = {
            let st = self.lock();
            hf.instances()
                .into_iter()
                .filter(|n| !listed.contains(n) && !st.instances.contains_key(n))
                .filter(|n| {
                    std::fs::metadata(hf.dir_of(n))
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > FILES_SWEEP_AFTER)
                })
                .collect()
        };
        let all: Vec<usize> = (0..self.inner.nodes.len()).collect();
        for name in stale {
            debug!(instance = %name, "sweeping a files folder whose container is gone");
            self.drop_files_folder(&all, &name).await;
        }
    }
}

impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn nodes(&self) -> Vec<NodeStatus> {
        self.node_status()
    }

    fn endpoint_host(&self, node: &str) -> String {
        self.inner
            .nodes
            .iter()
            .find(|n| n.config.name == node)
            .map(|n| n.address.clone())
            .unwrap_or_else(|| "127.0.0.1".to_owned())
    }

    async fn list(&self) -> Result<Vec<Instance>> {
        let mut out = Vec::new();
        let mut listed = HashSet::new();
        for i in 0..self.inner.nodes.len() {
            let health = self.lock().health[i];
            match health {
                Health::Down => continue,
                Health::Unreachable(_) => {
                    return Err(RuntimeError::Unavailable(format!(
                        "Docker node {} is unreachable",
                        self.inner.nodes[i].config.name
                    )));
                }
                Health::Ready => {}
            }
            // What changes from here on is newer than the list, which cannot tell it is gone.
            let listed_from = self.next_revision();
            let found: Vec<_> = {
                let found = self.list_node(i).await?;
                let mut st = self.lock();
                // Pruned here, where the marks are read, not on every removal.
                st.gone.retain(|_, at| at.elapsed() < GONE_KEPT);
                found
                    .into_iter()
                    .filter(|(n, _)| !st.gone.contains_key(n))
                    .collect()
            };
            let mut seen = HashSet::new();
            for (name, c) in found {
                seen.insert(name.clone());
                let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
                // Running, and not known running: its address first, so that it is tracked
                // running at once (never half-made, where another list would see it stopped).
                let needs_ip =
                    running && self.lock().instances.get(&name).is_none_or(|t| !t.running);
                let ip = self.ip_if(needs_ip, i, &name).await;
                let probe = {
                    let mut guard = self.lock();
                    let st = &mut *guard;
                    // Destroyed or removed while this list went on (it awaits inspections):
                    // the summary is older than that news and must not track it again.
                    if st.gone.contains_key(&name) {
                        continue;
                    }
                    // Being created (perhaps not started yet): its creation reports it.
                    if st.creating.contains_key(&name) {
                        continue;
                    }
                    let entry = st
                        .instances
                        .entry(name.clone())
                        .or_insert_with(|| tracked_from_summary(i, &c));
                    // Changed since the list began (an event, a creation that returned): the
                    // summary is older news than what is tracked.
                    let newer = entry.revision > listed_from;
                    entry.node = i;
                    if entry.revision == 0 {
                        entry.revision = self.next_revision();
                    }
                    if newer {
                        None
                    } else if running {
                        self.started_locked(st, &name, ip)
                    } else {
                        if entry.running {
                            entry.incarnation += 1;
                            entry.revision = self.next_revision();
                        }
                        entry.running = false;
                        entry.ready = false;
                        entry.exit_code = exit_code_of(c.status.as_deref());
                        None
                    }
                };
                self.spawn_probe(&name, probe);
                let st = self.lock();
                if let Some(t) = st.instances.get(&name) {
                    out.push(self.instance_of(&name, t));
                }
            }
            // Forget what the daemon no longer has (the engine learns it from the list); a
            // container created while the list was taken is kept.
            self.lock()
                .instances
                .retain(|n, t| t.node != i || seen.contains(n) || t.revision > listed_from);
            listed.extend(seen);
        }
        self.sweep_files_folders(&listed).await;
        Ok(out)
    }

    async fn create(&self, spec: InstanceSpec) -> Result<Instance> {
        let i = self.pick_node(&spec.name)?;
        let r = self.create_on(i, &spec).await;
        let mut guard = self.lock();
        let st = &mut *guard;
        st.creating.remove(&spec.name);
        if r.is_err() {
            st.instances.remove(&spec.name);
        }
        r
    }

    async fn remove(&self, name: &str) -> Result<()> {
        match self.node_of(name) {
            Ok(i) => self.remove_on(i, name).await,
            Err(_) => {
                // Not tracked (say, listed before a restart of ours): try every reachable node.
                for i in 0..self.inner.nodes.len() {
                    if self.lock().health[i] == Health::Ready {
                        self.remove_on(i, name).await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn restart(&self, name: &str) -> Result<()> {
        let (_, docker) = self.docker_of(name)?;
        let opts = RestartContainerOptionsBuilder::default()
            .t(self.inner.config.restart_grace_secs)
            .build();
        docker
            .restart_container(name, Some(opts))
            .await
            .map_err(|e| map_err(e, name))
    }

    async fn exec(&self, name: &str, command: &[String]) -> Result<ExecOutput> {
        let (_, docker) = self.docker_of(name)?;
        exec_output(&docker, name, command)
            .await
            .map_err(|e| map_err(e, name))
    }

    async fn put_files(&self, name: &str, dir: &str, files: &[(String, Vec<u8>)]) -> Result<()> {
        let (i, docker) = self.docker_of(name)?;
        let mount = self
            .lock()
            .instances
            .get(name)
            .and_then(|t| t.files_mount.clone());
        let direct = mount
            .and_then(|m| hostfiles::under_mount(&m, dir))
            .filter(|_| self.inner.nodes[i].config.shares_files())
            .and_then(|sub| {
                self.inner
                    .host_files
                    .as_ref()
                    .map(|hf| (hf.dir_of(name), sub))
            });
        if let Some((folder, sub)) = direct {
            let files = files.to_vec();
            return tokio::task::spawn_blocking(move || {
                hostfiles::write_files(&folder, &sub, &files)
            })
            .await
            .map_err(|e| RuntimeError::Failed(format!("writing files: {e}")))?
            .map_err(RuntimeError::Failed);
        }
        let archive = tar_of(dir, files)?;
        let opts = UploadToContainerOptionsBuilder::default().path("/").build();
        docker
            .upload_to_container(name, Some(opts), bollard::body_full(archive.into()))
            .await
            .map_err(|e| map_err(e, name))
    }

    async fn logs(&self, name: &str, tail: usize) -> Result<String> {
        let (_, docker) = self.docker_of(name)?;
        let opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&tail.to_string())
            .build();
        let mut stream = docker.logs(name, Some(opts));
        let mut out = String::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => out.push_str(&String::from_utf8_lossy(&c.into_bytes())),
                Err(e) => return Err(map_err(e, name)),
            }
        }
        Ok(out)
    }

    fn follow_logs(&self, name: &str) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let this = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let start = jiff::Timestamp::now();
            // The last line's timestamp: a stream that ends (the container stopped) is taken
            // up again from there, without repeating lines.
            let mut last: Option<jiff::Timestamp> = None;
            loop {
                // Stops once the container is no longer tracked (removed).
                let Ok((_, docker)) = this.docker_of(&name) else {
                    return;
                };
                let since = last.unwrap_or(start).as_second();
                let opts = LogsOptionsBuilder::default()
                    .stdout(true)
                    .stderr(true)
                    .follow(true)
                    .timestamps(true)
                    .since(i32::try_from(since).unwrap_or(0))
                    .build();
                let mut stream = docker.logs(&name, Some(opts));
                let mut partial = String::new();
                while let Some(chunk) = stream.next().await {
                    let Ok(chunk) = chunk else { break };
                    partial.push_str(&String::from_utf8_lossy(chunk.as_ref()));
                    while let Some(nl) = partial.find('\n') {
                        let line: String = partial.drain(..=nl).collect();
                        let line = line.trim_end_matches(['\n', '\r']);
                        let (ts, text) = line.split_once(' ').unwrap_or((line, ""));
                        let Ok(t) = ts.parse::<jiff::Timestamp>() else {
                            continue;
                        };
                        if last.is_some_and(|l| t <= l) || (last.is_none() && t < start) {
                            continue;
                        }
                        last = Some(t);
                        if tx.send(text.to_owned()).is_err() {
                            return;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        rx
    }

    async fn ensure_network(&self, name: &str) -> Result<()> {
        for (i, node) in self.inner.nodes.iter().enumerate() {
            if self.lock().health[i] != Health::Ready {
                continue;
            }
            match node.docker.inspect_network(name, None).await {
                Ok(_) => continue,
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(map_err(e, name)),
            }
            let req = NetworkCreateRequest {
                name: name.to_owned(),
                driver: Some("bridge".to_owned()),
                labels: Some(self.ownership_labels()),
                ..Default::default()
            };
            match node.docker.create_network(req).await {
                Ok(_) => {}
                Err(e) if status_of(&e) == Some(409) => {}
                Err(e) => return Err(map_err(e, name)),
            }
        }
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        for (i, node) in self.inner.nodes.iter().enumerate() {
            if self.lock().health[i] != Health::Ready {
                continue;
            }
            match node.docker.remove_network(name).await {
                Ok(()) => {}
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(map_err(e, name)),
            }
        }
        Ok(())
    }

    async fn remove_volumes(&self, deployment: &str) -> Result<()> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_owned(),
            vec![
                format!("{LABEL_CONTROLLER}={}", self.inner.config.controller_id),
                format!("{LABEL_DEPLOYMENT}={deployment}"),
            ],
        );
        let opts = ListVolumesOptionsBuilder::default()
            .filters(&filters)
            .build();
        for (i, node) in self.inner.nodes.iter().enumerate() {
            if self.lock().health[i] != Health::Ready {
                continue;
            }
            let list = node
                .docker
                .list_volumes(Some(opts.clone()))
                .await
                .map_err(|e| map_err(e, deployment))?;
            for v in list.volumes.unwrap_or_default() {
                match node
                    .docker
                    .remove_volume(&v.name, None::<RemoveVolumeOptions>)
                    .await
                {
                    Ok(()) => info!(volume = %v.name, "volume removed"),
                    Err(e) if status_of(&e) == Some(404) => {}
                    Err(e) => return Err(map_err(e, &v.name)),
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self) -> mpsc::UnboundedReceiver<RuntimeEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().subscribers.push(tx);
        rx
    }
}

// ---- helpers ---------------------------------------------------------------------------------

/// Waits out a probe's initial delay; returns its timeout, period (`default_period` seconds
/// unless set) and failure threshold.
async fn probe_timing(probe: &Probe, default_period: u32) -> (Duration, Duration, u32) {
    if let Some(d) = probe.initial_delay_seconds {
        tokio::time::sleep(Duration::from_secs(u64::from(d))).await;
    }
    let secs =
        |s: Option<u32>, default: u32| Duration::from_secs(u64::from(s.unwrap_or(default).max(1)));
    (
        secs(probe.timeout_seconds, 1),
        secs(probe.period_seconds, default_period),
        probe.failure_threshold.unwrap_or(3).max(1),
    )
}

/// Runs `command` in `container` and collects its exit code and combined output (the
/// runtime's probes and resets, and the CLI's `exec --steps`).
pub(crate) async fn exec_output(
    docker: &Docker,
    container: &str,
    command: &[String],
) -> std::result::Result<ExecOutput, DockerError> {
    let exec = docker
        .create_exec(
            container,
            ExecConfig {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(command.to_vec()),
                ..Default::default()
            },
        )
        .await?;
    let mut output = String::new();
    if let StartExecResults::Attached {
        output: mut out, ..
    } = docker
        .start_exec(&exec.id, None::<StartExecOptions>)
        .await?
    {
        while let Some(chunk) = out.next().await {
            output.push_str(&String::from_utf8_lossy(&chunk?.into_bytes()));
        }
    }
    let info = docker.inspect_exec(&exec.id).await?;
    Ok(ExecOutput {
        exit_code: info.exit_code.unwrap_or(-1),
        output,
    })
}

/// The volume that mounts `name`'s host-backed files folder.
fn files_volume(name: &str) -> String {
    format!("{name}-files")
}

pub(crate) fn connect_url(url: &str) -> std::result::Result<Docker, DockerError> {
    if url.starts_with("unix://") {
        Docker::connect_with_unix(url, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else if url.starts_with("tcp://") || url.starts_with("http://") {
        Docker::connect_with_http(url, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_host(url)
    }
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `name:containerPort:hostPort/protocol`, comma-separated.
pub fn encode_ports(ports: &[PortBinding]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "{}:{}:{}/{}",
                p.name,
                p.container_port,
                p.host_port,
                proto(p.protocol)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn decode_ports(s: &str) -> Vec<PortBinding> {
    s.split(',')
        .filter_map(|item| {
            let (rest, protocol) = item.rsplit_once('/')?;
            let mut parts = rest.split(':');
            let name = parts.next()?.to_owned();
            let container_port = parts.next()?.parse().ok()?;
            let host_port = parts.next()?.parse().ok()?;
            Some(PortBinding {
                name,
                container_port,
                host_port,
                protocol: if protocol == "udp" {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
            })
        })
        .collect()
}

/// What the labels of a container say: its instance labels, published ports, readiness and
/// liveness probes, and files mount.
struct FromLabels {
    labels: Labels,
    ports: Vec<PortBinding>,
    probe: Option<Probe>,
    liveness: Option<Probe>,
    files_mount: Option<String>,
}

fn labels_of(map: Option<&HashMap<String, String>>) -> FromLabels {
    let map = map.cloned().unwrap_or_default();
    let ports = map
        .get(LABEL_PORTS)
        .map(|s| decode_ports(s))
        .unwrap_or_default();
    let probe_of = |label: &str| map.get(label).and_then(|s| serde_json::from_str(s).ok());
    let probe = probe_of(LABEL_READINESS);
    let liveness = probe_of(LABEL_LIVENESS);
    let files_mount = map.get(LABEL_FILES_DIR).cloned();
    // The bookkeeping labels stay out of the instance's labels (the engine compares those).
    let labels: BTreeMap<String, String> = map
        .into_iter()
        .filter(|(k, _)| {
            ![
                LABEL_PORTS,
                LABEL_READINESS,
                LABEL_LIVENESS,
                LABEL_FILES_DIR,
            ]
            .contains(&k.as_str())
        })
        .collect();
    FromLabels {
        labels: Arc::new(labels),
        ports,
        probe,
        liveness,
        files_mount,
    }
}

fn tracked(
    node: usize,
    labels: Option<&HashMap<String, String>>,
    exit_code: Option<i64>,
    ip: Option<String>,
) -> Tracked {
    let FromLabels {
        labels,
        ports,
        probe,
        liveness,
        files_mount,
    } = labels_of(labels);
    Tracked {
        node,
        labels,
        ports,
        probe,
        liveness,
        running: false,
        ready: false,
        exit_code,
        incarnation: 0,
        ip,
        revision: 0,
        files_mount,
    }
}

fn tracked_from_summary(i: usize, c: &ContainerSummary) -> Tracked {
    tracked(
        i,
        c.labels.as_ref(),
        exit_code_of(c.status.as_deref()),
        None,
    )
}

fn tracked_from_inspect(i: usize, r: &ContainerInspectResponse) -> Option<Tracked> {
    let config = r.config.as_ref()?;
    let ip = r
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .and_then(|n| {
            n.values()
                .filter_map(|e| e.ip_address.clone())
                .find(|ip| !ip.is_empty())
        });
    Some(tracked(
        i,
        config.labels.as_ref(),
        r.state.as_ref().and_then(|s| s.exit_code),
        ip,
    ))
}

/// The exit code in a summary status such as `Exited (137) 2 minutes ago`.
fn exit_code_of(status: Option<&str>) -> Option<i64> {
    let s = status?;
    let open = s.find('(')?;
    let close = s[open..].find(')')? + open;
    s[open + 1..close].parse().ok()
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn docker_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn map_err(e: DockerError, what: &str) -> RuntimeError {
    match &e {
        DockerError::DockerResponseServerError {
            status_code: 404, ..
        } => RuntimeError::NotFound(what.to_owned()),
        DockerError::DockerResponseServerError { message, .. } => {
            RuntimeError::Failed(message.clone())
        }
        // Transport failures (the daemon is down, restarting or gone away mid-request) say
        // nothing about the instance.
        DockerError::HyperResponseError { .. }
        | DockerError::HyperLegacyError { .. }
        | DockerError::IOError { .. }
        | DockerError::RequestTimeoutError
        | DockerError::SocketNotFoundError(_) => RuntimeError::Unavailable(e.to_string()),
        _ => RuntimeError::Failed(e.to_string()),
    }
}

/// A start error, with "port in use" recognised so the engine picks another port.
fn start_error(e: DockerError, name: &str) -> RuntimeError {
    let msg = docker_message(&e);
    if let Some(port) = port_in_use(&msg) {
        return RuntimeError::PortInUse { port };
    }
    map_err(e, name)
}

/// Docker's messages for a host port that is taken: `Bind for 0.0.0.0:8000 failed: port is
/// already allocated` (by another container) and `listen tcp4 0.0.0.0:8000: bind: address
/// already in use` (by another process).
pub fn port_in_use(msg: &str) -> Option<u16> {
    if !(msg.contains("port is already allocated") || msg.contains("address already in use")) {
        return None;
    }
    let marker = if let Some(i) = msg.find("Bind for ") {
        &msg[i + "Bind for ".len()..]
    } else if let Some(i) = msg.find("listen tcp") {
        &msg[i..]
    } else if let Some(i) = msg.find("listen udp") {
        &msg[i..]
    } else {
        return None;
    };
    let addr = marker
        .split([' ', ','])
        .find(|w| w.contains(':'))?
        .trim_end_matches(':');
    addr.rsplit(':').next()?.parse().ok()
}

fn within(root: &Path, path: &Path) -> bool {
    let mut normal = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !normal.pop() {
                    return false;
                }
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal.starts_with(root)
}

/// A tar archive placing `files` (relative paths) under `dir`, extracted at `/`. Paths that
/// would leave `dir` are refused.
fn tar_of(dir: &str, files: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let base = dir.trim_start_matches('/').trim_end_matches('/');
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in files {
        let rel = Path::new(path);
        if !super::is_plain_relative(rel) {
            return Err(RuntimeError::Failed(format!(
                "file path {path:?} must be relative and stay inside {dir}"
            )));
        }
        let full = if base.is_empty() {
            path.clone()
        } else {
            format!("{base}/{path}")
        };
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(jiff::Timestamp::now().as_second().max(0).unsigned_abs());
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, &full, bytes.as_slice())
            .map_err(|e| RuntimeError::Failed(format!("packing {path}: {e}")))?;
    }
    builder
        .into_inner()
        .map_err(|e| RuntimeError::Failed(format!("packing files: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_round_trip_through_the_label() {
        let ports = vec![
            PortBinding {
                name: "http".into(),
                container_port: 80,
                host_port: 8000,
                protocol: Protocol::Tcp,
            },
            PortBinding {
                name: "dns".into(),
                container_port: 53,
                host_port: 0,
                protocol: Protocol::Udp,
            },
        ];
        assert_eq!(encode_ports(&ports), "http:80:8000/tcp,dns:53:0/udp");
        assert_eq!(decode_ports(&encode_ports(&ports)), ports);
        assert!(decode_ports("").is_empty());
        assert!(decode_ports("garbage,x:y:z/tcp").is_empty());
    }

    #[test]
    fn port_in_use_messages() {
        assert_eq!(
            port_in_use(
                "driver failed programming external connectivity on endpoint x (abc): Bind for 0.0.0.0:8003 failed: port is already allocated"
            ),
            Some(8003)
        );
        assert_eq!(
            port_in_use(
                "driver failed programming external connectivity on endpoint x (abc): Error starting userland proxy: listen tcp4 0.0.0.0:8100: bind: address already in use"
            ),
            Some(8100)
        );
        assert_eq!(port_in_use("no such image"), None);
    }

    #[test]
    fn exit_codes_from_status() {
        assert_eq!(exit_code_of(Some("Exited (137) 2 minutes ago")), Some(137));
        assert_eq!(exit_code_of(Some("Up 3 seconds")), None);
        assert_eq!(exit_code_of(None), None);
    }

    #[test]
    fn binds_stay_under_the_root() {
        let root = Path::new("/data/state");
        assert!(within(root, Path::new("/data/state/vol/a")));
        assert!(!within(root, Path::new("/data/state/../etc")));
        assert!(!within(root, Path::new("/etc/passwd")));
        assert!(!within(root, Path::new("/data/statefoo")));
    }

    #[test]
    fn tar_refuses_escapes_and_places_files_under_the_dir() {
        assert!(tar_of("/srv", &[("../etc/passwd".into(), vec![])]).is_err());
        assert!(tar_of("/srv", &[("/etc/passwd".into(), vec![])]).is_err());
        let t = tar_of("/srv/www/", &[("a/b.txt".into(), b"hi".to_vec())]);
        let bytes = t.unwrap_or_default();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.path().ok().map(|p| p.display().to_string()))
            .collect();
        assert_eq!(names, vec!["srv/www/a/b.txt".to_owned()]);
    }

    #[test]
    fn advertise_addresses() {
        assert_eq!(
            NodeConfig::from_url("a", "unix:///var/run/docker.sock").advertise(),
            "127.0.0.1"
        );
        assert_eq!(
            NodeConfig::from_url("a", "tcp://10.1.2.3:2375").advertise(),
            "10.1.2.3"
        );
        let mut n = NodeConfig::from_url("a", "/run/d.sock");
        assert_eq!(n.normalized_url(), "unix:///run/d.sock");
        n.listen_address = Some("127.0.0.2".into());
        assert_eq!(n.advertise(), "127.0.0.2");
    }
}
