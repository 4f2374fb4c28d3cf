//! The web console under `/ui`: self-service for users (sign in, launch an instance from a
//! pool, see it bind live, upload files into it, release it) and a live dashboard for operators
//! (pools, users, claims, nodes, deployments, events; scale, reinitialise, release, delete).
//!
//! It is the same API in other clothes: every change goes through the functions the JSON API
//! calls (and so through the source's [`Declare`](poolkeeper_engine::source::Declare)), every
//! figure comes from the engine's snapshot, and live updates are pushed by Server-Sent Events
//! (`/ui/events`): claim changes as the engine reports them, pool counts when they change.
//!
//! Security: a session is a random id in an `HttpOnly`, `SameSite=Strict` cookie (`Secure`
//! with `--console-secure-cookie`), kept in memory (a restart signs everyone out); every form
//! carries a CSRF token (the session's, or before sign-in a cookie's, compared in constant
//! time); sign-in attempts are limited per address and per user name; pages are served with a
//! Content-Security-Policy that allows no inline script or style. Passwords are argon2id
//! hashes on the User (`passwordHash`); tokens and passwords travel only in POST bodies.
//!
//! Where things are: this file (sessions, cookies, CSRF, the attempt limiter, routes),
//! `pages` (the handlers and templates), `feed` (the live stream and the pools' history).

mod feed;
mod flows;
mod pages;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::routing::{get, post};

use crate::auth::Caller;

pub use flows::Flow;
pub use pages::hash_password;

/// How the console is offered.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    /// Whether people may register (`--allow-registration`): a User is declared through the
    /// source with `registration_quota`.
    pub allow_registration: bool,
    /// The `maxClaims` of a registered user.
    pub registration_quota: u32,
    /// Mark the session cookie `Secure` (served over https, behind a TLS proxy, say).
    pub secure_cookie: bool,
    /// The example flows operators may run (`--flows DIR`).
    pub flows: Vec<Flow>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            allow_registration: false,
            registration_quota: 2,
            secure_cookie: false,
            flows: Vec::new(),
        }
    }
}

/// A signed-in browser.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub who: Caller,
    /// The declared user behind the session (None: the admin token): checked against what is
    /// declared at each page, so that a user deleted, disabled or no longer an operator loses
    /// the session.
    pub account: Option<String>,
    /// What signed it in: the session ends when that no longer would (a new password, a
    /// token rotated away).
    pub credential: Credential,
    /// Every form of this session carries it.
    pub csrf: String,
    /// A message for the next page (the outcome of a form), shown once.
    pub flash: Option<Flash>,
    last_seen: Instant,
}

/// How a session was signed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    /// A password, checked against this hash (the user's `passwordHash` then).
    Password(String),
    /// A token of this SHA-256.
    Token([u8; 32]),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Flash {
    pub ok: bool,
    pub text: String,
}

/// A session ends after this long without a request.
const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept (the oldest idle one goes first).
const MAX_SESSIONS: usize = 10_000;
/// Sessions of one declared user at once (browsers, devices).
const MAX_SESSIONS_PER_ACCOUNT: usize = 20;
/// Failed sign-ins allowed per user name in [`WINDOW`].
const MAX_FAILURES: usize = 5;
/// Failed sign-ins, and registrations (made or refused), allowed per address in [`WINDOW`]:
/// more than per name, as a classroom or an office shares one address.
const MAX_FAILURES_PER_ADDRESS: usize = 20;
const WINDOW: Duration = Duration::from_secs(60);
/// Password hashes made or checked at once (see `Console::password_work`).
const PASSWORD_WORK: usize = 2;

pub(crate) const SESSION_COOKIE: &str = "pk_session";
/// Before sign-in: the CSRF token of the sign-in and registration forms.
pub(crate) const PRE_COOKIE: &str = "pk_pre";

