//! The Kubernetes runtime (`--runtime kube`) against the API server `KUBECONFIG` names, with
//! the controller acting as exactly the roles `poolkeeper rbac --pod-namespace` prints.
//!
//! The suite needs only an API server: where no kubelet runs (a bare kube-apiserver, envtest),
//! [`kubelet`] stands in for one by setting each pod's status through `pods/status` (Running,
//! Ready). What needs real nodes is not covered here: exec (files, `Exec` resets), logs, and
//! endpoints that answer; each test says which parts it leaves out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use poolkeeper_e2e_kube::{Cluster, cluster, eventually, start_on};
use poolkeeper_runtime::{
    LABEL_BOUND_AT, LABEL_CLAIM, LABEL_POOL, LABEL_QUARANTINED, LABEL_USER, LABEL_USER_BOUND_AT,
    RecordedBinding, Runtime, RuntimeError,
};
use poolkeeper_runtime_kube::{KubeRuntime, KubeRuntimeConfig};
use poolkeeper_source_kube::kube::api::{Api, ListParams};

/// Stands in for the kubelet of a cluster without nodes (pods reported Running and Ready).
fn kubelet(c: &Cluster, ns: &str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(poolkeeper_runtime_kube::standin::kubelet(
        c.admin.clone(),
        ns.to_owned(),
    ))
}

/// A namespace of the test's own, with the `default` ServiceAccount pods run as (a cluster's
/// controller-manager makes it; a bare API server has none).
fn pod_namespace(c: &Cluster, name: &str) -> String {
    let ns = c.namespace(name);
    c.kubectl_ok(&["create", "serviceaccount", "default", "-n", &ns], None);
    ns
}

/// The cluster with the CRDs, a namespace of the test's own, the controller's identity there
/// (exactly `poolkeeper rbac --pod-namespace`'s roles) and the kubelet stand-in.
async fn setup(
    name: &str,
) -> Option<(
    Cluster,
    String,
    poolkeeper_source_kube::kube::Config,
    tokio::task::JoinHandle<()>,
)> {
    let c = cluster().await?;
    c.apply_crds();
    let ns = pod_namespace(&c, name);
    let config = c.service_account_with(&ns, std::slice::from_ref(&ns), Some(&ns));
    let kubelet = kubelet(&c, &ns);
    Some((c, ns, config, kubelet))
}

fn pool_yaml(ns: &str, warm: u32) -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: Pool\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  warm: {warm}\n  max: 6\n  template:\n    image: pk-test:latest\n    \
         ports: [{{name: http, containerPort: 8080}}]\n---\n\
         apiVersion: poolkeeper.dev/v1alpha1\nkind: User\nmetadata: {{name: alice, namespace: {ns}}}\n\
         spec: {{quota: {{maxClaims: 5}}}}\n"
    )
}

fn claim_yaml(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{pool: web, user: alice}}\n"
    )
}

