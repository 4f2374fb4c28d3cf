//! A fake Kubernetes API server, in memory, for tests that need more than a script of
//! requests: the pod runtime driven by the engine's random operations, and the command line's
//! `logs`, `exec` (with a terminal) and `stats` on pods.
//!
//! It serves plain HTTP on 127.0.0.1 what the runtime and the commands use, with the semantics
//! that matter to them:
//! - namespaced objects of any resource (`/api/v1/namespaces/NS/RESOURCE[/NAME]` and
//!   `/apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME]`): create (409 when the name is
//!   taken), get, list and delete (404 when gone; an object with finalizers is only marked
//!   with a `deletionTimestamp` and goes with its last finalizer), delete by collection, JSON
//!   merge patch with the `metadata.resourceVersion` precondition (409 when stale; server-side
//!   apply is taken as a merge), JSON patch (a failed `test` is 422; a missing member tests
//!   equal to null, as on the API server), label selectors; namespaces themselves
//!   (`/api/v1/namespaces[/NAME]`);
//! - watches from a resourceVersion, as the server sends them (an object leaving the selector
//!   is DELETED), `410 Gone` for a version older than the history kept ([`FakeApi::compact`]);
//! - `pods/status` (what a kubelet writes), `pods/log` (with `tailLines` and `follow`), and
//!   `pods/exec` over WebSocket (`v5.channel.k8s.io`: stdin, stdout, stderr, the status
//!   channel with the exit code, resize, stdin's close), running a small set of commands
//!   against an in-memory file system per pod ([`FakeApi::script`] adds more);
//! - faults: the next N requests of a verb on a resource answer a given code
//!   ([`FakeApi::fail`]); open watches can be cut ([`FakeApi::cut_watches`]) or held back ([`FakeApi::hold_watches`]).
//!
//! Nothing is validated beyond that: the real API server's admission is the end-to-end suite's.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Where an object lives: `resource` is `pods`, or `GROUP/RESOURCE` outside the core group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    resource: String,
    namespace: String,
    name: String,
}

struct Change {
    rv: u64,
    key: Key,
    kind: &'static str,
    object: Value,
    before: Option<Value>,
}

struct Fault {
    verb: String,
    resource: String,
    code: u16,
    times: u32,
}

/// What a scripted command answers: exit code, stdout.
type Script = (i64, String);

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// The oldest version a watch may start from; older ones get `410 Gone`.
    compacted: u64,
    faults: Vec<Fault>,
    requests: Vec<String>,
    /// Each pod's files, by `NS/POD` then absolute path.
    files: HashMap<String, BTreeMap<String, Vec<u8>>>,
    execs: Vec<(String, Vec<String>)>,
    logs: HashMap<String, String>,
    resizes: Vec<(u16, u16)>,
    scripts: HashMap<String, Script>,
    /// Bumped to end every open watch.
    cuts: u64,
    /// Open watches deliver nothing while set (a watch lagging behind the API's answers).
    held: bool,
}

struct Inner {
    store: Mutex<Store>,
    changed: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A running fake API server; it stops when dropped.
pub struct FakeApi {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn pod_key(ns: &str, pod: &str) -> String {
    format!("{ns}/{pod}")
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let (changed, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            changed,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .expect("the fake API server's address")
        );
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeApi { url, inner, server }
    }

    /// A client of this server whose default namespace is `default`.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().expect("the fake server's URL"));
        kube::Client::try_from(config).expect("a client of the fake API server")
    }

