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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Stream sequence of the last message published at or before `block_number` (0: none
    /// known): where the journal of what came after starts.
    #[serde(default)]
    pub stream_seq: u64,
    /// Earlier checkpoints, oldest first, within the reorg window: to find the common ancestor
    /// when `block_hash` is no longer canonical, even after a restart or a takeover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Checkpoint>,
}

/// A block the subscription had fully processed, and the journal position after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Block number.
    pub block_number: u64,
    /// Its hash when processed.
    pub block_hash: B256,
    /// Stream sequence of the last message published at or before it.
    pub stream_seq: u64,
}

impl Cursor {
    /// A cursor at `block_number` without history.
    pub fn at(block_number: u64, block_hash: B256, epoch: u64) -> Self {
        Self { block_number, block_hash, epoch, stream_seq: 0, history: Vec::new() }
    }

    /// The first block still to be processed after this cursor.
    pub fn next_block(&self) -> u64 {
        self.block_number + 1
    }

    /// This cursor's own position as a checkpoint.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            block_number: self.block_number,
            block_hash: self.block_hash,
            stream_seq: self.stream_seq,
        }
    }

    /// The cursor after processing up to `next`: this one joins the history, and checkpoints
    /// more than `window` blocks below `next` are dropped. Pure.
    pub fn advance(&self, next: Checkpoint, window: u64) -> Self {
        let mut history = self.history.clone();
        if self.block_number < next.block_number && !self.block_hash.is_zero() {
            history.push(self.checkpoint());
        }
        history
            .retain(|c| c.block_number + window >= next.block_number && c.block_number < next.block_number);
        Self {
            block_number: next.block_number,
            block_hash: next.block_hash,
            epoch: self.epoch,
            stream_seq: next.stream_seq,
            history,
        }
    }

    /// Every checkpoint, newest first: the cursor itself, then its history.
    pub fn checkpoints_newest_first(&self) -> impl Iterator<Item = Checkpoint> + '_ {
        std::iter::once(self.checkpoint()).chain(self.history.iter().rev().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let c = Cursor::at(42, B256::repeat_byte(7), 3);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), c);
        assert_eq!(c.next_block(), 43);
    }

    #[test]
    fn advancing_keeps_a_bounded_history() {
        let mut c = Cursor::at(10, B256::repeat_byte(1), 0);
        for n in [20u64, 30, 40, 200] {
            c = c.advance(
                Checkpoint { block_number: n, block_hash: B256::repeat_byte(n as u8), stream_seq: n },
                25,
            );
        }
        assert_eq!(c.block_number, 200);
        assert!(c.history.is_empty(), "{:?}", c.history);
        let c = c
            .advance(Checkpoint { block_number: 210, block_hash: B256::repeat_byte(9), stream_seq: 211 }, 25);
        assert_eq!(c.history.iter().map(|h| h.block_number).collect::<Vec<_>>(), [200]);
        let newest: Vec<u64> = c.checkpoints_newest_first().map(|c| c.block_number).collect();
        assert_eq!(newest, [210, 200]);
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
