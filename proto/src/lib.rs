//! herald's shared vocabulary. No IO lives here, except behind the `etcd` feature (the etcd
//! connection options and paged reads both binaries use).
//!
//! Everything that two herald processes (or herald and its consumers) must agree on is
//! defined once in this crate:
//!
//! - [`ids`]: validated identifiers ([`SubscriptionId`], [`WorkerId`]).
//! - [`subscription`]: what an app registers ([`SubscriptionSpec`]), what the registry stores
//!   ([`SubscriptionRecord`]: the spec plus pause state and rewind requests), and how its event
//!   definition and indexed-argument filters compile into something a worker can match
//!   logs against ([`CompiledEvent`]).
//! - [`cursor`]: a subscription's durable progress ([`Cursor`]): the last block whose logs
//!   were all acknowledged by JetStream, with its hash so that unwinding is possible.
//! - [`membership`]: what a live worker announces under its lease ([`WorkerInfo`]).
//! - [`assignment`]: the record a coordinator writes to hand a subscription to a worker.
//! - [`envelope`]: the JSON message consumers read ([`EventEnvelope`]) and the
//!   `Nats-Msg-Id` rule (`EventEnvelope::msg_id`) that makes redeliveries collapse in JetStream.
//! - [`keys`]: the etcd key layout under one configurable prefix ([`Keyspace`]).
//! - [`settings`]: configuration pieces both binaries share (etcd, log format).
//! - [`subjects`]: NATS subject rules and header names.
//! - `etcd` (feature `etcd`): reading a prefix in pages at one revision.

pub mod assignment;
pub mod cursor;
pub mod envelope;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod ids;
pub mod keys;
pub mod membership;
pub mod settings;
pub mod subjects;
pub mod subscription;

pub use assignment::Assignment;
pub use cursor::{Checkpoint, Cursor};
pub use envelope::EventEnvelope;
pub use ids::{ChainId, IdError, SubscriptionId, WorkerId};
pub use keys::{Key, KeyError, Keyspace};
pub use membership::WorkerInfo;
pub use subscription::{
    CompiledEvent, EventDefinition, Finality, Rewind, SpecError, StartBlock, SubscriptionRecord,
    SubscriptionSpec, SubscriptionState,
};
