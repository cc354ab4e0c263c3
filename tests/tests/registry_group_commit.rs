//! Registrations made at once share etcd writes (group commit) against a real etcd: a fleet
//! registering together costs a few transactions rather than one each, and every registration
//! still gets its own answer: a node someone else holds refuses only the registration that
//! asked for it, and an outage answers each `Later` within its own request timeout. A fleet
//! deregistering together shares its deletes the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use regcache::model::Service;
use regcache::registry::etcd::EtcdRegistry;
use regcache::registry::{ErrorKind, Registered, Registry, RegistryError, Takeover};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::{
    all_registered, fast_config, init_logging, raw_client, register_now, service,
};
use regcache_tests::wait::eventually;

const KV: &str = "etcdserverpb.KV";

/// Registers every one of `services` at once, each in its own task, with what each asked.
async fn register_at_once(
    registry: &Arc<EtcdRegistry>,
    services: Vec<(Service, Takeover)>,
) -> Vec<(Service, Duration, Result<Registered, RegistryError>)> {
    let tasks: Vec<_> = services
        .into_iter()
        .map(|(service, takeover)| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let result = registry.register_with(&service, takeover).await;
                (service, start.elapsed(), result)
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// Transactions etcd has started so far (every registration write is one or more).
fn txns(etcd: &EtcdCluster) -> u64 {
    etcd.grpc_started_total(KV, "Txn").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_registering_at_once_shares_a_few_transactions() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let registry = Arc::new(EtcdRegistry::connect(fast_config(&etcd)).await.unwrap());
    // The lease is granted by a first registration; what follows is writes only.
    let alone = Instant::now();
    register_now(&*registry, &service("first", "1", "f1")).await;
    let one_write = alone.elapsed();

    let fleet = 200;
    let before = txns(&etcd);
    let start = Instant::now();
    let services = (0..fleet)
        .map(|i| {
            (
                service(&format!("svc-{}", i % 7), "1", &format!("n{i}")),
                Takeover::Refuse,
            )
        })
        .collect();
    let results = register_at_once(&registry, services).await;
    let elapsed = start.elapsed();
    let used = txns(&etcd) - before;
    let slowest = results.iter().map(|(_, d, _)| *d).max().unwrap();
    eprintln!(
        "one registration alone: {one_write:?}; {fleet} at once: {used} transactions, \
         {elapsed:?} in all, slowest answer {slowest:?}"
    );
    for (service, _, result) in &results {
        assert!(
            matches!(result, Ok(Registered::Now)),
            "{}: {result:?}",
            service.nodes[0].id
        );
    }
    assert!(
        used <= fleet / 10,
        "{used} transactions for {fleet} registrations at once"
    );
    let mut raw = raw_client(&etcd, None).await;
    assert_eq!(registry.registrations().len(), fleet as usize + 1);
    assert!(all_registered(&mut raw, &registry).await);

    // And all leaving at once, one of them twice: deleted together, each answered.
    let before = txns(&etcd);
    let start = Instant::now();
    let leaving: Vec<_> = (0..=fleet)
        .map(|i| {
            let registry = registry.clone();
            let i = i.min(fleet - 1);
            let name = format!("svc-{}", i % 7);
            tokio::spawn(async move { registry.deregister(&name, &format!("n{i}")).await })
        })
        .collect();
    let mut not_found = 0;
    for task in leaving {
        match task.await.unwrap() {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::NotFound => not_found += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let used = txns(&etcd) - before;
    eprintln!(
        "{fleet} deregistrations at once: {used} transactions, {:?}",
        start.elapsed()
    );
    assert_eq!(not_found, 1, "the second deregistration of one node");
    assert!(
        used <= fleet / 10,
        "{used} transactions for {fleet} deregistrations at once"
    );
    let services: Vec<String> = registry
        .registrations()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(services, ["first"]);
    let left = raw
        .get(
            "/micro/registry/svc-",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(left.count(), 0);
    registry.shutdown().await;
}

/// Written together, yet answered one by one: the registrations that ask for a node another
/// lease holds are refused (a two-node one entirely: its free node is not written either),
/// a forced one takes its node, and every other one is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflict_refuses_only_the_registration_that_asked() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    let registry = Arc::new(EtcdRegistry::connect(fast_config(&etcd)).await.unwrap());
    register_now(&*registry, &service("first", "1", "f1")).await;
    let mut raw = raw_client(&etcd, None).await;
    let other = raw.lease_grant(60, None).await.unwrap().id();
    let taken = |i: usize| format!("taken-{i}");
    for i in 0..4 {
        let key = registry.node_key("svc", &taken(i));
        let value = service("svc", "1", &taken(i)).encode();
        let options = PutOptions::new().with_lease(other);
        raw.put(key, value, Some(options)).await.unwrap();
    }

    // Every tenth asks for a taken node beside a free one; the last of those is forced.
    let n = 100;
    let asked: Vec<(Service, Takeover)> = (0..n)
        .map(|i| {
            let mut service = service("svc", "1", &format!("free-{i}"));
            if i % 10 == 5 && i / 10 < 4 {
                let node = self::service("svc", "1", &taken(i / 10)).nodes[0].clone();
                service.nodes.push(node);
                let takeover = if i / 10 == 3 {
                    Takeover::Force
                } else {
                    Takeover::Refuse
                };
                return (service, takeover);
            }
            (service, Takeover::Refuse)
        })
        .collect();
    let before = txns(&etcd);
    let results = register_at_once(&registry, asked).await;
    let used = txns(&etcd) - before;
    eprintln!("{n} registrations at once, three refused: {used} transactions");

    for (service, _, result) in &results {
        let free = registry.node_key("svc", &service.nodes[0].id);
        let got = raw.get(free.as_str(), None).await.unwrap();
        let in_etcd = got.kvs().first().map(|kv| kv.lease());
        let refused = service.nodes.len() == 2 && service.nodes[1].id != taken(3);
        if refused {
            let e = result.as_ref().unwrap_err();
            assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
            assert_eq!(e.owner_lease, Some(other), "{e}");
            assert!(e.message.contains(&service.nodes[1].id), "{e}");
            assert_eq!(in_etcd, None, "{free}: nothing of a refused registration");
        } else {
            assert!(matches!(result, Ok(Registered::Now)), "{free}: {result:?}");
            assert_eq!(in_etcd, registry.lease_id(), "{free}");
        }
    }
    for i in 0..4 {
        let key = registry.node_key("svc", &taken(i));
        let got = raw.get(key.as_str(), None).await.unwrap();
        let lease = got.kvs()[0].lease();
        let want = if i == 3 {
            registry.lease_id().unwrap()
        } else {
            other
        };
        assert_eq!(
            lease, want,
            "{key}: only the forced registration took its node"
        );
    }
    let registered = registry.registrations();
    assert_eq!(registered.len(), 1 + n - 3 + 1, "refused ones are not kept");
    assert!(
        registry.conflicts().is_empty(),
        "{:?}",
        registry.conflicts()
    );
    assert!(all_registered(&mut raw, &registry).await);
    assert!(
        used <= 10,
        "{used} transactions for {n} registrations at once"
    );
    registry.shutdown().await;
}

/// etcd hung (SIGSTOP): each registration of a burst is answered `Later` within its own
/// request timeout, and every one is written once etcd answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_answers_each_registration_later_within_its_timeout() {
    init_logging();
    let etcd = EtcdCluster::start(1).await.unwrap();
    // fast_config's request timeout.
    let timeout = Duration::from_secs(2);
    let registry = Arc::new(EtcdRegistry::connect(fast_config(&etcd)).await.unwrap());
    register_now(&*registry, &service("first", "1", "f1")).await;

    etcd.stop(0).unwrap();
    let n = 50;
    let services = (0..n)
        .map(|i| (service("svc", "1", &format!("n{i}")), Takeover::Refuse))
        .collect();
    let results = register_at_once(&registry, services).await;
    etcd.cont(0).unwrap();
    for (service, took, result) in &results {
        let id = &service.nodes[0].id;
        assert!(
            matches!(result, Ok(Registered::Later(e)) if e.kind.is_outage()),
            "{id}: {result:?}"
        );
        assert!(
            *took < timeout + Duration::from_millis(500),
            "{id} answered after {took:?}"
        );
    }
    assert_eq!(registry.registrations().len(), n + 1);
    let raw = raw_client(&etcd, None).await;
    let registry = &registry;
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut raw = raw.clone();
            async move { all_registered(&mut raw, registry).await }
        })
        .await,
        "every registration written once etcd answers"
    );
    registry.shutdown().await;
}
