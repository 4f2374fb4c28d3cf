//! The Kubernetes source: one task that watches the four kinds (kube-runtime's watcher: relists
//! after `410 Gone`, backs off on errors, bookmarks), tells the engine what is declared, writes
//! status back, and holds deleted objects with a finalizer until their cleanup is done.
//!
//! - Level-triggered: a relist is diffed against what the source knew (an object missing from
//!   it was deleted meanwhile), and every status is compared again each second, so a missed
//!   event or write costs latency only.
//! - Status: server-side apply on `/status`, only when it changed, at most one patch in flight
//!   per object; what changed meanwhile is written after it (the newest wins). A claim's phase
//!   change is written at once.
//! - An object the controller cannot take (invalid beyond what admission checks, or a name
//!   another namespace declared first) gets `SpecValid=False` naming the field, and an Event; it
//!   never stops the others. An object that turns invalid keeps its last valid version, as a file
//!   does.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use poolkeeper_engine::source::{Health, SourceEvent, UserToken};
use poolkeeper_engine::{ClaimChange, EngineHandle};
use poolkeeper_kinds::{Diagnostic, Kind, ObjKey, Spec};

use crate::objects::{self, FINALIZER, Seen, has_finalizer};
use crate::writes::{Writer, is_status};
use crate::{Owner, Shared};

/// How often every status is compared with what was written (a change the engine did not
/// announce, such as a pool's counts, waits at most this long).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How often deletions waiting for their cleanup are looked at.
const CLEANUP_EVERY: Duration = Duration::from_millis(200);

/// Where the source watches.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The namespaces watched; empty: all of them.
    pub namespaces: Vec<String>,
    /// How often Secrets referred to by users are read again.
    pub resync: Duration,
}

/// `(kind, namespace, name)`: one custom resource.
type Key = (Kind, String, String);

fn obj_key(k: &Key) -> ObjKey {
    ObjKey::new(k.0, k.2.clone())
}

/// The engine's events of one object recorded as Kubernetes Events: (reason, message) ->
/// (time, count) as last recorded.
type Mirrored = HashMap<(String, String), (String, u32)>;

/// What a write task reports back.
enum Done {
    Status {
        key: Key,
        written: Value,
        result: Result<(), kube::Error>,
    },
    Finalizer {
        key: Key,
        /// Added (else removed).
        added: bool,
        result: Result<(), kube::Error>,
    },
}

/// A deleted object waiting for its cleanup before its finalizer goes.
struct Cleanup {
    /// For a claim: the instance it held, which must be reset first.
    instance: Option<String>,
}

struct Source {
    handle: EngineHandle,
    writer: Writer,
    shared: Shared,
    health: Health,
    /// Every custom resource seen, by (kind, namespace, name).
    seen: HashMap<Key, Seen>,
    /// Per watch stream (kind, scope): the keys its current relist has shown.
    listing: HashMap<(Kind, usize), HashSet<Key>>,
    /// The claims of a list in progress, held until it ends so that they reach the engine in the
    /// order they were created: a controller without its state store (a new disk) numbers
    /// waiting claims in the order it first sees them, and the API server lists by name.
    listed_claims: HashMap<usize, Vec<Seen>>,
    /// Watch streams that finished their first list.
    synced_streams: HashSet<(Kind, usize)>,
    streams: usize,
    synced: bool,
    /// Objects handed to the engine, and the namespace of each.
    given: HashMap<ObjKey, String>,
    /// Objects (valid or not) whose status is to be compared and maybe written.
    dirty: BTreeSet<Key>,
    /// Status last written, per object.
    written: HashMap<Key, Value>,
    in_flight: HashSet<Key>,
    /// Finalizer patches in flight.
    patching: HashSet<Key>,
    /// Objects whose finalizer could not be added (a 429, a 5xx, a timeout): tried again at
    /// the next status tick. Nothing else would: the watch brings nothing new.
    finalizer_retry: HashSet<Key>,
    /// Events mirrored so far, per object: (reason, message) -> (time, count).
    mirrored: HashMap<Key, Mirrored>,
    /// Problems already reported as an Event, per object and generation.
    reported: HashSet<(Key, i64, String)>,
    cleanups: HashMap<Key, Cleanup>,
    /// Status writes the API server refused, warned of once each.
    refusals: HashSet<(Key, String)>,
    /// Why the engine does not hold an object, and since when (its condition's transition).
    refused: HashMap<Key, (String, String, String)>,
    done_tx: mpsc::UnboundedSender<Done>,
}

