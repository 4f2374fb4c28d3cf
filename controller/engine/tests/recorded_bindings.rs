//! Runtimes that keep bindings on the instances (the pod runtime; here the memory runtime
//! with `keep_bindings`): a claim is reported Bound only once its instance records it, a
//! controller started with an empty store adopts every recorded binding and resets those of
//! claims that are gone, and an instance another controller took is left alone.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use poolkeeper_kinds::{ClaimPhase, Kind, ObjKey, ResetPolicy, Spec};
use poolkeeper_runtime::memory::MemoryConfig;
use poolkeeper_runtime::{
    LABEL_BOUND_AT, LABEL_CLAIM, LABEL_QUARANTINED, LABEL_USER, RecordedBinding, Runtime,
    RuntimeError,
};

/// A runtime that records bindings on its instances, and the user `u`.
fn keeping_bindings() -> Sim {
    let mut sim = Sim::with_config(MemoryConfig {
        keep_bindings: true,
        ..MemoryConfig::default()
    });
    sim.apply("u", Spec::User(user(10)));
    sim
}

fn recording() -> Sim {
    let mut sim = keeping_bindings();
    sim.apply("p", Spec::Pool(pool("img", 3, Some(8))));
    sim
}

/// Sets (or with `None` removes) a label of `instance` unseen by the running controller, as
/// another version left it while none ran.
fn relabel_unseen(sim: &Sim, instance: &str, key: &str, value: Option<&str>) {
    sim.mem.drop_events(true);
    assert!(
        sim.mem.set_label(instance, key, value),
        "{instance} is gone"
    );
    sim.mem.drop_events(false);
}

/// `claim` is bound to `instance` again, from the instance's record.
async fn assert_recovered(sim: &Sim, claim: &str, instance: &str) {
    assert_eq!(sim.wait_bound(claim).await, instance);
    let snap = sim.snapshot().await;
    let events = events_of(&snap, Kind::Claim, claim);
    assert!(
        events.iter().any(|e| e.reason == "BindingRecovered"),
        "{events:?}"
    );
}

/// Which instance records which claim.
fn recorded(sim: &Sim) -> std::collections::BTreeMap<String, String> {
    sim.mem
        .instances()
        .into_iter()
        .filter_map(|i| Some((i.label(LABEL_CLAIM)?.to_owned(), i.name.clone())))
        .collect()
}

/// A recording pool of three, warm, and the claim `c1` bound: with the instance it holds.
async fn c1_bound() -> (Sim, String) {
    let mut sim = recording();
    sim.wait_warm("p", 3).await;
    sim.apply("c1", Spec::Claim(claim("p", "u")));
    let bound = sim.wait_bound("c1").await;
    (sim, bound)
}

/// The instances other than `bound`.
fn others(sim: &Sim, bound: &str) -> Vec<String> {
    sim.mem
        .instances()
        .into_iter()
        .map(|i| i.name)
        .filter(|n| n != bound)
        .collect()
}

