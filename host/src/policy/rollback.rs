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
    recent: Mutex<Recent>,
    /// Set once the rule was met, so that one generation triggers one rollback (or one
    /// complaint that there is nothing to roll back to).
    tripped: AtomicBool,
}

#[derive(Debug, Default)]
struct Recent {
    at: VecDeque<Instant>,
    /// The last failure seen, for the rollback's reason.
    last: Option<CallFailure>,
}

impl FailureWindow {
    pub(crate) fn new(rule: RollbackRule) -> Self {
        FailureWindow {
            rule,
            recent: Mutex::new(Recent::default()),
            tripped: AtomicBool::new(false),
        }
    }

    /// Records at `now` a failed decision (`failure`), or one the open breaker answered
    /// fail-safe without calling (`None`: it counts too, or a policy failing every call, let
    /// through once a second by the breaker, would never reach a rule above a few dozen).
    /// Returns the last failure exactly once, for the record that meets the rule.
    pub(crate) fn record(
        &self,
        now: Instant,
        failure: Option<&CallFailure>,
    ) -> Option<CallFailure> {
        if self.tripped.load(Ordering::Relaxed) {
            return None;
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(failure) = failure {
            recent.last = Some(failure.clone());
        }
        while recent
            .at
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) > self.rule.window)
        {
            recent.at.pop_front();
        }
        recent.at.push_back(now);
        if recent.at.len() < self.rule.failures as usize || recent.last.is_none() {
            return None;
        }
        recent.at.clear();
        if self.tripped.swap(true, Ordering::Relaxed) {
            return None;
        }
        recent.last.clone()
    }
}

/// Why a generation was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{failures} decisions failed, or were answered fail-safe by the open breaker, within \
     {window:?} (policy.rollback_failures, policy.rollback_window); the last failure: {last}"
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

    fn trap(n: u32) -> CallFailure {
        CallFailure::Trap(format!("trap {n}"))
    }

    fn at(t0: Instant, seconds: u64) -> Instant {
        t0 + Duration::from_secs(seconds)
    }

    #[test]
    fn trips_once_when_the_count_falls_within_the_window() {
        let w = window(3, 10);
        let t0 = Instant::now();
        assert_eq!(w.record(t0, Some(&trap(0))), None);
        assert_eq!(w.record(at(t0, 1), Some(&trap(1))), None);
        assert_eq!(w.record(at(t0, 2), Some(&trap(2))), Some(trap(2)));
        for later in 3..10 {
            assert_eq!(w.record(at(t0, later), Some(&trap(3))), None, "trips once");
        }
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let w = window(3, 10);
        let t0 = Instant::now();
        assert_eq!(w.record(t0, Some(&trap(0))), None);
        assert_eq!(w.record(at(t0, 5), Some(&trap(1))), None);
        // The first has left the window: two within it.
        assert_eq!(w.record(at(t0, 11), Some(&trap(2))), None);
        assert_eq!(w.record(at(t0, 12), Some(&trap(3))), Some(trap(3)));
    }

    #[test]
    fn breaker_skips_count_and_the_reason_is_the_last_failure() {
        let w = window(4, 10);
        let t0 = Instant::now();
        assert_eq!(w.record(t0, None), None, "no failure yet: nothing to blame");
        assert_eq!(w.record(t0, Some(&trap(1))), None);
        assert_eq!(w.record(at(t0, 1), None), None);
        assert_eq!(w.record(at(t0, 2), None), Some(trap(1)));
    }
}
