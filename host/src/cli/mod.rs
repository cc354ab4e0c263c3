//! The command line: `regcache run` (the host) and `regcache policy ...` (tools for policy
//! authors). Each subcommand's module parses its own arguments and calls the library.

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
}

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Policy(command) => policy::run(command),
    }
}
