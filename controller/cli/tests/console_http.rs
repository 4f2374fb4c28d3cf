//! The web console (`/ui`) of `poolkeeper run`, over a socket, on the memory runtime: every page
//! and form with its status code, the CSRF token every form needs, sessions in HttpOnly
//! SameSite=Strict cookies, sign-in by token and by password (set with `poolkeeper user
//! passwd`), the attempt limit, registration (off by default), another user's claim answering
//! as missing, operators' forms refused to users, and the live stream.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

mod api_support;
use api_support::{Answer, Served, read_answer, serve, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_poolkeeper");
const ADMIN: &str = "admin-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";
const OLGA: &str = "olga-token-0123456789";

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
    files: {{mountPath: /srv}}
  warm: 2
  hostPorts: {{start: 30000, end: 30010}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: vm}}
spec:
  template:
    image: poolkeeper/ssh:bookworm
    ports: [{{name: ssh, containerPort: 22}}]
    ssh: {{port: ssh, user: root}}
  warm: 1
  hostPorts: {{start: 30200, end: 30210}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: other}}
spec:
  template: {{image: busybox}}
  warm: 1
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: alice}}
spec: {{quota: {{maxClaims: 2, pools: [web]}}, tokenSha256: {a}}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: bob}}
spec:
  quota: {{maxClaims: 5}}
  tokenSha256: {b}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: olga}}
spec: {{admin: true, tokenSha256: {o}}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {{name: infra}}
spec:
  containers: [{{name: db, image: postgres}}]
",
        a = digest(ALICE),
        b = digest(BOB),
        o = digest(OLGA),
    )
}

struct Console {
    served: Served,
    dir: tempfile::TempDir,
}

impl Console {
    fn start(extra: &[&str]) -> Console {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.yaml"), specs()).unwrap();
        let token = dir.path().join("admin.token");
        std::fs::write(&token, format!("{ADMIN}\n")).unwrap();
        let mut cmd = api_support::run_memory(dir.path());
        cmd.arg("--admin-token-file").arg(&token).args(extra);
        let served = serve(&mut cmd, dir.path());
        Console { served, dir }
    }

    fn browser(&self) -> Browser {
        Browser {
            addr: self.served.addr.clone(),
            cookies: BTreeMap::new(),
        }
    }

    /// A JSON API request with a bearer token.
    fn api(&self, method: &str, path: &str, token: &str, body: &str) -> Answer {
        api_support::request(&self.served.addr, method, path, token, body)
    }
}

/// A client that keeps cookies, as a browser does.
struct Browser {
    addr: String,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !self.cookies.is_empty() {
            let c: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            head.push_str(&format!("Cookie: {}\r\n", c.join("; ")));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let a = read_answer(&mut s);
        for line in a.head.lines() {
            let Some(v) = line
                .strip_prefix("set-cookie: ")
                .or_else(|| line.strip_prefix("Set-Cookie: "))
            else {
                continue;
            };
            let (kv, _) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = kv.split_once('=').unwrap();
            if val.is_empty() || v.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), val.to_owned());
            }
        }
        a
    }

    fn get(&mut self, path: &str) -> Answer {
        self.send("GET", path, &[], b"")
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        let body: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect();
        self.send(
            "POST",
            path,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.join("&").as_bytes(),
        )
    }

    /// The CSRF token of the page at `path` (its first form's).
    fn csrf(&mut self, path: &str) -> String {
        let page = self.get(path);
        assert_eq!(page.status, 200, "{path}: {page:?}");
        hidden_csrf(&page.text)
    }

    fn sign_in_token(&mut self, token: &str) {
        let csrf = self.csrf("/ui/signin");
        let a = self.post("/ui/signin", &[("csrf", &csrf), ("token", token)]);
        assert_eq!(a.status, 303, "{a:?}");
        assert!(self.cookies.contains_key("pk_session"), "{a:?}");
    }
}

fn hidden_csrf(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field");
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn header<'a>(a: &'a Answer, name: &str) -> Vec<&'a str> {
    a.head
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            k.eq_ignore_ascii_case(name).then_some(v)
        })
        .collect()
}

fn location(a: &Answer) -> &str {
    header(a, "location").first().copied().unwrap_or("")
}

