//! The chain, as the worker sees it: a narrow trait over JSON-RPC and its HTTP adapter.
//!
//! [`HttpRpc`] speaks JSON-RPC over HTTP itself (reqwest, alloy's types) so that every failure
//! can be classified the way providers mean it: `429` with its `Retry-After`, 5xx and dropped
//! connections, JSON-RPC errors, and `eth_getLogs` refusals with the range the provider
//! suggests ([`crate::limits`]). Several endpoints of one chain are combined by
//! [`crate::endpoints::EndpointPool`].
//!
//! Nothing an endpoint answers is trusted blindly: logs without a block hash, number or log
//! index (pending logs), logs outside the requested range or from another contract, and
//! missing blocks are reported as [`RpcError::BadAnswer`] so the caller retries instead of
//! advancing past data it never saw. Every call has a timeout.

use std::future::Future;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use alloy::eips::BlockNumberOrTag;
use alloy::providers::{Provider, RootProvider, WsConnect};
use alloy::rpc::types::{Header, Log};
use alloy_primitives::{Address, B256, Bloom, BloomInput};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use herald_proto::settings::{redact_url, scrub};

use crate::limits::{RangeHint, range_hint};
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

/// One `eth_getLogs` question: logs of any of `addresses` in `from..=to` whose topics match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// First block, inclusive.
    pub from: u64,
    /// Last block, inclusive.
    pub to: u64,
    /// Emitting contracts (any of them).
    pub addresses: Vec<Address>,
    /// topic0..topic3; `None` matches anything, `Some(v)` any of `v`.
    pub topics: [Option<Vec<B256>>; 4],
    /// One block by its hash (EIP-234; `from` and `to` are its number): answered from that
    /// block's receipts, whichever branch it is on, rather than from a log index that may lag
    /// the endpoint's head.
    pub block_hash: Option<B256>,
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
    /// Connection failure, dropped connection or HTTP 5xx.
    #[error("rpc call {method} failed: {message}")]
    Transport {
        /// JSON-RPC method.
        method: &'static str,
        /// Error text, with any URL credentials stripped.
        message: String,
    },
    /// HTTP 429 or a JSON-RPC rate-limit error.
    #[error("rpc call {method} rate limited (retry after {retry_after:?})")]
    RateLimited {
        /// JSON-RPC method.
        method: &'static str,
        /// What the provider asked for (`Retry-After`), if anything.
        retry_after: Option<Duration>,
    },
    /// `eth_getLogs` refused the range (too many blocks, results, bytes or too slow).
    #[error("rpc call {method} refused the block range: {hint:?}")]
    RangeTooLarge {
        /// JSON-RPC method.
        method: &'static str,
        /// What the provider said about the range.
        hint: RangeHint,
    },
    /// A JSON-RPC error response about something else.
    #[error("rpc call {method} answered error {code}: {message}")]
    Rejected {
        /// JSON-RPC method.
        method: &'static str,
        /// JSON-RPC error code.
        code: i64,
        /// Its message.
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
    /// No endpoint of the chain may be called now (all down or cooling off).
    #[error("rpc call {method}: no endpoint available ({message})")]
    Unavailable {
        /// JSON-RPC method.
        method: &'static str,
        /// Why.
        message: String,
    },
}

impl RpcError {
    /// Two answers about the chain disagree (`what`): it is reorganising under the calls, or
    /// two sources are on different branches for a moment. A bad answer, retried.
    pub fn reorganising(method: &'static str, what: String) -> Self {
        Self::BadAnswer { method, message: format!("{what}: the chain is reorganising") }
    }

    /// Whether retrying the same call may succeed. Every RPC failure is treated as
    /// transient: a worker never gives up on a chain, it backs off (a refused range is asked
    /// again smaller).
    pub fn is_retryable(&self) -> bool {
        true
    }

