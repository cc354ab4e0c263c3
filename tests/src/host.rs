//! The `regcache run` host as a child process, talked to through [`crate::http`], for
//! end-to-end tests of the binary as operators run it.
//!
//! [`Host::start`] lets the host pick a free port (`--listen 127.0.0.1:0`) and reads the address
//! from its log, so tests never race for ports. The host's log is kept (and shown by
//! [`Host::log`]) to explain failures. Dropping a [`Host`] kills it.
//!
//! Architecture invariant: this module knows regcache only through its command line, its log
//! and its HTTP API.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::binary::regcache_bin;
use crate::http::{Response, request};
use crate::wait::eventually_blocking;

/// How long a host may take to start listening (it compiles its policy first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The address logged after `marker` on `line`, if any.
fn logged_address(line: &str, marker: &str) -> Option<String> {
    let rest = line.split(marker).nth(1)?;
    let addr = rest.split(|c: char| c.is_whitespace() || c == '"').next()?;
    Some(addr.to_string())
}

/// A running `regcache run`.
pub struct Host {
    child: Option<Child>,
    /// Where the API listens.
    pub addr: SocketAddr,
    /// Where the etcd-compatible endpoint listens, when `--etcd-api-listen` was given.
    pub etcd_api: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl Host {
    /// Starts `regcache run --listen 127.0.0.1:0 <args>` and waits until it listens.
    pub fn start(args: &[&str]) -> Result<Host> {
        Self::start_with_env(args, &[])
    }

    /// Like [`Host::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Host> {
        Self::launch(args, env, None, None)
    }

    /// Like [`Host::start`], with the host's RLIMIT_NOFILE (soft and hard) set to
    /// `descriptors`, as a service manager would.
    pub fn start_with_descriptor_limit(args: &[&str], descriptors: u64) -> Result<Host> {
        Self::launch(args, &[], Some(descriptors), None)
    }

    /// Like [`Host::start`], as another user (the test must run as root).
    pub fn start_as(user: &RunAs, args: &[&str]) -> Result<Host> {
        Self::launch(args, &[], None, Some(user))
    }

    fn launch(
        args: &[&str],
        env: &[(&str, &str)],
        descriptors: Option<u64>,
        user: Option<&RunAs>,
    ) -> Result<Host> {
        let mut cmd = Command::new(user.map_or(regcache_bin().as_path(), |u| u.binary.as_path()));
        if let Some(&RunAs { uid, gid, .. }) = user {
            // SAFETY: runs in the forked child before exec; setgroups, setgid and setuid are
            // async-signal-safe and change only the child's credentials. The group goes first:
            // once the user is not root, it could not be changed.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setgroups(0, std::ptr::null()) == 0
                        && libc::setgid(gid) == 0
                        && libc::setuid(uid) == 0
                    {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        if let Some(descriptors) = descriptors {
            let limit = libc::rlimit {
                rlim_cur: descriptors,
                rlim_max: descriptors,
            };
            // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
            // touches nothing but the child's own limit.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd.arg("run")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .env("REGCACHE_LOG", "info,regcache=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning regcache run")?;
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                // The etcd endpoint is bound (and logged) before the HTTP API.
                let mut etcd_api = None;
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    if let Some(addr) = logged_address(&line, "etcd API listening on ") {
                        etcd_api = Some(addr);
                    }
                    if let Some(addr) = logged_address(&line, "listening on http://")
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send((addr, etcd_api.take()));
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut host = Host {
            child: Some(child),
            addr: "127.0.0.1:0".parse().unwrap(),
            etcd_api: None,
            log,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok((addr, etcd_api)) => {
                host.addr = addr.parse().context("parsing the logged address")?;
                host.etcd_api = etcd_api
                    .map(|a| a.parse().context("parsing the logged etcd API address"))
                    .transpose()?;
            }
            Err(_) => bail!(
                "the host did not listen within {START_TIMEOUT:?}; its log:\n{}",
                host.log()
            ),
        }
        Ok(host)
    }

    /// Everything the host logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (`TERM`, `HUP`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("already reaped")?;
        // An error ends the wait too: asked again below, it is returned.
        eventually_blocking(timeout, || !matches!(child.try_wait(), Ok(None)));
        match child.try_wait()? {
            Some(status) => {
                self.child = None;
                Ok(status)
            }
            None => bail!(
                "the host did not exit within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// Kills the host (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Response> {
        request(self.addr, "GET", path, &[], &[])
    }

    /// A request with headers and a body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        request(self.addr, method, path, headers, body)
    }

    /// `GET /v1/services/{name}`; panics with the host's log if the host does not answer.
    pub fn lookup(&self, name: &str) -> Response {
        self.get(&format!("/v1/services/{name}"))
            .unwrap_or_else(|e| panic!("looking up {name}: {e:#}\n{}", self.log()))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A user to run the host as, and a copy of the binary that user can run.
pub struct RunAs {
    uid: u32,
    gid: u32,
    binary: PathBuf,
}

impl RunAs {
    /// `nobody` (uid and gid 65534), with a copy of the `regcache` binary in `dir` (made
    /// 0755): the build's own may sit under directories closed to other users.
    pub fn nobody(dir: &Path) -> Result<RunAs> {
        use std::os::unix::fs::PermissionsExt;
        let binary = dir.join("regcache");
        std::fs::copy(regcache_bin(), &binary).context("copying the regcache binary")?;
        for path in [dir, binary.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(RunAs {
            uid: 65534,
            gid: 65534,
            binary,
        })
    }
}

impl Host {
    /// Registers each of `names` with one node (`<name>-1` at `10.0.0.<i>:80`) over the API.
    pub fn register_each(&self, names: &[&str]) {
        for (i, name) in names.iter().enumerate() {
            let body = service_json(name, "1", &format!("{name}-1"), &format!("10.0.0.{i}:80"));
            let created = self
                .request("POST", "/v1/registrations", &[], body.as_bytes())
                .unwrap();
            assert_eq!(created.status, 201, "{}", created.text());
        }
    }
}

/// A go-micro service JSON with one node, as clients register it.
pub fn service_json(name: &str, version: &str, node_id: &str, address: &str) -> String {
    serde_json::json!({
        "name": name,
        "version": version,
        "metadata": null,
        "endpoints": [],
        "nodes": [{ "id": node_id, "address": address, "metadata": { "zone": "a" } }],
    })
    .to_string()
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit, and fails unless that allows
/// `needed` descriptors (a test opening many connections needs more than the usual 1,024).
pub fn raise_descriptor_limit(needed: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given and this process's limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
    }
    if limit.rlim_cur < needed {
        bail!(
            "this test needs {needed} file descriptors; the hard limit is {}",
            limit.rlim_max
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file + rename), as deploy tools do.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
