//! Hot reload of a policy file: on demand (SIGHUP) and when the file changes.
//!
//! Editors and build tools write files in several steps, so a change event may arrive while the
//! file is half-written. The watcher loads as soon as a writer says it is done (it closed the
//! file after writing, or renamed it into place); otherwise it waits for the events to settle.
//! A load that fails (say, a truncated component) is logged and the active policy stays, and
//! the next write of the file triggers another attempt.
//!
//! The watcher reacts only to writes, creations, renames and removals: the reload's own read of
//! the file raises an "opened" event, and reacting to it would reload forever. It also loads
//! only bytes it has not seen in the file before, so a policy swapped in through the admin API
//! stays active until the file really changes (or SIGHUP asks for the file again). Every load
//! from the file uses the operator's configuration for the file, whatever the API last set.
//! A policy the engine rolled back is not loaded from the file again, on a change or on SIGHUP:
//! the file is loaded once it holds another policy; the rolled-back one itself comes back only
//! through the admin API (the operator's explicit word) or a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{PolicyEngine, PolicyError, PolicySpec, artifacts};
use crate::decision::{Decide, PolicyInfo};

/// How long the file must stay quiet before it is read, when no writer said it was done.
const SETTLE: Duration = Duration::from_millis(100);

/// Reloads one policy file into one engine.
#[derive(Clone)]
pub struct Reloader {
    engine: PolicyEngine,
    path: PathBuf,
    config: Vec<(String, String)>,
    /// Digest of the bytes last read from the file; the policy active when the reloader was
    /// made is taken to have come from it.
    last_seen: Arc<Mutex<String>>,
}

impl Reloader {
    /// A reloader of `path` into `engine`, loading it with the operator's `config`.
    pub fn new(
        engine: PolicyEngine,
        path: impl Into<PathBuf>,
        config: Vec<(String, String)>,
    ) -> Self {
        let last_seen = Arc::new(Mutex::new(engine.active().digest.clone()));
        Reloader {
            engine,
            path: path.into(),
            config,
            last_seen,
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the file now (SIGHUP). `Ok(None)` when it holds the active policy already.
    pub fn reload(&self) -> Result<Option<Arc<PolicyInfo>>, PolicyError> {
        self.load(false)
    }

    /// Loads the file if its bytes are new since the last read (a change on disk).
    fn reload_if_changed(&self) -> Result<Option<Arc<PolicyInfo>>, PolicyError> {
        self.load(true)
    }

    fn load(&self, only_if_changed: bool) -> Result<Option<Arc<PolicyInfo>>, PolicyError> {
        let spec = PolicySpec::from_file(
            &self.path,
            self.config.clone(),
            self.engine.load_limits().max_size,
        )?;
        let digest = artifacts::hex_sha256(&spec.wasm);
        let previous = std::mem::replace(
            &mut *self
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            digest.clone(),
        );
        if (only_if_changed && previous == digest) || digest == self.engine.active().digest {
            return Ok(None);
        }
        if self.engine.was_rolled_back(&digest) {
            return Err(PolicyError::RolledBack { digest });
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
                    && changes_content(&event.kind)
                    && event
                        .paths
                        .iter()
                        .any(|p| p.file_name() == file_name.as_deref())
                {
                    let _ = tx.send(completes_writing(&event.kind));
                }
            })?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(tokio::spawn(async move {
            let _watcher = watcher; // dropping it would stop the events
            while let Some(mut complete) = rx.recv().await {
                while !complete {
                    match tokio::time::timeout(SETTLE, rx.recv()).await {
                        Ok(Some(done)) => complete = done,
                        Ok(None) | Err(_) => break, // settled
                    }
                }
                let reloader = self.clone();
                let outcome =
                    tokio::task::spawn_blocking(move || reloader.reload_if_changed()).await;
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

/// Whether an event says a writer is done: it closed the file after writing, or renamed a
/// finished file into place.
fn completes_writing(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

/// Whether an event can mean new content: not an open, a read or a close after reading.
fn changes_content(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}
