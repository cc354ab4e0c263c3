//! The lease keeper: one lease per host, one long-lived LeaseKeepAlive stream, and the repair of
//! every owned key after any loss.
//!
//! The lease is granted by the first registration (a host that registers nothing holds no
//! lease). This task then renews it every keep-alive interval on a single stream: never a new
//! stream or a one-shot call per heartbeat, which is what once caused an Authenticate storm at
//! thousands of pods. Loss is detected three ways, and a fourth event heads it off; each leads
//! back to the top of the loop:
//!
//! - an answer with TTL 0, or "lease not found" when (re)opening the stream: the lease is gone
//!   (expired while etcd was frozen, revoked). Grant a new one and re-put every owned key.
//! - the stream ending or failing (etcd killed or restarted, connection dropped): re-open it on
//!   the same lease. etcd keeps leases across restarts with their full TTL, so usually nothing
//!   was lost.
//! - no answer for a whole TTL (etcd hung, and HTTP/2 pings have not yet ended the stream): the
//!   lease has certainly expired by etcd's clock; re-open, which finds that out.
//! - a member taken out of rotation (it stopped answering): the stream may be stuck on it, hung,
//!   so re-open it on the members still in while the lease is still alive.
//!
//! Retries use jittered exponential backoff capped at `retry_backoff_max`, forever: giving up
//! after a few tries (as Kratos does) leaves services unregistered until a restart.

use std::sync::Arc;

use tokio::time::{Instant, sleep_until, timeout};

use super::stats::Stats;
use super::{Backoff, Puts, Shared, error};
use crate::registry::ErrorKind;

/// Runs until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut lease_rx = shared.lease_id.subscribe();
    let mut endpoint_removed = shared.endpoint_removed.subscribe();
    let mut backoff = Backoff::new(shared.config.retry_backoff_max);
    let request_timeout = shared.config.request_timeout;
    let ttl = shared.config.lease_ttl;
    let interval = shared.config.effective_keep_alive_interval();
    loop {
        if shared.shutting_down() {
            return;
        }
        let current = *lease_rx.borrow_and_update();
        let Some(id) = current else {
            if shared.owned.lock().unwrap().is_empty() {
                // Nothing to keep alive until the first registration grants a lease.
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = lease_rx.changed() => {}
                    _ = shared.repair_wake.notified() => {}
                }
                continue;
            }
            // Owned keys without a lease: a registration whose first write failed, or a lost
            // lease whose re-grant failed. Grant and put everything.
            if !reput_all(&shared, None).await {
                shared.pause(&mut backoff).await;
            }
            continue;
        };

        // Marked seen before the open: a removal during it may mean the stream went to that
        // member, and is re-opened once more.
        endpoint_removed.mark_unchanged();
        let opened = timeout(request_timeout, shared.client.lease_client().keep_alive(id)).await;
        let opened = opened.map(|r| r.map_err(|e| error("lease_keep_alive", &e)));
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) if e.kind == ErrorKind::NotFound => {
                tracing::warn!(
                    lease = id,
                    "lease not found on reopening keep-alive; re-granting"
                );
                shared.record_failure();
                if !reput_all(&shared, Some(id)).await {
                    shared.pause(&mut backoff).await;
                }
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = id, error = %e, "cannot open keep-alive stream");
                shared.record_failure();
                shared.pause(&mut backoff).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(lease = id, "opening keep-alive stream timed out");
                shared.record_failure();
                shared.pause(&mut backoff).await;
                continue;
            }
        };
        Stats::bump(&shared.stats.keepalive_stream_starts);
        shared.touch();
        backoff.reset();
        if !repair(&shared).await {
            shared.pause(&mut backoff).await;
            continue;
        }

        let mut last_ack = Instant::now();
        let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                // Someone else replaced the lease (a registration found it gone): follow it.
                _ = lease_rx.changed() => break,
                // The stream may be on that member, hung: then no renewal would get through.
                _ = endpoint_removed.changed() => {
                    tracing::info!(lease = id, "an endpoint left rotation; reopening keep-alive");
                    break;
                }
                _ = shared.repair_wake.notified() => {
                    if !repair(&shared).await {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if keeper.keep_alive().await.is_err() {
                        tracing::warn!(lease = id, "keep-alive stream closed for sending");
                        break;
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(resp)) if resp.ttl() > 0 => {
                        last_ack = Instant::now();
                        shared.touch();
                    }
                    Ok(Some(_)) => {
                        tracing::warn!(lease = id, "lease expired (keep-alive answered TTL 0); re-granting");
                        shared.touch();
                        shared.record_failure();
                        reput_all(&shared, Some(id)).await;
                        break;
                    }
                    Ok(None) => {
                        tracing::warn!(lease = id, "keep-alive stream ended; reopening");
                        shared.record_failure();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "keep-alive stream failed; reopening");
                        shared.record_failure();
                        break;
                    }
                },
                _ = sleep_until(last_ack + ttl) => {
                    tracing::warn!(lease = id, "no keep-alive answer for a whole TTL; reopening");
                    shared.record_failure();
                    break;
                }
            }
        }
    }
}

