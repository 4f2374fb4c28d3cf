//! The Kubernetes source against a scripted API server (kube's client over `tower-test`): for
//! each reconcile, the exact requests it makes (the finalizer's JSON patch, the status's
//! server-side apply with its field manager, the Event) and how it takes the answers (a stale
//! finalizer patch's 422, a status's 500 and 404, a watch's 410). Every expectation has a
//! timeout, so a request that is never made fails the test.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use poolkeeper_engine::EngineConfig;
use poolkeeper_engine::source::Health;
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_source_kube::kube::client::Body as KubeBody;
use poolkeeper_source_kube::source::{self, Options};
use poolkeeper_source_kube::writes::Writer;
use poolkeeper_source_kube::{KubeResolve, Shared};

type Resp = Response<BoxBody<Bytes, Infallible>>;

const NS: &str = "team-a";

/// A request the controller made that changes something (not a list or watch).
#[derive(Clone, Debug)]
struct Write {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// An answer to give instead of success: to the first write whose method and path match.
struct Override {
    method: &'static str,
    path_ends: String,
    status: u16,
}

/// The scripted API server.
struct Fake {
    /// Objects per plural (`pools`, `claims`, ...), as lists return them.
    objects: HashMap<String, Vec<Value>>,
    /// Per plural: where a watch's events go (the watch's body), newest watch last.
    watches: Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Value>>>>>,
    /// Lists made, per plural.
    lists: Arc<Mutex<HashMap<String, u32>>>,
    overrides: Arc<Mutex<VecDeque<Override>>>,
    writes: mpsc::UnboundedSender<Write>,
}

fn json_resp(status: u16, v: &Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn status_body(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "message": format!("scripted {code}"), "code": code})
}

fn plural_of(path: &str) -> Option<String> {
    // /apis/poolkeeper.dev/v1alpha1/namespaces/NS/PLURAL[/NAME[/status]]
    // or, across all namespaces, /apis/poolkeeper.dev/v1alpha1/PLURAL
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.iter().position(|p| *p == "namespaces") {
        Some(i) => parts.get(i + 2).map(|s| (*s).to_owned()),
        None => parts.get(3).map(|s| (*s).to_owned()),
    }
}

impl Fake {
    async fn serve(mut self, mut handle: tower_test::mock::Handle<Request<KubeBody>, Resp>) {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or("").to_owned();
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let plural = plural_of(&path).unwrap_or_default();
            if method == "GET" && query.contains("watch=true") {
                let (tx, rx) = mpsc::unbounded_channel::<Value>();
                self.watches
                    .lock()
                    .expect("lock")
                    .entry(plural)
                    .or_default()
                    .push(tx);
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    let ev = rx.recv().await?;
                    let line = format!("{ev}\n");
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx))
                });
                let resp = Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed())
                    .expect("response");
                send.send_response(resp);
                continue;
            }
            if method == "GET" && path.contains("/secrets/") {
                *self
                    .lists
                    .lock()
                    .expect("lock")
                    .entry("secrets".to_owned())
                    .or_default() += 1;
                send.send_response(json_resp(404, &status_body(404, "NotFound")));
                continue;
            }
            // One object: /.../PLURAL/NAME (objects created through the fake are there too).
            let named = path
                .trim_start_matches('/')
                .split('/')
                .skip_while(|p| *p != plural.as_str())
                .nth(1)
                .map(str::to_owned);
            if method == "GET"
                && let Some(name) = named
            {
                let found = (self.objects.get(&plural))
                    .and_then(|items| {
                        items
                            .iter()
                            .find(|o| o["metadata"]["name"] == name.as_str())
                    })
                    .cloned();
                send.send_response(match found {
                    Some(o) => json_resp(200, &o),
                    None => json_resp(404, &status_body(404, "NotFound")),
                });
                continue;
            }
            if method == "GET" {
                *self
                    .lists
                    .lock()
                    .expect("lock")
                    .entry(plural.clone())
                    .or_default() += 1;
                let items = self.objects.get(&plural).cloned().unwrap_or_default();
                send.send_response(json_resp(
                    200,
                    &json!({"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "List",
                            "metadata": {"resourceVersion": "10"}, "items": items}),
                ));
                continue;
            }
            let w = Write {
                method: method.clone(),
                path: path.clone(),
                query,
                content_type,
                body: body.clone(),
            };
            let _ = self.writes.send(w);
            let scripted = {
                let mut o = self.overrides.lock().expect("lock");
                let i = o
                    .iter()
                    .position(|o| o.method == method && path.ends_with(&o.path_ends));
                i.and_then(|i| o.remove(i))
            };
            if let Some(o) = scripted {
                send.send_response(json_resp(o.status, &status_body(o.status, "Scripted")));
                continue;
            }
            // Success: the object the write names (as the API server would answer it).
            let name = path
                .trim_end_matches("/status")
                .rsplit('/')
                .next()
                .unwrap_or("");
            let obj = self
                .objects
                .get(&plural)
                .and_then(|items| items.iter().find(|o| o["metadata"]["name"] == name))
                .cloned()
                .unwrap_or_else(|| body.clone());
            let code = if method == "POST" { 201 } else { 200 };
            let items = self.objects.entry(plural.clone()).or_default();
            match method.as_str() {
                "POST" => items.push(body.clone()),
                "DELETE" => items.retain(|o| o["metadata"]["name"] != name),
                _ => {}
            }
            send.send_response(json_resp(code, &obj));
        }
    }
}

