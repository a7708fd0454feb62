//! One subscription's loop: fetch a block range, decode, publish in order, then commit the
//! cursor.
//!
//! The invariant that makes delivery lossless is the order of the last two steps: the cursor
//! names block `b` only after JetStream acknowledged every matching log up to and including
//! `b`. A crash anywhere replays from the cursor; the replay is dropped by JetStream's
//! duplicate window and, beyond it, by skipping what the stream's tail shows was already
//! published (the stream is its own journal).

use std::sync::Arc;
use std::time::Duration;

use herald_proto::{CompiledEvent, Cursor, StartBlock, SubscriptionSpec};
use tokio_util::sync::CancellationToken;

use crate::chain::{ChainRpc, LogQuery, RpcError};
use crate::decode;
use crate::metrics::Metrics;
use crate::publish::EventSink;
use crate::ranges::{confirmed_target, next_range};
use crate::retry::{Backoff, pause, retry};
use crate::store::{CursorStore, Ownership, StoreError};

/// Why a subscription task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown or revocation: the task was asked to stop.
    Cancelled,
    /// A cursor write was refused: another owner holds the subscription now.
    Fenced,
}

/// Everything one subscription task works with.
pub struct SubscriptionTask<R, S, C> {
    /// The chain endpoint.
    pub chain: Arc<R>,
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
    /// How long to wait when caught up.
    pub poll_interval: Duration,
    /// Largest `eth_getLogs` span.
    pub max_block_range: u64,
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

    /// Runs until cancelled or fenced.
    pub async fn run(self, cancel: CancellationToken) -> Exit {
        let Some(mut next) = self.resume_point(&cancel).await else {
            return Exit::Cancelled;
        };
        let subject = self.spec.subject();
        let Some(tail) = retry("read the stream tail", &cancel, || self.sink.last_published(&subject)).await
        else {
            return Exit::Cancelled;
        };
        let mut published_through =
            tail.filter(|e| e.subscription_id == self.spec.id && !e.removed).map(|e| e.position());
        tracing::info!(next_block = next, ?published_through, %subject, "subscription started");

        let mut backoff = Backoff::network();
        loop {
            let step = self.step(&mut next, &mut published_through, &subject, &cancel).await;
            match step {
                Ok(Step::Continue) => backoff.reset(),
                Ok(Step::Idle) => {
                    backoff.reset();
                    tokio::select! {
                        _ = cancel.cancelled() => return Exit::Cancelled,
                        _ = tokio::time::sleep(self.poll_interval) => {}
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

    /// The first block to process: after the cursor, or the spec's start block. A `latest`
    /// start is pinned by committing a cursor at once, so a restart does not move it.
    async fn resume_point(&self, cancel: &CancellationToken) -> Option<u64> {
        let cursor = retry("load the cursor", cancel, || self.store.load_cursor(&self.spec.id)).await?;
        if let Some(cursor) = cursor {
            return Some(cursor.next_block());
        }
        match self.spec.start_block {
            StartBlock::Number(n) => Some(n),
            StartBlock::Latest => {
                let head = retry("read the chain head", cancel, || self.chain.head()).await?;
                let Some(target) = confirmed_target(head, self.spec.confirmations) else {
                    return Some(0);
                };
                let block = retry("read the start block", cancel, || self.chain.block(target)).await?;
                let cursor = Cursor { block_number: target, block_hash: block.hash };
                match self.commit(&cursor, cancel).await {
                    Ok(()) => Some(cursor.next_block()),
                    Err(_) => None,
                }
            }
        }
    }

    async fn step(
        &self,
        next: &mut u64,
        published_through: &mut Option<(u64, u64)>,
        subject: &str,
        cancel: &CancellationToken,
    ) -> Result<Step, RpcError> {
        let labels = self.labels();
        let head = self.observe(self.chain.head().await, "eth_blockNumber")?;
        self.metrics.head_block.with_label_values(&[&labels[0]]).set(head as i64);
        self.metrics
            .lag_blocks
            .with_label_values(&labels)
            .set(head.saturating_sub(next.saturating_sub(1)) as i64);
        let Some(target) = confirmed_target(head, self.spec.confirmations) else {
            return Ok(Step::Idle);
        };
        let Some(range) = next_range(*next, target, self.max_block_range) else {
            return Ok(Step::Idle);
        };
        let (from, to) = (*range.start(), *range.end());

        let mut topics: [Option<Vec<_>>; 4] = Default::default();
        topics[0] = Some(vec![self.event.selector]);
        topics[1..].clone_from_slice(&self.event.topic_filters);
        let query = LogQuery { from, to, address: self.spec.address, topics };
        let logs = self.observe(self.chain.logs(&query).await, "eth_getLogs")?;
        let last_block = self.observe(self.chain.block(to).await, "eth_getBlockByNumber")?;

        for log in logs.iter().filter(|l| self.event.matches_topics(l.topics())) {
            let envelope = decode::envelope(self.spec.chain_id, &self.spec.id, &self.event, log);
            if published_through.is_some_and(|p| envelope.position() <= p) {
                continue;
            }
            *published_through = None;
            if let Some(error) = &envelope.decode_error {
                self.metrics.decode_failures.with_label_values(&labels).inc();
                tracing::warn!(
                    block = envelope.block_number,
                    log_index = envelope.log_index,
                    error,
                    "log does not decode with the subscription's ABI; publishing it raw, flagged"
                );
            }
            if !self.publish(subject, &envelope, cancel).await {
                return Ok(Step::Exit(Exit::Cancelled));
            }
        }

        let cursor = Cursor { block_number: to, block_hash: last_block.hash };
        if let Err(exit) = self.commit(&cursor, cancel).await {
            return Ok(Step::Exit(exit));
        }
        *next = cursor.next_block();
        self.metrics.cursor_block.with_label_values(&labels).set(to as i64);
        self.metrics.lag_blocks.with_label_values(&labels).set(head.saturating_sub(to) as i64);
        Ok(if to < target { Step::Continue } else { Step::Idle })
    }

    /// Publishes until acknowledged; `false` if cancelled first.
    async fn publish(
        &self,
        subject: &str,
        envelope: &herald_proto::EventEnvelope,
        cancel: &CancellationToken,
    ) -> bool {
        let labels = self.labels();
        let mut backoff = Backoff::network();
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = self.sink.publish(subject, envelope) => r,
            };
            match result {
                Ok(stored) => {
                    if stored.duplicate {
                        self.metrics.publish_duplicates.with_label_values(&labels).inc();
                    } else {
                        self.metrics.events_published.with_label_values(&labels).inc();
                    }
                    if backoff.attempts() > 0 {
                        tracing::info!(attempts = backoff.attempts(), "publishing recovered");
                    }
                    return true;
                }
                Err(e) => {
                    self.metrics.publish_errors.with_label_values(&labels).inc();
                    if backoff.attempts() == 0 {
                        tracing::warn!(error = %e, block = envelope.block_number, "publish failed, retrying with backoff");
                    }
                    if !pause(&mut backoff, cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Commits the cursor, retrying etcd failures; `Err(exit)` when fenced or cancelled.
    async fn commit(&self, cursor: &Cursor, cancel: &CancellationToken) -> Result<(), Exit> {
        let mut backoff = Backoff::network();
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(Exit::Cancelled),
                r = self.store.commit_cursor(&self.ownership, cursor) => r,
            };
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

    fn observe<T>(&self, result: Result<T, RpcError>, method: &str) -> Result<T, RpcError> {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .rpc_requests
            .with_label_values(&[&self.spec.chain_id.to_string(), method, outcome])
            .inc();
        result
    }
}
