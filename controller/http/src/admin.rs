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
    scale(&state, &name, req.warm).await.map(Json)
}

pub(crate) async fn scale(state: &ApiState, name: &str, warm: u32) -> ApiResult<Value> {
    let scaled = state.declare.scale_pool(name, warm).await?;
    Ok(json!({"pool": name, "warm": warm, "was": scaled.was, "file": scaled.at}))
}

/// Replaces every warm instance of a pool with a fresh one.
pub(crate) async fn reinitialise_pool(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    reinitialise(&state, &name).await.map(Json)
}

pub(crate) async fn reinitialise(state: &ApiState, name: &str) -> ApiResult<Value> {
    match state.handle.reinitialise(name).await {
        Ok(Some(n)) => Ok(json!({"pool": name, "replaced": n})),
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
    release_user_claims(&state, &name).await.map(Json)
}

pub(crate) async fn release_user_claims(state: &ApiState, name: &str) -> ApiResult<Value> {
    let released = in_turns_of_claims_of(state, name, |declare, name| async move {
        declare.release_claims_of(&name).await
    })
    .await?;
    Ok(json!({"user": name, "released": released}))
}

/// Runs `change` (given the source and `user`) in the turns of `user`'s claims, carried
/// through should the client go away (see [`crate::serial`]).
async fn in_turns_of_claims_of<T, F, Fut>(state: &ApiState, user: &str, change: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(Arc<dyn poolkeeper_engine::source::Declare>, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, poolkeeper_engine::source::DeclareError>>
        + Send
        + 'static,
{
    let turns = turns_of_claims_of(state, user).await?;
    let (declare, user) = (state.declare.clone(), user.to_owned());
    Ok(crate::serial::detached(async move {
        let _turns = turns;
        change(declare, user).await
    })
    .await??)
}

/// The turns (see [`crate::serial`]) of every claim `user` has now: a request still making
/// one of them ends first, so that releasing the user's claims releases it too.
async fn turns_of_claims_of(
    state: &ApiState,
    user: &str,
) -> ApiResult<Vec<tokio::sync::OwnedMutexGuard<()>>> {
    let snap = crate::auth::snapshot(state).await?;
    let names: std::collections::BTreeSet<String> =
        snap.claims_of(user).map(|o| o.name.clone()).collect();
    Ok(state.claims.lock_all(names).await)
}

/// Deletes a user: their claims are released, then the user's declaration is removed.
pub(crate) async fn delete_user(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin_only(&who(&state, &headers)?)?;
    remove_user(&state, &name).await.map(Json)
}

pub(crate) async fn remove_user(state: &ApiState, name: &str) -> ApiResult<Value> {
    let deleted = in_turns_of_claims_of(state, name, |declare, name| async move {
        declare.delete_user(&name).await
    })
    .await?;
    Ok(json!({"user": name, "deleted": true, "file": deleted.at, "released": deleted.released}))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Password {
    password_hash: String,
}

/// Sets a user's `passwordHash` (an argon2id PHC string, made by the client: the password never
/// reaches the server): the admin for anyone, a user for themselves.
pub(crate) async fn set_password(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<Password>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let who = who(&state, &headers)?;
    if !who.sees_user(&name) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "a user sets their own password only",
        ));
    }
    let Json(req) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    if !poolkeeper_kinds::validate::is_argon2id_phc(&req.password_hash) {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "passwordHash",
            poolkeeper_kinds::validate::PASSWORD_HASH_MESSAGE,
        ));
    }
    if !poolkeeper_kinds::validate::argon2_cost_allowed(&req.password_hash) {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "passwordHash",
            poolkeeper_kinds::validate::PASSWORD_COST_MESSAGE,
        ));
    }
    let at = state
        .declare
        .set_password(&name, &req.password_hash)
        .await?;
    // Whoever signed in with the old password is signed out now, not at their next page.
    state.console.sign_out_user(&name);
    Ok(Json(json!({"user": name, "password": "set", "file": at})))
}
