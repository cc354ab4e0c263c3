//! What a lookup returns: a shared answer with its provenance, or a typed error.
//!
//! An [`Answer`] shares the entry's immutable view (one reference-count increment, no copy), so
//! answering from the cache allocates nothing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::entry::View;
use crate::decision::PolicyInfo;
use crate::model::Service;
use crate::registry::ErrorKind;

/// Where an answer (or a "not found") came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The cache, which the policy judged fresh.
    Fresh,
    /// The cache, past freshness (or kept through a failed refresh).
    Stale,
    /// A registry request this lookup waited for.
    Registry,
    /// The negative cache: the registry said "not found" recently.
    Negative,
    /// The policy alone: a "not found" it decided without a negative entry behind it.
    Policy,
}

impl Source {
    /// A stable lowercase name for metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Fresh => "fresh",
            Source::Stale => "stale",
            Source::Registry => "registry",
            Source::Negative => "negative",
            Source::Policy => "policy",
        }
    }
}

/// A successful lookup: the service's versions and nodes, and where they came from.
#[derive(Clone)]
pub struct Answer {
    pub(crate) view: Arc<View>,
    /// Where the answer came from.
    pub source: Source,
    /// Time since the registry last answered for this service; `None` if unknown (an entry
    /// imported from a snapshot older than this process).
    pub age: Option<Duration>,
    /// The policy generation that decided the lookup.
    pub policy: Arc<PolicyInfo>,
    /// The policy's decision, as [`crate::decision::LookupDecision::label`] names it.
    pub decision: &'static str,
}

impl Answer {
    /// Every version of the service with its nodes, suspect nodes included, sorted by version
    /// and node id.
    pub fn services(&self) -> &[Service] {
        &self.view.services
    }

    /// Ids of the nodes kept as suspect by an eviction guard (still served), sorted.
    pub fn suspect_nodes(&self) -> &[String] {
        &self.view.suspects
    }

    /// Whether node `id` is suspect.
    pub fn is_suspect(&self, id: &str) -> bool {
        self.view
            .suspects
            .binary_search_by(|s| s.as_str().cmp(id))
            .is_ok()
    }

    /// Number of nodes over all versions, suspects included.
    pub fn node_count(&self) -> usize {
        self.view.nodes as usize
    }

    /// Ids of every node, all versions, sorted by version then id.
    pub fn node_ids(&self) -> impl Iterator<Item = &str> {
        self.view
            .services
            .iter()
            .flat_map(|s| s.nodes.iter().map(|n| n.id.as_str()))
    }
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field("source", &self.source)
            .field("age", &self.age)
            .field("nodes", &self.node_ids().collect::<Vec<_>>())
            .field("suspects", &self.view.suspects)
            .field("policy", &self.policy.generation)
            .field("decision", &self.decision)
            .finish()
    }
}

/// Why a lookup has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// The service does not exist (HTTP 404).
    #[error("service {service} not found ({}): {reason}", provenance.as_str())]
    NotFound {
        /// The service looked up.
        service: String,
        /// Why, from the policy or the registry.
        reason: String,
        /// [`Source::Negative`] from the negative cache, [`Source::Registry`] from a refresh
        /// this lookup waited for, [`Source::Fresh`] when the policy rejected on its own.
        provenance: Source,
        /// The policy generation that decided.
        policy: Arc<PolicyInfo>,
    },
    /// No answer can be given now (HTTP 503).
    #[error("service {service} unavailable: {reason}")]
    Unavailable {
        /// The service looked up.
        service: String,
        /// Why: the policy's reason, the rate limit, the budget, or the registry's error.
        reason: String,
        /// The registry error behind it, if any.
        cause: Option<ErrorKind>,
        /// The policy generation that decided.
        policy: Arc<PolicyInfo>,
    },
}

impl LookupError {
    /// The policy generation that decided.
    pub fn policy(&self) -> &Arc<PolicyInfo> {
        match self {
            LookupError::NotFound { policy, .. } | LookupError::Unavailable { policy, .. } => {
                policy
            }
        }
    }

    /// Whether this is a "not found".
    pub fn is_not_found(&self) -> bool {
        matches!(self, LookupError::NotFound { .. })
    }
}