/// The console's state, beside the API's.
pub(crate) struct Console {
    pub config: ConsoleConfig,
    sessions: Mutex<HashMap<String, Session>>,
    /// Attempts per key (an address, a user name), oldest first.
    failures: Mutex<HashMap<String, VecDeque<Counted>>>,
    /// Source of attempt tickets.
    tickets: std::sync::atomic::AtomicU64,
    /// Password hashes made or checked at once: each costs tens of MiB and a core for tens of
    /// ms, so sign-ins sent together wait their turn rather than take the machine's memory.
    pub password_work: tokio::sync::Semaphore,
    pub feed: feed::Feed,
    /// The last report of each flow's steps.
    flow_output: Mutex<HashMap<String, String>>,
}

impl Console {
    pub fn new(config: ConsoleConfig) -> Console {
        Console {
            config,
            sessions: Mutex::default(),
            failures: Mutex::default(),
            tickets: std::sync::atomic::AtomicU64::new(1),
            password_work: tokio::sync::Semaphore::new(PASSWORD_WORK),
            feed: feed::Feed::default(),
            flow_output: Mutex::default(),
        }
    }

    pub fn set_flow_output(&self, flow: &str, text: String) {
        let mut out = self.flow_output.lock().unwrap_or_else(|e| e.into_inner());
        out.insert(flow.to_owned(), text);
    }

    pub fn flow_output(&self, flow: &str) -> String {
        let out = self.flow_output.lock().unwrap_or_else(|e| e.into_inner());
        out.get(flow).cloned().unwrap_or_default()
    }

    /// The session a request's cookie names, if it is still alive.
    pub fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, SESSION_COOKIE)?;
        self.touch(id).map(|s| (id.to_owned(), s))
    }

    /// Session `id`, if it is still alive, seen now (a page that streams is not idle).
    pub fn touch(&self, id: &str) -> Option<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let s = sessions.get_mut(id)?;
        if s.last_seen.elapsed() > SESSION_IDLE {
            sessions.remove(id);
            return None;
        }
        s.last_seen = Instant::now();
        Some(s.clone())
    }

    /// Takes the session's flash message (shown once).
    pub fn take_flash(&self, id: &str) -> Option<Flash> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.get_mut(id).and_then(|s| s.flash.take())
    }

    pub fn set_flash(&self, id: &str, ok: bool, text: impl Into<String>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sessions.get_mut(id) {
            s.flash = Some(Flash {
                ok,
                text: text.into(),
            });
        }
    }

    /// Starts a session for `who` (signed in as the declared user `account`, if any): its id
    /// (for the cookie).
    pub fn sign_in(
        &self,
        who: Caller,
        account: Option<String>,
        credential: Credential,
    ) -> Option<String> {
        let id = random_token()?;
        let csrf = random_token()?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // One account holds a bounded number of sessions: a new one beyond it ends that
        // account's least recently used, never another account's.
        if let Some(a) = &account {
            let mine: Vec<(String, Instant)> = sessions
                .iter()
                .filter(|(_, s)| s.account.as_ref() == Some(a))
                .map(|(k, s)| (k.clone(), s.last_seen))
                .collect();
            if mine.len() >= MAX_SESSIONS_PER_ACCOUNT
                && let Some((oldest, _)) = mine.iter().min_by_key(|(_, t)| *t)
            {
                sessions.remove(oldest);
            }
        }
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.last_seen.elapsed() <= SESSION_IDLE);
            if sessions.len() >= MAX_SESSIONS
                && let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_seen)
                    .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                who,
                account,
                credential,
                csrf,
                flash: None,
                last_seen: Instant::now(),
            },
        );
        Some(id)
    }

    pub fn sign_out(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.remove(id);
    }

    /// Ends every session of `user` (deleted or disabled).
    pub fn sign_out_user(&self, user: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.account.as_deref() != Some(user));
    }

    /// Counts an attempt (a sign-in, a registration) against each of `keys` (an address, a
    /// user name), unless one of them has used up its window. The check and the count are one
    /// step, before the password is looked at, so that attempts sent at once cannot all pass
    /// the check before the first is counted.
    ///
    /// Attempts still being checked count until they are known: when they alone fill a key's
    /// window, the answer is [`Refused::Busy`] (wait for them), not a refusal, so that a
    /// classroom behind one address signing in at once is not turned away for its own right
    /// passwords. The attempt stays counted (a failure) unless [`Attempt::succeeded`] takes it
    /// back, also when its request is dropped half way.
    pub fn attempt(&self, keys: &[String]) -> Result<Attempt<'_>, Refused> {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut busy = false;
        let mut wait: Option<Duration> = None;
        for k in keys {
            let Some(q) = failures.get_mut(k) else {
                continue;
            };
            while q.front().is_some_and(|c| now.duration_since(c.at) > WINDOW) {
                q.pop_front();
            }
            let known = q.iter().filter(|c| !c.checking).count();
            if known >= limit(k) {
                let until = q
                    .iter()
                    .find(|c| !c.checking)
                    .map(|c| WINDOW.saturating_sub(now.duration_since(c.at)))
                    .unwrap_or(WINDOW);
                wait = Some(wait.map_or(until, |w| w.max(until)));
            } else if q.len() >= limit(k) {
                busy = true;
            }
        }
        if let Some(wait) = wait {
            return Err(Refused::Wait(wait));
        }
        if busy {
            return Err(Refused::Busy);
        }
        // Bounded: addresses and names that stopped trying are dropped once their window has
        // passed.
        if failures.len() > 100_000 {
            failures.retain(|_, q| q.back().is_some_and(|c| now.duration_since(c.at) <= WINDOW));
        }
        let ticket = self
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for k in keys {
            failures.entry(k.clone()).or_default().push_back(Counted {
                at: now,
                ticket,
                checking: true,
            });
        }
        Ok(Attempt {
            console: self,
            keys: keys.to_vec(),
            ticket,
            succeeded: false,
        })
    }

    /// [`Console::attempt`], waiting up to [`BUSY_WAIT`] while attempts being checked fill a
    /// key's window ([`Refused::Busy`] after that).
    pub async fn attempt_when_known(&self, keys: &[String]) -> Result<Attempt<'_>, Refused> {
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        loop {
            match self.attempt(keys) {
                Err(Refused::Busy) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(BUSY_POLL).await;
                }
                other => return other,
            }
        }
    }

    /// The attempt of `ticket` is known: taken back when it succeeded, else counted for good.
    fn settle(&self, keys: &[String], ticket: u64, succeeded: bool) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if let Some(q) = failures.get_mut(k) {
                if succeeded {
                    q.retain(|c| c.ticket != ticket);
                } else if let Some(c) = q.iter_mut().find(|c| c.ticket == ticket) {
                    c.checking = false;
                }
            }
        }
    }
}

