//! Worker membership: a registration key bound to an etcd lease, kept alive.
//!
//! The key `<prefix>/workers/<worker_id>` exists exactly as long as this worker keeps its lease
//! alive; the coordinator binds the worker's assignments to the same lease, so a worker that
//! dies loses its assignments with its lease, and one that shuts down cleanly revokes the lease
//! so its subscriptions move at once. A lost lease (etcd unreachable longer than the TTL, a
//! process paused past it) is replaced by a new registration when etcd answers again.
//!
//! **Registrations.** Each lease this process registers with is one *registration*, numbered
//! 1, 2, ... (its generation). [`LeaseClock`] holds the local view of the current one: a
//! deadline on the monotonic clock (renewal sent + 2/3 of the TTL, always before the server's
//! own expiry). The worker does not wait for etcd to tell it that its lease is gone.
//!
//! **Self-fencing.** A task is started with a clock *pinned* to the registration in force
//! ([`LeaseClock::pinned`]) and checks it before every publish and cursor write: it is valid
//! only while that same registration is current and within its own deadline. A paused or
//! partitioned process stops acting before another worker can have taken its subscriptions
//! over, and a task of a lost lease never acts under the lease registered after it.
//!
//! **Losing the lease** (the local deadline passed, a keepalive failed or went unanswered until
//! the deadline) ends the registration: its clocks are invalid from then on and its
//! cancellation token, the parent of every task's, is cancelled. [`Membership::run`] then waits
//! until every clock pinned to it is dropped: each task's (the task ended) and the
//! supervisor's, which it holds for one listing of the assignments and drops only after it
//! stopped and joined every task. Only then does it revoke the lost lease (best effort; its
//! owner keys and assignments go at once) and register again, so every task runs again only
//! after a fresh listing, under the new lease.
//!
//! **Leaving** (shutdown, after the supervisor joined every task): the lease is revoked, and a
//! drain request under `<prefix>/drains/<worker_id>` naming one of this process's leases is
//! deleted. A drain request is honoured only when it names a lease this process registered
//! with ([`LeaseClock::is_own`]), never one left for an earlier process with the same id; it
//! is not bound to that lease, so losing the lease and registering again does not lose it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use herald_proto::{ChainId, WorkerId, WorkerInfo};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::retry::{Backoff, pause};
use crate::store::{EtcdStore, StoreError};

/// How long to wait for the tasks of a lost lease before saying so (and waiting on).
const STOP_WARNING: Duration = Duration::from_secs(10);

/// The local view of this worker's lease: valid until a deadline on the monotonic clock.
///
/// The worker-wide clock follows the current registration. [`LeaseClock::pinned`] gives a clock
/// bound to one registration: it never becomes valid again once that registration ended, and
/// holding it keeps [`Membership`] from registering again (see the module documentation).
#[derive(Clone, Debug)]
pub struct LeaseClock {
    shared: Arc<Shared>,
    /// `Some`: this clock speaks for that registration only.
    pin: Option<Arc<Registration>>,
}

#[derive(Debug)]
struct Shared {
    origin: Instant,
    /// The registration in force; `None` before the first one and between a loss and the next.
    current: Mutex<Option<Arc<Registration>>>,
    /// Generation of the latest registration (0: none yet).
    generation: AtomicU64,
    /// Every lease this process was granted, in order.
    granted: Mutex<Vec<i64>>,
}

/// One registration: a lease, while this process holds it.
#[derive(Debug)]
struct Registration {
    generation: u64,
    /// The etcd lease id; 0 for [`LeaseClock::always_valid`].
    lease: i64,
    /// Nanoseconds since `Shared::origin`; 0 once ended (and never renewed after).
    deadline: AtomicU64,
    /// Cancelled when the registration ends: the parent of its tasks' tokens.
    ended: CancellationToken,
    /// Dropped with the last reference, i.e. the last clock pinned to this registration:
    /// [`Membership`] waits for that before it registers again.
    _held: Option<oneshot::Sender<()>>,
}

