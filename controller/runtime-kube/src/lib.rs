//! The Kubernetes runtime: a pool's instance is a Pod (with a Service per instance for its
//! exposure), created warm so that binding a claim creates nothing.
//!
//! - Ownership: the labels every runtime uses (managed, pool, template hash, controller), an
//!   ownerReference to the Pool where one exists in the pods' namespace (so that the cluster's
//!   garbage collector cleans up if poolkeeper is gone), and the Service owned by its Pod.
//! - Readiness: the template's probe is the pod's `readinessProbe`; an instance is warm when
//!   the pod's `Ready` condition is True. Changes behind our back come from a pod watch.
//! - Bindings live on the pods ([`Runtime::keeps_bindings`]): the label `poolkeeper.dev/claim`
//!   is set with the pod's resourceVersion as a precondition before the claim is reported
//!   Bound, so that two controllers, or a stale one, never bind one pod twice; a controller
//!   whose disk is empty rebuilds every binding from the pods.
//! - Reset: `Recreate` deletes the pod; `Restart` deletes it and creates it again under the
//!   same name; `Exec` runs the reset command through pods/exec. Files go in through pods/exec
//!   (`tar -x` on stdin).
//! - Deployments: each container a pod, reachable by its name through a headless Service; a
//!   network is a NetworkPolicy, a named volume a PersistentVolumeClaim.
//!
//! Every request goes through [`pods`] (what is sent) and this file (when); the mocked API
//! server tests in `tests/` script each one.

pub mod pods;
pub mod standin;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, AttachParams, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use poolkeeper_runtime::{
    ExecOutput, Instance, InstanceSpec, LABEL_CONTROLLER, LABEL_MANAGED, LABEL_POOL,
    LABEL_QUARANTINED, NodeStatus, RESET_CLEARS, RecordedBinding, Result, Runtime, RuntimeError,
    RuntimeEvent,
};

pub use pods::{ANNOTATION_EXPOSURE, ANNOTATION_PORTS, instance_of};

/// Where and as whom the runtime makes pods.
#[derive(Clone, Debug)]
pub struct KubeRuntimeConfig {
    /// The namespace of every pod and Service.
    pub namespace: String,
    /// The value of `poolkeeper.dev/controller` on what this controller makes.
    pub controller_id: String,
    /// How long a deleted pod may take to stop (`terminationGracePeriodSeconds`).
    pub grace_seconds: u32,
}

/// A pod's resourceVersion and the claim it recorded, by pod name.
type Seen = HashMap<String, (String, Option<String>)>;

/// Each pool's owner (none without a Pool object) and when it was read, by pool name.
type Owners = HashMap<String, (Option<pods::Owner>, std::time::Instant)>;

#[derive(Clone)]
pub struct KubeRuntime {
    client: Client,
    config: Arc<KubeRuntimeConfig>,
    /// Each pod's last resourceVersion seen (watch, create, patch) and the claim it recorded
    /// then, for the bind precondition.
    versions: Arc<Mutex<Seen>>,
    /// The load-balancer address of each LoadBalancer instance's Service, once assigned.
    ingress: Arc<Mutex<HashMap<String, String>>>,
    /// Why the pod watch fails, while it does.
    watch_error: Arc<Mutex<Option<String>>>,
    /// Each pool's owner as last read, and when: a pool fills with many pods at once, and each
    /// would read the same Pool again (see `OWNER_FRESH`).
    owners: Arc<Mutex<Owners>>,
    /// Held while a Pool is read: the creations that missed together read it once.
    owner_read: Arc<tokio::sync::Mutex<()>>,
    /// The uids of the pods that restarts deleted to make again under their name. The watch's
    /// deletion of such a uid is a restart's, not the instance's end (the restart's result
    /// tells the engine), and is not reported. Every uid is kept until its deletion is seen:
    /// two restarts of one instance in a row may both come before the watch reports the first.
    /// A deletion that falls in a gap of the watch is never reported: a relist forgets the uids
    /// it does not list (see `forget_unlisted_restarts`).
    replaced: Arc<Mutex<HashSet<String>>>,
}

/// How long a Pool's uid is taken as read. A Pool deleted and declared again within it gives
/// the pods made meanwhile an owner that is gone: the cluster's garbage collector removes them
/// and the pool makes them again, as after any pod deleted behind its back.
const OWNER_FRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// What the runtime's watch sees.
#[allow(clippy::large_enum_variant)] // one at a time, straight from the stream
enum Watched {
    Pod(watcher::Event<Pod>),
    Service(watcher::Event<Service>),
}

