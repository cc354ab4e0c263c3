//! The wasm policy engine: the only code in regcache that speaks wasmtime.
//!
//! A [`PolicyEngine`] holds one active policy *generation* and answers the cache's questions
//! through [`Decide`]. Loading a policy, at start or as a hot swap, always walks the same path,
//! and the active generation changes only if every step passes:
//!
//! 1. read the bytes; refuse empty files, non-wasm and core modules with a clear reason;
//! 2. compile (or reuse a precompiled artifact, see `artifacts`);
//! 3. refuse imports other than `regcache:policy/host` and WASI (which gets a deny-all
//!    implementation), then type-check against the `policy` world;
//! 4. instantiate and `configure` with the operator's key/value configuration, and validate the
//!    returned settings;
//! 5. run the conformance battery under validation's deadline, replayed on one instance in
//!    several orders and on a second, fresh one: every answer must be the first (policies are
//!    pure), and each decision's p99 CPU time must stay within the latency budget.
//!
//! Then the swap is one atomic pointer store ([`arc_swap`]): lookups in flight finish on the
//! old generation, each worker thread moves to the new one on its next lookup, and no lookup
//! waits for a swap. A decision that traps or overruns its deadline gets the fail-safe answer
//! documented on [`PolicyEngine`], and the event is counted and logged with the policy's digest.
//!
//! A generation that keeps failing is rolled back to the one it replaced (`rollback`). The
//! shape leaves room for what comes next: a generation is a self-contained value, so a
//! candidate can be evaluated beside the active one (shadowing), and contexts can be recorded
//! and replayed against any generation.

mod artifacts;
mod bindings;
mod compile;
mod conformance;
mod instance;
mod observe;
pub mod reload;
mod rollback;
mod sandbox;
mod settings;
mod shadow;
mod stdio;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

pub use artifacts::Origin;
#[doc(hidden)]
pub use compile::{CHILD_COMMAND, run_child};
pub use compile::{Compiler, LoadBound, LoadLimits};
pub use conformance::ConformanceFailure;
pub use instance::CallFailure;
pub use observe::RecordOptions;
pub use rollback::{Rollback, RollbackReason, RollbackRule};
pub use sandbox::Limits;
pub use settings::{Envelope, EnvelopeLimit, InvalidSetting};
pub use shadow::{CallCost, DecisionPair, Disagreement, RECENT_DISAGREEMENTS, ShadowReport};

use crate::decision::{
    Answer, Asked, Decide, Decided, EvictionContext, EvictionDecision, LookupContext,
    LookupDecision, PolicyInfo, Question, Settings,
};
use crate::fsutil::{FileError, read_regular};
use crate::recording::Recorded;
use bindings::PolicyPre;
use instance::Instance;
use sandbox::InstanceState;

/// The default policy (`policy/default`), built from source by the host's build script.
pub const DEFAULT_POLICY_WASM: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/default_policy.wasm"));

/// The default of [`LoadLimits::max_size`], the largest policy component read from a file or
/// accepted over the API: ours are ~100 KiB, components built by componentize-py ~18 MiB.
pub const MAX_POLICY_SIZE: usize = 32 * 1024 * 1024;

/// The `source` of the embedded default policy.
pub const EMBEDDED_SOURCE: &str = "embedded:default";

/// The WIT contract, for tools that scaffold new policies.
pub const WIT: &str = include_str!("../../../wit/policy.wit");

/// A policy to load: its bytes, where they came from, and the operator's configuration.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    /// The component's bytes.
    pub wasm: Arc<[u8]>,
    /// Where it came from: [`EMBEDDED_SOURCE`], a file path, `api`.
    pub source: String,
    /// Key/value configuration passed to the policy's `configure`.
    pub config: Vec<(String, String)>,
}

impl PolicySpec {
    /// The embedded default policy with `config`.
    pub fn embedded_default(config: Vec<(String, String)>) -> Self {
        PolicySpec {
            wasm: Arc::from(DEFAULT_POLICY_WASM),
            source: EMBEDDED_SOURCE.into(),
            config,
        }
    }

    /// The policy in the file at `path`, with `config`: a regular file of at most `max_size`
    /// bytes ([`LoadLimits::max_size`]; a larger one is refused naming the limit, unread).
    pub fn from_file(
        path: &Path,
        config: Vec<(String, String)>,
        max_size: usize,
    ) -> Result<Self, PolicyError> {
        let wasm = read_regular(path, max_size as u64).map_err(|error| match error {
            FileError::TooLarge { size, .. } => PolicyError::Limit(LoadBound::Size {
                size: usize::try_from(size).unwrap_or(usize::MAX),
                limit: max_size,
            }),
            error => PolicyError::Read {
                path: path.to_path_buf(),
                error: Arc::new(error),
            },
        })?;
        Ok(PolicySpec {
            wasm: wasm.into(),
            source: path.display().to_string(),
            config,
        })
    }
}

