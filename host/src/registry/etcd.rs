//! The etcd registry: go-micro's key layout on etcd, kept alive through every etcd fault.
//!
//! This is the only code in regcache that speaks etcd. It owns one client (all endpoints, one
//! auth token shared by every call and stream), and background tasks:
//!
//! - [`lease`]: one lease per host and one long-lived LeaseKeepAlive stream. On any loss (TTL 0,
//!   "lease not found", the stream ending or falling silent) it re-opens the stream or grants a
//!   new lease and re-puts every owned key, with jittered backoff, forever.
//! - [`watch`]: one prefix watch (with `prev_kv`) that mirrors the registry, fans events out to
//!   every [`Registry::watch`] receiver, resumes from the last revision after a loss, re-lists
//!   and sends [`WatchEvent::Resync`] after a compaction, feeds [`Registry::health`], and asks
//!   the lease task to re-put an owned key it sees deleted or changed by someone else. A small timer task resyncs
//!   receivers that fell behind even when no further event comes.
//! - [`ownership`]: which leases are this host's (remembered in the state dir across restarts)
//!   and the transactions that write an owned key only while no other host's lease holds it,
//!   so that a registration never takes over another host's node (unless forced) and a re-put
//!   yields to one that did.
//! - [`endpoints`]: with several endpoints, takes a member that stopped answering (killed or
//!   hung) out of the client's balancer (else about a third of calls keep failing or waiting)
//!   and puts it back once it answers again.
//!
//! Every unary call is bounded by the configured request timeout, retries included, so a hung
//! etcd (SIGSTOP) never hangs a caller; transient failures (a dead member, "leader changed")
//! are retried on the balancer's next pick within that bound. Expired auth tokens are refreshed
//! by the client for unary calls; a watch cancelled for an invalid token is re-created here.
//!
//! ```no_run
//! # async fn demo(service: regcache::model::Service) -> Result<(), regcache::registry::RegistryError> {
//! use std::time::Duration;
//! use regcache::registry::Registry;
//! use regcache::registry::etcd::{EtcdConfig, EtcdRegistry};
//!
//! let config = EtcdConfig::new(["127.0.0.1:2379"])
//!     .user("regcache", "secret")
//!     .lease_ttl(Duration::from_secs(15)); // renewed every 5 s on one stream
//! let registry = EtcdRegistry::connect(config).await?; // validates, then dials
//! registry.register(&service).await?; // kept registered through outages from now on
//! let mut events = registry.watch(); // a Resync of everything first, then changes
//! # let _ = events.recv().await;
//! registry.shutdown().await; // revokes the lease: the keys go at once
//! # Ok(()) }
//! ```
//!
//! Architecture invariant: this module knows nothing about the cache, the policy or HTTP.

mod config;
mod endpoints;
mod lease;
mod ownership;
mod stats;
mod tls;
mod watch;

pub use config::{
    ConfigError, DEFAULT_LEASE_TTL, DEFAULT_PREFIX, DEFAULT_REQUEST_TIMEOUT, EtcdConfig,
    LEASE_TTL_RANGE, MIN_HTTP2_KEEPALIVE, REQUEST_TIMEOUT_RANGE, TlsPaths,
};
pub use stats::StatsSnapshot;
pub use tls::{TlsFile, TlsFileError, TlsProblem};

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::sync::{mpsc, watch as signal};
use tokio::task::JoinHandle;

use super::{
    Conflict, ErrorKind, Health, Registered, Registry, RegistryError, Takeover, WatchEvent,
    check_registration,
};
use crate::model::{Service, group_by_version, key_segment};
use ownership::{Foreign, HostLeases, Target};
use stats::Stats;

/// Largest gRPC message the client accepts. A full list of a large registry (thousands of
/// nodes of a few KiB) exceeds tonic's 4 MiB default; pages keep single answers far below this.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Keys per page when listing the whole prefix.
const LIST_PAGE: i64 = 500;

