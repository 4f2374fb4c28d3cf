//! How many instances a pool should create and which it should delete.

/// What the pool decision needs to know about one instance of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceFacts {
    pub id: String,
    /// Made from the current template.
    pub current: bool,
    pub phase: InstancePhase,
    /// Bound to a claim (or being handed to one).
    pub bound: bool,
    /// Held out of the pool after a failed reset; kept for inspection until removed by hand or
    /// until the pool is deleted.
    pub quarantined: bool,
    /// Being reset after its claim ended (restart or exec in progress).
    pub resetting: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstancePhase {
    /// Requested from the runtime, not yet confirmed (an expectation).
    Creating,
    /// Running, readiness not (yet) passing.
    Starting,
    Ready,
    /// Exited or failed.
    Dead,
    /// Removal requested.
    Deleting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolTarget {
    pub warm: u32,
    pub max: u32,
    /// The pool is being deleted: drain it.
    pub deleting: bool,
    /// Claims waiting for an instance of this pool.
    pub queued: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// Exited or failed while unbound: replace it.
    Dead,
    /// Made from an older template and not bound.
    Outdated,
    /// More unbound instances than the pool wants.
    Surplus,
    /// The pool is being deleted.
    Drain,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolPlan {
    pub create: u32,
    pub delete: Vec<(String, DeleteReason)>,
}

/// Decides creations and deletions for one pool.
///
/// In-flight creations appear as `Creating` instances and in-flight removals as `Deleting`
/// (the expectations), so calling this again before the runtime answers plans nothing twice.
pub fn plan_pool(target: PoolTarget, instances: &[InstanceFacts]) -> PoolPlan {
    let mut plan = PoolPlan::default();
    let live = |i: &&InstanceFacts| i.phase != InstancePhase::Deleting;
    if target.deleting {
        for i in instances.iter().filter(live) {
            if !i.bound {
                plan.delete.push((i.id.clone(), DeleteReason::Drain));
            }
        }
        return plan;
    }
    // Unbound candidates that will serve claims: current template, alive, not held back.
    let mut spare: Vec<&InstanceFacts> = Vec::new();
    for i in instances.iter().filter(live) {
        if i.bound || i.quarantined || i.resetting {
            // Occupied: counts against max below, never a candidate.
        } else if i.phase == InstancePhase::Dead {
            plan.delete.push((i.id.clone(), DeleteReason::Dead));
        } else if !i.current {
            plan.delete.push((i.id.clone(), DeleteReason::Outdated));
        } else {
            spare.push(i);
        }
    }
    let want_spare = target.warm.saturating_add(target.queued);
    let spare_n = spare.len() as u32;
    if spare_n > want_spare {
        // Shrink: drop instances that are not ready first, then the newest (last listed).
        spare.sort_by_key(|i| i.phase == InstancePhase::Ready);
        for i in spare.iter().take((spare_n - want_spare) as usize) {
            plan.delete.push((i.id.clone(), DeleteReason::Surplus));
        }
        return plan;
    }
    // Replacements for deleted-but-still-counted instances are allowed only once they are gone,
    // so the cap counts every live instance, including the ones this plan deletes.
    let live_total = instances.iter().filter(live).count() as u32;
    let room = target.max.saturating_sub(live_total);
    plan.create = (want_spare - spare_n).min(room);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str) -> InstanceFacts {
        InstanceFacts {
            id: id.to_owned(),
            current: true,
            phase: InstancePhase::Ready,
            bound: false,
            quarantined: false,
            resetting: false,
        }
    }

    fn target(warm: u32, max: u32) -> PoolTarget {
        PoolTarget {
            warm,
            max,
            deleting: false,
            queued: 0,
        }
    }

    #[test]
    fn an_empty_pool_creates_its_warm_count() {
        assert_eq!(plan_pool(target(3, 10), &[]).create, 3);
    }

    #[test]
    fn in_flight_creations_count_so_nothing_is_created_twice() {
        let creating = InstanceFacts {
            phase: InstancePhase::Creating,
            ..inst("a")
        };
        let plan = plan_pool(target(2, 10), &[creating]);
        assert_eq!(plan.create, 1);
    }

    #[test]
    fn bound_instances_do_not_count_as_warm_but_do_count_against_max() {
        let bound = InstanceFacts {
            bound: true,
            ..inst("a")
        };
        assert_eq!(plan_pool(target(2, 10), std::slice::from_ref(&bound)).create, 2);
        assert_eq!(plan_pool(target(2, 2), &[bound]).create, 1);
    }

    #[test]
    fn queued_claims_ask_for_more_instances_within_max() {
        let t = PoolTarget {
            queued: 5,
            ..target(1, 4)
        };
        assert_eq!(plan_pool(t, &[]).create, 4);
    }

    #[test]
    fn a_changed_template_replaces_unbound_instances_but_never_bound_ones() {
        let old_warm = InstanceFacts {
            current: false,
            ..inst("old-warm")
        };
        let old_bound = InstanceFacts {
            current: false,
            bound: true,
            ..inst("old-bound")
        };
        let plan = plan_pool(target(1, 10), &[old_warm, old_bound]);
        assert_eq!(
            plan.delete,
            vec![("old-warm".to_owned(), DeleteReason::Outdated)]
        );
        assert_eq!(plan.create, 1);
    }

    #[test]
    fn dead_unbound_instances_are_replaced() {
        let dead = InstanceFacts {
            phase: InstancePhase::Dead,
            ..inst("d")
        };
        let plan = plan_pool(target(1, 1), &[dead]);
        assert_eq!(plan.delete, vec![("d".to_owned(), DeleteReason::Dead)]);
        // The cap still counts the dead one until it is gone: no creation beyond max.
        assert_eq!(plan.create, 0);
    }

    #[test]
    fn surplus_prefers_removing_instances_that_are_not_ready() {
        let starting = InstanceFacts {
            phase: InstancePhase::Starting,
            ..inst("s")
        };
        let plan = plan_pool(target(1, 10), &[inst("r"), starting]);
        assert_eq!(plan.delete, vec![("s".to_owned(), DeleteReason::Surplus)]);
        assert_eq!(plan.create, 0);
    }

    #[test]
    fn deleting_a_pool_drains_unbound_instances_and_keeps_bound_ones() {
        let bound = InstanceFacts {
            bound: true,
            ..inst("b")
        };
        let t = PoolTarget {
            deleting: true,
            ..target(3, 10)
        };
        let plan = plan_pool(t, &[inst("w"), bound]);
        assert_eq!(plan.delete, vec![("w".to_owned(), DeleteReason::Drain)]);
        assert_eq!(plan.create, 0);
    }

    #[test]
    fn instances_being_deleted_are_not_deleted_again() {
        let going = InstanceFacts {
            phase: InstancePhase::Deleting,
            ..inst("g")
        };
        let plan = plan_pool(target(0, 10), &[going]);
        assert!(plan.delete.is_empty());
    }
}
