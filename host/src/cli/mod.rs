//! The command line: `regcache run` (the host) and `regcache policy ...` (tools for policy
//! authors, and a client of a running host's policy lifecycle). Each subcommand's module parses
//! its own arguments and calls the library.

mod args;
mod policy;
mod process;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// regcache: a service-registry cache in front of etcd, steered by a WebAssembly policy.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host: serve lookups and registrations over HTTP, backed by etcd.
    Run(Box<run::RunArgs>),
    /// Write, build, check and try out policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The host's policy compiler, run as a child of the host under the compile limits (it
    /// reads a component on stdin and writes the precompiled artifact on stdout).
    #[command(name = regcache::policy::CHILD_COMMAND, hide = true)]
    CompilePolicyChild {
        /// What the host passes; the library reads them.
        #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
}

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Policy(command) => {
            // A policy's output (stdout, stderr, its log import) goes to the log in `check` and
            // `eval` as in the host.
            process::init_logging(regcache::config::LogFormat::Text);
            policy::run(command)
        }
        Command::CompilePolicyChild { args } => Ok(regcache::policy::run_child(&args)),
    }
}
