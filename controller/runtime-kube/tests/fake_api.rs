//! The runtime against the fake API server (`poolkeeper-kube-fake`), where a script of
//! requests is not enough: exec over WebSocket (files, commands, exit codes), logs, and the
//! watch's recovery from a lost connection and from `410 Gone`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use poolkeeper_kube_fake::FakeApi;
use poolkeeper_runtime::{InstanceSpec, LABEL_MANAGED, LABEL_POOL, Runtime, RuntimeEvent};
use poolkeeper_runtime_kube::{KubeRuntime, KubeRuntimeConfig};

const NS: &str = "team";

fn runtime(fake: &FakeApi) -> KubeRuntime {
    KubeRuntime::new(
        fake.client(),
        KubeRuntimeConfig {
            namespace: NS.into(),
            controller_id: "ctl".into(),
            grace_seconds: 0,
        },
    )
}

fn spec(name: &str) -> InstanceSpec {
    let labels = BTreeMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_POOL.to_owned(), "web".to_owned()),
    ]);
    let mut s = InstanceSpec::plain(name, "nginx", labels.into());
    s.exposure = Some(poolkeeper_kinds::Exposure::HostPort);
    s
}

/// A pod made by the runtime, running.
async fn running(fake: &FakeApi, rt: &KubeRuntime, name: &str) {
    rt.create(spec(name)).await.unwrap();
    assert!(fake.set_pod_status(NS, name, &poolkeeper_kube_fake::running()));
}

#[tokio::test]
async fn files_are_copied_into_the_pod_through_exec_with_tar_on_stdin() {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    running(&fake, &rt, "web-1").await;
    let files = vec![
        ("notes.txt".to_owned(), b"hello".to_vec()),
        ("keys/id.pub".to_owned(), vec![b'k'; 100_000]),
    ];
    rt.put_files("web-1", "/data", &files).await.unwrap();
    assert_eq!(fake.file(NS, "web-1", "/data/notes.txt").unwrap(), b"hello");
    assert_eq!(
        fake.file(NS, "web-1", "/data/keys/id.pub").unwrap().len(),
        100_000,
        "a large file arrives whole (stdin in many frames, then its close)"
    );
    let execs: Vec<Vec<String>> = fake.execs().into_iter().map(|(_, argv)| argv).collect();
    assert_eq!(execs[0], ["mkdir", "-p", "/data"]);
    assert_eq!(execs[1], ["tar", "-x", "-m", "-f", "-", "-C", "/"]);
}

#[tokio::test]
async fn exec_passes_output_and_exit_codes_through() {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    running(&fake, &rt, "web-1").await;
    let argv = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let ok = rt.exec("web-1", &argv("echo fresh")).await.unwrap();
    assert_eq!((ok.exit_code, ok.output.as_str()), (0, "fresh\n"));
    let code = rt
        .exec("web-1", &["sh".into(), "-c".into(), "exit 3".into()])
        .await
        .unwrap();
    assert_eq!(code.exit_code, 3);
    let missing = rt.exec("web-1", &argv("/reset.sh")).await.unwrap();
    assert_eq!(missing.exit_code, 127);
    assert!(missing.output.contains("command not found"), "{missing:?}");
    fake.script("/reset.sh", 0, "reset done\n");
    let reset = rt.exec("web-1", &argv("/reset.sh")).await.unwrap();
    assert_eq!(
        (reset.exit_code, reset.output.as_str()),
        (0, "reset done\n")
    );
}

#[tokio::test]
async fn exec_in_a_pod_that_is_not_running_or_gone_is_an_error_naming_it() {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    rt.create(spec("web-1")).await.unwrap();
    let e = rt.exec("web-1", &["true".into()]).await.unwrap_err();
    assert!(
        matches!(e, poolkeeper_runtime::RuntimeError::NotRunning(ref n) if n == "web-1"),
        "a pending pod: {e}"
    );
    assert!(e.to_string().contains("web-1"), "{e}");
    assert!(e.to_string().contains("not running"), "{e}");
    // Failed while files were on their way: down, not a fault of the instance's own (the
    // engine replaces it rather than quarantine it).
    running(&fake, &rt, "web-1").await;
    assert!(fake.set_pod_status(NS, "web-1", &poolkeeper_kube_fake::deadline_exceeded()));
    let e = rt
        .put_files("web-1", "/data", &[("a".into(), b"a".to_vec())])
        .await
        .unwrap_err();
    assert!(
        matches!(e, poolkeeper_runtime::RuntimeError::NotRunning(ref n) if n == "web-1"),
        "a failed pod: {e}"
    );
    let e = rt
        .put_files("web-2", "/data", &[("a".into(), b"a".to_vec())])
        .await
        .unwrap_err();
    assert!(
        matches!(e, poolkeeper_runtime::RuntimeError::NotFound(ref n) if n == "web-2"),
        "{e}"
    );
}

