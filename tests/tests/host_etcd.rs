//! The host against real etcd: registrations through the API survive an etcd outage and a lost
//! lease, lookups are answered stale while etcd is down, SIGTERM revokes the lease at once, a
//! host restarted while etcd is down answers from its snapshot (of any size), and go-micro values written by
//! `etcdctl` are served.

use std::time::{Duration, Instant};

use regcache_tests::etcd::EtcdCluster;
use regcache_tests::host::{Host, service_json};
use regcache_tests::registry::{fill_scale, raw_client};
use regcache_tests::wait::eventually_blocking;
use serde_json::Value;

const PREFIX: &str = "/micro/registry/";

/// Host flags for a fast-moving test: a 1 s etcd timeout and a policy TTL of 300 ms so that
/// answers turn stale quickly. The lease is `lease_ttl`.
fn host_args_with_lease<'a>(etcd: &'a str, state_dir: &'a str, lease_ttl: &'a str) -> Vec<&'a str> {
    vec![
        "--etcd-endpoints",
        etcd,
        "--etcd-lease-ttl",
        lease_ttl,
        "--etcd-request-timeout",
        "1s",
        "--state-dir",
        state_dir,
        "--policy-config",
        "ttl-ms=300,min-retry-interval-ms=100,max-wait-ms=500",
    ]
}

/// [`host_args_with_lease`] with a 3 s lease.
fn host_args<'a>(etcd: &'a str, state_dir: &'a str) -> Vec<&'a str> {
    host_args_with_lease(etcd, state_dir, "3s")
}

