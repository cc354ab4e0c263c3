"""`strict` in Python: trust the registry over the cache. It decides exactly as the Rust `strict`
(policy/examples/strict) does, from the same configuration keys and defaults.

- Serves stale for at most `max-stale-ms` (30 s) past the TTL, refreshing in the background;
  past that bound a caller waits for the registry and gets an error rather than an old answer.
- Applies every removal at once while the registry is healthy, whatever its size: four leases
  revoked out of five leave one node. Only an unhealthy registry gets the benefit of the doubt.

Built by `regcache policy build` with componentize-py, which generates the `wit_world`
bindings: records are dataclasses, variants one dataclass per case, an absent option `None`, and
`configure` reports an invalid configuration by raising `Err`.
"""

import re
from dataclasses import dataclass

from componentize_py_types import Err
from wit_world import WitWorld as Policy
from wit_world.imports.types import (
    EvictionContext,
    EvictionDecision,
    EvictionDecision_Evict,
    EvictionDecision_KeepSuspect,
    LookupContext,
    LookupDecision,
    LookupDecision_Reject,
    LookupDecision_RefreshAndWait,
    LookupDecision_ServeCached,
    LookupDecision_ServeStale,
    Rejection,
    RejectionKind,
    Settings,
    Wait,
)

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

# Rust's `str::trim` strips Unicode White_Space, which is not `str.strip`'s set (that one also
# strips U+001C..U+001F); `u64::from_str` then takes an optional `+` and ASCII digits only,
# where `int` would take `_` and any script's digits.
_SPACE = "[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*"
_WHOLE_NUMBER = re.compile(f"{_SPACE}\\+?([0-9]+){_SPACE}")


class Config:
    """The operator's configuration, consumed key by key: a misspelt key is an error at load."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.entries: dict[str, str] = {}
        for key, value in pairs:
            if key in self.entries:
                raise Err(f"configuration key `{key}` is given twice")
            self.entries[key] = value

    def number(self, key: str, default: int) -> int:
        """A whole number of u64 range, or `default` when absent."""
        raw = self.entries.pop(key, None)
        if raw is None:
            return default
        digits = _WHOLE_NUMBER.fullmatch(raw)
        if digits is None or int(digits[1]) > U64_MAX:
            raise Err(f"configuration `{key}` = `{raw}`: expected a whole number")
        return int(digits[1])

    def finish(self) -> None:
        """Fails on any key no getter consumed, naming the first in code point order (Rust's)."""
        if self.entries:
            raise Err(f"unknown configuration key `{min(self.entries)}`")


def host_settings(config: Config) -> Settings:
    """The host's settings, each defaulting as the Rust SDK's `settings` does, read in its order."""
    ttl_ms = config.number("ttl-ms", 60_000)
    min_retry_interval_ms = config.number("min-retry-interval-ms", 5_000)
    max_wait_ms = config.number("max-wait-ms", 3_000)
    negative_ttl_ms = config.number("negative-ttl-ms", 5_000)
    registry_budget_per_second = config.number("registry-budget-per-second", 100)
    if registry_budget_per_second > U32_MAX:
        raise Err("configuration `registry-budget-per-second` is too large")
    return Settings(
        ttl_ms=ttl_ms,
        min_retry_interval_ms=min_retry_interval_ms,
        max_wait_ms=max_wait_ms,
        negative_ttl_ms=negative_ttl_ms,
        registry_budget_per_second=registry_budget_per_second,
        eviction_window_ms=config.number("eviction-window-ms", 30_000),
        max_suspect_hold_ms=config.number("max-suspect-hold-ms", 300_000),
        eviction_batch_ms=config.number("eviction-batch-ms", 250),
    )


@dataclass(frozen=True)
class Tuning:
    ttl_ms: int
    negative_ttl_ms: int
    # ttl + max-stale, saturating at u64::MAX as Rust's `saturating_add` does.
    stale_until_ms: int
    healthy_contact_ms: int
    refresh: LookupDecision
    keep_suspect: EvictionDecision


_tuning: Tuning


class WitWorld(Policy):
    def configure(self, config: list[tuple[str, str]]) -> Settings:
        global _tuning
        parsed = Config(config)
        settings = host_settings(parsed)
        max_stale_ms = parsed.number("max-stale-ms", 30_000)
        healthy_contact_ms = parsed.number("healthy-contact-ms", 10_000)
        parsed.finish()
        _tuning = Tuning(
            ttl_ms=settings.ttl_ms,
            negative_ttl_ms=settings.negative_ttl_ms,
            stale_until_ms=min(settings.ttl_ms + max_stale_ms, U64_MAX),
            healthy_contact_ms=healthy_contact_ms,
            refresh=LookupDecision_RefreshAndWait(
                Wait(max_wait_ms=min(settings.max_wait_ms, U32_MAX), fallback_to_stale=False)
            ),
            keep_suspect=EvictionDecision_KeepSuspect(settings.max_suspect_hold_ms),
        )
        return settings

    def decide_lookup(self, context: LookupContext) -> LookupDecision:
        # Rust reads a missing age as u64::MAX, which no bound exceeds.
        age = U64_MAX if context.since_refresh_ms is None else context.since_refresh_ms
        if context.cached and age < _tuning.ttl_ms:
            return LookupDecision_ServeCached()
        if context.cached and age < _tuning.stale_until_ms:
            return LookupDecision_ServeStale(True)
        if context.negative and age < _tuning.negative_ttl_ms:
            return LookupDecision_Reject(
                Rejection(kind=RejectionKind.NOT_FOUND, reason=f"{context.service} not found")
            )
        return _tuning.refresh

    def guard_eviction(self, context: EvictionContext) -> EvictionDecision:
        health = context.health
        last_contact_ms = health.since_last_contact_ms
        if (
            health.watch_connected
            and last_contact_ms is not None
            and last_contact_ms <= _tuning.healthy_contact_ms
        ):
            return EvictionDecision_Evict()
        return _tuning.keep_suspect
