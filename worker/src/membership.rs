//! Worker membership: a registration key bound to an etcd lease, kept alive.
//!
//! The key `<prefix>/workers/<worker_id>` exists exactly as long as this worker keeps its lease
//! alive; the coordinator binds the worker's assignments to the same lease, so a worker that
//! dies loses its assignments with its lease, and one that shuts down cleanly revokes the lease
//! so its subscriptions move at once. A lost lease (etcd unreachable longer than the TTL) is
//! replaced by a new registration when etcd answers again.
//!
//! The worker does not wait for etcd to tell it that its lease is gone: [`LeaseClock`] holds a
//! local deadline on the monotonic clock (renewal sent + 2/3 of the TTL, always before the
//! server's own expiry). Past it, every publish and cursor write is refused locally, so a
//! paused process (SIGSTOP, a long GC-like stall) or a partitioned one stops acting before
//! another worker can have taken its subscriptions over.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::PutOptions;
use herald_proto::{ChainId, WorkerId, WorkerInfo};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::retry::{Backoff, pause};
use crate::store::{EtcdStore, StoreError};

/// The local view of this worker's lease: valid until a deadline on the monotonic clock.
#[derive(Clone, Debug)]
pub struct LeaseClock {
    origin: Instant,
    /// Deadline in nanoseconds since `origin`; 0 = no valid lease.
    deadline: Arc<AtomicU64>,
    /// The etcd lease id; 0 = none.
    lease: Arc<AtomicI64>,
}

impl Default for LeaseClock {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseClock {
    /// No lease yet.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            deadline: Arc::new(AtomicU64::new(0)),
            lease: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A clock that is always valid (for tests of the pure pipeline).
    pub fn always_valid() -> Self {
        let clock = Self::new();
        clock.deadline.store(u64::MAX, Ordering::SeqCst);
        clock
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether this worker may still act in the name of its lease.
    pub fn is_valid(&self) -> bool {
        self.nanos(Instant::now()) < self.deadline.load(Ordering::SeqCst)
    }

    /// The current lease, while valid.
    pub fn lease(&self) -> Option<i64> {
        let lease = self.lease.load(Ordering::SeqCst);
        (lease != 0 && self.is_valid()).then_some(lease)
    }

    /// Records a renewal whose request was sent at `sent`.
    fn renewed(&self, sent: Instant, ttl: Duration) {
        let deadline = self.nanos(sent + ttl * 2 / 3);
        self.deadline.fetch_max(deadline, Ordering::SeqCst);
    }

    /// Forgets the lease (lost or revoked).
    fn invalidate(&self) {
        self.deadline.store(0, Ordering::SeqCst);
        self.lease.store(0, Ordering::SeqCst);
    }
}

/// Keeps this worker registered until cancelled, then revokes the lease.
pub struct Membership {
    /// etcd.
    pub store: EtcdStore,
    /// What to announce.
    pub info: WorkerInfo,
    /// Lease TTL.
    pub ttl: Duration,
    /// Shared with every task: the local lease deadline.
    pub clock: LeaseClock,
    /// Keepalive latency and failures, registrations.
    pub metrics: Metrics,
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
        let sent = Instant::now();
        let lease = client.lease_grant(ttl, None).await?.id();
        let key = self.store.keys().worker(&self.info.worker_id);
        let value = serde_json::to_vec(&self.info).expect("worker info serialises");
        client.put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
        self.clock.lease.store(lease, Ordering::SeqCst);
        self.clock.renewed(sent, self.ttl);
        self.metrics.registrations.inc();
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
                    self.clock.invalidate();
                    let revoked = self.store.client().lease_revoke(lease).await;
                    tracing::info!(ok = revoked.is_ok(), "worker lease revoked");
                    return;
                }
                Err(e) => {
                    self.clock.invalidate();
                    self.metrics.lease_keepalive_failures.inc();
                    tracing::warn!(error = %e, "worker lease lost; fenced until registered again");
                }
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
            if !self.clock.is_valid() {
                // Woken after the local deadline (paused process): the lease may be gone and
                // the subscriptions taken over. Start again with a new lease.
                return Err(StoreError::LeaseExpired(lease));
            }
            let sent = Instant::now();
            keeper.keep_alive().await?;
            let response = responses.message().await?;
            self.metrics.lease_keepalive_duration.observe(sent.elapsed().as_secs_f64());
            match response {
                Some(r) if r.ttl() > 0 => self.clock.renewed(sent, self.ttl),
                _ => return Err(StoreError::LeaseExpired(lease)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_expires_before_the_lease() {
        let clock = LeaseClock::new();
        assert!(!clock.is_valid());
        clock.renewed(Instant::now(), Duration::from_secs(30));
        assert!(clock.is_valid());
        // An older renewal never shortens the deadline.
        clock.renewed(
            Instant::now().checked_sub(Duration::from_secs(60)).unwrap_or_else(Instant::now),
            Duration::from_secs(30),
        );
        assert!(clock.is_valid());
        clock.invalidate();
        assert!(!clock.is_valid());
        assert!(LeaseClock::always_valid().is_valid());
    }
}
