//! Registration ownership against real etcd: a host never takes over another host's node
//! (409 with the owner's lease, unless `?force=true`), not even with a registration answered
//! during an outage, nor a node registered without a lease; a host restarted after SIGKILL
//! re-registers the nodes its previous lease still holds; an owned key rewritten in etcd is put
//! back (on no lease) or yielded (on another lease, reported as a conflict); and SIGTERM leaves
//! no key of the host behind, not even one on no lease that it could not put back.
//!
//! etcd is read through a raw client: a poll step costs a round trip, not a process.

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::host::{Host, service_json};
use regcache_tests::http::Response;
use regcache_tests::registry::raw_client;
use regcache_tests::wait::{eventually, eventually_blocking};
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
async fn held(raw: &Client, key: &str) -> Option<(Value, i64)> {
    let resp = raw.clone().get(key, None).await.unwrap();
    let kv = resp.kvs().first()?;
    let value = serde_json::from_slice(kv.value()).unwrap_or(Value::String("junk".into()));
    Some((value, kv.lease()))
}

fn address(value: &Value) -> &str {
    value["nodes"][0]["address"].as_str().unwrap_or("")
}

/// Holds `condition` for the whole of `period` (checked every 50 ms): for "never happens".
async fn holds_for<F, Fut>(period: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        if !condition().await {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    condition().await
}

/// Whether `key` holds `address` on `lease`.
async fn holds(raw: &Client, key: &str, want: &str, lease: i64) -> bool {
    held(raw, key)
        .await
        .is_some_and(|(v, l)| address(&v) == want && l == lease)
}

/// Puts etcd in its no-space maintenance mode (`on`) or out of it: it then refuses every
/// write that puts a key, and still applies deletes and lease revocations.
/// `owner` deregisters greeter/g1 (its key `key`), and `other` never puts it back.
async fn deregister_for_good(owner: &Host, other: &Host, raw: &Client, key: &str) {
    let deleted = owner
        .request("DELETE", "/v1/registrations/greeter/g1", &[], b"")
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    assert!(
        holds_for(Duration::from_secs(4), || async {
            held(raw, key).await.is_none()
        })
        .await,
        "the node came back: {:?}\n{}",
        held(raw, key).await,
        other.log()
    );
}

async fn no_space(raw: &Client, on: bool) {
    let mut raw = raw.clone();
    let member = raw.status().await.unwrap().header().unwrap().member_id();
    let mut options = AlarmOptions::new();
    options.with_member(member);
    let action = if on {
        AlarmAction::Activate
    } else {
        AlarmAction::Deactivate
    };
    raw.alarm(action, AlarmType::Nospace, Some(options))
        .await
        .unwrap();
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
    let raw = raw_client(&etcd, None).await;
    let key = format!("{PREFIX}greeter/g1");

    let created = register(&a, "", "g1", "10.0.0.1:80");
    assert_eq!(created.status, 201, "{}", created.text());
    let (_, lease_a) = held(&raw, &key).await.expect("registered");
    // B has a lease of its own (another node), so that its lease task runs meanwhile.
    assert_eq!(register(&b, "", "b1", "10.0.0.2:80").status, 201);

    let refused = register(&b, "", "g1", "10.0.0.2:80");
    assert_eq!(refused.status, 409, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["error"], "conflict", "{body}");
    assert_eq!(body["details"]["owner_lease"], lease_a, "{body}");
    assert_eq!(
        body["details"]["owner_lease_hex"],
        format!("{lease_a:016x}")
    );
    assert!(holds(&raw, &key, "10.0.0.1:80", lease_a).await, "untouched");
    let b_regs = b.get("/v1/registrations").unwrap().json();
    assert_eq!(
        b_regs["registrations"].as_array().unwrap().len(),
        1,
        "{b_regs}"
    );

    // The owner's deregistration is for good: B never puts the node back.
    deregister_for_good(&a, &b, &raw, &key).await;

    // Registered by A again; B takes it by force, and A yields it as a conflict.
    assert_eq!(register(&a, "", "g1", "10.0.0.1:80").status, 201);
    let forced = register(&b, "?force=true", "g1", "10.0.0.2:80");
    assert_eq!(forced.status, 201, "{}", forced.text());
    assert!(b.log().contains("forced registration"), "{}", b.log());
    let (value, lease_b) = held(&raw, &key).await.unwrap();
    assert_eq!(address(&value), "10.0.0.2:80");
    assert_ne!(lease_b, lease_a);
    assert!(
        eventually_blocking(Duration::from_secs(5), || {
            let regs = a.get("/v1/registrations").unwrap().json();
            regs["conflicts"][0]["owner_lease"] == lease_b
        }),
        "A reports the conflict: {}\n{}",
        a.get("/v1/registrations").unwrap().text(),
        a.log()
    );
    assert_eq!(metric(&a, "regcache_registration_conflicts_total"), 1);
    assert!(
        holds_for(Duration::from_secs(2), || holds(
            &raw,
            &key,
            "10.0.0.2:80",
            lease_b
        ))
        .await,
        "A does not fight over it: {:?}",
        held(&raw, &key).await
    );
    // A's deregistration leaves B's node alone.
    let deleted = a
        .request("DELETE", "/v1/registrations/greeter/g1", &[], b"")
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    assert_eq!(held(&raw, &key).await.map(|(_, l)| l), Some(lease_b));
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
    let raw = raw_client(&etcd, None).await;
    for node in ["g1", "g2"] {
        assert_eq!(register(&first, "", node, "10.0.0.1:80").status, 201);
    }
    let key = format!("{PREFIX}greeter/g1");
    let (_, old_lease) = held(&raw, &key).await.unwrap();
    first.kill();

    let second = Host::start(&args).unwrap();
    let again = register(&second, "", "g1", "10.0.0.1:81");
    assert_eq!(again.status, 201, "{}\n{}", again.text(), second.log());
    let (value, lease) = held(&raw, &key).await.unwrap();
    assert_eq!(address(&value), "10.0.0.1:81");
    assert_ne!(lease, old_lease, "moved to the new run's lease");
    // g2, not re-registered, stays on the old lease until it expires.
    let (_, g2_lease) = held(&raw, &format!("{PREFIX}greeter/g2")).await.unwrap();
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
    let raw = raw_client(&etcd, None).await;
    for node in ["g1", "g2"] {
        assert_eq!(register(&host, "", node, "10.0.0.1:80").status, 201);
    }
    let (g1, g2) = (format!("{PREFIX}greeter/g1"), format!("{PREFIX}greeter/g2"));
    let (_, lease) = held(&raw, &g1).await.unwrap();

    // Rewritten by hand, on no lease: put back within a second.
    let foreign = service_json("greeter", "1.0", "g1", "10.6.6.6:80");
    raw.clone().put(g1.as_str(), foreign, None).await.unwrap();
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || holds(
            &raw,
            &g1,
            "10.0.0.1:80",
            lease
        ))
        .await,
        "put back on the host's lease: {:?}\n{}",
        held(&raw, &g1).await,
        host.log()
    );
    eprintln!("restored {:?} after the overwrite", started.elapsed());

    // Rewritten on another lease: reported as a conflict, not fought over.
    let other = raw.clone().lease_grant(60, None).await.unwrap().id();
    let theirs = service_json("greeter", "1.0", "g2", "10.7.7.7:80");
    let on_other = etcd_client::PutOptions::new().with_lease(other);
    raw.clone()
        .put(g2.as_str(), theirs, Some(on_other))
        .await
        .unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(5), || {
            let regs = host.get("/v1/registrations").unwrap().json();
            regs["conflicts"][0]["node"] == "g2" && regs["conflicts"][0]["owner_lease"] == other
        }),
        "{}\n{}",
        host.get("/v1/registrations").unwrap().text(),
        host.log()
    );
    assert_eq!(metric(&host, "regcache_registration_conflicts_total"), 1);
    assert!(
        holds_for(Duration::from_secs(2), || holds(
            &raw,
            &g2,
            "10.7.7.7:80",
            other
        ))
        .await,
        "the other lease keeps it: {:?}",
        held(&raw, &g2).await
    );

    // SIGTERM: the host's keys go; the other lease's key stays.
    host.signal("TERM").unwrap();
    assert_eq!(
        host.wait_exit(Duration::from_secs(15)).unwrap().code(),
        Some(0)
    );
    assert_eq!(held(&raw, &g1).await, None, "{}", host.log());
    assert_eq!(held(&raw, &g2).await.map(|(_, l)| l), Some(other));
}

