//! Automatic rollback of a misbehaving generation (issue 12: the lead owns this file).

use std::time::Duration;

/// When a generation is rolled back: `failures` failed decisions within `window`.
#[derive(Debug, Clone, Copy)]
pub struct RollbackRule {
    /// Failures (traps, overruns, invalid answers) that trigger a rollback.
    pub failures: u32,
    /// The sliding window they are counted over.
    pub window: Duration,
}

impl Default for RollbackRule {
    fn default() -> Self {
        RollbackRule {
            failures: 20,
            window: Duration::from_secs(60),
        }
    }
}
