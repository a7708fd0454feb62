//! One subscription's loop: fetch a block range, decode, publish in order, then commit the
//! cursor.
//!
//! The invariant that makes delivery lossless is the order of the last two steps: the cursor
//! names block `b` only after JetStream acknowledged every matching log up to and including
//! `b`. A crash anywhere replays from the cursor; the replay is dropped by JetStream's
//! duplicate window and, beyond it, by skipping what the stream's tail shows was already
//! published (the stream is its own journal).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::B256;
use herald_proto::{Checkpoint, CompiledEvent, Cursor, EventEnvelope, Rewind, StartBlock, SubscriptionSpec};
use tokio_util::sync::CancellationToken;

use crate::chain::{BlockRef, ChainRpc, LogQuery, RpcError};
use crate::decode::Decoder;
use crate::heads::{ChainView, Heads, TagState};
use crate::limits::{RangeHint, RangeSizer};
use crate::live::{LiveLogs, LiveMember};
use crate::membership::LeaseClock;
use crate::metrics::Metrics;
use crate::publish::{EventSink, PublishError};
use crate::ranges::{confirmed_target, next_range};
use crate::readahead::{Depth, RangeReader, ReadAhead};
use crate::retry::{Backoff, pause, retry};
use crate::store::{CursorStore, Ownership, StoreError};

/// Why a subscription task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown or revocation: the task was asked to stop.
    Cancelled,
    /// A cursor write was refused, or the lease deadline passed: another owner may hold the
    /// subscription now.
    Fenced,
    /// Graceful shutdown: the task finished its block range (published, acknowledged,
    /// committed) and stopped before the next one.
    Drained,
}

/// Everything one subscription task works with.
pub struct SubscriptionTask<R, S, C> {
    /// The chain endpoint.
    pub chain: Arc<R>,
    /// The chain's head, followed by its tracker.
    pub heads: Heads,
    /// The chain's shared fetch for subscriptions at the head (none: always fetch alone).
    pub live: Option<Arc<LiveLogs<R>>>,
    /// Where envelopes go.
    pub sink: Arc<S>,
    /// Where the cursor lives.
    pub store: Arc<C>,
    /// Metrics.
    pub metrics: Metrics,
    /// The assignment this task acts under.
    pub ownership: Ownership,
    /// The registered subscription.
    pub spec: SubscriptionSpec,
    /// Its compiled event.
    pub event: CompiledEvent,
    /// The latest rewind request in the subscription's record.
    pub rewind: Option<Rewind>,
    /// Which registration of the subscription id this is (its record's create revision).
    pub registration: u64,
    /// The worker's local lease deadline: past it, nothing is published or committed.
    pub lease: LeaseClock,
    /// How long to wait when caught up and the head tracker is gone (shutdown).
    pub poll_interval: Duration,
    /// Largest `eth_getLogs` span.
    pub max_block_range: u64,
    /// How often a cursor that moved over ranges publishing nothing is committed
    /// ([`IDLE_COMMIT_INTERVAL`] in service).
    pub idle_commit_interval: Duration,
}

/// How often a subscription whose ranges publish nothing commits its cursor. Replaying such
/// ranges after a crash costs a shared fetch and publishes nothing; committing them costs an
/// etcd transaction each: at 5,000 quiet subscriptions per worker and 2 s, etcd was the
/// busiest process of the fanout benchmark.
pub const IDLE_COMMIT_INTERVAL: Duration = Duration::from_secs(10);

/// Messages per fast-ingest batch: what a failed batch publishes again at most.
const PUBLISH_BATCH: usize = 10_000;

/// Fast-ingest attempts for a batch before its messages go one by one.
const BATCH_ATTEMPTS: u32 = 2;

/// Blocks of checkpoints kept in the cursor to find a common ancestor after a reorg.
const REORG_WINDOW: u64 = 128;

/// Where a task stands.
struct Progress {
    /// The last committed cursor, once there is one.
    cursor: Option<Cursor>,
    /// First block still to process.
    next: u64,
    /// Rewind epoch of everything it publishes.
    epoch: u64,
    /// Logs at or before this position are already in the stream (from its tail at start).
    published_through: Option<(u64, u64)>,
    /// Stream sequence of the last message this task stored (or found stored).
    last_seq: u64,
    /// Whether the missing finality tags of the chain were reported already.
    reported_no_finality: bool,
    /// Span of the next `eth_getLogs`, adapting to what the provider accepts.
    sizer: RangeSizer,
    /// When the cursor was last committed by this task.
    last_commit: Option<std::time::Instant>,
    /// The cursor in memory is ahead of the committed one (only over ranges that published
    /// nothing).
    uncommitted: bool,
}

impl Progress {
    fn from_cursor(cursor: Cursor) -> Self {
        Self {
            next: cursor.next_block(),
            epoch: cursor.epoch,
            last_seq: cursor.stream_seq,
            published_through: None,
            cursor: Some(cursor),
            reported_no_finality: false,
            sizer: RangeSizer::new(1),
            last_commit: None,
            uncommitted: false,
        }
    }

    fn fresh(next: u64) -> Self {
        Self {
            cursor: None,
            next,
            epoch: 0,
            published_through: None,
            last_seq: 0,
            reported_no_finality: false,
            sizer: RangeSizer::new(1),
            last_commit: None,
            uncommitted: false,
        }
    }
}

/// How a task gets its logs: alone, shared with the chain's other subscriptions at the head,
/// or read ahead while far behind it.
struct Fetching<R: ChainRpc> {
    /// Its own `eth_getLogs`.
    reader: RangeReader<R>,
    /// Its membership of the chain's shared live fetch, once at the head.
    member: Option<LiveMember<R>>,
    /// Ranges in flight while it backfills history.
    ahead: Option<ReadAhead>,
    /// How many of them.
    depth: Depth,
}

enum Step {
    /// Made progress or has more to do right away.
    Continue,
    /// Caught up with the confirmed head.
    Idle,
    /// Stop the task.
    Exit(Exit),
}

impl<R: ChainRpc, S: EventSink, C: CursorStore> SubscriptionTask<R, S, C> {
    fn labels(&self) -> [String; 2] {
        [self.spec.chain_id.to_string(), self.spec.id.to_string()]
    }

