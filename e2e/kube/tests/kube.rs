//! Kubernetes mode end to end, against the API server `KUBECONFIG` names (skipped without one;
//! failing instead when `POOLKEEPER_REQUIRE_KUBE=1`). Each test has a namespace of its own and
//! runs its controllers in-process, on the memory runtime, under a ServiceAccount that holds
//! exactly the roles `poolkeeper rbac` prints. Only an API server is needed (no kubelet, no
//! controller-manager).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use poolkeeper_e2e_kube::{
    Proxy, claim_status, cluster, eventually, http_get, start_controller, status_of,
};
use poolkeeper_kinds::Kind;
use poolkeeper_runtime::Runtime;
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_source_kube::kube::{self, Api};
use poolkeeper_source_kube::objects::FINALIZER;
use serde_json::Value;

fn fixtures(sub: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files
}

/// A fixture's expected field and message (its `# field:` and `# expect:` lines).
fn expectation(text: &str) -> (String, String) {
    let line = |p: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap_or_default()
            .to_owned()
    };
    (line("# field: "), line("# expect: "))
}

/// The cells of the line of a `kubectl get` table that starts with `start` (`NAME`: the
/// header).
fn cells<'a>(table: &'a str, start: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or("")
        .split_whitespace()
        .collect()
}

fn quickstart() -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let mut text = String::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("quickstart")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        text.push_str("---\n");
        text.push_str(&std::fs::read_to_string(f).expect("read"));
        text.push('\n');
    }
    text
}

