//! The host's HTTP API on the embedded registry (no etcd): lookups and registrations, bad
//! requests, the admin endpoints and policy swaps (API, file change, SIGHUP), metrics, and bad
//! configuration. The real binary, as operators run it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use regcache_tests::binary::{regcache_bin, run_regcache};
use regcache_tests::etcd::TlsFiles;
use regcache_tests::host::{Host, RunAs, service_json, write_atomically};
use regcache_tests::http::{Response, request_head_only};
use regcache_tests::policies::{policy_path, policy_wasm};
use regcache_tests::wait::eventually_blocking;
use serde_json::Value;

const TOKEN: &str = "s3cret-token";

/// Method, path, headers, body, expected status.
type BadRequest<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16);

/// Arguments, environment, what the error line must contain.
type BadConfig<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

/// sha256 of `bytes`, hex, by coreutils' `sha256sum` (the same digest the host reports).
fn sha256_hex(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn post_service(host: &Host, body: &str) -> Response {
    host.request("POST", "/v1/registrations", &[], body.as_bytes())
        .unwrap()
}

fn put_policy(host: &Host, query: &str, wasm: &[u8]) -> Response {
    let (name, value) = bearer();
    host.request(
        "PUT",
        &format!("/v1/policy{query}"),
        &[(name, &value)],
        wasm,
    )
    .unwrap()
}

fn active_digest(host: &Host) -> String {
    host.get("/v1/policy").unwrap().json()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn node_ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["nodes"].as_array().unwrap().iter())
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn suspects(answer: &Value) -> Vec<String> {
    answer["provenance"]["suspect_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn registers_and_looks_up_on_the_embedded_registry() {
    let host = Host::start(&[]).unwrap();
    assert!(
        host.log()
            .lines()
            .next()
            .unwrap()
            .contains("embedded in-memory registry"),
        "the first log line says there is no etcd:\n{}",
        host.log()
    );
    let created = post_service(
        &host,
        &service_json("greeter", "1.0", "g1", "10.0.0.1:8080"),
    );
    assert_eq!(created.status, 201, "{}", created.text());

    let found = host.lookup("greeter");
    assert_eq!(found.status, 200, "{}", found.text());
    let body = found.json();
    assert_eq!(body["name"], "greeter");
    assert_eq!(node_ids(&body), ["g1"]);
    assert_eq!(body["services"][0]["version"], "1.0");
    assert_eq!(body["services"][0]["nodes"][0]["address"], "10.0.0.1:8080");
    let provenance = &body["provenance"];
    assert!(
        ["registry", "fresh"].contains(&provenance["source"].as_str().unwrap()),
        "{provenance}"
    );
    assert_eq!(provenance["policy"]["generation"], 1);
    assert_eq!(provenance["policy"]["digest"].as_str().unwrap().len(), 64);
    assert_eq!(
        host.lookup("greeter").json()["provenance"]["source"],
        "fresh"
    );

    let list = host.get("/v1/services").unwrap().json();
    assert_eq!(list["services"], serde_json::json!(["greeter"]));
    let regs = host.get("/v1/registrations").unwrap().json();
    assert_eq!(regs["registrations"][0]["name"], "greeter");

    let missing = host.lookup("nobody");
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert_eq!(missing.json()["error"], "not_found");

    let deleted = host
        .request("DELETE", "/v1/registrations/greeter/g1", &[], b"")
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    assert!(
        host.get("/v1/registrations").unwrap().json()["registrations"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let again = host
        .request("DELETE", "/v1/registrations/greeter/g1", &[], b"")
        .unwrap();
    assert_eq!(again.status, 404);

    assert_eq!(host.get("/healthz").unwrap().status, 200);
    let ready = host.get("/readyz").unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
}

/// Node addresses must be what a go-micro client can dial, `host:port`, and node ids unique
/// within a registration: anything else is a 400 naming the node, and nothing is registered.
#[test]
fn registrations_need_dialable_addresses_and_distinct_node_ids() {
    let host = Host::start(&[]).unwrap();
    let two_nodes = |a: (&str, &str), b: (&str, &str)| {
        serde_json::json!({
            "name": "greeter",
            "version": "1",
            "nodes": [
                { "id": a.0, "address": a.1 },
                { "id": b.0, "address": b.1 },
            ],
        })
        .to_string()
    };
    let cases = [
        (
            service_json("greeter", "1", "n1", "10.0.0.1"),
            "node \"n1\" has an invalid address \"10.0.0.1\"",
        ),
        (
            service_json("greeter", "1", "n1", "10.0.0.1:0"),
            "port must be from 1 to 65535",
        ),
        (
            service_json("greeter", "1", "n1", "10.0.0.1:70000"),
            "port must be from 1 to 65535",
        ),
        (
            service_json("greeter", "1", "n1", "::1:8080"),
            "[ipv6]:port",
        ),
        (
            service_json("greeter", "1", "n1", "http://10.0.0.1:80"),
            "invalid address",
        ),
        (
            service_json("greeter", "1", "n1", "10.0.0.300:80"),
            "not an IPv4 address",
        ),
        (
            two_nodes(("n1", "10.0.0.1:80"), ("n1", "10.0.0.2:80")),
            "node id \"n1\" appears more than once",
        ),
        (
            two_nodes(("n1", "10.0.0.1:80"), ("n2", "10.0.0.2")),
            "node \"n2\" has an invalid address",
        ),
    ];
    for (body, want) in cases {
        let response = post_service(&host, &body);
        assert_eq!(response.status, 400, "{body}: {}", response.text());
        let json = response.json();
        assert_eq!(json["error"], "bad_request", "{json}");
        let message = json["message"].as_str().unwrap();
        assert!(message.contains(want), "{body}: want {want}: {message}");
    }
    let registered = host.get("/v1/registrations").unwrap().json();
    assert_eq!(
        registered["registrations"],
        serde_json::json!([]),
        "{registered}"
    );

    // What go-micro registers passes: IPv4, host names, bracketed IPv6.
    for (i, address) in [
        "10.0.0.7:41231",
        "greeter-0.greeter.default.svc:8080",
        "[::1]:9090",
    ]
    .into_iter()
    .enumerate()
    {
        let body = service_json("greeter", "1", &format!("n{i}"), address);
        let response = post_service(&host, &body);
        assert_eq!(response.status, 201, "{address}: {}", response.text());
    }
    let found = host.lookup("greeter");
    assert_eq!(node_ids(&found.json()), ["n0", "n1", "n2"]);
}

#[test]
fn bad_requests_get_4xx_json_and_never_hurt_the_host() {
    let host = Host::start(&["--admin-token", TOKEN]).unwrap();
    let (auth, value) = bearer();
    // Past the policy size limit (policy.max_size, 32 MiB by default).
    let oversized_policy = vec![b'x'; regcache::policy::MAX_POLICY_SIZE + 1];
    let mut ten_mib_json = b"{\"name\":\"big\",\"metadata\":{\"k\":\"".to_vec();
    ten_mib_json.extend(std::iter::repeat_n(b'a', 10 * 1024 * 1024));
    ten_mib_json.extend(b"\"}}");
    let cases: Vec<BadRequest> = vec![
        (
            "POST",
            "/v1/registrations",
            vec![],
            b"{not json".to_vec(),
            400,
        ),
        ("POST", "/v1/registrations", vec![], b"[1,2]".to_vec(), 400),
        ("POST", "/v1/registrations", vec![], b"".to_vec(), 400),
        (
            "POST",
            "/v1/registrations",
            vec![],
            br#"{"name":"x","nodes":[]}"#.to_vec(),
            400,
        ),
        (
            "POST",
            "/v1/registrations",
            vec![],
            service_json("bad name!", "1", "n1", "1.2.3.4:1").into_bytes(),
            400,
        ),
        (
            "POST",
            "/v1/registrations",
            vec![],
            service_json("ok", "1", "a/b", "1.2.3.4:1").into_bytes(),
            400,
        ),
        (
            "POST",
            "/v1/registrations",
            vec![],
            service_json("ok", "1", "n1", "").into_bytes(),
            400,
        ),
        ("POST", "/v1/registrations", vec![], ten_mib_json, 413),
        (
            "PUT",
            "/v1/policy",
            vec![(auth, value.as_str())],
            oversized_policy,
            413,
        ),
        ("GET", "/v1/services/a%20b", vec![], vec![], 400),
        ("GET", "/v1/services/%FF%FE", vec![], vec![], 400),
        ("GET", "/v1/services/..", vec![], vec![], 400),
        ("GET", "/v1/services/%3Cscript%3E", vec![], vec![], 400),
        ("DELETE", "/v1/registrations/a%20b/n1", vec![], vec![], 400),
        ("DELETE", "/v1/services", vec![], vec![], 405),
        ("POST", "/v1/services/greeter", vec![], b"{}".to_vec(), 405),
        ("PATCH", "/v1/policy", vec![], vec![], 405),
        ("PUT", "/metrics", vec![], vec![], 405),
        ("GET", "/v2/anything", vec![], vec![], 404),
    ];
    for (method, path, headers, body, want) in cases {
        let response = host.request(method, path, &headers, &body).unwrap();
        assert_eq!(
            response.status,
            want,
            "{method} {path}: {}",
            response.text()
        );
        let json = response.json();
        assert!(json["error"].is_string(), "{method} {path}: {json}");
        assert!(json["message"].is_string(), "{method} {path}: {json}");
        assert!(
            response
                .header("content-type")
                .is_some_and(|t| t.contains("application/json")),
            "{method} {path}: {:?}",
            response.headers
        );
    }
    assert_eq!(host.get("/healthz").unwrap().status, 200);
    assert!(!host.log().contains("panicked"), "{}", host.log());
}

#[test]
fn admin_endpoints_need_the_token_and_are_disabled_without_one() {
    let default = policy_wasm("default");
    let disabled = Host::start(&[]).unwrap();
    let response = disabled
        .request(
            "PUT",
            "/v1/policy",
            &[("Authorization", "Bearer x")],
            &default,
        )
        .unwrap();
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(response.json()["error"], "admin_disabled");

    let host = Host::start_with_env(&[], &[("REGCACHE_ADMIN_TOKEN", TOKEN)]).unwrap();
    let before = active_digest(&host);
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token")],
        vec![("Authorization", TOKEN)],
    ] {
        let response = host
            .request("PUT", "/v1/policy", &headers, &default)
            .unwrap();
        assert_eq!(response.status, 401, "{headers:?}: {}", response.text());
        assert_eq!(response.json()["error"], "unauthorized");
    }
    assert_eq!(active_digest(&host), before);
    assert_eq!(host.get("/v1/policy").unwrap().json()["generation"], 1);

    // The token is checked before the body is read: a client announcing a policy-sized body
    // and sending none is refused at once, not waited for.
    for (target, headers, status) in [
        (&disabled, vec![("Authorization", "Bearer x")], 403),
        (&host, vec![], 401),
        (&host, vec![("Authorization", "Bearer wrong-token")], 401),
    ] {
        let response = request_head_only(
            target.addr,
            "PUT",
            "/v1/policy",
            &headers,
            8 * 1024 * 1024,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(response.status, status, "{headers:?}: {}", response.text());
        assert!(response.json()["error"].is_string());
    }

    // The token from a file (trailing newline ignored), as secrets are mounted.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let from_file = Host::start(&["--admin-token-file", token_file.to_str().unwrap()]).unwrap();
    let swapped = put_policy(&from_file, "", &policy_wasm("strict"));
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    assert_eq!(swapped.json()["generation"], 2);
}

#[test]
fn put_policy_swaps_each_example_and_refuses_bad_ones() {
    // The swaps below set a retry interval of 1 ms, under the operator's default floor.
    let host = Host::start(&[
        "--admin-token",
        TOKEN,
        "--policy-limits-min-retry-interval",
        "1ms",
    ])
    .unwrap();
    let first = host.get("/v1/policy").unwrap().json();
    assert_eq!(first["generation"], 1);
    assert_eq!(first["source"], "embedded:default");
    for id in ["n1", "n2"] {
        let created = post_service(&host, &service_json("greeter", "1", id, "10.0.0.1:1"));
        assert_eq!(created.status, 201);
    }
    assert_eq!(node_ids(&host.lookup("greeter").json()), ["n1", "n2"]);

    // always-stale's guard keeps every removal the registry reports as suspect; a
    // deregistration through this host is its process's own word, and leaves at once.
    let wasm = policy_wasm("always-stale");
    let swapped = put_policy(&host, "", &wasm);
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    assert_eq!(swapped.json()["digest"], sha256_hex(&wasm));
    assert_eq!(swapped.json()["generation"], 2);
    let answer = host.lookup("greeter").json();
    assert_eq!(answer["provenance"]["policy"]["generation"], 2, "at once");
    let deleted = host
        .request("DELETE", "/v1/registrations/greeter/n2", &[], b"")
        .unwrap();
    assert_eq!(deleted.status, 204);
    let answer = host.lookup("greeter").json();
    assert_eq!(node_ids(&answer), ["n1"], "{answer}");
    assert!(suspects(&answer).is_empty(), "{answer}");

    // The default policy applies a single deregistration at once (of a service with no other
    // recent removal: greeter's n2 would make it a burst).
    let wasm = policy_wasm("default");
    let swapped = put_policy(&host, "", &wasm);
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    assert_eq!(swapped.json()["generation"], 3);
    for id in ["p1", "p2", "p3"] {
        post_service(&host, &service_json("payments", "1", id, "10.0.0.1:3"));
    }
    assert_eq!(
        node_ids(&host.lookup("payments").json()),
        ["p1", "p2", "p3"]
    );
    host.request("DELETE", "/v1/registrations/payments/p3", &[], b"")
        .unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(10), || node_ids(
            &host.lookup("payments").json()
        ) == ["p1", "p2"]),
        "the default policy evicts p3: {}",
        host.lookup("payments").text()
    );

    // strict, configured through the query: past TTL + max-stale it waits for the registry
    // rather than serving stale.
    let strict = policy_wasm("strict");
    let swapped = put_policy(
        &host,
        "?ttl-ms=200&max-stale-ms=1&min-retry-interval-ms=1",
        &strict,
    );
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    assert_eq!(swapped.json()["settings"]["ttl_ms"], 200);
    host.lookup("greeter");
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            let answer = host.lookup("greeter").json();
            answer["provenance"]["source"] == "registry"
                && answer["provenance"]["decision"] == "refresh_and_wait"
        }),
        "strict refreshes instead of serving stale: {}",
        host.lookup("greeter").text()
    );
    // The same TTL with the default policy serves stale and refreshes in the background.
    let swapped = put_policy(&host, "?ttl-ms=200&min-retry-interval-ms=1", &wasm);
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            host.lookup("greeter").json()["provenance"]["source"] == "stale"
        }),
        "default serves stale past the TTL: {}",
        host.lookup("greeter").text()
    );

    // chaos looping forever on this service: lookups still answer (the fail-safe decision),
    // and the deadline hits are counted.
    let hits = |host: &Host| {
        host.get("/v1/policy").unwrap().json()["counters"]["deadline_hits"]
            .as_u64()
            .unwrap()
    };
    let before = hits(&host);
    let chaos = policy_wasm("chaos");
    let swapped = put_policy(&host, "?fault=loop&only-service=greeter", &chaos);
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    let answer = host.lookup("greeter");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(hits(&host) > before, "the deadline hit is counted");
    let metrics = host.get("/metrics").unwrap().text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("regcache_policy_deadline_hits_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Bad policies: 422 with the reason; the active digest stays.
    let active = active_digest(&host);
    let module = wat::parse_str("(module)").unwrap();
    for (bad, want) in [
        (b"garbage bytes".to_vec(), "not WebAssembly"),
        (Vec::new(), "empty"),
        (module, "core WebAssembly module"),
    ] {
        let refused = put_policy(&host, "", &bad);
        assert_eq!(refused.status, 422, "{}", refused.text());
        let body = refused.json();
        assert!(body["message"].as_str().unwrap().contains(want), "{body}");
        assert_eq!(body["details"]["active"]["digest"], active.as_str());
        assert_eq!(active_digest(&host), active);
    }
    let refused = put_policy(&host, "?fault=zero-ttl", &chaos);
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert_eq!(active_digest(&host), active);
    let metrics = host.get("/metrics").unwrap().text();
    assert!(
        metrics.contains("regcache_policy_swaps_total{result=\"rejected\"} 4"),
        "{metrics}"
    );
}

