//! The `regcache` binary: parse the command line, hand over to the library, report the error.
//! Everything of substance lives in the `regcache` library; see ARCHITECTURE.md.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match cli::dispatch(cli::Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("regcache: {err:#}");
            ExitCode::FAILURE
        }
    }
}