#[tokio::test]
async fn a_claim_is_reported_bound_only_once_its_instance_records_it() {
    let mut sim = recording();
    sim.wait_warm("p", 3).await;
    // Each bind takes a while, as a patch to an API server does.
    sim.rt.bind_delay_ms.store(100, Ordering::SeqCst);
    for c in ["c1", "c2", "c3"] {
        sim.apply(c, Spec::Claim(claim("p", "u")));
    }
    // Every snapshot taken while they bind: a Bound claim's instance records it.
    let mut seen_binding = false;
    for _ in 0..100 {
        let snap = sim.snapshot().await;
        let on_instances = recorded(&sim);
        for (c, i) in bindings(&snap) {
            seen_binding = true;
            if claim_status(&snap, &c).is_some_and(|s| s.phase == ClaimPhase::Bound) {
                assert_eq!(
                    on_instances.get(&c),
                    Some(&i),
                    "{c} Bound before {i} recorded it"
                );
            }
        }
        if claims(&snap).values().all(|(p, _)| *p == ClaimPhase::Bound) {
            break;
        }
        sim.advance(std::time::Duration::from_millis(1));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(seen_binding, "no snapshot caught a binding in progress");
    for c in ["c1", "c2", "c3"] {
        let i = sim.wait_bound(c).await;
        assert_eq!(recorded(&sim).get(c), Some(&i));
    }
    // Released (Recreate): the instance goes, and nothing records c1 any more.
    sim.delete(Kind::Claim, "c1");
    sim.wait_until("c1's instance is gone", |_, _| {
        !recorded(&sim).contains_key("c1")
    })
    .await;
}

#[tokio::test]
async fn a_controller_with_an_empty_store_adopts_every_recorded_binding() {
    let mut sim = recording();
    sim.wait_warm("p", 3).await;
    for c in ["c1", "c2", "c3"] {
        sim.apply(c, Spec::Claim(claim("p", "u")));
    }
    let mut before = std::collections::BTreeMap::new();
    for c in ["c1", "c2", "c3"] {
        before.insert(c.to_owned(), sim.wait_bound(c).await);
    }
    // c3 is deleted while no controller runs: its instance must be reset, not adopted.
    sim.declared.remove(&ObjKey::new(Kind::Claim, "c3"));
    sim.restart_with_empty_store().await;
    for c in ["c1", "c2"] {
        assert_eq!(
            sim.wait_bound(c).await,
            before[c],
            "{c} moved to another instance"
        );
    }
    sim.wait_until("c3's instance is reset", |_, insts| {
        insts.iter().all(|i| i.name != before["c3"])
    })
    .await;
    sim.apply("c4", Spec::Claim(claim("p", "u")));
    let c4 = sim.wait_bound("c4").await;
    assert!(
        c4 != before["c1"] && c4 != before["c2"],
        "a pod bound twice"
    );
    let snap = sim.wait_warm("p", 3).await;
    assert_bindings_sound(&snap, &sim.mem.instances());
    let on_instances = recorded(&sim);
    assert_eq!(on_instances.len(), 3, "{on_instances:?}");
}

#[tokio::test]
async fn a_claim_that_two_instances_record_is_adopted_by_one_and_the_other_is_reset() {
    // Found by the random simulation: a binding moved to another instance and the controller
    // died before the old instance's record was cleared; started on an empty store, it adopted
    // the claim on both, and the claim ended Pending with an instance still holding it.
    let (mut sim, bound) = c1_bound().await;
    let stale = others(&sim, &bound)
        .into_iter()
        .next()
        .expect("another instance");
    sim.mem
        .bind(&stale, Some(RecordedBinding::new("c1", "u", 0)))
        .await
        .expect("recorded");
    sim.restart_with_empty_store().await;
    let got = sim.wait_bound("c1").await;
    let snap = sim
        .wait_until("c1 is held by one instance only", |snap, insts| {
            let on_instances = insts
                .iter()
                .filter(|i| i.label(LABEL_CLAIM) == Some("c1"))
                .count();
            let in_engine = snap
                .instances
                .iter()
                .filter(|i| i.claim.as_deref() == Some("c1"))
                .count();
            on_instances == 1 && in_engine == 1
        })
        .await;
    assert_eq!(recorded(&sim).get("c1"), Some(&got));
    assert_bindings_sound(&snap, &sim.mem.instances());
    sim.wait_warm("p", 3).await;
}

/// Found by the random simulation: a claim deleted and declared again under its name while
/// its old instance still recorded it (the reset that clears the record had not run when the
/// controller died). Started on an empty store, the controller found two instances recording
/// the name and adopted either (in the order of a hash map): the claim could lose its live
/// instance, and get one that may hold the earlier claim's data. The later binding is the
/// claim's; the other instance is reset.
#[tokio::test]
async fn of_two_instances_recording_a_claim_the_later_binding_is_adopted() {
    let (mut sim, bound) = c1_bound().await;
    // Several rounds: with the old choice, each was a coin toss.
    for round in 0..6 {
        let others = others(&sim, &bound);
        let stale = &others[round % others.len()];
        // An earlier binding of the name, never cleared.
        sim.mem
            .bind(stale, Some(RecordedBinding::new("c1", "u", 1)))
            .await
            .expect("recorded");
        sim.restart_with_empty_store().await;
        let got = sim.wait_bound("c1").await;
        assert_eq!(
            got, bound,
            "round {round}: the later binding is the claim's"
        );
        sim.wait_until("the earlier record is cleared", |_, insts| {
            insts
                .iter()
                .filter(|i| i.label(LABEL_CLAIM) == Some("c1"))
                .count()
                == 1
        })
        .await;
    }
}

#[tokio::test]
async fn an_instance_another_controller_took_is_left_alone_and_the_claim_binds_another() {
    let mut sim = recording();
    sim.wait_warm("p", 3).await;
    sim.rt.bind_conflicts.store(1, Ordering::SeqCst);
    sim.apply("c1", Spec::Claim(claim("p", "u")));
    let i = sim.wait_bound("c1").await;
    let on_instances = recorded(&sim);
    assert_eq!(on_instances.get("c1"), Some(&i));
    let taken = on_instances
        .get("taken-elsewhere")
        .cloned()
        .expect("the instance the other controller took");
    assert_ne!(taken, i);
    // Not reset, not removed: it is the other controller's.
    sim.advance(std::time::Duration::from_secs(5));
    sim.wait_warm("p", 3).await;
    assert!(sim.mem.instances().iter().any(|x| x.name == taken));
    let snap = sim.snapshot().await;
    let events = events_of(&snap, Kind::Claim, "c1");
    assert!(
        events.iter().any(|e| e.reason == "BindConflict"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_bind_that_lost_a_race_costs_the_pool_nothing_and_the_claim_binds_at_once() {
    // A pool at its ceiling: an instance taken out of service for a transient conflict would
    // leave the claim waiting for good.
    let mut sim = recording();
    sim.apply("p", Spec::Pool(pool("img", 1, Some(1))));
    sim.wait_warm("p", 1).await;
    let only = sim.mem.instances()[0].name.clone();
    sim.rt.bind_races.store(2, Ordering::SeqCst);
    sim.apply("c1", Spec::Claim(claim("p", "u")));
    assert_eq!(sim.wait_bound("c1").await, only);
    assert_eq!(recorded(&sim).get("c1"), Some(&only));
    let snap = sim.snapshot().await;
    let events = events_of(&snap, Kind::Claim, "c1");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.reason == "BindConflict" && e.type_ == "Warning")
            .count(),
        2,
        "{events:?}"
    );
    assert!(
        snap.instances.iter().all(|i| i.quarantined.is_none()),
        "{:?}",
        snap.instances
    );
}

#[tokio::test]
async fn a_binding_that_lands_late_on_a_second_instance_is_undone() {
    // A bind sent by a controller since replaced lands after the claim was bound elsewhere:
    // the second instance records a claim that is not its own.
    let mut sim = recording();
    sim.wait_warm("p", 3).await;
    sim.apply("c1", Spec::Claim(claim("p", "u")));
    let mine = sim.wait_bound("c1").await;
    let late = sim
        .mem
        .instances()
        .into_iter()
        .map(|i| i.name)
        .find(|n| *n != mine)
        .expect("a warm instance");
    sim.mem
        .bind(&late, Some(RecordedBinding::new("c1", "u", 0)))
        .await
        .expect("the late write lands");
    sim.wait_until("only c1's instance records it", |_, insts| {
        insts
            .iter()
            .filter(|i| i.label(LABEL_CLAIM) == Some("c1"))
            .all(|i| i.name == mine)
    })
    .await;
    let snap = sim.wait_warm("p", 3).await;
    assert_eq!(
        claim_status(&snap, "c1").and_then(|c| c.instance),
        Some(mine)
    );
}

#[tokio::test]
async fn a_bound_instance_that_dies_is_replaced_though_it_still_records_its_claim() {
    let mut sim = recording();
    sim.wait_warm("p", 3).await;
    sim.apply("c1", Spec::Claim(claim("p", "u")));
    let first = sim.wait_bound("c1").await;
    assert!(sim.mem.crash(&first, 137));
    sim.wait_until(
        "c1 bound elsewhere and the dead instance gone",
        |snap, insts| {
            claim_status(snap, "c1").is_some_and(|c| {
                c.phase == ClaimPhase::Bound && c.instance.as_deref() != Some(&first)
            }) && insts.iter().all(|i| i.name != first)
        },
    )
    .await;
    sim.wait_warm("p", 3).await;
}

#[tokio::test]
async fn a_recorded_binding_to_an_undeclared_pool_survives_a_restart_on_an_empty_store() {
    let mut sim = recording();
    sim.wait_warm("p", 3).await;
    sim.apply("c1", Spec::Claim(claim("p", "u")));
    let inst = sim.wait_bound("c1").await;
    // The pool goes; its bound instance stays with its claim (as with a store).
    sim.delete(Kind::Pool, "p");
    sim.restart_with_empty_store().await;
    assert_recovered(&sim, "c1", &inst).await;
}

/// Found in review: a controller on an empty store learns of a binding from its instance's
/// record only. A claim of that name deleted and declared again while the controller started is
/// a new claim, and the instance may hold the deleted one's data: it is reset, not adopted for
/// the new claim.
#[tokio::test]
async fn a_claim_deleted_and_declared_again_while_an_empty_store_starts_gets_a_fresh_instance() {
    let (mut sim, old) = c1_bound().await;
    let key = ObjKey::new(Kind::Claim, "c1");
    let again = declared("c1", Spec::Claim(claim("p", "u")), 100);
    sim.restart_with_empty_store_then(|h| {
        h.delete(key.clone()).expect("the engine runs");
        h.apply(again.clone()).expect("the engine runs");
    })
    .await;
    sim.declared.insert(again.key(), again);
    let new = sim.wait_bound("c1").await;
    assert_ne!(new, old, "the new claim got the deleted one's instance");
    sim.wait_until("nothing else records c1", |_, _| {
        recorded(&sim).get("c1") == Some(&new)
            && sim
                .mem
                .instances()
                .iter()
                .all(|i| i.name == new || i.label(LABEL_CLAIM).is_none())
    })
    .await;
}

/// Found in review: a controller on an empty store learns of a binding from its instance's
/// record only, which named the claim and not its user. A claim moved to another user while no
/// store remembered its binding (while the controller was down, or while it started) was handed
/// the instance its old user had, with whatever that user left in it. An instance records its
/// claim's user now; one that records another user is reset.
#[tokio::test]
async fn a_claim_moved_to_another_user_while_no_store_remembers_it_gets_a_fresh_instance() {
    for while_starting in [false, true] {
        let (mut sim, old) = c1_bound().await;
        let on_old = sim.mem.instances().into_iter().find(|i| i.name == old);
        assert_eq!(on_old.expect("u's instance").label(LABEL_USER), Some("u"));
        let v = declared("v", Spec::User(user(10)), 100);
        let moved = declared("c1", Spec::Claim(claim("p", "v")), 101);
        sim.declared.insert(v.key(), v);
        if while_starting {
            sim.restart_with_empty_store_then(|h| h.apply(moved.clone()).expect("running"))
                .await;
        } else {
            sim.declared.insert(moved.key(), moved.clone());
            sim.restart_with_empty_store().await;
        }
        sim.declared.insert(moved.key(), moved);
        let new = sim.wait_bound("c1").await;
        assert_ne!(
            new, old,
            "while starting: {while_starting}: v got u's instance"
        );
        sim.wait_until("u's instance is reset", |_, insts| {
            insts.iter().all(|i| i.name != old)
        })
        .await;
        let on_new = sim.mem.instances().into_iter().find(|i| i.name == new);
        assert_eq!(on_new.expect("v's instance").label(LABEL_USER), Some("v"));
    }
}

/// A pool of `warm` (at most `max`) whose instances record their bindings and take a claim's files in `/work`.
fn recording_with_files(warm: u32, max: u32) -> Sim {
    let mut sim = keeping_bindings();
    let p = with_files(pool("img", warm, Some(max)), "/work");
    sim.apply("p", Spec::Pool(p));
    sim
}

/// Found in review: an instance quarantined for a failed copy of a claim's files still records
/// the claim (a binding is recorded before anything is copied). The next report of it (a
/// resync), or a restart, took it for a binding that landed late, its claim bound elsewhere
/// since, and reset it, which with `Recreate` removes it: what quarantine keeps for inspection
/// was gone.
#[tokio::test]
async fn an_instance_quarantined_with_its_claim_recorded_is_kept_across_resyncs_and_restarts() {
    let mut sim = recording_with_files(3, 8);
    sim.wait_warm("p", 3).await;
    sim.mem
        .fail_next_files(1, RuntimeError::Failed("disk".to_owned()));
    let mut c = claim("p", "u");
    c.files = BTreeMap::from([("a".to_owned(), "x".to_owned())]);
    sim.apply("c1", Spec::Claim(c));
    let snap = sim
        .wait_until("an instance is quarantined", |snap, _| {
            snap.instances.iter().any(|i| i.quarantined.is_some())
        })
        .await;
    let q = snap.instances.iter().find(|i| i.quarantined.is_some());
    let q = q.expect("quarantined").name.clone();
    assert_ne!(sim.wait_bound("c1").await, q);
    let kept = |sim: &Sim| {
        let on_q = sim.mem.instances().into_iter().find(|i| i.name == q);
        on_q.is_some_and(|i| i.label(LABEL_CLAIM) == Some("c1"))
    };
    assert!(kept(&sim), "{q} records c1 when it is quarantined");
    for restart in [false, true] {
        if restart {
            sim.restart().await;
        } else {
            sim.resync().await;
        }
        // Past any hold of a removal (at most 60 s).
        for _ in 0..7 {
            sim.advance(Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let snap = sim.wait_warm("p", 3).await;
        assert!(kept(&sim), "restart: {restart}: {q} was reset");
        let still = snap.instances.iter().find(|i| i.name == q);
        assert!(still.is_some_and(|i| i.quarantined.is_some()), "{snap:?}");
    }
}

/// Found in review: a binding recorded late (by a controller since replaced) for a claim whose
/// lease has run out. The instance was held by nobody for good, and a controller started again
/// adopted it for the expired claim: the store refused the binding, and every pass bound the
/// claim again and was refused again. Such an instance is reset, at once and at a start.
#[tokio::test]
async fn a_binding_recorded_late_for_an_expired_claim_is_undone_running_and_at_a_start() {
    let mut sim = keeping_bindings();
    // One instance at most: the one reset after the lease is not removed as one too many.
    let mut p = pool("img", 1, Some(1));
    p.reset = ResetPolicy::Restart;
    sim.apply("p", Spec::Pool(p));
    sim.wait_warm("p", 1).await;
    let mut c = claim("p", "u");
    c.ttl = Some("1s".to_owned());
    sim.apply("c1", Spec::Claim(c));
    let inst = sim.wait_bound("c1").await;
    sim.advance(Duration::from_secs(2));
    sim.wait_phase("c1", ClaimPhase::Expired).await;
    let nothing_records_c1 = |insts: &[poolkeeper_runtime::Instance]| {
        insts.iter().all(|i| i.label(LABEL_CLAIM).is_none())
    };
    sim.wait_until("the reset cleared the record", |_, insts| {
        nothing_records_c1(insts)
    })
    .await;
    for restart in [false, true] {
        // Nothing for the running controller to see before its restart.
        sim.mem.drop_events(restart);
        sim.mem
            .bind(&inst, Some(RecordedBinding::new("c1", "u", 0)))
            .await
            .unwrap_or_else(|e| panic!("restart {restart}: the late write lands: {e}"));
        sim.mem.drop_events(false);
        if restart {
            sim.restart().await;
        }
        sim.wait_until("nothing records c1", |_, insts| nothing_records_c1(insts))
            .await;
        let snap = sim.wait_warm("p", 1).await;
        let st = claim_status(&snap, "c1").expect("c1");
        assert_eq!((st.phase, st.instance), (ClaimPhase::Expired, None));
    }
}

/// An instance bound by a version that recorded no user is adopted by its claim and pool, as
/// before: upgrading a controller on an empty store (a new pod) keeps every binding.
#[tokio::test]
async fn a_binding_recorded_without_a_user_by_an_earlier_version_is_adopted() {
    let (mut sim, old) = c1_bound().await;
    relabel_unseen(&sim, &old, LABEL_USER, None);
    sim.restart_with_empty_store().await;
    assert_recovered(&sim, "c1", &old).await;
}

/// Found in review: a quarantine lived in the store only, and a controller on the pod runtime
/// starts with an empty store whenever its pod is replaced (the chart's state folder is an
/// emptyDir). The instance came back into service: adopted by the claim it still recorded (a
/// claim that waits, its pool at its ceiling), or handed on. The instance records its
/// quarantine now.
#[tokio::test]
async fn a_quarantined_instance_stays_out_of_service_when_the_store_is_lost() {
    let mut sim = recording_with_files(1, 1);
    sim.wait_warm("p", 1).await;
    let q = sim.mem.instances()[0].name.clone();
    sim.mem
        .fail_next_files(1, RuntimeError::Failed("disk".to_owned()));
    let mut c = claim("p", "u");
    c.files = BTreeMap::from([("a".to_owned(), "x".to_owned())]);
    sim.apply("c1", Spec::Claim(c));
    sim.wait_until("q is quarantined and records it", |snap, insts| {
        let marked = insts
            .iter()
            .any(|i| i.name == q && i.label(LABEL_QUARANTINED) == Some("true"));
        marked && snap.instances.iter().any(|i| i.quarantined.is_some())
    })
    .await;
    sim.restart_with_empty_store().await;
    for _ in 0..5 {
        sim.advance(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = sim
        .wait_until("q is quarantined again", |snap, _| {
            snap.instances
                .iter()
                .any(|i| i.name == q && i.quarantined.is_some())
        })
        .await;
    let st = claim_status(&snap, "c1").expect("c1");
    assert_eq!(
        (st.phase, st.instance),
        (ClaimPhase::Pending, None),
        "c1 waits: the only instance allowed is quarantined"
    );
    assert!(
        sim.mem.instances().iter().any(|i| i.name == q),
        "{q} was removed"
    );
    assert_eq!(pool_status(&snap, "p").expect("p").quarantined, 1);
    // Durably: the store has it again. Its label lost too (a version before it), it is
    // quarantined still, and the label written again.
    relabel_unseen(&sim, &q, LABEL_QUARANTINED, None);
    sim.restart().await;
    sim.wait_until("q is quarantined and records it again", |snap, insts| {
        let marked = insts
            .iter()
            .any(|i| i.name == q && i.label(LABEL_QUARANTINED) == Some("true"));
        marked && snap.instances.iter().any(|i| i.quarantined.is_some())
    })
    .await;
}

/// Found in review: a quarantine label with no quarantine behind it (a replaced controller's
/// write landing late, on an instance bound since) outlived the next reset that keeps the
/// instance (`Exec`), and the next report of the freshly reset instance quarantined it. A
/// reset clears the label with the binding's.
#[tokio::test]
async fn a_reset_clears_a_quarantine_label_that_no_quarantine_stands_behind() {
    let mut sim = keeping_bindings();
    let mut p = pool("img", 1, Some(1));
    p.reset = ResetPolicy::Exec;
    p.reset_command = vec!["true".to_owned()];
    sim.apply("p", Spec::Pool(p));
    sim.wait_warm("p", 1).await;
    sim.apply("c1", Spec::Claim(claim("p", "u")));
    let inst = sim.wait_bound("c1").await;
    assert!(sim.mem.set_label(&inst, LABEL_QUARANTINED, Some("true")));
    sim.delete(Kind::Claim, "c1");
    let snap = sim.wait_warm("p", 1).await;
    assert!(
        snap.instances.iter().all(|i| i.quarantined.is_none()),
        "{:?}",
        snap.instances
    );
    let on_inst = sim.mem.instances().into_iter().find(|i| i.name == inst);
    assert_eq!(on_inst.expect("kept").label(LABEL_QUARANTINED), None);
}

/// Found in review: an earlier version, which knows no user label, rebinds an instance (after
/// a rollback) and leaves the user label of the binding before. Taken for the new binding's
/// user, it made a controller started on an empty store reset an instance its claim still
/// uses. A user label counts only with the binding it was written with.
#[tokio::test]
async fn a_user_label_left_from_an_earlier_binding_is_not_taken_for_the_claims_user() {
    let (mut sim, inst) = c1_bound().await;
    // As an earlier version leaves it: c1 declared again for v and bound to the same instance;
    // the claim and bound-at labels rewritten, the user labels (unknown to it) left.
    let on_inst = sim.mem.instances().into_iter().find(|i| i.name == inst);
    let at: u64 = on_inst
        .and_then(|i| i.label(LABEL_BOUND_AT)?.parse().ok())
        .expect("bound-at");
    let later = (at + 1000).to_string();
    relabel_unseen(&sim, &inst, LABEL_BOUND_AT, Some(&later));
    let v = declared("v", Spec::User(user(10)), 100);
    let again = declared("c1", Spec::Claim(claim("p", "v")), 101);
    sim.declared.insert(v.key(), v);
    sim.declared.insert(again.key(), again);
    sim.restart_with_empty_store().await;
    assert_eq!(sim.wait_bound("c1").await, inst, "c1's instance was reset");
}
