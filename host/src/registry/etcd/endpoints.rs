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
//! others. A member that misses two probes in a row (no answer within a second) is taken out of
//! rotation, and the lease and watch tasks are told so that they re-open streams that may be
//! stuck on it; it is added back once it answers again. The last endpoint in the balancer is never removed:
//! with every member down, failing fast beats having nowhere to send a call.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::Shared;
use super::stats::Stats;

/// How long a member has to answer a probe. Independent of the probe interval: a short
/// interval must not turn a loaded but healthy member into a dead one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Probes in a row a member must miss to leave rotation: one slow answer is not a dead member,
/// and every removal moves streams (the lease's, the watch's) off it.
const MISSES_TO_LEAVE: u32 = 2;

/// Runs until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let urls = shared.config.endpoint_urls();
    let mut probes = None;
    let mut in_balancer = vec![true; urls.len()];
    let mut misses = vec![0u32; urls.len()];
    let mut shutdown = shared.shutdown.subscribe();
    let mut tick = tokio::time::interval(shared.config.endpoint_probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let probes: &Vec<Client> = match &mut probes {
            Some(probes) => probes,
            slot => match probe_clients(&shared, &urls).await {
                Ok(built) => slot.insert(built),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build endpoint probes yet; retrying");
                    continue;
                }
            },
        };
        let mut answers = vec![false; urls.len()];
        let mut round = JoinSet::new();
        for (i, probe) in probes.iter().enumerate() {
            let probe = probe.clone();
            round.spawn(async move { (i, answers_within(probe, PROBE_TIMEOUT).await) });
        }
        // A probe task that panicked leaves its member unanswered: one miss.
        while let Some(joined) = round.join_next().await {
            if let Ok((i, answered)) = joined {
                answers[i] = answered;
            }
        }
        for (i, url) in urls.iter().enumerate() {
            misses[i] = if answers[i] { 0 } else { misses[i] + 1 };
            let others_in = in_balancer.iter().enumerate().any(|(j, &on)| on && j != i);
            if misses[i] >= MISSES_TO_LEAVE && in_balancer[i] && others_in {
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
    let options = super::connect::options(&shared.config).map_err(|e| e.to_string())?;
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
