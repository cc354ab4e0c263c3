//! The host's configuration: one TOML file, overridden setting by setting by flags and
//! `REGCACHE_*` environment variables (the command line gathers those into a second
//! [`ConfigLayer`]). Every setting is defined once, in [`settings`]; this module parses, merges
//! and checks values by the setting's kind, and composes the subsystems' configurations.
//!
//! The lifecycle is the one every subsystem follows: [`ConfigLayer::parse_toml`] reads nothing
//! but the string it is given, [`ConfigLayer::validate`] does no I/O at all and fails with one
//! line naming the setting ([`ConfigError`]), and only the host's build step touches the world
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

pub mod settings;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

pub use crate::etcd_api::EtcdApiSettings;
use crate::fsutil::read_regular;
use crate::http;
use crate::policy::{
    Compiler, EngineOptions, Envelope, Limits, LoadLimits, RecordOptions, RollbackRule,
};
use crate::registry::etcd::{self, EtcdConfig};
use settings::{Kind, Setting};

/// Where the host listens when nothing says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// How often the cache is written to the state dir by default.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(30);

/// Accepted snapshot intervals: more often than every 100 ms the writes (each fsynced) would
/// cost more than they save; less often than hourly a restart would serve an hour-old cache.
pub const SNAPSHOT_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);

/// Accepted sizes of a policy component: ours are ~100 KiB, one built from another language a
/// few MiB; past 256 MiB it is no policy (and the compiler's memory grows with it).
pub const POLICY_MAX_SIZE_RANGE: RangeInclusive<u64> = (64 << 10)..=(256 << 20);

/// Accepted CPU time of compiling a candidate: under a second would refuse honest policies on a
/// loaded machine; past 10 minutes a swap is no longer an operation anyone waits for.
pub const COMPILE_CPU_TIME_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(600);

/// Accepted memory of compiling a candidate: the compiler and wasmtime need tens of MiB for
/// an honest policy; 64 GiB is more than a host that caches a registry has.
pub const COMPILE_MEMORY_RANGE: RangeInclusive<u64> = (64 << 20)..=(64 << 30);

/// Accepted latency budgets: under 10 us a policy call's own overhead (entering the sandbox,
/// copying the context) would not fit; past 50 ms a lookup's policy cost is the lookup.
pub const LATENCY_BUDGET_RANGE: RangeInclusive<Duration> =
    Duration::from_micros(10)..=Duration::from_millis(50);

/// Accepted linear memory of a policy instance: the default policy needs about 1 MiB, a Python
/// one starts at 13 MiB; each instance a worker thread holds may use it all, so past 1 GiB a
/// few threads would hold the host's memory.
pub const POLICY_MEMORY_RANGE: RangeInclusive<u64> = (1 << 20)..=(1 << 30);

/// Accepted failure counts of the rollback rule.
pub const ROLLBACK_FAILURES_RANGE: RangeInclusive<u64> = 1..=1_000_000;

/// Accepted rollback windows: a second to a day.
pub const ROLLBACK_WINDOW_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(86_400);

/// Accepted sizes of the in-memory recording: a million questions is a few hundred MiB.
pub const RECORD_RING_RANGE: RangeInclusive<u64> = 0..=1_000_000;

/// Accepted sizes of the recording file before it rotates.
pub const RECORD_FILE_SIZE_RANGE: RangeInclusive<u64> = (64 << 10)..=(64 << 30);

/// Accepted shadow sampling: every question to one in a million.
pub const SHADOW_ONE_IN_RANGE: RangeInclusive<u64> = 1..=1_000_000;

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
        settings::flag(&self.field)
    }

    /// The environment variable of the field, e.g. `REGCACHE_ETCD_LEASE_TTL`.
    pub fn env(&self) -> String {
        settings::env(&self.field)
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

/// A value given to a setting, before it is checked. Which variant a setting takes follows
/// from its [`Kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// Text: most kinds.
    Text(String),
    /// A [`Kind::List`].
    List(Vec<String>),
    /// A [`Kind::Pairs`] table.
    Pairs(BTreeMap<String, String>),
    /// A [`Kind::Count`].
    Count(u64),
}

/// One layer of configuration: the TOML file, or the flags and environment. A layer holds the
/// settings it was given; [`ConfigLayer::over`] lets a higher layer win setting by setting.
/// Unknown TOML keys are errors (a typo must not silently fall back to a default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigLayer {
    values: BTreeMap<&'static str, Value>,
}

/// A value of a [`Kind::Pairs`] table in TOML: a string, a whole number or a boolean, passed
/// to the policy as text. Any other type is refused saying what is accepted.
struct PairValue(String);

impl<'de> Deserialize<'de> for PairValue {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PairValueVisitor)
    }
}

struct PairValueVisitor;

