//! `regcache run`: the host. This module only turns `--config`, flags and `REGCACHE_*`
//! variables into the host's configuration ([`super::args`]) and hands it to the host process
//! ([`super::process`]).

use std::process::ExitCode;

use clap::{ArgMatches, Command, FromArgMatches};
use regcache::config::settings;

use super::args::{self, SettingArgs};

/// Arguments of `regcache run`: the configuration file, and every setting given as a flag or a
/// variable, which wins over the file's.
#[derive(Debug)]
pub struct RunArgs(SettingArgs);

impl clap::Args for RunArgs {
    fn augment_args(command: Command) -> Command {
        let command = command
            .about("Run the host: serve lookups and registrations over HTTP, backed by etcd")
            .after_help(
                "Every option can also come from the TOML file given with --config (flags and \
                 environment win), under the name in brackets. With no etcd endpoint the host \
                 runs on an embedded in-memory registry. SIGHUP reloads the policy file; \
                 SIGTERM/SIGINT drain requests, write the snapshot, revoke the lease and exit.",
            );
        SettingArgs::augment(
            command,
            "TOML configuration file; flags and REGCACHE_* variables override its fields",
            settings::ALL.iter().copied(),
        )
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl FromArgMatches for RunArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        Ok(RunArgs(SettingArgs::from_matches(
            matches,
            settings::ALL.iter().copied(),
        )))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

pub fn run(RunArgs(args): RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.layer()?.validate()?;
    config.policy.compiler = args::compiler()?;
    super::process::run(config)?;
    Ok(ExitCode::SUCCESS)
}