/// The claims in the folder (made through the console or the API).
fn claim_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("managed/claims"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.ends_with(".yaml") && !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn pages_redirect_until_signed_in_and_carry_a_strict_policy() {
    let c = Console::start(&[]);
    let mut b = c.browser();
    let root = b.get("/");
    assert!(matches!(root.status, 303 | 307), "{root:?}");
    assert_eq!(location(&root), "/ui");
    let home = b.get("/ui");
    assert_eq!(home.status, 303);
    assert_eq!(location(&home), "/ui/signin");
    let page = b.get("/ui/signin");
    assert_eq!(page.status, 200);
    let csp = header(&page, "content-security-policy").join(" ");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let cookie = header(&page, "set-cookie").join("\n");
    assert!(
        cookie.contains("pk_pre=")
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    // Every control has a label.
    for id in ["username", "password", "token"] {
        assert!(page.text.contains(&format!("<label for=\"{id}\"")), "{id}");
    }
    // Registration is off by default: no link, and the page and the form answer 404.
    assert!(!page.text.contains("/ui/register"));
    assert_eq!(b.get("/ui/register").status, 404);
    let csrf = hidden_csrf(&page.text);
    let reg = b.post(
        "/ui/register",
        &[
            ("csrf", &csrf),
            ("username", "mallory"),
            ("password", "longenough"),
            ("confirm", "longenough"),
        ],
    );
    assert_eq!(reg.status, 404, "{reg:?}");
    assert!(!c.dir.path().join("managed/users/mallory.yaml").exists());
    // The stream needs a session.
    assert_eq!(b.get("/ui/events").status, 401);
    // Assets are served by the binary itself.
    let js = b.get("/ui/assets/console.js");
    assert_eq!(js.status, 200);
    assert!(header(&js, "content-type")[0].starts_with("text/javascript"));
    assert_eq!(b.get("/ui/assets/console.css").status, 200);
}

#[test]
fn a_form_without_its_csrf_token_is_refused_and_changes_nothing() {
    let c = Console::start(&[]);
    let mut b = c.browser();
    // Sign-in: the token must be the pre-session cookie's.
    let _ = b.csrf("/ui/signin");
    let a = b.post("/ui/signin", &[("csrf", "forged"), ("token", ALICE)]);
    assert_eq!(a.status, 403, "{a:?}");
    assert!(!b.cookies.contains_key("pk_session"));
    let a = b.post("/ui/signin", &[("token", ALICE)]);
    assert_eq!(a.status, 403, "{a:?}");
    b.sign_in_token(ALICE);
    // Launch without the token, or with another session's: refused, no claim.
    let a = b.post("/ui/claims", &[("pool", "web")]);
    assert_eq!(a.status, 403, "{a:?}");
    let mut other = c.browser();
    other.sign_in_token(BOB);
    let bobs = other.csrf("/ui");
    let a = b.post("/ui/claims", &[("csrf", &bobs), ("pool", "web")]);
    assert_eq!(a.status, 403, "{a:?}");
    assert!(claim_files(c.dir.path()).is_empty());
    // Uploads need the token in a header.
    let a = b.send(
        "POST",
        "/ui/claims/x/files",
        &[("Content-Type", "application/x-tar")],
        b"",
    );
    assert_eq!(a.status, 403, "{a:?}");
    // Sign-out too.
    let a = b.post("/ui/signout", &[("csrf", "forged")]);
    assert_eq!(a.status, 403);
    assert_eq!(b.get("/ui").status, 200, "still signed in");
}

#[test]
fn a_user_launches_sees_and_releases_their_own_claims_only() {
    let c = Console::start(&[]);
    let mut alice = c.browser();
    alice.sign_in_token(ALICE);
    let page = alice.get("/ui");
    assert_eq!(page.status, 200);
    assert!(page.text.contains("My instances"));
    // Only the pools alice may use.
    assert!(page.text.contains("data-pool=\"web\""));
    assert!(!page.text.contains("data-pool=\"other\""));
    assert!(page.text.contains("30000-30010"));
    let csrf = hidden_csrf(&page.text);
    let a = alice.post(
        "/ui/claims",
        &[("csrf", &csrf), ("pool", "web"), ("ttl", "1h")],
    );
    assert_eq!(a.status, 303, "{a:?}");
    let files = claim_files(c.dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].trim_end_matches(".yaml").to_owned();
    assert!(name.starts_with("alice-web-"), "{name}");
    // The outcome is on the next page, once; the claim shows Bound with its link.
    wait_for("alice's claim is Bound", Duration::from_secs(10), || {
        let v = c
            .api("GET", &format!("/api/v1/claims/{name}"), ALICE, "")
            .json();
        v["status"]["phase"] == "Bound"
    });
    let page = alice.get("/ui");
    assert!(
        page.text.contains(&format!("Claim {name} made from web")),
        "{}",
        page.text
    );
    assert!(
        page.text
            .contains(&format!("data-claim=\"{name}\" data-phase=\"Bound\""))
    );
    assert!(page.text.contains("href=\"http://"));
    let again = alice.get("/ui");
    assert!(
        !again.text.contains("made from web"),
        "a flash is shown once"
    );
    // A pool she may not use: refused in words.
    let a = alice.post("/ui/claims", &[("csrf", &csrf), ("pool", "other")]);
    assert_eq!(a.status, 303);
    let page = alice.get("/ui");
    assert!(page.text.contains("Refused"), "{}", page.text);
    assert!(
        page.text.contains("may claim only from web"),
        "{}",
        page.text
    );
    // Bob's claim answers as missing to alice, and stays.
    let made = c.api(
        "POST",
        "/api/v1/claims",
        BOB,
        r#"{"pool": "other", "name": "bobs"}"#,
    );
    assert_eq!(made.status, 201, "{made:?}");
    assert!(!page.text.contains("bobs"));
    let a = alice.post("/ui/claims/bobs/release", &[("csrf", &csrf)]);
    assert_eq!(a.status, 303);
    let page = alice.get("/ui");
    assert!(
        page.text.contains("no Claim &#34;bobs&#34;"),
        "{}",
        page.text
    );
    assert_eq!(c.api("GET", "/api/v1/claims/bobs", BOB, "").status, 200);
    // She releases her own.
    let a = alice.post(&format!("/ui/claims/{name}/release"), &[("csrf", &csrf)]);
    assert_eq!(a.status, 303);
    assert!(
        alice
            .get("/ui")
            .text
            .contains(&format!("Claim {name} released"))
    );
    assert_eq!(claim_files(c.dir.path()), vec!["bobs.yaml".to_owned()]);
    // Operators' forms are not hers.
    let a = alice.post("/ui/pools/web/scale", &[("csrf", &csrf), ("warm", "9")]);
    assert_eq!(a.status, 403);
    // Signed out, the session is gone.
    let a = alice.post("/ui/signout", &[("csrf", &csrf)]);
    assert_eq!(a.status, 303);
    assert_eq!(location(&alice.get("/ui")), "/ui/signin");
}

/// `poolkeeper user passwd NAME` (the password on standard input) through the API.
fn passwd(c: &Console, user: &str, token: &str, password: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["user", "passwd", user, "--server"])
        .arg(format!("http://{}", c.served.addr))
        .args(["--token", token])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_password_set_with_user_passwd_signs_in_and_failures_are_limited() {
    let c = Console::start(&[]);
    // Bob sets his own; alice may not set bob's.
    let out = passwd(&c, "bob", ALICE, "hunter2hunter2");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("own password"));
    let out = passwd(&c, "bob", BOB, "short");
    assert!(!out.status.success());
    let out = passwd(&c, "bob", BOB, "hunter2hunter2");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("specs.yaml"));
    // The file holds the hash, not the password; the rest of it is as it was.
    let text = std::fs::read_to_string(c.dir.path().join("specs.yaml")).unwrap();
    assert!(text.contains("passwordHash: \"$argon2id$v=19$"), "{text}");
    assert!(!text.contains("hunter2"));
    let without: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("passwordHash:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(without, specs());
    // The API never shows it.
    let v = c.api("GET", "/api/v1/users/bob", ADMIN, "").json();
    assert!(v["spec"].get("passwordHash").is_none(), "{v}");
    // Signing in with it (once the watcher has read the file: the operator's page says so).
    let mut op = c.browser();
    op.sign_in_token(ADMIN);
    wait_for("bob has a password", Duration::from_secs(10), || {
        op.get("/ui")
            .text
            .contains("<th scope=\"row\">bob</th><td>0 of 5</td><td>token, password</td>")
    });
    let mut b = c.browser();
    let csrf = b.csrf("/ui/signin");
    let a = b.post(
        "/ui/signin",
        &[
            ("csrf", &csrf),
            ("username", "bob"),
            ("password", "hunter2hunter2"),
        ],
    );
    assert_eq!(a.status, 303, "{a:?}");
    assert!(b.get("/ui").text.contains("<strong id=\"me\">bob</strong>"));
    // Wrong passwords: 401 in words, then 429 after five, also with the right one.
    let mut m = c.browser();
    for _ in 0..5 {
        let csrf = m.csrf("/ui/signin");
        let a = m.post(
            "/ui/signin",
            &[
                ("csrf", &csrf),
                ("username", "bob"),
                ("password", "wrong-password"),
            ],
        );
        assert_eq!(a.status, 401, "{a:?}");
        assert!(a.text.contains("wrong user name or password"));
    }
    let csrf = m.csrf("/ui/signin");
    let a = m.post(
        "/ui/signin",
        &[
            ("csrf", &csrf),
            ("username", "bob"),
            ("password", "hunter2hunter2"),
        ],
    );
    assert_eq!(a.status, 429, "{a:?}");
    assert!(a.text.contains("too many failed sign-ins"));
    assert!(!m.cookies.contains_key("pk_session"));

    // A hash that asks too much of each check (here 4 TiB) is refused, and changes nothing.
    let costly = r#"{"passwordHash": "$argon2id$v=19$m=4294967295,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"}"#;
    let a = c.api("PUT", "/api/v1/users/bob/password", BOB, costly);
    assert_eq!(a.status, 422, "{a:?}");
    assert!(a.text.contains("m=32..65536"), "{a:?}");
    assert!(b.get("/ui").text.contains("<strong id=\"me\">bob</strong>"));
    // A new password ends the sessions the old one signed in, at once.
    let out = passwd(&c, "bob", BOB, "correct-horse-battery");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(location(&b.get("/ui")), "/ui/signin");
}

/// Wrong passwords sent all at once are counted before any is checked: five are checked and
/// the rest refused, where checking them all let 400 guesses a minute through per name.
#[test]
fn sign_ins_sent_at_once_are_limited_as_if_sent_one_by_one() {
    let c = Console::start(&[]);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let tries: Vec<_> = (0..16)
            .map(|i| {
                let c = &c;
                scope.spawn(move || {
                    let mut m = c.browser();
                    let csrf = m.csrf("/ui/signin");
                    let guess = format!("guess-{i}");
                    m.post(
                        "/ui/signin",
                        &[
                            ("csrf", &csrf),
                            ("username", "mallory"),
                            ("password", &guess),
                        ],
                    )
                    .status
                })
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((checked, refused), (5, 11), "{statuses:?}");
}

/// Right passwords sent all at once wait for the ones being checked, rather than being refused
/// as if those were failures: a class signing in together behind one address gets in.
#[test]
fn right_sign_ins_sent_at_once_all_get_in() {
    let c = Console::start(&[]);
    let out = passwd(&c, "bob", BOB, "hunter2hunter2");
    assert!(out.status.success(), "{out:?}");
    let mut op = c.browser();
    op.sign_in_token(ADMIN);
    wait_for("bob has a password", Duration::from_secs(10), || {
        op.get("/ui")
            .text
            .contains("<th scope=\"row\">bob</th><td>0 of 5</td><td>token, password</td>")
    });
    // More than the five a name may fail, all at once, every one right.
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let tries: Vec<_> = (0..8)
            .map(|_| {
                let c = &c;
                scope.spawn(move || {
                    let mut m = c.browser();
                    let csrf = m.csrf("/ui/signin");
                    m.post(
                        "/ui/signin",
                        &[
                            ("csrf", &csrf),
                            ("username", "bob"),
                            ("password", "hunter2hunter2"),
                        ],
                    )
                    .status
                })
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 303), "{statuses:?}");
}

#[test]
fn registration_when_allowed_declares_a_user_file_and_signs_in() {
    let c = Console::start(&["--allow-registration", "--registration-quota", "1"]);
    let mut b = c.browser();
    let page = b.get("/ui/signin");
    assert!(page.text.contains("/ui/register"));
    let csrf = b.csrf("/ui/register");
    let reg = |b: &mut Browser, name: &str, pw: &str, confirm: &str| {
        b.post(
            "/ui/register",
            &[
                ("csrf", &csrf),
                ("username", name),
                ("password", pw),
                ("confirm", confirm),
            ],
        )
    };
    assert_eq!(
        reg(&mut b, "Not A Name", "longenough", "longenough").status,
        422
    );
    assert_eq!(reg(&mut b, "dora", "short", "short").status, 422);
    assert_eq!(reg(&mut b, "dora", "longenough", "different!").status, 422);
    let taken = reg(&mut b, "alice", "longenough", "longenough");
    assert_eq!(taken.status, 409, "{taken:?}");
    assert!(taken.text.contains("is taken"));
    let a = reg(&mut b, "dora", "longenough", "longenough");
    assert_eq!(a.status, 303, "{a:?}");
    let file = c.dir.path().join("managed/users/dora.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("kind: User") && text.contains("maxClaims: 1"),
        "{text}"
    );
    assert!(
        text.contains("passwordHash:") && text.contains("$argon2id$v=19$"),
        "{text}"
    );
    let page = b.get("/ui");
    assert!(page.text.contains("Welcome, dora"), "{}", page.text);
    // She may launch (her quota is 1).
    let csrf = hidden_csrf(&page.text);
    assert_eq!(
        b.post("/ui/claims", &[("csrf", &csrf), ("pool", "web")])
            .status,
        303
    );
    assert_eq!(
        b.post("/ui/claims", &[("csrf", &csrf), ("pool", "web")])
            .status,
        303
    );
    let page = b.get("/ui");
    assert!(page.text.contains("Refused"), "{}", page.text);
    assert_eq!(claim_files(c.dir.path()).len(), 1);
    // The user is declared like any other: the API knows her.
    let v = c.api("GET", "/api/v1/users/dora", ADMIN, "");
    assert_eq!(v.status, 200, "{v:?}");
    // One address cannot declare users without bound: 20 registrations (made or refused) a
    // minute, then 429 and no file.
    let mut flood = c.browser();
    let mut last = 0;
    for i in 0..25 {
        let csrf = flood.csrf("/ui/register");
        let name = format!("flood-{i}");
        last = flood
            .post(
                "/ui/register",
                &[
                    ("csrf", &csrf),
                    ("username", &name),
                    ("password", "longenough"),
                    ("confirm", "longenough"),
                ],
            )
            .status;
        flood.cookies.remove("pk_session");
    }
    assert_eq!(last, 429);
    let users = std::fs::read_dir(c.dir.path().join("managed/users"))
        .unwrap()
        .count();
    assert!(users < 21, "{users} users registered from one address");
}

#[test]
fn an_operator_sees_the_grid_scales_a_pool_and_manages_users() {
    let c = Console::start(&[]);
    let mut op = c.browser();
    op.sign_in_token(ADMIN);
    let page = op.get("/ui");
    assert_eq!(page.status, 200);
    assert!(page.text.contains("Operations"));
    for want in [
        "data-pool=\"web\"",
        "data-pool=\"other\"",
        "data-user=\"alice\"",
        "Claim latency",
        "Recent events",
    ] {
        assert!(page.text.contains(want), "{want}");
    }
    let csrf = hidden_csrf(&page.text);
    let a = op.post("/ui/pools/web/scale", &[("csrf", &csrf), ("warm", "4")]);
    assert_eq!(a.status, 303);
    let text = std::fs::read_to_string(c.dir.path().join("specs.yaml")).unwrap();
    assert!(text.contains("warm: 4"), "{text}");
    assert!(op.get("/ui").text.contains("Pool web: warm 2 → 4"));
    let a = op.post("/ui/pools/web/scale", &[("csrf", &csrf), ("warm", "many")]);
    assert_eq!(a.status, 303);
    assert!(op.get("/ui").text.contains("is not a whole number"));
    assert_eq!(
        op.post("/ui/pools/web/reinitialise", &[("csrf", &csrf)])
            .status,
        303
    );
    assert!(op.get("/ui").text.contains("warm instances being replaced"));
    // Disable bob: his token stops working, his session ends; enable him again.
    let mut bob = c.browser();
    bob.sign_in_token(BOB);
    assert_eq!(
        op.post("/ui/users/bob/disable", &[("csrf", &csrf)]).status,
        303
    );
    assert!(
        op.get("/ui")
            .text
            .contains("User bob disabled (in specs.yaml).")
    );
    assert!(
        std::fs::read_to_string(c.dir.path().join("specs.yaml"))
            .unwrap()
            .contains("disabled: true")
    );
    wait_for("bob's token is refused", Duration::from_secs(10), || {
        c.api("GET", "/api/v1/claims", BOB, "").status == 403
    });
    assert_eq!(location(&bob.get("/ui")), "/ui/signin");
    assert_eq!(
        op.post("/ui/users/bob/enable", &[("csrf", &csrf)]).status,
        303
    );
    assert!(op.get("/ui").text.contains("User bob enabled"));
    wait_for("bob's token works again", Duration::from_secs(10), || {
        c.api("GET", "/api/v1/claims", BOB, "").status == 200
    });
    // Release all of bob's claims, then delete alice: her session ends.
    assert_eq!(
        c.api(
            "POST",
            "/api/v1/claims",
            BOB,
            r#"{"pool": "other", "name": "b1"}"#
        )
        .status,
        201
    );
    assert_eq!(
        op.post("/ui/users/bob/release", &[("csrf", &csrf)]).status,
        303
    );
    assert!(op.get("/ui").text.contains("User bob: released b1"));
    let mut alice = c.browser();
    alice.sign_in_token(ALICE);
    assert_eq!(
        op.post("/ui/users/alice/delete", &[("csrf", &csrf)]).status,
        303
    );
    assert!(op.get("/ui").text.contains("User alice deleted"));
    assert_eq!(location(&alice.get("/ui")), "/ui/signin");
}

#[test]
fn the_stream_pushes_pool_counts_and_the_sessions_own_claims() {
    let c = Console::start(&[]);
    let mut b = c.browser();
    b.sign_in_token(ALICE);
    let cookie = format!("pk_session={}", b.cookies["pk_session"]);
    let s = TcpStream::connect(&c.served.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(
        format!("GET /ui/events HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut r = BufReader::new(&s);
    let mut lines = Vec::new();
    let mut next_event = |r: &mut BufReader<&TcpStream>, want: &str| -> String {
        loop {
            let mut l = String::new();
            assert!(
                r.read_line(&mut l).unwrap() > 0,
                "the stream ended: {lines:?}"
            );
            lines.push(l.clone());
            if l.trim() == format!("event: {want}") {
                let mut data = String::new();
                r.read_line(&mut data).unwrap();
                return data.trim().trim_start_matches("data: ").to_owned();
            }
        }
    };
    let pools: serde_json::Value = serde_json::from_str(&next_event(&mut r, "pools")).unwrap();
    let web = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "web")
        .unwrap();
    assert_eq!(web["ports"], "30000-30010");
    // Bob's claim is not on alice's stream; hers is, Pending then Bound, with its address.
    assert_eq!(
        c.api(
            "POST",
            "/api/v1/claims",
            BOB,
            r#"{"pool": "other", "name": "b1"}"#
        )
        .status,
        201
    );
    assert_eq!(
        c.api(
            "POST",
            "/api/v1/claims",
            ALICE,
            r#"{"pool": "web", "name": "a1"}"#
        )
        .status,
        201
    );
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|v: &serde_json::Value| v["phase"] == "Bound")
    {
        let v: serde_json::Value = serde_json::from_str(&next_event(&mut r, "claim")).unwrap();
        assert_eq!(v["name"], "a1", "{v}");
        seen.push(v);
    }
    let bound = seen.last().unwrap();
    assert!(bound["address"].as_str().unwrap().contains(':'), "{bound}");
    assert!(bound["engineMs"].as_u64().unwrap() > 1_700_000_000_000);
    // Recent events name every object: on an operator's stream only, and pushed as they come.
    assert!(
        !lines.iter().any(|l| l.trim() == "event: events"),
        "a user's stream carried events: {lines:?}"
    );
    let mut op = c.browser();
    op.sign_in_token(ADMIN);
    let (code, mut ops) = open_stream(&c, &op, "/ui/events");
    assert_eq!(code, 200);
    let first = next_data(&mut ops, "events");
    assert!(first.is_array(), "{first}");
    let csrf = op.csrf("/ui");
    assert_eq!(
        op.post("/ui/pools/web/scale", &[("csrf", &csrf), ("warm", "3")])
            .status,
        303
    );
    // Pushed among the recent events; not necessarily the newest by the time a sample is taken
    // (the pool's new instances may come within the same sampling period).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = next_data(&mut ops, "events");
        let pushed = ev.as_array().into_iter().flatten().any(|e| {
            e["object"] == "Pool/web"
                && e["reason"] == "SpecApplied"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("spec changed"))
        });
        if pushed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the scale's SpecApplied never came: {ev}"
        );
    }
}

/// Reads one SSE event of `want` from a stream opened with the session's cookie.
fn open_stream(c: &Console, b: &Browser, path: &str) -> (u16, BufReader<TcpStream>) {
    let cookie = format!(
        "pk_session={}",
        b.cookies.get("pk_session").cloned().unwrap_or_default()
    );
    let s = TcpStream::connect(&c.served.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, r)
}

fn next_data(r: &mut BufReader<TcpStream>, want: &str) -> serde_json::Value {
    loop {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "the stream ended");
        if l.trim() == format!("event: {want}") {
            let mut data = String::new();
            r.read_line(&mut data).unwrap();
            return serde_json::from_str(data.trim().trim_start_matches("data: ")).unwrap();
        }
    }
}

