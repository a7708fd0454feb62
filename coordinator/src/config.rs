//! Coordinator configuration: one serde struct, defaults -> TOML file -> `HERALD_*` environment
//! (nesting with `__`, e.g. `HERALD_AUTH__ADMIN_TOKEN`). Unknown keys are rejected and every
//! error names its key. Tokens are never logged: `Debug` of [`Secret`] prints `***`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_proto::{ChainId, Keyspace};
use serde::{Deserialize, Serialize};

/// Everything a coordinator process needs to know.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the REST API (and `/metrics`, `/healthz`, `/readyz`) is served.
    pub listen: SocketAddr,
    /// Log output format: `text` or `json`.
    pub log_format: LogFormat,
    /// etcd connection and key layout.
    pub etcd: EtcdConfig,
    /// API authentication.
    pub auth: AuthConfig,
    /// API limits.
    pub api: ApiConfig,
    /// This replica's identity in the leader election (default: `coordinator-<pid>`).
    pub identity: Option<String>,
    /// Leader election.
    pub election: ElectionConfig,
    /// Planning.
    pub planner: PlannerConfig,
    /// etcd upkeep (see `maintenance`).
    pub maintenance: MaintenanceConfig,
    /// Chains subscriptions may be registered on.
    pub chains: Vec<ChainConfig>,
    /// Subjects of the workers' JetStream stream (`nats.stream.subjects` in their config): a
    /// subscription's subject must fall under one of them, or nothing could be published.
    pub stream_subjects: Vec<String>,
}

pub use herald_proto::settings::{EtcdConfig, LogFormat};

/// Leader election among coordinator replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectionConfig {
    /// TTL of the leader's lease: a dead leader is replaced after about this long.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

/// How the leader reconciles.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerConfig {
    /// Quiet time after a change (worker, subscription, assignment) before planning.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// Longest a burst of changes can postpone planning.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Planning happens at least this often.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
}

/// etcd upkeep by the coordinators.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// The leader compacts etcd's history older than this; `0s` leaves compaction to etcd
    /// (`--auto-compaction-*`).
    #[serde(with = "humantime_serde")]
    pub compaction_retention: Duration,
    /// etcd's `--quota-backend-bytes`, for `herald_etcd_quota_bytes` and its alert when etcd
    /// does not report it (before 3.6).
    pub etcd_quota_bytes: u64,
}

/// A secret string: never printed.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "<unset>" } else { "***" })
    }
}

/// API authentication: bearer tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Token required by every mutating endpoint (and accepted for reads).
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// File holding the admin token (e.g. a mounted Kubernetes secret); trailing whitespace is
    /// ignored.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Token that may only read; it gets 403 on mutating endpoints.
    #[serde(default)]
    pub read_token: Option<Secret>,
    /// File holding the read token.
    #[serde(default)]
    pub read_token_file: Option<PathBuf>,
    /// Whether reads need a token too (admin or read).
    #[serde(default)]
    pub protect_reads: bool,
}

/// API limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How far beyond the chain head a start block may be.
    pub max_start_block_ahead: u64,
    /// Page size when a list request does not give one.
    pub default_page_size: usize,
    /// Largest page size a list request may ask for.
    pub max_page_size: usize,
}

/// A chain subscriptions may be registered on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// EIP-155 chain id.
    pub chain_id: ChainId,
    /// JSON-RPC endpoints, used to report the head and bound start blocks; optional.
    #[serde(default)]
    pub rpc_urls: Vec<String>,
    /// File with more endpoints, one per line (`#` comments allowed), appended to `rpc_urls` at
    /// load: keeps URLs that carry API keys in a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_urls_file: Option<PathBuf>,
    /// How often the head is read.
    #[serde(default = "default_head_poll", with = "humantime_serde")]
    pub head_poll_interval: Duration,
}

