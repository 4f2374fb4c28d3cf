//! The HTTP API of `poolkeeper run`, end to end over a socket, on the memory runtime: tokens,
//! who sees what, claims made and released through files in the managed folder, admission
//! checked before anything is written, and JSON errors that name the field.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

mod api_support;
use api_support::{Served, serve};

const BIN: &str = env!("CARGO_BIN_EXE_poolkeeper");
const ADMIN: &str = "admin-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";
const CAROL: &str = "carol-token-0123456789";
const SECRET: &str = "booking-secret-0123456789";

fn digest(t: &str) -> String {
    hex::encode(Sha256::digest(t.as_bytes()))
}

fn specs() -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: web}}
spec:
  template:
    image: nginx
    ports: [{{name: http, containerPort: 80}}]
  warm: 3
  hostPorts: {{start: 30000, end: 30010}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: site}}
spec:
  template:
    image: nginx
    ports: [{{name: http, containerPort: 80}}]
    files: {{mountPath: /srv}}
  warm: 1
  hostPorts: {{start: 30100, end: 30110}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: other}}
spec:
  template: {{image: busybox}}
  warm: 0
  max: 4
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: alice}}
spec: {{quota: {{maxClaims: 2, pools: [web]}}, tokenSha256: {a}}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: bob}}
spec: {{quota: {{maxClaims: 5}}, tokenSha256: {b}}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: carol}}
spec: {{disabled: true, tokenSha256: {c}}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {{name: infra}}
spec:
  containers: [{{name: db, image: postgres}}]
",
        a = digest(ALICE),
        b = digest(BOB),
        c = digest(CAROL)
    )
}

const BOBS_FILE_CLAIM: &str = "apiVersion: poolkeeper.dev/v1alpha1
kind: Claim
metadata: {name: bob-declared}
spec: {pool: web, user: bob}
";

/// Sends a whole request; the status code and the JSON body (Null when not JSON).
fn exchange(mut s: TcpStream, request: &str) -> (u16, Value) {
    // A request refused before its body is read may reset the connection: the answer counts.
    let _ = s.write_all(request.as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let code: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

struct Api {
    served: Served,
    dir: tempfile::TempDir,
}

impl Api {
    fn start() -> Api {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Api {
        Self::start_with_files(&[], extra)
    }

    /// As `start_with`, with more spec files in the folder.
    fn start_with_files(files: &[(&str, &str)], extra: &[&str]) -> Api {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let secret = dir.path().join("webhook.secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        std::fs::write(dir.path().join("specs.yaml"), specs()).unwrap();
        std::fs::write(dir.path().join("bob.yaml"), BOBS_FILE_CLAIM).unwrap();
        let token = dir.path().join("admin.token");
        std::fs::write(&token, format!("{ADMIN}\n")).unwrap();
        let served = Self::spawn_in(dir.path(), extra);
        Api { served, dir }
    }

    /// The command that serves the API for `dir` (whose files `start_with` wrote).
    fn command(dir: &std::path::Path, extra: &[&str]) -> Command {
        let secret = dir.join("webhook.secret");
        let mut cmd = api_support::run_memory(dir);
        cmd.arg("--admin-token-file")
            .arg(dir.join("admin.token"))
            .args(
                extra
                    .iter()
                    .map(|a| a.replace("SECRET_FILE", &secret.to_string_lossy())),
            )
            .stdin(Stdio::null());
        cmd
    }

    fn spawn_in(dir: &std::path::Path, extra: &[&str]) -> Served {
        serve(&mut Self::command(dir, extra), dir)
    }

    /// Kills the controller (no clean stop) and starts it again on the same folder.
    fn restart(&mut self, extra: &[&str]) {
        let _ = self.served.child.kill();
        let _ = self.served.child.wait();
        // The killed process's status still names its address.
        std::fs::remove_file(self.dir.path().join(".poolkeeper/status.json")).unwrap();
        self.served = Self::spawn_in(self.dir.path(), extra);
    }

    /// One request; the status code and the JSON body (Null when not JSON).
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let s = TcpStream::connect(&self.served.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        exchange(s, &req)
    }

    /// Opens the event stream as `token`; what arrives accumulates in the returned buffer.
    fn stream(&self, token: &str) -> std::sync::Arc<std::sync::Mutex<String>> {
        let mut s = TcpStream::connect(&self.served.addr).unwrap();
        write!(
            s,
            "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let into = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        buf
    }

    fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call("GET", path, Some(token), None)
    }

    fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(token), Some(&body.to_string()))
    }

    fn wait_phase(&self, claim: &str, token: &str, phase: &str) -> Value {
        let start = Instant::now();
        loop {
            let (code, v) = self.get(&format!("/api/v1/claims/{claim}"), token);
            if code == 200 && v["status"]["phase"] == phase {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "claim {claim} never {phase}: {code} {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/metrics`, as a scraper reads it (the whole answer, headers first).
    fn scrape(&self) -> String {
        let mut s = TcpStream::connect(&self.served.addr).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text
    }

    fn managed(&self, name: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join("managed/claims")
            .join(format!("{name}.yaml"))
    }
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| o["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

#[test]
fn the_api_authenticates_separates_users_and_makes_and_releases_claims() {
    let api = Api::start();
    // Health needs no token.
    assert_eq!(api.call("GET", "/healthz", None, None).0, 200);
    assert_eq!(api.call("GET", "/readyz", None, None).0, 200);

    // No token, a wrong token, a disabled user.
    let (code, v) = api.call("GET", "/api/v1/pools", None, None);
    assert_eq!(code, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(api.get("/api/v1/pools", "not-a-token").0, 401);
    assert_eq!(api.get("/api/v1/pools", CAROL).0, 403);

    // Metrics need no token; they move as claims are bound.
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let scrape = || api.scrape();
    // bob-declared is bound at start.
    let start = Instant::now();
    while metric(&scrape(), "poolkeeper_pool_bound{pool=\"web\"}") != 1 {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = scrape();
    let binds_before = metric(&before, "poolkeeper_claim_bind_seconds_count");
    let commits_before = metric(&before, "poolkeeper_store_commit_seconds_count");
    assert!(
        metric(&before, "poolkeeper_reconciles_total{kind=\"pool\"}") > 0,
        "{before}"
    );

    // The status stream, for each of them.
    let alice_events = api.stream(ALICE);
    let bob_events = api.stream(BOB);
    let start = Instant::now();
    while !alice_events.lock().unwrap().contains("text/event-stream") {
        assert!(start.elapsed() < Duration::from_secs(10), "no event stream");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Alice makes a claim: a file in the managed folder, bound like any other.
    let files = json!({"index.html": "<h1>alice</h1>"});
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"name": "a1", "pool": "web", "files": files}),
    );
    assert_eq!(code, 201, "{v}");
    assert!(api.managed("a1").exists());
    let bound = api.wait_phase("a1", ALICE, "Bound");
    assert!(bound["status"]["instance"].is_string(), "{bound}");
    // Her stream said so; Bob's says nothing of her claims.
    let start = Instant::now();
    while !alice_events
        .lock()
        .unwrap()
        .contains(r#"data: {"claim":"a1","phase":"Bound","user":"alice"}"#)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "alice's stream: {}",
            alice_events.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !bob_events.lock().unwrap().contains("alice"),
        "{}",
        bob_events.lock().unwrap()
    );
    // The same request again is answered as the first (a retry), not a second claim.
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"name": "a1", "pool": "web", "files": files}),
    );
    assert_eq!((code, v["created"].clone()), (200, json!(false)), "{v}");
    // The same name with another spec is a conflict.
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"name": "a1", "pool": "web"}),
    );
    assert_eq!((code, v["field"].as_str()), (409, Some("name")), "{v}");

    // Bob sees none of it, and cannot release it.
    let (code, v) = api.get("/api/v1/claims/a1", BOB);
    assert_eq!(code, 404, "{v}");
    assert!(!v.to_string().contains("alice"), "no leak: {v}");
    assert_eq!(names(&api.get("/api/v1/claims", BOB).1), ["bob-declared"]);
    assert_eq!(
        api.call("DELETE", "/api/v1/claims/a1", Some(BOB), None).0,
        404
    );
    assert!(api.managed("a1").exists());
    // Alice may not claim for Bob.
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"pool": "web", "user": "bob"}),
    );
    assert_eq!((code, v["field"].as_str()), (403, Some("user")), "{v}");

    // Admission before anything is written: a pool she may not use, then her quota.
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"name": "a0", "pool": "other"}),
    );
    assert_eq!((code, v["field"].as_str()), (403, Some("pool")), "{v}");
    assert!(!api.managed("a0").exists());
    assert_eq!(
        api.post(
            "/api/v1/claims",
            ALICE,
            &json!({"name": "a2", "pool": "web"})
        )
        .0,
        201
    );
    api.wait_phase("a2", ALICE, "Bound");
    let after = scrape();
    assert_eq!(
        metric(&after, "poolkeeper_pool_bound{pool=\"web\"}"),
        3,
        "{after}"
    );
    assert_eq!(
        metric(&after, "poolkeeper_claim_bind_seconds_count"),
        binds_before + 2
    );
    // Each binding was flushed before it was reported.
    assert!(
        metric(&after, "poolkeeper_store_commit_seconds_count") > commits_before,
        "{after}"
    );
    assert!(
        metric(&after, "poolkeeper_pool_hits_total{pool=\"web\"}")
            >= metric(&before, "poolkeeper_pool_hits_total{pool=\"web\"}") + 2,
        "{after}"
    );
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"name": "a3", "pool": "web"}),
    );
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("quota"), "{v}");
    assert!(!api.managed("a3").exists());

    // Bad input: 4xx with the field, never a panic.
    let (code, _) = api.call("POST", "/api/v1/claims", Some(ALICE), Some("{not json"));
    assert_eq!(code, 400);
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"pool": "web", "colour": "red"}),
    );
    assert_eq!(code, 422, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{v}"
    );
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"name": "Bad_Name", "pool": "web"}),
    );
    assert_eq!((code, v["field"].as_str()), (422, Some("name")), "{v}");
    let (code, v) = api.post(
        "/api/v1/claims",
        BOB,
        &json!({"name": "b9", "pool": "web", "ttl": "soon"}),
    );
    assert_eq!((code, v["field"].as_str()), (422, Some("ttl")), "{v}");
    let big = format!(
        "{{\"pool\": \"web\", \"files\": {{\"a\": \"{}\"}}}}",
        "x".repeat(2 << 20)
    );
    assert_eq!(
        api.call("POST", "/api/v1/claims", Some(BOB), Some(&big)).0,
        413
    );
    assert_eq!(api.get("/api/v1/nothing", BOB).0, 404);

    // Users see themselves, without their token digest; deployments are for admins.
    let (_, v) = api.get("/api/v1/users", ALICE);
    assert_eq!(names(&v), ["alice"]);
    assert!(!v.to_string().contains(&digest(ALICE)), "{v}");
    assert_eq!(api.get("/api/v1/deployments", ALICE).0, 403);
    let (code, v) = api.get("/api/v1/deployments", ADMIN);
    assert_eq!((code, names(&v)), (200, vec!["infra".to_owned()]));
    assert_eq!(
        names(&api.get("/api/v1/claims", ADMIN).1),
        ["a1", "a2", "bob-declared"]
    );
    // An admin makes claims for a named user only.
    let (code, v) = api.post("/api/v1/claims", ADMIN, &json!({"pool": "web"}));
    assert_eq!((code, v["field"].as_str()), (422, Some("user")), "{v}");

    // A claim declared in a person's file is released there, not through the API.
    let (code, v) = api.call("DELETE", "/api/v1/claims/bob-declared", Some(BOB), None);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("bob.yaml"), "{v}");

    // Alice releases hers: the file goes, and so does the claim.
    let deferred = "poolkeeper_store_deferred_commits_total";
    let deferred_before = metric(&scrape(), deferred);
    let (code, v) = api.call("DELETE", "/api/v1/claims/a1", Some(ALICE), None);
    assert_eq!(code, 200, "{v}");
    assert!(!api.managed("a1").exists());
    let start = Instant::now();
    while api.get("/api/v1/claims/a1", ALICE).0 != 404 {
        assert!(start.elapsed() < Duration::from_secs(20), "a1 never went");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its end waited for no flush of its own (a restart derives it again).
    let text = scrape();
    assert!(metric(&text, deferred) > deferred_before, "{text}");
    // Her quota has room again.
    assert_eq!(
        api.post(
            "/api/v1/claims",
            ALICE,
            &json!({"name": "a3", "pool": "web"})
        )
        .0,
        201
    );
    assert!(Path::new(&api.managed("a3")).exists());
}

