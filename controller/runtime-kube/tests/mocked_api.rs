//! Every request the Kubernetes runtime makes, against a scripted API server (`tower-test`):
//! each test answers the requests it expects in order, and fails on one it did not expect or
//! on a request that never comes (a timeout).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use kube::client::Body as KubeBody;
use serde_json::{Value, json};

use poolkeeper_kinds::{ContainerPort, Exposure, Protocol};
use poolkeeper_runtime::{
    InstanceSpec, InstanceState, LABEL_MANAGED, LABEL_POOL, PortBinding, RecordedBinding, Runtime,
    RuntimeError, RuntimeEvent,
};
use poolkeeper_runtime_kube::{KubeRuntime, KubeRuntimeConfig};

type Resp = Response<BoxBody<Bytes, Infallible>>;
type Handle = tower_test::mock::Handle<Request<KubeBody>, Resp>;

fn resp(status: u16, v: &Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "message": message, "code": code})
}

fn runtime() -> (KubeRuntime, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<KubeBody>, Resp>();
    let client = kube::Client::new(svc, "team");
    let rt = KubeRuntime::new(
        client,
        KubeRuntimeConfig {
            namespace: "team".into(),
            controller_id: "ctl".into(),
            grace_seconds: 7,
        },
    );
    (rt, handle)
}

/// The next request: method, path with query, and JSON body (Null when none).
async fn next(
    handle: &mut Handle,
) -> (String, String, Value, tower_test::mock::SendResponse<Resp>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request that never came")
        .expect("the client went away");
    let method = req.method().to_string();
    let uri = req
        .uri()
        .path_and_query()
        .map(ToString::to_string)
        .unwrap_or_default();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (method, uri, body, send)
}

fn spec(exposure: Option<Exposure>) -> InstanceSpec {
    let labels = Arc::new(BTreeMap::from([
        (LABEL_MANAGED.into(), "true".into()),
        (LABEL_POOL.into(), "web".into()),
    ]));
    InstanceSpec {
        ports: vec![PortBinding {
            name: "http".into(),
            container_port: 8080,
            host_port: 30080,
            protocol: Protocol::Tcp,
        }],
        container_ports: vec![ContainerPort {
            name: "http".into(),
            container_port: 8080,
            protocol: Protocol::Tcp,
        }],
        exposure,
        ..InstanceSpec::plain("web-a1", "pk-test:latest", labels)
    }
}

fn pod(name: &str, rv: &str, claim: Option<&str>) -> Value {
    let mut labels = json!({"poolkeeper.dev/managed": "true", "poolkeeper.dev/pool": "web",
                            "poolkeeper.dev/controller": "ctl"});
    if let Some(c) = claim {
        labels["poolkeeper.dev/claim"] = json!(c);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "team", "uid": format!("uid-{name}"),
                        "resourceVersion": rv, "labels": labels,
                        "annotations": {"poolkeeper.dev/ports": "http:8080:8080/TCP",
                                        "poolkeeper.dev/exposure": "ClusterIP"}},
           "spec": {"containers": [{"name": "instance", "image": "pk-test:latest"}]}})
}

#[tokio::test]
async fn create_reads_the_pool_then_makes_the_pod_with_its_owner_and_then_its_service() {
    let (rt, mut h) = runtime();
    let again = rt.clone();
    let made = tokio::spawn(async move { rt.create(spec(None)).await });

    let (m, uri, _, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        (
            "GET",
            "/apis/poolkeeper.dev/v1alpha1/namespaces/team/pools/web"
        )
    );
    send.send_response(resp(
        200,
        &json!({"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "Pool",
                "metadata": {"name": "web", "namespace": "team", "uid": "pool-uid"},
                "spec": {"template": {"image": "pk-test:latest"}}}),
    ));

    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("POST", "/api/v1/namespaces/team/pods?")
    );
    assert_eq!(body["metadata"]["name"], "web-a1");
    assert_eq!(
        body["metadata"]["labels"]["poolkeeper.dev/controller"],
        "ctl"
    );
    assert_eq!(body["metadata"]["labels"]["poolkeeper.dev/pool"], "web");
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "pool-uid");
    assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "Pool");
    assert_eq!(body["spec"]["terminationGracePeriodSeconds"], 7);
    let mut answer = body.clone();
    answer["metadata"]["uid"] = json!("pod-uid");
    answer["metadata"]["resourceVersion"] = json!("10");
    send.send_response(resp(201, &answer));

    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("POST", "/api/v1/namespaces/team/services?")
    );
    assert_eq!(body["spec"]["type"], "ClusterIP");
    assert_eq!(
        body["spec"]["selector"]["poolkeeper.dev/instance"],
        "web-a1"
    );
    assert_eq!(body["spec"]["ports"][0]["port"], 8080);
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "pod-uid");
    send.send_response(resp(201, &body));

    let i = made.await.expect("join").expect("created");
    assert_eq!(i.node, "web-a1.team.svc");
    assert_eq!(i.revision, 10);
    assert_eq!(i.state, InstanceState::Running);
    assert!(
        !i.ready,
        "ready only once the pod's Ready condition says so"
    );

    // The pool's next pod, at once: the Pool is not read again.
    let mut second = spec(None);
    second.name = "web-a2".into();
    let made = tokio::spawn(async move { again.create(second).await });
    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("POST", "/api/v1/namespaces/team/pods?"),
        "the Pool's uid as read for the first pod"
    );
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "pool-uid");
    let mut answer = body.clone();
    answer["metadata"]["uid"] = json!("pod-uid-2");
    answer["metadata"]["resourceVersion"] = json!("12");
    send.send_response(resp(201, &answer));
    let (m, _, _, send) = next(&mut h).await;
    assert_eq!(m, "POST");
    send.send_response(resp(
        201,
        &json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-a2"}}),
    ));
    made.await.expect("join").expect("created");
}

