//! Validation of the settings a policy returns from `configure`.
//!
//! The ranges are the ones documented in `wit/policy.wit`. They exist because every setting
//! drives host behaviour that must stay sane whatever the policy says: a zero retry interval
//! would let every lookup through to etcd, a year-long wait would hang callers, an enormous
//! value would overflow the host's time arithmetic.

use super::bindings::RawSettings;

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// The operator's bounds on a policy's settings, tighter than the documented ranges (issue 12:
/// helper C owns this type).
#[derive(Debug, Clone, Copy)]
pub struct Envelope {
    /// Floor of `min-retry-interval-ms`.
    pub min_retry_interval: std::time::Duration,
    /// Ceiling of `registry-budget-per-second`.
    pub max_registry_budget: u32,
    /// Ceiling of `max-suspect-hold-ms`.
    pub max_suspect_hold: std::time::Duration,
    /// Ceiling of `max-wait-ms` (and of a decision's wait).
    pub max_wait: std::time::Duration,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            min_retry_interval: std::time::Duration::from_millis(1),
            max_registry_budget: 1_000_000,
            max_suspect_hold: std::time::Duration::from_secs(86_400),
            max_wait: std::time::Duration::from_secs(60),
        }
    }
}

/// A setting outside its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting `{name}` = {value} is out of range ({min} ..= {max})")]
pub struct InvalidSetting {
    /// The WIT name of the setting.
    pub name: &'static str,
    /// The value the policy returned.
    pub value: u64,
    /// The smallest allowed value.
    pub min: u64,
    /// The largest allowed value.
    pub max: u64,
}

fn check(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), InvalidSetting> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(InvalidSetting {
            name,
            value,
            min,
            max,
        })
    }
}

/// Checks every setting against its documented range.
pub(crate) fn validate(s: &RawSettings) -> Result<(), InvalidSetting> {
    check("ttl-ms", s.ttl_ms, 1, DAY)?;
    check("min-retry-interval-ms", s.min_retry_interval_ms, 1, HOUR)?;
    check("max-wait-ms", s.max_wait_ms, 1, MINUTE)?;
    check("negative-ttl-ms", s.negative_ttl_ms, 0, HOUR)?;
    check(
        "registry-budget-per-second",
        u64::from(s.registry_budget_per_second),
        1,
        1_000_000,
    )?;
    check("eviction-window-ms", s.eviction_window_ms, 1, HOUR)?;
    check("max-suspect-hold-ms", s.max_suspect_hold_ms, 0, DAY)?;
    check("eviction-batch-ms", s.eviction_batch_ms, 0, 10 * SECOND)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> RawSettings {
        RawSettings {
            ttl_ms: 60_000,
            min_retry_interval_ms: 5_000,
            max_wait_ms: 3_000,
            negative_ttl_ms: 5_000,
            registry_budget_per_second: 100,
            eviction_window_ms: 30_000,
            max_suspect_hold_ms: 300_000,
            eviction_batch_ms: 250,
        }
    }

    #[test]
    fn accepts_the_defaults() {
        assert_eq!(validate(&valid()), Ok(()));
    }

    #[test]
    fn rejects_zero_and_overflowing_values_naming_the_setting() {
        type Spoil = fn(&mut RawSettings);
        let cases: [(Spoil, &str); 5] = [
            (|s| s.ttl_ms = 0, "ttl-ms"),
            (|s| s.min_retry_interval_ms = 0, "min-retry-interval-ms"),
            (|s| s.max_wait_ms = u64::MAX, "max-wait-ms"),
            (
                |s| s.registry_budget_per_second = 0,
                "registry-budget-per-second",
            ),
            (|s| s.eviction_batch_ms = 60_000, "eviction-batch-ms"),
        ];
        for (spoil, name) in cases {
            let mut settings = valid();
            spoil(&mut settings);
            let err = validate(&settings).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().contains(name));
        }
    }
}
