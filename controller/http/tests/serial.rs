//! Requests about one claim, and what a client that goes away leaves behind, on a source whose
//! durable write the test holds open: the moment between the engine's admission of a claim and
//! its record, where a retry, a release or a hang-up used to find it half made.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use poolkeeper_engine::source::{
    BoxFuture, Created, Declare, DeclareError, Record, Records, Scaled, UserDeleted,
};
use poolkeeper_engine::{Creation, EngineConfig, EngineHandle, SourceEvent};
use poolkeeper_http::{ApiState, WebhookConfig};
use poolkeeper_kinds::{Kind, ObjKey, Object, Origin, Spec, UserSpec};
use poolkeeper_runtime::memory::MemoryRuntime;

const ADMIN: &str = "admin-token-0123456789";
const SECRET: &[u8] = b"booking-secret-0123456789";

/// Records in memory.
#[derive(Default)]
struct MemRecords(Mutex<BTreeMap<String, Vec<u8>>>);

impl Records for MemRecords {
    fn get(&self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, std::io::Result<()>> {
        self.0.lock().unwrap().insert(key.to_owned(), bytes);
        Box::pin(async { Ok(()) })
    }
    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<bool>> {
        let had = self.0.lock().unwrap().remove(key).is_some();
        Box::pin(async move { Ok(had) })
    }
    fn keys(&self, prefix: &str) -> Vec<String> {
        let r = self.0.lock().unwrap();
        r.keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_owned))
            .collect()
    }
    fn location(&self, key: &str) -> String {
        format!("memory:{key}")
    }
}

/// A source that declares claims the way the real ones do (the engine admits, then the claim
/// is recorded), whose record waits for the test to let it through (or fail it).
struct Held {
    handle: EngineHandle,
    /// The claims recorded, with their users.
    recorded: Mutex<BTreeMap<String, String>>,
    records: MemRecords,
    gate: tokio::sync::Semaphore,
    /// Writes waiting at the gate.
    waiting: AtomicUsize,
    /// The next write fails (a full disk), and the engine forgets the claim again.
    fail_next: AtomicBool,
}

const NOT_HERE: &str = "not used by these tests";

fn unused<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T, DeclareError>> {
    Box::pin(async { Err(DeclareError::Failed(NOT_HERE.to_owned())) })
}

impl Declare for Held {
    fn create_claim<'a>(
        &'a self,
        name: &'a str,
        spec: poolkeeper_kinds::ClaimSpec,
        record: Option<Record>,
    ) -> BoxFuture<'a, Result<Created, DeclareError>> {
        Box::pin(async move {
            let user = spec.user.clone();
            let claim = Object {
                name: name.to_owned(),
                spec: Spec::Claim(spec),
                origin: Origin {
                    file: format!("held/{name}").into(),
                    line: 0,
                    col: 0,
                },
                generation: 1,
            };
            match self.handle.create_claim(claim).await {
                Ok(Creation::Created) => {}
                Ok(Creation::Exists(b)) => return Ok(Created::Exists(b)),
                Ok(Creation::Refused(r, m)) => return Ok(Created::Refused(r, m)),
                Err(_) => return Err(DeclareError::Stopped),
            }
            if let Some(r) = record {
                self.records.put(&r.key, r.bytes).await.unwrap();
            }
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if self.fail_next.swap(false, Ordering::SeqCst) {
                let _ = self.handle.delete(ObjKey::new(Kind::Claim, name));
                return Err(DeclareError::NoSpace("no space left on device".to_owned()));
            }
            self.recorded.lock().unwrap().insert(name.to_owned(), user);
            Ok(Created::New {
                at: format!("held/{name}"),
            })
        })
    }
    fn made_here(&self, _name: &str, origin: &Origin) -> bool {
        origin.file.starts_with("held")
    }
    fn is_recorded(&self, name: &str) -> bool {
        self.recorded.lock().unwrap().contains_key(name)
    }
    fn delete_claim<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, DeclareError>> {
        let had = self.recorded.lock().unwrap().remove(name).is_some();
        if had {
            let _ = self.handle.delete(ObjKey::new(Kind::Claim, name));
        }
        Box::pin(async move { Ok(had) })
    }
    fn scale_pool<'a>(&'a self, _: &'a str, _: u32) -> BoxFuture<'a, Result<Scaled, DeclareError>> {
        unused()
    }
    fn release_claims_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, DeclareError>> {
        let mut recorded = self.recorded.lock().unwrap();
        let theirs: Vec<String> = (recorded.iter())
            .filter(|(_, u)| *u == user)
            .map(|(c, _)| c.clone())
            .collect();
        for c in &theirs {
            recorded.remove(c);
            let _ = self.handle.delete(ObjKey::new(Kind::Claim, c));
        }
        Box::pin(async move { Ok(theirs) })
    }
    fn delete_user<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<UserDeleted, DeclareError>> {
        unused()
    }
    fn create_user<'a>(
        &'a self,
        _: &'a str,
        _: UserSpec,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        unused()
    }
    fn set_password<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        unused()
    }
    fn set_user_disabled<'a>(
        &'a self,
        _: &'a str,
        _: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        unused()
    }
    fn set_container_stopped<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        unused()
    }
    fn declare_group<'a>(
        &'a self,
        _: &'a str,
        _: Vec<Object>,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        unused()
    }
    fn remove_group<'a>(
        &'a self,
        _: &'a str,
        _: Vec<ObjKey>,
    ) -> BoxFuture<'a, Result<bool, DeclareError>> {
        unused()
    }
    fn records(&self) -> &dyn Records {
        &self.records
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    handle: EngineHandle,
    held: Arc<Held>,
    app: axum::Router,
}

