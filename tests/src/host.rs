//! The `regcache run` host as a child process, and a small blocking HTTP/1.1 client to talk to
//! it, for end-to-end tests of the binary as operators run it.
//!
//! [`Host::start`] lets the host pick a free port (`--listen 127.0.0.1:0`) and reads the address
//! from its log, so tests never race for ports. The host's log is kept (and shown by
//! [`Host::log`]) to explain failures. Dropping a [`Host`] kills it.
//!
//! Architecture invariant: this module knows regcache only through its command line, its log
//! and its HTTP API.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::binary::regcache_bin;

/// How long a host may take to start listening (it compiles its policy first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `regcache run`.
pub struct Host {
    child: Option<Child>,
    /// Where the API listens.
    pub addr: SocketAddr,
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
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    if let Some(addr) = line.split("listening on http://").nth(1) {
                        let addr = addr.split(|c: char| c.is_whitespace() || c == '"').next();
                        if let (Some(tx), Some(addr)) = (tx.take(), addr) {
                            let _ = tx.send(addr.to_string());
                        }
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
            log,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => host.addr = addr.parse().context("parsing the logged address")?,
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
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the host did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
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

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`). The whole body is sent
/// even if the server answers early (an oversized body); the answer is read anyway.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // A server refusing a large body may close while we write: what it answered still counts.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        read?;
        bail!("empty answer to {method} {path}");
    }
    parse(&raw)
}

/// Sends `bytes` as they are on a fresh connection and reads the answer until the host closes
/// the connection (or 10 s pass).
pub fn request_raw(addr: SocketAddr, bytes: &[u8]) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(bytes)?;
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        read?;
        bail!("empty answer");
    }
    parse(&raw)
}

/// Sends a request's head announcing a `content_length`-byte body, and no body: the server
/// must answer from the head alone (say, refuse a missing token) within `timeout`.
pub fn request_head_only(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_length: usize,
    timeout: Duration,
) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {content_length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // Read up to the end of the answer's body; the connection stays open (the server may
    // still be willing to read the announced body), so stop at Content-Length.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("no answer to {method} {path} within {timeout:?}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Ok(response) = parse(&raw) {
            let complete = response
                .header("content-length")
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| response.body.len() >= l);
            if complete {
                return Ok(response);
            }
        }
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end])?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end])?.trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).context("short chunk")?);
        data = data.get(size + 2..).unwrap_or_default();
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

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename), as deploy tools do.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
