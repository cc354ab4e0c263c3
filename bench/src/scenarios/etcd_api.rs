//! The etcd-compatible endpoint (issue 11): unchanged etcd clients pointed at etcd itself, at
//! `etcd grpc-proxy` and at `regcache run --etcd-api-listen`, side by side in one run, with one
//! client for all (the Rust etcd-client crate, driving go-micro's registry calls:
//! `gomicro_clients.rs`), etcd's auth on throughout.
//!
//! 1. Fleet: simulated processes, each with its own connection and credentials, register and
//!    renew with one-shot keep-alives every second; what reaches etcd (its `/metrics`) and what
//!    it costs etcd (its CPU time, from /proc). Arms rotated round by round, each on a freshly
//!    started proxy or host, so that no arm inherits another's warm state.
//! 2. Range of one service: rate and latency, the arms interleaved round by round.
//! 3. A burst of lease losses (4 of a service's 5 nodes): the deletes each arm delivers to its
//!    watchers, all three arms watching the same burst at once.
//! 4. etcd hung (SIGSTOP): the share of Ranges answered and their latency, all arms loaded at
//!    once during the same freeze. Last: the freeze leaves etcd's leases and the host's policy
//!    (its outage grace) in a state the other parts must not start from.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::service;
use regcache_tests::wait::eventually;

use crate::compare::{Rounds, rounds, rounds_now};
use crate::etcd_arms::{EndpointHost, GrpcProxy, cpu_seconds};
use crate::gomicro_clients::{
    Credential, Fleet, FleetOutcome, Pace, SETUP_CONCURRENCY, Watchers, connect, connect_many,
    ranges,
};
use crate::load::Outcome;
use crate::report::{Row, Section};

// The arms, in report order.
const ARMS: usize = 3;
const DIRECT: usize = 0;
const PROXY: usize = 1;
const ENDPOINT: usize = 2;
const LABELS: [&str; ARMS] = ["etcd direct", "grpc-proxy", "regcache endpoint"];

const ROOT_PASSWORD: &str = "bench-root-password";
/// Distinct credentials of the simulated processes: process `i` logs in as `fleet-{i % 10}`.
const USERS: usize = 10;
const PREFIX: &str = "/micro/registry/";
/// The service the processes call (looked up, watched, ranged): `NODES` nodes written without
/// a lease, so that freezing etcd cannot expire them.
const CALLED: &str = "greeter";
/// Nodes of the called service and of the burst's service.
const NODES: usize = 5;
/// The service whose leases are lost in a burst.
const BURST: &str = "burst";
/// Nodes of the burst service lost at once (of `NODES`).
const BURST_LOST: usize = 4;
/// Renewal interval of the fleet: one-shot keep-alives every second, as the incident's fleets.
const BEAT: Duration = Duration::from_secs(1);
/// TTL of a simulated process's lease: ten beats of slack.
const FLEET_TTL: i64 = 10;
/// Closed-loop Range callers per arm, on one connection (as `http_vs_etcd`).
const RANGE_CALLERS: usize = 32;
/// During the freeze: callers per arm, each sending one Range every `FREEZE_PACE`. Paced
/// rather than closed-loop so that the latency measured is the answer's, not a queue's.
const FREEZE_CALLERS: usize = 8;
const FREEZE_PACE: Duration = Duration::from_millis(10);
/// After the burst's deletes reached the direct watchers, how much longer every arm is given
/// to deliver its own (the host batches a burst's deletes for 250 ms before judging them).
const BURST_SETTLE: Duration = Duration::from_secs(2);

/// How hard to measure.
#[derive(Debug, Clone, Copy)]
struct Effort {
    processes: usize,
    fleet_rounds: usize,
    start_window: Duration,
    steady_window: Duration,
    range_rounds: usize,
    range_window: Duration,
    watchers: usize,
    burst_rounds: usize,
    reference: Duration,
    freeze: Duration,
}

impl Effort {
    fn new(quick: bool) -> Effort {
        if quick {
            Effort {
                processes: 20,
                fleet_rounds: 1,
                start_window: Duration::from_secs(2),
                steady_window: Duration::from_millis(1_500),
                range_rounds: 2,
                range_window: Duration::from_millis(500),
                watchers: 10,
                burst_rounds: 1,
                reference: Duration::from_secs(1),
                freeze: Duration::from_secs(3),
            }
        } else {
            Effort {
                processes: 500,
                fleet_rounds: 2,
                start_window: Duration::from_secs(20),
                steady_window: Duration::from_secs(10),
                range_rounds: 8,
                range_window: Duration::from_secs(3),
                watchers: 100,
                burst_rounds: 3,
                reference: Duration::from_secs(10),
                freeze: Duration::from_secs(30),
            }
        }
    }
}

/// What one arm's clients connect to, and what runs in between.
enum Middle {
    Direct(String),
    Proxy(GrpcProxy),
    Endpoint(EndpointHost),
}

