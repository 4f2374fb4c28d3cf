//! `bench --scenario autoscale`: warm-pool policies replayed against arrival traces, on the
//! real engine and the memory runtime, in virtual time (a paused Tokio runtime: an hour of
//! traffic runs in seconds; the engine's clock is Tokio's). A new instance takes
//! `--fill-time` to be ready (the memory runtime's readiness delay; default 3 s, about what a
//! container of the test image takes on Docker here).
//!
//! Traces, generated from `--seed`: `steady` (Poisson arrivals), `burst75` and `burst300`
//! (that many claims at once on a quiet background), `daily` (a compressed day with a morning
//! peak), and `--trace-file` (one `ARRIVAL_SECONDS HOLD_SECONDS` per line). Policies: `fixed`
//! (today's `warm`, the smallest that reaches the demand policy's hit ratio, searched), `buffer`
//! (Agones' way: a share of the bound ones above them), and `demand` (`autoscale.demand` at
//! `--hit-rate`). One line per trace and policy: hit ratio, claim wait p50/p99, idle
//! instance-seconds, peak instances; then, per trace, demand's idle over fixed's; and for the
//! steady trace, the least idle any policy needs for demand's hit ratio (`least_mean_warm`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use poolkeeper_engine::{EngineConfig, SourceEvent, TokioClock};
use poolkeeper_kinds::autoscale::{Autoscale, Buffer, Demand};
use poolkeeper_kinds::{ClaimPhase, Kind, ObjKey, PoolSpec, Spec};
use poolkeeper_runtime::Runtime;
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};

use super::{BenchArgs, Figure, claim, obj, user};

/// One claim: when it arrives and how long it holds its instance (seconds from the start).
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at: f64,
    pub hold: f64,
}

#[derive(Clone, Debug)]
pub enum Policy {
    Fixed(u32),
    Buffer(String),
    Demand(f64),
}

impl Policy {
    fn label(&self) -> String {
        match self {
            Policy::Fixed(k) => format!("fixed warm {k}"),
            Policy::Buffer(b) => format!("buffer {b}"),
            Policy::Demand(h) => format!("demand {h}"),
        }
    }

    fn spec(&self, mut p: PoolSpec) -> PoolSpec {
        p.warm = 0;
        match self {
            Policy::Fixed(k) => p.warm = *k,
            Policy::Buffer(b) => {
                p.autoscale = Some(Autoscale {
                    buffer: Some(Buffer::Percent(b.clone())),
                    min: 1,
                    ..Autoscale::default()
                })
            }
            Policy::Demand(h) => {
                p.autoscale = Some(Autoscale {
                    demand: Some(Demand {
                        hit_rate: *h,
                        window: Some("5m".into()),
                    }),
                    min: 1,
                    scale_down_cooldown: Some("30s".into()),
                    ..Autoscale::default()
                })
            }
        }
        p
    }
}

/// What one replay measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub claims: u32,
    pub hits: u64,
    pub misses: u64,
    /// Claim waits (ms), sorted.
    pub waits: Vec<f64>,
    pub idle_instance_seconds: f64,
    pub peak_instances: u32,
    /// After each burst: seconds until a new claim would find a warm instance again.
    pub recovery_s: Option<f64>,
    /// The fill time the engine measured (autoscaled pools).
    pub fill_time_s: Option<f64>,
}

impl Outcome {
    pub fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            1.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// Poisson arrivals at `rate(t)` per second for `seconds` (thinning against `peak`), holds
/// exponential with mean `hold`.
fn poisson(
    rng: &mut SmallRng,
    seconds: f64,
    peak: f64,
    rate: impl Fn(f64) -> f64,
    hold: f64,
) -> Vec<Arrival> {
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.random::<f64>()).ln() / peak;
        if t >= seconds {
            return out;
        }
        if rng.random::<f64>() * peak <= rate(t) {
            let h = -(1.0 - rng.random::<f64>()).ln() * hold;
            out.push(Arrival { at: t, hold: h });
        }
    }
}

