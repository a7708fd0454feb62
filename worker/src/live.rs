//! Merged live fetching: the subscriptions of one chain that are at the head share one
//! `eth_getLogs` per new block range, whatever their number.
//!
//! A subscription whose next range lies inside the head tracker's window *joins* with its
//! (contract, topic0) interest. The first member to ask for a range fetches it for every
//! interest at once (address list chunked to `max_addresses_per_call`, topic0 list) and caches
//! the logs per block; the others find them cached. Members filter by address, topic0 and their
//! indexed-argument filters locally. Each member still drives its own cursor and asks for
//! exactly its next range, so joining (after a backfill) or leaving can neither skip nor repeat a
//! block: a range the cache does not fully cover (the interest joined after its first block, a
//! block changed by a reorg, an answer the blooms call incomplete) is answered `None`, and the
//! member fetches it alone, with every check of its own path.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use alloy::rpc::types::Log;
use alloy_primitives::{Address, B256};

use crate::chain::{ChainRpc, LogQuery, RpcError};
use crate::heads::{ChainView, WINDOW};
use crate::metrics::Metrics;

type Interest = (Address, B256);

/// Address chunks of one fill asked at the same time.
const CONCURRENT_CHUNKS: usize = 4;

#[derive(Debug)]
struct CachedBlock {
    hash: B256,
    /// The interests the block was fetched for: only those can be answered from it.
    interests: Arc<BTreeSet<Interest>>,
    logs: Vec<Log>,
}

impl CachedBlock {
    fn answers(&self, interest: &Interest, view: &ChainView, number: u64) -> bool {
        self.interests.contains(interest) && view.block(number).map(|b| b.hash) == Some(self.hash)
    }
}

#[derive(Debug, Default)]
struct State {
    /// Interests and how many members hold each.
    interests: BTreeMap<Interest, usize>,
    /// The set of `interests`, shared by every block fetched for it (one set per block was
    /// a kilobyte per subscription, kept for the whole window); rebuilt after it changes.
    interest_set: Option<Arc<BTreeSet<Interest>>>,
    blocks: BTreeMap<u64, CachedBlock>,
}

/// One chain's shared live fetch; see the module docs.
pub struct LiveLogs<R> {
    chain_id: String,
    rpc: Arc<R>,
    max_addresses: usize,
    metrics: Metrics,
    state: Mutex<State>,
    fetching: tokio::sync::Mutex<()>,
}

/// A subscription's membership; leaving is dropping it.
pub struct LiveMember<R: ChainRpc> {
    live: Arc<LiveLogs<R>>,
    interest: Interest,
}

impl<R: ChainRpc> Drop for LiveMember<R> {
    fn drop(&mut self) {
        let mut state = self.live.state.lock().expect("live state");
        if let Some(members) = state.interests.get_mut(&self.interest) {
            *members -= 1;
            if *members == 0 {
                state.interests.remove(&self.interest);
                state.interest_set = None;
            }
        }
    }
}

