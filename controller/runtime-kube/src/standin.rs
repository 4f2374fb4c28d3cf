//! A stand-in for the kubelet on an API server without nodes (a bare kube-apiserver, envtest):
//! every pod of a namespace that is not yet ready is reported Running and Ready through
//! `pods/status`, as a kubelet would once its readiness probe passed. The benchmark and the
//! end-to-end suite use it; a controller never does.

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

/// Whether the pod's `Ready` condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Runs until the watch ends (the task is aborted or the client dropped).
pub async fn kubelet(client: Client, namespace: String) {
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let stream = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let mut n = 0u8;
    while let Ok(Some(pod)) = stream.try_next().await {
        if is_ready(&pod) || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        n = n.wrapping_add(1).max(1);
        let now = "2026-01-01T00:00:00Z";
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": "10.0.0.1",
            "podIP": format!("10.244.0.{n}"),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            ],
            "containerStatuses": [{
                "name": "instance", "ready": true, "restartCount": 0, "image": "standin",
                "imageID": "", "state": {"running": {"startedAt": now}},
            }],
        }});
        let name = pod.metadata.name.clone().unwrap_or_default();
        let _ = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
    }
}

/// Removes every pod and Service of `namespace` at once (what a cluster's namespace controller
/// does when the namespace goes; a bare API server has none).
pub async fn remove_all(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let _ = pods.delete_collection(&now, &ListParams::default()).await;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    if let Ok(list) = services.list(&ListParams::default()).await {
        for s in list {
            if let Some(name) = s.metadata.name {
                let _ = services.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
}
