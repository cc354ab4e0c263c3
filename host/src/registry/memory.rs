//! An in-process registry: the cache's unit tests and the host's embedded default run on it.
//!
//! It keeps the same contract as etcd (nodes keyed by service and node id, grouped by version
//! on read, a watch of every change) and adds what tests need to stand in for a sick etcd: a
//! switchable failure and an artificial latency, plus a count of `get_service` calls.
//!
//! Ownership is modelled as on etcd: each registry stands for one host with a lease of its own
//! (an id unique in the process), and [`MemoryRegistry::put_as`] writes nodes as another host's
//! lease would. A registration refuses a node held by another lease (unless forced), and a node
//! of this host's that another lease takes over is reported in [`Registry::conflicts`] and left
//! to it. Unlike etcd's, this registry does not write back a node of its own that was deleted
//! or taken over: nobody but the test at hand writes into it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    Conflict, ErrorKind, Health, Registered, Registry, RegistryError, Takeover, Verdict,
    WatchEvent, check_registration, versions_found,
};
use crate::model::Service;

/// Capacity of each watcher's queue; a watcher that falls this far behind loses events, as a
/// slow etcd watcher would be cancelled.
const WATCH_QUEUE: usize = 4096;

/// A registry held in memory.
pub struct MemoryRegistry {
    state: Mutex<State>,
    get_calls: AtomicU64,
    /// This registry's lease: the identity of the host it stands for.
    lease: i64,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        // Unique in the process, so that two registries never take each other for the same host.
        static NEXT_LEASE: AtomicI64 = AtomicI64::new(1);
        MemoryRegistry {
            state: Mutex::default(),
            get_calls: AtomicU64::new(0),
            lease: NEXT_LEASE.fetch_add(1, Ordering::Relaxed),
        }
    }
}

type Key = (String, String);

#[derive(Default)]
struct State {
    /// Single-node services keyed by (service, node id).
    nodes: BTreeMap<Key, Service>,
    /// The lease each node in `nodes` is on.
    holders: BTreeMap<Key, i64>,
    /// Keys registered through this handle, as a host's own registrations.
    owned: BTreeMap<Key, Service>,
    /// Owned keys another lease took over, with that lease.
    conflicts: BTreeMap<Key, i64>,
    /// Owned keys registered during a failure and not written yet, with what their
    /// registration said about another host's node: checked when they are written.
    unwritten: BTreeMap<Key, Takeover>,
    watchers: Vec<mpsc::Sender<WatchEvent>>,
    revision: i64,
    failure: Option<ErrorKind>,
    latency: Duration,
    last_contact: Option<Instant>,
    last_failure: Option<Instant>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every call fail with `kind` (or succeed again with `None`), as if etcd were down.
    /// Registrations made meanwhile are kept and written when it comes back, as the etcd
    /// registry's lease task does.
    pub fn set_failure(&self, kind: Option<ErrorKind>) {
        let mut state = self.state.lock().unwrap();
        state.failure = kind;
        if kind.is_none() {
            // A registration that was never written is checked now, as it would have been
            // then: another host's node is refused (dropped: its caller was answered) unless
            // the registration was forced.
            for (key, takeover) in std::mem::take(&mut state.unwritten) {
                let owner = state.holders.get(&key).copied();
                if owner.is_some_and(|o| o != self.lease) && takeover == Takeover::Refuse {
                    tracing::warn!(
                        service = %key.0,
                        node = %key.1,
                        owner_lease = owner,
                        "registration refused: another host's lease holds the node"
                    );
                    state.owned.remove(&key);
                }
            }
            let stale: Vec<Service> = state
                .owned
                .iter()
                .filter(|(key, service)| {
                    state.nodes.get(*key) != Some(*service) && !state.conflicts.contains_key(*key)
                })
                .map(|(_, service)| service.clone())
                .collect();
            let lease = self.lease;
            for service in stale {
                state.put(service, lease);
            }
        }
    }

    /// Delays every read by `latency`, as a slow etcd would.
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// How many times `get_service` reached the registry (the stand-in for etcd's Range count).
    pub fn get_service_calls(&self) -> u64 {
        self.get_calls.load(Ordering::SeqCst)
    }

