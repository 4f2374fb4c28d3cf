//! The bounds on what comes from outside (spec files, HTTP requests and connections), and the
//! count of what each refused, shown on `/metrics` as `poolkeeper_refusals_total{reason}`.
//! Sources and the API share one [`Refusals`] per controller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why an input was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A spec file larger than [`Limits::max_spec_file`] (not read).
    SpecFileTooLarge,
    /// A request body larger than the route allows (413).
    BodyTooLarge,
    /// Request headers over [`Limits::max_header_bytes`] or [`Limits::max_headers`] (431).
    HeadersTooLarge,
    /// A request whose headers did not arrive within [`Limits::header_timeout`] (connection
    /// closed).
    HeaderTimeout,
    /// A request whose body did not arrive within [`Limits::body_timeout`] (408).
    BodyTimeout,
    /// A connection over [`Limits::max_connections`] (503, closed).
    TooManyConnections,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::SpecFileTooLarge,
        Refusal::BodyTooLarge,
        Refusal::HeadersTooLarge,
        Refusal::HeaderTimeout,
        Refusal::BodyTimeout,
        Refusal::TooManyConnections,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::SpecFileTooLarge => "spec_file_too_large",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }
}

/// How many inputs each [`Refusal`] turned away since the start.
#[derive(Debug, Default)]
pub struct Refusals([AtomicU64; 6]);

impl Refusals {
    pub fn count(&self, r: Refusal) {
        self.0[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, r: Refusal) -> u64 {
        self.0[r as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count, in [`Refusal::ALL`]'s order.
    pub fn all(&self) -> Vec<(Refusal, u64)> {
        Refusal::ALL.iter().map(|r| (*r, self.get(*r))).collect()
    }
}

/// The bounds, each with a default a user can change (`run`'s flags of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest spec file read (bytes): a larger one is a diagnostic naming it, and is not
    /// read at all (`--max-spec-file-size`).
    pub max_spec_file: u64,
    /// The time a client has to send a request's headers, from its first byte or, on a kept
    /// connection, from the end of the previous answer (`--header-timeout`).
    pub header_timeout: Duration,
    /// The time a client has to send a request's body once its headers are in
    /// (`--body-timeout`).
    pub body_timeout: Duration,
    /// Connections served at once; one more is answered 503 and closed (`--max-connections`).
    pub max_connections: usize,
    /// The request headers' total size (names and values) and count (431 beyond).
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_spec_file: 8 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_connections: 512,
            max_header_bytes: 32 << 10,
            max_headers: 100,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_is_counted_under_its_own_label() {
        let r = Refusals::default();
        r.count(Refusal::BodyTimeout);
        r.count(Refusal::BodyTimeout);
        r.count(Refusal::TooManyConnections);
        let all = r.all();
        assert_eq!(all.len(), Refusal::ALL.len());
        assert_eq!(r.get(Refusal::BodyTimeout), 2);
        assert_eq!(r.get(Refusal::TooManyConnections), 1);
        assert_eq!(r.get(Refusal::SpecFileTooLarge), 0);
        let labels: std::collections::BTreeSet<_> = all.iter().map(|(r, _)| r.label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len(), "labels are distinct");
    }
}