impl Visitor<'_> for PairValueVisitor {
    type Value = PairValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, a whole number or a boolean")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<PairValue, E> {
        Ok(PairValue(value.to_string()))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<PairValue, E> {
        Ok(PairValue(value.to_string()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<PairValue, E> {
        Ok(PairValue(value.to_string()))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<PairValue, E> {
        Ok(PairValue(value.to_string()))
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
    /// validating). Errors name `inline`, the setting that gave the value, or `file`, the one
    /// that gave the path.
    pub fn read(&self, inline: &Setting, file: &Setting) -> Result<String, ConfigError> {
        let (value, field) = match self {
            Secret::Inline(value) => (value.clone(), inline.key),
            Secret::File(path) => {
                let field = file.key;
                let bytes = read_regular(path, MAX_SECRET_FILE).map_err(|e| {
                    ConfigError::new(field, format!("cannot read {}: {e}", path.display()))
                })?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    ConfigError::new(field, format!("{} is not UTF-8 text", path.display()))
                })?;
                (text.trim_end_matches(['\n', '\r']).to_string(), field)
            }
        };
        if value.is_empty() {
            return Err(ConfigError::new(field, "is empty"));
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
            let setting = match e.file {
                etcd::TlsFile::Ca => &settings::ETCD_CA,
                etcd::TlsFile::Cert => &settings::ETCD_CERT,
                etcd::TlsFile::Key => &settings::ETCD_KEY,
            };
            ConfigError::new(setting.key, e.to_string())
        })
    }
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

/// A validated `[policy]` section: the policy, its configuration, and the operator's bounds on
/// loading it and on what it may do.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    /// Policy file, or `None` for the embedded default policy.
    pub file: Option<PathBuf>,
    /// Operator configuration of the policy.
    pub config: Vec<(String, String)>,
    /// Bounds on loading a candidate (`policy.max_size`, `policy.compile_cpu_time`,
    /// `policy.compile_memory`).
    pub load: LoadLimits,
    /// The p99 cost a decision may have (`policy.latency_budget`).
    pub latency_budget: Duration,
    /// Linear memory of one policy instance (`policy.memory`).
    pub memory: usize,
    /// When a misbehaving policy is rolled back (`policy.rollback_failures`,
    /// `policy.rollback_window`).
    pub rollback: RollbackRule,
    /// The bounds of the policy's settings (`[policy.limits]`).
    pub limits: Envelope,
    /// What is recorded of the questions the policy answers (`policy.record.*`); a host's
    /// only: `policy check`, `eval` and `replay` record nothing.
    pub record: RecordOptions,
    /// A shadow candidate is asked one question in this many (`policy.shadow.one_in`).
    pub shadow_one_in: u32,
    /// How candidates are compiled. Not a setting: the library compiles in its own process
    /// unless its embedder says otherwise, and the `regcache` binary (`run`, `policy check`
    /// and `eval`) compiles in a child of itself, under `load`'s bounds.
    pub compiler: Compiler,
}

impl PolicySettings {
    /// The policy engine's options under these settings, with precompiled policies kept in
    /// `artifact_dir`: the one place the configuration becomes [`EngineOptions`], so that the
    /// host's start, its swaps and `policy check` / `eval` judge a policy alike.
    pub fn engine_options(&self, artifact_dir: Option<PathBuf>) -> EngineOptions {
        EngineOptions {
            limits: Limits {
                latency_budget: self.latency_budget,
                memory_bytes: self.memory,
                ..Limits::default()
            },
            artifact_dir,
            compiler: self.compiler.clone(),
            load: self.load,
            envelope: self.limits,
            rollback: self.rollback,
            record: self.record.clone(),
            shadow_one_in: self.shadow_one_in,
        }
    }
}

/// The validated host configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// etcd, or `None` for the embedded in-memory registry.
    pub etcd: Option<EtcdSettings>,
    /// The policy and the bounds it runs within.
    pub policy: PolicySettings,
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
    /// The etcd-compatible endpoint, or `None` when it is off.
    pub etcd_api: Option<EtcdApiSettings>,
}

/// Largest configuration file read: a few hundred lines make a generous one.
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