#[test]
fn policy_file_change_and_sighup_swap() {
    let dir = tempfile::tempdir().unwrap();
    // The policy path is a symlink into another directory, as Kubernetes mounts ConfigMaps:
    // rewriting the target is invisible to the watcher of the link's directory, so only
    // SIGHUP can pick that change up.
    let targets = dir.path().join("targets");
    let watched = dir.path().join("watched");
    std::fs::create_dir_all(&targets).unwrap();
    std::fs::create_dir_all(&watched).unwrap();
    let target = targets.join("policy.wasm");
    std::fs::copy(policy_path("default"), &target).unwrap();
    let link = watched.join("policy.wasm");
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let host = Host::start(&["--policy-file", link.to_str().unwrap()]).unwrap();
    let policy = host.get("/v1/policy").unwrap().json();
    assert_eq!(policy["digest"], sha256_hex(&policy_wasm("default")));
    assert_eq!(policy["source"], link.to_str().unwrap());

    // SIGHUP: the target changed behind the link.
    write_atomically(&target, &policy_wasm("strict")).unwrap();
    let strict = sha256_hex(&policy_wasm("strict"));
    host.signal("HUP").unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(20), || active_digest(&host) == strict),
        "SIGHUP reloads: {}",
        host.log()
    );

    // A file change: the link itself is replaced in the watched directory.
    let always_stale = targets.join("always-stale.wasm");
    std::fs::write(&always_stale, policy_wasm("always-stale")).unwrap();
    let tmp_link = watched.join("policy.wasm.new");
    std::os::unix::fs::symlink(&always_stale, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &link).unwrap();
    let want = sha256_hex(&policy_wasm("always-stale"));
    assert!(
        eventually_blocking(Duration::from_secs(20), || active_digest(&host) == want),
        "a file change reloads: {}",
        host.log()
    );

    // A broken file: refused, the active policy stays, and SIGHUP does not change that.
    std::fs::write(&always_stale, b"\0asm broken").unwrap();
    host.signal("HUP").unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(20), || host
            .log()
            .contains("policy refused")),
        "the broken policy is refused: {}",
        host.log()
    );
    assert_eq!(active_digest(&host), want);
    assert_eq!(host.get("/v1/policy").unwrap().json()["generation"], 3);
}

