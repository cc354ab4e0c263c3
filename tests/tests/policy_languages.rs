//! The `strict` policy written in JavaScript and in Python (`policy/lang/`, issue 13) against the
//! Rust one: each passes the host's validation, in the library and through `regcache policy
//! check`; each reads the operator's configuration as Rust does (the same settings, the same
//! refusals with the same reasons); and each decides exactly as Rust does on a recording of a
//! few thousand generated lookups and evictions under several configurations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regcache::decision::{
    EvictionContext, EvictionReason, HealthView, LookupContext, Question, Settings,
};
use regcache::policy::{
    CallFailure, EngineOptions, InvalidSetting, PolicyEngine, PolicyError, PolicySpec,
};
use regcache::recording::{self, Recorded};
use regcache::registry::ErrorKind;
use regcache_tests::binary::run_regcache;
use regcache_tests::policies::{Lang, policy_path, strict_in};

/// The three implementations of `strict`, the Rust one first (the reference).
fn strict_policies() -> Vec<(&'static str, Vec<u8>)> {
    let mut policies = vec![("rust", std::fs::read(policy_path("strict")).unwrap())];
    for lang in Lang::ALL {
        policies.push((lang.name(), std::fs::read(strict_in(lang)).unwrap()));
    }
    policies
}

fn spec(source: &str, wasm: &[u8], config: &[(&str, &str)]) -> PolicySpec {
    PolicySpec {
        wasm: wasm.to_vec().into(),
        source: source.to_string(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// One engine per implementation, each with its policy active under the default configuration.
fn engines() -> Vec<(&'static str, PolicyEngine)> {
    strict_policies()
        .into_iter()
        .map(|(source, wasm)| {
            let engine = PolicyEngine::new(EngineOptions::default(), spec(source, &wasm, &[]))
                .unwrap_or_else(|e| panic!("the engine refused the {source} strict policy: {e}"));
            (source, engine)
        })
        .collect()
}

#[test]
fn javascript_and_python_pass_validation_in_the_library_and_the_binary() {
    // Each engine is built with the default options, validating its policy as a swap does;
    // a refusal fails the test with the reason.
    engines();
    for lang in Lang::ALL {
        let path = strict_in(lang).to_str().unwrap();
        let (check, _) = run_regcache(&["policy", "check", path], &[], Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success() && stdout.starts_with(&format!("{path}: ok")),
            "`regcache policy check` refused the {} strict policy: {stdout}{}",
            lang.name(),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

#[test]
fn a_python_policy_needs_its_memory_and_policy_memory_is_what_it_gets() {
    // A Python instance starts with 13 MiB of linear memory: under the default 16 MiB it
    // passes (above); under 8 MiB it cannot even be instantiated, and says so.
    let path = strict_in(Lang::Python).to_str().unwrap();
    let (check, _) = run_regcache(
        &["policy", "check", path, "--policy-memory", "8MiB"],
        &[],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refused")
            && stderr.contains("memory")
            && (stderr.contains("0x800000") || stderr.contains("8388608")),
        "{stderr}"
    );
}

/// What loading a policy under a configuration gives, as far as the policy decides it.
#[derive(Debug, PartialEq)]
enum Configured {
    Settings(Settings),
    Refused(String),
    OutOfRange(InvalidSetting),
}

fn configured(engine: &PolicyEngine, spec: &PolicySpec) -> Configured {
    match engine.check(spec) {
        Ok(settings) => Configured::Settings(settings),
        Err(PolicyError::Configure(CallFailure::Refused(reason))) => Configured::Refused(reason),
        Err(PolicyError::Settings(invalid)) => Configured::OutOfRange(invalid),
        Err(other) => panic!("{} under {:?}: {other}", spec.source, spec.config),
    }
}

#[test]
fn javascript_and_python_read_the_configuration_as_rust_does() {
    let max = "18446744073709551615";
    let cases: &[&[(&str, &str)]] = &[
        &[],
        &[("ttl-ms", "1000"), ("max-stale-ms", "500")],
        &[("bogus", "1")],
        // The first unknown key in code point order (Rust's BTreeMap), not in UTF-16 order.
        &[("zz", "1"), ("𝒜", "1"), ("\u{e000}", "1"), ("ä", "1")],
        &[("ttl-ms", "1000"), ("ttl-ms", "1000")],
        &[("bogus", "1"), ("max-wait-ms", "1"), ("bogus", "2")],
        // Settings are read before the policy's own keys, in the SDK's order.
        &[
            ("max-stale-ms", "x"),
            ("eviction-batch-ms", "y"),
            ("ttl-ms", "z"),
        ],
        &[("ttl-ms", "")],
        &[("ttl-ms", "+")],
        &[("ttl-ms", "-1")],
        &[("ttl-ms", "1_000")],
        &[("ttl-ms", "1e3")],
        &[("ttl-ms", "0x10")],
        &[("ttl-ms", "٣")],
        &[("ttl-ms", "18446744073709551616")],
        &[("ttl-ms", " +1000\t")],
        &[("ttl-ms", "\u{85}\u{3000}1000\u{2029}")],
        &[("ttl-ms", "\u{feff}1000")],
        &[("ttl-ms", "\u{1c}1000")],
        &[("ttl-ms", "0001000")],
        &[("ttl-ms", "0")],
        &[("max-wait-ms", "4294967296")],
        &[("registry-budget-per-second", "4294967296")],
        &[("registry-budget-per-second", "4294967295")],
        &[("max-stale-ms", max), ("healthy-contact-ms", max)],
        &[("max-suspect-hold-ms", max)],
        &[
            ("max-suspect-hold-ms", "0"),
            ("negative-ttl-ms", "0"),
            ("eviction-batch-ms", "0"),
        ],
    ];
    let policies = strict_policies();
    let engines = engines();
    for config in cases {
        let outcomes: Vec<_> = policies
            .iter()
            .zip(&engines)
            .map(|((source, wasm), (_, engine))| {
                (source, configured(engine, &spec(source, wasm, config)))
            })
            .collect();
        for (source, outcome) in &outcomes[1..] {
            assert_eq!(*outcome, outcomes[0].1, "{source} under {config:?}");
        }
    }
}

/// SplitMix64: the same contexts on every run, no dependency.
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }

    fn chance(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// A duration in ms: mostly just around one of `edges` (where a decision turns), sometimes
/// anywhere below 200 s, sometimes never (`None`) or within 2 of u64::MAX (which JavaScript's
/// bindings carry as small negative Numbers).
fn age(numbers: &mut Numbers, edges: &[u64]) -> Option<u64> {
    match numbers.below(10) {
        0 => None,
        1 => Some(u64::MAX - numbers.below(3)),
        2 | 3 => Some(numbers.below(200_000)),
        _ => Some(
            numbers
                .pick(edges)
                .saturating_add(numbers.pick(&[0, 1, 2]))
                .saturating_sub(1),
        ),
    }
}

/// `count` lookups and evictions around the edges of a configuration whose TTL, stale bound,
/// negative TTL and healthy-contact bound are `edges`.
fn questions(count: usize, edges: &[u64], seed: u64) -> Vec<Question> {
    // Its rejection's reason is 1 KiB, as long as the host takes.
    let long_name = "服".repeat(338);
    let services = [
        "greeter",
        "go.micro.srv.example",
        "",
        "ünïcödé-服务",
        "🦀.crab",
        "with space\tand\nnewline",
        &long_name,
    ];
    let errors = [
        None,
        Some(ErrorKind::Timeout),
        Some(ErrorKind::Unavailable),
        Some(ErrorKind::Unauthenticated),
        Some(ErrorKind::NotFound),
        Some(ErrorKind::InvalidInput),
    ];
    let reasons = [
        EvictionReason::WatchDelete,
        EvictionReason::LeaseExpired,
        EvictionReason::NodeTtl,
        EvictionReason::Refresh,
    ];
    let numbers = &mut Numbers(seed);
    (0..count)
        .map(|_| {
            let service = numbers.pick(&services);
            let health = HealthView {
                watch_connected: numbers.below(4) != 0,
                since_last_contact_ms: age(numbers, edges),
                since_failure_ms: age(numbers, edges),
            };
            let now_ms = 1_700_000_000_000 + numbers.below(1 << 40);
            if numbers.below(3) == 0 {
                let nodes_before = numbers.below(6) as u32;
                Question::from(&EvictionContext {
                    service,
                    now_ms,
                    nodes_before,
                    nodes_after: numbers.below(u64::from(nodes_before) + 1) as u32,
                    recent_deletions: numbers.below(8) as u32,
                    window_ms: numbers.pick(&[0, 30_000, 60_000]),
                    health,
                    reason: numbers.pick(&reasons),
                })
            } else {
                let cached = numbers.chance();
                Question::from(&LookupContext {
                    service,
                    now_ms,
                    cached,
                    negative: !cached && numbers.chance(),
                    versions: numbers.below(3) as u32,
                    nodes: numbers.below(5) as u32,
                    suspect_nodes: numbers.below(2) as u32,
                    since_refresh_ms: age(numbers, edges),
                    since_attempt_ms: age(numbers, edges),
                    consecutive_failures: numbers.below(4) as u32,
                    last_error: numbers.pick(&errors),
                    refresh_in_flight: numbers.chance(),
                    health,
                })
            }
        })
        .collect()
}

/// A configuration, the edges its decisions turn at (ttl, ttl + max-stale, the negative TTL, the
/// healthy-contact bound), and the decisions its contexts must reach: contexts that never reach
/// an edge would agree without proving anything.
struct Round<'a> {
    config: &'a [(&'a str, &'a str)],
    edges: &'a [u64],
    decisions: &'a [&'a str],
}

/// Writes `questions` as a recording in `dir` and reads them back, as a replay does.
fn recorded(questions: Vec<Question>, dir: &Path, name: &str) -> (PathBuf, Vec<Question>) {
    let path = dir.join(name);
    let lines: String = questions
        .into_iter()
        .map(|question| {
            Recorded {
                question,
                decided: None,
            }
            .to_line()
                + "\n"
        })
        .collect();
    std::fs::write(&path, lines).unwrap();
    let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let replayed = recording::read(file)
        .map(|record| record.unwrap().1.question)
        .collect();
    (path, replayed)
}

#[test]
fn javascript_and_python_decide_as_rust_on_a_recording_of_thousands_of_contexts() {
    let every_decision = [
        "evict",
        "keep_suspect",
        "refresh_and_wait",
        "reject",
        "serve_cached",
        "serve_stale_and_refresh",
    ];
    let rounds = [
        Round {
            config: &[],
            edges: &[60_000, 90_000, 5_000, 10_000],
            decisions: &every_decision,
        },
        Round {
            config: &[("ttl-ms", "1000"), ("max-stale-ms", "500")],
            edges: &[1_000, 1_500, 5_000, 10_000],
            decisions: &every_decision,
        },
        Round {
            config: &[
                ("max-stale-ms", "18446744073709551615"),
                ("negative-ttl-ms", "0"),
                ("healthy-contact-ms", "18446744073709551614"),
                ("max-suspect-hold-ms", "0"),
            ],
            edges: &[60_000, u64::MAX - 1, 0],
            // A negative answer is never young enough to reject on.
            decisions: &[
                "evict",
                "keep_suspect",
                "refresh_and_wait",
                "serve_cached",
                "serve_stale_and_refresh",
            ],
        },
    ];
    // One engine per implementation, its policy swapped for each configuration: compiled once.
    let policies = strict_policies();
    let engines = engines();
    let dir = tempfile::tempdir().unwrap();
    for (number, round) in rounds.iter().enumerate() {
        let (config, expected) = (round.config, round.decisions);
        let generated = questions(3_000, round.edges, number as u64);
        let (recording, replayed) =
            recorded(generated.clone(), dir.path(), &format!("{number}.jsonl"));
        assert_eq!(replayed, generated, "a recording gives back its questions");
        let mut instances: Vec<_> = engines
            .iter()
            .zip(&policies)
            .map(|((source, engine), (_, wasm))| {
                engine.swap(spec(source, wasm, config)).unwrap();
                (source, engine.direct_instance().unwrap())
            })
            .collect();
        let mut seen = BTreeSet::new();
        for question in &replayed {
            let reference = instances[0].1.ask(question);
            if let Ok(answer) = &reference {
                seen.insert(answer.label());
            }
            for (source, instance) in &mut instances[1..] {
                assert_eq!(
                    instance.ask(question),
                    reference,
                    "{source} under {config:?} asked {question:?}"
                );
            }
        }
        assert_eq!(Vec::from_iter(seen), expected, "decisions under {config:?}");
        for lang in Lang::ALL {
            assert_replay_alike(strict_in(lang), &recording, config, replayed.len());
        }
    }
}

/// `regcache policy replay POLICY --contexts RECORDING --against <Rust strict>` under `config`
/// finds no difference, having compared all `questions`.
fn assert_replay_alike(policy: &Path, recording: &Path, config: &[(&str, &str)], questions: usize) {
    let rust = policy_path("strict");
    let mut args = vec!["policy".to_string(), "replay".into(), path_arg(policy)];
    args.extend(["--contexts".into(), path_arg(recording)]);
    args.extend(["--against".into(), path_arg(&rust)]);
    for (key, value) in config {
        args.extend(["--policy-config".into(), format!("{key}={value}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (replay, _) = run_regcache(&args, &[], Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert!(
        replay.status.success() && replay.stdout.is_empty(),
        "{} differs from the Rust strict under {config:?}: {}\n{stderr}",
        policy.display(),
        String::from_utf8_lossy(&replay.stdout)
    );
    let total = stderr.lines().rev().find(|line| line.starts_with("total"));
    let counts: Vec<&str> = total
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        counts,
        ["total", &questions.to_string(), "0"],
        "the replay's summary: {stderr}"
    );
}

fn path_arg(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}
