//! The one shape of every line `bench` prints (docs/benchmarks.md): `figure` (its name),
//! `runtime`, `n` (how many operations or samples it is taken over) and, where measured,
//! `per_s`, `p50_ms`, `p90_ms`, `p99_ms`, `max_ms` and `rss_mb`; then the figure's own fields.

use serde::Serialize;
use serde_json::{Map, Value};

/// One figure, printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct Figure {
    pub figure: &'static str,
    pub runtime: &'static str,
    pub n: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_mb: Option<f64>,
    /// The figure's own fields, after the common ones.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Figure {
    pub fn new(figure: &'static str, runtime: &'static str, n: impl Into<u64>) -> Figure {
        Figure {
            figure,
            runtime,
            n: n.into(),
            per_s: None,
            p50_ms: None,
            p90_ms: None,
            p99_ms: None,
            max_ms: None,
            rss_mb: None,
            fields: Map::new(),
        }
    }

    /// The percentiles and maximum of `sorted` (milliseconds, ascending).
    pub fn latencies(mut self, sorted: &[f64]) -> Figure {
        if sorted.is_empty() {
            return self;
        }
        self.p50_ms = Some(round3(pct(sorted, 0.5)));
        self.p90_ms = Some(round3(pct(sorted, 0.9)));
        self.p99_ms = Some(round3(pct(sorted, 0.99)));
        self.max_ms = Some(round3(pct(sorted, 1.0)));
        self
    }

    /// Operations per second.
    pub fn per_s(mut self, v: f64) -> Figure {
        self.per_s = Some(round3(v));
        self
    }

    /// This process's peak resident memory.
    pub fn rss(mut self) -> Figure {
        self.rss_mb = Some(round3(super::rss_peak_mb()));
        self
    }

    /// One of the figure's own fields (floats are rounded to 3 decimals).
    pub fn with(mut self, key: &str, value: impl Serialize) -> Figure {
        let v = match serde_json::to_value(value) {
            Ok(Value::Number(n)) if n.is_f64() => n
                .as_f64()
                .and_then(|f| serde_json::Number::from_f64(round3(f)))
                .map_or(Value::Null, Value::Number),
            Ok(v) => v,
            Err(e) => Value::String(format!("unprintable: {e}")),
        };
        self.fields.insert(key.to_owned(), v);
        self
    }

    pub fn print(&self) {
        match serde_json::to_string(self) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("figure {}: {e}", self.figure),
        }
    }
}

/// The value at quantile `p` of `sorted` (nearest rank).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_starts_with_the_common_fields_and_skips_what_was_not_measured() {
        let line = serde_json::to_string(
            &Figure::new("claim", "memory", 4u32)
                .latencies(&[1.0, 2.0, 3.0, 40.0])
                .per_s(1234.56789)
                .with("pool", 10)
                .with("ratio", 1.23456),
        )
        .expect("json");
        assert_eq!(
            line,
            r#"{"figure":"claim","runtime":"memory","n":4,"per_s":1234.568,"p50_ms":3.0,"p90_ms":40.0,"p99_ms":40.0,"max_ms":40.0,"pool":10,"ratio":1.235}"#
        );
    }
}
