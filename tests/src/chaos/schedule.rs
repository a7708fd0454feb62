//! The soak's fault schedule: which faults happen when, decided by the seed alone.
//!
//! Pure and deterministic, so that a failing seed replays the same schedule. Every kind comes
//! up at least [`min_per_kind`] times; the rest are drawn with weights that favour the faults
//! that found defects before (reorgs, worker deaths). Each fault names a resource; faults on
//! different resources overlap in time, faults on the same one wait for each other.

use std::fmt;
use std::time::Duration;

/// A fault the soak injects, then heals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL a worker; restart it under the same or a new `worker_id`.
    WorkerKill,
    /// SIGSTOP a worker past its lease TTL, then SIGCONT.
    WorkerStop,
    /// SIGTERM a worker; restart it under the same or a new `worker_id`.
    WorkerTerm,
    /// `POST /v1/workers/{id}/drain`; restart it once it exited.
    WorkerDrain,
    /// Start a fourth worker, later SIGTERM it.
    WorkerAddRemove,
    /// SIGKILL the leader coordinator, then start it again.
    LeaderKill,
    /// SIGSTOP the leader coordinator past its election lease, then SIGCONT.
    LeaderStop,
    /// SIGKILL one etcd member, then start it again.
    EtcdMemberKill,
    /// SIGKILL two etcd members (quorum lost), then start them again.
    EtcdQuorumLoss,
    /// SIGKILL one NATS server, then start it again.
    NatsNodeKill,
    /// Stop every NATS server, then start them all again.
    NatsRestart,
    /// `anvil_reorg` of depth 1-8 that drops, moves and adds transactions.
    Reorg,
    /// The RPC proxy answers some `eth_getLogs` with HTTP 503 or 429.
    ProxyServerErrors,
    /// The RPC proxy answers some `eth_getLogs` after the caller's timeout, or cuts them.
    ProxyTimeouts,
    /// The RPC proxy answers some `eth_getLogs` with `[]`.
    ProxyEmptyLogs,
    /// The RPC proxy answers some head reads with a block a few below the head.
    ProxyLaggingHead,
    /// Pause a subscription through the API, later resume it.
    PauseResume,
    /// Rewind a subscription through the API.
    Rewind,
    /// Delete a subscription through the API, then register it again from its start.
    DeleteReregister,
    /// Register a new subscription from a block in the past.
    RegisterFromHistory,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 20] = [
        Self::WorkerKill,
        Self::WorkerStop,
        Self::WorkerTerm,
        Self::WorkerDrain,
        Self::WorkerAddRemove,
        Self::LeaderKill,
        Self::LeaderStop,
        Self::EtcdMemberKill,
        Self::EtcdQuorumLoss,
        Self::NatsNodeKill,
        Self::NatsRestart,
        Self::Reorg,
        Self::ProxyServerErrors,
        Self::ProxyTimeouts,
        Self::ProxyEmptyLogs,
        Self::ProxyLaggingHead,
        Self::PauseResume,
        Self::Rewind,
        Self::DeleteReregister,
        Self::RegisterFromHistory,
    ];

    /// How often this kind is drawn beyond its minimum, relative to the others.
    fn weight(self) -> u64 {
        match self {
            Self::Reorg => 4,
            Self::WorkerKill | Self::WorkerStop | Self::WorkerTerm | Self::PauseResume | Self::Rewind => 2,
            _ => 1,
        }
    }

    /// The name printed in the soak's table.
    pub fn name(self) -> &'static str {
        match self {
            Self::WorkerKill => "worker_sigkill",
            Self::WorkerStop => "worker_sigstop",
            Self::WorkerTerm => "worker_sigterm",
            Self::WorkerDrain => "worker_drain",
            Self::WorkerAddRemove => "worker_add_remove",
            Self::LeaderKill => "leader_sigkill",
            Self::LeaderStop => "leader_sigstop",
            Self::EtcdMemberKill => "etcd_member_kill",
            Self::EtcdQuorumLoss => "etcd_quorum_loss",
            Self::NatsNodeKill => "nats_node_kill",
            Self::NatsRestart => "nats_cluster_restart",
            Self::Reorg => "anvil_reorg",
            Self::ProxyServerErrors => "rpc_5xx",
            Self::ProxyTimeouts => "rpc_timeouts",
            Self::ProxyEmptyLogs => "rpc_empty_logs",
            Self::ProxyLaggingHead => "rpc_lagging_head",
            Self::PauseResume => "pause_resume",
            Self::Rewind => "rewind",
            Self::DeleteReregister => "delete_reregister",
            Self::RegisterFromHistory => "register_from_history",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFault {
    /// When it starts, from the start of the schedule.
    pub at: Duration,
    /// What it is.
    pub kind: FaultKind,
    /// Its own seed: which worker, member, subscription, depth, how long.
    pub seed: u64,
}

/// How many times each kind comes up at least, for `faults` faults in all.
pub fn min_per_kind(faults: usize) -> usize {
    (faults / FaultKind::ALL.len()).min(5)
}

/// The schedule of `faults` faults spread over `span`, for `seed`: sorted by start time.
pub fn plan(seed: u64, faults: usize, span: Duration) -> Vec<PlannedFault> {
    let mut rng = SplitMix64(seed);
    let mut kinds: Vec<FaultKind> = Vec::with_capacity(faults);
    for kind in FaultKind::ALL {
        kinds.extend(std::iter::repeat_n(kind, min_per_kind(faults)));
    }
    let total_weight: u64 = FaultKind::ALL.iter().map(|k| k.weight()).sum();
    while kinds.len() < faults {
        let mut draw = rng.below(total_weight);
        for kind in FaultKind::ALL {
            if draw < kind.weight() {
                kinds.push(kind);
                break;
            }
            draw -= kind.weight();
        }
    }
    // Fisher-Yates, so the minimums are spread over the whole run.
    for i in (1..kinds.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        kinds.swap(i, j);
    }
    let slot = span.as_millis() as u64 / faults.max(1) as u64;
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| PlannedFault {
            at: Duration::from_millis(i as u64 * slot + rng.below(slot.max(1))),
            kind,
            seed: rng.next_u64(),
        })
        .collect()
}

