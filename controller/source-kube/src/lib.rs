//! Desired state from a Kubernetes API server: Pools, Claims, Users and Deployments declared as
//! custom resources (`kubectl apply`, GitOps), with the same engine and guarantees as the
//! watched directory.
//!
//! - [`source`]: the watch of the four kinds, status written back by server-side apply, the
//!   finalizer that holds a deleted object until its cleanup is done, Events;
//! - [`objects`]: custom resources as the engine's objects;
//! - [`writes`]: every write the controller makes, counted;
//! - [`declare`]: the HTTP API's changes as objects (a Claim created, a Pool's `warm` patched),
//!   and small records as ConfigMaps;
//! - [`lease`]: leader election on a `coordination.k8s.io/v1` Lease;
//! - [`rbac`]: the least-privilege roles this mode needs;
//! - [`admission`]: the admission policy that sets the finalizer as objects are created.
//!
//! With the Docker runtime the controller's local store stays the record of bindings (it runs
//! beside its daemon), and a Claim's status mirrors it.

pub use kube;

pub mod admission;
pub mod declare;
pub mod lease;
pub mod objects;
pub mod rbac;
pub mod source;
pub mod writes;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use poolkeeper_engine::source::{Resolve, UserToken, inline_files};
use poolkeeper_kinds::{ClaimSpec, ObjKey, Origin, UserSpec};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Kubernetes configuration (KUBECONFIG, ~/.kube/config, or in-cluster): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error(transparent)]
    Engine(#[from] poolkeeper_engine::EngineError),
    #[error("a watch of the API server ended")]
    WatchEnded,
}

/// A Kubernetes client and the server it talks to (for messages).
pub struct Connection {
    pub client: kube::Client,
    pub server: String,
    /// The namespace of the current context (in a pod: its own).
    pub namespace: String,
}

/// Connects with the credentials of `KUBECONFIG` (or `~/.kube/config`), else in-cluster.
pub async fn connect() -> Result<Connection, Error> {
    install_crypto();
    let config = kube::Config::infer().await?;
    let server = config.cluster_url.to_string();
    let namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config)?;
    Ok(Connection {
        client,
        server,
        namespace,
    })
}

/// kube's TLS is rustls with ring: makes it the process's provider before any client exists
/// (a second call changes nothing).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Which namespace holds an object the engine has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    /// A Claim made through the HTTP API.
    pub made_by_api: bool,
}

/// A Secret's key: (namespace, name, key).
pub type SecretKey = (String, String, String);

/// What the source shares with the HTTP API's [`declare::KubeDeclare`] and the engine's
/// [`KubeResolve`].
#[derive(Clone, Default)]
pub struct Shared {
    /// The namespace of each object the engine holds.
    pub owners: Arc<RwLock<HashMap<ObjKey, Owner>>>,
    /// Users' token Secrets as last read: (namespace, name, key) -> the token's digest.
    pub secrets: Arc<RwLock<HashMap<SecretKey, UserToken>>>,
    /// The namespaces watched (empty: all).
    pub namespaces: Vec<String>,
    /// The API server, for messages.
    pub server: String,
}

impl Shared {
    pub fn owner(&self, key: &ObjKey) -> Option<Owner> {
        self.owners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}

/// The Kubernetes source's [`Resolve`]: inline files only; a user's token from `tokenSha256`
/// or the Secret `tokenSecretRef` names (read by the source, in the user's namespace).
pub struct KubeResolve(pub Shared);

impl Resolve for KubeResolve {
    fn claim_files(
        &self,
        spec: &ClaimSpec,
        _origin: &Origin,
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        if let Some(from) = &spec.files_from {
            return Err(format!(
                "filesFrom {from}: a local path, which a cluster's objects cannot name (declare \
                 the files inline, or upload them through the API)"
            ));
        }
        Ok(inline_files(spec))
    }

    fn user_token(&self, spec: &UserSpec, origin: &Origin) -> UserToken {
        if let Some(h) = &spec.token_sha256 {
            return UserToken::from_sha256(h);
        }
        if spec.token_secret_file.is_some() {
            return UserToken::Unreadable(
                "tokenSecretFile: a local file, which a cluster's objects cannot name (use \
                 tokenSecretRef)"
                    .to_owned(),
            );
        }
        let Some(r) = &spec.token_secret_ref else {
            return UserToken::None;
        };
        let ns = objects::namespace_of(origin).unwrap_or_default();
        source::secret_token(&self.0, ns, &r.name, &r.key)
    }
}

/// Objects as a multi-document YAML stream, for `kubectl apply -f -`.
pub fn yaml_stream(objects: &[serde_json::Value]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        // Serialising a JSON value cannot fail.
        out.push_str(&serde_saphyr::to_string(o).unwrap_or_default());
    }
    out
}
