//! What the cache asks a policy and what it gets back, free of any WebAssembly detail.
//!
//! These types mirror `wit/policy.wit` one to one; [`crate::policy`] converts them at the wasm
//! boundary. The cache depends on this module and on the [`Decide`] trait only, so it can be
//! driven by the wasm engine in production and by a plain Rust closure in its unit tests.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::registry::ErrorKind;

/// The registry's health as a policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthView {
    /// The watch is connected and current.
    pub watch_connected: bool,
    /// Milliseconds since the registry last answered, if ever.
    pub since_last_contact_ms: Option<u64>,
    /// Milliseconds since the registry last failed the host, if ever.
    pub since_failure_ms: Option<u64>,
}

/// Everything known about one lookup (WIT `lookup-context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupContext<'a> {
    /// The service looked up.
    pub service: &'a str,
    /// Wall-clock time, ms since the Unix epoch.
    pub now_ms: u64,
    /// The cache holds nodes for the service.
    pub cached: bool,
    /// The cache holds a recent "not found" for the service.
    pub negative: bool,
    /// Versions in the cached entry.
    pub versions: u32,
    /// Nodes in the cached entry, suspects included.
    pub nodes: u32,
    /// Suspect nodes in the cached entry.
    pub suspect_nodes: u32,
    /// Since the last successful refresh, if any.
    pub since_refresh_ms: Option<u64>,
    /// Since the last refresh attempt, if any.
    pub since_attempt_ms: Option<u64>,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
    /// Kind of the last failure, if the last attempt failed.
    pub last_error: Option<ErrorKind>,
    /// A refresh is in flight.
    pub refresh_in_flight: bool,
    /// Registry health.
    pub health: HealthView,
}

impl<'a> LookupContext<'a> {
    /// A lookup of `service` the cache holds nothing about: no entry, no refresh attempted.
    /// Other situations start from here or from [`LookupContext::cached`] and state only what
    /// differs, with struct-update syntax (`LookupContext { negative: true, ..cold }`).
    pub const fn cold(service: &'a str, now_ms: u64, health: HealthView) -> Self {
        LookupContext {
            service,
            now_ms,
            cached: false,
            negative: false,
            versions: 0,
            nodes: 0,
            suspect_nodes: 0,
            since_refresh_ms: None,
            since_attempt_ms: None,
            consecutive_failures: 0,
            last_error: None,
            refresh_in_flight: false,
            health,
        }
    }

    /// A lookup of `service` whose entry (one version, one node, no suspect) was refreshed
    /// `age_ms` ago by the last attempt, which succeeded.
    pub const fn cached(service: &'a str, now_ms: u64, health: HealthView, age_ms: u64) -> Self {
        LookupContext {
            cached: true,
            versions: 1,
            nodes: 1,
            since_refresh_ms: Some(age_ms),
            since_attempt_ms: Some(age_ms),
            ..LookupContext::cold(service, now_ms, health)
        }
    }
}

/// Whether a rejection reads as "not found" or "unavailable".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    /// HTTP 404.
    NotFound,
    /// HTTP 503.
    Unavailable,
}

/// What to do with a lookup (WIT `lookup-decision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupDecision {
    /// Answer from the cache as fresh.
    ServeCached,
    /// Answer from the cache marked stale, optionally starting one background refresh.
    ServeStale {
        /// Start a background refresh.
        refresh: bool,
    },
    /// Refresh and wait.
    RefreshAndWait {
        /// Upper bound of the wait, in ms (also capped by [`Settings::max_wait`]).
        max_wait_ms: u32,
        /// Serve the cached answer stale if the refresh fails or times out.
        fallback_to_stale: bool,
    },
    /// Reject without asking the registry.
    Reject {
        /// The kind of rejection.
        kind: RejectionKind,
        /// Why.
        reason: String,
    },
}

impl LookupDecision {
    /// A stable name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            LookupDecision::ServeCached => "serve_cached",
            LookupDecision::ServeStale { refresh: false } => "serve_stale",
            LookupDecision::ServeStale { refresh: true } => "serve_stale_and_refresh",
            LookupDecision::RefreshAndWait { .. } => "refresh_and_wait",
            LookupDecision::Reject { .. } => "reject",
        }
    }
}

/// Why nodes would leave the cache (WIT `eviction-reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionReason {
    /// A watch delete event.
    WatchDelete,
    /// A lease expired.
    LeaseExpired,
    /// Not re-confirmed within the node TTL.
    NodeTtl,
    /// A refresh no longer lists them.
    Refresh,
}

/// A proposed removal of nodes (WIT `eviction-context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictionContext<'a> {
    /// The service.
    pub service: &'a str,
    /// Wall-clock time, ms since the Unix epoch.
    pub now_ms: u64,
    /// Nodes before the removal.
    pub nodes_before: u32,
    /// Nodes after the removal.
    pub nodes_after: u32,
    /// Removals of this service within the window, this one included.
    pub recent_deletions: u32,
    /// The window, in ms.
    pub window_ms: u64,
    /// Registry health.
    pub health: HealthView,
    /// Why.
    pub reason: EvictionReason,
}

