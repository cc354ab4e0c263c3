//! The etcd-compatible endpoint: a front that serves, with etcd's own gRPC services, messages,
//! codes and error texts, the part of etcd's API that registry clients use (go-micro's etcd
//! registry, etcdctl, any clientv3), so that unchanged processes use the host by changing one
//! address. Then etcd sees one connection, one authentication, one lease stream and one watch
//! per host instead of per process, every lookup goes through the policy, and the eviction
//! guard protects the processes' own caches.
//!
//! Like the HTTP API it is thin: lookups are the cache's, registrations the registry's, watches
//! the cache's change feed. What it owns: authentication with remembered verdicts (`auth.rs`),
//! clients' leases kept by the host (`leases.rs`, served by `lease.rs`), the mapping of key
//! ranges onto lookups and registrations (`kv.rs`), watches (`watch.rs`), the one-member cluster
//! it presents (`cluster.rs`), and etcd's errors (`status.rs`). The key layout is the
//! registry's [`Layout`] seam.
//!
//! Bounds per client connection (leases, watches, concurrent streams) are settings; reaching
//! one is an error to that client (`ResourceExhausted`), never a cost to the others.

mod accept;
mod auth;
mod cluster;
mod kv;
mod lease;
mod leases;
mod stats;
mod status;
mod watch;

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::ops::{Deref, RangeInclusive};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use etcd_client::proto::{
    PbClusterServer, PbKvServer, PbLeaseServer, PbMaintenanceServer, PbResponseHeader,
    PbWatchServer,
};
use tokio::sync::{mpsc, watch as signal};
use tonic::codegen::tokio_stream::StreamExt;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

use crate::cache::Changes;
use crate::host::Parts;
use crate::registry::layout::Layout;

pub use self::stats::EtcdApiStats;

use self::auth::{Auth, AuthService};
use self::leases::Leases;
use self::watch::WatchCounts;

/// Default of how long a credential etcd accepted (or refused) is taken as it is.
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(60);
/// The range of the credential TTL.
pub const CREDENTIAL_TTL_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// Default bound of connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
/// Default bound of leases one connection holds.
pub const DEFAULT_MAX_LEASES_PER_CONNECTION: u64 = 1000;
/// Default bound of watches one connection holds.
pub const DEFAULT_MAX_WATCHES_PER_CONNECTION: u64 = 1000;
/// Default bound of one connection's concurrent gRPC streams (HTTP/2's setting).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u64 = 256;
/// The range of the bounds of connections, and of leases and watches per connection.
pub const PER_CONNECTION_RANGE: RangeInclusive<u64> = 1..=1_000_000;
/// The range of the per-connection bound of streams (an HTTP/2 setting, 32 bits).
pub const STREAMS_RANGE: RangeInclusive<u64> = 1..=65_536;

/// Connections accepted and not yet taken up by the server.
const ACCEPT_QUEUE: usize = 16;

/// Queue of responses of one stream (keep-alive, watch) waiting for its client.
const STREAM_QUEUE: usize = 64;

/// The HTTP/2 pings that find a client gone without closing its connection (its watches and
/// keep-alive streams then end).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdApiSettings {
    /// Where it listens.
    pub listen: SocketAddr,
    /// How long a verdict of etcd's on a credential is remembered.
    pub credential_ttl: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Leases one connection may hold.
    pub max_leases_per_connection: usize,
    /// Watches one connection may hold.
    pub max_watches_per_connection: usize,
    /// Concurrent streams (calls) one connection may have.
    pub max_streams_per_connection: u32,
}

/// The endpoint's state, shared by its services and streams.
pub(crate) struct Shared {
    parts: Parts,
    changes: Arc<Changes>,
    layout: Arc<dyn Layout>,
    auth: Auth,
    leases: Leases,
    watch_counts: Arc<WatchCounts>,
    settings: EtcdApiSettings,
    stats: Arc<EtcdApiStats>,
    client_url: String,
    member_id: u64,
    cluster_id: u64,
    /// Set when the host stops: streams end.
    stopping: signal::Receiver<bool>,
}

/// A handle on the endpoint's state: every gRPC service of the endpoint is implemented on it.
#[derive(Clone)]
pub(crate) struct Endpoint(Arc<Shared>);

impl Deref for Endpoint {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Shared {
    /// The revision answers carry: the change feed's.
    fn revision(&self) -> i64 {
        self.changes.revision()
    }

    fn header(&self) -> Option<PbResponseHeader> {
        Some(PbResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision: self.revision(),
            raft_term: 1,
        })
    }
}

