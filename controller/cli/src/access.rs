//! Reaching into what runs: `logs`, `exec` (also interactive, through a TTY), `exec --steps`,
//! `stats`, and `volume backup|restore`.
//!
//! A target names what the user declared, `deployment/NAME[/CONTAINER[/REPLICA]]`,
//! `claim/NAME` or `instance/NAME`; the status the controller writes says which container and
//! which Docker node that is. These commands then talk to that node directly: they are a
//! person's tools, and work while the controller is busy or stopped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, ExecConfig, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, ResizeExecOptions, StatsOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use poolkeeper_core::deployment::volume_name;
use poolkeeper_engine::status::{ObjectView, Snapshot};
use poolkeeper_kinds::{ContainerStatus, DeploymentSpec, Kind};

/// A container to reach, and the Docker node that holds it; or a pod, and its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The container's name, or the pod's.
    pub container: String,
    /// The Docker node's URL (empty for a pod).
    pub node_url: String,
    /// The pod's namespace, on the Kubernetes runtime.
    pub pod_namespace: Option<String>,
}

impl Target {
    /// A pod, reached through the API server.
    pub fn pod(namespace: &str, name: &str) -> Target {
        Target {
            container: name.to_owned(),
            node_url: String::new(),
            pod_namespace: Some(namespace.to_owned()),
        }
    }
}

/// Resolves a target against the controller's status.
pub fn resolve(snap: &Snapshot, target: &str) -> anyhow::Result<Target> {
    let container = resolve_instance(&snap.objects, target)?;
    if let Some(ns) = snap.nodes.iter().find_map(|n| n.namespace.as_deref()) {
        if !snap.instances.iter().any(|i| i.name == container) {
            bail!("{target}: pod {container} is not running (not in status)");
        }
        return Ok(Target::pod(ns, &container));
    }
    let node = snap
        .instances
        .iter()
        .find(|i| i.name == container)
        .map(|i| i.node.clone())
        .ok_or_else(|| anyhow!("{target}: instance {container} is not running (not in status)"))?;
    if snap.nodes.is_empty() {
        bail!(
            "{target}: the controller runs on the {} runtime, which has no containers to reach",
            if snap.controller.runtime.is_empty() {
                "unknown"
            } else {
                snap.controller.runtime.as_str()
            }
        );
    }
    let url = node_url(snap, &node)
        .ok_or_else(|| anyhow!("{target}: node {node} of {container} is not in status"))?;
    Ok(Target {
        container,
        node_url: url,
        pod_namespace: None,
    })
}

