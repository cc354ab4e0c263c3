//! Debian's `etcdctl` (ETCDCTL_API=3) as a client of any etcd-compatible endpoint: etcd itself
//! or the host's etcd endpoint, so that a test runs the same command against both and compares.
//!
//! Unlike [`EtcdCluster::etcdctl`](crate::etcd::EtcdCluster::etcdctl), which is for setting up
//! and inspecting etcd and fails on any error, [`Etcdctl::run`] returns what the client printed
//! and its exit code whatever they are: the errors are what compatibility tests compare. Every
//! run is bounded twice, by etcdctl's own `--command-timeout` and by `timeout(1)`, and a
//! [`Watch`] (a long-running `etcdctl watch`) lives at most its given lifetime, so a hung
//! endpoint fails a test instead of hanging it or leaving processes behind.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use regcache_tests::etcdctl::Etcdctl;
//! let client = Etcdctl::new("127.0.0.1:2379").user("root", "pw");
//! let put = client.run(&["put", "/micro/registry/a/a1", "{}"]);
//! println!("{} {:?}", put.stdout, put.error());
//! let watch = client.watch(&["--prefix", "/micro/registry/"], Duration::from_secs(30))?;
//! let events = watch.events();
//! # let _ = events; Ok(()) }
//! ```
//!
//! Architecture invariant: this module knows nothing about regcache; it speaks to an endpoint
//! only through the `etcdctl` binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// etcdctl's default `--command-timeout`, which the tests keep unless they mean to bound a
/// call more tightly.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Beyond the command timeout, what `timeout(1)` allows for dialling and process start-up
/// before it kills a run: etcdctl's dial timeout is 2 s.
const START_MARGIN: Duration = Duration::from_secs(5);

/// `etcdctl` against one endpoint, as one user or none.
#[derive(Debug, Clone)]
pub struct Etcdctl {
    endpoint: String,
    user: Option<(String, String)>,
    command_timeout: Duration,
}

/// What one `etcdctl` run printed, and how it exited.
#[derive(Debug, Clone)]
pub struct Output {
    /// The exit code; `None` when a signal (the bounding `timeout`) ended it.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error: clientv3's JSON warnings, then etcdctl's `Error: ...` line.
    pub stderr: String,
}

impl Output {
    /// Whether etcdctl exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The text of etcdctl's last `Error: ...` line (after `Error: `), if it printed one.
    pub fn error(&self) -> Option<&str> {
        self.stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Error: "))
    }

