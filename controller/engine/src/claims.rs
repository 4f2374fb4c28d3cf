//! Claims: admission, queues, binding, release, and the files a bound claim carries.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use std::collections::BTreeSet;

use poolkeeper_core::claims::{
    ClaimFacts, PoolFacts, QUOTA_EXCEEDED, UserFacts, Verdict, admit, admit_next,
};
use poolkeeper_core::pool::InstancePhase;
use poolkeeper_kinds::{ClaimPhase, ClaimSpec, Object, Origin, Spec};
use poolkeeper_runtime::{RecordedBinding, Runtime};

use crate::durable::{self, Op, RecPhase};
use crate::handle::{ClaimBrief, ClaimChange, Completion, Creation, Input};
use crate::status::{self, Events};
use crate::{AfterCommit, ClaimEntry, Engine};

/// Lease timers kept beyond twice the claims before those of ended bindings are dropped.
const PRUNE_EXPIRIES_ABOVE: usize = 1024;

impl<R: Runtime> Engine<R> {
    /// See [`EngineHandle::create_claim`].
    pub(crate) fn create_claim(&mut self, claim: Object) -> Creation {
        let Spec::Claim(spec) = &claim.spec else {
            return Creation::Refused("NotAClaim", format!("{} is not a claim", claim.key()));
        };
        if let Some(existing) = self.claim_brief(&claim.name) {
            return Creation::Exists(existing);
        }
        if let Some((reason, message)) = self.refusal_of_new(spec) {
            return Creation::Refused(reason, message);
        }
        let now = self.clock.now_ms();
        self.apply_object(claim, now);
        Creation::Created
    }

    pub(crate) fn claim_brief(&self, name: &str) -> Option<ClaimBrief> {
        self.claims.get(name).map(|c| ClaimBrief {
            spec: c.spec.clone(),
            origin: c.origin.clone(),
        })
    }

    /// Why a new claim of `user` on `pool` would be refused now: the engine's own admission
    /// over the user's claims that are not over (in arrival order) followed by the new one.
    fn refusal_of_new(&self, spec: &ClaimSpec) -> Option<(&'static str, String)> {
        let new = poolkeeper_core::claims::ClaimFacts {
            name: "",
            pool: &spec.pool,
            user: &spec.user,
            bound: false,
            resources: spec.resources.as_ref(),
        };
        let verdict = match self.current_tally(&spec.user) {
            Some(mut admitted) => self.verdict_after(&new, &mut admitted),
            None => self.admit_claims_of(&spec.user, Some(new)).1.pop()?,
        };
        match verdict {
            Verdict::Refuse { reason, message } => Some((reason, message)),
            Verdict::Admit => None,
        }
    }

    /// The number of `user`'s claims admitted, when every one of them has its verdict (none
    /// waits for the next pass).
    fn current_tally(&self, user: &str) -> Option<u32> {
        if self.dirty_users.contains(user)
            || self
                .arrivals
                .iter()
                .any(|(_, n)| self.claims.get(n).is_some_and(|c| c.spec.user == user))
        {
            return None;
        }
        self.tallies.get(user).map(|t| t.admitted)
    }

    pub(crate) fn notify(&mut self, name: &str, phase: ClaimPhase) {
        if self.subscribers.is_empty() {
            return;
        }
        let at = Instant::now();
        let user = self
            .claims
            .get(name)
            .map(|c| c.spec.user.clone())
            .unwrap_or_default();
        self.subscribers.retain(|s| {
            s.send(ClaimChange {
                name: name.to_owned(),
                user: user.clone(),
                phase,
                at,
            })
            .is_ok()
        });
    }

