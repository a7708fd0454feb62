//! Runs one task per active subscription assigned to this worker, following etcd.
//!
//! Two inputs are followed, each by listing then watching from the listed revision (and listing
//! again on any watch failure or every resync interval): the assignments (which subscriptions
//! this worker owns, under which generation) and the subscription records (spec, pause state,
//! rewind requests). A task runs for every owned subscription whose record is active; its
//! identity is the ownership plus the record's revision, so a pause stops it, a resume starts it
//! from its cursor, a rewind restarts it (the new task applies the rewind), and a deletion or
//! revocation stops it. Each change is reconciled by [`plan`], a pure diff; a stopped task is
//! *joined* before its successor starts, so two tasks never act on one subscription at once.
//!
//! Each listing is made under one registration of the worker: the supervisor holds a clock
//! pinned to it ([`LeaseClock::pinned`]) and starts its tasks with that clock, and their
//! cancellation tokens are children of the registration's. When the registration ends (the
//! lease is lost), every task is cancelled with it; the supervisor joins them all, drops its
//! clock (which lets [`crate::membership::Membership`] register again) and lists again under the
//! next registration, so no task of an old lease survives and none is started from a listing
//! made before the new lease existed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::EventType;
use herald_proto::{ChainId, Key, SubscriptionId, SubscriptionState, WorkerId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ChainConfig;
use crate::endpoints::EndpointPool;
use crate::membership::LeaseClock;
use crate::metrics::Metrics;
use crate::pipeline::{Exit, SubscriptionTask};
use crate::publish::JetStreamSink;
use crate::records::OwnedRecords;
use crate::retry::{Backoff, pause, retry};
use crate::store::{EtcdStore, Ownership, Versioned};

/// How often assignments are re-listed even when the watch is healthy.
const RESYNC_INTERVAL: Duration = Duration::from_secs(15);
/// How long a graceful shutdown waits for tasks to finish their block range.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscription tasks of one worker starting (reading their cursor and subject) at once.
pub const CONCURRENT_STARTS: usize = 64;
/// How often tasks that ended or could not start are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// A chain this worker serves.
pub struct ChainHandle {
    /// Its endpoint.
    pub rpc: Arc<EndpointPool>,
    /// Its head, followed by one tracker for all its subscriptions.
    pub heads: crate::heads::Heads,
    /// Its shared fetch for the subscriptions at the head.
    pub live: Arc<crate::live::LiveLogs<EndpointPool>>,
    /// Its configuration.
    pub config: ChainConfig,
}

/// What [`plan`] decides.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Tasks to stop (revoked, or re-assigned under a new generation).
    pub stop: Vec<SubscriptionId>,
    /// Tasks to start.
    pub start: Vec<SubscriptionId>,
}

/// What a task is started for: the ownership it acts under and the revision of the record it
/// read. A change of either means a new task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskKey {
    /// The assignment.
    pub ownership: Ownership,
    /// Mod revision of the subscription record.
    pub record_revision: i64,
}

/// The tasks that should run: owned subscriptions whose record exists and is active. Pure.
pub fn desired_tasks(
    ownerships: &BTreeMap<SubscriptionId, Ownership>,
    records: &OwnedRecords,
) -> BTreeMap<SubscriptionId, TaskKey> {
    ownerships
        .iter()
        .filter_map(|(id, ownership)| {
            let versioned = records.get(id)?;
            (versioned.state == SubscriptionState::Active).then(|| {
                (
                    id.clone(),
                    TaskKey { ownership: ownership.clone(), record_revision: versioned.mod_revision },
                )
            })
        })
        .collect()
}

/// Diffs running tasks against desired ones. Pure.
pub fn plan<K: PartialEq>(
    running: &BTreeMap<SubscriptionId, K>,
    finished: &[SubscriptionId],
    desired: &BTreeMap<SubscriptionId, K>,
) -> Changes {
    let mut changes = Changes::default();
    for (id, ownership) in running {
        let keep = desired.get(id) == Some(ownership) && !finished.contains(id);
        if !keep {
            changes.stop.push(id.clone());
        }
    }
    for id in desired.keys() {
        if running.get(id) != desired.get(id) || finished.contains(id) {
            changes.start.push(id.clone());
        }
    }
    changes
}

