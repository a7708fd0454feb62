//! JetStream: the narrow [`EventSink`] trait and its async-nats adapter.
//!
//! Each message carries `Nats-Msg-Id` (see [`herald_proto::msg_id`]), so any redelivery
//! inside the stream's duplicate window is dropped by the server.
//!
//! Order is never left to luck. Messages of one subscription go out either as a **fast-ingest
//! batch** or one at a time, each acknowledged before the next is sent. Pipelining plain
//! publishes would not do: a message lost in a connection drop (or a stream leader change)
//! can be followed by a later one stored after the reconnect.
//!
//! A fast-ingest batch (JetStream ADR-50, nats-server 2.14+, `allow_batched` on the stream)
//! streams messages without waiting for each ack: every message carries its position in the
//! batch, the server stores them as they arrive and acknowledges every `flow` of them, and
//! the publisher keeps at most two flows unacknowledged (so a slow stream holds it back). In
//! gap mode `fail`, a message missing from the sequence ends the batch: what the server
//! stored is always a prefix of what was sent. Publishing the same messages again after an
//! error is therefore safe and keeps the order: the stored prefix is dropped as duplicates
//! (their message ids), the rest follows it.

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

    /// Publishes `envelopes` in order, pipelined, as one fast-ingest batch, and returns the
    /// stream sequence of the last one. On error, a prefix of them may be stored: publishing
    /// them all again (stored ones are dropped as duplicates) keeps the order.
    fn publish_batch(
        &self,
        subject: &str,
        envelopes: &[EventEnvelope],
    ) -> impl Future<Output = Result<u64, PublishError>> + Send;

    /// The last envelope stored on `subject`, if any, with its stream sequence: where the
    /// journal of what was published ends, and whether it ends below what the cursor says was
    /// stored (lost messages).
    fn tail(
        &self,
        subject: &str,
    ) -> impl Future<Output = Result<Option<(u64, EventEnvelope)>, PublishError>> + Send;

    /// The stream's first sequence: messages below it are gone by the stream's own retention
    /// (age, purge), not lost.
    fn first_seq(&self) -> impl Future<Output = Result<u64, PublishError>> + Send;

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
    /// Sent as `Herald-Worker` on every message, when set.
    publisher: Option<String>,
}

impl JetStreamSink {
    /// Wraps a connected client.
    pub fn new(client: async_nats::Client, config: &NatsConfig) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(config.ack_timeout);
        Self { js, stream_name: config.stream.name.clone(), ack_timeout: config.ack_timeout, publisher: None }
    }

    /// Names `worker_id` as the publisher of every message (the `Herald-Worker` header).
    pub fn with_publisher(mut self, worker_id: &str) -> Self {
        self.publisher = Some(worker_id.to_owned());
        self
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
            allow_batch_publish: self.fast_ingest(),
            ..Default::default()
        };
        self.js.create_or_update_stream(wanted).await.map_err(|e| PublishError::Nats(e.to_string()))?;
        if !self.fast_ingest() {
            tracing::warn!(
                server_version = self.js.client().server_info().version,
                "nats-server predates fast-ingest batches (2.14): publishing one message at a time, each acknowledged before the next"
            );
        }
        Ok(())
    }

    /// Whether the connected server takes fast-ingest batches.
    fn fast_ingest(&self) -> bool {
        fast_ingest_supported(&self.js.client().server_info().version)
    }
}

/// Whether nats-server `version` (`2.14.0`, `v2.15.1-beta`) has fast-ingest batches (2.14+).
fn fast_ingest_supported(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']).map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (2, 14),
        _ => false,
    }
}

impl JetStreamSink {
    /// The largest message the server takes.
    fn max_payload(&self) -> usize {
        self.js.client().server_info().max_payload
    }

    /// The message for `envelope`, with its id and routing headers, if it fits in the
    /// server's `max_payload` (see [`Self::max_payload`]).
    fn message(&self, envelope: &EventEnvelope, max_payload: usize) -> Result<PublishMessage, PublishError> {
        let payload = Bytes::from(serde_json::to_vec(envelope).expect("envelopes serialise"));
        // Leave room for the headers.
        let max = max_payload.saturating_sub(1024);
        if max > 0 && payload.len() > max {
            return Err(PublishError::TooLarge { size: payload.len(), max });
        }
        let message = PublishMessage::build()
            .payload(payload)
            .message_id(envelope.msg_id())
            .header(subjects::SUBSCRIPTION_HEADER, envelope.subscription_id.as_str())
            .header(subjects::BLOCK_HEADER, envelope.block_number.to_string().as_str())
            .header(subjects::REMOVED_HEADER, if envelope.removed { "true" } else { "false" });
        Ok(match &self.publisher {
            Some(worker) => message.header(subjects::WORKER_HEADER, worker.as_str()),
            None => message,
        })
    }
}

