//! `regcache policy replay`: a recording's questions asked again of one policy, or of two side
//! by side.

use std::path::Path;
use std::process::ExitCode;

use super::PolicyArgs;

pub fn run(
    file: &Path,
    contexts: &Path,
    against: Option<&Path>,
    settings: PolicyArgs,
) -> anyhow::Result<ExitCode> {
    let _ = (file, contexts, against, settings);
    anyhow::bail!("replay is not written yet")
}
