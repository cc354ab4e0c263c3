//! Registry health as the policy sees it: the registry's own view ([`Registry::health`]) merged
//! with the cache's watch state, sampled off the hot path and read with three atomic loads.
//!
//! `Registry::health` may take a lock (the etcd registry's does), so lookups never call it:
//! the maintenance task samples it every tick, and the cache's own evidence (a refresh
//! answered or timed out, a watch event received) is recorded as it happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::decision::HealthView;
use crate::registry::Registry;

/// The sampled health. Its instants are tokio's (the cache's clock, which tests may pause);
/// the registry's are converted as they are merged.
pub(crate) struct HealthCell {
    registry: Arc<dyn Registry>,
    /// The cache's watch stream is open (the registry's own flag says whether it is current).
    watch_alive: AtomicBool,
    base: Instant,
    /// Wall-clock milliseconds at `base`: lookups derive the wall clock from the one monotonic
    /// reading they take anyway (a clock read costs tens of ns in a VM, on every lookup).
    base_wall_ms: u64,
    watch_connected: AtomicBool,
    last_contact: Moment,
    last_failure: Moment,
}

/// The latest of some instants, as milliseconds since the cell's base plus one (0 = never),
/// so that every thread reads it with one atomic load.
#[derive(Debug, Default)]
struct Moment(AtomicU64);

impl Moment {
    fn since_ms(&self, elapsed_ms: u64) -> Option<u64> {
        let at = self.0.load(Ordering::Relaxed);
        (at > 0).then(|| (elapsed_ms + 1).saturating_sub(at))
    }

    /// Moves the moment forward to `ms` (since base, plus one), never back.
    fn advance(&self, ms: u64) {
        // Only write when it moves, and at most once a millisecond: readers on every thread
        // load this line, so needless stores would bounce it between cores.
        let mut current = self.0.load(Ordering::Relaxed);
        while ms > current {
            match self
                .0
                .compare_exchange_weak(current, ms, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
    }
}

impl HealthCell {
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        HealthCell {
            registry,
            watch_alive: AtomicBool::new(false),
            base: Instant::now(),
            base_wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            watch_connected: AtomicBool::new(false),
            last_contact: Moment::default(),
            last_failure: Moment::default(),
        }
    }

    /// The health now, and the wall clock in ms since the Unix epoch, from one clock reading.
    fn view_and_wall_ms(&self) -> (HealthView, u64) {
        self.view_and_wall_ms_at(Instant::now())
    }

    /// The health at `now` (a reading the caller took anyway), and the wall clock then.
    pub fn view_and_wall_ms_at(&self, now: Instant) -> (HealthView, u64) {
        let elapsed_ms = now.saturating_duration_since(self.base).as_millis() as u64;
        let view = HealthView {
            watch_connected: self.watch_connected.load(Ordering::Relaxed),
            since_last_contact_ms: self.last_contact.since_ms(elapsed_ms),
            since_failure_ms: self.last_failure.since_ms(elapsed_ms),
        };
        (view, self.base_wall_ms + elapsed_ms)
    }

    fn ms_since_base(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    /// Records that the registry answered at `at`.
    pub fn contact_at(&self, at: Instant) {
        self.last_contact.advance(self.ms_since_base(at));
    }

    /// Records that the registry answered just now.
    pub fn contact(&self) {
        self.contact_at(Instant::now());
    }

    /// Records that the registry failed at `at` (a refresh timed out, the watch broke).
    pub fn failure_at(&self, at: Instant) {
        self.last_failure.advance(self.ms_since_base(at));
    }

    /// Records that the registry failed just now.
    pub fn failure(&self) {
        self.failure_at(Instant::now());
    }

    /// Records whether the cache's watch stream is open, and samples the registry's health.
    pub fn set_watch_alive(&self, alive: bool) {
        self.watch_alive.store(alive, Ordering::Relaxed);
        self.sample();
    }

    /// Samples the registry's health now (off the hot path: it may take the registry's lock)
    /// and returns it, with the wall clock from the same reading lookups derive theirs from.
    pub fn sampled_view_and_wall_ms(&self) -> (HealthView, u64) {
        self.sample();
        self.view_and_wall_ms()
    }

    fn sample(&self) {
        let health = self.registry.health();
        let connected = health.watch_connected && self.watch_alive.load(Ordering::Relaxed);
        if self.watch_connected.load(Ordering::Relaxed) != connected {
            self.watch_connected.store(connected, Ordering::Relaxed);
        }
        if let Some(at) = health.last_contact {
            self.contact_at(Instant::from_std(at));
        }
        if let Some(at) = health.last_failure {
            self.failure_at(Instant::from_std(at));
        }
    }
}
