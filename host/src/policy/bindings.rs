//! The typed bindings to `wit/policy.wit`, and the conversions between them and
//! [`crate::decision`]'s wasm-free types.
//!
//! Conversions live here, next to the generated code, so that a change to the WIT breaks the
//! build in one file.

use std::time::Duration;

use crate::decision as plain;
use crate::registry::ErrorKind;

// The generated module is named `regcache` like this crate: paths into it say `self::`.
wasmtime::component::bindgen!({
    world: "policy",
    path: "../wit",
});

pub(crate) use self::regcache::policy::host::{Host, LogLevel};
use self::regcache::policy::types as wit;

/// Longest reason string the host keeps from a policy; the WIT promises at most 1 KiB.
pub(crate) const MAX_REASON_BYTES: usize = 1024;

/// `text` cut to at most [`MAX_REASON_BYTES`], on a character boundary.
pub(crate) fn clip(text: &str) -> &str {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn error_kind(kind: ErrorKind) -> wit::ErrorKind {
    match kind {
        ErrorKind::Timeout => wit::ErrorKind::Timeout,
        ErrorKind::Unavailable => wit::ErrorKind::Unavailable,
        ErrorKind::Unauthenticated => wit::ErrorKind::Unauthenticated,
        ErrorKind::NotFound => wit::ErrorKind::NotFound,
        ErrorKind::InvalidInput => wit::ErrorKind::InvalidInput,
        // Only registrations conflict, and a policy is asked about lookups: never reached.
        // The nearest kind keeps the WIT (and every built policy) unchanged.
        ErrorKind::Conflict => wit::ErrorKind::InvalidInput,
    }
}

fn health(view: plain::HealthView) -> wit::RegistryHealth {
    wit::RegistryHealth {
        watch_connected: view.watch_connected,
        since_last_contact_ms: view.since_last_contact_ms,
        since_failure_ms: view.since_failure_ms,
    }
}

/// Lowers a lookup context. `service` is a reused buffer: the caller keeps it between calls so
/// that the hot path does not allocate.
pub(crate) fn lookup_context(
    ctx: &plain::LookupContext<'_>,
    service: String,
) -> wit::LookupContext {
    wit::LookupContext {
        service,
        now_ms: ctx.now_ms,
        cached: ctx.cached,
        negative: ctx.negative,
        versions: ctx.versions,
        nodes: ctx.nodes,
        suspect_nodes: ctx.suspect_nodes,
        since_refresh_ms: ctx.since_refresh_ms,
        since_attempt_ms: ctx.since_attempt_ms,
        consecutive_failures: ctx.consecutive_failures,
        last_error: ctx.last_error.map(error_kind),
        refresh_in_flight: ctx.refresh_in_flight,
        health: health(ctx.health),
    }
}

pub(crate) fn eviction_context(ctx: &plain::EvictionContext<'_>) -> wit::EvictionContext {
    wit::EvictionContext {
        service: ctx.service.to_string(),
        now_ms: ctx.now_ms,
        nodes_before: ctx.nodes_before,
        nodes_after: ctx.nodes_after,
        recent_deletions: ctx.recent_deletions,
        window_ms: ctx.window_ms,
        health: health(ctx.health),
        reason: match ctx.reason {
            plain::EvictionReason::WatchDelete => wit::EvictionReason::WatchDelete,
            plain::EvictionReason::LeaseExpired => wit::EvictionReason::LeaseExpired,
            plain::EvictionReason::NodeTtl => wit::EvictionReason::NodeTtl,
            plain::EvictionReason::Refresh => wit::EvictionReason::Refresh,
        },
    }
}

/// A decision the host cannot accept as is.
#[derive(Debug, thiserror::Error)]
#[error("the policy returned a {len}-byte reason; the limit is {MAX_REASON_BYTES} bytes")]
pub(crate) struct OversizedReason {
    len: usize,
}

pub(crate) fn lookup_decision(
    decision: wit::LookupDecision,
) -> Result<plain::LookupDecision, OversizedReason> {
    Ok(match decision {
        wit::LookupDecision::ServeCached => plain::LookupDecision::ServeCached,
        wit::LookupDecision::ServeStale(refresh) => plain::LookupDecision::ServeStale { refresh },
        wit::LookupDecision::RefreshAndWait(wait) => plain::LookupDecision::RefreshAndWait {
            max_wait_ms: wait.max_wait_ms,
            fallback_to_stale: wait.fallback_to_stale,
        },
        wit::LookupDecision::Reject(rejection) => {
            if rejection.reason.len() > MAX_REASON_BYTES {
                return Err(OversizedReason {
                    len: rejection.reason.len(),
                });
            }
            plain::LookupDecision::Reject {
                kind: match rejection.kind {
                    wit::RejectionKind::NotFound => plain::RejectionKind::NotFound,
                    wit::RejectionKind::Unavailable => plain::RejectionKind::Unavailable,
                },
                reason: rejection.reason,
            }
        }
    })
}

pub(crate) fn eviction_decision(decision: wit::EvictionDecision) -> plain::EvictionDecision {
    match decision {
        wit::EvictionDecision::Evict => plain::EvictionDecision::Evict,
        wit::EvictionDecision::KeepSuspect(hold_ms) => {
            plain::EvictionDecision::KeepSuspect { hold_ms }
        }
        wit::EvictionDecision::Keep => plain::EvictionDecision::Keep,
    }
}

/// The settings as the policy returned them, before validation.
pub(crate) fn raw_settings(settings: &wit::Settings) -> RawSettings {
    RawSettings {
        ttl_ms: settings.ttl_ms,
        min_retry_interval_ms: settings.min_retry_interval_ms,
        max_wait_ms: settings.max_wait_ms,
        negative_ttl_ms: settings.negative_ttl_ms,
        registry_budget_per_second: settings.registry_budget_per_second,
        eviction_window_ms: settings.eviction_window_ms,
        max_suspect_hold_ms: settings.max_suspect_hold_ms,
        eviction_batch_ms: settings.eviction_batch_ms,
    }
}

/// Settings in the policy's own units, validated by [`super::settings::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawSettings {
    pub ttl_ms: u64,
    pub min_retry_interval_ms: u64,
    pub max_wait_ms: u64,
    pub negative_ttl_ms: u64,
    pub registry_budget_per_second: u32,
    pub eviction_window_ms: u64,
    pub max_suspect_hold_ms: u64,
    pub eviction_batch_ms: u64,
}

impl RawSettings {
    pub(crate) fn into_settings(self) -> plain::Settings {
        plain::Settings {
            ttl: Duration::from_millis(self.ttl_ms),
            min_retry_interval: Duration::from_millis(self.min_retry_interval_ms),
            max_wait: Duration::from_millis(self.max_wait_ms),
            negative_ttl: Duration::from_millis(self.negative_ttl_ms),
            registry_budget_per_second: self.registry_budget_per_second,
            eviction_window: Duration::from_millis(self.eviction_window_ms),
            max_suspect_hold: Duration::from_millis(self.max_suspect_hold_ms),
            eviction_batch: Duration::from_millis(self.eviction_batch_ms),
        }
    }
}
