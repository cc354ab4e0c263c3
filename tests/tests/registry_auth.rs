//! The etcd registry with authentication on: Authenticate and LeaseKeepAlive counts measured
//! from etcd's own metrics, token expiry, and recovery after an etcd restart (which forgets
//! every token).

use std::time::Duration;

use regcache::registry::etcd::EtcdRegistry;
use regcache::registry::{Registry, WatchEvent};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::{View, fast_config, init_logging, register_now, service};
use regcache_tests::wait::eventually;

const AUTH: &str = "etcdserverpb.Auth";
const LEASE: &str = "etcdserverpb.Lease";
const WATCH: &str = "etcdserverpb.Watch";
const KV: &str = "etcdserverpb.KV";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authenticate_per_connect_and_restart_and_one_keepalive_stream_per_lease() {
    init_logging();
    let mut etcd = EtcdCluster::start(1).await.unwrap();
    etcd.enable_auth("root", "pw").await.unwrap();
    let auth_before = etcd.grpc_started(0, AUTH, "Authenticate").unwrap();

    // Lease TTL 3 s renewed every second: the 6 s below carry about six heartbeats.
    let registry = EtcdRegistry::connect(fast_config(&etcd).user("root", "pw"))
        .await
        .unwrap();
    let mut rx = registry.watch();
    register_now(&registry, &service("a", "1", "a1")).await;
    register_now(&registry, &service("b", "1", "b1")).await;
    for _ in 0..20 {
        registry.get_service("a").await.unwrap();
    }
    let heartbeats_window = Duration::from_secs(6);
    tokio::time::sleep(heartbeats_window).await; // time must pass for heartbeats to happen
    registry.get_service("b").await.unwrap();

    let authenticates = etcd.grpc_started(0, AUTH, "Authenticate").unwrap() - auth_before;
    let keepalive_streams = etcd.grpc_started(0, LEASE, "LeaseKeepAlive").unwrap();
    let grants = etcd.grpc_started(0, LEASE, "LeaseGrant").unwrap();
    let watches = etcd.grpc_started(0, WATCH, "Watch").unwrap();
    let ranges = etcd.grpc_started(0, KV, "Range").unwrap();
    println!(
        "before restart: Authenticate {authenticates}, LeaseKeepAlive streams {keepalive_streams}, \
         LeaseGrant {grants}, Watch {watches}, Range {ranges}"
    );
    assert_eq!(
        authenticates, 1,
        "one Authenticate for the connect, none per call or heartbeat"
    );
    assert_eq!(
        keepalive_streams, 1,
        "one keep-alive stream for the one lease"
    );
    assert_eq!(grants, 1);
    assert_eq!(watches, 1);
    assert_eq!(registry.stats().keepalive_stream_starts, 1);

    // A restart forgets every token: one more Authenticate (shared by the watch, the reads and
    // the registration), a new keep-alive stream and watch, and everything works again.
    etcd.restart(0).await.unwrap();
    let mut view = View::default();
    let recovered = eventually(Duration::from_secs(10), || async {
        registry.get_service("a").await.is_ok() && registry.health().watch_connected
    })
    .await;
    assert!(recovered, "reads and watch recover after the restart");
    for _ in 0..10 {
        registry.get_service("b").await.unwrap();
    }
    register_now(&registry, &service("c", "1", "c1")).await;
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.events.iter().any(
            |e| matches!(e, WatchEvent::Put { service, .. } if service.name == "c")
        ))
        .await,
        "the watch delivers after the restart"
    );
    tokio::time::sleep(Duration::from_secs(3)).await; // more heartbeats on the new stream
    registry.get_service("c").await.unwrap();
    let authenticates = etcd.grpc_started(0, AUTH, "Authenticate").unwrap();
    let keepalive_streams = etcd.grpc_started(0, LEASE, "LeaseKeepAlive").unwrap();
    let grants = etcd.grpc_started(0, LEASE, "LeaseGrant").unwrap();
    println!(
        "after restart (counters restart with etcd): Authenticate {authenticates}, \
         LeaseKeepAlive streams {keepalive_streams}, LeaseGrant {grants}, stats {:?}",
        registry.stats()
    );
    // One re-authentication is shared by the calls that meet the forgotten token together; a
    // call that set out with the old token just before the first re-authentication finished
    // makes a second one (seen once on a loaded machine). Per call or heartbeat would be 10+.
    assert!(
        (1..=2).contains(&authenticates),
        "Authenticate after the restart: {authenticates}"
    );
    // One stream for the lease, not one per heartbeat (that would be 4 or more here). Right
    // after a restart the first open can time out while etcd finishes starting, so a second
    // attempt is allowed.
    assert!(
        (1..=2).contains(&keepalive_streams),
        "keep-alive streams after the restart: {keepalive_streams}"
    );
    assert_eq!(grants, 0, "the lease survived the restart: no re-grant");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refreshed_for_registration_reads_and_watches() {
    init_logging();
    // Tokens die after 2 s without token-checked traffic; keep-alives do not extend them.
    let mut etcd = EtcdCluster::builder()
        .auth_token_ttl(2)
        .start()
        .await
        .unwrap();
    etcd.enable_auth("root", "pw").await.unwrap();
    let registry = EtcdRegistry::connect(fast_config(&etcd).user("root", "pw"))
        .await
        .unwrap();
    let mut rx = registry.watch();
    let mut view = View::default();
    register_now(&registry, &service("a", "1", "a1")).await;
    let auth_at_start = etcd.grpc_started(0, AUTH, "Authenticate").unwrap();

    // Idle past the token TTL (only heartbeats flow), then use everything again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    registry.get_service("a").await.unwrap();
    register_now(&registry, &service("b", "1", "b1")).await;
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 2)
            .await,
        "the watch still delivers: {:?}",
        view.nodes.keys()
    );
    let refreshed = etcd.grpc_started(0, AUTH, "Authenticate").unwrap() - auth_at_start;
    println!("Authenticate calls after one token expiry: {refreshed}");
    assert_eq!(
        refreshed, 1,
        "one refresh for the expiry, shared by every call"
    );

    // After a restart, the re-created watch first meets an invalid token (cancelled) and is
    // re-created after a refresh; the lease and its keys are still there.
    etcd.restart(0).await.unwrap();
    etcd.etcdctl(
        Some(("root", "pw")),
        &[
            "put",
            "/micro/registry/z/z1",
            &String::from_utf8(service("z", "1", "z1").encode()).unwrap(),
        ],
    )
    .unwrap();
    assert!(
        view.eventually(&mut rx, Duration::from_secs(10), |v| v.nodes.len() == 3)
            .await,
        "the watch resumes after the restart: {:?}",
        view.nodes.keys()
    );
    tokio::time::sleep(Duration::from_secs(4)).await; // and the token expires again
    assert_eq!(
        registry.get_service("a").await.unwrap()[0].nodes[0].id,
        "a1"
    );
    assert_eq!(
        registry.get_service("b").await.unwrap()[0].nodes[0].id,
        "b1"
    );
    register_now(&registry, &service("d", "1", "d1")).await;
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 4)
            .await,
        "the watch shows 4 nodes: {:?}",
        view.nodes.keys()
    );
    assert!(registry.health().watch_connected);
    println!("stats: {:?}", registry.stats());
    registry.shutdown().await;
}
