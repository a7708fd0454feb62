//! One subscription's loop: fetch a block range, decode, publish in order, then commit the
//! cursor.
//!
//! The invariant that makes delivery lossless is the order of the last two steps: the cursor
//! names block `b` only after JetStream acknowledged every matching log up to and including
//! `b`. A crash anywhere replays from the cursor.
//!
//! The stream is the journal of what was published, whoever published it. On every start
//! (restart, takeover, resume), rewind and unwind the task *reconciles*: from the newest
//! checkpoint of its cursor that is still canonical, it folds what the subject holds above it
//! ([`crate::journal::Ledger`]), retracts whatever is live there but orphaned, and resumes
//! from that checkpoint; each range then publishes only what is not live and canonical
//! already. Resuming lower than needed is always safe; higher never is. Before anything is
//! retracted or repaired, the cursor's reorg generation is raised and committed, so that what
//! is published afterwards has new message ids (a log orphaned and later canonical again is
//! not swallowed by JetStream's duplicate window).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::B256;
use herald_proto::{Checkpoint, CompiledEvent, Cursor, EventEnvelope, Rewind, StartBlock, SubscriptionSpec};

use crate::journal::{Ledger, Published};
use tokio_util::sync::CancellationToken;

use crate::chain::{BlockRef, ChainRpc, LogQuery, RpcError};
use crate::decode::Decoder;
use crate::heads::{ChainView, Heads, TagState};
use crate::limits::{RangeHint, RangeSizer};
use crate::live::{LiveLogs, LiveMember};
use crate::membership::LeaseClock;
use crate::metrics::{Count, Metrics, SubscriptionSeries};
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
    /// Its own series (from [`Metrics::subscription`]); they go with the task.
    pub series: SubscriptionSeries,
    /// The assignment this task acts under.
    pub ownership: Ownership,
    /// The registered subscription.
    pub spec: Arc<SubscriptionSpec>,
    /// Its compiled event.
    pub event: Arc<CompiledEvent>,
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
    /// How often a cursor that moved over ranges publishing nothing is committed (the
    /// worker's `idle_commit_interval`).
    pub idle_commit_interval: Duration,
    /// Shared by the worker's tasks: how many may be starting at once.
    pub start_permits: Arc<tokio::sync::Semaphore>,
}

/// Messages per fast-ingest batch: what a failed batch publishes again at most.
const PUBLISH_BATCH: usize = 10_000;

/// Fast-ingest attempts for a batch before its messages go one by one.
const BATCH_ATTEMPTS: u32 = 2;

/// Why the task reconciles the subject with the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// It starts: a restart, a takeover, a resume.
    Start,
    /// The cursor's block is no longer canonical.
    Unwind,
    /// A rewind is to be applied: the cursor moves back into its epoch.
    Rewind(Rewind),
    /// The subject's tail is below what the cursor says was stored (and a rewind may be
    /// pending as well: it is applied in the same pass).
    Repair(Option<Rewind>),
}

/// Where a task stands.
struct Progress {
    /// The last committed cursor, once there is one.
    cursor: Option<Cursor>,
    /// First block still to process.
    next: u64,
    /// Rewind epoch of everything it publishes.
    epoch: u64,
    /// Reorg generation of everything it publishes.
    generation: u64,
    /// What the subject holds live above the cursor (read at the last reconciliation).
    ledger: Ledger,
    /// Which live logs count as published already.
    published: Published,
    /// Stream sequence of the newest message of the subject known stored.
    last_seq: u64,
    /// A repair found due and not done yet: the block to publish again after.
    repair: Option<u64>,
    /// Whether the missing finality tags of the chain were reported already.
    reported_no_finality: bool,
    /// Span of the next `eth_getLogs`, adapting to what the provider accepts.
    sizer: RangeSizer,
    /// When the cursor was last committed by this task.
    last_commit: Option<tokio::time::Instant>,
    /// The cursor in memory is ahead of the committed one (only over ranges that published
    /// nothing).
    uncommitted: bool,
}

impl Progress {
    fn from_cursor(cursor: Cursor) -> Self {
        let mut p = Self::fresh(cursor.next_block());
        p.epoch = cursor.epoch;
        p.generation = cursor.generation;
        p.last_seq = cursor.stream_seq;
        p.published.epoch = cursor.epoch;
        p.ledger = Ledger::empty(cursor.block_number);
        p.cursor = Some(cursor);
        // The cursor just read is the committed one: a restart writes nothing until there is
        // something to write (or idle_commit_interval has passed).
        p.last_commit = Some(tokio::time::Instant::now());
        p
    }