#[test]
fn an_api_swap_stays_until_the_watched_file_changes_or_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.wasm");
    std::fs::write(&file, policy_wasm("default")).unwrap();
    let host = Host::start_with_env(
        &["--policy-file", file.to_str().unwrap()],
        &[("REGCACHE_ADMIN_TOKEN", TOKEN)],
    )
    .unwrap();
    let default = sha256_hex(&policy_wasm("default"));
    let strict = sha256_hex(&policy_wasm("strict"));
    assert_eq!(active_digest(&host), default);

    let swapped = put_policy(&host, "", &policy_wasm("strict"));
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    // The file is not re-applied: neither on its own (the reload's reads of the file) nor
    // when it is rewritten with the bytes it already had.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(active_digest(&host), strict, "{}", host.log());
    write_atomically(&file, &policy_wasm("default")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let policy = host.get("/v1/policy").unwrap().json();
    assert_eq!(policy["digest"], strict.as_str(), "{}", host.log());
    assert_eq!(policy["source"], "api");
    assert_eq!(policy["generation"], 2);

    // SIGHUP asks for the file again.
    host.signal("HUP").unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(20), || active_digest(&host) == default),
        "SIGHUP re-applies the file: {}",
        host.log()
    );
    let policy = host.get("/v1/policy").unwrap().json();
    assert_eq!(policy["source"], file.to_str().unwrap());
    assert_eq!(policy["generation"], 3);

    // Swapped through the API again, then the file really changes: the file wins.
    let swapped = put_policy(&host, "", &policy_wasm("strict"));
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    write_atomically(&file, &policy_wasm("always-stale")).unwrap();
    let always_stale = sha256_hex(&policy_wasm("always-stale"));
    assert!(
        eventually_blocking(Duration::from_secs(20), || active_digest(&host)
            == always_stale),
        "a changed file is applied: {}",
        host.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(host.get("/v1/policy").unwrap().json()["generation"], 5);
}

