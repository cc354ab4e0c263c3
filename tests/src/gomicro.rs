//! `gomicro-sim` (tests/go/gomicro-sim): many go-micro v4 processes on the etcd v3 Go client,
//! built once per test process and run with a bounded time, their one-line summary parsed.
//!
//! The program is built offline in GOPATH mode from Debian's packages (`golang-go`,
//! `golang-etcd-server-dev`, `golang-google-grpc-dev`, installed by `scripts/setup`): no module
//! proxy, no network, the build cache in the target directory so a rebuild with nothing changed
//! takes a fraction of a second.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use regcache_tests::gomicro;
//! let summary = gomicro::run(
//!     &["-endpoints", "127.0.0.1:2379", "-n", "50", "-duration", "3s"],
//!     Duration::from_secs(30),
//! )?;
//! assert_eq!(summary.registered, 50);
//! # Ok(()) }
//! ```
//!
//! Architecture invariant: this module knows the program only through its flags and its
//! summary; it knows nothing about regcache or etcd.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::policies::repo_root;
use crate::wait::eventually_blocking;

/// Where Debian installs Go sources (`/usr/share/gocode/src/...`), the second GOPATH entry.
const GOCODE: &str = "/usr/share/gocode";

/// Sources the program imports, each with the package that installs it, so a missing one is
/// named before Go's own "cannot find package" does.
const SOURCES: [(&str, &str); 2] = [
    ("go.etcd.io/etcd/clientv3", "golang-etcd-server-dev"),
    ("google.golang.org/grpc", "golang-google-grpc-dev"),
];

/// Path of the `gomicro-sim` binary, built on first use (and only then) in this process.
/// An error names what is missing (Go, a package) or shows the compiler's output.
pub fn sim_bin() -> Result<&'static Path> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(|e| anyhow!("{e}"))
}

fn build() -> Result<PathBuf> {
    let version = Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            anyhow!("the Go toolchain (`go`) is missing ({e}): run scripts/setup (golang-go)")
        })?;
    if !version.status.success() {
        bail!(
            "`go version` failed: {}",
            String::from_utf8_lossy(&version.stderr)
        );
    }
    for (source, package) in SOURCES {
        let dir = Path::new(GOCODE).join("src").join(source);
        if !dir.is_dir() {
            bail!(
                "{} is missing: run scripts/setup ({package})",
                dir.display()
            );
        }
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let out_dir = target_dir.join("gomicro");
    std::fs::create_dir_all(&out_dir)?;
    let bin = out_dir.join("gomicro-sim");
    // Built under a name of this process, then renamed: two test processes building at once
    // never run a half-written binary.
    let partial = out_dir.join(format!("gomicro-sim.{}", std::process::id()));
    let gopath = std::env::join_paths([out_dir.join("gopath"), PathBuf::from(GOCODE)])?;
    let started = Instant::now();
    let output = Command::new("go")
        .args(["build", "-o"])
        .arg(&partial)
        .arg("./tests/go/gomicro-sim")
        .current_dir(repo_root())
        // GOPATH mode: Debian packages Go sources for it, not as modules.
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", out_dir.join("cache"))
        // Offline and independent of the user's Go settings: no proxy, no other toolchain,
        // no flags or go.env of theirs.
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GOENV", "off")
        .env("GOTOOLCHAIN", "local")
        .stdin(Stdio::null())
        .output()
        .context("running go build")?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "go build of tests/go/gomicro-sim failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::rename(&partial, &bin)?;
    eprintln!("gomicro-sim built in {:?}", started.elapsed());
    Ok(bin)
}

/// What a run saw, from the program's summary line (see its `Summary` for each field).
#[derive(Debug, Clone)]
pub struct Summary {
    /// Simulated processes.
    pub processes: u64,
    /// Processes whose client connected (and authenticated, with a user).
    pub connected: u64,
    /// Processes that registered at least once.
    pub registered: u64,
    /// Failed registration rounds of processes not registered yet.
    pub register_failed: u64,
    /// Grant and Put again after KeepAliveOnce found the lease gone.
    pub reregistered: u64,
    /// One-shot keep-alives answered.
    pub keepalives_ok: u64,
    /// One-shot keep-alives failed (other than lease not found).
    pub keepalives_failed: u64,
    /// GetService calls answered.
    pub gets: u64,
    /// GetService calls failed.
    pub gets_failed: u64,
    /// Nodes the last GetService of each process saw: the fewest (`None` if none answered).
    pub last_get_nodes_min: Option<u64>,
    /// Nodes the last GetService of each process saw: the most.
    pub last_get_nodes_max: u64,
    /// PUT events seen by all watches.
    pub watch_puts: u64,
    /// DELETE events (with their previous value) seen by all watches.
    pub watch_deletes: u64,
    /// PUT events of the watch that saw fewest.
    pub watch_puts_min: u64,
    /// DELETE events of the watch that saw fewest.
    pub watch_deletes_min: u64,
    /// DELETE events without a previous value (go-micro cannot decode them).
    pub watch_deletes_without_prev_kv: u64,
    /// Events whose value is not a go-micro service.
    pub watch_undecodable: u64,
    /// Watch responses carrying an error.
    pub watch_errors: u64,
    /// Processes that deleted their key at the end.
    pub deregistered: u64,
    /// Processes whose delete failed.
    pub deregister_failed: u64,
    /// Every lease granted to a process, sorted.
    pub lease_ids: Vec<i64>,
    /// The processes' keys.
    pub keys: Vec<String>,
    /// Error texts (prefixed by the call) and how often each came.
    pub errors: BTreeMap<String, u64>,
    /// When the last process connected, from the program's start.
    pub connect_ms_max: u64,
    /// When the last process registered, from the program's start.
    pub register_ms_max: u64,
    /// The run's length.
    pub elapsed_ms: u64,
    /// The line as printed, for failure messages.
    pub raw: Value,
}