impl Registration {
    fn end(&self) {
        self.deadline.store(0, Ordering::SeqCst);
        self.ended.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
            shared: Arc::new(Shared {
                origin: Instant::now(),
                current: Mutex::new(None),
                generation: AtomicU64::new(0),
                granted: Mutex::new(Vec::new()),
            }),
            pin: None,
        }
    }

    /// A clock that is always valid (for tests of the pure pipeline).
    pub fn always_valid() -> Self {
        let clock = Self::new();
        clock.shared.generation.store(1, Ordering::SeqCst);
        *lock(&clock.shared.current) = Some(Arc::new(Registration {
            generation: 1,
            lease: 0,
            deadline: AtomicU64::new(u64::MAX),
            ended: CancellationToken::new(),
            _held: None,
        }));
        clock
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.shared.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The registration this clock speaks for: its pin, else the current one.
    fn registration(&self) -> Option<Arc<Registration>> {
        self.pin.clone().or_else(|| lock(&self.shared.current).clone())
    }

    /// The registration this clock speaks for, if this worker may act in its name now.
    fn valid(&self) -> Option<Arc<Registration>> {
        let now = self.nanos(Instant::now());
        let registration = self.registration()?;
        // A pinned clock never passes on a newer registration, whatever its deadline.
        let current = registration.generation == self.shared.generation.load(Ordering::SeqCst);
        (current && now < registration.deadline.load(Ordering::SeqCst)).then_some(registration)
    }

    /// Whether this worker may still act in the name of the lease (for a pinned clock: of the
    /// lease it was pinned to).
    pub fn is_valid(&self) -> bool {
        self.valid().is_some()
    }

    /// The lease id, while valid.
    pub fn lease(&self) -> Option<i64> {
        self.valid().map(|r| r.lease).filter(|lease| *lease != 0)
    }

    /// A clock bound to the registration in force now (to the same one, for a pinned clock),
    /// valid only while that registration is current and within its deadline; `None` without a
    /// valid lease. Every task gets one; holding it delays the next registration until it is
    /// dropped, so it must not outlive the task.
    pub fn pinned(&self) -> Option<LeaseClock> {
        let registration = self.valid()?;
        Some(Self { shared: self.shared.clone(), pin: Some(registration) })
    }

    /// The generation of the registration this clock speaks for (1 for the first lease of the
    /// process); 0 without one.
    pub fn generation(&self) -> u64 {
        self.registration().map_or(0, |r| r.generation)
    }

    /// A token cancelled when the registration this clock speaks for ends (already cancelled
    /// without one). Tokens derived from it with `child_token` stop with the lease.
    pub fn ended(&self) -> CancellationToken {
        self.registration().map_or_else(
            || {
                let token = CancellationToken::new();
                token.cancel();
                token
            },
            |r| r.ended.clone(),
        )
    }

    /// Whether this process was granted `lease` (for any of its registrations).
    pub fn is_own(&self, lease: i64) -> bool {
        lease != 0 && lock(&self.shared.granted).contains(&lease)
    }

    /// Time left before the current registration's deadline (zero without one).
    fn remaining(&self) -> Duration {
        let Some(registration) = lock(&self.shared.current).clone() else { return Duration::ZERO };
        let deadline = registration.deadline.load(Ordering::SeqCst);
        Duration::from_nanos(deadline.saturating_sub(self.nanos(Instant::now())))
    }

    fn deadline_after(&self, sent: Instant, ttl: Duration) -> u64 {
        self.nanos(sent + ttl * 2 / 3).max(1)
    }

    /// Records a lease grant, before the lease is used for anything.
    fn granted(&self, lease: i64) {
        lock(&self.shared.granted).push(lease);
    }

    /// Makes `lease`, granted by a request sent at `sent`, the current registration (ending the
    /// previous one, if any). The receiver completes once the registration ended and no clock
    /// pinned to it remains.
    fn begin(&self, lease: i64, sent: Instant, ttl: Duration) -> oneshot::Receiver<()> {
        let (held, released) = oneshot::channel();
        let mut current = lock(&self.shared.current);
        if let Some(previous) = current.take() {
            previous.end();
        }
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *current = Some(Arc::new(Registration {
            generation,
            lease,
            deadline: AtomicU64::new(self.deadline_after(sent, ttl)),
            ended: CancellationToken::new(),
            _held: Some(held),
        }));
        released
    }

    /// Records a renewal of `lease` whose request was sent at `sent`. An ended registration is
    /// never renewed.
    fn renewed(&self, lease: i64, sent: Instant, ttl: Duration) {
        let Some(registration) = lock(&self.shared.current).clone() else { return };
        if registration.lease != lease {
            return;
        }
        let deadline = self.deadline_after(sent, ttl);
        let _ = registration
            .deadline
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| (d != 0).then_some(d.max(deadline)));
    }

    /// Grants `lease` for `ttl` from now and makes it the current registration, as
    /// [`Membership`] does with a lease etcd granted: for simulations of lease loss and
    /// re-registration without etcd.
    pub fn grant_for_simulation(&self, lease: i64, ttl: Duration) {
        self.granted(lease);
        drop(self.begin(lease, Instant::now(), ttl));
    }

    /// Ends the current registration (lease lost or revoked): nothing acts in its name any more.
    pub fn end(&self) {
        if let Some(registration) = lock(&self.shared.current).take() {
            registration.end();
        }
    }
}

