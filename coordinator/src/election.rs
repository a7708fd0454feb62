//! Leader election among coordinator replicas, on etcd's election API.
//!
//! Each replica campaigns under `<prefix>/coordinator/leader` with a lease it keeps alive. Only
//! the leader plans and writes assignments. Leadership counts only after a keep-alive succeeded
//! once elected, and ends as soon as the lease cannot be renewed before a local deadline (TTL
//! minus a margin, on the monotonic clock): a leader that is partitioned away stops acting
//! before etcd hands leadership to a standby, and one that was paused past the deadline steps
//! down the moment it runs again, before it renews anything.
//!
//! The local clock is the first line; the [`LeaderFence`] is the one that holds whatever the
//! scheduling: every leader-only write compares the election key's create revision, so once
//! etcd has expired the lease (and deleted the key) a former leader's writes are refused.

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, ResignOptions};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What leading means: a task started when leadership begins and cancelled when it ends.
pub trait Leadership: Send + Sync + 'static {
    /// Runs leader-only work until `cancel` fires; every write it makes compares `fence`.
    fn lead(&self, fence: LeaderFence, cancel: CancellationToken) -> impl Future<Output = ()> + Send;
}

/// One term of leadership as etcd knows it: the election key this replica won with and its
/// create revision. The key lives on the election lease, so it is gone once the lease
/// expires, and a write guarded by [`LeaderFence::compare`] then fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderFence {
    key: Vec<u8>,
    create_revision: i64,
}

impl LeaderFence {
    /// The fence of the election key `key` created at `create_revision`.
    pub fn new(key: impl Into<Vec<u8>>, create_revision: i64) -> Self {
        Self { key: key.into(), create_revision }
    }

    /// The transaction guard: this term's election key still exists, unchanged.
    pub fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }
}

/// Campaigns until `shutdown`; runs `work` while leading.
pub async fn run<L: Leadership>(
    client: Client,
    name: String,
    identity: String,
    ttl: Duration,
    metrics: Metrics,
    work: L,
    shutdown: CancellationToken,
) {
    let work = std::sync::Arc::new(work);
    let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
    while !shutdown.is_cancelled() {
        let mut c = client.clone();
        let lease = match c.lease_grant(ttl_secs, None).await {
            Ok(r) => r.id(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot get an election lease, retrying");
                tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl, lost.clone()));
        let elected = tokio::select! {
            _ = shutdown.cancelled() => None,
            _ = lost.cancelled() => None,
            r = c.campaign(name.as_str(), identity.as_str(), lease) => match r {
                Ok(r) => r.leader().cloned(),
                Err(e) => { tracing::warn!(error = %e, "campaign failed"); None }
            },
        };
        if let Some(leader_key) = elected {
            // Leadership counts once the lease has been renewed after winning.
            let mut stream = None;
            let confirmed = tokio::select! {
                _ = lost.cancelled() => false,
                _ = shutdown.cancelled() => false,
                renewal = renew(&client, lease, &mut stream) => matches!(renewal, Renewal::Renewed),
            };
            if confirmed {
                tracing::info!(identity, "elected leader");
                metrics.is_leader.set(1);
                metrics.leader_changes.inc();
                let leading = shutdown.child_token();
                let fence = LeaderFence::new(leader_key.key(), leader_key.rev());
                let task = tokio::spawn({
                    let (work, leading) = (work.clone(), leading.clone());
                    async move { work.lead(fence, leading).await }
                });
                tokio::select! {
                    _ = lost.cancelled() => tracing::warn!("leader lease lost; stepping down"),
                    _ = shutdown.cancelled() => {}
                }
                // No longer the leader from this moment, even while the work winds down (its
                // writes are fenced by then anyway).
                metrics.is_leader.set(0);
                leading.cancel();
                let _ = task.await;
                metrics.subscription_state.reset();
                let _ = c.resign(Some(ResignOptions::new().with_leader(leader_key))).await;
            }
        }
        lost.cancel();
        let _ = keeper.await;
        let _ = c.lease_revoke(lease).await;
    }
}

/// How one renewal went.
enum Renewal {
    /// etcd extended the lease.
    Renewed,
    /// etcd says the lease is gone.
    Expired,
    /// No answer (a broken stream, an etcd member down, no quorum): try again, on a new stream.
    Failed,
}

/// Renews `lease` every TTL/3; cancels `lost` when etcd says the lease expired or the local
/// deadline (TTL minus a third, since the last success) passes. The deadline is checked before
/// each renewal, so a process that was stopped past it steps down without a round trip, and a
/// renewal never waits beyond it. A broken keep-alive stream (the etcd member it went to died)
/// is opened again, so a member's loss does not cost the leadership.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, lost: CancellationToken) {
    let deadline_after = ttl - ttl / 3;
    let mut last_ok = Instant::now();
    let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let left = deadline_after.saturating_sub(last_ok.elapsed());
        if left.is_zero() {
            lost.cancel();
            return;
        }
        let renewal = tokio::time::timeout(left.min(ttl / 3), renew(&client, lease, &mut stream)).await;
        match renewal.unwrap_or(Renewal::Failed) {
            Renewal::Renewed => last_ok = Instant::now(),
            Renewal::Expired => {
                lost.cancel();
                return;
            }
            Renewal::Failed => {
                stream = None;
                if last_ok.elapsed() >= deadline_after {
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// One keep-alive of `lease` on `stream`, opening the stream first if there is none.
async fn renew(
    client: &Client,
    lease: i64,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Renewal {
    if stream.is_none() {
        *stream = client.clone().lease_keep_alive(lease).await.ok();
    }
    let Some((keeper, responses)) = stream.as_mut() else { return Renewal::Failed };
    if keeper.keep_alive().await.is_err() {
        return Renewal::Failed;
    }
    match responses.message().await {
        Ok(Some(r)) if r.ttl() > 0 => Renewal::Renewed,
        Ok(Some(_)) => Renewal::Expired,
        _ => Renewal::Failed,
    }
}
