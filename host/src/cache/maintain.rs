//! The maintenance task: applies the registry's watch to cached entries, judges batched
//! removals when their batch closes, and on every tick samples health, ends suspect holds,
//! applies node TTLs and drops entries nobody needs.
//!
//! Only services already in the cache are touched: an event for another service costs one map
//! lookup and is dropped (see the module doc of [`super`] for why the whole prefix is watched).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::Inner;
use super::stats::Counter;
use crate::decision::EvictionReason;
use crate::model::Service;
use crate::registry::WatchEvent;

/// How long to wait before re-subscribing when the watch stream ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// The maintenance task's own state; it holds the cache weakly, so that dropping the last
/// clone of the cache ends it.
pub(super) struct Maintenance {
    inner: Weak<Inner>,
    watch: Option<mpsc::Receiver<WatchEvent>>,
    /// When to subscribe again after the watch stream ended.
    resubscribe_at: Option<Instant>,
    /// Services with an open batch of removals, and when it closes.
    batches: BTreeMap<Arc<str>, Instant>,
    tick: Duration,
    next_tick: Instant,
    /// The last tick at which the watch was connected: its silence confirmed every node then.
    watch_confirmed_at: Option<Instant>,
}

impl Maintenance {
    /// Starts the maintenance task of `inner`, ticking every `tick`.
    pub(super) fn spawn(inner: &Arc<Inner>, tick: Duration) {
        let watch = inner.registry.watch();
        inner.health.set_watch_alive(true);
        let task = Maintenance {
            inner: Arc::downgrade(inner),
            watch: Some(watch),
            resubscribe_at: None,
            batches: BTreeMap::new(),
            tick,
            next_tick: Instant::now() + tick,
            watch_confirmed_at: None,
        };
        tokio::spawn(task.run());
    }

    async fn run(mut self) {
        loop {
            let wake = self
                .batches
                .values()
                .min()
                .map_or(self.next_tick, |close| (*close).min(self.next_tick));
            let event = match self.watch.as_mut() {
                Some(rx) => tokio::select! {
                    event = rx.recv() => Some(event),
                    _ = sleep_until(wake) => None,
                },
                None => {
                    sleep_until(wake).await;
                    None
                }
            };
            let Some(inner) = self.inner.upgrade() else {
                return;
            };
            let now = Instant::now();
            match event {
                Some(Some(event)) => self.apply_event(&inner, event, now),
                Some(None) => {
                    tracing::warn!("the registry's watch stream ended; re-subscribing");
                    self.watch = None;
                    inner.health.set_watch_alive(false);
                    self.resubscribe_at = Some(now + RESUBSCRIBE_AFTER);
                }
                None => {}
            }
            let due: Vec<Arc<str>> = self
                .batches
                .iter()
                .filter(|(_, close)| **close <= now)
                .map(|(service, _)| service.clone())
                .collect();
            for service in due {
                self.batches.remove(&service);
                flush_batch(&inner, &service, now);
            }
            if now >= self.next_tick {
                if self.watch.is_none() && self.resubscribe_at.is_some_and(|at| at <= now) {
                    self.watch = Some(inner.registry.watch());
                    inner.health.set_watch_alive(true);
                    self.resubscribe_at = None;
                }
                self.sweep(&inner, now);
                self.next_tick = now + self.tick;
            }
        }
    }

    fn apply_event(&mut self, inner: &Inner, event: WatchEvent, now: Instant) {
        inner.health.contact();
        let Some(changes) = &inner.changes else {
            return self.apply(inner, event, now);
        };
        let revision = event.revision();
        if matches!(event, WatchEvent::Resync { .. }) {
            changes.reset(revision);
        }
        changes.applying(revision, || self.apply(inner, event, now));
    }

