//! The Docker runtime: one or more Docker Engines (unix socket or tcp), driven through bollard.
//!
//! - **Ownership** is in labels (`poolkeeper.dev/managed=true` and the rest); a restarted
//!   controller lists them and adopts what it made. Published ports and the readiness probe are
//!   labels too, so an adopted container is probed and accounted for like a fresh one.
//! - **Events**: one `/events` stream per node, filtered to managed containers; a reconnect asks
//!   the engine to list again, and replays from the last event seen, so nothing is lost.
//! - **Readiness** is probed by the controller (HTTP GET and TCP against the published port, or
//!   exec inside the container): an instance is reported ready only after its probe passes.
//! - **Nodes**: pool instances are placed on the least-loaded reachable node, a deployment's
//!   containers on its one node (where it was placed, else where most of them run, while that
//!   node is Ready: its network and named volumes are that node's). Placements are kept in a
//!   file under the state directory across restarts. A node unreachable for longer than
//!   `node_down_after` is declared down: its instances are reported removed (the engine replaces
//!   them elsewhere and re-binds their claims), except that a deployment with named volumes
//!   waits for its node (its creations fail Unavailable until the node is back), and when the
//!   node comes back the containers left on it are removed, so that no stale instance, with a
//!   former user's files, is ever handed out again.
//! - **Safety**: containers never run privileged, get `no-new-privileges`, and bind-mount only
//!   paths under the configured allowed root.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerSummaryStateEnum, NetworkCreateRequest};
use bollard::query_parameters::{
    ListVolumesOptionsBuilder, LogsOptionsBuilder, RemoveVolumeOptions,
    RestartContainerOptionsBuilder, StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

mod containers;
mod errors;
mod events;
pub mod hostfiles;
mod labels;
mod placement;
mod probes;
#[cfg(test)]
mod tests;

pub use containers::exec_output;
pub use errors::port_in_use;
pub use labels::{decode_ports, encode_ports};

use poolkeeper_kinds::Probe;
use poolkeeper_runtime::{
    ExecOutput, Instance, InstanceSpec, InstanceState, LABEL_CONTROLLER, LABEL_DEPLOYMENT,
    LABEL_MANAGED, Labels, NodeStatus, PortBinding, Result, Runtime, RuntimeError, RuntimeEvent,
};

use crate::containers::tar_of;
use crate::errors::{map_err, status_of};
use crate::hostfiles::HostFiles;
use crate::labels::{exit_code_of, tracked_from_summary};

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
    /// `runtime::hostfiles`). Default: true for a unix socket when poolkeeper runs as root,
    /// false otherwise: Docker gives a folder it fills from the image the image's owner, so a
    /// service running as its own user could not write claims' files into it.
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
        self.shares_files_as(rustix::process::geteuid().is_root())
    }

    /// [`Self::shares_files`], for a process that runs as root or not.
    fn shares_files_as(&self, root: bool) -> bool {
        self.shared_files
            .unwrap_or_else(|| root && self.normalized_url().starts_with("unix://"))
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
    /// Where each deployment's node is kept across restarts (see `placement`); `None` keeps it
    /// in memory only.
    pub placements_file: Option<PathBuf>,
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
            placements_file: None,
        }
    }
}