    /// Runs until cancelled (stop now), drained (stop after the current block range, with its
    /// cursor committed) or fenced.
    pub async fn run(self, cancel: CancellationToken, drain: CancellationToken) -> Exit {
        let _series = self.metrics.subscription_series(&self.labels());
        let resume = tokio::select! {
            _ = drain.cancelled() => return Exit::Drained,
            r = self.resume_point(&cancel) => r,
        };
        let Some(mut progress) = resume else {
            return Exit::Cancelled;
        };
        progress.sizer = RangeSizer::new(self.max_block_range);
        let subject = self.spec.subject();
        let Some(tail) = retry("read the stream tail", &cancel, || self.sink.last_published(&subject)).await
        else {
            return Exit::Cancelled;
        };
        // Only messages of this registration and epoch count: after a rewind, or a delete and
        // re-registration of the id, the stream's tail belongs to the past and everything is to
        // be published again.
        progress.published_through = tail
            .filter(|e| {
                e.subscription_id == self.spec.id
                    && e.registration == self.registration
                    && e.rewind_epoch == progress.epoch
                    && !e.removed
            })
            .map(|e| e.position());
        tracing::info!(
            next_block = progress.next,
            epoch = progress.epoch,
            published_through = ?progress.published_through,
            %subject,
            "subscription started"
        );

        let _finality = self.spec.finality.map(|_| self.heads.want_finality());
        let mut heads = self.heads.subscribe();
        let mut fetching = Fetching {
            reader: self.reader(progress.epoch),
            member: None,
            ahead: None,
            depth: Depth::default(),
        };
        let mut backoff = Backoff::network();
        loop {
            if drain.is_cancelled() {
                if progress.uncommitted
                    && let Some(cursor) = progress.cursor.clone()
                    && let Err(exit) = self.commit(&cursor, &cancel).await
                {
                    return exit;
                }
                tracing::info!(cursor = progress.next.saturating_sub(1), "drained");
                return Exit::Drained;
            }
            let view = heads.borrow_and_update().clone();
            let step = self.step(&mut progress, &mut fetching, &view, &subject, &cancel).await;
            match step {
                Ok(Step::Continue) => backoff.reset(),
                Ok(Step::Idle) => {
                    backoff.reset();
                    // A quiet chain still gets the cursor of its last empty ranges committed.
                    let flush_at = progress
                        .last_commit
                        .filter(|_| progress.uncommitted)
                        .map(|at| tokio::time::Instant::from_std(at + self.idle_commit_interval));
                    let flush = async {
                        match flush_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return Exit::Cancelled,
                        _ = drain.cancelled() => {}
                        changed = heads.changed() => if changed.is_err() {
                            tokio::time::sleep(self.poll_interval).await;
                        },
                        _ = flush => {
                            if let Some(cursor) = progress.cursor.clone() {
                                if let Err(exit) = self.commit(&cursor, &cancel).await {
                                    return exit;
                                }
                                progress.uncommitted = false;
                                progress.last_commit = Some(std::time::Instant::now());
                            }
                        }
                    }
                }
                Ok(Step::Exit(exit)) => return exit,
                Err(e) => {
                    if backoff.attempts() == 0 {
                        tracing::warn!(error = %e, "chain call failed, retrying with backoff");
                    } else {
                        tracing::debug!(error = %e, attempt = backoff.attempts(), "chain call still failing");
                    }
                    if !pause(&mut backoff, &cancel).await {
                        return Exit::Cancelled;
                    }
                }
            }
        }
    }

    /// Where to start, and in which rewind epoch: a pending rewind (epoch above the cursor's)
    /// moves the cursor to just before its block; otherwise after the cursor; otherwise the
    /// spec's start block. A `latest` start is pinned by committing a cursor at once, so a
    /// restart does not move it.
    async fn resume_point(&self, cancel: &CancellationToken) -> Option<Progress> {
        let cursor = retry("load the cursor", cancel, || self.store.load_cursor(&self.spec.id)).await?;
        let cursor_epoch = cursor.as_ref().map_or(0, |c| c.epoch);
        if let Some(rewind) = self.rewind.filter(|r| r.epoch > cursor_epoch) {
            let from = rewind.from_block.max(1);
            let block =
                retry("read the block before the rewind", cancel, || self.chain.block(from - 1)).await?;
            let cursor = Cursor::at(from - 1, block.hash, rewind.epoch);
            self.commit(&cursor, cancel).await.ok()?;
            tracing::info!(from_block = from, epoch = rewind.epoch, "rewound");
            return Some(Progress::from_cursor(cursor));
        }
        if let Some(cursor) = cursor {
            return Some(Progress::from_cursor(cursor));
        }
        match self.spec.start_block {
            StartBlock::Number(n) => Some(Progress::fresh(n)),
            StartBlock::Latest => {
                // Wait for a head; a chain shorter than the confirmation depth has no confirmed
                // block yet.
                let mut heads = self.heads.subscribe();
                let target = loop {
                    let head = heads.borrow_and_update().head();
                    if let Some(target) = head.and_then(|h| confirmed_target(h, self.spec.confirmations)) {
                        break target;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        changed = heads.changed() => if changed.is_err() {
                            tokio::time::sleep(self.poll_interval).await;
                        }
                    }
                };
                let block = retry("read the start block", cancel, || self.chain.block(target)).await?;
                let cursor = Cursor::at(target, block.hash, 0);
                self.commit(&cursor, cancel).await.ok()?;
                Some(Progress::from_cursor(cursor))
            }
        }
    }

    /// The task's own `eth_getLogs`, decoding in rewind epoch `epoch`.
    fn reader(&self, epoch: u64) -> RangeReader<R> {
        let mut topics: [Option<Vec<_>>; 4] = Default::default();
        topics[0] = Some(vec![self.event.selector]);
        topics[1..].clone_from_slice(&self.event.topic_filters);
        RangeReader {
            chain: self.chain.clone(),
            metrics: self.metrics.clone(),
            chain_label: self.spec.chain_id.to_string(),
            addresses: vec![self.spec.address],
            topics,
            decoder: Decoder {
                chain_id: self.spec.chain_id,
                subscription_id: self.spec.id.clone(),
                event: Arc::new(self.event.clone()),
                registration: self.registration,
                epoch,
            },
        }
    }

