//! The engine's loop: inputs in batches, one pass after each batch, wakeups for what is due.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::error;

use poolkeeper_runtime::Runtime;

use crate::handle::Input;
use crate::{Engine, MAX_BATCH};

impl<R: Runtime> Engine<R> {
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut resync = tokio::time::interval(self.config.resync_every);
        resync.tick().await;
        loop {
            let sleep = self.next_wakeup();
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = resync.tick() => {
                    // Ports once found held by another process are tried again each resync:
                    // a creation that still hits one marks it again.
                    self.ports.clear_all_foreign();
                    self.spawn_list();
                    continue;
                }
                _ = tokio::time::sleep(sleep) => Some(Input::Tick),
            };
            let Some(first) = first else { break };
            let mut shutdown = None;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            for input in batch {
                match input {
                    Input::Shutdown(tx) => shutdown = Some(tx),
                    Input::Resync(tx) => {
                        let t = Instant::now();
                        // Listed inline: nothing is observed meanwhile.
                        self.list_epoch += 1;
                        let listed = self.rt.list().await;
                        self.on_listed(self.list_epoch, listed);
                        self.publish_tokens();
                        self.mark_all_dirty();
                        self.pass();
                        let _ = tx.send(t.elapsed());
                    }
                    other => self.handle(other),
                }
            }
            self.publish_tokens();
            self.pass();
            if self.store_down.as_ref().is_some_and(|d| d.back) {
                self = self.rebuilt();
            }
            if let Some(tx) = shutdown {
                // What waited for a flush is durable before the engine says it has stopped.
                if let Err(e) = self.store.flush() {
                    error!(error = %e, "state store failed to flush at shutdown");
                }
                let _ = tx.send(());
                break;
            }
        }
    }

    /// How long until something is due (a lease ends, a backoff passes).
    fn next_wakeup(&mut self) -> Duration {
        let now = self.clock.now_ms();
        let mut next = u64::MAX;
        if let Some(Reverse((t, _))) = self.expiries.peek() {
            next = next.min(*t);
        }
        // An overdue wakeup means a pass now (the tick it causes pops it): never dropped here,
        // or what it was for would wait for an unrelated pass.
        if let Some(Reverse(t)) = self.wakeups.peek() {
            next = next.min(*t);
        }
        if next == u64::MAX {
            return Duration::from_secs(3600);
        }
        Duration::from_millis(next.saturating_sub(now).max(1))
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Source(ev) => self.on_source(ev),
            Input::Runtime(ev) => self.on_runtime(ev),
            Input::Done(c) => self.on_done(c),
            Input::Listed(epoch, r) => self.on_listed(epoch, r),
            Input::Tick => {
                self.nudged = false;
                let now = self.clock.now_ms();
                while let Some(Reverse(t)) = self.wakeups.peek() {
                    if *t > now {
                        break;
                    }
                    self.wakeups.pop();
                    // A backoff passed: look at everything again (cheap, and never wrong).
                    self.mark_all_dirty();
                }
                self.retry_removals(now);
                // Nothing is removed while the store is down (see `storedown`).
                if self.store_down.is_none() {
                    self.give_up_waiting_resets(now);
                }
            }
            Input::Snapshot(tx) => {
                let _ = tx.send(self.snapshot());
            }
            Input::Views(keys, tx) => {
                let _ = tx.send(keys.iter().map(|k| self.view_of(k)).collect());
            }
            Input::Instances(names, tx) => {
                let _ = tx.send(names.iter().map(|n| self.instance_view(n)).collect());
            }
            Input::PoolStatus(name, tx) => {
                let _ = tx.send(self.pool_status(&name));
            }
            Input::PutFiles {
                claim,
                user,
                files,
                reply,
            } => self.put_claim_files(&claim, user.as_deref(), files, reply),
            Input::Subscribe(tx) => self.subscribers.push(tx),
            Input::Started(tx) => {
                if self.started {
                    let _ = tx.send(());
                } else {
                    self.started_waiters.push(tx);
                }
            }
            Input::Reinitialise(pool, reply) => {
                let _ = reply.send(self.reinitialise(&pool));
            }
            Input::Claim(name, reply) => {
                let _ = reply.send(self.claim_brief(&name));
            }
            Input::CreateClaim { claim, reply } => {
                let answer = match &self.store_down {
                    // Its binding could not be made durable: refused, not queued.
                    Some(down) => crate::Creation::Refused(
                        "StoreUnwritable",
                        format!(
                            "the controller's state store cannot write ({}); new claims are refused until it can",
                            down.error
                        ),
                    ),
                    None => self.create_claim(claim),
                };
                let _ = reply.send(answer);
            }
            Input::Logs {
                instance,
                tail,
                reply,
            } => self.logs(instance, tail, reply),
            Input::Container {
                instance,
                action,
                reply,
            } => self.container_action(instance, action, reply),
            Input::Exec {
                instance,
                command,
                reply,
            } => {
                if !self.is_deployment_container(&instance) {
                    let _ = reply.send(None);
                    return;
                }
                let rt = self.rt.clone();
                tokio::spawn(async move {
                    let r = rt.exec(&instance, &command).await;
                    let _ = reply.send(Some(r.map_err(|e| e.to_string())));
                });
            }
            Input::LogMatch {
                instance,
                trigger,
                line,
            } => self.on_log_match(&instance, &trigger, line),
            Input::Shutdown(_) | Input::Resync(_) => {}
        }
    }

    /// An instance's output, read from the runtime off the engine's task.
    fn logs(
        &self,
        instance: String,
        tail: usize,
        reply: tokio::sync::oneshot::Sender<Option<Result<crate::handle::InstanceLogs, String>>>,
    ) {
        if !self.instances.contains_key(&instance) {
            let _ = reply.send(None);
            return;
        }
        let rt = self.rt.clone();
        tokio::spawn(async move {
            // Followed first: a line written meanwhile is in both rather than in neither.
            let follow = rt.follow_logs(&instance);
            let r = rt
                .logs(&instance, tail)
                .await
                .map(|recent| crate::handle::InstanceLogs { recent, follow })
                .map_err(|e| e.to_string());
            let _ = reply.send(Some(r));
        });
    }

    fn is_deployment_container(&self, instance: &str) -> bool {
        self.instances
            .get(instance)
            .is_some_and(|i| i.deployment.is_some())
    }

    /// An operator's restart or removal of a deployment's container. The engine learns of
    /// either from the runtime's events, as of one behind its back, and keeps the deployment
    /// as declared (a removed container is replaced).
    fn container_action(
        &self,
        instance: String,
        action: crate::handle::ContainerAction,
        reply: tokio::sync::oneshot::Sender<Option<Result<(), String>>>,
    ) {
        if !self.is_deployment_container(&instance) {
            let _ = reply.send(None);
            return;
        }
        let rt = self.rt.clone();
        tokio::spawn(async move {
            let r = match action {
                crate::handle::ContainerAction::Restart => rt.restart(&instance).await,
                crate::handle::ContainerAction::Remove => rt.remove(&instance).await,
            };
            let _ = reply.send(Some(r.map_err(|e| e.to_string())));
        });
    }

    pub(crate) fn spawn_list(&mut self) {
        self.list_epoch += 1;
        let epoch = self.list_epoch;
        let rt = self.rt.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let r = rt.list().await;
            let _ = tx.send(Input::Listed(epoch, r));
        });
    }

    pub(crate) fn mark_all_dirty(&mut self) {
        self.dirty_pools.extend(self.pools.keys().cloned());
        self.dirty_pools.extend(self.pool_index.keys().cloned());
        self.dirty_users.extend(self.claims_by_user.keys().cloned());
        self.dirty_deployments
            .extend(self.deployments.keys().cloned());
    }
}
