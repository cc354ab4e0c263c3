//! Shadow runs and recording, in process: a candidate asked the active policy's questions
//! reports exactly where it answers otherwise, while the active policy's decisions stay what
//! they were; the recording keeps the questions with their answers, and a swap can require a
//! replay of it. (`host_shadow.rs` shows the same through a running host.)

use std::collections::BTreeMap;
use std::time::Duration;

use regcache::decision::{
    Answer, Asked, Decide, EvictionContext, EvictionReason, HealthView, LookupContext, Question,
};
use regcache::policy::{
    EngineOptions, PolicyEngine, PolicyError, PolicySpec, RecordOptions, SwapOptions,
};
use regcache::recording::Recorded;
use regcache_tests::policies::spec;
use regcache_tests::wait::eventually_blocking;

const HEALTHY: HealthView = HealthView {
    watch_connected: true,
    since_last_contact_ms: Some(5),
    since_failure_ms: None,
};
const OUTAGE: HealthView = HealthView {
    watch_connected: false,
    since_last_contact_ms: Some(40_000),
    since_failure_ms: Some(1_000),
};
const NOW: u64 = 1_700_000_000_000;

/// Lookups and removals where `default` and `strict` sometimes agree and sometimes not: ages
/// around the TTL (60 s) and the stale bounds, healthy and failing registries, small and large
/// removals.
fn questions() -> Vec<Question> {
    let mut questions = Vec::new();
    for (i, age) in [0u64, 59_000, 61_000, 89_000, 91_000, 600_000, 4_000_000]
        .into_iter()
        .enumerate()
    {
        for health in [HEALTHY, OUTAGE] {
            let service = format!("svc-{i}");
            questions.push(Question::from(&LookupContext::cached(
                &service, NOW, health, age,
            )));
            questions.push(Question::from(&LookupContext {
                negative: true,
                cached: false,
                nodes: 0,
                versions: 0,
                ..LookupContext::cached(&service, NOW, health, age)
            }));
        }
    }
    questions.push(Question::from(&LookupContext::cold("cold", NOW, HEALTHY)));
    for (before, after) in [(5, 4), (5, 1), (2, 0)] {
        for health in [HEALTHY, OUTAGE] {
            questions.push(Question::from(&EvictionContext {
                service: "svc",
                now_ms: NOW,
                nodes_before: before,
                nodes_after: after,
                recent_deletions: before - after,
                window_ms: 30_000,
                health,
                reason: EvictionReason::WatchDelete,
            }));
        }
    }
    questions
}

fn engine(options: EngineOptions) -> PolicyEngine {
    PolicyEngine::new(options, PolicySpec::embedded_default(vec![])).unwrap()
}

/// What `engine`'s active policy answers, through the path lookups take.
fn decide(engine: &PolicyEngine, question: &Question) -> Answer {
    match question.asked() {
        Asked::Lookup(context) => Answer::Lookup(engine.decide_lookup(&context).decision),
        Asked::Eviction(context) => Answer::Eviction(engine.guard_eviction(&context).decision),
    }
}

/// What a policy answers, asked directly.
fn answers(policy: PolicySpec, questions: &[Question]) -> Vec<Answer> {
    let engine = PolicyEngine::new(EngineOptions::default(), policy).unwrap();
    let mut instance = engine.direct_instance().unwrap();
    questions.iter().map(|q| instance.ask(q).unwrap()).collect()
}

#[test]
fn a_shadow_reports_exactly_where_it_disagrees_and_changes_no_decision() {
    let questions = questions();
    let active = answers(PolicySpec::embedded_default(vec![]), &questions);
    let candidate = answers(spec("strict", &[]), &questions);
    let expected: Vec<usize> = (0..questions.len())
        .filter(|&i| active[i] != candidate[i])
        .collect();
    assert!(
        !expected.is_empty() && expected.len() < questions.len(),
        "the set must mix agreements and disagreements: {} of {}",
        expected.len(),
        questions.len()
    );
    assert!(expected.len() <= regcache::policy::RECENT_DISAGREEMENTS);

    let engine = engine(EngineOptions::default());
    engine.shadow(spec("strict", &[])).unwrap();
    for (question, answer) in questions.iter().zip(&active) {
        assert_eq!(&decide(&engine, question), answer, "{question:?}");
    }
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            engine.shadow_report().unwrap().asked == questions.len() as u64
        }),
        "the shadow was asked every question: {:?}",
        engine.shadow_report()
    );
    let report = engine.shadow_report().unwrap();
    assert_eq!(report.answered, questions.len() as u64);
    assert_eq!(report.disagreed, expected.len() as u64);
    assert_eq!(
        report.traps + report.deadline_hits + report.invalid_answers,
        0
    );
    let reported: Vec<(&Question, &Answer, &Answer)> = report
        .recent_disagreements
        .iter()
        .map(|d| (&d.question, &d.active, &d.candidate))
        .collect();
    let wanted: Vec<(&Question, &Answer, &Answer)> = expected
        .iter()
        .map(|&i| (&questions[i], &active[i], &candidate[i]))
        .collect();
    assert_eq!(reported, wanted);
    let mut pairs: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    for (a, c) in active.iter().zip(&candidate) {
        let pair = pairs.entry((a.label(), c.label())).or_default();
        if a == c {
            pair.0 += 1;
        } else {
            pair.1 += 1;
        }
    }
    let reported: BTreeMap<(&str, &str), (u64, u64)> = report
        .pairs
        .iter()
        .map(|p| ((p.active, p.candidate), (p.agree, p.disagree)))
        .collect();
    assert_eq!(reported, pairs);
    assert!(report.cost.mean > Duration::ZERO && report.cost.p99 >= report.cost.mean);
    assert_eq!(engine.stats().fail_safe_lookups, 0);
}

