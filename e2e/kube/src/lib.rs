//! What the end-to-end tests of Kubernetes mode share: the cluster `KUBECONFIG` names (a test is
//! skipped without one, and fails instead when `POOLKEEPER_REQUIRE_KUBE=1`), a namespace of each
//! test's own, a ServiceAccount holding exactly the roles `poolkeeper rbac` prints, controllers
//! run in-process on the memory runtime, `kubectl`, and a TCP proxy that stands for the API
//! server going away and coming back.
//!
//! The suite needs only an API server (no kubelet, no controller-manager): it creates the
//! ServiceAccount itself, and removes what it made without waiting for a namespace controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use poolkeeper::kube_mode::{KubeController, KubeOptions};
use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};
use poolkeeper_source_kube::kube::{self, Client};
use poolkeeper_source_kube::lease::LeaseConfig;
use tokio::sync::watch;

/// The cluster under test.
pub struct Cluster {
    pub kubeconfig: String,
    kubectl: PathBuf,
    /// The admin's configuration (as `KUBECONFIG` gives it).
    pub config: kube::Config,
    pub admin: Client,
}

/// The cluster `KUBECONFIG` names; None (the test is skipped) without one, unless
/// `POOLKEEPER_REQUIRE_KUBE=1`, which makes that a failure.
pub async fn cluster() -> Option<Cluster> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("POOLKEEPER_LOG").unwrap_or_else(|_| "warn".to_owned()))
        .with_test_writer()
        .try_init();
    let required = std::env::var("POOLKEEPER_REQUIRE_KUBE").is_ok_and(|v| v == "1");
    let kubeconfig = std::env::var("KUBECONFIG").unwrap_or_default();
    if kubeconfig.is_empty() {
        assert!(
            !required,
            "POOLKEEPER_REQUIRE_KUBE=1, but KUBECONFIG names no cluster"
        );
        eprintln!("skipped: KUBECONFIG is not set (set POOLKEEPER_REQUIRE_KUBE=1 to fail instead)");
        return None;
    }
    let kubectl = std::env::var("KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("kubectl"));
    let connected = async {
        poolkeeper_source_kube::install_crypto();
        let config = kube::Config::infer().await?;
        let admin = Client::try_from(config.clone())?;
        admin.apiserver_version().await?;
        anyhow::Ok((config, admin))
    };
    let (config, admin) = connected.await.unwrap_or_else(|e| {
        panic!("KUBECONFIG={kubeconfig}: the API server does not answer: {e:#}")
    });
    let c = Cluster {
        kubeconfig,
        kubectl,
        config,
        admin,
    };
    let v = c.kubectl(&["version", "--client"]);
    assert!(
        v.status.success(),
        "kubectl is needed (set KUBECTL): {}",
        String::from_utf8_lossy(&v.stderr)
    );
    Some(c)
}

