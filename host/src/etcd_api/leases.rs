//! Clients' leases, kept by the host and never in etcd: a client's keys are written under the
//! host's own lease (one lease and one keep-alive stream for every process of the node), and
//! this table says which client lease each key lives by. When a client lease expires or is
//! revoked (its process died or left), the table gives its keys up to be deregistered
//! (`lease.rs` does); a deregistration etcd cannot take now is retried until it can, unless
//! the key is put again meanwhile. The table does no I/O.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::stats::{EtcdApiStats, Stat};
use super::status;
use crate::model::Service;

/// etcd's shortest lease (with its default election timeout): shorter TTLs are raised to it.
pub(super) const MIN_TTL: i64 = 2;
/// etcd's longest lease TTL.
const MAX_TTL: i64 = 9_000_000_000;

/// Client leases held at most, over all connections.
const MAX_LEASES: usize = 100_000;

/// How often expiries are looked for: a client's keys leave etcd within its TTL and this.
pub(super) const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// A key written through the endpoint.
#[derive(Debug, Clone)]
pub(super) struct Written {
    /// Its client lease (0: none; it stays until deleted).
    pub(super) lease: i64,
    /// The registration it holds, a service with one node.
    pub(super) service: Service,
}

/// A key whose client lease ended: its node is to be deregistered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Departed {
    pub(super) key: String,
    pub(super) service: String,
    pub(super) node_id: String,
}

struct ClientLease {
    ttl: i64,
    expires: Instant,
    keys: BTreeSet<String>,
    /// The connection that granted it, which its bound counts against.
    peer: Option<SocketAddr>,
}

#[derive(Default)]
struct Table {
    leases: HashMap<i64, ClientLease>,
    keys: HashMap<String, Written>,
    per_peer: HashMap<SocketAddr, usize>,
    /// Deregistrations that failed, by key, to try again.
    retry: HashMap<String, Departed>,
}

/// What a lease's time to live answers.
pub(super) struct TimeToLive {
    pub(super) remaining: i64,
    pub(super) granted: i64,
    pub(super) keys: Vec<String>,
}

/// The table of client leases and of the keys written through the endpoint.
pub(super) struct Leases {
    table: Mutex<Table>,
    max_per_connection: usize,
    stats: Arc<EtcdApiStats>,
}

impl Leases {
    pub(super) fn new(max_per_connection: usize, stats: Arc<EtcdApiStats>) -> Self {
        Leases {
            table: Mutex::default(),
            stats,
            max_per_connection,
        }
    }

    /// etcd's `LeaseGrant`: `id` 0 picks one. Returns the lease and its TTL.
    pub(super) fn grant(
        &self,
        id: i64,
        ttl: i64,
        peer: Option<SocketAddr>,
    ) -> Result<(i64, i64), Status> {
        if ttl > MAX_TTL {
            return Err(status::lease_ttl_too_large());
        }
        let ttl = ttl.max(MIN_TTL);
        let mut table = self.table.lock().unwrap();
        // Leases outlive their connection, so a client reconnecting escapes its connection's
        // bound: the table has one of its own.
        if table.leases.len() >= MAX_LEASES {
            return Err(Status::resource_exhausted(format!(
                "regcache: {MAX_LEASES} client leases are held, the most the host keeps"
            )));
        }
        if let Some(peer) = peer
            && table.per_peer.get(&peer).copied().unwrap_or(0) >= self.max_per_connection
        {
            return Err(status::too_many(
                "leases",
                self.max_per_connection,
                "etcd_api.max_leases_per_connection",
            ));
        }
        let id = match id {
            0 => loop {
                // Positive, as etcd's are (clients print them in hex).
                let candidate = rand::random::<i64>() & i64::MAX;
                if candidate != 0 && !table.leases.contains_key(&candidate) {
                    break candidate;
                }
            },
            id if id < 0 => {
                return Err(Status::invalid_argument(
                    "regcache: a lease id is positive (0 lets the host choose one)",
                ));
            }
            id if table.leases.contains_key(&id) => return Err(status::lease_exists()),
            id => id,
        };
        table.leases.insert(
            id,
            ClientLease {
                ttl,
                expires: Instant::now() + Duration::from_secs(ttl as u64),
                keys: BTreeSet::new(),
                peer,
            },
        );
        if let Some(peer) = peer {
            *table.per_peer.entry(peer).or_default() += 1;
        }
        self.stats.inc(Stat::ClientLeases);
        Ok((id, ttl))
    }