impl<R: ChainRpc> LiveLogs<R> {
    /// A shared fetch over `rpc`, asking for at most `max_addresses` contracts per call.
    pub fn new(chain_id: u64, rpc: Arc<R>, max_addresses: usize, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            chain_id: chain_id.to_string(),
            rpc,
            max_addresses: max_addresses.max(1),
            metrics,
            state: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// Joins with interest in `topic0` logs of `address`.
    pub fn join(self: &Arc<Self>, address: Address, topic0: B256) -> LiveMember<R> {
        let mut state = self.state.lock().expect("live state");
        let members = state.interests.entry((address, topic0)).or_default();
        *members += 1;
        if *members == 1 {
            state.interest_set = None;
        }
        LiveMember { live: self.clone(), interest: (address, topic0) }
    }

    /// The member's logs (its address and topic0; topic filters are the member's business) in
    /// `from..=to` if the shared cache answers for all of the range, else `None`.
    pub fn logs(&self, member: &LiveMember<R>, from: u64, to: u64, view: &ChainView) -> Option<Vec<Log>> {
        let state = self.state.lock().expect("live state");
        let mut logs = Vec::new();
        for number in from..=to {
            let block = state.blocks.get(&number)?;
            if !block.answers(&member.interest, view, number) {
                return None;
            }
            let (address, topic0) = member.interest;
            logs.extend(
                block
                    .logs
                    .iter()
                    .filter(|l| l.address() == address && l.topics().first() == Some(&topic0))
                    .cloned(),
            );
        }
        Some(logs)
    }

    /// Makes sure `from..=to` is fetched for every member: the first member to ask fetches it
    /// (for every interest at once), the others wait for that fetch instead of calling the
    /// endpoint. Afterwards [`Self::logs`] answers, unless the window could not vouch for the
    /// answer (the member then fetches alone).
    ///
    /// Members wait here with nothing else in flight: thousands of subscriptions wake on every
    /// head, and what each holds while it waits is what a worker's memory grows with.
    pub async fn fill(
        &self,
        member: &LiveMember<R>,
        from: u64,
        to: u64,
        view: &ChainView,
    ) -> Result<(), RpcError> {
        if !self.may_answer(member, from, to, view) {
            return Ok(());
        }
        let _single_flight = self.fetching.lock().await;
        if !self.may_answer(member, from, to, view) {
            return Ok(());
        }
        Box::pin(self.fetch(&member.interest, from, to, view)).await
    }

    /// Whether the window holds every block of the range and the cache does not answer for it
    /// yet: whether a fetch could help.
    fn may_answer(&self, member: &LiveMember<R>, from: u64, to: u64, view: &ChainView) -> bool {
        if (from..=to).any(|n| view.block(n).is_none()) {
            return false;
        }
        let state = self.state.lock().expect("live state");
        !(from..=to).all(|n| state.blocks.get(&n).is_some_and(|b| b.answers(&member.interest, view, n)))
    }

    async fn ask(&self, query: &LogQuery) -> Result<Vec<Log>, RpcError> {
        let result = self.rpc.logs(query).await;
        let outcome = result.as_ref().map_or_else(|e| e.outcome(), |_| "ok");
        self.metrics.rpc_requests.with_label_values(&[&self.chain_id, "eth_getLogs", outcome]).inc();
        result
    }

    /// Fetches, for every current interest, the blocks of `from..=to` from the first one that
    /// cannot answer `interest` (missing, changed by a reorg, or fetched before it joined).
    async fn fetch(&self, interest: &Interest, from: u64, to: u64, view: &ChainView) -> Result<(), RpcError> {
        let (start, interests) = {
            let mut state = self.state.lock().expect("live state");
            let fresh = |n: u64| state.blocks.get(&n).is_some_and(|c| c.answers(interest, view, n));
            let Some(start) = (from..=to).find(|&n| !fresh(n)) else {
                return Ok(());
            };
            let State { interests, interest_set, .. } = &mut *state;
            let set = interest_set.get_or_insert_with(|| Arc::new(interests.keys().copied().collect()));
            (start, set.clone())
        };
        let addresses: Vec<Address> = {
            let mut a: Vec<Address> = interests.iter().map(|(a, _)| *a).collect();
            a.dedup();
            a
        };
        let mut topic0s: Vec<B256> = interests.iter().map(|(_, t)| *t).collect();
        topic0s.sort();
        topic0s.dedup();
        // The chunks are asked concurrently (a few at a time): every member at the head waits
        // for this fill, so its latency is theirs.
        let queries: Vec<LogQuery> = addresses
            .chunks(self.max_addresses)
            .map(|chunk| LogQuery {
                from: start,
                to,
                addresses: chunk.to_vec(),
                topics: [Some(topic0s.clone()), None, None, None],
                block_hash: None,
            })
            .collect();
        let mut fetched: Vec<Log> = Vec::new();
        for group in queries.chunks(CONCURRENT_CHUNKS) {
            for answer in futures::future::join_all(group.iter().map(|query| self.ask(query))).await {
                fetched.extend(answer?);
            }
        }
        // Only what the window vouches for is cached: logs of the canonical blocks, and no
        // block whose bloom announces an interest's log that the answer lacks.
        let mut blocks: BTreeMap<u64, CachedBlock> = BTreeMap::new();
        for number in start..=to {
            let Some(canonical) = view.block(number) else {
                return Ok(());
            };
            blocks.insert(
                number,
                CachedBlock { hash: canonical.hash, interests: interests.clone(), logs: Vec::new() },
            );
        }
        for log in fetched {
            let number = log.block_number.unwrap_or_default();
            let Some(block) = blocks.get_mut(&number) else { continue };
            if log.block_hash != Some(block.hash) {
                // The chain is reorganising under the call: cache nothing.
                return Ok(());
            }
            block.logs.push(log);
        }
        let before = blocks.len();
        blocks.retain(|&number, block| {
            let Some(canonical) = view.block(number) else { return false };
            interests.iter().all(|&(address, topic0)| {
                !canonical.may_contain(&address, &[Some(vec![topic0]), None, None, None])
                    || block
                        .logs
                        .iter()
                        .any(|l| l.address() == address && l.topics().first() == Some(&topic0))
            })
        });
        if blocks.len() < before {
            // Members fetch these blocks alone, asking again as their blooms demand.
            self.metrics.incomplete_log_answers.with_label_values(&[&self.chain_id]).inc();
        }
        let mut state = self.state.lock().expect("live state");
        state.blocks.extend(blocks);
        let keep_from = to.saturating_sub(WINDOW as u64);
        state.blocks = state.blocks.split_off(&keep_from);
        Ok(())
    }
}
