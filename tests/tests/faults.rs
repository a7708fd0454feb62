//! Faults: a worker killed mid-stream, NATS restarted mid-stream, bad logs, dependencies that
//! are not up yet, and invalid configuration.

use std::time::Duration;

use herald_proto::SubscriptionId;
use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::check::{assert_exact_transfers, assert_monotonic, cursor_history};
use herald_tests::herald::{WorkerSettings, read_cursor};
use herald_tests::process::free_port;
use herald_tests::tcp_proxy::TcpProxy;
use herald_tests::{
    Anvil, Etcd, Nats, Stack, StreamReader, TestChain, WorkerProcess, init_tracing, register_subscription,
    wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Waits until the cursor of `id` reaches `block`.
async fn wait_for_cursor(
    etcd: &Etcd,
    id: &SubscriptionId,
    block: u64,
    worker: &WorkerProcess,
) -> anyhow::Result<()> {
    herald_tests::herald::wait_for_cursor(etcd, id, block, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))
}

/// Waits until the worker's log contains `needle`.
async fn wait_for_log(worker: &WorkerProcess, needle: &str) -> anyhow::Result<()> {
    wait_for(&format!("worker log line {needle:?}"), TIMEOUT, || async {
        worker.log().contains(needle).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_stream_resumes_without_loss_or_duplicates() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    for _ in 0..40 {
        stack.chain.emit_many(25).await?;
    }
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("transfers", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;

    // Small ranges: many cursor commits, so the kill lands between two of them.
    let mut settings = stack.worker_settings("worker-a");
    settings.max_block_range = 2;
    let mut worker = WorkerProcess::start(settings.clone())?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    reader.wait_for_count(&spec.subject(), 250, TIMEOUT).await?;
    worker.kill().await;
    let at_kill = read_cursor(&mut etcd, &spec.id).await?;

    // More history while nobody is watching, then a new process with the same identity.
    let mut last_block = 0;
    for _ in 0..4 {
        last_block = stack.chain.emit_many(25).await?;
    }
    let worker = WorkerProcess::start(settings)?;
    wait_for_cursor(&stack.etcd, &spec.id, last_block, &worker).await?;

    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 1100);
    let history = cursor_history(&mut etcd, &spec.id).await?;
    assert_monotonic(&history);
    if let Some(at_kill) = at_kill {
        assert!(history.contains(&at_kill));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_loses_nothing() -> anyhow::Result<()> {
    init_tracing();
    let mut stack = Stack::start().await?;
    for _ in 0..8 {
        stack.chain.emit_many(25).await?;
    }
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("transfers", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.max_block_range = 1;
    let worker = WorkerProcess::start(settings)?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    reader.wait_for_count(&spec.subject(), 100, TIMEOUT).await?;

    stack.nats.stop().await;
    for _ in 0..4 {
        stack.chain.emit_many(25).await?;
    }
    wait_for_log(&worker, "publish failed, retrying with backoff").await?;
    stack.nats.start_again().await?;
    let mut last_block = 0;
    for _ in 0..4 {
        last_block = stack.chain.emit_many(25).await?;
    }
    wait_for_cursor(&stack.etcd, &spec.id, last_block, &worker).await?;

    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 400);
    assert_monotonic(&cursor_history(&mut etcd, &spec.id).await?);
    Ok(())
}

/// The worker's NATS connection is cut in the middle of publishing a range (thousands of
/// messages in one pipelined fast-ingest batch), three times over: what the server stored is a
/// prefix, the batch is published again, and the stream still holds every log once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_connection_cut_mid_batch_keeps_order() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut last_block = 0;
    for _ in 0..4 {
        last_block = stack.chain.emit_many(1000).await?;
    }
    let proxy = TcpProxy::start(stack.nats.url().trim_start_matches("nats://")).await?;
    // The worker's first three connections each carry about 700 messages, then are cut.
    proxy.cut_connections(3, 700_000);
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("transfers", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.nats = proxy.nats_url();
    let worker = WorkerProcess::start(settings)?;
    wait_for_cursor(&stack.etcd, &spec.id, last_block, &worker).await?;

    assert_eq!(proxy.cuts(), 3, "not every connection was cut:\n{}", worker.log_tail());
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 4000);
    assert_monotonic(&cursor_history(&mut etcd, &spec.id).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_log_is_published_flagged_and_does_not_stall() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    stack.chain.emit_many(10).await?;
    let bad_block = stack.chain.emit_malformed_transfer().await?;
    let last_block = stack.chain.emit_many(10).await?;

    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("transfers", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    wait_for_cursor(&stack.etcd, &spec.id, last_block, &worker).await?;

    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let mut messages = reader.read_all(&spec.subject()).await?;
    assert_eq!(messages.len(), 21);
    let bad = messages.remove(10);
    assert_eq!(bad.block_number, bad_block);
    assert!(bad.decode_error.is_some(), "{bad:?}");
    assert_eq!(bad.args, serde_json::Value::Null);
    assert_eq!(bad.data.as_ref(), &[0xff]);
    assert_eq!(bad.topics.len(), 3);
    assert_exact_transfers(&messages, 20);

    let failures = wait_for("the decode failure metric", TIMEOUT, || async {
        worker.metric("herald_decode_failures_total", &[("subscription_id", "transfers")]).await
    })
    .await?;
    assert_eq!(failures, 1.0);
    let published = worker.metric("herald_events_published_total", &[("subscription_id", "transfers")]).await;
    assert_eq!(published, Some(21.0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_dependencies_at_start_are_retried_and_logged() -> anyhow::Result<()> {
    init_tracing();
    let (etcd_port, nats_port, anvil_port) = (free_port(), free_port(), free_port());
    let settings = WorkerSettings::new(
        "worker-a",
        format!("http://127.0.0.1:{etcd_port}"),
        format!("nats://127.0.0.1:{nats_port}"),
        format!("http://127.0.0.1:{anvil_port}"),
    );
    let worker = WorkerProcess::start(settings)?;

    wait_for_log(&worker, "what=\"connect to etcd\"").await?;
    let etcd = Etcd::start_on(etcd_port).await?;
    wait_for_log(&worker, "connected to etcd").await?;

    wait_for_log(&worker, "what=\"connect to nats\"").await?;
    let nats = Nats::start_on(nats_port).await?;
    wait_for_log(&worker, "jetstream stream ready").await?;

    wait_for_log(&worker, "what=\"reach chain 31337 at http://127.0.0.1").await?;
    let anvil = Anvil::start_on(anvil_port).await?;
    wait_for_log(&worker, "worker running").await?;

    let chain = TestChain::deploy(&anvil.url()).await?;
    let last_block = chain.emit_many(10).await?;
    let stack_spec = herald_proto::SubscriptionSpec {
        id: SubscriptionId::new("transfers")?,
        chain_id: herald_tests::services::ANVIL_CHAIN_ID,
        address: chain.contract,
        event: herald_proto::EventDefinition::Signature(TRANSFER_EVENT.into()).into(),
        filters: Default::default(),
        start_block: herald_proto::StartBlock::Number(0),
        confirmations: 0,
        finality: None,
        subject: None,
    };
    let mut client = etcd.client().await?;
    register_subscription(&mut client, &stack_spec, "worker-a").await?;
    wait_for_cursor(&etcd, &stack_spec.id, last_block, &worker).await?;
    let reader = StreamReader::connect(&nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&stack_spec.subject()).await?, 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_exits_non_zero_naming_the_field() -> anyhow::Result<()> {
    init_tracing();
    let valid = WorkerSettings::new(
        "worker-a",
        "http://127.0.0.1:1".into(),
        "nats://127.0.0.1:1".into(),
        "http://127.0.0.1:1".into(),
    )
    .to_toml();
    let cases = [
        (valid.replace("[etcd]\n", "[etcd]\nendpoint = []\n"), "endpoint"),
        (valid.replace("chain_id = 31337", "chain_id = \"mainnet\""), "chain_id"),
        (valid.replace("worker-a", "Worker A"), "worker_id"),
        (valid.replace("rpc_urls = [\"http://", "rpc_urls = [\"ftp://"), "chains[0].rpc_urls[0]"),
        (valid.replace("max_block_range = 50", "max_block_range = 0"), "chains[0].max_block_range"),
        (valid.replace("ack_timeout = \"2s\"", "ack_timeout = \"soon\""), "ack_timeout"),
    ];
    let dir = tempfile::tempdir()?;
    for (i, (toml, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&path, toml)?;
        let mut process = WorkerProcess::spawn_with_config(&path, dir.path())?;
        let code = tokio::time::timeout(TIMEOUT, process.wait()).await?;
        let log = process.log();
        assert_eq!(code, Some(2), "case {i} should exit 2:\n{log}");
        let last = log.lines().last().unwrap_or_default();
        assert!(last.contains(field), "case {i}: {last:?} does not name {field:?}");
    }
    let missing = dir.path().join("missing.toml");
    let mut process = WorkerProcess::spawn_with_config(&missing, dir.path())?;
    assert_eq!(tokio::time::timeout(TIMEOUT, process.wait()).await?, Some(2));
    assert!(process.log().contains("does not exist"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line() -> anyhow::Result<()> {
    use herald_tests::herald::{ADMIN_TOKEN, CoordinatorProcess, CoordinatorSettings};
    init_tracing();
    const PASSWORD: &str = "rpc-password-7f3a9c";
    const API_KEY: &str = "rpc-apikey-9b2e71";
    let (etcd, nats) = tokio::try_join!(Etcd::start(), Nats::start())?;
    let anvil_port = free_port();
    let rpc = format!("http://herald:{PASSWORD}@127.0.0.1:{anvil_port}/?apikey={API_KEY}");

    // The chain is down at first: the failures are logged, with the URL in their errors. The
    // worker logs JSON, the coordinator text: both formats are covered.
    // A fallback endpoint and a WebSocket endpoint that never come up carry secrets too: their
    // failures are logged all along.
    const WS_KEY: &str = "ws-apikey-4d8e06";
    let (dead_rpc, dead_ws) = (free_port(), free_port());
    let settings = WorkerSettings {
        json_logs: true,
        fallback_rpc: vec![format!("https://user:{PASSWORD}@127.0.0.1:{dead_rpc}/v2/{API_KEY}")],
        ws: Some(format!("ws://127.0.0.1:{dead_ws}/ws/{WS_KEY}")),
        ..WorkerSettings::new("worker-a", etcd.endpoint(), nats.url(), rpc.clone())
    };
    let worker = WorkerProcess::start(settings)?;
    wait_for_log(&worker, "\"what\":\"reach chain 31337").await?;
    let anvil = Anvil::start_on(anvil_port).await?;
    wait_for_log(&worker, "worker running").await?;
    let chain = TestChain::deploy(&anvil.url()).await?;
    let coordinator = CoordinatorProcess::start(CoordinatorSettings::new(etcd.endpoint(), rpc)).await?;
    let body = serde_json::json!({
        "id": "transfers", "chain_id": 31337, "address": chain.contract.to_string(),
        "event": TRANSFER_EVENT, "start_block": 0,
    });
    assert_eq!(coordinator.post("/v1/subscriptions", &body).await?.0, 201);
    // A rejected token that contains the real one is not logged either.
    let wrong = coordinator
        .http()
        .post(coordinator.url("/v1/subscriptions/transfers/pause"))
        .bearer_auth(format!("{ADMIN_TOKEN}-wrong"))
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);
    chain.emit_many(3).await?;
    let reader = StreamReader::connect(&nats.url()).await?;
    reader.wait_for_count("herald.events.31337.transfers", 3, TIMEOUT).await?;

    // Every worker line is JSON, and a subscription's lines carry its span's identifiers.
    let log = worker.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("not a JSON log line ({e}): {l}")))
        .collect::<anyhow::Result<_>>()?;
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "subscription started")
        .ok_or_else(|| anyhow::anyhow!("no `subscription started` line:\n{log}"))?;
    let span = &started["span"];
    assert_eq!(span["subscription_id"], "transfers", "{started}");
    assert_eq!(span["worker_id"], "worker-a", "{started}");
    assert_eq!(span["chain_id"], 31337, "{started}");
    let registered = lines
        .iter()
        .find(|l| l["fields"]["message"] == "worker registered")
        .ok_or_else(|| anyhow::anyhow!("no `worker registered` line:\n{log}"))?;
    assert_eq!(registered["span"]["worker_id"], "worker-a", "{registered}");

    assert!(log.contains("new heads"), "the WebSocket endpoint's failure is not logged:\n{log}");
    // Nor do the metrics carry URLs: endpoints are labelled by index.
    let metrics = worker.metrics_text().await.unwrap_or_default();
    assert!(metrics.contains("herald_rpc_requests_total"), "no metrics:\n{metrics}");
    for (name, log) in [("worker", log), ("coordinator", coordinator.log()), ("worker metrics", metrics)] {
        assert!(log.contains("127.0.0.1") || name == "worker metrics", "{name} logged nothing useful");
        // Not even a fragment: the distinctive tails of every secret.
        for secret in [PASSWORD, API_KEY, WS_KEY, ADMIN_TOKEN, "7f3a9c", "9b2e71", "4d8e06"] {
            assert!(!log.contains(secret), "{name} logged (part of) a secret {secret:?}:\n{log}");
        }
    }
    Ok(())
}
