//! A controller in Kubernetes mode, assembled: it waits for the Lease (unless leader election is
//! off), then runs the engine on a runtime with the Kubernetes source and the HTTP API, until it
//! is stopped or loses the Lease. `poolkeeper run --source kube` runs one; the end-to-end tests
//! run several in one process.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tracing::info;

use poolkeeper_engine::source::Health;
use poolkeeper_engine::{EngineConfig, EngineHandle};
use poolkeeper_http::WebhookConfig;
use poolkeeper_runtime::Runtime;
use poolkeeper_source_kube::declare::KubeDeclare;
use poolkeeper_source_kube::lease::{self, LeaseConfig};
use poolkeeper_source_kube::writes::{Counters, Writer};
use poolkeeper_source_kube::{KubeResolve, Shared, source};

/// What a controller in Kubernetes mode is given.
pub struct KubeOptions {
    pub client: poolkeeper_source_kube::kube::Client,
    /// The API server, for messages.
    pub server: String,
    /// The namespaces watched; empty: all.
    pub namespaces: Vec<String>,
    /// Where the engine's store lives.
    pub state_dir: PathBuf,
    /// None: no leader election (a single replica).
    pub lease: Option<LeaseConfig>,
    /// The controller's own namespace (records; API claims of undeclared users).
    pub home: String,
    pub identity: String,
    pub resync: Duration,
    /// The HTTP API's listener (bound already), admin token and webhooks.
    pub listener: Option<TcpListener>,
    pub admin_token: Option<String>,
    pub webhooks: Option<WebhookConfig>,
    /// The web console's settings.
    pub console: poolkeeper_http::console::ConsoleConfig,
    /// The bounds on the API's connections and requests.
    pub limits: poolkeeper_engine::limits::Limits,
}

/// Where a controller is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the Lease.
    Standby,
    /// Acting.
    Leading,
    /// Stopped: why, when it was not asked to.
    Stopped(Option<String>),
}

/// A controller running in tasks of its own.
pub struct KubeController {
    pub phase: watch::Receiver<Phase>,
    /// The engine's handle, once leading.
    pub engine: watch::Receiver<Option<EngineHandle>>,
    /// The writes it made.
    pub counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Every task it runs, aborted by [`KubeController::kill`].
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl KubeController {
    /// Starts a controller on `rt`.
    pub fn start<R: Runtime>(rt: Arc<R>, opts: KubeOptions) -> KubeController {
        let (phase_tx, phase) = watch::channel(Phase::Standby);
        let (engine_tx, engine) = watch::channel(None);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let writer = Writer::new(opts.client.clone(), Some(opts.identity.clone()));
        let counters = writer.counters.clone();
        let tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let t = tasks.clone();
        let task = tokio::spawn(async move {
            let r = run(rt, opts, writer, stopped, &phase_tx, &engine_tx, t).await;
            let _ = phase_tx.send(Phase::Stopped(r.as_ref().err().map(|e| format!("{e:#}"))));
            r
        });
        tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task.abort_handle());
        KubeController {
            phase,
            engine,
            counters,
            stop: Some(stop),
            task,
            tasks,
        }
    }

    /// Waits until it leads (or stops).
    pub async fn leading(&mut self) -> Phase {
        let _ = self
            .phase
            .wait_for(|p| matches!(p, Phase::Leading | Phase::Stopped(_)))
            .await;
        self.phase.borrow().clone()
    }

    /// Stops it gracefully (the Lease is given up) and returns how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.context("the controller's task")?
    }

    /// Waits until it ends by itself (a lost Lease, a stopped engine).
    pub async fn finished(self) -> anyhow::Result<()> {
        self.task.await.context("the controller's task")?
    }

    /// Stops it as a crash would: every task aborted at once, nothing given up or flushed.
    pub fn kill(self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}

async fn run<R: Runtime>(
    rt: Arc<R>,
    opts: KubeOptions,
    writer: Writer,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    phase: &watch::Sender<Phase>,
    engine: &watch::Sender<Option<EngineHandle>>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
) -> anyhow::Result<()> {
    let track = |h: tokio::task::AbortHandle| {
        tasks.lock().unwrap_or_else(|e| e.into_inner()).push(h);
    };
    let mut leadership = match &opts.lease {
        None => None,
        Some(l) => tokio::select! {
            l = lease::acquire(opts.client.clone(), l.clone()) => Some(l),
            _ = &mut stopped => return Ok(()),
        },
    };
    if let Some(l) = &leadership {
        track(l.abort_handle());
    }
    let _ = phase.send(Phase::Leading);
    let shared = Shared {
        namespaces: opts.namespaces.clone(),
        server: opts.server.clone(),
        ..Shared::default()
    };
    let mut config = EngineConfig::new(opts.state_dir.join("state"));
    config.resync_every = opts.resync;
    config.resolve = Arc::new(KubeResolve(shared.clone()));
    let (handle, task) = poolkeeper_engine::start(rt, config)?;
    track(task.abort_handle());
    let health = Health::default();
    let watch = source::run(
        opts.client.clone(),
        handle.clone(),
        writer.clone(),
        shared.clone(),
        health.clone(),
        source::Options {
            namespaces: opts.namespaces.clone(),
            resync: opts.resync,
        },
    )
    .await?;
    track(watch.abort_handle());
    crate::run::wait_started(&handle).await;
    let server = match opts.listener {
        Some(l) => {
            let addr = l.local_addr().ok();
            let declare = KubeDeclare::new(
                handle.clone(),
                writer,
                shared,
                opts.namespaces
                    .first()
                    .cloned()
                    .unwrap_or_else(|| opts.home.clone()),
                opts.home.clone(),
            )
            .await
            .context("reading the controller's records (ConfigMaps)")?;
            let state = poolkeeper_http::ApiState::new(
                handle.clone(),
                Arc::new(declare),
                opts.admin_token.as_deref(),
                opts.webhooks,
            )
            .context("starting the HTTP API")?
            .with_health(health)
            .with_limits(opts.limits.clone(), Default::default())
            .with_console(opts.console.clone());
            info!(address = ?addr, "HTTP API listening");
            Some(poolkeeper_http::spawn(l, state).context("starting the HTTP API")?)
        }
        None => None,
    };
    let _ = engine.send(Some(handle.clone()));
    info!(namespaces = ?opts.namespaces, "poolkeeper running on Kubernetes");
    let lost = async {
        match leadership.as_mut() {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    let mut task = task;
    let result = tokio::select! {
        _ = &mut stopped => Ok(()),
        _ = lost => Err(anyhow::anyhow!("lost the Lease: stopped acting")),
        r = &mut task => { r?; Err(anyhow::anyhow!("the engine stopped")) }
    };
    // Stop acting first: no more writes, no more runtime actions.
    watch.abort();
    if let Some(s) = server {
        s.stop();
    }
    handle.shutdown().await;
    if result.is_ok()
        && let (Some(l), Some(config)) = (leadership, &opts.lease)
    {
        l.release(opts.client.clone(), config).await;
    }
    result
}
