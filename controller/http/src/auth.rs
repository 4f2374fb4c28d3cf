//! Who is asking: the admin token or a user's (bearer tokens, checked against the engine's token
//! index).

use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use poolkeeper_engine::EngineHandle;
use poolkeeper_engine::status::Snapshot;

use crate::ApiState;
use crate::error::{ApiError, ApiResult};

pub(crate) fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equal without telling, by its timing, where two digests differ.
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    bool::from(a.ct_eq(b))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    User(String),
}

impl Caller {
    pub(crate) fn sees_user(&self, user: &str) -> bool {
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
        Some(owner) if owner.admin => Ok(Caller::Admin),
        Some(owner) => Ok(Caller::User(owner.user)),
        None => Err(unauthorized("unknown token")),
    }
}

pub(crate) async fn snapshot(state: &ApiState) -> ApiResult<Snapshot> {
    state
        .handle
        .snapshot()
        .await
        .map_err(|_| ApiError::unavailable())
}

pub(crate) fn who(state: &ApiState, headers: &HeaderMap) -> ApiResult<Caller> {
    authenticate(headers, state.admin_sha256.as_ref(), &state.handle)
}

pub(crate) async fn caller(state: &ApiState, headers: &HeaderMap) -> ApiResult<(Caller, Snapshot)> {
    let who = who(state, headers)?;
    let snap = snapshot(state).await?;
    Ok((who, snap))
}

/// Claim `name` if the caller may see it.
pub(crate) async fn claim_seen(
    state: &ApiState,
    who: &Caller,
    name: &str,
) -> ApiResult<Option<poolkeeper_engine::ClaimBrief>> {
    let claim = state
        .handle
        .claim(name)
        .await
        .map_err(|_| ApiError::unavailable())?;
    Ok(claim.filter(|c| who.sees_user(&c.spec.user)))
}

pub(crate) fn no_claim(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no Claim {name:?}"))
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
}
