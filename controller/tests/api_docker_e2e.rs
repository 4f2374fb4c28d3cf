//! The HTTP API against the Docker Engine here: a signed reservation webhook becomes a claim
//! bound to a warm container, the booking system's receiver gets a signed callback with the
//! host and port, and that port serves the instance; metrics move with it.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

const SECRET: &str = "booking-secret-0123456789";
const ADMIN: &str = "admin-token-0123456789";

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

fn post_hook(addr: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = poolkeeper::webhook::sign(SECRET.as_bytes(), ts, body.as_bytes());
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /webhooks/reservations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         X-Poolkeeper-Timestamp: {ts}\r\nX-Poolkeeper-Signature: {sig}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
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
            ("user.yaml", USER.to_owned()),
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
    let (code, v) = post_hook(
        &addr,
        &json!({"event": "provision", "resource_name": "course-42", "user_id": 7,
                "username": "alice", "custom_parameters": {"image": image()}}),
    );
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
    assert_eq!(metric(&after, bound), 1, "{after}");
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
    c.wait("the claim is gone and the pool warm again", T, |s| {
        object(s, "Claim", &claim).is_null() && pool_warm(s, "web") == 2
    });
    eprintln!("webhook to Bound on Docker: {bound_after:?}");
}
