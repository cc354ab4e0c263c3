//! Ownership of registry keys: which leases are this host's, and the transactions that write an
//! owned key only while no other host's lease holds it.
//!
//! A key belongs to the lease it is on. This host's leases are the current one and those an
//! earlier run of the host granted that may still hold its keys (after a crash they live up to a
//! TTL). They are remembered in [`LEASES_FILE`] in the state dir, recorded before any key is put
//! on a new lease, so that a restarted host recognizes every lease its keys can be on and
//! re-registers them without a conflict. Lease ids are chosen by etcd and unique in a cluster,
//! so a listed lease is this host's and no other's; a listed lease that expired is dropped at
//! the next connect. Without a state dir only the current lease is known: a restarted host
//! meets its previous run's nodes as another host's until that lease expires (one TTL).
//!
//! The list is only worth trusting if its lister is this host. Two hosts sharing a state dir
//! (a shared volume) would each take the other's leases for its own and overwrite each other's
//! list: the first holds [`LOCK_FILE`] locked (`flock`) while it runs, and a second one runs
//! without the list, warned. A state dir copied to another machine (a VM image, a restored
//! backup) holds another host's list: the list records the host name of its writer, and a list
//! recorded under another name is ignored, warned. (A random id kept beside the list would not
//! tell them apart: it is copied with it.)
//!
//! A key on no lease is this host's only if this host wrote that node in this run (someone
//! rewrote it since, by hand with `etcdctl put`: it is put back, and deleted at shutdown) or
//! if it holds exactly this host's value; any other is someone else's (go-micro registers
//! without a lease when its `RegisterTTL` is 0). A key on a lease that is not this host's is
//! another host's. Someone else's key is refused to a registration
//! ([`ErrorKind::Conflict`](crate::registry::ErrorKind::Conflict), with the owner's lease, 0
//! for none) unless forced; a registration not yet written when it was answered (an outage)
//! is checked the same way when it is written, and dropped if refused; a registration already
//! written yields the key, as a conflict.
//!
//! Every write is one transaction comparing each key's modification revision with the one the
//! decision was made on (or its absence), so two hosts registering one node cannot both win:
//! the loser reads the winner's lease and meets a conflict.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::Shared;
use super::owned::Owned;
use crate::fsutil::{read_regular, write_atomically};
use crate::registry::{ErrorKind, RegistryError, Takeover};

/// The file, in the state dir, listing this host's leases: a `host <name>` line naming its
/// writer, then one decimal lease id a line.
pub(crate) const LEASES_FILE: &str = "etcd-leases";

/// The file, beside [`LEASES_FILE`], that the host using the list holds locked.
const LOCK_FILE: &str = "etcd-leases.lock";

/// Largest leases file read: a line per lease this host granted that may still hold its keys,
/// a handful; a file of megabytes is not one this host wrote.
const MAX_LEASES_FILE: u64 = 64 * 1024;

/// Keys per transaction: etcd refuses more than 128 operations in one (`--max-txn-ops`).
const TXN_KEYS: usize = 64;

/// Bytes of keys and values put per transaction, unless one key alone is larger: etcd refuses
/// a request over 1.5 MiB (`--max-request-bytes`), and registrations written together must not
/// add up to a refusal that none of them would meet alone.
const TXN_BYTES: usize = 1024 * 1024;

/// Transactions per batch of keys before giving up: each retry means another writer changed a
/// key between the read and the write, which a few rounds outlast.
const TXN_ROUNDS: usize = 5;

/// This host's leases: the current one and the earlier ones that may still hold its keys.
pub(crate) struct HostLeases {
    /// The leases file, when this host is its one user (it holds the lock).
    file: Option<PathBuf>,
    /// The lock on [`LOCK_FILE`], released when this is dropped (or the process dies).
    _lock: Option<File>,
    /// This host's name, recorded in the file.
    host: String,
    known: Mutex<BTreeSet<i64>>,
}