#[test]
fn metrics_are_prometheus_text() {
    let host = Host::start(&[]).unwrap();
    post_service(&host, &service_json("greeter", "1", "n1", "10.0.0.1:1"));
    host.lookup("greeter");
    host.lookup("greeter");
    host.lookup("missing");
    host.lookup("missing");
    let response = host.get("/metrics").unwrap();
    assert_eq!(response.status, 200);
    let text = response.text();
    for family in [
        "regcache_lookups_total{source=\"fresh\"} 1",
        "regcache_lookups_total{source=\"registry\"} 1",
        "regcache_lookup_errors_total{kind=\"not_found\",cause=\"registry\"} 1",
        "regcache_lookup_errors_total{kind=\"not_found\",cause=\"negative\"} 1",
        "regcache_lookup_errors_total{kind=\"unavailable\",cause=\"budget\"} 0",
        "regcache_lookup_decisions_total{decision=\"serve_cached\"} 1",
        "regcache_singleflight_waits_total",
        "regcache_policy_swaps_total{result=\"applied\"} 0",
        "regcache_policy_traps_total 0",
        "regcache_policy_deadline_hits_total 0",
        "regcache_lease_regrants_total",
        "regcache_watch_restarts_total",
        "regcache_registry_requests_total",
        "regcache_cache_entries",
        "regcache_cache_nodes 1",
        "# EOF",
    ] {
        assert!(text.contains(family), "missing {family}:\n{text}");
    }
    // Only answers have a source; errors are counted apart.
    for line in text
        .lines()
        .filter(|l| l.starts_with("regcache_lookups_total"))
    {
        assert!(
            ["fresh", "stale", "registry"]
                .iter()
                .any(|s| line.contains(&format!("source=\"{s}\""))),
            "{line}"
        );
    }
}