/// The instance (container) name a target refers to.
pub fn resolve_instance(objects: &[ObjectView], target: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = target.split('/').collect();
    let object = |kind: Kind, name: &str| {
        objects
            .iter()
            .find(|o| o.kind == kind && o.name == name)
            .ok_or_else(|| anyhow!("{target}: no {kind:?} named {name:?} in status"))
    };
    match parts.as_slice() {
        ["instance" | "instances", name] => Ok((*name).to_owned()),
        ["claim" | "claims" | "cl", name] => {
            let o = object(Kind::Claim, name)?;
            match o.status.get("instance").and_then(|v| v.as_str()) {
                Some(i) => Ok(i.to_owned()),
                None => bail!(
                    "{target}: the claim is not bound (phase {})",
                    o.status
                        .get("phase")
                        .and_then(|v| v.as_str())
                        .unwrap_or("unknown")
                ),
            }
        }
        ["deployment" | "deployments" | "pkd", name, rest @ ..] if rest.len() <= 2 => {
            let o = object(Kind::Deployment, name)?;
            let statuses: Vec<ContainerStatus> = o
                .status
                .get("containerStatuses")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .context("reading the deployment's status")?
                .unwrap_or_default();
            let mut names: Vec<&str> = statuses.iter().map(|c| c.name.as_str()).collect();
            names.dedup();
            let container = match rest.first() {
                Some(c) => *c,
                None if names.len() == 1 => names[0],
                None => bail!(
                    "{target}: the deployment has several containers; name one: {}",
                    names
                        .iter()
                        .map(|c| format!("{target}/{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let replica: u32 = match rest.get(1) {
                Some(r) => r
                    .parse()
                    .map_err(|_| anyhow!("{target}: replica {r:?} is not a number"))?,
                None => 0,
            };
            let status = statuses
                .iter()
                .find(|c| c.name == container && c.replica == replica)
                .ok_or_else(|| {
                    anyhow!(
                        "{target}: no container {container:?} replica {replica}; containers: {}",
                        names.join(", ")
                    )
                })?;
            status.instance.clone().ok_or_else(|| {
                anyhow!(
                    "{target}: container {container} has no instance yet ({})",
                    status.state
                )
            })
        }
        _ => bail!(
            "{target}: a target is deployment/NAME[/CONTAINER[/REPLICA]], claim/NAME or instance/NAME"
        ),
    }
}

async fn connect(url: &str) -> anyhow::Result<Docker> {
    let docker = poolkeeper_runtime_docker::connect_url(url)
        .with_context(|| format!("connecting to Docker at {url}"))?;
    docker
        .negotiate_version()
        .await
        .with_context(|| format!("reaching Docker at {url}"))
}

/// Writes a chunk of a container's output to our stdout, or stderr for its stderr.
fn pass_through(o: &LogOutput) -> std::io::Result<()> {
    if matches!(o, LogOutput::StdErr { .. }) {
        let mut err = std::io::stderr();
        err.write_all(o.as_ref())?;
        err.flush()
    } else {
        let mut out = std::io::stdout();
        out.write_all(o.as_ref())?;
        out.flush()
    }
}

// ---- logs ------------------------------------------------------------------------------------

pub async fn logs(
    t: &Target,
    follow: bool,
    since: Option<Duration>,
    tail: Option<usize>,
) -> anyhow::Result<ExitCode> {
    if t.pod_namespace.is_some() {
        return crate::access_pods::logs(t, follow, since, tail).await;
    }
    let docker = connect(&t.node_url).await?;
    let since = since
        .map(|d| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            i32::try_from(now.saturating_sub(d).as_secs()).unwrap_or(0)
        })
        .unwrap_or(0);
    let tail = tail.map_or_else(|| "all".to_owned(), |n| n.to_string());
    let opts = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .follow(follow)
        .since(since)
        .tail(&tail)
        .build();
    let mut stream = docker.logs(&t.container, Some(opts));
    while let Some(chunk) = stream.next().await {
        pass_through(&chunk.with_context(|| format!("logs of {}", t.container))?)?;
    }
    Ok(ExitCode::SUCCESS)
}

// ---- exec ------------------------------------------------------------------------------------

/// Runs `command` in the target and passes its output and exit code through. With `tty` the
/// local terminal is put in raw mode and the remote end gets a TTY of the same size, resized
/// along with the local one; keys such as Ctrl-C go to the remote program.
pub async fn exec(
    t: &Target,
    command: &[String],
    interactive: bool,
    tty: bool,
) -> anyhow::Result<ExitCode> {
    if command.is_empty() {
        bail!("exec needs a command after `--`");
    }
    let local_tty = tty.then(terminal::Raw::enter).transpose()?;
    let r = if t.pod_namespace.is_some() {
        crate::access_pods::exec(t, command, interactive, tty).await
    } else {
        exec_inner(t, command, interactive, tty).await
    };
    drop(local_tty);
    let code = r?;
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(1),
    ))
}

async fn exec_inner(
    t: &Target,
    command: &[String],
    interactive: bool,
    tty: bool,
) -> anyhow::Result<i64> {
    let docker = connect(&t.node_url).await?;
    let env = tty.then(|| {
        vec![format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".to_owned())
        )]
    });
    let exec = docker
        .create_exec(
            &t.container,
            ExecConfig {
                attach_stdin: Some(interactive),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(tty),
                // The terminal's size from the start: a resize sent just after the start can
                // reach the daemon before the exec's TTY exists and be lost (`stty size` then
                // says 0 0), so the size is given at creation too.
                console_size: tty
                    .then(terminal::size)
                    .flatten()
                    .map(|(h, w)| vec![usize::from(h), usize::from(w)]),
                env,
                cmd: Some(command.to_vec()),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("exec in {}", t.container))?;
    let started = docker
        .start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: false,
                tty,
                output_capacity: None,
            }),
        )
        .await
        .with_context(|| format!("starting exec in {}", t.container))?;
    let StartExecResults::Attached { mut output, input } = started else {
        bail!("exec in {} did not attach", t.container);
    };
    if interactive {
        forward_stdin(input);
    }
    if tty {
        let docker = docker.clone();
        let id = exec.id.clone();
        tokio::spawn(async move {
            resize_exec_to_terminal(&docker, &id).await;
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                resize_exec_to_terminal(&docker, &id).await;
            }
        });
    }
    let mut first = tty;
    while let Some(chunk) = output.next().await {
        let Ok(chunk) = chunk else { break };
        if std::mem::take(&mut first) {
            // The exec's TTY exists once it has written: size it again before showing what it
            // wrote (a prompt the user answers), in case the size given at creation was not
            // applied and the resize after the start came too early for the daemon (`stty
            // size` then says 0 0).
            resize_exec_to_terminal(&docker, &exec.id).await;
        }
        pass_through(&chunk)?;
    }
    let info = docker
        .inspect_exec(&exec.id)
        .await
        .with_context(|| format!("reading the exit code in {}", t.container))?;
    Ok(info.exit_code.unwrap_or(-1))
}