/// Why a policy was refused. The active policy, if any, stays active.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: Arc<FileError>,
    },
    /// Zero bytes.
    #[error("the policy is empty (0 bytes)")]
    Empty,
    /// Not WebAssembly at all.
    #[error("not WebAssembly: the bytes do not start with the \\0asm magic number")]
    NotWasm,
    /// A core module where a component is needed.
    #[error(
        "this is a core WebAssembly module, not a component: build the policy for wasm32-wasip2 \
         (`regcache policy build`), or wrap the module with `wasm-tools component new`"
    )]
    CoreModule,
    /// Cranelift refused the bytes.
    #[error("invalid component: {0}")]
    Compile(String),
    /// A bound of [`LoadLimits`] was hit: the policy is too large, or compiling it took too
    /// much CPU time, memory or wall-clock time.
    #[error("{0}")]
    Limit(LoadBound),
    /// The compiler child ([`Compiler::Child`]) could not be run, or failed in a way that says
    /// nothing about the policy.
    #[error("the policy compiler {} failed: {reason}", program.display())]
    Compiler {
        /// The compiler's executable.
        program: PathBuf,
        /// What happened.
        reason: String,
    },
    /// The host is stopping: compiles in flight were ended, and no more start.
    #[error("the host is stopping: the policy was not compiled")]
    Stopping,
    /// Validated, but a swap asked for later finished first: the newer request stands.
    #[error("a policy swap asked for later is already active; this older one is not swapped in")]
    Superseded,
    /// An import regcache does not offer.
    #[error(
        "the policy imports `{0}`, which regcache does not offer (only regcache:policy/host and \
         a deny-all WASI are offered)"
    )]
    UnofferedImport(String),
    /// Exports missing or of the wrong type.
    #[error("the component does not implement the world regcache:policy/policy@0.1.0: {0}")]
    WrongWorld(String),
    /// Instantiating or configuring failed.
    #[error("configure {0}")]
    Configure(CallFailure),
    /// Settings out of range.
    #[error(transparent)]
    Settings(#[from] InvalidSetting),
    /// A conformance case failed.
    #[error(transparent)]
    Conformance(#[from] ConformanceFailure),
    /// The file still holds a policy that was rolled back: it is loaded again once it changes
    /// (or through the admin API, deliberately).
    #[error(
        "the file still holds policy sha256:{digest}, which was rolled back automatically; it is \
         not loaded again until the file changes"
    )]
    RolledBack {
        /// The rolled-back policy's digest.
        digest: String,
    },
    /// No shadow candidate is loaded.
    #[error("no shadow policy is loaded")]
    NoShadow,
    /// The recording file cannot be opened for appending, or is not a regular file.
    #[error("cannot use the policy recording file {} (policy.record.file): {error}", path.display())]
    RecordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        error: Arc<FileError>,
    },
    /// A swap asked for a replay of the recent recording, and nothing is recorded.
    #[error(
        "a replay of the recent recording was asked for, but nothing is recorded (policy.record.ring \
         is 0, or no question was asked yet)"
    )]
    NothingRecorded,
    /// A swap asked for a replay of the recent recording, and it took longer than
    /// [`REPLAY_LIMIT`].
    #[error(
        "replaying the recent recording: {answered} of {questions} questions answered within \
         {limit:?}; a replay must finish within that"
    )]
    ReplayTooLong {
        /// Questions answered in time.
        answered: usize,
        /// Questions in the recording.
        questions: usize,
        /// [`REPLAY_LIMIT`].
        limit: std::time::Duration,
    },
    /// A swap asked for a replay of the recent recording, and a question failed.
    #[error(
        "replaying the recent recording: question {index} of {questions} ({question}) {failure}"
    )]
    ReplayFailed {
        /// Which question failed, 1-based.
        index: usize,
        /// Questions in the recording.
        questions: usize,
        /// The question, as JSON.
        question: String,
        /// How it failed.
        failure: CallFailure,
    },
    /// A state-dependent answer: two instances disagreed, or one instance answered a case
    /// differently when asked again. Says which case, and how.
    #[error("the policy is not pure: {0}")]
    Impure(String),
    /// A decision's p99 cost over the conformance battery exceeds the latency budget.
    #[error(
        "{export} p99 {p99:.1?} exceeds the latency budget of {budget:?} (policy.latency_budget)"
    )]
    TooSlow {
        /// The export measured: `decide-lookup` or `guard-eviction`.
        export: &'static str,
        /// Its p99, in the calling thread's CPU time.
        p99: std::time::Duration,
        /// [`Limits::latency_budget`].
        budget: std::time::Duration,
    },
}

