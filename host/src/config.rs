//! The host's configuration: one TOML file, overridden field by field by flags and `REGCACHE_*`
//! environment variables (the command line gathers those into a second [`ConfigLayer`]).
//!
//! The lifecycle is the one every subsystem follows: [`ConfigLayer::parse_toml`] reads nothing
//! but the string it is given, [`ConfigLayer::validate`] does no I/O at all and fails with one
//! line naming the field ([`ConfigError`]), and only the daemon's build step touches the world
//! (reads secret files, TLS files, binds ports).
//!
//! ```
//! use regcache::config::ConfigLayer;
//! let file = ConfigLayer::parse_toml(r#"
//!     listen = "127.0.0.1:7070"
//!     [etcd]
//!     endpoints = ["127.0.0.1:2379"]
//!     lease_ttl = "15s"
//! "#, "regcache.toml").unwrap();
//! let config = file.validate().unwrap();
//! assert_eq!(config.etcd.unwrap().endpoints, vec!["127.0.0.1:2379".to_string()]);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::fsutil::read_regular;
use crate::http;
use crate::registry::etcd::{self, EtcdConfig};

/// Where the host listens when nothing says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// How often the cache is written to the state dir by default.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(30);

/// Accepted snapshot intervals: more often than every 100 ms the writes (each fsynced) would
/// cost more than they save; less often than hourly a restart would serve an hour-old cache.
pub const SNAPSHOT_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);

/// A configuration refused: the field (as named in the TOML file) and what is wrong with it.
/// Its one-line display also names the flag and the environment variable of the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, dotted as in the TOML file (`etcd.lease_ttl`), or `config` for the file itself.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// `field` (dotted, as in the TOML file) refused for `message`.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The command-line flag of the field, e.g. `--etcd-lease-ttl`.
    pub fn flag(&self) -> String {
        format!("--{}", self.field.replace(['.', '_'], "-"))
    }

    /// The environment variable of the field, e.g. `REGCACHE_ETCD_LEASE_TTL`.
    pub fn env(&self) -> String {
        format!(
            "REGCACHE_{}",
            self.field.replace(['.', '-'], "_").to_uppercase()
        )
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field == "config" {
            write!(f, "invalid configuration: {}", self.message)
        } else {
            write!(
                f,
                "invalid configuration: `{}` ({} / {}): {}",
                self.field,
                self.flag(),
                self.env(),
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// One layer of configuration: the TOML file, or the flags and environment. Every field is
/// optional; [`ConfigLayer::over`] lets a higher layer win field by field. Unknown TOML keys are
/// errors (a typo must not silently fall back to a default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// Address of the HTTP API. Default [`DEFAULT_LISTEN`]; port 0 picks a free port (the
    /// address is logged).
    pub listen: Option<String>,
    /// Directory for the cache snapshot and precompiled policies. Default: none (no snapshot).
    pub state_dir: Option<PathBuf>,
    /// `text` (default) or `json`.
    pub log_format: Option<String>,
    /// Bearer token of the admin endpoints. Default: none, and the admin endpoints are off.
    pub admin_token: Option<String>,
    /// A file holding the admin token (trailing newline ignored).
    pub admin_token_file: Option<PathBuf>,
    /// How often the snapshot is written, e.g. `30s`. Default 30 s.
    pub snapshot_interval: Option<String>,
    /// The etcd section.
    #[serde(default)]
    pub etcd: EtcdLayer,
    /// The policy section.
    #[serde(default)]
    pub policy: PolicyLayer,
    /// The HTTP server's connections.
    #[serde(default)]
    pub http: HttpLayer,
}

/// The `[etcd]` section. With no endpoints the host runs on an embedded in-memory registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdLayer {
    /// `host:port` or `http(s)://host:port`, several for a cluster.
    pub endpoints: Option<Vec<String>>,
    /// User name for etcd's authentication. Default: none.
    pub user: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// A file holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// CA of etcd's server certificate (PEM); turns TLS on.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub key: Option<PathBuf>,
    /// Key prefix. Default `/micro/registry/` (go-micro's).
    pub prefix: Option<String>,
    /// Bound of every etcd call, e.g. `5s`. Default 5 s.
    pub request_timeout: Option<String>,
    /// TTL of the host's lease, whole seconds, e.g. `15s`. Default 15 s.
    pub lease_ttl: Option<String>,
}

/// The `[http]` section: the bounds of the API server's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpLayer {
    /// Time a client has to send a request head (and again its body), e.g. `10s`. Default
    /// [`http::DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Option<String>,
    /// Time a kept-alive connection may wait for its next request, e.g. `60s`. Default
    /// [`http::DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Option<String>,
    /// Time the socket may accept no byte of an answer (the client reads nothing) before the
    /// connection is closed, e.g. `10s`. Default [`http::DEFAULT_WRITE_TIMEOUT`].
    pub write_timeout: Option<String>,
    /// Connections open at once. Default [`http::default_max_connections`]: RLIMIT_NOFILE less
    /// [`http::RESERVED_DESCRIPTORS`], at most [`http::DEFAULT_MAX_CONNECTIONS_CAP`].
    pub max_connections: Option<u64>,
}

