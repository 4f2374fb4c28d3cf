//! `poolkeeper bench --runtime docker`: claims against a warm pool on a real Docker Engine, and
//! in the same run the baselines a user would otherwise wait for.
//!
//! Figures, one JSON line each, in this order:
//! - `raw_parallel`: `--instances` containers of the image created and started at once through
//!   the Docker API (no poolkeeper), until every start returned (`ms`); then those removed
//!   while as many new ones are created and started (`recycle_ms`: what a refill after release
//!   asks of the daemon).
//! - `cold`: `--cold` times, one after the other, create + start + the first HTTP 200 on the
//!   published port: what a user waits for without a warm pool.
//! - `fill`: poolkeeper bringing the pool from empty to `--instances` warm (created, started and
//!   passing readiness), with its ratio to `raw_parallel`.
//! - `claim` (twice: without files, then with a small file set): `--claims` claims bound in
//!   rounds of at most the pool's size, `--concurrency` outstanding; latency from handing the
//!   claim to the engine to its `Bound` report (binding durable, files in the instance), with
//!   the ratio of the cold baseline's p50 to the bind p50.
//! - `refill`: after each round every claim is deleted; the time until the pool is back to full
//!   warm (creation and readiness of fresh instances; the removal of the used ones is held while
//!   creations are in flight). The bench then waits for those removals before the next round
//!   (`cleanup_after_p50_ms`), so that each refill starts on an idle daemon, as the raw baseline
//!   does.
//!
//! Everything runs under a controller id of its own (`bench-PID`); every container it made is
//! removed at the end, also when a step fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding as DockerPortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use poolkeeper_engine::{EngineConfig, EngineHandle, SourceEvent};
use poolkeeper_kinds::{ClaimPhase, ClaimSpec, Kind, ObjKey, PoolSpec, Spec};
use poolkeeper_runtime::{LABEL_CONTROLLER, Runtime, probe};
use poolkeeper_runtime_docker::DockerRuntime;

use super::{BenchArgs, Figure, obj, pct, user, wait_warm};

/// Marks the baseline's own containers, so that they are removed whatever happens.
const LABEL_BENCH: &str = "poolkeeper.dev/bench";

/// How long any one wait of the benchmark may take.
const LIMIT: Duration = Duration::from_secs(300);

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let n = args.instances.unwrap_or(50);
    let m = args.claims.unwrap_or(200);
    if n == 0 || m == 0 || args.cold == 0 {
        bail!("--instances, --claims and --cold must be at least 1");
    }
    if args.docker.controller_id.is_some() {
        bail!(
            "the benchmark runs under a controller id of its own (bench-PID); drop --controller-id"
        );
    }
    let ports_used = 4 * n + args.cold;
    if u32::from(args.port_base) + ports_used > u32::from(u16::MAX) {
        bail!(
            "--port-base {} leaves no room for {ports_used} host ports",
            args.port_base
        );
    }
    let tmp = tempfile::tempdir().context("temporary state dir")?;
    let mut config = args.docker.docker_config(tmp.path())?;
    let id = format!("bench-{}", std::process::id());
    config.controller_id.clone_from(&id);
    let node = config.nodes[0].clone();
    let rt = Arc::new(DockerRuntime::connect(config).await?);
    let raw = Raw {
        docker: rt.first_client()?,
        image: args.image.clone(),
        http_port: args.http_port,
        http_path: args.http_path.clone(),
        listen: node
            .listen_address
            .clone()
            .unwrap_or_else(|| "0.0.0.0".to_owned()),
        host: rt.endpoint_host(&node.name),
        id: id.clone(),
    };
    image_present(&raw.docker, &args.image).await?;
    let result = measure(args, &rt, &raw, tmp.path(), n, m).await;
    raw.sweep().await;
    result
}

/// An error naming the image and how to build it, unless the daemon has it.
pub(super) async fn image_present(docker: &Docker, image: &str) -> anyhow::Result<()> {
    docker.inspect_image(image).await.map(drop).map_err(|e| {
        anyhow!("image {image}: {e}; build it with e2e/build-workload-image.sh, or pass --image")
    })
}

/// Direct Docker API calls, for the baselines (and the final sweep).
struct Raw {
    docker: Docker,
    image: String,
    http_port: u16,
    http_path: String,
    listen: String,
    host: String,
    id: String,
}

