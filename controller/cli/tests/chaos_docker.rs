#![allow(clippy::unwrap_used)]
//! Chaos under load, on the Docker Engine: claims created and released through the HTTP API
//! while the controller is killed with SIGKILL at random moments (and restarted), and while
//! the Docker daemon itself is restarted. Throughout and after: no instance is ever bound to
//! two claims, no claim once seen Bound is lost (nor any claim the API acknowledged), and no
//! container is left that the controller does not account for.
//!
//! The seed of the random schedule is printed; `CHAOS_SEED=N` replays one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::Digest;

mod api_support;
mod support;
use api_support::try_request;
use support::*;

const TOKEN: &str = "chaos-token-0123456789abcdef";
const POOL: &str = "chaos";
/// Claims held at once, at most.
const LIVE: usize = 6;

fn user() -> String {
    format!(
        "apiVersion: poolkeeper.dev/v1alpha1
kind: User
metadata: {{name: alice}}
spec: {{quota: {{maxClaims: 1000}}, tokenSha256: {}}}
",
        hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
    )
}

fn seed() -> u64 {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("CHAOS_SEED={seed}");
    seed
}

/// What the client has seen and done.
#[derive(Default)]
struct Ledger {
    /// Claims the API acknowledged (201) and the client has not released.
    live: BTreeSet<String>,
    /// Claims released by the client (DELETE acknowledged).
    released: BTreeSet<String>,
    /// The instance each live claim was first seen Bound on.
    bound_on: BTreeMap<String, String>,
    /// Operations acknowledged by the API, and those that failed for want of a controller.
    ops: u32,
    unanswered: u32,
}