struct Running {
    key: TaskKey,
    /// The registration it runs under.
    registration: u64,
    /// Stop at the next await (revocation).
    cancel: CancellationToken,
    /// Stop after the current block range (graceful shutdown).
    drain: CancellationToken,
    handle: JoinHandle<Exit>,
}

/// The worker's subscription supervisor.
pub struct Supervisor {
    /// This worker.
    pub worker_id: WorkerId,
    /// etcd, shared with every task (a clone of the client per task cost 3.7 KB each).
    pub store: Arc<EtcdStore>,
    /// JetStream.
    pub sink: Arc<JetStreamSink>,
    /// Served chains.
    pub chains: HashMap<ChainId, ChainHandle>,
    /// Metrics.
    pub metrics: Metrics,
    /// The worker's lease: no task starts without a valid one, and each task gets a clock
    /// pinned to the registration it starts under.
    pub lease: LeaseClock,
    /// How often a subscription whose blocks publish nothing commits its cursor.
    pub idle_commit_interval: std::time::Duration,
    /// How many tasks may be starting at once ([`CONCURRENT_STARTS`]).
    pub start_permits: Arc<tokio::sync::Semaphore>,
}

impl Supervisor {
    /// Runs until `cancel`, then stops and joins every task.
    pub async fn run(self, cancel: CancellationToken) {
        let mut running: BTreeMap<SubscriptionId, Running> = BTreeMap::new();
        // Assignments that can never run as they are (invalid spec, unserved chain): not
        // retried, and not logged again, until the record or the assignment changes.
        let mut unstartable: BTreeMap<SubscriptionId, TaskKey> = BTreeMap::new();
        let mut backoff = Backoff::network();
        'relist: while !cancel.is_cancelled() {
            // Nothing runs without a lease: wait for a registration, and list under it.
            let registration = loop {
                if let Some(registration) = self.lease.pinned() {
                    break registration;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break 'relist,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            };
            let ended = registration.ended();
            if running.values().any(|t| t.registration != registration.generation()) {
                // Only if the end of their registration went unseen between two listings.
                self.stop_all(&mut running).await;
            }
            let listed = async {
                let assignments =
                    retry("list assignments in etcd", &cancel, || self.store.assignments_of(&self.worker_id))
                        .await?;
                // Records are read for the owned subscriptions only (see `records`), and the
                // watch runs from the assignments' revision: whatever a read sees later is
                // newer than what the watch brings for it, and the read wins.
                let watches = futures::future::try_join(
                    self.store.watch_assignments(assignments.1),
                    self.store.watch_records(assignments.1),
                )
                .await;
                Some((assignments.0, OwnedRecords::default(), watches))
            };
            let listed = tokio::select! {
                _ = ended.cancelled() => {
                    self.stop_all(&mut running).await;
                    continue 'relist;
                }
                listed = listed => listed,
            };
            let Some((mut ownerships, mut records, watches)) = listed else {
                break;
            };
            self.reconcile(&registration, &mut running, &mut unstartable, &ownerships, &mut records).await;
            let (mut assignment_watch, mut record_watch) = match watches {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch etcd, relisting");
                    if !pause(&mut backoff, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            let resync = tokio::time::sleep(RESYNC_INTERVAL);
            tokio::pin!(resync);
            // Tasks that ended (fenced, failed) or could not start (no lease) are retried here.
            let mut retry_tick = tokio::time::interval(RETRY_INTERVAL);
            loop {
                let response = tokio::select! {
                    // Shutdown and the end of the registration come before any other work.
                    biased;
                    _ = cancel.cancelled() => break 'relist,
                    _ = ended.cancelled() => {
                        self.stop_all(&mut running).await;
                        continue 'relist;
                    }
                    _ = &mut resync => continue 'relist,
                    _ = retry_tick.tick() => {
                        self.reconcile(&registration, &mut running, &mut unstartable, &ownerships, &mut records).await;
                        continue;
                    }
                    m = assignment_watch.message() => m,
                    m = record_watch.message() => m,
                };
                let response = match response {
                    Ok(Some(r)) if !r.canceled() => r,
                    Ok(_) => {
                        tracing::info!("etcd watch ended, relisting");
                        if !pause(&mut backoff, &cancel).await {
                            break 'relist;
                        }
                        continue 'relist;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd watch failed, relisting");
                        if !pause(&mut backoff, &cancel).await {
                            break 'relist;
                        }
                        continue 'relist;
                    }
                };
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    let put = event.event_type() == EventType::Put;
                    match self.store.keys().parse(key) {
                        Ok(Key::Assignment(id)) => {
                            let mine = put
                                .then(|| {
                                    self.store.ownership_from(
                                        &self.worker_id,
                                        kv.key(),
                                        kv.value(),
                                        kv.create_revision(),
                                    )
                                })
                                .flatten();
                            match mine {
                                Some(o) => ownerships.insert(id, o),
                                None => ownerships.remove(&id),
                            };
                        }
                        Ok(Key::Subscription(id)) => {
                            let record = put
                                .then(|| {
                                    self.store.record_from(
                                        kv.key(),
                                        kv.value(),
                                        kv.mod_revision(),
                                        kv.create_revision(),
                                    )
                                })
                                .flatten();
                            records.changed(&id, kv.mod_revision(), record.map(|(_, r)| r));
                        }
                        _ => {}
                    }
                }
                self.reconcile(&registration, &mut running, &mut unstartable, &ownerships, &mut records)
                    .await;
            }
        }
        // Graceful: every task finishes its block range and commits, then stops. Whatever has
        // not drained by the deadline is stopped at once (its range is replayed by the next
        // owner and deduplicated).
        tracing::info!(tasks = running.len(), "draining subscription tasks");
        for task in running.values() {
            task.drain.cancel();
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        for (id, mut task) in running {
            if tokio::time::timeout_at(deadline, &mut task.handle).await.is_err() {
                tracing::warn!(subscription_id = %id, "did not drain in time; stopping it");
                task.cancel.cancel();
                let _ = task.handle.await;
            }
            self.release(&id).await;
        }
        self.metrics.assigned_subscriptions.set(0);
    }

    /// Cancels and joins every task: their registration ended (the lease is lost), or they run
    /// under an older one. Their owner keys are bound to that lease, which goes with it.
    async fn stop_all(&self, running: &mut BTreeMap<SubscriptionId, Running>) {
        tracing::info!(tasks = running.len(), "lease lost; stopping every subscription task");
        for task in running.values() {
            task.cancel.cancel();
        }
        futures::future::join_all(std::mem::take(running).into_values().map(|t| t.handle)).await;
        self.metrics.assigned_subscriptions.set(0);
    }

    async fn reconcile(
        &self,
        registration: &LeaseClock,
        running: &mut BTreeMap<SubscriptionId, Running>,
        unstartable: &mut BTreeMap<SubscriptionId, TaskKey>,
        ownerships: &BTreeMap<SubscriptionId, Ownership>,
        records: &mut OwnedRecords,
    ) {
        self.read_records(ownerships, records).await;
        let desired = desired_tasks(ownerships, records);
        let current: BTreeMap<_, _> = running.iter().map(|(id, r)| (id.clone(), r.key.clone())).collect();
        let finished: Vec<_> =
            running.iter().filter(|(_, r)| r.handle.is_finished()).map(|(id, _)| id.clone()).collect();
        let changes = plan(&current, &finished, &desired);
        // Cancel every stopping task first, then join them together: stops overlap instead of
        // adding up, and no successor starts before its predecessor has ended.
        let stopping: Vec<(SubscriptionId, Running)> =
            changes.stop.iter().filter_map(|id| running.remove(id).map(|t| (id.clone(), t))).collect();
        for (id, task) in &stopping {
            tracing::info!(subscription_id = %id, "stopping subscription task");
            task.cancel.cancel();
        }
        let ids: Vec<SubscriptionId> = stopping.iter().map(|(id, _)| id.clone()).collect();
        futures::future::join_all(stopping.into_iter().map(|(_, t)| t.handle)).await;
        // Only now, with the task ended, may another worker take the subscription over.
        for id in ids.iter().filter(|id| !changes.start.contains(id)) {
            self.release(id).await;
        }
        unstartable.retain(|id, key| desired.get(id) == Some(key));
        for id in changes.start {
            let key = desired[&id].clone();
            if unstartable.contains_key(&id) {
                continue;
            }
            let Some(record) = records.get(&id) else { continue };
            match self.spawn(registration, key.clone(), record).await {
                Start::Running(task) => {
                    running.insert(id, task);
                }
                Start::Later => {}
                Start::Never => {
                    unstartable.insert(id, key);
                }
            }
        }
        self.metrics.assigned_subscriptions.set(running.len() as i64);
    }

    /// Forgets the records of subscriptions no longer owned and reads those of newly owned
    /// ones. One attempt: what is not read now is read at the next reconciliation (at most
    /// [`RETRY_INTERVAL`] later).
    async fn read_records(
        &self,
        ownerships: &BTreeMap<SubscriptionId, Ownership>,
        records: &mut OwnedRecords,
    ) {
        records.retain_owned(ownerships);
        let missing = records.missing(ownerships);
        if missing.is_empty() {
            return;
        }
        match self.store.records_of(&missing).await {
            Ok(read) => {
                for (id, revision, record) in read {
                    records.read(id, revision, record);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, missing = missing.len(), "cannot read subscription records; retrying");
            }
        }
    }

    async fn release(&self, id: &SubscriptionId) {
        if let Err(e) = self.store.release(id, &self.worker_id).await {
            // The claim is bound to this worker's lease: at worst it goes with the lease.
            tracing::warn!(subscription_id = %id, error = %e, "cannot release the subscription's owner key");
        }
    }

    /// Starts the task of `key` under `registration` (the clock pinned for this listing).
    async fn spawn(&self, registration: &LeaseClock, key: TaskKey, versioned: &Versioned) -> Start {
        let id = key.ownership.subscription_id.clone();
        let spec = versioned.spec.clone();
        let event = match spec.compile() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(subscription_id = %id, error = %e, "subscription spec is invalid; not running it");
                return Start::Never;
            }
        };
        let Some(chain) = self.chains.get(&spec.chain_id) else {
            tracing::error!(subscription_id = %id, chain_id = spec.chain_id, "assigned a subscription on a chain this worker does not serve");
            return Start::Never;
        };
        let Some((clock, lease)) = registration.pinned().zip(registration.lease()) else {
            tracing::info!(subscription_id = %id, "not starting: the lease is not valid");
            return Start::Later;
        };
        match self.store.claim(&id, &self.worker_id, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(subscription_id = %id, "not starting yet: the previous owner has not released it");
                return Start::Later;
            }
            Err(e) => {
                tracing::warn!(subscription_id = %id, error = %e, "cannot claim the subscription; retrying");
                return Start::Later;
            }
        }
        let task = SubscriptionTask {
            chain: chain.rpc.clone(),
            heads: chain.heads.clone(),
            live: Some(chain.live.clone()),
            sink: self.sink.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            series: self.metrics.subscription(spec.chain_id, &id),
            ownership: key.ownership.clone(),
            event: Arc::new(event),
            rewind: versioned.rewind,
            registration: u64::try_from(versioned.create_revision).unwrap_or_default(),
            lease: clock.clone(),
            poll_interval: chain.config.poll_interval,
            max_block_range: chain.config.max_block_range,
            idle_commit_interval: self.idle_commit_interval,
            start_permits: self.start_permits.clone(),
            spec,
        };
        // Independent of the shutdown token: shutdown drains. Revocation cancels this task
        // alone, the end of its registration (a lost lease) every task started under it.
        let (child, drain) = (clock.ended().child_token(), CancellationToken::new());
        let registration = clock.generation();
        let span = tracing::info_span!("subscription", worker_id = %self.worker_id, subscription_id = %id, chain_id = chain.config.chain_id, generation = key.ownership.generation, registration);
        let handle = tokio::spawn(task.run(child.clone(), drain.clone()).instrument(span));
        Start::Running(Running { key, registration, cancel: child, drain, handle })
    }
}

