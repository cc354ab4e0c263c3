//! Recordings: the questions a policy was asked, as JSON lines, and the JSON shapes of contexts
//! and decisions they are written in. One format for every tool that shows or reads a question:
//! the host's recording (a ring, a rotating file), the shadow report's disagreements,
//! `regcache policy replay` (which reads recordings and prints answers) and `policy eval` (one
//! context given by hand). The decision types stay free of any wire format; the format can only
//! change here.
//!
//! A line is one question, and what the active policy answered when it was asked:
//!
//! ```text
//! {"lookup":{"context":{"service":"greeter","now_ms":1700000000000,...},"decided":{"decision":"serve_cached"}}}
//! {"eviction":{"context":{"service":"greeter",...,"reason":"watch_delete"},"decided":{"decision":"evict"}}}
//! ```
//!
//! Context fields left out take the defaults of [`LookupJson`] and [`EvictionJson`], so a
//! hand-written line can say only what matters; a recording writes every field.

use std::io::{BufRead, Read};

use serde::{Deserialize, Serialize};

use crate::decision::{
    Answer, Asked, EvictionContext, EvictionDecision, EvictionReason, HealthView, LookupContext,
    LookupDecision, Question, RejectionKind,
};
use crate::registry::ErrorKind;

/// A lookup context in JSON; absent fields describe a cold lookup with a healthy registry:
/// nothing cached, no attempt made, the watch connected and etcd heard from just now.
#[derive(Debug, Default, Serialize, Deserialize)]
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

impl From<&LookupContext<'_>> for LookupJson {
    fn from(context: &LookupContext<'_>) -> Self {
        LookupJson {
            service: context.service.to_owned(),
            now_ms: context.now_ms,
            cached: context.cached,
            negative: context.negative,
            versions: context.versions,
            nodes: context.nodes,
            suspect_nodes: context.suspect_nodes,
            since_refresh_ms: context.since_refresh_ms,
            since_attempt_ms: context.since_attempt_ms,
            consecutive_failures: context.consecutive_failures,
            last_error: context.last_error.map(ErrorKindJson::from),
            refresh_in_flight: context.refresh_in_flight,
            watch_connected: context.health.watch_connected,
            since_last_contact_ms: context.health.since_last_contact_ms,
            since_failure_ms: context.health.since_failure_ms,
        }
    }
}

/// An eviction context in JSON; absent fields describe one deregistration out of five.
#[derive(Debug, Serialize, Deserialize)]
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

impl From<&EvictionContext<'_>> for EvictionJson {
    fn from(context: &EvictionContext<'_>) -> Self {
        EvictionJson {
            service: context.service.to_owned(),
            now_ms: context.now_ms,
            nodes_before: context.nodes_before,
            nodes_after: context.nodes_after,
            recent_deletions: context.recent_deletions,
            window_ms: context.window_ms,
            watch_connected: context.health.watch_connected,
            since_last_contact_ms: context.health.since_last_contact_ms,
            since_failure_ms: context.health.since_failure_ms,
            reason: context.reason.into(),
        }
    }
}

/// [`ErrorKind`] as `last_error` spells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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

impl From<ErrorKind> for ErrorKindJson {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Timeout => ErrorKindJson::Timeout,
            ErrorKind::Unavailable => ErrorKindJson::Unavailable,
            ErrorKind::Unauthenticated => ErrorKindJson::Unauthenticated,
            ErrorKind::NotFound => ErrorKindJson::NotFound,
            ErrorKind::InvalidInput => ErrorKindJson::InvalidInput,
            ErrorKind::Conflict => ErrorKindJson::Conflict,
        }
    }
}

/// [`EvictionReason`] as `reason` spells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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

impl From<EvictionReason> for EvictionReasonJson {
    fn from(reason: EvictionReason) -> Self {
        match reason {
            EvictionReason::WatchDelete => EvictionReasonJson::WatchDelete,
            EvictionReason::LeaseExpired => EvictionReasonJson::LeaseExpired,
            EvictionReason::NodeTtl => EvictionReasonJson::NodeTtl,
            EvictionReason::Refresh => EvictionReasonJson::Refresh,
        }
    }
}

