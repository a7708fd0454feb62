//! Worker configuration: one serde struct, defaults -> TOML file -> `HERALD_*` environment.
//!
//! Environment variables override file keys; nesting uses a double underscore, e.g.
//! `HERALD_ETCD__ENDPOINTS='["http://etcd:2379"]'` or `HERALD_NATS__URL=nats://nats:4222`.
//! Unknown keys are rejected, and every error names the key it is about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_proto::{ChainId, Keyspace, WorkerId};
use serde::{Deserialize, Serialize};

/// Everything a worker process needs to know.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This worker's id: stable across restarts (e.g. the pod name).
    pub worker_id: WorkerId,
    /// Log output format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Where `/metrics` and `/healthz` are served; no server when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// etcd connection and key layout.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// NATS connection and the JetStream stream herald publishes to.
    #[serde(default)]
    pub nats: NatsConfig,
    /// The chains this worker serves.
    #[serde(default)]
    pub chains: Vec<ChainConfig>,
    /// Cluster membership.
    #[serde(default)]
    pub membership: MembershipConfig,
    /// How often a subscription whose blocks publish nothing commits its cursor: a crash
    /// replays at most this much of empty blocks (one shared fetch), while each commit is an
    /// etcd write (every 10 s, 100,000 quiet subscriptions wrote 10,000 times a second).
    #[serde(default = "default_idle_commit_interval", with = "humantime_serde")]
    pub idle_commit_interval: Duration,
}

fn default_idle_commit_interval() -> Duration {
    Duration::from_secs(300)
}

/// How this worker takes part in the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipConfig {
    /// TTL of the lease that keeps this worker's registration (and its assignments) alive;
    /// renewed every TTL/3.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Relative capacity announced to the coordinator; 0 = unbounded.
    pub capacity: u32,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self { lease_ttl: Duration::from_secs(10), capacity: 0 }
    }
}

pub use herald_proto::settings::{EtcdConfig, LogFormat};

/// NATS settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// How long to wait for a JetStream publish acknowledgement.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// The stream, created or updated at start.
    #[serde(default)]
    pub stream: StreamConfig,
    /// NATS credentials file (JWT + nkey seed, `nsc generate creds`), e.g. a mounted secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// CA bundle of the NATS server certificates; when set, TLS is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
}

impl NatsConfig {
    /// The servers of `url`: one URL or several, comma-separated (the client fails over between
    /// them and learns the rest of a cluster from the one it reaches).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, String> {
        let servers = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<async_nats::ServerAddr>().map_err(|e| format!("{s:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err("needs at least one server URL".into());
        }
        Ok(servers)
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            ack_timeout: Duration::from_secs(5),
            stream: StreamConfig::default(),
            creds_file: None,
            tls_ca_file: None,
        }
    }
}

/// The JetStream stream herald publishes into.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures; must cover every subscription's subject.
    pub subjects: Vec<String>,
    /// Window in which a repeated `Nats-Msg-Id` is dropped. Must exceed the longest
    /// redelivery herald can cause (a crash or takeover replays from the last cursor).
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long messages are kept; `0s` keeps them forever.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Stream replicas (1 for a single NATS server).
    pub replicas: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            name: "HERALD".into(),
            subjects: vec!["herald.events.>".into()],
            duplicate_window: Duration::from_secs(10 * 60),
            max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

/// One chain and its JSON-RPC endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// EIP-155 chain id; checked against `eth_chainId` at start.
    pub chain_id: ChainId,
    /// JSON-RPC endpoints (http/https), in order of preference: the first healthy one is used,
    /// the next ones take over while it is down.
    #[serde(default)]
    pub rpc_urls: Vec<String>,
    /// File with more endpoints, one per line (`#` comments allowed), appended to `rpc_urls` at
    /// load: keeps URLs that carry API keys in a secret (e.g. a mounted Kubernetes secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_urls_file: Option<PathBuf>,
    /// WebSocket endpoint (ws/wss) for new heads; without it, or while it is down, the head
    /// is polled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws_url: Option<String>,
    /// How often the head is polled (without a socket; five times less often with one).
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Largest block span of one `eth_getLogs` call.
    #[serde(default = "default_max_block_range")]
    pub max_block_range: u64,
    /// Most contracts in one shared `eth_getLogs` of the subscriptions at the head.
    #[serde(default = "default_max_addresses_per_call")]
    pub max_addresses_per_call: usize,
    /// Request-rate limit of each endpoint (calls wait for it); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<std::num::NonZeroU32>,
    /// Timeout of one RPC call.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most calls in one JSON-RPC batch (the headers that vouch for history ranges are read
    /// in batches); 1 sends no batches, for providers that refuse them.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
}

