//! herald itself under test: worker processes, registration, and reading the stream back.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use herald_proto::{
    Assignment, Cursor, EventEnvelope, Keyspace, Rewind, SubscriptionId, SubscriptionRecord,
    SubscriptionSpec, SubscriptionState, WorkerId,
};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{ChildProcess, free_port};
use crate::services::ANVIL_CHAIN_ID;
use crate::{wait_for, workspace_bin};

/// The stream name tests use.
pub const STREAM: &str = "HERALD";

/// What a test worker is pointed at.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Worker id.
    pub worker_id: String,
    /// etcd client URLs, comma-separated.
    pub etcd: String,
    /// NATS URLs, comma-separated.
    pub nats: String,
    /// Chain JSON-RPC URL.
    pub rpc: String,
    /// Chain WebSocket URL for new heads.
    pub ws: Option<String>,
    /// More JSON-RPC URLs after `rpc`, in order of preference.
    pub fallback_rpc: Vec<String>,
    /// Per-endpoint request rate.
    pub requests_per_second: Option<u32>,
    /// Timeout of one RPC call, in milliseconds.
    pub request_timeout_ms: u64,
    /// Largest `eth_getLogs` span.
    pub max_block_range: u64,
    /// Port for `/metrics`.
    pub metrics_port: u16,
    /// Membership lease TTL in seconds.
    pub lease_ttl_secs: u64,
    /// Logs as JSON lines (`log_format = "json"`) instead of text.
    pub json_logs: bool,
    /// Replicas of the stream (`nats.stream.replicas`).
    pub stream_replicas: usize,
    /// `idle_commit_interval`: short, so that a quiet subscription's cursor is seen to move.
    pub idle_commit_interval: String,
}

impl WorkerSettings {
    /// Settings for worker `worker_id` against the given services.
    pub fn new(worker_id: &str, etcd: String, nats: String, rpc: String) -> Self {
        Self {
            worker_id: worker_id.into(),
            etcd,
            nats,
            rpc,
            ws: None,
            fallback_rpc: Vec::new(),
            requests_per_second: None,
            request_timeout_ms: 3000,
            max_block_range: 50,
            metrics_port: free_port(),
            lease_ttl_secs: 10,
            json_logs: false,
            stream_replicas: 1,
            idle_commit_interval: "10s".into(),
        }
    }

    /// The TOML configuration file for these settings.
    pub fn to_toml(&self) -> String {
        format!(
            r#"worker_id = "{id}"
metrics_listen = "127.0.0.1:{metrics}"
log_format = "{log_format}"
idle_commit_interval = "{idle}"

[etcd]
endpoints = [{etcd}]
connect_timeout = "1s"
request_timeout = "3s"

[nats]
url = "{nats}"
ack_timeout = "2s"

[nats.stream]
name = "{STREAM}"
subjects = ["herald.events.>"]
duplicate_window = "10m"
replicas = {replicas}

[membership]
lease_ttl = "{ttl}s"

[[chains]]
chain_id = {chain}
rpc_urls = [{rpc}]
{ws}poll_interval = "100ms"
max_block_range = {range}
request_timeout = "{timeout}ms"
{rps}
"#,
            ttl = self.lease_ttl_secs,
            idle = self.idle_commit_interval,
            log_format = if self.json_logs { "json" } else { "text" },
            id = self.worker_id,
            metrics = self.metrics_port,
            etcd = toml_list(self.etcd.split(',')),
            nats = self.nats,
            replicas = self.stream_replicas,
            chain = ANVIL_CHAIN_ID,
            rpc = toml_list(std::iter::once(&self.rpc).chain(&self.fallback_rpc).map(String::as_str)),
            timeout = self.request_timeout_ms,
            rps =
                self.requests_per_second.map(|r| format!("requests_per_second = {r}\n")).unwrap_or_default(),
            ws = self.ws.as_ref().map(|u| format!("ws_url = \"{u}\"\n")).unwrap_or_default(),
            range = self.max_block_range,
        )
    }
}

/// `"a", "b"`: strings as the items of a TOML array.
fn toml_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
}

/// A `herald-worker` process.
pub struct WorkerProcess {
    process: ChildProcess,
    settings: WorkerSettings,
    _dir: TempDir,
}