fn dyn_api(client: &kube::Client, ns: &str, kind: Kind) -> Api<kube::api::DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &poolkeeper_source_kube::objects::api_resource(kind),
    )
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crds_apply_without_warnings_and_admission_refuses_what_validate_refuses() {
    let Some(c) = cluster().await else { return };
    let warnings = c.apply_crds();
    assert!(
        !warnings.to_lowercase().contains("warning"),
        "applying the CRDs warned: {warnings}"
    );
    let ns = c.namespace("admission");
    for f in fixtures("refused") {
        let text = std::fs::read_to_string(&f).expect("read");
        let (field, message) = expectation(&text);
        // The controller's own validation refuses it, naming the field...
        let parsed: Vec<String> = poolkeeper_source_dir::loader::parse_text(&f, &text)
            .diagnostics
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            parsed
                .iter()
                .any(|d| d.contains(&field) && d.contains(&message)),
            "{}: validate said {parsed:?}, not {field}: {message}",
            f.display()
        );
        // ...and so does the API server, at admission, with the same message.
        let out = c.kubectl_in(&["create", "-n", &ns, "-f", "-"], Some(&text));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: admitted", f.display());
        assert!(
            err.contains(&message)
                && (!field.starts_with("spec") || err.contains(&format!("{field}: Invalid value"))),
            "{}: the API server said {err}",
            f.display()
        );
    }
    // What CEL cannot say is admitted (and refused by the controller: see below).
    for f in fixtures("controller-only") {
        let text = std::fs::read_to_string(&f).expect("read");
        let (field, _) = expectation(&text);
        let parsed = poolkeeper_source_dir::loader::parse_text(&f, &text).diagnostics;
        assert!(
            parsed.iter().any(|d| d.path == field),
            "{}: validate said {parsed:?}, nothing of {field}",
            f.display()
        );
        let out = c.kubectl_in(
            &["create", "--dry-run=server", "-n", &ns, "-f", "-"],
            Some(&text),
        );
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.cleanup(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_binds_shows_status_waits_and_deletes_through_the_finalizer() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("quickstart");
    let (ctl, _state) = c.leading_controller(&ns, "e2e-a").await;
    // The quickstart, unchanged, plus one object that only the controller refuses.
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&quickstart()));
    let cycle = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/controller-only/deployment-cycle.yaml"),
    )
    .expect("read");
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&cycle));

    c.wait_bound(&ns, &["alice-web", "bob-python"]);

    // Printer columns, with values.
    let pools = eventually(
        "pools show their warm counts",
        Duration::from_secs(30),
        async || {
            let out = c.kubectl_ok(&["get", "pools", "-n", &ns], None);
            out.lines()
                .any(|l| l.starts_with("nginx") && l.split_whitespace().nth(1) == Some("5"))
                .then_some(out)
        },
    )
    .await;
    let header = cells(&pools, "NAME");
    assert_eq!(
        header,
        ["NAME", "WARM", "BOUND", "QUEUED", "READY", "AGE"],
        "{pools}"
    );
    let nginx = cells(&pools, "nginx");
    assert_eq!(&nginx[1..5], ["5", "1", "0", "True"], "{pools}");
    let claims = c.kubectl_ok(&["get", "claims", "-n", &ns], None);
    let header = cells(&claims, "NAME");
    assert_eq!(
        header,
        ["NAME", "PHASE", "POOL", "USER", "ENDPOINT", "AGE"],
        "{claims}"
    );
    let alice = cells(&claims, "alice-web");
    assert_eq!(&alice[1..4], ["Bound", "nginx", "alice"], "{claims}");
    assert!(alice[4].starts_with("127.0.0.1:80"), "{claims}");

    // The status: observedGeneration, conditions per the API conventions.
    let status = claim_status(&c.admin, &ns, "alice-web")
        .await
        .expect("status");
    assert_eq!(status["observedGeneration"], 1, "{status}");
    let bound = condition(&status, "Bound").expect("Bound condition");
    assert_eq!(bound["status"], "True");
    assert!(
        bound["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    // The controller-only refusal: SpecValid=False naming the field, and an Event.
    let dep = eventually(
        "the cycle is refused on its status",
        Duration::from_secs(30),
        async || {
            let s = status_of(&c.admin, &ns, Kind::Deployment, "cycle").await?;
            condition(&s, "SpecValid")
                .is_some_and(|c| c["status"] == "False")
                .then_some(s)
        },
    )
    .await;
    let valid = condition(&dep, "SpecValid").expect("SpecValid");
    assert!(
        valid["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.containers") && m.contains("cycle")),
        "{dep}"
    );
    let described = eventually(
        "the refusal is an Event",
        Duration::from_secs(30),
        async || {
            let out = c.kubectl_ok(
                &["describe", "deployments.poolkeeper.dev", "cycle", "-n", &ns],
                None,
            );
            out.contains("InvalidSpec").then_some(out)
        },
    )
    .await;
    assert!(described.contains("SpecValid"), "{described}");
    // The valid objects beside it are unaffected (bound above).

    // A user's token from a Secret (tokenSecretRef): the API takes it.
    c.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "carol-token",
            "-n",
            &ns,
            "--from-literal=token=carol-secret-token-0123",
        ],
        None,
    );
    c.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some("apiVersion: poolkeeper.dev/v1alpha1\nkind: User\nmetadata: {name: carol}\nspec: {tokenSecretRef: {name: carol-token, key: token}}\n"),
    );
    eventually(
        "carol's token from her Secret is accepted",
        Duration::from_secs(30),
        async || {
            let (code, _) = poolkeeper_e2e_kube::http_get_as(
                &ctl.api,
                "/api/v1/claims",
                "carol-secret-token-0123",
            )
            .ok()?;
            (code == 200).then_some(())
        },
    )
    .await;
    let (code, _) =
        poolkeeper_e2e_kube::http_get_as(&ctl.api, "/api/v1/claims", "not-carols").expect("get");
    assert_eq!(code, 401);

    // Deleting a claim: its finalizer holds it until its instance is reset.
    let instance = status["instance"].as_str().expect("instance").to_owned();
    let claim = dyn_api(&c.admin, &ns, Kind::Claim)
        .get("alice-web")
        .await
        .expect("claim");
    assert!(
        claim
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == "poolkeeper.dev/cleanup")),
        "{:?}",
        claim.metadata
    );
    c.kubectl_ok(
        &["delete", "claim", "alice-web", "-n", &ns, "--timeout=60s"],
        None,
    );
    let listed = ctl.rt.list().await.expect("list");
    assert!(
        listed.iter().all(|i| i.name != instance),
        "{instance} still runs after its claim was deleted"
    );
    ctl.inner.stop().await.expect("stopped");
    c.cleanup(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_keeps_every_binding_and_binds_nothing_twice() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("restart");
    let config = c.service_account(&ns, std::slice::from_ref(&ns));
    let state = tempfile::tempdir().expect("tempdir");
    // The runtime outlives the controller, as a Docker daemon does.
    let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
    let mut ctl = start_controller(&config, &ns, state.path(), "e2e-a", Some(rt.clone()), None);
    ctl.inner.leading().await;
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&quickstart()));
    let mut claims = String::new();
    for i in 0..6 {
        claims.push_str(&format!(
            "---\napiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {{name: extra-{i}}}\nspec: {{pool: python, user: {}}}\n",
            if i % 2 == 0 { "alice" } else { "bob" }
        ));
    }
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&claims));
    let names: Vec<String> = ["alice-web", "bob-python"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..6).map(|i| format!("extra-{i}")))
        .collect();
    // alice has maxClaims 3 in the quickstart: some extras wait; the bound ones are recorded.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut before = Vec::new();
    for n in &names {
        if let Some(s) = claim_status(&c.admin, &ns, n).await
            && s["phase"] == "Bound"
        {
            before.push((n.clone(), s["instance"].as_str().unwrap_or("").to_owned()));
        }
    }
    assert!(before.len() >= 4, "{before:?}");
    ctl.inner.kill();
    let mut ctl = start_controller(&config, &ns, state.path(), "e2e-a", Some(rt.clone()), None);
    assert_eq!(
        ctl.inner.leading().await,
        poolkeeper::kube_mode::Phase::Leading
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (n, inst) in &before {
        let s = claim_status(&c.admin, &ns, n).await.expect("status");
        assert_eq!(s["phase"], "Bound", "{n}: {s}");
        assert_eq!(s["instance"].as_str(), Some(inst.as_str()), "{n} was moved");
    }
    let mut instances: Vec<String> = Vec::new();
    for n in &names {
        if let Some(s) = claim_status(&c.admin, &ns, n).await
            && s["phase"] == "Bound"
        {
            instances.push(s["instance"].as_str().unwrap_or("").to_owned());
        }
    }
    let mut unique = instances.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        instances.len(),
        "an instance bound twice: {instances:?}"
    );
    ctl.inner.stop().await.expect("stopped");
    c.cleanup(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_controllers_one_leads_and_the_standby_takes_over_when_it_dies() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("lease");
    let config = c.service_account(&ns, std::slice::from_ref(&ns));
    let (sa, sb) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
    let mut a = start_controller(&config, &ns, sa.path(), "replica-a", Some(rt.clone()), None);
    assert_eq!(
        a.inner.leading().await,
        poolkeeper::kube_mode::Phase::Leading
    );
    let b = start_controller(&config, &ns, sb.path(), "replica-b", Some(rt.clone()), None);
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&quickstart()));
    eventually("alice-web is bound", Duration::from_secs(30), async || {
        let s = claim_status(&c.admin, &ns, "alice-web").await?;
        (s["phase"] == "Bound").then_some(())
    })
    .await;
    // The standby acts in no way: it wrote nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        *b.inner.phase.borrow(),
        poolkeeper::kube_mode::Phase::Standby
    );
    assert_eq!(b.inner.counters.total(), 0, "the standby wrote");
    // The leader dies (no graceful release): the standby takes over within the lease
    // duration and a renewal period or two (it measures from when it saw the last renewal).
    let died = std::time::Instant::now();
    a.inner.kill();
    let mut b = b;
    let phase = tokio::time::timeout(Duration::from_secs(25), b.inner.leading())
        .await
        .expect("the standby never took over");
    assert_eq!(phase, poolkeeper::kube_mode::Phase::Leading);
    let took = died.elapsed();
    assert!(
        took >= Duration::from_secs(10),
        "took over after {took:?}: too early"
    );
    eprintln!("the standby took over {took:?} after the leader died");
    // It acts: a new claim is bound.
    c.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some("apiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {name: after}\nspec: {pool: node, user: alice}\n"),
    );
    eventually(
        "the new leader binds",
        Duration::from_secs(30),
        async || {
            let s = claim_status(&c.admin, &ns, "after").await?;
            (s["phase"] == "Bound").then_some(())
        },
    )
    .await;
    b.inner.stop().await.expect("stopped");
    c.cleanup(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_is_reported_and_the_controller_recovers() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("outage");
    let config = c.service_account(&ns, std::slice::from_ref(&ns));
    let (proxy, through) = Proxy::start(&config).await.expect("proxy");
    let state = tempfile::tempdir().expect("tempdir");
    // A Lease long enough for the outage: renewals go through the proxy too, and a leader
    // that cannot renew for its whole deadline stops acting (and is restarted by its
    // supervisor, as client-go's controllers are).
    let mut ctl = start_controller(
        &through,
        &ns,
        state.path(),
        "e2e-a",
        None,
        Some(Duration::from_secs(120)),
    );
    ctl.inner.leading().await;
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&quickstart()));
    eventually("alice-web is bound", Duration::from_secs(30), async || {
        let s = claim_status(&c.admin, &ns, "alice-web").await?;
        (s["phase"] == "Bound").then_some(())
    })
    .await;
    let running_before = ctl.rt.list().await.expect("list").len();
    proxy.set_up(false);
    let (code, body) = eventually(
        "readyz says the API server is away",
        Duration::from_secs(30),
        async || {
            let (code, body) = http_get(&ctl.api, "/readyz").ok()?;
            (code == 503).then_some((code, body))
        },
    )
    .await;
    assert_eq!(code, 503);
    assert!(body.contains("watching"), "{body}");
    // What runs keeps running.
    assert_eq!(ctl.rt.list().await.expect("list").len(), running_before);
    // A claim made meanwhile is bound once the server is back.
    c.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some("apiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {name: during}\nspec: {pool: node, user: alice}\n"),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set_up(true);
    eventually("readyz recovers", Duration::from_secs(60), async || {
        let (code, _) = http_get(&ctl.api, "/readyz").ok()?;
        (code == 200).then_some(())
    })
    .await;
    eventually(
        "the claim made during the outage is bound",
        Duration::from_secs(60),
        async || {
            let s = claim_status(&c.admin, &ns, "during").await?;
            (s["phase"] == "Bound").then_some(())
        },
    )
    .await;
    let _ = ctl.inner.stop().await;
    c.cleanup(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_sets_the_warm_floor_that_autoscale_raises() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("autoscale");
    let (_ctl, _state) = c.leading_controller(&ns, "e2e-scale").await;
    c.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some(
            "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {name: elastic}
spec:
  template: {image: x}
  warm: 0
  max: 10
  autoscale: {buffer: \"100%\", min: 1, scaleDownCooldown: 1s}
",
        ),
    );
    let status = async |want: &dyn Fn(&Value) -> bool| {
        let s = status_of(&c.admin, &ns, Kind::Pool, "elastic").await?;
        want(&s).then_some(s)
    };
    let s = eventually("min keeps one warm", Duration::from_secs(30), async || {
        status(&|s| s["warm"] == 1 && s["desiredWarm"] == 1).await
    })
    .await;
    assert_eq!(s["scaling"]["policy"], "min", "{s}");
    assert_eq!(s["selector"], "poolkeeper.dev/pool=elastic", "{s}");
    assert_eq!(
        condition(&s, "ScalingLimited").map(|c| c["status"].clone()),
        Some(Value::from("False")),
        "{s}"
    );

    // kubectl scale sets spec.warm: a floor above min, which wins.
    c.kubectl_ok(&["scale", "-n", &ns, "pool/elastic", "--replicas=3"], None);
    let s = eventually("warm 3 decides", Duration::from_secs(30), async || {
        status(&|s| s["warm"] == 3 && s["scaling"]["policy"] == "warm").await
    })
    .await;
    assert_eq!(s["desiredWarm"], 3, "{s}");
    let scale: Value = serde_json::from_str(&c.kubectl_ok(
        &[
            "get",
            "--raw",
            &format!("/apis/poolkeeper.dev/v1alpha1/namespaces/{ns}/pools/elastic/scale"),
        ],
        None,
    ))
    .expect("the scale subresource is JSON");
    assert_eq!(scale["spec"]["replicas"], 3, "{scale}");
    assert_eq!(scale["status"]["replicas"], 3, "{scale}");
    assert_eq!(
        scale["status"]["selector"], "poolkeeper.dev/pool=elastic",
        "{scale}"
    );
    c.cleanup(&ns);
}

