//! A state store that cannot write (a full disk, a failing device). Memory may then be ahead
//! of disk, so the engine acts on nothing more and reports nothing new: instances keep running
//! and bound claims stay bound (nothing is removed or reset), new claims are refused with the
//! cause, and `/readyz` says why. Once a second it tries whether the state folder takes a write
//! again; when it does, the engine starts again from what is on disk, as a restart would
//! (what was acknowledged is there; what was not, a failed batch, is not), keeping what the
//! source declared and whoever follows its claims.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use tracing::{error, info, warn};

use poolkeeper_kinds::{Object, Origin, Spec};
use poolkeeper_runtime::Runtime;
use poolkeeper_store::StoreError;

use crate::{ClaimEntry, DeploymentEntry, Engine, PoolEntry, UserEntry};

/// How often a store that failed is tried again.
pub(crate) const PROBE_EVERY_MS: u64 = 1_000;
#[derive(Debug, Clone)]
pub(crate) struct StoreDown {
    /// The write that failed, and why (`No space left on device`, say).
    pub(crate) error: String,
    pub(crate) since_ms: u64,
    next_probe_ms: u64,
    /// The probe succeeded and the store was read again: the engine is to be rebuilt from it.
    pub(crate) back: bool,
}

/// The failure itself (not the poisoning that follows it), with its causes: `write
/// DIR/wal-0.log: No space left on device (os error 28)`.
pub(crate) fn cause(e: &StoreError) -> String {
    let e: &(dyn std::error::Error + 'static) = match e {
        StoreError::Poisoned { cause, .. } => &**cause,
        other => other,
    };
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl<R: Runtime> Engine<R> {
    /// A commit or flush failed: the pass stops here, and so does everything a commit would
    /// have allowed (bindings started, statuses reported).
    pub(crate) fn store_failed(&mut self, e: &StoreError, now: u64) {
        let error = cause(e);
        error!(
            %error,
            "state store cannot write: new claims are refused and nothing is changed until it can (tried again every second)"
        );
        self.ops.clear();
        self.after_commit.clear();
        self.to_report.clear();
        self.metrics.store_failures += 1;
        self.store_down = Some(StoreDown {
            error,
            since_ms: now,
            next_probe_ms: now + PROBE_EVERY_MS,
            back: false,
        });
        self.wakeups.push(Reverse(now + PROBE_EVERY_MS));
    }

    /// While the store is down, once a second: whether the state folder takes a write again,
    /// and if so the store read again from disk (then `back` is set).
    pub(crate) fn probe_store(&mut self, now: u64) {
        let Some(down) = self.store_down.as_mut() else {
            return;
        };
        if down.back || now < down.next_probe_ms {
            return;
        }
        down.next_probe_ms = now + PROBE_EVERY_MS;
        self.wakeups.push(Reverse(now + PROBE_EVERY_MS));
        if self.store.probe_writable().is_err() {
            return;
        }
        match self.store.reopen() {
            Ok(()) => {
                if let Some(down) = self.store_down.as_mut() {
                    down.back = true;
                }
            }
            Err(e) => {
                warn!(error = %e, "state store: the folder takes writes, but reading the store again failed")
            }
        }
    }

    /// The engine started again from the store just read: the source's declared objects, the
    /// diagnostics, the subscribers, the counters and the runtime operations still in flight
    /// are kept; everything derived is derived again (the runtime listed, the store's records
    /// matched with what runs, as at a start).
    pub(crate) fn rebuilt(self) -> Self {
        let Engine {
            rt,
            store,
            tx,
            clock,
            config,
            tokens,
            subscribers,
            metrics,
            pools,
            claims,
            users,
            deployments,
            diagnostics,
            list_epoch,
            recently_gone,
            creates_in_flight,
            claim_work,
            log_followers,
            synced,
            started_at_ms,
            store_down,
            ..
        } = self;
        for (_, follower) in log_followers {
            follower.abort();
        }
        let mut fresh = Engine::new(rt, store, tx, clock, config, tokens);
        fresh.subscribers = subscribers;
        fresh.metrics = metrics;
        fresh.diagnostics = diagnostics;
        fresh.list_epoch = list_epoch;
        fresh.recently_gone = recently_gone;
        fresh.creates_in_flight = creates_in_flight;
        // Answers still to come: a reset must wait for the work they end, as before, and no
        // longer than it would have (`start_reset` arms the give-up from when it first waited,
        // once the listing has found the instance).
        fresh.claim_work = claim_work;
        fresh.started_at_ms = started_at_ms;
        let now = fresh.clock.now_ms();
        for obj in declared(pools, claims, users, deployments) {
            fresh.apply_object(obj, now);
        }
        fresh.synced = synced;
        fresh.spawn_list();
        let down_ms = store_down
            .map(|d| now.saturating_sub(d.since_ms))
            .unwrap_or(0);
        info!(
            down_ms,
            "state store writable again: the engine started again from it"
        );
        fresh
    }
}

/// What the source declares, as it declared it (each entry keeps its last valid spec, origin
/// and generation), in key order: what the engine starts again from. Rebuilt from the entries
/// rather than kept beside them, which doubled the memory the declared objects take.
fn declared(
    pools: BTreeMap<String, Box<PoolEntry>>,
    claims: HashMap<String, Box<ClaimEntry>>,
    users: BTreeMap<String, UserEntry>,
    deployments: BTreeMap<String, DeploymentEntry>,
) -> Vec<Object> {
    let object = |name: String, spec: Spec, origin: Origin, generation: i64| Object {
        name,
        spec,
        origin,
        generation,
    };
    let mut all: Vec<Object> = pools
        .into_iter()
        .filter_map(|(n, p)| Some(object(n, Spec::Pool(p.spec?), p.origin, p.generation)))
        .chain(
            claims
                .into_iter()
                .map(|(n, c)| object(n, Spec::Claim(c.spec), c.origin, c.generation)),
        )
        .chain(
            users
                .into_iter()
                .map(|(n, u)| object(n, Spec::User(u.spec), u.origin, u.generation)),
        )
        .chain(deployments.into_iter().filter_map(|(n, d)| {
            Some(object(n, Spec::Deployment(d.spec?), d.origin, d.generation))
        }))
        .collect();
    all.sort_by_key(Object::key);
    all
}
