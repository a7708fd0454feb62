//! Chain heads as the coordinator sees them: one poller per configured chain with RPC URLs,
//! used to report heads and lag and to bound start blocks. A chain whose head is unknown
//! (no URL, or the endpoint is down) is still served; its start blocks are not bounded.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use alloy::providers::{Provider, RootProvider};
use herald_proto::ChainId;
use tokio_util::sync::CancellationToken;

use crate::config::ChainConfig;

/// A head reading.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    /// Block number.
    pub number: u64,
    /// When it was read.
    pub at: Instant,
}

/// The latest head of every configured chain (`None` until read).
#[derive(Clone, Default)]
pub struct Heads(Arc<RwLock<BTreeMap<ChainId, Option<Head>>>>);

impl Heads {
    /// Every configured chain, head unknown.
    pub fn new(chains: &[ChainConfig]) -> Self {
        Self(Arc::new(RwLock::new(chains.iter().map(|c| (c.chain_id, None)).collect())))
    }

    /// A copy of the current readings.
    pub fn snapshot(&self) -> BTreeMap<ChainId, Option<Head>> {
        self.0.read().expect("heads lock").clone()
    }

    /// The current head of one chain.
    pub fn get(&self, chain: ChainId) -> Option<u64> {
        self.0.read().expect("heads lock").get(&chain).copied().flatten().map(|h| h.number)
    }

    fn set(&self, chain: ChainId, number: u64) {
        self.0.write().expect("heads lock").insert(chain, Some(Head { number, at: Instant::now() }));
    }

    /// Polls `chain`'s first RPC URL until cancelled.
    pub async fn poll(self, chain: ChainConfig, cancel: CancellationToken) {
        let Some(url) = chain.rpc_urls.first().and_then(|u| u.parse().ok()) else { return };
        let provider = RootProvider::<alloy::network::Ethereum>::new_http(url);
        let mut failing = false;
        loop {
            let read = tokio::time::timeout(Duration::from_secs(10), provider.get_block_number()).await;
            match read {
                Ok(Ok(number)) => {
                    if failing {
                        tracing::info!(chain_id = chain.chain_id, "chain head readable again");
                    }
                    failing = false;
                    self.set(chain.chain_id, number);
                }
                Ok(Err(e)) if !failing => {
                    failing = true;
                    let error = herald_proto::settings::scrub(&e.to_string(), &chain.rpc_urls[0]);
                    tracing::warn!(chain_id = chain.chain_id, error, "cannot read chain head");
                }
                Err(_) if !failing => {
                    failing = true;
                    tracing::warn!(chain_id = chain.chain_id, "chain head read timed out");
                }
                _ => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(chain.head_poll_interval) => {}
            }
        }
    }
}