/// A validated `[http]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// Time to receive a request head.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time the socket may accept no byte of an answer.
    pub write_timeout: Duration,
    /// Connections open at once; `None`: derived from RLIMIT_NOFILE when the server starts.
    pub max_connections: Option<usize>,
}

impl HttpSettings {
    /// The server's limits (reads RLIMIT_NOFILE if no connection limit is set).
    pub fn limits(&self) -> http::ConnectionLimits {
        http::ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            max_connections: self
                .max_connections
                .unwrap_or_else(http::default_max_connections),
        }
    }
}

/// The `[policy]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyLayer {
    /// A policy component to load (and watch) instead of the embedded default.
    pub file: Option<PathBuf>,
    /// Operator configuration passed to the policy's `configure`, e.g. `ttl-ms = "60000"`.
    pub config: Option<BTreeMap<String, ConfigValue>>,
}

/// A policy configuration value: TOML strings, integers and booleans are all accepted and
/// passed to the policy as text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ConfigValue {
    /// A string.
    Text(String),
    /// An integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Text(s) => f.write_str(s),
            ConfigValue::Integer(i) => write!(f, "{i}"),
            ConfigValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Largest secret file read: a token or a password is a line; a file of megabytes is a mistake
/// (a path to the wrong file), refused rather than held as a password.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A secret given inline or as a file to read at start.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The value itself.
    Inline(String),
    /// A file holding it.
    File(PathBuf),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Inline(_) => f.write_str("Inline(<redacted>)"),
            Secret::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

impl Secret {
    /// The secret's value, reading the file if need be (I/O: call it when building, not when
    /// validating). `field` names the inline setting in the error (`admin_token`); a file's
    /// errors name its `_file` twin (`admin_token_file`), the setting that gave the path.
    pub fn read(&self, field: &str) -> Result<String, ConfigError> {
        let (value, field) = match self {
            Secret::Inline(value) => (value.clone(), field.to_string()),
            Secret::File(path) => {
                let field = format!("{field}_file");
                let bytes = read_regular(path, MAX_SECRET_FILE).map_err(|e| {
                    ConfigError::new(&field, format!("cannot read {}: {e}", path.display()))
                })?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    ConfigError::new(&field, format!("{} is not UTF-8 text", path.display()))
                })?;
                (text.trim_end_matches(['\n', '\r']).to_string(), field)
            }
        };
        if value.is_empty() {
            return Err(ConfigError::new(&field, "is empty"));
        }
        Ok(value)
    }
}

