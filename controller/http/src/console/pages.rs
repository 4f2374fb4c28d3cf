//! The console's pages and forms. Each form posts back with the session's CSRF token and is
//! answered by a redirect (303) to the page, whose next rendering shows the outcome once; the
//! changes themselves are the JSON API's functions (`claims`, `admin`).

use std::sync::{Arc, OnceLock};

use askama::Template;
use axum::extract::{FromRequest, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::Deserialize;
use serde_json::Value;

use poolkeeper_engine::status::Snapshot;
use poolkeeper_kinds::{DeploymentStatus, Kind, Quota, UserSpec};

use super::feed::{EventRow, PoolRow, claim_json, pool_rows};
use super::{
    Credential, PRE_COOKIE, SESSION_COOKIE, Session, cookie, random_token, same_token, set_cookie,
};
use crate::ApiState;
use crate::auth::{Caller, sha256};
use crate::error::ApiError;

/// Pages may not be framed, run inline script or style, or load anything from elsewhere.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The headers of every console answer.
pub(crate) async fn page_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

const CSS: &str = include_str!("../../assets/console.css");
const JS: &str = include_str!("../../assets/console.js");

pub(crate) async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

pub(crate) async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn root() -> Redirect {
    Redirect::to("/ui")
}

fn see(path: &str) -> Response {
    Redirect::to(path).into_response()
}

fn render(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page did not render").into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signing in, registering, signing out

#[derive(Template)]
#[template(path = "signin.html")]
struct SignInPage<'a> {
    title: &'a str,
    csrf: String,
    error: Option<String>,
    registration: bool,
    username: String,
}

#[derive(Template)]
#[template(path = "register.html")]
struct RegisterPage<'a> {
    title: &'a str,
    csrf: String,
    error: Option<String>,
    username: String,
    quota: u32,
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    title: &'a str,
    text: String,
}

fn message(status: StatusCode, title: &str, text: impl Into<String>) -> Response {
    render(
        status,
        &MessagePage {
            title,
            text: text.into(),
        },
    )
}

/// A page before sign-in: its CSRF token is a cookie's, made here when there is none.
fn pre_token(headers: &HeaderMap) -> Option<(String, bool)> {
    match cookie(headers, PRE_COOKIE) {
        Some(t) if t.len() == 64 => Some((t.to_owned(), false)),
        _ => random_token().map(|t| (t, true)),
    }
}

fn with_pre_cookie(mut r: Response, state: &ApiState, token: &str, new: bool) -> Response {
    if new {
        r.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(PRE_COOKIE, Some(token), state.console.config.secure_cookie),
        );
    }
    r
}

fn no_randomness() -> Response {
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "the system gave no randomness for a session; try again",
    )
}

