//! The command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use poolkeeper_engine::status::{ObjectView, Snapshot};
use poolkeeper_kinds::{Kind, Object};
use poolkeeper_source_dir::layout::{state_dir, status_file};
use poolkeeper_source_dir::loader::validate_paths;

pub use crate::args::*;
use crate::run::{Runtimes, run_cmd, run_kube};

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POOLKEEPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: not in a journal, a file or a pipe, nor when
    // NO_COLOR is set (no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
}

/// The controller runs on one thread: the engine is a single task that owns all state, and
/// everything else it waits on is I/O. One thread means no lock contention, no cross-thread
/// wake-ups on the hot path, and one allocator arena (a large share of resident memory when
/// 100k objects are spread over per-thread arenas). The file watcher has its own thread.
fn controller_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Crds => {
            print!("{}", poolkeeper_kinds::crd::crds_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Admission { namespaces } => {
            print!("{}", poolkeeper_source_kube::admission::yaml(&namespaces));
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { paths } => validate_cmd(&paths),
        Command::Install {
            print_unit,
            print_specs: _,
            unit,
        } => {
            if print_unit {
                print!("{}", crate::install::unit(&unit));
            } else {
                print!("{}", crate::install::specs());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            dir,
            source,
            kube,
            pods,
            limits,
            runtime,
            resync,
            docker,
            api,
        } => {
            let rt = controller_runtime()?;
            let limits = limits.limits();
            let runtimes = Runtimes { docker, pods };
            match (source, dir) {
                (SourceKind::Dir, Some(dir)) => {
                    rt.block_on(run_cmd(dir, runtime, resync, runtimes, api, limits))?
                }
                (SourceKind::Dir, None) => bail!("run needs --dir (or --source kube)"),
                (SourceKind::Kube, Some(_)) => {
                    bail!("--dir names a watched folder: not with --source kube")
                }
                (SourceKind::Kube, None) => {
                    rt.block_on(run_kube(kube, runtime, resync, runtimes, api, limits))?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rbac {
            service_account,
            controller_namespace,
            namespaces,
            allow_registration,
            flows,
            pod_namespace,
        } => {
            print!(
                "{}",
                poolkeeper_source_kube::rbac::yaml(&poolkeeper_source_kube::rbac::RbacTarget {
                    service_account,
                    namespace: controller_namespace,
                    watched: namespaces,
                    registration: allow_registration,
                    flows,
                    pods: pod_namespace,
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind,
            name,
            dir,
            server,
            token,
            output,
        } => {
            let snap = match (dir, server) {
                (Some(dir), _) => {
                    if kind == "nodes" || kind == "node" {
                        return nodes_cmd(&load_snapshot(&dir)?.0, output);
                    }
                    load_snapshot(&dir)?.0
                }
                (None, Some(server)) => {
                    let Some(token) = token else {
                        bail!("--server needs --token (or POOLKEEPER_TOKEN)");
                    };
                    let args = crate::client::ServerArgs { server, token };
                    let segment = api_segment(parse_kind(&kind)?);
                    crate::client::snapshot_of(&args, segment)?
                }
                (None, None) => bail!("get needs --dir or --server"),
            };
            get_cmd(&kind, name.as_deref(), snap, output)
        }
        Command::Claim { action } => claim_cmd(action),
        Command::User { action } => user_cmd(action),
        cmd @ (Command::Scale { .. } | Command::Reinitialise { .. } | Command::Delete { .. }) => {
            admin_cmd(cmd)
        }
        Command::Upload {
            target,
            path,
            server,
        } => {
            let claim = target
                .strip_prefix("claim/")
                .filter(|n| !n.is_empty() && !n.contains('/'))
                .ok_or_else(|| anyhow::anyhow!("{target}: expected claim/NAME"))?;
            let archive = crate::client::tar_of_path(&path)?;
            let answer = crate::client::request_bytes(
                &server.server,
                &server.token,
                "PUT",
                &format!("/api/v1/claims/{claim}/files"),
                "application/x-tar",
                &archive,
            )?;
            let v = crate::client::ok_or_error(answer)?;
            println!("copied {} file(s) into claim {claim}", v["files"]);
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe { kind, name, dir } => describe_cmd(&kind, &name, &dir),
        Command::Bench(args) => {
            let rt = controller_runtime()?;
            rt.block_on(crate::bench::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            target,
            dir,
            pod_namespace,
            namespace,
            follow,
            since,
            tail,
        } => {
            let rt = controller_runtime()?;
            let t = reach_target(&rt, dir, pod_namespace, namespace, &target)?;
            rt.block_on(crate::access::logs(&t, follow, since, tail))
        }
        Command::Exec {
            target,
            dir,
            pod_namespace,
            namespace,
            interactive,
            tty,
            steps,
            command,
        } => {
            let rt = controller_runtime()?;
            let t = reach_target(&rt, dir, pod_namespace, namespace, &target)?;
            match steps {
                Some(file) => rt.block_on(crate::access::run_steps(&t, &file)),
                None => rt.block_on(crate::access::exec(&t, &command, interactive, tty)),
            }
        }
        Command::Stats {
            target,
            dir,
            pod_namespace,
            namespace,
            output,
        } => {
            let rt = controller_runtime()?;
            let t = reach_target(&rt, dir, pod_namespace, namespace, &target)?;
            let s = rt.block_on(crate::access::stats(&t))?;
            crate::access::print_stats(&s, output == Some(Output::Json))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Volume { action } => volume_cmd(action),
    }
}

/// The container a target names, from the running controller's status; or the pod, from the
/// cluster's objects (`--pod-namespace`).
fn reach_target(
    rt: &tokio::runtime::Runtime,
    dir: Option<PathBuf>,
    pod_namespace: Option<String>,
    namespace: Option<String>,
    target: &str,
) -> anyhow::Result<crate::access::Target> {
    match (dir, pod_namespace) {
        (_, Some(pods)) => rt.block_on(crate::access_pods::resolve(
            &pods,
            namespace.as_deref().unwrap_or(&pods),
            target,
        )),
        (Some(dir), None) => {
            let (snap, _) = load_snapshot(&dir)?;
            crate::access::resolve(&snap, target)
        }
        (None, None) => anyhow::bail!("{target}: give --dir DIR or --pod-namespace NS"),
    }
}

fn deployment_arg(s: &str) -> anyhow::Result<&str> {
    s.strip_prefix("deployment/")
        .or_else(|| s.strip_prefix("pkd/"))
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| anyhow::anyhow!("{s}: expected deployment/NAME"))
}

fn volume_cmd(action: VolumeAction) -> anyhow::Result<ExitCode> {
    let rt = controller_runtime()?;
    match action {
        VolumeAction::Backup {
            deployment,
            volume,
            dir,
            to,
        } => {
            let dep = deployment_arg(&deployment)?;
            let (snap, _) = load_snapshot(&dir)?;
            let path = rt.block_on(crate::access::backup_volume(&snap, &dir, dep, &volume, to))?;
            println!("{}", path.display());
        }
        VolumeAction::Restore {
            deployment,
            volume,
            file,
            dir,
        } => {
            let dep = deployment_arg(&deployment)?;
            let (snap, _) = load_snapshot(&dir)?;
            rt.block_on(crate::access::restore_volume(&snap, dep, &volume, &file))?;
            println!("restored {} into {dep}/{volume}", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn validate_cmd(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let (objects, problems) = validate_paths(paths);
    let mut out = std::io::stdout().lock();
    for p in &problems {
        writeln!(out, "{p}")?;
    }
    if problems.is_empty() {
        eprintln!("{} object(s) valid", objects.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} problem(s)", problems.len());
        Ok(ExitCode::from(1))
    }
}

/// The controller's last snapshot, or one built from the files when none is running.
fn load_snapshot(dir: &Path) -> anyhow::Result<(Snapshot, bool)> {
    let path = status_file(dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let snap: Snapshot = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            let live = Path::new(&format!("/proc/{}", snap.controller.pid)).exists();
            if !live {
                eprintln!(
                    "warning: the controller that wrote {} (pid {}) is not running; status is as of {}",
                    path.display(),
                    snap.controller.pid,
                    snap.controller.updated_at
                );
            }
            Ok((snap, live))
        }
        Err(_) => {
            eprintln!(
                "warning: no status in {} (is `poolkeeper run --dir {}` running?); showing specs only",
                path.display(),
                dir.display()
            );
            let (objects, problems) = validate_paths(&[dir.to_path_buf()]);
            let objects = objects
                .into_iter()
                .map(|o| ObjectView {
                    kind: o.spec.kind(),
                    name: o.name.clone(),
                    origin: o.origin.clone(),
                    spec: spec_value(&o),
                    status: serde_json::Value::Null,
                    events: Vec::new(),
                })
                .collect();
            Ok((
                Snapshot {
                    controller: poolkeeper_engine::status::ControllerInfo {
                        pid: 0,
                        runtime: String::new(),
                        started_at: String::new(),
                        updated_at: String::new(),
                        state_dir: state_dir(dir),
                        api: None,
                        store_error: None,
                    },
                    objects,
                    diagnostics: problems,
                    instances: Vec::new(),
                    nodes: Vec::new(),
                    metrics: Default::default(),
                },
                false,
            ))
        }
    }
}

fn spec_value(o: &Object) -> serde_json::Value {
    use poolkeeper_kinds::Spec;
    match &o.spec {
        Spec::Pool(s) => serde_json::to_value(s),
        Spec::Claim(s) => serde_json::to_value(s),
        Spec::User(s) => serde_json::to_value(s),
        Spec::Deployment(s) => serde_json::to_value(s),
    }
    .unwrap_or(serde_json::Value::Null)
}

fn print_released(v: &serde_json::Value) {
    let names: Vec<&str> = v["released"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
        .unwrap_or_default();
    if names.is_empty() {
        println!("no claims to release");
    }
    for n in names {
        println!("released {n}");
    }
}

/// The one kind an admin command acts on.
fn expect_kind(kind: &str, want: Kind, command: &str) -> anyhow::Result<()> {
    if parse_kind(kind)? != want {
        bail!(
            "{command} acts on {}s only",
            want.to_string().to_lowercase()
        );
    }
    Ok(())
}

fn admin_cmd(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Scale {
            kind,
            name,
            warm,
            server,
        } => {
            expect_kind(&kind, Kind::Pool, "scale")?;
            let body = serde_json::json!({ "warm": warm });
            let v = crate::client::call(
                &server,
                "POST",
                &format!("/api/v1/pools/{name}/scale"),
                Some(&body),
            )?;
            println!(
                "pool {name}: warm {} -> {warm} (in {})",
                v["was"],
                v["file"].as_str().unwrap_or("?")
            );
        }
        Command::Reinitialise { kind, name, server } => {
            expect_kind(&kind, Kind::Pool, "reinitialise")?;
            let v = crate::client::call(
                &server,
                "POST",
                &format!("/api/v1/pools/{name}/reinitialise"),
                None,
            )?;
            println!(
                "pool {name}: {} warm instances being replaced",
                v["replaced"]
            );
        }
        Command::Delete { kind, name, server } => {
            expect_kind(&kind, Kind::User, "delete")?;
            let v = crate::client::call(&server, "DELETE", &format!("/api/v1/users/{name}"), None)?;
            print_released(&v);
            println!(
                "deleted user {name} (from {})",
                v["file"].as_str().unwrap_or("?")
            );
        }
        other => bail!("not an admin command: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_kind(kind: &str) -> anyhow::Result<Kind> {
    Kind::parse(kind)
        .with_context(|| format!("unknown kind {kind:?} (pools, claims, users or deployments)"))
}

/// An object in Kubernetes' shape, for `-o yaml|json`.
fn k8s_shape(v: &ObjectView) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": poolkeeper_kinds::API_VERSION,
        "kind": v.kind.to_string(),
        "metadata": { "name": v.name, "annotations": { "poolkeeper.dev/source": v.origin.to_string() } },
        "spec": v.spec,
        "status": v.status,
    })
}

/// `get nodes`: the runtime's nodes and their health.
fn nodes_cmd(snap: &Snapshot, output: Option<Output>) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match output {
        Some(Output::Json) => writeln!(out, "{}", serde_json::to_string_pretty(&snap.nodes)?)?,
        Some(Output::Yaml) => write!(out, "{}", serde_saphyr::to_string(&snap.nodes)?)?,
        _ => {
            let mut rows = vec![vec![
                "NAME".to_owned(),
                "STATE".to_owned(),
                "INSTANCES".to_owned(),
                "ADDRESS".to_owned(),
                "URL".to_owned(),
                "MESSAGE".to_owned(),
            ]];
            for n in &snap.nodes {
                rows.push(vec![
                    n.name.clone(),
                    n.state.clone(),
                    n.instances.to_string(),
                    n.address.clone(),
                    n.url.clone(),
                    n.message.clone().unwrap_or_else(|| "-".to_owned()),
                ]);
            }
            write!(out, "{}", crate::table::render(&rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The API's path segment for a kind.
fn api_segment(kind: Kind) -> &'static str {
    match kind {
        Kind::Pool => "pools",
        Kind::Claim => "claims",
        Kind::User => "users",
        Kind::Deployment => "deployments",
    }
}

fn user_cmd(action: UserAction) -> anyhow::Result<ExitCode> {
    match action {
        UserAction::Passwd { name, server } => {
            let password = read_password(&name)?;
            if password.chars().count() < 8 {
                bail!("the password must be at least 8 characters");
            }
            let hash = poolkeeper_http::console::hash_password(&password)
                .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
            let body = serde_json::json!({ "passwordHash": hash });
            let v = crate::client::call(
                &server,
                "PUT",
                &format!("/api/v1/users/{name}/password"),
                Some(&body),
            )?;
            println!(
                "user {name}: password set (in {})",
                v["file"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A new password from standard input: on a terminal asked twice without echo; else its first
/// line.
fn read_password(user: &str) -> anyhow::Result<String> {
    use rustix::termios::{self, LocalModes, OptionalActions};
    let stdin = std::io::stdin();
    let read_line = || -> anyhow::Result<String> {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        Ok(line.trim_end_matches(['\n', '\r']).to_owned())
    };
    if !termios::isatty(&stdin) {
        return read_line();
    }
    let saved = termios::tcgetattr(&stdin).context("reading the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    termios::tcsetattr(&stdin, OptionalActions::Now, &quiet).context("turning echo off")?;
    let answers = (|| -> anyhow::Result<(String, String)> {
        eprint!("New password for {user}: ");
        let a = read_line()?;
        eprint!("\nThe same again: ");
        let b = read_line()?;
        eprintln!();
        Ok((a, b))
    })();
    let _ = termios::tcsetattr(&stdin, OptionalActions::Now, &saved);
    let (a, b) = answers?;
    if a != b {
        bail!("the two passwords differ");
    }
    Ok(a)
}

fn claim_cmd(action: ClaimAction) -> anyhow::Result<ExitCode> {
    match action {
        ClaimAction::Create {
            pool,
            name,
            user,
            ttl,
            files,
            wait,
            server,
        } => {
            let mut contents = serde_json::Map::new();
            for f in &files {
                let (path, local) = f
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--file {f}: expected PATH=LOCAL_FILE"))?;
                let text = std::fs::read_to_string(local)
                    .with_context(|| format!("--file {f}: reading {local}"))?;
                contents.insert(path.to_owned(), serde_json::Value::String(text));
            }
            let mut body = serde_json::json!({"pool": pool, "files": contents});
            for (k, v) in [("name", name), ("user", user), ("ttl", ttl)] {
                if let Some(v) = v {
                    body[k] = serde_json::Value::String(v);
                }
            }
            let v = crate::client::call(&server, "POST", "/api/v1/claims", Some(&body))?;
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            println!("{name}");
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let start = std::time::Instant::now();
            let path = format!("/api/v1/claims/{name}");
            loop {
                // Just written, and not yet picked up by the watcher: give it a moment.
                let (code, _) =
                    crate::client::request(&server.server, &server.token, "GET", &path, None)?;
                if code == 404 && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                let c = crate::client::call(&server, "GET", &path, None)?;
                match c["status"]["phase"].as_str() {
                    Some("Bound") => {
                        let e = &c["status"]["endpoint"];
                        println!("{} {}", e["host"].as_str().unwrap_or(""), e["ports"]);
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some("Failed") => {
                        eprintln!("error: claim {name} failed: {}", c["status"]["conditions"]);
                        return Ok(ExitCode::from(1));
                    }
                    _ => {}
                }
                if start.elapsed() > Duration::from_secs(300) {
                    bail!("claim {name} was not bound within 5 minutes");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        ClaimAction::Release {
            name: Some(name),
            server,
            ..
        } => {
            crate::client::call(&server, "DELETE", &format!("/api/v1/claims/{name}"), None)?;
            println!("released {name}");
            Ok(ExitCode::SUCCESS)
        }
        ClaimAction::Release {
            name: None,
            user,
            server,
        } => {
            let user = user.unwrap_or_default();
            let v = crate::client::call(
                &server,
                "POST",
                &format!("/api/v1/users/{user}/release"),
                None,
            )?;
            print_released(&v);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn get_cmd(
    kind: &str,
    name: Option<&str>,
    snap: Snapshot,
    output: Option<Output>,
) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let items: Vec<&ObjectView> = snap
        .objects
        .iter()
        .filter(|o| o.kind == kind && name.is_none_or(|n| n == o.name))
        .collect();
    for d in &snap.diagnostics {
        eprintln!("problem: {d}");
    }
    if let Some(n) = name
        && items.is_empty()
    {
        eprintln!("error: {kind} {n:?} not found");
        return Ok(ExitCode::from(1));
    }
    let mut out = std::io::stdout().lock();
    match output {
        Some(Output::Json) | Some(Output::Yaml) => {
            let value = if name.is_some() && items.len() == 1 {
                k8s_shape(items[0])
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items.iter().map(|v| k8s_shape(v)).collect::<Vec<_>>()})
            };
            if output == Some(Output::Json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                write!(out, "{}", serde_saphyr::to_string(&value)?)?;
            }
        }
        _ => {
            let wide = output == Some(Output::Wide);
            let rows = crate::table::rows(kind, &items, wide);
            write!(out, "{}", crate::table::render(&rows))?;
            if items.is_empty() {
                eprintln!("No {} found.", kind.plural());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_cmd(kind: &str, name: &str, dir: &Path) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let (snap, _) = load_snapshot(dir)?;
    let Some(v) = snap
        .objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
    else {
        eprintln!("error: {kind} {name:?} not found");
        return Ok(ExitCode::from(1));
    };
    let problems: Vec<&String> = snap
        .diagnostics
        .iter()
        .filter(|d| d.contains(&format!("{kind}/{name}:")))
        .collect();
    print!("{}", crate::table::describe(v, &problems, &snap));
    Ok(ExitCode::SUCCESS)
}
