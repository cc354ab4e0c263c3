//! The wasm policy engine: what every policy decides, how bad policies are refused while the
//! active one keeps serving, runaway guests, hot swaps under load, and hot reload from a file.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use regcache::decision::{
    Decide, EvictionContext, EvictionDecision, EvictionReason, HealthView, LookupContext,
    LookupDecision, RejectionKind,
};
use regcache::policy::{EngineOptions, Limits, PolicyEngine, PolicyError, PolicySpec};
use regcache::registry::ErrorKind;
use regcache_tests::policies::{policy_wasm, spec};
use regcache_tests::wait::eventually_blocking;

fn engine() -> PolicyEngine {
    PolicyEngine::new(
        EngineOptions::default(),
        PolicySpec::embedded_default(vec![]),
    )
    .unwrap()
}

const HEALTHY: HealthView = HealthView {
    watch_connected: true,
    since_last_contact_ms: Some(5),
    since_failure_ms: None,
};

const NOW_MS: u64 = 1_000_000;

fn cold(service: &str) -> LookupContext<'_> {
    LookupContext::cold(service, NOW_MS, HEALTHY)
}

fn cached(service: &str, age_ms: u64) -> LookupContext<'_> {
    LookupContext {
        nodes: 5,
        ..LookupContext::cached(service, NOW_MS, HEALTHY, age_ms)
    }
}

fn mass_deletion() -> EvictionContext<'static> {
    EvictionContext {
        service: "svc",
        now_ms: NOW_MS,
        nodes_before: 5,
        nodes_after: 1,
        recent_deletions: 4,
        window_ms: 30_000,
        health: HEALTHY,
        reason: EvictionReason::LeaseExpired,
    }
}

fn single_deregistration() -> EvictionContext<'static> {
    EvictionContext {
        nodes_after: 4,
        recent_deletions: 1,
        reason: EvictionReason::WatchDelete,
        ..mass_deletion()
    }
}

#[test]
fn default_policy_follows_go_micro_and_serves_stale_while_revalidating() {
    let engine = engine();
    let info = engine.active();
    assert_eq!(info.generation, 1);
    assert_eq!(info.source, "embedded:default");
    assert_eq!(info.settings.ttl, Duration::from_secs(60));
    assert_eq!(info.settings.min_retry_interval, Duration::from_secs(5));

    let decide = |ctx: LookupContext<'_>| engine.decide_lookup(&ctx).decision;
    assert_eq!(decide(cached("a", 1_000)), LookupDecision::ServeCached);
    assert_eq!(
        decide(cached("a", 61_000)),
        LookupDecision::ServeStale { refresh: true },
        "past the TTL nobody waits"
    );
    assert!(matches!(
        decide(cold("a")),
        LookupDecision::RefreshAndWait {
            fallback_to_stale: true,
            ..
        }
    ));
    let failed_recently = LookupContext {
        since_attempt_ms: Some(1_000),
        consecutive_failures: 1,
        last_error: Some(ErrorKind::Timeout),
        ..cold("a")
    };
    assert!(
        matches!(
            decide(failed_recently),
            LookupDecision::Reject {
                kind: RejectionKind::Unavailable,
                ..
            }
        ),
        "inside the retry interval a cold lookup fails fast (go-micro scenario 3)"
    );
    let failed_long_ago = LookupContext {
        since_attempt_ms: Some(6_000),
        ..failed_recently
    };
    assert!(matches!(
        decide(failed_long_ago),
        LookupDecision::RefreshAndWait { .. }
    ));
    let negative = LookupContext {
        negative: true,
        since_refresh_ms: Some(100),
        ..cold("a")
    };
    assert!(matches!(
        decide(negative),
        LookupDecision::Reject {
            kind: RejectionKind::NotFound,
            ..
        }
    ));
    let panicking = LookupContext {
        suspect_nodes: 3,
        ..cached("a", 1_000)
    };
    assert_eq!(
        decide(panicking),
        LookupDecision::ServeStale { refresh: true }
    );
}

