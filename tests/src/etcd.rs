//! The shared etcd test harness: real etcd processes on loopback, started and stopped by pid.
//!
//! Every end-to-end test that needs etcd starts its own cluster here, so tests stay independent
//! and can run in parallel (many test binaries at once): each member listens on ports picked at
//! random outside the kernel's ephemeral range (checked free, and retried when etcd still finds
//! one taken), keeps its data in a temporary directory, and is killed when the cluster is
//! dropped. Waiting is always a bounded poll of a condition, never a fixed sleep.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use regcache_tests::etcd::EtcdCluster;
//! let mut etcd = EtcdCluster::builder().members(3).auth_token_ttl(2).start().await?;
//! etcd.enable_auth("root", "secret").await?;
//! let before = etcd.grpc_started(0, "etcdserverpb.Auth", "Authenticate")?;
//! etcd.stop(0)?; // SIGSTOP: the member hangs, TCP still accepts
//! etcd.cont(0)?;
//! etcd.kill(1)?;
//! etcd.restart(1).await?; // same data dir, same ports
//! # let _ = before; Ok(()) }
//! ```
//!
//! Architecture invariant: the harness knows nothing about regcache; it speaks to etcd only
//! through the `etcd`/`etcdctl` binaries and plain HTTP to the metrics port.

use std::collections::HashSet;
use std::fs::File;
use std::future::ready;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::http;
use crate::wait::{eventually, eventually_blocking};

/// How long a member may take to become healthy after a (re)start. etcd on a loaded 2-core
/// machine with many parallel tests needs a few seconds for the first election.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Ports are picked in this range: below Linux's default ephemeral range (32768–60999), so an
/// outgoing client connection cannot be sitting on a member's port when it restarts.
const PORT_RANGE: std::ops::Range<u16> = 15_000..32_000;

/// Ports handed out by this process, so that two clusters of one test binary never pick the
/// same one before either has bound it.
static TAKEN_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Files of a TLS setup for etcd's client port: a CA, a server certificate for 127.0.0.1 and a
/// client certificate, all signed by that CA, plus an unrelated CA to test refusal.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server and client certificates (PEM).
    pub ca: PathBuf,
    /// The server certificate, valid for IP 127.0.0.1 and `localhost` (PEM).
    pub server_cert: PathBuf,
    /// The server's private key (PEM).
    pub server_key: PathBuf,
    /// A client certificate signed by `ca` (PEM).
    pub client_cert: PathBuf,
    /// The client's private key (PEM).
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting it instead of `ca` must fail.
    pub wrong_ca: PathBuf,
}

impl TlsFiles {
    /// Generates a fresh CA and certificates in `dir` with the `openssl` command-line tool.
    pub fn generate(dir: &Path) -> Result<TlsFiles> {
        let p = |name: &str| dir.join(name);
        let files = TlsFiles {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server-key.pem"),
            client_cert: p("client.pem"),
            client_key: p("client-key.pem"),
            wrong_ca: p("wrong-ca.pem"),
        };
        let ca_key = p("ca-key.pem");
        let wrong_key = p("wrong-ca-key.pem");
        for (cert, key, cn) in [
            (&files.ca, &ca_key, "regcache-test-ca"),
            (&files.wrong_ca, &wrong_key, "wrong-ca"),
        ] {
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                s(key),
                "-out",
                s(cert),
            ])?;
        }
        let ext = p("ext.cnf");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        for (cert, key, cn) in [
            (&files.server_cert, &files.server_key, "127.0.0.1"),
            (&files.client_cert, &files.client_key, "regcache-client"),
        ] {
            let csr = cert.with_extension("csr");
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                s(key),
                "-out",
                s(&csr),
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                s(&csr),
                "-CA",
                s(&files.ca),
                "-CAkey",
                s(&ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                s(&ext),
                "-out",
                s(cert),
            ])?;
        }
        Ok(files)
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Options for a test cluster; each setter's doc states its default.
#[derive(Debug, Clone)]
pub struct EtcdBuilder {
    members: usize,
    auth_token_ttl: Option<u64>,
    extra_flags: Vec<String>,
    tls: Option<(TlsFiles, bool)>,
}

impl EtcdBuilder {
    /// Number of members. Default 1.
    pub fn members(mut self, n: usize) -> Self {
        self.members = n;
        self
    }

    /// `--auth-token-ttl` in seconds (how long a simple token lives without token-checked
    /// traffic). Default: etcd's own, 300 s.
    pub fn auth_token_ttl(mut self, seconds: u64) -> Self {
        self.auth_token_ttl = Some(seconds);
        self
    }

    /// Extra command-line flags for every member. Default none.
    pub fn flag(mut self, flag: impl Into<String>) -> Self {
        self.extra_flags.push(flag.into());
        self
    }

    /// Serves the client port over TLS with these files; with `client_cert_auth` etcd also
    /// demands a client certificate signed by the CA. Default: plain HTTP.
    pub fn tls(mut self, files: TlsFiles, client_cert_auth: bool) -> Self {
        self.tls = Some((files, client_cert_auth));
        self
    }