impl Middle {
    /// A fresh proxy or host in front of `etcd` for `arm` (None: the endpoint is not built).
    async fn start(
        arm: usize,
        etcd: &EtcdCluster,
        endpoint: bool,
    ) -> anyhow::Result<Option<Middle>> {
        let etcd_endpoint = etcd.endpoint(0);
        Ok(match arm {
            DIRECT => Some(Middle::Direct(etcd_endpoint)),
            PROXY => Some(Middle::Proxy(GrpcProxy::start(&etcd_endpoint).await?)),
            _ if endpoint => Some(Middle::Endpoint(
                EndpointHost::start(&etcd_endpoint, "root", ROOT_PASSWORD, &[]).await?,
            )),
            _ => None,
        })
    }

    fn endpoint(&self) -> &str {
        match self {
            Middle::Direct(endpoint) => endpoint,
            Middle::Proxy(proxy) => &proxy.endpoint,
            Middle::Endpoint(host) => &host.endpoint,
        }
    }

    /// CPU seconds of the process in between (none for etcd direct).
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        match self {
            Middle::Direct(_) => Ok(0.0),
            Middle::Proxy(proxy) => proxy.cpu_seconds(),
            Middle::Endpoint(host) => host.cpu_seconds(),
        }
    }
}

/// What reached etcd and what it cost it, from its `/metrics` and /proc.
#[derive(Debug, Clone, Copy, Default)]
struct EtcdLoad {
    authenticate: f64,
    keepalive_streams: f64,
    watch_streams: f64,
    lease_grants: f64,
    ranges: f64,
    cpu_seconds: f64,
}

impl EtcdLoad {
    fn read(etcd: &EtcdCluster) -> anyhow::Result<EtcdLoad> {
        let started = |service: &str, method: &str| -> anyhow::Result<f64> {
            Ok(etcd.grpc_started(0, service, method)? as f64)
        };
        let pid = etcd
            .pid(0)
            .ok_or_else(|| anyhow::anyhow!("etcd is not running"))?;
        Ok(EtcdLoad {
            authenticate: started("etcdserverpb.Auth", "Authenticate")?,
            keepalive_streams: started("etcdserverpb.Lease", "LeaseKeepAlive")?,
            watch_streams: started("etcdserverpb.Watch", "Watch")?,
            lease_grants: started("etcdserverpb.Lease", "LeaseGrant")?,
            ranges: started("etcdserverpb.KV", "Range")?,
            cpu_seconds: cpu_seconds(pid)?,
        })
    }

    fn since(&self, earlier: &EtcdLoad) -> EtcdLoad {
        EtcdLoad {
            authenticate: self.authenticate - earlier.authenticate,
            keepalive_streams: self.keepalive_streams - earlier.keepalive_streams,
            watch_streams: self.watch_streams - earlier.watch_streams,
            lease_grants: self.lease_grants - earlier.lease_grants,
            ranges: self.ranges - earlier.ranges,
            cpu_seconds: self.cpu_seconds - earlier.cpu_seconds,
        }
    }
}

/// Waits until etcd has finished the work an arm left it: `Authenticate` calls whose clients
/// gave up are still hashed (bcrypt) after the clients are gone, and would be billed to the
/// next arm. Then until its CPU is quiet.
async fn settle(etcd: &EtcdCluster) -> anyhow::Result<()> {
    let pending = || -> anyhow::Result<f64> {
        let started = etcd.grpc_started(0, "etcdserverpb.Auth", "Authenticate")? as f64;
        let handled = etcd.metric(
            0,
            "grpc_server_handled_total",
            &["grpc_method=\"Authenticate\""],
        )?;
        Ok(started - handled)
    };
    let drained = eventually(Duration::from_secs(180), || {
        std::future::ready(pending().is_ok_and(|p| p <= 0.0))
    })
    .await;
    anyhow::ensure!(
        drained,
        "etcd still had {} Authenticate calls pending",
        pending()?
    );
    let pid = etcd
        .pid(0)
        .ok_or_else(|| anyhow::anyhow!("etcd is not running"))?;
    let sample = Duration::from_millis(250);
    // Quiet: under a tenth of a core. etcd idles at about a hundredth.
    eventually(Duration::from_secs(30), || async move {
        let before = cpu_seconds(pid).unwrap_or(0.0);
        tokio::time::sleep(sample).await;
        (cpu_seconds(pid).unwrap_or(0.0) - before) / sample.as_secs_f64() < 0.1
    })
    .await;
    Ok(())
}

/// Creates the processes' users (role `registry`: read and write under the prefix), then turns
/// etcd's auth on with `root`. Users first: until auth is on, etcdctl needs no login (a login
/// costs etcd a bcrypt hash).
fn create_users(etcd: &EtcdCluster) -> anyhow::Result<Vec<Credential>> {
    etcd.etcdctl(None, &["role", "add", "registry"])?;
    etcd.etcdctl(
        None,
        &[
            "role",
            "grant-permission",
            "registry",
            "readwrite",
            PREFIX,
            "--prefix=true",
        ],
    )?;
    let credentials: Vec<Credential> = (0..USERS)
        .map(|u| Credential {
            user: format!("fleet-{u:02}"),
            password: format!("fleet-password-{u:02}"),
        })
        .collect();
    for c in &credentials {
        etcd.etcdctl(
            None,
            &["user", "add", &format!("{}:{}", c.user, c.password)],
        )?;
        etcd.etcdctl(None, &["user", "grant-role", &c.user, "registry"])?;
    }
    Ok(credentials)
}

