//! The leader's reconcile loop: desired assignment (from the planner) against the assignments
//! in etcd, applied with transactions.
//!
//! Triggered by any change under `workers/`, `subscriptions/`, `assignments/` or `owners/`
//! (debounced, so
//! a rolling restart is planned once), and by a periodic resync. Each round reads the registry,
//! asks [`crate::planner::plan`] for the assignment (starting from the current one, so it is
//! sticky), and writes only the difference: a move revokes the old assignment (the old owner's
//! task stops; its cursor writes are refused from then on) and, once the old owner has released
//! the subscription (its `owners/` key is gone: task ended after its last cursor write, or its
//! lease expired), creates the new one bound to the new worker's lease. An assignment to a dead
//! worker or for a deleted subscription is removed.
//! An empty diff writes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use herald_proto::{SubscriptionId, SubscriptionState, WorkerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::election::{LeaderFence, Leadership};
use crate::metrics::Metrics;
use crate::planner::{self, Subscription, Worker};
use crate::registry::{LiveWorker, Registry, RegistryError};

/// How the loop paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Quiet time after a change before planning.
    pub debounce: Duration,
    /// Longest a burst of changes can postpone planning.
    pub max_delay: Duration,
    /// Planning happens at least this often.
    pub resync: Duration,
}

/// What one round changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Assignments created.
    pub assigned: usize,
    /// Assignments revoked (moves, dead workers, deleted subscriptions).
    pub revoked: usize,
}

/// One reconcile round. `pending` carries handoffs across rounds: a subscription revoked from
/// its old owner waits, unassigned, until that owner releases it; meanwhile the planner treats
/// the intended new owner as its owner, so the decision is not made again differently.
pub async fn reconcile_once(
    registry: &Registry,
    metrics: &Metrics,
    fence: &LeaderFence,
    pending: &mut BTreeMap<SubscriptionId, WorkerId>,
) -> Result<Round, RegistryError> {
    let started = std::time::Instant::now();
    let records = registry.list().await?;
    let assignments = registry.assignments().await?;
    let workers = registry.workers().await?;
    let leases: BTreeMap<WorkerId, i64> =
        workers.iter().map(|w| (w.info.worker_id.clone(), w.lease)).collect();
    pending
        .retain(|id, w| records.contains_key(id) && leases.contains_key(w) && !assignments.contains_key(id));
    let current: BTreeMap<SubscriptionId, WorkerId> = assignments
        .iter()
        .filter(|(id, w)| records.contains_key(*id) && leases.contains_key(*w))
        .map(|(id, w)| (id.clone(), w.clone()))
        .chain(pending.iter().map(|(id, w)| (id.clone(), w.clone())))
        .collect();
    let subscriptions: Vec<Subscription> = records
        .values()
        .map(|r| Subscription { id: r.record.spec.id.clone(), chain: r.record.spec.chain_id, weight: 1 })
        .collect();
    let planned_workers: Vec<Worker> = workers
        .iter()
        .map(|w| Worker {
            id: w.info.worker_id.clone(),
            chains: w.info.chains.clone(),
            capacity: w.info.capacity,
        })
        .collect();
    let desired = planner::plan(&subscriptions, &planned_workers, &current);
    let planning = started.elapsed();

    let mut round = Round::default();
    let revokes: Vec<(SubscriptionId, WorkerId)> = assignments
        .iter()
        .filter(|(id, worker)| desired.get(*id) != Some(*worker))
        .map(|(id, worker)| (id.clone(), worker.clone()))
        .collect();
    round.revoked = registry.revoke(&revokes, fence).await?;
    let live: BTreeMap<&WorkerId, &LiveWorker> = workers.iter().map(|w| (&w.info.worker_id, w)).collect();
    let assigns: Vec<(SubscriptionId, &LiveWorker)> = desired
        .iter()
        .filter(|(id, worker)| assignments.get(*id) != Some(*worker))
        .filter_map(|(id, worker)| Some((id.clone(), *live.get(worker)?)))
        .collect();
    if !assigns.is_empty() {
        let owners = registry.owners().await?;
        let written = registry.assign(&assigns, &owners, fence).await?;
        for ((id, worker), written) in assigns.iter().zip(written) {
            if written {
                round.assigned += 1;
                pending.remove(id);
            } else {
                pending.insert(id.clone(), worker.info.worker_id.clone());
            }
        }
    }
    metrics.observe_round(planning, round.revoked, workers.len());
    metrics.observe_subscriptions(records.values().map(|r| {
        let spec = &r.record.spec;
        (spec.chain_id, spec.id.to_string(), r.record.state == SubscriptionState::Paused)
    }));
    if round != Round::default() {
        tracing::info!(assigned = round.assigned, revoked = round.revoked, "applied a new assignment");
    }
    Ok(round)
}

/// The leader's work: reconcile on changes until leadership ends.
pub struct Reconciler {
    /// etcd.
    pub registry: Registry,
    /// Pacing.
    pub pacing: Pacing,
    /// Metrics.
    pub metrics: Metrics,
    /// etcd history older than this is compacted while leading (zero: never).
    pub compaction_retention: std::time::Duration,
}

impl Leadership for Reconciler {
    async fn lead(&self, fence: LeaderFence, cancel: CancellationToken) {
        tokio::spawn(crate::maintenance::compact_while_leading(
            self.registry.clone(),
            self.compaction_retention,
            self.metrics.clone(),
            cancel.clone(),
        ));
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let keys = self.registry.keys().clone();
        for dir in [keys.workers_dir(), keys.subscriptions_dir(), keys.assignments_dir(), keys.owners_dir()] {
            tokio::spawn(watch_changes(self.registry.clone(), dir, tx.clone(), cancel.clone()));
        }
        drop(tx);
        let mut pending = BTreeMap::new();
        loop {
            // A round ends with the term: it is dropped mid-way rather than awaited (an etcd
            // call may hang for its whole timeout), which is safe since each write is one
            // fenced transaction.
            let round = tokio::select! {
                _ = cancel.cancelled() => return,
                round = reconcile_once(&self.registry, &self.metrics, &fence, &mut pending) => round,
            };
            if let Err(e) = round {
                tracing::warn!(error = %e, "reconcile round failed; retrying at the next change or resync");
            }
            // Wait for a change (or the resync), then for quiet.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = rx.recv() => {}
                _ = tokio::time::sleep(self.pacing.resync) => continue,
            }
            let burst_end = tokio::time::Instant::now() + self.pacing.max_delay;
            loop {
                let quiet = tokio::time::sleep(self.pacing.debounce);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(burst_end) => break,
                    _ = quiet => break,
                    _ = rx.recv() => {}
                }
            }
        }
    }
}

/// Sends a notification for every change under `dir` (re-watching after failures).
async fn watch_changes(registry: Registry, dir: String, tx: mpsc::Sender<()>, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let mut client = registry.client();
        let stream = client.watch(dir.as_str(), Some(WatchOptions::new().with_prefix())).await;
        let Ok(mut stream) = stream else {
            tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_millis(500)) => {} }
            continue;
        };
        // A fresh watch may have missed changes: plan once more.
        let _ = tx.try_send(());
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => return,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(r)) if !r.canceled() => {
                    if r.events().iter().any(|e| matches!(e.event_type(), EventType::Put | EventType::Delete))
                    {
                        let _ = tx.try_send(());
                    }
                }
                _ => break,
            }
        }
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_millis(200)) => {} }
    }
}