impl HostLeases {
    /// The leases listed in `dir`'s [`LEASES_FILE`] (none without a dir or a file). Every
    /// case in which the list cannot be trusted or kept is logged and runs without it: the
    /// host still works, it only meets its earlier nodes as conflicts until their lease
    /// expires. Those are a file that cannot be read or was written under another host name,
    /// and a lock that cannot be taken (another process uses the dir, or it cannot be
    /// written: a list that cannot be kept current would soon be wrong).
    pub(crate) fn load(dir: Option<&Path>) -> HostLeases {
        let host = hostname();
        let without_file = |host| HostLeases {
            file: None,
            _lock: None,
            host,
            known: Mutex::default(),
        };
        let Some(dir) = dir else {
            return without_file(host);
        };
        let lock = match lock(dir) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "another process uses this state dir's etcd leases ({LOCK_FILE} is locked); \
                     running without remembering leases"
                );
                return without_file(host);
            }
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot lock this state dir's etcd leases; running without remembering leases"
                );
                return without_file(host);
            }
        };
        let file = dir.join(LEASES_FILE);
        let known = match read_regular(&file, MAX_LEASES_FILE) {
            Ok(bytes) => match parse(&String::from_utf8_lossy(&bytes)) {
                (Some(writer), leases) if writer == host => leases,
                (writer, _) => {
                    tracing::warn!(
                        path = %file.display(),
                        written_by = writer.as_deref().unwrap_or("(no host line)"),
                        host,
                        "the etcd leases listed were recorded by another host (a copied state \
                         dir?); ignoring them"
                    );
                    BTreeSet::new()
                }
            },
            Err(e) if e.is_not_found() => BTreeSet::new(),
            Err(e) => {
                tracing::warn!(
                    path = %file.display(),
                    error = %e,
                    "cannot read this host's earlier leases; ignoring them"
                );
                BTreeSet::new()
            }
        };
        HostLeases {
            file: Some(file),
            _lock: Some(lock),
            host,
            known: Mutex::new(known),
        }
    }

    /// Every lease this host knows as its own.
    pub(crate) fn all(&self) -> Vec<i64> {
        self.known.lock().unwrap().iter().copied().collect()
    }

    /// Whether `lease` is this host's.
    pub(crate) fn is_mine(&self, lease: i64) -> bool {
        self.known.lock().unwrap().contains(&lease)
    }

    /// Records a lease just granted, before any key is put on it. Callers hold the lease lock,
    /// which keeps the file's writes in order.
    pub(crate) async fn add(&self, lease: i64) {
        self.known.lock().unwrap().insert(lease);
        self.save().await;
    }

    /// Forgets leases that are gone (expired, revoked).
    pub(crate) async fn forget(&self, leases: &[i64]) {
        let changed = {
            let mut known = self.known.lock().unwrap();
            let before = known.len();
            known.retain(|l| !leases.contains(l));
            known.len() != before
        };
        if changed {
            self.save().await;
        }
    }

    /// Writes the list on a blocking thread (fsync takes milliseconds). A failure is logged:
    /// the host keeps working, and only a crash before the next successful write costs the
    /// recognition of its earlier nodes.
    async fn save(&self) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let text = render(&self.host, &self.known.lock().unwrap());
        let written =
            tokio::task::spawn_blocking(move || write_atomically(&file, text.as_bytes())).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot record this host's leases"),
            Err(e) => tracing::warn!(error = %e, "recording this host's leases failed"),
        }
    }
}

/// Takes the lock on `dir`'s [`LOCK_FILE`] without waiting: `None` if another process holds
/// it. `flock`, not `fcntl` locks: it belongs to the open file, so a second registry in the
/// same process is refused too, and it goes with the file (or the process).
fn lock(dir: &Path) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        // A FIFO planted there must not block the start (without a reader it is refused).
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(dir.join(LOCK_FILE))?;
    // SAFETY: `file` stays open for the call; flock takes no pointer.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// This machine's host name (empty if it has none).
fn hostname() -> String {
    let mut name = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is the length passed.
    if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } != 0 {
        return String::new();
    }
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..len]).into_owned()
}

const HOST_LINE: &str = "host ";

/// The writer's host name (the first line) and the leases listed.
fn parse(text: &str) -> (Option<String>, BTreeSet<i64>) {
    let mut lines = text.lines();
    let host = lines
        .next()
        .and_then(|l| l.strip_prefix(HOST_LINE))
        .map(String::from);
    let leases = lines
        .filter_map(|l| l.trim().parse().ok())
        .filter(|l| *l != 0)
        .collect();
    (host, leases)
}

