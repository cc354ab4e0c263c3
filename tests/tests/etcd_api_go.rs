//! The etcd v3 Go client (Debian's clientv3 3.4) running go-micro v4's etcd registry sequence
//! through the host's etcd-compatible endpoint, auth on and off: many processes register, renew
//! with one-shot keep-alives, look up, watch and deregister; etcd sees one authentication per
//! distinct credential and the keys under the host's lease, not the clients'; a process killed
//! without deregistering leaves etcd within its lease TTL + 1 s. The same runs against etcd
//! directly prove the program itself, so a failure through the host is the host's.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use regcache_tests::etcd::EtcdCluster;
use regcache_tests::gomicro;
use regcache_tests::host::Host;
use regcache_tests::registry::raw_client;
use regcache_tests::wait::eventually;

const PREFIX: &str = "/micro/registry/";
const AUTH: &str = "etcdserverpb.Auth";
const LEASE: &str = "etcdserverpb.Lease";
const WATCH: &str = "etcdserverpb.Watch";

/// The host's own etcd user.
const HOST_USER: (&str, &str) = ("root", "pw");
/// The processes' users (given out in turn) and their one password: two distinct credentials.
const CLIENT_USERS: [&str; 2] = ["svc-a", "svc-b"];
const CLIENT_PASSWORD: &str = "client-pw";

/// Processes per run: enough that per-process costs (authentications, lease streams, watches)
/// stand out from the host's own, few enough for a 2-core machine running other tests.
const PROCESSES: usize = 50;
/// go-micro's RegisterTTL and RegisterInterval keep a 3:1 ratio (90 s and 30 s by default);
/// scaled down so that a lost keep-alive would show within a run.
const TTL: &str = "5";
const INTERVAL: &str = "1s";

/// Where the processes connect: etcd itself, or the host's endpoint in front of it.
enum Target {
    Etcd,
    Host {
        host: Host,
        _state: tempfile::TempDir,
    },
}

struct Setup {
    etcd: EtcdCluster,
    target: Target,
    auth: bool,
}

impl Setup {
    /// etcd (with auth and the clients' users when `auth`), and the host in front of it when
    /// `through_host`.
    async fn start(auth: bool, through_host: bool) -> Setup {
        let etcd = EtcdCluster::start(1).await.unwrap();
        if auth {
            etcd.enable_auth(HOST_USER.0, HOST_USER.1).await.unwrap();
            for user in CLIENT_USERS {
                let root = Some(HOST_USER);
                etcd.etcdctl(root, &["user", "add", &format!("{user}:{CLIENT_PASSWORD}")])
                    .unwrap();
                etcd.etcdctl(root, &["user", "grant-role", user, "root"])
                    .unwrap();
            }
        }
        let target = if through_host {
            let state = tempfile::tempdir().unwrap();
            let endpoint = etcd.endpoint(0);
            let mut args = vec![
                "--etcd-endpoints",
                endpoint.as_str(),
                "--etcd-api-listen",
                "127.0.0.1:0",
                "--state-dir",
                state.path().to_str().unwrap(),
            ];
            if auth {
                args.extend(["--etcd-user", HOST_USER.0, "--etcd-password", HOST_USER.1]);
            }
            let host = Host::start(&args).unwrap();
            assert!(
                host.etcd_api.is_some(),
                "the host logged no etcd API address:\n{}",
                host.log()
            );
            Target::Host {
                host,
                _state: state,
            }
        } else {
            Target::Etcd
        };
        Setup { etcd, target, auth }
    }

    /// The address the processes are given.
    fn endpoint(&self) -> String {
        match &self.target {
            Target::Etcd => self.etcd.endpoint(0).replace("http://", ""),
            Target::Host { host, .. } => host.etcd_api.unwrap().to_string(),
        }
    }

    /// gomicro-sim's flags for `n` processes staying registered for `duration`.
    fn sim_args(&self, n: usize, duration: &str, id_prefix: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "-endpoints",
            &self.endpoint(),
            "-n",
            &n.to_string(),
            "-ttl",
            TTL,
            "-interval",
            INTERVAL,
            "-duration",
            duration,
            "-id-prefix",
            id_prefix,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.auth {
            args.extend([
                "-user".into(),
                CLIENT_USERS.join(","),
                "-password".into(),
                CLIENT_PASSWORD.into(),
            ]);
        }
        args
    }

