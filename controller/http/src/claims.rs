//! Claims made and released by people and scripts, and files uploaded into their instances.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use poolkeeper_engine::source::Created;
use poolkeeper_kinds::ClaimSpec;

use crate::ApiState;
use crate::auth::{Caller, claim_seen, no_claim, who};
use crate::error::{ApiError, ApiResult};

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
    /// Cpu and memory for the instance while the claim holds it, within the pool's
    /// `claimResources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<poolkeeper_kinds::Resources>,
}

/// A refusal of the engine's admission (`core::claims::admit`, over the user's claims and the
/// new one: the engine stays the authority), as the API answers it.
pub(crate) fn refused((reason, message): (&'static str, String)) -> ApiError {
    match reason {
        "PoolNotFound" => ApiError::field(StatusCode::NOT_FOUND, "pool", message),
        "UserNotFound" => ApiError::field(StatusCode::NOT_FOUND, "user", message),
        "UserDisabled" => ApiError::field(StatusCode::FORBIDDEN, "user", message),
        "PoolNotAllowed" => ApiError::field(StatusCode::FORBIDDEN, "pool", message),
        "ResourcesNotAllowed" => {
            ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "resources", message)
        }
        "StoreUnwritable" => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, message),
        _ => ApiError::new(StatusCode::FORBIDDEN, message),
    }
}

/// A claim's name when its request gives none: `USER-POOL-xxxxxx`, the first part cut so that
/// the whole stays a valid name (at most 63 characters) however long the two names are.
fn generated_name(user: &str, pool: &str) -> String {
    let base: String = format!("{user}-{pool}").chars().take(63 - 7).collect();
    format!("{}-{}", base.trim_end_matches('-'), random_suffix())
}

pub(crate) fn random_suffix() -> String {
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

pub(crate) async fn create_claim(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Json<NewClaim>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let who = who(&state, &headers)?;
    let Json(req) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    make_claim(&state, &who, req)
        .await
        .map(|(code, v)| (code, Json(v)))
}

/// Makes the claim `req` for `who` (the API's POST and the console's launch): 201 when new,
/// 200 for the same request again.
pub(crate) async fn make_claim(
    state: &ApiState,
    who: &Caller,
    req: NewClaim,
) -> ApiResult<(StatusCode, Value)> {
    let user = match (who, &req.user) {
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
    let name = match &req.name {
        // The webhook's claims: a name taken here first would answer a booking system's
        // reservation as made while no claim of it exists (and hand the taker its place).
        Some(n) if n.starts_with(crate::webhook::RESERVATION_PREFIX) => {
            return Err(ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "name",
                format!(
                    "names starting with {:?} are kept for reservations made by webhooks",
                    crate::webhook::RESERVATION_PREFIX
                ),
            ));
        }
        Some(n) => n.clone(),
        None => generated_name(&user, &req.pool),
    };
    let spec = ClaimSpec {
        pool: req.pool.clone(),
        user: user.clone(),
        ttl: req.ttl.clone(),
        files: req.files.clone(),
        files_from: None,
        resources: req.resources.clone(),
    };
    if let Err(e) = poolkeeper_kinds::units::check_name(&name) {
        return Err(ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "name", e));
    }
    if let Some(e) = poolkeeper_kinds::validate::validate_object(
        &name,
        &poolkeeper_kinds::Spec::Claim(spec.clone()),
    )
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
    // The name's turn (a retry of this request is answered once this one is durable), and
    // the work carried through should the client go away.
    let created = crate::serial::detached({
        let (declare, claims) = (state.declare.clone(), state.claims.clone());
        let (name, spec) = (name.clone(), spec.clone());
        async move {
            let _turn = claims.lock(&name).await;
            declare.create_claim(&name, spec, None).await
        }
    })
    .await??;
    match created {
        Created::New { at } => Ok((
            StatusCode::CREATED,
            json!({"name": name, "created": true, "file": at}),
        )),
        // The same request again (a retry) is answered as the first one; another spec under
        // the same name is a conflict.
        Created::Exists(existing)
            if existing.spec == spec
                && state.declare.made_here(&name, &existing.origin)
                && who.sees_user(&user) =>
        {
            Ok((StatusCode::OK, json!({"name": name, "created": false})))
        }
        Created::Exists(_) => Err(ApiError::field(
            StatusCode::CONFLICT,
            "name",
            format!("a claim named {name:?} exists"),
        )),
        Created::Refused(reason, message) => Err(refused((reason, message))),
    }
}

