//! Counters of what the etcd registry did, for the host to export as metrics.
//!
//! They are plain atomics (and one small map for requests by op and result) so that this module
//! knows nothing about the metrics library; the host copies a [`StatsSnapshot`] into its own
//! registry of metrics when scraped.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by the registry's tasks.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub(crate) malformed_values: AtomicU64,
    pub(crate) lease_grants: AtomicU64,
    pub(crate) lease_regrants: AtomicU64,
    pub(crate) keepalive_stream_starts: AtomicU64,
    pub(crate) watch_starts: AtomicU64,
    pub(crate) watch_restarts: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) reputs: AtomicU64,
    pub(crate) conflicts: AtomicU64,
    pub(crate) endpoint_removals: AtomicU64,
    pub(crate) endpoint_additions: AtomicU64,
}

impl Stats {
    /// Counts one finished request of `op` ending in `result` (`ok` or an error kind).
    pub(crate) fn request(&self, op: &'static str, result: &'static str) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((op, result))
            .or_default() += 1;
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: self.requests.lock().unwrap().clone(),
            malformed_values: get(&self.malformed_values),
            lease_grants: get(&self.lease_grants),
            lease_regrants: get(&self.lease_regrants),
            keepalive_stream_starts: get(&self.keepalive_stream_starts),
            watch_starts: get(&self.watch_starts),
            watch_restarts: get(&self.watch_restarts),
            resyncs: get(&self.resyncs),
            retries: get(&self.retries),
            reputs: get(&self.reputs),
            conflicts: get(&self.conflicts),
            endpoint_removals: get(&self.endpoint_removals),
            endpoint_additions: get(&self.endpoint_additions),
        }
    }
}

/// A copy of the registry's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests to etcd by (operation, result); result is `ok` or an
    /// [`ErrorKind`](crate::registry::ErrorKind) name. Operations are the registry calls
    /// (`register`, `get_service`, ...) and the background ones (`lease_grant`, `reput`,
    /// `relist`, `lease_revoke`).
    pub requests: BTreeMap<(&'static str, &'static str), u64>,
    /// Values under the prefix that could not be decoded and were skipped (each sighting).
    pub malformed_values: u64,
    /// Leases granted, the first one included.
    pub lease_grants: u64,
    /// Leases granted to replace a lost one.
    pub lease_regrants: u64,
    /// LeaseKeepAlive streams opened.
    pub keepalive_stream_starts: u64,
    /// Watch streams created, the first one included.
    pub watch_starts: u64,
    /// Watch streams re-created after a loss (stream end, cancellation, compaction).
    pub watch_restarts: u64,
    /// Full re-lists sent to watchers as `Resync` after a compaction.
    pub resyncs: u64,
    /// Calls retried after a transient failure (another endpoint, leader change).
    pub retries: u64,
    /// Owned keys written again after a lease loss or a deletion seen on the watch.
    pub reputs: u64,
    /// Owned keys found held by someone else (a forced registration elsewhere, a put by hand
    /// on a lease), each time such a conflict starts; they are not written back. Registrations
    /// answered during an outage and refused when written (dropped) count here too.
    pub conflicts: u64,
    /// Endpoints taken out of the client's balancer because they stopped answering (dead or
    /// hung).
    pub endpoint_removals: u64,
    /// Endpoints put back into the balancer once they answered again.
    pub endpoint_additions: u64,
}

impl StatsSnapshot {
    /// Requests of `op` with `result`.
    pub fn requests(&self, op: &str, result: &str) -> u64 {
        self.requests
            .iter()
            .filter(|((o, r), _)| *o == op && *r == result)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests of `op` that failed, whatever the kind.
    pub fn failures(&self, op: &str) -> u64 {
        self.requests
            .iter()
            .filter(|((o, r), _)| *o == op && *r != "ok")
            .map(|(_, n)| n)
            .sum()
    }
}
