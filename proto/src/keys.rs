//! The etcd key layout.
//!
//! All of herald's state lives under one configurable prefix (default `/herald`), so several
//! herald clusters can share an etcd and an operator can list everything with one range read:
//!
//! | key                                   | value                  | written by            |
//! |---------------------------------------|------------------------|-----------------------|
//! | `<prefix>/subscriptions/<id>`         | `SubscriptionSpec`     | coordinator (API)     |
//! | `<prefix>/workers/<worker_id>`        | worker registration    | worker, leased        |
//! | `<prefix>/assignments/<id>`           | `Assignment`           | coordinator leader    |
//! | `<prefix>/cursors/<id>`               | `Cursor`               | owning worker (fenced)|
//! | `<prefix>/coordinator/leader`         | leader identity        | coordinator election  |
//! | `<prefix>/fingerprints/<hex>`         | subscription id        | coordinator (API)     |
//! | `<prefix>/drains/<worker_id>`         | lease id (hex), no lease | coordinator (API)   |
//! | `<prefix>/owners/<id>`                | worker id, its lease   | the running worker    |
//!
//! A fingerprint key makes "the same chain + address + event + filters registered twice"
//! detectable inside the creating transaction.

use crate::ids::{IdError, SubscriptionId, WorkerId};

const SUBSCRIPTIONS: &str = "subscriptions";
const WORKERS: &str = "workers";
const ASSIGNMENTS: &str = "assignments";
const CURSORS: &str = "cursors";
const LEADER: &str = "coordinator/leader";
const FINGERPRINTS: &str = "fingerprints";
const DRAINS: &str = "drains";
const OWNERS: &str = "owners";

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/herald";

/// A parsed herald key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `<prefix>/subscriptions/<id>`
    Subscription(SubscriptionId),
    /// `<prefix>/workers/<worker_id>`
    Worker(WorkerId),
    /// `<prefix>/assignments/<id>`
    Assignment(SubscriptionId),
    /// `<prefix>/cursors/<id>`
    Cursor(SubscriptionId),
    /// `<prefix>/coordinator/leader`
    Leader,
    /// `<prefix>/fingerprints/<hex>`
    Fingerprint(String),
    /// `<prefix>/drains/<worker_id>`
    Drain(WorkerId),
    /// `<prefix>/owners/<id>`
    Owner(SubscriptionId),
}

/// Why a key or prefix was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The prefix is not of the form `/segment[/segment...]`.
    #[error("key prefix must start with '/', not end with '/', and have no empty segments: {0:?}")]
    BadPrefix(String),
    /// The key does not start with this keyspace's prefix.
    #[error("key {0:?} is outside the herald prefix")]
    OutsidePrefix(String),
    /// The key is under the prefix but is not one herald writes.
    #[error("unknown herald key {0:?}")]
    Unknown(String),
    /// The id part of the key is invalid.
    #[error("bad id in key {key:?}: {source}")]
    BadId {
        /// The whole key.
        key: String,
        /// Why the id is invalid.
        source: IdError,
    },
}

/// Builds and parses herald's etcd keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    prefix: String,
}

impl Default for Keyspace {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.to_owned() }
    }
}

impl Keyspace {
    /// A keyspace under `prefix` (e.g. `/herald` or `/prod/herald`).
    pub fn new(prefix: impl Into<String>) -> Result<Self, KeyError> {
        let prefix = prefix.into();
        let ok = prefix.starts_with('/')
            && !prefix.ends_with('/')
            && prefix[1..].split('/').all(|seg| !seg.is_empty());
        if ok { Ok(Self { prefix }) } else { Err(KeyError::BadPrefix(prefix)) }
    }