    /// This registry's lease (its host's identity).
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Writes every node of `service` as another host holding `lease` would (a registration
    /// elsewhere, forced or not): this registry's own nodes among them become conflicts.
    pub fn put_as(&self, service: &Service, lease: i64) {
        let mut state = self.state.lock().unwrap();
        for node in &service.nodes {
            let key = (service.name.clone(), node.id.clone());
            if state.owned.contains_key(&key) && lease != self.lease {
                state.conflicts.insert(key, lease);
            }
            state.put(service.with_single_node(node), lease);
        }
    }

    /// Removes a node as a lease expiry would, whoever registered it.
    pub fn expire(&self, service: &str, node_id: &str) {
        let mut state = self.state.lock().unwrap();
        let key = (service.to_string(), node_id.to_string());
        state.holders.remove(&key);
        if let Some(previous) = state.nodes.remove(&key) {
            state.revision += 1;
            let event = WatchEvent::Delete {
                service: key.0,
                node_id: key.1,
                previous,
                revision: state.revision,
            };
            state.publish(event);
        }
    }

    /// Applies the configured latency and failure, then records contact.
    async fn enter(&self, op: &'static str) -> Result<(), RegistryError> {
        let latency = self.state.lock().unwrap().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut state = self.state.lock().unwrap();
        if let Some(kind) = state.failure {
            state.last_failure = Some(Instant::now());
            return Err(RegistryError::new(kind, op, "injected failure"));
        }
        state.last_contact = Some(Instant::now());
        Ok(())
    }
}

impl State {
    fn publish(&mut self, event: WatchEvent) {
        self.watchers
            .retain(|w| w.try_send(event.clone()).is_ok() || !w.is_closed());
    }

