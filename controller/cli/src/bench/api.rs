//! `poolkeeper bench --api`: claims through the HTTP API, as booking systems and scripts make
//! them. One controller (engine, watched folder, API) in this process on the chosen runtime;
//! `--concurrency` clients, each on its own keep-alive connection, POST a claim, wait for the
//! status stream (SSE) to say it is Bound, and release it. Latency is from the POST to the
//! Bound event; throughput is claims bound per second over the run. `created_*` is from the
//! POST to its 201, which is sent once the claim's file is durable (the Bound event may come
//! first: the engine admits and binds the claim while its file is written). `store_commits`
//! and `store_commits_over_50ms` count the state store's flushes during the run (every Bound
//! waits for one), so that a tail caused by the disk is told apart from one caused by the
//! controller; `store_deferred_commits` the batches written without a flush of their own
//! (releases, instances gone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use poolkeeper_http::client::{Client, request};

use super::{BenchArgs, Figure, pct};
use crate::args::RuntimeKind;

const TOKEN: &str = "bench-api-token-0123456789";

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>;

/// One client's requests: keep-alive, through the project's HTTP client.
struct Conn {
    client: Client,
    base: String,
}

impl Conn {
    fn new(client: &Client, addr: &str) -> Conn {
        Conn {
            client: client.clone(),
            base: format!("http://{addr}"),
        }
    }

    /// Sends a request and reads the answer's status and body.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        let req = request(
            method,
            &format!("{}{path}", self.base),
            &[
                ("authorization", &format!("Bearer {TOKEN}")),
                ("content-type", "application/json"),
            ],
            body.as_bytes().to_vec(),
        )
        .map_err(|e| anyhow!(e))?;
        let answer = self.client.send(req, Duration::from_secs(60)).await?;
        Ok((
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned(),
        ))
    }
}

/// Follows the status stream; each Bound event wakes the client waiting for that claim.
async fn follow_events(
    client: Client,
    addr: String,
    waiters: Waiters,
    ready: oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let req = request(
        "GET",
        &format!("http://{addr}/api/v1/events"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        Vec::new(),
    )
    .map_err(|e| anyhow!(e))?;
    let mut body = client.open(req).await?.into_body();
    // The answer's headers came: from now on every change is delivered.
    let _ = ready.send(());
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..i + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if v["phase"] == "Bound"
                && let Some(name) = v["claim"].as_str()
                && let Some(tx) = waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name)
            {
                let _ = tx.send(Instant::now());
            }
        }
    }
    Ok(())
}

