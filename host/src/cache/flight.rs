//! Refreshes: the per-service rate limit, the global budget, and the singleflight.
//!
//! The order matters (go-micro's `registry/cache/cache.go` after its fix is the baseline):
//!
//! 1. **Before joining anything**, from the lock-free view: if a refresh of the service was
//!    attempted within `min-retry-interval`, no new one starts; if the last one failed, the
//!    caller is answered stale (when allowed) or fails fast, and never queues. If the refresh in
//!    flight already made a caller's wait run out, the registry is slow, and later callers are
//!    answered the same way rather than queueing behind it.
//! 2. **Under the entry's lock**, the same checks again (another caller may have just
//!    refreshed), then the global budget, then the flight starts: one spawned task per
//!    refresh, bounded by the cache's refresh timeout.
//! 3. Callers wait on a [`tokio::sync::watch`] channel for at most their own bound. A waiter
//!    that gives up (or is dropped) never cancels the flight for the others, and a stalled
//!    flight can never hold a waiter beyond its bound.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::entry::{Entry, Flight, FlightOutcome, View};
use super::stats::Counter;
use super::{Answer, Inner, LookupError, Reply, Source};
use crate::decision::{EvictionReason, Settings};
use crate::registry::{ErrorKind, RegistryError};

/// Why no refresh was started or joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Attempted within the retry interval; `failed` if that attempt failed.
    RateLimited { failed: bool },
    /// A refresh is in flight and already made a caller's wait run out.
    Overdue,
    /// The global budget is spent.
    Budget,
}

impl Inner {
    /// Starts one background refresh if the rate limit, the singleflight and the budget allow.
    pub(super) fn refresh_in_background(
        self: &Arc<Inner>,
        service: &str,
        view: &View,
        settings: &Settings,
        now: Instant,
    ) {
        // The rate limit is checked on the view first, so that a flood of stale lookups does
        // not even take the entry's lock.
        if view.in_flight {
            return;
        }
        if recently(view.attempted_at, settings.min_retry_interval, now) {
            return;
        }
        let Some(entry) = self.entries.get(service).map(|e| e.clone()) else {
            return;
        };
        let _ = self.flight_for(entry, settings, now, false);
    }

    /// Joins the refresh in flight or starts one; `token` says whether a budget token was
    /// already taken for it (it is returned if no refresh starts).
    fn flight_for(
        self: &Arc<Inner>,
        entry: Arc<Entry>,
        settings: &Settings,
        now: Instant,
        token: bool,
    ) -> Result<(u64, watch::Receiver<Option<FlightOutcome>>), Refusal> {
        let refund = || {
            if token {
                self.budget.refund(settings.registry_budget_per_second);
            }
        };
        let mut state = entry.lock();
        if let Some(flight) = &state.flight {
            refund();
            if flight.overdue {
                return Err(Refusal::Overdue);
            }
            self.counters.inc(Counter::FlightsJoined);
            return Ok((flight.id, flight.done.clone()));
        }
        if recently(state.attempted_at, settings.min_retry_interval, now) {
            refund();
            self.counters.inc(Counter::RefreshesRateLimited);
            return Err(Refusal::RateLimited {
                failed: state.consecutive_failures > 0,
            });
        }
        if !token && !self.budget.take(settings.registry_budget_per_second, now) {
            self.counters.inc(Counter::RefreshesBudgetDenied);
            return Err(Refusal::Budget);
        }
        let (tx, rx) = watch::channel(None);
        state.next_flight_id += 1;
        let id = state.next_flight_id;
        state.flight = Some(Flight {
            id,
            done: rx.clone(),
            overdue: false,
        });
        state.attempted_at = Some(now);
        state.deleted_in_flight.clear();
        entry.publish(&state);
        drop(state);
        self.counters.inc(Counter::FlightsStarted);
        let inner = Arc::clone(self);
        tokio::spawn(async move { inner.run_flight(entry, id, tx).await });
        Ok((id, rx))
    }

