//! The lookup hot path in process (scenario 1): a cache hit answered by the registry cache with
//! the wasm policy consulted, against its parts measured alone in the same run (a bare sharded
//! map hit, the bare component call) and against the same cache with a native Rust policy; and
//! lookups per second on 1 and 2 threads (no shared lock on the hit path, so ~2x). Both
//! comparisons are interleaved round by round.

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
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec};
use regcache::registry::Registry;
use regcache::registry::memory::MemoryRegistry;
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

async fn warm_cache(policy: Arc<dyn Decide>) -> anyhow::Result<RegistryCache> {
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

/// Lookups per second over all threads, each thread cycling through its own services.
fn lookups_per_second(cache: &RegistryCache, threads: usize, duration: Duration) -> f64 {
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

pub fn run(effort: Effort, quick: bool) -> anyhow::Result<Section> {
    let runtime = tokio::runtime::Runtime::new()?;
    let _entered = runtime.enter();
    let engine = PolicyEngine::new(
        EngineOptions::default(),
        PolicySpec::embedded_default(vec![]),
    )?;
    let wasm_cache = runtime.block_on(warm_cache(Arc::new(engine.clone())))?;
    let native_cache = runtime.block_on(warm_cache(Arc::new(NativePolicy(engine.active()))))?;
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
    let mut native = Timed::new(effort, || {
        black_box(now_or_never(native_cache.lookup(black_box(name))).unwrap());
    });
    let mut wasm = Timed::new(effort, || {
        black_box(now_or_never(wasm_cache.lookup(black_box(name))).unwrap());
    });
    let per_op: Rounds<f64, 4> = rounds_now(effort.rounds, |arm| match arm {
        BARE_HIT => bare_hit.ns_per_op(),
        BARE_CALL => bare_call.ns_per_op(),
        NATIVE => native.ns_per_op(),
        _ => wasm.ns_per_op(),
    });
    let ns = |i: usize| per_op.per_round(|r| r[i]);

    let window = Duration::from_millis(if quick { 50 } else { 300 });
    let threads: Rounds<f64, 2> = rounds_now(effort.rounds, |arm| {
        lookups_per_second(&wasm_cache, arm + 1, window)
    });

    Ok(Section {
        title: format!("Lookup hot path in process ({SERVICES} services x {NODES} nodes cached)"),
        measured: format!(
            "in process, no HTTP; the four single-thread arms interleaved round by round, then \
             1 and 2 threads interleaved ({} s windows)",
            window.as_secs_f64()
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
                "lookups/s, 1 thread (wasm policy)",
                threads.per_round(|r| r[0]),
                "/s",
            ),
            Row::rounds(
                "lookups/s, 2 threads (wasm policy)",
                threads.per_round(|r| r[1]),
                "/s",
            ),
            Row::rounds(
                "scaling, 2 threads / 1 thread",
                threads.per_round(|r| r[1] / r[0]),
                "x",
            )
            .at_least(1.8),
        ],
        notes: vec![],
    })
}
