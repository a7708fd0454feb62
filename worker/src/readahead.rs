//! Reading a subscription's logs: one validated `eth_getLogs` ([`RangeReader`]), and the
//! read-ahead that keeps several of them in flight while a subscription far behind the head
//! publishes ([`ReadAhead`]).
//!
//! Backfill is a pipeline of three stages that must overlap to approach what the endpoint and
//! JetStream can do: fetching a range, decoding it, publishing it. The subscription task
//! publishes range `k` while ranges `k+1..=k+FETCH_AHEAD` are fetched and decoded on their
//! own tasks; they are handed back strictly in block order. Only [`FETCH_AHEAD`] ranges are
//! ever held, so a slow JetStream holds the fetching back and memory stays bounded whatever
//! the backlog.
//!
//! A subscription reads ahead while its next block is below the head tracker's window (a
//! backfill, or a long pause), and finishes the ranges already in flight; inside the window
//! it fetches one range at a time, shared with the chain's other subscriptions there, so
//! that calls do not grow with the subscriptions when many are a few blocks behind. Each
//! range read ahead brings the hash of the block before it, so the task notices when a
//! reorganisation reached what it published: its cursor's block is no longer the parent of
//! what comes next. It then drops the read-ahead and unwinds as it does at the head. Logs
//! from blocks in the head tracker's window are checked against their canonical hashes, as
//! on every path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use alloy::rpc::types::Log;
use alloy_primitives::B256;
use herald_proto::EventEnvelope;
use tokio::task::JoinHandle;

use crate::chain::{BlockRef, ChainRpc, LogQuery, RpcError};
use crate::decode::Decoder;
use crate::heads::ChainView;
use crate::metrics::Metrics;

/// Ranges fetched ahead of the one being published.
pub const FETCH_AHEAD: usize = 4;

/// How many ranges to keep in flight: one at first and after a failure, doubling with each
/// success up to [`FETCH_AHEAD`]. The first answer sizes the ranges before several are asked
/// blind; an endpoint that fails every n-th call (a quota, a flaky node behind a balancer)
/// cannot fail the first range of every attempt; a failing endpoint gets one request at a
/// time rather than a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth(usize);

impl Default for Depth {
    fn default() -> Self {
        Self(1)
    }
}

impl Depth {
    /// Ranges to keep in flight.
    pub fn get(self) -> usize {
        self.0
    }

    /// A range was read.
    pub fn succeeded(&mut self) {
        self.0 = (self.0 * 2).min(FETCH_AHEAD);
    }

    /// A range could not be read.
    pub fn failed(&mut self) {
        self.0 = 1;
    }
}

/// How many `eth_getLogs` answers a range gets when blooms say logs are missing.
pub const LOG_ATTEMPTS: u32 = 3;

/// One subscription's `eth_getLogs`, validated. Cheap to clone.
pub struct RangeReader<R> {
    /// The chain endpoint.
    pub chain: Arc<R>,
    /// Where call durations and outcomes are counted.
    pub metrics: Metrics,
    /// The chain id, as a metric label.
    pub chain_label: String,
    /// The subscription's contract(s).
    pub addresses: Vec<alloy_primitives::Address>,
    /// topic0 (the event's selector) and the indexed-argument filters.
    pub topics: [Option<Vec<B256>>; 4],
    /// Turns the logs into the subscription's envelopes.
    pub decoder: Decoder,
}

impl<R> Clone for RangeReader<R> {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            metrics: self.metrics.clone(),
            chain_label: self.chain_label.clone(),
            addresses: self.addresses.clone(),
            topics: self.topics.clone(),
            decoder: self.decoder.clone(),
        }
    }
}

/// A range read ahead: its envelopes and the blocks that tie it to the chain.
pub struct FetchedRange {
    /// First block.
    pub from: u64,
    /// Last block.
    pub to: u64,
    /// The range's last block, as the endpoint had it when the logs were read.
    pub last_block: BlockRef,
    /// Hash of block `from - 1` when the logs were read: must be the cursor's.
    pub parent_hash: B256,
    /// How many logs the endpoint returned (what the range sizer learns from).
    pub logs: usize,
    /// The subscription's envelopes, in order.
    pub envelopes: Vec<EventEnvelope>,
}

impl<R: ChainRpc> RangeReader<R> {
    /// The query for `from..=to`.
    pub fn query(&self, from: u64, to: u64) -> LogQuery {
        LogQuery {
            from,
            to,
            addresses: self.addresses.clone(),
            topics: self.topics.clone(),
            block_hash: None,
        }
    }

