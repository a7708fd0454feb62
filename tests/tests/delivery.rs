//! Delivery end to end: backfill + live, exactly once, in order, decoded as emitted.

use std::time::Duration;

use alloy_primitives::U256;
use herald_tests::chain::{NOTE_EVENT, TRANSFER_EVENT};
use herald_tests::check::assert_exact_transfers;
use herald_tests::herald::wait_for_cursor;
use herald_tests::{Stack, StreamReader, WorkerProcess, init_tracing, register_subscription};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_then_live_arrive_exactly_once_in_order_and_decoded() -> anyhow::Result<()> {
    init_tracing();
    let stack = Stack::start().await?;
    let chain = &stack.chain;

    // History: 1,000 transfers over 40 blocks, notes with dynamic types in between.
    let mut notes: Vec<(String, Vec<u8>, Vec<u64>)> = Vec::new();
    for i in 0..40u64 {
        chain.emit_many(25).await?;
        if i % 8 == 0 {
            let note = (format!("note {i} ✓"), vec![i as u8, 0xff, 0x00], vec![i, u64::MAX, 0]);
            chain.emit_note(&note.0, &note.1, &note.2).await?;
            notes.push(note);
        }
    }
    chain.mine(5).await?;

    let mut etcd = stack.etcd.client().await?;
    let transfers = stack.subscription("transfers", TRANSFER_EVENT);
    let notes_spec = stack.subscription("notes", NOTE_EVENT);
    register_subscription(&mut etcd, &transfers, "worker-a").await?;
    register_subscription(&mut etcd, &notes_spec, "worker-a").await?;
    let worker = WorkerProcess::start(stack.worker_settings("worker-a"))?;

    let reader = StreamReader::connect(&stack.nats.url()).await?;
    reader
        .wait_for_count(&transfers.subject(), 1000, DELIVERY_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;

    // Live: 200 more while the worker follows the head.
    let mut last_block = 0;
    for i in 0..8u64 {
        last_block = chain.emit_many(25).await?;
        if i % 4 == 0 {
            let note = (String::new(), vec![], vec![]);
            last_block = chain.emit_note(&note.0, &note.1, &note.2).await?;
            notes.push(note);
        }
    }

    // Done when both cursors passed the last block: everything up to it is in the stream.
    for id in [&transfers.id, &notes_spec.id] {
        wait_for_cursor(&stack.etcd, id, last_block, DELIVERY_TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    }

    let transfer_messages = reader.read_all(&transfers.subject()).await?;
    assert_exact_transfers(&transfer_messages, 1200);

    let note_messages = reader.read_all(&notes_spec.subject()).await?;
    assert_eq!(note_messages.len(), notes.len());
    for (k, (m, (text, payload, values))) in note_messages.iter().zip(&notes).enumerate() {
        assert_eq!(m.decode_error, None);
        let values: Vec<String> = values.iter().map(|v| U256::from(*v).to_string()).collect();
        assert_eq!(
            m.args,
            serde_json::json!({
                "seq": k.to_string(),
                "text": text,
                "payload": format!("0x{}", alloy_primitives::hex::encode(payload)),
                "values": values,
            }),
            "note {k}"
        );
        assert_eq!(m.event, "Note");
        assert_eq!(m.signature, "Note(uint256,string,bytes,uint256[])");
    }
    Ok(())
}