fn api_err(e: kube::Error, what: &str) -> RuntimeError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => RuntimeError::NotFound(what.to_owned()),
        kube::Error::Api(s) if s.code == 409 => RuntimeError::Conflict {
            instance: what.to_owned(),
            reason: s.message.clone(),
            holder: None,
        },
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => {
            RuntimeError::Unavailable(format!("{what}: {}", s.message))
        }
        kube::Error::Api(s) => RuntimeError::Failed(format!("{what}: {}", s.message)),
        _ => RuntimeError::Unavailable(format!("{what}: {e}")),
    }
}

/// Whether the pod's containers run: phase Running, not being deleted, and every container
/// whose state the kubelet reported in the running state.
fn pod_running(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && pod.metadata.deletion_timestamp.is_none()
        && status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .all(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// What the API server said, or the error itself.
fn message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Creates `obj`; one of that name already there is fine (creates are idempotent).
async fn create_once<K>(api: &Api<K>, obj: &K, what: &str) -> Result<()>
where
    K: Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 409) => Ok(()),
        Err(e) => Err(api_err(e, what)),
    }
}

/// Deletes `name`; one already gone is fine.
async fn delete_gone<K>(api: &Api<K>, name: &str, dp: &DeleteParams) -> Result<()>
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match api.delete(name, dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, 404) => Ok(()),
        Err(e) => Err(api_err(e, name)),
    }
}

