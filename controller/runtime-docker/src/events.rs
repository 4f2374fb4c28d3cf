//! Each node's `/events` stream and health: what Docker reports becomes the engine's events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures::StreamExt;
use tracing::{debug, info, warn};

use poolkeeper_runtime::RuntimeEvent;

use crate::{DockerRuntime, Health, State};

impl DockerRuntime {
    pub(crate) async fn watch_node(self, i: usize) {
        let name = self.inner.nodes[i].config.name.clone();
        let mut since: Option<i64> = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            let docker = match self.docker(i) {
                Ok(d) => d,
                // No client yet (its unix socket was missing): made once the socket is there.
                Err(_) => match self.reconnect(i).await {
                    Ok(d) => d,
                    Err(e) => {
                        self.unreachable(i, &e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
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

    /// Makes node `i`'s client, with the API version its daemon speaks.
    async fn reconnect(&self, i: usize) -> std::result::Result<bollard::Docker, String> {
        let node = &self.inner.nodes[i];
        let url = node.config.normalized_url();
        let docker = crate::connect_url(&url).map_err(|e| e.to_string())?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        info!(node = %node.config.name, url = %url, api = %docker.client_version(), "connected to Docker");
        *node.docker.write().unwrap_or_else(|e| e.into_inner()) = Some(docker.clone());
        Ok(docker)
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
                // A list that failed while the node was unreachable (a controller starting, say)
                // succeeds now, without the node: asked for at once, not at the next resync.
                Self::emit(&mut st.subscribers, RuntimeEvent::Relist);
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
                // Started again (restarted, or started after a stop): its address may be a new
                // one, which its probes need when they reach a port it does not publish.
                // (Not for a creation's own start: the creation reads the address itself, and
                // this loop waits for nothing it need not.)
                let probed = {
                    let st = self.lock();
                    !st.creating.contains_key(&name)
                        && (st.instances.get(&name))
                            .is_some_and(|t| t.probe.is_some() || t.liveness.is_some())
                };
                let ip = self.ip_if(probed, i, &name).await;
                self.mark_started(&name, ip);
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
    pub(crate) fn mark_started(&self, name: &str, ip: Option<String>) {
        let probe = {
            let mut guard = self.lock();
            self.started_locked(&mut guard, name, ip)
        };
        self.spawn_probe(name, probe);
    }

    /// [`Self::mark_started`] under the lock the caller holds; returns the incarnation to probe.
    pub(crate) fn started_locked(
        &self,
        st: &mut State,
        name: &str,
        ip: Option<String>,
    ) -> Option<u64> {
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
}
