//! The soak's verdict on one subscription, from what a consumer reads and what the chain says.
//!
//! Pure: it gets the subject's messages as a JetStream consumer read them (with the time the
//! stream stored each and the worker that published it), the canonical logs from a raw
//! `eth_getLogs`, and the history the soak recorded (reorgs injected, pauses, the owner keys'
//! values in revision order), and counts what went wrong. Nothing here uses herald's code
//! beyond the envelope's JSON shape.
//!
//! The fold is the one `docs/reorgs.md` gives consumers: keyed by `(block_hash, log_index)`,
//! an add inserts, a retraction removes, and a replay under a higher `rewind_epoch` refreshes
//! a live key.

use std::collections::{BTreeMap, BTreeSet};

use alloy_primitives::B256;
use herald_proto::EventEnvelope;

/// A message as the consumer read it.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The message.
    pub envelope: EventEnvelope,
    /// When the stream stored it, Unix milliseconds.
    pub stored_at_ms: u64,
    /// Its `Herald-Worker` header.
    pub publisher: Option<String>,
}

/// A log of the canonical chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CanonicalLog {
    /// Its block number.
    pub block_number: u64,
    /// Its block hash.
    pub block_hash: B256,
    /// Its index in the block.
    pub log_index: u64,
}

/// A reorg the soak injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedReorg {
    /// The head before it.
    pub head_before: u64,
    /// How many blocks it replaced.
    pub depth: u64,
}

impl InjectedReorg {
    /// Whether it replaced block `number` and was deeper than `confirmations`: the only
    /// reorgs that may retract a log of a subscription with that many confirmations.
    fn explains(&self, number: u64, confirmations: u64) -> bool {
        self.depth > confirmations && number + self.depth > self.head_before && number <= self.head_before
    }
}

/// Everything the verdict on one subscription needs.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// The subject's messages in stream order (every registration's).
    pub messages: Vec<Delivered>,
    /// The registration being judged (create revision of its record); older ones are ignored.
    pub registration: u64,
    /// The canonical logs it must hold once caught up.
    pub canonical: Vec<CanonicalLog>,
    /// Its confirmations.
    pub confirmations: u64,
    /// Every reorg injected.
    pub reorgs: Vec<InjectedReorg>,
    /// Intervals (Unix ms, from the pause's acknowledgement to the resume request) in which
    /// no message may be stored, already shortened by the grace a worker has to notice.
    pub paused: Vec<(u64, u64)>,
    /// The owner keys' values since the registration, in revision order.
    pub owners: Vec<String>,
}

/// What went wrong in one subscription (all zero when it held).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Canonical logs the fold lacks.
    pub lost: u64,
    /// Adds of a live log in the same or an older rewind epoch, and retractions repeated.
    pub dup: u64,
    /// Logs the fold holds that are not canonical.
    pub extra: u64,
    /// Adds below the previous add with no retraction, rewind or new generation between.
    pub order: u64,
    /// Retractions of a log never published.
    pub unmatched: u64,
    /// Messages published by a worker out of the owner keys' order (an older owner acting
    /// after a newer one).
    pub stale: u64,
    /// Messages stored while the subscription was paused.
    pub paused: u64,
    /// Retractions in a subscription with confirmations that no deeper reorg explains.
    pub unexplained: u64,
}

impl Counts {
    /// Adds `other` in.
    pub fn add(&mut self, other: &Counts) {
        self.lost += other.lost;
        self.dup += other.dup;
        self.extra += other.extra;
        self.order += other.order;
        self.unmatched += other.unmatched;
        self.stale += other.stale;
        self.paused += other.paused;
        self.unexplained += other.unexplained;
    }

    /// Whether everything is zero.
    pub fn clean(&self) -> bool {
        *self == Counts::default()
    }
}

/// Judges one subscription; also returns how many logs its fold holds.
pub fn judge(evidence: &Evidence) -> (Counts, usize) {
    let (counts, held, _) = judge_in_detail(evidence);
    (counts, held)
}