    fn apply(&mut self, inner: &Inner, event: WatchEvent, now: Instant) {
        match event {
            WatchEvent::Put { service, .. } => {
                let Some(entry) = inner.entries.get(service.name.as_str()).map(|e| e.clone())
                else {
                    inner.counters.inc(Counter::WatchIgnored);
                    if let Some(changes) = &inner.changes {
                        changes.pass_through(Some(service), None);
                    }
                    return;
                };
                let mut state = entry.lock();
                for node in &service.nodes {
                    state.deleted_in_flight.remove(&node.id);
                }
                let restored = state.upsert(&service, now);
                entry.publish(&state);
                inner.counters.inc(Counter::WatchPuts);
                inner.counters.add(Counter::SuspectsRestored, restored);
            }
            WatchEvent::Delete {
                service,
                node_id,
                previous,
                ..
            } => {
                let Some(entry) = inner.entries.get(service.as_str()).map(|e| e.clone()) else {
                    inner.counters.inc(Counter::WatchIgnored);
                    if let Some(changes) = &inner.changes {
                        changes.pass_through(None, Some(previous));
                    }
                    return;
                };
                inner.counters.inc(Counter::WatchDeletes);
                let batch = inner.policy.active().settings.eviction_batch;
                let mut state = entry.lock();
                if state.flight.is_some() {
                    state.deleted_in_flight.insert(node_id.clone());
                }
                let present = state
                    .nodes
                    .get(&node_id)
                    .is_some_and(|n| n.suspect_until.is_none());
                if !present {
                    return;
                }
                state.pending.insert(node_id, EvictionReason::WatchDelete);
                if batch.is_zero() {
                    let removals = std::mem::take(&mut state.pending).into_iter().collect();
                    inner.guard().judge(&entry.name, &mut state, removals, now);
                    entry.publish(&state);
                } else if state.pending_since.is_none() {
                    state.pending_since = Some(now);
                    self.batches.insert(entry.name.clone(), now + batch);
                }
            }
            WatchEvent::Resync { services, .. } => {
                inner.counters.inc(Counter::WatchResyncs);
                // Grouped once: each cached entry then finds its listing with one map lookup
                // instead of a scan of every service in the registry.
                let mut by_name: HashMap<String, Vec<Service>> = HashMap::new();
                for service in services {
                    by_name
                        .entry(service.name.clone())
                        .or_default()
                        .push(service);
                }
                let entries: Vec<_> = inner.entries.iter().map(|e| e.value().clone()).collect();
                for entry in entries {
                    let listing = by_name.get(&*entry.name).map_or(&[][..], Vec::as_slice);
                    let mut state = entry.lock();
                    if state.nodes.is_empty() && listing.is_empty() {
                        continue;
                    }
                    inner.guard().reconcile(
                        &entry.name,
                        &mut state,
                        listing,
                        now,
                        now,
                        &Default::default(),
                        EvictionReason::WatchDelete,
                    );
                    entry.publish(&state);
                }
            }
        }
    }

    /// The periodic sweep.
    fn sweep(&mut self, inner: &Inner, now: Instant) {
        let (health, _) = inner.health.sampled_view_and_wall_ms();
        if health.watch_connected {
            self.watch_confirmed_at = Some(now);
        }
        let confirmed_at = self.watch_confirmed_at;
        let settings = inner.policy.active().settings;
        // Entries with nothing cached are kept while they still rate-limit or answer "not
        // found"; after that they are only memory.
        let retention = settings
            .negative_ttl
            .max(settings.min_retry_interval)
            .max(inner.options.refresh_timeout);
        let entries: Vec<_> = inner.entries.iter().map(|e| e.value().clone()).collect();
        let mut unused = Vec::new();
        let unused_now = |view: &super::entry::View| {
            let last = view.attempted_at.max(view.refreshed_at);
            view.nodes == 0
                && !view.in_flight
                && last.is_none_or(|t| now.saturating_duration_since(t) >= retention)
        };
        for entry in entries {
            let view = entry.view();
            if view.nodes == 0 {
                if unused_now(&view) {
                    unused.push(entry.name.clone());
                }
                continue;
            }
            let ttl_due = !health.watch_connected;
            if view.suspects.is_empty() && !ttl_due {
                continue;
            }
            let mut state = entry.lock();
            let expired = state.expire_suspects(now);
            inner.counters.add(Counter::SuspectsExpired, expired);
            let node_ttl = inner.options.node_ttl;
            let stale: Vec<(String, EvictionReason)> = if ttl_due {
                state
                    .nodes
                    .iter()
                    .filter(|(id, n)| {
                        let confirmed = n.confirmed.max(confirmed_at.unwrap_or(n.confirmed));
                        n.suspect_until.is_none()
                            && !state.pending.contains_key(*id)
                            && now.saturating_duration_since(confirmed) >= node_ttl
                    })
                    .map(|(id, _)| (id.clone(), EvictionReason::NodeTtl))
                    .collect()
            } else {
                Vec::new()
            };
            let judged = !stale.is_empty();
            inner.guard().judge(&entry.name, &mut state, stale, now);
            if expired > 0 || judged {
                entry.publish(&state);
            }
        }
        // Re-checked under the map's lock: since the scan, a lookup may have attempted a
        // refresh (and finished it) or the registry answered "not found" again.
        for name in unused {
            inner
                .entries
                .remove_if(&name, |_, entry| unused_now(&entry.view()));
        }
    }
}

/// Judges the pending batch of `service`, if any.
fn flush_batch(inner: &Inner, service: &str, now: Instant) {
    let Some(entry) = inner.entries.get(service).map(|e| e.clone()) else {
        return;
    };
    let mut state = entry.lock();
    let removals = std::mem::take(&mut state.pending).into_iter().collect();
    state.pending_since = None;
    inner.guard().judge(service, &mut state, removals, now);
    entry.publish(&state);
}
