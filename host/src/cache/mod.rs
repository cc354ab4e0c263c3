//! The registry cache: every lookup is decided by the policy, every refresh is rate limited and
//! shared, every removal of nodes passes the policy's eviction guard.
//!
//! A [`RegistryCache`] sits between callers and a [`Registry`]. It knows neither etcd nor
//! wasmtime: it sees the [`Registry`] trait and the [`Decide`] trait, so its unit tests run on
//! [`crate::registry::memory::MemoryRegistry`] and plain Rust policies.
//!
//! # The lookup path
//!
//! 1. Read the service's entry: a sharded map ([`dashmap`]) read and one atomic load of the
//!    entry's immutable view ([`entry`]). No global lock, no allocation.
//! 2. Build the [`LookupContext`] and ask the policy ([`Decide::decide_lookup`]).
//! 3. Act ([`reply`]): serve the view as fresh or stale (sharing it with the [`Answer`]);
//!    start one background refresh; refresh and wait; or reject.
//!
//! Refreshes go through [`flight`]: the per-service rate limit (`min-retry-interval`, enforced
//! by the host whatever the policy says) is checked *before* a caller joins a refresh and again
//! under the entry's lock; a global token bucket ([`budget`]) caps registry requests per
//! second; the refresh runs in its own task with a timeout, and callers wait on it for at most
//! their bound, so neither a stalled registry nor a dropped caller can hurt the others.
//!
//! # Keeping entries current
//!
//! The maintenance task ([`maintain`]) watches the registry's whole prefix, applies puts,
//! deletes and resyncs to the services that are cached, batches removals per service for the
//! eviction guard ([`evict`]), ends suspect holds, applies node TTLs, samples registry health
//! ([`health`]) and drops entries nobody needs.
//!
//! Why one watch of the prefix rather than one per service: with 4000 pods registering a few
//! hundred services, a watch per looked-up service means hundreds of etcd watchers per host
//! and as many streams to re-create after every etcd restart or token expiry (the
//! Authenticate storm this project was born from multiplies with them). One prefix watch is one
//! stream per host whatever the number of services, resumes from one revision, and its events
//! for services that are not cached are dropped at the cost of a map lookup. The price is
//! bandwidth for events nobody needs: registrations change at the rate pods start and stop
//! (a few per second even during a rolling deploy of 4000 pods), which is small.

mod answer;
mod budget;
mod changes;
mod entry;
mod evict;
mod flight;
mod health;
mod maintain;
mod reply;
mod snapshot;
mod stats;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

/// The entries' hasher: foldhash, seeded per process. Hashing the name is a good share of a
/// cache hit, and SipHash (the default) costs several times more; a random seed still keeps
/// callers from choosing colliding names.
type EntryHasher = foldhash::fast::RandomState;
use tokio::time::Instant;

pub use answer::{Answer, LookupError, Source};
pub use changes::{Change, Changes, Compacted, FeedItem, HISTORY as CHANGE_HISTORY, Subscription};
pub use snapshot::{CacheSnapshot, SnapshotEntry};
pub use stats::{
    AnswerStats, CacheStats, DecisionStats, EvictionStats, FlightStats, RequestStats, WatchStats,
};

use crate::decision::{Decide, LookupContext, LookupDecision, PolicyInfo, RejectionKind};
use crate::model::Service;
use crate::registry::Registry;
use entry::{Entry, View};
use evict::Guard;
use flight::Flight;
use health::HealthCell;
use maintain::Maintenance;
use reply::Reply;
use stats::{Counter, Counters};

/// Options of a [`RegistryCache`]; the policy's settings decide everything else.
#[derive(Debug, Clone, Copy)]
struct Options {
    refresh_timeout: Duration,
    node_ttl: Duration,
    tick: Duration,
    record_changes: bool,
}

/// Builds a [`RegistryCache`].
pub struct CacheBuilder {
    registry: Arc<dyn Registry>,
    policy: Arc<dyn Decide>,
    options: Options,
}

impl CacheBuilder {
    /// The longest one registry request of a refresh may take before it counts as a timeout
    /// and the service may be refreshed again. Default: 5 s. It bounds how long a refresh
    /// stays "in flight"; callers never wait this long (their bound is the policy's
    /// `max-wait`).
    pub fn refresh_timeout(mut self, timeout: Duration) -> Self {
        self.options.refresh_timeout = timeout;
        self
    }

