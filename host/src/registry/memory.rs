//! An in-process registry: the cache's unit tests and the host's embedded default run on it.
//!
//! It keeps the same contract as etcd (nodes keyed by service and node id, grouped by version
//! on read, a watch of every change) and adds what tests need to stand in for a sick etcd: a
//! switchable failure and an artificial latency, plus a count of `get_service` calls.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    ErrorKind, Health, Registered, Registry, RegistryError, WatchEvent, check_registration,
};
use crate::model::{Service, group_by_version};

/// Capacity of each watcher's queue; a watcher that falls this far behind loses events, as a
/// slow etcd watcher would be cancelled.
const WATCH_QUEUE: usize = 4096;

/// A registry held in memory.
#[derive(Default)]
pub struct MemoryRegistry {
    state: Mutex<State>,
    get_calls: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Single-node services keyed by (service, node id).
    nodes: BTreeMap<(String, String), Service>,
    /// Keys registered through this handle, as a host's own registrations.
    owned: BTreeMap<(String, String), Service>,
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
            let stale: Vec<Service> = state
                .owned
                .iter()
                .filter(|(key, service)| state.nodes.get(*key) != Some(*service))
                .map(|(_, service)| service.clone())
                .collect();
            for service in stale {
                state.put(service);
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

    /// Removes a node as a lease expiry would, whoever registered it.
    pub fn expire(&self, service: &str, node_id: &str) {
        let mut state = self.state.lock().unwrap();
        let key = (service.to_string(), node_id.to_string());
        if state.nodes.remove(&key).is_some() {
            state.revision += 1;
            let event = WatchEvent::Delete {
                service: key.0,
                node_id: key.1,
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

    fn put(&mut self, service: Service) {
        let node_id = service.nodes[0].id.clone();
        self.revision += 1;
        let revision = self.revision;
        self.nodes
            .insert((service.name.clone(), node_id), service.clone());
        self.publish(WatchEvent::Put { service, revision });
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, service: &Service) -> Result<Registered, RegistryError> {
        check_registration(service)?;
        let entered = match self.enter("register").await {
            Err(e) if !e.kind.is_outage() => return Err(e),
            entered => entered,
        };
        let mut state = self.state.lock().unwrap();
        for node in &service.nodes {
            let single = service.with_single_node(node);
            state
                .owned
                .insert((service.name.clone(), node.id.clone()), single.clone());
            if entered.is_ok() {
                state.put(single);
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
        let owned = self.state.lock().unwrap().owned.remove(&key).is_some();
        if !owned {
            return Err(RegistryError::new(
                ErrorKind::NotFound,
                "deregister",
                format!("{service}/{node_id} is not registered by this host"),
            ));
        }
        self.expire(service, node_id);
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
        self.enter("list_services").await?;
        let state = self.state.lock().unwrap();
        let mut names: Vec<String> = state.nodes.keys().map(|(s, _)| s.clone()).collect();
        names.dedup();
        Ok(names)
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

    async fn shutdown(&self) {
        let owned: Vec<(String, String)> = {
            let mut state = self.state.lock().unwrap();
            std::mem::take(&mut state.owned).into_keys().collect()
        };
        for (service, node_id) in owned {
            self.expire(&service, &node_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;

    fn service(name: &str, version: &str, node: &str) -> Service {
        Service {
            name: name.into(),
            version: version.into(),
            nodes: vec![Node {
                id: node.into(),
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

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
}
