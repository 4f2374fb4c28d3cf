//! Observed state: what the runtime reports of instances (events, lists, completions).

use std::cmp::Reverse;

use tracing::{debug, error, info, warn};

use poolkeeper_core::pool::InstancePhase;
use poolkeeper_kinds::ResetPolicy;
use poolkeeper_runtime::{
    Instance, InstanceState, LABEL_CONTAINER, LABEL_DEPLOYMENT, LABEL_HASH, LABEL_MANAGED,
    LABEL_POOL, LABEL_QUARANTINED, LABEL_REPLICA, Runtime, RuntimeError, RuntimeEvent,
};

use crate::durable::{Op, RecPhase};
use crate::handle::{Completion, Input};
use crate::{AfterCommit, Engine, InstRec, status};

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

/// How long an instance reported gone stays gone against lists (see `recently_gone`): longer
/// than any list takes.
const FORGOTTEN_KEPT_MS: u64 = 120_000;

impl<R: Runtime> Engine<R> {
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
                self.unavailable_backoffs_end();
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
                // So may a reset that makes the instance again under its name (a pod's
                // restart): its result decides.
                !r.create_in_flight
                    && !r.resetting
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
        // Nodes that are gone (a cluster scaled down) with all their instances.
        crate::forget_unheld(&mut self.nodes);
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
        // Only ports taken on a node are the engine's to share out; a Service's port is every
        // instance's at once.
        let ports: Vec<u16> = if i.host_ports {
            i.ports.iter().map(|p| p.host_port).collect()
        } else {
            Vec::new()
        };
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
            let hash = i.label(LABEL_HASH).unwrap_or_default();
            // The pool's own string when it is of the pool's template.
            let hash = match pool.as_deref().and_then(|p| self.pools.get(p)) {
                Some(p) if *p.hash == *hash => p.hash.clone(),
                _ => std::sync::Arc::from(hash),
            };
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
        let mut filled = None;
        if phase == InstancePhase::Ready && was != InstancePhase::Ready {
            rec.ready_since = now;
            if let Some(asked) = rec.created_ms.take() {
                filled = rec.pool.clone().map(|p| (p, now.saturating_sub(asked)));
            }
        }
        rec.exit_code = code;
        let recorded = crate::Recorded::of(&i);
        let marked_quarantined = i.label(LABEL_QUARANTINED).is_some();
        let same = match (&rec.recorded, recorded) {
            (Some(was), Some(now)) => was.is(now),
            (was, now) => was.is_none() && now.is_none(),
        };
        if !same {
            rec.recorded = recorded.map(|(claim, user, at)| {
                Box::new(crate::Recorded {
                    claim: claim.to_owned(),
                    user: user.map(str::to_owned),
                    at,
                })
            });
            self.touched.insert(name.clone());
            if let Some(p) = &rec.pool {
                self.dirty_pools.insert(p.clone());
            }
        }
        let Some(rec) = self.instances.get_mut(&name) else {
            return;
        };
        if *rec.node != *i.node {
            rec.node = crate::intern(&mut self.nodes, &i.node);
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
        if let Some((pool, took)) = filled
            && let Some(p) = self.pools.get_mut(&pool)
        {
            p.scale.filled(took);
        }
        // Adopt: bindings and quarantines come from the store. A binding is adopted only while
        // the claim agrees (or is not known yet, before the first pass): the store lags memory
        // within a pass, so a binding ended earlier in this batch (claim deleted, instance lost)
        // must not come back from a stale record when the same instance is observed again.
        // Before the first pass the store lags longer (nothing is committed until the runtime
        // is listed), so a claim deleted meanwhile is not "not known yet": its record is one
        // that the first commit forgets.
        let st = self.store.state();
        let bound = st
            .bound
            .get(&name)
            .cloned()
            .filter(|c| match self.claims.get(c) {
                Some(e) => e.instance.as_deref() == Some(name.as_str()),
                None => !self.started && !self.forgotten.contains(c),
            });
        let quarantined = st.quarantined.get(&name).cloned();
        // Quarantined in the store and not on the instance (by a version before the label, or
        // its write failed): recorded again (idempotent), or a lost store would hand it on.
        let rewrite_quarantine = quarantined.is_some() && !marked_quarantined;
        // Quarantined as the instance records it, where the store does not (a controller that
        // lost its store): kept out of service, and durably so.
        let label_only =
            quarantined.is_none() && marked_quarantined && !st.bound.contains_key(&name);
        let mut quarantine_recorded = None;
        let used = first_sighting && st.used.contains(&name);
        let mut reset = false;
        if let Some(rec) = self.instances.get_mut(&name) {
            rec.used |= used;
            if rec.claim.is_none() && bound.is_some() {
                rec.claim = bound;
            }
            if quarantined.is_some() {
                rec.quarantined = quarantined;
            } else if label_only && rec.quarantined.is_none() {
                rec.quarantined = Some(RECORDED_QUARANTINE.to_owned());
                quarantine_recorded = rec.quarantined.clone();
            }
            reset = used && rec.claim.is_none() && rec.quarantined.is_none();
        }
        if rewrite_quarantine {
            self.record_quarantine(&name);
        }
        if let Some(reason) = quarantine_recorded {
            info!(instance = %name, "quarantined, as the instance records: kept out of service");
            self.ops.push(Op::Quarantine {
                instance: name.clone(),
                reason,
            });
        }
        // A binding recorded on it late, for a claim bound elsewhere since, or whose binding
        // has ended for good (released or expired): a write of a controller since replaced (or
        // of this one, before a restart) that landed after the claim moved on. It may hold that
        // claim's files: reset (which clears the record), or it would stay occupied by nobody
        // for good. Startup settles the same case at once. Not an instance bound here to
        // another claim: this engine's own write of that binding comes after, and the report
        // is older than it (a reset's answer can overtake the watch's report of what the reset
        // did). Nor one recording a claim unknown here: another controller's.
        let ended = |c: &str| {
            self.store
                .state()
                .claims
                .get(c)
                .is_some_and(|r| r.phase.ended())
        };
        if self.started
            && let Some(rec) = self.instances.get(&name)
            && let Some(c) = rec.recorded.as_ref().map(|r| r.claim.as_str())
            && rec.claim.is_none()
            && !rec.resetting
            && rec.quarantined.is_none()
            && rec.phase != InstancePhase::Dead
            && rec.deployment.is_none()
            && self
                .claims
                .get(c)
                .is_some_and(|e| e.instance.as_deref().map_or(ended(c), |i| i != name))
        {
            info!(instance = %name, claim = c, "records a claim bound elsewhere or ended: resetting it");
            reset = true;
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

    pub(crate) fn forget_instance(&mut self, name: &str) {
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
        if let Some((d, _, _)) = rec.deployment.as_deref() {
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
    pub(crate) fn instance_lost(&mut self, claim: &str, instance: &str, how: &str, now: u64) {
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
            c.lost = Some(Box::new((msg.clone(), now)));
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
                if let (Some(d), Some(c), Some(r)) = (
                    i.label(LABEL_DEPLOYMENT),
                    i.label(LABEL_CONTAINER),
                    i.label(LABEL_REPLICA).and_then(|r| r.parse::<u32>().ok()),
                ) && let Some(dep) = self.deployments.get_mut(d)
                    && dep.create_backoff.remove(&(c.to_owned(), r)).is_some()
                {
                    self.dirty_deployments.insert(d.to_owned());
                }
                if let Some(pool) = i.label(LABEL_POOL)
                    && let Some(p) = self.pools.get_mut(pool)
                {
                    // The runtime creates again: what earlier failures set to wait is over, and
                    // the pool fills now rather than when their backoff would have ended.
                    let waited = p.create_backoff_until > now;
                    p.create_failures = 0;
                    p.create_backoff_until = 0;
                    p.create_error = None;
                    if waited {
                        self.dirty_pools.insert(pool.to_owned());
                    }
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
                let Some(rec) = self.instances.get(&name) else {
                    return;
                };
                let pool = rec.pool.clone();
                let removed = rec.phase == InstancePhase::Deleting;
                // A removal asked for meanwhile waited for this reset: it goes now, and what
                // the reset did no longer matters.
                self.reset_ended(&name);
                if let Some(p) = &pool {
                    self.dirty_pools.insert(p.clone());
                }
                let Some(rec) = self.instances.get_mut(&name).filter(|_| !removed) else {
                    return;
                };
                match result {
                    Ok(revision) => {
                        debug!(instance = %name, revision, "reset done");
                        rec.used = false;
                        // A report older than what the reset left (a watch lagging behind, a
                        // list taken before) still shows the binding the reset cleared: applied
                        // now, it would have the instance reset again.
                        rec.revision = rec.revision.max(revision);
                        self.ops.push(Op::Fresh {
                            instance: name.clone(),
                        });
                    }
                    Err(ResetFailed { reason, down: true }) => {
                        // Down or gone (it crashed, say, while it was reset): nothing is known
                        // against it, and a dead instance kept in quarantine would hold a pod
                        // or container that no one asked to inspect. Replaced: still used, it
                        // is removed, and the pool refills.
                        warn!(instance = %name, %reason, "reset failed on a downed instance; replacing it");
                        if let Some(p) = pool.as_ref().and_then(|p| self.pools.get_mut(p)) {
                            let msg = format!("instance {name}: {reason}; replacing it");
                            p.events.push(true, "ResetFailed", msg, now);
                        }
                        self.remove_instance(&name);
                    }
                    Err(ResetFailed {
                        reason,
                        down: false,
                    }) => {
                        warn!(instance = %name, %reason, "reset failed; quarantining the instance");
                        rec.quarantined = Some(reason.clone());
                        self.ops.push(Op::Quarantine {
                            instance: name.clone(),
                            reason: reason.clone(),
                        });
                        self.after_commit.push(AfterCommit::Quarantine {
                            instance: name.clone(),
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
            }
            Completion::Files {
                claim,
                instance,
                step,
                limits,
                result,
            } => {
                self.claim_work_ended(&instance);
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
                            if !c.files.is_empty() {
                                c.events.push(
                                    false,
                                    "FilesCopied",
                                    format!("{} file(s) copied into {instance}", c.files.len()),
                                    now,
                                );
                            }
                        }
                        self.report_claim(&claim, now);
                        // Its resources changed while it was being bound.
                        if self
                            .claims
                            .get(&claim)
                            .is_some_and(|c| crate::claims::claim_limits(&c.spec) != limits)
                        {
                            self.resize_bound(&claim, now);
                        }
                    }
                    Err(RuntimeError::Conflict { reason, holder, .. }) => {
                        // Another controller (or a stale view of ours) holds the instance, or
                        // it changed under us: nothing was copied into it. It is not ours to
                        // reset or remove, nor to take out of service for good (that would
                        // cost the pool an instance for a transient race); the claim binds
                        // another, and the instance counts as its holder's for as long as the
                        // runtime records it so.
                        let msg = format!("instance {instance} could not be bound: {reason}");
                        if let Some(c) = self.claims.get_mut(&claim) {
                            c.events.push(true, "BindConflict", msg, now);
                        }
                        self.unbind_without_reset(&claim, &instance, "BindConflict", now);
                        if let Some(rec) = self.instances.get_mut(&instance) {
                            // Never ours: as fresh as it was when it was picked.
                            rec.used = false;
                            if let Some(claim) = holder {
                                rec.recorded = Some(Box::new(crate::Recorded {
                                    claim,
                                    user: None,
                                    at: None,
                                }));
                            }
                            self.touched.insert(instance.clone());
                            self.ops.push(Op::Fresh {
                                instance: instance.clone(),
                            });
                        }
                    }
                    Err(e) => {
                        // The instance could not take the files: take it out and bind another.
                        let msg = format!("{step} {instance} failed: {e}");
                        let outage = says_only_down(&e);
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
                        self.unbind_without_reset(&claim, &instance, "FilesFailed", now);
                        if outage || give_up {
                            // Nothing is known against the instance (the runtime was unreachable,
                            // or the instance is gone or down, or the claim's files are at
                            // fault), and it may hold part of the files: it is replaced, not
                            // reset. A dead instance kept in quarantine would hold a pod or
                            // container that no one asked to inspect.
                            self.remove_instance(&instance);
                            if give_up {
                                self.report_claim(&claim, now);
                            }
                            return;
                        }
                        self.quarantine(&instance, msg);
                    }
                }
            }
            Completion::Uploaded { instance } => self.claim_work_ended(&instance),
            Completion::Resized {
                claim,
                instance,
                cpu,
                memory,
                result,
            } => {
                self.claim_work_ended(&instance);
                let Some(c) = self
                    .claims
                    .get_mut(&claim)
                    .filter(|c| c.instance.as_deref() == Some(instance.as_str()))
                else {
                    return;
                };
                match result {
                    Ok(()) => {
                        let mut gave = Vec::new();
                        if let Some(m) = cpu {
                            gave.push(format!("cpu {m}m"));
                        }
                        if let Some(b) = memory {
                            gave.push(format!("memory {b} bytes"));
                        }
                        let msg = format!("{instance} resized in place: {}", gave.join(", "));
                        c.events.push(false, "Resized", msg, now);
                    }
                    Err(e) => {
                        // The instance keeps what it had, and the claim its binding.
                        let msg = format!("resizing {instance} failed: {e}");
                        warn!(claim = %claim, "{msg}");
                        c.events.push(true, "ResizeFailed", msg, now);
                    }
                }
                self.pending_report(&claim);
            }
            Completion::Stopped { name, result } => {
                if let Err(e) = result {
                    warn!(instance = %name, error = %e, "stop failed");
                    if let Some((d, container, replica)) = self
                        .instances
                        .get(&name)
                        .and_then(|r| r.deployment.as_deref().cloned())
                        && let Some(dep) = self.deployments.get_mut(&d)
                    {
                        dep.events
                            .push(true, "StopFailed", format!("{name}: {e}"), now);
                        // Tried again at the next pass.
                        let key = dep
                            .spec
                            .as_ref()
                            .and_then(|s| s.containers.iter().find(|c| c.name == container))
                            .map(|c| crate::deployments::slot_name(&d, c, replica));
                        if let Some(k) = key {
                            dep.stopped.remove(&k);
                        }
                        self.dirty_deployments.insert(d);
                    }
                }
            }
            Completion::Restarted { name, result } => {
                if let Err(e) = result {
                    warn!(instance = %name, error = %e, "restart failed");
                    if let Some((d, _, _)) = self
                        .instances
                        .get(&name)
                        .and_then(|r| r.deployment.as_deref().cloned())
                        && let Some(dep) = self.deployments.get_mut(&d)
                    {
                        dep.events
                            .push(true, "RestartFailed", format!("{name}: {e}"), now);
                    }
                    // It was shown Starting from the moment the restart was asked for; what it
                    // is now (still exited, or started after all) is the runtime's to say, at
                    // once rather than at the next resync.
                    self.spawn_list();
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
                            d.network_retry_at = now + 5_000;
                            self.wakeups.push(Reverse(d.network_retry_at));
                        }
                    }
                    self.dirty_deployments.insert(deployment);
                }
            }
        }
    }

    /// The runtime asks for a relist, as it does when a node returns: creations that failed
    /// because the runtime was unavailable are tried now rather than when their backoff ends (up
    /// to a minute later). Once per failure: the failure count stays, so a runtime that keeps
    /// failing still backs off further each time.
    fn unavailable_backoffs_end(&mut self) {
        let now = self.clock.now_ms();
        for (name, p) in &mut self.pools {
            if p.create_unavailable && p.create_backoff_until > now {
                p.create_unavailable = false;
                p.create_backoff_until = 0;
                self.dirty_pools.insert(name.clone());
            }
        }
        for (name, d) in &mut self.deployments {
            for b in d.create_backoff.values_mut() {
                if b.unavailable && b.until > now {
                    b.unavailable = false;
                    b.until = 0;
                    self.dirty_deployments.insert(name.clone());
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
            entry.create_unavailable = matches!(e, RuntimeError::Unavailable(_));
            // One failure per round of creations: the others of a round that fails together
            // (issued before the backoff began) do not lengthen it again.
            if !retry_now && entry.create_backoff_until <= now {
                entry.create_failures = entry.create_failures.saturating_add(1);
                let backoff = crate::create_backoff_ms(entry.create_failures);
                entry.create_backoff_until = now + backoff;
                self.wakeups.push(Reverse(now + backoff));
            }
        }
        if let Some((d, c, replica)) = rec.deployment.as_deref() {
            self.dirty_deployments.insert(d.clone());
            if let Some(dep) = self.deployments.get_mut(d) {
                // Its network may be gone (removed by hand, or by a deployment deleted
                // meanwhile): ensured again before the next creation.
                dep.network_ready = None;
                let error = format!("container {c}: {e}");
                dep.events.push(true, "CreateFailed", error.clone(), now);
                // The slot waits before it creates again (a missing image, a bind the daemon
                // refuses, a daemon restarting): no hot loop, as for pools.
                let slot = dep.create_backoff.entry((c.clone(), *replica)).or_insert(
                    crate::CreateBackoff {
                        hash: String::new(),
                        failures: 0,
                        until: 0,
                        error: String::new(),
                        unavailable: false,
                    },
                );
                if *slot.hash != *rec.hash {
                    slot.hash = rec.hash.to_string();
                    slot.failures = 0;
                }
                slot.failures = slot.failures.saturating_add(1);
                slot.until = now + crate::create_backoff_ms(slot.failures);
                slot.error = error;
                slot.unavailable = matches!(e, RuntimeError::Unavailable(_));
                self.wakeups.push(Reverse(slot.until));
            }
        }
        warn!(instance = %name, error = %e, "create failed");
    }

    pub(crate) fn start_reset(&mut self, instance: &str) {
        let Some(rec) = self.instances.get(instance) else {
            return;
        };
        if rec.phase == InstancePhase::Deleting || !rec.resetting {
            // Removed since the reset was scheduled (the removal waited for it), or no longer
            // to be reset.
            self.reset_ended(instance);
            return;
        }
        if let Some(work) = self.claim_work.get_mut(instance) {
            // Files still being copied in (or limits set) for the claim it served: they would
            // land after the reset, on the instance the next claim gets.
            debug!(instance, "its reset waits for the claim's work in flight");
            // Since the first time it waited (before a rebuild of the engine, say), and the
            // give-up due then, armed again each time (a spare wakeup is a pass that finds
            // nothing to do).
            let since = *work.reset_waits_since.get_or_insert(self.clock.now_ms());
            self.wakeups
                .push(Reverse(since + crate::CLAIM_WORK_WAIT_MS));
            return;
        }
        let Some(rec) = self.instances.get(instance) else {
            return;
        };
        let policy = rec
            .pool
            .as_ref()
            .and_then(|p| self.pools.get(p))
            .and_then(|p| p.spec.as_ref())
            .map(|s| (s.reset, s.reset_command.clone(), template_limits(s)));
        let Some((policy, command, restore)) = policy else {
            // The pool is gone: the instance is drained, not reset.
            self.reset_ended(instance);
            self.remove_instance(instance);
            return;
        };
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        let name = instance.to_owned();
        match policy {
            ResetPolicy::Recreate => {
                self.reset_ended(instance);
                self.retire(instance);
            }
            ResetPolicy::Restart => {
                tokio::spawn(async move {
                    let result = async {
                        restore_limits(&*rt, &name, restore).await?;
                        rt.restart(&name)
                            .await
                            .map_err(|e| ResetFailed::runtime("restart failed", e))?;
                        unbind_after_reset(&*rt, &name).await
                    }
                    .await;
                    let _ = tx.send(Input::Done(Completion::Reset { name, result }));
                });
            }
            ResetPolicy::Exec => {
                tokio::spawn(async move {
                    let result = async {
                        restore_limits(&*rt, &name, restore).await?;
                        let out = rt
                            .exec(&name, &command)
                            .await
                            .map_err(|e| ResetFailed::runtime("reset command failed", e))?;
                        if out.exit_code != 0 {
                            return Err(ResetFailed {
                                reason: format!(
                                    "reset command exited with {}: {}",
                                    out.exit_code,
                                    out.output.trim()
                                ),
                                down: false,
                            });
                        }
                        unbind_after_reset(&*rt, &name).await
                    }
                    .await;
                    let _ = tx.send(Input::Done(Completion::Reset { name, result }));
                });
            }
        }
    }
}

impl<R: Runtime> Engine<R> {
    /// Work on a claim's instance handed to the runtime (see `Engine::claim_work`).
    pub(crate) fn claim_work_began(&mut self, instance: &str) {
        self.claim_work
            .entry(instance.to_owned())
            .or_default()
            .in_flight += 1;
    }

    /// Work on a claim's instance answered: the last one starts the reset that waited for it.
    fn claim_work_ended(&mut self, instance: &str) {
        let Some(work) = self.claim_work.get_mut(instance) else {
            return;
        };
        work.in_flight = work.in_flight.saturating_sub(1);
        if work.in_flight > 0 {
            return;
        }
        let waits = work.reset_waits_since.is_some();
        self.claim_work.remove(instance);
        if waits {
            self.start_reset(instance);
        }
    }

    /// Resets that waited `CLAIM_WORK_WAIT_MS` for the claim's work give up on it: the
    /// instance is replaced, not reset (what the work may still write lands on an instance
    /// being removed), and the pool refills.
    /// An instance not listed yet (the engine was just rebuilt after a store outage) is left
    /// waiting: its reset starts, and waits again, once the listing finds it.
    pub(crate) fn give_up_waiting_resets(&mut self, now: u64) {
        let overdue: Vec<String> = (self.claim_work.iter())
            .filter(|(name, w)| {
                w.reset_waits_since
                    .is_some_and(|t| now >= t + crate::CLAIM_WORK_WAIT_MS)
                    && self.instances.contains_key(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in overdue {
            warn!(instance = %name, "the claim's work on it has not ended within 60 s; replacing it instead of resetting it");
            self.claim_work.remove(&name);
            self.reset_ended(&name);
            self.remove_instance(&name);
        }
    }

    /// Ends `claim`'s binding (it waits for another instance) without resetting `instance`:
    /// the caller decides what becomes of it.
    fn unbind_without_reset(
        &mut self,
        claim: &str,
        instance: &str,
        reason: &'static str,
        now: u64,
    ) {
        self.end_binding(claim, instance, RecPhase::Waiting, reason, now);
        self.after_commit
            .retain(|a| !matches!(a, AfterCommit::Reset { instance: i } if i == instance));
        self.reset_ended(instance);
    }

    /// Takes `instance` out of service, durably, until it is removed.
    fn quarantine(&mut self, instance: &str, reason: String) {
        if let Some(rec) = self.instances.get_mut(instance) {
            self.touched.insert(instance.to_owned());
            rec.quarantined = Some(reason.clone());
        }
        self.ops.push(Op::Quarantine {
            instance: instance.to_owned(),
            reason,
        });
        self.after_commit.push(AfterCommit::Quarantine {
            instance: instance.to_owned(),
        });
    }

    /// Records the quarantine on the instance (runtimes that keep bindings), once the store has
    /// it: a controller that loses its store keeps the instance out of service too.
    pub(crate) fn record_quarantine(&self, instance: &str) {
        if !self.rt.keeps_bindings() {
            return;
        }
        let rt = self.rt.clone();
        let instance = instance.to_owned();
        tokio::spawn(async move {
            if let Err(e) = rt.quarantine(&instance).await {
                warn!(%instance, error = %e, "could not record the quarantine on the instance");
            }
        });
    }
}

/// Why an instance is quarantined when only the instance says so (its label).
const RECORDED_QUARANTINE: &str = "quarantined before the controller lost its state store (the instance records it; the reason was in that store)";

/// The template's limits of the resources a pool lets claims change (`claimResources`): what a
/// reset that keeps the instance gives back. `None` when claims cannot change any.
pub(crate) fn template_limits(
    spec: &poolkeeper_kinds::PoolSpec,
) -> Option<(Option<u64>, Option<u64>)> {
    let bounded = spec.claim_resources.as_ref()?;
    let (cpu, memory) = spec.template.resources.clone().unwrap_or_default().limits();
    let cpu = cpu.filter(|_| bounded.cpu.is_some());
    let memory = memory.filter(|_| bounded.memory.is_some());
    (cpu.is_some() || memory.is_some()).then_some((cpu, memory))
}

/// Why a reset that keeps its instance failed.
#[derive(Debug)]
pub(crate) struct ResetFailed {
    /// What failed, as the quarantine and the pool's events say it.
    pub(crate) reason: String,
    /// The instance was down or gone, or its runtime unreachable (see [`says_only_down`]):
    /// nothing is known against the instance, which is replaced rather than quarantined.
    pub(crate) down: bool,
}

impl ResetFailed {
    fn runtime(step: &str, e: RuntimeError) -> ResetFailed {
        ResetFailed {
            down: says_only_down(&e),
            reason: format!("{step}: {e}"),
        }
    }
}

/// `e` says nothing against the instance but that it, or its runtime, is down or gone: what
/// failed on it (a reset, a copy of files) may work on a fresh one.
pub(crate) fn says_only_down(e: &RuntimeError) -> bool {
    matches!(
        e,
        RuntimeError::Unavailable(_) | RuntimeError::NotFound(_) | RuntimeError::NotRunning(_)
    )
}

/// Gives an instance its template's limits back, before the reset that keeps it.
async fn restore_limits<R: Runtime>(
    rt: &R,
    name: &str,
    limits: Option<(Option<u64>, Option<u64>)>,
) -> Result<(), ResetFailed> {
    let Some((cpu, memory)) = limits else {
        return Ok(());
    };
    rt.resize(name, cpu, memory)
        .await
        .map_err(|e| ResetFailed::runtime("restoring the template's resources failed", e))
}

/// A reset instance is fresh only once its runtime no longer records the claim it served.
async fn unbind_after_reset<R: Runtime>(rt: &R, name: &str) -> Result<u64, ResetFailed> {
    if !rt.keeps_bindings() {
        return Ok(0);
    }
    rt.bind(name, None)
        .await
        .map_err(|e| ResetFailed::runtime("clearing the binding after the reset failed", e))
}
