//! The cache's counters: sharded so that the hit path never writes a cache line another
//! thread writes too, and summed into a plain [`CacheStats`] snapshot on demand.
//!
//! A single `AtomicU64` per outcome would be one contended cache line for every lookup on every
//! thread; the benchmarks require lookups to scale with threads, so each thread counts in its
//! own shard (picked round-robin on the thread's first count) and [`Counters::snapshot`] adds
//! the shards up. Reads are rare (a metrics scrape); writes are the hot path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::registry::ErrorKind;

/// Every counter the cache keeps; the discriminant is the index in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Counter {
    AnsweredFresh,
    AnsweredStale,
    AnsweredRegistry,
    NotFoundNegative,
    NotFoundRegistry,
    NotFoundPolicy,
    UnavailablePolicy,
    UnavailableRateLimited,
    UnavailableOverdue,
    UnavailableBudget,
    UnavailableRegistry,
    DecidedServeCached,
    DecidedServeStale,
    DecidedServeStaleRefresh,
    DecidedRefreshAndWait,
    DecidedReject,
    GetOk,
    GetNotFound,
    GetTimeout,
    GetUnavailable,
    GetUnauthenticated,
    GetInvalidInput,
    FlightsStarted,
    FlightsJoined,
    FlightWaitTimeouts,
    RefreshesRateLimited,
    RefreshesBudgetDenied,
    GuardCalls,
    NodesEvicted,
    NodesKeptSuspect,
    NodesKept,
    SuspectsExpired,
    SuspectsConfirmedAbsent,
    SuspectsRestored,
    WatchPuts,
    WatchDeletes,
    WatchResyncs,
    WatchIgnored,
}

const COUNTERS: usize = Counter::WatchIgnored as usize + 1;
/// Enough shards that two busy threads rarely share one on a large machine.
const SHARDS: usize = 32;

/// One thread's counters, padded to its own cache lines.
#[repr(align(128))]
struct Shard([AtomicU64; COUNTERS]);

/// The sharded counters.
pub(crate) struct Counters {
    shards: Box<[Shard]>,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            shards: (0..SHARDS)
                .map(|_| Shard(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }

    /// Adds `n` to `counter` in this thread's shard.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        let shard = SHARD.with(|s| *s);
        self.shards[shard].0[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `counter`.
    pub(crate) fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Counts one registry `get_service` by its result.
    pub(crate) fn count_get(&self, result: Result<(), ErrorKind>) {
        self.inc(match result {
            Ok(()) => Counter::GetOk,
            Err(ErrorKind::NotFound) => Counter::GetNotFound,
            Err(ErrorKind::Timeout) => Counter::GetTimeout,
            Err(ErrorKind::Unavailable) => Counter::GetUnavailable,
            Err(ErrorKind::Unauthenticated) => Counter::GetUnauthenticated,
            // `get_service` never conflicts (only registrations do).
            Err(ErrorKind::InvalidInput | ErrorKind::Conflict) => Counter::GetInvalidInput,
        });
    }

    fn sum(&self, counter: Counter) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0[counter as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Adds the shards up.
    pub(crate) fn snapshot(&self) -> CacheStats {
        use Counter::*;
        let c = |counter| self.sum(counter);
        CacheStats {
            answers: AnswerStats {
                fresh: c(AnsweredFresh),
                stale: c(AnsweredStale),
                registry: c(AnsweredRegistry),
                not_found_negative: c(NotFoundNegative),
                not_found_registry: c(NotFoundRegistry),
                not_found_policy: c(NotFoundPolicy),
                unavailable_policy: c(UnavailablePolicy),
                unavailable_rate_limited: c(UnavailableRateLimited),
                unavailable_overdue: c(UnavailableOverdue),
                unavailable_budget: c(UnavailableBudget),
                unavailable_registry: c(UnavailableRegistry),
            },
            decisions: DecisionStats {
                serve_cached: c(DecidedServeCached),
                serve_stale: c(DecidedServeStale),
                serve_stale_and_refresh: c(DecidedServeStaleRefresh),
                refresh_and_wait: c(DecidedRefreshAndWait),
                reject: c(DecidedReject),
            },
            get_service: RequestStats {
                ok: c(GetOk),
                not_found: c(GetNotFound),
                timeout: c(GetTimeout),
                unavailable: c(GetUnavailable),
                unauthenticated: c(GetUnauthenticated),
                invalid_input: c(GetInvalidInput),
            },
            flights: FlightStats {
                started: c(FlightsStarted),
                joined: c(FlightsJoined),
                wait_timeouts: c(FlightWaitTimeouts),
                rate_limited: c(RefreshesRateLimited),
                budget_denied: c(RefreshesBudgetDenied),
            },
            evictions: EvictionStats {
                guard_calls: c(GuardCalls),
                evicted: c(NodesEvicted),
                kept_suspect: c(NodesKeptSuspect),
                kept: c(NodesKept),
                suspects_expired: c(SuspectsExpired),
                suspects_confirmed_absent: c(SuspectsConfirmedAbsent),
                suspects_restored: c(SuspectsRestored),
            },
            watch: WatchStats {
                puts: c(WatchPuts),
                deletes: c(WatchDeletes),
                resyncs: c(WatchResyncs),
                ignored: c(WatchIgnored),
            },
        }
    }
}

/// A snapshot of every counter of a [`super::RegistryCache`], for the metrics layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Lookups by outcome and source.
    pub answers: AnswerStats,
    /// Lookups by the policy's decision.
    pub decisions: DecisionStats,
    /// Registry `get_service` requests by result.
    pub get_service: RequestStats,
    /// Singleflight refreshes.
    pub flights: FlightStats,
    /// Eviction-guard outcomes, in nodes.
    pub evictions: EvictionStats,
    /// Watch events applied to cached entries.
    pub watch: WatchStats,
}

/// Lookups by outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AnswerStats {
    /// Answered from the cache as fresh.
    pub fresh: u64,
    /// Answered from the cache as stale.
    pub stale: u64,
    /// Answered by a refresh the caller waited for.
    pub registry: u64,
    /// "Not found" from the negative cache.
    pub not_found_negative: u64,
    /// "Not found" from the registry.
    pub not_found_registry: u64,
    /// "Not found" because the policy rejected the lookup so.
    pub not_found_policy: u64,
    /// "Unavailable" because the policy rejected the lookup so.
    pub unavailable_policy: u64,
    /// "Unavailable" at once because the service's retry interval had not passed.
    pub unavailable_rate_limited: u64,
    /// "Unavailable" at once because the refresh in flight already made a caller's wait run
    /// out (the registry is slow; nobody else queues behind it).
    pub unavailable_overdue: u64,
    /// "Unavailable" at once because the global registry budget was spent.
    pub unavailable_budget: u64,
    /// "Unavailable" because the refresh failed or the wait ran out.
    pub unavailable_registry: u64,
}

/// Lookups by the policy's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecisionStats {
    /// `serve-cached`.
    pub serve_cached: u64,
    /// `serve-stale(false)`.
    pub serve_stale: u64,
    /// `serve-stale(true)`.
    pub serve_stale_and_refresh: u64,
    /// `refresh-and-wait`.
    pub refresh_and_wait: u64,
    /// `reject`.
    pub reject: u64,
}