fn obj(kind: &str, name: &str, spec: Value, extra: Value) -> Value {
    let mut o = json!({
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                     "resourceVersion": "5", "generation": 1,
                     "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": spec,
    });
    if let (Some(m), Some(e)) = (o["metadata"].as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            m.insert(k.clone(), v.clone());
        }
    }
    o
}

fn pool() -> Value {
    obj(
        "Pool",
        "web",
        json!({"template": {"image": "x", "ports": [{"name": "http", "containerPort": 80}]},
               "warm": 1, "hostPorts": {"start": 42000, "end": 42010}}),
        json!({"finalizers": ["poolkeeper.dev/cleanup"]}),
    )
}

fn user() -> Value {
    obj(
        "User",
        "alice",
        json!({"quota": {"maxClaims": 2}}),
        json!({}),
    )
}

fn claim(name: &str, extra: Value) -> Value {
    obj(
        "Claim",
        name,
        json!({"pool": "web", "user": "alice"}),
        extra,
    )
}

/// A source under test: the engine on the memory runtime, the scripted server, and the writes
/// it sees.
struct Scene {
    writes: mpsc::UnboundedReceiver<Write>,
    /// Writes received and not matched by an expectation yet, in order.
    log: Vec<Write>,
    watches: Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Value>>>>>,
    lists: Arc<Mutex<HashMap<String, u32>>>,
    /// What the HTTP API's [`KubeDeclare`] is built from.
    engine: poolkeeper_engine::EngineHandle,
    writer: Writer,
    shared: Shared,
    _state: tempfile::TempDir,
    _source: tokio::task::JoinHandle<()>,
}

async fn scene(objects: Vec<Value>, overrides: Vec<Override>) -> Scene {
    scene_in(
        objects,
        overrides,
        vec![NS.to_owned()],
        Duration::from_secs(60),
    )
    .await
}

