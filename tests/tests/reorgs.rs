//! Chain reorganisations against real anvil (`anvil_reorg`).

use std::time::Duration;

use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::herald::read_cursor;
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
        wait_for("the cursor at head - 3", TIMEOUT, || async {
            let c = read_cursor(&mut stack.etcd.client().await.ok()?, &spec.id).await.ok()??;
            (c.block_number >= head - 3).then_some(())
        })
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
