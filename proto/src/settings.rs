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

/// `scheme://host[:port]`, plus `/...` when there was a path or query: providers put API keys
/// in the path (`/v2/<key>`), the query (`?apikey=`) or the user info, and none of them may
/// reach a log line.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let tail = if rest.len() > authority.len() && rest[authority.len()..] != *"/" { "/..." } else { "" };
    format!("{scheme}://{host}{tail}")
}

/// `message` with every secret-looking part of `url` (user info, path, query, and the whole
/// URL) replaced by `***`, however a library chose to print the URL in it.
pub fn scrub(message: &str, url: &str) -> String {
    let mut out = message.replace(url, &redact_url(url));
    let (_, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let mut secrets: Vec<&str> = Vec::new();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        secrets.push(userinfo);
        secrets.extend(userinfo.split(':'));
    }
    let tail = &rest[authority.len()..];
    secrets.extend(tail.split(['/', '?', '&', '=', '#']));
    // Longest first, so a secret containing a shorter one is not left half-replaced.
    secrets.retain(|s| s.len() >= 4);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets {
        out = out.replace(secret, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("https://eth.example.com/v2/SECRET"), "https://eth.example.com/...");
        assert_eq!(redact_url("https://user:pw@host:8545"), "https://host:8545");
        assert_eq!(redact_url("http://127.0.0.1:8545"), "http://127.0.0.1:8545");
        assert_eq!(redact_url("http://127.0.0.1:8545/"), "http://127.0.0.1:8545");
        assert_eq!(redact_url("http://h?key=SECRET"), "http://h/...");
    }

    #[test]
    fn scrubbing_removes_secrets_however_printed() {
        let url = "http://herald:PASSWORD1@127.0.0.1:8545/?apikey=my-apikey-12345";
        let message =
            "error sending request for url (http://127.0.0.1:8545/?apikey=my-apikey-12345) or PASSWORD1";
        let clean = scrub(message, url);
        assert!(!clean.contains("PASSWORD1") && !clean.contains("12345"), "{clean}");
        assert!(clean.contains("127.0.0.1:8545"), "{clean}");
    }

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