    fn fresh(next: u64) -> Self {
        Self {
            cursor: None,
            next,
            epoch: 0,
            generation: 0,
            ledger: Ledger::empty(next.saturating_sub(1)),
            published: Published { epoch: 0, any_epoch_below: 0 },
            last_seq: 0,
            repair: None,
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
    /// The last range asked of the shared live fetch.
    shared_asked: Option<(u64, u64)>,
}

enum Step {
    /// Made progress or has more to do right away.
    Continue,
    /// Caught up with the confirmed head.
    Idle,
    /// Wants `from..=to` from the chain's shared live fetch, and steps again once it is there.
    AwaitShared {
        /// First block.
        from: u64,
        /// Last block.
        to: u64,
    },
    /// Stop the task.
    Exit(Exit),
}

impl<R: ChainRpc, S: EventSink, C: CursorStore> SubscriptionTask<R, S, C> {
    /// The `chain_id` label of its chain's series.
    fn chain_label(&self) -> String {
        self.spec.chain_id.to_string()
    }

    /// Runs until cancelled (stop now), drained (stop after the current block range, with its
    /// cursor committed) or fenced.
    pub async fn run(self, cancel: CancellationToken, drain: CancellationToken) -> Exit {
        // Starting reads etcd and the subject and may write a cursor: a few tasks at a time,
        // so that a worker given thousands of subscriptions at once (its first start, a
        // takeover) neither floods etcd and JetStream nor holds thousands of starts in memory.
        let permit = tokio::select! {
            _ = drain.cancelled() => return Exit::Drained,
            _ = cancel.cancelled() => return Exit::Cancelled,
            permit = self.start_permits.acquire() => permit,
        };
        let resume = tokio::select! {
            _ = drain.cancelled() => return Exit::Drained,
            r = Box::pin(self.resume_point(&cancel)) => r,
        };
        let Some(mut progress) = resume else {
            return Exit::Cancelled;
        };
        progress.sizer = RangeSizer::new(self.max_block_range);
        let subject = self.spec.subject();
        let step = tokio::select! {
            _ = drain.cancelled() => return Exit::Drained,
            step = Box::pin(self.start(&mut progress, &subject, &cancel)) => step,
        };
        if let Some(exit) = step {
            return exit;
        }
        drop(permit);
        tracing::info!(
            next_block = progress.next,
            epoch = progress.epoch,
            generation = progress.generation,
            live_above_cursor = progress.ledger.len(),
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
            shared_asked: None,
        };
        let mut backoff = Backoff::network();
        loop {
            if drain.is_cancelled() {
                if progress.uncommitted
                    && let Some(cursor) = progress.cursor.clone()
                    && let Err(exit) = Box::pin(self.commit(&cursor, &cancel)).await
                {
                    return exit;
                }
                tracing::info!(cursor = progress.next.saturating_sub(1), "drained");
                return Exit::Drained;
            }
            let view = heads.borrow_and_update().clone();
            // Boxed, like the other large steps: the task's own future, alive as long as the
            // subscription runs, stays small while it waits for the next head.
            let step = match self.quiet_step(&mut progress, &mut fetching, &view) {
                Some(step) => Ok(step),
                None => Box::pin(self.step(&mut progress, &mut fetching, &view, &subject, &cancel)).await,
            };
            match step {
                Ok(Step::Continue) => backoff.reset(),
                Ok(Step::Idle) => {
                    backoff.reset();
                    // A quiet chain still gets the cursor of its last empty ranges committed.
                    let flush_at = progress.uncommitted.then(|| {
                        progress
                            .last_commit
                            .map_or_else(tokio::time::Instant::now, |at| at + self.idle_commit_interval)
                    });
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
                                if let Err(exit) = Box::pin(self.commit(&cursor, &cancel)).await {
                                    return exit;
                                }
                                progress.uncommitted = false;
                                progress.last_commit = Some(tokio::time::Instant::now());
                            }
                        }
                    }
                }
                Ok(Step::AwaitShared { from, to }) => {
                    // Waited for here, outside the step: every subscription at the head waits
                    // for this fetch on each new block, holding only this small future.
                    if let (Some(live), Some(member)) = (&self.live, &fetching.member) {
                        tokio::select! {
                            _ = cancel.cancelled() => return Exit::Cancelled,
                            // A failed fetch is the member's to retry alone.
                            _ = live.fill(member, from, to, &view) => {}
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

    /// Where to start: after the cursor, else the spec's start block. A `latest` start is
    /// pinned by committing a cursor at once, so a restart does not move it.
    async fn resume_point(&self, cancel: &CancellationToken) -> Option<Progress> {
        let cursor = retry("load the cursor", cancel, || self.store.load_cursor(&self.spec.id)).await?;
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

    /// Reconciles the subject with the chain before the first range: repairs a subject that
    /// lost acknowledged messages, retracts what an earlier owner (or this one, before a
    /// crash) left live but orphaned, then applies a pending rewind (epoch above the
    /// cursor's). `Some(exit)` if the task must stop.
    async fn start(&self, p: &mut Progress, subject: &str, cancel: &CancellationToken) -> Option<Exit> {
        let mut backoff = Backoff::network();
        loop {
            match self.start_once(p, subject, cancel).await {
                Ok(Step::Exit(exit)) => return Some(exit),
                Ok(_) => return None,
                Err(e) => {
                    if backoff.attempts() == 0 {
                        tracing::warn!(error = %e, "reconciling the subject with the chain failed, retrying with backoff");
                    }
                    if !pause(&mut backoff, cancel).await {
                        return Some(Exit::Cancelled);
                    }
                }
            }
        }
    }

    async fn start_once(
        &self,
        p: &mut Progress,
        subject: &str,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        let journal_error =
            |e: PublishError| RpcError::Transport { method: "journal", message: e.to_string() };
        let tail = tokio::select! {
            _ = cancel.cancelled() => return Ok(Step::Exit(Exit::Cancelled)),
            t = self.sink.tail(subject) => t.map_err(journal_error)?,
        };
        let tail_seq = tail.as_ref().map_or(0, |(seq, _)| *seq);
        // The subject ends below what the cursor says was stored: acknowledged messages were
        // lost (a stream that had not synced them to disk), unless the stream's own retention
        // removed them. Everything above the newest checkpoint the subject still holds whole is
        // published again.
        if let Some(cursor) = p.cursor.clone()
            && tail_seq < cursor.stream_seq
        {
            let first_seq = tokio::select! {
                _ = cancel.cancelled() => return Ok(Step::Exit(Exit::Cancelled)),
                f = self.sink.first_seq() => f.map_err(journal_error)?,
            };
            if first_seq <= cursor.stream_seq {
                // Nothing below the subscription's first block was ever published.
                let origin = self.origin(p);
                let from = cursor.survives_loss(tail_seq).map_or(origin, |c| c.block_number.max(origin)) + 1;
                tracing::warn!(
                    tail_seq,
                    cursor_seq = cursor.stream_seq,
                    from_block = from,
                    "the subject lost acknowledged messages; publishing them again"
                );
                self.series.count(Count::StreamRepairs);
                // Kept until a reconciliation succeeds: the cursor below no longer shows the loss.
                let limit = from.saturating_sub(1);
                p.repair = Some(p.repair.map_or(limit, |r| r.min(limit)));
                // The lost sequences are handed out again: nothing may point past the tail.
                p.cursor = Some(cursor.after_loss(tail_seq));
                p.last_seq = tail_seq;
            }
        }
        p.last_seq = p.last_seq.max(tail_seq);
        let view = self.heads.now();
        let pending_rewind = self.rewind.filter(|r| r.epoch > p.epoch);
        let rewind_limit = |rewind: Rewind| rewind.from_block.max(1) - 1;
        let (limit, why) = match (p.repair, pending_rewind) {
            (Some(limit), rewind) => {
                (rewind.map_or(limit, |r| limit.min(rewind_limit(r))), Why::Repair(rewind))
            }
            (None, Some(rewind)) => (rewind_limit(rewind), Why::Rewind(rewind)),
            (None, None) => (p.next.saturating_sub(1), Why::Start),
        };
        let step = self.reconcile(p, &view, subject, limit, why, cancel).await?;
        p.repair = None;
        if let Some(rewind) = self.rewind.filter(|r| r.epoch == p.epoch) {
            // Below the rewind's block, blocks are redone (what is live counts); from it on,
            // replayed in the new epoch.
            p.published = Published { epoch: rewind.epoch, any_epoch_below: rewind.from_block };
        }
        Ok(step)
    }

    /// The block before the subscription's first: its start block's parent, or for a `latest`
    /// start, the block its pinned first checkpoint names (the head when it was registered).
    fn origin(&self, p: &Progress) -> u64 {
        let oldest = p.cursor.as_ref().and_then(|c| c.checkpoints_newest_first().last());
        match (self.spec.start_block, oldest) {
            (StartBlock::Number(n), _) => n.saturating_sub(1),
            (StartBlock::Latest, Some(oldest)) => oldest.block_number,
            (StartBlock::Latest, None) => p.next.saturating_sub(1),
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
                event: self.event.clone(),
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
        let Some(head) = view.head() else {
            return Ok(Step::Idle);
        };
        self.series.observe_head(head, p.next, self.spec.confirmations);
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
            // The next range is read against the window, so the cursor is checked against the
            // window's branch too: when its block is just below the window, through the
            // parent hash of the window's first block (the endpoint may already be on another
            // branch than the head tracker's view).
            let now = match view.block(cursor.block_number + 1) {
                Some(child) => child.parent_hash,
                None => match self.canonical_block(view, cursor.block_number, cancel).await? {
                    Some(block) => block.hash,
                    None => return Ok(Step::Exit(Exit::Cancelled)),
                },
            };
            if now != cursor.block_hash {
                fetching.ahead = None;
                return self.reconcile(p, view, subject, cursor.block_number, Why::Unwind, cancel).await;
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
            if let Some(logs) = live.logs(member, from, to, view) {
                let envelopes = fetching.reader.decoder.envelopes(&logs);
                return self
                    .deliver(p, envelopes, (from, to), last_block.hash, view, head, target, subject, cancel)
                    .await;
            }
            // Not fetched yet: the run loop waits for the shared fetch and steps again. Asked
            // once per range; if the cache still cannot answer, the range is fetched alone.
            if fetching.shared_asked != Some((from, to)) {
                fetching.shared_asked = Some((from, to));
                return Ok(Step::AwaitShared { from, to });
            }
        }
        let logs = match self.fetch_logs(&fetching.reader, &query, view, &last_block, cancel).await {
            Ok(Some(logs)) => logs,
            Ok(None) => return Ok(Step::Exit(Exit::Cancelled)),
            Err(e) => return self.refused(p, span, e),
        };
        p.sizer.answered(span, logs.len());
        let envelopes = fetching.reader.decoder.envelopes(&logs);
        self.deliver(p, envelopes, (from, to), last_block.hash, view, head, target, subject, cancel).await
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
            return self.reconcile(p, view, subject, cursor.block_number, Why::Unwind, cancel).await;
        }
        // Ranges fetched before a reorg chain up with each other, so only the chain can tell
        // the last of them is stale. The last one is checked: the task idles after it until
        // the head moves, and on a quiet chain that would be never.
        if range.to >= target {
            let Some(now) = self.canonical_block(view, range.to, cancel).await? else {
                return Ok(Step::Exit(Exit::Cancelled));
            };
            if now.hash != range.last_block.hash {
                tracing::debug!(
                    block = range.to,
                    "read-ahead range orphaned since it was fetched; reading again"
                );
                fetching.ahead = None;
                return Ok(Step::Continue);
            }
        }
        fetching.depth.succeeded();
        p.sizer.answered(span, range.logs);
        self.deliver(
            p,
            range.envelopes,
            (range.from, range.to),
            range.last_block.hash,
            view,
            head,
            target,
            subject,
            cancel,
        )
        .await
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

    /// Settles the range `from..=to` (its last block's hash `to_hash`) against what the
    /// subject holds live there, publishes what is missing (after retracting what was
    /// orphaned), and commits the cursor at `to`.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        p: &mut Progress,
        envelopes: Vec<EventEnvelope>,
        (from, to): (u64, u64),
        to_hash: B256,
        view: &ChainView,
        head: u64,
        target: u64,
        subject: &str,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        // What the subject already holds live in the range: skipped when canonical, retracted
        // when its block was orphaned.
        let mut hashes: BTreeMap<u64, B256> = BTreeMap::from([(to, to_hash)]);
        let with_logs: BTreeSet<u64> = envelopes.iter().map(|e| e.block_number).collect();
        for number in p.ledger.blocks_in(from, to) {
            if !with_logs.contains(&number)
                && self.canonical_hash(view, number, &mut hashes, cancel).await?.is_none()
            {
                return Ok(Step::Exit(Exit::Cancelled));
            }
        }
        let settled = p.ledger.settle(from, to, envelopes, |n| hashes.get(&n).copied(), p.published);
        if !settled.retract.is_empty() {
            // Raise the generation first (committed), so that whatever is published from now on
            // has new message ids.
            let at = match &p.cursor {
                Some(cursor) => cursor.clone(),
                None => {
                    let Some(hash) = self.canonical_hash(view, from - 1, &mut hashes, cancel).await? else {
                        return Ok(Step::Exit(Exit::Cancelled));
                    };
                    Cursor {
                        journal_seq: p.ledger.journal_floor(from - 1, 0),
                        ..Cursor::at(from - 1, hash, p.epoch)
                    }
                }
            };
            let raised =
                Cursor { generation: p.generation + 1, stream_seq: at.stream_seq.max(p.last_seq), ..at };
            if let Err(exit) = self.commit(&raised, cancel).await {
                return Ok(Step::Exit(exit));
            }
            p.generation = raised.generation;
            p.cursor = Some(raised);
            for retraction in &settled.retract {
                match self.publish(subject, retraction, cancel).await {
                    Ok(sequence) => p.last_seq = p.last_seq.max(sequence),
                    Err(exit) => return Ok(Step::Exit(exit)),
                }
                self.series.count(Count::Retractions);
            }
            tracing::info!(
                from,
                to,
                retracted = settled.retract.len(),
                generation = p.generation,
                "retracted live logs of orphaned blocks"
            );
        }
        let mut envelopes = settled.publish;
        for envelope in &mut envelopes {
            envelope.rewind_epoch = p.epoch;
            envelope.reorg_generation = p.generation;
            if let Some(error) = &envelope.decode_error {
                self.series.count(Count::DecodeFailures);
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

        let cursor = Self::cursor_after(p, to, to_hash);
        // A range that published nothing needs no prompt commit: replaying it after a crash
        // publishes nothing either. Committing it at most every idle_commit_interval keeps
        // thousands of quiet subscriptions from writing to etcd on every block. At the head
        // that commit is left to the run loop's idle flush, outside the step, so that quiet
        // subscriptions hold no step while they write.
        let quiet = envelopes.is_empty() && settled.retract.is_empty();
        let due = !quiet || self.quiet_commit_due(p, to >= target);
        if due {
            if let Err(exit) = self.commit(&cursor, cancel).await {
                return Ok(Step::Exit(exit));
            }
            p.last_commit = Some(tokio::time::Instant::now());
        }
        Ok(self.moved_to(p, cursor, due, head, target))
    }

    /// The cursor once the range ending at block `to` (hash `to_hash`) is settled.
    fn cursor_after(p: &Progress, to: u64, to_hash: B256) -> Cursor {
        let checkpoint = Checkpoint {
            block_number: to,
            block_hash: to_hash,
            journal_seq: p.ledger.journal_floor(to, p.last_seq),
            stored_seq: p.last_seq,
        };
        match &p.cursor {
            Some(previous) => previous.advance(checkpoint, p.last_seq),
            None => Cursor {
                generation: p.generation,
                stream_seq: p.last_seq,
                journal_seq: checkpoint.journal_seq,
                ..Cursor::at(to, to_hash, p.epoch)
            },
        }
    }

    /// Whether a range that published and retracted nothing must be committed now: the first
    /// cursor always, otherwise every idle_commit_interval while catching up (at the head, the
    /// run loop's idle flush commits).
    fn quiet_commit_due(&self, p: &Progress, caught_up: bool) -> bool {
        p.cursor.is_none()
            || (!caught_up && p.last_commit.is_none_or(|at| at.elapsed() >= self.idle_commit_interval))
    }

    /// Moves the task to `cursor` (`committed` or not yet) and says what comes next.
    fn moved_to(&self, p: &mut Progress, cursor: Cursor, committed: bool, head: u64, target: u64) -> Step {
        let to = cursor.block_number;
        p.uncommitted = !committed;
        p.next = cursor.next_block();
        p.cursor = Some(cursor);
        self.series.observe_cursor(head, to, target);
        if to >= target { Step::Idle } else { Step::Continue }
    }

    /// The common case at the head, settled without a step (whose future is several
    /// kilobytes, allocated and copied for each one): the next range lies in the head
    /// tracker's window, follows a cursor still canonical there, was already fetched by the
    /// chain's shared live fetch with no log for this subscription, holds nothing live, and
    /// needs no commit now. Tens of thousands of quiet subscriptions take this path on every
    /// block. `None` when anything else is the case: the step handles it, with every check.
    fn quiet_step(&self, p: &mut Progress, fetching: &mut Fetching<R>, view: &ChainView) -> Option<Step> {
        let live = self.live.as_ref()?;
        let head = view.head()?;
        if self.spec.finality.is_some() || fetching.ahead.is_some() {
            return None;
        }
        let target = confirmed_target(head, self.spec.confirmations)?;
        let cursor = p.cursor.as_ref()?;
        // Canonical by the window: the block after the cursor names it as its parent.
        if cursor.block_hash.is_zero()
            || view.block(cursor.block_number + 1)?.parent_hash != cursor.block_hash
        {
            return None;
        }
        let range = next_range(p.next, target, p.sizer.span())?;
        let (from, to) = (*range.start(), *range.end());
        let last_block = *view.block(to)?;
        view.block(from)?;
        if !p.ledger.blocks_in(from, to).is_empty() || self.quiet_commit_due(p, to >= target) {
            return None;
        }
        let member = fetching.member.get_or_insert_with(|| live.join(self.spec.address, self.event.selector));
        let logs = live.logs(member, from, to, view)?;
        if !fetching.reader.decoder.envelopes(&logs).is_empty() {
            return None;
        }
        self.series.observe_head(head, p.next, self.spec.confirmations);
        let cursor = Self::cursor_after(p, to, last_block.hash);
        Some(self.moved_to(p, cursor, false, head, target))
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
            let timer = self.metrics.publish_timer(&self.chain_label(), envelopes.len());
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(Exit::Cancelled),
                r = self.sink.publish_batch(subject, envelopes) => r,
            };
            drop(timer);
            match result {
                Ok(sequence) => {
                    self.metrics.observe_batch_ack(&self.chain_label(), &self.series, envelopes.len());
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
        let chain = self.chain_label();
        let mut backoff = Backoff::network();
        loop {
            self.check_lease()?;
            let timer = self.metrics.publish_timer(&chain, 1);
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(Exit::Cancelled),
                r = self.sink.publish(subject, envelope) => r,
            };
            drop(timer);
            match result {
                Ok(stored) => {
                    self.metrics.observe_ack(&chain, &self.series, stored.duplicate);
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
                    self.series.count(Count::PublishErrors);
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
                    self.series.count(Count::PublishErrors);
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

    /// Reconciles the subject with the chain from the newest checkpoint at or below block
    /// `limit` that is still canonical (the common ancestor of what was published and the
    /// chain): folds what the subject holds above it, whoever published it, raises and
    /// commits the reorg generation if anything is to be retracted or repaired, moves the
    /// cursor back to the checkpoint, and retracts (newest first) every live log of an
    /// orphaned block. The ranges above it are then fetched again, and publish only what is
    /// not live and canonical already.
    async fn reconcile(
        &self,
        p: &mut Progress,
        view: &ChainView,
        subject: &str,
        limit: u64,
        why: Why,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        let mut hashes: BTreeMap<u64, B256> = BTreeMap::new();
        // 1. The newest checkpoint still canonical (the fold at and below it is the chain's),
        // and the newest at or below `limit`, whose journal position bounds what to read.
        let mut anchor = None;
        let mut floor = None;
        if let Some(cursor) = &p.cursor {
            for checkpoint in cursor.checkpoints_newest_first() {
                if checkpoint.block_number <= limit && anchor.is_some() {
                    // Below a canonical checkpoint, the processed chain is the canonical one.
                    floor = Some(checkpoint);
                    break;
                }
                if checkpoint.block_hash.is_zero() {
                    continue;
                }
                let Some(hash) =
                    self.canonical_hash(view, checkpoint.block_number, &mut hashes, cancel).await?
                else {
                    return Ok(Step::Exit(Exit::Cancelled));
                };
                if checkpoint.is_block(&hash) {
                    // A stored checkpoint keeps only a prefix of its hash: from here on, and in
                    // the cursor if it moves back to it, it carries the whole one.
                    let checkpoint = Checkpoint { block_hash: hash, ..checkpoint };
                    anchor = Some(checkpoint);
                    if checkpoint.block_number <= limit {
                        floor = Some(checkpoint);
                        break;
                    }
                }
            }
        }
        let beyond_checkpoints = anchor.is_none() && p.cursor.is_some();
        let floor = match floor {
            Some(floor) => floor,
            None => {
                // No checkpoint vouches for anything at or below `limit` (a fresh task, a
                // rewind below every checkpoint, or a reorg deeper than all of them): from the
                // subscription's start (for a `latest` start, from before its pinned first
                // checkpoint), reading the whole subject.
                let origin = self.origin(p);
                let block_number = if anchor.is_some() { limit } else { limit.min(origin) };
                Checkpoint { block_number, block_hash: B256::ZERO, journal_seq: 0, stored_seq: 0 }
            }
        };
        // 2. What the subject holds above it.
        let mut ledger = Ledger::empty(floor.block_number);
        if p.last_seq > floor.journal_seq {
            let journal = tokio::select! {
                _ = cancel.cancelled() => return Ok(Step::Exit(Exit::Cancelled)),
                j = self.sink.journal_after(subject, floor.journal_seq) => j,
            };
            let journal =
                journal.map_err(|e| RpcError::Transport { method: "journal", message: e.to_string() })?;
            p.last_seq = p.last_seq.max(journal.last().map_or(0, |(seq, _)| *seq));
            ledger = Ledger::fold(floor.block_number, self.registration, journal);
        }
        // Where to resume: the floor, or `limit` itself when a canonical checkpoint above it
        // vouches for the blocks in between.
        let resume = if anchor.is_some_and(|a| a.block_number > limit) || floor.block_hash.is_zero() {
            let number = if anchor.is_some() { limit } else { floor.block_number };
            let hash = if p.cursor.is_some() || why != Why::Start {
                let Some(hash) = self.canonical_hash(view, number, &mut hashes, cancel).await? else {
                    return Ok(Step::Exit(Exit::Cancelled));
                };
                // The anchor vouches for `number` only if both are on one branch: the anchor
                // may come from the head tracker's window and `number` from the endpoint, so
                // the endpoint must still have the anchor after it answered for `number`.
                if let Some(anchor) = anchor.filter(|a| a.block_number > number) {
                    let Some(now) = self
                        .call(self.chain.block(anchor.block_number), "eth_getBlockByNumber", cancel)
                        .await?
                    else {
                        return Ok(Step::Exit(Exit::Cancelled));
                    };
                    if !anchor.is_block(&now.hash) {
                        return Err(RpcError::reorganising(
                            "eth_getBlockByNumber",
                            format!(
                                "checkpoint {} {} is no longer the endpoint's block",
                                anchor.block_number, anchor.block_hash
                            ),
                        ));
                    }
                }
                hash
            } else {
                B256::ZERO
            };
            Checkpoint {
                block_number: number,
                block_hash: hash,
                journal_seq: ledger.journal_floor(number, p.last_seq).min(p.last_seq),
                stored_seq: p.last_seq,
            }
        } else {
            floor
        };
        ledger.forget_through(resume.block_number);
        // 3. Live logs of orphaned blocks (blocks above the head stay until it gets there).
        let head = view.head().unwrap_or(0);
        for number in ledger.blocks_in(resume.block_number + 1, head) {
            if self.canonical_hash(view, number, &mut hashes, cancel).await?.is_none() {
                return Ok(Step::Exit(Exit::Cancelled));
            }
        }
        let retractions = ledger.take_orphaned(|n| hashes.get(&n).copied());
        // 4. Raise the generation before retracting or repairing anything, and move back.
        let repair = matches!(why, Why::Repair(_));
        let generation = p.generation + u64::from(!retractions.is_empty() || repair);
        let epoch = match why {
            Why::Rewind(rewind) | Why::Repair(Some(rewind)) => rewind.epoch,
            _ => p.epoch,
        };
        let moved = match &p.cursor {
            Some(cursor) => {
                let back = cursor.back_to(resume, epoch, generation, p.last_seq);
                (back != *cursor).then_some(back)
            }
            None if generation > p.generation || epoch != p.epoch => Some(Cursor {
                generation,
                stream_seq: p.last_seq,
                journal_seq: resume.journal_seq,
                ..Cursor::at(resume.block_number, resume.block_hash, epoch)
            }),
            None => None,
        };
        if why == Why::Unwind && moved.is_none() && retractions.is_empty() {
            // Called because the cursor's block looked orphaned, yet it is the newest canonical
            // checkpoint: the head tracker's window and the endpoint are on different branches
            // for now. Backing off until they agree, rather than asking again at once.
            return Err(RpcError::reorganising(
                "eth_getBlockByNumber",
                format!("block {limit} is orphaned by one answer and canonical by another"),
            ));
        }
        if let Some(cursor) = moved {
            if let Err(exit) = self.commit(&cursor, cancel).await {
                return Ok(Step::Exit(exit));
            }
            p.next = cursor.next_block();
            p.cursor = Some(cursor);
            p.last_commit = Some(tokio::time::Instant::now());
            p.uncommitted = false;
        }
        p.generation = generation;
        p.epoch = epoch;
        p.published.epoch = epoch;
        let floor = resume;
        // 5. Retract, newest first.
        for retraction in &retractions {
            match self.publish(subject, retraction, cancel).await {
                Ok(sequence) => p.last_seq = p.last_seq.max(sequence),
                Err(exit) => return Ok(Step::Exit(exit)),
            }
            self.series.count(Count::Retractions);
        }
        p.ledger = ledger;
        if why == Why::Unwind {
            let unwound = limit.saturating_sub(floor.block_number);
            // The cursor only ever names blocks `confirmations` deep, so with confirmations > 0
            // any reorg that reaches it is deeper than promised: it must never pass silently.
            if self.spec.confirmations > 0 {
                self.series.count(Count::DeepReorgs);
                tracing::warn!(
                    unwound,
                    confirmations = self.spec.confirmations,
                    beyond_checkpoints,
                    "reorg deeper than the subscription's confirmations; published logs retracted"
                );
            }
            tracing::info!(
                from_block = limit,
                to_block = floor.block_number,
                retracted = retractions.len(),
                generation,
                "chain reorganised; published logs from orphaned blocks retracted"
            );
        } else if !retractions.is_empty() {
            tracing::info!(
                ?why,
                retracted = retractions.len(),
                generation,
                "retracted what the subject held from orphaned blocks"
            );
        }
        Ok(Step::Continue)
    }

    /// The canonical hash at `number` (the window, else `cache`, else the endpoint), cached.
    /// `Ok(None)` if cancelled.
    async fn canonical_hash(
        &self,
        view: &ChainView,
        number: u64,
        cache: &mut BTreeMap<u64, B256>,
        cancel: &CancellationToken,
    ) -> Result<Option<B256>, RpcError> {
        if let Some(hash) = cache.get(&number) {
            return Ok(Some(*hash));
        }
        let Some(block) = self.canonical_block(view, number, cancel).await? else {
            return Ok(None);
        };
        cache.insert(number, block.hash);
        Ok(Some(block.hash))
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
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = cancel.cancelled() => Ok(None),
            result = call => self.observe(result, method, started).map(Some),
        }
    }

    fn observe<T>(
        &self,
        result: Result<T, RpcError>,
        method: &str,
        started: tokio::time::Instant,
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
            if q.block_hash.is_none() && self.empty_every.is_some_and(|n| call.is_multiple_of(n)) {
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
        async fn tail(&self, _subject: &str) -> Result<Option<(u64, EventEnvelope)>, PublishError> {
            let stored = self.stored.lock().unwrap();
            Ok(stored.last().map(|e| (stored.len() as u64, e.clone())))
        }
        async fn first_seq(&self) -> Result<u64, PublishError> {
            Ok(1)
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
            // As etcd keeps it: encoded (history hashes cut short).
            let c = &Cursor::decode(&c.encode()).expect("a cursor decodes");
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
        let metrics = Metrics::new();
        SubscriptionTask {
            live: Some(crate::live::LiveLogs::new(1, chain.clone(), 100, Metrics::new())),
            chain,
            heads,
            sink,
            store,
            series: metrics.subscription(1, &spec.id),
            metrics,
            ownership: Ownership {
                subscription_id: spec.id.clone(),
                generation: 1,
                assignment_value: vec![],
            },
            event: Arc::new(spec.compile().unwrap()),
            spec: Arc::new(spec),
            rewind: None,
            registration: 1,
            lease: LeaseClock::always_valid(),
            poll_interval: Duration::from_millis(5),
            max_block_range,
            idle_commit_interval: Duration::from_millis(20),
            start_permits: Arc::new(tokio::sync::Semaphore::new(1)),
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
