//! `regcache run` (being built in the host issue).

use std::process::ExitCode;

/// Arguments of `regcache run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {}

pub fn run(_args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`regcache run` is not built yet")
}
