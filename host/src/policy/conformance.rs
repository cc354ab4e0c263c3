//! The conformance battery every policy passes before it may become active.
//!
//! Synthetic lookups and evictions covering the situations the host will present (cold cache,
//! fresh and stale entries, negative entries, failing and unhealthy registries, refreshes in
//! flight, bursts of deletions), each under the production deadline. A policy that traps, hangs,
//! exhausts its memory or returns an oversized answer on any of them is refused, and so is one
//! that answers differently from a second, fresh instance: policies must be pure.

use super::instance::{CallFailure, Instance};
use crate::decision::{EvictionContext, EvictionReason, HealthView, LookupContext, LookupDecision};
use crate::registry::ErrorKind;

/// A failed case: which, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conformance case `{case}`: {failure}")]
pub struct ConformanceFailure {
    /// The case's description.
    pub case: String,
    /// What went wrong.
    pub failure: String,
}

const NOW_MS: u64 = 1_700_000_000_000;

fn lookups() -> Vec<(String, LookupContext<'static>)> {
    let healthy = HealthView {
        watch_connected: true,
        since_last_contact_ms: Some(10),
        since_failure_ms: None,
    };
    let down = HealthView {
        watch_connected: false,
        since_last_contact_ms: Some(120_000),
        since_failure_ms: Some(500),
    };
    let base = LookupContext::cold("conformance.probe", NOW_MS, healthy);
    let cached = |age: u64| LookupContext {
        versions: 2,
        nodes: 5,
        ..LookupContext::cached(base.service, NOW_MS, healthy, age)
    };
    let mut cases = vec![
        ("cold cache".to_string(), base),
        ("fresh entry".into(), cached(10)),
        ("entry past any ttl".into(), cached(u64::MAX / 2)),
        (
            "negative entry".into(),
            LookupContext {
                negative: true,
                since_refresh_ms: Some(1),
                since_attempt_ms: Some(1),
                ..base
            },
        ),
        (
            "refresh in flight".into(),
            LookupContext {
                refresh_in_flight: true,
                ..cached(600_000)
            },
        ),
        (
            "all nodes suspect".into(),
            LookupContext {
                suspect_nodes: 5,
                ..cached(10)
            },
        ),
        (
            "empty service name".into(),
            LookupContext {
                service: "",
                ..base
            },
        ),
    ];
    for kind in [
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
        ErrorKind::Unauthenticated,
        ErrorKind::NotFound,
        ErrorKind::InvalidInput,
    ] {
        for (label, ctx) in [("cold", base), ("stale", cached(600_000))] {
            cases.push((
                format!("{label} entry, registry down ({})", kind.as_str()),
                LookupContext {
                    since_attempt_ms: Some(1),
                    consecutive_failures: u32::MAX,
                    last_error: Some(kind),
                    health: down,
                    ..ctx
                },
            ));
        }
    }
    cases
}

fn evictions() -> Vec<(String, EvictionContext<'static>)> {
    let base = EvictionContext {
        service: "conformance.probe",
        now_ms: NOW_MS,
        nodes_before: 5,
        nodes_after: 4,
        recent_deletions: 1,
        window_ms: 30_000,
        health: HealthView {
            watch_connected: true,
            since_last_contact_ms: Some(10),
            since_failure_ms: None,
        },
        reason: EvictionReason::WatchDelete,
    };
    vec![
        ("single deregistration".into(), base),
        (
            "single removal soon after a registry failure".into(),
            EvictionContext {
                health: HealthView {
                    since_failure_ms: Some(1_000),
                    ..base.health
                },
                ..base
            },
        ),
        (
            "mass deletion".into(),
            EvictionContext {
                nodes_after: 1,
                recent_deletions: 4,
                ..base
            },
        ),
        (
            "last node, registry down".into(),
            EvictionContext {
                nodes_before: 1,
                nodes_after: 0,
                health: HealthView::default(),
                reason: EvictionReason::LeaseExpired,
                ..base
            },
        ),
        (
            "node ttl, huge counts".into(),
            EvictionContext {
                nodes_before: u32::MAX,
                nodes_after: 0,
                recent_deletions: u32::MAX,
                reason: EvictionReason::NodeTtl,
                ..base
            },
        ),
        (
            "refresh lists fewer nodes".into(),
            EvictionContext {
                reason: EvictionReason::Refresh,
                ..base
            },
        ),
    ]
}

/// The answers a policy gave to the whole battery, to compare two instances.
#[derive(Debug, PartialEq)]
pub(crate) struct Answers(Vec<String>);

/// Runs the battery on `instance`.
pub(crate) fn run(instance: &mut Instance) -> Result<Answers, ConformanceFailure> {
    let fail = |case: &str, failure: CallFailure| ConformanceFailure {
        case: case.to_string(),
        failure: failure.to_string(),
    };
    let mut answers = Vec::new();
    for (case, ctx) in lookups() {
        let decision = instance.decide_lookup(&ctx).map_err(|f| fail(&case, f))?;
        if let LookupDecision::RefreshAndWait { max_wait_ms: 0, .. } = decision {
            return Err(ConformanceFailure {
                case,
                failure: "refresh-and-wait with a zero wait can never succeed".into(),
            });
        }
        answers.push(format!("{decision:?}"));
    }
    for (case, ctx) in evictions() {
        let decision = instance.guard_eviction(&ctx).map_err(|f| fail(&case, f))?;
        answers.push(format!("{decision:?}"));
    }
    Ok(Answers(answers))
}
