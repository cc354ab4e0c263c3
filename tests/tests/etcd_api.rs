//! The host's etcd-compatible endpoint (issue 11) with Debian's `etcdctl` as the client, auth on
//! and off: every operation a registry client uses, each compared with what the same etcdctl
//! command prints against etcd itself (outputs, error texts, exit codes), and its effects checked
//! in etcd (keys under the host's lease, gone when the client's lease is revoked or expires) and
//! through the HTTP API. Also: lookups answered from the cache while etcd is frozen, and a burst
//! of removals kept from watchers by the default policy while a single deregistration is sent.

use std::time::{Duration, Instant};

use regcache_tests::etcd::EtcdCluster;
use regcache_tests::etcdctl::{Etcdctl, Event, Kv, Output, Watch, kvs, text, wait_watching};
use regcache_tests::host::{Host, service_json};
use regcache_tests::wait::eventually_blocking;
use serde_json::{Value, json};

const PREFIX: &str = "/micro/registry/";

/// The host's own etcd credentials (etcd's root user).
const ROOT: (&str, &str) = ("root", "root-pw");

/// A registry client's credentials: another etcd user the host has never seen, so the endpoint
/// must check it against etcd rather than compare it with its own.
const CLIENT: (&str, &str) = ("alice", "alice-pw");

/// How long a watch child may live: longer than any test here.
const WATCH_LIFETIME: Duration = Duration::from_secs(60);

/// etcd and a host serving the endpoint on it, with etcdctl pointed at each.
struct Fixture {
    etcd: EtcdCluster,
    host: Host,
    /// etcdctl against the host's endpoint (as [`CLIENT`] when auth is on).
    endpoint: Etcdctl,
    /// The same etcdctl against etcd itself, to compare with.
    direct: Etcdctl,
    auth: bool,
}

impl Fixture {
    /// Starts etcd (with auth and the [`CLIENT`] user when `auth`), then the host on it with
    /// `extra` flags.
    async fn start(auth: bool, extra: &[&str]) -> Fixture {
        let etcd = EtcdCluster::start(1).await.unwrap();
        if auth {
            etcd.enable_auth(ROOT.0, ROOT.1).await.unwrap();
            let client = format!("{}:{}", CLIENT.0, CLIENT.1);
            etcd.etcdctl(Some(ROOT), &["user", "add", &client]).unwrap();
            etcd.etcdctl(Some(ROOT), &["user", "grant-role", CLIENT.0, "root"])
                .unwrap();
        }
        let etcd_endpoint = etcd.endpoint(0);
        let mut args = vec![
            "--etcd-endpoints",
            &etcd_endpoint,
            "--etcd-api-listen",
            "127.0.0.1:0",
            "--etcd-request-timeout",
            "1s",
        ];
        if auth {
            args.extend(["--etcd-user", ROOT.0, "--etcd-password", ROOT.1]);
        }
        args.extend_from_slice(extra);
        let host = Host::start(&args).unwrap();
        let addr = host.etcd_api.unwrap_or_else(|| {
            panic!(
                "the host logged no etcd API address (is --etcd-api-listen built?):\n{}",
                host.log()
            )
        });
        let mut endpoint = Etcdctl::new(addr.to_string());
        let mut direct = Etcdctl::new(etcd.endpoint(0));
        if auth {
            endpoint = endpoint.user(CLIENT.0, CLIENT.1);
            direct = direct.user(CLIENT.0, CLIENT.1);
        }
        Fixture {
            etcd,
            host,
            endpoint,
            direct,
            auth,
        }
    }

    /// etcd's own credentials for [`EtcdCluster::etcdctl`], when auth is on.
    fn root(&self) -> Option<(&'static str, &'static str)> {
        self.auth.then_some(ROOT)
    }

    /// The key/values under `prefix` in etcd itself.
    fn in_etcd(&self, prefix: &str) -> Vec<Kv> {
        let out = self
            .etcd
            .etcdctl(self.root(), &["get", "--prefix", prefix, "-w", "json"])
            .unwrap();
        kvs(&serde_json::from_str(&out).unwrap())
    }

    /// The keys under `prefix` in etcd itself.
    fn keys_in_etcd(&self, prefix: &str) -> Vec<String> {
        self.in_etcd(prefix).into_iter().map(|kv| kv.key).collect()
    }

    /// The ids of etcd's leases (`lease list`), in hex as etcdctl prints them.
    fn leases_in_etcd(&self) -> Vec<String> {
        let out = self.etcd.etcdctl(self.root(), &["lease", "list"]).unwrap();
        out.lines().skip(1).map(str::to_string).collect()
    }

