//! [`Host`]: a whole regcache host as one value, built in one step and served in another, as
//! linkerd2-proxy's `main` does: [`Host::build`] does every piece of I/O (secret and TLS files,
//! the state dir, the policy, the registry's first connection, the snapshot, binding the
//! fronts' listeners) and fails with the setting at fault; [`Host::serve`] runs the fronts and
//! the background work until a future completes, then drains, writes the snapshot and shuts the
//! registry down (revoking the lease, so that this host's keys leave etcd at once).
//!
//! The `regcache run` binary is glue around the two calls (logging, the runtime, signals); an
//! embedder or a test builds as many hosts in one process as it likes.
//!
//! Fronts (the HTTP API, the etcd-compatible endpoint) are thin: each takes the host's [`Parts`]
//! and maps its protocol onto the cache, the registry and the policy engine.

mod connect;
mod snapshots;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::cache::RegistryCache;
use crate::config::{ConfigError, HostConfig, settings};
use crate::decision::Decide;
use crate::etcd_api;
use crate::http;
use crate::metrics::{HostMetrics, Sources};
use crate::policy::reload::Reloader;
use crate::policy::{PolicyEngine, PolicySpec};
use crate::registry::Registry;
use crate::registry::etcd::DEFAULT_PREFIX;
use crate::registry::layout::GoMicro;
use crate::state_dir::StateDir;

use self::connect::PendingConnection;
use self::snapshots::Snapshots;

/// Longest wait for requests in flight at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one refresh may wait for the embedded registry (it answers at once); with etcd the
/// cache waits as long as an etcd request may take.
const EMBEDDED_REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// What every front serves from: the library's running parts, cheap to clone.
#[derive(Clone)]
pub(crate) struct Parts {
    /// The lookup path.
    pub(crate) cache: RegistryCache,
    /// Registrations and listings.
    pub(crate) registry: Arc<dyn Registry>,
    /// The policy, for the admin endpoints.
    pub(crate) engine: PolicyEngine,
    /// Rendered at scrape.
    pub(crate) metrics: Arc<HostMetrics>,
    /// Set while answers come from a snapshot because the registry has not answered since the
    /// start: fronts mark them stale.
    pub(crate) serving_snapshot: Arc<AtomicBool>,
}

impl Parts {
    /// Deregisters a node this host registered, on its process's word: from the registry, and
    /// from the cache at once (see [`RegistryCache::forget_deregistered`]).
    pub(crate) async fn deregister(
        &self,
        service: &str,
        node_id: &str,
    ) -> Result<(), crate::registry::RegistryError> {
        self.registry.deregister(service, node_id).await?;
        self.cache.forget_deregistered(service, node_id);
        Ok(())
    }

    /// Whether answers come from the snapshot read at start.
    pub(crate) fn serving_snapshot(&self) -> bool {
        self.serving_snapshot.load(Ordering::Relaxed)
    }
}

/// A regcache host: the cache, its policy engine, its registry and its fronts, built and ready
/// to serve. See the [crate] documentation for an example.
pub struct Host {
    parts: Parts,
    http: http::Front,
    etcd_api: Option<etcd_api::Front>,
    reloader: Option<Reloader>,
    pending_connection: Option<PendingConnection>,
    snapshots: Snapshots,
}

