//! Every metric the worker exports, declared in one place. Prefix `herald_`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// The worker's metrics and the registry that serves them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Messages stored by JetStream, per subscription (duplicates excluded).
    pub events_published: IntCounterVec,
    /// Publishes JetStream reported as duplicates of stored messages (replays after a crash).
    pub publish_duplicates: IntCounterVec,
    /// Logs that did not decode with the subscription's ABI (published raw, flagged).
    pub decode_failures: IntCounterVec,
    /// Failed publish attempts (retried).
    pub publish_errors: IntCounterVec,
    /// Retractions published for logs from orphaned blocks.
    pub retractions: IntCounterVec,
    /// Reorgs at least as deep as the subscription's confirmations (or beyond the window).
    pub deep_reorgs: IntCounterVec,
    /// Last block whose logs are all acknowledged, per subscription.
    pub cursor_block: IntGaugeVec,
    /// Blocks between the chain head and the cursor, per subscription.
    pub lag_blocks: IntGaugeVec,
    /// Latest head seen, per chain.
    pub head_block: IntGaugeVec,
    /// RPC calls by method and outcome.
    pub rpc_requests: IntCounterVec,
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
    /// `eth_getLogs` ranges refused by a provider and asked again smaller.
    pub rpc_range_splits: IntCounterVec,
    /// Calls that moved on to the next endpoint of a chain.
    pub rpc_failovers: IntCounterVec,
    /// Calls that waited for an endpoint's request-rate quota.
    pub rpc_rate_limit_waits: IntCounterVec,
    /// Whether an endpoint is up (1) or down (0), by configuration index.
    pub rpc_endpoint_up: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        let sub = &["chain_id", "subscription_id"];
        let fenced = IntCounter::new(
            "herald_worker_fenced_total",
            "Cursor writes refused because the subscription's assignment changed.",
        )
        .expect("valid metric");
        registry.register(Box::new(fenced.clone())).expect("unique metric");
        let assigned_subscriptions = IntGauge::new(
            "herald_worker_assigned_subscriptions",
            "Subscriptions this worker currently runs.",
        )
        .expect("valid metric");
        registry.register(Box::new(assigned_subscriptions.clone())).expect("unique metric");
        let self_fenced = IntCounter::new(
            "herald_worker_self_fenced_total",
            "Publishes or cursor writes refused because the local lease deadline had passed.",
        )
        .expect("valid metric");
        registry.register(Box::new(self_fenced.clone())).expect("unique metric");
        Self {
            events_published: counter_vec(
                &registry,
                "herald_events_published_total",
                "Messages stored by JetStream (duplicates excluded).",
                sub,
            ),
            publish_duplicates: counter_vec(
                &registry,
                "herald_publish_duplicates_total",
                "Publishes JetStream dropped as duplicates of stored messages.",
                sub,
            ),
            decode_failures: counter_vec(
                &registry,
                "herald_decode_failures_total",
                "Logs that did not decode with the subscription's ABI (published raw, flagged).",
                sub,
            ),
            retractions: counter_vec(
                &registry,
                "herald_retractions_total",
                "Retractions published for logs from orphaned blocks.",
                sub,
            ),
            deep_reorgs: counter_vec(
                &registry,
                "herald_deep_reorgs_total",
                "Reorgs at least as deep as the subscription's confirmations: published logs had to be retracted.",
                sub,
            ),
            publish_errors: counter_vec(
                &registry,
                "herald_publish_errors_total",
                "Failed publish attempts, retried.",
                sub,
            ),
            cursor_block: gauge_vec(
                &registry,
                "herald_subscription_cursor_block",
                "Last block whose logs are all acknowledged.",
                sub,
            ),
            lag_blocks: gauge_vec(
                &registry,
                "herald_subscription_lag_blocks",
                "Blocks between the chain head and the subscription's cursor.",
                sub,
            ),
            head_block: gauge_vec(&registry, "herald_chain_head_block", "Latest head seen.", &["chain_id"]),
            rpc_requests: counter_vec(
                &registry,
                "herald_rpc_requests_total",
                "JSON-RPC calls by method and outcome.",
                &["chain_id", "method", "outcome"],
            ),
            chain_reorgs: counter_vec(
                &registry,
                "herald_chain_reorgs_total",
                "Reorgs seen by the head tracker (blocks of its window replaced).",
                &["chain_id"],
            ),
            heads_websocket: gauge_vec(
                &registry,
                "herald_chain_heads_websocket",
                "1 while new heads arrive over a WebSocket subscription, 0 while polled.",
                &["chain_id"],
            ),
            incomplete_log_answers: counter_vec(
                &registry,
                "herald_rpc_incomplete_log_answers_total",
                "eth_getLogs answers asked again because a block's logsBloom says logs are missing.",
                &["chain_id"],
            ),
            rpc_range_splits: counter_vec(
                &registry,
                "herald_rpc_range_splits_total",
                "eth_getLogs ranges refused by a provider (too many blocks, results or too slow) and asked again smaller.",
                &["chain_id"],
            ),
            rpc_failovers: counter_vec(
                &registry,
                "herald_rpc_failovers_total",
                "Calls that moved on to the next endpoint of the chain.",
                &["chain_id"],
            ),
            rpc_rate_limit_waits: counter_vec(
                &registry,
                "herald_rpc_rate_limit_waits_total",
                "Calls that waited for an endpoint's requests_per_second quota.",
                &["chain_id", "endpoint"],
            ),
            rpc_endpoint_up: gauge_vec(
                &registry,
                "herald_rpc_endpoint_up",
                "1 while an endpoint answers, 0 while it is down (endpoint = index in rpc_urls).",
                &["chain_id", "endpoint"],
            ),
            fenced,
            assigned_subscriptions,
            self_fenced,
            registry,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
