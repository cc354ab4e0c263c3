//! The host's registry: etcd behind a [`Deferred`] that connects in the background when etcd
//! does not answer at start (so that a host started during an outage still serves its
//! snapshot), or the embedded in-memory registry when no etcd is configured.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::config::{HostConfig, settings};
use crate::metrics::RegistryStatsSource;
use crate::registry::deferred::Deferred;
use crate::registry::etcd::{EtcdConfig, EtcdRegistry};
use crate::registry::memory::MemoryRegistry;
use crate::registry::{ErrorKind, Registry};

/// First pause between connection attempts; doubled after each, up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Longest pause between connection attempts: a host started during an outage is connected
/// within two seconds of etcd's return.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// The registry the host serves from.
pub(super) struct HostRegistry {
    pub(super) registry: Arc<dyn Registry>,
    /// etcd's counters, once connected.
    pub(super) stats: RegistryStatsSource,
    /// The connection still to make, if etcd did not answer the first attempt.
    pub(super) pending: Option<PendingConnection>,
}

/// A connection to etcd that [`PendingConnection::retry`] makes in the background.
pub(super) struct PendingConnection {
    config: EtcdConfig,
    deferred: Arc<Deferred>,
    connected: Arc<OnceLock<Arc<EtcdRegistry>>>,
}

/// The registry of `config`. etcd gets the state dir only if it can be written: its leases
/// file is worth reading only if it is kept up to date, and every lease grant would warn about
/// it otherwise.
pub(super) async fn registry(
    config: &HostConfig,
    state_dir: Option<&Path>,
) -> anyhow::Result<HostRegistry> {
    let Some(etcd) = &config.etcd else {
        return Ok(HostRegistry {
            registry: Arc::new(MemoryRegistry::new()),
            stats: Arc::new(|| None),
            pending: None,
        });
    };
    let password = etcd
        .user
        .as_ref()
        .map(|(_, secret)| secret.read(&settings::ETCD_PASSWORD, &settings::ETCD_PASSWORD_FILE))
        .transpose()?;
    let mut etcd_config = etcd.registry_config(password);
    if let Some(dir) = state_dir {
        etcd_config = etcd_config.state_dir(dir);
    }
    let deferred = Arc::new(Deferred::new());
    let connected: Arc<OnceLock<Arc<EtcdRegistry>>> = Arc::default();
    let stats: RegistryStatsSource = {
        let connected = connected.clone();
        Arc::new(move || connected.get().map(|registry| registry.stats()))
    };
    let pending = PendingConnection {
        config: etcd_config,
        deferred: deferred.clone(),
        connected,
    };
    // The first attempt is made here so that what retrying cannot fix (an unreadable TLS
    // file) stops the start; anything else is retried in the background.
    let pending = match EtcdRegistry::connect(pending.config.clone()).await {
        Ok(registry) => {
            pending.accept(registry).await;
            None
        }
        Err(e) if e.kind == ErrorKind::InvalidInput => {
            return Err(anyhow::Error::new(e).context("connecting to etcd"));
        }
        Err(e) => {
            tracing::warn!("etcd does not answer yet; retrying in the background: {e}");
            deferred.connect_failed();
            Some(pending)
        }
    };
    Ok(HostRegistry {
        registry: deferred,
        stats,
        pending,
    })
}

impl PendingConnection {
    /// Connects, retrying with a growing pause until etcd answers (or the task is aborted);
    /// then the host no longer serves its snapshot as such.
    pub(super) async fn retry(self, serving_snapshot: Arc<AtomicBool>) {
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
            match EtcdRegistry::connect(self.config.clone()).await {
                Ok(registry) => {
                    self.accept(registry).await;
                    if serving_snapshot.swap(false, Ordering::Relaxed) {
                        tracing::info!("registry answered; no longer serving the snapshot");
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!("etcd still does not answer: {e}");
                    self.deferred.connect_failed();
                }
            }
        }
    }

    async fn accept(&self, registry: EtcdRegistry) {
        let registry = Arc::new(registry);
        let _ = self.connected.set(registry.clone());
        if self.deferred.set(registry).await {
            tracing::info!("connected to etcd");
        }
    }
}
