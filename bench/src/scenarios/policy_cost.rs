//! What consulting the wasm policy costs per lookup: the same rule as native Rust, the bare
//! typed component call, and the engine's full path (per-thread instance, generation check,
//! epoch deadline, fail-safe handling), interleaved round by round. The engine's claim is a
//! ratio to the bare call.

use std::hint::black_box;

use regcache::decision::{Decide, HealthView, LookupContext, LookupDecision};
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec};

use crate::compare::{Rounds, rounds_now};
use crate::measure::{Effort, Timed};
use crate::report::{Row, Section};

/// A context the default policy answers with `serve-cached`, the hit path.
pub fn fresh_hit(service: &str) -> LookupContext<'_> {
    let health = HealthView {
        watch_connected: true,
        since_last_contact_ms: Some(10),
        since_failure_ms: None,
    };
    LookupContext {
        nodes: 10,
        ..LookupContext::cached(service, 1_700_000_000_000, health, 1_000)
    }
}

/// The default policy's hit-path rule written in Rust: the floor any policy call is compared to.
fn native_default(ctx: &LookupContext<'_>, ttl_ms: u64) -> LookupDecision {
    let fresh = ctx.since_refresh_ms.is_some_and(|ms| ms < ttl_ms);
    let panicking = f64::from(ctx.suspect_nodes) > f64::from(ctx.nodes) * 0.5;
    if ctx.cached && fresh && !panicking {
        LookupDecision::ServeCached
    } else {
        LookupDecision::ServeStale { refresh: true }
    }
}

// The arms of each round.
const NATIVE: usize = 0;
const BARE: usize = 1;
const ENGINE: usize = 2;

pub fn run(effort: Effort) -> anyhow::Result<Section> {
    let engine = PolicyEngine::new(
        EngineOptions::default(),
        PolicySpec::embedded_default(vec![]),
    )?;
    let ctx = fresh_hit("greeter.service");
    let ttl_ms = engine.active().settings.ttl.as_millis() as u64;

    let mut direct = engine.direct_instance()?;
    let mut native = Timed::new(effort, || {
        black_box(native_default(black_box(&ctx), ttl_ms));
    });
    let mut bare = Timed::new(effort, || {
        black_box(direct.decide_lookup(black_box(&ctx)).unwrap());
    });
    let mut full = Timed::new(effort, || {
        black_box(engine.decide_lookup(black_box(&ctx)));
    });
    let rounds: Rounds<f64, 3> = rounds_now(effort.rounds, |arm| match arm {
        NATIVE => native.ns_per_op(),
        BARE => bare.ns_per_op(),
        _ => full.ns_per_op(),
    });
    let arm = |i: usize| rounds.per_round(|r| r[i]);
    Ok(Section {
        title: "Policy cost per lookup (default policy, record + string argument)".into(),
        measured: "in process, one thread; the three arms interleaved round by round".into(),
        rows: vec![
            Row::rounds("native Rust rule", arm(NATIVE), "ns"),
            Row::rounds("bare component call (typed bindgen call)", arm(BARE), "ns"),
            Row::rounds(
                "engine: wasm policy consulted per lookup",
                arm(ENGINE),
                "ns",
            ),
            Row::rounds(
                "engine / bare component call",
                rounds.per_round(|r| r[ENGINE] / r[BARE]),
                "x",
            )
            .at_most(1.25),
            Row::rounds(
                "bare component call / native rule",
                rounds.per_round(|r| r[BARE] / r[NATIVE]),
                "x",
            ),
        ],
        notes: vec![],
    })
}
