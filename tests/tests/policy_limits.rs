//! Finding 7 of issue 12, with the real binary: a policy sets its own limits no more. Legal
//! extremes (a retry interval of 1 ms, a million registry reads a second, a day's suspect hold,
//! a minute's wait: within the WIT's ranges) are refused by `policy check`, at start-up and by
//! `PUT /v1/policy`, each naming the operator's bound; an operator who widens the bounds (flags,
//! variables or the configuration file) gets the policy loaded. The policy's new settings are
//! refused with one line naming the setting, its flag and its variable.

use std::process::Output;
use std::time::Duration;

use regcache_tests::binary::run_regcache;
use regcache_tests::host::Host;
use regcache_tests::policies::{policy_path, policy_wasm};

const TOKEN: &str = "limits-token";

/// Each extreme, with the bound that refuses it and the word the refusal uses.
const EXTREMES: [(&str, &str, &str, &str); 4] = [
    (
        "min-retry-interval-ms",
        "1",
        "policy.limits.min_retry_interval",
        "below the operator's floor of 100ms",
    ),
    (
        "registry-budget-per-second",
        "1000000",
        "policy.limits.max_registry_budget",
        "above the operator's ceiling of 1000",
    ),
    (
        "max-suspect-hold-ms",
        "86400000",
        "policy.limits.max_suspect_hold",
        "above the operator's ceiling of 3600s",
    ),
    (
        "max-wait-ms",
        "60000",
        "policy.limits.max_wait",
        "above the operator's ceiling of 10s",
    ),
];

/// Bounds as wide as the WIT's ranges.
const WIDE: [&str; 8] = [
    "--policy-limits-min-retry-interval",
    "1ms",
    "--policy-limits-max-registry-budget",
    "1000000",
    "--policy-limits-max-suspect-hold",
    "24h",
    "--policy-limits-max-wait",
    "60s",
];

