//! The policy lifecycle through a running host (the real binary, embedded registry): a shadow
//! loaded over the API is asked the host's real lookups and reports where it disagrees while
//! the active policy keeps deciding; the recording the host keeps replays through
//! `regcache policy replay` to the answers it recorded; promotion, removal, and a swap that
//! requires the recording to replay cleanly.

use std::time::Duration;

use regcache_tests::host::Host;
use regcache_tests::policies::{assert_replays_to_what_was_decided, policy_path, policy_wasm};
use regcache_tests::wait::eventually_blocking;
use serde_json::Value;

const TOKEN: &str = "shadow-token";
const SERVICES: [&str; 3] = ["greeter", "billing", "search"];

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn start(args: &[&str]) -> Host {
    let mut all = vec!["--admin-token", TOKEN];
    all.extend_from_slice(args);
    let host = Host::start(&all).unwrap();
    host.register_each(&SERVICES);
    host
}

fn admin(host: &Host, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let response = host
        .request(method, path, &[("Authorization", &bearer())], body)
        .unwrap();
    let json = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    (response.status, json)
}

fn recording(host: &Host) -> regcache_tests::http::Response {
    host.request(
        "GET",
        "/v1/policy/recording",
        &[("Authorization", &bearer())],
        &[],
    )
    .unwrap()
}

fn shadow(host: &Host) -> (u16, Value) {
    admin(host, "GET", "/v1/policy/shadow", &[])
}

#[test]
fn a_shadow_sees_the_hosts_lookups_and_the_recording_replays_to_what_was_decided() {
    let host = start(&["--policy-record-ring", "1000"]);
    for name in SERVICES {
        assert_eq!(host.lookup(name).status, 200, "warming the cache");
    }
    let before = host.get("/v1/policy").unwrap().json();
    assert_eq!(shadow(&host).0, 404);
    let questions_need_the_token = host.get("/v1/policy/shadow").unwrap();
    assert_eq!(questions_need_the_token.status, 401);

    // strict with a 1 ms TTL serves stale what the default serves fresh: it disagrees.
    let (status, loaded) = admin(
        &host,
        "PUT",
        "/v1/policy?mode=shadow&ttl-ms=1",
        &policy_wasm("strict"),
    );
    assert_eq!(status, 200, "{loaded}");
    assert_eq!(loaded["asked"], 0);
    let after_load = host.get("/v1/policy").unwrap().json();
    assert_eq!(
        after_load["digest"], before["digest"],
        "a shadow is not active"
    );

    std::thread::sleep(Duration::from_millis(5)); // past the shadow's 1 ms TTL
    let lookups = 30;
    for i in 0..lookups {
        let answer = host.lookup(SERVICES[i % SERVICES.len()]);
        assert_eq!(answer.status, 200, "{}", answer.text());
        // The active policy decided: a fresh hit, as without a shadow.
        let provenance = &answer.json()["provenance"];
        assert_eq!(provenance["decision"], "serve_cached", "{provenance}");
        assert_eq!(provenance["policy"]["generation"], 1, "{provenance}");
    }
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            shadow(&host).1["asked"].as_u64() >= Some(lookups as u64)
        }),
        "{}",
        shadow(&host).1
    );
    let (_, report) = shadow(&host);
    assert_eq!(report["digest"], loaded["digest"]);
    assert!(
        report["disagreed"].as_u64() >= Some(lookups as u64),
        "{report}"
    );
    let pairs = report["pairs"].as_array().unwrap();
    assert!(
        pairs.iter().any(|p| p["active"] == "serve_cached"
            && p["candidate"] == "serve_stale_and_refresh"
            && p["disagree"].as_u64() >= Some(lookups as u64)),
        "{report}"
    );
    let recent = report["recent_disagreements"].as_array().unwrap();
    let last = recent.last().unwrap();
    assert!(SERVICES.contains(&last["question"]["lookup"]["service"].as_str().unwrap()));
    assert_eq!(last["question"]["lookup"]["cached"], true);
    assert_eq!(last["active"]["decision"], "serve_cached");
    assert_eq!(last["candidate"]["decision"], "serve_stale");
    assert_eq!(report["failures"]["traps"], 0);
    assert!(
        report["cost_us"]["mean"].as_f64().unwrap() > 0.0,
        "{report}"
    );

    // The recording holds those lookups with what the active policy decided; replayed
    // through the same policy, every answer is the one recorded.
    let recording = recording(&host);
    assert_eq!(recording.status, 200);
    assert_eq!(
        recording.header("content-type"),
        Some("application/x-ndjson")
    );
    let text = recording.text();
    let recorded: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(recorded.len() >= lookups, "{} lines", recorded.len());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("recording.jsonl");
    std::fs::write(&file, &text).unwrap();
    assert_replays_to_what_was_decided(&policy_path("default"), &file);

    // Promotion makes it active as a swap would; nothing is left to promote or drop.
    let unauthorized = host
        .request("POST", "/v1/policy/shadow/promote", &[], &[])
        .unwrap();
    assert_eq!(unauthorized.status, 401);
    let (status, promoted) = admin(&host, "POST", "/v1/policy/shadow/promote", &[]);
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(promoted["digest"], loaded["digest"]);
    assert_eq!(promoted["generation"], 2);
    assert_eq!(promoted["settings"]["ttl_ms"], 1);
    assert_eq!(shadow(&host).0, 404);
    assert_eq!(
        admin(&host, "POST", "/v1/policy/shadow/promote", &[]).0,
        404
    );
    assert_eq!(admin(&host, "DELETE", "/v1/policy/shadow", &[]).0, 404);
    let answer = host.lookup("greeter");
    assert_eq!(answer.status, 200);
    let provenance = &answer.json()["provenance"];
    assert_eq!(
        provenance["decision"], "serve_stale_and_refresh",
        "{provenance}"
    );
    assert_eq!(provenance["policy"]["generation"], 2, "{provenance}");
}

