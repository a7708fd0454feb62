//! Head tracking: one task per chain follows the tip for every subscription of that chain on
//! this worker, so that following the head costs one call per new block, not one per
//! subscription.
//!
//! New heads arrive by WebSocket (`eth_subscribe("newHeads")`) when the chain has a `ws_url`,
//! otherwise by polling `latest`. Polling also covers a socket that is down (it is reconnected
//! with backoff) and, at a fifth of the rate, a socket that is up: a socket can stall without
//! closing. Every head is linked to a window of recent blocks by parent hash ([`follow`]):
//! a gap is filled block by block, a parent mismatch is a reorg walked back to the common
//! ancestor, and a head below the newest one seen is a lagging endpoint, not a reorg.
//!
//! The outcome is a [`ChainView`] on a watch channel: the canonical recent blocks with their
//! log blooms (subscriptions check their cursor and every `eth_getLogs` answer against it),
//! and the chain's `safe`/`finalized` blocks while some subscription waits for them.
//! Subscriptions never depend on the window for *which* blocks to fetch: they fetch their own
//! ranges from their cursor, so a window that was reset (a gap wider than it) skips nothing.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_proto::{ChainId, Finality};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::chain::{BlockRef, ChainRpc, HeadSubscription, RpcError, Tip};
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// Recent blocks kept per chain: deeper than any reorg seen on a production chain.
pub const WINDOW: usize = 256;

/// Blocks below the first head read into the window at start, so that subscriptions resuming
/// near the head check their cursor and their first answers against it.
pub const START_DEPTH: usize = 32;

/// With a healthy socket, polling runs this many times slower, as a stall watchdog.
const WATCHDOG_FACTOR: u32 = 5;

/// The canonical recent blocks of a chain, contiguous by number and linked by parent hash.
#[derive(Debug, Clone)]
pub struct HeadWindow {
    blocks: BTreeMap<u64, BlockRef>,
    capacity: usize,
}

/// How a new head relates to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Already the window's block at that height.
    Known,
    /// Below the newest block seen: the endpoint lags (or the chain got shorter, which shows
    /// as a reorg once it is longer again).
    Behind,
    /// A new tip, or a replacement of the current one.
    New,
}

/// Whether the lowest block of a segment joins the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Its parent is the window's block below it.
    Connects,
    /// Its parent is missing (a gap) or different (a reorg): fetch the canonical block at
    /// this height and link again.
    NeedParent(u64),
    /// Nothing in the window to link to: the segment replaces the window.
    Unanchored,
}

impl HeadWindow {
    /// An empty window of `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self { blocks: BTreeMap::new(), capacity: capacity.max(1) }
    }

    /// The newest block.
    pub fn top(&self) -> Option<&BlockRef> {
        self.blocks.last_key_value().map(|(_, b)| b)
    }

    /// The block at `number`, if in the window.
    pub fn get(&self, number: u64) -> Option<&BlockRef> {
        self.blocks.get(&number)
    }

    /// Blocks in the window, oldest first.
    pub fn blocks(&self) -> impl Iterator<Item = &BlockRef> {
        self.blocks.values()
    }

    /// Blocks of the window in `from..=to`.
    pub fn range(&self, from: u64, to: u64) -> impl Iterator<Item = &BlockRef> {
        self.blocks.range(from..=to.max(from)).map(|(_, b)| b)
    }

    /// How `head` relates to what is known.
    pub fn arrival(&self, head: &BlockRef) -> Arrival {
        match self.top() {
            None => Arrival::New,
            Some(top) if head.number < top.number => Arrival::Behind,
            Some(top) if top.hash == head.hash => Arrival::Known,
            Some(_) => Arrival::New,
        }
    }

    /// Whether `lowest`, the oldest block of a segment of `len` blocks, links into the window.
    /// An empty window is first filled [`START_DEPTH`] blocks deep.
    pub fn link(&self, lowest: &BlockRef, len: usize) -> Link {
        let Some(bottom) = self.blocks.first_key_value().map(|(n, _)| *n) else {
            if len < START_DEPTH.min(self.capacity) && lowest.number > 0 {
                return Link::NeedParent(lowest.number - 1);
            }
            return Link::Unanchored;
        };
        if lowest.number <= bottom {
            return Link::Unanchored;
        }
        match self.get(lowest.number - 1) {
            Some(parent) if parent.hash == lowest.parent_hash => Link::Connects,
            _ => Link::NeedParent(lowest.number - 1),
        }
    }

    /// Replaces the window from `segment`'s first block up with `segment` (ascending and
    /// linked), dropping everything when it is not `anchored`. Returns the number of blocks
    /// that were in the window and are orphaned now.
    pub fn splice(&mut self, segment: Vec<BlockRef>, anchored: bool) -> u64 {
        let Some(first) = segment.first().map(|b| b.number) else {
            return 0;
        };
        let replaced = self.blocks.split_off(&first);
        let orphaned = replaced
            .values()
            .filter(|old| {
                let index = usize::try_from(old.number - first).unwrap_or(usize::MAX);
                segment.get(index).is_none_or(|new| new.hash != old.hash)
            })
            .count() as u64;
        if !anchored {
            self.blocks.clear();
        }
        self.blocks.extend(segment.into_iter().map(|b| (b.number, b)));
        while self.blocks.len() > self.capacity {
            self.blocks.pop_first();
        }
        orphaned
    }
}