fn node_key(service: &str, node: usize) -> String {
    format!("{PREFIX}{service}/{service}-{node}")
}

fn node_value(service_name: &str, node: usize) -> Vec<u8> {
    service(service_name, "1.0.0", &format!("{service_name}-{node}")).encode()
}

/// Registers node `node` of the burst service on a lease of its own, as its process would.
async fn register_burst_node(root: &mut Client, node: usize) -> anyhow::Result<i64> {
    // Long enough to outlive the part; the leases are revoked, never left to expire.
    let lease = root.lease_grant(600, None).await?.id();
    root.put(
        node_key(BURST, node),
        node_value(BURST, node),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await?;
    Ok(lease)
}

/// The value of `arm` in a round where every arm that is built was measured.
fn arm<T>(round: &[Option<T>; ARMS], arm: usize) -> &T {
    round[arm]
        .as_ref()
        .expect("a built arm is measured every round")
}

/// Per-round figures measured for all arms at once (not one arm after another), as `Rounds`
/// for the report's spread.
fn simultaneous(values: &[[f64; ARMS]]) -> Rounds<f64, ARMS> {
    let mut calls = 0;
    rounds_now(values.len(), |arm| {
        let round = calls / ARMS;
        calls += 1;
        values[round][arm]
    })
}

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let effort = Effort::new(quick);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let began = Instant::now();
        let progress = |part: &str| {
            eprintln!(
                "regcache-bench: etcd_api {part} ({:.1} s)",
                began.elapsed().as_secs_f64()
            )
        };
        let etcd = EtcdCluster::start(1).await?;
        let credentials = create_users(&etcd)?;
        etcd.enable_auth("root", ROOT_PASSWORD).await?;
        let root_credential = Credential {
            user: "root".into(),
            password: ROOT_PASSWORD.into(),
        };
        let mut root = connect(&etcd.endpoint(0), &root_credential).await?;
        for n in 0..NODES {
            root.put(node_key(CALLED, n), node_value(CALLED, n), None)
                .await?;
        }
        let built = EndpointHost::available();
        let arms: Vec<usize> = (0..ARMS).filter(|&a| a != ENDPOINT || built).collect();

        let mut rows = Vec::new();
        let mut notes = Vec::new();
        if !built {
            notes.push(
                "The regcache endpoint arm did not run: the `regcache` binary beside the \
                 benchmark has no `--etcd-api-listen` yet."
                    .to_string(),
            );
        }

        notes.push(format!(
            "*Fleet* ({} round(s), arms rotated, each on a freshly started proxy or host): {} \
             processes, process i logging in as one of {USERS} users (i mod {USERS}), each \
             with its own connection, registering (Grant, Put with the lease, TTL {FLEET_TTL} \
             s), renewing with one-shot keep-alives every {} s, looking `{CALLED}` up once and \
             watching it, deregistering at the end. *start*: all processes start at once and \
             connect themselves (an `Authenticate` each, 5 s bound, retried every beat) for \
             {:.0} s, counted from before the proxy or host starts until etcd has finished \
             the `Authenticate` calls left behind. *steady*: the same processes connected \
             beforehand ({SETUP_CONCURRENCY} at a time, not counted), then registering and renewing for {:.0} s.",
            effort.fleet_rounds,
            effort.processes,
            BEAT.as_secs(),
            effort.start_window.as_secs_f64(),
            effort.steady_window.as_secs_f64(),
        ));
        notes.push(format!(
            "*Ranges*: {RANGE_CALLERS} closed-loop callers per arm sharing one connection, a \
             serializable prefix Range of `{CALLED}` ({NODES} nodes written without a lease), \
             arms interleaved round by round, {} rounds of {:.1} s. *Burst*: {} watchers per \
             arm, each its own connection (prefix watch with previous values), all three arms \
             watching the same burst at once; {BURST_LOST} of the {NODES} leases of `{BURST}` \
             revoked at once, deletes counted until the direct watchers had all of them and \
             {:.0} s more; {} round(s), the nodes put back between rounds. *Freeze*: \
             {FREEZE_CALLERS} callers per arm each sending a Range every {} ms (the sends of all \
             callers of all arms spread evenly over the period), all arms at once, {:.0} s with etcd running, then {:.0} s with it SIGSTOPped (kept frozen \
             until the Ranges in flight are answered or time out).",
            effort.range_rounds,
            effort.range_window.as_secs_f64(),
            effort.watchers,
            BURST_SETTLE.as_secs_f64(),
            effort.burst_rounds,
            FREEZE_PACE.as_millis(),
            effort.reference.as_secs_f64(),
            effort.freeze.as_secs_f64(),
        ));
        progress("fleet");
        let fleet = fleet_part(&etcd, &credentials, effort, built).await?;
        rows.extend(fleet.rows);
        notes.extend(fleet.notes);

        // Parts 2 to 4 share one proxy and one host, started now.
        let mut middles = Vec::new();
        for a in 0..ARMS {
            middles.push(Middle::start(a, &etcd, built).await?);
        }
        let middles: [Option<Middle>; ARMS] = middles.try_into().ok().expect("three arms");
        let mut clients: [Option<Client>; ARMS] = [None, None, None];
        for &a in &arms {
            let endpoint = middles[a].as_ref().expect("built").endpoint();
            clients[a] = Some(connect(endpoint, &credentials[0]).await?);
        }
        progress("ranges");
        rows.extend(range_part(&etcd, &middles, &clients, effort).await?);
        progress("burst");
        let burst = burst_part(&mut root, &middles, &clients, &credentials, effort).await?;
        rows.extend(burst);
        progress("freeze");
        rows.extend(freeze_part(&etcd, &clients, effort).await?);
        progress("done");

        Ok(Section {
            title: format!(
                "etcd-compatible endpoint: etcd direct, etcd grpc-proxy and regcache's endpoint, \
                 etcd auth on ({} processes, {USERS} users)",
                effort.processes
            ),
            measured: "on loopback against one etcd 3.4 member with auth on (bcrypt cost 10), \
                 with the Rust etcd-client crate (0.21) as the client of all three arms, driving \
                 go-micro's registry calls (bench/src/gomicro_clients.rs), each call bounded by \
                 go-micro's 5 s; `etcd grpc-proxy start` and `regcache run --etcd-api-listen` \
                 run as separate processes with their default settings; counts from etcd's \
                 /metrics (grpc_server_started_total), CPU time from /proc/<pid>/stat; the \
                 parts are described below the table"
                .into(),
            rows,
            notes,
        })
    })
}

