//! A subscription's durable progress.
//!
//! The cursor names the last block whose matching logs have *all* been acknowledged by
//! JetStream, along the chain whose block at that height had `block_hash`. It is written to
//! etcd only after those acks, so a crash at any point replays from `block_number + 1` at
//! worst (the replay is reconciled against the stream, which is the journal of what was
//! published). Progress and rollback are one concept: the cursor carries the hashes of earlier
//! checkpoints, so a worker that finds its block orphaned knows where to go back to.
//!
//! Each checkpoint also says where the journal must be read from to see everything that may
//! still be live above it ([`Checkpoint::journal_seq`]): the invariant that makes
//! reconciliation exact is that *every message still live in the fold for a block above a
//! checkpoint has a stream sequence above its `journal_seq`*.

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
    /// Reorg generation: raised (and committed) before any retraction or repair is published,
    /// and carried in the id of every message published after it, so a log added again after
    /// its retraction is new to JetStream's duplicate window (A-B-A), while a crash replay in
    /// the same generation still collapses.
    #[serde(default)]
    pub generation: u64,
    /// Stream sequence of the last message of the subscription known stored when this cursor
    /// was written (0: none): a subject whose tail is below it lost acknowledged messages.
    #[serde(default)]
    pub stream_seq: u64,
    /// Where the journal must be read from to see every message still live above
    /// `block_number` (see the module docs).
    #[serde(default)]
    pub journal_seq: u64,
    /// Earlier checkpoints, oldest first, spaced exponentially (see [`Cursor::advance`]): to
    /// find the common ancestor when `block_hash` is no longer canonical, even after a restart
    /// or a takeover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Checkpoint>,
}

/// A block the subscription had fully processed, and where its journal starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Block number.
    pub block_number: u64,
    /// Its hash when processed.
    pub block_hash: B256,
    /// Every message still live for a block above this one has a higher stream sequence.
    #[serde(alias = "stream_seq")]
    pub journal_seq: u64,
    /// Every message about a block at or below this one has a stream sequence at or below
    /// this: what the cursor had seen stored when it was here (0: not known). A subject that
    /// lost its tail above it still holds all of them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stored_seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Bytes of an earlier checkpoint's hash kept in a stored cursor. History checkpoints only
/// ever answer "is this block still canonical?", for which 64 bits are plenty (a wrong "yes"
/// needs a replaced block whose hash shares them: odds of 2^-64); the cursor's own block keeps
/// its whole hash, which becomes the parent hash that the next range must link to.
pub const SHORT_HASH_BYTES: usize = 8;

impl Checkpoint {
    /// Whether `hash` is this checkpoint's block: compares what a stored cursor keeps of the
    /// hash ([`SHORT_HASH_BYTES`]), so it holds whether the checkpoint was read back from etcd
    /// or not.
    pub fn is_block(&self, hash: &B256) -> bool {
        self.block_hash[..SHORT_HASH_BYTES] == hash[..SHORT_HASH_BYTES]
    }
}

/// A stored cursor that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable cursor: {0}")]
pub struct CursorError(String);

/// First byte of the binary encoding (version 1); JSON, the first format, starts with `{`.
const BINARY_V1: u8 = 0xC1;