impl WorkerProcess {
    /// Writes the config and starts the worker. Does not wait for anything.
    pub fn start(settings: WorkerSettings) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("herald-worker-").tempdir()?;
        let config = dir.path().join("worker.toml");
        std::fs::write(&config, settings.to_toml())?;
        let process = Self::spawn_with_config(&config, dir.path())?;
        Ok(Self { process, settings, _dir: dir })
    }

    /// Starts `herald-worker --config <path>` with logs in `log_dir`.
    pub fn spawn_with_config(config: &Path, log_dir: &Path) -> anyhow::Result<ChildProcess> {
        let args = ["--config".to_owned(), config.to_string_lossy().into_owned()];
        let envs = [("HERALD_LOG".to_owned(), "info,herald_worker=debug".to_owned())];
        ChildProcess::spawn("herald-worker", &workspace_bin("herald-worker"), &args, &envs, log_dir)
    }

    /// Its settings.
    pub fn settings(&self) -> &WorkerSettings {
        &self.settings
    }

    /// SIGKILLs it.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Sends `signal` (e.g. SIGSTOP, SIGCONT) without waiting.
    pub fn signal(&self, signal: Signal) {
        self.process.signal(signal);
    }

    /// SIGTERMs it and waits; returns the exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        self.process.signal(Signal::SIGTERM);
        self.process.wait().await
    }

    /// Waits for it to exit by itself; returns the exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        self.process.wait().await
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(40)
    }

    /// Its exit code, if it exited.
    pub fn try_exit_code(&mut self) -> Option<Option<i32>> {
        self.process.try_exit_code()
    }

    /// Resident set size of the process in bytes (`VmRSS`), while it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Peak resident set size of the process in bytes (`VmHWM`), while it runs.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Its `/metrics` exposition.
    pub async fn metrics_text(&self) -> Option<String> {
        http_get(self.settings.metrics_port, "/metrics").await
    }

    /// The largest value of any series of metric `name`.
    pub async fn metric_max(&self, name: &str) -> Option<f64> {
        let text = http_get(self.settings.metrics_port, "/metrics").await?;
        text.lines()
            .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .reduce(f64::max)
    }

    /// The value of metric `name` with all of `labels` (`key="value"` pairs), summed.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.metrics_text().await?;
        let mut total = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ')?;
            let metric_name = series.split('{').next()?;
            if metric_name != name {
                continue;
            }
            if labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))) {
                *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
            }
        }
        total
    }
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// Writes `spec` and assigns it to `worker` (as the coordinator will).
pub async fn register_subscription(
    etcd: &mut etcd_client::Client,
    spec: &SubscriptionSpec,
    worker: &str,
) -> anyhow::Result<()> {
    let keys = Keyspace::default();
    let record = SubscriptionRecord::new(spec.clone(), 0);
    etcd.put(keys.subscription(&spec.id), serde_json::to_vec(&record)?, None).await?;
    let assignment = Assignment { worker_id: WorkerId::new(worker)? };
    etcd.put(keys.assignment(&spec.id), serde_json::to_vec(&assignment)?, None).await?;
    Ok(())
}

/// Reads, changes and writes back a subscription record (compare-and-swap on its revision).
pub async fn update_record(
    etcd: &mut etcd_client::Client,
    id: &SubscriptionId,
    change: impl Fn(&mut SubscriptionRecord),
) -> anyhow::Result<()> {
    let key = Keyspace::default().subscription(id);
    loop {
        let resp = etcd.get(key.as_str(), None).await?;
        let kv = resp.kvs().first().ok_or_else(|| anyhow::anyhow!("no subscription {id}"))?;
        let mut record: SubscriptionRecord = serde_json::from_slice(kv.value())?;
        change(&mut record);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())])
            .and_then([TxnOp::put(key.as_str(), serde_json::to_vec(&record)?, None)]);
        if etcd.txn(txn).await?.succeeded() {
            return Ok(());
        }
    }
}

/// Pauses or resumes a subscription.
pub async fn set_state(
    etcd: &mut etcd_client::Client,
    id: &SubscriptionId,
    state: SubscriptionState,
) -> anyhow::Result<()> {
    update_record(etcd, id, |r| r.state = state).await
}

/// Requests a replay from `from_block`.
pub async fn request_rewind(
    etcd: &mut etcd_client::Client,
    id: &SubscriptionId,
    from_block: u64,
) -> anyhow::Result<()> {
    update_record(etcd, id, |r| r.rewind = Some(Rewind { epoch: r.next_rewind_epoch(), from_block })).await
}