impl Summary {
    /// Parses the program's summary line.
    pub fn parse(line: &str) -> Result<Summary> {
        let raw: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("gomicro-sim summary is not JSON: {line}"))?;
        let n = |key: &str| -> Result<u64> {
            raw[key]
                .as_u64()
                .with_context(|| format!("summary field {key} missing: {line}"))
        };
        let strings = |key: &str| -> Vec<String> {
            raw[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let errors = raw["errors"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(text, count)| (text.clone(), count.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let lease_ids = raw["lease_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        Ok(Summary {
            processes: n("processes")?,
            connected: n("connected")?,
            registered: n("registered")?,
            register_failed: n("register_failed")?,
            reregistered: n("reregistered")?,
            keepalives_ok: n("keepalives_ok")?,
            keepalives_failed: n("keepalives_failed")?,
            gets: n("gets")?,
            gets_failed: n("gets_failed")?,
            // -1: no process had an answer.
            last_get_nodes_min: raw["last_get_nodes_min"].as_u64(),
            last_get_nodes_max: n("last_get_nodes_max")?,
            watch_puts: n("watch_puts")?,
            watch_deletes: n("watch_deletes")?,
            watch_puts_min: n("watch_puts_min")?,
            watch_deletes_min: n("watch_deletes_min")?,
            watch_deletes_without_prev_kv: n("watch_deletes_without_prev_kv")?,
            watch_undecodable: n("watch_undecodable")?,
            watch_errors: n("watch_errors")?,
            deregistered: n("deregistered")?,
            deregister_failed: n("deregister_failed")?,
            lease_ids,
            keys: strings("keys"),
            errors,
            connect_ms_max: n("connect_ms_max")?,
            register_ms_max: n("register_ms_max")?,
            elapsed_ms: n("elapsed_ms")?,
            raw,
        })
    }

    /// The summary without the per-process lists, for logs and failure messages.
    pub fn brief(&self) -> String {
        let mut raw = self.raw.clone();
        if let Some(o) = raw.as_object_mut() {
            o.remove("keys");
            o.remove("lease_ids");
        }
        raw.to_string()
    }
}

/// A `gomicro-sim` running in the background. Dropping it kills the program.
pub struct Running {
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
    stderr: Arc<Mutex<String>>,
}

/// Starts `gomicro-sim <args>` (building it first if this process has not).
pub fn spawn(args: &[&str]) -> Result<Running> {
    let mut child = Command::new(sim_bin()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting gomicro-sim")?;
    // Both pipes are drained as the program writes, so that neither can fill and block it.
    let mut out = child.stdout.take().expect("piped");
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().expect("piped");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Ok(Running {
        child: Some(child),
        stdout: Some(stdout),
        stderr,
    })
}

/// Runs `gomicro-sim <args>` to its end, at most `timeout`, and returns its summary.
pub fn run(args: &[&str], timeout: Duration) -> Result<Summary> {
    spawn(args)?.wait(timeout)
}

impl Running {
    /// Waits for the program to end, at most `timeout` (then kills it), and parses its summary.
    pub fn wait(mut self, timeout: Duration) -> Result<Summary> {
        let mut child = self.child.take().expect("running");
        // An error ends the wait too: asked again below, it is returned.
        eventually_blocking(timeout, || !matches!(child.try_wait(), Ok(None)));
        let Some(status) = child.try_wait()? else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "gomicro-sim did not end within {timeout:?}; its stderr:\n{}",
                self.stderr()
            );
        };
        let stdout = self
            .stdout
            .take()
            .expect("read once")
            .join()
            .map_err(|_| anyhow!("the stdout reader panicked"))?;
        if !status.success() {
            bail!(
                "gomicro-sim exited with {status}: {stdout}\n{}",
                self.stderr()
            );
        }
        let line = stdout.lines().last().unwrap_or_default();
        Summary::parse(line).with_context(|| format!("stderr:\n{}", self.stderr()))
    }

    /// Kills the program (SIGKILL), as a process killed without deregistering, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the program wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}