/// Watches the custom resources in `options.namespaces` and keeps the engine's view equal to
/// them. Returns once every kind was listed and handed to the engine; the source then runs in
/// the returned task.
pub async fn run(
    client: Client,
    handle: EngineHandle,
    writer: Writer,
    shared: Shared,
    health: Health,
    options: Options,
) -> Result<tokio::task::JoinHandle<()>, crate::Error> {
    let scopes: Vec<Option<String>> = if options.namespaces.is_empty() {
        vec![None]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let mut streams = Vec::new();
    for kind in Kind::ALL {
        for (i, scope) in scopes.iter().enumerate() {
            let ar = objects::api_resource(kind);
            let api: Api<DynamicObject> = match scope {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            let s = watcher(api).map(move |ev| (kind, i, ev)).boxed();
            streams.push(s);
        }
    }
    let streams_n = streams.len();
    let mut events = futures::stream::select_all(streams);
    let mut changes = handle.subscribe()?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut src = Source {
        handle,
        writer,
        shared,
        health,
        seen: HashMap::new(),
        listing: HashMap::new(),
        listed_claims: HashMap::new(),
        synced_streams: HashSet::new(),
        streams: streams_n,
        synced: false,
        given: HashMap::new(),
        dirty: BTreeSet::new(),
        written: HashMap::new(),
        in_flight: HashSet::new(),
        patching: HashSet::new(),
        finalizer_retry: HashSet::new(),
        mirrored: HashMap::new(),
        reported: HashSet::new(),
        cleanups: HashMap::new(),
        refused: HashMap::new(),
        refusals: HashSet::new(),
        done_tx,
    };
    // The first lists: handed to the engine before this returns.
    while !src.synced {
        let Some((kind, scope, ev)) = events.next().await else {
            return Err(crate::Error::WatchEnded);
        };
        src.on_watch(kind, scope, ev).await;
    }
    info!(
        objects = src.given.len(),
        "custom resources loaded; watching for changes"
    );
    let resync = options.resync.max(Duration::from_secs(1));
    Ok(tokio::spawn(async move {
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        let mut cleanup_tick = tokio::time::interval(CLEANUP_EVERY);
        let mut secrets_tick = tokio::time::interval(resync);
        secrets_tick.tick().await;
        loop {
            tokio::select! {
                ev = events.next() => {
                    let Some((kind, scope, ev)) = ev else { break };
                    src.on_watch(kind, scope, ev).await;
                }
                change = changes.recv() => {
                    let Some(change) = change else { break };
                    src.on_claim_change(&change);
                    // A burst of changes is written in one round.
                    while let Ok(c) = changes.try_recv() {
                        src.on_claim_change(&c);
                    }
                    src.write_statuses(Some(Kind::Claim)).await;
                }
                done = done_rx.recv() => {
                    let Some(done) = done else { break };
                    src.on_done(done);
                    while let Ok(d) = done_rx.try_recv() {
                        src.on_done(d);
                    }
                }
                _ = status_tick.tick() => {
                    src.retry_finalizers();
                    src.mark_all_dirty();
                    src.write_statuses(None).await;
                }
                _ = cleanup_tick.tick(), if !src.cleanups.is_empty() => {
                    src.check_cleanups().await;
                }
                _ = secrets_tick.tick() => {
                    src.reread_secrets().await;
                }
            }
        }
        debug!("the Kubernetes source stopped");
    }))
}

/// kube-runtime's watcher with its default backoff (errors are yielded, then retried).
fn watcher(
    api: Api<DynamicObject>,
) -> impl Stream<Item = Result<WatchEvent<DynamicObject>, watcher::Error>> + Send {
    watcher::watcher(api, watcher::Config::default()).default_backoff()
}

impl Source {
    async fn on_watch(
        &mut self,
        kind: Kind,
        scope: usize,
        ev: Result<WatchEvent<DynamicObject>, watcher::Error>,
    ) {
        let ev = match ev {
            Ok(ev) => {
                if self.health.problem().is_some() {
                    info!("the Kubernetes API server answers again");
                }
                self.health.ok();
                ev
            }
            // `410 Gone` (the resource version expired): the watcher lists again by itself.
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                debug!(kind = %kind, "the watch's resource version expired; listing again");
                return;
            }
            Err(e) => {
                let why = format!("watching {kind}s: {e}");
                if self.health.problem().as_deref() != Some(why.as_str()) {
                    warn!(server = %self.shared.server, error = %e, "{why}; retrying");
                }
                self.health.failing(why);
                return;
            }
        };
        match ev {
            WatchEvent::Init => {
                self.listing.insert((kind, scope), HashSet::new());
                if kind == Kind::Claim {
                    self.listed_claims.remove(&scope);
                }
            }
            WatchEvent::InitApply(obj) => {
                let seen = objects::read(kind, &obj);
                let key: Key = (kind, seen.namespace.clone(), seen.name.clone());
                self.listing.entry((kind, scope)).or_default().insert(key);
                if kind == Kind::Claim {
                    self.listed_claims.entry(scope).or_default().push(seen);
                } else {
                    self.on_apply(seen).await;
                }
            }
            WatchEvent::InitDone => {
                if kind == Kind::Claim {
                    let mut claims = self.listed_claims.remove(&scope).unwrap_or_default();
                    claims.sort_by(|a, b| a.age_order().cmp(&b.age_order()));
                    for seen in claims {
                        self.on_apply(seen).await;
                    }
                }
                // What the relist did not show was deleted while the watch was away.
                let listed = self.listing.remove(&(kind, scope)).unwrap_or_default();
                let gone: Vec<Key> = self
                    .seen
                    .keys()
                    .filter(|k| k.0 == kind && !listed.contains(*k) && self.in_scope(scope, k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.on_gone(&key);
                }
                self.synced_streams.insert((kind, scope));
                if !self.synced && self.synced_streams.len() == self.streams {
                    self.synced = true;
                    let _ = self.handle.send(SourceEvent::Synced);
                }
            }
            WatchEvent::Apply(obj) => {
                let seen = objects::read(kind, &obj);
                self.on_apply(seen).await;
            }
            WatchEvent::Delete(obj) => {
                let seen = objects::read(kind, &obj);
                let key: Key = (kind, seen.namespace, seen.name);
                self.on_gone(&key);
            }
        }
    }

    /// Adds our finalizer to `seen` (not being deleted) if it lacks it and no patch of its
    /// finalizers is under way.
    fn ensure_finalizer(&mut self, key: &Key, seen: &Seen) {
        if !has_finalizer(seen.kind)
            || seen.deleting
            || seen.finalizers.iter().any(|f| f == FINALIZER)
            || self.patching.contains(key)
        {
            return;
        }
        self.patch_finalizer(key.clone(), seen.clone(), true);
    }

    /// Adds (`add`) or removes our finalizer with a patch of its own; its end comes back as a
    /// [`Done::Finalizer`]. No other patch of the object's finalizers starts meanwhile.
    fn patch_finalizer(&mut self, key: Key, seen: Seen, add: bool) {
        self.patching.insert(key.clone());
        let (w, tx) = (self.writer.clone(), self.done_tx.clone());
        tokio::spawn(async move {
            let result = if add {
                w.add_finalizer(&seen).await
            } else {
                w.remove_finalizer(&seen).await
            };
            let _ = tx.send(Done::Finalizer {
                key,
                added: add,
                result,
            });
        });
    }

    /// The finalizers whose addition failed, tried again (as the objects are seen now).
    fn retry_finalizers(&mut self) {
        for key in std::mem::take(&mut self.finalizer_retry) {
            if let Some(seen) = self.seen.get(&key).cloned() {
                self.ensure_finalizer(&key, &seen);
            }
        }
    }

    /// Whether `key` is watched by stream `scope` (one per namespace, or one for all).
    fn in_scope(&self, scope: usize, key: &Key) -> bool {
        match self.shared.namespaces.get(scope) {
            Some(ns) => *ns == key.1,
            None => true,
        }
    }

    async fn on_apply(&mut self, seen: Seen) {
        let key: Key = (seen.kind, seen.namespace.clone(), seen.name.clone());
        // Only its status changed (most often: ours, just written): nothing to apply again.
        if let Some(old) = self.seen.get(&key)
            && old.uid == seen.uid
            && old.generation == seen.generation
            && old.deleting == seen.deleting
            && old.finalizers == seen.finalizers
            && old.made_by_api == seen.made_by_api
        {
            if let Some(old) = self.seen.get_mut(&key) {
                old.resource_version = seen.resource_version;
            }
            return;
        }
        if seen.deleting {
            self.seen.insert(key.clone(), seen);
            self.on_deleting(&key).await;
            return;
        }
        self.ensure_finalizer(&key, &seen);
        let ok = obj_key(&key);
        let owner = self.given.get(&ok).cloned();
        // Declared in another namespace too: the older declaration has the name, whichever
        // arrived first (a restart or a new leader, whose lists come in any order, decides
        // the same), and takes it over from a newer one that had it.
        let first = match &owner {
            Some(ns) if *ns == seen.namespace => true,
            Some(_) => seen.object.is_ok() && self.first_declared(&key, &seen),
            None => self.first_declared(&key, &seen),
        };
        let overtaken = (owner.as_ref())
            .filter(|ns| first && **ns != seen.namespace)
            .map(|ns| (seen.kind, ns.clone(), seen.name.clone()));
        if let Ok(obj) = &seen.object
            && let Spec::User(u) = &obj.spec
            && let Some(r) = &u.token_secret_ref
        {
            self.read_secret(&seen.namespace, &r.name, &r.key).await;
        }
        let diag_file = objects::origin(seen.kind, &seen.namespace, &seen.name).file;
        match (&seen.object, first) {
            (Ok(obj), true) => {
                self.refused.remove(&key);
                self.given.insert(ok.clone(), seen.namespace.clone());
                self.publish_owner(&ok, &seen);
                let _ = self.handle.send(SourceEvent::Diagnostics {
                    file: diag_file,
                    diagnostics: Vec::new(),
                });
                let _ = self.handle.apply(obj.clone());
            }
            (Err(errs), true) => {
                // Admitted by the API server, refused by the controller: the last valid
                // version (if any) stays, and the object says why.
                let msg = objects::describe(errs);
                warn!(object = %ok, namespace = %seen.namespace, "{msg}");
                let diagnostics = errs
                    .iter()
                    .map(|e| Diagnostic {
                        file: diag_file.clone(),
                        line: 0,
                        col: 0,
                        object: Some(ok.to_string()),
                        path: e.path.clone(),
                        message: e.message.clone(),
                    })
                    .collect();
                let _ = self.handle.send(SourceEvent::Diagnostics {
                    file: diag_file,
                    diagnostics,
                });
                self.report_once(&key, &seen, "InvalidSpec", &msg).await;
            }
            (_, false) => {
                let msg = duplicate_name(&seen, &owner.unwrap_or_default());
                self.report_once(&key, &seen, "DuplicateName", &msg).await;
            }
        }
        if let Some(theirs) = overtaken
            && let Some(them) = self.seen.get(&theirs).cloned()
        {
            info!(object = %ok, from = %theirs.1, to = %seen.namespace,
                "declared in another namespace earlier: taken over by that declaration");
            let msg = duplicate_name(&them, &seen.namespace);
            self.report_once(&theirs, &them, "DuplicateName", &msg)
                .await;
            self.dirty.insert(theirs);
        }
        self.seen.insert(key.clone(), seen);
        self.dirty.insert(key);
    }

    /// Whether `seen` is the first declaration of its kind and name among those seen (the
    /// oldest; on a tie, the first namespace by name).
    fn first_declared(&self, key: &Key, seen: &Seen) -> bool {
        !self.seen.iter().any(|(k, other)| {
            k.0 == key.0
                && k.2 == key.2
                && k.1 != key.1
                && other.object.is_ok()
                && !other.deleting
                && other.age_order() < seen.age_order()
        })
    }

    fn publish_owner(&self, ok: &ObjKey, seen: &Seen) {
        self.shared
            .owners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                ok.clone(),
                Owner {
                    namespace: seen.namespace.clone(),
                    made_by_api: seen.made_by_api,
                },
            );
    }

    /// Says `message` on the object once per generation: an Event, and (through its status)
    /// `SpecValid=False`.
    async fn report_once(&mut self, key: &Key, seen: &Seen, reason: &str, message: &str) {
        let same = self
            .refused
            .get(key)
            .is_some_and(|(r, m, _)| r == reason && m == message);
        if !same {
            let since = poolkeeper_engine::status::rfc3339(now_ms());
            self.refused
                .insert(key.clone(), (reason.to_owned(), message.to_owned(), since));
        }
        if !self
            .reported
            .insert((key.clone(), seen.generation, message.to_owned()))
        {
            return;
        }
        if let Err(e) = self.writer.event(seen, true, reason, message).await {
            debug!(error = %e, "recording an event failed");
        }
    }

    /// An object is gone from the API server (deleted without, or after, our finalizer).
    fn on_gone(&mut self, key: &Key) {
        self.seen.remove(key);
        self.refused.remove(key);
        self.reported.retain(|(k, ..)| k != key);
        self.refusals.retain(|(k, _)| k != key);
        self.written.remove(key);
        self.mirrored.remove(key);
        self.cleanups.remove(key);
        self.dirty.remove(key);
        let ok = obj_key(key);
        if self.given.get(&ok) == Some(&key.1) {
            self.given.remove(&ok);
            self.shared
                .owners
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ok);
            let _ = self.handle.delete(ok.clone());
            let _ = self.handle.send(SourceEvent::Diagnostics {
                file: objects::origin(key.0, &key.1, &key.2).file,
                diagnostics: Vec::new(),
            });
            // Another namespace's declaration of the name takes over.
            let next = self
                .seen
                .iter()
                .filter(|(k, s)| k.0 == key.0 && k.2 == key.2 && s.object.is_ok() && !s.deleting)
                .min_by(|a, b| a.1.age_order().cmp(&b.1.age_order()))
                .map(|(_, s)| s.clone());
            if let Some(s) = next
                && let Ok(obj) = &s.object
            {
                info!(object = %ok, namespace = %s.namespace, "declared in another namespace too: that one takes over");
                self.given.insert(ok.clone(), s.namespace.clone());
                self.publish_owner(&ok, &s);
                let _ = self.handle.apply(obj.clone());
                self.dirty
                    .insert((s.kind, s.namespace.clone(), s.name.clone()));
            }
        }
    }

    /// An object is being deleted: the engine lets go of it, and its finalizer goes once the
    /// cleanup is done (a claim's instance reset, a pool or deployment drained).
    async fn on_deleting(&mut self, key: &Key) {
        if self.cleanups.contains_key(key) {
            return;
        }
        let ok = obj_key(key);
        let mut instance = None;
        if self.given.get(&ok) == Some(&key.1) {
            if key.0 == Kind::Claim
                && let Ok(view) = self.handle.view(ok.clone()).await
            {
                instance = view.and_then(|v| {
                    v.status
                        .get("instance")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
            }
            self.given.remove(&ok);
            self.shared
                .owners
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ok);
            let _ = self.handle.delete(ok);
        }
        self.cleanups.insert(key.clone(), Cleanup { instance });
        self.check_cleanups().await;
    }

    /// Removes the finalizer of each deleted object whose cleanup is done.
    async fn check_cleanups(&mut self) {
        let keys: Vec<Key> = self.cleanups.keys().cloned().collect();
        let views = self
            .handle
            .views(keys.iter().map(obj_key).collect())
            .await
            .unwrap_or_default();
        let instances: Vec<String> = keys
            .iter()
            .filter_map(|k| self.cleanups.get(k)?.instance.clone())
            .collect();
        let inst_views = self
            .handle
            .instances(instances.clone())
            .await
            .unwrap_or_default();
        let inst_views: HashMap<&String, _> = instances.iter().zip(inst_views.iter()).collect();
        // Reset for the claim once it neither holds it nor is being reset: the reset instance
        // may be bound to a waiting claim in the same pass, and is then done with this one.
        let reset = |inst: &String, claim: &str| {
            inst_views.get(inst).is_none_or(|v| {
                v.as_ref()
                    .is_none_or(|v| v.claim.as_deref() != Some(claim) && !v.resetting)
            })
        };
        for (i, key) in keys.iter().enumerate() {
            let Some(c) = self.cleanups.get(key) else {
                continue;
            };
            // A claim is done once its instance is reset; a pool or deployment once the
            // engine has drained it and lets go of it.
            let done = match &c.instance {
                Some(inst) => reset(inst, &key.2),
                None => key.0 == Kind::Claim || views.get(i).is_none_or(Option::is_none),
            };
            if !done || self.patching.contains(key) {
                continue;
            }
            let Some(seen) = self.seen.get(key).cloned() else {
                self.cleanups.remove(key);
                continue;
            };
            if !seen.finalizers.iter().any(|f| f == FINALIZER) {
                self.cleanups.remove(key);
                continue;
            }
            self.patch_finalizer(key.clone(), seen, false);
        }
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Status {
                key,
                written,
                result,
            } => {
                self.in_flight.remove(&key);
                match result {
                    Ok(()) => {
                        self.written.insert(key, written);
                    }
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => {
                        // Refused (4xx) is a fault worth seeing; the rest (a server away,
                        // 5xx, 409, 429) is retried quietly.
                        let refused = matches!(&e, kube::Error::Api(s)
                            if (400..500).contains(&s.code) && ![409, 429].contains(&s.code));
                        if refused && self.refusals.insert((key.clone(), e.to_string())) {
                            warn!(object = ?key, error = %e, "the API server refused a status; retrying");
                        } else {
                            debug!(object = ?key, error = %e, "writing status failed; retrying");
                        }
                        self.dirty.insert(key);
                    }
                }
            }
            Done::Finalizer { key, added, result } => {
                self.patching.remove(&key);
                match result {
                    Ok(()) => {
                        if !added {
                            self.cleanups.remove(&key);
                        }
                    }
                    // Gone already, or the finalizers changed under us (422 from the test op):
                    // the watch brings the object as it is now, and the work is done again.
                    Err(e) if is_status(&e, 404) || is_status(&e, 422) || is_status(&e, 409) => {}
                    // A removal is tried again by the cleanup tick; an addition here.
                    Err(e) => {
                        warn!(object = ?key, error = %e, added, "patching finalizers failed; trying again");
                        if added {
                            self.finalizer_retry.insert(key);
                        }
                    }
                }
            }
        }
    }

    /// A claim's phase change is written at once, but for Pending: a claim is Pending for the
    /// moment its binding takes to be made durable (a few milliseconds), and writing that would
    /// be one more write per claim under load for a state no one waits on. A claim that stays
    /// Pending (queued) is written with the others' status, within a second.
    fn on_claim_change(&mut self, change: &ClaimChange) {
        if change.phase == poolkeeper_kinds::ClaimPhase::Pending {
            return;
        }
        let ok = ObjKey::new(Kind::Claim, change.name.clone());
        if let Some(ns) = self.given.get(&ok) {
            self.dirty
                .insert((Kind::Claim, ns.clone(), change.name.clone()));
        }
    }

    fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.seen.keys().cloned());
    }

    /// Writes the status of each dirty object (of `only` that kind) whose status changed since
    /// it was last written. A claim's phase change is written at once; the other kinds' status
    /// (a pool's counts move with every claim) at the next tick, at most once a second.
    async fn write_statuses(&mut self, only: Option<Kind>) {
        if self.dirty.is_empty() {
            return;
        }
        let (now, later): (BTreeSet<Key>, BTreeSet<Key>) = std::mem::take(&mut self.dirty)
            .into_iter()
            .partition(|k| only.is_none_or(|kind| k.0 == kind));
        self.dirty = later;
        let keys: Vec<Key> = now
            .into_iter()
            .filter(|k| self.seen.get(k).is_some_and(|s| !s.deleting))
            .collect();
        let held: Vec<Key> = keys
            .iter()
            .filter(|k| self.given.get(&obj_key(k)) == Some(&k.1))
            .cloned()
            .collect();
        let views = self
            .handle
            .views(held.iter().map(obj_key).collect())
            .await
            .unwrap_or_default();
        let mut statuses: Vec<(Key, Value)> = Vec::new();
        for (key, view) in held.iter().zip(views) {
            let Some(view) = view else { continue };
            self.mirror_events(key, &view.events).await;
            statuses.push((key.clone(), view.status));
        }
        for key in keys.iter().filter(|k| !held.contains(k)) {
            if let (Some(s), Some(why)) = (self.seen.get(key), self.refused.get(key)) {
                statuses.push((key.clone(), not_taken(s, why)));
            }
        }
        for (key, status) in statuses {
            if self.written.get(&key) == Some(&status) {
                continue;
            }
            // Pending is written with the others' status, at the tick: most claims are Pending
            // only while their binding is made durable (see `on_claim_change`).
            if only.is_some() && key.0 == Kind::Claim && status["phase"] == "Pending" {
                self.dirty.insert(key);
                continue;
            }
            if self.in_flight.contains(&key) {
                // Written after the one in flight: the newest wins.
                self.dirty.insert(key);
                continue;
            }
            debug!(object = ?key, before = ?self.written.get(&key), status = %status, "writing status");
            self.in_flight.insert(key.clone());
            let (w, tx) = (self.writer.clone(), self.done_tx.clone());
            tokio::spawn(async move {
                let result = w.apply_status(key.0, &key.1, &key.2, &status).await;
                let _ = tx.send(Done::Status {
                    key,
                    written: status,
                    result,
                });
            });
        }
    }

    /// Records, as Kubernetes Events, the engine's events on the object not recorded yet.
    async fn mirror_events(
        &mut self,
        key: &Key,
        events: &[poolkeeper_engine::status::EventRecord],
    ) {
        let Some(seen) = self.seen.get(key).cloned() else {
            return;
        };
        let known = self.mirrored.entry(key.clone()).or_default();
        let mut new = Vec::new();
        for e in events {
            let id = (e.reason.clone(), e.message.clone());
            let stamp = (e.time.clone(), e.count);
            if known.get(&id) != Some(&stamp) {
                known.insert(id, stamp);
                new.push(e.clone());
            }
        }
        // Only what the engine still shows (its events are bounded per object): the messages
        // of a crash-looping container, new at each restart, do not pile up here.
        known.retain(|(reason, message), _| {
            events
                .iter()
                .any(|e| &e.reason == reason && &e.message == message)
        });
        for e in new {
            if let Err(err) = self
                .writer
                .event(&seen, e.type_ == "Warning", &e.reason, &e.message)
                .await
            {
                debug!(error = %err, "recording an event failed");
            }
        }
    }

    /// Reads a user's token Secret and keeps its digest for the engine.
    async fn read_secret(&self, namespace: &str, name: &str, key: &str) {
        let api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.writer.client().clone(), namespace);
        let token = match api.get_opt(name).await {
            Ok(Some(secret)) => match secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
            {
                Some(t) if !t.is_empty() => UserToken::Digest(Sha256::digest(t.as_bytes()).into()),
                Some(_) => {
                    UserToken::Unreadable(format!("Secret {namespace}/{name}: key {key} is empty"))
                }
                None => {
                    UserToken::Unreadable(format!("Secret {namespace}/{name} has no key {key}"))
                }
            },
            Ok(None) => UserToken::Unreadable(format!("Secret {namespace}/{name} not found")),
            Err(e) => UserToken::Unreadable(format!("Secret {namespace}/{name}: {e}")),
        };
        self.shared
            .secrets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (namespace.to_owned(), name.to_owned(), key.to_owned()),
                token,
            );
    }

    /// Reads every Secret a User refers to again (a rotated token works from the engine's next
    /// resync, which reads the tokens again); those no User refers to any more are forgotten.
    async fn reread_secrets(&self) {
        let refs: HashSet<(String, String, String)> = (self.seen.values())
            .filter_map(|s| match &s.object {
                Ok(o) => match &o.spec {
                    Spec::User(u) => (u.token_secret_ref.as_ref())
                        .map(|r| (s.namespace.clone(), r.name.clone(), r.key.clone())),
                    _ => None,
                },
                Err(_) => None,
            })
            .collect();
        self.shared
            .secrets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| refs.contains(k));
        for (ns, name, key) in refs {
            self.read_secret(&ns, &name, &key).await;
        }
    }
}

/// Why `seen` is not the one of its name the engine holds: the one in `owner` is.
fn duplicate_name(seen: &Seen, owner: &str) -> String {
    format!(
        "metadata.name: a {} named {} is declared in namespace {owner} already",
        seen.kind, seen.name
    )
}

/// The status of an object the engine does not hold: why not (reason, message, since), as
/// `SpecValid=False`.
fn not_taken(seen: &Seen, (reason, message, since): &(String, String, String)) -> Value {
    let mut status = json!({
        "observedGeneration": seen.generation,
        "conditions": [{
            "type": "SpecValid",
            "status": "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": seen.generation,
        }],
    });
    if seen.kind == Kind::Claim {
        status["phase"] = json!("Failed");
    }
    status
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The token a user's Secret holds, as the source last read it.
pub(crate) fn secret_token(shared: &Shared, namespace: &str, name: &str, key: &str) -> UserToken {
    shared
        .secrets
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(namespace.to_owned(), name.to_owned(), key.to_owned()))
        .cloned()
        .unwrap_or_else(|| {
            UserToken::Unreadable(format!("Secret {namespace}/{name}: not read yet"))
        })
}
