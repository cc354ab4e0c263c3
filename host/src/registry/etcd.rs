//! The etcd registry: go-micro's key layout on etcd, kept alive through every etcd fault.
//!
//! This is the only code in regcache that speaks etcd. It owns one client (all endpoints, one
//! auth token shared by every call and stream), and background tasks:
//!
//! - `lease.rs`: one lease per host and one long-lived LeaseKeepAlive stream. On any loss (TTL 0,
//!   "lease not found", the stream ending or falling silent) it re-opens the stream or grants a
//!   new lease and re-puts every owned key, with jittered backoff, forever. It owns the lease
//!   and every write of this host's keys (`owned.rs`: what they are), registrations arriving
//!   together written together.
//! - `watch.rs`: one prefix watch (with `prev_kv`) that mirrors the registry, fans events out to
//!   every [`Registry::watch`] receiver, resumes from the last revision after a loss, re-lists
//!   and sends [`WatchEvent::Resync`] after a compaction, feeds [`Registry::health`], and asks
//!   the lease task to re-put an owned key it sees deleted or changed by someone else. A small
//!   timer task resyncs receivers that fell behind even when no further event comes.
//! - `ownership.rs`: which leases are this host's (remembered in the state dir across restarts)
//!   and the transactions that write an owned key only while no other host's lease holds it,
//!   so that a registration never takes over another host's node (unless forced) and a re-put
//!   yields to one that did.
//! - `endpoints.rs`: with several endpoints, takes a member that stopped answering (killed or
//!   hung) out of the client's balancer (else about a third of calls keep failing or waiting)
//!   and puts it back once it answers again.
//!
//! Every unary call is bounded by the configured request timeout, retries included, so a hung
//! etcd (SIGSTOP) never hangs a caller; transient failures (a dead member, "leader changed")
//! are retried on the balancer's next pick within that bound (`retry.rs`, with the failures
//! classified by `error.rs`). Expired auth tokens are refreshed by the client for unary calls;
//! a cancelled watch is re-created here after one unary call. `connect.rs` dials, `list.rs`
//! reads the whole prefix a page at a time. This file holds the registry, the state its tasks
//! share, and the [`Registry`] implementation.
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
mod connect;
mod endpoints;
mod error;
mod lease;
mod list;
mod owned;
mod ownership;
mod retry;
mod stats;
mod tls;
mod watch;

pub use config::{
    ConfigError, DEFAULT_LEASE_TTL, DEFAULT_PREFIX, DEFAULT_REQUEST_TIMEOUT, EtcdConfig,
    LEASE_TTL_RANGE, MIN_HTTP2_KEEPALIVE, REQUEST_TIMEOUT_RANGE, Setting, TlsPaths,
};
pub use stats::StatsSnapshot;
pub use tls::{TlsFile, TlsFileError, TlsProblem};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use etcd_client::{Client, GetOptions};
use tokio::sync::{mpsc, watch as signal};
use tokio::task::JoinHandle;

use super::{
    Conflict, ErrorKind, Health, Registered, Registry, RegistryError, Takeover, Verdict,
    WatchEvent, check_registration, versions_found,
};
use crate::model::Service;
use crate::registry::layout::{GoMicro, Layout};
use error::Deadline;
use lease::{Deregistration, Lease};
use owned::Owned;
use ownership::HostLeases;
use stats::Stats;

/// A registry on etcd in go-micro's layout. Cheap to share behind an `Arc`; dropping it stops
/// its background tasks (without revoking the lease: call [`Registry::shutdown`] for that).
pub struct EtcdRegistry {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// State shared by the registry handle and its background tasks.
pub(crate) struct Shared {
    client: Client,
    config: EtcdConfig,
    /// The keys' layout under the configured prefix.
    layout: GoMicro,
    stats: Stats,
    /// Keys this host owns, by full etcd key.
    owned: Mutex<BTreeMap<String, Owned>>,
    /// The lease the owned keys are on, kept by the lease task.
    lease: Lease,
    hub: Mutex<watch::Hub>,
    contact: Contact,
    /// Signalled when an endpoint is taken out of rotation: streams that may be stuck on it
    /// (keep-alive, watch) re-open on the members still in.
    endpoint_removed: signal::Sender<()>,
    /// Set once by shutdown; every task stops when it flips.
    shutdown: signal::Sender<bool>,
}

/// What [`Registry::health`] reports, kept current by every call and stream.
#[derive(Default)]
struct Contact {
    watch_connected: AtomicBool,
    last_contact: Mutex<Option<Instant>>,
    last_failure: Mutex<Option<Instant>>,
}

impl Contact {
    /// Records that etcd answered just now.
    fn touch(&self) {
        *self.last_contact.lock().unwrap() = Some(Instant::now());
    }

