//! The processes an etcd client can be pointed at instead of etcd itself, run as operators run
//! them: `etcd grpc-proxy start` (Debian's etcd-server) and `regcache run --etcd-api-listen`.
//! Each is a child process whose stderr is kept for failure messages, whose CPU time is read
//! from /proc, and which is stopped with SIGTERM (then SIGKILL) when dropped.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use regcache_tests::wait::{eventually, eventually_blocking};

use crate::host::binary;

/// How long a stopped process may take to exit before it is killed: the host drains, revokes
/// its lease in etcd and exits well within it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process, stopped when dropped.
struct Daemon {
    child: Option<Child>,
    name: &'static str,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Spawns `command` with stderr (and stdout) kept; its stderr lines are also sent to the
    /// receiver, so that a caller can read what the process logs as it starts.
    fn spawn(
        name: &'static str,
        mut command: Command,
    ) -> anyhow::Result<(Daemon, Receiver<String>)> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (lines, receiver) = channel();
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines.send(line.clone());
                let mut log = kept.lock().unwrap();
                // A bounded log: a long benchmark must not grow a daemon's log without end.
                if log.len() < 1 << 20 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let daemon = Daemon {
            child: Some(child),
            name,
            log,
        };
        Ok((daemon, receiver))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then SIGKILL if the process has not exited within [`STOP_TIMEOUT`].
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        eventually_blocking(STOP_TIMEOUT, || !matches!(child.try_wait(), Ok(None)));
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!("regcache-bench: {} ignored SIGTERM; killing it", self.name);
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`. Read
/// from /proc rather than from a process's own metrics so that a frozen or busy process can
/// be measured too.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name (which may hold spaces): state is the first,
    // utime and stime the 12th and 13th (fields 14 and 15 of proc(5)).
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), in which /proc counts CPU time.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            // Linux's USER_HZ everywhere we run.
            .unwrap_or(100)
    })
}

/// A free loopback port, for a process that cannot be told to pick its own.
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `etcd grpc-proxy start` in front of one etcd member, with its default caches: the anchor of
/// issue 11. With etcd's auth on it forwards each client's `Authenticate` and token.
pub struct GrpcProxy {
    daemon: Daemon,
    /// The endpoint clients connect to (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl GrpcProxy {
    /// Starts a proxy of `etcd_endpoint` and waits until it accepts connections.
    pub async fn start(etcd_endpoint: &str) -> anyhow::Result<GrpcProxy> {
        let dir = tempfile::Builder::new()
            .prefix("regcache-bench-proxy-")
            .tempdir()?;
        let listen = free_port()?;
        let mut command = Command::new("etcd");
        command
            .args(["grpc-proxy", "start"])
            .arg(format!(
                "--endpoints={}",
                etcd_endpoint.trim_start_matches("http://")
            ))
            .arg(format!("--listen-addr={listen}"))
            .arg(format!("--data-dir={}", dir.path().display()));
        let (daemon, _lines) = Daemon::spawn("etcd grpc-proxy", command)?;
        let proxy = GrpcProxy {
            daemon,
            endpoint: format!("http://{listen}"),
            _dir: dir,
        };
        let up = eventually(START_TIMEOUT, || {
            std::future::ready(TcpStream::connect(listen).is_ok())
        })
        .await;
        if !up {
            bail!(
                "etcd grpc-proxy did not listen on {listen}: {}",
                proxy.daemon.log()
            );
        }
        Ok(proxy)
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.daemon.pid())
    }
}

/// `regcache run` serving the etcd-compatible endpoint (`--etcd-api-listen`) over one etcd.
pub struct EndpointHost {
    daemon: Daemon,
    /// The etcd endpoint clients connect to (`http://127.0.0.1:PORT`).
    pub endpoint: String,
}

impl EndpointHost {
    /// Whether the `regcache` binary beside the benchmark has the endpoint (`run --help`
    /// lists `--etcd-api-listen`).
    pub fn available() -> bool {
        binary()
            .ok()
            .and_then(|bin| Command::new(bin).args(["run", "--help"]).output().ok())
            .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("--etcd-api-listen"))
    }

    /// Starts a host on `etcd_endpoint` as `user` (etcd's auth on), with `extra` arguments, and
    /// waits until both its listeners are up (it logs the etcd endpoint's address first).
    pub async fn start(
        etcd_endpoint: &str,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> anyhow::Result<EndpointHost> {
        let mut command = Command::new(binary()?);
        command
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(["--etcd-api-listen", "127.0.0.1:0"])
            .args(["--etcd-endpoints", etcd_endpoint])
            .args(["--etcd-user", user])
            .args(extra)
            .env("REGCACHE_ETCD_PASSWORD", password);
        let (daemon, lines) = Daemon::spawn("regcache run", command)?;
        let mut etcd_api = None;
        // The log is read on a plain thread: the host compiles its policy before it listens,
        // which takes longer than a runtime worker should be blocked.
        let listening = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + START_TIMEOUT;
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                let Ok(line) = lines.recv_timeout(left) else {
                    break;
                };
                if let Some(addr) = logged_address(&line, "etcd API listening on ") {
                    etcd_api = Some(addr);
                }
                if line.contains("listening on http://") {
                    return etcd_api;
                }
            }
            None
        })
        .await?;
        let Some(addr) = listening else {
            bail!(
                "regcache did not log both its listeners within {START_TIMEOUT:?}: {}",
                daemon.log()
            );
        };
        Ok(EndpointHost {
            daemon,
            endpoint: format!("http://{addr}"),
        })
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.daemon.pid())
    }
}

/// The address logged after `marker` on `line`, if any.
fn logged_address(line: &str, marker: &str) -> Option<String> {
    let rest = line.split(marker).nth(1)?;
    let addr = rest.split(|c: char| c.is_whitespace() || c == '"').next()?;
    Some(addr.to_string())
}
