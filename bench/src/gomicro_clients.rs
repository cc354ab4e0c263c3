//! go-micro's etcd registry, simulated with the Rust etcd-client crate: the same calls in the
//! same order, aimed at any etcd endpoint (etcd itself, a proxy, regcache's endpoint), so that
//! one client drives every arm of a comparison.
//!
//! - [`Fleet`]: processes that each open their own connection with their own credentials,
//!   register (Grant, Put with the lease) and renew with one-shot keep-alives (clientv3's
//!   `KeepAliveOnce`: open the stream, send one, read one, drop it), look a service up and
//!   watch it, then deregister.
//! - [`ranges`]: go-micro's `GetService`, a serializable prefix Range, from many callers.
//! - [`Watchers`]: go-micro's registry watch (prefix, previous values), counting what arrives.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchStream,
};
use regcache_tests::registry::service;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, timeout};

use crate::load::Outcome;

/// go-micro's bound of every registry call (its registry `Timeout`) and of dialing (clientv3's
/// `DialTimeout`, which covers the first `Authenticate`).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of connecting a client that only sets a measurement up: a loaded etcd may take
/// seconds per `Authenticate`, and setting up must not fail where measuring would not.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Clients set up at once: enough to be quick, few enough not to time each other out.
pub const SETUP_CONCURRENCY: usize = 16;

/// A user and password of etcd's auth.
#[derive(Debug, Clone)]
pub struct Credential {
    pub user: String,
    pub password: String,
}

/// clientv3's behaviour with credentials: authenticate when connecting, and again when a call
/// finds the token no longer valid.
fn options(credential: &Credential) -> ConnectOptions {
    ConnectOptions::new()
        .with_user(&credential.user, &credential.password)
        .with_auto_token_refresh(true)
}

/// One client (one HTTP/2 connection) to `endpoint` as `credential`, for setting a measurement
/// up: bounded generously, not by go-micro's timeout.
pub async fn connect(endpoint: &str, credential: &Credential) -> anyhow::Result<Client> {
    timeout(
        SETUP_TIMEOUT,
        Client::connect([endpoint], Some(options(credential))),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connecting to {endpoint} took over {SETUP_TIMEOUT:?}"))?
    .map_err(|e| anyhow::anyhow!("connecting to {endpoint} as {}: {e}", credential.user))
}

/// `count` clients to `endpoint`, client `i` as `credentials[i % len]`.
pub async fn connect_many(
    endpoint: &str,
    credentials: &[Credential],
    count: usize,
) -> anyhow::Result<Vec<Client>> {
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (gate, endpoint) = (gate.clone(), endpoint.to_string());
            let credential = credentials[i % credentials.len()].clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                connect(&endpoint, &credential).await
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(count);
    for task in tasks {
        clients.push(task.await??);
    }
    Ok(clients)
}

/// Simulated go-micro processes, each with its own connection and credentials.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub endpoint: String,
    /// Process `i` uses `credentials[i % len]`.
    pub credentials: Vec<Credential>,
    pub processes: usize,
    /// The registry prefix, e.g. `/micro/registry/`.
    pub prefix: String,
    /// The service every process registers one node of (`{prefix}{service}/{service}-{i}`).
    pub service: String,
    /// The service every process calls: looked up once and watched.
    pub calls: String,
    /// The TTL of each process's lease, in seconds.
    pub ttl: i64,
    /// Between two renewals.
    pub beat: Duration,
    /// How long the processes run before deregistering, from the moment they all start.
    pub window: Duration,
}

/// What one process saw.
#[derive(Debug, Default)]
struct ProcessOutcome {
    registered_after: Option<Duration>,
    registered_at_end: bool,
    connect_failures: u64,
    registration_failures: u64,
    reregistrations: u64,
    keepalives_ok: u64,
    keepalives_failed: u64,
    watching: bool,
    deregistered: bool,
    errors: Vec<String>,
}

