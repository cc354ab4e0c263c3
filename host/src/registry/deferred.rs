//! A registry that becomes available later: the host starts serving (from its snapshot) while
//! etcd is still unreachable, and connects in the background.
//!
//! [`Deferred`] answers every call with `Unavailable` until [`Deferred::set`] hands it the real
//! registry; from then on it delegates. Watch receivers taken before that are fed by the real
//! registry's watch once it exists (its first event is a `Resync` of everything, so nothing is
//! missed), which lets the cache start its maintenance task at once. Registrations made before
//! that are kept ([`Registered::Later`]) and handed to the real registry when it comes, as an
//! outage of a connected registry would keep them.
//!
//! Architecture invariant: this module knows nothing about etcd; it wraps any [`Registry`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    ErrorKind, Health, Registered, Registry, RegistryError, WatchEvent, check_registration,
};
use crate::model::Service;

/// Queue length of watch receivers handed out before the registry exists.
const WATCH_QUEUE: usize = 1024;

/// A registry that is set once, later. See the module doc.
#[derive(Default)]
pub struct Deferred {
    inner: OnceLock<Arc<dyn Registry>>,
    /// Watchers waiting for the registry, fed once it is set.
    pending: Mutex<Vec<mpsc::Sender<WatchEvent>>>,
    /// Registrations waiting for the registry, one node each by (service, node id),
    /// registered once it is set.
    early_registrations: Mutex<BTreeMap<(String, String), Service>>,
    /// Set by shutdown before the registry exists: it is then shut down as soon as it comes.
    shut: Mutex<bool>,
}

impl Deferred {
    /// A registry with nothing behind it yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `registry` behind this one and starts feeding earlier watchers. Returns `false`
    /// (and shuts `registry` down) if one was already set or shutdown already began.
    pub async fn set(&self, registry: Arc<dyn Registry>) -> bool {
        // `shut` is held across the check and the set, and `shutdown` flips it and reads
        // `inner` under the same lock: whichever comes second sees the other, so a registry
        // that wins the race with shutdown is still shut down (its lease revoked).
        let accepted = {
            let shut = self.shut.lock().unwrap();
            !*shut && self.inner.set(registry.clone()).is_ok()
        };
        if !accepted {
            registry.shutdown().await;
            return false;
        }
        // Taken after `inner` is set, under the lock `register` holds while it checks `inner`:
        // every early registration is either here or went to `registry` itself.
        let early = std::mem::take(&mut *self.early_registrations.lock().unwrap());
        for service in early.into_values() {
            match registry.register(&service).await {
                Ok(Registered::Now) => {}
                Ok(Registered::Later(e)) => {
                    tracing::warn!(service = %service.name, "registration kept for later: {e}")
                }
                Err(e) => tracing::warn!(service = %service.name, "registration refused: {e}"),
            }
        }
        for tx in self.pending.lock().unwrap().drain(..) {
            let mut rx = registry.watch();
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
            });
        }
        true
    }

    fn inner(&self, op: &'static str) -> Result<&Arc<dyn Registry>, RegistryError> {
        self.inner.get().ok_or_else(|| not_connected(op))
    }
}

fn not_connected(op: &'static str) -> RegistryError {
    RegistryError::new(
        ErrorKind::Unavailable,
        op,
        "not connected to the registry yet",
    )
}

#[async_trait]
impl Registry for Deferred {
    async fn register(&self, service: &Service) -> Result<Registered, RegistryError> {
        check_registration(service)?;
        let inner = {
            let mut early = self.early_registrations.lock().unwrap();
            match self.inner.get() {
                Some(inner) => inner.clone(),
                None => {
                    for node in &service.nodes {
                        early.insert(
                            (service.name.clone(), node.id.clone()),
                            service.with_single_node(node),
                        );
                    }
                    return Ok(Registered::Later(not_connected("register")));
                }
            }
        };
        inner.register(service).await
    }

