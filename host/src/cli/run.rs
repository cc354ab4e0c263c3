//! `regcache run`: the host. This module only turns flags and `REGCACHE_*` variables into a
//! configuration layer over the TOML file and hands it to [`regcache::daemon`].

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use regcache::config::{ConfigError, ConfigLayer, EtcdLayer, HttpLayer, PolicyLayer};
use regcache::fsutil::read_regular;
use regcache::http;

/// Largest configuration file read: a few hundred lines make a generous one.
const MAX_CONFIG_FILE: u64 = 1024 * 1024;

/// Arguments of `regcache run`. Every option can also come from the TOML file given with
/// `--config` (flags and environment win), under the name in brackets.
#[derive(Debug, clap::Args)]
#[command(
    about = "Run the host: serve lookups and registrations over HTTP, backed by etcd",
    after_help = "With no etcd endpoint the host runs on an embedded in-memory registry. \
                  SIGHUP reloads the policy file; SIGTERM/SIGINT drain requests, revoke the \
                  lease, write the snapshot and exit."
)]
pub struct RunArgs {
    /// TOML configuration file; flags and REGCACHE_* variables override its fields.
    #[arg(long, env = "REGCACHE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// [listen] Address of the HTTP API (port 0 picks a free one, logged) [default: 127.0.0.1:7070]
    #[arg(long, env = "REGCACHE_LISTEN", value_name = "ADDR")]
    listen: Option<String>,

    /// [etcd.endpoints] etcd endpoints, host:port or http(s)://host:port (port 1 to 65535),
    /// comma-separated [default: none: an embedded in-memory registry]
    #[arg(
        long,
        env = "REGCACHE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "ENDPOINTS"
    )]
    etcd_endpoints: Vec<String>,

    /// [etcd.user] etcd user name (authentication off by default)
    #[arg(long, env = "REGCACHE_ETCD_USER", value_name = "USER")]
    etcd_user: Option<String>,

    /// [etcd.password] etcd password (prefer the environment or a file over a flag)
    #[arg(
        long,
        env = "REGCACHE_ETCD_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    etcd_password: Option<String>,

    /// [etcd.password_file] File holding the etcd password
    #[arg(long, env = "REGCACHE_ETCD_PASSWORD_FILE", value_name = "FILE")]
    etcd_password_file: Option<PathBuf>,

    /// [etcd.ca] CA of etcd's server certificate (PEM); turns TLS on. The TLS files are read
    /// and parsed at start: one that is not PEM, holds no certificate, or a key that is not the
    /// certificate's stops the start
    #[arg(long, env = "REGCACHE_ETCD_CA", value_name = "FILE")]
    etcd_ca: Option<PathBuf>,

    /// [etcd.cert] Client certificate for etcd (PEM)
    #[arg(long, env = "REGCACHE_ETCD_CERT", value_name = "FILE")]
    etcd_cert: Option<PathBuf>,

    /// [etcd.key] Key of the client certificate (PEM)
    #[arg(long, env = "REGCACHE_ETCD_KEY", value_name = "FILE")]
    etcd_key: Option<PathBuf>,

    /// [etcd.prefix] Key prefix of the registry [default: /micro/registry/]
    #[arg(long, env = "REGCACHE_ETCD_PREFIX", value_name = "PREFIX")]
    etcd_prefix: Option<String>,

    /// [etcd.request_timeout] Bound of every etcd call, e.g. 5s or 500ms; 100ms to 5m
    /// [default: 5s]
    #[arg(long, env = "REGCACHE_ETCD_REQUEST_TIMEOUT", value_name = "DURATION")]
    etcd_request_timeout: Option<String>,

    /// [etcd.lease_ttl] TTL of the host's lease, whole seconds, 1s to 1h [default: 15s]
    #[arg(long, env = "REGCACHE_ETCD_LEASE_TTL", value_name = "DURATION")]
    etcd_lease_ttl: Option<String>,

    /// [policy.file] Policy component to load and watch [default: the embedded default policy]
    #[arg(long, env = "REGCACHE_POLICY_FILE", value_name = "FILE")]
    policy_file: Option<PathBuf>,

    /// [policy.config] Policy configuration, KEY=VALUE, repeatable (comma-separated in the
    /// environment); replaces the file's whole table
    #[arg(
        long,
        env = "REGCACHE_POLICY_CONFIG",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    policy_config: Vec<String>,

    /// [admin_token] Bearer token of the admin endpoints (PUT /v1/policy); without one they
    /// are disabled
    #[arg(
        long,
        env = "REGCACHE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,

    /// [admin_token_file] File holding the admin token
    #[arg(long, env = "REGCACHE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// [state_dir] Directory for the cache snapshot and precompiled policies (created if
    /// missing). If it cannot be written the host warns and runs without them (a snapshot
    /// there is still read) [default: none]
    #[arg(long, env = "REGCACHE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// [snapshot_interval] How often the snapshot is written, 100ms to 1h [default: 30s]
    #[arg(long, env = "REGCACHE_SNAPSHOT_INTERVAL", value_name = "DURATION")]
    snapshot_interval: Option<String>,

    // The [http] options' help states ranges and defaults from the constants that define them.
    #[arg(
        long,
        env = "REGCACHE_HTTP_HEADER_READ_TIMEOUT",
        value_name = "DURATION",
        help = duration_help(
            "[http.header_read_timeout] Time a client has to send a request head (and again \
             its body); a silent or dripping connection is closed after it",
            &http::HEADER_READ_TIMEOUT_RANGE,
            http::DEFAULT_HEADER_READ_TIMEOUT,
        )
    )]
    http_header_read_timeout: Option<String>,

    #[arg(
        long,
        env = "REGCACHE_HTTP_IDLE_TIMEOUT",
        value_name = "DURATION",
        help = duration_help(
            "[http.idle_timeout] Time a kept-alive connection may wait for its next request",
            &http::IDLE_TIMEOUT_RANGE,
            http::DEFAULT_IDLE_TIMEOUT,
        )
    )]
    http_idle_timeout: Option<String>,

    #[arg(
        long,
        env = "REGCACHE_HTTP_WRITE_TIMEOUT",
        value_name = "DURATION",
        help = duration_help(
            "[http.write_timeout] Time the host waits for a client to read any of its answer \
             (or of answers to requests it pipelined); the connection is closed after it",
            &http::WRITE_TIMEOUT_RANGE,
            http::DEFAULT_WRITE_TIMEOUT,
        )
    )]
    http_write_timeout: Option<String>,

    #[arg(
        long,
        env = "REGCACHE_HTTP_MAX_CONNECTIONS",
        value_name = "N",
        help = format!(
            "[http.max_connections] Connections open at once; at the limit a new one replaces \
             one with no request in flight or an answer left unread [default: RLIMIT_NOFILE \
             less {}, at most {}]",
            http::RESERVED_DESCRIPTORS,
            http::DEFAULT_MAX_CONNECTIONS_CAP,
        )
    )]
    http_max_connections: Option<u64>,

    /// [log_format] text or json [default: text]
    #[arg(long, env = "REGCACHE_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<String>,
}

