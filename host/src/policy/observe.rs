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
//!
//! Each round, the observer takes every thread's buffer and records every question before it
//! asks the shadow any, and asks the shadow in slices of time: past one, while recording, if a
//! buffer fills or a reader of the recording waits, the round's questions left are not asked
//! (counted as skipped in the shadow's report). A shadow that is slow, or fails often without
//! failing enough in a row to rest, costs questions it is not asked, never the recording.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::PolicyError;
use super::instance::Instance;
use super::sandbox::{Limits, Ticker};
use super::shadow::{Candidate, Outcome, ShadowReport};
use crate::decision::{Answer, Asked, EvictionContext, LookupContext, Question};
use crate::fsutil::{FileError, open_regular_append};
use crate::recording::Recorded;

/// Observations one thread's buffer holds for the observer. A burst beyond it is dropped, not
/// waited for.
const PENDING: usize = 8192;
/// Bytes of service names one thread's buffer holds: names are not bounded on every front (the
/// etcd endpoint passes a key's service name as it comes), and a buffer of 8192 long names would
/// otherwise grow without limit while the observer lags.
const PENDING_NAMES: usize = PENDING * 256;
/// The time the observer asks the shadow for in a round, once the round's questions are
/// recorded, before it looks whether the buffers are filling: ~14k calls of a healthy Rust
/// shadow (~0.7 µs each), while a buffer (8192) holds 50 ms of a thread's questions at 160k a
/// second. A call that started before the slice ended runs to its answer or its serving
/// deadline.
const SHADOW_SLICE: Duration = Duration::from_millis(10);
/// Observations in a thread's buffer from which, its slice spent, the observer stops asking the
/// shadow for the round: a quarter, so the buffer fills no further than the rest of one slow
/// call and the recording of the next round. Below it nobody waits, and a burst (a test's
/// questions, a failing shadow's deadlines) is asked in full.
const FILLING: usize = PENDING / 4;
/// The least time between two warnings of failed writes to the recording file: a full disk
/// fails every question's write.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long the observer sleeps when it finds every buffer empty: from the first, doubling
/// while they stay empty up to the last, so an idle host's observer wakes 20 times a second and
/// a busy one's buffers (8192 each) hold what arrives meanwhile at 160k questions a second a
/// thread.
const POLL: [Duration; 2] = [Duration::from_millis(1), Duration::from_millis(50)];
/// How long a reader of the recording waits for the observer to take what it was handed: a
/// round takes milliseconds, but the observer runs at nice 19 on a host whose cores are busy.
const CATCH_UP: Duration = Duration::from_secs(1);
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

    /// Appends what `asked` observed, or counts it dropped if the buffer is full (in
    /// observations, or in bytes of names).
    fn push(
        &mut self,
        asked: Asked<'_>,
        answer: impl FnOnce() -> Option<Answer>,
        record: bool,
        shadow: bool,
    ) {
        let service = match asked {
            Asked::Lookup(context) => context.service,
            Asked::Eviction(context) => context.service,
        };
        if self.observations.len() == PENDING || self.names.len() + service.len() > PENDING_NAMES {
            self.dropped += 1;
            return;
        }
        let context = match asked {
            Asked::Lookup(context) => Context::Lookup(LookupContext {
                service: "",
                ..context
            }),
            Asked::Eviction(context) => Context::Eviction(EvictionContext {
                service: "",
                ..context
            }),
        };
        let start = self.names.len();
        self.names.push_str(service);
        self.observations.push(Observation {
            context,
            name: start..self.names.len(),
            answer: answer(),
            record,
            shadow,
        });
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
    /// Rounds whose questions the observer recorded: a round started after a question was
    /// handed over has recorded it.
    recorded_rounds: AtomicU64,
    /// Readers of the recording waiting for the observer (`Tap::catch_up`): the shadow yields.
    readers: AtomicUsize,
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
    /// Writes to the recording file that failed, since the engine started.
    write_failures: Arc<AtomicU64>,
    observer: OnceLock<Observer>,
}

thread_local! {
    /// Questions this thread answered since its last sampled one.
    static SINCE_SAMPLED: Cell<u32> = const { Cell::new(0) };
}