#[tokio::test]
async fn logs_are_read_with_a_tail_and_followed() {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    running(&fake, &rt, "web-1").await;
    fake.append_log(NS, "web-1", "one\ntwo\nthree\n");
    assert_eq!(rt.logs("web-1", 2).await.unwrap(), "two\nthree\n");
    let mut follow = rt.follow_logs("web-1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.append_log(NS, "web-1", "four\n");
    let line = tokio::time::timeout(Duration::from_secs(5), follow.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "four");
}

/// Waits for an event about `name` matching `want`.
async fn seen(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    want: impl Fn(&RuntimeEvent) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.recv().await {
            if want(&e) {
                return;
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("the event never came");
}

#[tokio::test]
async fn the_watch_recovers_from_a_lost_connection_and_from_gone_history() {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    let mut events = rt.subscribe();
    running(&fake, &rt, "web-1").await;
    seen(
        &mut events,
        |e| matches!(e, RuntimeEvent::Changed(i) if i.name == "web-1" && i.ready),
    )
    .await;

    // The connection drops: the watch comes back from where it was and misses nothing.
    fake.cut_watches();
    assert!(fake.remove("pods", NS, "web-1"));
    seen(
        &mut events,
        |e| matches!(e, RuntimeEvent::Removed(n) if n == "web-1"),
    )
    .await;

    // History gone while disconnected: 410, a relist, and the engine told to list again.
    running(&fake, &rt, "web-2").await;
    fake.compact();
    fake.cut_watches();
    seen(&mut events, |e| matches!(e, RuntimeEvent::Relist)).await;
    let names: Vec<String> = rt
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["web-2"]);
}

fn served(name: &str) -> InstanceSpec {
    let mut s = spec(name);
    s.exposure = Some(poolkeeper_kinds::Exposure::ClusterIP);
    s.container_ports = vec![poolkeeper_kinds::ContainerPort {
        name: "http".into(),
        container_port: 80,
        protocol: poolkeeper_kinds::Protocol::Tcp,
    }];
    s
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_service_goes_with_its_pod_deleted_behind_our_back_watched_or_not() {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    let events = rt.subscribe();
    rt.create(served("web-1")).await.unwrap();
    assert!(fake.get("services", NS, "web-1").is_some());
    // Seen by the watch.
    fake.remove("pods", NS, "web-1");
    until("the Service of a deleted pod goes", || {
        fake.get("services", NS, "web-1").is_none()
    })
    .await;

    // Unseen (no controller watched): the next list finds the orphan.
    drop(events);
    drop(rt);
    let quiet = runtime(&fake);
    quiet.create(served("web-2")).await.unwrap();
    fake.remove("pods", NS, "web-2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        fake.get("services", NS, "web-2").is_some(),
        "nobody watched"
    );
    quiet.list().await.unwrap();
    until("the orphaned Service goes at the next list", || {
        fake.get("services", NS, "web-2").is_none()
    })
    .await;
}

/// A runtime watching, with one served pod, `web-1`, made and reported.
async fn one_served_pod_watched() -> (
    FakeApi,
    KubeRuntime,
    tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
) {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    let mut events = rt.subscribe();
    rt.create(served("web-1")).await.unwrap();
    seen(
        &mut events,
        |e| matches!(e, RuntimeEvent::Changed(i) if i.name == "web-1"),
    )
    .await;
    (fake, rt, events)
}

/// Found by the pod runtime's random simulation: an instance reset twice in a row (released,
/// bound, released again) restarted again before the watch reported the first restart's
/// deletion. Only the last deleted pod was remembered as a restart's, so the first one's
/// deletion was reported as the instance's end: its claim lost a live instance.
#[tokio::test]
async fn two_restarts_in_a_row_are_never_reported_as_the_instances_end() {
    let (fake, rt, mut events) = one_served_pod_watched().await;
    // The watch lags: it reports the first restart's deletion after the second has begun.
    fake.hold_watches(true);
    for _ in 0..2 {
        rt.restart("web-1").await.unwrap();
    }
    fake.hold_watches(false);
    let pod = fake.get("pods", NS, "web-1").unwrap();
    reported_alive(&mut events, &pod).await;
}

/// A restart's deletion that falls in a gap of the watch (its history compacted away while it
/// lagged: `410 Gone`, a relist) is never reported. Its uid was kept for good, one per such
/// restart for the controller's life; the relist, which does not list the deleted pod, now
/// forgets it.
#[tokio::test]
async fn a_restarts_deletion_the_watch_missed_is_forgotten_at_the_relist() {
    let (fake, rt, mut events) = one_served_pod_watched().await;
    fake.hold_watches(true);
    rt.restart("web-1").await.unwrap();
    assert_eq!(rt.restarts_unseen(), 1, "the deletion is not reported yet");
    fake.compact();
    fake.cut_watches();
    fake.hold_watches(false);
    seen(&mut events, |e| matches!(e, RuntimeEvent::Relist)).await;
    assert_eq!(rt.restarts_unseen(), 0, "the relist shows the old pod gone");
    // The instance lives on, as the new pod.
    let pod = fake.get("pods", NS, "web-1").unwrap();
    rt.restart("web-1").await.unwrap();
    assert_ne!(
        fake.get("pods", NS, "web-1").unwrap()["metadata"]["uid"],
        pod["metadata"]["uid"]
    );
    let pod = fake.get("pods", NS, "web-1").unwrap();
    reported_alive(&mut events, &pod).await;
    until("the second restart's deletion is seen", || {
        rt.restarts_unseen() == 0
    })
    .await;
}

/// Waits until `pod` (its name, at its version or later) is reported, failing if its name is
/// reported removed first: a restart's deletion is not the instance's end.
async fn reported_alive(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    pod: &serde_json::Value,
) {
    let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
    let version = pod["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.recv().await {
            match e {
                RuntimeEvent::Removed(n) => panic!("{n} reported removed by its restart"),
                RuntimeEvent::Changed(i) if i.name == name && i.revision >= version => return,
                _ => {}
            }
        }
    })
    .await
    .expect("the new pod is reported");
}

#[tokio::test]
async fn a_restarted_pod_gets_its_service_again_owned_by_the_new_pod() {
    let (fake, rt, mut events) = one_served_pod_watched().await;
    let old_uid = fake.get("pods", NS, "web-1").unwrap()["metadata"]["uid"].clone();
    rt.restart("web-1").await.unwrap();
    let pod = fake.get("pods", NS, "web-1").unwrap();
    assert_ne!(pod["metadata"]["uid"], old_uid, "a new pod");
    // The old pod's deletion is the restart's: the instance lives on, as the new pod.
    reported_alive(&mut events, &pod).await;
    let svc = fake.get("services", NS, "web-1").expect("its Service");
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["uid"], pod["metadata"]["uid"],
        "owned by the new pod, so the garbage collector does not take it"
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
}

#[tokio::test]
async fn a_stopped_pod_is_kept_exited_and_a_start_makes_it_run_again() {
    let fake = FakeApi::start().await;
    fake.run_kubelet(NS);
    let rt = runtime(&fake);
    let mut events = rt.subscribe();
    let mut s = spec("app-web-0");
    s.init = true;
    rt.create(s).await.unwrap();
    let pod = fake.get("pods", NS, "app-web-0").unwrap();
    assert_eq!(
        pod["spec"]["shareProcessNamespace"], true,
        "init: the pause container is PID 1 and reaps zombies"
    );
    seen(
        &mut events,
        |e| matches!(e, RuntimeEvent::Changed(i) if i.name == "app-web-0" && i.ready),
    )
    .await;

    rt.stop("app-web-0").await.unwrap();
    seen(&mut events, |e| {
        matches!(e, RuntimeEvent::Changed(i) if i.name == "app-web-0"
            && matches!(i.state, poolkeeper_runtime::InstanceState::Exited { .. }))
    })
    .await;
    let stopped = fake
        .get("pods", NS, "app-web-0")
        .expect("kept, as docker stop keeps");
    assert_eq!(stopped["spec"]["activeDeadlineSeconds"], 1);
    assert_eq!(stopped["status"]["reason"], "DeadlineExceeded");

    // Started again: a pod made anew under its name, without the deadline, running.
    rt.restart("app-web-0").await.unwrap();
    let again = fake.get("pods", NS, "app-web-0").unwrap();
    assert_ne!(again["metadata"]["uid"], stopped["metadata"]["uid"]);
    assert!(again["spec"]["activeDeadlineSeconds"].is_null(), "{again}");
    assert_eq!(again["spec"]["shareProcessNamespace"], true);
    seen(
        &mut events,
        |e| matches!(e, RuntimeEvent::Changed(i) if i.name == "app-web-0" && i.ready),
    )
    .await;
}

#[tokio::test]
async fn a_resize_patches_the_pods_resize_subresource_requests_with_limits() {
    let fake = FakeApi::start().await;
    let rt = runtime(&fake);
    let mut s = spec("web-1");
    s.cpu_millis = Some(500);
    s.memory_bytes = Some(256 << 20);
    rt.create(s).await.unwrap();
    rt.resize("web-1", Some(1500), Some(512 << 20))
        .await
        .unwrap();
    let pod = fake.get("pods", NS, "web-1").unwrap();
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["resources"]["limits"]["cpu"], "1500m");
    assert_eq!(c["resources"]["requests"]["cpu"], "1500m", "QoS kept");
    assert_eq!(
        c["resources"]["limits"]["memory"],
        (512u64 << 20).to_string()
    );
    assert_eq!(c["image"], "nginx", "nothing else changes");
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.starts_with("PATCH /api/v1/namespaces/team/pods/web-1/resize")),
        "{:?}",
        fake.requests()
    );
    // Only one of the two: the other stays.
    rt.resize("web-1", Some(500), None).await.unwrap();
    let pod = fake.get("pods", NS, "web-1").unwrap();
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["resources"]["limits"]["cpu"], "500m");
    assert_eq!(
        c["resources"]["limits"]["memory"],
        (512u64 << 20).to_string()
    );
    let gone = rt.resize("web-2", Some(500), None).await.unwrap_err();
    assert!(
        matches!(gone, poolkeeper_runtime::RuntimeError::NotFound(_)),
        "{gone:?}"
    );
}
