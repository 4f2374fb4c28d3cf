//! End to end against the real Docker Engine on this machine: the `poolkeeper` binary runs on a
//! temporary directory with `--runtime docker`, and each test checks what a user would see
//! (HTTP answers on the claimed port, `docker ps`, the status the CLI reads).
//!
//! Every test runs its own controller with its own `--controller-id` and its own host-port
//! range, so tests run in parallel on one daemon without touching each other's containers.
//! Tests that stop a daemon start their own `dockerd` (own socket, data root and bridge).
//!
//! The test image is built here from the project's own static workload
//! (`e2e/build-workload-image.sh`); the Debian images of the quickstart come from
//! `e2e/build-images.sh`, and the test that needs them fails (not skips) without them.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

#[test]
fn a_claim_is_served_on_its_port_and_release_leaves_only_fresh_instances() {
    let _serial = serial();
    let c = Controller::new(
        "e2e-claim",
        &[
            ("pool.yaml", pool_yaml("web", 2, 21000, 21019, "")),
            ("user.yaml", USER.to_owned()),
        ],
        &[],
    );
    c.wait("warm 2", T, |s| pool_warm(s, "web") == 2);
    assert_eq!(running(None, "e2e-claim").len(), 2);
    // Limits and safety as declared.
    let name = &running(None, "e2e-claim")[0];
    let inspect = docker(
        None,
        &[
            "inspect",
            "--format",
            "{{.HostConfig.Privileged}} {{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.SecurityOpt}}",
            name,
        ],
    );
    assert_eq!(inspect, "false 250000000 67108864 [no-new-privileges]");

    let before = running(None, "e2e-claim");
    c.write("claim.yaml", &claim_yaml("mine", "web", "hello alice"));
    let s = c.wait("claim bound", T, |s| claim_phase(s, "mine") == "Bound");
    let port = claim_port(&s, "mine");
    let instance = claim_instance(&s, "mine");
    assert!(
        before.contains(&instance),
        "bound a warm instance, not a new one"
    );
    assert_eq!(http_get(port, "/").as_deref(), Some("hello alice"));
    // The file went straight into the instance's host-backed files folder (a local daemon),
    // which Docker filled from the image; the other instance's folder holds only the image's.
    let files = c.path().join(".poolkeeper/files");
    assert_eq!(
        std::fs::read_to_string(files.join(&instance).join("index.html")).unwrap(),
        "hello alice"
    );
    let other = before.iter().find(|n| **n != instance).unwrap();
    assert_eq!(
        std::fs::read_to_string(files.join(other).join("index.html")).unwrap(),
        "fresh instance\n"
    );

    // Release: the instance is destroyed and replaced; no instance serves alice's file.
    c.remove("claim.yaml");
    c.wait("released, removed and refilled", T, |s| {
        pool_warm(s, "web") == 2
            && object(s, "Claim", "mine").is_null()
            && instances_of(s, "web")
                .iter()
                .all(|i| i["name"] != instance.as_str())
    });
    let after = running(None, "e2e-claim");
    assert!(!after.contains(&instance), "the released instance is gone");
    assert_eq!(after.len(), 2);
    // Its files folder and volume go with it.
    let gone = Instant::now();
    while files.join(&instance).exists() && gone.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!files.join(&instance).exists(), "files folder left behind");
    let volumes = docker(
        None,
        &[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name={instance}-files"),
        ],
    );
    assert!(volumes.is_empty(), "files volume left behind: {volumes}");
    let s = c.status().unwrap();
    for i in instances_of(&s, "web")
        .into_iter()
        .filter(|i| i["phase"] == "Ready")
    {
        let port = i["ports"][0].as_u64().unwrap() as u16;
        assert_eq!(http_get(port, "/").as_deref(), Some("fresh instance\n"));
    }
}

#[test]
fn files_from_a_tar_go_through_the_api_when_the_daemon_does_not_share_the_filesystem() {
    let _serial = serial();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "nodes:\n  - name: local\n    url: unix:///var/run/docker.sock\n    sharedFiles: false\n",
    )
    .unwrap();
    let c = Controller::new(
        "e2e-upload",
        &[
            ("pool.yaml", pool_yaml("up", 1, 21150, 21159, "")),
            ("user.yaml", USER.to_owned()),
        ],
        &["--config", config.path().to_str().unwrap()],
    );
    c.wait("warm 1", T, |s| pool_warm(s, "up") == 1);
    // The files come from a tar next to the claim (`filesFrom`).
    let mut tar = tar::Builder::new(Vec::new());
    for (path, body) in [("index.html", "uploaded"), ("docs/a.txt", "from the tar")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, path, body.as_bytes()).unwrap();
    }
    std::fs::create_dir_all(c.path().join("data")).unwrap();
    std::fs::write(c.path().join("data/site.tar"), tar.into_inner().unwrap()).unwrap();
    c.write(
        "claim.yaml",
        "apiVersion: poolkeeper.dev/v1alpha1\nkind: Claim\nmetadata: {name: mine}\n\
         spec: {pool: up, user: alice, filesFrom: data/site.tar}\n",
    );
    let s = c.wait("claim bound", T, |s| claim_phase(s, "mine") == "Bound");
    let port = claim_port(&s, "mine");
    assert_eq!(http_get(port, "/").as_deref(), Some("uploaded"));
    assert_eq!(
        http_get(port, "/docs/a.txt").as_deref(),
        Some("from the tar")
    );
    assert!(
        !c.path()
            .join(".poolkeeper/files")
            .join(claim_instance(&s, "mine"))
            .exists(),
        "no host-backed folder for a daemon that does not share the filesystem"
    );
}

