//! `regcache policy replay`: a recording's questions asked again of one policy, or of two side
//! by side.
//!
//! The recording is streamed, one line at a time (a line may not exceed
//! [`recording::MAX_LINE`]), and so is the output: one JSON line per question on stdout, in the
//! recording's order, the same for the same policy and recording (no timings, no digests). What
//! is for people (the one-line summary, the table of decision pairs) goes to stderr, so stdout
//! stays JSON lines for `jq`.
//! Exit codes are diff's: 0 (every question answered, and alike), 1 (a call failed, or the
//! policies differ), 2 (the replay could not run: the recording or a policy is refused).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use regcache::decision::{Answer, Asked, Question};
use regcache::policy::{CallFailure, DirectInstance, PolicyEngine};
use regcache::recording::{self, ReadError, answer_json, question_json};

use super::{PolicyArgs, load_each};

/// The exit code of a replay that could not run, as diff's "trouble".
const TROUBLE: u8 = 2;

pub fn run(
    file: &Path,
    contexts: &Path,
    against: Option<&Path>,
    settings: PolicyArgs,
) -> anyhow::Result<ExitCode> {
    Ok(
        replay(file, contexts, against, settings).unwrap_or_else(|err| {
            // A reader that went away (`| head`) needs no message.
            let closed = err
                .downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe);
            if !closed {
                eprintln!("regcache: {err:#}");
            }
            ExitCode::from(TROUBLE)
        }),
    )
}

fn replay(
    file: &Path,
    contexts: &Path,
    against: Option<&Path>,
    settings: PolicyArgs,
) -> anyhow::Result<ExitCode> {
    // Opened before the policies are loaded, which takes seconds: a mistyped path fails at once.
    let recording = File::open(contexts)
        .with_context(|| format!("{}: cannot open the recording", contexts.display()))?;
    let questions = questions(contexts, recording);
    let stdout = io::stdout().lock();
    match against {
        None => {
            let [engine] = load_each([file], settings)?;
            let policy = Replayer::new(file, engine)?;
            replay_one(policy, questions, stdout)
        }
        Some(other) => {
            let [engine, other_engine] = load_each([file, other], settings)?;
            let policy = Replayer::new(file, engine)?;
            let against = Replayer::new(other, other_engine)?;
            replay_against(policy, against, questions, stdout)
        }
    }
}

/// Prints every answer; exits 1 if a call failed.
fn replay_one(
    mut policy: Replayer,
    questions: impl Iterator<Item = anyhow::Result<(usize, Question)>>,
    stdout: impl Write,
) -> anyhow::Result<ExitCode> {
    let mut out = Output::new(stdout);
    let mut asked = 0;
    let mut failures = BTreeMap::<&str, usize>::new();
    for numbered in questions {
        let (line, question) = numbered?;
        let outcome = policy.ask(&question);
        asked += 1;
        if let Err(failure) = &outcome {
            *failures.entry(failure_kind(failure)).or_default() += 1;
        }
        out.print(&AnswerLine {
            line,
            service: question.service(),
            question: question_kind(&question),
            outcome: OutcomeJson::from(&outcome),
        })?;
    }
    out.finish()?;
    ensure_asked(asked)?;
    let failed: usize = failures.values().sum();
    let mut summary = format!("{asked} questions: {} answered", asked - failed);
    if failed > 0 {
        let kinds: Vec<_> = failures
            .iter()
            .map(|(kind, count)| format!("{kind}: {count}"))
            .collect();
        summary += &format!(", {failed} failed ({})", kinds.join(", "));
    }
    eprintln!("{summary}");
    Ok(exit_code(failed == 0))
}

/// Prints the questions the two policies answer differently, then the table of decision pairs.
fn replay_against(
    mut policy: Replayer,
    mut against: Replayer,
    questions: impl Iterator<Item = anyhow::Result<(usize, Question)>>,
    stdout: impl Write,
) -> anyhow::Result<ExitCode> {
    let mut out = Output::new(stdout);
    let mut pairs = BTreeMap::<(Label, Label), Tally>::new();
    for numbered in questions {
        let (line, question) = numbered?;
        let ours = policy.ask(&question);
        let theirs = against.ask(&question);
        // A failed call never matches, not even the same failure: it decided nothing.
        let alike = matches!((&ours, &theirs), (Ok(a), Ok(b)) if a == b);
        let tally = pairs
            .entry((Label::from(&ours), Label::from(&theirs)))
            .or_default();
        if alike {
            tally.alike += 1;
        } else {
            tally.differ += 1;
            out.print(&DifferenceLine {
                line,
                question: question_json(&question),
                policy: OutcomeJson::from(&ours),
                against: OutcomeJson::from(&theirs),
            })?;
        }
    }
    out.finish()?;
    let total = pairs.values().fold(Tally::default(), |sum, tally| Tally {
        alike: sum.alike + tally.alike,
        differ: sum.differ + tally.differ,
    });
    ensure_asked(total.alike + total.differ)?;
    eprint!("{}", table(&pairs, total));
    Ok(exit_code(total.differ == 0))
}

fn ensure_asked(asked: usize) -> anyhow::Result<()> {
    anyhow::ensure!(asked > 0, "the recording is empty: it holds no questions");
    Ok(())
}

