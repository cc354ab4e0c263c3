//! The host's run loop: build everything from a validated [`HostConfig`], serve, drain, stop.
//!
//! 1. Logging (text or JSON); the first line says which registry and policy the host runs on.
//! 2. Secrets are read and the TLS files parsed (the only file reads of configuration happen
//!    here, not in validation): a bad one stops the start with one line naming its setting.
//!    The state dir is prepared; one that cannot be written is a warning, and the host runs
//!    without what it keeps there ([`StateDir`]).
//! 3. The registry: etcd behind a [`Deferred`] that connects in the background (so a host
//!    started while etcd is down still serves its snapshot), or the embedded memory registry.
//! 4. The policy engine: the embedded default or a file (watched, and reloaded on SIGHUP).
//! 5. The cache, primed from the snapshot in the state dir if there is one; the snapshot is
//!    then written periodically.
//! 6. The HTTP server ([`http::serve`]: connection limit and timeouts), until SIGTERM or
//!    SIGINT: then stop accepting, finish requests in flight, write the snapshot, shut the
//!    registry down (revoking the lease, so this host's keys go at once), return.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::cache::{CacheSnapshot, RegistryCache};
use crate::config::ConfigError;
use crate::config::{HostConfig, LogFormat};
use crate::decision::Decide;
use crate::http;
use crate::metrics::{HostMetrics, RegistryStatsSource, Sources};
use crate::policy::reload::Reloader;
use crate::policy::{EngineOptions, PolicyEngine, PolicySpec};
use crate::registry::deferred::Deferred;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::memory::MemoryRegistry;
use crate::registry::{ErrorKind, Registry};
use crate::snapshot::SnapshotFile;
use crate::state_dir::StateDir;