#[test]
fn default_guards_mass_eviction_and_strict_does_not() {
    let engine = engine();
    assert!(matches!(
        engine.guard_eviction(&mass_deletion()).decision,
        EvictionDecision::KeepSuspect { .. }
    ));
    assert_eq!(
        engine.guard_eviction(&single_deregistration()).decision,
        EvictionDecision::Evict
    );
    let unhealthy = EvictionContext {
        health: HealthView::default(),
        ..single_deregistration()
    };
    assert!(matches!(
        engine.guard_eviction(&unhealthy).decision,
        EvictionDecision::KeepSuspect { .. }
    ));
    // Within the grace after a registry failure (30 s by default), a single removal is likely
    // a lease that expired while its owner could not reach etcd; past it, it is applied.
    let after_failure = |ms| EvictionContext {
        health: HealthView {
            since_failure_ms: Some(ms),
            ..HEALTHY
        },
        ..single_deregistration()
    };
    assert!(matches!(
        engine.guard_eviction(&after_failure(2_000)).decision,
        EvictionDecision::KeepSuspect { .. }
    ));
    assert_eq!(
        engine.guard_eviction(&after_failure(31_000)).decision,
        EvictionDecision::Evict
    );
    engine
        .swap(spec("default", &[("outage-grace-ms", "1000")]))
        .unwrap();
    assert_eq!(
        engine.guard_eviction(&after_failure(2_000)).decision,
        EvictionDecision::Evict,
        "the grace is operator configuration"
    );

    engine.swap(spec("strict", &[])).unwrap();
    assert_eq!(
        engine.guard_eviction(&mass_deletion()).decision,
        EvictionDecision::Evict
    );
    assert_eq!(
        engine.guard_eviction(&single_deregistration()).decision,
        EvictionDecision::Evict
    );

    engine.swap(spec("always-stale", &[])).unwrap();
    assert!(matches!(
        engine.guard_eviction(&single_deregistration()).decision,
        EvictionDecision::KeepSuspect { .. }
    ));
}

#[test]
fn operator_configuration_tunes_the_same_compiled_policy() {
    let engine = engine();
    let info = engine
        .swap(PolicySpec::embedded_default(vec![
            ("ttl-ms".into(), "1500".into()),
            ("min-retry-interval-ms".into(), "250".into()),
        ]))
        .unwrap();
    assert_eq!(info.generation, 2);
    assert_eq!(info.settings.ttl, Duration::from_millis(1500));
    assert_eq!(info.settings.min_retry_interval, Duration::from_millis(250));
    assert_eq!(
        engine.decide_lookup(&cached("a", 2_000)).decision,
        LookupDecision::ServeStale { refresh: true }
    );

    for (config, reason) in [
        (vec![("tll-ms", "1")], "unknown configuration key `tll-ms`"),
        (
            vec![("ttl-ms", "soon")],
            "`ttl-ms` = `soon`: expected a whole number",
        ),
        (
            vec![("renewal-threshold", "2")],
            "expected a number from 0 to 1",
        ),
        (
            vec![("ttl-ms", "0")],
            "setting `ttl-ms` = 0 is out of range",
        ),
        (
            vec![("max-wait-ms", "18446744073709551615")],
            "setting `max-wait-ms`",
        ),
    ] {
        let config = config
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let err = engine
            .swap(PolicySpec::embedded_default(config))
            .unwrap_err();
        assert!(err.to_string().contains(reason), "{err}");
        assert_eq!(engine.active().generation, 2, "the active policy stays");
    }
}