/// A registry on etcd in go-micro's layout. Cheap to share behind an `Arc`; dropping it stops
/// its background tasks (without revoking the lease: call [`Registry::shutdown`] for that).
pub struct EtcdRegistry {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A key this host registered: the single-node service and its encoded value.
#[derive(Debug, Clone)]
pub(crate) struct Owned {
    service: Service,
    value: Vec<u8>,
    /// Until this host first writes the node: what its registration said about someone else
    /// holding it, which still applies then (the registration was answered before its write,
    /// during an outage). `None` once written: the node is this host's, and someone else
    /// taking it is a conflict.
    unwritten: Option<Takeover>,
    /// Someone else's lease that holds the key now (0: a value on no lease): it is not written
    /// back while so.
    conflict: Option<i64>,
    /// Which registration this is, so that what a write found is recorded only on the
    /// registration it wrote, not on one that replaced it meanwhile.
    serial: u64,
}

impl Owned {
    fn new(service: Service, unwritten: Option<Takeover>) -> Owned {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        Owned {
            value: service.encode(),
            service,
            unwritten,
            conflict: None,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Whether this host wrote the node in this run.
    pub(crate) fn is_written(&self) -> bool {
        self.unwritten.is_none()
    }

    /// What a write other than its registration's own answer does about someone else holding
    /// the key: until the node is first written, what the registration asked (a refused one is
    /// yielded, then dropped by [`settle`]); then yield.
    fn foreign(&self) -> Foreign {
        match self.unwritten {
            Some(Takeover::Force) => Foreign::Take,
            _ => Foreign::Yield,
        }
    }
}

/// Which owned keys a write puts.
#[derive(Debug, Clone)]
pub(crate) enum Puts {
    /// A registration's keys, answered now: someone else holding one fails it
    /// ([`Takeover::Refuse`]) or is taken over ([`Takeover::Force`]).
    Registration(Vec<String>, Takeover),
    /// Owned keys to check and put back: the watch saw them changed, or their registration
    /// was answered before they could be written.
    Repair(Vec<String>),
    /// Every owned key (a new lease).
    All,
}

/// The owned keys `puts` writes (every one when `everything`: a new lease holds none), each
/// with what to do about someone else holding it: a registration's own keys as it asked, any
/// other as [`Owned::foreign`] says. Keys no longer owned (deregistered) are left out.
fn targets(owned: &BTreeMap<String, Owned>, puts: &Puts, everything: bool) -> Vec<Target> {
    let (keys, asked): (&[String], _) = match puts {
        Puts::Registration(keys, takeover) => (keys, Some(*takeover)),
        Puts::Repair(keys) => (keys, None),
        Puts::All => (&[], None),
    };
    let keys: BTreeSet<&String> = keys.iter().collect();
    let target = |key: &String, owned: &Owned| Target {
        key: key.clone(),
        owned: owned.clone(),
        foreign: match asked {
            Some(takeover) if keys.contains(key) => Foreign::from(takeover),
            _ => owned.foreign(),
        },
    };
    if everything || matches!(puts, Puts::All) {
        owned.iter().map(|(k, o)| target(k, o)).collect()
    } else {
        keys.iter()
            .filter_map(|k| owned.get(*k).map(|o| target(k, o)))
            .collect()
    }
}

/// What a write found that changes this host's registrations.
#[derive(Debug, Default, PartialEq)]
struct Settled {
    /// Written nodes someone else holds now, with its lease, newly (a conflict is reported
    /// once, when it starts).
    conflicts: Vec<(String, i64)>,
    /// Nodes never written whose registration refused someone else's node: dropped.
    refused: Vec<(String, i64)>,
}

/// Records in `owned` what a write of the `checked` keys (with the serial each was written
/// as) found: the keys not `yielded` hold this host's value on its lease, so they are written
/// and in no conflict; a yielded key is a conflict if its node was written before, and is
/// dropped if it never was (its registration refused someone else's node). A key registered
/// again meanwhile (another serial) is left to that registration's own write.
fn settle(
    owned: &mut BTreeMap<String, Owned>,
    checked: &[(String, u64)],
    yielded: &[(String, i64)],
) -> Settled {
    let yielded: BTreeMap<&str, i64> = yielded.iter().map(|(k, l)| (k.as_str(), *l)).collect();
    let mut settled = Settled::default();
    for (key, serial) in checked {
        let Some(entry) = owned.get_mut(key).filter(|e| e.serial == *serial) else {
            continue;
        };
        match yielded.get(key.as_str()).copied() {
            None => {
                entry.unwritten = None;
                entry.conflict = None;
            }
            Some(owner) if entry.is_written() => {
                if entry.conflict != Some(owner) {
                    settled.conflicts.push((key.clone(), owner));
                }
                entry.conflict = Some(owner);
            }
            Some(owner) => {
                owned.remove(key);
                settled.refused.push((key.clone(), owner));
            }
        }
    }
    settled
}

/// State shared by the registry handle and its background tasks.
pub(crate) struct Shared {
    client: Client,
    config: EtcdConfig,
    stats: Stats,
    /// Keys this host owns, by full etcd key.
    owned: Mutex<BTreeMap<String, Owned>>,
    /// This host's leases, the current one and an earlier run's.
    leases: HostLeases,
    /// The current lease; held across grant and re-put so that one writer at a time decides
    /// which lease the owned keys are on.
    lease: tokio::sync::Mutex<Option<i64>>,
    /// Publishes the current lease id to the keep-alive task.
    lease_id: signal::Sender<Option<i64>>,
    /// Owned keys to check and put back, for the lease task.
    repairs: Mutex<Vec<String>>,
    repair_wake: tokio::sync::Notify,
    hub: Mutex<watch::Hub>,
    watch_connected: AtomicBool,
    last_contact: Mutex<Option<Instant>>,
    last_failure: Mutex<Option<Instant>>,
    /// Signalled when an endpoint is taken out of rotation: streams that may be stuck on it
    /// (keep-alive, watch) re-open on the members still in.
    endpoint_removed: signal::Sender<()>,
    /// Set once by shutdown; every task stops when it flips.
    shutdown: signal::Sender<bool>,
}

impl EtcdRegistry {
    /// Validates `config`, reads its TLS files, connects (authenticating once if a user is
    /// set), lists the prefix and starts the background tasks. Fails if etcd does not answer
    /// within the connect timeout, with the transport's reason (e.g. an unknown CA).
    pub async fn connect(config: EtcdConfig) -> Result<EtcdRegistry, RegistryError> {
        config
            .validate()
            .map_err(|e| RegistryError::new(ErrorKind::InvalidInput, "connect", e.to_string()))?;
        let mut options = connect_options(&config)?;
        if let Some((user, password)) = config.user.as_ref() {
            options = options.with_user(user.clone(), password.clone());
        }
        let urls = config.endpoint_urls();
        let bound = config.connect_timeout;
        let client = tokio::time::timeout(bound, Client::connect(&urls, Some(options)))
            .await
            .map_err(|_| {
                RegistryError::new(
                    ErrorKind::Timeout,
                    "connect",
                    format!("no answer from {urls:?} within {bound:?}"),
                )
            })?
            .map_err(|e| error("connect", &e))?;
        let (lease_id, _) = signal::channel(None);
        let (shutdown, _) = signal::channel(false);
        let leases = HostLeases::load(config.state_dir.as_deref());
        let shared = Arc::new(Shared {
            client,
            config,
            stats: Stats::default(),
            owned: Mutex::new(BTreeMap::new()),
            leases,
            lease: tokio::sync::Mutex::new(None),
            lease_id,
            repairs: Mutex::new(Vec::new()),
            repair_wake: tokio::sync::Notify::new(),
            hub: Mutex::new(watch::Hub::default()),
            watch_connected: AtomicBool::new(false),
            last_contact: Mutex::new(None),
            last_failure: Mutex::new(None),
            endpoint_removed: signal::channel(()).0,
            shutdown,
        });
        // The first list is the first contact: it proves the endpoints, TLS and credentials,
        // and seeds the watch mirror so that the watch starts exactly after it.
        let (kvs, revision) = shared.list_prefix_within("connect", bound).await?;
        let listing = watch::Listing::new(kvs, |k, v| shared.decode(k, v));
        shared.hub.lock().unwrap().reset(listing, revision);
        let mut tasks = vec![
            tokio::spawn(lease::run(shared.clone())),
            // Apart from the lease task, whose keep-alives must not wait behind it.
            tokio::spawn(lease::forget_expired_leases(shared.clone())),
            tokio::spawn(watch::run(shared.clone(), revision)),
            tokio::spawn(watch::flush_lagged(shared.clone())),
        ];
        if shared.config.endpoint_urls().len() > 1 {
            tasks.push(tokio::spawn(endpoints::run(shared.clone())));
        }
        Ok(EtcdRegistry {
            shared,
            tasks: Mutex::new(tasks),
        })
    }

    /// The registry's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The lease this host's keys are on, if one was granted.
    pub fn lease_id(&self) -> Option<i64> {
        *self.shared.lease_id.borrow()
    }

    /// The etcd key of a node, in go-micro's layout.
    pub fn node_key(&self, service: &str, node_id: &str) -> String {
        self.shared.node_key(service, node_id)
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        let _ = self.shared.shutdown.send(true);
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Everything about the connection but the credentials, which only the registry's own client
/// carries (the endpoint probes must not authenticate).
fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, RegistryError> {
    let (ping, ping_timeout) = (
        config.http2_keepalive_interval,
        config.http2_keepalive_timeout,
    );
    let mut options = ConnectOptions::new()
        // A backstop for every request, streams' opening included; `Shared::call` bounds unary
        // calls more tightly, attempt by attempt.
        .with_timeout(config.request_timeout)
        .with_connect_timeout(config.connect_timeout)
        // Without pings a stream to a hung etcd never ends. Idle pings stay off: etcd does not
        // permit pings without streams (GOAWAY), and unary calls have their own timeout.
        .with_keep_alive(ping, ping_timeout)
        .with_keep_alive_while_idle(false)
        // Unary calls that meet an expired token re-authenticate once and retry; concurrent
        // ones share a single Authenticate.
        .with_auto_token_refresh(true);
    if let Some(tls) = config.tls.as_ref() {
        let files = tls
            .load()
            .map_err(|e| RegistryError::new(ErrorKind::InvalidInput, "connect", e.to_string()))?;
        let mut tls_options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(files.ca));
        if let Some((cert, key)) = files.client {
            tls_options = tls_options.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls_options);
    }
    Ok(options)
}

/// Maps a client error to the registry's kinds, keeping the transport's full reason: tonic
/// hides the interesting part ("invalid peer certificate: UnknownIssuer") in source errors.
pub(crate) fn error(op: &'static str, e: &etcd_client::Error) -> RegistryError {
    use etcd_client::Error as E;
    use tonic::Code;
    let mut message = e.to_string();
    let mut source: Option<&dyn std::error::Error> = match e {
        E::TransportError(t) => std::error::Error::source(t),
        E::GRpcStatus(s) => std::error::Error::source(s),
        E::IoError(io) => std::error::Error::source(io),
        _ => None,
    };
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    let kind = match e {
        E::GRpcStatus(status) => match status.code() {
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::Cancelled if status.message().contains("Timeout expired") => ErrorKind::Timeout,
            Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Unauthenticated,
            Code::InvalidArgument | Code::ResourceExhausted | Code::FailedPrecondition => {
                ErrorKind::InvalidInput
            }
            Code::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Unavailable,
        },
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) => {
            ErrorKind::InvalidInput
        }
        // The client's answer to a keep-alive opened on a lease etcd no longer has (TTL 0);
        // its only other use, a send on a channel it has just created, cannot fail.
        E::LeaseKeepAliveError(_) => ErrorKind::NotFound,
        _ => ErrorKind::Unavailable,
    };
    RegistryError::new(kind, op, message)
}

/// The bound of one attempt: a third of the request timeout. An attempt can be stuck where no
/// answer will ever come (a write proposed through a member just as the leader died waits for a
/// commit that the dead leader took with it), and giving the whole request timeout to that one
/// attempt would fail the call; a third leaves room for two more attempts after the election.
fn attempt_timeout(config: &EtcdConfig) -> Duration {
    (config.request_timeout / 3).max(Duration::from_millis(100))
}

/// Whether trying again (the balancer picks again) may help. A certificate refused by TLS
/// will be refused again: failing at once gives the operator the reason without the wait.
/// (Attempts that time out are retried too, by `Shared::call`. Such an attempt may still land;
/// every operation `call` runs tolerates that: puts of the same value, deletes and reads are
/// idempotent, and a lease granted twice leaves one unused lease to expire by its TTL.)
fn retryable(e: &RegistryError) -> bool {
    e.kind == ErrorKind::Unavailable && !e.message.contains("certificate")
}

/// Jittered exponential backoff for background retries, capped by the configuration.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(25);

    pub(crate) fn new(max: Duration) -> Self {
        Backoff {
            next: Self::START.min(max),
            max,
        }
    }

    /// The next delay: between half and all of the current step, so that thousands of hosts
    /// that lost etcd together do not come back in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::START.min(self.max);
    }
}

impl Shared {
    fn node_key(&self, service: &str, node_id: &str) -> String {
        format!(
            "{}{}/{}",
            self.config.key_prefix(),
            key_segment(service),
            key_segment(node_id)
        )
    }

