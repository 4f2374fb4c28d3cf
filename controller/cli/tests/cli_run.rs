#![allow(clippy::unwrap_used)]
//! The real binary: `poolkeeper run --dir D --runtime memory` as a child process, observed
//! through `poolkeeper get` / `describe` the way a user would.
//!
//! Waits poll with deadlines; nothing here asserts timing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_poolkeeper");
const DEADLINE: Duration = Duration::from_secs(20);
const PORT_START: u16 = 32100;
const PORT_END: u16 = 32109;

fn pool_yaml(warm: u32) -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata:
  name: web
spec:
  warm: {warm}
  template:
    image: nginx:1.27
    ports:
      - name: http
        containerPort: 80
  hostPorts:
    start: {PORT_START}
    end: {PORT_END}
"
    )
}

const USER: &str = "apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata:
  name: alice
spec:
  email: alice@example.com
";

fn claim_yaml(name: &str) -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Claim
metadata:
  name: {name}
spec:
  pool: web
  user: alice
"
    )
}

fn write_set(dir: &Path) {
    std::fs::write(dir.join("pool.yaml"), pool_yaml(3)).unwrap();
    std::fs::create_dir_all(dir.join("people")).unwrap();
    std::fs::write(dir.join("people/alice.yaml"), USER).unwrap();
    std::fs::write(dir.join("people/claim.yaml"), claim_yaml("alice-web")).unwrap();
}

/// A running controller, killed (SIGKILL) and reaped when dropped, also when a test fails.
struct Controller {
    child: Option<Child>,
    log: PathBuf,
}

