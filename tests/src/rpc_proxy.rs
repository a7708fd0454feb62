//! A JSON-RPC proxy in front of anvil that misbehaves the way real providers do, on demand.
//!
//! Each fault is a field of [`Faults`], changeable while the proxy runs; the proxy counts what
//! it did so that a test can prove the fault really happened. Its upstream can be switched
//! while it runs ([`RpcProxy::set_upstream`]): load-balanced nodes that disagree at the tip.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the proxy does wrong. Zero disables a fault. The `*_every` faults count
/// `eth_getLogs` calls only, so that they hit the calls whose failure matters most.
#[derive(Debug, Default)]
pub struct Faults {
    /// `eth_getLogs` over more blocks than this is refused, in turn with the words of Alchemy
    /// (with a suggested range), QuickNode, reth and Ankr.
    pub max_range: AtomicU64,
    /// `eth_getLogs` answers with more logs than this are refused, in turn with the words of
    /// Infura (with a suggested range in `data`), reth (`retry with the range`) and geth.
    pub max_results: AtomicU64,
    /// Every n-th `eth_getLogs` gets HTTP 429 with `Retry-After: 1`.
    pub rate_limit_every: AtomicU64,
    /// Every n-th `eth_getLogs` gets HTTP 503.
    pub server_error_every: AtomicU64,
    /// Every n-th `eth_getLogs` is answered after `slow_ms` (beyond the caller's timeout).
    pub slow_every: AtomicU64,
    /// How slow a slow answer is, in milliseconds.
    pub slow_ms: AtomicU64,
    /// Every n-th `eth_getLogs` connection is dropped mid-answer.
    pub drop_every: AtomicU64,
    /// Every n-th `eth_getLogs` answer is `[]` (a load-balanced node whose log index lags);
    /// queries by `blockHash` are spared.
    pub empty_logs_every: AtomicU64,
    /// Every n-th `eth_getBlockByNumber("latest")` (and `eth_blockNumber`) answers with the
    /// block this many blocks below the real head (a lagging node).
    pub stale_latest_every: AtomicU64,
    /// How far behind a stale answer is.
    pub stale_by: AtomicU64,
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct Counters {
    /// `eth_getLogs` refused for their range or result count.
    pub refused_ranges: AtomicU64,
    /// 429s sent.
    pub rate_limited: AtomicU64,
    /// 503s sent.
    pub server_errors: AtomicU64,
    /// Answers delayed beyond the timeout.
    pub slowed: AtomicU64,
    /// Connections dropped.
    pub dropped: AtomicU64,
    /// `eth_getLogs` answered with logs (at least one).
    pub answered_logs: AtomicU64,
    /// `eth_getLogs` calls seen.
    pub get_logs: AtomicU64,
    /// `eth_getLogs` answers replaced by `[]` although upstream had logs.
    pub emptied: AtomicU64,
    /// Head reads answered with a stale block.
    pub stale_heads: AtomicU64,
    /// Head reads seen.
    pub head_reads: AtomicU64,
}

struct Inner {
    upstream: std::sync::RwLock<String>,
    http: reqwest::Client,
    faults: Faults,
    counters: Counters,
}

/// A running proxy.
pub struct RpcProxy {
    inner: Arc<Inner>,
    port: u16,
    stop: CancellationToken,
}

impl RpcProxy {
    /// Listens on a free port and forwards to `upstream`.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let inner = Arc::new(Inner {
            upstream: std::sync::RwLock::new(upstream.to_owned()),
            http: reqwest::Client::new(),
            faults: Faults::default(),
            counters: Counters::default(),
        });
        let stop = serve(listener, inner.clone());
        Ok(Self { inner, port, stop })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forwards every call from now on to `upstream` (calls in flight finish where they went).
    pub fn set_upstream(&self, upstream: &str) {
        *self.inner.upstream.write().unwrap_or_else(|e| e.into_inner()) = upstream.to_owned();
    }

    /// The faults, to change.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// What it did.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Stops listening, as a crashed provider would: connections are refused.
    pub fn kill(&mut self) {
        self.stop.cancel();
    }

    /// Listens again on the same port.
    pub async fn revive(&mut self) -> anyhow::Result<()> {
        let listener =
            crate::wait_for("the proxy port to be free again", Duration::from_secs(10), || async {
                TcpListener::bind(("127.0.0.1", self.port)).await.ok()
            })
            .await?;
        self.stop = serve(listener, self.inner.clone());
        Ok(())
    }
}

