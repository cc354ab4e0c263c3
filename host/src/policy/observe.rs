//! What the engine does with the questions it answers, besides answering them: records them
//! (a ring in memory, a rotating file of JSON lines) and asks them of a shadow candidate.
//!
//! Nothing of this runs on the lookup's time. A decision hands its question and answer to a
//! bounded queue (`try_send`: a full queue drops the observation and counts it) and one
//! observer thread does the rest. With nothing to record and no candidate, a decision reads one
//! atomic and builds nothing.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::sandbox::{Limits, Ticker};
use super::shadow::{Candidate, Outcome};
use crate::decision::{Answer, Question};
use crate::recording::Recorded;

/// Observations waiting for the observer thread. A burst beyond it is dropped, not waited for.
const QUEUE: usize = 8192;
/// How often the recording file is flushed while questions keep coming.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What the host records of the questions its policy answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordOptions {
    /// Questions kept in memory, the most recent (`GET /v1/policy/recording`, swaps with
    /// `replay=recent`). 0 keeps none.
    pub ring: usize,
    /// A file every question is appended to, as JSON lines.
    pub file: Option<PathBuf>,
    /// The file's size past which it is renamed to `<file>.1` (replacing the previous one) and
    /// a new one started.
    pub file_size: u64,
}

impl RecordOptions {
    fn records(&self) -> bool {
        self.ring > 0 || self.file.is_some()
    }
}

/// One question answered by the active policy.
struct Observation {
    question: Question,
    answer: Answer,
    /// Recording is on for it.
    record: bool,
    /// The shadow candidate is to be asked it too.
    shadow: bool,
}

/// State the decisions and the observer thread share.
struct Observers {
    candidate: ArcSwapOption<Candidate>,
    /// Questions asked of every shadow since the engine started, by outcome: what metrics
    /// count (a shadow's own report starts from zero).
    agreed: AtomicU64,
    disagreed: AtomicU64,
    failed: AtomicU64,
    ring: Mutex<VecDeque<Recorded>>,
    ring_capacity: usize,
    file: Option<(PathBuf, u64)>,
    limits: Limits,
    /// Keeps the epoch advancing while the observer may call the shadow, which can outlive the
    /// engine by a call: a looping shadow is still stopped.
    _ticker: Ticker,
}

/// The engine's side of observation: what decisions call.
pub(crate) struct Tap {
    observers: Arc<Observers>,
    recording: bool,
    /// A candidate is loaded (mirrors `observers.candidate`, read without touching its count).
    shadowing: AtomicBool,
    /// The shadow is asked one sampled question in this many.
    shadow_one_in: u32,
    queue: OnceLock<SyncSender<Observation>>,
    dropped: AtomicU64,
}

thread_local! {
    /// Questions this thread answered since its last sampled one.
    static SINCE_SAMPLED: Cell<u32> = const { Cell::new(0) };
}

impl Tap {
    pub(crate) fn new(
        record: RecordOptions,
        shadow_one_in: u32,
        limits: Limits,
        ticker: Ticker,
    ) -> Self {
        let recording = record.records();
        let observers = Arc::new(Observers {
            candidate: ArcSwapOption::empty(),
            agreed: AtomicU64::new(0),
            disagreed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ring: Mutex::new(VecDeque::with_capacity(record.ring.min(QUEUE))),
            ring_capacity: record.ring,
            file: record.file.map(|path| (path, record.file_size)),
            limits,
            _ticker: ticker,
        });
        let tap = Tap {
            observers,
            recording,
            shadowing: AtomicBool::new(false),
            shadow_one_in: shadow_one_in.max(1),
            queue: OnceLock::new(),
            dropped: AtomicU64::new(0),
        };
        if recording {
            tap.start_observer();
        }
        tap
    }

