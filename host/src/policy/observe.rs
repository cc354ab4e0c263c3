//! What the engine does with the questions it answers, besides answering them: records them
//! (a ring in memory, a rotating file of JSON lines) and asks them of a shadow candidate.
//!
//! Nothing of this runs on the lookup's time. A decision appends its context and answer to its
//! own thread's pending buffer (a lock nobody else holds but for the moment the observer takes
//! the buffer, and a copy of the context and the service name into storage that is reused:
//! no allocation), and one observer thread takes every thread's buffer in turn and does the
//! rest. A shared queue cost a lookup twice as much: a cache line bouncing between the cores
//! per question, an allocation freed on another thread. A full buffer drops the observation and
//! counts it; the lookup never waits. With nothing to record and no candidate, a decision reads
//! one atomic and builds nothing.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::PolicyError;
use super::instance::Instance;
use super::sandbox::{Limits, Ticker};
use super::shadow::{Candidate, Outcome, ShadowReport};
use crate::decision::{Answer, Asked, EvictionContext, LookupContext, Question};
use crate::recording::Recorded;

/// Observations one thread's buffer holds for the observer. A burst beyond it is dropped, not
/// waited for.
const PENDING: usize = 8192;
/// How long the observer sleeps when it finds every buffer empty: from the first, doubling
/// while they stay empty up to the last, so an idle host's observer wakes 20 times a second and
/// a busy one's buffers (8192 each) hold what arrives meanwhile at 160k questions a second a
/// thread.
const POLL: [Duration; 2] = [Duration::from_millis(1), Duration::from_millis(50)];
/// How often the recording file is flushed.
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

/// One question answered by the active policy, its service name in its buffer's `names`.
struct Observation {
    context: Context,
    name: Range<usize>,
    /// None when the host answered fail-safe: not the policy's answer.
    answer: Option<Answer>,
    /// Recording is on for it.
    record: bool,
    /// The shadow candidate is to be asked it too.
    shadow: bool,
}

