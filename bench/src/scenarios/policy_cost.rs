//! What consulting the wasm policy costs per lookup: the same rule as native Rust, the bare
//! typed component call, and the engine's full path (per-thread instance, generation check,
//! epoch deadline, fail-safe handling). The engine's claim is a ratio to the bare call.

use std::hint::black_box;

use regcache::decision::{Decide, HealthView, LookupContext, LookupDecision};
use regcache::policy::{EngineOptions, PolicyEngine, PolicySpec};

use crate::measure::{Effort, ns_per_op};
use crate::report::{Row, Section};

/// A context the default policy answers with `serve-cached`, the hit path.
pub fn fresh_hit(service: &str) -> LookupContext<'_> {
    LookupContext {
        service,
        now_ms: 1_700_000_000_000,
        cached: true,
        negative: false,
        versions: 1,
        nodes: 10,
        suspect_nodes: 0,
        since_refresh_ms: Some(1_000),
        since_attempt_ms: Some(1_000),
        consecutive_failures: 0,
        last_error: None,
        refresh_in_flight: false,
        health: HealthView {
            watch_connected: true,
            since_last_contact_ms: Some(10),
            since_failure_ms: None,
        },
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

pub fn run(effort: Effort) -> anyhow::Result<Section> {
    let engine = PolicyEngine::new(
        EngineOptions::default(),
        PolicySpec::embedded_default(vec![]),
    )?;
    let ctx = fresh_hit("greeter.service");
    let ttl_ms = engine.active().settings.ttl.as_millis() as u64;

    let native = ns_per_op(effort, || {
        black_box(native_default(black_box(&ctx), ttl_ms));
    });
    let mut direct = engine.direct_instance()?;
    let bare = ns_per_op(effort, || {
        black_box(direct.decide_lookup(black_box(&ctx)).unwrap());
    });
    let full = ns_per_op(effort, || {
        black_box(engine.decide_lookup(black_box(&ctx)));
    });
    Ok(Section {
        title: "Policy cost per lookup (default policy, record + string argument)".into(),
        rows: vec![
            Row::new("native Rust rule", native, "ns"),
            Row::new("bare component call (typed bindgen call)", bare, "ns"),
            Row::new("engine: wasm policy consulted per lookup", full, "ns"),
            Row::new("engine / bare component call", full / bare, "x").at_most(1.25),
            Row::new("bare component call / native rule", bare / native, "x"),
        ],
        notes: vec![],
    })
}
