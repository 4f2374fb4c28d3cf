//! `poolkeeper run`: the watched folder, the engine, a runtime and the HTTP API wired together
//! until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::{info, warn};

use poolkeeper_engine::EngineConfig;
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_runtime_docker::DockerRuntime;
use poolkeeper_source_dir::declare::{self, DirDeclare};
use poolkeeper_source_dir::files::DirResolve;
use poolkeeper_source_dir::layout::{self, state_dir};
use poolkeeper_source_dir::{status, watch};

use crate::args::*;

pub(crate) async fn run_cmd(
    dir: PathBuf,
    runtime: RuntimeKind,
    resync: Duration,
    docker: DockerArgs,
    api: ApiArgs,
) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    match runtime {
        RuntimeKind::Memory => {
            let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
            run_with(rt, dir, resync, api).await
        }
        RuntimeKind::Docker => {
            let config = docker.docker_config(&state_dir(&dir))?;
            let rt = Arc::new(DockerRuntime::connect(config).await?);
            run_with(rt, dir, resync, api).await
        }
    }
}

async fn run_with<R: poolkeeper_runtime::Runtime>(
    rt: Arc<R>,
    dir: PathBuf,
    resync: Duration,
    api: ApiArgs,
) -> anyhow::Result<()> {
    let sdir = state_dir(&dir);
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
    // Bound before anything starts, so that a taken address is an error at once.
    let listener = match api.listen.as_str() {
        "off" => None,
        addr => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr} (--listen; `off` serves no API)"))?,
        ),
    };
    let api_addr = listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    let mut config = EngineConfig::new(layout::store_dir(&dir));
    config.resync_every = resync;
    config.resolve = Arc::new(DirResolve);
    let (handle, task) = poolkeeper_engine::start(rt, config)?;
    let prepared = watch::Prepared::default();
    let watch = watch::run(dir.clone(), handle.clone(), resync, prepared.clone()).await?;
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
            .context("starting the HTTP API")?;
            info!(address = ?api_addr, "HTTP API listening");
            Some(poolkeeper_http::spawn(l, state).context("starting the HTTP API")?)
        }
        None => None,
    };
    // SIGTERM (what service managers and `docker stop` send) stops as cleanly as Ctrl-C.
    // Registered before the status file first names this process.
    #[cfg(unix)]
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(not(unix))]
    let mut sigterm = ();
    let writer = status::spawn_writer(handle.clone(), &dir, api_addr);
    info!(dir = %dir.display(), "poolkeeper running; Ctrl-C to stop");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("stopping"),
        _ = terminated(&mut sigterm) => info!("stopping (SIGTERM)"),
        r = task => { writer.abort(); watch.abort(); r?; bail!("the engine stopped"); }
    }
    if let Some(s) = server {
        s.stop();
    }
    handle.shutdown().await;
    writer.abort();
    watch.abort();
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
