//! The HTTP API of `poolkeeper run`, end to end over a socket, on the memory runtime: tokens,
//! who sees what, claims made and released through files in the managed folder, admission
//! checked before anything is written, and JSON errors that name the field.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_poolkeeper");
const ADMIN: &str = "admin-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";
const CAROL: &str = "carol-token-0123456789";

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
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: other}}
spec:
  template: {{image: busybox}}
  warm: 0
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

struct Api {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Api {
    fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.yaml"), specs()).unwrap();
        std::fs::write(dir.path().join("bob.yaml"), BOBS_FILE_CLAIM).unwrap();
        let token = dir.path().join("admin.token");
        std::fs::write(&token, format!("{ADMIN}\n")).unwrap();
        // The token file is not a spec: keep it out of the watched folder's specs.
        let child = Command::new(BIN)
            .args([
                "run",
                "--runtime",
                "memory",
                "--listen",
                "127.0.0.1:0",
                "--dir",
            ])
            .arg(dir.path())
            .arg("--admin-token-file")
            .arg(&token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let status = dir.path().join(".poolkeeper/status.json");
        let start = Instant::now();
        let addr = loop {
            let api = std::fs::read(&status)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v["controller"]["api"].as_str().map(str::to_owned));
            if let Some(a) = api {
                break a;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no API address in status"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Api { child, addr, dir }
    }

    /// One request; the status code and the JSON body (Null when not JSON).
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(req.as_bytes()).unwrap();
        let _ = s.write_all(body.as_bytes());
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
    let (code, v) = api.call("DELETE", "/api/v1/claims/a1", Some(ALICE), None);
    assert_eq!(code, 200, "{v}");
    assert!(!api.managed("a1").exists());
    let start = Instant::now();
    while api.get("/api/v1/claims/a1", ALICE).0 != 404 {
        assert!(start.elapsed() < Duration::from_secs(20), "a1 never went");
        std::thread::sleep(Duration::from_millis(50));
    }
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
