//! Configuration pieces both binaries share. Plain data with defaults; loading and validation
//! live in each binary's `config` module.

use std::path::PathBuf;
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
    /// TLS towards etcd (use `https://` endpoints); absent = plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTls>,
    /// etcd user name (etcd's own authentication); needs `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// File holding the password of `user` (e.g. a mounted Kubernetes secret); trailing
    /// whitespace is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// PEM files for TLS towards etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA bundle that signed the etcd server certificates (required: no system roots are built
    /// in).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (etcd `--client-cert-auth`); needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// A setting that cannot be used: the dotted key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidSetting {
    /// The offending key, dotted (`etcd.tls.cert_file`).
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

fn invalid(key: &str, message: impl Into<String>) -> InvalidSetting {
    InvalidSetting { key: key.into(), message: message.into() }
}

/// The contents of the files an [`EtcdConfig`] names, read at connect time.
#[derive(Default)]
pub struct EtcdSecrets {
    /// `(user, password)`.
    pub user: Option<(String, String)>,
    /// PEM of the CA bundle.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM of the client certificate and its key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdSecrets(***)")
    }
}

impl EtcdConfig {
    /// Checks the shape of the credential settings without reading any file (the files are
    /// mounted at run time; see [`EtcdConfig::read_secrets`]).
    pub fn validate_credentials(&self) -> Result<(), InvalidSetting> {
        match (&self.user, &self.password_file) {
            (Some(u), _) if u.is_empty() => return Err(invalid("etcd.user", "must not be empty")),
            (Some(_), None) => return Err(invalid("etcd.password_file", "etcd.user needs a password_file")),
            (None, Some(_)) => return Err(invalid("etcd.user", "etcd.password_file needs a user")),
            _ => {}
        }
        if let Some(tls) = &self.tls {
            if tls.ca_file.is_none() {
                return Err(invalid("etcd.tls.ca_file", "required when etcd.tls is set"));
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(_), None) => return Err(invalid("etcd.tls.key_file", "cert_file needs a key_file")),
                (None, Some(_)) => return Err(invalid("etcd.tls.cert_file", "key_file needs a cert_file")),
                _ => {}
            }
            if let Some((i, _)) = self.endpoints.iter().enumerate().find(|(_, e)| e.starts_with("http://")) {
                return Err(invalid(
                    &format!("etcd.endpoints[{i}]"),
                    "etcd.tls is set: endpoints must be https://",
                ));
            }
        }
        Ok(())
    }

    /// etcd client options carrying the configured user and TLS material (files read now, so
    /// a reconnect picks up rotated certificates).
    #[cfg(feature = "etcd")]
    pub fn connect_options(&self) -> Result<etcd_client::ConnectOptions, InvalidSetting> {
        use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
        let secrets = self.read_secrets()?;
        let mut options = ConnectOptions::new();
        if let Some((user, password)) = secrets.user {
            options = options.with_user(user, password);
        }
        if let Some(ca) = secrets.ca_pem {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = secrets.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// Reads the password, CA and client certificate files; errors name the key.
    pub fn read_secrets(&self) -> Result<EtcdSecrets, InvalidSetting> {
        self.validate_credentials()?;
        let read = |key: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
        };
        let mut secrets = EtcdSecrets::default();
        if let (Some(user), Some(file)) = (&self.user, &self.password_file) {
            let password = String::from_utf8(read("etcd.password_file", file)?)
                .map_err(|_| invalid("etcd.password_file", "is not UTF-8"))?;
            secrets.user = Some((user.clone(), password.trim_end().to_owned()));
        }
        if let Some(tls) = &self.tls {
            if let Some(ca) = &tls.ca_file {
                secrets.ca_pem = Some(read("etcd.tls.ca_file", ca)?);
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                secrets.identity = Some((read("etcd.tls.cert_file", cert)?, read("etcd.tls.key_file", key)?));
            }
        }
        Ok(secrets)
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: DEFAULT_PREFIX.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            tls: None,
            user: None,
            password_file: None,
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
        assert_eq!(c.tls, None);
    }

    fn etcd(extra: serde_json::Value) -> EtcdConfig {
        let mut v = serde_json::json!({
            "endpoints": ["https://e:2379"], "prefix": "/h", "connect_timeout": "1s", "request_timeout": "1s"
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn credential_settings_are_checked_by_key() {
        let ok = etcd(serde_json::json!({
            "user": "herald", "password_file": "/s/pw",
            "tls": {"ca_file": "/s/ca.crt", "cert_file": "/s/tls.crt", "key_file": "/s/tls.key"}
        }));
        assert_eq!(ok.validate_credentials(), Ok(()));
        let err = etcd(serde_json::json!({"user": "herald"})).validate_credentials().unwrap_err();
        assert_eq!(err.key, "etcd.password_file");
        let err = etcd(serde_json::json!({"tls": {"ca_file": "/a", "cert_file": "/c"}}))
            .validate_credentials()
            .unwrap_err();
        assert_eq!(err.key, "etcd.tls.key_file");
        let mut plain = etcd(serde_json::json!({"tls": {"ca_file": "/c"}}));
        plain.endpoints = vec!["http://e:2379".into()];
        assert_eq!(plain.validate_credentials().unwrap_err().key, "etcd.endpoints[0]");
        let unknown = serde_json::from_value::<EtcdTls>(serde_json::json!({"ca": "/x"}));
        assert!(unknown.unwrap_err().to_string().contains("ca"));
    }

    #[test]
    fn secrets_are_read_and_missing_files_named() {
        let dir = std::env::temp_dir().join(format!("herald-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "s3cret\n").unwrap();
        let c = etcd(serde_json::json!({"user": "herald", "password_file": dir.join("pw")}));
        let secrets = c.read_secrets().unwrap();
        assert_eq!(secrets.user, Some(("herald".into(), "s3cret".into())));
        assert_eq!(format!("{secrets:?}"), "EtcdSecrets(***)");
        let c = etcd(serde_json::json!({"tls": {"ca_file": dir.join("missing.crt")}}));
        assert_eq!(c.read_secrets().unwrap_err().key, "etcd.tls.ca_file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A configuration that cannot be used; every message names the key.
#[cfg(feature = "config")]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The sources could not be read or deserialised.
    #[error("invalid configuration: {0}")]
    Load(Box<figment::Error>),
    /// A value deserialised but is not acceptable.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The offending key, dotted.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

#[cfg(feature = "config")]
impl ConfigError {
    /// `key` has an unacceptable value.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { key: key.into(), message: message.into() }
    }
}

#[cfg(feature = "config")]
impl From<InvalidSetting> for ConfigError {
    fn from(e: InvalidSetting) -> Self {
        Self::Invalid { key: e.key, message: e.message }
    }
}

/// The configuration of a herald binary: `defaults`, then the TOML `file` if given, then
/// `HERALD_*` variables (`__` nests keys; `HERALD_LOG`, the log filter, and `HERALD_CONFIG`,
/// the file's path, are not keys).
#[cfg(feature = "config")]
pub fn layered<T: serde::de::DeserializeOwned>(
    defaults: impl Serialize,
    file: Option<&std::path::Path>,
) -> Result<T, ConfigError> {
    use figment::providers::{Env, Format, Serialized, Toml};
    let mut figment = figment::Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError::invalid("--config", format!("file {} does not exist", file.display())));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    figment = figment.merge(Env::prefixed("HERALD_").ignore(&["log", "config"]).split("__"));
    figment.extract().map_err(|e| ConfigError::Load(Box::new(e)))
}

/// The URLs in a file named by `key`, one per line; blank lines and `#` comments skipped.
pub fn read_url_file(key: &str, path: &std::path::Path) -> Result<Vec<String>, InvalidSetting> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}
