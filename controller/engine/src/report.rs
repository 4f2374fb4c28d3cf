//! Status as the engine reports it: claims' phases and conditions, pools' status, the snapshot.

use poolkeeper_core::claims::Verdict;
use poolkeeper_core::pool::InstancePhase;
use poolkeeper_kinds::{
    ClaimPhase, ClaimStatus, ContainerStatus, DeploymentStatus, Endpoint, Kind, ObjKey, PoolStatus,
    UserStatus,
};
use poolkeeper_runtime::Runtime;

use crate::deployments::slot_name;
use crate::durable::RecPhase;
use crate::status::{self, InstanceView, ObjectView, Snapshot};
use crate::{ClaimEntry, Engine, InstRec};

fn view<S: serde::Serialize, T: serde::Serialize>(
    kind: Kind,
    name: &str,
    origin: &poolkeeper_kinds::Origin,
    spec: Option<&S>,
    status: &T,
    events: &status::Events,
) -> ObjectView {
    ObjectView {
        kind,
        name: name.to_owned(),
        origin: origin.clone(),
        spec: spec
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(serde_json::Value::Null),
        status: serde_json::to_value(status).unwrap_or(serde_json::Value::Null),
        events: events.records(),
    }
}

impl<R: Runtime> Engine<R> {
    /// The phase a claim shows, from its durable record and what this engine knows.
    fn claim_phase(c: &ClaimEntry, rec: Option<&super::durable::ClaimRecord>) -> ClaimPhase {
        match rec.map(|r| r.phase) {
            Some(RecPhase::Bound) if !c.files_pending => ClaimPhase::Bound,
            Some(RecPhase::Bound) => ClaimPhase::Pending,
            Some(RecPhase::Expired) => ClaimPhase::Expired,
            Some(RecPhase::Released) => ClaimPhase::Released,
            _ if c.verdict != Verdict::Admit || c.files_error.is_some() => ClaimPhase::Failed,
            _ => ClaimPhase::Pending,
        }
    }

    /// Recomputes a claim's reported phase; records the change and notifies watchers.
    pub(super) fn report_claim(&mut self, claim: &str, now: u64) {
        let rec = self.store.state().claims.get(claim);
        let Some(c) = self.claims.get(claim) else {
            return;
        };
        let phase = Self::claim_phase(c, rec);
        if c.reported == phase {
            return;
        }
        let Some(c) = self.claims.get_mut(claim) else {
            return;
        };
        if phase == ClaimPhase::Bound && c.reported == ClaimPhase::Pending {
            let waited = now.saturating_sub(c.phase_since) as f64 / 1000.0;
            self.metrics.bind_latency.observe(waited);
            // Per pool too (the console's distributions); a pool's name is cloned once.
            match self.metrics.bind_latency_by_pool.get_mut(&c.spec.pool) {
                Some(h) => h.observe(waited),
                None => {
                    let mut h = crate::metrics::Histogram::default();
                    h.observe(waited);
                    self.metrics
                        .bind_latency_by_pool
                        .insert(c.spec.pool.clone(), h);
                }
            }
        }
        c.reported = phase;
        c.phase_since = now;
        if phase == ClaimPhase::Bound {
            // No event for a routine bind: the Bound condition (time, instance) says it, and
            // 100k claims each holding an event would cost ~30 MB.
            c.lost = None;
        }
        self.notify(claim, phase);
    }

