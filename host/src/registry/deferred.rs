//! A registry that becomes available later: the host starts serving (from its snapshot) while
//! etcd is still unreachable, and connects in the background.
//!
//! [`Deferred`] answers every call with `Unavailable` until [`Deferred::set`] hands it the real
//! registry; from then on it delegates. Watch receivers taken before that are fed by the real
//! registry's watch once it exists (its first event is a `Resync` of everything, so nothing is
//! missed), which lets the cache start its maintenance task at once. Registrations made before
//! that are kept ([`Registered::Later`]) and handed to the real registry when it comes, as an
//! outage of a connected registry would keep them; registrations, deregistrations and shutdown
//! wait for that handover, so none of them is overtaken by an older copy. Failed connection
//! attempts ([`Deferred::connect_failed`]) are the registry's failures until then.
//!
//! Architecture invariant: this module knows nothing about etcd; it wraps any [`Registry`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    Conflict, ErrorKind, Health, Registered, Registry, RegistryError, Takeover, Verdict,
    WatchEvent, check_registration,
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
    /// Registrations waiting for the registry, one node each by (service, node id), with
    /// whether they may take over another host's node, registered once it is set (a conflict
    /// met then is logged: the caller was answered already).
    early_registrations: Mutex<BTreeMap<(String, String), (Service, Takeover)>>,
    /// Held by `set` from before the registry is visible until the early registrations are
    /// handed over; calls that change registrations on the registry take it first.
    handover: tokio::sync::Mutex<()>,
    /// The last failed attempt to connect, reported as the registry's last failure.
    connect_failed_at: Mutex<Option<Instant>>,
    /// Set by shutdown before the registry exists: it is then shut down as soon as it comes.
    shut: Mutex<bool>,
    /// The tasks feeding earlier watchers; each ends when the registry's watch does, which
    /// shutdown waits for.
    forwarders: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Deferred {
    /// A registry with nothing behind it yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `registry` behind this one and starts feeding earlier watchers. Returns `false`
    /// (and shuts `registry` down) if one was already set or shutdown already began.
    pub async fn set(&self, registry: Arc<dyn Registry>) -> bool {
        let _handing_over = self.handover.lock().await;
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
        for tx in self.pending.lock().unwrap().drain(..) {
            let mut rx = registry.watch();
            let forwarder = tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
            });
            self.forwarders.lock().unwrap().push(forwarder);
        }
        // `register` checks `inner` under this lock, so every early registration is here; the
        // map is emptied only once all of them are handed over, for `registrations` to list.
        let early: Vec<(Service, Takeover)> = self
            .early_registrations
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for (service, takeover) in early {
            if *self.shut.lock().unwrap() {
                break;
            }
            match registry.register_with(&service, takeover).await {
                Ok(Registered::Now) => {}
                Ok(Registered::Later(e)) => {
                    tracing::warn!(service = %service.name, "registration kept for later: {e}")
                }
                Err(e) => tracing::warn!(service = %service.name, "registration refused: {e}"),
            }
        }
        self.early_registrations.lock().unwrap().clear();
        true
    }

    /// Records a failed attempt to connect the registry.
    pub fn connect_failed(&self) {
        *self.connect_failed_at.lock().unwrap() = Some(Instant::now());
    }

    /// The registry, once set and its early registrations handed over.
    async fn settled(&self) -> Option<Arc<dyn Registry>> {
        let inner = self.inner.get()?.clone();
        drop(self.handover.lock().await);
        Some(inner)
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
    async fn register_with(
        &self,
        service: &Service,
        takeover: Takeover,
    ) -> Result<Registered, RegistryError> {
        check_registration(service)?;
        {
            let mut early = self.early_registrations.lock().unwrap();
            if self.inner.get().is_none() {
                for node in &service.nodes {
                    early.insert(
                        (service.name.clone(), node.id.clone()),
                        (service.with_single_node(node), takeover),
                    );
                }
                return Ok(Registered::Later(not_connected("register")));
            }
        }
        let inner = self.settled().await.expect("set before it was seen");
        inner.register_with(service, takeover).await
    }

    async fn deregister(&self, service: &str, node_id: &str) -> Result<(), RegistryError> {
        {
            let mut early = self.early_registrations.lock().unwrap();
            if self.inner.get().is_none() {
                let key = (service.to_string(), node_id.to_string());
                return match early.remove(&key) {
                    Some(_) => Ok(()),
                    None => Err(not_connected("deregister")),
                };
            }
        }
        let inner = self.settled().await.expect("set before it was seen");
        inner.deregister(service, node_id).await
    }

    async fn get_service(&self, name: &str) -> Result<Vec<Service>, RegistryError> {
        self.inner("get_service")?.get_service(name).await
    }

    async fn list_services(&self) -> Result<Vec<String>, RegistryError> {
        self.inner("list_services")?.list_services().await
    }

    async fn list_all(&self) -> Result<Vec<Service>, RegistryError> {
        self.inner("list_all")?.list_all().await
    }

    async fn verify_credentials(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Verdict, RegistryError> {
        self.inner("verify_credentials")?
            .verify_credentials(user, password)
            .await
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
        let connect_failed_at = *self.connect_failed_at.lock().unwrap();
        match self.inner.get() {
            Some(inner) => {
                let health = inner.health();
                Health {
                    last_failure: health.last_failure.max(connect_failed_at),
                    ..health
                }
            }
            None => Health {
                watch_connected: false,
                last_contact: None,
                last_failure: connect_failed_at,
            },
        }
    }

    /// Before the registry is set, the early registrations; during the handover, the
    /// registry's and those not handed over yet; then the registry's.
    fn registrations(&self) -> Vec<Service> {
        let mut all: BTreeMap<(String, String), Service> = self
            .early_registrations
            .lock()
            .unwrap()
            .iter()
            .map(|(key, (service, _))| (key.clone(), service.clone()))
            .collect();
        if let Some(inner) = self.inner.get() {
            for service in inner.registrations() {
                if let Some(node) = service.nodes.first() {
                    all.insert((service.name.clone(), node.id.clone()), service);
                }
            }
        }
        all.into_values().collect()
    }

    fn conflicts(&self) -> Vec<Conflict> {
        self.inner
            .get()
            .map_or_else(Vec::new, |inner| inner.conflicts())
    }

    async fn shutdown(&self) {
        let inner = {
            let mut shut = self.shut.lock().unwrap();
            *shut = true;
            self.inner.get().cloned()
        };
        self.pending.lock().unwrap().clear();
        // A handover in progress stops at its next registration (`shut` is set); wait for it,
        // so that nothing is registered after the lease is revoked.
        drop(self.handover.lock().await);
        self.early_registrations.lock().unwrap().clear();
        if let Some(inner) = inner {
            inner.shutdown().await;
        }
        let forwarders: Vec<_> = self.forwarders.lock().unwrap().drain(..).collect();
        for forwarder in forwarders {
            // The registry's watch is closed by its shutdown; a watcher that stopped reading
            // could still hold a forwarder at a full queue, so it is aborted, not awaited alone.
            forwarder.abort();
            let _ = forwarder.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;
    use crate::registry::memory::MemoryRegistry;

    fn service() -> Service {
        crate::registry::one_node_service("greeter", "1", "n1")
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

    /// A deregistration made while early registrations are being handed over waits for the
    /// handover: the node is not written back after it was deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deregistration_during_the_handover_is_not_overtaken() {
        let deferred = Arc::new(Deferred::new());
        deferred.connect_failed();
        assert!(deferred.health().last_failure.is_some());
        let _ = deferred.register(&service()).await.unwrap();
        let memory = Arc::new(MemoryRegistry::new());
        memory.set_latency(std::time::Duration::from_millis(300));
        let setter = {
            let (deferred, memory) = (deferred.clone(), memory.clone());
            tokio::spawn(async move { deferred.set(memory).await })
        };
        // Once the registry is visible, the handover is under way (or done).
        while deferred.inner.get().is_none() {
            tokio::task::yield_now().await;
        }
        deferred.deregister("greeter", "n1").await.unwrap();
        assert!(setter.await.unwrap());
        assert!(
            memory.registrations().is_empty(),
            "deleted, and stays deleted"
        );
        assert!(deferred.registrations().is_empty());
        assert!(
            deferred.health().last_failure.is_some(),
            "failed connects still count"
        );
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
