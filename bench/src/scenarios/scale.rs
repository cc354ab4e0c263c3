//! Scale and memory (scenario 7): 10,000 services x 10 nodes in etcd, every service looked up
//! through a `regcache run` host; its resident memory, its lookup rate over all services, and
//! how long a registration takes to reach its cache through the watch (no refresh).

use std::time::{Duration, Instant};

use etcd_client::Client;
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::{fill_scale, scale_value};

use crate::host::Host;
use crate::load::{self, Target, Until, percentile};
use crate::report::{Row, Section};

const NODES: usize = 10;
const MIB: f64 = 1024.0 * 1024.0;

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let services = if quick { 500 } else { 10_000 };
    let updates = if quick { 10 } else { 100 };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = EtcdCluster::start(1).await?;
        let mut client = Client::connect(etcd.endpoints(), None).await?;
        fill_scale(&mut client, services, NODES).await?;
        let host = Host::start(&[
            "--etcd-endpoints",
            &etcd.endpoints().join(","),
            // Filling the cache asks etcd once per service: let the budget allow it (past the
            // operator's default ceiling).
            "--policy-config",
            "registry-budget-per-second=100000",
            "--policy-limits-max-registry-budget",
            "100000",
        ])
        .await?;
        let rss_started = host.rss_bytes()?;
        let paths: Vec<String> = (0..services).map(|s| format!("/v1/services/svc-{s:05}")).collect();
        let all = Target { paths, ..Target::get(host.addr, "") };
        let filled = Instant::now();
        let warm = load::drive(&all, 16, Until::EachPathOnce).await;
        let fill_seconds = filled.elapsed().as_secs_f64();
        anyhow::ensure!(warm.failed == 0, "{} lookups failed while filling the cache", warm.failed);
        let rss_cached = host.rss_bytes()?;
        let rate = load::run(&all, 32, Duration::from_secs(if quick { 1 } else { 10 })).await;

        // A new node, written straight to etcd, reaches the cached answer through the watch.
        let mut latencies = Vec::with_capacity(updates);
        for i in 0..updates {
            let service = format!("svc-{:05}", i % services);
            let node = format!("{service}-new-{i}");
            let path = format!("/v1/services/{service}");
            let lookup = Target::get(host.addr, path);
            let written = Instant::now();
            client
                .put(format!("/micro/registry/{service}/{node}"), scale_value(&service, &node), None)
                .await?;
            let deadline = written + Duration::from_secs(10);
            loop {
                let seen = body_contains(&lookup, &node).await;
                if seen {
                    latencies.push(written.elapsed());
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "{node} never reached the cache");
            }
        }
        latencies.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok(Section {
            title: format!("Scale and memory: {services} services x {NODES} nodes, all looked up through `regcache run`"),
            measured: "over HTTP/1.1 against `regcache run`, with the bench's closed-loop client (load.rs); RSS from /proc".into(),
            rows: vec![
                Row::new("host RSS after start (etcd mirror loaded)", rss_started as f64 / MIB, "MiB"),
                Row::new("host RSS with every service cached", rss_cached as f64 / MIB, "MiB").at_most(64.0),
                Row::new("filling the cache (one lookup per service, 16 connections)", fill_seconds, "s"),
                Row::new("lookups/s over all services (32 connections)", rate.rate(), "/s"),
                Row::new("lookup p99 over all services", ms(rate.p(0.99)), "ms"),
                Row::new("watch-driven update reaches the cache: p50", ms(percentile(&latencies, 0.5)), "ms"),
                Row::new("watch-driven update reaches the cache: p99", ms(percentile(&latencies, 0.99)), "ms"),
            ],
            notes: vec![format!(
                "Update latency is from the etcd put returning to the first lookup that shows the node \
                 ({updates} updates, polled over HTTP)."
            )],
        })
    })
}

/// Whether `GET` of the target's path answers a body containing `needle`.
async fn body_contains(target: &Target, needle: &str) -> bool {
    load::body(target)
        .await
        .is_some_and(|body| body.contains(needle))
}