impl ConfigLayer {
    /// Reads and parses the TOML file at `path` (I/O: the one read of configuration that
    /// precedes validation). Only a regular file of at most 1 MiB is read.
    pub fn read_toml_file(path: &Path) -> Result<ConfigLayer, ConfigError> {
        let bytes = read_regular(path, MAX_CONFIG_FILE).map_err(|e| {
            ConfigError::new(
                "config",
                format!(
                    "cannot read the configuration file {} (--config / REGCACHE_CONFIG): {e}",
                    path.display()
                ),
            )
        })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            ConfigError::new(
                "config",
                format!(
                    "the configuration file {} (--config / REGCACHE_CONFIG) is not UTF-8 text",
                    path.display()
                ),
            )
        })?;
        ConfigLayer::parse_toml(&text, &path.display().to_string())
    }

    /// Parses a TOML document (`origin` names it in errors). Errors are one line: the line of
    /// the document and what is wrong with it.
    pub fn parse_toml(text: &str, origin: &str) -> Result<ConfigLayer, ConfigError> {
        let mut layer = ConfigLayer::default();
        let reading = Cell::new(None);
        toml::Deserializer::parse(text)
            .and_then(|document| {
                TomlSection {
                    section: None,
                    layer: &mut layer,
                    reading: &reading,
                }
                .deserialize(document)
            })
            .map_err(|e| {
                let message = e.message().trim().to_string();
                let place = e
                    .span()
                    .map(|span| {
                        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                        let content = text.lines().nth(line - 1).unwrap_or("").trim();
                        format!(", line {line} (`{content}`)")
                    })
                    .unwrap_or_default();
                // A value of the wrong type names its setting (and so its flag and variable).
                let field = reading
                    .get()
                    .map_or("config", |setting: &Setting| setting.key);
                ConfigError::new(field, format!("{origin}{place}: {message}"))
            })?;
        Ok(layer)
    }

    /// Sets `setting` from the command line: `given` holds the flag's values or the variable's
    /// (comma-split for a list or a table), the last one winning for a single value.
    pub fn set_from_command_line(
        &mut self,
        setting: &'static Setting,
        mut given: Vec<String>,
    ) -> Result<(), ConfigError> {
        let value = match setting.kind {
            Kind::List => Value::List(given),
            Kind::Pairs => {
                let mut pairs = BTreeMap::new();
                for pair in &given {
                    let Some((key, value)) = pair.split_once('=') else {
                        return Err(ConfigError::new(
                            setting.key,
                            format!("`{pair}` is not KEY=VALUE"),
                        ));
                    };
                    let key = key.trim();
                    // Twice is a mistake (the TOML table refuses it too), not "the last wins".
                    if pairs
                        .insert(key.to_string(), value.trim().to_string())
                        .is_some()
                    {
                        return Err(ConfigError::new(
                            setting.key,
                            format!("`{key}` is given twice"),
                        ));
                    }
                }
                Value::Pairs(pairs)
            }
            Kind::Count(_) => {
                let text = given.pop().unwrap_or_default();
                Value::Count(text.trim().parse().map_err(|_| {
                    ConfigError::new(setting.key, format!("`{text}` is not a whole number"))
                })?)
            }
            _ => Value::Text(given.pop().unwrap_or_default()),
        };
        self.values.insert(setting.key, value);
        Ok(())
    }

    /// This layer with only `settings` in it: a tool that reads a host's configuration file
    /// takes what concerns it and leaves the host's own settings (its recording file) alone.
    pub fn only<'a>(mut self, settings: impl Iterator<Item = &'a Setting>) -> ConfigLayer {
        let keep: Vec<&str> = settings.map(|setting| setting.key).collect();
        self.values.retain(|key, _| keep.contains(key));
        self
    }

    /// This layer with `self`'s settings winning over `lower`'s.
    pub fn over(self, lower: ConfigLayer) -> ConfigLayer {
        let mut values = lower.values;
        for (inline, file) in settings::SECRET_TWINS {
            if self.values.contains_key(inline.key) || self.values.contains_key(file.key) {
                values.remove(inline.key);
                values.remove(file.key);
            }
        }
        values.extend(self.values);
        ConfigLayer { values }
    }

    /// Checks every setting, without any I/O, and fills in the defaults.
    pub fn validate(self) -> Result<HostConfig, ConfigError> {
        Ok(HostConfig {
            listen: self.listen()?,
            etcd: self.etcd()?,
            policy: self.policy()?,
            admin_token: self.admin_token()?,
            state_dir: self.path(&settings::STATE_DIR)?,
            log_format: match self.choice(&settings::LOG_FORMAT)? {
                "json" => LogFormat::Json,
                _ => LogFormat::Text,
            },
            snapshot_interval: self.duration(&settings::SNAPSHOT_INTERVAL)?,
            http: HttpSettings {
                header_read_timeout: self.duration(&settings::HTTP_HEADER_READ_TIMEOUT)?,
                idle_timeout: self.duration(&settings::HTTP_IDLE_TIMEOUT)?,
                write_timeout: self.duration(&settings::HTTP_WRITE_TIMEOUT)?,
                max_connections: self
                    .count(&settings::HTTP_MAX_CONNECTIONS)?
                    .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            },
            etcd_api: self.etcd_api()?,
        })
    }

    /// Checks `listen` alone, without any I/O: where a client of the host's HTTP API finds it.
    pub fn listen(&self) -> Result<SocketAddr, ConfigError> {
        self.address(&settings::LISTEN)
    }

    /// Checks the admin token's two settings alone, without any I/O (the file is read by
    /// [`Secret::read`]): what a client of the admin endpoints sends.
    pub fn admin_token(&self) -> Result<Option<Secret>, ConfigError> {
        self.secret(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE)
    }

    /// Checks the `[policy]` settings alone, without any I/O, and fills in the defaults: what
    /// `policy check` and `eval` take from a host's configuration.
    pub fn policy(&self) -> Result<PolicySettings, ConfigError> {
        let size = |setting| -> Result<usize, ConfigError> {
            Ok(usize::try_from(self.size(setting)?).unwrap_or(usize::MAX))
        };
        Ok(PolicySettings {
            file: self.path(&settings::POLICY_FILE)?,
            config: self.pairs(&settings::POLICY_CONFIG)?.into_iter().collect(),
            load: LoadLimits {
                max_size: size(&settings::POLICY_MAX_SIZE)?,
                compile_cpu: self.duration(&settings::POLICY_COMPILE_CPU_TIME)?,
                compile_memory: self.size(&settings::POLICY_COMPILE_MEMORY)?,
            },
            latency_budget: self.duration(&settings::POLICY_LATENCY_BUDGET)?,
            memory: size(&settings::POLICY_MEMORY)?,
            rollback: RollbackRule {
                failures: u32::try_from(
                    self.count_or_default(&settings::POLICY_ROLLBACK_FAILURES)?,
                )
                .unwrap_or(u32::MAX),
                window: self.duration(&settings::POLICY_ROLLBACK_WINDOW)?,
            },
            limits: Envelope {
                min_retry_interval: self.duration(&settings::POLICY_LIMITS_MIN_RETRY_INTERVAL)?,
                max_registry_budget: u32::try_from(
                    self.count_or_default(&settings::POLICY_LIMITS_MAX_REGISTRY_BUDGET)?,
                )
                .unwrap_or(u32::MAX),
                max_suspect_hold: self.duration(&settings::POLICY_LIMITS_MAX_SUSPECT_HOLD)?,
                max_wait: self.duration(&settings::POLICY_LIMITS_MAX_WAIT)?,
            },
            compiler: Compiler::default(),
            record: RecordOptions {
                ring: usize::try_from(self.count_or_default(&settings::POLICY_RECORD_RING)?)
                    .unwrap_or(usize::MAX),
                file: self.path(&settings::POLICY_RECORD_FILE)?,
                file_size: self.size(&settings::POLICY_RECORD_FILE_SIZE)?,
            },
            shadow_one_in: u32::try_from(self.count_or_default(&settings::POLICY_SHADOW_ONE_IN)?)
                .unwrap_or(u32::MAX),
        })
    }

    fn etcd_api(&self) -> Result<Option<EtcdApiSettings>, ConfigError> {
        if self.text(&settings::ETCD_API_LISTEN).is_none() {
            // As with etcd's section: a bound set for an endpoint that is off is a mistake.
            let set = settings::ALL.iter().find(|setting| {
                setting.section() == Some("etcd_api") && self.values.contains_key(setting.key)
            });
            return match set {
                Some(setting) => Err(ConfigError::new(
                    setting.key,
                    "is set but the etcd endpoint is off (`etcd_api.listen`)",
                )),
                None => Ok(None),
            };
        }
        let count = |setting| -> Result<usize, ConfigError> {
            let n = self.count_or_default(setting)?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        };
        Ok(Some(EtcdApiSettings {
            listen: self.address(&settings::ETCD_API_LISTEN)?,
            credential_ttl: self.duration(&settings::ETCD_API_CREDENTIAL_TTL)?,
            max_connections: count(&settings::ETCD_API_MAX_CONNECTIONS)?,
            max_leases_per_connection: count(&settings::ETCD_API_MAX_LEASES_PER_CONNECTION)?,
            max_watches_per_connection: count(&settings::ETCD_API_MAX_WATCHES_PER_CONNECTION)?,
            max_streams_per_connection: u32::try_from(count(
                &settings::ETCD_API_MAX_STREAMS_PER_CONNECTION,
            )?)
            .unwrap_or(u32::MAX),
        }))
    }

    fn etcd(&self) -> Result<Option<EtcdSettings>, ConfigError> {
        let endpoints = match self.list(&settings::ETCD_ENDPOINTS) {
            Some(endpoints) if !endpoints.is_empty() => endpoints,
            Some(_) => {
                return Err(ConfigError::new(
                    settings::ETCD_ENDPOINTS.key,
                    "is an empty list",
                ));
            }
            None => {
                // Without etcd nothing else of this section means anything: say so rather than
                // silently ignoring, say, a prefix meant for a real cluster.
                let set = settings::ALL.iter().find(|setting| {
                    setting.section() == Some("etcd") && self.values.contains_key(setting.key)
                });
                return match set {
                    Some(setting) => Err(ConfigError::new(
                        setting.key,
                        "is set but no etcd endpoint is (`etcd.endpoints`)",
                    )),
                    None => Ok(None),
                };
            }
        };
        let user = together(
            (&settings::ETCD_USER, self.text(&settings::ETCD_USER)),
            (
                &settings::ETCD_PASSWORD,
                self.secret(&settings::ETCD_PASSWORD, &settings::ETCD_PASSWORD_FILE)?,
            ),
        )?
        .map(|(user, password)| (user.to_string(), password));
        let ca = self.path(&settings::ETCD_CA)?;
        let client = together(
            (&settings::ETCD_CERT, self.path(&settings::ETCD_CERT)?),
            (&settings::ETCD_KEY, self.path(&settings::ETCD_KEY)?),
        )?;
        if client.is_some() && ca.is_none() {
            return Err(ConfigError::new(
                settings::ETCD_CA.key,
                "is required with a client certificate",
            ));
        }
        let settings = EtcdSettings {
            endpoints,
            user,
            ca,
            client,
            prefix: self.text_or_default(&settings::ETCD_PREFIX).to_string(),
            request_timeout: self.duration(&settings::ETCD_REQUEST_TIMEOUT)?,
            lease_ttl: self.duration(&settings::ETCD_LEASE_TTL)?,
        };
        // The registry's own rules (endpoint syntax and ports, TLS scheme, prefix, the ranges of
        // the timeout and the TTL), checked without I/O; the placeholder password is never used.
        let password = settings.user.as_ref().map(|_| "unused".to_string());
        settings
            .registry_config(password)
            .validate()
            .map_err(|e| ConfigError::new(etcd_setting(e.setting()).key, e.to_string()))?;
        Ok(Some(settings))
    }

    fn text(&self, setting: &Setting) -> Option<&str> {
        match self.values.get(setting.key) {
            Some(Value::Text(text)) => Some(text),
            _ => None,
        }
    }

    /// The text given, or the setting's default text.
    fn text_or_default(&self, setting: &Setting) -> &str {
        match (self.text(setting), &setting.default) {
            (Some(text), _) => text,
            (None, settings::DefaultValue::Text(text)) => text,
            (None, other) => unreachable!("{} has no default text ({other:?})", setting.key),
        }
    }

    fn address(&self, setting: &Setting) -> Result<SocketAddr, ConfigError> {
        let text = self.text_or_default(setting);
        text.parse().map_err(|_| {
            ConfigError::new(
                setting.key,
                format!("`{text}` is not an address like {DEFAULT_LISTEN}"),
            )
        })
    }

    fn choice(&self, setting: &'static Setting) -> Result<&'static str, ConfigError> {
        let Kind::Choice(choices) = setting.kind else {
            unreachable!("{} is not a choice", setting.key)
        };
        let text = self.text_or_default(setting);
        choices
            .iter()
            .copied()
            .find(|choice| *choice == text)
            .ok_or_else(|| {
                let choices: Vec<String> = choices.iter().map(|c| format!("`{c}`")).collect();
                ConfigError::new(
                    setting.key,
                    format!("`{text}` is not {}", choices.join(" or ")),
                )
            })
    }

    fn path(&self, setting: &Setting) -> Result<Option<PathBuf>, ConfigError> {
        match self.text(setting) {
            Some("") => Err(ConfigError::new(setting.key, "is empty")),
            text => Ok(text.map(PathBuf::from)),
        }
    }

    fn list(&self, setting: &Setting) -> Option<Vec<String>> {
        match self.values.get(setting.key) {
            Some(Value::List(list)) => Some(list.clone()),
            _ => None,
        }
    }

    fn pairs(&self, setting: &Setting) -> Result<BTreeMap<String, String>, ConfigError> {
        let pairs = match self.values.get(setting.key) {
            Some(Value::Pairs(pairs)) => pairs.clone(),
            _ => BTreeMap::new(),
        };
        if pairs.contains_key("") {
            return Err(ConfigError::new(setting.key, "a key is empty"));
        }
        Ok(pairs)
    }

    /// The count given, or the setting's default count.
    fn count_or_default(&self, setting: &Setting) -> Result<u64, ConfigError> {
        match (self.count(setting)?, &setting.default) {
            (Some(n), _) => Ok(n),
            (None, settings::DefaultValue::Count(n)) => Ok(*n),
            (None, other) => unreachable!("{} has no default count ({other:?})", setting.key),
        }
    }

    fn count(&self, setting: &Setting) -> Result<Option<u64>, ConfigError> {
        let Kind::Count(range) = setting.kind else {
            unreachable!("{} is not a count", setting.key)
        };
        match self.values.get(setting.key) {
            Some(Value::Count(n)) if !range.contains(n) => Err(ConfigError::new(
                setting.key,
                format!("must be between {} and {}", range.start(), range.end()),
            )),
            Some(Value::Count(n)) => Ok(Some(*n)),
            _ => Ok(None),
        }
    }

    /// A size: the one given, in range, or the default.
    fn size(&self, setting: &Setting) -> Result<u64, ConfigError> {
        let Kind::Size(range) = setting.kind else {
            unreachable!("{} is not a size", setting.key)
        };
        let Some(text) = self.text(setting) else {
            let settings::DefaultValue::Size(default) = setting.default else {
                unreachable!("{} has no default size", setting.key)
            };
            return Ok(default);
        };
        let value = parse_size(text).map_err(|message| ConfigError::new(setting.key, message))?;
        if !range.contains(&value) {
            return Err(ConfigError::new(
                setting.key,
                format!("must be {}", settings::size_between(range)),
            ));
        }
        Ok(value)
    }

    /// A duration: the one given (in range, for a [`Kind::Duration`]; a
    /// [`Kind::EtcdDuration`]'s range is the registry's to check) or the default.
    fn duration(&self, setting: &Setting) -> Result<Duration, ConfigError> {
        let Some(text) = self.text(setting) else {
            let settings::DefaultValue::Duration(default) = setting.default else {
                unreachable!("{} has no default duration", setting.key)
            };
            return Ok(default);
        };
        let value =
            parse_duration(text).map_err(|message| ConfigError::new(setting.key, message))?;
        match setting.kind {
            Kind::Duration(range) if !range.contains(&value) => Err(ConfigError::new(
                setting.key,
                format!("must be {}", settings::between(range)),
            )),
            Kind::Duration(_) | Kind::EtcdDuration { .. } => Ok(value),
            _ => unreachable!("{} is not a duration", setting.key),
        }
    }

    /// A secret given inline or as its file twin, not both.
    fn secret(&self, inline: &Setting, file: &Setting) -> Result<Option<Secret>, ConfigError> {
        match (self.text(inline), self.text(file)) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                inline.key,
                format!("give either `{}` or `{}`, not both", inline.key, file.key),
            )),
            (Some(""), None) => Err(ConfigError::new(inline.key, "is empty")),
            (Some(value), None) => Ok(Some(Secret::Inline(value.to_string()))),
            (None, Some("")) => Err(ConfigError::new(file.key, "is empty")),
            (None, Some(path)) => Ok(Some(Secret::File(path.into()))),
            (None, None) => Ok(None),
        }
    }
}

