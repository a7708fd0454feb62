//! The subscription records a worker keeps: those of the subscriptions it owns, and no other.
//!
//! Every worker follows the whole record prefix (one watch), but keeping every record would
//! cost each worker about a kilobyte per registered subscription, whoever runs it: at 100,000
//! subscriptions on four workers, four times the memory of the subscriptions themselves. So a
//! record is kept only while its subscription is assigned here: read when the assignment
//! arrives, followed through the watch while it stays, forgotten when it goes.
//!
//! The watch and the reads race: a read may see a later revision than the watch events still
//! queued for the same key. Each known record therefore carries the revision it is known at
//! (its mod revision, or the revision a read found it absent at), and a change applies only if
//! it is newer. Pure: [`OwnedRecords`] decides, the supervisor reads and watches.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use herald_proto::{EventDefinition, SubscriptionId};

use crate::store::{Ownership, Versioned};

/// What is known of one owned subscription's record.
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// Its record.
    Present(Versioned),
    /// No record at revision `at` (deleted, or the assignment outlived it for a moment).
    Absent {
        /// The revision it was found absent at.
        at: i64,
    },
}

impl Known {
    fn revision(&self) -> i64 {
        match self {
            Self::Present(v) => v.mod_revision,
            Self::Absent { at } => *at,
        }
    }
}

/// The records of the subscriptions this worker owns; see the module docs.
#[derive(Debug, Default)]
pub struct OwnedRecords {
    known: BTreeMap<SubscriptionId, Known>,
    events: EventInterner,
}

/// One copy of each distinct event definition for all the records that use it: a parsed JSON
/// ABI fragment is over a kilobyte, and thousands of subscriptions share a few events.
#[derive(Debug, Default)]
struct EventInterner {
    known: HashSet<Arc<EventDefinition>>,
    /// How many were kept after the last pruning.
    kept: usize,
}

impl EventInterner {
    fn intern(&mut self, event: &Arc<EventDefinition>) -> Arc<EventDefinition> {
        if let Some(known) = self.known.get(event) {
            return known.clone();
        }
        self.known.insert(event.clone());
        // Definitions no record uses any more go once the set has doubled.
        if self.known.len() > 2 * self.kept.max(64) {
            self.known.retain(|e| Arc::strong_count(e) > 1);
            self.kept = self.known.len();
        }
        event.clone()
    }
}

impl OwnedRecords {
    /// The record of `id`, if known and present.
    pub fn get(&self, id: &SubscriptionId) -> Option<&Versioned> {
        match self.known.get(id)? {
            Known::Present(v) => Some(v),
            Known::Absent { .. } => None,
        }
    }

    /// Owned subscriptions whose record has not been read yet.
    pub fn missing(&self, owned: &BTreeMap<SubscriptionId, Ownership>) -> Vec<SubscriptionId> {
        owned.keys().filter(|id| !self.known.contains_key(*id)).cloned().collect()
    }

    /// Forgets the records of subscriptions no longer owned.
    pub fn retain_owned(&mut self, owned: &BTreeMap<SubscriptionId, Ownership>) {
        self.known.retain(|id, _| owned.contains_key(id));
    }

    /// A read of `id` at revision `at` found `record` (`None`: no such key).
    pub fn read(&mut self, id: SubscriptionId, at: i64, record: Option<Versioned>) {
        let known = match record {
            Some(v) => Known::Present(v),
            None => Known::Absent { at },
        };
        self.apply(id, known);
    }

    /// A watched change of `id`: a put of `record` or a delete (`None`) at revision `at`.
    /// Ignored unless `id`'s record is known (its subscription is owned and was read).
    pub fn changed(&mut self, id: &SubscriptionId, at: i64, record: Option<Versioned>) {
        if !self.known.contains_key(id) {
            return;
        }
        let known = match record {
            Some(v) => Known::Present(v),
            None => Known::Absent { at },
        };
        self.apply(id.clone(), known);
    }

    fn apply(&mut self, id: SubscriptionId, mut known: Known) {
        match self.known.get(&id) {
            Some(current) if current.revision() >= known.revision() => {}
            _ => {
                if let Known::Present(v) = &mut known {
                    let spec = Arc::make_mut(&mut v.spec);
                    spec.event = self.events.intern(&spec.event);
                }
                self.known.insert(id, known);
            }
        }
    }

