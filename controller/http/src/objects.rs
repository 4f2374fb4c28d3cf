//! Reading objects: lists, one object, the status stream (Server-Sent Events), readiness.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use poolkeeper_engine::status::ObjectView;
use poolkeeper_kinds::Kind;

use crate::ApiState;
use crate::auth::{Caller, caller, who};
use crate::error::{ApiError, ApiResult};

pub(crate) fn kind_of(segment: &str) -> ApiResult<Kind> {
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
pub(crate) fn visible(who: &Caller, o: &ObjectView) -> bool {
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

/// An object as the API shows it: the user's token digest and password hash are not shown.
pub(crate) fn shown(o: &ObjectView) -> Value {
    let mut spec = o.spec.clone();
    if let Some(m) = spec.as_object_mut() {
        m.remove("tokenSha256");
        m.remove("passwordHash");
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

/// Ready when the engine answers within 2 s and the source reaches what it reads from (a
/// Kubernetes API server, say).
pub(crate) async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.handle.snapshot()).await {
        Ok(Ok(snap)) if snap.controller.store_error.is_some() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the state store cannot write: {}",
                snap.controller.store_error.unwrap_or_default()
            ),
        )
        .into_response(),
        Ok(Ok(_)) => match state.health.problem() {
            None => (StatusCode::OK, "ready\n").into_response(),
            Some(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
        },
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine does not answer",
        )
        .into_response(),
    }
}

pub(crate) async fn list_kind(
    state: &ApiState,
    headers: &HeaderMap,
    kind: Kind,
) -> ApiResult<Json<Value>> {
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

pub(crate) async fn get_kind(
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

pub(crate) async fn list(
    State(state): State<Arc<ApiState>>,
    UrlPath(kind): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    list_kind(&state, &headers, kind_of(&kind)?).await
}

pub(crate) async fn get_one(
    State(state): State<Arc<ApiState>>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    get_kind(&state, &headers, kind_of(&kind)?, &name).await
}

pub(crate) async fn list_claims(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    list_kind(&state, &headers, Kind::Claim).await
}

pub(crate) async fn get_claim(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let Json(mut v) = get_kind(&state, &headers, Kind::Claim, &name).await?;
    // A reservation's claim shows where its callback stands.
    if let Some(r) = crate::reservations::read_reservation(state.declare.records(), &name) {
        v["reservation"] = serde_json::to_value(&r).unwrap_or(Value::Null);
    }
    Ok(Json(v))
}

/// The changes an event stream holds for a client that does not read them (see `events`).
const EVENTS_BUFFERED: usize = 1024;

/// The engine's claim changes a stream's reader may see, taken as they come: `admit` says of
/// each change's user whether the reader sees it (`Some(true)`), not (`Some(false)`), or may
/// no longer see anything (`None`: the stream ends). They go into a bounded buffer: a reader
/// that does not read costs at most [`EVENTS_BUFFERED`] changes, then its stream ends (it may
/// connect again) and the engine stops sending to it. A reader gone ends this at once, not at
/// the next change it may see, which may never come.
pub(crate) fn forward_changes<F, Fut>(
    mut changes: tokio::sync::mpsc::UnboundedReceiver<poolkeeper_engine::ClaimChange>,
    mut admit: F,
) -> tokio::sync::mpsc::Receiver<poolkeeper_engine::ClaimChange>
where
    F: FnMut(String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<bool>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(EVENTS_BUFFERED);
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                () = tx.closed() => None,
            };
            let Some(change) = change else { break };
            match admit(change.user.clone()).await {
                None => break,
                Some(false) => {}
                Some(true) => {
                    if tx.try_send(change).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Server-Sent Events: each change of a claim's phase that the caller may see, as
/// `event: claim` with `{"claim", "user", "phase"}`, from the moment of the request.
pub(crate) async fn events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> ApiResult<
    axum::response::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
> {
    who(&state, &headers)?;
    let changes = state
        .handle
        .subscribe()
        .map_err(|_| ApiError::unavailable())?;
    // Decided at each change, with the token as it stands then: a user disabled, deleted or no
    // longer an admin stops seeing at once, and the stream ends.
    let rx = forward_changes(changes, move |user| {
        let seen = who(&state, &headers).ok().map(|who| who.sees_user(&user));
        async move { seen }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let change = rx.recv().await?;
        let data = json!({"claim": change.name, "user": change.user, "phase": change.phase});
        let ev = axum::response::sse::Event::default()
            .event("claim")
            .data(data.to_string());
        Some((Ok(ev), rx))
    });
    Ok(axum::response::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}

pub(crate) async fn get_user(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    get_kind(&state, &headers, Kind::User, &name).await
}