/// Options of the engine, shared by every policy it loads.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Sandbox limits (deadlines, memory, instances). Default: [`Limits::default`].
    pub limits: Limits,
    /// Where to keep precompiled policies across restarts. Default: none (memory only).
    pub artifact_dir: Option<PathBuf>,
    /// How candidates are compiled. Default: in this process.
    pub compiler: Compiler,
    /// Bounds on loading a candidate (size, compile CPU and memory).
    pub load: LoadLimits,
    /// What the operator lets a policy's settings be.
    pub envelope: Envelope,
    /// When a misbehaving generation is rolled back.
    pub rollback: RollbackRule,
    /// What is recorded of the questions the active policy answers.
    pub record: RecordOptions,
    /// A shadow candidate is asked one question in this many (0 and 1: every one).
    pub shadow_one_in: u32,
}

/// Counters of the engine's rare events (never touched on a successful decision, so that worker
/// threads share no cache line on the hot path).
#[derive(Debug, Default)]
struct Stats {
    traps: AtomicU64,
    deadline_hits: AtomicU64,
    invalid_answers: AtomicU64,
    instantiations: AtomicU64,
    swaps_applied: AtomicU64,
    swaps_rejected: AtomicU64,
    breaker_skips: AtomicU64,
    fail_safe_lookups: AtomicU64,
    fail_safe_evictions: AtomicU64,
    rollbacks: AtomicU64,
}

impl Stats {
    fn count_instantiation(&self) {
        self.instantiations.fetch_add(1, Ordering::Relaxed);
    }