    /// Whether the failure says the endpoint is unwell (down, overloaded, unreachable): the
    /// call fails over to another endpoint and this one is avoided for a while.
    pub fn is_endpoint_fault(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport { .. })
    }

    /// The JSON-RPC method that failed, for metrics.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Timeout { method, .. }
            | Self::Transport { method, .. }
            | Self::RateLimited { method, .. }
            | Self::RangeTooLarge { method, .. }
            | Self::Rejected { method, .. }
            | Self::BadAnswer { method, .. }
            | Self::Unavailable { method, .. } => method,
        }
    }

    /// A short outcome label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Transport { .. } => "transport",
            Self::RateLimited { .. } => "rate_limited",
            Self::RangeTooLarge { .. } => "range_too_large",
            Self::Rejected { .. } => "rejected",
            Self::BadAnswer { .. } => "bad_answer",
            Self::Unavailable { .. } => "unavailable",
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
    /// `eth_getBlockByNumber` of each of `numbers`, headers only, in that order. Adapters
    /// that can batch calls do; this default asks one by one.
    fn blocks(&self, numbers: &[u64]) -> impl Future<Output = Result<Vec<BlockRef>, RpcError>> + Send {
        async move {
            let mut blocks = Vec::with_capacity(numbers.len());
            for &number in numbers {
                blocks.push(self.block(number).await?);
            }
            Ok(blocks)
        }
    }
    /// `eth_getLogs`, validated and sorted by (block number, log index).
    fn logs(&self, query: &LogQuery) -> impl Future<Output = Result<Vec<Log>, RpcError>> + Send;
}

/// [`ChainRpc`] over one HTTP JSON-RPC endpoint.
#[derive(Debug)]
pub struct HttpRpc {
    http: reqwest::Client,
    timeout: Duration,
    url: String,
    redacted_url: String,
    next_id: AtomicU64,
    max_batch_size: usize,
}

/// Calls in one JSON-RPC batch unless configured otherwise (`max_batch_size`).
pub const DEFAULT_MAX_BATCH_SIZE: usize = 100;

/// One answer of a JSON-RPC batch.
#[derive(serde::Deserialize)]
struct BatchReply<T> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default = "Option::default")]
    result: Option<T>,
    #[serde(default)]
    error: Option<ReplyError>,
}

#[derive(serde::Deserialize)]
struct Reply<T> {
    #[serde(default = "Option::default")]
    result: Option<T>,
    #[serde(default)]
    error: Option<ReplyError>,
}

#[derive(serde::Deserialize)]
struct ReplyError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

impl HttpRpc {
    /// An adapter for `url`; no connection is made until the first call.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let parsed: reqwest::Url = url.parse().map_err(|e| format!("invalid RPC URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("must be an http:// or https:// URL".into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self {
            http,
            timeout,
            url: url.to_owned(),
            redacted_url: redact_url(url),
            next_id: AtomicU64::new(1),
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
        })
    }

    /// At most `calls` calls in one JSON-RPC batch (providers cap batches; 1 sends none).
    pub fn with_max_batch_size(mut self, calls: usize) -> Self {
        self.max_batch_size = calls.max(1);
        self
    }

    /// The endpoint with credentials, path and query hidden, fit for logs.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// Posts `body` (one call or a batch) and reads the answer's status and bytes; 429 and
    /// 5xx are classified here, other statuses are the caller's (the body may still hold a
    /// JSON-RPC error).
    async fn post(
        &self,
        method: &'static str,
        body: &serde_json::Value,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes), RpcError> {
        let transport = |e: reqwest::Error| RpcError::Transport {
            method,
            message: scrub(&e.without_url().to_string(), &self.url),
        };
        let response = self.http.post(&self.url).json(body).send().await.map_err(transport)?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(RpcError::RateLimited { method, retry_after });
        }
        if status.is_server_error() {
            return Err(RpcError::Transport { method, message: format!("HTTP {status}") });
        }
        let bytes = response.bytes().await.map_err(transport)?;
        Ok((status, bytes))
    }

    /// What an answer that is not the JSON expected means: a bad answer after HTTP success,
    /// else a refusal with the HTTP status.
    fn unreadable(method: &'static str, status: reqwest::StatusCode, error: serde_json::Error) -> RpcError {
        if status.is_success() {
            RpcError::BadAnswer { method, message: format!("unreadable answer: {error}") }
        } else {
            RpcError::Rejected { method, code: i64::from(status.as_u16()), message: format!("HTTP {status}") }
        }
    }

    /// One JSON-RPC call, its failure classified. `Ok(None)` is a `null` result.
    async fn request<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        params: serde_json::Value,
    ) -> Result<Option<T>, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let call = async {
            let (status, bytes) = self.post(method, &body).await?;
            let reply: Reply<T> =
                serde_json::from_slice(&bytes).map_err(|e| Self::unreadable(method, status, e))?;
            match reply.error {
                Some(error) => Err(classify(method, error)),
                None => Ok(reply.result),
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| RpcError::Timeout { method, after: self.timeout })?
    }

    /// `method` once per entry of `params`, as one JSON-RPC batch: the results in the order
    /// of `params`. Any error answer fails the whole batch, classified.
    async fn batch<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        params: Vec<serde_json::Value>,
    ) -> Result<Vec<Option<T>>, RpcError> {
        let first = self.next_id.fetch_add(params.len() as u64, Ordering::Relaxed);
        let body: Vec<serde_json::Value> = params
            .into_iter()
            .enumerate()
            .map(|(i, params)| {
                serde_json::json!({"jsonrpc": "2.0", "id": first + i as u64, "method": method, "params": params})
            })
            .collect();
        let count = body.len();
        let call = async {
            let (status, bytes) = self.post(method, &serde_json::Value::Array(body)).await?;
            batch_results(method, status, &bytes, first, count)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| RpcError::Timeout { method, after: self.timeout })?
    }

    fn block_param(tag: BlockNumberOrTag) -> serde_json::Value {
        serde_json::json!([tag.to_string(), false])
    }
}

