//! Keeping a Deployment's containers running: start order by `dependsOn` and readiness, restart
//! policy with crash-loop backoff.

use std::collections::BTreeSet;
use std::time::Duration;

use poolkeeper_kinds::{ContainerSpec, RestartPolicy};

/// Container names in an order where each comes after everything it depends on.
pub fn start_order(containers: &[ContainerSpec]) -> Vec<&str> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::new();
    while order.len() < containers.len() {
        let before = order.len();
        for c in containers {
            if !done.contains(c.name.as_str())
                && c.depends_on.iter().all(|d| done.contains(d.as_str()))
            {
                done.insert(&c.name);
                order.push(c.name.as_str());
            }
        }
        if order.len() == before {
            // A cycle (rejected by validation); append the rest rather than loop forever.
            order.extend(
                containers
                    .iter()
                    .map(|c| c.name.as_str())
                    .filter(|n| !done.contains(n)),
            );
            break;
        }
    }
    order
}

/// Whether a volume source is a host path (bind mount) rather than a named volume.
pub fn is_host_path(source: &str) -> bool {
    source.starts_with('/') || source.starts_with('.')
}

/// The runtime's name of deployment `dep`'s named volume `volume`: scoped to the deployment, as
/// Compose does, so that two deployments never share data by accident and deleting one removes
/// only its own.
pub fn volume_name(dep: &str, volume: &str) -> String {
    format!("{dep}_{volume}")
}

/// Whether a matching log line starts a new burst (and so fires its trigger): the first match,
/// or one after at least `quiet_ms` without any.
pub fn burst_starts(last_match_ms: Option<u64>, now_ms: u64, quiet_ms: u64) -> bool {
    last_match_ms.is_none_or(|last| now_ms.saturating_sub(last) >= quiet_ms)
}

/// Whether an exited container should be started again under its restart policy.
pub fn should_restart(policy: RestartPolicy, exit_code: Option<i64>) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => exit_code != Some(0),
        RestartPolicy::Never => false,
    }
}

/// Why 10 s doubling to 5 min: the kubelet's crash-loop schedule, which users already know.
pub const BACKOFF_BASE: Duration = Duration::from_secs(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Delay before restart number `restarts + 1`: none for the first restart, then doubling.
pub fn backoff(restarts: u32) -> Duration {
    if restarts == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (restarts - 1).min(10);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// The instance of a replica made from the current spec, as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Current {
    /// Being created (the runtime has not answered yet).
    Creating,
    Starting,
    Ready,
    Exited {
        code: Option<i64>,
    },
}

/// What remains of a replica's instances made from an older spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Old {
    None,
    /// At least one is running and ready: it serves while its replacement starts.
    Ready,
    /// Starting, or exited: nothing worth keeping during an update.
    NotReady,
}

/// One declared container replica: its current instance, older ones, and whether one of its
/// instances is still being removed (its name and host ports are not free yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub current: Option<Current>,
    pub old: Old,
    pub removing: bool,
}

/// What the planner needs besides the slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotContext {
    /// Dependencies not settled yet (not every replica current and ready): a replica is made
    /// (or replaced) only once there are none.
    pub deps_waiting: Vec<String>,
    /// Dependencies with no ready instance at all (old or current): an exited replica is
    /// restarted once there are none, so a dependency in the middle of an update, or with one
    /// replica of two down, still serving, holds no restart back.
    pub deps_down: Vec<String>,
    /// `strategy: RollingUpdate` and no fixed host port (two containers cannot hold one
    /// host port, so those are replaced stop-first).
    pub surge: bool,
    pub restarts: u32,
    /// How long ago the current instance exited.
    pub since_exit: Duration,
    /// The current instance exited because the engine stopped it (declared `stopped`): once
    /// no longer declared stopped, it is started again whatever its restart policy.
    pub stopped_here: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create the current instance (beside an old one, during a rolling update).
    Create,
    /// Remove the old instances (the current one is ready, or the update is stop-first).
    RemoveOld,
    Restart,
    /// Stop the current instance and keep it (the container is declared `stopped`).
    Stop,
    /// Waiting for dependencies to be ready.
    WaitDeps(Vec<String>),
    /// Restart held back until the backoff has passed.
    Backoff(Duration),
    Keep,
}