impl KubeRuntime {
    pub fn new(client: Client, config: KubeRuntimeConfig) -> Self {
        KubeRuntime {
            client,
            config: Arc::new(config),
            versions: Arc::default(),
            ingress: Arc::default(),
            watch_error: Arc::default(),
            owners: Arc::default(),
            owner_read: Arc::default(),
            replaced: Arc::default(),
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn policies(&self) -> Api<NetworkPolicy> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// What a deployment's container needs before its pod: its named volumes' claims, the
    /// headless Service that gives it its name (one per container, shared by its replicas),
    /// and the policy that admits its published ports past its network's.
    async fn deployment_parts(&self, spec: &InstanceSpec) -> Result<()> {
        let ns = &self.config.namespace;
        let dep = spec
            .labels
            .get(poolkeeper_runtime::LABEL_DEPLOYMENT)
            .cloned()
            .unwrap_or_default();
        for volume in spec.volumes.keys() {
            let pvc = pods::pvc_for(volume, ns, &dep, &self.config.controller_id);
            create_once(&self.claims(), &pvc, &pods::pvc_name(volume)).await?;
        }
        if let Some(svc) = pods::container_service(spec, ns) {
            let name = svc.name_any();
            match self.services().create(&PostParams::default(), &svc).await {
                Ok(_) => {}
                Err(e) if is_code(&e, 409) => {
                    let existing = self
                        .services()
                        .get(&name)
                        .await
                        .map_err(|e| api_err(e, &name))?;
                    let owner = existing
                        .labels()
                        .get(poolkeeper_runtime::LABEL_DEPLOYMENT)
                        .cloned();
                    if owner.as_deref() != Some(dep.as_str()) {
                        return Err(RuntimeError::Failed(format!(
                            "container {name}: the Service {name} in namespace {ns} belongs to {}; \
                             on the Kubernetes runtime a container's name must be unique in its \
                             namespace (it is its DNS name)",
                            owner
                                .map_or("something else".to_owned(), |d| format!("deployment {d}"))
                        )));
                    }
                }
                Err(e) => return Err(api_err(e, &name)),
            }
        }
        if let Some(policy) = pods::published_policy(spec, ns) {
            create_once(&self.policies(), &policy, &spec.name).await?;
        }
        Ok(())
    }

    /// After a deployment's pod went: its published-ports policy, and its container's Service
    /// once no replica of the container is left.
    async fn after_deployment_pod(
        &self,
        name: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let policy = pods::published_policy_name(name);
        delete_gone(&self.policies(), &policy, &DeleteParams::default()).await?;
        let (Some(dep), Some(container)) = (
            labels.get(poolkeeper_runtime::LABEL_DEPLOYMENT),
            labels.get(poolkeeper_runtime::LABEL_CONTAINER),
        ) else {
            return Ok(());
        };
        let lp = ListParams::default().labels(&format!(
            "{}={dep},{}={container}",
            poolkeeper_runtime::LABEL_DEPLOYMENT,
            poolkeeper_runtime::LABEL_CONTAINER
        ));
        let left = self.pods().list(&lp).await.map_err(|e| api_err(e, name))?;
        let others = left.items.iter().any(|p| {
            p.metadata.name.as_deref() != Some(name) && p.metadata.deletion_timestamp.is_none()
        });
        if !others {
            self.delete_service(container).await?;
        }
        Ok(())
    }

    /// The label selector of everything this controller made.
    pub fn selector(&self) -> String {
        format!(
            "{LABEL_MANAGED}=true,{LABEL_CONTROLLER}={}",
            self.config.controller_id
        )
    }

    fn remember(&self, pod: &Pod) {
        if let (Some(name), Some(rv)) = (&pod.metadata.name, &pod.metadata.resource_version)
            && let Ok(mut v) = self.versions.lock()
        {
            v.insert(
                name.clone(),
                (rv.clone(), pods::claim_of(pod).map(str::to_owned)),
            );
        }
    }

    /// Records a LoadBalancer Service's address; whether it changed.
    fn note_ingress(&self, svc: &Service) -> bool {
        let Some(host) = pods::ingress_of(svc) else {
            return false;
        };
        let Ok(mut m) = self.ingress.lock() else {
            return false;
        };
        m.insert(svc.name_any(), host.clone()) != Some(host)
    }

    /// The instance `pod` is, with its load balancer's address where it has one.
    fn instance(&self, pod: &Pod) -> Option<Instance> {
        let lb = self
            .ingress
            .lock()
            .ok()
            .and_then(|m| m.get(&pod.name_any()).cloned());
        instance_of(pod, lb.as_deref())
    }

    fn set_watch_error(&self, e: Option<String>) {
        if let Ok(mut w) = self.watch_error.lock() {
            *w = e;
        }
    }

    fn forget(&self, name: &str) {
        if let Ok(mut v) = self.versions.lock() {
            v.remove(name);
        }
    }

    /// Whether `pod`'s deletion was a restart's (and is now seen: forgotten).
    fn was_replaced(&self, pod: &Pod) -> bool {
        let Ok(mut replaced) = self.replaced.lock() else {
            return false;
        };
        pod.metadata
            .uid
            .as_ref()
            .is_some_and(|uid| replaced.remove(uid))
    }

    /// A relist is done: of the restarts' deleted uids known when it began (`before`), those it
    /// did not list (`listed`) are gone and their deletion came before the list, so the watch,
    /// which goes on from the list, will never report it. A uid added while the list ran may be
    /// of a pod made after the list was read, whose deletion is still to come: it stays.
    fn forget_unlisted_restarts(&self, before: HashSet<String>, listed: &HashSet<String>) {
        if let Ok(mut replaced) = self.replaced.lock() {
            for uid in before.difference(listed) {
                replaced.remove(uid);
            }
        }
    }

    /// How many restarts' deletions the watch has not reported yet (their uids are kept until
    /// it does, or until a relist shows them gone).
    #[doc(hidden)]
    pub fn restarts_unseen(&self) -> usize {
        self.replaced.lock().map(|r| r.len()).unwrap_or(0)
    }

    fn version_of(&self, name: &str) -> Option<(String, Option<String>)> {
        self.versions.lock().ok()?.get(name).cloned()
    }

    /// The Pool that owns the instance, when the pods' namespace declares one (not with the
    /// directory source).
    async fn owner(&self, spec: &InstanceSpec) -> Option<pods::Owner> {
        let pool = spec.labels.get(LABEL_POOL)?;
        let cached = || {
            let owners = self.owners.lock().ok()?;
            let (owner, at) = owners.get(pool)?;
            (at.elapsed() < OWNER_FRESH).then(|| owner.clone())
        };
        if let Some(owner) = cached() {
            return owner;
        }
        let _reading = self.owner_read.lock().await;
        if let Some(owner) = cached() {
            return owner;
        }
        let api: Api<poolkeeper_kinds::Pool> =
            Api::namespaced(self.client.clone(), &self.config.namespace);
        let owner = match api.get_opt(pool).await {
            Ok(Some(p)) => p.metadata.uid.map(|uid| pods::Owner {
                api_version: "poolkeeper.dev/v1alpha1".to_owned(),
                kind: "Pool".to_owned(),
                name: pool.clone(),
                uid,
            }),
            Ok(None) => None,
            Err(e) if is_code(&e, 403) || is_code(&e, 404) => {
                // Without the CRD (the directory source) or the right to read Pools.
                debug!(%pool, error = %e, "no Pool object to own the instance");
                None
            }
            Err(e) => {
                // Read again next time: a passing failure says nothing about the Pool.
                debug!(%pool, error = %e, "reading the Pool failed; its pod has no owner");
                return None;
            }
        };
        if let Ok(mut owners) = self.owners.lock() {
            owners.insert(pool.clone(), (owner.clone(), std::time::Instant::now()));
        }
        owner
    }

    async fn create_service(&self, spec: &InstanceSpec, pod: &Pod) -> Result<()> {
        let Some(svc) = pods::service_for(spec, &self.config.namespace, pod) else {
            return Ok(());
        };
        match self.services().create(&PostParams::default(), &svc).await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 409) => Ok(()),
            Err(e) if is_code(&e, 422) => Err(RuntimeError::Failed(format!(
                "spec.exposure/spec.hostPorts: the Service for {} was refused: {}",
                spec.name,
                message(&e)
            ))),
            Err(e) => Err(api_err(e, &spec.name)),
        }
    }