fn keys(etcd: &EtcdCluster) -> Vec<String> {
    etcd.etcdctl(None, &["get", "--prefix", "--keys-only", PREFIX])
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn lease_of(etcd: &EtcdCluster, key: &str) -> Option<i64> {
    let out = etcd.etcdctl(None, &["get", key, "-w", "json"]).unwrap();
    let json: Value = serde_json::from_str(&out).unwrap();
    json["kvs"][0]["lease"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_survives_etcd_outage_and_lease_loss() {
    let mut etcd = EtcdCluster::start(1).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint(0);
    let host = Host::start(&host_args(&endpoint, state.path().to_str().unwrap())).unwrap();
    assert!(
        host.log().lines().next().unwrap().contains("etcd at"),
        "{}",
        host.log()
    );

    let created = host
        .request(
            "POST",
            "/v1/registrations",
            &[],
            service_json("greeter", "1.0", "g1", "10.0.0.1:8080").as_bytes(),
        )
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.text());
    let key = format!("{PREFIX}greeter/g1");
    assert_eq!(keys(&etcd), std::slice::from_ref(&key));
    let found = host.lookup("greeter");
    let answer = found.json();
    assert_eq!(found.status, 200, "{answer}");
    assert_eq!(answer["services"][0]["nodes"][0]["id"], "g1");

    etcd.kill(0).unwrap();
    // Past the policy's TTL, with etcd dead: served from the cache, marked stale.
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            let answer = host.lookup("greeter");
            answer.status == 200 && answer.json()["provenance"]["source"] == "stale"
        }),
        "stale answer while etcd is down: {}\n{}",
        host.lookup("greeter").text(),
        host.log()
    );
    let answer = host.lookup("greeter").json();
    assert_eq!(answer["services"][0]["nodes"][0]["id"], "g1");
    assert_eq!(answer["provenance"]["snapshot"], false);

    etcd.restart(0).await.unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(10), || keys(&etcd) == [key.clone()]),
        "the registration is in etcd after the restart: {}",
        host.log()
    );
    // The lease is lost for good (revoked by someone else): the host grants a new one and puts
    // the key back by itself.
    let lease = lease_of(&etcd, &key).expect("the key is on a lease");
    etcd.etcdctl(None, &["lease", "revoke", &format!("{lease:x}")])
        .unwrap();
    let started = Instant::now();
    assert!(
        eventually_blocking(Duration::from_secs(10), || lease_of(&etcd, &key)
            .is_some_and(|l| l != lease)),
        "the key is back on a new lease: {}",
        host.log()
    );
    eprintln!(
        "key restored {:?} after the lease was revoked",
        started.elapsed()
    );
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            let answer = host.lookup("greeter");
            answer.status == 200 && answer.json()["provenance"]["source"] != "stale"
        }),
        "fresh answers once etcd is back"
    );
    let regs = host.get("/v1/registrations").unwrap().json();
    assert_eq!(regs["registrations"][0]["nodes"][0]["id"], "g1");
    let metrics = host.get("/metrics").unwrap().text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regcache_lease_regrants_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("regcache_registry_requests_total{op=\"register\",result=\"ok\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_revokes_the_lease_and_exits_zero() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint(0);
    // A long lease: only a revocation can make the keys go within a second.
    let args = host_args_with_lease(&endpoint, state.path().to_str().unwrap(), "30s");
    let mut host = Host::start(&args).unwrap();
    for id in ["a1", "a2"] {
        let created = host
            .request(
                "POST",
                "/v1/registrations",
                &[],
                service_json("api", "2", id, "10.0.0.2:80").as_bytes(),
            )
            .unwrap();
        assert_eq!(created.status, 201, "{}", created.text());
    }
    assert_eq!(keys(&etcd).len(), 2);

    host.signal("TERM").unwrap();
    let started = Instant::now();
    assert!(
        eventually_blocking(Duration::from_secs(1), || keys(&etcd).is_empty()),
        "keys gone within a second of SIGTERM: {:?}\n{}",
        keys(&etcd),
        host.log()
    );
    eprintln!("keys gone {:?} after SIGTERM", started.elapsed());
    let status = host.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", host.log());
    assert!(host.log().contains("revoked lease"), "{}", host.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_go_micro_values_written_by_etcdctl() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    // As go-micro writes it: null maps, mixed-case keys, nested endpoint values, an extra
    // field regcache does not know.
    let value = r#"{"Name":"go.micro.srv.greeter","Version":"latest","Metadata":null,
        "Endpoints":[{"Name":"Say.Hello","Request":{"name":"Request","type":"Request",
        "values":[{"name":"name","type":"string","values":null}]},"Response":null,
        "Metadata":{"stream":"false"}}],
        "Nodes":[{"Id":"go.micro.srv.greeter-1","Address":"10.1.2.3:54321",
        "Metadata":{"broker":"http","protocol":"mucp"}}],"Extra":42}"#;
    etcd.etcdctl(
        None,
        &[
            "put",
            &format!("{PREFIX}go.micro.srv.greeter/go.micro.srv.greeter-1"),
            value,
        ],
    )
    .unwrap();
    etcd.etcdctl(None, &["put", &format!("{PREFIX}broken/x"), "{not json"])
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint(0);
    let host = Host::start(&host_args(&endpoint, state.path().to_str().unwrap())).unwrap();

    let found = host.lookup("go.micro.srv.greeter");
    let answer = found.json();
    assert_eq!(found.status, 200, "{answer}");
    let service = &answer["services"][0];
    assert_eq!(service["name"], "go.micro.srv.greeter");
    assert_eq!(service["version"], "latest");
    let node = &service["nodes"][0];
    assert_eq!(node["id"], "go.micro.srv.greeter-1");
    assert_eq!(node["address"], "10.1.2.3:54321");
    assert_eq!(node["metadata"]["protocol"], "mucp");
    let endpoint = &service["endpoints"][0];
    assert_eq!(endpoint["name"], "Say.Hello");
    assert_eq!(endpoint["request"]["values"][0]["type"], "string");
    assert_eq!(endpoint["metadata"]["stream"], "false");

    let list = host.get("/v1/services").unwrap().json();
    assert!(
        list["services"]
            .as_array()
            .unwrap()
            .contains(&Value::from("go.micro.srv.greeter")),
        "{list}"
    );
    let status = host.lookup("broken").status;
    assert!(
        status == 404 || status == 503,
        "a malformed value is skipped"
    );
    assert_eq!(host.get("/healthz").unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_restarted_while_etcd_is_down_answers_from_the_snapshot() {
    let mut etcd = EtcdCluster::start(1).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let endpoint = etcd.endpoint(0);
    // Someone else's service (no lease of ours).
    etcd.etcdctl(
        None,
        &[
            "put",
            &format!("{PREFIX}billing/b1"),
            &service_json("billing", "3", "b1", "10.0.0.3:9000"),
        ],
    )
    .unwrap();
    let mut args = host_args(&endpoint, state_dir);
    args.extend(["--snapshot-interval", "200ms"]);
    let mut first = Host::start(&args).unwrap();
    let status = first.lookup("billing").status;
    assert_eq!(status, 200);
    // The periodic write, then a crash: the snapshot is what the periodic write left.
    let snapshot = state.path().join("cache.snapshot");
    assert!(
        eventually_blocking(Duration::from_secs(10), || snapshot.exists()),
        "periodic snapshot: {}",
        first.log()
    );
    first.kill();

    etcd.kill(0).unwrap();
    let second = Host::start(&host_args(&endpoint, state_dir)).unwrap();
    assert!(second.log().contains("snapshot loaded"), "{}", second.log());
    let found = second.lookup("billing");
    let answer = found.json();
    assert_eq!(found.status, 200, "{answer}\n{}", second.log());
    assert_eq!(answer["services"][0]["nodes"][0]["id"], "b1");
    assert_eq!(answer["provenance"]["source"], "stale");
    assert_eq!(answer["provenance"]["snapshot"], true);
    let ready = second.get("/readyz").unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["serving_snapshot"], true);
    let status = second.lookup("unknown").status;
    assert_eq!(status, 503, "not in the snapshot, etcd down");
    // A local service registering now is accepted and kept, to be written once etcd answers.
    let accepted = second
        .request(
            "POST",
            "/v1/registrations",
            &[],
            service_json("greeter", "1.0", "g1", "10.0.0.1:8080").as_bytes(),
        )
        .unwrap();
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    assert!(
        accepted.json()["pending"]
            .as_str()
            .unwrap()
            .contains("not connected"),
        "{}",
        accepted.text()
    );
    let listed = second.get("/v1/registrations").unwrap().json();
    assert_eq!(listed["registrations"][0]["nodes"][0]["id"], "g1");

    etcd.restart(0).await.unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(15), || {
            let answer = second.lookup("billing");
            answer.status == 200 && answer.json()["provenance"]["snapshot"] == false
        }),
        "the snapshot marking ends once etcd answers: {}",
        second.log()
    );
    let greeter = format!("{PREFIX}greeter/g1");
    assert!(
        eventually_blocking(Duration::from_secs(15), || keys(&etcd).contains(&greeter)),
        "the registration reaches etcd once it answers: {}",
        second.log()
    );
    drop(second);

    // A truncated snapshot is ignored with a warning; the host still starts and serves.
    let bytes = std::fs::read(&snapshot).unwrap();
    std::fs::write(&snapshot, &bytes[..bytes.len() / 2]).unwrap();
    let third = Host::start(&host_args(&endpoint, state_dir)).unwrap();
    assert!(
        third.log().contains("ignoring the snapshot"),
        "{}",
        third.log()
    );
    let found = third.lookup("billing");
    let answer = found.json();
    assert_eq!(found.status, 200, "{answer}");
    assert_eq!(answer["provenance"]["snapshot"], false);
}