    fn put(&mut self, service: Service, lease: i64) {
        let key = (service.name.clone(), service.nodes[0].id.clone());
        self.revision += 1;
        let revision = self.revision;
        self.holders.insert(key.clone(), lease);
        self.nodes.insert(key, service.clone());
        self.publish(WatchEvent::Put { service, revision });
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register_with(
        &self,
        service: &Service,
        takeover: Takeover,
    ) -> Result<Registered, RegistryError> {
        check_registration(service)?;
        let entered = match self.enter("register").await {
            Err(e) if !e.kind.is_outage() => return Err(e),
            entered => entered,
        };
        let mut state = self.state.lock().unwrap();
        // Every node is checked before any is written, as etcd's transaction does.
        for node in &service.nodes {
            let key = (service.name.clone(), node.id.clone());
            match state.holders.get(&key) {
                Some(&owner) if owner != self.lease && entered.is_ok() => match takeover {
                    Takeover::Refuse => {
                        return Err(RegistryError::conflict(
                            "register",
                            &service.name,
                            &node.id,
                            owner,
                        ));
                    }
                    Takeover::Force => tracing::warn!(
                        service = %service.name,
                        node = %node.id,
                        owner_lease = owner,
                        "forced registration: taking over a node another host's lease holds"
                    ),
                },
                _ => {}
            }
        }
        for node in &service.nodes {
            let single = service.with_single_node(node);
            let key = (service.name.clone(), node.id.clone());
            state.owned.insert(key.clone(), single.clone());
            if entered.is_ok() {
                state.conflicts.remove(&key);
                state.unwritten.remove(&key);
                state.put(single, self.lease);
            } else {
                state.unwritten.insert(key, takeover);
            }
        }
        Ok(match entered {
            Ok(()) => Registered::Now,
            Err(e) => Registered::Later(e),
        })
    }

    async fn deregister(&self, service: &str, node_id: &str) -> Result<(), RegistryError> {
        self.enter("deregister").await?;
        let key = (service.to_string(), node_id.to_string());
        let (owned, taken) = {
            let mut state = self.state.lock().unwrap();
            let taken = state.conflicts.remove(&key).is_some();
            state.unwritten.remove(&key);
            (state.owned.remove(&key).is_some(), taken)
        };
        if !owned {
            return Err(RegistryError::new(
                ErrorKind::NotFound,
                "deregister",
                format!("{service}/{node_id} is not registered by this host"),
            ));
        }
        // A node another lease took over is that host's now: it stays.
        if !taken {
            self.expire(service, node_id);
        }
        Ok(())
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>, RegistryError> {
        self.get_calls.fetch_add(1, Ordering::SeqCst);
        self.enter("get_service").await?;
        let state = self.state.lock().unwrap();
        let found: Vec<Service> = state
            .nodes
            .iter()
            .filter(|((service, _), _)| service == name)
            .map(|(_, s)| s.clone())
            .collect();
        versions_found(name, found)
    }

    async fn list_services(&self) -> Result<Vec<String>, RegistryError> {
        self.enter("list_services").await?;
        let state = self.state.lock().unwrap();
        let mut names: Vec<String> = state.nodes.keys().map(|(s, _)| s.clone()).collect();
        names.dedup();
        Ok(names)
    }

    async fn list_all(&self) -> Result<Vec<Service>, RegistryError> {
        self.enter("list_all").await?;
        let state = self.state.lock().unwrap();
        Ok(crate::model::group_services(state.nodes.values().cloned()))
    }

    async fn verify_credentials(&self, _: &str, _: &str) -> Result<Verdict, RegistryError> {
        Ok(Verdict::AuthDisabled)
    }

    fn watch(&self) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        self.state.lock().unwrap().watchers.push(tx);
        rx
    }

    fn health(&self) -> Health {
        let state = self.state.lock().unwrap();
        Health {
            watch_connected: state.failure.is_none(),
            last_contact: state.last_contact,
            last_failure: state.last_failure,
        }
    }

    fn registrations(&self) -> Vec<Service> {
        self.state.lock().unwrap().owned.values().cloned().collect()
    }

    fn conflicts(&self) -> Vec<Conflict> {
        let state = self.state.lock().unwrap();
        state
            .conflicts
            .iter()
            .map(|((service, node_id), owner_lease)| Conflict {
                service: service.clone(),
                node_id: node_id.clone(),
                owner_lease: *owner_lease,
            })
            .collect()
    }

    async fn shutdown(&self) {
        let owned: Vec<(String, String)> = {
            let mut state = self.state.lock().unwrap();
            let conflicts = std::mem::take(&mut state.conflicts);
            std::mem::take(&mut state.owned)
                .into_keys()
                .filter(|key| !conflicts.contains_key(key))
                .collect()
        };
        for (service, node_id) in owned {
            self.expire(&service, &node_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::registry::one_node_service as service;

    #[tokio::test]
    async fn register_get_watch_and_deregister() {
        let registry = MemoryRegistry::new();
        let mut watch = registry.watch();
        registry.register(&service("a", "1", "n1")).await.unwrap();
        registry.register(&service("a", "2", "n2")).await.unwrap();
        let got = registry.get_service("a").await.unwrap();
        assert_eq!(got.len(), 2, "grouped by version");
        assert!(matches!(watch.recv().await, Some(WatchEvent::Put { .. })));
        registry.deregister("a", "n1").await.unwrap();
        assert_eq!(registry.get_service("a").await.unwrap().len(), 1);
        assert_eq!(
            registry.list_services().await.unwrap(),
            vec!["a".to_string()]
        );
        let err = registry.get_service("nope").await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(registry.get_service_calls(), 3);
    }

    #[tokio::test]
    async fn another_hosts_node_is_refused_unless_forced_and_a_taken_node_is_yielded() {
        let registry = MemoryRegistry::new();
        let other = registry.lease() + 1_000;
        registry.put_as(&service("a", "1", "n1"), other);
        let err = registry
            .register(&service("a", "1", "n1"))
            .await
            .unwrap_err();
        assert_eq!(
            (err.kind, err.owner_lease),
            (ErrorKind::Conflict, Some(other))
        );
        assert!(
            registry.registrations().is_empty(),
            "nothing was registered"
        );
        // Re-registering its own node is no conflict; forcing takes another host's.
        registry.register(&service("a", "1", "n2")).await.unwrap();
        registry.register(&service("a", "2", "n2")).await.unwrap();
        registry
            .register_with(&service("a", "1", "n1"), Takeover::Force)
            .await
            .unwrap();
        assert!(registry.conflicts().is_empty());

        // Taken back by the other host: reported, left to it, and not deleted by a
        // deregistration or the shutdown.
        registry.put_as(&service("a", "9", "n1"), other);
        let conflicts = registry.conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(
            (conflicts[0].node_id.as_str(), conflicts[0].owner_lease),
            ("n1", other)
        );
        registry.shutdown().await;
        let left = registry.get_service("a").await.unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            (left[0].version.as_str(), left[0].nodes[0].id.as_str()),
            ("9", "n1")
        );
    }

    #[tokio::test]
    async fn injected_failure_fails_every_call_and_keeps_registrations_for_later() {
        let registry = MemoryRegistry::new();
        registry.set_failure(Some(ErrorKind::Unavailable));
        let err = registry.get_service("a").await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable);
        assert!(!registry.health().watch_connected);
        assert!(registry.health().last_failure.is_some());
        let kept = registry.register(&service("a", "1", "n1")).await.unwrap();
        assert!(matches!(kept, Registered::Later(_)), "{kept:?}");
        registry.set_failure(None);
        assert_eq!(registry.get_service("a").await.unwrap().len(), 1);
    }

    /// A registration kept during a failure is checked when it is written: another host's
    /// node is refused then (and dropped), not taken; a forced one takes it.
    #[tokio::test]
    async fn a_registration_kept_during_a_failure_does_not_take_another_hosts_node() {
        let registry = MemoryRegistry::new();
        let other = registry.lease() + 1_000;
        registry.put_as(&service("a", "9", "n1"), other);
        registry.put_as(&service("a", "9", "n2"), other);
        registry.set_failure(Some(ErrorKind::Timeout));
        let kept = registry.register(&service("a", "1", "n1")).await.unwrap();
        assert!(matches!(kept, Registered::Later(_)), "{kept:?}");
        registry
            .register_with(&service("a", "1", "n2"), Takeover::Force)
            .await
            .unwrap();
        registry.set_failure(None);
        let ids: Vec<String> = registry
            .registrations()
            .iter()
            .map(|s| s.nodes[0].id.clone())
            .collect();
        assert_eq!(ids, ["n2"], "the refused registration is dropped");
        let versions: Vec<(String, String)> = registry
            .get_service("a")
            .await
            .unwrap()
            .iter()
            .flat_map(|s| s.nodes.iter().map(|n| (n.id.clone(), s.version.clone())))
            .collect();
        assert!(
            versions.contains(&("n1".into(), "9".into()))
                && versions.contains(&("n2".into(), "1".into())),
            "{versions:?}"
        );
    }
}
