//! Hot swap (scenario 6): policy files rewritten 100 times while threads look up continuously.
//! Reports the time from the file write to the first lookup decided by the new generation,
//! failed lookups, lookup latency with and without swaps, and what `swap` itself costs for a
//! policy compiled for the first time and for one whose compiled form is cached.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use regcache::cache::RegistryCache;
use regcache::decision::Decide;
use regcache::policy::reload::Reloader;
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec};
use regcache::registry::Registry;
use regcache::registry::memory::MemoryRegistry;
use regcache_tests::policies::policy_wasm;
use regcache_tests::registry::service;

use crate::compare::now_or_never;
use crate::load::percentile;
use crate::report::{Row, Section};

const SERVICES: usize = 50;
/// Every this many lookups one latency is kept (keeping all would cost more than it tells).
const SAMPLE_EVERY: u64 = 16;

struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    workers: Vec<std::thread::JoinHandle<Vec<Duration>>>,
}

impl Load {
    fn start(cache: &RegistryCache, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let runtime = tokio::runtime::Handle::current();
        let workers = (0..threads)
            .map(|t| {
                let (cache, stop, failed, runtime) =
                    (cache.clone(), stop.clone(), failed.clone(), runtime.clone());
                std::thread::spawn(move || {
                    let _runtime = runtime.enter();
                    let mut latencies = Vec::new();
                    let mut n = t as u64;
                    while !stop.load(Ordering::Relaxed) {
                        let name = format!("swap-{}", n as usize % SERVICES);
                        let started = Instant::now();
                        if now_or_never(cache.lookup(&name)).is_err() {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        if n.is_multiple_of(SAMPLE_EVERY) {
                            latencies.push(started.elapsed());
                        }
                        n += 1;
                    }
                    latencies
                })
            })
            .collect();
        Load {
            stop,
            failed,
            workers,
        }
    }

    /// Stops the threads; returns the sorted sampled latencies and the failed lookups.
    fn finish(self) -> (Vec<Duration>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut latencies: Vec<Duration> = self
            .workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        latencies.sort_unstable();
        (latencies, self.failed.load(Ordering::Relaxed))
    }
}

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let swaps = if quick { 10 } else { 100 };
    let runtime = tokio::runtime::Runtime::new()?;
    let _entered = runtime.enter();
    let dir = tempfile::tempdir()?;
    let options = EngineOptions {
        artifact_dir: Some(dir.path().join("artifacts")),
        ..Default::default()
    };
    let engine = PolicyEngine::new(options, PolicySpec::embedded_default(vec![]))?;

    // What `swap` costs: a policy compiled for the first time, then the same one again.
    let go_micro = PolicySpec {
        wasm: policy_wasm("go-micro").into(),
        source: "bench".into(),
        config: vec![],
    };
    let started = Instant::now();
    engine.swap(go_micro.clone())?;
    let cold = started.elapsed();
    let warm_times: Vec<Duration> = (0..10)
        .map(|_| {
            let started = Instant::now();
            engine.swap(go_micro.clone()).map(|_| started.elapsed())
        })
        .collect::<Result<_, _>>()?;
    let warm = warm_times.iter().min().copied().unwrap_or_default();

    let registry = Arc::new(MemoryRegistry::new());
    let cache = runtime.block_on(async {
        for s in 0..SERVICES {
            registry
                .register(&service(&format!("swap-{s}"), "1", "n1"))
                .await?;
        }
        let cache = RegistryCache::new(registry.clone(), Arc::new(engine.clone()));
        for s in 0..SERVICES {
            cache.lookup(&format!("swap-{s}")).await?;
        }
        anyhow::Ok(cache)
    })?;

    let quiet = Load::start(&cache, 2);
    std::thread::sleep(Duration::from_millis(if quick { 200 } else { 2_000 }));
    let (quiet_latencies, quiet_failed) = quiet.finish();

    let path = dir.path().join("policy.wasm");
    let files = [policy_wasm("strict"), policy_wasm("always-stale")];
    std::fs::write(&path, &files[1])?;
    let _watch = Reloader::new(engine.clone(), &path, vec![]).watch()?;
    let busy = Load::start(&cache, 2);
    let mut to_first_decision = Vec::with_capacity(swaps);
    for i in 0..swaps {
        let generation = engine.active().generation;
        let written = Instant::now();
        std::fs::write(&path, &files[i % 2])?;
        let deadline = written + Duration::from_secs(10);
        loop {
            let answer = now_or_never(cache.lookup("swap-0"))?;
            if answer.policy.generation > generation {
                to_first_decision.push(written.elapsed());
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "swap {i} never took effect");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let (busy_latencies, busy_failed) = busy.finish();
    to_first_decision.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Ok(Section {
        title: format!("Hot swap: {swaps} policy file rewrites while 2 threads look up"),
        measured: "in process: the cache and its engine called directly, the policy file \
                   rewritten on disk and picked up by the file watcher; no HTTP"
            .into(),
        rows: vec![
            Row::new(
                "file write -> first lookup on the new generation: p50",
                ms(percentile(&to_first_decision, 0.5)),
                "ms",
            ),
            Row::new(
                "file write -> first lookup on the new generation: max",
                ms(percentile(&to_first_decision, 1.0)),
                "ms",
            )
            .at_most(250.0),
            Row::new(
                "failed lookups during swaps",
                (busy_failed + quiet_failed) as f64,
                "",
            )
            .at_most(0.0),
            Row::new(
                "lookup p99 without swaps",
                us(percentile(&quiet_latencies, 0.99)),
                "us",
            ),
            Row::new(
                "lookup p99 during swaps",
                us(percentile(&busy_latencies, 0.99)),
                "us",
            ),
            Row::new("swap(): new policy (compile + validate)", ms(cold), "ms"),
            Row::new(
                "swap(): known policy (compiled form cached, validate only)",
                ms(warm),
                "ms",
            ),
        ],
        notes: vec![
            "The file watcher loads as soon as the writer closes the file (or renames it into \
             place); a file still open for writing is loaded once its writes have settled for \
             100 ms."
                .into(),
        ],
    })
}