#[test]
fn output_streams_for_ones_own_claim_and_operators_act_on_deployment_containers() {
    let c = Console::start(&[]);
    let mut alice = c.browser();
    alice.sign_in_token(ALICE);
    assert_eq!(
        c.api(
            "POST",
            "/api/v1/claims",
            ALICE,
            r#"{"pool": "web", "name": "a1"}"#
        )
        .status,
        201
    );
    assert_eq!(
        c.api(
            "POST",
            "/api/v1/claims",
            BOB,
            r#"{"pool": "other", "name": "b1"}"#
        )
        .status,
        201
    );
    wait_for("a1 is Bound", Duration::from_secs(10), || {
        c.api("GET", "/api/v1/claims/a1", ALICE, "").json()["status"]["phase"] == "Bound"
    });
    // An ssh pool's claim shows how to log in (bob may use every pool).
    let mut bob = c.browser();
    bob.sign_in_token(BOB);
    let csrf = bob.csrf("/ui");
    assert_eq!(
        bob.post("/ui/claims", &[("csrf", &csrf), ("pool", "vm")])
            .status,
        303
    );
    wait_for(
        "bob's vm shows its ssh command",
        Duration::from_secs(10),
        || {
            let page = bob.get("/ui").text;
            page.contains("data-phase=\"Bound\"")
                && page.contains("<code data-field=\"ssh\">ssh -p 3020")
        },
    );
    // Her claim's output: the recent lines first (an array).
    let (code, mut r) = open_stream(&c, &alice, "/ui/claims/a1/logs");
    assert_eq!(code, 200);
    assert!(next_data(&mut r, "recent").is_array());
    // Bob's claim answers as missing; signed out, nothing.
    let (code, _) = open_stream(&c, &alice, "/ui/claims/b1/logs");
    assert_eq!(code, 404);
    let nobody = c.browser();
    let (code, _) = open_stream(&c, &nobody, "/ui/claims/a1/logs");
    assert_eq!(code, 401);
    // Containers are for operators.
    let (code, _) = open_stream(&c, &alice, "/ui/containers/infra-db/logs");
    assert_eq!(code, 403);
    let csrf = alice.csrf("/ui");
    assert_eq!(
        alice
            .post("/ui/containers/infra-db/restart", &[("csrf", &csrf)])
            .status,
        403
    );

    let mut op = c.browser();
    op.sign_in_token(ADMIN);
    wait_for("the db container shows", Duration::from_secs(10), || {
        op.get("/ui")
            .text
            .contains("/ui/containers/infra-db/restart")
    });
    let (code, mut r) = open_stream(&c, &op, "/ui/containers/infra-db/logs");
    assert_eq!(code, 200);
    assert!(next_data(&mut r, "recent").is_array());
    let csrf = op.csrf("/ui");
    assert_eq!(
        op.post("/ui/containers/infra-db/restart", &[("csrf", &csrf)])
            .status,
        303
    );
    assert!(op.get("/ui").text.contains("Container infra-db restarted."));
    // The restart shows in the container's output (the memory runtime notes it there).
    drop(r);
    let (_, mut r) = open_stream(&c, &op, "/ui/containers/infra-db/logs");
    let recent = next_data(&mut r, "recent");
    assert!(
        recent.as_array().unwrap().iter().any(|l| l == "restarted"),
        "{recent}"
    );
    assert_eq!(
        op.post("/ui/containers/infra-db/remove", &[("csrf", &csrf)])
            .status,
        303
    );
    assert!(
        op.get("/ui")
            .text
            .contains("Container infra-db removed; its deployment starts a fresh one.")
    );
    wait_for("a fresh db runs", Duration::from_secs(10), || {
        op.get("/ui")
            .text
            .contains("/ui/containers/infra-db/restart")
    });
    // A pool's instance is not a deployment's container; nor is an unknown name.
    assert_eq!(
        op.post("/ui/containers/nope/restart", &[("csrf", &csrf)])
            .status,
        303
    );
    assert!(
        op.get("/ui")
            .text
            .contains("no deployment container &#34;nope&#34;")
    );
    assert_eq!(
        op.post("/ui/containers/infra-db/explode", &[("csrf", &csrf)])
            .status,
        303
    );
    assert!(op.get("/ui").text.contains("no action &#34;explode&#34;"));
    // Stop: declared in the deployment's file, the container stopped and kept; Start: again.
    let a = op.post(
        "/ui/deployments/infra/containers/db/stop",
        &[("csrf", &csrf)],
    );
    assert_eq!(a.status, 303);
    assert!(
        op.get("/ui")
            .text
            .contains("Deployment infra: container db declared stopped (in specs.yaml).")
    );
    let specs = std::fs::read_to_string(c.dir.path().join("specs.yaml")).unwrap();
    assert!(
        specs.contains("containers: [{stopped: true, name: db, image: postgres}]"),
        "{specs}"
    );
    wait_for("db shows Stopped", Duration::from_secs(10), || {
        let v = c.api("GET", "/api/v1/deployments/infra", ADMIN, "").json();
        v["status"]["containerStatuses"][0]["state"] == "Stopped"
    });
    assert!(
        op.get("/ui")
            .text
            .contains("/ui/deployments/infra/containers/db/start")
    );
    assert_eq!(
        op.post(
            "/ui/deployments/infra/containers/db/start",
            &[("csrf", &csrf)]
        )
        .status,
        303
    );
    wait_for("db runs again", Duration::from_secs(10), || {
        let v = c.api("GET", "/api/v1/deployments/infra", ADMIN, "").json();
        v["status"]["containerStatuses"][0]["state"] == "Running"
    });
    assert_eq!(
        op.post(
            "/ui/deployments/infra/containers/nope/stop",
            &[("csrf", &csrf)]
        )
        .status,
        303
    );
    assert!(
        op.get("/ui")
            .text
            .contains("has no container &#34;nope&#34;")
    );
}