impl Ledger {
    /// Checks one listing of the claims against what was seen before: a claim once seen Bound
    /// is still there, and no instance holds two live claims.
    fn observe(&mut self, claims: &[Value], dies_with_daemon: bool) {
        let mut holder: BTreeMap<String, String> = BTreeMap::new();
        let listed: BTreeSet<&str> = claims.iter().filter_map(|c| c["name"].as_str()).collect();
        for name in &self.live {
            assert!(
                listed.contains(name.as_str()),
                "claim {name}, acknowledged and never released, is gone"
            );
        }
        for c in claims {
            let name = c["name"].as_str().unwrap_or_default().to_owned();
            if !self.live.contains(&name) || c["status"]["phase"] != "Bound" {
                continue;
            }
            let instance = c["status"]["instance"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(!instance.is_empty(), "{c}");
            if let Some(other) = holder.insert(instance.clone(), name.clone()) {
                panic!("instance {instance} is bound to {other} and {name} at once");
            }
            let first = self
                .bound_on
                .entry(name.clone())
                .or_insert(instance.clone());
            // A killed controller keeps its claims' instances; a restarted daemon takes them
            // away (its containers stop with it), and the claim is bound again.
            if !dies_with_daemon {
                assert_eq!(
                    *first, instance,
                    "claim {name} moved from {first} to {instance} without a reason"
                );
            }
        }
        for name in self.bound_on.keys() {
            if self.live.contains(name) {
                let c = claims.iter().find(|c| c["name"] == name.as_str()).unwrap();
                let phase = c["status"]["phase"].as_str().unwrap_or_default();
                assert!(
                    phase == "Bound" || (dies_with_daemon && phase == "Pending"),
                    "claim {name}, seen Bound, is now {phase}: {c}"
                );
            }
        }
    }
}

/// The API's current address (it changes with each restart), once the controller serves.
fn api_addr(c: &Controller) -> Option<String> {
    c.status()?["controller"]["api"].as_str().map(str::to_owned)
}

/// One request to whichever controller runs now: None when none answers.
fn call(c: &Controller, method: &str, path: &str, body: &str) -> Option<api_support::Answer> {
    let addr = api_addr(c)?;
    let a = try_request(&addr, method, path, TOKEN, body).ok()?;
    (a.status != 0).then_some(a)
}

fn claims(c: &Controller) -> Option<Vec<Value>> {
    let a = call(c, "GET", "/api/v1/claims", "")?;
    if a.status != 200 {
        return None;
    }
    let v = a.json();
    v["items"].as_array().cloned()
}

/// Drives `ops` creations and releases; `disrupt` is called between operations and returns
/// whether it disrupted something then.
fn drive(
    c: &mut Controller,
    rng: &mut SmallRng,
    ops: u32,
    dies_with_daemon: bool,
    mut disrupt: impl FnMut(&mut Controller, &mut SmallRng, u32) -> bool,
) -> (Ledger, u32) {
    let mut ledger = Ledger::default();
    let mut disruptions = 0;
    let mut next = 0u32;
    let began = Instant::now();
    while ledger.ops < ops {
        assert!(
            began.elapsed() < Duration::from_secs(600),
            "{} of {ops} operations in 10 minutes\n{}",
            ledger.ops,
            c.log()
        );
        if disrupt(c, rng, ledger.ops) {
            disruptions += 1;
        }
        let create = ledger.live.len() < LIVE && (ledger.live.is_empty() || rng.random_bool(0.6));
        let answered = if create {
            let name = format!("c{next}");
            let body = format!(r#"{{"name": "{name}", "pool": "{POOL}"}}"#);
            match call(c, "POST", "/api/v1/claims", &body) {
                // Created, or (a retry after an unanswered attempt) already there.
                Some(a) if a.status == 201 || a.status == 200 => {
                    ledger.live.insert(name);
                    next += 1;
                    true
                }
                Some(a) if a.status == 503 => false,
                Some(a) => panic!("creating {name}: {a:?}"),
                None => false,
            }
        } else {
            let name = ledger
                .live
                .iter()
                .nth(rng.random_range(0..ledger.live.len()))
                .cloned()
                .unwrap();
            match call(c, "DELETE", &format!("/api/v1/claims/{name}"), "") {
                Some(a) if a.status == 200 || a.status == 202 || a.status == 404 => {
                    ledger.live.remove(&name);
                    ledger.bound_on.remove(&name);
                    ledger.released.insert(name);
                    true
                }
                Some(a) if a.status == 503 => false,
                Some(a) => panic!("releasing {name}: {a:?}"),
                None => false,
            }
        };
        if answered {
            ledger.ops += 1;
        } else {
            ledger.unanswered += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(list) = claims(c) {
            ledger.observe(&list, dies_with_daemon);
        }
    }
    (ledger, disruptions)
}

/// After the load: every live claim Bound on an instance of its own, and the containers on
/// the daemon exactly the instances the controller accounts for.
fn settle(c: &Controller, ledger: &mut Ledger, host: Option<&str>, dies_with_daemon: bool) {
    let began = Instant::now();
    loop {
        let list = claims(c);
        let status = c.status();
        if let (Some(list), Some(status)) = (list, status) {
            ledger.observe(&list, dies_with_daemon);
            let all_bound = ledger.live.iter().all(|n| {
                list.iter()
                    .any(|c| c["name"] == n.as_str() && c["status"]["phase"] == "Bound")
            });
            let released_gone = ledger
                .released
                .iter()
                .all(|n| !list.iter().any(|c| c["name"] == n.as_str()));
            let accounted: BTreeSet<String> = status["instances"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let containers: BTreeSet<String> = all_containers(host, &c.id).into_iter().collect();
            let warm = pool_warm(&status, POOL);
            if all_bound && released_gone && containers == accounted && warm >= 3 {
                return;
            }
            if began.elapsed() > Duration::from_secs(120) {
                panic!(
                    "did not settle: all bound {all_bound}, released gone {released_gone}, warm {warm}\n\
                     containers not accounted for: {:?}\naccounted for without a container: {:?}\n{}",
                    containers.difference(&accounted).collect::<Vec<_>>(),
                    accounted.difference(&containers).collect::<Vec<_>>(),
                    c.log()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_serving(c: &Controller) {
    let began = Instant::now();
    while claims(c).is_none() {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the controller did not serve\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_9_at_random_moments_under_claim_load_loses_nothing() {
    let _serial = serial();
    let mut rng = SmallRng::seed_from_u64(seed());
    let mut c = Controller::new(
        "e2e-chaos-kill",
        &[
            (
                "pool.yaml",
                pool_yaml(POOL, 3, 24000, 24063, "  reset: Restart\n"),
            ),
            ("user.yaml", user()),
        ],
        &["--resync", "5s"],
    );
    c.wait("warm", T, |s| pool_warm(s, POOL) == 3);
    wait_serving(&c);
    const OPS: u32 = 320;
    let mut next_kill = rng.random_range(10..40);
    let (mut ledger, kills) = drive(&mut c, &mut rng, OPS, false, |c, rng, done| {
        if done < next_kill {
            return false;
        }
        next_kill = done + rng.random_range(15..45);
        // Some moments: at once, or in the middle of what the last request started.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        c.kill9();
        c.start();
        true
    });
    settle(&c, &mut ledger, None, false);
    eprintln!(
        "chaos kill -9: {} operations, {} kills, {} requests unanswered while down, failures: 0",
        ledger.ops, kills, ledger.unanswered
    );
    assert!(kills >= 6, "only {kills} kills");
}

#[test]
fn a_docker_daemon_restarted_while_claims_arrive_loses_nothing() {
    let _serial = serial();
    let mut rng = SmallRng::seed_from_u64(seed());
    let mut d = Daemon::start("chaos", 43);
    let host = d.host();
    let mut c = Controller::new(
        "e2e-chaos-daemon",
        &[
            (
                "pool.yaml",
                pool_yaml(POOL, 3, 24100, 24163, "  reset: Restart\n"),
            ),
            ("user.yaml", user()),
        ],
        &["--docker-host", &host, "--resync", "5s"],
    );
    c.hosts = vec![Some(host.clone())];
    c.wait("warm", Duration::from_secs(60), |s| pool_warm(s, POOL) == 3);
    wait_serving(&c);
    const OPS: u32 = 320;
    let mut restarts_at = vec![rng.random_range(60..120), rng.random_range(180..260)];
    let (mut ledger, restarts) = drive(&mut c, &mut rng, OPS, true, |_, rng, done| {
        if restarts_at.first().is_none_or(|&at| done < at) {
            return false;
        }
        restarts_at.remove(0);
        d.stop();
        std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
        d.run();
        true
    });
    settle(&c, &mut ledger, Some(&host), true);
    eprintln!(
        "chaos daemon restarts: {} operations, {} restarts, {} requests unanswered, failures: 0",
        ledger.ops, restarts, ledger.unanswered
    );
    assert_eq!(restarts, 2);
}
