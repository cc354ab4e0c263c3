//! Policy instances: creating one (instantiate + configure), calling it under a deadline, and
//! keeping one per worker thread so that lookups on different threads never share a lock.
//!
//! Each thread keeps, per engine, one instance of the generation it last used. A lookup that
//! finds the active generation newer than its instance rebuilds the instance first (a few
//! microseconds, once per thread per swap), so workers move to a new policy lazily and a lookup
//! in flight finishes on the generation it started with. An instance whose call trapped or ran
//! out of time is dropped: its memory may be corrupt, and the next call gets a fresh one.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::Generation;
use super::bindings::{self, Policy, PolicyPre, RawSettings};
use super::sandbox::{self, InstanceState, Limits};
use crate::decision::{
    Answer, Asked, EvictionContext, EvictionDecision, LookupContext, LookupDecision, PolicyInfo,
    Question,
};

/// Why a call into a policy did not produce a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    /// The call overran its deadline (an endless loop, or far too much work).
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    /// The guest trapped (a panic, an out-of-bounds access, memory exhausted).
    #[error("trapped: {0}")]
    Trap(String),
    /// The guest returned something the host refuses (e.g. an oversized string).
    #[error("invalid answer: {0}")]
    InvalidAnswer(String),
    /// The instance could not be created.
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    /// `configure` refused the operator's configuration.
    #[error("refused its configuration: {0}")]
    Refused(String),
}

impl CallFailure {
    fn from_error(err: wasmtime::Error, deadline: Duration) -> Self {
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallFailure::Deadline(deadline),
            _ => CallFailure::Trap(format!("{err:#}")),
        }
    }
}

/// Which deadline an instance's decisions run under.
///
/// Every deadline (these, and instantiation's and `configure`'s) is counted in epoch ticks,
/// wall-clock time, and a busy 2-core host deschedules a thread mid-call for milliseconds many
/// times a second, for more than 100 ms now and then: a call that reaches its deadline is given
/// as long again, and stopped only if its thread spent at least half a tick of CPU meanwhile
/// (see [`overrun`]). A loop is stopped after twice its deadline; a descheduled call finishes.
/// Nothing of this runs on a call that ends within its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadlines {
    /// Validation's (the conformance battery, in `policy check`, `eval`, start-up and swaps
    /// alike): [`Limits::decision_deadline`], 100 ms by default. It only stops loops: the battery
    /// measures what each decision costs in CPU time and holds its p99 to
    /// [`Limits::latency_budget`], which a descheduled thread cannot fail.
    Validation,
    /// Serving's (the instances that decide lookups): [`Limits::latency_budget`] in whole epoch
    /// ticks, at least two (so 1-2 ms for the default 200 µs). A policy that turns slow after
    /// validation then costs a fail-safe answer and a counted deadline failure per decision,
    /// not a runtime worker stalled for 100 ms (health, metrics and the admin API share them).
    /// A slow policy is stopped after 2-4 ms of its own work, and no good policy is rolled back
    /// for the host's load.
    Serving,
}

/// What a call that reached its deadline gets: `Some(ticks)` more, or stopped.
/// `overrun_at` is the thread's CPU time when the call last reached it (none the first time),
/// `now` the thread's CPU time.
fn overrun(overrun_at: Option<Duration>, now: Duration, ticks: u64) -> Option<u64> {
    match overrun_at {
        Some(at) if now.saturating_sub(at) >= sandbox::TICK / 2 => None,
        _ => Some(ticks),
    }
}

/// One live instance of one generation.
pub(crate) struct Instance {
    store: Store<InstanceState>,
    policy: Policy,
    /// Reused for the service name of every lookup context, so a lookup does not allocate.
    service: String,
    /// Each decision's deadline, in epoch ticks, and as the time it stands for.
    decision_ticks: u64,
    decision_deadline: Duration,
}

