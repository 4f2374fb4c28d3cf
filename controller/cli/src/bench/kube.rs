//! `bench --source kube`: claims as Claim objects on the API server `KUBECONFIG` names. A
//! controller runs in this process on the memory runtime (so that the API server's path is what
//! is measured), watching a namespace of the bench's own; clients on a thread of their own
//! create claims at `--rate` (or as fast as `--concurrency` allows), see each Bound through a
//! watch, and delete it (the controller's finalizer holds it until its instance is reset), or,
//! with `--keep`, leave it bound (the path to Bound alone).
//!
//! Latency is from a claim's create request (with `--rate`, from its scheduled arrival) to the
//! watch showing it Bound. The controller's writes are counted (status, finalizers, events):
//! `writes_per_claim` is their total over the run divided by the claims.
//! `finalizer_at_admission` is the share of claims the API server gave the finalizer as they
//! were created (the policy `poolkeeper admission` prints), which the controller then need
//! not write. `cpu_ms_per_claim` is the CPU time this process (clients and controller) took
//! per claim over the run, and the API server's (the process listening on its port, by name)
//! and etcd's (beside a `kube-apiserver`) where they run on this machine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::oneshot;

use poolkeeper_kinds::Kind;
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_runtime_kube::{KubeRuntime, KubeRuntimeConfig};

use crate::args::RuntimeKind;
use poolkeeper_source_kube::kube::ResourceExt;
use poolkeeper_source_kube::kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use poolkeeper_source_kube::kube::runtime::{WatchStreamExt, watcher};
use poolkeeper_source_kube::objects::{FINALIZER, api_resource};

use super::api::Background;
use super::{BenchArgs, Figure};
use crate::kube_mode::{KubeController, KubeOptions, Phase};

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let conn = poolkeeper_source_kube::connect().await?;
    let client = conn.client.clone();
    let ns = format!("pk-bench-{}", std::process::id());
    let namespaces: Api<k8s::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await
        .with_context(|| format!("creating namespace {ns} on {}", conn.server))?;
    if args.runtime == RuntimeKind::Kube {
        // Pods run as the namespace's `default` ServiceAccount, which a cluster's
        // controller-manager makes; a bare API server has none.
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &ns);
        let sa = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
        if let Err(e) = sas.create(&PostParams::default(), &sa).await
            && !matches!(&e, poolkeeper_source_kube::kube::Error::Api(s) if s.code == 409)
        {
            cleanup(&client, &ns).await;
            return Err(e).context("creating the namespace's default ServiceAccount");
        }
    }
    let r = measure(args, &conn, &ns).await;
    cleanup(&client, &ns).await;
    r
}

mod k8s {
    pub use k8s_openapi::api::core::v1::Namespace;
}

