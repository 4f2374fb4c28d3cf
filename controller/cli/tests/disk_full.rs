#![allow(clippy::unwrap_used)]
//! A full disk, for real: the watched folder (and so the state store) on a 6 MiB tmpfs that
//! the test mounts and then fills. New claims are refused with 507 and the cause, `/readyz`
//! says why, a bound claim stays Bound, and once space returns the controller recovers by
//! itself (no restart): new claims bind again. A restart then finds every acknowledged claim.
//! Needs root (to mount); skipped, saying so, without it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::Digest;

mod api_support;
use api_support::{Answer, Served, request, run_memory, serve, wait_for};

const TOKEN: &str = "disk-full-token-0123456789";

/// The tmpfs, unmounted when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn specs() -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: Pool
metadata: {{name: web}}
spec:
  template: {{image: nginx}}
  warm: 3
  max: 40
---
apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: alice}}
spec: {{quota: {{maxClaims: 30}}, tokenSha256: {}}}
",
        hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
    )
}

fn start(dir: &Path) -> Served {
    serve(&mut run_memory(dir), dir)
}

fn create(api: &Served, name: &str) -> Answer {
    request(
        &api.addr,
        "POST",
        "/api/v1/claims",
        TOKEN,
        &format!(r#"{{"name": "{name}", "pool": "web"}}"#),
    )
}

fn phase(api: &Served, name: &str) -> String {
    let a = request(
        &api.addr,
        "GET",
        &format!("/api/v1/claims/{name}"),
        TOKEN,
        "",
    );
    if a.status != 200 {
        return format!("HTTP {}", a.status);
    }
    a.json()["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Fills the filesystem of `dir` with `dir/filler.bin` until a write fails for want of space.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Whatever a partial page held is taken too.
    while f.write(&[0u8]).is_ok_and(|n| n == 1) {}
    path
}

#[test]
fn a_full_disk_refuses_new_claims_keeps_bound_ones_and_recovers_by_itself() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("specs");
    std::fs::create_dir(&dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "poolkeeper-disk-full"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tmpfs failed (as root)");
    let _mount = Mount(dir.clone());
    std::fs::write(dir.join("specs.yaml"), specs()).unwrap();

    let api = start(&dir);
    assert_eq!(create(&api, "before").status, 201);
    wait_for("claim before Bound", Duration::from_secs(20), || {
        phase(&api, "before") == "Bound"
    });

    let filler = fill(&dir);
    // Every new claim is refused, 507 with the cause, until the store has refused a write too
    // (its log's last page may take a batch or two first); then /readyz says why.
    let mut refused = 0;
    let began = Instant::now();
    loop {
        let a = create(&api, &format!("full-{refused}"));
        assert_eq!(a.status, 507, "{a:?}");
        let error = a.error();
        assert!(
            error.contains("No space left on device"),
            "the cause is not named: {error}"
        );
        refused += 1;
        let ready = request(&api.addr, "GET", "/readyz", TOKEN, "");
        if ready.status == 503 {
            let why = ready.error();
            assert!(
                why.contains("state store cannot write") && why.contains("No space left"),
                "{why}"
            );
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "the store never failed ({refused} claims refused)"
        );
    }
    // A refused claim is nowhere; the bound one is still Bound, after a while too.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(phase(&api, "before"), "Bound");
    assert_eq!(phase(&api, "full-0"), "HTTP 404");
    let a = create(&api, "still-full");
    assert_eq!(a.status, 507, "{a:?}");
    assert!(
        a.error().contains("state store cannot write"),
        "{}",
        a.error()
    );

    // Space returns: the controller recovers by itself, within a few seconds.
    std::fs::remove_file(&filler).unwrap();
    wait_for(
        "/readyz 200 after space returned",
        Duration::from_secs(15),
        || request(&api.addr, "GET", "/readyz", TOKEN, "").status == 200,
    );
    assert_eq!(create(&api, "after").status, 201);
    wait_for("claim after Bound", Duration::from_secs(20), || {
        phase(&api, "after") == "Bound"
    });
    assert_eq!(phase(&api, "before"), "Bound");
    let metrics = request(&api.addr, "GET", "/metrics", TOKEN, "");
    assert!(
        metrics.text.contains("poolkeeper_store_failures_total"),
        "{}",
        metrics.text
    );

    // What was acknowledged survives a restart; what was refused does not appear.
    drop(api);
    std::fs::remove_file(dir.join(".poolkeeper/status.json")).unwrap();
    let api = start(&dir);
    wait_for(
        "both claims Bound after a restart",
        Duration::from_secs(20),
        || phase(&api, "before") == "Bound" && phase(&api, "after") == "Bound",
    );
    for n in 0..refused {
        assert_eq!(phase(&api, &format!("full-{n}")), "HTTP 404");
    }
    assert_eq!(phase(&api, "still-full"), "HTTP 404");
}