async fn pods_of(c: &Cluster, ns: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(c.admin.clone(), ns);
    let lp = ListParams::default().labels(&format!("{LABEL_POOL}=web"));
    api.list(&lp)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// Which pod records which claim.
async fn recorded(c: &Cluster, ns: &str) -> BTreeMap<String, String> {
    pods_of(c, ns)
        .await
        .into_iter()
        .filter_map(|p| {
            let claim = p.metadata.labels.as_ref()?.get(LABEL_CLAIM)?.clone();
            Some((claim, p.metadata.name.clone()?))
        })
        .collect()
}

fn jsonpath(c: &Cluster, ns: &str, obj: &str, path: &str) -> String {
    let out = c.kubectl(&["get", obj, "-n", ns, "-o", &format!("jsonpath={path}")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn runtime(c: &Cluster, config: &poolkeeper_source_kube::kube::Config, ns: &str) -> KubeRuntime {
    let _ = c;
    let client = poolkeeper_source_kube::kube::Client::try_from(config.clone()).expect("client");
    KubeRuntime::new(
        client,
        KubeRuntimeConfig {
            namespace: ns.to_owned(),
            controller_id: "e2e".to_owned(),
            grace_seconds: 0,
        },
    )
}

/// A controller on the pod runtime in `ns`, once it leads.
async fn leading(
    c: &Cluster,
    config: &poolkeeper_source_kube::kube::Config,
    ns: &str,
    state: &std::path::Path,
    identity: &str,
) -> poolkeeper::kube_mode::KubeController {
    let rt = Arc::new(runtime(c, config, ns));
    let (mut ctl, _) = start_on(rt, config, ns, state, identity, None);
    ctl.leading().await;
    ctl
}

/// Not covered without nodes: the endpoint answering (no container runs), files and `Exec`
/// resets (pods/exec needs a kubelet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_pods_fills_binds_on_the_pod_resets_and_replaces_a_pod_deleted_by_hand() {
    let Some((c, ns, config, _kubelet)) = setup("pods").await else {
        return;
    };
    let state = tempfile::tempdir().expect("tempdir");
    let ctl = leading(&c, &config, &ns, state.path(), "e2e-a").await;
    c.kubectl_ok(&["apply", "-f", "-"], Some(&pool_yaml(&ns, 2)));

    // The pool fills with pods that carry its labels and an ownerReference to the Pool, each
    // with its Service.
    let pods = eventually("two warm pods", Duration::from_secs(60), async || {
        let warm = jsonpath(&c, &ns, "pool/web", "{.status.warm}");
        let pods = pods_of(&c, &ns).await;
        (warm == "2" && pods.len() == 2).then_some(pods)
    })
    .await;
    let uid = jsonpath(&c, &ns, "pool/web", "{.metadata.uid}");
    let services: Api<Service> = Api::namespaced(c.admin.clone(), &ns);
    for p in &pods {
        let refs = p.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(refs.len(), 1, "{:?}", p.metadata);
        assert_eq!(
            (refs[0].kind.as_str(), refs[0].uid.as_str()),
            ("Pool", uid.as_str())
        );
        let name = p.metadata.name.clone().unwrap_or_default();
        let svc = services.get(&name).await.expect("a Service per instance");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        let sc = p
            .spec
            .as_ref()
            .and_then(|s| s.containers[0].security_context.clone());
        assert_eq!(sc.and_then(|s| s.allow_privilege_escalation), Some(false));
    }

    // A claim binds: the pod records it before the claim says Bound, and the endpoint is the
    // instance's Service.
    c.kubectl_ok(&["apply", "-f", "-"], Some(&claim_yaml(&ns, "c1")));
    c.wait_bound(&ns, &["c1"]);
    let instance = jsonpath(&c, &ns, "claim/c1", "{.status.instance}");
    let on_pods = recorded(&c, &ns).await;
    assert_eq!(on_pods.get("c1"), Some(&instance), "{on_pods:?}");
    // With its user: a claim moved to another user is not handed this pod by a controller
    // that lost its store.
    let pods = pods_of(&c, &ns).await;
    let pod = pods
        .into_iter()
        .find(|p| p.metadata.name.as_ref() == Some(&instance));
    let labels = pod.and_then(|p| p.metadata.labels).unwrap_or_default();
    assert_eq!(labels.get(LABEL_USER).map(String::as_str), Some("alice"));
    let endpoint = jsonpath(&c, &ns, "claim/c1", "{.status.endpoint.address}");
    assert_eq!(endpoint, format!("{instance}.{ns}.svc:8080"));

    // Release: the pod goes (Recreate) and the pool is refilled with a fresh one.
    c.kubectl_ok(&["delete", "claim", "c1", "-n", &ns, "--timeout=60s"], None);
    eventually(
        "the released pod is gone and two warm again",
        Duration::from_secs(60),
        async || {
            let pods = pods_of(&c, &ns).await;
            let names: Vec<String> = pods
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            let warm = jsonpath(&c, &ns, "pool/web", "{.status.warm}");
            (!names.contains(&instance) && names.len() == 2 && warm == "2").then_some(())
        },
    )
    .await;
    assert!(
        services.get_opt(&instance).await.expect("get").is_none(),
        "its Service went too"
    );

    // A pod deleted by hand is replaced.
    let victim = pods_of(&c, &ns).await[0]
        .metadata
        .name
        .clone()
        .expect("name");
    c.kubectl_ok(&["delete", "pod", &victim, "-n", &ns], None);
    eventually(
        "the deleted pod is replaced",
        Duration::from_secs(60),
        async || {
            let names: Vec<String> = pods_of(&c, &ns)
                .await
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            let warm = jsonpath(&c, &ns, "pool/web", "{.status.warm}");
            (!names.contains(&victim) && names.len() == 2 && warm == "2").then_some(())
        },
    )
    .await;
    ctl.stop().await.expect("stop");
    c.cleanup(&ns);
}

/// Not covered without nodes: files copied again after the restart (pods/exec).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_with_an_empty_state_folder_keeps_every_binding() {
    let Some((c, ns, config, _kubelet)) = setup("podsrestart").await else {
        return;
    };
    let first = tempfile::tempdir().expect("tempdir");
    let ctl = leading(&c, &config, &ns, first.path(), "e2e-a").await;
    c.kubectl_ok(&["apply", "-f", "-"], Some(&pool_yaml(&ns, 2)));
    for claim in ["c1", "c2"] {
        c.kubectl_ok(&["apply", "-f", "-"], Some(&claim_yaml(&ns, claim)));
    }
    c.wait_bound(&ns, &["c1", "c2"]);
    let before = recorded(&c, &ns).await;
    assert_eq!(before.len(), 2, "{before:?}");
    ctl.stop().await.expect("stop");

    // A new controller, as in a new pod: an empty state folder. The bindings come back from
    // the pods, and nothing is bound twice.
    let second = tempfile::tempdir().expect("tempdir");
    let ctl = leading(&c, &config, &ns, second.path(), "e2e-b").await;
    c.kubectl_ok(&["apply", "-f", "-"], Some(&claim_yaml(&ns, "c3")));
    c.wait_bound(&ns, &["c3"]);
    for claim in ["c1", "c2"] {
        let instance = eventually(
            "the claim still Bound to its pod",
            Duration::from_secs(30),
            async || {
                let phase = jsonpath(&c, &ns, &format!("claim/{claim}"), "{.status.phase}");
                let i = jsonpath(&c, &ns, &format!("claim/{claim}"), "{.status.instance}");
                (phase == "Bound" && !i.is_empty()).then_some(i)
            },
        )
        .await;
        assert_eq!(before.get(claim), Some(&instance), "{claim} moved");
    }
    let after = recorded(&c, &ns).await;
    assert_eq!(after.len(), 3, "{after:?}");
    let distinct: std::collections::BTreeSet<&String> = after.values().collect();
    assert_eq!(distinct.len(), 3, "a pod bound twice: {after:?}");
    ctl.stop().await.expect("stop");
    c.cleanup(&ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_racing_for_one_pod_bind_it_once() {
    let Some(c) = cluster().await else { return };
    c.apply_crds();
    let ns = pod_namespace(&c, "podsrace");
    let config = c.service_account_with(&ns, std::slice::from_ref(&ns), Some(&ns));
    let a = runtime(&c, &config, &ns);
    let b = runtime(&c, &config, &ns);
    let labels = Arc::new(BTreeMap::from([
        ("poolkeeper.dev/managed".to_owned(), "true".to_owned()),
        (LABEL_POOL.to_owned(), "race".to_owned()),
    ]));
    let spec = poolkeeper_runtime::InstanceSpec::plain("race-1", "pk-test:latest", labels);
    a.create(spec).await.expect("create");
    // Both have seen the pod at the same version.
    assert_eq!(a.list().await.expect("list").len(), 1);
    assert_eq!(b.list().await.expect("list").len(), 1);
    for round in 0..5 {
        let claim_a = format!("a{round}");
        let claim_b = format!("b{round}");
        let (ra, rb) = tokio::join!(
            a.bind("race-1", Some(RecordedBinding::new(&claim_a, "u", 1))),
            b.bind("race-1", Some(RecordedBinding::new(&claim_b, "u", 2)))
        );
        let won: Vec<&str> = [(&ra, claim_a.as_str()), (&rb, claim_b.as_str())]
            .iter()
            .filter(|(r, _)| r.is_ok())
            .map(|(_, c)| *c)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {ra:?} {rb:?}");
        let loser = if ra.is_ok() { &rb } else { &ra };
        assert!(
            matches!(loser, Err(RuntimeError::Conflict { .. })),
            "round {round}: {loser:?}"
        );
        let pods: Api<Pod> = Api::namespaced(c.admin.clone(), &ns);
        let pod = pods.get("race-1").await.expect("pod");
        let label = pod
            .metadata
            .labels
            .and_then(|l| l.get(LABEL_CLAIM).cloned());
        assert_eq!(label.as_deref(), Some(won[0]), "round {round}");
        // Released by the winner, and refreshed in both views, for the next round.
        let winner = if ra.is_ok() { &a } else { &b };
        winner.bind("race-1", None).await.expect("unbind");
        a.list().await.expect("list");
        b.list().await.expect("list");
    }
    // Unbound, all four binding labels are gone; a quarantine is recorded on the pod.
    a.quarantine("race-1").await.expect("quarantine");
    let pods: Api<Pod> = Api::namespaced(c.admin.clone(), &ns);
    let labels = pods.get("race-1").await.expect("pod").metadata.labels;
    let labels = labels.unwrap_or_default();
    assert_eq!(
        labels.get(LABEL_QUARANTINED).map(String::as_str),
        Some("true")
    );
    for gone in [LABEL_CLAIM, LABEL_BOUND_AT, LABEL_USER, LABEL_USER_BOUND_AT] {
        assert!(!labels.contains_key(gone), "{gone}: {labels:?}");
    }
    a.remove("race-1").await.expect("remove");
    c.cleanup(&ns);
}

/// A deployment on the pod runtime: each container a pod, in dependency order, reachable by
/// its name (a headless Service), its network a NetworkPolicy, its named volume a
/// PersistentVolumeClaim; deleting it removes them all. Not covered without nodes: the
/// containers reaching each other, and the volume's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_runs_as_pods_with_services_a_network_policy_and_a_volume_claim() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let Some((c, ns, config, _kubelet)) = setup("podsdep").await else {
        return;
    };
    let state = tempfile::tempdir().expect("tempdir");
    let ctl = leading(&c, &config, &ns, state.path(), "e2e-a").await;
    let dep = |web_stopped: bool| {
        format!(
            "apiVersion: poolkeeper.dev/v1alpha1\nkind: Deployment\nmetadata: {{name: stack, namespace: {ns}}}\n\
             spec:\n  network: stack\n  containers:\n  - name: db\n    image: pk-test:latest\n    \
             init: true\n    volumes: {{data: {{bind: /var/lib/db}}}}\n  - name: web\n    image: pk-test:latest\n    \
             dependsOn: [db]\n    ports: {{\"8080/tcp\": 18481}}\n    stopped: {web_stopped}\n"
        )
    };
    c.kubectl_ok(&["apply", "-f", "-"], Some(&dep(false)));
    let pods: Api<Pod> = Api::namespaced(c.admin.clone(), &ns);
    let made = eventually(
        "both containers' pods",
        Duration::from_secs(60),
        async || {
            let list = pods
                .list(&ListParams::default().labels("poolkeeper.dev/deployment=stack"))
                .await
                .ok()?;
            (list.items.len() == 2).then_some(list.items)
        },
    )
    .await;
    let by_name = |n: &str| {
        made.iter()
            .find(|p| p.metadata.name.as_deref() == Some(n))
            .cloned()
            .unwrap_or_else(|| panic!("no pod {n}"))
    };
    let (db, web) = (by_name("stack-db"), by_name("stack-web"));
    // web was made only once db was ready: never before it.
    assert!(
        db.metadata.creation_timestamp <= web.metadata.creation_timestamp,
        "web before db"
    );
    let claim = db
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v[0].persistent_volume_claim.clone())
        .map(|c| c.claim_name);
    assert_eq!(claim.as_deref(), Some("stack-data"));
    assert_eq!(
        db.spec.as_ref().and_then(|s| s.share_process_namespace),
        Some(true),
        "init: the pause container is PID 1 and reaps zombies"
    );
    let host_port = web
        .spec
        .as_ref()
        .and_then(|s| s.containers[0].ports.as_ref())
        .and_then(|p| p[0].host_port);
    assert_eq!(
        host_port,
        Some(18481),
        "a published port is the pod's host port"
    );
    let services: Api<Service> = Api::namespaced(c.admin.clone(), &ns);
    for name in ["db", "web"] {
        let svc = services.get(name).await.expect("a Service per container");
        assert_eq!(
            svc.spec.and_then(|s| s.cluster_ip).as_deref(),
            Some("None"),
            "headless: the name resolves to the pods"
        );
    }
    let policies: Api<NetworkPolicy> = Api::namespaced(c.admin.clone(), &ns);
    policies
        .get("network-stack")
        .await
        .expect("the network's policy");
    policies
        .get("stack-web-published")
        .await
        .expect("web's published port admitted");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(c.admin.clone(), &ns);
    pvcs.get("stack-data").await.expect("the volume's claim");

    // Stop: the pod is stopped at an active deadline and kept (here the stand-in kubelet
    // reports it Failed, as a kubelet does); Start: a pod made anew, running.
    c.kubectl_ok(&["apply", "-f", "-"], Some(&dep(true)));
    let stopped = eventually(
        "web stopped and kept",
        Duration::from_secs(60),
        async || {
            let p = pods.get("stack-web").await.ok()?;
            let deadline = p.spec.as_ref().and_then(|s| s.active_deadline_seconds);
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            (deadline == Some(1) && phase.as_deref() == Some("Failed")).then_some(p)
        },
    )
    .await;
    assert_eq!(stopped.metadata.uid, web.metadata.uid, "the same pod, kept");
    let ar = poolkeeper_source_kube::objects::api_resource(poolkeeper_kinds::Kind::Deployment);
    let deps: Api<poolkeeper_source_kube::kube::api::DynamicObject> =
        Api::namespaced_with(c.admin.clone(), &ns, &ar);
    eventually(
        "the deployment's status shows web Stopped",
        Duration::from_secs(30),
        async || {
            let d = deps.get("stack").await.ok()?;
            let containers = d.data["status"]["containerStatuses"].as_array()?.clone();
            containers
                .iter()
                .any(|c| c["name"] == "web" && c["state"] == "Stopped")
                .then_some(())
        },
    )
    .await;
    c.kubectl_ok(&["apply", "-f", "-"], Some(&dep(false)));
    eventually("web started again", Duration::from_secs(60), async || {
        let p = pods.get("stack-web").await.ok()?;
        let fresh = p.metadata.uid != web.metadata.uid
            && p.spec
                .as_ref()
                .and_then(|s| s.active_deadline_seconds)
                .is_none()
            && poolkeeper_runtime_kube::standin::is_ready(&p);
        fresh.then_some(())
    })
    .await;

    c.kubectl_ok(
        &[
            "delete",
            "deployment.poolkeeper.dev",
            "stack",
            "-n",
            &ns,
            "--timeout=60s",
        ],
        None,
    );
    eventually(
        "everything the deployment made is gone",
        Duration::from_secs(60),
        async || {
            let pods_left = pods
                .list(&ListParams::default().labels("poolkeeper.dev/deployment=stack"))
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            let svc = services.get_opt("db").await.ok()?.is_some()
                || services.get_opt("web").await.ok()?.is_some();
            let np = policies.get_opt("network-stack").await.ok()?.is_some()
                || policies
                    .get_opt("stack-web-published")
                    .await
                    .ok()?
                    .is_some();
            let pvc = pvcs
                .get_opt("stack-data")
                .await
                .ok()?
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none());
            (pods_left == 0 && !svc && !np && !pvc).then_some(())
        },
    )
    .await;
    ctl.stop().await.expect("stop");
    c.cleanup(&ns);
}

