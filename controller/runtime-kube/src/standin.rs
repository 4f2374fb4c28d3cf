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
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let deadline = pod
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .is_some();
        if deadline {
            // Stopped at its active deadline and kept, as a kubelet does.
            if phase != Some("Failed") {
                let _ = pods
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&stopped()))
                    .await;
            }
            continue;
        }
        if is_ready(&pod) {
            continue;
        }
        n = n.wrapping_add(1).max(1);
        let mut status = pod_status("Running", json!({"running": {"startedAt": NOW}}));
        // What a kubelet of 1.33 or later reports (the resources it gave the container), and
        // what the API server requires before it lets a pod be resized in place.
        let resources = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.resources.as_ref())
            .map(|r| json!({"limits": r.limits, "requests": r.requests}))
            .unwrap_or_else(|| json!({}));
        status["containerStatuses"][0]["resources"] = resources;
        status["hostIP"] = json!("10.0.0.1");
        status["podIP"] = json!(format!("10.244.0.{n}"));
        let status = json!({ "status": status });
        let _ = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
    }
}

const NOW: &str = "2026-01-01T00:00:00Z";

/// A pod's status with its one container in `state` (ready when the pod is `Running`).
fn pod_status(phase: &str, state: serde_json::Value) -> serde_json::Value {
    let ready = if phase == "Running" { "True" } else { "False" };
    json!({
        "phase": phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": NOW},
            {"type": "Ready", "status": ready, "lastTransitionTime": NOW},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": NOW},
        ],
        "containerStatuses": [{
            "name": "instance", "ready": phase == "Running", "restartCount": 0,
            "image": "standin", "imageID": "", "state": state,
        }],
    })
}

/// What a kubelet reports of a pod it stopped at its active deadline.
fn stopped() -> serde_json::Value {
    let mut status = pod_status(
        "Failed",
        json!({"terminated": {"exitCode": 143, "reason": "Error", "startedAt": NOW,
            "finishedAt": NOW}}),
    );
    status["reason"] = json!("DeadlineExceeded");
    status["message"] = json!("Pod was active on the node longer than the specified deadline");
    json!({ "status": status })
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
