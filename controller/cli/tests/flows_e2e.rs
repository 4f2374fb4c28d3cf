//! The eight orchestration flows of `examples/flows/`, and the old Pod Manager configs of
//! `examples/pod-manager/`, run unchanged against the Docker Engine here: each test copies the
//! example's files into a watched folder, runs `poolkeeper run` on it, and checks what a user
//! would observe (status, `docker`, HTTP answers, and the CLI's own `logs`/`exec`/`volume`).
//!
//! Images: `poolkeeper-workload:test` (built here), the Debian images of
//! `e2e/build-images.sh`, and for Pod Manager the stand-ins `e2e/tag-pod-manager-images.sh`
//! tags (run here). A test fails, not skips, when an image is missing.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::pty::Pty;
use support::*;

fn example_files(rel: &str) -> Vec<(String, String)> {
    let dir = repo().join("examples").join(rel);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no spec files in examples/{rel}");
    files
}

/// Runs the example `rel` under its own controller.
fn run_example(rel: &str, id: &str) -> Controller {
    image();
    for img in ["poolkeeper/python:bookworm", "poolkeeper/nginx:bookworm"] {
        assert!(
            !docker(None, &["image", "ls", "-q", img]).is_empty(),
            "{img} is missing: run e2e/build-images.sh"
        );
    }
    let files = example_files(rel);
    let refs: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    Controller::new(id, &refs, &[])
}

