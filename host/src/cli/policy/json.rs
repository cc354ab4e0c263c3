//! The JSON shapes of `regcache policy eval`: counterparts of the decision types with `From`
//! conversions, so that the policy's types stay free of any wire format and this command's
//! input and output can only change here.

use serde::{Deserialize, Serialize};

use regcache::decision::{
    EvictionContext, EvictionDecision, EvictionReason, HealthView, LookupContext, LookupDecision,
    RejectionKind,
};
use regcache::registry::ErrorKind;

/// A lookup context in JSON; absent fields describe a cold lookup with a healthy registry:
/// nothing cached, no attempt made, the watch connected and etcd heard from just now.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupJson {
    #[serde(default = "example_service")]
    service: String,
    now_ms: u64,
    cached: bool,
    negative: bool,
    versions: u32,
    nodes: u32,
    suspect_nodes: u32,
    since_refresh_ms: Option<u64>,
    since_attempt_ms: Option<u64>,
    consecutive_failures: u32,
    last_error: Option<ErrorKindJson>,
    refresh_in_flight: bool,
    #[serde(default = "yes")]
    watch_connected: bool,
    #[serde(default = "just_now")]
    since_last_contact_ms: Option<u64>,
    since_failure_ms: Option<u64>,
}

fn example_service() -> String {
    "example".into()
}

fn yes() -> bool {
    true
}

fn just_now() -> Option<u64> {
    Some(0)
}

impl<'a> From<&'a LookupJson> for LookupContext<'a> {
    fn from(json: &'a LookupJson) -> Self {
        LookupContext {
            service: &json.service,
            now_ms: json.now_ms,
            cached: json.cached,
            negative: json.negative,
            versions: json.versions,
            nodes: json.nodes,
            suspect_nodes: json.suspect_nodes,
            since_refresh_ms: json.since_refresh_ms,
            since_attempt_ms: json.since_attempt_ms,
            consecutive_failures: json.consecutive_failures,
            last_error: json.last_error.map(ErrorKind::from),
            refresh_in_flight: json.refresh_in_flight,
            health: HealthView {
                watch_connected: json.watch_connected,
                since_last_contact_ms: json.since_last_contact_ms,
                since_failure_ms: json.since_failure_ms,
            },
        }
    }
}

/// An eviction context in JSON; absent fields describe one deregistration out of five.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvictionJson {
    service: String,
    now_ms: u64,
    nodes_before: u32,
    nodes_after: u32,
    recent_deletions: u32,
    window_ms: u64,
    watch_connected: bool,
    since_last_contact_ms: Option<u64>,
    since_failure_ms: Option<u64>,
    reason: EvictionReasonJson,
}

impl Default for EvictionJson {
    fn default() -> Self {
        EvictionJson {
            service: "example".into(),
            now_ms: 0,
            nodes_before: 5,
            nodes_after: 4,
            recent_deletions: 1,
            window_ms: 30_000,
            watch_connected: true,
            since_last_contact_ms: Some(0),
            since_failure_ms: None,
            reason: EvictionReasonJson::WatchDelete,
        }
    }
}

impl<'a> From<&'a EvictionJson> for EvictionContext<'a> {
    fn from(json: &'a EvictionJson) -> Self {
        EvictionContext {
            service: &json.service,
            now_ms: json.now_ms,
            nodes_before: json.nodes_before,
            nodes_after: json.nodes_after,
            recent_deletions: json.recent_deletions,
            window_ms: json.window_ms,
            health: HealthView {
                watch_connected: json.watch_connected,
                since_last_contact_ms: json.since_last_contact_ms,
                since_failure_ms: json.since_failure_ms,
            },
            reason: json.reason.into(),
        }
    }
}

/// [`ErrorKind`] as `last_error` spells it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ErrorKindJson {
    Timeout,
    Unavailable,
    Unauthenticated,
    NotFound,
    InvalidInput,
    Conflict,
}

impl From<ErrorKindJson> for ErrorKind {
    fn from(json: ErrorKindJson) -> Self {
        match json {
            ErrorKindJson::Timeout => ErrorKind::Timeout,
            ErrorKindJson::Unavailable => ErrorKind::Unavailable,
            ErrorKindJson::Unauthenticated => ErrorKind::Unauthenticated,
            ErrorKindJson::NotFound => ErrorKind::NotFound,
            ErrorKindJson::InvalidInput => ErrorKind::InvalidInput,
            ErrorKindJson::Conflict => ErrorKind::Conflict,
        }
    }
}

/// [`EvictionReason`] as `reason` spells it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EvictionReasonJson {
    WatchDelete,
    LeaseExpired,
    NodeTtl,
    Refresh,
}

impl From<EvictionReasonJson> for EvictionReason {
    fn from(json: EvictionReasonJson) -> Self {
        match json {
            EvictionReasonJson::WatchDelete => EvictionReason::WatchDelete,
            EvictionReasonJson::LeaseExpired => EvictionReason::LeaseExpired,
            EvictionReasonJson::NodeTtl => EvictionReason::NodeTtl,
            EvictionReasonJson::Refresh => EvictionReason::Refresh,
        }
    }
}

/// A lookup decision as printed: `{"decision": "serve_stale", "refresh": true}`.
#[derive(Debug, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum LookupDecisionJson {
    ServeCached,
    ServeStale {
        refresh: bool,
    },
    RefreshAndWait {
        max_wait_ms: u32,
        fallback_to_stale: bool,
    },
    Reject {
        kind: RejectionKindJson,
        reason: String,
    },
}

impl From<LookupDecision> for LookupDecisionJson {
    fn from(decision: LookupDecision) -> Self {
        match decision {
            LookupDecision::ServeCached => LookupDecisionJson::ServeCached,
            LookupDecision::ServeStale { refresh } => LookupDecisionJson::ServeStale { refresh },
            LookupDecision::RefreshAndWait {
                max_wait_ms,
                fallback_to_stale,
            } => LookupDecisionJson::RefreshAndWait {
                max_wait_ms,
                fallback_to_stale,
            },
            LookupDecision::Reject { kind, reason } => LookupDecisionJson::Reject {
                kind: kind.into(),
                reason,
            },
        }
    }
}

/// [`RejectionKind`] as printed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionKindJson {
    NotFound,
    Unavailable,
}

impl From<RejectionKind> for RejectionKindJson {
    fn from(kind: RejectionKind) -> Self {
        match kind {
            RejectionKind::NotFound => RejectionKindJson::NotFound,
            RejectionKind::Unavailable => RejectionKindJson::Unavailable,
        }
    }
}

/// An eviction decision as printed: `{"decision": "keep_suspect", "hold_ms": 60000}`.
#[derive(Debug, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum EvictionDecisionJson {
    Evict,
    KeepSuspect { hold_ms: u64 },
    Keep,
}

impl From<EvictionDecision> for EvictionDecisionJson {
    fn from(decision: EvictionDecision) -> Self {
        match decision {
            EvictionDecision::Evict => EvictionDecisionJson::Evict,
            EvictionDecision::KeepSuspect { hold_ms } => {
                EvictionDecisionJson::KeepSuspect { hold_ms }
            }
            EvictionDecision::Keep => EvictionDecisionJson::Keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_lookup_is_a_cold_one_with_a_healthy_registry() {
        let json: LookupJson = serde_json::from_str("{}").unwrap();
        let healthy = HealthView {
            watch_connected: true,
            since_last_contact_ms: Some(0),
            since_failure_ms: None,
        };
        assert_eq!(
            LookupContext::from(&json),
            LookupContext::cold("example", 0, healthy)
        );
    }
}