/// What the whole fleet saw.
#[derive(Debug, Default)]
pub struct FleetOutcome {
    /// Processes holding a live registration when the window ended.
    pub registered_at_end: usize,
    /// From the common start to each process's first registration, sorted.
    pub registration_times: Vec<Duration>,
    /// Connection attempts (each an `Authenticate`) that failed or timed out.
    pub connect_failures: u64,
    /// Grant + Put sequences that failed or timed out.
    pub registration_failures: u64,
    /// Registrations redone because the lease was gone.
    pub reregistrations: u64,
    pub keepalives_ok: u64,
    pub keepalives_failed: u64,
    /// Processes whose watch was created.
    pub watching: usize,
    /// Processes that deregistered (Delete answered) after the window.
    pub deregistered: usize,
    /// Error texts the clients saw, with their counts.
    pub errors: BTreeMap<String, u64>,
}

impl FleetOutcome {
    /// The most frequent error texts, for the report's notes.
    pub fn top_errors(&self, count: usize) -> Vec<(String, u64)> {
        let mut errors: Vec<(String, u64)> =
            self.errors.iter().map(|(e, n)| (e.clone(), *n)).collect();
        errors.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        errors.truncate(count);
        errors
    }
}

impl Fleet {
    /// Starts every process at once (as after a deploy, or a restart of the fleet), lets them
    /// run for the window, then has them deregister, and returns what they saw. Process `i`
    /// starts with `connected[i]` when given (already authenticated), else connects first.
    pub async fn run(&self, connected: Option<Vec<Client>>) -> FleetOutcome {
        let started = Instant::now();
        let deadline = started + self.window;
        let fleet = Arc::new(self.clone());
        let mut connected = connected.map(Vec::into_iter);
        let tasks: Vec<_> = (0..self.processes)
            .map(|i| {
                let client = connected.as_mut().and_then(Iterator::next);
                tokio::spawn(process(fleet.clone(), i, client, started, deadline))
            })
            .collect();
        let mut outcome = FleetOutcome::default();
        for task in tasks {
            let process = task.await.expect("a simulated process panicked");
            outcome.registered_at_end += usize::from(process.registered_at_end);
            outcome.registration_times.extend(process.registered_after);
            outcome.connect_failures += process.connect_failures;
            outcome.registration_failures += process.registration_failures;
            outcome.reregistrations += process.reregistrations;
            outcome.keepalives_ok += process.keepalives_ok;
            outcome.keepalives_failed += process.keepalives_failed;
            outcome.watching += usize::from(process.watching);
            outcome.deregistered += usize::from(process.deregistered);
            for error in process.errors {
                *outcome.errors.entry(error).or_default() += 1;
            }
        }
        outcome.registration_times.sort_unstable();
        outcome
    }
}

/// An error's text, shortened: the report counts kinds of errors, not every detail.
fn error_text(what: &str, error: impl std::fmt::Display) -> String {
    let text = error.to_string();
    let text: String = text.chars().take(160).collect();
    format!("{what}: {text}")
}

