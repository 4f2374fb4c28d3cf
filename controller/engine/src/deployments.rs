//! Deployments: each container kept running as declared, in dependency order, with its log
//! triggers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use poolkeeper_core::deployment::{
    Current, Old, Slot, SlotContext, Step, burst_starts, is_host_path, plan_slot, start_order,
    stoppable, volume_name,
};
use poolkeeper_core::pool::InstancePhase;
use poolkeeper_kinds::validate::parse_port_key;
use poolkeeper_runtime::{
    InstanceSpec, LABEL_CONTAINER, LABEL_DEPLOYMENT, LABEL_HASH, LABEL_MANAGED, LABEL_REPLICA,
    PortBinding, Runtime,
};

use crate::handle::{Completion, Input};
use crate::{Engine, InstRec, status};

/// Whether `rec` is an instance of deployment `dep`.
fn of_deployment(rec: &InstRec, dep: &str) -> bool {
    rec.deployment.as_deref().is_some_and(|(d, ..)| d == dep)
}

/// Why container `c` cannot be made: its instance name is another's (deployment `web-app`'s
/// container `db` and deployment `web`'s container `app-db` are both `web-app-db`).
fn taken_message(c: &poolkeeper_kinds::ContainerSpec, instance: &str, other: &InstRec) -> String {
    let whose = match (other.deployment.as_deref(), &other.pool) {
        (Some((d, oc, _)), _) => format!("deployment {d}'s container {oc}"),
        (None, Some(p)) => format!("an instance of pool {p}"),
        (None, None) => "another instance".to_owned(),
    };
    format!(
        "container {}: its instance name {instance} is {whose}; rename the deployment or the \
         container",
        c.name
    )
}

/// The instance name of replica `r` of container `c` of deployment `dep` (the replica number is
/// left out when there is only one).
pub(crate) fn slot_name(dep: &str, c: &poolkeeper_kinds::ContainerSpec, r: u32) -> String {
    if c.replicas > 1 {
        format!("{dep}-{}-{r}", c.name)
    } else {
        format!("{dep}-{}", c.name)
    }
}

impl<R: Runtime> Engine<R> {
    /// The instances of deployment `name`, by (container, replica).
    pub(crate) fn deployment_slots(&self, name: &str) -> BTreeMap<(String, u32), Vec<&InstRec>> {
        let mut slots: BTreeMap<(String, u32), Vec<&InstRec>> = BTreeMap::new();
        for r in self.instances.values() {
            if let Some((d, c, replica)) = r.deployment.as_deref()
                && d == name
            {
                slots.entry((c.clone(), *replica)).or_default().push(r);
            }
        }
        slots
    }

    /// A deleted deployment: stops dependents before their dependencies (each container goes
    /// once nothing that depends on it is left), then removes its network and, unless
    /// `retainVolumes`, its named volumes.
    fn drain_deployment(&mut self, name: &str) {
        let last = self.deployments.get(name).and_then(|d| d.last_spec.clone());
        let slots = self.deployment_slots(name);
        if slots.is_empty() {
            let Some(d) = self.deployments.remove(name) else {
                return;
            };
            let rt = self.rt.clone();
            let dep = name.to_owned();
            // Without the last spec (deleted while the controller was down) whether to keep
            // the volumes is unknown: data is kept, and said so.
            let drop_volumes = last.as_ref().map(|s| !s.retain_volumes);
            // A network another deployment joins stays (it goes with the last of them).
            let network = d.network_ready.filter(|net| {
                !self.deployments.values().any(|o| {
                    o.network_ready.as_ref() == Some(net)
                        || o.spec.as_ref().and_then(|s| s.network.as_ref()) == Some(net)
                })
            });
            tokio::spawn(async move {
                if let Some(net) = network
                    && let Err(e) = rt.remove_network(&net).await
                {
                    warn!(network = %net, error = %e, "removing network failed");
                }
                match drop_volumes {
                    Some(true) => {
                        if let Err(e) = rt.remove_volumes(&dep).await {
                            warn!(deployment = %dep, error = %e, "removing volumes failed");
                        }
                    }
                    Some(false) => {}
                    None => info!(deployment = %dep,
                        "deployment removed while the controller was down: its volumes are kept"),
                }
            });
            return;
        }
        let present: BTreeSet<&str> = slots.keys().map(|(c, _)| c.as_str()).collect();
        let stop_now: BTreeSet<&str> = match &last {
            Some(spec) => {
                let mut ok: BTreeSet<&str> =
                    stoppable(&spec.containers, &present).into_iter().collect();
                // Containers the last spec no longer names have no order to keep.
                ok.extend(
                    present
                        .iter()
                        .filter(|c| !spec.containers.iter().any(|s| s.name == **c)),
                );
                ok
            }
            None => present.clone(),
        };
        let remove: Vec<String> = slots
            .iter()
            .filter(|((c, _), _)| stop_now.contains(c.as_str()))
            .flat_map(|(_, recs)| recs.iter().map(|r| r.name.clone()))
            .collect();
        for i in remove {
            self.remove_instance(&i);
        }
    }

