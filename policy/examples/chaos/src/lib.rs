//! `chaos`: a policy that misbehaves on purpose, so the host's sandbox can be tested.
//!
//! It behaves like a plain TTL policy until its `fault` configuration says otherwise:
//!
//! | `fault`          | what it does                                                      |
//! |------------------|-------------------------------------------------------------------|
//! | `none`           | nothing (the default)                                             |
//! | `trap`           | panics (traps) in every decision, with the message `chaos: trap`  |
//! | `loop`           | loops forever in every decision                                   |
//! | `memory-bomb`    | allocates without bound in every decision                         |
//! | `huge-string`    | rejects every lookup with a 2 MiB reason                          |
//! | `slow`           | spins `spin-iterations` (default 50,000,000: ~20 ms) in every decision, then decides |
//! | `slow-first`     | spins as `slow` unless it was asked the very same question just before: the same answers, a cost that remembers |
//! | `parity`         | rejects every other lookup, by a call counter of the instance: impure |
//! | `print`          | writes a line to stdout and one to stderr in every decision, then decides |
//! | `zero-ttl`       | returns settings with a TTL of 0                                  |
//! | `loop-configure` | loops forever in `configure`                                      |
//!
//! Two settings aim the faults of decisions, so that the policy passes the host's conformance
//! battery and misbehaves later, in production:
//!
//! | key            | faults strike only                                                  |
//! |----------------|---------------------------------------------------------------------|
//! | `only-service` | lookups of that service (and no eviction)                           |
//! | `after-ms`     | decisions whose context's `now-ms` is at least this (a time bomb: the battery asks at 1,700,000,000,000) |

use std::sync::atomic::{AtomicU64, Ordering};

use regcache_policy_sdk::{
    Config, Configured, EvictionContext, EvictionDecision, Guest, LookupContext, LookupDecision,
    Rejection, RejectionKind, Settings, Wait,
};

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Trap,
    Loop,
    MemoryBomb,
    HugeString,
    Slow,
    SlowFirst,
    Parity,
    Print,
}

#[derive(Clone, Copy)]
struct Tuning {
    settings: Settings,
    fault: Fault,
    /// A hash of `only-service`, so the state stays `Copy`; 0 when unset.
    only_service: u64,
    after_ms: u64,
    spin_iterations: u64,
}

static TUNING: Configured<Tuning> = Configured::new();

/// Lookups this instance was asked, for `parity`.
static LOOKUPS: AtomicU64 = AtomicU64::new(0);

/// The last question asked (a hash of its service and time), for `slow-first`.
static LAST_QUESTION: AtomicU64 = AtomicU64::new(0);

/// About 20 ms of spinning with wasmtime's code on the machines this was measured on (the
/// guest's clock is frozen: time is spent by counting).
const SPIN_ITERATIONS: u64 = 50_000_000;

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn spin(iterations: u64) {
    for i in 0..iterations {
        std::hint::black_box(i);
    }
}

/// Does what `tuning.fault` says in a decision about `service` at `now_ms`; `Some` replaces its
/// answer.
fn strike(tuning: Tuning, service: &str, now_ms: u64) -> Option<LookupDecision> {
    match tuning.fault {
        Fault::None => None,
        Fault::Trap => panic!("chaos: trap"),
        Fault::Loop => loop {
            std::hint::black_box(0);
        },
        Fault::MemoryBomb => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![0u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Fault::HugeString => Some(LookupDecision::Reject(Rejection {
            kind: RejectionKind::Unavailable,
            reason: "x".repeat(2 << 20),
        })),
        Fault::Slow => {
            spin(tuning.spin_iterations);
            None
        }
        Fault::SlowFirst => {
            let question = name_hash(service) ^ now_ms.rotate_left(32);
            if LAST_QUESTION.swap(question, Ordering::Relaxed) != question {
                spin(tuning.spin_iterations);
            }
            None
        }
        Fault::Parity => (LOOKUPS.fetch_add(1, Ordering::Relaxed) % 2 == 1).then(|| {
            LookupDecision::Reject(Rejection {
                kind: RejectionKind::Unavailable,
                reason: "chaos: odd call".into(),
            })
        }),
        Fault::Print => {
            println!("chaos: deciding about `{service}`");
            eprintln!("chaos: a line to stderr about `{service}`");
            None
        }
    }
}

struct ChaosPolicy;

impl Guest for ChaosPolicy {
    fn configure(config: Vec<(String, String)>) -> Result<Settings, String> {
        let mut fault_name = None;
        let mut only_service = 0;
        let mut rest = Vec::new();
        for (key, value) in config {
            match key.as_str() {
                "fault" => fault_name = Some(value),
                "only-service" => only_service = name_hash(&value),
                _ => rest.push((key, value)),
            }
        }
        let mut config = Config::new(rest)?;
        let mut settings = regcache_policy_sdk::settings(&mut config)?;
        let after_ms = config.number("after-ms", 0)?;
        let spin_iterations = config.number("spin-iterations", SPIN_ITERATIONS)?;
        config.finish()?;
        let fault = match fault_name.as_deref().unwrap_or("none") {
            "none" => Fault::None,
            "trap" => Fault::Trap,
            "loop" => Fault::Loop,
            "memory-bomb" => Fault::MemoryBomb,
            "huge-string" => Fault::HugeString,
            "slow" => Fault::Slow,
            "slow-first" => Fault::SlowFirst,
            "parity" => Fault::Parity,
            "print" => Fault::Print,
            "zero-ttl" => {
                settings.ttl_ms = 0;
                Fault::None
            }
            "loop-configure" => loop {
                std::hint::black_box(0);
            },
            other => return Err(format!("unknown fault `{other}`")),
        };
        TUNING.set(Tuning {
            settings,
            fault,
            only_service,
            after_ms,
            spin_iterations,
        });
        Ok(settings)
    }

    fn decide_lookup(context: LookupContext) -> LookupDecision {
        let tuning = TUNING.get();
        let targeted = (tuning.only_service == 0
            || tuning.only_service == name_hash(&context.service))
            && context.now_ms >= tuning.after_ms;
        if targeted && let Some(decision) = strike(tuning, &context.service, context.now_ms) {
            return decision;
        }
        match context.since_refresh_ms {
            Some(age) if context.cached && age < tuning.settings.ttl_ms => {
                LookupDecision::ServeCached
            }
            _ if context.cached => LookupDecision::ServeStale(true),
            _ => LookupDecision::RefreshAndWait(Wait {
                max_wait_ms: 1_000,
                fallback_to_stale: true,
            }),
        }
    }

    fn guard_eviction(context: EvictionContext) -> EvictionDecision {
        let tuning = TUNING.get();
        if tuning.only_service == 0 && context.now_ms >= tuning.after_ms {
            strike(tuning, &context.service, context.now_ms);
        }
        EvictionDecision::Evict
    }
}

regcache_policy_sdk::export!(ChaosPolicy);