/// A call bounded by go-micro's timeout; a timeout is an error like any other.
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error_text(what, e)),
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// One go-micro process: connect (authenticating), then every beat either register (Grant and
/// Put with the lease) or renew with one keep-alive; look the called service up and watch it
/// once registered; at the end of the window delete its key (go-micro's `Deregister`).
async fn process(
    fleet: Arc<Fleet>,
    index: usize,
    mut client: Option<Client>,
    started: Instant,
    deadline: Instant,
) -> ProcessOutcome {
    let mut outcome = ProcessOutcome::default();
    let credential = &fleet.credentials[index % fleet.credentials.len()];
    let node = format!("{}-{index}", fleet.service);
    let key = format!("{}{}/{node}", fleet.prefix, fleet.service);
    let value = service(&fleet.service, "1.0.0", &node).encode();
    let calls = format!("{}{}/", fleet.prefix, fleet.calls);
    let mut lease: Option<i64> = None;
    let mut watch: Option<JoinHandle<()>> = None;
    let mut beat = tokio::time::interval(fleet.beat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            _ = tokio::time::sleep_until(deadline.into()) => break,
        }
        if Instant::now() >= deadline {
            break;
        }
        let Some(c) = client.as_mut() else {
            let connecting = Client::connect([fleet.endpoint.as_str()], Some(options(credential)));
            match bounded("connect", connecting).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    outcome.connect_failures += 1;
                    outcome.errors.push(e);
                }
            }
            // Registering waits for the next beat: clientv3.New returns, then the
            // registration loop runs; a process that was slow to connect is slow to register.
            continue;
        };
        if let Some(id) = lease {
            match bounded("keep-alive", c.lease_keep_alive(id)).await {
                // The keeper and its stream are dropped here: one request, one answer.
                Ok(_) => outcome.keepalives_ok += 1,
                Err(e) => {
                    outcome.keepalives_failed += 1;
                    // go-micro registers again when the lease is gone, on the same beat.
                    if e.contains("lease not found") {
                        lease = None;
                        outcome.reregistrations += 1;
                    }
                    outcome.errors.push(e);
                }
            }
        }
        if lease.is_none() {
            match register(c, &key, &value, fleet.ttl).await {
                Ok(id) => {
                    lease = Some(id);
                    outcome.registered_after.get_or_insert(started.elapsed());
                }
                Err(e) => {
                    outcome.registration_failures += 1;
                    outcome.errors.push(e);
                }
            }
        }
        if lease.is_some() && watch.is_none() {
            match look_up_and_watch(c, &calls).await {
                Ok(stream) => {
                    outcome.watching = true;
                    watch = Some(tokio::spawn(drain(stream)));
                }
                Err(e) => outcome.errors.push(e),
            }
        }
    }
    outcome.registered_at_end = lease.is_some();
    if let (Some(c), Some(_)) = (client.as_mut(), lease) {
        match bounded("deregister", c.delete(key.as_str(), None)).await {
            Ok(_) => outcome.deregistered = true,
            Err(e) => outcome.errors.push(e),
        }
    }
    if let Some(watch) = watch {
        watch.abort();
    }
    outcome
}

/// go-micro's `Register` of a node without a lease: Grant, then Put with it.
async fn register(client: &mut Client, key: &str, value: &[u8], ttl: i64) -> Result<i64, String> {
    let id = bounded("grant", client.lease_grant(ttl, None)).await?.id();
    let put = client.put(key, value, Some(PutOptions::new().with_lease(id)));
    bounded("put", put).await?;
    Ok(id)
}

/// go-micro's `GetService` of the called service, then its watch (prefix, previous values),
/// once the watch is created.
async fn look_up_and_watch(client: &mut Client, prefix: &str) -> Result<WatchStream, String> {
    let get = GetOptions::new().with_prefix().with_serializable();
    bounded("get", client.get(prefix, Some(get))).await?;
    let options = WatchOptions::new().with_prefix().with_prev_key();
    let mut stream = bounded("watch", client.watch(prefix, Some(options))).await?;
    match bounded("watch created", stream.message()).await? {
        Some(created) if created.created() => Ok(stream),
        Some(other) => Err(format!(
            "watch: first answer is not its creation (canceled: {}, {})",
            other.canceled(),
            other.cancel_reason()
        )),
        None => Err("watch: stream closed before creation".into()),
    }
}

/// Reads a watch until it ends, as a process's registry cache does.
async fn drain(mut stream: WatchStream) {
    while let Ok(Some(_)) = stream.message().await {}
}

/// One Range per caller every `every`, the callers' sends spread evenly over the period and
/// shifted by `phase` (0 to 1) of one caller's share of it, so that several sets of callers can
/// be spread among each other too.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub every: Duration,
    pub phase: f64,
}

