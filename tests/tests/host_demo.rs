//! The README's first command, `scripts/demo`, as a new user runs it: it must bring up etcd and
//! the host, register the demo service, print the commands to try, answer them, and clean up
//! (host, etcd, temporary directory) when stopped.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regcache_tests::binary::without_cargos_environment;
use regcache_tests::http::request;
use regcache_tests::policies::repo_root;
use regcache_tests::wait::eventually_blocking;

/// A free loopback port, and the one after it free too (etcd's peer port).
fn free_port_pair() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

#[test]
fn scripts_demo_serves_the_demo_service_and_cleans_up() {
    let api_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let etcd_port = free_port_pair();
    let mut demo = Command::new(repo_root().join("scripts/demo"));
    // The script builds the binary, as a user's shell would.
    without_cargos_environment(&mut demo);
    let mut demo = demo
        .env("REGCACHE_DEMO_PORT", api_port.to_string())
        .env("REGCACHE_DEMO_ETCD_PORT", etcd_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(demo.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(demo.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                output.lock().unwrap().push_str(&(line + "\n"));
            }
        });
    }
    let text = || output.lock().unwrap().clone();
    // The first build of a fresh clone takes minutes; here the binary is usually built already.
    let ready = eventually_blocking(Duration::from_secs(900), || {
        text().contains("Press Ctrl-C") || demo.try_wait().unwrap().is_some()
    });
    assert!(ready && text().contains("Press Ctrl-C"), "{}", text());
    let out = text();
    let api = format!("http://127.0.0.1:{api_port}");
    assert!(
        out.contains(&format!("curl -s {api}/v1/services/greeter")),
        "{out}"
    );
    let work_dir = out
        .lines()
        .find_map(|l| l.split("data in ").nth(1))
        .and_then(|rest| rest.split("/etcd").next())
        .map(std::path::PathBuf::from)
        .expect("the demo says where etcd keeps its data");

    let addr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let answer = request(addr, "GET", "/v1/services/greeter", &[], b"").unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let json = answer.json();
    assert_eq!(json["services"][0]["nodes"][0]["id"], "greeter-1");
    let etcd = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://127.0.0.1:{etcd_port}"))
        .args(["get", "--prefix", "--keys-only", "/micro/registry/"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&etcd.stdout).contains("/micro/registry/greeter/greeter-1"),
        "the demo service is in the demo's etcd"
    );

    // Ctrl-C reaches the whole process group in a terminal; the script's trap handles TERM the
    // same way (a background process here ignores SIGINT).
    Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(
        eventually_blocking(Duration::from_secs(30), || demo
            .try_wait()
            .unwrap()
            .is_some()),
        "the demo stops: {}",
        text()
    );
    assert!(
        eventually_blocking(Duration::from_secs(5), || text().contains("demo: stopped")),
        "{}",
        text()
    );
    assert!(!work_dir.exists(), "{} is removed", work_dir.display());
    assert!(
        request(addr, "GET", "/healthz", &[], b"").is_err(),
        "the host is gone"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", etcd_port)).is_err(),
        "etcd is gone"
    );
}