    async fn observed<T>(
        &self,
        method: &str,
        call: impl Future<Output = Result<T, RpcError>>,
    ) -> Result<T, RpcError> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics.observe_rpc(&self.chain_label, method, started.elapsed(), &result);
        result
    }

    /// `eth_getLogs` for `query`, not trusted to be complete or canonical. `known` are the
    /// canonical blocks known in the range (the head tracker's window and the range's last
    /// block), in any order. Every log from a known block must carry its hash (else the chain
    /// is reorganising under the call: an error, retried).
    ///
    /// Every block of the range that the answer leaves without logs is vouched for by its
    /// header's `logsBloom`: known blocks' are at hand, the others' headers are read (in
    /// batches, once per range; they must link by parent hash to the known ones). An endpoint
    /// may drop logs anywhere in the range, not only near its head: a backend behind a load
    /// balancer that is still syncing, or whose log index is being rebuilt, answers `[]` for
    /// blocks years deep. A block whose bloom says it may hold a matching log, but which got
    /// none, makes the answer suspect: it is asked again (answers merged) up to
    /// [`LOG_ATTEMPTS`] times. Then its logs are asked for by block hash, from the block's
    /// receipts: what they hold is its answer (nothing: the bloom gave a false positive), on
    /// the known block's branch even when the endpoint has moved to another one since.
    pub async fn logs(&self, query: &LogQuery, known: &[BlockRef]) -> Result<Vec<Log>, RpcError> {
        let mut known: BTreeMap<u64, BlockRef> = known
            .iter()
            .filter(|b| (query.from..=query.to).contains(&b.number))
            .map(|b| (b.number, *b))
            .collect();
        let mut merged: BTreeMap<(u64, u64), Log> = BTreeMap::new();
        for attempt in 1..=LOG_ATTEMPTS {
            let logs = self.observed("eth_getLogs", self.chain.logs(query)).await?;
            for log in logs {
                let (number, index) =
                    (log.block_number.unwrap_or_default(), log.log_index.unwrap_or_default());
                if let Some(block) = known.get(&number)
                    && log.block_hash != Some(block.hash)
                {
                    return Err(RpcError::reorganising(
                        "eth_getLogs",
                        format!(
                            "log from block {number} {:?}, but the canonical block is {}",
                            log.block_hash, block.hash
                        ),
                    ));
                }
                merged.insert((number, index), log);
            }
            self.vouch_for_silent_blocks(query, &merged, &mut known).await?;
            let suspect: Vec<u64> = known
                .values()
                .filter(|b| query.addresses.iter().any(|a| b.may_contain(a, &query.topics)))
                .filter(|b| merged.range((b.number, 0)..=(b.number, u64::MAX)).next().is_none())
                .map(|b| b.number)
                .collect();
            if suspect.is_empty() {
                break;
            }
            if attempt < LOG_ATTEMPTS {
                self.metrics.incomplete_log_answers.with_label_values(&[&self.chain_label]).inc();
                tracing::debug!(
                    ?suspect,
                    attempt,
                    "logsBloom says logs are missing from the answer; asking again"
                );
                continue;
            }
            // A lagging index can miss a block any number of times; the block's own receipts
            // cannot. What they hold is the block's answer, nothing a false positive.
            for number in suspect {
                let query = LogQuery {
                    from: number,
                    to: number,
                    block_hash: Some(known[&number].hash),
                    ..query.clone()
                };
                let logs = self.observed("eth_getLogs", self.chain.logs(&query)).await?;
                if logs.is_empty() {
                    tracing::debug!(
                        block = number,
                        "logsBloom matched but the block has no such logs: false positive"
                    );
                }
                for log in logs {
                    merged.insert((number, log.log_index.unwrap_or_default()), log);
                }
            }
        }
        Ok(merged.into_values().collect())
    }

    /// Adds to `known` the headers of the blocks of `query`'s range that `merged` holds no
    /// log of and `known` lacks, read from the endpoint, and checks that consecutive known
    /// blocks link by parent hash (else the headers came from two branches: the chain is
    /// reorganising under the calls).
    async fn vouch_for_silent_blocks(
        &self,
        query: &LogQuery,
        merged: &BTreeMap<(u64, u64), Log>,
        known: &mut BTreeMap<u64, BlockRef>,
    ) -> Result<(), RpcError> {
        let silent: Vec<u64> = (query.from..=query.to)
            .filter(|n| !known.contains_key(n))
            .filter(|&n| merged.range((n, 0)..=(n, u64::MAX)).next().is_none())
            .collect();
        if silent.is_empty() {
            return Ok(());
        }
        let headers = self.observed("eth_getBlockByNumber", self.chain.blocks(&silent)).await?;
        self.metrics
            .history_headers_read
            .with_label_values(&[&self.chain_label])
            .inc_by(headers.len() as u64);
        known.extend(headers.into_iter().map(|b| (b.number, b)));
        let mut below: Option<&BlockRef> = None;
        for block in known.values() {
            if let Some(parent) = below
                && parent.number + 1 == block.number
                && block.parent_hash != parent.hash
            {
                return Err(RpcError::reorganising(
                    "eth_getBlockByNumber",
                    format!("block {} does not link to block {} read with it", block.number, parent.number),
                ));
            }
            below = Some(block);
        }
        Ok(())
    }

    /// Block `number`: from the head tracker's window when it holds it (no call), else from
    /// the endpoint.
    async fn block(&self, view: &ChainView, number: u64) -> Result<BlockRef, RpcError> {
        match view.block(number) {
            Some(block) => Ok(*block),
            None => self.observed("eth_getBlockByNumber", self.chain.block(number)).await,
        }
    }

    /// Reads and decodes `from..=to`, checking the logs against the canonical blocks the
    /// head tracker's `view` knows in the range, and the range's last block.
    ///
    /// Logs from blocks nobody knows the hash of (below the window) cannot be checked one by
    /// one, so the read is bracketed instead: the last block is read before the logs, and the
    /// last block and the parent after them, from the endpoint. The same last block on both
    /// sides means the logs came from its branch, and the parent read after is on that branch
    /// too; only a chain that left the branch and came back between two calls (A-B-A within
    /// one round trip) could slip through.
    pub async fn read(&self, from: u64, to: u64, view: &ChainView) -> Result<FetchedRange, RpcError> {
        let before = self.block(view, to).await?;
        let mut known: Vec<BlockRef> = view.window.range(from, to).copied().collect();
        known.push(before);
        let logs = self.logs(&self.query(from, to), &known).await?;
        let (last_block, parent) = tokio::join!(
            self.observed("eth_getBlockByNumber", self.chain.block(to)),
            self.observed("eth_getBlockByNumber", self.chain.block(from.saturating_sub(1)))
        );
        let (last_block, parent) = (last_block?, parent?);
        if last_block.hash != before.hash {
            return Err(RpcError::reorganising(
                "eth_getLogs",
                format!(
                    "block {to} was {} before the logs were read and {} after",
                    before.hash, last_block.hash
                ),
            ));
        }
        let count = logs.len();
        let decoder = self.decoder.clone();
        // Decoding is CPU work: off the runtime's threads, so it overlaps with publishing.
        let envelopes = tokio::task::spawn_blocking(move || decoder.envelopes(&logs)).await.map_err(|e| {
            RpcError::BadAnswer { method: "eth_getLogs", message: format!("decoding failed: {e}") }
        })?;
        Ok(FetchedRange { from, to, last_block, parent_hash: parent.hash, logs: count, envelopes })
    }
}

