//! Validation of the settings a policy returns from `configure`: first against the ranges
//! documented in `wit/policy.wit`, then against the operator's [`Envelope`].
//!
//! The ranges exist because every setting drives host behaviour that must stay sane whatever
//! the policy says: a zero retry interval would let every lookup through to etcd, a year-long
//! wait would hang callers, an enormous value would overflow the host's time arithmetic. The
//! envelope exists because the ranges are wide enough for any deployment, and a policy written
//! by someone else (or by mistake) can pick their extremes: a retry interval of 1 ms with a
//! budget of 1,000,000 reads a second and every lookup waiting on a refresh made 7,533 etcd
//! reads in 8 s for one service. The operator, not the policy, decides how hard etcd may be hit.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::bindings::RawSettings;

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// The operator's bounds on a policy's settings, within the documented ranges. A policy whose
/// settings fall outside is refused, naming the bound ([`InvalidSetting::OutsideEnvelope`]).
///
/// The defaults bound a policy to what a careful operator would allow a stranger's policy
/// (each is a [`EnvelopeLimit`]'s default): the default policy and the examples, at their
/// default configuration, sit well inside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// Floor of `min-retry-interval-ms`. Default 100 ms: at most ten registry reads a second
    /// for one service from one host (the default policy waits 5 s).
    pub min_retry_interval: Duration,
    /// Ceiling of `registry-budget-per-second`. Default 1,000: a host asks etcd for at most a
    /// thousand listings a second, a load one etcd member serves beside its writes (the default
    /// policy asks 100).
    pub max_registry_budget: u32,
    /// Ceiling of `max-suspect-hold-ms`. Default 1 h: a node etcd says is gone is handed out
    /// at most an hour on the policy's word (the default policy holds 5 min).
    pub max_suspect_hold: Duration,
    /// Ceiling of `max-wait-ms`, and so of any decision's wait (the cache caps a decision's
    /// `max-wait-ms` at the settings'). Default 10 s: a caller waits at most that long for a
    /// refresh, well under a typical client timeout (the default policy waits 3 s).
    pub max_wait: Duration,
}

impl Envelope {
    /// The range documented for `min-retry-interval-ms`, and so the range of its floor.
    pub const MIN_RETRY_INTERVAL_RANGE: RangeInclusive<Duration> =
        Duration::from_millis(1)..=Duration::from_millis(HOUR);
    /// The range documented for `registry-budget-per-second`, and so of its ceiling.
    pub const REGISTRY_BUDGET_RANGE: RangeInclusive<u64> = 1..=1_000_000;
    /// The range documented for `max-suspect-hold-ms`, and so of its ceiling.
    pub const MAX_SUSPECT_HOLD_RANGE: RangeInclusive<Duration> =
        Duration::ZERO..=Duration::from_millis(DAY);
    /// The range documented for `max-wait-ms`, and so of its ceiling.
    pub const MAX_WAIT_RANGE: RangeInclusive<Duration> =
        Duration::from_millis(1)..=Duration::from_millis(MINUTE);
    /// The default floor of `min-retry-interval-ms` (see [`Envelope::min_retry_interval`]).
    pub const DEFAULT_MIN_RETRY_INTERVAL: Duration = Duration::from_millis(100);
    /// The default ceiling of `registry-budget-per-second`.
    pub const DEFAULT_MAX_REGISTRY_BUDGET: u32 = 1_000;
    /// The default ceiling of `max-suspect-hold-ms`.
    pub const DEFAULT_MAX_SUSPECT_HOLD: Duration = Duration::from_secs(3_600);
    /// The default ceiling of `max-wait-ms`.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            min_retry_interval: Envelope::DEFAULT_MIN_RETRY_INTERVAL,
            max_registry_budget: Envelope::DEFAULT_MAX_REGISTRY_BUDGET,
            max_suspect_hold: Envelope::DEFAULT_MAX_SUSPECT_HOLD,
            max_wait: Envelope::DEFAULT_MAX_WAIT,
        }
    }
}

/// One bound of the [`Envelope`], named as the operator sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeLimit {
    /// [`Envelope::min_retry_interval`].
    MinRetryInterval,
    /// [`Envelope::max_registry_budget`].
    MaxRegistryBudget,
    /// [`Envelope::max_suspect_hold`].
    MaxSuspectHold,
    /// [`Envelope::max_wait`].
    MaxWait,
}

impl EnvelopeLimit {
    /// Every bound.
    pub const ALL: [EnvelopeLimit; 4] = [
        EnvelopeLimit::MinRetryInterval,
        EnvelopeLimit::MaxRegistryBudget,
        EnvelopeLimit::MaxSuspectHold,
        EnvelopeLimit::MaxWait,
    ];

