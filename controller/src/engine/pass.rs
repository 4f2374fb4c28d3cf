//! Observed state (runtime events, completions, lists) and the reconcile pass.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use tracing::{debug, error, info, warn};

use poolkeeper_store::Flush;

use super::durable::{Op, RecPhase, needs_flush};
use super::status::{self, InstanceView, ObjectView, Snapshot};
use super::{AfterCommit, ClaimEntry, Completion, Engine, Input, InstRec};
use crate::api::{
    ClaimPhase, ClaimStatus, ContainerStatus, DeploymentStatus, Endpoint, PoolStatus, ResetPolicy,
    UserStatus,
};
use crate::core::claims::{ClaimFacts, UserFacts, Verdict, admit, match_claims};
use crate::core::deployment::{
    Current, Old, Slot, SlotContext, Step, burst_starts, is_host_path, plan_slot, start_order,
    stoppable, volume_name,
};
use crate::core::pool::{InstancePhase, PoolTarget, plan_pool};
use crate::model::Kind;
use crate::runtime::{
    Instance, InstanceSpec, InstanceState, LABEL_CONTAINER, LABEL_DEPLOYMENT, LABEL_HASH,
    LABEL_MANAGED, LABEL_POOL, LABEL_REPLICA, PortBinding, Runtime, RuntimeError, RuntimeEvent,
};
use crate::units::{parse_cpu_millis, parse_duration, parse_memory_bytes};
use crate::validate::{parse_port_key, pool_max};

/// Memory may be ahead of disk: stop rather than report what is not durable.
fn store_failed(e: &poolkeeper_store::StoreError) -> ! {
    error!(error = %e, "state store failed; stopping so that a restart recovers from disk");
    std::process::exit(70);
}

fn phase_of(i: &Instance) -> InstancePhase {
    match i.state {
        InstanceState::Exited { .. } => InstancePhase::Dead,
        InstanceState::Running if i.ready => InstancePhase::Ready,
        InstanceState::Running => InstancePhase::Starting,
    }
}

fn exit_code(i: &Instance) -> Option<i64> {
    match i.state {
        InstanceState::Exited { code } => code,
        InstanceState::Running => None,
    }
}

/// Why 60 s: long enough that a pool with a broken image does not hammer the runtime, short
/// enough that a fixed image is picked up within a minute.
const CREATE_BACKOFF_MAX_MS: u64 = 60_000;

