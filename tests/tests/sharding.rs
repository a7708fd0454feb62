//! Sharding against real etcd, NATS and anvil: balance, takeover after SIGKILL, movement on a
//! join, coordinator failover and an etcd restart. The consumer-side check reads the whole
//! stream and finds, per subscription, 0 lost, 0 duplicate and 0 out-of-order messages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald_proto::EventEnvelope;
use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::herald::{CoordinatorProcess, CoordinatorSettings};
use herald_tests::{Stack, StreamReader, WorkerProcess, init_tracing, wait_for};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);
const SUBSCRIPTIONS: u64 = 60;
const ROUNDS: u64 = 12;

/// Subscription `i` hears Transfer `k` exactly when `k % 60 == i` (for the first `ROUNDS` rounds
/// of `emitMany(60)`), so every subscription receives one message per round.
fn body(stack: &Stack, i: u64) -> Value {
    let from: Vec<String> =
        (0..ROUNDS).map(|round| format!("0x{:040x}", 0x1000 + i + SUBSCRIPTIONS * round)).collect();
    json!({
        "id": format!("sub-{i:02}"), "chain_id": 31337, "address": stack.chain.contract.to_string(),
        "event": TRANSFER_EVENT, "start_block": 0, "filters": {"from": from},
    })
}

/// Reads the whole stream and checks every subscription has exactly `rounds` messages, in
/// order, with the values it should hear. Returns `None` while messages are missing.
async fn check_stream(reader: &StreamReader, rounds: u64) -> anyhow::Result<Option<()>> {
    check_subscriptions(reader, SUBSCRIPTIONS, rounds).await
}

/// [`check_stream`] for subscriptions `0..subscriptions`.
async fn check_subscriptions(
    reader: &StreamReader,
    subscriptions: u64,
    rounds: u64,
) -> anyhow::Result<Option<()>> {
    let all = reader.read_all("herald.events.31337.>").await?;
    let mut by_sub: BTreeMap<String, Vec<&EventEnvelope>> = BTreeMap::new();
    for m in &all {
        by_sub.entry(m.subscription_id.to_string()).or_default().push(m);
    }
    for i in 0..subscriptions {
        let id = format!("sub-{i:02}");
        let got = by_sub.get(&id).map(Vec::as_slice).unwrap_or_default();
        let values: Vec<u64> =
            got.iter().map(|m| m.args["value"].as_str().unwrap().parse().unwrap()).collect();
        let want: Vec<u64> = (0..rounds).map(|r| i + SUBSCRIPTIONS * r).collect();
        if values.len() < want.len() {
            return Ok(None);
        }
        anyhow::ensure!(
            values == want,
            "{id}: got {values:?}, want {want:?} (lost, duplicated or out of order)"
        );
    }
    Ok(Some(()))
}

async fn emit_rounds(stack: &Stack, n: u64) -> anyhow::Result<()> {
    for _ in 0..n {
        stack.chain.emit_many(SUBSCRIPTIONS).await?;
    }
    Ok(())
}

async fn assignments(c: &CoordinatorProcess) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let (_, page) = c.get("/v1/subscriptions?limit=1000").await?;
    Ok(page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v["assigned_worker"].as_str().map(str::to_owned)))
        .collect())
}

/// Waits until every subscription is assigned to one of `workers`, balanced within one.
async fn wait_balanced(c: &CoordinatorProcess, workers: &[&str]) -> anyhow::Result<BTreeMap<String, String>> {
    wait_for(&format!("60 subscriptions balanced over {workers:?}"), TIMEOUT, || async {
        let current = assignments(c).await.ok()?;
        let mut load: BTreeMap<&str, usize> = workers.iter().map(|w| (*w, 0)).collect();
        let mut owned = BTreeMap::new();
        for (id, worker) in &current {
            let worker = worker.as_deref()?;
            *load.get_mut(worker)? += 1;
            owned.insert(id.clone(), worker.to_owned());
        }
        let (min, max) = (load.values().min()?, load.values().max()?);
        (owned.len() as u64 == SUBSCRIPTIONS && max - min <= 1).then_some(owned)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.log_tail()))
}

