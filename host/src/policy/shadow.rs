//! Shadow runs: a candidate policy asked the active policy's questions off the lookup path, its
//! answers compared with the active policy's and never acted on.
//!
//! A candidate passed the same validation as a swap. The observer thread (`observe`) asks it a
//! sampled share of the questions the active policy answered, on its own instance, and tallies
//! here: agreements and disagreements by decision pair, the most recent disagreements with
//! their whole question, the candidate's failures and its CPU cost per call. Promoting the
//! candidate activates it as a swap would; its validation is not run again (a policy is pure:
//! it answers as it did when validated).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::instance::{CallFailure, Instance};
use super::sandbox::{self, Limits};
use super::{Breaker, PolicySpec, Validated};
use crate::decision::{Answer, Question, Settings};

/// Disagreements kept with their whole question.
pub const RECENT_DISAGREEMENTS: usize = 64;
/// Measured calls over which the candidate's p99 cost is taken.
const COST_SAMPLES: usize = 1024;
/// One call in this many is measured.
const COST_SAMPLED_ONE_IN: u64 = 16;

/// What one question asked of the candidate came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Agreed,
    Disagreed,
    Failed,
}

/// A candidate loaded beside the active policy.
pub(crate) struct Candidate {
    pub(super) validated: Validated,
    pub(super) spec: PolicySpec,
    loaded_at: SystemTime,
    /// The observer's dropped count when this candidate was loaded.
    dropped_before: u64,
    /// Rests a candidate that keeps failing, as the active policy's breaker does: each failure
    /// costs the observer a deadline and a fresh instance, and the recording shares the
    /// observer.
    breaker: Breaker,
    /// Calls made, to pick those measured.
    calls: AtomicU64,
    tally: Mutex<Tally>,
}

impl Candidate {
    /// `dropped_before`: the observer's count of dropped questions now.
    pub(super) fn new(validated: Validated, spec: PolicySpec, dropped_before: u64) -> Self {
        Candidate {
            validated,
            spec,
            loaded_at: SystemTime::now(),
            dropped_before,
            breaker: Breaker::new(),
            calls: AtomicU64::new(0),
            tally: Mutex::new(Tally::default()),
        }
    }

    /// Whether the candidate rests after failing too often in a row; a question that finds it
    /// resting is counted as skipped.
    pub(super) fn resting(&self) -> bool {
        if !self.breaker.is_open() {
            return false;
        }
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        tally.skipped += 1;
        true
    }

    /// A serving instance of the candidate, for the observer thread.
    pub(super) fn instantiate(&self, limits: &Limits) -> Result<Instance, CallFailure> {
        self.validated.serving_instance(&self.spec.config, limits)
    }

    /// Asks `instance` (of this candidate) `question` and tallies its answer against the
    /// active policy's. After [`Outcome::Failed`], the instance is unfit to use again.
    pub(super) fn compare(
        &self,
        instance: &mut Instance,
        question: Question,
        active: Answer,
    ) -> Outcome {
        // A thread's CPU clock is a system call: read around one call in COST_SAMPLED_ONE_IN,
        // not every one, which would make the observer fall behind.
        let measured = self
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(COST_SAMPLED_ONE_IN);
        let started = measured.then(sandbox::thread_cpu_time);
        let answered = instance.ask(&question);
        let cost = started.map(|started| sandbox::thread_cpu_time().saturating_sub(started));
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        tally.asked += 1;
        match answered {
            Ok(candidate) => {
                self.breaker.record_success();
                tally.answered += 1;
                if let Some(cost) = cost {
                    tally.cost.add(cost);
                }
                let agree = candidate == active;
                let pair = tally
                    .pairs
                    .entry((active.label(), candidate.label()))
                    .or_default();
                if agree {
                    pair.agree += 1;
                    Outcome::Agreed
                } else {
                    pair.disagree += 1;
                    if tally.recent.len() == RECENT_DISAGREEMENTS {
                        tally.recent.pop_front();
                    }
                    tally.recent.push_back(Disagreement {
                        question,
                        active,
                        candidate,
                        at: SystemTime::now(),
                    });
                    Outcome::Disagreed
                }
            }
            Err(failure) => {
                self.breaker.record_failure();
                tally.count_failure(failure);
                Outcome::Failed
            }
        }
    }

    /// Counts `questions` sampled for the candidate that the observer had no time to ask.
    pub(super) fn count_skipped(&self, questions: u64) {
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        tally.skipped += questions;
    }

    /// Counts a call that failed before it could be asked (its instance could not be made).
    pub(super) fn count_failure(&self, failure: CallFailure) {
        self.breaker.record_failure();
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        tally.asked += 1;
        tally.count_failure(failure);
    }

