//! What the console's pages learn live (`GET /ui/events`, Server-Sent Events):
//!
//! - `claim`: each change of a claim the session may see, as the engine reports it (its push,
//!   not a poll), with the claim's endpoint and TTL once bound, and `engineMs` (when the engine
//!   made the change, Unix milliseconds) so that a page can tell how late it shows it;
//! - `pools`: the pools' counts and their history (warm and bound, one point per
//!   [`HISTORY_EVERY`] over [`HISTORY_POINTS`] points), sent when they change.
//!
//! The pools' counts are read by one sampler for all pages (started with the first page that
//! asks), from the engine's snapshot every [`SAMPLE_EVERY`]: the engine has no push for counts,
//! and one reader for every browser costs one snapshot per period whatever their number.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use poolkeeper_engine::EngineHandle;
use poolkeeper_engine::status::Snapshot;
use poolkeeper_kinds::{ClaimStatus, Kind, ObjKey, PoolStatus};

use crate::ApiState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(250);
pub(crate) const HISTORY_EVERY: Duration = Duration::from_secs(5);
/// Ten minutes of history.
pub(crate) const HISTORY_POINTS: usize = 120;

/// One pool as the console shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PoolRow {
    pub name: String,
    pub image: String,
    /// `8000-8099`, or empty.
    pub ports: String,
    pub ssh: bool,
    pub warm: u32,
    pub desired: u32,
    pub bound: u32,
    pub starting: u32,
    pub queued: u32,
    pub quarantined: u32,
    pub hits: u64,
    pub misses: u64,
    /// The Ready condition: `True`/`False`, and its reason.
    pub ready: String,
    pub ready_reason: String,
    /// Warm and bound, oldest first.
    pub history: Vec<(u32, u32)>,
}

/// One of the most recent events of all objects (operators only).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct EventRow {
    pub time: String,
    /// `Kind/name`.
    pub object: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    /// How often it happened in a row (the time is the last).
    pub count: u32,
}

/// How many recent events the operator's page shows.
const RECENT_EVENTS: usize = 25;

/// The most recent events of every object, newest first.
pub(crate) fn recent_events(snap: &Snapshot) -> Vec<EventRow> {
    let mut events: Vec<EventRow> = snap
        .objects
        .iter()
        .flat_map(|o| {
            o.events.iter().map(move |e| EventRow {
                time: e.time.clone(),
                object: format!("{}/{}", o.kind, o.name),
                type_: e.type_.clone(),
                reason: e.reason.clone(),
                message: e.message.clone(),
                count: e.count,
            })
        })
        .collect();
    events.sort_by(|a, b| b.time.cmp(&a.time));
    events.truncate(RECENT_EVENTS);
    events
}

type Rows = watch::Receiver<Arc<Vec<PoolRow>>>;
type Recent = watch::Receiver<Arc<Vec<EventRow>>>;

/// The latest rows and events, shared by every page.
#[derive(Default)]
pub(crate) struct Feed {
    live: tokio::sync::Mutex<Option<(Rows, Recent)>>,
}

impl Feed {
    /// The pools' rows and the recent events, live; the sampler starts with the first caller,
    /// which gets the first ones at once.
    async fn live(&self, handle: &EngineHandle) -> (Rows, Recent) {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref() {
            return l.clone();
        }
        let mut sampler = Sampler::default();
        let (first, events) = match handle.snapshot().await {
            Ok(snap) => (sampler.rows(&snap), recent_events(&snap)),
            Err(_) => (Vec::new(), Vec::new()),
        };
        let (tx, rx) = watch::channel(Arc::new(first));
        let (etx, erx) = watch::channel(Arc::new(events));
        tokio::spawn(sampler.run(handle.clone(), tx, etx));
        *live = Some((rx.clone(), erx.clone()));
        (rx, erx)
    }

    pub async fn rows(&self, handle: &EngineHandle) -> Rows {
        self.live(handle).await.0
    }

