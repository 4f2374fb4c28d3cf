//! What a container carries in its labels (ownership, ports, probes), written at creation and
//! read back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bollard::models::{ContainerInspectResponse, ContainerSummary};

use poolkeeper_kinds::Probe;
use poolkeeper_runtime::{
    LABEL_FILES_DIR, LABEL_LIVENESS, LABEL_PORTS, LABEL_READINESS, Labels, PortBinding,
};

use crate::Tracked;

pub use poolkeeper_runtime::{decode_ports, encode_ports, proto};

/// What the labels of a container say: its instance labels, published ports, readiness and
/// liveness probes, and files mount.
pub(crate) struct FromLabels {
    labels: Labels,
    ports: Vec<PortBinding>,
    probe: Option<Probe>,
    liveness: Option<Probe>,
    files_mount: Option<String>,
}

pub(crate) fn labels_of(map: Option<&HashMap<String, String>>) -> FromLabels {
    let map = map.cloned().unwrap_or_default();
    let ports = map
        .get(LABEL_PORTS)
        .map(|s| decode_ports(s))
        .unwrap_or_default();
    let probe_of = |label: &str| map.get(label).and_then(|s| serde_json::from_str(s).ok());
    let probe = probe_of(LABEL_READINESS);
    let liveness = probe_of(LABEL_LIVENESS);
    let files_mount = map.get(LABEL_FILES_DIR).cloned();
    // The bookkeeping labels stay out of the instance's labels (the engine compares those).
    let labels: BTreeMap<String, String> = map
        .into_iter()
        .filter(|(k, _)| {
            ![
                LABEL_PORTS,
                LABEL_READINESS,
                LABEL_LIVENESS,
                LABEL_FILES_DIR,
            ]
            .contains(&k.as_str())
        })
        .collect();
    FromLabels {
        labels: Arc::new(labels),
        ports,
        probe,
        liveness,
        files_mount,
    }
}

pub(crate) fn tracked(
    node: usize,
    labels: Option<&HashMap<String, String>>,
    exit_code: Option<i64>,
    ip: Option<String>,
) -> Tracked {
    let FromLabels {
        labels,
        ports,
        probe,
        liveness,
        files_mount,
    } = labels_of(labels);
    Tracked {
        node,
        labels,
        ports,
        probe,
        liveness,
        running: false,
        ready: false,
        exit_code,
        incarnation: 0,
        ip,
        revision: 0,
        files_mount,
    }
}

pub(crate) fn tracked_from_summary(i: usize, c: &ContainerSummary) -> Tracked {
    tracked(
        i,
        c.labels.as_ref(),
        exit_code_of(c.status.as_deref()),
        None,
    )
}

pub(crate) fn tracked_from_inspect(i: usize, r: &ContainerInspectResponse) -> Option<Tracked> {
    let config = r.config.as_ref()?;
    let ip = r
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .and_then(|n| {
            n.values()
                .filter_map(|e| e.ip_address.clone())
                .find(|ip| !ip.is_empty())
        });
    Some(tracked(
        i,
        config.labels.as_ref(),
        r.state.as_ref().and_then(|s| s.exit_code),
        ip,
    ))
}

/// The exit code in a summary status such as `Exited (137) 2 minutes ago`.
pub(crate) fn exit_code_of(status: Option<&str>) -> Option<i64> {
    let s = status?;
    let open = s.find('(')?;
    let close = s[open..].find(')')? + open;
    s[open + 1..close].parse().ok()
}