/// Plans one container replica.
///
/// Updates replace only the replicas whose spec changed, and a container's replacement begins
/// only once its dependencies are settled, so changed containers are replaced in dependency
/// order. With surge, the replacement must be ready before the old instance goes; a
/// replacement that never gets ready leaves the old one serving.
pub fn plan_slot(spec: &ContainerSpec, slot: &Slot, cx: &SlotContext) -> Step {
    let waiting = || Step::WaitDeps(cx.deps_waiting.clone());
    if spec.stopped {
        // Declared stopped: a running instance is stopped, none is made, an exited one stays.
        return match &slot.current {
            Some(Current::Creating | Current::Starting | Current::Ready) => Step::Stop,
            _ if slot.old != Old::None && !slot.removing => Step::RemoveOld,
            _ => Step::Keep,
        };
    }
    match &slot.current {
        None if slot.removing && slot.old == Old::None => Step::Keep,
        None if !cx.deps_waiting.is_empty() => waiting(),
        None if slot.old == Old::None => Step::Create,
        None if slot.old == Old::Ready && cx.surge => Step::Create,
        None if slot.removing => Step::Keep,
        None => Step::RemoveOld,
        Some(Current::Creating | Current::Starting) => Step::Keep,
        Some(Current::Ready) if slot.old != Old::None => Step::RemoveOld,
        Some(Current::Ready) => Step::Keep,
        Some(Current::Exited { .. }) if cx.stopped_here => {
            // Started again after an operator's stop: at once, whatever the policy.
            if cx.deps_down.is_empty() {
                Step::Restart
            } else {
                Step::WaitDeps(cx.deps_down.clone())
            }
        }
        Some(Current::Exited { code }) => {
            if !should_restart(spec.restart_policy, *code) {
                // Finished as its policy wants: nothing older stays for it.
                return if slot.old == Old::None {
                    Step::Keep
                } else {
                    Step::RemoveOld
                };
            }
            if !cx.deps_down.is_empty() {
                return Step::WaitDeps(cx.deps_down.clone());
            }
            let wait = backoff(cx.restarts);
            if cx.since_exit < wait {
                Step::Backoff(wait - cx.since_exit)
            } else {
                Step::Restart
            }
        }
    }
}