    /// The prefix, without a trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn dir(&self, kind: &str) -> String {
        format!("{}/{kind}/", self.prefix)
    }

    /// `<prefix>/subscriptions/<id>`
    pub fn subscription(&self, id: &SubscriptionId) -> String {
        format!("{}{id}", self.dir(SUBSCRIPTIONS))
    }
    /// `<prefix>/subscriptions/`, for range reads and watches.
    pub fn subscriptions_dir(&self) -> String {
        self.dir(SUBSCRIPTIONS)
    }
    /// `<prefix>/workers/<worker_id>`
    pub fn worker(&self, id: &WorkerId) -> String {
        format!("{}{id}", self.dir(WORKERS))
    }
    /// `<prefix>/workers/`
    pub fn workers_dir(&self) -> String {
        self.dir(WORKERS)
    }
    /// `<prefix>/assignments/<id>`
    pub fn assignment(&self, id: &SubscriptionId) -> String {
        format!("{}{id}", self.dir(ASSIGNMENTS))
    }
    /// `<prefix>/assignments/`
    pub fn assignments_dir(&self) -> String {
        self.dir(ASSIGNMENTS)
    }
    /// `<prefix>/cursors/<id>`
    pub fn cursor(&self, id: &SubscriptionId) -> String {
        format!("{}{id}", self.dir(CURSORS))
    }
    /// `<prefix>/cursors/`
    pub fn cursors_dir(&self) -> String {
        self.dir(CURSORS)
    }
    /// `<prefix>/owners/<id>`: held by the worker actually running the subscription, from
    /// before its task starts until after it ended; a new owner is assigned only once it is gone.
    pub fn owner(&self, id: &SubscriptionId) -> String {
        format!("{}{id}", self.dir(OWNERS))
    }
    /// `<prefix>/owners/`
    pub fn owners_dir(&self) -> String {
        self.dir(OWNERS)
    }
    /// `<prefix>/drains/<worker_id>`: a request that the worker drain and exit, naming (in
    /// hex) the lease of the registration it is meant for. Not bound to that lease: it must
    /// survive the worker losing the lease and registering again.
    pub fn drain(&self, id: &WorkerId) -> String {
        format!("{}{id}", self.dir(DRAINS))
    }
    /// `<prefix>/fingerprints/<hex>`
    pub fn fingerprint(&self, hex: &str) -> String {
        format!("{}{hex}", self.dir(FINGERPRINTS))
    }
    /// `<prefix>/coordinator/leader`
    pub fn leader(&self) -> String {
        format!("{}/{LEADER}", self.prefix)
    }

    /// Parses a key produced by one of the builders above.
    pub fn parse(&self, key: &str) -> Result<Key, KeyError> {
        let rest = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| KeyError::OutsidePrefix(key.to_owned()))?;
        if rest == LEADER {
            return Ok(Key::Leader);
        }
        let (kind, id) = rest.split_once('/').ok_or_else(|| KeyError::Unknown(key.to_owned()))?;
        let bad_id = |source| KeyError::BadId { key: key.to_owned(), source };
        match kind {
            SUBSCRIPTIONS => SubscriptionId::new(id).map(Key::Subscription).map_err(bad_id),
            ASSIGNMENTS => SubscriptionId::new(id).map(Key::Assignment).map_err(bad_id),
            CURSORS => SubscriptionId::new(id).map(Key::Cursor).map_err(bad_id),
            WORKERS => WorkerId::new(id).map(Key::Worker).map_err(bad_id),
            DRAINS => WorkerId::new(id).map(Key::Drain).map_err(bad_id),
            OWNERS => SubscriptionId::new(id).map(Key::Owner).map_err(bad_id),
            FINGERPRINTS if !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()) => {
                Ok(Key::Fingerprint(id.to_owned()))
            }
            _ => Err(KeyError::Unknown(key.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sid(s: &str) -> SubscriptionId {
        SubscriptionId::new(s).unwrap()
    }

    #[test]
    fn builds_the_documented_layout() {
        let ks = Keyspace::default();
        assert_eq!(ks.subscription(&sid("a")), "/herald/subscriptions/a");
        assert_eq!(ks.worker(&WorkerId::new("w").unwrap()), "/herald/workers/w");
        assert_eq!(ks.assignment(&sid("a")), "/herald/assignments/a");
        assert_eq!(ks.cursor(&sid("a")), "/herald/cursors/a");
        assert_eq!(ks.leader(), "/herald/coordinator/leader");
        assert_eq!(ks.assignments_dir(), "/herald/assignments/");
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(Keyspace::new("/prod/herald").is_ok());
        for bad in ["", "herald", "/herald/", "//herald", "/a//b"] {
            assert_eq!(Keyspace::new(bad), Err(KeyError::BadPrefix(bad.to_owned())), "{bad}");
        }
    }

    #[test]
    fn bad_keys_are_rejected() {
        let ks = Keyspace::default();
        assert!(matches!(ks.parse("/other/cursors/a"), Err(KeyError::OutsidePrefix(_))));
        assert!(matches!(ks.parse("/heraldx/cursors/a"), Err(KeyError::OutsidePrefix(_))));
        assert!(matches!(ks.parse("/herald/nope/a"), Err(KeyError::Unknown(_))));
        assert!(matches!(ks.parse("/herald/cursors"), Err(KeyError::Unknown(_))));
        assert!(matches!(ks.parse("/herald/cursors/"), Err(KeyError::BadId { .. })));
        assert!(matches!(ks.parse("/herald/cursors/a/b"), Err(KeyError::BadId { .. })));
        assert!(matches!(ks.parse("/herald/workers/W"), Err(KeyError::BadId { .. })));
    }

    proptest! {
        #[test]
        fn every_key_round_trips(
            prefix in "(/[a-z]{1,8}){1,3}",
            id in "[a-z0-9_-]{1,64}",
        ) {
            let ks = Keyspace::new(prefix).unwrap();
            let s = sid(&id);
            let w = WorkerId::new(id.clone()).unwrap();
            prop_assert_eq!(ks.parse(&ks.subscription(&s)).unwrap(), Key::Subscription(s.clone()));
            prop_assert_eq!(ks.parse(&ks.assignment(&s)).unwrap(), Key::Assignment(s.clone()));
            prop_assert_eq!(ks.parse(&ks.cursor(&s)).unwrap(), Key::Cursor(s.clone()));
            prop_assert_eq!(ks.parse(&ks.owner(&s)).unwrap(), Key::Owner(s.clone()));
            prop_assert_eq!(ks.parse(&ks.drain(&w)).unwrap(), Key::Drain(w.clone()));
            prop_assert_eq!(ks.parse(&ks.worker(&w)).unwrap(), Key::Worker(w));
            prop_assert_eq!(ks.parse(&ks.leader()).unwrap(), Key::Leader);
            prop_assert_eq!(ks.parse(&ks.fingerprint("00ff")).unwrap(), Key::Fingerprint("00ff".into()));
        }
    }
}