/// A condition another controller sets on a Pool's status (server-side apply, its own field
/// manager) is its own: the controller's status writes, forced, leave it alone, since the CRDs
/// merge conditions by type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_another_controller_sets_survives_the_controllers_status_writes() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("conditions");
    let (_ctl, _state) = c.leading_controller(&ns, "e2e-conditions").await;
    let pool = |warm: u32| {
        format!(
            "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: shared}}
spec: {{template: {{image: x}}, warm: {warm}}}
"
        )
    };
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&pool(1)));
    let warm = async |n: u64| {
        eventually(&format!("warm {n}"), Duration::from_secs(30), async || {
            let s = status_of(&c.admin, &ns, Kind::Pool, "shared").await?;
            let ready = condition(&s, "Ready").is_some_and(|r| r["status"] == "True");
            (s["warm"] == n && ready).then_some(s)
        })
        .await
    };
    warm(1).await;

    let audited = serde_json::json!({
        "apiVersion": "poolkeeper.dev/v1alpha1",
        "kind": "Pool",
        "status": {"conditions": [{
            "type": "example.com/Audited",
            "status": "True",
            "reason": "PolicyChecked",
            "message": "checked by the auditor",
            "lastTransitionTime": "2026-12-07T00:00:00Z",
        }]},
    });
    dyn_api(&c.admin, &ns, Kind::Pool)
        .patch_status(
            "shared",
            &kube::api::PatchParams::apply("auditor"),
            &kube::api::Patch::Apply(&audited),
        )
        .await
        .expect("another field manager applies its own condition without a conflict");

    // The controller writes the status again (the pool grows), forced, as it always does.
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&pool(2)));
    let s = warm(2).await;
    let theirs = condition(&s, "example.com/Audited").unwrap_or_else(|| panic!("gone: {s}"));
    assert_eq!(theirs["reason"], "PolicyChecked", "{s}");
    c.cleanup(&ns);
}