    fn host_log(&self) -> String {
        match &self.target {
            Target::Etcd => String::new(),
            Target::Host { host, .. } => host.log(),
        }
    }

    /// A client of etcd itself, authenticated once here (as the host's user), so that the
    /// reads below add no `Authenticate` to the counts measured.
    async fn raw(&self) -> etcd_client::Client {
        raw_client(&self.etcd, self.auth.then_some(HOST_USER)).await
    }

    fn started(&self, service: &str, method: &str) -> u64 {
        self.etcd.grpc_started(0, service, method).unwrap()
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Keys under the prefix in etcd, with their lease.
async fn etcd_keys(raw: &mut etcd_client::Client) -> Vec<(String, i64)> {
    let resp = raw
        .get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("reading etcd");
    resp.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.lease()))
        .collect()
}

/// Waits (at most `timeout`) until etcd holds `n` keys under the prefix.
async fn key_count_becomes(raw: &etcd_client::Client, n: usize, timeout: Duration) -> bool {
    eventually(timeout, || {
        // A clone shares the connection and its token: no new Authenticate.
        let mut raw = raw.clone();
        async move { etcd_keys(&mut raw).await.len() == n }
    })
    .await
}

/// The counts etcd keeps that tell how many clients reached it.
#[derive(Debug, Clone, Copy)]
struct EtcdCalls {
    authenticate: u64,
    lease_grant: u64,
    keepalive_streams: u64,
    watches: u64,
}

impl EtcdCalls {
    fn read(setup: &Setup) -> EtcdCalls {
        EtcdCalls {
            authenticate: setup.started(AUTH, "Authenticate"),
            lease_grant: setup.started(LEASE, "LeaseGrant"),
            keepalive_streams: setup.started(LEASE, "LeaseKeepAlive"),
            watches: setup.started(WATCH, "Watch"),
        }
    }

    fn since(self, before: EtcdCalls) -> EtcdCalls {
        EtcdCalls {
            authenticate: self.authenticate - before.authenticate,
            lease_grant: self.lease_grant - before.lease_grant,
            keepalive_streams: self.keepalive_streams - before.keepalive_streams,
            watches: self.watches - before.watches,
        }
    }
}

