//! The library as an embedder uses it: `regcache::Host`s built in one process on one real etcd,
//! served, shut down. One host's registration is seen through another's HTTP API and cache;
//! each host's shutdown takes its keys out of etcd; a host built while etcd is unreachable
//! connects in the background once it answers; and once every host has returned from `serve`,
//! no task of theirs is left on the runtime and, once the runtime is gone, no thread.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use regcache::Host;
use regcache::config::{ConfigLayer, HostConfig};
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::http::request;
use regcache_tests::policies::policy_path;
use regcache_tests::proxy::TcpProxy;
use regcache_tests::registry::{register_now, service};
use regcache_tests::wait::{eventually, eventually_blocking};

/// A host on `endpoints` keeping its state in `state_dir`, with `policy_file` if given (watched),
/// and the etcd-compatible endpoint if `etcd_api`.
fn host_config(
    endpoints: &[String],
    state_dir: &Path,
    policy_file: Option<&Path>,
    etcd_api: bool,
) -> HostConfig {
    let endpoints = serde_json::to_string(endpoints).unwrap();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n",
        state_dir.display().to_string()
    );
    if let Some(file) = policy_file {
        toml += &format!("[policy]\nfile = {:?}\n", file.display().to_string());
    }
    toml += &format!("[etcd]\nendpoints = {endpoints}\n");
    if etcd_api {
        toml += "[etcd_api]\nlisten = \"127.0.0.1:0\"\n";
    }
    ConfigLayer::parse_toml(&toml, "test")
        .unwrap()
        .validate()
        .unwrap()
}

/// The process's threads: id → name.
fn threads() -> BTreeMap<String, String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            Some((
                path.file_name()?.to_string_lossy().into_owned(),
                name.trim().to_string(),
            ))
        })
        .collect()
}

#[test]
fn hosts_on_one_etcd_serve_shut_down_and_leave_no_task_or_thread() {
    // The harness's own runtime (etcd, the proxy), started before the threads are counted.
    let harness = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let etcd = harness.block_on(EtcdCluster::start(1)).unwrap();
    let endpoints = etcd.endpoints();
    let proxy = harness
        .block_on(TcpProxy::start(endpoints[0].trim_start_matches("http://")))
        .unwrap();
    harness.block_on(proxy.cut());
    let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let policy_file = policy_path("default");

    // wasmtime compiles on rayon's process-wide pool, started by the first compilation and
    // kept for the life of the process: started here, before the threads are counted. The
    // engine's epoch thread ends a tick after the engine.
    drop(
        PolicyEngine::new(
            EngineOptions::default(),
            PolicySpec::embedded_default(vec![]),
        )
        .unwrap(),
    );
    assert!(eventually_blocking(Duration::from_secs(2), || {
        !threads()
            .values()
            .any(|name| name == "regcache-policy-epoch")
    }));
    let before = threads();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // A watches a policy file (a task and the watcher's thread); B runs the embedded one
        // and serves the etcd-compatible endpoint too.
        let a = host_config(&endpoints, dirs[0].path(), Some(&policy_file), false);
        let a = Host::build(a).await.unwrap();
        let b = host_config(&endpoints, dirs[1].path(), None, true);
        let b = Host::build(b).await.unwrap();
        assert_ne!(a.http_address(), b.http_address());
        // C reaches etcd through a proxy that refuses connections: it is built all the same,
        // and connects in the background once the proxy forwards.
        let c = host_config(&[proxy.url()], dirs[2].path(), None, false);
        let c = Host::build(c).await.unwrap();
        let c_cache = c.cache().clone();
        let (stop_c, c_stopped) = tokio::sync::oneshot::channel::<()>();
        let serving_c = tokio::spawn(c.serve(async {
            let _ = c_stopped.await;
        }));

        register_now(&**a.registry(), &service("greeter", "1.0", "on-a")).await;
        let b_cache = b.cache().clone();
        let b_address = b.http_address();
        let b_etcd_api = b.etcd_api_address().expect("B serves the etcd endpoint");
        assert_eq!(a.etcd_api_address(), None);
        let (stop_a, a_stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_b, b_stopped) = tokio::sync::oneshot::channel::<()>();
        let serving_a = tokio::spawn(a.serve(async {
            let _ = a_stopped.await;
        }));
        let serving_b = tokio::spawn(b.serve(async {
            let _ = b_stopped.await;
        }));

        // A's registration reaches B through etcd: over B's HTTP API and in-process.
        let seen_over_http = tokio::task::spawn_blocking(move || {
            eventually_blocking(Duration::from_secs(10), || {
                request(b_address, "GET", "/v1/services/greeter", &[], b"")
                    .is_ok_and(|answer| answer.status == 200 && answer.text().contains("on-a"))
            })
        })
        .await
        .unwrap();
        assert!(seen_over_http, "B's API never answered A's registration");
        let answer = b_cache.lookup("greeter").await.unwrap();
        assert_eq!(answer.node_ids().collect::<Vec<_>>(), ["on-a"]);
        drop(b_cache);

        // An etcd client of B's endpoint sees it too, and holds a watch and a keep-alive
        // stream open while B shuts down: they end with B's serve.
        let mut client = etcd_client::Client::connect([b_etcd_api.to_string()], None)
            .await
            .unwrap();
        let listed = client
            .get(
                "/micro/registry/greeter/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert_eq!(listed.kvs().len(), 1);
        assert!(listed.kvs()[0].key_str().unwrap().ends_with("/on-a"));
        let lease = client.lease_grant(10, None).await.unwrap().id();
        let (mut keeper, _keep_alives) = client.lease_keep_alive(lease).await.unwrap();
        keeper.keep_alive().await.unwrap();
        let _events = client
            .watch(
                "/micro/registry/",
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .unwrap();

        assert!(
            c_cache.lookup("greeter").await.is_err(),
            "C has no etcd yet"
        );
        proxy.heal();
        let c_connected = eventually(Duration::from_secs(10), || async {
            c_cache
                .lookup("greeter")
                .await
                .is_ok_and(|answer| answer.node_ids().eq(["on-a"]))
        })
        .await;
        assert!(
            c_connected,
            "C never answered from etcd once the proxy forwarded"
        );
        drop(c_cache);
        stop_c.send(()).unwrap();
        serving_c.await.unwrap().unwrap();

        stop_a.send(()).unwrap();
        serving_a.await.unwrap().unwrap();
        let keys = etcd
            .etcdctl(
                None,
                &["get", "--prefix", "--keys-only", "/micro/registry/"],
            )
            .unwrap();
        assert!(
            !keys.contains("on-a"),
            "A's key outlived its shutdown: {keys}"
        );
        let stopping = std::time::Instant::now();
        stop_b.send(()).unwrap();
        serving_b.await.unwrap().unwrap();
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "B's streams held its shutdown for {:?}",
            stopping.elapsed()
        );
        drop((client, keeper));
    });

    let alive = || runtime.metrics().num_alive_tasks();
    assert!(
        eventually_blocking(Duration::from_secs(2), || alive() == 0),
        "{} task(s) still alive after both hosts returned from serve",
        alive()
    );
    drop(runtime);
    let left = || {
        let now = threads();
        now.into_iter()
            .filter(|(id, _)| !before.contains_key(id))
            .map(|(_, name)| name)
            .collect::<Vec<_>>()
    };
    assert!(
        eventually_blocking(Duration::from_secs(5), || left().is_empty()),
        "threads left behind: {:?}",
        left()
    );
}
