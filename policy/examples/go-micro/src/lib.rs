//! `go-micro`: the behaviour of go-micro's registry cache after its fix, as a baseline.
//!
//! Fresh for `ttl-ms`. Past it, the lookup refreshes and *waits* (up to `max-wait-ms`, the
//! etcd timeout), falling back to the stale answer only when the refresh fails; the host's
//! rate limit then answers stale at once until the retry interval has passed, and the next
//! caller waits again. Removals are applied as the registry reports them. The benchmarks run it
//! beside the default policy to show what stale-while-revalidate and eviction guards add.

use regcache_policy_sdk::{
    Config, Configured, EvictionContext, EvictionDecision, Guest, LookupContext, LookupDecision,
    Settings, Wait,
};

static SETTINGS: Configured<Settings> = Configured::new();

struct GoMicroPolicy;

impl Guest for GoMicroPolicy {
    fn configure(config: Vec<(String, String)>) -> Result<Settings, String> {
        let mut config = Config::new(config)?;
        let settings = regcache_policy_sdk::settings(&mut config)?;
        config.finish()?;
        SETTINGS.set(settings);
        Ok(settings)
    }

    fn decide_lookup(context: LookupContext) -> LookupDecision {
        let settings = SETTINGS.get();
        match context.since_refresh_ms {
            Some(age) if context.cached && age < settings.ttl_ms => LookupDecision::ServeCached,
            _ => LookupDecision::RefreshAndWait(Wait {
                max_wait_ms: u32::try_from(settings.max_wait_ms).unwrap_or(u32::MAX),
                fallback_to_stale: true,
            }),
        }
    }

    fn guard_eviction(_context: EvictionContext) -> EvictionDecision {
        EvictionDecision::Evict
    }
}

regcache_policy_sdk::export!(GoMicroPolicy);
