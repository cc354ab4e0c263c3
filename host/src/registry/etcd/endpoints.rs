//! Endpoint health: keeps members that stopped listening out of the client's balancer.
//!
//! The client balances calls over every endpoint and keeps a dead one in rotation: with one of
//! three members killed, about a third of calls fail for as long as it is down. This task
//! probes each endpoint with a plain TCP connect (no gRPC call, so no Authenticate and no load
//! on etcd), removes one that refuses, and adds it back once it accepts again, so the member is
//! used again after its restart. It never removes the last endpoint in the balancer: with every
//! member down, failing fast beats having nowhere to send a call. A member that accepts but
//! does not answer (SIGSTOP) is left to the per-call timeouts and retries.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;

use super::Shared;
use super::stats::Stats;

/// Runs until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let urls = shared.config.endpoint_urls();
    let mut in_balancer = vec![true; urls.len()];
    let period = shared.config.endpoint_probe_interval;
    let probe_timeout = period.min(Duration::from_secs(1));
    let mut shutdown = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        for (i, url) in urls.iter().enumerate() {
            let address = url.split_once("://").map_or(url.as_str(), |(_, a)| a);
            let alive = matches!(
                timeout(probe_timeout, TcpStream::connect(address)).await,
                Ok(Ok(_))
            );
            let others_in = in_balancer.iter().enumerate().any(|(j, &on)| on && j != i);
            if !alive && in_balancer[i] && others_in {
                match shared.client.remove_endpoint(url).await {
                    Ok(()) => {
                        tracing::warn!(endpoint = %url, "etcd endpoint refuses connections; taken out of rotation");
                        in_balancer[i] = false;
                        Stats::bump(&shared.stats.endpoint_removals);
                    }
                    Err(e) => tracing::warn!(endpoint = %url, error = %e, "cannot remove endpoint"),
                }
            } else if alive && !in_balancer[i] {
                match shared.client.add_endpoint(url).await {
                    Ok(()) => {
                        tracing::info!(endpoint = %url, "etcd endpoint listens again; back in rotation");
                        in_balancer[i] = true;
                        Stats::bump(&shared.stats.endpoint_additions);
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = %url, error = %e, "cannot add endpoint back")
                    }
                }
            }
        }
    }
}