/// Containers in the order a deleted deployment stops them: a container goes only once every
/// container that depends on it is gone. Returns the containers that may be stopped now, given
/// those still present.
pub fn stoppable<'a>(containers: &'a [ContainerSpec], present: &BTreeSet<&str>) -> Vec<&'a str> {
    containers
        .iter()
        .filter(|c| present.contains(c.name.as_str()))
        .filter(|c| {
            !containers.iter().any(|other| {
                other.name != c.name
                    && present.contains(other.name.as_str())
                    && other.depends_on.contains(&c.name)
            })
        })
        .map(|c| c.name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, deps: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: "img".to_owned(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            replicas: 1,
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn start_order_puts_dependencies_first() {
        let cs = [
            c("web", &["api"]),
            c("api", &["db", "cache"]),
            c("db", &[]),
            c("cache", &[]),
        ];
        let order = start_order(&cs);
        let pos = |n| order.iter().position(|x| *x == n).expect("present");
        assert!(pos("db") < pos("api") && pos("cache") < pos("api") && pos("api") < pos("web"));
    }

    fn cx(deps: &[&str], surge: bool) -> SlotContext {
        SlotContext {
            deps_waiting: deps.iter().map(|d| d.to_string()).collect(),
            deps_down: deps.iter().map(|d| d.to_string()).collect(),
            surge,
            restarts: 0,
            since_exit: Duration::ZERO,
            stopped_here: false,
        }
    }

    #[test]
    fn a_container_declared_stopped_is_stopped_kept_and_started_again_in_place() {
        let mut web = c("web", &[]);
        web.stopped = true;
        web.restart_policy = RestartPolicy::Always;
        // Running (or on its way): stop it.
        for cur in [Current::Creating, Current::Starting, Current::Ready] {
            let s = slot(Some(cur), Old::None, false);
            assert_eq!(plan_slot(&web, &s, &cx(&[], true)), Step::Stop);
        }
        // Stopped: kept as it is, whatever its policy; none is made.
        let exited = slot(Some(Current::Exited { code: Some(137) }), Old::None, false);
        assert_eq!(plan_slot(&web, &exited, &cx(&[], true)), Step::Keep);
        assert_eq!(
            plan_slot(&web, &slot(None, Old::None, false), &cx(&[], true)),
            Step::Keep
        );
        // Started again: at once, even with a policy that would not restart it...
        web.stopped = false;
        web.restart_policy = RestartPolicy::Never;
        let started = SlotContext {
            stopped_here: true,
            ..cx(&[], true)
        };
        assert_eq!(plan_slot(&web, &exited, &started), Step::Restart);
        // ...once its dependencies are ready.
        let waiting = SlotContext {
            stopped_here: true,
            ..cx(&["db"], true)
        };
        assert_eq!(
            plan_slot(&web, &exited, &waiting),
            Step::WaitDeps(vec!["db".to_owned()])
        );
        // An exit the engine did not cause follows the policy as before.
        assert_eq!(plan_slot(&web, &exited, &cx(&[], true)), Step::Keep);
    }

    fn slot(current: Option<Current>, old: Old, removing: bool) -> Slot {
        Slot {
            current,
            old,
            removing,
        }
    }

    #[test]
    fn an_exited_container_is_restarted_while_its_dependency_is_unsettled_but_serving() {
        let mut web = c("web", &["db"]);
        web.restart_policy = RestartPolicy::Always;
        let exited = slot(Some(Current::Exited { code: Some(1) }), Old::None, false);
        // db is being updated (its replacement not ready yet) but its old instance serves.
        let serving = SlotContext {
            since_exit: Duration::from_secs(60),
            deps_down: Vec::new(),
            ..cx(&["db"], true)
        };
        assert_eq!(plan_slot(&web, &exited, &serving), Step::Restart);
        // ...but nothing of db is ready: wait for it.
        let down = SlotContext {
            since_exit: Duration::from_secs(60),
            ..cx(&["db"], true)
        };
        assert_eq!(
            plan_slot(&web, &exited, &down),
            Step::WaitDeps(vec!["db".to_owned()])
        );
        // A missing replica is still made only once db is settled.
        let missing = slot(None, Old::None, false);
        assert_eq!(
            plan_slot(&web, &missing, &serving),
            Step::WaitDeps(vec!["db".to_owned()])
        );
    }

    #[test]
    fn a_container_waits_until_its_dependencies_are_ready() {
        let web = c("web", &["db"]);
        let missing = slot(None, Old::None, false);
        let step = plan_slot(&web, &missing, &cx(&["db"], true));
        assert_eq!(step, Step::WaitDeps(vec!["db".to_owned()]));
        assert_eq!(plan_slot(&web, &missing, &cx(&[], true)), Step::Create);
        // A removal still in progress holds the name and ports: wait for it.
        let removing = slot(None, Old::None, true);
        assert_eq!(plan_slot(&web, &removing, &cx(&[], true)), Step::Keep);
    }

    #[test]
    fn a_rolling_update_removes_the_old_instance_only_once_the_new_one_is_ready() {
        let web = c("web", &[]);
        // Old one serving, no replacement yet: create it beside.
        let s = slot(None, Old::Ready, false);
        assert_eq!(plan_slot(&web, &s, &cx(&[], true)), Step::Create);
        // Replacement starting: the old one stays.
        for cur in [Current::Creating, Current::Starting] {
            let s = slot(Some(cur), Old::Ready, false);
            assert_eq!(plan_slot(&web, &s, &cx(&[], true)), Step::Keep);
        }
        // Replacement ready: now the old one goes.
        let s = slot(Some(Current::Ready), Old::Ready, false);
        assert_eq!(plan_slot(&web, &s, &cx(&[], true)), Step::RemoveOld);
        // A replacement that crashes keeps the old one serving (and is restarted).
        let s = slot(Some(Current::Exited { code: Some(1) }), Old::Ready, false);
        assert_eq!(plan_slot(&web, &s, &cx(&[], true)), Step::Restart);
    }

    #[test]
    fn recreate_and_host_ports_stop_the_old_instance_first() {
        let web = c("web", &[]);
        let s = slot(None, Old::Ready, false);
        assert_eq!(plan_slot(&web, &s, &cx(&[], false)), Step::RemoveOld);
        // Removal in progress: the name and ports are not free yet.
        let s = slot(None, Old::None, true);
        assert_eq!(plan_slot(&web, &s, &cx(&[], false)), Step::Keep);
        // An old instance that is not serving is not worth keeping, even with surge.
        let s = slot(None, Old::NotReady, false);
        assert_eq!(plan_slot(&web, &s, &cx(&[], true)), Step::RemoveOld);
    }

    #[test]
    fn a_replacement_waits_for_its_dependencies_to_settle_and_the_old_one_keeps_serving() {
        let web = c("web", &["db"]);
        let s = slot(None, Old::Ready, false);
        let step = plan_slot(&web, &s, &cx(&["db"], true));
        assert_eq!(step, Step::WaitDeps(vec!["db".to_owned()]));
    }

    #[test]
    fn restart_policies_decide_on_the_exit_code() {
        assert!(should_restart(RestartPolicy::Always, Some(0)));
        assert!(!should_restart(RestartPolicy::OnFailure, Some(0)));
        assert!(should_restart(RestartPolicy::OnFailure, Some(137)));
        assert!(!should_restart(RestartPolicy::Never, Some(1)));
        let mut job = c("job", &[]);
        job.restart_policy = RestartPolicy::OnFailure;
        let done = slot(Some(Current::Exited { code: Some(0) }), Old::None, false);
        assert_eq!(plan_slot(&job, &done, &cx(&[], true)), Step::Keep);
    }

    #[test]
    fn crash_loops_back_off_exponentially_up_to_five_minutes() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(9), Duration::from_secs(300));
        let crashing = c("x", &[]);
        let exited = slot(Some(Current::Exited { code: Some(1) }), Old::None, false);
        let mut context = cx(&[], true);
        context.restarts = 2;
        context.since_exit = Duration::from_secs(5);
        let step = plan_slot(&crashing, &exited, &context);
        assert_eq!(step, Step::Backoff(Duration::from_secs(15)));
        context.since_exit = Duration::from_secs(25);
        assert_eq!(plan_slot(&crashing, &exited, &context), Step::Restart);
    }

    #[test]
    fn matching_lines_close_together_are_one_burst() {
        assert!(burst_starts(None, 0, 5_000));
        assert!(!burst_starts(Some(1_000), 2_000, 5_000));
        assert!(!burst_starts(Some(1_000), 5_999, 5_000));
        assert!(burst_starts(Some(1_000), 6_000, 5_000));
    }

    #[test]
    fn a_deleted_deployment_stops_dependents_before_their_dependencies() {
        let cs = [c("web", &["api"]), c("api", &["db"]), c("db", &[])];
        let all: BTreeSet<&str> = ["web", "api", "db"].into();
        assert_eq!(stoppable(&cs, &all), vec!["web"]);
        let rest: BTreeSet<&str> = ["api", "db"].into();
        assert_eq!(stoppable(&cs, &rest), vec!["api"]);
        let last: BTreeSet<&str> = ["db"].into();
        assert_eq!(stoppable(&cs, &last), vec!["db"]);
    }
}
