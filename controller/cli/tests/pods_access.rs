//! `poolkeeper logs`, `exec` (with `-i`, `-it` and `--steps`) and `stats` on the Kubernetes
//! runtime, against the fake API server (`poolkeeper-kube-fake`): the binary is run as a user
//! runs it, with `KUBECONFIG` naming the fake, and the target resolved from the controller's
//! status (`--dir`) or from the cluster's objects (`--pod-namespace`).
//!
//! What needs a real kubelet (a real container's output and terminal) is the fake's stand-in
//! here; against a real cluster the same commands go through the same requests.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use poolkeeper_kube_fake::FakeApi;
use serde_json::json;
use support::pty::Pty;

const NS: &str = "team";
const POD: &str = "web-abc12";

struct World {
    fake: FakeApi,
    tmp: tempfile::TempDir,
}

impl World {
    async fn new() -> World {
        let fake = FakeApi::start().await;
        fake.run_kubelet(NS);
        fake.put(
            "pods",
            NS,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": POD, "labels": {"poolkeeper.dev/pool": "web"}},
                "spec": {"containers": [{"name": "instance", "image": "nginx",
                    "resources": {"limits": {"memory": "128Mi", "cpu": "500m"}}}]},
                "status": {"phase": "Pending"},
            }),
        );
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
                 users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    \
                 user: u\n    namespace: {NS}\ncurrent-context: c\n",
                fake.url
            ),
        )
        .unwrap();
        // The status a directory-mode controller on the pod runtime writes.
        let state = tmp.path().join("dir/.poolkeeper");
        std::fs::create_dir_all(&state).unwrap();
        let origin = json!({"file": "claims.yaml", "line": 1, "col": 1});
        let status = json!({
            "controller": {"pid": std::process::id(), "runtime": "kube", "started_at": "",
                           "updated_at": "", "state_dir": state},
            "objects": [
                {"kind": "Claim", "name": "alice", "origin": origin, "spec": {},
                 "status": {"phase": "Bound", "instance": POD}},
            ],
            "diagnostics": [],
            "instances": [{"name": POD, "phase": "Ready", "ports": [], "node": "web-abc12.team.svc",
                           "claim": "alice"}],
            "nodes": [{"name": "kubernetes", "url": "", "address": "", "state": "Ready",
                       "instances": 1, "namespace": NS}],
        });
        std::fs::write(state.join("status.json"), status.to_string()).unwrap();
        let w = World { fake, tmp };
        w.wait_running().await;
        w
    }

    async fn wait_running(&self) {
        let start = Instant::now();
        while self.fake.get("pods", NS, POD).unwrap()["status"]["phase"] != "Running" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the pod never ran"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("dir")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.tmp.path().join("kubeconfig")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_poolkeeper"));
        c.args(args).env("KUBECONFIG", self.kubeconfig());
        c
    }

    /// Runs the CLI (off the runtime that serves the fake) with `stdin`.
    async fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut c = self.command(args);
        let stdin = stdin.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut child = c
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            std::io::Write::write_all(&mut input, stdin.as_bytes()).unwrap();
            drop(input);
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn dir_args<'a>(w: &'a World, cmd: &'a str, target: &'a str, rest: &[&'a str]) -> Vec<String> {
    let mut v = vec![cmd.to_owned(), target.to_owned(), "--dir".to_owned()];
    v.push(w.dir().display().to_string());
    v.extend(rest.iter().map(|s| (*s).to_owned()));
    v
}