pub use poolkeeper_kinds::steps::Steps;

/// Parses a steps file; errors name the file, line and column.
pub fn load_steps(path: &Path) -> anyhow::Result<Steps> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let steps: Steps =
        serde_saphyr::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if steps.steps.is_empty() {
        bail!("{}: steps: at least one step is needed", path.display());
    }
    Ok(steps)
}

/// Runs the steps in order and stops at the first failure, naming the step, what was expected
/// and what came (exit 1).
pub async fn run_steps(t: &Target, path: &Path) -> anyhow::Result<ExitCode> {
    let steps = load_steps(path)?;
    let docker = match t.pod_namespace {
        Some(_) => None,
        None => Some(connect(&t.node_url).await?),
    };
    let total = steps.steps.len();
    for (i, step) in steps.steps.iter().enumerate() {
        let n = i + 1;
        let argv = step.run.argv();
        let (code, output) = match &docker {
            Some(docker) => {
                let out = poolkeeper_runtime_docker::exec_output(docker, &t.container, &argv)
                    .await
                    .with_context(|| format!("exec in {}", t.container))?;
                (out.exit_code, out.output)
            }
            None => crate::access_pods::exec_output(t, &argv).await?,
        };
        let problems = step.problems(code, &output);
        if problems.is_empty() {
            println!("ok   {n}/{total} {}", step.name);
            continue;
        }
        println!("FAIL {n}/{total} {}: {}", step.name, problems.join("; "));
        println!(
            "     command: {}",
            shlex::try_join(step.run.argv().iter().map(String::as_str)).unwrap_or_default()
        );
        println!("     output:");
        for line in output.lines() {
            println!("       {line}");
        }
        eprintln!(
            "error: step {n} ({:?}) of {} failed",
            step.name,
            path.display()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

// ---- stats -----------------------------------------------------------------------------------

/// One sample of a container's CPU and memory use.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    pub name: String,
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
}

pub async fn stats(t: &Target) -> anyhow::Result<Stats> {
    if t.pod_namespace.is_some() {
        return crate::access_pods::stats(t).await;
    }
    let docker = connect(&t.node_url).await?;
    // Not one-shot: the daemon takes two samples a second apart, so CPU use is a rate.
    let opts = StatsOptionsBuilder::default()
        .stream(false)
        .one_shot(false)
        .build();
    let s = docker
        .stats(&t.container, Some(opts))
        .next()
        .await
        .ok_or_else(|| anyhow!("no stats for {}", t.container))?
        .with_context(|| format!("stats of {}", t.container))?;
    let usage = |c: &Option<bollard::models::ContainerCpuStats>| {
        let c = c.as_ref();
        (
            c.and_then(|c| c.cpu_usage.as_ref())
                .and_then(|u| u.total_usage)
                .unwrap_or(0),
            c.and_then(|c| c.system_cpu_usage).unwrap_or(0),
            c.and_then(|c| c.online_cpus).unwrap_or(1),
        )
    };
    let (cpu, system, cpus) = usage(&s.cpu_stats);
    let (pre_cpu, pre_system, _) = usage(&s.precpu_stats);
    let cpu_delta = cpu.saturating_sub(pre_cpu) as f64;
    let system_delta = system.saturating_sub(pre_system) as f64;
    let cpu_percent = if system_delta > 0.0 {
        cpu_delta / system_delta * f64::from(cpus) * 100.0
    } else {
        0.0
    };
    let mem = s.memory_stats.unwrap_or_default();
    // As `docker stats`: page cache that can be reclaimed is not counted.
    let cache = mem
        .stats
        .as_ref()
        .and_then(|m| {
            m.get("inactive_file")
                .or_else(|| m.get("total_inactive_file"))
        })
        .copied()
        .unwrap_or(0);
    Ok(Stats {
        name: t.container.clone(),
        cpu_percent,
        memory_bytes: mem.usage.unwrap_or(0).saturating_sub(cache),
        memory_limit_bytes: mem.limit.unwrap_or(0),
        pids: s.pids_stats.and_then(|p| p.current).unwrap_or(0),
    })
}

pub fn print_stats(s: &Stats, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{:<32} {:>7} {:>24} {:>7} {:>5}",
        "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS"
    );
    let pct = if s.memory_limit_bytes > 0 {
        s.memory_bytes as f64 / s.memory_limit_bytes as f64 * 100.0
    } else {
        0.0
    };
    println!(
        "{:<32} {:>6.2}% {:>24} {:>6.2}% {:>5}",
        s.name,
        s.cpu_percent,
        format!(
            "{:.1}MiB / {:.1}MiB",
            mib(s.memory_bytes),
            mib(s.memory_limit_bytes)
        ),
        pct,
        s.pids
    );
    Ok(())
}

// ---- volumes ---------------------------------------------------------------------------------

/// The Docker volume behind deployment `dep`'s volume `volume`, and an image to mount it with
/// (that of a container which mounts it). Fails, naming what exists, when the deployment does
/// not declare that volume.
fn volume_of(snap: &Snapshot, dep: &str, volume: &str) -> anyhow::Result<(String, String)> {
    let o = snap
        .objects
        .iter()
        .find(|o| o.kind == Kind::Deployment && o.name == dep)
        .ok_or_else(|| anyhow!("no deployment {dep:?} in status"))?;
    let spec: DeploymentSpec =
        serde_json::from_value(o.spec.clone()).context("reading the deployment's spec")?;
    let mut named = Vec::new();
    for c in &spec.containers {
        for source in c.volumes.keys() {
            if poolkeeper_core::deployment::is_host_path(source) {
                continue;
            }
            if source == volume {
                return Ok((volume_name(dep, volume), c.image.clone()));
            }
            named.push(source.clone());
        }
    }
    bail!(
        "deployment {dep} has no named volume {volume:?} (named volumes: {})",
        if named.is_empty() {
            "none".to_owned()
        } else {
            named.join(", ")
        }
    )
}

/// A stopped helper container that mounts `volume` at `/volume`: the archive API reads and
/// writes through it (it never runs).
struct Helper<'a> {
    docker: &'a Docker,
    name: String,
}

