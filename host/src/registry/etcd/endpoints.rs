//! Endpoint health: keeps members that do not answer out of the client's balancer.
//!
//! The client balances calls over every endpoint at random and keeps a dead or hung member in
//! rotation. With one of three members killed, about a third of calls fail for as long as it is
//! down. With one frozen (SIGSTOP: its sockets still accept, nothing answers), a third of the
//! attempts wait out their bound, a call whose every attempt lands there times out, and a
//! keep-alive or watch stream on it falls silent until the lease is lost.
//!
//! So this task asks each member, on a client of its own, for its status (maintenance `Status`:
//! answered from the member's memory, with no credentials, so no Authenticate and next to no
//! load on etcd), all members at once so that a hung one cannot delay the verdict on the
//! others. A member that does not answer within the probe timeout is taken out of rotation, and
//! the lease and watch tasks are told so that they re-open streams that may be stuck on it; it
//! is added back once it answers again. The last endpoint in the balancer is never removed:
//! with every member down, failing fast beats having nowhere to send a call.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::Shared;
use super::stats::Stats;

/// Runs until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let urls = shared.config.endpoint_urls();
    let probes = match probe_clients(&shared, &urls).await {
        Ok(probes) => probes,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build endpoint probes; endpoints stay in rotation");
            return;
        }
    };
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
        let mut answers = vec![false; urls.len()];
        let mut round = JoinSet::new();
        for (i, probe) in probes.iter().enumerate() {
            let probe = probe.clone();
            round.spawn(async move { (i, answers_within(probe, probe_timeout).await) });
        }
        while let Some(Ok((i, answered))) = round.join_next().await {
            answers[i] = answered;
        }
        for (i, url) in urls.iter().enumerate() {
            let others_in = in_balancer.iter().enumerate().any(|(j, &on)| on && j != i);
            if !answers[i] && in_balancer[i] && others_in {
                match shared.client.remove_endpoint(url).await {
                    Ok(()) => {
                        tracing::warn!(endpoint = %url, "etcd endpoint does not answer; taken out of rotation");
                        in_balancer[i] = false;
                        Stats::bump(&shared.stats.endpoint_removals);
                        shared.endpoint_removed.send_replace(());
                    }
                    Err(e) => tracing::warn!(endpoint = %url, error = %e, "cannot remove endpoint"),
                }
            } else if answers[i] && !in_balancer[i] {
                match shared.client.add_endpoint(url).await {
                    Ok(()) => {
                        tracing::info!(endpoint = %url, "etcd endpoint answers again; back in rotation");
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

/// One client per endpoint, without credentials: a probe must cost etcd no Authenticate.
async fn probe_clients(shared: &Shared, urls: &[String]) -> Result<Vec<Client>, String> {
    let options = super::connect_options(&shared.config).map_err(|e| e.to_string())?;
    let mut probes = Vec::new();
    for url in urls {
        let probe = Client::connect([url], Some(options.clone()))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        probes.push(probe);
    }
    Ok(probes)
}

/// Whether the member behind `probe` answers within `bound`. An error etcd itself sends (a
/// version that wants credentials for `Status`) is an answer too: the member is alive.
async fn answers_within(mut probe: Client, bound: Duration) -> bool {
    use tonic::Code;
    match timeout(bound, probe.status()).await {
        Ok(Ok(_)) => true,
        Ok(Err(etcd_client::Error::GRpcStatus(status))) => matches!(
            status.code(),
            Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
        ),
        _ => false,
    }
}