/// Replaces the lease `lost` (if it is still the current one; `None`: whatever is current is
/// missing) with a new one and puts every owned key on it. Returns whether that succeeded.
async fn reput_all(shared: &Shared, lost: Option<i64>) -> bool {
    let mut lease = shared.lease.lock().await;
    if lost.is_none() && lease.is_some() {
        return true; // a registration granted one while we waited, and put its keys on it
    }
    if let Some(id) = lost {
        if *lease != lost {
            return true; // another path already replaced it and put every key on the new one
        }
        *lease = None;
        Stats::bump(&shared.stats.lease_regrants);
        shared.leases.forget(&[id]).await;
    }
    match shared.put_owned(&mut lease, &Puts::All, "reput").await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "re-putting owned keys failed; will retry");
            false
        }
    }
}

/// Puts back the owned keys the watch saw deleted or changed by someone else, and writes
/// those whose registration was answered before they could be written; those that already
/// hold this host's value on its lease are left as they are (one read), and those someone else
/// holds are marked in conflict (or dropped, if never written). Returns false if that failed;
/// the keys stay queued.
async fn repair(shared: &Shared) -> bool {
    let mut keys: Vec<String> = std::mem::take(&mut *shared.repairs.lock().unwrap());
    if keys.is_empty() {
        return true;
    }
    keys.sort();
    keys.dedup();
    let mut lease = shared.lease.lock().await;
    match shared
        .put_owned(&mut lease, &Puts::Repair(keys.clone()), "reput")
        .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "re-putting deleted owned keys failed; will retry");
            shared.repairs.lock().unwrap().extend(keys);
            false
        }
    }
}

/// Forgets the leases an earlier run left in the state dir that etcd no longer has (expired
/// or revoked): they hold no key, and the list would otherwise grow with every crash. A lease
/// whose state cannot be read now is kept, to be looked at on the next start. Runs once, at
/// connect, in a task of its own: one call per listed lease, each up to a request timeout
/// when etcd is slow, must not hold up the keep-alives of a lease granted meanwhile.
pub(crate) async fn forget_expired_leases(shared: Arc<Shared>) {
    let mut gone = Vec::new();
    for id in shared.leases.all() {
        let alive = shared
            .call("lease_ttl", |mut c| async move {
                c.lease_time_to_live(id, None).await
            })
            .await;
        // etcd answers a lease it does not have with a TTL of -1 (older versions: not found).
        match alive {
            Ok(resp) if resp.ttl() > 0 => {}
            Ok(_) => gone.push(id),
            Err(e) if e.kind == ErrorKind::NotFound => gone.push(id),
            Err(_) => {}
        }
    }
    if !gone.is_empty() {
        // Under the lease lock, which orders every write of the leases file.
        let _lease = shared.lease.lock().await;
        shared.leases.forget(&gone).await;
    }
}