    /// A claim's conditions, derived from its state.
    fn claim_conditions(&self, c: &ClaimEntry) -> Vec<poolkeeper_kinds::Condition> {
        let cond = |type_: &str, ok: bool, reason: &str, message: String, since: u64| {
            poolkeeper_kinds::Condition {
                type_: type_.to_owned(),
                status: if ok { "True" } else { "False" }.to_owned(),
                reason: reason.to_owned(),
                message,
                last_transition_time: status::rfc3339(since),
                observed_generation: Some(c.generation),
            }
        };
        let mut out = Vec::new();
        out.push(match (&c.verdict, &c.files_error) {
            (_, Some(err)) => cond(
                "Admitted",
                false,
                "FilesUnavailable",
                err.clone(),
                c.verdict_since,
            ),
            (Verdict::Refuse { reason, message }, _) => {
                cond("Admitted", false, reason, message.clone(), c.verdict_since)
            }
            (Verdict::Admit, None) => {
                cond("Admitted", true, "Admitted", String::new(), c.verdict_since)
            }
        });
        let (reason, message) = match c.reported {
            ClaimPhase::Bound => (
                "Bound".to_owned(),
                format!("bound to {}", c.instance.clone().unwrap_or_default()),
            ),
            ClaimPhase::Pending if c.instance.is_some() => (
                "CopyingFiles".to_owned(),
                "copying the claim's files into its instance".to_owned(),
            ),
            ClaimPhase::Pending => match c.queue_position {
                Some(p) => (
                    "Queued".to_owned(),
                    format!("waiting for an instance (position {p})"),
                ),
                None => (
                    "Binding".to_owned(),
                    "looking for a warm instance".to_owned(),
                ),
            },
            other => (other.to_string(), String::new()),
        };
        out.push(cond(
            "Bound",
            c.reported == ClaimPhase::Bound,
            &reason,
            message,
            c.phase_since,
        ));
        if let Some((msg, at)) = c.lost.as_deref() {
            out.push(cond("InstanceLost", true, "InstanceLost", msg.clone(), *at));
        }
        if let Some((msg, at)) = c.invalid.as_deref() {
            out.push(cond("SpecValid", false, "InvalidSpec", msg.clone(), *at));
        }
        out
    }