    fn count_failure(&self, failure: &CallFailure) {
        let counter = match failure {
            CallFailure::Deadline(_) => &self.deadline_hits,
            CallFailure::InvalidAnswer(_) => &self.invalid_answers,
            _ => &self.traps,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyStats {
    /// Decisions that trapped (or could not instantiate).
    pub traps: u64,
    /// Decisions stopped by their deadline.
    pub deadline_hits: u64,
    /// Decisions refused for an invalid answer (e.g. an oversized reason).
    pub invalid_answers: u64,
    /// Instances created, at load and on worker threads.
    pub instantiations: u64,
    /// Swaps that made a new generation active.
    pub swaps_applied: u64,
    /// Swaps refused by validation.
    pub swaps_rejected: u64,
    /// Decisions answered fail-safe without calling the policy, its breaker being open.
    pub breaker_skips: u64,
    /// Lookups answered by the fail-safe decision (a failed call, or the breaker open).
    pub fail_safe_lookups: u64,
    /// Evictions answered by the fail-safe decision.
    pub fail_safe_evictions: u64,
    /// Generations rolled back automatically.
    pub rollbacks: u64,
    /// Questions asked of shadow candidates whose answer equalled the active policy's.
    pub shadow_agreed: u64,
    /// Questions asked of shadow candidates whose answer differed.
    pub shadow_disagreed: u64,
    /// Questions asked of shadow candidates that failed (trap, deadline, invalid answer).
    pub shadow_failed: u64,
    /// Questions neither recorded nor shadowed because the observer was behind.
    pub observer_dropped: u64,
    /// Writes to the recording file that failed (a full disk, say).
    pub record_write_failures: u64,
}

/// Failures in a row after which a generation's breaker opens.
const BREAKER_THRESHOLD: u32 = 5;
/// How long an open breaker answers fail-safe before letting one call try again.
const BREAKER_OPEN: std::time::Duration = std::time::Duration::from_secs(1);

/// A circuit breaker per generation. A policy that traps or times out on some inputs would
/// otherwise cost a deadline (a few ms of a worker thread) and a rebuilt instance on every
/// such lookup; after [`BREAKER_THRESHOLD`] failures in a row the engine answers fail-safe
/// without calling it for [`BREAKER_OPEN`], then lets one call probe it again.
///
/// A successful call only *reads* the failure count (no store unless a streak ends), so the
/// hot path shares the cache line without bouncing it between cores.
#[derive(Debug)]
struct Breaker {
    failures: AtomicU32,
    /// When the breaker closes again, as ms since `epoch`; meaningful once `failures` reaches
    /// the threshold.
    open_until_ms: AtomicU64,
    epoch: Instant,
}

/// What a failure meant for the streak, so that logs say it once rather than per lookup.
enum Streak {
    First,
    Continuing,
    Opened(u32),
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_open(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= BREAKER_THRESHOLD
            && self.now_ms() < self.open_until_ms.load(Ordering::Relaxed)
    }

    fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    fn record_failure(&self) -> Streak {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= BREAKER_THRESHOLD {
            let until = self.now_ms() + BREAKER_OPEN.as_millis() as u64;
            self.open_until_ms.store(until, Ordering::Relaxed);
            if failures == BREAKER_THRESHOLD || failures.is_multiple_of(100) {
                return Streak::Opened(failures);
            }
            return Streak::Continuing;
        }
        if failures == 1 {
            Streak::First
        } else {
            Streak::Continuing
        }
    }
}

/// One loaded policy: the unit a swap replaces.
pub(crate) struct Generation {
    breaker: Breaker,
    failures: rollback::FailureWindow,
    info: Arc<PolicyInfo>,
    pre: PolicyPre<InstanceState>,
    config: Vec<(String, String)>,
    short_digest: Arc<str>,
}

impl Generation {
    /// An instance that serves decisions, under the serving deadline (`Deadlines::Serving`).
    fn instantiate(
        &self,
        limits: &Limits,
    ) -> Result<(Instance, bindings::RawSettings), CallFailure> {
        Instance::new(
            &self.pre,
            &self.config,
            limits,
            self.short_digest.clone(),
            instance::Deadlines::Serving,
        )
    }

    /// This generation's policy again, as generation `number`, with a clean record: what a
    /// rollback makes active.
    fn reinstated(&self, number: u64, rule: RollbackRule) -> Generation {
        Generation {
            breaker: Breaker::new(),
            failures: rollback::FailureWindow::new(rule),
            info: Arc::new(PolicyInfo {
                generation: number,
                loaded_at: SystemTime::now(),
                ..PolicyInfo::clone(&self.info)
            }),
            pre: self.pre.clone(),
            config: self.config.clone(),
            short_digest: self.short_digest.clone(),
        }
    }
}

/// What the engine keeps for rollbacks.
#[derive(Default)]
struct RollbackState {
    /// The generation the active one replaced, kept compiled to go back to; none after a
    /// rollback (the generation rolled back from is no fallback).
    fallback: Option<Arc<Generation>>,
    /// The last rollback, for the admin API.
    last: Option<Rollback>,
    /// Digests rolled back, most recent last: a policy file holding one is not reloaded until
    /// it changes. Bounded: an operator juggles a handful of policies, not thousands.
    digests: VecDeque<String>,
}

/// The longest a swap's replay of the recording may take: a good policy answers a million
/// questions in seconds, and the swap's caller is waiting.
pub const REPLAY_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Rolled-back digests remembered.
const ROLLED_BACK_KEPT: usize = 16;

pub(crate) struct Shared {
    /// Distinguishes engines in the per-thread instance table.
    id: u64,
    engine: Engine,
    linker: Linker<InstanceState>,
    limits: Limits,
    /// The operator's bounds on every candidate's settings.
    envelope: Envelope,
    artifacts: artifacts::ArtifactCache,
    /// How candidates are compiled, and under which limits.
    compilation: compile::Compilation,
    active: ArcSwap<Generation>,
    rollback_rule: RollbackRule,
    rollback: Mutex<RollbackState>,
    /// Numbers generations and orders their stores: two swaps racing must not both win with
    /// the same generation number. Held for that only, never across a validation.
    load_lock: Mutex<Loads>,
    /// Orders swaps by when they were asked for, since they validate concurrently.
    next_ticket: AtomicU64,
    stats: Stats,
    /// Recording and the shadow candidate.
    tap: observe::Tap,
    /// Advances the epoch for as long as the engine lives.
    _ticker: sandbox::Ticker,
}

/// What the load lock guards.
struct Loads {
    last_generation: u64,
    /// The ticket of the swap stored last: an older swap whose validation ends later must not
    /// undo a newer one.
    stored_ticket: u64,
}

impl Shared {
    /// Records that a swap replaced `replaced` with the policy `digest`: the replaced
    /// generation is what a rollback goes back to, and an operator loading a rolled-back
    /// digest again has said it is wanted.
    fn keep_fallback(&self, replaced: Arc<Generation>, digest: &str) {
        let mut state = self.rollback.lock().unwrap_or_else(PoisonError::into_inner);
        state.fallback = Some(replaced);
        state.digests.retain(|d| d != digest);
    }

    /// Makes the fallback of `failing` active in its place, if `failing` is still active and
    /// there is one. Called by the decision whose failure met the rule, once per generation.
    fn roll_back(&self, failing: &Arc<Generation>, last: CallFailure) {
        let reason = RollbackReason {
            failures: self.rollback_rule.failures,
            window: self.rollback_rule.window,
            last,
        };
        // The load lock numbers generations and orders this against a swap storing its own.
        let mut loads = self
            .load_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut state = self.rollback.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&self.active.load(), failing) {
            return; // a swap replaced it meanwhile
        }
        let Some(fallback) = state.fallback.take() else {
            tracing::error!(
                policy = %failing.info,
                "policy failing ({reason}), but there is no earlier policy to roll back to; \
                 answering fail-safe where it fails"
            );
            return;
        };
        loads.last_generation += 1;
        let restored = Arc::new(fallback.reinstated(loads.last_generation, self.rollback_rule));
        self.active.store(restored.clone());
        self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            policy = %failing.info,
            "policy rolled back to {} ({reason}); the file holding it is not reloaded until it \
             changes",
            restored.info
        );
        state.digests.retain(|d| *d != failing.info.digest);
        if state.digests.len() == ROLLED_BACK_KEPT {
            state.digests.pop_front();
        }
        state.digests.push_back(failing.info.digest.clone());
        state.last = Some(Rollback {
            from: failing.info.clone(),
            to: restored.info.clone(),
            reason,
            at: SystemTime::now(),
        });
    }
}

/// The policy engine. Cheap to clone; every clone shares the active policy.
///
/// Fail-safe decisions, used when the policy traps, overruns its deadline or answers invalidly
/// (and, for a second, after five such failures in a row: see `Breaker`):
/// a lookup with something cached is served stale with a background refresh; a lookup with
/// nothing cached refreshes and waits up to the settings' `max-wait`, falling back to stale;
/// an eviction keeps the nodes as suspect for the settings' `max-suspect-hold` (losing no data
/// is safer than emptying the cache on a broken policy's behalf). The host's rate limit and
/// budget apply to fail-safe refreshes as to any other.
#[derive(Clone)]
pub struct PolicyEngine {
    shared: Arc<Shared>,
}

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

/// Preconditions of [`PolicyEngine::swap_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwapOptions {
    /// The candidate must answer the recent recording without failing.
    pub replay_recent: bool,
}

