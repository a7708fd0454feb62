//! Clustered etcd and NATS, as users deploy them: three etcd members, three JetStream
//! servers with routes between them. For the soak (`make chaos`) and the tests that prove
//! what the clusters keep when members die.

use std::time::Duration;

use tempfile::TempDir;

use crate::process::{ChildProcess, free_port};
use crate::services::etcd_args;
use crate::{tool, wait_for};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One member of an [`EtcdCluster`].
struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: TempDir,
    process: Option<ChildProcess>,
}

/// A three-member etcd cluster on loopback.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        let mut members = Vec::new();
        for i in 0..size {
            members.push(EtcdMember {
                name: format!("etcd{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir: tempfile::Builder::new().prefix("herald-etcd-cluster-").tempdir()?,
                process: None,
            });
        }
        let mut cluster = Self { members };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    fn initial_cluster(&self) -> String {
        let peers: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        peers.join(",")
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial = self.initial_cluster();
        let m = &mut self.members[i];
        let mut args = etcd_args(&m.name, m.dir.path(), m.client_port, m.peer_port, &initial);
        args.extend(
            ["--initial-cluster-state", "new", "--initial-cluster-token", "herald-cluster"].map(String::from),
        );
        m.process = Some(ChildProcess::spawn(&m.name, &tool("etcd"), &args, &[], m.dir.path())?);
        Ok(())
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let endpoints = self.endpoints();
        wait_for("the etcd cluster to accept a write", READY_TIMEOUT, || async {
            let mut client = etcd_client::Client::connect(endpoints.clone(), None).await.ok()?;
            client.put("herald-cluster-ready", "1", None).await.ok().map(|_| ())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.log_tails()))
    }

    fn log_tails(&self) -> String {
        let tails = self.members.iter().filter_map(|m| m.process.as_ref().map(|p| p.log_tail(10)));
        tails.collect::<Vec<_>>().join("\n")
    }

    /// Every member's client URL (also the stopped ones').
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect()
    }

    /// Members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILLs member `i` (its data stays).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill().await;
        }
    }

    /// Starts member `i` again with its data, after [`Self::kill`].
    pub fn start_again(&mut self, i: usize) -> anyhow::Result<()> {
        if self.members[i].process.is_none() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// Waits until the cluster accepts writes (a quorum is up).
    pub async fn wait_writable(&self) -> anyhow::Result<()> {
        self.wait_ready().await
    }
}

/// One server of a [`NatsCluster`].
struct NatsNode {
    name: String,
    port: u16,
    cluster_port: u16,
    dir: TempDir,
    process: Option<ChildProcess>,
}

/// JetStream servers routed into one cluster on loopback.
pub struct NatsCluster {
    nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Starts `size` servers and waits until JetStream answers on each (a meta leader elected).
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for i in 0..size {
            nodes.push(NatsNode {
                name: format!("nats{i}"),
                port: free_port(),
                cluster_port: free_port(),
                dir: tempfile::Builder::new().prefix("herald-nats-cluster-").tempdir()?,
                process: None,
            });
        }
        let mut cluster = Self { nodes };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_node(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        let n = &mut self.nodes[i];
        let store = n.dir.path().join("jetstream");
        let args = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &n.port.to_string(),
            "-n",
            &n.name,
            "--cluster_name",
            "herald",
            "--cluster",
            &format!("nats://127.0.0.1:{}", n.cluster_port),
            "--routes",
            &routes.join(","),
            "-sd",
            &store.to_string_lossy(),
        ]
        .map(String::from);
        n.process = Some(ChildProcess::spawn(&n.name, &tool("nats-server"), &args, &[], n.dir.path())?);
        Ok(())
    }

    async fn wait_node(&self, i: usize) -> anyhow::Result<()> {
        let url = self.url(i);
        wait_for("a clustered JetStream server to answer", READY_TIMEOUT, || async {
            let client = async_nats::connect(url.as_str()).await.ok()?;
            let js = async_nats::jetstream::new(client);
            js.query_account().await.ok().map(|_| ())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.log_tail(i)))
    }

    fn log_tail(&self, i: usize) -> String {
        self.nodes[i].process.as_ref().map(|p| p.log_tail(20)).unwrap_or_default()
    }

    /// Server `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every server's client URL: what a client is given to fail over.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Servers.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// SIGKILLs server `i` (its store stays).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill().await;
        }
    }

    /// SIGTERMs server `i` and waits for it to exit (it flushes its store first).
    pub async fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.terminate().await;
        }
    }

    /// Starts server `i` again with its store, after [`Self::kill`], and waits for it.
    pub async fn start_again(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].process.is_none() {
            self.spawn(i)?;
        }
        self.wait_node(i).await
    }

    /// Starts every server that is down, then waits for each (a cluster restarted whole
    /// needs a quorum of its servers before any answers).
    pub async fn start_all_again(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].process.is_none() {
                self.spawn(i)?;
            }
        }
        for i in 0..self.nodes.len() {
            self.wait_node(i).await?;
        }
        Ok(())
    }

    /// The store directory of server `i`.
    pub fn store_dir(&self, i: usize) -> std::path::PathBuf {
        self.nodes[i].dir.path().join("jetstream")
    }
}
