//! The cache's change feed: every change of a node as lookups see it, numbered, kept for a while
//! and broadcast, for fronts that stream changes to their clients (the etcd endpoint's watches).
//!
//! A change is recorded where lookups' view of an entry changes ([`super::entry::Entry::publish`]),
//! so a node the eviction guard keeps as suspect is not deleted here either: its deletion is
//! recorded when the guard lets it go. Services nobody looked up have no entry, and their watch
//! events pass through as the registry sent them.
//!
//! Revisions are the registry's (etcd's): a change that follows one of its events carries that
//! event's revision, any other (a refresh, a suspect's hold running out) the last revision the
//! feed knows, as several changes of one etcd transaction share one. So they never run ahead of
//! etcd's and never go back, and a client can start from a revision it read. The last
//! [`HISTORY`] changes are kept for that; an older start, or a registry resync (etcd compacted
//! what the host missed), is [`Compacted`], which tells the client to list again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::model::{Node, Service};

/// Changes kept for clients resuming from a revision.
pub const HISTORY: usize = 16 * 1024;

/// One node changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The feed's revision of the change.
    pub revision: i64,
    /// The node now, a service of that one node; `None` when it was removed.
    pub current: Option<Service>,
    /// The node before, when the feed knew it.
    pub previous: Option<Service>,
}

impl Change {
    /// The service's name.
    pub fn service(&self) -> &str {
        self.node_service().map_or("", |s| s.name.as_str())
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        self.node_service()
            .and_then(|s| s.nodes.first())
            .map_or("", |n| n.id.as_str())
    }

    fn node_service(&self) -> Option<&Service> {
        self.current.as_ref().or(self.previous.as_ref())
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// A change.
    Change(Arc<Change>),
    /// The registry resynced (etcd compacted events the host missed): changes were lost, and
    /// a subscriber must start again from a listing.
    Reset {
        /// The first revision the feed is complete from.
        revision: i64,
    },
}

/// A start revision older than the feed keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "required revision has been compacted (the feed is complete from revision {complete_from})"
)]
pub struct Compacted {
    /// The oldest revision a subscriber may start from.
    pub complete_from: i64,
}

/// A subscription: the kept changes from the start revision, then live ones (those of a
/// start past the feed's revision included: a subscriber skips what precedes its start).
pub struct Subscription {
    /// Changes at or after the start revision that happened before the subscription.
    pub backlog: Vec<Arc<Change>>,
    /// What happens next.
    pub live: broadcast::Receiver<FeedItem>,
}

/// The feed. Shared by the cache's entries and its subscribers.
pub struct Changes {
    state: Mutex<State>,
    sender: broadcast::Sender<FeedItem>,
}

struct State {
    /// The last revision given out (or seen from the registry).
    last: i64,
    /// The registry revision of the event being applied; 0 when none is.
    applying: i64,
    /// The oldest revision from which `history` misses nothing.
    complete_from: i64,
    history: VecDeque<Arc<Change>>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            state: Mutex::new(State {
                last: 0,
                applying: 0,
                complete_from: 1,
                history: VecDeque::new(),
            }),
            sender: broadcast::channel(HISTORY).0,
        }
    }
}

impl Changes {
    /// The revision of the last change (or registry event) the feed knows.
    pub fn revision(&self) -> i64 {
        self.lock().last
    }

    /// Subscribes from `start` (0: from now). A start older than the kept changes is
    /// [`Compacted`].
    pub fn subscribe(&self, start: i64) -> Result<Subscription, Compacted> {
        let state = self.lock();
        let backlog = if start <= 0 {
            Vec::new()
        } else if start < state.complete_from {
            return Err(Compacted {
                complete_from: state.complete_from,
            });
        } else {
            let first = state.history.partition_point(|c| c.revision < start);
            state.history.range(first..).cloned().collect()
        };
        // Under the lock: no change is recorded between the backlog and the live receiver.
        Ok(Subscription {
            backlog,
            live: self.sender.subscribe(),
        })
    }

    /// Runs `apply` as the application of a registry event at `revision`: the changes it
    /// records carry that revision (or the feed's, should it be past it already).
    pub(super) fn applying<T>(&self, revision: i64, apply: impl FnOnce() -> T) -> T {
        self.lock().applying = revision;
        let result = apply();
        let mut state = self.lock();
        state.applying = 0;
        state.last = state.last.max(revision);
        result
    }

    /// Records that the registry's view was replaced wholesale at `revision`: what happened in
    /// between is unknown, so subscribers start again.
    pub(super) fn reset(&self, revision: i64) {
        let mut state = self.lock();
        state.last = state.last.max(revision);
        state.history.clear();
        state.complete_from = state.last + 1;
        let _ = self.sender.send(FeedItem::Reset {
            revision: state.complete_from,
        });
    }

