//! Declared objects applied and deleted (what a source reports).

use std::collections::{BTreeMap, BTreeSet};

use tracing::warn;

use poolkeeper_kinds::{ClaimPhase, Kind, ObjKey, Object, Spec};
use poolkeeper_runtime::Runtime;

use crate::source::{SourceEvent, UserToken};
use crate::status::{self, Events};
use crate::{DeploymentEntry, Engine, PoolEntry, UserEntry, durable, hash_of};

impl<R: Runtime> Engine<R> {
    pub(crate) fn on_source(&mut self, ev: SourceEvent) {
        let now = self.clock.now_ms();
        match ev {
            SourceEvent::Synced => {
                self.synced = true;
            }
            SourceEvent::Diagnostics { file, diagnostics } => {
                // An object whose latest text is invalid keeps its last valid version and says so.
                let mut invalid: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for d in &diagnostics {
                    if let Some(label) = &d.object {
                        invalid
                            .entry(label.clone())
                            .or_default()
                            .push(d.to_string());
                    }
                }
                for (label, msgs) in invalid {
                    let Some((kind, name)) = label.split_once('/') else {
                        continue;
                    };
                    let msg = msgs.join("; ");
                    match Kind::parse(kind) {
                        Some(Kind::Pool) => {
                            if let Some(p) = self.pools.get_mut(name) {
                                status::set_condition(
                                    &mut p.conditions,
                                    "SpecValid",
                                    false,
                                    "InvalidSpec",
                                    &msg,
                                    now,
                                );
                                p.events.push(true, "InvalidSpec", msg, now);
                            }
                        }
                        Some(Kind::Claim) => {
                            if let Some(c) = self.claims.get_mut(name) {
                                c.invalid = Some(Box::new((msg.clone(), now)));
                                c.events.push(true, "InvalidSpec", msg, now);
                            }
                        }
                        Some(Kind::Deployment) => {
                            if let Some(d) = self.deployments.get_mut(name) {
                                status::set_condition(
                                    &mut d.conditions,
                                    "SpecValid",
                                    false,
                                    "InvalidSpec",
                                    &msg,
                                    now,
                                );
                                d.events.push(true, "InvalidSpec", msg, now);
                            }
                        }
                        _ => {}
                    }
                }
                for d in &diagnostics {
                    warn!(file = %d.file.display(), "{d}");
                }
                if diagnostics.is_empty() {
                    self.diagnostics.remove(&file);
                } else {
                    self.diagnostics.insert(file, diagnostics);
                }
            }
            SourceEvent::Apply(obj) => self.apply_object(obj, now),
            SourceEvent::Delete(key) => self.delete_object(&key, now),
        }
    }

