//! Regressions of the reorg path (issue 13), against real anvil, etcd and nats-server.
//!
//! Each test builds the situation of one defect and then asserts the guarantee of
//! `docs/reorgs.md`: once the worker has caught up, the subscription's stream, folded (add on
//! `removed: false`, remove on `removed: true`, keyed by `(block_hash, log_index)`), equals the
//! canonical chain's logs. Every wait polls a condition against a deadline.

use std::sync::Mutex;
use std::time::Duration;

use alloy_primitives::B256;
use herald_proto::{EventEnvelope, SubscriptionSpec, SubscriptionState};
use herald_tests::chain::{TRANSFER_EVENT, TestChain};
use herald_tests::check::{FoldedLog, fold_set, try_fold};
use herald_tests::herald::{owner_of, read_cursor, request_rewind, set_state, wait_for_cursor};
use herald_tests::rpc_proxy::RpcProxy;
use herald_tests::tcp_proxy::TcpProxy;
use herald_tests::{
    Anvil, Stack, StreamReader, WorkerProcess, init_tracing, register_subscription, wait_for,
};

/// Deadline of each step of a scenario.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for the stream to fold to the canonical chain once the scenario is complete (above
/// the worker's 10 s idle commit interval, so a cursor over empty blocks gets committed).
const SETTLE: Duration = Duration::from_secs(25);

/// How the stream is folded.
#[derive(Debug, Clone, Copy)]
enum Fold {
    /// [`try_fold`]: a log published again while live is a duplicate, a failure.
    Strict,
    /// [`fold_set`]: a replay under a higher rewind epoch legitimately re-adds live logs.
    Set,
}

/// A short form of a block hash, for failure messages.
fn short(hash: &B256) -> String {
    hash.to_string()[..10].to_owned()
}

