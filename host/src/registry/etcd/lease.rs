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
//!
//! The keeper owns the lease: [`Lease`] is the one record of which lease is current, and every
//! write of owned keys goes through [`Shared::put_owned`] here (grant a lease if there is none,
//! put the keys on it, grant again if etcd says it is gone), as does the release at shutdown.
//!
//! Registrations are written together ([`Shared::put_registration`], a group commit), and so are
//! deregistrations ([`Shared::delete_registration`]): one writer at a time holds the lease, and
//! those that arrive meanwhile queue; the next to hold it writes every queued request of its
//! kind in as few transactions as they fit in and answers each with its own outcome. A fleet
//! starting or stopping at once then costs a few transactions instead of one round trip per
//! process, each waiting for the one before.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{MutexGuard, Notify, oneshot, watch as signal};
use tokio::time::{Instant, sleep_until};

use super::Shared;
use super::error::{Deadline, registry_error};
use super::owned::{Asked, Owned, Puts, settle, targets};
use super::ownership::{self, Foreign, HostLeases, Target};
use super::retry::Backoff;
use super::stats::Stats;
use crate::registry::{ErrorKind, RegistryError, Takeover};

/// Registrations a write refused, by their index in its [`Puts::Registrations`].
pub(crate) type Refused = BTreeMap<usize, RegistryError>;

/// The current lease, the leases of this host, and the keys waiting to be put back.
pub(crate) struct Lease {
    /// The current lease (`None`: none granted yet, or the last one lost): the one record of
    /// it, which the keep-alive loop follows and the watch reads. Written only under `writer`.
    current: signal::Sender<Option<i64>>,
    /// Held across a grant and the puts that follow, so that one writer at a time decides
    /// which lease the owned keys are on; a deregistration holds it so that no re-put writes
    /// back the key it deletes.
    writer: tokio::sync::Mutex<()>,
    /// This host's leases, the current one and an earlier run's.
    pub(crate) mine: HostLeases,
    /// Owned keys to check and put back (see [`repair`]).
    repairs: Mutex<Vec<String>>,
    repair_wake: Notify,
    /// Registrations waiting to be written by the next holder of `writer`.
    registrations: Queue<Asked>,
    /// Deregistrations waiting, likewise.
    deregistrations: Queue<Deregistration>,
}

/// Requests of one kind waiting for the lease lock: its next holder takes them all.
struct Queue<T>(Mutex<Vec<Waiting<T>>>);

impl<T> Queue<T> {
    fn push(&self, waiting: Waiting<T>) {
        self.0.lock().unwrap().push(waiting);
    }

    fn take(&self) -> Vec<Waiting<T>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A request waiting to be written, and where its outcome goes.
struct Waiting<T> {
    request: T,
    answer: oneshot::Sender<Result<(), RegistryError>>,
}

/// Requests of a kind that the holder of the lease lock serves together ([`Shared::in_turn`]).
trait Together: Clone + Sized {
    /// Where requests of this kind wait.
    fn queue(lease: &Lease) -> &Queue<Self>;

    /// Writes `queued` together and answers each.
    async fn serve(shared: &Shared, lease: &mut LeaseGuard<'_>, queued: Vec<Waiting<Self>>);
}

impl Together for Asked {
    fn queue(lease: &Lease) -> &Queue<Self> {
        &lease.registrations
    }

    async fn serve(shared: &Shared, lease: &mut LeaseGuard<'_>, queued: Vec<Waiting<Self>>) {
        shared.put_queued(lease, queued).await
    }
}

impl Together for Deregistration {
    fn queue(lease: &Lease) -> &Queue<Self> {
        &lease.deregistrations
    }

    async fn serve(shared: &Shared, lease: &mut LeaseGuard<'_>, queued: Vec<Waiting<Self>>) {
        shared.delete_queued(lease, queued).await
    }
}

/// A node to deregister: its key, and its answer if this host no longer holds it.
#[derive(Debug, Clone)]
pub(crate) struct Deregistration {
    pub(crate) key: String,
    pub(crate) not_registered: RegistryError,
}

/// The right to change the current lease and write owned keys on it.
pub(crate) struct LeaseGuard<'a> {
    current: &'a signal::Sender<Option<i64>>,
    _writer: MutexGuard<'a, ()>,
}

impl LeaseGuard<'_> {
    pub(crate) fn id(&self) -> Option<i64> {
        *self.current.borrow()
    }

