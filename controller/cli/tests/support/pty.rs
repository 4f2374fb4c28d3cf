//! A pseudo-terminal for the tests of `exec -it`.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pseudo-terminal whose slave end is the CLI's terminal, as a user's would be.
pub struct Pty {
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    pub fn open(rows: u16, cols: u16) -> (Pty, std::fs::File) {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap();
        let master = std::fs::File::from(master);
        let pty = Pty {
            master,
            output: Arc::default(),
        };
        pty.resize(rows, cols);
        let mut reader = pty.master.try_clone().unwrap();
        let out = pty.output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (pty, slave)
    }

    pub fn resize(&self, rows: u16, cols: u16) {
        let ws = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&self.master, ws).unwrap();
    }

    pub fn send(&self, s: &str) {
        use std::io::Write;
        (&self.master).write_all(s.as_bytes()).unwrap();
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output since `from` contains `want`; returns where it ends.
    pub fn expect(&self, from: usize, want: &str, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let t = self.text();
            if let Some(i) = t.get(from..).and_then(|rest| rest.find(want)) {
                return from + i + want.len();
            }
            assert!(
                start.elapsed() < timeout,
                "no {want:?} in the terminal; it shows:\n{}",
                t.get(from..).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