    /// etcd's keep-alive of one lease: its TTL, or `None` if it is gone (expired or revoked).
    pub(super) fn keep_alive(&self, id: i64) -> Option<i64> {
        let now = Instant::now();
        let mut table = self.table.lock().unwrap();
        // One whose TTL ran out is dead, even before the expiry tick takes its keys.
        let lease = table.leases.get_mut(&id).filter(|l| l.expires > now)?;
        lease.expires = now + Duration::from_secs(lease.ttl as u64);
        Some(lease.ttl)
    }

    /// etcd's `LeaseTimeToLive`; `None` if the lease is gone.
    pub(super) fn time_to_live(&self, id: i64) -> Option<TimeToLive> {
        let now = Instant::now();
        let table = self.table.lock().unwrap();
        let lease = table.leases.get(&id).filter(|l| l.expires > now)?;
        let left = lease.expires.saturating_duration_since(now);
        Some(TimeToLive {
            remaining: left.as_secs() as i64,
            granted: lease.ttl,
            keys: lease.keys.iter().cloned().collect(),
        })
    }

    /// Every lease.
    pub(super) fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.table.lock().unwrap().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The client lease of `key` (0 if none, or not written here).
    pub(super) fn lease_of(&self, key: &str) -> i64 {
        self.table
            .lock()
            .unwrap()
            .keys
            .get(key)
            .map_or(0, |w| w.lease)
    }

    /// Whether `id` is a live lease.
    pub(super) fn exists(&self, id: i64) -> bool {
        let now = Instant::now();
        let table = self.table.lock().unwrap();
        table.leases.get(&id).is_some_and(|l| l.expires > now)
    }

    /// Records `key` as written with `service` on `lease` (0: none), moving it off the lease
    /// it was on. Fails if the lease is gone (it expired since the caller checked it); the
    /// caller then takes back what it wrote. Returns the key's previous record.
    pub(super) fn attach(
        &self,
        key: &str,
        lease: i64,
        service: Service,
    ) -> Result<Option<Written>, Status> {
        let mut table = self.table.lock().unwrap();
        if lease != 0 {
            let lease = table
                .leases
                .get_mut(&lease)
                .ok_or_else(status::lease_not_found)?;
            lease.keys.insert(key.to_string());
        }
        table.retry.remove(key);
        let previous = table
            .keys
            .insert(key.to_string(), Written { lease, service });
        if let Some(old) = &previous
            && old.lease != lease
            && let Some(old_lease) = table.leases.get_mut(&old.lease)
        {
            old_lease.keys.remove(key);
        }
        Ok(previous)
    }

    /// Forgets `key` (it was deleted), returning its record.
    pub(super) fn detach(&self, key: &str) -> Option<Written> {
        let mut table = self.table.lock().unwrap();
        let written = table.keys.remove(key)?;
        if let Some(lease) = table.leases.get_mut(&written.lease) {
            lease.keys.remove(key);
        }
        Some(written)
    }

    /// etcd's `LeaseRevoke`: the lease goes; returns its keys, to deregister.
    pub(super) fn revoke(&self, id: i64) -> Result<Vec<Departed>, Status> {
        let mut table = self.table.lock().unwrap();
        let lease = table
            .leases
            .remove(&id)
            .ok_or_else(status::lease_not_found)?;
        table.release(&lease);
        self.stats.sub(Stat::ClientLeases, 1);
        Ok(table.take_keys(&lease))
    }

