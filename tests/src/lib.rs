//! Shared harness of regcache's end-to-end tests: the policies under `policy/` built to wasm,
//! and (in `etcd`) real etcd processes on loopback.

pub mod policies;
