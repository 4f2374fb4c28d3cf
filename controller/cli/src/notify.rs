//! The service manager's notification protocol (`sd_notify`): `READY=1` once `run` serves,
//! `WATCHDOG=1` while the engine answers, `STOPPING=1` on the way out. A datagram per message
//! to the socket `$NOTIFY_SOCKET` names (a path, or `@name` in the abstract namespace). Without
//! that variable (not under systemd with `Type=notify`) nothing is sent.

use std::future::Future;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::{debug, warn};

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a socket that cannot be made is logged, and nothing is sent.
    pub fn from_env() -> Self {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
            return Notifier { socket: None };
        };
        let path = path.to_string_lossy().into_owned();
        match UnixDatagram::unbound() {
            Ok(s) => Notifier {
                socket: Some((s, path)),
            },
            Err(e) => {
                warn!(socket = %path, error = %e, "cannot notify the service manager");
                Notifier { socket: None }
            }
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (`KEY=value` lines). A failure is logged: the service manager acts on a
    /// missing notification (a start that times out, a watchdog that fires), which says more
    /// than an error here could.
    pub fn notify(&self, state: &str) {
        let Some((socket, path)) = &self.socket else {
            return;
        };
        let sent = match path.strip_prefix('@') {
            Some(name) => {
                abstract_addr(name).and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
            }
            None => socket.send_to(state.as_bytes(), path),
        };
        match sent {
            Ok(_) => debug!(socket = %path, state, "notified the service manager"),
            Err(e) => warn!(socket = %path, state, error = %e, "cannot notify the service manager"),
        }
    }
}

fn abstract_addr(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// How often to send `WATCHDOG=1`: half the interval `$WATCHDOG_USEC` sets, when
/// `$WATCHDOG_PID` is unset or names this process; else no watchdog.
pub fn watchdog_every(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// The watchdog interval from this process's environment.
pub fn watchdog_from_env() -> Option<Duration> {
    watchdog_every(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// Sends `WATCHDOG=1` every `every`, each time only after `alive` answered true within `every`:
/// an engine that stops answering stops the pings, and the service manager restarts the
/// service once its watchdog interval passes. Runs until dropped.
pub async fn watchdog<F, Fut>(notifier: &Notifier, every: Duration, alive: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck = false;
    loop {
        tick.tick().await;
        match tokio::time::timeout(every, alive()).await {
            Ok(true) => {
                if stuck {
                    warn!("the engine answers again");
                    stuck = false;
                }
                notifier.notify("WATCHDOG=1");
            }
            Ok(false) | Err(_) => {
                if !stuck {
                    warn!(
                        within = ?every,
                        "the engine did not answer: no watchdog ping (the service manager restarts \
                         poolkeeper if this lasts)"
                    );
                    stuck = true;
                }
            }
        }
    }
}

/// [`watchdog`] on the engine behind `handle`: a ping only once the engine's loop has answered
/// a request (an empty view), so a loop that is stuck (waiting inline on a runtime that hangs,
/// say) stops the pings.
pub async fn watch_engine(
    notifier: &Notifier,
    every: Duration,
    handle: &poolkeeper_engine::EngineHandle,
) {
    watchdog(notifier, every, || async {
        handle.views(Vec::new()).await.is_ok()
    })
    .await
}

#[cfg(test)]
mod tests_support {
    use super::*;

    /// A listening socket in a temporary folder, and a notifier sending to it.
    pub(super) fn listener() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bound");
        sock.set_nonblocking(true).expect("nonblocking");
        let n = Notifier {
            socket: Some((
                UnixDatagram::unbound().expect("socket"),
                path.display().to_string(),
            )),
        };
        (dir, sock, n)
    }

    pub(super) fn received(sock: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn the_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() {
        assert_eq!(
            watchdog_every(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_every(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_every(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_every(None, None, 7), None);
        assert_eq!(watchdog_every(Some("0"), None, 7), None);
        assert_eq!(watchdog_every(Some("soon"), None, 7), None);
    }

    use super::tests_support::*;

    #[tokio::test(start_paused = true)]
    async fn pings_stop_while_the_engine_does_not_answer_and_resume_when_it_does() {
        let (_dir, sock, n) = listener();
        let answers = Arc::new(AtomicBool::new(true));
        let a = answers.clone();
        let dog = async move {
            watchdog(&n, Duration::from_secs(1), move || {
                let a = a.clone();
                async move {
                    if a.load(Ordering::SeqCst) {
                        true
                    } else {
                        // Stuck: never answers.
                        std::future::pending::<bool>().await
                    }
                }
            })
            .await
        };
        let task = tokio::spawn(dog);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let first = received(&sock);
        assert_eq!(first, vec!["WATCHDOG=1"; 4], "one ping a second");
        answers.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let stuck = received(&sock);
        assert!(stuck.len() <= 1, "pings while stuck: {stuck:?}");
        answers.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(received(&sock).len() >= 2, "pings resume");
        task.abort();
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        let n = Notifier { socket: None };
        assert!(!n.enabled());
        n.notify("READY=1");
    }
}

#[cfg(test)]
mod engine_tests {
    use std::sync::Arc;

    use poolkeeper_runtime::memory::{MemoryConfig, MemoryRuntime};

    use super::tests_support::*;
    use super::*;

    /// The real engine loop, stuck waiting inline on a runtime's listing that does not end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pings_stop_when_the_engine_loop_is_stuck() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = Arc::new(MemoryRuntime::new(MemoryConfig::default()));
        let (handle, _task) = poolkeeper_engine::start(
            rt.clone(),
            poolkeeper_engine::EngineConfig::new(dir.path().join("store")),
        )
        .expect("engine");
        let (_sock_dir, sock, n) = listener();
        let every = Duration::from_millis(100);
        let h = handle.clone();
        let dog = tokio::spawn(async move { watch_engine(&n, every, &h).await });
        tokio::time::sleep(Duration::from_millis(550)).await;
        let answered = received(&sock);
        assert!(
            answered.len() >= 3,
            "pings while the engine answers: {answered:?}"
        );
        // A resync lists inline; the listing now takes an hour.
        rt.set_list_latency(Duration::from_secs(3600));
        let h = handle.clone();
        let _stuck = tokio::spawn(async move { h.resync().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        received(&sock);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stuck = received(&sock);
        assert!(
            stuck.is_empty(),
            "pings while the engine loop is stuck: {stuck:?}"
        );
        dog.abort();
    }
}
