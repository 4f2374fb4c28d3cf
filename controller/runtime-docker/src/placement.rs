//! Where each deployment runs, kept across restarts of the controller.
//!
//! A deployment's named volumes live on the node its containers were placed on. When that node
//! is down, its containers are reported removed, and their replacements must wait for it rather
//! than start elsewhere on empty volumes. A controller restarted during the outage cannot list
//! the node, so the placement is kept in a small file under the state directory: one JSON
//! object, deployment name -> node name, written whole (temporary file, fsync, rename, fsync of
//! the folder) whenever a deployment is placed somewhere new.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Where a deployment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// The node's index.
    pub node: usize,
    /// One of its containers mounts a named volume: the deployment never moves off its node
    /// (all its containers wait for it), since its data is there.
    pub pinned: bool,
}

/// A placement as the file keeps it: by node name, so that reordering the nodes moves nothing.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Recorded {
    node: String,
    #[serde(default)]
    named_volumes: bool,
}

/// The placements recorded in `path`, as node indexes of `nodes`. A node no longer configured
/// is dropped (its deployments are placed anew); a missing file is an empty map. A file that
/// cannot be read or parsed is an error: starting without it could move a deployment away from
/// its volumes.
pub(crate) fn load(path: &Path, nodes: &[&str]) -> anyhow::Result<HashMap<String, Placement>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    };
    let recorded: BTreeMap<String, Recorded> = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (a JSON object of deployment name to {{\"node\": NAME, \"namedVolumes\": \
             BOOL}}; remove the file to let deployments be placed anew)",
            path.display()
        )
    })?;
    let mut out = HashMap::new();
    for (deployment, r) in recorded {
        match nodes.iter().position(|n| *n == r.node) {
            Some(i) => {
                out.insert(
                    deployment,
                    Placement {
                        node: i,
                        pinned: r.named_volumes,
                    },
                );
            }
            None => warn!(deployment = %deployment, node = %r.node, file = %path.display(),
                "a deployment was placed on a node no longer configured; it is placed anew"),
        }
    }
    Ok(out)
}

/// Writes `placed` to `path`, whole and durably (blocking: call it off the async workers).
pub(crate) fn save(
    path: &Path,
    placed: &HashMap<String, Placement>,
    nodes: &[String],
) -> std::io::Result<()> {
    let named: BTreeMap<&str, Recorded> = placed
        .iter()
        .filter_map(|(d, p)| {
            nodes.get(p.node).map(|n| {
                (
                    d.as_str(),
                    Recorded {
                        node: n.clone(),
                        named_volumes: p.pinned,
                    },
                )
            })
        })
        .collect();
    let bytes = serde_json::to_vec_pretty(&named).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(folder) = path.parent() {
        std::fs::File::open(folder)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(node: usize, pinned: bool) -> Placement {
        Placement { node, pinned }
    }

    #[test]
    fn placements_round_trip_by_node_name_and_a_node_no_longer_configured_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placements.json");
        let nodes = ["one".to_owned(), "two".to_owned()];
        assert!(
            load(&path, &["one", "two"]).unwrap().is_empty(),
            "no file: nothing placed"
        );
        let placed = HashMap::from([
            ("shop".to_owned(), at(1, true)),
            ("blog".to_owned(), at(0, false)),
        ]);
        save(&path, &placed, &nodes).unwrap();
        assert_eq!(load(&path, &["one", "two"]).unwrap(), placed);
        // The nodes reordered: placements follow the names, not the positions.
        let reordered = load(&path, &["two", "one"]).unwrap();
        assert_eq!(reordered.get("shop"), Some(&at(0, true)));
        assert_eq!(reordered.get("blog"), Some(&at(1, false)));
        // Node one removed from the configuration: blog is placed anew.
        let fewer = load(&path, &["two"]).unwrap();
        assert_eq!(fewer, HashMap::from([("shop".to_owned(), at(0, true))]));
    }

    #[test]
    fn a_damaged_placements_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placements.json");
        std::fs::write(&path, b"{\"shop\": ").unwrap();
        let e = load(&path, &["one"]).unwrap_err().to_string();
        assert!(
            e.contains("placements.json") && e.contains("remove the file"),
            "{e}"
        );
    }
}
