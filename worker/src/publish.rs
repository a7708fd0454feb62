//! JetStream: the narrow [`EventSink`] trait and its async-nats adapter.
//!
//! Each message carries `Nats-Msg-Id` (see [`herald_proto::msg_id`]), so any redelivery
//! inside the stream's duplicate window is dropped by the server.
//!
//! Order is never left to luck. Messages of one subscription go out either as an **atomic
//! batch** (JetStream ADR-50: the server stores all of them, in order, or none) or one at a
//! time, each acknowledged before the next is sent. Pipelining plain publishes would not do: a
//! message lost in a connection drop can be followed by a later one stored after the
//! reconnect. A batch is the fast path; when it is refused (it holds a message the stream
//! already has, after a crash or takeover; or the connection dropped) its messages are
//! published one by one, where duplicates are dropped individually.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use herald_proto::{EventEnvelope, subjects};

use crate::config::{NatsConfig, StreamConfig};

/// A failed publish or stream operation.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No ack within the timeout: the message may or may not be stored; republishing it is
    /// safe because of its message id.
    #[error("no publish ack within {0:?}")]
    AckTimeout(Duration),
    /// The server or connection reported an error.
    #[error("jetstream error: {0}")]
    Nats(String),
    /// The message exceeds the server's maximum payload; retrying the same message can never
    /// succeed.
    #[error("message of {size} bytes exceeds the server's max_payload of {max}")]
    TooLarge {
        /// Size of the message body.
        size: usize,
        /// The server's limit.
        max: usize,
    },
}

impl PublishError {
    /// Whether publishing the same message again may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::TooLarge { .. })
    }
}

/// What the server said about a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Stream sequence of the message.
    pub sequence: u64,
    /// The server already had a message with this id and dropped this one.
    pub duplicate: bool,
}

/// Where envelopes go.
pub trait EventSink: Send + Sync + 'static {
    /// Publishes one envelope and waits for the server's ack.
    fn publish(
        &self,
        subject: &str,
        envelope: &EventEnvelope,
    ) -> impl Future<Output = Result<Stored, PublishError>> + Send;

    /// Publishes `envelopes` as one atomic batch: all stored, in order, or none. Returns the
    /// stream sequence of the last one. Refused as a whole if any of them is already stored.
    fn publish_batch(
        &self,
        subject: &str,
        envelopes: &[EventEnvelope],
    ) -> impl Future<Output = Result<u64, PublishError>> + Send;

    /// The last envelope stored on `subject`, if any: the stream is the journal of what was
    /// published, which lets a (re)starting owner skip what is already there.
    fn last_published(
        &self,
        subject: &str,
    ) -> impl Future<Output = Result<Option<EventEnvelope>, PublishError>> + Send;

    /// Every envelope stored on `subject` after stream sequence `after`, in order, with its
    /// sequence: what to retract when the blocks they came from are orphaned.
    fn journal_after(
        &self,
        subject: &str,
        after: u64,
    ) -> impl Future<Output = Result<Vec<(u64, EventEnvelope)>, PublishError>> + Send;
}

/// [`EventSink`] over NATS JetStream.
#[derive(Clone)]
pub struct JetStreamSink {
    js: jetstream::Context,
    stream_name: String,
    ack_timeout: Duration,
}

impl JetStreamSink {
    /// Wraps a connected client.
    pub fn new(client: async_nats::Client, config: &NatsConfig) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(config.ack_timeout);
        Self { js, stream_name: config.stream.name.clone(), ack_timeout: config.ack_timeout }
    }

    /// Creates the stream, or updates it to `config` if it exists.
    pub async fn ensure_stream(&self, config: &StreamConfig) -> Result<(), PublishError> {
        let wanted = stream::Config {
            name: config.name.clone(),
            subjects: config.subjects.clone(),
            storage: stream::StorageType::File,
            duplicate_window: config.duplicate_window,
            max_age: config.max_age,
            num_replicas: config.replicas,
            allow_direct: true,
            allow_atomic_publish: true,
            ..Default::default()
        };
        self.js.create_or_update_stream(wanted).await.map_err(|e| PublishError::Nats(e.to_string()))?;
        Ok(())
    }
}

