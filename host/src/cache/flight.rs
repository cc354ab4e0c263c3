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
//!
//! [`Flight`] is the singleflight's slot in an entry's state, [`Joined`] a caller's place in
//! it, and `Refresh` the task, which ends its flight however it stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Inner;
use super::entry::{Entry, View};
use super::stats::Counter;
use crate::decision::{EvictionReason, Settings};
use crate::registry::{ErrorKind, RegistryError};

/// The result of one refresh, as every waiter sees it.
pub(crate) type FlightOutcome = Result<(), RegistryError>;

/// The refresh in flight of an entry, kept in its state: the singleflight's slot.
#[derive(Debug)]
pub(crate) struct Flight {
    pub id: u64,
    pub done: watch::Receiver<Option<FlightOutcome>>,
    /// A waiter's bound ran out before the refresh answered.
    pub overdue: bool,
}

/// Why no refresh was started or joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Attempted within the retry interval; `failed` if that attempt failed.
    RateLimited { failed: bool },
    /// A refresh is in flight and already made a caller's wait run out.
    Overdue,
    /// The global budget is spent.
    Budget,
}

/// A caller's place in a flight, to wait on.
pub(super) struct Joined {
    entry: Arc<Entry>,
    id: u64,
    done: watch::Receiver<Option<FlightOutcome>>,
}

impl Flight {
    /// Starts one background refresh of `service` if the rate limit, the singleflight and the
    /// budget allow.
    pub(super) fn start_in_background(
        inner: &Arc<Inner>,
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
        let Some(entry) = inner.entries.get(service).map(|e| e.clone()) else {
            return;
        };
        let _ = Flight::join_or_start(inner, entry, settings, now, false);
    }

    /// Joins the refresh of `service` in flight or starts one, for a caller about to wait: the
    /// rate limit from the lock-free `view` first, then again under the entry's lock (an entry
    /// is created for a service not cached, if the budget allows).
    pub(super) fn join(
        inner: &Arc<Inner>,
        service: &str,
        view: Option<&View>,
        settings: &Settings,
        now: Instant,
    ) -> Result<Joined, Refusal> {
        if let Some(view) = view {
            if view.in_flight && view.flight_overdue {
                return Err(Refusal::Overdue);
            }
            if !view.in_flight && recently(view.attempted_at, settings.min_retry_interval, now) {
                inner.counters.inc(Counter::RefreshesRateLimited);
                let failed = view.consecutive_failures > 0;
                return Err(Refusal::RateLimited { failed });
            }
        }
        let (entry, token) = match inner.entries.get(service) {
            Some(entry) => (entry.clone(), false),
            None => {
                if !inner.budget.take(settings.registry_budget_per_second, now) {
                    inner.counters.inc(Counter::RefreshesBudgetDenied);
                    return Err(Refusal::Budget);
                }
                let entry = inner
                    .entries
                    .entry(Arc::from(service))
                    .or_insert_with(|| Arc::new(Entry::new(service, inner.changes.clone())))
                    .clone();
                (entry, true)
            }
        };
        Flight::join_or_start(inner, entry, settings, now, token)
    }

