//! `regcache run`: the host. This module only turns flags and `REGCACHE_*` variables into a
//! configuration layer over the TOML file and hands it to the host process ([`super::process`]).
//! Its options are built from the table of settings ([`regcache::config::settings`]), so each
//! flag, variable and help line is the setting's own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};
use regcache::config::settings::{self, Kind, Setting};
use regcache::config::{ConfigError, ConfigLayer};

/// The argument holding the configuration file's path.
const CONFIG: &str = "config";

/// Arguments of `regcache run`: the configuration file, and the settings given as flags or
/// variables, which win over the file's.
#[derive(Debug)]
pub struct RunArgs {
    config: Option<PathBuf>,
    given: Vec<(&'static Setting, Vec<String>)>,
}

impl clap::Args for RunArgs {
    fn augment_args(command: Command) -> Command {
        let command = command
            .about("Run the host: serve lookups and registrations over HTTP, backed by etcd")
            .after_help(
                "Every option can also come from the TOML file given with --config (flags and \
                 environment win), under the name in brackets. With no etcd endpoint the host \
                 runs on an embedded in-memory registry. SIGHUP reloads the policy file; \
                 SIGTERM/SIGINT drain requests, write the snapshot, revoke the lease and exit.",
            )
            .arg(
                Arg::new(CONFIG)
                    .long(CONFIG)
                    .env("REGCACHE_CONFIG")
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("TOML configuration file; flags and REGCACHE_* variables override its fields"),
            );
        settings::ALL
            .iter()
            .fold(command, |command, setting| command.arg(argument(setting)))
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

/// The flag and variable of a setting.
fn argument(setting: &'static Setting) -> Arg {
    let arg = Arg::new(setting.key)
        .long(setting.flag().trim_start_matches('-').to_string())
        .env(setting.env())
        .value_name(setting.value_name)
        .help(setting.help_line());
    match setting.kind {
        Kind::List | Kind::Pairs => arg.action(ArgAction::Append).value_delimiter(','),
        Kind::Secret => arg.hide_env_values(true),
        _ => arg,
    }
}

impl FromArgMatches for RunArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        Ok(RunArgs {
            config: matches.remove_one(CONFIG),
            given: settings::ALL
                .iter()
                .filter_map(|setting| {
                    let values = matches.remove_many::<String>(setting.key)?;
                    Some((*setting, values.collect()))
                })
                .collect(),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl RunArgs {
    /// The flags and environment as a configuration layer.
    fn layer(self) -> Result<ConfigLayer, ConfigError> {
        let mut layer = ConfigLayer::default();
        for (setting, values) in self.given {
            layer.set_from_command_line(setting, values)?;
        }
        Ok(layer)
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => ConfigLayer::read_toml_file(path)?,
        None => ConfigLayer::default(),
    };
    let config = args.layer()?.over(file).validate()?;
    super::process::run(config)?;
    Ok(ExitCode::SUCCESS)
}
