//! The least-privilege roles of Kubernetes mode: exactly the verbs the code uses, nothing more
//! (`poolkeeper rbac` prints them).
//!
//! - The four kinds: `get, list, watch` (the watch), `patch` (finalizers; a Pool's `warm` for
//!   `scale`), `create, delete` on claims (the HTTP API's claims), `delete` on users (`delete
//!   user`); `patch` on their `/status` (server-side apply).
//! - `events.k8s.io` events: `create, patch` (kube's recorder patches a repeated event).
//! - Secrets: `get` (a User's `tokenSecretRef`; never listed).
//! - In the controller's own namespace: Leases `get, create, update` (leader election) and
//!   ConfigMaps `get, list, create, patch, delete` (records: reservations, webhook signatures).
//! - Only when the web console is given them: `create` on users (`--allow-registration`), and
//!   `create, delete` on the four kinds (`--flows`: the example flows it declares and removes).

use serde_json::{Value, json};

/// Who gets the roles, and where.
#[derive(Clone, Debug, Default)]
pub struct RbacTarget {
    /// The controller's ServiceAccount and namespace (where its Lease and records live).
    pub service_account: String,
    pub namespace: String,
    /// The namespaces it watches; empty: all (a ClusterRole).
    pub watched: Vec<String>,
    /// The web console registers users (`run --allow-registration`).
    pub registration: bool,
    /// The web console runs example flows (`run --flows DIR`).
    pub flows: bool,
    /// The Kubernetes runtime's pods live in this namespace (`run --runtime kube`).
    pub pods: Option<String>,
}

const KINDS: [&str; 4] = ["pools", "claims", "users", "deployments"];

fn watch_rules(t: &RbacTarget) -> Value {
    let mut rules = json!([
        {"apiGroups": ["poolkeeper.dev"], "resources": KINDS, "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["poolkeeper.dev"], "resources": ["claims"], "verbs": ["create", "delete"]},
        {"apiGroups": ["poolkeeper.dev"], "resources": ["users"], "verbs": ["delete"]},
        {"apiGroups": ["poolkeeper.dev"], "resources": KINDS.map(|k| format!("{k}/status")), "verbs": ["patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    ]);
    if let Some(r) = rules.as_array_mut() {
        if t.registration {
            r.push(json!({"apiGroups": ["poolkeeper.dev"], "resources": ["users"], "verbs": ["create"]}));
        }
        if t.flows {
            r.push(json!({"apiGroups": ["poolkeeper.dev"], "resources": KINDS, "verbs": ["create", "delete"]}));
        }
    }
    rules
}

fn own_rules() -> Value {
    json!([
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "patch", "delete"]},
    ])
}

/// What the Kubernetes runtime does in its pods' namespace: pods made, watched, labelled
/// (bindings), deleted (resets), exec'd into (files, `Exec` resets), read (logs), resized in
/// place (claims' resources); a Service per
/// instance (and per deployment container, read back when its name is taken); deployments'
/// volumes as PersistentVolumeClaims and networks as NetworkPolicies; the owning Pool read for
/// the pods' ownerReference.
fn pod_rules() -> Value {
    json!([
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods/resize"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "delete"]},
        {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["list", "create", "delete"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "delete"]},
        {"apiGroups": ["poolkeeper.dev"], "resources": ["pools"], "verbs": ["get"]},
    ])
}

fn subject(t: &RbacTarget) -> Value {
    json!([{"kind": "ServiceAccount", "name": t.service_account, "namespace": t.namespace}])
}

/// The roles and bindings, as Kubernetes objects.
pub fn objects(t: &RbacTarget) -> Vec<Value> {
    let mut out = Vec::new();
    let name = "poolkeeper";
    if t.watched.is_empty() {
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": watch_rules(t),
        }));
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subject(t),
        }));
    } else {
        for ns in &t.watched {
            out.push(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": name, "namespace": ns},
                "rules": watch_rules(t),
            }));
            out.push(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": subject(t),
            }));
        }
    }
    if let Some(ns) = &t.pods {
        let pods = format!("{name}-pods");
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": pods, "namespace": ns},
            "rules": pod_rules(),
        }));
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": pods, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": pods},
            "subjects": subject(t),
        }));
    }
    let own = format!("{name}-leader");
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": own, "namespace": t.namespace},
        "rules": own_rules(),
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": own, "namespace": t.namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": own},
        "subjects": subject(t),
    }));
    out
}

/// [`objects`] as a multi-document YAML stream.
pub fn yaml(t: &RbacTarget) -> String {
    crate::yaml_stream(&objects(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watching_namespaces_gives_roles_there_and_the_lease_role_at_home() {
        let t = RbacTarget {
            service_account: "pk".into(),
            namespace: "ops".into(),
            watched: vec!["team-a".into(), "team-b".into()],
            ..Default::default()
        };
        let objs = objects(&t);
        let kinds: Vec<(&str, &str)> = objs
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or(""),
                    o["metadata"]["namespace"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("Role", "team-a"),
                ("RoleBinding", "team-a"),
                ("Role", "team-b"),
                ("RoleBinding", "team-b"),
                ("Role", "ops"),
                ("RoleBinding", "ops"),
            ]
        );
        // No wildcard, and nothing the code does not use.
        let text = yaml(&t);
        assert!(!text.contains('*'), "{text}");
    }

    #[test]
    fn all_namespaces_is_a_cluster_role() {
        let t = RbacTarget {
            service_account: "pk".into(),
            namespace: "ops".into(),
            watched: Vec::new(),
            ..Default::default()
        };
        let objs = objects(&t);
        assert_eq!(objs[0]["kind"], "ClusterRole");
        assert_eq!(objs[1]["kind"], "ClusterRoleBinding");
        assert_eq!(objs[1]["subjects"][0]["namespace"], "ops");
    }

    #[test]
    fn the_consoles_writes_are_granted_only_when_it_makes_them() {
        let base = RbacTarget {
            service_account: "pk".into(),
            namespace: "ops".into(),
            ..Default::default()
        };
        let grants = |t: &RbacTarget, resource: &str, verb: &str| {
            objects(t)[0]["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| {
                    r["resources"]
                        .as_array()
                        .is_some_and(|x| x.iter().any(|v| v == resource))
                        && r["verbs"]
                            .as_array()
                            .is_some_and(|x| x.iter().any(|v| v == verb))
                })
        };
        assert!(!grants(&base, "users", "create"));
        assert!(!grants(&base, "deployments", "create"));
        let console = RbacTarget {
            registration: true,
            flows: true,
            ..base.clone()
        };
        assert!(grants(&console, "users", "create"));
        assert!(grants(&console, "deployments", "create"));
        assert!(grants(&console, "deployments", "delete"));
    }
}
