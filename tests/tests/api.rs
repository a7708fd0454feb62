//! The admin API against real etcd, NATS, anvil and a worker: the lifecycle through HTTP,
//! every validation rule, authentication, and a coordinator restart.

use std::time::Duration;

use herald_proto::{Keyspace, SubscriptionId};
use herald_tests::chain::{NOTE_EVENT as NOTE, TRANSFER_EVENT};
use herald_tests::check::assert_exact_transfers;
use herald_tests::herald::{CoordinatorProcess, CoordinatorSettings, READ_TOKEN, read_cursor};
use herald_tests::{Stack, StreamReader, WorkerProcess, init_tracing, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(120);

fn create_body(stack: &Stack, id: &str) -> Value {
    json!({
        "id": id,
        "chain_id": herald_tests::services::ANVIL_CHAIN_ID,
        "address": stack.chain.contract.to_string(),
        "event": TRANSFER_EVENT,
        "start_block": 0,
    })
}

async fn wait_view(
    c: &CoordinatorProcess,
    id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    wait_for(what, TIMEOUT, || async {
        let (status, view) = c.get(&format!("/v1/subscriptions/{id}")).await.ok()?;
        (status == 200 && check(&view)).then_some(view)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.log_tail()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_http() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let coordinator =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let reader = StreamReader::connect(&stack.nats.url()).await?;
    let subject = "herald.events.31337.transfers";

    // Create -> assigned -> events flow.
    let (status, view) = coordinator.post("/v1/subscriptions", &create_body(&stack, "transfers")).await?;
    assert_eq!(status, 201, "{view}");
    assert_eq!(view["state"], "active");
    // The canary watches another event of the same contract: once its cursor passed a block,
    // the worker has looked at that block, so silence on `transfers` is meaningful.
    let mut canary = create_body(&stack, "canary");
    canary["event"] = json!(herald_tests::chain::NOTE_EVENT);
    let (status, _) = coordinator.post("/v1/subscriptions", &canary).await?;
    assert_eq!(status, 201);
    wait_view(&coordinator, "transfers", "assignment", |v| v["assigned_worker"] == "worker-a").await?;
    for _ in 0..4 {
        stack.chain.emit_many(10).await?;
    }
    reader.wait_for_count(subject, 40, TIMEOUT).await?;
    let last = stack.chain.head().await?;
    let view = wait_view(&coordinator, "transfers", "cursor at head", |v| v["cursor_block"] == last).await?;
    assert_eq!(view["lag_blocks"], 0);

    // Pause: nothing new while paused (the canary proves the worker saw the blocks).
    let (status, view) = coordinator.post("/v1/subscriptions/transfers/pause", &json!({})).await?;
    assert_eq!((status, view["state"].as_str()), (200, Some("paused")));
    wait_for("the paused task to stop", TIMEOUT, || async {
        (worker.metric("herald_worker_assigned_subscriptions", &[]).await? == 1.0).then_some(())
    })
    .await?;
    let mut last = 0;
    for _ in 0..2 {
        last = stack.chain.emit_many(10).await?;
    }
    wait_view(&coordinator, "canary", "canary past the paused blocks", |v| {
        v["cursor_block"].as_u64() >= Some(last)
    })
    .await?;
    assert_eq!(reader.read_all(subject).await?.len(), 40, "published while paused");

    // Resume: continues from the cursor, no gap.
    let (status, _) = coordinator.post("/v1/subscriptions/transfers/resume", &json!({})).await?;
    assert_eq!(status, 200);
    let all = reader.wait_for_count(subject, 60, TIMEOUT).await?;
    assert_exact_transfers(&all, 60);

    // Rewind: replays from the block, with a new epoch.
    let from_block = all[30].block_number;
    let expected_replay = all.iter().filter(|m| m.block_number >= from_block).count();
    let (status, view) =
        coordinator.post("/v1/subscriptions/transfers/rewind", &json!({"from_block": from_block})).await?;
    assert_eq!((status, view["rewind_epoch"].as_u64()), (200, Some(1)), "{view}");
    let (status, body) =
        coordinator.post("/v1/subscriptions/transfers/rewind", &json!({"from_block": last + 1000})).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_from_block")),
        "rewinding forward"
    );
    let after = reader.wait_for_count(subject, 60 + expected_replay, TIMEOUT).await?;
    assert!(after[60..].iter().all(|m| m.rewind_epoch == 1 && m.block_number >= from_block));

    // Delete: stops, cursor gone, 404 afterwards.
    let (status, _) =
        CoordinatorProcess::send(coordinator.admin(Method::DELETE, "/v1/subscriptions/transfers")).await?;
    assert_eq!(status, 204);
    let (status, body) = coordinator.get("/v1/subscriptions/transfers").await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    for _ in 0..2 {
        last = stack.chain.emit_many(10).await?;
    }
    wait_view(&coordinator, "canary", "canary past the deleted blocks", |v| {
        v["cursor_block"].as_u64() >= Some(last)
    })
    .await?;
    assert_eq!(reader.read_all(subject).await?.len(), 60 + expected_replay);
    let mut etcd = stack.etcd.client().await?;
    assert_eq!(read_cursor(&mut etcd, &SubscriptionId::new("transfers")?).await?, None);

    // Workers and chains are visible.
    let (_, workers) = coordinator.get("/v1/workers").await?;
    assert_eq!(workers[0]["worker_id"], "worker-a");
    assert_eq!(workers[0]["assigned"], 1);
    let (_, chains) = coordinator.get("/v1/chains").await?;
    assert_eq!(chains[0]["chain_id"], 31337);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_and_auth_rule_answers_with_status_code_and_field() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut settings = CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url());
    settings.protect_reads = true;
    let c = CoordinatorProcess::start(settings).await?;
    let head = stack.chain.head().await?;
    let valid = create_body(&stack, "valid");

    let with = |changes: Value| {
        let mut body = valid.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        body
    };
    let mixed_bad_checksum = {
        let good = stack.chain.contract.to_checksum(None);
        // Flip the case of one letter: still mixed case, no longer the checksum.
        let i = good.char_indices().skip(2).find(|(_, ch)| ch.is_ascii_alphabetic()).map(|(i, _)| i).unwrap();
        let mut s: Vec<char> = good.chars().collect();
        s[i] = if s[i].is_ascii_uppercase() { s[i].to_ascii_lowercase() } else { s[i].to_ascii_uppercase() };
        s.into_iter().collect::<String>()
    };
    let cases = [
        (with(json!({"chain_id": 5})), 422, "unknown_chain", "chain_id"),
        (with(json!({"address": "0x1234"})), 422, "invalid_address", "address"),
        (with(json!({"address": mixed_bad_checksum})), 422, "checksum_mismatch", "address"),
        (with(json!({"event": "event Transfer(address indexed"})), 422, "invalid_event", "event"),
        (with(json!({"event": {"type": "event", "name": 7}})), 422, "invalid_event", "event"),
        (with(json!({"event": "Missing", "abi": []})), 422, "event_not_found", "event"),
        (with(json!({"filters": {"to": ["not-an-address"]}})), 422, "invalid_filter", "filters.to"),
        (with(json!({"filters": {"value": ["1"]}})), 422, "invalid_filter", "filters.value"),
        (with(json!({"start_block": head + 1001})), 422, "start_block_too_far", "start_block"),
        (with(json!({"start_block": "yesterday"})), 422, "invalid_start_block", "start_block"),
        (with(json!({"confirmations": 10_001})), 422, "invalid_confirmations", "confirmations"),
        (with(json!({"confirmations": "three"})), 422, "invalid_type", "confirmations"),
        (with(json!({"id": "Not/Valid"})), 422, "invalid_id", "id"),
        (with(json!({"id": "x".repeat(65)})), 422, "invalid_id", "id"),
        (with(json!({"subject": "a..b"})), 422, "invalid_subject", "subject"),
        (with(json!({"subject": "herald.>"})), 422, "invalid_subject", "subject"),
        (with(json!({"subject": "elsewhere.events"})), 422, "invalid_subject", "subject"),
        (
            with(
                json!({"event": "event E(uint8 indexed a, uint8 indexed b, uint8 indexed c, uint8 indexed d)"}),
            ),
            422,
            "invalid_event",
            "event",
        ),
        (with(json!({"colour": "red"})), 422, "unknown_field", "colour"),
        (with(json!({"address": null})), 422, "missing_field", "address"),
    ];
    for (i, (body, status, code, field)) in cases.iter().enumerate() {
        let (got, answer) = c.post("/v1/subscriptions", body).await?;
        assert_eq!(
            (got, answer["error"]["code"].as_str(), answer["error"]["field"].as_str()),
            (*status, Some(*code), Some(*field)),
            "case {i}: {answer}"
        );
    }

    // Transport-level rules.
    let post = || c.admin(Method::POST, "/v1/subscriptions");
    let (status, body) =
        CoordinatorProcess::send(post().header("content-type", "text/plain").body(valid.to_string())).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (415, Some("unsupported_media_type")));
    let (status, body) =
        CoordinatorProcess::send(post().header("content-type", "application/json").body("{\"id\":")).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_json")));
    let huge = json!({"id": "x", "padding": "y".repeat(20_000)});
    let (status, body) = CoordinatorProcess::send(post().json(&huge)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("body_too_large")));

    // Auth: 401 without or with a wrong token, 403 for the read token on a write, reads
    // protected by the switch.
    let (status, body) =
        CoordinatorProcess::send(c.http().post(c.url("/v1/subscriptions")).json(&valid)).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    let wrong = c.http().post(c.url("/v1/subscriptions")).bearer_auth("wrong-token").json(&valid);
    assert_eq!(CoordinatorProcess::send(wrong).await?.0, 401);
    let reader = c.http().post(c.url("/v1/subscriptions")).bearer_auth(READ_TOKEN).json(&valid);
    let (status, body) = CoordinatorProcess::send(reader).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(CoordinatorProcess::send(c.http().get(c.url("/v1/subscriptions"))).await?.0, 401);
    assert_eq!(
        CoordinatorProcess::send(c.http().get(c.url("/v1/subscriptions")).bearer_auth(READ_TOKEN)).await?.0,
        200
    );
    assert_eq!(CoordinatorProcess::send(c.http().get(c.url("/healthz"))).await?.0, 200);

    // Nothing invalid reached etcd; now the valid one goes in, once.
    let mut etcd = stack.etcd.client().await?;
    let dir = Keyspace::default().subscriptions_dir();
    let stored = etcd.get(dir.as_str(), Some(etcd_client::GetOptions::new().with_prefix())).await?;
    assert_eq!(stored.count(), 0, "an invalid request reached etcd");
    assert_eq!(c.post("/v1/subscriptions", &valid).await?.0, 201);
    let (status, body) = c.post("/v1/subscriptions", &valid).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("already_exists")));
    let (status, body) = c.post("/v1/subscriptions", &with(json!({"id": "same-logs"}))).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("duplicate_subscription")));
    let (status, body) = c
        .post(
            "/v1/subscriptions",
            &with(json!({"id": "thief", "event": NOTE, "subject": "herald.events.31337.valid"})),
        )
        .await?;
    assert_eq!(
        (status, body["error"]["code"].as_str(), body["error"]["field"].as_str()),
        (409, Some("subject_taken"), Some("subject"))
    );
    let stored = etcd.get(dir.as_str(), Some(etcd_client::GetOptions::new().with_prefix())).await?;
    assert_eq!(stored.count(), 1);
    // Nothing has run yet (no worker), so there is nothing to rewind.
    let (status, body) = c.post("/v1/subscriptions/valid/rewind", &json!({"from_block": 1})).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("not_started")));
    let (status, _) = c.post("/v1/subscriptions/nope/rewind", &json!({"from_block": 1})).await?;
    assert_eq!(status, 404);

    // Listing: filters and pages.
    for i in 0..3 {
        let body = with(json!({"id": format!("page-{i}"), "filters": {"to": [format!("0x{:040x}", i + 1)]}}));
        assert_eq!(c.post("/v1/subscriptions", &body).await?.0, 201);
    }
    let (_, page) = c.get("/v1/subscriptions?limit=2").await?;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let after = page["next_after"].as_str().unwrap().to_owned();
    let (_, rest) = c.get(&format!("/v1/subscriptions?limit=2&after={after}")).await?;
    assert_eq!(rest["items"].as_array().unwrap().len(), 2);
    assert!(rest["next_after"].is_null());
    let (status, body) = c.get("/v1/subscriptions?limit=0").await?;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("limit")));
    let (_, none) = c.get("/v1/subscriptions?chain_id=1").await?;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
    let (_, paused) = c.get("/v1/subscriptions?state=paused").await?;
    assert_eq!(paused["items"].as_array().unwrap().len(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restart_loses_nothing() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let _worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;
    let ids = ["one", "two", "three"];
    for (i, id) in ids.iter().enumerate() {
        let body = json!({
            "id": id, "chain_id": 31337, "address": stack.chain.contract.to_string(),
            "event": TRANSFER_EVENT, "start_block": 0, "filters": {"from": [format!("0x{:040x}", 0x1000 + i)]},
        });
        assert_eq!(c.post("/v1/subscriptions", &body).await?.0, 201);
    }
    stack.chain.emit_many(5).await?;
    let head = stack.chain.head().await?;
    for id in ids {
        wait_view(&c, id, "cursor at head", |v| v["cursor_block"] == head).await?;
    }
    let mut etcd = stack.etcd.client().await?;
    let mut before = Vec::new();
    for id in ids {
        before.push(read_cursor(&mut etcd, &SubscriptionId::new(id)?).await?);
    }

    c.restart().await?;

    let (_, page) = c.get("/v1/subscriptions").await?;
    let listed: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ["one", "three", "two"]);
    for (id, before) in ids.iter().zip(before) {
        assert_eq!(read_cursor(&mut etcd, &SubscriptionId::new(*id)?).await?, before, "{id}");
    }
    Ok(())
}