impl RunArgs {
    /// The flags and environment as a configuration layer.
    fn layer(self) -> Result<ConfigLayer, ConfigError> {
        let policy_config = if self.policy_config.is_empty() {
            None
        } else {
            let mut table = std::collections::BTreeMap::new();
            for pair in &self.policy_config {
                let Some((key, value)) = pair.split_once('=') else {
                    return Err(ConfigError {
                        field: "policy.config".into(),
                        message: format!("`{pair}` is not KEY=VALUE"),
                    });
                };
                table.insert(
                    key.trim().to_string(),
                    regcache::config::ConfigValue::Text(value.trim().to_string()),
                );
            }
            Some(table)
        };
        Ok(ConfigLayer {
            listen: self.listen,
            state_dir: self.state_dir,
            log_format: self.log_format,
            admin_token: self.admin_token,
            admin_token_file: self.admin_token_file,
            snapshot_interval: self.snapshot_interval,
            etcd: EtcdLayer {
                endpoints: (!self.etcd_endpoints.is_empty()).then_some(self.etcd_endpoints),
                user: self.etcd_user,
                password: self.etcd_password,
                password_file: self.etcd_password_file,
                ca: self.etcd_ca,
                cert: self.etcd_cert,
                key: self.etcd_key,
                prefix: self.etcd_prefix,
                request_timeout: self.etcd_request_timeout,
                lease_ttl: self.etcd_lease_ttl,
            },
            policy: PolicyLayer {
                file: self.policy_file,
                config: policy_config,
            },
            http: HttpLayer {
                header_read_timeout: self.http_header_read_timeout,
                idle_timeout: self.http_idle_timeout,
                write_timeout: self.http_write_timeout,
                max_connections: self.http_max_connections,
            },
        })
    }
}

/// The help of a duration option: what it is, its accepted range and its default, in the
/// notation the configuration accepts and reports errors in.
fn duration_help(what: &str, range: &RangeInclusive<Duration>, default: Duration) -> String {
    format!(
        "{what}; {:?} to {:?} [default: {default:?}]",
        range.start(),
        range.end()
    )
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => {
            let bytes = read_regular(path, MAX_CONFIG_FILE).with_context(|| {
                format!("cannot read the configuration file {}", path.display())
            })?;
            let text = String::from_utf8(bytes).with_context(|| {
                format!(
                    "the configuration file {} is not UTF-8 text",
                    path.display()
                )
            })?;
            ConfigLayer::parse_toml(&text, &path.display().to_string())?
        }
        None => ConfigLayer::default(),
    };
    let config = args.layer()?.over(file).validate()?;
    regcache::daemon::run(config)?;
    Ok(ExitCode::SUCCESS)
}
