//! The host process around the library's [`Host`]: logging, the async runtime and the signals.
//! SIGTERM and SIGINT drain and stop the host; SIGHUP reloads the policy file.
//!
//! Stopping is prompt whatever a policy compile is doing: the signal ends the compiles in
//! flight (their children are killed, their swaps refused), and the runtime waits at most
//! [`BLOCKING_GRACE`] for blocking work left (a compile started while the host was still
//! building has no engine to stop it yet: its child dies with this process).

use std::time::Duration;

use anyhow::Context;
use regcache::Host;
use regcache::config::{HostConfig, LogFormat};
use regcache::policy::reload::Reloader;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// How long the runtime waits, once the host has stopped, for blocking tasks still running.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// Runs the host until SIGTERM or SIGINT. Errors are start-up failures (a secret file that
/// cannot be read, a port in use, a policy that does not load).
pub fn run(config: HostConfig) -> anyhow::Result<()> {
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        // Installed before the host binds its ports: a signal that arrives once the port
        // answers is never the default action (which would kill the process undrained).
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        // A signal during the build (etcd's first connection may take the request timeout)
        // stops the start: nothing is served yet, so there is nothing to drain.
        let host = tokio::select! {
            host = Host::build(config) => host?,
            name = stop_signal(&mut term, &mut int) => {
                tracing::info!("{name} while starting: stopped");
                return Ok(());
            }
        };
        let reloads = tokio::spawn(reload_on_sighup(hangups, host.policy_reloader()));
        host.serve(async {
            let name = stop_signal(&mut term, &mut int).await;
            tracing::info!("{name}");
        })
        .await?;
        reloads.abort();
        tracing::info!("bye");
        Ok(())
    });
    // Dropping the runtime would wait for every blocking task, however long it runs.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    result
}

/// The first of SIGTERM and SIGINT; its name.
async fn stop_signal(term: &mut Signal, int: &mut Signal) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Logs to stderr, filtered by `REGCACHE_LOG` (default `info`).
pub(super) fn init_logging(format: LogFormat) {
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

/// Reloads the policy file on every SIGHUP (or logs that there is none to reload).
async fn reload_on_sighup(mut hangups: Signal, reloader: Option<Reloader>) {
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
}
