//! The policy lifecycle's endpoints beyond the swap: the shadow candidate's report, its
//! promotion and removal, and the recording in memory.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;

use super::admin::{Admin, PolicyBody, blocking, policy_body, refusal, unix_ms};
use super::{ApiError, AppState};
use crate::policy::{PolicyError, ShadowReport};
use crate::recording::{answer_json, question_json};

#[derive(Serialize)]
pub(super) struct ShadowBody {
    digest: String,
    source: String,
    loaded_at_ms: u64,
    /// Questions asked of the candidate, answered, and answered otherwise than the active
    /// policy.
    asked: u64,
    answered: u64,
    disagreed: u64,
    /// Every decision pair seen (active, candidate), with how often the answers were equal
    /// and how often they differed.
    pairs: Vec<PairBody>,
    /// The most recent disagreements, oldest first, with their whole question.
    recent_disagreements: Vec<DisagreementBody>,
    failures: FailuresBody,
    /// The candidate's CPU time per answered call, in microseconds.
    cost_us: CostBody,
    /// Questions not asked because the candidate was resting after failing five times in a row.
    skipped: u64,
    /// Questions dropped since the candidate was loaded because the observer was behind
    /// (neither recorded nor shadowed).
    dropped: u64,
}

#[derive(Serialize)]
struct PairBody {
    active: &'static str,
    candidate: &'static str,
    agree: u64,
    disagree: u64,
}

#[derive(Serialize)]
struct DisagreementBody {
    question: serde_json::Value,
    active: serde_json::Value,
    candidate: serde_json::Value,
    at_ms: u64,
}

#[derive(Serialize)]
struct FailuresBody {
    traps: u64,
    deadline_hits: u64,
    invalid_answers: u64,
    last: Option<String>,
}

#[derive(Serialize)]
struct CostBody {
    mean: f64,
    p99: f64,
    max: f64,
}

pub(super) fn report_body(report: ShadowReport) -> ShadowBody {
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    ShadowBody {
        digest: report.digest,
        source: report.source,
        loaded_at_ms: unix_ms(report.loaded_at),
        asked: report.asked,
        answered: report.answered,
        disagreed: report.disagreed,
        pairs: report
            .pairs
            .into_iter()
            .map(|pair| PairBody {
                active: pair.active,
                candidate: pair.candidate,
                agree: pair.agree,
                disagree: pair.disagree,
            })
            .collect(),
        recent_disagreements: report
            .recent_disagreements
            .iter()
            .map(|d| DisagreementBody {
                question: question_json(&d.question),
                active: answer_json(&d.active),
                candidate: answer_json(&d.candidate),
                at_ms: unix_ms(d.at),
            })
            .collect(),
        failures: FailuresBody {
            traps: report.traps,
            deadline_hits: report.deadline_hits,
            invalid_answers: report.invalid_answers,
            last: report.last_failure.map(|f| f.to_string()),
        },
        cost_us: CostBody {
            mean: us(report.cost.mean),
            p99: us(report.cost.p99),
            max: us(report.cost.max),
        },
        skipped: report.skipped,
        dropped: report.dropped,
    }
}

/// `GET /v1/policy/shadow`: the shadow run's report, 404 without a candidate. Admin only, as
/// the recording: it shows the questions the host was asked.
pub(super) async fn report(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<ShadowBody>, ApiError> {
    let report = state
        .engine
        .shadow_report()
        .ok_or_else(|| refusal(&state, PolicyError::NoShadow))?;
    Ok(Json(report_body(report)))
}

/// `POST /v1/policy/shadow/promote`: the candidate becomes the active policy as a swap would
/// make it; 200 with the new active policy.
pub(super) async fn promote(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<PolicyBody>, ApiError> {
    let info = blocking(&state, |engine| engine.promote_shadow()).await?;
    Ok(Json(policy_body(&state.engine, &info)))
}

/// `DELETE /v1/policy/shadow`: unloads the candidate; 200 with its last report.
pub(super) async fn remove(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<ShadowBody>, ApiError> {
    let report = state.engine.drop_shadow().map_err(|e| refusal(&state, e))?;
    Ok(Json(report_body(report)))
}

/// `GET /v1/policy/recording`: the questions recorded in memory, oldest first, as JSON lines
/// (`regcache policy replay --contexts` reads them). Empty when recording is off. Streamed a
/// chunk of lines at a time: a ring of a million questions is hundreds of MiB of JSON.
pub(super) async fn recording(
    _: Admin,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    const LINES_PER_CHUNK: usize = 1024;
    // Copying the ring takes its lock and may take a while: not on a worker that serves lookups.
    let recording = blocking(&state, |engine| Ok(engine.recording())).await?;
    let chunks = (0..recording.len().div_ceil(LINES_PER_CHUNK)).map(move |chunk| {
        let mut text = String::new();
        for recorded in recording
            .iter()
            .skip(chunk * LINES_PER_CHUNK)
            .take(LINES_PER_CHUNK)
        {
            text.push_str(&recorded.to_line());
            text.push('\n');
        }
        Ok::<_, std::convert::Infallible>(text)
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(futures_util::stream::iter(chunks)),
    ))
}