/// [`scene`], watching `namespaces` (empty: all of them, in one stream), reading Secrets again
/// every `resync`.
async fn scene_in(
    objects: Vec<Value>,
    overrides: Vec<Override>,
    namespaces: Vec<String>,
    resync: Duration,
) -> Scene {
    let (svc, handle) = tower_test::mock::pair::<Request<KubeBody>, Resp>();
    let client = poolkeeper_source_kube::kube::Client::new(svc, NS);
    let mut by_plural: HashMap<String, Vec<Value>> = HashMap::new();
    for o in objects {
        let plural = format!("{}s", o["kind"].as_str().unwrap_or("").to_lowercase());
        by_plural.entry(plural).or_default().push(o);
    }
    let (wtx, writes) = mpsc::unbounded_channel();
    let watches = Arc::new(Mutex::new(HashMap::new()));
    let lists = Arc::new(Mutex::new(HashMap::new()));
    let overrides = Arc::new(Mutex::new(overrides.into_iter().collect()));
    let fake = Fake {
        objects: by_plural,
        watches: watches.clone(),
        lists: lists.clone(),
        overrides: overrides.clone(),
        writes: wtx,
    };
    tokio::spawn(fake.serve(handle));
    let state = tempfile::tempdir().expect("tempdir");
    let shared = Shared {
        namespaces: namespaces.clone(),
        server: "https://mock".to_owned(),
        ..Shared::default()
    };
    let mut config = EngineConfig::new(state.path());
    config.resolve = Arc::new(KubeResolve(shared.clone()));
    let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
    let (engine, _task) = poolkeeper_engine::start(rt, config).expect("engine");
    let writer = Writer::new(client.clone(), Some("test".to_owned()));
    let (engine_for_declare, writer_for_declare, shared_for_declare) =
        (engine.clone(), writer.clone(), shared.clone());
    let source = tokio::time::timeout(
        Duration::from_secs(10),
        source::run(
            client,
            engine,
            writer,
            shared,
            Health::default(),
            Options { namespaces, resync },
        ),
    )
    .await
    .expect("the source never finished its first lists")
    .expect("source");
    Scene {
        writes,
        log: Vec::new(),
        watches,
        lists,
        engine: engine_for_declare,
        writer: writer_for_declare,
        shared: shared_for_declare,
        _state: state,
        _source: source,
    }
}

impl Scene {
    /// The first write matching `pred` not matched before, waiting up to 5 s for it.
    async fn expect(&mut self, what: &str, pred: impl Fn(&Write) -> bool) -> Write {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(i) = self.log.iter().position(&pred) {
                return self.log.remove(i);
            }
            match tokio::time::timeout_at(deadline, self.writes.recv()).await {
                Ok(Some(w)) => self.log.push(w),
                Ok(None) | Err(_) => panic!("never made: {what}; made: {:#?}", self.log),
            }
        }
    }

    /// No write matching `pred` within `wait`.
    async fn expect_none(&mut self, what: &str, wait: Duration, pred: impl Fn(&Write) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(w)) = tokio::time::timeout_at(deadline, self.writes.recv()).await {
            assert!(!pred(&w), "unexpected: {what}: {w:?}");
        }
    }

    /// Sends a watch event on the newest watch of `plural` (waiting for one to be open).
    async fn watch_event(&self, plural: &str, ev: Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let tx = self
                .watches
                .lock()
                .expect("lock")
                .get(plural)
                .and_then(|v| v.last().cloned());
            if let Some(tx) = tx
                && tx.send(ev.clone()).is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no watch of {plural} opened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lists(&self, plural: &str) -> u32 {
        self.lists
            .lock()
            .expect("lock")
            .get(plural)
            .copied()
            .unwrap_or(0)
    }
}

fn is_status_of(w: &Write, name: &str) -> bool {
    w.method == "PATCH" && w.path.ends_with(&format!("/claims/{name}/status"))
}

fn is_finalizer_patch(w: &Write, name: &str) -> bool {
    w.method == "PATCH" && w.path.ends_with(&format!("/claims/{name}"))
}

#[tokio::test]
async fn a_new_claim_gets_the_finalizer_then_its_bound_status_by_server_side_apply() {
    let mut s = scene(vec![pool(), user(), claim("alice-web", json!({}))], vec![]).await;
    let fin = s
        .expect("the finalizer patch", |w| {
            is_finalizer_patch(w, "alice-web")
        })
        .await;
    assert_eq!(fin.content_type, "application/json-patch+json");
    assert_eq!(
        fin.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["poolkeeper.dev/cleanup"]},
        ])
    );
    let st = s
        .expect("the Bound status", |w| {
            is_status_of(w, "alice-web") && w.body["status"]["phase"] == "Bound"
        })
        .await;
    assert_eq!(st.content_type, "application/apply-patch+yaml");
    assert!(st.query.contains("fieldManager=poolkeeper"), "{}", st.query);
    assert!(st.query.contains("force=true"), "{}", st.query);
    assert_eq!(st.body["apiVersion"], "poolkeeper.dev/v1alpha1");
    assert_eq!(st.body["kind"], "Claim");
    assert_eq!(st.body["status"]["observedGeneration"], 1);
    let bound = st.body["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Bound"))
        .cloned()
        .expect("Bound condition");
    assert_eq!(bound["status"], "True");
    // Written once: the same status is not written again.
    s.expect_none("the same status again", Duration::from_millis(2500), |w| {
        is_status_of(w, "alice-web") && w.body["status"]["phase"] == "Bound"
    })
    .await;
}

