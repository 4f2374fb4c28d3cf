//! The reconcile pass: what changed is reconciled, the pass's durable ops are committed, then
//! reported.

use std::cmp::Reverse;
use std::collections::HashSet;

use tracing::{error, info, warn};

use poolkeeper_core::pool::InstancePhase;
use poolkeeper_runtime::Runtime;
use poolkeeper_store::Flush;

use crate::durable::{Op, RecPhase, needs_flush};
use crate::{AfterCommit, Engine, status};

/// Counts `n` reconciles of a kind and the time they took (a pass with none is not timed).
fn observe(m: &mut super::metrics::KindMetrics, n: u64, began: std::time::Instant) {
    if n > 0 {
        m.reconciles += n;
        m.duration.observe(began.elapsed().as_secs_f64());
    }
}

impl<R: Runtime> Engine<R> {
    pub(super) fn pass(&mut self) {
        let now = self.clock.now_ms();
        if self.store_down.is_some() {
            self.probe_store(now);
            return;
        }
        if !(self.synced && self.listed) {
            return;
        }
        if !self.started {
            self.started = true;
            self.startup(now);
            for w in std::mem::take(&mut self.started_waiters) {
                let _ = w.send(());
            }
        }
        self.expire(now);
        let began = std::time::Instant::now();
        let mut users = std::mem::take(&mut self.dirty_users);
        let n = users.len() as u64;
        for u in &users {
            self.admit_user(u);
        }
        self.admit_arrivals(&mut users);
        observe(&mut self.metrics.user, n, began);
        self.reindex_touched();
        self.autoscale_tick(now);
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

    /// The time of a binding made now: later than every binding before it, here or recorded
    /// (the clock may not have moved, or may be behind another controller's), so that of two
    /// records of one claim name the later is the claim's (see `settle_recorded_bindings`).
    pub(crate) fn bind_stamp(&mut self, now: u64) -> u64 {
        let at = now.max(self.last_bound_at + 1);
        self.last_bound_at = at;
        at
    }

    /// After a (re)start: drop records of claims deleted while we were down, notice bindings
    /// whose instance vanished, and start expiry timers.
    fn startup(&mut self, now: u64) {
        let latest_stored = self
            .store
            .state()
            .claims
            .values()
            .filter_map(|r| r.bound_at_ms);
        let latest_recorded = self
            .instances
            .values()
            .filter_map(|r| r.recorded.as_ref()?.at);
        self.last_bound_at = latest_stored
            .chain(latest_recorded)
            .fold(self.last_bound_at, u64::max);
        for i in std::mem::take(&mut self.unlisted_resets) {
            if self.instances.get(&i).is_some_and(|r| r.claim.is_none()) {
                self.reset_released(&i);
            }
        }
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
            // A claim changed since its record was written (moved to another pool before this
            // first pass): its binding ended in memory and ends in the store at this pass's
            // commit. The record is stale; the claim is queued on its new pool already.
            if self.left_recorded_binding(&claim, instance.as_deref()) {
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
                            c.lost = Some(Box::new((msg.clone(), now)));
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
        self.settle_recorded_bindings(now);
        // Quarantined or used instances that were removed while we were down, and the gone
        // instances of the bindings that this pass ends (each end marks its instance used, and
        // nothing will ever report these removed): pushed after those ends, so applied after.
        let st = self.store.state();
        let gone = |i: &&String| !self.instances.contains_key(*i);
        let unquarantine = st
            .quarantined
            .keys()
            .filter(gone)
            .map(|i| Op::Unquarantine {
                instance: i.clone(),
            });
        let recorded = st.claims.values().filter_map(|r| r.instance.as_ref());
        let fresh = st
            .used
            .iter()
            .chain(recorded)
            .filter(gone)
            .map(|i| Op::Fresh {
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

    /// The bindings a runtime records on its instances (the pod runtime), against the store:
    /// one the store lost (a new pod with an empty disk) is adopted, durably, before anything is
    /// reported; one whose claim is gone, or bound elsewhere, has its instance reset.
    fn settle_recorded_bindings(&mut self, now: u64) {
        if !self.rt.keeps_bindings() {
            return;
        }
        let st = self.store.state();
        let mut stale = Vec::new();
        let mut adopt = Vec::new();
        // A claim is adopted by one instance only: a second that records it too (a binding
        // moved on, or the claim was deleted and declared again, while the controller died
        // before the old record was cleared) is stale. The latest binding is the claim's: the
        // records are taken latest first.
        let mut adopted = HashSet::new();
        let mut recorded: Vec<(&crate::InstRec, &crate::Recorded)> = self
            .instances
            .values()
            .filter_map(|r| Some((&**r, &**r.recorded.as_ref()?)))
            .collect();
        recorded.sort_by(|(a, ra), (b, rb)| rb.at.cmp(&ra.at).then_with(|| a.name.cmp(&b.name)));
        for (r, rec) in recorded {
            // Quarantined: kept as it is, for inspection, never bound again.
            if r.resetting || r.phase == InstancePhase::Dead || r.quarantined.is_some() {
                continue;
            }
            let claim = &rec.claim;
            let record = st.claims.get(claim);
            match record.and_then(|c| c.instance.as_ref()) {
                Some(i) if *i == r.name => {}
                Some(_) => stale.push(r.name.clone()),
                // A claim deleted while the controller started (and perhaps declared again) is
                // not the one the instance records: the instance may hold its data. Nor is one
                // moved since to another pool or user (an instance records its claim's user; one
                // bound by an earlier version does not), nor one whose binding ended for good
                // (released or expired: the store would refuse to bind it again).
                None => match self.claims.get(claim) {
                    Some(c)
                        if c.instance.is_none()
                            && !self.forgotten.contains(claim)
                            && record.is_none_or(|x| x.phase == RecPhase::Waiting)
                            && r.claim.is_none()
                            && r.pool.as_deref() == Some(c.spec.pool.as_str())
                            && rec.user.as_deref().is_none_or(|u| u == c.spec.user)
                            && !st.bound.contains_key(&r.name)
                            && !st.used.contains(&r.name)
                            && adopted.insert(claim.clone()) =>
                    {
                        adopt.push((claim.clone(), r.name.clone(), record.is_none()))
                    }
                    _ => stale.push(r.name.clone()),
                },
            }
        }
        for i in stale {
            info!(instance = %i, "the claim its runtime records is gone or bound elsewhere: resetting it");
            self.reset_released(&i);
        }
        for (claim, instance, admit) in adopt {
            self.adopt_recorded(&claim, &instance, admit, now);
        }
    }

    /// Binds `claim` to the instance that records it, as the matching would have.
    fn adopt_recorded(&mut self, claim: &str, instance: &str, admit: bool, now: u64) {
        let copy = self.needs_copy(claim);
        let Some(c) = self.claims.get_mut(claim) else {
            return;
        };
        if admit {
            self.ops.push(Op::Admit {
                claim: claim.to_owned(),
                pool: c.spec.pool.clone(),
                user: Some(c.spec.user.clone()),
            });
        }
        // The lease starts again from now: when it began was on the lost disk only.
        let pool = self.pools.get(&c.spec.pool).and_then(|p| p.spec.as_ref());
        let expires = crate::pools::lease_expiry(&c.spec, crate::pools::pool_ttl(pool), now);
        c.instance = Some(instance.to_owned());
        c.files_pending = copy;
        c.queue_position = None;
        c.events.push(
            false,
            "BindingRecovered",
            format!("bound to {instance}, as the instance records (the state store did not)"),
            now,
        );
        let at_ms = self.bind_stamp(now);
        self.ops.push(Op::Bind {
            claim: claim.to_owned(),
            instance: instance.to_owned(),
            at_ms,
            expires_at_ms: expires,
            hit: true,
        });
        if let Some(t) = expires {
            self.expiries.push(Reverse((t, claim.to_owned())));
        }
        if let Some(r) = self.instances.get_mut(instance) {
            r.claim = Some(claim.to_owned());
            self.touched.insert(instance.to_owned());
        }
        self.dequeue(claim);
        self.after_commit.push(AfterCommit::Bound {
            claim: claim.to_owned(),
            instance: instance.to_owned(),
        });
        info!(claim, instance, "binding recovered from the runtime");
    }

    pub(crate) fn ensure_draining_pool(&mut self, pool: &str, now: u64) {
        if !self.pools.contains_key(pool) {
            let mut events = status::Events::default();
            events.push(
                false,
                "Draining",
                "instances found for an undeclared pool: removing unbound ones".into(),
                now,
            );
            let mut entry = super::PoolEntry::new(Default::default(), 0, std::sync::Arc::from(""));
            entry.events = events;
            self.pools.insert(pool.to_owned(), Box::new(entry));
        }
    }

    pub(crate) fn ensure_draining_deployment(&mut self, dep: &str, _now: u64) {
        if !self.deployments.contains_key(dep) {
            self.deployments.insert(
                dep.to_owned(),
                super::DeploymentEntry::new(Default::default(), 0),
            );
        }
    }

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
            if self.store.compaction_failures() > self.compaction_failures_told {
                self.compaction_failures_told = self.store.compaction_failures();
                if let Some(e) = self.store.last_compaction_error() {
                    warn!(
                        error = %crate::storedown::cause(e),
                        failures = self.compaction_failures_told,
                        "state store: compaction failed; the log grows until it succeeds"
                    );
                }
            }
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
                Err(e) => {
                    // Memory may be ahead of disk: nothing of this pass is acted on or reported.
                    self.store_failed(&e, now);
                    return;
                }
            }
        }
        if !self.flush_deferred(now) {
            return;
        }
        self.forgotten.clear();
        let work = std::mem::take(&mut self.after_commit);
        for w in work {
            match w {
                AfterCommit::Bound { claim, instance } => {
                    self.start_bound(&claim, &instance, now);
                }
                AfterCommit::Reset { instance } => self.start_reset(&instance),
                AfterCommit::Quarantine { instance } => self.record_quarantine(&instance),
            }
        }
        for c in std::mem::take(&mut self.to_report) {
            self.report_claim(&c, now);
        }
    }

    /// Flushes batches written without a flush once the oldest has waited `DEFERRED_FLUSH_MS`
    /// (a flushed commit has covered them otherwise), and asks for a pass at that time. False
    /// when the flush failed.
    fn flush_deferred(&mut self, now: u64) -> bool {
        if !self.store.has_unflushed() {
            self.deferred_since_ms = None;
            return true;
        }
        let since = *self.deferred_since_ms.get_or_insert_with(|| {
            self.wakeups.push(Reverse(now + super::DEFERRED_FLUSH_MS));
            now
        });
        if now.saturating_sub(since) < super::DEFERRED_FLUSH_MS {
            return true;
        }
        let began = std::time::Instant::now();
        if let Err(e) = self.store.flush() {
            self.store_failed(&e, now);
            return false;
        }
        self.metrics
            .store_commit
            .observe(began.elapsed().as_secs_f64());
        self.deferred_since_ms = None;
        true
    }
}
