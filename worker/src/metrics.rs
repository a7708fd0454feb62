//! Every metric the worker exports, declared in one place. Prefix `herald_`.
//!
//! Labels are bounded: `chain_id` and `subscription_id` (bounded by the configured chains and
//! registered subscriptions), a JSON-RPC `method` from a fixed set, an `outcome` class, an
//! RPC `endpoint` *index* (never a URL: URLs carry API keys) and a subscription `state` from
//! [`SUBSCRIPTION_STATES`]. Never block numbers or hashes. Every series whose label values are
//! known in advance (per configured chain and endpoint, per started subscription) is created
//! at 0, so `rate()` has something to work with before the first event.
//!
//! Call sites stay one-liners: the helpers below ([`Metrics::observe_head`],
//! [`Metrics::observe_cursor`], [`Metrics::observe_rpc`], [`Metrics::publish_timer`],
//! [`Metrics::subscription_series`], ...) do the bookkeeping.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use self::subscriptions::SubscriptionMetrics;
pub use self::subscriptions::{Count, SubscriptionSeries};
use crate::chain::RpcError;

mod subscriptions;

/// Values of the `state` label of `herald_subscription_state`.
pub const SUBSCRIPTION_STATES: [&str; 3] = ["starting", "backfilling", "live"];

/// The JSON-RPC methods the worker calls (the `method` label).
pub const RPC_METHODS: [&str; 2] = ["eth_getBlockByNumber", "eth_getLogs"];

/// Values of the `outcome` label of `herald_rpc_requests_total`.
pub const RPC_OUTCOMES: [&str; 8] = [
    "ok",
    "timeout",
    "transport",
    "rate_limited",
    "range_too_large",
    "rejected",
    "bad_answer",
    "unavailable",
];

/// Buckets for network round trips (RPC, JetStream acks, etcd keepalives), in seconds.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The worker's metrics and the registry that serves them: a handle, one pointer wide (every
/// subscription task and range reader holds one).
#[derive(Clone)]
pub struct Metrics(Arc<Registered>);

impl std::ops::Deref for Metrics {
    type Target = Registered;

    fn deref(&self) -> &Registered {
        &self.0
    }
}

/// What [`Metrics`] holds.
pub struct Registered {
    registry: Registry,
    /// Latest head seen, per chain.
    pub head_block: IntGaugeVec,
    /// RPC calls by method and outcome.
    pub rpc_requests: IntCounterVec,
    /// RPC call latency by method.
    pub rpc_duration: HistogramVec,
    /// `eth_getLogs` ranges split in smaller ones after an endpoint refused them.
    pub rpc_range_splits: IntCounterVec,
    /// Switches from one RPC endpoint of a chain to another.
    pub rpc_failovers: IntCounterVec,
    /// Waits imposed by an endpoint's rate limit.
    pub rpc_rate_limit_waits: IntCounterVec,
    /// Latest head reported by each endpoint of a chain.
    pub rpc_endpoint_head: IntGaugeVec,
    /// Time from publish to JetStream's acknowledgement.
    pub publish_duration: HistogramVec,
    /// Publishes JetStream acknowledged (stored or duplicate).
    pub publish_acks: IntCounterVec,
    /// Publishes waiting for their acknowledgement.
    pub publishes_in_flight: IntGauge,
    /// Cursor writes refused because the assignment changed (this worker was fenced).
    pub fenced: IntCounter,
    /// Subscriptions this worker currently runs.
    pub assigned_subscriptions: IntGauge,
    /// Publishes or cursor writes refused because the local lease deadline had passed.
    pub self_fenced: IntCounter,
    /// Reorgs the head tracker saw, per chain.
    pub chain_reorgs: IntCounterVec,
    /// Whether new heads arrive over a WebSocket (1) or by polling (0), per chain.
    pub heads_websocket: IntGaugeVec,
    /// `eth_getLogs` answers asked again because a block's bloom says they miss logs.
    pub incomplete_log_answers: IntCounterVec,
    /// Headers read to vouch for blocks an `eth_getLogs` answer left without logs, outside
    /// the head window.
    pub history_headers_read: IntCounterVec,
    /// Whether an endpoint is up (1) or down (0), by configuration index.
    pub rpc_endpoint_up: IntGaugeVec,
    /// Lease keepalive round trips.
    pub lease_keepalive_duration: Histogram,
    /// Lease keepalives that failed (the lease is then lost and registered again).
    pub lease_keepalive_failures: IntCounter,
    /// Worker registrations (a new lease), the first one included.
    pub registrations: IntCounter,
    /// The running subscriptions' series (see [`subscriptions`]).
    subscriptions: Arc<SubscriptionMetrics>,
}