/// A runtime of its own for the clients. Dropping a runtime inside another one panics, also
/// when a run ends early with an error: this one is shut down in the background instead.
pub(crate) struct Background {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Background {
    pub(crate) fn new(rt: tokio::runtime::Runtime) -> Self {
        let handle = rt.handle().clone();
        Self {
            rt: Some(rt),
            handle,
        }
    }
}

impl std::ops::Deref for Background {
    type Target = tokio::runtime::Handle;
    fn deref(&self) -> &Self::Target {
        &self.handle
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut docker_rt = None;
    let r = measure(args, &mut docker_rt).await;
    // Every container the run made goes, also when it failed.
    // Creations the engine began before it stopped may still land: sweep until the
    // runtime lists nothing twice in a row (at most 60 s).
    if let Some(rt) = docker_rt {
        use poolkeeper_runtime::Runtime;
        let began = Instant::now();
        let mut empty = 0;
        let mut left = Vec::new();
        while empty < 2 && began.elapsed() < Duration::from_secs(60) {
            left = match rt.list().await {
                Ok(l) => l.into_iter().map(|i| i.name).collect(),
                Err(e) => vec![format!("(the daemon did not list: {e})")],
            };
            empty = if left.is_empty() { empty + 1 } else { 0 };
            futures::future::join_all(left.iter().map(|n| rt.remove(n))).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !left.is_empty() {
            // Say so rather than leave them unnoticed (a hung daemon, say).
            let id = rt.controller_id();
            let cleanup = anyhow!(
                "{} containers of this run are left (first: {}); remove them with \
                 docker rm -f $(docker ps -aq --filter label=poolkeeper.dev/controller={id})",
                left.len(),
                left[0]
            );
            return r.and(Err(cleanup));
        }
    }
    r
}

async fn measure(
    args: &BenchArgs,
    docker_rt: &mut Option<Arc<poolkeeper_runtime_docker::DockerRuntime>>,
) -> anyhow::Result<()> {
    let docker = args.runtime == RuntimeKind::Docker;
    let instances = args.instances.unwrap_or(if docker { 50 } else { 1000 });
    let claims = args.claims.unwrap_or(if docker { 500 } else { 20_000 });
    let dir = tempfile::tempdir()?;
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(TOKEN.as_bytes()));
    let template = if docker {
        format!(
            "image: {}\n    ports: [{{name: http, containerPort: {}}}]\n    readiness: {{httpGet: {{path: {:?}, port: http}}}}",
            args.image, args.http_port, args.http_path
        )
    } else {
        "image: bench\n    ports: [{name: http, containerPort: 80}]".to_owned()
    };
    let host_ports = format!(
        "{{start: {}, end: {}}}",
        args.port_base,
        u32::from(args.port_base) + instances * 2 + 10
    );
    std::fs::write(
        dir.path().join("bench.yaml"),
        format!(
            "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: bench}}
spec:
  template:
    {template}
  warm: {instances}
  hostPorts: {host_ports}
  pullPolicy: {pull}
  {reset}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: bench}}
spec: {{quota: {{maxClaims: 1000000}}, tokenSha256: {digest}}}
",
            pull = if docker { "Never" } else { "IfNotPresent" },
            reset = match args.reset {
                super::BenchReset::Recreate => "reset: Recreate".to_owned(),
                super::BenchReset::Restart => "reset: Restart".to_owned(),
                super::BenchReset::Exec => format!(
                    "reset: Exec\n  resetCommand: {}",
                    serde_json::to_string(&args.reset_command)?
                ),
            }
        ),
    )?;
    let sdir = poolkeeper_source_dir::layout::state_dir(dir.path());
    std::fs::create_dir_all(&sdir)?;
    let mut config =
        poolkeeper_engine::EngineConfig::new(poolkeeper_source_dir::layout::store_dir(dir.path()));
    config.resolve = Arc::new(poolkeeper_source_dir::files::DirResolve);
    config.resync_every = Duration::from_secs(30);
    let (handle, _task) = if docker {
        let mut dargs = args.docker.clone();
        dargs
            .controller_id
            .get_or_insert_with(|| format!("bench-api-{}", std::process::id()));
        let dc = dargs.docker_config(&sdir)?;
        let rt = Arc::new(poolkeeper_runtime_docker::DockerRuntime::connect(dc).await?);
        *docker_rt = Some(rt.clone());
        // The pool would wait for it (pullPolicy Never) until the fill gave up: say so at once.
        super::docker::image_present(&rt.first_client()?, &args.image).await?;
        poolkeeper_engine::start(rt, config)?
    } else {
        let rt = Arc::new(poolkeeper_runtime::memory::MemoryRuntime::new(
            Default::default(),
        ));
        poolkeeper_engine::start(rt, config)?
    };
    let prepared = poolkeeper_source_dir::watch::Prepared::default();
    let _watch = poolkeeper_source_dir::watch::run(
        dir.path().to_path_buf(),
        handle.clone(),
        Duration::from_secs(30),
        prepared.clone(),
        Default::default(),
    )
    .await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let declare =
        poolkeeper_source_dir::declare::DirDeclare::new(handle.clone(), dir.path(), prepared)?;
    let state = poolkeeper_http::ApiState::new(handle.clone(), Arc::new(declare), None, None)?;
    // As `poolkeeper run` serves it: on a thread of its own.
    let api = poolkeeper_http::spawn(listener, state)?;
    // The clients are not the controller: they get a thread of their own too.
    let clients = Background::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?,
    );

    let began = Instant::now();
    loop {
        let warm = handle
            .pool_status("bench")
            .await?
            .map(|s| s.warm)
            .unwrap_or(0);
        if warm >= instances {
            break;
        }
        if began.elapsed() > Duration::from_secs(600) {
            bail!("the pool did not fill ({warm}/{instances} warm)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiters: Waiters = Arc::default();
    let (ready_tx, ready_rx) = oneshot::channel();
    let client = Client::http_only();
    clients.spawn(follow_events(
        client.clone(),
        addr.clone(),
        waiters.clone(),
        ready_tx,
    ));
    // The stream's headers come first: from then on every change is delivered.
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .context("the status stream did not open")??;

    let before = handle.snapshot().await?.metrics;
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    let rate = args.rate.filter(|r| *r > 0.0);
    for _ in 0..args.concurrency {
        let (addr, waiters, next) = (addr.clone(), waiters.clone(), next.clone());
        let mut conn = Conn::new(&client, &addr);
        workers.push(clients.spawn(async move {
            let mut latencies = Vec::new();
            let mut created = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= claims {
                    return anyhow::Ok((latencies, created));
                }
                // Open loop: claim i arrives at i / rate (a client late for it sends at once).
                // Latency counts from the arrival, so that a late client is not hidden.
                let arrival = rate.map(|r| started + Duration::from_secs_f64(f64::from(i) / r));
                if let Some(due) = arrival {
                    tokio::time::sleep_until(due.into()).await;
                }
                let name = format!("c{i}");
                let (tx, rx) = oneshot::channel();
                waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), tx);
                let t0 = arrival.unwrap_or_else(Instant::now);
                let body = json!({"name": name, "pool": "bench"}).to_string();
                let (code, answer) = conn.call("POST", "/api/v1/claims", &body).await?;
                if code != 201 {
                    bail!("POST {name}: {code} {answer}");
                }
                created.push(t0.elapsed().as_secs_f64() * 1000.0);
                let bound = tokio::time::timeout(Duration::from_secs(60), rx)
                    .await
                    .map_err(|_| anyhow!("{name} was not bound within 60 s"))??;
                latencies.push(bound.duration_since(t0).as_secs_f64() * 1000.0);
                let (code, answer) = conn
                    .call("DELETE", &format!("/api/v1/claims/{name}"), "")
                    .await?;
                if code != 200 {
                    bail!("DELETE {name}: {code} {answer}");
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut created = Vec::new();
    for w in workers {
        let (l, c) = w.await??;
        latencies.extend(l);
        created.extend(c);
    }
    created.sort_by(f64::total_cmp);
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    // The flush every Bound waits for: when the disk stalls, the tail shows it here first.
    let after = handle.snapshot().await?.metrics;
    let (commits, commits_before) = (&after.store_commit, &before.store_commit);
    let slow = |h: &poolkeeper_engine::metrics::Histogram| h.above(0.05).unwrap_or(0);
    Figure::new(
        "api_claims",
        if docker { "docker" } else { "memory" },
        claims,
    )
    .per_s(f64::from(claims) / elapsed)
    .latencies(&latencies)
    .with("concurrency", args.concurrency)
    .with("warm", instances)
    .with("released_as_they_complete", true)
    .with("reset", format!("{:?}", args.reset))
    .with("offered_rate_per_s", rate)
    .with("created_p50_ms", pct(&created, 0.5))
    .with("created_p99_ms", pct(&created, 0.99))
    .with("store_commits", commits.count - commits_before.count)
    .with(
        "store_commits_over_50ms",
        slow(commits) - slow(commits_before),
    )
    .with(
        "store_deferred_commits",
        after.store_deferred - before.store_deferred,
    )
    .print();
    api.stop();
    drop(clients);
    handle.shutdown().await;
    Ok(())
}
