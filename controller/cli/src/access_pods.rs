//! `logs`, `exec` (also `-it`), `exec --steps` and `stats` on the Kubernetes runtime: the
//! target is a pod, reached through the API server named by `KUBECONFIG` (or in-cluster
//! credentials), as `kubectl logs|exec|top` would.
//!
//! - logs: `pods/log` (`--follow`, `--since`, `--tail`);
//! - exec: `pods/exec` over WebSocket; with `-t` the pod gets a TTY of the local terminal's size,
//!   resized along (SIGWINCH), and the local terminal is raw so that keys such as Ctrl-C reach
//!   the remote program; the exit code is the command's;
//! - stats: `metrics.k8s.io` (metrics-server); a cluster that does not serve it gets a clear
//!   message instead of numbers.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, LogParams, TerminalSize};
use serde_json::Value;
use tokio::io::AsyncReadExt;

use poolkeeper_engine::status::ObjectView;
use poolkeeper_kinds::{API_VERSION, Kind, Origin};

use crate::access::{Stats, Target};

/// A client of the cluster the controller's pods run on.
pub async fn client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API server (KUBECONFIG, or in-cluster credentials)")
}

/// The pod a target names, reading the Claim or Deployment (in `namespace`) from the cluster:
/// `instance/NAME`, `claim/NAME`, `deployment/NAME[/CONTAINER[/REPLICA]]`.
pub async fn resolve(pods: &str, namespace: &str, target: &str) -> anyhow::Result<Target> {
    // The object whose status names the pod; none for `instance/NAME`. The target's form is
    // checked by the same rules as the directory's status.
    let kind = match target.split('/').next() {
        Some("claim" | "claims" | "cl") => Some(Kind::Claim),
        Some("deployment" | "deployments" | "pkd") => Some(Kind::Deployment),
        _ => None,
    };
    let mut objects = Vec::new();
    if let Some(kind) = kind {
        let name = target.split('/').nth(1).unwrap_or_default();
        let mut object = read_object(kind, namespace, name, target).await?;
        objects.push(ObjectView {
            kind,
            name: name.to_owned(),
            origin: Origin {
                file: format!("{namespace}/{kind:?}/{name}").into(),
                line: 0,
                col: 0,
            },
            spec: object["spec"].take(),
            status: object["status"].take(),
            events: Vec::new(),
        });
    }
    let pod = crate::access::resolve_instance(&objects, target)?;
    Ok(Target::pod(pods, &pod))
}

/// A Claim or Deployment as the cluster holds it.
async fn read_object(
    kind: Kind,
    namespace: &str,
    name: &str,
    target: &str,
) -> anyhow::Result<Value> {
    let client = client().await?;
    let url = format!(
        "/apis/{API_VERSION}/namespaces/{namespace}/{}/{name}",
        kind.plural()
    );
    let req = http::Request::get(&url)
        .body(Vec::new())
        .context("a request")?;
    match client.request(req).await {
        Ok(v) => Ok(v),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            bail!("{target}: no {kind:?} named {name:?} in namespace {namespace}")
        }
        Err(e) => Err(api_error(e, format!("reading {target}"))),
    }
}

fn pods(client: &kube::Client, t: &Target) -> Api<Pod> {
    Api::namespaced(
        client.clone(),
        t.pod_namespace.as_deref().unwrap_or("default"),
    )
}

/// What the API server said (its message, not the whole Status), in context.
fn api_error(e: kube::Error, what: String) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow!("{what}: {}", s.message),
        other => anyhow!(other).context(what),
    }
}

fn located(t: &Target) -> String {
    format!(
        "pod {}/{}",
        t.pod_namespace.as_deref().unwrap_or("default"),
        t.container
    )
}

