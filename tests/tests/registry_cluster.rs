//! The etcd registry on a three-member cluster: one member killed, then (after it is back) the
//! leader killed. Registration and reads must see zero failed calls at the registry interface,
//! and the dead member must be used again once it is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use regcache::registry::etcd::EtcdRegistry;
use regcache::registry::{Registered, Registry, RegistryError};
use regcache_tests::etcd::{EtcdCluster, wait_for};
use regcache_tests::registry::{fast_config, init_logging, service};

/// Registers and reads in a loop until stopped; returns (calls, failures).
fn workload(
    registry: Arc<EtcdRegistry>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<RegistryError>)> {
    tokio::spawn(async move {
        let (mut calls, mut failures) = (0, Vec::new());
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let results = [
                registry.get_service("a").await.map(|_| ()),
                registry
                    .register(&service("load", "1", &format!("n{}", i % 5)))
                    .await
                    .and_then(Registered::written),
                registry.list_services().await.map(|_| ()),
            ];
            for result in results {
                calls += 1;
                if let Err(e) = result {
                    failures.push(e);
                }
            }
        }
        (calls, failures)
    })
}

async fn run_through(
    registry: &Arc<EtcdRegistry>,
    fault: impl AsyncFnOnce(),
    after: Duration,
) -> (usize, Vec<RegistryError>) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = workload(registry.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    fault().await;
    tokio::time::sleep(after).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_then_a_killed_leader_fail_no_call() {
    init_logging();
    let etcd = EtcdCluster::start(3).await.unwrap();
    let config = fast_config(&etcd)
        .lease_ttl(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(5));
    let registry = Arc::new(EtcdRegistry::connect(config).await.unwrap());
    registry.register(&service("a", "1", "a1")).await.unwrap();
    let etcd = Arc::new(tokio::sync::Mutex::new(etcd));

    // A follower dies.
    let leader = etcd.lock().await.leader().unwrap();
    let follower = (leader + 1) % 3;
    let (calls, failures) = run_through(
        &registry,
        async || etcd.lock().await.kill(follower).unwrap(),
        Duration::from_secs(3),
    )
    .await;
    println!(
        "follower {follower} killed: {calls} calls, {} failed, stats {:?}",
        failures.len(),
        registry.stats()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(registry.stats().endpoint_removals >= 1);

    // It comes back, and is used again.
    etcd.lock().await.restart(follower).await.unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || async {
            registry.stats().endpoint_additions >= 1
        })
        .await,
        "the member went back into rotation"
    );
    let ranges_before = etcd
        .lock()
        .await
        .grpc_started(follower, "etcdserverpb.KV", "Range")
        .unwrap();
    for _ in 0..30 {
        registry.get_service("a").await.unwrap();
    }
    let ranges_after = etcd
        .lock()
        .await
        .grpc_started(follower, "etcdserverpb.KV", "Range")
        .unwrap();
    println!(
        "restarted member served {} of 30 reads",
        ranges_after - ranges_before
    );
    assert!(
        ranges_after > ranges_before,
        "the restarted member serves reads again"
    );

    // Now the leader dies: an election, "leader changed", and still no failed call.
    let leader = etcd.lock().await.leader().unwrap();
    let (calls, failures) = run_through(
        &registry,
        async || etcd.lock().await.kill(leader).unwrap(),
        Duration::from_secs(4),
    )
    .await;
    println!(
        "leader {leader} killed: {calls} calls, {} failed, stats {:?}",
        failures.len(),
        registry.stats()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        registry.get_service("a").await.unwrap()[0].nodes[0].id,
        "a1"
    );
    assert_eq!(
        registry.get_service("load").await.unwrap()[0].nodes.len(),
        5
    );
}
