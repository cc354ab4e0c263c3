//! The table of the host's settings. Each setting is defined once here: its TOML key, the name
//! of its value, one help sentence, its default and its kind (what it takes, and its range). The
//! flag and the environment variable are derived from the key; `regcache run --help`, the
//! README's table and the validation messages are rendered from the entry, so none can drift.
//!
//! Defaults and ranges stay with the module that owns the concept (the HTTP server's timeouts,
//! etcd's lease TTL) and are referenced here by exactly one entry.

use std::fmt::Write as _;
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::etcd_api;
use crate::http;
use crate::policy::{self, Envelope};
use crate::registry::etcd;

use super::{
    COMPILE_CPU_TIME_RANGE, COMPILE_MEMORY_RANGE, DEFAULT_LISTEN, DEFAULT_SNAPSHOT_INTERVAL,
    LATENCY_BUDGET_RANGE, POLICY_MAX_SIZE_RANGE, POLICY_MEMORY_RANGE, RECORD_FILE_SIZE_RANGE,
    RECORD_RING_RANGE, ROLLBACK_FAILURES_RANGE, ROLLBACK_WINDOW_RANGE, SHADOW_ONE_IN_RANGE,
    SNAPSHOT_INTERVAL_RANGE,
};

/// One setting of the host.
#[derive(Debug)]
pub struct Setting {
    /// Dotted as in the TOML file: `etcd.lease_ttl` is `lease_ttl` in `[etcd]`,
    /// `policy.limits.max_wait` is `max_wait` in `[policy.limits]`.
    pub key: &'static str,
    /// The value's placeholder in the help: `DURATION`.
    pub value_name: &'static str,
    /// What the setting does, in a sentence or two.
    pub help: &'static str,
    /// What it takes.
    pub kind: Kind,
    /// What applies when it is not set.
    pub default: DefaultValue,
}

