//! Which claims may hold an instance (users, quotas, allowed pools) and which claim gets which
//! warm instance, in arrival order.

use std::collections::HashMap;

use poolkeeper_kinds::Resources;
use poolkeeper_kinds::units::{parse_cpu_millis, parse_memory_bytes};

/// What admission needs to know about a claim that is not terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimFacts<'a> {
    pub name: &'a str,
    pub pool: &'a str,
    pub user: &'a str,
    /// Holds an instance now.
    pub bound: bool,
    /// The cpu and memory it asks for its instance (`spec.resources`).
    pub resources: Option<&'a Resources>,
}

/// What admission needs to know about a declared pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolFacts<'a> {
    /// The most a claim may ask (`spec.claimResources`); `None`: claims may not ask.
    pub claim_resources: Option<&'a Resources>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserFacts<'a> {
    pub disabled: bool,
    pub max_claims: u32,
    /// Allowed pools; empty means all.
    pub pools: &'a [String],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Not allowed to hold an instance now; re-evaluated on every reconcile, so fixing the cause
    /// (declaring the user, raising the quota) admits the claim.
    Refuse {
        reason: &'static str,
        message: String,
    },
}

/// Decides admission for `claims`, which must be in arrival order. Bound claims are always
/// admitted and count against their user's quota before any pending claim.
pub fn admit<'a>(
    claims: &[ClaimFacts<'a>],
    user: impl Fn(&str) -> Option<UserFacts<'a>>,
    pool: impl Fn(&str) -> Option<PoolFacts<'a>>,
) -> Vec<Verdict> {
    let mut active: HashMap<&str, u32> = HashMap::new();
    for c in claims.iter().filter(|c| c.bound) {
        *active.entry(c.user).or_default() += 1;
    }
    claims
        .iter()
        .map(|c| {
            if c.bound {
                return Verdict::Admit;
            }
            let n = active.entry(c.user).or_default();
            admit_next(c, user(c.user), pool(c.pool), n)
        })
        .collect()
}

/// The verdict of a claim that is not bound, coming after claims of its user that hold
/// `admitted` admissions (bound or not) in arrival order; an admitted claim is counted in. This is
/// `admit`'s rule for one claim, so that a claim arriving after all its user's others can be
/// decided from the count alone.
pub fn admit_next(
    c: &ClaimFacts<'_>,
    user: Option<UserFacts<'_>>,
    pool: Option<PoolFacts<'_>>,
    admitted: &mut u32,
) -> Verdict {
    let Some(p) = pool else {
        return Verdict::Refuse {
            reason: "PoolNotFound",
            message: format!("pool {:?} is not declared", c.pool),
        };
    };
    if let Some(r) = c.resources
        && let Err(message) = resources_within(r, p.claim_resources, c.pool)
    {
        return Verdict::Refuse {
            reason: "ResourcesNotAllowed",
            message,
        };
    }
    let Some(u) = user else {
        return Verdict::Refuse {
            reason: "UserNotFound",
            message: format!("user {:?} is not declared", c.user),
        };
    };
    if u.disabled {
        return Verdict::Refuse {
            reason: "UserDisabled",
            message: format!("user {:?} is disabled", c.user),
        };
    }
    if !u.pools.is_empty() && !u.pools.iter().any(|p| p == c.pool) {
        return Verdict::Refuse {
            reason: "PoolNotAllowed",
            message: format!(
                "user {:?} may claim only from {}",
                c.user,
                u.pools.join(", ")
            ),
        };
    }
    if *admitted >= u.max_claims {
        return Verdict::Refuse {
            reason: QUOTA_EXCEEDED,
            message: format!(
                "user {:?} already has {} active claim(s) (quota maxClaims: {})",
                c.user, admitted, u.max_claims
            ),
        };
    }
    *admitted += 1;
    Verdict::Admit
}

/// The reason of a claim refused because its user's quota is full: the one refusal that
/// depends on the user's other claims.
pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";

