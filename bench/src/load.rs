//! A closed-loop HTTP/1.1 load generator: a fixed number of keep-alive connections, each sending
//! its next request as soon as the previous answer arrives, for a fixed time (or until every
//! path was asked once). Used for both regcache and etcd's JSON gateway so that the two are
//! driven identically; `range_load.rs` drives etcd's gRPC the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The requests to send: every connection cycles through `paths`, each starting at its own
/// offset.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub method: Method,
    pub paths: Vec<String>,
    pub body: Bytes,
}

impl Target {
    /// `GET path`, again and again.
    pub fn get(addr: SocketAddr, path: impl Into<String>) -> Self {
        Target {
            addr,
            method: Method::GET,
            paths: vec![path.into()],
            body: Bytes::new(),
        }
    }
}

/// The body of one `GET` of the target's first path, if it answered 2xx.
pub async fn body(target: &Target) -> Option<String> {
    let (status, bytes) = send(&Target::get(target.addr, &target.paths[0]), &[]).await?;
    status
        .is_success()
        .then(|| String::from_utf8_lossy(&bytes).into_owned())
}

/// One request of the target's first path (its method and body, and `headers`) on a connection
/// of its own: the status and body, whatever the status.
pub async fn send(target: &Target, headers: &[(&str, &str)]) -> Option<(StatusCode, Bytes)> {
    let stream = TcpStream::connect(target.addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    let driver = tokio::spawn(conn);
    let mut request = Request::builder()
        .method(target.method.clone())
        .uri(&target.paths[0])
        .header("host", target.addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(target.body.clone())).ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status();
    let bytes = response.into_body().collect().await.ok()?.to_bytes();
    driver.abort();
    Some((status, bytes))
}

/// Failures after which a connection gives up.
const MAX_FAILURES: u64 = 1_000;

/// When connections stop.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// At this time.
    Deadline(Instant),
    /// Once every path was asked exactly once, over all connections.
    EachPathOnce,
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Answers with a 2xx status.
    pub ok: u64,
    /// Other answers and transport errors.
    pub failed: u64,
    /// Latency of every request, sorted.
    pub latencies: Vec<Duration>,
    /// Of a paced connection ([`paced`]), every answered request in the order sent: when it was
    /// sent and its latency (a prober's figures over part of its run).
    pub timeline: Vec<(Instant, Duration)>,
    pub seconds: f64,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    pub fn p(&self, q: f64) -> Duration {
        percentile(&self.latencies, q)
    }

    /// The callers' parts of one run that began at `started`, as one outcome.
    pub fn combine(parts: Vec<Outcome>, started: Instant) -> Outcome {
        let mut outcome = Outcome::default();
        for part in parts {
            outcome.ok += part.ok;
            outcome.failed += part.failed;
            outcome.latencies.extend(part.latencies);
            outcome.timeline.extend(part.timeline);
        }
        outcome.latencies.sort_unstable();
        outcome.seconds = started.elapsed().as_secs_f64();
        outcome
    }
}

/// Drives `target` with `connections` connections for `duration`.
pub async fn run(target: &Target, connections: usize, duration: Duration) -> Outcome {
    drive(
        target,
        connections,
        Until::Deadline(Instant::now() + duration),
    )
    .await
}

/// Drives `target` with `connections` connections until `until`.
pub async fn drive(target: &Target, connections: usize, until: Until) -> Outcome {
    let target = Arc::new(target.clone());
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|c| tokio::spawn(connection(target.clone(), c, connections, until, None)))
        .collect();
    let mut parts = Vec::with_capacity(workers.len());
    for worker in workers {
        parts.push(worker.await.expect("load worker panicked"));
    }
    Outcome::combine(parts, started)
}

/// Sends `target` on one connection, one request every `every` (or right after the previous
/// answer when that is late), until `until`: a prober, open loop unless the server falls behind.
pub async fn paced(target: &Target, every: Duration, until: Instant) -> Outcome {
    let started = Instant::now();
    let outcome = connection(
        Arc::new(target.clone()),
        0,
        1,
        Until::Deadline(until),
        Some(every),
    )
    .await;
    Outcome::combine(vec![outcome], started)
}

async fn connection(
    target: Arc<Target>,
    first: usize,
    stride: usize,
    until: Until,
    pace: Option<Duration>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut tick = pace.map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut next = first;
    let more = |next: usize| match until {
        Until::Deadline(deadline) => Instant::now() < deadline,
        Until::EachPathOnce => next < target.paths.len(),
    };
    while more(next) {
        if outcome.failed > MAX_FAILURES {
            break; // the server is gone; say so in the outcome rather than spin
        }
        let Ok(stream) = TcpStream::connect(target.addr).await else {
            outcome.failed += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            outcome.failed += 1;
            continue;
        };
        let driver = tokio::spawn(conn);
        while more(next) {
            if let Some(tick) = &mut tick {
                tick.tick().await;
                if !more(next) {
                    break;
                }
            }
            let path = &target.paths[next % target.paths.len()];
            next += stride;
            let request = Request::builder()
                .method(target.method.clone())
                .uri(path)
                .header("host", target.addr.to_string())
                .header("content-type", "application/json")
                .body(Full::new(target.body.clone()))
                .expect("valid request");
            let sent = Instant::now();
            let answer = match sender.send_request(request).await {
                Ok(response) => {
                    let ok = response.status().is_success();
                    response
                        .into_body()
                        .collect()
                        .await
                        .map(|_| ok)
                        .unwrap_or(false)
                }
                Err(_) => {
                    outcome.failed += 1;
                    break; // the connection is gone: open another
                }
            };
            let latency = sent.elapsed();
            outcome.latencies.push(latency);
            if pace.is_some() {
                outcome.timeline.push((sent, latency));
            }
            if answer {
                outcome.ok += 1;
            } else {
                outcome.failed += 1;
            }
        }
        driver.abort();
    }
    outcome
}

/// Latency percentiles of a set of durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}