/// One attempt counted against its keys (see [`Console::attempt`]).
#[derive(Clone, Copy, Debug)]
struct Counted {
    at: Instant,
    ticket: u64,
    /// Its password is still being checked.
    checking: bool,
}

/// Why [`Console::attempt`] did not count an attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// A key used up its window: this long until it may try again.
    Wait(Duration),
    /// Attempts still being checked fill a key's window: try again once they are known.
    Busy,
}

/// What a refused attempt is told: `what` (`failed sign-ins`) used up the window, or too many
/// were still being checked to wait for.
pub(crate) fn refused_message(refused: &Refused, what: &str) -> String {
    match refused {
        Refused::Wait(wait) => format!(
            "too many {what} from here or for this name: try again in {} s",
            wait.as_secs().max(1)
        ),
        Refused::Busy => "too many sign-ins from here or for this name are being checked at \
                          once: try again in a few seconds"
            .to_owned(),
    }
}

/// How long a sign-in waits for the attempts before it to be known.
const BUSY_WAIT: Duration = Duration::from_secs(10);
const BUSY_POLL: Duration = Duration::from_millis(20);

/// An attempt being made: a failure unless [`Attempt::succeeded`] says otherwise.
pub struct Attempt<'a> {
    console: &'a Console,
    keys: Vec<String>,
    ticket: u64,
    succeeded: bool,
}

impl Attempt<'_> {
    /// It succeeded: it is not held against its keys. Only this attempt is taken back, not
    /// whichever came last (a guess made meanwhile stays counted).
    pub fn succeeded(mut self) {
        self.succeeded = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.console.settle(&self.keys, self.ticket, self.succeeded);
    }
}