fn object(kind: Kind, name: &str, spec: Value) -> Object {
    let spec = match kind {
        Kind::Pool => Spec::Pool(serde_json::from_value(spec).unwrap()),
        Kind::User => Spec::User(serde_json::from_value(spec).unwrap()),
        _ => unreachable!("pools and users only"),
    };
    Object {
        name: name.to_owned(),
        spec,
        origin: Origin {
            file: "specs.yaml".into(),
            line: 1,
            col: 1,
        },
        generation: 1,
    }
}

/// An engine on the memory runtime with pool `web` (two warm, image nginx) and user `bob`, the
/// held source (its gate open for `permits` writes), and the API's state on them (webhooks
/// signed with [`SECRET`], callbacks to `notify`).
async fn state(
    permits: usize,
    notify: Option<poolkeeper_http::notify::Target>,
) -> (tempfile::TempDir, EngineHandle, Arc<Held>, ApiState) {
    let dir = tempfile::tempdir().unwrap();
    let (handle, _task) = poolkeeper_engine::start(
        Arc::new(MemoryRuntime::default()),
        EngineConfig::new(dir.path().join("state")),
    )
    .unwrap();
    for o in [
        object(
            Kind::Pool,
            "web",
            json!({"template": {"image": "nginx"}, "warm": 2}),
        ),
        object(Kind::User, "bob", json!({"quota": {"maxClaims": 5}})),
    ] {
        handle.send(SourceEvent::Apply(o)).unwrap();
    }
    handle.send(SourceEvent::Synced).unwrap();
    handle.started().await.unwrap();
    let held = Arc::new(Held {
        handle: handle.clone(),
        recorded: Mutex::default(),
        records: MemRecords::default(),
        gate: tokio::sync::Semaphore::new(permits),
        waiting: AtomicUsize::new(0),
        fail_next: AtomicBool::new(false),
    });
    let webhooks = WebhookConfig {
        secret: SECRET.to_vec(),
        notify,
        ..WebhookConfig::default()
    };
    let state = ApiState::new(handle.clone(), held.clone(), Some(ADMIN), Some(webhooks)).unwrap();
    (dir, handle, held, state)
}

/// [`state`] with the gate closed, and the API's routes on it.
async fn setup() -> Setup {
    let (dir, handle, held, state) = state(0, None).await;
    Setup {
        _dir: dir,
        handle,
        held,
        app: poolkeeper_http::router(state),
    }
}

type Answer = Pin<Box<dyn Future<Output = (StatusCode, Value)> + Send>>;