/// A lookup decision in JSON: `{"decision": "serve_stale", "refresh": true}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
enum LookupDecisionJson {
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

impl From<LookupDecisionJson> for LookupDecision {
    fn from(json: LookupDecisionJson) -> Self {
        match json {
            LookupDecisionJson::ServeCached => LookupDecision::ServeCached,
            LookupDecisionJson::ServeStale { refresh } => LookupDecision::ServeStale { refresh },
            LookupDecisionJson::RefreshAndWait {
                max_wait_ms,
                fallback_to_stale,
            } => LookupDecision::RefreshAndWait {
                max_wait_ms,
                fallback_to_stale,
            },
            LookupDecisionJson::Reject { kind, reason } => LookupDecision::Reject {
                kind: kind.into(),
                reason,
            },
        }
    }
}

/// [`RejectionKind`] in JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RejectionKindJson {
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

impl From<RejectionKindJson> for RejectionKind {
    fn from(json: RejectionKindJson) -> Self {
        match json {
            RejectionKindJson::NotFound => RejectionKind::NotFound,
            RejectionKindJson::Unavailable => RejectionKind::Unavailable,
        }
    }
}

/// An eviction decision in JSON: `{"decision": "keep_suspect", "hold_ms": 60000}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
enum EvictionDecisionJson {
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

impl From<EvictionDecisionJson> for EvictionDecision {
    fn from(json: EvictionDecisionJson) -> Self {
        match json {
            EvictionDecisionJson::Evict => EvictionDecision::Evict,
            EvictionDecisionJson::KeepSuspect { hold_ms } => {
                EvictionDecision::KeepSuspect { hold_ms }
            }
            EvictionDecisionJson::Keep => EvictionDecision::Keep,
        }
    }
}

/// A question and what the active policy answered, if known: one line of a recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// What the policy was asked.
    pub question: Question,
    /// What the active policy answered (none in a hand-written line).
    pub decided: Option<Answer>,
}

/// One line of a recording as JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum LineJson {
    Lookup {
        context: LookupJson,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decided: Option<LookupDecisionJson>,
    },
    Eviction {
        context: EvictionJson,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decided: Option<EvictionDecisionJson>,
    },
}

/// A question as JSON (`{"lookup": {...}}` or `{"eviction": {...}}`), for reports that show the
/// context a decision was made in.
pub fn question_json(question: &Question) -> serde_json::Value {
    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum QuestionJson {
        Lookup(LookupJson),
        Eviction(EvictionJson),
    }
    let json = match question.asked() {
        Asked::Lookup(context) => QuestionJson::Lookup(LookupJson::from(&context)),
        Asked::Eviction(context) => QuestionJson::Eviction(EvictionJson::from(&context)),
    };
    serde_json::to_value(json).expect("a question is plain data")
}

/// An answer as JSON (`{"decision": "serve_stale", "refresh": true}`).
pub fn answer_json(answer: &Answer) -> serde_json::Value {
    let json = match answer {
        Answer::Lookup(decision) => {
            serde_json::to_value(LookupDecisionJson::from(decision.clone()))
        }
        Answer::Eviction(decision) => serde_json::to_value(EvictionDecisionJson::from(*decision)),
    };
    json.expect("an answer is plain data")
}

impl Recorded {
    /// This record as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        let line = match self.question.asked() {
            Asked::Lookup(context) => LineJson::Lookup {
                context: LookupJson::from(&context),
                decided: match &self.decided {
                    Some(Answer::Lookup(decision)) => Some(decision.clone().into()),
                    _ => None,
                },
            },
            Asked::Eviction(context) => LineJson::Eviction {
                context: EvictionJson::from(&context),
                decided: match self.decided {
                    Some(Answer::Eviction(decision)) => Some(decision.into()),
                    _ => None,
                },
            },
        };
        serde_json::to_string(&line).expect("a record is plain data")
    }

    /// Parses one line of a recording.
    pub fn parse(line: &str) -> Result<Recorded, serde_json::Error> {
        Ok(match serde_json::from_str::<LineJson>(line)? {
            LineJson::Lookup { context, decided } => Recorded {
                question: Question::from(&LookupContext::from(&context)),
                decided: decided.map(|d| Answer::Lookup(d.into())),
            },
            LineJson::Eviction { context, decided } => Recorded {
                question: Question::from(&EvictionContext::from(&context)),
                decided: decided.map(|d| Answer::Eviction(d.into())),
            },
        })
    }
}

/// The longest line [`read`] takes, in bytes. A recorded question is well under a kilobyte; the
/// bound keeps a file that is not a recording (gigabytes without a newline) from being read
/// whole.
pub const MAX_LINE: usize = 1 << 20;