/// The generated traces, by name.
pub fn traces(seed: u64) -> Vec<(&'static str, Vec<Arrival>, Option<f64>)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let steady = poisson(&mut rng, 3600.0, 1.0, |_| 1.0, 120.0);
    let burst = |rng: &mut SmallRng, n: u32| {
        let mut a = poisson(rng, 1800.0, 0.2, |_| 0.2, 60.0);
        let at = 600.0;
        a.extend((0..n).map(|_| Arrival { at, hold: 300.0 }));
        a.sort_by(|x, y| x.at.total_cmp(&y.at));
        a
    };
    let burst75 = burst(&mut rng, 75);
    let burst300 = burst(&mut rng, 300);
    // A day in two hours: night 0.05/s, a morning peak of 3/s at 09:00 (a quarter of the
    // way plus), a smaller one at 14:00.
    let day = 7200.0;
    let daily = poisson(
        &mut rng,
        day,
        3.2,
        move |t| {
            let h = t / day * 24.0;
            let bump = |at: f64, width: f64, height: f64| {
                height * (-((h - at) / width).powi(2) / 2.0).exp()
            };
            0.05 + bump(9.0, 1.0, 3.0) + bump(14.0, 1.5, 1.2)
        },
        90.0,
    );
    vec![
        ("steady", steady, None),
        ("burst75", burst75, Some(600.0)),
        ("burst300", burst300, Some(600.0)),
        ("daily", daily, None),
    ]
}

/// A trace from a file: `ARRIVAL_SECONDS HOLD_SECONDS` per line (`#` comments, blank lines).
/// The latest arrival and the longest hold a trace may give: a year (and no infinity).
const TRACE_MAX_SECONDS: f64 = 366.0 * 86_400.0;

pub fn read_trace(path: &std::path::Path) -> anyhow::Result<Vec<Arrival>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut f = line.split_whitespace().map(str::parse::<f64>);
        match (f.next(), f.next(), f.next()) {
            (Some(Ok(at)), Some(Ok(hold)), None)
                if (0.0..=TRACE_MAX_SECONDS).contains(&at)
                    && (0.0..=TRACE_MAX_SECONDS).contains(&hold) =>
            {
                out.push(Arrival { at, hold })
            }
            _ => bail!(
                "{}:{}: expected ARRIVAL_SECONDS HOLD_SECONDS (two numbers from 0 to \
                 {TRACE_MAX_SECONDS}), got {line:?}",
                path.display(),
                i + 1
            ),
        }
    }
    out.sort_by(|x, y| x.at.total_cmp(&y.at));
    Ok(out)
}

/// The memory runtime's pool: nothing but a name for its image.
fn memory_pool() -> PoolSpec {
    super::pool_spec(0, 5_000)
}

/// Replays `trace` against a pool under `policy` on the memory runtime, in virtual time.
pub fn replay(
    trace: &[Arrival],
    policy: &Policy,
    fill: Duration,
    burst_at: Option<f64>,
) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    rt.block_on(async {
        let runtime = Arc::new(MemoryRuntime::new(MemoryConfig {
            ready_delay: fill,
            ..MemoryConfig::default()
        }));
        // Monday 2026-12-07 00:00 UTC.
        let clock = Arc::new(TokioClock::new(1_796_601_600_000));
        replay_on(
            runtime,
            clock,
            memory_pool(),
            trace,
            policy,
            fill * 3,
            burst_at,
        )
        .await
    })
}