async fn run_dir(w: &World, cmd: &str, target: &str, rest: &[&str], stdin: &str) -> Output {
    let args = dir_args(w, cmd, target, rest);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.run(&args, stdin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_claims_pod_with_a_tail() {
    let w = World::new().await;
    w.fake.append_log(NS, POD, "one\ntwo\nthree\n");
    let out = run_dir(&w, "logs", "claim/alice", &["--tail", "2"], "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "two\nthree\n");
    let asked = w.fake.requests();
    assert!(
        asked
            .iter()
            .any(|r| r.starts_with(&format!("GET /api/v1/namespaces/{NS}/pods/{POD}/log"))),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_passes_output_stdin_and_the_exit_code_through() {
    let w = World::new().await;
    let out = run_dir(
        &w,
        "exec",
        "claim/alice",
        &["--", "echo", "hi", "there"],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi there\n");
    let out = run_dir(&w, "exec", "claim/alice", &["--", "sh", "-c", "exit 3"], "").await;
    assert_eq!(out.status.code(), Some(3));
    let out = run_dir(&w, "exec", "claim/alice", &["--", "nosuch"], "").await;
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("nosuch: command not found"),
        "{out:?}"
    );
    // -i: standard input goes to the command, and its end closes the command's.
    let out = run_dir(
        &w,
        "exec",
        "claim/alice",
        &["-i", "--", "cat"],
        "typed\nlines\n",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "typed\nlines\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_steps_run_in_the_pod_and_stop_at_the_first_failure() {
    let w = World::new().await;
    let steps = w.tmp.path().join("steps.yaml");
    std::fs::write(
        &steps,
        "steps:\n- name: greet\n  run: [echo, hello]\n  expect: {outputContains: hello}\n\
         - name: fail\n  run: [sh, -c, exit 4]\n  expect: {exitCode: 0}\n\
         - name: never\n  run: [echo, nope]\n",
    )
    .unwrap();
    let out = run_dir(
        &w,
        "exec",
        "claim/alice",
        &["--steps", steps.to_str().unwrap()],
        "",
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("ok   1/3 greet"), "{stdout}");
    assert!(stdout.contains("FAIL 2/3 fail"), "{stdout}");
    assert!(!stdout.contains("never"), "{stdout}");
    assert!(!w.fake.execs().iter().any(|(_, a)| a == &["echo", "nope"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_terminal_gives_the_pod_a_tty_of_the_local_size() {
    let w = World::new().await;
    let (pty, slave) = Pty::open(40, 100);
    let mut c = w.command(&["exec", "-it", "claim/alice", "--dir"]);
    c.arg(w.dir()).args(["--", "stty", "size"]);
    let status = tokio::task::spawn_blocking(move || {
        // setsid --ctty: the terminal is the CLI's controlling terminal.
        let mut child = Command::new("setsid")
            .arg("--ctty")
            .arg(c.get_program())
            .args(c.get_args())
            .envs(c.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .spawn()
            .unwrap();
        pty.expect(0, "40 100", Duration::from_secs(15));
        let status = child.wait().unwrap();
        (status, pty.text())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1);
    assert!(
        w.fake.resizes().contains(&(40, 100)),
        "{:?}",
        w.fake.resizes()
    );
    let exec = w.fake.execs();
    assert_eq!(exec.last().unwrap().1, ["stty", "size"]);
    let asked = w.fake.requests();
    assert!(
        asked
            .iter()
            .any(|r| r.contains("/exec?") && r.contains("tty=true")),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_come_from_the_metrics_api_or_say_why_not() {
    let w = World::new().await;
    let out = run_dir(&w, "stats", "claim/alice", &[], "").await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("metrics.k8s.io") && err.contains("metrics-server"),
        "{err}"
    );
    assert!(err.contains(&format!("pod {NS}/{POD}")), "{err}");

    w.fake.put(
        "metrics.k8s.io/pods",
        NS,
        json!({"metadata": {"name": POD}, "containers": [
            {"name": "instance", "usage": {"cpu": "250m", "memory": "64Mi"}}]}),
    );
    let out = run_dir(&w, "stats", "claim/alice", &["-o", "json"], "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], POD);
    assert_eq!(v["cpu_percent"], 25.0);
    assert_eq!(v["memory_bytes"], 64 * 1024 * 1024);
    assert_eq!(v["memory_limit_bytes"], 128 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_directory_targets_are_read_from_the_cluster() {
    let w = World::new().await;
    w.fake.append_log(NS, POD, "from the pod\n");
    let out = w
        .run(
            &["logs", &format!("instance/{POD}"), "--pod-namespace", NS],
            "",
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from the pod\n");

    // A Claim in another namespace than the pods, as `run --source kube` writes it.
    w.fake.put(
        "poolkeeper.dev/claims",
        "users",
        json!({"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "Claim",
               "metadata": {"name": "bob"}, "spec": {"pool": "web", "user": "bob"},
               "status": {"phase": "Bound", "instance": POD}}),
    );
    let out = w
        .run(
            &[
                "exec",
                "claim/bob",
                "--pod-namespace",
                NS,
                "-n",
                "users",
                "--",
                "echo",
                "ok",
            ],
            "",
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ok\n");

    let out = w
        .run(
            &[
                "exec",
                "claim/carol",
                "--pod-namespace",
                NS,
                "-n",
                "users",
                "--",
                "true",
            ],
            "",
        )
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no Claim named \"carol\" in namespace users"),
        "{}",
        text(&out.stderr)
    );
    let out = w.run(&["logs", "claim/bob"], "").await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--pod-namespace"),
        "{}",
        text(&out.stderr)
    );
}
