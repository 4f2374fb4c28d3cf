//! Leader election against a scripted API server: a standby takes a Lease over only after it
//! has seen the holder's renewal unchanged for the whole lease duration, by a `replace` that
//! carries the resourceVersion it read; a conflict on that replace leaves it a standby.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use poolkeeper_source_kube::kube::client::Body as KubeBody;
use poolkeeper_source_kube::lease::{LeaseConfig, acquire};

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn resp(status: u16, v: &Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn lease(holder: &str, rv: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "pk", "namespace": "ops", "resourceVersion": rv},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 1,
                    "renewTime": "2026-12-04T10:00:00.000000Z", "leaseTransitions": 3}})
}

/// Serves GETs with a Lease held by `other` (never renewed); answers the first replace with
/// `first_put`, later ones with 200. Records each replace's body and when it came.
fn serve(
    mut handle: tower_test::mock::Handle<Request<KubeBody>, Resp>,
    first_put: u16,
) -> Arc<Mutex<Vec<(Instant, Value)>>> {
    let puts = Arc::new(Mutex::new(Vec::new()));
    let p = puts.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            assert_eq!(
                req.uri().path(),
                "/apis/coordination.k8s.io/v1/namespaces/ops/leases/pk"
            );
            let method = req.method().clone();
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap_or_default())
                    .unwrap_or(Value::Null);
            match method.as_str() {
                "GET" => send.send_response(resp(200, &lease("other", "41"))),
                "PUT" => {
                    let n = {
                        let mut p = p.lock().expect("lock");
                        p.push((Instant::now(), body.clone()));
                        p.len()
                    };
                    if n == 1 && first_put != 200 {
                        send.send_response(resp(
                            first_put,
                            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "Conflict", "code": first_put}),
                        ));
                    } else {
                        send.send_response(resp(200, &body));
                    }
                }
                other => panic!("unexpected {other}"),
            }
        }
    });
    puts
}

fn config() -> LeaseConfig {
    let mut c = LeaseConfig::new("pk", "ops", "me");
    c.duration = Duration::from_secs(1);
    c.renew_every = Duration::from_millis(100);
    c.margin = Duration::from_millis(300);
    c
}

#[tokio::test]
async fn a_standby_takes_over_only_after_a_whole_lease_duration_without_renewal() {
    let (svc, handle) = tower_test::mock::pair::<Request<KubeBody>, Resp>();
    let client = poolkeeper_source_kube::kube::Client::new(svc, "ops");
    let puts = serve(handle, 200);
    let start = Instant::now();
    let leadership = tokio::time::timeout(Duration::from_secs(5), acquire(client, config()))
        .await
        .expect("never took over");
    let (at, body) = puts.lock().expect("lock")[0].clone();
    assert!(
        at.duration_since(start) >= Duration::from_secs(1),
        "took over after {:?}, before the lease could have ended",
        at.duration_since(start)
    );
    assert_eq!(body["spec"]["holderIdentity"], "me");
    assert_eq!(body["spec"]["leaseTransitions"], 4);
    // Optimistic concurrency: the replace carries the version it read.
    assert_eq!(body["metadata"]["resourceVersion"], "41");
    drop(leadership);
}

#[tokio::test]
async fn a_conflict_on_the_takeover_leaves_it_a_standby_that_tries_again() {
    let (svc, handle) = tower_test::mock::pair::<Request<KubeBody>, Resp>();
    let client = poolkeeper_source_kube::kube::Client::new(svc, "ops");
    let puts = serve(handle, 409);
    let _leadership = tokio::time::timeout(Duration::from_secs(5), acquire(client, config()))
        .await
        .expect("never took over");
    let puts = puts.lock().expect("lock");
    // The first replace lost the race (409): it did not lead on it, and took over with a later
    // one.
    assert!(puts.len() >= 2, "{} replaces", puts.len());
}

/// Once leading, the API server stops answering (a half-open connection, a stuck etcd write):
/// the renewal waits no longer than the leader may go on, and leadership is given up before a
/// standby could take over, not never.
#[tokio::test]
async fn a_renewal_that_gets_no_answer_gives_leadership_up_in_time() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<KubeBody>, Resp>();
    let client = poolkeeper_source_kube::kube::Client::new(svc, "ops");
    tokio::spawn(async move {
        let mut unanswered = Vec::new();
        let mut put = false;
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap_or_default())
                    .unwrap_or(Value::Null);
            match method.as_str() {
                "GET" if !put => send.send_response(resp(200, &lease("other", "41"))),
                "PUT" if !put => {
                    put = true;
                    send.send_response(resp(200, &body));
                }
                // Leading now: nothing is answered any more.
                _ => unanswered.push(send),
            }
        }
    });
    let mut leadership = tokio::time::timeout(Duration::from_secs(5), acquire(client, config()))
        .await
        .expect("never took over");
    let led = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), leadership.lost())
        .await
        .expect("still leading with no renewal answered");
    let held = led.elapsed();
    // The lease lasts 1 s from the last renewal; the leader stops 300 ms before.
    assert!(held <= Duration::from_millis(900), "gave up after {held:?}");
}
