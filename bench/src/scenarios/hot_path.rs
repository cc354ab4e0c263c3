//! The lookup hot path in process (scenario 1): a cache hit answered by the registry cache with
//! the wasm policy consulted, against its parts measured alone in the same run (a bare sharded
//! map hit, the bare component call) and against the same cache with a native Rust policy; and
//! lookups per second on 1 and 2 threads (no shared lock on the hit path, so ~2x). Both
//! comparisons are interleaved round by round.
//!
//! Issue 13's arms: the same hit with a shadow candidate loaded and asked every question, and
//! with recording on, each against the same engine with neither. The lookup only appends its
//! question to its thread's bounded buffer; the observer thread answering it runs on the
//! machine's other core with one lookup thread, and yields to the lookups (nice 19) with two.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use regcache::cache::RegistryCache;
use regcache::decision::{
    Decide, Decided, EvictionContext, EvictionDecision, LookupContext, LookupDecision, PolicyInfo,
};
use regcache::model::Service;
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec, RecordOptions, ShadowReport};
use regcache::registry::Registry;
use regcache::registry::memory::MemoryRegistry;
use regcache_tests::policies::spec;
use regcache_tests::registry::service;

use super::policy_cost::fresh_hit;
use crate::compare::{Rounds, now_or_never, rounds_now};
use crate::measure::{Effort, Timed};
use crate::report::{Row, Section};

const SERVICES: usize = 100;
const NODES: usize = 10;

/// The default policy's hit-path rule in Rust, behind the same `Decide` trait.
struct NativePolicy(Arc<PolicyInfo>);

impl Decide for NativePolicy {
    fn decide_lookup(&self, ctx: &LookupContext<'_>) -> Decided<LookupDecision> {
        let ttl_ms = self.0.settings.ttl.as_millis() as u64;
        let decision = match ctx.since_refresh_ms {
            Some(age) if ctx.cached && age < ttl_ms => LookupDecision::ServeCached,
            _ if ctx.cached => LookupDecision::ServeStale { refresh: true },
            _ => LookupDecision::RefreshAndWait {
                max_wait_ms: 3_000,
                fallback_to_stale: true,
            },
        };
        Decided {
            decision,
            policy: self.0.clone(),
        }
    }

    fn guard_eviction(&self, _ctx: &EvictionContext<'_>) -> Decided<EvictionDecision> {
        Decided {
            decision: EvictionDecision::Evict,
            policy: self.0.clone(),
        }
    }

    fn active(&self) -> Arc<PolicyInfo> {
        self.0.clone()
    }
}

fn names() -> Vec<String> {
    (0..SERVICES).map(|i| format!("svc-{i:03}")).collect()
}

/// A registry cache asking `policy`, with every service cached by one lookup.
pub async fn warm_cache(policy: Arc<dyn Decide>) -> anyhow::Result<RegistryCache> {
    let registry = Arc::new(MemoryRegistry::new());
    for name in names() {
        for node in 0..NODES {
            registry
                .register(&service(&name, "1", &format!("{name}-{node}")))
                .await?;
        }
    }
    let cache = RegistryCache::new(registry, policy);
    for name in names() {
        cache.lookup(&name).await?;
    }
    Ok(cache)
}

