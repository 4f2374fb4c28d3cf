//! The HTTP API that `poolkeeper run` serves: objects with their status, claims created and
//! released by people and scripts, health.
//!
//! Authentication is a bearer token: the admin token (from `--admin-token-file`) or a user's,
//! whose SHA-256 the `User` declares (`tokenSha256`). A user sees and changes only their own
//! claims and user; an admin sees everything. A claim that is not the caller's answers 404, as
//! one that does not exist: errors never tell what other users have.
//!
//! Claims made through the API are files like any other spec: `DIR/managed/claims/NAME.yaml`,
//! written atomically, picked up by the directory watcher, kept across restarts and visible to
//! `get`. Releasing one deletes its file; a claim declared in a person's own file is released
//! there, not through the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::ClaimSpec;
use crate::engine::status::{ObjectView, Snapshot};
use crate::engine::{Creation, EngineHandle};
use crate::model::{Kind, ObjKey, Object, Origin, Spec};

/// Where claims made through the API live, under the watched folder.
pub const MANAGED_CLAIMS: &str = "managed/claims";
/// The API's OpenAPI document (committed; served at `/openapi.json`).
pub const OPENAPI: &str = include_str!("../openapi/openapi.json");

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;
/// Largest upload (a tar of files for a claim's instance).
pub const UPLOAD_LIMIT: usize = 16 << 20;

pub struct ApiState {
    handle: EngineHandle,
    dir: PathBuf,
    admin_sha256: Option<[u8; 32]>,
    webhooks: Option<WebhookConfig>,
    /// Webhook signatures that could still verify, as kept in the state folder: a request is
    /// acted on only once its signature is recorded there.
    seen: tokio::sync::Mutex<crate::webhook::SeenSignatures>,
    /// Claim files are written and removed through it (folder syncs in groups).
    files: crate::filewriter::FileWriter,
    /// Edits of declared files (admin operations) one at a time.
    edits: tokio::sync::Mutex<()>,
    /// Claim files written here, for the watcher to take without parsing them again.
    prepared: crate::source::dir::Prepared,
}

/// Reservations by webhook: the shared secret, the images booking systems may ask for (empty:
/// those of the declared pools), and where callbacks go.
#[derive(Clone, Debug, Default)]
pub struct WebhookConfig {
    pub secret: Vec<u8>,
    pub allowed_images: Vec<String>,
    /// Where callbacks go (checked at start).
    pub notify: Option<crate::notify::Target>,
}

impl ApiState {
    pub fn new(
        handle: EngineHandle,
        dir: PathBuf,
        admin_token: Option<&str>,
        webhooks: Option<WebhookConfig>,
    ) -> std::io::Result<Self> {
        // Canonical, as the watcher names files: a claim's origin is compared with it.
        let dir = std::fs::canonicalize(&dir)?;
        let seen = match webhooks {
            Some(_) => read_seen(&seen_path(&dir))?,
            None => Default::default(),
        };
        Ok(ApiState {
            handle,
            dir,
            admin_sha256: admin_token.map(sha256),
            webhooks,
            seen: tokio::sync::Mutex::new(seen),
            files: crate::filewriter::FileWriter::new()?,
            edits: tokio::sync::Mutex::new(()),
            prepared: Default::default(),
        })
    }

