//! `regcache policy new --lang js|python` to a hot-swapped policy, as the README tells a new
//! user: its walkthrough blocks run as written, by bash, against a real host. The scaffolds'
//! starters decide as the Rust one does; `new` and `build` refuse what they cannot do, naming
//! why; a missing toolchain is named with what to install.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use regcache_tests::binary::{regcache_bin, run_regcache};
use regcache_tests::host::{Host, service_json};
use regcache_tests::policies::repo_root;

const TOKEN: &str = "walkthrough-token";

/// What a run of `regcache` did.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

fn regcache(args: &[&str], env: &[(&str, &str)]) -> Run {
    // A Python build takes ~20 s, its first install as long again.
    let (output, _) = run_regcache(args, env, Duration::from_secs(300));
    Run {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// The shell block that follows `<!-- walkthrough: LANG -->` in the README.
fn walkthrough(lang: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let marker = format!("<!-- walkthrough: {lang} -->\n");
    let (_, after) = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("the README has no `{}`", marker.trim()));
    let body = after
        .strip_prefix("```sh\n")
        .unwrap_or_else(|| panic!("a ```sh block must follow `{}`", marker.trim()));
    let (block, _) = body.split_once("\n```\n").expect("the block ends");
    block.to_string()
}

fn sha256_hex(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    line.split_whitespace().next().unwrap().to_string()
}

/// The one component built under `dir`'s projects (`*/target/*.wasm`).
fn built_component(dir: &Path) -> PathBuf {
    let built: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|project| std::fs::read_dir(project.ok()?.path().join("target")).ok())
        .flatten()
        .map(|file| file.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "wasm"))
        .collect();
    assert_eq!(built.len(), 1, "one component built: {built:?}");
    built.into_iter().next().unwrap()
}

/// Runs the README's walkthrough for `lang` in an empty directory, the regcache binary first on
/// PATH, against a host found through REGCACHE_LISTEN and REGCACHE_ADMIN_TOKEN; then holds the
/// host to running the component it built, and a second build to installing nothing.
fn walkthrough_swaps_the_policy(lang: &str) {
    let host = Host::start(&["--admin-token", TOKEN]).unwrap();
    let registered = host
        .request(
            "POST",
            "/v1/registrations",
            &[],
            service_json("greeter", "1", "greeter-1", "10.0.0.1:80").as_bytes(),
        )
        .unwrap();
    assert_eq!(registered.status, 201, "{}", registered.text());

    let dir = tempfile::tempdir().unwrap();
    let bin_dir = regcache_bin().parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let block = walkthrough(lang);
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{block}"))
        .current_dir(dir.path())
        .env("PATH", path)
        .env("REGCACHE_LISTEN", host.addr.to_string())
        .env("REGCACHE_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the walkthrough failed:\n{block}\nstdout:\n{}\nstderr:\n{}\nhost:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        host.log()
    );

    let wasm = built_component(dir.path());
    let digest = sha256_hex(&wasm);
    let active = host.get("/v1/policy").unwrap().json();
    assert_eq!(active["generation"], 2, "{active}");
    assert_eq!(active["digest"], digest.as_str(), "{active}");
    // The starter waits for the registry on a miss and serves the cache while it is fresh.
    for expected in ["refresh_and_wait", "serve_cached"] {
        let answer = host.lookup("greeter");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let provenance = &answer.json()["provenance"];
        assert_eq!(provenance["decision"], expected, "{provenance}");
        assert_eq!(provenance["policy"]["generation"], 2, "{provenance}");
        assert_eq!(provenance["policy"]["digest"], digest.as_str());
    }

    let project = wasm.parent().unwrap().parent().unwrap();
    let again = regcache(&["policy", "build", project.to_str().unwrap()], &[]);
    assert!(again.success, "{}", again.stderr);
    assert_eq!(again.stdout.trim(), wasm.to_str().unwrap());
    assert!(
        !again.stderr.contains("installing"),
        "a second build installs nothing: {}",
        again.stderr
    );
}

#[test]
fn the_readme_walkthrough_in_javascript_swaps_the_policy() {
    walkthrough_swaps_the_policy("js");
}

#[test]
fn the_readme_walkthrough_in_python_swaps_the_policy() {
    walkthrough_swaps_the_policy("python");
}

/// Lookups with ages around the TTL (2 s here), none and u64::MAX, cached or not, and evictions:
/// as recorded questions.
fn starter_questions() -> String {
    let mut lines = Vec::new();
    for cached in [true, false] {
        for age in [
            None,
            Some(0),
            Some(1_999),
            Some(2_000),
            Some(2_001),
            Some(u64::MAX),
        ] {
            let context = serde_json::json!({
                "service": "greeter",
                "cached": cached,
                "nodes": u32::from(cached),
                "since_refresh_ms": age,
            });
            lines.push(serde_json::json!({ "lookup": { "context": context } }).to_string());
        }
    }
    for (before, after) in [(3, 2), (5, 0)] {
        let context = serde_json::json!({ "nodes_before": before, "nodes_after": after });
        lines.push(serde_json::json!({ "eviction": { "context": context } }).to_string());
    }
    lines.join("\n") + "\n"
}