/// The session of a request, if it is alive and its declared user (if any) still may hold it:
/// a user deleted, disabled, or no longer an operator (or newly one) is signed out.
pub(crate) async fn live_session(
    state: &crate::ApiState,
    headers: &HeaderMap,
) -> Option<(String, Session)> {
    let id = cookie(headers, SESSION_COOKIE)?;
    let s = held(state, id).await?;
    Some((id.to_owned(), s))
}

/// Whether session `id` may go on streaming to its page: see [`held`].
pub(crate) async fn session_holds(state: &crate::ApiState, id: &str) -> bool {
    held(state, id).await.is_some()
}

/// Session `id`, seen now, if it was not signed out, evicted or idle too long, and
/// [`still_holds`]; ended here when it may not go on.
async fn held(state: &crate::ApiState, id: &str) -> Option<Session> {
    let s = state.console.touch(id)?;
    if still_holds(state, &s).await {
        Some(s)
    } else {
        state.console.sign_out(id);
        None
    }
}

/// Whether session `s` may go on: its declared user (if any) is still declared, enabled and
/// as much an operator as at sign-in, and what signed it in still would (the same password
/// hash; a token that still names the same user, or is still the admin token).
async fn still_holds(state: &crate::ApiState, s: &Session) -> bool {
    let spec = match &s.account {
        Some(u) => {
            let key = poolkeeper_kinds::ObjKey::new(poolkeeper_kinds::Kind::User, u.clone());
            let Ok(view) = state.handle.view(key).await else {
                return false;
            };
            let spec = view
                .and_then(|v| serde_json::from_value::<poolkeeper_kinds::UserSpec>(v.spec).ok());
            match spec {
                Some(spec) if !spec.disabled && spec.admin == (s.who == Caller::Admin) => {
                    Some(spec)
                }
                _ => return false,
            }
        }
        None => None,
    };
    match (&s.credential, &s.account) {
        (Credential::Password(h), Some(_)) => {
            spec.and_then(|spec| spec.password_hash).as_deref() == Some(h.as_str())
        }
        (Credential::Password(_), None) => false,
        (Credential::Token(d), Some(u)) => state
            .handle
            .token_owner(d)
            .is_some_and(|o| o.user == *u && !o.disabled),
        (Credential::Token(d), None) => state
            .admin_sha256
            .as_ref()
            .is_some_and(|a| crate::auth::same(a, d)),
    }
}

/// The engine's answer about one of the runtime's instances (its output, an exec, an action)
/// as the console answers it: the value; the runtime's failure (502, `failed` names what
/// failed); no such instance (`missing`); or the engine stopping (503).
pub(crate) fn instance_answer<T>(
    answer: Result<Option<Result<T, String>>, poolkeeper_engine::EngineError>,
    failed: impl FnOnce(String) -> String,
    missing: (axum::http::StatusCode, String),
) -> crate::error::ApiResult<T> {
    use crate::error::ApiError;
    match answer {
        Ok(Some(Ok(v))) => Ok(v),
        Ok(Some(Err(e))) => Err(ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            failed(e),
        )),
        Ok(None) => Err(ApiError::new(missing.0, missing.1)),
        Err(_) => Err(ApiError::unavailable()),
    }
}

