//! Reading etcd in pages, shared by both binaries (behind the `etcd` feature).
//!
//! A single range read of a prefix grows with the number of subscriptions, and etcd's client
//! refuses answers over 4 MiB: a single read of every running subscription's cursor failed at a
//! few hundred, of every record at about 8,000. [`scan`] reads [`PAGE_KEYS`] keys at a time,
//! every page at the revision of the first, so the caller sees one consistent snapshot, as a
//! single read would, and no answer grows beyond a page. A page whose answer is still too large
//! is read again in halves.

use etcd_client::{Client, GetOptions, KeyValue};

/// Keys one read returns at most: records are at most the API's body limit (64 KiB by default)
/// and cursors a few KiB, so a page stays below etcd's 4 MiB answer limit in practice.
pub const PAGE_KEYS: i64 = 256;

/// The end of the range of keys starting with `prefix` (its last byte incremented; keyspace
/// directories end in `/`).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The first key after `key`.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// Visits the keys of `[start, end)` in order until `visit` returns `false`, a page at a time
/// (see the module docs). Returns the revision of the snapshot read (to watch from).
pub async fn scan(
    client: &Client,
    start: Vec<u8>,
    end: Vec<u8>,
    mut visit: impl FnMut(&KeyValue) -> bool,
) -> Result<i64, etcd_client::Error> {
    let mut client = client.clone();
    let (mut from, mut revision, mut page) = (start, 0, PAGE_KEYS);
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = match client.get(from.clone(), Some(options)).await {
            Ok(resp) => resp,
            Err(e) if page > 1 && answer_too_large(&e) => {
                page /= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            if !visit(kv) {
                return Ok(revision);
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => from = key_after(last.key()),
            _ => return Ok(revision),
        }
    }
}

/// Whether etcd's answer exceeded what the client accepts (4 MiB): the same read asks for too
/// much at once, and succeeds in smaller parts.
pub fn answer_too_large(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status) if status.message().contains("message length too large"))
}

/// [`scan`] of every key under `prefix`.
pub async fn scan_prefix(
    client: &Client,
    prefix: &str,
    visit: impl FnMut(&KeyValue) -> bool,
) -> Result<i64, etcd_client::Error> {
    scan(client, prefix.as_bytes().to_vec(), prefix_end(prefix), visit).await
}