    /// A node neither listed by a refresh nor confirmed by a connected watch for this long is
    /// proposed for eviction (reason `node-ttl`), as go-micro expires cached nodes. While the
    /// watch is connected its silence confirms every node. Default: 10 minutes.
    pub fn node_ttl(mut self, ttl: Duration) -> Self {
        self.options.node_ttl = ttl;
        self
    }

    /// How often the maintenance task samples health, ends suspect holds and sweeps unused
    /// entries. Default: 100 ms.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.options.tick = tick.max(Duration::from_millis(1));
        self
    }

    /// Keeps a feed of every change of a node as lookups see it ([`RegistryCache::changes`]),
    /// for fronts that stream changes. Default: off (it costs a comparison of views on every
    /// change of an entry, and the memory of [`CHANGE_HISTORY`] changes).
    pub fn record_changes(mut self, record: bool) -> Self {
        self.options.record_changes = record;
        self
    }

    /// Builds the cache and starts its maintenance task (watch, holds, TTLs). Must be called
    /// within a Tokio runtime; the task ends soon after the last clone of the cache is dropped.
    pub fn build(self) -> RegistryCache {
        let settings = self.policy.active().settings;
        let inner = Arc::new(Inner {
            health: HealthCell::new(self.registry.clone()),
            registry: self.registry,
            policy: self.policy,
            entries: DashMap::with_hasher(EntryHasher::default()),
            budget: budget::Budget::new(settings.registry_budget_per_second),
            counters: Counters::new(),
            changes: self
                .options
                .record_changes
                .then(|| Arc::new(Changes::default())),
            options: self.options,
        });
        Maintenance::spawn(&inner, self.options.tick);
        RegistryCache { inner }
    }
}

/// A service-registry cache steered by a policy. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct RegistryCache {
    inner: Arc<Inner>,
}

/// What the lookup path, the refresh tasks and the maintenance task share; each concern's
/// logic lives with its own type ([`flight::Flight`], [`evict::Guard`],
/// [`maintain::Maintenance`], [`reply::Reply`]).
pub(crate) struct Inner {
    registry: Arc<dyn Registry>,
    policy: Arc<dyn Decide>,
    entries: DashMap<Arc<str>, Arc<Entry>, EntryHasher>,
    budget: budget::Budget,
    health: HealthCell,
    counters: Counters,
    changes: Option<Arc<Changes>>,
    options: Options,
}

impl RegistryCache {
    /// A cache over `registry` decided by `policy`, with default options.
    pub fn new(registry: Arc<dyn Registry>, policy: Arc<dyn Decide>) -> Self {
        Self::builder(registry, policy).build()
    }

    /// A builder, to set options before [`CacheBuilder::build`].
    pub fn builder(registry: Arc<dyn Registry>, policy: Arc<dyn Decide>) -> CacheBuilder {
        CacheBuilder {
            registry,
            policy,
            options: Options {
                refresh_timeout: Duration::from_secs(5),
                node_ttl: Duration::from_secs(600),
                tick: Duration::from_millis(100),
                record_changes: false,
            },
        }
    }