#[tokio::test]
async fn a_refused_finalizer_patch_is_not_forced_and_a_failed_status_is_written_again() {
    let mut s = scene(
        vec![pool(), user(), claim("c1", json!({}))],
        vec![
            Override {
                method: "PATCH",
                path_ends: "/claims/c1".into(),
                status: 422,
            },
            Override {
                method: "PATCH",
                path_ends: "/claims/c1/status".into(),
                status: 500,
            },
        ],
    )
    .await;
    s.expect("the finalizer patch", |w| is_finalizer_patch(w, "c1"))
        .await;
    // The 500: the status is written again.
    s.expect("the first status (answered 500)", |w| is_status_of(w, "c1"))
        .await;
    s.expect("the status, again", |w| is_status_of(w, "c1"))
        .await;
    // The 422 (the finalizers changed under it): no blind retry; the watch brings the object
    // as it is, with the finalizer someone else's write added, and nothing more is patched.
    s.watch_event(
        "claims",
        json!({"type": "MODIFIED", "object": claim("c1", json!({"finalizers": ["poolkeeper.dev/cleanup"], "resourceVersion": "6"}))}),
    )
    .await;
    s.expect_none("another finalizer patch", Duration::from_secs(2), |w| {
        is_finalizer_patch(w, "c1")
    })
    .await;
}

#[tokio::test]
async fn a_deleted_claim_loses_its_finalizer_once_its_instance_is_reset() {
    let mut s = scene(
        vec![
            pool(),
            user(),
            claim("c2", json!({"finalizers": ["poolkeeper.dev/cleanup"]})),
        ],
        vec![],
    )
    .await;
    s.expect("the Bound status", |w| {
        is_status_of(w, "c2") && w.body["status"]["phase"] == "Bound"
    })
    .await;
    s.watch_event(
        "claims",
        json!({"type": "MODIFIED", "object": claim("c2", json!({
            "finalizers": ["poolkeeper.dev/cleanup"], "resourceVersion": "7",
            "deletionTimestamp": "2026-12-04T00:00:00Z"}))}),
    )
    .await;
    let fin = s
        .expect("the finalizer's removal", |w| is_finalizer_patch(w, "c2"))
        .await;
    assert_eq!(
        fin.body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "poolkeeper.dev/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
}

#[tokio::test]
async fn an_invalid_claim_gets_spec_valid_false_and_a_warning_event_beside_valid_ones() {
    let bad = obj(
        "Claim",
        "bad",
        json!({"pool": "web", "user": "alice", "ttl": "soon"}),
        json!({"finalizers": ["poolkeeper.dev/cleanup"]}),
    );
    let mut s = scene(
        vec![
            pool(),
            user(),
            bad,
            claim("good", json!({"finalizers": ["poolkeeper.dev/cleanup"]})),
        ],
        vec![],
    )
    .await;
    let ev = s
        .expect("a Warning Event", |w| {
            w.method == "POST" && w.path.ends_with("/events") && w.body["reason"] == "InvalidSpec"
        })
        .await;
    assert_eq!(
        ev.path,
        format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
    );
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["regarding"]["name"], "bad");
    assert_eq!(ev.body["reportingController"], "poolkeeper");
    assert!(
        ev.body["note"]
            .as_str()
            .is_some_and(|n| n.contains("spec.ttl")),
        "{}",
        ev.body
    );
    let st = s
        .expect("the refusal on its status", |w| is_status_of(w, "bad"))
        .await;
    let valid = &st.body["status"]["conditions"][0];
    assert_eq!(valid["type"], "SpecValid");
    assert_eq!(valid["status"], "False");
    assert!(
        valid["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.ttl"))
    );
    s.expect("the valid claim beside it is bound", |w| {
        is_status_of(w, "good") && w.body["status"]["phase"] == "Bound"
    })
    .await;
}