fn starts_of(log: &str, id: &str) -> usize {
    let needle = format!("subscription_id={id} ");
    log.lines().filter(|l| l.contains(&needle) && l.contains("subscription started")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_takeover_and_join() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let worker = |id: &str| {
        let mut settings = stack.worker_settings(id);
        settings.lease_ttl_secs = 3;
        WorkerProcess::start(settings)
    };
    let (a, b, mut killed) = (worker("worker-a")?, worker("worker-b")?, worker("worker-c")?);
    for i in 0..SUBSCRIPTIONS {
        let (status, answer) = c.post("/v1/subscriptions", &body(&stack, i)).await?;
        anyhow::ensure!(status == 201, "{answer}");
    }
    let reader = StreamReader::connect(&stack.nats.url()).await?;

    // Balanced: 20 each.
    wait_balanced(&c, &["worker-a", "worker-b", "worker-c"]).await?;
    emit_rounds(&stack, 3).await?;
    wait_for("3 rounds everywhere", TIMEOUT, || async { check_stream(&reader, 3).await.unwrap() }).await?;

    // SIGKILL one worker with traffic flowing: its subscriptions resume on the others.
    killed.kill().await;
    let killed_at = Instant::now();
    emit_rounds(&stack, 3).await?;
    wait_balanced(&c, &["worker-a", "worker-b"]).await?;
    wait_for("6 rounds everywhere", TIMEOUT, || async { check_stream(&reader, 6).await.unwrap() }).await?;
    tracing::info!(takeover = ?killed_at.elapsed(), "takeover complete");

    // The killed worker comes back (a join: 2 -> 3), then a 4th joins (3 -> 4): about a quarter
    // moves, and the subscriptions that do not move are never restarted.
    let c_again = worker("worker-c")?;
    let before = wait_balanced(&c, &["worker-a", "worker-b", "worker-c"]).await?;
    let logs = |w: &str| match w {
        "worker-a" => a.log(),
        "worker-b" => b.log(),
        _ => c_again.log(),
    };
    // An assignment is written before its worker starts the task: wait until every owner has
    // started its subscriptions, so that later starts are restarts.
    let starts_before: BTreeMap<String, usize> =
        wait_for("every owner to start its subscriptions", TIMEOUT, || async {
            let starts: BTreeMap<String, usize> =
                before.iter().map(|(id, w)| (id.clone(), starts_of(&logs(w), id))).collect();
            starts.values().all(|n| *n >= 1).then_some(starts)
        })
        .await?;
    let d = worker("worker-d")?;
    let after = wait_balanced(&c, &["worker-a", "worker-b", "worker-c", "worker-d"]).await?;
    let moved: Vec<&String> =
        after.iter().filter(|(id, w)| before.get(*id) != Some(w)).map(|(id, _)| id).collect();
    let bound = 60usize.div_ceil(4) + 2;
    assert!(moved.len() <= bound, "{} subscriptions moved, at most {bound} expected", moved.len());
    emit_rounds(&stack, 3).await?;
    wait_for("9 rounds everywhere", TIMEOUT, || async { check_stream(&reader, 9).await.unwrap() }).await?;
    for (id, w) in &before {
        if !moved.contains(&id) {
            assert_eq!(starts_of(&logs(w), id), starts_before[id], "{id} did not move but was restarted");
        }
    }
    drop(d);
    Ok(())
}

async fn leader_of(coordinators: &[&CoordinatorProcess]) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, c) in coordinators.iter().enumerate() {
        let text = c.http().get(c.url("/metrics")).send().await.ok()?.text().await.ok()?;
        if text.lines().any(|l| l == "herald_coordinator_is_leader 1") {
            leaders.push(i);
        }
    }
    (leaders.len() == 1).then(|| leaders[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_and_etcd_restart() -> anyhow::Result<()> {
    init_tracing();
    let mut stack = Stack::start().await?;
    let mut first =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let second =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let _worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;

    let leader = wait_for("one leader", TIMEOUT, || async { leader_of(&[&first, &second]).await }).await?;
    // Make `first` the leader's handle, whichever it is.
    let (leader, standby) = if leader == 0 { (&mut first, &second) } else { (&mut { second }, &first) };
    leader.kill().await;
    let killed = Instant::now();
    wait_for("the standby to lead", TIMEOUT, || async { leader_of(&[standby]).await }).await?;
    tracing::info!(failover = ?killed.elapsed(), "standby leads");

    // Rebalancing keeps working under the new leader.
    assert_eq!(standby.post("/v1/subscriptions", &body(&stack, 0)).await?.0, 201);
    emit_rounds(&stack, 1).await?;
    wait_for("sub-00 delivered", TIMEOUT, || async {
        let all = reader.read_all("herald.events.31337.sub-00").await.ok()?;
        (all.len() == 1).then_some(())
    })
    .await?;

    // etcd restarts on the same data: everything recovers by itself.
    stack.etcd.restart().await?;
    // A write may fail while etcd is coming back; 409 means an earlier attempt landed.
    wait_for("the API to accept writes again", TIMEOUT, || async {
        let (status, _) = standby.post("/v1/subscriptions", &body(&stack, 1)).await.ok()?;
        (status == 201 || status == 409).then_some(())
    })
    .await?;
    emit_rounds(&stack, 1).await?;
    wait_for("both subscriptions delivered after the restart", TIMEOUT, || async {
        let a = reader.read_all("herald.events.31337.sub-00").await.ok()?;
        let b = reader.read_all("herald.events.31337.sub-01").await.ok()?;
        (a.len() == 2 && b.len() == 2).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", standby.log_tail()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_fences_itself_and_is_taken_over() -> anyhow::Result<()> {
    use herald_tests::check::{assert_monotonic, cursor_history};
    use nix::sys::signal::Signal;
    init_tracing();
    let stack = Stack::start().await?;
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let worker = |id: &str| {
        let mut settings = stack.worker_settings(id);
        settings.lease_ttl_secs = 3;
        WorkerProcess::start(settings)
    };
    let (_a, b) = (worker("worker-a")?, worker("worker-b")?);
    const SUBS: u64 = 10;
    for i in 0..SUBS {
        assert_eq!(c.post("/v1/subscriptions", &body(&stack, i)).await?.0, 201);
    }
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let owned_by = |worker: &'static str| {
        let c = &c;
        async move {
            let current = assignments(c).await.ok()?;
            let n = current.values().filter(|w| w.as_deref() == Some(worker)).count();
            Some((n, current.len()))
        }
    };
    wait_for("both workers own subscriptions", TIMEOUT, || async {
        let (b_owns, total) = owned_by("worker-b").await?;
        (b_owns > 0 && total as u64 == SUBS).then_some(())
    })
    .await?;
    emit_rounds(&stack, 2).await?;
    wait_for("2 rounds", TIMEOUT, || async { check_subscriptions(&reader, SUBS, 2).await.unwrap() }).await?;

    // Paused past its TTL: its subscriptions are taken over.
    b.signal(Signal::SIGSTOP);
    emit_rounds(&stack, 2).await?;
    wait_for("worker-a owns everything", TIMEOUT, || async {
        let (a_owns, _) = owned_by("worker-a").await?;
        (a_owns as u64 == SUBS).then_some(())
    })
    .await?;
    wait_for("4 rounds", TIMEOUT, || async { check_subscriptions(&reader, SUBS, 4).await.unwrap() }).await?;

    // Woken: it fences itself instead of publishing or writing cursors for them.
    b.signal(Signal::SIGCONT);
    wait_for("worker-b to notice its lease is gone", TIMEOUT, || async {
        let log = b.log();
        (log.contains("lease deadline passed") || log.contains("worker lease lost")).then_some(())
    })
    .await?;
    emit_rounds(&stack, 2).await?;
    wait_for("6 rounds, no duplicates, in order", TIMEOUT, || async {
        check_subscriptions(&reader, SUBS, 6).await.unwrap()
    })
    .await?;
    let mut etcd = stack.etcd.client().await?;
    for i in 0..SUBS {
        let id = herald_proto::SubscriptionId::new(format!("sub-{i:02}"))?;
        assert_monotonic(&cursor_history(&mut etcd, &id).await?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_by_sigterm_and_by_api_hands_over_without_loss() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let worker = |id: &str| WorkerProcess::start(stack.worker_settings(id));
    let (mut a, mut b) = (worker("worker-a")?, worker("worker-b")?);
    const SUBS: u64 = 10;
    for i in 0..SUBS {
        assert_eq!(c.post("/v1/subscriptions", &body(&stack, i)).await?.0, 201);
    }
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let all_on = |worker: &'static str| {
        let c = &c;
        async move {
            let current = assignments(c).await.ok()?;
            current.values().all(|w| w.as_deref() == Some(worker)).then_some(())
        }
    };
    wait_for("both workers own subscriptions", TIMEOUT, || async {
        let current = assignments(&c).await.ok()?;
        let on_b = current.values().filter(|w| w.as_deref() == Some("worker-b")).count();
        (on_b > 0 && current.values().all(Option::is_some)).then_some(())
    })
    .await?;
    emit_rounds(&stack, 2).await?;
    wait_for("2 rounds", TIMEOUT, || async { check_subscriptions(&reader, SUBS, 2).await.unwrap() }).await?;

    // Drain through the API: worker-b finishes, releases and exits by itself.
    let (status, answer) = c.post("/v1/workers/worker-b/drain", &json!({})).await?;
    assert_eq!((status, answer["draining"].as_bool()), (202, Some(true)), "{answer}");
    let asked = Instant::now();
    assert_eq!(tokio::time::timeout(TIMEOUT, b.wait_exit()).await?, Some(0), "{}", b.log_tail());
    wait_for("worker-a owns everything", TIMEOUT, || all_on("worker-a")).await?;
    tracing::info!(handoff = ?asked.elapsed(), "api drain handed over");
    emit_rounds(&stack, 2).await?;
    wait_for("4 rounds", TIMEOUT, || async { check_subscriptions(&reader, SUBS, 4).await.unwrap() }).await?;
    assert_eq!(c.post("/v1/workers/worker-b/drain", &json!({})).await?.0, 404);

    // SIGTERM: the same handoff.
    let _c_worker = worker("worker-c")?;
    wait_for("worker-c owns some", TIMEOUT, || async {
        let current = assignments(&c).await.ok()?;
        current.values().any(|w| w.as_deref() == Some("worker-c")).then_some(())
    })
    .await?;
    let terminated = Instant::now();
    assert_eq!(a.terminate().await, Some(0), "{}", a.log_tail());
    wait_for("worker-c owns everything", TIMEOUT, || all_on("worker-c")).await?;
    tracing::info!(handoff = ?terminated.elapsed(), "sigterm drain handed over");
    emit_rounds(&stack, 2).await?;
    wait_for("6 rounds, none lost, none duplicated", TIMEOUT, || async {
        check_subscriptions(&reader, SUBS, 6).await.unwrap()
    })
    .await?;
    Ok(())
}

/// Issue 13, defect 3. A worker paused past its lease (and past its etcd connections, which a
/// NAT or a load balancer forgets: its watches break, so it cannot learn from etcd what moved)
/// registers again within milliseconds of SIGCONT. Its tasks of the lost lease must not publish
/// under the new one. Every subscription is paused once the other worker took them over, so
/// nothing at all may reach the stream until they are resumed: a message emitted right after
/// the new registration and stored before the resume was published by a stale task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_resumed_after_its_lease_expired_publishes_nothing_under_the_new_lease() -> anyhow::Result<()>
{
    use herald_proto::{Keyspace, SubscriptionId, SubscriptionState, WorkerId};
    use herald_tests::herald::set_state;
    use herald_tests::tcp_proxy::TcpProxy;
    use nix::sys::signal::Signal;
    init_tracing();
    let stack = Stack::start().await?;
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let proxy = TcpProxy::start(stack.etcd.endpoint().trim_start_matches("http://")).await?;
    let settings = |id: &str| {
        let mut settings = stack.worker_settings(id);
        settings.lease_ttl_secs = 3;
        // New heads at once: a stale task acts within milliseconds of a block.
        settings.ws = Some(stack.anvil.ws_url());
        settings
    };
    let mut a_settings = settings("worker-a");
    a_settings.etcd = proxy.url("http");
    let a = WorkerProcess::start(a_settings)?;
    let b = WorkerProcess::start(settings("worker-b"))?;
    const SUBS: u64 = 10;
    for i in 0..SUBS {
        assert_eq!(c.post("/v1/subscriptions", &body(&stack, i)).await?.0, 201);
    }
    let ids: Vec<SubscriptionId> =
        (0..SUBS).map(|i| SubscriptionId::new(format!("sub-{i:02}"))).collect::<Result<_, _>>()?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let owned_by = |worker: &'static str| {
        let c = &c;
        async move {
            let current = assignments(c).await.ok()?;
            Some((current.values().filter(|w| w.as_deref() == Some(worker)).count(), current.len()))
        }
    };
    let running = |w: &'static str, n: f64| {
        let w = if w == "worker-a" { &a } else { &b };
        async move { (w.metric("herald_worker_assigned_subscriptions", &[]).await? == n).then_some(()) }
    };
    wait_for("both workers own subscriptions", TIMEOUT, || async {
        let (a_owns, total) = owned_by("worker-a").await?;
        (a_owns > 0 && a_owns < SUBS as usize && total as u64 == SUBS).then_some(())
    })
    .await?;
    emit_rounds(&stack, 2).await?;
    wait_for("2 rounds", TIMEOUT, || async { check_subscriptions(&reader, SUBS, 2).await.unwrap() }).await?;
    let a_tasks = a.metric("herald_worker_assigned_subscriptions", &[]).await.unwrap_or_default();
    assert!(a_tasks > 0.0, "worker-a runs no task before its pause");

    let mut etcd = stack.etcd.client().await?;
    let worker_key = Keyspace::default().worker(&WorkerId::new("worker-a")?);
    let first = etcd.get(worker_key.as_str(), None).await?;
    let first_lease =
        first.kvs().first().map(|kv| kv.lease()).ok_or_else(|| anyhow::anyhow!("a unregistered"))?;

    // Paused past its TTL, and its etcd connections are gone meanwhile.
    a.signal(Signal::SIGSTOP);
    proxy.cut_open_connections();
    wait_for("worker-b owns everything", TIMEOUT, || async {
        let (b_owns, _) = owned_by("worker-b").await?;
        (b_owns as u64 == SUBS).then_some(())
    })
    .await?;
    for id in &ids {
        set_state(&mut etcd, id, SubscriptionState::Paused).await?;
    }
    wait_for("worker-b to stop every paused subscription", TIMEOUT, || running("worker-b", 0.0)).await?;

    // Woken: the moment it holds a new lease, its old tasks get something to publish.
    let options = etcd_client::WatchOptions::new().with_start_revision(
        etcd.get(worker_key.as_str(), None).await?.header().map_or(0, |h| h.revision()) + 1,
    );
    let mut registrations = etcd.watch(worker_key.as_str(), Some(options)).await?;
    a.signal(Signal::SIGCONT);
    let second_lease = tokio::time::timeout(TIMEOUT, async {
        while let Some(response) = registrations.message().await? {
            for event in response.events() {
                if let Some(kv) = event.kv().filter(|_| event.event_type() == etcd_client::EventType::Put)
                    && kv.lease() != first_lease
                {
                    return anyhow::Ok(kv.lease());
                }
            }
        }
        anyhow::bail!("the watch on {worker_key} ended")
    })
    .await
    .map_err(|_| anyhow::anyhow!("worker-a did not register again\n{}", a.log_tail()))??;
    emit_rounds(&stack, 1).await?;
    tracing::info!(first_lease, second_lease, "worker-a registered again; one round emitted");
    // Once worker-a's supervisor has stopped every task it ran before the pause, none of them
    // can publish any more.
    wait_for("worker-a to run no task", TIMEOUT, || running("worker-a", 0.0)).await?;
    let stored = reader.read_all("herald.events.31337.>").await?;
    assert_eq!(
        stored.len() as u64,
        2 * SUBS,
        "messages of paused subscriptions were published (by worker-a's tasks of its lost lease)\n{}",
        a.log_tail()
    );

    // It stopped and joined them before it registered again.
    let (joined, registered_again) = wait_for("worker-a to log its new registration", TIMEOUT, || async {
        let log = a.log();
        let registered_again = log.match_indices("worker registered").nth(1)?.0;
        Some((log.find("every task of the lost lease stopped"), registered_again))
    })
    .await?;
    assert!(
        joined.is_some_and(|j| j < registered_again),
        "worker-a registered again before its tasks of the lost lease stopped\n{}",
        a.log_tail()
    );

    // Resumed: the round is published once, by whichever worker owns each subscription now.
    for id in &ids {
        set_state(&mut etcd, id, SubscriptionState::Active).await?;
    }
    wait_for("3 rounds, none lost, none duplicated", TIMEOUT, || async {
        check_subscriptions(&reader, SUBS, 3).await.unwrap()
    })
    .await?;
    Ok(())
}

/// Issue 13, defect 4. A drain request outlived the process it was meant for (written under a
/// lease that etcd kept alive after that process had gone), and the next process with the same
/// worker id obeyed it and exited at once. A drain request is for the process whose lease it is
/// bound to; a worker deletes the one left for its id when it ends; one meant for it still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_request_never_reaches_a_later_process_with_the_same_worker_id() -> anyhow::Result<()> {
    use herald_proto::{Keyspace, WorkerId};
    use herald_tests::register_subscription;
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let drain_key = Keyspace::default().drain(&WorkerId::new("worker-x")?);
    // What the earlier process left: a drain request under a lease that is still alive.
    let earlier = etcd.lease_grant(120, None).await?.id();
    etcd.put(drain_key.as_str(), "", Some(etcd_client::PutOptions::new().with_lease(earlier))).await?;
    let spec = stack.subscription("sub-x", herald_tests::chain::TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-x").await?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;

    // A later process with the same id sees it, ignores it, and serves its subscription.
    let mut x = WorkerProcess::start(stack.worker_settings("worker-x"))?;
    let log = wait_for("worker-x to judge the drain request", TIMEOUT, || async {
        let log = x.log();
        (log.contains("ignoring a drain request") || log.contains("drain requested")).then_some(log)
    })
    .await?;
    assert!(!log.contains("drain requested"), "a later process obeyed an earlier one's drain\n{log}");
    stack.chain.emit_many(3).await?;
    reader.wait_for_count(&spec.subject(), 3, TIMEOUT).await?;
    assert_eq!(x.try_exit_code(), None, "worker-x exited\n{}", x.log_tail());

    // When it ends, the request left for its id goes with it.
    assert_eq!(x.terminate().await, Some(0), "{}", x.log_tail());
    let left = etcd.get(drain_key.as_str(), None).await?;
    assert_eq!(left.count(), 0, "a drain request for worker-x outlived its process");

    // A drain meant for a process reaches it (the coordinator binds it to its registration)
    // and leaves nothing behind.
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let mut again = WorkerProcess::start(stack.worker_settings("worker-x"))?;
    stack.chain.emit_many(3).await?;
    reader.wait_for_count(&spec.subject(), 6, TIMEOUT).await?;
    let (status, answer) = c.post("/v1/workers/worker-x/drain", &json!({})).await?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(tokio::time::timeout(TIMEOUT, again.wait_exit()).await?, Some(0), "{}", again.log_tail());
    assert_eq!(etcd.get(drain_key.as_str(), None).await?.count(), 0, "the drain request outlived worker-x");
    let (status, _) = c.post("/v1/workers/worker-x/drain", &json!({})).await?;
    assert_eq!(status, 404);
    Ok(())
}

/// Found by `make chaos`: a drain answered 202 that never happened. The request was bound to
/// the lease of the worker's registration; the worker lost that lease (here: paused past its
/// TTL, its etcd connections gone meanwhile; in the soak, an etcd quorum loss), registered
/// again under a new one, and the request had vanished with the old lease before the worker
/// read it. A drain request names the lease but outlives it: the process that held the lease
/// still obeys it, and deletes it when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_request_survives_the_worker_losing_its_lease() -> anyhow::Result<()> {
    use herald_proto::{Keyspace, WorkerId};
    use herald_tests::tcp_proxy::TcpProxy;
    use nix::sys::signal::Signal;
    init_tracing();
    let stack = Stack::start().await?;
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let proxy = TcpProxy::start(stack.etcd.endpoint().trim_start_matches("http://")).await?;
    let mut settings = stack.worker_settings("worker-x");
    settings.lease_ttl_secs = 3;
    settings.etcd = proxy.url("http");
    let mut x = WorkerProcess::start(settings)?;
    let mut etcd = stack.etcd.client().await?;
    let keys = Keyspace::default();
    let worker = WorkerId::new("worker-x")?;
    let registered_lease = |etcd: &etcd_client::Client| {
        let (mut etcd, key) = (etcd.clone(), keys.worker(&worker));
        async move { etcd.get(key, None).await.ok()?.kvs().first().map(|kv| kv.lease()) }
    };
    let first = wait_for("worker-x to register", TIMEOUT, || registered_lease(&etcd)).await?;
    // Wait for the drain watch to be in place (it logs nothing): a listed worker has one.
    wait_for("worker-x listed", TIMEOUT, || async {
        let (status, body) = c.get("/v1/workers").await.ok()?;
        (status == 200 && body.to_string().contains("worker-x")).then_some(())
    })
    .await?;

    // Paused with its etcd connections gone; asked to drain before its lease runs out.
    x.signal(Signal::SIGSTOP);
    proxy.cut_open_connections();
    let (status, answer) = c.post("/v1/workers/worker-x/drain", &json!({})).await?;
    assert_eq!((status, answer["draining"].as_bool()), (202, Some(true)), "{answer}");
    // Its lease expires while it sleeps.
    wait_for("worker-x's first lease to expire", TIMEOUT, || async {
        (registered_lease(&etcd).await != Some(first)).then_some(())
    })
    .await?;
    x.signal(Signal::SIGCONT);

    // It wakes up, registers again, and still drains as asked.
    let exit = tokio::time::timeout(TIMEOUT, x.wait_exit()).await;
    let log = x.log();
    assert_eq!(exit.ok().flatten(), Some(0), "worker-x did not drain\n{}", x.log_tail());
    assert!(log.contains("drain requested through the admin API"), "{log}");
    let drain_key = keys.drain(&worker);
    assert_eq!(etcd.get(drain_key.as_str(), None).await?.count(), 0, "the drain request outlived worker-x");
    Ok(())
}

/// A worker reads the records of the subscriptions it owns in transactions of 100 reads; with
/// records near the API's 64 KiB limit, 100 of them exceed what one etcd answer may hold
/// (4 MiB), and such a transaction is read again in halves. (Before, a worker listed every
/// record in one read, failed past 4 MiB and never ran anything.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reads_its_records_when_one_etcd_answer_cannot_hold_them() -> anyhow::Result<()> {
    use etcd_client::{Txn, TxnOp};
    use herald_proto::{Assignment, Keyspace, SubscriptionRecord, SubscriptionState};
    use herald_tests::check::assert_exact_transfers;
    use herald_tests::herald::{register_subscription, wait_for_cursor};
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let keys = Keyspace::default();
    // 110 paused records of about 48 KB (1,000 addresses in a filter), all assigned to
    // worker-a, sorted after "mine": its first transaction reads "mine" and 99 of them.
    let assignment = serde_json::to_vec(&Assignment { worker_id: herald_proto::WorkerId::new("worker-a")? })?;
    let mut first_hundred = 0;
    for n in 0..110u64 {
        let mut spec = stack.subscription(&format!("n-{n:03}"), TRANSFER_EVENT);
        let to: Vec<String> = (0..1_000).map(|k| format!("0x{:040x}", 0x10_0000 + n * 10_000 + k)).collect();
        spec.filters.insert("to".into(), to);
        let mut record = SubscriptionRecord::new(spec.clone(), 0);
        record.state = SubscriptionState::Paused;
        let record = serde_json::to_vec(&record)?;
        if n < 99 {
            first_hundred += record.len();
        }
        etcd.txn(Txn::new().and_then([
            TxnOp::put(keys.subscription(&spec.id), record, None),
            TxnOp::put(keys.assignment(&spec.id), assignment.clone(), None),
        ]))
        .await?;
    }
    assert!(
        first_hundred > 4 * 1024 * 1024,
        "the records ({first_hundred} bytes) fit one answer: the test proves nothing"
    );
    let spec = stack.subscription("mine", TRANSFER_EVENT);
    register_subscription(&mut etcd, &spec, "worker-a").await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let block = stack.chain.emit_many(3).await?;
    wait_for_cursor(&stack.etcd, &spec.id, block, TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    assert_exact_transfers(&reader.read_all(&spec.subject()).await?, 3);
    Ok(())
}