/// Registry requests of one operation, by result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestStats {
    /// Answered.
    pub ok: u64,
    /// Answered "not found".
    pub not_found: u64,
    /// Timed out (the registry's own timeout or the cache's refresh timeout).
    pub timeout: u64,
    /// Unreachable or refused.
    pub unavailable: u64,
    /// Credentials refused.
    pub unauthenticated: u64,
    /// Invalid request.
    pub invalid_input: u64,
}

impl RequestStats {
    /// Every request, whatever its result.
    pub fn total(&self) -> u64 {
        self.ok
            + self.not_found
            + self.timeout
            + self.unavailable
            + self.unauthenticated
            + self.invalid_input
    }
}

/// Singleflight refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlightStats {
    /// Refreshes started (each one registry request).
    pub started: u64,
    /// Callers that waited on a refresh another caller started.
    pub joined: u64,
    /// Waits that ran out before their refresh ended.
    pub wait_timeouts: u64,
    /// Refreshes not started because the service's retry interval had not passed.
    pub rate_limited: u64,
    /// Refreshes not started because the global budget was spent.
    pub budget_denied: u64,
}

/// Eviction-guard outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EvictionStats {
    /// Calls to the policy's guard (one per batch).
    pub guard_calls: u64,
    /// Nodes removed on the guard's word.
    pub evicted: u64,
    /// Nodes kept as suspect.
    pub kept_suspect: u64,
    /// Nodes kept as they were.
    pub kept: u64,
    /// Suspect nodes that left when their hold ended.
    pub suspects_expired: u64,
    /// Suspect nodes that left when a listing confirmed them absent and the guard agreed.
    pub suspects_confirmed_absent: u64,
    /// Suspect nodes the registry listed again, now normal.
    pub suspects_restored: u64,
}

/// Watch events seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WatchStats {
    /// Puts applied to a cached entry.
    pub puts: u64,
    /// Deletes applied to a cached entry.
    pub deletes: u64,
    /// Resyncs applied.
    pub resyncs: u64,
    /// Events about services not cached.
    pub ignored: u64,
}
