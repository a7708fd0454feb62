//! `make bench`: herald's benchmark scenarios. Each prints one line
//! `bench: <name> key=value ... ratio=<figure / target>`; ratio <= 1 is on target. Figures are
//! measured in this run on this machine; nothing here asserts a time.
//!
//! `BENCH=<name>` runs one scenario: `planner`, `backfill`, `live`, `fanout`, `takeover`, `drain`,
//! `scale` (not part of a plain `make bench`: it runs for over ten minutes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald_coordinator::planner::solve::{Load, Problem, Slot, solve};
use herald_proto::SubscriptionId;
use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::herald::{CoordinatorProcess, CoordinatorSettings, read_cursor};
use herald_tests::{Stack, WorkerProcess, wait_for};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);

fn planner() {
    const SUBSCRIPTIONS: usize = 100_000;
    const WORKERS: usize = 100;
    let problem = |workers: usize| Problem {
        subscriptions: vec![Load { chain: 1, weight: 1 }; SUBSCRIPTIONS],
        workers: vec![Slot { chains: [1].into(), capacity: 0 }; workers],
    };
    let base = problem(WORKERS);
    let started = Instant::now();
    let first = solve(&base, &[]);
    let plan_ms = started.elapsed().as_secs_f64() * 1000.0;
    let joined = problem(WORKERS + 1);
    let started = Instant::now();
    let after = solve(&joined, &first);
    let join_ms = started.elapsed().as_secs_f64() * 1000.0;
    let moved = first.iter().zip(&after).filter(|(a, b)| a != b).count();
    let ideal = SUBSCRIPTIONS as f64 / (WORKERS + 1) as f64;
    let time_ratio = plan_ms.max(join_ms) / 50.0;
    let move_ratio = moved as f64 / ideal / 1.1;
    println!(
        "bench: planner subscriptions={SUBSCRIPTIONS} workers={WORKERS} plan_ms={plan_ms:.1} join_plan_ms={join_ms:.1} \
         target_ms=50 moved_on_join={moved} ideal_moves={ideal:.0} move_ratio_vs_ideal={:.3} target_move_ratio=1.1 \
         ratio={:.3}",
        moved as f64 / ideal,
        time_ratio.max(move_ratio)
    );
}

fn body(stack: &Stack, i: u64) -> serde_json::Value {
    json!({
        "id": format!("bench-{i:02}"), "chain_id": 31337, "address": stack.chain.contract.to_string(),
        "event": TRANSFER_EVENT, "start_block": 0,
        "filters": {"from": [format!("0x{:040x}", 0x1000 + i)]},
    })
}

async fn owned_by(c: &CoordinatorProcess, worker: &str) -> anyhow::Result<Vec<String>> {
    let (_, page) = c.get("/v1/subscriptions?limit=1000").await?;
    Ok(page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["assigned_worker"] == worker)
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect())
}

/// Waits until each subscription in `ids` has committed a cursor at or past `block`: it is
/// publishing again (whoever owns it).
async fn wait_publishing(stack: &Stack, ids: &[String], block: u64) -> anyhow::Result<()> {
    let etcd = stack.etcd.client().await?;
    for id in ids {
        let id = SubscriptionId::new(id.clone())?;
        wait_for(&format!("{id} past block {block}"), TIMEOUT, || {
            let mut etcd = etcd.clone();
            let id = &id;
            async move { (read_cursor(&mut etcd, id).await.ok()??.block_number >= block).then_some(()) }
        })
        .await?;
    }
    Ok(())
}

async fn cluster(
    subscriptions: u64,
    workers: &[&str],
    ttl: u64,
) -> anyhow::Result<(Stack, CoordinatorProcess, BTreeMap<String, WorkerProcess>)> {
    let stack = Stack::start().await?;
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let mut started = BTreeMap::new();
    for w in workers {
        let mut settings = stack.worker_settings(w);
        settings.lease_ttl_secs = ttl;
        started.insert((*w).to_owned(), WorkerProcess::start(settings)?);
    }
    for i in 0..subscriptions {
        anyhow::ensure!(c.post("/v1/subscriptions", &body(&stack, i)).await?.0 == 201);
    }
    let head = stack.chain.emit_many(subscriptions).await?;
    let ids: Vec<String> = (0..subscriptions).map(|i| format!("bench-{i:02}")).collect();
    wait_publishing(&stack, &ids, head).await?;
    Ok((stack, c, started))
}