/// Deletes a subscription with its assignment and cursor, in one transaction.
pub async fn delete_subscription(etcd: &mut etcd_client::Client, id: &SubscriptionId) -> anyhow::Result<()> {
    let keys = Keyspace::default();
    let txn = Txn::new().and_then([
        TxnOp::delete(keys.subscription(id), None),
        TxnOp::delete(keys.assignment(id), None),
        TxnOp::delete(keys.cursor(id), None),
    ]);
    etcd.txn(txn).await?;
    Ok(())
}

/// The stored cursor of a subscription.
pub async fn read_cursor(
    etcd: &mut etcd_client::Client,
    id: &SubscriptionId,
) -> anyhow::Result<Option<Cursor>> {
    let resp = etcd.get(Keyspace::default().cursor(id), None).await?;
    Ok(match resp.kvs().first() {
        Some(kv) => Some(Cursor::decode(kv.value())?),
        None => None,
    })
}

/// The worker holding the owner key of `id` (claimed before its task starts, released after
/// the task ended), if any.
pub async fn owner_of(etcd: &mut etcd_client::Client, id: &SubscriptionId) -> anyhow::Result<Option<String>> {
    let resp = etcd.get(Keyspace::default().owner(id), None).await?;
    Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Waits until the cursor of `id` is at or past `block`: every matching log up to it is in
/// the stream.
pub async fn wait_for_cursor(
    etcd: &crate::Etcd,
    id: &SubscriptionId,
    block: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for(&format!("cursor of {id} at block {block}"), timeout, || async {
        let c = read_cursor(&mut etcd.client().await.ok()?, id).await.ok()??;
        (c.block_number >= block).then_some(())
    })
    .await
}

/// Reads messages back from the stream, as a consumer would.
pub struct StreamReader {
    js: jetstream::Context,
}

impl StreamReader {
    /// Connects to NATS at `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = async_nats::connect(url).await?;
        Ok(Self { js: jetstream::new(client) })
    }

    /// The raw payload of the first message on `subject`.
    pub async fn first_payload(&self, subject: &str) -> anyhow::Result<Vec<u8>> {
        let stream = self.js.get_stream(STREAM).await?;
        let message = stream.get_first_raw_message_by_subject(subject, 1).await?;
        Ok(message.payload.to_vec())
    }

    /// Deletes the last `n` messages stored on `subject` from the stream (as an operator's
    /// `nats stream rmm`, or a lost tail after a failover would); returns their sequences,
    /// newest first.
    pub async fn delete_last(&self, subject: &str, n: usize) -> anyhow::Result<Vec<u64>> {
        let stream = self.js.get_stream(STREAM).await?;
        let mut deleted = Vec::with_capacity(n);
        for _ in 0..n {
            let last = stream.get_last_raw_message_by_subject(subject).await?;
            anyhow::ensure!(
                stream.delete_message(last.sequence).await?,
                "message {} not deleted",
                last.sequence
            );
            deleted.push(last.sequence);
        }
        Ok(deleted)
    }

    /// Every message stored on `subject`, in stream order.
    pub async fn read_all(&self, subject: &str) -> anyhow::Result<Vec<EventEnvelope>> {
        let Ok(stream) = self.js.get_stream(STREAM).await else { return Ok(Vec::new()) };
        read_stored(&stream, subject)
            .await?
            .iter()
            .map(|message| Ok(serde_json::from_slice(&message.payload)?))
            .collect()
    }

    /// Waits until `subject` holds at least `count` messages, then returns all of them.
    pub async fn wait_for_count(
        &self,
        subject: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<EventEnvelope>> {
        let last = std::sync::atomic::AtomicUsize::new(0);
        let result = wait_for(&format!("{count} messages on {subject}"), timeout, || async {
            let all = self.read_all(subject).await.ok()?;
            last.store(all.len(), std::sync::atomic::Ordering::Relaxed);
            (all.len() >= count).then_some(all)
        })
        .await;
        result.map_err(|e| anyhow::anyhow!("{e} (saw {})", last.into_inner()))
    }
}

/// The admin token test coordinators use.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The read-only token test coordinators use.
pub const READ_TOKEN: &str = "test-read-token-0123456789";

/// What a test coordinator is pointed at.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// API port.
    pub port: u16,
    /// etcd client URLs, comma-separated.
    pub etcd: String,
    /// Chain JSON-RPC URL (for heads).
    pub rpc: String,
    /// Whether reads need a token.
    pub protect_reads: bool,
    /// `maintenance.compaction_retention`.
    pub compaction_retention: String,
}