#[test]
fn a_failing_shadow_costs_the_active_policy_nothing() {
    let questions = questions();
    let active = answers(PolicySpec::embedded_default(vec![]), &questions);
    let engine = engine(EngineOptions::default());
    engine
        .shadow(spec(
            "chaos",
            &[("fault", "trap"), ("only-service", "svc-3")],
        ))
        .unwrap();
    for (question, answer) in questions.iter().zip(&active) {
        assert_eq!(&decide(&engine, question), answer);
    }
    let on_svc3 = questions.iter().filter(|q| q.service() == "svc-3").count() as u64;
    assert!(eventually_blocking(Duration::from_secs(10), || {
        engine.shadow_report().unwrap().asked == questions.len() as u64
    }));
    let report = engine.shadow_report().unwrap();
    assert_eq!(report.traps, on_svc3);
    assert_eq!(report.answered, questions.len() as u64 - on_svc3);
    assert!(report.last_failure.is_some());
    let stats = engine.stats();
    assert_eq!(
        (stats.traps, stats.fail_safe_lookups, stats.rollbacks),
        (0, 0, 0)
    );
}

#[test]
fn a_looping_shadow_is_stopped_at_the_serving_deadline_even_as_its_engine_goes() {
    let questions = questions();
    let engine = engine(EngineOptions::default());
    engine
        .shadow(spec(
            "chaos",
            &[("fault", "loop"), ("only-service", "svc-3")],
        ))
        .unwrap();
    for question in &questions {
        decide(&engine, question);
    }
    let on_svc3 = questions.iter().filter(|q| q.service() == "svc-3").count() as u64;
    assert!(
        eventually_blocking(Duration::from_secs(30), || {
            engine.shadow_report().unwrap().asked == questions.len() as u64
        }),
        "{:?}",
        engine.shadow_report()
    );
    let report = engine.shadow_report().unwrap();
    assert_eq!(report.deadline_hits, on_svc3, "{report:?}");
    assert_eq!(
        engine.stats().deadline_hits,
        0,
        "the active policy's are its own"
    );

    // Dropped while the shadow loops on queued questions: the drop waits for the observer,
    // which records what is queued, asks the shadow nothing more, and ends.
    for question in questions.iter().filter(|q| q.service() == "svc-3") {
        decide(&engine, question);
    }
    let (dropped, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(engine);
        let _ = dropped.send(());
    });
    assert!(
        done.recv_timeout(Duration::from_secs(30)).is_ok(),
        "dropping the engine hung on its observer"
    );
}

#[test]
fn a_shadow_failing_in_a_row_rests_and_the_recording_keeps_up() {
    let engine = recording_engine(1000);
    engine
        .shadow(spec(
            "chaos",
            &[("fault", "trap"), ("only-service", "svc-3")],
        ))
        .unwrap();
    let failing = questions()
        .into_iter()
        .find(|q| q.service() == "svc-3")
        .unwrap();
    for _ in 0..200 {
        decide(&engine, &failing);
    }
    assert!(eventually_blocking(Duration::from_secs(30), || {
        engine.recording().len() == 200
    }));
    // A round's questions are recorded before the shadow is asked them: the report follows.
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            let report = engine.shadow_report().unwrap();
            report.traps + report.deadline_hits + report.invalid_answers + report.skipped == 200
        }),
        "every question failed or was skipped: {:?}",
        engine.shadow_report()
    );
    let report = engine.shadow_report().unwrap();
    assert!(
        report.skipped > 0,
        "five failures in a row rest the shadow for a second: {report:?}"
    );
}

