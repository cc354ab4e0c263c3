//! regcache: a service-registry cache in front of etcd, steered by a sandboxed WebAssembly policy.
//!
//! The library is the product; the `regcache` binary is a thin layer over it. Start with
//! `ARCHITECTURE.md` at the repository root for the map. In short:
//!
//! - [`model`]: go-micro's service model and its JSON codec.
//! - [`registry`]: the registry interface, and the only code that speaks etcd.
//! - [`decision`]: what a policy is asked and answers, free of wasm detail.
//! - [`cache`]: the registry cache, decided by the policy on every lookup.
//! - [`policy`]: the only code that speaks wasmtime: loading, validating, hot-swapping policies.
//! - [`config`]: the host's configuration (TOML, flags, environment), validated without I/O.
//! - [`http`]: the HTTP API, the only code that knows JSON request/response shapes.
//! - [`metrics`]: Prometheus metrics, collected from the components' counters at scrape time.
//! - [`snapshot`]: the cache's snapshot on disk, written atomically.
//! - [`state_dir`]: the state directory, and running without it when it cannot be written.
//! - [`fsutil`]: the one way files are read (regular files only, bounded) and written
//!   (atomically, durably).
//! - [`Host`]: a whole host: build (all I/O), serve until a future completes, drain, stop.
#![deny(missing_docs)]

pub mod cache;
pub mod config;
pub mod decision;
pub mod fsutil;
mod host;
pub mod http;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod registry;
pub mod snapshot;
pub mod state_dir;

pub use host::Host;