/// What [`follow`] did with a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Followed {
    /// Blocks added to the window.
    pub added: u64,
    /// Blocks of the window that are no longer canonical.
    pub orphaned: u64,
    /// The head was below the newest block seen and was ignored.
    pub behind: bool,
    /// Nothing linked (a gap wider than the window, or a first head): the window restarted.
    pub reset: bool,
}

/// Links `head` into `window`, fetching canonical blocks by number (`fetch`) to fill gaps and
/// to walk a reorg back to the common ancestor. At most the window's capacity is fetched; a
/// longer gap resets the window.
pub async fn follow<F, Fut>(
    window: &mut HeadWindow,
    head: BlockRef,
    mut fetch: F,
) -> Result<Followed, RpcError>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<BlockRef, RpcError>>,
{
    match window.arrival(&head) {
        Arrival::Known => return Ok(Followed::default()),
        Arrival::Behind => return Ok(Followed { behind: true, ..Followed::default() }),
        Arrival::New => {}
    }
    // Newest last; grows downwards until its oldest block links into the window.
    let mut segment = vec![head];
    let anchored = loop {
        match window.link(&segment[0], segment.len()) {
            Link::Connects => break true,
            Link::Unanchored => break false,
            Link::NeedParent(_) if segment.len() >= window.capacity => break false,
            Link::NeedParent(number) => {
                let parent = fetch(number).await?;
                if parent.hash != segment[0].parent_hash {
                    // The chain moved while walking back: what was fetched above is orphaned
                    // already. Continue from the canonical block; the next head brings the rest.
                    segment.clear();
                }
                segment.insert(0, parent);
            }
        }
    };
    let added = segment.len() as u64;
    let orphaned = window.splice(segment, anchored);
    Ok(Followed { added, orphaned, behind: false, reset: !anchored })
}

/// A finality tag as far as this worker knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TagState {
    /// Not read yet (or nobody asked).
    #[default]
    Unknown,
    /// The endpoint has no such block: the chain has no finality tags.
    Unsupported,
    /// The tagged block's number.
    At(u64),
}

/// What subscriptions see of a chain.
#[derive(Debug, Clone)]
pub struct ChainView {
    /// Recent canonical blocks.
    pub window: HeadWindow,
    /// The `safe` block.
    pub safe: TagState,
    /// The `finalized` block.
    pub finalized: TagState,
}

impl Default for ChainView {
    fn default() -> Self {
        Self { window: HeadWindow::new(WINDOW), safe: TagState::Unknown, finalized: TagState::Unknown }
    }
}

impl ChainView {
    /// The newest canonical block number, once one was seen.
    pub fn head(&self) -> Option<u64> {
        self.window.top().map(|b| b.number)
    }

    /// The canonical block at `number`, if recent enough to be in the window.
    pub fn block(&self, number: u64) -> Option<&BlockRef> {
        self.window.get(number)
    }

    /// The state of a finality tag.
    pub fn finality(&self, finality: Finality) -> TagState {
        match finality {
            Finality::Safe => self.safe,
            Finality::Finalized => self.finalized,
        }
    }
}

