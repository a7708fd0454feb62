//! A JSON-RPC proxy in front of anvil that misbehaves the way real providers do, on demand.
//!
//! Each fault is a field of [`Faults`], changeable while the proxy runs; the proxy counts what
//! it did so that a test can prove the fault really happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the proxy does wrong. Zero disables a fault.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every n-th `eth_getLogs` answer is `[]` (a load-balanced node whose log index lags).
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
    upstream: String,
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
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            faults: Faults::default(),
            counters: Counters::default(),
        });
        let stop = CancellationToken::new();
        let app = axum::Router::new().route("/", axum::routing::post(handle)).with_state(inner.clone());
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
        });
        Ok(Self { inner, port, stop })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The faults, to change.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// What it did.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }
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

/// `n > 0` and this is the n-th event counted by `counter`.
fn every(counter: &AtomicU64, n: &AtomicU64) -> bool {
    let count = counter.load(Ordering::SeqCst);
    let n = n.load(Ordering::SeqCst);
    n > 0 && count.is_multiple_of(n)
}

impl Inner {
    async fn forward(&self, call: &Value) -> Result<Value, String> {
        let response = self.http.post(&self.upstream).json(call).send().await.map_err(|e| e.to_string())?;
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
            self.counters.get_logs.fetch_add(1, Ordering::SeqCst);
            let had_logs = answer["result"].as_array().is_some_and(|logs| !logs.is_empty());
            if every(&self.counters.get_logs, &self.faults.empty_logs_every) {
                if had_logs {
                    self.counters.emptied.fetch_add(1, Ordering::SeqCst);
                }
                answer["result"] = json!([]);
            }
        }
        Ok(answer)
    }
}