    pub(crate) fn apply_object(&mut self, obj: Object, now: u64) {
        let generation = obj.generation;
        let name = obj.name.clone();
        // The same claim again (the API applies what it writes, and the watcher then sees the
        // file): nothing changed.
        if let Spec::Claim(spec) = &obj.spec
            && self.claims.get(&name).is_some_and(|c| {
                c.spec == *spec
                    && c.origin == obj.origin
                    && c.generation == generation
                    && c.invalid.is_none()
            })
        {
            return;
        }
        match obj.spec {
            Spec::Pool(spec) => {
                let hash: std::sync::Arc<str> = hash_of(&spec.template).into();
                let entry = self.pools.entry(name.clone()).or_insert_with(|| {
                    Box::new(PoolEntry::new(obj.origin.clone(), generation, hash.clone()))
                });
                if entry.spec.as_ref() != Some(&spec) {
                    let what = if entry.spec.is_none() {
                        "declared"
                    } else {
                        "changed"
                    };
                    entry.events.push(
                        false,
                        "SpecApplied",
                        format!("spec {what} ({})", obj.origin),
                        now,
                    );
                    let ports_moved = entry
                        .spec
                        .as_ref()
                        .is_some_and(|s| s.host_ports != spec.host_ports);
                    if ports_moved {
                        entry.events.push(
                            false,
                            "HostPortsChanged",
                            "host ports changed: instances outside the new range will be \
                             replaced (bound ones once released)"
                                .to_owned(),
                            now,
                        );
                    }
                    if entry.hash != hash {
                        entry.events.push(
                            false,
                            "TemplateChanged",
                            format!(
                                "template {} -> {hash}: unbound instances will be replaced",
                                entry.hash
                            ),
                            now,
                        );
                    }
                    // Each instance is filed again: whether it is current may have changed.
                    if (ports_moved || entry.hash != hash)
                        && let Some(idx) = self.pool_index.get(&name)
                    {
                        self.touched.extend(idx.members.iter().cloned());
                    }
                }
                entry.spec = Some(spec);
                entry.hash = hash;
                entry.origin = obj.origin;
                entry.generation = generation;
                status::remove_condition(&mut entry.conditions, "SpecValid");
                self.dirty_pools.insert(name.clone());
                // Claims on this pool may change verdict (PoolNotFound).
                let users: Vec<String> = self.users_of_pool(&name);
                self.dirty_users.extend(users);
            }
            Spec::User(spec) => {
                let entry = self.users.entry(name.clone()).or_insert_with(|| UserEntry {
                    spec: spec.clone(),
                    origin: obj.origin.clone(),
                    generation,
                    events: Events::default(),
                    token: UserToken::None,
                    conditions: Vec::new(),
                });
                entry.spec = spec;
                entry.origin = obj.origin;
                entry.generation = generation;
                self.dirty_users.insert(name.clone());
                self.refresh_token(&name, now);
                self.tokens_stale = true;
            }
            Spec::Deployment(spec) => {
                let hashes = spec
                    .containers
                    .iter()
                    .map(|c| {
                        // `stopped` is not part of the container's identity: toggling it stops
                        // or starts the container in place, never replaces it.
                        let identity = poolkeeper_kinds::ContainerSpec {
                            stopped: false,
                            ..c.clone()
                        };
                        (c.name.clone(), hash_of(&(&identity, &spec.network)))
                    })
                    .collect();
                let entry = self
                    .deployments
                    .entry(name.clone())
                    .or_insert_with(|| DeploymentEntry::new(obj.origin.clone(), generation));
                if entry.spec.as_ref() != Some(&spec) {
                    entry.events.push(
                        false,
                        "SpecApplied",
                        format!("spec applied ({})", obj.origin),
                        now,
                    );
                }
                entry.last_spec = Some(spec.clone());
                entry.spec = Some(spec);
                entry.hashes = hashes;
                entry.origin = obj.origin;
                entry.generation = generation;
                status::remove_condition(&mut entry.conditions, "SpecValid");
                self.dirty_deployments.insert(name);
            }
            Spec::Claim(spec) => self.apply_claim(name, spec, obj.origin, generation, now),
        }
    }

    fn users_of_pool(&self, pool: &str) -> Vec<String> {
        self.claims_by_pool
            .get(pool)
            .into_iter()
            .flatten()
            .filter_map(|(_, c)| self.claims.get(c).map(|e| e.spec.user.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn delete_object(&mut self, key: &ObjKey, now: u64) {
        match key.kind {
            Kind::Pool => {
                if let Some(p) = self.pools.get_mut(&key.name) {
                    p.spec = None;
                    p.events.push(false, "Draining", "pool no longer declared: removing unbound instances; bound ones stay until their claims end".into(), now);
                    self.dirty_pools.insert(key.name.clone());
                    let users = self.users_of_pool(&key.name);
                    self.dirty_users.extend(users);
                }
            }
            Kind::User => {
                if self.users.remove(&key.name).is_some() {
                    self.dirty_users.insert(key.name.clone());
                    self.tokens_stale = true;
                }
            }
            Kind::Deployment => {
                if let Some(d) = self.deployments.get_mut(&key.name) {
                    d.spec = None;
                    self.dirty_deployments.insert(key.name.clone());
                }
            }
            Kind::Claim => {
                if !self.claims.contains_key(&key.name) {
                    return;
                }
                let inst = self.bound_instance(&key.name);
                if let Some(inst) = inst {
                    self.end_binding(
                        &key.name,
                        &inst,
                        durable::RecPhase::Released,
                        "Deleted",
                        now,
                    );
                }
                self.claim_leaves(&key.name);
                self.unindex_claim(&key.name);
                self.claims.remove(&key.name);
                self.forget_record(&key.name);
                self.notify(&key.name, ClaimPhase::Released);
            }
        }
    }
}
