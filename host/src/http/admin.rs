//! The policy endpoints, metrics and health.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;

use super::{ApiError, AppState};
use crate::decision::{Decide, PolicyInfo};
use crate::policy::{PolicyEngine, PolicyError, PolicySpec, Rollback, SwapOptions};

#[derive(Serialize)]
pub(super) struct PolicyBody {
    generation: u64,
    digest: String,
    source: String,
    /// When it became active, ms since the Unix epoch.
    loaded_at_ms: u64,
    settings: SettingsBody,
    counters: Counters,
    /// The last automatic rollback, if any: which generation gave way to which, and why.
    rollback: Option<RollbackBody>,
}

#[derive(Serialize)]
struct RollbackBody {
    from: GenerationBody,
    to: GenerationBody,
    reason: String,
    at_ms: u64,
}

#[derive(Serialize)]
struct GenerationBody {
    generation: u64,
    digest: String,
    source: String,
}

impl GenerationBody {
    fn of(info: &PolicyInfo) -> Self {
        GenerationBody {
            generation: info.generation,
            digest: info.digest.clone(),
            source: info.source.clone(),
        }
    }
}

impl From<Rollback> for RollbackBody {
    fn from(rollback: Rollback) -> Self {
        RollbackBody {
            from: GenerationBody::of(&rollback.from),
            to: GenerationBody::of(&rollback.to),
            reason: rollback.reason.to_string(),
            at_ms: unix_ms(rollback.at),
        }
    }
}

pub(super) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Serialize)]
struct SettingsBody {
    ttl_ms: u64,
    min_retry_interval_ms: u64,
    max_wait_ms: u64,
    negative_ttl_ms: u64,
    registry_budget_per_second: u32,
    eviction_window_ms: u64,
    max_suspect_hold_ms: u64,
}

#[derive(Serialize)]
struct Counters {
    traps: u64,
    deadline_hits: u64,
    invalid_answers: u64,
    instantiations: u64,
    swaps_applied: u64,
    swaps_rejected: u64,
    breaker_skips: u64,
    fail_safe_lookups: u64,
    fail_safe_evictions: u64,
    rollbacks: u64,
}

pub(super) fn policy_body(engine: &PolicyEngine, info: &PolicyInfo) -> PolicyBody {
    let stats = engine.stats();
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let s = &info.settings;
    PolicyBody {
        generation: info.generation,
        digest: info.digest.clone(),
        source: info.source.clone(),
        loaded_at_ms: unix_ms(info.loaded_at),
        settings: SettingsBody {
            ttl_ms: ms(s.ttl),
            min_retry_interval_ms: ms(s.min_retry_interval),
            max_wait_ms: ms(s.max_wait),
            negative_ttl_ms: ms(s.negative_ttl),
            registry_budget_per_second: s.registry_budget_per_second,
            eviction_window_ms: ms(s.eviction_window),
            max_suspect_hold_ms: ms(s.max_suspect_hold),
        },
        counters: Counters {
            traps: stats.traps,
            deadline_hits: stats.deadline_hits,
            invalid_answers: stats.invalid_answers,
            instantiations: stats.instantiations,
            swaps_applied: stats.swaps_applied,
            swaps_rejected: stats.swaps_rejected,
            breaker_skips: stats.breaker_skips,
            fail_safe_lookups: stats.fail_safe_lookups,
            fail_safe_evictions: stats.fail_safe_evictions,
            rollbacks: stats.rollbacks,
        },
        rollback: engine.last_rollback().map(RollbackBody::from),
    }
}

/// `GET /v1/policy`.
pub(super) async fn policy(State(state): State<AppState>) -> Json<PolicyBody> {
    Json(policy_body(&state.engine, &state.engine.active()))
}

/// Proof that a request carries the admin token: 403 when the admin endpoints are disabled,
/// 401 without the token.
///
/// An extractor from the request's head, and the handler's first argument, so the token is
/// checked before anything reads the body: a client without it cannot make the host buffer a
/// policy-sized body (`policy.max_size`).
pub(super) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authorize(state, &parts.headers).map(|()| Admin)
    }
}