/// One phase of an arm's fleet run: what its processes saw, what reached etcd and what it cost
/// etcd and the process in between.
struct Phase {
    fleet: FleetOutcome,
    etcd: EtcdLoad,
    middle_cpu: f64,
    seconds: f64,
}

/// One arm's fleet run, on a freshly started proxy or host.
struct FleetRun {
    /// Every process starting at once with go-micro's timeouts, as a fleet restarting after a
    /// deploy or an outage: counted until etcd has finished the work they left it.
    start: Phase,
    /// The same processes connected beforehand (one at a time, not counted here), then
    /// registering and renewing: the steady state.
    steady: Phase,
    /// Streams opened at etcd over the whole run, the proxy's or host's own included.
    keepalive_streams: f64,
    watch_streams: f64,
}

struct Part {
    rows: Vec<Row>,
    notes: Vec<String>,
}

async fn fleet_arm(
    etcd: &EtcdCluster,
    arm: usize,
    credentials: &[Credential],
    effort: Effort,
    built: bool,
) -> anyhow::Result<Option<FleetRun>> {
    if arm == ENDPOINT && !built {
        return Ok(None);
    }
    let began = Instant::now();
    settle(etcd).await?;
    let before = EtcdLoad::read(etcd)?;
    let middle = Middle::start(arm, etcd, built)
        .await?
        .expect("a built arm starts");
    let fleet = |window: Duration| Fleet {
        endpoint: middle.endpoint().to_string(),
        credentials: credentials.to_vec(),
        processes: effort.processes,
        prefix: PREFIX.into(),
        service: "fleet".into(),
        calls: CALLED.into(),
        ttl: FLEET_TTL,
        beat: BEAT,
        window,
    };

    let (middle_at, started) = (middle.cpu_seconds()?, Instant::now());
    let start = fleet(effort.start_window).run(None).await;
    let middle_cpu = middle.cpu_seconds()? - middle_at;
    settle(etcd).await?;
    let at_start = EtcdLoad::read(etcd)?;
    let start = Phase {
        fleet: start,
        etcd: at_start.since(&before),
        middle_cpu,
        seconds: started.elapsed().as_secs_f64(),
    };

    let connected = connect_many(middle.endpoint(), credentials, effort.processes).await?;
    settle(etcd).await?;
    let steady_before = EtcdLoad::read(etcd)?;
    let (middle_at, started) = (middle.cpu_seconds()?, Instant::now());
    let steady = fleet(effort.steady_window).run(Some(connected)).await;
    let steady = Phase {
        fleet: steady,
        middle_cpu: middle.cpu_seconds()? - middle_at,
        seconds: started.elapsed().as_secs_f64(),
        etcd: EtcdLoad::read(etcd)?.since(&steady_before),
    };
    drop(middle);
    let total = EtcdLoad::read(etcd)?.since(&before);
    eprintln!(
        "regcache-bench: etcd_api fleet, {}: {:.1} s from start to quiet, {:.1} s steady, {:.1} s in all",
        LABELS[arm],
        start.seconds,
        steady.seconds,
        began.elapsed().as_secs_f64()
    );
    Ok(Some(FleetRun {
        start,
        steady,
        keepalive_streams: total.keepalive_streams,
        watch_streams: total.watch_streams,
    }))
}