/// Admission is one step with the claim's creation in the engine: requests racing at a user's
/// quota are admitted exactly up to it, and the rest are refused up front (none is answered
/// 201 and then left Pending with QuotaExceeded).
#[test]
fn concurrent_claims_are_admitted_exactly_up_to_the_quota() {
    let api = std::sync::Arc::new(Api::start());
    // Bob may hold 5 claims; bob.yaml declares one.
    api.wait_phase("bob-declared", BOB, "Bound");
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let api = api.clone();
                s.spawn(move || {
                    api.post(
                        "/api/v1/claims",
                        BOB,
                        &json!({"name": format!("race-{i}"), "pool": "web"}),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(c, _)| *c == 201)
        .map(|(_, v)| v)
        .collect();
    let refused = answers
        .iter()
        .filter(|(c, v)| *c == 403 && v["error"].as_str().is_some_and(|e| e.contains("quota")))
        .count();
    assert_eq!((created.len(), refused), (4, 8), "{answers:?}");
    assert_eq!(api.claim_files(), 4, "one file per admitted claim");
    // Every admitted claim binds; none waits on a quota.
    for v in &created {
        api.wait_phase(v["name"].as_str().unwrap(), BOB, "Bound");
    }
    let (_, v) = api.get("/api/v1/claims", BOB);
    assert_eq!(names(&v).len(), 5, "{v}");
    // Which four were admitted varies.
    let admitted = created[0]["name"].as_str().unwrap().to_owned();

    // A file in the API's folder that holds no claim that loads (here, YAML cut short) is
    // neither overwritten nor removed by a claim of its name: a 409 names it.
    let broken = api.managed("race-x");
    std::fs::write(&broken, "kind: Claim\nspec: {pool: [\n").unwrap();
    // (Bob's quota is full: one claim goes first.)
    let path = format!("/api/v1/claims/{admitted}");
    let (code, _) = api.call("DELETE", &path, Some(BOB), None);
    assert_eq!(code, 200);
    wait_for("an admitted claim released", || {
        api.get(&path, BOB).0 == 404
    });
    let (code, v) = api.post(
        "/api/v1/claims",
        BOB,
        &json!({"name": "race-x", "pool": "web"}),
    );
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("race-x.yaml")),
        "{v}"
    );
    assert_eq!(
        std::fs::read_to_string(&broken).unwrap(),
        "kind: Claim\nspec: {pool: [\n"
    );
    assert_eq!(api.get("/api/v1/claims/race-x", BOB).0, 404);
}