    async fn step(
        &self,
        p: &mut Progress,
        fetching: &mut Fetching<R>,
        view: &Arc<ChainView>,
        subject: &str,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        let labels = self.labels();
        let Some(head) = view.head() else {
            return Ok(Step::Idle);
        };
        self.metrics.observe_head(&labels, head, p.next, self.spec.confirmations);
        let Some(mut target) = confirmed_target(head, self.spec.confirmations) else {
            return Ok(Step::Idle);
        };
        if let Some(finality) = self.spec.finality {
            match view.finality(finality) {
                TagState::At(tagged) => target = target.min(tagged),
                TagState::Unknown => return Ok(Step::Idle),
                TagState::Unsupported => {
                    if !p.reported_no_finality {
                        tracing::warn!(
                            finality = finality.tag(),
                            confirmations = self.spec.confirmations,
                            "the chain has no such block tag; publishing by confirmations alone"
                        );
                        p.reported_no_finality = true;
                    }
                }
            }
        }
        // Below the head tracker's window (a backfill, or a long pause): read ahead, several
        // ranges in flight, until those in flight are used up. Each range brings the hash of
        // the block before it, which is how the cursor is checked there. Inside the window:
        // one range at a time, shared with the chain's other subscriptions there, so that
        // thousands of them a few blocks behind (a head jump, a takeover) still cost one call
        // per range rather than one each.
        let window_floor = view.window.blocks().next().map_or(0, |b| b.number);
        let reading = fetching.ahead.as_ref().is_some_and(|a| a.expects() == p.next && a.in_flight() > 0);
        if p.next < window_floor || reading {
            return self.read_ahead(p, fetching, view, head, target, subject, cancel).await;
        }
        fetching.ahead = None;
        // Is what was processed still canonical? Checked against the head tracker's window
        // when recent, by asking the endpoint otherwise. A lagging endpoint (head below the
        // cursor) is not a reorg: wait for it.
        if let Some(cursor) = p.cursor.clone()
            && !cursor.block_hash.is_zero()
            && cursor.block_number <= head
        {
            let Some(now) = self.canonical_block(view, cursor.block_number, cancel).await? else {
                return Ok(Step::Exit(Exit::Cancelled));
            };
            if now.hash != cursor.block_hash {
                return self.unwind(p, &cursor, subject, cancel).await;
            }
        }
        let Some(range) = next_range(p.next, target, p.sizer.span()) else {
            return Ok(Step::Idle);
        };
        let (from, to) = (*range.start(), *range.end());

        let query = fetching.reader.query(from, to);
        let Some(last_block) = self.canonical_block(view, to, cancel).await? else {
            return Ok(Step::Exit(Exit::Cancelled));
        };
        let span = to - from + 1;
        // At the head, the chain's shared fetch answers for every subscription at once.
        if let Some(live) = &self.live
            && view.block(from).is_some()
        {
            let member =
                fetching.member.get_or_insert_with(|| live.join(self.spec.address, self.event.selector));
            let shared = tokio::select! {
                _ = cancel.cancelled() => return Ok(Step::Exit(Exit::Cancelled)),
                r = live.logs(member, from, to, view) => r,
            };
            if let Ok(Some(logs)) = shared {
                let envelopes = fetching.reader.decoder.envelopes(&logs);
                return self.deliver(p, envelopes, to, last_block.hash, head, target, subject, cancel).await;
            }
        }
        let logs = match self.fetch_logs(&fetching.reader, &query, view, &last_block, cancel).await {
            Ok(Some(logs)) => logs,
            Ok(None) => return Ok(Step::Exit(Exit::Cancelled)),
            Err(e) => return self.refused(p, span, e),
        };
        p.sizer.answered(span, logs.len());
        let envelopes = fetching.reader.decoder.envelopes(&logs);
        self.deliver(p, envelopes, to, last_block.hash, head, target, subject, cancel).await
    }

    /// Catching up (up to block `target`): publishes the next range of the read-ahead,
    /// keeping it topped up so the following ranges are fetched and decoded meanwhile.
    #[allow(clippy::too_many_arguments)]
    async fn read_ahead(
        &self,
        p: &mut Progress,
        fetching: &mut Fetching<R>,
        view: &Arc<ChainView>,
        head: u64,
        target: u64,
        subject: &str,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        if p.next > target {
            return Ok(Step::Idle);
        }
        let ahead = match &mut fetching.ahead {
            Some(ahead) if ahead.expects() == p.next => ahead,
            slot => slot.insert(ReadAhead::new(p.next)),
        };
        ahead.fill(&fetching.reader, view, target, p.sizer.span(), fetching.depth.get());
        let next = tokio::select! {
            _ = cancel.cancelled() => return Ok(Step::Exit(Exit::Cancelled)),
            next = ahead.next() => next,
        };
        let Some((span, result)) = next else {
            return Ok(Step::Continue);
        };
        let range = match result {
            Ok(range) => range,
            Err(e) => {
                // The ranges after a failed one are dropped with it: asked again, smaller if
                // it was refused as too large.
                fetching.ahead = None;
                fetching.depth.failed();
                return self.refused(p, span, e);
            }
        };
        if let Some(cursor) = p.cursor.clone()
            && !cursor.block_hash.is_zero()
            && cursor.block_number + 1 == range.from
            && range.parent_hash != cursor.block_hash
        {
            fetching.ahead = None;
            return self.unwind(p, &cursor, subject, cancel).await;
        }
        fetching.depth.succeeded();
        p.sizer.answered(span, range.logs);
        self.deliver(p, range.envelopes, range.to, range.last_block.hash, head, target, subject, cancel).await
    }

    /// What a failed `eth_getLogs` of `span` blocks teaches the range sizer: a refusal or a
    /// timeout asks smaller next time. `Ok(Continue)` to ask again at once, `Err` to back off.
    fn refused(&self, p: &mut Progress, span: u64, e: RpcError) -> Result<Step, RpcError> {
        let chain = self.spec.chain_id.to_string();
        match e {
            RpcError::RangeTooLarge { hint, .. } if span > 1 => {
                let next = p.sizer.refused(span, hint);
                self.metrics.rpc_range_splits.with_label_values(&[&chain]).inc();
                tracing::debug!(span, ?hint, next_span = next, "provider refused the range; asking smaller");
                Ok(Step::Continue)
            }
            e @ RpcError::Timeout { .. } if span > 1 => {
                p.sizer.refused(span, RangeHint::TooLarge);
                self.metrics.rpc_range_splits.with_label_values(&[&chain]).inc();
                Err(e)
            }
            e => Err(e),
        }
    }

    /// Publishes the subscription's logs of a range ending at block `to` (hash `to_hash`) and
    /// commits the cursor there.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        p: &mut Progress,
        envelopes: Vec<EventEnvelope>,
        to: u64,
        to_hash: B256,
        head: u64,
        target: u64,
        subject: &str,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        let labels = self.labels();

        // What a previous owner already stored (the stream's tail at start) is skipped.
        let mut envelopes = envelopes;
        if let Some(through) = p.published_through {
            envelopes.retain(|e| e.position() > through);
            if !envelopes.is_empty() {
                p.published_through = None;
            }
        }
        for envelope in &envelopes {
            if let Some(error) = &envelope.decode_error {
                self.metrics.decode_failures.with_label_values(&labels).inc();
                tracing::warn!(
                    block = envelope.block_number,
                    log_index = envelope.log_index,
                    error,
                    "log does not decode with the subscription's ABI; publishing it raw, flagged"
                );
            }
        }
        for batch in envelopes.chunks(PUBLISH_BATCH) {
            match self.publish_in_order(subject, batch, cancel).await {
                Ok(sequence) => p.last_seq = p.last_seq.max(sequence),
                Err(exit) => return Ok(Step::Exit(exit)),
            }
        }

