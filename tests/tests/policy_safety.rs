//! What a policy cannot do to the host (issue 12, findings 2-5), with the real binary and
//! chaos's faults: loop where no deadline used to reach (`policy check`, `policy eval`,
//! start-up), spend 20 ms a decision, answer by a call counter, print, panic.

use std::process::Output;
use std::time::{Duration, Instant};

use regcache::decision::{Decide, HealthView, LookupContext, LookupDecision};
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec};
use regcache_tests::binary::run_regcache;
use regcache_tests::host::{Host, service_json};
use regcache_tests::http::Response;
use regcache_tests::policies::{policy_path, policy_wasm};
use regcache_tests::wait::eventually_blocking;

const TOKEN: &str = "s3cret-token";

/// Longer than any verdict takes (a looping policy is refused in about 0.3 s), far shorter than
/// the hang it replaces.
const VERDICT_WITHIN: Duration = Duration::from_secs(20);

/// Runs `regcache <args>`, killing it if it has not exited within [`VERDICT_WITHIN`]: a hang is
/// a failure of the test, not of the test run.
fn regcache(args: &[&str]) -> (Output, Duration) {
    run_regcache(args, &[], VERDICT_WITHIN)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn chaos() -> String {
    policy_path("chaos").to_str().unwrap().to_string()
}

/// `regcache policy check chaos.wasm --policy-config fault=<fault>`.
fn check_chaos(fault: &str) -> Output {
    let fault = format!("fault={fault}");
    regcache(&["policy", "check", &chaos(), "--policy-config", &fault]).0
}

fn put_policy(host: &Host, query: &str, wasm: &[u8]) -> Response {
    let bearer = format!("Bearer {TOKEN}");
    host.request(
        "PUT",
        &format!("/v1/policy{query}"),
        &[("Authorization", &bearer)],
        wasm,
    )
    .unwrap()
}

fn admin_host() -> Host {
    Host::start(&["--admin-token", TOKEN]).unwrap()
}

#[test]
fn check_and_eval_of_a_looping_policy_end_in_seconds_refused_by_the_deadline() {
    let (check, took) = regcache(&["policy", "check", &chaos(), "--policy-config", "fault=loop"]);
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    assert!(stderr(&check).contains("deadline"), "{}", stderr(&check));
    assert!(took < Duration::from_secs(10), "check took {took:?}");

    let (eval, took) = regcache(&[
        "policy",
        "eval",
        &chaos(),
        "--policy-config",
        "fault=loop",
        "--context",
        r#"{"cached": true}"#,
    ]);
    assert!(!eval.status.success());
    assert!(stderr(&eval).contains("deadline"), "{}", stderr(&eval));
    assert!(took < Duration::from_secs(10), "eval took {took:?}");
}

#[test]
fn a_host_started_with_a_looping_policy_file_exits_with_one_line_naming_the_file() {
    let file = chaos();
    let (run, took) = regcache(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--policy-file",
        &file,
        "--policy-config",
        "fault=loop",
    ]);
    assert!(!run.status.success());
    assert!(took < Duration::from_secs(10), "start-up took {took:?}");
    let log = stderr(&run);
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("regcache: "))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains(&file), "{log}");
    assert!(errors[0].contains("deadline"), "{log}");
    let after = log.split(errors[0]).nth(1).unwrap_or_default();
    assert!(after.trim().is_empty(), "one line: {log}");
}

#[test]
fn a_slow_policy_is_refused_at_check_and_swap_naming_its_p99_and_the_budget() {
    let budget = "exceeds the latency budget of 200µs (policy.latency_budget)";
    // About 2 ms a decision: ten times the budget, and far from validation's 100 ms deadline
    // even on a thread that gets a fraction of a loaded core.
    let spin = "spin-iterations=5000000";
    let check_slow = |spin| {
        regcache(&[
            "policy",
            "check",
            &chaos(),
            "--policy-config",
            "fault=slow",
            "--policy-config",
            spin,
        ])
        .0
    };
    let check = check_slow(spin);
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    let refusal = stderr(&check);
    assert!(refusal.contains("decide-lookup p99 "), "{refusal}");
    assert!(refusal.contains(budget), "{refusal}");

    let host = admin_host();
    let active = host.get("/v1/policy").unwrap().json()["digest"].clone();
    let refused = put_policy(&host, &format!("?fault=slow&{spin}"), &policy_wasm("chaos"));
    assert_eq!(refused.status, 422, "{}", refused.text());
    let message = refused.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("decide-lookup p99 "), "{message}");
    assert!(message.contains(budget), "{message}");
    assert_eq!(host.get("/v1/policy").unwrap().json()["digest"], active);

    // The cost that matters is the decision's: the same policy passes with a budget above it.
    let generous = check_slow("spin-iterations=1000");
    assert!(generous.status.success(), "{}", stderr(&generous));
}