#[test]
fn promoting_activates_the_shadow_as_a_swap_and_dropping_unloads_it() {
    let engine = engine(EngineOptions::default());
    assert!(matches!(
        engine.promote_shadow(),
        Err(PolicyError::NoShadow)
    ));
    assert!(matches!(engine.drop_shadow(), Err(PolicyError::NoShadow)));
    let loaded = engine.shadow(spec("strict", &[])).unwrap();
    assert_eq!(engine.active().generation, 1, "a shadow is not active");
    let promoted = engine.promote_shadow().unwrap();
    assert_eq!((promoted.generation, &promoted.digest), (2, &loaded.digest));
    assert_eq!(engine.active().digest, loaded.digest);
    assert!(engine.shadow_report().is_none(), "promoted: no shadow left");
    assert_eq!(engine.stats().swaps_applied, 1);

    engine.shadow(spec("always-stale", &[])).unwrap();
    let dropped = engine.drop_shadow().unwrap();
    assert_ne!(dropped.digest, loaded.digest);
    assert!(engine.shadow_report().is_none());
    assert_eq!(
        engine.active().digest,
        loaded.digest,
        "dropping changes nothing"
    );
}

#[test]
fn a_refused_shadow_leaves_the_one_loaded() {
    let engine = engine(EngineOptions::default());
    let loaded = engine.shadow(spec("strict", &[])).unwrap();
    let refused = engine.shadow(PolicySpec {
        wasm: b"not wasm".to_vec().into(),
        source: "junk".into(),
        config: vec![],
    });
    assert!(matches!(refused, Err(PolicyError::NotWasm)), "{refused:?}");
    assert_eq!(engine.shadow_report().unwrap().digest, loaded.digest);
}

fn recording_engine(ring: usize) -> PolicyEngine {
    engine(EngineOptions {
        record: RecordOptions {
            ring,
            ..RecordOptions::default()
        },
        ..EngineOptions::default()
    })
}

#[test]
fn the_recording_keeps_the_most_recent_questions_with_their_answers() {
    let questions = questions();
    let engine = recording_engine(5);
    let decided: Vec<Answer> = questions.iter().map(|q| decide(&engine, q)).collect();
    assert!(eventually_blocking(Duration::from_secs(10), || {
        engine.recording().last().map(|r| &r.question) == questions.last()
    }));
    let expected: Vec<Recorded> = questions
        .iter()
        .zip(decided)
        .map(|(question, answer)| Recorded {
            question: question.clone(),
            decided: Some(answer),
        })
        .skip(questions.len() - 5)
        .collect();
    assert_eq!(engine.recording(), expected);
    assert!(recording_engine(0).recording().is_empty());
}

#[test]
fn a_fail_safe_answer_is_recorded_without_an_answer() {
    let engine = PolicyEngine::new(
        EngineOptions {
            record: RecordOptions {
                ring: 100,
                ..RecordOptions::default()
            },
            ..EngineOptions::default()
        },
        spec("chaos", &[("fault", "trap"), ("only-service", "svc-3")]),
    )
    .unwrap();
    let questions = questions();
    for question in &questions {
        decide(&engine, question);
    }
    assert!(eventually_blocking(Duration::from_secs(10), || {
        engine.recording().len() == questions.len()
    }));
    for recorded in engine.recording() {
        assert_eq!(
            recorded.decided.is_none(),
            recorded.question.service() == "svc-3",
            "{recorded:?}"
        );
    }
}

#[test]
fn a_swap_can_require_the_recent_recording_to_replay_without_failures() {
    let replay = SwapOptions {
        replay_recent: true,
    };
    let engine = recording_engine(1000);
    let refused = engine.swap_with(spec("strict", &[]), replay);
    assert!(
        matches!(refused, Err(PolicyError::NothingRecorded)),
        "{refused:?}"
    );

    let questions = questions();
    for question in &questions {
        decide(&engine, question);
    }
    assert!(eventually_blocking(Duration::from_secs(10), || {
        engine.recording().len() == questions.len()
    }));
    let bomb = spec("chaos", &[("fault", "trap"), ("only-service", "svc-3")]);
    let refused = engine.swap_with(bomb.clone(), replay).unwrap_err();
    let PolicyError::ReplayFailed {
        index,
        questions: n,
        ..
    } = &refused
    else {
        panic!("{refused:?}");
    };
    let first_svc3 = questions
        .iter()
        .position(|q| q.service() == "svc-3")
        .unwrap();
    assert_eq!((*index, *n), (first_svc3 + 1, questions.len()));
    assert!(refused.to_string().contains("svc-3"), "{refused}");
    assert_eq!(engine.active().generation, 1, "refused: nothing swapped");

    let swapped = engine.swap_with(spec("strict", &[]), replay).unwrap();
    assert_eq!(engine.active().digest, swapped.digest);
    // Without the precondition, the same time bomb is accepted: the replay is what refused it.
    engine.swap(bomb).unwrap();
}