struct Node {
    config: NodeConfig,
    address: String,
    /// None until a client could be made: a unix socket that does not exist yet (the daemon
    /// not started, or stopped) cannot be connected to, and the node's watcher tries again.
    docker: std::sync::RwLock<Option<Docker>>,
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
    /// The node each deployment was placed on: its containers reach each other by name on a
    /// network of one node, and its named volumes live there, so they all go where the first
    /// went (while that node is Ready).
    placed: HashMap<String, placement::Placement>,
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
    /// Held while the placements file is written.
    placement_writes: tokio::sync::Mutex<()>,
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
            if n.shared_files == Some(true) && !rustix::process::geteuid().is_root() {
                warn!(node = %n.name, "sharedFiles is on while poolkeeper does not run as root: \
                    Docker gives the files folders it fills the image's owner, so writing claims' \
                    files may be refused (leave sharedFiles unset to upload them instead)");
            }
            let (docker, h, msg) = match connect_url(&url) {
                Ok(docker) => match docker.clone().negotiate_version().await {
                    Ok(d) => match d.ping().await {
                        Ok(_) => (Some(d), Health::Ready, None),
                        Err(e) => (
                            Some(docker),
                            Health::Unreachable(Instant::now()),
                            Some(e.to_string()),
                        ),
                    },
                    // Not negotiated: no client yet (the default API version may be newer than
                    // the daemon's); the node's watcher makes one once the daemon answers.
                    Err(e) => (
                        None,
                        Health::Unreachable(Instant::now()),
                        Some(e.to_string()),
                    ),
                },
                // A socket that is not there (yet): the node starts unreachable, and its watcher
                // connects once it appears, as for a daemon that does not answer.
                Err(e) if url.starts_with("unix://") => (
                    None,
                    Health::Unreachable(Instant::now()),
                    Some(e.to_string()),
                ),
                Err(e) => anyhow::bail!("node {} ({url}): {e}", n.name),
            };
            match (&msg, &docker) {
                (None, Some(d)) => {
                    info!(node = %n.name, url = %url, api = %d.client_version(), "connected to Docker");
                }
                _ => warn!(node = %n.name, url = %url, error = %msg.as_deref().unwrap_or(""),
                    "Docker node unreachable"),
            }
            nodes.push(Node {
                address: n.advertise(),
                config: n.clone(),
                docker: std::sync::RwLock::new(docker),
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
        let placed = match &config.placements_file {
            Some(path) => {
                let names: Vec<&str> = nodes.iter().map(|n| n.config.name.as_str()).collect();
                placement::load(path, &names)?
            }
            None => HashMap::new(),
        };
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
                    placed,
                    gone: HashMap::new(),
                    sweep: HashSet::new(),
                }),
                placement_writes: tokio::sync::Mutex::new(()),
            }),
        };
        for i in 0..count {
            tokio::spawn(rt.clone().watch_node(i));
        }
        Ok(rt)
    }

    /// The client of the first node (benchmarks compare against raw Docker calls through it).
    pub fn first_client(&self) -> Result<Docker> {
        self.docker(0)
    }

    /// Node `i`'s client: Unavailable while none could be made (its socket is missing).
    pub(crate) fn docker(&self, i: usize) -> Result<Docker> {
        let node = &self.inner.nodes[i];
        node.docker
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                RuntimeError::Unavailable(format!(
                    "Docker node {} ({}) is not connected yet",
                    node.config.name,
                    node.config.normalized_url()
                ))
            })
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
                api_version: self.docker(i).ok().map(|d| d.client_version().to_string()),
                namespace: None,
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
            host_ports: true,
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
        Ok((i, self.docker(i)?))
    }

    /// The node for creation `name`, which is in flight from here on: a deployment's container
    /// goes where its deployment runs (a node running one of its containers, else where its
    /// first was placed) while that node is Ready; anything else to the least-loaded reachable
    /// node. A deployment one of whose containers mounts a named volume (`volumes`: this one's)
    /// never moves: while its node is not Ready, every creation of it fails Unavailable, and is
    /// tried again (the engine backs off) until the node returns, rather than starting elsewhere
    /// on empty volumes. Also whether the placements changed (to be saved).
    fn pick_node(
        &self,
        name: &str,
        deployment: Option<&str>,
        volumes: &[&str],
    ) -> Result<(usize, bool)> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut chosen = None;
        if let Some(d) = deployment {
            let ready = |i: &usize| st.health[*i] == Health::Ready;
            if let Some(p) = st.placed.get(d).copied()
                && !ready(&p.node)
                && (p.pinned || !volumes.is_empty())
            {
                let state = if st.health[p.node] == Health::Down {
                    "down"
                } else {
                    "unreachable"
                };
                let which = if volumes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", volumes.join(", "))
                };
                return Err(RuntimeError::Unavailable(format!(
                    "deployment {d} keeps its named volumes{which} on node {}, which is {state}; \
                     its containers wait for that node rather than start elsewhere on empty \
                     volumes",
                    self.inner.nodes[p.node].config.name
                )));
            }
            // Where it was placed; else (no placement recorded) the node most of its
            // containers run on.
            let mut on = vec![0usize; self.inner.nodes.len()];
            for t in st.instances.values() {
                if t.labels.get(LABEL_DEPLOYMENT).is_some_and(|x| x == d) {
                    on[t.node] += 1;
                }
            }
            let most = (0..on.len())
                .filter(|i| on[*i] > 0 && ready(i))
                .max_by_key(|i| (on[*i], std::cmp::Reverse(*i)));
            chosen = st.placed.get(d).map(|p| p.node).filter(ready).or(most);
        }
        let i = match chosen {
            Some(i) => i,
            None => {
                let mut load = vec![0usize; self.inner.nodes.len()];
                for node in st
                    .instances
                    .values()
                    .map(|t| t.node)
                    .chain(st.creating.values().copied())
                {
                    load[node] += 1;
                }
                (0..self.inner.nodes.len())
                    .filter(|i| st.health[*i] == Health::Ready)
                    .min_by_key(|i| (load[*i], *i))
                    .ok_or_else(|| {
                        RuntimeError::Unavailable("no Docker node is reachable".to_owned())
                    })?
            }
        };
        st.creating.insert(name.to_owned(), i);
        // A pinned deployment is on its node here (it never moves), and `place` keeps its pin.
        let changed = deployment.is_some_and(|d| Self::place(st, d, i, !volumes.is_empty()));
        Ok((i, changed))
    }

    /// Records deployment `d` on node `i` (pinned if it has named volumes; a pin is never
    /// taken back while the deployment's volumes exist): whether that changed anything.
    fn place(st: &mut State, d: &str, i: usize, pinned: bool) -> bool {
        let new = placement::Placement {
            node: i,
            pinned: pinned || st.placed.get(d).is_some_and(|p| p.pinned && p.node == i),
        };
        st.placed.insert(d.to_owned(), new) != Some(new)
    }

    /// Writes every deployment's node to the placements file, if there is one, off the async
    /// workers. One writer at a time, each writing what is placed when it writes, so that the
    /// last write is the latest.
    async fn save_placements(&self) {
        let Some(path) = self.inner.config.placements_file.clone() else {
            return;
        };
        let _one = self.inner.placement_writes.lock().await;
        let placed = self.lock().placed.clone();
        let names: Vec<String> = self
            .inner
            .nodes
            .iter()
            .map(|n| n.config.name.clone())
            .collect();
        let written =
            tokio::task::spawn_blocking(move || placement::save(&path, &placed, &names)).await;
        let e = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        warn!(file = ?self.inner.config.placements_file, error = %e,
            "recording where deployments run failed; a restart while a node is down may place \
             them anew");
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
        let mut placements_changed = false;
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
                // A deployment's containers found here place it here, if nothing placed it
                // yet (a controller that kept no placements, or one from before they were
                // kept), and pin it if they mount its named volumes.
                if let Some(d) = c.labels.as_ref().and_then(|l| l.get(LABEL_DEPLOYMENT)) {
                    let prefix = format!("{d}_");
                    let named = c.mounts.iter().flatten().any(|m| {
                        m.typ.as_deref() == Some("volume")
                            && m.name.as_deref().is_some_and(|n| n.starts_with(&prefix))
                    });
                    let mut st = self.lock();
                    let adopt = match st.placed.get(d) {
                        None => true,
                        Some(p) => p.node == i && named && !p.pinned,
                    };
                    if adopt {
                        placements_changed |= Self::place(&mut st, d, i, named);
                    }
                }
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
            // container created while the list was taken is kept, and so is one still being
            // created: its record is made before the daemon has it (with a revision older than
            // a list begun meanwhile), and forgetting it here failed its creation with
            // NotFound (seen once in CI under load).
            {
                let mut guard = self.lock();
                let st = &mut *guard;
                let creating = &st.creating;
                st.instances.retain(|n, t| {
                    t.node != i
                        || seen.contains(n)
                        || t.revision > listed_from
                        || creating.contains_key(n)
                });
            }
            listed.extend(seen);
        }
        self.sweep_files_folders(&listed).await;
        if placements_changed {
            self.save_placements().await;
        }
        Ok(out)
    }

    async fn create(&self, spec: InstanceSpec) -> Result<Instance> {
        if let Some(e) = spec.exposure
            && e != poolkeeper_kinds::Exposure::HostPort
        {
            return Err(RuntimeError::Failed(format!(
                "spec.exposure: {} needs the Kubernetes runtime (--runtime kube); the Docker \
                 runtime publishes host ports (exposure HostPort)",
                e.as_str()
            )));
        }
        let deployment = spec.labels.get(LABEL_DEPLOYMENT).map(String::as_str);
        let named: Vec<&str> = spec
            .volumes
            .keys()
            .map(String::as_str)
            .filter(|v| !poolkeeper_core::deployment::is_host_path(v))
            .collect();
        let (i, placed) = self.pick_node(&spec.name, deployment, &named)?;
        if placed {
            self.save_placements().await;
        }
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

    /// `docker update`: the limits change on the running container. Memory's swap limit moves
    /// with it (twice the memory, Docker's default when a container is created with a memory
    /// limit), as the daemon refuses a memory limit above the swap limit already set.
    async fn resize(
        &self,
        name: &str,
        cpu_millis: Option<u64>,
        memory_bytes: Option<u64>,
    ) -> Result<()> {
        let (_, docker) = self.docker_of(name)?;
        let memory = memory_bytes.map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        let body = bollard::models::ContainerUpdateBody {
            nano_cpus: cpu_millis
                .map(|m| i64::try_from(m.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            memory,
            memory_swap: memory.map(|m| m.saturating_mul(2)),
            ..Default::default()
        };
        docker
            .update_container(name, body)
            .await
            .map_err(|e| map_err(e, name))
    }

    async fn stop(&self, name: &str) -> Result<()> {
        let (_, docker) = self.docker_of(name)?;
        let opts = StopContainerOptionsBuilder::default()
            .t(self.inner.config.stop_grace_secs)
            .build();
        match docker.stop_container(name, Some(opts)).await {
            // 304: already stopped.
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            r => r.map_err(|e| map_err(e, name)),
        }
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
        for i in 0..self.inner.nodes.len() {
            if self.lock().health[i] != Health::Ready {
                continue;
            }
            let docker = self.docker(i)?;
            match docker.inspect_network(name, None).await {
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
            match docker.create_network(req).await {
                Ok(_) => {}
                Err(e) if status_of(&e) == Some(409) => {}
                Err(e) => return Err(map_err(e, name)),
            }
        }
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        for i in 0..self.inner.nodes.len() {
            if self.lock().health[i] != Health::Ready {
                continue;
            }
            let docker = self.docker(i)?;
            // Only a network this controller made: one made by hand, or another controller's
            // of the same name, is left alone.
            let labels = match docker.inspect_network(name, None).await {
                Ok(n) => n.labels.unwrap_or_default(),
                Err(e) if status_of(&e) == Some(404) => continue,
                Err(e) => return Err(map_err(e, name)),
            };
            if !self.made_here(&labels) {
                info!(network = %name, "the network is not this controller's: left in place");
                continue;
            }
            match docker.remove_network(name).await {
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
        for i in 0..self.inner.nodes.len() {
            if self.lock().health[i] != Health::Ready {
                continue;
            }
            let docker = self.docker(i)?;
            let list = docker
                .list_volumes(Some(opts.clone()))
                .await
                .map_err(|e| map_err(e, deployment))?;
            for v in list.volumes.unwrap_or_default() {
                match docker
                    .remove_volume(&v.name, None::<RemoveVolumeOptions>)
                    .await
                {
                    Ok(()) => info!(volume = %v.name, "volume removed"),
                    Err(e) if status_of(&e) == Some(404) => {}
                    Err(e) => return Err(map_err(e, &v.name)),
                }
            }
        }
        // Its data is gone: declared again, it may be placed anywhere.
        if self.lock().placed.remove(deployment).is_some() {
            self.save_placements().await;
        }
        Ok(())
    }

    fn subscribe(&self) -> mpsc::UnboundedReceiver<RuntimeEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().subscribers.push(tx);
        rx
    }
}

pub fn connect_url(url: &str) -> std::result::Result<Docker, DockerError> {
    if url.starts_with("unix://") {
        Docker::connect_with_unix(url, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else if url.starts_with("tcp://") || url.starts_with("http://") {
        Docker::connect_with_http(url, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_host(url)
    }
}
