//! The harness of the end-to-end tests against the Docker Engine: a `poolkeeper run` child
//! process per test on a temporary directory, the status it writes, and `docker` calls.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod pty;

pub const IMAGE: &str = "poolkeeper-workload:test";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the workload image once per test run.
pub fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new(repo().join("e2e/build-workload-image.sh"))
            .arg(IMAGE)
            .output()
            .expect("run e2e/build-workload-image.sh");
        assert!(
            out.status.success(),
            "building the workload image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    IMAGE
}

pub fn docker(host: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    let out = cmd.args(args).output().expect("run docker");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Names of the containers this controller owns: running ones, or all with `all`.
pub fn owned(host: Option<&str>, id: &str, all: bool) -> Vec<String> {
    let filter = format!("label=poolkeeper.dev/controller={id}");
    let mut args = vec!["ps", "--filter", &filter, "--format", "{{.Names}}"];
    if all {
        args.push("-a");
    }
    let mut v: Vec<String> = docker(host, &args)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

pub fn running(host: Option<&str>, id: &str) -> Vec<String> {
    owned(host, id, false)
}

pub fn all_containers(host: Option<&str>, id: &str) -> Vec<String> {
    owned(host, id, true)
}

/// One HTTP GET; the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

pub struct Controller {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub hosts: Vec<Option<String>>,
}

impl Controller {
    pub fn new(id: &str, files: &[(&str, String)], args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut c = Controller {
            id: id.to_owned(),
            dir,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
            hosts: vec![None],
        };
        c.start();
        c
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("controller.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
            .args(["run", "--dir"])
            .arg(self.dir.path())
            .args(["--runtime", "docker", "--controller-id", &self.id])
            .args(["--listen", "127.0.0.1:0"])
            .args(&self.args)
            .env(
                "POOLKEEPER_LOG",
                std::env::var("E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.path().join(".poolkeeper/status.json"));
    }

    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Option<Value> {
        let bytes = std::fs::read(self.dir.path().join(".poolkeeper/status.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Waits until `pred` holds on the status; panics with the last status and log otherwise.
    pub fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if let Some(c) = self.child.as_ref().map(Child::id) {
                assert!(
                    Path::new(&format!("/proc/{c}")).exists(),
                    "controller died:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}\nlast status: {}\nlog:\n{}",
            last.map(|s| serde_json::to_string_pretty(&s).unwrap())
                .unwrap_or_default(),
            self.log()
        );
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
        for h in self.hosts.clone() {
            for name in all_containers(h.as_deref(), &self.id) {
                docker(h.as_deref(), &["rm", "-f", &name]);
            }
            let label = format!("label=poolkeeper.dev/controller={}", self.id);
            let volumes = docker(h.as_deref(), &["volume", "ls", "-q", "--filter", &label]);
            for v in volumes.lines() {
                docker(h.as_deref(), &["volume", "rm", "-f", v]);
            }
            let networks = docker(h.as_deref(), &["network", "ls", "-q", "--filter", &label]);
            for n in networks.lines() {
                docker(h.as_deref(), &["network", "rm", n]);
            }
        }
    }
}

pub fn object<'a>(s: &'a Value, kind: &str, name: &str) -> &'a Value {
    s["objects"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["kind"] == kind && o["name"] == name))
        .unwrap_or(&Value::Null)
}

pub fn pool_warm(s: &Value, name: &str) -> u64 {
    object(s, "Pool", name)["status"]["warm"]
        .as_u64()
        .unwrap_or(0)
}

pub fn claim_phase(s: &Value, name: &str) -> String {
    object(s, "Claim", name)["status"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

pub fn claim_port(s: &Value, name: &str) -> u16 {
    object(s, "Claim", name)["status"]["endpoint"]["ports"]["http"]
        .as_u64()
        .unwrap_or(0) as u16
}

pub fn claim_instance(s: &Value, name: &str) -> String {
    object(s, "Claim", name)["status"]["instance"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

pub fn has_event(s: &Value, kind: &str, name: &str, reason: &str) -> bool {
    object(s, kind, name)["events"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| e["reason"] == reason))
}

pub fn instances_of<'a>(s: &'a Value, pool: &str) -> Vec<&'a Value> {
    s["instances"]
        .as_array()
        .map(|a| a.iter().filter(|i| i["pool"] == pool).collect())
        .unwrap_or_default()
}

pub fn pool_yaml(name: &str, warm: u32, start: u16, end: u16, extra: &str) -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: {name}}}
spec:
  template:
    image: {img}
    ports: [{{name: http, containerPort: 8080}}]
    readiness: {{httpGet: {{path: /healthz, port: http}}}}
    files: {{mountPath: /srv}}
    resources: {{cpu: 250m, memory: 64Mi}}
  warm: {warm}
  hostPorts: {{start: {start}, end: {end}}}
  pullPolicy: Never
{extra}",
        img = image()
    )
}

pub const USER: &str = "apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {name: alice}
spec: {quota: {maxClaims: 5}}
";

pub fn claim_yaml(name: &str, pool: &str, file: &str) -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Claim
metadata: {{name: {name}}}
spec:
  pool: {pool}
  user: alice
  files: {{index.html: \"{file}\"}}
"
    )
}

pub const T: Duration = Duration::from_secs(30);

/// The tests share one daemon and two cores: one at a time keeps their timings honest.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- private daemons ---------------------------------------------------------------------

/// A `dockerd` of the test's own: own socket, data root, exec root and bridge, no iptables.
pub struct Daemon {
    pub dir: PathBuf,
    pub bridge: String,
    pub child: Option<Child>,
}

impl Daemon {
    pub fn start(tag: &str, subnet: u8) -> Self {
        let dir = PathBuf::from(format!("/tmp/pk-dockerd-{tag}"));
        let _ = std::fs::create_dir_all(&dir);
        std::fs::write(dir.join("daemon.json"), "{}").unwrap();
        let bridge = format!("pkbr-{tag}");
        let _ = Command::new("ip")
            .args(["link", "add", &bridge, "type", "bridge"])
            .status();
        let _ = Command::new("ip")
            .args([
                "addr",
                "add",
                &format!("172.29.{subnet}.1/24"),
                "dev",
                &bridge,
            ])
            .status();
        let _ = Command::new("ip")
            .args(["link", "set", &bridge, "up"])
            .status();
        let mut d = Daemon {
            dir,
            bridge,
            child: None,
        };
        d.run();
        // Give it the test image (no registry).
        let mut save = Command::new("docker")
            .args(["save", image()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let status = Command::new("docker")
            .args(["-H", &d.host(), "load", "-q"])
            .stdin(save.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(save.wait().unwrap().success(), "docker save");
        assert!(
            status.success(),
            "loading the image into the private daemon"
        );
        d
    }

    pub fn host(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.display())
    }

    pub fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .args(["--host", &self.host()])
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .args([
                "--bridge",
                &self.bridge,
                "--iptables=false",
                "--ip-masq=false",
            ])
            .args(["--storage-driver", "vfs"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.child = Some(child);
        let start = Instant::now();
        while docker(
            Some(&self.host()),
            &["info", "--format", "{{.ServerVersion}}"],
        )
        .is_empty()
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "private dockerd did not start: {}",
                std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the daemon as a service manager does (its containers stop with it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            for name in docker(Some(&self.host()), &["ps", "-aq"]).lines() {
                docker(Some(&self.host()), &["rm", "-f", name]);
            }
        }
        self.stop();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
