//! The registry interface: what the cache and the HTTP layer may ask of a service registry.
//!
//! It is go-micro's `Registry` in Rust: register, deregister, get a service (all versions), list
//! services, watch the prefix. [`etcd::EtcdRegistry`] is the production implementation and the
//! only code in regcache that speaks etcd; [`memory::MemoryRegistry`] serves the cache's unit
//! tests and the host's embedded default.
//!
//! Implementations own their failure handling: a registration stays registered across outages
//! (re-put by the lease logic), and a watch stream resumes by itself after any loss, announcing
//! gaps with [`WatchEvent::Resync`]. Callers never reconnect anything.

pub(crate) mod deferred;
pub mod etcd;
pub mod layout;
pub mod memory;

use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::model::Service;

/// What kind of failure a registry call met; the policy sees it as the last error's kind.
///
/// `Conflict` comes only from registrations, never from the reads a lookup makes, so a policy
/// never meets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The registry did not answer in time.
    Timeout,
    /// The registry could not be reached or refused service.
    Unavailable,
    /// Credentials were refused.
    Unauthenticated,
    /// The service does not exist.
    NotFound,
    /// The request itself was invalid (bad name, too large).
    InvalidInput,
    /// The node is registered by someone else (another host's lease, or no lease and another
    /// value): registering it would take it over. [`RegistryError::owner_lease`] says who.
    Conflict,
}

impl ErrorKind {
    /// A stable lowercase name, used in metrics labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Conflict => "conflict",
        }
    }

    /// Whether the registry could not be reached or did not answer (as opposed to answering
    /// "no", or refusing credentials): it may answer later. Removals seen soon after an outage
    /// are suspect of being its doing (leases that expired while their owners could not reach
    /// the registry), and a registration that meets one is kept and written later.
    pub fn is_outage(self) -> bool {
        matches!(self, ErrorKind::Timeout | ErrorKind::Unavailable)
    }
}

/// A failed registry call: its kind, the operation, and the registry's own words.
#[derive(Debug, Clone, thiserror::Error)]
#[error("registry {op} failed ({}): {message}", kind.as_str())]
pub struct RegistryError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// The operation, e.g. `get_service`.
    pub op: &'static str,
    /// Details from the registry or the transport.
    pub message: String,
    /// With [`ErrorKind::Conflict`]: the lease that holds the node (0: none, a value written
    /// without a lease). Kept out of the kind, which is a plain tag policies and metrics see.
    pub owner_lease: Option<i64>,
}

/// A lease id as etcdctl prints it (`lease list`, `lease grant`): 16 hex digits, so that it
/// can be found in etcdctl's output whatever its leading digit.
pub fn lease_hex(lease: i64) -> String {
    format!("{lease:016x}")
}

impl RegistryError {
    /// Refuses to register `service`/`node_id` for `op`: `owner_lease` holds it (0: it is on
    /// no lease, with a value this host did not write).
    pub fn conflict(op: &'static str, service: &str, node_id: &str, owner_lease: i64) -> Self {
        let holder = if owner_lease == 0 {
            "written by someone else without a lease".to_string()
        } else {
            format!(
                "registered under another host's lease {} (hex; {owner_lease} decimal)",
                lease_hex(owner_lease)
            )
        };
        RegistryError {
            owner_lease: Some(owner_lease),
            ..RegistryError::new(
                ErrorKind::Conflict,
                op,
                format!("{service}/{node_id} is {holder}"),
            )
        }
    }

    /// Builds an error of `kind` for `op`.
    pub fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Self {
        RegistryError {
            kind,
            op,
            message: message.into(),
            owner_lease: None,
        }
    }
}

/// A change seen on the registry's watch of the whole prefix.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A node was created or updated; `service` carries exactly that node.
    Put {
        /// The service with the one node that changed.
        service: Service,
        /// The etcd revision of the change (0 for registries without revisions).
        revision: i64,
    },
    /// A node was deleted (deregistration or lease expiry).
    Delete {
        /// The service name.
        service: String,
        /// The node id.
        node_id: String,
        /// The node as it was, a service with that one node: watchers that keep no copy of
        /// their own (etcd's `prev_kv`) learn what left.
        previous: Service,
        /// The etcd revision of the change.
        revision: i64,
    },
    /// The watch could not resume where it stopped (e.g. the revision was compacted): this is
    /// the full current content of the registry, to replace whatever the watcher had.
    Resync {
        /// Every service, grouped by version as [`Registry::get_service`] returns them.
        services: Vec<Service>,
        /// The revision the snapshot was read at.
        revision: i64,
    },
}

impl WatchEvent {
    /// The registry revision of the event.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put { revision, .. }
            | WatchEvent::Delete { revision, .. }
            | WatchEvent::Resync { revision, .. } => *revision,
        }
    }
}

/// Whether a registration may take over a node that another host's lease holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Takeover {
    /// Refuse it with [`ErrorKind::Conflict`]: a host never moves another host's node to its
    /// own lease (the owner's deregistration would be undone by this host's re-puts).
    #[default]
    Refuse,
    /// Take it (an operator's explicit `?force=true`); logged at warn.
    Force,
}