/// Whether a claim's `resources` lie within its pool's `claimResources`: each one it gives
/// must be bounded there, and not above the bound.
pub fn resources_within(
    asked: &Resources,
    bound: Option<&Resources>,
    pool: &str,
) -> Result<(), String> {
    let bound = bound.cloned().unwrap_or_default();
    type Parse = fn(&str) -> Result<u64, String>;
    let checks: [(&str, &Option<String>, &Option<String>, Parse); 2] = [
        ("cpu", &asked.cpu, &bound.cpu, parse_cpu_millis),
        ("memory", &asked.memory, &bound.memory, parse_memory_bytes),
    ];
    for (field, want, most, parse) in checks {
        let Some(want) = want else { continue };
        let Some(most) = most else {
            return Err(format!(
                "pool {pool:?} does not let claims set {field} (spec.claimResources.{field} is not declared)"
            ));
        };
        let (w, m) = (parse(want)?, parse(most)?);
        if w > m {
            return Err(format!(
                "{field} {want} is above what pool {pool:?} allows a claim ({most}, spec.claimResources.{field})"
            ));
        }
    }
    Ok(())
}

/// The outcome of matching a pool's waiting claims with its warm instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matching<'a> {
    pub binds: Vec<(&'a str, String)>,
    /// Claims left waiting, in order (position = index + 1).
    pub waiting: Vec<&'a str>,
}

