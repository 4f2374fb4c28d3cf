//! `poolkeeper run`: a source (a watched folder, or a Kubernetes API server), the engine, a
//! runtime and the HTTP API wired together until Ctrl-C or SIGTERM (or, in Kubernetes mode, the
//! loss of the Lease).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::{info, warn};

use poolkeeper_engine::EngineConfig;
use poolkeeper_engine::limits::{Limits, Refusals};
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_runtime_docker::DockerRuntime;
use poolkeeper_runtime_kube::{KubeRuntime, KubeRuntimeConfig};
use poolkeeper_source_dir::declare::{self, DirDeclare};
use poolkeeper_source_dir::files::DirResolve;
use poolkeeper_source_dir::layout::{self, state_dir};
use poolkeeper_source_dir::loader::SpecLimit;
use poolkeeper_source_dir::{status, watch};

use crate::args::*;
use crate::notify::{self, Notifier};

/// The runtimes' flags: Docker's and the Kubernetes runtime's.
pub(crate) struct Runtimes {
    pub docker: DockerArgs,
    pub pods: PodArgs,
}

/// The Kubernetes runtime on the cluster `conn` reaches (or KUBECONFIG's, without one).
async fn kube_runtime(
    conn: Option<&poolkeeper_source_kube::Connection>,
    runtimes: &Runtimes,
) -> anyhow::Result<KubeRuntime> {
    let owned;
    let conn = match conn {
        Some(c) => c,
        None => {
            owned = poolkeeper_source_kube::connect().await?;
            info!(server = %owned.server, "Kubernetes API server (the pod runtime)");
            &owned
        }
    };
    let controller_id = runtimes
        .docker
        .controller_id
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    if poolkeeper_kinds::units::check_name(&controller_id).is_err() {
        bail!(
            "controller id {controller_id:?} must be a DNS label (lowercase letters, digits, '-')"
        );
    }
    let namespace = runtimes
        .pods
        .pod_namespace
        .clone()
        .unwrap_or_else(|| conn.namespace.clone());
    info!(%namespace, "instances run as pods");
    Ok(KubeRuntime::new(
        conn.client.clone(),
        KubeRuntimeConfig {
            namespace,
            controller_id,
            grace_seconds: runtimes.pods.pod_grace_seconds,
        },
    ))
}

pub(crate) async fn run_cmd(
    dir: PathBuf,
    runtime: RuntimeKind,
    resync: Duration,
    runtimes: Runtimes,
    api: ApiArgs,
    limits: Limits,
) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    match runtime {
        RuntimeKind::Memory => {
            let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
            run_with(rt, dir, resync, api, limits).await
        }
        RuntimeKind::Docker => {
            let config = runtimes.docker.docker_config(&state_dir(&dir))?;
            let rt = Arc::new(DockerRuntime::connect(config).await?);
            run_with(rt, dir, resync, api, limits).await
        }
        RuntimeKind::Kube => {
            let rt = Arc::new(kube_runtime(None, &runtimes).await?);
            run_with(rt, dir, resync, api, limits).await
        }
    }
}