fn default_max_batch_size() -> usize {
    crate::chain::DEFAULT_MAX_BATCH_SIZE
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_max_block_range() -> u64 {
    1_000
}
fn default_max_addresses_per_call() -> usize {
    100
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

pub use herald_proto::settings::ConfigError;

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, message)
}

impl Config {
    /// Loads defaults, then `file` (if given), then `HERALD_*` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = Self::load_unvalidated(file)?;
        for (i, chain) in config.chains.iter_mut().enumerate() {
            if let Some(path) = &chain.rpc_urls_file {
                chain.rpc_urls.extend(herald_proto::settings::read_url_file(
                    &format!("chains[{i}].rpc_urls_file"),
                    path,
                )?);
            }
        }
        config.validate(true)?;
        // The credential files must be readable now (they are read again at each connect).
        config.etcd.read_secrets()?;
        for (key, path) in
            [("nats.creds_file", &config.nats.creds_file), ("nats.tls_ca_file", &config.nats.tls_ca_file)]
        {
            if let Some(path) = path {
                std::fs::read(path)
                    .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
            }
        }
        Ok(config)
    }

    /// Like [`Config::load`], but does not read the files `*_file` keys name (they are mounted
    /// at run time, e.g. from a Kubernetes secret): `--check-config`.
    pub fn check(file: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Self::load_unvalidated(file)?;
        config.validate(false)?;
        Ok(config)
    }

    fn load_unvalidated(file: Option<&Path>) -> Result<Self, ConfigError> {
        herald_proto::settings::layered(Defaults::default(), file)
    }

    /// The etcd keyspace this worker uses.
    pub fn keyspace(&self) -> Keyspace {
        Keyspace::new(self.etcd.prefix.clone()).expect("validated at load")
    }

    /// `files_read`: whether `rpc_urls_file` contents are already in `rpc_urls`.
    fn validate(&self, files_read: bool) -> Result<(), ConfigError> {
        Keyspace::new(self.etcd.prefix.clone()).map_err(|e| invalid("etcd.prefix", e.to_string()))?;
        if self.etcd.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "needs at least one endpoint"));
        }
        self.etcd.validate_credentials().map_err(|e| invalid(e.key, e.message))?;
        self.nats.servers().map_err(|message| invalid("nats.url", message))?;
        if self.nats.stream.name.is_empty() || self.nats.stream.name.contains(['.', ' ', '*', '>', '/', '\\'])
        {
            return Err(invalid("nats.stream.name", "must be non-empty without '.', ' ', '*', '>', '/'"));
        }
        if self.nats.stream.subjects.is_empty() {
            return Err(invalid("nats.stream.subjects", "needs at least one subject"));
        }
        if self.nats.stream.duplicate_window.is_zero() {
            return Err(invalid("nats.stream.duplicate_window", "must be greater than zero"));
        }
        if self.membership.lease_ttl < Duration::from_secs(2) {
            return Err(invalid("membership.lease_ttl", "must be at least 2s"));
        }
        if self.chains.is_empty() {
            return Err(invalid("chains", "needs at least one chain"));
        }
        for (i, chain) in self.chains.iter().enumerate() {
            if self.chains[..i].iter().any(|c| c.chain_id == chain.chain_id) {
                return Err(invalid(format!("chains[{i}].chain_id"), "duplicate chain id"));
            }
            if chain.rpc_urls.is_empty() && (files_read || chain.rpc_urls_file.is_none()) {
                let message = match &chain.rpc_urls_file {
                    Some(path) => format!("needs at least one URL (none in {} either)", path.display()),
                    None => "needs at least one URL (or an rpc_urls_file)".into(),
                };
                return Err(invalid(format!("chains[{i}].rpc_urls"), message));
            }
            for (j, url) in chain.rpc_urls.iter().enumerate() {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(
                        format!("chains[{i}].rpc_urls[{j}]"),
                        "must be an http:// or https:// URL",
                    ));
                }
            }
            if let Some(url) = &chain.ws_url
                && !(url.starts_with("ws://") || url.starts_with("wss://"))
            {
                return Err(invalid(format!("chains[{i}].ws_url"), "must be a ws:// or wss:// URL"));
            }
            if chain.max_batch_size == 0 {
                return Err(invalid(format!("chains[{i}].max_batch_size"), "must be at least 1"));
            }
            if chain.max_addresses_per_call == 0 {
                return Err(invalid(format!("chains[{i}].max_addresses_per_call"), "must be at least 1"));
            }
            if chain.max_block_range == 0 {
                return Err(invalid(format!("chains[{i}].max_block_range"), "must be at least 1"));
            }
            if chain.poll_interval.is_zero() {
                return Err(invalid(format!("chains[{i}].poll_interval"), "must be greater than zero"));
            }
        }
        Ok(())
    }
}

