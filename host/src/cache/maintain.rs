//! The maintenance task: applies the registry's watch to cached entries, judges batched
//! removals when their batch closes, and on every tick samples health, ends suspect holds,
//! applies node TTLs and drops entries nobody needs.
//!
//! Only services already in the cache are touched: an event for another service costs one map
//! lookup and is dropped (see the module doc of [`super`] for why the whole prefix is watched).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::Inner;
use super::stats::Counter;
use crate::decision::{EvictionReason, HealthView};
use crate::model::Service;
use crate::registry::WatchEvent;

/// How long to wait before re-subscribing when the watch stream ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Starts the maintenance task of `inner`; it ends once `inner` is dropped.
pub(super) fn spawn(inner: &Arc<Inner>) {
    let watch = inner.registry.watch();
    inner.watch_alive.store(true, Ordering::Relaxed);
    inner.health.sample(&*inner.registry, true);
    let tick = inner.options.tick;
    tokio::spawn(run(Arc::downgrade(inner), watch, tick));
}

async fn run(weak: Weak<Inner>, watch: mpsc::Receiver<WatchEvent>, tick: Duration) {
    let mut watch = Some(watch);
    // Services with an open batch of removals, and when it closes.
    let mut batches: BTreeMap<Arc<str>, Instant> = BTreeMap::new();
    let mut next_tick = Instant::now() + tick;
    let mut resubscribe_at = None;
    loop {
        let wake = batches
            .values()
            .min()
            .map_or(next_tick, |close| (*close).min(next_tick));
        let event = match watch.as_mut() {
            Some(rx) => tokio::select! {
                event = rx.recv() => Some(event),
                _ = sleep_until(wake) => None,
            },
            None => {
                sleep_until(wake).await;
                None
            }
        };
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let now = Instant::now();
        match event {
            Some(Some(event)) => inner.apply_event(event, now, &mut batches),
            Some(None) => {
                tracing::warn!("the registry's watch stream ended; re-subscribing");
                watch = None;
                inner.watch_alive.store(false, Ordering::Relaxed);
                inner.health.sample(&*inner.registry, false);
                resubscribe_at = Some(now + RESUBSCRIBE_AFTER);
            }
            None => {}
        }
        let due: Vec<Arc<str>> = batches
            .iter()
            .filter(|(_, close)| **close <= now)
            .map(|(service, _)| service.clone())
            .collect();
        for service in due {
            batches.remove(&service);
            inner.flush_batch(&service, now);
        }
        if now >= next_tick {
            if watch.is_none() && resubscribe_at.is_some_and(|at| at <= now) {
                watch = Some(inner.registry.watch());
                inner.watch_alive.store(true, Ordering::Relaxed);
                resubscribe_at = None;
            }
            inner.tick(now);
            next_tick = now + tick;
        }
    }
}

impl Inner {
    /// Samples the registry's health now (off the hot path) and returns it.
    pub(super) fn fresh_health(&self) -> HealthView {
        self.fresh_health_and_wall_ms().0
    }

    /// [`Inner::fresh_health`], and the wall clock from the same reading lookups derive theirs from.
    pub(super) fn fresh_health_and_wall_ms(&self) -> (HealthView, u64) {
        self.health
            .sample(&*self.registry, self.watch_alive.load(Ordering::Relaxed));
        self.health.view_and_wall_ms()
    }

    fn apply_event(
        &self,
        event: WatchEvent,
        now: Instant,
        batches: &mut BTreeMap<Arc<str>, Instant>,
    ) {
        self.health.contact();
        match event {
            WatchEvent::Put { service, .. } => {
                let Some(entry) = self.entries.get(service.name.as_str()).map(|e| e.clone()) else {
                    self.counters.inc(Counter::WatchIgnored);
                    return;
                };
                let mut state = entry.lock();
                for node in &service.nodes {
                    state.deleted_in_flight.remove(&node.id);
                }
                let restored = state.upsert(&service, now);
                entry.publish(&state);
                self.counters.inc(Counter::WatchPuts);
                self.counters.add(Counter::SuspectsRestored, restored);
            }
            WatchEvent::Delete {
                service, node_id, ..
            } => {
                let Some(entry) = self.entries.get(service.as_str()).map(|e| e.clone()) else {
                    self.counters.inc(Counter::WatchIgnored);
                    return;
                };
                self.counters.inc(Counter::WatchDeletes);
                let batch = self.policy.active().settings.eviction_batch;
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
                    self.judge(&entry.name, &mut state, removals, now);
                    entry.publish(&state);
                } else if state.pending_since.is_none() {
                    state.pending_since = Some(now);
                    batches.insert(entry.name.clone(), now + batch);
                }
            }
            WatchEvent::Resync { services, .. } => {
                self.counters.inc(Counter::WatchResyncs);
                // Grouped once: each cached entry then finds its listing with one map lookup
                // instead of a scan of every service in the registry.
                let mut by_name: HashMap<String, Vec<Service>> = HashMap::new();
                for service in services {
                    by_name
                        .entry(service.name.clone())
                        .or_default()
                        .push(service);
                }
                let entries: Vec<_> = self.entries.iter().map(|e| e.value().clone()).collect();
                for entry in entries {
                    let listing = by_name.get(&*entry.name).map_or(&[][..], Vec::as_slice);
                    let mut state = entry.lock();
                    if state.nodes.is_empty() && listing.is_empty() {
                        continue;
                    }
                    self.reconcile(
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
    fn tick(&self, now: Instant) {
        let health = self.fresh_health();
        let confirmed_at = {
            let mut at = self
                .watch_confirmed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if health.watch_connected {
                *at = Some(now);
            }
            *at
        };
        let settings = self.policy.active().settings;
        // Entries with nothing cached are kept while they still rate-limit or answer "not
        // found"; after that they are only memory.
        let retention = settings
            .negative_ttl
            .max(settings.min_retry_interval)
            .max(self.options.refresh_timeout);
        let entries: Vec<_> = self.entries.iter().map(|e| e.value().clone()).collect();
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
            self.counters.add(Counter::SuspectsExpired, expired);
            let node_ttl = self.options.node_ttl;
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
            self.judge(&entry.name, &mut state, stale, now);
            if expired > 0 || judged {
                entry.publish(&state);
            }
        }
        // Re-checked under the map's lock: since the scan, a lookup may have attempted a
        // refresh (and finished it) or the registry answered "not found" again.
        for name in unused {
            self.entries
                .remove_if(&name, |_, entry| unused_now(&entry.view()));
        }
    }
}
