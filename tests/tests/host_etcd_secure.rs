//! The host's etcd credentials and TLS settings, end to end: a password read from a file, a
//! CA and a client certificate given as flags and in the TOML file. A wrong CA is retried in
//! the background (etcd may come back with the right certificate), never a crash; a password
//! etcd refuses stops the start with one line.

use std::time::Duration;

use regcache_tests::etcd::{EtcdCluster, TlsFiles};
use regcache_tests::host::{Host, service_json};
use regcache_tests::wait::eventually_blocking;

fn register_and_look_up(host: &Host, name: &str) {
    let created = host
        .request(
            "POST",
            "/v1/registrations",
            &[],
            service_json(name, "1", "n1", "10.0.0.9:1").as_bytes(),
        )
        .unwrap();
    assert_eq!(created.status, 201, "{}\n{}", created.text(), host.log());
    let found = host.lookup(name);
    assert_eq!(found.status, 200, "{}", found.text());
    assert_eq!(found.json()["services"][0]["nodes"][0]["id"], "n1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_from_a_file() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    etcd.enable_auth("root", "pw").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "pw\n").unwrap();
    let endpoint = etcd.endpoint(0);
    let host = Host::start_with_env(
        &["--etcd-endpoints", &endpoint, "--etcd-user", "root"],
        &[("REGCACHE_ETCD_PASSWORD_FILE", password.to_str().unwrap())],
    )
    .unwrap();
    register_and_look_up(&host, "authed");
    let keys = etcd
        .etcdctl(
            Some(("root", "pw")),
            &["get", "--prefix", "--keys-only", "/micro/registry/"],
        )
        .unwrap();
    assert!(keys.contains("/micro/registry/authed/n1"), "{keys}");

    // A wrong password is an operator's mistake etcd states plainly: the host stops at start
    // with one line saying so, rather than retrying forever.
    std::fs::write(&password, "wrong\n").unwrap();
    let out = std::process::Command::new(regcache_tests::binary::regcache_bin())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--etcd-endpoints",
            &endpoint,
        ])
        .args(["--etcd-user", "root"])
        .env("REGCACHE_ETCD_PASSWORD_FILE", password.to_str().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("regcache:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("authentication failed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::generate(dir.path()).unwrap();
    let etcd = EtcdCluster::builder()
        .tls(files.clone(), true)
        .start()
        .await
        .unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            etcd.endpoint(0),
            files.ca.display(),
            files.client_cert.display(),
            files.client_key.display()
        ),
    )
    .unwrap();
    let host = Host::start(&["--config", config.to_str().unwrap()]).unwrap();
    register_and_look_up(&host, "secure");
    assert!(
        eventually_blocking(Duration::from_secs(10), || host
            .get("/readyz")
            .unwrap()
            .status
            == 200),
        "{}",
        host.log()
    );

    // The flag overrides the file's CA: with the wrong one nothing connects, nothing crashes.
    let wrong = Host::start(&[
        "--config",
        config.to_str().unwrap(),
        "--etcd-ca",
        files.wrong_ca.to_str().unwrap(),
    ])
    .unwrap();
    let found = wrong.lookup("secure");
    assert_eq!(found.status, 503, "{}", found.text());
    assert!(
        wrong.log().contains("etcd does not answer yet"),
        "{}",
        wrong.log()
    );
}