#[tokio::test]
async fn a_410_on_a_watch_makes_the_source_list_again() {
    let mut s = scene(vec![pool(), user()], vec![]).await;
    let before = s.lists("claims");
    s.watch_event(
        "claims",
        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "Expired", "message": "too old resource version", "code": 410}}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.lists("claims") == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never listed again after a 410"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A claim that appeared meanwhile is found by the new list... (the fake's list holds what
    // it was given), and the source keeps working: a new claim on the new watch is bound.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.watch_event(
        "claims",
        json!({"type": "ADDED", "object": claim("after-410", json!({"finalizers": ["poolkeeper.dev/cleanup"]}))}),
    )
    .await;
    s.expect("the claim after the relist is bound", |w| {
        is_status_of(w, "after-410") && w.body["status"]["phase"] == "Bound"
    })
    .await;
}

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g";

/// The console's registration creates a User object in the default namespace (labelled as made
/// by the console); a taken name is refused without a request; `user passwd` patches the
/// declared User's `spec.passwordHash` with a merge patch.
#[tokio::test]
async fn registration_creates_a_user_object_and_a_password_patches_its_spec() {
    use poolkeeper_engine::source::{Declare, DeclareError};
    let mut sc = scene(vec![pool(), user()], vec![]).await;
    let declare = poolkeeper_source_kube::declare::KubeDeclare::new(
        sc.engine.clone(),
        sc.writer.clone(),
        sc.shared.clone(),
        NS.to_owned(),
        NS.to_owned(),
    )
    .await
    .expect("declare");
    let spec = poolkeeper_kinds::UserSpec {
        password_hash: Some(HASH.to_owned()),
        ..Default::default()
    };
    let at = declare
        .create_user("dora", spec.clone())
        .await
        .expect("created");
    assert_eq!(at, format!("{NS}/User/dora"));
    let w = sc
        .expect("the User's creation", |w| {
            w.method == "POST" && w.path.ends_with(&format!("/namespaces/{NS}/users"))
        })
        .await;
    assert_eq!(w.body["metadata"]["name"], "dora");
    assert_eq!(
        w.body["metadata"]["labels"]["poolkeeper.dev/made-by"],
        "console"
    );
    assert_eq!(w.body["spec"]["passwordHash"], HASH);
    assert_eq!(w.body["spec"]["quota"]["maxClaims"], 3);
    // alice is declared: a conflict, and nothing is sent.
    let taken = declare.create_user("alice", spec).await;
    assert!(matches!(taken, Err(DeclareError::Conflict(_))), "{taken:?}");
    sc.expect_none("a creation of alice", Duration::from_millis(300), |w| {
        w.method == "POST" && w.path.ends_with("/users")
    })
    .await;
    let at = declare.set_password("alice", HASH).await.expect("set");
    assert_eq!(at, format!("{NS}/User/alice"));
    let w = sc
        .expect("the password's patch", |w| {
            w.method == "PATCH" && w.path.ends_with(&format!("/namespaces/{NS}/users/alice"))
        })
        .await;
    assert!(w.content_type.contains("merge-patch"), "{w:?}");
    assert_eq!(w.body, json!({"spec": {"passwordHash": HASH}}));
    // An undeclared user has no password to set.
    let missing = declare.set_password("nobody", HASH).await;
    assert!(
        matches!(missing, Err(DeclareError::NotFound(_))),
        "{missing:?}"
    );
}