    /// Runs `args` through the endpoint and fails with its output and the host's log unless
    /// etcdctl succeeded.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.endpoint.run(args);
        if !out.success() {
            panic!(
                "etcdctl {args:?} through the endpoint failed: {out:?}\nhost log:\n{}",
                tail(&self.host.log())
            );
        }
        out.stdout
    }

    /// `get -w json <args>` through the endpoint.
    fn get_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["get", "-w", "json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full)).unwrap()
    }

    /// The node ids the HTTP API answers for `service` (empty unless 200).
    fn http_nodes(&self, service: &str) -> Vec<String> {
        let answer = self.host.lookup(service);
        if answer.status != 200 {
            return Vec::new();
        }
        let mut ids: Vec<String> = answer.json()["services"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["nodes"].as_array().unwrap().iter())
            .map(|n| n["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// The etcd revision now.
    fn etcd_revision(&self) -> i64 {
        let out = self
            .etcd
            .etcdctl(self.root(), &["get", "-w", "json", "/"])
            .unwrap();
        let answer: Value = serde_json::from_str(&out).unwrap();
        answer["header"]["revision"].as_i64().unwrap()
    }
}

/// The last 60 lines of a log, enough to explain a failure without drowning it.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn key(service: &str, node: &str) -> String {
    format!("{PREFIX}{service}/{node}")
}

/// A go-micro registration of `node` of `service`, as a client puts it.
fn registration(service: &str, node: &str) -> String {
    service_json(service, "1.0", node, "10.0.0.1:8080")
}

/// What a go-micro client reads from a value: the service, its version and the node; an
/// encoder's choices (field order, `null` or `{}` for empty maps) do not count.
fn meaning(value: &str) -> Value {
    let v: Value = serde_json::from_str(value)
        .unwrap_or_else(|e| panic!("a value that is not JSON ({e}): {value}"));
    let map = |m: &Value| if m.is_null() { json!({}) } else { m.clone() };
    let nodes: Vec<Value> = v["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|n| json!({"id": n["id"], "address": n["address"], "metadata": map(&n["metadata"])}))
        .collect();
    json!({"name": v["name"], "version": v["version"], "metadata": map(&v["metadata"]),
           "nodes": nodes})
}

/// A key/value as compared between the endpoint and etcd: the value by [`meaning`]. Not the
/// lease (the host's, not the client's, by design) nor the key's revisions: the cache keeps no
/// revision per node, so the endpoint gives every key its answer's revision, which is etcd's
/// (checked below: never ahead of etcd's).
fn comparable(kv: &Kv) -> Value {
    json!({
        "key": kv.key,
        "value": if kv.value.is_empty() { Value::Null } else { meaning(&kv.value) },
        "version": kv.version,
    })
}

fn comparable_all(answer: &Value) -> Vec<Value> {
    kvs(answer).iter().map(comparable).collect()
}

/// Simple output of `get` as (key, value) pairs: each key/value is two lines.
fn simple_pairs(out: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .map(|p| (p[0].to_string(), p.get(1).unwrap_or(&"").to_string()))
        .collect()
}

/// An etcdctl result with a lease id, keys and remaining seconds replaced, so that the same
/// command against etcd and against the endpoint print the same.
fn normalized(out: &Output, lease: &str, keys: &[&str]) -> (Option<i32>, String, Option<String>) {
    let fix = |s: &str| {
        let mut s = s.replace(lease, "LEASE");
        for (i, k) in keys.iter().enumerate() {
            s = s.replace(k, &format!("KEY{i}"));
        }
        // remaining(9s) counts down; etcd says 9 right after a grant of 10, and so may we.
        match s.find("remaining(") {
            Some(at) => {
                let end = s[at..].find(')').map_or(s.len(), |e| at + e);
                format!("{}remaining(N{}", &s[..at], &s[end..])
            }
            None => s,
        }
    };
    (
        out.code,
        fix(&out.stdout),
        out.error().map(|e| fix(e).to_string()),
    )
}

/// Differences between the endpoint's answers and etcd's, collected so that one run reports
/// every one of them rather than the first.
#[derive(Default)]
struct Differences(Vec<String>);

impl Differences {
    /// Notes `what` unless the endpoint's `ours` equals etcd's `theirs`.
    fn compare<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, ours: T, theirs: T) {
        if ours != theirs {
            self.0.push(format!(
                "{what}:\n  endpoint {ours:?}\n  etcd     {theirs:?}"
            ));
        }
    }

    /// Notes `what` with `detail` unless `holds`.
    fn check(&mut self, what: &str, holds: bool, detail: impl std::fmt::Debug) {
        if !holds {
            self.0.push(format!("{what}: {detail:?}"));
        }
    }

    /// Fails with every difference noted, and the host's log.
    fn assert_none(self, host: &Host) {
        assert!(
            self.0.is_empty(),
            "{} difference(s) from etcd:\n{}\nhost log:\n{}",
            self.0.len(),
            self.0.join("\n"),
            tail(&host.log())
        );
    }
}

/// The header revision of an answer of `-w json`.
fn header_revision(answer: &Value) -> i64 {
    answer["header"]["revision"].as_i64().unwrap_or(0)
}

/// The hex id etcdctl prints in `lease <id> granted with TTL(...)`.
fn granted_id(out: &Output) -> String {
    out.stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no lease granted: {out:?}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// KV

async fn kv_agrees_with_etcd(auth: bool) {
    let fx = Fixture::start(auth, &[]).await;
    // Someone else's registration, written to etcd directly (no lease of the host's).
    fx.etcd
        .etcdctl(
            fx.root(),
            &["put", &key("billing", "b1"), &registration("billing", "b1")],
        )
        .unwrap();

    // Put of one key: etcd's "OK", and the key in etcd with the value's meaning.
    let g1 = key("greeter", "g1");
    assert_eq!(fx.ok(&["put", &g1, &registration("greeter", "g1")]), "OK\n");
    let g2 = key("greeter", "g2");
    assert_eq!(fx.ok(&["put", &g2, &registration("greeter", "g2")]), "OK\n");
    let stored = fx.in_etcd(&key("greeter", ""));
    assert_eq!(
        stored.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        [g1.as_str(), g2.as_str()]
    );
    assert_eq!(
        meaning(&stored[0].value),
        meaning(&registration("greeter", "g1"))
    );
    assert_ne!(stored[0].lease, 0, "a registration is on the host's lease");

    // Get of one key, simple and JSON: as etcd answers it (revisions included). The header's
    // revision may lag etcd's, never lead it: a client that watches from the revision after a
    // listing would miss etcd's changes in between.
    let mut differences = Differences::default();
    let from_etcd = fx.direct.run(&["get", "-w", "json", &g1]).json().unwrap();
    let answer = fx.get_json(&[&g1]);
    differences.compare(
        "get of one key",
        comparable_all(&answer),
        comparable_all(&from_etcd),
    );
    differences.check(
        "get of one key: header revision at most etcd's",
        header_revision(&answer) <= fx.etcd_revision(),
        (header_revision(&answer), fx.etcd_revision()),
    );
    assert_eq!(answer["count"], 1, "{answer}");
    let simple = simple_pairs(&fx.ok(&["get", &g1]));
    assert_eq!(simple.len(), 1, "{simple:?}");
    assert_eq!(simple[0].0, g1);
    assert_eq!(
        meaning(&simple[0].1),
        meaning(&registration("greeter", "g1"))
    );

    // Get --prefix of a service: a cache lookup, the same key/values as etcd's.
    let service_prefix = key("greeter", "");
    let from_etcd = fx
        .direct
        .run(&["get", "--prefix", &service_prefix, "-w", "json"])
        .json()
        .unwrap();
    let answer = fx.get_json(&["--prefix", &service_prefix]);
    differences.compare(
        "get --prefix of a service",
        comparable_all(&answer),
        comparable_all(&from_etcd),
    );
    differences.check(
        "get --prefix of a service: header revision at most etcd's",
        header_revision(&answer) <= fx.etcd_revision(),
        (header_revision(&answer), fx.etcd_revision()),
    );
    assert_eq!(answer["count"], 2, "{answer}");

    // The whole prefix: what the host knows, which includes billing once its watch saw it.
    let whole = |client: &Etcdctl, extra: &[&str]| {
        let mut args = vec!["get", "--prefix", PREFIX];
        args.extend_from_slice(extra);
        client.run(&args)
    };
    assert!(
        eventually_blocking(Duration::from_secs(5), || {
            whole(&fx.endpoint, &["--keys-only"]).stdout
                == whole(&fx.direct, &["--keys-only"]).stdout
        }),
        "--keys-only of the whole prefix: endpoint {:?}, etcd {:?}",
        whole(&fx.endpoint, &["--keys-only"]),
        whole(&fx.direct, &["--keys-only"]).stdout
    );
    let from_etcd = whole(&fx.direct, &["-w", "json"]).json().unwrap();
    let answer = whole(&fx.endpoint, &["-w", "json"]).json().unwrap();
    differences.compare(
        "get --prefix of the whole prefix",
        comparable_all(&answer),
        comparable_all(&from_etcd),
    );
    // etcdctl 3.4 has no --count-only (3.5 does): the count is the JSON answer's, here with
    // --keys-only, which is how 3.4 users count.
    let counted = |client: &Etcdctl| {
        whole(client, &["--keys-only", "-w", "json"])
            .json()
            .unwrap()
    };
    differences.compare(
        "count of the whole prefix",
        counted(&fx.endpoint)["count"].clone(),
        counted(&fx.direct)["count"].clone(),
    );
    // --limit: the first key, the total count and "more", as etcd answers.
    let limited = |client: &Etcdctl| {
        whole(client, &["--limit", "1", "-w", "json"])
            .json()
            .unwrap()
    };
    let (answer, from_etcd) = (limited(&fx.endpoint), limited(&fx.direct));
    differences.compare(
        "--limit 1",
        comparable_all(&answer),
        comparable_all(&from_etcd),
    );
    differences.compare(
        "--limit 1: count and more",
        (&answer["count"], &answer["more"]),
        (&from_etcd["count"], &from_etcd["more"]),
    );
    assert_eq!(from_etcd["more"], true, "{from_etcd}");

    // The HTTP API agrees.
    assert_eq!(fx.http_nodes("greeter"), ["g1", "g2"]);

    // Put --prev-kv: the previous value printed after OK, as etcd does.
    let out = fx.ok(&["put", "--prev-kv", &g1, &registration("greeter", "g1")]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "OK, previous key, previous value: {out}");
    assert_eq!((lines[0], lines[1]), ("OK", g1.as_str()));
    assert_eq!(meaning(lines[2]), meaning(&registration("greeter", "g1")));

    // Del: etcd's count of deleted keys; the key leaves etcd and the HTTP API's answer (a
    // single deregistration, applied at once by the default policy).
    assert_eq!(fx.ok(&["del", &g2]), "1\n");
    assert_eq!(fx.keys_in_etcd(&service_prefix), std::slice::from_ref(&g1));
    assert!(
        eventually_blocking(Duration::from_secs(5), || fx.http_nodes("greeter")
            == ["g1"]),
        "the HTTP API drops g2: {:?}",
        fx.http_nodes("greeter")
    );
    assert_eq!(
        fx.ok(&["del", &g2]),
        "0\n",
        "deleting it again deletes none"
    );
    // Only keys this host registered are deleted: someone else's stays.
    let out = fx.endpoint.run(&["del", &key("billing", "b1")]);
    assert_eq!(
        fx.keys_in_etcd(&key("billing", "")),
        [key("billing", "b1")],
        "another client's key is not deleted through the endpoint: {out:?}"
    );

    // With auth off, a client that sends credentials anyway works, as against etcd (clientv3
    // takes "authentication is not enabled" as no token needed).
    if !auth {
        let with_user = |c: &Etcdctl| c.clone().user("anyone", "x").run(&["get", &g1]);
        let (through, direct) = (with_user(&fx.endpoint), with_user(&fx.direct));
        assert!(direct.success(), "etcd: {direct:?}");
        assert!(through.success(), "endpoint: {through:?}");
        assert_eq!(simple_pairs(&through.stdout)[0].0, g1);
        // What made clientv3 go on: etcd's FailedPrecondition text, in its warning.
        let not_enabled =
            "code = FailedPrecondition desc = etcdserver: authentication is not enabled";
        assert!(direct.stderr.contains(not_enabled), "etcd: {direct:?}");
        assert!(
            through.stderr.contains(not_enabled),
            "endpoint: {through:?}"
        );
    }
    differences.assert_none(&fx.host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_agrees_with_etcd_auth_on() {
    kv_agrees_with_etcd(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_agrees_with_etcd_auth_off() {
    kv_agrees_with_etcd(false).await;
}

// ---------------------------------------------------------------------------------------------
// Leases

/// The lease commands a registry client runs, against `client`, with `key` put on the lease:
/// each result normalized for comparison, then the lease id.
fn lease_session(client: &Etcdctl, key: &str, value: &str) -> (Vec<(String, Output)>, String) {
    let mut steps = Vec::new();
    let granted = client.run(&["lease", "grant", "10"]);
    let id = granted_id(&granted);
    steps.push(("grant 10".to_string(), granted));
    let commands: Vec<(&str, Vec<&str>)> = vec![
        ("put --lease", vec!["put", "--lease", &id, key, value]),
        (
            "keep-alive --once",
            vec!["lease", "keep-alive", "--once", &id],
        ),
        ("timetolive", vec!["lease", "timetolive", &id]),
        (
            "timetolive --keys",
            vec!["lease", "timetolive", "--keys", &id],
        ),
        ("revoke", vec!["lease", "revoke", &id]),
        (
            "keep-alive --once after revoke",
            vec!["lease", "keep-alive", "--once", &id],
        ),
        ("timetolive after revoke", vec!["lease", "timetolive", &id]),
        ("revoke again", vec!["lease", "revoke", &id]),
    ];
    for (name, args) in commands {
        steps.push((name.to_string(), client.run(&args)));
    }
    (steps, id)
}

async fn leases_behave_as_etcds(auth: bool) {
    let fx = Fixture::start(auth, &[]).await;
    // Another service for the session against etcd: its lease, revoked there, would otherwise
    // count as a recent removal of the same service when l1 goes, and the policy would hold l1.
    let via_etcd = key("leased-direct", "d1");
    let via_host = key("leased", "l1");

    let (expected, etcd_id) =
        lease_session(&fx.direct, &via_etcd, &registration("leased-direct", "d1"));
    // The same session through the endpoint, stopping before the revoke to look at etcd.
    let granted = fx.endpoint.run(&["lease", "grant", "10"]);
    let id = granted_id(&granted);
    assert_eq!(
        normalized(&granted, &id, &[]),
        normalized(&expected[0].1, &etcd_id, &[]),
        "grant 10"
    );
    let mut got = vec![("grant 10".to_string(), granted)];
    let value = registration("leased", "l1");
    for (name, args) in [
        (
            "put --lease",
            vec!["put", "--lease", &id, &via_host, &value],
        ),
        (
            "keep-alive --once",
            vec!["lease", "keep-alive", "--once", &id],
        ),
        ("timetolive", vec!["lease", "timetolive", &id]),
        (
            "timetolive --keys",
            vec!["lease", "timetolive", "--keys", &id],
        ),
    ] {
        got.push((name.to_string(), fx.endpoint.run(&args)));
    }

    // In etcd: the key, under the host's lease; the client's lease is not there at all.
    let stored = fx.in_etcd(&key("leased", ""));
    assert_eq!(stored.len(), 1, "the leased key is in etcd: {stored:?}");
    let host_lease = regcache::registry::lease_hex(stored[0].lease);
    assert!(stored[0].lease != 0, "the key is on a lease: {stored:?}");
    assert_ne!(host_lease, id, "on the host's lease, not the client's");
    let etcd_leases = fx.leases_in_etcd();
    assert!(
        etcd_leases.contains(&host_lease) && !etcd_leases.contains(&id),
        "etcd holds the host's lease {host_lease}, not the client's {id}: {etcd_leases:?}"
    );
    // `lease list` through the endpoint: the client's lease, in etcd's format.
    let listed = fx.endpoint.run(&["lease", "list"]);
    assert!(
        listed.success() && listed.stdout.lines().any(|l| l == id),
        "lease list names {id}: {listed:?}"
    );
    assert!(
        listed.stdout.starts_with("found "),
        "etcd's format, `found N leases`: {listed:?}"
    );
    assert_eq!(fx.http_nodes("leased"), ["l1"]);

    for (name, args) in [
        ("revoke", vec!["lease", "revoke", &id]),
        (
            "keep-alive --once after revoke",
            vec!["lease", "keep-alive", "--once", &id],
        ),
        ("timetolive after revoke", vec!["lease", "timetolive", &id]),
        ("revoke again", vec!["lease", "revoke", &id]),
    ] {
        got.push((name.to_string(), fx.endpoint.run(&args)));
    }
    let mut differences = Differences::default();
    for ((name, ours), (_, theirs)) in got.iter().zip(&expected) {
        differences.compare(
            name,
            normalized(ours, &id, &[&via_host]),
            normalized(theirs, &etcd_id, &[&via_etcd]),
        );
    }
    differences.assert_none(&fx.host);

    // Revoked: the key leaves etcd and the HTTP API.
    assert!(
        eventually_blocking(Duration::from_secs(3), || fx
            .keys_in_etcd(&key("leased", ""))
            .is_empty()),
        "the revoked lease's key is deleted from etcd: {:?}",
        fx.keys_in_etcd(&key("leased", ""))
    );
    assert!(
        eventually_blocking(Duration::from_secs(5), || fx
            .http_nodes("leased")
            .is_empty()),
        "the HTTP API drops l1: {:?}",
        fx.http_nodes("leased")
    );

    // A TTL below etcd's minimum is raised to 2 s, as etcd does; a lease left to expire takes
    // its key out of etcd within its TTL and a second.
    let short_etcd = fx.direct.run(&["lease", "grant", "1"]);
    let short = fx.endpoint.run(&["lease", "grant", "1"]);
    let short_id = granted_id(&short);
    assert_eq!(
        normalized(&short, &short_id, &[]),
        normalized(&short_etcd, &granted_id(&short_etcd), &[]),
        "grant 1"
    );
    let expiring = key("expiring", "e1");
    fx.ok(&[
        "put",
        "--lease",
        &short_id,
        &expiring,
        &registration("expiring", "e1"),
    ]);
    let put_at = Instant::now();
    assert_eq!(fx.keys_in_etcd(&expiring), std::slice::from_ref(&expiring));
    assert!(
        eventually_blocking(Duration::from_secs(6), || fx
            .keys_in_etcd(&expiring)
            .is_empty()),
        "the expired lease's key is deleted from etcd"
    );
    let gone_after = put_at.elapsed();
    eprintln!("key of a 2 s lease gone from etcd {gone_after:?} after its put");
    assert!(
        gone_after <= Duration::from_secs(3) + Duration::from_millis(500),
        "within the TTL and a second (and the time to ask): {gone_after:?}"
    );
    let expired = fx.endpoint.run(&["lease", "timetolive", &short_id]);
    assert_eq!(
        expired.stdout,
        format!("lease {short_id} already expired\n"),
        "{expired:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_behave_as_etcds_auth_on() {
    leases_behave_as_etcds(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_behave_as_etcds_auth_off() {
    leases_behave_as_etcds(false).await;
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_etcds_or_name_regcache() {
    let fx = Fixture::start(true, &[]).await;
    let g1 = key("greeter", "g1");

    // A wrong password and no user at all: etcd's own texts and exit codes.
    for (what, user) in [
        ("wrong password", Some((CLIENT.0, "not-the-password"))),
        ("unknown user", Some(("mallory", "x"))),
        ("no user", None),
    ] {
        let run = |target: &Etcdctl| {
            let target = Etcdctl::new(target.endpoint());
            let target = match user {
                Some((u, p)) => target.user(u, p),
                None => target,
            };
            target.run(&["get", &g1])
        };
        let (ours, theirs) = (run(&fx.endpoint), run(&fx.direct));
        assert!(!theirs.success(), "{what}: etcd refuses: {theirs:?}");
        assert_eq!(
            (ours.code, ours.error()),
            (theirs.code, theirs.error()),
            "{what}: endpoint {ours:?}\netcd {theirs:?}"
        );
    }
    assert_eq!(
        Etcdctl::new(fx.endpoint.endpoint())
            .user(CLIENT.0, "not-the-password")
            .run(&["get", &g1])
            .error(),
        Some("etcdserver: authentication failed, invalid user ID or password")
    );

    // Values that are not a valid registration of their key: refused, nothing written.
    for (what, key, value) in [
        ("not JSON", g1.clone(), "{not json".to_string()),
        (
            "no name",
            g1.clone(),
            r#"{"nodes":[{"id":"g1"}]}"#.to_string(),
        ),
        (
            "another node's value",
            g1.clone(),
            registration("greeter", "g2"),
        ),
        (
            "another service's value",
            g1.clone(),
            registration("billing", "g1"),
        ),
        (
            "a key with no node",
            key("greeter", ""),
            registration("greeter", "g1"),
        ),
    ] {
        let out = fx.endpoint.run(&["put", &key, &value]);
        assert!(
            !out.success() && out.error().is_some_and(|e| e.contains("InvalidArgument")),
            "{what}: InvalidArgument: {out:?}"
        );
    }
    assert_eq!(
        fx.keys_in_etcd(PREFIX),
        Vec::<String>::new(),
        "nothing written"
    );

    // Outside the prefix: PermissionDenied naming regcache and the prefix, for writes and reads.
    for args in [
        vec!["put", "/elsewhere/x", "v"],
        vec!["get", "/elsewhere/x"],
        vec!["get", "--prefix", "/"],
        vec!["del", "/elsewhere/x"],
    ] {
        let out = fx.endpoint.run(&args);
        let error = out.error().unwrap_or_default();
        assert!(
            !out.success()
                && error.contains("PermissionDenied")
                && error.contains("regcache")
                && error.contains(PREFIX),
            "{args:?}: refused naming regcache and {PREFIX}: {out:?}"
        );
    }
    assert!(fx.keys_in_etcd("/elsewhere/").is_empty(), "nothing written");

    // Txn: Unimplemented naming regcache (etcdctl reads compares, a blank line, then the
    // success requests; checked to work against etcd).
    let txn = format!("\nput {g1} {}\n\n\n", registration("greeter", "g1"));
    let out = fx.endpoint.run_with_stdin(&["txn"], &txn);
    let error = out.error().unwrap_or_default();
    assert!(
        !out.success() && error.contains("Unimplemented") && error.contains("regcache"),
        "txn refused naming regcache: {out:?}"
    );
    assert!(fx.keys_in_etcd(PREFIX).is_empty(), "nothing written");
    let against_etcd = fx.direct.run_with_stdin(&["txn"], &txn);
    assert_eq!(
        against_etcd.stdout, "SUCCESS\n\nOK\n",
        "the same txn works against etcd: {against_etcd:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Watch

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prefix_prints_what_etcds_watch_prints() {
    let fx = Fixture::start(true, &[]).await;
    let g1 = key("greeter", "g1");
    let b1 = key("billing", "b1");
    let marker = key("watch-marker", "m1");
    let ours = fx
        .endpoint
        .watch(&["--prefix", PREFIX], WATCH_LIFETIME)
        .unwrap();
    let one_key = fx.endpoint.watch(&[&g1], WATCH_LIFETIME).unwrap();
    let theirs = fx
        .direct
        .watch(&["--prefix", PREFIX], WATCH_LIFETIME)
        .unwrap();
    let put_marker = || {
        fx.etcd
            .etcdctl(
                fx.root(),
                &["put", &marker, &registration("watch-marker", "m1")],
            )
            .unwrap();
    };
    assert!(
        wait_watching(
            &[&ours, &theirs],
            &marker,
            Duration::from_secs(10),
            put_marker
        ),
        "both watches print the marker: endpoint {:?} {:?}; etcd {:?}\nhost log:\n{}",
        ours.stdout(),
        ours.stderr(),
        theirs.stdout(),
        tail(&fx.host.log())
    );

    // Through the endpoint and by another client directly in etcd, puts and deletes.
    fx.ok(&["put", &g1, &registration("greeter", "g1")]);
    fx.etcd
        .etcdctl(fx.root(), &["put", &b1, &registration("billing", "b1")])
        .unwrap();
    fx.ok(&["del", &g1]);
    fx.etcd.etcdctl(fx.root(), &["del", &b1]).unwrap();

    let expected = [("PUT", &g1), ("PUT", &b1), ("DELETE", &g1), ("DELETE", &b1)];
    let shape = |events: &[Event]| {
        events
            .iter()
            .map(|e| {
                let value = (!e.value.is_empty()).then(|| meaning(&e.value));
                (e.kind.clone(), e.key.clone(), value)
            })
            .collect::<Vec<_>>()
    };
    let settled = |w: &Watch| w.events_after(&marker).len() >= expected.len();
    assert!(
        eventually_blocking(Duration::from_secs(5), || settled(&ours)
            && settled(&theirs)),
        "four events on each: endpoint {:?}; etcd {:?}\nhost log:\n{}",
        ours.events_after(&marker),
        theirs.events_after(&marker),
        tail(&fx.host.log())
    );
    let from_etcd = shape(&theirs.events_after(&marker));
    assert_eq!(
        from_etcd
            .iter()
            .map(|(k, key, _)| (k.as_str(), key))
            .collect::<Vec<_>>(),
        expected,
        "etcd's own watch"
    );
    assert_eq!(shape(&ours.events_after(&marker)), from_etcd);
    // A key watch sees that key only.
    assert!(
        eventually_blocking(Duration::from_secs(5), || one_key.events().len() >= 2),
        "the key watch prints g1's put and delete: {:?}",
        one_key.stdout()
    );
    let of_g1: Vec<_> = from_etcd.into_iter().filter(|(_, k, _)| *k == g1).collect();
    assert_eq!(shape(&one_key.events()), of_g1);
}

/// Four of five nodes of a service deleted in etcd at once (one transaction) are kept as suspect
/// by the default policy: a `watch --prefix` through the endpoint is not sent their DELETEs,
/// while etcd's own watch is; a single deregistration of another service is sent at once. The
/// suspect hold is shortened to 4 s so that the delayed DELETEs are seen to come after it, with
/// revisions after the last one sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_removals_is_held_from_watchers_a_deregistration_is_not() {
    const HOLD: Duration = Duration::from_secs(4);
    let fx = Fixture::start(false, &["--policy-config", "suspect-hold-ms=4000"]).await;
    let svc: Vec<String> = (1..=5).map(|i| key("svc", &format!("n{i}"))).collect();
    for (i, k) in svc.iter().enumerate() {
        fx.etcd
            .etcdctl(
                None,
                &["put", k, &registration("svc", &format!("n{}", i + 1))],
            )
            .unwrap();
    }
    for id in ["s1", "s2", "s3"] {
        fx.etcd
            .etcdctl(None, &["put", &key("solo", id), &registration("solo", id)])
            .unwrap();
    }
    assert_eq!(fx.http_nodes("svc"), ["n1", "n2", "n3", "n4", "n5"]);
    assert_eq!(fx.http_nodes("solo"), ["s1", "s2", "s3"]);

    let marker = key("watch-marker", "m1");
    let ours = fx
        .endpoint
        .watch(&["--prefix", PREFIX], WATCH_LIFETIME)
        .unwrap();
    let ours_json = fx
        .endpoint
        .watch(&["--prefix", PREFIX, "-w", "json"], WATCH_LIFETIME)
        .unwrap();
    let theirs = fx
        .direct
        .watch(&["--prefix", PREFIX], WATCH_LIFETIME)
        .unwrap();
    let put_marker = || {
        fx.etcd
            .etcdctl(None, &["put", &marker, &registration("watch-marker", "m1")])
            .unwrap();
    };
    assert!(
        wait_watching(
            &[&ours, &ours_json, &theirs],
            &marker,
            Duration::from_secs(10),
            put_marker
        ),
        "the watches print the marker: endpoint {:?} {:?}, {:?}; etcd {:?}",
        ours.stdout(),
        ours.stderr(),
        ours_json.stdout(),
        theirs.stdout()
    );

    let burst: String = svc[..4].iter().map(|k| format!("del {k}\n")).collect();
    let deleted = fx
        .direct
        .run_with_stdin(&["txn"], &format!("\n{burst}\n\n"));
    let burst_at = Instant::now();
    assert!(deleted.success(), "{deleted:?}");
    let deletes_of = |w: &Watch, prefix: &str| {
        w.events_after(&marker)
            .into_iter()
            .filter(|e| e.kind == "DELETE" && e.key.starts_with(prefix))
            .count()
    };
    let svc_prefix = key("svc", "");
    assert!(
        eventually_blocking(Duration::from_secs(5), || deletes_of(&theirs, &svc_prefix)
            == 4),
        "etcd's own watch gets the 4 deletes: {:?}",
        theirs.events_after(&marker)
    );
    // The HTTP API shows what the guard decided: all five, four of them suspect.
    let suspects = || {
        let answer = fx.host.lookup("svc").json();
        answer["provenance"]["suspect_nodes"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert!(
        eventually_blocking(Duration::from_secs(3), || suspects() == 4),
        "four suspect nodes: {}",
        fx.host.lookup("svc").text()
    );

    // A single deregistration of another service reaches the watch at once.
    fx.etcd.etcdctl(None, &["del", &key("solo", "s2")]).unwrap();
    // Nothing else writes now (the markers are done, leases do not count): this is the
    // delete's revision.
    let solo_deleted_at = fx.etcd_revision();
    let solo_prefix = key("solo", "");
    assert!(
        eventually_blocking(Duration::from_secs(3), || deletes_of(&ours, &solo_prefix)
            == 1),
        "the deregistration of solo/s2 is sent: {:?}\nhost log:\n{}",
        ours.events_after(&marker),
        tail(&fx.host.log())
    );
    let solo_seen = burst_at.elapsed();
    assert_eq!(
        deletes_of(&ours, &svc_prefix),
        0,
        "no DELETE of the burst is sent while it is held ({solo_seen:?} after it): {:?}",
        ours.events_after(&marker)
    );
    assert!(
        solo_seen < HOLD,
        "the check ran within the hold: {solo_seen:?}"
    );

    // When the hold ends the guard lets them go: the DELETEs come then.
    assert!(
        eventually_blocking(HOLD + Duration::from_secs(5), || deletes_of(
            &ours,
            &svc_prefix
        ) == 4),
        "the held DELETEs come after the hold: {:?}\nhost log:\n{}",
        ours.events_after(&marker),
        tail(&fx.host.log())
    );
    let released = burst_at.elapsed();
    eprintln!("held DELETEs sent {released:?} after the burst");
    assert!(
        released >= HOLD - Duration::from_millis(500),
        "not before the hold ends: {released:?}"
    );
    // Their revisions are the last one etcd made (solo/s2's delete), and never go back.
    assert!(
        eventually_blocking(Duration::from_secs(3), || json_deletes(
            &ours_json,
            &svc_prefix
        )
        .len()
            == 4),
        "the JSON watch has the 4 delayed DELETEs: {}",
        ours_json.stdout()
    );
    let solo_revision = json_deletes(&ours_json, &solo_prefix)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("solo's DELETE on the JSON watch: {}", ours_json.stdout()));
    let held = json_deletes(&ours_json, &svc_prefix);
    assert!(
        held.iter().all(|&r| r >= solo_revision),
        "delayed DELETEs {held:?} after solo's {solo_revision}"
    );
    let headers = json_header_revisions(&ours_json);
    assert!(
        headers.windows(2).all(|w| w[0] <= w[1]),
        "header revisions never go back: {headers:?}"
    );
    assert_eq!(
        solo_revision,
        solo_deleted_at,
        "solo's DELETE carries etcd's revision; the JSON watch printed:\n{}",
        ours_json.stdout()
    );
}

/// The mod_revision of every DELETE under `prefix` in a `watch -w json`'s output.
fn json_deletes(watch: &Watch, prefix: &str) -> Vec<i64> {
    let mut revisions = Vec::new();
    for response in watch.responses() {
        for event in response["Events"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            // etcd's JSON omits the type of a PUT (0); a DELETE is 1.
            let kv = &event["kv"];
            if event["type"] == 1 && text(&kv["key"]).starts_with(prefix) {
                revisions.push(kv["mod_revision"].as_i64().unwrap_or(0));
            }
        }
    }
    revisions
}

/// The header revision of every response of a `watch -w json`.
fn json_header_revisions(watch: &Watch) -> Vec<i64> {
    watch
        .responses()
        .iter()
        .filter_map(|r| r["Header"]["revision"].as_i64())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Faults and cluster calls

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_through_the_endpoint_answer_from_the_cache_while_etcd_is_frozen() {
    // Answers turn stale after 300 ms, so most lookups below are past their freshness.
    let fx = Fixture::start(
        true,
        &[
            "--policy-config",
            "ttl-ms=300,min-retry-interval-ms=100,max-wait-ms=500",
        ],
    )
    .await;
    let g1 = key("greeter", "g1");
    fx.ok(&["put", &g1, &registration("greeter", "g1")]);
    let service_prefix = key("greeter", "");
    // Once before the freeze: the cache has the service and the endpoint the credential.
    assert_eq!(
        simple_pairs(&fx.ok(&["get", "--prefix", &service_prefix]))[0].0,
        g1
    );

    fx.etcd.stop(0).unwrap();
    // A bound well inside what a client waits, so a lookup that went to etcd shows.
    let bounded = fx.endpoint.clone().command_timeout(Duration::from_secs(2));
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let asked = Instant::now();
        let out = bounded.run(&["get", "--prefix", &service_prefix]);
        let took = asked.elapsed();
        slowest = slowest.max(took);
        let answered =
            out.success() && simple_pairs(&out.stdout).first().is_some_and(|p| p.0 == g1);
        if !answered {
            failures.push(format!("{took:?}: {out:?}"));
        }
    }
    let one_key = bounded.run(&["get", &g1]);
    fx.etcd.cont(0).unwrap();
    eprintln!("slowest etcdctl lookup while etcd was frozen: {slowest:?}");
    assert!(
        failures.is_empty(),
        "every lookup answered from the cache while etcd was frozen:\n{}\nhost log:\n{}",
        failures.join("\n"),
        tail(&fx.host.log())
    );
    // etcdctl's own start and authentication included; etcd frozen would take the full 2 s.
    assert!(
        slowest < Duration::from_secs(1),
        "each lookup answered quickly: slowest {slowest:?}"
    );
    assert!(
        one_key.success()
            && simple_pairs(&one_key.stdout)
                .first()
                .is_some_and(|p| p.0 == g1),
        "a one-key get is answered too: {one_key:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_and_endpoint_status_name_the_endpoint() {
    let fx = Fixture::start(true, &[]).await;
    let addr = fx.endpoint.endpoint().to_string();

    // Simple output: "id, started, name, peer URLs, client URLs, is learner", as etcd prints it.
    let theirs = fx.direct.run(&["member", "list"]).ok().unwrap();
    let ours = fx.ok(&["member", "list"]);
    let fields = |out: &str| -> Vec<Vec<String>> {
        out.lines()
            .map(|l| l.split(", ").map(str::to_string).collect())
            .collect()
    };
    let (ours_f, theirs_f) = (fields(&ours), fields(&theirs));
    assert_eq!(ours_f.len(), 1, "one member: {ours}");
    assert_eq!(
        ours_f[0].len(),
        theirs_f[0].len(),
        "etcd: {theirs}\nendpoint: {ours}"
    );
    assert_eq!(ours_f[0][1], "started", "{ours}");
    assert!(
        ours_f[0][4].contains(&addr),
        "client URLs name {addr}: {ours}"
    );
    assert!(
        !ours.contains(&fx.etcd.endpoint(0)),
        "answered locally, not etcd's member: {ours}"
    );
    let json = fx
        .endpoint
        .run(&["member", "list", "-w", "json"])
        .json()
        .unwrap();
    let urls = &json["members"][0]["clientURLs"];
    assert!(
        urls.as_array().is_some_and(|u| u
            .iter()
            .any(|u| u.as_str().is_some_and(|u| u.ends_with(&addr)))),
        "{json}"
    );

    // "endpoint, id, version, db size, is leader, is learner, raft term, raft index, raft
    // applied index, errors".
    let theirs = fx.direct.run(&["endpoint", "status"]).ok().unwrap();
    let ours = fx.ok(&["endpoint", "status"]);
    let (ours_f, theirs_f) = (fields(&ours), fields(&theirs));
    assert_eq!(ours_f.len(), 1, "{ours}");
    assert_eq!(
        ours_f[0].len(),
        theirs_f[0].len(),
        "etcd: {theirs}\nendpoint: {ours}"
    );
    assert_eq!(ours_f[0][0], addr, "{ours}");
    let status = fx
        .endpoint
        .run(&["endpoint", "status", "-w", "json"])
        .json()
        .unwrap();
    assert_eq!(status[0]["Endpoint"], addr.as_str(), "{status}");
    assert!(status[0]["Status"]["version"].is_string(), "{status}");
}
