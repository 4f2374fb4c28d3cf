//! The HTTP API against the Docker Engine here: a signed reservation webhook becomes a claim
//! bound to a warm container, the booking system's receiver gets a signed callback with the
//! host and port, and that port serves the instance; metrics move with it. A replayed or badly
//! signed webhook is refused and changes nothing; one user can neither see nor release
//! another's claim; a claim over quota is refused before anything is written.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::*;

const SECRET: &str = "booking-secret-0123456789";
const ADMIN: &str = "admin-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

/// Alice (the reservations' user, room for two claims) and Bob (room for one), with tokens.
fn users() -> String {
    let digest = |t: &str| hex::encode(Sha256::digest(t.as_bytes()));
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: alice}}
spec: {{quota: {{maxClaims: 2}}, tokenSha256: {a}}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: bob}}
spec: {{quota: {{maxClaims: 1}}, tokenSha256: {b}}}
",
        a = digest(ALICE),
        b = digest(BOB)
    )
}

/// Receives callbacks (200 to each); keeps their bodies.
fn receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let into = got.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some((_, body)) = text.split_once("\r\n\r\n")
                    && serde_json::from_str::<Value>(body).is_ok()
                {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
            into.lock().unwrap().extend(body);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (port, got)
}

/// A webhook request as the booking system signs it: (body, timestamp, signature).
fn signed(body: &Value) -> (String, u64, String) {
    let body = body.to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = poolkeeper_http::webhook::sign(SECRET.as_bytes(), ts, body.as_bytes());
    (body, ts, sig)
}

