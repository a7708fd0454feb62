//! The chain edge against real anvil: endpoints that answer incompletely or lag, new heads by
//! WebSocket with a polling fallback, and finality tags.

use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_proto::Finality;
use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::check::assert_exact_transfers;
use herald_tests::herald::wait_for_cursor;
use herald_tests::rpc_proxy::RpcProxy;
use herald_tests::{Stack, StreamReader, WorkerProcess, init_tracing, register_subscription, wait_for};

const TIMEOUT: Duration = Duration::from_secs(60);

/// An endpoint that answers `[]` to every third `eth_getLogs` (as a node whose log index lags
/// its head does): the blooms of the blocks say logs are there, the answer is asked again, and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_drop_logs_lose_nothing() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let proxy = RpcProxy::start(&stack.anvil.url()).await?;
    proxy.faults().empty_logs_every.store(3, Ordering::SeqCst);
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("incomplete", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.rpc = proxy.url();
    let worker = WorkerProcess::start(settings)?;

    // Block by block, so that many answers hold logs.
    for _ in 0..12 {
        let block = stack.chain.emit_many(3).await?;
        wait_for_cursor(&stack.etcd, &spec.id, block, TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    }
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 36);
    let emptied = proxy.counters().emptied.load(Ordering::SeqCst);
    assert!(emptied > 0, "the proxy never dropped an answer that had logs: the test proves nothing");
    let requeried = worker.metric("herald_rpc_incomplete_log_answers_total", &[]).await.unwrap_or(0.0);
    assert!(requeried >= emptied as f64, "{requeried} re-queries for {emptied} emptied answers");
    Ok(())
}

/// An endpoint that answers `[]` to every second `eth_getLogs` over history far below the head
/// window, in ranges whose last block holds no log (a backend behind a load balancer that is
/// still syncing): every block the answer leaves empty is checked against its header's bloom,
/// and nothing is lost. Seed 404 of `make chaos` lost 32 logs of two subscriptions backfilling
/// from history this way, because only the range's last block was checked there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_answers_that_drop_logs_lose_nothing() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    // One block with two logs, then two without, so that most ranges end on a silent block.
    const EMITTING_BLOCKS: u64 = 100;
    for _ in 0..EMITTING_BLOCKS {
        stack.chain.emit_many(2).await?;
        stack.chain.mine(2).await?;
    }
    // Everything emitted is now well below the head window (256 blocks).
    stack.chain.mine(400).await?;
    let head = stack.chain.head().await?;

    let proxy = RpcProxy::start(&stack.anvil.url()).await?;
    proxy.faults().empty_logs_every.store(2, Ordering::SeqCst);
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("history-incomplete", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.rpc = proxy.url();
    let worker = WorkerProcess::start(settings)?;
    wait_for_cursor(&stack.etcd, &spec.id, head, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;

    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 2 * EMITTING_BLOCKS);
    let emptied = proxy.counters().emptied.load(Ordering::SeqCst);
    assert!(emptied > 0, "the proxy never dropped an answer that had logs: the test proves nothing");
    let headers = worker.metric("herald_rpc_history_headers_read_total", &[]).await.unwrap_or(0.0);
    assert!(headers > 0.0, "no header was read to check history answers");
    Ok(())
}

/// An endpoint whose head sometimes reads several blocks behind what was already seen is
/// lagging, not reorganising: nothing is retracted and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_endpoint_is_not_a_reorg() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let proxy = RpcProxy::start(&stack.anvil.url()).await?;
    proxy.faults().stale_latest_every.store(2, Ordering::SeqCst);
    proxy.faults().stale_by.store(4, Ordering::SeqCst);
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("lagging", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.rpc = proxy.url();
    let worker = WorkerProcess::start(settings)?;
    let stale = || proxy.counters().stale_heads.load(Ordering::SeqCst);
    wait_for("a stale head to be served", TIMEOUT, || async { (stale() > 0).then_some(()) }).await?;

    let mut last = 0;
    for _ in 0..10 {
        last = stack.chain.emit_many(2).await?;
    }
    wait_for_cursor(&stack.etcd, &spec.id, last, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    // More stale heads, now that the subscription holds the newest blocks.
    let served = stale();
    wait_for("more stale heads to be served", TIMEOUT, || async { (stale() >= served + 2).then_some(()) })
        .await?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 20);
    assert_eq!(worker.metric("herald_chain_reorgs_total", &[]).await.unwrap_or(0.0), 0.0);
    assert_eq!(worker.metric("herald_retractions_total", &[]).await.unwrap_or(0.0), 0.0);
    Ok(())
}

