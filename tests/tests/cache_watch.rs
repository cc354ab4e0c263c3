//! The cache's watch path against a real etcd: eviction guards on mass lease revocation, on
//! single deregistrations and on leases a frozen etcd expired, watch-driven updates, policy
//! swaps between lookups, and a stress test of lookups, watch events and swaps interleaving.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use regcache::cache::{LookupError, RegistryCache, Source};
use regcache::registry::Registry;
use regcache_tests::cache::{cache, engine, etcd_with_greeter, registry, registry_with, spec};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::{fast_config, init_logging, raw_client, register_now, service};
use regcache_tests::wait::eventually;

const PREFIX: &str = "/micro/registry/";

/// How long a change in etcd may take to reach a cache's entry.
const SETTLE: Duration = Duration::from_secs(5);

/// Puts node `id` of `name` under its own lease, as a separate pod would; returns the lease.
async fn put_with_lease(client: &mut etcd_client::Client, name: &str, id: &str) -> i64 {
    put_with_lease_ttl(client, name, id, 60).await
}

/// [`put_with_lease`] with a lease of `ttl` seconds.
async fn put_with_lease_ttl(
    client: &mut etcd_client::Client,
    name: &str,
    id: &str,
    ttl: i64,
) -> i64 {
    let lease = client.lease_grant(ttl, None).await.unwrap().id();
    let value = service(name, "1.0", id).encode();
    client
        .put(
            format!("{PREFIX}{name}/{id}"),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    lease
}

async fn node_ids(cache: &RegistryCache, name: &str) -> (Vec<String>, Vec<String>) {
    let answer = cache.lookup(name).await.expect("answered");
    (
        answer.node_ids().map(str::to_string).collect(),
        answer.suspect_nodes().to_vec(),
    )
}

/// Whether `name`'s nodes in `cache` are `expected.0`, of which `expected.1` are suspect.
async fn has_nodes(cache: &RegistryCache, name: &str, expected: (&[&str], &[&str])) -> bool {
    let (nodes, suspects) = node_ids(cache, name).await;
    nodes == expected.0 && suspects == expected.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_four_of_five_leases_is_kept_by_default_and_applied_by_strict() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let mut client = raw_client(&etcd, None).await;
    let mut leases = Vec::new();
    for id in ["n1", "n2", "n3", "n4", "n5"] {
        leases.push(put_with_lease(&mut client, "svc", id).await);
    }
    for id in ["s1", "s2", "s3"] {
        put_with_lease(&mut client, "solo", id).await;
    }
    let default = cache(registry(&etcd).await, &engine(spec("default", &[])));
    let strict = cache(registry(&etcd).await, &engine(spec("strict", &[])));
    let all = ["n1", "n2", "n3", "n4", "n5"];
    for c in [&default, &strict] {
        assert_eq!(node_ids(c, "svc").await.0, all);
        assert_eq!(node_ids(c, "solo").await.0, ["s1", "s2", "s3"]);
    }

    // Four pods' leases revoked at once: one burst.
    let revokes: Vec<_> = leases[..4]
        .iter()
        .map(|&lease| {
            let mut client = client.clone();
            tokio::spawn(async move { client.lease_revoke(lease).await.unwrap() })
        })
        .collect();
    for revoke in revokes {
        revoke.await.unwrap();
    }
    assert!(
        eventually(SETTLE, || {
            has_nodes(&default, "svc", (&all, &["n1", "n2", "n3", "n4"]))
        })
        .await,
        "default keeps all five, four suspect: {:?}",
        node_ids(&default, "svc").await
    );
    assert!(
        eventually(SETTLE, || has_nodes(&strict, "svc", (&["n5"], &[]))).await,
        "strict keeps one: {:?}",
        node_ids(&strict, "svc").await
    );
    assert_eq!(
        default.stats().evictions.guard_calls,
        1,
        "one burst, one guard call"
    );
    assert_eq!(default.stats().evictions.kept_suspect, 4);
    assert_eq!(strict.stats().evictions.guard_calls, 1);
    assert_eq!(strict.stats().evictions.evicted, 4);

    // A single deregistration is applied at once by both.
    let start = Instant::now();
    client
        .delete(format!("{PREFIX}solo/s2"), None)
        .await
        .unwrap();
    for c in [&default, &strict] {
        assert!(
            eventually(SETTLE, || has_nodes(c, "solo", (&["s1", "s3"], &[]))).await,
            "solo: {:?}",
            node_ids(c, "solo").await
        );
    }
    println!("single deregistration applied in {:?}", start.elapsed());
    assert_eq!(default.stats().evictions.evicted, 1);
}

/// The incident regcache exists for: etcd frozen past a pod's lease TTL expires the lease the
/// moment it runs again, before the pod's keep-alive gets through, and the pod puts its key back
/// soon after. The default policy keeps the node (suspect) through its grace after the failure
/// the cache saw (its watch broke) instead of emptying the service; `strict` applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expired_by_a_frozen_etcd_is_kept_until_its_owner_puts_it_back() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let mut client = raw_client(&etcd, None).await;
    // Pings notice a frozen etcd within 6 s (the defaults take 15 s; etcd refuses pings more
    // often than every 5 s).
    let watcher = || {
        registry_with(
            fast_config(&etcd).http2_keepalive(Duration::from_secs(5), Duration::from_secs(1)),
        )
    };
    let (default_registry, strict_registry) = (watcher().await, watcher().await);
    let default = cache(default_registry.clone(), &engine(spec("default", &[])));
    let strict = cache(strict_registry.clone(), &engine(spec("strict", &[])));
    // The pod's keep-alives never get through: its lease runs out while etcd is frozen.
    let ttl = Duration::from_secs(4);
    put_with_lease_ttl(&mut client, "greeter", "n1", ttl.as_secs() as i64).await;
    for c in [&default, &strict] {
        assert!(
            eventually(SETTLE, || has_nodes(c, "greeter", (&["n1"], &[]))).await,
            "greeter: {:?}",
            node_ids(c, "greeter").await
        );
    }

    etcd.stop(0).unwrap();
    let stopped = Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || {
            let broken = !default_registry.health().watch_connected
                && !strict_registry.health().watch_connected;
            // Past the TTL as well, so that etcd expires the lease as soon as it runs.
            std::future::ready(broken && stopped.elapsed() > ttl + Duration::from_millis(500))
        })
        .await,
        "the watches notice the frozen etcd"
    );
    etcd.cont(0).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            let c = default.clone();
            async move {
                let (nodes, _) = node_ids(&c, "greeter").await;
                assert_eq!(
                    nodes,
                    ["n1"],
                    "the default policy never empties the service"
                );
                c.stats().evictions.kept_suspect == 1
            }
        })
        .await,
        "the expiry reaches the default policy's guard"
    );
    assert!(
        eventually(SETTLE, || {
            has_nodes(&default, "greeter", (&["n1"], &["n1"]))
        })
        .await,
        "greeter: {:?}",
        node_ids(&default, "greeter").await
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = strict.clone();
            async move { c.stats().evictions.evicted == 1 }
        })
        .await,
        "strict applies the expiry"
    );
    assert!(matches!(
        strict.lookup("greeter").await,
        Err(LookupError::NotFound { .. })
    ));

    // The pod is back: a normal node again.
    put_with_lease_ttl(&mut client, "greeter", "n1", 60).await;
    assert!(
        eventually(SETTLE, || has_nodes(&default, "greeter", (&["n1"], &[]))).await,
        "greeter: {:?}",
        node_ids(&default, "greeter").await
    );
    assert_eq!(default.stats().evictions.evicted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_appears_through_the_watch_without_a_refresh() {
    init_logging();
    let (etcd, publisher) = etcd_with_greeter().await;
    let cache = cache(registry(&etcd).await, &engine(spec("default", &[])));
    assert_eq!(node_ids(&cache, "greeter").await.0, ["n1"]);
    let requests = cache.stats().get_service.total();
    let start = Instant::now();
    register_now(&*publisher, &service("greeter", "1.0", "n2")).await;
    assert!(
        eventually(SETTLE, || {
            has_nodes(&cache, "greeter", (&["n1", "n2"], &[]))
        })
        .await,
        "greeter: {:?}",
        node_ids(&cache, "greeter").await
    );
    println!("watch-driven update visible after {:?}", start.elapsed());
    assert_eq!(cache.stats().get_service.total(), requests, "no refresh");
    assert_eq!(cache.lookup("greeter").await.unwrap().source, Source::Fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_policies_changes_the_very_next_lookup() {
    init_logging();
    let (etcd, _publisher) = etcd_with_greeter().await;
    // Short TTL, long retry interval: the entry is soon past its TTL and cannot be refreshed,
    // which the two policies answer differently (default: serve stale and refresh; strict,
    // past its 1 ms stale bound: refresh and wait, which the host's rate limit answers from
    // the entry the last successful refresh left).
    let common = [("ttl-ms", "100"), ("min-retry-interval-ms", "60000")];
    let engine = engine(spec("default", &common));
    let cache = cache(registry(&etcd).await, &engine);
    assert_eq!(
        cache.lookup("greeter").await.unwrap().source,
        Source::Registry
    );
    let c = cache.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = c.clone();
            async move { c.lookup("greeter").await.unwrap().age.unwrap() > Duration::from_millis(150) }
        })
        .await,
        "the entry ages past 150 ms"
    );
    // Lookups keep running on other tasks through the swaps: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let background: Vec<_> = (0..2)
        .map(|_| {
            let (c, stop, failures) = (cache.clone(), stop.clone(), failures.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if c.lookup("greeter").await.is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                    if n.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                n
            })
        })
        .collect();

    let answer = cache.lookup("greeter").await.unwrap();
    assert_eq!(answer.decision, "serve_stale_and_refresh");
    assert_eq!(answer.policy.generation, 1);
    let strict = [
        ("ttl-ms", "100"),
        ("min-retry-interval-ms", "60000"),
        ("max-stale-ms", "1"),
    ];
    let info = engine.swap(spec("strict", &strict)).unwrap();
    let answer = cache.lookup("greeter").await.unwrap();
    assert_eq!(
        (answer.policy.generation, answer.decision),
        (info.generation, "refresh_and_wait")
    );
    let info = engine.swap(spec("default", &common)).unwrap();
    let answer = cache.lookup("greeter").await.unwrap();
    assert_eq!(
        (answer.policy.generation, answer.decision),
        (info.generation, "serve_stale_and_refresh")
    );
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for task in background {
        total += task.await.unwrap();
    }
    println!("{total} lookups during the swaps");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(total > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lookups_watch_events_and_swaps_interleave_safely() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let publisher = registry(&etcd).await;
    let services: Vec<String> = (0..10).map(|i| format!("svc-{i}")).collect();
    for name in &services {
        register_now(&*publisher, &service(name, "1.0", "base")).await;
    }
    let config = [("ttl-ms", "200"), ("min-retry-interval-ms", "100")];
    let engine = engine(spec("default", &config));
    let cache = cache(registry(&etcd).await, &engine);
    // Build the example policies before the clock starts.
    let _ = spec("strict", &config);
    let run = Duration::from_secs(3);
    let start = Instant::now();
    let failures = Arc::new(AtomicU64::new(0));
    let lookups = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (c, names, failures, lookups) = (
            cache.clone(),
            services.clone(),
            failures.clone(),
            lookups.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while start.elapsed() < run {
                if let Err(e) = c.lookup(&names[i % names.len()]).await {
                    println!("lookup failed: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                lookups.fetch_add(1, Ordering::Relaxed);
                i += 1;
                if i.is_multiple_of(32) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // Watch events: new nodes and updated metadata on every service.
    let (p, names) = (publisher.clone(), services.clone());
    tasks.push(tokio::spawn(async move {
        let mut n = 0;
        while start.elapsed() < run {
            let name = &names[n % names.len()];
            let mut s = service(name, "1.0", &format!("node-{n}"));
            s.nodes[0].metadata.insert("round".into(), n.to_string());
            register_now(&*p, &s).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }));
    // Swaps between the default and strict policies, on a thread of their own (a swap
    // validates the policy synchronously).
    let (e, specs) = (
        engine.clone(),
        [spec("strict", &config), spec("default", &config)],
    );
    tasks.push(tokio::task::spawn_blocking(move || {
        let mut n = 0;
        while start.elapsed() < run {
            e.swap(specs[n % 2].clone()).unwrap();
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }));
    let all = async {
        for task in tasks {
            task.await.unwrap();
        }
    };
    tokio::time::timeout(run + Duration::from_secs(60), all)
        .await
        .expect("no deadlock");
    println!(
        "{} lookups, {} swaps applied",
        lookups.load(Ordering::Relaxed),
        engine.stats().swaps_applied
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(engine.stats().swaps_applied >= 10, "swaps interleaved");
    // No lost update: every service converges to etcd's nodes.
    for name in &services {
        let truth: BTreeSet<String> = publisher
            .get_service(name)
            .await
            .unwrap()
            .iter()
            .flat_map(|s| s.nodes.iter().map(|n| n.id.clone()))
            .collect();
        let c = cache.clone();
        let converged = eventually(Duration::from_secs(5), || {
            let (c, truth) = (c.clone(), truth.clone());
            async move {
                let (nodes, _) = node_ids(&c, name).await;
                nodes.into_iter().collect::<BTreeSet<_>>() == truth
            }
        })
        .await;
        assert!(
            converged,
            "{name}: cache {:?} vs etcd {truth:?}",
            node_ids(&cache, name).await
        );
    }
}
