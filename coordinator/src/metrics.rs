//! Every metric the coordinator exports, declared in one place. Prefix `herald_`.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The coordinator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// API requests by route and status.
    pub api_requests: IntCounterVec,
    /// Subscriptions by state, as of the last list.
    pub subscriptions: IntGaugeVec,
    /// 1 while this replica is the leader.
    pub is_leader: IntGauge,
    /// Times this replica became leader.
    pub leader_changes: IntCounter,
    /// Reconcile rounds run.
    pub plan_runs: IntCounter,
    /// Time to plan one round.
    pub plan_duration: Histogram,
    /// Assignments revoked by reconcile rounds (moves, dead workers, deleted subscriptions).
    pub moves: IntCounter,
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
        let is_leader = IntGauge::new("herald_coordinator_is_leader", "1 while this replica is the leader.")
            .expect("valid metric");
        let leader_changes =
            IntCounter::new("herald_coordinator_leader_changes_total", "Times this replica became leader.")
                .expect("valid metric");
        let plan_runs = IntCounter::new("herald_coordinator_plan_runs_total", "Reconcile rounds run.")
            .expect("valid metric");
        let plan_duration = Histogram::with_opts(
            HistogramOpts::new(
                "herald_coordinator_plan_duration_seconds",
                "Time to plan one reconcile round.",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
        )
        .expect("valid metric");
        let moves = IntCounter::new(
            "herald_coordinator_moves_total",
            "Assignments revoked by reconcile rounds (moves, dead workers, deleted subscriptions).",
        )
        .expect("valid metric");
        registry.register(Box::new(is_leader.clone())).expect("unique metric");
        registry.register(Box::new(leader_changes.clone())).expect("unique metric");
        registry.register(Box::new(plan_runs.clone())).expect("unique metric");
        registry.register(Box::new(plan_duration.clone())).expect("unique metric");
        registry.register(Box::new(moves.clone())).expect("unique metric");
        Self {
            registry,
            api_requests,
            subscriptions,
            is_leader,
            leader_changes,
            plan_runs,
            plan_duration,
            moves,
        }
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
