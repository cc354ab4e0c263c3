//! The global budget of registry requests: a token bucket refilled at the policy's
//! `registry-budget-per-second`, holding at most one second's worth.
//!
//! It is what stops a flood of lookups for many distinct unknown names, which no per-service
//! limit can: each name is new, so each would otherwise be one etcd request. The bucket is
//! consulted only when a refresh is about to start (never on the hit path), so a mutex is fine.

use std::sync::Mutex;

use tokio::time::Instant;

/// A token bucket whose rate follows the active policy's settings.
#[derive(Debug)]
pub(crate) struct Budget {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl Budget {
    /// A bucket that starts full for `per_second`.
    pub fn new(per_second: u32) -> Self {
        Budget {
            state: Mutex::new(Bucket {
                tokens: f64::from(per_second),
                refilled_at: Instant::now(),
            }),
        }
    }

    /// Takes one token if there is one, at the rate `per_second` (the active policy's).
    pub fn take(&self, per_second: u32, now: Instant) -> bool {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let capacity = f64::from(per_second.max(1));
        let elapsed = now.saturating_duration_since(bucket.refilled_at);
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * capacity).min(capacity);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back a token taken for a refresh that did not start.
    pub fn refund(&self) {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        bucket.tokens += 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn holds_one_second_and_refills_at_the_rate() {
        let budget = Budget::new(10);
        let now = Instant::now();
        let taken = (0..100).filter(|_| budget.take(10, now)).count();
        assert_eq!(taken, 10, "a full bucket holds one second's worth");
        let later = now + Duration::from_millis(500);
        let taken = (0..100).filter(|_| budget.take(10, later)).count();
        assert_eq!(taken, 5, "half a second refills half");
        let much_later = later + Duration::from_secs(60);
        let taken = (0..100).filter(|_| budget.take(10, much_later)).count();
        assert_eq!(taken, 10, "never more than the capacity");
    }
}
