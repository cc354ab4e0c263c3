//! Shared support for regcache's end-to-end tests (the tests themselves live in `tests/`).
//!
//! - [`etcd`]: start, freeze, kill and restart real etcd processes, enable auth, generate TLS
//!   files, read their metrics. Every test that needs etcd uses it, so faults are injected the
//!   same way everywhere.
//! - [`registry`]: sample services, a fast registry configuration, and a watcher's view to
//!   compare with etcd's.
//! - [`proxy`]: a TCP proxy a test can cut and heal, to isolate one client from etcd.
//! - [`policies`]: the policies under `policy/` built to wasm.
//! - [`binary`]: the `regcache` binary.
//! - [`cache`]: policies with operator configuration and a cache over real etcd.
//! - [`host`]: `regcache run` as a child process.
//! - [`etcdctl`]: Debian's `etcdctl` against etcd or the host's etcd endpoint, runs bounded.
//! - [`gomicro`]: `gomicro-sim`, many go-micro processes on the etcd v3 Go client, built with Go.
//! - [`http`]: the one HTTP client, for the host's API and etcd's metrics.
//! - [`wait`]: the one bounded wait, for conditions that await and for those that block.
//! - [`wasm_bomb`]: components small on disk that are costly to compile.

pub mod binary;
pub mod cache;
pub mod etcd;
pub mod etcdctl;
pub mod gomicro;
pub mod host;
pub mod http;
pub mod policies;
pub mod proxy;
pub mod registry;
pub mod wait;
pub mod wasm_bomb;
