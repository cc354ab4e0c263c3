//! The etcd registry's basic contract against a real etcd: go-micro layout and interop, the
//! registry calls, the watch, one lease per host, re-put of deleted keys, bad values skipped.

use std::time::{Duration, Instant};

use regcache::model::Service;
use regcache::registry::etcd::EtcdRegistry;
use regcache::registry::{ErrorKind, Registry, WatchEvent};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::{
    View, etcd_view, fast_config, init_logging, raw_client, register_now, service,
};
use regcache_tests::wait::eventually;

const PREFIX: &str = "/micro/registry/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_get_list_watch_deregister_and_shutdown() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let registry = EtcdRegistry::connect(fast_config(&etcd)).await.unwrap();
    let mut rx = registry.watch();
    let mut view = View::default();

    let mut two_nodes = service("go.micro/greeter", "1.0", "n1");
    two_nodes
        .nodes
        .push(service("x", "", "n2").nodes[0].clone());
    register_now(&registry, &two_nodes).await;
    register_now(&registry, &service("go.micro/greeter", "2.0", "n3")).await;
    register_now(&registry, &service("other", "1", "o/1")).await;

    // go-micro's layout: `/` in names becomes `-`, one node per key, all on one lease.
    let mut raw = raw_client(&etcd, None).await;
    let resp = raw
        .get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let keys: Vec<&str> = resp.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "/micro/registry/go.micro-greeter/n1",
            "/micro/registry/go.micro-greeter/n2",
            "/micro/registry/go.micro-greeter/n3",
            "/micro/registry/other/o-1",
        ]
    );
    let leases: std::collections::BTreeSet<i64> = resp.kvs().iter().map(|kv| kv.lease()).collect();
    assert_eq!(leases.len(), 1, "one lease for every node of the host");
    assert_eq!(Some(*leases.iter().next().unwrap()), registry.lease_id());

    let got = registry.get_service("go.micro/greeter").await.unwrap();
    assert_eq!(got.len(), 2, "grouped by version: {got:?}");
    assert_eq!(got[0].version, "1.0");
    assert_eq!(got[0].nodes.len(), 2);
    assert_eq!(got[1].nodes[0].id, "n3");
    assert_eq!(
        registry.list_services().await.unwrap(),
        vec!["go.micro/greeter".to_string(), "other".to_string()]
    );
    let missing = registry.get_service("nope").await.unwrap_err();
    assert_eq!(missing.kind, ErrorKind::NotFound);

    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 4)
            .await,
        "watch saw every node: {:?}",
        view.nodes.keys()
    );
    assert!(
        matches!(view.events[0], WatchEvent::Resync { .. }),
        "receivers start with the mirror"
    );
    assert!(registry.health().watch_connected);
    assert!(registry.health().last_contact.is_some());

    registry.deregister("other", "o/1").await.unwrap();
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 3)
            .await,
        "the watch shows 3 nodes: {:?}",
        view.nodes.keys()
    );
    assert_eq!(
        registry.deregister("other", "o/1").await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    assert_eq!(registry.registrations().len(), 3);

    // Graceful shutdown revokes the lease: keys go at once, not after the TTL.
    let started = Instant::now();
    registry.shutdown().await;
    let (nodes, _) = etcd_view(&mut raw, PREFIX).await;
    assert!(nodes.is_empty(), "{nodes:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(rx.recv().await.is_some() || rx.recv().await.is_none());
    let stats = registry.stats();
    assert_eq!(stats.lease_grants, 1);
    assert_eq!(stats.requests("lease_revoke", "ok"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_micro_values_written_by_etcdctl_and_writes_what_go_micro_reads() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    // What go-micro's etcd registry writes: Go's encoding/json of its structs, `null` for empty
    // maps and lists; plus a hand-edited value with mixed-case keys and unknown fields.
    let go_micro = r#"{"name":"go.micro.srv.greeter","version":"latest","metadata":null,"endpoints":[{"name":"Say.Hello","request":{"name":"Request","type":"Request","values":[{"name":"name","type":"string","values":null}]},"response":{"name":"Response","type":"Response","values":null},"metadata":{"stream":"false"}}],"nodes":[{"id":"go.micro.srv.greeter-6b0a","address":"10.0.0.7:41231","metadata":{"broker":"http","protocol":"mucp","registry":"etcd","server":"mucp","transport":"http"}}]}"#;
    let mixed = r#"{"Name":"go.micro.srv.greeter","Version":"latest","Metadata":{"team":"x"},"Endpoints":null,"Nodes":[{"Id":"greeter-2","Address":"10.0.0.8:41231","Metadata":null,"Weight":3}],"Extra":{"a":[1,2]}}"#;
    etcd.etcdctl(
        None,
        &[
            "put",
            "/micro/registry/go.micro.srv.greeter/go.micro.srv.greeter-6b0a",
            go_micro,
        ],
    )
    .unwrap();
    etcd.etcdctl(
        None,
        &[
            "put",
            "/micro/registry/go.micro.srv.greeter/greeter-2",
            mixed,
        ],
    )
    .unwrap();

    let registry = EtcdRegistry::connect(fast_config(&etcd)).await.unwrap();
    let got = registry.get_service("go.micro.srv.greeter").await.unwrap();
    assert_eq!(got.len(), 1);
    let svc = &got[0];
    assert_eq!(svc.version, "latest");
    assert_eq!(svc.nodes.len(), 2);
    assert_eq!(svc.nodes[0].address, "10.0.0.7:41231");
    assert_eq!(svc.nodes[0].metadata.get("protocol"), Some("mucp"));
    assert_eq!(svc.nodes[1].id, "greeter-2");
    assert!(svc.nodes[1].metadata.is_empty());
    let endpoint = &svc.endpoints[0];
    assert_eq!(endpoint.name, "Say.Hello");
    assert_eq!(
        endpoint.request.as_ref().unwrap().values[0].type_name,
        "string"
    );
    assert_eq!(registry.stats().malformed_values, 0);

    // A node written through etcdctl while watching arrives as a Put.
    let mut rx = registry.watch();
    let mut view = View::default();
    view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 2)
        .await;
    let third = mixed.replace("greeter-2", "greeter-3");
    etcd.etcdctl(
        None,
        &[
            "put",
            "/micro/registry/go.micro.srv.greeter/greeter-3",
            &third,
        ],
    )
    .unwrap();
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 3)
            .await,
        "the watch shows 3 nodes: {:?}",
        view.nodes.keys()
    );

    // What regcache writes: go-micro's lowercase field names, decodable by the same rules.
    let mine = service("regcache.test", "v1", "me-1");
    register_now(&registry, &mine).await;
    let raw = etcd
        .etcdctl(
            None,
            &[
                "get",
                "--print-value-only",
                "/micro/registry/regcache.test/me-1",
            ],
        )
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(raw.trim()).unwrap();
    for field in ["name", "version", "metadata", "endpoints", "nodes"] {
        assert!(json.get(field).is_some(), "{field} missing in {raw}");
    }
    for field in ["id", "address", "metadata"] {
        assert!(
            json["nodes"][0].get(field).is_some(),
            "nodes[].{field} missing in {raw}"
        );
    }
    assert_eq!(Service::decode(raw.trim().as_bytes()).unwrap(), mine);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_skipped_and_counted_while_neighbours_are_served() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let mut raw = raw_client(&etcd, None).await;
    let good = service("svc", "1", "good");
    raw.put("/micro/registry/svc/good", good.encode(), None)
        .await
        .unwrap();
    raw.put("/micro/registry/svc/notjson", "not json at all", None)
        .await
        .unwrap();
    raw.put("/micro/registry/svc/empty", "", None)
        .await
        .unwrap();
    let huge = format!(
        r#"{{"name":"svc","nodes":[{{"id":"huge","x":"{}"}}]}}"#,
        "x".repeat(1 << 20)
    );
    raw.put("/micro/registry/svc/huge", huge, None)
        .await
        .unwrap();
    raw.put(
        "/micro/registry/svc/wrongtype",
        r#"{"name":"svc","nodes":{"id":1}}"#,
        None,
    )
    .await
    .unwrap();

    let registry = EtcdRegistry::connect(fast_config(&etcd)).await.unwrap();
    let seeded = registry.stats().malformed_values;
    assert_eq!(seeded, 4, "the first list skipped four bad values");
    let got = registry.get_service("svc").await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].nodes.len(), 1);
    assert_eq!(got[0].nodes[0].id, "good");
    assert_eq!(registry.stats().malformed_values, seeded + 4);
    assert_eq!(
        registry.list_services().await.unwrap(),
        vec!["svc".to_string()]
    );

    // On the watch: a bad value is skipped, and a good node overwritten by junk goes away.
    let mut rx = registry.watch();
    let mut view = View::default();
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| v.nodes.len() == 1)
            .await,
        "the watch shows 1 node: {:?}",
        view.nodes.keys()
    );
    let before = registry.stats().malformed_values;
    raw.put(
        "/micro/registry/svc/good2",
        service("svc", "1", "good2").encode(),
        None,
    )
    .await
    .unwrap();
    raw.put("/micro/registry/svc/junk", "{", None)
        .await
        .unwrap();
    raw.put("/micro/registry/svc/good", "[]", None)
        .await
        .unwrap();
    raw.put(
        "/micro/registry/svc/good3",
        service("svc", "1", "good3").encode(),
        None,
    )
    .await
    .unwrap();
    assert!(
        view.eventually(&mut rx, Duration::from_secs(5), |v| {
            v.nodes.keys().map(|(_, n)| n.as_str()).collect::<Vec<_>>() == ["good2", "good3"]
        })
        .await,
        "{:?}",
        view.nodes.keys()
    );
    assert!(registry.stats().malformed_values >= before + 2);
    assert!(
        registry.health().watch_connected,
        "bad values do not break the watch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_key_deleted_by_someone_else_is_put_back() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let registry = EtcdRegistry::connect(fast_config(&etcd)).await.unwrap();
    register_now(&registry, &service("svc", "1", "n1")).await;
    let mut raw = raw_client(&etcd, None).await;
    raw.delete("/micro/registry/svc/n1", None).await.unwrap();
    let back = eventually(Duration::from_secs(3), || {
        let mut raw = raw.clone();
        async move {
            let resp = raw.get("/micro/registry/svc/n1", None).await.unwrap();
            resp.kvs().first().is_some_and(|kv| kv.lease() != 0)
        }
    })
    .await;
    assert!(back, "the deleted key came back on the lease within 3 s");
    // The counter moves after the put returns: wait for it rather than race it.
    let counted = eventually(Duration::from_secs(3), || {
        let registry = &registry;
        async move { registry.stats().reputs == 1 }
    })
    .await;
    assert!(counted, "reputs = {}", registry.stats().reputs);

    // A lease revoked behind our back: a new one is granted and every key re-put.
    let old = registry.lease_id().unwrap();
    raw.lease_revoke(old).await.unwrap();
    let regranted = eventually(Duration::from_secs(3), || {
        let mut raw = raw.clone();
        let registry = &registry;
        async move {
            let resp = raw.get("/micro/registry/svc/n1", None).await.unwrap();
            let lease = resp.kvs().first().map(|kv| kv.lease());
            lease.is_some() && lease != Some(old) && lease == registry.lease_id()
        }
    })
    .await;
    assert!(regranted, "key back on a new lease");
    assert!(registry.stats().lease_regrants >= 1);
}