    pub(crate) fn apply_claim(
        &mut self,
        name: String,
        spec: ClaimSpec,
        origin: Origin,
        generation: i64,
        now: u64,
    ) {
        let (files, files_error) = match self.config.resolve.claim_files(&spec, &origin) {
            // Most claims have no files: they share one empty list rather than allocate one each.
            Ok(f) if f.is_empty() => (self.no_files.clone(), None),
            Ok(f) => (Arc::new(f), None),
            Err(e) => (self.no_files.clone(), Some(e)),
        };
        if let Some((old_pool, old_user, seq, resized, relet)) = self.claims.get(&name).map(|c| {
            (
                c.spec.pool.clone(),
                c.spec.user.clone(),
                c.seq,
                c.spec.resources != spec.resources,
                c.spec.ttl != spec.ttl,
            )
        }) {
            let moved = old_pool != spec.pool || old_user != spec.user;
            if moved {
                // A claim moved to another pool or user: end its binding and queue it anew.
                self.unindex_claim(&name);
                if let Some(inst) = self.bound_instance(&name) {
                    self.end_binding(
                        &name,
                        &inst,
                        durable::RecPhase::Waiting,
                        "ClaimChanged",
                        now,
                    );
                    // end_binding queued it on the old pool; it is queued on the new one below.
                    self.dequeue(&name);
                }
                // The record follows (its arrival number stays), so that a restart knows the
                // claim for the same one.
                self.ops.push(Op::Admit {
                    claim: name.clone(),
                    pool: spec.pool.clone(),
                    user: Some(spec.user.clone()),
                });
            }
            if let Some(entry) = self.claims.get_mut(&name) {
                entry.spec = spec;
                entry.origin = origin;
                entry.generation = generation;
                entry.files = files;
                entry.files_error = files_error;
                entry.copy_failures = 0;
                entry.invalid = None;
                self.dirty_users.insert(old_user);
                self.dirty_pools.insert(old_pool);
            }
            if moved {
                // A claim whose binding ended for good stays ended wherever it moves (the store
                // would refuse to bind it again): it waits in no queue.
                if !self.ended_for_good(&name) {
                    self.index_claim(&name, seq);
                }
            } else {
                if resized {
                    self.resize_bound(&name, now);
                }
                if relet {
                    self.relet(&name, now);
                }
            }
            self.touch_claim(&name);
            return;
        }
        // New to this engine: known to the store (a restart), or admitted now. A claim deleted
        // earlier in this pass is new again: its record is only forgotten at the commit.
        let mut stored = if self.forgotten.contains(&name) {
            None
        } else {
            self.store.state().claims.get(&name).cloned()
        };
        if let Some(rec) = &stored
            && (rec.pool != spec.pool || rec.user.as_ref().is_some_and(|u| *u != spec.user))
        {
            // The record is another claim's: one of this name was deleted and this one declared
            // (for another user or pool) while this engine did not see it, or the deletion was
            // lost with a batch that waited for a flush. Its binding ends and its instance is
            // reset (at the first pass, once it is listed); this claim is admitted anew.
            warn!(
                claim = %name,
                stored_pool = %rec.pool,
                stored_user = rec.user.as_deref().unwrap_or("?"),
                "the stored record of this name belongs to an earlier claim; ending its binding"
            );
            if let Some(i) = &rec.instance {
                self.end_binding(&name, i, durable::RecPhase::Released, "NameReused", now);
            }
            self.forget_record(&name);
            stored = None;
        }
        let seq = match &stored {
            Some(rec) => rec.seq,
            None => {
                self.ops.push(Op::Admit {
                    claim: name.clone(),
                    pool: spec.pool.clone(),
                    user: Some(spec.user.clone()),
                });
                let s = self.next_seq;
                self.next_seq += 1;
                s
            }
        };
        let events = Events::default();
        let instance = stored.as_ref().and_then(|r| r.instance.clone());
        let entry = ClaimEntry {
            spec,
            origin,
            generation,
            seq,
            verdict: Verdict::Admit,
            files,
            files_error,
            copy_failures: 0,
            instance,
            files_pending: false,
            // Known to the store: it arrived before this engine started (and was counted as an
            // arrival then), not now.
            waited: stored.is_some(),
            queue_position: None,
            reported: ClaimPhase::Pending,
            phase_since: now,
            verdict_since: now,
            lost: None,
            invalid: None,
            events,
        };
        let terminal = stored.as_ref().is_some_and(|r| r.phase.ended());
        let arrived = stored.is_none();
        self.claims.insert(name.clone(), Box::new(entry));
        if !terminal {
            self.index_claim(&name, seq);
        }
        if arrived {
            // Numbered after every claim this engine knows: it comes last in its user's arrival
            // order, so its admission needs the user's tally, not all the user's claims.
            if let Some(c) = self.claims.get(&name) {
                self.dirty_pools.insert(c.spec.pool.clone());
            }
            self.arrivals.insert((seq, name));
        } else {
            self.touch_claim(&name);
        }
    }