    /// What the shadow run has shown so far; `dropped_now` is the observer's count of dropped
    /// questions.
    pub(super) fn report(&self, dropped_now: u64) -> ShadowReport {
        let tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        let disagreed = tally.pairs.values().map(|p| p.disagree).sum();
        ShadowReport {
            digest: self.validated.digest.clone(),
            source: self.spec.source.clone(),
            loaded_at: self.loaded_at,
            settings: self.validated.settings,
            asked: tally.asked,
            answered: tally.answered,
            disagreed,
            pairs: tally
                .pairs
                .iter()
                .map(|(&(active, candidate), count)| DecisionPair {
                    active,
                    candidate,
                    agree: count.agree,
                    disagree: count.disagree,
                })
                .collect(),
            recent_disagreements: tally.recent.iter().cloned().collect(),
            traps: tally.traps,
            deadline_hits: tally.deadline_hits,
            invalid_answers: tally.invalid_answers,
            last_failure: tally.last_failure.clone(),
            cost: tally.cost.summary(),
            skipped: tally.skipped,
            dropped: dropped_now.saturating_sub(self.dropped_before),
        }
    }
}

#[derive(Default)]
struct Tally {
    asked: u64,
    answered: u64,
    skipped: u64,
    pairs: BTreeMap<(&'static str, &'static str), PairCount>,
    recent: VecDeque<Disagreement>,
    traps: u64,
    deadline_hits: u64,
    invalid_answers: u64,
    last_failure: Option<CallFailure>,
    cost: Cost,
}

impl Tally {
    fn count_failure(&mut self, failure: CallFailure) {
        let counter = match failure {
            CallFailure::Deadline(_) => &mut self.deadline_hits,
            CallFailure::InvalidAnswer(_) => &mut self.invalid_answers,
            _ => &mut self.traps,
        };
        *counter += 1;
        self.last_failure = Some(failure);
    }
}

#[derive(Default)]
struct PairCount {
    agree: u64,
    disagree: u64,
}

/// CPU time of the measured calls: totals, and the last [`COST_SAMPLES`] for the p99.
#[derive(Default)]
struct Cost {
    calls: u64,
    total: Duration,
    max: Duration,
    recent: VecDeque<Duration>,
}

impl Cost {
    fn add(&mut self, cost: Duration) {
        self.calls += 1;
        self.total += cost;
        self.max = self.max.max(cost);
        if self.recent.len() == COST_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(cost);
    }

    fn summary(&self) -> CallCost {
        let mut recent: Vec<Duration> = self.recent.iter().copied().collect();
        recent.sort_unstable();
        let p99 = recent
            .get((recent.len() * 99 / 100).min(recent.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        CallCost {
            mean: u64::try_from(self.total.as_nanos() / u128::from(self.calls.max(1)))
                .map_or(Duration::MAX, Duration::from_nanos),
            p99,
            max: self.max,
        }
    }
}

/// A question the candidate answered otherwise than the active policy.
#[derive(Debug, Clone)]
pub struct Disagreement {
    /// The question, whole.
    pub question: Question,
    /// The active policy's answer.
    pub active: Answer,
    /// The candidate's.
    pub candidate: Answer,
    /// When the candidate answered.
    pub at: SystemTime,
}

/// How often the active policy and the candidate answered one pair of decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionPair {
    /// The active policy's decision ([`Answer::label`]).
    pub active: &'static str,
    /// The candidate's.
    pub candidate: &'static str,
    /// Answers equal in every field.
    pub agree: u64,
    /// Answers that differ (for one label, in a parameter: a wait, a hold, a reason).
    pub disagree: u64,
}

/// The candidate's CPU time per answered call, over one call in 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallCost {
    /// Mean over the measured calls.
    pub mean: Duration,
    /// p99 over the last 1024 measured.
    pub p99: Duration,
    /// The most any call took.
    pub max: Duration,
}

/// What a shadow run has shown so far.
#[derive(Debug, Clone)]
pub struct ShadowReport {
    /// The candidate's sha256, hex.
    pub digest: String,
    /// Where it came from.
    pub source: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Its validated settings.
    pub settings: Settings,
    /// Questions asked of it.
    pub asked: u64,
    /// Of those, answered (the others failed).
    pub answered: u64,
    /// Answers that differ from the active policy's.
    pub disagreed: u64,
    /// Agreements and disagreements by decision pair, sorted.
    pub pairs: Vec<DecisionPair>,
    /// The last [`RECENT_DISAGREEMENTS`] disagreements, oldest first.
    pub recent_disagreements: Vec<Disagreement>,
    /// Calls that trapped or could not instantiate.
    pub traps: u64,
    /// Calls stopped at the serving deadline.
    pub deadline_hits: u64,
    /// Calls whose answer the host refuses.
    pub invalid_answers: u64,
    /// The last failure, if any.
    pub last_failure: Option<CallFailure>,
    /// Its cost per answered call.
    pub cost: CallCost,
    /// Sampled questions not asked: because the candidate was resting (after five failures in
    /// a row it is not asked for a second), or because the observer had no time for them (past
    /// 10 ms of asking in a round, while questions pile up for the recording: a slow candidate is
    /// asked a share of them, and the recording keeps up).
    pub skipped: u64,
    /// Questions the observer dropped since the candidate was loaded, its buffers full: neither
    /// recorded nor asked of the candidate.
    pub dropped: u64,
}
