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
//! A key on no lease (a value written by hand with `etcdctl put`) is nobody's: this host writes
//! its own value back on its lease. A key on a lease that is not this host's is another host's:
//! a registration refuses it ([`ErrorKind::Conflict`](crate::registry::ErrorKind::Conflict))
//! unless forced, and a re-put yields it.
//!
//! Every write is one transaction comparing each key's modification revision with the one the
//! decision was made on (or its absence), so two hosts registering one node cannot both win:
//! the loser reads the winner's lease and meets a conflict.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::{Owned, Shared};
use crate::fsutil::write_atomically;
use crate::registry::{ErrorKind, RegistryError, Takeover};

/// The file, in the state dir, listing this host's leases (one decimal id a line).
pub(crate) const LEASES_FILE: &str = "etcd-leases";

/// Keys per transaction: etcd refuses more than 128 operations in one (`--max-txn-ops`).
const TXN_KEYS: usize = 64;

/// Transactions per batch of keys before giving up: each retry means another writer changed a
/// key between the read and the write, which a few rounds outlast.
const TXN_ROUNDS: usize = 5;

/// This host's leases: the current one and the earlier ones that may still hold its keys.
pub(crate) struct HostLeases {
    file: Option<PathBuf>,
    known: Mutex<BTreeSet<i64>>,
}

impl HostLeases {
    /// The leases listed in `dir`'s [`LEASES_FILE`] (none without a dir or a file). An
    /// unreadable file is logged and read as empty: the host still runs, it only meets its
    /// earlier nodes as conflicts until their lease expires.
    pub(crate) fn load(dir: Option<&Path>) -> HostLeases {
        let file = dir.map(|d| d.join(LEASES_FILE));
        let known = match file.as_deref().map(std::fs::read_to_string) {
            None => BTreeSet::new(),
            Some(Ok(text)) => parse(&text),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot read this host's earlier leases; ignoring them");
                BTreeSet::new()
            }
        };
        HostLeases {
            file,
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
        let text = render(&self.known.lock().unwrap());
        let written =
            tokio::task::spawn_blocking(move || write_atomically(&file, text.as_bytes())).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot record this host's leases"),
            Err(e) => tracing::warn!(error = %e, "recording this host's leases failed"),
        }
    }
}

fn parse(text: &str) -> BTreeSet<i64> {
    text.lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|l| *l != 0)
        .collect()
}