    /// Starts every member and waits until all are healthy. Retries with new ports if etcd
    /// finds one taken (another test grabbed it between our check and etcd's bind).
    pub async fn start(self) -> Result<EtcdCluster> {
        let mut last_err = None;
        for _ in 0..5 {
            match self.try_start().await {
                Ok(cluster) => return Ok(cluster),
                Err(e) if format!("{e:#}").contains("address already in use") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .expect("the loop ran")
            .context("no free ports after 5 tries"))
    }

    async fn try_start(&self) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("regcache-etcd-")
            .tempdir()?;
        let token = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("regcache")
            .to_string();
        let members: Vec<Member> = (0..self.members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: pick_port(),
                peer_port: pick_port(),
                metrics_port: pick_port(),
                data_dir: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            options: self.clone(),
            initial_cluster,
            cluster_token: token,
            _dir: dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }
}

fn pick_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let mut taken = TAKEN_PORTS.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    let span = (PORT_RANGE.end - PORT_RANGE.start) as u64;
    let mut seed = RandomState::new().hash_one(Instant::now());
    loop {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = PORT_RANGE.start + ((seed >> 33) % span) as u16;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members on 127.0.0.1. Dropping it kills every member.
pub struct EtcdCluster {
    members: Vec<Member>,
    options: EtcdBuilder,
    initial_cluster: String,
    cluster_token: String,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// A builder with the defaults: one member, plain HTTP, etcd's default flags.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder {
            members: 1,
            auth_token_ttl: None,
            extra_flags: Vec::new(),
            tls: None,
        }
    }

    /// Starts a plain cluster of `members` members.
    pub async fn start(members: usize) -> Result<EtcdCluster> {
        Self::builder().members(members).start().await
    }