    /// The objects of `resource` in `namespace`, by name.
    pub fn list(&self, resource: &str, namespace: &str) -> Vec<Value> {
        list_of(&self.inner, resource, namespace)
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .objects
            .get(&Key {
                resource: resource.to_owned(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .cloned()
    }

    /// Creates or replaces `object` directly, as another client would (watches see it).
    pub fn put(&self, resource: &str, namespace: &str, mut object: Value) {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = Key {
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            name,
        };
        let mut s = self.inner.lock();
        let before = s.objects.get(&key).cloned();
        stamp(&mut s, &key, &mut object, before.as_ref());
        let kind = if before.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        record(&mut s, key, kind, object, before);
        drop(s);
        self.inner.notify();
    }

    /// Merges `status` into a pod's status at once, as a kubelet's `pods/status` write.
    pub fn set_pod_status(&self, namespace: &str, pod: &str, status: &Value) -> bool {
        merge_status(&self.inner, namespace, pod, status)
    }

    /// Acts as the kubelet of `namespace` until the server stops: every Pending pod becomes
    /// Running and Ready.
    pub fn run_kubelet(&self, namespace: &str) {
        let inner = self.inner.clone();
        let mut changed = inner.changed.subscribe();
        let namespace = namespace.to_owned();
        tokio::spawn(async move {
            loop {
                let pending: Vec<String> = list_of(&inner, "pods", &namespace)
                    .iter()
                    .filter(|p| p["status"]["phase"] == "Pending")
                    .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
                    .collect();
                for name in pending {
                    merge_status(&inner, &namespace, &name, &running());
                }
                // A pod past its active deadline is stopped and kept, as a kubelet does.
                let overdue: Vec<String> = list_of(&inner, "pods", &namespace)
                    .iter()
                    .filter(|p| p["status"]["phase"] == "Running")
                    .filter(|p| p["spec"]["activeDeadlineSeconds"].is_u64())
                    .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
                    .collect();
                for name in overdue {
                    merge_status(&inner, &namespace, &name, &deadline_exceeded());
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Deletes an object behind the clients' backs; whether it was there.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let key = Key {
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let mut s = self.inner.lock();
        let gone = delete_object(&mut s, &key);
        drop(s);
        self.inner.notify();
        gone
    }

    /// The next `times` requests of `verb` (`create`, `get`, `list`, `watch`, `patch`,
    /// `delete`, `exec`, `log`) on `resource` (`pods`, `services`, `pods/status`, ...) answer
    /// `code`.
    pub fn fail(&self, verb: &str, resource: &str, code: u16, times: u32) {
        self.inner.lock().faults.push(Fault {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            code,
            times,
        });
    }

    /// Forgets the faults not yet answered (the outage is over).
    pub fn clear_faults(&self) {
        self.inner.lock().faults.clear();
    }

    /// Forgets the history: a watch from an older version gets `410 Gone` and must relist.
    pub fn compact(&self) {
        let mut s = self.inner.lock();
        s.history.clear();
        s.compacted = s.rv;
        drop(s);
        self.inner.notify();
    }

    /// While `hold`, open watches deliver nothing; they deliver what they missed, in order,
    /// once released (a watch that lags behind the answers to requests).
    pub fn hold_watches(&self, hold: bool) {
        self.inner.lock().held = hold;
        self.inner.notify();
    }

    /// Ends every open watch (a connection lost); watchers come back from their version.
    pub fn cut_watches(&self) {
        self.inner.lock().cuts += 1;
        self.inner.notify();
    }

    /// Every request so far, as `VERB PATH?QUERY`.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().requests.clone()
    }

    /// A file in a pod's file system, as exec wrote it.
    pub fn file(&self, namespace: &str, pod: &str, path: &str) -> Option<Vec<u8>> {
        self.inner
            .lock()
            .files
            .get(&pod_key(namespace, pod))
            .and_then(|f| f.get(path).cloned())
    }

    /// Every command exec ran: the pod and its argv.
    pub fn execs(&self) -> Vec<(String, Vec<String>)> {
        self.inner.lock().execs.clone()
    }

    /// Adds to a pod's log (a follower sees it).
    pub fn append_log(&self, namespace: &str, pod: &str, text: &str) {
        self.inner
            .lock()
            .logs
            .entry(pod_key(namespace, pod))
            .or_default()
            .push_str(text);
        self.inner.notify();
    }

    /// The terminal sizes exec sessions were given, as (rows, columns).
    pub fn resizes(&self) -> Vec<(u16, u16)> {
        self.inner.lock().resizes.clone()
    }

    /// What a command run by exec answers, when its argv joined by spaces is `command`.
    pub fn script(&self, command: &str, exit_code: i64, stdout: &str) {
        self.inner
            .lock()
            .scripts
            .insert(command.to_owned(), (exit_code, stdout.to_owned()));
    }
}

/// A pod's status with its one container in `state` (ready when the pod is `Running`).
fn pod_status(phase: &str, state: Value) -> Value {
    let now = now();
    let ready = if phase == "Running" { "True" } else { "False" };
    json!({
        "phase": phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": "instance", "ready": phase == "Running", "restartCount": 0,
            "image": "fake", "imageID": "", "state": state,
        }],
    })
}

/// A running, ready pod's status.
pub fn running() -> Value {
    let mut s = pod_status("Running", json!({"running": {"startedAt": now()}}));
    s["hostIP"] = json!("10.0.0.1");
    s["podIP"] = json!("10.244.0.9");
    s
}

/// The status a kubelet gives a pod it stopped at its active deadline.
pub fn deadline_exceeded() -> Value {
    let mut s = pod_status(
        "Failed",
        json!({"terminated": {"exitCode": 143, "reason": "Error"}}),
    );
    s["reason"] = json!("DeadlineExceeded");
    s["message"] = json!("Pod was active on the node longer than the specified deadline");
    s
}

// ---- the store ----------------------------------------------------------------------------------

fn list_of(inner: &Inner, resource: &str, namespace: &str) -> Vec<Value> {
    inner
        .lock()
        .objects
        .iter()
        .filter(|(k, _)| k.resource == resource && k.namespace == namespace)
        .map(|(_, v)| v.clone())
        .collect()
}

fn merge_status(inner: &Inner, namespace: &str, pod: &str, status: &Value) -> bool {
    let key = Key {
        resource: "pods".to_owned(),
        namespace: namespace.to_owned(),
        name: pod.to_owned(),
    };
    let mut s = inner.lock();
    let Some(before) = s.objects.get(&key).cloned() else {
        return false;
    };
    let mut after = before.clone();
    json_patch::merge(&mut after["status"], status);
    stamp(&mut s, &key, &mut after, Some(&before));
    record(&mut s, key, "MODIFIED", after, Some(before));
    drop(s);
    inner.notify();
    true
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Gives `object` its server-side fields: name, namespace, uid and creation time kept from
/// `before`, a new resourceVersion.
fn stamp(s: &mut Store, key: &Key, object: &mut Value, before: Option<&Value>) {
    s.rv += 1;
    let meta = &mut object["metadata"];
    if !meta.is_object() {
        *meta = json!({});
    }
    meta["name"] = json!(key.name);
    meta["namespace"] = json!(key.namespace);
    meta["resourceVersion"] = json!(s.rv.to_string());
    let kept = |field: &str| before.map(|b| b["metadata"][field].clone());
    meta["uid"] = kept("uid").unwrap_or_else(|| json!(format!("uid-{}", s.rv)));
    meta["creationTimestamp"] = kept("creationTimestamp").unwrap_or_else(|| json!(now()));
}

fn record(s: &mut Store, key: Key, kind: &'static str, object: Value, before: Option<Value>) {
    let rv = s.rv;
    if kind == "DELETED" {
        s.objects.remove(&key);
    } else {
        s.objects.insert(key.clone(), object.clone());
    }
    s.history.push(Change {
        rv,
        key,
        kind,
        object,
        before,
    });
}

fn delete_object(s: &mut Store, key: &Key) -> bool {
    let Some(mut gone) = s.objects.get(key).cloned() else {
        return false;
    };
    s.rv += 1;
    gone["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    if key.resource == "pods" {
        let pk = pod_key(&key.namespace, &key.name);
        s.files.remove(&pk);
        s.logs.remove(&pk);
    }
    record(s, key.clone(), "DELETED", gone, None);
    true
}

/// Whether `object`'s labels satisfy `selector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, joined by
/// commas).
fn selects(selector: &str, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k.trim()) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                label(k.trim()).is_none()
            } else {
                label(term).is_some()
            }
        })
}

// ---- requests -----------------------------------------------------------------------------------

/// What a path names.
struct Target {
    resource: String,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        // Namespaces themselves: cluster-scoped, kept under the namespace "".
        ["api", "v1", "namespaces"] | ["api", "v1", "namespaces", _] => {
            return Some(Target {
                resource: "namespaces".to_owned(),
                namespace: String::new(),
                name: parts.get(3).map(|n| (*n).to_owned()),
                sub: None,
            });
        }
        ["api", "v1", "namespaces", rest @ ..] => (None, rest),
        ["apis", group, _version, "namespaces", rest @ ..] => (Some(*group), rest),
        _ => return None,
    };
    let (namespace, resource, name, sub) = match rest {
        [ns, res] => (*ns, *res, None, None),
        [ns, res, name] => (*ns, *res, Some(*name), None),
        [ns, res, name, sub] => (*ns, *res, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Target {
        resource: group.map_or_else(|| resource.to_owned(), |g| format!("{g}/{resource}")),
        namespace: namespace.to_owned(),
        name: name.map(str::to_owned),
        sub: sub.map(str::to_owned),
    })
}

fn query(req: &Request) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn flag(q: &[(String, String)], key: &str) -> bool {
    matches!(param(q, key), Some("true" | "1"))
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    respond(code, &body)
}

fn respond(code: u16, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn not_found(t: &Target, name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", t.resource),
    )
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let asked = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), ToString::to_string);
    let q = query(&req);
    let Some(t) = parse_path(&path) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let verb = match (req.method(), &t.name, t.sub.as_deref()) {
        (_, Some(_), Some("exec")) => "exec",
        (_, Some(_), Some("log")) => "log",
        (&Method::GET, None, _) if flag(&q, "watch") => "watch",
        (&Method::GET, None, _) => "list",
        (&Method::GET, Some(_), _) => "get",
        (&Method::POST, None, _) => "create",
        (&Method::PATCH, _, _) => "patch",
        (&Method::PUT, _, _) => "update",
        (&Method::DELETE, None, _) => "deletecollection",
        (&Method::DELETE, Some(_), _) => "delete",
        _ => return status(405, "MethodNotAllowed", "method not allowed"),
    };
    let resource = match (&t.sub, verb) {
        (Some(sub), "get" | "patch" | "update") => format!("{}/{sub}", t.resource),
        _ => t.resource.clone(),
    };
    {
        let mut s = inner.lock();
        s.requests.push(format!("{} {asked}", req.method()));
        if let Some(f) = s
            .faults
            .iter_mut()
            .find(|f| f.times > 0 && f.verb == verb && f.resource == resource)
        {
            f.times -= 1;
            let code = f.code;
            return status(
                code,
                "Injected",
                &format!("injected fault on {verb} {resource}"),
            );
        }
    }
    match verb {
        "exec" => exec(inner, t, q, req).await,
        "log" => log(inner, &t, &q).await,
        "watch" => watch_objects(inner, t, &q),
        "list" => list(&inner, &t, &q),
        "get" => get(&inner, &t),
        "deletecollection" => delete_collection(&inner, &t, &q),
        "delete" => {
            let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            let options: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            delete(&inner, &t, &options)
        }
        "create" | "patch" | "update" => {
            let json_patch_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json-patch+json"));
            let bytes = match axum::body::to_bytes(req.into_body(), 64 << 20).await {
                Ok(b) => b,
                Err(e) => return status(400, "BadRequest", &e.to_string()),
            };
            let body: Value = match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", &format!("invalid JSON: {e}")),
            };
            match verb {
                "create" => create(&inner, &t, body),
                "patch" if json_patch_type => json_patch_object(&inner, &t, &body),
                _ => patch(&inner, &t, &body, verb == "update"),
            }
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn key_of(t: &Target, name: &str) -> Key {
    Key {
        resource: t.resource.clone(),
        namespace: t.namespace.clone(),
        name: name.to_owned(),
    }
}

fn list(inner: &Inner, t: &Target, q: &[(String, String)]) -> Response {
    let selector = param(q, "labelSelector").unwrap_or_default();
    let s = inner.lock();
    let items: Vec<Value> = s
        .objects
        .iter()
        .filter(|(k, v)| {
            k.resource == t.resource && k.namespace == t.namespace && selects(selector, v)
        })
        .map(|(_, v)| v.clone())
        .collect();
    respond(
        200,
        &json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        }),
    )
}