/// What starting an assigned subscription came to.
enum Start {
    /// Its task runs.
    Running(Running),
    /// Not now (no lease yet, the previous owner still holds it): retried shortly.
    Later,
    /// Never as it is (invalid spec, a chain this worker does not serve): retried only when
    /// its record or assignment changes.
    Never,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(id: &str, generation: i64) -> (SubscriptionId, Ownership) {
        let id = SubscriptionId::new(id).unwrap();
        (id.clone(), Ownership { subscription_id: id, generation, assignment_value: b"{}".to_vec() })
    }

    fn ids(v: &[&str]) -> Vec<SubscriptionId> {
        v.iter().map(|s| SubscriptionId::new(*s).unwrap()).collect()
    }

    fn versioned(id: &str, state: SubscriptionState, mod_revision: i64) -> (SubscriptionId, Versioned) {
        let spec: herald_proto::SubscriptionSpec = serde_json::from_value(serde_json::json!({
            "id": id, "chain_id": 1, "address": "0x1111111111111111111111111111111111111111",
            "event": "event E(uint256 x)",
        }))
        .unwrap();
        let mut record = herald_proto::SubscriptionRecord::new(spec, 0);
        record.state = state;
        (SubscriptionId::new(id).unwrap(), Versioned::new(record, mod_revision, 1))
    }

