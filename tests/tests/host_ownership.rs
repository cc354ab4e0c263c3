//! Registration ownership against real etcd: a host never takes over another host's node
//! (409 with the owner's lease, unless `?force=true`), a host restarted after SIGKILL
//! re-registers the nodes its previous lease still holds, an owned key rewritten in etcd is put
//! back (on no lease) or yielded (on another lease, reported as a conflict), and SIGTERM leaves
//! no key of the host behind.

use std::time::{Duration, Instant};

use regcache_tests::etcd::EtcdCluster;
use regcache_tests::host::{Host, Response, poll, service_json};
use serde_json::Value;

const PREFIX: &str = "/micro/registry/";

fn host_args<'a>(etcd: &'a str, state_dir: &'a str, lease_ttl: &'a str) -> Vec<&'a str> {
    vec![
        "--etcd-endpoints",
        etcd,
        "--etcd-lease-ttl",
        lease_ttl,
        "--etcd-request-timeout",
        "2s",
        "--state-dir",
        state_dir,
    ]
}

fn register(host: &Host, query: &str, node: &str, address: &str) -> Response {
    host.request(
        "POST",
        &format!("/v1/registrations{query}"),
        &[],
        service_json("greeter", "1.0", node, address).as_bytes(),
    )
    .unwrap()
}

/// The key's value (`"junk"` if it is not JSON) and lease (0: none), or `None` when it is not
/// in etcd.
fn held(etcd: &EtcdCluster, key: &str) -> Option<(Value, i64)> {
    let out = etcd.etcdctl(None, &["get", key, "-w", "json"]).unwrap();
    let json: Value = serde_json::from_str(&out).unwrap();
    let lease = json["kvs"].get(0)?["lease"].as_i64().unwrap_or(0);
    let value = etcd
        .etcdctl(None, &["get", key, "--print-value-only"])
        .unwrap();
    let value = serde_json::from_str(value.trim()).unwrap_or(Value::String("junk".into()));
    Some((value, lease))
}

fn address(value: &Value) -> &str {
    value["nodes"][0]["address"].as_str().unwrap_or("")
}

