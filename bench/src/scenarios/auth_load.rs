//! Auth load on etcd (scenario 5): N simulated hosts registering and heart-beating for a fixed
//! time against an etcd with auth on, with regcache's registry (one connection and one
//! long-lived KeepAlive stream per host) versus the one-shot pattern of the fleets that failed
//! (a new client and a new keep-alive per beat), the two interleaved round by round. Counts
//! come from etcd's own metrics.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, PutOptions};
use regcache::registry::Registry;
use regcache::registry::etcd::{EtcdConfig, EtcdRegistry};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::service;

use crate::compare::{Rounds, rounds};
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

    fn cpu_per_s(&self) -> f64 {
        self.cpu_seconds / self.seconds
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
/// Returns what etcd did while the hosts registered and while they heart-beat.
async fn one_shot_hosts(
    etcd: &EtcdCluster,
    hosts: usize,
    duration: Duration,
) -> anyhow::Result<(Load, Load)> {
    let before = Counters::read(etcd)?;
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
    let connected = Counters::read(etcd)?;
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
    Ok((
        connected.since(&before),
        Counters::read(etcd)?.since(&connected),
    ))
}

// The arms of each round.
const REGCACHE: usize = 0;
const ONE_SHOT: usize = 1;

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let hosts = if quick { 10 } else { 100 };
    let (count, window) = if quick {
        (2, Duration::from_millis(1_500))
    } else {
        (4, Duration::from_secs(5))
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = EtcdCluster::start(1).await?;
        etcd.enable_auth(USER, PASSWORD).await?;
        let loads: Rounds<(Load, Load), 2> = rounds(count, async |arm| match arm {
            REGCACHE => regcache_hosts(&etcd, hosts, window).await,
            _ => one_shot_hosts(&etcd, hosts, window).await,
        })
        .await
        .transpose()?;

        let scale = FLEET / hosts as f64;
        let steady = |arm: usize, f: fn(&Load) -> f64| loads.per_round(|r| f(&r[arm].1));
        let auth_per_s = |arm: usize| steady(arm, Load::authenticate_per_s);
        let extrapolated = |arm: usize| loads.per_round(|r| r[arm].1.authenticate_per_s() * scale);
        Ok(Section {
            title: format!(
                "Auth load: {hosts} hosts heart-beating every {}s, etcd auth on",
                BEAT.as_secs()
            ),
            measured: format!(
                "against one etcd over gRPC (etcd-client), counted by etcd's /metrics; per \
                 round the {hosts} hosts connect and heart-beat for {:.1} s, first as regcache's \
                 registry then in the one-shot pattern, the order alternating, {count} rounds",
                window.as_secs_f64()
            ),
            rows: vec![
                Row::rounds(
                    "regcache: Authenticate calls to connect all hosts",
                    loads.per_round(|r| r[REGCACHE].0.authenticate as f64),
                    "",
                ),
                Row::rounds(
                    "regcache: Authenticate/s while heart-beating",
                    auth_per_s(REGCACHE),
                    "/s",
                ),
                Row::rounds(
                    "one-shot: Authenticate/s while heart-beating",
                    auth_per_s(ONE_SHOT),
                    "/s",
                ),
                Row::rounds(
                    "regcache: Authenticate/s extrapolated to 4,000 hosts",
                    extrapolated(REGCACHE),
                    "/s",
                ),
                Row::rounds(
                    "one-shot: Authenticate/s extrapolated to 4,000 hosts",
                    extrapolated(ONE_SHOT),
                    "/s",
                ),
                Row::rounds(
                    "regcache: LeaseKeepAlive streams opened (connect + heartbeats)",
                    loads.per_round(|r| {
                        (r[REGCACHE].0.keepalive_streams + r[REGCACHE].1.keepalive_streams) as f64
                    }),
                    "",
                ),
                Row::rounds(
                    "one-shot: LeaseKeepAlive streams opened while heart-beating",
                    steady(ONE_SHOT, |l| l.keepalive_streams as f64),
                    "",
                ),
                Row::rounds(
                    "regcache: etcd CPU seconds per second of heartbeats",
                    steady(REGCACHE, Load::cpu_per_s),
                    "CPU s/s",
                ),
                Row::rounds(
                    "one-shot: etcd CPU seconds per second of heartbeats",
                    steady(ONE_SHOT, Load::cpu_per_s),
                    "CPU s/s",
                ),
                Row::rounds(
                    "etcd CPU per second of heartbeats, one-shot / regcache",
                    loads.per_round(|r| {
                        r[ONE_SHOT].1.cpu_per_s() / r[REGCACHE].1.cpu_per_s().max(1e-6)
                    }),
                    "x",
                ),
            ],
            notes: vec![],
        })
    })
}
