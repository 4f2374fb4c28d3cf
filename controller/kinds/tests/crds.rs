//! The committed CRDs are exactly what the types generate, and they are valid Kubernetes objects.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn committed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../crds/poolkeeper.dev.yaml")
}

/// The Helm chart's copy (Helm installs what is under a chart's `crds/` before its templates).
fn in_chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../charts/poolkeeper/crds/poolkeeper.dev.yaml")
}

#[test]
fn committed_crds_and_the_charts_copy_match_the_rust_types() {
    let generated = poolkeeper_kinds::crd::crds_yaml().unwrap();
    for path in [committed(), in_chart()] {
        if std::env::var_os("UPDATE_CRDS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert!(
            on_disk == generated,
            "{} is out of date with the Rust types; regenerate it (and the chart's copy) with \
             `UPDATE_CRDS=1 cargo test -p poolkeeper-kinds --test crds`",
            path.display()
        );
    }
}

#[test]
fn crds_declare_status_subresource_short_names_and_printer_columns() {
    let yaml = poolkeeper_kinds::crd::crds_yaml().unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "pools.poolkeeper.dev",
            "claims.poolkeeper.dev",
            "users.poolkeeper.dev",
            "deployments.poolkeeper.dev"
        ]
    );
    for d in &docs {
        let v = &d["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object(), "{d}");
        assert!(!v["additionalPrinterColumns"].as_array().unwrap().is_empty());
        assert_eq!(
            d["spec"]["names"]["shortNames"].as_array().unwrap().len(),
            1
        );
        assert_eq!(d["spec"]["names"]["categories"][0], "poolkeeper");
    }
    // `kubectl scale pool/NAME --replicas=N` sets the Pool's warm floor.
    let scale = &docs[0]["spec"]["versions"][0]["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.warm", "{scale}");
    assert_eq!(scale["statusReplicasPath"], ".status.warm", "{scale}");
    assert_eq!(scale["labelSelectorPath"], ".status.selector", "{scale}");
}

/// `kubernetes-validate` (PyPI) checks the CRDs against the oldest Kubernetes we support
/// (k8s-openapi's `v1_33`) and the newest it knows. `e2e/run-tests.sh` installs it; without it
/// this test fails rather than pass unchecked.
#[test]
fn crds_pass_kubernetes_validate_strict() {
    let bin = std::env::var("KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    for version in ["1.33.0", "1.37.0"] {
        let out = Command::new(&bin)
            .args(["--strict", "--quiet", "-k", version])
            .arg(committed())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {bin} ({e}); install it with `pip install kubernetes-validate` \
                     or run the tests through e2e/run-tests.sh"
                )
            });
        assert!(
            out.status.success(),
            "kubernetes-validate --strict failed for {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