fn send_hook(addr: &str, (body, ts, sig): &(String, u64, String)) -> (u16, Value) {
    request(
        addr,
        &format!(
            "POST /webhooks/reservations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             X-Poolkeeper-Timestamp: {ts}\r\nX-Poolkeeper-Signature: {sig}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn post_hook(addr: &str, body: &Value) -> (u16, Value) {
    send_hook(addr, &signed(body))
}

/// `METHOD PATH` with `token` and a JSON body (or none).
fn call(addr: &str, method: &str, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    request(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// Sends one whole request; the answer's status code and JSON body (Null if none).
fn request(addr: &str, text: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(text.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = resp
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (code, json)
}

/// The claim files the API and the webhooks wrote.
fn managed_claims(c: &Controller) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(c.path().join("managed/claims"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn metrics(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[test]
fn a_signed_reservation_is_bound_on_docker_and_the_callback_says_where() {
    let _g = serial();
    let (port, got) = receiver();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let admin = dir.path().join("admin");
    std::fs::write(&admin, ADMIN).unwrap();
    let url = format!("http://127.0.0.1:{port}/booking/callback");
    let c = Controller::new(
        "apie2e",
        &[
            ("pool.yaml", pool_yaml("web", 2, 18600, 18619, "")),
            ("user.yaml", users()),
        ],
        &[
            "--webhook-secret-file",
            secret.to_str().unwrap(),
            "--notify-url",
            &url,
            "--admin-token-file",
            admin.to_str().unwrap(),
        ],
    );
    let s = c.wait("the pool is warm", T, |s| pool_warm(s, "web") == 2);
    let addr = s["controller"]["api"].as_str().unwrap().to_owned();
    let before = metrics(&addr);

    let began = Instant::now();
    let provision = signed(
        &json!({"event": "provision", "resource_name": "course-42", "user_id": 7,
                "username": "alice", "custom_parameters": {"image": image()}}),
    );
    let (code, v) = send_hook(&addr, &provision);
    assert_eq!(code, 201, "{v}");
    let claim = v["claim"].as_str().unwrap().to_owned();
    let s = c.wait("the reservation's claim is bound", T, |s| {
        claim_phase(s, &claim) == "Bound"
    });
    let bound_after = began.elapsed();
    let port = claim_port(&s, &claim);
    assert!((18600..=18619).contains(&port));

    // The callback names the host and port, and the port serves the instance.
    let start = Instant::now();
    let cb = loop {
        if let Some(b) = got.lock().unwrap().first().cloned() {
            break b;
        }
        assert!(start.elapsed() < T, "no callback");
        std::thread::sleep(Duration::from_millis(50));
    };
    let cb: Value = serde_json::from_str(&cb).unwrap();
    assert_eq!(cb["event"], "provisioned", "{cb}");
    assert_eq!(cb["resource_name"], "course-42");
    assert_eq!(cb["ports"]["http"], port, "{cb}");
    let host = cb["host"].as_str().unwrap();
    assert_eq!(host, "127.0.0.1");
    assert!(
        http_get(port, "/").is_some(),
        "the instance answers on {host}:{port}"
    );

    // The same request again is a replay, and one signed with another secret is no booking
    // system's: both refused, and nothing changes (no claim file, no container).
    let files = managed_claims(&c);
    assert_eq!(files.len(), 1, "{files:?}");
    let containers = all_containers(None, &c.id);
    let (code, v) = send_hook(&addr, &provision);
    assert_eq!(code, 409, "a replay: {v}");
    let (body, ts, _) = signed(&json!({"event": "provision", "resource_name": "course-43",
        "user_id": 7, "username": "alice", "custom_parameters": {"image": image()}}));
    let forged = poolkeeper_http::webhook::sign(b"not-the-secret-0123456789", ts, body.as_bytes());
    let (code, v) = send_hook(&addr, &(body, ts, forged));
    assert_eq!(code, 401, "a bad signature: {v}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(managed_claims(&c), files);
    assert_eq!(all_containers(None, &c.id), containers);
    let s = c.status().unwrap();
    assert_eq!(claim_phase(&s, &claim), "Bound");

    // Bob's claim, on the same daemon: Alice can neither see nor release it, and Bob's quota
    // of one refuses a second before anything is written.
    let (code, v) = call(
        &addr,
        "POST",
        "/api/v1/claims",
        BOB,
        Some(&json!({"name": "bob-1", "pool": "web"})),
    );
    assert_eq!(code, 201, "{v}");
    let s = c.wait("Bob's claim is bound", T, |s| {
        claim_phase(s, "bob-1") == "Bound"
    });
    let bob_port = claim_port(&s, "bob-1");
    assert!(http_get(bob_port, "/").is_some(), "Bob's instance answers");
    for method in ["GET", "DELETE"] {
        // Answered as a claim that does not exist would be: nothing of Bob's leaks.
        let (code, v) = call(&addr, method, "/api/v1/claims/bob-1", ALICE, None);
        let missing = call(&addr, method, "/api/v1/claims/nobody-1", ALICE, None);
        let missing_as_bob = missing.1.to_string().replace("nobody-1", "bob-1");
        assert_eq!(code, 404, "{method} of another user's claim: {v}");
        assert_eq!((code, v.to_string()), (missing.0, missing_as_bob));
    }
    let (code, v) = call(&addr, "GET", "/api/v1/claims", ALICE, None);
    assert_eq!(code, 200, "{v}");
    assert!(
        !v.to_string().contains("bob-1"),
        "Alice's list holds none of Bob's: {v}"
    );
    let (code, v) = call(&addr, "GET", "/api/v1/claims/bob-1", BOB, None);
    assert_eq!(code, 200, "{v}");
    let (code, v) = call(
        &addr,
        "POST",
        "/api/v1/claims",
        BOB,
        Some(&json!({"name": "bob-2", "pool": "web"})),
    );
    assert_eq!(code, 403, "over quota: {v}");
    assert!(v["error"].as_str().unwrap().contains("quota"), "{v}");
    assert!(!managed_claims(&c).contains(&"bob-2.yaml".to_owned()));
    let s = c.status().unwrap();
    assert_eq!(
        claim_phase(&s, "bob-1"),
        "Bound",
        "Bob's claim is untouched"
    );
    assert_eq!(claim_port(&s, "bob-1"), bob_port);

    // An upload through the CLI and the API lands in the instance, served at once.
    let page = dir.path().join("welcome.html");
    std::fs::write(&page, "<h1>welcome to course 42</h1>\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
        .args(["upload", &format!("claim/{claim}")])
        .arg(&page)
        .args(["--server", &format!("http://{addr}"), "--token", ADMIN])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        http_get(port, "/welcome.html").as_deref(),
        Some("<h1>welcome to course 42</h1>\n")
    );

    // The same as a multipart form (`curl -F file=@PATH;filename=...`): a file in a folder.
    let form = "--b0undary\r\nContent-Disposition: form-data; name=\"file\"; \
                filename=\"docs/form.html\"\r\nContent-Type: text/html\r\n\r\n\
                <p>sent as a form</p>\n\r\n--b0undary--\r\n";
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "PUT /api/v1/claims/{claim}/files HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {ADMIN}\r\n\
         Content-Type: multipart/form-data; boundary=b0undary\r\n\
         Content-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        http_get(port, "/docs/form.html").as_deref(),
        Some("<p>sent as a form</p>\n")
    );

    // Metrics moved.
    let after = metrics(&addr);
    let bound = "poolkeeper_pool_bound{pool=\"web\"}";
    assert_eq!(metric(&before, bound), 0, "{before}");
    assert_eq!(
        metric(&after, bound),
        2,
        "the reservation and Bob's: {after}"
    );
    assert!(
        metric(&after, "poolkeeper_claim_bind_seconds_count")
            > metric(&before, "poolkeeper_claim_bind_seconds_count")
    );

    // Release: the container is recreated fresh; the claim goes.
    let (code, v) = post_hook(
        &addr,
        &json!({"event": "release", "resource_name": "course-42", "username": "alice"}),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = call(&addr, "DELETE", "/api/v1/claims/bob-1", BOB, None);
    assert_eq!(code, 200, "{v}");
    c.wait("the claims are gone and the pool warm again", T, |s| {
        object(s, "Claim", &claim).is_null()
            && object(s, "Claim", "bob-1").is_null()
            && pool_warm(s, "web") == 2
    });
    eprintln!("webhook to Bound on Docker: {bound_after:?}");
}