    /// The refresh itself, in its own task so that no caller can cancel it.
    async fn run_flight(
        self: Arc<Inner>,
        entry: Arc<Entry>,
        id: u64,
        done: watch::Sender<Option<FlightOutcome>>,
    ) {
        // Dropped first on every exit, the guard ends the flight if this task panicked or was
        // cancelled (runtime shutdown) before it did; `done` is dropped after it, so waiters
        // see the flight end only once the entry no longer says it is in flight.
        let _ended = EndFlight {
            inner: &self,
            entry: &entry,
            id,
        };
        let started = Instant::now();
        let result = match tokio::time::timeout(
            self.options.refresh_timeout,
            self.registry.get_service(&entry.name),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(RegistryError::new(
                ErrorKind::Timeout,
                "get_service",
                format!(
                    "no answer within the cache's refresh timeout of {:?}",
                    self.options.refresh_timeout
                ),
            )),
        };
        self.counters
            .count_get(result.as_ref().map(|_| ()).map_err(|e| e.kind));
        let now = Instant::now();
        let answered = match &result {
            Ok(listing) => Some(listing.as_slice()),
            Err(e) if e.kind == ErrorKind::NotFound => Some(&[][..]),
            Err(_) => None,
        };
        match &result {
            _ if answered.is_some() => self.health.contact(),
            Err(e) if e.kind.is_outage() => self.health.failure(),
            Err(_) | Ok(_) => {}
        }
        {
            let mut state = entry.lock();
            let flight = state.flight.take_if(|f| f.id == id);
            match (answered, &result) {
                (Some(listing), _) => {
                    state.consecutive_failures = 0;
                    state.last_error = None;
                    let ignored = std::mem::take(&mut state.deleted_in_flight);
                    self.reconcile(
                        &entry.name,
                        &mut state,
                        listing,
                        started,
                        now,
                        &ignored,
                        EvictionReason::Refresh,
                    );
                }
                (None, Err(e)) => {
                    // A waiter whose bound ran out already counted this attempt as failed.
                    if !flight.as_ref().is_some_and(|f| f.overdue) {
                        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                    }
                    state.last_error = Some(e.kind);
                    tracing::debug!(service = %entry.name, "refresh failed: {e}");
                }
                (None, Ok(_)) => unreachable!("an Ok result always has a listing"),
            }
            entry.publish(&state);
        }
        let _ = done.send(Some(result.map(|_| ())));
    }

    /// Ends flight `id` of `entry` if it is still in flight: its task ended without an answer,
    /// which counts as a failed attempt.
    fn abandon_flight(&self, entry: &Entry, id: u64) {
        let mut state = entry.lock();
        let Some(flight) = state.flight.take_if(|f| f.id == id) else {
            return;
        };
        if !flight.overdue {
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        }
        state.last_error = Some(ErrorKind::Unavailable);
        entry.publish(&state);
        drop(state);
        tracing::warn!(service = %entry.name, "a refresh task ended without an answer");
    }

    /// A waiter's bound ran out: the attempt counts as failed (timeout) now, so that the
    /// policy and later callers see the registry as slow without waiting for the flight's end.
    fn flight_overdue(&self, entry: &Entry, id: u64) {
        let mut state = entry.lock();
        let Some(flight) = state.flight.as_mut().filter(|f| f.id == id) else {
            return;
        };
        if flight.overdue {
            return;
        }
        flight.overdue = true;
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        state.last_error = Some(ErrorKind::Timeout);
        entry.publish(&state);
    }
}

/// Ends a flight whose task stops without ending it (see [`Inner::abandon_flight`]). Without
/// it a panicking or cancelled refresh would leave its entry "in flight" for ever: no refresh
/// would start again, every waiter would fail at once and the sweep would never drop it.
struct EndFlight<'a> {
    inner: &'a Inner,
    entry: &'a Entry,
    id: u64,
}

impl Drop for EndFlight<'_> {
    fn drop(&mut self) {
        self.inner.abandon_flight(self.entry, self.id);
    }
}

