//! Chain reorganisations against real anvil (`anvil_reorg`).

use std::time::Duration;

use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::check::fold;
use herald_tests::herald::wait_for_cursor;
use herald_tests::{Stack, StreamReader, WorkerProcess, init_tracing, register_subscription, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);

/// With `confirmations: 3`, a reorg of depth <= 3 replaces only blocks that were never
/// published: no retraction, and the stream equals the canonical chain's logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shallow_reorgs_below_the_confirmation_depth_are_invisible() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let mut spec = stack.subscription("confirmed", TRANSFER_EVENT);
    spec.confirmations = 3;
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;

    for depth in [1u64, 2, 3] {
        for _ in 0..4 {
            stack.chain.emit_many(3).await?;
        }
        let head = stack.chain.head().await?;
        wait_for_cursor(&stack.etcd, &spec.id, head - 3, TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
        // The replaced blocks drop their logs, and the new ones hold different ones.
        stack.chain.reorg(depth, &[(2, 0)]).await?;
    }
    stack.chain.mine(3).await?;
    let head = stack.chain.head().await?;
    let canonical = stack.chain.canonical_transfers(head - 3).await?;
    // 3 x 12 emitted; the reorgs dropped the last 1, 2 and 3 blocks (3 logs each) and added 2
    // logs each time: proof that published-looking history really changed.
    assert_eq!(canonical.len(), 36 - 3 * (1 + 2 + 3) + 3 * 2);
    let stream = wait_for("the stream to reach the canonical logs", TIMEOUT, || async {
        let all = reader.read_all(&spec.subject()).await.ok()?;
        (all.len() >= canonical.len()).then_some(all)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert!(stream.iter().all(|m| !m.removed), "a retraction was published");
    let got: Vec<_> = stream
        .iter()
        .map(|m| (m.block_hash, m.log_index, m.args["value"].as_str().unwrap().to_owned()))
        .collect();
    let want: Vec<_> = canonical.iter().map(|(h, i, v)| (*h, *i, v.to_string())).collect();
    assert_eq!(got, want);
    Ok(())
}

/// Runs reorgs of the given depths against a subscription with `confirmations`, each after the
/// worker caught up, and checks that the folded stream equals the canonical logs. Returns the
/// number of retractions and the worker (for its metrics).
async fn reorgs_fold_to_the_canonical_chain(
    confirmations: u64,
    depths: &[u64],
) -> anyhow::Result<(usize, f64)> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let mut spec = stack.subscription("live", TRANSFER_EVENT);
    spec.confirmations = confirmations;
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let caught_up = |target: u64| {
        let etcd = &stack.etcd;
        let id = &spec.id;
        let worker = &worker;
        async move {
            wait_for_cursor(etcd, id, target, TIMEOUT)
                .await
                .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))
        }
    };
    for &depth in depths {
        for _ in 0..6 {
            stack.chain.emit_many(2).await?;
        }
        let head = stack.chain.head().await?;
        caught_up(head - confirmations).await?;
        // Replaced blocks lose their logs; the new first block holds 3 new ones, and the
        // following new block 1 more (when the reorg is deep enough to have one).
        let emits: Vec<(u64, u64)> = if depth > 1 { vec![(3, 0), (1, 1)] } else { vec![(3, 0)] };
        stack.chain.reorg(depth, &emits).await?;
        // New blocks on top let the subscription see (and confirm) the new branch.
        stack.chain.mine(confirmations + 1).await?;
    }
    let head = stack.chain.head().await?;
    caught_up(head - confirmations).await?;
    let canonical: Vec<_> = stack
        .chain
        .canonical_transfers(head - confirmations)
        .await?
        .into_iter()
        .map(|(h, i, v)| (h, i, v.to_string()))
        .collect();
    let stream = reader.read_all(&spec.subject()).await?;
    assert_eq!(fold(&stream), canonical, "the folded stream differs from the canonical chain");
    let retractions = stream.iter().filter(|m| m.removed).count();
    let deep = worker.metric("herald_deep_reorgs_total", &[("subscription_id", "live")]).await.unwrap_or(0.0);
    Ok((retractions, deep))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_logs_of_orphaned_blocks_are_retracted_then_replaced() -> anyhow::Result<()> {
    let (retractions, _) = reorgs_fold_to_the_canonical_chain(0, &[1, 2, 5]).await?;
    assert!(retractions > 0, "reorgs of published blocks must retract");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_deeper_than_the_confirmations_retracts_and_is_counted() -> anyhow::Result<()> {
    let (retractions, deep) = reorgs_fold_to_the_canonical_chain(3, &[2, 5]).await?;
    assert!(retractions > 0, "a depth-5 reorg under 3 confirmations must retract");
    assert!(deep >= 1.0, "the deep-reorg metric must count it");
    Ok(())
}

/// The chain reorganises while the owning worker is down: the worker that starts the
/// subscription again finds the cursor's block orphaned, retracts and republishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_while_the_owner_is_down_is_repaired_on_restart() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("live", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    for _ in 0..6 {
        stack.chain.emit_many(2).await?;
    }
    let head = stack.chain.head().await?;
    wait_for_cursor(&stack.etcd, &spec.id, head, TIMEOUT).await?;

    worker.kill().await;
    stack.chain.reorg(3, &[(3, 0), (1, 1)]).await?;
    stack.chain.mine(1).await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let head = stack.chain.head().await?;
    wait_for_cursor(&stack.etcd, &spec.id, head, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let canonical: Vec<_> = stack
        .chain
        .canonical_transfers(head)
        .await?
        .into_iter()
        .map(|(h, i, v)| (h, i, v.to_string()))
        .collect();
    let stream = reader.read_all(&spec.subject()).await?;
    assert!(stream.iter().any(|m| m.removed), "the orphaned logs were not retracted");
    let shown: Vec<_> =
        stream.iter().map(|m| (m.block_number, m.log_index, m.removed, m.args["value"].clone())).collect();
    assert_eq!(fold(&stream), canonical, "{shown:?}\n{}", worker.log_tail());
    Ok(())
}
