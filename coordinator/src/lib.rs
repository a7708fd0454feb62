//! herald coordinator: the subscription registry, the REST admin API, and the sticky,
//! balanced planner that assigns subscriptions to workers.
//!
//! Not built yet. Until it is, whoever registers a subscription writes its spec and its
//! assignment to etcd directly (see `herald_proto::keys` for the layout and
//! `herald_proto::Assignment` for the record); the worker already follows assignments and
//! fences its cursor writes on them, so the coordinator will slot in without worker changes.
