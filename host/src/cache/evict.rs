//! The eviction guard: every removal of nodes from a cached entry is judged by the policy.
//!
//! Removals come from watch deletes (batched per service for the settings' `eviction-batch`,
//! so that four leases revoked at once are judged as one burst), from refreshes and resyncs
//! that no longer list nodes, and from node TTLs. The host keeps, per service, the times of
//! removals within the `eviction-window` and passes their count as `recent-deletions`.
//!
//! Outcomes: `evict` removes the nodes; `keep-suspect` keeps serving them marked suspect until
//! their hold (capped by `max-suspect-hold`) ends or the registry lists them again (they become
//! normal); `keep` leaves them as they are until the registry's next answer. A later listing
//! that still lacks a suspect re-confirms its removal and asks the guard again: it leaves on
//! `evict`, and otherwise stays suspect until its first hold ends (a hold is never extended).
//! So the policy, not the host, judges whether a confirmation is to be trusted: etcd lists a
//! lease that expired while it was frozen as gone, though its owner is about to put it back.

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::entry::EntryState;
use super::health::HealthCell;
use super::millis;
use super::stats::{Counter, Counters};
use crate::decision::{Decide, EvictionContext, EvictionDecision, EvictionReason};
use crate::model::Service;

/// The eviction guard of one cache: the parts of it a judgement reads and counts with.
pub(super) struct Guard<'a> {
    pub policy: &'a dyn Decide,
    pub health: &'a HealthCell,
    pub counters: &'a Counters,
}

impl Guard<'_> {
    /// Applies a full listing of `service` (a refresh or a resync) to its entry, counts the
    /// suspects it names again, and sends the nodes it lacks to the guard as one removal for
    /// `reason`. Nodes in `ignored` are left to the watch. The caller publishes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reconcile(
        &self,
        service: &str,
        state: &mut EntryState,
        listing: &[Service],
        listed_at: Instant,
        now: Instant,
        ignored: &BTreeSet<String>,
        reason: EvictionReason,
    ) {
        let listed = state.apply_listing(listing, listed_at, now, ignored);
        self.counters
            .add(Counter::SuspectsRestored, listed.restored);
        let removals = listed.removals.into_iter().map(|id| (id, reason)).collect();
        self.judge(service, state, removals, now);
        // The registry said "not found" and the guard let the last nodes go.
        if listing.is_empty() && state.nodes.is_empty() {
            state.negative = true;
        }
    }

    /// Judges the removal of `removals` (node id, reason) from `service`'s entry, in one guard
    /// call. Nodes already gone are skipped; suspects among them are re-confirmations, not
    /// counted again as recent deletions. The caller publishes.
    pub(super) fn judge(
        &self,
        service: &str,
        state: &mut EntryState,
        removals: Vec<(String, EvictionReason)>,
        now: Instant,
    ) {
        let removals: Vec<(String, EvictionReason)> = removals
            .into_iter()
            .filter(|(id, _)| {
                state.pending.remove(id);
                state.nodes.contains_key(id)
            })
            .collect();
        if state.pending.is_empty() {
            state.pending_since = None;
        }
        let Some(&(_, reason)) = removals.first() else {
            return;
        };
        let (suspects, fresh): (Vec<String>, Vec<String>) = removals
            .into_iter()
            .map(|(id, _)| id)
            .partition(|id| state.nodes[id].suspect_until.is_some());
        let settings = self.policy.active().settings;
        let window = settings.eviction_window;
        while state
            .deletions
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            state.deletions.pop_front();
        }
        state.deletions.extend(fresh.iter().map(|_| now));
        let nodes_before = state.nodes.len() as u32;
        let (health, now_ms) = self.health.sampled_view_and_wall_ms();
        let context = EvictionContext {
            service,
            now_ms,
            nodes_before,
            nodes_after: nodes_before - (suspects.len() + fresh.len()) as u32,
            recent_deletions: state.deletions.len() as u32,
            window_ms: millis(window),
            health,
            reason,
        };
        let decided = self.policy.guard_eviction(&context);
        self.counters.inc(Counter::GuardCalls);
        let decision = match decided.decision {
            EvictionDecision::KeepSuspect { hold_ms } => {
                let hold = std::time::Duration::from_millis(hold_ms).min(settings.max_suspect_hold);
                if hold.is_zero() {
                    EvictionDecision::Evict
                } else {
                    for id in &fresh {
                        if let Some(node) = state.nodes.get_mut(id) {
                            node.suspect_until = Some(now + hold);
                        }
                    }
                    self.counters
                        .add(Counter::NodesKeptSuspect, fresh.len() as u64);
                    decided.decision
                }
            }
            other => other,
        };
        match decision {
            EvictionDecision::Evict => {
                for id in fresh.iter().chain(&suspects) {
                    state.nodes.remove(id);
                }
                self.counters.add(Counter::NodesEvicted, fresh.len() as u64);
                self.counters
                    .add(Counter::SuspectsConfirmedAbsent, suspects.len() as u64);
            }
            EvictionDecision::Keep => self.counters.add(Counter::NodesKept, fresh.len() as u64),
            EvictionDecision::KeepSuspect { .. } => {}
        }
        tracing::info!(
            service,
            ?reason,
            nodes_before = context.nodes_before,
            nodes_after = context.nodes_after,
            recent_deletions = context.recent_deletions,
            reconfirmed_suspects = suspects.len(),
            ?decision,
            policy = %decided.policy,
            "eviction guard"
        );
    }
}