/// Replays `trace` against a pool made of `base` under `policy` on `runtime`, after `settle`.
async fn replay_on<R: Runtime>(
    runtime: Arc<R>,
    clock: Arc<dyn poolkeeper_engine::Clock>,
    base: PoolSpec,
    trace: &[Arrival],
    policy: &Policy,
    settle: Duration,
    burst_at: Option<f64>,
) -> anyhow::Result<Outcome> {
    let tmp = tempfile::tempdir().context("temporary state dir")?;
    let mut config = EngineConfig::new(tmp.path().join("state"));
    config.clock = clock;
    config.sync = false;
    config.resync_every = Duration::from_secs(24 * 3600);
    let (h, _task) = poolkeeper_engine::start(runtime, config)?;
    let mut changes = h.subscribe()?;
    h.apply(obj("u".into(), user()))?;
    h.apply(obj("p".into(), Spec::Pool(policy.spec(base))))?;
    h.send(SourceEvent::Synced)?;
    // The pool as it stands before the first claim (fixed: full; autoscaled: its floor).
    tokio::time::sleep(settle).await;

    let start = tokio::time::Instant::now();
    let end = trace.last().map(|a| a.at).unwrap_or(0.0) + 1.0;
    let mut out = Outcome::default();
    let mut sent: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut holds: BTreeMap<String, f64> = BTreeMap::new();
    let mut next = 0usize;
    let mut sample = tokio::time::interval(Duration::from_secs(1));
    let mut recovered: Option<f64> = None;
    let (release_tx, mut release_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        let now_s = start.elapsed().as_secs_f64();
        let due = trace.get(next).map(|a| a.at);
        let until_next = due.map(|at| Duration::from_secs_f64((at - now_s).max(0.0)));
        tokio::select! {
            biased;
            Some(c) = changes.recv() => {
                if c.phase == ClaimPhase::Bound
                    && let Some(t0) = sent.remove(&c.name)
                {
                    out.waits.push(t0.elapsed().as_secs_f64() * 1e3);
                    let hold = holds.remove(&c.name).unwrap_or(0.0);
                    let tx = release_tx.clone();
                    let name = c.name.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
                        let _ = tx.send(name);
                    });
                }
            }
            Some(name) = release_rx.recv() => {
                h.delete(ObjKey::new(Kind::Claim, name))?;
            }
            _ = sample.tick() => {
                if let Some(s) = h.pool_status("p").await? {
                    out.idle_instance_seconds += f64::from(s.warm);
                    out.peak_instances = out.peak_instances.max(s.instances);
                    if let Some(b) = burst_at
                        && now_s > b
                        && recovered.is_none()
                        && s.queued == 0
                        && s.warm > 0
                    {
                        recovered = Some(now_s - b);
                    }
                }
                if due.is_none() && now_s >= end && sent.is_empty() {
                    break;
                }
            }
            _ = tokio::time::sleep(until_next.unwrap_or(Duration::from_secs(3600))), if due.is_some() => {
                while let Some(a) = trace.get(next).filter(|a| a.at <= start.elapsed().as_secs_f64()) {
                    let name = format!("c{next}");
                    sent.insert(name.clone(), tokio::time::Instant::now());
                    holds.insert(name.clone(), a.hold);
                    h.apply(obj(name, claim("p", "u")))?;
                    next += 1;
                }
            }
        }
    }
    let s = h.pool_status("p").await?.context("the pool is gone")?;
    out.claims = trace.len() as u32;
    out.hits = s.hits;
    out.misses = s.misses;
    out.fill_time_s = s.scaling.map(|x| x.fill_time_seconds);
    // The pool drained (on Docker: its containers removed) before the engine stops.
    h.delete(ObjKey::new(Kind::Pool, "p"))?;
    for c in 0..trace.len() {
        h.delete(ObjKey::new(Kind::Claim, format!("c{c}")))?;
    }
    let drained = tokio::time::Instant::now();
    while h.pool_status("p").await?.is_some() && drained.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out.waits.sort_by(f64::total_cmp);
    out.recovery_s = recovered;
    h.shutdown().await;
    Ok(out)
}

fn print(trace: &str, policy: &Policy, o: &Outcome, fill: Duration) {
    print_on("memory", trace, policy, o, fill);
}

fn print_on(runtime: &'static str, trace: &str, policy: &Policy, o: &Outcome, fill: Duration) {
    let mut f = Figure::new("autoscale", runtime, o.claims)
        .latencies(&o.waits)
        .with("trace", trace)
        .with("policy", policy.label())
        .with("hit_ratio", o.hit_ratio())
        .with("idle_instance_s", o.idle_instance_seconds)
        .with("peak_instances", o.peak_instances)
        .with("fill_time_s", fill.as_secs_f64());
    if let Some(r) = o.recovery_s {
        f = f.with("burst_recovery_s", r);
    }
    f.print();
}

