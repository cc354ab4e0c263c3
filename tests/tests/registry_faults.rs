//! The etcd registry through etcd's faults: frozen (SIGSTOP) past the lease TTL, killed and
//! restarted on its data, and compacted past the watch's revision.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use regcache::model::Service;
use regcache::registry::etcd::{EtcdConfig, EtcdRegistry};
use regcache::registry::{ErrorKind, Registered, Registry, WatchEvent};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::proxy::TcpProxy;
use regcache_tests::registry::{
    View, all_registered, etcd_view, fast_config, init_logging, raw_client, register_now, service,
};
use regcache_tests::wait::eventually;

const PREFIX: &str = "/micro/registry/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_lease_ttl_bounds_every_call_and_keys_return_within_a_second() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let timeout = Duration::from_secs(1);
    let config = fast_config(&etcd).request_timeout(timeout);
    let registry = EtcdRegistry::connect(config).await.unwrap();
    register_now(&registry, &service("a", "1", "a1")).await;
    register_now(&registry, &service("b", "1", "b1")).await;
    let mut raw = raw_client(&etcd, None).await;
    assert!(all_registered(&mut raw, &registry).await);
    let lease_before = registry.lease_id();

    etcd.stop(0).unwrap();
    let stopped = Instant::now();
    // Every call gives up by its timeout, however long etcd stays frozen.
    let slack = Duration::from_millis(300);
    let started = Instant::now();
    assert!(registry.get_service("a").await.is_err());
    assert!(
        started.elapsed() < timeout + slack,
        "get took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert!(
        matches!(
            registry.register(&service("c", "1", "c1")).await,
            Ok(Registered::Later(_))
        ),
        "kept, to be written once etcd answers"
    );
    assert!(
        started.elapsed() < timeout + slack,
        "register took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    // Answered from the watch's mirror while the watch still looks connected, else an error.
    let _ = registry.list_services().await;
    assert!(
        started.elapsed() < timeout + slack,
        "list took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert!(registry.deregister("b", "b1").await.is_err());
    assert!(
        started.elapsed() < timeout + slack,
        "deregister took {:?}",
        started.elapsed()
    );
    assert!(
        registry.registrations().iter().any(|s| s.name == "b"),
        "a deregistration that failed leaves the node registered (and kept alive)"
    );
    assert!(!registry.health().watch_connected || stopped.elapsed() < Duration::from_secs(15));

    // Frozen well past the 3 s TTL: etcd expires the lease as soon as it runs again.
    let ttl = Duration::from_secs(3);
    tokio::time::sleep((ttl + Duration::from_secs(2)).saturating_sub(stopped.elapsed())).await;
    etcd.cont(0).unwrap();
    let resumed = Instant::now();
    let mut answering = None;
    let mut restored = None;
    while resumed.elapsed() < Duration::from_secs(10) {
        if raw.get("probe", None).await.is_ok() && answering.is_none() {
            answering = Some(resumed.elapsed());
        }
        if answering.is_some() && all_registered(&mut raw, &registry).await {
            restored = Some(resumed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (answering, restored) = (answering.unwrap(), restored.expect("keys restored"));
    println!(
        "etcd answered {answering:?} after SIGCONT, every key back on a live lease {restored:?} \
         after; lease {lease_before:?} -> {:?}; stats {:?}",
        registry.lease_id(),
        registry.stats()
    );
    assert!(
        restored - answering < Duration::from_secs(1),
        "keys back {restored:?}, etcd answered {answering:?}"
    );
    assert_eq!(
        registry.registrations().len(),
        3,
        "a1, b1 and c1 (registered while frozen)"
    );
    registry.get_service("c").await.unwrap();
}

/// A deregistration that fails while etcd is frozen leaves the node registered, on the live
/// lease, and a retry once etcd is back removes it for good. (It used to be forgotten first:
/// the retry answered NotFound and the key lived on under the renewed lease until exit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deregistration_can_be_retried_and_the_key_goes() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let config = fast_config(&etcd).request_timeout(Duration::from_millis(500));
    let registry = EtcdRegistry::connect(config).await.unwrap();
    register_now(&registry, &service("a", "1", "a1")).await;
    register_now(&registry, &service("b", "1", "b1")).await;
    let key = registry.node_key("a", "a1");

    etcd.stop(0).unwrap();
    let err = registry.deregister("a", "a1").await.unwrap_err();
    etcd.cont(0).unwrap();
    println!("deregister while frozen: {err}");
    assert_ne!(err.kind, ErrorKind::NotFound);
    assert_eq!(registry.registrations().len(), 2, "a1 is still ours");

    // etcd is back. The frozen delete may still have landed when etcd woke up; the key is
    // ours, so the registry puts it back: either way it ends up on the registry's lease.
    let mut raw = raw_client(&etcd, None).await;
    let on_lease = eventually(Duration::from_secs(5), || {
        let mut raw = raw.clone();
        let (key, lease) = (key.clone(), registry.lease_id());
        async move {
            let resp = raw.get(key, None).await.unwrap();
            resp.kvs().first().map(|kv| kv.lease()) == lease
        }
    })
    .await;
    assert!(on_lease, "a1 is registered on the live lease again");
    let retried = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match registry.deregister("a", "a1").await {
                Ok(()) => return,
                Err(e) => {
                    assert_ne!(
                        e.kind,
                        ErrorKind::NotFound,
                        "the retry must not be refused: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    assert!(retried.is_ok(), "the retried deregistration succeeded");
    assert_eq!(registry.registrations().len(), 1);
    // Gone, and nothing puts it back: wait past a lease TTL of renewals and repairs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(raw.get(key, None).await.unwrap().kvs().is_empty());
    assert!(all_registered(&mut raw, &registry).await, "b1 unaffected");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_resumes_the_watch_without_losing_or_duplicating_an_event() {
    init_logging();
    let mut etcd = EtcdCluster::start(1).await.unwrap();
    let registry = EtcdRegistry::connect(fast_config(&etcd)).await.unwrap();
    let mut rx = registry.watch();
    let mut view = View::default();
    register_now(&registry, &service("a", "1", "a1")).await;
    let mut raw = raw_client(&etcd, None).await;
    for i in 0..10 {
        let s = service("w", "1", &format!("w{i}"));
        raw.put(format!("{PREFIX}w/w{i}"), s.encode(), None)
            .await
            .unwrap();
    }
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 11)
            .await,
        "the watch shows 11 nodes: {:?}",
        view.nodes.keys()
    );
    let start_revision = match &view.events[0] {
        WatchEvent::Resync { revision, .. } => *revision,
        other => panic!("first event {other:?}"),
    };
    let lease = registry.lease_id();

    etcd.kill(0).unwrap();
    let started = Instant::now();
    assert!(
        registry.get_service("a").await.is_err(),
        "fails while etcd is down"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    etcd.restart(0).await.unwrap();
    // Write a burst at once, most likely before the registry's watch is back: it must resume
    // from the last revision it saw, not from now.
    let mut raw = raw_client(&etcd, None).await;
    for i in 10..30 {
        let s = service("w", "1", &format!("w{i}"));
        raw.put(format!("{PREFIX}w/w{i}"), s.encode(), None)
            .await
            .unwrap();
    }
    raw.delete(format!("{PREFIX}w/w0"), None).await.unwrap();
    assert!(
        view.eventually(&mut rx, Duration::from_secs(10), |v| v.nodes.len() == 30)
            .await,
        "{} nodes",
        view.nodes.len()
    );

    // etcd's own history since the registry's first revision is the truth.
    let (_, now) = etcd_view(&mut raw, PREFIX).await;
    let mut truth = Vec::new();
    let mut history = raw
        .watch(
            PREFIX,
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_start_revision(start_revision + 1),
            ),
        )
        .await
        .unwrap();
    let mut last = start_revision;
    while last < now {
        let resp = history.message().await.unwrap().unwrap();
        for event in resp.events() {
            let kv = event.kv().unwrap();
            last = kv.mod_revision();
            let (kind, source) = match event.event_type() {
                etcd_client::EventType::Put => ("put", kv.value()),
                etcd_client::EventType::Delete => ("delete", event.prev_kv().unwrap().value()),
            };
            let s = Service::decode(source).unwrap();
            truth.push((
                kind,
                s.name.clone(),
                s.nodes[0].id.clone(),
                kv.mod_revision(),
            ));
        }
    }
    let seen: Vec<(&str, String, String, i64)> = view.events[1..]
        .iter()
        .map(|e| match e {
            WatchEvent::Put { service, revision } => (
                "put",
                service.name.clone(),
                service.nodes[0].id.clone(),
                *revision,
            ),
            WatchEvent::Delete {
                service,
                node_id,
                revision,
                ..
            } => ("delete", service.clone(), node_id.clone(), *revision),
            WatchEvent::Resync { .. } => panic!("no resync expected: nothing was compacted"),
        })
        .collect();
    assert_eq!(seen, truth, "every event exactly once, in order");
    let stats = registry.stats();
    println!("events: {}, stats {stats:?}", seen.len());
    assert!(stats.watch_restarts >= 1, "the watch was re-created");
    assert!(
        stats.keepalive_stream_starts >= 2,
        "the keep-alive stream was re-created"
    );
    assert_eq!(registry.lease_id(), lease, "the lease survived the restart");
    assert!(all_registered(&mut raw, &registry).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cut_off_through_a_compaction_relists_and_matches_etcd() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let proxy = TcpProxy::start(etcd.endpoint(0).trim_start_matches("http://"))
        .await
        .unwrap();
    let config = EtcdConfig::new([proxy.url()])
        .lease_ttl(Duration::from_secs(10))
        .request_timeout(Duration::from_secs(2))
        .retry_backoff_max(Duration::from_millis(200));
    let registry = EtcdRegistry::connect(config).await.unwrap();
    let mut rx = registry.watch();
    let mut view = View::default();
    register_now(&registry, &service("a", "1", "a1")).await;
    let mut raw = raw_client(&etcd, None).await;
    let put = |i: usize| {
        (
            format!("{PREFIX}w/w{i}"),
            service("w", "1", &format!("w{i}")).encode(),
        )
    };
    for i in 0..5 {
        let (k, v) = put(i);
        raw.put(k, v, None).await.unwrap();
    }
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 6)
            .await,
        "the watch shows 6 nodes: {:?}",
        view.nodes.keys()
    );

    // Cut the registry off, change things and compact past the revision its watch stopped at.
    proxy.cut().await;
    for i in 5..10 {
        let (k, v) = put(i);
        raw.put(k, v, None).await.unwrap();
    }
    raw.delete(format!("{PREFIX}w/w0"), None).await.unwrap();
    raw.put(format!("{PREFIX}w/w1"), "garbage", None)
        .await
        .unwrap();
    let (truth, revision) = etcd_view(&mut raw, PREFIX).await;
    raw.compact(revision, None).await.unwrap();
    proxy.heal();

    let same = |v: &View| v.nodes == truth;
    assert!(
        view.eventually(&mut rx, Duration::from_secs(10), same)
            .await,
        "view {:?}\netcd {:?}",
        view.nodes.keys(),
        truth.keys()
    );
    assert_eq!(registry.stats().resyncs, 1, "{:?}", registry.stats());
    assert_eq!(
        view.resyncs, 2,
        "the first snapshot and the one after the compaction"
    );

    // And it continues from there.
    let (k, v) = put(42);
    raw.put(k, v, None).await.unwrap();
    raw.delete(format!("{PREFIX}w/w2"), None).await.unwrap();
    let (truth, _) = etcd_view(&mut raw, PREFIX).await;
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes == truth)
            .await,
        "the watch shows etcd's nodes: {:?}\netcd {:?}",
        view.nodes.keys(),
        truth.keys()
    );
    let names: BTreeMap<String, usize> =
        view.nodes.keys().fold(BTreeMap::new(), |mut m, (s, _)| {
            *m.entry(s.clone()).or_default() += 1;
            m
        });
    assert_eq!(
        names,
        BTreeMap::from([("a".to_string(), 1), ("w".to_string(), 8)])
    );
}