        let checkpoint = Checkpoint { block_number: to, block_hash: to_hash, stream_seq: p.last_seq };
        let cursor = match &p.cursor {
            Some(previous) => previous.advance(checkpoint, REORG_WINDOW.max(2 * self.spec.confirmations)),
            None => Cursor { stream_seq: p.last_seq, ..Cursor::at(to, to_hash, p.epoch) },
        };
        // A range that published nothing needs no prompt commit: replaying it after a crash
        // publishes nothing either. Committing it at most every idle_commit_interval keeps
        // thousands of quiet subscriptions from writing to etcd on every block.
        let due = !envelopes.is_empty()
            || p.cursor.is_none()
            || p.last_commit.is_none_or(|at| at.elapsed() >= self.idle_commit_interval);
        if due {
            if let Err(exit) = self.commit(&cursor, cancel).await {
                return Ok(Step::Exit(exit));
            }
            p.last_commit = Some(std::time::Instant::now());
        }
        p.uncommitted = !due;
        p.next = cursor.next_block();
        p.cursor = Some(cursor);
        self.metrics.observe_cursor(&labels, head, to, target);
        Ok(if to < target { Step::Continue } else { Step::Idle })
    }

    /// Publishes `envelopes` in order and returns the stream sequence of the last one: as a
    /// fast-ingest batch, else one by one. A failed batch stored a prefix of its messages, so
    /// each attempt publishes all of them again and the stored ones are dropped as duplicates.
    /// `Err` if cancelled or fenced first.
    async fn publish_in_order(
        &self,
        subject: &str,
        envelopes: &[EventEnvelope],
        cancel: &CancellationToken,
    ) -> Result<u64, Exit> {
        for attempt in 1..=BATCH_ATTEMPTS {
            if envelopes.len() < 2 {
                break;
            }
            self.check_lease()?;
            let timer = self.metrics.publish_timer(&self.labels()[0], envelopes.len());
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(Exit::Cancelled),
                r = self.sink.publish_batch(subject, envelopes) => r,
            };
            drop(timer);
            match result {
                Ok(sequence) => {
                    self.metrics.observe_batch_ack(&self.labels(), envelopes.len());
                    return Ok(sequence);
                }
                Err(e) => tracing::debug!(
                    error = %e,
                    attempt,
                    messages = envelopes.len(),
                    "batch not wholly stored; publishing it again"
                ),
            }
        }
        let mut last = 0;
        for envelope in envelopes {
            last = last.max(self.publish(subject, envelope, cancel).await?);
        }
        Ok(last)
    }

    /// Publishes until acknowledged and returns the stream sequence; `Err` if cancelled or
    /// fenced first.
    async fn publish(
        &self,
        subject: &str,
        envelope: &herald_proto::EventEnvelope,
        cancel: &CancellationToken,
    ) -> Result<u64, Exit> {
        let labels = self.labels();
        let mut backoff = Backoff::network();
        loop {
            self.check_lease()?;
            let timer = self.metrics.publish_timer(&labels[0], 1);
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(Exit::Cancelled),
                r = self.sink.publish(subject, envelope) => r,
            };
            drop(timer);
            match result {
                Ok(stored) => {
                    self.metrics.observe_ack(&labels, stored.duplicate);
                    if backoff.attempts() > 0 {
                        tracing::info!(attempts = backoff.attempts(), "publishing recovered");
                    }
                    return Ok(stored.sequence);
                }
                Err(PublishError::TooLarge { size, max })
                    if envelope.decode_error.is_none() || !envelope.data.is_empty() =>
                {
                    // Retrying can never succeed: deliver the log's identity, flagged, so the
                    // consumer can fetch it from the chain, instead of stalling the subscription.
                    self.metrics.publish_errors.with_label_values(&labels).inc();
                    tracing::warn!(
                        size,
                        max,
                        block = envelope.block_number,
                        log_index = envelope.log_index,
                        "log too large to publish; publishing it flagged, without args and data"
                    );
                    let mut reduced = envelope.clone();
                    reduced.args = serde_json::Value::Null;
                    reduced.data = Default::default();
                    reduced.decode_error = Some(format!(
                        "log of {size} bytes exceeds the stream's message limit; args and data omitted, fetch it by transaction hash and log index"
                    ));
                    return Box::pin(self.publish(subject, &reduced, cancel)).await;
                }
                Err(e) => {
                    self.metrics.publish_errors.with_label_values(&labels).inc();
                    if backoff.attempts() == 0 {
                        tracing::warn!(error = %e, block = envelope.block_number, "publish failed, retrying with backoff");
                    }
                    if !pause(&mut backoff, cancel).await {
                        return Err(Exit::Cancelled);
                    }
                }
            }
        }
    }

    /// The chain no longer has the cursor's block: find where it forked, retract (newest first)
    /// every message published from orphaned blocks, and move the cursor back to the last block
    /// before the fork, from where the new canonical logs are published. The journal of what was
    /// published is the stream itself, from the newest checkpoint that is still canonical.
    async fn unwind(
        &self,
        p: &mut Progress,
        cursor: &Cursor,
        subject: &str,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        let labels = self.labels();
        let mut hashes: BTreeMap<u64, B256> = BTreeMap::new();
        let mut canonical_hash = async |number: u64| -> Result<Option<B256>, RpcError> {
            if let Some(hash) = hashes.get(&number) {
                return Ok(Some(*hash));
            }
            let block = self.call(self.chain.block(number), "eth_getBlockByNumber", cancel).await?;
            Ok(block.map(|b| {
                hashes.insert(number, b.hash);
                b.hash
            }))
        };
        // 1. The newest checkpoint still canonical bounds the journal to read.
        let mut floor = None;
        for checkpoint in cursor.checkpoints_newest_first().skip(1) {
            let Some(hash) = canonical_hash(checkpoint.block_number).await? else {
                return Ok(Step::Exit(Exit::Cancelled));
            };
            if hash == checkpoint.block_hash {
                floor = Some(checkpoint);
                break;
            }
        }
        let beyond_window = floor.is_none();
        let floor = floor.unwrap_or_else(|| {
            let oldest = cursor.history.first().copied().unwrap_or_else(|| cursor.checkpoint());
            Checkpoint {
                block_number: oldest.block_number.saturating_sub(1),
                block_hash: B256::ZERO,
                stream_seq: 0,
            }
        });
        // 2. What was published after it, by this registration and epoch.
        let journal = tokio::select! {
            _ = cancel.cancelled() => return Ok(Step::Exit(Exit::Cancelled)),
            j = self.sink.journal_after(subject, floor.stream_seq) => j,
        };
        let journal =
            journal.map_err(|e| RpcError::Transport { method: "journal", message: e.to_string() })?;
        let mine: Vec<&(u64, EventEnvelope)> = journal
            .iter()
            .filter(|(_, e)| e.registration == self.registration && e.rewind_epoch == p.epoch)
            .collect();
        let already_retracted: BTreeSet<String> = mine
            .iter()
            .filter(|(_, e)| e.removed)
            .map(|(_, e)| EventEnvelope { removed: false, ..e.clone() }.msg_id())
            .collect();
        // 3. The fork: the first published block that is no longer canonical.
        let mut orphaned: Vec<&EventEnvelope> = Vec::new();
        let mut fork = None;
        for (_, e) in mine.iter().filter(|(_, e)| !e.removed) {
            if fork.is_none() {
                let Some(hash) = canonical_hash(e.block_number).await? else {
                    return Ok(Step::Exit(Exit::Cancelled));
                };
                if hash != e.block_hash {
                    fork = Some(e.block_number);
                }
            }
            if fork.is_some() && !already_retracted.contains(&e.msg_id()) {
                orphaned.push(e);
            }
        }
        // 4. Retract, newest first.
        for e in orphaned.iter().rev() {
            let retraction = EventEnvelope { removed: true, ..(*e).clone() };
            match self.publish(subject, &retraction, cancel).await {
                Ok(sequence) => p.last_seq = p.last_seq.max(sequence),
                Err(exit) => return Ok(Step::Exit(exit)),
            }
            self.metrics.retractions.with_label_values(&labels).inc();
        }
        // 5. Back to the last canonical block before the fork.
        // Everything read was published after the floor, so a fork is always above it; without
        // a canonical checkpoint the floor is only a guess and the fork decides.
        let resume = fork.map_or(floor.block_number, |f| f.saturating_sub(1));
        let Some(resume_hash) = canonical_hash(resume).await? else {
            return Ok(Step::Exit(Exit::Cancelled));
        };
        // The cursor only ever names blocks `confirmations` deep, so with confirmations > 0 any
        // reorg that reaches it is deeper than promised: it must never pass silently.
        let unwound = cursor.block_number.saturating_sub(resume);
        if self.spec.confirmations > 0 {
            self.metrics.deep_reorgs.with_label_values(&labels).inc();
            tracing::warn!(
                unwound,
                confirmations = self.spec.confirmations,
                beyond_window,
                "reorg deeper than the subscription's confirmations; published logs retracted"
            );
        }

        tracing::info!(
            from_block = cursor.block_number,
            to_block = resume,
            retracted = orphaned.len(),
            "chain reorganised; published logs from orphaned blocks retracted"
        );
        let mut rewound = Cursor { stream_seq: p.last_seq, ..Cursor::at(resume, resume_hash, p.epoch) };
        rewound.history = cursor.history.iter().filter(|c| c.block_number < resume).copied().collect();
        if let Err(exit) = self.commit(&rewound, cancel).await {
            return Ok(Step::Exit(exit));
        }
        p.next = rewound.next_block();
        p.cursor = Some(rewound);
        p.published_through = None;
        Ok(Step::Continue)
    }

    /// The canonical block at `number`: from the head tracker's window when recent, else from
    /// the endpoint. `Ok(None)` if cancelled.
    async fn canonical_block(
        &self,
        view: &ChainView,
        number: u64,
        cancel: &CancellationToken,
    ) -> Result<Option<BlockRef>, RpcError> {
        match view.block(number) {
            Some(block) => Ok(Some(*block)),
            None => self.call(self.chain.block(number), "eth_getBlockByNumber", cancel).await,
        }
    }

    /// The range's logs through [`RangeReader::logs`], checked against the canonical blocks
    /// known for it: the head tracker's window (where endpoints behind load balancers serve
    /// answers whose log index lags their head) and the range's last block. `Ok(None)` if
    /// cancelled.
    async fn fetch_logs(
        &self,
        reader: &RangeReader<R>,
        query: &LogQuery,
        view: &ChainView,
        last_block: &BlockRef,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<alloy::rpc::types::Log>>, RpcError> {
        let mut known: Vec<BlockRef> = view.window.range(query.from, query.to).copied().collect();
        if known.last().is_none_or(|b| b.number != last_block.number) {
            known.push(*last_block);
        }
        tokio::select! {
            _ = cancel.cancelled() => Ok(None),
            logs = reader.logs(query, &known) => logs.map(Some),
        }
    }

    /// Commits the cursor, retrying etcd failures; `Err(exit)` when fenced or cancelled.
    ///
    /// A write in flight is never abandoned on cancellation: etcd may still apply a request
    /// whose future was dropped, and it must not land after the next owner's (or the next
    /// task's, after a rewind) first write. Each attempt is bounded by the etcd request
    /// timeout; cancellation is honoured between attempts.
    async fn commit(&self, cursor: &Cursor, cancel: &CancellationToken) -> Result<(), Exit> {
        let mut backoff = Backoff::network();
        loop {
            self.check_lease()?;
            let result = self.store.commit_cursor(&self.ownership, cursor).await;
            match result {
                Ok(()) => return Ok(()),
                Err(StoreError::Fenced(_)) => {
                    self.metrics.fenced.inc();
                    tracing::warn!(
                        cursor = cursor.block_number,
                        "assignment changed; stopping this subscription"
                    );
                    return Err(Exit::Fenced);
                }
                Err(e) => {
                    if backoff.attempts() == 0 {
                        tracing::warn!(error = %e, "cursor write failed, retrying with backoff");
                    }
                    if !pause(&mut backoff, cancel).await {
                        return Err(Exit::Cancelled);
                    }
                }
            }
        }
    }

    /// Refuses to act past the local lease deadline: another worker may own the
    /// subscription by now.
    fn check_lease(&self) -> Result<(), Exit> {
        if self.lease.is_valid() {
            return Ok(());
        }
        self.metrics.self_fenced.inc();
        tracing::warn!("lease deadline passed; this worker fences itself and stops the subscription");
        Err(Exit::Fenced)
    }

    /// Runs one chain call unless cancelled first (`Ok(None)`), counting its outcome.
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RpcError>>,
        method: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<T>, RpcError> {
        let started = std::time::Instant::now();
        tokio::select! {
            _ = cancel.cancelled() => Ok(None),
            result = call => self.observe(result, method, started).map(Some),
        }
    }

    fn observe<T>(
        &self,
        result: Result<T, RpcError>,
        method: &str,
        started: std::time::Instant,
    ) -> Result<T, RpcError> {
        let chain = self.spec.chain_id.to_string();
        self.metrics.observe_rpc(&chain, method, started.elapsed(), &result);
        result
    }
}