    fn set(&mut self, id: Option<i64>) {
        self.current.send_if_modified(|current| {
            let changed = *current != id;
            *current = id;
            changed
        });
    }
}

impl Lease {
    pub(crate) fn new(mine: HostLeases) -> Lease {
        Lease {
            current: signal::channel(None).0,
            writer: tokio::sync::Mutex::new(()),
            mine,
            repairs: Mutex::new(Vec::new()),
            repair_wake: Notify::new(),
            registrations: Queue(Mutex::default()),
            deregistrations: Queue(Mutex::default()),
        }
    }

    /// The current lease, if any.
    pub(crate) fn id(&self) -> Option<i64> {
        *self.current.borrow()
    }

    /// Waits for the right to change the lease and write on it.
    pub(crate) async fn lock(&self) -> LeaseGuard<'_> {
        let writer = self.writer.lock().await;
        LeaseGuard {
            current: &self.current,
            _writer: writer,
        }
    }

    /// Asks the keeper to check and put back `keys` (those still owned then).
    pub(crate) fn request_repair(&self, keys: impl IntoIterator<Item = String>) {
        self.repairs.lock().unwrap().extend(keys);
        self.repair_wake.notify_one();
    }
}

/// Runs until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut lease_rx = shared.lease.current.subscribe();
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
                    _ = shared.lease.repair_wake.notified() => {}
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
        let opened = Deadline::after(request_timeout)
            .bound("lease_keep_alive", async {
                let mut client = shared.client.lease_client();
                client
                    .keep_alive(id)
                    .await
                    .map_err(|e| registry_error("lease_keep_alive", &e))
            })
            .await;
        let (mut keeper, mut stream) = match opened {
            Ok(pair) => pair,
            Err(e) if e.kind == ErrorKind::NotFound => {
                tracing::warn!(
                    lease = id,
                    "lease not found on reopening keep-alive; re-granting"
                );
                shared.contact.record_failure();
                if !reput_all(&shared, Some(id)).await {
                    shared.pause(&mut backoff).await;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(lease = id, error = %e, "cannot open keep-alive stream");
                shared.contact.record_failure();
                shared.pause(&mut backoff).await;
                continue;
            }
        };
        Stats::bump(&shared.stats.keepalive_stream_starts);
        shared.contact.touch();
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
                _ = shared.lease.repair_wake.notified() => {
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
                        shared.contact.touch();
                    }
                    Ok(Some(_)) => {
                        tracing::warn!(lease = id, "lease expired (keep-alive answered TTL 0); re-granting");
                        shared.contact.touch();
                        shared.contact.record_failure();
                        reput_all(&shared, Some(id)).await;
                        break;
                    }
                    Ok(None) => {
                        tracing::warn!(lease = id, "keep-alive stream ended; reopening");
                        shared.contact.record_failure();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "keep-alive stream failed; reopening");
                        shared.contact.record_failure();
                        break;
                    }
                },
                _ = sleep_until(last_ack + ttl) => {
                    tracing::warn!(lease = id, "no keep-alive answer for a whole TTL; reopening");
                    shared.contact.record_failure();
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
    if lost.is_none() && lease.id().is_some() {
        return true; // a registration granted one while we waited, and put its keys on it
    }
    if let Some(id) = lost {
        if lease.id() != lost {
            return true; // another path already replaced it and put every key on the new one
        }
        lease.set(None);
        Stats::bump(&shared.stats.lease_regrants);
        shared.lease.mine.forget(&[id]).await;
    }
    match shared.put_owned(&mut lease, &Puts::All).await {
        Ok(_) => true,
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
    let mut keys: Vec<String> = std::mem::take(&mut *shared.lease.repairs.lock().unwrap());
    if keys.is_empty() {
        return true;
    }
    keys.sort();
    keys.dedup();
    let mut lease = shared.lease.lock().await;
    match shared
        .put_owned(&mut lease, &Puts::Repair(keys.clone()))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "re-putting deleted owned keys failed; will retry");
            shared.lease.repairs.lock().unwrap().extend(keys);
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
    for id in shared.lease.mine.all() {
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
        shared.lease.mine.forget(&gone).await;
    }
}