impl Controller {
    fn start(dir: &Path, log: PathBuf) -> Controller {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--dir"])
            .arg(dir)
            .args(["--runtime", "memory", "--listen", "127.0.0.1:0"])
            .env("POOLKEEPER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Controller {
            child: Some(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then reap (a zombie would still look alive in /proc).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("the controller exited ({status}); its log:\n{}", self.log());
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn pk(args: &[&str], dir: &Path) -> Ran {
    let out: Output = Command::new(BIN)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env("POOLKEEPER_LOG", "warn")
        .output()
        .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A kubectl-style table: columns start where the header's words start.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn parse(text: &str) -> Table {
        let mut lines = text.lines();
        let head = lines.next().unwrap_or_default();
        let mut starts = Vec::new();
        let mut prev = ' ';
        for (i, c) in head.char_indices() {
            if c != ' ' && prev == ' ' {
                starts.push(i);
            }
            prev = c;
        }
        let cut = |line: &str| -> Vec<String> {
            starts
                .iter()
                .enumerate()
                .map(|(k, &s)| {
                    let e = starts.get(k + 1).copied().unwrap_or(usize::MAX);
                    let e = e.min(line.len());
                    line.get(s.min(line.len())..e)
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .collect()
        };
        Table {
            header: cut(head),
            rows: lines.map(cut).collect(),
        }
    }

    fn row(&self, name: &str) -> Option<&Vec<String>> {
        self.rows
            .iter()
            .find(|r| r.first().map(String::as_str) == Some(name))
    }

    fn cell(&self, name: &str, column: &str) -> Option<&str> {
        let i = self.header.iter().position(|h| h == column)?;
        self.row(name)?.get(i).map(String::as_str)
    }
}

/// Polls `probe` until it returns Some; panics with the last output and the log at the deadline.
fn wait_until<T>(
    what: &str,
    ctl: &mut Controller,
    mut probe: impl FnMut() -> (Option<T>, String),
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        ctl.assert_running();
        let (v, last) = probe();
        if let Some(v) = v {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}\nlast output:\n{last}\ncontroller log:\n{}",
                ctl.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get_table(dir: &Path, args: &[&str]) -> (Table, Ran) {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    let r = pk(&a, dir);
    (Table::parse(&r.stdout), r)
}

fn wait_pool_warm(ctl: &mut Controller, dir: &Path, warm: &str) -> Table {
    wait_until(&format!("pool web WARM {warm}"), ctl, || {
        let (t, r) = get_table(dir, &["pools"]);
        let ok = r.code == 0 && t.cell("web", "WARM") == Some(warm);
        (ok.then_some(t), format!("{}{}", r.stdout, r.stderr))
    })
}

fn claim_json(dir: &Path, name: &str) -> Option<Value> {
    let r = pk(&["get", "claims", name, "-o", "json"], dir);
    if r.code != 0 {
        return None;
    }
    serde_json::from_str(&r.stdout).ok()
}

fn wait_claim_bound(ctl: &mut Controller, dir: &Path, name: &str) -> Value {
    wait_until(&format!("claim {name} Bound"), ctl, || {
        let v = claim_json(dir, name);
        let last = format!("{v:?}");
        (v.filter(|v| v["status"]["phase"] == "Bound"), last)
    })
}

/// `127.0.0.1:<port> (http)`, with the port in the pool's hostPorts range.
fn check_endpoint(endpoint: &str) -> u16 {
    let rest = endpoint
        .strip_prefix("127.0.0.1:")
        .unwrap_or_else(|| panic!("endpoint {endpoint:?}"));
    let port: u16 = rest
        .strip_suffix(" (http)")
        .unwrap_or_else(|| panic!("endpoint {endpoint:?}"))
        .parse()
        .unwrap();
    assert!(
        (PORT_START..=PORT_END).contains(&port),
        "port {port} outside the pool's hostPorts"
    );
    port
}

fn status_pid(dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join(".poolkeeper/status.json")).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.pointer("/controller/pid").and_then(Value::as_u64)
}

fn line_of(text: &str, prefix: &str) -> usize {
    text.lines().position(|l| l.starts_with(prefix)).unwrap() + 1
}

#[test]
fn run_get_describe_invalid_edit_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // Canonical: the controller reports canonical paths.
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&dir, logs.path().join("run1.log"));
    // Written after start: the watcher picks the set up.
    write_set(&dir);

    // ---- get pools
    let t = wait_pool_warm(&mut ctl, &dir, "3/3");
    assert_eq!(
        t.header,
        [
            "NAME",
            "IMAGE",
            "WARM",
            "BOUND",
            "INSTANCES",
            "QUEUED",
            "READY"
        ]
    );
    let claim = wait_claim_bound(&mut ctl, &dir, "alice-web");
    let t = wait_pool_warm(&mut ctl, &dir, "3/3");
    assert_eq!(t.cell("web", "IMAGE"), Some("nginx:1.27"));
    assert_eq!(t.cell("web", "BOUND"), Some("1"));
    assert_eq!(t.cell("web", "INSTANCES"), Some("4"));
    assert_eq!(t.cell("web", "QUEUED"), Some("0"));
    assert_eq!(t.cell("web", "READY"), Some("Warm"));

    let (t, r) = get_table(&dir, &["pools", "-o", "wide"]);
    assert_eq!(r.code, 0);
    assert_eq!(
        t.header,
        [
            "NAME",
            "IMAGE",
            "WARM",
            "BOUND",
            "INSTANCES",
            "QUEUED",
            "READY",
            "HOST-PORTS",
            "HITS",
            "MISSES",
            "RESET",
            "MESSAGE"
        ]
    );
    assert_eq!(
        t.cell("web", "HOST-PORTS"),
        Some(format!("{PORT_START}-{PORT_END}").as_str())
    );
    assert_eq!(t.cell("web", "RESET"), Some("Recreate"));
    let hits: u64 = t.cell("web", "HITS").unwrap().parse().unwrap();
    let misses: u64 = t.cell("web", "MISSES").unwrap().parse().unwrap();
    assert_eq!(hits + misses, 1, "one claim bound");

    // ---- get claims
    let (t, r) = get_table(&dir, &["claims"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        t.header,
        ["NAME", "POOL", "USER", "PHASE", "ENDPOINT", "EXPIRES"]
    );
    assert_eq!(t.cell("alice-web", "POOL"), Some("web"));
    assert_eq!(t.cell("alice-web", "USER"), Some("alice"));
    assert_eq!(t.cell("alice-web", "PHASE"), Some("Bound"));
    let port = check_endpoint(t.cell("alice-web", "ENDPOINT").unwrap());

    let (t, r) = get_table(&dir, &["claims", "-o", "wide"]);
    assert_eq!(r.code, 0);
    assert_eq!(
        t.header,
        [
            "NAME", "POOL", "USER", "PHASE", "ENDPOINT", "EXPIRES", "INSTANCE", "QUEUE", "REASON"
        ]
    );
    let instance = claim["status"]["instance"].as_str().unwrap().to_owned();
    assert_eq!(t.cell("alice-web", "INSTANCE"), Some(instance.as_str()));
    assert!(instance.starts_with("web-"), "{instance}");

    // ---- -o json / yaml: Kubernetes-shaped
    assert_eq!(claim["apiVersion"], "poolkeeper.dev/v1alpha1");
    assert_eq!(claim["kind"], "Claim");
    assert_eq!(claim["metadata"]["name"], "alice-web");
    assert_eq!(claim["spec"]["pool"], "web");
    assert_eq!(claim["spec"]["user"], "alice");
    assert_eq!(claim["status"]["phase"], "Bound");
    assert_eq!(claim["status"]["endpoint"]["host"], "127.0.0.1");
    assert_eq!(
        claim["status"]["endpoint"]["ports"]["http"],
        u64::from(port)
    );
    let r = pk(&["get", "claims", "alice-web", "-o", "yaml"], &dir);
    assert_eq!(r.code, 0);
    let y: Value = serde_saphyr::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("-o yaml is not YAML: {e}\n{}", r.stdout));
    assert_eq!(y["apiVersion"], "poolkeeper.dev/v1alpha1");
    assert_eq!(y["kind"], "Claim");
    assert_eq!(y["status"]["phase"], "Bound");
    assert_eq!(y["status"]["instance"], instance.as_str());
    let r = pk(&["get", "pools", "-o", "json"], &dir);
    let list: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["kind"], "Pool");
    assert_eq!(list["items"][0]["status"]["warm"], 3);

    // ---- users
    let (t, _) = get_table(&dir, &["users"]);
    assert_eq!(t.cell("alice", "EMAIL"), Some("alice@example.com"));
    assert_eq!(t.cell("alice", "CLAIMS"), Some("1/3"));

    // ---- describe
    let r = pk(&["describe", "pool", "web"], &dir);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut at = 0;
    for section in [
        "Name:",
        "Spec:",
        "Status:",
        "Conditions:",
        "Instances:",
        "Events:",
    ] {
        let i = r
            .stdout
            .find(&format!("\n{section}"))
            .map(|i| i + 1)
            .or_else(|| r.stdout.starts_with(section).then_some(0));
        let i = i.unwrap_or_else(|| panic!("no {section} section:\n{}", r.stdout));
        assert!(i >= at, "{section} out of order:\n{}", r.stdout);
        at = i;
    }
    assert!(r.stdout.starts_with("Name:         web\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains("  Ready "),
        "Ready condition row:\n{}",
        r.stdout
    );
    let inst_line = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&instance))
        .unwrap_or_else(|| panic!("instance {instance} not listed:\n{}", r.stdout));
    assert!(
        inst_line.contains("alice-web") && inst_line.contains(&port.to_string()),
        "{inst_line}"
    );
    assert!(r.stdout.contains("SpecApplied"), "events:\n{}", r.stdout);
    let r = pk(&["describe", "claim", "alice-web"], &dir);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("Bound") && r.stdout.contains("Events:"),
        "{}",
        r.stdout
    );