/// New heads arrive over anvil's WebSocket; a worker whose socket endpoint is unreachable
/// polls instead. Both deliver everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_heads_by_websocket_or_by_polling() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let by_socket = stack.subscription("by-socket", TRANSFER_EVENT);
    let by_polling = stack.subscription("by-polling", TRANSFER_EVENT);
    register_subscription(&mut etcd, &by_socket, "worker-ws").await?;
    register_subscription(&mut etcd, &by_polling, "worker-poll").await?;
    let mut settings = stack.worker_settings("worker-ws");
    settings.ws = Some(stack.anvil.ws_url());
    let socket_worker = WorkerProcess::start(settings)?;
    let mut settings = stack.worker_settings("worker-poll");
    let closed_port = herald_tests::process::free_port();
    settings.ws = Some(format!("ws://127.0.0.1:{closed_port}"));
    let polling_worker = WorkerProcess::start(settings)?;

    wait_for("the socket worker to follow heads over the socket", TIMEOUT, || async {
        let connected = socket_worker.metric("herald_chain_heads_websocket", &[]).await?;
        (connected == 1.0).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", socket_worker.log_tail()))?;
    let mut last = 0;
    for _ in 0..5 {
        last = stack.chain.emit_many(2).await?;
    }
    for (spec, worker) in [(&by_socket, &socket_worker), (&by_polling, &polling_worker)] {
        wait_for_cursor(&stack.etcd, &spec.id, last, TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    }
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&by_socket.subject()).await?, 10);
    assert_exact_transfers(&reader.read_all(&by_polling.subject()).await?, 10);
    assert_eq!(polling_worker.metric("herald_chain_heads_websocket", &[]).await, Some(0.0));
    assert!(polling_worker.log().contains("cannot subscribe to new heads; polling meanwhile"));
    Ok(())
}

/// `finality: finalized` holds logs back until the chain's `finalized` block (anvil: 64
/// below the head) passes them, however many confirmations they have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finality_tags_hold_logs_back_until_final() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let mut spec = stack.subscription("finalized", TRANSFER_EVENT);
    spec.finality = Some(Finality::Finalized);
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;

    stack.chain.mine(100).await?;
    let mut last = 0;
    for _ in 0..5 {
        last = stack.chain.emit_many(2).await?;
    }
    let head = stack.chain.head().await?;
    let finalized = head - 64;
    // The subscription asks for the tag after the worker has seen the last block: it must not
    // wait for another block to learn where the finalized block is.
    wait_for("the worker to see the head", TIMEOUT, || async {
        (worker.metric("herald_chain_head_block", &[]).await? >= head as f64).then_some(())
    })
    .await?;
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    assert!(finalized < last - 4, "the transfers must not be final yet");
    wait_for_cursor(&stack.etcd, &spec.id, finalized, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let cursor = herald_tests::herald::read_cursor(&mut etcd, &spec.id).await?.map(|c| c.block_number);
    assert!(cursor < Some(last - 4), "cursor {cursor:?} passed the finalized block {finalized}");
    assert!(reader.read_all(&spec.subject()).await?.is_empty(), "published before final");

    stack.chain.mine(64).await?;
    wait_for_cursor(&stack.etcd, &spec.id, last, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 10);
    Ok(())
}