/// A small, seedable generator (SplitMix64): the schedule and every fault's choices.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low) + 1)
    }

    /// `true` with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn counts(schedule: &[PlannedFault]) -> BTreeMap<FaultKind, usize> {
        let mut counts = BTreeMap::new();
        for f in schedule {
            *counts.entry(f.kind).or_default() += 1;
        }
        counts
    }

    #[test]
    fn every_kind_comes_up_at_least_five_times_in_a_full_run() {
        for seed in 0..50 {
            let schedule = plan(seed, 220, Duration::from_secs(900));
            assert_eq!(schedule.len(), 220);
            let counts = counts(&schedule);
            for kind in FaultKind::ALL {
                assert!(counts.get(&kind).copied().unwrap_or(0) >= 5, "seed {seed}: {kind} too rare");
            }
        }
    }

    #[test]
    fn the_short_run_has_every_kind_twice() {
        let counts = counts(&plan(7, 40, Duration::from_secs(150)));
        assert!(FaultKind::ALL.iter().all(|k| counts.get(k).copied().unwrap_or(0) >= 2), "{counts:?}");
    }

    #[test]
    fn a_schedule_is_sorted_inside_its_span_and_replays_from_its_seed() {
        for seed in 0..50 {
            let span = Duration::from_secs(900);
            let schedule = plan(seed, 220, span);
            assert!(schedule.windows(2).all(|w| w[0].at <= w[1].at));
            assert!(schedule.iter().all(|f| f.at < span));
            assert_eq!(schedule, plan(seed, 220, span));
        }
        assert_ne!(plan(1, 220, Duration::from_secs(900)), plan(2, 220, Duration::from_secs(900)));
    }
}
