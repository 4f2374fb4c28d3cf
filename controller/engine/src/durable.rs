//! The engine's durable state: claim arrival order, bindings, terminal phases and quarantines.
//!
//! Kept by `poolkeeper-store` (snapshot + write-ahead log, one fsync per batch), so a binding is
//! on disk before its claim is reported Bound, and a restarted controller knows every binding.
//! `apply` refuses anything that would bind one instance to two claims, which makes that
//! invariant hold even if a decision above it were wrong.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use poolkeeper_store::StateMachine;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecPhase {
    /// Admitted to the queue (arrival order fixed), no instance.
    Waiting,
    Bound,
    /// Ended by the user (`claim release`); the object still exists.
    Released,
    /// Its lease ran out.
    Expired,
}

impl RecPhase {
    /// Its binding ended for good (released or expired): it never binds again.
    pub fn ended(self) -> bool {
        matches!(self, RecPhase::Released | RecPhase::Expired)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    /// Arrival order (queue position is derived from it).
    pub seq: u64,
    pub pool: String,
    /// Whose claim it is (absent in records written before it was kept). With the name and
    /// the pool it tells the claim apart from a later one declared under the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub phase: RecPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Bound at once from a warm instance (rather than after waiting).
    #[serde(default)]
    pub hit: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    pub next_seq: u64,
    pub claims: BTreeMap<String, ClaimRecord>,
    /// Instance -> claim, the inverse of the bound records.
    pub bound: BTreeMap<String, String>,
    /// Instance -> why it was taken out of service.
    pub quarantined: BTreeMap<String, String>,
    /// Instances a claim held and released, not reset yet (they may hold the previous user's
    /// data): never bound again until reset or gone, also across a crash.
    #[serde(default)]
    pub used: std::collections::BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Enter the queue of `pool`; takes the next arrival number. For a known claim (moved to
    /// another pool or user) only its pool and user change; its arrival number stays.
    Admit {
        claim: String,
        pool: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    Bind {
        claim: String,
        instance: String,
        at_ms: u64,
        expires_at_ms: Option<u64>,
        hit: bool,
    },
    /// A bound claim's lease changed (its `ttl` edited): it now ends at `expires_at_ms`.
    Lease {
        claim: String,
        expires_at_ms: Option<u64>,
    },
    /// Drop the binding and move the claim to `to` (Waiting to rebind, or a terminal phase).
    Unbind {
        claim: String,
        to: RecPhase,
    },
    /// The claim object is gone: forget it (it must not be bound).
    Forget {
        claim: String,
    },
    Quarantine {
        instance: String,
        reason: String,
    },
    Unquarantine {
        instance: String,
    },
    /// The instance was reset, or is gone: nothing of a previous claim remains in it.
    Fresh {
        instance: String,
    },
}

/// Whether a batch must be on disk before anything it decided is reported or acted on; if
/// not, it is written at once and flushed with the next batch that must be (or within
/// [`super::DEFERRED_FLUSH_MS`]).
///
/// A batch may wait only if a restart after losing it derives the same from what is declared
/// and what runs:
/// - a deleted claim's end (`Forget`, and its `Unbind` in the same batch): the claim is found
///   undeclared, its binding ended and its instance reset again;
/// - an instance reset or gone (`Fresh`), a gone instance's quarantine dropped (`Unquarantine`):
///   a used instance is reset again, a gone one dropped from the records at start.
///
/// Everything else is flushed first: arrival order (`Admit`), bindings (`Bind`), quarantines,
/// and an end of a binding whose claim stays declared (expired, moved, or lost its instance):
/// a restart that lost it would take the claim as still bound.
pub fn needs_flush(ops: &[Op]) -> bool {
    let forgotten: std::collections::BTreeSet<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Forget { claim } => Some(claim.as_str()),
            _ => None,
        })
        .collect();
    ops.iter().any(|op| match op {
        Op::Admit { .. } | Op::Bind { .. } | Op::Lease { .. } | Op::Quarantine { .. } => true,
        Op::Unbind { claim, .. } => !forgotten.contains(claim.as_str()),
        Op::Forget { .. } | Op::Unquarantine { .. } | Op::Fresh { .. } => false,
    })
}

impl StateMachine for Durable {
    type Op = Op;

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Admit { claim, pool, user } => {
                if let Some(rec) = self.claims.get_mut(claim) {
                    rec.pool.clone_from(pool);
                    rec.user.clone_from(user);
                } else {
                    self.claims.insert(
                        claim.clone(),
                        ClaimRecord {
                            seq: self.next_seq,
                            pool: pool.clone(),
                            user: user.clone(),
                            phase: RecPhase::Waiting,
                            instance: None,
                            bound_at_ms: None,
                            expires_at_ms: None,
                            hit: false,
                        },
                    );
                    self.next_seq += 1;
                }
                Ok(())
            }
            Op::Bind {
                claim,
                instance,
                at_ms,
                expires_at_ms,
                hit,
            } => {
                if let Some(other) = self.bound.get(instance) {
                    return Err(format!(
                        "instance {instance} is already bound to claim {other}"
                    ));
                }
                if self.used.contains(instance) {
                    return Err(format!(
                        "instance {instance} was released and not reset yet"
                    ));
                }
                if self.quarantined.contains_key(instance) {
                    return Err(format!("instance {instance} is quarantined"));
                }
                let rec = self
                    .claims
                    .get_mut(claim)
                    .ok_or_else(|| format!("claim {claim} was never admitted"))?;
                if rec.phase != RecPhase::Waiting {
                    return Err(format!("claim {claim} is {:?}, not waiting", rec.phase));
                }
                rec.phase = RecPhase::Bound;
                rec.instance = Some(instance.clone());
                rec.bound_at_ms = Some(*at_ms);
                rec.expires_at_ms = *expires_at_ms;
                rec.hit = *hit;
                self.bound.insert(instance.clone(), claim.clone());
                Ok(())
            }
            Op::Lease {
                claim,
                expires_at_ms,
            } => {
                let rec = self
                    .claims
                    .get_mut(claim)
                    .ok_or_else(|| format!("claim {claim} is unknown"))?;
                if rec.phase != RecPhase::Bound {
                    return Err(format!("claim {claim} is {:?}, not bound", rec.phase));
                }
                rec.expires_at_ms = *expires_at_ms;
                Ok(())
            }
            Op::Unbind { claim, to } => {
                let rec = self
                    .claims
                    .get_mut(claim)
                    .ok_or_else(|| format!("claim {claim} is unknown"))?;
                if *to == RecPhase::Bound {
                    return Err("Unbind cannot move a claim to Bound".into());
                }
                if let Some(i) = rec.instance.take() {
                    self.bound.remove(&i);
                    self.used.insert(i);
                }
                rec.phase = *to;
                rec.bound_at_ms = None;
                if *to == RecPhase::Waiting {
                    rec.expires_at_ms = None;
                }
                Ok(())
            }
            Op::Forget { claim } => {
                if let Some(rec) = self.claims.get(claim)
                    && rec.instance.is_some()
                {
                    return Err(format!("claim {claim} is still bound; unbind it first"));
                }
                self.claims.remove(claim);
                Ok(())
            }
            Op::Quarantine { instance, reason } => {
                if self.bound.contains_key(instance) {
                    return Err(format!("instance {instance} is bound; unbind it first"));
                }
                self.quarantined.insert(instance.clone(), reason.clone());
                Ok(())
            }
            Op::Unquarantine { instance } => {
                self.quarantined.remove(instance);
                Ok(())
            }
            Op::Fresh { instance } => {
                self.used.remove(instance);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(d: &mut Durable, c: &str) {
        d.apply(&Op::Admit {
            claim: c.into(),
            pool: "p".into(),
            user: Some("u".into()),
        })
        .expect("admit");
    }

    fn bind(c: &str, i: &str) -> Op {
        Op::Bind {
            claim: c.into(),
            instance: i.into(),
            at_ms: 1,
            expires_at_ms: None,
            hit: true,
        }
    }

    #[test]
    fn one_instance_can_never_be_bound_to_two_claims() {
        let mut d = Durable::default();
        admit(&mut d, "a");
        admit(&mut d, "b");
        d.apply(&bind("a", "i")).expect("first bind");
        let before = d.clone();
        assert!(d.apply(&bind("b", "i")).is_err());
        assert_eq!(d, before, "a refused op leaves the state unchanged");
    }

    #[test]
    fn arrival_order_is_assigned_once() {
        let mut d = Durable::default();
        admit(&mut d, "a");
        admit(&mut d, "b");
        admit(&mut d, "a");
        assert_eq!(d.claims["a"].seq, 0);
        assert_eq!(d.claims["b"].seq, 1);
        assert_eq!(d.next_seq, 2);
        // Moved to another pool and user: the arrival number stays, the owner changes.
        d.apply(&Op::Admit {
            claim: "a".into(),
            pool: "q".into(),
            user: Some("v".into()),
        })
        .expect("admit again");
        let a = &d.claims["a"];
        assert_eq!(
            (a.seq, a.pool.as_str(), a.user.as_deref()),
            (0, "q", Some("v"))
        );
        // A record written before users were kept still reads.
        let old: ClaimRecord =
            serde_json::from_str(r#"{"seq":3,"pool":"p","phase":"Waiting"}"#).expect("old record");
        assert_eq!(old.user, None);
    }

    #[test]
    fn unbinding_frees_the_instance_and_a_bound_claim_cannot_be_forgotten() {
        let mut d = Durable::default();
        admit(&mut d, "a");
        d.apply(&bind("a", "i")).expect("bind");
        assert!(d.apply(&Op::Forget { claim: "a".into() }).is_err());
        d.apply(&Op::Unbind {
            claim: "a".into(),
            to: RecPhase::Expired,
        })
        .expect("unbind");
        assert!(d.bound.is_empty());
        assert_eq!(d.claims["a"].phase, RecPhase::Expired);
        // A terminal claim never binds again.
        assert!(d.apply(&bind("a", "j")).is_err());
        d.apply(&Op::Forget { claim: "a".into() }).expect("forget");
        assert!(d.claims.is_empty());
    }

    #[test]
    fn quarantined_instances_are_not_bound() {
        let mut d = Durable::default();
        admit(&mut d, "a");
        d.apply(&Op::Quarantine {
            instance: "i".into(),
            reason: "reset failed".into(),
        })
        .expect("quarantine");
        assert!(d.apply(&bind("a", "i")).is_err());
    }

    #[test]
    fn only_what_a_restart_derives_again_waits_for_the_next_flush() {
        let unbind = |c: &str, to| Op::Unbind {
            claim: c.into(),
            to,
        };
        let forget = |c: &str| Op::Forget { claim: c.into() };
        let fresh = Op::Fresh {
            instance: "i".into(),
        };
        // A deleted claim's end, an instance reset or gone: may wait.
        assert!(!needs_flush(&[
            unbind("a", RecPhase::Released),
            forget("a")
        ]));
        assert!(!needs_flush(&[forget("a"), fresh.clone()]));
        assert!(!needs_flush(&[Op::Unquarantine {
            instance: "i".into()
        }]));
        assert!(!needs_flush(&[]));
        // Anything a restart could not derive again: flushed.
        assert!(needs_flush(&[bind("a", "i")]));
        assert!(needs_flush(&[Op::Admit {
            claim: "a".into(),
            pool: "p".into(),
            user: None,
        }]));
        assert!(needs_flush(&[Op::Quarantine {
            instance: "i".into(),
            reason: "reset failed".into()
        }]));
        assert!(needs_flush(&[unbind("a", RecPhase::Expired)]));
        assert!(needs_flush(&[
            unbind("a", RecPhase::Waiting),
            fresh.clone()
        ]));
        // Another claim's deletion does not excuse this one's end.
        assert!(needs_flush(&[unbind("a", RecPhase::Released), forget("b")]));
        // One op that must be flushed takes the whole batch with it.
        assert!(needs_flush(&[forget("b"), fresh, bind("a", "j")]));
    }

    #[test]
    fn a_released_instance_is_not_bound_again_until_it_is_fresh() {
        let mut d = Durable::default();
        admit(&mut d, "a");
        admit(&mut d, "b");
        d.apply(&bind("a", "i")).expect("bind");
        d.apply(&Op::Unbind {
            claim: "a".into(),
            to: RecPhase::Released,
        })
        .expect("unbind");
        assert!(d.used.contains("i"));
        assert!(d.apply(&bind("b", "i")).is_err(), "used, not reset");
        d.apply(&Op::Fresh {
            instance: "i".into(),
        })
        .expect("fresh");
        d.apply(&bind("b", "i")).expect("bound once reset");
    }
}