/// A validated etcd configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Endpoints, as given.
    pub endpoints: Vec<String>,
    /// User and password, if authentication is on.
    pub user: Option<(String, Secret)>,
    /// CA file; TLS is on when set.
    pub ca: Option<PathBuf>,
    /// Client certificate and key.
    pub client: Option<(PathBuf, PathBuf)>,
    /// Key prefix.
    pub prefix: String,
    /// Bound of every etcd call.
    pub request_timeout: Duration,
    /// Lease TTL.
    pub lease_ttl: Duration,
}

impl EtcdSettings {
    /// The registry's configuration, with the password already read.
    pub fn registry_config(&self, password: Option<String>) -> EtcdConfig {
        let mut config = EtcdConfig::new(self.endpoints.clone())
            .prefix(self.prefix.clone())
            .request_timeout(self.request_timeout)
            .connect_timeout(self.request_timeout)
            .lease_ttl(self.lease_ttl);
        if let (Some((user, _)), Some(password)) = (&self.user, password) {
            config = config.user(user.clone(), password);
        }
        if let Some(ca) = &self.ca {
            config = config.tls_ca(ca.clone());
        }
        if let Some((cert, key)) = &self.client {
            config = config.tls_client(cert.clone(), key.clone());
        }
        config
    }

    /// Reads and parses the TLS files (I/O: call it when building, not when validating), so
    /// that a file etcd's client would skip (not PEM, no certificate, a key of another
    /// certificate) stops the start with one line naming its setting, rather than leaving the
    /// host retrying handshakes that fail with "UnknownIssuer".
    pub fn check_tls_files(&self) -> Result<(), ConfigError> {
        let Some(ca) = &self.ca else {
            return Ok(());
        };
        let paths = etcd::TlsPaths {
            ca: ca.clone(),
            client: self.client.clone(),
        };
        paths.check().map_err(|e| {
            let field = match e.file {
                etcd::TlsFile::Ca => "etcd.ca",
                etcd::TlsFile::Cert => "etcd.cert",
                etcd::TlsFile::Key => "etcd.key",
            };
            ConfigError::new(field, e.to_string())
        })
    }
}

/// The validated host configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// etcd, or `None` for the embedded in-memory registry.
    pub etcd: Option<EtcdSettings>,
    /// Policy file, or `None` for the embedded default policy.
    pub policy_file: Option<PathBuf>,
    /// Operator configuration of the policy.
    pub policy_config: Vec<(String, String)>,
    /// Admin token; `None` disables the admin endpoints.
    pub admin_token: Option<Secret>,
    /// State directory (snapshot, precompiled policies).
    pub state_dir: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// Period of snapshot writes.
    pub snapshot_interval: Duration,
    /// The HTTP server's connections.
    pub http: HttpSettings,
}