impl Raw {
    /// `docker run -d -p HOST_PORT:HTTP_PORT IMAGE`: create and start.
    async fn create_start(&self, name: &str, host_port: u16) -> anyhow::Result<()> {
        let key = format!("{}/tcp", self.http_port);
        let host_config = HostConfig {
            port_bindings: Some(HashMap::from([(
                key.clone(),
                Some(vec![DockerPortBinding {
                    host_ip: Some(self.listen.clone()),
                    host_port: Some(host_port.to_string()),
                }]),
            )])),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            labels: Some(HashMap::from([(LABEL_BENCH.to_owned(), self.id.clone())])),
            exposed_ports: Some(vec![key]),
            host_config: Some(host_config),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default().name(name).build();
        self.docker
            .create_container(Some(opts), body)
            .await
            .with_context(|| format!("creating {name}"))?;
        self.docker
            .start_container(name, None)
            .await
            .with_context(|| format!("starting {name}"))?;
        Ok(())
    }

    async fn remove(&self, name: &str) {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        let _ = self.docker.remove_container(name, Some(opts)).await;
    }

    /// Polls the published port every 2 ms until the HTTP answer is a 2xx.
    async fn first_http_ok(&self, host_port: u16) -> anyhow::Result<()> {
        let addr = format!("{}:{host_port}", self.host);
        let start = Instant::now();
        while !probe::http_get(&addr, &self.http_path, Duration::from_secs(1)).await {
            if start.elapsed() > LIMIT {
                bail!(
                    "no HTTP answer on {addr}{} within {LIMIT:?}",
                    self.http_path
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Removes every container of this run: the baselines' and the pool's.
    async fn sweep(&self) {
        for label in [
            format!("{LABEL_BENCH}={}", self.id),
            format!("{LABEL_CONTROLLER}={}", self.id),
        ] {
            let filters = HashMap::from([("label", vec![label])]);
            let opts = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            let Ok(list) = self.docker.list_containers(Some(opts)).await else {
                continue;
            };
            let names = list
                .into_iter()
                .filter_map(|c| c.id)
                .collect::<Vec<String>>();
            futures::future::join_all(names.iter().map(|n| self.remove(n))).await;
        }
    }
}

async fn measure(
    args: &BenchArgs,
    rt: &Arc<DockerRuntime>,
    raw: &Raw,
    dir: &std::path::Path,
    n: u32,
    m: u32,
) -> anyhow::Result<()> {
    // Baseline 1: N raw create+start at once; then, as a pool's refill does, N removed while
    // N new ones are created and started. Ports after the pool's range (2N: released instances
    // hold theirs until removed while their replacements start).
    let base = args.port_base;
    let batch = |b: u32| -> Vec<(String, u16)> {
        (0..n)
            .map(|i| {
                let name = format!("{}-raw{b}-{i}", raw.id);
                (name, base + (2 * n + b * n + i) as u16)
            })
            .collect()
    };
    let (first, second) = (batch(0), batch(1));
    let create_all = |list: &[(String, u16)]| {
        let list = list.to_vec();
        async move {
            let started = futures::future::join_all(
                list.iter()
                    .map(|(name, port)| raw.create_start(name, *port)),
            )
            .await;
            let failed: Vec<String> = started
                .into_iter()
                .filter_map(|r| r.err().map(|e| format!("{e:#}")))
                .collect();
            match failed.first() {
                Some(e) => Err(anyhow!(
                    "{} of {n} raw creations failed; first: {e}",
                    failed.len()
                )),
                None => Ok(()),
            }
        }
    };
    let remove_all = |list: &[(String, u16)]| {
        let list = list.to_vec();
        async move {
            futures::future::join_all(list.iter().map(|(name, _)| raw.remove(name))).await;
        }
    };
    let t = Instant::now();
    let created = create_all(&first).await;
    let raw_ms = t.elapsed().as_secs_f64() * 1e3;
    created?;
    let t = Instant::now();
    let (_, created) = tokio::join!(remove_all(&first), create_all(&second));
    let recycle_ms = t.elapsed().as_secs_f64() * 1e3;
    remove_all(&second).await;
    created?;
    Figure::new("raw_parallel", "docker", n)
        .with("ms", raw_ms)
        .with("recycle_ms", recycle_ms)
        .with("image", &raw.image)
        .print();

    // Baseline 2: cold create + start + first HTTP 200, one after the other.
    let mut cold = Vec::new();
    for i in 0..args.cold {
        let name = format!("{}-cold-{i}", raw.id);
        let port = base + (4 * n + i) as u16;
        let t = Instant::now();
        let r = async {
            raw.create_start(&name, port).await?;
            raw.first_http_ok(port).await
        }
        .await;
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        raw.remove(&name).await;
        r?;
    }
    cold.sort_by(f64::total_cmp);
    let cold_p50 = pct(&cold, 0.5);
    Figure::new("cold", "docker", args.cold)
        .latencies(&cold)
        .with("min_ms", pct(&cold, 0.0))
        .with("image", &raw.image)
        .print();

    // poolkeeper: fill, then claims in rounds, then refills.
    let (h, _task) = poolkeeper_engine::start(rt.clone(), EngineConfig::new(dir.join("state")))?;
    let mut changes = h.subscribe()?;
    h.apply(obj("bench-user".into(), user()))?;
    h.send(SourceEvent::Synced)?;
    let t = Instant::now();
    h.apply(obj("bench".into(), pool_spec(args, n)?))?;
    wait_warm(&h, "bench", n, LIMIT).await?;
    let fill_ms = t.elapsed().as_secs_f64() * 1e3;
    Figure::new("fill", "docker", n)
        .with("ms", fill_ms)
        .with("vs_raw_parallel", fill_ms / raw_ms)
        .with("target_vs_raw_max", 1.3)
        .print();

    let small_files: BTreeMap<String, String> = BTreeMap::from([
        ("index.html".to_owned(), "<h1>bench</h1>\n".repeat(64)),
        ("app/main.py".to_owned(), "print('hello')\n".repeat(32)),
        ("app/data.json".to_owned(), "{\"k\": 1}\n".repeat(32)),
    ]);
    let mut refills = Vec::new();
    let mut cleanups = Vec::new();
    for (variant, files, target) in [
        ("none", BTreeMap::new(), 20.0),
        ("small", small_files.clone(), 50.0),
    ] {
        let mut latencies = Vec::with_capacity(m as usize);
        let mut bound_s = 0.0;
        let mut done = 0;
        let mut round = 0;
        while done < m {
            let k = (m - done).min(n);
            let names: Vec<String> = (0..k).map(|i| format!("{variant}-{round}-{i}")).collect();
            let t = Instant::now();
            bind_all(
                &h,
                &mut changes,
                &names,
                &files,
                args.concurrency,
                &mut latencies,
            )
            .await?;
            bound_s += t.elapsed().as_secs_f64();
            if variant == "small" && round == 0 {
                check_files(&h, raw, &names[0], &small_files).await?;
            }
            let t = Instant::now();
            for name in &names {
                h.delete(ObjKey::new(Kind::Claim, name.clone()))?;
            }
            wait_warm(&h, "bench", n, LIMIT).await?;
            refills.push(t.elapsed().as_secs_f64() * 1e3);
            // The used containers' removals (held while the refill created) finish before the
            // next round, so that each refill is measured on its own, as the baseline is.
            let t = Instant::now();
            while rt.list().await?.len() > n as usize {
                if t.elapsed() > LIMIT {
                    bail!("the released containers were not removed within {LIMIT:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cleanups.push(t.elapsed().as_secs_f64() * 1e3);
            done += k;
            round += 1;
        }
        latencies.sort_by(f64::total_cmp);
        let p50 = pct(&latencies, 0.5);
        Figure::new("claim", "docker", m)
            .per_s(f64::from(m) / bound_s)
            .latencies(&latencies)
            .with("files", variant)
            .with("file_count", files.len())
            .with("pool", n)
            .with("rounds", round)
            .with("concurrency", args.concurrency)
            .with("target_p99_ms", target)
            .with("cold_p50_vs_bind_p50", cold_p50 / p50.max(1e-6))
            .with("target_vs_cold_min", 50)
            .print();
    }
    cleanups.sort_by(f64::total_cmp);
    let refill_each: Vec<f64> = refills.iter().map(|x| x.round()).collect();
    refills.sort_by(f64::total_cmp);
    let refill_p50 = pct(&refills, 0.5);
    // n: the refills timed (one per round), each of `instances`.
    Figure::new("refill", "docker", refills.len() as u64)
        .latencies(&refills)
        .with("instances", n)
        .with("each_ms", refill_each)
        .with("p50_vs_raw_parallel", refill_p50 / raw_ms)
        .with("p50_vs_raw_recycle", refill_p50 / recycle_ms)
        .with("cleanup_after_p50_ms", pct(&cleanups, 0.5))
        .with("target_vs_raw_max", 1.3)
        .print();

    // Drain: deleting the pool removes its instances.
    h.delete(ObjKey::new(Kind::Pool, "bench"))?;
    let start = Instant::now();
    while !rt.list().await?.is_empty() {
        if start.elapsed() > LIMIT {
            bail!("the pool did not drain within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.shutdown().await;
    Ok(())
}

/// The benchmark's pool: `n` warm, at most `n` live (so nothing is created while claims bind;
/// instances being removed do not count), HTTP readiness on the image's port, files under
/// `/srv`, `2n` host ports of its own.
pub(super) fn pool_spec(args: &BenchArgs, n: u32) -> anyhow::Result<Spec> {
    let yaml = format!(
        "template:
  image: {image:?}
  ports: [{{name: http, containerPort: {port}}}]
  readiness: {{httpGet: {{path: {path:?}, port: http}}}}
  files: {{mountPath: /srv}}
warm: {n}
max: {n}
hostPorts: {{start: {start}, end: {end}}}
pullPolicy: Never
",
        image = args.image,
        port = args.http_port,
        path = args.http_path,
        start = args.port_base,
        end = u32::from(args.port_base) + 2 * n - 1,
    );
    let spec: PoolSpec = serde_saphyr::from_str(&yaml).context("the benchmark's pool")?;
    Ok(Spec::Pool(spec))
}

/// Applies every claim, `concurrency` outstanding, and records each one's bind latency.
async fn bind_all(
    h: &EngineHandle,
    changes: &mut tokio::sync::mpsc::UnboundedReceiver<poolkeeper_engine::ClaimChange>,
    names: &[String],
    files: &BTreeMap<String, String>,
    concurrency: u32,
    latencies: &mut Vec<f64>,
) -> anyhow::Result<()> {
    let mut sent: HashMap<&str, Instant> = HashMap::new();
    let mut next = 0;
    let mut bound = 0;
    let submit = |name: &str| {
        h.apply(obj(
            name.to_owned(),
            Spec::Claim(ClaimSpec {
                pool: "bench".into(),
                user: "bench-user".into(),
                ttl: None,
                files: files.clone(),
                files_from: None,
                resources: None,
            }),
        ))
    };
    let start = Instant::now();
    while bound < names.len() {
        while next < names.len() && sent.len() < concurrency as usize {
            sent.insert(&names[next], Instant::now());
            submit(&names[next])?;
            next += 1;
        }
        let remaining = LIMIT.saturating_sub(start.elapsed());
        let Ok(Some(ch)) = tokio::time::timeout(remaining, changes.recv()).await else {
            bail!(
                "claims not bound within {LIMIT:?} ({bound} of {})",
                names.len()
            );
        };
        if ch.phase == ClaimPhase::Failed {
            bail!("claim {} failed", ch.name);
        }
        if ch.phase != ClaimPhase::Bound {
            continue;
        }
        if let Some(at) = sent.remove(ch.name.as_str()) {
            latencies.push(ch.at.duration_since(at).as_secs_f64() * 1e3);
            bound += 1;
        }
    }
    Ok(())
}

/// The files of a bound claim are served by its instance (the figures are of real copies).
async fn check_files(
    h: &EngineHandle,
    raw: &Raw,
    claim: &str,
    files: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let snap = h.snapshot().await?;
    let port = snap
        .objects
        .iter()
        .find(|o| o.kind == Kind::Claim && o.name == claim)
        .and_then(|o| o.status["endpoint"]["ports"]["http"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| anyhow!("claim {claim} has no http endpoint"))?;
    let (path, want) = files.iter().next().ok_or_else(|| anyhow!("no files"))?;
    let addr = format!("{}:{port}", raw.host);
    let got = http_body(&addr, &format!("/{path}"))
        .await
        .with_context(|| format!("GET http://{addr}/{path}"))?;
    if &got != want {
        bail!("claim {claim}: /{path} does not hold the claim's file");
    }
    Ok(())
}

async fn http_body(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP answer"))?;
    if !head.contains(" 200 ") {
        bail!("{}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}
