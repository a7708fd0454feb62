//! The real services: etcd, NATS with JetStream, anvil.

use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::providers::{Provider, RootProvider};
use tempfile::TempDir;

use crate::process::{ChildProcess, free_port};
use crate::{tool, wait_for};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A single-member etcd cluster.
pub struct Etcd {
    process: ChildProcess,
    port: u16,
    peer_port: u16,
    dir: TempDir,
}

impl Etcd {
    /// Starts on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(free_port()).await
    }

    /// Starts on `port` and waits until it answers.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("herald-etcd-").tempdir()?;
        let peer_port = free_port();
        let process = Self::spawn(dir.path(), port, peer_port)?;
        let etcd = Self { process, port, peer_port, dir };
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    fn spawn(dir: &Path, port: u16, peer_port: u16) -> anyhow::Result<ChildProcess> {
        let initial = format!("herald-test=http://127.0.0.1:{peer_port}");
        let args = etcd_args("herald-test", dir, port, peer_port, &initial);
        ChildProcess::spawn("etcd", &tool("etcd"), &args, &[], dir)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let endpoint = self.endpoint();
        wait_for("etcd to answer", READY_TIMEOUT, || async {
            let mut client = etcd_client::Client::connect([endpoint.as_str()], None).await.ok()?;
            client.status().await.ok().map(|_| ())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.process.log_tail(20)))
    }

    /// Its client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connected client.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.endpoint()], None).await?)
    }

    /// Kills it and starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.terminate().await;
        self.process = Self::spawn(self.dir.path(), self.port, self.peer_port)?;
        self.wait_ready().await
    }
}

/// The command line of etcd member `name` on loopback, with its data under `dir`, in the
/// cluster `initial_cluster` (`name=peer-url,...`).
pub(crate) fn etcd_args(
    name: &str,
    dir: &Path,
    port: u16,
    peer_port: u16,
    initial_cluster: &str,
) -> Vec<String> {
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    [
        "--name",
        name,
        "--data-dir",
        &dir.join("data").to_string_lossy(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        initial_cluster,
        "--log-level",
        "warn",
    ]
    .map(String::from)
    .to_vec()
}

/// A NATS server with JetStream and a file store.
pub struct Nats {
    process: Option<ChildProcess>,
    port: u16,
    dir: TempDir,
}

impl Nats {
    /// Starts on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(free_port()).await
    }

    /// Starts on `port` and waits until it answers.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("herald-nats-").tempdir()?;
        let mut nats = Self { process: None, port, dir };
        nats.start_again().await?;
        Ok(nats)
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it gracefully (SIGTERM, wait for exit); its store stays.
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate().await;
        }
    }

    /// Starts it again on the same port and store directory, after [`Nats::stop`].
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let args = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-sd",
            &self.store_dir().to_string_lossy(),
        ]
        .map(String::from);
        let process = ChildProcess::spawn("nats-server", &tool("nats-server"), &args, &[], self.dir.path())?;
        self.process = Some(process);
        let url = self.url();
        let ready = wait_for("nats to answer", READY_TIMEOUT, || async {
            let client = async_nats::connect(url.as_str()).await.ok()?;
            let js = async_nats::jetstream::new(client);
            js.query_account().await.ok().map(|_| ())
        })
        .await;
        ready.map_err(|e| {
            anyhow::anyhow!("{e}\n{}", self.process.as_ref().map(|p| p.log_tail(20)).unwrap_or_default())
        })
    }

    /// Stops and starts it, keeping the port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.start_again().await
    }
}

/// A local dev chain, auto-mining, chain id 31337.
pub struct Anvil {
    process: ChildProcess,
    port: u16,
    _dir: TempDir,
}

/// anvil's chain id.
pub const ANVIL_CHAIN_ID: u64 = 31337;

impl Anvil {
    /// Starts on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(free_port()).await
    }

    /// Starts on `port` and waits until it answers.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        Self::start_with(port, &[]).await
    }

    /// Starts a chain that shares the blocks of the chain at `url` up to `block` (the same
    /// hashes, and the same state there) and mines its own blocks above it: a second node that
    /// disagrees with the first at the tip. Its dev accounts are funded as usual.
    pub async fn fork(url: &str, block: u64) -> anyhow::Result<Self> {
        let args =
            ["--fork-url".to_owned(), url.to_owned(), "--fork-block-number".to_owned(), block.to_string()];
        Self::start_with(free_port(), &args).await
    }

    /// Starts on `port` with more command-line arguments and waits until it answers.
    pub async fn start_with(port: u16, extra: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("herald-anvil-").tempdir()?;
        let mut args: Vec<String> = [
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--chain-id",
            &ANVIL_CHAIN_ID.to_string(),
            "--accounts",
            "2",
        ]
        .map(String::from)
        .to_vec();
        args.extend_from_slice(extra);
        let process = ChildProcess::spawn("anvil", &tool("anvil"), &args, &[], dir.path())?;
        let anvil = Self { process, port, _dir: dir };
        let url = anvil.url();
        wait_for("anvil to answer", READY_TIMEOUT, || async {
            let provider = RootProvider::<alloy::network::Ethereum>::new_http(url.parse().ok()?);
            provider.get_chain_id().await.ok()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", anvil.process.log_tail(20)))?;
        Ok(anvil)
    }

    /// Its JSON-RPC URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its WebSocket JSON-RPC URL (same port).
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}
