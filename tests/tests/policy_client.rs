//! `regcache policy push|status|shadow|recording` against a running host (the real binary, the
//! embedded registry), found as operators find it: the host's own `REGCACHE_LISTEN` and
//! `REGCACHE_ADMIN_TOKEN`, or a host's `--config` file. A shadow pushed, reported, promoted and
//! then gone; refusals as one line with their exit code (a swap refused by the host, a missing
//! or wrong token, an unreachable host); the recording fetched to a file replays through
//! `regcache policy replay` to what the host decided.

use std::net::TcpListener;
use std::time::Duration;

use regcache_tests::binary::run_regcache;
use regcache_tests::host::Host;
use regcache_tests::policies::{assert_replays_to_what_was_decided, policy_path};
use regcache_tests::wait::eventually_blocking;
use serde_json::Value;

const TOKEN: &str = "client-token";
const SERVICES: [&str; 3] = ["greeter", "billing", "search"];

/// What a run of the client did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Stdout as the JSON it must be.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// The one line a failure writes.
    fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected: {}", self.stderr);
        lines[0]
    }
}

fn regcache(args: &[&str], env: &[(&str, &str)]) -> Run {
    let (output, _) = run_regcache(args, env, Duration::from_secs(60));
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// `regcache policy <args>` in the host's environment: its address, and its token if `token`.
fn client(host: &Host, args: &[&str], token: bool) -> Run {
    let listen = host.addr.to_string();
    let mut env = vec![("REGCACHE_LISTEN", listen.as_str())];
    if token {
        env.push(("REGCACHE_ADMIN_TOKEN", TOKEN));
    }
    let mut all = vec!["policy"];
    all.extend_from_slice(args);
    regcache(&all, &env)
}

fn start(args: &[&str]) -> Host {
    let mut all = vec!["--admin-token", TOKEN];
    all.extend_from_slice(args);
    Host::start(&all).unwrap()
}

/// Registers and looks up [`SERVICES`].
fn warm(host: &Host) {
    host.register_each(&SERVICES);
    for name in SERVICES {
        assert_eq!(host.lookup(name).status, 200, "warming the cache");
    }
}

fn path(name: &str) -> String {
    policy_path(name).to_str().unwrap().to_string()
}

#[test]
fn a_shadow_is_pushed_reported_promoted_and_then_gone() {
    let host = start(&[]);
    warm(&host);
    let status = client(&host, &["status"], false);
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    let active = status.json();
    assert_eq!(active["generation"], 1);

    // strict with a 1 ms TTL serves stale what the default serves fresh: it disagrees.
    let strict = path("strict");
    let pushed = client(
        &host,
        &["push", &strict, "--shadow", "--policy-config", "ttl-ms=1"],
        true,
    );
    assert_eq!(pushed.code, Some(0), "{}", pushed.stderr);
    let loaded = pushed.json();
    assert_eq!(loaded["asked"], 0, "a shadow's report: {loaded}");
    assert_ne!(loaded["digest"], active["digest"]);
    assert_eq!(
        client(&host, &["status"], false).json()["digest"],
        active["digest"],
        "a shadow is not active"
    );

    std::thread::sleep(Duration::from_millis(5)); // past the shadow's 1 ms TTL
    let lookups = 12;
    for i in 0..lookups {
        assert_eq!(host.lookup(SERVICES[i % SERVICES.len()]).status, 200);
    }
    assert!(eventually_blocking(Duration::from_secs(10), || {
        client(&host, &["shadow"], true).json()["asked"].as_u64() >= Some(lookups as u64)
    }));
    let without_token = client(&host, &["shadow"], false);
    assert_eq!(without_token.code, Some(1), "{}", without_token.stderr);
    assert!(without_token.error_line().starts_with("regcache: 401 "));
    let report = client(&host, &["shadow"], true);
    assert_eq!(report.code, Some(0), "{}", report.stderr);
    let report = report.json();
    assert_eq!(report["digest"], loaded["digest"]);
    assert!(
        report["disagreed"].as_u64() >= Some(lookups as u64),
        "{report}"
    );

    let promoted = client(&host, &["shadow", "--promote"], true);
    assert_eq!(promoted.code, Some(0), "{}", promoted.stderr);
    let promoted = promoted.json();
    assert_eq!(promoted["generation"], 2);
    assert_eq!(promoted["digest"], loaded["digest"]);
    assert_eq!(promoted["settings"]["ttl_ms"], 1);

    for args in [
        &["shadow", "--drop"][..],
        &["shadow"],
        &["shadow", "--promote"],
    ] {
        let gone = client(&host, args, true);
        assert_eq!(gone.code, Some(1), "{args:?}: {}", gone.stderr);
        let line = gone.error_line();
        assert!(
            line.starts_with("regcache: 404 no_shadow: ") && line.contains("push FILE --shadow"),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn refusals_are_one_line_with_the_reason_and_what_to_do() {
    let host = start(&["--policy-record-ring", "100"]);
    let active = client(&host, &["status"], false).json();
    let chaos = path("chaos");
    let replayed = [
        "push",
        chaos.as_str(),
        "--replay-recent",
        "--policy-config",
        "fault=trap,only-service=greeter",
    ];

    // Nothing was looked up, so nothing is recorded: no replay can vouch for the candidate.
    let refused = client(&host, &replayed, true);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    let line = refused.error_line();
    assert!(
        line.starts_with("regcache: 422 policy_refused: ")
            && line.contains("nothing is recorded")
            && line.ends_with(&format!(
                "; generation 1 (sha256:{}) stays active",
                active["digest"].as_str().unwrap()
            )),
        "{line}"
    );
    assert_eq!(client(&host, &["status"], false).json()["generation"], 1);

    let untokened = client(&host, &replayed, false);
    assert_eq!(untokened.code, Some(1), "{}", untokened.stderr);
    let line = untokened.error_line();
    assert!(
        line.starts_with("regcache: 401 unauthorized: ")
            && line.contains("`admin_token` (--admin-token / REGCACHE_ADMIN_TOKEN)")
            && line.contains("`admin_token_file` (--admin-token-file / REGCACHE_ADMIN_TOKEN_FILE)"),
        "{line}"
    );

    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let listen = host.addr.to_string();
    let mistaken = regcache(
        &["policy", "recording"],
        &[
            ("REGCACHE_LISTEN", &listen),
            ("REGCACHE_ADMIN_TOKEN_FILE", wrong.to_str().unwrap()),
        ],
    );
    assert_eq!(mistaken.code, Some(1), "{}", mistaken.stderr);
    assert!(
        mistaken.error_line().ends_with(
            "the token given by `admin_token_file` (--admin-token-file / \
             REGCACHE_ADMIN_TOKEN_FILE) is not the host's"
        ),
        "{}",
        mistaken.stderr
    );

    // The API's own parameters are not the policy's: refused before the host is asked.
    let reserved = client(&host, &["push", &chaos, "--policy-config", "mode=x"], true);
    assert_eq!(reserved.code, Some(2), "{}", reserved.stderr);
    assert!(
        reserved.error_line().contains("`mode`"),
        "{}",
        reserved.stderr
    );
}

#[test]
fn an_unreachable_host_is_named_with_the_setting_that_gave_its_address() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let run = regcache(&["policy", "status", "--listen", &closed.to_string()], &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let line = run.error_line();
    assert!(
        line.starts_with(&format!("regcache: cannot reach the host at {closed} "))
            && line.contains("--listen / REGCACHE_LISTEN"),
        "{line}"
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[test]
fn the_recording_fetched_to_a_file_replays_to_what_the_host_decided() {
    let host = start(&["--policy-record-ring", "1000"]);
    warm(&host);
    for name in SERVICES {
        assert_eq!(host.lookup(name).status, 200);
    }
    // A host's own configuration file, listening on every address (asked on loopback), with
    // the token in the file the configuration names.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"0.0.0.0:{}\"\nadmin_token_file = \"{}\"\n",
            host.addr.port(),
            token.display()
        ),
    )
    .unwrap();
    let recording = dir.path().join("recording.jsonl");
    let fetched = regcache(
        &[
            "policy",
            "recording",
            "--config",
            config.to_str().unwrap(),
            "-o",
            recording.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(fetched.code, Some(0), "{}", fetched.stderr);
    assert!(fetched.stdout.is_empty(), "{}", fetched.stdout);
    let text = std::fs::read_to_string(&recording).unwrap();
    let recorded: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The warm-up lookups and the ones above.
    assert!(recorded.len() >= 2 * SERVICES.len(), "{text}");
    assert_eq!(
        fetched.stderr.trim(),
        format!(
            "{} recorded questions written to {}",
            recorded.len(),
            recording.display()
        )
    );

    assert_replays_to_what_was_decided(&policy_path("default"), &recording);
}