impl ConfigLayer {
    /// Parses a TOML document (`origin` names it in errors). Errors are one line: the line of
    /// the document and what is wrong with it.
    pub fn parse_toml(text: &str, origin: &str) -> Result<ConfigLayer, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            let place = e
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    let content = text.lines().nth(line - 1).unwrap_or("").trim();
                    format!(", line {line} (`{content}`)")
                })
                .unwrap_or_default();
            ConfigError::new("config", format!("{origin}{place}: {message}"))
        })
    }

    /// This layer with `self`'s fields winning over `lower`'s.
    pub fn over(self, lower: ConfigLayer) -> ConfigLayer {
        let (e, l) = (self.etcd, lower.etcd);
        let (p, lp) = (self.policy, lower.policy);
        let (h, lh) = (self.http, lower.http);
        ConfigLayer {
            listen: self.listen.or(lower.listen),
            state_dir: self.state_dir.or(lower.state_dir),
            log_format: self.log_format.or(lower.log_format),
            admin_token: self.admin_token.or(lower.admin_token),
            admin_token_file: self.admin_token_file.or(lower.admin_token_file),
            snapshot_interval: self.snapshot_interval.or(lower.snapshot_interval),
            etcd: EtcdLayer {
                endpoints: e.endpoints.or(l.endpoints),
                user: e.user.or(l.user),
                password: e.password.or(l.password),
                password_file: e.password_file.or(l.password_file),
                ca: e.ca.or(l.ca),
                cert: e.cert.or(l.cert),
                key: e.key.or(l.key),
                prefix: e.prefix.or(l.prefix),
                request_timeout: e.request_timeout.or(l.request_timeout),
                lease_ttl: e.lease_ttl.or(l.lease_ttl),
            },
            policy: PolicyLayer {
                file: p.file.or(lp.file),
                config: p.config.or(lp.config),
            },
            http: HttpLayer {
                header_read_timeout: h.header_read_timeout.or(lh.header_read_timeout),
                idle_timeout: h.idle_timeout.or(lh.idle_timeout),
                write_timeout: h.write_timeout.or(lh.write_timeout),
                max_connections: h.max_connections.or(lh.max_connections),
            },
        }
    }

    /// Checks every field, without any I/O, and fills in the defaults.
    pub fn validate(self) -> Result<HostConfig, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:7070"),
            )
        })?;
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "log_format",
                    format!("`{other}` is neither `text` nor `json`"),
                ));
            }
        };
        let admin_token = secret(
            "admin_token",
            self.admin_token,
            self.admin_token_file,
            "admin_token_file",
        )?;
        let snapshot_interval = match self.snapshot_interval.as_deref() {
            None => DEFAULT_SNAPSHOT_INTERVAL,
            Some(text) => duration_within("snapshot_interval", text, &SNAPSHOT_INTERVAL_RANGE)?,
        };
        if let Some(dir) = &self.state_dir
            && dir.as_os_str().is_empty()
        {
            return Err(ConfigError::new("state_dir", "is empty"));
        }
        if let Some(file) = &self.policy.file
            && file.as_os_str().is_empty()
        {
            return Err(ConfigError::new("policy.file", "is empty"));
        }
        let policy_config = self
            .policy
            .config
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| {
                if key.is_empty() {
                    Err(ConfigError::new("policy.config", "a key is empty"))
                } else {
                    Ok((key, value.to_string()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HostConfig {
            listen,
            etcd: validate_etcd(self.etcd)?,
            policy_file: self.policy.file,
            policy_config,
            admin_token,
            state_dir: self.state_dir,
            log_format,
            snapshot_interval,
            http: validate_http(self.http)?,
        })
    }
}

fn validate_http(layer: HttpLayer) -> Result<HttpSettings, ConfigError> {
    let within = |field: &str, text: Option<&str>, default, range: &RangeInclusive<Duration>| {
        text.map_or(Ok(default), |text| duration_within(field, text, range))
    };
    let max_connections = match layer.max_connections {
        None => None,
        Some(n) if http::MAX_CONNECTIONS_RANGE.contains(&n) => usize::try_from(n).ok(),
        Some(_) => {
            let range = http::MAX_CONNECTIONS_RANGE;
            return Err(ConfigError::new(
                "http.max_connections",
                format!("must be between {} and {}", range.start(), range.end()),
            ));
        }
    };
    Ok(HttpSettings {
        header_read_timeout: within(
            "http.header_read_timeout",
            layer.header_read_timeout.as_deref(),
            http::DEFAULT_HEADER_READ_TIMEOUT,
            &http::HEADER_READ_TIMEOUT_RANGE,
        )?,
        idle_timeout: within(
            "http.idle_timeout",
            layer.idle_timeout.as_deref(),
            http::DEFAULT_IDLE_TIMEOUT,
            &http::IDLE_TIMEOUT_RANGE,
        )?,
        write_timeout: within(
            "http.write_timeout",
            layer.write_timeout.as_deref(),
            http::DEFAULT_WRITE_TIMEOUT,
            &http::WRITE_TIMEOUT_RANGE,
        )?,
        max_connections,
    })
}

fn secret(
    field: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    file_field: &str,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            field,
            format!("give either `{field}` or `{file_field}`, not both"),
        )),
        (Some(value), None) if value.is_empty() => Err(ConfigError::new(field, "is empty")),
        (Some(value), None) => Ok(Some(Secret::Inline(value))),
        (None, Some(path)) if path.as_os_str().is_empty() => {
            Err(ConfigError::new(file_field, "is empty"))
        }
        (None, Some(path)) => Ok(Some(Secret::File(path))),
        (None, None) => Ok(None),
    }
}