#[test]
fn a_policy_slow_only_on_the_first_asking_of_a_question_is_refused() {
    // Validation asks a call over the budget again at once, forgiving the machine's noise; a
    // policy that remembers the last question and is quick only when it comes again must not
    // pass for quick: on a host, questions never come twice in a row.
    let (check, _) = regcache(&[
        "policy",
        "check",
        &chaos(),
        "--policy-config",
        "fault=slow-first",
        "--policy-config",
        "spin-iterations=5000000",
    ]);
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    let refusal = stderr(&check);
    assert!(
        refusal.contains("decide-lookup p99 ")
            && refusal.contains("exceeds the latency budget of 200µs"),
        "{refusal}"
    );
}

#[test]
fn the_default_and_every_example_policy_pass_the_battery() {
    for name in ["default", "strict", "always-stale", "go-micro", "chaos"] {
        let path = policy_path(name);
        let (check, _) = regcache(&["policy", "check", path.to_str().unwrap()]);
        assert!(check.status.success(), "{name}: {}", stderr(&check));
    }
    // Time bombs set past the battery's clock pass: what they do later is the host's to contain.
    for fault in ["fault=trap", "fault=slow"] {
        let (bomb, _) = regcache(&[
            "policy",
            "check",
            &chaos(),
            "--policy-config",
            fault,
            "--policy-config",
            "after-ms=1750000000000",
        ]);
        assert!(bomb.status.success(), "{fault}: {}", stderr(&bomb));
    }
}

#[test]
fn a_policy_answering_by_a_call_counter_is_refused_as_impure_at_check_and_swap() {
    let check = check_chaos("parity");
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    let refusal = stderr(&check);
    assert!(refusal.contains("the policy is not pure"), "{refusal}");
    assert!(
        refusal.contains("conformance case `"),
        "names the case: {refusal}"
    );

    let host = admin_host();
    let refused = put_policy(&host, "?fault=parity", &policy_wasm("chaos"));
    assert_eq!(refused.status, 422, "{}", refused.text());
    let message = refused.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("the policy is not pure"), "{message}");
}

/// Lookups of `service` for `period`, as fast as one client goes; how many.
fn lookups_for(host: &Host, service: &str, period: Duration) -> usize {
    let started = Instant::now();
    let mut lookups = 0;
    while started.elapsed() < period {
        let answer = host.lookup(service);
        assert_eq!(answer.status, 200, "{}", answer.text());
        lookups += 1;
    }
    lookups
}

#[test]
fn a_printing_policy_passes_and_decides_in_the_host_its_output_logged_tagged_and_rate_limited() {
    let check = check_chaos("print");
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("chaos: deciding about `conformance.probe`"),
        "check logs the policy's output as the host does: {}",
        stderr(&check)
    );

    let host = admin_host();
    let created = host
        .request(
            "POST",
            "/v1/registrations",
            &[],
            service_json("greeter", "1", "n1", "10.0.0.1:1").as_bytes(),
        )
        .unwrap();
    assert_eq!(created.status, 201, "{}", created.text());
    let swapped = put_policy(&host, "?fault=print", &policy_wasm("chaos"));
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    let digest = swapped.json()["digest"].as_str().unwrap()[..12].to_string();

    let lookups = lookups_for(&host, "greeter", Duration::from_millis(2_500));
    let answer = host.lookup("greeter").json();
    assert_eq!(
        answer["provenance"]["policy"]["generation"], 2,
        "decided by the printing policy: {answer}"
    );
    let counters = host.get("/v1/policy").unwrap().json()["counters"].clone();
    assert_eq!(counters["traps"], 0, "{counters}");
    assert_eq!(counters["deadline_hits"], 0, "{counters}");
    let metrics = host.get("/metrics").unwrap().text();
    assert!(
        metrics
            .lines()
            .any(|l| l == "regcache_policy_traps_total 0"),
        "{metrics}"
    );

    let log = host.log();
    let printed = |text: &str, stream: &str| {
        log.lines()
            .filter(|l| l.contains(text) && l.contains(&digest) && l.contains(stream))
            .count()
    };
    let stdout = printed("chaos: deciding about `greeter`", "stdout");
    let stderr = printed("chaos: a line to stderr about `greeter`", "stderr");
    assert!(
        stdout > 0 && stderr > 0,
        "output tagged with {digest}:\n{log}"
    );
    // 20 lines a second per instance, stdout and stderr together; a few worker threads.
    assert!(
        stdout + stderr < lookups,
        "{lookups} lookups, {stdout} + {stderr} lines: not rate-limited"
    );
    assert!(log.contains("lines dropped"), "{log}");
}