impl JetStreamSink {
    /// The message for `envelope`, with its id and routing headers.
    fn message(&self, envelope: &EventEnvelope) -> Result<PublishMessage, PublishError> {
        let payload = Bytes::from(serde_json::to_vec(envelope).expect("envelopes serialise"));
        // Leave room for the headers.
        let max = self.js.client().server_info().max_payload.saturating_sub(1024);
        if max > 0 && payload.len() > max {
            return Err(PublishError::TooLarge { size: payload.len(), max });
        }
        Ok(PublishMessage::build()
            .payload(payload)
            .message_id(envelope.msg_id())
            .header(subjects::SUBSCRIPTION_HEADER, envelope.subscription_id.as_str())
            .header(subjects::BLOCK_HEADER, envelope.block_number.to_string().as_str())
            .header(subjects::REMOVED_HEADER, if envelope.removed { "true" } else { "false" }))
    }
}

/// Ids of atomic batches: unique per process and attempt.
fn next_batch_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let nonce = NONCE.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
    });
    format!("herald-{nonce:x}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl EventSink for JetStreamSink {
    async fn publish_batch(&self, subject: &str, envelopes: &[EventEnvelope]) -> Result<u64, PublishError> {
        let nats = |e: &dyn std::fmt::Display| PublishError::Nats(e.to_string());
        let batch_id = next_batch_id();
        let count = envelopes.len();
        let mut messages = Vec::with_capacity(count);
        for (i, envelope) in envelopes.iter().enumerate() {
            let mut message = self
                .message(envelope)?
                .header("Nats-Batch-Id", batch_id.as_str())
                .header("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if i + 1 == count {
                message = message.header("Nats-Batch-Commit", "1");
            }
            messages.push(message);
        }
        let Some(commit) = messages.pop() else {
            return Err(PublishError::Nats("empty batch".into()));
        };
        let send = async {
            let client = self.js.client();
            for message in messages {
                let outbound = message.outbound_message(subject.to_owned());
                let headers = outbound.headers.unwrap_or_default();
                client
                    .publish_with_headers(subject.to_owned(), headers, outbound.payload)
                    .await
                    .map_err(|e| nats(&e))?;
            }
            let pending = self.js.send_publish(subject.to_owned(), commit).await.map_err(|e| nats(&e))?;
            pending.await.map_err(|e| nats(&e))
        };
        match tokio::time::timeout(self.ack_timeout, send).await {
            Err(_) => Err(PublishError::AckTimeout(self.ack_timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(ack)) => Ok(ack.sequence),
        }
    }

    async fn publish(&self, subject: &str, envelope: &EventEnvelope) -> Result<Stored, PublishError> {
        let message = self.message(envelope)?;
        let ack = async {
            let pending = self.js.send_publish(subject.to_owned(), message).await?;
            pending.await
        };
        match tokio::time::timeout(self.ack_timeout, ack).await {
            Err(_) => Err(PublishError::AckTimeout(self.ack_timeout)),
            Ok(Err(e)) => Err(PublishError::Nats(e.to_string())),
            Ok(Ok(ack)) => Ok(Stored { sequence: ack.sequence, duplicate: ack.duplicate }),
        }
    }

    async fn journal_after(
        &self,
        subject: &str,
        after: u64,
    ) -> Result<Vec<(u64, EventEnvelope)>, PublishError> {
        use async_nats::jetstream::consumer;
        use futures::StreamExt;
        let nats = |e: &dyn std::fmt::Display| PublishError::Nats(e.to_string());
        let stream = self.js.get_stream_no_info(&self.stream_name).await.map_err(|e| nats(&e))?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject.to_owned(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: after + 1 },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| nats(&e))?;
        let mut out = Vec::new();
        loop {
            let pending = consumer.clone().info().await.map_err(|e| nats(&e))?.num_pending;
            if pending == 0 {
                break;
            }
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(self.ack_timeout)
                .messages()
                .await
                .map_err(|e| nats(&e))?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| nats(&e))?;
                let sequence = message.info().map_err(|e| nats(&e))?.stream_sequence;
                if let Ok(envelope) = serde_json::from_slice(&message.payload) {
                    out.push((sequence, envelope));
                }
                got += 1;
            }
            if got == 0 {
                return Err(PublishError::Nats(format!("journal read stalled with {pending} pending")));
            }
        }
        let _ = stream.delete_consumer(consumer.cached_info().name.as_str()).await;
        Ok(out)
    }

    async fn last_published(&self, subject: &str) -> Result<Option<EventEnvelope>, PublishError> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream_name)
            .await
            .map_err(|e| PublishError::Nats(e.to_string()))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(serde_json::from_slice(&message.payload).ok()),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(PublishError::Nats(e.to_string())),
        }
    }
}
