// A regcache policy. `wit/policy.wit` documents every field and decision; start there.
//
// This one serves cached answers while they are younger than `ttl-ms`, serves stale and
// refreshes in the background after that, and trusts every removal the registry reports.
// Build: `regcache policy build .`; validate: `regcache policy check <wasm>`.
//
// componentize-qjs binds the WIT to this module's exports: `decide-lookup` is `decideLookup`,
// records are objects with camelCase keys, variants `{ tag, val }`, an absent option `null`,
// and a string thrown by `configure` is why the configuration is refused.

/** Settings chosen by `configure`, kept for the decisions of this instance. */
let settings;

/** The whole number `key` is set to, or `fallback` when it is absent. */
function number(config, key, fallback) {
  const entry = config.find(([k]) => k === key);
  if (entry === undefined) return fallback;
  const raw = entry[1];
  // Read as Rust's `u64::from_str` does: an optional `+`, ASCII digits, at most 2^64 - 1.
  const digits = /^\+?([0-9]+)$/.exec(raw)?.[1];
  if (digits === undefined || BigInt(digits) > 0xffff_ffff_ffff_ffffn) {
    throw `\`${key}\` = \`${raw}\` is not a whole number`;
  }
  // Past 2^53 a Number rounds; the host refuses such a TTL anyway (its range ends at a day).
  return Number(digits);
}

export function configure(config) {
  const unknown = config.find(([key]) => key !== "ttl-ms");
  if (unknown !== undefined) throw `unknown configuration key \`${unknown[0]}\``;
  settings = {
    ttlMs: number(config, "ttl-ms", 60_000),
    minRetryIntervalMs: 5_000,
    maxWaitMs: 3_000,
    negativeTtlMs: 5_000,
    registryBudgetPerSecond: 100,
    evictionWindowMs: 30_000,
    maxSuspectHoldMs: 300_000,
    evictionBatchMs: 250,
  };
  return settings;
}

export function decideLookup(context) {
  const age = context.sinceRefreshMs;
  // componentize-qjs 0.4.5 hands a u64 within 2^31 of its maximum over as a negative number:
  // an age older than any TTL.
  if (context.cached && age !== null && age >= 0 && age < settings.ttlMs) {
    return { tag: "serve-cached" };
  }
  if (context.cached) return { tag: "serve-stale", val: true };
  return { tag: "refresh-and-wait", val: { maxWaitMs: 3_000, fallbackToStale: true } };
}

export function guardEviction(_context) {
  return { tag: "evict" };
}