#[test]
fn a_guests_panic_message_reaches_the_host_log_and_costs_a_fail_safe_answer() {
    let check = check_chaos("trap");
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    assert!(stderr(&check).contains("chaos: trap"), "{}", stderr(&check));

    let host = admin_host();
    let swapped = put_policy(
        &host,
        "?fault=trap&only-service=boom",
        &policy_wasm("chaos"),
    );
    assert_eq!(swapped.status, 200, "{}", swapped.text());
    let digest = swapped.json()["digest"].as_str().unwrap()[..12].to_string();
    let answer = host.lookup("boom");
    assert!(answer.status < 500, "{}", answer.text());
    assert!(
        eventually_blocking(Duration::from_secs(5), || {
            host.log()
                .lines()
                .any(|l| l.contains("chaos: trap") && l.contains(&digest))
        }),
        "{}",
        host.log()
    );
    assert!(
        !host.log().contains("a host call of the guest panicked"),
        "{}",
        host.log()
    );
    let counters = host.get("/v1/policy").unwrap().json()["counters"].clone();
    assert_eq!(counters["traps"], 1, "{counters}");
}

/// At run time a decision is stopped at the latency budget (in epoch ticks, 1-2 ms plus as much
/// again for the default), not at validation's 100 ms: a policy that turns slow costs a
/// fail-safe answer and a counted deadline failure, not a stalled worker.
#[test]
fn a_policy_that_turns_slow_is_stopped_at_the_budget_and_answered_fail_safe() {
    let spec = PolicySpec {
        wasm: policy_wasm("chaos").into(),
        source: "chaos".into(),
        config: vec![
            ("fault".into(), "slow".into()),
            ("after-ms".into(), "1750000000000".into()),
        ],
    };
    let engine = PolicyEngine::new(EngineOptions::default(), spec).expect("the bomb waits");
    let health = HealthView {
        watch_connected: true,
        since_last_contact_ms: Some(5),
        since_failure_ms: None,
    };
    let before = LookupContext::cached("svc", 1_700_000_000_000, health, 10);
    assert_eq!(
        engine.decide_lookup(&before).decision,
        LookupDecision::ServeCached
    );
    let after = LookupContext::cached("svc", 1_800_000_000_000, health, 10);
    let started = Instant::now();
    let decided = engine.decide_lookup(&after).decision;
    let took = started.elapsed();
    assert_eq!(
        decided,
        LookupDecision::ServeStale { refresh: true },
        "the fail-safe, after {took:?}"
    );
    assert_eq!(engine.stats().deadline_hits, 1);
    assert_eq!(engine.stats().traps, 0);
}

/// The engine as an embedder runs it: decisions on a tokio runtime's worker threads, where
/// wasmtime-wasi's stream calls used to `block_on` and panic.
#[test]
fn a_printing_policy_decides_on_a_runtime_worker_thread() {
    let spec = PolicySpec {
        wasm: policy_wasm("chaos").into(),
        source: "chaos".into(),
        config: vec![("fault".into(), "print".into())],
    };
    let engine = PolicyEngine::new(EngineOptions::default(), spec).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let decided = runtime.block_on({
        let engine = engine.clone();
        async move {
            tokio::spawn(async move {
                let health = HealthView {
                    watch_connected: true,
                    since_last_contact_ms: Some(5),
                    since_failure_ms: None,
                };
                let context = LookupContext::cached("svc", 1_000_000, health, 10);
                engine.decide_lookup(&context).decision
            })
            .await
            .unwrap()
        }
    });
    assert_eq!(decided, LookupDecision::ServeCached);
    assert_eq!(engine.stats().traps, 0);
}