async fn run_with<R: poolkeeper_runtime::Runtime>(
    rt: Arc<R>,
    dir: PathBuf,
    resync: Duration,
    api: ApiArgs,
    limits: Limits,
) -> anyhow::Result<()> {
    let sdir = state_dir(&dir);
    raise_open_files_limit();
    let refusals = Arc::new(Refusals::default());
    std::fs::create_dir_all(&sdir).with_context(|| format!("creating {}", sdir.display()))?;
    let admin_token = api.admin_token()?;
    let webhooks = api.webhooks()?;
    let unfinished = declare::remove_unfinished_claims(&dir).with_context(|| {
        format!(
            "removing unfinished files from {}",
            layout::managed_dir(&dir).display()
        )
    })?;
    for path in unfinished {
        warn!(file = %path.display(), "removed a file a crash left unfinished (its creation was never acknowledged)");
    }
    let (listener, api_addr) = bind(&api)?;
    let mut config = EngineConfig::new(layout::store_dir(&dir));
    config.resync_every = resync;
    config.resolve = Arc::new(DirResolve);
    let (handle, task) = poolkeeper_engine::start(rt, config)?;
    let prepared = watch::Prepared::default();
    let spec_limit = SpecLimit {
        max_bytes: limits.max_spec_file,
        refusals: refusals.clone(),
    };
    let watch = watch::run(
        dir.clone(),
        handle.clone(),
        resync,
        prepared.clone(),
        spec_limit,
    )
    .await?;
    wait_started(&handle).await;
    let server = match listener {
        Some(l) => {
            let declare = DirDeclare::new(handle.clone(), &dir, prepared)
                .with_context(|| format!("opening {}", dir.display()))?;
            let state = poolkeeper_http::ApiState::new(
                handle.clone(),
                Arc::new(declare),
                admin_token.as_deref(),
                webhooks,
            )
            .context("starting the HTTP API")?
            .with_limits(limits, refusals)
            .with_console(api.console()?);
            Some(serve(l, state, &api_addr)?)
        }
        None => None,
    };
    // SIGTERM (what service managers and `docker stop` send) stops as cleanly as Ctrl-C.
    // Registered before the status file first names this process.
    let mut sigterm = sigterm()?;
    let writer = status::spawn_writer(handle.clone(), &dir, api_addr.clone()).await;
    info!(dir = %dir.display(), "poolkeeper running; Ctrl-C to stop");
    // Serving: the folder read, the engine started, the API listening.
    let notifier = Notifier::from_env();
    notifier.notify(&format!(
        "READY=1\nSTATUS=watching {}{}",
        dir.display(),
        api_addr
            .map(|a| format!(", API on {a}"))
            .unwrap_or_default()
    ));
    let watchdog = async {
        match notify::watchdog_from_env() {
            Some(every) if notifier.enabled() => {
                notify::watch_engine(&notifier, every, &handle).await
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("stopping"),
        _ = terminated(&mut sigterm) => info!("stopping (SIGTERM)"),
        _ = watchdog => {}
        r = task => { writer.abort(); watch.abort(); r?; bail!("the engine stopped"); }
    }
    notifier.notify("STOPPING=1");
    if let Some(s) = server {
        s.stop();
    }
    handle.shutdown().await;
    writer.abort();
    watch.abort();
    Ok(())
}

/// The API's listener, bound before anything starts, so that a taken address is an error at
/// once; and its address.
fn bind(api: &ApiArgs) -> anyhow::Result<(Option<std::net::TcpListener>, Option<String>)> {
    let listener = match api.listen.as_str() {
        "off" => None,
        addr => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr} (--listen; `off` serves no API)"))?,
        ),
    };
    let addr = listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    Ok((listener, addr))
}

fn serve(
    listener: std::net::TcpListener,
    state: poolkeeper_http::ApiState,
    addr: &Option<String>,
) -> anyhow::Result<poolkeeper_http::ApiThread> {
    info!(address = ?addr, "HTTP API listening");
    poolkeeper_http::spawn(listener, state).context("starting the HTTP API")
}

#[cfg(unix)]
type Sigterm = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Sigterm = ();

fn sigterm() -> std::io::Result<Sigterm> {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    #[cfg(not(unix))]
    Ok(())
}

#[cfg(unix)]
async fn terminated(s: &mut tokio::signal::unix::Signal) {
    s.recv().await;
}

#[cfg(not(unix))]
async fn terminated(_: &mut ()) {
    std::future::pending::<()>().await
}