/// A chain's view for its subscriptions, and their demand for finality tags.
#[derive(Debug, Clone)]
pub struct Heads {
    view: watch::Receiver<Arc<ChainView>>,
    finality_interest: Arc<AtomicUsize>,
}

/// Keeps the tracker reading finality tags while held.
#[derive(Debug)]
pub struct FinalityInterest(Arc<AtomicUsize>);

impl Drop for FinalityInterest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Heads {
    /// A receiver of the chain's view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ChainView>> {
        self.view.clone()
    }

    /// The view now.
    pub fn now(&self) -> Arc<ChainView> {
        self.view.borrow().clone()
    }

    /// Asks the tracker to read the `safe` and `finalized` blocks until the guard is dropped.
    pub fn want_finality(&self) -> FinalityInterest {
        self.finality_interest.fetch_add(1, Ordering::Relaxed);
        FinalityInterest(self.finality_interest.clone())
    }

    /// Heads that never move, for tests of code that reads them.
    pub fn fixed(view: ChainView) -> Self {
        let (tx, heads) = Self::driven(view);
        // Keep the sender alive: a closed channel would read as a dead tracker.
        std::mem::forget(tx);
        heads
    }

    /// Heads moved by the caller instead of a tracker (simulations): every view sent is what
    /// the subscriptions see next. Dropping the sender reads as a dead tracker.
    pub fn driven(view: ChainView) -> (watch::Sender<Arc<ChainView>>, Self) {
        let (tx, view) = watch::channel(Arc::new(view));
        (tx, Self { view, finality_interest: Arc::default() })
    }
}

/// Follows one chain's head; see the module docs.
pub struct HeadTracker<R> {
    /// The chain.
    pub chain_id: ChainId,
    /// Its JSON-RPC endpoint (polling, gap filling, reorg walks, tags).
    pub rpc: Arc<R>,
    /// Its WebSocket endpoint for new heads, if any.
    pub ws_url: Option<String>,
    /// How often `latest` is polled without a socket.
    pub poll_interval: Duration,
    /// Timeout of the socket's connection and subscription.
    pub request_timeout: Duration,
    /// Metrics.
    pub metrics: Metrics,
}

impl<R: ChainRpc> HeadTracker<R> {
    /// Starts following the head until `cancel`.
    pub fn spawn(self, cancel: CancellationToken) -> Heads {
        let (tx, view) = watch::channel(Arc::new(ChainView::default()));
        let finality_interest = Arc::new(AtomicUsize::new(0));
        let span = tracing::info_span!("heads", chain_id = self.chain_id);
        tokio::spawn(tracing::Instrument::instrument(self.run(tx, finality_interest.clone(), cancel), span));
        Heads { view, finality_interest }
    }

