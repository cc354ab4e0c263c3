//! Automatic rollback, in process: a generation that fails past the operator's rule gives way
//! to the one it replaced, no decision fails meanwhile, and the policy file holding it is not
//! loaded again until it changes. (`host_rollback.rs` shows the same through a running host.)

use std::time::Duration;

use regcache::decision::{Decide, HealthView, LookupContext, LookupDecision};
use regcache::policy::reload::Reloader;
use regcache::policy::{
    CallFailure, EngineOptions, PolicyEngine, PolicyError, PolicySpec, RollbackRule,
};
use regcache_tests::policies::{policy_wasm, spec};
use regcache_tests::wait::eventually_blocking;

const HEALTHY: HealthView = HealthView {
    watch_connected: true,
    since_last_contact_ms: Some(5),
    since_failure_ms: None,
};

fn cached(service: &str) -> LookupContext<'_> {
    LookupContext {
        nodes: 5,
        ..LookupContext::cached(service, 1_000_000, HEALTHY, 1)
    }
}

/// Traps on lookups of `boom` only, so it passes validation and fails in production.
fn trapping_on_boom() -> PolicySpec {
    spec("chaos", &[("fault", "trap"), ("only-service", "boom")])
}

fn engine_with(initial: PolicySpec, failures: u32) -> PolicyEngine {
    let options = EngineOptions {
        rollback: RollbackRule {
            failures,
            window: Duration::from_secs(60),
        },
        ..EngineOptions::default()
    };
    PolicyEngine::new(options, initial).unwrap()
}

#[test]
fn a_generation_failing_past_the_rule_is_rolled_back_to_the_one_it_replaced() {
    let engine = engine_with(PolicySpec::embedded_default(vec![]), 3);
    let strict = engine.swap(spec("strict", &[])).unwrap();
    let chaos = engine.swap(trapping_on_boom()).unwrap();

    for _ in 0..2 {
        // Every failed decision is answered by the fail-safe, none fails.
        assert_eq!(
            engine.decide_lookup(&cached("boom")).decision,
            LookupDecision::ServeStale { refresh: true }
        );
    }
    assert_eq!(engine.active().digest, chaos.digest, "two failures: kept");
    assert!(engine.last_rollback().is_none());
    engine.decide_lookup(&cached("boom"));

    let active = engine.active();
    assert_eq!(active.digest, strict.digest, "rolled back to strict");
    assert_eq!(
        active.generation,
        chaos.generation + 1,
        "under a new number"
    );
    let rollback = engine.last_rollback().expect("the rollback is recorded");
    assert_eq!(rollback.from.generation, chaos.generation);
    assert_eq!(rollback.to.generation, active.generation);
    assert_eq!(rollback.reason.failures, 3);
    assert!(
        matches!(rollback.reason.last, CallFailure::Trap(_)),
        "{:?}",
        rollback.reason.last
    );
    let stats = engine.stats();
    assert_eq!((stats.rollbacks, stats.fail_safe_lookups), (1, 3));
    assert!(engine.was_rolled_back(&chaos.digest));

    // Strict decides `boom` now, and nothing traps any more.
    let decided = engine.decide_lookup(&cached("boom"));
    assert_eq!(decided.decision, LookupDecision::ServeCached);
    assert_eq!(decided.policy.generation, active.generation);
    assert_eq!(engine.stats().traps, 3);

    // Loading it again deliberately (the admin API's path) is the operator's word.
    engine.swap(trapping_on_boom()).unwrap();
    assert!(!engine.was_rolled_back(&chaos.digest));
}

#[test]
fn overruns_count_like_traps() {
    let engine = engine_with(PolicySpec::embedded_default(vec![]), 2);
    let default = engine.active();
    engine
        .swap(spec(
            "chaos",
            &[("fault", "loop"), ("only-service", "boom")],
        ))
        .unwrap();
    engine.decide_lookup(&cached("boom"));
    engine.decide_lookup(&cached("boom"));
    assert_eq!(engine.active().digest, default.digest);
    let rollback = engine.last_rollback().unwrap();
    assert!(
        matches!(rollback.reason.last, CallFailure::Deadline(_)),
        "{:?}",
        rollback.reason.last
    );
}

#[test]
fn with_nothing_to_roll_back_to_the_fail_safe_keeps_answering() {
    let engine = engine_with(trapping_on_boom(), 2);
    let first = engine.active();
    for _ in 0..4 {
        assert_eq!(
            engine.decide_lookup(&cached("boom")).decision,
            LookupDecision::ServeStale { refresh: true }
        );
    }
    assert_eq!(engine.active().generation, first.generation);
    assert!(engine.last_rollback().is_none());
    assert_eq!(engine.stats().rollbacks, 0);
    assert_eq!(engine.stats().fail_safe_lookups, 4);
}

/// The restored generation has no fallback: the one rolled back from is none, and the one
/// before the restored policy is not kept. So a restored policy that fails in turn stays (on
/// the fail-safe) rather than flip back to the policy just rolled back.
#[test]
fn a_rollback_goes_back_one_generation_only() {
    let engine = engine_with(PolicySpec::embedded_default(vec![]), 2);
    let trapping_on = |service| spec("chaos", &[("fault", "trap"), ("only-service", service)]);
    let first = engine.swap(trapping_on("a")).unwrap();
    engine.swap(trapping_on("b")).unwrap();
    engine.decide_lookup(&cached("b"));
    engine.decide_lookup(&cached("b"));
    let restored = engine.active();
    assert_eq!(restored.digest, first.digest);
    assert_eq!(
        engine.last_rollback().unwrap().to.generation,
        restored.generation
    );

    for _ in 0..4 {
        engine.decide_lookup(&cached("a"));
    }
    assert_eq!(engine.active().generation, restored.generation);
    assert_eq!(engine.stats().rollbacks, 1);
    assert_eq!(engine.stats().fail_safe_lookups, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_policy_file_is_not_reloaded_until_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.wasm");
    let chaos_bytes = policy_wasm("chaos");
    std::fs::write(&path, &chaos_bytes).unwrap();
    let engine = engine_with(PolicySpec::embedded_default(vec![]), 2);
    let strict = engine.swap(spec("strict", &[])).unwrap();
    let config = vec![
        ("fault".to_string(), "trap".to_string()),
        ("only-service".to_string(), "boom".to_string()),
    ];
    let reloader = Reloader::new(engine.clone(), &path, config);
    let chaos = reloader.reload().unwrap().expect("chaos from the file");
    let _watch = reloader.clone().watch().unwrap();
    engine.decide_lookup(&cached("boom"));
    engine.decide_lookup(&cached("boom"));
    assert_eq!(engine.active().digest, strict.digest, "rolled back");
    let restored = engine.active().generation;

    // SIGHUP asks for the file: it still holds the rolled-back policy.
    match reloader.reload() {
        Err(PolicyError::RolledBack { digest }) => assert_eq!(digest, chaos.digest),
        other => panic!("expected RolledBack, got {other:?}"),
    }
    // Other bytes are loaded: the same component with a custom section appended (id 0, size 4,
    // the name "fix"), as a rebuild would give.
    let mut fixed = chaos_bytes.clone();
    fixed.extend_from_slice(&[0, 4, 3, b'f', b'i', b'x']);
    std::fs::write(&path, &fixed).unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(20), || {
            engine.active().generation == restored + 1
        }),
        "timed out waiting for the watcher to load the changed file"
    );
}