impl Host {
    /// Builds a host from a validated configuration: reads the secret and TLS files, prepares
    /// the state dir, loads the policy, connects to etcd (or, if etcd does not answer yet,
    /// defers the connection to the background and serves the snapshot meanwhile), reads the
    /// snapshot and binds the HTTP listener. Nothing is served until [`Host::serve`].
    ///
    /// Errors are what retrying cannot fix, each naming its setting, flag and variable where
    /// one is at fault: a secret or TLS file that cannot be read, a policy that does not load,
    /// an address that cannot be bound.
    pub async fn build(config: HostConfig) -> anyhow::Result<Host> {
        let admin_token = config
            .admin_token
            .as_ref()
            .map(|secret| secret.read(&settings::ADMIN_TOKEN, &settings::ADMIN_TOKEN_FILE))
            .transpose()?;
        if let Some(etcd) = &config.etcd {
            etcd.check_tls_files()?;
        }
        tracing::info!(
            "regcache {} starting on {} with {}",
            env!("CARGO_PKG_VERSION"),
            describe_registry(&config),
            describe_policy(&config),
        );

        // The policy first: one that does not load stops the start before any port or
        // connection is opened.
        let policy = &config.policy;
        let spec = match &policy.file {
            Some(path) => PolicySpec::from_file(path, policy.config.clone(), policy.load.max_size)
                .map_err(|e| ConfigError::new(settings::POLICY_FILE.key, e.to_string()))?,
            None => PolicySpec::embedded_default(policy.config.clone()),
        };
        let state_dir = config.state_dir.as_deref().map(StateDir::open);
        let options = policy.engine_options(state_dir.as_ref().and_then(StateDir::artifact_dir));
        let source = spec.source.clone();
        let engine = tokio::task::spawn_blocking(move || PolicyEngine::new(options, spec))
            .await?
            .with_context(|| format!("loading the policy {source}"))?;
        tracing::info!(policy = %engine.active(), "policy loaded");

        let writable_state_dir = state_dir.as_ref().and_then(StateDir::writable_path);
        let registry = connect::registry(&config, writable_state_dir).await?;
        let cache = RegistryCache::builder(registry.registry.clone(), Arc::new(engine.clone()))
            .refresh_timeout(refresh_timeout(&config))
            .record_changes(config.etcd_api.is_some())
            .build();

        // The embedded registry's registrations end with the process: a snapshot of them
        // would be served as the registry's answer although nothing registered them in this
        // run.
        let snapshots = Snapshots::new(state_dir.as_ref(), config.snapshot_interval);
        let imported = if config.etcd.is_some() {
            snapshots.import_into(&cache)
        } else {
            0
        };
        // Until etcd answers, what the cache holds is the snapshot.
        let serving_snapshot =
            Arc::new(AtomicBool::new(imported > 0 && registry.pending.is_some()));

        let connection_stats = Arc::new(http::ConnectionStats::default());
        let etcd_api_stats = Arc::new(etcd_api::EtcdApiStats::default());
        let metrics = Arc::new(HostMetrics::new(Sources {
            engine: engine.clone(),
            cache: cache.clone(),
            registry: registry.stats,
            http: connection_stats.clone(),
            etcd_api: config.etcd_api.as_ref().map(|_| etcd_api_stats.clone()),
        }));
        let parts = Parts {
            cache,
            registry: registry.registry,
            engine: engine.clone(),
            metrics,
            serving_snapshot,
        };
        // Bound before the HTTP API, whose address line tells a supervisor the host is up.
        let etcd_api = match &config.etcd_api {
            Some(settings) => {
                let prefix = config.etcd.as_ref().map_or(DEFAULT_PREFIX, |e| &e.prefix);
                // etcd's authentication is on exactly when the host logs in to etcd.
                let auth_required = config.etcd.as_ref().is_some_and(|e| e.user.is_some());
                let layout = Arc::new(GoMicro::new(prefix));
                Some(
                    etcd_api::Front::bind(
                        settings.clone(),
                        parts.clone(),
                        layout,
                        auth_required,
                        etcd_api_stats,
                    )
                    .await?,
                )
            }
            None => None,
        };
        let http = http::Front::bind(
            config.listen,
            config.http.limits(),
            connection_stats,
            parts.clone(),
            admin_token,
        )
        .await?;
        let reloader = config
            .policy
            .file
            .as_ref()
            .map(|path| Reloader::new(engine, path.clone(), config.policy.config.clone()));
        Ok(Host {
            parts,
            http,
            etcd_api,
            reloader,
            pending_connection: registry.pending,
            snapshots,
        })
    }

    /// The address the HTTP API listens on (the port chosen if the configuration said 0).
    pub fn http_address(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// The address of the etcd-compatible endpoint, if it is on.
    pub fn etcd_api_address(&self) -> Option<SocketAddr> {
        self.etcd_api.as_ref().map(etcd_api::Front::local_addr)
    }

    /// The cache: lookups in-process, decided by the policy as over HTTP.
    pub fn cache(&self) -> &RegistryCache {
        &self.parts.cache
    }

    /// The registry the cache reads (etcd, or the embedded one): registrations in-process.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.parts.registry
    }

