//! Worker membership: a registration key bound to an etcd lease, kept alive.
//!
//! The key `<prefix>/workers/<worker_id>` exists exactly as long as this worker keeps its lease
//! alive; the coordinator binds the worker's assignments to the same lease, so a worker that
//! dies loses its assignments with its lease, and one that shuts down cleanly revokes the lease
//! so its subscriptions move at once. A lost lease (etcd unreachable longer than the TTL) is
//! replaced by a new registration when etcd answers again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::PutOptions;
use herald_proto::{ChainId, WorkerId, WorkerInfo};
use tokio_util::sync::CancellationToken;

use crate::retry::{Backoff, pause};
use crate::store::{EtcdStore, StoreError};

/// Keeps this worker registered until cancelled, then revokes the lease.
pub struct Membership {
    /// etcd.
    pub store: EtcdStore,
    /// What to announce.
    pub info: WorkerInfo,
    /// Lease TTL.
    pub ttl: Duration,
}

impl Membership {
    /// This worker's registration record.
    pub fn info(worker_id: WorkerId, chains: Vec<ChainId>, capacity: u32) -> WorkerInfo {
        WorkerInfo {
            worker_id,
            chains,
            capacity,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
        }
    }

    async fn register(&self) -> Result<i64, StoreError> {
        let mut client = self.store.client();
        let ttl = i64::try_from(self.ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl, None).await?.id();
        let key = self.store.keys().worker(&self.info.worker_id);
        let value = serde_json::to_vec(&self.info).expect("worker info serialises");
        client.put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
        Ok(lease)
    }

    /// Registers, keeps the lease alive every TTL/3, re-registers if it is lost, and revokes it
    /// when `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::network();
        while !cancel.is_cancelled() {
            let lease = match self.register().await {
                Ok(lease) => lease,
                Err(e) => {
                    if backoff.attempts() == 0 {
                        tracing::warn!(error = %e, "cannot register worker, retrying with backoff");
                    }
                    if !pause(&mut backoff, &cancel).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            tracing::info!(lease, ttl = ?self.ttl, "worker registered");
            match self.keep_alive(lease, &cancel).await {
                Ok(()) => {
                    let revoked = self.store.client().lease_revoke(lease).await;
                    tracing::info!(ok = revoked.is_ok(), "worker lease revoked");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "worker lease lost; registering again"),
            }
        }
    }

    /// Returns `Ok` when cancelled, `Err` when the lease is lost.
    async fn keep_alive(&self, lease: i64, cancel: &CancellationToken) -> Result<(), StoreError> {
        let (mut keeper, mut responses) = self.store.client().lease_keep_alive(lease).await?;
        let interval = self.ttl / 3;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(interval) => {}
            }
            keeper.keep_alive().await?;
            match responses.message().await? {
                Some(r) if r.ttl() > 0 => {}
                _ => return Err(StoreError::LeaseExpired(lease)),
            }
        }
    }
}