    /// The host's setting that sets it (its flag and variable derive from it, see
    /// `config::settings`).
    pub fn key(self) -> &'static str {
        match self {
            EnvelopeLimit::MinRetryInterval => "policy.limits.min_retry_interval",
            EnvelopeLimit::MaxRegistryBudget => "policy.limits.max_registry_budget",
            EnvelopeLimit::MaxSuspectHold => "policy.limits.max_suspect_hold",
            EnvelopeLimit::MaxWait => "policy.limits.max_wait",
        }
    }

    /// The policy's setting it bounds, as the WIT names it.
    pub fn bounds(self) -> &'static str {
        match self {
            EnvelopeLimit::MinRetryInterval => "min-retry-interval-ms",
            EnvelopeLimit::MaxRegistryBudget => "registry-budget-per-second",
            EnvelopeLimit::MaxSuspectHold => "max-suspect-hold-ms",
            EnvelopeLimit::MaxWait => "max-wait-ms",
        }
    }

    /// Whether it is a floor (a setting below it is refused) rather than a ceiling.
    pub fn is_floor(self) -> bool {
        self == EnvelopeLimit::MinRetryInterval
    }

    /// The bound in the setting's own unit (ms, or reads a second).
    fn bound(self, envelope: &Envelope) -> u64 {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match self {
            EnvelopeLimit::MinRetryInterval => ms(envelope.min_retry_interval),
            EnvelopeLimit::MaxRegistryBudget => u64::from(envelope.max_registry_budget),
            EnvelopeLimit::MaxSuspectHold => ms(envelope.max_suspect_hold),
            EnvelopeLimit::MaxWait => ms(envelope.max_wait),
        }
    }

    /// The bound as the operator writes it (`100ms`, `1000`).
    fn show(self, bound: u64) -> String {
        match self {
            EnvelopeLimit::MaxRegistryBudget => bound.to_string(),
            _ => format!("{:?}", Duration::from_millis(bound)),
        }
    }

    /// The setting's value in `settings`, in its own unit.
    fn value(self, settings: &RawSettings) -> u64 {
        match self {
            EnvelopeLimit::MinRetryInterval => settings.min_retry_interval_ms,
            EnvelopeLimit::MaxRegistryBudget => u64::from(settings.registry_budget_per_second),
            EnvelopeLimit::MaxSuspectHold => settings.max_suspect_hold_ms,
            EnvelopeLimit::MaxWait => settings.max_wait_ms,
        }
    }
}

/// A setting the policy returned that the host refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSetting {
    /// Outside the range documented in the WIT.
    #[error("setting `{name}` = {value} is out of range ({min} ..= {max})")]
    OutOfRange {
        /// The WIT name of the setting.
        name: &'static str,
        /// The value the policy returned.
        value: u64,
        /// The smallest allowed value.
        min: u64,
        /// The largest allowed value.
        max: u64,
    },
    /// Within the range, but outside the operator's [`Envelope`].
    #[error("{}", outside_envelope(*.limit, *.value, *.bound))]
    OutsideEnvelope {
        /// Which bound (it names the policy's setting and the operator's).
        limit: EnvelopeLimit,
        /// The value the policy returned.
        value: u64,
        /// The bound, in the setting's unit.
        bound: u64,
    },
}

impl InvalidSetting {
    /// The WIT name of the setting refused.
    pub fn name(&self) -> &'static str {
        match self {
            InvalidSetting::OutOfRange { name, .. } => name,
            InvalidSetting::OutsideEnvelope { limit, .. } => limit.bounds(),
        }
    }
}

fn outside_envelope(limit: EnvelopeLimit, value: u64, bound: u64) -> impl fmt::Display {
    let (side, kind) = if limit.is_floor() {
        ("below", "floor")
    } else {
        ("above", "ceiling")
    };
    format!(
        "setting `{}` = {value} is {side} the operator's {kind} of {} ({})",
        limit.bounds(),
        limit.show(bound),
        limit.key()
    )
}

fn check(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), InvalidSetting> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(InvalidSetting::OutOfRange {
            name,
            value,
            min,
            max,
        })
    }
}

fn ms_range(range: &RangeInclusive<Duration>) -> (u64, u64) {
    (
        range.start().as_millis() as u64,
        range.end().as_millis() as u64,
    )
}

