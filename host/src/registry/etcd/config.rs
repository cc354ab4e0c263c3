//! Configuration of the etcd registry: endpoints, credentials, TLS files, prefix, timeouts.
//!
//! Validation here does no I/O (no file is read, no socket opened): a bad configuration fails
//! before anything runs, and [`EtcdRegistry::connect`](super::EtcdRegistry::connect) is the
//! separate step that reads the TLS files and dials etcd.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

/// etcd refuses HTTP/2 pings more frequent than its `--grpc-keepalive-min-time` (5 s by
/// default) and answers them with GOAWAY, which kills every stream on the connection, idle
/// watches first. Below this, keep-alive would do more harm than good.
pub const MIN_HTTP2_KEEPALIVE: Duration = Duration::from_secs(5);

/// The key prefix by default: go-micro's.
pub const DEFAULT_PREFIX: &str = "/micro/registry/";

/// The request timeout by default: far above a healthy etcd's milliseconds, and
/// short enough that a lookup waiting on a refresh from a dead etcd gives up while its caller
/// still waits.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The lease TTL by default: renewed every third of it, two renewals can be lost before it
/// expires, and a host that dies leaves its nodes listed for at most this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// Accepted request timeouts (connecting is bounded by the request timeout too). Below 100 ms an attempt's own floor (a third of the
/// request timeout, at least 100 ms) would outlast the whole request; beyond 5 minutes a caller
/// (and every lookup that waits on a refresh) would be left hanging on a dead etcd for longer
/// than any operator means.
pub const REQUEST_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(300);

/// Accepted lease TTLs. etcd counts in whole seconds; beyond an hour a host that dies leaves its
/// services registered (and looked up, and called) for longer than any operator means.
pub const LEASE_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// A setting of [`EtcdConfig`], as its builder names it: which one a [`ConfigError`] concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// The endpoints ([`EtcdConfig::new`]).
    Endpoints,
    /// [`EtcdConfig::user`].
    User,
    /// [`EtcdConfig::tls_client`].
    TlsClient,
    /// [`EtcdConfig::prefix`].
    Prefix,
    /// [`EtcdConfig::request_timeout`].
    RequestTimeout,
    /// [`EtcdConfig::lease_ttl`].
    LeaseTtl,
    /// [`EtcdConfig::keep_alive_interval`].
    KeepAliveInterval,
    /// [`EtcdConfig::http2_keepalive`].
    Http2Keepalive,
    /// [`EtcdConfig::retry_backoff_max`].
    RetryBackoffMax,
    /// [`EtcdConfig::endpoint_probe_interval`].
    EndpointProbeInterval,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setting::Endpoints => "endpoints",
            Setting::User => "user",
            Setting::TlsClient => "tls_client",
            Setting::Prefix => "prefix",
            Setting::RequestTimeout => "request_timeout",
            Setting::LeaseTtl => "lease_ttl",
            Setting::KeepAliveInterval => "keep_alive_interval",
            Setting::Http2Keepalive => "http2_keepalive",
            Setting::RetryBackoffMax => "retry_backoff_max",
            Setting::EndpointProbeInterval => "endpoint_probe_interval",
        })
    }
}

/// Why a configuration was refused. [`ConfigError::setting`] says which setting it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No endpoint was given.
    #[error("at least one etcd endpoint is required")]
    NoEndpoints,
    /// An endpoint is not `host:port`, `http://host:port` or `https://host:port` with a port
    /// from 1 to 65535.
    #[error(
        "endpoint `{0}` is not host:port (port 1 to 65535) with an optional http:// or https:// \
         scheme"
    )]
    BadEndpoint(String),
    /// An `http://` endpoint was given while TLS is configured (or `https://` without TLS).
    #[error("endpoint `{endpoint}` does not match the TLS setting (TLS {tls})")]
    SchemeMismatch {
        /// The endpoint as given.
        endpoint: String,
        /// Whether TLS is configured.
        tls: &'static str,
    },
    /// The key prefix is empty or does not end with `/`.
    #[error("prefix `{0}` must be non-empty and end with `/`")]
    BadPrefix(String),
    /// A duration setting is out of range.
    #[error("{setting} {message}")]
    BadDuration {
        /// The setting.
        setting: Setting,
        /// What is wrong with it.
        message: String,
    },
    /// A user name was given with an empty password or the reverse.
    #[error("user and password go together, and the user name cannot be empty")]
    BadCredentials,
    /// Only one of the client certificate and key was given.
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfClientIdentity,
}

