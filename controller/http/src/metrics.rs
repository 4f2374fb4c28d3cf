//! `/metrics`: the engine's counters and histograms, and gauges per pool.

use std::fmt;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde_json::Value;

use poolkeeper_engine::limits::{Refusal, Refusals};
use poolkeeper_engine::metrics::{BUCKETS, Histogram};
use poolkeeper_engine::status::{ObjectView, Snapshot};
use poolkeeper_kinds::Kind;

use crate::ApiState;
use crate::auth::snapshot;
use crate::error::ApiResult;

/// The OpenMetrics text exposition (which Prometheus scrapes) of the engine's counters and
/// histograms, and gauges and counters per pool.
pub(crate) async fn metrics(State(state): State<Arc<ApiState>>) -> ApiResult<Response> {
    let snap = snapshot(&state).await?;
    let text = render_metrics(&snap, &state.refusals);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Renders the metrics of a snapshot, and the inputs refused so far.
pub fn render_metrics(snap: &Snapshot, refusals: &Refusals) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FromSnapshot(snap.clone(), refusals.all())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// The metrics a snapshot holds, encoded at each scrape (the engine keeps the counts; a
/// registry of live metrics would be a second copy of them).
#[derive(Debug)]
struct FromSnapshot(Snapshot, Vec<(Refusal, u64)>);

impl Collector for FromSnapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let m = &self.0.metrics;
        let kinds = [
            ("pool", &m.pool),
            ("deployment", &m.deployment),
            ("user", &m.user),
        ];
        let counters = [
            (
                "poolkeeper_reconciles",
                "Objects reconciled, per kind.",
                kinds.map(|(k, km)| (k, km.reconciles)),
            ),
            (
                "poolkeeper_reconcile_errors",
                "Runtime actions that failed, per kind.",
                kinds.map(|(k, km)| (k, km.errors)),
            ),
        ];
        for (name, help, values) in counters {
            let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (kind, v) in values {
                ConstCounter::new(v).encode(family.encode_family(&[("kind", kind)])?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "poolkeeper_reconcile_duration_seconds",
            "Time a pass spent on a kind.",
            None,
            MetricType::Histogram,
        )?;
        for (kind, km) in kinds {
            Buckets(&km.duration).encode(family.encode_family(&[("kind", kind)])?)?;
        }
        for (name, help, h) in [
            (
                "poolkeeper_claim_bind_seconds",
                "From a claim's arrival in the queue to Bound.",
                &m.bind_latency,
            ),
            (
                "poolkeeper_store_commit_seconds",
                "Writing and flushing one batch of the state store (every Bound waits for it).",
                &m.store_commit,
            ),
        ] {
            Buckets(h).encode(e.encode_descriptor(name, help, None, MetricType::Histogram)?)?;
        }
        let mut family = e.encode_descriptor(
            "poolkeeper_refusals",
            "Inputs refused by a limit, per reason: spec files too large, request bodies too \
             large or too slow, request headers too large or too slow, connections over the limit.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &self.1 {
            ConstCounter::new(*n).encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        ConstCounter::new(m.store_failures).encode(e.encode_descriptor(
            "poolkeeper_store_failures",
            "Writes or flushes of the state store that failed (a full disk, say): the engine then \
             changes nothing and refuses new claims until the store writes again.",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(i64::try_from(m.claim_subscribers).unwrap_or(i64::MAX)).encode(
            e.encode_descriptor(
                "poolkeeper_claim_subscribers",
                "Who follows claims' changes: the API's open event streams (/api/v1/events), \
                 and the webhooks' callbacks.",
                None,
                MetricType::Gauge,
            )?,
        )?;
        ConstGauge::new(i64::from(self.0.controller.store_error.is_none())).encode(
            e.encode_descriptor(
                "poolkeeper_store_writable",
                "1 while the state store writes, 0 while it cannot (see /readyz for why).",
                None,
                MetricType::Gauge,
            )?,
        )?;
        ConstCounter::new(m.store_deferred).encode(e.encode_descriptor(
            "poolkeeper_store_deferred_commits",
            "Batches of the state store written without a flush of their own (what a restart \
             derives again: a deleted claim's end, an instance gone); the next flush covers them.",
            None,
            MetricType::Counter,
        )?)?;
        let pools: Vec<&ObjectView> = self
            .0
            .objects
            .iter()
            .filter(|o| o.kind == Kind::Pool)
            .collect();
        let per_pool = [
            (
                "instances",
                "instances",
                MetricType::Gauge,
                "Instances of the pool.",
            ),
            (
                "warm",
                "warm",
                MetricType::Gauge,
                "Ready, unbound instances.",
            ),
            (
                "bound",
                "bound",
                MetricType::Gauge,
                "Instances bound to claims.",
            ),
            (
                "queued",
                "queued",
                MetricType::Gauge,
                "Claims waiting for an instance.",
            ),
            (
                "hits",
                "hits",
                MetricType::Counter,
                "Claims bound at once from a warm instance.",
            ),
            (
                "misses",
                "misses",
                MetricType::Counter,
                "Claims that had to wait.",
            ),
            (
                "desired_warm",
                "desiredWarm",
                MetricType::Gauge,
                "Warm instances the pool keeps now: warm, or what autoscale decided.",
            ),
            (
                "idle_instance_seconds",
                "idleInstanceSeconds",
                MetricType::Counter,
                "Time ready instances waited unbound, summed (instance-seconds): the warm pool's cost (brought up to date once a minute).",
            ),
        ];
        for (metric, field, kind, help) in per_pool {
            let name = format!("poolkeeper_pool_{metric}");
            let mut family = e.encode_descriptor(&name, help, None, kind)?;
            for p in &pools {
                let v = p.status.get(field).and_then(Value::as_u64).unwrap_or(0);
                let labels = [("pool", p.name.as_str())];
                match kind {
                    MetricType::Counter => {
                        ConstCounter::new(v).encode(family.encode_family(&labels)?)?
                    }
                    _ => ConstGauge::new(v as i64).encode(family.encode_family(&labels)?)?,
                }
            }
        }
        let mut family = e.encode_descriptor(
            "poolkeeper_pool_hit_ratio",
            "Share of the pool's claims bound at once from a warm instance (hits over hits and misses; 1 before any claim).",
            None,
            MetricType::Gauge,
        )?;
        for p in &pools {
            let n = |f: &str| p.status.get(f).and_then(Value::as_u64).unwrap_or(0) as f64;
            let (hits, misses) = (n("hits"), n("misses"));
            let ratio = if hits + misses > 0.0 {
                hits / (hits + misses)
            } else {
                1.0
            };
            ConstGauge::new(ratio).encode(family.encode_family(&[("pool", p.name.as_str())])?)?;
        }
        Ok(())
    }
}

/// One of the engine's histograms, as a Prometheus histogram.
struct Buckets<'a>(&'a Histogram);

impl EncodeMetric for Buckets<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        // The encoder takes each bucket's own count (it sums them) and writes `f64::MAX` as
        // `+Inf`, as prometheus-client's own histograms hold it.
        let counts = self.0.counts.iter().copied().chain(std::iter::repeat(0));
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(counts)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum, self.0.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use poolkeeper_engine::status::ControllerInfo;

    use super::*;

    fn snapshot() -> Snapshot {
        let mut snap = Snapshot {
            controller: ControllerInfo {
                pid: 1,
                runtime: "memory".into(),
                started_at: String::new(),
                updated_at: String::new(),
                state_dir: Default::default(),
                api: None,
                store_error: None,
            },
            objects: vec![ObjectView {
                kind: Kind::Pool,
                name: "web".into(),
                origin: Default::default(),
                spec: Value::Null,
                status: serde_json::json!({"instances": 3, "warm": 2, "bound": 1, "queued": 0,
                    "hits": 5, "misses": 1}),
                events: Vec::new(),
            }],
            diagnostics: Vec::new(),
            instances: Vec::new(),
            nodes: Vec::new(),
            metrics: Default::default(),
        };
        snap.metrics.pool.reconciles = 7;
        snap.metrics.bind_latency.observe(0.003);
        snap.metrics.bind_latency.observe(0.2);
        snap.metrics.store_deferred = 4;
        snap
    }

    /// Each sample's name and label keys, as a scraper sees them.
    fn series(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let name_labels = l.rsplit_once(' ').map_or(l, |(n, _)| n);
                match name_labels.split_once('{') {
                    Some((n, labels)) => {
                        let mut keys: Vec<&str> = labels
                            .trim_end_matches('}')
                            .split(',')
                            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                            .collect();
                        keys.sort_unstable();
                        format!("{n}{{{}}}", keys.join(","))
                    }
                    None => name_labels.to_owned(),
                }
            })
            .collect()
    }

    #[test]
    fn the_metric_names_and_label_sets_are_those_documented() {
        let text = render_metrics(&snapshot(), &Refusals::default());
        let want: BTreeSet<String> = [
            "poolkeeper_reconciles_total{kind}",
            "poolkeeper_reconcile_errors_total{kind}",
            "poolkeeper_reconcile_duration_seconds_bucket{kind,le}",
            "poolkeeper_reconcile_duration_seconds_sum{kind}",
            "poolkeeper_reconcile_duration_seconds_count{kind}",
            "poolkeeper_claim_bind_seconds_bucket{le}",
            "poolkeeper_claim_bind_seconds_sum",
            "poolkeeper_claim_bind_seconds_count",
            "poolkeeper_store_commit_seconds_bucket{le}",
            "poolkeeper_store_commit_seconds_sum",
            "poolkeeper_store_commit_seconds_count",
            "poolkeeper_store_deferred_commits_total",
            "poolkeeper_store_failures_total",
            "poolkeeper_store_writable",
            "poolkeeper_claim_subscribers",
            "poolkeeper_refusals_total{reason}",
            "poolkeeper_pool_instances{pool}",
            "poolkeeper_pool_warm{pool}",
            "poolkeeper_pool_bound{pool}",
            "poolkeeper_pool_queued{pool}",
            "poolkeeper_pool_hits_total{pool}",
            "poolkeeper_pool_misses_total{pool}",
            "poolkeeper_pool_desired_warm{pool}",
            "poolkeeper_pool_idle_instance_seconds_total{pool}",
            "poolkeeper_pool_hit_ratio{pool}",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(series(&text), want, "{text}");
    }

    #[test]
    fn values_and_buckets_are_those_of_the_snapshot() {
        let refusals = Refusals::default();
        refusals.count(Refusal::BodyTimeout);
        let text = render_metrics(&snapshot(), &refusals);
        for line in [
            "poolkeeper_reconciles_total{kind=\"pool\"} 7",
            "poolkeeper_pool_warm{pool=\"web\"} 2",
            "poolkeeper_pool_hits_total{pool=\"web\"} 5",
            "poolkeeper_store_deferred_commits_total 4",
            "poolkeeper_claim_bind_seconds_bucket{le=\"0.005\"} 1",
            "poolkeeper_claim_bind_seconds_bucket{le=\"0.25\"} 2",
            "poolkeeper_claim_bind_seconds_bucket{le=\"+Inf\"} 2",
            "poolkeeper_claim_bind_seconds_count 2",
            "poolkeeper_refusals_total{reason=\"body_timeout\"} 1",
            "poolkeeper_refusals_total{reason=\"too_many_connections\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