    // ---- unknown names and kinds
    let r = pk(&["get", "pools", "nope"], &dir);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    assert_eq!(pk(&["describe", "claim", "nope"], &dir).code, 1);
    let r = pk(&["get", "widgets"], &dir);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("unknown kind"), "{}", r.stderr);

    // ---- an invalid edit: reported by `get`, the old spec keeps working
    let bad = pool_yaml(50);
    std::fs::write(dir.join("pool.yaml"), &bad).unwrap();
    let want = format!(
        "problem: {}:{}:3: Pool/web: spec.warm: warm (50) is greater than max (10)",
        dir.join("pool.yaml").display(),
        line_of(&bad, "  warm:")
    );
    let r = wait_until("the problem on get's stderr", &mut ctl, || {
        let r = pk(&["get", "pools"], &dir);
        let ok = r.stderr.lines().any(|l| l == want);
        let last = r.stderr.clone();
        (ok.then_some(r), last)
    });
    let t = Table::parse(&r.stdout);
    assert_eq!(
        t.cell("web", "WARM"),
        Some("3/3"),
        "the last valid spec is in use"
    );
    assert!(
        ctl.log().contains("warm (50) is greater than max (10)"),
        "not in the log:\n{}",
        ctl.log()
    );
    let r = pk(&["describe", "pool", "web"], &dir);
    assert!(
        r.stdout
            .contains("Problems (the last valid spec is in use):"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("SpecValid"), "{}", r.stdout);
    // A new claim still binds on the old spec.
    std::fs::write(dir.join("people/claim2.yaml"), claim_yaml("alice-two")).unwrap();
    wait_claim_bound(&mut ctl, &dir, "alice-two");
    // Fixed: the problem goes away.
    std::fs::write(dir.join("pool.yaml"), pool_yaml(3)).unwrap();
    wait_until("the problem cleared", &mut ctl, || {
        let r = pk(&["get", "pools"], &dir);
        let ok = !r.stderr.contains("problem:");
        (ok.then_some(()), r.stderr)
    });
    let r = pk(&["describe", "pool", "web"], &dir);
    assert!(!r.stdout.contains("Problems"), "{}", r.stdout);

    // ---- restart after SIGKILL
    let old_pid = ctl.pid();
    wait_until(
        "status.json written by the first controller",
        &mut ctl,
        || {
            (
                status_pid(&dir).filter(|p| *p == u64::from(old_pid)),
                String::new(),
            )
        },
    );
    ctl.kill();
    let r = pk(&["get", "claims"], &dir);
    assert!(
        r.stderr.contains("is not running"),
        "no stale-status warning:\n{}",
        r.stderr
    );
    let mut ctl = Controller::start(&dir, logs.path().join("run2.log"));
    let new_pid = u64::from(ctl.pid());
    wait_until("status.json from the new controller", &mut ctl, || {
        (status_pid(&dir).filter(|p| *p == new_pid), String::new())
    });
    // The memory runtime lives inside the controller process, so SIGKILL took every instance
    // with it: the binding the store kept names an instance that no longer exists. What must
    // survive is the claim itself (the store did not lose or fail it): it is Bound again, to a
    // new instance. (With a runtime that outlives the controller, e.g. Docker, it would be the
    // same instance.)
    for name in ["alice-web", "alice-two"] {
        let v = wait_claim_bound(&mut ctl, &dir, name);
        assert_ne!(v["status"]["phase"], "Failed");
        let new_instance = v["status"]["instance"].as_str().unwrap();
        if name == "alice-web" {
            assert_ne!(
                new_instance, instance,
                "instances cannot survive the memory runtime"
            );
        }
    }
    let (t, _) = get_table(&dir, &["claims"]);
    assert_eq!(t.rows.len(), 2, "{:?}", t.rows);
    for row in &t.rows {
        assert_eq!(row[3], "Bound", "{row:?}");
    }
    wait_pool_warm(&mut ctl, &dir, "3/3");
    let r = pk(&["get", "pools"], &dir);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

#[test]
fn an_unreachable_docker_engine_is_a_clear_error_naming_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--dir"])
        .arg(tmp.path())
        .args([
            "--runtime",
            "docker",
            "--docker-host",
            "unix:///nonexistent/docker.sock",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("unix:///nonexistent/docker.sock"),
        "{stderr}"
    );
    assert!(stderr.contains("error:"), "{stderr}");
}

#[test]
fn get_without_a_controller_warns_and_lists_specs() {
    let tmp = tempfile::tempdir().unwrap();
    write_set(tmp.path());
    let r = pk(&["get", "pools"], tmp.path());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("warning: no status in"), "{}", r.stderr);
    let t = Table::parse(&r.stdout);
    assert_eq!(t.cell("web", "IMAGE"), Some("nginx:1.27"));
    assert_eq!(t.cell("web", "WARM"), Some("-/3"));
    let r = pk(&["get", "claims", "alice-web", "-o", "json"], tmp.path());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["kind"], "Claim");
    assert_eq!(v["spec"]["pool"], "web");
    assert!(v["status"].is_null());
    let r = pk(&["describe", "user", "alice"], tmp.path());
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("alice@example.com"), "{}", r.stdout);
    // Reading must not create the state folder (only a controller writes there).
    assert!(!tmp.path().join(".poolkeeper").exists());
}