fn get(inner: &Inner, t: &Target) -> Response {
    let name = t.name.clone().unwrap_or_default();
    match inner.lock().objects.get(&key_of(t, &name)) {
        Some(v) => respond(200, v),
        None => not_found(t, &name),
    }
}

fn create(inner: &Inner, t: &Target, mut body: Value) -> Response {
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() {
        return status(422, "Invalid", "metadata.name: Required value");
    }
    let key = key_of(t, &name);
    let mut s = inner.lock();
    if s.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", t.resource),
        );
    }
    if t.resource == "pods" && body["status"].is_null() {
        body["status"] = json!({"phase": "Pending"});
    }
    stamp(&mut s, &key, &mut body, None);
    record(&mut s, key, "ADDED", body.clone(), None);
    drop(s);
    inner.notify();
    respond(201, &body)
}

/// A merge patch (or, with `replace`, a whole object) of the object or its status.
fn patch(inner: &Inner, t: &Target, body: &Value, replace: bool) -> Response {
    let name = t.name.clone().unwrap_or_default();
    let key = key_of(t, &name);
    let s = inner.lock();
    let Some(before) = s.objects.get(&key).cloned() else {
        return not_found(t, &name);
    };
    let current = before["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if let Some(wanted) = body["metadata"]["resourceVersion"].as_str()
        && wanted != current
    {
        return status(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                t.resource
            ),
        );
    }
    let mut after = before.clone();
    if replace {
        after = body.clone();
    } else {
        json_patch::merge(&mut after, body);
    }
    commit_patch(inner, s, t, key, before, after, body)
}