    /// Records a node the registry changed in a service nobody looked up.
    pub(super) fn pass_through(&self, current: Option<Service>, previous: Option<Service>) {
        self.record(vec![(current, previous)]);
    }

    /// Records the difference between two views of one service (versions with their nodes).
    pub(super) fn record_diff(&self, before: &[Service], after: &[Service]) {
        let before = nodes_by_id(before);
        let after = nodes_by_id(after);
        let mut changes = Vec::new();
        for (id, (service, node)) in &after {
            let was = before.get(id);
            if was.is_some_and(|(s, n)| *n == *node && same_description(s, service)) {
                continue;
            }
            changes.push((
                Some(service.with_single_node(node)),
                was.map(|(s, n)| s.with_single_node(n)),
            ));
        }
        for (id, (service, node)) in &before {
            if !after.contains_key(id) {
                changes.push((None, Some(service.with_single_node(node))));
            }
        }
        if !changes.is_empty() {
            self.record(changes);
        }
    }

    fn record(&self, changes: Vec<(Option<Service>, Option<Service>)>) {
        let mut state = self.lock();
        for (current, previous) in changes {
            let revision = state.applying.max(state.last);
            state.last = revision;
            let change = Arc::new(Change {
                revision,
                current,
                previous,
            });
            if state.history.len() == HISTORY
                && let Some(dropped) = state.history.pop_front()
            {
                state.complete_from = dropped.revision + 1;
            }
            state.history.push_back(change.clone());
            // No subscriber is no error: the history keeps the change.
            let _ = self.sender.send(FeedItem::Change(change));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn nodes_by_id(services: &[Service]) -> BTreeMap<&str, (&Service, &Node)> {
    services
        .iter()
        .flat_map(|s| s.nodes.iter().map(move |n| (n.id.as_str(), (s, n))))
        .collect()
}

/// Whether two versions' descriptions (everything but the nodes) are the same.
fn same_description(a: &Service, b: &Service) -> bool {
    a.name == b.name
        && a.version == b.version
        && a.metadata == b.metadata
        && a.endpoints == b.endpoints
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::one_node_service;

    fn ids(changes: &[Arc<Change>]) -> Vec<(i64, &str, bool)> {
        changes
            .iter()
            .map(|c| (c.revision, c.node_id(), c.current.is_some()))
            .collect()
    }

    #[test]
    fn changes_carry_the_registry_revision_and_resume_from_any_kept_one() {
        let feed = Changes::default();
        let a = one_node_service("s", "1", "a");
        let b = one_node_service("s", "1", "b");
        let ab = crate::model::group_by_version([a.clone(), b.clone()]);
        feed.applying(10, || feed.record_diff(&[], &ab));
        // Not after an event (a suspect's hold ran out): the feed's revision, etcd's last.
        feed.record_diff(&ab, std::slice::from_ref(&b));
        feed.applying(12, || feed.pass_through(Some(a.clone()), None));
        let all = feed.subscribe(1).unwrap().backlog;
        assert_eq!(
            ids(&all),
            [
                (10, "a", true),
                (10, "b", true),
                (10, "a", false),
                (12, "a", true)
            ]
        );
        assert_eq!(
            all[2].previous.as_ref(),
            Some(&a),
            "a delete carries the node"
        );
        assert_eq!(ids(&feed.subscribe(11).unwrap().backlog), [(12, "a", true)]);
        // An event the feed is past already takes the feed's revision: they never go back.
        feed.applying(11, || feed.pass_through(None, Some(a.clone())));
        assert_eq!(feed.revision(), 12);
        assert_eq!(feed.subscribe(12).unwrap().backlog.len(), 2);
        // The same view again is no change.
        feed.record_diff(std::slice::from_ref(&b), std::slice::from_ref(&b));
        assert_eq!(feed.subscribe(12).unwrap().backlog.len(), 2);
    }

    #[test]
    fn a_start_older_than_what_is_kept_or_a_reset_is_compacted() {
        let feed = Changes::default();
        let a = one_node_service("s", "1", "a");
        for revision in 1..=(HISTORY as i64 + 5) {
            feed.applying(revision, || feed.pass_through(Some(a.clone()), None));
        }
        assert_eq!(
            feed.subscribe(3).err(),
            Some(Compacted { complete_from: 6 })
        );
        assert_eq!(feed.subscribe(6).unwrap().backlog.len(), HISTORY);
        let mut live = feed.subscribe(0).unwrap().live;
        feed.reset(HISTORY as i64 + 9);
        assert!(matches!(
            live.try_recv(),
            Ok(FeedItem::Reset { revision }) if revision == HISTORY as i64 + 10
        ));
        assert!(feed.subscribe(HISTORY as i64).is_err());
        assert!(
            feed.subscribe(HISTORY as i64 + 10)
                .unwrap()
                .backlog
                .is_empty()
        );
    }
}
