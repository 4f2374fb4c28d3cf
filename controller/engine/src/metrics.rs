//! What the engine counts for `/metrics`: reconciles and their errors and duration per kind,
//! how long claims wait to be bound, and how long the state store takes to make a batch durable
//! (the flush every Bound waits for). Pool gauges and hit/miss counters come from status.

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the histogram buckets.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Observations per bucket of [`BUCKETS`] (not cumulative), then above the last.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if self.counts.len() != BUCKETS.len() + 1 {
            self.counts = vec![0; BUCKETS.len() + 1];
        }
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// Observations above `bound` seconds; `bound` must be one of [`BUCKETS`] (else None).
    pub fn above(&self, bound: f64) -> Option<u64> {
        let at_or_below = self.cumulative().into_iter().find(|(b, _)| *b == bound)?.1;
        Some(self.count - at_or_below)
    }

    /// Cumulative counts per bucket bound, as Prometheus wants them.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        BUCKETS
            .iter()
            .enumerate()
            .map(|(i, b)| {
                total += self.counts.get(i).copied().unwrap_or(0);
                (*b, total)
            })
            .collect()
    }
}

/// Per kind: reconciles, failed runtime actions, and the time a pass spent on the kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KindMetrics {
    pub reconciles: u64,
    pub errors: u64,
    pub duration: Histogram,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineMetrics {
    pub pool: KindMetrics,
    pub deployment: KindMetrics,
    pub user: KindMetrics,
    /// From a claim's arrival (or its return to the queue) to Bound.
    pub bind_latency: Histogram,
    /// The same, per pool (by the claim's `pool`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bind_latency_by_pool: std::collections::BTreeMap<String, Histogram>,
    /// One flush of the state store: the write and fdatasync of a batch, which every Bound
    /// waits for (the counterpart of etcd's WAL fsync duration: a slow disk shows here first).
    #[serde(default)]
    pub store_commit: Histogram,
    /// Batches written without a flush of their own (a later flush covers them).
    #[serde(default)]
    pub store_deferred: u64,
    /// Commits or flushes of the state store that failed (each stops the engine acting until
    /// the store writes again).
    #[serde(default)]
    pub store_failures: u64,
    pub passes: u64,
    /// Who follows claims' changes now: the API's open event streams, the webhooks' callbacks.
    #[serde(default)]
    pub claim_subscribers: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_add_up() {
        let mut h = Histogram::default();
        h.observe(0.0005);
        h.observe(0.003);
        h.observe(0.003);
        h.observe(100.0);
        let c = h.cumulative();
        assert_eq!(c[0], (0.001, 1));
        assert_eq!(c[1], (0.005, 3));
        assert_eq!(c.last().map(|x| x.1), Some(3), "100 s is above every bound");
        assert_eq!(h.count, 4);
        assert!((h.sum - 100.0065).abs() < 1e-9);
        assert_eq!(h.above(0.001), Some(3));
        assert_eq!(h.above(0.005), Some(1));
        assert_eq!(h.above(60.0), Some(1));
        assert_eq!(h.above(0.002), None, "not a bucket bound: no exact answer");
    }
}