/// A JSON patch (RFC 6902) of the object or its status: a failed `test` answers 422, as the
/// API server does.
fn json_patch_object(inner: &Inner, t: &Target, body: &Value) -> Response {
    let name = t.name.clone().unwrap_or_default();
    let key = key_of(t, &name);
    let s = inner.lock();
    let Some(before) = s.objects.get(&key).cloned() else {
        return not_found(t, &name);
    };
    let ops: json_patch::Patch = match serde_json::from_value(body.clone()) {
        Ok(p) => p,
        Err(e) => return status(400, "BadRequest", &format!("invalid JSON patch: {e}")),
    };
    // As the API server's JSON patch has it, a missing member tests equal to null.
    let ops: Vec<_> = ops
        .0
        .into_iter()
        .filter(|op| {
            !matches!(op, json_patch::PatchOperation::Test(t)
                if t.value.is_null() && before.pointer(t.path.as_str()).is_none())
        })
        .collect();
    let mut after = before.clone();
    if let Err(e) = json_patch::patch(&mut after, &ops) {
        return status(
            422,
            "Invalid",
            &format!("the JSON patch was not applied: {e}"),
        );
    }
    commit_patch(inner, s, t, key, before, after, &Value::Null)
}

/// Stores a patched object: the subresource's rules, a new resourceVersion and a MODIFIED event
/// (none when nothing changed), and the object's end once it is being deleted and its last
/// finalizer is gone.
fn commit_patch(
    inner: &Inner,
    mut s: MutexGuard<'_, Store>,
    t: &Target,
    key: Key,
    before: Value,
    mut after: Value,
    body: &Value,
) -> Response {
    let status_only = t.sub.as_deref() == Some("status");
    // The main resource keeps its status; the status subresource changes nothing else; the
    // resize subresource changes only containers' resources (matched by name, as a strategic
    // merge patch does).
    if t.sub.as_deref() == Some("resize") {
        after = before.clone();
        for c in body["spec"]["containers"].as_array().into_iter().flatten() {
            let containers = after["spec"]["containers"].as_array_mut();
            if let Some(mine) = containers
                .into_iter()
                .flatten()
                .find(|m| m["name"] == c["name"])
            {
                json_patch::merge(&mut mine["resources"], &c["resources"]);
            }
        }
    } else if status_only {
        let new_status = after["status"].clone();
        after = before.clone();
        after["status"] = new_status;
    } else if t.resource == "pods" {
        after["status"] = before["status"].clone();
    }
    if after == before {
        return respond(200, &before);
    }
    stamp(&mut s, &key, &mut after, Some(&before));
    let finished = !after["metadata"]["deletionTimestamp"].is_null() && !has_finalizers(&after);
    record(&mut s, key.clone(), "MODIFIED", after.clone(), Some(before));
    if finished {
        delete_object(&mut s, &key);
    }
    drop(s);
    inner.notify();
    respond(200, &after)
}