impl Setup {
    fn call(&self, req: Request<Body>) -> Answer {
        let app = self.app.clone();
        Box::pin(async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        })
    }

    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {ADMIN}"))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        self.call(req)
    }

    fn create(&self) -> Answer {
        self.admin(
            "POST",
            "/api/v1/claims",
            Some(json!({"name": "c1", "pool": "web", "user": "bob"})),
        )
    }

    fn hook(&self, event: &str) -> Answer {
        self.call(signed_hook(event, 1).map(Body::from))
    }

    /// Sends `release` while claim `c1` is being made (its record held): the release must wait
    /// for it. Returns the release's answer, once the create is answered 201.
    async fn release_during_create(&self, release: Answer) -> (StatusCode, Value) {
        let create = tokio::spawn(self.create());
        self.at_gate(1).await;
        let mut release = tokio::spawn(release);
        assert!(
            still_waiting(&mut release).await,
            "the release waits for the create"
        );
        self.held.gate.add_permits(1);
        assert_eq!(create.await.unwrap().0, StatusCode::CREATED);
        release.await.unwrap()
    }

    /// Waits until `n` records wait at the gate.
    async fn at_gate(&self, n: usize) {
        for _ in 0..500 {
            if self.held.waiting.load(Ordering::SeqCst) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} writes at the gate");
    }

    async fn engine_has(&self, name: &str) -> bool {
        self.handle.claim(name).await.unwrap().is_some()
    }
}

/// Whether `answer` is still unanswered after a while (polled on its own task).
async fn still_waiting(answer: &mut tokio::task::JoinHandle<(StatusCode, Value)>) -> bool {
    tokio::time::timeout(Duration::from_millis(300), answer)
        .await
        .is_err()
}

#[tokio::test]
async fn a_retried_create_is_answered_once_the_first_is_durable_and_made_anew_if_it_was_not() {
    let s = setup().await;
    let first = tokio::spawn(s.create());
    s.at_gate(1).await;
    let mut retry = tokio::spawn(s.create());
    assert!(
        still_waiting(&mut retry).await,
        "a retry must not be answered while the first request's claim is not recorded"
    );
    // The first one's write fails: the retry then makes the claim itself.
    s.held.fail_next.store(true, Ordering::SeqCst);
    s.held.gate.add_permits(1);
    let (code, body) = first.await.unwrap();
    assert_eq!(code, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    s.at_gate(1).await;
    s.held.gate.add_permits(1);
    let (code, body) = retry.await.unwrap();
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert!(s.held.is_recorded("c1"));
    // And once durable, the same request again is answered as made.
    let (code, body) = s.create().await;
    assert_eq!(
        (code, &body["created"]),
        (StatusCode::OK, &json!(false)),
        "{body}"
    );
}

#[tokio::test]
async fn a_create_whose_client_goes_away_is_carried_through() {
    let s = setup().await;
    let call = s.create();
    // The client waits a moment, then hangs up (its request's future is dropped).
    let gone = tokio::time::timeout(Duration::from_millis(200), call).await;
    assert!(gone.is_err(), "the write is held");
    s.at_gate(1).await;
    s.held.gate.add_permits(1);
    s.at_gate(0).await;
    for _ in 0..100 {
        if s.held.is_recorded("c1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        s.held.is_recorded("c1"),
        "the claim the engine admitted is recorded although its client left"
    );
    assert!(s.engine_has("c1").await);
}

#[tokio::test]
async fn a_release_during_the_create_releases_the_claim_made() {
    let s = setup().await;
    let (code, body) = s
        .release_during_create(s.admin("DELETE", "/api/v1/claims/c1", None))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert!(!s.held.is_recorded("c1"), "released, not left declared");
    for _ in 0..100 {
        if !s.engine_has("c1").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the engine still holds the released claim");
}

#[tokio::test]
async fn a_webhook_release_during_its_provision_releases_the_reservation() {
    let s = setup().await;
    let provision = tokio::spawn(s.hook("provision"));
    s.at_gate(1).await;
    let mut release = tokio::spawn(s.hook("release"));
    assert!(
        still_waiting(&mut release).await,
        "the release waits for the provision"
    );
    s.held.gate.add_permits(1);
    let (code, body) = provision.await.unwrap();
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let name = body["claim"].as_str().unwrap().to_owned();
    let (code, body) = release.await.unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["released"], json!(true), "{body}");
    assert!(!s.held.is_recorded(&name));
    assert!(
        s.held.records.keys("reservations/").is_empty(),
        "the reservation's record goes with it"
    );
}

/// A callback target that refuses (500) until told to accept, keeping the bodies posted.
struct Target {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    accept: Arc<AtomicBool>,
}

impl Target {
    fn posts(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }
}

async fn target() -> Target {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (bodies, accept) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(AtomicBool::new(false)),
    );
    let (b, a) = (bodies.clone(), accept.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (b, a) = (b.clone(), a.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65536];
                let body = loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break serde_json::from_str(body).unwrap_or(Value::Null);
                    }
                };
                b.lock().unwrap().push(body);
                let status = if a.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let answer =
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    Target {
        url,
        bodies,
        accept,
    }
}