pub(crate) async fn signin_page(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Response {
    if state.console.session(&headers).is_some() {
        return see("/ui");
    }
    signin_form(&state, &headers, StatusCode::OK, None, String::new())
}

fn signin_form(
    state: &ApiState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<String>,
    username: String,
) -> Response {
    let Some((csrf, new)) = pre_token(headers) else {
        return no_randomness();
    };
    let page = SignInPage {
        title: "Sign in",
        csrf: csrf.clone(),
        error,
        registration: state.console.config.allow_registration,
        username,
    };
    with_pre_cookie(render(status, &page), state, &csrf, new)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct SignInForm {
    csrf: String,
    token: String,
    username: String,
    password: String,
}

/// Whether a form's token is the one its cookie (before sign-in) holds.
fn pre_csrf_ok(headers: &HeaderMap, form: &str) -> bool {
    cookie(headers, PRE_COOKIE).is_some_and(|c| same_token(c, form))
}

fn expired_form() -> Response {
    message(
        StatusCode::FORBIDDEN,
        "Form expired",
        "this form's security token does not match your session (it expired, or the form came \
         from another site): reload the page and send it again",
    )
}

pub(crate) async fn signin(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    let addr = super::peer(request.extensions());
    let headers = request.headers().clone();
    let Form(form) = match Form::<SignInForm>::from_request(request, &state).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if !pre_csrf_ok(&headers, &form.csrf) {
        return expired_form();
    }
    let username = form.username.trim().to_owned();
    let mut keys = vec![format!("ip:{addr}")];
    if !username.is_empty() {
        keys.push(format!("user:{username}"));
    }
    let attempt = match state.console.attempt_when_known(&keys).await {
        Ok(a) => a,
        Err(refused) => {
            return signin_form(
                &state,
                &headers,
                StatusCode::TOO_MANY_REQUESTS,
                Some(super::refused_message(&refused, "failed sign-ins")),
                username,
            );
        }
    };
    let outcome = if !form.token.trim().is_empty() {
        token_caller(&state, form.token.trim())
    } else if !username.is_empty() && !form.password.is_empty() {
        password_caller(&state, &username, form.password).await
    } else {
        Err("give a token, or a user name and a password".to_owned())
    };
    match outcome {
        Ok((who, account, credential)) => {
            attempt.succeeded();
            let Some(id) = state.console.sign_in(who, account, credential) else {
                return no_randomness();
            };
            signed_in_answer(&state, &id)
        }
        Err(why) => {
            tracing::info!(address = %addr, user = %username, "a console sign-in failed");
            signin_form(
                &state,
                &headers,
                StatusCode::UNAUTHORIZED,
                Some(why),
                username,
            )
        }
    }
}

/// Who a token or password signs in as, the declared user behind it (none for the admin
/// token), and the credential that did it.
type SignedIn = (Caller, Option<String>, Credential);

/// The answer to a sign-in or a registration that started session `id`: to the page, with
/// the session's cookie, and without the pre-sign-in one.
fn signed_in_answer(state: &ApiState, id: &str) -> Response {
    let mut r = see("/ui");
    let secure = state.console.config.secure_cookie;
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, Some(id), secure),
    );
    h.append(header::SET_COOKIE, set_cookie(PRE_COOKIE, None, secure));
    r
}

fn token_caller(state: &ApiState, token: &str) -> Result<SignedIn, String> {
    let digest = sha256(token);
    if state
        .admin_sha256
        .as_ref()
        .is_some_and(|a| crate::auth::same(a, &digest))
    {
        return Ok((Caller::Admin, None, Credential::Token(digest)));
    }
    let token = Credential::Token(digest);
    match state.handle.token_owner(&digest) {
        Some(o) if o.disabled => Err("this user is disabled".to_owned()),
        Some(o) if o.admin => Ok((Caller::Admin, Some(o.user), token)),
        Some(o) => Ok((Caller::User(o.user.clone()), Some(o.user), token)),
        None => Err("unknown token".to_owned()),
    }
}

/// A hash that matches no password, checked when the user has none, so that a missing user
/// takes as long to refuse as a wrong password.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        let pw = random_token().unwrap_or_else(|| "decoy".to_owned());
        hash_password(&pw).unwrap_or_default()
    })
}

async fn password_caller(
    state: &ApiState,
    username: &str,
    password: String,
) -> Result<SignedIn, String> {
    let wrong = || "wrong user name or password".to_owned();
    let snap = state
        .handle
        .snapshot()
        .await
        .map_err(|_| "the controller is stopping".to_owned())?;
    let user = user_spec(&snap, username);
    let hash = user
        .as_ref()
        .and_then(|u| u.password_hash.clone())
        .unwrap_or_else(|| decoy_hash().to_owned());
    let matches = {
        let Ok(_turn) = state.console.password_work.acquire().await else {
            return Err("the controller is stopping".to_owned());
        };
        tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false)
    };
    match user {
        Some(UserSpec {
            password_hash: Some(hash),
            disabled,
            admin,
            ..
        }) if matches => {
            let account = Some(username.to_owned());
            let credential = Credential::Password(hash);
            if disabled {
                Err("this user is disabled".to_owned())
            } else if admin {
                Ok((Caller::Admin, account, credential))
            } else {
                Ok((Caller::User(username.to_owned()), account, credential))
            }
        }
        _ => Err(wrong()),
    }
}

