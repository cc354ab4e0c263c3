//! The cache's snapshot in the state dir: read once at build, written periodically while the
//! host serves and a last time at shutdown, each write on a blocking thread (fsync takes
//! milliseconds) and never replacing a useful snapshot with an empty one.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::{CacheSnapshot, RegistryCache};
use crate::snapshot::SnapshotFile;
use crate::state_dir::StateDir;

/// The snapshot files of a host's state dir, if it has one.
pub(super) struct Snapshots {
    to_read: Option<SnapshotFile>,
    to_write: Option<SnapshotFile>,
    interval: Duration,
}

/// The periodic writer, stopped by [`PeriodicWriter::finish`].
pub(super) struct PeriodicWriter {
    file: Option<SnapshotFile>,
    stop: watch::Sender<()>,
    task: Option<JoinHandle<()>>,
}

impl Snapshots {
    /// The snapshots of `state_dir`, written every `interval`.
    pub(super) fn new(state_dir: Option<&StateDir>, interval: Duration) -> Self {
        Snapshots {
            to_read: state_dir.and_then(StateDir::snapshot_to_read),
            to_write: state_dir.and_then(StateDir::snapshot_to_write),
            interval,
        }
    }

    /// Loads the snapshot into `cache`; returns how many services it held. A snapshot that
    /// cannot be read is a warning: the host starts without it.
    pub(super) fn import_into(&self, cache: &RegistryCache) -> usize {
        let Some(file) = &self.to_read else {
            return 0;
        };
        match file.read::<CacheSnapshot>() {
            Ok(Some(snapshot)) => {
                let imported = cache.import(&snapshot);
                tracing::info!(services = imported, path = %file.path().display(), "snapshot loaded");
                imported
            }
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!("ignoring the snapshot: {e}");
                0
            }
        }
    }

    /// Starts writing `cache` every interval (if the state dir can be written).
    pub(super) fn write_periodically(self, cache: &RegistryCache) -> PeriodicWriter {
        let (stop, stopped) = watch::channel(());
        let task = self
            .to_write
            .clone()
            .map(|file| tokio::spawn(write_every(self.interval, file, cache.clone(), stopped)));
        PeriodicWriter {
            file: self.to_write,
            stop,
            task,
        }
    }
}

impl PeriodicWriter {
    /// Stops the periodic writes and writes `cache` a last time.
    pub(super) async fn finish(self, cache: &RegistryCache) {
        // Stopped, not aborted: aborting would not stop a write already running on a blocking
        // thread, which could then rename an older snapshot over the final one. The task
        // finishes the write in flight, if any, and returns.
        drop(self.stop);
        if let Some(task) = self.task {
            let _ = task.await;
        }
        if let Some(file) = &self.file
            && let Err(e) = write(file, cache).await
        {
            tracing::warn!("{e}");
        }
    }
}

/// Writes the snapshot every `interval` until `stop`'s sender is dropped.
async fn write_every(
    interval: Duration,
    file: SnapshotFile,
    cache: RegistryCache,
    mut stop: watch::Receiver<()>,
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
        match write(&file, &cache).await {
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

/// Writes the cache to `file` on a blocking thread; the error says why it could not.
async fn write(file: &SnapshotFile, cache: &RegistryCache) -> Result<(), String> {
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