/// Messages per flow acknowledgement asked of the server in a fast-ingest batch.
const FAST_FLOW: u16 = 500;

/// Flows a fast-ingest batch may have unacknowledged before the publisher waits.
const FAST_OUTSTANDING_FLOWS: u64 = 2;

/// What the server says on a fast-ingest batch's reply inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FastReply {
    /// Stored through batch position `through`; acknowledge every `flow` messages from now.
    Flow { through: u64, flow: u64 },
    /// The batch is over: its last message has stream sequence `sequence`.
    Done { sequence: u64 },
    /// The batch failed (a gap, a refused message, an unknown batch, a disabled stream).
    Failed(String),
}

impl FastReply {
    fn parse(payload: &[u8]) -> Self {
        let Ok(reply) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return Self::Failed(format!("unreadable reply {:?}", String::from_utf8_lossy(payload)));
        };
        let number = |key: &str| reply.get(key).and_then(serde_json::Value::as_u64);
        match reply.get("type").and_then(serde_json::Value::as_str) {
            Some("ack") => {
                Self::Flow { through: number("seq").unwrap_or(0), flow: number("msgs").unwrap_or(1) }
            }
            Some("gap") => Self::Failed(format!(
                "gap in the batch: message {} missing before {}",
                number("last_seq").unwrap_or(0) + 1,
                number("seq").unwrap_or(0)
            )),
            Some(_) => Self::Failed(format!("batch refused: {}", reply.get("error").unwrap_or(&reply))),
            None => match (reply.get("error"), number("seq")) {
                (None, Some(sequence)) => Self::Done { sequence },
                (error, _) => Self::Failed(format!("batch refused: {}", error.unwrap_or(&reply))),
            },
        }
    }
}

/// The publisher's side of a fast-ingest batch's flow control. Pure.
#[derive(Debug)]
struct FastFlow {
    /// Highest batch position the server acknowledged.
    acked: u64,
    /// Messages per acknowledgement, as the server set it.
    flow: u64,
    /// The server answered the batch's first message.
    started: bool,
}

impl FastFlow {
    fn new() -> Self {
        Self { acked: 0, flow: u64::from(FAST_FLOW), started: false }
    }

    /// Whether batch position `next` must wait for acknowledgements first.
    fn must_wait(&self, next: u64) -> bool {
        (next > 1 && !self.started) || next > self.acked + self.flow * FAST_OUTSTANDING_FLOWS
    }

    /// Takes in a reply; `Some` when the batch is over.
    fn apply(&mut self, reply: FastReply) -> Option<Result<u64, String>> {
        self.started = true;
        match reply {
            FastReply::Flow { through, flow } => {
                self.acked = self.acked.max(through);
                self.flow = flow.max(1);
                None
            }
            FastReply::Done { sequence } => Some(Ok(sequence)),
            FastReply::Failed(reason) => Some(Err(reason)),
        }
    }

    /// Takes in a reply's payload: `Ok(Some(sequence))` when the batch is done.
    fn take(&mut self, payload: &[u8]) -> Result<Option<u64>, PublishError> {
        self.apply(FastReply::parse(payload)).transpose().map_err(PublishError::Nats)
    }
}

/// Operation codes of fast-ingest reply subjects.
#[derive(Debug, Clone, Copy)]
enum FastOp {
    Start = 0,
    Append = 1,
    Commit = 2,
    /// Ends the batch without storing the (empty) message.
    EndWithout = 3,
}

/// The reply subject that carries a message's batch position and operation.
fn fast_reply_subject(inbox: &str, position: u64, op: FastOp) -> String {
    format!("{inbox}.{FAST_FLOW}.fail.{position}.{}.$FI", op as u8)
}