#[test]
fn killed_and_removed_containers_are_replaced_through_the_event_stream() {
    let _serial = serial();
    let c = Controller::new(
        "e2e-drift",
        &[("pool.yaml", pool_yaml("drift", 2, 21020, 21039, ""))],
        &["--resync", "1h"],
    );
    c.wait("warm 2", T, |s| pool_warm(s, "drift") == 2);
    let first = running(None, "e2e-drift");
    docker(None, &["kill", &first[0]]);
    docker(None, &["rm", "-f", &first[1]]);
    let start = Instant::now();
    c.wait("repaired", Duration::from_secs(10), |s| {
        pool_warm(s, "drift") == 2
            && instances_of(s, "drift")
                .iter()
                .all(|i| !first.iter().any(|f| i["name"] == f.as_str()))
    });
    // With the periodic resync an hour away, only the event stream can have told.
    assert!(start.elapsed() < Duration::from_secs(10));
    let now = running(None, "e2e-drift");
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|n| !first.contains(n)));
    // The killed container is removed, not left behind; neither are the files folders and
    // volumes of both (one removed by poolkeeper, one by hand).
    assert_eq!(all_containers(None, "e2e-drift").len(), 2);
    let files = c.path().join(".poolkeeper/files");
    let t = Instant::now();
    while first.iter().any(|f| files.join(f).exists()) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in &first {
        assert!(!files.join(f).exists(), "files folder of {f} left behind");
        let v = docker(
            None,
            &["volume", "ls", "-q", "--filter", &format!("name={f}-files")],
        );
        assert!(v.is_empty(), "files volume of {f} left behind");
    }
}