/// A line of a recording that is not a record.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The line is not a record.
    #[error("line {line}: {error}")]
    Invalid {
        /// 1-based.
        line: usize,
        /// Why.
        error: serde_json::Error,
    },
    /// The line is not UTF-8 text: the file is not a recording.
    #[error("line {line}: not UTF-8 text")]
    NotText {
        /// 1-based.
        line: usize,
    },
    /// The line is longer than [`MAX_LINE`]: the file is not a recording. Reading stops here.
    #[error("line {line}: longer than {MAX_LINE} bytes")]
    TooLong {
        /// 1-based.
        line: usize,
    },
    /// The recording could not be read. Reading stops here.
    #[error("line {line}: {error}")]
    Io {
        /// 1-based.
        line: usize,
        /// Why.
        error: std::io::Error,
    },
}

/// The records of a recording, in order, each with its line number (1-based); blank lines are
/// skipped. Memory stays bounded by [`MAX_LINE`] whatever the file holds.
pub fn read(
    mut reader: impl BufRead,
) -> impl Iterator<Item = Result<(usize, Recorded), ReadError>> {
    let mut line = 0;
    let mut bytes = Vec::new();
    let mut stopped = false;
    std::iter::from_fn(move || {
        while !stopped {
            line += 1;
            bytes.clear();
            let limit = MAX_LINE as u64 + 1;
            match (&mut reader).take(limit).read_until(b'\n', &mut bytes) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(error) => {
                    stopped = true;
                    return Some(Err(ReadError::Io { line, error }));
                }
            }
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
            } else if bytes.len() > MAX_LINE {
                stopped = true;
                return Some(Err(ReadError::TooLong { line }));
            }
            let Ok(text) = std::str::from_utf8(&bytes) else {
                return Some(Err(ReadError::NotText { line }));
            };
            if !text.trim().is_empty() {
                return Some(
                    Recorded::parse(text)
                        .map(|record| (line, record))
                        .map_err(|error| ReadError::Invalid { line, error }),
                );
            }
        }
        None
    })
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

    #[test]
    fn a_record_survives_its_line() {
        let health = HealthView {
            watch_connected: false,
            since_last_contact_ms: Some(12),
            since_failure_ms: Some(3),
        };
        let lookup = LookupContext {
            negative: true,
            consecutive_failures: 2,
            last_error: Some(ErrorKind::Unavailable),
            ..LookupContext::cached("grüße", 1_700_000_000_000, health, 61_000)
        };
        let eviction = EvictionContext {
            service: "svc",
            now_ms: 5,
            nodes_before: 5,
            nodes_after: 1,
            recent_deletions: 4,
            window_ms: 30_000,
            health,
            reason: EvictionReason::LeaseExpired,
        };
        let records = [
            Recorded {
                question: Question::from(&lookup),
                decided: Some(Answer::Lookup(LookupDecision::Reject {
                    kind: RejectionKind::NotFound,
                    reason: "\"quoted\"\n".into(),
                })),
            },
            Recorded {
                question: Question::from(&eviction),
                decided: Some(Answer::Eviction(EvictionDecision::KeepSuspect {
                    hold_ms: 9,
                })),
            },
            Recorded {
                question: Question::from(&eviction),
                decided: None,
            },
        ];
        for record in records {
            let line = record.to_line();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(Recorded::parse(&line).unwrap(), record, "{line}");
        }
    }

    #[test]
    fn a_bad_line_is_named_by_its_number() {
        let text =
            "{\"lookup\":{\"context\":{}}}\n\n{\"lookup\":{\"context\":{\"nodes\":\"x\"}}}\n";
        let results: Vec<_> = read(text.as_bytes()).collect();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].as_ref().unwrap().0, 1);
        let error = results[1].as_ref().unwrap_err().to_string();
        assert!(error.starts_with("line 3: "), "{error}");
    }

    #[test]
    fn records_keep_their_line_numbers_across_blank_and_crlf_lines() {
        let text = "\r\n{\"lookup\":{\"context\":{}}}\r\n\n{\"eviction\":{\"context\":{}}}";
        let lines: Vec<usize> = read(text.as_bytes()).map(|r| r.unwrap().0).collect();
        assert_eq!(lines, [2, 4]);
    }

    #[test]
    fn a_file_that_is_not_text_is_refused_in_bounded_memory() {
        let binary = b"{}\n\xff\xfe\x00garbage\n";
        let errors: Vec<_> = read(&binary[..]).map(Result::unwrap_err).collect();
        assert!(
            matches!(
                errors[..],
                [
                    ReadError::Invalid { line: 1, .. },
                    ReadError::NotText { line: 2 }
                ]
            ),
            "{errors:?}"
        );

        let endless = std::io::repeat(b'x');
        let errors: Vec<_> = read(std::io::BufReader::new(endless))
            .map(Result::unwrap_err)
            .collect();
        assert!(
            matches!(errors[..], [ReadError::TooLong { line: 1 }]),
            "{errors:?}"
        );
    }
}