/// How many failures key `k` (`ip:ADDRESS` or `user:NAME`) may have in [`WINDOW`].
fn limit(k: &str) -> usize {
    if k.starts_with("ip:") {
        MAX_FAILURES_PER_ADDRESS
    } else {
        MAX_FAILURES
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie` value for the console's path; `None` clears it.
pub(crate) fn set_cookie(name: &str, value: Option<&str>, secure: bool) -> HeaderValue {
    let mut c = match value {
        Some(v) => format!("{name}={v}; Path=/ui; HttpOnly; SameSite=Strict"),
        None => format!("{name}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    };
    if secure {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// 32 random bytes from the operating system, as hex: a session id or a CSRF token. None
/// when the system has no randomness to give (then nobody signs in).
pub(crate) fn random_token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// Equal without telling, by timing, where they differ.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The client's address (as the listener accepted it), for the attempt limiter.
pub(crate) fn peer(extensions: &axum::http::Extensions) -> String {
    extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string())
}

/// The console's routes (the API's state; `/` redirects to `/ui`).
pub(crate) fn routes() -> Router<std::sync::Arc<crate::ApiState>> {
    Router::new()
        .route("/", get(pages::root))
        .route("/ui", get(pages::home))
        .route("/ui/", get(pages::root))
        .route("/ui/signin", get(pages::signin_page).post(pages::signin))
        .route("/ui/signout", post(pages::signout))
        .route(
            "/ui/register",
            get(pages::register_page).post(pages::register),
        )
        .route("/ui/claims", post(pages::launch))
        .route("/ui/claims/{name}/release", post(pages::release))
        .route(
            "/ui/claims/{name}/files",
            post(pages::upload).layer(DefaultBodyLimit::max(crate::UPLOAD_LIMIT)),
        )
        .route("/ui/pools/{name}/{action}", post(pages::pool_action))
        .route("/ui/users/{name}/{action}", post(pages::user_action))
        .route("/ui/flows/{name}/{action}", post(flows::flow_action))
        .route("/ui/events", get(feed::events))
        .route("/ui/claims/{name}/logs", get(feed::claim_logs))
        .route("/ui/containers/{instance}/logs", get(feed::container_logs))
        .route(
            "/ui/containers/{instance}/{action}",
            post(pages::container_action),
        )
        .route(
            "/ui/deployments/{name}/containers/{container}/{action}",
            post(pages::deployment_container_action),
        )
        .route("/ui/assets/console.css", get(pages::css))
        .route("/ui/assets/console.js", get(pages::js))
        .layer(axum::middleware::map_response(pages::page_headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_found_among_others_and_an_empty_one_is_none() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; pk_session=abc; b=2"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("pk_pre="));
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, PRE_COOKIE), None);
        assert_eq!(cookie(&h, "pk_sess"), None);
    }

    #[test]
    fn the_session_cookie_is_http_only_strict_and_secure_when_asked() {
        let c = set_cookie(SESSION_COOKIE, Some("x"), true);
        let c = c.to_str().expect("ascii");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        let c = set_cookie(SESSION_COOKIE, None, false);
        assert!(c.to_str().expect("ascii").contains("Max-Age=0"));
    }

    /// A failed attempt, known at once.
    fn fail(c: &Console, keys: &[String]) -> Result<(), Refused> {
        c.attempt(keys).map(drop)
    }

    #[test]
    fn attempts_block_a_name_after_five_and_an_address_after_twenty_for_the_window() {
        let c = Console::new(ConsoleConfig::default());
        let user = vec!["user:bob".to_owned()];
        for _ in 0..5 {
            assert!(fail(&c, &user).is_ok());
        }
        let Err(Refused::Wait(wait)) = fail(&c, &user) else {
            panic!("blocked")
        };
        assert!(wait <= WINDOW && wait > Duration::from_secs(50), "{wait:?}");
        let ip = vec!["ip:10.0.0.1".to_owned()];
        for _ in 0..20 {
            assert!(fail(&c, &ip).is_ok());
        }
        assert!(matches!(fail(&c, &ip), Err(Refused::Wait(_))));
        // Another name is not blocked; a key list with a blocked one is, and counts nothing.
        let alice = vec!["user:alice".to_owned()];
        assert!(fail(&c, &[alice[0].clone(), user[0].clone()]).is_err());
        for _ in 0..5 {
            assert!(fail(&c, &alice).is_ok());
        }
        assert!(fail(&c, &alice).is_err());
        // A success is taken back: a name that signs in well is never blocked by it.
        let carol = vec!["user:carol".to_owned()];
        for _ in 0..50 {
            c.attempt(&carol).expect("not blocked").succeeded();
        }
        // Only the successful attempt is taken back: guesses made while it was checked stay
        // counted, however the two interleave.
        let dave = vec!["user:dave".to_owned()];
        let right = c.attempt(&dave).expect("first");
        for _ in 0..4 {
            assert!(fail(&c, &dave).is_ok());
        }
        right.succeeded();
        assert!(
            fail(&c, &dave).is_ok(),
            "four guesses and one success: one more allowed"
        );
        assert!(fail(&c, &dave).is_err(), "five guesses: blocked");
    }

    #[test]
    fn attempts_still_being_checked_make_the_next_wait_not_fail() {
        let c = Console::new(ConsoleConfig::default());
        let ip = vec!["ip:10.0.0.2".to_owned()];
        // Twenty sign-ins from one address being checked at once: the next is not refused,
        // it waits for them.
        let mut checking: Vec<_> = (0..20).map(|_| c.attempt(&ip).expect("room")).collect();
        assert_eq!(c.attempt(&ip).err(), Some(Refused::Busy));
        // One is right: its place is free again.
        checking.pop().expect("twenty").succeeded();
        let next = c.attempt(&ip).expect("room again");
        // Nineteen were wrong and the next too: the window is used up, a refusal for good.
        checking.clear();
        drop(next);
        assert!(matches!(c.attempt(&ip), Err(Refused::Wait(_))));
        // A name's five, likewise.
        let bob = vec!["user:bob".to_owned()];
        let checking: Vec<_> = (0..5).map(|_| c.attempt(&bob).expect("room")).collect();
        assert_eq!(c.attempt(&bob).err(), Some(Refused::Busy));
        drop(checking);
        assert!(matches!(c.attempt(&bob), Err(Refused::Wait(_))));
    }

    #[tokio::test]
    async fn a_sign_in_waits_for_the_ones_being_checked_and_then_is_counted() {
        let c = Console::new(ConsoleConfig::default());
        let bob = vec!["user:bob".to_owned()];
        let mut checking: Vec<_> = (0..5).map(|_| c.attempt(&bob).expect("room")).collect();
        let waiting = c.attempt_when_known(&bob);
        tokio::pin!(waiting);
        // Still waiting a while later.
        tokio::select! {
            _ = &mut waiting => panic!("went ahead of the five being checked"),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        checking.pop().expect("five").succeeded();
        let got = waiting.await.expect("its turn");
        drop(got);
        drop(checking);
        // Five wrong now: the next waits no more, it is refused for the rest of the window.
        let Some(Refused::Wait(wait)) = c.attempt_when_known(&bob).await.err() else {
            panic!("refused")
        };
        assert!(wait > Duration::from_secs(50), "{wait:?}");
    }

    #[test]
    fn one_account_holds_at_most_twenty_sessions_and_its_own_oldest_goes_first() {
        let c = Console::new(ConsoleConfig::default());
        let sign_in = |who: &str| {
            c.sign_in(
                Caller::User(who.into()),
                Some(who.into()),
                Credential::Token([3; 32]),
            )
            .expect("id")
        };
        let alice = sign_in("alice");
        let mut bobs = Vec::new();
        for _ in 0..100 {
            bobs.push(sign_in("bob"));
        }
        let sessions = c.sessions.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            sessions.contains_key(&alice),
            "another account's session was evicted"
        );
        let kept = sessions
            .values()
            .filter(|s| s.account.as_deref() == Some("bob"))
            .count();
        assert_eq!(kept, MAX_SESSIONS_PER_ACCOUNT);
        assert!(sessions.contains_key(&bobs[99]), "the newest is kept");
    }

    #[test]
    fn sessions_are_distinct_and_signing_out_a_user_ends_theirs_only() {
        let c = Console::new(ConsoleConfig::default());
        let a = c
            .sign_in(
                Caller::User("alice".into()),
                Some("alice".into()),
                Credential::Token([1; 32]),
            )
            .expect("id");
        let b = c
            .sign_in(
                Caller::User("bob".into()),
                Some("bob".into()),
                Credential::Token([2; 32]),
            )
            .expect("id");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        c.sign_out_user("alice");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={a}")).expect("header"),
        );
        assert!(c.session(&h).is_none());
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={b}")).expect("header"),
        );
        let (_, s) = c.session(&h).expect("bob's");
        assert_eq!(s.who, Caller::User("bob".into()));
        assert!(same_token(&s.csrf, &s.csrf.clone()));
        assert!(!same_token(&s.csrf, "x"));
    }
}