    /// Records that etcd failed this host just now (see [`Health::last_failure`]).
    fn record_failure(&self) {
        *self.last_failure.lock().unwrap() = Some(Instant::now());
    }

    fn watch_connected(&self) -> bool {
        self.watch_connected.load(Ordering::Relaxed)
    }

    fn set_watch_connected(&self, connected: bool) {
        self.watch_connected.store(connected, Ordering::Relaxed);
    }

    fn health(&self) -> Health {
        Health {
            watch_connected: self.watch_connected(),
            last_contact: *self.last_contact.lock().unwrap(),
            last_failure: *self.last_failure.lock().unwrap(),
        }
    }
}

impl EtcdRegistry {
    /// Validates `config`, reads its TLS files, connects (authenticating once if a user is
    /// set), lists the prefix and starts the background tasks. Fails if etcd does not answer
    /// within the request timeout, with the transport's reason (e.g. an unknown CA); a config
    /// or TLS file that cannot be used fails with [`ErrorKind::InvalidInput`].
    pub async fn connect(config: EtcdConfig) -> Result<EtcdRegistry, RegistryError> {
        config
            .validate()
            .map_err(|e| RegistryError::new(ErrorKind::InvalidInput, "connect", e.to_string()))?;
        let client = connect::dial(&config).await?;
        let leases = HostLeases::load(config.state_dir.as_deref());
        let shared = Arc::new(Shared {
            client,
            layout: GoMicro::new(config.key_prefix()),
            config,
            stats: Stats::default(),
            owned: Mutex::new(BTreeMap::new()),
            lease: Lease::new(leases),
            hub: Mutex::new(watch::Hub::default()),
            contact: Contact::default(),
            endpoint_removed: signal::channel(()).0,
            shutdown: signal::channel(false).0,
        });
        // The first list is the first contact: it proves the endpoints, TLS and credentials,
        // and seeds the watch mirror so that the watch starts exactly after it.
        let deadline = Deadline::after(shared.config.request_timeout);
        let (kvs, revision) = shared.list_prefix("connect", deadline).await?;
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

    /// The lease this host's keys are on, if one was granted (and not lost or revoked since).
    pub fn lease_id(&self) -> Option<i64> {
        self.shared.lease.id()
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

impl Shared {
    fn node_key(&self, service: &str, node_id: &str) -> String {
        self.layout.node_key(service, node_id)
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
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
        // Each key with the serial of the entry this registration puts in `owned`: its write
        // and its undo concern that entry only, not one a later registration of the node put.
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
                let entry = Owned::new(service.with_single_node(node), unwritten);
                keys.push((key.clone(), entry.serial));
                let previous = owned.insert(key.clone(), entry);
                replaced.push((key, previous));
            }
        }
        // The keys stay owned if this first write meets an outage: the lease task puts them as
        // soon as etcd answers, which is what "registered until deregistered" means then, and
        // with what this registration asked: a node someone else holds then is refused (the
        // registration dropped and logged: its caller has been answered) unless forced. A
        // refusal now (too large, permission denied, someone else's node) would be refused
        // forever: undo and report it.
        // One bound for the whole registration: waiting for its turn (registrations arriving
        // together are written together), a grant and the puts are each bounded too, but their
        // sum must not exceed what the caller configured.
        let deadline = Deadline::after(shared.config.request_timeout);
        let attempt = shared.put_registration(keys.clone(), takeover);
        match shared.within("register", deadline, attempt).await {
            Ok(()) => Ok(Registered::Now),
            Err(e) if e.kind.is_outage() => {
                shared
                    .lease
                    .request_repair(keys.into_iter().map(|(key, _)| key));
                Ok(Registered::Later(e))
            }
            Err(e) => {
                let mut owned = shared.owned.lock().unwrap();
                let mut restored = Vec::new();
                for ((key, serial), (_, previous)) in keys.into_iter().zip(replaced) {
                    if owned.get(&key).is_none_or(|o| o.serial != serial) {
                        continue; // registered again since: that registration's now
                    }
                    match previous {
                        Some(previous) => {
                            owned.insert(key.clone(), previous);
                            restored.push(key);
                        }
                        None => {
                            owned.remove(&key);
                        }
                    }
                }
                drop(owned);
                // What the node was registered as before is checked and put back (or found
                // someone else's) as any registration kept across a failed write is.
                shared.lease.request_repair(restored);
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
        // removal from `owned`; deregistrations arriving together are deleted together. One
        // bound for the wait for its turn and the delete. A key another host's lease took over
        // is that host's now: it is left alone.
        let deadline = Deadline::after(shared.config.request_timeout);
        let deregistration = Deregistration {
            key,
            not_registered: not_registered(),
        };
        let attempt = shared.delete_registration(deregistration);
        shared.within("deregister", deadline, attempt).await
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>, RegistryError> {
        let prefix = self.shared.layout.service_prefix(name);
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
        versions_found(name, found)
    }

    async fn list_services(&self) -> Result<Vec<String>, RegistryError> {
        let shared = &self.shared;
        // While the watch is connected the mirror is current: answer from memory, which costs
        // the number of services, does no I/O and cannot wait on an outage. The host's own
        // registrations are added so that a registration is listed as soon as it returns,
        // before its watch event arrives.
        if shared.contact.watch_connected() {
            let mut names: BTreeSet<String> = shared
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
        let deadline = Deadline::after(shared.config.request_timeout);
        let (kvs, _) = shared.list_prefix("list_services", deadline).await?;
        let mut names: Vec<String> = shared
            .decode_all(kvs)
            .into_values()
            .map(|s| s.name)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn list_all(&self) -> Result<Vec<Service>, RegistryError> {
        let shared = &self.shared;
        // As `list_services`: the mirror while the watch keeps it current, else etcd.
        if shared.contact.watch_connected() {
            return Ok(shared.hub.lock().unwrap().services());
        }
        let deadline = Deadline::after(shared.config.request_timeout);
        let (kvs, _) = shared.list_prefix("list_all", deadline).await?;
        Ok(crate::model::group_services(
            shared.decode_all(kvs).into_values(),
        ))
    }

    async fn verify_credentials(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Verdict, RegistryError> {
        // etcd answers a refused password and disabled authentication with these codes; the
        // registry's own classification folds both into `InvalidInput`.
        self.shared
            .call("verify_credentials", |c| {
                let (user, password) = (user.to_string(), password.to_string());
                async move {
                    match c.auth_client().authenticate(user, password).await {
                        Ok(_) => Ok(Verdict::Valid),
                        Err(etcd_client::Error::GRpcStatus(s))
                            if s.code() == tonic::Code::InvalidArgument =>
                        {
                            Ok(Verdict::Refused)
                        }
                        Err(etcd_client::Error::GRpcStatus(s))
                            if s.code() == tonic::Code::FailedPrecondition =>
                        {
                            Ok(Verdict::AuthDisabled)
                        }
                        Err(e) => Err(e),
                    }
                }
            })
            .await
    }

    fn watch(&self) -> mpsc::Receiver<WatchEvent> {
        self.shared.hub.lock().unwrap().subscribe()
    }

    fn health(&self) -> Health {
        self.shared.contact.health()
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
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        // An aborted task ends at its next await; awaited so that none outlives the shutdown.
        for task in tasks {
            let _ = task.await;
        }
        let owned: Vec<(String, Owned)> = std::mem::take(&mut *shared.owned.lock().unwrap())
            .into_iter()
            .filter(|(_, o)| o.conflict.is_none())
            .collect();
        match tokio::time::timeout(shared.config.request_timeout, shared.lease.lock()).await {
            Ok(mut lease) => shared.release(&mut lease, &owned).await,
            Err(_) => tracing::warn!("the lease stayed busy at shutdown; it expires by TTL"),
        }
        shared.hub.lock().unwrap().close();
        shared.contact.set_watch_connected(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