/// The least mean number of warm instances with which any pool reaches `hit_ratio` on Poisson
/// arrivals at `rate` a second, when a new instance takes `fill` seconds: the base-stock
/// frontier. A pool that keeps S instances ready or starting (starting one per claim) has
/// `max(S - N, 0)` ready, N the claims of the last fill time (Poisson, mean `rate * fill`); a
/// claim finds one ready with probability P(N < S). With no cost to start or remove an
/// instance and a fixed fill time, keeping such a level is the best a policy can do on
/// stationary arrivals (the order-up-to result of inventory theory), and a policy that
/// alternates between two levels reaches the points between them: the frontier is the lower
/// convex hull of the levels' (hit ratio, mean ready) points. None for a hit ratio of 1 or
/// more (no finite level reaches it) or below 0.
pub fn least_mean_warm(rate: f64, fill: f64, hit_ratio: f64) -> Option<f64> {
    let mean = rate * fill;
    if !(0.0..1.0).contains(&hit_ratio) || !mean.is_finite() || mean < 0.0 {
        return None;
    }
    // Points (P(N < S), E[max(S - N, 0)]) for S = 0, 1, ... until the hit ratio is passed.
    // P(N = s) in logarithms: e^-mean alone underflows from a mean of about 700.
    let mut points = vec![(0.0_f64, 0.0_f64)];
    let (mut ln_pmf, mut cdf, mut ready) = (-mean, 0.0_f64, 0.0_f64);
    for s in 0..1_000_000u32 {
        // Level s + 1: one more ready in every case where N <= s.
        cdf = (cdf + ln_pmf.exp()).min(1.0);
        ready += cdf;
        points.push((cdf, ready));
        if cdf >= hit_ratio {
            break;
        }
        ln_pmf += mean.ln() - f64::from(s + 1).ln();
    }
    // Lower convex hull (the points come in order of hit ratio).
    let mut hull: Vec<(f64, f64)> = Vec::new();
    for p in points {
        while hull.len() >= 2 {
            let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            if (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0) <= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(p);
    }
    let i = hull.iter().position(|p| p.0 >= hit_ratio)?;
    if i == 0 {
        return Some(0.0);
    }
    let (a, b) = (hull[i - 1], hull[i]);
    Some(a.1 + (b.1 - a.1) * (hit_ratio - a.0) / (b.0 - a.0))
}

/// The smallest fixed `warm` whose hit ratio reaches `target` (hit ratio grows with warm).
fn best_fixed(
    trace: &[Arrival],
    fill: Duration,
    target: f64,
    burst_at: Option<f64>,
) -> anyhow::Result<(u32, Outcome)> {
    let (mut lo, mut hi) = (0u32, 1u32);
    let mut found = loop {
        let o = replay(trace, &Policy::Fixed(hi), fill, burst_at)?;
        if o.hit_ratio() >= target || hi >= 4096 {
            break o;
        }
        lo = hi;
        hi *= 2;
    };
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let o = replay(trace, &Policy::Fixed(mid), fill, burst_at)?;
        if o.hit_ratio() >= target {
            hi = mid;
            found = o;
        } else {
            lo = mid;
        }
    }
    Ok((hi, found))
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.runtime == crate::args::RuntimeKind::Docker {
        return on_docker(args);
    }
    let fill = args.fill_time;
    let mut all = traces(args.seed);
    if let Some(path) = &args.trace_file {
        all.push(("file", read_trace(path)?, None));
    }
    for (name, trace, burst_at) in &all {
        let demand = Policy::Demand(args.hit_rate);
        let d = replay(trace, &demand, fill, *burst_at)?;
        print(name, &demand, &d, fill);
        let buffer = Policy::Buffer("20%".into());
        let b = replay(trace, &buffer, fill, *burst_at)?;
        print(name, &buffer, &b, fill);
        let (k, f) = best_fixed(trace, fill, d.hit_ratio(), *burst_at)?;
        print(name, &Policy::Fixed(k), &f, fill);
        Figure::new("autoscale_vs_fixed", "memory", d.claims)
            .with("trace", *name)
            .with("demand_hit_ratio", d.hit_ratio())
            .with("fixed_warm", k)
            .with("fixed_hit_ratio", f.hit_ratio())
            .with(
                "idle_demand_over_fixed",
                if f.idle_instance_seconds > 0.0 {
                    d.idle_instance_seconds / f.idle_instance_seconds
                } else {
                    1.0
                },
            )
            .print();
        // On stationary arrivals no policy can do better than the base-stock frontier.
        if *name == "steady"
            && let Some(last) = trace.last()
            && let Some(warm) = least_mean_warm(
                trace.len() as f64 / last.at,
                fill.as_secs_f64(),
                d.hit_ratio(),
            )
        {
            let seconds = last.at + 1.0;
            let least = warm * seconds;
            let rate = trace.len() as f64 / last.at;
            // The most hits any policy gets from 70% of fixed's idle instance-seconds.
            let budget = 0.7 * f.idle_instance_seconds / seconds;
            let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
            for _ in 0..60 {
                let mid = (lo + hi) / 2.0;
                match least_mean_warm(rate, fill.as_secs_f64(), mid) {
                    Some(w) if w <= budget => lo = mid,
                    _ => hi = mid,
                }
            }
            Figure::new("autoscale_bound", "memory", d.claims)
                .with("trace", *name)
                .with("hit_ratio", d.hit_ratio())
                .with("least_idle_instance_s", least)
                .with("demand_over_least", d.idle_instance_seconds / least)
                .with("fixed_over_least", f.idle_instance_seconds / least)
                .with("best_hit_ratio_at_70pct_of_fixed", lo)
                .print();
        }
    }
    Ok(())
}