/// An example flow run from the console: its objects are created labelled with the flow; one
/// that exists (409) has its spec replaced by a merge patch; stopping deletes them.
#[tokio::test]
async fn a_flows_objects_are_created_labelled_patched_when_they_exist_and_deleted() {
    use poolkeeper_engine::source::Declare;
    use poolkeeper_kinds::{Kind, ObjKey, Object, Origin, Spec};
    let fin = json!(["poolkeeper.dev/cleanup"]);
    let labelled = json!({"labels": {"poolkeeper.dev/flow": "01-hello-world"}, "finalizers": fin});
    let hello = obj("Deployment", "hello", json!({"containers": []}), labelled);
    let mine = obj(
        "Deployment",
        "mine",
        json!({"containers": []}),
        json!({"finalizers": fin}),
    );
    let mut sc = scene(
        vec![pool(), user(), hello, mine],
        vec![Override {
            method: "POST",
            path_ends: "/deployments".to_owned(),
            status: 409,
        }],
    )
    .await;
    let declare = poolkeeper_source_kube::declare::KubeDeclare::new(
        sc.engine.clone(),
        sc.writer.clone(),
        sc.shared.clone(),
        NS.to_owned(),
        NS.to_owned(),
    )
    .await
    .expect("declare");
    let spec: poolkeeper_kinds::DeploymentSpec = serde_json::from_value(
        json!({"containers": [{"name": "hello", "image": "x", "command": ["echo", "hi"]}]}),
    )
    .expect("spec");
    let obj = |name: &str| Object {
        name: name.to_owned(),
        spec: Spec::Deployment(spec.clone()),
        origin: Origin::default(),
        generation: 1,
    };
    // A Deployment someone made by hand under the example's name: nothing is changed.
    let refused = declare
        .declare_group("01-hello-world", vec![obj("hello"), obj("mine")])
        .await;
    assert!(
        matches!(&refused, Err(poolkeeper_engine::source::DeclareError::Conflict(m)) if m.contains("mine")),
        "{refused:?}"
    );
    sc.expect_none("a write", Duration::from_millis(300), |w| {
        w.path.contains("/deployments") && !w.path.ends_with("/status")
    })
    .await;
    // The first exists already, the group's own (the scripted 409): patched; the second is
    // created.
    let at = declare
        .declare_group("01-hello-world", vec![obj("hello"), obj("second")])
        .await
        .expect("declared");
    assert!(at.contains("poolkeeper.dev/flow=01-hello-world"), "{at}");
    let created = sc
        .expect("the second's creation", |w| {
            w.method == "POST"
                && w.path.ends_with("/deployments")
                && w.body["metadata"]["name"] == "second"
        })
        .await;
    assert_eq!(
        created.body["metadata"]["labels"]["poolkeeper.dev/flow"],
        "01-hello-world"
    );
    assert_eq!(
        created.body["spec"]["containers"][0]["command"],
        json!(["echo", "hi"])
    );
    let patched = sc
        .expect("the first's patch", |w| {
            w.method == "PATCH" && w.path.ends_with("/deployments/hello")
        })
        .await;
    assert_eq!(patched.body["spec"]["containers"][0]["name"], "hello");
    let was = declare
        .remove_group(
            "01-hello-world",
            vec![
                ObjKey::new(Kind::Deployment, "hello"),
                ObjKey::new(Kind::Deployment, "second"),
                ObjKey::new(Kind::Deployment, "mine"),
            ],
        )
        .await
        .expect("removed");
    assert!(was);
    for name in ["hello", "second"] {
        sc.expect("a deletion", |w| {
            w.method == "DELETE" && w.path.ends_with(&format!("/deployments/{name}"))
        })
        .await;
    }
    sc.expect_none(
        "the hand-made one deleted",
        Duration::from_millis(300),
        |w| w.method == "DELETE" && w.path.ends_with("/deployments/mine"),
    )
    .await;
}

/// Stop and Start of a deployment's container: a merge patch of the Deployment's containers,
/// the others as declared.
#[tokio::test]
async fn a_container_is_declared_stopped_by_a_merge_patch_of_the_whole_list() {
    use poolkeeper_engine::source::{Declare, DeclareError};
    let shop = obj(
        "Deployment",
        "shop",
        json!({"containers": [{"name": "web", "image": "x"}, {"name": "db", "image": "y"}]}),
        json!({}),
    );
    let mut sc = scene(vec![pool(), user(), shop], vec![]).await;
    let declare = poolkeeper_source_kube::declare::KubeDeclare::new(
        sc.engine.clone(),
        sc.writer.clone(),
        sc.shared.clone(),
        NS.to_owned(),
        NS.to_owned(),
    )
    .await
    .expect("declare");
    let at = declare
        .set_container_stopped("shop", "db", true)
        .await
        .expect("stopped");
    assert_eq!(at, format!("{NS}/Deployment/shop"));
    let w = sc
        .expect("the Deployment's merge patch", |w| {
            w.method == "PATCH"
                && w.content_type.contains("merge-patch")
                && w.path
                    .ends_with(&format!("/namespaces/{NS}/deployments/shop"))
        })
        .await;
    let cs = &w.body["spec"]["containers"];
    assert_eq!(cs[0]["name"], "web");
    assert!(cs[0].get("stopped").is_none(), "{cs}");
    assert_eq!(cs[1]["name"], "db");
    assert_eq!(cs[1]["stopped"], true);
    let missing = declare.set_container_stopped("shop", "cache", true).await;
    assert!(
        matches!(missing, Err(DeclareError::NotFound(_))),
        "{missing:?}"
    );
}

