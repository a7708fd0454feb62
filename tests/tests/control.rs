//! Operator control, worker side: pause, resume, rewind and delete take effect promptly and
//! safely. The records are changed in etcd exactly as the coordinator's API does.

use std::time::Duration;

use herald_proto::SubscriptionState;
use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::check::{assert_exact_transfers, assert_monotonic, cursor_history};
use herald_tests::herald::{delete_subscription, read_cursor, request_rewind, set_state, wait_for_cursor};
use herald_tests::{Stack, StreamReader, WorkerProcess, init_tracing, register_subscription, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_rewind_and_delete() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let spec = stack.subscription("transfers", TRANSFER_EVENT);
    // The canary follows the same logs: once its cursor passed a block, the worker has looked
    // at that block, so silence on the controlled subscription is meaningful.
    let canary = stack.subscription("canary", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    register_subscription(&mut etcd, &canary, "worker-a").await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let canary_past = |block: u64| {
        let etcd = &stack.etcd;
        let canary = &canary.id;
        async move { wait_for_cursor(etcd, canary, block, TIMEOUT).await }
    };
    let assigned = |n: f64| {
        let worker = &worker;
        async move {
            wait_for(&format!("{n} running subscriptions"), TIMEOUT, || async {
                (worker.metric("herald_worker_assigned_subscriptions", &[]).await? == n).then_some(())
            })
            .await
        }
    };

    // Flowing.
    for _ in 0..5 {
        stack.chain.emit_many(10).await?;
    }
    reader.wait_for_count(&spec.subject(), 50, TIMEOUT).await?;

    // Paused: the task stops; new logs are not published.
    set_state(&mut etcd, &spec.id, SubscriptionState::Paused).await?;
    assigned(1.0).await?;
    let mut last = 0;
    for _ in 0..3 {
        last = stack.chain.emit_many(10).await?;
    }
    canary_past(last).await?;
    assert_eq!(reader.read_all(&spec.subject()).await?.len(), 50, "published while paused");

    // Resumed: continues from the cursor, no gap, no duplicate.
    set_state(&mut etcd, &spec.id, SubscriptionState::Active).await?;
    let all = reader.wait_for_count(&spec.subject(), 80, TIMEOUT).await?;
    assert_exact_transfers(&all, 80);

    // Rewound: everything from the block of transfer #25 on is delivered again, with epoch 1,
    // although the original messages are well inside the duplicate window.
    let from_block = all[25].block_number;
    let replayed: Vec<_> = all.iter().filter(|m| m.block_number >= from_block).cloned().collect();
    request_rewind(&mut etcd, &spec.id, from_block).await?;
    let after = reader
        .wait_for_count(&spec.subject(), 80 + replayed.len(), TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(after.len(), 80 + replayed.len());
    assert!(after[..80].iter().all(|m| m.rewind_epoch == 0));
    for (again, original) in after[80..].iter().zip(&replayed) {
        assert_eq!(again.rewind_epoch, 1);
        assert_eq!((again.position(), &again.args), (original.position(), &original.args));
        assert_ne!(again.msg_id(), original.msg_id());
    }
    let history = cursor_history(&mut etcd, &spec.id).await?;
    let rewind_at = history.iter().position(|c| c.epoch == 1).expect("the rewind moved the cursor");
    assert_eq!(history[rewind_at].block_number, from_block - 1);
    assert_monotonic(&history[..rewind_at]);
    assert_monotonic(&history[rewind_at..]);

    // Deleted: the task stops, the cursor is gone and stays gone, nothing more is published.
    let before_delete = reader.read_all(&spec.subject()).await?.len();
    delete_subscription(&mut etcd, &spec.id).await?;
    assigned(1.0).await?;
    for _ in 0..3 {
        last = stack.chain.emit_many(10).await?;
    }
    canary_past(last).await?;
    assert_eq!(reader.read_all(&spec.subject()).await?.len(), before_delete);
    assert_eq!(read_cursor(&mut etcd, &spec.id).await?, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_and_registered_again_subscription_is_delivered_again() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let spec = stack.subscription("transfers", TRANSFER_EVENT);
    for _ in 0..3 {
        stack.chain.emit_many(10).await?;
    }
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let _worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let first = reader.wait_for_count(&spec.subject(), 30, TIMEOUT).await?;
    assert_exact_transfers(&first, 30);

    // Same id, new registration: well inside the duplicate window, and with the old messages
    // still at the subject's tail, the new registration gets everything again.
    delete_subscription(&mut etcd, &spec.id).await?;
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let all = reader.wait_for_count(&spec.subject(), 60, TIMEOUT).await?;
    assert_exact_transfers(&all[30..], 30);
    assert!(all[30..].iter().all(|m| m.registration > first[0].registration));
    Ok(())
}
