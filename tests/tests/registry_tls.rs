//! The etcd registry over TLS: trusting a CA, presenting a client certificate to an etcd that
//! demands one, and a clear error for a CA that did not sign etcd's certificate.

use regcache::registry::etcd::EtcdRegistry;
use regcache::registry::{ErrorKind, Registry};
use regcache_tests::etcd::{EtcdCluster, TlsFiles};
use regcache_tests::registry::{fast_config, init_logging, register_now, service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_a_ca_and_with_a_client_certificate_and_refuses_a_wrong_ca() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path()).unwrap();

    let etcd = EtcdCluster::builder()
        .tls(files.clone(), false)
        .start()
        .await
        .unwrap();
    let registry = EtcdRegistry::connect(fast_config(&etcd).tls_ca(&files.ca))
        .await
        .unwrap();
    register_now(&registry, &service("tls", "1", "t1")).await;
    assert_eq!(
        registry.get_service("tls").await.unwrap()[0].nodes[0].id,
        "t1"
    );
    registry.shutdown().await;

    let err = EtcdRegistry::connect(fast_config(&etcd).tls_ca(&files.wrong_ca))
        .await
        .err()
        .unwrap();
    println!("wrong CA: {err}");
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.op == "connect", "{err}");
    assert!(
        err.message.contains("certificate") || err.message.contains("UnknownIssuer"),
        "{err}"
    );

    let mutual = EtcdCluster::builder()
        .tls(files.clone(), true)
        .start()
        .await
        .unwrap();
    let registry = EtcdRegistry::connect(
        fast_config(&mutual)
            .tls_ca(&files.ca)
            .tls_client(&files.client_cert, &files.client_key),
    )
    .await
    .unwrap();
    register_now(&registry, &service("mtls", "1", "m1")).await;
    assert_eq!(
        registry.list_services().await.unwrap(),
        vec!["mtls".to_string()]
    );
    registry.shutdown().await;

    // A refused handshake looks like a closed connection, which may be transient: it is retried
    // until the request timeout (which bounds connecting), kept short here.
    let no_client_cert = fast_config(&mutual)
        .tls_ca(&files.ca)
        .request_timeout(std::time::Duration::from_secs(1));
    let err = EtcdRegistry::connect(no_client_cert).await.err().unwrap();
    println!("no client certificate: {err}");
    assert_ne!(err.kind, ErrorKind::InvalidInput);
}
