//! What a worker announces about itself.
//!
//! Stored at `<prefix>/workers/<worker_id>`, bound to the worker's etcd lease: the key exists
//! exactly as long as the worker keeps its lease alive, so the coordinator learns of a dead
//! worker from etcd itself. Assignments to a worker are bound to the same lease.

use serde::{Deserialize, Serialize};

use crate::ids::{ChainId, WorkerId};

/// A live worker's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    /// The worker.
    pub worker_id: WorkerId,
    /// Chains it serves (it can only be assigned subscriptions on these).
    pub chains: Vec<ChainId>,
    /// Relative capacity (subscriptions of weight 1 it is meant to carry); 0 = unbounded.
    #[serde(default)]
    pub capacity: u32,
    /// herald version it runs.
    pub version: String,
    /// When it registered, Unix seconds.
    pub started_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let w = WorkerInfo {
            worker_id: WorkerId::new("w-0").unwrap(),
            chains: vec![1, 10],
            capacity: 0,
            version: "0.1.0".into(),
            started_at: 5,
        };
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<WorkerInfo>(&json).unwrap(), w);
    }
}
