//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly one
//! acts (reconciles, writes status, serves claims).
//!
//! - Taking or renewing the Lease is a `replace` carrying the `resourceVersion` that was read:
//!   of two replicas racing, the second gets a conflict (optimistic concurrency).
//! - A standby takes a Lease over once it has seen the holder's `renewTime` unchanged for the
//!   whole lease duration, measured on its own clock from when it saw it (no clock comparison
//!   between machines).
//! - A leader that cannot renew stops acting [`LeaseConfig::margin`] before the lease would end,
//!   counted from when it sent its last successful renewal, which precedes any standby's
//!   observation of it: it has stopped before a standby can start. A renewal that gets no
//!   answer is given up when that time comes (no request waits past it).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// How the Lease is held.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica (its pod name, say).
    pub identity: String,
    /// How long a Lease lasts without renewal (the standby's wait).
    pub duration: Duration,
    /// How often the leader renews, and a standby looks.
    pub renew_every: Duration,
    /// How long before the Lease would end the leader stops acting when it cannot renew.
    pub margin: Duration,
}

impl LeaseConfig {
    /// Kubernetes' own defaults for its controllers: 15 s, renewed every 5 s (a leader that
    /// fails to renew stops 5 s before a standby may take over).
    pub fn new(name: &str, namespace: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            margin: Duration::from_secs(5),
        }
    }
}

/// Held leadership: `lost()` resolves when it is gone (the holder must stop acting at once).
pub struct Leadership {
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Leadership {
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// The renewing task (a crash stops it with everything else).
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.task.abort_handle()
    }

    /// Gives the Lease up (a graceful stop: a standby takes over at once).
    pub async fn release(self, client: Client, config: &LeaseConfig) {
        self.task.abort();
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        if let Ok(mut lease) = api.get(&config.name).await
            && holder(&lease) == Some(config.identity.as_str())
        {
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = api
                .replace(&config.name, &PostParams::default(), &lease)
                .await;
        }
    }
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One attempt to take or keep the Lease: Ok(true) when this replica holds it now.
async fn try_hold(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<(Option<MicroTime>, Option<String>, Instant)>,
) -> Result<bool, kube::Error> {
    let duration_s = config.duration.as_secs() as i32;
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: kube::core::ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if !mine {
        let seen = (spec.renew_time.clone(), spec.holder_identity.clone());
        let expired = match observed {
            Some((renew, who, at)) if (renew.clone(), who.clone()) == seen => {
                spec.holder_identity.is_none() || at.elapsed() >= config.duration
            }
            _ => {
                *observed = Some((seen.0, seen.1, Instant::now()));
                // Nobody holds it (given up): take it at once.
                spec.holder_identity.is_none()
            }
        };
        if !expired {
            return Ok(false);
        }
    }
    let s = lease.spec.get_or_insert_with(Default::default);
    if !mine {
        s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
        s.acquire_time = Some(now());
    }
    s.holder_identity = Some(config.identity.clone());
    s.lease_duration_seconds = Some(duration_s);
    s.renew_time = Some(now());
    // `replace` carries the resourceVersion read above: a conflict means another replica wrote
    // the Lease in between.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this replica holds the Lease, then keeps renewing it in a task of its own.
pub async fn acquire(client: Client, config: LeaseConfig) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed = None;
    let mut waiting_logged = false;
    let mut held_since;
    loop {
        held_since = Instant::now();
        match try_hold(&api, &config, &mut observed).await {
            Ok(true) => break,
            Ok(false) => {
                if !waiting_logged {
                    info!(lease = %config.name, namespace = %config.namespace, "another replica leads; standing by");
                    waiting_logged = true;
                }
            }
            Err(e) => warn!(lease = %config.name, error = %e, "cannot read the Lease; retrying"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
    info!(lease = %config.name, identity = %config.identity, "leading");
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        // When the request that last renewed was sent: the API server wrote its renewal
        // after that, so a standby's wait began after it too (an answer that took long
        // does not extend the lease).
        let mut last_renewed = held_since;
        let deadline = config.duration.saturating_sub(config.margin);
        let mut observed = None;
        loop {
            let left = deadline.saturating_sub(last_renewed.elapsed());
            tokio::time::sleep(config.renew_every.min(left)).await;
            let sent = Instant::now();
            let left = deadline.saturating_sub(last_renewed.elapsed());
            // A renewal gets no longer than the lease has left: one that gets no answer (a
            // half-open connection, a stuck write) must not keep this replica acting.
            match tokio::time::timeout(left, try_hold(&api, &config, &mut observed)).await {
                Ok(Ok(true)) => last_renewed = sent,
                Ok(Ok(false)) => {
                    warn!(lease = %config.name, "the Lease was taken by another replica; stopping");
                    let _ = tx.send(true);
                    return;
                }
                Ok(Err(e)) => warn!(lease = %config.name, error = %e, "renewing the Lease failed"),
                Err(_) => warn!(lease = %config.name, "renewing the Lease got no answer in time"),
            }
            if last_renewed.elapsed() >= deadline {
                warn!(
                    lease = %config.name,
                    "the Lease could not be renewed for {} s; stopping before another replica may take over",
                    last_renewed.elapsed().as_secs()
                );
                let _ = tx.send(true);
                return;
            }
        }
    });
    Leadership { lost: rx, task }
}
