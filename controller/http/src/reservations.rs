//! Reservations by webhook: signed events from booking systems become claims; signed callbacks
//! tell them where a reservation runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use poolkeeper_core::claims::resources_within;
use poolkeeper_engine::EngineHandle;
use poolkeeper_engine::source::{Created, Declare, Record, Records};
use poolkeeper_kinds::units::{parse_cpu_millis, parse_memory_bytes};
use poolkeeper_kinds::{ClaimPhase, ClaimSpec, Kind, Resources};

use crate::auth::snapshot;
use crate::claims::refused;
use crate::error::{ApiError, ApiResult};
use crate::{ApiState, WebhookConfig};

/// What poolkeeper keeps of a reservation, beside its claim: who asked, and where the
/// callback stands. In the source's records (`reservations/CLAIM.json`; the directory source
/// keeps them in its state folder, which the watcher does not load as specs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    pub resource_name: String,
    #[serde(default)]
    pub user_id: Option<Value>,
    pub username: String,
    pub pool: String,
    pub callback: CallbackState,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallbackState {
    /// `Pending`, `Delivered`, `Failed` (retries exhausted), or `NotConfigured`.
    pub state: String,
    #[serde(default)]
    pub attempts: u32,
    /// What was (or is to be) reported: `provisioned` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The key of a reservation's record in the source's records.
fn reservation_key(claim: &str) -> String {
    format!("{RESERVATIONS}{claim}.json")
}

const RESERVATIONS: &str = "reservations/";

/// Where the webhook signatures seen are kept, in the source's records.
const SEEN: &str = "webhook-signatures.json";

pub(crate) fn read_reservation(records: &dyn Records, claim: &str) -> Option<Reservation> {
    let bytes = records.get(&reservation_key(claim)).ok()??;
    serde_json::from_slice(&bytes).ok()
}

fn reservation_record(claim: &str, r: &Reservation) -> std::io::Result<Record> {
    Ok(Record {
        key: reservation_key(claim),
        bytes: serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?,
    })
}

/// The signatures recorded before a restart; none when there is no record yet. A record that
/// cannot be read is an error naming it, not a fresh start that would accept replays.
pub(crate) fn read_seen(records: &dyn Records) -> std::io::Result<crate::webhook::SeenSignatures> {
    let at = records.location(SEEN);
    let bytes = match records.get(SEEN) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(Default::default()),
        Err(e) => {
            return Err(std::io::Error::new(e.kind(), format!("reading {at}: {e}")));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{at}: line {} column {}: {e} (the webhook signatures seen; remove the file \
                 only if no signed request of the last {} s may be replayed)",
                e.line(),
                e.column(),
                crate::webhook::REPLAY_WINDOW_SECS
            ),
        )
    })
}

pub(crate) async fn reservation(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    use crate::webhook::{HEADER_SIGNATURE, HEADER_TIMESTAMP};
    let Some(cfg) = &state.webhooks else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "webhooks are not configured (--webhook-secret-file)",
        ));
    };
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let signature = header(HEADER_SIGNATURE);
    let now = crate::webhook::unix_now();
    let signed =
        crate::webhook::verify(&cfg.secret, header(HEADER_TIMESTAMP), signature, &body, now)
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    let event: crate::webhook::ReservationEvent = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    // A reservation is one resource for one user: its claim is named after both.
    let name = crate::webhook::claim_name(&event.resource_name, &event.username);
    if !matches!(event.event.as_str(), "provision" | "release") {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "event",
            format!("unknown event {:?}: provision or release", event.event),
        ));
    }
    // The claim's turn: a release waits for the provision it releases (and the other way
    // round), and a callback's record update for both; once begun, the request is carried
    // through should the booking system hang up.
    let turn = state.claims.lock(&name).await;
    let cfg = cfg.clone();
    crate::serial::detached(async move {
        let _turn = turn;
        if event.event == "release" {
            record_signature(&state, &signed, now, Some(&name)).await?;
            release(&state, &event, &name).await
        } else {
            provision(&state, &cfg, &event, &name, &signed, now).await
        }
    })
    .await?
}

