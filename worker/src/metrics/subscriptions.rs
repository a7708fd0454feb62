//! The per-subscription series, kept apart from the `prometheus` registry.
//!
//! A worker runs tens of thousands of subscriptions, each with thirteen series (seven
//! counters, cursor, lag in blocks and seconds, and three states). As labelled children of
//! `prometheus` metric vectors they cost about 7 KB per subscription (each child carries its
//! own copy of the metric's description and label pairs), more than everything else a quiet
//! subscription holds. Here each running subscription owns one [`SubscriptionStats`] of a few
//! atomics (about 150 bytes), and the series are written out as text at scrape time, a chunk
//! of subscriptions at a time, so that a scrape does not build every series in memory at once
//! either.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use herald_proto::SubscriptionId;

use super::SUBSCRIPTION_STATES;

/// A per-subscription counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Messages stored by JetStream (duplicates excluded).
    Published,
    /// Publishes JetStream dropped as duplicates of stored messages.
    Duplicates,
    /// Logs that did not decode with the ABI.
    DecodeFailures,
    /// Failed publish attempts.
    PublishErrors,
    /// Retractions published.
    Retractions,
    /// Reorgs deeper than the confirmations.
    DeepReorgs,
    /// Subjects published again after losing acknowledged messages.
    StreamRepairs,
}

/// Name and help of each [`Count`], in its order.
const COUNTERS: [(&str, &str); 7] = [
    ("herald_events_published_total", "Messages stored by JetStream (duplicates excluded)."),
    ("herald_publish_duplicates_total", "Publishes JetStream dropped as duplicates of stored messages."),
    (
        "herald_decode_failures_total",
        "Logs that did not decode with the subscription's ABI (published raw, flagged).",
    ),
    ("herald_publish_errors_total", "Failed publish attempts, retried."),
    ("herald_retractions_total", "Retractions published for logs from orphaned blocks."),
    (
        "herald_deep_reorgs_total",
        "Reorgs at least as deep as the subscription's confirmations: published logs had to be retracted.",
    ),
    (
        "herald_stream_repairs_total",
        "Subjects that had lost acknowledged messages (their tail below the cursor's record) and were published again.",
    ),
];

/// The gauges, after the counters.
const GAUGES: [(&str, &str); 4] = [
    ("herald_subscription_cursor_block", "Last block whose logs are all acknowledged."),
    ("herald_subscription_lag_blocks", "Blocks between the chain head and the subscription's cursor."),
    (
        "herald_subscription_lag_seconds",
        "Seconds since the subscription was last caught up with its confirmed head (0 while live).",
    ),
    (
        "herald_subscription_state",
        "1 for the state the subscription's task is in (starting, backfilling, live), 0 for the others.",
    ),
];

/// Subscriptions written out per chunk of a scrape.
const CHUNK: usize = 512;

/// One running subscription's series.
#[derive(Debug)]
struct SubscriptionStats {
    chain_id: u64,
    counts: [AtomicU64; COUNTERS.len()],
    cursor_block: AtomicI64,
    lag_blocks: AtomicI64,
    /// Index in [`SUBSCRIPTION_STATES`].
    state: AtomicU8,
    /// When it was last caught up with its confirmed head, in milliseconds after
    /// [`SubscriptionMetrics::epoch`].
    caught_up_at_ms: AtomicU64,
}

const STARTING: u8 = 0;
const BACKFILLING: u8 = 1;
const LIVE: u8 = 2;

/// Every running subscription's series, by subscription.
#[derive(Debug)]
pub(super) struct SubscriptionMetrics {
    running: Mutex<BTreeMap<SubscriptionId, Arc<SubscriptionStats>>>,
    /// `worker_id="..",` when the worker's series carry that label.
    worker_label: String,
    epoch: Instant,
}

