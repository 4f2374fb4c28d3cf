//! kubectl-style tables and `describe` text.

use std::fmt::Write;

use serde_json::Value;

use poolkeeper_engine::status::{ObjectView, Snapshot};
use poolkeeper_kinds::Kind;

fn s(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return "-".into(),
        }
    }
    match cur {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn condition(v: &Value, type_: &str) -> Option<(String, String, String)> {
    v.get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
        .map(|c| (s(c, &["status"]), s(c, &["reason"]), s(c, &["message"])))
}

pub fn rows(kind: Kind, items: &[&ObjectView], wide: bool) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    match kind {
        Kind::Pool => {
            let mut h = vec![
                "NAME",
                "IMAGE",
                "WARM",
                "BOUND",
                "INSTANCES",
                "QUEUED",
                "READY",
            ];
            if wide {
                h.extend(["HOST-PORTS", "HITS", "MISSES", "RESET", "MESSAGE"]);
            }
            rows.push(h.into_iter().map(String::from).collect());
            for o in items {
                let st = &o.status;
                let ready = condition(st, "Ready")
                    .map(|c| c.1)
                    .unwrap_or_else(|| "-".into());
                let mut r = vec![
                    o.name.clone(),
                    s(&o.spec, &["template", "image"]),
                    format!("{}/{}", s(st, &["warm"]), s(&o.spec, &["warm"])),
                    s(st, &["bound"]),
                    s(st, &["instances"]),
                    s(st, &["queued"]),
                    ready,
                ];
                if wide {
                    let ports = match (o.spec.get("hostPorts"), o.spec.get("hostPorts")) {
                        (Some(p), _) => format!("{}-{}", s(p, &["start"]), s(p, &["end"])),
                        _ => "-".into(),
                    };
                    let msg = condition(st, "InstancesCreatable")
                        .filter(|c| c.0 == "False")
                        .map(|c| c.2)
                        .unwrap_or_default();
                    r.extend([
                        ports,
                        s(st, &["hits"]),
                        s(st, &["misses"]),
                        s(&o.spec, &["reset"]),
                        msg,
                    ]);
                }
                rows.push(r);
            }
        }
        Kind::Claim => {
            let mut h = vec!["NAME", "POOL", "USER", "PHASE", "ENDPOINT", "EXPIRES"];
            if wide {
                h.extend(["INSTANCE", "QUEUE", "REASON"]);
            }
            rows.push(h.into_iter().map(String::from).collect());
            for o in items {
                let st = &o.status;
                let endpoint = st
                    .get("endpoint")
                    .map(|e| {
                        let host = s(e, &["host"]);
                        let ports: Vec<String> = e
                            .get("ports")
                            .and_then(Value::as_object)
                            .map(|m| m.iter().map(|(k, v)| format!("{host}:{v} ({k})")).collect())
                            .unwrap_or_default();
                        if ports.is_empty() {
                            host
                        } else {
                            ports.join(",")
                        }
                    })
                    .unwrap_or_else(|| "-".into());
                let mut r = vec![
                    o.name.clone(),
                    s(&o.spec, &["pool"]),
                    s(&o.spec, &["user"]),
                    s(st, &["phase"]),
                    endpoint,
                    s(st, &["expiresAt"]),
                ];
                if wide {
                    let reason = condition(st, "Admitted")
                        .filter(|c| c.0 == "False")
                        .map(|c| format!("{}: {}", c.1, c.2))
                        .unwrap_or_else(|| "-".into());
                    r.extend([s(st, &["instance"]), s(st, &["queuePosition"]), reason]);
                }
                rows.push(r);
            }
        }
        Kind::User => {
            let mut h = vec!["NAME", "EMAIL", "CLAIMS", "POOLS", "DISABLED"];
            if wide {
                h.push("SSH-KEYS");
            }
            rows.push(h.into_iter().map(String::from).collect());
            for o in items {
                let pools = o
                    .spec
                    .pointer("/quota/pools")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "*".into());
                let max = o
                    .spec
                    .pointer("/quota/maxClaims")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "3".into());
                let mut r = vec![
                    o.name.clone(),
                    s(&o.spec, &["email"]),
                    format!("{}/{}", s(&o.status, &["activeClaims"]), max),
                    pools,
                    o.spec
                        .get("disabled")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                        .to_string(),
                ];
                if wide {
                    let n = o
                        .spec
                        .get("sshKeys")
                        .and_then(Value::as_array)
                        .map(Vec::len)
                        .unwrap_or(0);
                    r.push(n.to_string());
                }
                rows.push(r);
            }
        }
        Kind::Deployment => {
            let mut h = vec!["NAME", "READY", "CONTAINERS", "AVAILABLE"];
            if wide {
                h.push("NETWORK");
            }
            rows.push(h.into_iter().map(String::from).collect());
            for o in items {
                let st = &o.status;
                let states: Vec<String> = st
                    .get("containerStatuses")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|c| format!("{}={}", s(c, &["name"]), s(c, &["state"])))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut r = vec![
                    o.name.clone(),
                    format!("{}/{}", s(st, &["ready"]), s(st, &["containers"])),
                    if states.is_empty() {
                        "-".into()
                    } else {
                        states.join(",")
                    },
                    condition(st, "Available")
                        .map(|c| c.0)
                        .unwrap_or_else(|| "-".into()),
                ];
                if wide {
                    r.push(s(&o.spec, &["network"]));
                }
                rows.push(r);
            }
        }
    }
    rows
}