    /// Whether the claim's binding has ended for good (released or expired), in the store or
    /// earlier in this batch. Not a claim of its name deleted earlier in the batch: the latest
    /// `Forget` of the name ends what comes before it.
    fn ended_for_good(&self, name: &str) -> bool {
        let in_batch = self.ops.iter().rev().find_map(|op| match op {
            Op::Unbind { claim, to } if claim == name => Some(to.ended()),
            Op::Forget { claim } if claim == name => Some(false),
            _ => None,
        });
        in_batch.unwrap_or_else(|| {
            let rec = self.store.state().claims.get(name);
            rec.is_some_and(|r| r.phase.ended())
        })
    }

    fn index_claim(&mut self, name: &str, seq: u64) {
        let Some(c) = self.claims.get(name) else {
            return;
        };
        if c.instance.is_none() {
            self.queues
                .entry(c.spec.pool.clone())
                .or_default()
                .insert((seq, name.to_owned()));
        }
        self.claims_by_pool
            .entry(c.spec.pool.clone())
            .or_default()
            .insert((seq, name.to_owned()));
        self.claims_by_user
            .entry(c.spec.user.clone())
            .or_default()
            .insert((seq, name.to_owned()));
    }

    pub(crate) fn unindex_claim(&mut self, name: &str) {
        self.dequeue(name);
        let Some(c) = self.claims.get(name) else {
            return;
        };
        let key = (c.seq, name.to_owned());
        if let Some(s) = self.claims_by_pool.get_mut(&c.spec.pool) {
            s.remove(&key);
            if s.is_empty() {
                self.claims_by_pool.remove(&c.spec.pool);
            }
        }
        if let Some(s) = self.claims_by_user.get_mut(&c.spec.user) {
            s.remove(&key);
            if s.is_empty() {
                self.claims_by_user.remove(&c.spec.user);
                self.tallies.remove(&c.spec.user);
            }
        }
    }

    /// A claim is over (deleted or expired) and leaves its user's claims; call before
    /// `unindex_claim`. Its user's other verdicts stay as they are when none of them waits for
    /// quota (fewer claims admitted cannot refuse one), so only its tally changes; otherwise
    /// the user is admitted again in full.
    pub(crate) fn claim_leaves(&mut self, name: &str) {
        let Some(c) = self.claims.get(name) else {
            return;
        };
        self.dirty_pools.insert(c.spec.pool.clone());
        let key = (c.seq, name.to_owned());
        let indexed = self
            .claims_by_user
            .get(&c.spec.user)
            .is_some_and(|s| s.contains(&key));
        if !indexed {
            // Over already (expired before it was deleted): it left then.
            return;
        }
        if self.arrivals.remove(&key) || self.dirty_users.contains(&c.spec.user) {
            // Not counted yet, or all counted again at the next pass.
            return;
        }
        match self.tallies.get_mut(&c.spec.user) {
            Some(t) if t.quota_refused == 0 => {
                if c.verdict == Verdict::Admit {
                    t.admitted = t.admitted.saturating_sub(1);
                }
                if cfg!(debug_assertions) {
                    self.counted_alone.insert(c.spec.user.clone());
                }
            }
            _ => {
                self.dirty_users.insert(c.spec.user.clone());
            }
        }
    }

    pub(crate) fn touch_claim(&mut self, name: &str) {
        if let Some(c) = self.claims.get(name) {
            self.dirty_users.insert(c.spec.user.clone());
            self.dirty_pools.insert(c.spec.pool.clone());
        }
    }

    /// The claim is declared and holds another instance (or none) than `recorded`, the one its
    /// store record names: the binding ended (or moved) in memory since the last commit.
    pub(crate) fn left_recorded_binding(&self, claim: &str, recorded: Option<&str>) -> bool {
        self.claims
            .get(claim)
            .is_some_and(|c| c.instance.as_deref() != recorded)
    }

    /// The instance a claim holds (or is being handed in this pass).
    pub(crate) fn bound_instance(&self, claim: &str) -> Option<String> {
        self.claims.get(claim).and_then(|c| c.instance.clone())
    }

    /// Puts a claim without an instance in its pool's queue (idempotent).
    pub(crate) fn enqueue(&mut self, claim: &str) {
        if let Some(c) = self.claims.get(claim) {
            self.queues
                .entry(c.spec.pool.clone())
                .or_default()
                .insert((c.seq, claim.to_owned()));
            self.dirty_pools.insert(c.spec.pool.clone());
        }
    }