    async fn run(
        self,
        tx: watch::Sender<Arc<ChainView>>,
        interest: Arc<AtomicUsize>,
        cancel: CancellationToken,
    ) {
        let chain = self.chain_id.to_string();
        let mut view = ChainView::default();
        let mut socket: Option<HeadSubscription> = None;
        let mut socket_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut socket_retry_at = Instant::now();
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        let mut failing = false;
        let mut lagging = false;
        let mut tag_failures = 0u32;
        self.metrics.heads_websocket.with_label_values(&[&chain]).set(0);
        loop {
            let head = tokio::select! {
                _ = cancel.cancelled() => return,
                head = next_head(&mut socket), if socket.is_some() => {
                    if head.is_none() {
                        socket = None;
                        self.metrics.heads_websocket.with_label_values(&[&chain]).set(0);
                        tracing::warn!("new-heads socket closed; polling until it is back");
                        socket_retry_at = Instant::now() + socket_backoff.next_delay();
                    }
                    head
                }
                _ = tokio::time::sleep_until(socket_retry_at), if socket.is_none() && self.ws_url.is_some() => {
                    let url = self.ws_url.as_deref().unwrap_or_default();
                    match HeadSubscription::connect(url, self.request_timeout).await {
                        Ok(s) => {
                            socket = Some(s);
                            socket_backoff.reset();
                            self.metrics.heads_websocket.with_label_values(&[&chain]).set(1);
                            tracing::info!("following new heads over the socket");
                        }
                        Err(e) => {
                            if socket_backoff.attempts() == 0 {
                                tracing::warn!(error = %e, "cannot subscribe to new heads; polling meanwhile");
                            }
                            socket_retry_at = Instant::now() + socket_backoff.next_delay();
                        }
                    }
                    continue;
                }
                _ = poll.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if socket.is_some() && !ticks.is_multiple_of(WATCHDOG_FACTOR) {
                        continue;
                    }
                    match self.observe(self.rpc.tip(Tip::Latest).await, "eth_getBlockByNumber") {
                        Ok(head) => {
                            if failing {
                                tracing::info!("head polling recovered");
                                failing = false;
                            }
                            head
                        }
                        Err(e) => {
                            if !failing {
                                tracing::warn!(error = %e, "cannot read the chain head; retrying");
                                failing = true;
                            }
                            None
                        }
                    }
                }
            };
            let Some(head) = head else { continue };
            let this = &self;
            let followed = follow(&mut view.window, head, |n| async move {
                this.observe(this.rpc.block(n).await, "eth_getBlockByNumber")
            })
            .await;
            match followed {
                Ok(f) if f.behind => {
                    if !lagging {
                        tracing::info!(
                            endpoint_head = head.number,
                            seen = view.head(),
                            "endpoint behind the newest head seen; treating it as lagging, not as a reorg"
                        );
                        lagging = true;
                    }
                    continue;
                }
                Ok(f) => {
                    lagging = false;
                    if f.orphaned > 0 {
                        self.metrics.chain_reorgs.with_label_values(&[&chain]).inc();
                        tracing::info!(
                            depth = f.orphaned,
                            head = head.number,
                            "chain reorganised; subscriptions on orphaned blocks will retract"
                        );
                    }
                    // Tags are read with new blocks; and at once when a subscription asked for
                    // them after the last new block (else it would wait for the next one).
                    let tags_wanted = interest.load(Ordering::Relaxed) > 0
                        && [view.safe, view.finalized].contains(&TagState::Unknown);
                    if f.added == 0 && !tags_wanted {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot link the new head yet");
                    continue;
                }
            }
            if let Some(number) = view.head() {
                self.metrics.head_block.with_label_values(&[&chain]).set(number as i64);
            }
            if interest.load(Ordering::Relaxed) > 0 {
                self.read_tags(&mut view, &mut tag_failures).await;
            }
            tx.send_replace(Arc::new(view.clone()));
        }
    }

    /// Reads `safe` and `finalized`. An endpoint that answers "no such block" has no finality
    /// tags; one that keeps failing to answer is taken as not having them either (its
    /// subscriptions fall back to confirmations, with a warning) rather than stalling them.
    async fn read_tags(&self, view: &mut ChainView, failures: &mut u32) {
        const GIVE_UP_AFTER: u32 = 3;
        for finality in [Finality::Safe, Finality::Finalized] {
            let read = self.observe(self.rpc.tip(Tip::Final(finality)).await, "eth_getBlockByNumber");
            let state = match read {
                Ok(Some(block)) => TagState::At(block.number),
                Ok(None) => TagState::Unsupported,
                Err(e) => {
                    *failures += 1;
                    if *failures < GIVE_UP_AFTER || matches!(view.finality(finality), TagState::At(_)) {
                        continue;
                    }
                    tracing::warn!(error = %e, tag = finality.tag(), "endpoint does not serve the block tag");
                    TagState::Unsupported
                }
            };
            if !matches!(state, TagState::Unsupported) {
                *failures = 0;
            }
            match finality {
                Finality::Safe => view.safe = state,
                Finality::Finalized => view.finalized = state,
            }
        }
    }

    fn observe<T>(&self, result: Result<T, RpcError>, method: &str) -> Result<T, RpcError> {
        self.metrics.count_rpc(&self.chain_id.to_string(), method, &result);
        result
    }
}

