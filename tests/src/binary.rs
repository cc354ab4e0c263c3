//! The `regcache` binary, built once per test process, for tests that run it as users do.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::policies::repo_root;

/// Path of the `regcache` binary of this workspace, built (incrementally) on first use.
pub fn regcache_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "regcache", "--bin", "regcache"])
            .current_dir(repo_root())
            .status()
            .expect("run cargo to build the regcache binary");
        assert!(status.success(), "building the regcache binary failed");
        target_dir.join("debug").join("regcache")
    })
}