    pub(crate) fn dequeue(&mut self, claim: &str) {
        if let Some(c) = self.claims.get(claim)
            && let Some(q) = self.queues.get_mut(&c.spec.pool)
        {
            q.remove(&(c.seq, claim.to_owned()));
            if q.is_empty() {
                self.queues.remove(&c.spec.pool);
            }
        }
    }

    /// Forgets the claim's store record at this pass's commit; until then it is stale, and a
    /// claim of this name declared again meanwhile is new.
    pub(crate) fn forget_record(&mut self, claim: &str) {
        self.ops.push(Op::Forget {
            claim: claim.to_owned(),
        });
        self.forgotten.insert(claim.to_owned());
    }

    /// Ends a claim's hold on `instance` (durably, in this pass's commit) and schedules the
    /// instance's reset for after the commit.
    pub(crate) fn end_binding(
        &mut self,
        claim: &str,
        instance: &str,
        to: durable::RecPhase,
        reason: &'static str,
        now: u64,
    ) {
        self.ops.push(Op::Unbind {
            claim: claim.to_owned(),
            to,
        });
        if let Some(p) = self.instances.get(instance).and_then(|r| r.pool.clone()) {
            self.dirty_pools.insert(p);
        }
        self.reset_released(instance);
        if let Some(c) = self.claims.get_mut(claim) {
            c.files_pending = false;
            c.instance = None;
            c.events
                .push(false, reason, format!("released instance {instance}"), now);
            if to == durable::RecPhase::Waiting {
                // It stays, unbound: admitted again, as a bound claim is admitted whatever its
                // pool, and a waiting one only on a declared pool within its user's quota.
                self.dirty_users.insert(c.spec.user.clone());
            }
        }
        if to == durable::RecPhase::Waiting {
            self.enqueue(claim);
        }
        self.to_report.insert(claim.to_owned());
        info!(claim, instance, reason, "binding ended");
    }

    /// `instance` is no claim's any more and may hold a claim's data: it is used, and reset
    /// (after this pass's commit) before anyone gets it. An instance being removed is not
    /// reset: a reset that makes it again (a pod's restart) would bring back what its removal
    /// took away. Nor is one whose reset is already scheduled or running: two restarts of one
    /// pod at once would each delete what the other made. Nor is one in quarantine: it is kept
    /// as it is, for inspection, and never bound again.
    pub(crate) fn reset_released(&mut self, instance: &str) {
        let Some(rec) = self.instances.get_mut(instance) else {
            if !self.started {
                // Not listed yet: reset once it is (see `startup`), or it would keep the claim's
                // data and the runtime's record of the claim for good.
                self.unlisted_resets.insert(instance.to_owned());
            }
            return;
        };
        rec.claim = None;
        rec.used = true;
        self.touched.insert(instance.to_owned());
        if rec.phase == InstancePhase::Deleting || rec.resetting || rec.quarantined.is_some() {
            return;
        }
        rec.resetting = true;
        self.after_commit.push(AfterCommit::Reset {
            instance: instance.to_owned(),
        });
    }

    /// A bound claim's `ttl` changed: its lease counts from its binding with the new length
    /// (at most its pool's `claimTTL`, or none when neither is set); one already past ends
    /// now.
    fn relet(&mut self, name: &str, now: u64) {
        let Some(rec) = self.store.state().claims.get(name) else {
            return;
        };
        let (RecPhase::Bound, Some(bound_at)) = (rec.phase, rec.bound_at_ms) else {
            return;
        };
        let was = rec.expires_at_ms;
        let Some(c) = self.claims.get_mut(name) else {
            return;
        };
        let pool_ttl =
            crate::pools::pool_ttl(self.pools.get(&c.spec.pool).and_then(|p| p.spec.as_ref()));
        // Not before the next pass: a timer due now would be taken for stale before this
        // batch records it.
        let expires =
            crate::pools::lease_expiry(&c.spec, pool_ttl, bound_at).map(|t| t.max(now + 1));
        if expires == was {
            return;
        }
        c.events.push(
            false,
            "LeaseChanged",
            match expires {
                Some(t) => format!(
                    "ttl changed: the lease now ends at {}",
                    crate::status::rfc3339(t)
                ),
                None => "ttl changed: the lease no longer ends".to_owned(),
            },
            now,
        );
        self.ops.push(Op::Lease {
            claim: name.to_owned(),
            expires_at_ms: expires,
        });
        if let Some(t) = expires {
            self.expiries.push(Reverse((t, name.to_owned())));
        }
        self.touch_claim(name);
    }

