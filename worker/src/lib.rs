//! herald worker: turns the contract logs of its assigned subscriptions into JetStream
//! messages, advancing a fenced per-subscription cursor in etcd only after the acks.
//!
//! Layout, from the edge inwards:
//!
//! - [`config`]: the one configuration struct (file + `HERALD_*` env).
//! - [`chain`]: `ChainRpc`, the narrow view of a JSON-RPC endpoint, and its HTTP adapter.
//! - [`endpoints`]: a chain's endpoints as one `ChainRpc` (failover, rate limits, recovery).
//! - [`publish`]: `EventSink`, the narrow view of JetStream, and its async-nats adapter.
//! - [`store`]: `CursorStore` and the etcd adapter (assignments, specs, fenced cursor writes).
//! - [`ranges`], [`limits`], [`decode`]: pure decisions (which blocks next, how many at once
//!   given what providers refuse, log -> envelope).
//! - [`heads`]: one head tracker per chain (socket or polling), its window of recent blocks.
//! - [`journal`]: the subject folded as a consumer folds it, reconciled against the
//!   canonical chain (pure: what to retract, skip and publish).
//! - [`live`]: merged live fetching, one `eth_getLogs` per new range for every subscription at
//!   the head.
//! - [`readahead`]: a subscription's validated `eth_getLogs`, and the read-ahead that keeps
//!   several in flight (fetched and decoded) while it publishes history.
//! - [`pipeline`]: one subscription's fetch -> decode -> publish -> commit loop.
//! - [`membership`]: the leased registration under `<prefix>/workers/<id>`.
//! - [`supervisor`]: one pipeline task per assigned subscription, following etcd.
//! - [`retry`], [`metrics`], [`shutdown`]: backoff, Prometheus metrics, signal handling.
//!
//! [`run`] wires them together; `main` only parses arguments and installs signals.

pub mod chain;
pub mod config;
pub mod decode;
pub mod endpoints;
pub mod heads;
pub mod journal;
pub mod limits;
pub mod live;
pub mod membership;
pub mod metrics;
pub mod pipeline;
pub mod publish;
pub mod ranges;
pub mod readahead;
pub mod records;
pub mod retry;
pub mod shutdown;
pub mod store;
pub mod supervisor;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::chain::HttpRpc;
use crate::config::Config;
use crate::endpoints::{EndpointConfig, EndpointPool};
use crate::metrics::Metrics;
use crate::publish::JetStreamSink;
use crate::retry::retry;
use crate::store::EtcdStore;
use crate::supervisor::{ChainHandle, Supervisor};