impl ConfigError {
    /// The setting the refusal concerns.
    pub fn setting(&self) -> Setting {
        match self {
            ConfigError::NoEndpoints
            | ConfigError::BadEndpoint(_)
            | ConfigError::SchemeMismatch { .. } => Setting::Endpoints,
            ConfigError::BadPrefix(_) => Setting::Prefix,
            ConfigError::BadDuration { setting, .. } => *setting,
            ConfigError::BadCredentials => Setting::User,
            ConfigError::HalfClientIdentity => Setting::TlsClient,
        }
    }
}

/// TLS files for the connection to etcd (read at connect time, not at validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// The CA that signed etcd's server certificate (PEM).
    pub ca: PathBuf,
    /// A client certificate and its key (PEM), for etcd's `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// How to reach etcd and how to keep registrations alive there. Build it with
/// [`EtcdConfig::new`] and the setters (each states its default), then hand it to
/// [`EtcdRegistry::connect`](super::EtcdRegistry::connect), which validates it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    pub(crate) endpoints: Vec<String>,
    pub(crate) user: Option<(String, String)>,
    pub(crate) tls: Option<TlsPaths>,
    pub(crate) prefix: String,
    pub(crate) request_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) http2_keepalive_interval: Duration,
    pub(crate) http2_keepalive_timeout: Duration,
    pub(crate) retry_backoff_max: Duration,
    pub(crate) endpoint_probe_interval: Duration,
    pub(crate) state_dir: Option<PathBuf>,
}

