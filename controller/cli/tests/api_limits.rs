#![allow(clippy::unwrap_used)]
//! The bounds on what comes from outside, against the real binary (`run --runtime memory`):
//! request bodies too large or too slow, headers too large or too slow, connections over the
//! limit, spec files too large; each refused in the API's error shape and counted on
//! `/metrics`; and every rejection the framework makes, on every route of the OpenAPI document,
//! answered as JSON.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

mod api_support;
use api_support::{Answer, Served, read_answer, run_memory, serve};

const ADMIN: &str = "limits-admin-token-0123456789";
const SECRET: &str = "limits-webhook-secret-0123456789";

const SPECS: &str = "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {name: web}
spec:
  template: {image: nginx, files: {mountPath: /srv}}
  warm: 1
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {name: alice}
spec: {}
";

struct Api {
    served: Served,
    dir: tempfile::TempDir,
}

impl Api {
    fn start(extra: &[&str]) -> Api {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.yaml"), SPECS).unwrap();
        std::fs::write(dir.path().join("admin.token"), ADMIN).unwrap();
        std::fs::write(dir.path().join("webhook.secret"), SECRET).unwrap();
        let mut cmd = run_memory(dir.path());
        cmd.arg("--admin-token-file")
            .arg(dir.path().join("admin.token"))
            .arg("--webhook-secret-file")
            .arg(dir.path().join("webhook.secret"))
            .args(extra);
        let served = serve(&mut cmd, dir.path());
        Api { served, dir }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.served.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Sends `head` (without its blank line) and `body` as they are; the answer's status, headers
    /// and body.
    fn raw(&self, head: &str, body: &[u8]) -> Answer {
        let mut s = self.connect();
        let mut request = format!("{head}\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes();
        request.extend_from_slice(body);
        // A request refused before its body is read may reset the connection: the answer counts.
        let _ = s.write_all(&request);
        read_answer(&mut s)
    }

    /// The counter `poolkeeper_refusals_total{reason="REASON"}`.
    fn refused(&self, reason: &str) -> u64 {
        let a = self.raw(
            &format!("GET /metrics HTTP/1.1\r\nAuthorization: Bearer {ADMIN}"),
            b"",
        );
        assert_eq!(a.status, 200, "{}", a.text);
        let prefix = format!("poolkeeper_refusals_total{{reason=\"{reason}\"}} ");
        a.text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{}", a.text))
    }
}

#[test]
fn bodies_over_the_limit_are_413_in_json_on_uploads_and_webhooks_and_counted() {
    let api = Api::start(&[]);
    for (head, limit) in [
        (
            "PUT /api/v1/claims/c1/files HTTP/1.1\r\nContent-Type: application/x-tar",
            16 << 20,
        ),
        (
            "POST /webhooks/reservations HTTP/1.1\r\nContent-Type: application/json",
            1 << 20,
        ),
        (
            "POST /api/v1/claims HTTP/1.1\r\nContent-Type: application/json",
            1 << 20,
        ),
    ] {
        let before = api.refused("body_too_large");
        // Declared larger than the limit: refused before the body is read.
        let a = api.raw(
            &format!(
                "{head}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Length: {}",
                limit + 1
            ),
            b"{",
        );
        assert_eq!(a.status, 413, "{head}: {a:?}");
        assert!(a.error().contains(&format!("({limit} bytes)")), "{a:?}");
        assert_eq!(api.refused("body_too_large"), before + 1, "{head}");
    }
    // Sent in chunks, without a length: refused once the limit is passed.
    let mut s = api.connect();
    write!(
        s,
        "POST /webhooks/reservations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b' '; 64 << 10];
    for _ in 0..20 {
        if write!(s, "{:x}\r\n", chunk.len()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let a = read_answer(&mut s);
    assert_eq!(a.status, 413, "{a:?}");
    a.error();
}

#[test]
fn headers_too_large_or_too_many_are_431_in_json_and_counted() {
    let api = Api::start(&[]);
    let many: String = (0..150).map(|i| format!("\r\nX-Filler-{i}: x")).collect();
    let a = api.raw(&format!("GET /healthz HTTP/1.1{many}"), b"");
    assert_eq!(a.status, 431, "{a:?}");
    assert!(a.error().contains("152 lines"), "{a:?}");
    let big = format!("\r\nX-Big: {}", "y".repeat(40 << 10));
    let a = api.raw(&format!("GET /api/v1/pools HTTP/1.1{big}"), b"");
    assert_eq!(a.status, 431, "{a:?}");
    a.error();
    assert_eq!(api.refused("headers_too_large"), 2);
}

#[test]
fn a_client_slow_to_send_its_headers_is_cut_off_and_counted() {
    let api = Api::start(&["--header-timeout", "1s"]);
    let start = Instant::now();
    let mut s = api.connect();
    s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    // One byte every 200 ms: never a whole head within the second.
    let mut closed = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"X").is_err() {
            closed = true;
            break;
        }
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut buf = [0u8; 512];
        if matches!(s.read(&mut buf), Ok(0)) || matches!(s.read(&mut buf), Ok(n) if n > 0) {
            closed = true;
            break;
        }
    }
    assert!(closed, "the connection was never closed");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "cut off after {took:?}");
    assert_eq!(api.refused("header_timeout"), 1);
}

#[test]
fn a_body_that_does_not_arrive_in_time_is_408_in_json_and_counted() {
    let api = Api::start(&["--body-timeout", "1s"]);
    let mut s = api.connect();
    write!(
        s,
        "POST /api/v1/claims HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"pool\""
    )
    .unwrap();
    let start = Instant::now();
    let a = read_answer(&mut s);
    assert_eq!(a.status, 408, "{a:?}");
    assert!(a.error().contains("--body-timeout"), "{a:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(api.refused("body_timeout"), 1);
}

#[test]
fn connections_over_the_limit_are_answered_503_in_json_and_counted() {
    let api = Api::start(&["--max-connections", "4"]);
    // Four connections held open (each sends a request and keeps the connection).
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = api.connect();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            s
        })
        .collect();
    let a = api.raw("GET /healthz HTTP/1.1", b"");
    assert_eq!(a.status, 503, "{a:?}");
    assert!(a.error().contains("too many connections"), "{a:?}");
    // One goes: the next is served (the metrics request itself needs a slot).
    held.pop();
    let start = Instant::now();
    let count = loop {
        let a = api.raw(
            &format!("GET /metrics HTTP/1.1\r\nAuthorization: Bearer {ADMIN}"),
            b"",
        );
        if a.status == 200 {
            break a;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{a:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        count.text.lines().any(|l| l
            .starts_with("poolkeeper_refusals_total{reason=\"too_many_connections\"} ")
            && !l.ends_with(" 0")),
        "{}",
        count.text
    );
}

#[test]
fn a_spec_file_over_the_limit_is_not_read_and_is_reported_by_name() {
    let api = Api::start(&["--max-spec-file-size", "4Ki"]);
    let big = api.dir.path().join("big.yaml");
    let mut text = SPECS
        .replace("name: web", "name: big")
        .replace("name: alice", "name: bob");
    text.push_str(&format!("# {}\n", "z".repeat(8 << 10)));
    std::fs::write(&big, &text).unwrap();
    let start = Instant::now();
    loop {
        let status: Value = serde_json::from_slice(
            &std::fs::read(api.dir.path().join(".poolkeeper/status.json")).unwrap(),
        )
        .unwrap();
        let said = status["diagnostics"].to_string();
        if said.contains("big.yaml") {
            assert!(
                said.contains("over the largest spec file of 4096 bytes"),
                "{said}"
            );
            assert!(
                !status["objects"].to_string().contains("\"big\""),
                "its objects are not loaded"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no diagnostic: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api.refused("spec_file_too_large"), 1);
}

/// A 50 MB spec file, at the default limit: never loaded, so the controller's peak memory stays
/// small, and nothing of it remains once it is removed.
#[test]
fn a_huge_spec_file_costs_no_memory() {
    let api = Api::start(&[]);
    let big = api.dir.path().join("huge.yaml");
    let line = format!("# {}\n", "z".repeat(1000));
    let mut f = std::fs::File::create(&big).unwrap();
    for _ in 0..50_000 {
        f.write_all(line.as_bytes()).unwrap();
    }
    drop(f);
    let start = Instant::now();
    while api.refused("spec_file_too_large") == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "not refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(&big).unwrap();
    let peak_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", api.served.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 64 << 10, "peak resident memory {peak_kib} KiB");
}

/// Every route of the OpenAPI document, with every method it has: a body over the limit, the
/// wrong method, an unreadable path: whatever is refused is refused in the API's error shape.
#[test]
fn every_rejection_on_every_route_is_json() {
    let api = Api::start(&[]);
    let doc: Value = serde_json::from_str(poolkeeper_http::OPENAPI).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{kind}", "pools")
            .replace("{name}", "web")
            .replace("{claim}", "c1");
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            if !["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&m.as_str()) {
                continue;
            }
            if concrete == "/api/v1/events" {
                // A stream: it answers and stays open.
                continue;
            }
            for (what, content_type, length, body) in [
                (
                    "too large a body, declared",
                    "application/json",
                    (16 << 20) + 1,
                    "{",
                ),
                ("a content type no route takes", "text/x-nonsense", 3, "abc"),
                ("broken JSON", "application/json", 5, "{\"a\":"),
            ] {
                let a = api.raw(
                    &format!(
                        "{m} {concrete} HTTP/1.1\r\nAuthorization: Bearer {ADMIN}\r\n\
                         Content-Type: {content_type}\r\nContent-Length: {length}"
                    ),
                    body.as_bytes(),
                );
                if a.status >= 400 {
                    assert!(!a.error().is_empty(), "{m} {concrete}, {what}");
                }
            }
            checked += 1;
        }
        // A method the route does not have: 405, with Allow.
        let a = api.raw(
            &format!("TRACE {concrete} HTTP/1.1\r\nAuthorization: Bearer {ADMIN}"),
            b"",
        );
        assert!(a.status == 405 || a.status == 404, "{path}: {a:?}");
        a.error();
        // A path that cannot be read (bad percent-encoding in a parameter).
        if path.contains('{') {
            let broken = path
                .replace("{kind}", "pools")
                .replace("{name}", "%FF%FE")
                .replace("{claim}", "%FF%FE");
            let a = api.raw(
                &format!("GET {broken} HTTP/1.1\r\nAuthorization: Bearer {ADMIN}"),
                b"",
            );
            if a.status >= 400 {
                a.error();
            }
        }
    }
    assert!(checked >= 15, "only {checked} operations in the document");
    // A route that does not exist.
    let a = api.raw("GET /nowhere HTTP/1.1", b"");
    assert_eq!(a.status, 404);
    a.error();
}