/// A backfill through an endpoint that behaves like real providers at once: ranges over 6
/// blocks refused (Alchemy, QuickNode, reth and Ankr wording), answers over 25 logs refused
/// (Infura, reth, geth wording), 429 with `Retry-After`, 503s, answers slower than the
/// timeout and dropped connections. Every log arrives exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_through_a_misbehaving_provider_is_exact() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut last = 0;
    for _ in 0..40 {
        last = stack.chain.emit_many(10).await?;
    }
    let proxy = RpcProxy::start(&stack.anvil.url()).await?;
    let faults = proxy.faults();
    faults.max_range.store(6, Ordering::SeqCst);
    faults.max_results.store(25, Ordering::SeqCst);
    faults.rate_limit_every.store(7, Ordering::SeqCst);
    faults.server_error_every.store(11, Ordering::SeqCst);
    faults.slow_every.store(13, Ordering::SeqCst);
    faults.slow_ms.store(1500, Ordering::SeqCst);
    faults.drop_every.store(17, Ordering::SeqCst);
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("providers", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.rpc = proxy.url();
    settings.max_block_range = 1000;
    settings.request_timeout_ms = 1000;
    let worker = WorkerProcess::start(settings)?;

    wait_for_cursor(&stack.etcd, &spec.id, last, Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 400);
    let c = proxy.counters();
    for (fault, count) in [
        ("refused range", &c.refused_ranges),
        ("429", &c.rate_limited),
        ("503", &c.server_errors),
        ("slow answer", &c.slowed),
        ("dropped connection", &c.dropped),
    ] {
        assert!(count.load(Ordering::SeqCst) > 0, "no {fault} happened: the test proves nothing");
    }
    assert!(worker.metric("herald_rpc_range_splits_total", &[]).await.unwrap_or(0.0) > 0.0);
    Ok(())
}

/// Two endpoints for one chain; the first is killed mid-backfill: the worker fails over to
/// the second, returns to the first once it is back, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_fails_over_and_back() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut last = 0;
    for _ in 0..60 {
        last = stack.chain.emit_many(2).await?;
    }
    let mut primary = RpcProxy::start(&stack.anvil.url()).await?;
    let secondary = RpcProxy::start(&stack.anvil.url()).await?;
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("failover", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.rpc = primary.url();
    settings.fallback_rpc = vec![secondary.url()];
    settings.max_block_range = 1;
    settings.requests_per_second = Some(25);
    settings.request_timeout_ms = 1000;
    let worker = WorkerProcess::start(settings)?;
    let fail = |e: anyhow::Error| anyhow::anyhow!("{e}\n{}", worker.log_tail());

    wait_for_cursor(&stack.etcd, &spec.id, last - 45, TIMEOUT).await.map_err(fail)?;
    primary.kill();
    assert_eq!(secondary.counters().get_logs.load(Ordering::SeqCst), 0, "the secondary was used too early");
    wait_for_cursor(&stack.etcd, &spec.id, last, TIMEOUT).await.map_err(fail)?;
    assert!(secondary.counters().get_logs.load(Ordering::SeqCst) > 0, "no failover happened");

    primary.revive().await?;
    let served_before = primary.counters().get_logs.load(Ordering::SeqCst);
    wait_for("the worker to return to the primary", TIMEOUT, || async {
        stack.chain.emit_many(2).await.ok()?;
        (primary.counters().get_logs.load(Ordering::SeqCst) > served_before).then_some(())
    })
    .await
    .map_err(fail)?;
    let live_last = stack.chain.emit_many(2).await?;
    wait_for_cursor(&stack.etcd, &spec.id, live_last, TIMEOUT).await.map_err(fail)?;
    let canonical = stack.chain.canonical_transfers(live_last).await?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, canonical.len() as u64);
    assert!(worker.metric("herald_rpc_failovers_total", &[]).await.unwrap_or(0.0) > 0.0);
    Ok(())
}
