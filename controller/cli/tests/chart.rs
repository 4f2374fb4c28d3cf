//! The Helm chart (`charts/poolkeeper`), linted and rendered by Helm's own library
//! (`e2e/chart.py`; PyPI's helm-python-sdk, which `e2e/run-tests.sh` installs and names in
//! `HELM_PYTHON`) with its default values and with every option on: lint clean (strict) for the
//! oldest and newest Kubernetes we support, every manifest valid (`kubernetes-validate
//! --strict`), the roles exactly `poolkeeper rbac`'s, and a pod that passes the restricted Pod
//! Security Standard. (The CRDs' copy in the chart is checked against the types in
//! `controller/kinds/tests/crds.rs`.)

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn helm(args: &[&str]) -> std::process::Output {
    let Ok(py) = std::env::var("HELM_PYTHON") else {
        panic!("HELM_PYTHON is not set: run the tests through e2e/run-tests.sh");
    };
    Command::new(py)
        .arg(repo().join("e2e/chart.py"))
        .args(args)
        .output()
        .unwrap()
}

const DOCKER: &str = "e2e/chart/values-docker.yaml";
const FULL: &str = "e2e/chart/values-full.yaml";
const KUBE: &str = "e2e/chart/values-kube.yaml";

/// The chart rendered with `values` (a file under the repository), as manifests.
fn render(values: &str) -> (String, Vec<Value>) {
    let out = helm(&[
        "render",
        "poolkeeper",
        repo().join(values).to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "rendering with {values} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    (text, docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn the_chart_lints_clean_for_the_oldest_and_newest_kubernetes() {
    for values in [KUBE, DOCKER, FULL] {
        for version in ["1.33.0", "1.37.0"] {
            let out = helm(&["lint", version, repo().join(values).to_str().unwrap()]);
            assert!(
                out.status.success(),
                "helm lint --strict ({values}, {version}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn the_default_values_run_the_pod_runtime_in_the_releases_namespace() {
    let out = helm(&["render", "poolkeeper"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let args = container_args(&docs);
    for want in [
        "--runtime=kube",
        "--pod-namespace=poolkeeper",
        "--pod-grace-seconds=10",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    let pods = of_kind(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "poolkeeper-pods")
        .expect("the pod runtime's Role");
    assert_eq!(pods["metadata"]["namespace"], "poolkeeper");
}

#[test]
fn the_docker_runtime_needs_the_docker_host_and_says_so() {
    let out = helm(&[
        "render",
        "poolkeeper",
        repo()
            .join("e2e/chart/values-docker-nohost.yaml")
            .to_str()
            .unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runtime docker needs docker.host"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_manifest_is_valid_for_the_oldest_and_newest_kubernetes() {
    let bin = std::env::var("KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let dir = tempfile::tempdir().unwrap();
    for values in [KUBE, DOCKER, FULL] {
        let (text, docs) = render(values);
        assert_eq!(of_kind(&docs, "CustomResourceDefinition").len(), 4);
        let file = dir.path().join("manifests.yaml");
        std::fs::write(&file, text).unwrap();
        for version in ["1.33.0", "1.37.0"] {
            let out = Command::new(&bin)
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {bin} ({e})"));
            assert!(
                out.status.success(),
                "kubernetes-validate --strict ({values}, {version}):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The roles' rules, as `poolkeeper rbac` makes them for the same options.
fn rbac_rules(watched: &[&str], registration: bool) -> Value {
    let objs = poolkeeper_source_kube::rbac::objects(&poolkeeper_source_kube::rbac::RbacTarget {
        service_account: "poolkeeper".into(),
        namespace: "poolkeeper".into(),
        watched: watched.iter().map(|s| (*s).to_owned()).collect(),
        registration,
        flows: false,
        pods: None,
    });
    objs[0]["rules"].clone()
}

#[test]
fn the_charts_roles_are_exactly_those_of_poolkeeper_rbac() {
    let (_, docs) = render(DOCKER);
    let cluster = of_kind(&docs, "ClusterRole");
    assert_eq!(cluster.len(), 1);
    assert_eq!(cluster[0]["rules"], rbac_rules(&[], false));
    let (_, docs) = render(FULL);
    assert!(of_kind(&docs, "ClusterRole").is_empty());
    let roles = of_kind(&docs, "Role");
    let watched: Vec<&&Value> = roles
        .iter()
        .filter(|r| r["metadata"]["name"] == "poolkeeper")
        .collect();
    assert_eq!(
        watched
            .iter()
            .map(|r| r["metadata"]["namespace"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["team-a", "team-b"]
    );
    for r in watched {
        assert_eq!(r["rules"], rbac_rules(&["team-a", "team-b"], true));
    }
    let leader = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "poolkeeper-leader")
        .unwrap();
    let from_rbac = poolkeeper_source_kube::rbac::objects(&Default::default());
    let own = from_rbac
        .iter()
        .find(|o| o["metadata"]["name"] == "poolkeeper-leader" && o["kind"] == "Role")
        .unwrap();
    assert_eq!(leader["rules"], own["rules"]);
    // The pod runtime's Role, in its pods' namespace.
    let (_, docs) = render(KUBE);
    let pods = of_kind(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "poolkeeper-pods")
        .expect("the pod runtime's Role");
    assert_eq!(pods["metadata"]["namespace"], "instances");
    let from_rbac =
        poolkeeper_source_kube::rbac::objects(&poolkeeper_source_kube::rbac::RbacTarget {
            pods: Some("instances".into()),
            ..Default::default()
        });
    let want = from_rbac
        .iter()
        .find(|o| o["metadata"]["name"] == "poolkeeper-pods" && o["kind"] == "Role")
        .unwrap();
    assert_eq!(pods["rules"], want["rules"]);
    assert!(
        of_kind(&render(FULL).1, "Role")
            .iter()
            .all(|r| r["metadata"]["name"] != "poolkeeper-pods")
    );
}

#[test]
fn the_pod_passes_the_restricted_pod_security_standard() {
    for values in [KUBE, DOCKER, FULL] {
        let (_, docs) = render(values);
        let dep = of_kind(&docs, "Deployment")[0];
        let pod = &dep["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        for c in pod["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{values}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{values}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{values}");
            assert!(sc.get("privileged").is_none_or(|p| p == false));
        }
        assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none());
        for v in pod["volumes"].as_array().unwrap() {
            assert!(v.get("hostPath").is_none(), "{v}");
        }
    }
}

/// The controller container's arguments.
fn container_args(docs: &[Value]) -> Vec<&str> {
    of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

#[test]
fn the_options_become_the_controllers_arguments() {
    let (_, docs) = render(DOCKER);
    let args = container_args(&docs);
    for want in [
        "run",
        "--source=kube",
        "--runtime=docker",
        "--docker-host=tcp://10.0.0.5:2375",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    assert_eq!(of_kind(&docs, "Deployment")[0]["spec"]["replicas"], 2);
    let (_, docs) = render(KUBE);
    let args = container_args(&docs);
    for want in [
        "--runtime=kube",
        "--pod-namespace=instances",
        "--pod-grace-seconds=30",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    let (_, docs) = render(FULL);
    let c = &of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    let args = container_args(&docs);
    for want in [
        "--runtime=memory",
        "--no-leader-election",
        "--namespace=team-a",
        "--namespace=team-b",
        "--admin-token-file=/etc/poolkeeper/admin/token",
        "--webhook-secret-file=/etc/poolkeeper/webhooks/secret",
        "--notify-url=https://booking.example.com/callbacks",
        "--allow-registration",
        "--registration-quota=3",
        "--console-secure-cookie",
        "--listen=0.0.0.0:8080",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    assert_eq!(c["image"], "registry.example.com/poolkeeper:0.1.0-test");
    assert_eq!(of_kind(&docs, "ServiceMonitor").len(), 1);
    assert_eq!(of_kind(&docs, "Service")[0]["spec"]["type"], "LoadBalancer");
    // Every argument is one the binary takes: clap parses them (help text, no start).
    let out = Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(
            help.contains(flag),
            "{flag} is not an option of `poolkeeper run`"
        );
    }
}

/// `e2e/build-controller-image.sh` (here with this test's own binary): the image runs as
/// 65532 on a read-only root with every capability dropped, and is the binary it was given.
#[test]
fn the_controller_image_runs_as_non_root_on_a_read_only_root() {
    let tag = "poolkeeper:chart-test";
    let out = Command::new(repo().join("e2e/build-controller-image.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_poolkeeper"), tag])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Config.User}}", tag])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532");
    let run = Command::new("docker")
        .args(["run", "--rm", "--read-only", "--cap-drop", "ALL"])
        .args(["--security-opt", "no-new-privileges", tag, "crds"])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let committed = std::fs::read_to_string(repo().join("crds/poolkeeper.dev.yaml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), committed);
}

#[test]
fn the_admission_policy_is_exactly_poolkeeper_admissions_and_valid_from_kubernetes_1_36() {
    const FORCED: &str = "e2e/chart/values-admission.yaml";
    let (text, docs) = render(FORCED);
    let wanted = poolkeeper_source_kube::admission::objects(&[]);
    for want in &wanted {
        let kind = want["kind"].as_str().unwrap();
        let got = of_kind(&docs, kind);
        assert_eq!(got.len(), 1, "one {kind}");
        assert_eq!(got[0]["metadata"]["name"], want["metadata"]["name"]);
        assert_eq!(got[0]["spec"], want["spec"], "the chart's {kind}");
    }
    let bin = std::env::var("KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, text).unwrap();
    for version in ["1.36.0", "1.37.0"] {
        let out = Command::new(&bin)
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate --strict ({FORCED}, {version}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A controller of some namespaces: the binding is theirs only.
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "admissionPolicy: true\nnamespaces: [team-a, team-b]\n",
    )
    .unwrap();
    let (_, docs) = render(values.to_str().unwrap());
    let wanted = poolkeeper_source_kube::admission::objects(&["team-a".into(), "team-b".into()]);
    let got = of_kind(&docs, "MutatingAdmissionPolicyBinding");
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0]["spec"]["matchResources"], wanted[1]["spec"]["matchResources"],
        "the chart's binding"
    );
    // `auto` (the default) installs it only where the API server serves the API; rendered
    // without a cluster, Helm's default capabilities do not include it.
    let (_, docs) = render(KUBE);
    assert!(of_kind(&docs, "MutatingAdmissionPolicy").is_empty());
}

#[test]
fn an_unknown_admission_policy_value_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, "admissionPolicy: maybe\n").unwrap();
    let out = helm(&["render", "poolkeeper", values.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("admissionPolicy \"maybe\": auto, true or false"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