impl Tap {
    /// Refused if the recording file cannot be opened for appending or is not a regular file:
    /// the operator asked for it, and a host that silently records nothing would not say so.
    pub(crate) fn new(
        record: RecordOptions,
        shadow_one_in: u32,
        limits: Limits,
        ticker: Ticker,
    ) -> Result<Self, PolicyError> {
        let write_failures = Arc::new(AtomicU64::new(0));
        let file = match &record.file {
            Some(path) => Some(
                RotatingFile::open(path, record.file_size, write_failures.clone()).map_err(
                    |error| PolicyError::RecordFile {
                        path: path.clone(),
                        error: Arc::new(error),
                    },
                )?,
            ),
            None => None,
        };
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
            recorded_rounds: AtomicU64::new(0),
            readers: AtomicUsize::new(0),
            _ticker: ticker,
        });
        let tap = Tap {
            observers,
            records,
            shadowing: AtomicBool::new(false),
            slot: Mutex::new(ShadowSlot::default()),
            shadow_one_in: shadow_one_in.max(1),
            file: Mutex::new(file),
            write_failures,
            observer: OnceLock::new(),
        };
        if records {
            tap.start_observer();
        }
        Ok(tap)
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
            pending.push(asked, || (!fail_safe).then(answer), self.records, shadow);
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

    /// Writes to the recording file that failed (each a question's line not written, or a
    /// flush), since the engine started.
    pub(crate) fn record_write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Questions asked of every shadow so far: agreed, disagreed, failed.
    pub(crate) fn shadow_outcomes(&self) -> [u64; 3] {
        let o = &self.observers;
        [&o.agreed, &o.disagreed, &o.failed].map(|c| c.load(Ordering::Relaxed))
    }

    /// The recorded questions in memory, oldest first.
    pub(crate) fn recorded(&self) -> Vec<Recorded> {
        self.catch_up();
        let ring = self
            .observers
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ring.iter().cloned().collect()
    }

    /// Waits (up to [`CATCH_UP`]) until the observer has recorded every question handed to it
    /// before this call, so that what was answered before a request for the recording is in
    /// it: two rounds recorded, the second started after this call. The shadow yields to it.
    fn catch_up(&self) {
        let Some(Observer { thread }) = self.observer.get() else {
            return;
        };
        let o = &self.observers;
        o.readers.fetch_add(1, Ordering::AcqRel);
        let wanted = o.recorded_rounds.load(Ordering::Acquire) + 2;
        let deadline = Instant::now() + CATCH_UP;
        while o.recorded_rounds.load(Ordering::Acquire) < wanted && Instant::now() < deadline {
            thread.thread().unpark();
            std::thread::sleep(POLL[0]);
        }
        o.readers.fetch_sub(1, Ordering::AcqRel);
    }

    fn start_observer(&self) {
        self.observer.get_or_init(|| {
            let observers = self.observers.clone();
            let file = self
                .file
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let records = self.records;
            let thread = std::thread::Builder::new()
                .name("policy-observer".into())
                .spawn(move || run_observer(&observers, file, records))
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
            && {
                thread.thread().unpark();
                thread.join().is_err()
            }
        {
            tracing::error!("the policy observer thread panicked");
        }
    }
}

/// The observer thread's loop: each round takes every thread's buffer, records what they hold,
/// then asks the shadow, until the engine is dropped (then once more, asking the shadow
/// nothing).
fn run_observer(observers: &Observers, mut file: Option<RotatingFile>, records: bool) {
    // Observing is best-effort: on a host whose cores lookups keep busy, the observer yields to
    // them (its buffers then fill and drop, counted) rather than take their CPU. Linux's nice
    // is per thread.
    // SAFETY: setpriority reads its arguments only; a failure leaves the default priority.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    let mut shadow: Option<(Arc<Candidate>, Instance)> = None;
    let mut flushed = Instant::now();
    let mut poll = POLL[0];
    // Swapped with the threads' buffers, one each, so that all keep their capacity: nothing is
    // allocated per round once every thread has been seen.
    let mut taken: Vec<Pending> = Vec::new();
    loop {
        let closing = observers.closing.load(Ordering::Relaxed);
        // Every round, not only idle ones: a busy observer would otherwise keep a dropped or
        // promoted candidate's instance (a pool slot; ~13 MiB for Python) for as long as the
        // traffic lasts.
        release_stale(observers, &mut shadow);
        let count = take_buffers(observers, &mut taken);
        let taken = &mut taken[..count];
        let observed = taken.iter().any(|t| !t.observations.is_empty());
        for pending in taken.iter_mut() {
            for observation in pending.observations.iter_mut().filter(|o| o.record) {
                let to_ask = observation.shadow && !closing;
                let decided = if to_ask {
                    observation.answer.clone()
                } else {
                    observation.answer.take()
                };
                let question = observation.question(&pending.names);
                record_one(observers, &mut file, Recorded { question, decided });
            }
        }
        observers.recorded_rounds.fetch_add(1, Ordering::Release);
        if !closing {
            // The shadow's questions are skipped only to keep the recording from dropping any;
            // with nothing recorded, a buffer that fills loses questions either way, and asking
            // what was taken keeps the shadow's sample larger.
            ask_shadow(observers, &mut shadow, taken, records);
        }
        taken.iter_mut().for_each(Pending::clear);
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
        // Woken early by `Tap::catch_up` and the engine's drop.
        std::thread::park_timeout(poll);
        poll = (poll * 2).min(POLL[1]);
    }
    if let Some(file) = &mut file {
        file.flush();
    }
}

/// Swaps every thread's buffer with one of `taken` (growing it as threads appear), moving their
/// drop counts to the total, and forgets dead threads' buffers once taken; returns how many
/// were taken. All of it under the list's lock, which `Tap::dropped` takes too: a count is in a
/// buffer or in the total, never in both or neither.
fn take_buffers(observers: &Observers, taken: &mut Vec<Pending>) -> usize {
    let mut buffers = observers
        .buffers
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if taken.len() < buffers.len() {
        taken.resize_with(buffers.len(), Pending::default);
    }
    for (buffer, taken) in buffers.iter().zip(taken.iter_mut()) {
        let mut pending = buffer.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::swap(taken, &mut pending);
        let dropped = std::mem::take(&mut taken.dropped);
        observers.dropped.fetch_add(dropped, Ordering::Relaxed);
    }
    let count = buffers.len();
    // A buffer only this list holds is a dead thread's: taken above for the last time.
    buffers.retain(|b| Arc::strong_count(b) > 1);
    count
}

/// Asks the shadow the sampled questions of `taken` within [`SHADOW_SLICE`], shared by the
/// buffers (one thread's burst does not take the others' share); past its share, while
/// recording, the rest is skipped (counted) if a buffer is filling or a reader of the
/// recording waits for the next round.
fn ask_shadow(
    observers: &Observers,
    shadow: &mut Option<(Arc<Candidate>, Instance)>,
    taken: &mut [Pending],
    recording: bool,
) {
    let Some(candidate) = observers.candidate.load_full() else {
        return;
    };
    let round_ends = Instant::now() + SHADOW_SLICE;
    let count = taken.len();
    for (index, pending) in taken.iter_mut().enumerate() {
        let now = Instant::now();
        let share = round_ends.saturating_duration_since(now) / (count - index) as u32;
        let mut slice_ends = now + share;
        let mut skipping = false;
        let mut unasked = 0;
        for observation in pending.observations.iter_mut().filter(|o| o.shadow) {
            let Some(answer) = observation.answer.take() else {
                continue;
            };
            if !skipping && Instant::now() >= slice_ends {
                skipping = recording
                    && (observers.readers.load(Ordering::Acquire) > 0 || filling(observers));
                slice_ends = Instant::now() + SHADOW_SLICE;
            }
            if skipping {
                unasked += 1;
                continue;
            }
            let question = observation.question(&pending.names);
            *shadow = ask_candidate(observers, shadow.take(), question, answer);
        }
        if unasked > 0 {
            candidate.count_skipped(unasked);
        }
    }
}

/// Whether a thread's buffer is filling while the observer asks the shadow.
fn filling(observers: &Observers) -> bool {
    let buffers = observers
        .buffers
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    buffers.iter().any(|buffer| {
        buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observations
            .len()
            >= FILLING
    })
}

/// Drops the instance kept for a candidate that is no longer the shadow.
fn release_stale(observers: &Observers, shadow: &mut Option<(Arc<Candidate>, Instance)>) {
    if shadow.as_ref().is_some_and(|(kept_for, _)| {
        !observers
            .candidate
            .load()
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, kept_for))
    }) {
        *shadow = None;
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
    question: Question,
    active: Answer,
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
    let outcome = candidate.compare(&mut instance, question, active);
    let counter = match outcome {
        Outcome::Agreed => &observers.agreed,
        Outcome::Disagreed => &observers.disagreed,
        Outcome::Failed => &observers.failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    (outcome != Outcome::Failed).then_some((candidate, instance))
}

/// Warnings of a failure that repeats: the first at once, then at most one per
/// [`WARN_EVERY`], with the count since the last.
#[derive(Debug, Default)]
struct Warnings {
    last: Option<Instant>,
    since_last: u64,
}

impl Warnings {
    /// Counts a failure at `now`; returns the failures to warn of now (this one included), if
    /// a warning is due.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        self.since_last += 1;
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < WARN_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_last))
    }
}