fn render(host: &str, leases: &BTreeSet<i64>) -> String {
    let mut text = format!("{HOST_LINE}{host}\n");
    text.extend(leases.iter().map(|l| format!("{l}\n")));
    text
}

/// What etcd holds at a key, as far as ownership goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held<'a> {
    lease: i64,
    mod_revision: i64,
    value: &'a [u8],
}

/// What to do with one owned key, given what etcd holds there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Write it, provided the key is still absent (`None`) or still at that modification
    /// revision.
    Write(Option<i64>),
    /// It already holds this host's value on the current lease.
    Done,
    /// Another host's lease holds it, since that modification revision.
    Foreign {
        /// The lease that holds it.
        owner: i64,
        /// Its modification revision.
        mod_revision: i64,
    },
}

/// Decides what to do with a key this host wants to hold `ours` on `lease`; `written`: this
/// host wrote that node in this run (see the module doc for a key on no lease).
pub(crate) fn decide(
    held: Option<Held<'_>>,
    ours: &[u8],
    lease: i64,
    is_mine: impl Fn(i64) -> bool,
    written: bool,
) -> Step {
    let Some(held) = held else {
        return Step::Write(None);
    };
    if held.lease == lease && held.value == ours {
        return Step::Done;
    }
    let this_hosts = if held.lease == 0 {
        written || held.value == ours
    } else {
        held.lease == lease || is_mine(held.lease)
    };
    if this_hosts {
        return Step::Write(Some(held.mod_revision));
    }
    Step::Foreign {
        owner: held.lease,
        mod_revision: held.mod_revision,
    }
}

/// What a write does about a key another host's lease holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Foreign {
    /// Refuse the key's registration with a conflict, writing none of its keys (the
    /// transaction's other registrations are written).
    Refuse,
    /// Leave the key alone and report it; write the others (re-puts and repairs).
    Yield,
    /// Write it anyway (a forced registration).
    Take,
}

impl From<Takeover> for Foreign {
    fn from(takeover: Takeover) -> Self {
        match takeover {
            Takeover::Refuse => Foreign::Refuse,
            Takeover::Force => Foreign::Take,
        }
    }
}

/// One owned key to write, and what to do if someone else holds it.
pub(crate) struct Target {
    pub(crate) key: String,
    pub(crate) owned: Owned,
    pub(crate) foreign: Foreign,
    /// The registration this write answers that the key is one of (an index the caller
    /// chose), if any: [`Foreign::Refuse`] refuses that registration, and its keys are kept in
    /// one transaction when they fit.
    pub(crate) registration: Option<usize>,
}

impl Target {
    /// What the key adds to a transaction's size.
    fn bytes(&self) -> usize {
        self.key.len() + self.owned.value.len()
    }
}

/// What [`write`] did.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// Keys written (those that already held this host's value on its lease are not).
    pub(crate) count: usize,
    /// Keys left to another lease ([`Foreign::Yield`]), with that lease.
    pub(crate) yielded: Vec<(String, i64)>,
    /// Registrations refused ([`Foreign::Refuse`]), each with its conflict; none of their keys
    /// was written, unless a registration too large for one transaction had some written by
    /// an earlier one.
    pub(crate) refused: BTreeMap<usize, RegistryError>,
}

impl Written {
    /// Whether `registration` was refused.
    pub(crate) fn refuses(&self, registration: Option<usize>) -> bool {
        registration.is_some_and(|r| self.refused.contains_key(&r))
    }
}

/// Writes `targets` on `lease`, each key only if it is this host's (absent, on one of its
/// leases, or on no lease as the module doc says) or, with [`Foreign::Take`], anyone's, in as
/// few transactions as [`TXN_KEYS`] and [`TXN_BYTES`] allow ([`transactions`]). A key with
/// [`Foreign::Refuse`] that is someone else's refuses its registration: none of that
/// registration's keys is written, the others are.
pub(crate) async fn write(
    shared: &Shared,
    op: &'static str,
    lease: i64,
    targets: Vec<Target>,
) -> Result<Written, RegistryError> {
    let mut written = Written::default();
    for mut batch in transactions(targets) {
        // The rest of a registration too large for one transaction, refused in an earlier one.
        batch.retain(|t| !written.refuses(t.registration));
        write_batch(shared, op, lease, batch, &mut written).await?;
    }
    Ok(written)
}