async fn measure(
    args: &BenchArgs,
    conn: &poolkeeper_source_kube::Connection,
    ns: &str,
) -> anyhow::Result<()> {
    let client = conn.client.clone();
    let claims = args.claims.unwrap_or(2_000);
    // Kept claims each hold an instance: the pool is as large as the claims.
    let warm = args
        .instances
        .unwrap_or(if args.keep { claims } else { 200 });
    let api = |kind| Api::<DynamicObject>::namespaced_with(client.clone(), ns, &api_resource(kind));
    let mut pool = json!({"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "Pool",
        "metadata": {"name": "bench"},
        "spec": {"template": {"image": "bench", "ports": [{"name": "http", "containerPort": 80}]},
                 "warm": warm, "hostPorts": {"start": 20000, "end": 60000}}});
    let refill = !args.keep || args.refill;
    if !refill {
        pool["spec"]["max"] = json!(warm);
    }
    let user = json!({"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "User",
        "metadata": {"name": "bench"}, "spec": {"quota": {"maxClaims": 1000000}}});
    api(Kind::Pool)
        .create(&PostParams::default(), &serde_json::from_value(pool)?)
        .await
        .context(
            "creating the Pool (are the CRDs applied? `poolkeeper crds | kubectl apply -f -`)",
        )?;
    api(Kind::User)
        .create(&PostParams::default(), &serde_json::from_value(user)?)
        .await?;

    let state = tempfile::tempdir()?;
    let pods = args.runtime == RuntimeKind::Kube;
    let opts = KubeOptions {
        client: client.clone(),
        server: conn.server.clone(),
        namespaces: vec![ns.to_owned()],
        state_dir: state.path().to_path_buf(),
        lease: None,
        home: ns.to_owned(),
        identity: "bench".to_owned(),
        resync: Duration::from_secs(30),
        listener: None,
        admin_token: None,
        webhooks: None,
        console: Default::default(),
        limits: Default::default(),
    };
    // On the pod runtime, pods are what is measured; where the API server has no nodes, the
    // bench reports them ready as a kubelet would (pods/status).
    let mut standin = None;
    let filling = Instant::now();
    let mut controller = if pods {
        standin = Some(tokio::spawn(poolkeeper_runtime_kube::standin::kubelet(
            client.clone(),
            ns.to_owned(),
        )));
        let rt = KubeRuntime::new(
            client.clone(),
            KubeRuntimeConfig {
                namespace: ns.to_owned(),
                controller_id: "bench".to_owned(),
                grace_seconds: 0,
            },
        );
        KubeController::start(Arc::new(rt), opts)
    } else {
        KubeController::start(Arc::new(MemoryRuntime::new(MemoryConfig::default())), opts)
    };
    if let Phase::Stopped(why) = controller.leading().await {
        bail!("the controller stopped: {why:?}");
    }
    let engine = controller
        .engine
        .wait_for(Option::is_some)
        .await
        .map_err(|_| anyhow!("the controller stopped"))?
        .clone()
        .ok_or_else(|| anyhow!("no engine"))?;
    let began = Instant::now();
    loop {
        let w = engine
            .pool_status("bench")
            .await?
            .map(|s| s.warm)
            .unwrap_or(0);
        if w >= warm {
            break;
        }
        if began.elapsed() > Duration::from_secs(300) {
            bail!("the pool did not fill ({w}/{warm} warm)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fill_secs = filling.elapsed().as_secs_f64();

    let clients = Background::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?,
    );
    let waiters: Waiters = Arc::default();
    let (ready_tx, ready_rx) = oneshot::channel();
    let (c, w, n) = (client.clone(), waiters.clone(), ns.to_owned());
    clients.spawn(async move {
        let api = Api::<DynamicObject>::namespaced_with(c, &n, &api_resource(Kind::Claim));
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut ready = Some(ready_tx);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    let bound = o.data["status"]["phase"] == "Bound";
                    if bound
                        && let Some(name) = o.metadata.name.as_deref()
                        && let Some(tx) = w.lock().unwrap_or_else(|e| e.into_inner()).remove(name)
                    {
                        let _ = tx.send(Instant::now());
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("the bench's watch did not start")??;

    let counters = controller.counters.clone();
    let before = snapshot(&counters);
    let cpu_before = super::cpu_ms(&conn.server);
    let next = Arc::new(AtomicU32::new(0));
    // Claims the API server gave the finalizer as they were created (`poolkeeper admission`).
    let admitted = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let rate = args.rate.filter(|r| *r > 0.0);
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (c, w, next, n) = (client.clone(), waiters.clone(), next.clone(), ns.to_owned());
        let admitted = admitted.clone();
        let keep = args.keep;
        workers.push(clients.spawn(async move {
            let api = Api::<DynamicObject>::namespaced_with(c, &n, &api_resource(Kind::Claim));
            let mut latencies = Vec::new();
            let mut creates = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= claims {
                    return anyhow::Ok((latencies, creates));
                }
                let arrival = rate.map(|r| started + Duration::from_secs_f64(f64::from(i) / r));
                if let Some(due) = arrival {
                    tokio::time::sleep_until(due.into()).await;
                }
                let name = format!("c{i}");
                let (tx, rx) = oneshot::channel();
                w.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), tx);
                let t0 = arrival.unwrap_or_else(Instant::now);
                let claim: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "Claim",
                    "metadata": {"name": name}, "spec": {"pool": "bench", "user": "bench"}}))?;
                let sent = Instant::now();
                let made = api
                    .create(&PostParams::default(), &claim)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                if made.finalizers().iter().any(|f| f == FINALIZER) {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                creates.push(sent.elapsed().as_secs_f64() * 1000.0);
                let bound = tokio::time::timeout(Duration::from_secs(60), rx)
                    .await
                    .map_err(|_| anyhow!("{name} was not bound within 60 s"))??;
                latencies.push(bound.duration_since(t0).as_secs_f64() * 1000.0);
                if !keep {
                    api.delete(&name, &DeleteParams::default())
                        .await
                        .with_context(|| format!("deleting {name}"))?;
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut creates = Vec::new();
    for w in workers {
        let (l, c) = w.await??;
        latencies.extend(l);
        creates.extend(c);
    }
    creates.sort_by(f64::total_cmp);
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    // The deletions' cleanups (finalizers removed) land shortly after the last Bound.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = snapshot(&counters);
    let per = |i: usize| (after[i] - before[i]) as f64 / f64::from(claims);
    // Where the CPU went, per claim: this process (clients and controller) and, when they run
    // on this machine, the API server (or the fake) and etcd.
    let cpu_per_claim: serde_json::Map<String, serde_json::Value> = super::cpu_ms(&conn.server)
        .into_iter()
        .filter_map(|(name, ms)| {
            let spent = ms - cpu_before.get(&name)?;
            Some((name, json!((spent / f64::from(claims) * 1e3).round() / 1e3)))
        })
        .collect();
    Figure::new("kube_claims", if pods { "kube" } else { "memory" }, claims)
        .per_s(f64::from(claims) / elapsed)
        .latencies(&latencies)
        .with("concurrency", args.concurrency)
        .with("offered_rate_per_s", rate)
        .with("deleted", !args.keep)
        .with("refill", refill)
        .with("warm", warm)
        .with("create_p50_ms", super::pct(&creates, 0.5))
        .with("create_p99_ms", super::pct(&creates, 0.99))
        .with("writes_per_claim", per(0) + per(1) + per(2))
        .with("status_writes_per_claim", per(0))
        .with("finalizer_writes_per_claim", per(1))
        .with("event_writes_per_claim", per(2))
        .with(
            "finalizer_at_admission",
            f64::from(admitted.load(Ordering::Relaxed)) / f64::from(claims),
        )
        .with("cpu_ms_per_claim", cpu_per_claim)
        .with(
            "cores",
            std::thread::available_parallelism().map_or(0, usize::from),
        )
        .with("server", &conn.server)
        .with("fill_instances", warm)
        .with("fill_s", fill_secs)
        .with("fill_per_s", f64::from(warm) / fill_secs.max(1e-9))
        .with(
            "kubelet",
            if pods {
                "stand-in (pods/status)"
            } else {
                "none (memory runtime)"
            },
        )
        .print();
    drop(clients);
    if let Some(s) = standin {
        s.abort();
    }
    controller.stop().await?;
    Ok(())
}

fn snapshot(c: &poolkeeper_source_kube::writes::Counters) -> [u64; 3] {
    [
        c.status.load(Ordering::Relaxed),
        c.finalizers.load(Ordering::Relaxed),
        c.events.load(Ordering::Relaxed),
    ]
}

/// Removes the bench's namespace and what is in it (finalizers cleared: the controller is gone).
async fn cleanup(client: &poolkeeper_source_kube::kube::Client, ns: &str) {
    for kind in Kind::ALL {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &api_resource(kind));
        if let Ok(list) = api.list(&Default::default()).await {
            for o in list {
                let Some(name) = o.metadata.name.clone() else {
                    continue;
                };
                let _ = api
                    .patch(
                        &name,
                        &Default::default(),
                        &poolkeeper_source_kube::kube::api::Patch::Merge(
                            json!({"metadata": {"finalizers": null}}),
                        ),
                    )
                    .await;
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
    // The pod runtime's pods and Services (a cluster's namespace controller would remove them
    // with the namespace; a bare API server has none).
    poolkeeper_runtime_kube::standin::remove_all(client, ns).await;
    let namespaces: Api<k8s::Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
}