fn has_finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// Deletes an object; the options' `preconditions.uid` must match when given.
fn delete(inner: &Inner, t: &Target, options: &Value) -> Response {
    let name = t.name.clone().unwrap_or_default();
    let key = key_of(t, &name);
    let mut s = inner.lock();
    let Some(before) = s.objects.get(&key).cloned() else {
        return not_found(t, &name);
    };
    if let Some(uid) = options["preconditions"]["uid"].as_str()
        && before["metadata"]["uid"].as_str() != Some(uid)
    {
        return status(
            409,
            "Conflict",
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                before["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        );
    }
    if has_finalizers(&before) {
        // Held by its finalizers: marked, and gone when the last one is removed.
        if before["metadata"]["deletionTimestamp"].is_null() {
            let mut marked = before.clone();
            marked["metadata"]["deletionTimestamp"] = json!(now());
            stamp(&mut s, &key, &mut marked, Some(&before));
            record(&mut s, key, "MODIFIED", marked.clone(), Some(before));
            drop(s);
            inner.notify();
            return respond(202, &marked);
        }
        return respond(202, &before);
    }
    delete_object(&mut s, &key);
    drop(s);
    inner.notify();
    respond(200, &before)
}

fn delete_collection(inner: &Inner, t: &Target, q: &[(String, String)]) -> Response {
    let selector = param(q, "labelSelector").unwrap_or_default();
    let mut s = inner.lock();
    let keys: Vec<Key> = s
        .objects
        .iter()
        .filter(|(k, v)| {
            k.resource == t.resource && k.namespace == t.namespace && selects(selector, v)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in &keys {
        delete_object(&mut s, k);
    }
    let rv = s.rv;
    drop(s);
    inner.notify();
    respond(
        200,
        &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv.to_string()}, "items": []}),
    )
}

/// The events a watch from `since` sends, as the server does: an object leaving the selector
/// is DELETED, one entering it ADDED. `Err` when `since` is older than the history.
fn events_since(s: &Store, t: &Target, selector: &str, since: u64) -> Result<Vec<Value>, ()> {
    if since < s.compacted {
        return Err(());
    }
    let mut out = Vec::new();
    // The history is in version order.
    let from = s.history.partition_point(|c| c.rv <= since);
    for c in &s.history[from..] {
        if c.key.resource != t.resource || c.key.namespace != t.namespace {
            continue;
        }
        let now = selects(selector, &c.object);
        let was = c.before.as_ref().is_some_and(|b| selects(selector, b));
        let kind = match (c.kind, was, now) {
            ("MODIFIED", true, true) => "MODIFIED",
            ("MODIFIED", false, true) | ("ADDED", _, true) => "ADDED",
            ("MODIFIED", true, false) | ("DELETED", _, true) => "DELETED",
            _ => continue,
        };
        out.push(json!({"type": kind, "object": c.object}));
    }
    Ok(out)
}

fn watch_objects(inner: Arc<Inner>, t: Target, q: &[(String, String)]) -> Response {
    let selector = param(q, "labelSelector").unwrap_or_default().to_owned();
    let mut since: u64 = param(q, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| inner.lock().rv);
    let timeout = param(q, "timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let mut changed = inner.changed.subscribe();
    let cuts = inner.lock().cuts;
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let (events, rv, cut, held) = {
                let s = inner.lock();
                let events = if s.held {
                    Ok(Vec::new())
                } else {
                    events_since(&s, &t, &selector, since)
                };
                (events, s.rv, s.cuts != cuts, s.held)
            };
            if cut {
                return;
            }
            let Ok(events) = events else {
                let gone = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {since}"),
                    "reason": "Expired", "code": 410,
                }});
                let _ = tx.send(Ok(Bytes::from(format!("{gone}\n")))).await;
                return;
            };
            for e in events {
                if tx.send(Ok(Bytes::from(format!("{e}\n")))).await.is_err() {
                    return;
                }
            }
            if !held {
                since = rv;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    });
    let mut r = streamed(rx);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A response whose body is what arrives on `rx`, until its sender goes.