    /// Shares the watcher's [`crate::source::dir::Prepared`]: claim files written here are
    /// then not parsed again when the watcher reads them.
    pub fn with_prepared(mut self, prepared: crate::source::dir::Prepared) -> Self {
        self.prepared = prepared;
        self
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    OPENAPI,
                )
            }),
        )
        .route("/api/v1/claims", get(list_claims).post(create_claim))
        .route("/api/v1/claims/{name}", get(get_claim).delete(delete_claim))
        .route(
            "/api/v1/claims/{name}/files",
            axum::routing::put(upload_files).layer(DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route(
            "/webhooks/reservations",
            axum::routing::post(crate::server::reservation),
        )
        .route("/api/v1/events", get(events))
        .route(
            "/api/v1/pools/{name}/scale",
            axum::routing::post(scale_pool),
        )
        .route(
            "/api/v1/pools/{name}/reinitialise",
            axum::routing::post(reinitialise_pool),
        )
        .route("/api/v1/users/{name}", get(get_user).delete(delete_user))
        .route(
            "/api/v1/users/{name}/release",
            axum::routing::post(release_user),
        )
        .route("/api/v1/{kind}", get(list))
        .route("/api/v1/{kind}/{name}", get(get_one))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(Arc::new(state))
}

/// Serves the API until the listener fails; with a notification URL, also delivers the
/// reservations' callbacks.
pub async fn serve(listener: tokio::net::TcpListener, state: ApiState) -> std::io::Result<()> {
    if let Some(cfg) = &state.webhooks
        && let Some(target) = cfg.notify.clone()
    {
        tokio::spawn(callbacks(
            state.handle.clone(),
            state.dir.clone(),
            Arc::new(target),
            cfg.secret.clone(),
        ));
    }
    // Without TCP_NODELAY, a small write after another (an event on the stream, an answer
    // sent in two parts) waits for the peer's delayed acknowledgement: up to 40 ms.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, router(state)).await
}

/// The API served on a thread of its own (with its own single-threaded runtime): parsing
/// requests, JSON and YAML never delays the engine's passes, which keep their thread; the two
/// talk through the engine's channel as before.
pub struct ApiThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ApiThread {
    /// Stops accepting requests and drops the open connections.
    pub fn stop(mut self) {
        self.stop.take();
    }
}

/// Serves the API on `listener` (bound already, so that a taken address fails the caller at
/// once) from a new thread.
pub fn spawn(listener: std::net::TcpListener, state: ApiState) -> std::io::Result<ApiThread> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("poolkeeper-api".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "the HTTP API could not start");
                        return;
                    }
                };
                tokio::select! {
                    r = serve(listener, state) => {
                        if let Err(e) = r {
                            tracing::error!(error = %e, "the HTTP API stopped");
                        }
                    }
                    _ = stopped => {}
                }
            });
        })?;
    Ok(ApiThread { stop: Some(stop) })
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equal without telling, by its timing, where two digests differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    crate::webhook::same_bytes(a, b)
}

// ---- errors ----------------------------------------------------------------------------------

/// A JSON error: `{"error": "...", "field": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    fn field(status: StatusCode, field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    fn unavailable() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message});
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ---- who is asking ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    User(String),
}

impl Caller {
    fn sees_user(&self, user: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::User(u) => u == user,
        }
    }
}