/// The results of a batch of `count` calls with ids from `first`, in call order; any error
/// answer fails the whole batch, classified.
fn batch_results<T: serde::de::DeserializeOwned>(
    method: &'static str,
    status: reqwest::StatusCode,
    bytes: &[u8],
    first: u64,
    count: usize,
) -> Result<Vec<Option<T>>, RpcError> {
    // A provider refusing the batch as a whole answers one error object. (Only an object: serde
    // would read a two-answer array as that struct's fields, by position.)
    if bytes.trim_ascii_start().first() == Some(&b'{') {
        let reply: Reply<serde_json::Value> =
            serde_json::from_slice(bytes).map_err(|e| HttpRpc::unreadable(method, status, e))?;
        return Err(match reply.error {
            Some(error) => classify(method, error),
            None => RpcError::BadAnswer { method, message: "one answer to a batch".into() },
        });
    }
    let replies: Vec<BatchReply<T>> =
        serde_json::from_slice(bytes).map_err(|e| HttpRpc::unreadable(method, status, e))?;
    let mut results: Vec<Option<Option<T>>> = (0..count).map(|_| None).collect();
    for reply in replies {
        if let Some(error) = reply.error {
            return Err(classify(method, error));
        }
        let slot = reply
            .id
            .and_then(|id| id.checked_sub(first))
            .and_then(|i| results.get_mut(i as usize))
            .ok_or_else(|| RpcError::BadAnswer {
                method,
                message: format!("batch answer with an id not asked for: {:?}", reply.id),
            })?;
        *slot = Some(reply.result);
    }
    results
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| RpcError::BadAnswer {
                method,
                message: format!("batch of {count} calls answered only in part"),
            })
        })
        .collect()
}

/// A JSON-RPC error response, classified.
fn classify(method: &'static str, error: ReplyError) -> RpcError {
    let lower = error.message.to_ascii_lowercase();
    if error.code == 429 || lower.contains("rate limit") || lower.contains("too many requests") {
        return RpcError::RateLimited { method, retry_after: None };
    }
    if method == "eth_getLogs" {
        let data = error.data.as_ref().map(|d| d.to_string());
        if let Some(hint) = range_hint(&error.message, data.as_deref()) {
            return RpcError::RangeTooLarge { method, hint };
        }
    }
    RpcError::Rejected { method, code: error.code, message: error.message.chars().take(300).collect() }
}

impl ChainRpc for HttpRpc {
    async fn chain_id(&self) -> Result<ChainId, RpcError> {
        const METHOD: &str = "eth_chainId";
        let id: Option<alloy_primitives::U64> = self.request(METHOD, serde_json::json!([])).await?;
        id.map(|id| id.to::<u64>())
            .ok_or_else(|| RpcError::BadAnswer { method: METHOD, message: "null chain id".into() })
    }

    async fn tip(&self, tip: Tip) -> Result<Option<BlockRef>, RpcError> {
        const METHOD: &str = "eth_getBlockByNumber";
        let header: Option<Header> = self.request(METHOD, Self::block_param(tip.tag())).await?;
        Ok(header.map(|h| BlockRef::from_header(&h)))
    }