#[cfg(test)]
mod tests {
    //! The pipeline against in-memory fakes of the chain, JetStream and etcd: the invariant
    //! under test is that a cursor is never committed past a log that is not stored, and that
    //! the stream ends up holding every log once, in order, whatever fails on the way.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use alloy::rpc::types::Log;
    use alloy_primitives::{Address, B256, Bytes, LogData, U256, keccak256};
    use herald_proto::{EventDefinition, EventEnvelope, SubscriptionId};

    use super::*;
    use crate::chain::BlockRef;
    use crate::publish::{PublishError, Stored};

    const CONTRACT: Address = Address::repeat_byte(0x42);

    fn block_hash(n: u64) -> B256 {
        keccak256(n.to_be_bytes())
    }

    #[derive(Default)]
    struct FakeChain {
        head: u64,
        logs: Vec<Log>,
        /// Every n-th `eth_getLogs` answer is empty, like a load-balanced endpoint whose log
        /// index lags its head.
        empty_every: Option<usize>,
        /// Ranges over this many blocks are refused, naming the limit.
        max_range: Option<u64>,
        /// Every n-th `eth_getLogs` fails like a dropped connection.
        fail_every: Option<usize>,
        /// `(block, call)`: from the `call`-th `eth_getLogs` on, every block from `block` up has
        /// another hash (a reorganisation that deep).
        fork: Option<(u64, usize)>,
        log_calls: Mutex<usize>,
    }

