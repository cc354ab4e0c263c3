//! One service's cache entry: mutable state behind a per-entry lock for writers (refreshes,
//! watch events, eviction guards), and an immutable [`View`] that lookups read lock-free.
//!
//! Writers change [`EntryState`] and then [`Entry::publish`] a new view with one atomic pointer
//! store ([`arc_swap`]); a lookup loads the current view and shares it with its answer. The
//! view is rebuilt only when the entry changes, never per lookup.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::changes::Changes;
use super::flight::Flight;
use crate::decision::EvictionReason;
use crate::model::{Metadata, Node, Service};
use crate::registry::ErrorKind;

/// What lookups see of an entry: immutable, shared by every answer given from it.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Versions with their nodes (suspects included), sorted by version then node id; shared
    /// with snapshot exports, which thus copy no node.
    pub services: Arc<[Service]>,
    /// Suspect node ids, sorted.
    pub suspects: Vec<String>,
    pub versions: u32,
    pub nodes: u32,
    /// The registry said "not found" and no node is cached.
    pub negative: bool,
    /// When the registry last answered for this service (refresh, watch, "not found").
    pub refreshed_at: Option<Instant>,
    /// When the last refresh started.
    pub attempted_at: Option<Instant>,
    pub consecutive_failures: u32,
    pub last_error: Option<ErrorKind>,
    pub in_flight: bool,
    /// A caller's wait for the in-flight refresh already ran out: the registry is slow, and
    /// further callers are not made to queue behind it.
    pub flight_overdue: bool,
}

impl View {
    pub fn cached(&self) -> bool {
        self.nodes > 0
    }
}

/// One cached node.
#[derive(Debug, Clone)]
pub(crate) struct NodeState {
    /// Shared by the nodes of one listing or watch event: a version string per node would
    /// cost more than the reference.
    pub version: Arc<str>,
    pub node: Node,
    /// Last time the registry listed the node (refresh, watch put, resync).
    pub confirmed: Instant,
    /// Kept as suspect by an eviction guard until then.
    pub suspect_until: Option<Instant>,
}

/// What writers change under the entry's lock.
#[derive(Debug, Default)]
pub(crate) struct EntryState {
    /// Each version's service description, without nodes, sorted by version. A service has
    /// one version or a few: a sorted `Vec` costs them, a map would cost a leaf of eleven.
    pub meta: Vec<Service>,
    /// Nodes by id (go-micro keys nodes by service and id, so ids are unique per service).
    pub nodes: BTreeMap<String, NodeState>,
    pub negative: bool,
    pub refreshed_at: Option<Instant>,
    pub attempted_at: Option<Instant>,
    pub consecutive_failures: u32,
    pub last_error: Option<ErrorKind>,
    pub flight: Option<Flight>,
    pub next_flight_id: u64,
    /// Nodes the watch deleted while the current flight was in flight: its listing may have
    /// been read before the delete, so it must not bring them back. Cleared when a flight
    /// starts; a watch put of the node takes it out again.
    pub deleted_in_flight: BTreeSet<String>,
    /// Removals waiting for the batch to be judged, by node id.
    pub pending: BTreeMap<String, EvictionReason>,
    /// When the pending batch opened.
    pub pending_since: Option<Instant>,
    /// Times of removals judged within the eviction window, one per node.
    pub deletions: VecDeque<Instant>,
}

/// A service's entry.
#[derive(Debug)]
pub(crate) struct Entry {
    pub name: Arc<str>,
    view: ArcSwap<View>,
    state: Mutex<EntryState>,
    /// Where changes of the view are recorded, when the cache keeps a feed.
    changes: Option<Arc<Changes>>,
}

impl Entry {
    pub fn new(name: &str, changes: Option<Arc<Changes>>) -> Self {
        Entry {
            name: Arc::from(name),
            view: ArcSwap::from_pointee(View::default()),
            state: Mutex::new(EntryState::default()),
            changes,
        }
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Locks the entry for a write. Never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `state` as the new view, recording what changed for the feed. Writers hold
    /// the entry's lock, so views are published, and changes recorded, in order.
    pub fn publish(&self, state: &EntryState) {
        let view = Arc::new(state.view(&self.name));
        let before = self.view.swap(view.clone());
        if let Some(changes) = &self.changes {
            changes.record_diff(&before.services, &view.services);
        }
    }
}

impl EntryState {
    /// Builds the lookup view.
    fn view(&self, name: &str) -> View {
        let mut by_version: BTreeMap<&str, Service> = BTreeMap::new();
        let mut suspects = Vec::new();
        for (id, node) in &self.nodes {
            if node.suspect_until.is_some() {
                suspects.push(id.clone());
            }
            let service = by_version.entry(&node.version).or_insert_with(|| {
                self.meta(&node.version)
                    .cloned()
                    .unwrap_or_else(|| Service {
                        name: name.to_string(),
                        version: node.version.to_string(),
                        ..Default::default()
                    })
            });
            service.nodes.push(node.node.clone());
        }
        let services: Vec<Service> = by_version.into_values().collect();
        View {
            versions: services.len() as u32,
            nodes: self.nodes.len() as u32,
            services: services.into(),
            suspects,
            negative: self.negative && self.nodes.is_empty(),
            refreshed_at: self.refreshed_at,
            attempted_at: self.attempted_at,
            consecutive_failures: self.consecutive_failures,
            last_error: self.last_error,
            in_flight: self.flight.is_some(),
            flight_overdue: self.flight.as_ref().is_some_and(|f| f.overdue),
        }
    }

