//! Every metric the coordinator exports, declared in one place. Prefix `herald_`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The coordinator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// API requests by route and status.
    pub api_requests: IntCounterVec,
    /// Registered subscriptions by state (set by the leader's reconcile rounds).
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
    /// Assignments revoked per reconcile round.
    pub plan_moves: Histogram,
    /// Live workers (registered with a lease) seen by the last reconcile round.
    pub workers: IntGauge,
    /// Per subscription: 1 for its registered state (active, paused), 0 for the other.
    pub subscription_state: IntGaugeVec,
    /// Size of etcd's database file (the member this replica talks to).
    pub etcd_db_size: IntGauge,
    /// Bytes of etcd's database in use.
    pub etcd_db_size_in_use: IntGauge,
    /// etcd's quota: as etcd reports it (3.6+), else `maintenance.etcd_quota_bytes`.
    pub etcd_quota: IntGauge,
    /// Compactions of etcd's history by this replica as leader.
    pub etcd_compactions: IntCounter,
    /// The revision etcd's history was last compacted to by this replica.
    pub etcd_compacted_revision: IntGauge,
    /// Label sets of `subscription_state` currently exported, to drop deleted subscriptions.
    exported: Arc<Mutex<BTreeSet<(String, String)>>>,
}

/// Values of the `state` label of `herald_subscriptions` and `herald_coordinator_subscription_state`.
pub const SUBSCRIPTION_STATES: [&str; 2] = ["active", "paused"];

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
            Opts::new("herald_subscriptions", "Registered subscriptions by state (active, paused)."),
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
        let plan_moves = Histogram::with_opts(
            HistogramOpts::new("herald_coordinator_plan_moves", "Assignments revoked per reconcile round.")
                .buckets(vec![0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0]),
        )
        .expect("valid metric");
        let workers = IntGauge::new(
            "herald_coordinator_workers",
            "Live workers (registered with a lease) seen by the last reconcile round.",
        )
        .expect("valid metric");
        let subscription_state = IntGaugeVec::new(
            Opts::new(
                "herald_coordinator_subscription_state",
                "Per subscription, 1 for its registered state (active, paused), 0 for the other; leader only.",
            ),
            &["chain_id", "subscription_id", "state"],
        )
        .expect("valid metric");
        registry.register(Box::new(plan_moves.clone())).expect("unique metric");
        registry.register(Box::new(workers.clone())).expect("unique metric");
        registry.register(Box::new(subscription_state.clone())).expect("unique metric");
        for state in SUBSCRIPTION_STATES {
            subscriptions.with_label_values(&[state]);
        }
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(gauge.clone())).expect("unique metric");
            gauge
        };
        let etcd_db_size = gauge(
            "herald_etcd_db_size_bytes",
            "Size of etcd's database file, as the member this replica talks to reports it.",
        );
        let etcd_db_size_in_use = gauge(
            "herald_etcd_db_size_in_use_bytes",
            "Bytes of etcd's database in use (the rest is free pages).",
        );
        let etcd_quota = gauge(
            "herald_etcd_quota_bytes",
            "etcd's database quota: as etcd reports it (3.6+), else maintenance.etcd_quota_bytes.",
        );
        let etcd_compacted_revision = gauge(
            "herald_etcd_compacted_revision",
            "The revision etcd's history was last compacted to by this replica as leader.",
        );
        let etcd_compactions = IntCounter::new(
            "herald_etcd_compactions_total",
            "Compactions of etcd's history by this replica as leader.",
        )
        .expect("valid metric");
        registry.register(Box::new(etcd_compactions.clone())).expect("unique metric");
        Self {
            registry,
            api_requests,
            subscriptions,
            is_leader,
            leader_changes,
            plan_runs,
            plan_duration,
            moves,
            plan_moves,
            workers,
            subscription_state,
            etcd_db_size,
            etcd_db_size_in_use,
            etcd_quota,
            etcd_compactions,
            etcd_compacted_revision,
            exported: Arc::default(),
        }
    }

    /// Records the registered subscriptions as `(chain_id, subscription_id, paused)`: counts by
    /// state and the per-subscription state, dropping series of deleted subscriptions.
    pub fn observe_subscriptions(&self, subscriptions: impl IntoIterator<Item = (u64, String, bool)>) {
        let mut counts = [0i64; 2];
        let mut seen = BTreeSet::new();
        for (chain, id, paused) in subscriptions {
            counts[usize::from(paused)] += 1;
            let chain = chain.to_string();
            for (i, state) in SUBSCRIPTION_STATES.iter().enumerate() {
                let value = i64::from(usize::from(paused) == i);
                self.subscription_state.with_label_values(&[chain.as_str(), id.as_str(), state]).set(value);
            }
            seen.insert((chain, id));
        }
        for (state, n) in SUBSCRIPTION_STATES.iter().zip(counts) {
            self.subscriptions.with_label_values(&[state]).set(n);
        }
        let mut exported = self.exported.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (chain, id) in exported.difference(&seen) {
            for state in SUBSCRIPTION_STATES {
                let _ = self.subscription_state.remove_label_values(&[chain.as_str(), id.as_str(), state]);
            }
        }
        *exported = seen;
    }

    /// Records one reconcile round: its planning time, revocations and the workers it saw.
    pub fn observe_round(&self, planning: std::time::Duration, revoked: usize, workers: usize) {
        self.plan_duration.observe(planning.as_secs_f64());
        self.plan_runs.inc();
        self.plan_moves.observe(revoked as f64);
        self.moves.inc_by(revoked as u64);
        self.workers.set(workers as i64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_states_follow_the_registry() {
        let m = Metrics::new();
        m.observe_subscriptions([(1, "a".to_owned(), false), (1, "b".to_owned(), true)]);
        assert_eq!(m.subscriptions.with_label_values(&["paused"]).get(), 1);
        assert_eq!(m.subscription_state.with_label_values(&["1", "b", "paused"]).get(), 1);
        assert_eq!(m.subscription_state.with_label_values(&["1", "b", "active"]).get(), 0);
        m.observe_subscriptions([(1, "a".to_owned(), false)]);
        assert!(!m.render().contains(r#"subscription_id="b""#));
        assert_eq!(m.subscriptions.with_label_values(&["paused"]).get(), 0);
        for line in m.render().lines().filter(|l| l.starts_with("# HELP")) {
            assert!(line.split_whitespace().count() > 3, "metric without help: {line}");
        }
    }

    #[test]
    fn a_round_is_recorded() {
        let m = Metrics::new();
        m.observe_round(std::time::Duration::from_millis(2), 3, 2);
        assert_eq!((m.plan_runs.get(), m.moves.get(), m.workers.get()), (1, 3, 2));
        assert_eq!(m.plan_moves.get_sample_count(), 1);
    }
}