/// Every kind of bad policy is refused with a clear reason, and the host keeps serving with the
/// policy it had.
#[test]
fn bad_policies_are_refused_and_the_active_one_keeps_serving() {
    let engine = engine();
    let before = engine.active();
    let wat = |text: &str| wat::parse_str(text).unwrap();
    let raw = |bytes: Vec<u8>| PolicySpec {
        wasm: bytes.into(),
        source: "test".into(),
        config: vec![],
    };
    let cases: Vec<(&str, PolicySpec, &str)> = vec![
        ("empty file", raw(vec![]), "empty"),
        (
            "garbage",
            raw(b"definitely not wasm".to_vec()),
            "not WebAssembly",
        ),
        (
            "core module",
            raw(wat("(module)")),
            "core WebAssembly module",
        ),
        (
            "truncated component",
            raw(policy_wasm("default")[..5_000].to_vec()),
            "invalid component",
        ),
        (
            "component of another world",
            raw(wat("(component)")),
            "does not implement the world",
        ),
        (
            "unknown import",
            raw(wat(r#"(component (import "acme:spy/net" (instance)))"#)),
            "imports `acme:spy/net`",
        ),
        (
            "zero ttl",
            spec("chaos", &[("fault", "zero-ttl")]),
            "setting `ttl-ms` = 0",
        ),
        (
            "trap in lookup",
            spec("chaos", &[("fault", "trap")]),
            "trapped",
        ),
        (
            "infinite loop",
            spec("chaos", &[("fault", "loop")]),
            "deadline",
        ),
        (
            "memory bomb",
            spec("chaos", &[("fault", "memory-bomb")]),
            "trapped",
        ),
        (
            "huge string",
            spec("chaos", &[("fault", "huge-string")]),
            "limit is 1024 bytes",
        ),
        (
            "loop in configure",
            spec("chaos", &[("fault", "loop-configure")]),
            "deadline",
        ),
        (
            "bad configuration",
            spec("chaos", &[("fault", "gremlins")]),
            "unknown fault",
        ),
    ];
    for (what, spec, reason) in cases {
        let err = engine.swap(spec).expect_err(what);
        assert!(err.to_string().contains(reason), "{what}: {err}");
        assert_eq!(engine.active(), before, "{what}: the active policy changed");
        assert_eq!(
            engine.decide_lookup(&cached("a", 1)).decision,
            LookupDecision::ServeCached,
            "{what}: the host stopped serving"
        );
    }
    assert_eq!(engine.stats().swaps_rejected, 13);
    assert_eq!(engine.stats().swaps_applied, 0);
}

#[test]
fn a_policy_that_misbehaves_in_production_gets_the_fail_safe_and_a_fresh_instance() {
    // A budget that building a 2 MiB answer cannot reach on a loaded machine, so that each
    // fault is stopped by what it is about (memory, the answer's size); the loop still meets
    // the run-time deadline.
    let options = EngineOptions {
        limits: Limits {
            latency_budget: Duration::from_millis(20),
            ..Limits::default()
        },
        ..EngineOptions::default()
    };
    let engine = PolicyEngine::new(options, PolicySpec::embedded_default(vec![])).unwrap();
    let boom = |fault| spec("chaos", &[("fault", fault), ("only-service", "boom")]);

    engine
        .swap(boom("trap"))
        .expect("passes conformance: it only traps on `boom`");
    let decided = engine.decide_lookup(&cached("boom", 1));
    assert_eq!(
        decided.decision,
        LookupDecision::ServeStale { refresh: true },
        "fail-safe with a cached entry"
    );
    assert!(matches!(
        engine.decide_lookup(&cold("boom")).decision,
        LookupDecision::RefreshAndWait {
            fallback_to_stale: true,
            ..
        }
    ));
    assert_eq!(engine.stats().traps, 2);
    let instances = engine.stats().instantiations;
    assert_eq!(
        engine.decide_lookup(&cached("fine", 1)).decision,
        LookupDecision::ServeCached
    );
    assert_eq!(
        engine.stats().instantiations,
        instances + 1,
        "the trapped instance was replaced"
    );

    engine.swap(boom("loop")).unwrap();
    let started = Instant::now();
    engine.decide_lookup(&cached("boom", 1));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the deadline stopped the loop"
    );
    assert_eq!(engine.stats().deadline_hits, 1);

    engine.swap(boom("memory-bomb")).unwrap();
    engine.decide_lookup(&cached("boom", 1));
    assert_eq!(engine.stats().traps, 3, "out of memory");

    engine.swap(boom("huge-string")).unwrap();
    assert_eq!(
        engine.decide_lookup(&cold("boom")).decision,
        LookupDecision::RefreshAndWait {
            max_wait_ms: 3_000,
            fallback_to_stale: true
        }
    );
    assert_eq!(engine.stats().invalid_answers, 1);
}

/// 100 swaps while several threads look up: no lookup fails or blocks, and every decision is the
/// one the policy of its reported generation makes.
#[test]
fn swaps_under_load_never_fail_a_lookup_and_never_mix_generations() {
    let engine = engine();
    let strict = spec("strict", &[]);
    let always_stale = spec("always-stale", &[]);
    let strict_digest = engine.swap(strict.clone()).unwrap().digest.clone();
    let always_stale_digest = engine.swap(always_stale.clone()).unwrap().digest.clone();
    // Past TTL + max-stale: strict makes callers wait, always-stale serves stale.
    let very_stale = cached("svc", 3_600_000);

    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let engine = engine.clone();
            let stop = stop.clone();
            let lookups = lookups.clone();
            let (strict_digest, always_stale_digest) =
                (strict_digest.clone(), always_stale_digest.clone());
            std::thread::spawn(move || {
                let mut last_generation = 0;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let decided = engine.decide_lookup(&very_stale);
                    assert!(
                        started.elapsed() < Duration::from_millis(500),
                        "a lookup blocked"
                    );
                    let expected = if decided.policy.digest == strict_digest {
                        LookupDecision::RefreshAndWait {
                            max_wait_ms: 3_000,
                            fallback_to_stale: false,
                        }
                    } else {
                        assert_eq!(decided.policy.digest, always_stale_digest);
                        LookupDecision::ServeStale { refresh: true }
                    };
                    assert_eq!(
                        decided.decision,
                        expected,
                        "generation {} {:?}",
                        decided.policy.generation,
                        engine.stats()
                    );
                    assert!(
                        decided.policy.generation >= last_generation,
                        "generations went backwards"
                    );
                    last_generation = decided.policy.generation;
                    lookups.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for i in 0..100 {
        let next = if i % 2 == 0 {
            strict.clone()
        } else {
            always_stale.clone()
        };
        engine.swap(next).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("a lookup thread failed");
    }
    assert_eq!(engine.active().generation, 103);
    assert_eq!(engine.stats().traps + engine.stats().deadline_hits, 0);
    assert!(lookups.load(Ordering::Relaxed) > 100);
}

#[test]
fn precompiled_artifacts_are_reused_and_a_corrupt_one_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        artifact_dir: Some(dir.path().join("artifacts")),
        ..Default::default()
    };
    let first = PolicyEngine::new(options.clone(), PolicySpec::embedded_default(vec![])).unwrap();
    let artifacts: Vec<_> = std::fs::read_dir(dir.path().join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "one artifact written");
    drop(first);

    let second = PolicyEngine::new(options.clone(), PolicySpec::embedded_default(vec![])).unwrap();
    assert_eq!(
        second.decide_lookup(&cached("a", 1)).decision,
        LookupDecision::ServeCached
    );

    std::fs::write(&artifacts[0], b"tampered").unwrap();
    let third = PolicyEngine::new(options, PolicySpec::embedded_default(vec![])).unwrap();
    assert_eq!(
        third.decide_lookup(&cached("a", 1)).decision,
        LookupDecision::ServeCached
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_changes_swap_after_the_file_is_complete() {
    use regcache::policy::reload::Reloader;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.wasm");
    std::fs::write(&path, policy_wasm("default")).unwrap();
    let engine = engine();
    let reloader = Reloader::new(engine.clone(), &path, vec![]);
    assert!(
        reloader.reload().unwrap().is_none(),
        "same bytes as the embedded default: no swap"
    );
    let _watch = reloader.clone().watch().unwrap();

    // A half-written file is refused (by the watcher, or here) and the active policy stays...
    let strict = policy_wasm("strict");
    std::fs::write(&path, &strict[..strict.len() / 2]).unwrap();
    assert!(matches!(reloader.reload(), Err(PolicyError::Compile(_))));
    assert_eq!(engine.active().generation, 1);
    // ...and the completed file is picked up by the watcher.
    std::fs::write(&path, &strict).unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(20), || engine.active().generation == 2),
        "timed out waiting for the watcher to swap in strict"
    );
    assert_eq!(engine.active().source, path.display().to_string());
    assert_eq!(
        engine.guard_eviction(&mass_deletion()).decision,
        EvictionDecision::Evict
    );
    // A writer that keeps the file open never says it is done: the watcher loads once the
    // writes have settled.
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut writer, &policy_wasm("always-stale")).unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(20), || engine.active().generation == 3),
        "timed out waiting for the watcher to swap in always-stale"
    );
    drop(writer);
}

