//! The clustered services the soak runs on keep what they acknowledged when members die:
//! a three-member etcd through the loss of one member and of a quorum, a three-node
//! JetStream cluster with a replicated (R3) stream through the loss of any one node.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use herald_tests::clusters::{EtcdCluster, NatsCluster};
use herald_tests::wait_for;

const DEADLINE: Duration = Duration::from_secs(60);

async fn put(endpoints: &[String], key: &str) -> anyhow::Result<()> {
    let mut client = etcd_client::Client::connect(endpoints, None).await?;
    client.put(key, "1", None).await?;
    Ok(())
}

async fn keys(endpoints: &[String]) -> anyhow::Result<Vec<String>> {
    let mut client = etcd_client::Client::connect(endpoints, None).await?;
    let answer = client.get("k/", Some(etcd_client::GetOptions::new().with_prefix())).await?;
    Ok(answer.kvs().iter().map(|kv| kv.key_str().unwrap_or_default().to_owned()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_keeps_its_writes_through_a_member_and_a_quorum_loss() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let endpoints = etcd.endpoints();
    put(&endpoints, "k/1").await?;

    // One member down: the other two are a quorum, writes go on.
    etcd.kill(0).await;
    wait_for("a write with one member down", DEADLINE, || async { put(&endpoints, "k/2").await.ok() })
        .await?;

    // Two down: no quorum, the survivor refuses writes.
    etcd.kill(1).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), put(&endpoints, "k/3")).await;
    assert!(!matches!(refused, Ok(Ok(()))), "a write without a quorum was accepted");

    // Both back: every acknowledged write is there.
    etcd.start_again(0)?;
    etcd.start_again(1)?;
    etcd.wait_writable().await?;
    let held =
        wait_for("reads after the quorum came back", DEADLINE, || async { keys(&endpoints).await.ok() })
            .await?;
    assert!(held.contains(&"k/1".to_owned()) && held.contains(&"k/2".to_owned()), "lost writes: {held:?}");
    Ok(())
}

/// Publishes message `n` until it is acknowledged (a node may be down, a leader being elected).
async fn publish(js: &jetstream::Context, n: u32) -> anyhow::Result<()> {
    wait_for("a publish to be acknowledged", DEADLINE, || async {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", n.to_string().as_str());
        let ack = js.publish_with_headers("c.events", headers, n.to_string().into()).await.ok()?;
        tokio::time::timeout(Duration::from_secs(5), ack).await.ok()?.ok().map(|_| ())
    })
    .await
}

async fn read_all(url: &str) -> anyhow::Result<Vec<u32>> {
    let js = jetstream::new(async_nats::connect(url).await?);
    let stream = js.get_stream("CLUSTERED").await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let pending = stream.get_info().await?.state.messages as usize;
    let mut messages =
        consumer.fetch().max_messages(pending.max(1)).expires(Duration::from_secs(2)).messages().await?;
    let mut seen = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
        seen.push(String::from_utf8_lossy(&message.payload).parse()?);
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_stream_keeps_what_it_acknowledged_when_any_node_dies() -> anyhow::Result<()> {
    let mut nats = NatsCluster::start(3).await?;
    let servers =
        nats.urls().iter().map(|u| u.parse()).collect::<Result<Vec<async_nats::ServerAddr>, _>>()?;
    let client = async_nats::connect(servers).await?;
    let js = jetstream::new(client);
    wait_for("the R3 stream to be created", DEADLINE, || async {
        js.get_or_create_stream(stream::Config {
            name: "CLUSTERED".into(),
            subjects: vec!["c.>".into()],
            num_replicas: 3,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .ok()
        .map(|_| ())
    })
    .await?;
    let mut expected = Vec::new();
    for round in 0..3u32 {
        for n in round * 50..(round + 1) * 50 {
            publish(&js, n).await?;
            expected.push(n);
        }
        // Each node in turn dies after acknowledging, and comes back with its store.
        let victim = round as usize;
        nats.kill(victim).await;
        for n in (round + 1) * 50..(round + 1) * 50 + 10 {
            publish(&js, n + 1000).await?;
            expected.push(n + 1000);
        }
        nats.start_again(victim).await?;
    }
    let survivor = nats.url(2);
    let seen = wait_for("every acknowledged message on a consumer", DEADLINE, || async {
        read_all(&survivor).await.ok().filter(|seen| seen.len() >= expected.len())
    })
    .await?;
    assert_eq!(seen, expected, "the R3 stream lost, duplicated or reordered acknowledged messages");
    Ok(())
}
