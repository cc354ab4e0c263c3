//! A regcache policy. `wit/policy.wit` documents every field and decision; start there.
//!
//! This one serves cached answers while they are younger than `ttl-ms`, serves stale and
//! refreshes in the background after that, and trusts every removal the registry reports.
//! Build: `regcache policy build .`; validate: `regcache policy check <wasm>`.

use std::sync::Mutex;

// Generates `Guest` and, at the crate root, the types the world `use`s (`LookupContext`, ...).
wit_bindgen::generate!({ world: "policy", path: "wit" });

use regcache::policy::types::Wait;

/// Settings chosen by `configure`, kept for the decisions of this instance.
static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);

fn number(config: &[(String, String)], key: &str, default: u64) -> Result<u64, String> {
    match config.iter().find(|(k, _)| k == key) {
        None => Ok(default),
        Some((_, raw)) => raw.parse().map_err(|_| format!("`{key}` = `{raw}` is not a whole number")),
    }
}

struct Policy;

impl Guest for Policy {
    fn configure(config: Vec<(String, String)>) -> Result<Settings, String> {
        if let Some((key, _)) = config.iter().find(|(k, _)| k != "ttl-ms") {
            return Err(format!("unknown configuration key `{key}`"));
        }
        let settings = Settings {
            ttl_ms: number(&config, "ttl-ms", 60_000)?,
            min_retry_interval_ms: 5_000,
            max_wait_ms: 3_000,
            negative_ttl_ms: 5_000,
            registry_budget_per_second: 100,
            eviction_window_ms: 30_000,
            max_suspect_hold_ms: 300_000,
            eviction_batch_ms: 250,
        };
        *SETTINGS.lock().unwrap() = Some(settings);
        Ok(settings)
    }

    fn decide_lookup(context: LookupContext) -> LookupDecision {
        let settings = SETTINGS.lock().unwrap().expect("configured");
        match context.since_refresh_ms {
            Some(age) if context.cached && age < settings.ttl_ms => LookupDecision::ServeCached,
            _ if context.cached => LookupDecision::ServeStale(true),
            _ => LookupDecision::RefreshAndWait(Wait {
                max_wait_ms: 3_000,
                fallback_to_stale: true,
            }),
        }
    }

    fn guard_eviction(_context: EvictionContext) -> EvictionDecision {
        EvictionDecision::Evict
    }
}

export!(Policy);
