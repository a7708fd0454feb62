//! herald's real-service test harness.
//!
//! Integration tests and the demo run against real `etcd`, `nats-server -js` and `anvil`
//! processes, each started here on a free 127.0.0.1 port with its own temporary data
//! directory, waited on until it answers, and killed when its handle drops (and, through
//! `PR_SET_PDEATHSIG`, when the test process itself dies), so a failing test leaks nothing.
//!
//! - [`process`]: child processes with captured logs and guaranteed cleanup.
//! - [`services`]: [`Etcd`], [`Nats`], [`Anvil`].
//! - [`chain`]: deploys and drives the test contract (`contracts/HeraldTest.sol`).
//! - [`herald`]: worker processes, subscription registration, reading the stream back.
//! - [`chaos`]: the randomized fault soak of `make chaos`.
//! - [`check`]: assertions over what a consumer reads and what etcd recorded.
//! - [`wait`]: polling a condition with a deadline (tests never sleep for a fixed time).

pub mod chain;
pub mod chaos;
pub mod check;
pub mod clusters;
pub mod herald;
pub mod process;
pub mod rpc_proxy;
pub mod services;
pub mod tcp_proxy;
pub mod wait;

pub use chain::TestChain;
pub use herald::{StreamReader, WorkerProcess, register_subscription};
pub use services::{Anvil, Etcd, Nats};
pub use wait::wait_for;

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Path of an external tool: `.tools/bin/<name>` (installed by `scripts/install-deps.sh`),
/// else whatever `PATH` has.
pub fn tool(name: &str) -> PathBuf {
    let local = repo_root().join(".tools/bin").join(name);
    if local.exists() { local } else { PathBuf::from(name) }
}

/// Path of a binary built from this workspace (e.g. `herald-worker`), found next to the
/// running executable's target directory. `make test` builds them before running tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{name} is not built next to {}; run `cargo build --bins` first", exe.display());
}

/// Installs a tracing subscriber for test output (idempotent).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// etcd, NATS and anvil with the test contract deployed: what most tests start from.
pub struct Stack {
    /// etcd.
    pub etcd: Etcd,
    /// NATS with JetStream.
    pub nats: Nats,
    /// The dev chain.
    pub anvil: Anvil,
    /// The deployed test contract.
    pub chain: TestChain,
}

impl Stack {
    /// Starts the three services concurrently and deploys the contract.
    pub async fn start() -> anyhow::Result<Self> {
        let (etcd, nats, anvil) = tokio::try_join!(Etcd::start(), Nats::start(), Anvil::start())?;
        let chain = TestChain::deploy(&anvil.url()).await?;
        Ok(Self { etcd, nats, anvil, chain })
    }

    /// Settings for a worker pointed at this stack.
    pub fn worker_settings(&self, worker_id: &str) -> herald::WorkerSettings {
        herald::WorkerSettings::new(worker_id, self.etcd.endpoint(), self.nats.url(), self.anvil.url())
    }

    /// A subscription to the test contract's `event` (see [`chain::TRANSFER_EVENT`]) from block 0.
    pub fn subscription(&self, id: &str, event: &str) -> herald_proto::SubscriptionSpec {
        herald_proto::SubscriptionSpec {
            id: herald_proto::SubscriptionId::new(id).expect("valid id"),
            chain_id: services::ANVIL_CHAIN_ID,
            address: self.chain.contract,
            event: herald_proto::EventDefinition::Signature(event.into()).into(),
            filters: Default::default(),
            start_block: herald_proto::StartBlock::Number(0),
            confirmations: 0,
            finality: None,
            subject: None,
        }
    }
}