/// Checks every setting against its documented range, then against `envelope`.
pub(crate) fn validate(s: &RawSettings, envelope: &Envelope) -> Result<(), InvalidSetting> {
    let (retry_min, retry_max) = ms_range(&Envelope::MIN_RETRY_INTERVAL_RANGE);
    let (wait_min, wait_max) = ms_range(&Envelope::MAX_WAIT_RANGE);
    let (hold_min, hold_max) = ms_range(&Envelope::MAX_SUSPECT_HOLD_RANGE);
    check("ttl-ms", s.ttl_ms, 1, DAY)?;
    check(
        "min-retry-interval-ms",
        s.min_retry_interval_ms,
        retry_min,
        retry_max,
    )?;
    check("max-wait-ms", s.max_wait_ms, wait_min, wait_max)?;
    check("negative-ttl-ms", s.negative_ttl_ms, 0, HOUR)?;
    check(
        "registry-budget-per-second",
        u64::from(s.registry_budget_per_second),
        *Envelope::REGISTRY_BUDGET_RANGE.start(),
        *Envelope::REGISTRY_BUDGET_RANGE.end(),
    )?;
    check("eviction-window-ms", s.eviction_window_ms, 1, HOUR)?;
    check(
        "max-suspect-hold-ms",
        s.max_suspect_hold_ms,
        hold_min,
        hold_max,
    )?;
    check("eviction-batch-ms", s.eviction_batch_ms, 0, 10 * SECOND)?;
    for limit in EnvelopeLimit::ALL {
        let value = limit.value(s);
        let bound = limit.bound(envelope);
        let outside = if limit.is_floor() {
            value < bound
        } else {
            value > bound
        };
        if outside {
            return Err(InvalidSetting::OutsideEnvelope {
                limit,
                value,
                bound,
            });
        }
    }
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
        assert_eq!(validate(&valid(), &Envelope::default()), Ok(()));
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
            let err = validate(&settings, &Envelope::default()).unwrap_err();
            assert!(matches!(err, InvalidSetting::OutOfRange { .. }), "{err}");
            assert_eq!(err.name(), name);
            assert!(err.to_string().contains(name));
        }
    }

    /// Finding 7 of issue 12: legal extremes, each refused by the default envelope naming the
    /// operator's bound and its setting; on the bound itself, accepted.
    #[test]
    fn the_envelope_refuses_legal_extremes_naming_the_operators_bound() {
        type Set = fn(&mut RawSettings, u64);
        let cases: [(Set, u64, u64, &str); 4] = [
            (
                |s, v| s.min_retry_interval_ms = v,
                1,
                100,
                "setting `min-retry-interval-ms` = 1 is below the operator's floor of 100ms \
                 (policy.limits.min_retry_interval)",
            ),
            (
                |s, v| s.registry_budget_per_second = v as u32,
                1_000_000,
                1_000,
                "setting `registry-budget-per-second` = 1000000 is above the operator's ceiling \
                 of 1000 (policy.limits.max_registry_budget)",
            ),
            (
                |s, v| s.max_suspect_hold_ms = v,
                DAY,
                HOUR,
                "setting `max-suspect-hold-ms` = 86400000 is above the operator's ceiling of \
                 3600s (policy.limits.max_suspect_hold)",
            ),
            (
                |s, v| s.max_wait_ms = v,
                MINUTE,
                10 * SECOND,
                "setting `max-wait-ms` = 60000 is above the operator's ceiling of 10s \
                 (policy.limits.max_wait)",
            ),
        ];
        for (limit, (set, extreme, bound, message)) in EnvelopeLimit::ALL.into_iter().zip(cases) {
            let mut settings = valid();
            set(&mut settings, extreme);
            let err = validate(&settings, &Envelope::default()).unwrap_err();
            assert_eq!(
                err,
                InvalidSetting::OutsideEnvelope {
                    limit,
                    value: extreme,
                    bound
                }
            );
            assert_eq!(err.to_string(), message);
            set(&mut settings, bound);
            assert_eq!(
                validate(&settings, &Envelope::default()),
                Ok(()),
                "{limit:?}"
            );
        }
    }

    #[test]
    fn a_wider_envelope_admits_what_the_default_refuses() {
        let mut extreme = valid();
        extreme.min_retry_interval_ms = 1;
        extreme.registry_budget_per_second = 1_000_000;
        extreme.max_suspect_hold_ms = DAY;
        extreme.max_wait_ms = MINUTE;
        let widest = Envelope {
            min_retry_interval: *Envelope::MIN_RETRY_INTERVAL_RANGE.start(),
            max_registry_budget: *Envelope::REGISTRY_BUDGET_RANGE.end() as u32,
            max_suspect_hold: *Envelope::MAX_SUSPECT_HOLD_RANGE.end(),
            max_wait: *Envelope::MAX_WAIT_RANGE.end(),
        };
        assert_eq!(validate(&extreme, &widest), Ok(()));
        // A range's refusal comes first: the envelope never hides what the WIT forbids.
        extreme.min_retry_interval_ms = 0;
        assert!(matches!(
            validate(&extreme, &Envelope::default()),
            Err(InvalidSetting::OutOfRange { .. })
        ));
    }
}
