//! A claim's `resources`: admitted only within its pool's `claimResources`, set on the
//! instance in place before the claim is reported Bound, and the template's given back by a
//! reset that keeps the instance.

mod common;

use common::*;
use poolkeeper_kinds::{ClaimPhase, Kind, ResetPolicy, Resources, Spec};

fn res(cpu: &str, memory: &str) -> Resources {
    Resources {
        cpu: Some(cpu.to_owned()),
        memory: Some(memory.to_owned()),
    }
}

/// A pool whose instances are kept across claims (`Restart`), 500m and 256Mi each, that lets a
/// claim ask up to 2 cpus and 1Gi.
fn sized() -> Sim {
    let mut sim = Sim::new();
    sim.apply("u", Spec::User(user(10)));
    let mut p = pool("img", 1, Some(1));
    p.template.resources = Some(res("500m", "256Mi"));
    p.claim_resources = Some(res("2", "1Gi"));
    p.reset = ResetPolicy::Restart;
    sim.apply("p", Spec::Pool(p));
    sim
}

#[tokio::test]
async fn a_claims_resources_are_set_at_bind_and_the_templates_given_back_at_reset() {
    let mut sim = sized();
    sim.wait_warm("p", 1).await;
    let mut c = claim("p", "u");
    c.resources = Some(res("1500m", "512Mi"));
    sim.apply("c1", Spec::Claim(c));
    let i = sim.wait_bound("c1").await;
    assert_eq!(
        sim.mem.resources(&i),
        Some((Some(1500), Some(512 << 20))),
        "the claim's, by the time it is Bound"
    );
    sim.delete(Kind::Claim, "c1");
    sim.wait_until("the instance is warm again with the template's", |_, _| {
        sim.mem.resources(&i) == Some((Some(500), Some(256 << 20)))
    })
    .await;
    let snap = sim.wait_warm("p", 1).await;
    assert!(
        snap.instances.iter().any(|x| x.name == i),
        "kept, not replaced"
    );
}

#[tokio::test]
async fn a_claim_asking_more_than_its_pool_allows_is_not_admitted_until_it_asks_less() {
    let mut sim = sized();
    sim.wait_warm("p", 1).await;
    let mut c = claim("p", "u");
    c.resources = Some(res("4", "512Mi"));
    sim.apply("c1", Spec::Claim(c.clone()));
    let snap = sim
        .wait_until("c1 refused", |snap, _| {
            claim_status(snap, "c1").is_some_and(|s| {
                condition(&s.conditions, "Admitted")
                    .is_some_and(|a| a.status == "False" && a.reason == "ResourcesNotAllowed")
            })
        })
        .await;
    let st = claim_status(&snap, "c1").expect("c1");
    assert_eq!(
        st.phase,
        ClaimPhase::Failed,
        "as every refusal, until mended"
    );
    let admitted = condition(&st.conditions, "Admitted").expect("Admitted");
    assert!(
        admitted.message.contains("cpu 4 is above") && admitted.message.contains("claimResources"),
        "{}",
        admitted.message
    );
    c.resources = Some(res("2", "1Gi"));
    sim.apply("c1", Spec::Claim(c));
    let i = sim.wait_bound("c1").await;
    assert_eq!(sim.mem.resources(&i), Some((Some(2000), Some(1 << 30))));
}

#[tokio::test]
async fn a_pool_without_claim_resources_refuses_a_claim_that_asks() {
    let mut sim = Sim::new();
    sim.apply("u", Spec::User(user(10)));
    sim.apply("p", Spec::Pool(pool("img", 1, Some(2))));
    let mut c = claim("p", "u");
    c.resources = Some(Resources {
        cpu: None,
        memory: Some("64Mi".into()),
    });
    sim.apply("c1", Spec::Claim(c));
    let snap = sim
        .wait_until("c1 refused", |snap, _| {
            claim_status(snap, "c1").is_some_and(|s| {
                condition(&s.conditions, "Admitted").is_some_and(|a| {
                    a.reason == "ResourcesNotAllowed"
                        && a.message.contains("does not let claims set memory")
                })
            })
        })
        .await;
    assert_eq!(bindings(&snap).get("c1"), None);
}

#[tokio::test]
async fn a_bound_claims_changed_resources_resize_its_instance_in_place() {
    let mut sim = sized();
    sim.wait_warm("p", 1).await;
    let mut c = claim("p", "u");
    c.resources = Some(res("1", "512Mi"));
    sim.apply("c1", Spec::Claim(c.clone()));
    let i = sim.wait_bound("c1").await;
    assert_eq!(sim.mem.resources(&i), Some((Some(1000), Some(512 << 20))));

    // More, within the pool's bound: the same instance, resized, still Bound.
    c.resources = Some(res("1500m", "1Gi"));
    sim.apply("c1", Spec::Claim(c.clone()));
    sim.wait_until("resized to the claim's new resources", |_, _| {
        sim.mem.resources(&i) == Some((Some(1500), Some(1 << 30)))
    })
    .await;
    let snap = sim
        .wait_until("the resize said on the claim", |snap, _| {
            events_of(snap, Kind::Claim, "c1")
                .iter()
                .any(|e| e.reason == "Resized")
        })
        .await;
    assert_eq!(bindings(&snap).get("c1"), Some(&i), "kept its instance");

    // More than the pool allows: refused with an Event; the instance keeps what it has.
    c.resources = Some(res("3", "1Gi"));
    sim.apply("c1", Spec::Claim(c.clone()));
    let snap = sim
        .wait_until("the change refused", |snap, _| {
            events_of(snap, Kind::Claim, "c1")
                .iter()
                .any(|e| e.reason == "ResourcesNotAllowed" && e.message.contains("cpu 3"))
        })
        .await;
    assert_eq!(sim.mem.resources(&i), Some((Some(1500), Some(1 << 30))));
    assert_eq!(
        claim_status(&snap, "c1").map(|s| s.phase),
        Some(ClaimPhase::Bound),
        "a refused change does not end the binding"
    );

    // Only memory given: cpu goes back to the template's.
    c.resources = Some(Resources {
        cpu: None,
        memory: Some("768Mi".into()),
    });
    sim.apply("c1", Spec::Claim(c));
    sim.wait_until("cpu back to the template's, memory the claim's", |_, _| {
        sim.mem.resources(&i) == Some((Some(500), Some(768 << 20)))
    })
    .await;
}