fn streamed(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::new(Body::from_stream(stream))
}

// ---- pods/log -----------------------------------------------------------------------------------

fn tail(text: &str, lines: Option<usize>) -> String {
    let Some(n) = lines else {
        return text.to_owned();
    };
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    all[all.len().saturating_sub(n)..].concat()
}

async fn log(inner: Arc<Inner>, t: &Target, q: &[(String, String)]) -> Response {
    let name = t.name.clone().unwrap_or_default();
    let pk = pod_key(&t.namespace, &name);
    let key = key_of(t, &name);
    let lines = param(q, "tailLines").and_then(|v| v.parse().ok());
    let text = {
        let s = inner.lock();
        if !s.objects.contains_key(&key) {
            return not_found(t, &name);
        }
        s.logs.get(&pk).cloned().unwrap_or_default()
    };
    if !flag(q, "follow") {
        return Response::new(Body::from(tail(&text, lines)));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let mut changed = inner.changed.subscribe();
    tokio::spawn(async move {
        let mut sent = text.len();
        if tx.send(Ok(Bytes::from(tail(&text, lines)))).await.is_err() {
            return;
        }
        while changed.changed().await.is_ok() {
            let (more, alive) = {
                let s = inner.lock();
                let log = s.logs.get(&pk).map(String::as_str).unwrap_or_default();
                (
                    log.get(sent..).unwrap_or_default().to_owned(),
                    s.objects.contains_key(&key),
                )
            };
            if !more.is_empty() {
                sent += more.len();
                if tx.send(Ok(Bytes::from(more))).await.is_err() {
                    return;
                }
            }
            if !alive {
                return;
            }
        }
    });
    streamed(rx)
}

// ---- pods/exec ----------------------------------------------------------------------------------

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// What one exec session gets: its stdin (None once closed) and terminal sizes.
struct Session {
    stdin: mpsc::UnboundedReceiver<Vec<u8>>,
    sizes: watch::Receiver<Option<(u16, u16)>>,
    out: mpsc::UnboundedSender<(u8, Vec<u8>)>,
}

impl Session {
    async fn read_all(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = self.stdin.recv().await {
            all.extend(chunk);
        }
        all
    }

    fn say(&self, channel: u8, text: impl Into<Vec<u8>>) {
        let _ = self.out.send((channel, text.into()));
    }
}

async fn exec(
    inner: Arc<Inner>,
    t: Target,
    q: Vec<(String, String)>,
    mut req: Request,
) -> Response {
    let name = t.name.clone().unwrap_or_default();
    let phase = inner
        .lock()
        .objects
        .get(&key_of(&t, &name))
        .map(|p| p["status"]["phase"].as_str().unwrap_or_default().to_owned());
    match phase.as_deref() {
        None => return not_found(&t, &name),
        Some("Running") => {}
        Some(other) => {
            return status(
                400,
                "BadRequest",
                &format!(
                    "pod {name} is not running (phase {other:?}); exec needs a running container"
                ),
            );
        }
    }
    let argv: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let protocols = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return status(400, "BadRequest", "exec needs a WebSocket upgrade");
    };
    if !protocols
        .split(',')
        .any(|p| p.trim() == "v5.channel.k8s.io")
    {
        return status(400, "BadRequest", "this fake speaks v5.channel.k8s.io only");
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return status(400, "BadRequest", "the connection cannot be upgraded");
    };
    inner.lock().execs.push((name.clone(), argv.clone()));
    let pod = pod_key(&t.namespace, &name);
    let with_stdin = flag(&q, "stdin");
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        session(inner, pod, argv, with_stdin, ws).await;
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("v5.channel.k8s.io"),
    );
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

