//! Prometheus metrics of the host, in the text exposition format ([`prometheus_client`]).
//!
//! Nothing here is touched on the lookup path: the cache, the policy engine and the registry
//! keep their own counters (plain atomics), and [`HostMetrics`] copies their snapshots into
//! metric families when scraped (a custom [`Collector`]). A scrape costs a few map walks; a
//! lookup costs nothing extra.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry as MetricRegistry;

use crate::cache::RegistryCache;
use crate::decision::Decide;
use crate::etcd_api::EtcdApiStats;
use crate::http::ConnectionStats;
use crate::policy::PolicyEngine;
use crate::registry::etcd::StatsSnapshot;

/// Reads the registry's counters, if the registry has any (the embedded memory registry does
/// not, and etcd's exist only once connected).
pub type RegistryStatsSource = Arc<dyn Fn() -> Option<StatsSnapshot> + Send + Sync>;

/// The sources a scrape reads.
#[derive(Clone)]
pub struct Sources {
    /// The policy engine.
    pub engine: PolicyEngine,
    /// The cache.
    pub cache: RegistryCache,
    /// The registry's counters.
    pub registry: RegistryStatsSource,
    /// The HTTP server's connection counters.
    pub http: Arc<ConnectionStats>,
    /// The etcd endpoint's counters, when it is on.
    pub etcd_api: Option<Arc<EtcdApiStats>>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sources")
    }
}

/// The host's metrics.
pub struct HostMetrics {
    registry: MetricRegistry,
}