/// [`judge`], with the canonical logs the fold lacks (for the report of a failing run).
pub fn judge_in_detail(evidence: &Evidence) -> (Counts, usize, Vec<CanonicalLog>) {
    let mut counts = Counts::default();
    let messages: Vec<&Delivered> =
        evidence.messages.iter().filter(|m| m.envelope.registration == evidence.registration).collect();

    // The fold, with the live entry's epoch; every key ever added; the last event per key.
    let mut live: BTreeMap<(B256, u64), u64> = BTreeMap::new();
    let mut ever_added: BTreeSet<(B256, u64)> = BTreeSet::new();
    let mut retracted: BTreeSet<(B256, u64, u64)> = BTreeSet::new();
    let mut last_add: Option<(u64, u64)> = None;
    let mut last_era = (0, 0);
    for m in &messages {
        let e = &m.envelope;
        let key = e.fold_key();
        let era = (e.rewind_epoch, e.reorg_generation);
        if era != last_era {
            last_add = None;
            last_era = era;
        }
        if e.removed {
            if !ever_added.contains(&key) {
                counts.unmatched += 1;
            } else if live.remove(&key).is_none() && !retracted.insert((key.0, key.1, e.rewind_epoch)) {
                counts.dup += 1;
            }
            if evidence.confirmations > 0
                && !evidence.reorgs.iter().any(|r| r.explains(e.block_number, evidence.confirmations))
            {
                counts.unexplained += 1;
            }
            last_add = None;
        } else {
            match live.get(&key) {
                Some(&epoch) if epoch >= e.rewind_epoch => counts.dup += 1,
                _ => {}
            }
            live.insert(key, e.rewind_epoch);
            ever_added.insert(key);
            retracted.retain(|r| (r.0, r.1) != key);
            if last_add.is_some_and(|last| last >= e.position()) {
                counts.order += 1;
            }
            last_add = Some(e.position());
        }
        if evidence.paused.iter().any(|&(from, to)| m.stored_at_ms > from && m.stored_at_ms < to) {
            counts.paused += 1;
        }
    }

    let canonical: BTreeSet<(B256, u64)> =
        evidence.canonical.iter().map(|l| (l.block_hash, l.log_index)).collect();
    counts.lost = canonical.iter().filter(|k| !live.contains_key(k)).count() as u64;
    counts.extra = live.keys().filter(|k| !canonical.contains(k)).count() as u64;
    counts.stale = out_of_owner_order(&messages, &evidence.owners);
    let lost = evidence
        .canonical
        .iter()
        .filter(|l| !live.contains_key(&(l.block_hash, l.log_index)))
        .copied()
        .collect();
    (counts, live.len(), lost)
}

/// Messages whose publisher breaks the owners' order: the publishers, in stream order and with
/// repeats collapsed, must be a subsequence of the owner keys' values in revision order (a
/// worker publishes only while it holds the key; a worker that lost it and acts after the next
/// owner did is out of order). Returns how many messages break it.
fn out_of_owner_order(messages: &[&Delivered], owners: &[String]) -> u64 {
    let mut position = 0;
    let mut broken = 0;
    for m in messages {
        let Some(publisher) = &m.publisher else { continue };
        match owners[position..].iter().position(|o| o == publisher) {
            Some(ahead) => position += ahead,
            None => broken += 1,
        }
    }
    broken
}

#[cfg(test)]
mod tests {
    use alloy_primitives::{Address, Bytes};
    use herald_proto::SubscriptionId;

    use super::*;

    fn hash(n: u8) -> B256 {
        B256::repeat_byte(n)
    }

    fn message(block: u64, hash_byte: u8, index: u64, removed: bool, publisher: &str) -> Delivered {
        Delivered {
            envelope: EventEnvelope {
                chain_id: 1,
                subscription_id: SubscriptionId::new("s").unwrap(),
                address: Address::ZERO,
                event: "Transfer".into(),
                signature: "Transfer(address,address,uint256)".into(),
                block_number: block,
                block_hash: hash(hash_byte),
                block_timestamp: None,
                transaction_hash: B256::ZERO,
                transaction_index: 0,
                log_index: index,
                removed,
                registration: 7,
                rewind_epoch: 0,
                reorg_generation: 0,
                args: serde_json::Value::Null,
                decode_error: None,
                topics: vec![],
                data: Bytes::new(),
            },
            stored_at_ms: 1000 + block,
            publisher: Some(publisher.into()),
        }
    }

    fn canonical(logs: &[(u64, u8, u64)]) -> Vec<CanonicalLog> {
        logs.iter()
            .map(|&(n, h, i)| CanonicalLog { block_number: n, block_hash: hash(h), log_index: i })
            .collect()
    }

