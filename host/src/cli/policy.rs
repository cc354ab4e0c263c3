//! `regcache policy ...`: the policy author's tools. `new` scaffolds a Rust policy crate bound to
//! the WIT, `build` compiles it to a component, `check` validates a component exactly as a hot
//! swap would, and `eval` shows the decision a policy makes for a context given as JSON.
//! `check` and `eval` take the host's policy settings (a host's `--config` file, the
//! `--policy-*` flags and variables), so that they judge a policy as the hosts would: under the
//! same bounds, through the same engine options.

mod json;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{ArgMatches, FromArgMatches};
use serde::Deserialize;

use regcache::decision::{Decide, EvictionContext, LookupContext};
use regcache::policy::{PolicyEngine, PolicySpec, WIT};

use super::args::{self, SettingArgs, policy_settings};

use json::{EvictionDecisionJson, EvictionJson, LookupDecisionJson, LookupJson};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Create a new Rust policy crate in DIR that builds as is.
    New {
        /// Directory to create (must not exist or be empty).
        dir: PathBuf,
    },
    /// Build the policy crate in DIR to a WebAssembly component; prints the .wasm path.
    Build {
        /// The policy crate.
        dir: PathBuf,
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
}

/// The policy's settings of `check` and `eval`: a host's configuration file (only its
/// `[policy]` table is read, its `file` ignored) and the `--policy-*` flags over it.
#[derive(Debug)]
pub struct PolicyArgs(SettingArgs);

impl clap::Args for PolicyArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        SettingArgs::augment(
            command,
            "A host's TOML configuration file: the policy is judged under its [policy] \
             settings (configuration, limits, budgets); flags and REGCACHE_* variables \
             override them",
            policy_settings(),
        )
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

impl FromArgMatches for PolicyArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        Ok(PolicyArgs(SettingArgs::from_matches(
            matches,
            policy_settings(),
        )))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::New { dir } => scaffold(&dir),
        PolicyCommand::Build { dir } => {
            println!("{}", build(&dir)?.display());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check { file, settings } => check(&file, settings),
        PolicyCommand::Eval {
            file,
            context,
            eviction,
            settings,
        } => eval(&file, &context, eviction, settings),
    }
}

const TEMPLATE_MANIFEST: &str = include_str!("../../templates/policy/Cargo.toml.tmpl");
const TEMPLATE_LIB: &str = include_str!("../../templates/policy/src/lib.rs");

fn scaffold(dir: &Path) -> anyhow::Result<ExitCode> {
    if dir.exists() && dir.read_dir()?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| {
            n.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
                .to_lowercase()
        })
        .filter(|n| n.starts_with(|c: char| c.is_ascii_alphabetic()))
        .unwrap_or_else(|| "my-policy".into());
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join("wit"))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        TEMPLATE_MANIFEST.replace("{{name}}", &name),
    )?;
    std::fs::write(dir.join("src/lib.rs"), TEMPLATE_LIB)?;
    std::fs::write(dir.join("wit/policy.wit"), WIT)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    println!("created policy crate `{name}` in {}", dir.display());
    println!("next: regcache policy build {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Builds with cargo for wasm32-wasip2 and returns the component's path, as cargo reports it.
fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.exists() {
        bail!(
            "{} has no Cargo.toml (create one with `regcache policy new`)",
            dir.display()
        );
    }
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo (is the Rust toolchain installed?)")?;
    if !output.status.success() {
        bail!(
            "cargo build failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`)"
        );
    }
    #[derive(Deserialize)]
    struct Artifact {
        reason: String,
        #[serde(default)]
        filenames: Vec<PathBuf>,
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Artifact>(line).ok())
        .filter(|a| a.reason == "compiler-artifact")
        .flat_map(|a| a.filenames)
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
        .context("cargo built no .wasm (is the crate a cdylib?)")
}

/// The policy in `file` loaded as a host with these settings would load it (a configuration
/// that is refused is an error, not a refusal of the policy).
fn load(file: &Path, PolicyArgs(args): PolicyArgs) -> anyhow::Result<anyhow::Result<PolicyEngine>> {
    let mut settings = args.layer()?.policy()?;
    settings.compiler = args::compiler()?;
    let options = settings.engine_options(None);
    Ok(
        PolicySpec::from_file(file, settings.config, settings.load.max_size)
            .and_then(|spec| PolicyEngine::new(options, spec))
            .map_err(anyhow::Error::from),
    )
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
        let decided = engine.guard_eviction(&EvictionContext::from(&json));
        serde_json::to_value(EvictionDecisionJson::from(decided.decision))?
    } else {
        let json: LookupJson = serde_json::from_str(context).context("invalid lookup context")?;
        let decided = engine.decide_lookup(&LookupContext::from(&json));
        serde_json::to_value(LookupDecisionJson::from(decided.decision))?
    };
    println!("{}", serde_json::to_string(&decision)?);
    Ok(ExitCode::SUCCESS)
}
