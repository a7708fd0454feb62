//! A chain's endpoints as one [`ChainRpc`]: failover, recovery, rate limits, no retry storms.
//!
//! Endpoints are tried in configuration order, so the first one is preferred and taken back
//! as soon as it recovers (fail-back). An endpoint that times out, drops the connection or
//! answers 5xx is *down*: it is skipped, with exponentially growing pauses between single
//! probes, and the call moves on to the next one (a failover). One that answers 429 *cools
//! off* for its `Retry-After` (or a second). When every endpoint is down or cooling, calls fail
//! at once with [`RpcError::Unavailable`] instead of hammering them; the callers back off.
//! Each endpoint may have a request rate (`requests_per_second`, a `governor` quota) that
//! calls wait for. State changes are logged once (down, recovered), never per attempt.
//!
//! An endpoint must report the configured chain id before it is used; one that reports
//! another is disabled for good, with an error naming it.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use alloy::rpc::types::Log;
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_proto::ChainId;
use tokio::time::Instant;

use crate::chain::{BlockRef, ChainRpc, HttpRpc, LogQuery, RpcError, Tip};
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// How long a 429 without `Retry-After` keeps an endpoint cooling.
const DEFAULT_COOL_OFF: Duration = Duration::from_secs(1);
/// Longest `Retry-After` honoured as given.
const MAX_COOL_OFF: Duration = Duration::from_secs(60);
/// A call waits at most this long for a cooling endpoint before reporting unavailability.
const MAX_WAIT_FOR_COOLING: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Health {
    /// Not to be called before this instant (down or cooling off).
    avoid_until: Option<Instant>,
    /// Down (not merely cooling off) since the last success.
    down: bool,
    backoff: Backoff,
}

struct Endpoint<R> {
    rpc: R,
    label: String,
    name: String,
    limiter: Option<DefaultDirectRateLimiter>,
    health: Mutex<Health>,
    verified: AtomicBool,
    wrong_chain: AtomicBool,
}

/// One chain's endpoints; see the module docs.
pub struct EndpointPool<R = HttpRpc> {
    chain_id: ChainId,
    endpoints: Vec<Endpoint<R>>,
    metrics: Metrics,
}

/// An endpoint's adapter and how to name it in logs.
pub struct EndpointConfig<R> {
    /// The adapter.
    pub rpc: R,
    /// Its URL, redacted.
    pub name: String,
}