/// What a write of owned keys is, which decides how it is counted: a registration, answered
/// to its caller, or a re-put of keys this host holds already (also counted in `reputs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Registration,
    Reput,
}

impl Write {
    fn op(self) -> &'static str {
        match self {
            Write::Registration => "register",
            Write::Reput => "reput",
        }
    }
}

impl Shared {
    /// Writes a registration's `keys` (each with the serial of the entry it put in `owned`):
    /// [`Shared::put_owned`] for it, together with every registration queued meanwhile (see
    /// the module doc). Answers its own outcome: `Ok`, its conflict, or the error of the write
    /// (which then failed every registration written with it). A caller that stops waiting
    /// (its deadline) leaves its keys queued, to be written as those of a registration
    /// answered before its write.
    pub(crate) async fn put_registration(
        &self,
        keys: Vec<(String, u64)>,
        takeover: Takeover,
    ) -> Result<(), RegistryError> {
        let asked = Asked {
            keys,
            takeover: Some(takeover),
        };
        self.in_turn(asked).await
    }

    /// Deletes a node this host registered, with every deregistration queued meanwhile, and
    /// removes it from `owned` once etcd confirmed (see `EtcdRegistry::deregister`). A caller
    /// that stops waiting (its deadline) is answered with its timeout: its key stays.
    pub(crate) async fn delete_registration(
        &self,
        deregistration: Deregistration,
    ) -> Result<(), RegistryError> {
        self.in_turn(deregistration).await
    }

    /// Queues `request` and waits for its outcome: whoever holds the lease lock next takes
    /// every request of its queue and serves them together, answering each; this caller, when
    /// it is that holder. Cancel-safe: a holder that stops serving (its own deadline) leaves
    /// the requests it took unanswered, and they queue again.
    async fn in_turn<T: Together>(&self, request: T) -> Result<(), RegistryError> {
        let queue = T::queue(&self.lease);
        loop {
            let (answer, mut answered) = oneshot::channel();
            queue.push(Waiting {
                request: request.clone(),
                answer,
            });
            let outcome = tokio::select! {
                // An earlier holder may have served it while this one waited for the lock.
                biased;
                outcome = &mut answered => outcome,
                mut lease = self.lease.lock() => {
                    T::serve(self, &mut lease, queue.take()).await;
                    drop(lease);
                    // Answered now: by this holder, or by an earlier one before it let go.
                    answered.await
                }
            };
            match outcome {
                Ok(outcome) => return outcome,
                // The holder that took it stopped before answering.
                Err(_) => continue,
            }
        }
    }

    /// Writes the `queued` registrations together and answers each. A refusal that is no
    /// conflict (a transaction too large, a permission denied) may be one registration's doing
    /// and would be forever: then each is written alone, so that only its own is refused. An
    /// outage fails each (their callers keep them, to be written later).
    async fn put_queued(&self, lease: &mut LeaseGuard<'_>, queued: Vec<Waiting<Asked>>) {
        if queued.is_empty() {
            return;
        }
        let asked: Vec<Asked> = queued
            .iter()
            .map(|q| Asked {
                keys: q.request.keys.clone(),
                takeover: q.request.takeover.filter(|_| !q.answer.is_closed()),
            })
            .collect();
        let together = self
            .put_owned(lease, &Puts::Registrations(asked.clone()))
            .await;
        let outcomes: Vec<Result<(), RegistryError>> = match together {
            Ok(mut refused) => (0..asked.len())
                .map(|i| refused.remove(&i).map_or(Ok(()), Err))
                .collect(),
            Err(e) if asked.len() > 1 && !e.kind.is_outage() => {
                tracing::warn!(
                    error = %e,
                    registrations = asked.len(),
                    "registrations written together were refused; writing each alone"
                );
                let mut outcomes = Vec::with_capacity(asked.len());
                for one in &asked {
                    let alone = Puts::Registrations(vec![one.clone()]);
                    let outcome = self.put_owned(lease, &alone).await;
                    outcomes.push(outcome.and_then(|mut r| r.remove(&0).map_or(Ok(()), Err)));
                }
                outcomes
            }
            Err(e) => vec![Err(e); asked.len()],
        };
        for ((queued, asked), outcome) in queued.into_iter().zip(asked).zip(outcomes) {
            // A registration whose caller left is kept, as one answered during an outage is:
            // written when etcd takes it.
            if asked.takeover.is_none() && outcome.is_err() {
                self.lease
                    .request_repair(asked.keys.into_iter().map(|(k, _)| k));
            }
            let _ = queued.answer.send(outcome);
        }
    }