impl<'a> Helper<'a> {
    async fn create(docker: &'a Docker, volume: &str, image: &str) -> anyhow::Result<Helper<'a>> {
        let name = format!("poolkeeper-volume-{}-{}", std::process::id(), volume);
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            labels: Some([("poolkeeper.dev/volume-helper".to_owned(), volume.to_owned())].into()),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{volume}:/volume")]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        docker
            .create_container(Some(opts), body)
            .await
            .with_context(|| format!("creating a helper container for volume {volume}"))?;
        Ok(Helper { docker, name })
    }

    async fn remove(self) {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        let _ = self.docker.remove_container(&self.name, Some(opts)).await;
    }
}

/// Writes the volume's content to a tar (entries under `volume/`). Returns the file written.
pub async fn backup_volume(
    snap: &Snapshot,
    dir: &Path,
    dep: &str,
    volume: &str,
    to: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let (docker_volume, image) = volume_of(snap, dep, volume)?;
    let url = deployment_node(snap, dep)?;
    let docker = connect(&url).await?;
    let path = match to {
        Some(p) => p,
        None => {
            let stamp = jiff::Timestamp::now()
                .strftime("%Y%m%dT%H%M%SZ")
                .to_string();
            poolkeeper_source_dir::layout::state_dir(dir)
                .join("backups")
                .join(format!("{docker_volume}-{stamp}.tar"))
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let helper = Helper::create(&docker, &docker_volume, &image).await?;
    let r = async {
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path("/volume")
            .build();
        let mut stream = docker.download_from_container(&helper.name, Some(opts));
        let tmp = path.with_extension("tar.part");
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk.with_context(|| format!("reading volume {docker_volume}"))?)?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        anyhow::Ok(())
    }
    .await;
    helper.remove().await;
    r?;
    Ok(path)
}

/// Writes a backup's files into the volume (files the backup does not hold are kept).
pub async fn restore_volume(
    snap: &Snapshot,
    dep: &str,
    volume: &str,
    file: &Path,
) -> anyhow::Result<()> {
    let (docker_volume, image) = volume_of(snap, dep, volume)?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    check_backup(&bytes).with_context(|| format!("{} is not a volume backup", file.display()))?;
    let url = deployment_node(snap, dep)?;
    let docker = connect(&url).await?;
    let helper = Helper::create(&docker, &docker_volume, &image).await?;
    let opts = UploadToContainerOptionsBuilder::default().path("/").build();
    let r = docker
        .upload_to_container(&helper.name, Some(opts), bollard::body_full(bytes.into()))
        .await
        .with_context(|| format!("writing into volume {docker_volume}"));
    helper.remove().await;
    r
}

/// A backup holds only entries under `volume/`, with no way out of it.
pub fn check_backup(bytes: &[u8]) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries()? {
        let entry = entry?;
        let path = entry.path()?.into_owned();
        let mut parts = path.components();
        let first = parts.next();
        if first != Some(std::path::Component::Normal("volume".as_ref()))
            || !poolkeeper_core::files::is_plain_relative(parts.as_path())
        {
            bail!("entry {} is not under volume/", path.display());
        }
        if let Some(link) = entry.link_name()?
            && (link.is_absolute() || !poolkeeper_core::files::is_plain_relative(&link))
            && entry.header().entry_type().is_symlink()
        {
            bail!(
                "entry {} links out of the volume ({})",
                path.display(),
                link.display()
            );
        }
    }
    Ok(())
}

/// The URL of the Docker node named `node`, from status.
fn node_url(snap: &Snapshot, node: &str) -> Option<String> {
    snap.nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.url.clone())
}

