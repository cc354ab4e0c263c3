//! What a lookup gets: answers with their provenance and counted errors, from the entry's view
//! or after waiting on a refresh ([`super::flight`]), or a fast failure when no refresh may
//! start.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::entry::View;
use super::flight::{Flight, Refusal};
use super::stats::Counter;
use super::{Answer, Inner, LookupError, Source};
use crate::decision::{PolicyInfo, RejectionKind};
use crate::registry::{ErrorKind, RegistryError};

/// Builds the answers and errors of one lookup.
pub(super) struct Reply<'a> {
    inner: &'a Arc<Inner>,
    service: &'a str,
    policy: Arc<PolicyInfo>,
    label: &'static str,
}

impl<'a> Reply<'a> {
    pub(super) fn new(
        inner: &'a Arc<Inner>,
        service: &'a str,
        policy: Arc<PolicyInfo>,
        label: &'static str,
    ) -> Self {
        Reply {
            inner,
            service,
            policy,
            label,
        }
    }

    pub(super) fn answer(self, view: Arc<View>, source: Source, now: Instant) -> Answer {
        self.inner.counters.inc(match source {
            Source::Fresh => Counter::AnsweredFresh,
            Source::Stale => Counter::AnsweredStale,
            Source::Registry | Source::Negative | Source::Policy => Counter::AnsweredRegistry,
        });
        Answer {
            age: view.refreshed_at.map(|t| now.saturating_duration_since(t)),
            view,
            source,
            policy: self.policy,
            decision: self.label,
        }
    }

    pub(super) fn reject(self, kind: RejectionKind, reason: String, negative: bool) -> LookupError {
        match kind {
            RejectionKind::NotFound => {
                self.inner.counters.inc(if negative {
                    Counter::NotFoundNegative
                } else {
                    Counter::NotFoundPolicy
                });
                LookupError::NotFound {
                    service: self.service.to_string(),
                    reason,
                    provenance: if negative {
                        Source::Negative
                    } else {
                        Source::Policy
                    },
                    policy: self.policy,
                }
            }
            RejectionKind::Unavailable => {
                self.unavailable(reason, None, Counter::UnavailablePolicy)
            }
        }
    }

    fn unavailable(
        self,
        reason: String,
        cause: Option<ErrorKind>,
        counter: Counter,
    ) -> LookupError {
        self.inner.counters.inc(counter);
        LookupError::Unavailable {
            service: self.service.to_string(),
            reason,
            cause,
            policy: self.policy,
        }
    }

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
        let joined = match Flight::join(inner, self.service, view.as_deref(), &settings, now) {
            Ok(joined) => joined,
            Err(refusal) => return self.refused(refusal, fallback, now),
        };
        let (entry, outcome) = joined.wait(inner, wait).await;
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
