//! Changes to one claim, one at a time, each carried through whatever its caller does.
//!
//! A claim is made in two steps (the engine admits it, then the source records it durably) and
//! released in two (the record goes, then the engine is told). Requests about the same claim
//! name (a retried POST, a DELETE, a webhook's release of the reservation it is still
//! provisioning, a callback's update of the reservation's record) take the name's
//! [`ClaimLocks`] turn, so none sees the other half-done: a retry is answered once the first
//! request's claim is durable (or is made anew if it was not), a release waits for the claim
//! it releases.
//!
//! And a change once begun is finished: [`detached`] runs it in a task of its own, so a client
//! that goes away (hyper then drops the request's future) cannot stop it between the engine's
//! admission and the durable record, which would leave a claim the engine holds and no source
//! declares.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

use crate::error::{ApiError, ApiResult};

/// One turn per claim name. Names nobody waits on are forgotten.
#[derive(Default)]
pub(crate) struct ClaimLocks {
    held: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl ClaimLocks {
    /// Waits for `name`'s turn; it lasts as long as the guard.
    pub(crate) async fn lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let turn = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.retain(|_, w| w.strong_count() > 0);
            match held.get(name).and_then(Weak::upgrade) {
                Some(t) => t,
                None => {
                    let t = Arc::new(tokio::sync::Mutex::new(()));
                    held.insert(name.to_owned(), Arc::downgrade(&t));
                    t
                }
            }
        };
        turn.lock_owned().await
    }

    /// Waits for the turns of all of `names`, taken in their sorted order (two callers never
    /// wait on each other); they last as long as the guards.
    pub(crate) async fn lock_all(
        &self,
        names: std::collections::BTreeSet<String>,
    ) -> Vec<OwnedMutexGuard<()>> {
        let mut turns = Vec::with_capacity(names.len());
        for name in &names {
            turns.push(self.lock(name).await);
        }
        turns
    }

    /// How many names are held or waited on (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.values().filter(|w| w.strong_count() > 0).count()
    }
}

/// Runs `work` to its end in a task of its own and returns what it returned; dropping the
/// returned future does not stop the work. A panic in it is the caller's panic; a task
/// cancelled by the runtime stopping answers 503.
pub(crate) async fn detached<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> ApiResult<T> {
    match tokio::spawn(work).await {
        Ok(t) => Ok(t),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(ApiError::unavailable()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_second_turn_for_the_same_name_waits_and_other_names_do_not() {
        let locks = Arc::new(ClaimLocks::default());
        let first = locks.lock("a").await;
        let waiting = tokio::spawn({
            let locks = locks.clone();
            async move {
                let _t = locks.lock("a").await;
            }
        });
        let other = tokio::time::timeout(Duration::from_secs(1), locks.lock("b")).await;
        assert!(other.is_ok(), "another name has its own turn");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the same name waits for the first turn"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the turn passes when the first ends")
            .expect("no panic");
    }

    #[tokio::test]
    async fn names_nobody_holds_are_forgotten() {
        let locks = ClaimLocks::default();
        for i in 0..100 {
            drop(locks.lock(&format!("c{i}")).await);
        }
        let _kept = locks.lock("kept").await;
        assert_eq!(locks.len(), 1);
        assert_eq!(
            locks.held.lock().unwrap_or_else(|e| e.into_inner()).len(),
            1
        );
    }

    #[tokio::test]
    async fn detached_work_goes_on_when_its_caller_is_dropped() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u32>();
        let call = detached(async move {
            let _ = rx.await;
            let _ = done_tx.send(7);
        });
        // The caller polls once (the work starts), then goes away.
        let _ = tokio::time::timeout(Duration::from_millis(20), call).await;
        let _ = tx.send(());
        let got = tokio::time::timeout(Duration::from_secs(1), done_rx).await;
        assert_eq!(got.ok().and_then(Result::ok), Some(7));
    }
}