/// The lease a drain request names (its value, in hex); 0, which no registration has, when
/// the value is not a lease id.
pub fn drain_request_lease(value: &[u8]) -> i64 {
    std::str::from_utf8(value).ok().and_then(|v| i64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0)
}

/// Keeps this worker registered until cancelled, then revokes the lease.
pub struct Membership {
    /// etcd.
    pub store: EtcdStore,
    /// What to announce.
    pub info: WorkerInfo,
    /// Lease TTL.
    pub ttl: Duration,
    /// Shared with the supervisor, which pins it for every task: the local lease deadline.
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

    /// Grants a lease, writes the registration key under it and makes it the current
    /// registration. Returns the lease and the receiver of [`LeaseClock::begin`].
    async fn register(&self) -> Result<(i64, oneshot::Receiver<()>), StoreError> {
        let mut client = self.store.client();
        let ttl = i64::try_from(self.ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let lease = client.lease_grant(ttl, None).await?.id();
        // Known as ours before anyone can read it from the registration key (a drain request
        // bound to it is for this process).
        self.clock.granted(lease);
        let key = self.store.keys().worker(&self.info.worker_id);
        let value = serde_json::to_vec(&self.info).expect("worker info serialises");
        client.put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
        let released = self.clock.begin(lease, sent, self.ttl);
        self.metrics.registrations.inc();
        Ok((lease, released))
    }

    /// Registers, keeps the lease alive every TTL/3, and registers again if it is lost (after
    /// every task of the lost lease stopped, see the module documentation); when `cancel` fires
    /// (after the supervisor joined every task), revokes the lease and leaves.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::network();
        // A lost lease not revoked yet: etcd may keep it (and what is bound to it) alive.
        let mut lost: Option<i64> = None;
        while !cancel.is_cancelled() {
            if let Some(lease) = lost
                && self.revoke(lease).await
            {
                lost = None;
            }
            let (lease, released) = match self.register().await {
                Ok(registered) => registered,
                Err(e) => {
                    if backoff.attempts() == 0 {
                        tracing::warn!(error = %e, "cannot register worker, retrying with backoff");
                    }
                    if !pause(&mut backoff, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            if let Some(old) = lost.take() {
                // One more try now that etcd answers; else it expires with its TTL.
                self.revoke(old).await;
            }
            let generation = self.clock.generation();
            tracing::info!(lease, generation, ttl = ?self.ttl, "worker registered");
            let kept = self.keep_alive(lease, &cancel).await;
            // From here on nothing acts in this registration's name: every pinned clock is
            // invalid and every task's token is cancelled.
            self.clock.end();
            match kept {
                Ok(()) => {
                    let revoked = self.revoke(lease).await;
                    tracing::info!(ok = revoked, "worker lease revoked");
                    break;
                }
                Err(e) => {
                    self.metrics.lease_keepalive_failures.inc();
                    tracing::warn!(error = %e, lease, generation, "worker lease lost; stopping every task started under it");
                    self.wait_released(released, &cancel).await;
                    tracing::info!(
                        lease,
                        generation,
                        "every task of the lost lease stopped; registering again"
                    );
                    lost = Some(lease);
                }
            }
        }
        if let Some(lease) = lost {
            self.revoke(lease).await;
        }
        self.forget_drain_request().await;
    }

    /// Waits until no clock pinned to the ended registration remains (or `cancel`).
    async fn wait_released(&self, mut released: oneshot::Receiver<()>, cancel: &CancellationToken) {
        loop {
            tokio::select! {
                _ = &mut released => return,
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(STOP_WARNING) => {
                    tracing::warn!("still waiting for the tasks of the lost lease to stop before registering again");
                }
            }
        }
    }

    /// Revokes `lease`, best effort; whether etcd confirmed it.
    async fn revoke(&self, lease: i64) -> bool {
        match self.store.client().lease_revoke(lease).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(lease, error = %e, "cannot revoke lease");
                false
            }
        }
    }

    /// Deletes the drain request for this worker id if it names a lease this process held
    /// (one naming another lease is for another process and stays).
    async fn forget_drain_request(&self) {
        let key = self.store.keys().drain(&self.info.worker_id);
        let mut client = self.store.client();
        let found = match client.get(key.as_str(), None).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the drain request for this worker id");
                return;
            }
        };
        let Some(kv) = found.kvs().first().filter(|kv| self.clock.is_own(drain_request_lease(kv.value())))
        else {
            return;
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        if let Err(e) = client.txn(txn).await {
            tracing::warn!(error = %e, "cannot delete the drain request for this worker id");
        }
    }