impl SubscriptionMetrics {
    pub(super) fn new(worker_id: Option<&str>) -> Self {
        Self {
            running: Mutex::default(),
            worker_label: worker_id.map(|w| format!(",worker_id=\"{}\"", escape(w))).unwrap_or_default(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SubscriptionId, Arc<SubscriptionStats>>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts `id`'s series (counters at 0, state `starting`).
    pub(super) fn start(self: &Arc<Self>, chain_id: u64, id: &SubscriptionId) -> SubscriptionSeries {
        let stats = Arc::new(SubscriptionStats {
            chain_id,
            counts: Default::default(),
            cursor_block: AtomicI64::new(0),
            lag_blocks: AtomicI64::new(0),
            state: AtomicU8::new(STARTING),
            caught_up_at_ms: AtomicU64::new(self.now_ms()),
        });
        self.lock().insert(id.clone(), stats.clone());
        SubscriptionSeries { metrics: self.clone(), id: id.clone(), stats }
    }

    /// The text exposition of every running subscription's series, in chunks.
    pub(super) fn exposition(self: Arc<Self>) -> impl Iterator<Item = String> + Send + 'static {
        let running: Arc<[(SubscriptionId, Arc<SubscriptionStats>)]> =
            self.lock().iter().map(|(id, s)| (id.clone(), s.clone())).collect();
        let now_ms = self.now_ms();
        // No subscription, no family (an empty family would have nothing but its header).
        let families = if running.is_empty() { 0 } else { COUNTERS.len() + GAUGES.len() };
        let chunks = running.len().div_ceil(CHUNK);
        let this = self;
        (0..families).flat_map(move |family| {
            let (this, running) = (this.clone(), running.clone());
            (0..chunks).map(move |chunk| {
                let mut out = String::new();
                if chunk == 0 {
                    let (name, help) = family_meta(family);
                    let kind = if family < COUNTERS.len() { "counter" } else { "gauge" };
                    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
                }
                let end = (chunk * CHUNK + CHUNK).min(running.len());
                for (id, stats) in &running[chunk * CHUNK..end] {
                    this.write_family(&mut out, family, id, stats, now_ms);
                }
                out
            })
        })
    }

    fn write_family(
        &self,
        out: &mut String,
        family: usize,
        id: &SubscriptionId,
        s: &SubscriptionStats,
        now_ms: u64,
    ) {
        let (name, _) = family_meta(family);
        let (chain, id, worker) = (s.chain_id, escape(id.as_str()), &self.worker_label);
        let mut line = |state: Option<&str>, value: String| {
            let state = state.map(|st| format!(",state=\"{st}\"")).unwrap_or_default();
            let _ = writeln!(
                out,
                "{name}{{chain_id=\"{chain}\"{state},subscription_id=\"{id}\"{worker}}} {value}"
            );
        };
        let state = s.state.load(Ordering::Relaxed);
        match family.checked_sub(COUNTERS.len()) {
            None => line(None, s.counts[family].load(Ordering::Relaxed).to_string()),
            Some(0) => line(None, s.cursor_block.load(Ordering::Relaxed).to_string()),
            Some(1) => line(None, s.lag_blocks.load(Ordering::Relaxed).to_string()),
            Some(2) => {
                let behind_ms = if state == LIVE {
                    0
                } else {
                    now_ms.saturating_sub(s.caught_up_at_ms.load(Ordering::Relaxed))
                };
                line(None, format!("{}", behind_ms as f64 / 1000.0));
            }
            Some(_) => {
                for (index, st) in SUBSCRIPTION_STATES.iter().enumerate() {
                    line(Some(st), u8::from(usize::from(state) == index).to_string());
                }
            }
        }
    }
}

fn family_meta(family: usize) -> (&'static str, &'static str) {
    match family.checked_sub(COUNTERS.len()) {
        None => COUNTERS[family],
        Some(gauge) => GAUGES[gauge],
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n").into()
    } else {
        value.into()
    }
}

/// A running subscription's series; they go when it is dropped (when the task ends), so a
/// subscription that moved to another worker leaves nothing stale behind.
#[derive(Debug)]
pub struct SubscriptionSeries {
    metrics: Arc<SubscriptionMetrics>,
    id: SubscriptionId,
    stats: Arc<SubscriptionStats>,
}

impl SubscriptionSeries {
    /// Adds one to a counter.
    pub fn count(&self, count: Count) {
        self.count_by(count, 1);
    }

    /// Adds `n` to a counter.
    pub fn count_by(&self, count: Count, n: u64) {
        self.stats.counts[count as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Records a head seen while the next block to process is `next`, with `confirmations`:
    /// lag and state.
    pub fn observe_head(&self, head: u64, next: u64, confirmations: u64) {
        self.set_lag(head.saturating_sub(next.saturating_sub(1)));
        self.progress(head.saturating_sub(confirmations) < next);
    }

    /// Records a cursor at block `to`, with the chain at `head` and the confirmed target
    /// `target`.
    pub fn observe_cursor(&self, head: u64, to: u64, target: u64) {
        self.stats.cursor_block.store(i64::try_from(to).unwrap_or(i64::MAX), Ordering::Relaxed);
        self.set_lag(head.saturating_sub(to));
        self.progress(to >= target);
    }

    fn set_lag(&self, blocks: u64) {
        self.stats.lag_blocks.store(i64::try_from(blocks).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn progress(&self, caught_up: bool) {
        if caught_up {
            self.stats.caught_up_at_ms.store(self.metrics.now_ms(), Ordering::Relaxed);
        }
        self.stats.state.store(if caught_up { LIVE } else { BACKFILLING }, Ordering::Relaxed);
    }

    /// A counter's value.
    #[cfg(test)]
    pub fn get(&self, count: Count) -> u64 {
        self.stats.counts[count as usize].load(Ordering::Relaxed)
    }
}

impl Drop for SubscriptionSeries {
    fn drop(&mut self) {
        let mut running = self.metrics.lock();
        // Not a successor's series for the same id.
        if running.get(&self.id).is_some_and(|s| Arc::ptr_eq(s, &self.stats)) {
            running.remove(&self.id);
        }
    }
}
