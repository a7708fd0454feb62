//! The coordinator's election against a real etcd: a term of leadership ends, and its writes
//! are refused, as soon as etcd no longer holds its lease, whatever the former leader's own
//! clock or scheduling says. Found by the chaos soak: a leader stopped past its lease acted,
//! and said it led, for a renewal round trip after it ran again (seed 1), and kept saying so
//! for seconds after it stepped down, while a round stuck in an etcd call wound down (seed 2).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use herald_coordinator::election::{self, LeaderFence, Leadership};
use herald_coordinator::metrics::Metrics;
use herald_tests::services::Etcd;
use herald_tests::wait_for;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

const ELECTION: &str = "herald-test/coordinator/leader";
const TIMEOUT: Duration = Duration::from_secs(20);

/// Leader-only work that reports each term's fence, and when the term ends. Once cancelled it
/// lingers until `release` (a round stuck in an etcd call that has not timed out yet).
struct Recorder {
    terms: mpsc::UnboundedSender<LeaderFence>,
    ended: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

impl Leadership for Recorder {
    async fn lead(&self, fence: LeaderFence, cancel: CancellationToken) {
        let _ = self.terms.send(fence);
        cancel.cancelled().await;
        self.release.notified().await;
        let _ = self.ended.send(());
    }
}

/// A write only this term's leader may make.
async fn fenced_put(client: &Client, fence: &LeaderFence, value: &str) -> anyhow::Result<bool> {
    let txn = Txn::new().when([fence.compare()]).and_then([TxnOp::put("herald-test/plan", value, None)]);
    Ok(client.clone().txn(txn).await?.succeeded())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_whose_lease_etcd_dropped_ends_and_its_writes_are_refused() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let client = Client::connect([etcd.endpoint()], None).await?;
    let (terms_tx, mut terms) = mpsc::unbounded_channel();
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let release = Arc::new(Notify::new());
    let election = tokio::spawn(election::run(
        client.clone(),
        ELECTION.into(),
        "coordinator-a".into(),
        Duration::from_secs(2),
        metrics.clone(),
        Recorder { terms: terms_tx, ended: ended_tx, release: release.clone() },
        shutdown.clone(),
    ));

    let first = tokio::time::timeout(TIMEOUT, terms.recv()).await?.expect("a first term");
    assert!(fenced_put(&client, &first, "first term").await?, "the leader's own write was refused");

    // etcd drops the term's lease (as it does once a stopped leader misses its renewals).
    let keys = client.clone().get(ELECTION, Some(GetOptions::new().with_prefix())).await?;
    let lease = keys.kvs().first().map(|kv| kv.lease()).expect("the election key is on a lease");
    client.clone().lease_revoke(lease).await?;

    // The former term can write nothing more, and it stops saying it leads even while its
    // work is still winding down; then it ends.
    assert!(!fenced_put(&client, &first, "stale").await?, "a write of an ended term was accepted");
    wait_for("the replica to stop saying it leads", TIMEOUT, || async {
        (metrics.is_leader.get() == 0).then_some(())
    })
    .await?;
    assert!(ended.try_recv().is_err(), "the work ended before it was released");
    release.notify_one();
    tokio::time::timeout(TIMEOUT, ended.recv()).await?.expect("the first term ended");

    // The replica campaigns again and wins a new term, whose fence is not the old one's.
    let second = tokio::time::timeout(TIMEOUT, terms.recv()).await?.expect("a second term");
    assert_ne!(first, second);
    assert_eq!(metrics.is_leader.get(), 1);
    assert!(fenced_put(&client, &second, "second term").await?);
    assert!(!fenced_put(&client, &first, "stale again").await?);
    let plan = client.clone().get("herald-test/plan", None).await?;
    assert_eq!(plan.kvs().first().map(|kv| kv.value()), Some(&b"second term"[..]));

    shutdown.cancel();
    release.notify_one();
    election.await?;
    Ok(())
}