fn validate_etcd(layer: EtcdLayer) -> Result<Option<EtcdSettings>, ConfigError> {
    let endpoints = match layer.endpoints {
        Some(endpoints) if !endpoints.is_empty() => endpoints,
        Some(_) => return Err(ConfigError::new("etcd.endpoints", "is an empty list")),
        None => {
            // Without etcd nothing else of this section means anything: say so rather than
            // silently ignoring, say, a prefix meant for a real cluster.
            let set = [
                ("etcd.user", layer.user.is_some()),
                ("etcd.password", layer.password.is_some()),
                ("etcd.password_file", layer.password_file.is_some()),
                ("etcd.ca", layer.ca.is_some()),
                ("etcd.cert", layer.cert.is_some()),
                ("etcd.key", layer.key.is_some()),
                ("etcd.prefix", layer.prefix.is_some()),
                ("etcd.request_timeout", layer.request_timeout.is_some()),
                ("etcd.lease_ttl", layer.lease_ttl.is_some()),
            ];
            if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                return Err(ConfigError::new(
                    field,
                    "is set but no etcd endpoint is (`etcd.endpoints`)",
                ));
            }
            return Ok(None);
        }
    };
    let password = secret(
        "etcd.password",
        layer.password,
        layer.password_file,
        "etcd.password_file",
    )?;
    let user = match (layer.user, password) {
        (Some(user), Some(password)) => Some((user, password)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                "etcd.password",
                "is required with `etcd.user` (or `etcd.password_file`)",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "etcd.user",
                "is required with `etcd.password`",
            ));
        }
    };
    let client = match (layer.cert, layer.key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new("etcd.key", "is required with `etcd.cert`"));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new("etcd.cert", "is required with `etcd.key`"));
        }
    };
    if client.is_some() && layer.ca.is_none() {
        return Err(ConfigError::new(
            "etcd.ca",
            "is required with a client certificate",
        ));
    }
    let settings = EtcdSettings {
        endpoints,
        user,
        ca: layer.ca,
        client,
        prefix: layer.prefix.unwrap_or_else(|| etcd::DEFAULT_PREFIX.into()),
        request_timeout: match layer.request_timeout.as_deref() {
            None => etcd::DEFAULT_REQUEST_TIMEOUT,
            Some(text) => duration("etcd.request_timeout", text)?,
        },
        lease_ttl: match layer.lease_ttl.as_deref() {
            None => etcd::DEFAULT_LEASE_TTL,
            Some(text) => duration("etcd.lease_ttl", text)?,
        },
    };
    // The registry's own rules (endpoint syntax and ports, TLS scheme, prefix, the ranges of the
    // timeout and the TTL), checked without I/O; the placeholder password is never used.
    let password = settings.user.as_ref().map(|_| "unused".to_string());
    settings.registry_config(password).validate().map_err(|e| {
        use etcd::ConfigError as E;
        let field = match &e {
            E::NoEndpoints | E::BadEndpoint(_) | E::SchemeMismatch { .. } => "etcd.endpoints",
            E::BadPrefix(_) => "etcd.prefix",
            E::BadCredentials => "etcd.user",
            E::HalfClientIdentity => "etcd.cert",
            E::BadDuration { setting, .. } => match *setting {
                "lease_ttl" | "keep_alive_interval" => "etcd.lease_ttl",
                _ => "etcd.request_timeout",
            },
        };
        ConfigError::new(field, e.to_string())
    })?;
    Ok(Some(settings))
}