    /// Returns `Ok` when cancelled, `Err` when the lease is lost: a renewal failed, or none was
    /// confirmed before the local deadline.
    async fn keep_alive(&self, lease: i64, cancel: &CancellationToken) -> Result<(), StoreError> {
        let (mut keeper, mut responses) = self.store.client().lease_keep_alive(lease).await?;
        let interval = self.ttl / 3;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(interval.min(self.clock.remaining())) => {}
            }
            if !self.clock.is_valid() {
                // Woken after the local deadline (paused process): the lease may be gone and
                // the subscriptions taken over. Start again with a new lease.
                return Err(StoreError::LeaseExpired(lease));
            }
            let sent = Instant::now();
            let renewal = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            let response = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = tokio::time::timeout(self.clock.remaining(), renewal) => match r {
                    Ok(response) => response?,
                    Err(_) => return Err(StoreError::LeaseExpired(lease)),
                },
            };
            self.metrics.lease_keepalive_duration.observe(sent.elapsed().as_secs_f64());
            match response {
                Some(r) if r.ttl() > 0 => self.clock.renewed(lease, sent, self.ttl),
                _ => return Err(StoreError::LeaseExpired(lease)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn long_ago() -> Instant {
        Instant::now().checked_sub(Duration::from_secs(60)).unwrap_or_else(Instant::now)
    }

    #[test]
    fn a_drain_request_names_a_lease_in_hex() {
        assert_eq!(drain_request_lease(b"694d8f1e2a3b4c5d"), 0x694d_8f1e_2a3b_4c5d);
        assert_eq!(drain_request_lease(format!("{:x}", 7i64).as_bytes()), 7);
        // Anything else names no lease (0 is never granted, so never this process's).
        for value in [&b""[..], b"zz", b"\xff", b"1234567890abcdef0"] {
            assert_eq!(drain_request_lease(value), 0, "{value:?}");
        }
    }

    #[test]
    fn the_clock_expires_before_the_lease() {
        let clock = LeaseClock::new();
        assert!(!clock.is_valid());
        assert!(clock.pinned().is_none());
        let _released = clock.begin(7, Instant::now(), TTL);
        assert!(clock.is_valid());
        assert_eq!(clock.lease(), Some(7));
        // An older renewal never shortens the deadline.
        clock.renewed(7, long_ago(), TTL);
        assert!(clock.is_valid());
        clock.end();
        assert!(!clock.is_valid());
        assert_eq!(clock.lease(), None);
        assert!(LeaseClock::always_valid().is_valid());
        assert!(LeaseClock::always_valid().pinned().is_some_and(|p| p.is_valid()));
    }

    #[test]
    fn a_registration_granted_long_ago_is_past_its_deadline() {
        let clock = LeaseClock::new();
        let _released = clock.begin(7, long_ago(), TTL);
        assert!(!clock.is_valid());
        assert!(clock.pinned().is_none());
    }

    #[test]
    fn a_pinned_clock_is_invalid_once_a_newer_registration_exists() {
        let clock = LeaseClock::new();
        let _first = clock.begin(7, Instant::now(), TTL);
        let pinned = clock.pinned().unwrap();
        assert!(pinned.is_valid());
        assert_eq!((pinned.lease(), pinned.generation()), (Some(7), 1));
        // A newer registration, even without the first one having been ended explicitly.
        let _second = clock.begin(8, Instant::now(), TTL);
        assert!(clock.is_valid());
        assert_eq!((clock.lease(), clock.generation()), (Some(8), 2));
        assert!(!pinned.is_valid());
        assert_eq!(pinned.lease(), None);
        assert!(pinned.pinned().is_none());
        assert!(pinned.ended().is_cancelled());
        // Renewing the new lease does not revive it either.
        clock.renewed(8, Instant::now(), TTL);
        clock.renewed(7, Instant::now(), TTL);
        assert!(!pinned.is_valid());
        let newer = clock.pinned().unwrap();
        assert!(newer.is_valid() && !newer.ended().is_cancelled());
    }

    #[test]
    fn an_ended_registration_is_never_renewed() {
        let clock = LeaseClock::new();
        let _released = clock.begin(7, Instant::now(), TTL);
        let pinned = clock.pinned().unwrap();
        clock.end();
        clock.renewed(7, Instant::now(), TTL);
        assert!(!clock.is_valid() && !pinned.is_valid());
        assert!(pinned.ended().is_cancelled() && clock.ended().is_cancelled());
    }

    #[test]
    fn the_registration_is_released_with_the_last_clock_pinned_to_it() {
        let clock = LeaseClock::new();
        let mut released = clock.begin(7, Instant::now(), TTL);
        let (task, cycle) = (clock.pinned().unwrap(), clock.pinned().unwrap());
        let task_copy = task.clone();
        clock.end();
        assert_eq!(released.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        drop((task, cycle));
        assert_eq!(released.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        drop(task_copy);
        assert_eq!(released.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        // The worker-wide clock holds none of it.
        let mut released = clock.begin(8, Instant::now(), TTL);
        clock.end();
        assert_eq!(released.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn only_leases_granted_to_this_process_are_its_own() {
        let clock = LeaseClock::new();
        clock.granted(7);
        let _released = clock.begin(7, Instant::now(), TTL);
        clock.end();
        clock.granted(8);
        assert!(clock.is_own(7) && clock.is_own(8));
        assert!(!clock.is_own(9) && !clock.is_own(0));
    }
}