impl HostMetrics {
    /// Metrics that read `sources` at every scrape.
    pub fn new(sources: Sources) -> Self {
        let mut registry = MetricRegistry::default();
        registry.register_collector(Box::new(sources));
        HostMetrics { registry }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Content type of [`HostMetrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(e.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(e.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A counter family with one label.
fn counters<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (value, count) in values {
        let labels = [(label, value)];
        ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Sources {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let cache = self.cache.stats();
        let a = cache.answers;
        counters(
            &mut e,
            "regcache_lookups",
            "Lookups answered, by the source of their answer.",
            "source",
            [
                ("fresh", a.fresh),
                ("stale", a.stale),
                ("registry", a.registry),
            ],
        )?;
        let mut errors = e.encode_descriptor(
            "regcache_lookup_errors",
            "Lookups not answered, by kind (not_found, unavailable) and cause.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (kind, cause, count) in [
            ("not_found", "negative", a.not_found_negative),
            ("not_found", "registry", a.not_found_registry),
            ("not_found", "policy", a.not_found_policy),
            ("unavailable", "policy", a.unavailable_policy),
            ("unavailable", "rate_limited", a.unavailable_rate_limited),
            ("unavailable", "budget", a.unavailable_budget),
            ("unavailable", "registry", a.unavailable_registry),
        ] {
            let labels = [("kind", kind), ("cause", cause)];
            ConstCounter::new(count).encode(errors.encode_family(&labels)?)?;
        }
        let d = cache.decisions;
        counters(
            &mut e,
            "regcache_lookup_decisions",
            "Lookups by the policy's decision.",
            "decision",
            [
                ("serve_cached", d.serve_cached),
                ("serve_stale", d.serve_stale),
                ("serve_stale_and_refresh", d.serve_stale_and_refresh),
                ("refresh_and_wait", d.refresh_and_wait),
                ("reject", d.reject),
            ],
        )?;
        let f = cache.flights;
        counter(
            &mut e,
            "regcache_singleflight_waits",
            "Lookups that joined a refresh already in flight.",
            f.joined,
        )?;
        counter(
            &mut e,
            "regcache_singleflight_wait_timeouts",
            "Lookups whose wait for a refresh ran out.",
            f.wait_timeouts,
        )?;
        counter(
            &mut e,
            "regcache_refreshes_rate_limited",
            "Refreshes refused by the per-service rate limit.",
            f.rate_limited,
        )?;
        gauge(
            &mut e,
            "regcache_cache_entries",
            "Services in the cache (negative entries included).",
            self.cache.len() as i64,
        )?;
        gauge(
            &mut e,
            "regcache_cache_nodes",
            "Nodes in the cache, suspects included.",
            self.cache.node_count() as i64,
        )?;

        let p = self.engine.stats();
        counters(
            &mut e,
            "regcache_policy_swaps",
            "Policy loads after the first, by result.",
            "result",
            [("applied", p.swaps_applied), ("rejected", p.swaps_rejected)],
        )?;
        counter(
            &mut e,
            "regcache_policy_traps",
            "Policy calls that trapped (the fail-safe decision was used).",
            p.traps,
        )?;
        counter(
            &mut e,
            "regcache_policy_deadline_hits",
            "Policy calls stopped by their deadline.",
            p.deadline_hits,
        )?;
        counter(
            &mut e,
            "regcache_policy_invalid_answers",
            "Policy answers refused as invalid.",
            p.invalid_answers,
        )?;
        counters(
            &mut e,
            "regcache_policy_fail_safe_answers",
            "Decisions answered by the fail-safe instead of the policy (a failed call, or the \
             breaker open), by question.",
            "question",
            [
                ("lookup", p.fail_safe_lookups),
                ("eviction", p.fail_safe_evictions),
            ],
        )?;
        counter(
            &mut e,
            "regcache_policy_rollbacks",
            "Generations rolled back automatically to the policy they replaced.",
            p.rollbacks,
        )?;
        counters(
            &mut e,
            "regcache_policy_shadow_answers",
            "Questions asked of shadow policies, by how the answer compared with the active \
             policy's (`failed`: a trap, a deadline or an invalid answer).",
            "outcome",
            [
                ("agree", p.shadow_agreed),
                ("disagree", p.shadow_disagreed),
                ("failed", p.shadow_failed),
            ],
        )?;
        counter(
            &mut e,
            "regcache_policy_observer_dropped",
            "Questions neither recorded nor asked of the shadow because the observer thread \
             was behind (its buffers full).",
            p.observer_dropped,
        )?;
        counter(
            &mut e,
            "regcache_policy_record_write_failures",
            "Writes to the policy recording file (policy.record.file) that failed; each is a \
             question, or a flush of several, missing from the file.",
            p.record_write_failures,
        )?;
        gauge(
            &mut e,
            "regcache_policy_generation",
            "Generation of the active policy.",
            self.engine.active().generation as i64,
        )?;

        // etcd's own counters when there are any (every operation, background ones included);
        // otherwise the cache's count of its registry reads.
        let r = (self.registry)().unwrap_or_else(|| {
            let g = cache.get_service;
            let mut snapshot = StatsSnapshot::default();
            for (result, count) in [
                ("ok", g.ok),
                ("not_found", g.not_found),
                ("timeout", g.timeout),
                ("unavailable", g.unavailable),
                ("unauthenticated", g.unauthenticated),
                ("invalid_input", g.invalid_input),
            ] {
                snapshot.requests.insert(("get_service", result), count);
            }
            snapshot
        });
        let mut family = e.encode_descriptor(
            "regcache_registry_requests",
            "Requests to the registry by operation and result; registrations and \
             deregistrations written together count once per etcd transaction.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for ((op, result), count) in &r.requests {
            let labels = [("op", *op), ("result", *result)];
            ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
        }
        counter(
            &mut e,
            "regcache_lease_regrants",
            "Leases granted to replace a lost one.",
            r.lease_regrants,
        )?;
        counter(
            &mut e,
            "regcache_watch_restarts",
            "Watch streams re-created after a loss.",
            r.watch_restarts,
        )?;
        counter(
            &mut e,
            "regcache_registry_malformed_values",
            "Registry values skipped as malformed.",
            r.malformed_values,
        )?;
        let h = self.http.snapshot();
        gauge(
            &mut e,
            "regcache_http_connections_open",
            "HTTP connections open.",
            h.open as i64,
        )?;
        counter(
            &mut e,
            "regcache_http_connections_accepted",
            "HTTP connections accepted.",
            h.accepted,
        )?;
        counters(
            &mut e,
            "regcache_http_connections_closed",
            "HTTP connections closed by the host before their client: refused at the connection \
             limit with every connection busy, replaced at the limit (no request in flight, or \
             an answer left unread), timed out waiting for a request head or idle, or with an \
             answer the client read nothing of for the write timeout.",
            "reason",
            [
                ("refused", h.refused),
                ("replaced", h.replaced),
                ("header_timeout", h.header_timeouts),
                ("idle_timeout", h.idle_timeouts),
                ("write_timeout", h.write_timeouts),
            ],
        )?;
        counters(
            &mut e,
            "regcache_http_accept_errors",
            "Failed accepts that paused accepting for 50 ms, by cause.",
            "cause",
            [
                ("descriptors", h.accept_errors_descriptors),
                ("other", h.accept_errors_other),
            ],
        )?;
        if let Some(etcd_api) = &self.etcd_api {
            let s = etcd_api.snapshot();
            gauge(
                &mut e,
                "regcache_etcd_api_connections_open",
                "Connections open to the etcd endpoint.",
                s.connections_open as i64,
            )?;
            counter(
                &mut e,
                "regcache_etcd_api_connections_refused",
                "Connections the etcd endpoint closed at once at etcd_api.max_connections.",
                s.connections_refused,
            )?;
            counters(
                &mut e,
                "regcache_etcd_api_logins",
                "Authenticate calls to the etcd endpoint: the credential checked with etcd, \
                 answered from a remembered verdict, or refused.",
                "outcome",
                [
                    ("checked_with_etcd", s.logins_checked_with_etcd),
                    ("remembered", s.logins_remembered),
                    ("refused", s.logins_refused),
                ],
            )?;
            gauge(
                &mut e,
                "regcache_etcd_api_client_leases",
                "Client leases the etcd endpoint holds (none of them in etcd).",
                s.client_leases as i64,
            )?;
            counter(
                &mut e,
                "regcache_etcd_api_client_leases_expired",
                "Client leases that expired, their keys deregistered.",
                s.client_leases_expired,
            )?;
            gauge(
                &mut e,
                "regcache_etcd_api_watches",
                "Watches open on the etcd endpoint.",
                s.watches as i64,
            )?;
        }
        counter(
            &mut e,
            "regcache_registration_conflicts",
            "This host's registrations found held by someone else (not written back, or dropped).",
            r.conflicts,
        )?;
        Ok(())
    }
}