impl Instance {
    /// Instantiates `pre` and configures it (under [`Limits::configure_deadline`]); its
    /// decisions then run under `deadlines`. Returns the instance and the settings it gave.
    pub(crate) fn new(
        component_pre: &PolicyPre<InstanceState>,
        config: &[(String, String)],
        limits: &Limits,
        digest: Arc<str>,
        deadlines: Deadlines,
    ) -> Result<(Instance, RawSettings), CallFailure> {
        let engine = component_pre.engine();
        let mut store = Store::new(engine, InstanceState::new(limits, digest));
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|mut store| {
            let state = store.data_mut();
            let now = sandbox::thread_cpu_time();
            match overrun(state.overrun_at.replace(now), now, state.deadline_ticks) {
                Some(ticks) => Ok(UpdateDeadline::Continue(ticks)),
                None => Ok(UpdateDeadline::Interrupt),
            }
        });
        let deadline = limits.configure_deadline;
        store.data_mut().deadline_ticks = sandbox::ticks(deadline);
        store.set_epoch_deadline(sandbox::ticks(deadline));
        let policy = contain(|| component_pre.instantiate(&mut store)).map_err(|e| {
            match CallFailure::from_error(e, deadline) {
                CallFailure::Trap(msg) => CallFailure::Instantiate(msg),
                other => other,
            }
        })?;
        let settings = contain(|| policy.call_configure(&mut store, config))
            .map_err(|e| CallFailure::from_error(e, deadline))?
            .map_err(|reason| CallFailure::Refused(truncate(reason)))?;
        let decision_ticks = sandbox::ticks(match deadlines {
            Deadlines::Validation => limits.decision_deadline,
            Deadlines::Serving => limits.latency_budget,
        });
        store.data_mut().deadline_ticks = decision_ticks;
        let instance = Instance {
            store,
            policy,
            service: String::new(),
            decision_ticks,
            decision_deadline: sandbox::TICK
                .saturating_mul(u32::try_from(decision_ticks).unwrap_or(u32::MAX)),
        };
        Ok((instance, bindings::raw_settings(&settings)))
    }

    /// See `GuestOutput::logging_cost`.
    pub(crate) fn logging_cost(&self) -> Duration {
        self.store.data().logging_cost()
    }

    fn start_decision(&mut self) {
        self.store.set_epoch_deadline(self.decision_ticks);
        self.store.data_mut().overrun_at = None;
    }

    pub(crate) fn decide_lookup(
        &mut self,
        ctx: &LookupContext<'_>,
    ) -> Result<LookupDecision, CallFailure> {
        self.start_decision();
        let mut service = std::mem::take(&mut self.service);
        service.clear();
        service.push_str(ctx.service);
        let lowered = bindings::lookup_context(ctx, service);
        let result = contain(|| self.policy.call_decide_lookup(&mut self.store, &lowered));
        self.service = lowered.service;
        let decision = result.map_err(|e| CallFailure::from_error(e, self.decision_deadline))?;
        bindings::lookup_decision(decision).map_err(|e| CallFailure::InvalidAnswer(e.to_string()))
    }

    pub(crate) fn guard_eviction(
        &mut self,
        ctx: &EvictionContext<'_>,
    ) -> Result<EvictionDecision, CallFailure> {
        self.start_decision();
        let lowered = bindings::eviction_context(ctx);
        let decision = contain(|| self.policy.call_guard_eviction(&mut self.store, &lowered))
            .map_err(|e| CallFailure::from_error(e, self.decision_deadline))?;
        Ok(bindings::eviction_decision(decision))
    }

    /// Asks whichever question `question` is.
    pub(crate) fn ask(&mut self, question: &Question) -> Result<Answer, CallFailure> {
        match question.asked() {
            Asked::Lookup(context) => self.decide_lookup(&context).map(Answer::Lookup),
            Asked::Eviction(context) => self.guard_eviction(&context).map(Answer::Eviction),
        }
    }
}

/// Runs one call into a guest, turning a panic of the host side into an error, so that a host
/// bug met by a guest costs that guest's call (a trap, the fail-safe) rather than a worker.
/// (Guest output used to be such a panic: wasmtime-wasi's stream calls `block_on` the ambient
/// runtime; `stdio` now implements them without.)
fn contain<T>(call: impl FnOnce() -> wasmtime::Result<T>) -> wasmtime::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(wasmtime::Error::msg(format!(
            "a host call of the guest panicked: {message}"
        )))
    })
}

fn truncate(text: String) -> String {
    let clipped = bindings::clip(&text);
    if clipped.len() == text.len() {
        text
    } else {
        format!("{clipped}…")
    }
}

/// Type-checks a compiled component against the world: every export present with the right
/// type, every import offered by the linker.
pub(crate) fn pre(
    linker: &wasmtime::component::Linker<InstanceState>,
    component: &Component,
) -> wasmtime::Result<PolicyPre<InstanceState>> {
    PolicyPre::new(linker.instantiate_pre(component)?)
}

/// A thread's instance of one engine's policy.
struct Worker {
    /// The engine this instance belongs to; dead engines' workers are swept.
    owner: Weak<super::Shared>,
    owner_id: u64,
    generation: Arc<Generation>,
    /// This thread's own copy of the generation's info: handing it out with every decision
    /// bumps a reference count no other thread touches.
    info: Arc<PolicyInfo>,
    instance: Instance,
}

thread_local! {
    static WORKERS: RefCell<Vec<Worker>> = const { RefCell::new(Vec::new()) };
}

/// Runs `call` on this thread's instance of `generation`, creating or replacing it as needed.
/// A failed call drops the instance.
pub(crate) fn with_thread_instance<R>(
    shared: &Arc<super::Shared>,
    generation: &Arc<Generation>,
    call: impl FnOnce(&mut Instance) -> Result<R, CallFailure>,
) -> Result<(R, Arc<PolicyInfo>), CallFailure> {
    WORKERS.with(|workers| {
        let mut workers = workers.borrow_mut();
        let slot = workers.iter().position(|w| w.owner_id == shared.id);
        let slot = match slot {
            Some(i) if Arc::ptr_eq(&workers[i].generation, generation) => i,
            found => {
                let (instance, _) = generation.instantiate(&shared.limits)?;
                shared.stats.count_instantiation();
                let worker = Worker {
                    owner: Arc::downgrade(shared),
                    owner_id: shared.id,
                    generation: generation.clone(),
                    info: Arc::new(PolicyInfo::clone(&generation.info)),
                    instance,
                };
                match found {
                    Some(i) => {
                        workers[i] = worker;
                        i
                    }
                    None => {
                        workers.retain(|w| w.owner.strong_count() > 0);
                        workers.push(worker);
                        workers.len() - 1
                    }
                }
            }
        };
        let worker = &mut workers[slot];
        match call(&mut worker.instance) {
            Ok(answer) => Ok((answer, worker.info.clone())),
            Err(failure) => {
                workers.swap_remove(slot);
                Err(failure)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serving_decision_past_its_deadline_is_stopped_only_once_it_spent_cpu_meanwhile() {
        let ms = Duration::from_millis;
        let ticks = 2;
        assert_eq!(
            overrun(None, ms(7), ticks),
            Some(ticks),
            "first time: more ticks"
        );
        assert_eq!(
            overrun(Some(ms(7)), ms(7) + Duration::from_micros(100), ticks),
            Some(ticks),
            "descheduled meanwhile: more ticks"
        );
        assert_eq!(overrun(Some(ms(7)), ms(8), ticks), None, "it ran: stopped");
    }
}
