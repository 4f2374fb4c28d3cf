//! Readiness and liveness probes of containers, run by the controller (HTTP, TCP, exec).

use std::time::Duration;

use tracing::{debug, warn};

use poolkeeper_kinds::Probe;
use poolkeeper_runtime::{Runtime, RuntimeEvent, probe};

use crate::{DockerRuntime, PROBE_FAST};

impl DockerRuntime {
    pub(crate) fn spawn_probe(&self, name: &str, incarnation: Option<u64>) {
        if let Some(incarnation) = incarnation {
            tokio::spawn(self.clone().probe_loop(name.to_owned(), incarnation));
            tokio::spawn(self.clone().liveness_loop(name.to_owned(), incarnation));
        }
    }

    /// Kills the container once its liveness probe failed `failureThreshold` times in a row;
    /// its exit is reported as any other, and the engine's restart policy takes it from there.
    async fn liveness_loop(self, name: String, incarnation: u64) {
        let Some((probe, node)) = self.liveness_of(&name, incarnation) else {
            return;
        };
        let (timeout, period, threshold) = probe_timing(&probe, 10).await;
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(period).await;
            let Some(ok) = self
                .probe_once(&name, incarnation, &probe, node, timeout)
                .await
            else {
                return;
            };
            failures = if ok { 0 } else { failures + 1 };
            if failures < threshold {
                continue;
            }
            if self.liveness_of(&name, incarnation).is_none() {
                return;
            }
            warn!(instance = %name, failures, "liveness probe failed: killing the container");
            let Ok(docker) = self.docker(node) else {
                return;
            };
            if let Err(e) = docker
                .kill_container(
                    &name,
                    None::<bollard::query_parameters::KillContainerOptions>,
                )
                .await
            {
                warn!(instance = %name, error = %e, "killing an unhealthy container failed");
            }
            return;
        }
    }

    fn liveness_of(&self, name: &str, incarnation: u64) -> Option<(Probe, usize)> {
        let st = self.lock();
        let t = st.instances.get(name)?;
        (t.incarnation == incarnation && t.running)
            .then(|| t.liveness.clone().map(|p| (p, t.node)))
            .flatten()
    }

    async fn probe_loop(self, name: String, incarnation: u64) {
        let Some((probe, node)) = self.probe_of(&name, incarnation) else {
            return;
        };
        let (timeout, period, threshold) = probe_timing(&probe, 5).await;
        let mut failures = 0u32;
        loop {
            let Some(ok) = self
                .probe_once(&name, incarnation, &probe, node, timeout)
                .await
            else {
                return;
            };
            let ready = {
                let mut guard = self.lock();
                let st = &mut *guard;
                let Some(t) = st.instances.get_mut(&name) else {
                    return;
                };
                if t.incarnation != incarnation {
                    return;
                }
                let was = t.ready;
                if ok {
                    failures = 0;
                    t.ready = true;
                } else {
                    failures += 1;
                    if failures >= threshold {
                        t.ready = false;
                    }
                }
                if was != t.ready {
                    debug!(instance = %name, ready = t.ready, "readiness changed");
                    t.revision = self.next_revision();
                    let inst = self.instance_of(&name, t);
                    Self::emit(&mut st.subscribers, RuntimeEvent::Changed(inst));
                }
                t.ready
            };
            tokio::time::sleep(if ready { period } else { PROBE_FAST }).await;
        }
    }

    fn probe_of(&self, name: &str, incarnation: u64) -> Option<(Probe, usize)> {
        let st = self.lock();
        let t = st.instances.get(name)?;
        (t.incarnation == incarnation)
            .then(|| t.probe.clone().map(|p| (p, t.node)))
            .flatten()
    }

    /// One probe; `None` when the instance is gone or restarted (the loop ends).
    async fn probe_once(
        &self,
        name: &str,
        incarnation: u64,
        probe: &Probe,
        node: usize,
        timeout: Duration,
    ) -> Option<bool> {
        let target = |port: &poolkeeper_kinds::PortRef| -> Option<Option<String>> {
            let st = self.lock();
            let t = st.instances.get(name)?;
            if t.incarnation != incarnation {
                return None;
            }
            Some(match probe::find_port(&t.ports, port) {
                Some(b) if b.host_port != 0 => Some(format!(
                    "{}:{}",
                    self.inner.nodes[node].address, b.host_port
                )),
                _ => {
                    let cport = match port {
                        poolkeeper_kinds::PortRef::Number(n) => Some(*n),
                        poolkeeper_kinds::PortRef::Name(_) => {
                            probe::find_port(&t.ports, port).map(|b| b.container_port)
                        }
                    };
                    t.ip.clone().zip(cport).map(|(ip, p)| format!("{ip}:{p}"))
                }
            })
        };
        if let Some(h) = &probe.http_get {
            return Some(match target(&h.port)? {
                Some(addr) => probe::http_get(&addr, &h.path, timeout).await,
                None => false,
            });
        }
        if let Some(tcp) = &probe.tcp_socket {
            return Some(match target(&tcp.port)? {
                Some(addr) => probe::tcp(&addr, timeout).await,
                None => false,
            });
        }
        if let Some(e) = &probe.exec {
            let out = tokio::time::timeout(timeout, self.exec(name, &e.command)).await;
            return Some(matches!(out, Ok(Ok(o)) if o.exit_code == 0));
        }
        Some(true)
    }

    /// The container's address, when `wanted` (and it can be read).
    pub(crate) async fn ip_if(&self, wanted: bool, i: usize, name: &str) -> Option<String> {
        if !wanted {
            return None;
        }
        self.inspect(i, name)
            .await
            .ok()
            .flatten()
            .and_then(|t| t.ip)
    }
}

/// Waits out a probe's initial delay; returns its timeout, period (`default_period` seconds
/// unless set) and failure threshold.
pub(crate) async fn probe_timing(probe: &Probe, default_period: u32) -> (Duration, Duration, u32) {
    if let Some(d) = probe.initial_delay_seconds {
        tokio::time::sleep(Duration::from_secs(u64::from(d))).await;
    }
    let secs =
        |s: Option<u32>, default: u32| Duration::from_secs(u64::from(s.unwrap_or(default).max(1)));
    (
        secs(probe.timeout_seconds, 1),
        secs(probe.period_seconds, default_period),
        probe.failure_threshold.unwrap_or(3).max(1),
    )
}