/// Lookups per second over all threads, each thread cycling through its own services of a
/// [`warm_cache`].
pub fn lookups_per_second(cache: &RegistryCache, threads: usize, duration: Duration) -> f64 {
    let names = Arc::new(names());
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Handle::current();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (cache, names, stop, runtime) =
                (cache.clone(), names.clone(), stop.clone(), runtime.clone());
            std::thread::spawn(move || {
                let _runtime = runtime.enter();
                let mine: Vec<&String> = names.iter().skip(t).step_by(threads).collect();
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for name in &mine {
                        black_box(now_or_never(cache.lookup(name)).expect("hit"));
                    }
                    done += mine.len() as u64;
                }
                done
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    total as f64 / started.elapsed().as_secs_f64()
}

// The arms of each single-thread round.
const BARE_HIT: usize = 0;
const BARE_CALL: usize = 1;
const NATIVE: usize = 2;
const WASM: usize = 3;
const SHADOWED: usize = 4;
const RECORDING: usize = 5;

// The arms of each throughput round: 1 and 2 threads, without and with the shadow.
const ONE: usize = 0;
const TWO: usize = 1;
const ONE_SHADOWED: usize = 2;
const TWO_SHADOWED: usize = 3;

/// Questions kept by the recording arm's ring.
const RING: usize = 10_000;

/// How long an arm with an observer thread is given, after its measurement, to empty its
/// buffers (8192 observations a thread at ~1 µs each for the shadow), so that this work does
/// not land in the next arm's time.
const OBSERVER_CATCH_UP: Duration = Duration::from_millis(30);

/// An engine with the default policy active and `options`.
fn default_engine(options: EngineOptions) -> anyhow::Result<PolicyEngine> {
    Ok(PolicyEngine::new(
        options,
        PolicySpec::embedded_default(vec![]),
    )?)
}

pub fn run(effort: Effort, quick: bool) -> anyhow::Result<Section> {
    let runtime = tokio::runtime::Runtime::new()?;
    let _entered = runtime.enter();
    let engine = default_engine(EngineOptions::default())?;
    let shadowed = default_engine(EngineOptions {
        shadow_one_in: 1,
        ..EngineOptions::default()
    })?;
    shadowed.shadow(spec("strict", &[]))?;
    let recording = default_engine(EngineOptions {
        record: RecordOptions {
            ring: RING,
            ..RecordOptions::default()
        },
        ..EngineOptions::default()
    })?;
    let wasm_cache = runtime.block_on(warm_cache(Arc::new(engine.clone())))?;
    let native_cache = runtime.block_on(warm_cache(Arc::new(NativePolicy(engine.active()))))?;
    let shadowed_cache = runtime.block_on(warm_cache(Arc::new(shadowed.clone())))?;
    let recording_cache = runtime.block_on(warm_cache(Arc::new(recording.clone())))?;
    let name = "svc-042";

    // The bare parts: a sharded-map hit sharing the answer, and the component call alone.
    let bare_map: DashMap<Arc<str>, Arc<Vec<Service>>> = DashMap::new();
    let answer = Arc::new(now_or_never(wasm_cache.lookup(name))?.services().to_vec());
    bare_map.insert(Arc::from(name), answer);
    let mut direct = engine.direct_instance()?;
    let ctx = fresh_hit(name);
    let mut bare_hit = Timed::new(effort, || {
        black_box(bare_map.get(black_box(name)).map(|e| e.value().clone()));
    });
    let mut bare_call = Timed::new(effort, || {
        black_box(direct.decide_lookup(black_box(&ctx)).unwrap());
    });
    let hit = |cache: &RegistryCache| {
        black_box(now_or_never(cache.lookup(black_box(name))).unwrap());
    };
    let mut native = Timed::new(effort, || hit(&native_cache));
    let mut wasm = Timed::new(effort, || hit(&wasm_cache));
    let mut with_shadow = Timed::new(effort, || hit(&shadowed_cache));
    let mut with_recording = Timed::new(effort, || hit(&recording_cache));
    let caught_up = |ns: f64| {
        std::thread::sleep(OBSERVER_CATCH_UP);
        ns
    };
    let per_op: Rounds<f64, 6> = rounds_now(effort.rounds, |arm| match arm {
        BARE_HIT => bare_hit.ns_per_op(),
        BARE_CALL => bare_call.ns_per_op(),
        NATIVE => native.ns_per_op(),
        WASM => wasm.ns_per_op(),
        SHADOWED => caught_up(with_shadow.ns_per_op()),
        _ => caught_up(with_recording.ns_per_op()),
    });
    let ns = |i: usize| per_op.per_round(|r| r[i]);
    let single_thread_shadow = shadowed.shadow_report().expect("the shadow is loaded");

    let window = Duration::from_millis(if quick { 50 } else { 300 });
    let throughput: Rounds<f64, 4> = rounds_now(effort.rounds, |arm| match arm {
        ONE => lookups_per_second(&wasm_cache, 1, window),
        TWO => lookups_per_second(&wasm_cache, 2, window),
        ONE_SHADOWED => caught_up(lookups_per_second(&shadowed_cache, 1, window)),
        _ => caught_up(lookups_per_second(&shadowed_cache, 2, window)),
    });
    let per_second = |i: usize| throughput.per_round(|r| r[i]);
    let shadow = shadowed.shadow_report().expect("the shadow is loaded");

    Ok(Section {
        title: format!("Lookup hot path in process ({SERVICES} services x {NODES} nodes cached)"),
        measured: format!(
            "in process, no HTTP; the six single-thread arms interleaved round by round, then \
             1 and 2 threads, without and with the shadow, interleaved ({} s windows); \
             {} cores",
            window.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        rows: vec![
            Row::rounds(
                "bare sharded-map hit sharing the answer (no policy)",
                ns(BARE_HIT),
                "ns",
            ),
            Row::rounds("bare component call (decide-lookup)", ns(BARE_CALL), "ns"),
            Row::rounds("cache hit, native Rust policy", ns(NATIVE), "ns"),
            Row::rounds("cache hit, wasm policy consulted", ns(WASM), "ns"),
            Row::rounds(
                "wasm lookup / (bare hit + bare component call)",
                per_op.per_round(|r| r[WASM] / (r[BARE_HIT] + r[BARE_CALL])),
                "x",
            )
            .at_most(1.25),
            Row::rounds(
                "cache hit, wasm policy, strict shadow asked every question",
                ns(SHADOWED),
                "ns",
            ),
            Row::rounds(
                "shadow loaded / none, 1 lookup thread (observer on the other core)",
                per_op.per_round(|r| r[SHADOWED] / r[WASM]),
                "x",
            )
            .at_most(1.10),
            Row::rounds(
                format!("cache hit, wasm policy, recording to a {RING}-question ring"),
                ns(RECORDING),
                "ns",
            ),
            Row::rounds(
                "recording / none, 1 lookup thread",
                per_op.per_round(|r| r[RECORDING] / r[WASM]),
                "x",
            ),
            Row::rounds("lookups/s, 1 thread (wasm policy)", per_second(ONE), "/s"),
            Row::rounds("lookups/s, 2 threads (wasm policy)", per_second(TWO), "/s"),
            Row::rounds(
                "scaling, 2 threads / 1 thread",
                throughput.per_round(|r| r[TWO] / r[ONE]),
                "x",
            )
            .at_least(1.8),
            Row::rounds(
                "lookups/s, 1 thread, strict shadow asked every question",
                per_second(ONE_SHADOWED),
                "/s",
            ),
            Row::rounds(
                "lookups/s, 2 threads, strict shadow asked every question",
                per_second(TWO_SHADOWED),
                "/s",
            ),
            Row::rounds(
                "lookup cost, shadow loaded / none, 1 thread (lookups/s none / shadowed)",
                throughput.per_round(|r| r[ONE] / r[ONE_SHADOWED]),
                "x",
            )
            .at_most(1.10),
            Row::rounds(
                "lookup cost, shadow loaded / none, 2 threads (observer competing for CPU)",
                throughput.per_round(|r| r[TWO] / r[TWO_SHADOWED]),
                "x",
            )
            .at_most(1.10),
        ],
        notes: vec![shadow_note(&single_thread_shadow, &shadow)],
    })
}

/// What share of its questions the shadow answered: a full buffer drops a question rather than
/// making the lookup wait, so the lookup's cost holds only if the shadow's answers are counted.
fn shadow_note(single_thread: &ShadowReport, whole: &ShadowReport) -> String {
    let share =
        |answered: u64, dropped: u64| 100.0 * answered as f64 / (answered + dropped).max(1) as f64;
    format!(
        "Single-thread arms: the strict shadow answered {} questions, {} were dropped (observer \
         behind, buffers full): {:.1} % answered. Whole scenario: {} answered, {} dropped, {:.1} % \
         answered; {} disagreements, {} failures; its mean CPU per call {:.0} ns.",
        single_thread.answered,
        single_thread.dropped,
        share(single_thread.answered, single_thread.dropped),
        whole.answered,
        whole.dropped,
        share(whole.answered, whole.dropped),
        whole.disagreed,
        whole.traps + whole.deadline_hits + whole.invalid_answers,
        whole.cost.mean.as_nanos() as f64,
    )
}