/// All four extremes at once, as `--policy-config` takes them.
fn all_extremes() -> String {
    EXTREMES
        .iter()
        .map(|(key, value, _, _)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `regcache <args>` to its end (at most 60 s), with `env`.
fn regcache(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_regcache(args, env, Duration::from_secs(60)).0
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn policy_check_refuses_each_legal_extreme_naming_the_operators_bound() {
    let chaos = policy_path("chaos");
    let chaos = chaos.to_str().unwrap();
    for (key, value, bound, words) in EXTREMES {
        let config = format!("{key}={value}");
        let refused = regcache(&["policy", "check", chaos, "--policy-config", &config], &[]);
        assert!(!refused.status.success(), "{config}: {}", stdout(&refused));
        let text = stderr(&refused);
        assert!(
            text.contains(&format!("setting `{key}` = {value} is {words} ({bound})")),
            "{config}: {text}"
        );
    }

    // Widened by flags, all four at once load; `eval` judges alike.
    let extremes = all_extremes();
    let mut args = vec![
        "policy",
        "check",
        chaos,
        "--policy-config",
        extremes.as_str(),
    ];
    args.extend(WIDE);
    let loaded = regcache(&args, &[]);
    assert!(loaded.status.success(), "{}", stderr(&loaded));
    assert!(
        stdout(&loaded).contains("min_retry_interval: 1ms"),
        "{}",
        stdout(&loaded)
    );
    let context = r#"{"cached": false}"#;
    let eval = ["policy", "eval", chaos, "--context", context];
    let refused = regcache(
        &[&eval[..], &["--policy-config", extremes.as_str()]].concat(),
        &[],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("policy.limits.min_retry_interval"),
        "{}",
        stderr(&refused)
    );
    let decided = regcache(
        &[&eval[..], &["--policy-config", extremes.as_str()], &WIDE].concat(),
        &[],
    );
    assert!(decided.status.success(), "{}", stderr(&decided));

    // Or by a host's configuration file (its [policy] table), or by the variables.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regcache.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:1\"\n[policy]\nconfig = {{ {} }}\n[policy.limits]\n\
             min_retry_interval = \"1ms\"\nmax_registry_budget = 1000000\n\
             max_suspect_hold = \"24h\"\nmax_wait = \"60s\"\n",
            EXTREMES
                .iter()
                .map(|(key, value, _, _)| format!("{key} = {value}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let loaded = regcache(&["policy", "check", chaos, "--config", file], &[]);
    assert!(loaded.status.success(), "{}", stderr(&loaded));
    // A flag wins over the file: the floor raised again refuses it.
    let refused = regcache(
        &[
            "policy",
            "check",
            chaos,
            "--config",
            file,
            "--policy-limits-min-retry-interval",
            "5ms",
        ],
        &[],
    );
    assert!(
        stderr(&refused).contains("below the operator's floor of 5ms"),
        "{}",
        stderr(&refused)
    );
    let loaded = regcache(
        &[
            "policy",
            "check",
            chaos,
            "--policy-config",
            "min-retry-interval-ms=1",
        ],
        &[("REGCACHE_POLICY_LIMITS_MIN_RETRY_INTERVAL", "1ms")],
    );
    assert!(loaded.status.success(), "{}", stderr(&loaded));
}

#[test]
fn a_host_refuses_legal_extremes_at_start_and_over_the_api_unless_its_operator_widens_them() {
    let chaos = policy_path("chaos");
    let chaos = chaos.to_str().unwrap();
    let extremes = all_extremes();

    // At start-up: the same verdict as `check`, one line naming the bound.
    let refused = regcache(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--policy-file",
            chaos,
            "--policy-config",
            extremes.as_str(),
        ],
        &[],
    );
    assert!(!refused.status.success());
    let text = stderr(&refused);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("regcache:"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains("(policy.limits.min_retry_interval)"),
        "{text}"
    );

    // Over the API, each extreme alone; the active policy stays.
    let wasm = policy_wasm("chaos");
    let host = Host::start(&["--admin-token", TOKEN]).unwrap();
    let auth = format!("Bearer {TOKEN}");
    for (key, value, bound, words) in EXTREMES {
        let put = host
            .request(
                "PUT",
                &format!("/v1/policy?{key}={value}"),
                &[("Authorization", &auth)],
                &wasm,
            )
            .unwrap();
        assert_eq!(put.status, 422, "{key}: {}", put.text());
        assert!(
            put.text()
                .contains(&format!("setting `{key}` = {value} is {words} ({bound})")),
            "{key}: {}",
            put.text()
        );
    }
    let active = host.get("/v1/policy").unwrap().json();
    assert_eq!(active["generation"], 1, "{active}");

    // A host whose operator widened the bounds takes them, at start-up and over the API.
    let query = extremes.replace(',', "&");
    let mut args = vec![
        "--admin-token",
        TOKEN,
        "--policy-file",
        chaos,
        "--policy-config",
        extremes.as_str(),
    ];
    args.extend(WIDE);
    let wide = Host::start(&args).unwrap();
    let active = wide.get("/v1/policy").unwrap().json();
    assert_eq!(active["settings"]["min_retry_interval_ms"], 1, "{active}");
    let put = wide
        .request(
            "PUT",
            &format!("/v1/policy?{query}"),
            &[("Authorization", &auth)],
            &wasm,
        )
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
}

/// A bad value of each new setting stops `run` (and `policy check`) with one line naming the
/// setting, its flag and its variable, whether it came as a flag or as a variable.
#[test]
fn a_bad_value_of_each_policy_setting_is_one_line_naming_it() {
    let cases = [
        ("policy.max_size", "1KiB"),
        ("policy.compile_cpu_time", "1h"),
        ("policy.compile_memory", "lots"),
        ("policy.latency_budget", "1us"),
        ("policy.rollback_failures", "0"),
        ("policy.rollback_window", "10ms"),
        ("policy.limits.min_retry_interval", "0ms"),
        ("policy.limits.max_registry_budget", "2000000"),
        ("policy.limits.max_suspect_hold", "2d"),
        ("policy.limits.max_wait", "2m"),
    ];
    let chaos = policy_path("chaos");
    let chaos = chaos.to_str().unwrap();
    for (i, (key, value)) in cases.into_iter().enumerate() {
        let flag = format!("--{}", key.replace(['.', '_'], "-"));
        let variable = format!("REGCACHE_{}", key.replace('.', "_").to_uppercase());
        let named = format!("`{key}` ({flag} / {variable})");
        // Alternately as a flag and as a variable.
        let (args, env): (Vec<&str>, Vec<(&str, &str)>) = if i % 2 == 0 {
            (vec!["run", flag.as_str(), value], vec![])
        } else {
            (vec!["run"], vec![(variable.as_str(), value)])
        };
        let output = regcache(&args, &env);
        assert!(!output.status.success(), "{key}={value} must fail");
        let text = stderr(&output);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("regcache:"))
            .collect();
        assert_eq!(lines.len(), 1, "{key}={value}: one error line:\n{text}");
        assert!(lines[0].contains(&named), "{key}={value}: {text}");
    }
    let output = regcache(
        &["policy", "check", chaos, "--policy-latency-budget", "1s"],
        &[],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(
            "`policy.latency_budget` (--policy-latency-budget / REGCACHE_POLICY_LATENCY_BUDGET): \
             must be between 10µs and 50ms"
        ),
        "{}",
        stderr(&output)
    );
}