    async fn delete_pod(&self, name: &str) -> Result<()> {
        let dp = DeleteParams {
            grace_period_seconds: Some(self.config.grace_seconds),
            ..DeleteParams::default()
        };
        delete_gone(&self.pods(), name, &dp).await
    }

    /// Deletes an instance's Service once its pod (of uid `pod_uid`) is gone, as the cluster's
    /// garbage collector does (a bare API server has none, and a pod deleted while no
    /// controller watched would leave it behind). A Service made since for a new pod of the
    /// same name is left alone.
    async fn drop_orphan_service(&self, name: &str, pod_uid: &str) {
        match self.services().get_opt(name).await {
            Ok(Some(svc)) if pods::owner_pod_uid(&svc) == Some(pod_uid) => {
                self.delete_orphan(&svc).await;
            }
            Ok(_) => {}
            Err(e) => debug!(service = name, error = %e, "cannot read an orphaned Service"),
        }
    }

    /// Deletes `svc`, an orphan, unless it changed into another object since it was read.
    async fn delete_orphan(&self, svc: &Service) {
        let name = svc.name_any();
        let name = name.as_str();
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: svc.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.services().delete(name, &dp).await {
            Ok(_) => debug!(service = name, "deleted the Service of a pod that is gone"),
            Err(e) if is_code(&e, 404) || is_code(&e, 409) => {}
            Err(e) => warn!(service = name, error = %e, "cannot delete an orphaned Service"),
        }
    }

    async fn delete_service(&self, name: &str) -> Result<()> {
        delete_gone(&self.services(), name, &DeleteParams::default()).await
    }

    /// Why the API server refused an exec: a pod that is not running (it answers 400, e.g.
    /// "cannot exec into a container in a completed pod") is [`RuntimeError::NotRunning`], as
    /// the pod read again shows; anything else as the server put it.
    async fn exec_refused(&self, name: &str, e: kube::Error) -> RuntimeError {
        if is_code(&e, 400)
            && let Ok(Some(pod)) = self.pods().get_opt(name).await
            && !pod_running(&pod)
        {
            return RuntimeError::NotRunning(name.to_owned());
        }
        api_err(e, name)
    }