/// The snapshot is what a host serves exactly when etcd cannot answer, so it must hold
/// whatever the cache held: here a service of 10,000 nodes, whose snapshot form is far beyond
/// the size limit of a single etcd value, beside a small one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_service_of_ten_thousand_nodes_is_served_after_a_restart() {
    let mut etcd = EtcdCluster::start(1).await.unwrap();
    let mut client = raw_client(&etcd, None).await;
    fill_scale(&mut client, 1, 10_000).await.unwrap();
    etcd.etcdctl(
        None,
        &[
            "put",
            &format!("{PREFIX}billing/b1"),
            &service_json("billing", "3", "b1", "10.0.0.3:9000"),
        ],
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let endpoint = etcd.endpoint(0);

    let mut first = Host::start(&host_args(&endpoint, state_dir)).unwrap();
    for (name, nodes) in [("svc-00000", 10_000), ("billing", 1)] {
        let found = first.lookup(name);
        let answer = found.json();
        assert_eq!(found.status, 200, "{}", first.log());
        assert_eq!(node_count(&answer), nodes);
    }
    first.signal("TERM").unwrap();
    assert!(first.wait_exit(Duration::from_secs(20)).unwrap().success());
    etcd.kill(0).unwrap();

    let second = Host::start(&host_args(&endpoint, state_dir)).unwrap();
    assert!(second.log().contains("snapshot loaded"), "{}", second.log());
    for (name, nodes) in [("svc-00000", 10_000), ("billing", 1)] {
        let found = second.lookup(name);
        let answer = found.json();
        assert_eq!(found.status, 200, "{name}: {}", second.log());
        assert_eq!(node_count(&answer), nodes, "{name}");
        assert_eq!(answer["provenance"]["source"], "stale");
        assert_eq!(answer["provenance"]["snapshot"], true);
    }
}

