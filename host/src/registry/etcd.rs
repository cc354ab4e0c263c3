//! The etcd registry (placeholder; built in the etcd issue).
