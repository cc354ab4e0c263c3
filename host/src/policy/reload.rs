//! Hot reload of a policy file: on demand (SIGHUP, the admin API) and when the file changes.
//!
//! Editors and build tools write files in several steps, so a change event may arrive while the
//! file is half-written. The watcher waits for the events to settle, then loads; a load that
//! fails (say, a truncated component) is logged and the active policy stays, and the next write
//! of the file triggers another attempt. Reloading bytes identical to the active policy is a
//! no-op, so spurious events never bump the generation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{PolicyEngine, PolicyError, PolicySpec, artifacts};
use crate::decision::{Decide, PolicyInfo};

/// How long the file must stay quiet before it is read.
const SETTLE: Duration = Duration::from_millis(100);

/// Reloads one policy file into one engine.
#[derive(Clone)]
pub struct Reloader {
    engine: PolicyEngine,
    path: PathBuf,
}

impl Reloader {
    /// A reloader of `path` into `engine`, keeping the active operator configuration.
    pub fn new(engine: PolicyEngine, path: impl Into<PathBuf>) -> Self {
        Reloader {
            engine,
            path: path.into(),
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the file now. `Ok(None)` when it holds the active policy already.
    pub fn reload(&self) -> Result<Option<Arc<PolicyInfo>>, PolicyError> {
        let spec = PolicySpec::from_file(&self.path, self.engine.active_config())?;
        if artifacts::hex_sha256(&spec.wasm) == self.engine.active().digest {
            return Ok(None);
        }
        self.engine.swap(spec).map(Some)
    }

    /// Watches the file's directory (so that atomic renames are seen too) and reloads on every
    /// settled change until the returned task is aborted.
    pub fn watch(self) -> notify::Result<tokio::task::JoinHandle<()>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let file_name = self.path.file_name().map(|n| n.to_os_string());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && event
                        .paths
                        .iter()
                        .any(|p| p.file_name() == file_name.as_deref())
                {
                    let _ = tx.send(());
                }
            })?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(tokio::spawn(async move {
            let _watcher = watcher; // dropping it would stop the events
            while rx.recv().await.is_some() {
                // Wait until the writes settle.
                while tokio::time::timeout(SETTLE, rx.recv())
                    .await
                    .is_ok_and(|e| e.is_some())
                {}
                let reloader = self.clone();
                let outcome = tokio::task::spawn_blocking(move || reloader.reload()).await;
                match outcome {
                    Ok(Ok(Some(info))) => {
                        tracing::info!(policy = %info, "policy file changed; swapped")
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(err)) => tracing::warn!(
                        path = %self.path.display(),
                        "policy file changed but was refused, keeping the active policy: {err}"
                    ),
                    Err(err) => tracing::error!("policy reload task failed: {err}"),
                }
            }
        }))
    }
}