/// Packs `targets` into transactions of at most [`TXN_KEYS`] keys and [`TXN_BYTES`] bytes
/// (or one key, if larger), in order, without splitting a registration's keys (consecutive,
/// as [`targets`](super::owned::targets) puts them) unless it is too large for one alone: one
/// registration's refusal then costs nothing of the others in other transactions.
fn transactions(targets: Vec<Target>) -> Vec<Vec<Target>> {
    let mut batches = Vec::new();
    let mut batch: Vec<Target> = Vec::new();
    let mut bytes = 0;
    let mut targets = targets.into_iter().peekable();
    while let Some(first) = targets.next() {
        let mut unit = vec![first];
        let registration = unit[0].registration;
        while let Some(next) =
            targets.next_if(|t| registration.is_some() && t.registration == registration)
        {
            unit.push(next);
        }
        let unit_bytes: usize = unit.iter().map(Target::bytes).sum();
        let fits = batch.len() + unit.len() <= TXN_KEYS && bytes + unit_bytes <= TXN_BYTES;
        if !fits && !batch.is_empty() {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        for target in unit {
            let full = batch.len() == TXN_KEYS || bytes + target.bytes() > TXN_BYTES;
            if full && !batch.is_empty() {
                batches.push(std::mem::take(&mut batch));
                bytes = 0;
            }
            bytes += target.bytes();
            batch.push(target);
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

async fn write_batch(
    shared: &Shared,
    op: &'static str,
    lease: i64,
    mut batch: Vec<Target>,
    written: &mut Written,
) -> Result<(), RegistryError> {
    // First guess: every key is absent (a registration of a new node, a re-put after the lease
    // took the keys with it), which makes the usual case one round trip.
    let mut expected: BTreeMap<String, Option<i64>> =
        batch.iter().map(|t| (t.key.clone(), None)).collect();
    for _ in 0..TXN_ROUNDS {
        if batch.is_empty() {
            return Ok(());
        }
        let compares: Vec<Compare> = batch
            .iter()
            .map(|t| match expected[&t.key] {
                None => Compare::create_revision(t.key.as_str(), CompareOp::Equal, 0),
                Some(rev) => Compare::mod_revision(t.key.as_str(), CompareOp::Equal, rev),
            })
            .collect();
        let puts: Vec<TxnOp> = batch
            .iter()
            .map(|t| {
                let options = PutOptions::new().with_lease(lease);
                TxnOp::put(t.key.as_str(), t.owned.value.clone(), Some(options))
            })
            .collect();
        let gets: Vec<TxnOp> = batch
            .iter()
            .map(|t| TxnOp::get(t.key.as_str(), None))
            .collect();
        let txn = Txn::new().when(compares).and_then(puts).or_else(gets);
        let resp = shared
            .call(op, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            written.count += batch.len();
            return Ok(());
        }
        // Someone else's write came first somewhere: decide again on what etcd holds now.
        let responses = resp.op_responses();
        let mut next = Vec::with_capacity(batch.len());
        for (target, response) in batch.into_iter().zip(&responses) {
            let TxnOpResponse::Get(got) = response else {
                continue;
            };
            let held = got.kvs().first().map(|kv| Held {
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
                value: kv.value(),
            });
            let owned = &target.owned;
            let is_mine = |l| shared.lease.mine.is_mine(l);
            match decide(held, &owned.value, lease, is_mine, owned.is_written()) {
                Step::Done => {}
                Step::Write(expect) => {
                    expected.insert(target.key.clone(), expect);
                    next.push(target);
                }
                Step::Foreign {
                    owner,
                    mod_revision,
                } => match target.foreign {
                    Foreign::Refuse => {
                        let node = owned.service.nodes.first().map_or("", |n| n.id.as_str());
                        let conflict =
                            RegistryError::conflict(op, &owned.service.name, node, owner);
                        let Some(registration) = target.registration else {
                            return Err(conflict);
                        };
                        // The first conflict found names the registration's refusal.
                        written.refused.entry(registration).or_insert(conflict);
                    }
                    Foreign::Yield => written.yielded.push((target.key, owner)),
                    Foreign::Take => {
                        tracing::warn!(
                            key = target.key,
                            owner_lease = owner,
                            "forced registration: taking over a node someone else holds"
                        );
                        expected.insert(target.key.clone(), Some(mod_revision));
                        next.push(target);
                    }
                },
            }
        }
        // A refused registration writes none of its keys, whatever was decided for the others.
        next.retain(|t| !written.refuses(t.registration));
        batch = next;
    }
    Err(RegistryError::new(
        ErrorKind::Unavailable,
        op,
        format!("the keys kept changing under {TXN_ROUNDS} transactions in a row"),
    ))
}

/// Deletes each of `keys` that is this host's: on `lease`, or on no lease as the module doc
/// says (what [`decide`] would write over); not someone else's that took one over meanwhile.
/// [`TXN_KEYS`] keys a transaction; stops at the first that fails.
pub(crate) async fn delete_own(
    shared: &Shared,
    op: &'static str,
    keys: &[(String, Owned)],
    lease: Option<i64>,
) -> Result<(), RegistryError> {
    for batch in keys.chunks(TXN_KEYS) {
        // etcd's compares are all-of: "on no lease (and, for a node not written in this run,
        // with this host's value), or else on ours" is a guarded transaction per key, nested
        // in one that always applies.
        let guarded: Vec<TxnOp> = batch
            .iter()
            .map(|(key, owned)| {
                let on = |l: i64| Compare::lease(key.as_str(), CompareOp::Equal, l);
                let delete = || TxnOp::delete(key.as_str(), None::<DeleteOptions>);
                let mut leaseless = vec![on(0)];
                if !owned.is_written() {
                    let ours = owned.value.clone();
                    leaseless.push(Compare::value(key.as_str(), CompareOp::Equal, ours));
                }
                let mut txn = Txn::new().when(leaseless).and_then([delete()]);
                if let Some(lease) = lease {
                    txn = txn.or_else([TxnOp::txn(
                        Txn::new().when([on(lease)]).and_then([delete()]),
                    )]);
                }
                TxnOp::txn(txn)
            })
            .collect();
        let txn = Txn::new().and_then(guarded);
        shared
            .call(op, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(lease: i64, value: &[u8]) -> Option<Held<'_>> {
        Some(Held {
            lease,
            mod_revision: 7,
            value,
        })
    }

    #[test]
    fn a_key_is_written_when_absent_or_on_one_of_this_hosts_leases() {
        let mine = |l: i64| l == 40;
        let d = |h| decide(h, b"ours", 41, mine, true);
        assert_eq!(d(None), Step::Write(None));
        assert_eq!(
            d(held(0, b"x")),
            Step::Write(Some(7)),
            "a node this host wrote, put by hand since"
        );
        assert_eq!(
            d(held(40, b"ours")),
            Step::Write(Some(7)),
            "an earlier run's lease: moved to the current one"
        );
        assert_eq!(d(held(41, b"old")), Step::Write(Some(7)));
        assert_eq!(d(held(41, b"ours")), Step::Done);
    }

    #[test]
    fn another_hosts_key_is_foreign_even_with_this_hosts_value() {
        let foreign = Step::Foreign {
            owner: 99,
            mod_revision: 7,
        };
        let d = |h| decide(h, b"ours", 41, |_| false, true);
        assert_eq!(d(held(99, b"theirs")), foreign);
        assert_eq!(d(held(99, b"ours")), foreign);
    }

    /// go-micro registers on no lease when its `RegisterTTL` is 0: such a node is someone
    /// else's unless this host wrote it in this run or it holds this host's value.
    #[test]
    fn a_leaseless_key_of_a_node_this_host_never_wrote_is_someone_elses() {
        let unwritten = |h| decide(h, b"ours", 41, |_| false, false);
        assert_eq!(
            unwritten(held(0, b"theirs")),
            Step::Foreign {
                owner: 0,
                mod_revision: 7
            }
        );
        assert_eq!(unwritten(held(0, b"ours")), Step::Write(Some(7)));
        assert_eq!(unwritten(None), Step::Write(None));
    }

    fn target(node: &str, value_bytes: usize, registration: Option<usize>) -> Target {
        let mut service = crate::registry::one_node_service("svc", "1", node);
        service.metadata = [("pad".to_string(), "x".repeat(value_bytes))].into();
        Target {
            key: node.to_string(),
            owned: Owned::new(service, None),
            foreign: Foreign::Refuse,
            registration,
        }
    }

    fn shape(batches: &[Vec<Target>]) -> Vec<Vec<Option<usize>>> {
        batches
            .iter()
            .map(|b| b.iter().map(|t| t.registration).collect())
            .collect()
    }

    /// Registrations written together share transactions up to etcd's limits, and one that
    /// fits in a transaction is never split across two (its refusal must cost the others
    /// nothing); one too large for any is split, as a single registration always was.
    #[test]
    fn registrations_are_packed_into_transactions_whole() {
        let keys = |registration, n| {
            (0..n).map(move |i| target(&format!("{registration}-{i}"), 0, Some(registration)))
        };
        let targets: Vec<Target> = keys(0, 40)
            .chain(keys(1, 30))
            .chain(keys(2, 1))
            .chain([target("rest", 0, None)])
            .collect();
        let batches = transactions(targets);
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [40, 32], "{:?}", shape(&batches));
        assert!(batches[1].iter().all(|t| t.registration != Some(0)));

        let batches = transactions(keys(0, TXN_KEYS * 2 + 1).collect());
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [TXN_KEYS, TXN_KEYS, 1], "too large for one: split");

        // Bytes too: values of 40% of the bound go two by two.
        let large = TXN_BYTES * 2 / 5;
        let big: Vec<Target> = (0..4)
            .map(|i| target(&format!("big-{i}"), large, Some(i)))
            .collect();
        let sizes: Vec<usize> = transactions(big).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2]);
    }

    #[test]
    fn the_leases_file_round_trips_and_skips_junk() {
        let set: BTreeSet<i64> = [7587, 12].into_iter().collect();
        assert_eq!(parse(&render("h1", &set)), (Some("h1".into()), set.clone()));
        assert_eq!(
            parse("host h1\n12\n\n  7587 \nnot a lease\n0\n"),
            (Some("h1".into()), set.clone()),
            "blank, junk and zero (no lease) lines are skipped"
        );
        assert_eq!(parse("12\n7587\n").0, None, "no host line");
    }

    #[tokio::test]
    async fn leases_are_remembered_in_the_state_dir_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let first = HostLeases::load(Some(dir.path()));
        assert!(first.all().is_empty());
        first.add(5).await;
        first.add(6).await;
        first.forget(&[5]).await;
        drop(first);
        let second = HostLeases::load(Some(dir.path()));
        assert!(
            second.is_mine(6) && !second.is_mine(5),
            "{:?}",
            second.all()
        );
        // Without a state dir nothing is remembered, and nothing is written.
        let none = HostLeases::load(None);
        none.add(9).await;
        assert!(none.is_mine(9));
        assert!(HostLeases::load(None).all().is_empty());
    }

    /// Two hosts on one state dir (a shared volume): the second runs without the list, so
    /// that neither takes the other's leases for its own nor overwrites its list.
    #[tokio::test]
    async fn a_second_user_of_the_state_dir_runs_without_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let first = HostLeases::load(Some(dir.path()));
        first.add(5).await;
        let second = HostLeases::load(Some(dir.path()));
        assert!(!second.is_mine(5), "{:?}", second.all());
        second.add(6).await;
        drop((first, second));
        let third = HostLeases::load(Some(dir.path()));
        assert_eq!(
            third.all(),
            [5],
            "the first's list, untouched by the second"
        );
    }

    /// A state dir copied from another machine: its list names another host and is ignored.
    #[tokio::test]
    async fn a_list_recorded_by_another_host_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(LEASES_FILE);
        std::fs::write(&file, "host some-other-machine\n5\n").unwrap();
        let leases = HostLeases::load(Some(dir.path()));
        assert!(leases.all().is_empty(), "{:?}", leases.all());
        leases.add(6).await;
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text, format!("host {}\n6\n", hostname()));
    }
}