/// A `User` may keep its token in a secret file instead of declaring its digest: the token
/// works, a rotation is picked up at the next resync (the old token stops working), and a
/// file that cannot be read says so on the user and authenticates nothing.
#[test]
fn a_users_token_may_come_from_a_secret_file_that_is_read_again_at_each_resync() {
    let api = Api::start_with(&["--resync", "1s"]);
    let secrets = api.dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("dave.token"), "dave-token-one\n").unwrap();
    std::fs::write(
        api.dir.path().join("dave.yaml"),
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: User\nmetadata: {name: dave}\n\
         spec: {tokenSecretFile: secrets/dave.token}\n",
    )
    .unwrap();
    wait_for("dave's token", || {
        api.get("/api/v1/users/dave", "dave-token-one").0 == 200
    });
    let (_, v) = api.get("/api/v1/users/dave", ADMIN);
    let ready = &v["status"]["conditions"][0];
    assert_eq!(
        (
            ready["type"].as_str(),
            ready["status"].as_str(),
            ready["reason"].as_str()
        ),
        (Some("TokenReady"), Some("True"), Some("TokenFileRead")),
        "{v}"
    );
    assert_eq!(api.get("/api/v1/users/dave", "dave-token-two").0, 401);

    std::fs::write(secrets.join("dave.token"), "dave-token-two").unwrap();
    wait_for("the rotated token", || {
        api.get("/api/v1/users/dave", "dave-token-two").0 == 200
    });
    assert_eq!(api.get("/api/v1/users/dave", "dave-token-one").0, 401);

    std::fs::remove_file(secrets.join("dave.token")).unwrap();
    wait_for("the unreadable token file on the user", || {
        let (_, v) = api.get("/api/v1/users/dave", ADMIN);
        v["status"]["conditions"][0]["reason"] == "TokenFileUnreadable"
    });
    let (_, v) = api.get("/api/v1/users/dave", ADMIN);
    let ready = &v["status"]["conditions"][0];
    assert_eq!(ready["status"], "False", "{v}");
    assert!(
        ready["message"].as_str().unwrap().contains("dave.token"),
        "names the file: {v}"
    );
    assert_eq!(api.get("/api/v1/users/dave", "dave-token-two").0, 401);
}

// ---- webhooks ----------------------------------------------------------------------------

/// A callback receiver: answers 500 to the first request, 200 after; keeps each request.
type Received = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A callback receiver on plain HTTP: it records each request and answers the first with a
/// 500 (so that a retry is seen), the others with 200.
fn receiver() -> (u16, Received) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Received::default();
    let into = got.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            answer(&mut s, &into);
        }
    });
    (port, got)
}

/// The same on HTTPS, with certificate `cert` and its key (DER).
fn tls_receiver(cert: Vec<u8>, key: Vec<u8>) -> (u16, Received) {
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .unwrap();
    let config = std::sync::Arc::new(config);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Received::default();
    let into = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            answer(&mut rustls::StreamOwned::new(conn, s), &into);
        }
    });
    (port, got)
}

/// A certificate authority (PEM), and a certificate for `localhost` it signed with its key
/// (DER).
fn test_ca() -> (String, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_pem, cert.der().to_vec(), key.serialize_der())
}

/// Reads one request (the head, then the body by Content-Length), records it, answers it.
fn answer(s: &mut (impl Read + Write), into: &Received) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    if buf.is_empty() {
        // Nothing came (a handshake refused, say).
        return;
    }
    let mut all = into.lock().unwrap();
    all.push(String::from_utf8_lossy(&buf).into_owned());
    let status = if all.len() == 1 {
        "500 Internal Server Error"
    } else {
        "200 OK"
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = s.flush();
}