/// Which validated bytes and settings a load produced.
#[derive(Clone)]
struct Validated {
    pre: PolicyPre<InstanceState>,
    /// Kept to store its artifact once the policy is activated.
    component: Component,
    digest: String,
    settings: Settings,
}

impl Validated {
    /// An instance that answers as a serving one does (`Deadlines::Serving`), configured with
    /// `config`: what a shadow and a replay before a swap ask.
    fn serving_instance(
        &self,
        config: &[(String, String)],
        limits: &Limits,
    ) -> Result<Instance, CallFailure> {
        let digest = Arc::from(&self.digest[..12]);
        Instance::new(
            &self.pre,
            config,
            limits,
            digest,
            instance::Deadlines::Serving,
        )
        .map(|(instance, _)| instance)
    }
}

impl PolicyEngine {
    /// Builds an engine whose first active policy (generation 1) is `initial`.
    pub fn new(options: EngineOptions, initial: PolicySpec) -> Result<Self, PolicyError> {
        let internal = |e: wasmtime::Error| PolicyError::Compile(format!("engine setup: {e:#}"));
        let engine = sandbox::engine(&options.limits).map_err(internal)?;
        let linker = sandbox::linker(&engine).map_err(internal)?;
        let artifacts = artifacts::ArtifactCache::new(&engine, options.artifact_dir);
        // Before the first validation: `policy check`, `eval` and start-up meet a looping
        // policy with the deadlines a swap has.
        let ticker = sandbox::Ticker::start(engine.clone());
        // Before the validation: a recording file that cannot be used is refused at once.
        let tap = observe::Tap::new(
            options.record,
            options.shadow_one_in,
            options.limits,
            ticker.clone(),
        )?;
        let compilation = compile::Compilation::new(options.compiler, options.load);
        let validated = validate(
            &engine,
            &linker,
            &artifacts,
            &compilation,
            &options.limits,
            &options.envelope,
            &initial,
        )?;
        artifacts.keep(&validated.component, &validated.digest);
        let generation = make_generation(validated, initial, 1, options.rollback);
        let shared = Arc::new(Shared {
            id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
            engine,
            linker,
            limits: options.limits,
            envelope: options.envelope,
            artifacts,
            compilation,
            active: ArcSwap::from_pointee(generation),
            rollback_rule: options.rollback,
            rollback: Mutex::new(RollbackState::default()),
            load_lock: Mutex::new(Loads {
                last_generation: 1,
                stored_ticket: 0,
            }),
            next_ticket: AtomicU64::new(1),
            stats: Stats::default(),
            tap,
            _ticker: ticker,
        });
        Ok(PolicyEngine { shared })
    }

    /// Validates `spec` as a swap would, without activating it; returns its settings.
    pub fn check(&self, spec: &PolicySpec) -> Result<Settings, PolicyError> {
        self.validate(spec).map(|v| v.settings)
    }

    /// The bounds on loading a candidate this engine applies.
    pub fn load_limits(&self) -> LoadLimits {
        self.shared.compilation.limits()
    }

    /// Ends the compiles in flight (their swaps fail with [`PolicyError::Stopping`]) and
    /// refuses to start more: for a host that is stopping, which no swap should hold up.
    pub fn stop_compiling(&self) {
        self.shared.compilation.stop();
    }

    /// Validates `spec` and, if it passes, makes it the active policy. On failure the active
    /// policy stays, and the refusal is counted.
    pub fn swap(&self, spec: PolicySpec) -> Result<Arc<PolicyInfo>, PolicyError> {
        self.swap_with(spec, SwapOptions::default())
    }