/// Issue 15: the list answered 503 ("decoded message length too large") once the records and
/// cursors of every subscription no longer fitted in one etcd answer (about 275 running
/// subscriptions with their cursors). 5,000 subscriptions with cursors of a long-running one
/// (100 checkpoints, about 11 KB each, 55 MB in all): every page of the list, a filtered list
/// and one subscription's status answer 200, and the pages hold every subscription once, in
/// order, with its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_subscriptions_list_page_by_page() -> anyhow::Result<()> {
    use alloy_primitives::B256;
    use etcd_client::{Txn, TxnOp};
    use herald_proto::{Checkpoint, Cursor, SubscriptionRecord, SubscriptionState};
    const SUBSCRIPTIONS: u64 = 5_000;
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let keys = Keyspace::default();
    let cursor_of = |n: u64| {
        let history = (0..100)
            .map(|i| Checkpoint {
                block_number: 1_000 + i,
                block_hash: B256::repeat_byte(i as u8),
                journal_seq: i,
                stored_seq: i,
            })
            .collect();
        Cursor { history, ..Cursor::at(2_000 + n, B256::repeat_byte(0xab), 0) }
    };
    // Written straight to etcd, 50 subscriptions (100 keys) per transaction.
    let ids: Vec<String> = (0..SUBSCRIPTIONS).map(|n| format!("sub-{n:05}")).collect();
    for chunk in ids.chunks(50) {
        let mut ops = Vec::new();
        for id in chunk {
            let spec = stack.subscription(id, TRANSFER_EVENT);
            let n: u64 = id[4..].parse()?;
            let mut record = SubscriptionRecord::new(spec.clone(), 0);
            if n.is_multiple_of(10) {
                record.state = SubscriptionState::Paused;
            }
            ops.push(TxnOp::put(keys.subscription(&spec.id), serde_json::to_vec(&record)?, None));
            ops.push(TxnOp::put(keys.cursor(&spec.id), cursor_of(n).encode(), None));
        }
        etcd.txn(Txn::new().and_then(ops)).await?;
    }
    let c =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;

    let list = |query: String| {
        let c = &c;
        async move {
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let next = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
                let (status, page) = c.get(&format!("/v1/subscriptions?limit=1000{query}{next}")).await?;
                anyhow::ensure!(status == 200, "page after {after:?}: {status} {page}");
                for item in page["items"].as_array().into_iter().flatten() {
                    let id = item["id"].as_str().unwrap_or_default().to_owned();
                    let n: u64 = id[4..].parse()?;
                    anyhow::ensure!(item["cursor_block"] == 2_000 + n, "{id}'s cursor: {item}");
                    seen.push(id);
                }
                match page["next_after"].as_str() {
                    Some(a) => after = Some(a.to_owned()),
                    None => return anyhow::Ok(seen),
                }
            }
        }
    };
    assert_eq!(list(String::new()).await?, ids, "every subscription once, in order");
    let paused: Vec<String> = ids.iter().step_by(10).cloned().collect();
    assert_eq!(list("&state=paused".into()).await?, paused);

    let (status, view) = c.get("/v1/subscriptions/sub-04321").await?;
    assert_eq!((status, &view["cursor_block"]), (200, &json!(6_321)), "{view}");
    Ok(())
}

