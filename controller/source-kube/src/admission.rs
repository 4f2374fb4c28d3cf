//! The finalizer set at admission: a `MutatingAdmissionPolicy` (admissionregistration.k8s.io/v1,
//! Kubernetes 1.36 and later) that gives every Pool, Claim and Deployment the controller's
//! [`FINALIZER`] as it is created, and its binding (`poolkeeper admission` prints both).
//!
//! Without it the controller adds the finalizer with a patch of its own when it first sees an
//! object; with it that write is not needed: a claim costs one write by the controller on its
//! way to Bound (its status) instead of two, and the API server one update less (measured in
//! docs/benchmarks.md). The controller does not depend on it: an object that arrives without
//! the finalizer (an older cluster, the policy not installed, or its evaluation failed, which
//! `failurePolicy: Ignore` lets through) gets it from the controller as before.

use serde_json::{Value, json};

use poolkeeper_kinds::Kind;

use crate::objects::{FINALIZER, api_resource, has_finalizer};

/// The name of the policy and of its binding.
pub const POLICY: &str = "poolkeeper-cleanup-finalizer";

/// The resources whose objects carry the finalizer.
fn resources() -> Vec<String> {
    Kind::ALL
        .into_iter()
        .filter(|k| has_finalizer(*k))
        .map(|k| api_resource(k).plural)
        .collect()
}

/// The policy and its binding: in `namespaces` (those a controller run with `--namespace`
/// watches; empty: every namespace). Objects in a namespace no controller watches would get
/// a finalizer nobody removes.
pub fn objects(namespaces: &[String]) -> Vec<Value> {
    // A JSON patch, not an apply configuration: `metadata.finalizers` is a set, and the patch
    // appends to it without the merge an apply configuration would cost on every create.
    let expression = format!(
        "!has(object.metadata.finalizers) ? \
         [JSONPatch{{op: \"add\", path: \"/metadata/finalizers\", value: [\"{FINALIZER}\"]}}] : \
         (\"{FINALIZER}\" in object.metadata.finalizers ? [] : \
         [JSONPatch{{op: \"add\", path: \"/metadata/finalizers/-\", value: \"{FINALIZER}\"}}])"
    );
    let labels = json!({"app.kubernetes.io/name": "poolkeeper"});
    let mut binding = json!({"policyName": POLICY});
    if !namespaces.is_empty() {
        binding["matchResources"] = json!({"namespaceSelector": {"matchExpressions": [{
            "key": "kubernetes.io/metadata.name",
            "operator": "In",
            "values": namespaces,
        }]}});
    }
    vec![
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": POLICY, "labels": labels},
            "spec": {
                "failurePolicy": "Ignore",
                "reinvocationPolicy": "Never",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": ["poolkeeper.dev"],
                    "apiVersions": ["*"],
                    "operations": ["CREATE"],
                    "resources": resources(),
                }]},
                "mutations": [{
                    "patchType": "JSONPatch",
                    "jsonPatch": {"expression": expression},
                }],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicyBinding",
            "metadata": {"name": POLICY, "labels": labels},
            "spec": binding,
        }),
    ]
}

/// [`objects`] as YAML documents, for `kubectl apply -f -`.
pub fn yaml(namespaces: &[String]) -> String {
    crate::yaml_stream(&objects(namespaces))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_gives_the_finalizer_to_the_kinds_the_controller_cleans_up_at_create_only() {
        let objs = objects(&[]);
        let rule = &objs[0]["spec"]["matchConstraints"]["resourceRules"][0];
        assert_eq!(rule["resources"], json!(["pools", "claims", "deployments"]));
        assert_eq!(rule["operations"], json!(["CREATE"]));
        assert_eq!(rule["apiGroups"], json!(["poolkeeper.dev"]));
        // A failed evaluation must not refuse the object: the controller adds the finalizer.
        assert_eq!(objs[0]["spec"]["failurePolicy"], "Ignore");
        let expr = objs[0]["spec"]["mutations"][0]["jsonPatch"]["expression"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(expr.matches(FINALIZER).count(), 3, "{expr}");
        assert_eq!(objs[1]["spec"]["policyName"], POLICY);
        assert_eq!(objs[1]["kind"], "MutatingAdmissionPolicyBinding");
        assert!(
            objs[1]["spec"].get("matchResources").is_none(),
            "every namespace"
        );
    }

    #[test]
    fn a_controller_of_some_namespaces_binds_the_policy_to_them_only() {
        let objs = objects(&["team-a".to_owned(), "team-b".to_owned()]);
        assert_eq!(
            objs[1]["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"],
            json!([{"key": "kubernetes.io/metadata.name", "operator": "In",
                    "values": ["team-a", "team-b"]}])
        );
        assert_eq!(objs[0], objects(&[])[0], "the policy itself is the same");
    }

    #[test]
    fn the_yaml_is_the_objects() {
        let ns = ["a".to_owned()];
        let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml(&ns)).unwrap_or_default();
        let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
        assert_eq!(docs, objects(&ns));
    }
}
