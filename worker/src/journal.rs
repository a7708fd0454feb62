//! The stream is the journal: what a subscription's subject holds, folded the way a consumer
//! folds it, and reconciled against the canonical chain. Pure: no IO.
//!
//! A consumer keeps the logs it believes canonical keyed by `(block_hash, log_index)`: a
//! message with `removed: false` adds (or re-adds) its key, a retraction removes it
//! (docs/reorgs.md). herald's promise is that this fold ends equal to the canonical chain's
//! logs. Every decision that keeps the promise is taken here, from what the subject holds
//! (whoever published it: an earlier owner, a crashed task, another epoch) and the canonical
//! block hashes, never from what a task remembers:
//!
//! - [`Ledger::fold`] reads the journal above a checkpoint into the set of *live* logs;
//! - [`Ledger::take_orphaned`] retracts the live logs whose block is no longer canonical;
//! - [`Ledger::settle`] takes a range's canonical logs and says what to retract and what to
//!   publish: a log is skipped only when it is live *and* canonical (same block hash), so a
//!   replacement log at the same (block number, log index) is published, and its orphaned
//!   predecessor retracted;
//! - [`Ledger::journal_floor`] keeps the cursor's invariant: every message still live above a
//!   checkpoint has a higher stream sequence than the checkpoint's `journal_seq`, so the next
//!   reconciliation reads everything it must.

use std::collections::{BTreeMap, BTreeSet};

use alloy_primitives::B256;
use herald_proto::EventEnvelope;

/// A message still live in the fold: the latest add of its key.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveLog {
    /// Stream sequence of that add.
    pub seq: u64,
    /// The message.
    pub envelope: EventEnvelope,
}

/// Position of a live log: block number, log index, block hash.
type Slot = (u64, u64, B256);

fn slot(e: &EventEnvelope) -> Slot {
    (e.block_number, e.log_index, e.block_hash)
}

/// Which live logs count as already published for the task at hand: those of its rewind
/// epoch, and, during a rewind's replay, those below the block the replay was asked from
/// (the blocks between the reconciled checkpoint and `from_block` are redone, not replayed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The task's rewind epoch.
    pub epoch: u64,
    /// Below this block, a live log of any epoch counts.
    pub any_epoch_below: u64,
}

impl Published {
    fn covers(&self, e: &EventEnvelope) -> bool {
        e.rewind_epoch == self.epoch || e.block_number < self.any_epoch_below
    }
}

/// What to do with one range.
#[derive(Debug, Default, PartialEq)]
pub struct Settled {
    /// Retractions of live logs from orphaned blocks, newest first.
    pub retract: Vec<EventEnvelope>,
    /// Canonical logs not yet live (or live only in an older epoch), in order.
    pub publish: Vec<EventEnvelope>,
}

/// The live logs of one registration of a subscription for blocks above a checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    above: u64,
    live: BTreeMap<Slot, LiveLog>,
}

impl Ledger {
    /// Nothing live above block `above`.
    pub fn empty(above: u64) -> Self {
        Self { above, live: BTreeMap::new() }
    }

    /// Folds `journal` (messages with their stream sequences, in sequence order) as a
    /// consumer would, keeping the live logs of `registration` for blocks above `above`. A
    /// retraction of a key that is not live is ignored.
    pub fn fold(
        above: u64,
        registration: u64,
        journal: impl IntoIterator<Item = (u64, EventEnvelope)>,
    ) -> Self {
        let mut ledger = Self::empty(above);
        for (seq, e) in journal {
            if e.registration != registration || e.block_number <= above {
                continue;
            }
            if e.removed {
                ledger.live.remove(&slot(&e));
            } else {
                ledger.live.insert(slot(&e), LiveLog { seq, envelope: e });
            }
        }
        ledger
    }

    /// Forgets the live logs at or below `block` (the cursor moved there: they are vouched
    /// for by a canonical checkpoint).
    pub fn forget_through(&mut self, block: u64) {
        self.live = self.live.split_off(&(block + 1, 0, B256::ZERO));
        self.above = self.above.max(block);
    }

    /// The block the ledger starts above.
    pub fn above(&self) -> u64 {
        self.above
    }

    /// Whether nothing is live above the checkpoint.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// How many logs are live.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// The blocks that hold live logs, in `from..=to`.
    pub fn blocks_in(&self, from: u64, to: u64) -> BTreeSet<u64> {
        self.live.range((from, 0, B256::ZERO)..).take_while(|(s, _)| s.0 <= to).map(|(s, _)| s.0).collect()
    }

    /// The live logs (for checks and tests).
    pub fn live(&self) -> impl Iterator<Item = &LiveLog> {
        self.live.values()
    }