pub async fn logs(
    t: &Target,
    follow: bool,
    since: Option<Duration>,
    tail: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let client = client().await?;
    let lp = LogParams {
        follow,
        since_seconds: since.map(|d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)),
        tail_lines: tail.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        ..LogParams::default()
    };
    let api = pods(&client, t);
    let stream = api
        .log_stream(&t.container, &lp)
        .await
        .map_err(|e| api_error(e, format!("logs of {}", located(t))))?;
    let mut lines = stream.lines();
    let mut out = std::io::stdout();
    while let Some(line) = lines.next().await {
        let line = line.with_context(|| format!("logs of {}", located(t)))?;
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `command` in the pod; its exit code (-1 when the server told none).
pub async fn exec(
    t: &Target,
    command: &[String],
    interactive: bool,
    tty: bool,
) -> anyhow::Result<i64> {
    let client = client().await?;
    // With a TTY the remote end merges stderr into it (the API server refuses both).
    let ap = AttachParams::default()
        .stdin(interactive)
        .stdout(true)
        .stderr(!tty)
        .tty(tty);
    let mut proc = pods(&client, t)
        .exec(&t.container, command.to_vec(), &ap)
        .await
        .map_err(|e| api_error(e, format!("exec in {}", located(t))))?;
    if tty && let Some(mut sizes) = proc.terminal_size() {
        tokio::spawn(async move {
            use futures::SinkExt;
            let mut winch =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
            loop {
                if let Some((height, width)) = crate::access::terminal_size()
                    && sizes.send(TerminalSize { width, height }).await.is_err()
                {
                    return;
                }
                let Some(w) = winch.as_mut() else { return };
                if w.recv().await.is_none() {
                    return;
                }
            }
        });
    }
    if interactive && let Some(input) = proc.stdin() {
        crate::access::forward_stdin(input);
    }
    let status = proc.take_status();
    let out = copy(proc.stdout(), std::io::stdout());
    let err = copy(proc.stderr(), std::io::stderr());
    let (o, e) = tokio::join!(out, err);
    o?;
    e?;
    let status = match status {
        Some(s) => s.await,
        None => None,
    };
    Ok(poolkeeper_runtime_kube::exit_code_of(status.as_ref()))
}

/// Copies what the remote program writes to `to`, as it comes.
async fn copy<R: tokio::io::AsyncRead + Unpin>(
    from: Option<R>,
    mut to: impl Write,
) -> anyhow::Result<()> {
    let Some(mut from) = from else { return Ok(()) };
    let mut buf = [0u8; 8192];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

/// Runs `argv` and collects its exit code and output (for `exec --steps`).
pub async fn exec_output(t: &Target, argv: &[String]) -> anyhow::Result<(i64, String)> {
    let client = client().await?;
    let rt = poolkeeper_runtime_kube::KubeRuntime::new(
        client,
        poolkeeper_runtime_kube::KubeRuntimeConfig {
            namespace: t.pod_namespace.clone().unwrap_or_default(),
            controller_id: String::new(),
            grace_seconds: 0,
        },
    );
    let out = poolkeeper_runtime::Runtime::exec(&rt, &t.container, argv)
        .await
        .map_err(|e| anyhow!("exec in {}: {e}", located(t)))?;
    Ok((out.exit_code, out.output))
}

/// A CPU quantity (`250m`, `12345n`, `1`) in cores.
pub fn cpu_cores(q: &str) -> Option<f64> {
    let (num, scale) = match q.as_bytes().last()? {
        b'n' => (&q[..q.len() - 1], 1e-9),
        b'u' => (&q[..q.len() - 1], 1e-6),
        b'm' => (&q[..q.len() - 1], 1e-3),
        _ => (q, 1.0),
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// A memory quantity (`128Mi`, `1G`, `1048576`, `1e3`) in bytes.
pub fn bytes_of(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, scale) = SUFFIXES
        .iter()
        .find_map(|(s, f)| q.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((q, 1.0));
    let v = num.parse::<f64>().ok()? * scale;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

/// CPU and memory of the pod, from `metrics.k8s.io`; its memory limit from its spec.
pub async fn stats(t: &Target) -> anyhow::Result<Stats> {
    let client = client().await?;
    let ns = t.pod_namespace.as_deref().unwrap_or("default");
    let pod = pods(&client, t)
        .get(&t.container)
        .await
        .map_err(|e| api_error(e, format!("reading {}", located(t))))?;
    let url = format!(
        "/apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods/{}",
        t.container
    );
    let req = http::Request::get(&url)
        .body(Vec::new())
        .context("a metrics request")?;
    let metrics: Value = match client.request(req).await {
        Ok(v) => v,
        Err(kube::Error::Api(s)) if s.code == 404 => bail!(
            "{}: no stats: the cluster does not serve the metrics.k8s.io API for it \
             (install metrics-server; `kubectl top pod` needs the same), or has no sample \
             of this pod yet",
            located(t)
        ),
        Err(e) => return Err(api_error(e, format!("metrics of {}", located(t)))),
    };
    let containers = metrics["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let cpu: f64 = containers
        .iter()
        .filter_map(|c| c["usage"]["cpu"].as_str().and_then(cpu_cores))
        .sum();
    let memory: u64 = containers
        .iter()
        .filter_map(|c| c["usage"]["memory"].as_str().and_then(bytes_of))
        .sum();
    let limit: u64 = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get("memory"))
        .filter_map(|q| bytes_of(&q.0))
        .sum();
    Ok(Stats {
        name: t.container.clone(),
        cpu_percent: cpu * 100.0,
        memory_bytes: memory,
        memory_limit_bytes: limit,
        // The metrics API does not count processes.
        pids: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_read_as_the_api_server_writes_them() {
        assert_eq!(cpu_cores("250m"), Some(0.25));
        assert_eq!(cpu_cores("1500000n"), Some(0.0015));
        assert_eq!(cpu_cores("2"), Some(2.0));
        assert_eq!(cpu_cores("x"), None);
        assert_eq!(bytes_of("128Mi"), Some(134_217_728));
        assert_eq!(bytes_of("2Ki"), Some(2048));
        assert_eq!(bytes_of("1G"), Some(1_000_000_000));
        assert_eq!(bytes_of("4096"), Some(4096));
        assert_eq!(bytes_of("-1"), None);
    }
}