    /// [`swap`](Self::swap), with preconditions: with `replay_recent`, the candidate must also
    /// answer every question of the recent recording without a trap, an overrun or an invalid
    /// answer.
    pub fn swap_with(
        &self,
        spec: PolicySpec,
        options: SwapOptions,
    ) -> Result<Arc<PolicyInfo>, PolicyError> {
        let shared = &self.shared;
        let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        // Outside the load lock: validating takes up to the compile limits, and another swap
        // must not wait for it. Of two swaps racing, the one asked for later wins.
        let validated = self.validate(&spec).and_then(|validated| {
            if options.replay_recent {
                self.replay_recent(&validated, &spec)?;
            }
            Ok(validated)
        });
        let validated = match validated {
            Ok(validated) => validated,
            Err(err) => {
                shared.stats.swaps_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %spec.source, "policy refused, keeping the active one: {err}");
                return Err(err);
            }
        };
        self.activate(validated, spec, ticket)
    }

    /// Makes a validated policy active, unless a swap asked for after `ticket` already stored
    /// its own.
    fn activate(
        &self,
        validated: Validated,
        spec: PolicySpec,
        ticket: u64,
    ) -> Result<Arc<PolicyInfo>, PolicyError> {
        let shared = &self.shared;
        let component = validated.component.clone();
        let info = {
            let mut loads = shared
                .load_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if loads.stored_ticket > ticket {
                shared.stats.swaps_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %spec.source, "policy validated, but a swap asked for later is already active: not swapped in");
                return Err(PolicyError::Superseded);
            }
            loads.stored_ticket = ticket;
            loads.last_generation += 1;
            let generation =
                make_generation(validated, spec, loads.last_generation, shared.rollback_rule);
            let info = generation.info.clone();
            let replaced = shared.active.swap(Arc::new(generation));
            shared.keep_fallback(replaced, &info.digest);
            info
        };
        // After the store, so lookups move to the new policy without waiting for the disk.
        shared.artifacts.keep(&component, &info.digest);
        shared.stats.swaps_applied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(policy = %info, "policy swapped in");
        Ok(info)
    }

    fn validate(&self, spec: &PolicySpec) -> Result<Validated, PolicyError> {
        let shared = &self.shared;
        validate(
            &shared.engine,
            &shared.linker,
            &shared.artifacts,
            &shared.compilation,
            &shared.limits,
            &shared.envelope,
            spec,
        )
    }

    /// Asks a validated candidate every question recorded in memory, under the serving
    /// deadline; the first that fails refuses it, and so does a replay past [`REPLAY_LIMIT`].
    fn replay_recent(&self, validated: &Validated, spec: &PolicySpec) -> Result<(), PolicyError> {
        let recording = self.shared.tap.recorded();
        if recording.is_empty() {
            return Err(PolicyError::NothingRecorded);
        }
        let mut instance = validated
            .serving_instance(&spec.config, &self.shared.limits)
            .map_err(PolicyError::Configure)?;
        let started = Instant::now();
        for (index, recorded) in recording.iter().enumerate() {
            if started.elapsed() > REPLAY_LIMIT {
                return Err(PolicyError::ReplayTooLong {
                    answered: index,
                    questions: recording.len(),
                    limit: REPLAY_LIMIT,
                });
            }
            if let Err(failure) = instance.ask(&recorded.question) {
                return Err(PolicyError::ReplayFailed {
                    index: index + 1,
                    questions: recording.len(),
                    question: crate::recording::question_json(&recorded.question).to_string(),
                    failure,
                });
            }
        }
        Ok(())
    }

    /// Validates `spec` as a swap would and loads it as the shadow candidate, in place of any
    /// other: it is asked the active policy's questions from now on, and its answers are
    /// compared, never acted on. Returns its report (empty).
    pub fn shadow(&self, spec: PolicySpec) -> Result<ShadowReport, PolicyError> {
        let tap = &self.shared.tap;
        let ticket = self.shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        let validated = self.validate(&spec).inspect_err(|err| {
            tracing::warn!(source = %spec.source, "shadow policy refused: {err}");
        })?;
        let candidate = Arc::new(shadow::Candidate::new(validated, spec, tap.dropped()));
        let report = tap.report(&candidate);
        tap.set_candidate(Some(candidate), ticket)?;
        tracing::info!(digest = %report.digest, source = %report.source, "shadow policy loaded");
        Ok(report)
    }

    /// What the shadow run has shown so far, if a candidate is loaded.
    pub fn shadow_report(&self) -> Option<ShadowReport> {
        let tap = &self.shared.tap;
        tap.candidate().map(|candidate| tap.report(&candidate))
    }

    /// Unloads the shadow candidate; returns its last report.
    pub fn drop_shadow(&self) -> Result<ShadowReport, PolicyError> {
        let tap = &self.shared.tap;
        let ticket = self.shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        let candidate = tap
            .set_candidate(None, ticket)?
            .ok_or(PolicyError::NoShadow)?;
        tracing::info!(digest = %candidate.validated.digest, "shadow policy dropped");
        Ok(tap.report(&candidate))
    }

    /// Makes the shadow candidate the active policy, as a swap of it would (without validating
    /// it again), and unloads it. If a swap asked for later already stored its policy, the
    /// candidate stays the shadow.
    pub fn promote_shadow(&self) -> Result<Arc<PolicyInfo>, PolicyError> {
        let tap = &self.shared.tap;
        let ticket = self.shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        let candidate = tap
            .set_candidate(None, ticket)?
            .ok_or(PolicyError::NoShadow)?;
        let (validated, spec) = (candidate.validated.clone(), candidate.spec.clone());
        self.activate(validated, spec, ticket).inspect_err(|err| {
            if matches!(err, PolicyError::Superseded) {
                tap.put_back(candidate);
            }
        })
    }

    /// The questions recorded in memory, oldest first (none unless
    /// [`RecordOptions::ring`] is set).
    pub fn recording(&self) -> Vec<Recorded> {
        self.shared.tap.recorded()
    }

    /// The last automatic rollback, if any.
    pub fn last_rollback(&self) -> Option<Rollback> {
        let state = self
            .shared
            .rollback
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.last.clone()
    }

    /// Whether the policy `digest` was rolled back (and not loaded again since by a swap).
    pub fn was_rolled_back(&self, digest: &str) -> bool {
        let state = self
            .shared
            .rollback
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.digests.iter().any(|d| d == digest)
    }

    /// The active policy's operator configuration (a reload keeps it).
    pub fn active_config(&self) -> Vec<(String, String)> {
        self.shared.active.load().config.clone()
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> PolicyStats {
        let s = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let [shadow_agreed, shadow_disagreed, shadow_failed] = self.shared.tap.shadow_outcomes();
        PolicyStats {
            traps: get(&s.traps),
            deadline_hits: get(&s.deadline_hits),
            invalid_answers: get(&s.invalid_answers),
            instantiations: get(&s.instantiations),
            swaps_applied: get(&s.swaps_applied),
            swaps_rejected: get(&s.swaps_rejected),
            breaker_skips: get(&s.breaker_skips),
            fail_safe_lookups: get(&s.fail_safe_lookups),
            fail_safe_evictions: get(&s.fail_safe_evictions),
            rollbacks: get(&s.rollbacks),
            shadow_agreed,
            shadow_disagreed,
            shadow_failed,
            observer_dropped: self.shared.tap.dropped(),
            record_write_failures: self.shared.tap.record_write_failures(),
        }
    }

    /// A private instance of the active policy, called directly: no per-thread table, no
    /// generation check, no fail-safe. Benchmarks use it to measure the engine's overhead over
    /// the bare component call.
    pub fn direct_instance(&self) -> Result<DirectInstance, CallFailure> {
        let generation = self.shared.active.load();
        let (instance, _) = generation.instantiate(&self.shared.limits)?;
        Ok(DirectInstance(instance))
    }

    /// Runs `call` on this thread's instance of the active generation; on failure, counts and
    /// logs it and returns `fail_safe`'s answer, saying so (`true`).
    fn decide<D>(
        &self,
        call: impl FnOnce(&mut Instance) -> Result<D, CallFailure>,
        fail_safe: impl FnOnce(&Settings) -> D,
        fail_safe_answers: impl Fn(&Stats) -> &AtomicU64,
    ) -> (Decided<D>, bool) {
        let generation = self.shared.active.load();
        let fail_safe = || {
            fail_safe_answers(&self.shared.stats).fetch_add(1, Ordering::Relaxed);
            let decided = Decided {
                decision: fail_safe(&generation.info.settings),
                policy: generation.info.clone(),
            };
            (decided, true)
        };
        if generation.breaker.is_open() {
            self.shared
                .stats
                .breaker_skips
                .fetch_add(1, Ordering::Relaxed);
            if let Some(last) = generation.failures.record(Instant::now(), None) {
                self.shared.roll_back(&generation, last);
            }
            return fail_safe();
        }
        match instance::with_thread_instance(&self.shared, &generation, call) {
            Ok((decision, policy)) => {
                generation.breaker.record_success();
                (Decided { decision, policy }, false)
            }
            Err(failure) => {
                self.shared.stats.count_failure(&failure);
                match generation.breaker.record_failure() {
                    Streak::First => tracing::warn!(
                        policy = %generation.info,
                        "policy call failed ({failure}); using the fail-safe decision"
                    ),
                    Streak::Opened(failures) => tracing::error!(
                        policy = %generation.info,
                        "policy failed {failures} calls in a row (last: {failure}); answering \
                         fail-safe without calling it for {BREAKER_OPEN:?}"
                    ),
                    Streak::Continuing => {}
                }
                if let Some(last) = generation.failures.record(Instant::now(), Some(&failure)) {
                    self.shared.roll_back(&generation, last);
                }
                fail_safe()
            }
        }
    }
}