    async fn block(&self, number: u64) -> Result<BlockRef, RpcError> {
        const METHOD: &str = "eth_getBlockByNumber";
        let header: Header =
            self.request(METHOD, Self::block_param(BlockNumberOrTag::Number(number))).await?.ok_or_else(
                || RpcError::BadAnswer { method: METHOD, message: format!("block {number} not found") },
            )?;
        if header.number != number {
            return Err(RpcError::BadAnswer {
                method: METHOD,
                message: format!("asked for block {number}, got {}", header.number),
            });
        }
        Ok(BlockRef::from_header(&header))
    }

    async fn blocks(&self, numbers: &[u64]) -> Result<Vec<BlockRef>, RpcError> {
        const METHOD: &str = "eth_getBlockByNumber";
        let mut blocks = Vec::with_capacity(numbers.len());
        for chunk in numbers.chunks(self.max_batch_size) {
            let params =
                chunk.iter().map(|&n| Self::block_param(BlockNumberOrTag::Number(n))).collect::<Vec<_>>();
            let headers: Vec<Option<Header>> = self.batch(METHOD, params).await?;
            for (&number, header) in chunk.iter().zip(headers) {
                let header = header.ok_or_else(|| RpcError::BadAnswer {
                    method: METHOD,
                    message: format!("block {number} not found"),
                })?;
                if header.number != number {
                    return Err(RpcError::BadAnswer {
                        method: METHOD,
                        message: format!("asked for block {number}, got {}", header.number),
                    });
                }
                blocks.push(BlockRef::from_header(&header));
            }
        }
        Ok(blocks)
    }

