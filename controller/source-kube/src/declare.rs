//! People's changes to declared state, as objects on the API server ([`Declare`] for the
//! Kubernetes source): a Claim made through the HTTP API (or a webhook) is a Claim object in
//! its user's namespace, labelled with its user and `poolkeeper.dev/made-by: api`; releasing
//! it deletes it (its finalizer holds it until its instance is reset); `scale` patches the
//! Pool's `spec.warm`; deleting a user deletes the User object. Records (reservations, webhook
//! signatures seen) are ConfigMaps in the controller's namespace.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use poolkeeper_engine::source::{
    BoxFuture, Created, Declare, DeclareError, Record, Records, Scaled, UserDeleted,
};
use poolkeeper_engine::{Creation, EngineHandle};
use poolkeeper_kinds::{ClaimSpec, Kind, ObjKey, Object, Origin, Spec, UserSpec};

use crate::Shared;
use crate::objects::{self, LABEL_MADE_BY, LABEL_USER};
use crate::writes::{FIELD_MANAGER, Writer};

/// The label of the objects of an example flow run from the web console.
const LABEL_FLOW: &str = "poolkeeper.dev/flow";
/// The label of every record ConfigMap.
const LABEL_RECORD: &str = "poolkeeper.dev/record";
/// The annotation holding a record's key (ConfigMap names cannot hold every key).
const ANNOTATION_KEY: &str = "poolkeeper.dev/record-key";

/// The Kubernetes source's [`Declare`] (and [`Records`]).
pub struct KubeDeclare {
    handle: EngineHandle,
    writer: Writer,
    shared: Shared,
    /// Where API claims go when their user is not declared (the engine refuses them then).
    default_namespace: String,
    records: KubeRecords,
}

impl KubeDeclare {
    /// Loads the records kept in `records_namespace` (ConfigMaps); the controller then keeps
    /// its copy, as their only writer (the leader).
    pub async fn new(
        handle: EngineHandle,
        writer: Writer,
        shared: Shared,
        default_namespace: String,
        records_namespace: String,
    ) -> Result<KubeDeclare, kube::Error> {
        let records = KubeRecords::load(writer.clone(), records_namespace).await?;
        Ok(KubeDeclare {
            handle,
            writer,
            shared,
            default_namespace,
            records,
        })
    }

    /// Where the object the engine holds as `key` is, or NotFound.
    fn namespace_of(&self, key: &ObjKey) -> Result<String, DeclareError> {
        self.shared
            .owner(key)
            .map(|o| o.namespace)
            .ok_or_else(|| DeclareError::NotFound(format!("no {} {:?}", key.kind, key.name)))
    }

    /// Where claim `name` is: as the watch saw it, or, for a claim the API created that the
    /// watch has not shown yet, where the engine has it from.
    /// Where a new claim of `user` is declared: their User's namespace, else the default one.
    fn namespace_for_claims_of(&self, user: &str) -> String {
        self.shared
            .owner(&ObjKey::new(Kind::User, user.to_owned()))
            .map_or_else(|| self.default_namespace.clone(), |o| o.namespace)
    }

    async fn claim_namespace(&self, name: &str) -> Result<String, DeclareError> {
        let key = ObjKey::new(Kind::Claim, name);
        if let Some(o) = self.shared.owner(&key) {
            return Ok(o.namespace);
        }
        let brief = self
            .handle
            .claim(name)
            .await
            .map_err(|_| DeclareError::Stopped)?;
        brief
            .as_ref()
            .and_then(|b| objects::namespace_of(&b.origin))
            .filter(|ns| !ns.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| DeclareError::NotFound(format!("no {} {name:?}", Kind::Claim)))
    }

