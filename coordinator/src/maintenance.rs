//! etcd upkeep: its database size as metrics (every replica), and the compaction of its history
//! (the leader).
//!
//! etcd keeps every earlier value of every key until its history is compacted. herald rewrites
//! keys all the time (each cursor commit, assignment and lease registration), so without
//! compaction etcd's database grows until its quota (2 GiB by default); past it etcd refuses
//! every write (`NOSPACE`): no cursor can advance, no leader can be elected, the cluster stops.
//! The leader therefore compacts, every tenth of `maintenance.compaction_retention`, everything
//! older than that retention, as etcd's own `--auto-compaction-mode=periodic` would; with
//! `0s` it leaves compaction to etcd (for operators who run etcd with it). Watches of herald
//! never reach that far back: each re-reads its prefix when it restarts.
//!
//! Compaction makes room for new writes but does not shrink etcd's file; `etcdctl defrag` does,
//! one member at a time (it blocks the member while it runs), which is the operator's call.
//! `herald_etcd_db_size_bytes` against `herald_etcd_quota_bytes` says when it is due, and the
//! `HeraldEtcdNearQuota` alert fires at 80%.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::registry::Registry;

/// Revisions seen over time, to know which one is `retention` old. Pure.
#[derive(Debug, Default)]
pub struct RevisionLog {
    samples: VecDeque<(Instant, i64)>,
}

impl RevisionLog {
    /// `revision` was current at `at` (samples come in time order).
    pub fn record(&mut self, at: Instant, revision: i64) {
        if self.samples.back().is_none_or(|&(_, last)| last < revision) {
            self.samples.push_back((at, revision));
        }
    }

    /// The newest revision seen at least `retention` before `now`, if it was not returned
    /// before: history up to it may be compacted.
    pub fn due(&mut self, now: Instant, retention: Duration) -> Option<i64> {
        let mut due = None;
        while let Some(&(at, revision)) = self.samples.front()
            && now.duration_since(at) >= retention
        {
            due = Some(revision);
            self.samples.pop_front();
        }
        due
    }
}

/// How often the leader samples the revision and compacts: a tenth of the retention, between
/// one second and one minute.
pub fn compaction_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Compacts etcd's history to `retention` until `cancel` (the end of the leadership term).
pub async fn compact_while_leading(
    registry: Registry,
    retention: Duration,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    if retention.is_zero() {
        return;
    }
    let mut log = RevisionLog::default();
    let mut tick = tokio::time::interval(compaction_interval(retention));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = match registry.status().await {
            Ok(status) => status,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read etcd's revision; compaction waits");
                continue;
            }
        };
        let now = Instant::now();
        log.record(now, status.revision);
        let Some(revision) = log.due(now, retention) else {
            continue;
        };
        match registry.compact(revision).await {
            Ok(()) => {
                metrics.etcd_compactions.inc();
                metrics.etcd_compacted_revision.set(revision);
                tracing::debug!(revision, "compacted etcd's history");
            }
            // Someone (etcd itself, an operator, a former leader) compacted further already.
            Err(e) if e.to_string().contains("compacted") => {
                tracing::debug!(revision, error = %e, "etcd's history was already compacted past this")
            }
            Err(e) => tracing::warn!(revision, error = %e, "etcd compaction failed; retrying later"),
        }
    }
}

/// Publishes etcd's database size (as the member this replica talks to reports it) every
/// `interval`, and its quota: etcd's own report where it gives one (3.6+), else `quota_bytes`.
pub async fn watch_db_size(
    registry: Registry,
    quota_bytes: u64,
    interval: Duration,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match registry.status().await {
            Ok(status) => {
                metrics.etcd_db_size.set(status.db_size);
                metrics.etcd_db_size_in_use.set(status.db_size_in_use);
                let quota = if status.quota > 0 { status.quota } else { quota_bytes as i64 };
                metrics.etcd_quota.set(quota);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read etcd's status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_what_is_older_than_the_retention_once() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let retention = Duration::from_secs(300);
        let mut log = RevisionLog::default();
        log.record(at(0), 10);
        log.record(at(30), 40);
        log.record(at(60), 40); // no write since: not a new sample
        log.record(at(90), 95);
        assert_eq!(log.due(at(299), retention), None);
        assert_eq!(log.due(at(300), retention), Some(10));
        assert_eq!(log.due(at(301), retention), None, "each revision is due once");
        assert_eq!(log.due(at(400), retention), Some(95), "the newest revision old enough");
        assert_eq!(log.due(at(10_000), retention), None);
    }

    #[test]
    fn the_interval_is_a_tenth_of_the_retention_within_bounds() {
        assert_eq!(compaction_interval(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(compaction_interval(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(compaction_interval(Duration::from_secs(86_400)), Duration::from_secs(60));
    }
}
