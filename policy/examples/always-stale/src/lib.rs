//! `always-stale`: availability above all.
//!
//! - Whenever anything is cached, answer from the cache at once (stale past the TTL, refreshing
//!   in the background), however long the registry has been failing.
//! - Never trust a removal: every removal, even one ordinary deregistration, keeps the nodes as
//!   suspect for `max-suspect-hold-ms`, and they leave only when that hold ends. Callers must
//!   tolerate dead nodes in answers (they are marked suspect).

use regcache_policy_sdk::{
    Config, Configured, EvictionContext, EvictionDecision, Guest, LookupContext, LookupDecision,
    Rejection, RejectionKind, Settings, Wait,
};

static SETTINGS: Configured<Settings> = Configured::new();

struct AlwaysStalePolicy;

impl Guest for AlwaysStalePolicy {
    fn configure(config: Vec<(String, String)>) -> Result<Settings, String> {
        let mut config = Config::new(config)?;
        let settings = regcache_policy_sdk::settings(&mut config)?;
        config.finish()?;
        SETTINGS.set(settings);
        Ok(settings)
    }

    fn decide_lookup(context: LookupContext) -> LookupDecision {
        let settings = SETTINGS.get();
        let age = context.since_refresh_ms.unwrap_or(u64::MAX);
        if context.cached {
            return if age < settings.ttl_ms {
                LookupDecision::ServeCached
            } else {
                LookupDecision::ServeStale(true)
            };
        }
        if context.negative && age < settings.negative_ttl_ms {
            return LookupDecision::Reject(Rejection {
                kind: RejectionKind::NotFound,
                reason: format!("{} not found", context.service),
            });
        }
        LookupDecision::RefreshAndWait(Wait {
            max_wait_ms: u32::try_from(settings.max_wait_ms).unwrap_or(u32::MAX),
            fallback_to_stale: true,
        })
    }

    fn guard_eviction(_context: EvictionContext) -> EvictionDecision {
        EvictionDecision::KeepSuspect(SETTINGS.get().max_suspect_hold_ms)
    }
}

regcache_policy_sdk::export!(AlwaysStalePolicy);