    /// Standard output, or an error showing everything etcdctl printed when it failed.
    pub fn ok(self) -> Result<String> {
        if !self.success() {
            bail!(
                "etcdctl exited {:?}: {}{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self.stdout)
    }

    /// Standard output parsed as JSON (`-w json`).
    pub fn json(self) -> Result<Value> {
        let out = self.ok()?;
        serde_json::from_str(&out).with_context(|| format!("etcdctl printed no JSON: {out}"))
    }
}

impl Etcdctl {
    /// A client of `endpoint` (`host:port` or a URL), without credentials and with etcdctl's
    /// default command timeout of 5 s.
    pub fn new(endpoint: impl Into<String>) -> Etcdctl {
        Etcdctl {
            endpoint: endpoint.into(),
            user: None,
            command_timeout: COMMAND_TIMEOUT,
        }
    }

    /// Authenticates as `user` with `password` (`--user user:password`). Default: none.
    pub fn user(mut self, user: &str, password: &str) -> Etcdctl {
        self.user = Some((user.to_string(), password.to_string()));
        self
    }

    /// etcdctl's `--command-timeout` (the bound of each request, dialling excluded). Default 5 s.
    pub fn command_timeout(mut self, timeout: Duration) -> Etcdctl {
        self.command_timeout = timeout;
        self
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `timeout <lifetime> etcdctl <global flags> <args>`.
    fn command(&self, lifetime: Duration, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        // -k: a client that ignores the TERM sent at the end of its lifetime is killed a
        // second later.
        cmd.args(["-k", "1", &format!("{}", lifetime.as_secs_f64()), "etcdctl"])
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg(format!(
                "--command-timeout={}ms",
                self.command_timeout.as_millis()
            ));
        if let Some((user, password)) = &self.user {
            cmd.arg(format!("--user={user}:{password}"));
        }
        cmd.args(args);
        cmd
    }

    /// Runs `etcdctl <args>` to its end and returns what it printed, failed or not.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, "")
    }

    /// [`Etcdctl::run`] with `stdin` on the standard input (for `txn`).
    pub fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command(self.command_timeout + START_MARGIN, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running etcdctl under timeout(1) (are etcd-client and coreutils installed?)");
        let mut input = child.stdin.take().expect("piped");
        // etcdctl may exit (an error at dialling) before reading its input: a failed write only
        // means nobody read it.
        let _ = input.write_all(stdin.as_bytes());
        drop(input);
        let out = child.wait_with_output().expect("waiting for etcdctl");
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts `etcdctl watch <args>` as a child that lives at most `lifetime`, reading its
    /// output as it comes.
    pub fn watch(&self, args: &[&str], lifetime: Duration) -> Result<Watch> {
        let mut full = vec!["watch"];
        full.extend_from_slice(args);
        let mut child = self
            .command(lifetime, &full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting etcdctl watch")?;
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let pipe = child.stdout.take().expect("piped");
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                    let mut out = stdout.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        {
            let mut pipe = child.stderr.take().expect("piped");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
        }
        Ok(Watch {
            child,
            stdout,
            stderr,
        })
    }
}

/// One event of `etcdctl watch`'s simple output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `PUT` or `DELETE`.
    pub kind: String,
    /// The key.
    pub key: String,
    /// The value (empty for a `DELETE`).
    pub value: String,
}

/// A running `etcdctl watch` (simple output, no `--prev-kv`). Dropping it ends the process.
pub struct Watch {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Watch {
    /// Everything printed on standard output so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Everything printed on standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Whether the process has exited (a watch only ends on its own when it fails).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The events printed so far: simple output prints each as three lines (kind, key, value;
    /// an empty value for a `DELETE`). Registration values are one line of JSON.
    pub fn events(&self) -> Vec<Event> {
        let out = self.stdout();
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks_exact(3)
            .map(|e| Event {
                kind: e[0].to_string(),
                key: e[1].to_string(),
                value: e[2].to_string(),
            })
            .collect()
    }

    /// The responses printed so far by a `watch -w json` (one JSON object a line).
    pub fn responses(&self) -> Vec<Value> {
        self.stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Whether an event on `key` was printed, in simple or JSON output.
    pub fn printed_key(&self, key: &str) -> bool {
        self.events().iter().any(|e| e.key == key)
            || self.responses().iter().any(|r| {
                r["Events"]
                    .as_array()
                    .is_some_and(|events| events.iter().any(|e| text(&e["kv"]["key"]) == key))
            })
    }

    /// The events after the last one on `marker` (see [`wait_watching`]).
    pub fn events_after(&self, marker: &str) -> Vec<Event> {
        let events = self.events();
        let start = events
            .iter()
            .rposition(|e| e.key == marker)
            .map_or(0, |i| i + 1);
        events[start..].to_vec()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // TERM to timeout(1), which passes it on to etcdctl and exits with it: killing timeout
        // itself would leave etcdctl running out its lifetime.
        // SAFETY: kill(2) only sends a signal to the child this Watch owns and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Waits until every watch in `watches` is established: `etcdctl watch` prints nothing when
/// its watch is created, so `put_marker` writes a marker key (the same one each time) until
/// each has printed an event on `marker`, at most `timeout`. Events before the last marker
/// event ([`Watch::events_after`]) are then the same set for every watch.
pub fn wait_watching(
    watches: &[&Watch],
    marker: &str,
    timeout: Duration,
    mut put_marker: impl FnMut(),
) -> bool {
    let seen = |w: &&Watch| w.printed_key(marker);
    crate::wait::eventually_blocking(timeout, || {
        put_marker();
        // Each put is given a moment to arrive before the next, so that a slow watch does
        // not see a long row of markers.
        crate::wait::eventually_blocking(Duration::from_millis(300), || watches.iter().all(seen))
    })
}

/// One key/value of a `get -w json` answer, with its byte strings decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value (empty with `--keys-only`).
    pub value: String,
    /// Revision of the key's creation.
    pub create_revision: i64,
    /// Revision of its last modification.
    pub mod_revision: i64,
    /// Number of modifications since creation.
    pub version: i64,
    /// The lease it is attached to, 0 for none.
    pub lease: i64,
}

/// The key/values of a `get -w json` answer (etcdctl prints byte strings as base64 and omits
/// zero fields).
pub fn kvs(answer: &Value) -> Vec<Kv> {
    answer["kvs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|kv| Kv {
            key: text(&kv["key"]),
            value: text(&kv["value"]),
            create_revision: kv["create_revision"].as_i64().unwrap_or(0),
            mod_revision: kv["mod_revision"].as_i64().unwrap_or(0),
            version: kv["version"].as_i64().unwrap_or(0),
            lease: kv["lease"].as_i64().unwrap_or(0),
        })
        .collect()
}

/// A byte string of etcdctl's JSON output (base64) as text; a missing field is empty.
pub fn text(field: &Value) -> String {
    String::from_utf8_lossy(&base64(field.as_str().unwrap_or(""))).into_owned()
}

/// Decodes standard base64 (with or without padding); other characters are skipped.
pub fn base64(text: &str) -> Vec<u8> {
    let sextet = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(sextet) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Etcdctl, kvs, wait_watching};
    use crate::etcd::EtcdCluster;

    /// The helpers read what etcd's etcdctl prints: errors, JSON answers, both watch formats.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_etcdctl_against_etcd() {
        let etcd = EtcdCluster::start(1).await.unwrap();
        let client = Etcdctl::new(etcd.endpoint(0));
        assert_eq!(client.run(&["put", "/p/a", "v1"]).ok().unwrap(), "OK\n");
        let answer = client.run(&["get", "-w", "json", "/p/a"]).json().unwrap();
        let kv = &kvs(&answer)[0];
        assert_eq!(
            (kv.key.as_str(), kv.value.as_str(), kv.version),
            ("/p/a", "v1", 1)
        );
        let refused = client.run(&["lease", "revoke", "1234"]);
        assert_eq!(refused.code, Some(1));
        assert_eq!(
            refused.error(),
            Some("failed to revoke lease (etcdserver: requested lease not found)")
        );

        let simple = client
            .watch(&["--prefix", "/p/"], Duration::from_secs(30))
            .unwrap();
        let json = client
            .watch(&["--prefix", "/p/", "-w", "json"], Duration::from_secs(30))
            .unwrap();
        let watching = wait_watching(&[&simple, &json], "/p/m", Duration::from_secs(10), || {
            client.run(&["put", "/p/m", "m"]).ok().unwrap();
        });
        assert!(watching, "{:?} {:?}", simple.stdout(), json.stdout());
        client.run(&["put", "/p/b", "v2"]).ok().unwrap();
        client.run(&["del", "/p/b"]).ok().unwrap();
        assert!(crate::wait::eventually_blocking(
            Duration::from_secs(5),
            || { simple.events_after("/p/m").len() == 2 }
        ));
        let events = simple.events_after("/p/m");
        assert_eq!(
            (
                events[0].kind.as_str(),
                events[0].key.as_str(),
                events[0].value.as_str()
            ),
            ("PUT", "/p/b", "v2")
        );
        assert_eq!(
            (
                events[1].kind.as_str(),
                events[1].key.as_str(),
                events[1].value.as_str()
            ),
            ("DELETE", "/p/b", "")
        );
        assert!(crate::wait::eventually_blocking(
            Duration::from_secs(5),
            || { json.printed_key("/p/b") }
        ));
    }

    #[test]
    fn base64_decodes_etcdctl_keys() {
        assert_eq!(
            super::base64("L21pY3JvL3JlZ2lzdHJ5L2EvYTE="),
            b"/micro/registry/a/a1"
        );
        assert_eq!(super::base64("djE="), b"v1");
        assert_eq!(super::base64(""), b"");
    }
}