/// The URLs in `path`: one per line, blank lines and `#` comments skipped.
/// The defaults layer: everything but `worker_id`, which has no sensible default.
#[derive(Serialize, Default)]
struct Defaults {
    log_format: LogFormat,
    etcd: EtcdConfig,
    nats: NatsConfig,
    membership: MembershipConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile_in_target();
        f.1.write_all(toml.as_bytes()).unwrap();
        Config::load(Some(&f.0))
    }

    /// `--check-config`: the files `*_file` keys name are not read.
    fn check_str(toml: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile_in_target();
        f.1.write_all(toml.as_bytes()).unwrap();
        Config::check(Some(&f.0))
    }

    fn tempfile_in_target() -> (std::path::PathBuf, std::fs::File) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "herald-config-test-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }

    const MINIMAL: &str = r#"
worker_id = "w-1"
[[chains]]
chain_id = 31337
rpc_urls = ["http://127.0.0.1:8545"]
"#;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = load_str(MINIMAL).unwrap();
        assert_eq!(c.worker_id.as_str(), "w-1");
        assert_eq!(c.etcd.prefix, "/herald");
        assert_eq!(c.nats.stream.name, "HERALD");
        assert_eq!(c.chains[0].max_block_range, 1000);
        assert_eq!(c.chains[0].poll_interval, Duration::from_secs(1));
    }

    #[test]
    fn nats_url_takes_a_comma_separated_cluster() {
        let cluster = "nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://10.0.0.3:4222";
        let c = load_str(&format!("{MINIMAL}[nats]\nurl = \"{cluster}\"\nack_timeout = \"2s\"\n")).unwrap();
        assert_eq!(c.nats.servers().unwrap().len(), 3);
        let bad = "nats://127.0.0.1:4222,nats://127.0.0.1:port";
        let err = load_str(&format!("{MINIMAL}[nats]\nurl = \"{bad}\"\nack_timeout = \"2s\"\n")).unwrap_err();
        assert!(err.to_string().contains("nats.url"), "{err}");
        assert!(err.to_string().contains("127.0.0.1:port"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_str(&format!("{MINIMAL}\n[etcd]\nendpoint = [\"x\"]\n")).unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");
    }

    #[test]
    fn wrong_types_are_named() {
        let err = load_str(&MINIMAL.replace("chain_id = 31337", "chain_id = \"one\"")).unwrap_err();
        assert!(err.to_string().contains("chain_id"), "{err}");
        let err = load_str(&MINIMAL.replace("w-1", "W 1")).unwrap_err();
        assert!(err.to_string().contains("worker_id"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let err = load_str(&MINIMAL.replace("http://127", "ftp://127")).unwrap_err();
        assert!(err.to_string().contains("chains[0].rpc_urls[0]"), "{err}");
        let err = load_str(&format!("{MINIMAL}\n[etcd]\nprefix = \"herald\"\n")).unwrap_err();
        assert!(err.to_string().contains("etcd.prefix"), "{err}");
        let err = load_str(&format!("{MINIMAL}ws_url = \"http://127.0.0.1:8545\"\n")).unwrap_err();
        assert!(err.to_string().contains("chains[0].ws_url"), "{err}");
        let err = load_str("worker_id = \"w\"\n").unwrap_err();
        assert!(err.to_string().contains("chains"), "{err}");
    }

    #[test]
    fn rpc_urls_come_from_a_file_too() {
        let (path, mut f) = tempfile_in_target();
        f.write_all(b"# provider A\nhttps://a.example/v2/KEY\n\n  https://b.example/?apikey=K  \n").unwrap();
        let toml =
            format!("worker_id = \"w\"\n[[chains]]\nchain_id = 1\nrpc_urls_file = \"{}\"\n", path.display());
        let c = load_str(&toml).unwrap();
        assert_eq!(c.chains[0].rpc_urls, ["https://a.example/v2/KEY", "https://b.example/?apikey=K"]);
        std::fs::write(&path, "ftp://x\n").unwrap();
        let err = load_str(&toml).unwrap_err();
        assert!(err.to_string().contains("chains[0].rpc_urls[0]"), "{err}");
        std::fs::write(&path, "# nothing\n").unwrap();
        let err = load_str(&toml).unwrap_err();
        assert!(err.to_string().contains("chains[0].rpc_urls"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = load_str(&toml).unwrap_err();
        assert!(err.to_string().contains("chains[0].rpc_urls_file"), "{err}");
        let err = load_str(&format!(
            "{MINIMAL}\n[nats]\nurl = \"tls://n\"\nack_timeout = \"5s\"\ncreds_file = \"/nonexistent/c\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("nats.creds_file"), "{err}");
        // --check-config does not read it: it is mounted at run time.
        let (check_path, mut f) = tempfile_in_target();
        f.write_all(toml.as_bytes()).unwrap();
        assert!(Config::check(Some(&check_path)).is_ok());
        let err = load_str("worker_id = \"w\"\n[[chains]]\nchain_id = 1\n").unwrap_err();
        assert!(err.to_string().contains("chains[0].rpc_urls"), "{err}");
    }

    #[test]
    fn credentials_and_tls_keys_load_and_are_checked() {
        let toml = format!(
            "{MINIMAL}\n[etcd]\nendpoints = [\"https://etcd:2379\"]\nuser = \"herald\"\n\
             password_file = \"/s/pw\"\n[etcd.tls]\nca_file = \"/s/ca.crt\"\n\
             [nats]\nurl = \"tls://nats:4222\"\nack_timeout = \"5s\"\ncreds_file = \"/s/herald.creds\"\n\
             tls_ca_file = \"/s/nats-ca.crt\"\n"
        );
        let c = check_str(&toml).unwrap();
        assert_eq!(c.etcd.user.as_deref(), Some("herald"));
        assert_eq!(c.nats.creds_file.as_deref(), Some(Path::new("/s/herald.creds")));
        assert_eq!(c.nats.tls_ca_file.as_deref(), Some(Path::new("/s/nats-ca.crt")));
        // Loading for real reads them: a missing one is named.
        let err = load_str(&toml).unwrap_err();
        assert!(err.to_string().contains("etcd.password_file"), "{err}");
        let err = load_str(&format!("{MINIMAL}\n[etcd]\nuser = \"herald\"\n")).unwrap_err();
        assert!(err.to_string().contains("etcd.password_file"), "{err}");
        let err = load_str(&format!("{MINIMAL}\n[etcd.tls]\nca_file = \"/c\"\n")).unwrap_err();
        assert!(err.to_string().contains("etcd.endpoints[0]"), "{err}");
        let err = load_str(&format!("{MINIMAL}\n[etcd.tls]\nca = \"/c\"\n")).unwrap_err();
        assert!(err.to_string().contains("ca"), "{err}");
        let err = load_str(&format!("{MINIMAL}\n[nats]\nurl = \"nats://n\"\ncreds = \"/c\"\n")).unwrap_err();
        assert!(err.to_string().contains("creds"), "{err}");
    }
}
