//! The registry: herald's cluster state in etcd, as the coordinator reads and writes it.
//!
//! Every write that has a precondition is a transaction: a create checks that neither the id
//! nor the fingerprint (same chain + contract + event + filters) exists; a record update is a
//! compare-and-swap on the record's mod revision; a delete removes record, assignment, cursor
//! and fingerprint at once (so a worker's in-flight cursor write fails its fence); an
//! assignment is only written where none exists, bound to the worker's lease.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp};
use herald_proto::settings::{EtcdConfig, InvalidSetting};
use herald_proto::{
    Assignment, Cursor, Key, Keyspace, SubscriptionId, SubscriptionRecord, WorkerId, WorkerInfo,
};

use crate::election::LeaderFence;

/// A failed registry operation.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A subscription with this id exists.
    #[error("subscription {0} already exists")]
    IdExists(SubscriptionId),
    /// Another subscription already matches the same logs.
    #[error("subscription {0} already subscribes to the same chain, contract, event and filters")]
    Duplicate(String),
    /// Another subscription already publishes to this subject.
    #[error("subscription {0} already publishes to this subject")]
    SubjectTaken(String),
    /// No such subscription.
    #[error("subscription {0} not found")]
    NotFound(SubscriptionId),
    /// etcd failed or is unreachable.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// An etcd credential setting is unusable (e.g. a certificate file cannot be read).
    #[error("invalid configuration: {0}")]
    Settings(#[from] InvalidSetting),
    /// A key kept changing under a compare-and-swap; the request may be retried.
    #[error("{0} kept changing; retry")]
    Contended(String),
    /// A stored value does not parse.
    #[error("bad value at {key}: {message}")]
    BadValue {
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
}

/// A record with its mod revision.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// The record.
    pub record: SubscriptionRecord,
    /// Mod revision of its key.
    pub mod_revision: i64,
}

/// A live worker and its lease.
#[derive(Debug, Clone)]
pub struct LiveWorker {
    /// Its registration.
    pub info: WorkerInfo,
    /// The lease its key (and its assignments) are bound to.
    pub lease: i64,
}

/// Assignments (or revocations) written in one etcd transaction, each a nested transaction:
/// etcd refuses more than 128 operations per transaction by default (`--max-txn-ops`).
const TXN_BATCH: usize = 100;

/// What an etcd member reports about itself.
#[derive(Debug, Clone, Copy)]
pub struct EtcdStatus {
    /// The store's current revision.
    pub revision: i64,
    /// Size of the database file, in bytes.
    pub db_size: i64,
    /// Bytes of it in use (the rest is free pages, reclaimed by a defragmentation).
    pub db_size_in_use: i64,
    /// The member's quota (`--quota-backend-bytes`), where reported (etcd 3.6+); else 0.
    pub quota: i64,
}

/// The etcd adapter.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    keys: Keyspace,
}

use herald_proto::etcd::{key_after as key_after_bytes, prefix_end};

/// The first key after `key`.
fn key_after(key: &str) -> Vec<u8> {
    key_after_bytes(key.as_bytes())
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(value)
        .map_err(|e| RegistryError::BadValue { key: key.to_owned(), message: e.to_string() })
}