/// `poolkeeper ARGS --dir DIR` (`--dir` goes before a `--`).
fn cli(c: &Controller, args: &[&str]) -> Output {
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
        .args(&args[..split])
        .arg("--dir")
        .arg(c.path())
        .args(&args[split..])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn container<'a>(s: &'a Value, dep: &str, name: &str) -> &'a Value {
    object(s, "Deployment", dep)["status"]["containerStatuses"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

fn ready(s: &Value, dep: &str, n: u64) -> bool {
    object(s, "Deployment", dep)["status"]["ready"].as_u64() == Some(n)
}

fn docker_secs(t: &str) -> f64 {
    let t = t.trim();
    let (date_time, frac) = t.trim_end_matches('Z').split_once('.').unwrap_or((t, "0"));
    let secs = Command::new("date")
        .args(["-u", "-d", &format!("{date_time}Z"), "+%s"])
        .output()
        .unwrap();
    let whole: f64 = String::from_utf8_lossy(&secs.stdout)
        .trim()
        .parse()
        .unwrap();
    whole + format!("0.{frac}").parse::<f64>().unwrap_or(0.0)
}

const T: Duration = Duration::from_secs(60);

// ---- 1. hello world ----------------------------------------------------------------------

#[test]
fn flow_01_hello_world() {
    let _g = serial();
    let c = run_example("flows/01-hello-world", "flow01");
    let s = c.wait("hello ran to completion", T, |s| {
        container(s, "hello", "hello")["state"] == "Exited"
    });
    let h = container(&s, "hello", "hello");
    assert_eq!(h["exitCode"], 0, "{h}");
    let out = cli(&c, &["logs", "deployment/hello"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Hello from a poolkeeper deployment"
    );
    let recent = cli(&c, &["logs", "deployment/hello", "--since", "1h"]);
    assert!(text(&recent).contains("Hello from a poolkeeper deployment"));
    let none = cli(&c, &["logs", "deployment/hello", "--tail", "0"]);
    assert!(
        none.status.success() && none.stdout.is_empty(),
        "{}",
        text(&none)
    );
    // restartPolicy Never: it stays done.
    std::thread::sleep(Duration::from_secs(2));
    let s = c.status().unwrap();
    let h = container(&s, "hello", "hello");
    assert_eq!(
        (h["state"].as_str(), h["restarts"].as_u64()),
        (Some("Exited"), Some(0))
    );
}

// ---- 2. interactive shell through a pseudo-terminal --------------------------------------

#[test]
fn flow_02_interactive_shell() {
    let _g = serial();
    let c = run_example("flows/02-interactive-shell", "flow02");
    c.wait("the box runs", T, |s| ready(s, "shell", 1));
    let (pty, slave) = Pty::open(40, 100);
    // setsid --ctty: the terminal becomes the CLI's controlling terminal, so that it gets
    // SIGWINCH when the window changes, as in a real session.
    let mut child = Command::new("setsid")
        .arg("--ctty")
        .arg(env!("CARGO_BIN_EXE_poolkeeper"))
        .args(["exec", "-it", "deployment/shell", "--dir"])
        .arg(c.path())
        .args(["--", "sh"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let t = Duration::from_secs(15);
    let at = pty.expect(0, "# ", t);
    // The remote TTY has the local size...
    pty.send("stty size\r");
    let at = pty.expect(at, "40 100", t);
    // ...and follows a resize.
    pty.resize(50, 120);
    std::thread::sleep(Duration::from_millis(300));
    pty.send("stty size\r");
    let at = pty.expect(at, "50 120", t);
    // Ctrl-C interrupts the remote program, not the CLI.
    pty.send("sleep 30\r");
    std::thread::sleep(Duration::from_millis(500));
    pty.send("\x03");
    pty.send("echo back-$((40+2))\r");
    let began = Instant::now();
    pty.expect(at, "back-42", t);
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "sleep was not interrupted"
    );
    // The shell's exit code is the CLI's.
    pty.send("exit 7\r");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < t, "exec did not end:\n{}", pty.text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(7), "{}", pty.text());
}

// ---- 3. command automation ---------------------------------------------------------------

#[test]
fn flow_03_command_automation() {
    let _g = serial();
    let c = run_example("flows/03-command-automation", "flow03");
    c.wait("the toolbox runs", T, |s| ready(s, "tools", 1));
    let dir = repo().join("examples/flows/03-command-automation");
    let steps = |file: &str| {
        let path: PathBuf = dir.join(file);
        cli(
            &c,
            &[
                "exec",
                "deployment/tools",
                "--steps",
                path.to_str().unwrap(),
            ],
        )
    };
    let ok = steps("steps.steps");
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("ok   3/3 the report says 42 rows"), "{out}");

    let bad = steps("failing.steps");
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    let out = text(&bad);
    assert!(out.contains("ok   1/3 the toolbox answers"), "{out}");
    assert!(
        out.contains("FAIL 2/3 a file that does not exist: expected exit code 0, got 1"),
        "{out}"
    );
    assert!(out.contains("No such file"), "the output is shown: {out}");
    assert!(!out.contains("never reached"), "{out}");
    // A one-off command passes its exit code through.
    let one = cli(
        &c,
        &["exec", "deployment/tools", "--", "sh", "-c", "exit 5"],
    );
    assert_eq!(one.status.code(), Some(5));
}

// ---- 4. dependencies, health checks and ordered shutdown ---------------------------------

/// The daemon's clock, for `docker events --since`.
fn daemon_time() -> String {
    docker(None, &["system", "info", "-f", "{{.SystemTime}}"])
}

/// `ACTION NAME` lines of the container events of controller `id` since `since`, in order.
fn container_events(id: &str, since: &str) -> String {
    let until = daemon_time();
    let label = format!("label=poolkeeper.dev/controller={id}");
    docker(
        None,
        &[
            "events",
            "--since",
            since,
            "--until",
            &until,
            "--filter",
            &label,
            "--filter",
            "type=container",
            "--format",
            "{{.Action}} {{.Actor.Attributes.name}}",
        ],
    )
}

fn inspect(name: &str, format: &str) -> String {
    docker(None, &["inspect", "-f", format, name])
}

#[test]
fn flow_04_dependencies() {
    let _g = serial();
    let began = daemon_time();
    let c = run_example("flows/04-dependencies", "flow04");
    c.wait("db and web are ready", T, |s| ready(s, "stack", 2));
    // web was created only once db was ready (db takes 2 s).
    let db_started = docker_secs(&inspect("stack-db", "{{.State.StartedAt}}"));
    let web_created = docker_secs(&inspect("stack-web", "{{.Created}}"));
    assert!(
        web_created - db_started >= 1.9,
        "web created {:.2} s after db started",
        web_created - db_started
    );
    // web's readiness reaches db by name; and web answers on its host port.
    assert!(http_get(18481, "/healthz").is_some());

    c.remove("stack.yaml");
    c.wait("the deployment is gone", T, |s| {
        object(s, "Deployment", "stack").is_null()
            && s["instances"].as_array().is_some_and(Vec::is_empty)
    });
    let events = container_events("flow04", &began);
    let lines: Vec<&str> = events.lines().collect();
    let pos = |e: &str| {
        lines
            .iter()
            .position(|l| *l == e)
            .unwrap_or_else(|| panic!("no event {e:?} in:\n{events}"))
    };
    // Ordered shutdown: web (1.5 s to stop) is gone before db is even signalled.
    assert!(pos("destroy stack-web") < pos("kill stack-db"), "{events}");
    assert!(
        docker(None, &["network", "ls", "-q", "--filter", "name=^stack$"]).is_empty(),
        "the network is removed"
    );
}

// ---- 5. log monitoring with an event response --------------------------------------------

fn trigger(s: &Value, name: &str) -> (u64, u64) {
    object(s, "Deployment", "watch")["status"]["logTriggers"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name))
        .map(|t| {
            (
                t["fired"].as_u64().unwrap_or(0),
                t["matches"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or_default()
}

#[test]
fn flow_05_log_monitoring() {
    let _g = serial();
    let c = run_example("flows/05-log-monitoring", "flow05");
    c.wait("the app runs", T, |s| ready(s, "watch", 1));
    // `logs -f` streams the lines as they come, and keeps going.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
        .args(["logs", "-f", "deployment/watch", "--dir"])
        .arg(c.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let into = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    // Three bursts of three lines: three firings, nine matches.
    let s = c.wait("three bursts seen", T, |s| trigger(s, "disk-full").1 == 9);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f ended by itself"
    );
    let _ = follow.kill();
    let _ = follow.wait();
    let streamed = seen.lock().unwrap().matches("ERROR disk full").count();
    assert_eq!(streamed, 9, "logs -f streamed:\n{}", seen.lock().unwrap());
    assert_eq!(trigger(&s, "disk-full"), (3, 9), "once per burst");
    let cond = object(&s, "Deployment", "watch")["status"]["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == "LogTriggered"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(cond["status"], "True", "{cond}");
    assert!(has_event(&s, "Deployment", "watch", "LogTrigger"));
    std::thread::sleep(Duration::from_secs(3));
    let s = c.status().unwrap();
    assert_eq!(trigger(&s, "disk-full"), (3, 9), "nothing more fires");
    assert_eq!(trigger(&s, "fatal"), (0, 0));
    assert_eq!(container(&s, "watch", "app")["restarts"], 0);
}

// ---- 6. health monitoring and recovery ---------------------------------------------------

#[test]
fn flow_06_health_recovery() {
    let _g = serial();
    let c = run_example("flows/06-health-recovery", "flow06");
    c.wait("the app is ready", T, |s| ready(s, "health", 1));
    assert!(http_get(18482, "/healthz").is_some());
    let _ = http_get(18482, "/unhealthy");
    let s = c.wait("killed by its liveness probe and restarted", T, |s| {
        let a = container(s, "health", "app");
        a["restarts"] == 1 && a["state"] == "Running" && a["ready"] == true
    });
    assert!(has_event(&s, "Deployment", "health", "Restarting"));
    assert!(http_get(18482, "/healthz").is_some(), "healthy again");
}

// ---- 7. networking: a network per deployment, isolated -----------------------------------

#[test]
fn flow_07_networking() {
    let _g = serial();
    let c = run_example("flows/07-networking", "flow07");
    c.wait("blue and green run", T, |s| {
        ready(s, "blue", 2) && ready(s, "green", 1)
    });
    let get = |target: &str| {
        cli(
            &c,
            &[
                "exec",
                "deployment/blue/client",
                "--",
                "/pk-workload",
                "get",
                target,
                "/",
            ],
        )
    };
    let same = get("api:8080");
    assert_eq!(
        same.status.code(),
        Some(0),
        "blue reaches its api: {}",
        text(&same)
    );
    let by_name = get("green-api:8080");
    assert_ne!(
        by_name.status.code(),
        Some(0),
        "green's name resolves from blue"
    );
    let green_ip = inspect(
        "green-api",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    assert!(!green_ip.is_empty());
    let by_ip = get(&format!("{green_ip}:8080"));
    assert_ne!(
        by_ip.status.code(),
        Some(0),
        "green's address is reachable from blue"
    );
    // The same request from green itself works: the failure above is isolation.
    let own = cli(
        &c,
        &[
            "exec",
            "deployment/green",
            "--",
            "/pk-workload",
            "get",
            "api:8080",
            "/",
        ],
    );
    assert_eq!(own.status.code(), Some(0), "{}", text(&own));

    // A rolling update of blue's api (no host port): the new container runs and is ready
    // before the old one is stopped, and the client is left alone.
    let client_id = inspect("blue-client", "{{.Id}}");
    let began = daemon_time();
    let blue = std::fs::read_to_string(c.path().join("blue.yaml")).unwrap();
    c.write(
        "blue.yaml",
        &blue.replace(
            "  - name: api\n    image: poolkeeper-workload:test\n",
            "  - name: api\n    image: poolkeeper-workload:test\n    environment: {GREETING: v2}\n",
        ),
    );
    let s = c.wait("api replaced", T, |s| {
        ready(s, "blue", 2)
            && container(s, "blue", "api")["instance"]
                .as_str()
                .is_some_and(|i| i != "blue-api")
            && s["instances"].as_array().is_some_and(|a| a.len() == 3)
    });
    let new_api = container(&s, "blue", "api")["instance"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = container_events("flow07", &began);
    let lines: Vec<&str> = events.lines().collect();
    let pos = |e: &str| lines.iter().position(|l| *l == e);
    let started = pos(&format!("start {new_api}")).unwrap_or_else(|| panic!("{events}"));
    let stopped = pos("kill blue-api").or(pos("destroy blue-api"));
    assert!(
        stopped.is_some_and(|k| started < k),
        "new api started before the old one stopped:\n{events}"
    );
    assert_eq!(
        inspect("blue-client", "{{.Id}}"),
        client_id,
        "the client is not replaced"
    );
    let again = get("api:8080");
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
}

// ---- 8. volumes: shared data, backup and restore -----------------------------------------

#[test]
fn flow_08_volumes() {
    let _g = serial();
    let c = run_example("flows/08-volumes", "flow08");
    c.wait("writer and reader run", T, |s| ready(s, "notes", 2));
    let note = || http_get(18483, "/note.txt");
    assert_eq!(note().as_deref(), Some("remember the milk\n"));

    let out = cli(&c, &["volume", "backup", "deployment/notes", "shared"]);
    assert!(out.status.success(), "{}", text(&out));
    let tar_path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        tar_path.starts_with(c.path().join(".poolkeeper/backups")),
        "{tar_path:?}"
    );
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&tar_path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains("volume/note.txt"),
        "{}",
        String::from_utf8_lossy(&listing.stdout)
    );

    let rm = cli(
        &c,
        &[
            "exec",
            "deployment/notes/writer",
            "--",
            "rm",
            "/data/note.txt",
        ],
    );
    assert!(rm.status.success(), "{}", text(&rm));
    assert_eq!(note(), None, "the note is gone");

    let out = cli(
        &c,
        &[
            "volume",
            "restore",
            "deployment/notes",
            "shared",
            tar_path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(note().as_deref(), Some("remember the milk\n"), "restored");

    c.remove("notes.yaml");
    c.wait("the deployment is gone", T, |s| {
        object(s, "Deployment", "notes").is_null()
    });
    let start = Instant::now();
    while !docker(
        None,
        &["volume", "ls", "-q", "--filter", "name=notes_shared"],
    )
    .is_empty()
    {
        assert!(start.elapsed() < T, "the volume was not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- Pod Manager configs, unchanged ------------------------------------------------------

#[test]
fn pod_manager_configs_run_unchanged() {
    let _g = serial();
    let out = Command::new(repo().join("e2e/tag-pod-manager-images.sh"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let c = run_example("pod-manager", "podmgr");
    let s = c.wait("web and cache run; hello ran", T, |s| {
        ready(s, "web-cache", 2) && container(s, "hello-world", "hello")["state"] == "Exited"
    });
    // The one-shot container finished well and is not restarted (OnFailure).
    assert_eq!(container(&s, "hello-world", "hello")["exitCode"], 0);
    let logs = cli(&c, &["logs", "deployment/hello-world"]);
    assert!(text(&logs).contains("Hello from"), "{}", text(&logs));
    // nginx on its declared port; redis answers and keeps its append-only file in the volume.
    assert!(http_get(8880, "/").is_some(), "nginx answers on 8880");
    let ping = cli(
        &c,
        &[
            "exec",
            "deployment/web-cache/cache",
            "--",
            "redis-cli",
            "ping",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&ping.stdout).trim(),
        "PONG",
        "{}",
        text(&ping)
    );
    let volume = docker(
        None,
        &[
            "volume",
            "inspect",
            "-f",
            "{{index .Labels \"poolkeeper.dev/deployment\"}}",
            "web-cache_cache-data",
        ],
    );
    assert_eq!(volume, "web-cache");
    let aof = cli(
        &c,
        &["exec", "deployment/web-cache/cache", "--", "ls", "/data"],
    );
    assert!(text(&aof).contains("appendonly"), "{}", text(&aof));
    // Kept running: a killed cache comes back.
    docker(None, &["kill", "web-cache-cache"]);
    c.wait("the cache is restarted", T, |s| {
        container(s, "web-cache", "cache")["restarts"] == 1 && ready(s, "web-cache", 2)
    });
    let stats = cli(&c, &["stats", "deployment/web-cache/cache", "-o", "json"]);
    let v: Value = serde_json::from_slice(&stats.stdout).unwrap_or_default();
    assert!(
        v["memory_bytes"].as_u64().unwrap_or(0) > 0,
        "{}",
        text(&stats)
    );
    assert!(
        v["cpu_percent"].as_f64().is_some_and(|p| p >= 0.0),
        "{}",
        text(&stats)
    );
    assert!(v["pids"].as_u64().unwrap_or(0) >= 1, "{}", text(&stats));
}