impl Metrics {
    /// Creates and registers every metric, without constant labels (tests).
    pub fn new() -> Self {
        Self::with_registry(Registry::new(), None)
    }

    /// Creates and registers every metric, each series labelled `worker_id`.
    pub fn for_worker(worker_id: &str) -> Self {
        let labels = HashMap::from([("worker_id".to_owned(), worker_id.to_owned())]);
        Self::with_registry(
            Registry::new_custom(None, Some(labels)).expect("valid constant labels"),
            Some(worker_id),
        )
    }

    fn with_registry(registry: Registry, worker_id: Option<&str>) -> Self {
        let subscriptions = Arc::new(SubscriptionMetrics::new(worker_id));
        fn register<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        let r = &registry;
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            register(r, HistogramVec::new(opts, labels).expect("valid metric"))
        };
        let counter =
            |name: &str, help: &str| register(r, IntCounter::new(name, help).expect("valid metric"));
        Self(Arc::new(Registered {
            head_block: gauge_vec("herald_chain_head_block", "Latest head seen.", &["chain_id"]),
            rpc_requests: counter_vec(
                "herald_rpc_requests_total",
                "JSON-RPC calls by method and outcome (ok, or the error class: timeout, transport, rate_limited, ...).",
                &["chain_id", "method", "outcome"],
            ),
            chain_reorgs: counter_vec(
                "herald_chain_reorgs_total",
                "Reorgs seen by the head tracker (blocks of its window replaced).",
                &["chain_id"],
            ),
            heads_websocket: gauge_vec(
                "herald_chain_heads_websocket",
                "1 while new heads arrive over a WebSocket subscription, 0 while polled.",
                &["chain_id"],
            ),
            incomplete_log_answers: counter_vec(
                "herald_rpc_incomplete_log_answers_total",
                "eth_getLogs answers asked again because a block's logsBloom says logs are missing.",
                &["chain_id"],
            ),
            history_headers_read: counter_vec(
                "herald_rpc_history_headers_read_total",
                "Headers read to check, by their logsBloom, blocks that an eth_getLogs answer left without logs.",
                &["chain_id"],
            ),
            rpc_endpoint_up: gauge_vec(
                "herald_rpc_endpoint_up",
                "1 while an endpoint answers, 0 while it is down (endpoint = index in rpc_urls).",
                &["chain_id", "endpoint"],
            ),
            rpc_duration: histogram_vec(
                "herald_rpc_request_duration_seconds",
                "JSON-RPC call latency, failures included.",
                &["chain_id", "method"],
            ),
            rpc_range_splits: counter_vec(
                "herald_rpc_range_splits_total",
                "eth_getLogs ranges refused by a provider (too many blocks, results or too slow) and asked again smaller.",
                &["chain_id"],
            ),
            rpc_failovers: counter_vec(
                "herald_rpc_failovers_total",
                "Calls that moved on to the next endpoint of the chain.",
                &["chain_id"],
            ),
            rpc_rate_limit_waits: counter_vec(
                "herald_rpc_rate_limit_waits_total",
                "Calls that waited for an endpoint's requests_per_second quota (endpoint = index in rpc_urls).",
                &["chain_id", "endpoint"],
            ),
            rpc_endpoint_head: gauge_vec(
                "herald_rpc_endpoint_head_block",
                "Latest head reported by each RPC endpoint (endpoint = index in the chain's rpc_urls).",
                &["chain_id", "endpoint"],
            ),
            publish_duration: histogram_vec(
                "herald_jetstream_publish_duration_seconds",
                "Time from publishing a message or an atomic batch to JetStream's acknowledgement (or failure).",
                &["chain_id"],
            ),
            publish_acks: counter_vec(
                "herald_jetstream_acks_total",
                "Messages JetStream acknowledged (alone or in an atomic batch), stored or duplicate.",
                &["chain_id"],
            ),
            publishes_in_flight: register(
                r,
                IntGauge::new(
                    "herald_jetstream_publishes_in_flight",
                    "Messages sent to JetStream (alone or in an atomic batch) and not yet acknowledged.",
                )
                .expect("valid metric"),
            ),
            fenced: counter(
                "herald_worker_fenced_total",
                "Cursor writes refused because the subscription's assignment changed.",
            ),
            assigned_subscriptions: register(
                r,
                IntGauge::new(
                    "herald_worker_assigned_subscriptions",
                    "Subscriptions this worker currently runs.",
                )
                .expect("valid metric"),
            ),
            self_fenced: counter(
                "herald_worker_self_fenced_total",
                "Publishes or cursor writes refused because the local lease deadline had passed.",
            ),
            lease_keepalive_duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "herald_worker_lease_keepalive_duration_seconds",
                        "Round trip of one etcd lease keepalive.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            ),
            lease_keepalive_failures: counter(
                "herald_worker_lease_keepalive_failures_total",
                "Lease keepalives that failed or found the lease gone; the worker registers again.",
            ),
            registrations: counter(
                "herald_worker_registrations_total",
                "Worker registrations with a new etcd lease, the first one included.",
            ),
            subscriptions,
            registry,
        }))
    }

    /// Creates the per-chain and per-endpoint series at 0 for a configured chain.
    pub fn init_chain(&self, chain_id: u64, endpoints: usize) {
        let chain = chain_id.to_string();
        self.head_block.with_label_values(&[&chain]);
        self.rpc_range_splits.with_label_values(&[&chain]);
        self.chain_reorgs.with_label_values(&[&chain]);
        self.incomplete_log_answers.with_label_values(&[&chain]);
        self.history_headers_read.with_label_values(&[&chain]);
        self.rpc_failovers.with_label_values(&[&chain]);
        self.publish_duration.with_label_values(&[&chain]);
        self.publish_acks.with_label_values(&[&chain]);
        for method in RPC_METHODS {
            self.rpc_duration.with_label_values(&[&chain, method]);
            for outcome in RPC_OUTCOMES {
                self.rpc_requests.with_label_values(&[&chain, method, outcome]);
            }
        }
        for endpoint in 0..endpoints {
            let endpoint = endpoint.to_string();
            self.rpc_rate_limit_waits.with_label_values(&[&chain, &endpoint]);
            self.rpc_endpoint_head.with_label_values(&[&chain, &endpoint]);
        }
    }

    /// Starts a running subscription's series (counters at 0, state `starting`); they go
    /// when the returned handle is dropped, with the task.
    pub fn subscription(&self, chain_id: u64, id: &herald_proto::SubscriptionId) -> SubscriptionSeries {
        self.subscriptions.start(chain_id, id)
    }

    /// Counts one RPC call of `method` on `chain` that took `elapsed`, by outcome.
    pub fn observe_rpc<T>(&self, chain: &str, method: &str, elapsed: Duration, result: &Result<T, RpcError>) {
        self.count_rpc(chain, method, result);
        self.rpc_duration.with_label_values(&[chain, method]).observe(elapsed.as_secs_f64());
    }

    /// Counts one RPC call of `method` on `chain` by outcome (`ok` or the error's class).
    pub fn count_rpc<T>(&self, chain: &str, method: &str, result: &Result<T, RpcError>) {
        let outcome = result.as_ref().err().map_or("ok", RpcError::outcome);
        self.rpc_requests.with_label_values(&[chain, method, outcome]).inc();
    }

    /// Counts a switch from one endpoint of `chain` to another (for the endpoint pool).
    pub fn rpc_failover(&self, chain: u64) {
        self.rpc_failovers.with_label_values(&[&chain.to_string()]).inc();
    }

    /// Counts a wait imposed by the rate limit of endpoint `endpoint` (its index in the chain's
    /// `rpc_urls`) of `chain`.
    pub fn rpc_rate_limited(&self, chain: u64, endpoint: usize) {
        self.rpc_rate_limit_waits.with_label_values(&[&chain.to_string(), &endpoint.to_string()]).inc();
    }

    /// Counts an `eth_getLogs` range of `chain` split after an endpoint refused it.
    pub fn rpc_range_split(&self, chain: u64) {
        self.rpc_range_splits.with_label_values(&[&chain.to_string()]).inc();
    }

    /// Records the head endpoint `endpoint` (its index in the chain's `rpc_urls`) of `chain`
    /// reported.
    pub fn observe_endpoint_head(&self, chain: u64, endpoint: usize, head: u64) {
        self.rpc_endpoint_head
            .with_label_values(&[&chain.to_string(), &endpoint.to_string()])
            .set(head as i64);
    }

    /// Starts timing one publish (a message or an atomic batch of `messages`) on `chain`:
    /// counts its messages in flight until the guard is dropped, then records its latency.
    pub fn publish_timer(&self, chain: &str, messages: usize) -> PublishTimer {
        let messages = i64::try_from(messages).unwrap_or(i64::MAX);
        self.publishes_in_flight.add(messages);
        PublishTimer {
            in_flight: self.publishes_in_flight.clone(),
            messages,
            duration: self.publish_duration.with_label_values(&[chain]),
            started: Instant::now(),
        }
    }

    /// Counts an atomic batch of `messages` of `series` JetStream stored on `chain`.
    pub fn observe_batch_ack(&self, chain: &str, series: &SubscriptionSeries, messages: usize) {
        self.publish_acks.with_label_values(&[chain]).inc_by(messages as u64);
        series.count_by(Count::Published, messages as u64);
    }

    /// Counts a publish of `series` JetStream acknowledged on `chain`; `duplicate` when it
    /// already had the message.
    pub fn observe_ack(&self, chain: &str, series: &SubscriptionSeries, duplicate: bool) {
        self.publish_acks.with_label_values(&[chain]).inc();
        series.count(if duplicate { Count::Duplicates } else { Count::Published });
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.exposition().collect()
    }

    /// Prometheus text exposition of every metric, in chunks: the registry's series, then
    /// the running subscriptions' a few hundred subscriptions at a time (see
    /// [`subscriptions`]).
    pub fn exposition(&self) -> impl Iterator<Item = String> + Send + 'static {
        let registered = TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default();
        std::iter::once(registered).chain(self.subscriptions.clone().exposition())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Times one publish (see [`Metrics::publish_timer`]).