/// A claim's output stream ends when the claim is released: its instance, reset in place
/// (`reset: Restart`) and kept (the pool's only one), is handed to the next user, whose output
/// must not reach the former user's page.
#[test]
fn a_claims_output_stream_ends_at_its_release() {
    let c = Console::start(&[]);
    std::fs::write(
        c.dir.path().join("loop.yaml"),
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {name: loop}
spec:
  template: {image: busybox}
  reset: Restart
  warm: 1
  max: 1
",
    )
    .unwrap();
    wait_for("the loop pool is warm", Duration::from_secs(10), || {
        c.api("GET", "/api/v1/pools/loop", ADMIN, "").json()["status"]["warm"] == 1
    });
    let claim = r#"{"pool": "loop", "name": "b2"}"#;
    assert_eq!(c.api("POST", "/api/v1/claims", BOB, claim).status, 201);
    wait_for("b2 is Bound", Duration::from_secs(10), || {
        c.api("GET", "/api/v1/claims/b2", BOB, "").json()["status"]["phase"] == "Bound"
    });
    let mut bob = c.browser();
    bob.sign_in_token(BOB);
    let (code, mut r) = open_stream(&c, &bob, "/ui/claims/b2/logs");
    assert_eq!(code, 200);
    assert!(next_data(&mut r, "recent").is_array());
    release(&c, "b2", BOB);
    for l in lines_to_the_end(&mut r, "the released claim's output stream") {
        assert!(!l.starts_with("event: line"), "{l}");
    }
}

