//! `/metrics`: the engine's counters and histograms, and gauges per pool.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use poolkeeper_engine::status::{ObjectView, Snapshot};
use poolkeeper_kinds::Kind;

use crate::ApiState;
use crate::auth::snapshot;
use crate::error::ApiResult;

/// Prometheus text format: the engine's counters, and gauges and counters per pool.
pub(crate) async fn metrics(State(state): State<Arc<ApiState>>) -> ApiResult<Response> {
    let snap = snapshot(&state).await?;
    let text = render_metrics(&snap);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// A metric family's `# HELP` and `# TYPE` lines.
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the metrics of a snapshot.
pub fn render_metrics(snap: &Snapshot) -> String {
    use std::fmt::Write;
    let m = &snap.metrics;
    let mut out = String::new();
    let kinds = [
        ("pool", &m.pool),
        ("deployment", &m.deployment),
        ("user", &m.user),
    ];
    let counters = [
        (
            "poolkeeper_reconciles_total",
            "Objects reconciled, per kind.",
            kinds.map(|(k, km)| (k, km.reconciles)),
        ),
        (
            "poolkeeper_reconcile_errors_total",
            "Runtime actions that failed, per kind.",
            kinds.map(|(k, km)| (k, km.errors)),
        ),
    ];
    for (name, help, values) in counters {
        family(&mut out, name, "counter", help);
        for (k, v) in values {
            let _ = writeln!(out, "{name}{{kind=\"{k}\"}} {v}");
        }
    }
    let name = "poolkeeper_reconcile_duration_seconds";
    family(&mut out, name, "histogram", "Time a pass spent on a kind.");
    for (k, km) in kinds {
        histogram(&mut out, name, &format!("kind=\"{k}\""), &km.duration);
    }
    let name = "poolkeeper_claim_bind_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "From a claim's arrival in the queue to Bound.",
    );
    histogram(&mut out, name, "", &m.bind_latency);
    let name = "poolkeeper_store_commit_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Writing and flushing one batch of the state store (every Bound waits for it).",
    );
    histogram(&mut out, name, "", &m.store_commit);
    let name = "poolkeeper_store_deferred_commits_total";
    family(
        &mut out,
        name,
        "counter",
        "Batches of the state store written without a flush of their own (what a restart derives again: a deleted claim's end, an instance gone); the next flush covers them.",
    );
    let _ = writeln!(out, "{name} {}", m.store_deferred);
    let pools: Vec<&ObjectView> = snap
        .objects
        .iter()
        .filter(|o| o.kind == Kind::Pool)
        .collect();
    let per_pool = [
        ("instances", "", "gauge", "Instances of the pool."),
        ("warm", "", "gauge", "Ready, unbound instances."),
        ("bound", "", "gauge", "Instances bound to claims."),
        ("queued", "", "gauge", "Claims waiting for an instance."),
        (
            "hits",
            "_total",
            "counter",
            "Claims bound at once from a warm instance.",
        ),
        ("misses", "_total", "counter", "Claims that had to wait."),
    ];
    for (field, suffix, kind, help) in per_pool {
        let name = format!("poolkeeper_pool_{field}{suffix}");
        family(&mut out, &name, kind, help);
        for p in &pools {
            let v = p.status.get(field).and_then(Value::as_u64).unwrap_or(0);
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {v}", p.name);
        }
    }
    out
}

pub(crate) fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    h: &poolkeeper_engine::metrics::Histogram,
) {
    use std::fmt::Write;
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, n) in h.cumulative() {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}