    async fn deregister(&self, service: &str, node_id: &str) -> Result<(), RegistryError> {
        let inner = {
            let mut early = self.early_registrations.lock().unwrap();
            match self.inner.get() {
                Some(inner) => inner.clone(),
                None => {
                    let key = (service.to_string(), node_id.to_string());
                    return match early.remove(&key) {
                        Some(_) => Ok(()),
                        None => Err(not_connected("deregister")),
                    };
                }
            }
        };
        inner.deregister(service, node_id).await
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>, RegistryError> {
        self.inner("get_service")?.get_service(name).await
    }

    async fn list_services(&self) -> Result<Vec<String>, RegistryError> {
        self.inner("list_services")?.list_services().await
    }

    fn watch(&self) -> mpsc::Receiver<WatchEvent> {
        // Hold the lock across the check so that `set` cannot drain between the two.
        let mut pending = self.pending.lock().unwrap();
        if let Some(inner) = self.inner.get() {
            return inner.watch();
        }
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        pending.push(tx);
        rx
    }

    fn health(&self) -> Health {
        match self.inner.get() {
            Some(inner) => inner.health(),
            None => Health {
                watch_connected: false,
                last_contact: None,
                last_failure: None,
            },
        }
    }

    fn registrations(&self) -> Vec<Service> {
        match self.inner.get() {
            Some(inner) => inner.registrations(),
            None => self
                .early_registrations
                .lock()
                .unwrap()
                .values()
                .cloned()
                .collect(),
        }
    }

    async fn shutdown(&self) {
        let inner = {
            let mut shut = self.shut.lock().unwrap();
            *shut = true;
            self.inner.get().cloned()
        };
        self.pending.lock().unwrap().clear();
        self.early_registrations.lock().unwrap().clear();
        if let Some(inner) = inner {
            inner.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;
    use crate::registry::memory::MemoryRegistry;

    fn service() -> Service {
        Service {
            name: "greeter".into(),
            version: "1".into(),
            nodes: vec![Node {
                id: "n1".into(),
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn unavailable_until_set_then_delegates_and_feeds_early_watchers() {
        let deferred = Deferred::new();
        let err = deferred.get_service("greeter").await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable);
        assert!(!deferred.health().watch_connected);
        let mut early = deferred.watch();

        let memory = Arc::new(MemoryRegistry::new());
        assert!(deferred.set(memory.clone()).await);
        deferred.register(&service()).await.unwrap();
        assert_eq!(deferred.get_service("greeter").await.unwrap().len(), 1);
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), early.recv())
            .await
            .unwrap();
        assert!(
            first.is_some(),
            "an early watcher is fed once the registry is set"
        );
    }

    #[tokio::test]
    async fn registrations_before_the_registry_are_kept_and_handed_over() {
        let deferred = Deferred::new();
        let mut two = service();
        two.nodes.push(Node {
            id: "n2".into(),
            address: "127.0.0.1:2".into(),
            ..Default::default()
        });
        let kept = deferred.register(&two).await.unwrap();
        assert!(
            matches!(&kept, Registered::Later(e) if e.kind == ErrorKind::Unavailable),
            "{kept:?}"
        );
        assert_eq!(deferred.registrations().len(), 2, "one node each");
        deferred.deregister("greeter", "n2").await.unwrap();
        assert_eq!(
            deferred.deregister("greeter", "n9").await.unwrap_err().kind,
            ErrorKind::Unavailable
        );

        let memory = Arc::new(MemoryRegistry::new());
        assert!(deferred.set(memory.clone()).await);
        let ids: Vec<String> = memory
            .registrations()
            .iter()
            .map(|s| s.nodes[0].id.clone())
            .collect();
        assert_eq!(ids, ["n1"]);
        assert_eq!(deferred.get_service("greeter").await.unwrap().len(), 1);
    }

    /// `set` racing `shutdown` on two threads: whichever wins, the registry ends up shut down
    /// (its registrations gone), never connected and forgotten. A stress test: the window it
    /// guards is a few instructions wide, so an unlocked check-then-set fails it only rarely.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_registry_set_concurrently_with_shutdown_is_always_shut_down() {
        for round in 0..2000 {
            let memory = Arc::new(MemoryRegistry::new());
            memory.register(&service()).await.unwrap();
            let deferred = Arc::new(Deferred::new());
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let setter = {
                let (deferred, memory, barrier) =
                    (deferred.clone(), memory.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    deferred.set(memory).await
                })
            };
            let shutter = {
                let (deferred, barrier) = (deferred.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    deferred.shutdown().await
                })
            };
            setter.await.unwrap();
            shutter.await.unwrap();
            assert!(
                memory.registrations().is_empty(),
                "round {round}: the registry was set but never shut down"
            );
        }
    }

    #[tokio::test]
    async fn a_registry_set_after_shutdown_is_shut_down_and_refused() {
        let deferred = Deferred::new();
        deferred.shutdown().await;
        let memory = Arc::new(MemoryRegistry::new());
        memory.register(&service()).await.unwrap();
        assert!(!deferred.set(memory.clone()).await);
        assert!(memory.registrations().is_empty());
        assert_eq!(
            deferred.get_service("greeter").await.unwrap_err().kind,
            ErrorKind::Unavailable
        );
    }
}