/// A request a receiver got, split into head and body; its signature checked.
fn signed_callback(request: &str) -> (&str, &str) {
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(": ")
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_owned())
            })
            .unwrap()
    };
    poolkeeper_http::webhook::verify(
        SECRET.as_bytes(),
        Some(&header("x-poolkeeper-timestamp")),
        Some(&header("x-poolkeeper-signature")),
        body.as_bytes(),
        now(),
    )
    .expect("the callback is signed");
    (head, body)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Api {
    /// A webhook request signed at `ts` with `secret`.
    fn hook(&self, body: &Value, ts: u64, secret: &str) -> (u16, Value) {
        let body = body.to_string();
        let sig = poolkeeper_http::webhook::sign(secret.as_bytes(), ts, body.as_bytes());
        self.hook_raw(&body, &ts.to_string(), &sig)
    }

    fn hook_raw(&self, body: &str, ts: &str, sig: &str) -> (u16, Value) {
        let s = TcpStream::connect(&self.served.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!(
            "POST /webhooks/reservations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nX-Poolkeeper-Timestamp: {ts}\r\n\
             X-Poolkeeper-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        exchange(s, &req)
    }

    /// The claim files in the API's folder (not the file writer's hidden spares).
    fn claim_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("managed/claims"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// A pool that lets claims set their limits (`claimResources`): a reservation's `cpu_limit` and
/// `memory_limit` (Docker's notation too) become the claim's resources; above the pool's bound
/// they are refused with the field and nothing is recorded.
#[test]
fn a_reservations_limits_become_the_claims_resources_where_the_pool_allows() {
    const SIZED: &str = "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {name: sized}
spec:
  template:
    image: python
    resources: {cpu: 500m, memory: 256Mi}
  claimResources: {cpu: '2', memory: 1Gi}
  warm: 1
";
    let api = Api::start_with_files(
        &[("sized.yaml", SIZED)],
        &[
            "--webhook-secret-file",
            "SECRET_FILE",
            "--webhook-image",
            "python",
        ],
    );
    let provision = |room: &str, cpu: &str, memory: &str| {
        json!({
            "event": "provision", "resource_name": room, "username": "bob",
            "custom_parameters": {"image": "python", "cpu_limit": cpu, "memory_limit": memory,
                "environment": {"A": "b"}}
        })
    };
    let (code, v) = api.hook(&provision("Room 1", "1.5", "512m"), now(), SECRET);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["pool"], "sized");
    assert_eq!(v["resources"], json!({"cpu": "1.5", "memory": "512Mi"}));
    assert_eq!(v["ignored"], json!(["environment"]));
    let claim = v["claim"].as_str().unwrap().to_owned();
    let (_, shown) = api.get(&format!("/api/v1/claims/{claim}"), BOB);
    assert_eq!(
        shown["spec"]["resources"],
        json!({"cpu": "1.5", "memory": "512Mi"}),
        "{shown}"
    );
    api.wait_phase(&claim, BOB, "Bound");

    let files = api.claim_files();
    let (code, v) = api.hook(&provision("Room 2", "4", "512m"), now(), SECRET);
    assert_eq!(
        (code, v["field"].as_str()),
        (422, Some("custom_parameters.cpu_limit")),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("above what pool"),
        "{v}"
    );
    let (code, v) = api.hook(&provision("Room 3", "1", "lots"), now(), SECRET);
    assert_eq!(
        (code, v["field"].as_str()),
        (422, Some("custom_parameters.memory_limit")),
        "{v}"
    );
    assert_eq!(api.claim_files(), files, "refusals are not recorded");
}

#[test]
fn a_signed_reservation_becomes_a_bound_claim_and_a_signed_callback_with_retries() {
    let (port, got) = receiver();
    let url = format!("http://127.0.0.1:{port}/callbacks");
    let api = Api::start_with(&[
        "--webhook-secret-file",
        "SECRET_FILE",
        "--notify-url",
        &url,
        "--webhook-image",
        "nginx",
    ]);
    let provision = json!({
        "event": "provision", "resource_name": "Lab Room 4", "user_id": 42, "username": "alice",
        "custom_parameters": {"image": "nginx", "cpu_limit": "1", "environment": {"A": "b"}}
    });
    let ts = now();
    let body = provision.to_string();
    let sig = poolkeeper_http::webhook::sign(SECRET.as_bytes(), ts, body.as_bytes());
    let (code, v) = api.hook_raw(&body, &ts.to_string(), &sig);
    assert_eq!(code, 201, "{v}");
    let claim = v["claim"].as_str().unwrap().to_owned();
    assert!(claim.starts_with("rsv-alice-lab-room-4-"), "{v}");
    assert_eq!(v["pool"], "web");
    assert_eq!(v["ignored"], json!(["cpu_limit", "environment"]));
    assert_eq!(api.claim_files(), 1);

    // Refused, and nothing changes: a replay, a bad signature, an old timestamp, an image
    // outside the allow-list.
    let (code, v) = api.hook_raw(&body, &ts.to_string(), &sig);
    assert_eq!(code, 409, "replay: {v}");
    let (code, v) = api.hook(&provision, now(), "not-the-secret-at-all");
    assert_eq!(code, 401, "{v}");
    let (code, v) = api.hook(&provision, now() - 1_000, SECRET);
    assert_eq!(code, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("window"), "{v}");
    let mut python = provision.clone();
    python["resource_name"] = json!("Lab Room 5");
    python["custom_parameters"]["image"] = json!("busybox");
    let (code, v) = api.hook(&python, now(), SECRET);
    assert_eq!(
        (code, v["field"].as_str()),
        (422, Some("custom_parameters.image")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("not allowed"), "{v}");
    let t = now();
    let bad = poolkeeper_http::webhook::sign(SECRET.as_bytes(), t, b"{not json");
    let (code, _) = api.hook_raw("{not json", &t.to_string(), &bad);
    assert_eq!(code, 422);
    assert_eq!(api.claim_files(), 1);
    // The same reservation again (freshly signed): a duplicate, answered as the first.
    let (code, v) = api.hook(&provision, now() + 1, SECRET);
    assert_eq!((code, v["created"].clone()), (200, json!(false)), "{v}");
    assert_eq!(api.claim_files(), 1);

    // Bound, and the callback is delivered on the second attempt (the first got a 500).
    api.wait_phase(&claim, ALICE, "Bound");
    let start = Instant::now();
    let shown = loop {
        let (_, v) = api.get(&format!("/api/v1/claims/{claim}"), ALICE);
        if v["reservation"]["callback"]["state"] == "Delivered" {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "callback not delivered: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shown["reservation"]["callback"]["attempts"], 2, "{shown}");
    let requests = got.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    let last = &requests[1];
    let (head, body) = signed_callback(last);
    assert!(head.starts_with("POST /callbacks "), "{head}");
    let cb: Value = serde_json::from_str(body).unwrap();
    assert_eq!(cb["event"], "provisioned");
    assert_eq!(cb["resource_name"], "Lab Room 4");
    assert_eq!(cb["user_id"], 42);
    assert_eq!(cb["claim"], claim);
    assert!(
        cb["host"].is_string() && cb["ports"]["http"].is_u64(),
        "{cb}"
    );

    // Release: the claim goes; a second release is answered the same way.
    let release = json!({"event": "release", "resource_name": "Lab Room 4", "username": "alice"});
    let (code, v) = api.hook(&release, now(), SECRET);
    assert_eq!((code, v["released"].clone()), (200, json!(true)), "{v}");
    let (code, v) = api.hook(&release, now() + 2, SECRET);
    assert_eq!((code, v["released"].clone()), (200, json!(false)), "{v}");
    let start = Instant::now();
    while api.get(&format!("/api/v1/claims/{claim}"), ALICE).0 != 404 {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Callbacks to an `https://` URL: delivered, signed, when its certificate chains to a
/// trusted authority (`--notify-ca-file`); refused by the handshake otherwise, which the
/// claim's callback state then says.
#[test]
fn callbacks_go_over_https_to_a_trusted_certificate_and_to_no_other() {
    let (ca_pem, cert, key) = test_ca();
    let (port, got) = tls_receiver(cert, key);
    let url = format!("https://localhost:{port}/callbacks");
    let cas = tempfile::tempdir().unwrap();
    let trusted = cas.path().join("trusted.pem");
    std::fs::write(&trusted, &ca_pem).unwrap();
    // Another authority: the receiver's certificate does not chain to it.
    let other = cas.path().join("other.pem");
    std::fs::write(&other, test_ca().0).unwrap();
    let provision = json!({
        "event": "provision", "resource_name": "Desk 9", "username": "alice",
        "custom_parameters": {"image": "nginx"}
    });
    let callback_of = |api: &Api, claim: &str| {
        let (_, v) = api.get(&format!("/api/v1/claims/{claim}"), ALICE);
        v["reservation"]["callback"].clone()
    };

    let hooks = |ca: &Path| {
        vec![
            "--webhook-secret-file".to_owned(),
            "SECRET_FILE".to_owned(),
            "--notify-url".to_owned(),
            url.clone(),
            "--notify-ca-file".to_owned(),
            ca.to_string_lossy().into_owned(),
        ]
    };
    let args = hooks(&trusted);
    let api = Api::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, v) = api.hook(&provision, now(), SECRET);
    assert_eq!(code, 201, "{v}");
    let claim = v["claim"].as_str().unwrap().to_owned();
    wait_for("the callback delivered over https", || {
        callback_of(&api, &claim)["state"] == "Delivered"
    });
    let requests = got.lock().unwrap().clone();
    let last = requests.last().unwrap();
    let (head, body) = signed_callback(last);
    assert!(head.starts_with("POST /callbacks HTTP/1.1"), "{head}");
    assert!(head.contains(&format!("Host: localhost:{port}")), "{head}");
    assert_eq!(serde_json::from_str::<Value>(body).unwrap()["claim"], claim);
    drop(api);

    let seen = requests.len();
    let args = hooks(&other);
    let api = Api::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, v) = api.hook(&provision, now(), SECRET);
    assert_eq!(code, 201, "{v}");
    let claim = v["claim"].as_str().unwrap().to_owned();
    wait_for("the handshake's refusal shown on the claim", || {
        let cb = callback_of(&api, &claim);
        cb["state"] == "Pending"
            && cb["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("TLS") && e.contains("certificate"))
    });
    assert_eq!(
        got.lock().unwrap().len(),
        seen,
        "nothing was sent in the clear"
    );
}

/// A reservation is one resource for one user: another user's provision of a held resource
/// is a reservation of its own, and a release naming the wrong user changes nothing and says
/// so. A signed request refused before it was acted on is not taken for received (it may be
/// sent again as it is), and a storage request is accepted and listed as ignored.
#[test]
fn reservations_belong_to_their_resource_and_user_and_refusals_are_not_recorded() {
    let api = Api::start_with(&["--webhook-secret-file", "SECRET_FILE"]);
    let for_user = |user: &str| {
        json!({"event": "provision", "resource_name": "Lab Room 7", "username": user,
               "custom_parameters": {"image": "nginx", "storage_limit": "5Gi",
                                     "persistent_storage": true}})
    };
    let (code, a) = api.hook(&for_user("alice"), now(), SECRET);
    assert_eq!(code, 201, "{a}");
    assert_eq!(
        a["ignored"],
        json!(["storage_limit", "persistent_storage"]),
        "{a}"
    );
    // bob's provision of the same resource: his own reservation, not alice's answered as his.
    let (code, b) = api.hook(&for_user("bob"), now() + 1, SECRET);
    assert_eq!(code, 201, "{b}");
    assert_ne!(a["claim"], b["claim"]);
    assert_eq!(api.claim_files(), 2);
    // A release naming a user who holds no reservation of it changes nothing, and says so.
    let release =
        |user: &str| json!({"event": "release", "resource_name": "Lab Room 7", "username": user});
    let (code, v) = api.hook(&release("carol"), now() + 2, SECRET);
    assert_eq!((code, v["released"].clone()), (200, json!(false)), "{v}");
    assert!(v["reason"].as_str().unwrap().contains("carol"), "{v}");
    assert_eq!(api.claim_files(), 2);
    // bob's release releases bob's, and alice keeps hers.
    let (code, v) = api.hook(&release("bob"), now() + 3, SECRET);
    assert_eq!(
        (code, v["released"].clone(), v["claim"].clone()),
        (200, json!(true), b["claim"].clone()),
        "{v}"
    );
    assert!(api.managed(a["claim"].as_str().unwrap()).exists());
    assert!(!api.managed(b["claim"].as_str().unwrap()).exists());

    // Refused (no such user), then the user is declared: the very same signed request is
    // acted on, not answered as a replay.
    let zed = json!({"event": "provision", "resource_name": "Lab Room 8", "username": "zed",
                     "custom_parameters": {"image": "nginx"}});
    let ts = now() + 4;
    let body = zed.to_string();
    let sig = poolkeeper_http::webhook::sign(SECRET.as_bytes(), ts, body.as_bytes());
    let (code, v) = api.hook_raw(&body, &ts.to_string(), &sig);
    assert_eq!((code, v["field"].as_str()), (404, Some("user")), "{v}");
    std::fs::write(
        api.dir.path().join("zed.yaml"),
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: User\nmetadata: {name: zed}\nspec: {}\n",
    )
    .unwrap();
    wait_for("zed declared", || {
        api.get("/api/v1/users/zed", ADMIN).0 == 200
    });
    let (code, v) = api.hook_raw(&body, &ts.to_string(), &sig);
    assert_eq!(code, 201, "{v}");
    // Acted on, it is recorded now: the same request again is a replay.
    let (code, v) = api.hook_raw(&body, &ts.to_string(), &sig);
    assert_eq!(code, 409, "{v}");
}

/// A provision overtaken by its own release (sent before it, delivered late or retried) is
/// refused and holds no instance; a provision signed after the release is a new reservation. A
/// provision of a running reservation with another image is refused, naming its pool; one of a
/// reservation whose claim ended (expired) makes it afresh, where it was answered as a
/// duplicate of the ended claim, with no instance.
#[test]
fn a_provision_overtaken_by_its_release_is_refused_and_an_ended_reservation_is_made_afresh() {
    const SHORT: &str = "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {name: short}
spec:
  template: {image: python}
  claimTTL: 2s
  warm: 1
";
    let api = Api::start_with_files(
        &[("short.yaml", SHORT)],
        &["--webhook-secret-file", "SECRET_FILE"],
    );
    let provision = |image: &str| {
        json!({"event": "provision", "resource_name": "Desk 9", "username": "bob",
               "custom_parameters": {"image": image}})
    };
    let release = json!({"event": "release", "resource_name": "Desk 9", "username": "bob"});
    let t = now();
    let (code, v) = api.hook(&release, t, SECRET);
    assert_eq!((code, v["released"].clone()), (200, json!(false)), "{v}");
    let (code, v) = api.hook(&provision("nginx"), t - 5, SECRET);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("released"), "{v}");
    assert_eq!(api.claim_files(), 0, "no claim made");
    let (code, v) = api.hook(&provision("nginx"), t + 1, SECRET);
    assert_eq!(code, 201, "{v}");
    let claim = v["claim"].as_str().unwrap().to_owned();
    let (code, v) = api.hook(&provision("busybox"), t + 2, SECRET);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("runs on pool"), "{v}");
    let (code, v) = api.hook(&release, t + 3, SECRET);
    assert_eq!((code, v["released"].clone()), (200, json!(true)), "{v}");

    // A reservation on the short pool ends with its TTL; provisioned again, it is made anew.
    let (code, v) = api.hook(&provision("python"), t + 4, SECRET);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["claim"], json!(claim));
    let path = format!("/api/v1/claims/{claim}");
    wait_for("the reservation expires", || {
        api.get(&path, ADMIN).1["status"]["phase"] == "Expired"
    });
    let (code, v) = api.hook(&provision("python"), t + 5, SECRET);
    assert_eq!((code, v["created"].clone()), (201, json!(true)), "{v}");
    wait_for("bound again", || {
        api.get(&path, ADMIN).1["status"]["phase"] == "Bound"
    });
}

#[test]
fn a_replay_is_refused_after_a_restart_too_and_an_unreadable_record_stops_the_start() {
    let hooks = ["--webhook-secret-file", "SECRET_FILE"];
    let mut api = Api::start_with(&hooks);
    let provision = json!({
        "event": "provision", "resource_name": "Desk 7", "username": "alice",
        "custom_parameters": {"image": "nginx"}
    });
    let ts = now();
    let body = provision.to_string();
    let sig = poolkeeper_http::webhook::sign(SECRET.as_bytes(), ts, body.as_bytes());
    let (code, v) = api.hook_raw(&body, &ts.to_string(), &sig);
    assert_eq!(code, 201, "{v}");
    let release = json!({"event": "release", "resource_name": "Desk 7", "username": "alice"});
    let (code, v) = api.hook(&release, now(), SECRET);
    assert_eq!((code, v["released"].clone()), (200, json!(true)), "{v}");
    assert_eq!(api.claim_files(), 0);

    // Killed and started again: the provision replayed within its window is still a replay,
    // in either form of its signature, and provisions nothing. A claim file a crash left
    // empty (its creation never acknowledged) is gone after the start; other files stay.
    let cut = api.managed("cut-short");
    std::fs::write(&cut, "").unwrap();
    api.restart(&hooks);
    assert!(!cut.exists(), "the empty claim file was left");
    assert!(api.dir.path().join("bob.yaml").exists());
    let (code, v) = api.hook_raw(&body, &ts.to_string(), &sig);
    assert_eq!(code, 409, "replay after a restart: {v}");
    let bare = sig.trim_start_matches("sha256=");
    let (code, v) = api.hook_raw(&body, &ts.to_string(), bare);
    assert_eq!(code, 409, "the same signature without its prefix: {v}");
    assert_eq!(api.claim_files(), 0);
    // A fresh signature (another timestamp) is a new request: it provisions again.
    let (code, v) = api.hook(&provision, ts + 7, SECRET);
    assert_eq!(code, 201, "{v}");

    // A record that cannot be read stops the start, naming the file, rather than starting
    // with no record (which would accept replays).
    let _ = api.served.child.kill();
    let _ = api.served.child.wait();
    let record = api.dir.path().join(".poolkeeper/webhook-signatures.json");
    std::fs::write(&record, "{\"sha256=ab\": \"x\"").unwrap();
    let mut child = Api::command(api.dir.path(), &hooks)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the controller");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the controller started with a broken record");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("webhook-signatures.json") && stderr.contains("line 1"),
        "{stderr}"
    );
}

// ---- the CLI through the API -------------------------------------------------------------

fn pk(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("POOLKEEPER_TOKEN")
        .env_remove("POOLKEEPER_SERVER")
        .output()
        .unwrap()
}

#[test]
fn the_cli_creates_lists_and_releases_claims_through_the_api() {
    let api = Api::start();
    let server = format!("http://{}", api.served.addr);
    let out = pk(&[
        "claim", "create", "web", "--name", "b1", "--wait", "--server", &server, "--token", BOB,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("b1"));
    assert!(
        lines.next().is_some_and(|l| l.starts_with("127.0.0.1 ")),
        "{text}"
    );

    // `get` through the API prints what Bob may see, as `get --dir` would.
    let out = pk(&["get", "claims", "--server", &server, "--token", BOB]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}");
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("b1") && table.contains("bob-declared"),
        "{table}"
    );
    let out = pk(&["get", "claims", "--server", &server, "--token", ALICE]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!table.contains("b1"), "alice sees bob's claim: {table}");

    // Errors say why, with the API's status.
    let out = pk(&[
        "claim",
        "release",
        "bob-declared",
        "--server",
        &server,
        "--token",
        BOB,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("409") && err.contains("bob.yaml"), "{err}");
    let out = pk(&[
        "claim", "create", "web", "--server", &server, "--token", "wrong",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    let out = pk(&[
        "claim", "release", "b1", "--server", &server, "--token", BOB,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!api.managed("b1").exists());
}

// ---- admin operations ------------------------------------------------------------------------

fn wait_for(what: &str, ok: impl FnMut() -> bool) {
    api_support::wait_for(what, Duration::from_secs(20), ok);
}

#[test]
fn admins_scale_reinitialise_release_a_users_claims_and_delete_users() {
    let api = Api::start();
    let specs_file = api.dir.path().join("specs.yaml");
    let original = std::fs::read_to_string(&specs_file).unwrap();
    let pool = |name: &str| api.get(&format!("/api/v1/pools/{name}"), ADMIN).1;

    // Users may not.
    for (method, path, body) in [
        ("POST", "/api/v1/pools/web/scale", Some(r#"{"warm": 1}"#)),
        ("POST", "/api/v1/pools/web/reinitialise", None),
        ("POST", "/api/v1/users/bob/release", None),
        ("DELETE", "/api/v1/users/bob", None),
    ] {
        let (code, v) = api.call(method, path, Some(BOB), body);
        assert_eq!(code, 403, "{method} {path}: {v}");
    }

    // Scaling edits the declared file, and only the number.
    let (code, v) = api.post("/api/v1/pools/web/scale", ADMIN, &json!({"warm": 5}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["was"].as_u64(), v["file"].as_str()),
        (Some(3), Some("specs.yaml"))
    );
    let edited = std::fs::read_to_string(&specs_file).unwrap();
    assert_eq!(edited, original.replacen("  warm: 3\n", "  warm: 5\n", 1));
    wait_for("web is 5 warm", || {
        let p = pool("web");
        p["spec"]["warm"] == 5 && p["status"]["warm"] == 5
    });
    // Beyond what its host ports serve: refused, the file untouched.
    let (code, v) = api.post("/api/v1/pools/web/scale", ADMIN, &json!({"warm": 50}));
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("greater than max"),
        "{v}"
    );
    assert_eq!(std::fs::read_to_string(&specs_file).unwrap(), edited);
    let (code, _) = api.post("/api/v1/pools/nope/scale", ADMIN, &json!({"warm": 1}));
    assert_eq!(code, 404);
    let (code, v) = api.post("/api/v1/pools/web/scale", ADMIN, &json!({"warm": -1}));
    assert_eq!(code, 422, "{v}");

    // Reinitialising replaces the warm instances; the pool is warm again.
    let (code, v) = api.post("/api/v1/pools/web/reinitialise", ADMIN, &json!(null));
    assert_eq!((code, v["replaced"].as_u64()), (200, Some(5)), "{v}");
    wait_for("web reinitialised and warm", || {
        let p = pool("web");
        p["status"]["warm"] == 5 && p["events"].to_string().contains("Reinitialised")
    });
    let (code, _) = api.post("/api/v1/pools/nope/reinitialise", ADMIN, &json!(null));
    assert_eq!(code, 404);

    // Releasing all of Bob's claims: the API's file and the document in his own file.
    let (code, v) = api.post("/api/v1/claims", BOB, &json!({"name": "b1", "pool": "web"}));
    assert_eq!(code, 201, "{v}");
    api.wait_phase("b1", BOB, "Bound");
    let (code, v) = api.post("/api/v1/users/bob/release", ADMIN, &json!(null));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["released"], json!(["b1", "bob-declared"]));
    assert!(!api.managed("b1").exists());
    assert!(
        !api.dir.path().join("bob.yaml").exists(),
        "bob.yaml declared only that claim"
    );
    wait_for("bob has no claims", || {
        names(&api.get("/api/v1/claims", BOB).1).is_empty()
    });

    // Deleting Alice: her claims go, then her document; the rest of the file stays.
    let (code, v) = api.post(
        "/api/v1/claims",
        ALICE,
        &json!({"name": "a1", "pool": "web"}),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = api.call("DELETE", "/api/v1/users/alice", Some(ADMIN), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["released"], json!(["a1"]));
    let left = std::fs::read_to_string(&specs_file).unwrap();
    assert!(!left.contains("name: alice"), "{left}");
    assert!(
        left.contains("name: bob") && left.contains("name: web"),
        "{left}"
    );
    wait_for("alice is gone and her token with her", || {
        api.get("/api/v1/users/alice", ADMIN).0 == 404 && api.get("/api/v1/claims", ALICE).0 == 401
    });
    assert_eq!(
        api.call("DELETE", "/api/v1/users/alice", Some(ADMIN), None)
            .0,
        404
    );

    // The same through the CLI.
    let server = format!("http://{}", api.served.addr);
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--server", &server, "--token", ADMIN]);
        let out = pk(&all);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = cli(&["scale", "pool", "web", "--warm", "2"]);
    assert!(ok && text.contains("warm 5 -> 2"), "{text}");
    assert!(
        std::fs::read_to_string(&specs_file)
            .unwrap()
            .contains("  warm: 2\n")
    );
    let (ok, text) = cli(&["reinit", "pool", "web"]);
    assert!(ok && text.contains("being replaced"), "{text}");
    let (ok, text) = cli(&["scale", "user", "bob", "--warm", "2"]);
    assert!(!ok && text.contains("scale acts on pools only"), "{text}");
    let (code, _) = api.post("/api/v1/claims", BOB, &json!({"name": "b2", "pool": "web"}));
    assert_eq!(code, 201);
    let (ok, text) = cli(&["claim", "release", "--user", "bob"]);
    assert!(ok && text.contains("released b2"), "{text}");
    let (ok, text) = cli(&["delete", "user", "bob"]);
    assert!(
        ok && text.contains("deleted user bob (from specs.yaml)"),
        "{text}"
    );
    let (ok, text) = cli(&["get", "users"]);
    assert!(
        ok && !text.contains("bob") && text.contains("carol"),
        "{text}"
    );
}

// ---- the OpenAPI document ----------------------------------------------------------------

#[test]
fn the_openapi_document_is_served_and_names_every_route() {
    let api = Api::start();
    let (code, served) = api.call("GET", "/openapi.json", None, None);
    assert_eq!(code, 200);
    let committed: Value = serde_json::from_str(poolkeeper_http::OPENAPI).unwrap();
    assert_eq!(served, committed);
    let paths: Vec<&String> = committed["paths"].as_object().unwrap().keys().collect();
    for route in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/api/v1/{kind}",
        "/api/v1/{kind}/{name}",
        "/api/v1/claims",
        "/api/v1/claims/{name}",
        "/api/v1/claims/{name}/files",
        "/api/v1/events",
        "/webhooks/reservations",
        "/api/v1/pools/{name}/scale",
        "/api/v1/pools/{name}/reinitialise",
        "/api/v1/users/{name}",
        "/api/v1/users/{name}/release",
        "/api/v1/users/{name}/password",
    ] {
        assert!(
            paths.iter().any(|p| *p == route),
            "{route} is not in the document"
        );
    }
}

/// schemathesis (PyPI; `e2e/run-tests.sh` installs it and sets `SCHEMATHESIS`) generates
/// requests from the document, valid and not, and checks every answer against it: no 5xx, the
/// documented status codes and bodies, valid data accepted, invalid data refused.
#[test]
fn the_api_follows_its_openapi_document() {
    let Ok(st) = std::env::var("SCHEMATHESIS") else {
        panic!("SCHEMATHESIS is not set: run the tests through e2e/run-tests.sh");
    };
    let api = Api::start_with(&["--webhook-secret-file", "SECRET_FILE"]);
    // As an admin, a claim without `user` is refused (an admin must say for whom), which a
    // schema cannot say per caller: that run leaves out the check that valid data is accepted.
    for (token, exclude) in [(ALICE, None), (ADMIN, Some("positive_data_acceptance"))] {
        let mut cmd = Command::new(&st);
        cmd.args(["run", &format!("http://{}/openapi.json", api.served.addr)]);
        if let Some(check) = exclude {
            cmd.args(["--exclude-checks", check]);
        }
        let out = cmd
            .args(["--checks", "all", "--exclude-path", "/api/v1/events"])
            .args(["--max-examples", "25", "--seed", "1"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "schemathesis found problems:\n{text}");
    }
}

// ---- uploads -----------------------------------------------------------------------------

/// A tar with entries (name, kind): `f` a regular file, `l` a symbolic link to /etc.
fn tar_with(entries: &[(&str, char)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        if *kind == 'l' {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_link_name("/etc").unwrap();
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(5);
            h.set_cksum();
            b.append(&h, &b"hello"[..]).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// A multipart form: (field name, file name, content) per part.
fn form_with(parts: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
    let mut s = String::new();
    for (name, file, body) in parts {
        s.push_str(&format!(
            "--FoRm\r\nContent-Disposition: form-data; name=\"{name}\""
        ));
        if let Some(f) = file {
            s.push_str(&format!("; filename=\"{f}\""));
        }
        s.push_str(&format!("\r\n\r\n{body}\r\n"));
    }
    s.push_str("--FoRm--\r\n");
    s.into_bytes()
}

impl Api {
    fn upload(&self, claim: &str, token: &str, body: &[u8]) -> (u16, Value) {
        self.upload_as(claim, token, "application/x-tar", body)
    }

    fn upload_form(&self, claim: &str, token: &str, body: &[u8]) -> (u16, Value) {
        self.upload_as(claim, token, "multipart/form-data; boundary=FoRm", body)
    }

    fn upload_as(&self, claim: &str, token: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let s = TcpStream::connect(&self.served.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "PUT /api/v1/claims/{claim}/files HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut raw = head.into_bytes();
        raw.extend_from_slice(body);
        exchange(s, &String::from_utf8_lossy(&raw))
    }
}

#[test]
fn uploads_go_only_into_ones_own_bound_claim_and_cannot_escape_the_mount_path() {
    let api = Api::start();
    assert_eq!(
        api.post(
            "/api/v1/claims",
            BOB,
            &json!({"name": "s1", "pool": "site"})
        )
        .0,
        201
    );
    assert_eq!(
        api.post("/api/v1/claims", BOB, &json!({"name": "w1", "pool": "web"}))
            .0,
        201
    );
    api.wait_phase("s1", BOB, "Bound");
    api.wait_phase("w1", BOB, "Bound");
    let ok = tar_with(&[("index.html", 'f'), ("css/site.css", 'f')]);
    let (code, v) = api.upload("s1", BOB, &ok);
    assert_eq!((code, v["files"].clone()), (200, json!(2)), "{v}");
    // Not Alice's to write into: as if it did not exist.
    assert_eq!(api.upload("s1", ALICE, &ok).0, 404);
    // Escapes, links and garbage are refused before anything is written.
    for (bad, says) in [
        (tar_with(&[("../escape.html", 'f')]), "stay inside"),
        (tar_with(&[("/etc/passwd", 'f')]), "stay inside"),
        (
            tar_with(&[("ok.html", 'f'), ("link", 'l')]),
            "only regular files",
        ),
        (
            b"not a tar at all, just some bytes that are long enough".repeat(20),
            "tar",
        ),
        // One path twice, as written or as `./x`: which content would land is unclear.
        (
            tar_with(&[("x.html", 'f'), ("./x.html", 'f')]),
            r#"entry "./x.html": "x.html" is given twice"#,
        ),
        (
            tar_with(&[("a", 'f'), ("a/b.html", 'f')]),
            r#"entry "a/b.html": "a/b.html" is inside "a", which is a file"#,
        ),
    ] {
        let (code, v) = api.upload("s1", BOB, &bad);
        assert_eq!(code, 422, "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{says}: {v}");
    }
    // The same as a multipart form: each part with a file name is a file.
    let form = form_with(&[
        ("file", Some("index.html"), "<h1>hi</h1>"),
        ("file", Some("css/site.css"), "body {}"),
    ]);
    let (code, v) = api.upload_form("s1", BOB, &form);
    assert_eq!((code, v["files"].clone()), (200, json!(2)), "{v}");
    assert_eq!(api.upload_form("s1", ALICE, &form).0, 404);
    for (bad, says) in [
        (form_with(&[("f", Some("../up.html"), "x")]), "stay inside"),
        (form_with(&[("note", None, "hello")]), "not a file"),
        (
            form_with(&[("f", Some("y.html"), "1"), ("g", Some("./y.html"), "2")]),
            r#"part 2 ("g"): "y.html" is given twice"#,
        ),
        (b"--FoRm\r\nno headers, no end".to_vec(), "multipart"),
    ] {
        let (code, v) = api.upload_form("s1", BOB, &bad);
        assert_eq!(code, 422, "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{says}: {v}");
    }
    // A pool without files.mountPath has nowhere to put them.
    let (code, v) = api.upload("w1", BOB, &ok);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("mountPath"), "{v}");
}

/// What a claim's own request could do to others is refused before anything is written: a
/// reservation's name (which would answer that booking as made and give the taker its place),
/// a file path that a copy would refuse (the failed copy would take an instance out of service
/// for good), and a TTL so long that adding it to a time overflows.
#[test]
fn a_claim_request_cannot_take_a_reservations_name_or_break_an_instance() {
    let api = Api::start_with(&["--webhook-secret-file", "SECRET_FILE"]);
    let alices = poolkeeper_http::webhook::claim_name("Lab Room 7", "alice");
    for (body, field) in [
        (json!({"name": alices, "pool": "web"}), "name"),
        (
            json!({"pool": "site", "files": {"./a": "x", "a": "y"}}),
            "files.a",
        ),
        (
            json!({"pool": "site", "files": {"../a": "x"}}),
            "files.../a",
        ),
        (
            json!({"pool": "site", "files": {"a": "x", "a/b": "y"}}),
            "files.a/b",
        ),
        (
            json!({"pool": "web", "ttl": "18446744073709551615ms"}),
            "ttl",
        ),
    ] {
        let (code, v) = api.post("/api/v1/claims", BOB, &body);
        assert_eq!(
            (code, v["field"].as_str()),
            (422, Some(field)),
            "{body}: {v}"
        );
    }
    assert_eq!(api.claim_files(), 0);
    // Alice's booking is hers to make.
    let provision = json!({"event": "provision", "resource_name": "Lab Room 7",
                           "username": "alice", "custom_parameters": {"image": "nginx"}});
    let (code, v) = api.hook(&provision, now(), SECRET);
    assert_eq!(
        (code, v["claim"].as_str()),
        (201, Some(alices.as_str())),
        "{v}"
    );
}

/// A request without a valid token is refused before its body is read: a client that sends the
/// head of a large upload and then nothing holds no memory and gets its 401 at once.
#[test]
fn an_unauthenticated_request_is_answered_before_its_body_is_read() {
    let api = Api::start();
    let console = ("POST /ui/claims/a1/files", None);
    for (request, token) in [
        ("PUT /api/v1/claims/a1/files", None),
        ("PUT /api/v1/claims/a1/files", Some("not-a-token")),
        console,
    ] {
        let mut s = TcpStream::connect(&api.served.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "{request} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-tar\r\n\
             Content-Length: 16000000\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 64];
        let n = s
            .read(&mut head)
            .expect("answered without waiting for the body");
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(
            head.starts_with("HTTP/1.1 401"),
            "{request} {token:?}: {head}"
        );
    }
}

/// The event stream asks at each change whether its caller may still see it: a user disabled
/// while watching sees nothing more (the stream ends).
#[test]
fn the_event_stream_follows_the_callers_permissions_as_they_change() {
    let api = Api::start();
    let bob = api.stream(BOB);
    wait_for("bob's stream is open", || {
        bob.lock().unwrap().contains("text/event-stream")
    });
    let claim = json!({"name": "b1", "pool": "web", "ttl": "4s"});
    let (code, v) = api.post("/api/v1/claims", BOB, &claim);
    assert_eq!(code, 201, "{v}");
    api.wait_phase("b1", BOB, "Bound");
    wait_for("bob sees b1", || bob.lock().unwrap().contains("\"b1\""));
    let disabled = specs().replace(
        "spec: {quota: {maxClaims: 5}, tokenSha256:",
        "spec: {disabled: true, quota: {maxClaims: 5}, tokenSha256:",
    );
    assert_ne!(disabled, specs());
    std::fs::write(api.dir.path().join("specs.yaml"), disabled).unwrap();
    wait_for("bob is disabled", || api.get("/api/v1/pools", BOB).0 == 403);
    let seen = bob.lock().unwrap().len();
    // b1's lease ends: a change of bob's claim, which bob no longer sees.
    api.wait_phase("b1", ADMIN, "Expired");
    std::thread::sleep(Duration::from_millis(500));
    let after = bob.lock().unwrap()[seen..].to_owned();
    assert!(
        !after.contains("b1"),
        "a disabled user still sees changes: {after}"
    );
}

/// An event stream whose client went away is let go of (its task, and the engine's sending to
/// it), whether or not a change its caller may see ever comes: connecting and leaving in a loop
/// must cost nothing. `poolkeeper_claim_subscribers` counts who follows claims' changes.
#[test]
fn an_event_stream_whose_client_left_is_let_go_of() {
    let api = Api::start();
    let subscribers = || -> u64 {
        let text = api.scrape();
        text.lines()
            .find_map(|l| l.strip_prefix("poolkeeper_claim_subscribers "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no poolkeeper_claim_subscribers in:\n{text}"))
    };
    let before = subscribers();
    let mut s = TcpStream::connect(&api.served.addr).unwrap();
    write!(
        s,
        "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 512];
    let n = s.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).contains("text/event-stream"));
    wait_for("the stream is followed", || subscribers() == before + 1);
    drop(s);
    // Changes alice may not see come and go; the stream she left is let go of all the same.
    let start = Instant::now();
    let mut round = 0;
    while subscribers() != before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the stream alice left is still followed"
        );
        let name = format!("bx{round}");
        let (code, v) = api.post("/api/v1/claims", BOB, &json!({"name": name, "pool": "web"}));
        assert_eq!(code, 201, "{v}");
        let (code, v) = api.call("DELETE", &format!("/api/v1/claims/{name}"), Some(BOB), None);
        assert_eq!(code, 200, "{v}");
        round += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An admin's edit through the API rewrites the file that declares the object as it is kept:
/// its permissions stay (a users file kept 0600 is not left readable to all), and a file that is
/// a link to another stays a link (the file it points to is the one rewritten).
#[test]
fn an_admins_edit_keeps_the_files_permissions_and_its_link() {
    use std::os::unix::fs::PermissionsExt;
    let api = Api::start();
    let specs = api.dir.path().join("specs.yaml");
    std::fs::set_permissions(&specs, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, v) = api.post("/api/v1/pools/web/scale", ADMIN, &json!({"warm": 2}));
    assert_eq!(code, 200, "{v}");
    let mode = std::fs::metadata(&specs).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&specs).unwrap().contains("warm: 2"));
    // The same file as a link to one kept elsewhere.
    let elsewhere = tempfile::tempdir().unwrap();
    let kept = elsewhere.path().join("specs.yaml");
    std::fs::rename(&specs, &kept).unwrap();
    std::os::unix::fs::symlink(&kept, &specs).unwrap();
    wait_for("the linked file is read", || {
        api.post("/api/v1/pools/web/scale", ADMIN, &json!({"warm": 3}))
            .0
            == 200
    });
    assert!(
        std::fs::symlink_metadata(&specs)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(std::fs::read_to_string(&kept).unwrap().contains("warm: 3"));
}
