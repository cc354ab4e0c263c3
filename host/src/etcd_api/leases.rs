//! Clients' leases, kept by the host and never in etcd: a client's keys are written under the
//! host's own lease (one lease and one keep-alive stream for every process of the node), and
//! this table says which client lease each key lives by. When a client lease expires or is
//! revoked (its process died or left), its keys are deregistered; a deregistration etcd cannot
//! take now is retried until it can, unless the key is put again meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::status;
use crate::model::Service;
use crate::registry::{ErrorKind, Registry};

/// etcd's shortest lease (with its default election timeout): shorter TTLs are raised to it.
pub(super) const MIN_TTL: i64 = 2;
/// etcd's longest lease TTL.
const MAX_TTL: i64 = 9_000_000_000;

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
    /// Keys whose deregistration failed, to try again (with the node to deregister).
    retry: HashMap<String, (String, String)>,
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
    registry: Arc<dyn Registry>,
    max_per_connection: usize,
}

impl Leases {
    pub(super) fn new(registry: Arc<dyn Registry>, max_per_connection: usize) -> Self {
        Leases {
            table: Mutex::default(),
            registry,
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
            id if id < 0 || table.leases.contains_key(&id) => return Err(status::lease_exists()),
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
        Ok((id, ttl))
    }

    /// etcd's keep-alive of one lease: its TTL, or `None` if it is gone (expired or revoked).
    pub(super) fn keep_alive(&self, id: i64) -> Option<i64> {
        let mut table = self.table.lock().unwrap();
        let lease = table.leases.get_mut(&id)?;
        lease.expires = Instant::now() + Duration::from_secs(lease.ttl as u64);
        Some(lease.ttl)
    }

    /// etcd's `LeaseTimeToLive`; `None` if the lease is gone.
    pub(super) fn time_to_live(&self, id: i64) -> Option<TimeToLive> {
        let table = self.table.lock().unwrap();
        let lease = table.leases.get(&id)?;
        let left = lease.expires.saturating_duration_since(Instant::now());
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
        self.table.lock().unwrap().leases.contains_key(&id)
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

    /// etcd's `LeaseRevoke`: the lease goes, and its keys are deregistered.
    pub(super) async fn revoke(&self, id: i64) -> Result<(), Status> {
        let keys = {
            let mut table = self.table.lock().unwrap();
            let lease = table
                .leases
                .remove(&id)
                .ok_or_else(status::lease_not_found)?;
            table.release(&lease);
            table.take_keys(&lease)
        };
        self.deregister(keys).await;
        Ok(())
    }

    /// Ends the leases whose TTL ran out and deregisters their keys; retries deregistrations
    /// that failed before.
    pub(super) async fn expire(&self) {
        let now = Instant::now();
        let keys = {
            let mut table = self.table.lock().unwrap();
            let expired: Vec<i64> = table
                .leases
                .iter()
                .filter(|(_, lease)| lease.expires <= now)
                .map(|(id, _)| *id)
                .collect();
            let mut keys: Vec<(String, (String, String))> = table.retry.drain().collect();
            for id in expired {
                if let Some(lease) = table.leases.remove(&id) {
                    tracing::debug!(lease = id, keys = lease.keys.len(), "client lease expired");
                    table.release(&lease);
                    keys.extend(table.take_keys(&lease));
                }
            }
            keys
        };
        self.deregister(keys).await;
    }

    async fn deregister(&self, keys: Vec<(String, (String, String))>) {
        for (key, (service, node)) in keys {
            match self.registry.deregister(&service, &node).await {
                Ok(()) => {}
                // Not this host's (any more): nothing of it is left to remove.
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot deregister a client's key yet; retrying");
                    let mut table = self.table.lock().unwrap();
                    // Put again meanwhile: the new registration stays.
                    if !table.keys.contains_key(&key) {
                        table.retry.insert(key, (service, node));
                    }
                }
            }
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
    fn take_keys(&mut self, lease: &ClientLease) -> Vec<(String, (String, String))> {
        lease
            .keys
            .iter()
            .filter_map(|key| {
                let written = self.keys.remove(key)?;
                let node = written.service.nodes.first()?.id.clone();
                Some((key.clone(), (written.service.name, node)))
            })
            .collect()
    }
}
