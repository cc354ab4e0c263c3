//! Automatic rollback through a running host (the real binary, embedded registry): a policy
//! that starts trapping once the clock passes a date its author picked is swapped in over the
//! API, every lookup keeps answering while it fails, the host rolls back to the policy it
//! replaced by itself, and the API and the metrics say so.

use std::time::{Duration, Instant};

use regcache_tests::host::Host;
use regcache_tests::policies::policy_wasm;
use serde_json::Value;

const TOKEN: &str = "rollback-token";

/// A date the conformance battery's clock (1_700_000_000_000 ms) has not reached and the wall
/// clock has: the policy passes validation and traps in production.
const TIME_BOMB_MS: u64 = 1_750_000_000_000;

fn policy(host: &Host) -> Value {
    host.get("/v1/policy").unwrap().json()
}

#[test]
fn a_policy_that_starts_trapping_is_rolled_back_and_no_lookup_fails_meanwhile() {
    let host = Host::start(&["--admin-token", TOKEN, "--policy-rollback-failures", "8"]).unwrap();
    let services = ["greeter", "billing", "search"];
    host.register_each(&services);
    let before = policy(&host);
    assert!(before["rollback"].is_null(), "{before}");

    let bearer = format!("Bearer {TOKEN}");
    let swapped = host
        .request(
            "PUT",
            &format!("/v1/policy?fault=trap&after-ms={TIME_BOMB_MS}"),
            &[("Authorization", &bearer)],
            &policy_wasm("chaos"),
        )
        .unwrap();
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    let bomb = swapped.json();

    // Lookups until the host rolls back by itself: every one answered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lookups = 0;
    let after = loop {
        for name in services {
            let answer = host.lookup(name);
            assert_eq!(answer.status, 200, "lookup {lookups}: {}", answer.text());
            lookups += 1;
        }
        let now = policy(&host);
        if !now["rollback"].is_null() {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "no rollback within 30 s ({lookups} lookups): {now}"
        );
    };

    assert_eq!(
        after["digest"], before["digest"],
        "the earlier policy is back"
    );
    let rollback = &after["rollback"];
    assert_eq!(rollback["from"]["generation"], bomb["generation"]);
    assert_eq!(rollback["from"]["digest"], bomb["digest"]);
    assert_eq!(rollback["to"]["generation"], after["generation"]);
    assert_eq!(rollback["to"]["digest"], before["digest"]);
    let reason = rollback["reason"].as_str().unwrap();
    assert!(
        reason.contains("8 decisions failed") && reason.contains("trapped"),
        "{reason}"
    );
    let counters = &after["counters"];
    assert_eq!(counters["rollbacks"], 1);
    // Failed calls, and the lookups the open breaker answered without calling, count alike.
    let count = |name: &str| counters[name].as_u64().unwrap();
    assert!(count("traps") >= 1, "{counters}");
    assert!(count("traps") + count("breaker_skips") >= 8, "{counters}");
    assert!(
        counters["fail_safe_lookups"].as_u64().unwrap() >= 8,
        "{counters}"
    );

    // The default decides again: a fresh answer, generation of the restored policy.
    let answer = host.lookup("greeter").json();
    assert_eq!(
        answer["provenance"]["policy"]["generation"], after["generation"],
        "{answer}"
    );
    let metrics = host.get("/metrics").unwrap().text();
    for line in [
        "regcache_policy_rollbacks_total 1",
        "regcache_policy_fail_safe_answers_total{question=\"lookup\"}",
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    assert!(
        host.log().contains("policy rolled back to"),
        "the rollback is logged:\n{}",
        host.log()
    );
}
