//! Outage (scenario 3): what a caller of `regcache run` sees over HTTP while etcd is frozen with
//! SIGSTOP, against the same load with etcd running, interleaved round by round. The default
//! policy, then a host running a policy that behaves like go-micro's cache after its fix (the
//! first caller after expiry waits for etcd's timeout), same load, same run.

use std::time::Duration;

use etcd_client::Client;
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::policies::policy_path;
use regcache_tests::registry::fill_scale;

use crate::compare::{Rounds, rounds};
use crate::host::Host;
use crate::load::{self, Outcome, Target};
use crate::report::{Row, Section};

const SERVICES: usize = 20;
const CALLERS: usize = 50;
/// Short enough that every entry expires within a frozen window.
const POLICY_CONFIG: &[&str] = &["ttl-ms=1000", "max-wait-ms=2000"];

// The arms of each round.
const RUNNING: usize = 0;
const FROZEN: usize = 1;

/// One window of load.
struct Window {
    outcome: Outcome,
    /// Registry requests the host sent in the window (its own count: requests sent to a frozen
    /// etcd are not reliably counted by etcd itself).
    registry_requests: f64,
}

/// The host's count of registry reads, from its `/metrics`.
async fn registry_reads(metrics: &Target) -> anyhow::Result<f64> {
    let text = load::body(metrics)
        .await
        .ok_or_else(|| anyhow::anyhow!("no /metrics"))?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("regcache_registry_requests") && l.contains("get_service"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum())
}

/// Rounds of `window` with etcd running and `window` with etcd frozen, against a host with
/// `policy` (None: the embedded default).
async fn rounds_of(
    etcd: &EtcdCluster,
    policy: Option<&str>,
    count: usize,
    window: Duration,
) -> anyhow::Result<Rounds<Window, 2>> {
    let endpoints = etcd.endpoints().join(",");
    let path = policy.map(|p| policy_path(p).display().to_string());
    let mut args = vec![
        "--etcd-endpoints",
        &endpoints,
        "--etcd-request-timeout",
        "2s",
    ];
    for pair in POLICY_CONFIG {
        args.extend(["--policy-config", pair]);
    }
    if let Some(path) = &path {
        args.extend(["--policy-file", path]);
    }
    let host = Host::start(&args).await?;
    let lookups = Target {
        paths: (0..SERVICES)
            .map(|s| format!("/v1/services/svc-{s:05}"))
            .collect(),
        ..Target::get(host.addr, "")
    };
    let metrics = Target::get(host.addr, "/metrics");
    // Cache every service before the first round.
    load::drive(&lookups, 1, load::Until::EachPathOnce).await;
    let measured = rounds(count, async |arm| {
        if arm == RUNNING {
            let outcome = load::run(&lookups, CALLERS, window).await;
            return Ok(Window {
                outcome,
                registry_requests: 0.0,
            });
        }
        let before = registry_reads(&metrics).await?;
        etcd.stop(0)?;
        let outcome = load::run(&lookups, CALLERS, window).await;
        let after = registry_reads(&metrics).await;
        etcd.cont(0)?; // before anything can fail: later rounds need etcd back
        anyhow::Ok(Window {
            outcome,
            registry_requests: after? - before,
        })
    })
    .await;
    measured.transpose()
}

fn policy_rows(label: &str, rounds: &Rounds<Window, 2>, claims: bool) -> Vec<Row> {
    let ms = |arm: usize, q: f64| rounds.per_round(|r| r[arm].outcome.p(q).as_secs_f64() * 1e3);
    let answered = rounds
        .per_round(|r| {
            let o = &r[FROZEN].outcome;
            o.ok as f64 * 100.0 / (o.ok + o.failed).max(1) as f64
        })
        .min;
    let tail = rounds.per_round(|r| {
        r[FROZEN].outcome.p(0.999).as_secs_f64() / r[RUNNING].outcome.p(0.999).as_secs_f64()
    });
    let mut answered = Row::new(
        format!("{label}: lookups answered during the freeze, worst round"),
        answered,
        "%",
    );
    let mut tail = Row::rounds(format!("{label}: p99.9 frozen / p99.9 running"), tail, "x");
    if claims {
        answered = answered.at_least(100.0);
        tail = tail.at_most(1.5);
    }
    vec![
        Row::rounds(
            format!("{label}: lookups/s, etcd running"),
            rounds.per_round(|r| r[RUNNING].outcome.rate()),
            "/s",
        ),
        Row::rounds(
            format!("{label}: lookups/s, etcd frozen"),
            rounds.per_round(|r| r[FROZEN].outcome.rate()),
            "/s",
        ),
        answered,
        Row::rounds(
            format!("{label}: p99, etcd running"),
            ms(RUNNING, 0.99),
            "ms",
        ),
        Row::rounds(format!("{label}: p99, etcd frozen"), ms(FROZEN, 0.99), "ms"),
        Row::rounds(
            format!("{label}: p99.9, etcd running"),
            ms(RUNNING, 0.999),
            "ms",
        ),
        Row::rounds(
            format!("{label}: p99.9, etcd frozen"),
            ms(FROZEN, 0.999),
            "ms",
        ),
        tail,
        Row::new(
            format!("{label}: max, etcd running (all rounds)"),
            ms(RUNNING, 1.0).max,
            "ms",
        ),
        Row::new(
            format!("{label}: max, etcd frozen (all rounds)"),
            ms(FROZEN, 1.0).max,
            "ms",
        ),
        Row::rounds(
            format!("{label}: registry reads sent per frozen window"),
            rounds.per_round(|r| r[FROZEN].registry_requests),
            "",
        ),
    ]
}

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let (count, window) = if quick {
        (2, Duration::from_millis(1_500))
    } else {
        (4, Duration::from_secs(8))
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = EtcdCluster::start(1).await?;
        // Written without a lease: a lease would expire while etcd is frozen.
        fill_scale(
            &mut Client::connect(etcd.endpoints(), None).await?,
            SERVICES,
            3,
        )
        .await?;
        let default = rounds_of(&etcd, None, count, window).await?;
        let go_micro = rounds_of(&etcd, Some("go-micro"), count, window).await?;
        let mut rows = policy_rows("default policy", &default, true);
        rows.extend(policy_rows("go-micro after its fix", &go_micro, false));
        Ok(Section {
            title: format!(
                "Outage: etcd SIGSTOPped under HTTP load, {:.1} s frozen windows ({CALLERS} \
                 connections, {SERVICES} services, TTL 1 s, retry interval 5 s, etcd timeout 2 s)",
                window.as_secs_f64()
            ),
            measured: format!(
                "over HTTP/1.1 against `regcache run` with the bench's closed-loop client \
                 (load.rs, {CALLERS} keep-alive connections); per round {:.1} s with etcd \
                 running and {:.1} s with it frozen, the order alternating, {count} rounds per \
                 policy",
                window.as_secs_f64(),
                window.as_secs_f64()
            ),
            rows,
            notes: vec![
                "The load generator runs on the same cores as the host it measures: most of \
                 the HTTP latency, with or without the freeze, is the two sharing the CPU."
                    .into(),
            ],
        })
    })
}