    fn touch(&self) {
        *self.last_contact.lock().unwrap() = Some(Instant::now());
    }

    /// Records that etcd failed this host just now (see [`Health::last_failure`]).
    pub(crate) fn record_failure(&self) {
        *self.last_failure.lock().unwrap() = Some(Instant::now());
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Waits the backoff's next delay before a background task retries; returns early on
    /// shutdown.
    pub(crate) async fn pause(&self, backoff: &mut Backoff) {
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// Runs `f` against the client until it succeeds, fails for good, or the request timeout
    /// (which bounds the whole call, retries included) runs out. Counts the result under `op`.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        mut f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.config.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Backoff::new(Duration::from_millis(200));
        let attempt = attempt_timeout(&self.config);
        let result = loop {
            let attempt_deadline = (tokio::time::Instant::now() + attempt).min(deadline);
            match tokio::time::timeout_at(attempt_deadline, f(self.client.clone())).await {
                Ok(Ok(value)) => {
                    self.touch();
                    break Ok(value);
                }
                Ok(Err(e)) => {
                    let e = error(op, &e);
                    let delay = backoff.next_delay();
                    if retryable(&e) && tokio::time::Instant::now() + delay < deadline {
                        tracing::debug!(op, error = %e, "retrying");
                        Stats::bump(&self.stats.retries);
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    break Err(e);
                }
                Err(_) if tokio::time::Instant::now() < deadline => {
                    // This attempt is stuck (see `attempt_timeout`): drop it and ask again.
                    tracing::debug!(op, "attempt timed out; retrying");
                    Stats::bump(&self.stats.retries);
                }
                Err(_) => {
                    break Err(RegistryError::new(
                        ErrorKind::Timeout,
                        op,
                        format!("no answer within {timeout:?}"),
                    ));
                }
            }
        };
        self.stats.request(
            op,
            result.as_ref().map_or_else(|e| e.kind.as_str(), |_| "ok"),
        );
        if result.as_ref().is_err_and(|e| e.kind.is_outage()) {
            self.record_failure();
        }
        result
    }

    /// Reads every key under the prefix at one revision, a page at a time. Returns the key
    /// values and the revision they were read at.
    pub(crate) async fn list_prefix(
        &self,
        op: &'static str,
    ) -> Result<(Vec<(String, Vec<u8>)>, i64), RegistryError> {
        let prefix = self.config.key_prefix().to_string();
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut from = prefix.clone().into_bytes();
        let mut revision = 0;
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            let options = if revision > 0 {
                options.with_revision(revision)
            } else {
                options
            };
            let key = from.clone();
            let resp = self
                .call(op, |c| {
                    let (key, options) = (key.clone(), options.clone());
                    async move {
                        c.kv_client()
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .get(key, Some(options))
                            .await
                    }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                out.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                ));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    /// [`Shared::list_prefix`] with one bound on the whole list, pages and retries included.
    pub(crate) async fn list_prefix_within(
        &self,
        op: &'static str,
        bound: Duration,
    ) -> Result<(Vec<(String, Vec<u8>)>, i64), RegistryError> {
        tokio::time::timeout(bound, self.list_prefix(op))
            .await
            .unwrap_or_else(|_| {
                let e = RegistryError::new(
                    ErrorKind::Timeout,
                    op,
                    format!("no answer within {bound:?}"),
                );
                self.stats.request(op, e.kind.as_str());
                Err(e)
            })
    }

    /// Decodes values, skipping (and counting) the malformed ones.
    fn decode_all(&self, kvs: Vec<(String, Vec<u8>)>) -> BTreeMap<String, Service> {
        kvs.into_iter()
            .filter_map(|(key, value)| self.decode(&key, &value).map(|s| (key, s)))
            .collect()
    }

    /// Decodes one value; a malformed one is logged, counted, and skipped, never an error: a
    /// bad value written by someone else must not hide the valid nodes beside it.
    pub(crate) fn decode(&self, key: &str, value: &[u8]) -> Option<Service> {
        match Service::decode(value) {
            Ok(service) if !service.nodes.is_empty() => Some(service),
            Ok(_) => {
                Stats::bump(&self.stats.malformed_values);
                tracing::warn!(key, "skipping registry value without nodes");
                None
            }
            Err(e) => {
                Stats::bump(&self.stats.malformed_values);
                tracing::warn!(key, error = %e, bytes = value.len(), "skipping malformed registry value");
                None
            }
        }
    }

    /// Puts owned keys on the current lease, granting one first if there is none. If etcd
    /// says the lease is gone, grants a new one and puts every owned key on it. Keys someone
    /// else holds are refused, yielded (marked in conflict, or dropped if never written) or
    /// taken, as [`targets`] says (see [`ownership`]). The caller holds the lease lock.
    pub(crate) async fn put_owned(
        &self,
        lease: &mut Option<i64>,
        puts: &Puts,
        op: &'static str,
    ) -> Result<(), RegistryError> {
        let mut everything = false;
        for _ in 0..2 {
            if lease.is_none() {
                let ttl = self.config.lease_ttl.as_secs() as i64;
                let granted = self
                    .call("lease_grant", |mut c| async move {
                        c.lease_grant(ttl, None).await
                    })
                    .await?;
                Stats::bump(&self.stats.lease_grants);
                tracing::info!(lease = granted.id(), ttl = granted.ttl(), "granted lease");
                // Recorded before any key is on it: a crash from here on leaves a lease that
                // the next run recognizes as its own.
                self.leases.add(granted.id()).await;
                *lease = Some(granted.id());
                self.lease_id.send_replace(*lease);
                everything = true;
            }
            let id = lease.expect("granted above");
            // The lease lock keeps deregistrations out until the writes are done, so a key
            // deregistered meanwhile is not written back.
            let targets = targets(&self.owned.lock().unwrap(), puts, everything);
            // A registration refused for one of its nodes must not stop the other keys of a
            // new lease from being put on it: those are written first, in their own write.
            let (refusable, others): (Vec<Target>, Vec<Target>) = targets
                .into_iter()
                .partition(|t| t.foreign == Foreign::Refuse);
            let others_op = match puts {
                Puts::Registration(..) => "reput",
                _ => op,
            };
            let written = match self.write_settled(others_op, id, others).await {
                Ok(()) => self.write_settled(op, id, refusable).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => return Ok(()),
                // A put on a lease etcd no longer has (expired, revoked, lost) is refused as
                // not found; nothing else in these transactions can be.
                Err(e) if e.kind == ErrorKind::NotFound => {
                    tracing::warn!(lease = id, "lease gone while putting; granting a new one");
                    Stats::bump(&self.stats.lease_regrants);
                    self.leases.forget(&[id]).await;
                    *lease = None;
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::new(
            ErrorKind::Unavailable,
            op,
            "the lease was lost twice in a row",
        ))
    }

    /// Writes `targets` ([`ownership::write`]) and records what it found ([`settle`]):
    /// conflicts that start and registrations refused are counted and logged.
    async fn write_settled(
        &self,
        op: &'static str,
        lease: i64,
        targets: Vec<Target>,
    ) -> Result<(), RegistryError> {
        if targets.is_empty() {
            return Ok(());
        }
        let checked: Vec<(String, u64)> = targets
            .iter()
            .map(|t| (t.key.clone(), t.owned.serial))
            .collect();
        let written = ownership::write(self, op, lease, targets).await?;
        if op == "reput" {
            let count = written.count as u64;
            self.stats.reputs.fetch_add(count, Ordering::Relaxed);
        }
        let settled = settle(&mut self.owned.lock().unwrap(), &checked, &written.yielded);
        for (key, owner) in settled.conflicts {
            Stats::bump(&self.stats.conflicts);
            tracing::warn!(
                key,
                owner_lease = owner,
                "a registration of this host is held by someone else; not writing it back \
                 while they hold it"
            );
        }
        for (key, owner) in settled.refused {
            Stats::bump(&self.stats.conflicts);
            tracing::warn!(
                key,
                owner_lease = owner,
                "registration refused when written (it was answered during an outage): someone \
                 else holds the node; dropped"
            );
        }
        Ok(())
    }

    /// At shutdown: deletes this host's `owned` keys and revokes its lease, so that none is
    /// left in etcd. The revocation takes the keys on the lease with it, but not an owned key
    /// someone rewrote on no lease (`etcdctl put`) and that was not put back yet: it would stay
    /// for ever. Hence the guarded deletes (never of someone else's key), first: once the
    /// lease is revoked, the node is free for another host to register, and a delete after
    /// that could meet its registration. The deletes are bounded as a whole by one request
    /// timeout (a hung etcd fails the first and stops them), the revocation by another, so
    /// that a shutdown never waits on etcd for longer. The caller holds the lease lock.
    async fn release(&self, lease: &mut Option<i64>, owned: &[(String, Owned)]) {
        // One request timeout for both steps: with etcd hung, a shutdown must not wait a
        // timeout per step (a pod's grace period is typically 30 s, drain included).
        let bound = self.config.request_timeout;
        let deadline = tokio::time::Instant::now() + bound;
        let deleted = tokio::time::timeout_at(
            deadline,
            ownership::delete_own(self, "shutdown_delete", owned, *lease),
        )
        .await
        .unwrap_or_else(|_| {
            Err(RegistryError::new(
                ErrorKind::Timeout,
                "shutdown_delete",
                format!("not done within {bound:?}"),
            ))
        });
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "could not delete this host's keys; those on its lease expire by TTL");
        }
        let Some(id) = lease.take() else {
            return;
        };
        let revoked = tokio::time::timeout_at(
            deadline,
            self.call(
                "lease_revoke",
                |mut c| async move { c.lease_revoke(id).await },
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(RegistryError::new(
                ErrorKind::Timeout,
                "lease_revoke",
                format!("not done within {bound:?} of the shutdown"),
            ))
        });
        match revoked {
            Ok(_) => {
                tracing::info!(lease = id, "revoked lease");
                self.leases.forget(&[id]).await;
            }
            Err(e) => {
                tracing::warn!(lease = id, error = %e, "could not revoke lease; it expires by TTL")
            }
        }
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `WithPrefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn register_with(
        &self,
        service: &Service,
        takeover: Takeover,
    ) -> Result<Registered, RegistryError> {
        check_registration(service)?;
        let shared = &self.shared;
        let mut keys = Vec::new();
        let mut replaced = Vec::new();
        {
            let mut owned = shared.owned.lock().unwrap();
            for node in &service.nodes {
                let key = shared.node_key(&service.name, &node.id);
                // A node this host wrote stays its own across a registration that changes it
                // (a new address); a forced registration is forced whatever came before.
                let unwritten = match owned.get(&key) {
                    Some(p) if p.is_written() && takeover == Takeover::Refuse => None,
                    _ => Some(takeover),
                };
                let previous = owned.insert(
                    key.clone(),
                    Owned::new(service.with_single_node(node), unwritten),
                );
                replaced.push((key.clone(), previous));
                keys.push(key);
            }
        }
        // The keys stay owned if this first write meets an outage: the lease task puts them as
        // soon as etcd answers, which is what "registered until deregistered" means then, and
        // with what this registration asked: a node someone else holds then is refused (the
        // registration dropped and logged: its caller has been answered) unless forced. A
        // refusal now (too large, permission denied, someone else's node) would be refused
        // forever: undo and report it.
        // One bound for the whole registration: waiting for the lease lock, a grant and the
        // puts are each bounded too, but their sum must not exceed what the caller configured.
        let bound = shared.config.request_timeout;
        let attempt = async {
            let mut lease = shared.lease.lock().await;
            let puts = Puts::Registration(keys.clone(), takeover);
            shared.put_owned(&mut lease, &puts, "register").await
        };
        let result = match tokio::time::timeout(bound, attempt).await {
            Ok(result) => result,
            Err(_) => {
                let e = RegistryError::new(
                    ErrorKind::Timeout,
                    "register",
                    format!("not registered within {bound:?}; retrying in the background"),
                );
                shared.stats.request("register", e.kind.as_str());
                Err(e)
            }
        };
        match result {
            Ok(()) => Ok(Registered::Now),
            Err(e) if e.kind.is_outage() => {
                shared.repairs.lock().unwrap().extend(keys);
                shared.repair_wake.notify_one();
                Ok(Registered::Later(e))
            }
            Err(e) => {
                let mut owned = shared.owned.lock().unwrap();
                for (key, previous) in replaced {
                    match previous {
                        Some(previous) => owned.insert(key, previous),
                        None => owned.remove(&key),
                    };
                }
                Err(e)
            }
        }
    }

    async fn deregister(&self, service: &str, node_id: &str) -> Result<(), RegistryError> {
        let shared = &self.shared;
        let key = shared.node_key(service, node_id);
        let not_registered = || {
            RegistryError::new(
                ErrorKind::NotFound,
                "deregister",
                format!("{service}/{node_id} is not registered by this host"),
            )
        };
        if !shared.owned.lock().unwrap().contains_key(&key) {
            return Err(not_registered());
        }
        // The key stays owned until etcd confirms the delete: if etcd is down the caller gets
        // an error and can retry, and the lease keeps the key alive meanwhile rather than
        // orphaning it under a lease nobody will ever delete it from. The lease lock keeps a
        // re-put (lease task, repair) from writing the key back between the delete and the
        // removal from `owned`. One bound for the wait on the lock and the delete. A key
        // another host's lease took over is that host's now: it is left alone.
        let bound = shared.config.request_timeout;
        let attempt = async {
            let lease = shared.lease.lock().await;
            let Some(owned) = shared.owned.lock().unwrap().get(&key).cloned() else {
                return Err(not_registered()); // a concurrent deregister won
            };
            ownership::delete_own(shared, "deregister", &[(key.clone(), owned)], *lease).await?;
            shared.owned.lock().unwrap().remove(&key);
            Ok(())
        };
        tokio::time::timeout(bound, attempt)
            .await
            .unwrap_or_else(|_| {
                let e = RegistryError::new(
                    ErrorKind::Timeout,
                    "deregister",
                    format!("not deregistered within {bound:?}; still registered"),
                );
                shared.stats.request("deregister", e.kind.as_str());
                Err(e)
            })
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>, RegistryError> {
        let prefix = format!("{}{}/", self.shared.config.key_prefix(), key_segment(name));
        let resp = self
            .shared
            .call("get_service", |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        // Names that differ only by `/` versus `-` share a key segment; answer only the one
        // asked for.
        let found: Vec<Service> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                self.shared
                    .decode(&String::from_utf8_lossy(kv.key()), kv.value())
            })
            .filter(|s| s.name == name)
            .collect();
        if found.is_empty() {
            return Err(RegistryError::new(
                ErrorKind::NotFound,
                "get_service",
                format!("service {name} not found"),
            ));
        }
        Ok(group_by_version(found))
    }

    async fn list_services(&self) -> Result<Vec<String>, RegistryError> {
        let shared = &self.shared;
        // While the watch is connected the mirror is current: answer from memory, which costs
        // the number of services, does no I/O and cannot wait on an outage. The host's own
        // registrations are added so that a registration is listed as soon as it returns,
        // before its watch event arrives.
        if shared.watch_connected.load(Ordering::Relaxed) {
            let mut names: std::collections::BTreeSet<String> = shared
                .hub
                .lock()
                .unwrap()
                .service_names()
                .map(String::from)
                .collect();
            let owned = shared.owned.lock().unwrap();
            names.extend(owned.values().map(|o| o.service.name.clone()));
            return Ok(names.into_iter().collect());
        }
        // Without a watch, read etcd: every page and the whole list under one request timeout.
        let bound = shared.config.request_timeout;
        let (kvs, _) = shared.list_prefix_within("list_services", bound).await?;
        let mut names: Vec<String> = shared
            .decode_all(kvs)
            .into_values()
            .map(|s| s.name)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn watch(&self) -> mpsc::Receiver<WatchEvent> {
        self.shared.hub.lock().unwrap().subscribe()
    }

    fn health(&self) -> Health {
        Health {
            watch_connected: self.shared.watch_connected.load(Ordering::Relaxed),
            last_contact: *self.shared.last_contact.lock().unwrap(),
            last_failure: *self.shared.last_failure.lock().unwrap(),
        }
    }

    fn registrations(&self) -> Vec<Service> {
        let owned = self.shared.owned.lock().unwrap();
        owned.values().map(|o| o.service.clone()).collect()
    }

    fn conflicts(&self) -> Vec<Conflict> {
        let owned = self.shared.owned.lock().unwrap();
        owned
            .values()
            .filter_map(|o| {
                Some(Conflict {
                    service: o.service.name.clone(),
                    node_id: o.service.nodes.first()?.id.clone(),
                    owner_lease: o.conflict?,
                })
            })
            .collect()
    }

    async fn shutdown(&self) {
        let shared = &self.shared;
        // Stop the tasks first so that nothing re-puts what the revocation deletes.
        let _ = shared.shutdown.send(true);
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        let owned: Vec<(String, Owned)> = std::mem::take(&mut *shared.owned.lock().unwrap())
            .into_iter()
            .filter(|(_, o)| o.conflict.is_none())
            .collect();
        let bound = shared.config.request_timeout;
        match tokio::time::timeout(bound, shared.lease.lock()).await {
            Ok(mut lease) => shared.release(&mut lease, &owned).await,
            Err(_) => tracing::warn!("the lease stayed busy at shutdown; it expires by TTL"),
        }
        shared.hub.lock().unwrap().close();
        shared.watch_connected.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(
            prefix_end(b"/micro/registry/"),
            b"/micro/registry0".to_vec()
        );
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut backoff = Backoff::new(Duration::from_millis(100));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(100)));
        assert!(delays[9] >= Duration::from_millis(50));
    }

    fn owned(node: &str, unwritten: Option<Takeover>) -> (String, Owned) {
        let service = Service {
            name: "greeter".into(),
            nodes: vec![crate::model::Node {
                id: node.into(),
                address: "10.0.0.1:80".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        (node.to_string(), Owned::new(service, unwritten))
    }

    fn policies(targets: &[Target]) -> Vec<(&str, Foreign)> {
        targets
            .iter()
            .map(|t| (t.key.as_str(), t.foreign))
            .collect()
    }

    /// A registration answered now refuses someone else's node for its own keys only: when a
    /// new lease makes it write every key, the others keep what their own registrations
    /// asked (a 409 must never name a node of another registration).
    #[test]
    fn a_registration_refuses_for_its_own_keys_only() {
        let map: BTreeMap<String, Owned> = [
            owned("mine", Some(Takeover::Refuse)),
            owned("written", None),
            owned("kept", Some(Takeover::Refuse)),
            owned("forced", Some(Takeover::Force)),
        ]
        .into_iter()
        .collect();
        let puts = Puts::Registration(vec!["mine".into()], Takeover::Refuse);
        assert_eq!(
            policies(&targets(&map, &puts, false)),
            [("mine", Foreign::Refuse)]
        );
        assert_eq!(
            policies(&targets(&map, &puts, true)),
            [
                ("forced", Foreign::Take),
                ("kept", Foreign::Yield),
                ("mine", Foreign::Refuse),
                ("written", Foreign::Yield),
            ],
            "a new lease: every key, each with its own registration's policy"
        );
        let repair = Puts::Repair(vec!["forced".into(), "gone".into(), "written".into()]);
        assert_eq!(
            policies(&targets(&map, &repair, false)),
            [("forced", Foreign::Take), ("written", Foreign::Yield)],
            "a forced registration stays forced until written; a key no longer owned is skipped"
        );
    }

    /// A registration answered during an outage and refused when written is dropped, not kept
    /// as a conflict (which would put it back once the owner deletes its node); a written one
    /// someone took is a conflict; one registered again meanwhile is left to its own write.
    #[test]
    fn what_a_write_found_settles_the_registrations() {
        let mut map: BTreeMap<String, Owned> = [
            owned("unwritten", Some(Takeover::Refuse)),
            owned("written", None),
            owned("fine", Some(Takeover::Refuse)),
            owned("replaced", Some(Takeover::Refuse)),
        ]
        .into_iter()
        .collect();
        let checked: Vec<(String, u64)> = map.iter().map(|(k, o)| (k.clone(), o.serial)).collect();
        let again = owned("replaced", Some(Takeover::Refuse)).1;
        let again_serial = again.serial;
        map.insert("replaced".into(), again);
        let yielded = [
            ("unwritten".to_string(), 7),
            ("written".to_string(), 8),
            ("replaced".to_string(), 9),
        ];
        let settled = settle(&mut map, &checked, &yielded);
        assert_eq!(
            settled,
            Settled {
                conflicts: vec![("written".into(), 8)],
                refused: vec![("unwritten".into(), 7)],
            }
        );
        assert!(!map.contains_key("unwritten"));
        assert_eq!(map["written"].conflict, Some(8));
        assert!(map["fine"].is_written() && map["fine"].conflict.is_none());
        let replaced = &map["replaced"];
        assert_eq!(
            (replaced.serial, replaced.unwritten, replaced.conflict),
            (again_serial, Some(Takeover::Refuse), None)
        );
        // A conflict is reported once, when it starts.
        let checked = [("written".to_string(), map["written"].serial)];
        let settled = settle(&mut map, &checked, &[("written".into(), 8)]);
        assert_eq!(settled, Settled::default());
    }

    #[tokio::test]
    async fn connect_refuses_a_bad_config_before_any_io() {
        let err = EtcdRegistry::connect(EtcdConfig::new(["nope"]))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.message.contains("not host:port"), "{err}");
    }
}