/// A context without its service name (which the buffer keeps), so that nothing is allocated.
enum Context {
    Lookup(LookupContext<'static>),
    Eviction(EvictionContext<'static>),
}

impl Observation {
    fn question(&self, names: &str) -> Question {
        let service = &names[self.name.clone()];
        match self.context {
            Context::Lookup(context) => Question::from(&LookupContext { service, ..context }),
            Context::Eviction(context) => Question::from(&EvictionContext { service, ..context }),
        }
    }
}

/// One thread's observations, waiting for the observer.
#[derive(Default)]
struct Pending {
    observations: Vec<Observation>,
    names: String,
    /// Observations this thread dropped on a full buffer, not yet added to
    /// `Observers::dropped`: counted here, under the lock the thread holds anyway, because a
    /// counter shared by the lookup threads would bounce between their cores on every lookup
    /// exactly when they keep every core busy.
    dropped: u64,
}

impl Pending {
    fn clear(&mut self) {
        self.observations.clear();
        self.names.clear();
    }
}

/// A thread's buffers, one per engine it decided for (usually one).
struct ThreadBuffer {
    owner: Weak<Observers>,
    pending: Arc<Mutex<Pending>>,
}

thread_local! {
    static BUFFERS: RefCell<Vec<ThreadBuffer>> = const { RefCell::new(Vec::new()) };
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
    /// Observations dropped, those still counted in the buffers aside.
    dropped: AtomicU64,
    /// Every thread's buffer; a dead thread's is taken one last time and forgotten.
    buffers: Mutex<Vec<Arc<Mutex<Pending>>>>,
    limits: Limits,
    /// The engine is gone: what is left in the buffers is recorded, not asked of the shadow.
    closing: AtomicBool,
    /// Keeps the epoch advancing while the observer may call the shadow, which can outlive the
    /// engine by a call: a looping shadow is still stopped.
    _ticker: Ticker,
}

/// The observer thread.
struct Observer {
    thread: JoinHandle<()>,
}

/// Orders shadow loads, drops and promotions by when they were asked for (a load validates
/// for as long as a swap does, so an older one can finish later).
#[derive(Default)]
struct ShadowSlot {
    last_ticket: u64,
}

/// The engine's side of observation: what decisions call.
pub(crate) struct Tap {
    observers: Arc<Observers>,
    /// Recording is on: a ring, or a file that could be opened.
    records: bool,
    /// A candidate is loaded (mirrors `observers.candidate`, read without touching its count;
    /// both are written under `slot`).
    shadowing: AtomicBool,
    slot: Mutex<ShadowSlot>,
    /// The shadow is asked one sampled question in this many.
    shadow_one_in: u32,
    file: Mutex<Option<RotatingFile>>,
    observer: OnceLock<Observer>,
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
        let file = record
            .file
            .as_deref()
            .and_then(|path| RotatingFile::open(path, record.file_size));
        let records = record.ring > 0 || file.is_some();
        let observers = Arc::new(Observers {
            candidate: ArcSwapOption::empty(),
            agreed: AtomicU64::new(0),
            disagreed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ring: Mutex::new(VecDeque::with_capacity(record.ring.min(PENDING))),
            ring_capacity: record.ring,
            dropped: AtomicU64::new(0),
            buffers: Mutex::new(Vec::new()),
            limits,
            closing: AtomicBool::new(false),
            _ticker: ticker,
        });
        let tap = Tap {
            observers,
            records,
            shadowing: AtomicBool::new(false),
            slot: Mutex::new(ShadowSlot::default()),
            shadow_one_in: shadow_one_in.max(1),
            file: Mutex::new(file),
            observer: OnceLock::new(),
        };
        if records {
            tap.start_observer();
        }
        tap
    }

    /// Hands a question the active policy answered to the observer, if anything observes it.
    /// `fail_safe`: the answer is the engine's, not the policy's (recorded without it, and not
    /// compared with a shadow's).
    #[inline]
    pub(crate) fn observe(
        &self,
        asked: Asked<'_>,
        answer: impl FnOnce() -> Answer,
        fail_safe: bool,
    ) {
        let shadow = !fail_safe && self.shadowing.load(Ordering::Relaxed) && self.sampled();
        if !self.records && !shadow {
            return;
        }
        if self.observer.get().is_none() {
            return;
        }
        self.with_buffer(|pending| {
            if pending.observations.len() == PENDING {
                pending.dropped += 1;
                return;
            }
            let (service, context) = match asked {
                Asked::Lookup(context) => (
                    context.service,
                    Context::Lookup(LookupContext {
                        service: "",
                        ..context
                    }),
                ),
                Asked::Eviction(context) => (
                    context.service,
                    Context::Eviction(EvictionContext {
                        service: "",
                        ..context
                    }),
                ),
            };
            let start = pending.names.len();
            pending.names.push_str(service);
            pending.observations.push(Observation {
                context,
                name: start..pending.names.len(),
                answer: (!fail_safe).then(answer),
                record: self.records,
                shadow,
            });
        });
    }

    /// Runs `append` on this thread's buffer for this engine, registering one first.
    fn with_buffer(&self, append: impl FnOnce(&mut Pending)) {
        BUFFERS.with(|buffers| {
            let mut buffers = buffers.borrow_mut();
            let found = buffers
                .iter()
                .position(|b| std::ptr::eq(b.owner.as_ptr(), Arc::as_ptr(&self.observers)));
            let index = found.unwrap_or_else(|| {
                buffers.retain(|b| b.owner.strong_count() > 0);
                let pending = Arc::new(Mutex::new(Pending::default()));
                self.observers
                    .buffers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(pending.clone());
                buffers.push(ThreadBuffer {
                    owner: Arc::downgrade(&self.observers),
                    pending,
                });
                buffers.len() - 1
            });
            let mut pending = buffers[index]
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            append(&mut pending);
        });
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

    /// Makes `candidate` the shadow (or none) for a request holding `ticket`, unless a request
    /// holding a later one already changed it. Returns the candidate it replaces.
    pub(crate) fn set_candidate(
        &self,
        candidate: Option<Arc<Candidate>>,
        ticket: u64,
    ) -> Result<Option<Arc<Candidate>>, PolicyError> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.last_ticket > ticket {
            return Err(PolicyError::Superseded);
        }
        slot.last_ticket = ticket;
        if candidate.is_some() {
            self.start_observer();
        }
        self.shadowing.store(candidate.is_some(), Ordering::Relaxed);
        Ok(self.observers.candidate.swap(candidate))
    }

    /// Puts back a candidate whose promotion was superseded, unless another was loaded since.
    pub(crate) fn put_back(&self, candidate: Arc<Candidate>) {
        let _slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if self.observers.candidate.load().is_none() {
            self.observers.candidate.store(Some(candidate));
            self.shadowing.store(true, Ordering::Relaxed);
        }
    }

    /// The shadow candidate, if any.
    pub(crate) fn candidate(&self) -> Option<Arc<Candidate>> {
        self.observers.candidate.load_full()
    }

    /// `candidate`'s report, with the questions dropped since it was loaded.
    pub(crate) fn report(&self, candidate: &Candidate) -> ShadowReport {
        candidate.report(self.dropped())
    }

    /// Observations dropped because the observer was behind.
    pub(crate) fn dropped(&self) -> u64 {
        let o = &self.observers;
        let buffers = o.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let in_buffers: u64 = buffers
            .iter()
            .map(|b| b.lock().unwrap_or_else(PoisonError::into_inner).dropped)
            .sum();
        o.dropped.load(Ordering::Relaxed) + in_buffers
    }

    /// Questions asked of every shadow so far: agreed, disagreed, failed.
    pub(crate) fn shadow_outcomes(&self) -> [u64; 3] {
        let o = &self.observers;
        [&o.agreed, &o.disagreed, &o.failed].map(|c| c.load(Ordering::Relaxed))
    }

    /// The recorded questions in memory, oldest first.
    pub(crate) fn recorded(&self) -> Vec<Recorded> {
        let ring = self
            .observers
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ring.iter().cloned().collect()
    }

    fn start_observer(&self) {
        self.observer.get_or_init(|| {
            let observers = self.observers.clone();
            let file = self
                .file
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let thread = std::thread::Builder::new()
                .name("policy-observer".into())
                .spawn(move || run_observer(&observers, file))
                .expect("spawn the policy observer thread");
            Observer { thread }
        });
    }
}

impl Drop for Tap {
    /// Ends the observer once it has recorded what is queued (asking the shadow nothing more),
    /// so that the file holds every question answered before the engine went.
    fn drop(&mut self) {
        self.observers.closing.store(true, Ordering::Relaxed);
        if let Some(Observer { thread }) = self.observer.take()
            && thread.join().is_err()
        {
            tracing::error!("the policy observer thread panicked");
        }
    }
}

/// The observer thread's loop: takes every thread's buffer in turn, records and asks the
/// shadow, until the engine is dropped (then once more, asking the shadow nothing).
fn run_observer(observers: &Observers, mut file: Option<RotatingFile>) {
    // Observing is best-effort: on a host whose cores lookups keep busy, the observer yields to
    // them (its buffers then fill and drop, counted) rather than take their CPU. Linux's nice
    // is per thread.
    // SAFETY: setpriority reads its arguments only; a failure leaves the default priority.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    let mut shadow: Option<(Arc<Candidate>, Instance)> = None;
    let mut flushed = Instant::now();
    let mut poll = POLL[0];
    // Swapped with a thread's buffer, so both keep their capacity: no allocation per round.
    let mut taken = Pending::default();
    loop {
        let closing = observers.closing.load(Ordering::Relaxed);
        let mut observed = false;
        let buffers: Vec<Arc<Mutex<Pending>>> = {
            let mut buffers = observers
                .buffers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A buffer only this list holds is a dead thread's: taken once more below, then gone.
            let all = buffers.clone();
            buffers.retain(|b| Arc::strong_count(b) > 2);
            all
        };
        for buffer in buffers {
            {
                let mut pending = buffer.lock().unwrap_or_else(PoisonError::into_inner);
                std::mem::swap(&mut taken, &mut pending);
                let dropped = std::mem::take(&mut taken.dropped);
                observers.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
            observed |= !taken.observations.is_empty();
            for observation in taken.observations.drain(..) {
                let question = observation.question(&taken.names);
                if let (true, Some(answer)) = (observation.shadow, &observation.answer) {
                    shadow = ask_candidate(observers, shadow, &question, answer);
                }
                if observation.record {
                    record_one(
                        observers,
                        &mut file,
                        Recorded {
                            question,
                            decided: observation.answer,
                        },
                    );
                }
            }
            taken.clear();
        }
        if closing {
            break;
        }
        if flushed.elapsed() >= FLUSH_EVERY {
            if let Some(file) = &mut file {
                file.flush();
            }
            flushed = Instant::now();
        }
        if observed {
            poll = POLL[0];
            continue;
        }
        // Keeps no instance of a candidate that was dropped or promoted.
        if shadow.as_ref().is_some_and(|(kept_for, _)| {
            !observers
                .candidate
                .load()
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, kept_for))
        }) {
            shadow = None;
        }
        std::thread::sleep(poll);
        poll = (poll * 2).min(POLL[1]);
    }
    if let Some(file) = &mut file {
        file.flush();
    }
}

fn record_one(observers: &Observers, file: &mut Option<RotatingFile>, recorded: Recorded) {
    if let Some(file) = file {
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

/// Asks the current candidate, on the instance kept from the last call if it is the same
/// candidate's and did not fail; returns the instance to keep.
fn ask_candidate(
    observers: &Observers,
    kept: Option<(Arc<Candidate>, Instance)>,
    question: &Question,
    active: &Answer,
) -> Option<(Arc<Candidate>, Instance)> {
    if observers.closing.load(Ordering::Relaxed) {
        return None;
    }
    let candidate = observers.candidate.load_full()?;
    if candidate.resting() {
        return kept;
    }
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
