//! `make demo`: the main job, locally and for real.
//!
//! Starts etcd, NATS (JetStream) and anvil, deploys the test contract with some history,
//! starts a herald coordinator and worker, registers a subscription through the admin API,
//! sends a steady trickle of transfers, and
//! prints each event as a JetStream consumer reads it. Stops on Ctrl-C, or by itself after
//! `DEMO_SECONDS`; its last line is `demo: <count> events delivered`. Every process it started
//! is stopped when it exits.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use herald_proto::EventEnvelope;
use herald_tests::chain::TRANSFER_EVENT;
use herald_tests::herald::{CoordinatorProcess, CoordinatorSettings, STREAM};
use herald_tests::{Stack, WorkerProcess, wait_for};

const WORKER_ID: &str = "demo-worker";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let seconds: Option<u64> = match std::env::var("DEMO_SECONDS") {
        Ok(s) if !s.is_empty() => Some(
            s.parse().map_err(|_| anyhow::anyhow!("DEMO_SECONDS must be a number of seconds, got {s:?}"))?,
        ),
        _ => None,
    };
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));

    println!("demo: starting etcd, nats-server -js and anvil on free 127.0.0.1 ports");
    let stack = Stack::start().await?;
    println!("demo: etcd {}  nats {}  anvil {}", stack.etcd.endpoint(), stack.nats.url(), stack.anvil.url());
    println!("demo: deployed HeraldTest at {}", stack.chain.contract);
    for _ in 0..5 {
        stack.chain.emit_many(4).await?;
    }
    println!("demo: emitted 20 historical transfers (the worker will backfill them)");

    let coordinator =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    println!("demo: started herald-coordinator, admin API at {}", coordinator.url("/v1"));
    let worker = WorkerProcess::start(stack.worker_settings(WORKER_ID))?;
    println!("demo: started herald-worker {WORKER_ID}");

    let spec = stack.subscription("demo-transfers", TRANSFER_EVENT);
    let body = serde_json::json!({
        "id": spec.id, "chain_id": spec.chain_id, "address": spec.address.to_string(),
        "event": TRANSFER_EVENT, "start_block": 0,
    });
    println!("demo: POST /v1/subscriptions {body}");
    let (status, answer) = coordinator.post("/v1/subscriptions", &body).await?;
    anyhow::ensure!(status == 201, "registration failed: {status} {answer}\n{}", coordinator.log_tail());
    println!("demo: registered {} -> subject {}", answer["id"], answer["subject"]);

    let js = jetstream::new(async_nats::connect(stack.nats.url()).await?);
    let stream = wait_for("the worker to create the stream", Duration::from_secs(60), || async {
        js.get_stream(STREAM).await.ok()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: spec.subject(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    println!("demo: consuming {}; sending 3 transfers a second (Ctrl-C to stop)", spec.subject());

    let mut delivered = 0u64;
    let mut traffic = tokio::time::interval(Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = timeout => break,
            _ = traffic.tick() => {
                if let Err(e) = stack.chain.emit_many(3).await {
                    eprintln!("demo: sending transfers failed: {e}");
                }
            }
            message = messages.next() => {
                let Some(message) = message else { break };
                let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                    Ok(e) => {
                        delivered += 1;
                        println!(
                            "event #{delivered}: block {} log {} {} from={} to={} value={}",
                            e.block_number, e.log_index, e.event,
                            e.args["from"].as_str().unwrap_or("?"),
                            e.args["to"].as_str().unwrap_or("?"),
                            e.args["value"].as_str().unwrap_or("?"),
                        );
                    }
                    Err(err) => eprintln!("demo: unreadable message: {err}"),
                }
            }
        }
    }
    drop(worker);
    drop(coordinator);
    drop(stack);
    println!("demo: {delivered} events delivered");
    Ok(())
}
