//! Registry health as the policy sees it: the registry's own view ([`Registry::health`]) merged
//! with the cache's watch state, sampled off the hot path and read with two atomic loads.
//!
//! `Registry::health` may take a lock (the etcd registry's does), so lookups never call it:
//! the maintenance task samples it every tick, and the cache's own evidence of contact (a
//! refresh answered, a watch event received) is recorded as it happens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::decision::HealthView;
use crate::registry::Registry;

/// The sampled health.
#[derive(Debug)]
pub(crate) struct HealthCell {
    base: Instant,
    /// Wall-clock milliseconds at `base`: lookups derive the wall clock from the one monotonic
    /// reading they take anyway (a clock read costs tens of ns in a VM, on every lookup).
    base_wall_ms: u64,
    watch_connected: AtomicBool,
    /// Milliseconds since `base` of the last contact, plus one; 0 = never.
    last_contact: AtomicU64,
}

impl HealthCell {
    pub fn new() -> Self {
        HealthCell {
            base: Instant::now(),
            base_wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            watch_connected: AtomicBool::new(false),
            last_contact: AtomicU64::new(0),
        }
    }

    /// The health now.
    pub fn view(&self) -> HealthView {
        self.view_and_wall_ms().0
    }

    /// The health now, and the wall clock in ms since the Unix epoch, from one clock reading.
    pub fn view_and_wall_ms(&self) -> (HealthView, u64) {
        let elapsed_ms = self.base.elapsed().as_millis() as u64;
        let last = self.last_contact.load(Ordering::Relaxed);
        let view = HealthView {
            watch_connected: self.watch_connected.load(Ordering::Relaxed),
            since_last_contact_ms: (last > 0).then(|| (elapsed_ms + 1).saturating_sub(last)),
        };
        (view, self.base_wall_ms + elapsed_ms)
    }

    /// Records that the registry answered at `at`.
    pub fn contact_at(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.base).as_millis() as u64 + 1;
        // Only move forward, and write at most once a millisecond: readers on every thread
        // load this line, so needless stores would bounce it between cores.
        let mut current = self.last_contact.load(Ordering::Relaxed);
        while ms > current {
            match self.last_contact.compare_exchange_weak(
                current,
                ms,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
    }

    /// Records that the registry answered just now.
    pub fn contact(&self) {
        self.contact_at(Instant::now());
    }

    /// Samples the registry's health; `watch_alive` is whether the cache's watch stream is open.
    pub fn sample(&self, registry: &dyn Registry, watch_alive: bool) {
        let health = registry.health();
        let connected = health.watch_connected && watch_alive;
        if self.watch_connected.load(Ordering::Relaxed) != connected {
            self.watch_connected.store(connected, Ordering::Relaxed);
        }
        if let Some(at) = health.last_contact {
            self.contact_at(at);
        }
    }
}