    /// Joins the refresh in flight or starts one; `token` says whether a budget token was
    /// already taken for it (it is returned if no refresh starts).
    fn join_or_start(
        inner: &Arc<Inner>,
        entry: Arc<Entry>,
        settings: &Settings,
        now: Instant,
        token: bool,
    ) -> Result<Joined, Refusal> {
        let refund = || {
            if token {
                inner.budget.refund(settings.registry_budget_per_second);
            }
        };
        let mut state = entry.lock();
        if let Some(flight) = &state.flight {
            refund();
            if flight.overdue {
                return Err(Refusal::Overdue);
            }
            inner.counters.inc(Counter::FlightsJoined);
            let (id, done) = (flight.id, flight.done.clone());
            drop(state);
            return Ok(Joined { entry, id, done });
        }
        if recently(state.attempted_at, settings.min_retry_interval, now) {
            refund();
            inner.counters.inc(Counter::RefreshesRateLimited);
            return Err(Refusal::RateLimited {
                failed: state.consecutive_failures > 0,
            });
        }
        if !token && !inner.budget.take(settings.registry_budget_per_second, now) {
            inner.counters.inc(Counter::RefreshesBudgetDenied);
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
        inner.counters.inc(Counter::FlightsStarted);
        let refresh = Refresh {
            inner: Arc::clone(inner),
            entry: entry.clone(),
            id,
            done: tx,
        };
        tokio::spawn(refresh.run());
        Ok(Joined {
            entry,
            id,
            done: rx,
        })
    }
}

impl Joined {
    /// Waits for the flight's outcome at most `wait`. A waiter whose bound runs out marks the
    /// flight overdue; it never cancels it for the others.
    pub(super) async fn wait(
        mut self,
        inner: &Inner,
        wait: Duration,
    ) -> (Arc<Entry>, FlightOutcome) {
        let outcome = match tokio::time::timeout(wait, self.done.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone().expect("waited for Some"),
            Ok(Err(_)) => Err(RegistryError::new(
                ErrorKind::Unavailable,
                "get_service",
                "the refresh task ended without an answer",
            )),
            Err(_) => {
                inner.counters.inc(Counter::FlightWaitTimeouts);
                mark_overdue(&self.entry, self.id);
                Err(RegistryError::new(
                    ErrorKind::Timeout,
                    "get_service",
                    format!("no answer within the wait bound of {wait:?}"),
                ))
            }
        };
        (self.entry, outcome)
    }
}

/// A waiter's bound ran out: the attempt counts as failed (timeout) now, so that the
/// policy and later callers see the registry as slow without waiting for the flight's end.
fn mark_overdue(entry: &Entry, id: u64) {
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

/// One refresh, run in its own task so that no caller can cancel it.
///
/// Dropping it ends its flight if it is still in flight: a task that panicked or was
/// cancelled (runtime shutdown) before answering would otherwise leave its entry "in flight"
/// for ever: no refresh would start again, every waiter would fail at once and the sweep
/// would never drop it. `done` is a field, so it is dropped after that: waiters see the flight
/// end only once the entry no longer says it is in flight.
struct Refresh {
    inner: Arc<Inner>,
    entry: Arc<Entry>,
    id: u64,
    done: watch::Sender<Option<FlightOutcome>>,
}

impl Refresh {
    async fn run(self) {
        let Refresh {
            inner, entry, id, ..
        } = &self;
        let started = Instant::now();
        let timeout = inner.options.refresh_timeout;
        let result =
            match tokio::time::timeout(timeout, inner.registry.get_service(&entry.name)).await {
                Ok(result) => result,
                Err(_) => Err(RegistryError::new(
                    ErrorKind::Timeout,
                    "get_service",
                    format!("no answer within the cache's refresh timeout of {timeout:?}"),
                )),
            };
        inner
            .counters
            .count_get(result.as_ref().map(|_| ()).map_err(|e| e.kind));
        let now = Instant::now();
        let answered = match &result {
            Ok(listing) => Some(listing.as_slice()),
            Err(e) if e.kind == ErrorKind::NotFound => Some(&[][..]),
            Err(_) => None,
        };
        match &result {
            _ if answered.is_some() => inner.health.contact(),
            Err(e) if e.kind.is_outage() => inner.health.failure(),
            Err(_) | Ok(_) => {}
        }
        {
            let mut state = entry.lock();
            let flight = state.flight.take_if(|f| f.id == *id);
            match (answered, &result) {
                (Some(listing), _) => {
                    state.consecutive_failures = 0;
                    state.last_error = None;
                    let ignored = std::mem::take(&mut state.deleted_in_flight);
                    inner.guard().reconcile(
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
        let _ = self.done.send(Some(result.map(|_| ())));
    }
}

impl Drop for Refresh {
    fn drop(&mut self) {
        let mut state = self.entry.lock();
        let Some(flight) = state.flight.take_if(|f| f.id == self.id) else {
            return;
        };
        if !flight.overdue {
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        }
        state.last_error = Some(ErrorKind::Unavailable);
        self.entry.publish(&state);
        drop(state);
        tracing::warn!(service = %self.entry.name, "a refresh task ended without an answer");
    }
}

/// Whether `at` is less than `interval` before `now`.
fn recently(at: Option<Instant>, interval: Duration, now: Instant) -> bool {
    at.is_some_and(|at| now.saturating_duration_since(at) < interval)
}
