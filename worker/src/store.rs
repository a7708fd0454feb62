//! etcd: assignments in, cursors out. The narrow [`CursorStore`] trait and the etcd adapter.
//!
//! Ownership is fenced: a worker acts on a subscription in the name of an [`Ownership`] (the
//! assignment key's create revision and value as the worker read them). Every cursor write is
//! a transaction that commits only if the assignment key still has that create revision and
//! value; otherwise [`StoreError::Fenced`] tells the caller it no longer owns the subscription
//! and must stop.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream};
use herald_proto::etcd::{answer_too_large, scan_prefix};
use herald_proto::settings::{EtcdConfig, InvalidSetting};
use herald_proto::{
    Assignment, Cursor, Key, Keyspace, Rewind, SubscriptionId, SubscriptionRecord, SubscriptionSpec,
    SubscriptionState, WorkerId,
};

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The assignment this worker acted on is gone or changed: it is no longer the owner.
    #[error("subscription {0} is no longer assigned to this worker")]
    Fenced(SubscriptionId),
    /// etcd could not be reached or failed the request; retry.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// An etcd credential setting is unusable (e.g. a certificate file cannot be read).
    #[error("invalid configuration: {0}")]
    Settings(#[from] InvalidSetting),
    /// The worker's lease expired before it could be renewed.
    #[error("lease {0:x} expired")]
    LeaseExpired(i64),
    /// A stored value does not parse; someone wrote garbage under herald's prefix.
    #[error("bad value at {key}: {message}")]
    BadValue {
        /// The key.
        key: String,
        /// Why it does not parse.
        message: String,
    },
}

impl StoreError {
    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Etcd(_))
    }
}

/// The right to act on one subscription: the assignment as this worker read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The subscription.
    pub subscription_id: SubscriptionId,
    /// Create revision of the assignment key: the assignment's generation.
    pub generation: i64,
    /// The assignment value as read, compared byte for byte on every write.
    pub assignment_value: Vec<u8>,
}