/// The stream as a consumer reads it, one line a message, for failure messages.
fn show_stream(stream: &[EventEnvelope]) -> String {
    stream
        .iter()
        .enumerate()
        .map(|(n, m)| {
            format!(
                "  #{n} block {} {} log {} value {} epoch {}{}",
                m.block_number,
                short(&m.block_hash),
                m.log_index,
                m.args["value"].as_str().unwrap_or("?"),
                m.rewind_epoch,
                if m.removed { " RETRACTION" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn show_logs(logs: &[FoldedLog]) -> String {
    let logs: Vec<String> =
        logs.iter().map(|(h, i, v)| format!("({} log {i} value {v})", short(h))).collect();
    format!("[{}]", logs.join(", "))
}

/// The contract's Transfers on `chain` up to its head, as the fold shows them.
async fn canonical(chain: &TestChain) -> anyhow::Result<(u64, Vec<FoldedLog>)> {
    let head = chain.head().await?;
    let logs = chain.canonical_transfers(head).await?;
    Ok((head, logs.into_iter().map(|(h, i, v)| (h, i, v.to_string())).collect()))
}

/// Waits until `fold` of the subscription's stream equals `want`; fails at once on a
/// violation of the strict fold (a duplicate, a retraction of a log never published), else
/// after `timeout` with both sides, the stream and the worker's log.
async fn wait_for_fold(
    what: &str,
    reader: &StreamReader,
    spec: &SubscriptionSpec,
    fold: Fold,
    want: &[FoldedLog],
    worker: &WorkerProcess,
    timeout: Duration,
) -> anyhow::Result<()> {
    let last: Mutex<Vec<EventEnvelope>> = Mutex::new(Vec::new());
    let outcome = wait_for(what, timeout, || async {
        let stream = reader.read_all(&spec.subject()).await.ok()?;
        let folded = match fold {
            Fold::Strict => try_fold(&stream),
            Fold::Set => Ok(fold_set(&stream)),
        };
        *last.lock().unwrap() = stream;
        match folded {
            Err(violation) => Some(Err(violation)),
            Ok(folded) => (folded == want).then_some(Ok(())),
        }
    })
    .await;
    let stream = last.into_inner().unwrap();
    let folded = match fold {
        Fold::Strict => try_fold(&stream).unwrap_or_default(),
        Fold::Set => fold_set(&stream),
    };
    // Publishes JetStream acknowledged as duplicates (dropped), by the worker's own count.
    let duplicates = worker.metric("herald_publish_duplicates_total", &[]).await.unwrap_or(0.0);
    let detail = |headline: String| {
        let missing: Vec<FoldedLog> = want.iter().filter(|l| !folded.contains(l)).cloned().collect();
        let extra: Vec<FoldedLog> = folded.iter().filter(|l| !want.contains(l)).cloned().collect();
        anyhow::anyhow!(
            "{headline}\n{fold:?} fold: {} log(s) missing {}, {} extra {}\nwant:   {}\nfolded: {}\n\
             stream ({duplicates} publish(es) dropped as duplicates):\n{}\n{}",
            missing.len(),
            show_logs(&missing),
            extra.len(),
            show_logs(&extra),
            show_logs(want),
            show_logs(&folded),
            show_stream(&stream),
            worker.log_tail()
        )
    };
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(violation)) => Err(detail(format!("{what}: the stream breaks the fold: {violation}"))),
        Err(e) => Err(detail(format!("{e}: the folded stream never equalled it"))),
    }
}

/// The guarantee: the subscription's cursor reaches the head of `chain` and its folded stream
/// equals the canonical logs of `chain` up to that head.
async fn assert_folds_to_canonical(
    stack: &Stack,
    chain: &TestChain,
    reader: &StreamReader,
    spec: &SubscriptionSpec,
    fold: Fold,
    worker: &WorkerProcess,
) -> anyhow::Result<()> {
    let (head, want) = canonical(chain).await?;
    wait_for_cursor(&stack.etcd, &spec.id, head, SETTLE)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    wait_for_fold(
        &format!("the folded stream to equal the canonical logs up to block {head}"),
        reader,
        spec,
        fold,
        &want,
        worker,
        SETTLE,
    )
    .await
}

/// Starts the stack, registers a `confirmations: 0` subscription named `id` and starts a worker
/// for it.
async fn start(id: &str) -> anyhow::Result<(Stack, SubscriptionSpec, WorkerProcess, StreamReader)> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription(id, TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    Ok((stack, spec, worker, reader))
}

/// Block `n` has no log of the subscription, block `n + 1` has X, published. A reorg of depth 2
/// replaces both with new blocks holding the calls `emits`; the new block `n` holds a log.
/// The fork is at `n` (its hash changed), although nothing was published from it: the worker
/// must fetch the new block `n` again.
async fn a_replaced_block_that_held_no_log(id: &str, emits: &[(u64, u64)]) -> anyhow::Result<()> {
    let (stack, spec, worker, reader) = start(id).await?;
    // Earlier logs, below the reorg.
    stack.chain.emit_many(2).await?;
    stack.chain.mine(1).await?;
    let x_block = stack.chain.emit_many(1).await?;
    wait_for_cursor(&stack.etcd, &spec.id, x_block, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let before = reader.read_all(&spec.subject()).await?;
    assert_eq!(before.len(), 3, "X and the two earlier logs are published");
    assert_eq!(before[2].block_number, x_block);

    stack.chain.reorg(2, emits).await?;
    // The new block n (x_block - 1) holds a log of the subscription; X's block is replaced.
    let (_, logs) = canonical(&stack.chain).await?;
    let new_n = stack.chain.block_hash(x_block - 1).await?;
    assert!(logs.iter().any(|(h, _, _)| Some(*h) == new_n), "the new block {} has no log", x_block - 1);
    assert_ne!(stack.chain.block_hash(x_block).await?, Some(before[2].block_hash), "X's block not replaced");

    assert_folds_to_canonical(&stack, &stack.chain, &reader, &spec, Fold::Strict, &worker).await
}

/// Defect 1: the fork is taken from published messages, not from block hashes. X's call moves
/// from block n + 1 into the new block n, which held no log before: today X is retracted and
/// never delivered at its new position (the task resumes after block n).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_moved_into_a_replaced_block_that_held_no_log_is_delivered() -> anyhow::Result<()> {
    // X's call, alone in the new block n; the new block n + 1 is empty.
    a_replaced_block_that_held_no_log("moved", &[(1, 0)]).await
}

/// Defect 1, second form: a new log appears in the new block n (which held none) while X's
/// call stays in block n + 1: today X is retracted and published again, the new log in block n
/// never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_log_in_a_replaced_block_below_the_first_published_one_is_delivered() -> anyhow::Result<()> {
    a_replaced_block_that_held_no_log("appeared", &[(1, 0), (1, 1)]).await
}

/// Defect 2: a rewind after a reorg the task has not handled yet. Blocks n..n+2 (one log each)
/// are published, the subscription is paused (its task stopped), a reorg replaces the three
/// blocks (the same calls in new blocks), and a rewind from the cursor's block is requested
/// before the subscription resumes. The orphaned logs must be retracted and the new canonical
/// ones published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_after_an_unhandled_reorg_retracts_and_replays() -> anyhow::Result<()> {
    let (stack, spec, worker, reader) = start("rewound").await?;
    let mut etcd = stack.etcd.client().await?;
    stack.chain.emit_many(2).await?;
    let mut last = 0;
    for _ in 0..3 {
        last = stack.chain.emit_many(1).await?;
    }
    wait_for_cursor(&stack.etcd, &spec.id, last, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(reader.read_all(&spec.subject()).await?.len(), 5);

    assert_eq!(owner_of(&mut etcd, &spec.id).await?.as_deref(), Some("worker-a"));
    set_state(&mut etcd, &spec.id, SubscriptionState::Paused).await?;
    // The owner key is released only after the task ended.
    wait_for("the paused subscription's task to stop", TIMEOUT, || async {
        let owner = owner_of(&mut stack.etcd.client().await.ok()?, &spec.id).await.ok()?;
        (owner.is_none() && worker.log().contains("stopping subscription task")).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;

    // The same three calls, one in each new block: same positions, new block hashes.
    stack.chain.reorg(3, &[(1, 0), (1, 1), (1, 2)]).await?;
    // The worker's head tracker has the new blocks before the task starts again (else the
    // task would find the tracker's old blocks, and the outcome would depend on the timing).
    wait_for("the head tracker to see the reorg", TIMEOUT, || async {
        worker.log().contains("herald_worker::heads: chain reorganised").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let cursor = read_cursor(&mut etcd, &spec.id).await?.expect("a cursor");
    assert_eq!(cursor.block_number, last);
    assert_ne!(
        stack.chain.block_hash(last).await?,
        Some(cursor.block_hash),
        "the cursor's block not replaced"
    );

    request_rewind(&mut etcd, &spec.id, cursor.block_number).await?;
    set_state(&mut etcd, &spec.id, SubscriptionState::Active).await?;
    assert_folds_to_canonical(&stack, &stack.chain, &reader, &spec, Fold::Set, &worker).await
}

/// Defect 5: a stream that lost acknowledged messages is never repaired. The last 4 messages of
/// the subject are deleted while the worker is down; the worker that starts again must publish
/// them again (the stream is the journal: its tail is behind the cursor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_lost_from_the_stream_tail_are_published_again() -> anyhow::Result<()> {
    let (stack, spec, mut worker, reader) = start("lossy").await?;
    let mut last = 0;
    for _ in 0..4 {
        last = stack.chain.emit_many(2).await?;
    }
    wait_for_cursor(&stack.etcd, &spec.id, last, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(reader.read_all(&spec.subject()).await?.len(), 8);

    worker.kill().await;
    let deleted = reader.delete_last(&spec.subject(), 4).await?;
    assert_eq!(deleted.len(), 4);
    assert_eq!(reader.read_all(&spec.subject()).await?.len(), 4, "the last 4 messages are gone");

    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    assert_folds_to_canonical(&stack, &stack.chain, &reader, &spec, Fold::Strict, &worker).await
}

/// Defect 6: A-B-A at the tip. Two nodes behind one endpoint disagree about block n: anvil B is
/// forked from anvil A at block n - 1 (same blocks and hashes up to it) and mines its own block
/// n. The endpoint serves A (its log X in block n is published), then B (X is retracted, B's
/// logs published), then A again: A's block n is canonical again and X must be delivered again.
/// Today X goes out again under its original message id and JetStream drops it as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_orphaned_then_canonical_again_is_delivered_again() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("flapping", TRANSFER_EVENT);
    let proxy = RpcProxy::start(&stack.anvil.url()).await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.rpc = proxy.url();
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let worker = WorkerProcess::start(settings)?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let a = &stack.chain;

    // Shared history: blocks up to n - 1, with logs, published.
    let shared = a.emit_many(2).await?;
    wait_for_cursor(&stack.etcd, &spec.id, shared, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let anvil_b = Anvil::fork(&stack.anvil.url(), shared).await?;
    let b = TestChain::attach(&anvil_b.url(), a.contract).await?;
    assert_eq!(b.block_hash(shared).await?, a.block_hash(shared).await?, "B shares block n - 1");

    // Block n: X on A; two other logs on B (the first at X's position).
    let n = a.emit_many(1).await?;
    assert_eq!(b.emit_many(2).await?, n);
    let a_n = a.block_hash(n).await?.expect("A's block n");
    assert_ne!(b.block_hash(n).await?, Some(a_n), "A and B disagree about block n");
    let (_, on_a) = canonical(a).await?;
    let (_, on_b) = canonical(&b).await?;
    assert_eq!(on_a.len(), 3);
    assert_eq!(on_b.len(), 4);

    // A: X is published.
    wait_for_fold("the stream to fold to A's logs", &reader, &spec, Fold::Strict, &on_a, &worker, TIMEOUT)
        .await?;
    // B: X is retracted, B's logs are published.
    proxy.set_upstream(&anvil_b.url());
    wait_for_fold("the stream to fold to B's logs", &reader, &spec, Fold::Strict, &on_b, &worker, TIMEOUT)
        .await?;
    let stream = reader.read_all(&spec.subject()).await?;
    assert!(stream.iter().any(|m| m.removed && m.block_hash == a_n), "X was not retracted");
    // A again, one block longer: its block n is canonical again.
    proxy.set_upstream(&stack.anvil.url());
    a.mine(1).await?;
    assert_folds_to_canonical(&stack, a, &reader, &spec, Fold::Strict, &worker).await
}

/// Defect 7: the restart skip compares (block number, log index), not hashes. The worker
/// publishes blocks h..h+2 but its cursor commit never reaches etcd (its etcd connection is
/// black-holed: the writes hang, and none of them lands later), then it is SIGKILLed. A reorg
/// replaces those blocks with logs at the same positions. The next worker resumes at h - 1 and
/// finds the old logs at the stream's tail: it must not skip the new logs as published, and must
/// retract the orphaned ones.
///
/// (SIGSTOP of etcd, the obvious way to hang the commit, races: the commit request sits in
/// etcd's socket buffer and can be applied when etcd resumes, after the worker died. The
/// black-holing proxy drops it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_crash_between_publish_and_commit_compares_hashes_before_skipping()
-> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let spec = stack.subscription("crashed", TRANSFER_EVENT);
    let etcd_proxy = TcpProxy::start(&format!("127.0.0.1:{}", stack.etcd.port())).await?;
    let mut settings = stack.worker_settings("worker-a");
    settings.etcd = format!("http://{}", etcd_proxy.addr());
    // The worker keeps publishing without etcd until its local lease deadline (2/3 of the TTL
    // after its last renewal): long enough for three blocks.
    settings.lease_ttl_secs = 30;
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let mut worker = WorkerProcess::start(settings)?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;

    let committed = stack.chain.emit_many(2).await?;
    wait_for_cursor(&stack.etcd, &spec.id, committed, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;

    etcd_proxy.black_hole();
    // The worker is stopped while the three blocks are mined, so that it sees them at once and
    // publishes them as one range before its commit hangs (one at a time, the first hung
    // commit would hold the other two back).
    worker.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut last = 0;
    for _ in 0..3 {
        last = stack.chain.emit_many(1).await?;
    }
    worker.signal(nix::sys::signal::Signal::SIGCONT);
    let published = reader
        .wait_for_count(&spec.subject(), 5, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(published[4].block_number, last);
    let cursor = read_cursor(&mut etcd, &spec.id).await?.expect("a cursor");
    assert_eq!(cursor.block_number, committed, "the commit after publishing must not have landed");
    worker.kill().await;

    // The same calls in new blocks: the same (block number, log index) positions, new hashes.
    stack.chain.reorg(3, &[(1, 0), (1, 1), (1, 2)]).await?;
    for old in &published[2..] {
        assert_ne!(stack.chain.block_hash(old.block_number).await?, Some(old.block_hash));
    }
    assert_eq!(read_cursor(&mut etcd, &spec.id).await?.map(|c| c.block_number), Some(committed));

    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    assert_folds_to_canonical(&stack, &stack.chain, &reader, &spec, Fold::Strict, &worker).await
}
