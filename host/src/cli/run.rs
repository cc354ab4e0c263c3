//! `regcache run`: the host. This module only turns flags and `REGCACHE_*` variables into a
//! configuration layer over the TOML file and hands it to the host process ([`super::process`]).
//! Its options are built from the table of settings ([`regcache::config::settings`]), so each
//! flag, variable and help line is the setting's own.

use std::ffi::OsString;
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
    /// Taken as given, not as UTF-8 text: a value that is not is refused naming its setting,
    /// where clap would only say that some argument is not.
    given: Vec<(&'static Setting, Vec<OsString>)>,
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
                    // Not clap's path parser: it refuses an empty path without naming the variable.
                    .value_parser(clap::builder::OsStringValueParser::new())
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
        .value_parser(clap::builder::OsStringValueParser::new())
        .help(setting.help_line());
    match setting.kind {
        Kind::List | Kind::Pairs => arg.action(ArgAction::Append).value_delimiter(','),
        // `-1` is the count's value (refused by the setting), not an unknown flag.
        Kind::Count(_) => arg.allow_negative_numbers(true),
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
            config: matches.remove_one::<OsString>(CONFIG).map(PathBuf::from),
            given: settings::ALL
                .iter()
                .filter_map(|setting| {
                    let values = matches.remove_many::<OsString>(setting.key)?;
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
            let values = values
                .into_iter()
                .map(|value| {
                    value
                        .into_string()
                        .map_err(|_| ConfigError::new(setting.key, "is not UTF-8 text"))
                })
                .collect::<Result<_, _>>()?;
            layer.set_from_command_line(setting, values)?;
        }
        Ok(layer)
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) if path.as_os_str().is_empty() => {
            return Err(ConfigError::new(
                CONFIG,
                "the configuration file's path (--config / REGCACHE_CONFIG) is empty",
            )
            .into());
        }
        Some(path) => ConfigLayer::read_toml_file(path)?,
        None => ConfigLayer::default(),
    };
    let config = args.layer()?.over(file).validate()?;
    super::process::run(config)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use clap::{Args, Command, FromArgMatches};

    use super::*;

    /// The configuration layer of these command-line arguments (after `run`).
    fn layer(args: Vec<OsString>) -> Result<ConfigLayer, String> {
        let command = RunArgs::augment_args(Command::new("run").no_binary_name(true));
        let mut matches = command
            .try_get_matches_from(args)
            .map_err(|e| format!("clap: {e}"))?;
        let args = RunArgs::from_arg_matches_mut(&mut matches).map_err(|e| e.to_string())?;
        args.layer().map_err(|e| e.to_string())
    }

    #[test]
    fn a_value_that_is_not_utf8_names_its_setting() {
        let err = layer(vec![
            "--etcd-prefix".into(),
            OsString::from_vec(b"/\xff/".to_vec()),
        ])
        .unwrap_err();
        assert!(
            err.contains("`etcd.prefix` (--etcd-prefix / REGCACHE_ETCD_PREFIX)")
                && err.contains("not UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_configuration_path_names_its_flag_and_variable() {
        for args in [vec!["--config", ""], vec!["--config="]] {
            let command = RunArgs::augment_args(Command::new("run").no_binary_name(true));
            let mut matches = command.try_get_matches_from(args).unwrap();
            let args = RunArgs::from_arg_matches_mut(&mut matches).unwrap();
            let err = run(args).unwrap_err().to_string();
            assert!(
                err.contains("(--config / REGCACHE_CONFIG)") && err.contains("empty"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_negative_count_is_refused_by_its_setting() {
        let err = layer(vec!["--http-max-connections".into(), "-1".into()]).unwrap_err();
        assert!(
            err.contains("`http.max_connections` (--http-max-connections")
                && err.contains("`-1` is not a whole number"),
            "{err}"
        );
    }
}