fn exit_code(clean: bool) -> ExitCode {
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How many questions of one decision pair the two policies answered alike (the same answer,
/// parameters and reasons included) and how many differently.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    alike: usize,
    differ: usize,
}

/// The decision pairs, sorted by the first policy's decision then the second's, in aligned
/// columns, and a total.
fn table(pairs: &BTreeMap<(Label, Label), Tally>, total: Tally) -> String {
    let rows: Vec<[String; 4]> =
        std::iter::once(["policy", "against", "alike", "differ"].map(String::from))
            .chain(pairs.iter().map(|((ours, theirs), tally)| {
                [
                    ours.to_string(),
                    theirs.to_string(),
                    tally.alike.to_string(),
                    tally.differ.to_string(),
                ]
            }))
            .chain(std::iter::once([
                "total".to_string(),
                String::new(),
                total.alike.to_string(),
                total.differ.to_string(),
            ]))
            .collect();
    let widths: [usize; 4] =
        std::array::from_fn(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0));
    rows.iter()
        .map(|[ours, theirs, alike, differ]| {
            format!(
                "{ours:<w0$}  {theirs:<w1$}  {alike:>w2$}  {differ:>w3$}\n",
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
            )
        })
        .collect()
}

/// A policy being replayed: its engine, and the instance asked until a call fails (its memory
/// may then be corrupt, so the next question gets a fresh one, as a host's worker would).
struct Replayer {
    engine: PolicyEngine,
    instance: Option<DirectInstance>,
}

impl Replayer {
    /// `loaded` is `file`'s policy, or why it was refused.
    fn new(file: &Path, loaded: anyhow::Result<PolicyEngine>) -> anyhow::Result<Replayer> {
        let engine = loaded.with_context(|| format!("{}: refused", file.display()))?;
        Ok(Replayer {
            engine,
            instance: None,
        })
    }

    fn ask(&mut self, question: &Question) -> Result<Answer, CallFailure> {
        let instance = match &mut self.instance {
            Some(instance) => instance,
            empty => empty.insert(self.engine.direct_instance()?),
        };
        let outcome = instance.ask(question);
        if outcome.is_err() {
            self.instance = None;
        }
        outcome
    }
}

/// The questions of a recording and their line numbers, with errors that name the file.
fn questions(
    path: &Path,
    recording: File,
) -> impl Iterator<Item = anyhow::Result<(usize, Question)>> {
    recording::read(BufReader::new(recording)).map(move |record| {
        let (line, record) = record.map_err(|error| match error {
            ReadError::NotText { .. } | ReadError::TooLong { .. } => {
                anyhow::anyhow!("{}: {error}: not a recording", path.display())
            }
            error => anyhow::anyhow!("{}: {error}", path.display()),
        })?;
        Ok((line, record.question))
    })
}

/// JSON lines to stdout.
struct Output<W: Write>(BufWriter<W>);

impl<W: Write> Output<W> {
    fn new(stdout: W) -> Self {
        Output(BufWriter::new(stdout))
    }

    fn print(&mut self, line: &impl Serialize) -> anyhow::Result<()> {
        let mut text = serde_json::to_string(line).expect("a line is plain data");
        text.push('\n');
        self.0
            .write_all(text.as_bytes())
            .context("writing to stdout")
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.0.flush().context("writing to stdout")
    }
}

/// A question and one policy's outcome: `{"line":7,"service":"svc","question":"lookup",
/// "answer":{"decision":"serve_cached"}}`.
#[derive(Serialize)]
struct AnswerLine<'a> {
    line: usize,
    service: &'a str,
    question: &'static str,
    #[serde(flatten)]
    outcome: OutcomeJson,
}

/// A question two policies answered differently, with its whole context:
/// `{"line":7,"question":{"lookup":{...}},"policy":{"answer":{...}},"against":{"failure":"..."}}`.
#[derive(Serialize)]
struct DifferenceLine {
    line: usize,
    question: serde_json::Value,
    policy: OutcomeJson,
    against: OutcomeJson,
}

/// `{"answer": {...}}` or `{"failure": "trapped: ..."}`.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum OutcomeJson {
    Answer(serde_json::Value),
    Failure(String),
}

impl From<&Result<Answer, CallFailure>> for OutcomeJson {
    fn from(outcome: &Result<Answer, CallFailure>) -> Self {
        match outcome {
            Ok(answer) => OutcomeJson::Answer(answer_json(answer)),
            Err(failure) => OutcomeJson::Failure(failure.to_string()),
        }
    }
}

fn question_kind(question: &Question) -> &'static str {
    match question.asked() {
        Asked::Lookup(_) => "lookup",
        Asked::Eviction(_) => "eviction",
    }
}

fn failure_kind(failure: &CallFailure) -> &'static str {
    match failure {
        CallFailure::Deadline(_) => "deadline",
        CallFailure::Trap(_) => "trap",
        CallFailure::InvalidAnswer(_) => "invalid_answer",
        CallFailure::Instantiate(_) => "instantiate",
        CallFailure::Refused(_) => "refused",
    }
}

/// An outcome's name in the table of decision pairs; decisions sort before failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Label {
    Decided(&'static str),
    Failed(&'static str),
}

impl From<&Result<Answer, CallFailure>> for Label {
    fn from(outcome: &Result<Answer, CallFailure>) -> Self {
        match outcome {
            Ok(answer) => Label::Decided(answer.label()),
            Err(failure) => Label::Failed(failure_kind(failure)),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Decided(label) => f.write_str(label),
            Label::Failed(kind) => write!(f, "failed:{kind}"),
        }
    }
}
