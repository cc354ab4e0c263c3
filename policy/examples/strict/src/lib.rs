//! `strict`: trust the registry over the cache.
//!
//! - Serves stale for at most `max-stale-ms` (30 s) past the TTL, refreshing in the background;
//!   past that bound a caller waits for the registry and gets an error rather than an old answer.
//! - Applies every removal at once while the registry is healthy, whatever its size: four leases
//!   revoked out of five leave one node. Only an unhealthy registry gets the benefit of the doubt.

use regcache_policy_sdk::{
    Config, Configured, EvictionContext, EvictionDecision, Guest, LookupContext, LookupDecision,
    Rejection, RejectionKind, Settings, Wait, registry_healthy,
};

#[derive(Clone, Copy)]
struct Tuning {
    settings: Settings,
    max_stale_ms: u64,
    healthy_contact_ms: u64,
}

static TUNING: Configured<Tuning> = Configured::new();

struct StrictPolicy;

impl Guest for StrictPolicy {
    fn configure(config: Vec<(String, String)>) -> Result<Settings, String> {
        let mut config = Config::new(config)?;
        let settings = regcache_policy_sdk::settings(&mut config)?;
        let tuning = Tuning {
            settings,
            max_stale_ms: config.number("max-stale-ms", 30_000)?,
            healthy_contact_ms: config.number("healthy-contact-ms", 10_000)?,
        };
        config.finish()?;
        TUNING.set(tuning);
        Ok(settings)
    }

    fn decide_lookup(context: LookupContext) -> LookupDecision {
        let tuning = TUNING.get();
        let settings = tuning.settings;
        let age = context.since_refresh_ms.unwrap_or(u64::MAX);
        if context.cached && age < settings.ttl_ms {
            return LookupDecision::ServeCached;
        }
        if context.cached && age < settings.ttl_ms.saturating_add(tuning.max_stale_ms) {
            return LookupDecision::ServeStale(true);
        }
        if context.negative && age < settings.negative_ttl_ms {
            return LookupDecision::Reject(Rejection {
                kind: RejectionKind::NotFound,
                reason: format!("{} not found", context.service),
            });
        }
        LookupDecision::RefreshAndWait(Wait {
            max_wait_ms: u32::try_from(settings.max_wait_ms).unwrap_or(u32::MAX),
            fallback_to_stale: false,
        })
    }

    fn guard_eviction(context: EvictionContext) -> EvictionDecision {
        let tuning = TUNING.get();
        if registry_healthy(context.health, tuning.healthy_contact_ms) {
            EvictionDecision::Evict
        } else {
            EvictionDecision::KeepSuspect(tuning.settings.max_suspect_hold_ms)
        }
    }
}

regcache_policy_sdk::export!(StrictPolicy);