async fn takeover() -> anyhow::Result<()> {
    const TTL: u64 = 3;
    let (stack, c, mut workers) = cluster(30, &["bench-a", "bench-b", "bench-c"], TTL).await?;
    let victims = owned_by(&c, "bench-c").await?;
    let killed = Instant::now();
    workers.get_mut("bench-c").unwrap().kill().await;
    let block = stack.chain.emit_many(30).await?;
    wait_publishing(&stack, &victims, block).await?;
    let seconds = killed.elapsed().as_secs_f64();
    let target = TTL as f64 + 1.0;
    println!(
        "bench: takeover lease_ttl_s={TTL} subscriptions_moved={} takeover_s={seconds:.2} target_s={target:.1} ratio={:.3}",
        victims.len(),
        seconds / target
    );
    Ok(())
}

async fn drain() -> anyhow::Result<()> {
    const SAMPLES: usize = 8;
    let (stack, c, mut workers) = cluster(20, &["bench-a", "bench-b"], 10).await?;
    let mut samples = Vec::with_capacity(SAMPLES);
    for n in 0..SAMPLES {
        // Drain whichever worker is oldest; a new one joins to keep two.
        let (name, mut leaving) = workers.pop_first().unwrap();
        let owned = owned_by(&c, &name).await?;
        let started = Instant::now();
        leaving.terminate().await;
        let block = stack.chain.emit_many(20).await?;
        wait_publishing(&stack, &owned, block).await?;
        samples.push(started.elapsed().as_secs_f64());
        let fresh = format!("bench-n{n}");
        workers.insert(fresh.clone(), WorkerProcess::start(stack.worker_settings(&fresh))?);
        wait_for("the new worker to own subscriptions", TIMEOUT, || async {
            (!owned_by(&c, &fresh).await.ok()?.is_empty()).then_some(())
        })
        .await?;
    }
    samples.sort_by(f64::total_cmp);
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() - 1];
    println!("bench: drain samples={SAMPLES} p50_s={p50:.3} p99_s={p99:.3} target_p99_s=1.0 ratio={p99:.3}");
    Ok(())
}

/// Logs in the backfill scenario: 200 transactions of 1,000 Transfers each.
const BACKFILL_TXS: u64 = 200;
const LOGS_PER_TX: u64 = 1_000;

/// Raw `eth_getLogs` throughput over `first..=last` with 4 ranges in flight, logs per second,
/// at the best of a few range sizes.
async fn raw_get_logs(stack: &Stack, first: u64, last: u64) -> anyhow::Result<(f64, u64)> {
    let mut best = (0.0, 0);
    for span in [1u64, 5, 25] {
        let started = Instant::now();
        let ranges: Vec<(u64, u64)> =
            (first..=last).step_by(span as usize).map(|from| (from, (from + span - 1).min(last))).collect();
        let mut total = 0;
        for chunk in ranges.chunks(4) {
            let counts = futures::future::try_join_all(
                chunk.iter().map(|&(from, to)| stack.chain.count_transfers(from, to)),
            )
            .await?;
            total += counts.iter().sum::<usize>();
        }
        let rate = total as f64 / started.elapsed().as_secs_f64();
        if rate > best.0 {
            best = (rate, span);
        }
    }
    Ok(best)
}

