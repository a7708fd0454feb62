//! herald coordinator: the subscription registry, the REST admin API, and the assignment of
//! subscriptions to workers.
//!
//! Layout:
//!
//! - [`config`]: the one configuration struct (file + `HERALD_*` env), tokens.
//! - [`registry`]: the etcd adapter; every precondition is a transaction.
//! - [`validate`]: pure validation of requests into `SubscriptionSpec`s, naming the field.
//! - [`api`]: axum router, handlers, auth, error shape, OpenAPI document.
//! - [`heads`]: chain heads (for lag and start-block bounds).
//! - [`planner`]: the pure, sticky, balanced assignment solver (see its README).
//! - [`election`]: leader election (etcd election API, lease with a local deadline).
//! - [`reconcile`]: the leader's loop: plan, diff against etcd, apply with transactions.
//! - [`maintenance`]: etcd upkeep: its size as metrics, the leader's history compaction.
//! - [`metrics`]: Prometheus metrics.
//!
//! etcd is the only state: any number of coordinators can serve the API, and a restart loses
//! nothing.

pub mod api;
pub mod config;
pub mod election;
pub mod heads;
pub mod maintenance;
pub mod metrics;
pub mod planner;
pub mod reconcile;
pub mod registry;
pub mod validate;

use std::time::Instant;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::heads::Heads;
use crate::registry::Registry;

/// How often etcd's database size is read for its metrics.
const DB_SIZE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a coordinator until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tokens = config.tokens()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen: cannot bind {}", config.listen))?;
    let etcd = &config.etcd;
    // Unreadable credential files are a configuration error, not something to retry.
    etcd.read_secrets().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let mut backoff_ms = 100u64;
    let registry = loop {
        match Registry::connect(etcd, config.keyspace()).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(what = "connect to etcd", error = %e, "failed, retrying with backoff");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)) => {}
                }
                backoff_ms = (backoff_ms * 2).min(5000);
            }
        }
    };
    tracing::info!(endpoints = ?etcd.endpoints, "connected to etcd");

    let heads = Heads::new(&config.chains);
    for chain in &config.chains {
        tokio::spawn(heads.clone().poll(chain.clone(), shutdown.child_token()));
    }
    let metrics = metrics::Metrics::new();
    let identity = config.identity.clone().unwrap_or_else(|| format!("coordinator-{}", std::process::id()));
    let reconciler = reconcile::Reconciler {
        registry: registry.clone(),
        pacing: reconcile::Pacing {
            debounce: config.planner.debounce,
            max_delay: config.planner.max_delay,
            resync: config.planner.resync_interval,
        },
        metrics: metrics.clone(),
        compaction_retention: config.maintenance.compaction_retention,
    };
    tokio::spawn(maintenance::watch_db_size(
        registry.clone(),
        config.maintenance.etcd_quota_bytes,
        DB_SIZE_INTERVAL,
        metrics.clone(),
        shutdown.child_token(),
    ));
    let election = tokio::spawn(election::run(
        registry.client(),
        config.keyspace().leader(),
        identity,
        config.election.lease_ttl,
        metrics.clone(),
        reconciler,
        shutdown.child_token(),
    ));

    let state = api::AppState {
        registry,
        heads,
        api: config.api.clone(),
        stream_subjects: config.stream_subjects.clone(),
        metrics,
        started: Instant::now(),
    };
    let app = api::router(state, tokens);
    tracing::info!(addr = %config.listen, "serving the admin API");
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    let _ = election.await;
    tracing::info!("coordinator stopped");
    Ok(())
}
