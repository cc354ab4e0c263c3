//! regcache's default policy: go-micro's registry cache after its fix, and beyond it.
//!
//! - Fresh for `ttl-ms` (1 min); past it, serve stale and refresh in the background
//!   (stale-while-revalidate): no caller waits when a cached answer exists.
//! - Nothing cached: refresh and wait at most `max-wait-ms`; within `min-retry-interval-ms` (5 s)
//!   of a failed attempt, fail fast without touching the registry (go-micro's "Scenario 3").
//! - A cached "not found" is answered for `negative-ttl-ms`.
//! - Panic mode, after Envoy's panic threshold: when more than `panic-threshold` (50 %) of a
//!   service's nodes are suspect, refresh on every lookup past the retry interval, even if fresh.
//! - Eviction guard, after Eureka's self-preservation: a burst of deletions that would leave
//!   fewer than `renewal-threshold` (85 %) of the service's recent nodes, any deletion while
//!   the registry is unhealthy, and any deletion within `outage-grace-ms` (30 s) of a registry
//!   failure keeps the nodes as suspect for `suspect-hold-ms` instead of emptying the cache.
//!   The grace is for leases that expired while etcd was down or frozen: etcd expires them the
//!   moment it runs again, before their owners' keep-alives get through, and the owners put
//!   them back soon after. A single deregistration with a healthy registry and no recent
//!   failure is applied at once.

use regcache_policy_sdk::{
    Config, Configured, EvictionContext, EvictionDecision, Guest, LookupContext, LookupDecision,
    Rejection, RejectionKind, Settings, Wait, registry_failed_within, registry_healthy,
};

#[derive(Clone, Copy)]
struct Tuning {
    settings: Settings,
    renewal_threshold: f64,
    panic_threshold: f64,
    suspect_hold_ms: u64,
    healthy_contact_ms: u64,
    outage_grace_ms: u64,
}

static TUNING: Configured<Tuning> = Configured::new();

struct DefaultPolicy;

impl Guest for DefaultPolicy {
    fn configure(config: Vec<(String, String)>) -> Result<Settings, String> {
        let mut config = Config::new(config)?;
        let settings = regcache_policy_sdk::settings(&mut config)?;
        let tuning = Tuning {
            settings,
            renewal_threshold: config.fraction("renewal-threshold", 0.85)?,
            panic_threshold: config.fraction("panic-threshold", 0.5)?,
            suspect_hold_ms: config.number("suspect-hold-ms", settings.max_suspect_hold_ms)?,
            healthy_contact_ms: config.number("healthy-contact-ms", 10_000)?,
            outage_grace_ms: config.number("outage-grace-ms", 30_000)?,
        };
        config.finish()?;
        TUNING.set(tuning);
        Ok(settings)
    }

    fn decide_lookup(context: LookupContext) -> LookupDecision {
        let tuning = TUNING.get();
        let settings = tuning.settings;
        let age = context.since_refresh_ms;
        if !context.cached {
            if context.negative && age.is_some_and(|ms| ms < settings.negative_ttl_ms) {
                return reject(
                    RejectionKind::NotFound,
                    format!("{} not found", context.service),
                );
            }
            let since_attempt = context.since_attempt_ms.unwrap_or(u64::MAX);
            if context.consecutive_failures > 0 && since_attempt < settings.min_retry_interval_ms {
                return reject(
                    RejectionKind::Unavailable,
                    format!(
                        "registry failed {since_attempt} ms ago ({:?}); next attempt in {} ms",
                        context.last_error,
                        settings.min_retry_interval_ms - since_attempt
                    ),
                );
            }
            return LookupDecision::RefreshAndWait(Wait {
                max_wait_ms: u32::try_from(settings.max_wait_ms).unwrap_or(u32::MAX),
                fallback_to_stale: true,
            });
        }
        let fresh = age.is_some_and(|ms| ms < settings.ttl_ms);
        let panicking =
            f64::from(context.suspect_nodes) > f64::from(context.nodes) * tuning.panic_threshold;
        if fresh && !panicking {
            LookupDecision::ServeCached
        } else {
            LookupDecision::ServeStale(true)
        }
    }

    fn guard_eviction(context: EvictionContext) -> EvictionDecision {
        let tuning = TUNING.get();
        let keep = EvictionDecision::KeepSuspect(tuning.suspect_hold_ms);
        if !registry_healthy(context.health, tuning.healthy_contact_ms)
            || registry_failed_within(context.health, tuning.outage_grace_ms)
        {
            return keep;
        }
        if context.recent_deletions <= 1 {
            return EvictionDecision::Evict;
        }
        // The service's population at the start of the window, as far as the host has seen.
        let population = context.nodes_after + context.recent_deletions;
        let remaining = f64::from(context.nodes_after) / f64::from(population.max(1));
        if remaining < tuning.renewal_threshold {
            keep
        } else {
            EvictionDecision::Evict
        }
    }
}

fn reject(kind: RejectionKind, reason: String) -> LookupDecision {
    LookupDecision::Reject(Rejection { kind, reason })
}

regcache_policy_sdk::export!(DefaultPolicy);
