//! A `poolkeeper run` child process serving the HTTP API, for the API's tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The controller, killed and reaped when dropped (also when a test fails), and its API's
/// address.
pub struct Served {
    pub child: Child,
    pub addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` (a `run` on `dir`, listening on port 0) and waits until its status file names
/// the API's address.
pub fn serve(cmd: &mut Command, dir: &Path) -> Served {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = dir.join(".poolkeeper/status.json");
    let start = Instant::now();
    let addr = loop {
        let api = std::fs::read(&status)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["controller"]["api"].as_str().map(str::to_owned));
        if let Some(a) = api {
            break a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no API address in {}",
            status.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Served { child, addr }
}