async fn next_head(socket: &mut Option<HeadSubscription>) -> Option<BlockRef> {
    match socket {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::{B256, keccak256};
    use proptest::prelude::*;

    /// A chain as a list of fork ids per height: block `n` of fork `f` has a hash derived from
    /// both, and its parent is block `n - 1` of whatever fork the chain had there.
    fn chain(forks: &[u8]) -> Vec<BlockRef> {
        let mut blocks: Vec<BlockRef> = Vec::new();
        for (n, fork) in forks.iter().enumerate() {
            let parent_hash = blocks.last().map_or(B256::ZERO, |b| b.hash);
            let hash = keccak256([&(n as u64).to_be_bytes()[..], &[*fork], parent_hash.as_slice()].concat());
            blocks.push(BlockRef { number: n as u64, hash, parent_hash, logs_bloom: Default::default() });
        }
        blocks
    }

    fn follow_on(window: &mut HeadWindow, canonical: &[BlockRef], head: u64) -> Followed {
        let head = canonical[head as usize];
        futures::executor::block_on(follow(window, head, |n| std::future::ready(Ok(canonical[n as usize]))))
            .unwrap()
    }

    fn assert_is_suffix(window: &HeadWindow, canonical: &[BlockRef]) {
        for b in window.blocks() {
            assert_eq!(*b, canonical[b.number as usize], "window block {} is not canonical", b.number);
        }
        let numbers: Vec<u64> = window.blocks().map(|b| b.number).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "window has a hole: {numbers:?}");
    }

    #[test]
    fn gaps_are_filled_and_reorgs_walked_back() {
        let mut window = HeadWindow::new(64);
        let a = chain(&[0; 10]);
        assert_eq!(follow_on(&mut window, &a, 3), Followed { added: 4, reset: true, ..Followed::default() });
        assert_eq!(follow_on(&mut window, &a, 7), Followed { added: 4, ..Followed::default() });
        assert_is_suffix(&window, &a);
        // A depth-2 reorg at the same height.
        let b = chain(&[0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(follow_on(&mut window, &b, 7), Followed { added: 2, orphaned: 2, ..Followed::default() });
        assert_is_suffix(&window, &b);
        // A lagging endpoint: ignored.
        assert!(follow_on(&mut window, &b, 5).behind);
        assert_eq!(window.top().unwrap().number, 7);
        // The same head again: nothing.
        assert_eq!(follow_on(&mut window, &b, 7), Followed::default());
    }

    #[test]
    fn a_gap_wider_than_the_window_resets_it() {
        let mut window = HeadWindow::new(4);
        let a = chain(&[0; 30]);
        follow_on(&mut window, &a, 2);
        assert_eq!(window.blocks().count(), 3, "filled down to block 0");
        follow_on(&mut window, &a, 29);
        assert_is_suffix(&window, &a);
        assert_eq!(window.blocks().count(), 4);
        assert_eq!(window.top().unwrap().number, 29);
    }

    proptest! {
        /// Whatever sequence of forks and heads: the window is always a contiguous suffix of
        /// the canonical chain ending at the newest head not behind it, and a reorg's depth is
        /// the number of window blocks that changed.
        #[test]
        fn the_window_is_always_a_canonical_suffix(
            steps in proptest::collection::vec((0u8..3, 0usize..6, 0usize..40), 1..40),
            capacity in 1usize..12,
        ) {
            let mut forks: Vec<u8> = vec![0; 40];
            let mut window = HeadWindow::new(capacity);
            let mut newest = None::<u64>;
            for (fork, depth, head) in steps {
                // Replace the top `depth` blocks below `head` with another fork.
                for f in forks.iter_mut().take(head + 1).skip((head + 1).saturating_sub(depth)) {
                    *f = fork;
                }
                let canonical = chain(&forks);
                let before: BTreeMap<u64, B256> = window.blocks().map(|b| (b.number, b.hash)).collect();
                let followed = follow_on(&mut window, &canonical, head as u64);
                if newest.is_some_and(|n| (head as u64) < n) {
                    prop_assert!(followed.behind);
                    continue;
                }
                newest = Some(head as u64);
                prop_assert_eq!(window.top().unwrap().number, head as u64);
                assert_is_suffix(&window, &canonical);
                let changed = before.iter().filter(|(n, h)| **n <= head as u64 && canonical[**n as usize].hash != **h).count() as u64;
                prop_assert!(followed.orphaned <= changed);
                if !followed.reset {
                    prop_assert_eq!(followed.orphaned, changed);
                }
            }
        }
    }
}
