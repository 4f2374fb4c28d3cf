//! A `poolkeeper run` child process serving the HTTP API, for the API's tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
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

/// An answer read off the wire: its status, head and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub text: String,
}

impl Answer {
    /// The API's error shape: JSON with an `error` text.
    pub fn error(&self) -> String {
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "not JSON: {self:?}"
        );
        let v: Value =
            serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"));
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text: {self:?}"))
            .to_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Reads an answer until the server closes the connection.
pub fn read_answer(s: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, text) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        head: head.to_owned(),
        text: text.to_owned(),
    }
}

/// `METHOD PATH` to `addr` with a bearer `token` and a JSON `body` (empty: none), one
/// connection per request.
pub fn request(addr: &str, method: &str, path: &str, token: &str, body: &str) -> Answer {
    try_request(addr, method, path, token, body)
        .unwrap_or_else(|e| panic!("{method} {path} to {addr}: {e}"))
}

/// [`request`], or the error of a controller that is not there (down, restarting).
pub fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes())?;
    Ok(read_answer(&mut s))
}

/// `poolkeeper run` on the memory runtime for `dir`, its API on a free port.
pub fn run_memory(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_poolkeeper"));
    cmd.args([
        "run",
        "--runtime",
        "memory",
        "--listen",
        "127.0.0.1:0",
        "--dir",
    ])
    .arg(dir);
    cmd
}

/// Polls `ok` every 50 ms until it holds; fails naming `what` after `within`.
pub fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