/// Records a request's signature durably before it is acted on: a crash after acting cannot
/// make the same request acceptable again. A request refused before it was acted on is not
/// recorded (see [`forget_signature`]): the booking system may send it again as it is, once
/// what refused it is mended. Requests wait on each other here (webhooks are rare); the record
/// is then written in the order its entries were made.
async fn record_signature(
    state: &ApiState,
    signed: &crate::webhook::Signed,
    now: u64,
    releases: Option<&str>,
) -> ApiResult<()> {
    let mut seen = state.seen.lock().await;
    if !seen.record(signed, now) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this signed request was already received (a replay)",
        ));
    }
    if let Some(claim) = releases {
        seen.record_release(claim, signed.at);
    }
    let written = match serde_json::to_vec(&*seen) {
        Ok(bytes) => state.declare.records().put(SEEN, bytes).await,
        Err(e) => Err(std::io::Error::other(e)),
    };
    if let Err(e) = written {
        seen.forget(signed);
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("recording the request's signature: {e}"),
        ));
    }
    Ok(())
}

/// Takes back the record of a request that, recorded, was then refused without being acted on.
async fn forget_signature(state: &ApiState, signed: &crate::webhook::Signed) {
    let mut seen = state.seen.lock().await;
    seen.forget(signed);
    let written = match serde_json::to_vec(&*seen) {
        Ok(bytes) => state.declare.records().put(SEEN, bytes).await,
        Err(e) => Err(std::io::Error::other(e)),
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot take back a refused request's signature record");
    }
}

/// Releases the reservation of `event.resource_name` for `event.username`, and nothing else:
/// another user's reservation of the same resource is untouched, and the answer says so.
async fn release(
    state: &ApiState,
    event: &crate::webhook::ReservationEvent,
    name: &str,
) -> ApiResult<(StatusCode, Json<Value>)> {
    // A reservation made before claims were named after their user too, if it is this user's.
    let legacy = crate::webhook::legacy_claim_name(&event.resource_name);
    let name = match read_reservation(state.declare.records(), &legacy) {
        Some(r)
            if !state.declare.is_recorded(name)
                && r.username == event.username
                && r.resource_name == event.resource_name =>
        {
            legacy
        }
        _ => name.to_owned(),
    };
    if let Some(r) = read_reservation(state.declare.records(), &name)
        && r.username != event.username
    {
        return Ok((
            StatusCode::OK,
            Json(json!({"claim": name, "released": false,
                "reason": format!("no reservation of {:?} for user {:?}", event.resource_name, event.username)})),
        ));
    }
    let existed = state.declare.delete_claim(&name).await?;
    if let Err(e) = state
        .declare
        .records()
        .remove(&reservation_key(&name))
        .await
    {
        tracing::warn!(claim = %name, error = %e, "cannot remove the reservation's record");
    }
    let mut answer = json!({"claim": name, "released": existed});
    if !existed {
        answer["reason"] = json!(format!(
            "no reservation of {:?} for user {:?}",
            event.resource_name, event.username
        ));
    }
    Ok((StatusCode::OK, Json(answer)))
}

/// Whether ended claim `name`, just deleted, has gone: the engine no longer holds it and its
/// name is free for a new claim of `user` (see [`Declare::claim_name_free`]), waiting up to
/// [`CLAIM_GONE_WAIT`].
async fn ended_claim_gone(state: &ApiState, name: &str, user: &str) -> Result<bool, ApiError> {
    let deadline = tokio::time::Instant::now() + CLAIM_GONE_WAIT;
    loop {
        let held = state
            .handle
            .view(poolkeeper_kinds::ObjKey::new(Kind::Claim, name.to_owned()))
            .await
            .map_or(true, |v| v.is_some());
        if !held && state.declare.claim_name_free(name, user).await? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The answer when an ended reservation's claim did not go within [`CLAIM_GONE_WAIT`].
fn still_removed(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "reservation {name}'s ended claim is still being removed: send the provision again"
        ),
    )
}