/// An argon2id hash of `password` (PHC string) with a random salt, with the crate's default
/// parameters (19 MiB, 2 passes): what `passwordHash` holds.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for a salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    // A declared hash passed validate, which bounds its cost; checked again here, where the
    // cost is paid, whatever path the hash came by.
    if !poolkeeper_kinds::validate::argon2_cost_allowed(hash) {
        tracing::warn!("a password hash asks more memory or time than allowed; refused unchecked");
        return false;
    }
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

fn user_spec(snap: &Snapshot, name: &str) -> Option<UserSpec> {
    snap.objects
        .iter()
        .find(|o| o.kind == Kind::User && o.name == name)
        .and_then(|o| serde_json::from_value(o.spec.clone()).ok())
}

pub(crate) async fn register_page(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Response {
    if !state.console.config.allow_registration {
        return registration_off();
    }
    register_form(&state, &headers, StatusCode::OK, None, String::new())
}

fn registration_off() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "Registration is off",
        "this controller does not take registrations (its operator can allow them with \
         --allow-registration); ask the operator for an account",
    )
}

fn register_form(
    state: &ApiState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<String>,
    username: String,
) -> Response {
    let Some((csrf, new)) = pre_token(headers) else {
        return no_randomness();
    };
    let page = RegisterPage {
        title: "Register",
        csrf: csrf.clone(),
        error,
        username,
        quota: state.console.config.registration_quota,
    };
    with_pre_cookie(render(status, &page), state, &csrf, new)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RegisterForm {
    csrf: String,
    username: String,
    password: String,
    confirm: String,
}

/// The shortest password a registration takes.
pub(crate) const MIN_PASSWORD: usize = 8;

pub(crate) async fn register(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    if !state.console.config.allow_registration {
        return registration_off();
    }
    let addr = super::peer(request.extensions());
    let headers = request.headers().clone();
    let Form(form) = match Form::<RegisterForm>::from_request(request, &state).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if !pre_csrf_ok(&headers, &form.csrf) {
        return expired_form();
    }
    let name = form.username.trim().to_owned();
    let keys = vec![format!("ip:{addr}")];
    let refuse =
        |status, why: String| register_form(&state, &headers, status, Some(why), name.clone());
    // Every registration counts against the address, made or refused: one address cannot
    // declare users without bound.
    if let Err(refused) = state.console.attempt_when_known(&keys).await {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            super::refused_message(&refused, "attempts"),
        );
    }
    if let Err(e) = poolkeeper_kinds::units::check_name(&name) {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("user name: {e}"));
    }
    if form.password.chars().count() < MIN_PASSWORD || form.password.len() > 1024 {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("password: at least {MIN_PASSWORD} characters"),
        );
    }
    if form.password != form.confirm {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "password: the two passwords differ".to_owned(),
        );
    }
    let password = form.password;
    let hashed = match state.console.password_work.acquire().await {
        Ok(_turn) => tokio::task::spawn_blocking(move || hash_password(&password)).await,
        Err(_) => Ok(Err("the controller is stopping".to_owned())),
    };
    let hash = match hashed {
        Ok(Ok(h)) => h,
        _ => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the password could not be hashed".to_owned(),
            );
        }
    };
    let spec = UserSpec {
        quota: Quota {
            max_claims: state.console.config.registration_quota,
            pools: Vec::new(),
        },
        password_hash: Some(hash.clone()),
        ..UserSpec::default()
    };
    match state.declare.create_user(&name, spec).await {
        Ok(at) => {
            tracing::info!(user = %name, at = %at, "a user registered through the console");
            let Some(id) = state.console.sign_in(
                Caller::User(name.clone()),
                Some(name.clone()),
                Credential::Password(hash),
            ) else {
                return no_randomness();
            };
            state.console.set_flash(
                &id,
                true,
                format!(
                    "Welcome, {name}: you may hold {} instances at once.",
                    state.console.config.registration_quota
                ),
            );
            signed_in_answer(&state, &id)
        }
        Err(poolkeeper_engine::source::DeclareError::Conflict(_)) => refuse(
            StatusCode::CONFLICT,
            format!("user name: {name:?} is taken"),
        ),
        Err(e) => {
            let e = ApiError::from(e);
            refuse(e.status(), e.words())
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CsrfForm {
    csrf: String,
}

pub(crate) async fn signout(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some((id, s)) = state.console.session(&headers) {
        if !same_token(&s.csrf, &form.csrf) {
            return expired_form();
        }
        state.console.sign_out(&id);
    }
    let mut r = see("/ui/signin");
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, None, state.console.config.secure_cookie),
    );
    r
}