/// The recording file: JSON lines, renamed to `<path>.1` past its size.
struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    writer: BufWriter<File>,
    written: u64,
    /// [`Tap::record_write_failures`].
    failures: Arc<AtomicU64>,
    warnings: Warnings,
}

impl RotatingFile {
    /// Opened as every file the configuration names is ([`open_regular_append`]): a FIFO
    /// would hang the host's start waiting for a reader, and a device such as `/dev/full` would
    /// fail every write.
    fn open(path: &Path, max_size: u64, failures: Arc<AtomicU64>) -> Result<Self, FileError> {
        let (file, written) = open_regular_append(path)?;
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max_size,
            writer: BufWriter::new(file),
            written,
            failures,
            warnings: Warnings::default(),
        })
    }

    fn write(&mut self, recorded: &Recorded) {
        let mut line = recorded.to_line();
        line.push('\n');
        if self.written > 0 && self.written + line.len() as u64 > self.max_size {
            self.rotate();
        }
        match self.writer.write_all(line.as_bytes()) {
            Ok(()) => self.written += line.len() as u64,
            Err(error) => self.failed(&error),
        }
    }

    fn rotate(&mut self) {
        self.flush();
        let mut previous = self.path.clone().into_os_string();
        previous.push(".1");
        let reopened = std::fs::rename(&self.path, &previous)
            .map_err(FileError::Open)
            .and_then(|()| open_regular_append(&self.path));
        match reopened {
            Ok((file, _)) => {
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
            self.failed(&error);
        }
    }

    fn failed(&mut self, error: &io::Error) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(failures) = self.warnings.failed(Instant::now()) {
            tracing::warn!(
                path = %self.path.display(),
                failures,
                "policy recording: cannot write: {error} ({failures} failed writes since the last warning, at most one warning per {WARN_EVERY:?})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::decision::{Decide, HealthView};
    use crate::policy::{EngineOptions, PolicyEngine, PolicySpec};

    const HEALTHY: HealthView = HealthView {
        watch_connected: true,
        since_last_contact_ms: Some(5),
        since_failure_ms: None,
    };

    #[test]
    fn a_buffer_is_bounded_in_bytes_of_names_as_in_observations() {
        let mut pending = Pending::default();
        let long = "s".repeat(64 * 1024);
        let asked = Asked::Lookup(LookupContext::cold(&long, 0, HEALTHY));
        for _ in 0..PENDING {
            pending.push(asked, || None, true, false);
        }
        let kept = PENDING_NAMES / long.len();
        assert_eq!(pending.observations.len(), kept);
        assert!(pending.names.len() <= PENDING_NAMES);
        assert_eq!(pending.dropped, (PENDING - kept) as u64);
        assert_eq!(
            pending.observations[kept - 1]
                .question(&pending.names)
                .service(),
            long
        );

        let short = Asked::Lookup(LookupContext::cold("svc", 0, HEALTHY));
        let mut pending = Pending::default();
        for _ in 0..PENDING + 10 {
            pending.push(short, || None, true, false);
        }
        assert_eq!((pending.observations.len(), pending.dropped), (PENDING, 10));
    }

    #[test]
    fn repeated_failures_warn_at_once_then_once_per_period_with_their_count() {
        let mut warnings = Warnings::default();
        let start = Instant::now();
        assert_eq!(warnings.failed(start), Some(1));
        for i in 1..100 {
            let at = start + WARN_EVERY * i / 100;
            assert_eq!(warnings.failed(at), None);
        }
        assert_eq!(warnings.failed(start + WARN_EVERY), Some(100));
        assert_eq!(warnings.failed(start + WARN_EVERY * 3), Some(1));
    }

    /// Counts the WARN events logged on this thread.
    struct CountWarnings(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarnings {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `/dev/full` fails every write with ENOSPC, as a full disk does. (Opening it as the
    /// recording file is refused; here it is put under the writer directly.)
    #[test]
    fn a_full_disk_costs_one_warning_not_one_per_question() {
        use tracing_subscriber::layer::SubscriberExt;

        let failures = Arc::new(AtomicU64::new(0));
        let mut file = RotatingFile {
            path: "/dev/full".into(),
            max_size: u64::MAX,
            writer: BufWriter::new(File::options().append(true).open("/dev/full").unwrap()),
            written: 0,
            failures: failures.clone(),
            warnings: Warnings::default(),
        };
        let warned = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(CountWarnings(warned.clone()));
        let recorded = Recorded {
            question: Question::from(&LookupContext::cold("svc", 0, HEALTHY)),
            decided: None,
        };
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..10_000 {
                file.write(&recorded);
            }
            file.flush();
        });
        let failed = failures.load(Ordering::Relaxed);
        assert!(failed > 9_000, "{failed} failed writes counted");
        assert_eq!(warned.load(Ordering::Relaxed), 1);
    }

    /// Whether the observer took what this thread put in its buffer for `tap`.
    fn own_buffer_taken(tap: &Tap) -> bool {
        BUFFERS.with(|buffers| {
            let buffers = buffers.borrow();
            let own = buffers
                .iter()
                .find(|b| std::ptr::eq(b.owner.as_ptr(), Arc::as_ptr(&tap.observers)))
                .unwrap();
            own.pending.lock().unwrap().observations.is_empty()
        })
    }

    /// A dropped shadow's instance is let go while recording traffic keeps the observer busy
    /// (it was kept until a round found every buffer empty).
    #[test]
    fn a_dropped_shadows_instance_is_released_while_the_observer_is_busy() {
        let engine = PolicyEngine::new(
            EngineOptions {
                record: RecordOptions {
                    ring: 100,
                    ..RecordOptions::default()
                },
                ..EngineOptions::default()
            },
            PolicySpec::embedded_default(vec![]),
        )
        .unwrap();
        engine.shadow(PolicySpec::embedded_default(vec![])).unwrap();
        let tap = &engine.shared.tap;
        let candidate = Arc::downgrade(&tap.candidate().unwrap());
        engine.decide_lookup(&LookupContext::cold("svc", 0, HEALTHY));
        let started = Instant::now();
        while engine.shadow_report().unwrap().answered == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "never asked");
            std::thread::sleep(Duration::from_millis(1));
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let asked = Asked::Lookup(LookupContext::cold("svc", 0, HEALTHY));
                let answer = || Answer::Lookup(crate::decision::LookupDecision::ServeCached);
                while !stop.load(Ordering::Relaxed) {
                    // Faster than the observer records: it never finds the buffer empty. Fail-safe
                    // answers, which are recorded and not asked of a shadow: no question asked
                    // after the drop lets the instance go on the way.
                    tap.observe(asked, answer, true);
                }
            });
            std::thread::sleep(Duration::from_millis(100));
            engine.drop_shadow().unwrap();
            // Two questions from this thread, the second put after the first was taken: the
            // round that takes the second started after the drop.
            let taken = ["after-the-drop", "and-the-next-round"].map(|service| {
                let asked = Asked::Lookup(LookupContext::cold(service, 0, HEALTHY));
                tap.observe(asked, || unreachable!("fail-safe"), true);
                let put = Instant::now();
                while !own_buffer_taken(tap) {
                    if put.elapsed() > Duration::from_secs(10) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                true
            });
            let count = candidate.strong_count();
            stop.store(true, Ordering::Relaxed);
            assert_eq!(
                taken, [true; 2],
                "the observer took this thread's questions"
            );
            assert_eq!(count, 0, "the instance is still kept");
        });
    }
}