impl<R: ChainRpc> EndpointPool<R> {
    /// A pool over `endpoints`, in order of preference, each limited to
    /// `requests_per_second` when given.
    pub fn new(
        chain_id: ChainId,
        endpoints: Vec<EndpointConfig<R>>,
        requests_per_second: Option<NonZeroU32>,
        metrics: Metrics,
    ) -> Self {
        let endpoints = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| Endpoint {
                rpc: e.rpc,
                label: i.to_string(),
                name: e.name,
                limiter: requests_per_second.map(|rps| RateLimiter::direct(Quota::per_second(rps))),
                health: Mutex::new(Health {
                    avoid_until: None,
                    down: false,
                    backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
                }),
                verified: AtomicBool::new(false),
                wrong_chain: AtomicBool::new(false),
            })
            .collect();
        Self { chain_id, endpoints, metrics }
    }

    /// Checks that the endpoints serve the configured chain: `Err` with a message naming the
    /// offending endpoint(s) when none does; unreachable ones are checked on first use.
    pub async fn verify_chain(&self) -> Result<Result<(), String>, RpcError> {
        let mut last_error = None;
        for endpoint in &self.endpoints {
            match self.ensure_verified(endpoint).await {
                Ok(true) => return Ok(Ok(())),
                Ok(false) => {}
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(Err(format!(
                "every endpoint of chain {} reports another chain id: {}",
                self.chain_id,
                self.endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// `Ok(true)` if `endpoint` serves the configured chain.
    async fn ensure_verified(&self, endpoint: &Endpoint<R>) -> Result<bool, RpcError> {
        if endpoint.wrong_chain.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if endpoint.verified.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let reported = endpoint.rpc.chain_id().await?;
        if reported != self.chain_id {
            endpoint.wrong_chain.store(true, Ordering::Relaxed);
            tracing::error!(
                endpoint = %endpoint.name,
                configured = self.chain_id,
                reported,
                "endpoint serves another chain; it is not used"
            );
            return Ok(false);
        }
        endpoint.verified.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Runs `call` on the preferred available endpoint, failing over on endpoint faults.
    async fn call<T, F>(&self, method: &'static str, call: F) -> Result<T, RpcError>
    where
        F: for<'a> Fn(&'a R) -> BoxFuture<'a, Result<T, RpcError>>,
    {
        self.call_indexed(method, 1, call).await.map(|(value, _)| value)
    }

    /// [`Self::call`], also returning the index of the endpoint that answered. The call
    /// counts as `weight` requests against an endpoint's rate (a batch counts its calls).
    async fn call_indexed<T, F>(
        &self,
        method: &'static str,
        weight: usize,
        call: F,
    ) -> Result<(T, usize), RpcError>
    where
        F: for<'a> Fn(&'a R) -> BoxFuture<'a, Result<T, RpcError>>,
    {
        let chain = self.chain_id.to_string();
        let mut last_error: Option<RpcError> = None;
        let mut tried_any = false;
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            if endpoint.wrong_chain.load(Ordering::Relaxed) || !self.claim(endpoint).await {
                continue;
            }
            if tried_any {
                self.metrics.rpc_failovers.with_label_values(&[&chain]).inc();
            }
            tried_any = true;
            if let Some(limiter) = &endpoint.limiter {
                for _ in 0..weight.max(1) {
                    if limiter.check().is_err() {
                        self.metrics.rpc_rate_limit_waits.with_label_values(&[&chain, &endpoint.label]).inc();
                        limiter.until_ready().await;
                    }
                }
            }
            let result = match self.ensure_verified(endpoint).await {
                Ok(true) => call(&endpoint.rpc).await,
                Ok(false) => continue,
                Err(e) => Err(e),
            };
            match result {
                Ok(value) => {
                    self.succeeded(endpoint);
                    return Ok((value, index));
                }
                Err(e) => {
                    self.failed(endpoint, &e);
                    let next =
                        self.endpoints[index + 1..].iter().any(|e| !e.wrong_chain.load(Ordering::Relaxed));
                    if matches!(e, RpcError::RangeTooLarge { .. }) || !next {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| RpcError::Unavailable {
            method,
            message: "every endpoint is down or cooling off".into(),
        }))
    }

    /// Whether `endpoint` may be called now; a due probe of a down endpoint is claimed (the
    /// next probe is pushed back), so concurrent calls do not all probe at once. Waits for a
    /// cooling endpoint only briefly.
    async fn claim(&self, endpoint: &Endpoint<R>) -> bool {
        let wait = {
            let mut health = endpoint.health.lock().expect("health lock");
            let now = Instant::now();
            match health.avoid_until {
                None => return true,
                Some(until) if until <= now => {
                    if health.down {
                        health.avoid_until = Some(now + health.backoff.next_delay());
                    } else {
                        health.avoid_until = None;
                    }
                    return true;
                }
                Some(_) if health.down => return false,
                Some(until) => until - now,
            }
        };
        if wait > MAX_WAIT_FOR_COOLING {
            return false;
        }
        tokio::time::sleep(wait).await;
        true
    }

    fn succeeded(&self, endpoint: &Endpoint<R>) {
        let mut health = endpoint.health.lock().expect("health lock");
        if health.down {
            tracing::info!(endpoint = %endpoint.name, "endpoint recovered");
        }
        health.down = false;
        health.avoid_until = None;
        health.backoff.reset();
        self.metrics.rpc_endpoint_up.with_label_values(&[&self.chain_id.to_string(), &endpoint.label]).set(1);
    }

    fn failed(&self, endpoint: &Endpoint<R>, error: &RpcError) {
        let mut health = endpoint.health.lock().expect("health lock");
        let now = Instant::now();
        match error {
            RpcError::RateLimited { retry_after, .. } => {
                let pause = retry_after.unwrap_or(DEFAULT_COOL_OFF).min(MAX_COOL_OFF);
                health.avoid_until = Some(now + pause);
                tracing::debug!(endpoint = %endpoint.name, ?pause, "endpoint rate limited; cooling off");
            }
            e if e.is_endpoint_fault() => {
                if !health.down {
                    tracing::warn!(endpoint = %endpoint.name, error = %e, "endpoint down; failing over");
                    self.metrics
                        .rpc_endpoint_up
                        .with_label_values(&[&self.chain_id.to_string(), &endpoint.label])
                        .set(0);
                }
                health.down = true;
                health.avoid_until = Some(now + health.backoff.next_delay());
            }
            _ => {}
        }
    }
}

impl<R: ChainRpc> ChainRpc for EndpointPool<R> {
    async fn chain_id(&self) -> Result<ChainId, RpcError> {
        Ok(self.chain_id)
    }

    async fn tip(&self, tip: Tip) -> Result<Option<BlockRef>, RpcError> {
        let (block, endpoint) =
            self.call_indexed("eth_getBlockByNumber", 1, |rpc| Box::pin(rpc.tip(tip))).await?;
        if let (Tip::Latest, Some(head)) = (tip, &block) {
            self.metrics.observe_endpoint_head(self.chain_id, endpoint, head.number);
        }
        Ok(block)
    }

    async fn block(&self, number: u64) -> Result<BlockRef, RpcError> {
        self.call("eth_getBlockByNumber", |rpc| Box::pin(rpc.block(number))).await
    }

    async fn blocks(&self, numbers: &[u64]) -> Result<Vec<BlockRef>, RpcError> {
        self.call_indexed("eth_getBlockByNumber", numbers.len(), |rpc| {
            let numbers = numbers.to_vec();
            Box::pin(async move { rpc.blocks(&numbers).await })
        })
        .await
        .map(|(blocks, _)| blocks)
    }

    async fn logs(&self, query: &LogQuery) -> Result<Vec<Log>, RpcError> {
        self.call("eth_getLogs", |rpc| {
            let query = query.clone();
            Box::pin(async move { rpc.logs(&query).await })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Flaky {
        chain: ChainId,
        down: AtomicBool,
        calls: AtomicUsize,
    }

    impl Flaky {
        fn new(chain: ChainId) -> Self {
            Self { chain, down: AtomicBool::new(false), calls: AtomicUsize::new(0) }
        }
    }

    impl ChainRpc for Flaky {
        async fn chain_id(&self) -> Result<ChainId, RpcError> {
            Ok(self.chain)
        }
        async fn tip(&self, _tip: Tip) -> Result<Option<BlockRef>, RpcError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(RpcError::Transport {
                    method: "eth_getBlockByNumber",
                    message: "refused".into(),
                });
            }
            Ok(Some(BlockRef {
                number: 1,
                hash: Default::default(),
                parent_hash: Default::default(),
                logs_bloom: Default::default(),
            }))
        }
        async fn block(&self, _number: u64) -> Result<BlockRef, RpcError> {
            unreachable!()
        }
        async fn logs(&self, _query: &LogQuery) -> Result<Vec<Log>, RpcError> {
            Err(RpcError::RangeTooLarge { method: "eth_getLogs", hint: crate::limits::RangeHint::TooLarge })
        }
    }

    fn pool(endpoints: Vec<Flaky>) -> EndpointPool<Flaky> {
        let endpoints = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, rpc)| EndpointConfig { rpc, name: format!("e{i}") })
            .collect();
        EndpointPool::new(1, endpoints, None, Metrics::new())
    }

    #[tokio::test(start_paused = true)]
    async fn fails_over_probes_sparingly_and_fails_back() {
        let pool = pool(vec![Flaky::new(1), Flaky::new(1)]);
        pool.endpoints[0].rpc.down.store(true, Ordering::SeqCst);
        for _ in 0..20 {
            assert!(pool.tip(Tip::Latest).await.is_ok(), "the second endpoint answers");
        }
        let primary_calls = pool.endpoints[0].rpc.calls.load(Ordering::SeqCst);
        assert!(primary_calls <= 2, "a down endpoint is not hammered: {primary_calls} calls");
        pool.endpoints[0].rpc.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(31)).await;
        pool.tip(Tip::Latest).await.unwrap();
        let before = pool.endpoints[1].rpc.calls.load(Ordering::SeqCst);
        pool.tip(Tip::Latest).await.unwrap();
        assert_eq!(pool.endpoints[1].rpc.calls.load(Ordering::SeqCst), before, "back on the primary");
    }

    #[tokio::test(start_paused = true)]
    async fn all_down_fails_fast_without_calls() {
        let pool = pool(vec![Flaky::new(1)]);
        pool.endpoints[0].rpc.down.store(true, Ordering::SeqCst);
        assert!(pool.tip(Tip::Latest).await.is_err());
        for _ in 0..10 {
            assert!(matches!(pool.tip(Tip::Latest).await, Err(RpcError::Unavailable { .. })));
        }
        assert_eq!(pool.endpoints[0].rpc.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_range_refusal_is_the_callers_business_not_a_failover() {
        let pool = pool(vec![Flaky::new(1), Flaky::new(1)]);
        let q = LogQuery { from: 1, to: 2, addresses: vec![], topics: Default::default(), block_hash: None };
        assert!(matches!(pool.logs(&q).await, Err(RpcError::RangeTooLarge { .. })));
        assert!(pool.tip(Tip::Latest).await.is_ok());
        assert_eq!(pool.endpoints[1].rpc.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_endpoint_of_another_chain_is_never_used() {
        let mixed = pool(vec![Flaky::new(5), Flaky::new(1)]);
        assert_eq!(mixed.verify_chain().await.unwrap(), Ok(()));
        mixed.tip(Tip::Latest).await.unwrap();
        assert_eq!(mixed.endpoints[0].rpc.calls.load(Ordering::SeqCst), 0);
        let wrong = pool(vec![Flaky::new(5)]);
        assert!(wrong.verify_chain().await.unwrap().unwrap_err().contains("another chain id"));
    }
}