// ---------------------------------------------------------------------------------------------
// Signed-in pages

/// The session of a signed-in page, checked against what is declared now (a user deleted or
/// disabled since is signed out), with the snapshot the page shows.
async fn signed_in(
    state: &ApiState,
    headers: &HeaderMap,
) -> Result<(String, Session, Snapshot), Response> {
    let Some((id, session)) = super::live_session(state, headers).await else {
        return Err(see("/ui/signin"));
    };
    let snap = state.handle.snapshot().await.map_err(|_| {
        message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "the controller is stopping",
        )
    })?;
    Ok((id, session, snap))
}

/// A signed-in form's session, its CSRF token checked.
async fn form_session(
    state: &ApiState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(String, Session), Box<Response>> {
    let Some((id, session)) = super::live_session(state, headers).await else {
        return Err(Box::new(see("/ui/signin")));
    };
    if !same_token(&session.csrf, csrf) {
        return Err(Box::new(expired_form()));
    }
    Ok((id, session))
}

/// One claim as the pages show it.
#[derive(Default)]
pub(crate) struct ClaimRow {
    name: String,
    user: String,
    pool: String,
    phase: String,
    address: String,
    ssh: String,
    expires_at: String,
    queue: String,
}

fn claim_rows(snap: &Snapshot, who: &Caller) -> Vec<ClaimRow> {
    let s = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    snap.objects
        .iter()
        .filter(|o| o.kind == Kind::Claim && crate::objects::visible(who, o))
        .map(|o| {
            let v = claim_json(&o.name, &o.spec, &o.status);
            ClaimRow {
                name: o.name.clone(),
                user: s(&v, "user"),
                pool: s(&v, "pool"),
                phase: s(&v, "phase"),
                address: s(&v, "address"),
                ssh: s(&v, "ssh"),
                expires_at: s(&v, "expiresAt"),
                queue: v
                    .get("queuePosition")
                    .and_then(Value::as_u64)
                    .map(|p| format!("#{p} in the queue"))
                    .unwrap_or_default(),
            }
        })
        .collect()
}

#[derive(Template)]
#[template(path = "mine.html")]
struct MinePage<'a> {
    title: &'a str,
    csrf: String,
    flash: Option<super::Flash>,
    user: String,
    max_claims: u32,
    held: usize,
    pools: Vec<PoolRow>,
    claims: Vec<ClaimRow>,
    /// The row the page's script copies for a claim it learns of live.
    blank: ClaimRow,
}

/// A pool's chart: the polyline points of warm and bound over its history (a 120 x 32 box).
pub(crate) struct Chart {
    warm: String,
    bound: String,
    top: u32,
}