fn default_head_poll() -> Duration {
    Duration::from_secs(5)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid address"),
            log_format: LogFormat::Text,
            etcd: EtcdConfig::default(),
            auth: AuthConfig::default(),
            api: ApiConfig {
                max_body_bytes: 64 * 1024,
                max_start_block_ahead: 1_000_000,
                default_page_size: 100,
                max_page_size: 1000,
            },
            identity: None,
            election: ElectionConfig { lease_ttl: Duration::from_secs(5) },
            planner: PlannerConfig {
                debounce: Duration::from_millis(300),
                max_delay: Duration::from_secs(2),
                resync_interval: Duration::from_secs(10),
            },
            maintenance: MaintenanceConfig {
                compaction_retention: Duration::from_secs(300),
                etcd_quota_bytes: 2 * 1024 * 1024 * 1024,
            },
            chains: Vec::new(),
            stream_subjects: vec!["herald.events.>".into()],
        }
    }
}

pub use herald_proto::settings::ConfigError;

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, message)
}

/// The tokens the API checks, resolved from values or files.
#[derive(Clone)]
pub struct Tokens {
    /// Admin token.
    pub admin: Secret,
    /// Read-only token, if configured.
    pub read: Option<Secret>,
    /// Whether reads need a token.
    pub protect_reads: bool,
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
        herald_proto::settings::layered(Config::default(), file)
    }

    /// The etcd keyspace.
    pub fn keyspace(&self) -> Keyspace {
        Keyspace::new(self.etcd.prefix.clone()).expect("validated at load")
    }

    /// Resolves the tokens (reading token files).
    pub fn tokens(&self) -> Result<Tokens, ConfigError> {
        self.resolve_tokens(&|path| std::fs::read_to_string(path))
    }

    fn resolve_tokens(
        &self,
        read_file: &dyn Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Tokens, ConfigError> {
        let resolve = |value: &Option<Secret>,
                       file: &Option<PathBuf>,
                       key: &str|
         -> Result<Option<Secret>, ConfigError> {
            match (value, file) {
                (Some(_), Some(_)) => Err(invalid(key, format!("set {key} or {key}_file, not both"))),
                (Some(v), None) => Ok(Some(v.clone())),
                (None, Some(path)) => {
                    read_file(path).map(|s| Some(Secret(s.trim_end().to_owned()))).map_err(|e| {
                        invalid(format!("{key}_file"), format!("cannot read {}: {e}", path.display()))
                    })
                }
                (None, None) => Ok(None),
            }
        };
        let admin = resolve(&self.auth.admin_token, &self.auth.admin_token_file, "auth.admin_token")?
            .ok_or_else(|| invalid("auth.admin_token", "set auth.admin_token or auth.admin_token_file"))?;
        if admin.0.len() < 16 {
            return Err(invalid("auth.admin_token", "must be at least 16 characters"));
        }
        let read = resolve(&self.auth.read_token, &self.auth.read_token_file, "auth.read_token")?;
        if read.as_ref().is_some_and(|r| r.0.is_empty() || *r == admin) {
            return Err(invalid("auth.read_token", "must be non-empty and differ from the admin token"));
        }
        Ok(Tokens { admin, read, protect_reads: self.auth.protect_reads })
    }

    fn validate(&self, read_files: bool) -> Result<(), ConfigError> {
        Keyspace::new(self.etcd.prefix.clone()).map_err(|e| invalid("etcd.prefix", e.to_string()))?;
        if self.etcd.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "needs at least one endpoint"));
        }
        self.etcd.validate_credentials().map_err(|e| invalid(e.key, e.message))?;
        if self.api.max_body_bytes < 1024 {
            return Err(invalid("api.max_body_bytes", "must be at least 1024"));
        }
        if self.api.default_page_size == 0 || self.api.default_page_size > self.api.max_page_size {
            return Err(invalid("api.default_page_size", "must be between 1 and api.max_page_size"));
        }
        if self.election.lease_ttl < Duration::from_secs(2) {
            return Err(invalid("election.lease_ttl", "must be at least 2s"));
        }
        if self.maintenance.etcd_quota_bytes == 0 {
            return Err(invalid("maintenance.etcd_quota_bytes", "must be greater than zero"));
        }
        if self.planner.resync_interval.is_zero() {
            return Err(invalid("planner.resync_interval", "must be greater than zero"));
        }
        if self.chains.is_empty() {
            return Err(invalid("chains", "needs at least one chain"));
        }
        for (i, chain) in self.chains.iter().enumerate() {
            if self.chains[..i].iter().any(|c| c.chain_id == chain.chain_id) {
                return Err(invalid(format!("chains[{i}].chain_id"), "duplicate chain id"));
            }
            for (j, url) in chain.rpc_urls.iter().enumerate() {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(
                        format!("chains[{i}].rpc_urls[{j}]"),
                        "must be an http:// or https:// URL",
                    ));
                }
            }
        }
        if read_files {
            self.tokens().map(|_| ())
        } else {
            // Stand-in contents, distinct per file and long enough: only the shape is checked.
            self.resolve_tokens(&|path| Ok(format!("contents of the file {}", path.display()))).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Result<Config, ConfigError> {
        let dir =
            std::env::temp_dir().join(format!("herald-coord-cfg-{}-{}", std::process::id(), toml.len()));
        std::fs::write(&dir, toml).unwrap();
        let r = Config::load(Some(&dir));
        let _ = std::fs::remove_file(&dir);
        r
    }

    const OK: &str = "[auth]\nadmin_token = \"0123456789abcdef\"\n[[chains]]\nchain_id = 1\n";

    #[test]
    fn minimal_config_loads() {
        let c = load(OK).unwrap();
        assert_eq!(c.api.max_page_size, 1000);
        assert_eq!(format!("{:?}", c.auth.admin_token), "Some(***)");
    }

    #[test]
    fn errors_name_the_key() {
        let err = load("[[chains]]\nchain_id = 1\n").unwrap_err().to_string();
        assert!(err.contains("auth.admin_token"), "{err}");
        let err = load(&OK.replace("0123456789abcdef", "short")).unwrap_err().to_string();
        assert!(err.contains("auth.admin_token"), "{err}");
        let err = load(&format!("{OK}\n[api]\nmax_body = 1\n")).unwrap_err().to_string();
        assert!(err.contains("max_body"), "{err}");
    }

    #[test]
    fn check_does_not_read_mounted_files() {
        let path = std::env::temp_dir().join(format!("herald-coord-check-{}.toml", std::process::id()));
        let toml = "[auth]\nadmin_token_file = \"/nonexistent/admin-token\"\n[[chains]]\nchain_id = 1\n\
                    [etcd]\nendpoints = [\"https://etcd:2379\"]\nuser = \"herald\"\n\
                    password_file = \"/nonexistent/pw\"\n[etcd.tls]\nca_file = \"/nonexistent/ca.crt\"\n";
        std::fs::write(&path, toml).unwrap();
        let checked = Config::check(Some(&path));
        let loaded = Config::load(Some(&path));
        let _ = std::fs::remove_file(&path);
        assert_eq!(checked.unwrap().etcd.user.as_deref(), Some("herald"));
        let err = loaded.unwrap_err().to_string();
        assert!(err.contains("auth.admin_token_file"), "{err}");
        let err = load(&format!(
            "{OK}[etcd]\nendpoints = [\"https://e:2379\"]\n[etcd.tls]\nca_file = \"/nonexistent/ca\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("etcd.tls.ca_file"), "{err}");
        let both = format!("{OK}admin_token_file = \"/x\"\n").replace("[[chains]]\nchain_id = 1\n", "");
        let err = load(&format!("{both}[[chains]]\nchain_id = 1\n")).unwrap_err().to_string();
        assert!(err.contains("auth.admin_token"), "{err}");
    }
}
