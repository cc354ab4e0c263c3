//! `regcache policy replay` (issue 13), with the real binary: a recording's questions asked
//! again of a policy, or of two side by side, checked against what the library's own instances
//! of the same policies answer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use regcache::decision::{
    Answer, EvictionContext, EvictionReason, HealthView, LookupContext, Question,
};
use regcache::policy::{EngineOptions, PolicyEngine};
use regcache::recording::{Recorded, answer_json, question_json};
use regcache::registry::ErrorKind;
use regcache_tests::binary::run_regcache;
use regcache_tests::policies::{policy_path, spec};

/// Far longer than a replay of a few hundred questions takes, even in a debug build on a loaded
/// machine: a hang fails the test instead of the run.
const WITHIN: Duration = Duration::from_secs(120);

fn regcache(args: &[&str]) -> Output {
    run_regcache(args, &[], WITHIN).0
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn policy(name: &str) -> String {
    policy_path(name).to_str().unwrap().to_string()
}

/// `regcache policy replay <policy> --contexts <recording> <extra...>`.
fn replay(policy_name: &str, recording: &Path, extra: &[&str]) -> Output {
    let file = policy(policy_name);
    let contexts = recording.to_str().unwrap();
    let mut args = vec!["policy", "replay", &file, "--contexts", contexts];
    args.extend_from_slice(extra);
    regcache(&args)
}

/// A few hundred questions that vary every field a decision reads: lookups cold, negative,
/// fresh, stale and very stale, with failing and healthy registries and suspect nodes, and
/// removals of every size and reason. Deterministic, so a failure can be replayed.
fn varied_questions() -> Vec<Question> {
    let mut seed: u64 = 0x5eed;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let services = ["greeter", "payments", "orders", "grüße"];
    let ages = [
        None,
        Some(1_000),
        Some(30_000),
        Some(61_000),
        Some(95_000),
        Some(400_000),
    ];
    let errors = [
        None,
        Some(ErrorKind::Timeout),
        Some(ErrorKind::Unavailable),
        Some(ErrorKind::NotFound),
    ];
    let reasons = [
        EvictionReason::WatchDelete,
        EvictionReason::LeaseExpired,
        EvictionReason::NodeTtl,
        EvictionReason::Refresh,
    ];
    (0..400)
        .map(|_| {
            let service = services[next(4) as usize];
            let now_ms = 1_700_000_000_000 + next(1_000_000);
            let health = HealthView {
                watch_connected: next(4) != 0,
                since_last_contact_ms: [Some(0), Some(5_000), Some(40_000), None][next(4) as usize],
                since_failure_ms: [None, Some(2_000), Some(120_000)][next(3) as usize],
            };
            if next(3) == 0 {
                let nodes_before = 1 + next(8) as u32;
                let nodes_after = next(u64::from(nodes_before)) as u32;
                Question::from(&EvictionContext {
                    service,
                    now_ms,
                    nodes_before,
                    nodes_after,
                    recent_deletions: nodes_before - nodes_after + next(3) as u32,
                    window_ms: 30_000,
                    health,
                    reason: reasons[next(4) as usize],
                })
            } else {
                let cached = next(4) != 0;
                let nodes = if cached { 1 + next(6) as u32 } else { 0 };
                let failures = next(4) as u32;
                Question::from(&LookupContext {
                    cached,
                    negative: !cached && next(3) == 0,
                    versions: u32::from(cached),
                    nodes,
                    suspect_nodes: next(u64::from(nodes) + 1) as u32,
                    since_refresh_ms: if cached { ages[next(6) as usize] } else { None },
                    since_attempt_ms: ages[next(6) as usize],
                    consecutive_failures: failures,
                    last_error: if failures > 0 {
                        errors[next(4) as usize]
                    } else {
                        None
                    },
                    refresh_in_flight: next(5) == 0,
                    ..LookupContext::cold(service, now_ms, health)
                })
            }
        })
        .collect()
}

/// A recording of `questions` in `dir`, with a blank line after every 50th (blank lines are
/// skipped, and the line numbers printed are the file's). Returns it and each question's line.
fn write_recording(dir: &Path, questions: &[Question]) -> (PathBuf, Vec<usize>) {
    let mut text = String::new();
    let mut lines = Vec::new();
    let mut line = 0;
    for (index, question) in questions.iter().enumerate() {
        let record = Recorded {
            question: question.clone(),
            decided: None,
        };
        text += &record.to_line();
        text += "\n";
        line += 1;
        lines.push(line);
        if index % 50 == 49 {
            text += "\n";
            line += 1;
        }
    }
    let path = dir.join("recording.jsonl");
    std::fs::write(&path, text).unwrap();
    (path, lines)
}

/// What the library's own instance of `name` answers to each question.
fn answers(name: &str, questions: &[Question]) -> Vec<Answer> {
    let engine = PolicyEngine::new(EngineOptions::default(), spec(name, &[])).unwrap();
    let mut instance = engine.direct_instance().unwrap();
    questions
        .iter()
        .map(|question| instance.ask(question).unwrap())
        .collect()
}

fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Questions answered alike, and differently.
type Counts = (usize, usize);

/// The table on stderr: each decision pair's counts, and the total's.
fn table(output: &Output) -> (BTreeMap<(String, String), Counts>, Counts) {
    let text = stderr(output);
    // After what the policies logged, if anything.
    let lines = text
        .lines()
        .skip_while(|line| {
            line.split_whitespace()
                .ne(["policy", "against", "alike", "differ"])
        })
        .skip(1);
    let mut pairs = BTreeMap::new();
    for line in lines {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["total", alike, differ] => {
                return (pairs, (alike.parse().unwrap(), differ.parse().unwrap()));
            }
            [ours, theirs, alike, differ] => {
                let counts = (alike.parse().unwrap(), differ.parse().unwrap());
                pairs.insert((ours.to_string(), theirs.to_string()), counts);
            }
            _ => panic!("not a row of the table: {line:?} in\n{text}"),
        }
    }
    panic!("no total in\n{text}")
}