/// How long an instance reported gone stays gone against lists (see `recently_gone`): longer
/// than any list takes.
const FORGOTTEN_KEPT_MS: u64 = 120_000;

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
    // -----------------------------------------------------------------------------------------
    // Observed state

    pub(super) fn on_runtime(&mut self, ev: RuntimeEvent) {
        match ev {
            // Applied even for a name reported gone: a creation that the engine had given up
            // on may still have happened, and an event is never older than the removal (the
            // runtime untracks a container before reporting it removed).
            RuntimeEvent::Changed(i) => self.observe(i),
            // A creation that fails is cleaned up, and reported removed, before its result
            // arrives: that result (a port in use, say) decides, not the removal.
            RuntimeEvent::Removed(name)
                if self
                    .instances
                    .get(&name)
                    .is_some_and(|r| r.create_in_flight) =>
            {
                debug!(instance = %name, "removed while its creation is in flight");
            }
            RuntimeEvent::Removed(name) => self.forget_instance(&name),
            RuntimeEvent::Relist => {
                debug!("the runtime asks for a relist");
                self.spawn_list();
            }
        }
    }

    /// A list of the runtime, begun in list epoch `epoch`. An instance missing from it is gone
    /// unless it was reported since the list began: a creation that returned meanwhile is not
    /// in a list taken before it.
    pub(super) fn on_listed(&mut self, epoch: u32, r: Result<Vec<Instance>, RuntimeError>) {
        self.reload_token_files();
        let list = match r {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "listing the runtime failed; will retry at the next resync");
                return;
            }
        };
        let seen: std::collections::HashSet<&str> = list.iter().map(|i| i.name.as_str()).collect();
        let gone: Vec<String> = self
            .instances
            .values()
            .filter(|r| {
                // A creation still in flight may land after the list was taken, whatever the
                // record's phase (a removal asked for meanwhile makes it Deleting): its reply
                // decides, not the list.
                !r.create_in_flight
                    && r.phase != InstancePhase::Creating
                    && r.seen_epoch < epoch
                    && !seen.contains(r.name.as_str())
            })
            .map(|r| r.name.clone())
            .collect();
        for name in gone {
            self.forget_instance(&name);
        }
        let now = self.clock.now_ms();
        self.recently_gone
            .retain(|_, at| now.saturating_sub(*at) < FORGOTTEN_KEPT_MS);
        for i in list {
            if !self.reported_gone(&i.name) {
                self.observe(i);
            }
        }
        if !self.listed {
            self.listed = true;
            info!(instances = self.instances.len(), "runtime listed");
        }
    }

    /// `name` was reported gone and not created again since: a list that shows it began before
    /// the removal.
    fn reported_gone(&self, name: &str) -> bool {
        !self.instances.contains_key(name) && self.recently_gone.contains_key(name)
    }

    fn observe(&mut self, i: Instance) {
        if i.label(LABEL_MANAGED) != Some("true") {
            return;
        }
        let now = self.clock.now_ms();
        let phase = phase_of(&i);
        let code = exit_code(&i);
        let name = i.name.clone();
        let ports: Vec<u16> = i.ports.iter().map(|p| p.host_port).collect();
        let pool = i.label(LABEL_POOL).map(str::to_owned);
        let deployment = match (i.label(LABEL_DEPLOYMENT), i.label(LABEL_CONTAINER)) {
            (Some(d), Some(c)) => Some((
                d.to_owned(),
                c.to_owned(),
                i.label(LABEL_REPLICA)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
            )),
            _ => None,
        };
        let first_sighting = !self.instances.contains_key(&name);
        let rec = self.instances.entry(name.clone()).or_insert_with(|| {
            debug!(instance = %name, state = ?i.state, ready = i.ready, revision = i.revision,
                "tracking an instance the runtime reported");
            let hash = i.label(LABEL_HASH).unwrap_or_default().to_owned();
            Box::new(InstRec::new(
                name.clone(),
                pool.clone(),
                deployment.clone(),
                hash,
                phase,
                now,
            ))
        });
        rec.seen_epoch = self.list_epoch;
        if i.revision != 0 {
            if i.revision < rec.revision {
                // Overtaken by a newer report (a list result computed before an event).
                return;
            }
            rec.revision = i.revision;
        }
        let was = rec.phase;
        if rec.phase != InstancePhase::Deleting {
            rec.phase = phase;
        }
        if phase == InstancePhase::Ready && was != InstancePhase::Ready {
            rec.ready_since = now;
        }
        rec.exit_code = code;
        if rec.node != i.node {
            rec.node = i.node.clone();
        }
        if rec.bindings != i.ports {
            rec.bindings = i.ports;
        }
        if rec.ports != ports {
            let old = std::mem::take(&mut rec.ports);
            self.ports.release(old, &name);
            for p in &ports {
                if let Err(owner) = self.ports.hold(*p, &name) {
                    if self
                        .instances
                        .get(&owner)
                        .is_some_and(|r| r.phase == InstancePhase::Creating)
                    {
                        // We handed the port to a creation while an instance we did not know yet
                        // (created by a controller that died first) had it: the runtime will
                        // refuse that creation; the port belongs to the instance that has it.
                        self.ports.release([*p], &owner);
                        let _ = self.ports.hold(*p, &name);
                    } else {
                        error!(instance = %name, port = p, %owner, "host port reported for two instances");
                    }
                }
            }
            if let Some(rec) = self.instances.get_mut(&name) {
                rec.ports = ports;
            }
        }
        // Adopt: bindings and quarantines come from the store. A binding is adopted only while
        // the claim agrees (or is not known yet, before the first pass): the store lags memory
        // within a pass, so a binding ended earlier in this batch (claim deleted, instance lost)
        // must not come back from a stale record when the same instance is observed again.
        let st = self.store.state();
        let bound = st
            .bound
            .get(&name)
            .cloned()
            .filter(|c| match self.claims.get(c) {
                Some(e) => e.instance.as_deref() == Some(name.as_str()),
                None => !self.started,
            });
        let quarantined = st.quarantined.get(&name).cloned();
        let used = first_sighting && st.used.contains(&name);
        let mut reset = false;
        if let Some(rec) = self.instances.get_mut(&name) {
            rec.used |= used;
            if rec.claim.is_none() && bound.is_some() {
                rec.claim = bound;
            }
            if quarantined.is_some() {
                rec.quarantined = quarantined;
            }
            reset = used && rec.claim.is_none() && rec.quarantined.is_none();
        }
        // Released before a crash (or a stop) and not reset since: reset before any reuse.
        if reset {
            debug!(instance = %name, "released and not reset before a restart; resetting it");
            self.reset_released(&name);
        }
        self.touched.insert(name.clone());
        // Found after startup for something undeclared (a creation a previous controller had in
        // flight, finishing late): drained like the orphans startup finds.
        if let Some(p) = pool {
            if self.started {
                self.ensure_draining_pool(&p, now);
            }
            self.dirty_pools.insert(p);
        }
        if let Some((d, _, _)) = deployment {
            if self.started {
                self.ensure_draining_deployment(&d, now);
            }
            self.dirty_deployments.insert(d);
        }
        // A bound instance that exited is lost to its claim.
        if phase == InstancePhase::Dead
            && was != InstancePhase::Dead
            && let Some(claim) = self.instances.get(&name).and_then(|r| r.claim.clone())
        {
            self.instance_lost(&claim, &name, "exited", now);
        }
    }

    fn forget_instance(&mut self, name: &str) {
        let Some(rec) = self.instances.remove(name) else {
            return;
        };
        let now = self.clock.now_ms();
        self.recently_gone.insert(name.to_owned(), now);
        if let Some(f) = self.log_followers.remove(name) {
            f.abort();
        }
        self.ports.release(rec.ports.iter().copied(), name);
        self.unindex_instance(&rec);
        if let Some((d, _, _)) = &rec.deployment {
            self.dirty_deployments.insert(d.clone());
        }
        if rec.quarantined.is_some() {
            self.ops.push(Op::Unquarantine {
                instance: name.to_owned(),
            });
        }
        let held = rec.claim.is_some();
        if let Some(claim) = rec.claim {
            self.instance_lost(&claim, name, "removed", now);
        }
        // After the unbinding above (which marks it used): gone, nothing of it is left.
        if held || rec.used {
            self.ops.push(Op::Fresh {
                instance: name.to_owned(),
            });
        }
    }

    /// The instance a claim holds is gone or dead. Policy: the claim goes back to the head of its
    /// pool's queue (its arrival order is kept), is told why, and is bound to a fresh instance,
    /// which gets its files again. The dead instance is removed by the pool.
    fn instance_lost(&mut self, claim: &str, instance: &str, how: &str, now: u64) {
        warn!(
            claim,
            instance, how, "bound instance lost; the claim will be bound again"
        );
        if let Some(rec) = self.instances.get_mut(instance) {
            rec.claim = None;
            rec.used = true;
            self.touched.insert(instance.to_owned());
        }
        let holds = self
            .claims
            .get(claim)
            .is_some_and(|c| c.instance.as_deref() == Some(instance));
        if !holds {
            return;
        }
        self.ops.push(Op::Unbind {
            claim: claim.to_owned(),
            to: RecPhase::Waiting,
        });
        self.after_commit
            .retain(|a| !matches!(a, AfterCommit::Bound { claim: c, .. } if c == claim));
        if let Some(c) = self.claims.get_mut(claim) {
            c.instance = None;
            let msg = format!("instance {instance} {how}; binding a fresh instance");
            c.lost = Some((msg.clone(), now));
            c.events.push(true, "InstanceLost", msg, now);
            c.files_pending = false;
            let u = c.spec.user.clone();
            self.dirty_users.insert(u);
        }
        self.enqueue(claim);
        self.to_report.insert(claim.to_owned());
    }

    fn on_created(&mut self, name: String, result: Result<Instance, RuntimeError>, now: u64) {
        match result {
            Ok(i) => {
                if let Some(p) = i.label(LABEL_POOL).and_then(|p| self.pools.get_mut(p)) {
                    p.create_failures = 0;
                    p.create_error = None;
                }
                // The runtime's event stream is ordered per instance; this reply travels
                // another path and may be older than events already seen. It is news only
                // while the record is still the placeholder of this creation.
                let Some(rec) = self.instances.get_mut(&name) else {
                    // Untracked while its creation was in flight: the instance exists all the
                    // same. Tracked again, it is drained or kept as its pool decides, never
                    // leaked.
                    warn!(instance = %name, "a creation answered for an untracked instance; adopting it");
                    self.observe(i);
                    return;
                };
                rec.create_in_flight = false;
                match rec.phase {
                    InstancePhase::Creating => self.observe(i),
                    // Removal was asked for while we were creating: do it now.
                    InstancePhase::Deleting => self.spawn_remove(&name),
                    _ => {}
                }
            }
            Err(e) => {
                self.count_error(&name);
                self.create_failed(&name, e, now)
            }
        }
    }

    /// A runtime action on `instance` failed: counted for its kind.
    fn count_error(&mut self, instance: &str) {
        let deployment = self
            .instances
            .get(instance)
            .is_some_and(|r| r.deployment.is_some());
        if deployment {
            self.metrics.deployment.errors += 1;
        } else {
            self.metrics.pool.errors += 1;
        }
    }

    pub(super) fn on_done(&mut self, c: Completion) {
        let now = self.clock.now_ms();
        match c {
            Completion::Created { name, result } => {
                self.create_answered();
                self.on_created(name, result, now);
            }
            Completion::Removed { name, result } => match result {
                // Forgotten when the runtime's event stream (or a relist) says it is gone: a
                // `Changed` event still in that stream must not re-adopt a forgotten instance.
                Ok(()) => {}
                Err(e) => {
                    self.count_error(&name);
                    warn!(instance = %name, error = %e, "removal failed; will retry in 1 s");
                    if self.instances.contains_key(&name) {
                        self.removal_retries.push((now + 1_000, name));
                        self.wakeups.push(Reverse(now + 1_000));
                    }
                }
            },
            Completion::Reset { name, result } => {
                let Some(rec) = self.instances.get_mut(&name) else {
                    return;
                };
                self.touched.insert(name.clone());
                rec.resetting = false;
                let pool = rec.pool.clone();
                match result {
                    Ok(()) => {
                        debug!(instance = %name, "reset done");
                        rec.used = false;
                        self.ops.push(Op::Fresh {
                            instance: name.clone(),
                        });
                    }
                    Err(reason) => {
                        warn!(instance = %name, %reason, "reset failed; quarantining the instance");
                        rec.quarantined = Some(reason.clone());
                        self.ops.push(Op::Quarantine {
                            instance: name.clone(),
                            reason: reason.clone(),
                        });
                        if let Some(p) = pool.as_ref().and_then(|p| self.pools.get_mut(p)) {
                            let msg = format!("instance {name}: {reason}");
                            status::set_condition(
                                &mut p.conditions,
                                "Quarantined",
                                true,
                                "ResetFailed",
                                &msg,
                                now,
                            );
                            p.events.push(true, "Quarantined", msg, now);
                        }
                    }
                }
                if let Some(p) = pool {
                    self.dirty_pools.insert(p);
                }
            }
            Completion::Files {
                claim,
                instance,
                result,
            } => {
                let still_bound = self
                    .instances
                    .get(&instance)
                    .is_some_and(|r| r.claim.as_deref() == Some(claim.as_str()));
                if !still_bound {
                    return;
                }
                match result {
                    Ok(()) => {
                        if let Some(c) = self.claims.get_mut(&claim) {
                            c.files_pending = false;
                            c.copy_failures = 0;
                            c.events.push(
                                false,
                                "FilesCopied",
                                format!("{} file(s) copied into {instance}", c.files.len()),
                                now,
                            );
                        }
                        self.report_claim(&claim, now);
                    }
                    Err(e) => {
                        // The instance could not take the files: take it out and bind another.
                        let msg = format!("copying files into {instance} failed: {e}");
                        let outage =
                            matches!(e, RuntimeError::Unavailable(_) | RuntimeError::NotFound(_));
                        let mut give_up = false;
                        if let Some(c) = self.claims.get_mut(&claim) {
                            c.events.push(true, "FilesFailed", msg.clone(), now);
                            if !outage {
                                c.copy_failures += 1;
                                // Twice in a row on different instances: the files, not the
                                // instances, are the likelier cause. The claim fails rather
                                // than quarantine the whole pool one instance at a time.
                                if c.copy_failures >= 2 {
                                    c.files_error = Some(format!(
                                        "the files could not be copied into {} instances (last: \
                                         {e}); change the claim to try again",
                                        c.copy_failures
                                    ));
                                    give_up = true;
                                }
                            }
                        }
                        self.end_binding(&claim, &instance, RecPhase::Waiting, "FilesFailed", now);
                        self.after_commit.retain(
                            |a| !matches!(a, AfterCommit::Reset { instance: i } if *i == instance),
                        );
                        if let Some(rec) = self.instances.get_mut(&instance) {
                            rec.resetting = false;
                        }
                        if outage || give_up {
                            // Nothing is known against the instance (the runtime was unreachable,
                            // or the instance is gone, or the claim's files are at fault), and it
                            // may hold part of the files: it is replaced, not reset.
                            self.remove_instance(&instance);
                            if give_up {
                                self.report_claim(&claim, now);
                            }
                            return;
                        }
                        if let Some(rec) = self.instances.get_mut(&instance) {
                            self.touched.insert(instance.clone());
                            rec.quarantined = Some(msg.clone());
                        }
                        self.ops.push(Op::Quarantine {
                            instance: instance.clone(),
                            reason: msg,
                        });
                    }
                }
            }
            Completion::Restarted { name, result } => {
                if let Err(e) = result {
                    warn!(instance = %name, error = %e, "restart failed");
                    if let Some((d, _, _)) =
                        self.instances.get(&name).and_then(|r| r.deployment.clone())
                        && let Some(dep) = self.deployments.get_mut(&d)
                    {
                        dep.events
                            .push(true, "RestartFailed", format!("{name}: {e}"), now);
                    }
                }
            }
            Completion::Network { deployment, result } => {
                if let Some(d) = self.deployments.get_mut(&deployment) {
                    d.network_pending = false;
                    match result {
                        Ok(()) => {
                            d.network_ready = d.spec.as_ref().and_then(|s| s.network.clone());
                        }
                        Err(e) => {
                            d.events.push(true, "NetworkFailed", e.to_string(), now);
                            self.wakeups.push(Reverse(now + 5_000));
                        }
                    }
                    self.dirty_deployments.insert(deployment);
                }
            }
        }
    }

    fn create_failed(&mut self, name: &str, e: RuntimeError, now: u64) {
        let Some(rec) = self.instances.remove(name) else {
            return;
        };
        self.ports.release(rec.ports.iter().copied(), name);
        if let RuntimeError::PortInUse { port } = e {
            self.ports.mark_foreign(port);
        }
        self.unindex_instance(&rec);
        if let Some(p) = &rec.pool
            && let Some(entry) = self.pools.get_mut(p)
        {
            let (reason, retry_now) = match &e {
                RuntimeError::ImageMissing { .. } => ("ImageMissing", false),
                // Another port will be picked at once; no backoff needed.
                RuntimeError::PortInUse { .. } => ("HostPortInUse", true),
                _ => ("CreateFailed", false),
            };
            entry
                .events
                .push(true, reason, format!("creating {name}: {e}"), now);
            entry.create_error = Some((reason, e.to_string()));
            if !retry_now {
                entry.create_failures = entry.create_failures.saturating_add(1);
                let backoff = (500u64 << entry.create_failures.min(10)).min(CREATE_BACKOFF_MAX_MS);
                entry.create_backoff_until = now + backoff;
                self.wakeups.push(Reverse(now + backoff));
            }
        }
        if let Some((d, c, _)) = &rec.deployment {
            self.dirty_deployments.insert(d.clone());
            if let Some(dep) = self.deployments.get_mut(d) {
                dep.events
                    .push(true, "CreateFailed", format!("container {c}: {e}"), now);
                self.wakeups.push(Reverse(now + 5_000));
            }
        }
        warn!(instance = %name, error = %e, "create failed");
    }

    // -----------------------------------------------------------------------------------------
    // The pass

    pub(super) fn pass(&mut self) {
        if !(self.synced && self.listed) {
            return;
        }
        let now = self.clock.now_ms();
        if !self.started {
            self.started = true;
            self.startup(now);
        }
        self.expire(now);
        let began = std::time::Instant::now();
        let users = std::mem::take(&mut self.dirty_users);
        let n = users.len() as u64;
        for u in users {
            self.admit_user(&u);
        }
        observe(&mut self.metrics.user, n, began);
        self.reindex_touched();
        let began = std::time::Instant::now();
        let pools = std::mem::take(&mut self.dirty_pools);
        let n = pools.len() as u64;
        for p in pools {
            self.reconcile_pool(&p, now);
        }
        observe(&mut self.metrics.pool, n, began);
        let began = std::time::Instant::now();
        let deps = std::mem::take(&mut self.dirty_deployments);
        let n = deps.len() as u64;
        for d in deps {
            self.reconcile_deployment(&d, now);
        }
        observe(&mut self.metrics.deployment, n, began);
        self.commit(now);
        self.release_held_removals(now);
        self.passes += 1;
        self.metrics.passes += 1;
    }

    /// After a (re)start: drop records of claims deleted while we were down, notice bindings
    /// whose instance vanished, and start expiry timers.
    fn startup(&mut self, now: u64) {
        self.reindex_touched();
        let records: Vec<(String, Option<String>, RecPhase, Option<u64>)> = self
            .store
            .state()
            .claims
            .iter()
            .map(|(k, r)| (k.clone(), r.instance.clone(), r.phase, r.expires_at_ms))
            .collect();
        for (claim, instance, phase, expires) in records {
            // Deleted (and perhaps declared again) before this first pass: the deletion ended
            // the binding and forgets the record, but could reset the instance only if it was
            // listed by then. Reset it here otherwise (never hand it on unreset).
            if self.forgotten.contains(&claim) {
                if let Some(i) = &instance
                    && self.instances.get(i).is_some_and(|rec| {
                        !rec.resetting && rec.claim.as_deref().is_none_or(|c| c == claim)
                    })
                {
                    self.reset_released(i);
                }
                continue;
            }
            if !self.claims.contains_key(&claim) {
                if let Some(i) = &instance {
                    self.ops.push(Op::Unbind {
                        claim: claim.clone(),
                        to: RecPhase::Released,
                    });
                    self.reset_released(i);
                }
                self.ops.push(Op::Forget { claim });
                continue;
            }
            if phase == RecPhase::Bound {
                match &instance {
                    // It exited while we were down: observing it could not tell its claim (the
                    // instance was never seen alive), so it is lost now.
                    Some(i)
                        if self
                            .instances
                            .get(i)
                            .is_some_and(|r| r.phase == InstancePhase::Dead) =>
                    {
                        let i = i.clone();
                        self.instance_lost(&claim, &i, "exited while the controller was down", now);
                    }
                    Some(i) if self.instances.contains_key(i) => {
                        if let Some(t) = expires {
                            self.expiries.push(Reverse((t, claim.clone())));
                        }
                        // A crash may have come between the durable binding and the copy of
                        // the claim's files: copy them again (idempotent) before reporting.
                        let copy = self.needs_copy(&claim);
                        if let Some(c) = self.claims.get_mut(&claim) {
                            c.files_pending = copy;
                        }
                        self.after_commit.push(AfterCommit::Bound {
                            claim: claim.clone(),
                            instance: i.clone(),
                        });
                    }
                    Some(i) => {
                        let i = i.clone();
                        self.ops.push(Op::Unbind {
                            claim: claim.clone(),
                            to: RecPhase::Waiting,
                        });
                        if let Some(c) = self.claims.get_mut(&claim) {
                            c.instance = None;
                            let msg = format!(
                                "instance {i} disappeared while the controller was down; binding a fresh instance"
                            );
                            c.lost = Some((msg.clone(), now));
                            c.events.push(true, "InstanceLost", msg, now);
                        }
                        self.enqueue(&claim);
                        self.to_report.insert(claim.clone());
                    }
                    None => {}
                }
            } else if phase != RecPhase::Waiting {
                self.report_claim(&claim, now);
            }
        }
        // Quarantined or used instances that were removed while we were down.
        let st = self.store.state();
        let gone = |i: &&String| !self.instances.contains_key(*i);
        let unquarantine = st
            .quarantined
            .keys()
            .filter(gone)
            .map(|i| Op::Unquarantine {
                instance: i.clone(),
            });
        let fresh = st.used.iter().filter(gone).map(|i| Op::Fresh {
            instance: i.clone(),
        });
        let ops: Vec<Op> = unquarantine.chain(fresh).collect();
        self.ops.extend(ops);
        // Managed instances that belong to nothing declared are drained through their pool
        // entry (or removed, for deployments) by the passes below.
        let orphan_pools: Vec<String> = self
            .pool_index
            .keys()
            .filter(|p| !self.pools.contains_key(*p))
            .cloned()
            .collect();
        for p in orphan_pools {
            self.ensure_draining_pool(&p, now);
        }
        let orphan_deps: Vec<String> = self
            .instances
            .values()
            .filter_map(|r| r.deployment.as_ref().map(|d| d.0.clone()))
            .filter(|d| !self.deployments.contains_key(d))
            .collect();
        for d in orphan_deps {
            self.ensure_draining_deployment(&d, now);
        }
        self.mark_all_dirty();
        info!(
            pools = self.pools.len(),
            claims = self.claims.len(),
            bindings = self.store.state().bound.len(),
            "state rebuilt; reconciling"
        );
    }

    fn ensure_draining_pool(&mut self, pool: &str, now: u64) {
        if !self.pools.contains_key(pool) {
            let mut events = status::Events::default();
            events.push(
                false,
                "Draining",
                "instances found for an undeclared pool: removing unbound ones".into(),
                now,
            );
            let mut entry = super::PoolEntry::new(Default::default(), 0, String::new());
            entry.events = events;
            self.pools.insert(pool.to_owned(), entry);
        }
    }

    fn ensure_draining_deployment(&mut self, dep: &str, _now: u64) {
        if !self.deployments.contains_key(dep) {
            self.deployments.insert(
                dep.to_owned(),
                super::DeploymentEntry {
                    spec: None,
                    last_spec: None,
                    origin: Default::default(),
                    generation: 0,
                    hashes: BTreeMap::new(),
                    network_ready: None,
                    network_pending: false,
                    restarts: Default::default(),
                    triggers: Default::default(),
                    conditions: Vec::new(),
                    events: Default::default(),
                },
            );
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some(Reverse((t, _))) = self.expiries.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((t, claim))) = self.expiries.pop() else {
                break;
            };
            let rec = self.store.state().claims.get(&claim).cloned();
            let Some(rec) = rec else { continue };
            // A stale timer (the claim was rebound since) is ignored, and so is the record of a
            // claim deleted in this pass (a claim declared again under its name is a new one).
            if rec.phase != RecPhase::Bound || rec.expires_at_ms != Some(t) {
                continue;
            }
            if self.forgotten.contains(&claim) {
                continue;
            }
            if let Some(inst) = rec.instance {
                self.end_binding(&claim, &inst, RecPhase::Expired, "Expired", now);
                self.unindex_claim(&claim);
                self.touch_claim(&claim);
                if let Some(c) = self.claims.get_mut(&claim) {
                    c.events.push(
                        false,
                        "Expired",
                        format!("lease ended at {}", status::rfc3339(t)),
                        now,
                    );
                }
                self.pending_report(&claim);
            }
        }
    }

    /// Mark a claim to be reported after the commit (its phase changes with the ops).
    fn pending_report(&mut self, claim: &str) {
        self.to_report.insert(claim.to_owned());
    }

    /// The engine's admission over `user`'s claims that are not over (in arrival order), with
    /// `new` after them: the facts and their verdicts.
    pub(super) fn admit_claims_of<'a>(
        &'a self,
        user: &'a str,
        new: Option<ClaimFacts<'a>>,
    ) -> (Vec<ClaimFacts<'a>>, Vec<Verdict>) {
        let mut facts: Vec<ClaimFacts<'a>> = self
            .claims_by_user
            .get(user)
            .into_iter()
            .flatten()
            .filter_map(|(_, n)| self.claims.get(n).map(|c| (n, c)))
            .map(|(n, c)| ClaimFacts {
                name: n,
                pool: &c.spec.pool,
                user: &c.spec.user,
                bound: c.instance.is_some(),
            })
            .collect();
        facts.extend(new);
        let u = self.users.get(user);
        let verdicts = admit(
            &facts,
            |_| {
                u.map(|u| UserFacts {
                    disabled: u.spec.disabled,
                    max_claims: u.spec.quota.max_claims,
                    pools: &u.spec.quota.pools,
                })
            },
            |p| self.pools.get(p).is_some_and(|e| e.spec.is_some()),
        );
        (facts, verdicts)
    }

    fn admit_user(&mut self, user: &str) {
        let (facts, verdicts) = self.admit_claims_of(user, None);
        // Only the (rare) changes are collected, so a pass over a busy user allocates nothing.
        let changed: Vec<(String, Verdict)> = facts
            .iter()
            .zip(verdicts)
            .filter(|(f, v)| self.claims.get(f.name).is_some_and(|c| c.verdict != *v))
            .map(|(f, v)| (f.name.to_owned(), v))
            .collect();
        let now = self.clock.now_ms();
        for (name, v) in changed {
            let Some(c) = self.claims.get_mut(&name) else {
                continue;
            };
            match &v {
                Verdict::Refuse { reason, message } => {
                    c.events.push(true, reason, message.clone(), now);
                }
                Verdict::Admit => {
                    c.events
                        .push(false, "Admitted", "the claim may now be bound".into(), now);
                }
            }
            c.verdict = v;
            c.verdict_since = now;
            self.dirty_pools.insert(c.spec.pool.clone());
            self.pending_report(&name);
        }
    }

    fn reconcile_pool(&mut self, name: &str, now: u64) {
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
        let default_ttl = spec
            .as_ref()
            .and_then(|s| s.claim_ttl.as_deref())
            .and_then(|t| parse_duration(t).ok());
        let ssh_pool = spec.as_ref().is_some_and(|s| s.template.ssh.is_some());
        for (claim, inst) in binds {
            let Some(c) = self.claims.get_mut(&claim) else {
                continue;
            };
            let ttl = c
                .spec
                .ttl
                .as_deref()
                .and_then(|t| parse_duration(t).ok())
                .or(default_ttl);
            let expires = ttl.map(|d| now + d.as_millis() as u64);
            let hit = !c.waited;
            c.queue_position = None;
            c.instance = Some(inst.clone());
            c.files_pending = !c.files.is_empty() || ssh_pool;
            if let Some(p) = self.pools.get_mut(name) {
                if hit { p.hits += 1 } else { p.misses += 1 }
            }
            self.ops.push(Op::Bind {
                claim: claim.clone(),
                instance: inst.clone(),
                at_ms: now,
                expires_at_ms: expires,
                hit,
            });
            if let Some(t) = expires {
                self.expiries.push(Reverse((t, claim.clone())));
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
        let target = match &spec {
            Some(s) => PoolTarget {
                warm: s.warm,
                max: pool_max(s),
                deleting: false,
                queued: still_waiting.len() as u32,
            },
            None => PoolTarget {
                warm: 0,
                max: 0,
                deleting: true,
                queued: 0,
            },
        };
        let (counts, mut remove) = match self.pool_index.get(name) {
            Some(idx) => (idx.counts(), Vec::new()),
            None => (Default::default(), Vec::new()),
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
            Some(spec) => {
                let ok = counts.warm >= spec.warm;
                let msg = format!(
                    "{}/{} warm, {} starting, {} in use",
                    counts.warm, spec.warm, counts.starting, counts.occupied
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

    fn remove_instance(&mut self, name: &str) {
        let Some(rec) = self.instances.get_mut(name) else {
            return;
        };
        if rec.phase == InstancePhase::Deleting {
            return;
        }
        rec.phase = InstancePhase::Deleting;
        let in_flight = rec.create_in_flight;
        self.touched.insert(name.to_owned());
        if !in_flight {
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
    fn release_held_removals(&mut self, now: u64) {
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

    fn spawn_remove(&self, name: &str) {
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
        spec: &crate::api::PoolSpec,
        hash: &str,
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
            Some(l) if l.get(LABEL_HASH).map(String::as_str) == Some(hash) => l,
            _ => {
                let l: crate::runtime::Labels = std::sync::Arc::new(BTreeMap::from([
                    (LABEL_MANAGED.to_owned(), "true".to_owned()),
                    (LABEL_POOL.to_owned(), pool.to_owned()),
                    (LABEL_HASH.to_owned(), hash.to_owned()),
                ]));
                if let Some(p) = self.pools.get_mut(pool) {
                    p.labels = Some(l.clone());
                }
                l
            }
        };
        let res = t.resources.clone().unwrap_or_default();
        let ispec = InstanceSpec {
            name: name.clone(),
            image: t.image.clone(),
            command: t.command.clone(),
            env: t.env.clone(),
            ports: ports.clone(),
            labels,
            cpu_millis: res.cpu.as_deref().and_then(|c| parse_cpu_millis(c).ok()),
            memory_bytes: res
                .memory
                .as_deref()
                .and_then(|m| parse_memory_bytes(m).ok()),
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
            hash.to_owned(),
            InstancePhase::Creating,
            now,
        );
        rec.ports = ports.iter().map(|p| p.host_port).collect();
        rec.create_in_flight = true;
        self.instances.insert(name.clone(), Box::new(rec));
        self.touched.insert(name.clone());
        self.spawn_create(name, ispec);
        true
    }

    fn spawn_create(&mut self, name: String, spec: InstanceSpec) {
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
    fn create_answered(&mut self) {
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

    // -----------------------------------------------------------------------------------------
    // Deployments

    /// The instances of deployment `name`, by (container, replica).
    fn deployment_slots(&self, name: &str) -> BTreeMap<(String, u32), Vec<&InstRec>> {
        let mut slots: BTreeMap<(String, u32), Vec<&InstRec>> = BTreeMap::new();
        for r in self.instances.values() {
            if let Some((d, c, replica)) = &r.deployment
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
            tokio::spawn(async move {
                if let Some(net) = d.network_ready
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

    fn reconcile_deployment(&mut self, name: &str, now: u64) {
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
                if !pending {
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
                } else if rec.hash == hash_of(&cname) && slot.current.is_none() {
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
        let by_name: BTreeMap<&str, &crate::api::ContainerSpec> = spec
            .containers
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        let mut conflicts: Vec<String> = Vec::new();
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
                let cx = SlotContext {
                    deps_waiting: deps_waiting.clone(),
                    surge: spec.strategy == crate::api::UpdateStrategy::RollingUpdate
                        && c.ports.is_empty(),
                    restarts,
                    since_exit: std::time::Duration::from_millis(now.saturating_sub(exited_at)),
                };
                match plan_slot(c, &view, &cx) {
                    Step::Create => {
                        // The slot's name, unless an older instance still holds it.
                        let instance = if self.instances.contains_key(&key) {
                            format!("{key}-{}", hash.get(..6).unwrap_or(&hash))
                        } else {
                            key.clone()
                        };
                        if self.instances.contains_key(&instance) {
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
                            self.restart_container(name, &key, instance, "exited", now);
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
    fn follow_logs(&mut self, instance: &str, triggers: Vec<crate::api::LogTrigger>) {
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
            .and_then(|r| r.deployment.clone())
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
            crate::api::LogAction::Condition => {
                status::set_condition(
                    &mut d.conditions,
                    "LogTriggered",
                    true,
                    "PatternMatched",
                    message,
                    now,
                );
            }
            crate::api::LogAction::Restart => {
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
        spec: &crate::api::DeploymentSpec,
        c: &crate::api::ContainerSpec,
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
        let res = c.resources.clone().unwrap_or_default();
        let ispec = InstanceSpec {
            name: slot.to_owned(),
            image: c.image.clone(),
            command: c.command.clone(),
            env: c.environment.clone(),
            ports: ports.clone(),
            labels,
            cpu_millis: res.cpu.as_deref().and_then(|x| parse_cpu_millis(x).ok()),
            memory_bytes: res
                .memory
                .as_deref()
                .and_then(|m| parse_memory_bytes(m).ok()),
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
            pull_policy: crate::api::PullPolicy::IfNotPresent,
            files_dir: None,
        };
        let now = self.clock.now_ms();
        let mut rec = InstRec::new(
            slot.to_owned(),
            None,
            Some((dep.to_owned(), c.name.clone(), replica)),
            hash.to_owned(),
            InstancePhase::Creating,
            now,
        );
        rec.ports = ports.iter().map(|p| p.host_port).collect();
        rec.create_in_flight = true;
        self.instances.insert(slot.to_owned(), Box::new(rec));
        self.spawn_create(slot.to_owned(), ispec);
        None
    }

    // -----------------------------------------------------------------------------------------
    // Commit and what follows it

    fn commit(&mut self, now: u64) {
        let ops = std::mem::take(&mut self.ops);
        if !ops.is_empty() {
            let flush = if needs_flush(&ops) {
                Flush::Now
            } else {
                Flush::Deferred
            };
            let began = std::time::Instant::now();
            let committed = self.store.commit_with(ops, flush);
            match flush {
                Flush::Now => self
                    .metrics
                    .store_commit
                    .observe(began.elapsed().as_secs_f64()),
                Flush::Deferred => self.metrics.store_deferred += 1,
            }
            match committed {
                Ok(rejected) => {
                    for r in rejected {
                        // Decisions above make this unreachable; the store is the last guard.
                        error!(op = ?r.op, reason = %r.reason, "state store refused an op");
                        if let Op::Bind {
                            claim, instance, ..
                        } = &r.op
                        {
                            if let Some(i) = self.instances.get_mut(instance)
                                && i.claim.as_deref() == Some(claim.as_str())
                            {
                                self.touched.insert(instance.clone());
                                i.claim = None;
                            }
                            if let Some(c) = self.claims.get_mut(claim) {
                                c.instance = None;
                            }
                            self.after_commit.retain(
                                |a| !matches!(a, AfterCommit::Bound { claim: c, .. } if c == claim),
                            );
                            let claim = claim.clone();
                            self.enqueue(&claim);
                            self.touch_claim(&claim);
                        }
                    }
                }
                Err(e) => store_failed(&e),
            }
        }
        self.flush_deferred(now);
        self.forgotten.clear();
        let work = std::mem::take(&mut self.after_commit);
        for w in work {
            match w {
                AfterCommit::Bound { claim, instance } => {
                    self.start_bound(&claim, &instance, now);
                }
                AfterCommit::Reset { instance } => self.start_reset(&instance),
            }
        }
        for c in std::mem::take(&mut self.to_report) {
            self.report_claim(&c, now);
        }
    }

    /// Flushes batches written without a flush once the oldest has waited `DEFERRED_FLUSH_MS`
    /// (a flushed commit has covered them otherwise), and asks for a pass at that time.
    fn flush_deferred(&mut self, now: u64) {
        if !self.store.has_unflushed() {
            self.deferred_since_ms = None;
            return;
        }
        let since = *self.deferred_since_ms.get_or_insert_with(|| {
            self.wakeups.push(Reverse(now + super::DEFERRED_FLUSH_MS));
            now
        });
        if now.saturating_sub(since) < super::DEFERRED_FLUSH_MS {
            return;
        }
        let began = std::time::Instant::now();
        if let Err(e) = self.store.flush() {
            store_failed(&e);
        }
        self.metrics
            .store_commit
            .observe(began.elapsed().as_secs_f64());
        self.deferred_since_ms = None;
    }

    /// Files uploaded into a bound claim's instance (the API's upload).
    pub(super) fn put_claim_files(
        &mut self,
        claim: &str,
        files: Vec<(String, Vec<u8>)>,
        reply: tokio::sync::oneshot::Sender<Result<usize, super::PutFilesError>>,
    ) {
        use super::PutFilesError;
        let Some(c) = self
            .claims
            .get(claim)
            .filter(|c| c.reported == ClaimPhase::Bound)
        else {
            let _ = reply.send(Err(PutFilesError::NotBound(claim.to_owned())));
            return;
        };
        let Some(instance) = c.instance.clone() else {
            let _ = reply.send(Err(PutFilesError::NotBound(claim.to_owned())));
            return;
        };
        let mount = self
            .pools
            .get(&c.spec.pool)
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.template.files.as_ref())
            .map(|f| f.mount_path.clone());
        let Some(mount) = mount else {
            let _ = reply.send(Err(PutFilesError::NoMountPath(c.spec.pool.clone())));
            return;
        };
        let rt = self.rt.clone();
        tokio::spawn(async move {
            let n = files.len();
            let r = rt
                .put_files(&instance, &mount, &files)
                .await
                .map(|()| n)
                .map_err(|e| PutFilesError::Runtime(e.to_string()));
            let _ = reply.send(r);
        });
    }

    fn start_bound(&mut self, claim: &str, instance: &str, now: u64) {
        let Some(c) = self.claims.get(claim) else {
            return;
        };
        if let Some(rec) = self.store.state().claims.get(claim)
            && rec.phase != RecPhase::Bound
        {
            return;
        }
        let template = self
            .pools
            .get(&c.spec.pool)
            .and_then(|p| p.spec.as_ref())
            .map(|s| &s.template);
        let mount = template
            .and_then(|t| t.files.as_ref())
            .map(|f| f.mount_path.clone());
        // The user's keys, for pools with SSH access.
        let keys = template.and_then(|t| t.ssh.as_ref()).map(|ssh| {
            let keys = self
                .users
                .get(&c.spec.user)
                .map(|u| u.spec.ssh_keys.join("\n"))
                .unwrap_or_default();
            (ssh.ssh_dir(), format!("{keys}\n").into_bytes())
        });
        if c.files.is_empty() && keys.is_none() {
            self.report_claim(claim, now);
            return;
        }
        let files = c.files.clone();
        let mount = match mount {
            Some(m) => Some(m),
            None if files.is_empty() => None,
            None => {
                if let Some(c) = self.claims.get_mut(claim) {
                    let msg = "the claim has files but the pool's template declares no files.mountPath; none were copied".to_owned();
                    c.events.push(true, "NoMountPath", msg, now);
                }
                None
            }
        };
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        let (claim, instance) = (claim.to_owned(), instance.to_owned());
        tokio::spawn(async move {
            let mut result = Ok(());
            if let Some(mount) = mount
                && !files.is_empty()
            {
                result = rt.put_files(&instance, &mount, &files).await;
            }
            if result.is_ok()
                && let Some((dir, keys)) = keys
            {
                result = rt
                    .put_files(&instance, &dir, &[("authorized_keys".to_owned(), keys)])
                    .await;
            }
            let _ = tx.send(Input::Done(Completion::Files {
                claim,
                instance,
                result,
            }));
        });
    }

    /// Whether binding `claim` copies anything into the instance (files, or SSH keys).
    fn needs_copy(&self, claim: &str) -> bool {
        self.claims.get(claim).is_some_and(|c| {
            !c.files.is_empty()
                || self
                    .pools
                    .get(&c.spec.pool)
                    .and_then(|p| p.spec.as_ref())
                    .is_some_and(|s| s.template.ssh.is_some())
        })
    }

    fn start_reset(&mut self, instance: &str) {
        let Some(rec) = self.instances.get(instance) else {
            return;
        };
        let policy = rec
            .pool
            .as_ref()
            .and_then(|p| self.pools.get(p))
            .and_then(|p| p.spec.as_ref())
            .map(|s| (s.reset, s.reset_command.clone()));
        let Some((policy, command)) = policy else {
            // The pool is gone: the instance is drained.
            self.remove_instance(instance);
            return;
        };
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        let name = instance.to_owned();
        match policy {
            ResetPolicy::Recreate => {
                if let Some(r) = self.instances.get_mut(instance) {
                    r.resetting = false;
                    self.touched.insert(instance.to_owned());
                }
                self.retire(instance);
            }
            ResetPolicy::Restart => {
                tokio::spawn(async move {
                    let result = rt
                        .restart(&name)
                        .await
                        .map_err(|e| format!("restart failed: {e}"));
                    let _ = tx.send(Input::Done(Completion::Reset { name, result }));
                });
            }
            ResetPolicy::Exec => {
                tokio::spawn(async move {
                    let result = match rt.exec(&name, &command).await {
                        Ok(o) if o.exit_code == 0 => Ok(()),
                        Ok(o) => Err(format!(
                            "reset command exited with {}: {}",
                            o.exit_code,
                            o.output.trim()
                        )),
                        Err(e) => Err(format!("reset command failed: {e}")),
                    };
                    let _ = tx.send(Input::Done(Completion::Reset { name, result }));
                });
            }
        }
    }

    /// The phase a claim shows, from its durable record and what this engine knows.
    fn claim_phase(c: &ClaimEntry, rec: Option<&super::durable::ClaimRecord>) -> ClaimPhase {
        match rec.map(|r| r.phase) {
            Some(RecPhase::Bound) if !c.files_pending => ClaimPhase::Bound,
            Some(RecPhase::Bound) => ClaimPhase::Pending,
            Some(RecPhase::Expired) => ClaimPhase::Expired,
            Some(RecPhase::Released) => ClaimPhase::Released,
            _ if c.verdict != Verdict::Admit || c.files_error.is_some() => ClaimPhase::Failed,
            _ => ClaimPhase::Pending,
        }
    }

    /// Recomputes a claim's reported phase; records the change and notifies watchers.
    pub(super) fn report_claim(&mut self, claim: &str, now: u64) {
        let rec = self.store.state().claims.get(claim);
        let Some(c) = self.claims.get(claim) else {
            return;
        };
        let phase = Self::claim_phase(c, rec);
        if c.reported == phase {
            return;
        }
        let Some(c) = self.claims.get_mut(claim) else {
            return;
        };
        if phase == ClaimPhase::Bound && c.reported == ClaimPhase::Pending {
            let waited = now.saturating_sub(c.phase_since);
            self.metrics.bind_latency.observe(waited as f64 / 1000.0);
        }
        c.reported = phase;
        c.phase_since = now;
        if phase == ClaimPhase::Bound {
            // No event for a routine bind: the Bound condition (time, instance) says it, and
            // 100k claims each holding an event would cost ~30 MB.
            c.lost = None;
        }
        self.notify(claim, phase);
    }

    /// A claim's conditions, derived from its state.
    fn claim_conditions(&self, c: &ClaimEntry) -> Vec<crate::api::Condition> {
        let cond = |type_: &str, ok: bool, reason: &str, message: String, since: u64| {
            crate::api::Condition {
                type_: type_.to_owned(),
                status: if ok { "True" } else { "False" }.to_owned(),
                reason: reason.to_owned(),
                message,
                last_transition_time: status::rfc3339(since),
                observed_generation: Some(c.generation),
            }
        };
        let mut out = Vec::new();
        out.push(match (&c.verdict, &c.files_error) {
            (_, Some(err)) => cond(
                "Admitted",
                false,
                "FilesUnavailable",
                err.clone(),
                c.verdict_since,
            ),
            (Verdict::Refuse { reason, message }, _) => {
                cond("Admitted", false, reason, message.clone(), c.verdict_since)
            }
            (Verdict::Admit, None) => {
                cond("Admitted", true, "Admitted", String::new(), c.verdict_since)
            }
        });
        let (reason, message) = match c.reported {
            ClaimPhase::Bound => (
                "Bound".to_owned(),
                format!("bound to {}", c.instance.clone().unwrap_or_default()),
            ),
            ClaimPhase::Pending if c.instance.is_some() => (
                "CopyingFiles".to_owned(),
                "copying the claim's files into its instance".to_owned(),
            ),
            ClaimPhase::Pending => match c.queue_position {
                Some(p) => (
                    "Queued".to_owned(),
                    format!("waiting for an instance (position {p})"),
                ),
                None => (
                    "Binding".to_owned(),
                    "looking for a warm instance".to_owned(),
                ),
            },
            other => (other.to_string(), String::new()),
        };
        out.push(cond(
            "Bound",
            c.reported == ClaimPhase::Bound,
            &reason,
            message,
            c.phase_since,
        ));
        if let Some((msg, at)) = &c.lost {
            out.push(cond("InstanceLost", true, "InstanceLost", msg.clone(), *at));
        }
        if let Some((msg, at)) = &c.invalid {
            out.push(cond("SpecValid", false, "InvalidSpec", msg.clone(), *at));
        }
        out
    }

    // -----------------------------------------------------------------------------------------
    // Status

    pub(super) fn pool_status(&self, name: &str) -> Option<PoolStatus> {
        let p = self.pools.get(name)?;
        let members = self.pool_index.get(name).map(|i| &i.members);
        let recs: Vec<&InstRec> = members
            .into_iter()
            .flatten()
            .filter_map(|m| self.instances.get(m).map(|r| &**r))
            .collect();
        let mut s = PoolStatus {
            observed_generation: Some(p.generation),
            ..PoolStatus::default()
        };
        for r in &recs {
            if r.phase == InstancePhase::Deleting {
                continue;
            }
            s.instances += 1;
            if r.phase == InstancePhase::Ready {
                s.ready += 1;
            }
            if r.quarantined.is_some() {
                s.quarantined += 1;
            } else if r.claim.is_some() {
                s.bound += 1;
            } else if r.phase == InstancePhase::Ready && !r.resetting && r.hash == p.hash {
                s.warm += 1;
            } else if matches!(r.phase, InstancePhase::Creating | InstancePhase::Starting) {
                s.starting += 1;
            }
        }
        // Only unbound claims can be waiting: count from the pool's queue, not all its claims.
        s.queued = self
            .queues
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(_, c)| {
                self.claims.get(c).is_some_and(|e| {
                    e.queue_position.is_some() && e.reported == ClaimPhase::Pending
                })
            })
            .count() as u32;
        s.hits = p.hits;
        s.misses = p.misses;
        // Conditions are kept by the passes (so transition times hold); a Quarantined
        // condition outlives its last quarantined instance only until the next pass.
        let mut conds = p.conditions.clone();
        if s.quarantined == 0 {
            conds.retain(|c| c.type_ != "Quarantined");
        }
        s.conditions = conds;
        Some(s)
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        let now = self.clock.now_ms();
        let st = self.store.state();
        let mut objects = Vec::new();
        for (name, p) in &self.pools {
            let Some(s) = self.pool_status(name) else {
                continue;
            };
            objects.push(view(
                Kind::Pool,
                name,
                &p.origin,
                p.spec.as_ref(),
                &s,
                &p.events,
            ));
        }
        let mut claims: Vec<(&String, &ClaimEntry)> =
            self.claims.iter().map(|(n, c)| (n, &**c)).collect();
        claims.sort_by_key(|(_, c)| c.seq);
        for (name, c) in claims {
            let rec = st.claims.get(name);
            let instance = rec
                .and_then(|r| r.instance.clone())
                .filter(|_| c.reported == ClaimPhase::Bound);
            let endpoint = instance
                .as_ref()
                .and_then(|i| self.instances.get(i))
                .map(|r| {
                    let host = self.rt.endpoint_host(&r.node);
                    let ssh = self
                        .pools
                        .get(&c.spec.pool)
                        .and_then(|p| p.spec.as_ref())
                        .and_then(|s| s.template.ssh.as_ref())
                        .and_then(|ssh| {
                            crate::runtime::find_port(&r.bindings, &ssh.port)
                                .map(|b| format!("ssh -p {} {}@{host}", b.host_port, ssh.user))
                        });
                    Endpoint {
                        ports: r
                            .bindings
                            .iter()
                            .map(|p| (p.name.clone(), p.host_port))
                            .collect(),
                        host,
                        ssh,
                    }
                });
            let s = ClaimStatus {
                observed_generation: Some(c.generation),
                phase: c.reported,
                instance: instance.clone(),
                endpoint,
                bound_at: rec
                    .and_then(|r| r.bound_at_ms)
                    .filter(|_| instance.is_some())
                    .map(status::rfc3339),
                expires_at: rec
                    .and_then(|r| r.expires_at_ms)
                    .filter(|_| instance.is_some())
                    .map(status::rfc3339),
                queue_position: c
                    .queue_position
                    .filter(|_| c.reported == ClaimPhase::Pending),
                conditions: self.claim_conditions(c),
            };
            objects.push(view(
                Kind::Claim,
                name,
                &c.origin,
                Some(&c.spec),
                &s,
                &c.events,
            ));
        }
        for (name, u) in &self.users {
            let active = self
                .claims_by_user
                .get(name)
                .into_iter()
                .flatten()
                .filter(|(_, c)| {
                    self.claims.get(c).is_some_and(|e| {
                        matches!(e.reported, ClaimPhase::Bound | ClaimPhase::Pending)
                    })
                })
                .count() as u32;
            let s = UserStatus {
                observed_generation: Some(u.generation),
                active_claims: active,
                conditions: u.conditions.clone(),
            };
            objects.push(view(
                Kind::User,
                name,
                &u.origin,
                Some(&u.spec),
                &s,
                &u.events,
            ));
        }
        for (name, d) in &self.deployments {
            let mut s = DeploymentStatus {
                observed_generation: Some(d.generation),
                conditions: d.conditions.clone(),
                ..DeploymentStatus::default()
            };
            if let Some(spec) = &d.spec {
                let slots = self.deployment_slots(name);
                for c in &spec.containers {
                    let hash = d
                        .hashes
                        .get(&c.name)
                        .map(String::as_str)
                        .unwrap_or_default();
                    for r in 0..c.replicas {
                        let slot = slot_name(name, c, r);
                        // The current instance; else one that is being replaced.
                        let recs = slots.get(&(c.name.clone(), r));
                        let rec = recs
                            .and_then(|v| v.iter().find(|i| i.hash == hash))
                            .or_else(|| recs.and_then(|v| v.first()))
                            .copied();
                        let updating = rec.is_some_and(|i| i.hash != hash)
                            || recs.is_some_and(|v| v.len() > 1);
                        let restarts = d.restarts.get(&slot).map(|r| r.0).unwrap_or(0);
                        let state = match rec.map(|r| r.phase) {
                            None if c.depends_on.is_empty() => "Waiting",
                            None => "WaitingForDependencies",
                            Some(InstancePhase::Creating) | Some(InstancePhase::Starting) => {
                                "Starting"
                            }
                            Some(InstancePhase::Ready) => "Running",
                            Some(InstancePhase::Dead)
                                if crate::core::deployment::should_restart(
                                    c.restart_policy,
                                    rec.and_then(|r| r.exit_code),
                                ) && restarts > 0 =>
                            {
                                "CrashLoopBackOff"
                            }
                            Some(InstancePhase::Dead) => "Exited",
                            Some(InstancePhase::Deleting) => "Terminating",
                        };
                        s.containers += 1;
                        let ready = rec.is_some_and(|r| r.phase == InstancePhase::Ready);
                        if ready {
                            s.ready += 1;
                        }
                        s.container_statuses.push(ContainerStatus {
                            name: c.name.clone(),
                            replica: r,
                            instance: rec.map(|r| r.name.clone()),
                            state: state.to_owned(),
                            ready,
                            restarts,
                            exit_code: rec.and_then(|r| r.exit_code),
                            message: updating.then(|| "being replaced by its new spec".to_owned()),
                        });
                    }
                    for t in &c.log_triggers {
                        let st = d.triggers.get(&(c.name.clone(), t.name.clone()));
                        s.log_triggers.push(crate::api::LogTriggerStatus {
                            container: c.name.clone(),
                            name: t.name.clone(),
                            fired: st.map_or(0, |x| x.fired),
                            matches: st.map_or(0, |x| x.matches),
                            last_line: st.and_then(|x| x.last_line.clone()),
                            last_fired_at: st.and_then(|x| x.last_fired_ms).map(status::rfc3339),
                        });
                    }
                }
            }
            objects.push(view(
                Kind::Deployment,
                name,
                &d.origin,
                d.spec.as_ref(),
                &s,
                &d.events,
            ));
        }
        let mut instances: Vec<InstanceView> = self
            .instances
            .values()
            .map(|r| InstanceView {
                name: r.name.clone(),
                pool: r.pool.clone(),
                deployment: r.deployment.as_ref().map(|d| d.0.clone()),
                phase: format!("{:?}", r.phase),
                claim: r.claim.clone(),
                ports: r.ports.clone(),
                node: r.node.clone(),
                quarantined: r.quarantined.clone(),
            })
            .collect();
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot {
            controller: status::ControllerInfo {
                pid: std::process::id(),
                runtime: self.rt.name().to_owned(),
                started_at: status::rfc3339(self.started_at_ms),
                updated_at: status::rfc3339(now),
                state_dir: self.config.state_dir.clone(),
                api: None,
            },
            objects,
            diagnostics: self
                .diagnostics
                .values()
                .flatten()
                .map(|d| d.to_string())
                .collect(),
            instances,
            nodes: self.rt.nodes(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Counts `n` reconciles of a kind and the time they took (a pass with none is not timed).
fn observe(m: &mut super::metrics::KindMetrics, n: u64, began: std::time::Instant) {
    if n > 0 {
        m.reconciles += n;
        m.duration.observe(began.elapsed().as_secs_f64());
    }
}

/// The instance name of replica `r` of container `c` of deployment `dep` (the replica number is
/// left out when there is only one).
fn slot_name(dep: &str, c: &crate::api::ContainerSpec, r: u32) -> String {
    if c.replicas > 1 {
        format!("{dep}-{}-{r}", c.name)
    } else {
        format!("{dep}-{}", c.name)
    }
}

fn view<S: serde::Serialize, T: serde::Serialize>(
    kind: Kind,
    name: &str,
    origin: &crate::model::Origin,
    spec: Option<&S>,
    status: &T,
    events: &status::Events,
) -> ObjectView {
    ObjectView {
        kind,
        name: name.to_owned(),
        origin: origin.clone(),
        spec: spec
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(serde_json::Value::Null),
        status: serde_json::to_value(status).unwrap_or(serde_json::Value::Null),
        events: events.records(),
    }
}