    pub async fn recent(&self, handle: &EngineHandle) -> Recent {
        self.live(handle).await.1
    }
}

/// The pools' history, kept by the one sampler.
#[derive(Default)]
struct Sampler {
    history: HashMap<String, VecDeque<(u32, u32)>>,
    last_point: Option<Instant>,
}

impl Sampler {
    /// The rows of `snap`, with their history (a point added every [`HISTORY_EVERY`]).
    fn rows(&mut self, snap: &Snapshot) -> Vec<PoolRow> {
        let mut rows = pool_rows(snap);
        if self.last_point.is_none_or(|t| t.elapsed() >= HISTORY_EVERY) {
            self.last_point = Some(Instant::now());
            self.history
                .retain(|name, _| rows.iter().any(|r| &r.name == name));
            for r in &rows {
                let h = self.history.entry(r.name.clone()).or_default();
                h.push_back((r.warm, r.bound));
                while h.len() > HISTORY_POINTS {
                    h.pop_front();
                }
            }
        }
        for r in &mut rows {
            r.history = self
                .history
                .get(&r.name)
                .map(|h| h.iter().copied().collect())
                .unwrap_or_default();
        }
        rows
    }

    /// Reads the snapshot every [`SAMPLE_EVERY`] and publishes the rows and the recent events
    /// when they change, until the engine stops.
    async fn run(
        mut self,
        handle: EngineHandle,
        tx: watch::Sender<Arc<Vec<PoolRow>>>,
        etx: watch::Sender<Arc<Vec<EventRow>>>,
    ) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Ok(snap) = handle.snapshot().await else {
                return;
            };
            let rows = self.rows(&snap);
            if **tx.borrow() != rows && tx.send(Arc::new(rows)).is_err() {
                return;
            }
            let events = recent_events(&snap);
            if **etx.borrow() != events {
                let _ = etx.send(Arc::new(events));
            }
        }
    }
}

/// The pools of a snapshot as rows (without history).
pub(crate) fn pool_rows(snap: &Snapshot) -> Vec<PoolRow> {
    snap.objects
        .iter()
        .filter(|o| o.kind == Kind::Pool && !o.spec.is_null())
        .map(|o| {
            let st: PoolStatus = serde_json::from_value(o.status.clone()).unwrap_or_default();
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready");
            let ports = o
                .spec
                .get("hostPorts")
                .and_then(|p| Some((p.get("start")?.as_u64()?, p.get("end")?.as_u64()?)))
                .map(|(a, b)| format!("{a}-{b}"))
                .unwrap_or_default();
            PoolRow {
                name: o.name.clone(),
                image: o
                    .spec
                    .pointer("/template/image")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                ports,
                ssh: o.spec.get("ssh").is_some_and(|s| !s.is_null()),
                warm: st.warm,
                desired: st.desired_warm,
                bound: st.bound,
                starting: st.starting,
                queued: st.queued,
                quarantined: st.quarantined,
                hits: st.hits,
                misses: st.misses,
                ready: ready.map_or_else(|| "Unknown".to_owned(), |c| c.status.clone()),
                ready_reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
                history: Vec::new(),
            }
        })
        .collect()
}

