//! Lookups (scenario 2): the same read served by `regcache run` over HTTP
//! (`GET /v1/services/{name}`) and by etcd itself, over its native gRPC (a prefix Range,
//! serializable: go-micro's `GetService`) and over its JSON gateway (`POST /v3/kv/range`). The
//! same concurrency and closed-loop callers on every side, interleaved round by round.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hyper::Method;
use hyper::body::Bytes;
use regcache::registry::Registry;
use regcache_tests::cache::registry;
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::service;
use regcache_tests::wait::eventually;

use crate::compare::{Rounds, rounds};
use crate::host::Host;
use crate::load::{self, Outcome, Target};
use crate::range_load::RangeLoad;
use crate::report::{Row, Section};

/// Concurrent callers on every side: HTTP connections to regcache and to the gateway, gRPC
/// callers to etcd.
const CALLERS: usize = 32;
/// The gRPC callers share one connection, as the goroutines of one go-micro process do (HTTP/2
/// multiplexes them). Of 1, 4 and 32 connections tried here, one gave etcd its best rate.
const GRPC_CONNECTIONS: usize = 1;
const PREFIX: &str = "/micro/registry/greeter/";

// The arms of each round.
const REGCACHE: usize = 0;
const GRPC: usize = 1;
const GATEWAY: usize = 2;

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let (count, window) = if quick {
        (2, Duration::from_millis(500))
    } else {
        (8, Duration::from_secs(3))
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = EtcdCluster::start(1).await?;
        let registry = registry(&etcd).await;
        for n in 0..3 {
            registry
                .register(&service("greeter", "1.0.0", &format!("greeter-{n}")))
                .await?;
        }
        let host = Host::start(&["--etcd-endpoints", &etcd.endpoints().join(",")]).await?;
        let lookup = Target::get(host.addr, "/v1/services/greeter");
        let ready = eventually(Duration::from_secs(20), || {
            let lookup = lookup.clone();
            async move { load::run(&lookup, 1, Duration::from_millis(10)).await.ok > 0 }
        })
        .await;
        anyhow::ensure!(ready, "regcache did not answer lookups");

        let range_end = "/micro/registry/greeter0"; // the prefix with its last byte + 1
        let gateway = Target {
            addr: etcd.endpoint(0).trim_start_matches("http://").parse()?,
            method: Method::POST,
            paths: vec!["/v3/kv/range".into()],
            body: Bytes::from(format!(
                r#"{{"key":"{}","range_end":"{}","serializable":true}}"#,
                STANDARD.encode(PREFIX),
                STANDARD.encode(range_end)
            )),
        };
        let grpc = RangeLoad::connect(&etcd.endpoint(0), PREFIX, GRPC_CONNECTIONS).await?;

        let outcomes: Rounds<Outcome, 3> = rounds(count, async |arm| match arm {
            REGCACHE => load::run(&lookup, CALLERS, window).await,
            GRPC => grpc.run(CALLERS, window).await,
            _ => load::run(&gateway, CALLERS, window).await,
        })
        .await;
        registry.shutdown().await;

        let rate = |arm: usize| outcomes.per_round(|r| r[arm].rate());
        let ratio = |arm: usize| outcomes.per_round(|r| r[REGCACHE].rate() / r[arm].rate().max(1e-9));
        let ms = |arm: usize, q: f64| outcomes.per_round(|r| r[arm].p(q).as_secs_f64() * 1e3);
        let worst_failed = |arm: usize| outcomes.per_round(|r| r[arm].failed as f64).max;
        Ok(Section {
            title: format!(
                "Lookups: regcache over HTTP vs etcd over gRPC and its JSON gateway ({CALLERS} callers each)"
            ),
            measured: format!(
                "on loopback with closed-loop clients, {CALLERS} callers per side: regcache over \
                 HTTP/1.1 keep-alive and the JSON gateway with the bench's hyper client (load.rs), \
                 etcd's gRPC with etcd-client, the callers multiplexed on {GRPC_CONNECTIONS} HTTP/2 connection(s) (range_load.rs); the three \
                 arms interleaved round by round, {:.1} s each",
                window.as_secs_f64()
            ),
            rows: vec![
                Row::rounds("regcache (HTTP): lookups/s", rate(REGCACHE), "/s"),
                Row::rounds("etcd gRPC: Ranges/s (serializable)", rate(GRPC), "/s"),
                Row::rounds("etcd JSON gateway: Ranges/s (serializable)", rate(GATEWAY), "/s"),
                Row::rounds("regcache / etcd gRPC", ratio(GRPC), "x").at_least(5.0),
                Row::rounds("regcache / etcd JSON gateway", ratio(GATEWAY), "x"),
                Row::rounds("regcache: p50", ms(REGCACHE, 0.5), "ms"),
                Row::rounds("regcache: p99", ms(REGCACHE, 0.99), "ms"),
                Row::rounds("etcd gRPC: p50", ms(GRPC, 0.5), "ms"),
                Row::rounds("etcd gRPC: p99", ms(GRPC, 0.99), "ms"),
                Row::rounds("etcd JSON gateway: p50", ms(GATEWAY, 0.5), "ms"),
                Row::rounds("etcd JSON gateway: p99", ms(GATEWAY, 0.99), "ms"),
                Row::new("regcache: failed requests, worst round", worst_failed(REGCACHE), ""),
                Row::new("etcd gRPC: failed requests, worst round", worst_failed(GRPC), ""),
            ],
            notes: vec![
                "The load generator runs on the same cores as the servers it measures.".into(),
            ],
        })
    })
}
