//! The pod runtime driven by the directory source (a VM's folder driving a cluster):
//! `poolkeeper run --dir DIR --runtime kube` against the API server `KUBECONFIG` names. Skipped
//! without one; failing instead when `POOLKEEPER_REQUIRE_KUBE=1`. Where the API server has no
//! nodes, the test stands in for the kubelet (pods reported Running and Ready).

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use poolkeeper_source_kube::kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::{claim_phase, object, pool_warm};

const BIN: &str = env!("CARGO_BIN_EXE_poolkeeper");

async fn admin() -> Option<poolkeeper_source_kube::kube::Client> {
    let required = std::env::var("POOLKEEPER_REQUIRE_KUBE").is_ok_and(|v| v == "1");
    if std::env::var("KUBECONFIG").unwrap_or_default().is_empty() {
        assert!(
            !required,
            "POOLKEEPER_REQUIRE_KUBE=1, but KUBECONFIG names no cluster"
        );
        eprintln!("skipped: KUBECONFIG is not set");
        return None;
    }
    poolkeeper_source_kube::install_crypto();
    let config = poolkeeper_source_kube::kube::Config::infer()
        .await
        .expect("KUBECONFIG");
    Some(poolkeeper_source_kube::kube::Client::try_from(config).expect("client"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_runs_its_pool_as_pods_and_binds_on_them() {
    let Some(client) = admin().await else { return };
    let ns = format!("pk-dir-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    // Pods run as `default`, which a controller-manager makes; a bare API server has none.
    let _ = sas
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa"),
        )
        .await;
    let kubelet = tokio::spawn(poolkeeper_runtime_kube::standin::kubelet(
        client.clone(),
        ns.clone(),
    ));

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("pool.yaml"),
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: Pool\nmetadata: {name: web}\n\
         spec:\n  warm: 2\n  template:\n    image: pk-test:latest\n    \
         ports: [{name: http, containerPort: 8080}]\n---\n\
         apiVersion: poolkeeper.dev/v1alpha1\nkind: User\nmetadata: {name: alice}\n\
         spec: {quota: {maxClaims: 2}}\n---\n\
         apiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {name: c1}\n\
         spec: {pool: web, user: alice}\n",
    )
    .expect("write");
    let log = std::fs::File::create(dir.path().join("controller.log")).expect("log");
    let mut child = Command::new(BIN)
        .args(["run", "--dir"])
        .arg(dir.path())
        .args(["--runtime", "kube", "--pod-namespace", &ns])
        .args(["--controller-id", "dirtest", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let status_file = dir.path().join(".poolkeeper/status.json");
    let started = Instant::now();
    let status = loop {
        let s: Option<serde_json::Value> = std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(s) = s
            && claim_phase(&s, "c1") == "Bound"
            && pool_warm(&s, "web") == 2
        {
            break s;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!(
                "never bound and refilled; log:\n{}",
                std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let claim = object(&status, "Claim", "c1");
    let instance = claim["status"]["instance"]
        .as_str()
        .expect("instance")
        .to_owned();
    assert_eq!(
        claim["status"]["endpoint"]["address"],
        format!("{instance}.{ns}.svc:8080"),
        "{claim}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = pods
        .list(&ListParams::default().labels("poolkeeper.dev/controller=dirtest"))
        .await
        .expect("pods");
    assert_eq!(list.items.len(), 3, "two warm and the bound one");
    let bound = list
        .items
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(instance.as_str()))
        .expect("the bound pod");
    let label = bound
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("poolkeeper.dev/claim"))
        .cloned();
    assert_eq!(label.as_deref(), Some("c1"));
    // No Pool object in the cluster: no owner (the folder is the record of what is declared).
    assert!(
        list.items
            .iter()
            .all(|p| p.metadata.owner_references.is_none())
    );

    let _ = child.kill();
    let _ = child.wait();
    kubelet.abort();
    poolkeeper_runtime_kube::standin::remove_all(&client, &ns).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