/// Longest wait for requests in flight at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the host until SIGTERM or SIGINT. Errors are start-up failures (a secret file that
/// cannot be read, a port in use, a policy that does not load).
pub fn run(config: HostConfig) -> anyhow::Result<()> {
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REGCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn serve(config: HostConfig) -> anyhow::Result<()> {
    let admin_token = config
        .admin_token
        .as_ref()
        .map(|s| s.read("admin_token"))
        .transpose()?;
    if let Some(etcd) = &config.etcd {
        etcd.check_tls_files()?;
    }
    let registry_desc = match &config.etcd {
        Some(etcd) => format!("etcd at {}", etcd.endpoints.join(",")),
        None => "an embedded in-memory registry (no etcd configured: registrations live only \
                 in this process)"
            .into(),
    };
    let policy_desc = match &config.policy_file {
        Some(path) => format!("policy file {}", path.display()),
        None => "the embedded default policy".into(),
    };
    tracing::info!(
        "regcache {} starting on {registry_desc} with {policy_desc}",
        env!("CARGO_PKG_VERSION")
    );

    // The policy first: a policy that does not load is a start-up error, before any port or
    // registry connection is opened.
    let spec = match &config.policy_file {
        Some(path) => PolicySpec::from_file(path, config.policy_config.clone())
            .map_err(|e| ConfigError::new("policy.file", e.to_string()))?,
        None => PolicySpec::embedded_default(config.policy_config.clone()),
    };
    let state_dir = config.state_dir.as_deref().map(StateDir::open);
    let options = EngineOptions {
        artifact_dir: state_dir.as_ref().and_then(StateDir::artifact_dir),
        ..Default::default()
    };
    let engine = tokio::task::spawn_blocking(move || PolicyEngine::new(options, spec))
        .await?
        .context("loading the policy")?;
    tracing::info!(policy = %engine.active(), "policy loaded");

    let writable_state_dir = state_dir.as_ref().and_then(StateDir::writable_path);
    let (registry, etcd_stats, connector) = build_registry(&config, writable_state_dir).await?;

    let cache = RegistryCache::builder(registry.clone(), Arc::new(engine.clone()))
        .refresh_timeout(refresh_timeout(&config))
        .build();
    let snapshot_file = state_dir.as_ref().and_then(StateDir::snapshot_to_write);
    let serving_snapshot = Arc::new(AtomicBool::new(false));
    // The embedded registry's registrations end with the process: a snapshot of them would
    // be served as the registry's answer although nothing registered them in this run.
    let snapshot_to_read = state_dir
        .as_ref()
        .and_then(StateDir::snapshot_to_read)
        .filter(|_| config.etcd.is_some());
    if let Some(file) = snapshot_to_read {
        match file.read::<CacheSnapshot>() {
            Ok(Some(snapshot)) => {
                let imported = cache.import(&snapshot);
                tracing::info!(services = imported, path = %file.path().display(), "snapshot loaded");
                if imported > 0 && !registry.health().watch_connected {
                    serving_snapshot.store(true, Ordering::Relaxed);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring the snapshot: {e}"),
        }
    }

    // The policy file: watched, and reloaded on SIGHUP.
    let mut tasks = Vec::new();
    let reloader = config
        .policy_file
        .as_ref()
        .map(|path| Reloader::new(engine.clone(), path.clone(), config.policy_config.clone()));
    if let Some(reloader) = &reloader {
        match reloader.clone().watch() {
            Ok(task) => tasks.push(task),
            Err(e) => {
                tracing::warn!(path = %reloader.path().display(), "cannot watch the policy file (SIGHUP still reloads it): {e}")
            }
        }
    }
    tasks.push(tokio::spawn(reload_on_sighup(reloader)?));

    let connection_stats = Arc::new(http::ConnectionStats::default());
    let metrics = HostMetrics::new(Sources {
        engine: engine.clone(),
        cache: cache.clone(),
        registry: etcd_stats,
        http: connection_stats.clone(),
    });
    let state = Arc::new(http::State {
        cache: cache.clone(),
        registry: registry.clone(),
        engine: engine.clone(),
        metrics,
        admin_token,
        serving_snapshot: serving_snapshot.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "listening on http://{address}");

    if let Some(connector) = connector {
        let flag = serving_snapshot.clone();
        tasks.push(tokio::spawn(async move {
            let _ = connector.await;
            if flag.swap(false, Ordering::Relaxed) {
                tracing::info!("registry answered; no longer serving the snapshot");
            }
        }));
    }
    let (stop_snapshots, snapshots_stopped) = tokio::sync::watch::channel(());
    let periodic_snapshots = snapshot_file.clone().map(|file| {
        tokio::spawn(write_periodically(
            file,
            cache.clone(),
            config.snapshot_interval,
            snapshots_stopped,
        ))
    });

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = config.http.limits();
    let server = tokio::spawn(async move {
        http::serve(
            listener,
            http::router(state),
            limits,
            connection_stats,
            async {
                let _ = drain_rx.await;
            },
        )
        .await
    });
    let signal_name = shutdown_signal().await?;
    tracing::info!("{signal_name}: draining requests");
    let _ = drain_tx.send(());
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("HTTP server task failed: {e}"),
        Err(_) => tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; stopping"),
    }
    for task in &tasks {
        task.abort();
    }
    // The periodic writer is stopped, not aborted: aborting would not stop a write already
    // running on a blocking thread, which could then rename an older snapshot over the final
    // one. It finishes the write in flight, if any, and returns.
    drop(stop_snapshots);
    if let Some(task) = periodic_snapshots {
        let _ = task.await;
    }
    // The snapshot first: it records the registry as this host saw it, not the removal of
    // this host's own keys that the lease revocation is about to cause.
    if let Some(file) = &snapshot_file
        && let Err(e) = write_snapshot(file, &cache).await
    {
        tracing::warn!("{e}");
    }
    // The registry logs whether it could delete its keys and revoke its lease.
    registry.shutdown().await;
    tracing::info!("registry shut down");
    tracing::info!("bye");
    Ok(())
}

/// How long the cache lets one refresh's registry request run: etcd's configured request
/// timeout, so that an operator who allows etcd more time than the cache's default gets it
/// (the embedded registry answers at once; the default is kept for it).
fn refresh_timeout(config: &HostConfig) -> Duration {
    config
        .etcd
        .as_ref()
        .map_or(DEFAULT_REFRESH_TIMEOUT, |etcd| etcd.request_timeout)
}

/// The refresh timeout without etcd (the cache's own default).
const DEFAULT_REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// The registry and, for etcd, its counters and a future that completes once it is connected.
/// etcd gets the state dir only if it can be written: its leases file is worth reading only
/// if it is kept up to date, and every lease grant would warn about it otherwise.
async fn build_registry(
    config: &HostConfig,
    state_dir: Option<&std::path::Path>,
) -> anyhow::Result<(
    Arc<dyn Registry>,
    RegistryStatsSource,
    Option<tokio::task::JoinHandle<()>>,
)> {
    let Some(etcd) = &config.etcd else {
        return Ok((Arc::new(MemoryRegistry::new()), Arc::new(|| None), None));
    };
    let password = etcd
        .user
        .as_ref()
        .map(|(_, secret)| secret.read("etcd.password"))
        .transpose()?;
    let mut etcd_config = etcd.registry_config(password);
    if let Some(dir) = state_dir {
        etcd_config = etcd_config.state_dir(dir);
    }
    let deferred = Arc::new(Deferred::new());
    let connected: Arc<std::sync::OnceLock<Arc<EtcdRegistry>>> = Arc::default();

    // The first attempt is made here so that what retrying cannot fix (an unreadable TLS
    // file) stops the start; anything else is retried in the background.
    let first = EtcdRegistry::connect(etcd_config.clone()).await;
    let pending = match first {
        Ok(registry) => {
            let registry = Arc::new(registry);
            let _ = connected.set(registry.clone());
            deferred.set(registry).await;
            tracing::info!("connected to etcd");
            None
        }
        Err(e) if e.kind == ErrorKind::InvalidInput => {
            return Err(anyhow::Error::new(e).context("connecting to etcd"));
        }
        Err(e) => {
            tracing::warn!("etcd does not answer yet; retrying in the background: {e}");
            deferred.connect_failed();
            Some(e)
        }
    };
    let connector = {
        let (deferred, connected) = (deferred.clone(), connected.clone());
        tokio::spawn(async move {
            if pending.is_none() {
                return;
            }
            let mut delay = Duration::from_millis(100);
            loop {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                match EtcdRegistry::connect(etcd_config.clone()).await {
                    Ok(registry) => {
                        let registry = Arc::new(registry);
                        let _ = connected.set(registry.clone());
                        if deferred.set(registry).await {
                            tracing::info!("connected to etcd");
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::debug!("etcd still does not answer: {e}");
                        deferred.connect_failed();
                    }
                }
            }
        })
    };
    let stats: RegistryStatsSource = Arc::new(move || connected.get().map(|r| r.stats()));
    Ok((deferred, stats, Some(connector)))
}

/// Reloads the policy file on every SIGHUP (or logs that there is none to reload).
fn reload_on_sighup(
    reloader: Option<Reloader>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(async move {
        while hangups.recv().await.is_some() {
            let Some(reloader) = reloader.clone() else {
                tracing::info!("SIGHUP: no policy file is configured; nothing to reload");
                continue;
            };
            match tokio::task::spawn_blocking(move || reloader.reload()).await {
                Ok(Ok(Some(info))) => tracing::info!(policy = %info, "SIGHUP: policy reloaded"),
                Ok(Ok(None)) => tracing::info!("SIGHUP: the policy file is unchanged"),
                Ok(Err(e)) => tracing::warn!("SIGHUP: policy refused, keeping the active one: {e}"),
                Err(e) => tracing::error!("SIGHUP: reload task failed: {e}"),
            }
        }
    })
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Writes the snapshot every `interval` until `stop`'s sender is dropped; a write in flight
/// is finished first.
async fn write_periodically(
    file: SnapshotFile,
    cache: RegistryCache,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // A state dir that stops being writable fails every interval: warned once, until a write
    // succeeds again.
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        match write_snapshot(&file, &cache).await {
            Ok(()) if failing => {
                tracing::info!("snapshot written again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if failing => tracing::debug!("{e}"),
            Err(e) => {
                tracing::warn!("{e} (warned once until a write succeeds)");
                failing = true;
            }
        }
    }
}

/// Writes the cache to `file` on a blocking thread (fsync takes milliseconds); the error says
/// why it could not.
async fn write_snapshot(file: &SnapshotFile, cache: &RegistryCache) -> Result<(), String> {
    let snapshot = cache.export();
    if snapshot.entries.is_empty() {
        // Never replace a useful snapshot with an empty one (say, a host that was restarted
        // while etcd is down and has looked nothing up yet).
        return Ok(());
    }
    let file = file.clone();
    let services = snapshot.entries.len();
    match tokio::task::spawn_blocking(move || file.write(&snapshot).map(|()| file)).await {
        Ok(Ok(file)) => {
            tracing::debug!(services, path = %file.path().display(), "snapshot written");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("cannot write the snapshot: {e}")),
        Err(e) => Err(format!("snapshot task failed: {e}")),
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
        assert_eq!(refresh_timeout(&config("")), DEFAULT_REFRESH_TIMEOUT);
    }
}