/// Releases claim `name` with `token`'s API.
fn release(c: &Console, name: &str, token: &str) {
    let status = c
        .api("DELETE", &format!("/api/v1/claims/{name}"), token, "")
        .status;
    assert!(matches!(status, 200 | 202 | 204), "{status}");
}

/// The lines of a stream until it ends; panics naming `what` when it does not end within the
/// read timeout.
fn lines_to_the_end(r: &mut BufReader<TcpStream>, what: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(0) => return lines,
            Ok(_) => lines.push(l),
            Err(e) => panic!("{what} did not end: {e} (read: {lines:?})"),
        }
    }
}

/// Olga loses `admin` in her file; back once her token is a user's in the API.
fn demote_olga(c: &Console) {
    let specs = std::fs::read_to_string(c.dir.path().join("specs.yaml")).unwrap();
    let tmp = c.dir.path().join(".specs.tmp");
    std::fs::write(&tmp, specs.replace("admin: true, ", "")).unwrap();
    std::fs::rename(&tmp, c.dir.path().join("specs.yaml")).unwrap();
    wait_for("olga is a user again", Duration::from_secs(10), || {
        c.api("GET", "/api/v1/deployments", OLGA, "").status == 403
    });
}

#[test]
fn an_admin_user_operates_until_no_longer_one() {
    let c = Console::start(&[]);
    // Her token is an admin's in the API...
    assert_eq!(c.api("GET", "/api/v1/deployments", OLGA, "").status, 200);
    assert_eq!(c.api("GET", "/api/v1/deployments", ALICE, "").status, 403);
    // ...and in the console.
    let mut olga = c.browser();
    olga.sign_in_token(OLGA);
    let page = olga.get("/ui");
    assert!(page.text.contains("Operations"), "{}", page.text);
    let csrf = hidden_csrf(&page.text);
    // Demoted in her file: her session ends at the next request, her token is a user's.
    demote_olga(&c);
    let a = olga.post("/ui/pools/web/scale", &[("csrf", &csrf), ("warm", "7")]);
    assert_eq!(location(&a), "/ui/signin", "{a:?}");
    assert!(
        !std::fs::read_to_string(c.dir.path().join("specs.yaml"))
            .unwrap()
            .contains("warm: 7")
    );
    assert_eq!(location(&olga.get("/ui")), "/ui/signin");
}

