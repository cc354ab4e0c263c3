//! The `regcache` host as a separate process, as operators run it.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use regcache_tests::wait::eventually;

use crate::load::{self, Target};

/// A running `regcache run`, killed when dropped.
pub struct Host {
    child: Child,
    pub addr: SocketAddr,
}

impl Host {
    /// Starts `regcache run --listen <free port>` with `args`, and waits until it answers.
    pub async fn start(args: &[&str]) -> anyhow::Result<Host> {
        let addr: SocketAddr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(binary()?)
            .args(["run", "--listen", &addr.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let host = Host { child, addr };
        let health = Target::get(addr, "/healthz");
        let up = eventually(Duration::from_secs(30), || {
            let health = health.clone();
            async move { load::run(&health, 1, Duration::from_millis(5)).await.ok > 0 }
        })
        .await;
        anyhow::ensure!(up, "regcache did not come up on {addr}");
        Ok(host)
    }

    /// The process's resident memory, from /proc.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
        Ok(kib * 1024)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `regcache` binary built beside this benchmark (same profile).
pub(crate) fn binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("regcache");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it with the benchmark (scripts/bench does)",
        path.display()
    );
    Ok(path)
}