    fn records(v: &[(SubscriptionId, Versioned)]) -> OwnedRecords {
        let mut records = OwnedRecords::default();
        for (id, versioned) in v {
            records.read(id.clone(), versioned.mod_revision, Some(versioned.clone()));
        }
        records
    }

    #[test]
    fn only_owned_active_recorded_subscriptions_run() {
        let ownerships: BTreeMap<_, _> = [own("a", 1), own("b", 2), own("c", 3)].into();
        let records = records(&[
            versioned("a", SubscriptionState::Active, 10),
            versioned("b", SubscriptionState::Paused, 11),
            versioned("z", SubscriptionState::Active, 12),
        ]);
        let desired = desired_tasks(&ownerships, &records);
        assert_eq!(desired.keys().cloned().collect::<Vec<_>>(), ids(&["a"]));
        assert_eq!(desired[&ids(&["a"])[0]].record_revision, 10);
    }

    #[test]
    fn a_record_change_restarts_the_task() {
        let ownerships: BTreeMap<_, _> = [own("a", 1)].into();
        let before = desired_tasks(&ownerships, &records(&[versioned("a", SubscriptionState::Active, 10)]));
        let after = desired_tasks(&ownerships, &records(&[versioned("a", SubscriptionState::Active, 14)]));
        let changes = plan(&before, &[], &after);
        assert_eq!((changes.stop, changes.start), (ids(&["a"]), ids(&["a"])));
    }

    #[test]
    fn empty_diff_changes_nothing() {
        let m: BTreeMap<_, _> = [own("a", 1), own("b", 2)].into();
        assert_eq!(plan(&m, &[], &m), Changes::default());
    }

    #[test]
    fn revoked_stop_new_start_regenerated_restart() {
        let running: BTreeMap<_, _> = [own("a", 1), own("b", 2), own("c", 3)].into();
        let desired: BTreeMap<_, _> = [own("b", 2), own("c", 9), own("d", 4)].into();
        let changes = plan(&running, &[], &desired);
        assert_eq!(changes.stop, ids(&["a", "c"]));
        assert_eq!(changes.start, ids(&["c", "d"]));
    }

    #[test]
    fn finished_tasks_that_are_still_assigned_restart() {
        let running: BTreeMap<_, _> = [own("a", 1)].into();
        let changes = plan(&running, &ids(&["a"]), &running);
        assert_eq!(changes.stop, ids(&["a"]));
        assert_eq!(changes.start, ids(&["a"]));
    }
}