/// Runs `regcache run <args>`, expected to stop at once: its exit code, its stderr and how long
/// it ran. A start that has not failed within 30 s (one waiting on a FIFO) is killed and fails
/// the test rather than hanging the run.
fn run_bad(args: &[&str], env: &[(&str, &str)]) -> (i32, String, Duration) {
    let args: Vec<&str> = std::iter::once("run").chain(args.iter().copied()).collect();
    let (output, took) = run_regcache(&args, env, Duration::from_secs(30));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        took,
    )
}

#[test]
fn bad_config_fails_with_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        "listen = \"127.0.0.1:0\"\n[etcd]\nendpoint = [\"a:1\"]\n",
    )
    .unwrap();
    let wrong_type = dir.path().join("type.toml");
    std::fs::write(
        &wrong_type,
        "[etcd]\nendpoints = [\"a:1\"]\nlease_ttl = 15\n",
    )
    .unwrap();
    let unknown = unknown.to_str().unwrap();
    let wrong_type = wrong_type.to_str().unwrap();
    let cases: Vec<BadConfig> = vec![
        (
            vec!["--etcd-endpoints", "not an endpoint"],
            vec![],
            "etcd.endpoints",
        ),
        (
            vec![
                "--etcd-endpoints",
                "127.0.0.1:2379",
                "--etcd-lease-ttl",
                "1500ms",
            ],
            vec![],
            "etcd.lease_ttl",
        ),
        (vec!["--etcd-lease-ttl", "5s"], vec![], "etcd.lease_ttl"),
        (vec!["--listen", "nowhere"], vec![], "listen"),
        (vec![], vec![("REGCACHE_LOG_FORMAT", "xml")], "log_format"),
        (
            vec!["--etcd-endpoints", "a:1", "--etcd-user", "root"],
            vec![],
            "etcd.password",
        ),
        (vec!["--policy-config", "novalue"], vec![], "policy.config"),
        (
            vec!["--config", unknown],
            vec![],
            "unknown field `endpoint`",
        ),
        (vec!["--config", wrong_type], vec![], "line 3"),
        (
            vec!["--admin-token-file", "/nonexistent/token"],
            vec![],
            "admin_token",
        ),
        (
            vec!["--policy-file", "/nonexistent/policy.wasm"],
            vec![],
            "/nonexistent/policy.wasm",
        ),
        (
            vec!["--policy-file", "/nonexistent/policy.wasm"],
            vec![],
            "`policy.file` (--policy-file / REGCACHE_POLICY_FILE)",
        ),
        (
            vec!["--etcd-endpoints", "127.0.0.1:0"],
            vec![],
            "`etcd.endpoints` (--etcd-endpoints / REGCACHE_ETCD_ENDPOINTS): endpoint `127.0.0.1:0` \
             is not host:port (port 1 to 65535)",
        ),
        (
            vec!["--etcd-endpoints", "a:1", "--etcd-request-timeout", "0s"],
            vec![],
            "`etcd.request_timeout` (--etcd-request-timeout / REGCACHE_ETCD_REQUEST_TIMEOUT): \
             request_timeout must be between 100ms and 300s",
        ),
        (
            vec!["--etcd-endpoints", "a:1"],
            vec![("REGCACHE_ETCD_LEASE_TTL", "2h")],
            "`etcd.lease_ttl` (--etcd-lease-ttl / REGCACHE_ETCD_LEASE_TTL)",
        ),
        (
            vec!["--snapshot-interval", "0s"],
            vec![],
            "`snapshot_interval` (--snapshot-interval / REGCACHE_SNAPSHOT_INTERVAL): must be \
             between 100ms and 3600s",
        ),
    ];
    for (args, env, want) in cases {
        let (code, stderr, _) = run_bad(&args, &env);
        assert_ne!(code, 0, "{args:?} {env:?} must fail");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("regcache:"))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: one error line:\n{stderr}");
        assert!(lines[0].contains(want), "{args:?}: {stderr}");
    }
}

