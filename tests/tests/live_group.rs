//! Merged live fetching against real anvil: subscriptions at the head share one `eth_getLogs`
//! per new block range, and a subscription that finishes its backfill joins them with no gap
//! and no overlap.

use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::check::assert_exact_transfers;
use herald_tests::herald::wait_for_cursor;
use herald_tests::rpc_proxy::RpcProxy;
use herald_tests::{Stack, StreamReader, WorkerProcess, init_tracing, register_subscription};

const TIMEOUT: Duration = Duration::from_secs(90);
const LIVE: usize = 20;

/// 20 subscriptions at the head and one backfilling 50,000 logs: the live ones keep up block by
/// block meanwhile, calls per block do not grow with their number, and the backfilled one ends
/// up with every log exactly once, in order, across its switch to the shared fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_joins_the_live_group_without_gap_or_overlap() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    for _ in 0..50 {
        stack.chain.emit_many(1000).await?;
    }
    let proxy = RpcProxy::start(&stack.anvil.url()).await?;
    let mut etcd = stack.etcd.client().await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.rpc = proxy.url();
    settings.max_block_range = 1000;
    let worker = WorkerProcess::start(settings)?;
    let fail = |e: anyhow::Error| anyhow::anyhow!("{e}\n{}", worker.log_tail());

    let head = stack.chain.head().await?;
    let mut live = Vec::new();
    for i in 0..LIVE {
        let mut spec = stack.subscription(&format!("live-{i:02}"), TRANSFER_EVENT);
        spec.start_block = herald_proto::StartBlock::Number(head + 1);
        register_subscription(&mut etcd, &spec, "worker-a").await?;
        live.push(spec);
    }
    // The live subscriptions are at the head before the backfill starts.
    let first_live = stack.chain.emit_many(2).await?;
    for spec in &live {
        wait_for_cursor(&stack.etcd, &spec.id, first_live, TIMEOUT).await.map_err(fail)?;
    }

    let backfill = stack.subscription("backfill", TRANSFER_EVENT);
    register_subscription(&mut etcd, &backfill, "worker-a").await?;
    let calls_before = proxy.counters().get_logs.load(Ordering::SeqCst);
    const BLOCKS: u64 = 15;
    let mut last = first_live;
    for _ in 0..BLOCKS {
        last = stack.chain.emit_many(2).await?;
        for spec in &live {
            wait_for_cursor(&stack.etcd, &spec.id, last, TIMEOUT).await.map_err(fail)?;
        }
    }
    wait_for_cursor(&stack.etcd, &backfill.id, last, TIMEOUT).await.map_err(fail)?;
    let calls = proxy.counters().get_logs.load(Ordering::SeqCst) - calls_before;

    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let stream = reader.read_all(&backfill.subject()).await?;
    assert_exact_transfers(&stream, 50_000 + 2 + 2 * BLOCKS);
    for spec in &live {
        let messages = reader.read_all(&spec.subject()).await?;
        assert_eq!(messages.len() as u64, 2 + 2 * BLOCKS, "{}", spec.id);
    }
    // Without merging, the live subscriptions alone would ask 20 times per block.
    assert!(
        calls < BLOCKS * 6,
        "{calls} eth_getLogs calls for {BLOCKS} blocks with {LIVE} live subscriptions and a backfill"
    );
    Ok(())
}
