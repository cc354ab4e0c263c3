//! The settings on the command line: a TOML configuration file (`--config`) and the table of
//! settings ([`regcache::config::settings`]) as flags and `REGCACHE_*` variables over it, each
//! flag, variable and help line the setting's own. `run` takes every setting; `policy check`
//! and `policy eval` take the policy's, so that a policy is checked against the bounds the
//! hosts run it under, given the same way.

use std::ffi::OsString;
use std::marker::PhantomData;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};
use regcache::config::settings::{self, Kind, Setting};
use regcache::config::{ConfigError, ConfigLayer};
use regcache::policy::Compiler;

/// The argument holding the configuration file's path.
const CONFIG: &str = "config";

/// The configuration file and the settings given as flags or variables, which win over the
/// file's.
#[derive(Debug)]
pub struct SettingArgs {
    config: Option<PathBuf>,
    /// Taken as given, not as UTF-8 text: a value that is not is refused naming its setting,
    /// where clap would only say that some argument is not.
    given: Vec<(&'static Setting, Vec<OsString>)>,
}

/// Which settings a subcommand takes, and what its `--config` file is to it: from this,
/// [`Selected`] makes the subcommand's arguments.
pub trait Selection {
    /// The help of `--config`.
    const CONFIG_HELP: &'static str;

    /// The settings given as flags and variables.
    fn settings() -> impl Iterator<Item = &'static Setting>;
}

/// The `--config` file and the flags of selection `S`: a subcommand's `#[command(flatten)]`
/// field.
#[derive(Debug)]
pub struct Selected<S> {
    args: SettingArgs,
    selection: PhantomData<S>,
}

impl<S: Selection> Selected<S> {
    /// The flags and variables as a layer over the configuration file's (read here), with the
    /// selected settings only.
    pub fn layer(self) -> Result<ConfigLayer, ConfigError> {
        Ok(self.args.layer()?.only(S::settings()))
    }
}

impl<S: Selection> clap::Args for Selected<S> {
    fn augment_args(command: Command) -> Command {
        SettingArgs::augment(command, S::CONFIG_HELP, S::settings())
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl<S: Selection> clap::FromArgMatches for Selected<S> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        Ok(Selected {
            args: SettingArgs::from_matches(matches, S::settings()),
            selection: PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// The settings of the policy that `policy check`, `eval` and `replay` take: all of `[policy]`
/// but the file, which they are given as their argument, and what only a host does with the
/// questions it answers (recording, shadowing).
pub fn policy_settings() -> impl Iterator<Item = &'static Setting> {
    let hosts_only = [
        &settings::POLICY_FILE,
        &settings::POLICY_RECORD_RING,
        &settings::POLICY_RECORD_FILE,
        &settings::POLICY_RECORD_FILE_SIZE,
        &settings::POLICY_SHADOW_ONE_IN,
    ];
    settings::ALL.iter().copied().filter(move |setting| {
        setting.section() == Some("policy") && !hosts_only.iter().any(|s| s.key == setting.key)
    })
}

impl SettingArgs {
    /// `command` with `--config` (described by `config_help`) and a flag for each of
    /// `settings`.
    pub fn augment(
        command: Command,
        config_help: &'static str,
        settings: impl Iterator<Item = &'static Setting>,
    ) -> Command {
        let command = command.arg(
            Arg::new(CONFIG)
                .long(CONFIG)
                .env("REGCACHE_CONFIG")
                .value_name("FILE")
                // Not clap's path parser: it refuses an empty path without naming the variable.
                .value_parser(clap::builder::OsStringValueParser::new())
                .help(config_help),
        );
        settings.fold(command, |command, setting| command.arg(argument(setting)))
    }

    /// The values `matches` holds for `--config` and `settings`.
    pub fn from_matches(
        matches: &mut ArgMatches,
        settings: impl Iterator<Item = &'static Setting>,
    ) -> Self {
        SettingArgs {
            config: matches.remove_one::<OsString>(CONFIG).map(PathBuf::from),
            given: settings
                .filter_map(|setting| {
                    let values = matches.remove_many::<OsString>(setting.key)?;
                    Some((setting, values.collect()))
                })
                .collect(),
        }
    }

    /// The flags and variables as a layer over the configuration file's (read here).
    pub fn layer(self) -> Result<ConfigLayer, ConfigError> {
        let file = match &self.config {
            Some(path) if path.as_os_str().is_empty() => {
                return Err(ConfigError::new(
                    CONFIG,
                    "the configuration file's path (--config / REGCACHE_CONFIG) is empty",
                ));
            }
            Some(path) => ConfigLayer::read_toml_file(path)?,
            None => ConfigLayer::default(),
        };
        Ok(self.command_line()?.over(file))
    }

    /// The flags and variables alone.
    fn command_line(self) -> Result<ConfigLayer, ConfigError> {
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

/// How the binary compiles candidate policies: in a child of itself, under the configured
/// bounds, so that a crafted component costs the child, never the host or the tool.
pub fn compiler() -> anyhow::Result<Compiler> {
    Compiler::this_executable()
        .map_err(|e| anyhow::anyhow!("cannot find the regcache executable to compile in: {e}"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    /// The configuration layer of these arguments, for `settings`.
    fn layer(args: Vec<OsString>) -> Result<ConfigLayer, String> {
        let command = SettingArgs::augment(
            Command::new("test").no_binary_name(true),
            "the file",
            settings::ALL.iter().copied(),
        );
        let mut matches = command
            .try_get_matches_from(args)
            .map_err(|e| format!("clap: {e}"))?;
        SettingArgs::from_matches(&mut matches, settings::ALL.iter().copied())
            .layer()
            .map_err(|e| e.to_string())
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
            let err = layer(args.into_iter().map(OsString::from).collect()).unwrap_err();
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

    #[test]
    fn the_policy_tools_take_every_policy_setting_but_the_file() {
        let keys: Vec<&str> = policy_settings().map(|setting| setting.key).collect();
        assert!(keys.contains(&"policy.config"), "{keys:?}");
        assert!(keys.contains(&"policy.limits.max_wait"), "{keys:?}");
        assert!(keys.contains(&"policy.latency_budget"), "{keys:?}");
        assert!(!keys.contains(&"policy.file"), "{keys:?}");
        assert!(!keys.iter().any(|key| key.starts_with("etcd")), "{keys:?}");
    }
}
