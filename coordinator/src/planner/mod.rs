//! Assignment planning: herald ids in, herald ids out, with the pure solver in [`solve`] over
//! dense integer ids in between. See `README.md` in this directory for the goals.

pub mod solve;

use std::collections::BTreeMap;

use herald_proto::{ChainId, SubscriptionId, WorkerId};

pub use solve::{Load, Problem, Slot, Solution};

/// A subscription to place.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Its id.
    pub id: SubscriptionId,
    /// Its chain.
    pub chain: ChainId,
    /// Its weight (>= 1).
    pub weight: u32,
}

/// A live worker to place on.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Its id.
    pub id: WorkerId,
    /// Chains it serves.
    pub chains: Vec<ChainId>,
    /// Capacity, 0 = unbounded.
    pub capacity: u32,
}

/// Plans the assignment of `subscriptions` over `workers`, starting from `current`.
/// Deterministic: inputs are sorted by id before solving.
pub fn plan(
    subscriptions: &[Subscription],
    workers: &[Worker],
    current: &BTreeMap<SubscriptionId, WorkerId>,
) -> BTreeMap<SubscriptionId, WorkerId> {
    let mut subscriptions: Vec<&Subscription> = subscriptions.iter().collect();
    subscriptions.sort_by(|a, b| a.id.cmp(&b.id));
    let mut workers: Vec<&Worker> = workers.iter().collect();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    let index: BTreeMap<&WorkerId, usize> = workers.iter().enumerate().map(|(i, w)| (&w.id, i)).collect();
    let problem = Problem {
        subscriptions: subscriptions
            .iter()
            .map(|s| Load { chain: s.chain, weight: s.weight.max(1) })
            .collect(),
        workers: workers
            .iter()
            .map(|w| Slot { chains: w.chains.iter().copied().collect(), capacity: w.capacity })
            .collect(),
    };
    let previous: Vec<Option<usize>> =
        subscriptions.iter().map(|s| current.get(&s.id).and_then(|w| index.get(w).copied())).collect();
    let solution = solve::solve(&problem, &previous);
    subscriptions
        .iter()
        .zip(solution)
        .filter_map(|(s, k)| k.map(|k| (s.id.clone(), workers[k].id.clone())))
        .collect()
}