#[test]
fn sigterm_stops_the_controller_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    std::fs::write(dir.join("pool.yaml"), pool_yaml(1)).unwrap();
    let logs = tempfile::tempdir().unwrap();
    for run in 0..2 {
        let mut ctl = Controller::start(&dir, logs.path().join(format!("run{run}.log")));
        let pid = ctl.pid();
        wait_until("status.json names the controller", &mut ctl, || {
            (
                status_pid(&dir).filter(|p| *p == u64::from(pid)),
                String::new(),
            )
        });
        wait_pool_warm(&mut ctl, &dir, "1/1");
        let killed = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(s) = ctl.child.as_mut().unwrap().try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "still running after SIGTERM:\n{}",
                ctl.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "exit {status} after SIGTERM:\n{}",
            ctl.log()
        );
        assert!(ctl.log().contains("stopping (SIGTERM)"), "{}", ctl.log());
        ctl.child = None;
    }
}

/// Under systemd's `Type=notify` with a watchdog: READY=1 once the folder is read and the API
/// listens, WATCHDOG=1 at half of `$WATCHDOG_USEC` while the engine answers, STOPPING=1 on
/// SIGTERM. (That the pings stop when the engine's loop is stuck is a unit test of `notify`.)
#[test]
fn run_notifies_the_service_manager_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    std::fs::write(dir.join("pool.yaml"), pool_yaml(1)).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("run.log");
    let mut child = Command::new(BIN)
        .args(["run", "--dir"])
        .arg(&dir)
        .args(["--runtime", "memory", "--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}):\n{}", read(&log)));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("STATUS=watching"), "{ready:?}");
    // Ready means serving: the API answers at once, at the address the status file names.
    let api = status_api(&dir).expect("the status file names the API when READY=1 is sent");
    let mut s = std::net::TcpStream::connect(&api).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Pings every 0.2 s.
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "five pings in {took:?}"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopping = loop {
        let m = next();
        if m != "WATCHDOG=1" {
            break m;
        }
    };
    assert_eq!(stopping, "STOPPING=1");
    assert!(child.wait().unwrap().success(), "{}", read(&log));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn status_api(dir: &Path) -> Option<String> {
    let bytes = std::fs::read(dir.join(".poolkeeper/status.json")).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["controller"]["api"].as_str().map(str::to_owned)
}