#[tokio::test]
async fn a_refused_node_port_names_the_field_and_takes_the_pod_back() {
    let (rt, mut h) = runtime();
    let made = tokio::spawn(async move { rt.create(spec(Some(Exposure::NodePort))).await });
    let (_, _, _, send) = next(&mut h).await; // the Pool
    send.send_response(resp(
        404,
        &status(404, "NotFound", "pools \"web\" not found"),
    ));
    let (m, _, body, send) = next(&mut h).await;
    assert_eq!(m, "POST");
    assert!(
        body["metadata"].get("ownerReferences").is_none(),
        "no Pool, no owner"
    );
    send.send_response(resp(201, &body));
    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("POST", "/api/v1/namespaces/team/services?")
    );
    assert_eq!(body["spec"]["type"], "NodePort");
    assert_eq!(body["spec"]["ports"][0]["nodePort"], 30080);
    send.send_response(resp(
        422,
        &status(
            422,
            "Invalid",
            "Service \"web-a1\" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is not in the valid range. The range of valid ports is 31000-32000",
        ),
    ));
    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("DELETE", "/api/v1/namespaces/team/pods/web-a1?")
    );
    assert_eq!(body["gracePeriodSeconds"], 7);
    send.send_response(resp(200, &pod("web-a1", "11", None)));
    let err = made.await.expect("join").expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("spec.hostPorts") && msg.contains("valid range"),
        "{msg}"
    );
}

#[tokio::test]
async fn bind_patches_the_label_with_the_version_seen_and_a_stale_version_is_read_again() {
    let (rt, mut h) = runtime();
    let rt2 = rt.clone();
    let listed = tokio::spawn(async move { rt2.list().await });
    // Services first (to find those whose pod is gone), then pods.
    let (m, uri, _, send) = next(&mut h).await;
    assert_eq!(m, "GET");
    assert!(
        uri.starts_with("/api/v1/namespaces/team/services?"),
        "{uri}"
    );
    send.send_response(resp(
        200,
        &json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "20"},
                "items": []}),
    ));
    let (m, uri, _, send) = next(&mut h).await;
    assert_eq!(m, "GET");
    assert!(uri.starts_with("/api/v1/namespaces/team/pods?"), "{uri}");
    assert!(
        uri.contains(
            "labelSelector=poolkeeper.dev%2Fmanaged%3Dtrue%2Cpoolkeeper.dev%2Fcontroller%3Dctl"
        ),
        "{uri}"
    );
    send.send_response(resp(
        200,
        &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "20"},
                "items": [pod("web-a1", "15", None)]}),
    ));
    assert_eq!(listed.await.expect("join").expect("list").len(), 1);

    let bound = tokio::spawn(async move {
        rt.bind("web-a1", Some(RecordedBinding::new("c1", "alice", 1)))
            .await
    });
    // The version seen, as a precondition.
    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("PATCH", "/api/v1/namespaces/team/pods/web-a1?")
    );
    assert_eq!(body["metadata"]["resourceVersion"], "15");
    assert_eq!(body["metadata"]["labels"]["poolkeeper.dev/claim"], "c1");
    assert_eq!(body["metadata"]["labels"]["poolkeeper.dev/user"], "alice");
    assert_eq!(body["metadata"]["labels"]["poolkeeper.dev/bound-at"], "1");
    assert_eq!(
        body["metadata"]["labels"]["poolkeeper.dev/user-bound-at"],
        "1"
    );
    let labels = body["metadata"]["labels"].as_object().expect("labels");
    assert!(
        !labels.contains_key("poolkeeper.dev/quarantined"),
        "a binding leaves a quarantine label as it is: {labels:?}"
    );
    send.send_response(resp(
        409,
        &status(409, "Conflict", "the object has been modified"),
    ));
    // Stale: read again; still free (a status update moved the version), so patch again.
    let (m, uri, _, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("GET", "/api/v1/namespaces/team/pods/web-a1")
    );
    send.send_response(resp(200, &pod("web-a1", "16", None)));
    let (m, _, body, send) = next(&mut h).await;
    assert_eq!(m, "PATCH");
    assert_eq!(body["metadata"]["resourceVersion"], "16");
    send.send_response(resp(200, &pod("web-a1", "17", Some("c1"))));
    bound.await.expect("join").expect("bound");
}