/// The caller a bearer token names: the admin, or the user declaring its digest (from the
/// engine's token index: no round trip to the engine).
pub fn authenticate(
    headers: &HeaderMap,
    admin: Option<&[u8; 32]>,
    handle: &EngineHandle,
) -> ApiResult<Caller> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer TOKEN"))?
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer TOKEN`"))?;
    let digest = sha256(token);
    if admin.is_some_and(|a| same(a, &digest)) {
        return Ok(Caller::Admin);
    }
    // The index is keyed by digest; the lookup's timing tells nothing of a token that is not
    // a digest's preimage.
    match handle.token_owner(&digest) {
        Some(owner) if owner.disabled => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this user is disabled",
        )),
        Some(owner) => Ok(Caller::User(owner.user)),
        None => Err(unauthorized("unknown token")),
    }
}

async fn snapshot(state: &ApiState) -> ApiResult<Snapshot> {
    state
        .handle
        .snapshot()
        .await
        .map_err(|_| ApiError::unavailable())
}

fn who(state: &ApiState, headers: &HeaderMap) -> ApiResult<Caller> {
    authenticate(headers, state.admin_sha256.as_ref(), &state.handle)
}

async fn caller(state: &ApiState, headers: &HeaderMap) -> ApiResult<(Caller, Snapshot)> {
    let who = who(state, headers)?;
    let snap = snapshot(state).await?;
    Ok((who, snap))
}

/// Claim `name` if the caller may see it.
async fn claim_seen(
    state: &ApiState,
    who: &Caller,
    name: &str,
) -> ApiResult<Option<crate::engine::ClaimBrief>> {
    let claim = state
        .handle
        .claim(name)
        .await
        .map_err(|_| ApiError::unavailable())?;
    Ok(claim.filter(|c| who.sees_user(&c.spec.user)))
}

fn no_claim(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no Claim {name:?}"))
}

fn kind_of(segment: &str) -> ApiResult<Kind> {
    match segment {
        "pools" => Ok(Kind::Pool),
        "claims" => Ok(Kind::Claim),
        "users" => Ok(Kind::User),
        "deployments" => Ok(Kind::Deployment),
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no kind {other:?}: pools, claims, users or deployments"),
        )),
    }
}

/// Whether `who` may see object `o` (claims and users: their own only; deployments: admins).
fn visible(who: &Caller, o: &ObjectView) -> bool {
    match o.kind {
        Kind::Pool => true,
        Kind::Claim => o
            .spec
            .get("user")
            .and_then(Value::as_str)
            .is_some_and(|u| who.sees_user(u)),
        Kind::User => who.sees_user(&o.name),
        Kind::Deployment => *who == Caller::Admin,
    }
}

/// An object as the API shows it: the user's token digest is not shown.
fn shown(o: &ObjectView) -> Value {
    let mut spec = o.spec.clone();
    if let Some(m) = spec.as_object_mut() {
        m.remove("tokenSha256");
    }
    json!({
        "kind": o.kind,
        "name": o.name,
        "origin": o.origin,
        "spec": spec,
        "status": o.status,
        "events": o.events,
    })
}

// ---- handlers --------------------------------------------------------------------------------

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.handle.snapshot()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine does not answer",
        )
        .into_response(),
    }
}

/// Prometheus text format: the engine's counters, and gauges and counters per pool.
async fn metrics(State(state): State<Arc<ApiState>>) -> ApiResult<Response> {
    let snap = snapshot(&state).await?;
    let text = render_metrics(&snap);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the metrics of a snapshot.
pub fn render_metrics(snap: &Snapshot) -> String {
    use std::fmt::Write;
    let m = &snap.metrics;
    let mut out = String::new();
    let kinds = [
        ("pool", &m.pool),
        ("deployment", &m.deployment),
        ("user", &m.user),
    ];
    let counters = [
        (
            "poolkeeper_reconciles_total",
            "Objects reconciled, per kind.",
            kinds.map(|(k, km)| (k, km.reconciles)),
        ),
        (
            "poolkeeper_reconcile_errors_total",
            "Runtime actions that failed, per kind.",
            kinds.map(|(k, km)| (k, km.errors)),
        ),
    ];
    for (name, help, values) in counters {
        family(&mut out, name, "counter", help);
        for (k, v) in values {
            let _ = writeln!(out, "{name}{{kind=\"{k}\"}} {v}");
        }
    }
    let name = "poolkeeper_reconcile_duration_seconds";
    family(&mut out, name, "histogram", "Time a pass spent on a kind.");
    for (k, km) in kinds {
        histogram(&mut out, name, &format!("kind=\"{k}\""), &km.duration);
    }
    let name = "poolkeeper_claim_bind_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "From a claim's arrival in the queue to Bound.",
    );
    histogram(&mut out, name, "", &m.bind_latency);
    let name = "poolkeeper_store_commit_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Writing and flushing one batch of the state store (every Bound waits for it).",
    );
    histogram(&mut out, name, "", &m.store_commit);
    let name = "poolkeeper_store_deferred_commits_total";
    family(
        &mut out,
        name,
        "counter",
        "Batches of the state store written without a flush of their own (what a restart derives again: a deleted claim's end, an instance gone); the next flush covers them.",
    );
    let _ = writeln!(out, "{name} {}", m.store_deferred);
    let pools: Vec<&ObjectView> = snap
        .objects
        .iter()
        .filter(|o| o.kind == Kind::Pool)
        .collect();
    let per_pool = [
        ("instances", "", "gauge", "Instances of the pool."),
        ("warm", "", "gauge", "Ready, unbound instances."),
        ("bound", "", "gauge", "Instances bound to claims."),
        ("queued", "", "gauge", "Claims waiting for an instance."),
        (
            "hits",
            "_total",
            "counter",
            "Claims bound at once from a warm instance.",
        ),
        ("misses", "_total", "counter", "Claims that had to wait."),
    ];
    for (field, suffix, kind, help) in per_pool {
        let name = format!("poolkeeper_pool_{field}{suffix}");
        family(&mut out, &name, kind, help);
        for p in &pools {
            let v = p.status.get(field).and_then(Value::as_u64).unwrap_or(0);
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {v}", p.name);
        }
    }
    out
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &crate::engine::metrics::Histogram) {
    use std::fmt::Write;
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, n) in h.cumulative() {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}

async fn list_kind(state: &ApiState, headers: &HeaderMap, kind: Kind) -> ApiResult<Json<Value>> {
    let (who, snap) = caller(state, headers).await?;
    if kind == Kind::Deployment && who != Caller::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "deployments are for admins",
        ));
    }
    let items: Vec<Value> = snap
        .objects
        .iter()
        .filter(|o| o.kind == kind && visible(&who, o))
        .map(shown)
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn get_kind(
    state: &ApiState,
    headers: &HeaderMap,
    kind: Kind,
    name: &str,
) -> ApiResult<Json<Value>> {
    let (who, snap) = caller(state, headers).await?;
    snap.objects
        .iter()
        .find(|o| o.kind == kind && o.name == name && visible(&who, o))
        .map(|o| Json(shown(o)))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no {kind:?} {name:?}")))
}

async fn list(
    State(state): State<Arc<ApiState>>,
    UrlPath(kind): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    list_kind(&state, &headers, kind_of(&kind)?).await
}

async fn get_one(
    State(state): State<Arc<ApiState>>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    get_kind(&state, &headers, kind_of(&kind)?, &name).await
}

async fn list_claims(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    list_kind(&state, &headers, Kind::Claim).await
}

async fn get_claim(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let Json(mut v) = get_kind(&state, &headers, Kind::Claim, &name).await?;
    // A reservation's claim shows where its callback stands.
    if let Some(r) = read_reservation(&state.dir, &name) {
        v["reservation"] = serde_json::to_value(&r).unwrap_or(Value::Null);
    }
    Ok(Json(v))
}

/// Server-Sent Events: each change of a claim's phase that the caller may see, as
/// `event: claim` with `{"claim", "user", "phase"}`, from the moment of the request.
async fn events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<
    axum::response::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
> {
    let who = who(&state, &headers)?;
    let rx = state
        .handle
        .subscribe()
        .map_err(|_| ApiError::unavailable())?;
    let stream = futures::stream::unfold((rx, who), |(mut rx, who)| async move {
        loop {
            let change = rx.recv().await?;
            if !who.sees_user(&change.user) {
                continue;
            }
            let data = json!({"claim": change.name, "user": change.user, "phase": change.phase});
            let ev = axum::response::sse::Event::default()
                .event("claim")
                .data(data.to_string());
            return Some((Ok(ev), (rx, who)));
        }
    });
    Ok(axum::response::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}

/// A claim as the API takes it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewClaim {
    /// Default: `USER-POOL-` and six random characters.
    #[serde(default)]
    pub name: Option<String>,
    pub pool: String,
    /// Default: the caller (admins must name one).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ttl: Option<String>,
    /// Relative path -> content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// A refusal of the engine's admission (`core::claims::admit`, over the user's claims and the
/// new one: the engine stays the authority), as the API answers it.
fn refused((reason, message): (&'static str, String)) -> ApiError {
    match reason {
        "PoolNotFound" => ApiError::field(StatusCode::NOT_FOUND, "pool", message),
        "UserNotFound" => ApiError::field(StatusCode::NOT_FOUND, "user", message),
        "UserDisabled" => ApiError::field(StatusCode::FORBIDDEN, "user", message),
        "PoolNotAllowed" => ApiError::field(StatusCode::FORBIDDEN, "pool", message),
        _ => ApiError::new(StatusCode::FORBIDDEN, message),
    }
}

pub(crate) fn managed_dir(dir: &Path) -> PathBuf {
    dir.join(MANAGED_CLAIMS)
}

/// The file of claim `name` made through the API (or a webhook).
fn managed_file(dir: &Path, name: &str) -> PathBuf {
    managed_dir(dir).join(format!("{name}.yaml"))
}

/// Removes the file of a claim made through the API (durably), and what the watcher was to
/// take from it: whether it was there.
async fn remove_claim_file(state: &ApiState, path: &Path) -> std::io::Result<bool> {
    state.prepared.forget(path);
    state.files.remove_if_present(path.to_path_buf()).await
}

fn claim_file_text(name: &str, spec: &ClaimSpec) -> Result<String, String> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc<'a> {
        api_version: &'a str,
        kind: &'a str,
        metadata: BTreeMap<&'a str, &'a str>,
        spec: &'a ClaimSpec,
    }
    let doc = Doc {
        api_version: "poolkeeper.dev/v1alpha1",
        kind: "Claim",
        metadata: BTreeMap::from([("name", name)]),
        spec,
    };
    serde_saphyr::to_string(&doc).map_err(|e| e.to_string())
}

/// Where a claim file's one document starts, as the loader reports it: the claim applied
/// from the API and the one the watcher then reads are the same object.
fn claim_file_origin(path: &Path) -> Origin {
    Origin {
        file: path.to_path_buf(),
        line: 1,
        col: 1,
    }
}

fn random_suffix() -> String {
    use rand::{Rng, SeedableRng};
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ u64::from(std::process::id()));
    (0..6)
        .map(|_| {
            let n = rng.random_range(0..36u8);
            char::from(if n < 10 { b'0' + n } else { b'a' + n - 10 })
        })
        .collect()
}

async fn create_claim(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<NewClaim>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let who = who(&state, &headers)?;
    let Json(req) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let user = match (&who, &req.user) {
        (Caller::User(me), None) => me.clone(),
        (Caller::User(me), Some(u)) if u == me => me.clone(),
        (Caller::User(_), Some(_)) => {
            return Err(ApiError::field(
                StatusCode::FORBIDDEN,
                "user",
                "a user makes claims for themselves only",
            ));
        }
        (Caller::Admin, Some(u)) => u.clone(),
        (Caller::Admin, None) => {
            return Err(ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "user",
                "an admin must say for which user",
            ));
        }
    };
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("{user}-{}-{}", req.pool, random_suffix()));
    let spec = ClaimSpec {
        pool: req.pool.clone(),
        user: user.clone(),
        ttl: req.ttl.clone(),
        files: req.files.clone(),
        files_from: None,
    };
    if let Err(e) = crate::units::check_name(&name) {
        return Err(ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "name", e));
    }
    if let Some(e) =
        crate::validate::validate_object(&name, &crate::model::Spec::Claim(spec.clone()))
            .into_iter()
            .next()
    {
        let field = e.path.trim_start_matches("spec.").to_owned();
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            &field,
            e.message,
        ));
    }
    let path = managed_file(&state.dir, &name);
    match create_and_write(&state, &name, spec.clone(), &path, || Ok(())).await? {
        Creation::Created => Ok((
            StatusCode::CREATED,
            Json(
                json!({"name": name, "created": true, "file": format!("{MANAGED_CLAIMS}/{name}.yaml")}),
            ),
        )),
        // The same request again (a retry) is answered as the first one; another spec under
        // the same name is a conflict.
        Creation::Exists(existing)
            if existing.spec == spec && existing.origin.file == path && who.sees_user(&user) =>
        {
            Ok((
                StatusCode::OK,
                Json(json!({"name": name, "created": false})),
            ))
        }
        Creation::Exists(_) => Err(ApiError::field(
            StatusCode::CONFLICT,
            "name",
            format!("a claim named {name:?} exists"),
        )),
        Creation::Refused(reason, message) => Err(refused((reason, message))),
    }
}

/// Creates claim `name` declared in `path`. The engine admits and applies it in one step (two
/// requests at a user's quota cannot both pass); then `record` runs and the claim's file is
/// written, the record that survives restarts. Should either fail, the engine forgets the
/// claim again and the caller gets the error. Nothing is written unless the answer is
/// `Created`.
async fn create_and_write(
    state: &ApiState,
    name: &str,
    spec: ClaimSpec,
    path: &Path,
    record: impl FnOnce() -> std::io::Result<()>,
) -> ApiResult<Creation> {
    let text = claim_file_text(name, &spec)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let claim = Object {
        name: name.to_owned(),
        spec: Spec::Claim(spec),
        origin: claim_file_origin(path),
        generation: 1,
    };
    let creation = state
        .handle
        .create_claim(claim.clone())
        .await
        .map_err(|_| ApiError::unavailable())?;
    if !matches!(creation, Creation::Created) {
        return Ok(creation);
    }
    let text = text.into_bytes();
    state
        .prepared
        .put(path.to_path_buf(), text.clone(), vec![claim]);
    let written = match record() {
        Ok(()) => state.files.create(path.to_path_buf(), text).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        state.prepared.forget(path);
        let _ = state.handle.delete(ObjKey::new(Kind::Claim, name));
        // A file of that name that holds no claim (one that does not load, say) is someone's
        // to look at: it is left as it is.
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{} exists but holds no claim {name} that loaded: fix or remove it",
                    path.display()
                ),
            ));
        }
        if path.exists() {
            let _ = state.files.remove(path.to_path_buf()).await;
        }
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("writing the claim: {e}"),
        ));
    }
    Ok(creation)
}

/// Files into a bound claim's instance, under its pool's `files.mountPath`: a tar archive, or
/// a `multipart/form-data` form whose file parts are the files (`curl -F file=@index.html`).
/// Only regular files with plain relative paths: no links, no `..`, nothing absolute (checked
/// before anything is written).
async fn upload_files(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let who = who(&state, &headers)?;
    if claim_seen(&state, &who, &name).await?.is_none() {
        return Err(no_claim(&name));
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let files = if crate::upload::is_multipart(content_type) {
        crate::upload::parse_multipart(content_type, body).await
    } else {
        crate::engine::parse_tar(&body[..], "the upload")
    }
    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    if files.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the upload holds no files (send a tar archive or a multipart form)",
        ));
    }
    use crate::engine::PutFilesError;
    match state.handle.put_files(&name, files).await {
        Ok(Ok(n)) => Ok(Json(json!({"claim": name, "files": n}))),
        Ok(Err(e @ (PutFilesError::NotBound(_) | PutFilesError::NoMountPath(_)))) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_GATEWAY, e.to_string())),
        Err(_) => Err(ApiError::unavailable()),
    }
}

async fn delete_claim(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let who = who(&state, &headers)?;
    let Some(o) = claim_seen(&state, &who, &name).await? else {
        return Err(no_claim(&name));
    };
    let path = managed_file(&state.dir, &name);
    if o.origin.file != path {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("claim {name} is declared in {}: release it there", o.origin),
        ));
    }
    let removed = remove_claim_file(&state, &path).await;
    let _ = state
        .handle
        .delete(crate::model::ObjKey::new(Kind::Claim, &name));
    match removed {
        // Not there: released by an earlier call the watcher has not reported yet, the same
        // answer.
        Ok(_) => Ok(Json(json!({"name": name, "released": true}))),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("removing the claim: {e}"),
        )),
    }
}

// ---- admin operations ------------------------------------------------------------------------

fn admin_only(who: &Caller) -> ApiResult<()> {
    match who {
        Caller::Admin => Ok(()),
        Caller::User(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this is an admin operation",
        )),
    }
}

/// A declared object's file, which must lie in the watched folder.
fn declared_file(state: &ApiState, o: &ObjectView) -> ApiResult<PathBuf> {
    let file = o.origin.file.clone();
    if file.as_os_str().is_empty() || !file.starts_with(&state.dir) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{:?} {} is not declared in a file of the watched folder",
                o.kind, o.name
            ),
        ));
    }
    Ok(file)
}

fn read_declared(file: &Path) -> ApiResult<String> {
    std::fs::read_to_string(file).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("reading {}: {e}", file.display()),
        )
    })
}

fn relative(state: &ApiState, file: &Path) -> String {
    file.strip_prefix(&state.dir)
        .unwrap_or(file)
        .display()
        .to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scale {
    warm: u32,
}

/// Sets a pool's `spec.warm` in the file that declares it (the declared spec, not just the
/// running state); the watcher applies it like any other edit.
async fn scale_pool(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<Scale>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    let Json(req) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let _one = state.edits.lock().await;
    let snap = snapshot(&state).await?;
    let pool = snap
        .objects
        .iter()
        .find(|o| o.kind == Kind::Pool && o.name == name && !o.spec.is_null())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no Pool {name:?}")))?;
    let file = declared_file(&state, pool)?;
    let text = read_declared(&file)?;
    let was = pool.spec.get("warm").and_then(Value::as_u64);
    let new = crate::edit::scale_pool(&file, &text, &name, req.warm)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    state
        .files
        .write(file.clone(), new.into_bytes())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing {}: {e}", file.display()),
            )
        })?;
    Ok(Json(
        json!({"pool": name, "warm": req.warm, "was": was, "file": relative(&state, &file)}),
    ))
}

/// Replaces every warm instance of a pool with a fresh one.
async fn reinitialise_pool(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    match state.handle.reinitialise(&name).await {
        Ok(Some(n)) => Ok(Json(json!({"pool": name, "replaced": n}))),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no Pool {name:?}"),
        )),
        Err(_) => Err(ApiError::unavailable()),
    }
}

async fn get_user(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    get_kind(&state, &headers, Kind::User, &name).await
}

/// Releases every claim of `user`: API claims lose their files, claims declared in other
/// files lose their documents (the rest of each file is kept). Returns the claims released.
async fn release_claims_of(
    state: &ApiState,
    snap: &Snapshot,
    user: &str,
) -> ApiResult<Vec<String>> {
    let managed = managed_dir(&state.dir);
    let mut by_file: BTreeMap<PathBuf, Vec<&ObjectView>> = BTreeMap::new();
    for o in snap.objects.iter().filter(|o| {
        o.kind == Kind::Claim && o.spec.get("user").and_then(Value::as_str) == Some(user)
    }) {
        by_file.entry(declared_file(state, o)?).or_default().push(o);
    }
    let mut released = Vec::new();
    for (file, claims) in by_file {
        if file.parent() == Some(managed.as_path()) {
            remove_claim_file(state, &file)
                .await
                .map_err(|e| changing(&file, e))?;
        } else {
            let mut text = Some(read_declared(&file)?);
            for c in &claims {
                let Some(t) = &text else { break };
                text = crate::edit::remove_object(
                    &file,
                    t,
                    &crate::model::ObjKey::new(Kind::Claim, &c.name),
                )
                .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
            }
            put_edited(state, &file, text).await?;
        }
        for c in claims {
            let _ = state
                .handle
                .delete(crate::model::ObjKey::new(Kind::Claim, &c.name));
            released.push(c.name.clone());
        }
    }
    released.sort();
    Ok(released)
}

fn changing(file: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("changing {}: {e}", file.display()),
    )
}

/// Writes an edited declared file, or removes it when the edit left no object in it.
async fn put_edited(state: &ApiState, file: &Path, text: crate::edit::Edited) -> ApiResult<()> {
    let r = match text {
        Some(t) => state.files.write(file.to_path_buf(), t.into_bytes()).await,
        None => state.files.remove(file.to_path_buf()).await,
    };
    r.map_err(|e| changing(file, e))
}

fn find_user<'a>(snap: &'a Snapshot, name: &str) -> ApiResult<&'a ObjectView> {
    snap.objects
        .iter()
        .find(|o| o.kind == Kind::User && o.name == name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no User {name:?}")))
}

/// Releases all of a user's claims.
async fn release_user(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    let _one = state.edits.lock().await;
    let snap = snapshot(&state).await?;
    find_user(&snap, &name)?;
    let released = release_claims_of(&state, &snap, &name).await?;
    Ok(Json(json!({"user": name, "released": released})))
}

/// Deletes a user: their claims are released, then the user's document is removed from the
/// file that declares it.
async fn delete_user(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    let _one = state.edits.lock().await;
    let snap = snapshot(&state).await?;
    let user = find_user(&snap, &name)?;
    let file = declared_file(&state, user)?;
    // Checked before any claim is released: a user who cannot be removed keeps everything.
    let text = read_declared(&file)?;
    let key = crate::model::ObjKey::new(Kind::User, &name);
    crate::edit::remove_object(&file, &text, &key)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    let released = release_claims_of(&state, &snap, &name).await?;
    // Read again: releasing claims may have edited the same file.
    let text = read_declared(&file)?;
    let edited = crate::edit::remove_object(&file, &text, &key)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    put_edited(&state, &file, edited).await?;
    let _ = state.handle.delete(key);
    Ok(Json(
        json!({"user": name, "deleted": true, "file": relative(&state, &file), "released": released}),
    ))
}

// ---- reservations by webhook ----------------------------------------------------------------

/// What poolkeeper keeps of a reservation, beside its claim file: who asked, and where the
/// callback stands. In the state folder (`DIR/.poolkeeper/reservations/CLAIM.json`), which the
/// watcher does not load as specs.
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

fn reservation_path(dir: &Path, claim: &str) -> PathBuf {
    crate::cli::state_dir(dir)
        .join("reservations")
        .join(format!("{claim}.json"))
}

fn read_reservation(dir: &Path, claim: &str) -> Option<Reservation> {
    let bytes = std::fs::read(reservation_path(dir, claim)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_reservation(dir: &Path, claim: &str, r: &Reservation) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
    crate::filewriter::write_now(&reservation_path(dir, claim), &bytes)
}

/// Where the webhook signatures seen are kept.
fn seen_path(dir: &Path) -> PathBuf {
    crate::cli::state_dir(dir).join("webhook-signatures.json")
}

/// The signatures recorded before a restart; none when the file is not there yet. A file that
/// cannot be read is an error naming it, not a fresh start that would accept replays.
fn read_seen(path: &Path) -> std::io::Result<crate::webhook::SeenSignatures> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("reading {}: {e}", path.display()),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: line {} column {}: {e} (the webhook signatures seen; remove the file \
                 only if no signed request of the last {} s may be replayed)",
                path.display(),
                e.line(),
                e.column(),
                crate::webhook::REPLAY_WINDOW_SECS
            ),
        )
    })
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    let now = unix_now();
    let signed =
        crate::webhook::verify(&cfg.secret, header(HEADER_TIMESTAMP), signature, &body, now)
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    let event: crate::webhook::ReservationEvent = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    {
        // Recorded durably before anything is done: a crash after acting cannot make the
        // same request acceptable again. Requests wait on each other here (webhooks are
        // rare); the file is then written in the order its records were made.
        let mut seen = state.seen.lock().await;
        if !seen.record(&signed, now) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "this signed request was already received (a replay)",
            ));
        }
        let written = match serde_json::to_vec(&*seen) {
            Ok(bytes) => state.files.write(seen_path(&state.dir), bytes).await,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let Err(e) = written {
            seen.forget(&signed);
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("recording the request's signature: {e}"),
            ));
        }
    }
    let name = crate::webhook::claim_name(&event.resource_name);
    let path = managed_file(&state.dir, &name);
    match event.event.as_str() {
        "release" => {
            let existed = remove_claim_file(&state, &path).await.map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("removing the claim: {e}"),
                )
            })?;
            let record = reservation_path(&state.dir, &name);
            if let Err(e) = state.files.remove_if_present(record).await {
                tracing::warn!(claim = %name, error = %e, "cannot remove the reservation's record");
            }
            if existed {
                let _ = state
                    .handle
                    .delete(crate::model::ObjKey::new(Kind::Claim, &name));
            }
            Ok((
                StatusCode::OK,
                Json(json!({"claim": name, "released": existed})),
            ))
        }
        "provision" => provision(&state, cfg, &event, &name, &path).await,
        other => Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "event",
            format!("unknown event {other:?}: provision or release"),
        )),
    }
}

async fn provision(
    state: &ApiState,
    cfg: &WebhookConfig,
    event: &crate::webhook::ReservationEvent,
    name: &str,
    path: &Path,
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
    // A duplicate (the same reservation sent again) changes nothing.
    if path.exists() {
        return Ok((
            StatusCode::OK,
            Json(json!({"claim": name, "pool": pool, "created": false})),
        ));
    }
    let spec = ClaimSpec {
        pool: pool.clone(),
        user: event.username.clone(),
        ttl: None,
        files: BTreeMap::new(),
        files_from: None,
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
    // The record before the claim's file: a crash between the two leaves a record without a
    // claim (harmless), never a claim whose callback is forgotten.
    let creation = create_and_write(state, name, spec, path, || {
        write_reservation(&state.dir, name, &record)
    })
    .await?;
    match creation {
        Creation::Created => {}
        // The same reservation, sent again while the first was being written.
        Creation::Exists(c) if c.origin.file == path => {
            return Ok((
                StatusCode::OK,
                Json(json!({"claim": name, "pool": pool, "created": false})),
            ));
        }
        Creation::Exists(_) => {
            return Err(ApiError::field(
                StatusCode::CONFLICT,
                "resource_name",
                format!("a claim named {name:?} exists and is not this reservation's"),
            ));
        }
        Creation::Refused(reason, message) => return Err(refused((reason, message))),
    }
    // What the pool's template decides, not the request.
    let p = &event.custom_parameters;
    let ignored: Vec<&str> = [
        ("cpu_limit", p.cpu_limit.is_some()),
        ("memory_limit", p.memory_limit.is_some()),
        ("ports", p.ports.is_some()),
        ("environment", p.environment.is_some()),
    ]
    .into_iter()
    .filter(|(_, given)| *given)
    .map(|(n, _)| n)
    .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({"claim": name, "pool": pool, "created": true,
            "ignored": ignored, "note": "the pool's template sets limits, ports and environment"})),
    ))
}

/// Delivers callbacks: when a reservation's claim is Bound (or Failed), POSTs the access
/// details, signed, to `url`; retried with backoff (0.5 s doubling, 8 attempts); the state is
/// kept in the reservation record and shown on the claim.
async fn callbacks(
    handle: EngineHandle,
    dir: PathBuf,
    target: Arc<crate::notify::Target>,
    secret: Vec<u8>,
) {
    let Ok(mut changes) = handle.subscribe() else {
        return;
    };
    // Reservations pending from before a restart are looked at once at start.
    let pending: Vec<String> = std::fs::read_dir(crate::cli::state_dir(&dir).join("reservations"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .collect();
    let in_flight = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    for claim in pending {
        consider(&handle, &dir, &target, &secret, &claim, &in_flight).await;
    }
    while let Some(change) = changes.recv().await {
        if matches!(
            change.phase,
            crate::api::ClaimPhase::Bound | crate::api::ClaimPhase::Failed
        ) {
            consider(&handle, &dir, &target, &secret, &change.name, &in_flight).await;
        }
    }
}

async fn consider(
    handle: &EngineHandle,
    dir: &Path,
    target: &Arc<crate::notify::Target>,
    secret: &[u8],
    claim: &str,
    in_flight: &Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
) {
    let Some(record) = read_reservation(dir, claim) else {
        return;
    };
    if record.callback.state != "Pending" {
        return;
    }
    let Ok(snap) = handle.snapshot().await else {
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
        let mut f = in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if !f.insert(claim.to_owned()) {
            return;
        }
    }
    let (dir, target, secret, claim, flight) = (
        dir.to_path_buf(),
        target.clone(),
        secret.to_vec(),
        claim.to_owned(),
        in_flight.clone(),
    );
    tokio::spawn(async move {
        let bytes = body.to_string().into_bytes();
        let mut record = record;
        record.callback.event = Some(event.to_owned());
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=8u32 {
            let r = target.post_signed(&secret, &bytes).await;
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
            // The claim may have been released meanwhile: then its record is gone, and stays so.
            if read_reservation(&dir, &claim).is_some() {
                let _ = write_reservation(&dir, &claim, &record);
            }
            if record.callback.state != "Pending" {
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&claim);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare_whole() {
        let a = sha256("secret");
        assert!(same(&a, &sha256("secret")));
        assert!(!same(&a, &sha256("secreT")));
    }

    #[test]
    fn a_claim_file_reads_back_as_the_claim() {
        let spec = ClaimSpec {
            pool: "web".into(),
            user: "alice".into(),
            ttl: None,
            files: BTreeMap::from([("index.html".into(), "<h1>hi</h1>\n".into())]),
            files_from: None,
        };
        let text = claim_file_text("alice-web-1", &spec).expect("yaml");
        let path = Path::new("managed/claims/alice-web-1.yaml");
        let parsed = crate::loader::parse_text(path, &text);
        assert!(parsed.is_clean(), "{:?}", parsed.diagnostics);
        let objs = parsed.objects;
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].name, "alice-web-1");
        assert_eq!(objs[0].spec, crate::model::Spec::Claim(spec));
        // What the API hands the engine is what the watcher will read.
        assert_eq!(objs[0].origin, claim_file_origin(path));
    }
}