/// The host's setting a refusal of the registry's configuration concerns.
fn etcd_setting(setting: etcd::Setting) -> &'static Setting {
    match setting {
        etcd::Setting::Endpoints => &settings::ETCD_ENDPOINTS,
        etcd::Setting::User => &settings::ETCD_USER,
        etcd::Setting::TlsClient => &settings::ETCD_CERT,
        etcd::Setting::Prefix => &settings::ETCD_PREFIX,
        etcd::Setting::RequestTimeout => &settings::ETCD_REQUEST_TIMEOUT,
        // The keep-alive interval is a third of the TTL: only the TTL can put it out of range.
        etcd::Setting::LeaseTtl | etcd::Setting::KeepAliveInterval => &settings::ETCD_LEASE_TTL,
        other @ (etcd::Setting::Http2Keepalive
        | etcd::Setting::RetryBackoffMax
        | etcd::Setting::EndpointProbeInterval) => {
            unreachable!("the host leaves the registry's {other} at its default")
        }
    }
}

/// A table of the TOML file (the top level, `[etcd]`, `[policy.limits]`, ...): each key must be
/// a setting of the table or a table of settings; a setting's value is read as its kind.
/// Errors raised here carry the key's or the value's place in the document.
struct TomlSection<'a> {
    /// The table's dotted path (`policy.limits`); `None` at the top level.
    section: Option<&'static str>,
    layer: &'a mut ConfigLayer,
    /// The setting whose value is being read, if any: an error raised meanwhile is its.
    reading: &'a Cell<Option<&'static Setting>>,
}