/// How long a provision waits for an ended reservation's claim to go before making it anew.
const CLAIM_GONE_WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn provision(
    state: &ApiState,
    cfg: &WebhookConfig,
    event: &crate::webhook::ReservationEvent,
    name: &str,
    signed: &crate::webhook::Signed,
    now: u64,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let snap = snapshot(state).await?;
    let Some(image) = event.custom_parameters.image.as_deref() else {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "custom_parameters.image",
            "a provision names the image it wants",
        ));
    };
    let pools: Vec<(String, String)> = snap
        .objects
        .iter()
        .filter(|o| o.kind == Kind::Pool && !o.spec.is_null())
        .filter_map(|o| {
            let image = o.spec.pointer("/template/image")?.as_str()?;
            Some((o.name.clone(), image.to_owned()))
        })
        .collect();
    let user_pools: Vec<&str> = snap
        .objects
        .iter()
        .find(|o| o.kind == Kind::User && o.name == event.username)
        .and_then(|u| u.spec.pointer("/quota/pools"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let pool = crate::webhook::pool_for_image(image, &cfg.allowed_images, &pools, &user_pools)
        .map_err(|e| {
            ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "custom_parameters.image",
                e,
            )
        })?
        .to_owned();
    // The limits the pool lets claims set become the claim's; the others are ignored.
    let bounds: Option<Resources> = snap
        .objects
        .iter()
        .find(|o| o.kind == Kind::Pool && o.name == pool)
        .and_then(|o| o.spec.get("claimResources"))
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    let resources = reservation_resources(&event.custom_parameters, bounds.as_ref(), &pool)?;
    // Released by a request signed after this one: this provision was overtaken by its own
    // cancellation (delivered late, or retried), and must not hold an instance. Timestamps are
    // in seconds: one signed in the second of the release is taken for a new booking (the
    // resource booked again at once), not refused.
    if let Some(released) = state.seen.lock().await.released_at(name)
        && released > signed.at
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "reservation {name} was released by a request signed at {released}, after this \
                 provision (signed at {}): a provision sent before its release is not acted on",
                signed.at
            ),
        ));
    }
    // The reservation's claim as the engine has it: its phase, and its pool.
    let existing: Option<(ClaimPhase, String)> = snap
        .objects
        .iter()
        .find(|o| o.kind == Kind::Claim && o.name == name)
        .map(|c| {
            let phase = c
                .status
                .get("phase")
                .and_then(|p| serde_json::from_value::<ClaimPhase>(p.clone()).ok())
                .unwrap_or_default();
            let on = c.spec.get("pool").and_then(Value::as_str).unwrap_or("");
            (phase, on.to_owned())
        });
    if let Some((phase, on)) = &existing
        && !phase.is_terminal()
        && *on != pool
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "reservation {name} runs on pool {on}, not {pool} (the image asked for): \
                 release it before provisioning it with another image"
            ),
        ));
    }
    // Accepted from here on: a replay of this very request is refused from now.
    record_signature(state, signed, now, None).await?;
    if state.declare.is_recorded(name) {
        match &existing {
            // Its claim ended (expired, failed): this provision is a new reservation of the
            // resource, made afresh rather than answered as the old one.
            Some((phase, _)) if phase.is_terminal() => {
                if let Err(e) = state.declare.delete_claim(name).await {
                    forget_signature(state, signed).await;
                    return Err(e.into());
                }
                // Made anew once the engine has let the ended claim go: in Kubernetes the
                // deletion reaches it through the watch (and the claim's finalizer), and a
                // creation before that finds the old claim and would answer it as a duplicate.
                // Nor is the name free before its object has gone (in Kubernetes, through its
                // finalizers, another controller's too): only then is the claim made anew, so
                // that no claim is made (and bound, and reported) in vain meanwhile.
                let gone = ended_claim_gone(state, name, &event.username).await;
                if !matches!(gone, Ok(true)) {
                    forget_signature(state, signed).await;
                    return Err(gone.err().unwrap_or_else(|| still_removed(name)));
                }
            }
            // A duplicate (the same reservation sent again, signed anew, perhaps while the
            // first was being written) changes nothing.
            _ => {
                return Ok((
                    StatusCode::OK,
                    Json(json!({"claim": name, "pool": pool, "created": false})),
                ));
            }
        }
    }
    let spec = ClaimSpec {
        pool: pool.clone(),
        user: event.username.clone(),
        ttl: None,
        files: BTreeMap::new(),
        files_from: None,
        resources: resources.clone(),
    };
    let record = Reservation {
        resource_name: event.resource_name.clone(),
        user_id: event.user_id.clone(),
        username: event.username.clone(),
        pool: pool.clone(),
        callback: CallbackState {
            state: if cfg.notify.is_some() {
                "Pending"
            } else {
                "NotConfigured"
            }
            .to_owned(),
            ..CallbackState::default()
        },
    };
    // The record is written before the claim: a crash between the two leaves a record
    // without a claim (harmless), never a claim whose callback is forgotten.
    let record = reservation_record(name, &record)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let created = match state.declare.create_claim(name, spec, Some(record)).await {
        Ok(Created::Exists(c)) if state.declare.made_here(name, &c.origin) => {
            Ok(Created::Exists(c))
        }
        Ok(Created::New { at }) => Ok(Created::New { at }),
        other => {
            // Not acted on: the request is not taken for received.
            forget_signature(state, signed).await;
            other
        }
    };
    match created? {
        Created::New { .. } => {}
        // The same reservation, sent again while the first was being written.
        Created::Exists(c) if state.declare.made_here(name, &c.origin) => {
            return Ok((
                StatusCode::OK,
                Json(json!({"claim": name, "pool": pool, "created": false})),
            ));
        }
        Created::Exists(_) => {
            return Err(ApiError::field(
                StatusCode::CONFLICT,
                "resource_name",
                format!("a claim named {name:?} exists and is not this reservation's"),
            ));
        }
        Created::Refused(reason, message) => return Err(refused((reason, message))),
    }
    // What the pool's template decides, not the request.
    let p = &event.custom_parameters;
    let set = resources.unwrap_or_default();
    let ignored: Vec<&str> = [
        ("cpu_limit", p.cpu_limit.is_some() && set.cpu.is_none()),
        (
            "memory_limit",
            p.memory_limit.is_some() && set.memory.is_none(),
        ),
        ("ports", p.ports.is_some()),
        ("environment", p.environment.is_some()),
        ("storage_limit", p.storage_limit.is_some()),
        ("persistent_storage", p.persistent_storage.is_some()),
    ]
    .into_iter()
    .filter(|(_, given)| *given)
    .map(|(n, _)| n)
    .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({"claim": name, "pool": pool, "created": true,
            "resources": set, "ignored": ignored,
            "note": "the pool's template sets ports, environment and storage, and the limits its spec.claimResources does not let claims set"})),
    ))
}

