//! `regcache policy ...`: the policy author's and operator's tools. `new` scaffolds a policy
//! project bound to the WIT and `build` compiles it to a component (`author`), `check`
//! validates a component exactly as a hot swap would, `eval` shows the decision a policy makes
//! for a context given as JSON, and `replay` asks it a recording's questions (`replay`).
//! `check`, `eval` and `replay` take the host's policy settings (a host's `--config` file, the
//! `--policy-*` flags and variables), so that they judge a policy as the hosts would: under the
//! same bounds, through the same engine options. `push`, `status`, `shadow` and `recording`
//! drive a running host's policy lifecycle over its HTTP API (`client`), found through the
//! host's own `listen` and admin token settings.

mod author;
mod client;
mod replay;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use regcache::config::settings::Setting;
use regcache::decision::{Answer, Decide, EvictionContext, LookupContext};
use regcache::policy::{PolicyEngine, PolicySpec};
use regcache::recording::{EvictionJson, LookupJson, answer_json};

use super::args::{self, Selected, Selection, policy_settings};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Create a new policy project in DIR that builds as is.
    New {
        /// Directory to create (must not exist or be empty).
        dir: PathBuf,
        /// The language to write the policy in.
        #[arg(long, value_enum, default_value_t = author::Lang::Rust)]
        lang: author::Lang,
    },
    /// Build the policy project in DIR (Rust, JavaScript or Python, told by its files) to a
    /// WebAssembly component; prints the .wasm path. A JavaScript or Python project's toolchain
    /// is installed into it (node_modules/, .venv/) by the first build and when its pins change.
    Build {
        /// The policy project.
        dir: PathBuf,
        /// The WIT directory a JavaScript or Python project is built against (default: its wit/).
        #[arg(long, value_name = "DIR")]
        wit: Option<PathBuf>,
    },
    /// Validate a policy exactly as a hot swap would; exits non-zero with the reason.
    Check {
        /// The policy component (.wasm).
        file: PathBuf,
        #[command(flatten)]
        settings: PolicyArgs,
    },
    /// Print the decision a policy makes for one context given as JSON.
    ///
    /// Lookup fields (all optional): service, now_ms, cached, negative, versions, nodes,
    /// suspect_nodes, since_refresh_ms, since_attempt_ms, consecutive_failures, last_error
    /// (timeout|unavailable|unauthenticated|not_found|invalid_input), refresh_in_flight,
    /// watch_connected, since_last_contact_ms, since_failure_ms. With --eviction: service,
    /// now_ms, nodes_before, nodes_after, recent_deletions, window_ms, watch_connected,
    /// since_last_contact_ms, since_failure_ms, reason (watch_delete|lease_expired|node_ttl|refresh).
    Eval {
        /// The policy component (.wasm).
        file: PathBuf,
        /// The context, as JSON.
        #[arg(long)]
        context: String,
        /// Ask the eviction guard instead of the lookup decision.
        #[arg(long)]
        eviction: bool,
        #[command(flatten)]
        settings: PolicyArgs,
    },
    /// Ask a policy every question of a recording (JSON lines, as the host records them) and
    /// print its answers; with --against, print only where a second policy answers otherwise,
    /// then a summary of the decision pairs.
    ///
    /// Stdout holds only JSON lines, one per question in the recording's order, identical for
    /// the same policies and recording: {"line":N,"service":..,"question":"lookup"|"eviction",
    /// "answer":{..}} or, for a call that failed (the next question gets a fresh instance),
    /// "failure":"trapped: ..." in place of "answer". With --against, one line per question
    /// answered differently: {"line":N,"question":{full context},"policy":{"answer"|"failure"},
    /// "against":{"answer"|"failure"}}; a failed call never counts as alike. The summary goes
    /// to stderr: a line of counts, or with --against a table of every decision pair (alike
    /// and differing questions).
    ///
    /// Exit status: 0 when every call answered (and, with --against, alike); 1 when a call
    /// failed (or the policies differ); 2 when the replay could not run (the recording is
    /// missing, empty or malformed, a policy is refused).
    Replay {
        /// The policy component (.wasm).
        file: PathBuf,
        /// The recording: JSON lines of questions, as the host records them.
        #[arg(long)]
        contexts: PathBuf,
        /// A second policy component to compare with (under the same settings).
        #[arg(long)]
        against: Option<PathBuf>,
        #[command(flatten)]
        settings: PolicyArgs,
    },
    #[command(flatten)]
    Host(client::HostCommand),
}