fn chart(history: &[(u32, u32)]) -> Chart {
    let top = history
        .iter()
        .map(|(w, b)| (*w).max(*b))
        .max()
        .unwrap_or(0)
        .max(1);
    let n = history.len().max(2) - 1;
    let pts = |f: &dyn Fn(&(u32, u32)) -> u32| {
        history
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let x = i as f64 * 120.0 / n as f64;
                let y = 31.0 - f64::from(f(p)) * 30.0 / f64::from(top);
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    Chart {
        warm: pts(&|p| p.0),
        bound: pts(&|p| p.1),
        top,
    }
}

/// The claim latency distribution's bars: (label, count, height in a 40-high box).
pub(crate) struct Bar {
    label: String,
    count: u64,
    height: u64,
    y: u64,
    x: usize,
}

fn latency_bars(h: &poolkeeper_engine::metrics::Histogram) -> Vec<Bar> {
    use poolkeeper_engine::metrics::BUCKETS;
    let max = h.counts.iter().copied().max().unwrap_or(0).max(1);
    let label = |i: usize| match BUCKETS.get(i) {
        Some(b) if *b < 1.0 => format!("≤{} ms", (b * 1000.0).round()),
        Some(b) => format!("≤{b} s"),
        None => format!("> {} s", BUCKETS[BUCKETS.len() - 1]),
    };
    (0..=BUCKETS.len())
        .map(|i| {
            let count = h.counts.get(i).copied().unwrap_or(0);
            let height = count * 40 / max;
            Bar {
                label: label(i),
                count,
                height,
                y: 40 - height,
                x: i * 8,
            }
        })
        .collect()
}

/// A pool on the operator's grid: its row, its chart, and its claims' latency distribution.
pub(crate) struct PoolCard {
    p: PoolRow,
    chart: Chart,
    bars: Vec<Bar>,
    bound: u64,
    /// The distribution in words (`≤1 ms 2; ≤5 ms 1`).
    words: String,
}

/// An example flow on the operator's page.
pub(crate) struct FlowCard {
    name: String,
    title: String,
    summary: String,
    params: Vec<super::flows::Param>,
    running: bool,
    standing: Vec<String>,
    containers: Vec<String>,
    /// (index, file name) of each steps file.
    steps: Vec<(usize, String)>,
    output: String,
}

/// A distribution in words: each bucket that holds claims, `LABEL COUNT`, joined by `; `.
fn in_words(bars: &[Bar]) -> String {
    bars.iter()
        .filter(|b| b.count > 0)
        .map(|b| format!("{} {}", b.label, b.count))
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) struct UserRow {
    name: String,
    claims: usize,
    max_claims: u32,
    disabled: bool,
    sign_in: String,
}

pub(crate) struct DeploymentRow {
    name: String,
    ready: String,
    containers: Vec<poolkeeper_kinds::ContainerStatus>,
}

#[derive(Template)]
#[template(path = "operator.html")]
struct OperatorPage<'a> {
    title: &'a str,
    csrf: String,
    flash: Option<super::Flash>,
    pools: Vec<PoolCard>,
    bars: Vec<Bar>,
    bound_total: u64,
    users: Vec<UserRow>,
    claims: Vec<ClaimRow>,
    nodes: Vec<poolkeeper_runtime::NodeStatus>,
    deployments: Vec<DeploymentRow>,
    events: Vec<EventRow>,
    flows: Vec<FlowCard>,
}

