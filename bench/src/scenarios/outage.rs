//! Outage (scenario 3): services cached, then etcd frozen with SIGSTOP while lookups continue.
//! The default policy against a policy that behaves like go-micro's cache after its fix (the
//! first caller after expiry waits for etcd's timeout), same load, same run.

use std::time::{Duration, Instant};

use regcache::registry::Registry;
use regcache_tests::cache::{cache, engine, registry, spec};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::service;

use crate::load::percentile;
use crate::report::{Row, Section};

const SERVICES: usize = 20;
const CALLERS: usize = 50;
/// Short enough that every entry expires during the freeze.
const POLICY_CONFIG: &[(&str, &str)] = &[("ttl-ms", "1000"), ("max-wait-ms", "2000")];

struct Outcome {
    answered: u64,
    failed: u64,
    latencies: Vec<Duration>,
    registry_requests: u64,
}

async fn freeze_under_load(
    etcd: &EtcdCluster,
    policy: &str,
    freeze: Duration,
) -> anyhow::Result<Outcome> {
    let registry = registry(etcd).await;
    for s in 0..SERVICES {
        for n in 0..3 {
            registry
                .register(&service(
                    &format!("outage-{s}"),
                    "1",
                    &format!("{policy}-{n}"),
                ))
                .await?;
        }
    }
    let engine = engine(spec(policy, POLICY_CONFIG));
    let cache = cache(registry.clone(), &engine);
    for s in 0..SERVICES {
        cache.lookup(&format!("outage-{s}")).await?;
    }
    let requests_before = cache.stats().get_service.total();
    etcd.stop(0)?;
    let stopped = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut outcome = Outcome {
                    answered: 0,
                    failed: 0,
                    latencies: Vec::new(),
                    registry_requests: 0,
                };
                let mut i = c;
                while stopped.elapsed() < freeze {
                    let name = format!("outage-{}", i % SERVICES);
                    let started = Instant::now();
                    match cache.lookup(&name).await {
                        Ok(_) => outcome.answered += 1,
                        Err(_) => outcome.failed += 1,
                    }
                    outcome.latencies.push(started.elapsed());
                    i += 1;
                    tokio::task::yield_now().await;
                }
                outcome
            })
        })
        .collect();
    let mut total = Outcome {
        answered: 0,
        failed: 0,
        latencies: Vec::new(),
        registry_requests: 0,
    };
    for caller in callers {
        let part = caller.await?;
        total.answered += part.answered;
        total.failed += part.failed;
        total.latencies.extend(part.latencies);
    }
    total.registry_requests = cache.stats().get_service.total() - requests_before;
    etcd.cont(0)?;
    registry.shutdown().await;
    total.latencies.sort_unstable();
    Ok(total)
}

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let freeze = Duration::from_secs(if quick { 4 } else { 30 });
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = EtcdCluster::start(1).await?;
        let mut rows = Vec::new();
        for (policy, label) in [("default", "default policy"), ("go-micro", "go-micro after its fix")] {
            let outcome = freeze_under_load(&etcd, policy, freeze).await?;
            let share = outcome.answered as f64 / (outcome.answered + outcome.failed).max(1) as f64;
            let ms = |q: f64| percentile(&outcome.latencies, q).as_secs_f64() * 1e3;
            let (p50, p99, p999, max) = (ms(0.5), ms(0.99), ms(0.999), ms(1.0));
            let mut answered = Row::new(format!("{label}: lookups answered"), share * 100.0, "%");
            let mut tail = Row::new(format!("{label}: p99.9 latency"), p999, "ms");
            if policy == "default" {
                answered = answered.at_least(100.0);
                tail = tail.at_most(1.0);
            }
            rows.extend([
                Row::new(format!("{label}: lookups during the freeze"), (outcome.answered + outcome.failed) as f64, ""),
                answered,
                Row::new(format!("{label}: p50 latency"), p50, "ms"),
                Row::new(format!("{label}: p99 latency"), p99, "ms"),
                tail,
                Row::new(format!("{label}: max latency"), max, "ms"),
                Row::new(format!("{label}: registry requests attempted"), outcome.registry_requests as f64, ""),
            ]);
        }
        Ok(Section {
            title: format!(
                "Outage: etcd SIGSTOPped for {}s under load ({CALLERS} callers, {SERVICES} services, TTL 1 s, retry interval 5 s, etcd timeout 2 s)",
                freeze.as_secs()
            ),
            rows,
            notes: vec![
                "Registry requests are counted by the cache (requests sent to a frozen etcd are \
                 not reliably counted by etcd itself)."
                    .into(),
            ],
        })
    })
}
