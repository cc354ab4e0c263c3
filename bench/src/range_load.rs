//! A closed-loop etcd gRPC client: what a go-micro fleet's lookups cost etcd itself. Each
//! connection is one `etcd_client::Client` (one HTTP/2 connection, as each go-micro process
//! holds one); callers, spread over the connections, each send their next Range as soon as the
//! previous answer arrives: the shape of `load.rs`'s HTTP client, and the same `Outcome`.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};

use crate::load::Outcome;

/// Connections to etcd, kept across runs as a fleet keeps them.
pub struct RangeLoad {
    clients: Vec<Client>,
    prefix: String,
}

impl RangeLoad {
    /// Opens `connections` connections to `endpoint`; every Range reads the keys under `prefix`.
    pub async fn connect(
        endpoint: &str,
        prefix: &str,
        connections: usize,
    ) -> anyhow::Result<RangeLoad> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            clients.push(Client::connect([endpoint], None).await?);
        }
        Ok(RangeLoad {
            clients,
            prefix: prefix.into(),
        })
    }

    /// Sends Ranges from `callers` callers for `duration`: go-micro's `GetService`, a prefix
    /// read served by the member that receives it (serializable).
    pub async fn run(&self, callers: usize, duration: Duration) -> Outcome {
        let started = Instant::now();
        let deadline = started + duration;
        let callers: Vec<_> = (0..callers)
            .map(|c| {
                let client = &self.clients[c % self.clients.len()];
                let (mut kv, prefix) = (client.kv_client(), self.prefix.clone());
                tokio::spawn(async move {
                    let mut outcome = Outcome::default();
                    while Instant::now() < deadline {
                        let options = GetOptions::new().with_prefix().with_serializable();
                        let sent = Instant::now();
                        match kv.get(prefix.as_str(), Some(options)).await {
                            Ok(answer) if !answer.kvs().is_empty() => outcome.ok += 1,
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
}
