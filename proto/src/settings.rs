//! Configuration pieces both binaries share. Plain data with defaults; loading and validation
//! live in each binary's `config` module.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys::DEFAULT_PREFIX;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How to reach etcd, and under which prefix herald's keys live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of every herald key.
    pub prefix: String,
    /// Timeout of one connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: DEFAULT_PREFIX.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_human_readable() {
        let c: EtcdConfig = serde_json::from_value(serde_json::json!({
            "endpoints": ["http://e:2379"], "prefix": "/h", "connect_timeout": "1s", "request_timeout": "250ms"
        }))
        .unwrap();
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(serde_json::to_value(LogFormat::Json).unwrap(), "json");
    }
}