#[tokio::test]
async fn a_pod_another_claim_took_meanwhile_is_a_conflict_and_is_not_patched() {
    let (rt, mut h) = runtime();
    let bound = tokio::spawn(async move {
        rt.bind("web-a1", Some(RecordedBinding::new("c1", "alice", 1)))
            .await
    });
    // Never seen: read first; another controller's claim is on it.
    let (m, _, _, send) = next(&mut h).await;
    assert_eq!(m, "GET");
    send.send_response(resp(200, &pod("web-a1", "30", Some("other"))));
    let err = bound.await.expect("join").expect_err("conflict");
    assert!(matches!(err, RuntimeError::Conflict { .. }), "{err:?}");
    // Nothing more: a timeout, or the client gone with no request left.
    assert!(
        !matches!(
            tokio::time::timeout(Duration::from_millis(200), h.next_request()).await,
            Ok(Some(_))
        ),
        "no patch after a conflict"
    );
}

#[tokio::test]
async fn a_quarantine_is_recorded_on_the_pod() {
    let (rt, mut h) = runtime();
    let done = tokio::spawn(async move { rt.quarantine("web-a1").await });
    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("PATCH", "/api/v1/namespaces/team/pods/web-a1?")
    );
    assert_eq!(
        body["metadata"]["labels"]["poolkeeper.dev/quarantined"],
        "true"
    );
    send.send_response(resp(200, &pod("web-a1", "50", Some("c1"))));
    done.await.expect("join").expect("recorded");
}

#[tokio::test]
async fn unbinding_removes_the_label_and_remove_deletes_the_pod_and_its_service() {
    let (rt, mut h) = runtime();
    let rt2 = rt.clone();
    let unbound = tokio::spawn(async move { rt2.bind("web-a1", None).await });
    let (_, _, _, send) = next(&mut h).await;
    send.send_response(resp(200, &pod("web-a1", "40", Some("c1"))));
    let (m, _, body, send) = next(&mut h).await;
    assert_eq!(m, "PATCH");
    for label in ["claim", "user", "bound-at", "user-bound-at", "quarantined"] {
        let key = format!("poolkeeper.dev/{label}");
        assert_eq!(body["metadata"]["labels"][&key], Value::Null, "{key}");
    }
    assert_eq!(body["metadata"]["resourceVersion"], "40");
    send.send_response(resp(200, &pod("web-a1", "41", None)));
    // The revision the write left: a report older than it still shows the binding.
    assert_eq!(unbound.await.expect("join").expect("unbound"), 41);

    let removed = tokio::spawn(async move { rt.remove("web-a1").await });
    // Read first: a deployment's pod takes its Service and policy along, a pool's its own.
    let (m, uri, _, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("GET", "/api/v1/namespaces/team/pods/web-a1")
    );
    send.send_response(resp(200, &pod("web-a1", "41", None)));
    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("DELETE", "/api/v1/namespaces/team/pods/web-a1?")
    );
    assert_eq!(body["gracePeriodSeconds"], 7);
    send.send_response(resp(404, &status(404, "NotFound", "gone already")));
    let (m, uri, _, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        ("DELETE", "/api/v1/namespaces/team/services/web-a1?")
    );
    send.send_response(resp(404, &status(404, "NotFound", "gone already")));
    removed
        .await
        .expect("join")
        .expect("removing what is gone succeeds");
}

fn lines(events: &[Value]) -> Resp {
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    Response::builder()
        .status(200)
        .body(Full::new(Bytes::from(text)).boxed())
        .expect("response")
}

