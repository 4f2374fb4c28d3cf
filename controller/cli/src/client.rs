//! The CLI's side of the HTTP API: `--server URL --token T` (or `POOLKEEPER_SERVER`,
//! `POOLKEEPER_TOKEN`), `http://` or `https://`.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use poolkeeper_engine::status::{ControllerInfo, ObjectView, Snapshot};
use poolkeeper_http::client::Client;

/// Where the API is, and who is asking.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// The API's address, `http://HOST:PORT` (a running `poolkeeper run`), or `https://`.
    #[arg(long, env = "POOLKEEPER_SERVER", value_name = "URL")]
    pub server: String,
    /// A bearer token (the admin's, or a user's).
    #[arg(
        long,
        env = "POOLKEEPER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: String,
}

/// One request; the status code and the body as JSON (Null when it is not JSON).
pub fn request(
    server: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    request_bytes(
        server,
        token,
        method,
        path,
        "application/json",
        body.as_bytes(),
    )
}

/// How long the CLI waits for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One request with a raw body of `content_type`, through the project's HTTP client (on a
/// runtime of its own: the CLI makes one request at a time).
pub fn request_bytes(
    server: &str,
    token: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Value)> {
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        bail!("--server {server}: expected http://HOST:PORT (or https://)");
    }
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("content-type", content_type));
    }
    let req = poolkeeper_http::client::request(method, &url, &headers, body.to_vec())
        .map_err(|e| anyhow!(e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt
        .block_on(async {
            let client = if server.starts_with("https://") {
                Client::with_system_roots()
            } else {
                Client::http_only()
            };
            client.send(req, ANSWER_TIMEOUT).await
        })
        .with_context(|| format!("the poolkeeper API at {server}"))?;
    Ok((
        answer.status,
        serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
    ))
}

/// A request that must succeed (2xx); otherwise the API's error, with its status.
pub fn call(
    args: &ServerArgs,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    ok_or_error(request(&args.server, &args.token, method, path, body)?)
}

/// A 2xx answer's body; otherwise the API's error, with its status.
pub fn ok_or_error((code, v): (u16, Value)) -> anyhow::Result<Value> {
    if (200..300).contains(&code) {
        return Ok(v);
    }
    let msg = v["error"].as_str().unwrap_or("no detail");
    match v["field"].as_str() {
        Some(f) => bail!("{code}: {f}: {msg}"),
        None => bail!("{code}: {msg}"),
    }
}

/// The objects of one kind the caller may see, shaped as a status snapshot, so that `get`
/// prints them as it prints a local folder's.
pub fn snapshot_of(args: &ServerArgs, kind_segment: &str) -> anyhow::Result<Snapshot> {
    let v = call(args, "GET", &format!("/api/v1/{kind_segment}"), None)?;
    let objects: Vec<ObjectView> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(serde_json::from_value)
        .collect::<Result<_, _>>()
        .context("reading the API's objects")?;
    Ok(Snapshot {
        controller: ControllerInfo {
            pid: 0,
            runtime: String::new(),
            started_at: String::new(),
            updated_at: String::new(),
            state_dir: Default::default(),
            api: Some(args.server.clone()),
            store_error: None,
        },
        objects,
        diagnostics: Vec::new(),
        instances: Vec::new(),
        nodes: Vec::new(),
        metrics: Default::default(),
    })
}

/// What `upload` sends: a `.tar` as it is; a folder's regular files (symbolic links are sent as
/// links, which the server refuses, never followed); or one file under its own name.
pub fn tar_of_path(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    if path.is_file() && path.extension().is_some_and(|e| e == "tar") {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    if path.is_dir() {
        b.append_dir_all("", path)
            .with_context(|| format!("packing {}", path.display()))?;
    } else {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("{}: not a file or folder", path.display()))?;
        b.append_path_with_name(path, name)
            .with_context(|| format!("packing {}", path.display()))?;
    }
    b.into_inner().context("packing")
}
