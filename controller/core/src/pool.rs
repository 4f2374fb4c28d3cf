//! How many instances a pool should create and which it should delete.

/// The phase of an instance as the engine tracks it.
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

/// Where one instance stands with respect to its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Ready, unbound, current template: can be bound now.
    Warm,
    /// Unbound, current template, not ready yet (creating or starting).
    Starting,
    /// Unbound but dead or made from an older template: to be removed.
    Doomed(DeleteReason),
    /// Bound, being reset, or quarantined: not the pool's to hand out or remove.
    Occupied,
    /// Removal in flight (an expectation).
    Deleting,
}

/// Classifies one instance. `current`: made from the pool's current template.
pub fn classify(
    phase: InstancePhase,
    current: bool,
    bound: bool,
    resetting: bool,
    quarantined: bool,
) -> Slot {
    if phase == InstancePhase::Deleting {
        Slot::Deleting
    } else if bound || resetting || quarantined {
        Slot::Occupied
    } else if phase == InstancePhase::Dead {
        Slot::Doomed(DeleteReason::Dead)
    } else if !current {
        Slot::Doomed(DeleteReason::Outdated)
    } else if phase == InstancePhase::Ready {
        Slot::Warm
    } else {
        Slot::Starting
    }
}

/// How many of a pool's instances stand in each slot (removals in flight are not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub warm: u32,
    pub starting: u32,
    pub doomed: u32,
    pub occupied: u32,
}

impl PoolCounts {
    pub fn live(&self) -> u32 {
        self.warm + self.starting + self.doomed + self.occupied
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolTarget {
    pub warm: u32,
    pub max: u32,
    /// The pool is being deleted: drain it.
    pub deleting: bool,
    /// Claims waiting for an instance of this pool.
    pub queued: u32,
    /// Surplus is taken from ready instances only, never from starting ones (an autoscaled
    /// pool scaling down: what it started it finishes).
    pub keep_starting: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// What to do with a pool. The engine picks the instances: surplus comes from `Starting` first,
/// then from the most recently ready `Warm` ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolPlan {
    pub create: u32,
    /// Remove every doomed instance.
    pub remove_doomed: bool,
    pub surplus_starting: u32,
    pub surplus_warm: u32,
    /// Remove every unbound instance (the pool is being deleted).
    pub drain: bool,
}

/// Decides creations and removals for one pool from its counts.
///
/// In-flight creations count as `starting` and in-flight removals are not counted at all (the
/// expectations), so deciding again before the runtime answers plans nothing twice. Doomed
/// instances still count against `max` until they are gone, so replacing them never overshoots.
pub fn plan_pool(target: PoolTarget, c: PoolCounts) -> PoolPlan {
    if target.deleting {
        return PoolPlan {
            drain: true,
            remove_doomed: true,
            ..PoolPlan::default()
        };
    }
    let mut plan = PoolPlan {
        remove_doomed: c.doomed > 0,
        ..PoolPlan::default()
    };
    let want_spare = target.warm.saturating_add(target.queued);
    let spare = c.warm + c.starting;
    // Above max (max lowered, or creations a crashed controller had in flight): unbound
    // instances go until the pool fits again. Doomed ones are removed anyway.
    let over_max = (spare + c.occupied).saturating_sub(target.max);
    if spare > want_spare || over_max > 0 {
        let surplus = (spare.saturating_sub(want_spare)).max(over_max.min(spare));
        plan.surplus_starting = if target.keep_starting {
            0
        } else {
            surplus.min(c.starting)
        };
        plan.surplus_warm = (surplus - plan.surplus_starting).min(c.warm);
        return plan;
    }
    let room = target.max.saturating_sub(c.live());
    plan.create = (want_spare - spare).min(room);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(warm: u32, max: u32) -> PoolTarget {
        PoolTarget {
            warm,
            max,
            deleting: false,
            queued: 0,
            keep_starting: false,
        }
    }

    fn counts(warm: u32, starting: u32, doomed: u32, occupied: u32) -> PoolCounts {
        PoolCounts {
            warm,
            starting,
            doomed,
            occupied,
        }
    }

    #[test]
    fn an_empty_pool_creates_its_warm_count() {
        assert_eq!(plan_pool(target(3, 10), counts(0, 0, 0, 0)).create, 3);
    }

    #[test]
    fn in_flight_creations_count_so_nothing_is_created_twice() {
        assert_eq!(plan_pool(target(2, 10), counts(0, 1, 0, 0)).create, 1);
        assert_eq!(plan_pool(target(2, 10), counts(0, 2, 0, 0)).create, 0);
    }

    #[test]
    fn bound_instances_do_not_count_as_warm_but_do_count_against_max() {
        assert_eq!(plan_pool(target(2, 10), counts(0, 0, 0, 1)).create, 2);
        assert_eq!(plan_pool(target(2, 2), counts(0, 0, 0, 1)).create, 1);
    }

    #[test]
    fn queued_claims_ask_for_more_instances_within_max() {
        let t = PoolTarget {
            queued: 5,
            ..target(1, 4)
        };
        assert_eq!(plan_pool(t, counts(0, 0, 0, 0)).create, 4);
    }

    #[test]
    fn outdated_and_dead_unbound_instances_are_doomed_but_bound_ones_are_not() {
        use InstancePhase::*;
        assert_eq!(
            classify(Ready, false, false, false, false),
            Slot::Doomed(DeleteReason::Outdated)
        );
        assert_eq!(classify(Ready, false, true, false, false), Slot::Occupied);
        assert_eq!(
            classify(Dead, true, false, false, false),
            Slot::Doomed(DeleteReason::Dead)
        );
        assert_eq!(classify(Ready, true, false, true, false), Slot::Occupied);
        assert_eq!(classify(Ready, true, false, false, true), Slot::Occupied);
        assert_eq!(
            classify(Starting, true, false, false, false),
            Slot::Starting
        );
        assert_eq!(
            classify(Creating, true, false, false, false),
            Slot::Starting
        );
        assert_eq!(classify(Deleting, true, true, false, false), Slot::Deleting);
    }

    #[test]
    fn doomed_instances_are_replaced_within_max() {
        let plan = plan_pool(target(1, 1), counts(0, 0, 1, 0));
        assert!(plan.remove_doomed);
        // The doomed one still counts until it is gone: no creation beyond max.
        assert_eq!(plan.create, 0);
        let plan = plan_pool(target(1, 2), counts(0, 0, 1, 0));
        assert_eq!(plan.create, 1);
    }

    #[test]
    fn surplus_is_taken_from_instances_that_are_not_ready_first() {
        let plan = plan_pool(target(1, 10), counts(2, 1, 0, 0));
        assert_eq!(plan.surplus_starting, 1);
        assert_eq!(plan.surplus_warm, 1);
        assert_eq!(plan.create, 0);
    }

    #[test]
    fn deleting_a_pool_drains_it() {
        let t = PoolTarget {
            deleting: true,
            ..target(3, 10)
        };
        let plan = plan_pool(t, counts(1, 0, 0, 1));
        assert!(plan.drain);
        assert_eq!(plan.create, 0);
    }
}