/// Sends go-micro's `GetService` of `prefix` (a serializable prefix Range) from `callers`
/// callers sharing `client` (HTTP/2 multiplexes them, as the goroutines of one process) for
/// `window`, each call bounded by go-micro's timeout. Closed-loop (each caller sends its next
/// Range when the previous answer arrives) without `pace`, else paced. An answer counts as ok
/// when it lists at least one key.
pub async fn ranges(
    client: &Client,
    prefix: &str,
    callers: usize,
    window: Duration,
    pace: Option<Pace>,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + window;
    let count = callers;
    let callers: Vec<_> = (0..callers)
        .map(|caller| {
            let (mut kv, prefix) = (client.kv_client(), prefix.to_string());
            tokio::spawn(async move {
                let mut outcome = Outcome::default();
                let mut tick = pace.map(|pace| {
                    // Callers spread over the period: started together, they would send
                    // together, and the latency measured would be their queue's.
                    let offset = pace
                        .every
                        .mul_f64((caller as f64 + pace.phase) / count as f64);
                    let mut tick = tokio::time::interval_at((started + offset).into(), pace.every);
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    tick
                });
                while Instant::now() < deadline {
                    if let Some(tick) = tick.as_mut() {
                        tick.tick().await;
                    }
                    let options = GetOptions::new().with_prefix().with_serializable();
                    let sent = Instant::now();
                    match timeout(CALL_TIMEOUT, kv.get(prefix.as_str(), Some(options))).await {
                        Ok(Ok(answer)) if !answer.kvs().is_empty() => outcome.ok += 1,
                        _ => outcome.failed += 1,
                    }
                    outcome.latencies.push(sent.elapsed());
                }
                outcome
            })
        })
        .collect();
    let mut parts = Vec::with_capacity(callers.len());
    for caller in callers {
        parts.push(caller.await.expect("range caller panicked"));
    }
    Outcome::combine(parts, started)
}

/// Events one watcher received.
#[derive(Debug, Default)]
struct Seen {
    puts: AtomicU64,
    deletes: AtomicU64,
}

/// Watchers of one prefix, each a process of its own (its own connection and credentials),
/// counting the events they receive until dropped.
pub struct Watchers {
    seen: Vec<Arc<Seen>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watchers {
    /// Connects `count` watchers to `endpoint` and creates their watches of `prefix`
    /// (prefix, previous values: go-micro's); returns once every watch is created.
    pub async fn start(
        endpoint: &str,
        credentials: &[Credential],
        count: usize,
        prefix: &str,
    ) -> anyhow::Result<Watchers> {
        let clients = connect_many(endpoint, credentials, count).await?;
        let mut watchers = Watchers {
            seen: Vec::with_capacity(count),
            tasks: Vec::with_capacity(count),
        };
        for mut client in clients {
            let options = WatchOptions::new().with_prefix().with_prev_key();
            let mut stream = timeout(SETUP_TIMEOUT, client.watch(prefix, Some(options)))
                .await
                .map_err(|_| anyhow::anyhow!("watch on {endpoint} not opened"))??;
            let created = timeout(SETUP_TIMEOUT, stream.message())
                .await
                .map_err(|_| anyhow::anyhow!("watch on {endpoint} not created"))??;
            anyhow::ensure!(
                created.as_ref().is_some_and(|c| c.created()),
                "watch on {endpoint}: first answer is not its creation: {created:?}"
            );
            let seen = Arc::new(Seen::default());
            watchers.seen.push(seen.clone());
            watchers.tasks.push(tokio::spawn(async move {
                // The client lives as long as its watch.
                let _client = client;
                while let Ok(Some(answer)) = stream.message().await {
                    for event in answer.events() {
                        let counter = match event.event_type() {
                            EventType::Put => &seen.puts,
                            EventType::Delete => &seen.deletes,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(watchers)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Deletes received so far, summed over the watchers.
    pub fn deletes(&self) -> u64 {
        self.seen
            .iter()
            .map(|s| s.deletes.load(Ordering::Relaxed))
            .sum()
    }

    /// Puts received so far, summed over the watchers.
    pub fn puts(&self) -> u64 {
        self.seen
            .iter()
            .map(|s| s.puts.load(Ordering::Relaxed))
            .sum()
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
