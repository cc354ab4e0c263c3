//! Auth load on etcd (scenario 5): N simulated hosts registering and heart-beating for a fixed
//! time against an etcd with auth on, with regcache's registry (one connection and one
//! long-lived KeepAlive stream per host) versus the one-shot pattern of the fleets that failed
//! (a new client and a new keep-alive per beat). Counts come from etcd's own metrics.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, PutOptions};
use regcache::registry::Registry;
use regcache::registry::etcd::{EtcdConfig, EtcdRegistry};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::service;

use crate::report::{Row, Section};

const USER: &str = "root";
const PASSWORD: &str = "bench-password";
/// The fleet size the report extrapolates to: the incident's.
const FLEET: f64 = 4_000.0;
/// One beat per second per host, as the failing fleets did.
const BEAT: Duration = Duration::from_secs(1);

/// etcd's own counters, read from its `/metrics`.
#[derive(Clone, Copy)]
struct Counters {
    authenticate: u64,
    keepalive_streams: u64,
    cpu_seconds: f64,
    at: Instant,
}

impl Counters {
    fn read(etcd: &EtcdCluster) -> anyhow::Result<Self> {
        Ok(Counters {
            authenticate: etcd.grpc_started(0, "etcdserverpb.Auth", "Authenticate")?,
            keepalive_streams: etcd.grpc_started(0, "etcdserverpb.Lease", "LeaseKeepAlive")?,
            cpu_seconds: etcd.metric(0, "process_cpu_seconds_total", &[])?,
            at: Instant::now(),
        })
    }

    /// What etcd did between `earlier` and `self`.
    fn since(&self, earlier: &Counters) -> Load {
        Load {
            authenticate: self.authenticate - earlier.authenticate,
            keepalive_streams: self.keepalive_streams - earlier.keepalive_streams,
            cpu_seconds: self.cpu_seconds - earlier.cpu_seconds,
            seconds: self.at.duration_since(earlier.at).as_secs_f64(),
        }
    }
}

struct Load {
    authenticate: u64,
    keepalive_streams: u64,
    cpu_seconds: f64,
    seconds: f64,
}

impl Load {
    fn authenticate_per_s(&self) -> f64 {
        self.authenticate as f64 / self.seconds
    }
}

/// regcache: each host connects once and registers; its lease keeper then renews on one
/// stream. Returns what etcd did while the hosts connected and while they heart-beat.
async fn regcache_hosts(
    etcd: &EtcdCluster,
    hosts: usize,
    duration: Duration,
) -> anyhow::Result<(Load, Load)> {
    let before = Counters::read(etcd)?;
    let mut registries = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let config = EtcdConfig::new(etcd.endpoints())
            .user(USER, PASSWORD)
            .prefix("/bench/regcache/")
            .lease_ttl(Duration::from_secs(3))
            .keep_alive_interval(BEAT);
        let registry = EtcdRegistry::connect(config).await?;
        registry
            .register(&service("bench", "1", &format!("host-{i}")))
            .await?;
        registries.push(registry);
    }
    let connected = Counters::read(etcd)?;
    tokio::time::sleep(duration).await;
    let done = Counters::read(etcd)?;
    for registry in &registries {
        registry.shutdown().await;
    }
    Ok((connected.since(&before), done.since(&connected)))
}

/// The failing pattern: every beat, a new authenticated client and a one-shot keep-alive.
async fn one_shot_hosts(
    etcd: &EtcdCluster,
    hosts: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let endpoints = etcd.endpoints();
    let options = || Some(ConnectOptions::new().with_user(USER, PASSWORD));
    let mut client = Client::connect(&endpoints, options()).await?;
    let mut leases = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let lease = client.lease_grant(3, None).await?.id();
        let key = format!("/bench/one-shot/bench/host-{i}");
        client
            .put(key, "{}", Some(PutOptions::new().with_lease(lease)))
            .await?;
        leases.push(lease);
    }
    let deadline = Instant::now() + duration;
    let beats = leases.into_iter().map(|lease| {
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                let beat = Instant::now();
                if let Ok(mut client) = Client::connect(&endpoints, options()).await
                    && let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await
                    && keeper.keep_alive().await.is_ok()
                {
                    let _ = stream.message().await;
                }
                tokio::time::sleep(BEAT.saturating_sub(beat.elapsed())).await;
            }
        })
    });
    for beat in beats.collect::<Vec<_>>() {
        beat.await?;
    }
    Ok(())
}

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let hosts = if quick { 10 } else { 100 };
    let duration = Duration::from_secs(if quick { 3 } else { 20 });
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = EtcdCluster::start(1).await?;
        etcd.enable_auth(USER, PASSWORD).await?;

        let (connect, steady) = regcache_hosts(&etcd, hosts, duration).await?;
        let before = Counters::read(&etcd)?;
        one_shot_hosts(&etcd, hosts, duration).await?;
        let one_shot = Counters::read(&etcd)?.since(&before);

        let scale = FLEET / hosts as f64;
        let regcache_rate = steady.authenticate_per_s();
        Ok(Section {
            title: format!(
                "Auth load: {hosts} hosts heart-beating every {}s for {}s, etcd auth on",
                BEAT.as_secs(),
                duration.as_secs()
            ),
            rows: vec![
                Row::new(
                    "regcache: Authenticate calls to connect all hosts",
                    connect.authenticate as f64,
                    "",
                ),
                Row::new(
                    "regcache: Authenticate/s while heart-beating",
                    regcache_rate,
                    "/s",
                ),
                Row::new(
                    "one-shot: Authenticate/s while heart-beating",
                    one_shot.authenticate_per_s(),
                    "/s",
                ),
                Row::new(
                    "regcache: Authenticate/s extrapolated to 4,000 hosts",
                    regcache_rate * scale,
                    "/s",
                ),
                Row::new(
                    "one-shot: Authenticate/s extrapolated to 4,000 hosts",
                    one_shot.authenticate_per_s() * scale,
                    "/s",
                ),
                Row::new(
                    "regcache: LeaseKeepAlive streams opened (connect + heartbeats)",
                    (connect.keepalive_streams + steady.keepalive_streams) as f64,
                    "",
                ),
                Row::new(
                    "one-shot: LeaseKeepAlive streams opened",
                    one_shot.keepalive_streams as f64,
                    "",
                ),
                Row::new(
                    "regcache: etcd CPU seconds while heart-beating",
                    steady.cpu_seconds,
                    "s",
                ),
                Row::new(
                    "one-shot: etcd CPU seconds while heart-beating",
                    one_shot.cpu_seconds,
                    "s",
                ),
                Row::new(
                    "etcd CPU per second of heartbeats, one-shot / regcache",
                    (one_shot.cpu_seconds / one_shot.seconds)
                        / (steady.cpu_seconds / steady.seconds).max(1e-6),
                    "x",
                ),
            ],
            notes: vec![],
        })
    })
}
