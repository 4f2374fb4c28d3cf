//! Conditions, events and the status snapshot that `get` and `describe` read.

use std::collections::VecDeque;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use poolkeeper_kinds::{Condition, Kind, Origin};

/// Milliseconds since the Unix epoch as RFC 3339.
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
/// Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    now_ms: u64,
) -> bool {
    let status = if status { "True" } else { "False" };
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status || c.reason != reason || c.message != message;
            if c.status != status {
                c.last_transition_time = rfc3339(now_ms);
            }
            c.status = status.to_owned();
            c.reason = reason.to_owned();
            c.message = message;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message,
                last_transition_time: rfc3339(now_ms),
                observed_generation: None,
            });
            true
        }
    }
}

pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    before != conditions.len()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub time: String,
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: u32,
}

/// One event as kept in memory (compact: shown as an [`EventRecord`]).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Event {
    at_ms: u64,
    warning: bool,
    reason: &'static str,
    message: String,
    count: u32,
}

/// The recent events of one object, newest last; repeats are folded into a count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Events(VecDeque<Event>);

/// Why 10: enough for `describe` to tell a story without letting a crash loop grow memory.
const EVENTS_KEPT: usize = 10;

impl Events {
    pub fn push(&mut self, warning: bool, reason: &'static str, message: String, now_ms: u64) {
        if let Some(last) = self.0.back_mut()
            && last.reason == reason
            && last.message == message
            && last.warning == warning
        {
            last.count += 1;
            last.at_ms = now_ms;
            return;
        }
        if self.0.len() == EVENTS_KEPT {
            self.0.pop_front();
        }
        self.0.push_back(Event {
            at_ms: now_ms,
            warning,
            reason,
            message,
            count: 1,
        });
    }

    pub fn records(&self) -> Vec<EventRecord> {
        self.0
            .iter()
            .map(|e| EventRecord {
                time: rfc3339(e.at_ms),
                type_: if e.warning { "Warning" } else { "Normal" }.to_owned(),
                reason: e.reason.to_owned(),
                message: e.message.clone(),
                count: e.count,
            })
            .collect()
    }
}

/// One object as shown by `get`/`describe`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectView {
    pub kind: Kind,
    pub name: String,
    pub origin: Origin,
    pub spec: serde_json::Value,
    pub status: serde_json::Value,
    #[serde(default)]
    pub events: Vec<EventRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// Its claim ended and its reset (per the pool's policy) has not finished.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resetting: bool,
    pub ports: Vec<u16>,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControllerInfo {
    pub pid: u32,
    pub runtime: String,
    pub started_at: String,
    pub updated_at: String,
    pub state_dir: PathBuf,
    /// Where the HTTP API listens (`host:port`), when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Why the state store cannot write, while it cannot (new claims are refused meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

/// Everything the controller knows, as written to `DIR/.poolkeeper/status.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub controller: ControllerInfo,
    pub objects: Vec<ObjectView>,
    /// File problems, as `FILE:LINE:COL: KIND/NAME: field: message`.
    pub diagnostics: Vec<String>,
    pub instances: Vec<InstanceView>,
    /// Runtime nodes and their health (Docker).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<poolkeeper_runtime::NodeStatus>,
    /// The engine's counters (for `/metrics`).
    #[serde(default)]
    pub metrics: super::metrics::EngineMetrics,
}

impl Snapshot {
    /// The claims of `user`.
    pub fn claims_of<'a>(&'a self, user: &'a str) -> impl Iterator<Item = &'a ObjectView> + 'a {
        self.objects.iter().filter(move |o| {
            o.kind == Kind::Claim
                && o.spec.get("user").and_then(serde_json::Value::as_str) == Some(user)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs, "Ready", false, "Filling", "0/3", 1_000
        ));
        let t0 = cs[0].last_transition_time.clone();
        assert!(set_condition(
            &mut cs, "Ready", false, "Filling", "1/3", 2_000
        ));
        assert_eq!(cs[0].last_transition_time, t0);
        assert!(!set_condition(
            &mut cs, "Ready", false, "Filling", "1/3", 3_000
        ));
        assert!(set_condition(&mut cs, "Ready", true, "Warm", "3/3", 4_000));
        assert_ne!(cs[0].last_transition_time, t0);
    }

    #[test]
    fn repeated_events_fold_and_old_ones_fall_off() {
        let mut e = Events::default();
        e.push(true, "BackOff", "x".into(), 1);
        e.push(true, "BackOff", "x".into(), 2);
        assert_eq!(e.records().len(), 1);
        assert_eq!(e.records()[0].count, 2);
        assert_eq!(e.records()[0].type_, "Warning");
        for i in 0..20 {
            e.push(false, "R", format!("{i}"), 3);
        }
        let r = e.records();
        assert_eq!(r.len(), EVENTS_KEPT);
        assert_eq!(r.last().map(|r| r.message.as_str()), Some("19"));
    }
}
