//! The etcd endpoint's bounds, with the Rust etcd client against `regcache run` on its embedded
//! registry: connections past `etcd_api.max_connections` are closed while those open are
//! served, and leases and watches past a connection's bound are refused to that connection only.

use std::net::TcpStream;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, WatchOptions};
use regcache_tests::host::Host;

fn options() -> Option<ConnectOptions> {
    Some(
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_leases_and_watches_are_bounded_per_client_without_cost_to_others() {
    let host = tokio::task::spawn_blocking(|| {
        Host::start(&[
            "--etcd-api-listen",
            "127.0.0.1:0",
            "--etcd-api-max-connections",
            "3",
            "--etcd-api-max-leases-per-connection",
            "2",
            "--etcd-api-max-watches-per-connection",
            "2",
        ])
    })
    .await
    .unwrap()
    .unwrap();
    let endpoint = host.etcd_api.expect("the endpoint's address is logged");
    let url = format!("http://{endpoint}");

    let mut first = Client::connect([url.clone()], options()).await.unwrap();
    let mut second = Client::connect([url.clone()], options()).await.unwrap();
    for _ in 0..2 {
        first.lease_grant(30, None).await.unwrap();
    }
    let refused = first.lease_grant(30, None).await.unwrap_err().to_string();
    assert!(
        refused.contains("ResourceExhausted") || refused.contains("resource"),
        "{refused}"
    );
    assert!(
        refused.contains("etcd_api.max_leases_per_connection"),
        "{refused}"
    );
    second
        .lease_grant(30, None)
        .await
        .expect("another connection's leases are its own");

    let prefix = Some(WatchOptions::new().with_prefix());
    let _watch_a = first
        .watch("/micro/registry/", prefix.clone())
        .await
        .unwrap();
    let _watch_b = first
        .watch("/micro/registry/", prefix.clone())
        .await
        .unwrap();
    let mut third = first
        .watch("/micro/registry/", prefix.clone())
        .await
        .unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(5), third.message())
        .await
        .expect("the refusal comes at once");
    match cancelled {
        Ok(Some(response)) => {
            assert!(response.canceled(), "{response:?}");
            assert!(
                response
                    .cancel_reason()
                    .contains("etcd_api.max_watches_per_connection"),
                "{}",
                response.cancel_reason()
            );
        }
        // The client may surface the cancellation as the stream's error.
        Err(e) => assert!(e.to_string().contains("max_watches"), "{e}"),
        Ok(None) => panic!("the watch ended without saying why"),
    }
    let _other = second.watch("/micro/registry/", prefix).await.unwrap();

    // A third connection fills the bound; a fourth is closed, and the open ones are served.
    let held = TcpStream::connect(endpoint).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let fourth = Client::connect([url.clone()], options()).await;
    let refused = match fourth {
        Err(_) => true,
        Ok(mut client) => client.get("/micro/registry/", None).await.is_err(),
    };
    assert!(refused, "a connection past the bound was served");
    second
        .get("/micro/registry/x/y", None)
        .await
        .expect("connections already open are served on");
    drop(held);
    let served_again = regcache_tests::wait::eventually(Duration::from_secs(5), || {
        let url = url.clone();
        async move {
            match Client::connect([url], options()).await {
                Ok(mut client) => client.get("/micro/registry/x/y", None).await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(
        served_again,
        "a place freed was not given to a new connection"
    );
    assert!(
        host.log().contains("etcd_api.max_connections"),
        "the refusals are logged"
    );
}