impl EtcdConfig {
    /// A configuration for these endpoints (`host:port`, or URLs with `http://`/`https://`),
    /// with every other setting at its default.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            user: None,
            tls: None,
            prefix: DEFAULT_PREFIX.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            lease_ttl: DEFAULT_LEASE_TTL,
            keep_alive_interval: None,
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(5),
            retry_backoff_max: Duration::from_millis(500),
            endpoint_probe_interval: Duration::from_secs(2),
            state_dir: None,
        }
    }

    /// Authenticates as `user`. Default: no authentication.
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Speaks TLS to etcd, trusting `ca`. Default: plain HTTP/2.
    pub fn tls_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        let client = self.tls.take().and_then(|t| t.client);
        self.tls = Some(TlsPaths {
            ca: ca.into(),
            client,
        });
        self
    }

    /// Presents this client certificate and key (needs [`tls_ca`](Self::tls_ca)). Default:
    /// none.
    pub fn tls_client(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        let ca = self.tls.take().map(|t| t.ca).unwrap_or_default();
        self.tls = Some(TlsPaths {
            ca,
            client: Some((cert.into(), key.into())),
        });
        self
    }

    /// Keeps the registry's own state in `dir`: the leases this host granted, so that after a
    /// crash it re-registers the nodes its previous lease still holds instead of meeting them
    /// as another host's (see the `ownership` module). Default none: a restarted host gets a
    /// conflict for those nodes until the previous lease expires (one lease TTL).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The key prefix. Default `/micro/registry/`, go-micro's.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bound on every registry call, retries included: no call waits longer, even on a hung
    /// etcd; connecting is bounded by it too. Default [`DEFAULT_REQUEST_TIMEOUT`], within
    /// [`REQUEST_TIMEOUT_RANGE`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// TTL of this host's lease, in whole seconds (etcd's unit). Default [`DEFAULT_LEASE_TTL`],
    /// within [`LEASE_TTL_RANGE`].
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often the lease is renewed on its stream. Default: a third of the TTL, the etcd
    /// client's own habit, so two renewals may be lost before the lease expires.
    pub fn keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive_interval = Some(interval);
        self
    }

    /// HTTP/2 ping interval and ack timeout, which is how a stream to a hung (SIGSTOPped) etcd
    /// ends instead of waiting forever. Default 10 s and 5 s; the interval must be at least
    /// [`MIN_HTTP2_KEEPALIVE`].
    pub fn http2_keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.http2_keepalive_interval = interval;
        self.http2_keepalive_timeout = timeout;
        self
    }

    /// Cap of the jittered exponential backoff between background retries (lease re-grant,
    /// watch re-creation). It also bounds how long after etcd answers again keys come back.
    /// Default 500 ms.
    pub fn retry_backoff_max(mut self, max: Duration) -> Self {
        self.retry_backoff_max = max;
        self
    }

    /// How often each endpoint is probed with a maintenance `Status` request without
    /// credentials. A member that misses two probes in a row (no answer within 1 s) leaves the
    /// client's balancer, and comes back once it answers again. Only used with several
    /// endpoints. Default 2 s: quick enough that few calls meet a dead member; at 4,000 hosts
    /// that is 2,000 `Status` requests a second per member, each answered from its memory
    /// without raft or disk.
    pub fn endpoint_probe_interval(mut self, interval: Duration) -> Self {
        self.endpoint_probe_interval = interval;
        self
    }

    /// Checks the configuration without any I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        for endpoint in &self.endpoints {
            self.endpoint_url(endpoint)?;
        }
        if self.prefix.is_empty() || !self.prefix.ends_with('/') {
            return Err(ConfigError::BadPrefix(self.prefix.clone()));
        }
        if let Some((user, _)) = &self.user
            && user.is_empty()
        {
            return Err(ConfigError::BadCredentials);
        }
        if let Some(tls) = &self.tls
            && tls.ca.as_os_str().is_empty()
        {
            return Err(ConfigError::HalfClientIdentity);
        }
        let positive = |setting: Setting, d: Duration| {
            if d.is_zero() {
                Err(ConfigError::BadDuration {
                    setting,
                    message: "must be positive".into(),
                })
            } else {
                Ok(())
            }
        };
        if !REQUEST_TIMEOUT_RANGE.contains(&self.request_timeout) {
            return Err(ConfigError::BadDuration {
                setting: Setting::RequestTimeout,
                message: format!(
                    "must be between {:?} and {:?}",
                    REQUEST_TIMEOUT_RANGE.start(),
                    REQUEST_TIMEOUT_RANGE.end()
                ),
            });
        }
        positive(Setting::RetryBackoffMax, self.retry_backoff_max)?;
        positive(Setting::EndpointProbeInterval, self.endpoint_probe_interval)?;
        positive(Setting::Http2Keepalive, self.http2_keepalive_timeout)?;
        if !LEASE_TTL_RANGE.contains(&self.lease_ttl) || self.lease_ttl.subsec_nanos() != 0 {
            return Err(ConfigError::BadDuration {
                setting: Setting::LeaseTtl,
                message: format!(
                    "must be a whole number of seconds, at least 1 and at most {}",
                    LEASE_TTL_RANGE.end().as_secs()
                ),
            });
        }
        let interval = self.effective_keep_alive_interval();
        if interval.is_zero() || interval >= self.lease_ttl {
            return Err(ConfigError::BadDuration {
                setting: Setting::KeepAliveInterval,
                message: format!(
                    "must be positive and below the lease TTL ({:?})",
                    self.lease_ttl
                ),
            });
        }
        if self.http2_keepalive_interval < MIN_HTTP2_KEEPALIVE {
            return Err(ConfigError::BadDuration {
                setting: Setting::Http2Keepalive,
                message: format!(
                    "must be at least {MIN_HTTP2_KEEPALIVE:?}: etcd answers faster pings with GOAWAY"
                ),
            });
        }
        Ok(())
    }

    /// The endpoint as a URL with the scheme the TLS setting implies. The client's balancer
    /// identifies endpoints by URL, so removing and re-adding one needs this exact form.
    pub(crate) fn endpoint_url(&self, endpoint: &str) -> Result<String, ConfigError> {
        let tls = self.tls.is_some();
        let (scheme, rest) = match endpoint.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
            Some(_) => return Err(ConfigError::BadEndpoint(endpoint.into())),
            None => (if tls { "https" } else { "http" }, endpoint),
        };
        if (scheme == "https") != tls {
            return Err(ConfigError::SchemeMismatch {
                endpoint: endpoint.into(),
                tls: if tls { "on" } else { "off" },
            });
        }
        let rest = rest.trim_end_matches('/');
        match rest.rsplit_once(':') {
            // Port 0 means "any port" to a listener, and nothing to a client: it cannot be dialled.
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
                Ok(format!("{scheme}://{rest}"))
            }
            _ => Err(ConfigError::BadEndpoint(endpoint.into())),
        }
    }

    /// Endpoint URLs, normalised.
    pub(crate) fn endpoint_urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| self.endpoint_url(e).expect("validated"))
            .collect()
    }

    /// The configured endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The keep-alive interval in effect: the one set, or a third of the TTL.
    pub fn effective_keep_alive_interval(&self) -> Duration {
        self.keep_alive_interval.unwrap_or(self.lease_ttl / 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_follow_go_micro() {
        let config = EtcdConfig::new(["127.0.0.1:2379"]);
        config.validate().unwrap();
        assert_eq!(config.key_prefix(), "/micro/registry/");
        assert_eq!(
            config.effective_keep_alive_interval(),
            Duration::from_secs(5)
        );
        assert_eq!(
            config.endpoint_urls(),
            vec!["http://127.0.0.1:2379".to_string()]
        );
    }

    #[test]
    fn refuses_bad_settings_without_io() {
        let base = || EtcdConfig::new(["127.0.0.1:2379"]);
        let cases = [
            (EtcdConfig::new(Vec::<String>::new()), "at least one"),
            (EtcdConfig::new(["nope"]), "not host:port"),
            (EtcdConfig::new(["ftp://a:1"]), "not host:port"),
            (EtcdConfig::new(["127.0.0.1:0"]), "port 1 to 65535"),
            (EtcdConfig::new(["http://a:0/"]), "port 1 to 65535"),
            (EtcdConfig::new(["a:65536"]), "port 1 to 65535"),
            (EtcdConfig::new(["https://a:1"]), "TLS off"),
            (EtcdConfig::new(["http://a:1"]).tls_ca("/ca.pem"), "TLS on"),
            (base().prefix("/micro"), "end with `/`"),
            (
                base().lease_ttl(Duration::from_millis(1500)),
                "whole number",
            ),
            (
                base().keep_alive_interval(Duration::from_secs(15)),
                "below the lease TTL",
            ),
            (
                base().http2_keepalive(Duration::from_secs(1), Duration::from_secs(1)),
                "GOAWAY",
            ),
            (
                base().request_timeout(Duration::ZERO),
                "between 100ms and 300s",
            ),
            (
                base().request_timeout(Duration::from_millis(99)),
                "between 100ms and 300s",
            ),
            (
                base().request_timeout(Duration::from_secs(301)),
                "between 100ms and 300s",
            ),
            (base().lease_ttl(Duration::from_secs(3601)), "at most 3600"),
            (base().lease_ttl(Duration::ZERO), "at least 1"),
            (base().retry_backoff_max(Duration::ZERO), "positive"),
            (base().user("", "x"), "user name"),
            (base().tls_client("/c.pem", "/k.pem"), "certificate needs"),
        ];
        for (config, want) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{config:?}: {err}");
        }
    }

    #[test]
    fn accepts_the_bounds_of_every_range() {
        let base = || EtcdConfig::new(["127.0.0.1:1", "[::1]:65535"]);
        for timeout in [*REQUEST_TIMEOUT_RANGE.start(), *REQUEST_TIMEOUT_RANGE.end()] {
            base().request_timeout(timeout).validate().unwrap();
        }
        for ttl in [*LEASE_TTL_RANGE.start(), *LEASE_TTL_RANGE.end()] {
            base().lease_ttl(ttl).validate().unwrap();
        }
    }

    #[test]
    fn tls_switches_bare_endpoints_to_https() {
        let config = EtcdConfig::new(["127.0.0.1:2379"]).tls_ca("/ca.pem");
        config.validate().unwrap();
        assert_eq!(
            config.endpoint_urls(),
            vec!["https://127.0.0.1:2379".to_string()]
        );
    }
}