    /// Client URLs of every member (`http://` or `https://`), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The plain-HTTP URL of member `i`'s `/metrics` (a separate metrics listener, so it
    /// stays plain even when the client port speaks TLS).
    pub fn metrics_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/metrics", self.members[i].metrics_port)
    }

    /// Member `i`'s log so far (etcd's own stderr), for failure messages.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// Freezes member `i` with SIGSTOP: its sockets stay open and accept, nothing answers.
    /// Returns once every thread of the process is stopped (the signal alone is asynchronous:
    /// a request sent right after it could still be served).
    pub fn stop(&self, i: usize) -> Result<()> {
        self.signal(i, "STOP")?;
        self.wait_threads(i, true)
    }

    /// Resumes member `i` with SIGCONT, once every thread runs again.
    pub fn cont(&self, i: usize) -> Result<()> {
        self.signal(i, "CONT")?;
        self.wait_threads(i, false)
    }

    /// Waits until all threads of member `i` are (or are no longer) in state `T` (stopped).
    fn wait_threads(&self, i: usize, stopped: bool) -> Result<()> {
        let pid = self.pid(i).context("member is not running")?;
        // An error ends the wait too: asked again below, it is returned.
        eventually_blocking(Duration::from_secs(5), || {
            !matches!(threads_stopped(pid, stopped), Ok(false))
        });
        if !threads_stopped(pid, stopped)? {
            bail!(
                "member {i} did not {} in time",
                if stopped { "stop" } else { "resume" }
            );
        }
        Ok(())
    }

    fn signal(&self, i: usize, sig: &str) -> Result<()> {
        let pid = self.pid(i).context("member is not running")?;
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {pid} failed");
        }
        Ok(())
    }

    /// The process id of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    /// Kills member `i` with SIGKILL and reaps it. Its data directory stays for [`restart`].
    ///
    /// [`restart`]: EtcdCluster::restart
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Restarts member `i` (killing it first if it runs) on the same data directory and ports,
    /// and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        self.spawn(i)?;
        self.wait_healthy(i).await
    }

    /// Enables authentication: creates `user` with `password` and the `root` role (etcd
    /// requires a root user before `auth enable`), then turns auth on.
    pub async fn enable_auth(&self, user: &str, password: &str) -> Result<()> {
        self.etcdctl(None, &["user", "add", &format!("{user}:{password}")])?;
        if user != "root" {
            self.etcdctl(None, &["user", "add", "root:root-not-used"])?;
        }
        self.etcdctl(None, &["user", "grant-role", "root", "root"])?;
        if user != "root" {
            self.etcdctl(None, &["user", "grant-role", user, "root"])?;
        }
        self.etcdctl(None, &["auth", "enable"])?;
        Ok(())
    }

    /// Runs `etcdctl` against every member (as `user:password` when given) and returns its
    /// standard output.
    pub fn etcdctl(&self, auth: Option<(&str, &str)>, args: &[&str]) -> Result<String> {
        let live: Vec<String> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .map(|i| self.endpoint(i))
            .collect();
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", live.join(",")))
            .arg("--command-timeout=10s");
        if let Some((files, _)) = &self.options.tls {
            cmd.arg(format!("--cacert={}", s(&files.ca)))
                .arg(format!("--cert={}", s(&files.client_cert)))
                .arg(format!("--key={}", s(&files.client_key)));
        }
        if let Some((user, password)) = auth {
            cmd.arg(format!("--user={user}:{password}"));
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Reads member `i`'s `/metrics` and sums every sample of `name` whose labels contain all
    /// of `labels` (each `key="value"`). A metric that does not appear reads as 0.
    pub fn metric(&self, i: usize, name: &str, labels: &[&str]) -> Result<f64> {
        let body = http_get(
            &format!("127.0.0.1:{}", self.members[i].metrics_port),
            "/metrics",
        )?;
        let mut sum = 0.0;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                continue; // a longer metric name sharing the prefix
            }
            let (series, value) = rest.rsplit_once(' ').context("metric line without value")?;
            if labels.iter().all(|l| series.contains(l)) {
                sum += value
                    .parse::<f64>()
                    .with_context(|| format!("bad sample: {line}"))?;
            }
        }
        Ok(sum)
    }

    /// How many `service`/`method` gRPC calls member `i` has started since it started, e.g.
    /// `("etcdserverpb.Auth", "Authenticate")` or `("etcdserverpb.Lease", "LeaseKeepAlive")`
    /// (a stream counts once). Filtering on the service matters: the health service also
    /// has a `Watch`.
    pub fn grpc_started(&self, i: usize, service: &str, method: &str) -> Result<u64> {
        let labels = [
            format!("grpc_method=\"{method}\""),
            format!("grpc_service=\"{service}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        Ok(self.metric(i, "grpc_server_started_total", &labels)? as u64)
    }

    /// [`grpc_started`](Self::grpc_started) summed over the members that run now.
    pub fn grpc_started_total(&self, service: &str, method: &str) -> Result<u64> {
        let mut total = 0;
        for i in 0..self.members.len() {
            if self.members[i].child.is_some() {
                total += self.grpc_started(i, service, method)?;
            }
        }
        Ok(total)
    }

    /// Index of the current leader among running members, read from each member's
    /// `etcd_server_is_leader` gauge.
    pub fn leader(&self) -> Result<usize> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_some()
                && self.metric(i, "etcd_server_is_leader", &[])? == 1.0
            {
                return Ok(i);
            }
        }
        bail!("no member is leader")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let client_url = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", s(&m.data_dir)))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-token={}", self.cluster_token))
            .arg("--initial-cluster-state=new")
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                m.metrics_port
            ))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        if let Some(ttl) = self.options.auth_token_ttl {
            cmd.arg(format!("--auth-token-ttl={ttl}"));
        }
        if let Some((files, client_cert_auth)) = &self.options.tls {
            cmd.arg(format!("--cert-file={}", s(&files.server_cert)))
                .arg(format!("--key-file={}", s(&files.server_key)));
            // etcd 3.4 demands a client certificate whenever it has a trusted CA file, whatever
            // `--client-cert-auth` says: pass the CA only when client certificates are wanted.
            if *client_cert_auth {
                cmd.arg(format!("--trusted-ca-file={}", s(&files.ca)))
                    .arg("--client-cert-auth");
            }
        }
        cmd.args(&self.options.extra_flags);
        let log = File::options().create(true).append(true).open(&m.log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (is etcd-server installed?)")?;
        self.members[i].child = Some(child);
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize) -> Result<()> {
        let addr = format!("127.0.0.1:{}", self.members[i].metrics_port);
        let child = &mut self.members[i].child;
        let mut exited = None;
        let healthy = eventually(START_TIMEOUT, || {
            exited = child.as_mut().and_then(|c| c.try_wait().transpose());
            // /health turns true once the member has a leader and can serve; it does not
            // depend on auth.
            ready(
                exited.is_some()
                    || http_get(&addr, "/health").is_ok_and(|b| b.contains("\"health\":\"true\"")),
            )
        })
        .await;
        if let Some(exit) = exited {
            self.members[i].child = None;
            bail!("etcd member {i} exited ({}): {}", exit?, self.log(i));
        }
        if !healthy {
            bail!(
                "etcd member {i} not healthy after {START_TIMEOUT:?}: {}",
                self.log(i)
            );
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let mut taken = TAKEN_PORTS.lock().unwrap();
        if let Some(taken) = taken.as_mut() {
            for m in &self.members {
                for port in [m.client_port, m.peer_port, m.metrics_port] {
                    taken.remove(&port);
                }
            }
        }
    }
}

/// `GET path` returning the body of a 200, enough for etcd's `/metrics` and `/health`, bounded
/// by 2 s so that a frozen member cannot hang a test.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let response =
        http::request_within(addr.parse()?, "GET", path, &[], &[], Duration::from_secs(2))?;
    if response.status != 200 {
        bail!("GET {path}: status {}", response.status);
    }
    Ok(response.text())
}

/// Whether every thread of process `pid` is in state `T` (stopped), or none is (`!stopped`).
fn threads_stopped(pid: u32, stopped: bool) -> Result<bool> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if (state == Some('T')) != stopped {
            return Ok(false);
        }
    }
    Ok(true)
}
