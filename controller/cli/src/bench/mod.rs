//! `poolkeeper bench`: drives the real engine (same reconcile path, real fsyncs to a temporary
//! store) and prints one JSON line per figure.
//!
//! - `fill`: time to bring a pool to `--instances` warm instances.
//! - `claim`: `--claims` claims submitted with `--concurrency` outstanding; latency is from
//!   handing the claim to the engine to the engine reporting it Bound (after its binding is
//!   durable); throughput is claims bound per second over the whole run.
//! - `release`: deleting every claim until the pool is back to full warm.
//! - `resync`: a full resync (list the runtime, reconcile every object) with `--resync-pools`
//!   pools holding `--resync-claims` bound claims.
//!
//! `--runtime docker` runs the figures of [`docker`] instead.

pub mod api;
pub mod autoscale;
pub mod docker;
mod figure;
pub mod kube;

pub use figure::Figure;
use figure::pct;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use poolkeeper_engine::{EngineConfig, EngineHandle, SourceEvent};
use poolkeeper_kinds::{
    ClaimPhase, ClaimSpec, InstanceTemplate, ObjKey, Object, Origin, PoolSpec, Quota, Spec,
    UserSpec,
};
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};

use crate::args::RuntimeKind;
pub use crate::args::{BenchArgs, BenchReset, Scenario};

fn obj(name: String, spec: Spec) -> Object {
    Object {
        name,
        spec,
        origin: Origin::default(),
        generation: 1,
    }
}

fn pool(warm: u32, max: u32) -> Spec {
    Spec::Pool(pool_spec(warm, max))
}

fn pool_spec(warm: u32, max: u32) -> PoolSpec {
    PoolSpec {
        template: InstanceTemplate {
            image: "bench".into(),
            ..InstanceTemplate::default()
        },
        warm,
        max: Some(max),
        host_ports: None,
        reset: Default::default(),
        reset_command: Vec::new(),
        claim_ttl: None,
        pull_policy: Default::default(),
        autoscale: None,
        exposure: None,
        claim_resources: None,
    }
}

fn user() -> Spec {
    Spec::User(UserSpec {
        quota: Quota {
            max_claims: u32::MAX,
            pools: Vec::new(),
        },
        ..UserSpec::default()
    })
}

fn claim(pool: &str, user: &str) -> Spec {
    Spec::Claim(ClaimSpec {
        pool: pool.into(),
        user: user.into(),
        ttl: None,
        files: BTreeMap::new(),
        files_from: None,
        resources: None,
    })
}

/// A memory figure of this process from /proc/self/status (`VmHWM` peak, `VmRSS` now), in MB.
fn proc_status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU time (user + system, all threads) taken so far, in ms, from `/proc/PID/stat` (in USER_HZ
/// ticks, 100 a second on Linux): by this process (`bench_process`), by the process on this
/// machine that listens on `server`'s port (under its own name: `kube-apiserver`, or the fake
/// API server's `serve`), and, when that is a `kube-apiserver`, by the processes named `etcd`.
/// A process not found is absent (a remote server), and all are absent off Linux.
pub fn cpu_ms(server: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Some(ms) = proc_cpu_ms("self") {
        out.insert("bench_process".to_owned(), ms);
    }
    let Some(pid) = local_port(server).and_then(listener_of) else {
        return out;
    };
    let comm = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default()
    };
    let name = comm(&pid);
    if let Some(ms) = proc_cpu_ms(&pid) {
        out.insert(name.clone(), ms);
    }
    if name == "kube-apiserver" {
        for etcd in pids().filter(|p| comm(p) == "etcd") {
            if let Some(ms) = proc_cpu_ms(&etcd) {
                *out.entry("etcd".to_owned()).or_insert(0.0) += ms;
            }
        }
    }
    out
}

/// The port of `server` (a URL) when its host is this machine's loopback.
fn local_port(server: &str) -> Option<u16> {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0");
    local.then(|| port.parse().ok()).flatten()
}

/// The process (other than this one) holding a listening TCP socket on `port`.
fn listener_of(port: u16) -> Option<String> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|l| {
                    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let listening = f.get(3) == Some(&"0A");
                    let on_port = f
                        .get(1)
                        .and_then(|a| a.rsplit_once(':'))
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                        == Some(port);
                    (listening && on_port).then(|| f.get(9).map(|i| format!("socket:[{i}]")))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let me = std::process::id().to_string();
    pids().filter(|p| *p != me).find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
    })
}

/// The process ids in `/proc`.
fn pids() -> impl Iterator<Item = String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// `utime + stime` of `/proc/PID/stat`, in ms.
fn proc_cpu_ms(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10.0)
}

