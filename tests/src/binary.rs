//! The `regcache` binary, built once per test process, for tests that run it as users do.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::policies::repo_root;
use crate::wait::eventually_blocking;

/// Cargo, to build from a test, without the environment cargo gives the test process (see
/// [`without_cargos_environment`]).
pub fn cargo() -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    without_cargos_environment(&mut cargo);
    cargo
}

/// Removes from `command` the environment cargo gives a test process, for a command that builds
/// (cargo, or a script that runs it): build scripts that watch those variables (`ring`'s does)
/// would otherwise see them change between a build from a shell and one from a test, and
/// rebuild, with all that depends on them (three minutes on CI's 2 cores, inside a test's time).
pub fn without_cargos_environment(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let given_by_cargo = name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref());
        if given_by_cargo {
            command.env_remove(name.as_ref());
        }
    }
}

/// Path of the `regcache` binary of this workspace, built (incrementally) on first use.
pub fn regcache_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        let status = cargo()
            .args(["build", "-p", "regcache", "--bin", "regcache"])
            .current_dir(repo_root())
            .status()
            .expect("run cargo to build the regcache binary");
        assert!(status.success(), "building the regcache binary failed");
        target_dir.join("debug").join("regcache")
    })
}

/// Runs `regcache <args>` with `env` to its end: its output and how long it took. Both pipes
/// are read while it runs (one left unread would block a talkative process); one still running
/// after `timeout` is killed and fails the test, with what it wrote to stderr.
pub fn run_regcache(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> (Output, Duration) {
    // Built before the clock starts: a build is not the run's time.
    let bin = regcache_bin();
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run regcache");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let exited = eventually_blocking(timeout, || !matches!(child.try_wait(), Ok(None)));
    let took = started.elapsed();
    if !exited {
        let _ = child.kill();
    }
    let output = Output {
        status: child.wait().expect("reap regcache"),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert!(
        exited,
        "`regcache {}` still ran after {timeout:?}; stderr:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, took)
}