/// A claim as a `claim` event (and a page's row) shows it.
pub(crate) fn claim_json(name: &str, spec: &Value, status: &Value) -> Value {
    let st: ClaimStatus = serde_json::from_value(status.clone()).unwrap_or_default();
    let endpoint = st.endpoint.as_ref();
    json!({
        "name": name,
        "user": spec.get("user"),
        "pool": spec.get("pool"),
        "phase": st.phase,
        "address": endpoint.and_then(|e| e.address.clone()),
        "ssh": endpoint.and_then(|e| e.ssh.clone()),
        "expiresAt": st.expires_at,
        "boundAt": st.bound_at,
        "queuePosition": st.queue_position,
    })
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The stream of a signed-in page.
pub(crate) async fn events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let Some((id, session)) = super::live_session(&state, &headers).await else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "not signed in"));
    };
    let who = session.who;
    let changes = state
        .handle
        .subscribe()
        .map_err(|_| ApiError::unavailable())?;
    // As the API's stream, and the session is checked again at each change the page may see:
    // signed out, disabled, deleted, no longer an operator, or its password changed, the
    // stream ends at once.
    let claims = {
        let state = state.clone();
        let id = id.clone();
        let who = who.clone();
        crate::objects::forward_changes(changes, move |user| {
            let state = state.clone();
            let id = id.clone();
            let sees = who.sees_user(&user);
            async move {
                if !sees {
                    Some(false)
                } else if super::session_holds(&state, &id).await {
                    Some(true)
                } else {
                    None
                }
            }
        })
    };
    let mut pools = state.console.feed.rows(&state.handle).await;
    // The current rows first: a page rendered before the sampler started gets them at once.
    pools.mark_changed();
    // Events name every object (other users' claims among them): operators only.
    let recent = match who {
        Caller::Admin => {
            let mut rx = state.console.feed.recent(&state.handle).await;
            rx.mark_changed();
            Some(rx)
        }
        Caller::User(_) => None,
    };
    struct Live {
        claims: tokio::sync::mpsc::Receiver<poolkeeper_engine::ClaimChange>,
        pools: watch::Receiver<Arc<Vec<PoolRow>>>,
        recent: Option<watch::Receiver<Arc<Vec<EventRow>>>>,
        state: Arc<ApiState>,
        id: String,
    }
    let live = Live {
        claims,
        pools,
        recent,
        state,
        id,
    };
    let stream = futures::stream::unfold(live, |mut live| async move {
        tokio::select! {
            change = live.claims.recv() => {
                let change = change?;
                let engine_ms = unix_ms(SystemTime::now()) - change.at.elapsed().as_millis() as u64;
                let view = live
                    .state
                    .handle
                    .view(ObjKey::new(Kind::Claim, change.name.clone()))
                    .await
                    .ok()
                    .flatten();
                let mut data = match &view {
                    Some(v) => claim_json(&v.name, &v.spec, &v.status),
                    None => json!({"name": change.name, "user": change.user}),
                };
                // The change's own phase (the view may have moved on, or be gone).
                data["phase"] = json!(change.phase);
                data["gone"] = json!(view.is_none());
                data["engineMs"] = json!(engine_ms);
                let ev = Event::default().event("claim").data(data.to_string());
                Some((Ok(ev), live))
            }
            changed = async {
                match live.recent.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                changed.ok()?;
                if !super::session_holds(&live.state, &live.id).await {
                    return None;
                }
                let events = live.recent.as_mut()?.borrow_and_update().clone();
                let ev = Event::default().event("events").data(json!(*events).to_string());
                Some((Ok(ev), live))
            }
            changed = live.pools.changed() => {
                changed.ok()?;
                if !super::session_holds(&live.state, &live.id).await {
                    return None;
                }
                let rows = live.pools.borrow_and_update().clone();
                let ev = Event::default().event("pools").data(json!(*rows).to_string());
                Some((Ok(ev), live))
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The most recent lines a log view starts with.
const LOG_TAIL: usize = 200;
/// Longer lines are cut (a binary dump, say).
const LOG_LINE_MAX: usize = 4096;

fn cut(line: &str) -> String {
    if line.len() <= LOG_LINE_MAX {
        return line.to_owned();
    }
    let mut end = LOG_LINE_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// Lines of output a page that does not read may fall behind by before its stream ends.
const LOG_BUFFERED: usize = 1024;

/// An instance's output as a stream: `recent` (the last lines, one event), then a `line`
/// event per new line, until the instance goes or the page closes the view. It also ends when
/// session `id` does (checked at most once a second while lines come), when the page falls
/// [`LOG_BUFFERED`] lines behind, and, for a claim's output, as soon as claim `claim` is no
/// longer bound to `instance`: a released instance is reset and handed to someone else, whose
/// output is theirs.
async fn log_stream(
    state: &Arc<ApiState>,
    id: String,
    instance: &str,
    claim: Option<String>,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>> + use<>>> {
    let mut changes = match &claim {
        Some(_) => Some(
            state
                .handle
                .subscribe()
                .map_err(|_| ApiError::unavailable())?,
        ),
        None => None,
    };
    let logs = super::instance_answer(
        state.handle.logs(instance, LOG_TAIL).await,
        |e| format!("reading {instance}'s output: {e}"),
        (StatusCode::NOT_FOUND, format!("no instance {instance:?}")),
    )?;
    // Bound to it when the output was asked for, and still (a release between the two).
    if let Some(c) = &claim
        && !bound_to(state, c, instance).await
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("claim {c} is no longer bound to {instance}"),
        ));
    }
    let recent: Vec<String> = logs.recent.lines().map(cut).collect();
    let first = Event::default()
        .event("recent")
        .data(json!(recent).to_string());
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(LOG_BUFFERED);
    let mut follow = logs.follow;
    let state = state.clone();
    let instance = instance.to_owned();
    tokio::spawn(async move {
        let mut checked = Instant::now();
        loop {
            tokio::select! {
                line = follow.recv() => {
                    let Some(line) = line else { break };
                    if checked.elapsed() >= Duration::from_secs(1) {
                        if !super::session_holds(&state, &id).await {
                            break;
                        }
                        checked = Instant::now();
                    }
                    if tx.try_send(line).is_err() {
                        break;
                    }
                }
                change = async {
                    match changes.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(change) = change else { break };
                    if let Some(c) = &claim
                        && change.name == *c
                        && !bound_to(&state, c, &instance).await
                    {
                        break;
                    }
                }
                () = tx.closed() => break,
            }
        }
    });
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let ev = Event::default()
            .event("line")
            .data(json!(cut(&line)).to_string());
        Some((Ok(ev), rx))
    });
    let stream = futures::StreamExt::chain(futures::stream::once(async { Ok(first) }), rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Whether claim `claim` is Bound to `instance` now.
async fn bound_to(state: &ApiState, claim: &str, instance: &str) -> bool {
    let Ok(view) = state
        .handle
        .view(ObjKey::new(Kind::Claim, claim.to_owned()))
        .await
    else {
        return false;
    };
    view.is_some_and(|v| {
        let status: ClaimStatus = serde_json::from_value(v.status).unwrap_or_default();
        status.phase == poolkeeper_kinds::ClaimPhase::Bound
            && status.instance.as_deref() == Some(instance)
    })
}

/// The output of a claim's instance, for the claim's user (or an operator).
pub(crate) async fn claim_logs(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let Some((id, session)) = super::live_session(&state, &headers).await else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "not signed in"));
    };
    if crate::auth::claim_seen(&state, &session.who, &name)
        .await?
        .is_none()
    {
        return Err(crate::auth::no_claim(&name));
    }
    let view = state
        .handle
        .view(ObjKey::new(Kind::Claim, name.clone()))
        .await
        .map_err(|_| ApiError::unavailable())?;
    let status: ClaimStatus = view
        .map(|v| serde_json::from_value(v.status).unwrap_or_default())
        .unwrap_or_default();
    let Some(instance) = status.instance else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("claim {name} is not bound: it has no instance yet"),
        ));
    };
    log_stream(&state, id, &instance, Some(name)).await
}

/// The output of a deployment's container, for operators.
pub(crate) async fn container_logs(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(instance): axum::extract::Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let Some((id, session)) = super::live_session(&state, &headers).await else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "not signed in"));
    };
    crate::admin::admin_only(&session.who)?;
    log_stream(&state, id, &instance, None).await
}