/// A range being read.
struct Pending {
    span: u64,
    handle: JoinHandle<Result<FetchedRange, RpcError>>,
}

/// Ranges in flight for one subscription, handed back in block order. Dropping it aborts
/// what is still in flight.
pub struct ReadAhead {
    in_flight: VecDeque<Pending>,
    /// First block of the next range to hand out.
    expects: u64,
    /// First block not yet asked for.
    planned: u64,
}

impl ReadAhead {
    /// Reading from block `next` on.
    pub fn new(next: u64) -> Self {
        Self { in_flight: VecDeque::new(), expects: next, planned: next }
    }

    /// First block of the next range [`Self::next`] hands out.
    pub fn expects(&self) -> u64 {
        self.expects
    }

    /// Ranges in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Asks for ranges of `span` blocks up to block `limit`, until `depth` are in flight; the
    /// logs of blocks in `view`'s window must carry their canonical hashes.
    pub fn fill<R: ChainRpc>(
        &mut self,
        reader: &RangeReader<R>,
        view: &Arc<ChainView>,
        limit: u64,
        span: u64,
        depth: usize,
    ) {
        while self.in_flight.len() < depth
            && let Some(range) = crate::ranges::next_range(self.planned, limit, span)
        {
            let (from, to) = (*range.start(), *range.end());
            let (reader, view) = (reader.clone(), view.clone());
            let handle = tokio::spawn(async move { reader.read(from, to, &view).await });
            self.in_flight.push_back(Pending { span: to - from + 1, handle });
            self.planned = to + 1;
        }
    }

    /// The next range in block order with the span asked for, or `None` when nothing is in
    /// flight. After an error, the read-ahead is spent: drop it and start a new one.
    pub async fn next(&mut self) -> Option<(u64, Result<FetchedRange, RpcError>)> {
        let pending = self.in_flight.front_mut()?;
        let result = (&mut pending.handle).await.unwrap_or_else(|e| {
            Err(RpcError::BadAnswer {
                method: "eth_getLogs",
                message: format!("read-ahead task failed: {e}"),
            })
        });
        let span = pending.span;
        self.in_flight.pop_front();
        if let Ok(range) = &result {
            self.expects = range.to + 1;
        }
        Some((span, result))
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        for pending in &self.in_flight {
            pending.handle.abort();
        }
    }
}