/// Durable per-subscription progress.
pub trait CursorStore: Send + Sync + 'static {
    /// The stored cursor, if the subscription has made progress before.
    fn load_cursor(
        &self,
        id: &SubscriptionId,
    ) -> impl Future<Output = Result<Option<Cursor>, StoreError>> + Send;

    /// Stores `cursor` if `ownership` still holds.
    fn commit_cursor(
        &self,
        ownership: &Ownership,
        cursor: &Cursor,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Reads in one etcd transaction (etcd refuses more than 128 operations per transaction by
/// default).
const READS_PER_TXN: usize = 100;

/// herald's etcd adapter for the worker.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    keys: Keyspace,
}

impl EtcdStore {
    /// Connects (one attempt; the caller retries).
    pub async fn connect(config: &EtcdConfig, keys: Keyspace) -> Result<Self, StoreError> {
        let options = config
            .connect_options()?
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let mut client = Client::connect(&config.endpoints, Some(options)).await?;
        // connect() is lazy about the server; make sure it answers.
        client.status().await?;
        Ok(Self { client, keys })
    }

    /// All assignments of `worker` and the revision they were read at (paged: see
    /// [`herald_proto::etcd`]).
    pub async fn assignments_of(
        &self,
        worker: &WorkerId,
    ) -> Result<(BTreeMap<SubscriptionId, Ownership>, i64), StoreError> {
        let mut owned = BTreeMap::new();
        let revision = scan_prefix(&self.client, &self.keys.assignments_dir(), |kv| {
            if let Some(o) = self.ownership_from(worker, kv.key(), kv.value(), kv.create_revision()) {
                owned.insert(o.subscription_id.clone(), o);
            }
            true
        })
        .await?;
        Ok((owned, revision))
    }

    /// Parses an assignment key/value; `None` unless it assigns a subscription to `worker`.
    pub fn ownership_from(
        &self,
        worker: &WorkerId,
        key: &[u8],
        value: &[u8],
        create_revision: i64,
    ) -> Option<Ownership> {
        let key = std::str::from_utf8(key).ok()?;
        let Ok(Key::Assignment(id)) = self.keys.parse(key) else {
            tracing::warn!(key, "ignoring unparsable assignment key");
            return None;
        };
        let assignment: Assignment = match serde_json::from_slice(value) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring unparsable assignment value");
                return None;
            }
        };
        (assignment.worker_id == *worker).then(|| Ownership {
            subscription_id: id,
            generation: create_revision,
            assignment_value: value.to_vec(),
        })
    }

    /// Watches every assignment change after `revision`.
    pub async fn watch_assignments(&self, revision: i64) -> Result<WatchStream, StoreError> {
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        Ok(client.watch(self.keys.assignments_dir(), Some(options)).await?)
    }

    /// Claims the right to run `id` before starting its task: creates `<prefix>/owners/<id>`
    /// bound to this worker's lease, unless another worker still holds it (its task has not
    /// ended yet). Returns whether this worker holds it now.
    pub async fn claim(
        &self,
        id: &SubscriptionId,
        worker: &WorkerId,
        lease: i64,
    ) -> Result<bool, StoreError> {
        let key = self.keys.owner(id);
        let mut client = self.client.clone();
        let put =
            TxnOp::put(key.as_str(), worker.as_str(), Some(etcd_client::PutOptions::new().with_lease(lease)));
        let fresh = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([put.clone()]);
        if client.txn(fresh).await?.succeeded() {
            return Ok(true);
        }
        // Already ours (a restart of this worker): rebind it to the current lease.
        let ours = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, worker.as_str())])
            .and_then([put]);
        Ok(client.txn(ours).await?.succeeded())
    }

    /// Releases the claim on `id` after its task ended, if this worker holds it.
    pub async fn release(&self, id: &SubscriptionId, worker: &WorkerId) -> Result<(), StoreError> {
        let key = self.keys.owner(id);
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, worker.as_str())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.client.clone().txn(txn).await?;
        Ok(())
    }

    /// A handle on the etcd client (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The keyspace.
    pub fn keys(&self) -> &Keyspace {
        &self.keys
    }

    /// The records of `ids`, each with the revision it was read at (`None`: no such record,
    /// or one that does not parse), read [`READS_PER_TXN`] at a time: a worker reads the
    /// records of what it owns, never the whole prefix.
    pub async fn records_of(
        &self,
        ids: &[SubscriptionId],
    ) -> Result<Vec<(SubscriptionId, i64, Option<Versioned>)>, StoreError> {
        let mut read = Vec::with_capacity(ids.len());
        // Records are up to the API's body limit (64 KiB): a transaction whose answer exceeds
        // the client's 4 MiB is asked again in halves.
        let mut pending: Vec<&[SubscriptionId]> = ids.chunks(READS_PER_TXN).rev().collect();
        while let Some(chunk) = pending.pop() {
            let gets =
                chunk.iter().map(|id| TxnOp::get(self.keys.subscription(id), None)).collect::<Vec<_>>();
            let resp = match self.client.clone().txn(Txn::new().and_then(gets)).await {
                Ok(resp) => resp,
                Err(e) if chunk.len() > 1 && answer_too_large(&e) => {
                    let (first, second) = chunk.split_at(chunk.len() / 2);
                    pending.extend([second, first]);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let revision = resp.header().map_or(0, |h| h.revision());
            for (id, op) in chunk.iter().zip(resp.op_responses()) {
                let record = match op {
                    TxnOpResponse::Get(get) => get.kvs().first().and_then(|kv| {
                        self.record_from(kv.key(), kv.value(), kv.mod_revision(), kv.create_revision())
                    }),
                    _ => None,
                };
                read.push((id.clone(), revision, record.map(|(_, v)| v)));
            }
        }
        Ok(read)
    }

    /// Parses a subscription key/value; `None` (logged) when it does not parse.
    pub fn record_from(
        &self,
        key: &[u8],
        value: &[u8],
        mod_revision: i64,
        create_revision: i64,
    ) -> Option<(SubscriptionId, Versioned)> {
        let key = std::str::from_utf8(key).ok()?;
        let Ok(Key::Subscription(id)) = self.keys.parse(key) else {
            tracing::warn!(key, "ignoring unparsable subscription key");
            return None;
        };
        match serde_json::from_slice::<SubscriptionRecord>(value) {
            Ok(record) if record.spec.id == id => {
                Some((id, Versioned::new(record, mod_revision, create_revision)))
            }
            Ok(_) => {
                tracing::warn!(key, "ignoring subscription record whose id does not match its key");
                None
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring unparsable subscription record");
                None
            }
        }
    }

    /// Watches every subscription record change after `revision`.
    pub async fn watch_records(&self, revision: i64) -> Result<WatchStream, StoreError> {
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        Ok(client.watch(self.keys.subscriptions_dir(), Some(options)).await?)
    }
}

/// What a worker keeps of a subscription record, and the etcd revisions of its key.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// What the app registered, shared with the subscription's task.
    pub spec: Arc<SubscriptionSpec>,
    /// Whether it runs.
    pub state: SubscriptionState,
    /// The latest rewind request.
    pub rewind: Option<Rewind>,
    /// Its key's mod revision: changes with every pause, resume or rewind.
    pub mod_revision: i64,
    /// Its key's create revision: identifies this registration of the id.
    pub create_revision: i64,
}

impl Versioned {
    /// `record`, last modified at `mod_revision`, created at `create_revision`.
    pub fn new(record: SubscriptionRecord, mod_revision: i64, create_revision: i64) -> Self {
        let SubscriptionRecord { spec, state, rewind, created_at: _ } = record;
        Self { spec: Arc::new(spec), state, rewind, mod_revision, create_revision }
    }
}

impl CursorStore for EtcdStore {
    async fn load_cursor(&self, id: &SubscriptionId) -> Result<Option<Cursor>, StoreError> {
        let key = self.keys.cursor(id);
        let resp = self.client.clone().get(key.as_str(), None).await?;
        resp.kvs()
            .first()
            .map(|kv| {
                Cursor::decode(kv.value())
                    .map_err(|e| StoreError::BadValue { key: key.clone(), message: e.to_string() })
            })
            .transpose()
    }

    async fn commit_cursor(&self, ownership: &Ownership, cursor: &Cursor) -> Result<(), StoreError> {
        let assignment_key = self.keys.assignment(&ownership.subscription_id);
        let cursor_key = self.keys.cursor(&ownership.subscription_id);
        let value = cursor.encode();
        let txn = Txn::new()
            .when([
                Compare::create_revision(assignment_key.as_str(), CompareOp::Equal, ownership.generation),
                Compare::value(assignment_key.as_str(), CompareOp::Equal, ownership.assignment_value.clone()),
            ])
            .and_then([TxnOp::put(cursor_key, value, None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() { Ok(()) } else { Err(StoreError::Fenced(ownership.subscription_id.clone())) }
    }
}