fn render(leases: &BTreeSet<i64>) -> String {
    leases.iter().map(|l| format!("{l}\n")).collect()
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

/// Decides what to do with a key this host wants to hold `ours` on `lease`.
pub(crate) fn decide(
    held: Option<Held<'_>>,
    ours: &[u8],
    lease: i64,
    is_mine: impl Fn(i64) -> bool,
) -> Step {
    let Some(held) = held else {
        return Step::Write(None);
    };
    if held.lease == lease && held.value == ours {
        return Step::Done;
    }
    if held.lease == 0 || held.lease == lease || is_mine(held.lease) {
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
    /// Fail with a conflict, writing nothing of that batch (a registration).
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

/// What [`write`] did.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// Keys written (those that already held this host's value on its lease are not).
    pub(crate) count: usize,
    /// Keys left to another lease ([`Foreign::Yield`]), with that lease.
    pub(crate) yielded: Vec<(String, i64)>,
}

/// Writes `targets` on `lease`, each key only if it is absent, on no lease, on one of this
/// host's leases, or (with [`Foreign::Take`]) anyone's. Each batch of [`TXN_KEYS`] keys is one
/// transaction: all of it is written or, with [`Foreign::Refuse`], none.
pub(crate) async fn write(
    shared: &Shared,
    op: &'static str,
    lease: i64,
    targets: Vec<(String, Owned)>,
    foreign: Foreign,
) -> Result<Written, RegistryError> {
    let mut written = Written::default();
    let mut targets = targets.into_iter().peekable();
    while targets.peek().is_some() {
        let batch: Vec<(String, Owned)> = targets.by_ref().take(TXN_KEYS).collect();
        write_batch(shared, op, lease, batch, foreign, &mut written).await?;
    }
    Ok(written)
}

async fn write_batch(
    shared: &Shared,
    op: &'static str,
    lease: i64,
    mut batch: Vec<(String, Owned)>,
    foreign: Foreign,
    written: &mut Written,
) -> Result<(), RegistryError> {
    // First guess: every key is absent (a registration of a new node, a re-put after the lease
    // took the keys with it), which makes the usual case one round trip.
    let mut expected: BTreeMap<String, Option<i64>> =
        batch.iter().map(|(k, _)| (k.clone(), None)).collect();
    for _ in 0..TXN_ROUNDS {
        if batch.is_empty() {
            return Ok(());
        }
        let compares: Vec<Compare> = batch
            .iter()
            .map(|(key, _)| match expected[key] {
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Some(rev) => Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
            })
            .collect();
        let puts: Vec<TxnOp> = batch
            .iter()
            .map(|(key, owned)| {
                let options = PutOptions::new().with_lease(lease);
                TxnOp::put(key.as_str(), owned.value.clone(), Some(options))
            })
            .collect();
        let gets: Vec<TxnOp> = batch
            .iter()
            .map(|(key, _)| TxnOp::get(key.as_str(), None))
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
        for ((key, owned), response) in batch.into_iter().zip(&responses) {
            let TxnOpResponse::Get(got) = response else {
                continue;
            };
            let held = got.kvs().first().map(|kv| Held {
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
                value: kv.value(),
            });
            match decide(held, &owned.value, lease, |l| shared.leases.is_mine(l)) {
                Step::Done => {}
                Step::Write(expect) => {
                    expected.insert(key.clone(), expect);
                    next.push((key, owned));
                }
                Step::Foreign {
                    owner,
                    mod_revision,
                } => match foreign {
                    Foreign::Refuse => {
                        let node = owned.service.nodes.first().map_or("", |n| n.id.as_str());
                        return Err(RegistryError::conflict(
                            op,
                            &owned.service.name,
                            node,
                            owner,
                        ));
                    }
                    Foreign::Yield => written.yielded.push((key, owner)),
                    Foreign::Take => {
                        tracing::warn!(
                            key,
                            owner_lease = owner,
                            "forced registration: taking over a node another host's lease holds"
                        );
                        expected.insert(key.clone(), Some(mod_revision));
                        next.push((key, owned));
                    }
                },
            }
        }
        batch = next;
    }
    Err(RegistryError::new(
        ErrorKind::Unavailable,
        op,
        format!("the keys kept changing under {TXN_ROUNDS} transactions in a row"),
    ))
}

/// Deletes each of `keys` that is on no lease or on `lease`: this host's keys, not another
/// host's that took one over meanwhile. [`TXN_KEYS`] keys a transaction.
pub(crate) async fn delete_own(
    shared: &Shared,
    op: &'static str,
    keys: &[String],
    lease: Option<i64>,
) -> Result<(), RegistryError> {
    for batch in keys.chunks(TXN_KEYS) {
        // etcd's compares are all-of: "on no lease, or else on ours" is a guarded transaction
        // per key, nested in one that always applies.
        let guarded: Vec<TxnOp> = batch
            .iter()
            .map(|key| {
                let on = |l: i64| Compare::lease(key.as_str(), CompareOp::Equal, l);
                let delete = || TxnOp::delete(key.as_str(), None::<DeleteOptions>);
                let mut txn = Txn::new().when([on(0)]).and_then([delete()]);
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
    fn a_key_is_written_when_absent_leaseless_or_on_one_of_this_hosts_leases() {
        let mine = |l: i64| l == 40;
        let d = |h| decide(h, b"ours", 41, mine);
        assert_eq!(d(None), Step::Write(None));
        assert_eq!(d(held(0, b"x")), Step::Write(Some(7)), "a put by hand");
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
        assert_eq!(decide(held(99, b"theirs"), b"ours", 41, |_| false), foreign);
        assert_eq!(decide(held(99, b"ours"), b"ours", 41, |_| false), foreign);
    }

    #[test]
    fn the_leases_file_round_trips_and_skips_junk() {
        let set: BTreeSet<i64> = [7587, 12].into_iter().collect();
        assert_eq!(parse(&render(&set)), set);
        assert_eq!(
            parse("12\n\n  7587 \nnot a lease\n0\n"),
            set,
            "blank, junk and zero (no lease) lines are skipped"
        );
    }

    #[tokio::test]
    async fn leases_are_remembered_in_the_state_dir_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let first = HostLeases::load(Some(dir.path()));
        assert!(first.all().is_empty());
        first.add(5).await;
        first.add(6).await;
        first.forget(&[5]).await;
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
}