impl Cluster {
    /// Runs kubectl; its output, whatever its status.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_in(args, None)
    }

    /// Runs kubectl with `stdin`.
    pub fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(&self.kubectl);
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.kubectl.display()));
        if let Some(input) = stdin
            && let Some(mut s) = child.stdin.take()
        {
            let _ = s.write_all(input.as_bytes());
        }
        child.wait_with_output().expect("kubectl's output")
    }

    /// Runs kubectl and asserts it succeeded; its standard output.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl_in(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A controller on the memory runtime watching `ns` alone, under the roles `poolkeeper rbac`
    /// prints, once it leads; with its state folder (which must outlive it).
    pub async fn leading_controller(
        &self,
        ns: &str,
        identity: &str,
    ) -> (Controller, tempfile::TempDir) {
        let config = self.service_account(ns, &[ns.to_owned()]);
        let state = tempfile::tempdir().expect("tempdir");
        let mut ctl = start_controller(&config, ns, state.path(), identity, None, None);
        ctl.inner.leading().await;
        (ctl, state)
    }

    /// `kubectl wait --for=condition=Bound` on `claims` in `ns` (60 s), failing with its error.
    pub fn wait_bound(&self, ns: &str, claims: &[&str]) {
        let names: Vec<String> = claims.iter().map(|c| format!("claim/{c}")).collect();
        let mut args = vec!["wait", "-n", ns, "--for=condition=Bound", "--timeout=60s"];
        args.extend(names.iter().map(String::as_str));
        let waited = self.kubectl(&args);
        assert!(
            waited.status.success(),
            "{claims:?}: {}",
            String::from_utf8_lossy(&waited.stderr)
        );
    }

    /// Applies the CRDs as `poolkeeper crds` prints them; what kubectl wrote to stderr (its
    /// warnings).
    pub fn apply_crds(&self) -> String {
        let crds = poolkeeper_kinds::crd::crds_yaml().expect("crds");
        let out = self.kubectl_in(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&crds),
        );
        assert!(
            out.status.success(),
            "applying the CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let established = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/pools.poolkeeper.dev",
            "crd/claims.poolkeeper.dev",
            "crd/users.poolkeeper.dev",
            "crd/deployments.poolkeeper.dev",
        ]);
        assert!(
            established.status.success(),
            "the CRDs were not established"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// A namespace of the test's own (`pk-e2e-NAME-xxxx`).
    pub fn namespace(&self, name: &str) -> String {
        let ns = format!(
            "pk-e2e-{name}-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ std::process::id())
                .unwrap_or(0)
                & 0xffffff
        );
        self.kubectl_ok(&["create", "namespace", &ns], None);
        ns
    }

    /// Removes what a test made in `ns`: its objects (their finalizers cleared first: the
    /// controller is stopped) and the namespace.
    pub fn cleanup(&self, ns: &str) {
        for kind in ["claims", "pools", "users", "deployments"] {
            let names = self.kubectl(&["get", kind, "-n", ns, "-o", "name"]);
            for obj in String::from_utf8_lossy(&names.stdout).lines() {
                let _ = self.kubectl(&[
                    "patch",
                    obj,
                    "-n",
                    ns,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ]);
            }
            let _ = self.kubectl(&["delete", kind, "--all", "-n", ns, "--wait=false"]);
        }
        let _ = self.kubectl(&[
            "delete",
            "pods,services",
            "--all",
            "-n",
            ns,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]);
        let _ = self.kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }

    /// A ServiceAccount `poolkeeper` in `home` bound to exactly the roles `poolkeeper rbac`
    /// prints for watching `watched`, and a client that acts as it.
    pub fn service_account(&self, home: &str, watched: &[String]) -> kube::Config {
        self.service_account_with(home, watched, None)
    }

    /// [`Cluster::service_account`], also holding the pod runtime's role in `pods`.
    pub fn service_account_with(
        &self,
        home: &str,
        watched: &[String],
        pods: Option<&str>,
    ) -> kube::Config {
        self.kubectl_ok(
            &["create", "serviceaccount", "poolkeeper", "-n", home],
            None,
        );
        let rbac = poolkeeper_source_kube::rbac::yaml(&poolkeeper_source_kube::rbac::RbacTarget {
            service_account: "poolkeeper".into(),
            namespace: home.into(),
            watched: watched.to_vec(),
            pods: pods.map(str::to_owned),
            ..Default::default()
        });
        self.kubectl_ok(&["apply", "-f", "-"], Some(&rbac));
        let token = self.kubectl_ok(
            &["create", "token", "poolkeeper", "-n", home, "--duration=2h"],
            None,
        );
        let mut config = self.config.clone();
        config.auth_info = kube::config::AuthInfo {
            token: Some(secrecy::SecretString::from(token.trim().to_owned())),
            ..Default::default()
        };
        config.default_namespace = home.to_owned();
        config
    }
}

/// A controller of the test's, in-process, on `rt`, acting as `config`'s identity, watching
/// `ns`, with its store in `state`, electing its leader on a Lease in `ns` (15 s unless
/// `lease_duration` says otherwise).
pub struct Controller {
    pub inner: KubeController,
    pub api: String,
    pub rt: Arc<MemoryRuntime>,
}

pub fn start_controller(
    config: &kube::Config,
    ns: &str,
    state: &std::path::Path,
    identity: &str,
    rt: Option<Arc<MemoryRuntime>>,
    lease_duration: Option<Duration>,
) -> Controller {
    let rt = rt.unwrap_or_else(|| Arc::new(MemoryRuntime::new(MemoryConfig::default())));
    let (inner, api) = start_on(rt.clone(), config, ns, state, identity, lease_duration);
    Controller { inner, api, rt }
}

/// A controller as [`start_controller`] makes it, on any runtime; with its API's address.
pub fn start_on<R: poolkeeper_runtime::Runtime>(
    rt: Arc<R>,
    config: &kube::Config,
    ns: &str,
    state: &std::path::Path,
    identity: &str,
    lease_duration: Option<Duration>,
) -> (KubeController, String) {
    start_with_webhooks(rt, config, ns, state, identity, lease_duration, None)
}

