//! `make chaos`: a seeded soak that mixes every fault kind against the deployment users run,
//! then checks the guarantees from the consumer's side only.
//!
//! - [`schedule`]: which faults happen when (pure, from the seed).
//! - [`deployment`]: clustered etcd and NATS, anvil behind the fault proxy, two coordinators
//!   and the workers, each started from its config file.
//! - [`soak`]: runs the schedule with traffic every block, heals, waits for the cursors, then
//!   reads every subject as a consumer and every canonical log with a raw `eth_getLogs`.
//! - [`verdict`]: what one subscription's subject and the chain say went wrong (pure).
//!
//! What a run proves, and how to replay one, is in the README ("Chaos soak").

pub mod deployment;
pub mod schedule;
pub mod soak;
pub mod verdict;

pub use soak::{ChaosConfig, Report, run};