async fn fleet_part(
    etcd: &EtcdCluster,
    credentials: &[Credential],
    effort: Effort,
    built: bool,
) -> anyhow::Result<Part> {
    // The errors each arm's processes saw in its first start, for the notes.
    let mut errors: [Option<Vec<(String, u64)>>; ARMS] = [None, None, None];
    let runs: Rounds<Option<FleetRun>, ARMS> = rounds(effort.fleet_rounds, async |a| {
        let run = fleet_arm(etcd, a, credentials, effort, built).await;
        if let Ok(Some(run)) = &run {
            errors[a].get_or_insert_with(|| run.start.fleet.top_errors(3));
        }
        run
    })
    .await
    .transpose()?;
    let arms: Vec<usize> = (0..ARMS).filter(|&a| a != ENDPOINT || built).collect();
    let processes = effort.processes;
    let mut rows = Vec::new();
    let per = |a: usize, f: &dyn Fn(&FleetRun) -> f64| runs.per_round(|r| f(arm(r, a)));
    let failures = |o: &FleetOutcome| {
        (o.keepalives_failed + o.registration_failures + o.connect_failures) as f64
    };
    for &a in &arms {
        let label = LABELS[a];
        rows.push(Row::rounds(
            format!("start, {label}: processes registered at the end (of {processes})"),
            per(a, &|r| r.start.fleet.registered_at_end as f64),
            "",
        ));
        let registered_all = per(a, &|r| r.start.fleet.registration_times.len() as f64).min;
        if registered_all >= processes as f64 {
            rows.push(Row::rounds(
                format!("start, {label}: slowest first registration"),
                per(a, &|r| {
                    r.start
                        .fleet
                        .registration_times
                        .last()
                        .map_or(0.0, Duration::as_secs_f64)
                }),
                "s",
            ));
        }
        let mut authenticate = Row::rounds(
            format!("start, {label}: Authenticate calls reaching etcd"),
            per(a, &|r| r.start.etcd.authenticate),
            "",
        );
        if a == ENDPOINT {
            // One per distinct credential: the processes' and the host's own.
            authenticate = authenticate.at_most((USERS + 1) as f64);
        }
        rows.push(authenticate);
        rows.push(Row::rounds(
            format!("start, {label}: etcd CPU until etcd is quiet again"),
            per(a, &|r| r.start.etcd.cpu_seconds),
            "CPU s",
        ));
        rows.push(Row::rounds(
            format!("start, {label}: connects, registrations and keep-alives failed"),
            per(a, &|r| failures(&r.start.fleet)),
            "",
        ));
    }
    for &a in &arms {
        let label = LABELS[a];
        let mut keepalives = Row::rounds(
            format!("steady, {label}: LeaseKeepAlive streams reaching etcd (whole run)"),
            per(a, &|r| r.keepalive_streams),
            "",
        );
        let mut watches = Row::rounds(
            format!("steady, {label}: Watch streams reaching etcd (whole run)"),
            per(a, &|r| r.watch_streams),
            "",
        );
        if a == ENDPOINT {
            // The host's own lease stream and watch, opened when it starts.
            keepalives = keepalives.at_most(1.0);
            watches = watches.at_most(1.0);
        }
        rows.extend([keepalives, watches]);
        rows.push(Row::rounds(
            format!("steady, {label}: processes registered at the end (of {processes})"),
            per(a, &|r| r.steady.fleet.registered_at_end as f64),
            "",
        ));
        rows.push(Row::rounds(
            format!("steady, {label}: one-shot keep-alives answered"),
            per(a, &|r| r.steady.fleet.keepalives_ok as f64),
            "",
        ));
        rows.push(Row::rounds(
            format!("steady, {label}: LeaseGrant and Range calls reaching etcd"),
            per(a, &|r| r.steady.etcd.lease_grants + r.steady.etcd.ranges),
            "",
        ));
        rows.push(Row::rounds(
            format!("steady, {label}: etcd CPU per second"),
            per(a, &|r| r.steady.etcd.cpu_seconds / r.steady.seconds),
            "CPU s/s",
        ));
        if a != DIRECT {
            rows.push(Row::rounds(
                format!("steady, {label}: CPU of the {label} process per second"),
                per(a, &|r| r.steady.middle_cpu / r.steady.seconds),
                "CPU s/s",
            ));
        }
        rows.push(Row::rounds(
            format!("steady, {label}: registrations, keep-alives and deregistrations failed"),
            per(a, &|r| {
                failures(&r.steady.fleet)
                    + (r.steady.fleet.registration_times.len() - r.steady.fleet.deregistered) as f64
            }),
            "",
        ));
    }
    let last = *arms.last().expect("arms");
    for &a in &arms[..arms.len() - 1] {
        let ratio =
            |f: fn(&FleetRun) -> f64| runs.per_round(|r| f(arm(r, a)) / f(arm(r, last)).max(1e-3));
        rows.push(Row::rounds(
            format!("start: etcd CPU, {} / {}", LABELS[a], LABELS[last]),
            ratio(|r| r.start.etcd.cpu_seconds),
            "x",
        ));
        rows.push(Row::rounds(
            format!("steady: etcd CPU, {} / {}", LABELS[a], LABELS[last]),
            ratio(|r| r.steady.etcd.cpu_seconds / r.steady.seconds),
            "x",
        ));
    }
    let mut notes = Vec::new();
    for &a in &arms {
        let listed: Vec<String> = errors[a]
            .iter()
            .flatten()
            .map(|(e, n)| format!("{n} × `{e}`"))
            .collect();
        if !listed.is_empty() {
            notes.push(format!(
                "Fleet start, {}: errors the processes saw in round 1 (most frequent): {}.",
                LABELS[a],
                listed.join("; ")
            ));
        }
    }
    Ok(Part { rows, notes })
}