/// `PROCESSES` go-micro processes register, renew, look up, watch and deregister; checked in
/// etcd while they run and from their summary after.
async fn register_renew_look_up_watch_deregister(auth: bool, through_host: bool) {
    let setup = Setup::start(auth, through_host).await;
    let mut raw = setup.raw().await;
    let before = EtcdCalls::read(&setup);

    let args = setup.sim_args(PROCESSES, "8s", "p");
    let sim = gomicro::spawn(&strs(&args)).unwrap();
    let all_in_etcd = key_count_becomes(&raw, PROCESSES, Duration::from_secs(60)).await;
    let keys = etcd_keys(&mut raw).await;
    assert!(
        all_in_etcd,
        "{PROCESSES} keys in etcd, found {}: {keys:?}\nsim stderr: {}\nhost log:\n{}",
        keys.len(),
        sim.stderr(),
        setup.host_log()
    );
    // The processes connect (and authenticate) before any of them registers: every
    // authentication this run causes has reached etcd by now.
    let registered = EtcdCalls::read(&setup).since(before);
    let leases: BTreeSet<i64> = keys.iter().map(|(_, lease)| *lease).collect();

    let summary = sim.wait(Duration::from_secs(90)).unwrap();
    let after = EtcdCalls::read(&setup).since(before);
    eprintln!(
        "auth {auth}, through host {through_host}: {}\netcd calls once registered: \
         {registered:?}; after the run: {after:?}; distinct leases of the keys in etcd: {}",
        summary.brief(),
        leases.len()
    );
    let context = format!("{}\nhost log:\n{}", summary.brief(), setup.host_log());

    assert_eq!(summary.connected, PROCESSES as u64, "{context}");
    assert_eq!(summary.registered, PROCESSES as u64, "{context}");
    assert_eq!(summary.register_failed, 0, "{context}");
    assert!(summary.errors.is_empty(), "{context}");
    // Renewed in time, every round: no lease was found gone.
    assert_eq!(summary.reregistered, 0, "{context}");
    assert_eq!(summary.keepalives_failed, 0, "{context}");
    // About 7 rounds in 8 s; a loaded machine stretches them.
    assert!(summary.keepalives_ok >= (PROCESSES * 3) as u64, "{context}");
    // Lookups (the last round of each process, seconds after all registered) see every node.
    assert_eq!(summary.gets_failed, 0, "{context}");
    assert_eq!(
        summary.last_get_nodes_min,
        Some(PROCESSES as u64),
        "{context}"
    );
    assert_eq!(summary.last_get_nodes_max, PROCESSES as u64, "{context}");
    // Watches: no error, events go-micro can decode (a DELETE carries its previous value).
    assert_eq!(summary.watch_errors, 0, "{context}");
    assert_eq!(summary.watch_undecodable, 0, "{context}");
    assert_eq!(summary.watch_deletes_without_prev_kv, 0, "{context}");
    assert!(summary.watch_puts > 0, "{context}");
    assert_eq!(summary.deregistered, PROCESSES as u64, "{context}");

    let expected: BTreeSet<String> = summary.keys.iter().cloned().collect();
    let found: BTreeSet<String> = keys.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(found, expected, "{context}");
    let client_leases: BTreeSet<i64> = summary.lease_ids.iter().copied().collect();
    if through_host {
        // Nothing of a client's lease reaches etcd: the keys are on the host's one lease, and
        // etcd saw no grant, keep-alive stream or watch per process.
        assert_eq!(
            leases.len(),
            1,
            "one lease for every key: {leases:?}\n{context}"
        );
        assert!(
            leases.is_disjoint(&client_leases) && !leases.contains(&0),
            "the keys' lease is the host's, not a client's: {leases:?}\n{context}"
        );
        assert!(after.lease_grant <= 1, "{after:?}\n{context}");
        assert!(after.keepalive_streams <= 1, "{after:?}\n{context}");
        assert!(after.watches <= 1, "{after:?}\n{context}");
        if auth {
            assert_eq!(
                registered.authenticate,
                CLIENT_USERS.len() as u64,
                "one Authenticate per distinct credential: {registered:?}\n{context}"
            );
        }
    } else {
        // Straight to etcd each process keeps its own lease: the program does what go-micro
        // does.
        assert_eq!(leases, client_leases, "{context}");
        assert!(summary.watch_deletes_min >= PROCESSES as u64, "{context}");
    }

    // Deregistered: gone from etcd.
    let gone = key_count_becomes(&raw, 0, Duration::from_secs(10)).await;
    assert!(
        gone,
        "keys left in etcd after deregistering: {:?}\n{context}",
        etcd_keys(&mut raw).await
    );
}

/// A process killed (SIGKILL) while registered: its keys leave etcd within its lease's TTL + 1 s.
async fn killed_process_leaves_within_its_ttl(auth: bool, through_host: bool) {
    let setup = Setup::start(auth, through_host).await;
    let mut raw = setup.raw().await;
    let processes = 5;
    let args = setup.sim_args(processes, "120s", "k");
    let mut sim = gomicro::spawn(&strs(&args)).unwrap();
    let registered = key_count_becomes(&raw, processes, Duration::from_secs(60)).await;
    assert!(
        registered,
        "keys in etcd: {:?}\nsim stderr: {}\nhost log:\n{}",
        etcd_keys(&mut raw).await,
        sim.stderr(),
        setup.host_log()
    );
    // A couple of keep-alive rounds, so the leases are live ones being renewed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sim.kill();
    let killed = Instant::now();
    let ttl = Duration::from_secs(TTL.parse().unwrap());
    let gone = key_count_becomes(&raw, 0, ttl + Duration::from_secs(5)).await;
    let took = killed.elapsed();
    eprintln!("auth {auth}, through host {through_host}: keys gone {took:?} after the kill");
    assert!(
        gone,
        "keys still in etcd {took:?} after the kill: {:?}\nhost log:\n{}",
        etcd_keys(&mut raw).await,
        setup.host_log()
    );
    assert!(
        took <= ttl + Duration::from_secs(1),
        "keys gone {took:?} after the kill, lease TTL {ttl:?}\nhost log:\n{}",
        setup.host_log()
    );
}

