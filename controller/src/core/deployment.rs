//! Keeping a Deployment's containers running: start order by `dependsOn` and readiness, restart
//! policy with crash-loop backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::api::{ContainerSpec, RestartPolicy};

/// Returns a dependency cycle among containers, if any, as the names along it.
pub fn find_cycle(containers: &[ContainerSpec]) -> Option<Vec<String>> {
    let deps: BTreeMap<&str, &[String]> = containers
        .iter()
        .map(|c| (c.name.as_str(), c.depends_on.as_slice()))
        .collect();
    // Colours: 1 = on the current path, 2 = done.
    let mut colour: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a str,
        deps: &BTreeMap<&'a str, &'a [String]>,
        colour: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match colour.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        colour.insert(n, 1);
        path.push(n);
        for d in deps.get(n).copied().unwrap_or_default() {
            if deps.contains_key(d.as_str())
                && let Some(c) = visit(d, deps, colour, path)
            {
                return Some(c);
            }
        }
        path.pop();
        colour.insert(n, 2);
        None
    }
    for c in containers {
        if let Some(cycle) = visit(&c.name, &deps, &mut colour, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

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

/// The state of one declared container replica, as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    Missing,
    /// Exists but made from an older spec.
    Outdated,
    Starting,
    Ready,
    Exited {
        code: Option<i64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create,
    /// Remove the outdated one (and create the new one on a later pass).
    Replace,
    Restart,
    /// Waiting for dependencies to be ready.
    WaitDeps(Vec<String>),
    /// Restart held back until the backoff has passed.
    Backoff(Duration),
    Keep,
}

/// Plans one container replica. `since_exit` is how long ago it exited.
pub fn plan_container(
    spec: &ContainerSpec,
    observed: &Observed,
    deps_ready: &dyn Fn(&str) -> bool,
    restarts: u32,
    since_exit: Duration,
) -> Step {
    let waiting: Vec<String> = spec
        .depends_on
        .iter()
        .filter(|d| !deps_ready(d))
        .cloned()
        .collect();
    match observed {
        Observed::Missing if !waiting.is_empty() => Step::WaitDeps(waiting),
        Observed::Missing => Step::Create,
        Observed::Outdated => Step::Replace,
        Observed::Starting | Observed::Ready => Step::Keep,
        Observed::Exited { code } => {
            if !should_restart(spec.restart_policy, *code) {
                return Step::Keep;
            }
            if !waiting.is_empty() {
                return Step::WaitDeps(waiting);
            }
            let wait = backoff(restarts);
            if since_exit < wait {
                Step::Backoff(wait - since_exit)
            } else {
                Step::Restart
            }
        }
    }
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
    fn cycles_are_found_and_named() {
        let cs = [c("a", &["b"]), c("b", &["c"]), c("c", &["a"])];
        let cycle = find_cycle(&cs).expect("cycle");
        assert_eq!(cycle.first(), cycle.last());
        assert_eq!(cycle.len(), 4);
        assert!(find_cycle(&[c("a", &["b"]), c("b", &[])]).is_none());
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

    #[test]
    fn a_container_waits_until_its_dependencies_are_ready() {
        let web = c("web", &["db"]);
        let step = plan_container(&web, &Observed::Missing, &|_| false, 0, Duration::ZERO);
        assert_eq!(step, Step::WaitDeps(vec!["db".to_owned()]));
        let step = plan_container(&web, &Observed::Missing, &|_| true, 0, Duration::ZERO);
        assert_eq!(step, Step::Create);
    }

    #[test]
    fn restart_policies_decide_on_the_exit_code() {
        assert!(should_restart(RestartPolicy::Always, Some(0)));
        assert!(!should_restart(RestartPolicy::OnFailure, Some(0)));
        assert!(should_restart(RestartPolicy::OnFailure, Some(137)));
        assert!(!should_restart(RestartPolicy::Never, Some(1)));
    }

    #[test]
    fn crash_loops_back_off_exponentially_up_to_five_minutes() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(9), Duration::from_secs(300));
        let crashing = c("x", &[]);
        let exited = Observed::Exited { code: Some(1) };
        let step = plan_container(&crashing, &exited, &|_| true, 2, Duration::from_secs(5));
        assert_eq!(step, Step::Backoff(Duration::from_secs(15)));
        let step = plan_container(&crashing, &exited, &|_| true, 2, Duration::from_secs(25));
        assert_eq!(step, Step::Restart);
    }
}
