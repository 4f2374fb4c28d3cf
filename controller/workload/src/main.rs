//! poolkeeper's test workload, built static and put `FROM scratch` by the end-to-end tests.
//!
//! `pk-workload [serve]` serves the files under `$ROOT` (default `/srv`) over HTTP on `$PORT`
//! (default 8080). Behaviour the tests steer through the environment:
//! - `READY_DELAY_MS`: `/healthz` answers 503 until this long after start;
//! - `FAIL_READINESS=1`: `/healthz` always answers 503;
//! - `CRASH_AFTER_MS`: the process exits with code 3 after this long;
//! - `EXIT_AFTER_MS` + `EXIT_CODE`: run to completion (a one-shot job) with that code;
//! - `GREETING`: printed to stdout at start (log tests read it);
//! - `STOP_DELAY_MS`: on SIGTERM, print `stopping` and exit 0 after this long (default 0; as
//!   PID 1 the process would otherwise ignore SIGTERM and wait for SIGKILL);
//! - `LOG_LINE` + `LOG_EVERY_MS`: print bursts of that line this often, each of
//!   `LOG_BURST_LINES` lines (default 1) 100 ms apart, `LOG_BURSTS` times (default: forever);
//! - `/unhealthy` (any request): from then on `/healthz` answers 503 (liveness tests).
//!
//! A scratch image has no shell, so the binary is also its own toolbox for exec probes and
//! resets: `pk-workload true|false|clean DIR|cat FILE|echo WORDS...|get PORT PATH`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        None | Some("serve") => serve(),
        Some("true") => 0,
        Some("hello") => {
            // What the classic hello-world image prints, in short.
            println!("Hello from poolkeeper's hello-world!");
            println!("This message shows that your installation appears to be working correctly.");
            0
        }
        Some("false") => 1,
        Some("echo") => {
            println!("{}", args[1..].join(" "));
            0
        }
        Some("cat") => match args.get(1).map(std::fs::read) {
            Some(Ok(bytes)) => {
                let _ = std::io::stdout().write_all(&bytes);
                0
            }
            _ => {
                eprintln!("cat: cannot read {:?}", args.get(1));
                1
            }
        },
        Some("clean") => match args.get(1) {
            Some(dir) => clean(Path::new(dir)),
            None => {
                eprintln!("clean: missing DIR");
                2
            }
        },
        Some("get") => match (args.get(1), args.get(2)) {
            (Some(port), Some(path)) => get(port, path),
            _ => {
                eprintln!("get: usage: get PORT|HOST:PORT PATH");
                2
            }
        },
        Some(other) => {
            eprintln!("unknown command {other}");
            2
        }
    };
    std::process::exit(code);
}

/// Removes everything under `dir` (not `dir` itself).
fn clean(dir: &Path) -> i32 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut code = 0;
    for e in entries.flatten() {
        let p = e.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if let Err(err) = r {
            eprintln!("clean: {}: {err}", p.display());
            code = 1;
        }
    }
    code
}

/// An HTTP GET, for exec probes: exit 0 on a 2xx answer. `target` is a port on localhost, or
/// `HOST:PORT` (another container, by name on a shared network).
fn get(target: &str, path: &str) -> i32 {
    let addr = if target.contains(':') {
        target.to_owned()
    } else {
        format!("127.0.0.1:{target}")
    };
    // A bounded connect: an address on a network this container is cut off from drops
    // packets, and the caller wants an answer, not a two-minute wait.
    let Some(addr) = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .ok()
        .and_then(|mut a| a.next())
    else {
        eprintln!("get: cannot resolve {target}");
        return 1;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        eprintln!("get: cannot connect to {addr}");
        return 1;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return 1;
    }
    let mut line = String::new();
    if BufReader::new(s).read_line(&mut line).is_err() {
        return 1;
    }
    if line
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'))
    {
        0
    } else {
        1
    }
}

/// Exits 0 on SIGTERM, after `STOP_DELAY_MS`.
fn on_sigterm() {
    let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()).is_err() {
        return;
    }
    let delay = env_ms("STOP_DELAY_MS").unwrap_or_default();
    std::thread::spawn(move || {
        while !term.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("stopping");
        std::thread::sleep(delay);
        std::process::exit(0);
    });
}

static UNHEALTHY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn serve() -> i32 {
    on_sigterm();
    if let (Some(every), Ok(line)) = (env_ms("LOG_EVERY_MS"), std::env::var("LOG_LINE")) {
        let count = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let lines = count("LOG_BURST_LINES").unwrap_or(1);
        let bursts = count("LOG_BURSTS").unwrap_or(u64::MAX);
        std::thread::spawn(move || {
            for _ in 0..bursts {
                std::thread::sleep(every);
                for i in 0..lines {
                    if i > 0 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    println!("{line}");
                }
            }
        });
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".to_owned());
    let root = PathBuf::from(std::env::var("ROOT").unwrap_or_else(|_| "/srv".to_owned()));
    let started = Instant::now();
    let ready_delay = env_ms("READY_DELAY_MS").unwrap_or_default();
    let fail_readiness = std::env::var("FAIL_READINESS").is_ok_and(|v| v == "1");
    if let Ok(g) = std::env::var("GREETING") {
        println!("{g}");
    }
    if let Some(after) = env_ms("EXIT_AFTER_MS") {
        let code = std::env::var("EXIT_CODE")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        std::thread::sleep(after);
        println!("done");
        return code;
    }
    if let Some(after) = env_ms("CRASH_AFTER_MS") {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            eprintln!("crashing as told");
            std::process::exit(3);
        });
    }
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind :{port}: {e}");
            return 1;
        }
    };
    println!("serving {} on :{port}", root.display());
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        let ready = !fail_readiness && started.elapsed() >= ready_delay;
        std::thread::spawn(move || handle(stream, &root, ready));
    }
    0
}

fn handle(mut stream: TcpStream, root: &Path, ready: bool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // Drain the headers.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    if path == "/unhealthy" {
        UNHEALTHY.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let (status, body) = if path == "/healthz" {
        if ready && !UNHEALTHY.load(std::sync::atomic::Ordering::Relaxed) {
            ("200 OK", b"ok\n".to_vec())
        } else {
            ("503 Service Unavailable", b"not ready\n".to_vec())
        }
    } else {
        match resolve(root, path).map(std::fs::read) {
            Some(Ok(bytes)) => ("200 OK", bytes),
            _ => ("404 Not Found", b"not found\n".to_vec()),
        }
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(&body);
    let mut sink = [0u8; 1];
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1)));
    let _ = stream.read(&mut sink);
}

/// Maps a request path to a file under `root`; no `..` escapes. `/` serves `index.html`.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let path = path.split('?').next().unwrap_or("/");
    let rel = Path::new(path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let p = root.join(rel);
    if p.is_dir() {
        Some(p.join("index.html"))
    } else {
        Some(p)
    }
}
