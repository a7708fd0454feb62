//! The chain, as the worker sees it: a narrow trait over JSON-RPC and its alloy adapter.
//!
//! Nothing an endpoint answers is trusted blindly: logs without a block hash, number or log
//! index (pending logs), logs outside the requested range or from another contract, and
//! missing blocks are reported as [`RpcError::BadAnswer`] so the caller retries instead of
//! advancing past data it never saw. Every call has a timeout.

use std::future::Future;
use std::time::Duration;

use alloy::eips::BlockNumberOrTag;
use alloy::providers::{Provider, RootProvider, WsConnect};
use alloy::rpc::types::{Filter, Header, Log};
use alloy_primitives::{Address, B256, Bloom, BloomInput};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use herald_proto::settings::{redact_url, scrub};
use herald_proto::{ChainId, Finality};

/// A block's identity, enough to follow the chain and detect reorgs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    /// Block number.
    pub number: u64,
    /// Block hash.
    pub hash: B256,
    /// Parent block hash.
    pub parent_hash: B256,
    /// The header's bloom filter of every log address and topic in the block.
    pub logs_bloom: Bloom,
}

impl BlockRef {
    fn from_header(header: &Header) -> Self {
        Self {
            number: header.number,
            hash: header.hash,
            parent_hash: header.parent_hash,
            logs_bloom: header.logs_bloom,
        }
    }

    /// Whether the block may hold a log of `address` with, at each position, one of the
    /// topics asked for. `false` is certain; `true` may be a false positive.
    pub fn may_contain(&self, address: &Address, topics: &[Option<Vec<B256>>; 4]) -> bool {
        self.logs_bloom.contains_input(BloomInput::Raw(address.as_slice()))
            && topics.iter().flatten().all(|values| {
                values.iter().any(|t| self.logs_bloom.contains_input(BloomInput::Raw(t.as_slice())))
            })
    }
}

/// A block the chain names by tag rather than number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tip {
    /// The newest block.
    Latest,
    /// The newest block of a finality level.
    Final(Finality),
}

impl Tip {
    fn tag(self) -> BlockNumberOrTag {
        match self {
            Self::Latest => BlockNumberOrTag::Latest,
            Self::Final(Finality::Safe) => BlockNumberOrTag::Safe,
            Self::Final(Finality::Finalized) => BlockNumberOrTag::Finalized,
        }
    }
}

/// One `eth_getLogs` question: logs of `address` in `from..=to` whose topics match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// First block, inclusive.
    pub from: u64,
    /// Last block, inclusive.
    pub to: u64,
    /// Emitting contract.
    pub address: Address,
    /// topic0..topic3; `None` matches anything, `Some(v)` any of `v`.
    pub topics: [Option<Vec<B256>>; 4],
}

/// A failed RPC call, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// No answer within the timeout.
    #[error("rpc call {method} timed out after {after:?}")]
    Timeout {
        /// JSON-RPC method.
        method: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// Connection failure, HTTP error or JSON-RPC error response.
    #[error("rpc call {method} failed: {message}")]
    Transport {
        /// JSON-RPC method.
        method: &'static str,
        /// Error text, with any URL credentials already stripped by the transport.
        message: String,
    },
    /// The endpoint answered, but the answer cannot be right.
    #[error("rpc call {method} returned a bad answer: {message}")]
    BadAnswer {
        /// JSON-RPC method.
        method: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl RpcError {
    /// Whether retrying the same call may succeed. Every RPC failure is treated as
    /// transient: a worker never gives up on a chain, it backs off.
    pub fn is_retryable(&self) -> bool {
        true
    }

    /// The JSON-RPC method that failed, for metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Timeout { method, .. }
            | Self::Transport { method, .. }
            | Self::BadAnswer { method, .. } => method,
        }
    }
}

/// What the worker needs from a chain endpoint.
pub trait ChainRpc: Send + Sync + 'static {
    /// `eth_chainId`.
    fn chain_id(&self) -> impl Future<Output = Result<ChainId, RpcError>> + Send;
    /// `eth_getBlockByNumber` of a tag, header only; `None` when the endpoint has no such
    /// block (e.g. `finalized` on a chain without finality).
    fn tip(&self, tip: Tip) -> impl Future<Output = Result<Option<BlockRef>, RpcError>> + Send;
    /// `eth_getBlockByNumber`, header only.
    fn block(&self, number: u64) -> impl Future<Output = Result<BlockRef, RpcError>> + Send;
    /// `eth_getLogs`, validated and sorted by (block number, log index).
    fn logs(&self, query: &LogQuery) -> impl Future<Output = Result<Vec<Log>, RpcError>> + Send;
}

/// [`ChainRpc`] over HTTP JSON-RPC with alloy.
#[derive(Debug, Clone)]
pub struct AlloyRpc {
    provider: RootProvider,
    timeout: Duration,
    url: String,
    redacted_url: String,
}

impl AlloyRpc {
    /// An adapter for `url`; no connection is made until the first call.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let parsed = url.parse().map_err(|e| format!("invalid RPC URL: {e}"))?;
        Ok(Self {
            provider: RootProvider::new_http(parsed),
            timeout,
            url: url.to_owned(),
            redacted_url: redact_url(url),
        })
    }

    /// The endpoint with credentials, path and query hidden, fit for logs.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    async fn call<T, E: std::fmt::Display>(
        &self,
        method: &'static str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, RpcError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(RpcError::Timeout { method, after: self.timeout }),
            Ok(Err(e)) => Err(RpcError::Transport { method, message: scrub(&e.to_string(), &self.url) }),
            Ok(Ok(v)) => Ok(v),
        }
    }
}

