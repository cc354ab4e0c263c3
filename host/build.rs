//! Builds the default policy (`policy/default`) to a WebAssembly component so that the host can
//! embed it: the binary then runs with no policy file, and the embedded bytes always match the
//! source in this tree (no committed blob).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let policy_dir = root.join("policy");
    for watched in ["wit", "policy/sdk", "policy/default", "policy/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    // One target directory for every policy build (this script's and the tests'), outside the
    // host's own so that the nested cargo never waits on the outer one's lock.
    let target_dir = root.join("target").join("policy");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "regcache-policy-default",
        ])
        .arg("--manifest-path")
        .arg(policy_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags and wrappers (clippy's, say) are for the host, not the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("failed to run cargo to build the default policy");
    if !status.success() {
        panic!(
            "building the default policy failed; is the wasm32-wasip2 target installed? \
             (rustup target add wasm32-wasip2, or run scripts/setup)"
        );
    }
    let wasm = target_dir.join("wasm32-wasip2/release/regcache_policy_default.wasm");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("default_policy.wasm");
    std::fs::copy(&wasm, &out).expect("copy the default policy into OUT_DIR");
}
