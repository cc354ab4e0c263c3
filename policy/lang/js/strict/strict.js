// `strict` in JavaScript: trust the registry over the cache. It decides exactly as the Rust
// `strict` (policy/examples/strict) does, from the same configuration keys and defaults.
//
// - Serves stale for at most `max-stale-ms` (30 s) past the TTL, refreshing in the background;
//   past that bound a caller waits for the registry and gets an error rather than an old answer.
// - Applies every removal at once while the registry is healthy, whatever its size: four leases
//   revoked out of five leave one node. Only an unhealthy registry gets the benefit of the doubt.
//
// Built by `regcache policy build` with componentize-qjs: WIT records are objects with
// camelCase keys, variants `{ tag, val }`, an absent option `null`, and a thrown string is
// `configure`'s error. Integers cross as Numbers, exact up to 2^53 (real ages stay far below),
// so configuration is kept as BigInt, which compares exactly with Numbers: bounds saturate as
// Rust's u64 arithmetic does. Settings past 2^53 (all out of the host's ranges, refused as Rust's
// are) are quoted rounded in the host's refusal.

const U32_MAX = 0xffff_ffffn;
const U64_MAX = 0xffff_ffff_ffff_ffffn;

// Rust's `str::trim` strips Unicode White_Space, which is not JavaScript's `trim` set (that one
// strips U+FEFF and keeps U+0085); `u64::from_str` then takes an optional `+` and ASCII digits.
const SPACE = "[\\t\\n\\v\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]*";
const WHOLE_NUMBER = new RegExp(`^${SPACE}\\+?([0-9]+)${SPACE}$`);

/** The operator's configuration, consumed key by key: a misspelt key is an error at load. */
class Config {
  constructor(pairs) {
    this.entries = new Map();
    for (const [key, value] of pairs) {
      if (this.entries.has(key)) throw `configuration key \`${key}\` is given twice`;
      this.entries.set(key, value);
    }
  }

  /** A whole number (a BigInt of u64 range), or `fallback` when absent. */
  number(key, fallback) {
    if (!this.entries.has(key)) return fallback;
    const raw = this.entries.get(key);
    this.entries.delete(key);
    const digits = WHOLE_NUMBER.exec(raw)?.[1];
    if (digits === undefined || BigInt(digits) > U64_MAX) {
      throw `configuration \`${key}\` = \`${raw}\`: expected a whole number`;
    }
    return BigInt(digits);
  }

  /** Fails on any key no getter consumed, naming the first in code point order (Rust's). */
  finish() {
    const [first] = [...this.entries.keys()].sort(byCodePoint);
    if (first !== undefined) throw `unknown configuration key \`${first}\``;
  }
}

// UTF-16 code units (`<` on strings) order astral characters before U+E000..U+FFFF.
function byCodePoint(a, b) {
  const [x, y] = [Array.from(a, (c) => c.codePointAt(0)), Array.from(b, (c) => c.codePointAt(0))];
  const differs = x.findIndex((point, i) => point !== y[i]);
  if (differs === -1) return x.length - y.length;
  return differs < y.length ? x[differs] - y[differs] : 1;
}

/** The host's settings, each defaulting as the Rust SDK's `settings` does, read in its order. */
function hostSettings(config) {
  const ttlMs = config.number("ttl-ms", 60_000n);
  const minRetryIntervalMs = config.number("min-retry-interval-ms", 5_000n);
  const maxWaitMs = config.number("max-wait-ms", 3_000n);
  const negativeTtlMs = config.number("negative-ttl-ms", 5_000n);
  const registryBudgetPerSecond = config.number("registry-budget-per-second", 100n);
  if (registryBudgetPerSecond > U32_MAX) {
    throw "configuration `registry-budget-per-second` is too large";
  }
  return {
    ttlMs,
    minRetryIntervalMs,
    maxWaitMs,
    negativeTtlMs,
    registryBudgetPerSecond,
    evictionWindowMs: config.number("eviction-window-ms", 30_000n),
    maxSuspectHoldMs: config.number("max-suspect-hold-ms", 300_000n),
    evictionBatchMs: config.number("eviction-batch-ms", 250n),
  };
}

const min = (a, b) => (a < b ? a : b);

// componentize-qjs 0.4.5 carries a u64 within 2^31 of its maximum, and a u32 past 2^31, as the
// negative i32 of the same bits: a u64::MAX age arrives as -1, and a u32 returned past 2^31 must
// leave as one (a larger Number is clamped to 2^31 - 1).
const u64 = (n) => (n < 0 ? BigInt(n) + 2n ** 64n : n);
const toU32 = (n) => Number(BigInt.asIntN(32, n));

let tuning;

export function configure(pairs) {
  const config = new Config(pairs);
  const settings = hostSettings(config);
  const maxStaleMs = config.number("max-stale-ms", 30_000n);
  const healthyContactMs = config.number("healthy-contact-ms", 10_000n);
  config.finish();
  tuning = {
    ttlMs: settings.ttlMs,
    negativeTtlMs: settings.negativeTtlMs,
    staleUntilMs: min(settings.ttlMs + maxStaleMs, U64_MAX),
    healthyContactMs,
    refresh: {
      tag: "refresh-and-wait",
      val: { maxWaitMs: toU32(min(settings.maxWaitMs, U32_MAX)), fallbackToStale: false },
    },
    keepSuspect: { tag: "keep-suspect", val: Number(settings.maxSuspectHoldMs) },
  };
  // A Number past 2^64 leaves as u64::MAX, so that one crosses exactly.
  const numbers = Object.entries(settings).map(([name, value]) => [name, Number(value)]);
  return {
    ...Object.fromEntries(numbers),
    registryBudgetPerSecond: toU32(settings.registryBudgetPerSecond),
  };
}

export function decideLookup(context) {
  // Rust reads a missing age as u64::MAX, younger than no bound; so is Infinity.
  const age = context.sinceRefreshMs === null ? Infinity : u64(context.sinceRefreshMs);
  if (context.cached && age < tuning.ttlMs) return { tag: "serve-cached" };
  if (context.cached && age < tuning.staleUntilMs) return { tag: "serve-stale", val: true };
  if (context.negative && age < tuning.negativeTtlMs) {
    return { tag: "reject", val: { kind: "not-found", reason: `${context.service} not found` } };
  }
  return tuning.refresh;
}

export function guardEviction(context) {
  const { watchConnected, sinceLastContactMs } = context.health;
  const healthy =
    watchConnected &&
    sinceLastContactMs !== null &&
    u64(sinceLastContactMs) <= tuning.healthyContactMs;
  return healthy ? { tag: "evict" } : tuning.keepSuspect;
}