impl ChainRpc for AlloyRpc {
    async fn chain_id(&self) -> Result<ChainId, RpcError> {
        self.call("eth_chainId", self.provider.get_chain_id()).await
    }

    async fn tip(&self, tip: Tip) -> Result<Option<BlockRef>, RpcError> {
        const METHOD: &str = "eth_getBlockByNumber";
        let block = self.call(METHOD, self.provider.get_block_by_number(tip.tag()).into_future()).await?;
        Ok(block.map(|b| BlockRef::from_header(&b.header)))
    }

    async fn block(&self, number: u64) -> Result<BlockRef, RpcError> {
        const METHOD: &str = "eth_getBlockByNumber";
        let block = self
            .call(METHOD, self.provider.get_block_by_number(BlockNumberOrTag::Number(number)).into_future())
            .await?
            .ok_or_else(|| RpcError::BadAnswer {
                method: METHOD,
                message: format!("block {number} not found"),
            })?;
        if block.header.number != number {
            return Err(RpcError::BadAnswer {
                method: METHOD,
                message: format!("asked for block {number}, got {}", block.header.number),
            });
        }
        Ok(BlockRef::from_header(&block.header))
    }

    async fn logs(&self, query: &LogQuery) -> Result<Vec<Log>, RpcError> {
        const METHOD: &str = "eth_getLogs";
        let mut filter = Filter::new().from_block(query.from).to_block(query.to).address(query.address);
        for (i, topic) in query.topics.iter().enumerate() {
            if let Some(values) = topic {
                let values = values.clone();
                filter = match i {
                    0 => filter.event_signature(values),
                    1 => filter.topic1(values),
                    2 => filter.topic2(values),
                    _ => filter.topic3(values),
                };
            }
        }
        let mut logs = self.call(METHOD, self.provider.get_logs(&filter)).await?;
        validate_logs(query, &logs).map_err(|message| RpcError::BadAnswer { method: METHOD, message })?;
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        Ok(logs)
    }
}

/// New heads pushed by a WebSocket endpoint (`eth_subscribe("newHeads")`).
pub struct HeadSubscription {
    // Keeps the socket's background task alive as long as the stream is read.
    _provider: RootProvider,
    heads: BoxStream<'static, Header>,
}

impl HeadSubscription {
    /// Connects and subscribes; fails if either does not happen within `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, RpcError> {
        const METHOD: &str = "eth_subscribe";
        let failed = |message: String| RpcError::Transport { method: METHOD, message: scrub(&message, url) };
        let subscribe = async {
            let client = alloy::rpc::client::RpcClient::connect_pubsub(WsConnect::new(url))
                .await
                .map_err(|e| failed(e.to_string()))?;
            let provider = RootProvider::new(client);
            let subscription = provider.subscribe_blocks().await.map_err(|e| failed(e.to_string()))?;
            Ok(Self { heads: subscription.into_stream().boxed(), _provider: provider })
        };
        tokio::time::timeout(timeout, subscribe)
            .await
            .map_err(|_| RpcError::Timeout { method: METHOD, after: timeout })?
    }

    /// The next head; `None` once the socket is gone.
    pub async fn next(&mut self) -> Option<BlockRef> {
        self.heads.next().await.map(|h| BlockRef::from_header(&h))
    }
}

/// Rejects answers that cannot belong to `query`.
fn validate_logs(query: &LogQuery, logs: &[Log]) -> Result<(), String> {
    for log in logs {
        let (Some(number), Some(_), Some(_), Some(_)) =
            (log.block_number, log.block_hash, log.log_index, log.transaction_hash)
        else {
            return Err("log without block number, block hash, log index or transaction hash".into());
        };
        if number < query.from || number > query.to {
            return Err(format!("log in block {number} outside {}..={}", query.from, query.to));
        }
        if log.address() != query.address {
            return Err(format!("log from {} but asked for {}", log.address(), query.address));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::{LogData, address};

    fn log(number: Option<u64>, address: Address) -> Log {
        Log {
            inner: alloy_primitives::Log {
                address,
                data: LogData::new_unchecked(vec![], Default::default()),
            },
            block_hash: Some(B256::ZERO),
            block_number: number,
            block_timestamp: None,
            transaction_hash: Some(B256::ZERO),
            transaction_index: Some(0),
            log_index: Some(0),
            removed: false,
        }
    }

    #[test]
    fn validation_rejects_answers_that_cannot_be_right() {
        let a = address!("0x1111111111111111111111111111111111111111");
        let q = LogQuery { from: 10, to: 20, address: a, topics: Default::default() };
        assert!(validate_logs(&q, &[log(Some(10), a), log(Some(20), a)]).is_ok());
        assert!(validate_logs(&q, &[log(Some(21), a)]).unwrap_err().contains("outside"));
        assert!(validate_logs(&q, &[log(None, a)]).unwrap_err().contains("without"));
        assert!(validate_logs(&q, &[log(Some(15), Address::ZERO)]).unwrap_err().contains("asked for"));
    }
}