impl CoordinatorSettings {
    /// Settings on a free port.
    pub fn new(etcd: String, rpc: String) -> Self {
        Self { port: free_port(), etcd, rpc, protect_reads: false, compaction_retention: "5m".into() }
    }

    /// The TOML configuration file.
    pub fn to_toml(&self) -> String {
        format!(
            r#"listen = "127.0.0.1:{port}"
identity = "coordinator-{port}"

[election]
lease_ttl = "2s"

[planner]
debounce = "100ms"
max_delay = "1s"
resync_interval = "2s"

[etcd]
endpoints = [{etcd}]

[auth]
admin_token = "{ADMIN_TOKEN}"
read_token = "{READ_TOKEN}"
protect_reads = {protect}

[api]
max_body_bytes = 16384
max_start_block_ahead = 1000

[maintenance]
compaction_retention = "{retention}"

[[chains]]
chain_id = {chain}
rpc_urls = ["{rpc}"]
head_poll_interval = "200ms"
"#,
            port = self.port,
            etcd = toml_list(self.etcd.split(',')),
            protect = self.protect_reads,
            retention = self.compaction_retention,
            chain = ANVIL_CHAIN_ID,
            rpc = self.rpc,
        )
    }
}

/// A `herald-coordinator` process and an HTTP client for its API.
pub struct CoordinatorProcess {
    process: ChildProcess,
    settings: CoordinatorSettings,
    dir: TempDir,
    http: reqwest::Client,
}

impl CoordinatorProcess {
    /// Starts it and waits until `/readyz` answers 200 and the chain head is known.
    pub async fn start(settings: CoordinatorSettings) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("herald-coordinator-").tempdir()?;
        let process = Self::spawn(&settings, dir.path())?;
        let c = Self { process, settings, dir, http: reqwest::Client::new() };
        c.wait_ready().await?;
        Ok(c)
    }

    fn spawn(settings: &CoordinatorSettings, dir: &Path) -> anyhow::Result<ChildProcess> {
        let config = dir.join("coordinator.toml");
        std::fs::write(&config, settings.to_toml())?;
        let args = ["--config".to_owned(), config.to_string_lossy().into_owned()];
        let envs = [("HERALD_LOG".to_owned(), "info,herald_coordinator=debug".to_owned())];
        ChildProcess::spawn("herald-coordinator", &workspace_bin("herald-coordinator"), &args, &envs, dir)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for("the coordinator to be ready", Duration::from_secs(60), || async {
            let ready = self.http.get(self.url("/readyz")).send().await.ok()?.status().is_success();
            let chains: serde_json::Value = self.get("/v1/chains").await.ok()?.1;
            (ready && chains[0]["head"].is_u64()).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.process.log_tail(30)))
    }

    /// SIGTERMs it, waits, and starts it again with the same settings.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.terminate().await;
        self.start_again().await
    }

    /// SIGKILLs it.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts it again after [`Self::kill`].
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.process = Self::spawn(&self.settings, self.dir.path())?;
        self.wait_ready().await
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.settings.port)
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(30)
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The value of its metric `name` (a series without labels, or the first one).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.http.get(self.url("/metrics")).send().await.ok()?.text().await.ok()?;
        text.lines()
            .filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name))
            .find_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
    }

    /// A request builder with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(ADMIN_TOKEN)
    }

    /// The raw client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// GET with the admin token: (status, JSON body or null).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        Self::send(self.admin(reqwest::Method::GET, path)).await
    }

    /// POST JSON with the admin token.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        Self::send(self.admin(reqwest::Method::POST, path).json(body)).await
    }

    /// Sends and returns (status, JSON body or null).
    pub async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)))
    }
}

/// Every message `stream` holds on `subject`, in stream order, as a consumer reads them
/// (an ephemeral pull consumer from the first message, deleted afterwards).
pub async fn read_stored(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    loop {
        let pending = consumer.clone().info().await?.num_pending;
        if pending == 0 {
            break;
        }
        let mut batch =
            consumer.fetch().max_messages(2000).expires(Duration::from_secs(3)).messages().await?;
        let mut got = 0;
        while let Some(message) = futures::StreamExt::next(&mut batch).await {
            out.push(message.map_err(|e| anyhow::anyhow!("{e}"))?);
            got += 1;
        }
        anyhow::ensure!(got > 0, "the consumer of {subject} reported {pending} pending but delivered none");
    }
    let _ = stream.delete_consumer(consumer.cached_info().name.as_str()).await;
    Ok(out)
}