    impl FakeChain {
        fn forked(&self) -> Option<u64> {
            let (block, call) = self.fork?;
            (*self.log_calls.lock().unwrap() >= call).then_some(block)
        }

        fn hash(&self, number: u64) -> B256 {
            match self.forked() {
                Some(fork) if number >= fork => keccak256([number.to_be_bytes(), [0xff; 8]].concat()),
                _ => block_hash(number),
            }
        }
    }

    impl FakeChain {
        fn new(head: u64, logs: Vec<Log>) -> Self {
            Self { head, logs, ..Default::default() }
        }
    }

    impl ChainRpc for FakeChain {
        async fn chain_id(&self) -> Result<u64, RpcError> {
            Ok(1)
        }
        async fn tip(&self, tip: crate::chain::Tip) -> Result<Option<BlockRef>, RpcError> {
            match tip {
                crate::chain::Tip::Latest => self.block(self.head).await.map(Some),
                crate::chain::Tip::Final(_) => Ok(None),
            }
        }
        async fn block(&self, number: u64) -> Result<BlockRef, RpcError> {
            let mut logs_bloom = alloy_primitives::Bloom::default();
            for log in self.logs.iter().filter(|l| l.block_number == Some(number)) {
                logs_bloom.accrue_log(&log.inner);
            }
            Ok(BlockRef {
                number,
                hash: self.hash(number),
                parent_hash: self.hash(number.wrapping_sub(1)),
                logs_bloom,
            })
        }
        async fn logs(&self, q: &LogQuery) -> Result<Vec<Log>, RpcError> {
            let call = {
                let mut calls = self.log_calls.lock().unwrap();
                *calls += 1;
                *calls
            };
            if self.empty_every.is_some_and(|n| call.is_multiple_of(n)) {
                return Ok(vec![]);
            }
            if self.fail_every.is_some_and(|n| call.is_multiple_of(n)) {
                return Err(RpcError::Transport { method: "eth_getLogs", message: "dropped".into() });
            }
            if let Some(max) = self.max_range
                && q.to - q.from + 1 > max
            {
                return Err(RpcError::RangeTooLarge { method: "eth_getLogs", hint: RangeHint::MaxSpan(max) });
            }
            Ok(self
                .logs
                .iter()
                .filter(|l| (q.from..=q.to).contains(&l.block_number.unwrap()))
                .map(|l| Log { block_hash: Some(self.hash(l.block_number.unwrap())), ..l.clone() })
                .collect())
        }
    }

    #[derive(Default)]
    struct FakeSink {
        stored: Mutex<Vec<EventEnvelope>>,
        calls: Mutex<usize>,
        fail_calls: Vec<usize>,
        /// Messages whose data is longer than this are refused as too large.
        max_data: Option<usize>,
    }

    impl EventSink for FakeSink {
        async fn publish(&self, _subject: &str, e: &EventEnvelope) -> Result<Stored, PublishError> {
            let call = {
                let mut calls = self.calls.lock().unwrap();
                *calls += 1;
                *calls
            };
            if self.fail_calls.contains(&call) {
                return Err(PublishError::Nats("injected".into()));
            }
            if self.max_data.is_some_and(|max| e.data.len() > max) {
                return Err(PublishError::TooLarge { size: e.data.len(), max: self.max_data.unwrap() });
            }
            let mut stored = self.stored.lock().unwrap();
            let duplicate = stored.iter().any(|s| s.msg_id() == e.msg_id());
            if !duplicate {
                stored.push(e.clone());
            }
            Ok(Stored { sequence: stored.len() as u64, duplicate })
        }
        /// Like the server's fast-ingest batch: stores in order, drops duplicates, and stops at
        /// the first failure, having stored a prefix.
        async fn publish_batch(&self, _subject: &str, batch: &[EventEnvelope]) -> Result<u64, PublishError> {
            for e in batch {
                let call = {
                    let mut calls = self.calls.lock().unwrap();
                    *calls += 1;
                    *calls
                };
                if self.fail_calls.contains(&call) {
                    return Err(PublishError::Nats("injected gap".into()));
                }
                if let Some(max) = self.max_data.filter(|max| e.data.len() > *max) {
                    return Err(PublishError::TooLarge { size: e.data.len(), max });
                }
                let mut stored = self.stored.lock().unwrap();
                if !stored.iter().any(|s| s.msg_id() == e.msg_id()) {
                    stored.push(e.clone());
                }
            }
            Ok(self.stored.lock().unwrap().len() as u64)
        }
        async fn last_published(&self, _subject: &str) -> Result<Option<EventEnvelope>, PublishError> {
            Ok(self.stored.lock().unwrap().last().cloned())
        }
        async fn journal_after(
            &self,
            _subject: &str,
            after: u64,
        ) -> Result<Vec<(u64, EventEnvelope)>, PublishError> {
            let stored = self.stored.lock().unwrap();
            Ok(stored
                .iter()
                .enumerate()
                .map(|(i, e)| (i as u64 + 1, e.clone()))
                .filter(|(s, _)| *s > after)
                .collect())
        }
    }