/// An operator's open stream (every user's claims, every object's events) ends once she is no
/// longer one, at the next change, not when she reloads the page.
#[test]
fn an_operators_stream_ends_when_she_is_demoted() {
    let c = Console::start(&[]);
    let mut olga = c.browser();
    olga.sign_in_token(OLGA);
    let (code, mut r) = open_stream(&c, &olga, "/ui/events");
    assert_eq!(code, 200);
    next_data(&mut r, "pools");
    // She sees alice's claims while an operator.
    let claim = |name: &str| format!(r#"{{"pool": "web", "name": "{name}"}}"#);
    assert_eq!(
        c.api("POST", "/api/v1/claims", ALICE, &claim("a1")).status,
        201
    );
    assert_eq!(next_data(&mut r, "claim")["name"], "a1");
    demote_olga(&c);
    release(&c, "a1", ALICE);
    for l in lines_to_the_end(&mut r, "a demoted operator's stream") {
        assert!(
            !l.starts_with("event: claim"),
            "a demoted operator still sees alice's claims"
        );
    }
}

#[test]
fn an_operator_runs_an_example_flow_with_its_parameters_then_its_steps_then_stops_it() {
    let flows = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flows");
    let c = Console::start(&["--flows", flows.to_str().unwrap()]);
    let mut op = c.browser();
    op.sign_in_token(ADMIN);
    let page = op.get("/ui");
    assert!(page.text.contains("Example flows"));
    assert_eq!(page.text.matches("class=\"flow card\"").count(), 8);
    // Each parameter has a label, with the declared value.
    assert!(page.text.contains("hello/hello: command"), "{}", page.text);
    assert!(
        page.text
            .contains("name=\"hello/hello/image\" value=\"poolkeeper-workload:test\"")
    );
    let csrf = hidden_csrf(&page.text);
    // An empty image is refused naming the field; an unknown parameter too; nothing declared.
    let run = |op: &mut Browser, params: &[(&str, &str)]| {
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend_from_slice(params);
        op.post("/ui/flows/01-hello-world/run", &form)
    };
    assert_eq!(run(&mut op, &[("hello/hello/image", " ")]).status, 303);
    assert!(
        op.get("/ui")
            .text
            .contains("Deployment hello: spec.containers[0].image")
    );
    assert_eq!(run(&mut op, &[("hello/nope/image", "x")]).status, 303);
    assert!(
        op.get("/ui")
            .text
            .contains("hello/nope/image: not a parameter of this flow")
    );
    assert!(
        !c.dir
            .path()
            .join("managed/flows/01-hello-world.yaml")
            .exists()
    );
    // Run with another command: declared in the folder, applied by the watcher.
    let a = run(
        &mut op,
        &[("hello/hello/command", "echo 'Hello from the console'")],
    );
    assert_eq!(a.status, 303);
    assert!(
        op.get("/ui")
            .text
            .contains("Flow 01-hello-world runs: Deployment hello")
    );
    let file =
        std::fs::read_to_string(c.dir.path().join("managed/flows/01-hello-world.yaml")).unwrap();
    assert!(file.contains("Hello from the console"), "{file}");
    wait_for(
        "the deployment is declared",
        Duration::from_secs(10),
        || {
            let v = c.api("GET", "/api/v1/deployments/hello", ADMIN, "");
            v.status == 200
                && v.json()["spec"]["containers"][0]["command"][1] == "Hello from the console"
        },
    );
    // Steps run in the flow's container: on the memory runtime a command prints nothing, so
    // the first step that wants output fails, and the report says so.
    assert_eq!(
        op.post("/ui/flows/03-command-automation/run", &[("csrf", &csrf)])
            .status,
        303
    );
    wait_for("the toolbox runs", Duration::from_secs(10), || {
        op.get("/ui")
            .text
            .contains("Deployment tools: 1 of 1 ready")
    });
    assert_eq!(
        op.post(
            "/ui/flows/03-command-automation/steps-1",
            &[("csrf", &csrf)]
        )
        .status,
        303
    );
    let page = op.get("/ui");
    assert!(
        page.text
            .contains("FAIL 1/3 python is there: expected the output to contain"),
        "{}",
        page.text
    );
    assert!(page.text.contains("0 of 3 steps passed"));
    assert_eq!(
        op.post(
            "/ui/flows/03-command-automation/steps-9",
            &[("csrf", &csrf)]
        )
        .status,
        303
    );
    assert!(op.get("/ui").text.contains("no action &#34;steps-9&#34;"));
    // Stop: the file goes, and the deployment with it.
    assert_eq!(
        op.post("/ui/flows/01-hello-world/stop", &[("csrf", &csrf)])
            .status,
        303
    );
    assert!(op.get("/ui").text.contains("Flow 01-hello-world stopped"));
    assert!(
        !c.dir
            .path()
            .join("managed/flows/01-hello-world.yaml")
            .exists()
    );
    wait_for("the deployment is gone", Duration::from_secs(10), || {
        c.api("GET", "/api/v1/deployments/hello", ADMIN, "").status == 404
    });
    // Users may not run flows.
    let mut alice = c.browser();
    alice.sign_in_token(ALICE);
    let csrf = alice.csrf("/ui");
    assert_eq!(
        alice
            .post("/ui/flows/01-hello-world/run", &[("csrf", &csrf)])
            .status,
        403
    );
}
