//! The record that hands a subscription to a worker.
//!
//! Stored at `<prefix>/assignments/<subscription_id>` by the coordinator (by tests and the
//! demo until the coordinator exists). The key's etcd *create revision* is the assignment's
//! generation: every cursor write by the owner is a transaction that compares it, so a worker
//! holding a revoked or re-created assignment cannot move the cursor.

use serde::{Deserialize, Serialize};

use crate::ids::WorkerId;

/// Which worker owns a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The owning worker.
    pub worker_id: WorkerId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let a = Assignment { worker_id: WorkerId::new("w-1").unwrap() };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"worker_id":"w-1"}"#);
        assert_eq!(serde_json::from_str::<Assignment>(&json).unwrap(), a);
        assert!(serde_json::from_str::<Assignment>(r#"{"worker_id":"W 1"}"#).is_err());
    }
}