pub(crate) async fn home(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let (id, session, snap) = match signed_in(&state, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let flash = state.console.take_flash(&id);
    // The live rows (with their history) when the sampler runs; else read from this snapshot.
    let live = state
        .console
        .feed
        .rows(&state.handle)
        .await
        .borrow()
        .clone();
    let mut pools = pool_rows(&snap);
    for p in &mut pools {
        if let Some(l) = live.iter().find(|l| l.name == p.name) {
            p.history.clone_from(&l.history);
        }
    }
    match &session.who {
        Caller::User(user) => {
            let spec = user_spec(&snap, user).unwrap_or_default();
            let claims = claim_rows(&snap, &session.who);
            let held = claims
                .iter()
                .filter(|c| c.phase == "Pending" || c.phase == "Bound")
                .count();
            pools.retain(|p| spec.quota.pools.is_empty() || spec.quota.pools.contains(&p.name));
            render(
                StatusCode::OK,
                &MinePage {
                    title: "My instances",
                    csrf: session.csrf,
                    flash,
                    user: user.clone(),
                    max_claims: spec.quota.max_claims,
                    held,
                    pools,
                    claims,
                    blank: ClaimRow::default(),
                },
            )
        }
        Caller::Admin => {
            let mut page = operator_page(&snap, &session, flash, pools);
            page.flows = state
                .console
                .config
                .flows
                .iter()
                .map(|f| {
                    let (running, standing) = super::flows::standing(f, &snap);
                    FlowCard {
                        name: f.name.clone(),
                        title: f.title.clone(),
                        summary: f.summary.clone(),
                        params: super::flows::params(f),
                        running,
                        standing,
                        containers: super::flows::containers(f, &snap),
                        steps: f
                            .steps
                            .iter()
                            .enumerate()
                            .map(|(i, (file, _))| (i, file.clone()))
                            .collect(),
                        output: state.console.flow_output(&f.name),
                    }
                })
                .collect();
            render(StatusCode::OK, &page)
        }
    }
}

fn operator_page<'a>(
    snap: &Snapshot,
    session: &Session,
    flash: Option<super::Flash>,
    pools: Vec<PoolRow>,
) -> OperatorPage<'a> {
    let claims = claim_rows(snap, &Caller::Admin);
    let users = snap
        .objects
        .iter()
        .filter(|o| o.kind == Kind::User)
        .map(|o| {
            let spec: UserSpec = serde_json::from_value(o.spec.clone()).unwrap_or_default();
            let mut ways = Vec::new();
            if spec.token_sha256.is_some()
                || spec.token_secret_file.is_some()
                || spec.token_secret_ref.is_some()
            {
                ways.push("token");
            }
            if spec.password_hash.is_some() {
                ways.push("password");
            }
            UserRow {
                name: o.name.clone(),
                claims: claims
                    .iter()
                    .filter(|c| c.user == o.name && (c.phase == "Pending" || c.phase == "Bound"))
                    .count(),
                max_claims: spec.quota.max_claims,
                disabled: spec.disabled,
                sign_in: if ways.is_empty() {
                    "none".to_owned()
                } else {
                    ways.join(", ")
                },
            }
        })
        .collect();
    let deployments = snap
        .objects
        .iter()
        .filter(|o| o.kind == Kind::Deployment)
        .map(|o| {
            let st: DeploymentStatus = serde_json::from_value(o.status.clone()).unwrap_or_default();
            let ready = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map_or_else(String::new, |c| format!("{} ({})", c.status, c.reason));
            DeploymentRow {
                name: o.name.clone(),
                ready,
                containers: st.container_statuses,
            }
        })
        .collect();
    let events = super::feed::recent_events(snap);
    let h = &snap.metrics.bind_latency;
    OperatorPage {
        title: "Operations",
        csrf: session.csrf.clone(),
        flash,
        pools: pools
            .into_iter()
            .map(|p| {
                let own = snap.metrics.bind_latency_by_pool.get(&p.name);
                let bars = own.map(latency_bars).unwrap_or_default();
                PoolCard {
                    chart: chart(&p.history),
                    words: in_words(&bars),
                    bars,
                    bound: own.map_or(0, |h| h.count),
                    p,
                }
            })
            .collect(),
        bars: latency_bars(h),
        bound_total: h.count,
        users,
        claims,
        nodes: snap.nodes.clone(),
        deployments,
        events,
        flows: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Forms

/// Runs a form's action and puts its outcome on the next page.
fn outcome(state: &ApiState, id: &str, r: Result<String, ApiError>) -> Response {
    match r {
        Ok(text) => state.console.set_flash(id, true, text),
        Err(e) => state.console.set_flash(id, false, e.words()),
    }
    see("/ui")
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LaunchForm {
    csrf: String,
    pool: String,
    ttl: String,
}

pub(crate) async fn launch(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Form(form): Form<LaunchForm>,
) -> Response {
    let (id, session) = match form_session(&state, &headers, &form.csrf).await {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let req = crate::claims::NewClaim {
        name: None,
        pool: form.pool.clone(),
        user: None,
        ttl: Some(form.ttl.trim().to_owned()).filter(|t| !t.is_empty()),
        files: Default::default(),
        resources: None,
    };
    let r = crate::claims::make_claim(&state, &session.who, req)
        .await
        .map(|(_, v)| {
            format!(
                "Claim {} made from {}: it shows Bound below as soon as it is.",
                v["name"].as_str().unwrap_or("?"),
                form.pool
            )
        });
    outcome(&state, &id, r)
}

pub(crate) async fn release(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let (id, session) = match form_session(&state, &headers, &form.csrf).await {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let r = crate::claims::release_claim(&state, &session.who, &name)
        .await
        .map(|_| format!("Claim {name} released: its instance is reset for the next user."));
    outcome(&state, &id, r)
}

/// Files into a claim's instance, sent by the page's script (a multipart form or a tar), the
/// CSRF token in the `X-CSRF-Token` header; answered as the API answers, in JSON.
pub(crate) async fn upload(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some((_, session)) = super::live_session(&state, &headers).await else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "not signed in").into_response();
    };
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !same_token(&session.csrf, sent) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "the upload's security token does not match your session: reload the page",
        )
        .into_response();
    }
    match crate::claims::put_files(&state, &session.who, &name, &headers, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// An admin's form: the session (an admin's) or the answer refusing it.
async fn admin_form(
    state: &ApiState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<String, Box<Response>> {
    let (id, session) = form_session(state, headers, csrf).await?;
    if session.who != Caller::Admin {
        return Err(Box::new(message(
            StatusCode::FORBIDDEN,
            "Operators only",
            "this is an operator's action",
        )));
    }
    Ok(id)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ActionForm {
    csrf: String,
    /// `scale`'s new size.
    warm: String,
}

/// Runs an operator's action (`act`, only once the session is an admin's and its CSRF token
/// holds) and puts its outcome on the next page.
pub(crate) async fn operator(
    state: &ApiState,
    headers: &HeaderMap,
    csrf: &str,
    act: impl std::future::Future<Output = Result<String, ApiError>>,
) -> Response {
    match admin_form(state, headers, csrf).await {
        Ok(id) => outcome(state, &id, act.await),
        Err(r) => *r,
    }
}

pub(crate) fn no_action(action: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no action {action:?}"))
}

/// `scale` (the form's `warm`) and `reinitialise` of pool `name`.
pub(crate) async fn pool_action(
    State(state): State<Arc<ApiState>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let act = async {
        match action.as_str() {
            "scale" => {
                let warm = form.warm.trim().parse::<u32>().map_err(|_| {
                    ApiError::field(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "warm",
                        format!("{:?} is not a whole number of instances", form.warm),
                    )
                })?;
                let v = crate::admin::scale(&state, &name, warm).await?;
                Ok(format!(
                    "Pool {name}: warm {} → {warm} (in {}).",
                    v["was"],
                    v["file"].as_str().unwrap_or("?")
                ))
            }
            "reinitialise" => {
                let v = crate::admin::reinitialise(&state, &name).await?;
                Ok(format!(
                    "Pool {name}: {} warm instances being replaced.",
                    v["replaced"]
                ))
            }
            other => Err(no_action(other)),
        }
    };
    operator(&state, &headers, &form.csrf, act).await
}

/// `release` (all of the user's claims), `disable` and `enable`, and `delete` of user `name`
/// (disabled or deleted, their sessions end).
pub(crate) async fn user_action(
    State(state): State<Arc<ApiState>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let act = async {
        match action.as_str() {
            "release" => {
                let v = crate::admin::release_user_claims(&state, &name).await?;
                Ok(format!(
                    "User {name}: released {}.",
                    list_or_none(&v["released"])
                ))
            }
            "disable" | "enable" => {
                let disabled = action == "disable";
                let at = state.declare.set_user_disabled(&name, disabled).await?;
                if disabled {
                    state.console.sign_out_user(&name);
                }
                Ok(format!("User {name} {action}d (in {at})."))
            }
            "delete" => {
                let v = crate::admin::remove_user(&state, &name).await?;
                state.console.sign_out_user(&name);
                Ok(format!(
                    "User {name} deleted (from {}); released {}.",
                    v["file"].as_str().unwrap_or("?"),
                    list_or_none(&v["released"])
                ))
            }
            other => Err(no_action(other)),
        }
    };
    operator(&state, &headers, &form.csrf, act).await
}

/// `stop` or `start` of container `container` of deployment `name`: declared `stopped` (or
/// not) where the deployment is declared; the engine stops it and keeps it, or starts it again
/// in place.
pub(crate) async fn deployment_container_action(
    State(state): State<Arc<ApiState>>,
    UrlPath((name, container, action)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let act = async {
        let stopped = match action.as_str() {
            "stop" => true,
            "start" => false,
            other => return Err(no_action(other)),
        };
        let at = state
            .declare
            .set_container_stopped(&name, &container, stopped)
            .await?;
        Ok(format!(
            "Deployment {name}: container {container} declared {} (in {at}).",
            if stopped { "stopped" } else { "started" }
        ))
    };
    operator(&state, &headers, &form.csrf, act).await
}

/// `restart` or `remove` of a deployment's container (removed, the deployment makes a fresh
/// one).
pub(crate) async fn container_action(
    State(state): State<Arc<ApiState>>,
    UrlPath((instance, action)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    use poolkeeper_engine::ContainerAction;
    let act = async {
        let (what, done) = match action.as_str() {
            "restart" => (ContainerAction::Restart, "restarted"),
            "remove" => (
                ContainerAction::Remove,
                "removed; its deployment starts a fresh one",
            ),
            other => return Err(no_action(other)),
        };
        super::instance_answer(
            state.handle.container_action(&instance, what).await,
            |e| format!("container {instance}: {e}"),
            (
                StatusCode::NOT_FOUND,
                format!("no deployment container {instance:?}"),
            ),
        )
        .map(|()| format!("Container {instance} {done}."))
    };
    operator(&state, &headers, &form.csrf, act).await
}

fn list_or_none(v: &Value) -> String {
    let names: Vec<&str> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if names.is_empty() {
        "no claims".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_against_its_hash_only() {
        let h = hash_password("correct horse").expect("hash");
        assert!(poolkeeper_kinds::validate::is_argon2id_phc(&h), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert!(!verify_password("correct horse", "not a hash"));
        // Salted: the same password hashes differently.
        assert_ne!(h, hash_password("correct horse").expect("hash"));
    }

    /// A hash of `password` with these argon2id parameters.
    fn hash_with(password: &str, m: u32, t: u32) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = argon2::Params::new(m, t, 1, None).expect("params");
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"saltsaltsaltsalt").expect("salt");
        a.hash_password(password.as_bytes(), &salt)
            .expect("hash")
            .to_string()
    }

    #[test]
    fn a_hash_that_asks_more_than_allowed_is_refused_even_with_the_right_password() {
        // Within the bounds (t <= 10) it verifies; one pass more, and it is not checked.
        assert!(verify_password("pw", &hash_with("pw", 32, 10)));
        assert!(!verify_password("pw", &hash_with("pw", 32, 11)));
    }

    #[test]
    fn a_chart_spans_its_box_and_scales_to_its_top() {
        let c = chart(&[(0, 0), (2, 1), (4, 0)]);
        assert_eq!(c.top, 4);
        assert_eq!(c.warm, "0.0,31.0 60.0,16.0 120.0,1.0");
        assert_eq!(c.bound, "0.0,31.0 60.0,23.5 120.0,31.0");
        assert_eq!(chart(&[]).warm, "");
    }

    #[test]
    fn latency_bars_label_every_bucket_and_the_tallest_fills_the_box() {
        let mut h = poolkeeper_engine::metrics::Histogram::default();
        h.observe(0.0005);
        h.observe(0.0005);
        h.observe(0.3);
        let bars = latency_bars(&h);
        assert_eq!(bars.len(), poolkeeper_engine::metrics::BUCKETS.len() + 1);
        assert_eq!(bars[0].label, "≤1 ms");
        assert_eq!((bars[0].count, bars[0].height), (2, 40));
        assert_eq!(bars[7].label, "≤500 ms");
        assert_eq!((bars[7].count, bars[7].height), (1, 20));
        assert_eq!(bars[bars.len() - 1].label, "> 60 s");
    }
}
