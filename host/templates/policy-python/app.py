"""A regcache policy. `wit/policy.wit` documents every field and decision; start there.

This one serves cached answers while they are younger than `ttl-ms`, serves stale and refreshes
in the background after that, and trusts every removal the registry reports.
Build: `regcache policy build .`; validate: `regcache policy check <wasm>`.

componentize-py generates the `wit_world` bindings from the WIT when it builds: the exports are
the methods of the class `WitWorld` of this module (`decide-lookup` is `decide_lookup`), records
are dataclasses, variants one class per case, an absent option `None`, and `configure` refuses a
configuration by raising `Err`.
"""

import re

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import (
    EvictionContext,
    EvictionDecision,
    EvictionDecision_Evict,
    LookupContext,
    LookupDecision,
    LookupDecision_RefreshAndWait,
    LookupDecision_ServeCached,
    LookupDecision_ServeStale,
    Settings,
    Wait,
)

U64_MAX = 2**64 - 1

# Settings chosen by `configure`, kept for the decisions of this instance.
_settings: Settings


def _number(config: list[tuple[str, str]], key: str, default: int) -> int:
    """The whole number `key` is set to, or `default` when it is absent."""
    raw = next((value for k, value in config if k == key), None)
    if raw is None:
        return default
    # Read as Rust's `u64::from_str` does: an optional `+` and ASCII digits only, where `int`
    # would also take spaces, `_` and any script's digits.
    digits = re.fullmatch(r"\+?([0-9]+)", raw)
    if digits is None or int(digits[1]) > U64_MAX:
        raise Err(f"`{key}` = `{raw}` is not a whole number")
    return int(digits[1])


class WitWorld(wit_world.WitWorld):
    def configure(self, config: list[tuple[str, str]]) -> Settings:
        global _settings
        unknown = next((key for key, _ in config if key != "ttl-ms"), None)
        if unknown is not None:
            raise Err(f"unknown configuration key `{unknown}`")
        _settings = Settings(
            ttl_ms=_number(config, "ttl-ms", 60_000),
            min_retry_interval_ms=5_000,
            max_wait_ms=3_000,
            negative_ttl_ms=5_000,
            registry_budget_per_second=100,
            eviction_window_ms=30_000,
            max_suspect_hold_ms=300_000,
            eviction_batch_ms=250,
        )
        return _settings

    def decide_lookup(self, context: LookupContext) -> LookupDecision:
        age = context.since_refresh_ms
        if context.cached and age is not None and age < _settings.ttl_ms:
            return LookupDecision_ServeCached()
        if context.cached:
            return LookupDecision_ServeStale(True)
        return LookupDecision_RefreshAndWait(Wait(max_wait_ms=3_000, fallback_to_stale=True))

    def guard_eviction(self, context: EvictionContext) -> EvictionDecision:
        return EvictionDecision_Evict()
