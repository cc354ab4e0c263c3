//! Cache penetration (scenario 4): 1,000 concurrent lookups of one uncached service with etcd
//! healthy and with etcd down, and a flood of distinct unknown names; etcd's Range requests
//! counted by etcd itself (healthy) or by the cache (down).

use std::time::Instant;

use regcache::registry::Registry;

use regcache_tests::cache::{cache, engine, ranges, registry, spec};
use regcache_tests::etcd::EtcdCluster;

use crate::report::{Row, Section};

const CONCURRENT: usize = 1_000;
const BUDGET: u32 = 50;

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let flood = if quick { 2_000 } else { 10_000 };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut etcd = EtcdCluster::start(1).await?;
        let registry = registry(&etcd).await;
        registry
            .register(&regcache_tests::registry::service("hot", "1", "hot-1"))
            .await?;
        let budget = BUDGET.to_string();
        let engine = engine(spec("default", &[("registry-budget-per-second", &budget)]));
        let cache = cache(registry.clone(), &engine);

        // 1,000 concurrent lookups of an uncached service, etcd healthy.
        let before = ranges(&etcd);
        let lookups: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.lookup("hot").await.is_ok() })
            })
            .collect();
        let mut answered = 0;
        for lookup in lookups {
            answered += u64::from(lookup.await?);
        }
        let healthy_ranges = ranges(&etcd) - before;

        // A flood of distinct unknown names: each is a miss nothing can share.
        let before = ranges(&etcd);
        let started = Instant::now();
        let lookups: Vec<_> = (0..flood)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.lookup(&format!("unknown-{i}")).await.is_ok() })
            })
            .collect();
        for lookup in lookups {
            lookup.await?;
        }
        let flood_seconds = started.elapsed().as_secs_f64();
        let flood_ranges = ranges(&etcd) - before;
        // The bucket holds one second of budget, then refills at the budget rate.
        let allowed = BUDGET as f64 * (1.0 + flood_seconds);

        // etcd down, nothing cached: 1,000 concurrent lookups of another service.
        etcd.kill(0)?;
        let requests_before = cache.stats().get_service.total();
        let lookups: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.lookup("cold-while-down").await.is_ok() })
            })
            .collect();
        for lookup in lookups {
            lookup.await?;
        }
        let down_requests = cache.stats().get_service.total() - requests_before;
        registry.shutdown().await;

        Ok(Section {
            title: "Penetration: concurrent misses and a flood of unknown names".into(),
            measured:
                "in process: the cache's lookups called directly against a real etcd, no HTTP"
                    .into(),
            rows: vec![
                Row::new(
                    format!("{CONCURRENT} concurrent lookups of an uncached service: answered"),
                    answered as f64,
                    "",
                ),
                Row::new(
                    "... etcd Range requests (etcd healthy)",
                    healthy_ranges as f64,
                    "",
                )
                .at_most(1.0),
                Row::new(
                    format!("... registry requests with etcd down ({CONCURRENT} lookups)"),
                    down_requests as f64,
                    "",
                )
                .at_most(1.0),
                Row::new(
                    format!("flood of {flood} distinct unknown names: etcd Range requests"),
                    flood_ranges as f64,
                    "",
                ),
                Row::new("... flood duration", flood_seconds, "s"),
                Row::new(
                    format!("... Ranges the budget allows ({BUDGET}/s, one second of burst)"),
                    allowed,
                    "",
                ),
                Row::new("... Ranges / allowed", flood_ranges as f64 / allowed, "x").at_most(1.0),
            ],
            notes: vec![],
        })
    })
}