/// Raw JetStream publish throughput of `count` payloads like herald's, with up to 1,024 acks
/// outstanding, messages per second.
async fn raw_publish(stack: &Stack, sample: &[u8], count: u64) -> anyhow::Result<f64> {
    let client = async_nats::connect(stack.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCHRAW".into(),
        subjects: vec!["benchraw.>".into()],
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::copy_from_slice(sample);
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for i in 0..count {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("raw-{i}").as_str());
        acks.push_back(js.publish_with_headers("benchraw.x", headers, payload.clone()).await?);
        if acks.len() >= 1024 {
            acks.pop_front().unwrap().await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Raw throughput of ordered, pipelined publishing of the same payloads: one fast-ingest batch
/// (ADR-50, flow acks every 500 messages, two flows in flight, gap mode `fail`), the protocol
/// herald publishes history with. Not the ceiling (that is plain async publishing, which
/// cannot keep order through a dropped connection); shown for what strict order costs.
async fn raw_ordered_publish(stack: &Stack, sample: &[u8], count: u64) -> anyhow::Result<f64> {
    use futures::StreamExt;
    const FLOW: u64 = 500;
    let client = async_nats::connect(stack.nats.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCHORDERED".into(),
        subjects: vec!["benchordered.>".into()],
        allow_batch_publish: true,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::copy_from_slice(sample);
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.>")).await?;
    let mut next_reply = async || -> anyhow::Result<serde_json::Value> {
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("reply inbox closed"))?;
        Ok(serde_json::from_slice(&reply.payload)?)
    };
    let started = Instant::now();
    let (mut acked, mut flow, mut answered) = (0, FLOW, false);
    for position in 1..=count {
        while (position > 1 && !answered) || position > acked + 2 * flow {
            let reply = next_reply().await?;
            anyhow::ensure!(reply["type"] == "ack", "batch failed: {reply}");
            answered = true;
            acked = acked.max(reply["seq"].as_u64().unwrap_or(0));
            flow = reply["msgs"].as_u64().unwrap_or(1).max(1);
        }
        let op = match position {
            1 => 0,
            p if p == count => 2,
            _ => 1,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("ordered-{position}").as_str());
        let reply = format!("{inbox}.{FLOW}.fail.{position}.{op}.$FI");
        client.publish_with_reply_and_headers("benchordered.x", reply, headers, payload.clone()).await?;
    }
    loop {
        let reply = next_reply().await?;
        match reply.get("type") {
            None if reply.get("error").is_none() => break,
            Some(t) if t == "ack" => {}
            _ => anyhow::bail!("batch failed: {reply}"),
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

async fn backfill() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let first = stack.chain.head().await? + 1;
    let mut last = 0;
    for _ in 0..BACKFILL_TXS {
        last = stack.chain.emit_many(LOGS_PER_TX).await?;
    }
    let total = BACKFILL_TXS * LOGS_PER_TX;
    let (rpc_ceiling, best_span) = raw_get_logs(&stack, first, last).await?;

    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("backfill", TRANSFER_EVENT);
    let mut settings = stack.worker_settings("bench-a");
    settings.max_block_range = 1000;
    let worker = WorkerProcess::start(settings)?;
    wait_for("the worker to serve metrics", TIMEOUT, || async {
        worker.metric("herald_worker_assigned_subscriptions", &[]).await
    })
    .await?;
    let started = Instant::now();
    herald_tests::register_subscription(&mut etcd, &spec, "bench-a").await?;
    let mut peak_rss = 0;
    wait_for("the backfill to finish", Duration::from_secs(1800), || {
        peak_rss = peak_rss.max(worker.peak_rss_bytes().unwrap_or(0));
        let etcd = stack.etcd.client();
        let id = spec.id.clone();
        async move {
            let cursor = read_cursor(&mut etcd.await.ok()?, &id).await.ok()??;
            (cursor.block_number >= last).then_some(())
        }
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    peak_rss = peak_rss.max(worker.peak_rss_bytes().unwrap_or(0));
    let events_per_s = total as f64 / seconds;

    let sample =
        herald_tests::StreamReader::connect(&stack.nats.url()).await?.first_payload(&spec.subject()).await?;
    let publish_ceiling = raw_publish(&stack, &sample, total).await?;
    let ordered = raw_ordered_publish(&stack, &sample, total).await?;
    let ceiling = rpc_ceiling.min(publish_ceiling);
    println!(
        "bench: backfill logs={total} seconds={seconds:.2} events_per_s={events_per_s:.0} \
         rpc_ceiling_per_s={rpc_ceiling:.0} rpc_best_span_blocks={best_span} publish_ceiling_per_s={publish_ceiling:.0} \
         ordered_publish_per_s={ordered:.0} peak_rss_mb={:.1} target_ratio=0.8 target_rss_mb=300 ratio={:.3}",
        peak_rss as f64 / 1e6,
        events_per_s / ceiling
    );
    Ok(())
}

async fn live() -> anyhow::Result<()> {
    const BLOCKS: usize = 40;
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let mut spec = stack.subscription("live", TRANSFER_EVENT);
    spec.start_block = herald_proto::StartBlock::Latest;
    let mut settings = stack.worker_settings("bench-a");
    settings.ws = Some(stack.anvil.ws_url());
    herald_tests::register_subscription(&mut etcd, &spec, "bench-a").await?;
    let _worker = WorkerProcess::start(settings)?;
    let client = async_nats::connect(stack.nats.url()).await?;
    // Core NATS sees each message as JetStream stores it (the publish ack follows it); a
    // reader task stamps each arrival.
    let mut messages = client.subscribe(spec.subject()).await?;
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while futures::StreamExt::next(&mut messages).await.is_some() {
            if arrived.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    // Warm up: the subscription's `latest` start is pinned, then a first block delivered.
    wait_for("the live subscription to pin its start", TIMEOUT, || {
        let etcd = stack.etcd.client();
        let id = spec.id.clone();
        async move { read_cursor(&mut etcd.await.ok()?, &id).await.ok()?.map(|_| ()) }
    })
    .await?;
    stack.chain.emit_many(1).await?;
    tokio::time::timeout(TIMEOUT, arrivals.recv()).await?;
    let mut latencies = Vec::with_capacity(BLOCKS);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for _ in 0..BLOCKS {
        tick.tick().await;
        // anvil mines on receipt of the transaction: the block appears within the send.
        let sent = Instant::now();
        stack.chain.emit_many(3).await?;
        let mut last = sent;
        for _ in 0..3 {
            last = tokio::time::timeout(TIMEOUT, arrivals.recv()).await?.unwrap_or(last);
        }
        latencies.push((last - sent).as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    println!(
        "bench: live blocks={BLOCKS} block_interval_ms=500 p50_ms={p50:.1} p99_ms={p99:.1} target_p99_ms=50 ratio={:.3}",
        p99 / 50.0
    );
    Ok(())
}

/// `FANOUT_CONTRACTS` contracts (default 1,000) x 10 subscriptions each, on 2 workers, with
/// live traffic on a different contract every block.
async fn fanout() -> anyhow::Result<()> {
    const PER_CONTRACT: usize = 10;
    const BLOCKS: u64 = 20;
    const MAX_ADDRESSES_PER_CALL: usize = 100;
    let contracts: usize =
        std::env::var("FANOUT_CONTRACTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let stack = Stack::start().await?;
    let mut chains = Vec::with_capacity(contracts);
    for _ in 0..contracts {
        chains.push(herald_tests::chain::TestChain::deploy(&stack.anvil.url()).await?);
    }
    // From the current head: each subscription delivers (and commits) its first range at once.
    let start = stack.chain.head().await?;
    let mut etcd = stack.etcd.client().await?;
    let workers = ["bench-a", "bench-b"];
    let mut n = 0;
    for (c, chain) in chains.iter().enumerate() {
        for j in 0..PER_CONTRACT {
            let mut spec = stack.subscription(&format!("fan-{c:04}-{j}"), TRANSFER_EVENT);
            spec.address = chain.contract;
            spec.start_block = herald_proto::StartBlock::Number(start);
            if j > 0 {
                // Filters on indexed arguments: most of these match nothing.
                spec.filters.insert("to".into(), vec![format!("0x{:040x}", j)]);
            }
            herald_tests::register_subscription(&mut etcd, &spec, workers[n % 2]).await?;
            n += 1;
        }
    }
    let mut procs = Vec::new();
    for w in workers {
        let mut settings = stack.worker_settings(w);
        settings.ws = Some(stack.anvil.ws_url());
        procs.push(WorkerProcess::start(settings)?);
    }
    // Every subscription started and committed its first cursor.
    let cursors = herald_proto::Keyspace::default().cursors_dir();
    wait_for("every subscription to start", Duration::from_secs(600), || {
        let etcd = stack.etcd.client();
        let cursors = cursors.clone();
        async move {
            let mut etcd = etcd.await.ok()?;
            let count = etcd
                .get(cursors.as_str(), Some(etcd_client::GetOptions::new().with_prefix().with_count_only()))
                .await
                .ok()?
                .count();
            (count as usize >= n).then_some(())
        }
    })
    .await?;
    let mut calls_before = Vec::new();
    let mut events_before = 0.0;
    for w in &procs {
        calls_before.push(w.metric("herald_rpc_requests_total", &[]).await.unwrap_or(0.0));
        events_before += w.metric("herald_events_published_total", &[]).await.unwrap_or(0.0);
    }
    let started = Instant::now();
    let mut max_lag: f64 = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for b in 0..BLOCKS as usize {
        tick.tick().await;
        chains[b % contracts].emit_many(5).await?;
        for w in &procs {
            max_lag = max_lag.max(w.metric_max("herald_subscription_lag_blocks").await.unwrap_or(0.0));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut calls_per_block = Vec::new();
    let mut events = -events_before;
    for (w, before) in procs.iter().zip(&calls_before) {
        calls_per_block
            .push((w.metric("herald_rpc_requests_total", &[]).await.unwrap_or(0.0) - before) / BLOCKS as f64);
        events += w.metric("herald_events_published_total", &[]).await.unwrap_or(0.0);
    }
    let rss: Vec<String> =
        procs.iter().map(|w| format!("{:.0}", w.peak_rss_bytes().unwrap_or(0) as f64 / 1e6)).collect();
    let worst = calls_per_block.iter().copied().fold(0.0, f64::max);
    let ceiling = 2.0 + (contracts as f64 / MAX_ADDRESSES_PER_CALL as f64).ceil();
    println!(
        "bench: fanout subscriptions={n} workers=2 contracts={contracts} blocks={BLOCKS} \
         rpc_calls_per_block_per_worker={} events_per_s={:.1} rss_mb_per_worker={} max_lag_blocks={max_lag:.0} \
         target_calls_per_block={ceiling:.0} target_max_lag_blocks=2 ratio={:.3}",
        calls_per_block.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>().join(","),
        events / seconds,
        rss.join(","),
        worst / ceiling
    );
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `SCALE_SUBSCRIPTIONS` (default 100,000) subscriptions registered through the API (10 events
/// or filters per contract address, from `latest`) on 4 workers, with a block a second carrying
/// logs for a few of them for `SCALE_SECONDS` (default 600) after all are assigned. Reports the
/// registration rate, the time from the last registration until all are assigned, worker RSS
/// per subscription (over the workers' RSS before any was registered), etcd's database size at
/// the end, the time to list every page, RPC calls per block per worker and the worst lag.
async fn scale() -> anyhow::Result<()> {
    const WORKERS: usize = 4;
    const CONCURRENCY: usize = 32;
    let subscriptions: usize = env_or("SCALE_SUBSCRIPTIONS", 100_000);
    let seconds: u64 = env_or("SCALE_SECONDS", 600);
    let stack = Stack::start().await?;
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let mut settings = stack.worker_settings(&format!("scale-{i}"));
        settings.ws = Some(stack.anvil.ws_url());
        // The product's default: quiet subscriptions commit every five minutes.
        settings.idle_commit_interval = "5m".into();
        workers.push(WorkerProcess::start(settings)?);
    }
    wait_for("the workers to register", TIMEOUT, || async {
        (c.metric("herald_coordinator_workers").await? >= WORKERS as f64).then_some(())
    })
    .await?;
    let idle_rss: u64 = workers.iter().map(|w| w.rss_bytes().unwrap_or(0)).sum();

    // Subscription n: contract address n / 10 (the first ten are the deployed contract, which
    // gets traffic), a filter on `to` making each of the ten distinct.
    let body = |n: usize| {
        let address =
            if n < 10 { stack.chain.contract.to_string() } else { format!("0x{:040x}", 0x1000 + n / 10) };
        let mut body = json!({
            "id": format!("scale-{n:06}"), "chain_id": herald_tests::services::ANVIL_CHAIN_ID,
            "address": address, "event": TRANSFER_EVENT, "start_block": "latest",
        });
        if !n.is_multiple_of(10) {
            body["filters"] = json!({"to": [format!("0x{:040x}", n % 10)]});
        }
        body
    };
    let registering = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let register = || async {
        loop {
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n >= subscriptions {
                return anyhow::Ok(());
            }
            let (status, answer) = c.post("/v1/subscriptions", &body(n)).await?;
            anyhow::ensure!(status == 201, "registration {n}: {status} {answer}");
        }
    };
    futures::future::try_join_all((0..CONCURRENCY).map(|_| register())).await?;
    let registered = Instant::now();
    let registration_rate = subscriptions as f64 / registering.elapsed().as_secs_f64();
    let assignments = herald_proto::Keyspace::default().assignments_dir();
    wait_for("every subscription to be assigned", Duration::from_secs(1800), || {
        let etcd = stack.etcd.client();
        let assignments = assignments.clone();
        async move {
            let count = etcd
                .await
                .ok()?
                .get(
                    assignments.as_str(),
                    Some(etcd_client::GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .ok()?
                .count();
            (count as usize >= subscriptions).then_some(())
        }
    })
    .await?;
    let assign_seconds = registered.elapsed().as_secs_f64();

    let calls_before: Vec<f64> = {
        let mut v = Vec::new();
        for w in &workers {
            v.push(w.metric("herald_rpc_requests_total", &[]).await.unwrap_or(0.0));
        }
        v
    };
    let first_block = stack.chain.head().await?;
    let started = Instant::now();
    let mut max_lag: f64 = 0.0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sample = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        stack.chain.emit_many(3).await?;
        sample += 1;
        // After the first minute (subscriptions starting up), every ten seconds.
        if started.elapsed() > Duration::from_secs(60.min(seconds / 2)) && sample.is_multiple_of(10) {
            for w in &workers {
                max_lag = max_lag.max(w.metric_max("herald_subscription_lag_blocks").await.unwrap_or(0.0));
            }
        }
    }
    let blocks = (stack.chain.head().await? - first_block).max(1) as f64;
    let mut calls_per_block = Vec::new();
    for (w, before) in workers.iter().zip(&calls_before) {
        calls_per_block
            .push((w.metric("herald_rpc_requests_total", &[]).await.unwrap_or(0.0) - before) / blocks);
    }
    let rss: Vec<u64> = workers.iter().map(|w| w.rss_bytes().unwrap_or(0)).collect();
    let bytes_per_subscription =
        rss.iter().sum::<u64>().saturating_sub(idle_rss) as f64 / subscriptions as f64;
    let listing = Instant::now();
    let mut after: Option<String> = None;
    let mut listed = 0;
    loop {
        let next = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let (status, page) = c.get(&format!("/v1/subscriptions?limit=1000{next}")).await?;
        anyhow::ensure!(status == 200, "list page after {after:?}: {status}");
        listed += page["items"].as_array().map_or(0, Vec::len);
        match page["next_after"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => break,
        }
    }
    let list_seconds = listing.elapsed().as_secs_f64();
    anyhow::ensure!(listed == subscriptions, "listed {listed} of {subscriptions}");
    let etcd_bytes = c.metric("herald_etcd_db_size_bytes").await.unwrap_or(0.0);
    let ratio = [assign_seconds / 60.0, bytes_per_subscription / 10_240.0, etcd_bytes / 500e6, max_lag / 2.0]
        .into_iter()
        .fold(0.0, f64::max);
    println!(
        "bench: scale subscriptions={subscriptions} workers={WORKERS} seconds={seconds} \
         registrations_per_s={registration_rate:.0} assign_s={assign_seconds:.1} \
         rss_mb_per_worker={} bytes_per_subscription={bytes_per_subscription:.0} etcd_db_mb={:.1} \
         list_all_pages_s={list_seconds:.1} rpc_calls_per_block_per_worker={} max_lag_blocks={max_lag:.0} \
         target_assign_s=60 target_bytes_per_subscription=10240 target_etcd_db_mb=500 target_max_lag_blocks=2 \
         ratio={ratio:.3}",
        rss.iter().map(|b| format!("{:.0}", *b as f64 / 1e6)).collect::<Vec<_>>().join(","),
        etcd_bytes / 1e6,
        calls_per_block.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>().join(","),
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let only = std::env::var("BENCH").ok().filter(|b| !b.is_empty());
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let known = ["planner", "backfill", "live", "fanout", "takeover", "drain", "scale"];
    if let Some(o) = &only {
        anyhow::ensure!(known.contains(&o.as_str()), "unknown BENCH={o}; known: {known:?}");
    }
    if wanted("planner") {
        planner();
    }
    if wanted("backfill") {
        backfill().await?;
    }
    if wanted("live") {
        live().await?;
    }
    if wanted("fanout") {
        fanout().await?;
    }
    if wanted("takeover") {
        takeover().await?;
    }
    if wanted("drain") {
        drain().await?;
    }
    if only.as_deref() == Some("scale") {
        scale().await?;
    }
    Ok(())
}