/// With the watch connected, `list_services` answers from the watch's mirror: no read of the
/// prefix per call (it used to list and decode the whole registry on every HTTP request), the
/// host's own registrations listed as soon as they return, others' as soon as the watch sees
/// them; and while etcd is frozen it answers at once instead of waiting out the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_services_answers_from_the_watch_mirror_while_connected() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let registry = EtcdRegistry::connect(fast_config(&etcd)).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            registry.health().watch_connected
        })
        .await,
        "the registry's watch connects"
    );
    let mut raw = raw_client(&etcd, None).await;
    raw.put(
        "/micro/registry/theirs/t1",
        service("theirs", "1", "t1").encode(),
        None,
    )
    .await
    .unwrap();
    register_now(&registry, &service("ours", "1", "o1")).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            registry.list_services().await.unwrap() == ["ours", "theirs"]
        })
        .await,
        "both services listed: {:?}",
        registry.list_services().await
    );

    let ranges = || etcd.grpc_started(0, "etcdserverpb.KV", "Range").unwrap();
    let before = ranges();
    for _ in 0..50 {
        assert_eq!(registry.list_services().await.unwrap(), ["ours", "theirs"]);
    }
    assert_eq!(ranges(), before, "no etcd read per list");

    raw.delete("/micro/registry/theirs/t1", None).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            registry.list_services().await.unwrap() == ["ours"]
        })
        .await,
        "a deletion seen by the watch leaves the list"
    );

    etcd.stop(0).unwrap();
    let started = Instant::now();
    let listed = registry.list_services().await;
    let took = started.elapsed();
    etcd.cont(0).unwrap();
    assert_eq!(listed.unwrap(), ["ours"]);
    assert!(took < Duration::from_millis(100), "took {took:?}");
    registry.shutdown().await;
}