/// As [`start_on`], taking reservation webhooks signed with `webhooks`' secret.
pub fn start_with_webhooks<R: poolkeeper_runtime::Runtime>(
    rt: Arc<R>,
    config: &kube::Config,
    ns: &str,
    state: &std::path::Path,
    identity: &str,
    lease_duration: Option<Duration>,
    webhooks: Option<poolkeeper_http::WebhookConfig>,
) -> (KubeController, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let api = listener.local_addr().expect("addr").to_string();
    let client = Client::try_from(config.clone()).expect("client");
    let mut lease = LeaseConfig::new("poolkeeper", ns, identity);
    if let Some(d) = lease_duration {
        lease.duration = d;
    }
    let inner = KubeController::start(
        rt.clone(),
        KubeOptions {
            client,
            server: config.cluster_url.to_string(),
            namespaces: vec![ns.to_owned()],
            state_dir: state.to_path_buf(),
            lease: Some(lease),
            home: ns.to_owned(),
            identity: identity.to_owned(),
            resync: Duration::from_secs(5),
            listener: Some(listener),
            admin_token: Some(ADMIN_TOKEN.to_owned()),
            webhooks,
            console: Default::default(),
            limits: Default::default(),
        },
    );
    (inner, api)
}

/// The admin token of the tests' controllers.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

/// Polls `check` until it gives Some, or fails naming `what` after `limit`.
pub async fn eventually<T>(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < limit, "never within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A TCP proxy in front of the API server: while it is down, connections are refused and the
/// open ones cut, as when the API server stops.
pub struct Proxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Proxy {
    /// Forwards to `config`'s server; returns the proxy and a configuration that goes through
    /// it (the server's name still checked against its certificate).
    pub async fn start(config: &kube::Config) -> anyhow::Result<(Proxy, kube::Config)> {
        let uri = &config.cluster_url;
        let host = uri
            .host()
            .context("the server URL names no host")?
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let upstream = format!("{host}:{port}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, mut up_rx) = watch::channel(true);
        let rx = up.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow_and_update() {
                    drop(inbound);
                    continue;
                }
                let (upstream, mut down) = (upstream.clone(), rx.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        let mut through = config.clone();
        through.cluster_url = format!("https://{addr}").parse()?;
        if through.tls_server_name.is_none() {
            through.tls_server_name = Some(host.trim_matches(['[', ']']).to_owned());
        }
        Ok((Proxy { addr, up }, through))
    }

    pub fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

/// A claim's status field, read with the admin's client.
pub async fn claim_status(admin: &Client, ns: &str, name: &str) -> Option<serde_json::Value> {
    status_of(admin, ns, poolkeeper_kinds::Kind::Claim, name).await
}

/// The status of the `kind` named `name` in `ns`: None while it is missing or has none.
pub async fn status_of(
    admin: &Client,
    ns: &str,
    kind: poolkeeper_kinds::Kind,
    name: &str,
) -> Option<serde_json::Value> {
    let ar = poolkeeper_source_kube::objects::api_resource(kind);
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(admin.clone(), ns, &ar);
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|o| o.data.get("status").cloned())
}

/// POSTs reservation event `body` to the controller's webhook, signed with `secret` at `ts`:
/// the status and the body.
pub fn post_reservation(
    api: &str,
    body: &str,
    secret: &[u8],
    ts: u64,
) -> anyhow::Result<(u16, String)> {
    let sig = poolkeeper_http::webhook::sign(secret, ts, body.as_bytes());
    exchange(
        api,
        &format!(
            "POST /webhooks/reservations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nX-Poolkeeper-Timestamp: {ts}\r\n\
             X-Poolkeeper-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        Duration::from_secs(30),
    )
}

/// Sends `request` (whole, closing the connection) to the controller's API: the status and
/// the body.
fn exchange(api: &str, request: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("not HTTP")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    if code == 0 {
        bail!("no answer");
    }
    Ok((code, body))
}

/// GET `path` of the controller's API with the admin token: the status and the body.
pub fn http_get(api: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_as(api, path, ADMIN_TOKEN)
}

/// GET `path` of the controller's API with `token`: the status and the body.
pub fn http_get_as(api: &str, path: &str, token: &str) -> anyhow::Result<(u16, String)> {
    exchange(
        api,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
        Duration::from_secs(10),
    )
}