/// Files into a bound claim's instance, under its pool's `files.mountPath`: a tar archive, or
/// a `multipart/form-data` form whose file parts are the files (`curl -F file=@index.html`).
/// Only regular files with plain relative paths: no links, no `..`, nothing absolute (checked
/// before anything is written).
pub(crate) async fn upload_files(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let who = who(&state, &headers)?;
    put_files(&state, &who, &name, &headers, body)
        .await
        .map(Json)
}

/// Puts the files of an upload (`headers` say whether it is a tar or a multipart form) into
/// claim `name`'s instance, if `who` may see the claim.
pub(crate) async fn put_files(
    state: &ApiState,
    who: &Caller,
    name: &str,
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Value> {
    let Some(claim) = claim_seen(state, who, name).await? else {
        return Err(no_claim(name));
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let files = if crate::upload::is_multipart(content_type) {
        crate::upload::parse_multipart(content_type, body).await
    } else {
        poolkeeper_core::files::parse_tar(&body[..], "the upload")
    }
    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    if files.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the upload holds no files (send a tar archive or a multipart form)",
        ));
    }
    use poolkeeper_engine::PutFilesError;
    // Into the claim seen above only, an admin's upload too: not into one of another user
    // declared under its name while the body was read.
    match state
        .handle
        .put_files(name, Some(&claim.spec.user), files)
        .await
    {
        Ok(Ok(n)) => Ok(json!({"claim": name, "files": n})),
        Ok(Err(e @ (PutFilesError::NotBound(_) | PutFilesError::NoMountPath(_)))) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_GATEWAY, e.to_string())),
        Err(_) => Err(ApiError::unavailable()),
    }
}

pub(crate) async fn delete_claim(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let who = who(&state, &headers)?;
    release_claim(&state, &who, &name).await.map(Json)
}

/// Releases claim `name` if `who` may see it and it was made through the API.
pub(crate) async fn release_claim(state: &ApiState, who: &Caller, name: &str) -> ApiResult<Value> {
    // After a request still making it: what is released is the claim as made.
    let turn = state.claims.lock(name).await;
    let Some(o) = claim_seen(state, who, name).await? else {
        return Err(no_claim(name));
    };
    if !state.declare.made_here(name, &o.origin) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("claim {name} is declared in {}: release it there", o.origin),
        ));
    }
    // Not recorded any more: released by an earlier call the source has not reported yet,
    // the same answer.
    crate::serial::detached({
        let (declare, name) = (state.declare.clone(), name.to_owned());
        async move {
            let _turn = turn;
            declare.delete_claim(&name).await
        }
    })
    .await??;
    Ok(json!({"name": name, "released": true}))
}

#[cfg(test)]
mod tests {
    use super::generated_name;

    #[test]
    fn a_generated_name_is_valid_however_long_the_user_and_pool_names_are() {
        let long = "a".repeat(63);
        for (user, pool) in [
            ("bob", "web"),
            (long.as_str(), long.as_str()),
            (
                "u",
                "p-------------------------------------------------------------x",
            ),
        ] {
            let name = generated_name(user, pool);
            assert_eq!(poolkeeper_kinds::units::check_name(&name), Ok(()), "{name}");
        }
        assert!(generated_name("bob", "web").starts_with("bob-web-"));
    }
}
