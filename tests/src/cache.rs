//! Helpers for the cache's end-to-end tests: policies with operator configuration, and a cache
//! over a real etcd registry driven by the wasm engine.

use std::sync::Arc;
use std::time::Duration;

use regcache::cache::RegistryCache;
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec};
use regcache::registry::Registry;
use regcache::registry::etcd::{EtcdConfig, EtcdRegistry};

use crate::etcd::EtcdCluster;
use crate::policies::policy_wasm;
use crate::registry::{fast_config, register_now, service};
use crate::wait::eventually;

/// The operator configuration `pairs` as the engine takes it.
pub fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Policy `name` (`default` is the embedded one) with `pairs` as its configuration.
pub fn spec(name: &str, pairs: &[(&str, &str)]) -> PolicySpec {
    if name == "default" {
        return PolicySpec::embedded_default(config(pairs));
    }
    PolicySpec {
        wasm: policy_wasm(name).into(),
        source: name.to_string(),
        config: config(pairs),
    }
}

/// An engine whose first policy is `spec`.
pub fn engine(spec: PolicySpec) -> PolicyEngine {
    PolicyEngine::new(EngineOptions::default(), spec).expect("policy loads")
}

/// A one-member etcd where another host (the returned registry, to be kept alive: it holds
/// the lease) registered `greeter`/`n1`.
pub async fn etcd_with_greeter() -> (EtcdCluster, Arc<EtcdRegistry>) {
    let etcd = EtcdCluster::start(1).await.expect("etcd starts");
    let publisher = registry(&etcd).await;
    register_now(&*publisher, &service("greeter", "1.0", "n1")).await;
    (etcd, publisher)
}

/// A registry on `etcd` with the fast test configuration, once its watch is connected.
pub async fn registry(etcd: &EtcdCluster) -> Arc<EtcdRegistry> {
    registry_with(fast_config(etcd)).await
}

/// A registry with `config`, once its watch is connected.
pub async fn registry_with(config: EtcdConfig) -> Arc<EtcdRegistry> {
    let registry = Arc::new(
        EtcdRegistry::connect(config)
            .await
            .expect("registry connects"),
    );
    let r = registry.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let r = r.clone();
            async move { r.health().watch_connected }
        })
        .await,
        "the registry's watch connects"
    );
    registry
}

/// A cache over `registry` decided by `engine`, with a refresh timeout of 1 s.
pub fn cache(registry: Arc<EtcdRegistry>, engine: &PolicyEngine) -> RegistryCache {
    RegistryCache::builder(registry, Arc::new(engine.clone()))
        .refresh_timeout(Duration::from_secs(1))
        .tick(Duration::from_millis(20))
        .build()
}

/// etcd's count of KV Range calls, summed over running members.
pub fn ranges(etcd: &EtcdCluster) -> u64 {
    etcd.grpc_started_total("etcdserverpb.KV", "Range")
        .expect("etcd metrics")
}