pub struct PublishTimer {
    in_flight: IntGauge,
    messages: i64,
    duration: Histogram,
    started: Instant,
}

impl Drop for PublishTimer {
    fn drop(&mut self) {
        self.in_flight.sub(self.messages);
        self.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub_a() -> herald_proto::SubscriptionId {
        herald_proto::SubscriptionId::new("sub-a").unwrap()
    }

    /// The value of the series `name{labels}` in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn known_series_exist_before_anything_happens() {
        let m = Metrics::for_worker("w1");
        m.init_chain(31337, 2);
        let _series = m.subscription(31337, &sub_a());
        let text = m.render();
        for needle in [
            r#"herald_retractions_total{chain_id="31337",subscription_id="sub-a",worker_id="w1"} 0"#,
            r#"herald_decode_failures_total{chain_id="31337",subscription_id="sub-a",worker_id="w1"} 0"#,
            r#"herald_rpc_rate_limit_waits_total{chain_id="31337",endpoint="1",worker_id="w1"} 0"#,
            r#"herald_rpc_requests_total{chain_id="31337",method="eth_getLogs",outcome="timeout",worker_id="w1"} 0"#,
            r#"herald_subscription_state{chain_id="31337",state="starting",subscription_id="sub-a",worker_id="w1"} 1"#,
            "herald_jetstream_publish_duration_seconds_bucket",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        for line in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(line.split_whitespace().count() > 3, "metric without help: {line}");
        }
    }

