//! Automatic rollback: a generation that fails too often gives way to the one it replaced.
//!
//! Each generation counts its failed decisions (traps, deadline overruns, invalid answers) over
//! a sliding window. When [`RollbackRule::failures`] of them fall within
//! [`RollbackRule::window`], the engine makes the generation it replaced active again (kept
//! compiled since the swap, so this costs no compile and no I/O), under a new generation number,
//! and remembers the failing digest so that a policy file still holding it is not loaded again
//! until it changes. A successful decision never touches the window: the hot path pays nothing.
//!
//! A count rather than a rate: a rate needs every call counted, which the hot path would pay
//! for, while a policy that fails often enough to matter reaches any count within seconds at a
//! host's lookup rates (and the breaker answers fail-safe meanwhile).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::instance::CallFailure;
use crate::decision::PolicyInfo;

/// When a generation is rolled back: `failures` failed decisions within `window`.
#[derive(Debug, Clone, Copy)]
pub struct RollbackRule {
    /// Failures (traps, overruns, invalid answers) that trigger a rollback.
    pub failures: u32,
    /// The sliding window they are counted over.
    pub window: Duration,
}

impl Default for RollbackRule {
    /// 10 failures within a minute. A policy failing every call opens the engine's breaker
    /// after 5 in a row, which then lets one call through a second: it is rolled back within
    /// about 6 s. One failing one decision in a thousand at a modest 1,000 lookups/s is rolled
    /// back within 10 s, while the rare overrun of a thread descheduled mid-call (a few a day
    /// on a loaded node) never adds up to it.
    fn default() -> Self {
        RollbackRule {
            failures: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// The failures of one generation within the rule's window.
#[derive(Debug)]
pub(crate) struct FailureWindow {
    rule: RollbackRule,
    recent: Mutex<VecDeque<Instant>>,
    /// Set once the rule was met, so that one generation triggers one rollback (or one
    /// complaint that there is nothing to roll back to).
    tripped: AtomicBool,
}

impl FailureWindow {
    pub(crate) fn new(rule: RollbackRule) -> Self {
        FailureWindow {
            rule,
            recent: Mutex::new(VecDeque::new()),
            tripped: AtomicBool::new(false),
        }
    }

    /// Records a failure at `now`; true exactly once, for the failure that meets the rule.
    pub(crate) fn record(&self, now: Instant) -> bool {
        if self.tripped.load(Ordering::Relaxed) {
            return false;
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        while recent
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) > self.rule.window)
        {
            recent.pop_front();
        }
        recent.push_back(now);
        if recent.len() < self.rule.failures as usize {
            return false;
        }
        recent.clear();
        !self.tripped.swap(true, Ordering::Relaxed)
    }
}

/// Why a generation was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{failures} failed decisions within {window:?} (policy.rollback_failures, \
     policy.rollback_window); the last: {last}"
)]
pub struct RollbackReason {
    /// The rule's count, reached.
    pub failures: u32,
    /// The rule's window.
    pub window: Duration,
    /// The failure that met the rule.
    pub last: CallFailure,
}

/// A rollback that happened.
#[derive(Debug, Clone)]
pub struct Rollback {
    /// The generation rolled back.
    pub from: Arc<PolicyInfo>,
    /// The generation made active in its place (the earlier policy, under a new number).
    pub to: Arc<PolicyInfo>,
    /// Why.
    pub reason: RollbackReason,
    /// When.
    pub at: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(failures: u32, seconds: u64) -> FailureWindow {
        FailureWindow::new(RollbackRule {
            failures,
            window: Duration::from_secs(seconds),
        })
    }

    #[test]
    fn trips_once_when_the_count_falls_within_the_window() {
        let w = window(3, 10);
        let t0 = Instant::now();
        assert!(!w.record(t0));
        assert!(!w.record(t0 + Duration::from_secs(1)));
        assert!(w.record(t0 + Duration::from_secs(2)));
        for later in 3..10 {
            assert!(!w.record(t0 + Duration::from_secs(later)), "trips once");
        }
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let w = window(3, 10);
        let t0 = Instant::now();
        assert!(!w.record(t0));
        assert!(!w.record(t0 + Duration::from_secs(5)));
        // The first has left the window: two within it.
        assert!(!w.record(t0 + Duration::from_secs(11)));
        assert!(w.record(t0 + Duration::from_secs(12)));
    }
}