/// One process of a service deregisters while the others run: every other process's watch
/// gets the DELETE with its previous value (one node of eleven is no burst the eviction guard
/// holds back), and the key leaves etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistration_reaches_every_go_watch_through_the_host() {
    let setup = Setup::start(false, true).await;
    let raw = setup.raw().await;
    let stay = 10;
    let args = setup.sim_args(stay, "8s", "stay");
    let staying = gomicro::spawn(&strs(&args)).unwrap();
    assert!(
        key_count_becomes(&raw, stay, Duration::from_secs(30)).await,
        "sim stderr: {}\nhost log:\n{}",
        staying.stderr(),
        setup.host_log()
    );
    let args = setup.sim_args(1, "1s", "leave");
    let leaving = gomicro::run(&strs(&args), Duration::from_secs(30)).unwrap();
    assert_eq!(leaving.deregistered, 1, "{}", leaving.brief());
    assert!(
        key_count_becomes(&raw, stay, Duration::from_secs(5)).await,
        "the deregistered key left etcd\nhost log:\n{}",
        setup.host_log()
    );
    let stayed = staying.wait(Duration::from_secs(60)).unwrap();
    let context = format!(
        "staying: {}\nleaving: {}\nhost log:\n{}",
        stayed.brief(),
        leaving.brief(),
        setup.host_log()
    );
    assert_eq!(stayed.registered, stay as u64, "{context}");
    assert!(
        stayed.watch_puts_min > stay as u64,
        "the newcomer's PUT: {context}"
    );
    assert!(stayed.watch_deletes_min >= 1, "its DELETE: {context}");
    assert_eq!(stayed.watch_deletes_without_prev_kv, 0, "{context}");
    assert_eq!(stayed.watch_errors, 0, "{context}");
}

/// A fleet restarting at once: 200 processes register together, each within go-micro's 5 s
/// call timeout, as they do against etcd directly (about 1.5 s for all 200 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_200_registers_at_once_through_the_host() {
    let setup = Setup::start(false, true).await;
    let fleet = 200;
    let args = setup.sim_args(fleet, "8s", "fleet");
    let summary = gomicro::run(&strs(&args), Duration::from_secs(90)).unwrap();
    let context = format!("{}\nhost log:\n{}", summary.brief(), setup.host_log());
    assert_eq!(summary.connected, fleet as u64, "{context}");
    assert!(summary.errors.is_empty(), "{}", summary.brief());
    assert_eq!(summary.register_failed, 0, "{}", summary.brief());
    assert_eq!(summary.registered, fleet as u64, "{}", summary.brief());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_clients_straight_to_etcd() {
    register_renew_look_up_watch_deregister(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_clients_through_the_host_auth_off() {
    register_renew_look_up_watch_deregister(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_clients_through_the_host_auth_on() {
    register_renew_look_up_watch_deregister(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_through_the_host_gets_etcds_error() {
    let setup = Setup::start(true, true).await;
    let args = [
        "-endpoints",
        &setup.endpoint(),
        "-n",
        "2",
        "-duration",
        "1s",
        "-user",
        CLIENT_USERS[0],
        "-password",
        "wrong",
    ];
    let summary = gomicro::run(&args, Duration::from_secs(30)).unwrap();
    let context = format!("{}\nhost log:\n{}", summary.brief(), setup.host_log());
    assert_eq!(summary.connected, 0, "{context}");
    assert_eq!(
        summary
            .errors
            .get("connect: etcdserver: authentication failed, invalid user ID or password"),
        Some(&2),
        "{context}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_go_process_straight_to_etcd() {
    killed_process_leaves_within_its_ttl(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_go_process_through_the_host_auth_off() {
    killed_process_leaves_within_its_ttl(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_go_process_through_the_host_auth_on() {
    killed_process_leaves_within_its_ttl(true, true).await;
}