/// Peak resident memory of this process, in MB.
pub fn rss_peak_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

/// One memory-runtime figure: `n` operations that took `took`, as total ms and a rate.
fn print_rate(figure: &'static str, n: u32, took: Duration) {
    Figure::new(figure, "memory", n)
        .per_s(f64::from(n) / took.as_secs_f64())
        .with("ms", took.as_secs_f64() * 1e3)
        .print();
}

async fn wait_warm(h: &EngineHandle, pool: &str, want: u32, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let st = h.pool_status(pool).await?;
        if st.as_ref().is_some_and(|s| s.warm >= want) {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("pool {pool} did not reach {want} warm within {limit:?}: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn start_engine(dir: &std::path::Path) -> anyhow::Result<(EngineHandle, Arc<MemoryRuntime>)> {
    let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
    let (h, _task) = poolkeeper_engine::start(rt.clone(), EngineConfig::new(dir.join("state")))?;
    Ok((h, rt))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.users == 0 {
        bail!("--concurrency and --users must be at least 1");
    }
    if args.source == crate::args::SourceKind::Kube || args.runtime == RuntimeKind::Kube {
        return kube::run(&args).await;
    }
    if args.api {
        return api::run(&args).await;
    }
    if args.scenario == Scenario::Autoscale {
        // Runtimes of its own (paused for the simulation), on a thread of its own.
        return std::thread::spawn(move || autoscale::run(&args))
            .join()
            .map_err(|_| anyhow::anyhow!("the autoscale benchmark panicked"))?;
    }
    if args.runtime == RuntimeKind::Docker {
        return docker::run(&args).await;
    }
    let (instances, claims) = (
        args.instances.unwrap_or(1000),
        args.claims.unwrap_or(10_000),
    );
    match args.scenario {
        Scenario::Autoscale => Ok(()),
        Scenario::Claim => claim_bench(&args).await,
        Scenario::Resync => resync_bench(&args).await,
        Scenario::All => {
            let mut scenarios = vec!["claim"];
            if args.resync_pools > 0 {
                scenarios.push("resync");
            }
            let exe = std::env::current_exe().context("locating this program")?;
            for sc in scenarios {
                let mut cmd = std::process::Command::new(&exe);
                cmd.arg("bench")
                    .args(["--scenario", sc])
                    .args(["--instances", &instances.to_string()])
                    .args(["--claims", &claims.to_string()])
                    .args(["--concurrency", &args.concurrency.to_string()])
                    .args(["--users", &args.users.to_string()])
                    .args(["--resync-pools", &args.resync_pools.to_string()])
                    .args(["--resync-claims", &args.resync_claims.to_string()]);
                if args.release {
                    cmd.arg("--release");
                }
                let status = cmd.status().context("running a benchmark scenario")?;
                if !status.success() {
                    bail!("benchmark scenario {sc} failed: {status}");
                }
            }
            Ok(())
        }
    }
}

async fn claim_bench(args: &BenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("temporary state dir")?;
    let (h, _rt) = start_engine(tmp.path()).await?;
    let mut changes = h.subscribe()?;
    for u in 0..args.users {
        h.apply(obj(format!("u{u}"), user()))?;
    }
    h.send(SourceEvent::Synced)?;
    // Fill.
    let n = args.instances.unwrap_or(1000);
    let claims = args.claims.unwrap_or(10_000);
    let t = Instant::now();
    // Capacity for every claim: with claims <= instances the pool is at capacity once all are
    // bound (no refill); with more claims the pool refills behind them up to `claims`.
    h.apply(obj("bench".into(), pool(n, n.max(claims))))?;
    wait_warm(&h, "bench", n, Duration::from_secs(600)).await?;
    print_rate("fill", n, t.elapsed());
    // Claims, with `concurrency` outstanding.
    let m = claims;
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(m as usize);
    let mut latencies: Vec<f64> = Vec::with_capacity(m as usize);
    let mut next = 0u32;
    let submit = |i: u32, sent: &mut HashMap<String, Instant>| {
        let name = format!("c{i}");
        sent.insert(name.clone(), Instant::now());
        h.apply(obj(name, claim("bench", &format!("u{}", i % args.users))))
    };
    let t = Instant::now();
    while next < m.min(args.concurrency) {
        submit(next, &mut sent)?;
        next += 1;
    }
    while latencies.len() < m as usize {
        let Some(ch) = changes.recv().await else {
            bail!("engine stopped")
        };
        if ch.phase != ClaimPhase::Bound {
            continue;
        }
        if let Some(at) = sent.remove(&ch.name) {
            latencies.push(ch.at.duration_since(at).as_secs_f64() * 1e3);
            if args.release {
                // Steady state: the user is done at once; the instance is reset (recreated)
                // and the pool refills behind the traffic.
                h.delete(ObjKey::new(poolkeeper_kinds::Kind::Claim, ch.name.clone()))?;
            }
            if next < m {
                submit(next, &mut sent)?;
                next += 1;
            }
        }
    }
    let elapsed = t.elapsed();
    latencies.sort_by(f64::total_cmp);
    Figure::new("claim", "memory", m)
        .per_s(f64::from(m) / elapsed.as_secs_f64())
        .latencies(&latencies)
        .rss()
        .with("pool", n)
        .with("concurrency", args.concurrency)
        .with("release_as_bound", args.release)
        .print();
    if !args.release {
        // Release everything and wait for the pool to be full again.
        let t = Instant::now();
        for i in 0..m {
            h.delete(ObjKey::new(poolkeeper_kinds::Kind::Claim, format!("c{i}")))?;
        }
        wait_warm(&h, "bench", n, Duration::from_secs(600)).await?;
        print_rate("release", m, t.elapsed());
    }
    h.shutdown().await;
    Ok(())
}

async fn resync_bench(args: &BenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("temporary state dir")?;
    let (h, rt) = start_engine(tmp.path()).await?;
    let mut changes = h.subscribe()?;
    let pools = args.resync_pools;
    let claims = args.resync_claims;
    let per_pool = claims.div_ceil(pools);
    for u in 0..args.users {
        h.apply(obj(format!("u{u}"), user()))?;
    }
    for p in 0..pools {
        h.apply(obj(format!("p{p}"), pool(per_pool, per_pool)))?;
    }
    h.send(SourceEvent::Synced)?;
    let t = Instant::now();
    // Wait for every pool to fill, then bind every claim.
    while (rt.counts().1 as u32) < per_pool * pools {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t.elapsed() > Duration::from_secs(600) {
            bail!("pools did not fill");
        }
    }
    // Declared in chunks, as files or API calls arrive, rather than 100k queued at once.
    let mut bound = 0;
    let mut c = 0;
    while c < claims {
        let end = (c + 4096).min(claims);
        for i in c..end {
            h.apply(obj(
                format!("c{i}"),
                claim(&format!("p{}", i % pools), &format!("u{}", i % args.users)),
            ))?;
        }
        c = end;
        while bound < c {
            let Some(ch) = changes.recv().await else {
                bail!("engine stopped")
            };
            if ch.phase == ClaimPhase::Bound {
                bound += 1;
            }
        }
    }
    let setup = t.elapsed();
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(h.resync().await?.as_secs_f64() * 1e3);
    }
    let rss_now = proc_status_mb("VmRSS:");
    times.sort_by(f64::total_cmp);
    // n: the full resyncs timed; `ms` is their median.
    Figure::new("resync", "memory", times.len() as u64)
        .rss()
        .with("ms", times[1])
        .with("min_ms", times[0])
        .with("pools", pools)
        .with("claims", claims)
        .with("instances", rt.counts().0)
        .with("setup_s", setup.as_secs_f64())
        .with("rss_now_mb", rss_now)
        .print();
    h.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loopback_servers_port_is_looked_for_on_this_machine() {
        assert_eq!(local_port("https://127.0.0.1:6443"), Some(6443));
        assert_eq!(local_port("http://127.0.0.1:39721/"), Some(39721));
        assert_eq!(local_port("https://localhost:6443/api"), Some(6443));
        assert_eq!(local_port("https://[::1]:6443"), Some(6443));
        assert_eq!(local_port("https://10.0.0.1:443"), None);
        assert_eq!(local_port("https://kubernetes.default.svc"), None);
    }

    /// The CPU of the process that serves the URL is counted under its own name, and nobody
    /// else's: an idle `kube-apiserver` or `etcd` elsewhere on the machine is not the server.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_server_is_the_process_listening_on_its_port() {
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            return;
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        drop(listener);
        let script = format!(
            "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{port}))\ns.listen()\nprint('up',flush=True)\ntime.sleep(30)"
        );
        let Ok(mut child) = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            return; // no python3 here
        };
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        }
        let found = listener_of(port);
        let cpu = cpu_ms(&format!("http://127.0.0.1:{port}/"));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(line.trim(), "up");
        assert_eq!(found, Some(child.id().to_string()));
        let names: Vec<&str> = cpu.keys().map(String::as_str).collect();
        assert!(names.contains(&"bench_process"), "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("python")),
            "the listener by its name: {names:?}"
        );
        assert!(
            !names.contains(&"etcd"),
            "etcd only beside a kube-apiserver"
        );
        assert_eq!(listener_of(port), None, "nobody listens once it is gone");
    }
}
