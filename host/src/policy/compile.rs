//! Compiling a candidate policy under the operator's bounds (issue 12: helper A owns this file).

use std::path::PathBuf;
use std::time::Duration;

/// How candidate policies are compiled.
#[derive(Debug, Clone, Default)]
pub enum Compiler {
    /// In this process, without bounds: for trusted bytes (tests, embedders who vet policies).
    #[default]
    InProcess,
    /// In a child process running `program` (the `regcache` binary), under [`LoadLimits`].
    Child {
        /// The executable that serves the hidden compile subcommand.
        program: PathBuf,
    },
}

/// Bounds on loading one candidate policy.
#[derive(Debug, Clone, Copy)]
pub struct LoadLimits {
    /// Largest component accepted, from a file or over the API.
    pub max_size: usize,
    /// CPU time compiling may take (all threads together).
    pub compile_cpu: Duration,
    /// Memory compiling may use.
    pub compile_memory: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_size: super::MAX_POLICY_SIZE,
            compile_cpu: Duration::from_secs(30),
            compile_memory: 1 << 30,
        }
    }
}