fn duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|message| ConfigError::new(field, message))
}

/// A duration setting with its accepted range (stated in the error).
fn duration_within(
    field: &str,
    text: &str,
    range: &RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    let value = duration(field, text)?;
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::new(
            field,
            format!("must be between {:?} and {:?}", range.start(), range.end()),
        ))
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h` (one number, one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("`{text}` is not a duration like 500ms, 5s, 2m or 1h");
    let number: u64 = number.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(number),
        "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(bad()),
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<HostConfig, ConfigError> {
        ConfigLayer::parse_toml(text, "test.toml")?.validate()
    }

    #[test]
    fn defaults_run_without_etcd() {
        let config = toml("").unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(config.etcd.is_none());
        assert!(config.admin_token.is_none());
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn full_file_is_accepted() {
        let config = toml(
            r#"
            listen = "0.0.0.0:8080"
            state_dir = "/var/lib/regcache"
            log_format = "json"
            admin_token_file = "/etc/regcache/token"
            snapshot_interval = "10s"
            [etcd]
            endpoints = ["10.0.0.1:2379", "10.0.0.2:2379"]
            user = "root"
            password_file = "/etc/regcache/etcd-password"
            ca = "/etc/regcache/ca.pem"
            cert = "/etc/regcache/client.pem"
            key = "/etc/regcache/client-key.pem"
            prefix = "/fleet/"
            request_timeout = "2s"
            lease_ttl = "30s"
            [policy]
            file = "/etc/regcache/policy.wasm"
            config = { ttl-ms = "60000", max-wait-ms = 500, verbose = true }
            "#,
        )
        .unwrap();
        let etcd = config.etcd.unwrap();
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.lease_ttl, Duration::from_secs(30));
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(
            config
                .policy_config
                .contains(&("max-wait-ms".into(), "500".into()))
        );
    }

    #[test]
    fn the_http_section_has_its_defaults_and_refuses_timeouts_out_of_range() {
        let limits = toml("").unwrap().http.limits();
        assert_eq!(
            limits.header_read_timeout,
            http::DEFAULT_HEADER_READ_TIMEOUT
        );
        assert_eq!(limits.idle_timeout, http::DEFAULT_IDLE_TIMEOUT);
        assert_eq!(limits.write_timeout, http::DEFAULT_WRITE_TIMEOUT);
        let set = toml("[http]\nwrite_timeout = \"2s\"").unwrap();
        assert_eq!(set.http.write_timeout, Duration::from_secs(2));
        let e = toml("[http]\nwrite_timeout = \"10m\"").unwrap_err();
        assert_eq!(e.field, "http.write_timeout");
        assert!(e.to_string().contains("--http-write-timeout"), "{e}");
    }

    #[test]
    fn errors_are_one_line_naming_the_field() {
        let cases = [
            ("bogus = 1", "config", "unknown field"),
            ("[etcd]\nendpoint = []", "config", "line 2"),
            ("listen = \"nope\"", "listen", "--listen"),
            ("log_format = \"xml\"", "log_format", "REGCACHE_LOG_FORMAT"),
            ("[etcd]\nendpoints = []", "etcd.endpoints", "empty"),
            ("[etcd]\nendpoints = [\"x\"]", "etcd.endpoints", "host:port"),
            (
                "[etcd]\nendpoints = [\"a:1\"]\nlease_ttl = \"1500ms\"",
                "etcd.lease_ttl",
                "whole number",
            ),
            (
                "[etcd]\nendpoints = [\"a:1\"]\nlease_ttl = \"soon\"",
                "etcd.lease_ttl",
                "--etcd-lease-ttl",
            ),
            (
                "[etcd]\nendpoints = [\"a:1\"]\nuser = \"root\"",
                "etcd.password",
                "required",
            ),
            (
                "[etcd]\nprefix = \"/x/\"",
                "etcd.prefix",
                "no etcd endpoint",
            ),
            (
                "admin_token = \"a\"\nadmin_token_file = \"/t\"",
                "admin_token",
                "not both",
            ),
            (
                "snapshot_interval = \"0s\"",
                "snapshot_interval",
                "between 100ms and 3600s",
            ),
            (
                "snapshot_interval = \"2h\"",
                "snapshot_interval",
                "between 100ms and 3600s",
            ),
            (
                "[etcd]\nendpoints = [\"a:0\"]",
                "etcd.endpoints",
                "port 1 to 65535",
            ),
            (
                "[etcd]\nendpoints = [\"a:1\"]\nrequest_timeout = \"0s\"",
                "etcd.request_timeout",
                "between 100ms and 300s",
            ),
            (
                "[etcd]\nendpoints = [\"a:1\"]\nrequest_timeout = \"1h\"",
                "etcd.request_timeout",
                "--etcd-request-timeout",
            ),
            (
                "[etcd]\nendpoints = [\"a:1\"]\nlease_ttl = \"0s\"",
                "etcd.lease_ttl",
                "at least 1",
            ),
            (
                "[etcd]\nendpoints = [\"a:1\"]\nlease_ttl = \"2h\"",
                "etcd.lease_ttl",
                "at most 3600",
            ),
        ];
        for (text, field, want) in cases {
            let err = toml(text).unwrap_err();
            assert_eq!(err.field, field, "{text}: {err}");
            let line = err.to_string();
            assert!(line.contains(want), "{text}: {line}");
            assert!(!line.contains('\n'), "{text}: {line}");
        }
    }

    #[test]
    fn file_errors_name_the_setting_that_gave_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let etcd = |extra: &str| {
            toml(&format!(
                "[etcd]\nendpoints = [\"a:1\"]\nca = \"{}\"\n{extra}",
                not_pem.display()
            ))
            .unwrap()
            .etcd
            .unwrap()
        };
        let err = etcd("").check_tls_files().unwrap_err();
        assert_eq!(err.field, "etcd.ca");
        let line = err.to_string();
        for want in [
            "--etcd-ca",
            "REGCACHE_ETCD_CA",
            &not_pem.display().to_string(),
        ] {
            assert!(line.contains(want), "{line}");
        }

        let missing = dir.path().join("missing");
        let secret = Secret::File(missing.clone());
        let err = secret.read("admin_token").unwrap_err();
        assert_eq!(err.field, "admin_token_file");
        assert!(err.to_string().contains(&missing.display().to_string()));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = Secret::File(empty).read("etcd.password").unwrap_err();
        assert_eq!(err.field, "etcd.password_file");
        assert_eq!(
            Secret::Inline(String::new())
                .read("admin_token")
                .unwrap_err()
                .field,
            "admin_token"
        );
    }

    #[test]
    fn secret_files_are_regular_and_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let secret = Secret::File(path.clone());
        let reader = secret.clone();
        crate::fsutil::testing::assert_refuses_special_files(&path, move || {
            let err = reader.read("admin_token").unwrap_err();
            assert_eq!(err.field, "admin_token_file");
            Err(err.to_string())
        });
        std::fs::write(&path, vec![b'x'; MAX_SECRET_FILE as usize + 1]).unwrap();
        let err = secret.read("admin_token").unwrap_err().to_string();
        assert!(
            err.contains("more than") && err.contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::write(&path, "t0ken\n").unwrap();
        assert_eq!(secret.read("admin_token").unwrap(), "t0ken");
    }

    #[test]
    fn higher_layer_wins_field_by_field() {
        let file = ConfigLayer::parse_toml(
            "listen = \"127.0.0.1:1\"\n[etcd]\nendpoints = [\"a:1\"]\nprefix = \"/p/\"",
            "f",
        )
        .unwrap();
        let flags = ConfigLayer {
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let config = flags.over(file).validate().unwrap();
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.etcd.unwrap().prefix, "/p/");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