/// A node this host registered that another lease took over in the registry (a forced
/// registration elsewhere, a put by hand): it is no longer written back while that lease holds
/// it, and is written again once the registry no longer has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The service name.
    pub service: String,
    /// The node id.
    pub node_id: String,
    /// The lease that holds the node now.
    pub owner_lease: i64,
}

/// How the registry is doing, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// The watch stream is connected and current.
    pub watch_connected: bool,
    /// When the registry last answered any request, if ever.
    pub last_contact: Option<Instant>,
    /// When the registry last failed this host (a call timed out or found it unavailable, a
    /// lease went unanswered or expired, the watch broke), if ever.
    pub last_failure: Option<Instant>,
}

/// What the registry's own authentication says of a user name and password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The registry accepts them.
    Valid,
    /// The registry refuses them.
    Refused,
    /// The registry has no authentication: there is nothing to check.
    AuthDisabled,
}

/// What became of a registration the registry accepted.
#[derive(Debug, Clone)]
pub enum Registered {
    /// Written to the registry.
    Now,
    /// Kept, and written as soon as the registry answers (then kept alive like any other);
    /// the error says why the first write did not land.
    Later(RegistryError),
}

/// `get_service`'s answer from the values found for `name`: grouped by version, or `NotFound`
/// if there are none.
pub(crate) fn versions_found(
    name: &str,
    found: Vec<Service>,
) -> Result<Vec<Service>, RegistryError> {
    if found.is_empty() {
        return Err(RegistryError::new(
            ErrorKind::NotFound,
            "get_service",
            format!("service {name} not found"),
        ));
    }
    Ok(crate::model::group_by_version(found))
}

/// A service of one node at a loopback address, for the registries' unit tests.
#[cfg(test)]
pub(crate) fn one_node_service(name: &str, version: &str, node: &str) -> Service {
    Service {
        name: name.into(),
        version: version.into(),
        nodes: vec![crate::model::Node {
            id: node.into(),
            address: "127.0.0.1:1".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Refuses a registration no registry can keep: no name, no node, or a node without an id.
pub(crate) fn check_registration(service: &Service) -> Result<(), RegistryError> {
    if service.name.is_empty()
        || service.nodes.is_empty()
        || service.nodes.iter().any(|n| n.id.is_empty())
    {
        return Err(RegistryError::new(
            ErrorKind::InvalidInput,
            "register",
            "a service needs a name and at least one node, each with an id",
        ));
    }
    Ok(())
}

impl Registered {
    /// `Ok` if the registration is in the registry now, else why it is not yet.
    pub fn written(self) -> Result<(), RegistryError> {
        match self {
            Registered::Now => Ok(()),
            Registered::Later(e) => Err(e),
        }
    }
}

/// A service registry in the spirit of go-micro's.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Registers every node of `service` under this host's lease and keeps them registered
    /// (across lease loss and outages) until [`Registry::deregister`] or shutdown. An outage
    /// does not refuse a registration: it is kept and written later ([`Registered::Later`]).
    /// A node another host's lease holds is refused ([`ErrorKind::Conflict`]); see
    /// [`Registry::register_with`] to take it.
    async fn register(&self, service: &Service) -> Result<Registered, RegistryError> {
        self.register_with(service, Takeover::Refuse).await
    }

    /// [`Registry::register`], deciding what becomes of nodes another host's lease holds. The
    /// nodes this host registered before (in this run, or under an earlier run's lease it
    /// still recognizes) are its own, never a conflict.
    async fn register_with(
        &self,
        service: &Service,
        takeover: Takeover,
    ) -> Result<Registered, RegistryError>;

    /// Removes one node registered by this host.
    async fn deregister(&self, service: &str, node_id: &str) -> Result<(), RegistryError>;

    /// Reads every version of a service; `NotFound` when it has no node.
    async fn get_service(&self, name: &str) -> Result<Vec<Service>, RegistryError>;

    /// Lists the names of all registered services, sorted; this host's own registrations are
    /// included even while they wait to be written ([`Registered::Later`]).
    async fn list_services(&self) -> Result<Vec<String>, RegistryError>;

    /// Every service, grouped by version as [`Registry::get_service`] returns them. Served from
    /// memory while the registry's watch keeps a current copy, so it may be called per client
    /// request.
    async fn list_all(&self) -> Result<Vec<Service>, RegistryError>;

    /// Asks the registry's own authentication whether `user` may log in with `password`: one
    /// request, which clients of the host's etcd endpoint pay once per verdict period instead of
    /// once per connection.
    async fn verify_credentials(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Verdict, RegistryError>;

    /// Starts a watch of the whole prefix. The stream resumes by itself after any loss and
    /// ends only when the registry is shut down or the receiver is dropped.
    fn watch(&self) -> mpsc::Receiver<WatchEvent>;

    /// The registry's current health.
    fn health(&self) -> Health;

    /// The services this host registered and keeps alive, one node each.
    fn registrations(&self) -> Vec<Service>;

    /// Those of [`Registry::registrations`] another lease holds now (not written back).
    fn conflicts(&self) -> Vec<Conflict>;

    /// Graceful shutdown: stop keeping registrations alive and remove them at once.
    async fn shutdown(&self);
}