/// The API server lists by name; a controller that starts without its state store (a new disk)
/// numbers the waiting claims in the order it is handed them. The list's claims are handed over
/// in the order they were created, so the one created first is bound first and the others wait
/// in creation order.
#[tokio::test]
async fn listed_claims_are_queued_in_the_order_they_were_created_not_by_name() {
    let one = obj(
        "Pool",
        "web",
        json!({"template": {"image": "x", "ports": [{"name": "http", "containerPort": 80}]},
               "warm": 1, "max": 1, "hostPorts": {"start": 42000, "end": 42010}}),
        json!({"finalizers": ["poolkeeper.dev/cleanup"]}),
    );
    let alice = obj(
        "User",
        "alice",
        json!({"quota": {"maxClaims": 5}}),
        json!({}),
    );
    let at = |t: &str| json!({"creationTimestamp": t, "finalizers": ["poolkeeper.dev/cleanup"]});
    let mut s = scene(
        vec![
            one,
            alice,
            claim("a-last", at("2026-12-01T00:00:03Z")),
            claim("b-second", at("2026-12-01T00:00:02Z")),
            claim("c-first", at("2026-12-01T00:00:01Z")),
        ],
        vec![],
    )
    .await;
    s.expect("c-first Bound", |w| {
        is_status_of(w, "c-first") && w.body["status"]["phase"] == "Bound"
    })
    .await;
    for (name, position) in [("b-second", 1), ("a-last", 2)] {
        s.expect(&format!("{name} waiting at {position}"), |w| {
            is_status_of(w, name)
                && w.body["status"]["phase"] == "Pending"
                && w.body["status"]["queuePosition"] == position
        })
        .await;
    }
}

/// A claim the API created is released at once, before the watch has shown it: the Claim
/// object is deleted where it was created (not answered released while nothing was deleted).
#[tokio::test]
async fn a_claim_released_before_the_watch_shows_it_is_deleted_where_it_was_made() {
    use poolkeeper_engine::source::{Created, Declare};
    let mut sc = scene(vec![pool(), user()], vec![]).await;
    let declare = poolkeeper_source_kube::declare::KubeDeclare::new(
        sc.engine.clone(),
        sc.writer.clone(),
        sc.shared.clone(),
        "elsewhere".to_owned(),
        NS.to_owned(),
    )
    .await
    .expect("declare");
    let spec = poolkeeper_kinds::ClaimSpec {
        pool: "web".into(),
        user: "alice".into(),
        ttl: None,
        files: Default::default(),
        files_from: None,
        resources: None,
    };
    let made = declare.create_claim("quick", spec, None).await;
    assert!(matches!(made, Ok(Created::New { .. })), "{made:?}");
    sc.expect("the Claim's creation", |w| {
        w.method == "POST" && w.path.ends_with(&format!("/namespaces/{NS}/claims"))
    })
    .await;
    // No watch event for it yet.
    let released = declare.delete_claim("quick").await;
    assert!(matches!(released, Ok(true)), "{released:?}");
    sc.expect("the Claim's deletion in its namespace", |w| {
        w.method == "DELETE" && w.path.ends_with(&format!("/namespaces/{NS}/claims/quick"))
    })
    .await;
}