impl Registry {
    /// Connects (one attempt; the caller retries).
    pub async fn connect(config: &EtcdConfig, keys: Keyspace) -> Result<Self, RegistryError> {
        let options = config
            .connect_options()?
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout);
        let mut client = Client::connect(&config.endpoints, Some(options)).await?;
        client.status().await?;
        Ok(Self { client, keys })
    }

    /// Whether etcd answers.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        self.client.clone().status().await?;
        Ok(())
    }

    /// The state of the etcd member this replica talks to.
    pub async fn status(&self) -> Result<EtcdStatus, RegistryError> {
        let status = self.client.clone().status().await?;
        Ok(EtcdStatus {
            revision: status.header().map_or(0, |h| h.revision()),
            db_size: status.db_size(),
            db_size_in_use: status.raft_used_db_size(),
            quota: status.db_size_quota(),
        })
    }

    /// Compacts etcd's history up to `revision` (see [`crate::maintenance`]).
    pub async fn compact(&self, revision: i64) -> Result<(), RegistryError> {
        self.client.clone().compact(revision, None).await?;
        Ok(())
    }

    /// The keyspace.
    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    /// Stores a new subscription with its fingerprint and subject claim, unless the id, the
    /// fingerprint or the subject is taken.
    pub async fn create(&self, record: &SubscriptionRecord, fingerprint: &str) -> Result<(), RegistryError> {
        let id = &record.spec.id;
        let key = self.keys.subscription(id);
        let fp_key = self.keys.fingerprint(fingerprint);
        let subject_key = self.keys.fingerprint(&record.spec.subject_fingerprint());
        let value = serde_json::to_vec(record).expect("records serialise");
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(fp_key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(subject_key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(key.as_str(), value, None),
                TxnOp::put(fp_key.as_str(), id.as_str(), None),
                TxnOp::put(subject_key.as_str(), id.as_str(), None),
            ]);
        let mut client = self.client.clone();
        if client.txn(txn).await?.succeeded() {
            return Ok(());
        }
        if client.get(key.as_str(), None).await?.count() > 0 {
            return Err(RegistryError::IdExists(id.clone()));
        }
        let holder = |resp: etcd_client::GetResponse| {
            resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        };
        if let Some(other) = holder(client.get(fp_key.as_str(), None).await?) {
            return Err(RegistryError::Duplicate(other));
        }
        Err(RegistryError::SubjectTaken(
            holder(client.get(subject_key.as_str(), None).await?).unwrap_or_default(),
        ))
    }

    /// One subscription.
    pub async fn get(&self, id: &SubscriptionId) -> Result<Option<StoredRecord>, RegistryError> {
        let key = self.keys.subscription(id);
        let resp = self.client.clone().get(key.as_str(), None).await?;
        resp.kvs()
            .first()
            .map(|kv| Ok(StoredRecord { record: parse(&key, kv.value())?, mod_revision: kv.mod_revision() }))
            .transpose()
    }

    /// Every subscription, by id (read a page at a time, see [`Self::scan`]).
    pub async fn list(&self) -> Result<BTreeMap<SubscriptionId, StoredRecord>, RegistryError> {
        let mut out = BTreeMap::new();
        let dir = self.keys.subscriptions_dir();
        self.scan(dir.as_bytes().to_vec(), prefix_end(&dir), |kv| {
            if let Some((id, stored)) = self.record_of(kv) {
                out.insert(id, stored);
            }
            true
        })
        .await?;
        Ok(out)
    }

    /// One page of subscriptions in id order: those with an id after `after` (any text; the
    /// first page without it) that `keep` accepts, at most `limit`, and whether more follow.
    /// Reads only as far as the page needs, a page of keys at a time.
    pub async fn list_page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&StoredRecord) -> bool,
    ) -> Result<(Vec<(SubscriptionId, StoredRecord)>, bool), RegistryError> {
        let dir = self.keys.subscriptions_dir();
        let start = match after {
            Some(after) => key_after(&format!("{dir}{after}")),
            None => dir.as_bytes().to_vec(),
        };
        let mut page = Vec::new();
        let mut more = false;
        self.scan(start, prefix_end(&dir), |kv| {
            let Some((id, stored)) = self.record_of(kv) else { return true };
            if !keep(&stored) {
                return true;
            }
            if page.len() == limit {
                more = true;
                return false;
            }
            page.push((id, stored));
            true
        })
        .await?;
        Ok((page, more))
    }

    /// The assignment and cursor of each of `ids` (sorted, as a page is): two ranged reads
    /// over the page's span, a page of keys at a time, instead of the whole keyspace.
    pub async fn statuses(
        &self,
        ids: &[SubscriptionId],
    ) -> Result<BTreeMap<SubscriptionId, (Option<WorkerId>, Option<Cursor>)>, RegistryError> {
        let mut out: BTreeMap<SubscriptionId, (Option<WorkerId>, Option<Cursor>)> =
            ids.iter().map(|id| (id.clone(), (None, None))).collect();
        let (Some(first), Some(last)) = (ids.first(), ids.last()) else { return Ok(out) };
        let span = |key: fn(&Keyspace, &SubscriptionId) -> String| {
            (key(&self.keys, first).into_bytes(), key_after(&key(&self.keys, last)))
        };
        let (start, end) = span(Keyspace::assignment);
        self.scan(start, end, |kv| {
            if let Ok(key) = kv.key_str()
                && let Ok(Key::Assignment(id)) = self.keys.parse(key)
                && let Some(slot) = out.get_mut(&id)
            {
                slot.0 = parse::<Assignment>(key, kv.value()).ok().map(|a| a.worker_id);
            }
            true
        })
        .await?;
        let (start, end) = span(Keyspace::cursor);
        self.scan(start, end, |kv| {
            if let Ok(key) = kv.key_str()
                && let Ok(Key::Cursor(id)) = self.keys.parse(key)
                && let Some(slot) = out.get_mut(&id)
            {
                slot.1 = Cursor::decode(kv.value()).ok();
            }
            true
        })
        .await?;
        Ok(out)
    }

    /// A subscription record key's id and record; `None` (logged) if it does not parse.
    fn record_of(&self, kv: &KeyValue) -> Option<(SubscriptionId, StoredRecord)> {
        let key = kv.key_str().ok()?;
        let Ok(Key::Subscription(id)) = self.keys.parse(key) else { return None };
        match parse::<SubscriptionRecord>(key, kv.value()) {
            Ok(record) => Some((id, StoredRecord { record, mod_revision: kv.mod_revision() })),
            Err(e) => {
                tracing::warn!(error = %e, "skipping unreadable subscription record");
                None
            }
        }
    }

    /// Visits the keys of `[start, end)` in order until `visit` returns `false`, a page at a
    /// time at one revision ([`herald_proto::etcd::scan`]).
    async fn scan(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        visit: impl FnMut(&KeyValue) -> bool,
    ) -> Result<(), RegistryError> {
        herald_proto::etcd::scan(&self.client, start, end, visit).await?;
        Ok(())
    }

    /// Applies `change` to a record with compare-and-swap, retrying on concurrent updates.
    pub async fn update(
        &self,
        id: &SubscriptionId,
        change: impl Fn(&mut SubscriptionRecord),
    ) -> Result<StoredRecord, RegistryError> {
        let key = self.keys.subscription(id);
        let mut client = self.client.clone();
        loop {
            let Some(current) = self.get(id).await? else { return Err(RegistryError::NotFound(id.clone())) };
            let mut record = current.record.clone();
            change(&mut record);
            if record == current.record {
                return Ok(current);
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, current.mod_revision)])
                .and_then([TxnOp::put(key.as_str(), serde_json::to_vec(&record).expect("serialises"), None)]);
            let resp = client.txn(txn).await?;
            if resp.succeeded() {
                let revision = resp.header().map_or(current.mod_revision, |h| h.revision());
                return Ok(StoredRecord { record, mod_revision: revision });
            }
        }
    }

    /// Deletes a subscription with its assignment, cursor and fingerprint, atomically, if its
    /// record is still at `revision` (when given): a concurrent delete-and-recreate is not
    /// mistaken for this one.
    pub async fn delete(
        &self,
        id: &SubscriptionId,
        fingerprint: Option<&str>,
        subject_fingerprint: Option<&str>,
        revision: Option<i64>,
    ) -> Result<(), RegistryError> {
        let key = self.keys.subscription(id);
        let guard = match revision {
            Some(r) => Compare::mod_revision(key.as_str(), CompareOp::Equal, r),
            None => Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
        };
        let mut ops = vec![
            TxnOp::delete(key.as_str(), None),
            TxnOp::delete(self.keys.assignment(id), None),
            TxnOp::delete(self.keys.cursor(id), None),
        ];
        if let Some(fingerprint) = fingerprint {
            ops.push(TxnOp::delete(self.keys.fingerprint(fingerprint), None));
        }
        if let Some(subject) = subject_fingerprint {
            ops.push(TxnOp::delete(self.keys.fingerprint(subject), None));
        }
        if self.client.clone().txn(Txn::new().when([guard]).and_then(ops)).await?.succeeded() {
            Ok(())
        } else {
            Err(RegistryError::NotFound(id.clone()))
        }
    }

    /// Every assignment: subscription -> worker (read a page at a time).
    pub async fn assignments(&self) -> Result<BTreeMap<SubscriptionId, WorkerId>, RegistryError> {
        let mut out = BTreeMap::new();
        let dir = self.keys.assignments_dir();
        self.scan(dir.as_bytes().to_vec(), prefix_end(&dir), |kv| {
            if let Ok(key) = kv.key_str()
                && let Ok(Key::Assignment(id)) = self.keys.parse(key)
                && let Ok(a) = parse::<Assignment>(key, kv.value())
            {
                out.insert(id, a.worker_id);
            }
            true
        })
        .await?;
        Ok(out)
    }

    /// One subscription's assignment and cursor.
    pub async fn status_of(
        &self,
        id: &SubscriptionId,
    ) -> Result<(Option<WorkerId>, Option<Cursor>), RegistryError> {
        let mut client = self.client.clone();
        let a_key = self.keys.assignment(id);
        let c_key = self.keys.cursor(id);
        let a = client.get(a_key.as_str(), None).await?;
        let c = client.get(c_key.as_str(), None).await?;
        let worker =
            a.kvs().first().and_then(|kv| parse::<Assignment>(&a_key, kv.value()).ok()).map(|a| a.worker_id);
        let cursor = c.kvs().first().and_then(|kv| Cursor::decode(kv.value()).ok());
        Ok((worker, cursor))
    }

    /// Every live worker (registered under a lease), read a page at a time.
    pub async fn workers(&self) -> Result<Vec<LiveWorker>, RegistryError> {
        let mut out = Vec::new();
        let dir = self.keys.workers_dir();
        self.scan(dir.as_bytes().to_vec(), prefix_end(&dir), |kv| {
            let Ok(key) = kv.key_str() else { return true };
            let Ok(Key::Worker(_)) = self.keys.parse(key) else { return true };
            match parse::<WorkerInfo>(key, kv.value()) {
                Ok(info) => out.push(LiveWorker { info, lease: kv.lease() }),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable worker registration"),
            }
            true
        })
        .await?;
        Ok(out)
    }

    /// Seconds since a lease was last renewed, from its remaining TTL.
    pub async fn seconds_since_renewal(&self, lease: i64) -> Result<Option<i64>, RegistryError> {
        let resp = self.client.clone().lease_time_to_live(lease, None).await?;
        Ok((resp.ttl() > 0).then(|| resp.granted_ttl() - resp.ttl()))
    }

    /// Removes each assignment of `revokes` that still names its worker, while `fence`'s term
    /// of leadership holds: one transaction per [`TXN_BATCH`] of them, each removal a nested
    /// transaction with its own condition. Returns how many were removed.
    pub async fn revoke(
        &self,
        revokes: &[(SubscriptionId, WorkerId)],
        fence: &LeaderFence,
    ) -> Result<usize, RegistryError> {
        let mut revoked = 0;
        for batch in revokes.chunks(TXN_BATCH) {
            let ops = batch.iter().map(|(id, worker)| {
                let key = self.keys.assignment(id);
                let value =
                    serde_json::to_vec(&Assignment { worker_id: worker.clone() }).expect("serialises");
                Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, value)])
                    .and_then([TxnOp::delete(key.as_str(), None)])
            });
            revoked += self.fenced_batch(ops, fence).await?.into_iter().filter(|done| *done).count();
        }
        Ok(revoked)
    }

    /// Runs `txns` nested in one transaction conditioned on `fence`: whether each one's
    /// condition held (all `false` when the term is over).
    async fn fenced_batch(
        &self,
        txns: impl IntoIterator<Item = Txn>,
        fence: &LeaderFence,
    ) -> Result<Vec<bool>, RegistryError> {
        let txns: Vec<Txn> = txns.into_iter().collect();
        let count = txns.len();
        let outer =
            Txn::new().when([fence.compare()]).and_then(txns.into_iter().map(TxnOp::txn).collect::<Vec<_>>());
        let resp = self.client.clone().txn(outer).await?;
        if !resp.succeeded() {
            return Ok(vec![false; count]);
        }
        Ok(resp
            .op_responses()
            .into_iter()
            .map(|r| matches!(r, etcd_client::TxnOpResponse::Txn(inner) if inner.succeeded()))
            .collect())
    }

    /// Who holds each subscription's owner key (the worker whose task runs it), read a page
    /// at a time.
    pub async fn owners(&self) -> Result<BTreeMap<SubscriptionId, Vec<u8>>, RegistryError> {
        let mut out = BTreeMap::new();
        let dir = self.keys.owners_dir();
        self.scan(dir.as_bytes().to_vec(), prefix_end(&dir), |kv| {
            if let Ok(key) = kv.key_str()
                && let Ok(Key::Owner(id)) = self.keys.parse(key)
            {
                out.insert(id, kv.value().to_vec());
            }
            true
        })
        .await?;
        Ok(out)
    }

    /// Asks a live worker to drain and exit: a key naming the lease of the worker's current
    /// registration (in hex, as `etcdctl` prints it), written only while the registration key
    /// still has that lease. The worker obeys only a request naming a lease it registered with,
    /// so it never reaches a later process with the same worker id.
    ///
    /// The key is deliberately *not* bound to that lease: a worker that loses its lease right
    /// after the request (an etcd blip, a pause) registers again under a new one, and a key
    /// bound to the old lease would vanish with it before the worker saw it. The request was
    /// answered 202; it must still reach the process. The worker deletes it when it ends (and
    /// a later process with the id deletes one it finds that is not its own). Returns whether
    /// the worker is live.
    pub async fn request_drain(&self, worker: &WorkerId) -> Result<bool, RegistryError> {
        let registration = self.keys.worker(worker);
        let mut client = self.client.clone();
        // The worker may register again between the read and the write: read again then.
        for _ in 0..3 {
            let current = client.get(registration.as_str(), None).await?;
            let Some(lease) = current.kvs().first().map(|kv| kv.lease()).filter(|lease| *lease != 0) else {
                return Ok(false);
            };
            let txn = Txn::new()
                .when([Compare::lease(registration.as_str(), CompareOp::Equal, lease)])
                .and_then([TxnOp::put(self.keys.drain(worker), format!("{lease:x}"), None)]);
            if client.txn(txn).await?.succeeded() {
                return Ok(true);
            }
        }
        Err(RegistryError::Contended(format!("the registration of worker {worker}")))
    }

    /// A handle on the etcd client (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Assigns each subscription of `assigns` to its worker, bound to the worker's lease, if it
    /// is unassigned and still exists, while `fence`'s term holds: one transaction per
    /// [`TXN_BATCH`], each assignment a nested transaction with its own conditions. Returns
    /// whether each was written.
    ///
    /// The previous owner must have released the subscription (its owner key is gone: its task
    /// ended, or its lease expired), unless the owner key names this worker: `owners` is what
    /// [`Self::owners`] read, and each write compares the owner key with it.
    pub async fn assign(
        &self,
        assigns: &[(SubscriptionId, &LiveWorker)],
        owners: &BTreeMap<SubscriptionId, Vec<u8>>,
        fence: &LeaderFence,
    ) -> Result<Vec<bool>, RegistryError> {
        let mut written = Vec::with_capacity(assigns.len());
        for batch in assigns.chunks(TXN_BATCH) {
            let mut txns = Vec::with_capacity(batch.len());
            let mut slots = Vec::with_capacity(batch.len());
            for (id, worker) in batch {
                let owner = self.keys.owner(id);
                let owner_guard = match owners.get(id) {
                    None => Compare::create_revision(owner.as_str(), CompareOp::Equal, 0),
                    Some(held) if held.as_slice() == worker.info.worker_id.as_str().as_bytes() => {
                        Compare::value(owner.as_str(), CompareOp::Equal, held.clone())
                    }
                    // Still held by another worker: its task has not ended yet.
                    Some(_) => {
                        slots.push(None);
                        continue;
                    }
                };
                let key = self.keys.assignment(id);
                let value = serde_json::to_vec(&Assignment { worker_id: worker.info.worker_id.clone() })
                    .expect("serialises");
                slots.push(Some(txns.len()));
                txns.push(
                    Txn::new()
                        .when([
                            Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                            Compare::create_revision(self.keys.subscription(id), CompareOp::Greater, 0),
                            owner_guard,
                        ])
                        .and_then([TxnOp::put(
                            key.as_str(),
                            value,
                            Some(PutOptions::new().with_lease(worker.lease)),
                        )]),
                );
            }
            let done = if txns.is_empty() { Vec::new() } else { self.fenced_batch(txns, fence).await? };
            written.extend(
                slots.into_iter().map(|slot| slot.is_some_and(|i| done.get(i).copied().unwrap_or(false))),
            );
        }
        Ok(written)
    }
}