impl Reply<'_> {
    /// Refresh and wait at most `wait`; on failure serve stale if `fallback` allows.
    pub(super) async fn refresh_and_wait(
        self,
        view: Option<Arc<View>>,
        wait: Duration,
        fallback: bool,
        now: Instant,
    ) -> Result<Answer, LookupError> {
        let inner = self.inner;
        let settings = self.policy.settings;
        // 1. The rate limit, before joining anything.
        if let Some(view) = &view {
            if view.in_flight && view.flight_overdue {
                return self.refused(Refusal::Overdue, fallback, now);
            }
            if !view.in_flight && recently(view.attempted_at, settings.min_retry_interval, now) {
                inner.counters.inc(Counter::RefreshesRateLimited);
                let failed = view.consecutive_failures > 0;
                return self.refused(Refusal::RateLimited { failed }, fallback, now);
            }
        }
        // 2. Join or start, re-checking under the entry's lock.
        let (entry, token) = match inner.entries.get(self.service) {
            Some(entry) => (entry.clone(), false),
            None => {
                if !inner.budget.take(settings.registry_budget_per_second, now) {
                    inner.counters.inc(Counter::RefreshesBudgetDenied);
                    return self.refused(Refusal::Budget, fallback, now);
                }
                let entry = inner
                    .entries
                    .entry(Arc::from(self.service))
                    .or_insert_with(|| Arc::new(Entry::new(self.service)))
                    .clone();
                (entry, true)
            }
        };
        let (id, mut done) = match inner.flight_for(entry.clone(), &settings, now, token) {
            Ok(flight) => flight,
            Err(refusal) => return self.refused(refusal, fallback, now),
        };
        // 3. Wait, bounded.
        let outcome = match tokio::time::timeout(wait, done.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone().expect("waited for Some"),
            Ok(Err(_)) => Err(RegistryError::new(
                ErrorKind::Unavailable,
                "get_service",
                "the refresh task ended without an answer",
            )),
            Err(_) => {
                inner.counters.inc(Counter::FlightWaitTimeouts);
                inner.flight_overdue(&entry, id);
                Err(RegistryError::new(
                    ErrorKind::Timeout,
                    "get_service",
                    format!("no answer within the wait bound of {wait:?}"),
                ))
            }
        };
        let view = entry.view();
        let now = Instant::now();
        match outcome {
            Ok(()) if view.cached() => Ok(self.answer(view, Source::Registry, now)),
            Err(e) if e.kind == ErrorKind::NotFound && view.cached() => {
                // The registry lists nothing, but the guard kept (suspect) nodes.
                Ok(self.answer(view, Source::Stale, now))
            }
            Ok(())
            | Err(RegistryError {
                kind: ErrorKind::NotFound,
                ..
            }) => {
                inner.counters.inc(Counter::NotFoundRegistry);
                Err(LookupError::NotFound {
                    service: self.service.to_string(),
                    reason: format!("the registry has no node of {}", self.service),
                    provenance: Source::Registry,
                    policy: self.policy,
                })
            }
            Err(e) if fallback && view.cached() => {
                tracing::debug!(service = self.service, "serving stale: {e}");
                Ok(self.answer(view, Source::Stale, now))
            }
            Err(e) => {
                let kind = e.kind;
                Err(self.unavailable(e.to_string(), Some(kind), Counter::UnavailableRegistry))
            }
        }
    }

    /// Answers without a refresh: stale if allowed, the recent answer if the last attempt
    /// succeeded, else a fast failure.
    fn refused(
        self,
        refusal: Refusal,
        fallback: bool,
        now: Instant,
    ) -> Result<Answer, LookupError> {
        let view = self.inner.entries.get(self.service).map(|e| e.view());
        let settings = self.policy.settings;
        if let Some(view) = view {
            let recent_success = matches!(refusal, Refusal::RateLimited { failed: false });
            if view.cached() && (fallback || recent_success) {
                let fresh = recent_success
                    && view
                        .refreshed_at
                        .is_some_and(|t| now.saturating_duration_since(t) < settings.ttl);
                let source = if fresh { Source::Fresh } else { Source::Stale };
                return Ok(self.answer(view, source, now));
            }
            if recent_success && view.negative {
                self.inner.counters.inc(Counter::NotFoundNegative);
                return Err(LookupError::NotFound {
                    service: self.service.to_string(),
                    reason: format!("{} not found (negative cache)", self.service),
                    provenance: Source::Negative,
                    policy: self.policy,
                });
            }
        }
        let (reason, counter) = match refusal {
            Refusal::RateLimited { .. } => (
                format!(
                    "the registry was asked for this service less than {:?} ago; not asking again yet",
                    settings.min_retry_interval
                ),
                Counter::UnavailableRateLimited,
            ),
            Refusal::Overdue => (
                "a refresh of this service is in flight and already overdue".to_string(),
                Counter::UnavailableOverdue,
            ),
            Refusal::Budget => (
                format!(
                    "the registry budget of {} requests per second is spent",
                    settings.registry_budget_per_second
                ),
                Counter::UnavailableBudget,
            ),
        };
        let cause = Some(ErrorKind::Unavailable);
        Err(self.unavailable(reason, cause, counter))
    }
}

/// Whether `at` is less than `interval` before `now`.
fn recently(at: Option<Instant>, interval: Duration, now: Instant) -> bool {
    at.is_some_and(|at| now.saturating_duration_since(at) < interval)
}
