//! Every metric the coordinator exports, declared in one place. Prefix `herald_`.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The coordinator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// API requests by route and status.
    pub api_requests: IntCounterVec,
    /// Subscriptions by state, as of the last list.
    pub subscriptions: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let api_requests = IntCounterVec::new(
            Opts::new("herald_api_requests_total", "Admin API requests by route and status."),
            &["route", "status"],
        )
        .expect("valid metric");
        let subscriptions = IntGaugeVec::new(
            Opts::new("herald_subscriptions", "Registered subscriptions by state, as of the last list."),
            &["state"],
        )
        .expect("valid metric");
        registry.register(Box::new(api_requests.clone())).expect("unique metric");
        registry.register(Box::new(subscriptions.clone())).expect("unique metric");
        Self { registry, api_requests, subscriptions }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