/// A reservation's `cpu_limit` and `memory_limit`, as the claim's resources where the pool's
/// `claimResources` bounds them (the others are ignored). Memory may be in Docker's notation
/// (`512m`, `1g`: binary units) as the older reservation service took it, or Kubernetes'.
fn reservation_resources(
    p: &crate::webhook::CustomParameters,
    bounds: Option<&Resources>,
    pool: &str,
) -> ApiResult<Option<Resources>> {
    let Some(bounds) = bounds else {
        return Ok(None);
    };
    let cpu = p.cpu_limit.clone().filter(|_| bounds.cpu.is_some());
    let memory = p
        .memory_limit
        .as_deref()
        .filter(|_| bounds.memory.is_some())
        .map(docker_memory);
    let invalid =
        |field: &str, e: String| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, field, e);
    if let Some(c) = &cpu {
        parse_cpu_millis(c).map_err(|e| invalid("custom_parameters.cpu_limit", e))?;
    }
    if let Some(m) = &memory {
        parse_memory_bytes(m).map_err(|e| invalid("custom_parameters.memory_limit", e))?;
    }
    let one = |cpu: Option<String>, memory: Option<String>| Resources { cpu, memory };
    resources_within(&one(cpu.clone(), None), Some(bounds), pool)
        .map_err(|e| invalid("custom_parameters.cpu_limit", e))?;
    resources_within(&one(None, memory.clone()), Some(bounds), pool)
        .map_err(|e| invalid("custom_parameters.memory_limit", e))?;
    Ok((cpu.is_some() || memory.is_some()).then(|| one(cpu, memory)))
}

