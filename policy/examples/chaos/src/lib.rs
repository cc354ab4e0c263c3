//! `chaos`: a policy that misbehaves on purpose, so the host's sandbox can be tested.
//!
//! It behaves like a plain TTL policy until its `fault` configuration says otherwise:
//!
//! | `fault`          | what it does                                                      |
//! |------------------|-------------------------------------------------------------------|
//! | `none`           | nothing (the default)                                             |
//! | `trap`           | panics (traps) in every decision                                  |
//! | `loop`           | loops forever in every decision                                   |
//! | `memory-bomb`    | allocates without bound in every decision                         |
//! | `huge-string`    | rejects every lookup with a 2 MiB reason                          |
//! | `zero-ttl`       | returns settings with a TTL of 0                                  |
//! | `loop-configure` | loops forever in `configure`                                      |
//!
//! With `only-service` set, lookup faults strike only lookups of that service, so the policy
//! passes the host's conformance battery and misbehaves later, in production.

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
}

#[derive(Clone, Copy)]
struct Tuning {
    settings: Settings,
    fault: Fault,
    /// A hash of `only-service`, so the state stays `Copy`; 0 when unset.
    only_service: u64,
}

static TUNING: Configured<Tuning> = Configured::new();

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn strike(fault: Fault) -> Option<LookupDecision> {
    match fault {
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
        config.finish()?;
        let fault = match fault_name.as_deref().unwrap_or("none") {
            "none" => Fault::None,
            "trap" => Fault::Trap,
            "loop" => Fault::Loop,
            "memory-bomb" => Fault::MemoryBomb,
            "huge-string" => Fault::HugeString,
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
        });
        Ok(settings)
    }

    fn decide_lookup(context: LookupContext) -> LookupDecision {
        let tuning = TUNING.get();
        let targeted =
            tuning.only_service == 0 || tuning.only_service == name_hash(&context.service);
        if targeted && let Some(decision) = strike(tuning.fault) {
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

    fn guard_eviction(_context: EvictionContext) -> EvictionDecision {
        let tuning = TUNING.get();
        if tuning.only_service == 0 {
            strike(tuning.fault);
        }
        EvictionDecision::Evict
    }
}

regcache_policy_sdk::export!(ChaosPolicy);