#[tokio::test]
async fn the_watches_become_instance_changes_and_a_load_balancer_address_makes_its_pod_ready() {
    let (rt, mut h) = runtime();
    let mut events = rt.subscribe();
    let mut ready = pod("web-a1", "51", None);
    ready["status"] = json!({"phase": "Running",
                              "conditions": [{"type": "Ready", "status": "True"}]});
    let mut lb = pod("lb-a1", "53", None);
    lb["metadata"]["annotations"]["poolkeeper.dev/exposure"] = json!("LoadBalancer");
    lb["status"] = ready["status"].clone();
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "lb-a1", "namespace": "team", "resourceVersion": "61"},
        "spec": {"type": "LoadBalancer"},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}});
    let (pods_listed, services_listed) = (
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "50"},
               "items": [pod("web-a1", "49", None), lb]}),
        json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "60"},
               "items": []}),
    );
    let watched = lines(&[
        json!({"type": "MODIFIED", "object": ready}),
        json!({"type": "DELETED", "object": pod("web-a1", "52", None)}),
    ]);
    let mut pod_watch = Some(watched);
    let mut svc_watch = Some(lines(&[json!({"type": "ADDED", "object": svc})]));
    // The server: lists, then each watch from its list's version (later watches are held).
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok(Some((req, send))) =
                tokio::time::timeout(Duration::from_secs(5), h.next_request()).await
            else {
                return held.len();
            };
            let uri = req.uri().to_string();
            let watch = uri.contains("watch=true");
            match (uri.contains("/pods"), watch) {
                (true, false) => send.send_response(resp(200, &pods_listed)),
                (false, false) => send.send_response(resp(200, &services_listed)),
                (true, true) => {
                    assert!(
                        uri.contains("resourceVersion=50") || pod_watch.is_none(),
                        "{uri}"
                    );
                    match pod_watch.take() {
                        Some(r) => send.send_response(r),
                        None => held.push(send),
                    }
                }
                (false, true) => {
                    assert!(
                        uri.contains("resourceVersion=60") || svc_watch.is_none(),
                        "{uri}"
                    );
                    match svc_watch.take() {
                        Some(r) => send.send_response(r),
                        None => held.push(send),
                    }
                }
            }
        }
    });
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
        seen.push(e);
    }
    let of = |name: &str| -> Vec<&RuntimeEvent> {
        seen.iter()
            .filter(|e| match e {
                RuntimeEvent::Changed(i) => i.name == name,
                RuntimeEvent::Removed(n) => n == name,
                RuntimeEvent::Relist => false,
            })
            .collect()
    };
    let web = of("web-a1");
    assert!(
        matches!(web.as_slice(), [
            RuntimeEvent::Changed(a),
            RuntimeEvent::Changed(b),
            RuntimeEvent::Removed(_),
        ] if !a.ready && b.ready && b.revision == 51),
        "{web:?}"
    );
    let lb = of("lb-a1");
    assert!(
        matches!(lb.as_slice(), [RuntimeEvent::Changed(a), RuntimeEvent::Changed(b)]
            if !a.ready && b.ready && b.node == "192.0.2.7"),
        "a load-balanced pod is ready once its address is known: {lb:?}"
    );
    drop(events);
    drop(rt);
    let _ = server.await;
}

#[tokio::test]
async fn a_network_is_a_policy_made_once_and_removed_idempotently() {
    let (rt, mut h) = runtime();
    let rt2 = rt.clone();
    let made = tokio::spawn(async move { rt2.ensure_network("shop_default").await });
    let (m, uri, body, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        (
            "POST",
            "/apis/networking.k8s.io/v1/namespaces/team/networkpolicies?"
        )
    );
    assert_eq!(body["metadata"]["name"], "network-shop-default");
    assert_eq!(
        body["spec"]["podSelector"]["matchLabels"]["poolkeeper.dev/network"],
        "shop_default"
    );
    assert_eq!(
        body["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["poolkeeper.dev/network"],
        "shop_default"
    );
    send.send_response(resp(409, &status(409, "AlreadyExists", "exists")));
    made.await
        .expect("join")
        .expect("an existing policy is fine");
    let removed = tokio::spawn(async move { rt.remove_network("shop_default").await });
    let (m, uri, _, send) = next(&mut h).await;
    assert_eq!(
        (m.as_str(), uri.as_str()),
        (
            "DELETE",
            "/apis/networking.k8s.io/v1/namespaces/team/networkpolicies/network-shop-default?"
        )
    );
    send.send_response(resp(404, &status(404, "NotFound", "gone")));
    removed
        .await
        .expect("join")
        .expect("a missing policy is fine");
}