/// `exposure: LoadBalancer`: an instance is warm only once the cluster has given its Service an
/// address (here the test stands in for the cloud's load-balancer controller), and that address
/// is the claim's endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_balanced_instance_is_warm_once_its_address_is_assigned() {
    use poolkeeper_source_kube::kube::api::{Patch, PatchParams};
    let Some((c, ns, config, _kubelet)) = setup("podslb").await else {
        return;
    };
    let state = tempfile::tempdir().expect("tempdir");
    let ctl = leading(&c, &config, &ns, state.path(), "e2e-a").await;
    let pool = pool_yaml(&ns, 1).replace("  warm: 1\n", "  warm: 1\n  exposure: LoadBalancer\n");
    c.kubectl_ok(&["apply", "-f", "-"], Some(&pool));
    let services: Api<Service> = Api::namespaced(c.admin.clone(), &ns);
    let name = eventually(
        "the instance's LoadBalancer Service",
        Duration::from_secs(60),
        async || {
            let list = services.list(&ListParams::default()).await.ok()?;
            let svc = list.items.into_iter().next()?;
            (svc.spec.as_ref()?.type_.as_deref() == Some("LoadBalancer"))
                .then_some(svc.metadata.name?)
        },
    )
    .await;
    // Running and Ready, but unreachable: not warm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(jsonpath(&c, &ns, "pool/web", "{.status.warm}"), "0");
    let assigned =
        serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}});
    services
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&assigned))
        .await
        .expect("the load balancer's address");
    eventually("warm once reachable", Duration::from_secs(30), async || {
        (jsonpath(&c, &ns, "pool/web", "{.status.warm}") == "1").then_some(())
    })
    .await;
    c.kubectl_ok(&["apply", "-f", "-"], Some(&claim_yaml(&ns, "c1")));
    c.wait_bound(&ns, &["c1"]);
    assert_eq!(
        jsonpath(&c, &ns, "claim/c1", "{.status.endpoint.address}"),
        "192.0.2.10:8080"
    );
    ctl.stop().await.expect("stop");
    c.cleanup(&ns);
}