    struct FakeStore {
        sink: Arc<FakeSink>,
        commits: Mutex<Vec<Cursor>>,
        fenced: bool,
        logs_by_block: BTreeMap<u64, usize>,
        /// Skip the invariant checks (a reorganising chain retracts and replaces what it
        /// stored, which they do not model).
        lenient: bool,
    }

    impl FakeStore {
        /// Checking every commit against `blocks` (block, logs in it) stored in `sink`.
        fn new(sink: &Arc<FakeSink>, blocks: &[(u64, usize)]) -> Self {
            Self {
                sink: sink.clone(),
                commits: Mutex::default(),
                fenced: false,
                logs_by_block: blocks.iter().copied().collect(),
                lenient: false,
            }
        }
    }

    impl CursorStore for FakeStore {
        async fn load_cursor(&self, _id: &SubscriptionId) -> Result<Option<Cursor>, StoreError> {
            Ok(self.commits.lock().unwrap().last().cloned())
        }
        async fn commit_cursor(&self, o: &Ownership, c: &Cursor) -> Result<(), StoreError> {
            if self.fenced {
                return Err(StoreError::Fenced(o.subscription_id.clone()));
            }
            if self.lenient {
                self.commits.lock().unwrap().push(c.clone());
                return Ok(());
            }
            // The invariant: every log up to the cursor's block is already stored.
            let expected: usize = self.logs_by_block.range(..=c.block_number).map(|(_, n)| n).sum();
            let stored =
                self.sink.stored.lock().unwrap().iter().filter(|e| e.block_number <= c.block_number).count();
            assert_eq!(stored, expected, "cursor {} committed before its logs were stored", c.block_number);
            assert_eq!(c.block_hash, block_hash(c.block_number));
            self.commits.lock().unwrap().push(c.clone());
            Ok(())
        }
    }

    fn transfer_logs(per_block: &[(u64, usize)]) -> Vec<Log> {
        let event = CompiledEvent::compile(
            &EventDefinition::Signature(
                "event Transfer(address indexed from, address indexed to, uint256 value)".into(),
            ),
            &Default::default(),
        )
        .unwrap();
        let mut seq = 0u64;
        let mut logs = Vec::new();
        for &(block, count) in per_block {
            for index in 0..count {
                let data = U256::from(seq).to_be_bytes::<32>().to_vec();
                logs.push(Log {
                    inner: alloy_primitives::Log {
                        address: CONTRACT,
                        data: LogData::new_unchecked(
                            vec![event.selector, B256::ZERO, B256::ZERO],
                            Bytes::from(data),
                        ),
                    },
                    block_hash: Some(block_hash(block)),
                    block_number: Some(block),
                    block_timestamp: None,
                    transaction_hash: Some(B256::ZERO),
                    transaction_index: Some(0),
                    log_index: Some(index as u64),
                    removed: false,
                });
                seq += 1;
            }
        }
        logs
    }

    fn task(
        chain: impl Into<Arc<FakeChain>>,
        sink: Arc<FakeSink>,
        store: Arc<FakeStore>,
        max_block_range: u64,
    ) -> SubscriptionTask<FakeChain, FakeSink, FakeStore> {
        let spec: SubscriptionSpec = serde_json::from_value(serde_json::json!({
            "id": "s", "chain_id": 1, "address": CONTRACT,
            "event": "event Transfer(address indexed from, address indexed to, uint256 value)",
            "start_block": 1,
        }))
        .unwrap();
        let chain: Arc<FakeChain> = chain.into();
        let heads = crate::heads::HeadTracker {
            chain_id: 1,
            rpc: chain.clone(),
            ws_url: None,
            poll_interval: Duration::from_millis(5),
            request_timeout: Duration::from_secs(1),
            metrics: Metrics::new(),
        }
        .spawn(CancellationToken::new());
        SubscriptionTask {
            live: Some(crate::live::LiveLogs::new(1, chain.clone(), 100, Metrics::new())),
            chain,
            heads,
            sink,
            store,
            metrics: Metrics::new(),
            ownership: Ownership {
                subscription_id: spec.id.clone(),
                generation: 1,
                assignment_value: vec![],
            },
            event: spec.compile().unwrap(),
            spec,
            rewind: None,
            registration: 1,
            lease: LeaseClock::always_valid(),
            poll_interval: Duration::from_millis(5),
            max_block_range,
            idle_commit_interval: Duration::from_millis(20),
        }
    }

