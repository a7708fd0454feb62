//! Assertions over what a consumer reads and what etcd recorded.

use etcd_client::WatchOptions;
use herald_proto::{Cursor, EventEnvelope, Keyspace, SubscriptionId};

use crate::chain::expected_transfer;

/// Asserts that `messages` are exactly Transfers number 0..count, in order, decoded right.
pub fn assert_exact_transfers(messages: &[EventEnvelope], count: u64) {
    assert_eq!(messages.len() as u64, count, "expected exactly {count} transfers");
    let mut last_position = None;
    for (k, m) in messages.iter().enumerate() {
        let (from, to, value) = expected_transfer(k as u64);
        assert_eq!(m.decode_error, None, "message {k}");
        assert_eq!(m.args["value"], value.to_string(), "message {k} out of order or duplicated");
        assert_eq!(m.args["from"], from.to_checksum(None), "message {k}");
        assert_eq!(m.args["to"], to.to_checksum(None), "message {k}");
        assert!(!m.removed);
        assert!(Some(m.position()) > last_position, "message {k} not in (block, log index) order");
        last_position = Some(m.position());
    }
}

/// Every value the cursor of `id` ever had, oldest first, from etcd's history.
pub async fn cursor_history(
    etcd: &mut etcd_client::Client,
    id: &SubscriptionId,
) -> anyhow::Result<Vec<Cursor>> {
    let key = Keyspace::default().cursor(id);
    let current = etcd.get(key.as_str(), None).await?;
    let Some(last) = current.kvs().first().map(|kv| kv.mod_revision()) else {
        return Ok(Vec::new());
    };
    let mut watch = etcd.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(1))).await?;
    let mut history = Vec::new();
    while let Some(response) = watch.message().await? {
        for event in response.events() {
            if let Some(kv) = event.kv() {
                if !kv.value().is_empty() {
                    history.push(Cursor::decode(kv.value())?);
                }
                if kv.mod_revision() >= last {
                    return Ok(history);
                }
            }
        }
    }
    anyhow::bail!("cursor watch ended early")
}

/// Asserts the cursor's block number never decreased.
pub fn assert_monotonic(history: &[Cursor]) {
    for pair in history.windows(2) {
        assert!(
            pair[1].block_number >= pair[0].block_number,
            "cursor moved backwards: {} -> {}",
            pair[0].block_number,
            pair[1].block_number
        );
    }
}

/// A folded log: (block hash, log index, decoded value).
pub type FoldedLog = (alloy_primitives::B256, u64, String);

/// Folds a subscription's stream: each message adds its log, each retraction (`removed`)
/// removes the log with the same block hash and index. What remains is what a consumer that
/// applies retractions believes the chain holds: (block hash, log index, decoded value).
///
/// Panics on a log published twice while live, or a retraction of a log that is not live
/// (see [`try_fold`]).
pub fn fold(messages: &[EventEnvelope]) -> Vec<FoldedLog> {
    try_fold(messages).unwrap_or_else(|e| panic!("{e}"))
}

/// [`fold`], with its violations as an error instead of a panic: a log published again while
/// it is live (a duplicate), or a retraction of a log that is not live.
pub fn try_fold(messages: &[EventEnvelope]) -> Result<Vec<FoldedLog>, String> {
    let mut logs: Vec<FoldedLog> = Vec::new();
    for (n, m) in messages.iter().enumerate() {
        let key = (m.block_hash, m.log_index);
        let at = logs.iter().position(|(h, i, _)| (*h, *i) == key);
        if m.removed {
            let Some(at) = at else {
                return Err(format!("message {n}: retraction of a log never published: {key:?}"));
            };
            logs.remove(at);
        } else {
            if at.is_some() {
                return Err(format!("message {n}: log published twice: {key:?}"));
            }
            logs.push(folded(m));
        }
    }
    Ok(logs)
}

/// The stream folded with set semantics, for streams with a rewind: a replay under a higher
/// `rewind_epoch` legitimately publishes logs that are still live again (their message ids
/// differ by the epoch), so re-adding a live key replaces it in place instead of being a
/// duplicate, and a retraction of a key that is not live is ignored (a retraction from the
/// epoch before the replay may follow a re-add or precede it). The result is what a consumer
/// keyed by `(block_hash, log_index)` as in `docs/reorgs.md` holds, in first-arrival order.
pub fn fold_set(messages: &[EventEnvelope]) -> Vec<FoldedLog> {
    let mut logs: Vec<FoldedLog> = Vec::new();
    for m in messages {
        let key = (m.block_hash, m.log_index);
        let at = logs.iter().position(|(h, i, _)| (*h, *i) == key);
        match (m.removed, at) {
            (true, Some(at)) => {
                logs.remove(at);
            }
            (true, None) => {}
            (false, Some(at)) => logs[at] = folded(m),
            (false, None) => logs.push(folded(m)),
        }
    }
    logs
}

fn folded(m: &EventEnvelope) -> FoldedLog {
    (m.block_hash, m.log_index, m.args["value"].as_str().unwrap_or_default().to_owned())
}