#[test]
fn the_recording_file_rotates_and_every_line_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("questions.jsonl");
    let questions = questions();
    {
        let engine = engine(EngineOptions {
            record: RecordOptions {
                ring: 0,
                file: Some(path.clone()),
                file_size: 4096,
            },
            ..EngineOptions::default()
        });
        assert!(path.exists(), "the file is opened as the engine is built");
        for _ in 0..10 {
            for question in &questions {
                decide(&engine, question);
            }
        }
        // Dropping the engine ends the observer, which flushes the file.
    }
    let rotated = dir.path().join("questions.jsonl.1");
    // Absent for an instant while the observer rotates it.
    let read = |path: &std::path::Path| -> Option<Vec<Recorded>> {
        let text = std::fs::read_to_string(path).ok()?;
        assert!(text.len() <= 4096, "{} bytes", text.len());
        let records = regcache::recording::read(text.as_bytes())
            .map(|record| record.unwrap().1)
            .collect();
        Some(records)
    };
    assert!(
        eventually_blocking(Duration::from_secs(10), || {
            read(&path).and_then(|lines| lines.last().map(|r| r.question.clone()))
                == questions.last().cloned()
        }),
        "the last question reaches the file once the engine is dropped"
    );
    let older = read(&rotated).unwrap();
    assert!(!older.is_empty());
    for recorded in older.iter().chain(&read(&path).unwrap()) {
        assert!(questions.contains(&recorded.question));
        assert!(recorded.decided.is_some());
    }
}

/// A shadow that answers, slowly (~0.6 ms a call, within its deadline), is asked what the
/// observer has time for once each round is recorded: every question reaches the recording,
/// and the questions it had no time for are counted as skipped. (Asked before recording, it
/// held the observer ~0.6 ms a question and the buffers overflowed: questions dropped.)
#[test]
fn a_slow_shadow_is_asked_what_there_is_time_for_and_the_recording_keeps_every_question() {
    const PER_THREAD: usize = 10_000;
    let engine = recording_engine(2 * PER_THREAD);
    engine
        .shadow(spec(
            "chaos",
            &[
                ("fault", "slow"),
                ("only-service", "slow-svc"),
                ("spin-iterations", "1500000"),
            ],
        ))
        .unwrap();
    let question = Question::from(&LookupContext::cached("slow-svc", NOW, HEALTHY, 1_000));
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..PER_THREAD {
                    decide(&engine, &question);
                    // ~4k lookups a second a thread: the recording's pace, not the shadow's.
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        }
    });
    assert!(
        eventually_blocking(Duration::from_secs(30), || {
            engine.recording().len() == 2 * PER_THREAD
        }),
        "every question is recorded: {} of {}; {:?}",
        engine.recording().len(),
        2 * PER_THREAD,
        engine.shadow_report()
    );
    let report = engine.shadow_report().unwrap();
    assert!(
        report.answered > 0 && report.skipped > 0,
        "the shadow is asked what there is time for: {report:?}"
    );
    assert!(
        report.cost.mean > Duration::from_micros(200),
        "the shadow is slow: {report:?}"
    );
}

/// The recording file is opened as every file the configuration names: non-blocking and
/// checked to be a regular file. A FIFO (with or without a reader), a directory or a device
/// refuses the engine at once, naming the setting; a FIFO used to hang the start.
#[test]
fn a_recording_file_that_is_not_a_regular_file_refuses_the_engine_at_once() {
    use std::os::unix::fs::OpenOptionsExt;

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let refused = |path: &std::path::Path| {
        let options = EngineOptions {
            record: RecordOptions {
                ring: 0,
                file: Some(path.to_path_buf()),
                file_size: 1 << 20,
            },
            ..EngineOptions::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(PolicyEngine::new(options, PolicySpec::embedded_default(vec![])).err());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{}: the engine's creation hangs", path.display()))
            .unwrap_or_else(|| panic!("{}: accepted", path.display()))
    };
    let mut cases = vec![
        (fifo.clone(), "a FIFO"),
        (dir.path().to_path_buf(), "a directory"),
        ("/dev/full".into(), "a character device"),
    ];
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    for (path, kind) in cases.drain(..) {
        let error = refused(&path);
        assert!(
            matches!(&error, PolicyError::RecordFile { path: named, .. } if *named == path),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("policy.record.file") && message.contains(kind),
            "{message}"
        );
    }
    drop(reader);
    // Without a reader too (the open itself fails then).
    let error = refused(&fifo);
    assert!(
        error.to_string().contains("not a regular file (a FIFO)"),
        "{error}"
    );
}