/// Docker's memory notation (`512m`, `1g`, `64k`, `100b`: binary units, lowercase) as a
/// Kubernetes quantity; anything else as given.
fn docker_memory(text: &str) -> String {
    let t = text.trim();
    let Some(last) = t.chars().last() else {
        return t.to_owned();
    };
    let num = &t[..t.len() - last.len_utf8()];
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return t.to_owned();
    }
    match last {
        'b' => num.to_owned(),
        'k' => format!("{num}Ki"),
        'm' => format!("{num}Mi"),
        'g' => format!("{num}Gi"),
        _ => t.to_owned(),
    }
}

/// Delivers callbacks: when a reservation's claim is Bound (or Failed), POSTs the access
/// details, signed, to `url`; retried with backoff (0.5 s doubling, 8 attempts); the state is
/// kept in the reservation record and shown on the claim. A release stops the retries: each
/// attempt, and each update of the record, is made in the claim's turn (see [`crate::serial`])
/// and only while the record is still the one this delivery began with.
pub(crate) async fn callbacks(
    handle: EngineHandle,
    declare: Arc<dyn Declare>,
    target: Arc<crate::notify::Target>,
    secret: Vec<u8>,
    claims: Arc<crate::serial::ClaimLocks>,
) {
    let Ok(mut changes) = handle.subscribe() else {
        return;
    };
    let (again, mut again_rx) = tokio::sync::mpsc::unbounded_channel();
    let cb = Callbacks {
        handle,
        declare,
        target,
        secret,
        claims,
        in_flight: Arc::default(),
        again,
    };
    // Reservations pending from before a restart are looked at once at start.
    let pending: Vec<String> = cb
        .declare
        .records()
        .keys(RESERVATIONS)
        .into_iter()
        .filter_map(|k| k.strip_suffix(".json").map(str::to_owned))
        .collect();
    for claim in pending {
        cb.consider(&claim).await;
    }
    loop {
        let claim = tokio::select! {
            change = changes.recv() => match change {
                Some(c) if matches!(
                    c.phase,
                    poolkeeper_kinds::ClaimPhase::Bound | poolkeeper_kinds::ClaimPhase::Failed
                ) => c.name,
                Some(_) => continue,
                None => break,
            },
            Some(claim) = again_rx.recv() => claim,
        };
        cb.consider(&claim).await;
    }
}