    /// Removes and returns, as retractions newest first, every live log whose block's
    /// canonical hash is known (`canonical`) and is another: its block was orphaned. Logs of
    /// blocks whose hash is not known (above the head) stay.
    pub fn take_orphaned(&mut self, canonical: impl Fn(u64) -> Option<B256>) -> Vec<EventEnvelope> {
        let orphaned: Vec<Slot> = self
            .live
            .keys()
            .filter(|(number, _, hash)| canonical(*number).is_some_and(|h| h != *hash))
            .copied()
            .collect();
        orphaned.iter().rev().filter_map(|s| self.live.remove(s)).map(|l| l.envelope.retraction()).collect()
    }

    /// Settles blocks `from..=to` given their canonical logs `fetched` (in order) and the
    /// canonical hash of every block of the range that holds live logs (`canonical`; the
    /// blocks `fetched` has logs in need not be there). Every live log of the range leaves the
    /// ledger: skipped when canonical (and counted `published`), retracted when its block was
    /// orphaned; kept without republishing when its block is canonical but the answer lacks
    /// it (an incomplete answer must never retract a canonical log).
    pub fn settle(
        &mut self,
        from: u64,
        to: u64,
        fetched: Vec<EventEnvelope>,
        canonical: impl Fn(u64) -> Option<B256>,
        published: Published,
    ) -> Settled {
        let hashes: BTreeMap<u64, B256> = fetched.iter().map(|e| (e.block_number, e.block_hash)).collect();
        let in_range: Vec<Slot> = self
            .live
            .range((from, 0, B256::ZERO)..)
            .take_while(|(s, _)| s.0 <= to)
            .map(|(s, _)| *s)
            .collect();
        let mut settled = Settled::default();
        let mut skip: BTreeSet<Slot> = BTreeSet::new();
        let fetched_slots: BTreeSet<Slot> = fetched.iter().map(slot).collect();
        for s in in_range {
            let live = self.live.remove(&s).expect("listed");
            if fetched_slots.contains(&s) {
                if published.covers(&live.envelope) {
                    skip.insert(s);
                }
                continue;
            }
            let hash = hashes.get(&s.0).copied().or_else(|| canonical(s.0));
            debug_assert!(hash.is_some(), "the canonical hash of block {} is needed", s.0);
            if hash.is_some_and(|h| h != s.2) {
                settled.retract.push(live.envelope.retraction());
            }
        }
        settled.retract.reverse();
        settled.publish = fetched.into_iter().filter(|e| !skip.contains(&slot(e))).collect();
        settled
    }

