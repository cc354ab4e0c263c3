//! Unit tests of the cache on the memory registry and native test policies, with Tokio's
//! paused clock so that TTLs, retry intervals and waits are exact and instant.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::{Instant, advance, sleep, sleep_until};

use super::*;
use crate::decision::{
    Decided, EvictionContext, EvictionDecision, LookupContext, LookupDecision, PolicyInfo,
    RejectionKind, Settings,
};
use crate::model::{Node, Service};
use crate::registry::memory::MemoryRegistry;
use crate::registry::{ErrorKind, Registry};

/// The fixtures' maintenance tick. On the paused clock a test that sleeps lets every task
/// that is ready run before time moves, so sleeping one tick past the moment something is due
/// (a watch event: now; a batch of removals: `eviction-batch` from now) awaits it exactly,
/// without polling.
const TICK: Duration = Duration::from_millis(10);

const SETTINGS: Settings = Settings {
    ttl: Duration::from_secs(60),
    min_retry_interval: Duration::from_secs(5),
    max_wait: Duration::from_secs(3),
    negative_ttl: Duration::from_secs(5),
    registry_budget_per_second: 100,
    eviction_window: Duration::from_secs(30),
    max_suspect_hold: Duration::from_secs(300),
    eviction_batch: Duration::from_millis(250),
};

/// A native twin of `policy/default` (and, with `strict`, of `policy/examples/strict`'s
/// guard), recording every eviction context it is asked about.
struct TestPolicy {
    info: Mutex<Arc<PolicyInfo>>,
    strict: AtomicBool,
    /// Always answer refresh-and-wait, as a buggy policy might.
    always_refresh: AtomicBool,
    /// Answer every lookup "not found", as a policy hiding services would.
    hide: AtomicBool,
    guards: Mutex<Vec<(u32, u32, u32, EvictionDecision)>>,
}

impl TestPolicy {
    fn new(settings: Settings) -> Arc<Self> {
        Arc::new(TestPolicy {
            info: Mutex::new(Arc::new(PolicyInfo {
                generation: 1,
                digest: "0".repeat(64),
                source: "test".into(),
                loaded_at: SystemTime::now(),
                settings,
            })),
            strict: AtomicBool::new(false),
            always_refresh: AtomicBool::new(false),
            hide: AtomicBool::new(false),
            guards: Mutex::new(Vec::new()),
        })
    }

    fn guards(&self) -> Vec<(u32, u32, u32, EvictionDecision)> {
        self.guards.lock().unwrap().clone()
    }
}

impl Decide for TestPolicy {
    fn decide_lookup(&self, c: &LookupContext<'_>) -> Decided<LookupDecision> {
        let policy = self.active();
        let s = policy.settings;
        let ms = |d: Duration| d.as_millis() as u64;
        let decision = if self.hide.load(Ordering::Relaxed) {
            LookupDecision::Reject {
                kind: RejectionKind::NotFound,
                reason: "hidden".into(),
            }
        } else if self.always_refresh.load(Ordering::Relaxed) {
            LookupDecision::RefreshAndWait {
                max_wait_ms: 1_000,
                fallback_to_stale: true,
            }
        } else if !c.cached {
            if c.negative && c.since_refresh_ms.is_some_and(|a| a < ms(s.negative_ttl)) {
                LookupDecision::Reject {
                    kind: RejectionKind::NotFound,
                    reason: "not found".into(),
                }
            } else if c.consecutive_failures > 0
                && c.since_attempt_ms.unwrap_or(u64::MAX) < ms(s.min_retry_interval)
            {
                LookupDecision::Reject {
                    kind: RejectionKind::Unavailable,
                    reason: "registry failing".into(),
                }
            } else {
                LookupDecision::RefreshAndWait {
                    max_wait_ms: ms(s.max_wait) as u32,
                    fallback_to_stale: true,
                }
            }
        } else if c.since_refresh_ms.is_some_and(|a| a < ms(s.ttl)) {
            LookupDecision::ServeCached
        } else {
            LookupDecision::ServeStale { refresh: true }
        };
        Decided { decision, policy }
    }