    /// Ends the leases whose TTL ran out: their keys, and those whose deregistration failed
    /// before, to deregister.
    pub(super) fn take_expired(&self, now: Instant) -> Vec<Departed> {
        let mut table = self.table.lock().unwrap();
        let expired: Vec<i64> = table
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut departed: Vec<Departed> = table.retry.drain().map(|(_, d)| d).collect();
        for id in expired {
            if let Some(lease) = table.leases.remove(&id) {
                tracing::debug!(lease = id, keys = lease.keys.len(), "client lease expired");
                table.release(&lease);
                self.stats.sub(Stat::ClientLeases, 1);
                self.stats.inc(Stat::ClientLeasesExpired);
                departed.extend(table.take_keys(&lease));
            }
        }
        departed
    }

    /// Keeps a deregistration that failed, to try again, unless its key was put again since.
    pub(super) fn retry_later(&self, departed: Departed) {
        let mut table = self.table.lock().unwrap();
        if !table.keys.contains_key(&departed.key) {
            table.retry.insert(departed.key.clone(), departed);
        }
    }
}

impl Table {
    fn release(&mut self, lease: &ClientLease) {
        if let Some(peer) = lease.peer
            && let Some(count) = self.per_peer.get_mut(&peer)
        {
            *count -= 1;
            if *count == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// Removes the lease's keys from the table: what to deregister.
    fn take_keys(&mut self, lease: &ClientLease) -> Vec<Departed> {
        lease
            .keys
            .iter()
            .filter_map(|key| {
                let written = self.keys.remove(key)?;
                let node_id = written.service.nodes.first()?.id.clone();
                Some(Departed {
                    key: key.clone(),
                    service: written.service.name,
                    node_id,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::one_node_service;

    fn nodes(departed: Vec<Departed>) -> Vec<String> {
        let mut ids: Vec<String> = departed.into_iter().map(|d| d.node_id).collect();
        ids.sort();
        ids
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_or_revoked_lease_gives_its_keys_up_and_a_moved_key_stays() {
        let stats = Arc::new(EtcdApiStats::default());
        let leases = Leases::new(2, stats.clone());
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let (short, ttl) = leases.grant(0, 1, Some(peer)).unwrap();
        assert_eq!(ttl, MIN_TTL, "raised to etcd's minimum");
        let (long, _) = leases.grant(77, 60, Some(peer)).unwrap();
        assert_eq!(long, 77);
        assert!(
            leases.grant(0, 60, Some(peer)).is_err(),
            "the connection's bound"
        );
        assert!(
            leases.grant(0, 60, None).is_ok(),
            "another connection's count is its own"
        );
        assert!(leases.grant(77, 60, None).is_err(), "an id in use");
        for (node, lease) in [("a", short), ("b", short), ("c", long)] {
            let service = one_node_service("svc", "1", node);
            leases.attach(&format!("k/{node}"), lease, service).unwrap();
        }
        // "b" moves to the long lease: it no longer lives by the short one.
        leases
            .attach("k/b", long, one_node_service("svc", "1", "b"))
            .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(leases.keep_alive(short), Some(MIN_TTL));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(leases.take_expired(Instant::now()).is_empty(), "kept alive");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            leases.keep_alive(short),
            None,
            "dead before the tick takes its keys"
        );
        assert!(!leases.exists(short));
        let departed = leases.take_expired(Instant::now());
        assert_eq!(nodes(departed.clone()), ["a"]);
        assert_eq!(leases.keep_alive(short), None);
        assert!(
            leases.grant(0, 60, Some(peer)).is_ok(),
            "the expired lease gave its place back"
        );
        // A failed deregistration comes back, unless the key was put again.
        leases.retry_later(departed[0].clone());
        assert_eq!(nodes(leases.take_expired(Instant::now())), ["a"]);
        leases.retry_later(departed[0].clone());
        leases
            .attach("k/a", 0, one_node_service("svc", "1", "a"))
            .unwrap();
        assert!(
            leases.take_expired(Instant::now()).is_empty(),
            "put again: it stays"
        );

        assert_eq!(stats.snapshot().client_leases_expired, 1);
        assert_eq!(stats.snapshot().client_leases, 3);
        assert_eq!(nodes(leases.revoke(long).unwrap()), ["b", "c"]);
        assert_eq!(stats.snapshot().client_leases, 2);
        assert!(leases.revoke(long).is_err());
        assert_eq!(leases.lease_of("k/c"), 0);
    }
}
