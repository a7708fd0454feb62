//! The deployment the soak runs against, as users run it: a 3-member etcd cluster, a 3-node
//! JetStream cluster with the stream at 3 replicas, anvil behind the RPC fault proxy, two
//! coordinators and up to four workers started from their config files.
//!
//! Each herald process lives in a slot that knows whether the soak meant it to be down, so an
//! exit nobody caused is noticed (and the process started again, to keep the soak going).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::Mutex;

use crate::clusters::{EtcdCluster, NatsCluster};
use crate::herald::{CoordinatorSettings, WorkerSettings};
use crate::process::ChildProcess;
use crate::rpc_proxy::RpcProxy;
use crate::services::Anvil;
use crate::{TestChain, wait_for, workspace_bin};

/// Workers that always run (slots 0..BASE_WORKERS); one more slot is added and removed.
pub const BASE_WORKERS: usize = 3;
/// The workers' membership lease TTL, in seconds.
pub const WORKER_LEASE_TTL_SECS: u64 = 4;

/// A herald process the soak controls.
pub struct Slot<S> {
    /// What it runs with.
    pub settings: S,
    /// The process, while it runs (or is stopped).
    pub process: Option<ChildProcess>,
    /// The soak stopped it on purpose (or has not started it yet).
    pub meant_down: bool,
    /// Exits nobody caused: (process name, exit code).
    pub unexpected_exits: Vec<(String, Option<i32>)>,
}

impl<S> Slot<S> {
    fn empty(settings: S) -> Self {
        Self { settings, process: None, meant_down: true, unexpected_exits: Vec::new() }
    }

    /// Whether its process runs.
    pub fn running(&self) -> bool {
        self.process.is_some()
    }
}

/// A worker slot: its settings carry the current `worker_id`.
pub type WorkerSlot = Slot<WorkerSettings>;
/// A coordinator slot.
pub type CoordinatorSlot = Slot<CoordinatorSettings>;

/// The whole deployment.
pub struct Deployment {
    /// etcd.
    pub etcd: Mutex<EtcdCluster>,
    /// NATS.
    pub nats: Mutex<NatsCluster>,
    /// The chain, reached directly (the soak's own reads and writes).
    pub anvil: Anvil,
    /// The proxy herald reaches the chain through.
    pub proxy: RpcProxy,
    /// The test contracts.
    pub contracts: Vec<TestChain>,
    /// Coordinators.
    pub coordinators: Vec<Mutex<CoordinatorSlot>>,
    /// Workers; the last slot starts empty.
    pub workers: Vec<Mutex<WorkerSlot>>,
    /// Where every herald process logs.
    pub log_dir: PathBuf,
    /// The head once every contract was deployed: no reorg may reach it, or the contracts
    /// deployed in replaced blocks vanish with them (with their traffic, silently).
    pub deployed_at: u64,
    http: reqwest::Client,
}

impl Deployment {
    /// Starts everything and deploys `contracts` test contracts.
    pub async fn start(log_dir: &Path, contracts: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let block_time = ["--block-time".to_owned(), "1".to_owned()];
        let (etcd, nats, anvil) = tokio::try_join!(
            EtcdCluster::start(3),
            NatsCluster::start(3),
            Anvil::start_with(crate::process::free_port(), &block_time)
        )?;
        let proxy = RpcProxy::start(&anvil.url()).await?;
        let mut deployed = Vec::new();
        for _ in 0..contracts {
            deployed.push(TestChain::deploy(&anvil.url()).await?);
        }
        let deployed_at = match deployed.last() {
            Some(last) => last.head().await?,
            None => 0,
        };
        let etcd_urls = etcd.endpoints().join(",");
        let nats_urls = nats.urls().join(",");
        let coordinators = (0..2)
            .map(|_| Mutex::new(Slot::empty(CoordinatorSettings::new(etcd_urls.clone(), proxy.url()))))
            .collect();
        let workers = (0..=BASE_WORKERS)
            .map(|i| {
                let mut s =
                    WorkerSettings::new(&format!("w{i}"), etcd_urls.clone(), nats_urls.clone(), proxy.url());
                s.lease_ttl_secs = WORKER_LEASE_TTL_SECS;
                s.stream_replicas = 3;
                s.request_timeout_ms = 2000;
                Mutex::new(Slot::empty(s))
            })
            .collect();
        let deployment = Self {
            etcd: Mutex::new(etcd),
            nats: Mutex::new(nats),
            anvil,
            proxy,
            contracts: deployed,
            coordinators,
            workers,
            log_dir: log_dir.to_owned(),
            deployed_at,
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
        };
        for i in 0..2 {
            let mut slot = deployment.coordinators[i].lock().await;
            deployment.start_coordinator(&mut slot)?;
        }
        for i in 0..BASE_WORKERS {
            let mut slot = deployment.workers[i].lock().await;
            deployment.start_worker(&mut slot)?;
        }
        deployment.wait_api().await?;
        Ok(deployment)
    }