/// `run --source kube`: the custom resources of a Kubernetes API server as the source, on
/// `runtime`. With leader election (the default), it waits to lead, acts while it does, and
/// stops (an error: its supervisor restarts it as a standby) when it loses the Lease.
pub(crate) async fn run_kube(
    kube: KubeArgs,
    runtime: RuntimeKind,
    resync: Duration,
    runtimes: Runtimes,
    api: ApiArgs,
    limits: Limits,
) -> anyhow::Result<()> {
    raise_open_files_limit();
    let conn = poolkeeper_source_kube::connect().await?;
    info!(server = %conn.server, "Kubernetes API server");
    let state = kube
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("poolkeeper-state"));
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    match runtime {
        RuntimeKind::Memory => {
            let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
            run_kube_with(rt, conn, kube, &state, resync, api, limits).await
        }
        RuntimeKind::Docker => {
            let config = runtimes.docker.docker_config(&state)?;
            let rt = Arc::new(DockerRuntime::connect(config).await?);
            run_kube_with(rt, conn, kube, &state, resync, api, limits).await
        }
        RuntimeKind::Kube => {
            let rt = Arc::new(kube_runtime(Some(&conn), &runtimes).await?);
            run_kube_with(rt, conn, kube, &state, resync, api, limits).await
        }
    }
}

async fn run_kube_with<R: poolkeeper_runtime::Runtime>(
    rt: Arc<R>,
    conn: poolkeeper_source_kube::Connection,
    kube: KubeArgs,
    state: &std::path::Path,
    resync: Duration,
    api: ApiArgs,
    limits: Limits,
) -> anyhow::Result<()> {
    use crate::kube_mode::{KubeController, KubeOptions};
    let (listener, _) = bind(&api)?;
    let mut sigterm = sigterm()?;
    let home = kube
        .lease_namespace
        .clone()
        .unwrap_or_else(|| conn.namespace.clone());
    let identity = kube.identity.clone().unwrap_or_else(default_identity);
    let lease = (!kube.no_leader_election).then(|| {
        poolkeeper_source_kube::lease::LeaseConfig::new(&kube.lease_name, &home, &identity)
    });
    let controller = KubeController::start(
        rt,
        KubeOptions {
            client: conn.client,
            server: conn.server,
            namespaces: kube.namespaces,
            state_dir: state.to_path_buf(),
            lease,
            home,
            identity,
            resync,
            listener,
            admin_token: api.admin_token()?,
            webhooks: api.webhooks()?,
            console: api.console()?,
            limits,
        },
    );
    let mut phase = controller.phase.clone();
    // Serving: a standby is a healthy service too (it takes over when the leader goes).
    let notifier = Notifier::from_env();
    notifier.notify("READY=1\nSTATUS=Kubernetes mode");
    let watchdog = async {
        match notify::watchdog_from_env() {
            Some(every) if notifier.enabled() => {
                notify::watchdog(&notifier, every, || async { true }).await
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = watchdog => {}
        _ = tokio::signal::ctrl_c() => info!("stopping"),
        _ = terminated(&mut sigterm) => info!("stopping (SIGTERM)"),
        _ = phase.wait_for(|p| matches!(p, crate::kube_mode::Phase::Stopped(_))) => {
            return controller.finished().await;
        }
    }
    notifier.notify("STOPPING=1");
    controller.stop().await
}

/// `$POD_NAME` in a pod; else the host's name and this process's id.
fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "poolkeeper".to_owned());
            format!("{host}-{}", std::process::id())
        })
}

/// Raises this process's soft limit on open files to its hard limit (at most 65536): systemd
/// starts services with 1024, fewer than `--max-connections` and the runtime's own need.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    let want = l.maximum.map_or(65_536, |m| m.min(65_536));
    if l.current.is_some_and(|c| c < want) {
        l.current = Some(want);
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            warn!(error = %e, "cannot raise the open files limit");
        }
    }
}

/// Serve once the engine has started, so that nobody reads a bound claim as Pending while the
/// runtime is listed after a restart; a runtime that does not answer is reported by the API and
/// the status rather than hidden: at most 30 s.
pub(crate) async fn wait_started(handle: &poolkeeper_engine::EngineHandle) {
    if tokio::time::timeout(Duration::from_secs(30), handle.started())
        .await
        .is_err()
    {
        warn!(
            "the engine has not started within 30 s (the runtime is slow to list); serving anyway"
        );
    }
}