/// See [`PolicyEngine::direct_instance`].
pub struct DirectInstance(Instance);

impl DirectInstance {
    /// Calls `decide-lookup` once.
    pub fn decide_lookup(
        &mut self,
        context: &LookupContext<'_>,
    ) -> Result<LookupDecision, CallFailure> {
        self.0.decide_lookup(context)
    }

    /// Asks `question` once: what replays do, with the failure rather than a fail-safe answer.
    pub fn ask(&mut self, question: &Question) -> Result<Answer, CallFailure> {
        self.0.ask(question)
    }
}

impl Decide for PolicyEngine {
    fn decide_lookup(&self, context: &LookupContext<'_>) -> Decided<LookupDecision> {
        let (decided, fail_safe) = self.decide(
            |instance| instance.decide_lookup(context),
            |settings| {
                if context.cached {
                    LookupDecision::ServeStale { refresh: true }
                } else {
                    LookupDecision::RefreshAndWait {
                        max_wait_ms: u32::try_from(settings.max_wait.as_millis())
                            .unwrap_or(u32::MAX),
                        fallback_to_stale: true,
                    }
                }
            },
            |stats| &stats.fail_safe_lookups,
        );
        self.shared.tap.observe(
            Asked::Lookup(*context),
            || Answer::Lookup(decided.decision.clone()),
            fail_safe,
        );
        decided
    }