#[test]
fn the_same_recording_through_the_same_policy_prints_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let questions = varied_questions();
    let (recording, lines) = write_recording(dir.path(), &questions);

    let first = replay("default", &recording, &[]);
    let second = replay("default", &recording, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert_eq!(first.stdout, second.stdout);

    let expected = answers("default", &questions);
    let printed = json_lines(&first);
    assert_eq!(printed.len(), questions.len());
    for (((json, question), answer), line) in
        printed.iter().zip(&questions).zip(&expected).zip(&lines)
    {
        assert_eq!(json["line"], *line);
        assert_eq!(json["service"], question.service());
        assert_eq!(json["answer"], answer_json(answer), "{json}");
    }
    let summary = format!("{n} questions: {n} answered\n", n = questions.len());
    assert_eq!(stderr(&first), summary);
}

#[test]
fn a_policy_against_itself_differs_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let questions = varied_questions();
    let (recording, _) = write_recording(dir.path(), &questions);

    let output = replay("default", &recording, &["--against", &policy("default")]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");
    let (pairs, total) = table(&output);
    assert_eq!(total, (questions.len(), 0));
    for ((ours, theirs), (_, differ)) in pairs {
        assert_eq!(ours, theirs);
        assert_eq!(differ, 0);
    }
}

#[test]
fn default_against_strict_prints_exactly_the_questions_they_answer_differently() {
    let dir = tempfile::tempdir().unwrap();
    let questions = varied_questions();
    let (recording, lines) = write_recording(dir.path(), &questions);
    let default = answers("default", &questions);
    let strict = answers("strict", &questions);

    let mut expected_lines = BTreeSet::new();
    let mut expected_pairs = BTreeMap::<(String, String), Counts>::new();
    for ((ours, theirs), line) in default.iter().zip(&strict).zip(&lines) {
        let counts = expected_pairs
            .entry((ours.label().to_string(), theirs.label().to_string()))
            .or_default();
        if ours == theirs {
            counts.0 += 1;
        } else {
            counts.1 += 1;
            expected_lines.insert(*line);
        }
    }
    assert!(
        expected_lines.len() > 20 && expected_lines.len() < questions.len() - 20,
        "the recording should show both agreement and disagreement: {} of {}",
        expected_lines.len(),
        questions.len()
    );

    let output = replay("default", &recording, &["--against", &policy("strict")]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let printed = json_lines(&output);
    let printed_lines: BTreeSet<usize> = printed
        .iter()
        .map(|json| json["line"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(printed_lines, expected_lines);
    assert_eq!(printed.len(), expected_lines.len(), "each difference once");
    for json in &printed {
        let index = lines
            .binary_search(&(json["line"].as_u64().unwrap() as usize))
            .unwrap();
        assert_eq!(json["question"], question_json(&questions[index]), "{json}");
        assert_eq!(
            json["policy"]["answer"],
            answer_json(&default[index]),
            "{json}"
        );
        assert_eq!(
            json["against"]["answer"],
            answer_json(&strict[index]),
            "{json}"
        );
    }

    let (pairs, total) = table(&output);
    assert_eq!(pairs, expected_pairs);
    assert_eq!(
        total,
        (questions.len() - expected_lines.len(), expected_lines.len())
    );
}

#[test]
fn a_policy_that_traps_on_one_service_fails_exactly_those_questions_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let questions = varied_questions();
    let (recording, lines) = write_recording(dir.path(), &questions);
    // chaos's faults strike only lookups of `only-service`, never a removal.
    let trapping: BTreeSet<usize> = questions
        .iter()
        .zip(&lines)
        .filter(|(question, _)| {
            question.service() == "payments"
                && matches!(question.asked(), regcache::decision::Asked::Lookup(_))
        })
        .map(|(_, line)| *line)
        .collect();
    assert!(!trapping.is_empty());

    let config = [
        "--policy-config",
        "fault=trap",
        "--policy-config",
        "only-service=payments",
    ];
    let output = replay("chaos", &recording, &config);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let printed = json_lines(&output);
    assert_eq!(printed.len(), questions.len());
    let mut failed = BTreeSet::new();
    for json in &printed {
        let line = json["line"].as_u64().unwrap() as usize;
        match (json.get("answer"), json.get("failure")) {
            (None, Some(failure)) => {
                let failure = failure.as_str().unwrap();
                assert!(failure.starts_with("trapped: "), "{json}");
                failed.insert(line);
            }
            // A trap costs its own question only: the next one gets a fresh instance.
            (Some(answer), None) => assert!(answer["decision"].is_string(), "{json}"),
            _ => panic!("an answer or a failure: {json}"),
        }
    }
    assert_eq!(failed, trapping);
    let summary = format!(
        "{} questions: {} answered, {} failed (trap: {})",
        questions.len(),
        questions.len() - trapping.len(),
        trapping.len(),
        trapping.len()
    );
    let log = stderr(&output);
    assert_eq!(log.lines().last(), Some(summary.as_str()), "{log}");

    // A failed call decided nothing, so it never matches, not even the same failure.
    let chaos = policy("chaos");
    let output = replay(
        "chaos",
        &recording,
        &[&["--against", &chaos][..], &config].concat(),
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let printed = json_lines(&output);
    let differing: BTreeSet<usize> = printed
        .iter()
        .map(|json| json["line"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(differing, trapping);
    for json in &printed {
        assert!(json["policy"]["failure"].is_string(), "{json}");
        assert!(json["against"]["failure"].is_string(), "{json}");
    }
    let (pairs, total) = table(&output);
    let failed_pair = ("failed:trap".to_string(), "failed:trap".to_string());
    assert_eq!(pairs[&failed_pair], (0, trapping.len()));
    assert_eq!(total, (questions.len() - trapping.len(), trapping.len()));
}

/// Runs a replay expected to fail before or while reading: exit 2, one line on stderr.
fn refused(policy_name: &str, recording: &Path) -> String {
    let output = replay(policy_name, recording, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let log = stderr(&output);
    assert_eq!(log.lines().count(), 1, "one line: {log}");
    assert!(log.starts_with("regcache: "), "{log}");
    log
}

#[test]
fn bad_recordings_and_policies_are_refused_in_one_line_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);

    let good = Recorded {
        question: varied_questions()[0].clone(),
        decided: None,
    }
    .to_line();
    std::fs::write(
        path("malformed.jsonl"),
        format!("{good}\n{good}\n{{\"lookup\":{{\"context\":{{\"nodes\":\"three\"}}}}}}\n{good}\n"),
    )
    .unwrap();
    let malformed = replay("default", &path("malformed.jsonl"), &[]);
    assert_eq!(malformed.status.code(), Some(2), "{}", stderr(&malformed));
    let log = stderr(&malformed);
    assert!(
        log.starts_with("regcache: ") && log.contains("malformed.jsonl: line 3: "),
        "{log}"
    );
    assert_eq!(log.lines().count(), 1, "{log}");
    // Streamed: the lines before the bad one were answered, none after it.
    assert_eq!(json_lines(&malformed).len(), 2);

    let log = refused("default", &path("missing.jsonl"));
    assert!(
        log.contains("missing.jsonl: cannot open the recording"),
        "{log}"
    );

    std::fs::write(
        path("binary.jsonl"),
        [0x7f, b'E', b'L', b'F', 0xff, 0xfe, 0, 1, b'\n'],
    )
    .unwrap();
    let log = refused("default", &path("binary.jsonl"));
    assert!(
        log.contains("binary.jsonl: line 1: not UTF-8 text: not a recording"),
        "{log}"
    );

    std::fs::write(path("endless.jsonl"), vec![b'x'; 3 << 20]).unwrap();
    let log = refused("default", &path("endless.jsonl"));
    assert!(log.contains("endless.jsonl: line 1: longer than"), "{log}");

    std::fs::write(path("empty.jsonl"), "").unwrap();
    let log = refused("default", &path("empty.jsonl"));
    assert!(log.contains("empty"), "{log}");
    std::fs::write(path("blank.jsonl"), "\n  \n").unwrap();
    let log = refused("default", &path("blank.jsonl"));
    assert!(log.contains("empty"), "{log}");

    std::fs::write(path("recording.jsonl"), format!("{good}\n")).unwrap();
    std::fs::write(path("garbage.wasm"), b"\0asm but not really").unwrap();
    let garbage = path("garbage.wasm");
    let output = regcache(&[
        "policy",
        "replay",
        &policy("default"),
        "--contexts",
        path("recording.jsonl").to_str().unwrap(),
        "--against",
        garbage.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(log.contains("garbage.wasm: refused: "), "{log}");
    assert_eq!(log.lines().count(), 1, "{log}");
}

#[test]
fn a_hosts_configuration_file_leaves_its_recording_file_alone() {
    // `check`, `eval` and `replay` read a host's file for its [policy] settings; its recording
    // file is the host's production data, which they must neither write nor rotate.
    let dir = tempfile::tempdir().unwrap();
    let recorded = dir.path().join("recorded.jsonl");
    std::fs::write(&recorded, "the host's\n").unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[policy.record]\nring = 100\nfile = {:?}\nfile_size = 65536\n",
            recorded.to_str().unwrap()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (recording, _) = write_recording(dir.path(), &varied_questions()[..50]);
    let default = policy("default");
    let contexts = recording.to_str().unwrap();
    let commands: [&[&str]; 3] = [
        &["policy", "check", &default, "--config", config],
        &[
            "policy",
            "eval",
            &default,
            "--config",
            config,
            "--context",
            r#"{"cached": true}"#,
        ],
        &[
            "policy",
            "replay",
            &default,
            "--contexts",
            contexts,
            "--config",
            config,
        ],
    ];
    for args in commands {
        let output = regcache(args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert_eq!(
            std::fs::read_to_string(&recorded).unwrap(),
            "the host's\n",
            "{args:?} wrote to the host's recording"
        );
        assert!(
            !dir.path().join("recorded.jsonl.1").exists(),
            "{args:?} rotated the host's recording"
        );
    }
}
