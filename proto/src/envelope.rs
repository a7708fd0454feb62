//! The message consumers read, and the rule that names it for deduplication.
//!
//! One [`EventEnvelope`] per (subscription, log), serialised as JSON. Decoded arguments follow
//! one convention so consumers in any language can read them without an ABI library:
//! integers are decimal strings (they overflow JSON numbers), addresses are EIP-55 checksummed
//! hex, bytes are `0x`-hex, booleans and strings are native, arrays are arrays, tuples are
//! objects keyed by component name (positional `"0"`, `"1"`, ... when unnamed), and an
//! *indexed* argument of a dynamic type (string, bytes, array) is the 32-byte topic hash,
//! because that is all the log contains.

use alloy_primitives::{Address, B256, Bytes};
use serde::{Deserialize, Serialize};

use crate::ids::{ChainId, SubscriptionId};

/// One contract log, as published to JetStream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Chain the log was emitted on.
    pub chain_id: ChainId,
    /// Subscription this message was published for.
    pub subscription_id: SubscriptionId,
    /// Contract that emitted the log.
    pub address: Address,
    /// Event name, e.g. `Transfer`.
    pub event: String,
    /// Canonical event signature, e.g. `Transfer(address,address,uint256)`.
    pub signature: String,
    /// Block number of the log.
    pub block_number: u64,
    /// Hash of the block the log is in.
    pub block_hash: B256,
    /// Block timestamp in seconds, when the RPC endpoint reports it with the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_timestamp: Option<u64>,
    /// Transaction that emitted the log.
    pub transaction_hash: B256,
    /// Index of that transaction in its block.
    pub transaction_index: u64,
    /// Index of the log in its block.
    pub log_index: u64,
    /// `true` when this message retracts an earlier one whose block was orphaned.
    pub removed: bool,
    /// Which registration of `subscription_id` this is (the etcd revision that created it): a
    /// subscription deleted and registered again under the same id gets a new one.
    #[serde(default)]
    pub registration: u64,
    /// Rewind epoch: 0 until the subscription is first rewound, then incremented by each
    /// rewind. Replayed messages carry the new epoch (and it is part of their message id), so
    /// a rewind is delivered again even inside JetStream's duplicate window.
    #[serde(default)]
    pub rewind_epoch: u64,
    /// Reorg generation of the subscription when this message was published: raised before
    /// every retraction or repair, so a log published again after its retraction (its block
    /// orphaned, then canonical again) has a new message id, while a crash replay in the same
    /// generation keeps its id and is dropped by JetStream.
    #[serde(default)]
    pub reorg_generation: u64,
    /// Decoded arguments by parameter name; `null` when decoding failed (see `decode_error`).
    pub args: serde_json::Value,
    /// Why the log could not be decoded with the subscription's ABI; the raw `topics` and
    /// `data` are still delivered so nothing is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_error: Option<String>,
    /// Raw log topics.
    pub topics: Vec<B256>,
    /// Raw log data.
    pub data: Bytes,
}

impl EventEnvelope {
    /// The JetStream dedup id (`Nats-Msg-Id`) of this message:
    /// `<chain_id>:<subscription_id>@<registration>:<block_hash>:<log_index>`, then
    /// `:e<epoch>` once the subscription has been rewound (epoch > 0), then `:g<generation>`
    /// once a reorg or repair raised the reorg generation (generation > 0), then `:removed` for
    /// a retraction. A retraction carries the generation and epoch of the message it retracts,
    /// so every retraction has an id of its own.
    ///
    /// A log is identified by the block *hash* (not number), so the same log re-included in a
    /// different block after a reorg is a different message, while any redelivery of the same
    /// log (crash replay, takeover) has the same id and is dropped by JetStream. A retraction
    /// gets its own id so dedup never swallows it. A rewind is an explicit request to see logs
    /// again, so the epoch makes replayed messages new to JetStream, while crash redeliveries
    /// within one epoch keep colliding. The registration tells apart a subscription deleted and
    /// registered again under the same id, whose messages are new too.
    pub fn msg_id(&self) -> String {
        let epoch = if self.rewind_epoch > 0 { format!(":e{}", self.rewind_epoch) } else { String::new() };
        let generation =
            if self.reorg_generation > 0 { format!(":g{}", self.reorg_generation) } else { String::new() };
        let removed = if self.removed { ":removed" } else { "" };
        format!(
            "{}:{}@{}:{}:{}{epoch}{generation}{removed}",
            self.chain_id, self.subscription_id, self.registration, self.block_hash, self.log_index
        )
    }

    /// The key a consumer folds the subscription's stream by: (block hash, log index).
    pub fn fold_key(&self) -> (B256, u64) {
        (self.block_hash, self.log_index)
    }

    /// The retraction of this message.
    pub fn retraction(&self) -> Self {
        Self { removed: true, ..self.clone() }
    }

    /// Position of the log in the subscription's order: (block number, log index).
    pub fn position(&self) -> (u64, u64) {
        (self.block_number, self.log_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventEnvelope {
        EventEnvelope {
            chain_id: 1,
            subscription_id: SubscriptionId::new("s").unwrap(),
            address: Address::repeat_byte(0x11),
            event: "Transfer".into(),
            signature: "Transfer(address,address,uint256)".into(),
            block_number: 10,
            block_hash: B256::repeat_byte(0xab),
            block_timestamp: None,
            transaction_hash: B256::repeat_byte(0xcd),
            transaction_index: 0,
            log_index: 3,
            removed: false,
            registration: 7,
            rewind_epoch: 0,
            reorg_generation: 0,
            args: serde_json::json!({"value": "1"}),
            decode_error: None,
            topics: vec![B256::repeat_byte(1)],
            data: Bytes::from_static(&[1, 2]),
        }
    }

    #[test]
    fn msg_id_follows_the_rule() {
        let e = sample();
        assert_eq!(e.msg_id(), format!("1:s@7:{}:3", B256::repeat_byte(0xab)));
        let mut r = e.clone();
        r.removed = true;
        assert_eq!(r.msg_id(), format!("{}:removed", e.msg_id()));
    }

    #[test]
    fn msg_id_changes_with_every_identity_field() {
        let base = sample();
        let mut other = base.clone();
        other.block_hash = B256::repeat_byte(0xac);
        assert_ne!(base.msg_id(), other.msg_id());
        let mut other = base.clone();
        other.log_index = 4;
        assert_ne!(base.msg_id(), other.msg_id());
        let mut other = base.clone();
        other.subscription_id = SubscriptionId::new("t").unwrap();
        assert_ne!(base.msg_id(), other.msg_id());
        let mut other = base.clone();
        other.chain_id = 2;
        assert_ne!(base.msg_id(), other.msg_id());
        let mut other = base.clone();
        other.registration = 8;
        assert_ne!(base.msg_id(), other.msg_id());
        let mut other = base.clone();
        other.rewind_epoch = 1;
        assert_eq!(other.msg_id(), format!("{}:e1", base.msg_id()));
        other.removed = true;
        assert_eq!(other.msg_id(), format!("{}:e1:removed", base.msg_id()));
        other.reorg_generation = 2;
        assert_eq!(other.msg_id(), format!("{}:e1:g2:removed", base.msg_id()));
    }

    #[test]
    fn round_trips_through_json() {
        let e = sample();
        let json = serde_json::to_string(&e).unwrap();
        assert!(!json.contains("decode_error"));
        assert_eq!(serde_json::from_str::<EventEnvelope>(&json).unwrap(), e);
    }
}