    /// A lease's timer stays until its time even when its binding ended earlier (released,
    /// deleted): with long leases and many claims they would pile up by the million. Once they
    /// outnumber the claims twice over, those of claims gone or ended are dropped.
    pub(crate) fn prune_expiries(&mut self) {
        if self.expiries.len() <= 2 * self.claims.len() + PRUNE_EXPIRIES_ABOVE {
            return;
        }
        let claims = &self.claims;
        let state = self.store.state();
        // A record deleted in this pass is not the claim's any more (one declared again under
        // its name, and maybe bound, is new): its timer is kept.
        let forgotten = &self.forgotten;
        self.expiries.retain(|Reverse((_, c))| {
            claims.contains_key(c)
                && (forgotten.contains(c) || state.claims.get(c).is_none_or(|r| !r.phase.ended()))
        });
    }

    pub(crate) fn expire(&mut self, now: u64) {
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
            // Nor is the lease of a binding that ended in memory and not yet in the store: the
            // claim left it earlier in this batch (moved to another pool; its instance lost, so
            // that it waits for a fresh one with a lease of its own, as when the loss comes in
            // an earlier batch).
            if self.left_recorded_binding(&claim, rec.instance.as_deref()) {
                continue;
            }
            if let Some(inst) = rec.instance {
                self.end_binding(&claim, &inst, RecPhase::Expired, "Expired", now);
                self.claim_leaves(&claim);
                self.unindex_claim(&claim);
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
    pub(crate) fn pending_report(&mut self, claim: &str) {
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
                resources: c.spec.resources.as_ref(),
            })
            .collect();
        facts.extend(new);
        let u = self.users.get(user);
        let verdicts = admit(
            &facts,
            |_| u.map(user_facts),
            |p| self.pools.get(p).and_then(|p| pool_facts(p)),
        );
        (facts, verdicts)
    }

    /// Admits all of `user`'s claims again, and counts its tally anew.
    pub(crate) fn admit_user(&mut self, user: &str) {
        let (facts, verdicts) = self.admit_claims_of(user, None);
        let tally = Tally::of(&verdicts);
        // Only the (rare) changes are collected, so a pass over a busy user allocates nothing.
        let changed: Vec<(String, Verdict)> = facts
            .iter()
            .zip(verdicts)
            .filter(|(f, v)| self.claims.get(f.name).is_some_and(|c| c.verdict != *v))
            .map(|(f, v)| (f.name.to_owned(), v))
            .collect();
        for (name, v) in changed {
            self.set_verdict(&name, v);
        }
        self.tallies.insert(user.to_owned(), tally);
    }

    /// Admits the claims that arrived since the last pass after all their user's others, each
    /// from its user's tally; `done` are the users admitted in full in this pass (their claims
    /// all have their verdicts). A user without a tally is admitted in full.
    pub(crate) fn admit_arrivals(&mut self, done: &mut BTreeSet<String>) {
        for (seq, name) in std::mem::take(&mut self.arrivals) {
            let Some(c) = self.claims.get(&name).filter(|c| c.seq == seq) else {
                continue;
            };
            if done.contains(&c.spec.user) {
                continue;
            }
            let Some(mut admitted) = self.tallies.get(&c.spec.user).map(|t| t.admitted) else {
                let user = c.spec.user.clone();
                self.admit_user(&user);
                done.insert(user);
                continue;
            };
            let facts = ClaimFacts {
                name: &name,
                pool: &c.spec.pool,
                user: &c.spec.user,
                bound: c.instance.is_some(),
                resources: c.spec.resources.as_ref(),
            };
            let v = if facts.bound {
                admitted += 1;
                Verdict::Admit
            } else {
                self.verdict_after(&facts, &mut admitted)
            };
            let changed = c.verdict != v;
            let user = c.spec.user.clone();
            if let Some(t) = self.tallies.get_mut(&user) {
                t.admitted = admitted;
                t.quota_refused += u32::from(is_quota_refusal(&v));
            }
            if changed {
                self.set_verdict(&name, v);
            }
            if cfg!(debug_assertions) {
                self.counted_alone.insert(user);
            }
        }
        if cfg!(debug_assertions) {
            for user in std::mem::take(&mut self.counted_alone) {
                self.check_tally(&user);
            }
        }
    }