    fn evidence(messages: Vec<Delivered>, logs: &[(u64, u8, u64)]) -> Evidence {
        Evidence {
            messages,
            registration: 7,
            canonical: canonical(logs),
            owners: vec!["w1".into(), "w2".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_reorg_folded_through_its_retraction_is_clean() {
        let mut retraction = message(2, 2, 0, true, "w1");
        retraction.envelope.reorg_generation = 1;
        let mut replacement = message(2, 9, 0, false, "w2");
        replacement.envelope.reorg_generation = 1;
        let messages =
            vec![message(1, 1, 0, false, "w1"), message(2, 2, 0, false, "w1"), retraction, replacement];
        let (counts, held) = judge(&evidence(messages, &[(1, 1, 0), (2, 9, 0)]));
        assert_eq!(counts, Counts::default());
        assert_eq!(held, 2);
    }

    #[test]
    fn lost_extra_duplicate_and_unmatched_logs_are_counted() {
        let messages = vec![
            message(1, 1, 0, false, "w1"),
            message(1, 1, 0, false, "w1"),
            message(3, 3, 0, false, "w1"),
            message(4, 4, 0, true, "w1"),
        ];
        let (counts, _, lost) = judge_in_detail(&evidence(messages, &[(1, 1, 0), (2, 2, 0)]));
        assert_eq!(counts.lost, 1);
        assert_eq!(lost.iter().map(|l| (l.block_number, l.log_index)).collect::<Vec<_>>(), [(2, 0)]);
        assert_eq!(counts.extra, 1);
        assert_eq!(counts.dup, 1);
        assert_eq!(counts.order, 1);
        assert_eq!(counts.unmatched, 1);
    }

    #[test]
    fn a_replay_under_a_higher_epoch_is_no_duplicate_and_restarts_the_order() {
        let mut replay = message(1, 1, 0, false, "w1");
        replay.envelope.rewind_epoch = 1;
        let messages = vec![message(1, 1, 0, false, "w1"), message(2, 2, 0, false, "w1"), replay];
        let (counts, _) = judge(&evidence(messages, &[(1, 1, 0), (2, 2, 0)]));
        assert_eq!(counts, Counts::default());
    }

    #[test]
    fn an_old_owner_publishing_after_the_new_one_is_stale() {
        let messages =
            vec![message(1, 1, 0, false, "w1"), message(2, 2, 0, false, "w2"), message(3, 3, 0, false, "w1")];
        let (counts, _) = judge(&evidence(messages, &[(1, 1, 0), (2, 2, 0), (3, 3, 0)]));
        assert_eq!(counts.stale, 1);
        let mut owned_again = evidence(vec![], &[]);
        owned_again.owners.push("w1".into());
        owned_again.messages =
            vec![message(1, 1, 0, false, "w1"), message(2, 2, 0, false, "w2"), message(3, 3, 0, false, "w1")];
        owned_again.canonical = canonical(&[(1, 1, 0), (2, 2, 0), (3, 3, 0)]);
        assert_eq!(judge(&owned_again).0, Counts::default());
    }

    #[test]
    fn retractions_with_confirmations_need_a_deeper_reorg_over_their_block() {
        let messages = vec![message(5, 5, 0, false, "w1"), message(5, 5, 0, true, "w1")];
        let mut e = evidence(messages, &[]);
        e.confirmations = 2;
        e.reorgs =
            vec![InjectedReorg { head_before: 8, depth: 2 }, InjectedReorg { head_before: 20, depth: 5 }];
        assert_eq!(judge(&e).0.unexplained, 1, "depth 2 is not deeper than 2; the other missed block 5");
        e.reorgs.push(InjectedReorg { head_before: 7, depth: 3 });
        assert_eq!(judge(&e).0.unexplained, 0);
    }

    #[test]
    fn messages_stored_inside_a_pause_are_counted_and_older_registrations_ignored() {
        let mut old = message(9, 9, 0, false, "w1");
        old.envelope.registration = 3;
        let messages = vec![old, message(1, 1, 0, false, "w1"), message(2, 2, 0, false, "w1")];
        let mut e = evidence(messages, &[(1, 1, 0), (2, 2, 0)]);
        e.paused = vec![(1001, 1010)];
        let (counts, held) = judge(&e);
        assert_eq!(counts.paused, 1);
        assert_eq!(counts.extra, 0);
        assert_eq!(held, 2);
    }
}