/// TLS files are parsed at start: one etcd's client would skip (not PEM, no certificate, a
/// key that is not the certificate's) stops the start with one line naming the setting, its
/// flag, its variable and the path, instead of a host that stays unready saying "UnknownIssuer".
#[test]
fn bad_tls_files_stop_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path()).unwrap();
    let not_pem = dir.path().join("ca.der");
    std::fs::write(&not_pem, b"\x30\x82\x01\x0a not PEM at all").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let (ca, cert, key) = (
        files.ca.to_str().unwrap(),
        files.client_cert.to_str().unwrap(),
        files.client_key.to_str().unwrap(),
    );
    let server_key = files.server_key.to_str().unwrap();
    // No etcd runs at this endpoint: the files are checked before anything dials.
    let endpoint = ["--etcd-endpoints", "127.0.0.1:9"];
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--etcd-ca", not_pem],
            format!(
                "`etcd.ca` (--etcd-ca / REGCACHE_ETCD_CA): {not_pem}: no PEM certificate in it"
            ),
        ),
        (
            vec!["--etcd-ca", ca, "--etcd-cert", key, "--etcd-key", key],
            format!("`etcd.cert` (--etcd-cert / REGCACHE_ETCD_CERT): {key}: no PEM certificate"),
        ),
        (
            vec![
                "--etcd-ca",
                ca,
                "--etcd-cert",
                cert,
                "--etcd-key",
                server_key,
            ],
            format!(
                "`etcd.key` (--etcd-key / REGCACHE_ETCD_KEY): {server_key}: the private key does \
                 not match the client certificate {cert}"
            ),
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = endpoint.iter().copied().chain(args).collect();
        let (code, stderr, _) = run_bad(&args, &[]);
        assert_ne!(code, 0, "{args:?} must fail");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("regcache:"))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: one error line:\n{stderr}");
        assert!(lines[0].contains(&want), "{args:?}: want {want}\n{stderr}");
    }
    // The good files pass the check (then the host starts and waits for etcd).
    let host = Host::start(&[
        endpoint[0],
        endpoint[1],
        "--etcd-ca",
        ca,
        "--etcd-cert",
        cert,
        "--etcd-key",
        key,
    ])
    .unwrap();
    assert_eq!(host.get("/healthz").unwrap().status, 200);
}

/// A state dir the host cannot write costs it its precompiled-policy cache and its snapshot
/// writes, not its start: it warns, naming the setting and the path, and serves.
///
/// The tests run as root, which writes through permission bits (`chmod 0555` stops nobody),
/// and a read-only mount needs privileges a test should not take. What the host meets in both
/// cases is the same: the directory cannot be created or written in. A state dir that is a
/// regular file, and one under a regular file, make that true for root too.
#[test]
fn a_state_dir_that_cannot_be_written_is_a_warning_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state");
    std::fs::write(&file, "not a directory").unwrap();
    for state_dir in [file.clone(), file.join("nested")] {
        let state_dir = state_dir.to_str().unwrap();
        let mut host = Host::start(&["--state-dir", state_dir, "--snapshot-interval", "100ms"])
            .unwrap_or_else(|e| panic!("{state_dir}: {e:#}"));
        let warning = host
            .log()
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&format!("state_dir {state_dir}")))
            .map(str::to_string);
        let warning = warning.unwrap_or_else(|| panic!("no warning:\n{}", host.log()));
        assert!(
            warning.contains("without the precompiled-policy cache")
                && warning.contains("without writing snapshots"),
            "{warning}"
        );
        let created = post_service(&host, &service_json("greeter", "1", "n1", "10.0.0.1:8080"));
        assert_eq!(created.status, 201, "{}", created.text());
        let found = host.lookup("greeter");
        assert_eq!(found.status, 200, "{}", found.text());
        assert_eq!(node_ids(&found.json()), ["n1"]);
        // Past a few snapshot intervals, and through the shutdown's write: no attempt at all.
        std::thread::sleep(Duration::from_millis(300));
        host.signal("TERM").unwrap();
        assert!(host.wait_exit(Duration::from_secs(15)).unwrap().success());
        let log = host.log();
        assert!(!log.contains("cannot write the snapshot"), "{log}");
        assert!(!log.contains("cannot store precompiled policy"), "{log}");
        assert!(!log.contains("ignoring the snapshot"), "{log}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
}