/// CPU seconds used so far by etcd, by the process in between and by this benchmark (the
/// client).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    etcd: f64,
    middle: f64,
    client: f64,
}

impl Cpu {
    fn read(etcd: &EtcdCluster, middle: Option<&Middle>) -> anyhow::Result<Cpu> {
        let pid = etcd
            .pid(0)
            .ok_or_else(|| anyhow::anyhow!("etcd is not running"))?;
        Ok(Cpu {
            etcd: cpu_seconds(pid)?,
            middle: middle.map_or(Ok(0.0), Middle::cpu_seconds)?,
            client: cpu_seconds(std::process::id())?,
        })
    }

    fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            etcd: self.etcd - earlier.etcd,
            middle: self.middle - earlier.middle,
            client: self.client - earlier.client,
        }
    }
}

/// One arm's Ranges in one round, and the CPU they cost.
struct RangeRun {
    outcome: Outcome,
    cpu: Cpu,
}

async fn range_part(
    etcd: &EtcdCluster,
    middles: &[Option<Middle>; ARMS],
    clients: &[Option<Client>; ARMS],
    effort: Effort,
) -> anyhow::Result<Vec<Row>> {
    let prefix = format!("{PREFIX}{CALLED}/");
    // Until each arm answers with every node: the host fills its cache on the first lookup.
    for (a, client) in clients.iter().enumerate() {
        let Some(client) = client else { continue };
        let ready = eventually(Duration::from_secs(20), || {
            let (mut kv, prefix) = (client.kv_client(), prefix.clone());
            async move {
                let options = GetOptions::new().with_prefix().with_serializable();
                kv.get(prefix, Some(options))
                    .await
                    .is_ok_and(|r| r.kvs().len() == NODES)
            }
        })
        .await;
        anyhow::ensure!(ready, "{} did not list {CALLED}'s {NODES} nodes", LABELS[a]);
    }
    let outcomes: Rounds<Option<RangeRun>, ARMS> = rounds(effort.range_rounds, async |a| {
        let Some(client) = &clients[a] else {
            return Ok(None);
        };
        let before = Cpu::read(etcd, middles[a].as_ref())?;
        let outcome = ranges(client, &prefix, RANGE_CALLERS, effort.range_window, None).await;
        let cpu = Cpu::read(etcd, middles[a].as_ref())?.since(&before);
        anyhow::Ok(Some(RangeRun { outcome, cpu }))
    })
    .await
    .transpose()?;
    let mut rows = Vec::new();
    let ms = |a: usize, q: f64| outcomes.per_round(|r| arm(r, a).outcome.p(q).as_secs_f64() * 1e3);
    for a in (0..ARMS).filter(|&a| clients[a].is_some()) {
        let label = LABELS[a];
        rows.push(Row::rounds(
            format!("ranges, {label}: Ranges/s"),
            outcomes.per_round(|r| arm(r, a).outcome.rate()),
            "/s",
        ));
        // Where the two cores went: client and servers share them, so a server that costs
        // little leaves the client as the bound.
        let per_range = |cpu: fn(&Cpu) -> f64| {
            outcomes.per_round(move |r| {
                let run = arm(r, a);
                cpu(&run.cpu) * 1e6 / (run.outcome.ok + run.outcome.failed).max(1) as f64
            })
        };
        rows.push(Row::rounds(
            format!("ranges, {label}: etcd CPU per Range"),
            per_range(|c| c.etcd),
            "µs",
        ));
        if a != DIRECT {
            rows.push(Row::rounds(
                format!("ranges, {label}: {label} CPU per Range"),
                per_range(|c| c.middle),
                "µs",
            ));
        }
        rows.push(Row::rounds(
            format!("ranges, {label}: client (this benchmark) CPU per Range"),
            per_range(|c| c.client),
            "µs",
        ));
        rows.push(Row::rounds(
            format!("ranges, {label}: p50"),
            ms(a, 0.5),
            "ms",
        ));
        rows.push(Row::rounds(
            format!("ranges, {label}: p99"),
            ms(a, 0.99),
            "ms",
        ));
        rows.push(Row::new(
            format!("ranges, {label}: failed, worst round"),
            outcomes.per_round(|r| arm(r, a).outcome.failed as f64).max,
            "",
        ));
    }
    let ratio = |a: usize, b: usize| {
        outcomes.per_round(|r| arm(r, a).outcome.rate() / arm(r, b).outcome.rate().max(1e-9))
    };
    rows.push(Row::rounds(
        "ranges: grpc-proxy / etcd direct",
        ratio(PROXY, DIRECT),
        "x",
    ));
    if clients[ENDPOINT].is_some() {
        rows.push(
            Row::rounds(
                "ranges: regcache endpoint / etcd direct",
                ratio(ENDPOINT, DIRECT),
                "x",
            )
            .at_least(5.0),
        );
        rows.push(Row::rounds(
            "ranges: regcache endpoint / grpc-proxy",
            ratio(ENDPOINT, PROXY),
            "x",
        ));
    }
    Ok(rows)
}