    /// Starts the coordinator of `slot` from its config file.
    pub fn start_coordinator(&self, slot: &mut CoordinatorSlot) -> anyhow::Result<()> {
        let name = format!("coordinator-{}", slot.settings.port);
        let config = self.log_dir.join(format!("{name}.toml"));
        std::fs::write(&config, slot.settings.to_toml())?;
        let args = ["--config".to_owned(), config.to_string_lossy().into_owned()];
        let envs = [("HERALD_LOG".to_owned(), "info,herald_coordinator=debug".to_owned())];
        let bin = workspace_bin("herald-coordinator");
        slot.process = Some(ChildProcess::spawn(&name, &bin, &args, &envs, &self.log_dir)?);
        slot.meant_down = false;
        Ok(())
    }

    /// Starts the worker of `slot` from its config file, under its current `worker_id`.
    pub fn start_worker(&self, slot: &mut WorkerSlot) -> anyhow::Result<()> {
        let id = slot.settings.worker_id.clone();
        let config = self.log_dir.join(format!("{id}.toml"));
        std::fs::write(&config, slot.settings.to_toml())?;
        let args = ["--config".to_owned(), config.to_string_lossy().into_owned()];
        let envs = [("HERALD_LOG".to_owned(), "info,herald_worker=debug".to_owned())];
        let bin = workspace_bin("herald-worker");
        slot.process = Some(ChildProcess::spawn(&id, &bin, &args, &envs, &self.log_dir)?);
        slot.meant_down = false;
        Ok(())
    }

    /// Waits (up to 30 s) until the worker of `slot` serves `/healthz`: from then on it has
    /// its signal handlers, so a SIGTERM is a graceful stop rather than the default action (a
    /// process signalled within milliseconds of its start dies of the signal, as any would).
    pub async fn wait_worker_up(&self, slot: &WorkerSlot) {
        let url = format!("http://127.0.0.1:{}/healthz", slot.settings.metrics_port);
        let what = format!("worker {} to serve /healthz", slot.settings.worker_id);
        let up = wait_for(&what, Duration::from_secs(30), || async {
            let response = self.http.get(&url).timeout(Duration::from_secs(1)).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
        if let Err(e) = up {
            eprintln!("chaos: {e}; stopping it anyway");
        }
    }

    /// Waits until both coordinators answer and one leads.
    async fn wait_api(&self) -> anyhow::Result<()> {
        wait_for("the coordinators to answer, one leading", Duration::from_secs(90), || async {
            for c in &self.coordinators {
                let port = c.lock().await.settings.port;
                self.http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.ok()?;
            }
            self.leader().await
        })
        .await
        .map(|_| ())
    }

    /// The coordinators' API ports.
    pub async fn coordinator_ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        for c in &self.coordinators {
            ports.push(c.lock().await.settings.port);
        }
        ports
    }

    /// Whether the coordinator on `port` says it leads (`None`: it did not answer in time).
    pub async fn leads(&self, port: u16) -> Option<bool> {
        let request =
            self.http.get(format!("http://127.0.0.1:{port}/metrics")).timeout(Duration::from_millis(500));
        let text = request.send().await.ok()?.text().await.ok()?;
        let line = text.lines().find(|l| l.starts_with("herald_coordinator_is_leader "))?;
        Some(line.ends_with(" 1"))
    }

    /// The index of the coordinator that leads, if one says so.
    pub async fn leader(&self) -> Option<usize> {
        for (i, port) in self.coordinator_ports().await.into_iter().enumerate() {
            if self.leads(port).await == Some(true) {
                return Some(i);
            }
        }
        None
    }

    /// Sends an admin request to the API, trying each coordinator, until one answers other
    /// than 5xx or `timeout` passes; returns (status, body).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let ports = self.coordinator_ports().await;
        let last = std::sync::Mutex::new(String::new());
        let note = |e: String| *last.lock().unwrap_or_else(|p| p.into_inner()) = e;
        let answer = wait_for(&format!("{method} {path} to be answered"), timeout, || async {
            for port in &ports {
                let mut request = self
                    .http
                    .request(method.clone(), format!("http://127.0.0.1:{port}{path}"))
                    .bearer_auth(crate::herald::ADMIN_TOKEN)
                    .timeout(Duration::from_secs(3));
                if let Some(body) = body {
                    request = request.json(body);
                }
                match request.send().await {
                    Ok(response) if !response.status().is_server_error() => {
                        let status = response.status().as_u16();
                        let text = response.text().await.unwrap_or_default();
                        return Some((
                            status,
                            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
                        ));
                    }
                    Ok(response) => note(response.status().to_string()),
                    Err(e) => note(e.to_string()),
                }
            }
            None
        })
        .await;
        let last = last.into_inner().unwrap_or_else(|p| p.into_inner());
        answer.map_err(|e| anyhow::anyhow!("{e} (last: {last})"))
    }

    /// Sends `signal` to worker slot `i`'s process.
    pub async fn signal_worker(&self, i: usize, signal: Signal) {
        if let Some(p) = &self.workers[i].lock().await.process {
            p.signal(signal);
        }
    }

    /// Every herald log file, for the panic check.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.log_dir) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect()
    }
}