impl EventSink for JetStreamSink {
    async fn publish_batch(&self, subject: &str, envelopes: &[EventEnvelope]) -> Result<u64, PublishError> {
        use futures::{FutureExt, StreamExt};
        let nats = |e: &dyn std::fmt::Display| PublishError::Nats(e.to_string());
        if !self.fast_ingest() {
            return Err(PublishError::Nats("the server predates fast-ingest batches".into()));
        }
        let client = self.js.client();
        let max_payload = self.max_payload();
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(format!("{inbox}.>")).await.map_err(|e| nats(&e))?;
        let mut flow = FastFlow::new();
        let timeout = self.ack_timeout;
        let next_reply = async |flow: &mut FastFlow, replies: &mut async_nats::Subscriber| {
            let reply = tokio::time::timeout(timeout, replies.next())
                .await
                .map_err(|_| PublishError::AckTimeout(timeout))?
                .ok_or_else(|| PublishError::Nats("batch reply inbox closed".into()))?;
            flow.take(&reply.payload)
        };
        let last = envelopes.len() as u64;
        for (position, envelope) in (1..).zip(envelopes) {
            while flow.must_wait(position) {
                if let Some(sequence) = next_reply(&mut flow, &mut replies).await? {
                    return Err(PublishError::Nats(format!(
                        "batch ended early at stream sequence {sequence}"
                    )));
                }
            }
            let message = match self.message(envelope, max_payload) {
                Ok(message) => message,
                Err(e) => {
                    // End what was sent so far (storing nothing more) before giving up.
                    if position > 1 {
                        let end = fast_reply_subject(&inbox, position, FastOp::EndWithout);
                        let _ = client.publish_with_reply(subject.to_owned(), end, Bytes::new()).await;
                    }
                    return Err(e);
                }
            };
            let op = match position {
                1 if last > 1 => FastOp::Start,
                p if p == last => FastOp::Commit,
                _ => FastOp::Append,
            };
            let outbound = message.outbound_message(subject.to_owned());
            client
                .publish_with_reply_and_headers(
                    subject.to_owned(),
                    fast_reply_subject(&inbox, position, op),
                    outbound.headers.unwrap_or_default(),
                    outbound.payload,
                )
                .await
                .map_err(|e| nats(&e))?;
            while let Some(Some(reply)) = replies.next().now_or_never() {
                match flow.take(&reply.payload)? {
                    None => {}
                    Some(sequence) if position == last => return Ok(sequence),
                    Some(sequence) => {
                        return Err(PublishError::Nats(format!(
                            "batch ended early at stream sequence {sequence}"
                        )));
                    }
                }
            }
        }
        loop {
            if let Some(sequence) = next_reply(&mut flow, &mut replies).await? {
                return Ok(sequence);
            }
        }
    }

    async fn publish(&self, subject: &str, envelope: &EventEnvelope) -> Result<Stored, PublishError> {
        let message = self.message(envelope, self.max_payload())?;
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

    async fn tail(&self, subject: &str) -> Result<Option<(u64, EventEnvelope)>, PublishError> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream_name)
            .await
            .map_err(|e| PublishError::Nats(e.to_string()))?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(serde_json::from_slice(&message.payload).ok().map(|e| (message.sequence, e))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(PublishError::Nats(e.to_string())),
        }
    }

    async fn first_seq(&self) -> Result<u64, PublishError> {
        let mut stream =
            self.js.get_stream(&self.stream_name).await.map_err(|e| PublishError::Nats(e.to_string()))?;
        let info = stream.info().await.map_err(|e| PublishError::Nats(e.to_string()))?;
        Ok(info.state.first_sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_ingest_needs_nats_server_2_14() {
        for (version, supported) in [
            ("2.15.1", true),
            ("2.14.0", true),
            ("v2.14.0-beta.1", true),
            ("3.0.0", true),
            ("2.12.4", false),
            ("2.9.25", false),
            ("", false),
        ] {
            assert_eq!(fast_ingest_supported(version), supported, "{version}");
        }
    }

    #[test]
    fn fast_ingest_replies() {
        assert_eq!(
            FastReply::parse(br#"{"type":"ack","seq":0,"msgs":500}"#),
            FastReply::Flow { through: 0, flow: 500 }
        );
        assert_eq!(
            FastReply::parse(br#"{"stream":"HERALD","seq":300,"batch":"x","count":300}"#),
            FastReply::Done { sequence: 300 }
        );
        for failed in [
            &br#"{"type":"gap","last_seq":4,"seq":6}"#[..],
            br#"{"type":"err","seq":7,"error":{"code":400,"err_code":10211,"description":"too many"}}"#,
            br#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"}}"#,
            b"not json",
        ] {
            assert!(matches!(FastReply::parse(failed), FastReply::Failed(_)), "{failed:?}");
        }
    }

    #[test]
    fn fast_ingest_flow_control_keeps_two_flows_in_flight() {
        let mut flow = FastFlow::new();
        assert!(!flow.must_wait(1), "the first message goes at once");
        assert!(flow.must_wait(2), "the rest waits for the server to answer it");
        assert_eq!(flow.apply(FastReply::Flow { through: 0, flow: 100 }), None);
        assert!(!flow.must_wait(200));
        assert!(flow.must_wait(201));
        assert_eq!(flow.apply(FastReply::Flow { through: 100, flow: 100 }), None);
        assert!(!flow.must_wait(300));
        assert_eq!(flow.apply(FastReply::Flow { through: 50, flow: 100 }), None);
        assert!(!flow.must_wait(300), "an older ack never shrinks the window");
        assert_eq!(flow.apply(FastReply::Done { sequence: 9 }), Some(Ok(9)));
        assert!(matches!(flow.apply(FastReply::Failed("gap".into())), Some(Err(_))));
    }
}