/// A FIFO where a file is expected would leave the host waiting for a writer before it ever
/// listens, and a link to `/dev/zero` would be read until memory runs out: each stops the
/// start at once, with one line naming the setting and the path.
#[test]
fn special_files_stop_the_start_at_once_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let zero = dir.path().join("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    for (path, what) in [(&fifo, "a FIFO"), (&zero, "a character device")] {
        let path = path.to_str().unwrap();
        let cases = [
            (
                vec!["--policy-file", path],
                "`policy.file` (--policy-file / REGCACHE_POLICY_FILE)",
            ),
            (
                vec!["--admin-token-file", path],
                "`admin_token_file` (--admin-token-file / REGCACHE_ADMIN_TOKEN_FILE)",
            ),
            (
                vec!["--etcd-endpoints", "127.0.0.1:9", "--etcd-ca", path],
                "`etcd.ca` (--etcd-ca / REGCACHE_ETCD_CA)",
            ),
            (vec!["--config", path], "configuration file"),
        ];
        for (args, setting) in cases {
            let (code, stderr, took) = run_bad(&args, &[]);
            assert_ne!(code, 0, "{args:?} must fail");
            assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
            let lines: Vec<&str> = stderr
                .lines()
                .filter(|l| l.starts_with("regcache:"))
                .collect();
            assert_eq!(lines.len(), 1, "{args:?}: one error line:\n{stderr}");
            for want in [setting, path, &format!("not a regular file ({what})")] {
                assert!(lines[0].contains(want), "{args:?}: want {want}\n{stderr}");
            }
        }
    }
}

/// The issue's case: an existing state dir the host's user cannot write, holding a snapshot.
/// The host warns naming `state_dir`, starts, serves the snapshot's service (stale: etcd is
/// unreachable), and writes nothing there, not even at shutdown.
///
/// Root writes through permission bits, so the host runs as `nobody` on a root-owned 0755
/// directory (a test run as another user makes the directory 0555 and runs the host as
/// itself).
#[test]
fn a_read_only_state_dir_is_read_and_served_from_but_never_written() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    // A snapshot of "greeter", written by a host that could write there.
    let mut writer = Host::start(&["--state-dir", state_dir]).unwrap();
    let created = post_service(
        &writer,
        &service_json("greeter", "1", "n1", "10.0.0.1:8080"),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(writer.lookup("greeter").status, 200);
    writer.signal("TERM").unwrap();
    assert!(writer.wait_exit(Duration::from_secs(15)).unwrap().success());
    let snapshot = state.path().join("cache.snapshot");
    assert!(snapshot.is_file(), "{}", writer.log());
    // Readable by anyone, whatever the umask was; the directory itself read-only to others.
    std::fs::set_permissions(&snapshot, std::fs::Permissions::from_mode(0o644)).unwrap();
    // SAFETY: geteuid has no preconditions.
    let privileged = unsafe { libc::geteuid() } == 0;
    let dir_mode = if privileged { 0o755 } else { 0o555 };
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(dir_mode)).unwrap();
    let before = tree(state.path());

    // etcd "down": an endpoint nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = closed.local_addr().unwrap().to_string();
    drop(closed);
    let args = [
        "--state-dir",
        state_dir,
        "--etcd-endpoints",
        &endpoint,
        "--snapshot-interval",
        "100ms",
    ];
    let bin_dir = tempfile::tempdir().unwrap();
    let mut host = if privileged {
        Host::start_as(&RunAs::nobody(bin_dir.path()).unwrap(), &args).unwrap()
    } else {
        Host::start(&args).unwrap()
    };
    let log = host.log();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains(&format!("state_dir {state_dir}")))
        .unwrap_or_else(|| panic!("no warning naming state_dir:\n{log}"));
    assert!(warning.contains("cannot be written"), "{warning}");
    assert!(log.contains("snapshot loaded"), "{log}");
    let found = host.lookup("greeter");
    assert_eq!(found.status, 200, "{}\n{}", found.text(), host.log());
    let answer = found.json();
    assert_eq!(node_ids(&answer), ["n1"]);
    assert_eq!(answer["provenance"]["source"], "stale", "{answer}");
    assert_eq!(answer["provenance"]["snapshot"], true, "{answer}");
    // Past a few snapshot intervals, and through the shutdown's write.
    std::thread::sleep(Duration::from_millis(300));
    host.signal("TERM").unwrap();
    assert!(host.wait_exit(Duration::from_secs(15)).unwrap().success());
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        tree(state.path()),
        before,
        "nothing written:\n{}",
        host.log()
    );
    let log = host.log();
    for attempt in [
        "cannot write the snapshot",
        "cannot store precompiled policy",
        "cannot record",
    ] {
        assert!(!log.contains(attempt), "{attempt}:\n{log}");
    }
}