    /// Hands a question the active policy answered to the observer, if anything observes it.
    /// `fail_safe`: the answer is the engine's, not the policy's (not compared with a shadow).
    #[inline]
    pub(crate) fn observe(
        &self,
        question: impl FnOnce() -> Question,
        answer: impl FnOnce() -> Answer,
        fail_safe: bool,
    ) {
        let shadow = !fail_safe && self.shadowing.load(Ordering::Relaxed) && self.sampled();
        if !self.recording && !shadow {
            return;
        }
        let Some(queue) = self.queue.get() else {
            return;
        };
        let observation = Observation {
            question: question(),
            answer: answer(),
            record: self.recording,
            shadow,
        };
        if queue.try_send(observation).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sampled(&self) -> bool {
        if self.shadow_one_in == 1 {
            return true;
        }
        SINCE_SAMPLED.with(|since| {
            let next = since.get() + 1;
            let sampled = next >= self.shadow_one_in;
            since.set(if sampled { 0 } else { next });
            sampled
        })
    }

    /// Makes `candidate` the shadow (or none), starting the observer thread if needed.
    pub(crate) fn set_candidate(
        &self,
        candidate: Option<Arc<Candidate>>,
    ) -> Option<Arc<Candidate>> {
        let shadowing = candidate.is_some();
        if shadowing {
            self.start_observer();
        }
        let previous = self.observers.candidate.swap(candidate);
        self.shadowing.store(shadowing, Ordering::Relaxed);
        previous
    }

    /// The shadow candidate, if any.
    pub(crate) fn candidate(&self) -> Option<Arc<Candidate>> {
        self.observers.candidate.load_full()
    }

    /// Observations dropped because the observer was behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Questions asked of every shadow so far: agreed, disagreed, failed.
    pub(crate) fn shadow_outcomes(&self) -> [u64; 3] {
        let o = &self.observers;
        [&o.agreed, &o.disagreed, &o.failed].map(|c| c.load(Ordering::Relaxed))
    }

    /// The recorded questions in memory, oldest first.
    pub(crate) fn recording(&self) -> Vec<Recorded> {
        let ring = self
            .observers
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ring.iter().cloned().collect()
    }

    fn start_observer(&self) {
        self.queue.get_or_init(|| {
            let (sender, receiver) = sync_channel(QUEUE);
            let observers = self.observers.clone();
            let file = observers
                .file
                .as_ref()
                .and_then(|(path, size)| RotatingFile::open(path, *size));
            // The thread ends when the engine drops its sender.
            let spawned = std::thread::Builder::new()
                .name("regcache-policy-observer".into())
                .spawn(move || observe(&observers, &receiver, file));
            if let Err(error) = spawned {
                tracing::error!("cannot start the policy observer thread: {error}; nothing is recorded or shadowed");
            }
            sender
        });
    }
}

/// The observer thread's loop.
fn observe(observers: &Observers, queue: &Receiver<Observation>, mut file: Option<RotatingFile>) {
    let mut shadow: Option<(Arc<Candidate>, super::instance::Instance)> = None;
    loop {
        let observation = match queue.recv_timeout(FLUSH_EVERY) {
            Ok(observation) => observation,
            Err(RecvTimeoutError::Timeout) => {
                if let Some(file) = &mut file {
                    file.flush();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let Observation {
            question,
            answer,
            record,
            shadow: ask_shadow,
        } = observation;
        if ask_shadow {
            shadow = ask_candidate(observers, shadow, &question, &answer);
        }
        if record {
            let recorded = Recorded {
                question,
                decided: Some(answer),
            };
            if let Some(file) = &mut file {
                file.write(&recorded);
            }
            if observers.ring_capacity > 0 {
                let mut ring = observers
                    .ring
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if ring.len() == observers.ring_capacity {
                    ring.pop_front();
                }
                ring.push_back(recorded);
            }
        }
    }
    if let Some(file) = &mut file {
        file.flush();
    }
}

/// Asks the current candidate, on the instance kept from the last call if it is the same
/// candidate's and did not fail; returns the instance to keep.
fn ask_candidate(
    observers: &Observers,
    kept: Option<(Arc<Candidate>, super::instance::Instance)>,
    question: &Question,
    active: &Answer,
) -> Option<(Arc<Candidate>, super::instance::Instance)> {
    let candidate = observers.candidate.load_full()?;
    let mut instance = match kept {
        Some((kept_for, instance)) if Arc::ptr_eq(&kept_for, &candidate) => instance,
        _ => match candidate.instantiate(&observers.limits) {
            Ok(instance) => instance,
            Err(failure) => {
                candidate.count_failure(failure);
                observers.failed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        },
    };
    let outcome = candidate.compare(&mut instance, question.clone(), active.clone());
    let counter = match outcome {
        Outcome::Agreed => &observers.agreed,
        Outcome::Disagreed => &observers.disagreed,
        Outcome::Failed => &observers.failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    (outcome != Outcome::Failed).then_some((candidate, instance))
}

/// The recording file: JSON lines, renamed to `<path>.1` past its size.
struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    writer: BufWriter<File>,
    written: u64,
}

impl RotatingFile {
    fn open(path: &Path, max_size: u64) -> Option<Self> {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|file| Ok((file.metadata()?.len(), file)));
        match opened {
            Ok((written, file)) => Some(RotatingFile {
                path: path.to_path_buf(),
                max_size,
                writer: BufWriter::new(file),
                written,
            }),
            Err(error) => {
                tracing::error!(path = %path.display(), "cannot open the policy recording file (policy.record_file): {error}; recording to memory only");
                None
            }
        }
    }

    fn write(&mut self, recorded: &Recorded) {
        let mut line = recorded.to_line();
        line.push('\n');
        if self.written > 0 && self.written + line.len() as u64 > self.max_size {
            self.rotate();
        }
        match self.writer.write_all(line.as_bytes()) {
            Ok(()) => self.written += line.len() as u64,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), "policy recording: cannot write: {error}")
            }
        }
    }

    fn rotate(&mut self) {
        self.flush();
        let mut previous = self.path.clone().into_os_string();
        previous.push(".1");
        let reopened = std::fs::rename(&self.path, &previous).and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
        });
        match reopened {
            Ok(file) => {
                self.writer = BufWriter::new(file);
                self.written = 0;
            }
            Err(error) => {
                // Kept writing where it was; the next try is a whole file later.
                self.written = 0;
                tracing::warn!(path = %self.path.display(), "policy recording: cannot rotate: {error}")
            }
        }
    }

    fn flush(&mut self) {
        if let Err(error) = self.writer.flush() {
            tracing::warn!(path = %self.path.display(), "policy recording: cannot write: {error}");
        }
    }
}