fn deployment_node(snap: &Snapshot, dep: &str) -> anyhow::Result<String> {
    let node = snap
        .instances
        .iter()
        .find(|i| i.deployment.as_deref() == Some(dep))
        .map(|i| i.node.clone());
    match node {
        Some(n) => node_url(snap, &n).ok_or_else(|| anyhow!("node {n} is not in status")),
        None => snap.nodes.first().map(|x| x.url.clone()).ok_or_else(|| {
            anyhow!("no Docker node in status (is the controller running on Docker?)")
        }),
    }
}

/// Sends our standard input to the remote program's as it arrives, and closes the remote end
/// at its end (as `docker exec -i` and `kubectl exec -i` do). A plain thread reads it: a
/// blocked read must not hold the process open at the end.
pub(crate) fn forward_stdin<W>(mut input: W)
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin();
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if input.write_all(&bytes).await.is_err() || input.flush().await.is_err() {
                break;
            }
        }
        let _ = input.shutdown().await;
    });
}

/// (rows, columns) of the local terminal.
pub(crate) fn terminal_size() -> Option<(u16, u16)> {
    terminal::size()
}

// ---- the local terminal ----------------------------------------------------------------------

mod terminal {
    use rustix::termios::{self, OptionalActions, Termios};

    /// The local terminal in raw mode until dropped (restored on every way out).
    pub struct Raw {
        saved: Termios,
    }

    impl Raw {
        pub fn enter() -> anyhow::Result<Raw> {
            let stdin = std::io::stdin();
            if !termios::isatty(&stdin) {
                anyhow::bail!("exec -t needs a terminal on standard input (leave out -t)");
            }
            let saved = termios::tcgetattr(&stdin)?;
            let mut raw = saved.clone();
            raw.make_raw();
            termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
            Ok(Raw { saved })
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
        }
    }