    /// `kind` `name` in `ns`: None when it is not there, else the example group its label
    /// names (None: made by someone else).
    async fn flow_of(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<Option<Option<String>>, DeclareError> {
        let found = (self.writer.get(kind, ns, name).await)
            .map_err(|e| failed(&format!("reading {kind}"), ns, name, e))?;
        Ok(found.map(|o| {
            (o.metadata.labels.as_ref())
                .and_then(|l| l.get(LABEL_FLOW))
                .cloned()
        }))
    }

    /// A conflict unless `kind` `name` in `ns` is absent or group `group`'s own.
    async fn group_may_change(
        &self,
        group: &str,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<(), DeclareError> {
        match self.flow_of(kind, ns, name).await? {
            None => Ok(()),
            Some(Some(g)) if g == group => Ok(()),
            Some(_) => Err(DeclareError::Conflict(format!(
                "{kind} {name} in namespace {ns} was not made by this example: it is left as it is"
            ))),
        }
    }

    async fn claims_of(&self, user: &str) -> Result<Vec<String>, DeclareError> {
        let snap = self
            .handle
            .snapshot()
            .await
            .map_err(|_| DeclareError::Stopped)?;
        let mut claims: Vec<String> = snap.claims_of(user).map(|o| o.name.clone()).collect();
        claims.sort();
        Ok(claims)
    }

    async fn release(&self, user: &str) -> Result<Vec<String>, DeclareError> {
        let claims = self.claims_of(user).await?;
        for name in &claims {
            let ns = self.claim_namespace(name).await?;
            self.writer
                .delete(Kind::Claim, &ns, name)
                .await
                .map_err(|e| failed("deleting Claim", &ns, name, e))?;
        }
        Ok(claims)
    }
}

fn failed(what: &str, ns: &str, name: &str, e: kube::Error) -> DeclareError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => {
            DeclareError::Conflict(format!("{what} {ns}/{name}: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 404 => {
            DeclareError::NotFound(format!("{what} {ns}/{name}: {}", s.message))
        }
        _ => DeclareError::Failed(format!("{what} {ns}/{name}: {e}")),
    }
}

impl Declare for KubeDeclare {
    fn create_claim<'a>(
        &'a self,
        name: &'a str,
        spec: ClaimSpec,
        record: Option<Record>,
    ) -> BoxFuture<'a, Result<Created, DeclareError>> {
        Box::pin(async move {
            let ns = self.namespace_for_claims_of(&spec.user);
            let claim = Object {
                name: name.to_owned(),
                spec: Spec::Claim(spec.clone()),
                origin: objects::origin(Kind::Claim, &ns, name),
                generation: 1,
            };
            match self
                .handle
                .create_claim(claim)
                .await
                .map_err(|_| DeclareError::Stopped)?
            {
                Creation::Created => {}
                Creation::Exists(brief) => return Ok(Created::Exists(brief)),
                Creation::Refused(reason, message) => {
                    return Ok(Created::Refused(reason, message));
                }
            }
            let forget = || {
                let _ = self.handle.delete(ObjKey::new(Kind::Claim, name));
            };
            if let Some(r) = &record
                && let Err(e) = self.records.put(&r.key, r.bytes.clone()).await
            {
                forget();
                return Err(DeclareError::Failed(format!("writing the record: {e}")));
            }
            let mut obj = DynamicObject::new(name, &objects::api_resource(Kind::Claim)).within(&ns);
            obj.metadata.labels = Some(BTreeMap::from([
                (LABEL_USER.to_owned(), spec.user.clone()),
                (LABEL_MADE_BY.to_owned(), "api".to_owned()),
            ]));
            obj.data = json!({ "spec": spec });
            if let Err(e) = self.writer.create(Kind::Claim, &ns, &obj).await {
                forget();
                return Err(failed("creating Claim", &ns, name, e));
            }
            Ok(Created::New {
                at: format!("{ns}/Claim/{name}"),
            })
        })
    }