/// What to do with nodes about to leave (WIT `eviction-decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionDecision {
    /// Remove them.
    Evict,
    /// Serve them marked suspect for at most this long (capped by the settings).
    KeepSuspect {
        /// Hold time in ms.
        hold_ms: u64,
    },
    /// Ignore the removal.
    Keep,
}

/// What the host must know about a policy, validated at load (WIT `settings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Entries younger than this are fresh.
    pub ttl: Duration,
    /// At most one registry request per service per interval.
    pub min_retry_interval: Duration,
    /// Longest wait of any caller.
    pub max_wait: Duration,
    /// How long "not found" is cached.
    pub negative_ttl: Duration,
    /// Registry requests per second for lookups, all services together.
    pub registry_budget_per_second: u32,
    /// Window over which deletions are counted.
    pub eviction_window: Duration,
    /// Longest suspect hold.
    pub max_suspect_hold: Duration,
    /// Removals of one service within this span are judged together.
    pub eviction_batch: Duration,
}

/// Which policy decided, and with what settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyInfo {
    /// Increases by one on every successful load or swap; 1 is the first policy.
    pub generation: u64,
    /// sha256 of the policy's wasm bytes, hex.
    pub digest: String,
    /// Where the policy came from (`embedded:default`, a file path, `api`).
    pub source: String,
    /// When it became active.
    pub loaded_at: SystemTime,
    /// Its validated settings.
    pub settings: Settings,
}

/// A decision and the policy generation that made it.
#[derive(Debug, Clone)]
pub struct Decided<D> {
    /// The decision.
    pub decision: D,
    /// The policy that made it.
    pub policy: Arc<PolicyInfo>,
}

/// Something that decides lookups and guards evictions: the wasm engine, or a test double.
///
/// Implementations answer synchronously and quickly (a wasm call is a few hundred ns) and never
/// fail: if the policy cannot answer, they return a documented fail-safe decision.
pub trait Decide: Send + Sync + 'static {
    /// Decides one lookup.
    fn decide_lookup(&self, context: &LookupContext<'_>) -> Decided<LookupDecision>;
    /// Guards one removal of nodes.
    fn guard_eviction(&self, context: &EvictionContext<'_>) -> Decided<EvictionDecision>;
    /// The active policy.
    fn active(&self) -> Arc<PolicyInfo>;
}

impl fmt::Display for PolicyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = self.digest.get(..12).unwrap_or(&self.digest);
        write!(
            f,
            "generation {} ({short}, {})",
            self.generation, self.source
        )
    }
}

impl EvictionDecision {
    /// A stable name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            EvictionDecision::Evict => "evict",
            EvictionDecision::KeepSuspect { .. } => "keep_suspect",
            EvictionDecision::Keep => "keep",
        }
    }
}

/// A question a policy was asked, owned so that it can outlive the lookup or removal that asked
/// it: what the host records, shadows ask a candidate, and replays ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The service, kept here; the context's own `service` is empty.
    service: Box<str>,
    context: QuestionContext,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuestionContext {
    Lookup(LookupContext<'static>),
    Eviction(EvictionContext<'static>),
}

/// A [`Question`] borrowed back as the context a policy is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked<'a> {
    /// `decide-lookup`'s context.
    Lookup(LookupContext<'a>),
    /// `guard-eviction`'s context.
    Eviction(EvictionContext<'a>),
}

impl Question {
    /// The context of this question, as the policy is asked it.
    pub fn asked(&self) -> Asked<'_> {
        match self.context {
            QuestionContext::Lookup(context) => Asked::Lookup(LookupContext {
                service: &self.service,
                ..context
            }),
            QuestionContext::Eviction(context) => Asked::Eviction(EvictionContext {
                service: &self.service,
                ..context
            }),
        }
    }

    /// The service the question is about.
    pub fn service(&self) -> &str {
        &self.service
    }
}

impl From<&LookupContext<'_>> for Question {
    fn from(context: &LookupContext<'_>) -> Self {
        Question {
            service: context.service.into(),
            context: QuestionContext::Lookup(LookupContext {
                service: "",
                ..*context
            }),
        }
    }
}

impl From<&EvictionContext<'_>> for Question {
    fn from(context: &EvictionContext<'_>) -> Self {
        Question {
            service: context.service.into(),
            context: QuestionContext::Eviction(EvictionContext {
                service: "",
                ..*context
            }),
        }
    }
}

/// A policy's answer to a [`Question`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To a lookup.
    Lookup(LookupDecision),
    /// To a removal.
    Eviction(EvictionDecision),
}

impl Answer {
    /// The decision's stable name ([`LookupDecision::label`], [`EvictionDecision::label`]).
    pub fn label(&self) -> &'static str {
        match self {
            Answer::Lookup(decision) => decision.label(),
            Answer::Eviction(decision) => decision.label(),
        }
    }
}