    /// `admit_next` with this engine's user and pool.
    fn verdict_after(&self, c: &ClaimFacts<'_>, admitted: &mut u32) -> Verdict {
        admit_next(
            c,
            self.users.get(c.user).map(user_facts),
            self.pools.get(c.pool).and_then(|p| pool_facts(p)),
            admitted,
        )
    }

    /// In debug builds, after each admission: what was counted one claim at a time is what
    /// counting all of the user's claims again gives.
    fn check_tally(&self, user: &str) {
        let (facts, verdicts) = self.admit_claims_of(user, None);
        for (f, v) in facts.iter().zip(&verdicts) {
            let kept = self.claims.get(f.name).map(|c| &c.verdict);
            debug_assert_eq!(kept, Some(v), "claim {}'s verdict, counted alone", f.name);
        }
        let kept = self.tallies.get(user).copied();
        let want = (!facts.is_empty()).then(|| Tally::of(&verdicts));
        debug_assert!(
            kept == want || (want.is_none() && kept == Some(Tally::default())),
            "user {user}'s tally: kept {kept:?}, counted {want:?}"
        );
    }

    fn set_verdict(&mut self, name: &str, v: Verdict) {
        let now = self.clock.now_ms();
        let Some(c) = self.claims.get_mut(name) else {
            return;
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
        self.pending_report(name);
    }

    /// Files uploaded into a bound claim's instance (the API's upload).
    pub(super) fn put_claim_files(
        &mut self,
        claim: &str,
        user: Option<&str>,
        files: Vec<(String, Vec<u8>)>,
        reply: tokio::sync::oneshot::Sender<Result<usize, super::PutFilesError>>,
    ) {
        use super::PutFilesError;
        let Some(c) = self
            .claims
            .get(claim)
            .filter(|c| c.reported == ClaimPhase::Bound)
            .filter(|c| user.is_none_or(|u| u == c.spec.user))
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
        let tx = self.tx.clone();
        self.claim_work_began(&instance);
        tokio::spawn(async move {
            let n = files.len();
            let r = rt
                .put_files(&instance, &mount, &files)
                .await
                .map(|()| n)
                .map_err(|e| PutFilesError::Runtime(e.to_string()));
            let _ = reply.send(r);
            let _ = tx.send(Input::Done(Completion::Uploaded { instance }));
        });
    }

    pub(crate) fn start_bound(&mut self, claim: &str, instance: &str, now: u64) {
        let Some(c) = self.claims.get(claim) else {
            return;
        };
        // Only the binding the store holds: one that ended since it was scheduled (the claim
        // moved, or was bound elsewhere) must not be recorded on an instance being reset.
        if let Some(rec) = self.store.state().claims.get(claim)
            && (rec.phase != RecPhase::Bound || rec.instance.as_deref() != Some(instance))
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
        let record = self.rt.keeps_bindings();
        // When it was bound, recorded beside the claim: the later of two records of one claim
        // name is the claim's (see `settle_recorded_bindings`).
        let bound_at = self
            .store
            .state()
            .claims
            .get(claim)
            .and_then(|r| r.bound_at_ms)
            .unwrap_or(now);
        let resize = claim_limits(&c.spec);
        if c.files.is_empty() && keys.is_none() && !record && resize.is_none() {
            self.report_claim(claim, now);
            return;
        }
        let files = c.files.clone();
        let user = if record {
            c.spec.user.clone()
        } else {
            String::new()
        };
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
        self.claim_work_began(&instance);
        tokio::spawn(async move {
            // On runtimes that keep bindings, the instance records its claim before the claim
            // is reported Bound (and before anything is copied into it).
            let mut result = if record {
                let binding = RecordedBinding::new(&claim, &user, bound_at);
                rt.bind(&instance, Some(binding)).await.map(|_| ())
            } else {
                Ok(())
            };
            let mut step = "binding";
            if result.is_ok()
                && let Some((cpu, memory)) = resize
            {
                step = "resizing";
                result = rt.resize(&instance, cpu, memory).await;
            }
            if result.is_ok() {
                step = "copying files into";
            }
            if result.is_ok()
                && let Some(mount) = mount
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
                step,
                limits: resize,
                result,
            }));
        });
    }

    /// A bound claim's `resources` changed: its instance is resized in place, to the claim's
    /// limits, or to the template's for a resource the claim no longer gives. A change its pool
    /// does not allow is refused with an Event, and the instance keeps what it has. While the
    /// binding's own work is in flight, that work's completion calls this again.
    pub(crate) fn resize_bound(&mut self, claim: &str, now: u64) {
        let Some(c) = self.claims.get(claim) else {
            return;
        };
        let Some(instance) = c.instance.clone() else {
            return;
        };
        if c.files_pending {
            return;
        }
        let Some(spec) = self.pools.get(&c.spec.pool).and_then(|p| p.spec.as_ref()) else {
            return;
        };
        if let Some(r) = &c.spec.resources
            && let Err(message) = poolkeeper_core::claims::resources_within(
                r,
                spec.claim_resources.as_ref(),
                &c.spec.pool,
            )
        {
            let msg = format!("{message}; {instance} keeps the resources it has");
            if let Some(c) = self.claims.get_mut(claim) {
                c.events.push(true, "ResourcesNotAllowed", msg, now);
            }
            return;
        }
        let (template_cpu, template_memory) =
            crate::instances::template_limits(spec).unwrap_or_default();
        let (cpu, memory) = claim_limits(&c.spec).unwrap_or_default();
        let (cpu, memory) = (cpu.or(template_cpu), memory.or(template_memory));
        if cpu.is_none() && memory.is_none() {
            return;
        }
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        let claim = claim.to_owned();
        self.claim_work_began(&instance);
        tokio::spawn(async move {
            let result = rt.resize(&instance, cpu, memory).await;
            let _ = tx.send(Input::Done(Completion::Resized {
                claim,
                instance,
                cpu,
                memory,
                result,
            }));
        });
    }

    /// Whether binding `claim` has work to do on the instance before it is reported Bound:
    /// files or SSH keys to copy, or the binding to record (runtimes that keep bindings).
    pub(crate) fn needs_copy(&self, claim: &str) -> bool {
        self.claims.get(claim).is_some_and(|c| {
            self.rt.keeps_bindings()
                || !c.files.is_empty()
                || c.spec.resources.is_some()
                || self
                    .pools
                    .get(&c.spec.pool)
                    .and_then(|p| p.spec.as_ref())
                    .is_some_and(|s| s.template.ssh.is_some())
        })
    }
}