    /// The policy engine: the active policy, its counters, swaps.
    pub fn policy(&self) -> &PolicyEngine {
        &self.parts.engine
    }

    /// The reloader of the configured policy file, for a caller that reloads on demand (the
    /// binary does on SIGHUP); `None` on the embedded default policy.
    pub fn policy_reloader(&self) -> Option<Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` completes: the HTTP API, the watch of the policy file, the
    /// background connection to etcd if it did not answer at build, the periodic snapshot.
    /// Then stops accepting, lets requests in flight finish (at most 10 s), stops the
    /// background work, writes the snapshot and shuts the registry down (deleting this host's
    /// keys and revoking its lease, within one etcd request timeout). The tasks it stopped
    /// have ended when this returns; the rest (the cache's maintenance, the etcd client's
    /// connections) end within moments, as the last handle on what they serve is dropped.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Host {
            parts,
            http,
            etcd_api,
            reloader,
            pending_connection,
            snapshots,
        } = self;
        let mut background = Vec::new();
        if let Some(reloader) = reloader {
            match reloader.clone().watch() {
                Ok(task) => background.push(task),
                Err(e) => tracing::warn!(
                    path = %reloader.path().display(),
                    "cannot watch the policy file (reloading on demand still works): {e}"
                ),
            }
        }
        if let Some(pending) = pending_connection {
            background.push(tokio::spawn(pending.retry(parts.serving_snapshot.clone())));
        }
        let snapshot_writer = snapshots.write_periodically(&parts.cache);

        let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        let drain = move || {
            let mut drain_rx = drain_rx.clone();
            async move {
                let _ = drain_rx.wait_for(|drain| *drain).await;
            }
        };
        let mut servers = tokio::task::JoinSet::new();
        servers.spawn(http.serve(drain()));
        if let Some(etcd_api) = etcd_api {
            servers.spawn(etcd_api.serve(drain()));
        }
        shutdown.await;
        // Before the drain, which would otherwise wait for a policy swap's compile.
        parts.engine.stop_compiling();
        tracing::info!("shutting down: draining requests");
        let _ = drain_tx.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(ended) = servers.join_next().await {
                if let Err(e) = ended {
                    tracing::warn!("a front's server task failed: {e}");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; stopping them");
            // No handler may reach the registry once it is shut down below.
            servers.shutdown().await;
        }
        for task in background {
            task.abort();
            let _ = task.await;
        }
        // The snapshot first: it records the registry as this host saw it, not the removal of
        // this host's own keys that the lease revocation is about to cause.
        snapshot_writer.finish(&parts.cache).await;
        // The registry logs whether it could delete its keys and revoke its lease.
        parts.registry.shutdown().await;
        tracing::info!("registry shut down");
        Ok(())
    }
}

/// How long the cache lets one refresh's registry request run: etcd's configured request
/// timeout, so that an operator who allows etcd more time than the default gets it.
fn refresh_timeout(config: &HostConfig) -> Duration {
    config
        .etcd
        .as_ref()
        .map_or(EMBEDDED_REFRESH_TIMEOUT, |etcd| etcd.request_timeout)
}

fn describe_registry(config: &HostConfig) -> String {
    match &config.etcd {
        Some(etcd) => format!("etcd at {}", etcd.endpoints.join(",")),
        None => "an embedded in-memory registry (no etcd configured: registrations live only \
                 in this process)"
            .into(),
    }
}

fn describe_policy(config: &HostConfig) -> String {
    match &config.policy.file {
        Some(path) => format!("policy file {}", path.display()),
        None => "the embedded default policy".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigLayer;

    fn config(toml: &str) -> HostConfig {
        ConfigLayer::parse_toml(toml, "test")
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn the_cache_waits_for_etcd_as_long_as_etcd_requests_may_take() {
        let etcd = config("[etcd]\nendpoints = [\"127.0.0.1:2379\"]\nrequest_timeout = \"8s\"");
        assert_eq!(refresh_timeout(&etcd), Duration::from_secs(8));
        assert_eq!(refresh_timeout(&config("")), EMBEDDED_REFRESH_TIMEOUT);
    }
}