    pub(super) fn pool_status(&self, name: &str) -> Option<PoolStatus> {
        let p = self.pools.get(name)?;
        let members = self.pool_index.get(name).map(|i| &i.members);
        let recs: Vec<&InstRec> = members
            .into_iter()
            .flatten()
            .filter_map(|m| self.instances.get(m).map(|r| &**r))
            .collect();
        let mut s = PoolStatus {
            observed_generation: Some(p.generation),
            ..PoolStatus::default()
        };
        for r in &recs {
            if r.phase == InstancePhase::Deleting {
                continue;
            }
            s.instances += 1;
            if r.phase == InstancePhase::Ready {
                s.ready += 1;
            }
            if r.quarantined.is_some() {
                s.quarantined += 1;
            } else if r.held() {
                s.bound += 1;
            } else if r.phase == InstancePhase::Ready && !r.resetting && r.hash == p.hash {
                s.warm += 1;
            } else if matches!(r.phase, InstancePhase::Creating | InstancePhase::Starting) {
                s.starting += 1;
            }
        }
        // Only unbound claims can be waiting: count from the pool's queue, not all its claims.
        s.queued = self
            .queues
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(_, c)| {
                self.claims.get(c).is_some_and(|e| {
                    e.queue_position.is_some() && e.reported == ClaimPhase::Pending
                })
            })
            .count() as u32;
        s.hits = p.hits;
        s.misses = p.misses;
        s.desired_warm = p.scale.desired;
        s.selector = format!("{}={name}", poolkeeper_runtime::LABEL_POOL);
        // Brought up to date once a minute (see `ScaleState::idle_shown_s`).
        s.idle_instance_seconds = p.scale.idle_shown_s;
        s.scaling = p
            .scale
            .decision
            .as_ref()
            .map(|d| poolkeeper_kinds::Scaling {
                policy: d.policy.label().to_owned(),
                reason: d.reason.clone(),
                arrival_rate: (p.scale.arrival_rate * 1000.0).round() / 1000.0,
                fill_time_seconds: (p.scale.fill_time_s() * 100.0).round() / 100.0,
            });
        // Conditions are kept by the passes (so transition times hold); a Quarantined
        // condition outlives its last quarantined instance only until the next pass.
        let mut conds = p.conditions.clone();
        if s.quarantined == 0 {
            conds.retain(|c| c.type_ != "Quarantined");
        }
        s.conditions = conds;
        Some(s)
    }

    /// One instance as status shows it; None when it is gone.
    pub(crate) fn instance_view(&self, name: &str) -> Option<InstanceView> {
        let r = self.instances.get(name)?;
        Some(InstanceView {
            name: r.name.clone(),
            pool: r.pool.clone(),
            deployment: r.deployment.as_ref().map(|d| d.0.clone()),
            phase: format!("{:?}", r.phase),
            claim: r.claim.clone(),
            resetting: r.resetting,
            ports: r.client_ports(),
            node: r.node.to_string(),
            quarantined: r.quarantined.clone(),
        })
    }

    /// One declared object as status shows it; None when the engine does not hold it.
    pub(crate) fn view_of(&self, key: &ObjKey) -> Option<ObjectView> {
        let name = key.name.as_str();
        match key.kind {
            Kind::Pool => self.pool_view(name),
            Kind::Claim => self.claim_view(name),
            Kind::User => self.user_view(name),
            Kind::Deployment => self.deployment_view(name),
        }
    }

    fn pool_view(&self, name: &str) -> Option<ObjectView> {
        let p = self.pools.get(name)?;
        let s = self.pool_status(name)?;
        Some(view(
            Kind::Pool,
            name,
            &p.origin,
            p.spec.as_ref(),
            &s,
            &p.events,
        ))
    }

    fn claim_view(&self, name: &str) -> Option<ObjectView> {
        let c = self.claims.get(name)?;
        let st = self.store.state();
        let rec = st.claims.get(name);
        let instance = rec
            .and_then(|r| r.instance.clone())
            .filter(|_| c.reported == ClaimPhase::Bound);
        let endpoint = instance
            .as_ref()
            .and_then(|i| self.instances.get(i))
            .map(|r| {
                let host = self.rt.endpoint_host(&r.node);
                let ssh = self
                    .pools
                    .get(&c.spec.pool)
                    .and_then(|p| p.spec.as_ref())
                    .and_then(|s| s.template.ssh.as_ref())
                    .and_then(|ssh| {
                        poolkeeper_runtime::find_port(&r.bindings, &ssh.port)
                            .map(|b| format!("ssh -p {} {}@{host}", b.host_port, ssh.user))
                    });
                let ports: std::collections::BTreeMap<String, u16> = r
                    .bindings
                    .iter()
                    .map(|p| (p.name.clone(), p.host_port))
                    .collect();
                let address = ports.values().next().map(|port| address_of(&host, *port));
                Endpoint {
                    ports,
                    address,
                    host,
                    ssh,
                }
            });
        let s = ClaimStatus {
            observed_generation: Some(c.generation),
            phase: c.reported,
            instance: instance.clone(),
            endpoint,
            bound_at: rec
                .and_then(|r| r.bound_at_ms)
                .filter(|_| instance.is_some())
                .map(status::rfc3339),
            expires_at: rec
                .and_then(|r| r.expires_at_ms)
                .filter(|_| instance.is_some())
                .map(status::rfc3339),
            queue_position: c
                .queue_position
                .filter(|_| c.reported == ClaimPhase::Pending),
            conditions: self.claim_conditions(c),
        };
        Some(view(
            Kind::Claim,
            name,
            &c.origin,
            Some(&c.spec),
            &s,
            &c.events,
        ))
    }

    fn user_view(&self, name: &str) -> Option<ObjectView> {
        let u = self.users.get(name)?;
        let active = self
            .claims_by_user
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(_, c)| {
                self.claims
                    .get(c)
                    .is_some_and(|e| matches!(e.reported, ClaimPhase::Bound | ClaimPhase::Pending))
            })
            .count() as u32;
        let s = UserStatus {
            observed_generation: Some(u.generation),
            active_claims: active,
            conditions: u.conditions.clone(),
        };
        Some(view(
            Kind::User,
            name,
            &u.origin,
            Some(&u.spec),
            &s,
            &u.events,
        ))
    }

    fn deployment_view(&self, name: &str) -> Option<ObjectView> {
        let d = self.deployments.get(name)?;
        let mut s = DeploymentStatus {
            observed_generation: Some(d.generation),
            conditions: d.conditions.clone(),
            ..DeploymentStatus::default()
        };
        if let Some(spec) = &d.spec {
            let slots = self.deployment_slots(name);
            for c in &spec.containers {
                let hash = d
                    .hashes
                    .get(&c.name)
                    .map(String::as_str)
                    .unwrap_or_default();
                for r in 0..c.replicas {
                    let slot = slot_name(name, c, r);
                    // The current instance; else one that is being replaced.
                    let recs = slots.get(&(c.name.clone(), r));
                    let rec = recs
                        .and_then(|v| v.iter().find(|i| *i.hash == *hash))
                        .or_else(|| recs.and_then(|v| v.first()))
                        .copied();
                    let updating =
                        rec.is_some_and(|i| *i.hash != *hash) || recs.is_some_and(|v| v.len() > 1);
                    let restarts = d.restarts.get(&slot).map(|r| r.0).unwrap_or(0);
                    let state = match rec.map(|r| r.phase) {
                        None if c.depends_on.is_empty() => "Waiting",
                        None => "WaitingForDependencies",
                        _ if c.stopped && rec.is_none_or(|r| r.phase == InstancePhase::Dead) => {
                            "Stopped"
                        }
                        Some(InstancePhase::Creating) | Some(InstancePhase::Starting) => "Starting",
                        Some(InstancePhase::Ready) => "Running",
                        Some(InstancePhase::Dead)
                            if poolkeeper_core::deployment::should_restart(
                                c.restart_policy,
                                rec.and_then(|r| r.exit_code),
                            ) && restarts > 0 =>
                        {
                            "CrashLoopBackOff"
                        }
                        Some(InstancePhase::Dead) => "Exited",
                        Some(InstancePhase::Deleting) => "Terminating",
                    };
                    s.containers += 1;
                    let ready = rec.is_some_and(|r| r.phase == InstancePhase::Ready);
                    if ready {
                        s.ready += 1;
                    }
                    s.container_statuses.push(ContainerStatus {
                        name: c.name.clone(),
                        replica: r,
                        instance: rec.map(|r| r.name.clone()),
                        state: state.to_owned(),
                        ready,
                        restarts,
                        exit_code: rec.and_then(|r| r.exit_code),
                        message: updating.then(|| "being replaced by its new spec".to_owned()),
                    });
                }
                for t in &c.log_triggers {
                    let st = d.triggers.get(&(c.name.clone(), t.name.clone()));
                    s.log_triggers.push(poolkeeper_kinds::LogTriggerStatus {
                        container: c.name.clone(),
                        name: t.name.clone(),
                        fired: st.map_or(0, |x| x.fired),
                        matches: st.map_or(0, |x| x.matches),
                        last_line: st.and_then(|x| x.last_line.clone()),
                        last_fired_at: st.and_then(|x| x.last_fired_ms).map(status::rfc3339),
                    });
                }
            }
        }
        Some(view(
            Kind::Deployment,
            name,
            &d.origin,
            d.spec.as_ref(),
            &s,
            &d.events,
        ))
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        let now = self.clock.now_ms();
        let mut objects: Vec<ObjectView> = Vec::new();
        objects.extend(self.pools.keys().filter_map(|n| self.pool_view(n)));
        let mut claims: Vec<(&String, &ClaimEntry)> =
            self.claims.iter().map(|(n, c)| (n, &**c)).collect();
        claims.sort_by_key(|(_, c)| c.seq);
        objects.extend(claims.iter().filter_map(|(n, _)| self.claim_view(n)));
        objects.extend(self.users.keys().filter_map(|n| self.user_view(n)));
        objects.extend(
            self.deployments
                .keys()
                .filter_map(|n| self.deployment_view(n)),
        );
        let mut instances: Vec<InstanceView> = self
            .instances
            .keys()
            .filter_map(|n| self.instance_view(n))
            .collect();
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot {
            controller: status::ControllerInfo {
                pid: std::process::id(),
                runtime: self.rt.name().to_owned(),
                started_at: status::rfc3339(self.started_at_ms),
                updated_at: status::rfc3339(now),
                state_dir: self.config.state_dir.clone(),
                api: None,
                store_error: self.store_down.as_ref().map(|d| d.error.clone()),
            },
            objects,
            diagnostics: self
                .diagnostics
                .values()
                .flatten()
                .map(|d| d.to_string())
                .collect(),
            instances,
            nodes: self.rt.nodes(),
            metrics: super::metrics::EngineMetrics {
                claim_subscribers: self.subscribers.len() as u64,
                ..self.metrics.clone()
            },
        }
    }
}

/// `host:port`, with an IPv6 host in brackets.
fn address_of(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