    /// The journal position to record with a checkpoint at `block`: below the sequence of
    /// every log still live above it, else `last_seq` (the newest message known stored).
    pub fn journal_floor(&self, block: u64, last_seq: u64) -> u64 {
        debug_assert!(block >= self.above, "checkpoint {block} below the ledger's {}", self.above);
        self.live
            .range((block + 1, 0, B256::ZERO)..)
            .map(|(_, l)| l.seq)
            .min()
            .map_or(last_seq, |seq| seq.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::SubscriptionId;
    use proptest::prelude::*;

    fn hash(block: u64, fork: u8) -> B256 {
        let mut h = [fork; 32];
        h[..8].copy_from_slice(&block.to_be_bytes());
        B256::from(h)
    }

    fn log(block: u64, fork: u8, index: u64, epoch: u64) -> EventEnvelope {
        EventEnvelope {
            chain_id: 1,
            subscription_id: SubscriptionId::new("s").unwrap(),
            address: Default::default(),
            event: "E".into(),
            signature: "E()".into(),
            block_number: block,
            block_hash: hash(block, fork),
            block_timestamp: None,
            transaction_hash: B256::ZERO,
            transaction_index: 0,
            log_index: index,
            removed: false,
            registration: 1,
            rewind_epoch: epoch,
            reorg_generation: 0,
            args: serde_json::Value::Null,
            decode_error: None,
            topics: vec![],
            data: Default::default(),
        }
    }

    /// A consumer's fold: the set of live keys.
    fn consumer_fold(messages: &[EventEnvelope]) -> BTreeSet<(u64, u64, B256)> {
        let mut live = BTreeSet::new();
        for m in messages {
            if m.removed {
                live.remove(&slot(m));
            } else {
                live.insert(slot(m));
            }
        }
        live
    }

    const EPOCH0: Published = Published { epoch: 0, any_epoch_below: 0 };

    #[test]
    fn a_replacement_at_the_same_position_is_published_and_its_predecessor_retracted() {
        // Defect 7: the old skip compared (block, log index) only.
        let journal = vec![(1, log(5, 0, 0, 0)), (2, log(6, 0, 0, 0))];
        let mut ledger = Ledger::fold(4, 1, journal);
        let fetched = vec![log(5, 1, 0, 0), log(6, 1, 0, 0)];
        let settled = ledger.settle(5, 6, fetched.clone(), |_| None, EPOCH0);
        assert_eq!(settled.publish, fetched);
        assert_eq!(settled.retract, vec![log(6, 0, 0, 0).retraction(), log(5, 0, 0, 0).retraction()]);
        assert!(ledger.is_empty());
    }

    #[test]
    fn a_canonical_live_log_is_skipped_only_in_its_own_epoch() {
        let journal = vec![(1, log(5, 0, 0, 0))];
        let settled = Ledger::fold(4, 1, journal.clone()).settle(
            5,
            5,
            vec![log(5, 0, 0, 1)],
            |_| None,
            Published { epoch: 1, any_epoch_below: 0 },
        );
        assert_eq!(settled.publish.len(), 1, "a rewind replays");
        let settled = Ledger::fold(4, 1, journal).settle(
            5,
            5,
            vec![log(5, 0, 0, 1)],
            |_| None,
            Published { epoch: 1, any_epoch_below: 6 },
        );
        assert!(settled.publish.is_empty(), "below the rewind's block, what is live counts");
    }

    #[test]
    fn an_incomplete_answer_never_retracts_a_canonical_log() {
        let mut ledger = Ledger::fold(4, 1, vec![(1, log(5, 0, 0, 0)), (2, log(5, 0, 1, 0))]);
        let settled = ledger.settle(5, 5, vec![log(5, 0, 0, 0)], |_| Some(hash(5, 0)), EPOCH0);
        assert_eq!(settled, Settled::default());
    }

    #[test]
    fn journal_floor_stays_below_what_is_live() {
        let ledger = Ledger::fold(
            4,
            1,
            vec![(7, log(5, 0, 0, 0)), (9, log(8, 0, 0, 0)), (10, log(8, 0, 0, 0).retraction())],
        );
        assert_eq!(ledger.journal_floor(4, 20), 6);
        assert_eq!(ledger.journal_floor(5, 20), 20);
        let other = Ledger::fold(4, 2, vec![(7, log(5, 0, 0, 0))]);
        assert!(other.is_empty(), "another registration's messages are not ours");
    }

    /// A journal of adds and retractions of logs of two forks; the canonical chain is fork 0
    /// below `fork_at` and fork 1 from it on.
    fn arbitrary_journal() -> impl Strategy<Value = (Vec<EventEnvelope>, u64)> {
        let message = (1u64..12, 0u8..2, 0u64..3, 0u64..2, any::<bool>());
        (prop::collection::vec(message, 0..40), 1u64..13).prop_map(|(ms, fork_at)| {
            let ms = ms
                .into_iter()
                .map(|(b, f, i, epoch, removed)| EventEnvelope { removed, ..log(b, f, i, epoch) })
                .collect();
            (ms, fork_at)
        })
    }

    proptest! {
        /// Whatever the subject holds (adds and retractions of orphaned and canonical logs, of
        /// two epochs), reconciling then settling the whole range leaves the consumer's fold
        /// equal to the canonical logs, and never publishes a log already live in the epoch.
        #[test]
        fn reconciling_any_journal_folds_to_the_canonical_chain(
            (journal, fork_at) in arbitrary_journal(),
            present in prop::collection::vec(prop::collection::vec(any::<bool>(), 3), 12),
            epoch in 0u64..2,
        ) {
            let canonical_fork = |b: u64| u8::from(b >= fork_at);
            let canonical_hash = |b: u64| Some(hash(b, canonical_fork(b)));
            let canonical: Vec<EventEnvelope> = (1..12u64)
                .flat_map(|b| {
                    let row = present[b as usize].clone();
                    (0..3u64).filter(move |i| row[*i as usize]).map(move |i| (b, i))
                })
                .map(|(b, i)| log(b, canonical_fork(b), i, epoch))
                .collect();
            let sequenced: Vec<(u64, EventEnvelope)> = (1..).zip(journal.iter().cloned()).collect();
            let mut ledger = Ledger::fold(0, 1, sequenced);
            let before = consumer_fold(&journal);
            let mut stream = journal.clone();
            let orphaned = ledger.take_orphaned(canonical_hash);
            stream.extend(orphaned.iter().cloned());
            let settled = ledger.settle(1, 11, canonical.clone(), canonical_hash, Published { epoch, any_epoch_below: 0 });
            prop_assert!(settled.retract.is_empty(), "all orphans were taken first");
            for p in &settled.publish {
                let live_same_epoch = before.contains(&slot(p))
                    && journal.iter().rev().find(|m| slot(m) == slot(p)).is_some_and(|m| !m.removed && m.rewind_epoch == epoch);
                prop_assert!(!live_same_epoch, "republished a live log of the epoch: {:?}", slot(p));
            }
            stream.extend(settled.publish);
            let want: BTreeSet<_> = canonical.iter().map(slot).collect();
            // A canonical log live in the fold but missing from `canonical` cannot exist: the
            // present flags decide both.
            let got: BTreeSet<_> = consumer_fold(&stream).into_iter().filter(|s| {
                canonical_hash(s.0) != Some(s.2) || want.contains(s)
            }).collect();
            prop_assert_eq!(got, want);
            prop_assert!(orphaned.iter().all(|r| r.removed));
        }
    }
}