    /// Whether no record is known (present or absent).
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use herald_proto::{SubscriptionRecord, SubscriptionSpec, SubscriptionState};
    use proptest::prelude::*;

    use super::*;

    fn id(n: u8) -> SubscriptionId {
        SubscriptionId::new(format!("s{n}")).unwrap()
    }

    fn record(n: u8, mod_revision: i64) -> Versioned {
        let spec: SubscriptionSpec = serde_json::from_value(serde_json::json!({
            "id": format!("s{n}"), "chain_id": 1, "address": "0x1111111111111111111111111111111111111111",
            "event": "event E(uint256 x)",
        }))
        .unwrap();
        let mut record = SubscriptionRecord::new(spec, 0);
        record.state =
            if mod_revision % 2 == 0 { SubscriptionState::Active } else { SubscriptionState::Paused };
        Versioned::new(record, mod_revision, 1)
    }

    fn owned(ids: &[u8]) -> BTreeMap<SubscriptionId, Ownership> {
        ids.iter()
            .map(|&n| (id(n), Ownership { subscription_id: id(n), generation: 1, assignment_value: vec![] }))
            .collect()
    }

    #[test]
    fn only_owned_records_are_kept_and_a_late_watch_event_never_wins() {
        let mut records = OwnedRecords::default();
        // Not owned: the watch's changes are dropped.
        records.changed(&id(1), 5, Some(record(1, 5)));
        assert_eq!(records.missing(&owned(&[1])), vec![id(1)]);
        // Assigned: read at revision 9, where the record was last modified at 8.
        records.read(id(1), 9, Some(record(1, 8)));
        assert!(records.missing(&owned(&[1])).is_empty());
        // Watch events the read already covers arrive late and change nothing.
        records.changed(&id(1), 6, None);
        records.changed(&id(1), 8, Some(record(1, 8)));
        assert_eq!(records.get(&id(1)).map(|v| v.mod_revision), Some(8));
        // A later change applies.
        records.changed(&id(1), 12, Some(record(1, 12)));
        assert_eq!(records.get(&id(1)).map(|v| v.mod_revision), Some(12));
        records.changed(&id(1), 13, None);
        assert_eq!(records.get(&id(1)), None);
        assert!(records.missing(&owned(&[1])).is_empty(), "known absent, not read again");
        // Revoked: forgotten.
        records.retain_owned(&owned(&[]));
        assert!(records.is_empty());
    }

    #[test]
    fn records_share_one_copy_of_each_event_definition() {
        let mut records = OwnedRecords::default();
        for n in 0..3 {
            records.read(id(n), 10, Some(record(n, 10)));
        }
        let spec = |n| records.get(&id(n)).unwrap().spec.clone();
        assert!(Arc::ptr_eq(&spec(0).event, &spec(1).event));
        assert!(Arc::ptr_eq(&spec(1).event, &spec(2).event));
    }

    proptest! {
        /// Whatever the order of the watch's events and the reads (each read seeing the key as
        /// of some revision), the kept record is the newest one seen since the first read.
        #[test]
        fn the_kept_record_is_the_newest_seen(
            history in proptest::collection::vec(any::<bool>(), 1..20),
            ops in proptest::collection::vec((any::<bool>(), 0usize..20), 1..40),
        ) {
            // Revision r + 1 puts (true) or deletes (false) s1.
            let at = |r: usize| (r as i64) + 1;
            let state = |r: usize| history[r].then(|| record(1, at(r)));
            let mut records = OwnedRecords::default();
            let mut newest: Option<usize> = None;
            for (read, r) in ops {
                let r = r.min(history.len() - 1);
                if read {
                    records.read(id(1), at(r), state(r));
                } else {
                    records.changed(&id(1), at(r), state(r));
                }
                if read || newest.is_some() {
                    newest = newest.max(Some(r));
                }
            }
            let expected = newest.and_then(state).map(|v| v.mod_revision);
            prop_assert_eq!(records.get(&id(1)).map(|v| v.mod_revision), expected);
            prop_assert_eq!(records.missing(&owned(&[1])).is_empty(), newest.is_some());
        }
    }
}