/// The cpu (millicores) and memory (bytes) limits a claim gives its instance, if any (admission
/// has checked them against the pool's `claimResources`).
pub(crate) fn claim_limits(spec: &ClaimSpec) -> Option<(Option<u64>, Option<u64>)> {
    let (cpu, memory) = spec.resources.as_ref()?.limits();
    (cpu.is_some() || memory.is_some()).then_some((cpu, memory))
}

/// What the last admission of a user's claims gave, kept exact between full admissions by the
/// changes that do not call for one: a claim arriving after all the user's others, and a claim
/// leaving while none of the user's waits for quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Claims admitted (bound ones among them): what a claim arriving next counts against quota.
    pub(crate) admitted: u32,
    /// Claims refused because the quota is full.
    pub(crate) quota_refused: u32,
}

impl Tally {
    fn of(verdicts: &[Verdict]) -> Tally {
        let mut t = Tally::default();
        for v in verdicts {
            match v {
                Verdict::Admit => t.admitted += 1,
                v => t.quota_refused += u32::from(is_quota_refusal(v)),
            }
        }
        t
    }
}

fn user_facts(u: &crate::UserEntry) -> UserFacts<'_> {
    UserFacts {
        disabled: u.spec.disabled,
        max_claims: u.spec.quota.max_claims,
        pools: &u.spec.quota.pools,
    }
}

fn pool_facts(p: &crate::PoolEntry) -> Option<PoolFacts<'_>> {
    let spec = p.spec.as_ref()?;
    Some(PoolFacts {
        claim_resources: spec.claim_resources.as_ref(),
    })
}

fn is_quota_refusal(v: &Verdict) -> bool {
    matches!(v, Verdict::Refuse { reason, .. } if *reason == QUOTA_EXCEEDED)
}
