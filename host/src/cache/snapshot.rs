//! Export and import of the cached entries, so that a host can write its state to disk and, on
//! a restart while the registry is down, serve it as stale instead of failing every lookup.
//!
//! The snapshot is plain serde data (the file format and its handling belong to the host). Its
//! services are go-micro JSON, read back with [`Service::decode`]'s tolerant rules. Imported
//! entries carry their age, so the policy judges them as old as they really are; suspect nodes
//! are imported as ordinary nodes (their hold does not survive a restart, and losing a node is
//! worse than serving one the registry may still list).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::entry::Entry;
use super::{RegistryCache, wall_ms};
use crate::model::Service;

/// Every cached service, as [`RegistryCache::export`] found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSnapshot {
    /// Wall-clock time of the export, ms since the Unix epoch.
    pub taken_at_ms: u64,
    /// The entries with at least one node.
    pub entries: Vec<SnapshotEntry>,
}

/// One cached service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The service name.
    pub service: String,
    /// Time since the registry last answered for it, at export; `None` if unknown.
    pub age_ms: Option<u64>,
    /// Its versions and nodes, in go-micro's JSON; an export shares them with the cache.
    #[serde(with = "go_micro_json")]
    pub services: Arc<[Service]>,
    /// Nodes that were suspect at export.
    #[serde(default)]
    pub suspect_nodes: Vec<String>,
}

/// A snapshot's services are go-micro JSON, decoded one service at a time with the model's
/// rules but without the per-etcd-value size limit: a cached service merges every node's
/// value, and one of thousands of nodes is far larger than any single value may be.
mod go_micro_json {
    use std::fmt;
    use std::sync::Arc;

    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};

    use crate::model::Service;

    pub fn serialize<S: Serializer>(services: &[Service], s: S) -> Result<S::Ok, S::Error> {
        services.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[Service]>, D::Error> {
        d.deserialize_seq(Services).map(Arc::from)
    }

    struct Services;

    impl<'de> Visitor<'de> for Services {
        type Value = Vec<Service>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of go-micro services")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Service>, A::Error> {
            let mut services = Vec::new();
            while let Some(json) = seq.next_element::<serde_json::Value>()? {
                services.push(Service::from_json(&json).map_err(A::Error::custom)?);
            }
            Ok(services)
        }
    }
}

impl RegistryCache {
    /// Exports every entry that has nodes.
    pub fn export(&self) -> CacheSnapshot {
        let now = Instant::now();
        let mut entries: Vec<SnapshotEntry> = self
            .inner
            .entries
            .iter()
            .filter_map(|e| {
                let view = e.value().view();
                view.cached().then(|| SnapshotEntry {
                    service: e.key().to_string(),
                    age_ms: view
                        .refreshed_at
                        .map(|t| super::millis(now.saturating_duration_since(t))),
                    services: view.services.clone(),
                    suspect_nodes: view.suspects.clone(),
                })
            })
            .collect();
        entries.sort_by(|a, b| a.service.cmp(&b.service));
        CacheSnapshot {
            taken_at_ms: wall_ms(),
            entries,
        }
    }

    /// Imports `snapshot`'s entries for services not cached yet, aged by the time since the
    /// export; returns how many were imported. Imported entries were never attempted, so the
    /// policy may refresh them at once (and serve them stale meanwhile).
    pub fn import(&self, snapshot: &CacheSnapshot) -> usize {
        let now = Instant::now();
        let since_export = Duration::from_millis(wall_ms().saturating_sub(snapshot.taken_at_ms));
        let mut imported = 0;
        for item in &snapshot.entries {
            if item.services.iter().all(|s| s.nodes.is_empty()) {
                continue;
            }
            let age = item
                .age_ms
                .map(|ms| Duration::from_millis(ms).saturating_add(since_export));
            let refreshed_at = age.and_then(|age| now.checked_sub(age));
            let mut inserted = false;
            self.inner
                .entries
                .entry(Arc::from(item.service.as_str()))
                .or_insert_with(|| {
                    inserted = true;
                    let entry = Entry::new(&item.service, self.inner.changes.clone());
                    {
                        let mut state = entry.lock();
                        for service in item.services.iter() {
                            state.upsert(service, now);
                        }
                        state.refreshed_at = refreshed_at;
                        entry.publish(&state);
                    }
                    Arc::new(entry)
                });
            imported += usize::from(inserted);
        }
        imported
    }
}
