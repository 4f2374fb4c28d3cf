//! Pools: keeping each at its declared size, creations and removals of instances, their index.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use tracing::debug;

use poolkeeper_core::claims::{Verdict, match_claims};
use poolkeeper_core::pool::{InstancePhase, PoolTarget, plan_pool};
use poolkeeper_kinds::units::parse_duration;
use poolkeeper_kinds::validate::pool_max;
use poolkeeper_runtime::{
    InstanceSpec, LABEL_HASH, LABEL_MANAGED, LABEL_POOL, PortBinding, Runtime,
};

use crate::durable::Op;
use crate::handle::{Completion, Input};
use crate::{AfterCommit, Engine, InstRec, status};

/// Creations handed to the runtime at once; more wait in the engine's queue. Why 128: far more
/// than a daemon serves in parallel (Docker here tops out well below), few enough that a
/// pool of 100k does not hold 100k runtime calls (and their memory) at the same time.
const MAX_CREATES_IN_FLIGHT: usize = 128;

/// Held removals (see `retire`) go when no creation has answered for this long (a creation
/// that hangs does not hold them)...
const RETIRE_STALL_MS: u64 = 5_000;

/// ...and at the latest this long after the release.
const RETIRE_HOLD_MAX_MS: u64 = 60_000;

impl<R: Runtime> Engine<R> {
    /// See [`EngineHandle::reinitialise`]: the warm instances are retired like released
    /// ones, and the pool's next pass creates their replacements.
    pub(crate) fn reinitialise(&mut self, pool: &str) -> Option<usize> {
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

    /// Files every touched instance into its pool's index.
    pub(crate) fn reindex_touched(&mut self) {
        for name in std::mem::take(&mut self.touched) {
            self.reindex(&name);
        }
    }

    fn reindex(&mut self, name: &str) {
        let Some(rec) = self.instances.get(name) else {
            return;
        };
        let Some(pool) = rec.pool.clone() else { return };
        // Of the pool's template, and on host ports of its range (a range moved or narrowed
        // leaves instances outside it, which are replaced as a changed template's are).
        let current = self.pools.get(&pool).is_some_and(|p| {
            p.hash == rec.hash
                && p.spec
                    .as_ref()
                    .and_then(|s| s.host_ports)
                    .is_none_or(|r| rec.ports.iter().all(|port| r.contains(*port)))
        });
        let slot = poolkeeper_core::pool::classify(
            rec.phase,
            current,
            rec.held(),
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
    pub(crate) fn unindex_instance(&mut self, rec: &InstRec) {
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

    pub(crate) fn reconcile_pool(&mut self, name: &str, now: u64) {
        let Some(pool) = self.pools.get(name) else {
            return;
        };
        let spec = pool.spec.clone();
        let hash = pool.hash.clone();
        // 1. Bind waiting, admitted claims to warm instances (oldest ready first), in arrival
        //    order.
        let mut waiting: Vec<String> = Vec::new();
        if spec.is_some() {
            for (_, c) in self.queues.get(name).into_iter().flatten() {
                let Some(entry) = self.claims.get(c) else {
                    continue;
                };
                if entry.instance.is_some()
                    || entry.verdict != Verdict::Admit
                    || entry.files_error.is_some()
                {
                    continue;
                }
                waiting.push(c.clone());
            }
        }
        let warm: Vec<String> = self
            .pool_index
            .get(name)
            .map(|idx| {
                idx.warm
                    .iter()
                    .take(waiting.len())
                    .map(|(_, n)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        let matching = match_claims(waiting.iter().map(String::as_str), warm);
        let binds: Vec<(String, String)> = matching
            .binds
            .iter()
            .map(|(c, i)| ((*c).to_owned(), i.clone()))
            .collect();
        let still_waiting: Vec<String> = matching.waiting.iter().map(|s| (*s).to_owned()).collect();
        let default_ttl = pool_ttl(spec.as_ref());
        let ssh_pool = spec.as_ref().is_some_and(|s| s.template.ssh.is_some());
        // The runtime records each binding before the claim is reported Bound.
        let record = self.rt.keeps_bindings();
        for (claim, inst) in binds {
            let Some(c) = self.claims.get_mut(&claim) else {
                continue;
            };
            let expires = lease_expiry(&c.spec, default_ttl, now);
            let hit = !c.waited;
            c.queue_position = None;
            c.instance = Some(inst.clone());
            c.files_pending = !c.files.is_empty() || ssh_pool || record;
            if let Some(p) = self.pools.get_mut(name) {
                if hit {
                    p.hits += 1;
                    // An arrival (a miss was counted when it first waited).
                    p.scale.arrival(now);
                } else {
                    p.misses += 1;
                }
            }
            let at_ms = self.bind_stamp(now);
            self.ops.push(Op::Bind {
                claim: claim.clone(),
                instance: inst.clone(),
                at_ms,
                expires_at_ms: expires,
                hit,
            });
            if let Some(t) = expires {
                self.expiries.push(Reverse((t, claim.clone())));
                self.prune_expiries();
            }
            if let Some(r) = self.instances.get_mut(&inst) {
                r.claim = Some(claim.clone());
                self.touched.insert(inst.clone());
            }
            self.dequeue(&claim);
            self.after_commit.push(AfterCommit::Bound {
                claim,
                instance: inst,
            });
        }
        for (pos, claim) in still_waiting.iter().enumerate() {
            if let Some(c) = self.claims.get_mut(claim) {
                if !c.waited
                    && let Some(p) = self.pools.get_mut(name)
                {
                    p.scale.arrival(now);
                }
                c.waited = true;
                let p = Some(pos as u32 + 1);
                if c.queue_position != p {
                    c.queue_position = p;
                    self.to_report.insert(claim.clone());
                }
            }
        }
        self.reindex_touched();
        // 2. Create and remove instances.
        let (counts, mut remove) = match self.pool_index.get(name) {
            Some(idx) => (idx.counts(), Vec::new()),
            None => (Default::default(), Vec::new()),
        };
        let target = match &spec {
            Some(s) => PoolTarget {
                warm: self.warm_target(name, s, counts, now),
                max: pool_max(s),
                deleting: false,
                queued: still_waiting.len() as u32,
                // An autoscaled pool scales down by its ready instances only.
                keep_starting: s.autoscale.is_some(),
            },
            None => PoolTarget {
                warm: 0,
                max: 0,
                deleting: true,
                queued: 0,
                keep_starting: false,
            },
        };
        let plan = plan_pool(target, counts);
        if plan.surplus_starting + plan.surplus_warm > 0 {
            debug!(pool = name, ?target, ?counts, ?plan, "pool over its target");
        }
        if let Some(idx) = self.pool_index.get(name) {
            if plan.drain {
                remove.extend(idx.warm.iter().map(|(_, n)| n.clone()));
                remove.extend(idx.starting.iter().cloned());
            }
            if plan.remove_doomed {
                remove.extend(idx.doomed.iter().cloned());
            }
            remove.extend(
                idx.starting
                    .iter()
                    .take(plan.surplus_starting as usize)
                    .cloned(),
            );
            remove.extend(
                idx.warm
                    .iter()
                    .rev()
                    .take(plan.surplus_warm as usize)
                    .map(|(_, n)| n.clone()),
            );
            if plan.drain {
                // Quarantined instances of a deleted pool go too: nothing is leaked.
                remove.extend(
                    idx.members
                        .iter()
                        .filter(|m| {
                            self.instances
                                .get(*m)
                                .is_some_and(|r| r.quarantined.is_some() && r.claim.is_none())
                        })
                        .cloned(),
                );
            }
        }
        for inst in &remove {
            debug!(pool = name, instance = %inst, "removing instance");
            self.remove_instance(inst);
        }
        let in_backoff = self
            .pools
            .get(name)
            .is_some_and(|p| p.create_backoff_until > now);
        let mut exhausted = false;
        if let Some(s) = &spec
            && !in_backoff
        {
            for _ in 0..plan.create {
                if !self.create_pool_instance(name, s, &hash) {
                    exhausted = true;
                    break;
                }
            }
        }
        if exhausted {
            // Held removals free host ports.
            self.release_held = true;
        }
        if let Some(p) = self.pools.get_mut(name) {
            if exhausted && !p.ports_exhausted {
                p.events.push(
                    true,
                    "HostPortsExhausted",
                    "no free host port left in hostPorts".into(),
                    now,
                );
            }
            p.ports_exhausted = exhausted;
        }
        self.reindex_touched();
        let warm_now = self
            .pool_index
            .get(name)
            .map(|i| i.counts().warm)
            .unwrap_or(0);
        if let Some(p) = self.pools.get_mut(name) {
            p.scale.idle(now, warm_now);
        }
        self.update_pool_conditions(name, now);
        // 3. A drained pool with nothing left is gone.
        let empty = self
            .pool_index
            .get(name)
            .is_none_or(|i| i.members.is_empty());
        if spec.is_none() && empty {
            self.pools.remove(name);
            self.pool_index.remove(name);
        }
    }

    /// Keeps the pool's conditions current from its index (cheap: no walk over instances).
    fn update_pool_conditions(&mut self, name: &str, now: u64) {
        let counts = self
            .pool_index
            .get(name)
            .map(|i| i.counts())
            .unwrap_or_default();
        let foreign = self
            .pools
            .get(name)
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.host_ports)
            .map(|r| self.ports.foreign_in(r))
            .unwrap_or_default();
        let Some(p) = self.pools.get_mut(name) else {
            return;
        };
        let c = &mut p.conditions;
        match &p.spec {
            Some(_) => {
                let want = p.scale.desired;
                let ok = counts.warm >= want;
                let msg = format!(
                    "{}/{want} warm, {} starting, {} in use",
                    counts.warm, counts.starting, counts.occupied
                );
                let reason = if ok { "Warm" } else { "Filling" };
                status::set_condition(c, "Ready", ok, reason, msg, now);
            }
            None => {
                let msg = format!("{} instance(s) left", counts.live());
                status::set_condition(c, "Ready", false, "Draining", msg, now);
            }
        }
        match &p.create_error {
            Some((reason, msg)) => {
                status::set_condition(c, "InstancesCreatable", false, reason, msg, now);
            }
            None => {
                status::set_condition(c, "InstancesCreatable", true, "Created", "", now);
            }
        }
        if p.ports_exhausted {
            let msg = "no free host port left in hostPorts";
            status::set_condition(c, "HostPortsAvailable", false, "Exhausted", msg, now);
        } else {
            status::remove_condition(c, "HostPortsAvailable");
        }
        if foreign.is_empty() {
            status::remove_condition(c, "HostPortsSkipped");
        } else {
            let list: Vec<String> = foreign.iter().map(u16::to_string).collect();
            let msg = format!(
                "skipped host ports in use by another process: {}",
                list.join(", ")
            );
            status::set_condition(c, "HostPortsSkipped", true, "InUseByOtherProcess", msg, now);
        }
    }

    pub(crate) fn remove_instance(&mut self, name: &str) {
        let Some(rec) = self.instances.get_mut(name) else {
            return;
        };
        if rec.phase == InstancePhase::Deleting {
            return;
        }
        rec.phase = InstancePhase::Deleting;
        // A creation or a reset in flight ends first (see `InstRec::resetting`); its end
        // removes it.
        let wait = rec.create_in_flight || rec.resetting;
        self.touched.insert(name.to_owned());
        if !wait {
            self.spawn_remove(name);
        }
    }

    /// `name`'s reset ended, or will not run: a removal that waited for it goes now.
    pub(crate) fn reset_ended(&mut self, name: &str) {
        let Some(rec) = self.instances.get_mut(name) else {
            return;
        };
        let was = std::mem::replace(&mut rec.resetting, false);
        self.touched.insert(name.to_owned());
        if was && rec.phase == InstancePhase::Deleting && !rec.create_in_flight {
            self.spawn_remove(name);
        }
    }

    /// Retires a released instance that its pool recreates. It leaves the pool at once
    /// (`Deleting`), so that its replacement is created now; its removal waits until no
    /// creation is in flight, or creations stall (none answered for `RETIRE_STALL_MS`), or a
    /// pool runs out of host ports, and at most `RETIRE_HOLD_MAX_MS`. A Docker daemon creates
    /// and starts containers far faster without removals competing for it, so a pool refills
    /// sooner. Meanwhile the instance is never bound, and the store marks it used: a restarted
    /// controller resets it before any reuse.
    pub(super) fn retire(&mut self, name: &str) {
        let Some(rec) = self.instances.get_mut(name) else {
            return;
        };
        if rec.phase == InstancePhase::Deleting || rec.create_in_flight {
            self.remove_instance(name);
            return;
        }
        rec.phase = InstancePhase::Deleting;
        self.touched.insert(name.to_owned());
        let now = self.clock.now_ms();
        self.held_removals.push((now, self.passes, name.to_owned()));
        self.wakeups.push(Reverse(now + RETIRE_STALL_MS));
        // Retired after this pass's decisions: the next pass creates the replacement.
        if !self.nudged {
            self.nudged = true;
            let _ = self.tx.send(Input::Tick);
        }
    }

    /// At the end of a pass: starts the held removals that may go (see `retire`). One retired
    /// in this very pass waits for the next, which starts its replacement's creation.
    pub(crate) fn release_held_removals(&mut self, now: u64) {
        if self.held_removals.is_empty() {
            return;
        }
        let idle = self.creates_in_flight == 0 && self.create_queue.is_empty();
        let force = std::mem::take(&mut self.release_held);
        let pass = self.passes;
        let answered = self.last_create_answer_ms;
        let (go, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held_removals)
            .into_iter()
            .partition(|(retired, at, _)| {
                force
                    || (idle && *at < pass)
                    || now >= (*retired).max(answered) + RETIRE_STALL_MS
                    || now >= retired + RETIRE_HOLD_MAX_MS
            });
        self.held_removals = keep;
        if !self.held_removals.is_empty() {
            // Looked at again when creations would count as stalled.
            self.wakeups
                .push(Reverse(now.max(answered) + RETIRE_STALL_MS));
        }
        if !go.is_empty() {
            debug!(
                removals = go.len(),
                still_held = self.held_removals.len(),
                idle,
                force,
                "held removals released"
            );
        }
        for (_, _, name) in go {
            if self
                .instances
                .get(&name)
                .is_some_and(|r| r.phase == InstancePhase::Deleting)
            {
                self.spawn_remove(&name);
            }
        }
    }

    /// Retries the removals whose backoff has passed (of instances still being deleted).
    pub(super) fn retry_removals(&mut self, now: u64) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.removal_retries)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.removal_retries = later;
        for (_, name) in due {
            if self
                .instances
                .get(&name)
                .is_some_and(|r| r.phase == InstancePhase::Deleting)
            {
                self.spawn_remove(&name);
            }
        }
    }

    pub(crate) fn spawn_remove(&self, name: &str) {
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let result = rt.remove(&name).await;
            let _ = tx.send(Input::Done(Completion::Removed { name, result }));
        });
    }

    /// Starts one creation. Returns false when no host port is free.
    fn create_pool_instance(
        &mut self,
        pool: &str,
        spec: &poolkeeper_kinds::PoolSpec,
        hash: &std::sync::Arc<str>,
    ) -> bool {
        let name = self.new_instance_name(pool);
        let t = &spec.template;
        let mut ports = Vec::new();
        if let Some(range) = spec.host_ports {
            let Some(host) = self.ports.allocate(range, t.ports.len(), &name) else {
                return false;
            };
            ports = t
                .ports
                .iter()
                .zip(host)
                .map(|(p, h)| PortBinding {
                    name: p.name.clone(),
                    container_port: p.container_port,
                    host_port: h,
                    protocol: p.protocol,
                })
                .collect();
        }
        let labels = match self.pools.get(pool).and_then(|p| p.labels.clone()) {
            Some(l) if l.get(LABEL_HASH).map(String::as_str) == Some(&**hash) => l,
            _ => {
                let l: poolkeeper_runtime::Labels = std::sync::Arc::new(BTreeMap::from([
                    (LABEL_MANAGED.to_owned(), "true".to_owned()),
                    (LABEL_POOL.to_owned(), pool.to_owned()),
                    (LABEL_HASH.to_owned(), hash.to_string()),
                ]));
                if let Some(p) = self.pools.get_mut(pool) {
                    p.labels = Some(l.clone());
                }
                l
            }
        };
        let (cpu_millis, memory_bytes) = t.resources.clone().unwrap_or_default().limits();
        let ispec = InstanceSpec {
            name: name.clone(),
            image: t.image.clone(),
            command: t.command.clone(),
            env: t.env.clone(),
            ports: ports.clone(),
            container_ports: t.ports.clone(),
            exposure: spec.exposure,
            pod_overrides: t.pod_overrides.clone(),
            capabilities: t.capabilities.clone(),
            labels,
            cpu_millis,
            memory_bytes,
            readiness: t.readiness.clone(),
            liveness: None,
            init: false,
            network: None,
            volumes: BTreeMap::new(),
            pull_policy: spec.pull_policy,
            files_dir: t.files.as_ref().map(|f| f.mount_path.clone()),
        };
        let now = self.clock.now_ms();
        let mut rec = InstRec::new(
            name.clone(),
            Some(pool.to_owned()),
            None,
            hash.clone(),
            InstancePhase::Creating,
            now,
        );
        rec.ports = ports.iter().map(|p| p.host_port).collect();
        rec.create_in_flight = true;
        rec.created_ms = Some(now);
        self.instances.insert(name.clone(), Box::new(rec));
        self.touched.insert(name.clone());
        self.spawn_create(name, ispec);
        true
    }

    pub(crate) fn spawn_create(&mut self, name: String, spec: InstanceSpec) {
        // Created again (a deployment's slot keeps its name): reports of it are news again.
        self.recently_gone.remove(&name);
        if self.creates_in_flight >= MAX_CREATES_IN_FLIGHT {
            // Boxed: a queue of 100k holds pointers, and its spare capacity costs little.
            self.create_queue.push_back((name, Box::new(spec)));
            return;
        }
        self.dispatch_create(name, spec);
    }

    /// A creation answered: the next queued one goes. One removed while it waited (its pool
    /// deleted or shrunk) is dropped: nothing to create, nothing to remove.
    pub(crate) fn create_answered(&mut self) {
        self.creates_in_flight = self.creates_in_flight.saturating_sub(1);
        self.last_create_answer_ms = self.clock.now_ms();
        while self.creates_in_flight < MAX_CREATES_IN_FLIGHT
            && let Some((name, spec)) = self.create_queue.pop_front()
        {
            if self
                .instances
                .get(&name)
                .is_some_and(|r| r.phase == InstancePhase::Deleting)
            {
                debug!(instance = %name, "removed before its creation was handed over");
                self.forget_instance(&name);
                continue;
            }
            self.dispatch_create(name, *spec);
        }
    }

    fn dispatch_create(&mut self, name: String, spec: InstanceSpec) {
        self.creates_in_flight += 1;
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = rt.create(spec).await;
            let _ = tx.send(Input::Done(Completion::Created { name, result }));
        });
    }
}

/// A pool's default lease (`claimTTL`).
pub(crate) fn pool_ttl(spec: Option<&poolkeeper_kinds::PoolSpec>) -> Option<std::time::Duration> {
    spec.and_then(|s| s.claim_ttl.as_deref())
        .and_then(|t| parse_duration(t).ok())
}

/// When a claim bound at `now` expires: its own `ttl`, else its pool's `claimTTL`. The pool's
/// is also the longest lease: a claim may ask for less, not for more.
pub(crate) fn lease_expiry(
    claim: &poolkeeper_kinds::ClaimSpec,
    pool_ttl: Option<std::time::Duration>,
    now: u64,
) -> Option<u64> {
    let own = claim.ttl.as_deref().and_then(|t| parse_duration(t).ok());
    let lease = match (own, pool_ttl) {
        (Some(c), Some(p)) => Some(c.min(p)),
        (c, p) => c.or(p),
    };
    lease.map(|d| now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}