    #[test]
    fn state_and_lag_follow_progress_and_go_with_the_task() {
        let m = Metrics::new();
        let series = m.subscription(31337, &sub_a());
        series.observe_head(100, 10, 2);
        let state = |text: &str, s: &str| {
            value(
                text,
                &format!(
                    r#"herald_subscription_state{{chain_id="31337",state="{s}",subscription_id="sub-a"}}"#
                ),
            )
        };
        let text = m.render();
        assert_eq!(
            (state(&text, "backfilling"), state(&text, "live"), state(&text, "starting")),
            (Some(1.0), Some(0.0), Some(0.0))
        );
        let lag = |text: &str, name: &str| {
            value(text, &format!(r#"{name}{{chain_id="31337",subscription_id="sub-a"}}"#))
        };
        assert_eq!(lag(&text, "herald_subscription_lag_blocks"), Some(91.0));
        series.observe_cursor(100, 98, 98);
        series.count_by(Count::Retractions, 2);
        let text = m.render();
        assert_eq!((state(&text, "backfilling"), state(&text, "live")), (Some(0.0), Some(1.0)));
        assert_eq!(lag(&text, "herald_subscription_lag_seconds"), Some(0.0));
        assert_eq!(lag(&text, "herald_subscription_cursor_block"), Some(98.0));
        assert_eq!(lag(&text, "herald_retractions_total"), Some(2.0));
        // A successor's series (a restarted task) outlive the predecessor's handle.
        let successor = m.subscription(31337, &sub_a());
        drop(series);
        assert_eq!(lag(&m.render(), "herald_retractions_total"), Some(0.0));
        drop(successor);
        let text = m.render();
        assert!(!text.contains("herald_subscription_state"), "{text}");
        assert!(!text.contains("herald_retractions_total"), "{text}");
    }

    #[test]
    fn thousands_of_subscriptions_are_written_out_in_chunks_each_family_once() {
        let m = Metrics::for_worker("w1");
        let ids: Vec<_> =
            (0..1500).map(|n| herald_proto::SubscriptionId::new(format!("s-{n:04}")).unwrap()).collect();
        let series: Vec<_> = ids.iter().map(|id| m.subscription(1, id)).collect();
        series[1499].count(Count::Published);
        let chunks: Vec<String> = m.exposition().collect();
        assert!(chunks.len() > 11 * 2, "{} chunks", chunks.len());
        let text = chunks.concat();
        for name in
            ["herald_events_published_total", "herald_subscription_state", "herald_subscription_lag_seconds"]
        {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("herald_subscription_state{")).count(), 1500 * 3);
        assert_eq!(
            value(
                &text,
                r#"herald_events_published_total{chain_id="1",subscription_id="s-1499",worker_id="w1"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn publish_timer_tracks_in_flight_and_rpc_outcomes_are_classified() {
        let m = Metrics::new();
        let timer = m.publish_timer("1", 3);
        assert_eq!(m.publishes_in_flight.get(), 3);
        drop(timer);
        assert_eq!(m.publishes_in_flight.get(), 0);
        assert_eq!(m.publish_duration.with_label_values(&["1"]).get_sample_count(), 1);
        let err: Result<(), RpcError> =
            Err(RpcError::Timeout { method: "eth_getLogs", after: Duration::from_secs(1) });
        m.observe_rpc("1", "eth_getLogs", Duration::from_millis(3), &err);
        assert_eq!(m.rpc_requests.with_label_values(&["1", "eth_getLogs", "timeout"]).get(), 1);
        m.rpc_failover(1);
        m.rpc_rate_limited(1, 2);
        m.rpc_range_split(1);
        m.observe_endpoint_head(1, 2, 77);
        assert_eq!(m.rpc_failovers.with_label_values(&["1"]).get(), 1);
        assert_eq!(m.rpc_rate_limit_waits.with_label_values(&["1", "2"]).get(), 1);
        assert_eq!(m.rpc_range_splits.with_label_values(&["1"]).get(), 1);
        assert_eq!(m.rpc_endpoint_head.with_label_values(&["1", "2"]).get(), 77);
    }
}