/// Which events of a watch are counted.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Put,
    Delete,
}

/// Events of `kind` each arm's watchers have received so far, summed over its watchers.
fn received(watchers: &[Option<Watchers>; ARMS], kind: Kind) -> [u64; ARMS] {
    std::array::from_fn(|a| {
        watchers[a].as_ref().map_or(0, |w| match kind {
            Kind::Put => w.puts(),
            Kind::Delete => w.deletes(),
        })
    })
}

/// Waits until the direct watchers have received `count` more events of `kind` each than
/// `before` (etcd always sends them), then until every arm's watchers have, at most
/// [`BURST_SETTLE`] more; the whole of it when `full` (an arm expected to send none must be
/// given all the time the others had). Returns the events each arm delivered per watcher.
async fn await_events(
    watchers: &[Option<Watchers>; ARMS],
    kind: Kind,
    before: &[u64; ARMS],
    count: u64,
    full: bool,
) -> [f64; ARMS] {
    let complete = |a: usize| {
        watchers[a]
            .as_ref()
            .is_none_or(|w| received(watchers, kind)[a] >= before[a] + count * w.len() as u64)
    };
    eventually(Duration::from_secs(10), || {
        std::future::ready(complete(DIRECT))
    })
    .await;
    if full {
        tokio::time::sleep(BURST_SETTLE).await;
    } else {
        eventually(BURST_SETTLE, || std::future::ready((0..ARMS).all(complete))).await;
    }
    let now = received(watchers, kind);
    std::array::from_fn(|a| {
        watchers[a]
            .as_ref()
            .map_or(f64::NAN, |w| (now[a] - before[a]) as f64 / w.len() as f64)
    })
}

/// How many nodes of the burst service each arm lists (go-micro's `GetService`).
async fn listed(clients: &[Option<Client>; ARMS]) -> [f64; ARMS] {
    let mut counts = [f64::NAN; ARMS];
    for (a, client) in clients.iter().enumerate() {
        if let Some(client) = client {
            let options = GetOptions::new().with_prefix().with_serializable();
            let answer = client
                .kv_client()
                .get(format!("{PREFIX}{BURST}/"), Some(options))
                .await;
            counts[a] = answer.map_or(f64::NAN, |r| r.kvs().len() as f64);
        }
    }
    counts
}