    pub(crate) fn reconcile_deployment(&mut self, name: &str, now: u64) {
        let Some(dep) = self.deployments.get(name) else {
            return;
        };
        let Some(spec) = dep.spec.clone() else {
            self.drain_deployment(name);
            return;
        };
        let hashes = dep.hashes.clone();
        // The network first.
        if let Some(net) = &spec.network {
            let ready = self
                .deployments
                .get(name)
                .and_then(|d| d.network_ready.as_ref())
                == Some(net);
            if !ready {
                let pending = self
                    .deployments
                    .get(name)
                    .is_some_and(|d| d.network_pending);
                let retry_at = self.deployments.get(name).map_or(0, |d| d.network_retry_at);
                // After a failure, the wakeup it set tries again.
                if !pending && retry_at <= now {
                    if let Some(d) = self.deployments.get_mut(name) {
                        d.network_pending = true;
                    }
                    let rt = self.rt.clone();
                    let tx = self.tx.clone();
                    let (deployment, net) = (name.to_owned(), net.clone());
                    tokio::spawn(async move {
                        let result = rt.ensure_network(&net).await;
                        let _ = tx.send(Input::Done(Completion::Network { deployment, result }));
                    });
                }
                return;
            }
        }
        let hash_of = |c: &str| hashes.get(c).map(String::as_str).unwrap_or_default();
        // What each replica has: its current instance, older ones, removals in progress.
        struct SlotNow {
            current: Option<(String, Current)>,
            old: Vec<(String, bool)>,
            removing: bool,
        }
        let mut slots: BTreeMap<(String, u32), SlotNow> = BTreeMap::new();
        let mut unwanted: Vec<String> = Vec::new();
        for ((cname, r), recs) in self.deployment_slots(name) {
            let declared = spec
                .containers
                .iter()
                .any(|c| c.name == cname && r < c.replicas);
            let mut slot = SlotNow {
                current: None,
                old: Vec::new(),
                removing: false,
            };
            for rec in recs {
                if rec.phase == InstancePhase::Deleting {
                    slot.removing = true;
                } else if !declared {
                    unwanted.push(rec.name.clone());
                } else if *rec.hash == *hash_of(&cname) && slot.current.is_none() {
                    let cur = match rec.phase {
                        InstancePhase::Creating => Current::Creating,
                        InstancePhase::Ready => Current::Ready,
                        InstancePhase::Dead => Current::Exited {
                            code: rec.exit_code,
                        },
                        _ => Current::Starting,
                    };
                    slot.current = Some((rec.name.clone(), cur));
                } else {
                    slot.old
                        .push((rec.name.clone(), rec.phase == InstancePhase::Ready));
                }
            }
            slots.insert((cname, r), slot);
        }
        // A container is settled when every replica is current, ready, and alone.
        let settled: BTreeMap<&str, bool> = spec
            .containers
            .iter()
            .map(|c| {
                let ok = (0..c.replicas).all(|r| {
                    slots.get(&(c.name.clone(), r)).is_some_and(|s| {
                        matches!(s.current, Some((_, Current::Ready))) && s.old.is_empty()
                    })
                });
                (c.name.as_str(), ok)
            })
            .collect();
        // A container is up when some instance of it (current or old) is ready.
        let up: BTreeSet<&str> = slots
            .iter()
            .filter(|(_, s)| {
                matches!(s.current, Some((_, Current::Ready))) || s.old.iter().any(|(_, r)| *r)
            })
            .map(|((c, _), _)| c.as_str())
            .collect();
        let by_name: BTreeMap<&str, &poolkeeper_kinds::ContainerSpec> = spec
            .containers
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        let mut conflicts: Vec<String> = Vec::new();
        let mut taken: Vec<String> = Vec::new();
        for cname in start_order(&spec.containers) {
            let Some(c) = by_name.get(cname).copied() else {
                continue;
            };
            let hash = hash_of(cname).to_owned();
            let deps_waiting: Vec<String> = c
                .depends_on
                .iter()
                .filter(|d| !settled.get(d.as_str()).copied().unwrap_or(false))
                .cloned()
                .collect();
            let deps_down: Vec<String> = c
                .depends_on
                .iter()
                .filter(|d| !up.contains(d.as_str()))
                .cloned()
                .collect();
            for r in 0..c.replicas {
                let key = slot_name(name, c, r);
                let empty = SlotNow {
                    current: None,
                    old: Vec::new(),
                    removing: false,
                };
                let now_slot = slots.get(&(c.name.clone(), r)).unwrap_or(&empty);
                let view = Slot {
                    current: now_slot.current.as_ref().map(|(_, cur)| cur.clone()),
                    old: if now_slot.old.iter().any(|(_, ready)| *ready) {
                        Old::Ready
                    } else if now_slot.old.is_empty() {
                        Old::None
                    } else {
                        Old::NotReady
                    },
                    removing: now_slot.removing,
                };
                let (restarts, exited_at) = self
                    .deployments
                    .get(name)
                    .and_then(|d| d.restarts.get(&key).copied())
                    .unwrap_or((0, now));
                if let Some(Current::Exited { .. }) = view.current
                    && let Some(d) = self.deployments.get_mut(name)
                {
                    d.restarts.entry(key.clone()).or_insert((0, now));
                }
                // An instance that is down while its container is declared stopped is the
                // operator's stop (also when the engine that stopped it was another run of the
                // controller): once no longer declared stopped, it is started again.
                if let Some(d) = self.deployments.get_mut(name) {
                    match view.current {
                        Some(Current::Exited { .. }) if c.stopped => {
                            d.stopped.insert(key.clone());
                        }
                        // Running, or made anew (its spec changed meanwhile): no stop of the
                        // engine's is left to undo.
                        Some(Current::Creating | Current::Starting | Current::Ready)
                            if !c.stopped =>
                        {
                            d.stopped.remove(&key);
                        }
                        _ => {}
                    }
                }
                let stopped_here = self
                    .deployments
                    .get(name)
                    .is_some_and(|d| d.stopped.contains(&key));
                let cx = SlotContext {
                    deps_waiting: deps_waiting.clone(),
                    deps_down: deps_down.clone(),
                    surge: spec.strategy == poolkeeper_kinds::UpdateStrategy::RollingUpdate
                        && c.ports.is_empty(),
                    restarts,
                    since_exit: std::time::Duration::from_millis(now.saturating_sub(exited_at)),
                    stopped_here,
                };
                match plan_slot(c, &view, &cx) {
                    Step::Create => {
                        if let Some(wait) = self
                            .deployments
                            .get(name)
                            .and_then(|d| d.create_backoff.get(&(c.name.clone(), r)))
                            .filter(|b| b.until > now && b.hash == hash)
                        {
                            self.wakeups.push(Reverse(wait.until));
                            continue;
                        }
                        // The slot's name, unless an older instance still holds it.
                        let instance = match self.instances.get(&key) {
                            Some(other) if !of_deployment(other, name) => {
                                taken.push(taken_message(c, &key, other));
                                continue;
                            }
                            Some(_) => format!("{key}-{}", hash.get(..6).unwrap_or(&hash)),
                            None => key.clone(),
                        };
                        if let Some(other) = self.instances.get(&instance) {
                            if !of_deployment(other, name) {
                                taken.push(taken_message(c, &instance, other));
                            }
                            continue;
                        }
                        if let Some(conflict) =
                            self.create_container(name, &spec, c, r, &instance, &hash)
                        {
                            conflicts.push(conflict);
                        }
                    }
                    Step::RemoveOld => {
                        for (old, _) in &now_slot.old {
                            self.remove_instance(old);
                        }
                    }
                    Step::Restart => {
                        if let Some((instance, _)) = now_slot.current.clone() {
                            if stopped_here {
                                self.start_container(name, &key, instance, now);
                            } else {
                                self.restart_container(name, &key, instance, "exited", now);
                            }
                        }
                    }
                    Step::Stop => {
                        if let Some((instance, _)) = now_slot.current.clone() {
                            self.stop_container(name, &key, instance, now);
                        }
                    }
                    Step::Backoff(wait) => {
                        self.wakeups.push(Reverse(now + wait.as_millis() as u64));
                    }
                    Step::WaitDeps(_) | Step::Keep => {}
                }
            }
        }
        for i in unwanted {
            self.remove_instance(&i);
        }
        // Follow the output of current instances whose container has log triggers.
        for ((cname, _), slot) in &slots {
            let Some(c) = by_name.get(cname.as_str()) else {
                continue;
            };
            if let Some((instance, cur)) = &slot.current
                && !c.log_triggers.is_empty()
                && !matches!(cur, Current::Creating)
                && !self.log_followers.contains_key(instance)
            {
                self.follow_logs(instance, c.log_triggers.clone());
            }
        }
        let total: u32 = spec.containers.iter().map(|c| c.replicas).sum();
        let ready_n = slots
            .values()
            .filter(|s| matches!(s.current, Some((_, Current::Ready))))
            .count() as u32;
        if let Some(d) = self.deployments.get_mut(name) {
            let ok = ready_n == total;
            status::set_condition(
                &mut d.conditions,
                "Available",
                ok,
                if ok { "AllReady" } else { "NotReady" },
                format!("{ready_n}/{total} containers ready"),
                now,
            );
            // Slots whose creation failed and waits: said until one is made, or the slot no
            // longer wants one (not declared, declared stopped, its spec changed, or it has an
            // instance, made by another way).
            d.create_backoff.retain(|(cname, r), b| {
                by_name.get(cname.as_str()).is_some_and(|c| {
                    *r < c.replicas
                        && !c.stopped
                        && b.hash == hash_of(cname)
                        && slots
                            .get(&(cname.clone(), *r))
                            .is_none_or(|s| s.current.is_none())
                })
            });
            let failing: Vec<&str> = d
                .create_backoff
                .values()
                .map(|b| b.error.as_str())
                .collect();
            if failing.is_empty() {
                status::remove_condition(&mut d.conditions, "CreateFailed");
            } else {
                status::set_condition(
                    &mut d.conditions,
                    "CreateFailed",
                    true,
                    "CreateFailed",
                    failing.join("; "),
                    now,
                );
            }
            if taken.is_empty() {
                d.conflict_retry_at = 0;
                status::remove_condition(&mut d.conditions, "NameConflict");
            } else {
                let msg = taken.join("; ");
                // Looked at again in a while (nothing tells when the other frees the name), by
                // one wakeup at a time.
                if d.conflict_retry_at <= now {
                    d.conflict_retry_at = now + 5_000;
                    self.wakeups.push(Reverse(d.conflict_retry_at));
                }
                if status::set_condition(
                    &mut d.conditions,
                    "NameConflict",
                    true,
                    "NameConflict",
                    &msg,
                    now,
                ) {
                    d.events.push(true, "NameConflict", msg, now);
                }
            }
            if conflicts.is_empty() {
                status::remove_condition(&mut d.conditions, "HostPortConflict");
            } else {
                let msg = conflicts.join("; ");
                if status::set_condition(
                    &mut d.conditions,
                    "HostPortConflict",
                    true,
                    "HostPortConflict",
                    &msg,
                    now,
                ) {
                    d.events.push(true, "HostPortConflict", msg, now);
                }
            }
        }
    }

