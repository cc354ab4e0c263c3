//! A closed-loop HTTP/1.1 load generator: a fixed number of keep-alive connections, each sending
//! its next request as soon as the previous answer arrives, for a fixed time. Used for both
//! regcache and etcd's JSON gateway so that the two are driven identically.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request, sent again and again.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub method: Method,
    pub path: String,
    pub body: Bytes,
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
    pub seconds: f64,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    pub fn p(&self, q: f64) -> Duration {
        percentile(&self.latencies, q)
    }
}

/// Drives `target` with `connections` connections for `duration`.
pub async fn run(target: &Target, connections: usize, duration: Duration) -> Outcome {
    let target = Arc::new(target.clone());
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(target.clone(), deadline)))
        .collect();
    let mut outcome = Outcome::default();
    for worker in workers {
        let part = worker.await.expect("load worker panicked");
        outcome.ok += part.ok;
        outcome.failed += part.failed;
        outcome.latencies.extend(part.latencies);
    }
    outcome.latencies.sort_unstable();
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome
}

async fn connection(target: Arc<Target>, deadline: Instant) -> Outcome {
    let mut outcome = Outcome::default();
    while Instant::now() < deadline {
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
        while Instant::now() < deadline {
            let request = Request::builder()
                .method(target.method.clone())
                .uri(&target.path)
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
            outcome.latencies.push(sent.elapsed());
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
