//! A subscription's durable progress.
//!
//! The cursor names the last block whose matching logs have *all* been acknowledged by
//! JetStream. It is written to etcd only after those acks, so a crash at any point replays
//! from `block_number + 1` at worst (the replay collapses in JetStream's duplicate window and
//! against the stream's own tail). It carries the block hash so that a worker resuming from it
//! can tell whether that block is still canonical: progress and rollback are one concept.

use alloy_primitives::B256;
use serde::{Deserialize, Serialize};

/// Last fully published block of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// Number of the last block whose logs are all acknowledged.
    pub block_number: u64,
    /// Hash of that block as the worker saw it.
    pub block_hash: B256,
    /// Rewind epoch this progress belongs to (see `SubscriptionRecord::rewind`): a rewind with
    /// a higher epoch than the cursor's resets it; messages carry the epoch in their id.
    #[serde(default)]
    pub epoch: u64,
}

impl Cursor {
    /// The first block still to be processed after this cursor.
    pub fn next_block(&self) -> u64 {
        self.block_number + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let c = Cursor { block_number: 42, block_hash: B256::repeat_byte(7), epoch: 3 };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), c);
        assert_eq!(c.next_block(), 43);
    }

    #[test]
    fn epoch_defaults_to_zero() {
        let old = r#"{"block_number":1,"block_hash":"0x0000000000000000000000000000000000000000000000000000000000000000"}"#;
        assert_eq!(serde_json::from_str::<Cursor>(old).unwrap().epoch, 0);
    }

    #[test]
    fn rejects_unknown_fields() {
        let bad = r#"{"block_number":1,"block_hash":"0x0000000000000000000000000000000000000000000000000000000000000000","x":1}"#;
        assert!(serde_json::from_str::<Cursor>(bad).is_err());
    }
}