fn serve(listener: TcpListener, inner: Arc<Inner>) -> CancellationToken {
    let stop = CancellationToken::new();
    let app = axum::Router::new().route("/", axum::routing::post(handle)).with_state(inner);
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    });
    stop
}

impl Drop for RpcProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    if request["method"] == "eth_getLogs"
        && let Some(fault) = inner.http_fault().await
    {
        return fault;
    }
    let answer = match &request {
        Value::Array(calls) => {
            let mut answers = Vec::with_capacity(calls.len());
            for call in calls {
                answers.push(inner.call(call.clone()).await);
            }
            answers.into_iter().collect::<Result<Vec<_>, _>>().map(Value::Array)
        }
        call => inner.call(call.clone()).await,
    };
    match answer {
        Ok(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e).into_response(),
    }
}

/// A JSON-RPC error answer to `call`.
fn rpc_error(call: &Value, code: i64, message: String, data: Option<Value>) -> Value {
    let mut error = json!({"code": code, "message": message});
    if let Some(data) = data {
        error["data"] = data;
    }
    json!({"jsonrpc": "2.0", "id": call["id"], "error": error})
}

fn hex_param(v: &Value) -> Option<u64> {
    u64::from_str_radix(v.as_str()?.trim_start_matches("0x"), 16).ok()
}

/// `n > 0` and this is the n-th event counted by `counter`.
fn every(counter: &AtomicU64, n: &AtomicU64) -> bool {
    let count = counter.load(Ordering::SeqCst);
    let n = n.load(Ordering::SeqCst);
    n > 0 && count.is_multiple_of(n)
}

