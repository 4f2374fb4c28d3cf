//! What the fuzz targets share: the HTTP API served in process, as `poolkeeper run` serves it
//! (the directory source, the engine on the memory runtime, webhooks configured), built once
//! per fuzzing process, and the oracle every answer must pass.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The token of the user `fuzz` (may claim from pool `web`, at most 20 claims).
pub const USER_TOKEN: &str = "fuzz-user-token";
/// The admin token.
pub const ADMIN_TOKEN: &str = "fuzz-admin-token";
/// The webhooks' shared secret.
pub const WEBHOOK_SECRET: &[u8] = b"fuzz-webhook-secret";

pub struct Api {
    pub rt: tokio::runtime::Runtime,
    router: Router,
    _dir: tempfile::TempDir,
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// The API, started on first use.
pub fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| start().expect("the fuzzing harness starts"))
}

fn start() -> Result<Api, Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("specs.yaml"),
        format!(
            "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: web}}
spec:
  template: {{image: fuzz/web:1, ports: [{{containerPort: 80}}]}}
  warm: 2
  max: 30
  hostPorts: {{start: 20000, end: 20100}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: fuzz}}
spec: {{quota: {{maxClaims: 20}}, allowedPools: [web], tokenSha256: {}}}
",
            sha256_hex(USER_TOKEN)
        ),
    )?;
    let router = rt.block_on(async {
        let sdir = poolkeeper_source_dir::layout::state_dir(dir.path());
        std::fs::create_dir_all(&sdir)?;
        let mut config = poolkeeper_engine::EngineConfig::new(
            poolkeeper_source_dir::layout::store_dir(dir.path()),
        );
        config.resolve = Arc::new(poolkeeper_source_dir::files::DirResolve);
        config.sync = false;
        let runtime = Arc::new(poolkeeper_runtime::memory::MemoryRuntime::new(
            Default::default(),
        ));
        let (handle, _task) = poolkeeper_engine::start(runtime, config)?;
        let prepared = poolkeeper_source_dir::watch::Prepared::default();
        let watch = poolkeeper_source_dir::watch::run(
            dir.path().to_path_buf(),
            handle.clone(),
            Duration::from_secs(3600),
            prepared.clone(),
            Default::default(),
        )
        .await?;
        std::mem::forget(watch);
        let declare =
            poolkeeper_source_dir::declare::DirDeclare::new(handle.clone(), dir.path(), prepared)?;
        let webhooks = poolkeeper_http::WebhookConfig {
            secret: WEBHOOK_SECRET.to_vec(),
            allowed_images: Vec::new(),
            notify: None,
        };
        let state = poolkeeper_http::ApiState::new(
            handle,
            Arc::new(declare),
            Some(ADMIN_TOKEN),
            Some(webhooks),
        )?;
        Ok::<_, Box<dyn std::error::Error>>(poolkeeper_http::router(state))
    })?;
    Ok(Api {
        rt,
        router,
        _dir: dir,
    })
}

impl Api {
    /// Sends `request`; returns its status and whole body, having checked the oracle.
    pub fn send(&self, request: Request<Body>) -> (StatusCode, Vec<u8>) {
        let what = format!("{} {}", request.method(), request.uri());
        let router = self.router.clone();
        let label = what.clone();
        let (status, body) = self.rt.block_on(async move {
            let what = label;
            let response: Response<Body> = match router.oneshot(request).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
            let status = response.status();
            // Every answer of this API ends (the event stream is not sent here).
            let body =
                tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
                    .await
                    .unwrap_or_else(|_| panic!("{what}: the body did not end within 10 s"))
                    .unwrap_or_else(|e| panic!("{what}: the body failed: {e}"))
                    .to_bytes();
            (status, body.to_vec())
        });
        check(&what, status, &body);
        (status, body)
    }
}

/// The oracle: no request makes the API fail (500), and every refusal is a JSON object with an
/// `error` string, as the OpenAPI document promises.
pub fn check(what: &str, status: StatusCode, body: &[u8]) {
    assert_ne!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{what}: 500: {}",
        String::from_utf8_lossy(body)
    );
    // (An answer to HEAD has no body, whatever its status.)
    if (status.is_client_error() || status.is_server_error()) && !what.starts_with("HEAD ") {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{what}: {status} is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        });
        assert!(
            value.get("error").is_some_and(|e| e.is_string()),
            "{what}: {status} has no error string: {value}"
        );
    }
}

/// Reads inputs as a stream of small fields: a byte, a string up to 255 bytes, the rest.
pub struct Fields<'a>(pub &'a [u8]);

impl<'a> Fields<'a> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte()).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    pub fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}