/// A key of a TOML table: a setting, or a table of settings (its dotted path).
enum TomlKey {
    Setting(&'static Setting),
    Section(&'static str),
}

impl<'de> DeserializeSeed<'de> for TomlSection<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TomlSection<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table of settings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(KeySeed(self.section))? {
            match key {
                TomlKey::Setting(setting) => {
                    self.reading.set(Some(setting));
                    let value = map.next_value_seed(ValueSeed(setting))?;
                    self.reading.set(None);
                    self.layer.values.insert(setting.key, value);
                }
                TomlKey::Section(section) => map.next_value_seed(TomlSection {
                    section: Some(section),
                    layer: &mut *self.layer,
                    reading: self.reading,
                })?,
            }
        }
        Ok(())
    }
}

struct KeySeed(Option<&'static str>);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = TomlKey;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<TomlKey, D::Error> {
        let key = String::deserialize(deserializer)?;
        let full = match self.0 {
            Some(section) => format!("{section}.{key}"),
            None => key.clone(),
        };
        // A quoted key holding a dot (`"etcd.prefix"`) is one key, not a setting of a table:
        // taken for one, it would set the setting a second time, one of the two ignored.
        if !key.contains('.') {
            if let Some(setting) = settings::find(&full) {
                return Ok(TomlKey::Setting(setting));
            }
            let table = settings::ALL.iter().find_map(|setting| {
                let rest = setting.key.strip_prefix(full.as_str())?;
                rest.starts_with('.').then(|| &setting.key[..full.len()])
            });
            if let Some(table) = table {
                return Ok(TomlKey::Section(table));
            }
        }
        // What this table holds: its settings' names and its tables' names, once each.
        let mut expected: Vec<String> = Vec::new();
        for setting in settings::ALL {
            let rest = match self.0 {
                Some(section) => setting
                    .key
                    .strip_prefix(section)
                    .and_then(|rest| rest.strip_prefix('.')),
                None => Some(setting.key),
            };
            if let Some(name) = rest.and_then(|rest| rest.split('.').next()) {
                let name = format!("`{name}`");
                if !expected.contains(&name) {
                    expected.push(name);
                }
            }
        }
        Err(de::Error::custom(format!(
            "unknown field `{key}`, expected one of {}",
            expected.join(", ")
        )))
    }
}

struct ValueSeed(&'static Setting);

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Ok(match self.0.kind {
            Kind::List => Value::List(Vec::deserialize(deserializer)?),
            Kind::Pairs => Value::Pairs(
                BTreeMap::<String, PairValue>::deserialize(deserializer)?
                    .into_iter()
                    .map(|(key, PairValue(value))| (key, value))
                    .collect(),
            ),
            Kind::Count(_) => Value::Count(u64::deserialize(deserializer)?),
            Kind::Size(_) => Value::Text(deserializer.deserialize_any(SizeVisitor)?),
            _ => Value::Text(String::deserialize(deserializer)?),
        })
    }
}

/// A size in TOML: text (`32MiB`) or a whole number of bytes, read as text and parsed by
/// [`parse_size`] as a flag's value is.
struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size like \"32MiB\", or a whole number of bytes")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<String, E> {
        Ok(value.to_string())
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<String, E> {
        Ok(value.to_string())
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<String, E> {
        Ok(value.to_string())
    }
}

/// Splits `text` into its leading whole number and the rest.
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit))
}