#[test]
fn the_starters_in_javascript_and_python_decide_as_the_rust_one() {
    let dir = tempfile::tempdir().unwrap();
    let built = |lang: &str| {
        let project = dir.path().join(format!("{lang}-starter"));
        let project = project.to_str().unwrap();
        // Share compiled dependencies (wit-bindgen) with the repository's own policy builds.
        let target = repo_root().join("target/policy");
        let env = [("CARGO_TARGET_DIR", target.to_str().unwrap())];
        let new = regcache(&["policy", "new", "--lang", lang, project], &env);
        assert!(new.success, "{}", new.stderr);
        let build = regcache(&["policy", "build", project], &env);
        assert!(build.success, "{}", build.stderr);
        build.stdout.trim().to_string()
    };
    let rust = built("rust");
    let questions = dir.path().join("questions.jsonl");
    std::fs::write(&questions, starter_questions()).unwrap();
    let asked = starter_questions().lines().count();
    for lang in ["js", "python"] {
        let wasm = built(lang);
        let replay = regcache(
            &[
                "policy",
                "replay",
                &wasm,
                "--against",
                &rust,
                "--contexts",
                questions.to_str().unwrap(),
                "--policy-config",
                "ttl-ms=2000",
            ],
            &[],
        );
        assert!(replay.success, "{lang}: {}{}", replay.stdout, replay.stderr);
        assert_eq!(replay.stdout, "", "{lang}: no difference");
        let total = replay.stderr.lines().find(|l| l.starts_with("total"));
        let counts: Vec<&str> = total.unwrap().split_whitespace().skip(1).collect();
        assert_eq!(counts, [asked.to_string(), "0".into()], "{}", replay.stderr);
    }
}

#[test]
fn new_refuses_a_non_empty_directory_and_build_what_it_cannot_build() {
    let dir = tempfile::tempdir().unwrap();
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("notes.txt"), "mine").unwrap();
    let new = regcache(
        &["policy", "new", "--lang", "js", taken.to_str().unwrap()],
        &[],
    );
    assert!(!new.success);
    assert!(new.stderr.contains("is not empty"), "{}", new.stderr);
    assert_eq!(
        std::fs::read_dir(&taken).unwrap().count(),
        1,
        "nothing added"
    );

    let nothing = regcache(&["policy", "build", taken.to_str().unwrap()], &[]);
    assert!(!nothing.success);
    for named in [
        "no policy project",
        "Cargo.toml",
        "package.json",
        "requirements.txt",
    ] {
        assert!(nothing.stderr.contains(named), "{}", nothing.stderr);
    }

    let rust = dir.path().join("rust");
    let rust = rust.to_str().unwrap();
    assert!(regcache(&["policy", "new", rust], &[]).success);
    let wit = repo_root().join("wit");
    let with_wit = regcache(
        &["policy", "build", "--wit", wit.to_str().unwrap(), rust],
        &[],
    );
    assert!(!with_wit.success);
    assert!(
        with_wit.stderr.contains("--wit is for"),
        "{}",
        with_wit.stderr
    );
}

#[test]
fn a_missing_toolchain_is_named_with_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let empty_path = dir.path().join("no-programs");
    std::fs::create_dir(&empty_path).unwrap();
    let path = [("PATH", empty_path.to_str().unwrap())];
    for (lang, missing, install) in [
        ("js", "`npm` not found", "apt-get install nodejs npm"),
        ("python", "`python3` not found", "python3-venv"),
    ] {
        let project = dir.path().join(lang);
        let project = project.to_str().unwrap();
        assert!(regcache(&["policy", "new", "--lang", lang, project], &[]).success);
        let build = regcache(&["policy", "build", project], &path);
        assert!(!build.success);
        let error = build.stderr.lines().last().unwrap_or_default();
        assert!(error.contains(missing), "{lang}: {}", build.stderr);
        assert!(error.contains(install), "{lang}: {}", build.stderr);
    }
}

#[test]
fn the_javascript_scaffold_locks_what_the_strict_example_does() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("regcache-policy-strict");
    let new = regcache(
        &["policy", "new", "--lang", "js", project.to_str().unwrap()],
        &[],
    );
    assert!(new.success, "{}", new.stderr);
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap();
    assert_eq!(
        read(project.join("package-lock.json")),
        read(repo_root().join("policy/lang/js/strict/package-lock.json")),
        "the scaffold's lock (host/templates/policy-js) is the strict example's, renamed"
    );
}