    /// Deletes the `queued` deregistrations' keys together ([`ownership::delete_own`]) and
    /// answers each. A key no longer owned (a concurrent deregistration won) is not registered;
    /// one whose caller stopped waiting is left, owned, as if the delete had not been reached.
    /// The keys stay owned until etcd confirms: an error answers each, and they stay registered
    /// (one an earlier transaction of the batch deleted is put back, as any owned key the watch
    /// sees deleted is, until its caller tries again).
    async fn delete_queued(
        &self,
        lease: &mut LeaseGuard<'_>,
        queued: Vec<Waiting<Deregistration>>,
    ) {
        let mut keys: Vec<(String, Owned)> = Vec::new();
        let mut deleting = Vec::new();
        {
            let owned = self.owned.lock().unwrap();
            let mut taken = BTreeSet::new();
            for waiting in queued {
                if waiting.answer.is_closed() {
                    continue;
                }
                let key = waiting.request.key;
                match owned.get(&key) {
                    Some(entry) if taken.insert(key.clone()) => {
                        keys.push((key, entry.clone()));
                        deleting.push(waiting.answer);
                    }
                    _ => {
                        let _ = waiting.answer.send(Err(waiting.request.not_registered));
                    }
                }
            }
        }
        if keys.is_empty() {
            return;
        }
        let deleted = ownership::delete_own(self, "deregister", &keys, lease.id()).await;
        if deleted.is_ok() {
            let mut owned = self.owned.lock().unwrap();
            for (key, _) in &keys {
                owned.remove(key);
            }
        }
        for answer in deleting {
            let _ = answer.send(deleted.clone());
        }
    }