    /// (rows, columns) of the local terminal.
    pub fn size() -> Option<(u16, u16)> {
        let ws = termios::tcgetwinsize(std::io::stdin()).ok()?;
        (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
    }
}

/// Gives an exec's TTY the local terminal's size (best effort: a failed resize leaves the
/// previous size).
async fn resize_exec_to_terminal(docker: &Docker, id: &str) {
    if let Some((h, w)) = terminal::size() {
        let _ = docker
            .resize_exec(
                id,
                ResizeExecOptions {
                    h: i32::from(h),
                    w: i32::from(w),
                },
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(paths: &[&str]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for p in paths {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`; write the name raw, as a hostile archive would.
            let name = p.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, &b"x"[..]).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn snapshot() -> Snapshot {
        let origin = serde_json::json!({"file": "x.yaml", "line": 1, "col": 1});
        let cs = |name: &str, replica: u32, instance: Option<&str>| {
            serde_json::json!({"name": name, "replica": replica, "instance": instance,
                "state": if instance.is_some() { "Running" } else { "WaitingForDependencies" },
                "ready": instance.is_some(), "restarts": 0})
        };
        serde_json::from_value(serde_json::json!({
            "controller": {"pid": 1, "runtime": "docker", "started_at": "", "updated_at": "",
                "state_dir": "/tmp"},
            "objects": [
                {"kind": "Claim", "name": "alice-web", "origin": origin, "spec": {},
                 "status": {"phase": "Bound", "instance": "nginx-abc"}},
                {"kind": "Claim", "name": "bob-web", "origin": origin, "spec": {},
                 "status": {"phase": "Pending"}},
                {"kind": "Deployment", "name": "stack", "origin": origin, "spec": {},
                 "status": {"containers": 4, "ready": 3, "containerStatuses": [
                     cs("db", 0, Some("stack-db")), cs("web", 0, Some("stack-web-0")),
                     cs("web", 1, Some("stack-web-1")), cs("worker", 0, None)]}},
                {"kind": "Deployment", "name": "solo", "origin": origin, "spec": {},
                 "status": {"containers": 1, "ready": 1,
                     "containerStatuses": [cs("app", 0, Some("solo-app"))]}}
            ],
            "diagnostics": [],
            "instances": [
                {"name": "nginx-abc", "phase": "Ready", "ports": [], "node": "local"},
                {"name": "stack-db", "phase": "Ready", "ports": [], "node": "local"},
                {"name": "stack-web-1", "phase": "Ready", "ports": [], "node": "b"},
                {"name": "solo-app", "phase": "Ready", "ports": [], "node": "local"}
            ],
            "nodes": [
                {"name": "local", "url": "unix:///var/run/docker.sock", "address": "127.0.0.1",
                 "state": "Ready", "instances": 3},
                {"name": "b", "url": "tcp://10.0.0.2:2375", "address": "10.0.0.2",
                 "state": "Ready", "instances": 1}
            ]
        }))
        .expect("snapshot")
    }

    #[test]
    fn targets_resolve_to_the_container_and_its_node() {
        let s = snapshot();
        let r = |t: &str| resolve(&s, t).map_err(|e| e.to_string());
        let local = "unix:///var/run/docker.sock".to_owned();
        assert_eq!(
            r("claim/alice-web"),
            Ok(Target {
                container: "nginx-abc".into(),
                node_url: local.clone(),
                pod_namespace: None,
            })
        );
        assert_eq!(
            r("deployment/stack/db").map(|t| t.container),
            Ok("stack-db".into())
        );
        assert_eq!(
            r("deployment/solo").map(|t| t.container),
            Ok("solo-app".into())
        );
        assert_eq!(r("instance/solo-app").map(|t| t.node_url), Ok(local));
        // A replica, on another node.
        assert_eq!(
            r("deployment/stack/web/1"),
            Ok(Target {
                container: "stack-web-1".into(),
                node_url: "tcp://10.0.0.2:2375".into(),
                pod_namespace: None,
            })
        );
    }

    #[test]
    fn targets_that_cannot_be_reached_say_why() {
        let s = snapshot();
        let e = |t: &str| resolve(&s, t).expect_err(t).to_string();
        assert!(e("claim/bob-web").contains("not bound (phase Pending)"));
        assert!(e("claim/nobody").contains("no Claim named \"nobody\""));
        let several = e("deployment/stack");
        assert!(
            several.contains("deployment/stack/db") && several.contains("deployment/stack/web")
        );
        assert!(e("deployment/stack/worker").contains("no instance yet (WaitingForDependencies)"));
        assert!(e("deployment/stack/cache").contains("no container \"cache\""));
        assert!(e("deployment/stack/web/x").contains("not a number"));
        // In status as a container, but not running (no instance record).
        assert!(e("deployment/stack/web").contains("not running"));
        assert!(e("pod/x").contains("a target is"));
    }

    #[test]
    fn a_backup_must_stay_under_volume() {
        assert!(check_backup(&tar_with(&["volume/a.txt", "volume/d/b.txt"])).is_ok());
        assert!(check_backup(&tar_with(&["etc/passwd"])).is_err());
        assert!(check_backup(&tar_with(&["volume/../etc/passwd"])).is_err());
    }
}