    fn guard_eviction(&self, c: &EvictionContext<'_>) -> Decided<EvictionDecision> {
        let policy = self.active();
        let hold_ms = policy.settings.max_suspect_hold.as_millis() as u64;
        let healthy = c.health.watch_connected
            && c.health
                .since_last_contact_ms
                .is_some_and(|ms| ms <= 10_000)
            && c.health.since_failure_ms.is_none_or(|ms| ms > 30_000);
        let remaining = f64::from(c.nodes_after) / f64::from(c.nodes_after + c.recent_deletions);
        let decision = if !healthy {
            EvictionDecision::KeepSuspect { hold_ms }
        } else if self.strict.load(Ordering::Relaxed) || c.recent_deletions <= 1 {
            EvictionDecision::Evict
        } else if remaining < 0.85 {
            EvictionDecision::KeepSuspect { hold_ms }
        } else {
            EvictionDecision::Evict
        };
        self.guards.lock().unwrap().push((
            c.nodes_before,
            c.nodes_after,
            c.recent_deletions,
            decision,
        ));
        Decided { decision, policy }
    }

    fn active(&self) -> Arc<PolicyInfo> {
        self.info.lock().unwrap().clone()
    }
}

fn service(name: &str, nodes: &[&str]) -> Service {
    Service {
        name: name.into(),
        version: "1.0".into(),
        nodes: nodes
            .iter()
            .map(|id| Node {
                id: (*id).into(),
                address: format!("10.0.0.1:{}", id.len()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

struct Fixture {
    registry: Arc<MemoryRegistry>,
    policy: Arc<TestPolicy>,
    cache: RegistryCache,
}

fn fixture(settings: Settings) -> Fixture {
    let registry = Arc::new(MemoryRegistry::new());
    let policy = TestPolicy::new(settings);
    let cache = RegistryCache::builder(registry.clone(), policy.clone())
        .tick(TICK)
        .build();
    Fixture {
        registry,
        policy,
        cache,
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_cold_lookups_share_one_registry_request() {
    let f = fixture(SETTINGS);
    f.registry
        .register(&service("svc", &["a", "b"]))
        .await
        .unwrap();
    f.registry.set_latency(Duration::from_millis(100));
    let lookups: Vec<_> = (0..100)
        .map(|_| {
            let cache = f.cache.clone();
            tokio::spawn(async move { cache.lookup("svc").await })
        })
        .collect();
    for lookup in lookups {
        let answer = lookup.await.unwrap().unwrap();
        assert_eq!(answer.source, Source::Registry);
        assert_eq!(answer.node_count(), 2);
    }
    assert_eq!(f.registry.get_service_calls(), 1);
    let stats = f.cache.stats();
    assert_eq!(stats.flights.started, 1);
    assert_eq!(stats.flights.joined, 99);
    assert_eq!(stats.answers.registry, 100);
    // Now cached and fresh: no request at all.
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.source, Source::Fresh);
    assert_eq!(answer.decision, "serve_cached");
    assert_eq!(f.registry.get_service_calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn stale_answers_never_wait_and_refresh_once_per_interval() {
    let f = fixture(SETTINGS);
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    f.cache.lookup("svc").await.unwrap();
    advance(SETTINGS.ttl + Duration::from_secs(1)).await;
    // The registry hangs: every lookup must still be answered at once, stale.
    f.registry.set_latency(Duration::from_secs(3600));
    let start = Instant::now();
    for _ in 0..1000 {
        let answer = f.cache.lookup("svc").await.unwrap();
        assert_eq!(answer.source, Source::Stale);
    }
    assert_eq!(
        Instant::now(),
        start,
        "no lookup waited on the paused clock"
    );
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(f.registry.get_service_calls(), 2, "one background refresh");
    // The refresh times out after the cache's refresh timeout (5 s); within the next retry
    // interval nothing new is sent, after it one more.
    for step in 0..20 {
        advance(Duration::from_millis(500)).await;
        f.cache.lookup("svc").await.unwrap();
        let calls = f.registry.get_service_calls();
        let elapsed = 500 * (step + 1);
        assert!(
            calls <= 2 + elapsed / 5_000,
            "{calls} calls after {elapsed} ms"
        );
    }
    assert!(f.registry.get_service_calls() >= 3, "refreshes resume");
}

#[tokio::test(start_paused = true)]
async fn without_cache_a_down_registry_fails_fast_within_the_interval() {
    let f = fixture(SETTINGS);
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    // Let the watch event go by first, or it would fill the entry behind the test's back.
    sleep(TICK).await;
    assert_eq!(f.cache.stats().watch.ignored, 1);
    f.registry.set_failure(Some(ErrorKind::Unavailable));
    let err = f.cache.lookup("svc").await.unwrap_err();
    assert!(
        matches!(
            err,
            LookupError::Unavailable {
                cause: Some(ErrorKind::Unavailable),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(f.registry.get_service_calls(), 1);
    // Inside the interval: fail fast, no request.
    for _ in 0..10 {
        advance(Duration::from_millis(400)).await;
        let start = Instant::now();
        assert!(f.cache.lookup("svc").await.is_err());
        assert_eq!(Instant::now(), start);
    }
    assert_eq!(f.registry.get_service_calls(), 1);
    // After the interval one request goes through (and succeeds now).
    f.registry.set_failure(None);
    advance(Duration::from_secs(1)).await;
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.source, Source::Registry);
    assert_eq!(f.registry.get_service_calls(), 2);
}

/// A decision's own wait is capped at the settings' `max-wait`, which the operator's envelope
/// bounds (`policy.limits.max_wait`): a policy cannot make one caller wait longer than its
/// settings said, whatever it answers.
#[tokio::test(start_paused = true)]
async fn a_decisions_wait_is_capped_at_the_settings_max_wait() {
    let max_wait = Duration::from_millis(400);
    let f = fixture(Settings {
        max_wait,
        ..SETTINGS
    });
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    f.registry.set_latency(Duration::from_secs(4));
    // It answers refresh-and-wait with a wait of 1 s.
    f.policy.always_refresh.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let _ = f.cache.lookup("svc").await;
    assert_eq!(Instant::now() - start, max_wait);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_refresh_bounds_its_waiters_and_survives_their_drop() {
    let f = fixture(SETTINGS);
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    f.registry.set_latency(Duration::from_secs(4));
    let refresh_started = Instant::now();
    // A waiter dropped early does not cancel the refresh.
    let dropped = {
        let cache = f.cache.clone();
        tokio::spawn(async move { cache.lookup("svc").await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    dropped.abort();
    // The next waiter joins and gives up after max-wait (3 s), not the registry's 4 s.
    let start = Instant::now();
    let err = f.cache.lookup("svc").await.unwrap_err();
    assert_eq!(Instant::now() - start, SETTINGS.max_wait);
    assert!(
        matches!(
            err,
            LookupError::Unavailable {
                cause: Some(ErrorKind::Timeout),
                ..
            }
        ),
        "{err}"
    );
    // Later callers neither queue nor send: the wait already ran out once. (Even one whose
    // policy insists on waiting for a refresh.)
    let start = Instant::now();
    assert!(f.cache.lookup("svc").await.is_err());
    f.policy.always_refresh.store(true, Ordering::Relaxed);
    assert!(f.cache.lookup("svc").await.is_err());
    f.policy.always_refresh.store(false, Ordering::Relaxed);
    assert_eq!(Instant::now(), start);
    let answers = f.cache.stats().answers;
    assert_eq!(
        (
            answers.unavailable_overdue,
            answers.unavailable_rate_limited
        ),
        (1, 0),
        "refused as overdue, not as rate limited"
    );
    // The refresh itself finishes and fills the cache.
    sleep_until(refresh_started + Duration::from_secs(4) + TICK).await;
    assert_eq!(f.cache.stats().get_service.ok, 1);
    assert_eq!(f.registry.get_service_calls(), 1);
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.source, Source::Fresh);
    assert_eq!(f.cache.stats().flights.wait_timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn the_host_enforces_the_retry_interval_whatever_the_policy_says() {
    let f = fixture(SETTINGS);
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    f.policy.always_refresh.store(true, Ordering::Relaxed);
    f.cache.lookup("svc").await.unwrap();
    f.registry.set_failure(Some(ErrorKind::Unavailable));
    for _ in 0..100 {
        advance(Duration::from_millis(100)).await;
        let answer = f.cache.lookup("svc").await.unwrap();
        assert_ne!(answer.source, Source::Registry, "answered from the cache");
    }
    // 10 s: at most one request per 5 s interval after the first.
    assert!(
        f.registry.get_service_calls() <= 3,
        "{}",
        f.registry.get_service_calls()
    );
}

#[tokio::test(start_paused = true)]
async fn distinct_unknown_names_cannot_exceed_the_budget() {
    let f = fixture(Settings {
        registry_budget_per_second: 20,
        ..SETTINGS
    });
    let mut not_found = 0;
    let mut unavailable = 0;
    for i in 0..1000 {
        match f.cache.lookup(&format!("unknown-{i}")).await {
            Err(LookupError::NotFound {
                provenance: Source::Registry,
                ..
            }) => not_found += 1,
            Err(LookupError::Unavailable { .. }) => unavailable += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(f.registry.get_service_calls(), 20);
    assert_eq!((not_found, unavailable), (20, 980));
    assert_eq!(f.cache.stats().answers.unavailable_budget, 980);
    // The negative cache answers the names that were asked, without a request.
    let err = f.cache.lookup("unknown-0").await.unwrap_err();
    assert!(
        matches!(
            err,
            LookupError::NotFound {
                provenance: Source::Negative,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(f.registry.get_service_calls(), 20);
    // Unused entries are swept once they no longer rate-limit nor answer "not found".
    sleep(SETTINGS.min_retry_interval.max(SETTINGS.negative_ttl) + TICK).await;
    assert!(f.cache.is_empty(), "{}", f.cache.len());
}

async fn cached_five(f: &Fixture) {
    f.registry
        .register(&service("svc", &["n1", "n2", "n3", "n4", "n5"]))
        .await
        .unwrap();
    assert_eq!(f.cache.lookup("svc").await.unwrap().node_count(), 5);
    f.cache.inner.health.sampled_view_and_wall_ms();
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_deletions_is_one_guard_call_and_kept_suspect() {
    let f = fixture(SETTINGS);
    cached_five(&f).await;
    for id in ["n1", "n2", "n3", "n4"] {
        f.registry.expire("svc", id);
    }
    sleep(SETTINGS.eviction_batch + TICK).await;
    let hold = SETTINGS.max_suspect_hold.as_millis() as u64;
    assert_eq!(
        f.policy.guards(),
        vec![(5, 1, 4, EvictionDecision::KeepSuspect { hold_ms: hold })]
    );
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.node_count(), 5);
    assert_eq!(answer.suspect_nodes(), ["n1", "n2", "n3", "n4"]);
    assert!(!answer.is_suspect("n5"));
    // A node registered again becomes normal.
    f.registry.register(&service("svc", &["n2"])).await.unwrap();
    sleep(TICK).await;
    assert_eq!(
        f.cache
            .inner
            .entries
            .get("svc")
            .unwrap()
            .view()
            .suspects
            .len(),
        3
    );
    assert_eq!(f.cache.stats().evictions.suspects_restored, 1);
    // The others leave when their hold ends.
    advance(SETTINGS.max_suspect_hold).await;
    sleep(2 * TICK).await;
    assert_eq!(f.cache.inner.entries.get("svc").unwrap().view().nodes, 2);
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.node_ids().collect::<Vec<_>>(), ["n2", "n5"]);
    assert_eq!(f.cache.stats().evictions.suspects_expired, 3);
}

#[tokio::test(start_paused = true)]
async fn a_strict_guard_applies_the_burst() {
    let f = fixture(SETTINGS);
    f.policy.strict.store(true, Ordering::Relaxed);
    cached_five(&f).await;
    for id in ["n1", "n2", "n3", "n4"] {
        f.registry.expire("svc", id);
    }
    sleep(SETTINGS.eviction_batch + TICK).await;
    assert_eq!(f.policy.guards(), vec![(5, 1, 4, EvictionDecision::Evict)]);
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.node_ids().collect::<Vec<_>>(), ["n5"]);
}

#[tokio::test(start_paused = true)]
async fn a_single_deregistration_is_applied_at_once() {
    let f = fixture(SETTINGS);
    cached_five(&f).await;
    f.registry.expire("svc", "n3");
    sleep(SETTINGS.eviction_batch + TICK).await;
    assert_eq!(f.cache.inner.entries.get("svc").unwrap().view().nodes, 4);
    assert_eq!(f.policy.guards(), vec![(5, 4, 1, EvictionDecision::Evict)]);
    assert_eq!(f.registry.get_service_calls(), 1, "no refresh involved");
    assert_eq!(f.cache.node_count(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_single_removal_soon_after_a_registry_failure_is_kept_suspect() {
    let f = fixture(Settings {
        ttl: Duration::from_secs(1),
        min_retry_interval: Duration::from_secs(1),
        ..SETTINGS
    });
    cached_five(&f).await;
    assert_eq!(
        f.cache
            .inner
            .health
            .sampled_view_and_wall_ms()
            .0
            .since_failure_ms,
        None
    );
    // A background refresh fails, as against a frozen etcd.
    f.registry.set_failure(Some(ErrorKind::Timeout));
    advance(Duration::from_secs(2)).await;
    assert_eq!(f.cache.lookup("svc").await.unwrap().source, Source::Stale);
    sleep(TICK).await;
    assert!(
        f.cache
            .inner
            .health
            .sampled_view_and_wall_ms()
            .0
            .since_failure_ms
            .is_some(),
        "the failure is part of the registry's health"
    );
    f.registry.set_failure(None);
    f.registry.expire("svc", "n3");
    sleep(SETTINGS.eviction_batch + TICK).await;
    let hold = SETTINGS.max_suspect_hold.as_millis() as u64;
    assert_eq!(
        f.policy.guards(),
        vec![(5, 4, 1, EvictionDecision::KeepSuspect { hold_ms: hold })]
    );
}

#[tokio::test(start_paused = true)]
async fn suspects_leave_when_a_listing_reconfirms_them_absent_and_the_guard_agrees() {
    let f = fixture(Settings {
        ttl: Duration::from_secs(1),
        min_retry_interval: Duration::from_secs(1),
        ..SETTINGS
    });
    cached_five(&f).await;
    for id in ["n1", "n2", "n3", "n4"] {
        f.registry.expire("svc", id);
    }
    sleep(SETTINGS.eviction_batch + TICK).await;
    let guards = |f: &Fixture| f.policy.guards().len();
    // Within the window the burst still counts: a listing of only n5 asks the guard again,
    // which keeps them (their hold is not extended).
    advance(Duration::from_secs(2)).await;
    assert_eq!(f.cache.lookup("svc").await.unwrap().source, Source::Stale);
    sleep(TICK).await;
    assert_eq!(guards(&f), 2);
    let hold = SETTINGS.max_suspect_hold.as_millis() as u64;
    assert_eq!(
        f.policy.guards()[1],
        (5, 1, 4, EvictionDecision::KeepSuspect { hold_ms: hold })
    );
    assert_eq!(f.cache.stats().evictions.kept_suspect, 4, "counted once");
    assert_eq!(f.cache.inner.entries.get("svc").unwrap().view().nodes, 5);
    // Past the window the burst is over: the next listing's re-confirmation is applied.
    advance(SETTINGS.eviction_window).await;
    assert_eq!(f.cache.lookup("svc").await.unwrap().source, Source::Stale);
    sleep(TICK).await;
    assert_eq!(f.cache.inner.entries.get("svc").unwrap().view().nodes, 1);
    assert_eq!(f.policy.guards()[2], (5, 1, 0, EvictionDecision::Evict));
    assert_eq!(f.cache.stats().evictions.suspects_confirmed_absent, 4);
    assert_eq!(f.cache.stats().evictions.evicted, 0);
}

#[tokio::test(start_paused = true)]
async fn a_watched_registration_appears_without_a_refresh() {
    let f = fixture(SETTINGS);
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    f.cache.lookup("svc").await.unwrap();
    f.registry.register(&service("svc", &["b"])).await.unwrap();
    f.registry
        .register(&service("other", &["x"]))
        .await
        .unwrap();
    sleep(TICK).await;
    assert_eq!(f.cache.inner.entries.get("svc").unwrap().view().nodes, 2);
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.source, Source::Fresh);
    assert_eq!(answer.node_ids().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(f.registry.get_service_calls(), 1);
    assert!(
        f.cache.inner.entries.get("other").is_none(),
        "uncached services are ignored"
    );
    assert_eq!(f.cache.stats().watch.ignored, 1);
}

#[tokio::test(start_paused = true)]
async fn a_not_found_the_policy_decides_is_labelled_as_the_policys() {
    let f = fixture(SETTINGS);
    cached_five(&f).await;
    f.policy.hide.store(true, Ordering::Relaxed);
    let err = f.cache.lookup("svc").await.unwrap_err();
    assert!(
        matches!(
            err,
            LookupError::NotFound {
                provenance: Source::Policy,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(f.cache.stats().answers.not_found_policy, 1);
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_is_served_stale_while_the_registry_is_down() {
    let f = fixture(SETTINGS);
    f.registry
        .register(&service("svc", &["a", "b"]))
        .await
        .unwrap();
    f.cache.lookup("svc").await.unwrap();
    let snapshot = f.cache.export();
    let json = serde_json::to_string(&snapshot).unwrap();
    let snapshot: CacheSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(snapshot.entries.len(), 1);

    let g = fixture(SETTINGS);
    g.registry.set_failure(Some(ErrorKind::Unavailable));
    assert_eq!(g.cache.import(&snapshot), 1);
    // Imported entries are as old as the snapshot says; make it past the TTL.
    advance(SETTINGS.ttl).await;
    let answer = g.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.source, Source::Stale);
    assert_eq!(answer.node_ids().collect::<Vec<_>>(), ["a", "b"]);
}

/// A cached service merges every node's etcd value: its snapshot form is far beyond the size
/// limit of one value, and must still be read back.
#[tokio::test(start_paused = true)]
async fn a_snapshot_of_a_service_larger_than_any_etcd_value_is_read_back() {
    let f = fixture(SETTINGS);
    let ids: Vec<String> = (0..10_000).map(|i| format!("node-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.registry.register(&service("big", &ids)).await.unwrap();
    f.cache.lookup("big").await.unwrap();
    let json = serde_json::to_vec(&f.cache.export()).unwrap();
    assert!(json.len() > crate::model::MAX_VALUE_BYTES);

    let snapshot: CacheSnapshot = serde_json::from_slice(&json).unwrap();
    let g = fixture(SETTINGS);
    g.registry.set_failure(Some(ErrorKind::Unavailable));
    assert_eq!(g.cache.import(&snapshot), 1);
    let answer = g.cache.lookup("big").await.unwrap();
    assert_eq!(answer.node_ids().count(), 10_000);
}

#[tokio::test(start_paused = true)]
async fn answers_carry_the_deciding_generation() {
    let f = fixture(SETTINGS);
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    assert_eq!(f.cache.lookup("svc").await.unwrap().policy.generation, 1);
    let mut next = (*f.policy.active()).clone();
    next.generation = 2;
    *f.policy.info.lock().unwrap() = Arc::new(next);
    assert_eq!(f.cache.lookup("svc").await.unwrap().policy.generation, 2);
    let err = f.cache.lookup("nope").await.unwrap_err();
    assert_eq!(err.policy().generation, 2);
}

/// The memory registry, but `get_service` can panic, or read its listing and only then wait
/// (a slow etcd answer whose data predates what the watch says meanwhile).
struct Scripted {
    inner: Arc<MemoryRegistry>,
    panic: AtomicBool,
    after_read: Mutex<Duration>,
}

#[async_trait::async_trait]
impl Registry for Scripted {
    async fn register_with(
        &self,
        service: &Service,
        takeover: crate::registry::Takeover,
    ) -> Result<crate::registry::Registered, crate::registry::RegistryError> {
        self.inner.register_with(service, takeover).await
    }
    async fn deregister(
        &self,
        service: &str,
        node_id: &str,
    ) -> Result<(), crate::registry::RegistryError> {
        self.inner.deregister(service, node_id).await
    }
    async fn get_service(
        &self,
        name: &str,
    ) -> Result<Vec<Service>, crate::registry::RegistryError> {
        assert!(!self.panic.load(Ordering::Relaxed), "scripted panic");
        let listing = self.inner.get_service(name).await;
        let after_read = *self.after_read.lock().unwrap();
        tokio::time::sleep(after_read).await;
        listing
    }
    async fn list_services(&self) -> Result<Vec<String>, crate::registry::RegistryError> {
        self.inner.list_services().await
    }
    async fn list_all(&self) -> Result<Vec<Service>, crate::registry::RegistryError> {
        self.inner.list_all().await
    }
    async fn verify_credentials(
        &self,
        user: &str,
        password: &str,
    ) -> Result<crate::registry::Verdict, crate::registry::RegistryError> {
        self.inner.verify_credentials(user, password).await
    }
    fn watch(&self) -> tokio::sync::mpsc::Receiver<crate::registry::WatchEvent> {
        self.inner.watch()
    }
    fn health(&self) -> crate::registry::Health {
        self.inner.health()
    }
    fn registrations(&self) -> Vec<Service> {
        self.inner.registrations()
    }
    fn conflicts(&self) -> Vec<crate::registry::Conflict> {
        self.inner.conflicts()
    }
    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

fn scripted_fixture(settings: Settings) -> (Fixture, Arc<Scripted>) {
    let registry = Arc::new(MemoryRegistry::new());
    let scripted = Arc::new(Scripted {
        inner: registry.clone(),
        panic: AtomicBool::new(false),
        after_read: Mutex::new(Duration::ZERO),
    });
    let policy = TestPolicy::new(settings);
    let cache = RegistryCache::builder(scripted.clone(), policy.clone())
        .tick(TICK)
        .build();
    let fixture = Fixture {
        registry,
        policy,
        cache,
    };
    (fixture, scripted)
}

#[tokio::test(start_paused = true)]
async fn a_panicking_refresh_does_not_leave_its_entry_in_flight() {
    let (f, scripted) = scripted_fixture(SETTINGS);
    f.registry.register(&service("svc", &["a"])).await.unwrap();
    // Let the watch event go by first, or it would fill the entry behind the test's back.
    sleep(TICK).await;
    assert_eq!(f.cache.stats().watch.ignored, 1);
    scripted.panic.store(true, Ordering::Relaxed);
    let err = f.cache.lookup("svc").await.unwrap_err();
    assert!(matches!(err, LookupError::Unavailable { .. }), "{err}");
    let view = f.cache.inner.entries.get("svc").unwrap().view();
    assert!(!view.in_flight, "the flight ended with its task");
    assert_eq!(
        view.consecutive_failures, 1,
        "and counts as a failed attempt"
    );
    // After the retry interval the next refresh goes through.
    scripted.panic.store(false, Ordering::Relaxed);
    advance(SETTINGS.min_retry_interval).await;
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.source, Source::Registry);
    assert_eq!(f.cache.stats().flights.started, 2);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_read_before_a_watch_delete_does_not_bring_the_node_back() {
    let (f, scripted) = scripted_fixture(SETTINGS);
    cached_five(&f).await;
    advance(SETTINGS.ttl).await;
    // A stale lookup starts a refresh whose listing (all five) is read now and applied 1 s
    // later; meanwhile n5 deregisters and the watch removes it.
    *scripted.after_read.lock().unwrap() = Duration::from_secs(1);
    assert_eq!(f.cache.lookup("svc").await.unwrap().source, Source::Stale);
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert_eq!(f.registry.get_service_calls(), 2, "the listing was read");
    f.registry.expire("svc", "n5");
    // The watch's removal is judged when its batch closes, before the listing is applied.
    sleep(SETTINGS.eviction_batch + TICK).await;
    assert_eq!(f.cache.stats().evictions.evicted, 1);
    sleep(Duration::from_secs(1)).await;
    assert_eq!(f.cache.stats().get_service.ok, 2, "the refresh ended");
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(
        answer.node_ids().collect::<Vec<_>>(),
        ["n1", "n2", "n3", "n4"]
    );
}

#[tokio::test(start_paused = true)]
async fn the_change_feed_sends_a_guarded_removal_only_when_the_guard_lets_the_node_go() {
    let registry = Arc::new(MemoryRegistry::new());
    let policy = TestPolicy::new(SETTINGS);
    let cache = RegistryCache::builder(registry.clone(), policy.clone())
        .tick(TICK)
        .record_changes(true)
        .build();
    let f = Fixture {
        registry,
        policy,
        cache,
    };
    cached_five(&f).await;
    let changes = f.cache.changes().unwrap().clone();
    let mut live = changes.subscribe(0).unwrap().live;
    let mut received = Vec::new();
    let mut drain = |live: &mut tokio::sync::broadcast::Receiver<crate::cache::FeedItem>| {
        while let Ok(crate::cache::FeedItem::Change(c)) = live.try_recv() {
            received.push((c.node_id().to_string(), c.current.is_some(), c.revision));
        }
        std::mem::take(&mut received)
    };
    for id in ["n1", "n2", "n3", "n4"] {
        f.registry.expire("svc", id);
    }
    sleep(SETTINGS.eviction_batch + TICK).await;
    assert_eq!(
        f.cache.lookup("svc").await.unwrap().suspect_nodes().len(),
        4
    );
    assert_eq!(
        drain(&mut live),
        [],
        "suspects are not removed from the feed"
    );
    // A service nobody looked up passes through as the registry said.
    f.registry
        .register(&service("other", &["o1"]))
        .await
        .unwrap();
    f.registry.expire("other", "o1");
    sleep(TICK).await;
    let other = drain(&mut live);
    assert_eq!(
        other
            .iter()
            .map(|(id, put, _)| (id.as_str(), *put))
            .collect::<Vec<_>>(),
        [("o1", true), ("o1", false)]
    );
    advance(SETTINGS.max_suspect_hold).await;
    sleep(2 * TICK).await;
    let released = drain(&mut live);
    assert_eq!(
        released
            .iter()
            .map(|(id, put, _)| (id.as_str(), *put))
            .collect::<Vec<_>>(),
        [("n1", false), ("n2", false), ("n3", false), ("n4", false)],
        "the deletes come when the hold ends"
    );
    let revisions: Vec<i64> = other.iter().chain(&released).map(|c| c.2).collect();
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "{revisions:?}");
    // A client resuming from the first of them gets them again.
    let resumed = changes.subscribe(revisions[0]).unwrap().backlog;
    assert_eq!(resumed.len(), revisions.len());
}

#[tokio::test(start_paused = true)]
async fn nodes_this_host_deregistered_leave_at_once_without_the_guard() {
    let f = fixture(SETTINGS);
    cached_five(&f).await;
    for id in ["n1", "n2", "n3", "n4"] {
        f.registry.expire("svc", id);
        f.cache.forget_deregistered("svc", id);
    }
    sleep(SETTINGS.eviction_batch + TICK).await;
    let answer = f.cache.lookup("svc").await.unwrap();
    assert_eq!(answer.node_ids().collect::<Vec<_>>(), ["n5"]);
    assert!(answer.suspect_nodes().is_empty());
    assert_eq!(
        f.policy.guards(),
        vec![],
        "no removal left for the guard to judge"
    );
}
