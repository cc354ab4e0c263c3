//! The `regcache` binary (being built).
fn main() {}