/// Holds `condition` for the whole of `period` (checked every 50 ms): for "never happens".
fn holds_for(period: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        if !condition() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

fn metric(host: &Host, name: &str) -> u64 {
    let text = host.get("/metrics").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cannot_take_another_hosts_node_unless_forced() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let endpoint = etcd.endpoint(0);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Host::start(&host_args(&endpoint, dir_a.path().to_str().unwrap(), "3s")).unwrap();
    // B's lease is short: its keep-alives come every second, and a re-put by B would show soon.
    let b = Host::start(&host_args(&endpoint, dir_b.path().to_str().unwrap(), "3s")).unwrap();
    let key = format!("{PREFIX}greeter/g1");

    let created = register(&a, "", "g1", "10.0.0.1:80");
    assert_eq!(created.status, 201, "{}", created.text());
    let (_, lease_a) = held(&etcd, &key).expect("registered");
    // B has a lease of its own (another node), so that its lease task runs meanwhile.
    assert_eq!(register(&b, "", "b1", "10.0.0.2:80").status, 201);

    let refused = register(&b, "", "g1", "10.0.0.2:80");
    assert_eq!(refused.status, 409, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["error"], "conflict", "{body}");
    assert_eq!(body["details"]["owner_lease"], lease_a, "{body}");
    assert_eq!(body["details"]["owner_lease_hex"], format!("{lease_a:x}"));
    let (value, lease) = held(&etcd, &key).unwrap();
    assert_eq!(
        (address(&value), lease),
        ("10.0.0.1:80", lease_a),
        "untouched"
    );
    let b_regs = b.get("/v1/registrations").unwrap().json();
    assert_eq!(
        b_regs["registrations"].as_array().unwrap().len(),
        1,
        "{b_regs}"
    );

    // The owner's deregistration is for good: B never puts the node back.
    let deleted = a
        .request("DELETE", "/v1/registrations/greeter/g1", &[], b"")
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    assert!(
        holds_for(Duration::from_secs(4), || held(&etcd, &key).is_none()),
        "the node came back: {:?}\n{}",
        held(&etcd, &key),
        b.log()
    );

    // Registered by A again; B takes it by force, and A yields it as a conflict.
    assert_eq!(register(&a, "", "g1", "10.0.0.1:80").status, 201);
    let forced = register(&b, "?force=true", "g1", "10.0.0.2:80");
    assert_eq!(forced.status, 201, "{}", forced.text());
    assert!(b.log().contains("forced registration"), "{}", b.log());
    let (value, lease_b) = held(&etcd, &key).unwrap();
    assert_eq!(address(&value), "10.0.0.2:80");
    assert_ne!(lease_b, lease_a);
    assert!(
        poll(Duration::from_secs(5), || {
            let regs = a.get("/v1/registrations").unwrap().json();
            regs["conflicts"][0]["owner_lease"] == lease_b
        }),
        "A reports the conflict: {}\n{}",
        a.get("/v1/registrations").unwrap().text(),
        a.log()
    );
    assert_eq!(metric(&a, "regcache_registration_conflicts_total"), 1);
    assert!(
        holds_for(Duration::from_secs(2), || held(&etcd, &key)
            .is_some_and(|(_, l)| l == lease_b)),
        "A does not fight over it: {:?}",
        held(&etcd, &key)
    );
    // A's deregistration leaves B's node alone.
    let deleted = a
        .request("DELETE", "/v1/registrations/greeter/g1", &[], b"")
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    assert_eq!(held(&etcd, &key).map(|(_, l)| l), Some(lease_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_restarted_after_sigkill_re_registers_its_nodes() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let endpoint = etcd.endpoint(0);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    // A long lease: it still holds the nodes when the host is back.
    let args = host_args(&endpoint, dir, "60s");
    let mut first = Host::start(&args).unwrap();
    for node in ["g1", "g2"] {
        assert_eq!(register(&first, "", node, "10.0.0.1:80").status, 201);
    }
    let key = format!("{PREFIX}greeter/g1");
    let (_, old_lease) = held(&etcd, &key).unwrap();
    first.kill();

    let second = Host::start(&args).unwrap();
    let again = register(&second, "", "g1", "10.0.0.1:81");
    assert_eq!(again.status, 201, "{}\n{}", again.text(), second.log());
    let (value, lease) = held(&etcd, &key).unwrap();
    assert_eq!(address(&value), "10.0.0.1:81");
    assert_ne!(lease, old_lease, "moved to the new run's lease");
    // g2, not re-registered, stays on the old lease until it expires.
    let (_, g2_lease) = held(&etcd, &format!("{PREFIX}greeter/g2")).unwrap();
    assert_eq!(g2_lease, old_lease);

    // Another host (its own state dir) is refused, naming the new lease.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Host::start(&host_args(
        &endpoint,
        other_dir.path().to_str().unwrap(),
        "60s",
    ))
    .unwrap();
    let refused = register(&other, "", "g2", "10.0.0.9:80");
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(refused.json()["details"]["owner_lease"], old_lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_keys_rewritten_in_etcd_are_put_back_or_yielded() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let endpoint = etcd.endpoint(0);
    let dir = tempfile::tempdir().unwrap();
    let mut host = Host::start(&host_args(&endpoint, dir.path().to_str().unwrap(), "3s")).unwrap();
    for node in ["g1", "g2"] {
        assert_eq!(register(&host, "", node, "10.0.0.1:80").status, 201);
    }
    let (g1, g2) = (format!("{PREFIX}greeter/g1"), format!("{PREFIX}greeter/g2"));
    let (_, lease) = held(&etcd, &g1).unwrap();

    // Rewritten by hand, on no lease: put back within a second.
    let foreign = service_json("greeter", "1.0", "g1", "10.6.6.6:80");
    etcd.etcdctl(None, &["put", &g1, &foreign]).unwrap();
    let started = Instant::now();
    assert!(
        poll(Duration::from_secs(1), || held(&etcd, &g1).is_some_and(
            |(v, l)| address(&v) == "10.0.0.1:80" && l == lease
        )),
        "put back on the host's lease: {:?}\n{}",
        held(&etcd, &g1),
        host.log()
    );
    eprintln!("restored {:?} after the overwrite", started.elapsed());

    // Rewritten on another lease: reported as a conflict, not fought over.
    let granted = etcd.etcdctl(None, &["lease", "grant", "60"]).unwrap();
    let other_hex = granted.split_whitespace().nth(1).unwrap().to_string();
    let other = i64::from_str_radix(&other_hex, 16).unwrap();
    let theirs = service_json("greeter", "1.0", "g2", "10.7.7.7:80");
    etcd.etcdctl(None, &["put", "--lease", &other_hex, &g2, &theirs])
        .unwrap();
    assert!(
        poll(Duration::from_secs(5), || {
            let regs = host.get("/v1/registrations").unwrap().json();
            regs["conflicts"][0]["node"] == "g2" && regs["conflicts"][0]["owner_lease"] == other
        }),
        "{}\n{}",
        host.get("/v1/registrations").unwrap().text(),
        host.log()
    );
    assert_eq!(metric(&host, "regcache_registration_conflicts_total"), 1);
    assert!(
        holds_for(Duration::from_secs(2), || held(&etcd, &g2)
            .is_some_and(|(v, l)| address(&v) == "10.7.7.7:80" && l == other)),
        "the other lease keeps it: {:?}",
        held(&etcd, &g2)
    );

    // SIGTERM: the host's keys go; the other lease's key stays.
    host.signal("TERM").unwrap();
    assert_eq!(
        host.wait_exit(Duration::from_secs(15)).unwrap().code(),
        Some(0)
    );
    assert_eq!(held(&etcd, &g1), None, "{}", host.log());
    assert_eq!(held(&etcd, &g2).map(|(_, l)| l), Some(other));
}