/// What delivering callbacks needs, shared by the deliveries under way.
#[derive(Clone)]
struct Callbacks {
    handle: EngineHandle,
    declare: Arc<dyn Declare>,
    target: Arc<crate::notify::Target>,
    secret: Vec<u8>,
    claims: Arc<crate::serial::ClaimLocks>,
    /// The claims whose callback is being delivered.
    in_flight: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Claims to look at again: a delivery stopped because its reservation was released, and
    /// another reservation of the same name may be waiting for its own.
    again: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Callbacks {
    async fn consider(&self, claim: &str) {
        let Some(record) = read_reservation(self.declare.records(), claim) else {
            return;
        };
        if record.callback.state != "Pending" {
            return;
        }
        let Ok(snap) = self.handle.snapshot().await else {
            return;
        };
        let Some(o) = snap
            .objects
            .iter()
            .find(|o| o.kind == Kind::Claim && o.name == claim)
        else {
            return;
        };
        let phase = o.status.get("phase").and_then(Value::as_str).unwrap_or("");
        let mut body = json!({
            "resource_name": record.resource_name,
            "user_id": record.user_id,
            "username": record.username,
            "claim": claim,
        });
        let event = match phase {
            "Bound" => {
                let endpoint = o.status.get("endpoint").cloned().unwrap_or(Value::Null);
                body["host"] = endpoint.get("host").cloned().unwrap_or(Value::Null);
                body["ports"] = endpoint.get("ports").cloned().unwrap_or(Value::Null);
                if let Some(ssh) = endpoint.get("ssh") {
                    body["ssh"] = ssh.clone();
                }
                "provisioned"
            }
            "Failed" => {
                let reason = o
                    .status
                    .get("conditions")
                    .and_then(Value::as_array)
                    .and_then(|cs| cs.iter().find(|c| c["status"] == "False"))
                    .map(|c| {
                        format!(
                            "{}: {}",
                            c["reason"].as_str().unwrap_or(""),
                            c["message"].as_str().unwrap_or("")
                        )
                    })
                    .unwrap_or_else(|| "failed".to_owned());
                body["reason"] = Value::String(reason);
                "failed"
            }
            _ => return,
        };
        body["event"] = Value::String(event.to_owned());
        {
            let mut f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if !f.insert(claim.to_owned()) {
                return;
            }
        }
        tokio::spawn(self.clone().deliver(claim.to_owned(), record, body, event));
    }

    /// Posts `body` until it is delivered, the attempts run out, or the reservation is released
    /// (its record gone or replaced by another reservation's).
    async fn deliver(self, claim: String, record: Reservation, body: Value, event: &'static str) {
        let bytes = body.to_string().into_bytes();
        let records = self.declare.records();
        // The record as this delivery last left it: anything else there is not its own.
        let mut ours = record;
        let mut record = ours.clone();
        record.callback.event = Some(event.to_owned());
        let mut delay = Duration::from_millis(500);
        let mut released = false;
        for attempt in 1..=8u32 {
            {
                let _turn = self.claims.lock(&claim).await;
                if read_reservation(records, &claim).as_ref() != Some(&ours) {
                    released = true;
                    break;
                }
            }
            let r = self.target.post_signed(&self.secret, &bytes).await;
            record.callback.attempts = attempt;
            match r {
                Ok(()) => {
                    record.callback.state = "Delivered".to_owned();
                    record.callback.last_error = None;
                }
                Err(e) => {
                    tracing::warn!(claim = %claim, attempt, error = %e, "callback not delivered");
                    record.callback.last_error = Some(e);
                    if attempt == 8 {
                        record.callback.state = "Failed".to_owned();
                    }
                }
            }
            {
                // Released while the request was out: its record is gone, and stays so.
                let _turn = self.claims.lock(&claim).await;
                if read_reservation(records, &claim).as_ref() != Some(&ours) {
                    released = true;
                    break;
                }
                let written = match reservation_record(&claim, &record) {
                    Ok(r) => records.put(&r.key, r.bytes).await,
                    Err(e) => Err(e),
                };
                match written {
                    Ok(()) => ours = record.clone(),
                    Err(e) => {
                        tracing::warn!(claim = %claim, error = %e, "cannot update the reservation's record");
                    }
                }
            }
            if record.callback.state != "Pending" {
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&claim);
        if released {
            let _ = self.again.send(claim);
        }
    }
}