    /// Restarts a deployment's container in place, counting the restart.
    fn restart_container(&mut self, dep: &str, key: &str, instance: String, why: &str, now: u64) {
        let restarts = self
            .deployments
            .get(dep)
            .and_then(|d| d.restarts.get(key).map(|r| r.0))
            .unwrap_or(0);
        if let Some(d) = self.deployments.get_mut(dep) {
            d.restarts.insert(key.to_owned(), (restarts + 1, now));
            d.events.push(
                false,
                "Restarting",
                format!("{instance} ({why}; restart {})", restarts + 1),
                now,
            );
        }
        self.spawn_restart(instance);
    }

    /// Stops a container declared `stopped` (once: the slot remembers it until it is started).
    fn stop_container(&mut self, dep: &str, key: &str, instance: String, now: u64) {
        let Some(d) = self.deployments.get_mut(dep) else {
            return;
        };
        if !d.stopped.insert(key.to_owned()) {
            return;
        }
        d.events.push(
            false,
            "Stopping",
            format!("{instance} (declared stopped)"),
            now,
        );
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = rt.stop(&instance).await;
            let _ = tx.send(Input::Done(Completion::Stopped {
                name: instance,
                result,
            }));
        });
    }

    /// Starts a container the engine stopped, now that it is no longer declared `stopped` (not
    /// counted as a restart).
    fn start_container(&mut self, dep: &str, key: &str, instance: String, now: u64) {
        if let Some(d) = self.deployments.get_mut(dep) {
            d.stopped.remove(key);
            d.restarts.remove(key);
            d.events.push(
                false,
                "Starting",
                format!("{instance} (no longer declared stopped)"),
                now,
            );
        }
        self.spawn_restart(instance);
    }

    /// Restarts (or starts) an instance in place, shown Starting meanwhile.
    fn spawn_restart(&mut self, instance: String) {
        if let Some(i) = self.instances.get_mut(&instance) {
            self.touched.insert(instance.clone());
            i.phase = InstancePhase::Starting;
        }
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = rt.restart(&instance).await;
            let _ = tx.send(Input::Done(Completion::Restarted {
                name: instance,
                result,
            }));
        });
    }

    /// Follows an instance's output and reports lines that match a trigger.
    fn follow_logs(&mut self, instance: &str, triggers: Vec<poolkeeper_kinds::LogTrigger>) {
        let mut lines = self.rt.follow_logs(instance);
        let tx = self.tx.clone();
        let name = instance.to_owned();
        let task = tokio::spawn(async move {
            while let Some(line) = lines.recv().await {
                for t in &triggers {
                    if line.contains(t.contains.as_str()) {
                        let _ = tx.send(Input::LogMatch {
                            instance: name.clone(),
                            trigger: t.name.clone(),
                            line: line.clone(),
                        });
                    }
                }
            }
        });
        self.log_followers
            .insert(instance.to_owned(), task.abort_handle());
    }

    /// A matching line: counted; the first of a burst fires the trigger's action.
    pub(super) fn on_log_match(&mut self, instance: &str, trigger: &str, line: String) {
        let now = self.clock.now_ms();
        let Some((dep, cname, replica)) = self
            .instances
            .get(instance)
            .filter(|r| r.phase != InstancePhase::Deleting)
            .and_then(|r| r.deployment.as_deref().cloned())
        else {
            return;
        };
        let Some(d) = self.deployments.get_mut(&dep) else {
            return;
        };
        let Some(c) = d
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == cname))
            .cloned()
        else {
            return;
        };
        let Some(t) = c.log_triggers.iter().find(|t| t.name == trigger) else {
            return;
        };
        let quiet_ms = u64::from(t.quiet_seconds.unwrap_or(5)) * 1000;
        let st = d
            .triggers
            .entry((cname.clone(), trigger.to_owned()))
            .or_default();
        let fires = burst_starts(st.last_match_ms, now, quiet_ms);
        st.matches += 1;
        st.last_match_ms = Some(now);
        st.last_line = Some(line.clone());
        if !fires {
            return;
        }
        st.fired += 1;
        st.last_fired_ms = Some(now);
        let message = format!("{cname}: trigger {trigger} matched: {line}");
        d.events.push(true, "LogTrigger", message.clone(), now);
        match t.action {
            poolkeeper_kinds::LogAction::Condition => {
                status::set_condition(
                    &mut d.conditions,
                    "LogTriggered",
                    true,
                    "PatternMatched",
                    message,
                    now,
                );
            }
            poolkeeper_kinds::LogAction::Restart => {
                let key = slot_name(&dep, &c, replica);
                let why = format!("log trigger {trigger}");
                self.restart_container(&dep, &key, instance.to_owned(), &why, now);
            }
        }
        self.dirty_deployments.insert(dep);
    }

    /// Starts one container of a deployment. Returns a conflict message when its fixed host
    /// ports are held by another instance.
    fn create_container(
        &mut self,
        dep: &str,
        spec: &poolkeeper_kinds::DeploymentSpec,
        c: &poolkeeper_kinds::ContainerSpec,
        replica: u32,
        slot: &str,
        hash: &str,
    ) -> Option<String> {
        let mut ports = Vec::new();
        for (key, host) in &c.ports {
            let Ok((cport, proto)) = parse_port_key(key) else {
                continue;
            };
            if let Some(owner) = self.ports.owner(*host)
                && owner != slot
            {
                return Some(format!(
                    "container {}: host port {host} is held by {owner}",
                    c.name
                ));
            }
            ports.push(PortBinding {
                name: key.clone(),
                container_port: cport,
                host_port: *host,
                protocol: proto,
            });
        }
        for p in &ports {
            let _ = self.ports.hold(p.host_port, slot);
        }
        let labels = std::sync::Arc::new(BTreeMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_DEPLOYMENT.to_owned(), dep.to_owned()),
            (LABEL_CONTAINER.to_owned(), c.name.clone()),
            (LABEL_REPLICA.to_owned(), replica.to_string()),
            (LABEL_HASH.to_owned(), hash.to_owned()),
        ]));
        let (cpu_millis, memory_bytes) = c.resources.clone().unwrap_or_default().limits();
        let ispec = InstanceSpec {
            name: slot.to_owned(),
            image: c.image.clone(),
            command: c.command.clone(),
            env: c.environment.clone(),
            ports: ports.clone(),
            container_ports: ports
                .iter()
                .map(|p| poolkeeper_kinds::ContainerPort {
                    name: p.name.clone(),
                    container_port: p.container_port,
                    protocol: p.protocol,
                })
                .collect(),
            exposure: None,
            pod_overrides: None,
            capabilities: None,
            labels,
            cpu_millis,
            memory_bytes,
            readiness: c.readiness.clone(),
            liveness: c.liveness.clone(),
            init: c.init,
            network: spec.network.clone(),
            volumes: c
                .volumes
                .iter()
                .map(|(source, mount)| {
                    let source = if is_host_path(source) {
                        source.clone()
                    } else {
                        volume_name(dep, source)
                    };
                    (source, mount.clone())
                })
                .collect(),
            pull_policy: poolkeeper_kinds::PullPolicy::IfNotPresent,
            files_dir: None,
        };
        let now = self.clock.now_ms();
        let mut rec = InstRec::new(
            slot.to_owned(),
            None,
            Some((dep.to_owned(), c.name.clone(), replica)),
            std::sync::Arc::from(hash),
            InstancePhase::Creating,
            now,
        );
        rec.ports = ports.iter().map(|p| p.host_port).collect();
        rec.create_in_flight = true;
        self.instances.insert(slot.to_owned(), Box::new(rec));
        self.spawn_create(slot.to_owned(), ispec);
        None
    }
}
