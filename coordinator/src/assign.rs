//! Hands unassigned subscriptions to live workers (interim: the sharding issue replaces this
//! with the sticky, balanced planner and a leader-only reconcile loop).
//!
//! Every `assign_interval`: every subscription without an assignment goes to the live worker
//! serving its chain that carries the fewest assignments ([`pick_worker`], pure). The
//! assignment is written only if none exists and is bound to the worker's lease, so a worker
//! that dies releases its subscriptions and they are assigned again on the next round.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_proto::{ChainId, WorkerId};
use tokio_util::sync::CancellationToken;

use crate::registry::{LiveWorker, Registry, RegistryError};

/// The least loaded worker serving `chain` (ties broken by id). Pure.
pub fn pick_worker<'a>(
    chain: ChainId,
    workers: &'a [LiveWorker],
    load: &BTreeMap<WorkerId, usize>,
) -> Option<&'a LiveWorker> {
    workers
        .iter()
        .filter(|w| w.info.chains.contains(&chain))
        .min_by_key(|w| (load.get(&w.info.worker_id).copied().unwrap_or(0), w.info.worker_id.clone()))
}

/// One assignment round; returns how many subscriptions were assigned.
pub async fn assign_round(registry: &Registry) -> Result<usize, RegistryError> {
    let records = registry.list().await?;
    let assignments = registry.assignments().await?;
    let workers = registry.workers().await?;
    let mut load: BTreeMap<WorkerId, usize> = BTreeMap::new();
    for worker in assignments.values() {
        *load.entry(worker.clone()).or_default() += 1;
    }
    let mut assigned = 0;
    for (id, stored) in &records {
        if assignments.contains_key(id) {
            continue;
        }
        let Some(worker) = pick_worker(stored.record.spec.chain_id, &workers, &load) else { continue };
        if registry.assign(id, worker).await? {
            tracing::info!(subscription_id = %id, worker_id = %worker.info.worker_id, "assigned");
            *load.entry(worker.info.worker_id.clone()).or_default() += 1;
            assigned += 1;
        }
    }
    Ok(assigned)
}

/// Runs assignment rounds until cancelled.
pub async fn run(registry: Registry, interval: Duration, cancel: CancellationToken) {
    let mut failing = false;
    loop {
        match assign_round(&registry).await {
            Ok(_) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "assignment round failed");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::WorkerInfo;

    fn worker(id: &str, chains: &[u64]) -> LiveWorker {
        LiveWorker {
            info: WorkerInfo {
                worker_id: WorkerId::new(id).unwrap(),
                chains: chains.to_vec(),
                capacity: 0,
                version: "t".into(),
                started_at: 0,
            },
            lease: 1,
        }
    }

    #[test]
    fn picks_the_least_loaded_worker_serving_the_chain() {
        let workers = [worker("a", &[1]), worker("b", &[1, 2]), worker("c", &[2])];
        let load: BTreeMap<_, _> =
            [(WorkerId::new("a").unwrap(), 3), (WorkerId::new("b").unwrap(), 1)].into();
        assert_eq!(pick_worker(1, &workers, &load).unwrap().info.worker_id.as_str(), "b");
        assert_eq!(pick_worker(2, &workers, &load).unwrap().info.worker_id.as_str(), "c");
        assert!(pick_worker(3, &workers, &load).is_none());
        assert_eq!(pick_worker(1, &workers, &BTreeMap::new()).unwrap().info.worker_id.as_str(), "a");
    }
}