    fn claim_name_free<'a>(
        &'a self,
        name: &'a str,
        user: &'a str,
    ) -> BoxFuture<'a, Result<bool, DeclareError>> {
        Box::pin(async move {
            let ns = self.namespace_for_claims_of(user);
            self.writer
                .get(Kind::Claim, &ns, name)
                .await
                .map(|o| o.is_none())
                .map_err(|e| failed("reading Claim", &ns, name, e))
        })
    }

    fn made_here(&self, name: &str, origin: &Origin) -> bool {
        let key = ObjKey::new(Kind::Claim, name);
        self.shared.owner(&key).map_or_else(
            // Applied by the API and not seen on the watch yet.
            || objects::namespace_of(origin).is_some(),
            |o| o.made_by_api,
        )
    }

    fn is_recorded(&self, name: &str) -> bool {
        self.shared
            .owner(&ObjKey::new(Kind::Claim, name))
            .is_some_and(|o| o.made_by_api)
    }

    fn delete_claim<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, DeclareError>> {
        Box::pin(async move {
            // Just created and not on the watch yet: where the engine has it from.
            let Ok(ns) = self.claim_namespace(name).await else {
                return Ok(false);
            };
            self.writer
                .delete(Kind::Claim, &ns, name)
                .await
                .map_err(|e| failed("deleting Claim", &ns, name, e))
        })
    }

    fn scale_pool<'a>(
        &'a self,
        name: &'a str,
        warm: u32,
    ) -> BoxFuture<'a, Result<Scaled, DeclareError>> {
        Box::pin(async move {
            let key = ObjKey::new(Kind::Pool, name);
            let ns = self.namespace_of(&key)?;
            let was = self
                .handle
                .view(key)
                .await
                .map_err(|_| DeclareError::Stopped)?
                .and_then(|v| v.spec.get("warm").and_then(Value::as_u64));
            self.writer
                .merge_spec(Kind::Pool, &ns, name, json!({ "warm": warm }))
                .await
                .map_err(|e| failed("patching Pool", &ns, name, e))?;
            Ok(Scaled {
                was,
                at: format!("{ns}/Pool/{name}"),
            })
        })
    }

    fn release_claims_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, DeclareError>> {
        Box::pin(async move {
            self.namespace_of(&ObjKey::new(Kind::User, user))?;
            self.release(user).await
        })
    }

    fn delete_user<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<UserDeleted, DeclareError>> {
        Box::pin(async move {
            let ns = self.namespace_of(&ObjKey::new(Kind::User, name))?;
            let released = self.release(name).await?;
            self.writer
                .delete(Kind::User, &ns, name)
                .await
                .map_err(|e| failed("deleting User", &ns, name, e))?;
            Ok(UserDeleted {
                at: format!("{ns}/User/{name}"),
                released,
            })
        })
    }

    /// Creates a User object in the default namespace (the API server refuses a taken name:
    /// a conflict).
    fn create_user<'a>(
        &'a self,
        name: &'a str,
        spec: UserSpec,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            if self.shared.owner(&ObjKey::new(Kind::User, name)).is_some() {
                return Err(DeclareError::Conflict(format!("a User {name:?} exists")));
            }
            let ns = self.default_namespace.clone();
            let mut obj = DynamicObject::new(name, &objects::api_resource(Kind::User)).within(&ns);
            obj.metadata.labels = Some(BTreeMap::from([(
                LABEL_MADE_BY.to_owned(),
                "console".to_owned(),
            )]));
            obj.data = json!({ "spec": spec });
            self.writer
                .create(Kind::User, &ns, &obj)
                .await
                .map_err(|e| failed("creating User", &ns, name, e))?;
            Ok(format!("{ns}/User/{name}"))
        })
    }

    /// Patches the User's `spec.passwordHash`.
    fn set_password<'a>(
        &'a self,
        name: &'a str,
        hash: &'a str,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            let ns = self.namespace_of(&ObjKey::new(Kind::User, name))?;
            self.writer
                .merge_spec(Kind::User, &ns, name, json!({ "passwordHash": hash }))
                .await
                .map_err(|e| failed("patching User", &ns, name, e))?;
            Ok(format!("{ns}/User/{name}"))
        })
    }

    /// Patches the User's `spec.disabled`.
    fn set_user_disabled<'a>(
        &'a self,
        name: &'a str,
        disabled: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            let ns = self.namespace_of(&ObjKey::new(Kind::User, name))?;
            self.writer
                .merge_spec(Kind::User, &ns, name, json!({ "disabled": disabled }))
                .await
                .map_err(|e| failed("patching User", &ns, name, e))?;
            Ok(format!("{ns}/User/{name}"))
        })
    }

    /// Patches the Deployment's containers with the one changed (a merge patch replaces the
    /// list whole: the others are sent as declared).
    fn set_container_stopped<'a>(
        &'a self,
        deployment: &'a str,
        container: &'a str,
        stopped: bool,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            let key = ObjKey::new(Kind::Deployment, deployment);
            let ns = self.namespace_of(&key)?;
            let view = self
                .handle
                .view(key)
                .await
                .map_err(|_| DeclareError::Stopped)?
                .ok_or_else(|| DeclareError::NotFound(format!("no Deployment {deployment:?}")))?;
            let mut spec: poolkeeper_kinds::DeploymentSpec = serde_json::from_value(view.spec)
                .map_err(|e| {
                    DeclareError::Failed(format!("reading Deployment {deployment}: {e}"))
                })?;
            let c = spec
                .containers
                .iter_mut()
                .find(|c| c.name == container)
                .ok_or_else(|| {
                    DeclareError::NotFound(format!(
                        "Deployment {deployment} has no container {container:?}"
                    ))
                })?;
            c.stopped = stopped;
            self.writer
                .merge_spec(
                    Kind::Deployment,
                    &ns,
                    deployment,
                    json!({ "containers": spec.containers }),
                )
                .await
                .map_err(|e| failed("patching Deployment", &ns, deployment, e))?;
            Ok(format!("{ns}/Deployment/{deployment}"))
        })
    }

    /// Creates the group's objects in the default namespace, labelled with the group
    /// (`poolkeeper.dev/flow`); one the group made before has its spec replaced by a merge
    /// patch; one of that name someone else made is a conflict, and nothing is changed.
    fn declare_group<'a>(
        &'a self,
        group: &'a str,
        objects: Vec<Object>,
    ) -> BoxFuture<'a, Result<String, DeclareError>> {
        Box::pin(async move {
            let ns = self.default_namespace.clone();
            for o in &objects {
                let kind = o.spec.kind();
                if let Some(owner) = self.shared.owner(&ObjKey::new(kind, o.name.clone()))
                    && owner.namespace != ns
                {
                    return Err(DeclareError::Conflict(format!(
                        "{kind} {} is declared in namespace {} already",
                        o.name, owner.namespace
                    )));
                }
            }
            // An object of that name in the namespace that this group did not make is
            // someone's own: nothing is changed.
            for o in &objects {
                self.group_may_change(group, o.spec.kind(), &ns, &o.name)
                    .await?;
            }
            for o in objects {
                let kind = o.spec.kind();
                let spec = o.spec.to_json();
                let mut obj = DynamicObject::new(&o.name, &objects::api_resource(kind)).within(&ns);
                obj.metadata.labels = Some(BTreeMap::from([
                    (LABEL_FLOW.to_owned(), group.to_owned()),
                    (LABEL_MADE_BY.to_owned(), "console".to_owned()),
                ]));
                obj.data = json!({ "spec": spec });
                match self.writer.create(kind, &ns, &obj).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        // Made meanwhile: patched only if it is this group's.
                        self.group_may_change(group, kind, &ns, &o.name).await?;
                        self.writer
                            .merge_spec(kind, &ns, &o.name, spec)
                            .await
                            .map_err(|e| failed(&format!("patching {kind}"), &ns, &o.name, e))?;
                    }
                    Err(e) => return Err(failed(&format!("creating {kind}"), &ns, &o.name, e)),
                }
            }
            Ok(format!("{ns} (label {LABEL_FLOW}={group})"))
        })
    }

    /// Deletes the group's objects from the default namespace (those labelled with it: an
    /// object of the same name someone else made is left alone).
    fn remove_group<'a>(
        &'a self,
        group: &'a str,
        objects: Vec<ObjKey>,
    ) -> BoxFuture<'a, Result<bool, DeclareError>> {
        Box::pin(async move {
            let ns = self.default_namespace.clone();
            let mut any = false;
            for k in objects {
                if self.flow_of(k.kind, &ns, &k.name).await? != Some(Some(group.to_owned())) {
                    continue;
                }
                any |= self
                    .writer
                    .delete(k.kind, &ns, &k.name)
                    .await
                    .map_err(|e| failed(&format!("deleting {}", k.kind), &ns, &k.name, e))?;
            }
            Ok(any)
        })
    }

    fn records(&self) -> &dyn Records {
        &self.records
    }
}