#[test]
fn a_controller_killed_with_sigkill_adopts_its_containers_and_keeps_bindings() {
    let _serial = serial();
    let mut c = Controller::new(
        "e2e-adopt",
        &[
            ("pool.yaml", pool_yaml("adopt", 3, 21040, 21059, "")),
            ("user.yaml", USER.to_owned()),
            ("claim.yaml", claim_yaml("kept", "adopt", "still mine")),
        ],
        &[],
    );
    let s = c.wait("bound and warm", T, |s| {
        claim_phase(s, "kept") == "Bound" && pool_warm(s, "adopt") == 3
    });
    let instance = claim_instance(&s, "kept");
    let port = claim_port(&s, "kept");
    let before = all_containers(None, "e2e-adopt");
    assert_eq!(before.len(), 4);
    c.kill9();
    c.start();
    let s = c.wait("adopted", T, |s| {
        claim_phase(s, "kept") == "Bound" && pool_warm(s, "adopt") == 3
    });
    assert_eq!(claim_instance(&s, "kept"), instance);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        all_containers(None, "e2e-adopt"),
        before,
        "no duplicate, nothing replaced\n{}",
        c.log()
    );
    assert_eq!(http_get(port, "/").as_deref(), Some("still mine"));
    // What no spec wants is removed: drop the pool while the controller is down.
    c.kill9();
    c.remove("claim.yaml");
    c.remove("pool.yaml");
    c.start();
    let start = Instant::now();
    while !all_containers(None, "e2e-adopt").is_empty() {
        assert!(
            start.elapsed() < T,
            "leftovers: {:?}",
            all_containers(None, "e2e-adopt")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_port_held_by_another_process_is_skipped_and_reported() {
    let _serial = serial();
    let held = TcpListener::bind("0.0.0.0:21060").unwrap();
    let c = Controller::new(
        "e2e-port",
        &[("pool.yaml", pool_yaml("ports", 2, 21060, 21069, ""))],
        &[],
    );
    let s = c.wait("warm 2", T, |s| pool_warm(s, "ports") == 2);
    let ports: Vec<u64> = instances_of(&s, "ports")
        .iter()
        .map(|i| i["ports"][0].as_u64().unwrap())
        .collect();
    assert!(!ports.contains(&21060), "{ports:?}");
    assert!(has_event(&s, "Pool", "ports", "HostPortInUse"), "reported");
    drop(held);
}

#[test]
fn a_missing_image_is_a_condition_and_not_a_crash_loop() {
    let _serial = serial();
    let c = Controller::new(
        "e2e-image",
        &[(
            "pool.yaml",
            pool_yaml("noimage", 2, 21070, 21079, "").replace(image(), "poolkeeper-test/absent:1"),
        )],
        &[],
    );
    let s = c.wait("ImageMissing", T, |s| {
        object(s, "Pool", "noimage")["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "ImageMissing"))
    });
    let msg = object(&s, "Pool", "noimage")["status"]["conditions"].to_string();
    assert!(msg.contains("poolkeeper-test/absent:1"), "{msg}");
    // Backoff, not a loop: a few attempts in 3 s, and nothing left behind.
    std::thread::sleep(Duration::from_secs(3));
    let attempts = c.log().matches("create failed").count();
    assert!(attempts <= 6, "{attempts} attempts in ~3 s");
    assert!(all_containers(None, "e2e-image").is_empty());
}

#[test]
fn readiness_gates_warm_and_claims_queue_until_ready() {
    let _serial = serial();
    let c = Controller::new(
        "e2e-ready",
        &[
            (
                "pool.yaml",
                pool_yaml("slow", 1, 21080, 21089, "").replace(
                    "    files:",
                    "    env: {READY_DELAY_MS: \"1500\"}\n    files:",
                ),
            ),
            ("user.yaml", USER.to_owned()),
        ],
        &[],
    );
    c.wait("starting", T, |s| {
        object(s, "Pool", "slow")["status"]["starting"].as_u64() == Some(1)
    });
    assert_eq!(pool_warm(&c.status().unwrap(), "slow"), 0);
    c.write("claim.yaml", &claim_yaml("early", "slow", "x"));
    c.wait("queued", T, |s| {
        object(s, "Claim", "early")["status"]["queuePosition"].as_u64() == Some(1)
    });
    let s = c.wait("bound once ready", T, |s| {
        claim_phase(s, "early") == "Bound"
    });
    assert_eq!(
        http_get(claim_port(&s, "early"), "/healthz").as_deref(),
        Some("ok\n")
    );
}

#[test]
fn exec_reset_cleans_in_place_and_a_failing_reset_quarantines() {
    let _serial = serial();
    let c = Controller::new(
        "e2e-reset",
        &[
            (
                "pool.yaml",
                pool_yaml(
                    "inplace",
                    1,
                    21090,
                    21099,
                    "  max: 1\n  reset: Exec\n  resetCommand: [/pk-workload, clean, /srv]\n  \
                     claimResources: {cpu: '1', memory: 128Mi}\n",
                ),
            ),
            ("user.yaml", USER.to_owned()),
            (
                "claim.yaml",
                claim_yaml("c1", "inplace", "secret") + "  resources: {cpu: 750m, memory: 96Mi}\n",
            ),
        ],
        &[],
    );
    let s = c.wait("bound", T, |s| claim_phase(s, "c1") == "Bound");
    let instance = claim_instance(&s, "c1");
    let port = claim_port(&s, "c1");
    assert_eq!(http_get(port, "/").as_deref(), Some("secret"));
    // The claim's limits, set with `docker update` before it was reported Bound.
    let limits = || {
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            ])
            .arg(&instance)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(limits(), format!("750000000 {}", 96u64 << 20));
    c.remove("claim.yaml");
    c.wait("reset in place", T, |s| {
        object(s, "Claim", "c1").is_null()
            && pool_warm(s, "inplace") == 1
            && instances_of(s, "inplace")
                .iter()
                .any(|i| i["name"] == instance.as_str() && i["phase"] == "Ready")
    });
    // Same container (no create), the secret gone, the template's limits back.
    assert_eq!(running(None, "e2e-reset"), vec![instance.clone()]);
    assert_eq!(http_get(port, "/"), None, "the secret is gone");
    assert_eq!(limits(), format!("250000000 {}", 64u64 << 20));

    // A reset that fails keeps the instance for inspection, out of the pool.
    c.write(
        "broken.yaml",
        &pool_yaml(
            "broken",
            1,
            21140,
            21149,
            "  reset: Exec\n  resetCommand: [/pk-workload, \"false\"]\n",
        ),
    );
    c.wait("broken pool warm", T, |s| pool_warm(s, "broken") == 1);
    c.write("claim.yaml", &claim_yaml("c2", "broken", "x"));
    let s = c.wait("bound", T, |s| claim_phase(s, "c2") == "Bound");
    let second = claim_instance(&s, "c2");
    c.remove("claim.yaml");
    let s = c.wait("quarantined", T, |s| {
        instances_of(s, "broken")
            .iter()
            .any(|i| i["name"] == second.as_str() && !i["quarantined"].is_null())
    });
    assert_eq!(object(&s, "Pool", "broken")["status"]["quarantined"], 1);
    assert!(
        running(None, "e2e-reset").contains(&second),
        "kept for inspection"
    );
}

#[test]
fn a_daemon_restart_is_noticed_and_repaired() {
    let _serial = serial();
    let mut d = Daemon::start("restart", 41);
    let host = d.host();
    let mut c = Controller::new(
        "e2e-daemon",
        &[
            ("pool.yaml", pool_yaml("phoenix", 2, 21100, 21119, "")),
            ("user.yaml", USER.to_owned()),
            ("claim.yaml", claim_yaml("survivor", "phoenix", "again")),
        ],
        &["--docker-host", &host, "--resync", "1h"],
    );
    c.hosts = vec![Some(host.clone())];
    c.wait("bound and warm", T, |s| {
        claim_phase(s, "survivor") == "Bound" && pool_warm(s, "phoenix") == 2
    });
    d.stop();
    c.wait("node unreachable", T, |s| {
        s["nodes"][0]["state"] == "Unreachable" || s["nodes"][0]["state"] == "Down"
    });
    d.run();
    let s = c.wait("repaired after the restart", Duration::from_secs(60), |s| {
        s["nodes"][0]["state"] == "Ready"
            && claim_phase(s, "survivor") == "Bound"
            && pool_warm(s, "phoenix") == 2
    });
    // The claim's instance died with the daemon: it is bound again, with its files.
    let port = claim_port(&s, "survivor");
    assert_eq!(http_get(port, "/").as_deref(), Some("again"));
    assert_eq!(running(Some(&host), "e2e-daemon").len(), 3);
    // The containers that exited with the daemon are removed once it is back: nothing but the
    // three live instances remains.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = all_containers(Some(&host), "e2e-daemon");
        if all.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "containers left after the daemon restart: {all:?}\nlog:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_nodes_spread_instances_and_a_lost_node_is_replaced_elsewhere() {
    let _serial = serial();
    let second = Daemon::start("second", 42);
    let mut second = Some(second);
    let host2 = second.as_ref().unwrap().host();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nodes.yaml");
    std::fs::write(
        &config,
        format!(
            "nodes:\n- {{name: one, url: unix:///var/run/docker.sock}}\n- {{name: two, url: {host2}}}\nnodeDownAfter: 2s\n"
        ),
    )
    .unwrap();
    let mut c = Controller::new(
        "e2e-nodes",
        &[("pool.yaml", pool_yaml("spread", 4, 21120, 21139, ""))],
        &["--config", config.to_str().unwrap()],
    );
    c.hosts = vec![None, Some(host2.clone())];
    let s = c.wait("warm 4", T, |s| pool_warm(s, "spread") == 4);
    let on = |s: &Value, node: &str| {
        instances_of(s, "spread")
            .iter()
            .filter(|i| i["node"] == node)
            .count()
    };
    assert_eq!(
        (on(&s, "one"), on(&s, "two")),
        (2, 2),
        "least-loaded placement"
    );
    assert_eq!(running(None, "e2e-nodes").len(), 2);
    assert_eq!(running(Some(&host2), "e2e-nodes").len(), 2);

    // Node two goes away for good: reported, and its instances replaced on node one.
    second.as_mut().unwrap().stop();
    let s = c.wait("replaced on node one, node two down", T, |s| {
        pool_warm(s, "spread") == 4
            && on(s, "one") == 4
            && s["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["name"] == "two" && n["state"] == "Down"))
    });
    let two = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "two")
        .unwrap();
    assert_eq!(two["state"], "Down");
    let out = Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
        .args(["get", "nodes", "--dir"])
        .arg(c.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("two") && table.contains("Down"), "{table}");
    assert_eq!(running(None, "e2e-nodes").len(), 4);

    // When it returns, what was left on it is removed; the pool stays at 4 on node one.
    second.as_mut().unwrap().run();
    c.wait("node two back", T, |s| {
        s["nodes"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n["name"] == "two" && n["state"] == "Ready")
        })
    });
    let start = Instant::now();
    while !all_containers(Some(&host2), "e2e-nodes").is_empty() {
        assert!(
            start.elapsed() < T,
            "stale containers stay on the returned node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pool_warm(&c.status().unwrap(), "spread"), 4);
    drop(c);
    drop(second);
}

/// On two nodes, a deployment's containers all go to one node, where its network joins them
/// (least-loaded placement spread them over both), and web, placed once db is ready, reaches
/// db by name (its readiness probe).
#[test]
fn on_two_nodes_a_deployments_containers_share_one_node_and_its_network() {
    let _serial = serial();
    let img = image();
    let second = Daemon::start("deploy", 43);
    let host2 = second.host();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nodes.yaml");
    std::fs::write(
        &config,
        format!("nodes:\n- {{name: one, url: unix:///var/run/docker.sock}}\n- {{name: two, url: {host2}}}\n"),
    )
    .unwrap();
    let dep = format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {{name: shop}}
spec:
  network: pk-e2e-nodes-shop
  containers:
  - name: db
    image: {img}
    readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
  - name: cache
    image: {img}
  - name: web
    image: {img}
    dependsOn: [db]
    readiness: {{exec: {{command: [/pk-workload, get, \"db:8080\", /healthz]}}, periodSeconds: 1}}
"
    );
    let mut c = Controller::new(
        "e2e-nodes-dep",
        &[("shop.yaml", dep)],
        &["--config", config.to_str().unwrap()],
    );
    c.hosts = vec![None, Some(host2.clone())];
    c.wait("every container ready", T, |s| {
        object(s, "Deployment", "shop")["status"]["ready"].as_u64() == Some(3)
    });
    let (one, two) = (running(None, &c.id), running(Some(&host2), &c.id));
    assert!(
        (one.len(), two.len()) == (3, 0) || (one.len(), two.len()) == (0, 3),
        "split across nodes: {one:?} on one, {two:?} on two"
    );
    drop(c);
    drop(second);
}

/// A deployment with a named volume never leaves the node its volume is on: while that node is
/// down its container waits, saying why (a replacement on the other node would start on an
/// empty volume), across a restart of the controller too (which starts although node two's
/// socket is gone); when the node returns, the container is made there again on the same
/// volume, with the data written before the outage.
#[test]
fn a_deployment_with_a_named_volume_waits_for_its_node_and_keeps_its_data() {
    let _serial = serial();
    let img = image();
    let mut second = Daemon::start("vol", 44);
    let host2 = second.host();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nodes.yaml");
    // Node two first: the deployment is placed on the first node of the least load.
    std::fs::write(
        &config,
        format!(
            "nodes:\n- {{name: two, url: {host2}}}\n- {{name: one, url: unix:///var/run/docker.sock}}\nnodeDownAfter: 2s\n"
        ),
    )
    .unwrap();
    let dep = format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {{name: vault}}
spec:
  containers:
  - name: db
    image: {img}
    volumes: {{data: {{bind: /data}}}}
  - name: web
    image: {img}
"
    );
    let mut c = Controller::new(
        "e2e-nodes-vol",
        &[("vault.yaml", dep)],
        &["--config", config.to_str().unwrap()],
    );
    c.hosts = vec![Some(host2.clone()), None];
    c.wait("db and web running", T, |s| {
        object(s, "Deployment", "vault")["status"]["ready"].as_u64() == Some(2)
    });
    let on_two = running(Some(&host2), &c.id);
    assert_eq!(on_two.len(), 2, "placed on node two: {on_two:?}");
    assert!(running(None, &c.id).is_empty());
    let db = |names: &[String]| names.iter().find(|n| n.contains("-db")).unwrap().clone();
    let data = tempfile::tempdir().unwrap();
    let marker = data.path().join("marker");
    std::fs::write(&marker, "written before the outage").unwrap();
    let to = format!("{}:/data/marker", db(&on_two));
    let ok = Command::new("docker")
        .args(["-H", &host2, "cp", marker.to_str().unwrap(), &to])
        .status()
        .unwrap();
    assert!(ok.success(), "docker cp into the volume");

    // A controller that kept no placement (one from before they were kept) learns it from the
    // containers it finds: node two, pinned by db's volume.
    let placements = c.path().join(".poolkeeper/docker-placements.json");
    c.kill9();
    std::fs::remove_file(&placements).unwrap();
    c.start();
    let start = Instant::now();
    let pinned = serde_json::json!({"node": "two", "namedVolumes": true});
    loop {
        let kept: Option<Value> = std::fs::read(&placements)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if kept.as_ref().is_some_and(|k| k["vault"] == pinned) {
            break;
        }
        assert!(
            start.elapsed() < T,
            "placement not learnt from the list: {kept:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Node two goes down: the container waits for it, and says so.
    second.stop();
    let waits = |s: &Value| {
        object(s, "Deployment", "vault")["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "CreateFailed"
                        && c["message"].as_str().is_some_and(|m| {
                            m.contains("keeps its named volumes")
                                && m.contains("on node two")
                                && m.contains("down")
                        })
                })
            })
    };
    c.wait("the container waits for node two", T, waits);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        all_containers(None, &c.id).is_empty(),
        "moved to node one (web, which mounts no volume, took db along onto an empty volume)"
    );

    // A controller restarted during the outage starts (node two's socket is gone: it is
    // Unreachable, then Down) and cannot list node two: the placement it kept under its state
    // directory keeps the deployment waiting.
    let kept = std::fs::read_to_string(&placements).unwrap();
    let kept: serde_json::Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(kept["vault"], pinned);
    c.kill9();
    c.start();
    c.wait("still waiting after a restart", T, waits);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        all_containers(None, &c.id).is_empty(),
        "moved to node one after a restart"
    );

    // Node two returns: the container is made there again, on the volume it had.
    second.run();
    c.wait("db and web running again", T, |s| {
        object(s, "Deployment", "vault")["status"]["ready"].as_u64() == Some(2)
    });
    let on_two = running(Some(&host2), &c.id);
    assert_eq!(on_two.len(), 2, "back on node two: {on_two:?}");
    assert!(all_containers(None, &c.id).is_empty());
    let back = data.path().join("back");
    let from = format!("{}:/data/marker", db(&on_two));
    let ok = Command::new("docker")
        .args(["-H", &host2, "cp", &from, back.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success(), "docker cp out of the volume");
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "written before the outage"
    );

    // Deleted (its volumes with it), the deployment is placed nowhere any more: declared again,
    // it would not wait for node two.
    c.remove("vault.yaml");
    let start = Instant::now();
    while std::fs::read_to_string(&placements).is_ok_and(|k| k.contains("vault")) {
        assert!(
            start.elapsed() < T,
            "the deleted deployment's placement stays"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(c);
    drop(second);
}

/// The README's promise: the quickstart on the Debian-built images brings up every pool type,
/// serves a claim on its port, and an SSH "VM" accepts the claiming user's key.
#[test]
fn the_quickstart_serves_every_pool_type_and_ssh_accepts_the_users_key() {
    let _serial = serial();
    for t in ["nginx", "apache", "python", "node", "ssh"] {
        let tag = format!("poolkeeper/{t}:bookworm");
        assert!(
            !docker(None, &["images", "-q", &tag]).is_empty(),
            "image {tag} is missing: run e2e/build-images.sh (the test script does)"
        );
    }
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("id");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (openssh-client)");
    assert!(ok.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut files = Vec::new();
    for f in ["pools.yaml", "users.yaml", "claims.yaml"] {
        files.push((
            f,
            std::fs::read_to_string(repo().join("examples/quickstart").join(f)).unwrap(),
        ));
    }
    files.push((
        "carol.yaml",
        format!(
            "apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: carol}}
spec: {{sshKeys: [\"{}\"]}}
---
apiVersion: poolkeeper.dev/v1alpha1
kind: Claim
metadata: {{name: carol-vm}}
spec: {{pool: ssh, user: carol}}
",
            public.trim()
        ),
    ));
    let c = Controller::new("e2e-quickstart", &files, &[]);
    let want = [
        ("nginx", 5),
        ("apache", 3),
        ("python", 3),
        ("node", 2),
        ("ssh", 2),
    ];
    let s = c.wait("every pool warm", Duration::from_secs(120), |s| {
        want.iter().all(|(p, n)| pool_warm(s, p) == *n)
            && claim_phase(s, "alice-web") == "Bound"
            && claim_phase(s, "carol-vm") == "Bound"
    });
    let page = http_get(claim_port(&s, "alice-web"), "/").unwrap_or_default();
    assert!(page.contains("Hello from alice's instance"), "{page}");
    for (pool, _) in &want[..4] {
        let i = instances_of(&s, pool)
            .into_iter()
            .find(|i| i["phase"] == "Ready" && i["claim"].is_null())
            .unwrap();
        let port = i["ports"][0].as_u64().unwrap() as u16;
        assert_eq!(
            http_get(port, "/").as_deref(),
            Some("fresh instance\n"),
            "{pool} on {port}"
        );
    }
    let endpoint = &object(&s, "Claim", "carol-vm")["status"]["endpoint"];
    let port = endpoint["ports"]["ssh"].as_u64().unwrap() as u16;
    assert_eq!(
        endpoint["ssh"].as_str(),
        Some(format!("ssh -p {port} root@127.0.0.1").as_str())
    );
    // CI saw the connection closed before the banner once (the readiness probe had seen sshd
    // answer; cause not found): each failure is shown with what the daemon says of the
    // container, and SSH must answer within 10 s.
    let instance = claim_instance(&s, "carol-vm");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = Vec::new();
    while let Err(e) = ssh_banner(port) {
        eprintln!(
            "carol-vm ({instance}, port {port}): no SSH banner: {e}; docker says: {} / {}",
            docker(None, &["ps", "-a", "--filter", &format!("name={instance}")]),
            docker(None, &["logs", "--tail", "20", &instance]),
        );
        failures.push(e);
        assert!(Instant::now() < deadline, "no SSH banner: {failures:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = Command::new("ssh")
        .arg("-i")
        .arg(&key)
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
        .args(["root@127.0.0.1", "id -un"])
        .output()
        .expect("ssh (openssh-client)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "root",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads the first bytes an SSH server sends.
fn ssh_banner(port: u16) -> Result<(), String> {
    let mut banner = [0u8; 15];
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.read_exact(&mut banner).map_err(|e| e.to_string())?;
    if &banner == b"SSH-2.0-OpenSSH" {
        Ok(())
    } else {
        Err(format!("banner {:?}", String::from_utf8_lossy(&banner)))
    }
}

/// Between its creation and its start a container is listed `created`. A resync list taken
/// then must not report it exited: the engine would remove it as dead (which stalled refills
/// at every resync).
#[test]
fn a_list_during_creations_never_reports_a_container_not_started_yet_as_exited() {
    let _serial = serial();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(list_during_creations());
}

async fn list_during_creations() {
    use poolkeeper_runtime::{
        InstanceSpec, InstanceState, LABEL_MANAGED, LABEL_POOL, PortBinding, Runtime,
    };
    use poolkeeper_runtime_docker::{DockerConfig, DockerRuntime};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let id = "e2e-listrace";
    let state = tempfile::tempdir().unwrap();
    let config = DockerConfig {
        controller_id: id.to_owned(),
        files_root: Some(state.path().join("files")),
        ..DockerConfig::default()
    };
    let rt = Arc::new(DockerRuntime::connect(config).await.unwrap());
    let labels = Arc::new(std::collections::BTreeMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_POOL.to_owned(), "listrace".to_owned()),
    ]));
    let specs: Vec<InstanceSpec> = (0..12u16)
        .map(|i| InstanceSpec {
            ports: vec![PortBinding {
                name: "http".to_owned(),
                container_port: 8080,
                host_port: 21160 + i,
                protocol: Default::default(),
            }],
            files_dir: Some("/srv".to_owned()),
            ..InstanceSpec::plain(&format!("listrace-{i}"), image(), labels.clone())
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let lister = {
        let (rt, done) = (rt.clone(), done.clone());
        tokio::spawn(async move {
            let (mut lists, mut exited) = (0, Vec::new());
            while !done.load(Ordering::SeqCst) {
                for i in rt.list().await.unwrap() {
                    if matches!(i.state, InstanceState::Exited { .. }) {
                        exited.push(i.name);
                    }
                }
                lists += 1;
            }
            (lists, exited)
        })
    };
    let results = futures::future::join_all(specs.into_iter().map(|s| {
        let rt = rt.clone();
        async move { rt.create(s).await }
    }))
    .await;
    done.store(true, Ordering::SeqCst);
    let (lists, exited) = lister.await.unwrap();
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    for i in 0..12 {
        rt.remove(&format!("listrace-{i}")).await.unwrap();
    }
    assert!(lists > 3, "only {lists} lists ran during the creations");
    assert!(
        exited.is_empty(),
        "reported exited while being created: {exited:?}"
    );
    assert!(all_containers(None, id).is_empty());
}

/// The one container of deployment `dep` named `container` (running or not).
fn deployment_container(id: &str, dep: &str, container: &str) -> String {
    let f_ctl = format!("label=poolkeeper.dev/controller={id}");
    let f_dep = format!("label=poolkeeper.dev/deployment={dep}");
    let f_c = format!("label=poolkeeper.dev/container={container}");
    docker(
        None,
        &[
            "ps",
            "-a",
            "--filter",
            &f_ctl,
            "--filter",
            &f_dep,
            "--filter",
            &f_c,
            "--format",
            "{{.Names}}",
        ],
    )
}

fn container_state(s: &Value, dep: &str, container: &str) -> (String, u64) {
    let st = object(s, "Deployment", dep)["status"]["containerStatuses"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == container).cloned())
        .unwrap_or(Value::Null);
    (
        st["state"].as_str().unwrap_or("").to_owned(),
        st["restarts"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_deployment_starts_in_dependency_order_on_its_own_network_and_is_kept_running() {
    let _serial = serial();
    let img = image();
    let net = "pk-e2e-dep-net";
    let dep = format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {{name: shop}}
spec:
  network: {net}
  containers:
  - name: db
    image: {img}
    environment: {{READY_DELAY_MS: \"2000\"}}
    readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
    restartPolicy: Always
  - name: web
    image: {img}
    ports: {{\"8080/tcp\": 19480}}
    dependsOn: [db]
    readiness: {{exec: {{command: [/pk-workload, get, \"db:8080\", /healthz]}}, periodSeconds: 1}}
"
    );
    let c = Controller::new("e2e-dep", &[("shop.yaml", dep)], &[]);
    let s = c.wait("both containers running", Duration::from_secs(60), |s| {
        container_state(s, "shop", "db").0 == "Running"
            && container_state(s, "shop", "web").0 == "Running"
    });
    assert_eq!(
        object(&s, "Deployment", "shop")["status"]["ready"].as_u64(),
        Some(2)
    );
    let db = deployment_container(&c.id, "shop", "db");
    let web = deployment_container(&c.id, "shop", "web");
    // web was created only once db answered its probe (2 s after db started).
    let started = |name: &str, field: &str| {
        let t = docker(None, &["inspect", "--format", field, name]);
        docker_time_secs(&t)
    };
    let db_started = started(&db, "{{.State.StartedAt}}");
    let web_created = started(&web, "{{.Created}}");
    assert!(
        web_created >= db_started + 1.9,
        "web was created {:.2} s after db started; db is ready only after 2 s",
        web_created - db_started
    );
    // Reachable from the host on its declared port, and db by its name on the network.
    assert!(http_get(19480, "/healthz").is_some());
    let out = Command::new("docker")
        .args(["exec", &web, "/pk-workload", "get", "db:8080", "/healthz"])
        .status()
        .unwrap();
    assert!(
        out.success(),
        "web reaches db by name on the deployment's network"
    );

    // A killed container is restarted (restartPolicy Always) and the restart counted.
    docker(None, &["kill", &db]);
    c.wait("db restarted", Duration::from_secs(60), |s| {
        let (state, restarts) = container_state(s, "shop", "db");
        state == "Running" && restarts >= 1
    });

    // Deleting the deployment removes its containers and its network, and nothing else.
    c.remove("shop.yaml");
    c.wait("the deployment is gone", Duration::from_secs(60), |s| {
        object(s, "Deployment", "shop").is_null()
    });
    let start = Instant::now();
    while !all_containers(None, &c.id).is_empty()
        || !docker(
            None,
            &["network", "ls", "-q", "--filter", &format!("name=^{net}$")],
        )
        .is_empty()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "containers {:?} or network {net} left behind",
            all_containers(None, &c.id)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A container of the deployment's instance name that poolkeeper did not make (here one made by
/// hand) is never replaced: the deployment says why and backs off, and once the name is free its
/// own container is made.
#[test]
fn a_container_of_the_same_name_made_by_hand_is_left_alone_and_reported() {
    let _serial = serial();
    let img = image();
    let theirs = "pk-e2e-handmade-web";
    docker(None, &["rm", "-f", theirs]);
    docker(None, &["run", "-d", "--name", theirs, img]);
    let id_of = || docker(None, &["inspect", "--format", "{{.Id}}", theirs]);
    let before = id_of();
    let dep = format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {{name: pk-e2e-handmade}}
spec:
  containers:
  - name: web
    image: {img}
"
    );
    let c = Controller::new("e2e-handmade", &[("d.yaml", dep)], &[]);
    let s = c.wait("the conflict is reported", Duration::from_secs(30), |s| {
        let conditions = &object(s, "Deployment", "pk-e2e-handmade")["status"]["conditions"];
        conditions.as_array().is_some_and(|a| {
            a.iter().any(|c| {
                c["type"] == "CreateFailed"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("left alone"))
            })
        })
    });
    assert!(
        !object(&s, "Deployment", "pk-e2e-handmade").is_null(),
        "{s}"
    );
    // Some seconds of backoff later, the container made by hand is still the same one, running.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(id_of(), before, "the container made by hand was replaced");
    assert_eq!(
        docker(None, &["inspect", "--format", "{{.State.Running}}", theirs]),
        "true"
    );
    // The name freed, the deployment's own container is made.
    docker(None, &["rm", "-f", theirs]);
    c.wait("its own container runs", Duration::from_secs(90), |s| {
        container_state(s, "pk-e2e-handmade", "web").0 == "Running"
    });
    assert_eq!(
        docker(
            None,
            &[
                "inspect",
                "--format",
                "{{index .Config.Labels \"poolkeeper.dev/controller\"}}",
                theirs
            ]
        ),
        c.id
    );
}

/// A liveness probe on a port the container does not publish reaches it at its address on its
/// network, also after a restart: a healthy container is never killed for it.
#[test]
fn a_liveness_probe_on_an_unpublished_port_keeps_a_healthy_container_alive() {
    let _serial = serial();
    let img = image();
    let dep = format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Deployment
metadata: {{name: alive}}
spec:
  containers:
  - name: app
    image: {img}
    restartPolicy: Always
    liveness: {{tcpSocket: {{port: 8080}}, periodSeconds: 1, failureThreshold: 2}}
"
    );
    let c = Controller::new("e2e-alive", &[("d.yaml", dep)], &[]);
    c.wait("app running", Duration::from_secs(60), |s| {
        container_state(s, "alive", "app").0 == "Running"
    });
    let app = deployment_container(&c.id, "alive", "app");
    let started = || docker(None, &["inspect", "--format", "{{.State.StartedAt}}", &app]);
    // Three times its failure threshold: a probe that cannot reach it would have killed it.
    let first = started();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(started(), first, "killed by its liveness probe");
    let s = c.status().unwrap_or_default();
    assert_eq!(
        container_state(&s, "alive", "app"),
        ("Running".to_owned(), 0)
    );
    // Restarted by hand, it is probed at its address again, and left alone.
    docker(None, &["restart", "-t", "1", &app]);
    std::thread::sleep(Duration::from_secs(1));
    let second = started();
    assert_ne!(second, first);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        started(),
        second,
        "killed by its liveness probe after a restart"
    );
}

/// Seconds since the epoch of a Docker timestamp (`2026-11-23T02:09:25.620429123Z`), enough to
/// compare two of them.
fn docker_time_secs(t: &str) -> f64 {
    let out = Command::new("date")
        .args(["-u", "-d", t, "+%s.%N"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_buffer_policy_keeps_a_share_above_the_bound_and_scales_down_after_its_cooldown() {
    let _serial = serial();
    let policy =
        "  autoscale: {buffer: \"100%\", min: 1, scaleDownCooldown: 5s, scaleDownStep: 1}\n";
    let c = Controller::new(
        "e2e-autoscale",
        &[
            ("pool.yaml", pool_yaml("elastic", 0, 21300, 21319, policy)),
            ("user.yaml", USER.to_owned()),
        ],
        &[],
    );
    let desired = |s: &Value| object(s, "Pool", "elastic")["status"]["desiredWarm"].as_u64();
    let s = c.wait("min 1 warm", T, |s| pool_warm(s, "elastic") == 1);
    assert_eq!(desired(&s), Some(1));
    assert_eq!(
        object(&s, "Pool", "elastic")["status"]["scaling"]["policy"],
        "min"
    );
    // Two bound: a buffer of 100% keeps two more ready.
    c.write("a.yaml", &claim_yaml("a", "elastic", "a"));
    c.write("b.yaml", &claim_yaml("b", "elastic", "b"));
    let s = c.wait("two bound, two warm", T, |s| {
        claim_phase(s, "a") == "Bound"
            && claim_phase(s, "b") == "Bound"
            && pool_warm(s, "elastic") == 2
    });
    assert_eq!(desired(&s), Some(2));
    assert_eq!(
        object(&s, "Pool", "elastic")["status"]["scaling"]["policy"],
        "buffer"
    );
    assert_eq!(running(None, "e2e-autoscale").len(), 4);
    // Released: back to one warm (a step a cooldown, as the simulation tests check).
    c.remove("a.yaml");
    c.remove("b.yaml");
    c.wait("back to one warm", Duration::from_secs(60), |s| {
        pool_warm(s, "elastic") == 1 && object(s, "Pool", "elastic")["status"]["instances"] == 1
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(None, "e2e-autoscale").len() != 1 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            running(None, "e2e-autoscale")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