/// Gives warm instances (in the order given: the caller puts the longest-ready first) to
/// waiting claims in arrival order.
pub fn match_claims<'a>(
    waiting: impl IntoIterator<Item = &'a str>,
    warm: impl IntoIterator<Item = String>,
) -> Matching<'a> {
    let mut warm = warm.into_iter();
    let mut m = Matching::default();
    for claim in waiting {
        match warm.next() {
            Some(i) => m.binds.push((claim, i)),
            None => m.waiting.push(claim),
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim<'a>(name: &'a str, user: &'a str) -> ClaimFacts<'a> {
        ClaimFacts {
            name,
            pool: "nginx",
            user,
            bound: false,
            resources: None,
        }
    }

    const NO_POOLS: &[String] = &[];

    fn alice(max: u32) -> impl Fn(&str) -> Option<UserFacts<'static>> {
        move |u| {
            (u == "alice").then_some(UserFacts {
                disabled: false,
                max_claims: max,
                pools: NO_POOLS,
            })
        }
    }

    #[test]
    fn a_claim_by_an_unknown_user_is_refused_with_a_reason() {
        let v = admit(&[claim("c", "bob")], alice(3), |_| {
            Some(PoolFacts::default())
        });
        assert!(matches!(
            &v[0],
            Verdict::Refuse {
                reason: "UserNotFound",
                ..
            }
        ));
    }

    fn res(cpu: Option<&str>, memory: Option<&str>) -> Resources {
        Resources {
            cpu: cpu.map(str::to_owned),
            memory: memory.map(str::to_owned),
        }
    }

    #[test]
    fn a_claim_may_ask_resources_only_within_its_pools_claim_resources() {
        let bound = res(Some("2"), Some("1Gi"));
        fn verdict<'a>(asked: &'a Resources, bound: Option<&'a Resources>) -> Verdict {
            let mut c = claim("c", "alice");
            c.resources = Some(asked);
            let user = |_: &str| {
                Some(UserFacts {
                    disabled: false,
                    max_claims: 3,
                    pools: NO_POOLS,
                })
            };
            admit(&[c], user, |_| {
                Some(PoolFacts {
                    claim_resources: bound,
                })
            })
            .remove(0)
        }
        assert_eq!(
            verdict(&res(Some("1500m"), Some("512Mi")), Some(&bound)),
            Verdict::Admit
        );
        assert_eq!(
            verdict(&res(Some("2"), None), Some(&bound)),
            Verdict::Admit,
            "at the bound"
        );
        let Verdict::Refuse { reason, message } = verdict(&res(Some("3"), None), Some(&bound))
        else {
            panic!("above the bound is admitted");
        };
        assert_eq!(reason, "ResourcesNotAllowed");
        assert!(
            message.contains("cpu 3 is above") && message.contains("(2,"),
            "{message}"
        );
        let Verdict::Refuse { message, .. } = verdict(&res(None, Some("64Mi")), None) else {
            panic!("a pool without claimResources lets claims set memory");
        };
        assert!(
            message.contains("does not let claims set memory"),
            "{message}"
        );
        let only_cpu = res(Some("2"), None);
        assert!(
            matches!(
                verdict(&res(None, Some("64Mi")), Some(&only_cpu)),
                Verdict::Refuse { .. }
            ),
            "memory is not bounded"
        );
    }

    #[test]
    fn a_claim_on_a_missing_pool_is_refused() {
        let v = admit(&[claim("c", "alice")], alice(3), |_| None);
        assert!(matches!(
            &v[0],
            Verdict::Refuse {
                reason: "PoolNotFound",
                ..
            }
        ));
    }

    #[test]
    fn quota_admits_in_arrival_order_and_counts_bound_claims_first() {
        let mut bound = claim("old", "alice");
        bound.bound = true;
        let claims = [claim("a", "alice"), bound, claim("b", "alice")];
        let v = admit(&claims, alice(2), |_| Some(PoolFacts::default()));
        assert_eq!(v[0], Verdict::Admit);
        assert_eq!(v[1], Verdict::Admit);
        match &v[2] {
            Verdict::Refuse { reason, message } => {
                assert_eq!(*reason, "QuotaExceeded");
                assert!(message.contains("maxClaims: 2"), "{message}");
            }
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    #[test]
    fn disabled_users_and_disallowed_pools_are_refused() {
        let pools = vec!["python".to_owned()];
        let users = |u: &str| {
            Some(UserFacts {
                disabled: u == "mallory",
                max_claims: 5,
                pools: &pools,
            })
        };
        let v = admit(&[claim("a", "mallory"), claim("b", "alice")], users, |_| {
            Some(PoolFacts::default())
        });
        assert!(matches!(
            &v[0],
            Verdict::Refuse {
                reason: "UserDisabled",
                ..
            }
        ));
        assert!(matches!(
            &v[1],
            Verdict::Refuse {
                reason: "PoolNotAllowed",
                ..
            }
        ));
    }

    proptest::proptest! {
        /// A claim arriving after all its user's others gets, from the count of the user's
        /// admitted claims alone, the verdict that admitting all of them again gives it; and
        /// the count moves as the full admission's does.
        #[test]
        fn the_next_claims_verdict_from_the_count_is_the_full_admissions(
            claims in proptest::collection::vec((proptest::bool::ANY, 0..3usize), 0..12),
            next_pool in 0..3usize,
            max in 0..6u32,
        ) {
            // Pool 2 is not declared: its claims are refused whatever the count.
            const POOLS: [&str; 3] = ["web", "api", "gone"];
            let pool = |p: &str| (p != "gone").then(PoolFacts::default);
            let facts: Vec<ClaimFacts<'_>> = claims
                .iter()
                .map(|&(bound, p)| ClaimFacts { bound, pool: POOLS[p], ..claim("c", "alice") })
                .collect();
            let before = admit(&facts, alice(max), pool);
            let mut admitted = before.iter().filter(|v| **v == Verdict::Admit).count() as u32;
            let next = ClaimFacts { pool: POOLS[next_pool], ..claim("next", "alice") };
            let alone = admit_next(&next, alice(max)("alice"), pool(next.pool), &mut admitted);
            let mut all = facts.clone();
            all.push(next);
            let full = admit(&all, alice(max), pool);
            proptest::prop_assert_eq!(&full[..facts.len()], &before[..], "the others' verdicts stay");
            proptest::prop_assert_eq!(full.last(), Some(&alone));
            let counted = full.iter().filter(|v| **v == Verdict::Admit).count() as u32;
            proptest::prop_assert_eq!(admitted, counted);
        }
    }

    #[test]
    fn warm_instances_go_to_claims_in_arrival_order_and_the_rest_wait() {
        let m = match_claims(["first", "second", "third"], ["i1".to_owned()]);
        assert_eq!(m.binds, vec![("first", "i1".to_owned())]);
        assert_eq!(m.waiting, vec!["second", "third"]);
    }
}
