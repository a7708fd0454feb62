//! Runs one task per subscription assigned to this worker, following the assignments in etcd.
//!
//! List, then watch from the listed revision; on any watch failure (or every resync
//! interval) list again. Each change is reconciled by [`plan`], a pure diff between what runs
//! and what is assigned. A task whose ownership changed is stopped and *joined* before its
//! successor starts, so two tasks never act on one subscription at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::EventType;
use herald_proto::{ChainId, SubscriptionId, WorkerId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::chain::AlloyRpc;
use crate::config::ChainConfig;
use crate::metrics::Metrics;
use crate::pipeline::{Exit, SubscriptionTask};
use crate::publish::JetStreamSink;
use crate::retry::{Backoff, pause, retry};
use crate::store::{EtcdStore, Ownership};

/// How often assignments are re-listed even when the watch is healthy.
const RESYNC_INTERVAL: Duration = Duration::from_secs(15);

/// A chain this worker serves.
pub struct ChainHandle {
    /// Its endpoint.
    pub rpc: Arc<AlloyRpc>,
    /// Its configuration.
    pub config: ChainConfig,
}

/// What [`plan`] decides.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Tasks to stop (revoked, or re-assigned under a new generation).
    pub stop: Vec<SubscriptionId>,
    /// Tasks to start.
    pub start: Vec<SubscriptionId>,
}

/// Diffs running tasks against desired ownerships. Pure.
pub fn plan(
    running: &BTreeMap<SubscriptionId, Ownership>,
    finished: &[SubscriptionId],
    desired: &BTreeMap<SubscriptionId, Ownership>,
) -> Changes {
    let mut changes = Changes::default();
    for (id, ownership) in running {
        let keep = desired.get(id) == Some(ownership) && !finished.contains(id);
        if !keep {
            changes.stop.push(id.clone());
        }
    }
    for id in desired.keys() {
        if running.get(id) != desired.get(id) || finished.contains(id) {
            changes.start.push(id.clone());
        }
    }
    changes
}

struct Running {
    ownership: Ownership,
    cancel: CancellationToken,
    handle: JoinHandle<Exit>,
}

/// The worker's subscription supervisor.
pub struct Supervisor {
    /// This worker.
    pub worker_id: WorkerId,
    /// etcd.
    pub store: EtcdStore,
    /// JetStream.
    pub sink: Arc<JetStreamSink>,
    /// Served chains.
    pub chains: HashMap<ChainId, ChainHandle>,
    /// Metrics.
    pub metrics: Metrics,
}