    async fn logs(&self, query: &LogQuery) -> Result<Vec<Log>, RpcError> {
        const METHOD: &str = "eth_getLogs";
        let mut topics = query.topics.to_vec();
        while topics.last().is_some_and(Option::is_none) {
            topics.pop();
        }
        let filter = match query.block_hash {
            Some(hash) => serde_json::json!([{
                "blockHash": hash,
                "address": query.addresses,
                "topics": topics,
            }]),
            None => serde_json::json!([{
                "fromBlock": format!("{:#x}", query.from),
                "toBlock": format!("{:#x}", query.to),
                "address": query.addresses,
                "topics": topics,
            }]),
        };
        let wire: Vec<WireLog> = self.request(METHOD, filter).await?.unwrap_or_default();
        let mut logs: Vec<Log> = wire.into_iter().map(WireLog::into_log).collect();
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
/// An `eth_getLogs` entry as endpoints send it. alloy's `Log` reads the same JSON through
/// `serde(flatten)`, which buffers every field before reading it: that made parsing answers a
/// sixth of the worker's CPU in backfill.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireLog {
    address: Address,
    topics: Vec<B256>,
    data: alloy_primitives::Bytes,
    #[serde(default)]
    block_hash: Option<B256>,
    #[serde(default, deserialize_with = "quantity")]
    block_number: Option<u64>,
    #[serde(default, deserialize_with = "quantity")]
    block_timestamp: Option<u64>,
    #[serde(default)]
    transaction_hash: Option<B256>,
    #[serde(default, deserialize_with = "quantity")]
    transaction_index: Option<u64>,
    #[serde(default, deserialize_with = "quantity")]
    log_index: Option<u64>,
    #[serde(default)]
    removed: bool,
}

impl WireLog {
    fn into_log(self) -> Log {
        Log {
            inner: alloy_primitives::Log {
                address: self.address,
                data: alloy_primitives::LogData::new_unchecked(self.topics, self.data),
            },
            block_hash: self.block_hash,
            block_number: self.block_number,
            block_timestamp: self.block_timestamp,
            transaction_hash: self.transaction_hash,
            transaction_index: self.transaction_index,
            log_index: self.log_index,
            removed: self.removed,
        }
    }
}

/// A JSON-RPC quantity (`"0x1a"`), or null.
fn quantity<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    struct Quantity;
    impl<'de> serde::de::Visitor<'de> for Quantity {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a hex quantity such as \"0x1a\", or null")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
            Ok(Some(value))
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let digits = text
                .strip_prefix("0x")
                .ok_or_else(|| E::custom(format!("quantity {text:?} does not start with 0x")))?;
            u64::from_str_radix(digits, 16).map(Some).map_err(E::custom)
        }
    }
    deserializer.deserialize_option(Quantity)
}

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
        if query.block_hash.is_some_and(|hash| log.block_hash != Some(hash)) {
            return Err(format!("log from block {:?}, but asked for {:?}", log.block_hash, query.block_hash));
        }
        if !query.addresses.contains(&log.address()) {
            return Err(format!("log from {} but asked for {:?}", log.address(), query.addresses));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::{LogData, address};

    #[test]
    fn wire_logs_read_like_alloys() {
        let json = r#"[{"address":"0x5fbdb2315678afecb367f032d93f642f64180aa3",
            "topics":["0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"],
            "data":"0x0000000000000000000000000000000000000000000000000000000000000007",
            "blockHash":"0x1111111111111111111111111111111111111111111111111111111111111111",
            "blockNumber":"0x1a","blockTimestamp":"0x64","transactionHash":
            "0x2222222222222222222222222222222222222222222222222222222222222222",
            "transactionIndex":"0x0","logIndex":"0x3","removed":false},
            {"address":"0x5fbdb2315678afecb367f032d93f642f64180aa3","topics":[],"data":"0x",
            "blockHash":null,"blockNumber":null,"transactionHash":null,"transactionIndex":null,
            "logIndex":null}]"#;
        let wire: Vec<WireLog> = serde_json::from_str(json).unwrap();
        let ours: Vec<Log> = wire.into_iter().map(WireLog::into_log).collect();
        let alloys: Vec<Log> = serde_json::from_str(json).unwrap();
        assert_eq!(ours, alloys);
        assert_eq!(ours[0].block_number, Some(26));
        assert!(serde_json::from_str::<Vec<WireLog>>(r#"[{"address":"0x5fbdb2315678afecb367f032d93f642f64180aa3","topics":[],"data":"0x","blockNumber":"26"}]"#).is_err());
    }

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

    /// Batches of every size read back by id, in call order; an error answer, or one error for
    /// the whole batch, fails it. (A two-answer batch was once read as one error object.)
    #[test]
    fn batch_answers_read_by_id_whatever_their_size() {
        let ok = reqwest::StatusCode::OK;
        for count in 1..=4u64 {
            // Answered out of order, as a batch may be.
            let answers: Vec<String> = (0..count)
                .rev()
                .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{},"result":{}}}"#, 10 + i, i * 7))
                .collect();
            let body = format!("[{}]", answers.join(","));
            let read: Vec<Option<u64>> = batch_results("m", ok, body.as_bytes(), 10, count as usize).unwrap();
            assert_eq!(read, (0..count).map(|i| Some(i * 7)).collect::<Vec<_>>(), "{count} calls");
        }
        let one_failed = r#"[{"jsonrpc":"2.0","id":10,"result":1},{"jsonrpc":"2.0","id":11,"error":{"code":-32000,"message":"header not found"}}]"#;
        assert!(matches!(
            batch_results::<u64>("m", ok, one_failed.as_bytes(), 10, 2),
            Err(RpcError::Rejected { code: -32000, .. })
        ));
        let refused = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"batch too large"}}"#;
        assert!(matches!(
            batch_results::<u64>("m", ok, refused.as_bytes(), 10, 2),
            Err(RpcError::Rejected { code: -32600, .. })
        ));
        let partial = r#"[{"jsonrpc":"2.0","id":10,"result":1}]"#;
        assert!(matches!(
            batch_results::<u64>("m", ok, partial.as_bytes(), 10, 2),
            Err(RpcError::BadAnswer { .. })
        ));
    }

    #[test]
    fn validation_rejects_answers_that_cannot_be_right() {
        let a = address!("0x1111111111111111111111111111111111111111");
        let q =
            LogQuery { from: 10, to: 20, addresses: vec![a], topics: Default::default(), block_hash: None };
        assert!(validate_logs(&q, &[log(Some(10), a), log(Some(20), a)]).is_ok());
        assert!(validate_logs(&q, &[log(Some(21), a)]).unwrap_err().contains("outside"));
        assert!(validate_logs(&q, &[log(None, a)]).unwrap_err().contains("without"));
        assert!(validate_logs(&q, &[log(Some(15), Address::ZERO)]).unwrap_err().contains("asked for"));
    }
}