/// Records as ConfigMaps: one per key, named after its digest, the key in an annotation and the
/// bytes in `binaryData.value`. Read once at start; the leader is their only writer and keeps
/// its copy in step with each write.
pub struct KubeRecords {
    writer: Writer,
    namespace: String,
    cache: RwLock<HashMap<String, Vec<u8>>>,
}

impl KubeRecords {
    pub async fn load(writer: Writer, namespace: String) -> Result<KubeRecords, kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(writer.client().clone(), &namespace);
        let mut cache = HashMap::new();
        for cm in api
            .list(&ListParams::default().labels(LABEL_RECORD))
            .await?
        {
            let key = cm
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_KEY))
                .cloned();
            let value = cm
                .binary_data
                .as_ref()
                .and_then(|d| d.get("value"))
                .map(|b| b.0.clone());
            if let (Some(k), Some(v)) = (key, value) {
                cache.insert(k, v);
            }
        }
        Ok(KubeRecords {
            writer,
            namespace,
            cache: RwLock::new(cache),
        })
    }

    fn name(key: &str) -> String {
        let digest = hex::encode(&Sha256::digest(key.as_bytes())[..12]);
        format!("poolkeeper-record-{digest}")
    }

    fn api(&self) -> Api<ConfigMap> {
        Api::namespaced(self.writer.client().clone(), &self.namespace)
    }
}

