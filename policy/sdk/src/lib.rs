//! Bindings to regcache's `policy` world (`wit/policy.wit`) and the helpers the policies in this
//! repository share: operator-configuration parsing and the go-micro default settings.
//!
//! A policy crate implements [`Guest`] and exports it with this crate's `export!` macro:
//!
//! ```ignore
//! struct MyPolicy;
//! impl regcache_policy_sdk::Guest for MyPolicy { /* configure, decide_lookup, guard_eviction */ }
//! regcache_policy_sdk::export!(MyPolicy);
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The generated bindings. They live in a module of their own because `pub_export_macro`
/// exports the macro at the crate root, where it would clash with the module-level copy.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "regcache_policy_sdk::bindings",
    });
}

pub use bindings::regcache::policy::host::{LogLevel, log};
pub use bindings::regcache::policy::types::*;
pub use bindings::{Guest, export};

/// The operator's key/value configuration, consumed key by key so that a misspelt key is an
/// error at load instead of a silently ignored setting.
pub struct Config {
    entries: BTreeMap<String, String>,
}

impl Config {
    /// Takes the configuration as the host passes it; a repeated key is an error.
    pub fn new(pairs: Vec<(String, String)>) -> Result<Config, String> {
        let mut entries = BTreeMap::new();
        for (key, value) in pairs {
            if entries.insert(key.clone(), value).is_some() {
                return Err(format!("configuration key `{key}` is given twice"));
            }
        }
        Ok(Config { entries })
    }

    /// A whole number (milliseconds, counts), or `default` when absent.
    pub fn number(&mut self, key: &str, default: u64) -> Result<u64, String> {
        match self.entries.remove(key) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|_| format!("configuration `{key}` = `{raw}`: expected a whole number")),
        }
    }

    /// A fraction between 0 and 1, or `default` when absent.
    pub fn fraction(&mut self, key: &str, default: f64) -> Result<f64, String> {
        match self.entries.remove(key) {
            None => Ok(default),
            Some(raw) => match raw.trim().parse::<f64>() {
                Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
                _ => Err(format!(
                    "configuration `{key}` = `{raw}`: expected a number from 0 to 1"
                )),
            },
        }
    }

    /// Fails on any key no getter consumed.
    pub fn finish(self) -> Result<(), String> {
        match self.entries.keys().next() {
            None => Ok(()),
            Some(key) => Err(format!("unknown configuration key `{key}`")),
        }
    }
}

/// Reads the host settings from the configuration, each defaulting to go-micro's registry cache
/// after its fix (TTL 1 min, retry interval 5 s) or to regcache's own defaults. The host
/// validates ranges; this only parses.
pub fn settings(config: &mut Config) -> Result<Settings, String> {
    Ok(Settings {
        ttl_ms: config.number("ttl-ms", 60_000)?,
        min_retry_interval_ms: config.number("min-retry-interval-ms", 5_000)?,
        max_wait_ms: config.number("max-wait-ms", 3_000)?,
        negative_ttl_ms: config.number("negative-ttl-ms", 5_000)?,
        registry_budget_per_second: u32::try_from(
            config.number("registry-budget-per-second", 100)?,
        )
        .map_err(|_| "configuration `registry-budget-per-second` is too large".to_string())?,
        eviction_window_ms: config.number("eviction-window-ms", 30_000)?,
        max_suspect_hold_ms: config.number("max-suspect-hold-ms", 300_000)?,
        eviction_batch_ms: config.number("eviction-batch-ms", 250)?,
    })
}

/// Per-instance state set by `configure` and read by every decision. An instance is
/// single-threaded, so the lock is never contended; it only makes the static safe.
pub struct Configured<T: Copy>(Mutex<Option<T>>);

impl<T: Copy> Configured<T> {
    /// An empty slot.
    pub const fn new() -> Self {
        Configured(Mutex::new(None))
    }

    /// Stores the configuration.
    pub fn set(&self, value: T) {
        *self.0.lock().unwrap() = Some(value);
    }

    /// The configuration; the host always configures an instance before asking it anything,
    /// so an unconfigured read is a host bug and traps.
    pub fn get(&self) -> T {
        self.0
            .lock()
            .unwrap()
            .expect("decision asked before configure")
    }
}

impl<T: Copy> Default for Configured<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the host last heard from the registry within `within_ms` and its watch is up.
pub fn registry_healthy(health: RegistryHealth, within_ms: u64) -> bool {
    health.watch_connected
        && health
            .since_last_contact_ms
            .is_some_and(|ms| ms <= within_ms)
}

/// Whether the registry failed the host within the last `within_ms`.
pub fn registry_failed_within(health: RegistryHealth, within_ms: u64) -> bool {
    health.since_failure_ms.is_some_and(|ms| ms <= within_ms)
}
