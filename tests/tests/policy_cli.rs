//! The policy author's path, as the README tells it: `regcache policy new`, `build`, `check`,
//! `eval`, with the real binary.

use std::process::{Command, Output};

use regcache_tests::binary::regcache_bin;
use regcache_tests::policies::{policy_path, repo_root};

fn regcache(args: &[&str]) -> Output {
    Command::new(regcache_bin())
        .args(args)
        // Share compiled dependencies (wit-bindgen) with the repository's own policy builds.
        .env("CARGO_TARGET_DIR", repo_root().join("target/policy"))
        .output()
        .expect("run regcache")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_new_policy_scaffold_builds_passes_check_and_decides() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("my-policy");
    let crate_dir = crate_dir.to_str().unwrap();

    let new = regcache(&["policy", "new", crate_dir]);
    assert!(new.status.success(), "{}", stderr(&new));
    let again = regcache(&["policy", "new", crate_dir]);
    assert!(
        !again.status.success(),
        "scaffolding over a non-empty directory must fail"
    );

    let build = regcache(&["policy", "build", crate_dir]);
    assert!(build.status.success(), "{}", stderr(&build));
    let wasm = stdout(&build).trim().to_string();
    assert!(wasm.ends_with("my_policy.wasm"), "{wasm}");

    let check = regcache(&["policy", "check", &wasm, "--policy-config", "ttl-ms=2000"]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(stdout(&check).contains("ttl: 2s"), "{}", stdout(&check));

    let eval = regcache(&[
        "policy",
        "eval",
        &wasm,
        "--policy-config",
        "ttl-ms=2000",
        "--context",
        r#"{"cached": true, "nodes": 3, "since_refresh_ms": 2500}"#,
    ]);
    assert!(eval.status.success(), "{}", stderr(&eval));
    assert_eq!(
        stdout(&eval).trim(),
        r#"{"decision":"serve_stale","refresh":true}"#
    );

    let refused = regcache(&["policy", "check", &wasm, "--policy-config", "ttl=1"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("unknown configuration key `ttl`"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn check_refuses_bad_files_with_the_reason_and_eval_rejects_bad_json() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm but not really").unwrap();
    let check = regcache(&["policy", "check", garbage.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(1));
    assert!(stderr(&check).contains("refused"), "{}", stderr(&check));

    let strict = policy_path("strict");
    let eval = regcache(&[
        "policy",
        "eval",
        strict.to_str().unwrap(),
        "--context",
        r#"{"cachd": true}"#,
    ]);
    assert!(!eval.status.success());
    assert!(
        stderr(&eval).contains("unknown field `cachd`"),
        "{}",
        stderr(&eval)
    );

    let eviction = regcache(&[
        "policy",
        "eval",
        strict.to_str().unwrap(),
        "--eviction",
        "--context",
        r#"{"nodes_before": 5, "nodes_after": 1, "recent_deletions": 4}"#,
    ]);
    assert!(eviction.status.success(), "{}", stderr(&eviction));
    assert_eq!(stdout(&eviction).trim(), r#"{"decision":"evict"}"#);
}