fn io(e: kube::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Records for KubeRecords {
    fn get(&self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned())
    }

    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let name = Self::name(key);
            let cm = ConfigMap {
                metadata: kube::core::ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([(
                        LABEL_RECORD.to_owned(),
                        "true".to_owned(),
                    )])),
                    annotations: Some(BTreeMap::from([(
                        ANNOTATION_KEY.to_owned(),
                        key.to_owned(),
                    )])),
                    ..Default::default()
                },
                binary_data: Some(BTreeMap::from([(
                    "value".to_owned(),
                    ByteString(bytes.clone()),
                )])),
                ..Default::default()
            };
            let mut body = serde_json::to_value(&cm).map_err(std::io::Error::other)?;
            body["apiVersion"] = json!("v1");
            body["kind"] = json!("ConfigMap");
            self.api()
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
                .map_err(io)?;
            self.cache
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.to_owned(), bytes);
            Ok(())
        })
    }

    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, std::io::Result<bool>> {
        Box::pin(async move {
            let removed = match self
                .api()
                .delete(&Self::name(key), &Default::default())
                .await
            {
                Ok(_) => true,
                Err(kube::Error::Api(s)) if s.code == 404 => false,
                Err(e) => return Err(io(e)),
            };
            self.cache
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
            Ok(removed)
        })
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_owned))
            .collect()
    }

    fn location(&self, key: &str) -> String {
        format!("ConfigMap {}/{} ({key})", self.namespace, Self::name(key))
    }
}