    async fn run_until_cursor(
        t: SubscriptionTask<FakeChain, FakeSink, FakeStore>,
        store: &FakeStore,
        block: u64,
    ) {
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(t.run(cancel.clone(), CancellationToken::new()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while store.commits.lock().unwrap().last().is_none_or(|c| c.block_number < block) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "cursor never reached {block}: {:?}",
                store.commits.lock().unwrap().last().map(|c| c.block_number)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cancel.cancel();
        assert_eq!(handle.await.unwrap(), Exit::Cancelled);
    }

    fn values(sink: &FakeSink) -> Vec<String> {
        sink.stored.lock().unwrap().iter().map(|e| e.args["value"].as_str().unwrap().to_owned()).collect()
    }

    #[tokio::test]
    async fn publish_failures_never_reorder_lose_or_commit_early() {
        let blocks = [(2, 3), (3, 0), (5, 4), (6, 1), (9, 5)];
        let total: usize = blocks.iter().map(|b| b.1).sum();
        for fail_at in [1, 2, 4, 7, 13] {
            for range in [1, 2, 3, 10] {
                let sink =
                    Arc::new(FakeSink { fail_calls: vec![fail_at, fail_at + 1], ..Default::default() });
                let store = Arc::new(FakeStore::new(&sink, &blocks));
                let chain = FakeChain::new(10, transfer_logs(&blocks));
                run_until_cursor(task(chain, sink.clone(), store.clone(), range), &store, 10).await;
                let want: Vec<String> = (0..total).map(|i| i.to_string()).collect();
                assert_eq!(values(&sink), want, "fail_at={fail_at} range={range}");
                let commits = store.commits.lock().unwrap();
                assert!(commits.windows(2).all(|w| w[0].block_number < w[1].block_number));
            }
        }
    }

    /// History far below the head goes through the read-ahead: several ranges in flight while
    /// one publishes, refusals and dropped calls discarding what was read after them.
    #[tokio::test]
    async fn history_read_ahead_delivers_in_order_through_refusals_failures_and_publish_errors() {
        let blocks: Vec<(u64, usize)> =
            (1..=600).filter(|b| b % 7 == 3).map(|b| (b, (b % 3) as usize)).collect();
        let total: usize = blocks.iter().map(|b| b.1).sum();
        for (fail_at, fail_every) in [(3, Some(5)), (11, None), (40, Some(4))] {
            let sink = Arc::new(FakeSink { fail_calls: vec![fail_at, fail_at + 1], ..Default::default() });
            let store = Arc::new(FakeStore::new(&sink, &blocks));
            let chain =
                FakeChain { max_range: Some(13), fail_every, ..FakeChain::new(600, transfer_logs(&blocks)) };
            run_until_cursor(task(chain, sink.clone(), store.clone(), 50), &store, 600).await;
            let want: Vec<String> = (0..total).map(|i| i.to_string()).collect();
            assert_eq!(values(&sink), want, "fail_at={fail_at} fail_every={fail_every:?}");
            let commits = store.commits.lock().unwrap();
            assert!(commits.windows(2).all(|w| w[0].block_number < w[1].block_number));
        }
    }

    /// A reorganisation far below the head (below the head window) while history is read
    /// ahead: ranges read before it carry the old chain, the first range read after it no
    /// longer continues from the cursor's block, and the task unwinds: every log of the
    /// orphaned blocks it published is retracted, and the canonical chain ends up in the stream
    /// exactly once, in order.
    #[tokio::test]
    async fn a_deep_reorg_under_the_read_ahead_is_retracted_and_replaced() {
        let blocks: Vec<(u64, usize)> = (1..=600).filter(|b| b % 5 == 0).map(|b| (b, 2)).collect();
        for (fork_block, fork_call) in [(150, 12), (100, 9), (40, 9), (200, 2)] {
            let sink = Arc::new(FakeSink::default());
            let store = Arc::new(FakeStore { lenient: true, ..FakeStore::new(&sink, &[]) });
            let chain = FakeChain {
                fork: Some((fork_block, fork_call)),
                ..FakeChain::new(600, transfer_logs(&blocks))
            };
            let chain = Arc::new(chain);
            run_until_cursor(task(chain.clone(), sink.clone(), store.clone(), 20), &store, 600).await;
            assert!(chain.forked().is_some(), "the fork never happened");

            let stored = sink.stored.lock().unwrap();
            let label = format!("fork at block {fork_block}, call {fork_call}");
            // Every message from an orphaned block is followed by its retraction.
            for (i, e) in stored.iter().enumerate().filter(|(_, e)| !e.removed) {
                if e.block_hash != chain.hash(e.block_number) {
                    let retracted = stored[i + 1..]
                        .iter()
                        .any(|r| r.removed && r.block_hash == e.block_hash && r.log_index == e.log_index);
                    assert!(retracted, "{label}: orphaned {:?} never retracted", e.position());
                }
            }
            // The canonical ones are the whole chain, once, in order.
            let canonical: Vec<String> = stored
                .iter()
                .filter(|e| !e.removed && e.block_hash == chain.hash(e.block_number))
                .map(|e| e.args["value"].as_str().unwrap().to_owned())
                .collect();
            let want: Vec<String> = (0..blocks.len() * 2).map(|i| i.to_string()).collect();
            assert_eq!(canonical, want, "{label}");
        }
    }

    #[tokio::test]
    async fn a_restart_skips_what_the_stream_already_holds() {
        let blocks = [(1, 2), (2, 2), (3, 2)];
        let sink = Arc::new(FakeSink::default());
        let logs = transfer_logs(&blocks);
        // A previous owner stored the first three messages but crashed before any cursor.
        for log in &logs[..3] {
            let spec_event = CompiledEvent::compile(
                &EventDefinition::Signature(
                    "event Transfer(address indexed from, address indexed to, uint256 value)".into(),
                ),
                &Default::default(),
            )
            .unwrap();
            let mut e = crate::decode::envelope(1, &SubscriptionId::new("s").unwrap(), &spec_event, log);
            e.registration = 1;
            sink.stored.lock().unwrap().push(e);
        }
        let store = Arc::new(FakeStore::new(&sink, &blocks));
        let chain = FakeChain::new(3, logs);
        run_until_cursor(task(chain, sink.clone(), store.clone(), 10), &store, 3).await;
        assert_eq!(values(&sink), ["0", "1", "2", "3", "4", "5"]);
        assert_eq!(*sink.calls.lock().unwrap(), 3, "only the missing three were published");
    }

    #[tokio::test]
    async fn a_log_too_large_to_publish_is_delivered_flagged_instead_of_stalling() {
        let blocks = [(1, 2), (2, 1)];
        let sink = Arc::new(FakeSink { max_data: Some(16), ..Default::default() });
        let store = Arc::new(FakeStore::new(&sink, &blocks));
        let chain = FakeChain::new(2, transfer_logs(&blocks));
        run_until_cursor(task(chain, sink.clone(), store.clone(), 10), &store, 2).await;
        let stored = sink.stored.lock().unwrap();
        assert_eq!(stored.len(), 3);
        for (i, e) in stored.iter().enumerate() {
            assert_eq!(e.args, serde_json::Value::Null);
            assert!(e.data.is_empty());
            assert!(e.decode_error.as_deref().is_some_and(|m| m.contains("exceeds")), "{i}");
        }
        assert_eq!(stored.iter().map(|e| e.position()).collect::<Vec<_>>(), [(1, 0), (1, 1), (2, 0)]);
    }

    #[tokio::test]
    async fn answers_missing_logs_the_bloom_announces_are_asked_again() {
        let blocks = [(2, 1), (5, 2), (6, 1), (9, 3)];
        for empty_every in [2, 3] {
            let sink = Arc::new(FakeSink::default());
            let store = Arc::new(FakeStore::new(&sink, &blocks));
            let chain =
                FakeChain { empty_every: Some(empty_every), ..FakeChain::new(10, transfer_logs(&blocks)) };
            // One block per range: every block's answer is checked against its bloom.
            run_until_cursor(task(chain, sink.clone(), store.clone(), 1), &store, 10).await;
            assert_eq!(values(&sink), ["0", "1", "2", "3", "4", "5", "6"], "empty_every={empty_every}");
        }
    }

    #[tokio::test]
    async fn a_fenced_cursor_write_stops_the_task() {
        let sink = Arc::new(FakeSink::default());
        let store = Arc::new(FakeStore { fenced: true, ..FakeStore::new(&sink, &[]) });
        let chain = FakeChain::new(3, vec![]);
        let exit = task(chain, sink, store, 10).run(CancellationToken::new(), CancellationToken::new()).await;
        assert_eq!(exit, Exit::Fenced);
    }
}
