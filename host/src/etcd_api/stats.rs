//! The endpoint's counters, plain atomics that the host's metrics read at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

/// The etcd endpoint's counters.
#[derive(Debug, Default)]
pub struct EtcdApiStats {
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    logins_checked_with_etcd: AtomicU64,
    logins_remembered: AtomicU64,
    logins_refused: AtomicU64,
    client_leases: AtomicU64,
    client_leases_expired: AtomicU64,
    watches: AtomicU64,
}

/// A copy of [`EtcdApiStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EtcdApiStatsSnapshot {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections closed at once at `etcd_api.max_connections`.
    pub connections_refused: u64,
    /// Logins whose credential etcd was asked about.
    pub logins_checked_with_etcd: u64,
    /// Logins answered from a remembered verdict (or, during an outage, an earlier one).
    pub logins_remembered: u64,
    /// Logins refused (wrong user or password).
    pub logins_refused: u64,
    /// Client leases held now.
    pub client_leases: u64,
    /// Client leases that expired (their keys deregistered).
    pub client_leases_expired: u64,
    /// Watches open now.
    pub watches: u64,
}

/// One of the counters.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stat {
    ConnectionsOpen,
    ConnectionsRefused,
    LoginsCheckedWithEtcd,
    LoginsRemembered,
    LoginsRefused,
    ClientLeases,
    ClientLeasesExpired,
    Watches,
}

impl EtcdApiStats {
    fn cell(&self, stat: Stat) -> &AtomicU64 {
        match stat {
            Stat::ConnectionsOpen => &self.connections_open,
            Stat::ConnectionsRefused => &self.connections_refused,
            Stat::LoginsCheckedWithEtcd => &self.logins_checked_with_etcd,
            Stat::LoginsRemembered => &self.logins_remembered,
            Stat::LoginsRefused => &self.logins_refused,
            Stat::ClientLeases => &self.client_leases,
            Stat::ClientLeasesExpired => &self.client_leases_expired,
            Stat::Watches => &self.watches,
        }
    }

    pub(super) fn add(&self, stat: Stat, n: u64) {
        self.cell(stat).fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn sub(&self, stat: Stat, n: u64) {
        self.cell(stat).fetch_sub(n, Ordering::Relaxed);
    }

    pub(super) fn inc(&self, stat: Stat) {
        self.add(stat, 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> EtcdApiStatsSnapshot {
        let get = |stat| self.cell(stat).load(Ordering::Relaxed);
        EtcdApiStatsSnapshot {
            connections_open: get(Stat::ConnectionsOpen),
            connections_refused: get(Stat::ConnectionsRefused),
            logins_checked_with_etcd: get(Stat::LoginsCheckedWithEtcd),
            logins_remembered: get(Stat::LoginsRemembered),
            logins_refused: get(Stat::LoginsRefused),
            client_leases: get(Stat::ClientLeases),
            client_leases_expired: get(Stat::ClientLeasesExpired),
            watches: get(Stat::Watches),
        }
    }
}
