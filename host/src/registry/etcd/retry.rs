//! The retry engine: every unary call to etcd goes through [`Shared::call`], bounded by the
//! request timeout with its retries, and background tasks wait out failures with [`Backoff`].
//!
//! Attempts that fail transiently (a dead member, "leader changed") or time out are asked again
//! on the balancer's next pick. Such an attempt may still land; every operation `call` runs
//! tolerates that: puts of the same value, deletes and reads are idempotent, transactions
//! compare before they write, and a lease granted twice leaves one unused lease to expire by
//! its TTL.

use std::future::Future;
use std::time::Duration;

use etcd_client::Client;

use super::Shared;
use super::error::{Deadline, registry_error, retryable};
use super::stats::Stats;
use crate::registry::RegistryError;

/// Jittered exponential backoff for retries, capped.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(25);

    pub(crate) fn new(max: Duration) -> Self {
        Backoff {
            next: Self::START.min(max),
            max,
        }
    }

    /// The next delay: between half and all of the current step, so that thousands of hosts
    /// that lost etcd together do not come back in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::START.min(self.max);
    }
}

/// The bound of one attempt: a third of the request timeout. An attempt can be stuck where no
/// answer will ever come (a write proposed through a member just as the leader died waits for a
/// commit that the dead leader took with it), and giving the whole request timeout to that one
/// attempt would fail the call; a third leaves room for two more attempts after the election.
fn attempt_timeout(request_timeout: Duration) -> Duration {
    (request_timeout / 3).max(Duration::from_millis(100))
}

impl Shared {
    /// Runs `f` against the client until it succeeds, fails for good, or the request timeout
    /// (which bounds the whole call, retries included) runs out. Counts the result under `op`.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        mut f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Deadline::after(self.config.request_timeout);
        let mut backoff = Backoff::new(Duration::from_millis(200));
        let attempt = attempt_timeout(self.config.request_timeout);
        let result = loop {
            let attempt_deadline = (tokio::time::Instant::now() + attempt).min(deadline.at);
            match tokio::time::timeout_at(attempt_deadline, f(self.client.clone())).await {
                Ok(Ok(value)) => {
                    self.contact.touch();
                    break Ok(value);
                }
                Ok(Err(e)) => {
                    let delay = backoff.next_delay();
                    let retry = retryable(&e) && tokio::time::Instant::now() + delay < deadline.at;
                    let e = registry_error(op, &e);
                    if retry {
                        tracing::debug!(op, error = %e, "retrying");
                        Stats::bump(&self.stats.retries);
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    break Err(e);
                }
                Err(_) if !deadline.passed() => {
                    // This attempt is stuck (see `attempt_timeout`): drop it and ask again.
                    tracing::debug!(op, "attempt timed out; retrying");
                    Stats::bump(&self.stats.retries);
                }
                Err(_) => break Err(deadline.timeout(op)),
            }
        };
        self.count(op, &result);
        result
    }

    /// Runs `work`, several calls or waits on locks, under one `deadline`; past it, `work` is
    /// dropped and the timeout is counted under `op` (the calls it cut off counted nothing).
    pub(crate) async fn within<T>(
        &self,
        op: &'static str,
        deadline: Deadline,
        work: impl Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout_at(deadline.at, work).await {
            Ok(result) => result,
            Err(_) => {
                let e = deadline.timeout(op);
                self.stats.request(op, e.kind.as_str());
                Err(e)
            }
        }
    }

    /// Counts a finished request of `op`; an outage is recorded as the last failure.
    fn count<T>(&self, op: &'static str, result: &Result<T, RegistryError>) {
        self.stats.request(
            op,
            result.as_ref().map_or_else(|e| e.kind.as_str(), |_| "ok"),
        );
        if result.as_ref().is_err_and(|e| e.kind.is_outage()) {
            self.contact.record_failure();
        }
    }

    /// Waits the backoff's next delay before a background task retries; returns early on
    /// shutdown.
    pub(crate) async fn pause(&self, backoff: &mut Backoff) {
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut backoff = Backoff::new(Duration::from_millis(100));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(100)));
        assert!(delays[9] >= Duration::from_millis(50));
    }
}