    /// Puts owned keys on the current lease, granting one first if there is none. If etcd
    /// says the lease is gone, grants a new one and puts every owned key on it. Keys someone
    /// else holds are refused, yielded (marked in conflict, or dropped if never written) or
    /// taken, as [`targets`] says (see [`ownership`]); returns the registrations refused.
    pub(crate) async fn put_owned(
        &self,
        lease: &mut LeaseGuard<'_>,
        puts: &Puts,
    ) -> Result<Refused, RegistryError> {
        // A registration's keys are counted as the registration, every other key (those of a
        // new lease) as a re-put.
        let write = match puts {
            Puts::Registrations(_) => Write::Registration,
            Puts::Repair(_) | Puts::All => Write::Reput,
        };
        let mut everything = false;
        for _ in 0..2 {
            let id = match lease.id() {
                Some(id) => id,
                None => {
                    let id = self.grant().await?;
                    lease.set(Some(id));
                    everything = true;
                    id
                }
            };
            // The lease lock keeps deregistrations out until the writes are done, so a key
            // deregistered meanwhile is not written back.
            let targets = targets(&self.owned.lock().unwrap(), puts, everything);
            // A registration refused for one of its nodes must not stop the other keys of a
            // new lease from being put on it: those are written first, in their own write.
            let (refusable, others): (Vec<Target>, Vec<Target>) = targets
                .into_iter()
                .partition(|t| t.foreign == Foreign::Refuse);
            let written = match self.write_settled(Write::Reput, id, others).await {
                Ok(_) => self.write_settled(write, id, refusable).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(refused) => return Ok(refused),
                // A put on a lease etcd no longer has (expired, revoked, lost) is refused as
                // not found; nothing else in these transactions can be.
                Err(e) if e.kind == ErrorKind::NotFound => {
                    tracing::warn!(lease = id, "lease gone while putting; granting a new one");
                    Stats::bump(&self.stats.lease_regrants);
                    self.lease.mine.forget(&[id]).await;
                    lease.set(None);
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::new(
            ErrorKind::Unavailable,
            write.op(),
            "the lease was lost twice in a row",
        ))
    }

    /// Grants a lease of the configured TTL and records it as this host's before any key is
    /// on it: a crash from then on leaves a lease that the next run recognizes as its own.
    async fn grant(&self) -> Result<i64, RegistryError> {
        let ttl = self.config.lease_ttl.as_secs() as i64;
        let granted = self
            .call("lease_grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        Stats::bump(&self.stats.lease_grants);
        tracing::info!(lease = granted.id(), ttl = granted.ttl(), "granted lease");
        self.lease.mine.add(granted.id()).await;
        Ok(granted.id())
    }

    /// Writes `targets` ([`ownership::write`]) and records what it found ([`settle`]):
    /// conflicts that start and registrations refused when written late are counted and
    /// logged. Returns the registrations refused now (their callers answer for them).
    async fn write_settled(
        &self,
        write: Write,
        lease: i64,
        targets: Vec<Target>,
    ) -> Result<Refused, RegistryError> {
        if targets.is_empty() {
            return Ok(Refused::new());
        }
        let checked: Vec<(String, u64, Option<usize>)> = targets
            .iter()
            .map(|t| (t.key.clone(), t.owned.serial, t.registration))
            .collect();
        let written = ownership::write(self, write.op(), lease, targets).await?;
        // Nothing of a refused registration was written.
        let checked: Vec<(String, u64)> = checked
            .into_iter()
            .filter(|(_, _, registration)| !written.refuses(*registration))
            .map(|(key, serial, _)| (key, serial))
            .collect();
        if write == Write::Reput {
            let count = written.count as u64;
            self.stats.reputs.fetch_add(count, Ordering::Relaxed);
        }
        let settled = settle(&mut self.owned.lock().unwrap(), &checked, &written.yielded);
        for (key, owner) in settled.conflicts {
            Stats::bump(&self.stats.conflicts);
            tracing::warn!(
                key,
                owner_lease = owner,
                "a registration of this host is held by someone else; not writing it back \
                 while they hold it"
            );
        }
        for (key, owner) in settled.refused {
            Stats::bump(&self.stats.conflicts);
            tracing::warn!(
                key,
                owner_lease = owner,
                "registration refused when written (it was answered during an outage): someone \
                 else holds the node; dropped"
            );
        }
        Ok(written.refused)
    }

    /// At shutdown: deletes this host's `owned` keys and revokes its lease, so that none is
    /// left in etcd. The revocation takes the keys on the lease with it, but not an owned key
    /// someone rewrote on no lease (`etcdctl put`) and that was not put back yet: it would stay
    /// for ever. Hence the guarded deletes (never of someone else's key), first: once the
    /// lease is revoked, the node is free for another host to register, and a delete after
    /// that could meet its registration.
    pub(crate) async fn release(&self, lease: &mut LeaseGuard<'_>, owned: &[(String, Owned)]) {
        // One request timeout for both steps: with etcd hung (a hung etcd fails the first
        // delete and stops them), a shutdown must not wait a timeout per step (a pod's grace
        // period is typically 30 s, drain included).
        let deadline = Deadline::after(self.config.request_timeout);
        let op = "shutdown_delete";
        let deleted = self
            .within(
                op,
                deadline,
                ownership::delete_own(self, op, owned, lease.id()),
            )
            .await;
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "could not delete this host's keys; those on its lease expire by TTL");
        }
        let Some(id) = lease.id() else {
            return;
        };
        lease.set(None);
        let revoke = self.call(
            "lease_revoke",
            |mut c| async move { c.lease_revoke(id).await },
        );
        match self.within("lease_revoke", deadline, revoke).await {
            Ok(_) => {
                tracing::info!(lease = id, "revoked lease");
                self.lease.mine.forget(&[id]).await;
            }
            Err(e) => {
                tracing::warn!(lease = id, error = %e, "could not revoke lease; it expires by TTL")
            }
        }
    }
}