impl Inner {
    /// The HTTP-level fault due for this `eth_getLogs` call, if any (the call is counted here).
    async fn http_fault(&self) -> Option<Response> {
        let n = self.counters.get_logs.fetch_add(1, Ordering::SeqCst) + 1;
        let due = |every: &AtomicU64| {
            let every = every.load(Ordering::SeqCst);
            every > 0 && n.is_multiple_of(every)
        };
        if due(&self.faults.rate_limit_every) {
            self.counters.rate_limited.fetch_add(1, Ordering::SeqCst);
            return Some(
                (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "1")], "rate limited").into_response(),
            );
        }
        if due(&self.faults.server_error_every) {
            self.counters.server_errors.fetch_add(1, Ordering::SeqCst);
            return Some((StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable").into_response());
        }
        if due(&self.faults.slow_every) {
            self.counters.slowed.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(self.faults.slow_ms.load(Ordering::SeqCst))).await;
        }
        if due(&self.faults.drop_every) {
            self.counters.dropped.fetch_add(1, Ordering::SeqCst);
            // The connection is cut mid-answer: the head announces 4096 bytes, a part of the
            // body goes out, then the body fails and the server aborts the connection.
            let cut = futures::stream::iter([
                Ok(Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"res")),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "connection cut by the proxy",
                )),
            ]);
            return Some(
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CONTENT_LENGTH, "4096")
                    .body(axum::body::Body::from_stream(cut))
                    .unwrap_or_default(),
            );
        }
        None
    }

    /// A provider-style refusal of an `eth_getLogs` call whose range or answer is too large.
    fn refusal(&self, call: &Value, answer: &Value) -> Option<Value> {
        let filter = &call["params"][0];
        let (from, to) = (hex_param(&filter["fromBlock"])?, hex_param(&filter["toBlock"])?);
        let max_range = self.faults.max_range.load(Ordering::SeqCst);
        let turn = self.counters.refused_ranges.load(Ordering::SeqCst) % 4;
        if max_range > 0 && to - from + 1 > max_range {
            self.counters.refused_ranges.fetch_add(1, Ordering::SeqCst);
            let end = from + max_range - 1;
            return Some(match turn {
                0 => rpc_error(
                    call,
                    -32602,
                    format!(
                        "Log response size exceeded. You can make eth_getLogs requests with up to a {max_range} block range and no limit on the response size, or you can request any block range with a cap of 10K logs in the response. Based on your parameters, this block range should work: [{from:#x}, {end:#x}]"
                    ),
                    None,
                ),
                1 => rpc_error(call, -32614, format!("eth_getLogs is limited to a {max_range} range"), None),
                2 => rpc_error(call, -32602, format!("query exceeds max block range {max_range}"), None),
                _ => rpc_error(call, -32062, "block range is too wide".into(), None),
            });
        }
        let max_results = self.faults.max_results.load(Ordering::SeqCst);
        let count = answer["result"].as_array().map_or(0, Vec::len) as u64;
        if max_results > 0 && count > max_results {
            self.counters.refused_ranges.fetch_add(1, Ordering::SeqCst);
            let half = from + (to - from) / 2;
            return Some(match turn % 3 {
                0 => rpc_error(
                    call,
                    -32005,
                    format!("query returned more than {max_results} results"),
                    Some(
                        json!({"from": format!("{from:#x}"), "to": format!("{half:#x}"), "limit": max_results}),
                    ),
                ),
                1 => rpc_error(
                    call,
                    -32602,
                    format!("query exceeds max results {max_results}, retry with the range {from}-{half}"),
                    None,
                ),
                _ => rpc_error(call, -32005, format!("query returned more than {max_results} results"), None),
            });
        }
        None
    }

    async fn forward(&self, call: &Value) -> Result<Value, String> {
        let upstream = self.upstream.read().unwrap_or_else(|e| e.into_inner()).clone();
        let response = self.http.post(upstream).json(call).send().await.map_err(|e| e.to_string())?;
        response.json().await.map_err(|e| e.to_string())
    }

    async fn call(&self, mut call: Value) -> Result<Value, String> {
        let method = call["method"].as_str().unwrap_or_default().to_owned();
        let reads_head = method == "eth_blockNumber"
            || (method == "eth_getBlockByNumber" && call["params"][0].as_str() == Some("latest"));
        if reads_head {
            self.counters.head_reads.fetch_add(1, Ordering::SeqCst);
            if every(&self.counters.head_reads, &self.faults.stale_latest_every) {
                let head =
                    self.forward(&json!({"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber"})).await?;
                let head = u64::from_str_radix(
                    head["result"].as_str().unwrap_or("0x0").trim_start_matches("0x"),
                    16,
                )
                .unwrap_or_default();
                let stale = head.saturating_sub(self.faults.stale_by.load(Ordering::SeqCst));
                self.counters.stale_heads.fetch_add(1, Ordering::SeqCst);
                if method == "eth_blockNumber" {
                    return Ok(json!({"jsonrpc": "2.0", "id": call["id"], "result": format!("{stale:#x}")}));
                }
                call["params"][0] = json!(format!("{stale:#x}"));
            }
        }
        let mut answer = self.forward(&call).await?;
        if method == "eth_getLogs" {
            if let Some(refusal) = self.refusal(&call, &answer) {
                return Ok(refusal);
            }
            let had_logs = answer["result"].as_array().is_some_and(|logs| !logs.is_empty());
            if had_logs {
                self.counters.answered_logs.fetch_add(1, Ordering::SeqCst);
            }
            // A node whose log index lags still knows the logs of a block it names by hash
            // (EIP-234: it must refuse a block it does not have), so by-hash queries are spared.
            let by_hash = !call["params"][0]["blockHash"].is_null();
            if !by_hash && every(&self.counters.get_logs, &self.faults.empty_logs_every) {
                if had_logs {
                    self.counters.emptied.fetch_add(1, Ordering::SeqCst);
                }
                answer["result"] = json!([]);
            }
        }
        Ok(answer)
    }
}