/// Most history checkpoints a stored cursor may hold ([`thin`] keeps at most 128).
const MAX_STORED_HISTORY: u64 = 256;

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `after - before`, zigzag-encoded so that small moves either way stay small.
fn put_delta(out: &mut Vec<u8>, before: u64, after: u64) {
    let d = after.wrapping_sub(before) as i64;
    put_varint(out, ((d << 1) ^ (d >> 63)) as u64);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], CursorError> {
        if self.0.len() < n {
            return Err(CursorError("truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, CursorError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.bytes(1)?[0];
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(CursorError("varint longer than 64 bits".into()))
    }

    fn delta(&mut self, before: u64) -> Result<u64, CursorError> {
        let z = self.varint()?;
        let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
        Ok(before.wrapping_add(d as u64))
    }

    fn hash(&mut self, len: usize) -> Result<B256, CursorError> {
        let mut hash = B256::ZERO;
        hash[..len].copy_from_slice(self.bytes(len)?);
        Ok(hash)
    }
}

impl Cursor {
    /// A cursor at `block_number` without history.
    pub fn at(block_number: u64, block_hash: B256, epoch: u64) -> Self {
        Self {
            block_number,
            block_hash,
            epoch,
            generation: 0,
            stream_seq: 0,
            journal_seq: 0,
            history: Vec::new(),
        }
    }

    /// The stored form: compact binary (the cursor's own hash whole, earlier checkpoints by
    /// distance, the first [`SHORT_HASH_BYTES`] of their hash and their journal positions as
    /// differences): a few hundred bytes where JSON with hex hashes took up to 15 KB, written
    /// to etcd at every commit.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.history.len() * 16);
        out.push(BINARY_V1);
        put_varint(&mut out, self.block_number);
        out.extend_from_slice(self.block_hash.as_slice());
        for n in [self.epoch, self.generation, self.stream_seq, self.journal_seq] {
            put_varint(&mut out, n);
        }
        put_varint(&mut out, self.history.len() as u64);
        let mut newer = self.checkpoint();
        for c in self.history.iter().rev() {
            put_varint(&mut out, newer.block_number.wrapping_sub(c.block_number));
            out.extend_from_slice(&c.block_hash[..SHORT_HASH_BYTES]);
            put_delta(&mut out, newer.journal_seq, c.journal_seq);
            // What was stored when a checkpoint was written is close to where its journal starts.
            put_delta(&mut out, c.journal_seq, c.stored_seq);
            newer = *c;
        }
        out
    }

    /// Reads a stored cursor: [`Self::encode`]'s form, or the JSON of earlier versions.
    pub fn decode(bytes: &[u8]) -> Result<Self, CursorError> {
        match bytes.first() {
            Some(b'{') => serde_json::from_slice(bytes).map_err(|e| CursorError(e.to_string())),
            Some(&BINARY_V1) => Self::decode_v1(&bytes[1..]),
            Some(other) => Err(CursorError(format!("unknown format {other:#04x}"))),
            None => Err(CursorError("empty".into())),
        }
    }

    fn decode_v1(bytes: &[u8]) -> Result<Self, CursorError> {
        let mut r = Reader(bytes);
        let block_number = r.varint()?;
        let block_hash = r.hash(32)?;
        let (epoch, generation, stream_seq, journal_seq) =
            (r.varint()?, r.varint()?, r.varint()?, r.varint()?);
        let count = r.varint()?;
        if count > MAX_STORED_HISTORY {
            return Err(CursorError(format!("{count} history checkpoints")));
        }
        let mut cursor =
            Self { block_number, block_hash, epoch, generation, stream_seq, journal_seq, history: vec![] };
        let mut newer = cursor.checkpoint();
        let mut history = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let distance = r.varint()?;
            if distance == 0 || distance > newer.block_number {
                return Err(CursorError(format!(
                    "checkpoint {distance} blocks below block {}",
                    newer.block_number
                )));
            }
            let block_hash = r.hash(SHORT_HASH_BYTES)?;
            let journal_seq = r.delta(newer.journal_seq)?;
            let c = Checkpoint {
                block_number: newer.block_number - distance,
                block_hash,
                journal_seq,
                stored_seq: r.delta(journal_seq)?,
            };
            history.push(c);
            newer = c;
        }
        if !r.0.is_empty() {
            return Err(CursorError(format!("{} bytes after the cursor", r.0.len())));
        }
        history.reverse();
        cursor.history = history;
        Ok(cursor)
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
            journal_seq: self.journal_seq,
            stored_seq: self.stream_seq,
        }
    }

    /// The cursor after processing up to `next` (with `stream_seq` the last message known
    /// stored): this one joins the history, which keeps the newest checkpoint of each
    /// power-of-two distance below `next` ([`thin`]). Pure.
    pub fn advance(&self, next: Checkpoint, stream_seq: u64) -> Self {
        let mut history = self.history.clone();
        if self.block_number < next.block_number && !self.block_hash.is_zero() {
            history.push(self.checkpoint());
        }
        history.retain(|c| c.block_number < next.block_number);
        Self {
            block_number: next.block_number,
            block_hash: next.block_hash,
            epoch: self.epoch,
            generation: self.generation,
            stream_seq: stream_seq.max(self.stream_seq),
            journal_seq: next.journal_seq,
            history: thin(history, next.block_number),
        }
    }

    /// The cursor moved back to `to` (an unwind, a rewind or a repair): checkpoints at or
    /// above it are dropped, since what they vouched for is being redone. Pure.
    pub fn back_to(&self, to: Checkpoint, epoch: u64, generation: u64, stream_seq: u64) -> Self {
        let history = self.checkpoints_newest_first().filter(|c| c.block_number < to.block_number).collect();
        let mut history: Vec<Checkpoint> = history;
        history.reverse();
        Self {
            block_number: to.block_number,
            block_hash: to.block_hash,
            epoch,
            generation,
            stream_seq: stream_seq.max(self.stream_seq),
            journal_seq: to.journal_seq,
            history: thin(history, to.block_number),
        }
    }

    /// The cursor once the subject is known to end at stream sequence `tail_seq`, below what
    /// this cursor says was stored (a server lost messages it had acknowledged, and hands
    /// their sequences out again). The lost messages may have been retractions, so older
    /// messages are live again: the journal position of a checkpoint written after the tail
    /// no longer holds. Those take the position of the newest checkpoint the subject still
    /// holds whole ([`Self::survives_loss`]; the start of the subject if none), which was true
    /// when it was written and stays true for everything above it. Reading from lower is
    /// always safe. Pure.
    pub fn after_loss(&self, tail_seq: u64) -> Self {
        let floor = self.survives_loss(tail_seq).map_or(0, |c| c.journal_seq);
        let survives = |c: &Checkpoint| c.stored_seq > 0 && c.stored_seq <= tail_seq;
        let clamp = |c: &Checkpoint| Checkpoint {
            journal_seq: if survives(c) { c.journal_seq } else { c.journal_seq.min(floor) },
            ..*c
        };
        Self {
            stream_seq: self.stream_seq.min(tail_seq),
            journal_seq: self.journal_seq.min(floor),
            history: self.history.iter().map(clamp).collect(),
            ..self.clone()
        }
    }

    /// The newest checkpoint whose blocks' messages a subject ending at stream sequence
    /// `tail_seq` still holds, all of them: what lies above it must be published again. Not
    /// the tail message's block: after a reorg, retractions go newest first and the
    /// replacements follow from the fork, so what came after the tail may concern blocks far
    /// below it. Pure.
    pub fn survives_loss(&self, tail_seq: u64) -> Option<Checkpoint> {
        self.checkpoints_newest_first().find(|c| c.stored_seq > 0 && c.stored_seq <= tail_seq)
    }

    /// Every checkpoint, newest first: the cursor itself, then its history.
    pub fn checkpoints_newest_first(&self) -> impl Iterator<Item = Checkpoint> + '_ {
        std::iter::once(self.checkpoint()).chain(self.history.iter().rev().copied())
    }
}

