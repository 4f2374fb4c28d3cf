//! Admin operations: scale or reinitialise a pool, release a user's claims, delete a user.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ApiState;
use crate::auth::{Caller, who};
use crate::error::{ApiError, ApiResult};

pub(crate) fn admin_only(who: &Caller) -> ApiResult<()> {
    match who {
        Caller::Admin => Ok(()),
        Caller::User(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this is an admin operation",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scale {
    warm: u32,
}

/// Sets a pool's declared `spec.warm` (in the file that declares it, for the directory
/// source); the source applies it like any other change.
pub(crate) async fn scale_pool(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<Scale>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    let Json(req) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let scaled = state.declare.scale_pool(&name, req.warm).await?;
    Ok(Json(
        json!({"pool": name, "warm": req.warm, "was": scaled.was, "file": scaled.at}),
    ))
}

/// Replaces every warm instance of a pool with a fresh one.
pub(crate) async fn reinitialise_pool(
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

/// Releases all of a user's claims.
pub(crate) async fn release_user(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    let released = state.declare.release_claims_of(&name).await?;
    Ok(Json(json!({"user": name, "released": released})))
}

/// Deletes a user: their claims are released, then the user's declaration is removed.
pub(crate) async fn delete_user(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    let deleted = state.declare.delete_user(&name).await?;
    Ok(Json(
        json!({"user": name, "deleted": true, "file": deleted.at, "released": deleted.released}),
    ))
}