    /// Looks `service` up: asks the policy what to do and does it.
    ///
    /// Never waits longer than the policy's wait bound (itself capped by the settings'
    /// `max-wait`); a caller that can be answered from the cache never waits for the registry
    /// unless the policy says so.
    pub async fn lookup(&self, service: &str) -> Result<Answer, LookupError> {
        let inner = &self.inner;
        let now = Instant::now();
        let view = inner.entries.get(service).map(|e| e.view());
        let decided = inner
            .policy
            .decide_lookup(&inner.context(service, view.as_deref(), now));
        let label = decided.decision.label();
        inner.counters.inc(match &decided.decision {
            LookupDecision::ServeCached => Counter::DecidedServeCached,
            LookupDecision::ServeStale { refresh: false } => Counter::DecidedServeStale,
            LookupDecision::ServeStale { refresh: true } => Counter::DecidedServeStaleRefresh,
            LookupDecision::RefreshAndWait { .. } => Counter::DecidedRefreshAndWait,
            LookupDecision::Reject { .. } => Counter::DecidedReject,
        });
        let policy = decided.policy;
        let settings = policy.settings;
        let reply = Reply::new(inner, service, policy, label);
        match (decided.decision, view) {
            (LookupDecision::ServeCached, Some(view)) if view.cached() => {
                Ok(reply.answer(view, Source::Fresh, now))
            }
            (LookupDecision::ServeStale { refresh }, Some(view)) if view.cached() => {
                if refresh {
                    Flight::start_in_background(inner, service, &view, &settings, now);
                }
                Ok(reply.answer(view, Source::Stale, now))
            }
            (LookupDecision::Reject { kind, reason }, view) => {
                let negative = view.is_some_and(|v| v.negative);
                Err(reply.reject(kind, reason, negative))
            }
            // Serving from an empty cache is impossible: a negative entry answers "not found",
            // anything else waits for a refresh as the engine's fail-safe would.
            (LookupDecision::ServeCached | LookupDecision::ServeStale { .. }, Some(view))
                if view.negative =>
            {
                Err(reply.reject(
                    RejectionKind::NotFound,
                    format!("{service} not found (negative cache)"),
                    true,
                ))
            }
            (LookupDecision::ServeCached | LookupDecision::ServeStale { .. }, view) => {
                reply
                    .refresh_and_wait(view, settings.max_wait, true, now)
                    .await
            }
            (
                LookupDecision::RefreshAndWait {
                    max_wait_ms,
                    fallback_to_stale,
                },
                view,
            ) => {
                let wait = Duration::from_millis(u64::from(max_wait_ms)).min(settings.max_wait);
                reply
                    .refresh_and_wait(view, wait, fallback_to_stale, now)
                    .await
            }
        }
    }

    /// Removes a node this host deregistered itself, for the node's own process (a client's
    /// delete, or its lease ending): a deliberate departure, which the eviction guard is not
    /// asked about. The guard weighs the registry's word that nodes vanished, and a burst of a
    /// service's processes leaving on purpose would otherwise be held as suspect and handed
    /// out for the whole hold.
    pub fn forget_deregistered(&self, service: &str, node_id: &str) {
        let Some(entry) = self.inner.entries.get(service).map(|e| e.clone()) else {
            return;
        };
        let mut state = entry.lock();
        state.pending.remove(node_id);
        if state.nodes.remove(node_id).is_some() {
            entry.publish(&state);
        }
    }

    /// The feed of changes, if the cache was built to record them
    /// ([`CacheBuilder::record_changes`]).
    pub fn changes(&self) -> Option<&Arc<Changes>> {
        self.inner.changes.as_ref()
    }

    /// What the cache holds of every service it has nodes of, as lookups would be answered
    /// from it (suspects included), without asking the policy: for listings.
    pub fn cached_services(&self) -> Vec<Service> {
        self.inner
            .entries
            .iter()
            .flat_map(|e| e.value().view().services.to_vec())
            .collect()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// The number of cached services (negative entries included).
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// The number of cached nodes over all services, suspects included. Reads each entry's
    /// view count (no copy of the cache), for metrics.
    pub fn node_count(&self) -> usize {
        self.inner
            .entries
            .iter()
            .map(|e| e.value().view().nodes as usize)
            .sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }

    /// The active policy.
    pub fn policy(&self) -> Arc<PolicyInfo> {
        self.inner.policy.active()
    }
}

/// Wall-clock milliseconds since the Unix epoch.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Inner {
    /// The eviction guard, over this cache's policy, health and counters.
    fn guard(&self) -> Guard<'_> {
        Guard {
            policy: &*self.policy,
            health: &self.health,
            counters: &self.counters,
        }
    }

    /// The policy's context for a lookup of `service`.
    fn context<'a>(
        &self,
        service: &'a str,
        view: Option<&View>,
        now: Instant,
    ) -> LookupContext<'a> {
        let since = |t: Option<Instant>| t.map(|t| millis(now.saturating_duration_since(t)));
        let (health, now_ms) = self.health.view_and_wall_ms_at(now);
        let cold = LookupContext::cold(service, now_ms, health);
        let Some(view) = view else {
            return cold;
        };
        LookupContext {
            cached: view.cached(),
            negative: view.negative,
            versions: view.versions,
            nodes: view.nodes,
            suspect_nodes: view.suspects.len() as u32,
            since_refresh_ms: since(view.refreshed_at),
            since_attempt_ms: since(view.attempted_at),
            consecutive_failures: view.consecutive_failures,
            last_error: if view.consecutive_failures > 0 {
                view.last_error
            } else {
                None
            },
            refresh_in_flight: view.in_flight,
            ..cold
        }
    }
}

#[cfg(test)]
mod tests;