async fn session<S>(
    inner: Arc<Inner>,
    pod: String,
    argv: Vec<String>,
    with_stdin: bool,
    ws: WebSocketStream<S>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, mut recv) = ws.split();
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let (size_tx, sizes) = watch::channel(None);
    let (out, mut out_rx) = mpsc::unbounded_channel::<(u8, Vec<u8>)>();
    let reader_inner = inner.clone();
    let reader = tokio::spawn(async move {
        let mut stdin_tx = with_stdin.then_some(stdin_tx);
        while let Some(Ok(m)) = recv.next().await {
            let Message::Binary(b) = m else { continue };
            match (b.first(), b.get(1)) {
                (Some(&STDIN), _) => {
                    if let Some(tx) = &stdin_tx {
                        let _ = tx.send(b[1..].to_vec());
                    }
                }
                (Some(&CLOSE), Some(&STDIN)) => stdin_tx = None,
                (Some(&RESIZE), _) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&b[1..]) {
                        let size = (
                            u16::try_from(v["Height"].as_u64().unwrap_or(0)).unwrap_or(0),
                            u16::try_from(v["Width"].as_u64().unwrap_or(0)).unwrap_or(0),
                        );
                        reader_inner.lock().resizes.push(size);
                        let _ = size_tx.send(Some(size));
                    }
                }
                _ => {}
            }
        }
    });
    let mut s = Session {
        stdin: stdin_rx,
        sizes,
        out,
    };
    let runner = tokio::spawn(async move {
        // A pod deleted under a command ends it, as its container's death would.
        let mut changed = inner.changed.subscribe();
        let (ns, name) = pod.split_once('/').unwrap_or_default();
        let key = Key {
            resource: "pods".to_owned(),
            namespace: ns.to_owned(),
            name: name.to_owned(),
        };
        let gone = async {
            while inner.lock().objects.contains_key(&key) {
                if changed.changed().await.is_err() {
                    break;
                }
            }
        };
        let code = tokio::select! {
            code = run(&inner, &pod, &argv, &mut s) => code,
            () = gone => 137,
        };
        let status = if code == 0 {
            json!({"metadata": {}, "status": "Success"})
        } else {
            json!({"metadata": {}, "status": "Failure",
                "message": format!("command terminated with non-zero exit code: {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
        };
        s.say(STATUS, status.to_string());
    });
    while let Some((channel, bytes)) = out_rx.recv().await {
        let mut frame = Vec::with_capacity(bytes.len() + 1);
        frame.push(channel);
        frame.extend(bytes);
        if send.send(Message::binary(frame)).await.is_err() {
            break;
        }
        if channel == STATUS {
            break;
        }
    }
    let _ = send.close().await;
    runner.abort();
    reader.abort();
}

/// The commands a pod of this fake knows.
async fn run(inner: &Inner, pod: &str, argv: &[String], s: &mut Session) -> i64 {
    let joined = argv.join(" ");
    if let Some((code, out)) = inner.lock().scripts.get(&joined).cloned() {
        s.say(STDOUT, out);
        return code;
    }
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["true"] => 0,
        ["false"] => 1,
        ["echo", rest @ ..] => {
            s.say(STDOUT, format!("{}\n", rest.join(" ")));
            0
        }
        ["sh", "-c", script] if script.starts_with("exit ") => {
            script[5..].trim().parse().unwrap_or(2)
        }
        ["mkdir", "-p", _] => 0,
        // Echoes its stdin, chunk by chunk (a terminal session's stand-in).
        ["cat"] => {
            while let Some(chunk) = s.stdin.recv().await {
                s.say(STDOUT, chunk);
            }
            0
        }
        ["cat", path] => {
            let file = inner
                .lock()
                .files
                .get(pod)
                .and_then(|f| f.get(*path).cloned());
            match file {
                Some(bytes) => {
                    s.say(STDOUT, bytes);
                    0
                }
                None => {
                    s.say(STDERR, format!("cat: {path}: No such file or directory\n"));
                    1
                }
            }
        }
        // The terminal's size, once the client has sent one.
        ["stty", "size"] => {
            let size =
                tokio::time::timeout(Duration::from_secs(5), s.sizes.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|v| *v);
            match size {
                Some((rows, cols)) => {
                    s.say(STDOUT, format!("{rows} {cols}\n"));
                    0
                }
                None => {
                    s.say(
                        STDERR,
                        "stty: 'standard input': Inappropriate ioctl for device\n",
                    );
                    1
                }
            }
        }
        ["tar", "-x", ..] => {
            let bytes = s.read_all().await;
            let mut archive = tar::Archive::new(bytes.as_slice());
            let Ok(entries) = archive.entries() else {
                s.say(STDERR, "tar: This does not look like a tar archive\n");
                return 2;
            };
            let mut files = Vec::new();
            for entry in entries {
                let Ok(mut entry) = entry else {
                    s.say(STDERR, "tar: damaged archive\n");
                    return 2;
                };
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let path = entry
                    .path()
                    .map(|p| format!("/{}", p.display().to_string().trim_start_matches('/')))
                    .unwrap_or_default();
                let mut content = Vec::new();
                if std::io::Read::read_to_end(&mut entry, &mut content).is_err() {
                    s.say(STDERR, "tar: damaged archive\n");
                    return 2;
                }
                files.push((path, content));
            }
            inner
                .lock()
                .files
                .entry(pod.to_owned())
                .or_default()
                .extend(files);
            0
        }
        _ => {
            s.say(
                STDERR,
                format!("{}: command not found\n", args.first().unwrap_or(&"")),
            );
            127
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        assert!(selects("a=1,b==2", &o));
        assert!(selects("a,!c", &o));
        assert!(selects("a!=2", &o));
        assert!(!selects("a=2", &o));
        assert!(!selects("c", &o));
        assert!(selects("", &o));
    }

    #[test]
    fn paths_name_the_resource_and_subresource() {
        let t = parse_path("/api/v1/namespaces/ns/pods/p/exec").expect("a path");
        assert_eq!(
            (
                t.resource.as_str(),
                t.namespace.as_str(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("pods", "ns", Some("p"), Some("exec"))
        );
        let t =
            parse_path("/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies").expect("a path");
        assert_eq!(t.resource, "networking.k8s.io/networkpolicies");
        assert!(t.name.is_none());
        assert!(parse_path("/version").is_none());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail("a\nb\n", Some(5)), "a\nb\n");
        assert_eq!(tail("a\nb\n", None), "a\nb\n");
    }
}