/// One request over a socket to `addr`; the status and the JSON body.
async fn exchange(addr: std::net::SocketAddr, req: Request<String>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
        req.method(),
        req.uri()
    );
    for (k, v) in req.headers() {
        head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\n\r\n{}",
        req.body().len(),
        req.body()
    ));
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let code = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn signed_hook(event: &str, user_id: u32) -> Request<String> {
    let body = json!({"event": event, "resource_name": "lab-1", "username": "bob",
        "user_id": user_id, "custom_parameters": {"image": "nginx"}})
    .to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = poolkeeper_http::webhook::sign(SECRET, ts, body.as_bytes());
    Request::builder()
        .method("POST")
        .uri("/webhooks/reservations")
        .header("content-type", "application/json")
        .header(poolkeeper_http::webhook::HEADER_TIMESTAMP, ts.to_string())
        .header(poolkeeper_http::webhook::HEADER_SIGNATURE, sig)
        .body(body)
        .unwrap()
}

fn callback_state(held: &Held) -> Option<Value> {
    let key = held.records.keys("reservations/").into_iter().next()?;
    let bytes = held.records.get(&format!("reservations/{key}")).unwrap()?;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    Some(v["callback"].clone())
}

#[tokio::test]
async fn a_release_stops_the_callback_retries_and_a_new_reservation_gets_its_own() {
    let hook = target().await;
    let notify = poolkeeper_http::notify::Target::new(&hook.url, None).unwrap();
    let (_dir, _handle, held, state) = state(100, Some(notify)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(poolkeeper_http::serve(listener, state));

    let (code, body) = exchange(addr, signed_hook("provision", 1)).await;
    assert_eq!(code, 201, "{body}");
    // The booking system refuses the callback; the retries go on...
    for _ in 0..300 {
        if hook.posts() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hook.posts() >= 2, "retried");
    // ...until the reservation is released.
    let (code, body) = exchange(addr, signed_hook("release", 1)).await;
    assert_eq!((code, &body["released"]), (200, &json!(true)), "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(callback_state(&held), None, "its record stays gone");
    let before = hook.posts();
    // The same resource booked again at once (the first delivery still waits to retry): its
    // own callback, delivered, and never the released one's.
    hook.accept.store(true, Ordering::SeqCst);
    let (code, body) = exchange(addr, signed_hook("provision", 2)).await;
    assert_eq!(code, 201, "{body}");
    let mut delivered = false;
    for _ in 0..500 {
        if callback_state(&held).is_some_and(|c| c["state"] == "Delivered") {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        delivered,
        "the new reservation's callback: {:?}",
        callback_state(&held)
    );
    // Past the released delivery's next retry: nothing more is posted.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after: Vec<Value> = hook.bodies.lock().unwrap()[before..].to_vec();
    assert_eq!(after.len(), 1, "one callback after the release: {after:?}");
    assert_eq!(after[0]["user_id"], json!(2), "{after:?}");
}

#[tokio::test]
async fn releasing_a_users_claims_waits_for_the_claim_being_made() {
    let s = setup().await;
    let (code, body) = s
        .release_during_create(s.admin("POST", "/api/v1/users/bob/release", None))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["released"], json!(["c1"]), "{body}");
    assert!(!s.held.is_recorded("c1"), "released, not left declared");
}