/// `poolkeeper admission` applied: Pools and Claims carry the finalizer from their create, so
/// the controller writes none on the way to Bound; a claim made with a finalizer of its own keeps
/// it beside ours; deleting a claim still goes through its cleanup (the one finalizer write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_policy_sets_the_finalizer_at_create_and_the_controller_writes_none() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    // MutatingAdmissionPolicy is served from Kubernetes 1.36 (GA).
    let served = c.kubectl_ok(
        &[
            "api-resources",
            "--api-group=admissionregistration.k8s.io",
            "-o",
            "name",
        ],
        None,
    );
    if !served.contains("mutatingadmissionpolicies") {
        eprintln!("skipped: this API server does not serve MutatingAdmissionPolicy (1.36+)");
        return;
    }
    c.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&poolkeeper_source_kube::admission::yaml(&[])),
    );
    let ns = c.namespace("admission");
    // The policy takes effect once the API server has loaded it: a dry run shows when.
    let probe = "apiVersion: poolkeeper.dev/v1alpha1
kind: Claim
metadata: {name: probe}
spec: {pool: none, user: none}
";
    let gets_finalizer = async |in_ns: &str| {
        let out = c.kubectl_in(
            &[
                "create",
                "--dry-run=server",
                "-o",
                "json",
                "-n",
                in_ns,
                "-f",
                "-",
            ],
            Some(probe),
        );
        String::from_utf8_lossy(&out.stdout).contains(FINALIZER)
    };
    eventually(
        "the policy is in effect",
        Duration::from_secs(30),
        async || gets_finalizer(&ns).await.then_some(()),
    )
    .await;

    let (ctl, _state) = c.leading_controller(&ns, "e2e-admission").await;
    c.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some(
            "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {name: web}
spec: {template: {image: x}, warm: 2}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {name: ann}
spec: {}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Claim
metadata: {name: plain}
spec: {pool: web, user: ann}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Claim
metadata: {name: guarded, finalizers: [example.com/keep]}
spec: {pool: web, user: ann}
",
        ),
    );
    c.wait_bound(&ns, &["plain", "guarded"]);
    let finalizers = async |kind, name: &str| {
        dyn_api(&c.admin, &ns, kind)
            .get(name)
            .await
            .expect("get")
            .metadata
            .finalizers
            .unwrap_or_default()
    };
    assert_eq!(finalizers(Kind::Claim, "plain").await, [FINALIZER]);
    assert_eq!(
        finalizers(Kind::Claim, "guarded").await,
        ["example.com/keep", FINALIZER]
    );
    assert_eq!(finalizers(Kind::Pool, "web").await, [FINALIZER]);
    let finalizer_writes = || ctl.inner.counters.finalizers.load(Ordering::Relaxed);
    assert_eq!(finalizer_writes(), 0, "the controller added a finalizer");

    // Deleting: the cleanup resets the instance and removes our finalizer (its one write); a
    // finalizer of the claim's own still holds the object.
    c.kubectl_ok(
        &["delete", "claim", "plain", "-n", &ns, "--timeout=60s"],
        None,
    );
    c.kubectl_ok(
        &["delete", "claim", "guarded", "-n", &ns, "--wait=false"],
        None,
    );
    eventually(
        "only the claim's own finalizer is left",
        Duration::from_secs(30),
        async || (finalizers(Kind::Claim, "guarded").await == ["example.com/keep"]).then_some(()),
    )
    .await;
    assert_eq!(finalizer_writes(), 2);
    eventually(
        "the pool is warm again at 2",
        Duration::from_secs(30),
        async || {
            let s = status_of(&c.admin, &ns, Kind::Pool, "web").await?;
            (s["warm"] == 2 && s["bound"] == 0).then_some(())
        },
    )
    .await;
    c.kubectl_ok(
        &[
            "patch",
            "claim",
            "guarded",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    ctl.inner.stop().await.expect("stopped");

    // Bound to the controller's namespaces (`poolkeeper admission --namespace NS`): an object
    // elsewhere, which no controller would clean up, gets no finalizer; then the policy goes
    // back to every namespace, as the other tests may find it.
    let elsewhere = c.namespace("admission-elsewhere");
    c.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&poolkeeper_source_kube::admission::yaml(
            std::slice::from_ref(&ns),
        )),
    );
    eventually(
        "the binding is the controller's namespace's only",
        Duration::from_secs(30),
        async || (!gets_finalizer(&elsewhere).await && gets_finalizer(&ns).await).then_some(()),
    )
    .await;
    c.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&poolkeeper_source_kube::admission::yaml(&[])),
    );
    c.cleanup(&elsewhere);
    c.cleanup(&ns);
}