/// The leader compacts etcd's history older than `maintenance.compaction_retention` (herald's
/// cursor commits rewrite keys all the time: without compaction etcd reaches its quota and
/// refuses every write), and every replica reports etcd's database size and quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_etcds_history_and_reports_its_size() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let mut etcd = stack.etcd.client().await?;
    let first = etcd.put("herald-test/churn", "0", None).await?;
    let old_revision = first.header().map_or(0, |h| h.revision());
    for i in 1..20 {
        etcd.put("herald-test/churn", i.to_string(), None).await?;
    }
    let mut settings = CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url());
    settings.compaction_retention = "2s".into();
    let c = CoordinatorProcess::start(settings).await?;

    wait_for("the leader to compact past the first write", TIMEOUT, || async {
        (c.metric("herald_etcd_compacted_revision").await? >= old_revision as f64).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", c.log_tail()))?;
    let old =
        etcd.get("herald-test/churn", Some(etcd_client::GetOptions::new().with_revision(old_revision))).await;
    let refused = old.expect_err("a read at a compacted revision must fail").to_string();
    assert!(refused.contains("compacted"), "{refused}");
    // The newest value is untouched.
    let now = etcd.get("herald-test/churn", None).await?;
    assert_eq!(now.kvs()[0].value_str()?, "19");

    wait_for("etcd's size to be reported", TIMEOUT, || async {
        (c.metric("herald_etcd_db_size_bytes").await? > 0.0).then_some(())
    })
    .await?;
    assert!(c.metric("herald_etcd_db_size_in_use_bytes").await.unwrap_or(0.0) > 0.0);
    assert_eq!(c.metric("herald_etcd_quota_bytes").await, Some(2.0 * 1024.0 * 1024.0 * 1024.0));
    Ok(())
}