/// A trapping Rust guest writes its panic message to WASI stderr, which wasmtime-wasi's sync
/// bindings cannot do on a tokio thread; the host must still see a plain trap, both when it
/// validates a policy on a blocking thread and when it decides a lookup on a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_on_runtime_threads_are_refusals_and_fail_safes_not_panics() {
    let engine = engine();
    let swapper = engine.clone();
    let refused =
        tokio::task::spawn_blocking(move || swapper.swap(spec("chaos", &[("fault", "trap")])))
            .await
            .expect("validation on a blocking thread must not panic");
    assert!(refused.unwrap_err().to_string().contains("trapped"));

    engine
        .swap(spec(
            "chaos",
            &[("fault", "trap"), ("only-service", "boom")],
        ))
        .unwrap();
    let worker = engine.clone();
    let decided = tokio::spawn(async move { worker.decide_lookup(&cached("boom", 1)).decision })
        .await
        .expect("a decision on a worker thread must not panic");
    assert_eq!(decided, LookupDecision::ServeStale { refresh: true });
    assert_eq!(engine.stats().traps, 1);
}

/// The watcher reacts to new bytes in the file only: its own reads do not retrigger it, and a
/// policy swapped in another way (the admin API) stays until the file really changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_file_does_not_undo_other_swaps_until_it_changes() {
    use regcache::policy::reload::Reloader;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.wasm");
    std::fs::write(&path, policy_wasm("default")).unwrap();
    let engine = engine();
    let _watch = Reloader::new(engine.clone(), &path, vec![])
        .watch()
        .unwrap();

    let api = engine.swap(spec("strict", &[])).unwrap();
    // Rewriting the same bytes is a change event but no new policy.
    std::fs::write(&path, policy_wasm("default")).unwrap();
    std::fs::write(&path, policy_wasm("always-stale")).unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(20), || {
            engine.active().generation > api.generation
        }),
        "timed out waiting for the watcher to load always-stale"
    );
    let active = engine.active();
    assert_eq!(
        active.generation,
        api.generation + 1,
        "the file's old policy was swapped back in between"
    );
    assert_eq!(active.source, path.display().to_string());
    // Nothing more happens on its own: the reload's reads raise no further swap.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(engine.active().generation, active.generation);
}

/// After five failures in a row the engine stops calling the policy for a second (each failure
/// costs up to a deadline), answers fail-safe meanwhile, then lets a call through again.
#[test]
fn a_policy_failing_in_a_row_trips_the_breaker_then_is_probed_again() {
    let engine = engine();
    engine
        .swap(spec(
            "chaos",
            &[("fault", "trap"), ("only-service", "boom")],
        ))
        .unwrap();
    for _ in 0..5 {
        engine.decide_lookup(&cached("boom", 1));
    }
    assert_eq!(engine.stats().traps, 5);
    assert_eq!(
        engine.decide_lookup(&cached("fine", 1)).decision,
        LookupDecision::ServeStale { refresh: true },
        "open breaker: fail-safe without calling, even for inputs the policy handles"
    );
    assert_eq!(engine.stats().traps, 5);
    assert_eq!(engine.stats().breaker_skips, 1);
    assert!(
        eventually_blocking(Duration::from_secs(20), || {
            engine.decide_lookup(&cached("fine", 1)).decision == LookupDecision::ServeCached
        }),
        "timed out waiting for the breaker to let a call through"
    );
    assert_eq!(engine.stats().traps, 5);
}