/// A claim's resources on the pod runtime: an in-place resize of the bound pod (the controller
/// runs under exactly `poolkeeper rbac`'s roles, pods/resize included), the template's given
/// back when the claim ends and the pod is made again under its name (`Restart`; a pool of one,
/// so that it is the one kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_resources_resize_its_pod_in_place_and_the_reset_gives_the_templates_back() {
    let Some((c, ns, config, _kubelet)) = setup("podsize").await else {
        return;
    };
    let state = tempfile::tempdir().expect("tempdir");
    let ctl = leading(&c, &config, &ns, state.path(), "e2e-a").await;
    let pool = format!(
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: Pool\nmetadata: {{name: web, namespace: {ns}}}\n\
         spec:\n  warm: 1\n  max: 1\n  reset: Restart\n  claimResources: {{cpu: '2', memory: 1Gi}}\n  \
         template:\n    image: pk-test:latest\n    resources: {{cpu: 500m, memory: 256Mi}}\n    \
         ports: [{{name: http, containerPort: 8080}}]\n---\n\
         apiVersion: poolkeeper.dev/v1alpha1\nkind: User\nmetadata: {{name: alice, namespace: {ns}}}\n\
         spec: {{quota: {{maxClaims: 5}}}}\n"
    );
    c.kubectl_ok(&["apply", "-f", "-"], Some(&pool));
    let claim = format!(
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {{name: big, namespace: {ns}}}\n\
         spec: {{pool: web, user: alice, resources: {{cpu: 1500m, memory: 512Mi}}}}\n"
    );
    c.kubectl_ok(&["apply", "-f", "-"], Some(&claim));
    c.wait_bound(&ns, &["big"]);
    let pod = jsonpath(&c, &ns, "claim/big", "{.status.instance}");
    let limits = |what: &str| {
        jsonpath(
            &c,
            &ns,
            &format!("pod/{pod}"),
            &format!("{{.spec.containers[0].resources.{what}}}"),
        )
    };
    assert_eq!(
        limits("limits.cpu"),
        "1500m",
        "resized by the time it is Bound"
    );
    assert_eq!(limits("requests.cpu"), "1500m");
    assert_eq!(limits("limits.memory"), (512u64 << 20).to_string());
    // Whether the pod's limits are a cpu among `cpu` (as the API server may write it) and
    // `memory` bytes.
    let sized = |cpu: &[&str], memory: u64| {
        cpu.contains(&limits("limits.cpu").as_str())
            && limits("limits.memory") == memory.to_string()
    };

    // Changed while bound: the same pod, resized in place (needs no node: the API server
    // takes the resize; a kubelet would then apply it).
    c.kubectl_ok(
        &[
            "patch",
            "claim",
            "big",
            "-n",
            &ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"resources":{"cpu":"2","memory":"1Gi"}}}"#,
        ],
        None,
    );
    eventually(
        "the bound pod resized to the claim's new resources",
        Duration::from_secs(30),
        async || sized(&["2", "2000m"], 1 << 30).then_some(()),
    )
    .await;
    assert_eq!(
        jsonpath(&c, &ns, "claim/big", "{.status.instance}"),
        pod,
        "kept its pod"
    );

    c.kubectl_ok(
        &["delete", "claim", "big", "-n", &ns, "--timeout=60s"],
        None,
    );
    eventually(
        "the pod kept, with the template's resources, unbound",
        Duration::from_secs(60),
        async || {
            let free = recorded(&c, &ns).await.is_empty();
            (sized(&["500m"], 256 << 20) && free).then_some(())
        },
    )
    .await;
    ctl.stop().await.expect("stop");
    c.cleanup(&ns);
}