/// A pool of one instance reset in place, a claim bound and another waiting: the deleted
/// claim's instance is reset and bound at once to the waiting one, which is done with the
/// deleted claim: its finalizer goes (it is not held while the instance stays busy).
#[tokio::test]
async fn a_deleted_claims_finalizer_goes_when_its_reset_instance_is_bound_again_at_once() {
    let one = obj(
        "Pool",
        "web",
        json!({"template": {"image": "x"}, "warm": 1, "max": 1, "reset": "Restart"}),
        json!({"finalizers": ["poolkeeper.dev/cleanup"]}),
    );
    let fin = json!({"finalizers": ["poolkeeper.dev/cleanup"]});
    let mut s = scene(
        vec![
            one,
            user(),
            claim("c1", fin.clone()),
            claim("c2", fin.clone()),
        ],
        vec![],
    )
    .await;
    let bound = s
        .expect("a Bound status", |w| {
            w.method == "PATCH"
                && w.path.ends_with("/status")
                && w.body["status"]["phase"] == "Bound"
        })
        .await;
    let first = bound
        .path
        .trim_end_matches("/status")
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned();
    let other = if first == "c1" { "c2" } else { "c1" };
    s.watch_event(
        "claims",
        json!({"type": "MODIFIED", "object": claim(&first, json!({
            "finalizers": ["poolkeeper.dev/cleanup"], "resourceVersion": "7",
            "deletionTimestamp": "2026-12-04T00:00:00Z"}))}),
    )
    .await;
    s.expect("the waiting claim bound on the reset instance", |w| {
        is_status_of(w, other) && w.body["status"]["phase"] == "Bound"
    })
    .await;
    s.expect("the deleted claim's finalizer removed", |w| {
        is_finalizer_patch(w, &first)
    })
    .await;
}

/// The finalizer's addition answered 429 (the API server sheds load): it is tried again by
/// itself, not only at the object's next spec change (a delete before that would not wait for
/// the claim's reset).
#[tokio::test]
async fn a_finalizer_addition_refused_for_load_is_tried_again() {
    let mut s = scene(
        vec![pool(), user(), claim("c1", json!({}))],
        vec![Override {
            method: "PATCH",
            path_ends: "/claims/c1".into(),
            status: 429,
        }],
    )
    .await;
    s.expect("the finalizer patch (answered 429)", |w| {
        is_finalizer_patch(w, "c1")
    })
    .await;
    let again = s
        .expect("the finalizer patch, again", |w| {
            is_finalizer_patch(w, "c1")
        })
        .await;
    assert_eq!(again.body[1]["op"], "add", "{:?}", again.body);
}

/// A Pool named in two namespaces: the older declaration has the name even when the newer one
/// was seen first (a restart lists them in any order), and the newer one is told why.
#[tokio::test]
async fn of_two_namespaces_declaring_a_name_the_older_has_it_whichever_came_first() {
    let newer = pool();
    let mut older = pool();
    older["metadata"]["namespace"] = json!("team-b");
    older["metadata"]["uid"] = json!("uid-web-b");
    older["metadata"]["creationTimestamp"] = json!("2026-11-01T00:00:00Z");
    older["spec"]["warm"] = json!(2);
    let mut s = scene_in(vec![newer, user()], vec![], vec![], Duration::from_secs(60)).await;
    s.watch_event("pools", json!({"type": "ADDED", "object": older}))
        .await;
    s.expect("the newer one told it is a duplicate", |w| {
        w.method == "PATCH"
            && w.path
                .ends_with(&format!("/namespaces/{NS}/pools/web/status"))
            && w.body.to_string().contains("DuplicateName")
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let snap = s.engine.snapshot().await.expect("snapshot");
        let web = snap
            .objects
            .iter()
            .find(|o| o.kind == poolkeeper_kinds::Kind::Pool && o.name == "web")
            .expect("web");
        if web.origin.to_string().starts_with("team-b/") {
            assert_eq!(web.spec["warm"], 2, "{}", web.spec);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the engine still has web from {}",
            web.origin
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A User's token Secret is read again at each resync while the User refers to it, and no
/// more once the User is gone (the source forgets it).
#[tokio::test]
async fn a_deleted_users_token_secret_is_not_read_again() {
    let with_secret = obj(
        "User",
        "sam",
        json!({"tokenSecretRef": {"name": "sam-token", "key": "token"}}),
        json!({}),
    );
    let s = scene_in(
        vec![pool(), user(), with_secret.clone()],
        vec![],
        vec![NS.to_owned()],
        Duration::from_millis(500),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.lists("secrets") < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Secret is read again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.watch_event("users", json!({"type": "DELETED", "object": with_secret}))
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let reads = s.lists("secrets");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(s.lists("secrets"), reads, "read again after its User went");
}