/// With etcd hung, SIGTERM's clean-up (delete this host's keys, revoke its lease) takes one
/// request timeout in all, not one per step: a pod's grace period covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_etcd_hung_exits_within_one_request_timeout() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint(0);
    let mut host = start_with_request_timeout(&endpoint, "4s", state.path(), &[]);
    let created = host
        .request(
            "POST",
            "/v1/registrations",
            &[],
            service_json("greeter", "1", "g1", "10.0.0.1:8080").as_bytes(),
        )
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.text());

    etcd.stop(0).unwrap();
    let started = Instant::now();
    host.signal("TERM").unwrap();
    let status = host.wait_exit(Duration::from_secs(30)).unwrap();
    let took = started.elapsed();
    etcd.cont(0).unwrap();
    assert_eq!(status.code(), Some(0), "{}", host.log());
    // One 4 s timeout and slack for a loaded machine; one per step would be 8 s and more.
    assert!(took < Duration::from_secs(7), "{took:?}\n{}", host.log());
}

/// A host on `endpoint` with the etcd request timeout `timeout`, its state in `state_dir`.
fn start_with_request_timeout(
    endpoint: &str,
    timeout: &str,
    state_dir: &std::path::Path,
    extra: &[&str],
) -> Host {
    let mut args = vec![
        "--etcd-endpoints",
        endpoint,
        "--etcd-request-timeout",
        timeout,
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Host::start(&args).unwrap()
}

fn node_count(answer: &Value) -> usize {
    answer["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["nodes"].as_array().unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint(0);
    let mut host = start_with_request_timeout(
        &endpoint,
        "3s",
        state.path(),
        &["--policy-config", "max-wait-ms=1500"],
    );
    // A hung etcd: the lookup of an unknown service waits up to the policy's max-wait.
    etcd.stop(0).unwrap();
    let addr = host.addr;
    let pending = std::thread::spawn(move || {
        regcache_tests::http::request(addr, "GET", "/v1/services/slow", &[], b"")
    });
    assert!(
        eventually_blocking(Duration::from_secs(10), || host
            .get("/metrics")
            .unwrap()
            .text()
            .contains(
                "regcache_lookup_decisions_total{decision=\"refresh_and_wait\"} 1"
            )),
        "the lookup is in flight"
    );
    host.signal("TERM").unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(5), || host.log().contains("draining")),
        "{}",
        host.log()
    );
    let answer = pending
        .join()
        .unwrap()
        .expect("a complete answer, not a reset");
    // etcd did not answer within the policy's wait: a gateway timeout.
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert_eq!(answer.json()["error"], "registry_timeout");
    etcd.cont(0).unwrap();
    let status = host.wait_exit(Duration::from_secs(15)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", host.log());
}