async fn burst_part(
    root: &mut Client,
    middles: &[Option<Middle>; ARMS],
    clients: &[Option<Client>; ARMS],
    credentials: &[Credential],
    effort: Effort,
) -> anyhow::Result<Vec<Row>> {
    let mut leases = Vec::with_capacity(NODES);
    for n in 0..NODES {
        leases.push(register_burst_node(root, n).await?);
    }
    // Looked up first through each arm, as go-micro's cache does before it watches: the host
    // guards the nodes of a service it has cached.
    listed(clients).await;
    let prefix = format!("{PREFIX}{BURST}/");
    // The Watch streams each arm opens at etcd are counted by the fleet, where one arm runs
    // at a time: here the proxy keeps opening watches at etcd while the others' are created.
    let mut watchers: [Option<Watchers>; ARMS] = [None, None, None];
    for (a, middle) in middles.iter().enumerate() {
        let Some(middle) = middle else { continue };
        watchers[a] =
            Some(Watchers::start(middle.endpoint(), credentials, effort.watchers, &prefix).await?);
    }
    // The control: one deregistration, which every arm should deliver, and its return.
    let last = NODES - 1;
    let before = received(&watchers, Kind::Delete);
    root.lease_revoke(leases[last]).await?;
    let control = await_events(&watchers, Kind::Delete, &before, 1, false).await;
    let before = received(&watchers, Kind::Put);
    leases[last] = register_burst_node(root, last).await?;
    await_events(&watchers, Kind::Put, &before, 1, false).await;

    let mut delivered = Vec::new();
    let mut nodes_after = Vec::new();
    let mut returned = Vec::new();
    for _ in 0..effort.burst_rounds {
        // Past the host's batching of the previous removals and puts.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = received(&watchers, Kind::Delete);
        let lost: Vec<_> = (1..=BURST_LOST)
            .map(|n| {
                let (mut client, lease) = (root.clone(), leases[n]);
                tokio::spawn(async move { client.lease_revoke(lease).await })
            })
            .collect();
        for revoke in lost {
            revoke.await??;
        }
        let lost = BURST_LOST as u64;
        delivered.push(await_events(&watchers, Kind::Delete, &before, lost, true).await);
        nodes_after.push(listed(clients).await);
        let before = received(&watchers, Kind::Put);
        for (n, lease) in leases.iter_mut().enumerate().skip(1).take(BURST_LOST) {
            *lease = register_burst_node(root, n).await?;
        }
        returned.push(await_events(&watchers, Kind::Put, &before, lost, false).await);
    }
    for lease in leases {
        root.lease_revoke(lease).await?;
    }
    drop(watchers);

    let delivered = simultaneous(&delivered);
    let nodes_after = simultaneous(&nodes_after);
    let returned = simultaneous(&returned);
    let mut rows = Vec::new();
    for a in (0..ARMS).filter(|&a| middles[a].is_some()) {
        let label = LABELS[a];
        rows.push(Row::new(
            format!("burst, {label}: deletes per watcher after one deregistration (control)"),
            control[a],
            "",
        ));
        let mut burst = Row::rounds(
            format!(
                "burst, {label}: deletes per watcher after {BURST_LOST} of {NODES} leases lost"
            ),
            delivered.per_round(|r| r[a]),
            "",
        );
        if a == ENDPOINT {
            burst = burst.at_most(0.0);
        }
        rows.push(burst);
        rows.push(Row::rounds(
            format!("burst, {label}: nodes listed right after the burst (of {NODES})"),
            nodes_after.per_round(|r| r[a]),
            "",
        ));
        rows.push(Row::rounds(
            format!("burst, {label}: puts per watcher when the {BURST_LOST} nodes come back"),
            returned.per_round(|r| r[a]),
            "",
        ));
    }
    Ok(rows)
}

/// The paced Range load on every arm at once, the arms' sends interleaved in time.
async fn paced(clients: &[Option<Client>; ARMS], window: Duration) -> [Option<Outcome>; ARMS] {
    let prefix = format!("{PREFIX}{CALLED}/");
    let load = |a: usize| {
        let prefix = prefix.clone();
        let pace = Pace {
            every: FREEZE_PACE,
            phase: a as f64 / ARMS as f64,
        };
        async move {
            match &clients[a] {
                Some(client) => {
                    Some(ranges(client, &prefix, FREEZE_CALLERS, window, Some(pace)).await)
                }
                None => None,
            }
        }
    };
    let (direct, proxy, endpoint) = tokio::join!(load(DIRECT), load(PROXY), load(ENDPOINT));
    [direct, proxy, endpoint]
}

async fn freeze_part(
    etcd: &EtcdCluster,
    clients: &[Option<Client>; ARMS],
    effort: Effort,
) -> anyhow::Result<Vec<Row>> {
    let running = paced(clients, effort.reference).await;
    etcd.stop(0)?;
    // Callers stop sending when the window ends; etcd stays frozen until the Ranges in flight
    // are answered or time out (go-micro's 5 s), so that none is answered by a thawed etcd.
    let frozen = paced(clients, effort.freeze).await;
    etcd.cont(0)?;
    let mut rows = Vec::new();
    for a in (0..ARMS).filter(|&a| clients[a].is_some()) {
        let label = LABELS[a];
        let (running, frozen) = (arm(&running, a), arm(&frozen, a));
        let sent = (frozen.ok + frozen.failed).max(1) as f64;
        let ms = |o: &Outcome, q: f64| o.p(q).as_secs_f64() * 1e3;
        let mut answered = Row::new(
            format!("freeze, {label}: Ranges answered while etcd is frozen"),
            frozen.ok as f64 * 100.0 / sent,
            "%",
        );
        let mut p99 = Row::new(
            format!("freeze, {label}: p99, etcd frozen"),
            ms(frozen, 0.99),
            "ms",
        );
        if a == ENDPOINT {
            answered = answered.at_least(100.0);
            p99 = p99.at_most(1.0);
        }
        rows.push(Row::new(
            format!("freeze, {label}: Ranges sent while etcd is frozen"),
            sent,
            "",
        ));
        rows.push(answered);
        rows.push(Row::new(
            format!("freeze, {label}: p50, etcd frozen"),
            ms(frozen, 0.5),
            "ms",
        ));
        rows.push(p99);
        rows.push(Row::new(
            format!("freeze, {label}: max, etcd frozen"),
            ms(frozen, 1.0),
            "ms",
        ));
        rows.push(Row::new(
            format!("freeze, {label}: p99, etcd running (same load)"),
            ms(running, 0.99),
            "ms",
        ));
    }
    Ok(rows)
}