pub fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{:<w$}   ", c, w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn yaml_block(v: &Value, indent: &str) -> String {
    if v.is_null() {
        return format!("{indent}<none>\n");
    }
    let text = serde_saphyr::to_string(v).unwrap_or_default();
    text.lines().map(|l| format!("{indent}{l}\n")).collect()
}

pub fn describe(v: &ObjectView, problems: &[&String], snap: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Name:         {}", v.name);
    let _ = writeln!(out, "Kind:         {}", v.kind);
    let _ = writeln!(out, "API Version:  {}", poolkeeper_kinds::API_VERSION);
    let _ = writeln!(out, "Source:       {}", v.origin);
    if !snap.controller.runtime.is_empty() {
        let _ = writeln!(out, "Runtime:      {}", snap.controller.runtime);
    }
    out.push_str("Spec:\n");
    out.push_str(&yaml_block(&v.spec, "  "));
    let mut status = v.status.clone();
    let conditions = status
        .as_object_mut()
        .and_then(|m| m.remove("conditions"))
        .and_then(|c| c.as_array().cloned())
        .unwrap_or_default();
    out.push_str("Status:\n");
    out.push_str(&yaml_block(&status, "  "));
    out.push_str("Conditions:\n");
    if conditions.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut rows = vec![vec![
            "  Type".to_owned(),
            "Status".into(),
            "Reason".into(),
            "Last Transition".into(),
            "Message".into(),
        ]];
        for c in &conditions {
            rows.push(vec![
                format!("  {}", s(c, &["type"])),
                s(c, &["status"]),
                s(c, &["reason"]),
                s(c, &["lastTransitionTime"]),
                s(c, &["message"]),
            ]);
        }
        out.push_str(&render(&rows));
    }
    if v.kind == Kind::Pool {
        let mine: Vec<_> = snap
            .instances
            .iter()
            .filter(|i| i.pool.as_deref() == Some(&v.name))
            .collect();
        out.push_str("Instances:\n");
        if mine.is_empty() {
            out.push_str("  <none>\n");
        } else {
            let mut rows = vec![vec![
                "  Name".to_owned(),
                "Phase".into(),
                "Claim".into(),
                "Ports".into(),
                "Node".into(),
            ]];
            for i in mine {
                let phase = match &i.quarantined {
                    Some(q) => format!("Quarantined ({q})"),
                    None => i.phase.clone(),
                };
                rows.push(vec![
                    format!("  {}", i.name),
                    phase,
                    i.claim.clone().unwrap_or_else(|| "-".into()),
                    i.ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    i.node.clone(),
                ]);
            }
            out.push_str(&render(&rows));
        }
    }
    if !problems.is_empty() {
        out.push_str("Problems (the last valid spec is in use):\n");
        for p in problems {
            let _ = writeln!(out, "  {p}");
        }
    }
    out.push_str("Events:\n");
    if v.events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut rows = vec![vec![
            "  Type".to_owned(),
            "Reason".into(),
            "Time".into(),
            "Count".into(),
            "Message".into(),
        ]];
        for e in &v.events {
            rows.push(vec![
                format!("  {}", e.type_),
                e.reason.clone(),
                e.time.clone(),
                e.count.to_string(),
                e.message.clone(),
            ]);
        }
        out.push_str(&render(&rows));
    }
    out
}
