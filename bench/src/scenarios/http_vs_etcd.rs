//! HTTP lookups (scenario 2): the same read served by `regcache run` (`GET /v1/services/{name}`)
//! and by etcd itself (its JSON gateway, `POST /v3/kv/range`, serializable), driven by the same
//! closed-loop client with the same concurrency, in the same run.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hyper::Method;
use hyper::body::Bytes;
use regcache::registry::Registry;
use regcache_tests::cache::registry;
use regcache_tests::etcd::{EtcdCluster, wait_for};
use regcache_tests::registry::service;

use crate::host::Host;
use crate::load::{self, Target};
use crate::report::{Row, Section};

const CONNECTIONS: usize = 32;

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let duration = Duration::from_secs(if quick { 1 } else { 10 });
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = EtcdCluster::start(1).await?;
        let registry = registry(&etcd).await;
        for n in 0..3 {
            registry.register(&service("greeter", "1.0.0", &format!("greeter-{n}"))).await?;
        }
        let host = Host::start(&["--etcd-endpoints", &etcd.endpoints().join(",")]).await?;
        let lookup = Target::get(host.addr, "/v1/services/greeter");
        let ready = wait_for(Duration::from_secs(20), || {
            let lookup = lookup.clone();
            async move { load::run(&lookup, 1, Duration::from_millis(10)).await.ok > 0 }
        })
        .await;
        anyhow::ensure!(ready, "regcache did not answer lookups");

        let key = "/micro/registry/greeter/";
        let range_end = "/micro/registry/greeter0"; // the prefix with its last byte + 1
        let gateway = Target {
            addr: etcd.endpoint(0).trim_start_matches("http://").parse()?,
            method: Method::POST,
            paths: vec!["/v3/kv/range".into()],
            body: Bytes::from(format!(
                r#"{{"key":"{}","range_end":"{}","serializable":true}}"#,
                STANDARD.encode(key),
                STANDARD.encode(range_end)
            )),
        };

        let ours = load::run(&lookup, CONNECTIONS, duration).await;
        let theirs = load::run(&gateway, CONNECTIONS, duration).await;
        registry.shutdown().await;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok(Section {
            title: format!("HTTP lookups: regcache vs etcd's JSON gateway ({CONNECTIONS} connections, {}s each)", duration.as_secs()),
            rows: vec![
                Row::new("regcache: lookups/s", ours.rate(), "/s"),
                Row::new("etcd gateway: ranges/s (serializable)", theirs.rate(), "/s"),
                Row::new("regcache / etcd", ours.rate() / theirs.rate().max(1e-9), "x").at_least(5.0),
                Row::new("regcache: p50", ms(ours.p(0.5)), "ms"),
                Row::new("regcache: p99", ms(ours.p(0.99)), "ms"),
                Row::new("etcd gateway: p50", ms(theirs.p(0.5)), "ms"),
                Row::new("etcd gateway: p99", ms(theirs.p(0.99)), "ms"),
                Row::new("regcache: failed requests", ours.failed as f64, ""),
            ],
            notes: vec!["The load generator runs on the same 2 cores as the server it measures.".into()],
        })
    })
}