/// The short run on Docker that checks the simulation: a few minutes of steady arrivals
/// (0.5 a second, holds of 20 s on average) against a demand pool of the test image, in real
/// time; then the same trace simulated with the fill time the engine measured on Docker.
fn on_docker(args: &BenchArgs) -> anyhow::Result<()> {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let seconds = args.claims.map(f64::from).unwrap_or(240.0);
    let trace = poisson(&mut rng, seconds, 0.5, |_| 0.5, 20.0);
    let policy = Policy::Demand(args.hit_rate);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let docker = rt.block_on(async {
        let tmp = tempfile::tempdir().context("temporary state dir")?;
        let mut config = args.docker.docker_config(tmp.path())?;
        config.controller_id = format!("bench-autoscale-{}", std::process::id());
        let runtime = Arc::new(poolkeeper_runtime_docker::DockerRuntime::connect(config).await?);
        super::docker::image_present(&runtime.first_client()?, &args.image).await?;
        let Spec::Pool(base) = super::docker::pool_spec(args, 30)? else {
            bail!("the benchmark's pool is not a pool");
        };
        replay_on(
            runtime,
            Arc::new(poolkeeper_engine::SystemClock),
            base,
            &trace,
            &policy,
            Duration::from_secs(10),
            None,
        )
        .await
    })?;
    let measured = docker.fill_time_s.unwrap_or(args.fill_time.as_secs_f64());
    print_on(
        "docker",
        "steady-short",
        &policy,
        &docker,
        Duration::from_secs_f64(measured),
    );
    let fill = Duration::from_secs_f64(measured);
    let simulated = replay(&trace, &policy, fill, None)?;
    print("steady-short", &policy, &simulated, fill);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_file_with_an_endless_or_huge_time_is_refused_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("trace");
        std::fs::write(&f, "# at hold\n0.5 10\n2 30\n").unwrap();
        let t = read_trace(&f).unwrap();
        assert_eq!((t.len(), t[1].at, t[1].hold), (2, 2.0, 30.0));
        for bad in ["inf 1", "1 1e20", "NaN 1", "-1 1", "1"] {
            std::fs::write(&f, format!("0 1\n{bad}\n")).unwrap();
            let e = read_trace(&f).expect_err(bad).to_string();
            assert!(e.contains(":2: expected"), "{bad}: {e}");
        }
    }

    #[test]
    fn traces_are_the_same_for_a_seed_and_sorted() {
        let a = traces(7);
        let b = traces(7);
        for ((na, ta, _), (nb, tb, _)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(ta.len(), tb.len());
            assert!(ta.windows(2).all(|w| w[0].at <= w[1].at), "{na} unsorted");
        }
        // The steady trace is about one arrival a second for an hour.
        let steady = &a[0].1;
        assert!((3300..3900).contains(&steady.len()), "{}", steady.len());
    }

    #[test]
    fn the_least_mean_warm_is_a_base_stock_level_at_its_hit_ratio_and_between_levels_between() {
        let m: f64 = 3.0;
        let pmf = |k: u32| (-m).exp() * m.powi(k as i32) / (1..=k).map(f64::from).product::<f64>();
        let below = |s: u32| (0..s).map(pmf).sum::<f64>();
        let ready = |s: u32| (0..s).map(|k| f64::from(s - k) * pmf(k)).sum::<f64>();
        // Keeping 9 ready or starting at 1 claim/s with 3 s fills: hits when fewer than 9
        // claims came in the last 3 s; about 6 ready on average.
        let at9 = least_mean_warm(1.0, 3.0, below(9)).unwrap();
        assert!((at9 - ready(9)).abs() < 1e-9, "{at9} vs {}", ready(9));
        assert!((at9 - 6.0).abs() < 0.01, "{at9}");
        // Halfway between the hit ratios of 9 and 10: halfway between their means.
        let mid = least_mean_warm(1.0, 3.0, (below(9) + below(10)) / 2.0).unwrap();
        assert!((mid - (ready(9) + ready(10)) / 2.0).abs() < 1e-9, "{mid}");
        // More hits cost more; no hits cost nothing; beyond 1 is out of reach.
        let mut last = 0.0;
        for h in [0.5, 0.9, 0.99, 0.997, 0.9999] {
            let w = least_mean_warm(1.0, 3.0, h).unwrap();
            assert!(w > last, "{h}: {w} <= {last}");
            last = w;
        }
        assert_eq!(least_mean_warm(1.0, 3.0, 0.0), Some(0.0));
        assert_eq!(least_mean_warm(1.0, 3.0, 1.0), None);
        assert_eq!(least_mean_warm(1.0, 3.0, 1.5), None);
        // A large mean (e^-mean underflows): about the normal quantile, mean + 2.33 sd for
        // 99% of claims served, less the mean.
        let big = least_mean_warm(100.0, 8.0, 0.99).unwrap();
        let sd = 800.0_f64.sqrt();
        assert!((big - 2.33 * sd).abs() < 0.1 * sd, "{big}");
    }

    #[test]
    fn a_trace_file_names_its_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "# at hold\n0 10\n1.5 x\n").unwrap();
        let e = read_trace(&path).unwrap_err().to_string();
        assert!(e.contains("t.txt:3:"), "{e}");
        std::fs::write(&path, "2 5\n0 10\n").unwrap();
        let t = read_trace(&path).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].at, 0.0);
    }

    #[test]
    fn a_demand_pool_refills_a_burst_and_binds_every_claim() {
        let trace: Vec<Arrival> = (0..40)
            .map(|i| Arrival {
                at: f64::from(i) * 0.5,
                hold: 30.0,
            })
            .collect();
        let o = replay(&trace, &Policy::Demand(0.99), Duration::from_secs(3), None).unwrap();
        assert_eq!(o.waits.len(), 40, "every claim bound");
        assert_eq!(o.hits + o.misses, 40);
        // Two claims a second, 3 s to fill: demand keeps enough that most claims hit.
        assert!(o.hit_ratio() > 0.6, "{o:?}");
    }
}