/// Keeps, of checkpoints below block `top` (oldest first), the oldest and the newest one of
/// each distance class `[2^k, 2^(k+1))` from `top`, so checkpoints age into the higher classes
/// as the cursor moves on while each class keeps a recent one. A reorg `d` blocks deep
/// therefore finds a checkpoint still canonical a small multiple of `d` blocks down
/// (property-tested: under 8x the depth of the best checkpoint ever recorded), the oldest
/// checkpoint (where the epoch's progress began) is never dropped, and the history holds at
/// most 128 entries (about `2 log2` of the blocks covered). Pure.
pub fn thin(history: Vec<Checkpoint>, top: u64) -> Vec<Checkpoint> {
    let class = |c: &Checkpoint| 64 - (top - c.block_number).leading_zeros();
    let mut kept: Vec<Checkpoint> = Vec::with_capacity(history.len());
    for c in history.into_iter().filter(|c| c.block_number < top) {
        let n = kept.len();
        // Two of the class already: the newer of them is replaced by this newer still.
        if n >= 2 && class(&kept[n - 1]) == class(&c) && class(&kept[n - 2]) == class(&c) {
            kept[n - 1] = c;
        } else {
            kept.push(c);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cp(n: u64) -> Checkpoint {
        let mut hash = [0xff; 32];
        hash[..8].copy_from_slice(&n.to_be_bytes());
        Checkpoint { block_number: n, block_hash: B256::from(hash), journal_seq: n, stored_seq: n }
    }

    #[test]
    fn round_trips_through_json() {
        let c = Cursor::at(42, B256::repeat_byte(7), 3);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), c);
        assert_eq!(c.next_block(), 43);
    }

    #[test]
    fn advancing_keeps_a_thinned_history() {
        let mut c = Cursor::at(10, B256::repeat_byte(1), 0);
        for n in [20u64, 30, 40, 200] {
            c = c.advance(cp(n), n);
        }
        assert_eq!(c.block_number, 200);
        let kept: Vec<u64> = c.history.iter().map(|h| h.block_number).collect();
        // Distances 190, 180, 170, 160: all in [128, 256), the oldest and the newest stay.
        assert_eq!(kept, [10, 40]);
        let c = c.advance(cp(210), 211);
        let newest: Vec<u64> = c.checkpoints_newest_first().map(|c| c.block_number).collect();
        assert_eq!(newest, [210, 200, 40, 10]);
        assert_eq!(c.stream_seq, 211);
    }

    #[test]
    fn a_lost_tail_is_redone_from_the_newest_checkpoint_stored_below_it() {
        // Blocks 10, 20, 30 committed with 10, 20, 30 messages stored; their journals start
        // at 5, 15, 25.
        let mut c = Cursor::at(1, B256::repeat_byte(1), 0);
        for n in [10u64, 20, 30] {
            c = c.advance(Checkpoint { journal_seq: n - 5, ..cp(n) }, n);
        }
        // The subject ends at 24: block 20's checkpoint (20 stored) survives, 30's does not.
        assert_eq!(c.survives_loss(24).map(|s| s.block_number), Some(20));
        let after = c.after_loss(24);
        assert_eq!(after.stream_seq, 24);
        // What came after 24 may have retracted anything live above block 20: its journal
        // position (15) bounds every checkpoint above it, those below keep theirs.
        let journals: Vec<(u64, u64)> =
            after.checkpoints_newest_first().map(|c| (c.block_number, c.journal_seq)).collect();
        assert_eq!(journals, [(30, 15), (20, 15), (10, 5), (1, 0)]);
        // Nothing survives below the first store: everything is redone, the whole subject read.
        assert!(c.survives_loss(9).is_none());
        assert!(c.after_loss(9).checkpoints_newest_first().all(|c| c.journal_seq == 0));
    }

    #[test]
    fn going_back_drops_what_is_redone() {
        let mut c = Cursor::at(1, B256::repeat_byte(1), 0);
        for n in 2..=40 {
            c = c.advance(cp(n), n);
        }
        let back = c.back_to(cp(33), 0, 5, 0);
        assert_eq!(back.block_number, 33);
        assert_eq!(back.generation, 5);
        assert_eq!(back.stream_seq, 40, "the last stored message is still known");
        assert!(back.history.iter().all(|h| h.block_number < 33));
        assert!(!back.history.is_empty());
    }

    #[test]
    fn old_cursors_still_read() {
        let old = r#"{"block_number":1,"block_hash":"0x0000000000000000000000000000000000000000000000000000000000000000","stream_seq":4,"history":[{"block_number":0,"block_hash":"0x0000000000000000000000000000000000000000000000000000000000000000","stream_seq":2}]}"#;
        let c = serde_json::from_str::<Cursor>(old).unwrap();
        assert_eq!((c.epoch, c.generation, c.stream_seq, c.journal_seq), (0, 0, 4, 0));
        assert_eq!(c.history[0].journal_seq, 2);
    }

    /// `c` as it reads back from etcd: history hashes cut to [`SHORT_HASH_BYTES`].
    fn stored(c: &Cursor) -> Cursor {
        let mut c = c.clone();
        for h in &mut c.history {
            h.block_hash[SHORT_HASH_BYTES..].fill(0);
        }
        c
    }

    #[test]
    fn stored_cursors_are_small_whatever_the_history() {
        // A subscription live at the head for a million blocks, one commit a block.
        let mut c = Cursor::at(19_000_000, B256::repeat_byte(1), 0);
        let mut seq = 1_000_000u64;
        for n in 19_000_001..=20_000_000u64 {
            if n % 3 == 0 {
                seq += 4;
            }
            c = c.advance(Checkpoint { journal_seq: seq - 2, ..cp(n) }, seq);
        }
        let live = c.encode();
        assert_eq!(Cursor::decode(&live).unwrap(), stored(&c));
        assert!(
            live.len() < 512,
            "a live cursor takes {} bytes ({} checkpoints)",
            live.len(),
            c.history.len()
        );
        // The worst: 128 checkpoints, all distances and positions large.
        let history: Vec<Checkpoint> = (0..128u64)
            .map(|i| Checkpoint {
                block_number: i * (u64::MAX / 256),
                block_hash: B256::repeat_byte(i as u8),
                journal_seq: u64::MAX - i,
                stored_seq: i << 56,
            })
            .collect();
        let worst = Cursor { history, ..Cursor::at(u64::MAX / 2 + 1, B256::repeat_byte(9), u64::MAX) };
        let bytes = worst.encode();
        assert_eq!(Cursor::decode(&bytes).unwrap(), stored(&worst));
        assert!(bytes.len() <= 4096, "{} bytes", bytes.len());
    }

    #[test]
    fn json_cursors_of_earlier_versions_still_decode() {
        let c = Cursor { history: vec![cp(3), cp(7)], ..Cursor::at(9, B256::repeat_byte(2), 1) };
        assert_eq!(Cursor::decode(&serde_json::to_vec(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn garbage_is_an_error_not_a_cursor() {
        let good = Cursor { history: vec![cp(3), cp(7)], ..Cursor::at(9, B256::repeat_byte(2), 1) }.encode();
        for cut in 0..good.len() {
            assert!(Cursor::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Cursor::decode(&long).is_err());
        assert!(Cursor::decode(b"\x07abc").is_err());
    }

    #[test]
    fn rejects_unknown_fields() {
        let bad = r#"{"block_number":1,"block_hash":"0x0000000000000000000000000000000000000000000000000000000000000000","x":1}"#;
        assert!(serde_json::from_str::<Cursor>(bad).is_err());
    }

    proptest! {
        /// Any cursor reads back as itself, history hashes cut short, and its checkpoints
        /// still recognise their blocks.
        #[test]
        fn encoding_round_trips(
            top in 1u64..u64::MAX / 2,
            seqs in prop::collection::vec((1u64..1 << 40, any::<u64>(), any::<u64>(), any::<[u8; 32]>()), 0..128),
            head in any::<(u64, u64, u64, u64)>(),
        ) {
            let mut number = top;
            let mut history = Vec::new();
            for (gap, journal_seq, stored_seq, hash) in seqs {
                if gap >= number { break; }
                number -= gap;
                history.push(Checkpoint { block_number: number, block_hash: B256::from(hash), journal_seq, stored_seq });
            }
            history.reverse();
            let c = Cursor {
                block_number: top, block_hash: B256::repeat_byte(3),
                epoch: head.0, generation: head.1, stream_seq: head.2, journal_seq: head.3, history,
            };
            let read = Cursor::decode(&c.encode()).unwrap();
            prop_assert_eq!(&read, &stored(&c));
            for (a, b) in read.history.iter().zip(&c.history) {
                prop_assert!(a.is_block(&b.block_hash));
            }
        }

        /// Whatever ranges the cursor advances by, the history stays small, ordered and below
        /// the cursor, keeps the first checkpoint, and a reorg of any depth finds a checkpoint
        /// at or below the fork within eight times the depth of the best one recorded (or the oldest).
        #[test]
        fn thinned_history_bounds_the_fork_search(steps in prop::collection::vec(1u64..200, 1..300)) {
            let mut c = Cursor::at(1, B256::repeat_byte(1), 0);
            let mut n = 1;
            let mut all = vec![1];
            for step in steps {
                n += step;
                c = c.advance(cp(n), n);
                all.push(n);
                prop_assert!(c.history.len() <= 128);
                prop_assert!(c.history.windows(2).all(|w| w[0].block_number < w[1].block_number));
                prop_assert!(c.history.iter().all(|h| h.block_number < c.block_number));
                prop_assert_eq!(c.history.first().map(|h| h.block_number), Some(1));
            }
            let mut depth = 1;
            while depth < c.block_number {
                    let fork = c.block_number - depth;
                    let found = c.checkpoints_newest_first().find(|k| k.block_number <= fork).unwrap();
                    let best = *all.iter().rev().find(|b| **b <= fork).unwrap();
                    let (found_depth, best_depth) = (c.block_number - found.block_number, c.block_number - best);
                    prop_assert!(found.block_number == 1 || found_depth < 8 * best_depth,
                        "depth {} found {} (best {}) at cursor {}", depth, found.block_number, best, c.block_number);
                depth += 1 + depth / 8;
            }
        }
    }
}