/// What a setting takes.
#[derive(Debug)]
pub enum Kind {
    /// Any text.
    Text,
    /// A socket address, `127.0.0.1:7070`.
    Address,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A path to a file or a directory (read at start, never while validating).
    Path,
    /// A secret given inline; its value is never shown. Its file twin is the setting named
    /// like it with `_file` appended, of kind [`Kind::SecretFile`]; give one or the other.
    Secret,
    /// A file holding the secret of the setting named like this one without `_file`.
    SecretFile,
    /// A duration (`200us`, `500ms`, `5s`, `2m`, `1h`) within the range.
    Duration(&'static RangeInclusive<Duration>),
    /// A size in bytes within the range: a whole number of bytes, or with a binary unit
    /// (`512KiB`, `32MiB`, `1GiB`).
    Size(&'static RangeInclusive<u64>),
    /// A duration of the etcd registry's own configuration: its range is checked by
    /// [`EtcdConfig::validate`](etcd::EtcdConfig::validate), which embedders building an
    /// `EtcdConfig` themselves rely on as well, and is only documented from here.
    EtcdDuration {
        /// The range the registry accepts.
        range: &'static RangeInclusive<Duration>,
        /// Whether it counts in whole seconds (etcd's unit for a lease).
        whole_seconds: bool,
    },
    /// A whole number within the range.
    Count(&'static RangeInclusive<u64>),
    /// A list of text, comma-separated in a flag or a variable.
    List,
    /// A `KEY=VALUE` table: a TOML table in the file, repeated flags or a comma-separated
    /// variable on the command line (which replace the file's whole table).
    Pairs,
}

/// What applies when a setting is not set.
#[derive(Debug)]
pub enum DefaultValue {
    /// This text, as if given.
    Text(&'static str),
    /// This duration.
    Duration(Duration),
    /// This number.
    Count(u64),
    /// This many bytes.
    Size(u64),
    /// Nothing.
    None,
    /// Nothing, which means this.
    NoneMeans(&'static str),
    /// A value computed when the host starts, described by the function.
    Derived(fn() -> String),
}

/// Where the host listens.
pub static LISTEN: Setting = Setting {
    key: "listen",
    value_name: "ADDR",
    help: "Address of the HTTP API (port 0 picks a free one, logged)",
    kind: Kind::Address,
    default: DefaultValue::Text(DEFAULT_LISTEN),
};

/// etcd's endpoints.
pub static ETCD_ENDPOINTS: Setting = Setting {
    key: "etcd.endpoints",
    value_name: "ENDPOINTS",
    help: "etcd endpoints, host:port or http(s)://host:port (port 1 to 65535)",
    kind: Kind::List,
    default: DefaultValue::NoneMeans("an embedded in-memory registry"),
};

/// etcd's user name.
pub static ETCD_USER: Setting = Setting {
    key: "etcd.user",
    value_name: "USER",
    help: "etcd user name",
    kind: Kind::Text,
    default: DefaultValue::NoneMeans("authentication off"),
};

/// etcd's password.
pub static ETCD_PASSWORD: Setting = Setting {
    key: "etcd.password",
    value_name: "PASSWORD",
    help: "etcd password (prefer the environment or a file over a flag)",
    kind: Kind::Secret,
    default: DefaultValue::None,
};

/// A file holding etcd's password.
pub static ETCD_PASSWORD_FILE: Setting = Setting {
    key: "etcd.password_file",
    value_name: "FILE",
    help: "File holding the etcd password (trailing newline ignored)",
    kind: Kind::SecretFile,
    default: DefaultValue::None,
};

/// The CA of etcd's certificate.
pub static ETCD_CA: Setting = Setting {
    key: "etcd.ca",
    value_name: "FILE",
    help: "CA of etcd's server certificate (PEM); turns TLS on. The TLS files are read and \
           parsed at start: one that is not PEM, holds no certificate, or a key that is not \
           the certificate's stops the start",
    kind: Kind::Path,
    default: DefaultValue::NoneMeans("plain HTTP/2"),
};

/// The client certificate for etcd.
pub static ETCD_CERT: Setting = Setting {
    key: "etcd.cert",
    value_name: "FILE",
    help: "Client certificate for etcd (PEM), for etcd's client-certificate authentication",
    kind: Kind::Path,
    default: DefaultValue::None,
};

/// The client certificate's key.
pub static ETCD_KEY: Setting = Setting {
    key: "etcd.key",
    value_name: "FILE",
    help: "Key of the client certificate (PEM)",
    kind: Kind::Path,
    default: DefaultValue::None,
};

/// The registry's key prefix.
pub static ETCD_PREFIX: Setting = Setting {
    key: "etcd.prefix",
    value_name: "PREFIX",
    help: "Key prefix of the registry (go-micro's by default)",
    kind: Kind::Text,
    default: DefaultValue::Text(etcd::DEFAULT_PREFIX),
};

/// The bound of every etcd call.
pub static ETCD_REQUEST_TIMEOUT: Setting = Setting {
    key: "etcd.request_timeout",
    value_name: "DURATION",
    help: "Bound of every etcd call, retries included, and of connecting",
    kind: Kind::EtcdDuration {
        range: &etcd::REQUEST_TIMEOUT_RANGE,
        whole_seconds: false,
    },
    default: DefaultValue::Duration(etcd::DEFAULT_REQUEST_TIMEOUT),
};

/// The TTL of the host's lease.
pub static ETCD_LEASE_TTL: Setting = Setting {
    key: "etcd.lease_ttl",
    value_name: "DURATION",
    help: "TTL of the host's lease: a host that dies leaves its nodes listed this long",
    kind: Kind::EtcdDuration {
        range: &etcd::LEASE_TTL_RANGE,
        whole_seconds: true,
    },
    default: DefaultValue::Duration(etcd::DEFAULT_LEASE_TTL),
};

/// The policy component.
pub static POLICY_FILE: Setting = Setting {
    key: "policy.file",
    value_name: "FILE",
    help: "Policy component to load and watch (SIGHUP reloads it too)",
    kind: Kind::Path,
    default: DefaultValue::NoneMeans("the embedded default policy"),
};

/// The policy's operator configuration.
pub static POLICY_CONFIG: Setting = Setting {
    key: "policy.config",
    value_name: "KEY=VALUE",
    help: "Policy configuration, passed to the policy's `configure`",
    kind: Kind::Pairs,
    default: DefaultValue::None,
};

/// Largest policy component accepted.
pub static POLICY_MAX_SIZE: Setting = Setting {
    key: "policy.max_size",
    value_name: "SIZE",
    help: "Largest policy component accepted, from the file or over the API (ours weigh \
           ~100 KiB, one built by componentize-py ~18 MiB)",
    kind: Kind::Size(&POLICY_MAX_SIZE_RANGE),
    default: DefaultValue::Size(policy::MAX_POLICY_SIZE as u64),
};

/// CPU time compiling a candidate may take.
pub static POLICY_COMPILE_CPU_TIME: Setting = Setting {
    key: "policy.compile_cpu_time",
    value_name: "DURATION",
    help: "CPU time compiling one candidate policy may take, all threads together, in a child \
           process of the regcache binary (a few hundred ms for ours); a crafted component that \
           takes longer is refused; wall-clock time is bounded at twice this",
    kind: Kind::Duration(&COMPILE_CPU_TIME_RANGE),
    default: DefaultValue::Duration(Duration::from_secs(30)),
};

/// Memory compiling a candidate may use.
pub static POLICY_COMPILE_MEMORY: Setting = Setting {
    key: "policy.compile_memory",
    value_name: "SIZE",
    help: "Memory compiling one candidate policy may use, in a child process of the regcache \
           binary (tens of MiB for ours); a crafted component that needs more is refused",
    kind: Kind::Size(&COMPILE_MEMORY_RANGE),
    default: DefaultValue::Size(1 << 30),
};

/// The p99 cost a decision may have.
pub static POLICY_LATENCY_BUDGET: Setting = Setting {
    key: "policy.latency_budget",
    value_name: "DURATION",
    help: "p99 cost of one decision, measured in CPU time over the validation battery: a \
           slower policy is refused; at run time a decision is stopped (a fail-safe answer, \
           counted against the policy) once it has spent this rounded up to whole ms, at \
           least 2 ms, twice over (the default policy decides in about 350ns in process; 200us leaves room for a \
           policy in a slower language and a loaded machine while keeping a lookup's policy \
           cost well under a millisecond)",
    kind: Kind::Duration(&LATENCY_BUDGET_RANGE),
    default: DefaultValue::Duration(Duration::from_micros(200)),
};

/// Linear memory of a policy instance.
pub static POLICY_MEMORY: Setting = Setting {
    key: "policy.memory",
    value_name: "SIZE",
    help: "Linear memory one policy instance may use; a policy that asks for more traps. \
           Each lookup thread holds an instance, so the host may use this many times over. \
           Our Rust policies use about 1 MiB; a Python one starts at 13 MiB (give one that \
           allocates 32MiB)",
    kind: Kind::Size(&POLICY_MEMORY_RANGE),
    default: DefaultValue::Size(16 << 20),
};

/// Failures that roll a policy back.
pub static POLICY_ROLLBACK_FAILURES: Setting = Setting {
    key: "policy.rollback_failures",
    value_name: "N",
    help: "Failed decisions (traps, decisions stopped at their deadline, invalid answers, and \
           those the open breaker answers fail-safe) within `policy.rollback_window` after \
           which the active policy is replaced by the one it replaced",
    kind: Kind::Count(&ROLLBACK_FAILURES_RANGE),
    default: DefaultValue::Count(10),
};

/// The window failures are counted over.
pub static POLICY_ROLLBACK_WINDOW: Setting = Setting {
    key: "policy.rollback_window",
    value_name: "DURATION",
    help: "Sliding window over which a policy's failed decisions are counted",
    kind: Kind::Duration(&ROLLBACK_WINDOW_RANGE),
    default: DefaultValue::Duration(Duration::from_secs(60)),
};

/// Questions recorded in memory.
pub static POLICY_RECORD_RING: Setting = Setting {
    key: "policy.record.ring",
    value_name: "N",
    help: "Questions the policy answered kept in memory, the most recent, with the answers \
           (`GET /v1/policy/recording`, and what a swap with `replay=recent` is replayed on); \
           0 records nothing. Recording costs a lookup a copy of its question, off its path",
    kind: Kind::Count(&RECORD_RING_RANGE),
    default: DefaultValue::Count(0),
};

/// The recording file.
pub static POLICY_RECORD_FILE: Setting = Setting {
    key: "policy.record.file",
    value_name: "FILE",
    help: "Append every question the policy answers, with the answer, to this file as JSON \
           lines (`regcache policy replay` reads them); rotated past `policy.record.file_size`",
    kind: Kind::Path,
    default: DefaultValue::NoneMeans("no file"),
};

/// When the recording file rotates.
pub static POLICY_RECORD_FILE_SIZE: Setting = Setting {
    key: "policy.record.file_size",
    value_name: "SIZE",
    help: "Size past which the recording file is renamed to FILE.1 (replacing the previous \
           one) and a new one started: the recording takes at most twice this on disk",
    kind: Kind::Size(&RECORD_FILE_SIZE_RANGE),
    default: DefaultValue::Size(64 << 20),
};

/// Shadow sampling.
pub static POLICY_SHADOW_ONE_IN: Setting = Setting {
    key: "policy.shadow.one_in",
    value_name: "N",
    help: "A shadow policy (`PUT /v1/policy?mode=shadow`) is asked one question in N that the \
           active policy answers, off the lookup's path",
    kind: Kind::Count(&SHADOW_ONE_IN_RANGE),
    default: DefaultValue::Count(1),
};

/// The floor of a policy's retry interval.
pub static POLICY_LIMITS_MIN_RETRY_INTERVAL: Setting = Setting {
    key: "policy.limits.min_retry_interval",
    value_name: "DURATION",
    help: "Floor of a policy's `min-retry-interval-ms`: a policy asking for less is refused. \
           100ms lets one service cost etcd at most ten reads a second per host (the default \
           policy waits 5s)",
    kind: Kind::Duration(&Envelope::MIN_RETRY_INTERVAL_RANGE),
    default: DefaultValue::Duration(Envelope::DEFAULT_MIN_RETRY_INTERVAL),
};

/// The ceiling of a policy's registry budget.
pub static POLICY_LIMITS_MAX_REGISTRY_BUDGET: Setting = Setting {
    key: "policy.limits.max_registry_budget",
    value_name: "N",
    help: "Ceiling of a policy's `registry-budget-per-second`: a policy asking for more is \
           refused. 1000 listings a second per host is a load one etcd member serves beside \
           its writes (the default policy asks 100)",
    kind: Kind::Count(&Envelope::REGISTRY_BUDGET_RANGE),
    default: DefaultValue::Count(Envelope::DEFAULT_MAX_REGISTRY_BUDGET as u64),
};

/// The ceiling of a policy's suspect hold.
pub static POLICY_LIMITS_MAX_SUSPECT_HOLD: Setting = Setting {
    key: "policy.limits.max_suspect_hold",
    value_name: "DURATION",
    help: "Ceiling of a policy's `max-suspect-hold-ms`: a policy asking for more is refused. \
           A node etcd says is gone is handed out at most this long on the policy's word (the \
           default policy holds 5 min)",
    kind: Kind::Duration(&Envelope::MAX_SUSPECT_HOLD_RANGE),
    default: DefaultValue::Duration(Envelope::DEFAULT_MAX_SUSPECT_HOLD),
};

/// The ceiling of a policy's wait.
pub static POLICY_LIMITS_MAX_WAIT: Setting = Setting {
    key: "policy.limits.max_wait",
    value_name: "DURATION",
    help: "Ceiling of a policy's `max-wait-ms`, and so of every caller's wait for a refresh: \
           a policy asking for more is refused. 10s stays under clients' usual timeouts (the \
           default policy waits 3s)",
    kind: Kind::Duration(&Envelope::MAX_WAIT_RANGE),
    default: DefaultValue::Duration(Envelope::DEFAULT_MAX_WAIT),
};

/// The admin endpoints' bearer token.
pub static ADMIN_TOKEN: Setting = Setting {
    key: "admin_token",
    value_name: "TOKEN",
    help: "Bearer token of the admin endpoints (PUT /v1/policy)",
    kind: Kind::Secret,
    default: DefaultValue::NoneMeans("the admin endpoints are disabled"),
};

/// A file holding the admin token.
pub static ADMIN_TOKEN_FILE: Setting = Setting {
    key: "admin_token_file",
    value_name: "FILE",
    help: "File holding the admin token (trailing newline ignored)",
    kind: Kind::SecretFile,
    default: DefaultValue::None,
};

/// The state directory.
pub static STATE_DIR: Setting = Setting {
    key: "state_dir",
    value_name: "DIR",
    help: "Directory for the cache snapshot and precompiled policies (created if missing). If \
           it cannot be written the host warns and runs without them (a snapshot there is \
           still read)",
    kind: Kind::Path,
    default: DefaultValue::NoneMeans("no snapshot, the policy compiled at each start"),
};

/// How often the snapshot is written.
pub static SNAPSHOT_INTERVAL: Setting = Setting {
    key: "snapshot_interval",
    value_name: "DURATION",
    help: "How often the snapshot is written",
    kind: Kind::Duration(&SNAPSHOT_INTERVAL_RANGE),
    default: DefaultValue::Duration(DEFAULT_SNAPSHOT_INTERVAL),
};

/// Time to receive a request head.
pub static HTTP_HEADER_READ_TIMEOUT: Setting = Setting {
    key: "http.header_read_timeout",
    value_name: "DURATION",
    help: "Time a client has to send a request head (and again its body); a silent or \
           dripping connection is closed after it",
    kind: Kind::Duration(&http::HEADER_READ_TIMEOUT_RANGE),
    default: DefaultValue::Duration(http::DEFAULT_HEADER_READ_TIMEOUT),
};

/// Time a kept-alive connection may wait for its next request.
pub static HTTP_IDLE_TIMEOUT: Setting = Setting {
    key: "http.idle_timeout",
    value_name: "DURATION",
    help: "Time a kept-alive connection may wait for its next request",
    kind: Kind::Duration(&http::IDLE_TIMEOUT_RANGE),
    default: DefaultValue::Duration(http::DEFAULT_IDLE_TIMEOUT),
};

/// Time a client may read none of its answer.
pub static HTTP_WRITE_TIMEOUT: Setting = Setting {
    key: "http.write_timeout",
    value_name: "DURATION",
    help: "Time the host waits for a client to read any of its answer (or of answers to \
           requests it pipelined); the connection is closed after it",
    kind: Kind::Duration(&http::WRITE_TIMEOUT_RANGE),
    default: DefaultValue::Duration(http::DEFAULT_WRITE_TIMEOUT),
};

/// Connections open at once.
pub static HTTP_MAX_CONNECTIONS: Setting = Setting {
    key: "http.max_connections",
    value_name: "N",
    help: "Connections open at once; at the limit a new one replaces one with no request in \
           flight or an answer left unread",
    kind: Kind::Count(&http::MAX_CONNECTIONS_RANGE),
    default: DefaultValue::Derived(|| {
        format!(
            "RLIMIT_NOFILE less {}, at most {}",
            http::RESERVED_DESCRIPTORS,
            http::DEFAULT_MAX_CONNECTIONS_CAP
        )
    }),
};

/// Where the etcd-compatible endpoint listens.
pub static ETCD_API_LISTEN: Setting = Setting {
    key: "etcd_api.listen",
    value_name: "ADDR",
    help: "Address of the etcd-compatible gRPC endpoint, for unchanged etcd registry clients \
           (go-micro's, etcdctl, clientv3; port 0 picks a free one, logged)",
    kind: Kind::Address,
    default: DefaultValue::NoneMeans("off"),
};

/// How long a credential's verdict is remembered.
pub static ETCD_API_CREDENTIAL_TTL: Setting = Setting {
    key: "etcd_api.credential_ttl",
    value_name: "DURATION",
    help: "How long the endpoint takes etcd's verdict on a user and password as given (one \
           etcd Authenticate per credential per period; a refusal is kept 5s)",
    kind: Kind::Duration(&etcd_api::CREDENTIAL_TTL_RANGE),
    default: DefaultValue::Duration(etcd_api::DEFAULT_CREDENTIAL_TTL),
};

/// Connections of the endpoint.
pub static ETCD_API_MAX_CONNECTIONS: Setting = Setting {
    key: "etcd_api.max_connections",
    value_name: "N",
    help: "Connections the endpoint keeps open at once; past it a new one is closed at once \
           (its client retries)",
    kind: Kind::Count(&etcd_api::PER_CONNECTION_RANGE),
    default: DefaultValue::Count(etcd_api::DEFAULT_MAX_CONNECTIONS),
};

/// Leases per connection.
pub static ETCD_API_MAX_LEASES_PER_CONNECTION: Setting = Setting {
    key: "etcd_api.max_leases_per_connection",
    value_name: "N",
    help: "Leases one client connection of the endpoint may hold",
    kind: Kind::Count(&etcd_api::PER_CONNECTION_RANGE),
    default: DefaultValue::Count(etcd_api::DEFAULT_MAX_LEASES_PER_CONNECTION),
};

/// Watches per connection.
pub static ETCD_API_MAX_WATCHES_PER_CONNECTION: Setting = Setting {
    key: "etcd_api.max_watches_per_connection",
    value_name: "N",
    help: "Watches one client connection of the endpoint may hold",
    kind: Kind::Count(&etcd_api::PER_CONNECTION_RANGE),
    default: DefaultValue::Count(etcd_api::DEFAULT_MAX_WATCHES_PER_CONNECTION),
};

/// Streams per connection.
pub static ETCD_API_MAX_STREAMS_PER_CONNECTION: Setting = Setting {
    key: "etcd_api.max_streams_per_connection",
    value_name: "N",
    help: "Calls and streams one client connection of the endpoint may have open at once \
           (HTTP/2's concurrent streams)",
    kind: Kind::Count(&etcd_api::STREAMS_RANGE),
    default: DefaultValue::Count(etcd_api::DEFAULT_MAX_STREAMS_PER_CONNECTION),
};

/// How logs are written.
pub static LOG_FORMAT: Setting = Setting {
    key: "log_format",
    value_name: "FORMAT",
    help: "How logs are written",
    kind: Kind::Choice(&["text", "json"]),
    default: DefaultValue::Text("text"),
};

/// The settings that give one value two ways, inline or in a file: a layer that gives either
/// replaces both of a lower layer's (a token file in the environment overrides a token in the
/// configuration file).
pub(crate) static SECRET_TWINS: [(&Setting, &Setting); 2] = [
    (&ETCD_PASSWORD, &ETCD_PASSWORD_FILE),
    (&ADMIN_TOKEN, &ADMIN_TOKEN_FILE),
];

/// Every setting, in the order `run --help` and the README list them.
pub static ALL: [&Setting; 43] = [
    &LISTEN,
    &ETCD_ENDPOINTS,
    &ETCD_USER,
    &ETCD_PASSWORD,
    &ETCD_PASSWORD_FILE,
    &ETCD_CA,
    &ETCD_CERT,
    &ETCD_KEY,
    &ETCD_PREFIX,
    &ETCD_REQUEST_TIMEOUT,
    &ETCD_LEASE_TTL,
    &POLICY_FILE,
    &POLICY_CONFIG,
    &POLICY_MAX_SIZE,
    &POLICY_COMPILE_CPU_TIME,
    &POLICY_COMPILE_MEMORY,
    &POLICY_LATENCY_BUDGET,
    &POLICY_MEMORY,
    &POLICY_ROLLBACK_FAILURES,
    &POLICY_ROLLBACK_WINDOW,
    &POLICY_RECORD_RING,
    &POLICY_RECORD_FILE,
    &POLICY_RECORD_FILE_SIZE,
    &POLICY_SHADOW_ONE_IN,
    &POLICY_LIMITS_MIN_RETRY_INTERVAL,
    &POLICY_LIMITS_MAX_REGISTRY_BUDGET,
    &POLICY_LIMITS_MAX_SUSPECT_HOLD,
    &POLICY_LIMITS_MAX_WAIT,
    &ADMIN_TOKEN,
    &ADMIN_TOKEN_FILE,
    &STATE_DIR,
    &SNAPSHOT_INTERVAL,
    &HTTP_HEADER_READ_TIMEOUT,
    &HTTP_IDLE_TIMEOUT,
    &HTTP_WRITE_TIMEOUT,
    &HTTP_MAX_CONNECTIONS,
    &ETCD_API_LISTEN,
    &ETCD_API_CREDENTIAL_TTL,
    &ETCD_API_MAX_CONNECTIONS,
    &ETCD_API_MAX_LEASES_PER_CONNECTION,
    &ETCD_API_MAX_WATCHES_PER_CONNECTION,
    &ETCD_API_MAX_STREAMS_PER_CONNECTION,
    &LOG_FORMAT,
];

/// The setting with this key.
pub(crate) fn find(key: &str) -> Option<&'static Setting> {
    ALL.iter().copied().find(|setting| setting.key == key)
}

/// The command-line flag of a key, e.g. `--etcd-lease-ttl`.
pub fn flag(key: &str) -> String {
    format!("--{}", key.replace(['.', '_'], "-"))
}

/// The environment variable of a key, e.g. `REGCACHE_ETCD_LEASE_TTL`.
pub fn env(key: &str) -> String {
    format!("REGCACHE_{}", key.replace(['.', '-'], "_").to_uppercase())
}

/// A duration as the configuration writes it in messages and help (`100ms`, `300s`).
pub(crate) fn show(duration: Duration) -> String {
    if duration.is_zero() {
        // `Duration`'s own `0ns` would be the only nanoseconds the configuration ever shows.
        return "0s".into();
    }
    format!("{duration:?}")
}

/// The binary units of sizes, largest first.
pub(crate) const SIZE_UNITS: [(&str, u64); 3] =
    [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];

/// A size as the configuration writes it: in the largest unit that divides it (`32MiB`), or
/// in bytes.
pub(crate) fn show_size(bytes: u64) -> String {
    SIZE_UNITS
        .iter()
        .find(|(_, unit)| bytes != 0 && bytes.is_multiple_of(*unit))
        .map_or_else(
            || format!("{bytes} bytes"),
            |(name, unit)| format!("{}{name}", bytes / unit),
        )
}

impl Setting {
    /// The top-level `[section]` of the TOML file the setting is in, if any (`policy` for
    /// `policy.limits.max_wait` too).
    pub fn section(&self) -> Option<&'static str> {
        self.key.split_once('.').map(|(section, _)| section)
    }

    /// The command-line flag, e.g. `--etcd-lease-ttl`.
    pub fn flag(&self) -> String {
        flag(self.key)
    }

    /// The environment variable, e.g. `REGCACHE_ETCD_LEASE_TTL`.
    pub fn env(&self) -> String {
        env(self.key)
    }

    /// What the setting does and what it takes (the kind's notation and range).
    pub fn describe(&self) -> String {
        let mut text = self.help.to_string();
        match &self.kind {
            Kind::Text | Kind::Address | Kind::Path | Kind::Secret | Kind::SecretFile => {}
            Kind::Choice(choices) => {
                let _ = write!(text, ": {}", choices.join(" or "));
            }
            Kind::Duration(range)
            | Kind::EtcdDuration {
                range,
                whole_seconds: false,
            } => {
                let _ = write!(text, "; {}", range_text(range));
            }
            Kind::EtcdDuration {
                range,
                whole_seconds: true,
            } => {
                let _ = write!(text, "; whole seconds, {}", range_text(range));
            }
            Kind::Count(range) => {
                let _ = write!(text, "; {} to {}", range.start(), range.end());
            }
            Kind::Size(range) => {
                let _ = write!(text, "; {}", size_range_text(range));
            }
            Kind::List => text.push_str("; comma-separated"),
            Kind::Pairs => text.push_str(
                "; repeatable (comma-separated in the environment), replacing the file's whole \
                 table",
            ),
        }
        text
    }

    /// What applies when the setting is not set, as the help and the README state it.
    pub fn default_text(&self) -> String {
        match &self.default {
            DefaultValue::Text(text) => (*text).to_string(),
            DefaultValue::Duration(duration) => show(*duration),
            DefaultValue::Count(count) => count.to_string(),
            DefaultValue::Size(bytes) => show_size(*bytes),
            DefaultValue::None => "none".to_string(),
            DefaultValue::NoneMeans(meaning) => format!("none: {meaning}"),
            DefaultValue::Derived(describe) => describe(),
        }
    }

    /// The line of `run --help`: the TOML key, what it does, its default.
    pub fn help_line(&self) -> String {
        format!(
            "[{}] {} [default: {}]",
            self.key,
            self.describe(),
            self.default_text()
        )
    }
}

fn range_text(range: &RangeInclusive<Duration>) -> String {
    format!("{} to {}", show(*range.start()), show(*range.end()))
}

fn size_range_text(range: &RangeInclusive<u64>) -> String {
    format!(
        "{} to {}",
        show_size(*range.start()),
        show_size(*range.end())
    )
}

/// A size range as validation messages state it.
pub(crate) fn size_between(range: &RangeInclusive<u64>) -> String {
    format!(
        "between {} and {}",
        show_size(*range.start()),
        show_size(*range.end())
    )
}

/// A duration range as validation messages state it.
pub(crate) fn between(range: &RangeInclusive<Duration>) -> String {
    format!(
        "between {} and {}",
        show(*range.start()),
        show(*range.end())
    )
}

/// The README's table of settings (Markdown), rendered from [`ALL`].
#[cfg(test)]
pub(crate) fn markdown_table() -> String {
    let mut table =
        String::from("| Setting | Flag / variable | Default | What it does |\n|---|---|---|---|\n");
    for setting in ALL {
        let _ = writeln!(
            table,
            "| `{}` | `{}` `{}` | {} | {} |",
            setting.key,
            setting.flag(),
            setting.env(),
            setting.default_text(),
            setting.describe()
        );
    }
    table
}