#[test]
fn a_dropped_shadow_leaves_the_active_policy_as_it_was() {
    let host = start(&[]);
    let (status, loaded) = admin(
        &host,
        "PUT",
        "/v1/policy?mode=shadow&fault=trap&only-service=greeter",
        &policy_wasm("chaos"),
    );
    assert_eq!(status, 200, "{loaded}");
    for name in SERVICES {
        assert_eq!(host.lookup(name).status, 200);
    }
    assert!(eventually_blocking(Duration::from_secs(10), || {
        shadow(&host).1["asked"].as_u64() >= Some(SERVICES.len() as u64)
    }));
    let (status, dropped) = admin(&host, "DELETE", "/v1/policy/shadow", &[]);
    assert_eq!(status, 200, "{dropped}");
    assert_eq!(dropped["failures"]["traps"], 1, "{dropped}");
    assert_eq!(shadow(&host).0, 404);
    let policy = host.get("/v1/policy").unwrap().json();
    assert_eq!(policy["generation"], 1);
    assert_eq!(
        policy["counters"]["traps"], 0,
        "the shadow's traps are its own"
    );
}

#[test]
fn a_swap_requiring_a_clean_replay_is_refused_on_a_recorded_failure() {
    let host = start(&["--policy-record-ring", "100"]);
    let bomb = policy_wasm("chaos");
    let swap = |query: &str| admin(&host, "PUT", &format!("/v1/policy?{query}"), &bomb);

    let (status, refused) = swap("replay=recent&fault=trap&only-service=greeter");
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("nothing is recorded"),
        "{refused}"
    );
    for name in SERVICES {
        assert_eq!(host.lookup(name).status, 200);
    }
    assert!(eventually_blocking(Duration::from_secs(10), || {
        recording(&host).text().lines().count() >= SERVICES.len()
    }));
    let (status, refused) = swap("replay=recent&fault=trap&only-service=greeter");
    assert_eq!(status, 422, "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("replaying the recent recording") && message.contains("greeter"),
        "{message}"
    );
    assert_eq!(refused["details"]["active"]["generation"], 1);
    // A time bomb for another service replays cleanly.
    let (status, swapped) = swap("replay=recent&fault=trap&only-service=nobody");
    assert_eq!(status, 200, "{swapped}");

    for (query, expected) in [
        ("mode=standby", "mode `standby`"),
        ("replay=yesterday", "replay `yesterday`"),
        ("mode=shadow&replay=recent", "never acted on"),
    ] {
        let (status, refused) = swap(query);
        assert_eq!(status, 400, "{query}: {refused}");
        assert!(
            refused["message"].as_str().unwrap().contains(expected),
            "{query}: {refused}"
        );
    }
}