/// Runs a worker until `shutdown` is cancelled. Unreachable dependencies at start are
/// retried with backoff (and logged), never fatal; a chain answering with another chain id
/// than configured is fatal.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Metrics::for_worker(config.worker_id.as_str());
    for chain in &config.chains {
        metrics.init_chain(chain.chain_id, chain.rpc_urls.len());
    }
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics_listen: cannot bind {addr}"))?;
        tracing::info!(%addr, "serving /metrics");
        tokio::spawn(serve_metrics(listener, metrics.clone(), shutdown.clone()));
    }

    let etcd = &config.etcd;
    // Unreadable credential files are a configuration error, not something to retry.
    etcd.read_secrets().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let Some(store) =
        retry("connect to etcd", &shutdown, || EtcdStore::connect(etcd, config.keyspace())).await
    else {
        return Ok(());
    };
    tracing::info!(endpoints = ?etcd.endpoints, "connected to etcd");

    let nats_options = || async {
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(std::time::Duration::from_secs(5))
            .max_reconnects(None);
        if let Some(ca) = &config.nats.tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some(creds) = &config.nats.creds_file {
            options = options.credentials_file(creds).await.map_err(|e| {
                anyhow::anyhow!(
                    "invalid configuration: nats.creds_file: cannot read {}: {e}",
                    creds.display()
                )
            })?;
        }
        anyhow::Ok(options)
    };
    // An unreadable credentials file is a configuration error, not something to retry.
    nats_options().await?;
    let Some(client) = retry("connect to nats", &shutdown, || async {
        let options = nats_options().await.map_err(|e| async_nats::Error::from(format!("{e:#}")))?;
        let servers = config.nats.servers().map_err(async_nats::Error::from)?;
        let client = options.connect(servers).await?;
        client.flush().await.map(|()| client).map_err(async_nats::Error::from)
    })
    .await
    else {
        return Ok(());
    };
    let sink = JetStreamSink::new(client, &config.nats).with_publisher(config.worker_id.as_str());
    if retry("create or update the jetstream stream", &shutdown, || sink.ensure_stream(&config.nats.stream))
        .await
        .is_none()
    {
        return Ok(());
    }
    tracing::info!(stream = %config.nats.stream.name, "jetstream stream ready");

    // The trackers outlive the supervisor: draining tasks still follow the head.
    let trackers_stop = CancellationToken::new();
    let mut chains = HashMap::new();
    for (i, chain) in config.chains.iter().enumerate() {
        let mut endpoints = Vec::new();
        for (j, url) in chain.rpc_urls.iter().enumerate() {
            let rpc = HttpRpc::new(url, chain.request_timeout)
                .map_err(|e| anyhow::anyhow!("chains[{i}].rpc_urls[{j}]: {e}"))?
                .with_max_batch_size(chain.max_batch_size);
            endpoints.push(EndpointConfig { name: rpc.redacted_url().to_owned(), rpc });
        }
        let names: Vec<String> = endpoints.iter().map(|e| e.name.clone()).collect();
        let rpc = EndpointPool::new(chain.chain_id, endpoints, chain.requests_per_second, metrics.clone());
        let what = format!("reach chain {} at {}", chain.chain_id, names.join(", "));
        let Some(verified) = retry(&what, &shutdown, || rpc.verify_chain()).await else {
            return Ok(());
        };
        verified.map_err(|e| anyhow::anyhow!("chains[{i}].rpc_urls: {e}"))?;
        tracing::info!(chain_id = chain.chain_id, endpoints = ?names, "chain reachable");
        let rpc = Arc::new(rpc);
        let heads = heads::HeadTracker {
            chain_id: chain.chain_id,
            rpc: rpc.clone(),
            ws_url: chain.ws_url.clone(),
            poll_interval: chain.poll_interval,
            request_timeout: chain.request_timeout,
            metrics: metrics.clone(),
        }
        .spawn(trackers_stop.clone());
        let live =
            live::LiveLogs::new(chain.chain_id, rpc.clone(), chain.max_addresses_per_call, metrics.clone());
        chains.insert(chain.chain_id, ChainHandle { rpc, heads, live, config: chain.clone() });
    }

    let lease = membership::LeaseClock::new();
    let membership = membership::Membership {
        store: store.clone(),
        info: membership::Membership::info(
            config.worker_id.clone(),
            chains.keys().copied().collect(),
            config.membership.capacity,
        ),
        ttl: config.membership.lease_ttl,
        clock: lease.clone(),
        metrics: metrics.clone(),
    };
    let membership_stop = CancellationToken::new();
    let membership_task = tokio::spawn(membership.run(membership_stop.clone()).in_current_span());

    tokio::spawn(
        watch_drain_request(store.clone(), config.worker_id.clone(), lease.clone(), shutdown.clone())
            .in_current_span(),
    );

    let supervisor = Supervisor {
        worker_id: config.worker_id.clone(),
        store: Arc::new(store),
        sink: Arc::new(sink),
        chains,
        metrics,
        lease,
        idle_commit_interval: config.idle_commit_interval,
        start_permits: Arc::new(tokio::sync::Semaphore::new(supervisor::CONCURRENT_STARTS)),
    };
    tracing::info!(worker_id = %config.worker_id, "worker running");
    supervisor.run(shutdown).await;
    trackers_stop.cancel();
    // Leave the cluster only after every task stopped: revoking the lease releases the
    // assignments for other workers (and the drain request for this id is deleted).
    membership_stop.cancel();
    let _ = membership_task.await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Turns a drain request (`POST /v1/workers/{id}/drain` writes `<prefix>/drains/<id>`, naming
/// the lease of the worker's registration) into the same graceful shutdown as SIGTERM.
///
/// Only a request naming a lease this process registered with is for it (whichever of its
/// registrations: it may have lost that lease and registered again since). One naming another
/// lease was left for an earlier process with this worker id: it is ignored and deleted.
async fn watch_drain_request(
    store: store::EtcdStore,
    worker: herald_proto::WorkerId,
    lease: membership::LeaseClock,
    shutdown: CancellationToken,
) {
    let key = store.keys().drain(&worker);
    while !shutdown.is_cancelled() {
        let mut client = store.client();
        let requested = async {
            let existing = client.get(key.as_str(), None).await?;
            let mut stale = None;
            for kv in existing.kvs() {
                if lease.is_own(membership::drain_request_lease(kv.value())) {
                    return Ok::<bool, etcd_client::Error>(true);
                }
                stale = Some(kv.mod_revision());
            }
            if let Some(revision) = stale {
                tracing::info!(
                    "ignoring a drain request naming a lease this process never held (left for an earlier process with this worker id); deleting it"
                );
                let txn = etcd_client::Txn::new()
                    .when([etcd_client::Compare::mod_revision(
                        key.as_str(),
                        etcd_client::CompareOp::Equal,
                        revision,
                    )])
                    .and_then([etcd_client::TxnOp::delete(key.as_str(), None)]);
                client.txn(txn).await?;
            }
            let options = etcd_client::WatchOptions::new()
                .with_start_revision(existing.header().map_or(0, |h| h.revision()) + 1);
            let mut watch = client.watch(key.as_str(), Some(options)).await?;
            while let Some(response) = watch.message().await? {
                let put = |e: &&etcd_client::Event| e.event_type() == etcd_client::EventType::Put;
                let named = response
                    .events()
                    .iter()
                    .filter(put)
                    .filter_map(etcd_client::Event::kv)
                    .map(|kv| membership::drain_request_lease(kv.value()));
                for named in named {
                    if lease.is_own(named) {
                        return Ok(true);
                    }
                    tracing::info!(
                        lease = named,
                        "ignoring a drain request naming a lease this process never held"
                    );
                }
            }
            Ok(false)
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = requested => r,
        };
        if let Ok(true) = outcome {
            tracing::info!("drain requested through the admin API; shutting down gracefully");
            shutdown.cancel();
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Metrics, shutdown: CancellationToken) {
    use axum::routing::get;
    let app = axum::Router::new()
        // Streamed: tens of thousands of subscriptions' series are written out a chunk at a
        // time rather than built whole.
        .route(
            "/metrics",
            get(move || {
                let chunks = metrics.exposition().map(Ok::<_, std::convert::Infallible>);
                std::future::ready(axum::body::Body::from_stream(futures::stream::iter(chunks)))
            }),
        )
        .route("/healthz", get(|| std::future::ready("ok")));
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "metrics server failed");
    }
}