/// The URL clients reach the endpoint at: a wildcard listen address is reached on loopback
/// (the endpoint serves the node's own processes).
fn client_url(address: SocketAddr) -> String {
    let reachable = if address.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
    } else {
        address
    };
    format!("http://{reachable}")
}

/// The endpoint, bound and ready to serve.
pub(crate) struct Front {
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    stop: signal::Sender<bool>,
}

impl Front {
    /// Binds the endpoint's listener. `auth_required`: etcd's authentication is on (the host
    /// logs in to etcd itself), so clients need a token.
    pub(crate) async fn bind(
        settings: EtcdApiSettings,
        parts: Parts,
        layout: Arc<dyn Layout>,
        auth_required: bool,
        stats: Arc<EtcdApiStats>,
    ) -> anyhow::Result<Front> {
        let changes = parts
            .cache
            .changes()
            .cloned()
            .context("the etcd endpoint needs a cache built to record changes")?;
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (setting etcd_api.listen, {}, {})",
                    settings.listen,
                    crate::config::settings::ETCD_API_LISTEN.flag(),
                    crate::config::settings::ETCD_API_LISTEN.env()
                )
            })?;
        let address = listener.local_addr()?;
        tracing::info!(%address, auth = auth_required, "etcd API listening on {address}");
        let (stop, stopping) = signal::channel(false);
        let member_id = {
            let mut hasher = std::hash::DefaultHasher::new();
            address.hash(&mut hasher);
            hasher.finish()
        };
        let shared = Shared {
            auth: Auth::new(
                auth_required,
                parts.registry.clone(),
                settings.credential_ttl,
                stats.clone(),
            ),
            leases: Leases::new(settings.max_leases_per_connection, stats.clone()),
            watch_counts: Arc::new(WatchCounts::new(stats.clone())),
            stats,
            changes,
            layout,
            client_url: client_url(address),
            member_id,
            cluster_id: member_id.rotate_left(32),
            stopping,
            settings,
            parts,
        };
        Ok(Front {
            listener,
            endpoint: Endpoint(Arc::new(shared)),
            stop,
        })
    }

    /// The address it listens on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `drain` completes, then ends every stream and stops.
    pub(crate) async fn serve(self, drain: impl Future<Output = ()> + Send) {
        let Front {
            listener,
            endpoint,
            stop,
        } = self;
        let expiry = tokio::spawn({
            let endpoint = endpoint.clone();
            async move {
                let mut tick = tokio::time::interval(leases::EXPIRY_TICK);
                // Deregistrations run beside the ticks: one etcd cannot answer must not hold
                // the next expiries back. Owned here, so they end with this task.
                let mut deregistrations = tokio::task::JoinSet::new();
                loop {
                    tick.tick().await;
                    while deregistrations.try_join_next().is_some() {}
                    let departed = endpoint.leases.take_expired(tokio::time::Instant::now());
                    if !departed.is_empty() {
                        let endpoint = endpoint.clone();
                        deregistrations
                            .spawn(async move { endpoint.deregister_departed(departed).await });
                    }
                }
            }
        });
        let check = {
            let endpoint = endpoint.clone();
            move |request: tonic::Request<()>| {
                endpoint.auth.check(request.metadata())?;
                Ok(request)
            }
        };
        let server = Server::builder()
            .max_concurrent_streams(endpoint.settings.max_streams_per_connection)
            .http2_keepalive_interval(Some(PING_INTERVAL))
            .http2_keepalive_timeout(Some(PING_TIMEOUT))
            .add_service(AuthService::new(endpoint.clone()))
            .add_service(PbKvServer::with_interceptor(
                endpoint.clone(),
                check.clone(),
            ))
            .add_service(PbLeaseServer::with_interceptor(
                endpoint.clone(),
                check.clone(),
            ))
            .add_service(PbWatchServer::with_interceptor(endpoint.clone(), check))
            .add_service(PbMaintenanceServer::new(endpoint.clone()))
            .add_service(PbClusterServer::new(endpoint.clone()));
        let shutdown = async {
            drain.await;
            // Watches and keep-alive streams last as long as their clients: end them, or the
            // server would wait for them.
            let _ = stop.send(true);
        };
        let (admitted, connections) = mpsc::channel(ACCEPT_QUEUE);
        let acceptor = tokio::spawn(accept::accept(
            listener,
            endpoint.settings.max_connections,
            endpoint.stats.clone(),
            admitted,
        ));
        let incoming = ReceiverStream::new(connections).map(Ok::<_, std::io::Error>);
        if let Err(e) = server
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::warn!("etcd API server failed: {e}");
        }
        for task in [expiry, acceptor] {
            task.abort();
            let _ = task.await;
        }
    }
}