/// Checks the bearer token.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin endpoints are disabled: no admin token is configured (admin_token)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <admin token>`",
        ))
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What `PUT /v1/policy` does with a policy that passes validation (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SwapMode {
    /// Make it active (the default).
    Active,
    /// Load it as the shadow candidate.
    Shadow,
}

/// The query parameters of `PUT /v1/policy` that are the API's own: `mode` (`active` or
/// `shadow`) and `replay` (`recent`). The others are the policy's configuration, so these two
/// names are reserved.
fn swap_request(query: &mut BTreeMap<String, String>) -> Result<(SwapMode, SwapOptions), ApiError> {
    let mode = match query.remove("mode").as_deref() {
        None | Some("active") => SwapMode::Active,
        Some("shadow") => SwapMode::Shadow,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "mode `{other}`: expected `active` (the default) or `shadow`"
            )));
        }
    };
    let replay_recent = match query.remove("replay").as_deref() {
        None => false,
        Some("recent") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "replay `{other}`: the only replay is `recent` (the recording in memory)"
            )));
        }
    };
    if replay_recent && mode == SwapMode::Shadow {
        return Err(ApiError::bad_request(
            "replay=recent is a precondition of activating a policy; a shadow is never acted on",
        ));
    }
    Ok((mode, SwapOptions { replay_recent }))
}

/// `PUT /v1/policy` with the wasm bytes; query parameters other than `mode` and `replay`, if
/// any, replace the operator configuration (else the active one is kept). Validated (and with
/// `replay=recent`, replayed on the recording in memory), then swapped: 200 with the new
/// policy, or 422 with the reason while the old policy stays active. With `mode=shadow`, loaded
/// as the shadow candidate instead: 200 with its (empty) report.
pub(super) async fn swap_policy(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(mut query) = query?;
    let (mode, options) = swap_request(&mut query)?;
    let body = match body {
        // axum's text would not say which limit.
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the policy is larger than its size limit of {} bytes (policy.max_size)",
                    state.engine.load_limits().max_size
                ),
            ));
        }
        body => body?,
    };
    let config = if query.is_empty() {
        state.engine.active_config()
    } else {
        query.into_iter().collect()
    };
    let spec = PolicySpec {
        wasm: body.to_vec().into(),
        source: "api".into(),
        config,
    };
    // Validation compiles the component and runs the conformance battery: milliseconds of CPU,
    // kept off the async workers.
    let response = match mode {
        SwapMode::Active => {
            let info = blocking(&state, move |engine| engine.swap_with(spec, options)).await?;
            Json(policy_body(&state.engine, &info)).into_response()
        }
        SwapMode::Shadow => {
            let report = blocking(&state, move |engine| engine.shadow(spec)).await?;
            Json(super::shadow::report_body(report)).into_response()
        }
    };
    Ok(response)
}

/// Runs a policy operation of the engine on a blocking thread (it may validate a candidate,
/// replay the recording, or write an artifact to disk).
pub(super) async fn blocking<T: Send + 'static>(
    state: &AppState,
    operation: impl FnOnce(PolicyEngine) -> Result<T, PolicyError> + Send + 'static,
) -> Result<T, ApiError> {
    let engine = state.engine.clone();
    let outcome = tokio::task::spawn_blocking(move || operation(engine))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("policy task failed: {e}"),
            )
        })?;
    outcome.map_err(|e| refusal(state, e))
}

/// A policy operation refused, naming the policy that stays active: 404 when there is no
/// shadow to act on, 409 when a later request overtook it, 503 when the host is stopping, 422
/// when the policy itself is refused.
pub(super) fn refusal(state: &AppState, e: PolicyError) -> ApiError {
    let (status, code) = match e {
        PolicyError::NoShadow => {
            return ApiError::new(StatusCode::NOT_FOUND, "no_shadow", e.to_string());
        }
        // Nothing is wrong with the request: a later one was served first.
        PolicyError::Superseded => (StatusCode::CONFLICT, "superseded"),
        PolicyError::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        _ => (StatusCode::UNPROCESSABLE_ENTITY, "policy_refused"),
    };
    let active = state.engine.active();
    ApiError::new(status, code, e.to_string()).with_details(serde_json::json!({
        "active": { "generation": active.generation, "digest": active.digest },
    }))
}

/// `GET /metrics`.
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

/// `GET /healthz`: the process answers.
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: a policy is loaded (always, once the host serves) and the registry answers
/// or a snapshot is being served.
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let health = state.registry.health();
    let registry = health.watch_connected;
    let snapshot = state.serving_snapshot();
    let ready = registry || snapshot;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let policy = state.engine.active();
    (
        status,
        Json(serde_json::json!({
            "ready": ready,
            "registry_connected": registry,
            "serving_snapshot": snapshot,
            "policy": { "generation": policy.generation, "digest": policy.digest },
        })),
    )
}
