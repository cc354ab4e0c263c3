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
        // Callers read `now` when their lookup began, so they arrive out of order: the refill
        // only moves forward, or an earlier `now` would rewind it and the time between the two
        // would be credited twice.
        if now > bucket.refilled_at {
            let elapsed = now - bucket.refilled_at;
            bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * capacity).min(capacity);
            bucket.refilled_at = now;
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back a token taken (at the rate `per_second`) for a refresh that did not start;
    /// the bucket never holds more than its capacity.
    pub fn refund(&self, per_second: u32) {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        bucket.tokens = (bucket.tokens + 1.0).min(f64::from(per_second.max(1)));
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

    #[tokio::test(start_paused = true)]
    async fn an_earlier_now_neither_rewinds_nor_credits_twice() {
        let budget = Budget::new(10);
        let now = Instant::now();
        assert_eq!((0..100).filter(|_| budget.take(10, now)).count(), 10);
        let later = now + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| budget.take(10, later)).count(), 5);
        // A lookup that read the clock before `later` arrives last.
        let earlier = now + Duration::from_millis(250);
        assert!(!budget.take(10, earlier));
        assert_eq!(
            (0..100).filter(|_| budget.take(10, later)).count(),
            0,
            "the 250 ms up to `later` were already credited"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refunds_never_exceed_the_capacity() {
        let budget = Budget::new(10);
        let now = Instant::now();
        budget.refund(10);
        assert_eq!((0..100).filter(|_| budget.take(10, now)).count(), 10);
    }
}