/// `dir` and everything under it: path, size, modification time (a directory's changes when
/// a file is created or removed in it, a probe included).
fn tree(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        if metadata.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        let modified = metadata.modified().unwrap();
        files.push((path.display().to_string(), metadata.len(), modified));
    }
    files.sort();
    files
}

#[test]
fn run_help_documents_every_option() {
    let out = Command::new(regcache_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--config",
        "--listen",
        "--etcd-endpoints",
        "--etcd-user",
        "--etcd-password",
        "--etcd-password-file",
        "--etcd-ca",
        "--etcd-cert",
        "--etcd-key",
        "--etcd-prefix",
        "--etcd-request-timeout",
        "--etcd-lease-ttl",
        "--policy-file",
        "--policy-config",
        "--admin-token",
        "--admin-token-file",
        "--state-dir",
        "--snapshot-interval",
        "--log-format",
        "REGCACHE_ETCD_ENDPOINTS",
        "REGCACHE_ADMIN_TOKEN",
    ] {
        assert!(help.contains(option), "missing {option}:\n{help}");
    }
}

/// A policy that traps must not take the host (or a request) down. A Rust guest's panic writes
/// its message to WASI stderr before trapping, and wasmtime-wasi's sync bindings `block_on` that
/// write on the tokio worker running the lookup ("Cannot start a runtime from within a
/// runtime"); the engine must turn that into a counted trap and a fail-safe answer.
#[test]
fn a_trapping_policy_does_not_take_the_host_down() {
    let host = Host::start(&["--admin-token", TOKEN]).unwrap();
    post_service(&host, &service_json("greeter", "1", "n1", "10.0.0.1:1"));
    let swapped = put_policy(
        &host,
        "?fault=trap&only-service=greeter",
        &policy_wasm("chaos"),
    );
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    let answer = host.lookup("greeter");
    assert_eq!(answer.status, 200, "{}", answer.text());
    let traps = host.get("/v1/policy").unwrap().json()["counters"]["traps"].clone();
    assert!(traps.as_u64().unwrap() > 0);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let host = Host::start(&["--log-format", "json"]).unwrap();
    let log = host.log();
    for line in log.lines() {
        let json: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        assert!(json["level"].is_string(), "{line}");
    }
    let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(
        first["message"]
            .as_str()
            .unwrap()
            .contains("embedded in-memory registry"),
        "{first}"
    );
}

/// The embedded registry's registrations end with its process: a restarted host does not
/// serve the previous run's snapshot of them as if they were registered.
#[test]
fn an_embedded_host_does_not_serve_its_previous_runs_snapshot() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let mut first = Host::start(&["--state-dir", state_dir]).unwrap();
    let created = post_service(&first, &service_json("greeter", "1", "n1", "10.0.0.1:8080"));
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(first.lookup("greeter").status, 200);
    first.signal("TERM").unwrap();
    assert!(first.wait_exit(Duration::from_secs(15)).unwrap().success());
    assert!(state.path().join("cache.snapshot").is_file());

    let second = Host::start(&["--state-dir", state_dir]).unwrap();
    assert_eq!(second.lookup("greeter").status, 404, "{}", second.log());
    assert!(
        !second.log().contains("snapshot loaded"),
        "{}",
        second.log()
    );
}

/// A state dir removed while the host runs is not recreated (with default permissions, where
/// the host made it 0700), and the failing periodic snapshot is warned once, not every interval.
#[test]
fn a_state_dir_removed_while_running_is_warned_once_and_not_recreated() {
    let parent = tempfile::tempdir().unwrap();
    let state = parent.path().join("state");
    let state_dir = state.to_str().unwrap();
    let host = Host::start(&["--state-dir", state_dir, "--snapshot-interval", "100ms"]).unwrap();
    let created = post_service(&host, &service_json("greeter", "1", "n1", "10.0.0.1:8080"));
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(host.lookup("greeter").status, 200);
    let snapshot = state.join("cache.snapshot");
    assert!(
        eventually_blocking(Duration::from_secs(10), || snapshot.is_file()),
        "{}",
        host.log()
    );
    std::fs::remove_dir_all(&state).unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(10), || host
            .log()
            .contains("cannot write the snapshot")),
        "{}",
        host.log()
    );
    // Ten intervals more.
    std::thread::sleep(Duration::from_secs(1));
    let warnings = host
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot write the snapshot"))
        .count();
    assert_eq!(warnings, 1, "{}", host.log());
    assert!(!state.exists(), "the state dir was recreated");
    assert_eq!(host.lookup("greeter").status, 200);
}
