//! Helpers for tests of the registry against real etcd: sample services, a fast configuration,
//! a watcher's view built from [`WatchEvent`]s, etcd's own view to compare it with, and whether
//! a registry's keys are all in etcd on its live lease.

use std::collections::BTreeMap;
use std::future::ready;
use std::time::Duration;

use etcd_client::{PutOptions, Txn, TxnOp};
use regcache::model::{Node, Service};
use regcache::registry::WatchEvent;
use regcache::registry::etcd::{EtcdConfig, EtcdRegistry};
use regcache::registry::{Registered, Registry};
use tokio::sync::mpsc;

use crate::etcd::EtcdCluster;
use crate::wait::eventually;

/// Logs to the test's output when `RUST_LOG` is set (e.g. `RUST_LOG=regcache=debug`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A single-node service.
pub fn service(name: &str, version: &str, node_id: &str) -> Service {
    Service {
        name: name.into(),
        version: version.into(),
        nodes: vec![Node {
            id: node_id.into(),
            address: "127.0.0.1:8080".into(),
            metadata: [("zone".to_string(), "a".to_string())].into(),
        }],
        ..Default::default()
    }
}

/// The value of node `node` of `service` as the scale benchmark and the memory test write it:
/// go-micro JSON of about 200 bytes, with one metadata pair on the service and on the node.
pub fn scale_value(service: &str, node: &str) -> Vec<u8> {
    Service {
        name: service.into(),
        version: "1.0.0".into(),
        metadata: [("team".to_string(), "bench".to_string())].into(),
        nodes: vec![Node {
            id: node.into(),
            address: "10.1.2.3:8080".into(),
            metadata: [("zone".to_string(), "a".to_string())].into(),
        }],
        ..Default::default()
    }
    .encode()
}

/// Writes `services` services (`svc-00000`, ...) of `nodes` nodes each under go-micro's prefix,
/// [`scale_value`] for each, a hundred puts per transaction.
pub async fn fill_scale(
    client: &mut etcd_client::Client,
    services: usize,
    nodes: usize,
) -> anyhow::Result<()> {
    let puts: Vec<TxnOp> = (0..services)
        .flat_map(|s| (0..nodes).map(move |n| (format!("svc-{s:05}"), format!("svc-{s:05}-{n}"))))
        .map(|(service, node)| {
            TxnOp::put(
                format!("/micro/registry/{service}/{node}"),
                scale_value(&service, &node),
                None::<PutOptions>,
            )
        })
        .collect();
    for chunk in puts.chunks(100) {
        client.txn(Txn::new().and_then(chunk.to_vec())).await?;
    }
    Ok(())
}

/// Registers `service` through `registry` and insists it was written now, not kept for later.
pub async fn register_now<R: Registry + ?Sized>(registry: &R, service: &Service) {
    registry
        .register(service)
        .await
        .and_then(Registered::written)
        .unwrap_or_else(|e| panic!("{} not registered now: {e}", service.name));
}

/// A configuration for tests: short lease (3 s, renewed every second), 2 s request timeout, and
/// a 200 ms retry cap, so faults play out in seconds.
pub fn fast_config(etcd: &EtcdCluster) -> EtcdConfig {
    EtcdConfig::new(etcd.endpoints())
        .lease_ttl(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(2))
        .retry_backoff_max(Duration::from_millis(200))
        .endpoint_probe_interval(Duration::from_millis(200))
}

/// What a watcher believes the registry holds, built only from watch events.
#[derive(Debug, Default)]
pub struct View {
    /// Nodes by (service, node id).
    pub nodes: BTreeMap<(String, String), Service>,
    /// Every event applied, in order.
    pub events: Vec<WatchEvent>,
    /// How many `Resync` events were applied.
    pub resyncs: usize,
}

impl View {
    /// Applies one event.
    pub fn apply(&mut self, event: WatchEvent) {
        match &event {
            WatchEvent::Put { service, .. } => {
                for node in &service.nodes {
                    self.nodes.insert(
                        (service.name.clone(), node.id.clone()),
                        service.with_single_node(node),
                    );
                }
            }
            WatchEvent::Delete {
                service, node_id, ..
            } => {
                self.nodes.remove(&(service.clone(), node_id.clone()));
            }
            WatchEvent::Resync { services, .. } => {
                self.resyncs += 1;
                self.nodes.clear();
                for service in services {
                    for node in &service.nodes {
                        self.nodes.insert(
                            (service.name.clone(), node.id.clone()),
                            service.with_single_node(node),
                        );
                    }
                }
            }
        }
        self.events.push(event);
    }

    /// Applies every event already queued on `rx`.
    pub fn drain(&mut self, rx: &mut mpsc::Receiver<WatchEvent>) {
        while let Ok(event) = rx.try_recv() {
            self.apply(event);
        }
    }

    /// Applies events from `rx` until `done(self)` holds or `timeout` passes; returns whether
    /// it held.
    pub async fn eventually(
        &mut self,
        rx: &mut mpsc::Receiver<WatchEvent>,
        timeout: Duration,
        done: impl Fn(&View) -> bool,
    ) -> bool {
        eventually(timeout, || {
            self.drain(rx);
            ready(done(self))
        })
        .await
    }
}

/// A plain etcd client for the test's own reads and writes (the "truth"), bypassing regcache.
pub async fn raw_client(etcd: &EtcdCluster, user: Option<(&str, &str)>) -> etcd_client::Client {
    let mut options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(5));
    if let Some((u, p)) = user {
        options = options.with_user(u, p);
    }
    etcd_client::Client::connect(etcd.endpoints(), Some(options))
        .await
        .expect("test client connects")
}

/// etcd's view of the valid nodes under `prefix`, decoded by the same rules as regcache, at
/// the revision returned.
pub async fn etcd_view(
    client: &mut etcd_client::Client,
    prefix: &str,
) -> (BTreeMap<(String, String), Service>, i64) {
    let resp = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("test client reads");
    let mut nodes = BTreeMap::new();
    for kv in resp.kvs() {
        if let Ok(service) = Service::decode(kv.value()) {
            for node in &service.nodes {
                nodes.insert(
                    (service.name.clone(), node.id.clone()),
                    service.with_single_node(node),
                );
            }
        }
    }
    (nodes, resp.header().map_or(0, |h| h.revision()))
}

/// Whether every key of `registry`'s registrations is in etcd, on the registry's live lease.
pub async fn all_registered(raw: &mut etcd_client::Client, registry: &EtcdRegistry) -> bool {
    let Some(lease) = registry.lease_id() else {
        return false;
    };
    for service in registry.registrations() {
        let key = registry.node_key(&service.name, &service.nodes[0].id);
        match raw.get(key, None).await {
            Ok(resp) if resp.kvs().first().is_some_and(|kv| kv.lease() == lease) => {}
            _ => return false,
        }
    }
    matches!(raw.lease_time_to_live(lease, None).await, Ok(ttl) if ttl.ttl() > 0)
}