/// An owned key left on no lease at shutdown (rewritten by hand, and not put back: etcd is
/// out of space, so the repair's put is refused) is deleted by the shutdown: the revocation
/// alone would leave it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deletes_an_owned_key_left_on_no_lease() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint(0);
    let args = host_args(&endpoint, dir.path().to_str().unwrap(), "10s");
    let mut host = Host::start(&args).unwrap();
    let raw = raw_client(&etcd, None).await;
    assert_eq!(register(&host, "", "g1", "10.0.0.1:80").status, 201);
    let g1 = format!("{PREFIX}greeter/g1");

    // Stopped, the host cannot put the key back before etcd refuses puts.
    host.signal("STOP").unwrap();
    let foreign = service_json("greeter", "1.0", "g1", "10.6.6.6:80");
    raw.clone().put(g1.as_str(), foreign, None).await.unwrap();
    no_space(&raw, true).await;
    host.signal("CONT").unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(10), || host
            .log()
            .contains("re-putting deleted owned keys failed")),
        "the host tried to put the key back: {}",
        host.log()
    );
    assert!(
        holds(&raw, &g1, "10.6.6.6:80", 0).await,
        "still on no lease"
    );

    host.signal("TERM").unwrap();
    assert_eq!(
        host.wait_exit(Duration::from_secs(15)).unwrap().code(),
        Some(0),
        "{}",
        host.log()
    );
    no_space(&raw, false).await;
    assert_eq!(held(&raw, &g1).await, None, "{}", host.log());
}

