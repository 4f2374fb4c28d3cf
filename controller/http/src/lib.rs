//! The HTTP API that `poolkeeper run` serves: objects with their status, claims created and
//! released by people and scripts, health.
//!
//! Authentication is a bearer token: the admin token (from `--admin-token-file`) or a user's,
//! whose SHA-256 the `User` declares (`tokenSha256`). A user sees and changes only their own
//! claims and user; an admin sees everything. A claim that is not the caller's answers 404, as
//! one that does not exist: errors never tell what other users have.
//!
//! The server changes declared state only through the source's [`Declare`] (claims made
//! through the API are files in the directory source; objects in a Kubernetes source): it names
//! no file and no API path itself.
//!
//! Where things are: [`auth`] (who is asking), [`objects`] (reading), [`claims`] (claims and
//! uploads), [`admin`], [`reservations`] (webhooks and callbacks), [`metrics`], [`error`],
//! `server` (connections and requests under their limits, every rejection as JSON);
//! [`webhook`] (signatures, payloads), [`notify`] (callback targets), [`upload`] (multipart).

mod admin;
mod auth;
mod claims;
pub mod client;
pub mod console;
mod error;
mod metrics;
pub mod notify;
mod objects;
mod reservations;
mod serial;
mod server;
pub mod upload;
pub mod webhook;

pub use auth::{Caller, authenticate};
pub use claims::NewClaim;
pub use error::ApiError;
pub use metrics::render_metrics;
pub use reservations::{CallbackState, Reservation};

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::get;

use poolkeeper_engine::EngineHandle;
use poolkeeper_engine::limits::{Limits, Refusals};
use poolkeeper_engine::source::{Declare, Health};

/// The API's OpenAPI document (committed; served at `/openapi.json`).
pub const OPENAPI: &str = include_str!("../openapi/openapi.json");

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;

/// Largest upload (a tar of files for a claim's instance).
pub const UPLOAD_LIMIT: usize = 16 << 20;

pub struct ApiState {
    handle: EngineHandle,
    /// How people's changes reach declared state (files in the directory source).
    declare: Arc<dyn Declare>,
    admin_sha256: Option<[u8; 32]>,
    webhooks: Option<WebhookConfig>,
    /// Webhook signatures that could still verify, as kept in the source's records: a request
    /// is acted on only once its signature is recorded there.
    seen: tokio::sync::Mutex<crate::webhook::SeenSignatures>,
    /// One change at a time per claim name (see [`serial`]).
    claims: Arc<serial::ClaimLocks>,
    /// Whether the source reaches what it reads from (`/readyz`).
    health: Health,
    /// The bounds on connections and requests, and the count of what they refused (shared with
    /// the source, which counts its own).
    limits: Limits,
    refusals: Arc<Refusals>,
    /// The web console's sessions and feed.
    console: console::Console,
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
    /// Reads the webhook signatures seen before a restart (an unreadable record is an error
    /// naming it, not a fresh start that would accept replays).
    pub fn new(
        handle: EngineHandle,
        declare: Arc<dyn Declare>,
        admin_token: Option<&str>,
        webhooks: Option<WebhookConfig>,
    ) -> std::io::Result<Self> {
        let seen = match webhooks {
            Some(_) => reservations::read_seen(declare.records())?,
            None => Default::default(),
        };
        Ok(ApiState {
            handle,
            declare,
            admin_sha256: admin_token.map(auth::sha256),
            webhooks,
            seen: tokio::sync::Mutex::new(seen),
            claims: Arc::default(),
            health: Health::default(),
            limits: Limits::default(),
            refusals: Arc::default(),
            console: console::Console::new(console::ConsoleConfig::default()),
        })
    }

    /// Offers the web console under `/ui` as `config` says (default: sign-in only, no
    /// registration).
    pub fn with_console(mut self, config: console::ConsoleConfig) -> Self {
        self.console = console::Console::new(config);
        self
    }

    /// `/readyz` also reports `health` (a source's reach of what it reads from).
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Serves under `limits` (default: [`Limits::default`]), counting refusals in `refusals`.
    pub fn with_limits(mut self, limits: Limits, refusals: Arc<Refusals>) -> Self {
        self.limits = limits;
        self.refusals = refusals;
        self
    }
}

pub fn router(state: ApiState) -> Router {
    use axum::routing::{post, put};
    let state = Arc::new(state);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(objects::readyz))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    OPENAPI,
                )
            }),
        )
        .route(
            "/api/v1/claims",
            get(objects::list_claims).post(claims::create_claim),
        )
        .route(
            "/api/v1/claims/{name}",
            get(objects::get_claim).delete(claims::delete_claim),
        )
        .route(
            "/api/v1/claims/{name}/files",
            put(claims::upload_files).layer(DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route("/webhooks/reservations", post(reservations::reservation))
        .route("/api/v1/events", get(objects::events))
        .route("/api/v1/pools/{name}/scale", post(admin::scale_pool))
        .route(
            "/api/v1/pools/{name}/reinitialise",
            post(admin::reinitialise_pool),
        )
        .route(
            "/api/v1/users/{name}",
            get(objects::get_user).delete(admin::delete_user),
        )
        .route("/api/v1/users/{name}/release", post(admin::release_user))
        .route("/api/v1/users/{name}/password", put(admin::set_password))
        .route("/api/v1/{kind}", get(objects::list))
        .route("/api/v1/{kind}/{name}", get(objects::get_one))
        .merge(console::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            server::guard,
        ))
        .with_state(state)
}

/// Serves the API until the listener fails; with a notification URL, also delivers the
/// reservations' callbacks.
pub async fn serve(listener: tokio::net::TcpListener, state: ApiState) -> std::io::Result<()> {
    if let Some(cfg) = &state.webhooks
        && let Some(target) = cfg.notify.clone()
    {
        tokio::spawn(reservations::callbacks(
            state.handle.clone(),
            state.declare.clone(),
            Arc::new(target),
            cfg.secret.clone(),
            state.claims.clone(),
        ));
    }
    let (limits, refusals) = (state.limits.clone(), state.refusals.clone());
    server::serve_connections(listener, router(state), limits, refusals).await
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