/// The policy's settings of `check`, `eval` and `replay`: a host's configuration file (only
/// its `[policy]` table is read, its `file` ignored) and the `--policy-*` flags over it.
pub type PolicyArgs = Selected<PolicyTools>;

/// The selection of [`PolicyArgs`].
#[derive(Debug)]
pub struct PolicyTools;

impl Selection for PolicyTools {
    const CONFIG_HELP: &'static str = "A host's TOML configuration file: the policy is judged \
         under its [policy] settings (configuration, limits, budgets); flags and REGCACHE_* \
         variables override them";

    fn settings() -> impl Iterator<Item = &'static Setting> {
        policy_settings()
    }
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::New { dir, lang } => author::scaffold(&dir, lang),
        PolicyCommand::Build { dir, wit } => {
            println!("{}", author::build(&dir, wit.as_deref())?.display());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check { file, settings } => check(&file, settings),
        PolicyCommand::Eval {
            file,
            context,
            eviction,
            settings,
        } => eval(&file, &context, eviction, settings),
        PolicyCommand::Replay {
            file,
            contexts,
            against,
            settings,
        } => replay::run(&file, &contexts, against.as_deref(), settings),
        PolicyCommand::Host(command) => client::run(command),
    }
}

/// The policy in `file` loaded as a host with these settings would load it (a configuration
/// that is refused is an error, not a refusal of the policy).
pub(super) fn load(
    file: &Path,
    settings: PolicyArgs,
) -> anyhow::Result<anyhow::Result<PolicyEngine>> {
    let [engine] = load_each([file], settings)?;
    Ok(engine)
}

/// [`load`] of several files under the same settings, each refused or not on its own.
pub(super) fn load_each<const N: usize>(
    files: [&Path; N],
    args: PolicyArgs,
) -> anyhow::Result<[anyhow::Result<PolicyEngine>; N]> {
    let mut settings = args.layer()?.policy()?;
    settings.compiler = args::compiler()?;
    let options = settings.engine_options(None);
    Ok(files.map(|file| {
        PolicySpec::from_file(file, settings.config.clone(), settings.load.max_size)
            .and_then(|spec| PolicyEngine::new(options.clone(), spec))
            .map_err(anyhow::Error::from)
    }))
}

fn check(file: &Path, settings: PolicyArgs) -> anyhow::Result<ExitCode> {
    let engine = match load(file, settings)? {
        Ok(engine) => engine,
        Err(err) => {
            eprintln!("{}: refused: {err:#}", file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let info = engine.active();
    println!("{}: ok", file.display());
    println!("digest: sha256:{}", info.digest);
    println!("settings: {:?}", info.settings);
    Ok(ExitCode::SUCCESS)
}

fn eval(
    file: &Path,
    context: &str,
    eviction: bool,
    settings: PolicyArgs,
) -> anyhow::Result<ExitCode> {
    let engine = load(file, settings)??;
    let decision = if eviction {
        let json: EvictionJson =
            serde_json::from_str(context).context("invalid eviction context")?;
        Answer::Eviction(
            engine
                .guard_eviction(&EvictionContext::from(&json))
                .decision,
        )
    } else {
        let json: LookupJson = serde_json::from_str(context).context("invalid lookup context")?;
        Answer::Lookup(engine.decide_lookup(&LookupContext::from(&json)).decision)
    };
    println!("{}", answer_json(&decision));
    Ok(ExitCode::SUCCESS)
}