/// go-micro registers on no lease when its `RegisterTTL` is 0: such a node, which this host
/// never registered, is someone else's (409, owner lease 0) unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registered_without_a_lease_is_not_taken_unless_forced() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = etcd.endpoint(0);
    let args = host_args(&endpoint, dir.path().to_str().unwrap(), "10s");
    let host = Host::start(&args).unwrap();
    let raw = raw_client(&etcd, None).await;
    let g1 = format!("{PREFIX}greeter/g1");
    let theirs = service_json("greeter", "1.0", "g1", "10.7.7.7:80");
    raw.clone().put(g1.as_str(), theirs, None).await.unwrap();

    let refused = register(&host, "", "g1", "10.0.0.1:80");
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(
        refused.json()["details"]["owner_lease"],
        0,
        "{}",
        refused.text()
    );
    assert!(holds(&raw, &g1, "10.7.7.7:80", 0).await, "untouched");

    let forced = register(&host, "?force=true", "g1", "10.0.0.1:80");
    assert_eq!(forced.status, 201, "{}", forced.text());
    let (value, lease) = held(&raw, &g1).await.unwrap();
    assert_eq!(address(&value), "10.0.0.1:80");
    assert_ne!(lease, 0, "on the host's lease");
}

/// A registration answered during an outage (202) is checked when it is written: another
/// host's node is refused then, and dropped, not kept as a conflict that would put it back
/// once its owner deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_answered_during_an_outage_does_not_take_another_hosts_node() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let endpoint = etcd.endpoint(0);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Leases long enough to outlast the freeze.
    let a = Host::start(&host_args(&endpoint, dir_a.path().to_str().unwrap(), "10s")).unwrap();
    let b = Host::start(&host_args(&endpoint, dir_b.path().to_str().unwrap(), "10s")).unwrap();
    let raw = raw_client(&etcd, None).await;
    let key = format!("{PREFIX}greeter/g1");
    assert_eq!(register(&a, "", "g1", "10.0.0.1:80").status, 201);
    let (_, lease_a) = held(&raw, &key).await.unwrap();

    etcd.stop(0).unwrap();
    let kept = register(&b, "", "g1", "10.0.0.2:80");
    etcd.cont(0).unwrap();
    assert_eq!(kept.status, 202, "{}", kept.text());

    assert!(
        eventually_blocking(Duration::from_secs(20), || {
            let regs = b.get("/v1/registrations").unwrap().json();
            regs["registrations"].as_array().is_some_and(Vec::is_empty)
        }),
        "B drops the refused registration: {}\n{}",
        b.get("/v1/registrations").unwrap().text(),
        b.log()
    );
    assert!(
        b.log().contains("registration refused when written"),
        "{}",
        b.log()
    );
    assert!(
        holds(&raw, &key, "10.0.0.1:80", lease_a).await,
        "A's node, untouched"
    );

    // The owner's deregistration is for good.
    deregister_for_good(&a, &b, &raw, &key).await;
}