    /// Runs `command` in the instance, feeding `stdin`; returns its exit code and output.
    async fn run(
        &self,
        name: &str,
        command: &[String],
        stdin: Option<Vec<u8>>,
    ) -> Result<ExecOutput> {
        let ap = AttachParams::default()
            .stdin(stdin.is_some())
            .stdout(true)
            .stderr(true);
        let mut proc = match self.pods().exec(name, command.to_vec(), &ap).await {
            Ok(p) => p,
            Err(e) => return Err(self.exec_refused(name, e).await),
        };
        if let (Some(bytes), Some(mut w)) = (stdin, proc.stdin()) {
            w.write_all(&bytes)
                .await
                .map_err(|e| RuntimeError::Failed(format!("exec in {name}: {e}")))?;
            w.shutdown()
                .await
                .map_err(|e| RuntimeError::Failed(format!("exec in {name}: {e}")))?;
        }
        let mut output = String::new();
        let mut out = proc.stdout();
        let mut err = proc.stderr();
        let status = proc.take_status();
        let (o, e) = tokio::join!(read_all(out.as_mut()), read_all(err.as_mut()));
        output.push_str(&o);
        output.push_str(&e);
        let status = match status {
            Some(s) => s.await,
            None => None,
        };
        let _ = proc.join().await;
        Ok(ExecOutput {
            exit_code: exit_code_of(status.as_ref()),
            output,
        })
    }
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>) -> String {
    let mut buf = Vec::new();
    if let Some(r) = r {
        let _ = r.read_to_end(&mut buf).await;
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The exit code an exec's final status tells (`NonZeroExitCode` carries it as a cause).
pub fn exit_code_of(
    status: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
) -> i64 {
    let Some(s) = status else { return -1 };
    if s.status.as_deref() == Some("Success") {
        return 0;
    }
    s.details
        .as_ref()
        .and_then(|d| d.causes.as_ref())
        .and_then(|c| c.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
        .and_then(|c| c.message.as_deref())
        .and_then(|m| m.parse().ok())
        .unwrap_or(-1)
}

impl Runtime for KubeRuntime {
    fn name(&self) -> &'static str {
        "kube"
    }

    /// The cluster as one node: the pods' namespace, how many pods it holds, and whether the
    /// pod watch works.
    fn nodes(&self) -> Vec<NodeStatus> {
        let instances = self.versions.lock().map(|v| v.len()).unwrap_or(0);
        let message = self.watch_error.lock().ok().and_then(|e| e.clone());
        vec![NodeStatus {
            name: "kubernetes".to_owned(),
            url: String::new(),
            address: String::new(),
            state: if message.is_some() {
                "Unreachable"
            } else {
                "Ready"
            }
            .to_owned(),
            instances,
            message,
            api_version: None,
            namespace: Some(self.config.namespace.clone()),
        }]
    }

    /// `node` is already the address a client uses (a Service's DNS name, or a node's IP).
    fn endpoint_host(&self, node: &str) -> String {
        node.to_owned()
    }

    async fn list(&self) -> Result<Vec<Instance>> {
        let lp = ListParams::default().labels(&self.selector());
        // Services first: one whose pod is missing from the later list of pods is an orphan
        // (a pod is made before its Service).
        let services = self
            .services()
            .list(&lp)
            .await
            .map_err(|e| api_err(e, "services"))?;
        let list = self
            .pods()
            .list(&lp)
            .await
            .map_err(|e| api_err(e, "pods"))?;
        let uids: std::collections::HashSet<&str> = list
            .items
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        for svc in &services.items {
            self.note_ingress(svc);
            if pods::owner_pod_uid(svc).is_some_and(|owner| !uids.contains(owner)) {
                self.delete_orphan(svc).await;
            }
        }
        let mut out = Vec::with_capacity(list.items.len());
        for pod in &list.items {
            self.remember(pod);
            out.extend(self.instance(pod));
        }
        Ok(out)
    }

    async fn create(&self, spec: InstanceSpec) -> Result<Instance> {
        if pods::is_deployment(&spec) {
            self.deployment_parts(&spec).await?;
        }
        let owner = self.owner(&spec).await;
        let mut pod = pods::pod_for(
            &spec,
            &self.config.namespace,
            &self.config.controller_id,
            owner.as_ref(),
        )?;
        if let Some(s) = pod.spec.as_mut() {
            s.termination_grace_period_seconds = Some(i64::from(self.config.grace_seconds));
        }
        let made = match self.pods().create(&PostParams::default(), &pod).await {
            Ok(p) => p,
            // A create that timed out earlier, or one a crash left: creates are idempotent.
            Err(e) if is_code(&e, 409) => self
                .pods()
                .get(&spec.name)
                .await
                .map_err(|e| api_err(e, &spec.name))?,
            Err(e) if is_code(&e, 422) => {
                return Err(RuntimeError::Failed(format!(
                    "the pod for {} was refused: {}",
                    spec.name,
                    message(&e)
                )));
            }
            Err(e) => return Err(api_err(e, &spec.name)),
        };
        self.remember(&made);
        if let Err(e) = self.create_service(&spec, &made).await {
            // No half-made instance: the pod goes with its Service.
            let _ = self.delete_pod(&spec.name).await;
            return Err(e);
        }
        self.instance(&made)
            .ok_or_else(|| RuntimeError::Failed(format!("pod {} has no name", spec.name)))
    }

    async fn remove(&self, name: &str) -> Result<()> {
        let labels = match self.pods().get_opt(name).await {
            Ok(p) => p.and_then(|p| p.metadata.labels).unwrap_or_default(),
            Err(e) => return Err(api_err(e, name)),
        };
        self.delete_pod(name).await?;
        if labels.contains_key(poolkeeper_runtime::LABEL_DEPLOYMENT) {
            self.after_deployment_pod(name, &labels).await?;
        } else {
            // Owned by its pod, but a cluster without a garbage collector keeps it.
            self.delete_service(name).await?;
        }
        self.forget(name);
        Ok(())
    }

    async fn restart(&self, name: &str) -> Result<()> {
        let old = self.pods().get(name).await.map_err(|e| api_err(e, name))?;
        let fresh = pods::fresh_copy(&old);
        // Its Service is owned by the old pod, so the garbage collector takes it with the pod:
        // it is made again for the new one.
        let service = if old
            .labels()
            .contains_key(poolkeeper_runtime::LABEL_DEPLOYMENT)
        {
            None
        } else {
            self.services()
                .get_opt(name)
                .await
                .map_err(|e| api_err(e, name))?
        };
        if let (Some(uid), Ok(mut replaced)) = (old.metadata.uid.clone(), self.replaced.lock()) {
            replaced.insert(uid);
        }
        if let Err(e) = self.delete_pod(name).await {
            // Not deleted: a later deletion of it would be its end.
            if let (Some(uid), Ok(mut replaced)) = (old.metadata.uid.as_ref(), self.replaced.lock())
            {
                replaced.remove(uid);
            }
            return Err(e);
        }
        self.delete_service(name).await?;
        // The name is free once the old pod is gone (its grace period, at most).
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(u64::from(self.config.grace_seconds) + 30);
        loop {
            match self.pods().get_opt(name).await {
                Ok(Some(p)) if p.metadata.uid == old.metadata.uid => {}
                Ok(_) => break,
                Err(e) => return Err(api_err(e, name)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Failed(format!(
                    "pod {name} did not go away within its grace period"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let made = self
            .pods()
            .create(&PostParams::default(), &fresh)
            .await
            .map_err(|e| api_err(e, name))?;
        self.remember(&made);
        if let Some(old) = service {
            create_once(&self.services(), &pods::service_again(&old, &made), name).await?;
        }
        Ok(())
    }

    /// An in-place pod resize (Kubernetes 1.33 and later; the `resize` subresource). The kubelet
    /// applies it while the container runs; a node that cannot fit it reports the resize
    /// infeasible on the pod, and the limits stay as they were.
    async fn resize(
        &self,
        name: &str,
        cpu_millis: Option<u64>,
        memory_bytes: Option<u64>,
    ) -> Result<()> {
        if cpu_millis.is_none() && memory_bytes.is_none() {
            return Ok(());
        }
        let patch = pods::resize_patch(cpu_millis, memory_bytes);
        self.pods()
            .patch_subresource(
                "resize",
                name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .map(|p| self.remember(&p))
            .map_err(|e| api_err(e, name))
    }

    /// Stops the pod and keeps it (see `pods::stopping_patch`); its exit comes from the watch.
    /// Starting it again is a `restart`: the pod made anew under its name, without the
    /// deadline.
    async fn stop(&self, name: &str) -> Result<()> {
        match self
            .pods()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&pods::stopping_patch()),
            )
            .await
        {
            Ok(p) => {
                self.remember(&p);
                Ok(())
            }
            Err(e) => Err(api_err(e, name)),
        }
    }

    async fn exec(&self, name: &str, command: &[String]) -> Result<ExecOutput> {
        self.run(name, command, None).await
    }

    async fn put_files(&self, name: &str, dir: &str, files: &[(String, Vec<u8>)]) -> Result<()> {
        let archive = poolkeeper_runtime::tar_of(dir, files)?;
        let mkdir = ["mkdir".to_owned(), "-p".to_owned(), dir.to_owned()];
        let made = self.run(name, &mkdir, None).await?;
        if made.exit_code != 0 {
            return Err(RuntimeError::Failed(format!(
                "mkdir -p {dir} in {name} exited with {}: {}",
                made.exit_code,
                made.output.trim()
            )));
        }
        let untar = ["tar", "-x", "-m", "-f", "-", "-C", "/"].map(str::to_owned);
        let out = self.run(name, &untar, Some(archive)).await?;
        if out.exit_code != 0 {
            return Err(RuntimeError::Failed(format!(
                "tar -x in {name} exited with {}: {}",
                out.exit_code,
                out.output.trim()
            )));
        }
        Ok(())
    }

    async fn logs(&self, name: &str, tail: usize) -> Result<String> {
        let lp = LogParams {
            tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
            ..LogParams::default()
        };
        self.pods()
            .logs(name, &lp)
            .await
            .map_err(|e| api_err(e, name))
    }

    fn follow_logs(&self, name: &str) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let pods = self.pods();
        let name = name.to_owned();
        tokio::spawn(async move {
            let lp = LogParams {
                follow: true,
                tail_lines: Some(0),
                ..LogParams::default()
            };
            let Ok(stream) = pods.log_stream(&name, &lp).await else {
                return;
            };
            let mut lines = stream.lines();
            while let Some(Ok(line)) = lines.next().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// A network is a NetworkPolicy: its pods admit traffic only from one another (and their
    /// published ports from anywhere).
    async fn ensure_network(&self, name: &str) -> Result<()> {
        let policy = pods::network_policy(name, &self.config.namespace);
        create_once(&self.policies(), &policy, &pods::network_policy_name(name)).await
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        delete_gone(
            &self.policies(),
            &pods::network_policy_name(name),
            &DeleteParams::default(),
        )
        .await
    }

    /// The deployment's PersistentVolumeClaims (its named volumes).
    async fn remove_volumes(&self, deployment: &str) -> Result<()> {
        let lp = ListParams::default().labels(&format!(
            "{}={deployment},{}={}",
            poolkeeper_runtime::LABEL_DEPLOYMENT,
            LABEL_CONTROLLER,
            self.config.controller_id
        ));
        let list = self
            .claims()
            .list(&lp)
            .await
            .map_err(|e| api_err(e, deployment))?;
        for pvc in list {
            delete_gone(&self.claims(), &pvc.name_any(), &DeleteParams::default()).await?;
        }
        Ok(())
    }

    fn keeps_bindings(&self) -> bool {
        true
    }

    async fn bind(&self, name: &str, binding: Option<RecordedBinding<'_>>) -> Result<u64> {
        let claim = binding.map(|b| b.claim);
        // A merge patch: the binding's labels set, or after a reset every one it clears null.
        let labels: serde_json::Map<String, serde_json::Value> = match binding {
            Some(b) => (b.labels().into_iter())
                .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                .collect(),
            None => (RESET_CLEARS.into_iter())
                .map(|k| (k.to_owned(), serde_json::Value::Null))
                .collect(),
        };
        // The version the watch last showed; a fresh read when it is stale or unknown.
        let mut version = self.version_of(name);
        for _ in 0..5 {
            let rv = match version.take() {
                Some((_, Some(other))) if claim.is_some() && claim != Some(other.as_str()) => {
                    return Err(RuntimeError::Conflict {
                        instance: name.to_owned(),
                        reason: format!("pod {name} is bound to claim {other}"),
                        holder: Some(other),
                    });
                }
                Some((rv, _)) => rv,
                None => {
                    let pod = self.pods().get(name).await.map_err(|e| api_err(e, name))?;
                    self.remember(&pod);
                    match (pods::claim_of(&pod), claim) {
                        (current, wanted) if current == wanted => {
                            return Ok(pods::revision_of(&pod));
                        }
                        (Some(other), Some(_)) => {
                            return Err(RuntimeError::Conflict {
                                instance: name.to_owned(),
                                reason: format!("pod {name} is bound to claim {other}"),
                                holder: Some(other.to_owned()),
                            });
                        }
                        _ => {}
                    }
                    pod.resource_version().unwrap_or_default()
                }
            };
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": rv,
                    "labels": labels,
                }
            });
            match self
                .pods()
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(p) => {
                    self.remember(&p);
                    return Ok(pods::revision_of(&p));
                }
                // Changed since: read it again (a status update, or another controller).
                Err(e) if is_code(&e, 409) => continue,
                Err(e) => return Err(api_err(e, name)),
            }
        }
        Err(RuntimeError::Conflict {
            instance: name.to_owned(),
            reason: format!("pod {name} kept changing while it was being bound"),
            holder: None,
        })
    }

    async fn quarantine(&self, name: &str) -> Result<()> {
        let patch = serde_json::json!({"metadata": {"labels": {LABEL_QUARANTINED: "true"}}});
        let params = PatchParams::default();
        match self
            .pods()
            .patch(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(p) => {
                self.remember(&p);
                Ok(())
            }
            Err(e) => Err(api_err(e, name)),
        }
    }

    /// Pods and this controller's Services, watched together: a pod's change is an instance's;
    /// a load balancer's address assigned (or changed) is its pod's too.
    fn subscribe(&self) -> mpsc::UnboundedReceiver<RuntimeEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let this = self.clone();
        tokio::spawn(async move {
            // Lists read the latest state (not the API server's cache, which may lag): a pod a
            // relist does not show is gone (see `forget_unlisted_restarts`). kube-runtime's
            // default, set here because that relies on it.
            let config = watcher::Config::default()
                .labels(&this.selector())
                .list_semantic(watcher::ListSemantic::MostRecent);
            let pods = watcher(this.pods(), config.clone())
                .default_backoff()
                .map(|e| e.map(Watched::Pod))
                .boxed();
            let services = watcher(this.services(), config)
                .default_backoff()
                .map(|e| e.map(Watched::Service))
                .boxed();
            let mut stream = futures::stream::select(pods, services);
            // The last version of each pod, to report again when its load balancer changes.
            let mut latest: HashMap<String, Pod> = HashMap::new();
            let mut first = true;
            // During a relist of pods: the restarts' uids known when it began, and the uids
            // it has listed so far.
            let mut relist: Option<(HashSet<String>, HashSet<String>)> = None;
            loop {
                let event = match stream.try_next().await {
                    Ok(Some(e)) => {
                        this.set_watch_error(None);
                        e
                    }
                    Ok(None) => return,
                    Err(e) => {
                        warn!(error = %e, "pod watch failed; retrying");
                        this.set_watch_error(Some(format!("the pod watch fails: {e}")));
                        continue;
                    }
                };
                if let (Watched::Pod(watcher::Event::InitApply(pod)), Some((_, listed))) =
                    (&event, relist.as_mut())
                    && let Some(uid) = &pod.metadata.uid
                {
                    listed.insert(uid.clone());
                }
                let out = match event {
                    Watched::Pod(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        this.remember(&pod);
                        let i = this.instance(&pod).map(RuntimeEvent::Changed);
                        if pods::is_load_balanced(&pod) {
                            latest.insert(pod.name_any(), pod);
                        }
                        i
                    }
                    Watched::Pod(watcher::Event::Delete(pod)) if this.was_replaced(&pod) => {
                        debug!(pod = %pod.name_any(), "deleted by its restart");
                        None
                    }
                    Watched::Pod(watcher::Event::Delete(pod)) => {
                        let name = pod.name_any();
                        if let Some(uid) = pod.metadata.uid.clone()
                            && !pod
                                .labels()
                                .contains_key(poolkeeper_runtime::LABEL_DEPLOYMENT)
                        {
                            let this = this.clone();
                            let name = name.clone();
                            tokio::spawn(
                                async move { this.drop_orphan_service(&name, &uid).await },
                            );
                        }
                        this.forget(&name);
                        latest.remove(&name);
                        Some(RuntimeEvent::Removed(name))
                    }
                    // Emitted before the list is requested (the next poll requests it).
                    Watched::Pod(watcher::Event::Init) => {
                        let before = this.replaced.lock().map(|r| r.clone()).unwrap_or_default();
                        relist = Some((before, HashSet::new()));
                        None
                    }
                    // A relist after the first: what changed meanwhile is known only by listing.
                    Watched::Pod(watcher::Event::InitDone) => {
                        if let Some((before, listed)) = relist.take() {
                            this.forget_unlisted_restarts(before, &listed);
                        }
                        (!std::mem::take(&mut first)).then_some(RuntimeEvent::Relist)
                    }
                    Watched::Service(
                        watcher::Event::Apply(svc) | watcher::Event::InitApply(svc),
                    ) => this
                        .note_ingress(&svc)
                        .then(|| latest.get(&svc.name_any()))
                        .flatten()
                        .and_then(|pod| this.instance(pod))
                        .map(RuntimeEvent::Changed),
                    Watched::Service(watcher::Event::Delete(svc)) => {
                        if let Ok(mut m) = this.ingress.lock() {
                            m.remove(&svc.name_any());
                        }
                        None
                    }
                    Watched::Service(_) => None,
                };
                if let Some(e) = out
                    && tx.send(e).is_err()
                {
                    return;
                }
            }
        });
        rx
    }
}