    fn meta_position(&self, version: &str) -> Result<usize, usize> {
        self.meta
            .binary_search_by(|meta| meta.version.as_str().cmp(version))
    }

    /// The description of `version`, if known.
    fn meta(&self, version: &str) -> Option<&Service> {
        self.meta_position(version).ok().map(|i| &self.meta[i])
    }

    /// `metadata` for node `id`, sharing the copy of the node it replaces or of the entry's
    /// first node when equal: a service's nodes mostly carry the same metadata, and each
    /// decoded value brings its own copy. Two probes, not a scan, so a listing stays linear.
    fn shared_metadata(&self, id: &str, metadata: &Metadata) -> Metadata {
        [self.nodes.get(id), self.nodes.values().next()]
            .into_iter()
            .flatten()
            .map(|n| &n.node.metadata)
            .find(|m| *m == metadata)
            .unwrap_or(metadata)
            .clone()
    }

    /// Adds or updates the nodes of `service` (one version) as listed by the registry now.
    /// Returns how many suspect nodes became normal again.
    pub fn upsert(&mut self, service: &Service, now: Instant) -> u64 {
        match self.meta_position(&service.version) {
            Ok(i) => self.meta[i] = service.without_nodes(),
            Err(i) => self.meta.insert(i, service.without_nodes()),
        }
        let version: Arc<str> = service.version.as_str().into();
        let mut restored = 0;
        for node in &service.nodes {
            self.pending.remove(&node.id);
            let node = Node {
                metadata: self.shared_metadata(&node.id, &node.metadata),
                ..node.clone()
            };
            let previous = self.nodes.insert(
                node.id.clone(),
                NodeState {
                    version: version.clone(),
                    node,
                    confirmed: now,
                    suspect_until: None,
                },
            );
            if previous.is_some_and(|p| p.suspect_until.is_some()) {
                restored += 1;
            }
        }
        if self.pending.is_empty() {
            self.pending_since = None;
        }
        self.negative = false;
        self.refreshed_at = Some(now);
        restored
    }

    /// Applies a full listing of the service (a refresh or a resync; empty for "not found").
    /// Nodes it lists become normal; nodes it does not list (suspects included: for them the
    /// listing re-confirms the removal) are returned, to be judged by the eviction guard.
    /// Nodes confirmed by the watch after `listed_at` are spared: the listing predates them.
    /// Nodes in `ignored` (deleted by the watch since the listing may have been read) are left
    /// to the watch: neither added back nor judged.
    pub fn apply_listing(
        &mut self,
        listing: &[Service],
        listed_at: Instant,
        now: Instant,
        ignored: &BTreeSet<String>,
    ) -> Listed {
        let mut listed = Listed::default();
        let mut seen = BTreeSet::new();
        for service in listing {
            let kept;
            let service = if ignored.is_empty() {
                service
            } else {
                kept = Service {
                    nodes: service
                        .nodes
                        .iter()
                        .filter(|n| !ignored.contains(&n.id))
                        .cloned()
                        .collect(),
                    ..service.without_nodes()
                };
                &kept
            };
            listed.restored += self.upsert(service, now);
            seen.extend(service.nodes.iter().map(|n| n.id.clone()));
        }
        listed.removals = self
            .nodes
            .iter()
            .filter(|(id, n)| {
                !seen.contains(*id) && !ignored.contains(*id) && n.confirmed <= listed_at
            })
            .map(|(id, _)| id.clone())
            .collect();
        self.meta.retain(|meta| {
            self.nodes.values().any(|n| *n.version == *meta.version)
                || listing.iter().any(|s| s.version == meta.version)
        });
        self.refreshed_at = Some(now);
        listed
    }

    /// Drops suspects whose hold ended; returns how many left.
    pub fn expire_suspects(&mut self, now: Instant) -> u64 {
        let before = self.nodes.len();
        self.nodes
            .retain(|_, n| n.suspect_until.is_none_or(|until| until > now));
        (before - self.nodes.len()) as u64
    }
}

/// What applying a listing did.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    /// Nodes the listing lacks, for the eviction guard.
    pub removals: Vec<String>,
    /// Suspects the listing named again.
    pub restored: u64,
}