/// Parses `200us` (or `200µs`), `500ms`, `5s`, `2m`, `1h` (one number, one unit).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("`{text}` is not a duration like 200us, 500ms, 5s, 2m or 1h");
    let (number, unit) = number_and_unit(text).ok_or_else(bad)?;
    let micros = match unit {
        "us" | "µs" => Some(number),
        "ms" => number.checked_mul(1_000),
        "s" => number.checked_mul(1_000_000),
        "m" => number.checked_mul(60_000_000),
        "h" => number.checked_mul(3_600_000_000),
        _ => return Err(bad()),
    };
    micros
        .map(Duration::from_micros)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// Parses a size: a whole number of bytes, or one with a binary unit (`512KiB`, `32MiB`,
/// `1GiB`).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let bad = || format!("`{text}` is not a size like 512KiB, 32MiB, 1GiB or a number of bytes");
    let (number, unit) = number_and_unit(text).ok_or_else(bad)?;
    let scale = match unit {
        "" => 1,
        unit => {
            settings::SIZE_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .ok_or_else(bad)?
                .1
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Two settings that only mean something together: both, or neither. The error names the one
/// missing (and its file twin, for a secret).
fn together<A, B>(
    (a, a_value): (&Setting, Option<A>),
    (b, b_value): (&Setting, Option<B>),
) -> Result<Option<(A, B)>, ConfigError> {
    let missing = |missing: &Setting, given: &Setting| {
        let or_file = settings::SECRET_TWINS
            .iter()
            .find(|(inline, _)| inline.key == missing.key)
            .map(|(_, file)| format!(" (or `{}`)", file.key))
            .unwrap_or_default();
        ConfigError::new(
            missing.key,
            format!("is required with `{}`{or_file}", given.key),
        )
    };
    match (a_value, b_value) {
        (Some(a_value), Some(b_value)) => Ok(Some((a_value, b_value))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(missing(b, a)),
        (None, Some(_)) => Err(missing(a, b)),
    }
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
                .policy
                .config
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
        let err = secret
            .read(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE)
            .unwrap_err();
        assert_eq!(err.field, "admin_token_file");
        assert!(err.to_string().contains(&missing.display().to_string()));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = Secret::File(empty)
            .read(&settings::ETCD_PASSWORD, &settings::ETCD_PASSWORD_FILE)
            .unwrap_err();
        assert_eq!(err.field, "etcd.password_file");
        assert_eq!(
            Secret::Inline(String::new())
                .read(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE)
                .unwrap_err()
                .field,
            "admin_token"
        );
    }

    #[test]
    fn a_higher_layer_giving_a_secret_either_way_replaces_both_of_a_lower_one() {
        let file = ConfigLayer::parse_toml("admin_token = \"from-the-file\"", "f").unwrap();
        let mut flags = ConfigLayer::default();
        flags
            .set_from_command_line(&settings::ADMIN_TOKEN_FILE, vec!["/run/token".into()])
            .unwrap();
        let config = flags.over(file).validate().unwrap();
        assert_eq!(
            config.admin_token,
            Some(Secret::File(PathBuf::from("/run/token")))
        );
        let both =
            ConfigLayer::parse_toml("admin_token = \"a\"\nadmin_token_file = \"/t\"", "f").unwrap();
        let err = both.validate().unwrap_err();
        assert_eq!(
            err.field, "admin_token",
            "one layer giving both is still refused"
        );
    }

    #[test]
    fn secret_files_are_regular_and_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let secret = Secret::File(path.clone());
        let reader = secret.clone();
        crate::fsutil::testing::assert_refuses_special_files(&path, move || {
            let err = reader
                .read(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE)
                .unwrap_err();
            assert_eq!(err.field, "admin_token_file");
            Err(err.to_string())
        });
        std::fs::write(&path, vec![b'x'; MAX_SECRET_FILE as usize + 1]).unwrap();
        let err = secret
            .read(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more than") && err.contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::write(&path, "t0ken\n").unwrap();
        assert_eq!(
            secret
                .read(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE)
                .unwrap(),
            "t0ken"
        );
    }

    #[test]
    fn higher_layer_wins_setting_by_setting() {
        let file = ConfigLayer::parse_toml(
            "listen = \"127.0.0.1:1\"\n[etcd]\nendpoints = [\"a:1\"]\nprefix = \"/p/\"\n\
             [policy]\nconfig = { a = 1, b = true }",
            "f",
        )
        .unwrap();
        let mut flags = ConfigLayer::default();
        flags
            .set_from_command_line(&settings::LISTEN, vec!["127.0.0.1:2".into()])
            .unwrap();
        flags
            .set_from_command_line(&settings::POLICY_CONFIG, vec!["c = 3".into()])
            .unwrap();
        let config = flags.over(file).validate().unwrap();
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.etcd.unwrap().prefix, "/p/");
        assert_eq!(config.policy.config, vec![("c".into(), "3".into())]);

        let mut flags = ConfigLayer::default();
        let err = flags
            .set_from_command_line(&settings::POLICY_CONFIG, vec!["novalue".into()])
            .unwrap_err();
        assert_eq!(err.field, "policy.config");
    }

    #[test]
    fn every_etcd_setting_needs_endpoints() {
        for setting in settings::ALL.iter().filter(|s| s.section() == Some("etcd")) {
            if setting.key == settings::ETCD_ENDPOINTS.key {
                continue;
            }
            let mut layer = ConfigLayer::default();
            let value = match setting.kind {
                Kind::List | Kind::Pairs => vec!["x=1".into()],
                _ => vec!["x".into()],
            };
            layer.set_from_command_line(setting, value).unwrap();
            let err = layer.validate().unwrap_err();
            assert_eq!(err.field, setting.key, "{err}");
            assert!(err.message.contains("no etcd endpoint"), "{err}");
        }
    }

    #[test]
    fn every_setting_is_a_toml_key_with_its_flag_and_variable() {
        for setting in settings::ALL {
            // `[policy.limits]` for `policy.limits.max_wait`.
            let (section, leaf) = match setting.key.rsplit_once('.') {
                Some((table, leaf)) => (format!("[{table}]\n"), leaf),
                None => (String::new(), setting.key),
            };
            let value = match setting.kind {
                Kind::List => "[]",
                Kind::Pairs => "{}",
                Kind::Count(_) => "1",
                _ => "\"x\"",
            };
            ConfigLayer::parse_toml(&format!("{section}{leaf} = {value}"), "t")
                .unwrap_or_else(|e| panic!("{}: {e}", setting.key));
            let help = setting.help_line();
            assert!(help.contains(&setting.default_text()), "{help}");
        }
        assert_eq!(settings::ETCD_LEASE_TTL.flag(), "--etcd-lease-ttl");
        assert_eq!(settings::ETCD_LEASE_TTL.env(), "REGCACHE_ETCD_LEASE_TTL");
        assert_eq!(
            settings::ETCD_LEASE_TTL.help_line(),
            "[etcd.lease_ttl] TTL of the host's lease: a host that dies leaves its nodes listed \
             this long; whole seconds, 1s to 3600s [default: 15s]"
        );
    }

    /// README.md's table of settings is this table, rendered: when a setting changes, this test
    /// fails and prints the table to paste.
    #[test]
    fn the_readme_lists_every_setting() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let want = settings::markdown_table();
        assert!(
            readme.contains(&want),
            "README.md's table of settings differs from the settings; it should read:\n\n{want}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_setting() {
        let cases = [
            (
                "[etcd]\nendpoints = [\"a:1\"]\nlease_ttl = 15",
                "etcd.lease_ttl",
                "line 3",
            ),
            ("admin_token = [\"a\"]", "admin_token", "sequence"),
            ("log_format = { a = 1 }", "log_format", "map"),
            (
                "snapshot_interval = 1.5",
                "snapshot_interval",
                "floating point",
            ),
            ("state_dir = true", "state_dir", "boolean"),
            ("[http]\nmax_connections = -1", "http.max_connections", "-1"),
            ("[etcd]\nendpoints = [1, 2]", "etcd.endpoints", "integer"),
            ("[etcd]\nendpoints = \"a:1\"", "etcd.endpoints", "string"),
        ];
        for (text, field, want) in cases {
            let err = toml(text).unwrap_err();
            assert_eq!(err.field, field, "{text}: {err}");
            let line = err.to_string();
            assert!(
                line.contains(want) && !line.contains('\n'),
                "{text}: {line}"
            );
            assert!(line.contains(&settings::flag(field)), "{text}: {line}");
        }
        // A key that is not a setting stays the file's error.
        assert_eq!(toml("etcd = 5").unwrap_err().field, "config");
    }

    #[test]
    fn a_policy_config_value_of_another_type_says_what_it_takes() {
        for value in ["1.5", "{ b = 1 }", "[1]", "1979-05-27"] {
            let text = format!("[policy]\nconfig = {{ a = {value} }}");
            let err = toml(&text).unwrap_err();
            assert_eq!(err.field, "policy.config", "{text}: {err}");
            let line = err.to_string();
            assert!(!line.contains("PairValue"), "{text}: {line}");
            assert!(
                line.contains("a string, a whole number or a boolean"),
                "{text}: {line}"
            );
        }
    }

    #[test]
    fn a_quoted_dotted_key_is_not_a_setting() {
        // `"etcd.prefix"` is one TOML key, not `prefix` in `[etcd]`: accepted, it would set the
        // same setting as `[etcd] prefix`, one of the two silently ignored.
        let text = "\"etcd.prefix\" = \"/a/\"\n[etcd]\nendpoints = [\"a:1\"]\nprefix = \"/b/\"";
        let err = toml(text).unwrap_err();
        assert_eq!(err.field, "config", "{err}");
        assert!(err.message.contains("unknown field `etcd.prefix`"), "{err}");
        assert!(toml("[etcd]\n\"etcd.prefix\" = \"/a/\"").is_err());
    }

    #[test]
    fn a_policy_config_key_given_twice_on_the_command_line_is_refused() {
        let mut layer = ConfigLayer::default();
        let err = layer
            .set_from_command_line(&settings::POLICY_CONFIG, vec!["a=1".into(), " a =2".into()])
            .unwrap_err();
        assert_eq!(err.field, "policy.config");
        assert!(err.message.contains("`a` is given twice"), "{err}");
    }

    #[test]
    fn a_configuration_file_that_cannot_be_read_names_its_flag_and_variable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let not_utf8 = dir.path().join("latin1.toml");
        std::fs::write(&not_utf8, b"listen = \"\xff\"\n").unwrap();
        for path in [missing, not_utf8] {
            let line = ConfigLayer::read_toml_file(&path).unwrap_err().to_string();
            assert!(
                line.contains(&path.display().to_string())
                    && line.contains("(--config / REGCACHE_CONFIG)"),
                "{line}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_duration("200µs"), Ok(Duration::from_micros(200)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size(" 1GiB "), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "1.5MiB",
            "1MB",
            "1 MiB",
            "-1",
            "MiB",
            "99999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(settings::show_size(32 << 20), "32MiB");
        assert_eq!(settings::show_size(1 << 30), "1GiB");
        assert_eq!(settings::show_size(1000), "1000 bytes");
        // In the file, as text or as a number of bytes.
        let config = toml("[policy]\nmax_size = \"16MiB\"\ncompile_memory = 134217728").unwrap();
        assert_eq!(config.policy.load.max_size, 16 << 20);
        assert_eq!(config.policy.load.compile_memory, 128 << 20);
        let err = toml("[policy]\ncompile_memory = 1.5").unwrap_err();
        assert_eq!(err.field, "policy.compile_memory");
        assert!(err.to_string().contains("a size like"), "{err}");
    }

    /// The policy's settings left at their defaults give the engine's own defaults: the table
    /// and the modules that own each bound cannot drift apart.
    #[test]
    fn the_policy_settings_default_to_the_engines_defaults() {
        let options = toml("").unwrap().policy.engine_options(None);
        let engine = EngineOptions::default();
        assert_eq!(
            format!("{:?}", options.limits),
            format!("{:?}", engine.limits)
        );
        assert_eq!(format!("{:?}", options.load), format!("{:?}", engine.load));
        assert_eq!(
            format!("{:?}", options.rollback),
            format!("{:?}", engine.rollback)
        );
        assert_eq!(options.envelope, engine.envelope);
        assert!(matches!(options.compiler, Compiler::InProcess));
    }

    /// `[policy.limits]` is a table within a table: its settings come from the file (as a table
    /// or as dotted keys), flags and variables, each named in full in errors.
    #[test]
    fn three_level_keys_come_from_the_file_flags_and_variables() {
        let file = toml(
            "[policy]\nlatency_budget = \"500us\"\n[policy.limits]\nmin_retry_interval = \"1s\"\n\
             max_registry_budget = 50\nmax_suspect_hold = \"10m\"\nmax_wait = \"2s\"",
        )
        .unwrap()
        .policy;
        assert_eq!(file.latency_budget, Duration::from_micros(500));
        assert_eq!(
            file.limits,
            Envelope {
                min_retry_interval: Duration::from_secs(1),
                max_registry_budget: 50,
                max_suspect_hold: Duration::from_secs(600),
                max_wait: Duration::from_secs(2),
            }
        );
        let dotted = toml("[policy]\nlimits.max_wait = \"4s\"").unwrap().policy;
        assert_eq!(dotted.limits.max_wait, Duration::from_secs(4));
        let inline = toml("policy = { limits = { max_registry_budget = 7 } }")
            .unwrap()
            .policy;
        assert_eq!(inline.limits.max_registry_budget, 7);

        let setting = &settings::POLICY_LIMITS_MIN_RETRY_INTERVAL;
        assert_eq!(setting.flag(), "--policy-limits-min-retry-interval");
        assert_eq!(setting.env(), "REGCACHE_POLICY_LIMITS_MIN_RETRY_INTERVAL");
        let mut flags = ConfigLayer::default();
        flags
            .set_from_command_line(setting, vec!["5ms".into()])
            .unwrap();
        let file =
            ConfigLayer::parse_toml("[policy.limits]\nmin_retry_interval = \"1s\"", "f").unwrap();
        let merged = flags.over(file).validate().unwrap().policy;
        assert_eq!(merged.limits.min_retry_interval, Duration::from_millis(5));

        let err = toml("[policy.limits]\nmin_retry_interval = \"0ms\"").unwrap_err();
        assert_eq!(err.field, "policy.limits.min_retry_interval");
        assert_eq!(
            err.to_string(),
            "invalid configuration: `policy.limits.min_retry_interval` \
             (--policy-limits-min-retry-interval / REGCACHE_POLICY_LIMITS_MIN_RETRY_INTERVAL): \
             must be between 1ms and 3600s"
        );
        // Unknown keys name what each table holds.
        let err = toml("[policy.limits]\nmax_wiat = \"1s\"").unwrap_err();
        assert!(
            err.message.contains(
                "unknown field `max_wiat`, expected one of `min_retry_interval`, \
                 `max_registry_budget`, `max_suspect_hold`, `max_wait`"
            ),
            "{err}"
        );
        let err = toml("[policy]\nlimit = {}").unwrap_err();
        assert!(
            err.message.contains("`limits`") && !err.message.contains("`max_wait`"),
            "{err}"
        );
        assert!(toml("[policy]\n\"limits.max_wait\" = \"1s\"").is_err());
    }

    /// Every bound of the envelope names the setting that sets it, as the engine's refusals say.
    #[test]
    fn each_envelope_bound_is_a_setting() {
        for limit in crate::policy::EnvelopeLimit::ALL {
            let setting = settings::find(limit.key())
                .unwrap_or_else(|| panic!("{limit:?} names `{}`, no setting", limit.key()));
            assert!(setting.help.contains(limit.bounds()), "{}", setting.key);
        }
    }

    /// A bad value of each new setting of the policy is one line naming the setting, its flag
    /// and its variable.
    #[test]
    fn bad_policy_settings_name_the_setting_flag_and_variable() {
        let cases: [(&Setting, &str, &str); 14] = [
            (
                &settings::POLICY_MAX_SIZE,
                "1KiB",
                "between 64KiB and 256MiB",
            ),
            (&settings::POLICY_MAX_SIZE, "lots", "not a size"),
            (
                &settings::POLICY_COMPILE_CPU_TIME,
                "1h",
                "between 1s and 600s",
            ),
            (
                &settings::POLICY_COMPILE_MEMORY,
                "1MiB",
                "between 64MiB and 64GiB",
            ),
            (
                &settings::POLICY_LATENCY_BUDGET,
                "1us",
                "between 10µs and 50ms",
            ),
            (&settings::POLICY_LATENCY_BUDGET, "fast", "not a duration"),
            (
                &settings::POLICY_ROLLBACK_FAILURES,
                "0",
                "between 1 and 1000000",
            ),
            (
                &settings::POLICY_ROLLBACK_FAILURES,
                "many",
                "not a whole number",
            ),
            (
                &settings::POLICY_ROLLBACK_WINDOW,
                "100ms",
                "between 1s and 86400s",
            ),
            (
                &settings::POLICY_LIMITS_MIN_RETRY_INTERVAL,
                "2h",
                "between 1ms and 3600s",
            ),
            (
                &settings::POLICY_LIMITS_MAX_REGISTRY_BUDGET,
                "0",
                "between 1 and 1000000",
            ),
            (
                &settings::POLICY_LIMITS_MAX_REGISTRY_BUDGET,
                "2000000",
                "between 1 and 1000000",
            ),
            (
                &settings::POLICY_LIMITS_MAX_SUSPECT_HOLD,
                "2d",
                "not a duration",
            ),
            (
                &settings::POLICY_LIMITS_MAX_WAIT,
                "2m",
                "between 1ms and 60s",
            ),
        ];
        for (setting, value, want) in cases {
            let mut layer = ConfigLayer::default();
            let err = layer
                .set_from_command_line(setting, vec![value.into()])
                .and_then(|()| layer.policy().map(drop))
                .unwrap_err();
            assert_eq!(err.field, setting.key, "{value}: {err}");
            let line = err.to_string();
            for want in [want, &setting.flag(), &setting.env()] {
                assert!(
                    line.contains(want) && !line.contains('\n'),
                    "{value}: {line}"
                );
            }
        }
    }
}
