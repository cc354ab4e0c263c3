//! The errors the endpoint answers with: etcd's own codes and texts where etcd has the error
//! (clients match etcd's texts exactly to recognise them, as clientv3's `rpctypes` does), and
//! errors naming regcache where the endpoint refuses what etcd would do.

use tonic::Status;

use crate::cache::LookupError;
use crate::registry::{ErrorKind, RegistryError};

pub(super) const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

pub(super) fn auth_failed() -> Status {
    Status::invalid_argument("etcdserver: authentication failed, invalid user ID or password")
}

pub(super) fn auth_not_enabled() -> Status {
    Status::failed_precondition("etcdserver: authentication is not enabled")
}

pub(super) fn user_empty() -> Status {
    Status::invalid_argument("etcdserver: user name is empty")
}

pub(super) fn invalid_token() -> Status {
    Status::unauthenticated("etcdserver: invalid auth token")
}

pub(super) fn lease_not_found() -> Status {
    Status::not_found("etcdserver: requested lease not found")
}

pub(super) fn lease_exists() -> Status {
    Status::failed_precondition("etcdserver: lease already exists")
}

pub(super) fn lease_ttl_too_large() -> Status {
    Status::out_of_range("etcdserver: too large lease TTL")
}

pub(super) fn key_not_provided() -> Status {
    Status::invalid_argument("etcdserver: key is not provided")
}

pub(super) fn compacted() -> Status {
    Status::out_of_range(COMPACTED)
}

pub(super) fn future_revision() -> Status {
    Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
}

pub(super) fn timed_out() -> Status {
    Status::unavailable("etcdserver: request timed out")
}

/// A key or range the endpoint does not serve.
pub(super) fn outside(prefix: &str, key: &[u8]) -> Status {
    Status::permission_denied(format!(
        "regcache serves only the registry prefix {prefix:?}: {:?} is outside it",
        String::from_utf8_lossy(key)
    ))
}

/// An operation the endpoint does not serve.
pub(super) fn unserved(what: &str, prefix: &str) -> Status {
    Status::unimplemented(format!(
        "regcache's etcd endpoint does not serve {what}: it serves authentication, leases, \
         and reads, writes and watches of the registry prefix {prefix:?}"
    ))
}

/// A bound of one connection reached.
pub(super) fn too_many(what: &str, limit: usize, setting: &str) -> Status {
    Status::resource_exhausted(format!(
        "regcache: this connection has {limit} {what} already, its limit (setting {setting})"
    ))
}

/// A value that is not a registration of the key it is put at.
pub(super) fn invalid_value(reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("regcache: not a valid registration: {reason}"))
}

pub(super) fn registry(e: &RegistryError) -> Status {
    match e.kind {
        ErrorKind::Timeout => timed_out(),
        ErrorKind::InvalidInput => invalid_value(&e.message),
        ErrorKind::Conflict | ErrorKind::Unauthenticated => {
            Status::permission_denied(format!("regcache: {e}"))
        }
        ErrorKind::NotFound => Status::not_found(format!("regcache: {e}")),
        ErrorKind::Unavailable => Status::unavailable(format!("regcache: {e}")),
    }
}

/// A lookup the policy refused or the registry could not answer (not found is an empty
/// range, never an error).
pub(super) fn lookup(e: &LookupError) -> Status {
    Status::unavailable(format!("regcache: {e}"))
}
