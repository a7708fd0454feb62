//! Leader election among coordinator replicas, on etcd's election API.
//!
//! Each replica campaigns under `<prefix>/coordinator/leader` with a lease it keeps alive. Only
//! the leader plans and writes assignments. Leadership counts only after a keep-alive succeeded
//! once elected, and ends as soon as the lease cannot be renewed before a local deadline (TTL
//! minus a margin, on the monotonic clock): a leader that is partitioned away or paused stops
//! acting before etcd hands leadership to a standby.

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{Client, ResignOptions};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What leading means: a task started when leadership begins and cancelled when it ends.
pub trait Leadership: Send + Sync + 'static {
    /// Runs leader-only work until `cancel` fires.
    fn lead(&self, cancel: CancellationToken) -> impl Future<Output = ()> + Send;
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
            let confirmed = tokio::select! {
                _ = lost.cancelled() => false,
                _ = shutdown.cancelled() => false,
                ok = renew_once(&client, lease) => ok,
            };
            if confirmed {
                tracing::info!(identity, "elected leader");
                metrics.is_leader.set(1);
                metrics.leader_changes.inc();
                let leading = shutdown.child_token();
                let task = tokio::spawn({
                    let (work, leading) = (work.clone(), leading.clone());
                    async move { work.lead(leading).await }
                });
                tokio::select! {
                    _ = lost.cancelled() => tracing::warn!("leader lease lost; stepping down"),
                    _ = shutdown.cancelled() => {}
                }
                leading.cancel();
                let _ = task.await;
                metrics.is_leader.set(0);
                metrics.subscription_state.reset();
                let _ = c.resign(Some(ResignOptions::new().with_leader(leader_key))).await;
            }
        }
        lost.cancel();
        let _ = keeper.await;
        let _ = c.lease_revoke(lease).await;
    }
}

async fn renew_once(client: &Client, lease: i64) -> bool {
    let mut c = client.clone();
    match c.lease_keep_alive(lease).await {
        Ok((mut keeper, mut stream)) => {
            keeper.keep_alive().await.is_ok() && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0)
        }
        Err(_) => false,
    }
}

/// Renews `lease` every TTL/3; cancels `lost` when a renewal fails or the local deadline (TTL
/// minus a third, since the last success) passes.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, lost: CancellationToken) {
    let deadline_after = ttl - ttl / 3;
    let mut last_ok = Instant::now();
    let mut c = client.clone();
    let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await else {
        lost.cancel();
        return;
    };
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let renewed = async {
            keeper.keep_alive().await.ok()?;
            stream.message().await.ok()?.filter(|r| r.ttl() > 0)
        };
        match tokio::time::timeout(ttl / 3, renewed).await {
            Ok(Some(_)) => last_ok = Instant::now(),
            _ if last_ok.elapsed() >= deadline_after => {
                lost.cancel();
                return;
            }
            _ => {}
        }
    }
}