impl Supervisor {
    /// Runs until `cancel`, then stops and joins every task.
    pub async fn run(self, cancel: CancellationToken) {
        let mut running: BTreeMap<SubscriptionId, Running> = BTreeMap::new();
        let mut backoff = Backoff::network();
        'relist: while !cancel.is_cancelled() {
            let Some((mut desired, revision)) =
                retry("list assignments in etcd", &cancel, || self.store.assignments_of(&self.worker_id))
                    .await
            else {
                break;
            };
            self.reconcile(&mut running, &desired, &cancel).await;
            let mut watch = match self.store.watch_assignments(revision).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch assignments, relisting");
                    if !pause(&mut backoff, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            let resync = tokio::time::sleep(RESYNC_INTERVAL);
            tokio::pin!(resync);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break 'relist,
                    _ = &mut resync => continue 'relist,
                    message = watch.message() => {
                        let response = match message {
                            Ok(Some(r)) if !r.canceled() => r,
                            Ok(_) => { tracing::info!("assignment watch ended, relisting"); continue 'relist; }
                            Err(e) => { tracing::warn!(error = %e, "assignment watch failed, relisting"); continue 'relist; }
                        };
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            let Ok(key) = kv.key_str() else { continue };
                            let Ok(herald_proto::Key::Assignment(id)) = self.store.keys().parse(key) else { continue };
                            let mine = match event.event_type() {
                                EventType::Put => self.store.ownership_from(&self.worker_id, kv.key(), kv.value(), kv.create_revision()),
                                EventType::Delete => None,
                            };
                            match mine {
                                Some(o) => { desired.insert(id, o); }
                                None => { desired.remove(&id); }
                            }
                        }
                        self.reconcile(&mut running, &desired, &cancel).await;
                    }
                }
            }
        }
        tracing::info!(tasks = running.len(), "stopping subscription tasks");
        for (_, task) in running {
            task.cancel.cancel();
            let _ = task.handle.await;
        }
        self.metrics.assigned_subscriptions.set(0);
    }

    async fn reconcile(
        &self,
        running: &mut BTreeMap<SubscriptionId, Running>,
        desired: &BTreeMap<SubscriptionId, Ownership>,
        cancel: &CancellationToken,
    ) {
        let current: BTreeMap<_, _> =
            running.iter().map(|(id, r)| (id.clone(), r.ownership.clone())).collect();
        let finished: Vec<_> =
            running.iter().filter(|(_, r)| r.handle.is_finished()).map(|(id, _)| id.clone()).collect();
        let changes = plan(&current, &finished, desired);
        for id in &changes.stop {
            if let Some(task) = running.remove(id) {
                tracing::info!(subscription_id = %id, "stopping subscription task");
                task.cancel.cancel();
                let _ = task.handle.await;
            }
        }
        for id in changes.start {
            let ownership = desired[&id].clone();
            if let Some(task) = self.spawn(ownership.clone(), cancel).await {
                running.insert(id, task);
            }
        }
        self.metrics.assigned_subscriptions.set(running.len() as i64);
    }

    async fn spawn(&self, ownership: Ownership, cancel: &CancellationToken) -> Option<Running> {
        let id = ownership.subscription_id.clone();
        let spec = match self.store.load_spec(&id).await {
            Ok(Some(spec)) => spec,
            Ok(None) => {
                tracing::warn!(subscription_id = %id, "assigned subscription has no spec yet; retrying at next resync");
                return None;
            }
            Err(e) => {
                tracing::warn!(subscription_id = %id, error = %e, "cannot load subscription spec; retrying at next resync");
                return None;
            }
        };
        let event = match spec.compile() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(subscription_id = %id, error = %e, "subscription spec is invalid; not running it");
                return None;
            }
        };
        let Some(chain) = self.chains.get(&spec.chain_id) else {
            tracing::error!(subscription_id = %id, chain_id = spec.chain_id, "assigned a subscription on a chain this worker does not serve");
            return None;
        };
        let task = SubscriptionTask {
            chain: chain.rpc.clone(),
            sink: self.sink.clone(),
            store: Arc::new(self.store.clone()),
            metrics: self.metrics.clone(),
            ownership: ownership.clone(),
            event,
            poll_interval: chain.config.poll_interval,
            max_block_range: chain.config.max_block_range,
            spec,
        };
        let child = cancel.child_token();
        let span = tracing::info_span!("subscription", subscription_id = %id, chain_id = chain.config.chain_id, generation = ownership.generation);
        let handle = tokio::spawn(task.run(child.clone()).instrument(span));
        Some(Running { ownership, cancel: child, handle })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(id: &str, generation: i64) -> (SubscriptionId, Ownership) {
        let id = SubscriptionId::new(id).unwrap();
        (id.clone(), Ownership { subscription_id: id, generation, assignment_value: b"{}".to_vec() })
    }

    fn ids(v: &[&str]) -> Vec<SubscriptionId> {
        v.iter().map(|s| SubscriptionId::new(*s).unwrap()).collect()
    }

    #[test]
    fn empty_diff_changes_nothing() {
        let m: BTreeMap<_, _> = [own("a", 1), own("b", 2)].into();
        assert_eq!(plan(&m, &[], &m), Changes::default());
    }

    #[test]
    fn revoked_stop_new_start_regenerated_restart() {
        let running: BTreeMap<_, _> = [own("a", 1), own("b", 2), own("c", 3)].into();
        let desired: BTreeMap<_, _> = [own("b", 2), own("c", 9), own("d", 4)].into();
        let changes = plan(&running, &[], &desired);
        assert_eq!(changes.stop, ids(&["a", "c"]));
        assert_eq!(changes.start, ids(&["c", "d"]));
    }

    #[test]
    fn finished_tasks_that_are_still_assigned_restart() {
        let running: BTreeMap<_, _> = [own("a", 1)].into();
        let changes = plan(&running, &ids(&["a"]), &running);
        assert_eq!(changes.stop, ids(&["a"]));
        assert_eq!(changes.start, ids(&["a"]));
    }
}
