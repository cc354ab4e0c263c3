//! Shared harness of regcache's end-to-end tests: the policies under `policy/` built to wasm,
//! the `regcache` binary, and (in `etcd`) real etcd processes on loopback.

pub mod binary;
pub mod policies;