/// A controller started without its store (a new disk, or the first start beside claims GitOps
/// made already) queues the claims in the order they were created, although the API server
/// lists them by name: the one created first is bound first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_without_its_store_queues_the_claims_in_the_order_they_were_created() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("order");
    let config = c.service_account(&ns, std::slice::from_ref(&ns));
    // One instance at most, so one claim is bound and the others wait in order. Names run the
    // other way round from creation; creationTimestamp counts whole seconds.
    let setup = "apiVersion: poolkeeper.dev/v1alpha1\nkind: Pool\nmetadata: {name: one}\n\
        spec: {template: {image: x, ports: [{name: http, containerPort: 80}]}, warm: 1, max: 1, \
        hostPorts: {start: 43100, end: 43110}}\n---\napiVersion: poolkeeper.dev/v1alpha1\n\
        kind: User\nmetadata: {name: carol}\nspec: {quota: {maxClaims: 5}}\n";
    c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(setup));
    for (i, name) in ["c-first", "b-second", "a-last"].iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let claim = format!(
            "apiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {{name: {name}}}\n\
             spec: {{pool: one, user: carol}}\n"
        );
        c.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&claim));
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mut ctl = start_controller(&config, &ns, state.path(), "e2e-order", None, None);
    ctl.inner.leading().await;
    let want = [
        ("c-first", "Bound", None),
        ("b-second", "Pending", Some(1)),
        ("a-last", "Pending", Some(2)),
    ];
    eventually(
        "c-first bound, b-second and a-last waiting at 1 and 2",
        Duration::from_secs(30),
        async || {
            for (name, phase, position) in want {
                let s = claim_status(&c.admin, &ns, name).await?;
                if s["phase"] != phase || s["queuePosition"].as_u64() != position {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    ctl.inner.stop().await.expect("stopped");
    c.cleanup(&ns);
}

/// A reservation whose claim ended (its TTL ran out) is made afresh by the next provision: the
/// ended claim is deleted and, once it has gone through its finalizer, made again. A creation
/// before it had gone found the old claim and answered the provision as a duplicate, while the
/// old claim then went: no claim, and the booking system told it runs. While another's
/// finalizer holds the ended claim, the provision is answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_reservation_is_made_afresh_once_its_claim_went_through_the_finalizer() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = c.namespace("webhook");
    c.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some(
            "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {name: short}
spec:
  template: {image: python}
  claimTTL: 2s
  warm: 1
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {name: bob}
spec: {quota: {maxClaims: 2}}
",
        ),
    );
    let config = c.service_account(&ns, std::slice::from_ref(&ns));
    let state = tempfile::tempdir().expect("tempdir");
    let secret = b"e2e-webhook-secret".to_vec();
    let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
    let (mut ctl, api) = poolkeeper_e2e_kube::start_with_webhooks(
        rt,
        &config,
        &ns,
        state.path(),
        "e2e-webhook",
        None,
        Some(poolkeeper_http::WebhookConfig {
            secret: secret.clone(),
            allowed_images: Vec::new(),
            notify: None,
        }),
    );
    ctl.leading().await;
    let provision = r#"{"event": "provision", "resource_name": "Desk 9", "username": "bob",
                        "custom_parameters": {"image": "python"}}"#;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let post = |ts: u64| {
        let (code, body) =
            poolkeeper_e2e_kube::post_reservation(&api, provision, &secret, ts).expect("post");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        (code, v)
    };
    let (code, v) = post(now);
    assert_eq!(code, 201, "{v}");
    let name = v["claim"].as_str().expect("claim").to_owned();
    let phase_is = async |phase: &str| {
        let s = status_of(&c.admin, &ns, Kind::Claim, &name).await?;
        (s["phase"] == phase).then_some(())
    };
    eventually(
        "the reservation expires",
        Duration::from_secs(60),
        async || phase_is("Expired").await,
    )
    .await;
    let (code, v) = post(now + 1);
    assert_eq!(
        (code, v["created"].clone()),
        (201, Value::Bool(true)),
        "{v}"
    );
    eventually(
        "made afresh and bound",
        Duration::from_secs(60),
        async || phase_is("Bound").await,
    )
    .await;
    // Ended again, and held by another's finalizer: its name stays taken, so the provision
    // is answered 503 (send it again), not as a duplicate nor as a conflict, and is not taken
    // for received.
    eventually(
        "the reservation expires again",
        Duration::from_secs(60),
        async || phase_is("Expired").await,
    )
    .await;
    const HOLD: &str = "e2e.poolkeeper.dev/hold";
    c.kubectl_ok(
        &[
            "patch",
            "claim",
            &name,
            "-n",
            &ns,
            "--type=json",
            "-p",
            &format!(r#"[{{"op":"add","path":"/metadata/finalizers/-","value":"{HOLD}"}}]"#),
        ],
        None,
    );
    let (code, v) = post(now + 2);
    assert_eq!(code, 503, "{v}");
    let finalizers = c.kubectl_ok(
        &[
            "get",
            "claim",
            &name,
            "-n",
            &ns,
            "-o",
            "jsonpath={.metadata.finalizers}",
        ],
        None,
    );
    assert_eq!(finalizers, format!(r#"["{HOLD}"]"#), "its own went");
    // Once let go, the same request, sent again, makes it.
    c.kubectl_ok(
        &[
            "patch",
            "claim",
            &name,
            "-n",
            &ns,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    let (code, v) = post(now + 2);
    assert_eq!(
        (code, v["created"].clone()),
        (201, Value::Bool(true)),
        "{v}"
    );
    eventually(
        "made afresh once more and bound",
        Duration::from_secs(60),
        async || phase_is("Bound").await,
    )
    .await;
    c.cleanup(&ns);
}
