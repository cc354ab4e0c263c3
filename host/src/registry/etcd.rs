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

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
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
use ownership::{Foreign, HostLeases};
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
    /// Another host's lease that holds the key now: it is not written back while so.
    conflict: Option<i64>,
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
    /// Owned keys seen deleted, for the lease task to put back.
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

/// Whether a put failed because its lease is gone (expired, revoked, or etcd lost it).
pub(crate) fn lease_not_found(e: &RegistryError) -> bool {
    e.message.contains("lease not found")
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
    /// says the lease is gone, grants a new one and puts every owned key on it. `keys: None`
    /// puts every owned key. Keys another host's lease holds are refused, yielded (marked in
    /// conflict) or taken, as `foreign` says (see [`ownership`]). The caller holds the lease
    /// lock.
    pub(crate) async fn put_owned(
        &self,
        lease: &mut Option<i64>,
        keys: Option<Vec<String>>,
        op: &'static str,
        foreign: Foreign,
    ) -> Result<(), RegistryError> {
        let mut keys = keys;
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
                keys = None;
            }
            let id = lease.expect("granted above");
            // The lease lock keeps deregistrations out until the writes are done, so a key
            // deregistered meanwhile is not written back.
            let targets: Vec<(String, Owned)> = {
                let owned = self.owned.lock().unwrap();
                match &keys {
                    None => owned.iter().map(|(k, o)| (k.clone(), o.clone())).collect(),
                    Some(keys) => keys
                        .iter()
                        .filter_map(|k| owned.get(k).map(|o| (k.clone(), o.clone())))
                        .collect(),
                }
            };
            let checked: Vec<String> = targets.iter().map(|(k, _)| k.clone()).collect();
            match ownership::write(self, op, id, targets, foreign).await {
                Ok(written) => {
                    if op == "reput" {
                        let count = written.count as u64;
                        self.stats.reputs.fetch_add(count, Ordering::Relaxed);
                    }
                    self.mark_conflicts(&checked, &written.yielded);
                    return Ok(());
                }
                Err(e) if lease_not_found(&e) => {
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

    /// Records which of the `checked` keys another lease holds (`yielded`): those are reported
    /// once, when the conflict starts, and not written back while it lasts; the others are
    /// this host's again.
    fn mark_conflicts(&self, checked: &[String], yielded: &[(String, i64)]) {
        let yielded: BTreeMap<&str, i64> = yielded.iter().map(|(k, l)| (k.as_str(), *l)).collect();
        let mut owned = self.owned.lock().unwrap();
        for key in checked {
            let Some(entry) = owned.get_mut(key) else {
                continue;
            };
            let now = yielded.get(key.as_str()).copied();
            if now.is_some() && now != entry.conflict {
                Stats::bump(&self.stats.conflicts);
                tracing::warn!(
                    key,
                    owner_lease = now,
                    "a registration of this host is held by another lease; not writing it back \
                     while that lease holds it"
                );
            }
            entry.conflict = now;
        }
    }

    /// At shutdown: deletes this host's `owned` keys and revokes its lease, so that none is
    /// left in etcd. The revocation takes the keys on the lease with it, but not an owned key
    /// someone rewrote on no lease (`etcdctl put`) and that was not put back yet: it would stay
    /// for ever. Hence the guarded deletes first (never of another host's key). The caller
    /// holds the lease lock.
    async fn release(&self, lease: &mut Option<i64>, owned: &[String]) {
        if let Err(e) = ownership::delete_own(self, "shutdown_delete", owned, *lease).await {
            tracing::warn!(error = %e, "could not delete this host's keys; those on its lease expire by TTL");
        }
        let Some(id) = lease.take() else {
            return;
        };
        let revoked = self
            .call(
                "lease_revoke",
                |mut c| async move { c.lease_revoke(id).await },
            )
            .await;
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
                let single = service.with_single_node(node);
                let key = shared.node_key(&service.name, &node.id);
                let value = single.encode();
                let previous = owned.insert(
                    key.clone(),
                    Owned {
                        service: single,
                        value,
                        conflict: None,
                    },
                );
                replaced.push((key.clone(), previous));
                keys.push(key);
            }
        }
        // The keys stay owned if this first write meets an outage: the lease task puts them as
        // soon as etcd answers, which is what "registered until deregistered" means then (a
        // node another host took meanwhile is then reported as a conflict, not refused). A
        // refusal (too large, permission denied, another host's node) would be refused
        // forever: undo and report it.
        // One bound for the whole registration: waiting for the lease lock, a grant and the
        // puts are each bounded too, but their sum must not exceed what the caller configured.
        let bound = shared.config.request_timeout;
        let attempt = async {
            let mut lease = shared.lease.lock().await;
            shared
                .put_owned(&mut lease, Some(keys.clone()), "register", takeover.into())
                .await
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
            if !shared.owned.lock().unwrap().contains_key(&key) {
                return Err(not_registered()); // a concurrent deregister won
            }
            ownership::delete_own(shared, "deregister", std::slice::from_ref(&key), *lease).await?;
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
        let owned: Vec<String> = std::mem::take(&mut *shared.owned.lock().unwrap())
            .into_iter()
            .filter(|(_, o)| o.conflict.is_none())
            .map(|(key, _)| key)
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