    fn guard_eviction(&self, context: &EvictionContext<'_>) -> Decided<EvictionDecision> {
        let (decided, fail_safe) = self.decide(
            |instance| instance.guard_eviction(context),
            |settings| EvictionDecision::KeepSuspect {
                hold_ms: settings.max_suspect_hold.as_millis() as u64,
            },
            |stats| &stats.fail_safe_evictions,
        );
        self.shared.tap.observe(
            Asked::Eviction(*context),
            || Answer::Eviction(decided.decision),
            fail_safe,
        );
        decided
    }

    fn active(&self) -> Arc<PolicyInfo> {
        self.shared.active.load().info.clone()
    }
}

fn make_generation(
    validated: Validated,
    spec: PolicySpec,
    number: u64,
    rule: RollbackRule,
) -> Generation {
    let short_digest: Arc<str> = Arc::from(&validated.digest[..12]);
    Generation {
        breaker: Breaker::new(),
        failures: rollback::FailureWindow::new(rule),
        info: Arc::new(PolicyInfo {
            generation: number,
            digest: validated.digest,
            source: spec.source,
            loaded_at: SystemTime::now(),
            settings: validated.settings,
        }),
        pre: validated.pre,
        config: spec.config,
        short_digest,
    }
}

/// Magic number and the two version/layer words wasm binaries start with.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];

/// The whole load path (steps 1–5 of the module doc), with no side effect on the active policy.
fn validate(
    engine: &Engine,
    linker: &Linker<InstanceState>,
    artifacts: &artifacts::ArtifactCache,
    compilation: &compile::Compilation,
    limits: &Limits,
    envelope: &Envelope,
    spec: &PolicySpec,
) -> Result<Validated, PolicyError> {
    let bytes = &spec.wasm[..];
    if bytes.is_empty() {
        return Err(PolicyError::Empty);
    }
    compilation.check_size(bytes)?;
    if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
        return Err(PolicyError::NotWasm);
    }
    if bytes[4..8] == CORE_MODULE_VERSION {
        return Err(PolicyError::CoreModule);
    }
    let digest = artifacts::hex_sha256(bytes);
    let (component, _origin) =
        artifacts.component(engine, &digest, || compilation.compile(engine, bytes))?;
    let component_type = component.component_type();
    if let Some((name, _)) = component_type
        .imports(engine)
        .find(|(name, _)| !sandbox::is_offered_import(name))
    {
        return Err(PolicyError::UnofferedImport(name.to_string()));
    }
    let pre =
        instance::pre(linker, &component).map_err(|e| PolicyError::WrongWorld(format!("{e:#}")))?;
    let short_digest: Arc<str> = Arc::from(&digest[..12]);

    let instantiate = || {
        let deadlines = instance::Deadlines::Validation;
        Instance::new(&pre, &spec.config, limits, short_digest.clone(), deadlines)
            .map_err(PolicyError::Configure)
    };
    let (mut first, raw) = instantiate()?;
    settings::validate(&raw, envelope)?;
    let (mut second, raw_again) = instantiate()?;
    if raw_again != raw {
        return Err(PolicyError::Impure(
            "two instances with the same configuration returned different settings".into(),
        ));
    }
    conformance::run(&mut first, &mut second, limits.latency_budget)?;
    Ok(Validated {
        pre,
        component,
        digest,
        settings: raw.into_settings(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_is_a_regular_file_of_bounded_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.wasm");
        let reader = path.clone();
        crate::fsutil::testing::assert_refuses_special_files(&path, move || {
            PolicySpec::from_file(&reader, Vec::new(), MAX_POLICY_SIZE)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1025).unwrap();
        let err = PolicySpec::from_file(&path, Vec::new(), 1024).unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::Limit(LoadBound::Size {
                    size: 1025,
                    limit: 1024
                })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("policy.max_size"), "{err}");
        file.set_len(4).unwrap();
        assert_eq!(
            PolicySpec::from_file(&path, Vec::new(), 1024)
                .unwrap()
                .wasm
                .len(),
            4
        );
    }
}
