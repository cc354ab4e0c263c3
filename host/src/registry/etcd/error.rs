//! What an etcd failure means to the registry: the client's errors classified into
//! [`ErrorKind`]s by their type (etcd-client's variants, gRPC status codes, typed errors down the
//! source chain), never by their message text, and the one way an operation's deadline becomes an
//! error.
//!
//! The message text is kept for people only: tonic hides the interesting part of a transport
//! failure ("invalid peer certificate: UnknownIssuer") in source errors, so the message carries
//! the whole chain.

use std::error::Error;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use crate::registry::{ErrorKind, RegistryError};

/// Maps a client error of `op` to the registry's kinds, with the transport's full reason.
pub(crate) fn registry_error(op: &'static str, e: &etcd_client::Error) -> RegistryError {
    let mut message = e.to_string();
    let mut source = wrapped(e).and_then(Error::source);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    RegistryError::new(kind(e), op, message)
}

/// Whether trying again (the balancer picks again) may help: an outage may end, a certificate
/// refused by TLS will be refused again, and failing at once gives the operator the reason
/// without the wait. (Attempts that time out are retried too, by `Shared::call`.)
pub(crate) fn retryable(e: &etcd_client::Error) -> bool {
    kind(e) == ErrorKind::Unavailable && !refused_certificate(e)
}

fn kind(e: &etcd_client::Error) -> ErrorKind {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => match status.code() {
            Code::DeadlineExceeded => ErrorKind::Timeout,
            // tonic's own answer when the client's request timeout (a backstop, see
            // `connect::options`) runs out.
            Code::Cancelled if caused_by::<tonic::TimeoutExpired>(status).is_some() => {
                ErrorKind::Timeout
            }
            Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Unauthenticated,
            Code::InvalidArgument | Code::ResourceExhausted | Code::FailedPrecondition => {
                ErrorKind::InvalidInput
            }
            // Among the calls the registry makes, etcd answers NotFound only for a lease it
            // does not have (a put on it, a keep-alive or a TTL of it).
            Code::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Unavailable,
        },
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) => {
            ErrorKind::InvalidInput
        }
        // The client's answer to a keep-alive opened on a lease etcd no longer has (TTL 0);
        // its only other use, a send on a channel it has just created, cannot fail.
        E::LeaseKeepAliveError(_) => ErrorKind::NotFound,
        _ => ErrorKind::Unavailable,
    }
}

/// Whether TLS refused the server's certificate (or the server sent none): rustls's verdict,
/// found down the transport's source chain.
fn refused_certificate(e: &etcd_client::Error) -> bool {
    wrapped(e)
        .and_then(caused_by::<rustls::Error>)
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::InvalidCertRevocationList(_)
                    | rustls::Error::NoCertificatesPresented
            )
        })
}

/// The error etcd-client wraps, where its cause chain starts (the client's own error has no
/// `source`).
fn wrapped(e: &etcd_client::Error) -> Option<&(dyn Error + 'static)> {
    use etcd_client::Error as E;
    match e {
        E::TransportError(t) => Some(t),
        E::GRpcStatus(s) => Some(s),
        E::IoError(io) => Some(io),
        _ => None,
    }
}

/// The first error of type `T` in `e`'s cause chain, `e` included. An `io::Error`'s `source`
/// skips the error it wraps (TLS failures arrive as one), so the walk steps into it instead.
fn caused_by<'a, T: Error + 'static>(e: &'a (dyn Error + 'static)) -> Option<&'a T> {
    std::iter::successors(Some(e), |&e| match e.downcast_ref::<std::io::Error>() {
        Some(io) => io.get_ref().map(|inner| inner as &(dyn Error + 'static)),
        None => e.source(),
    })
    .find_map(|e| e.downcast_ref::<T>())
}

/// A deadline for a whole operation (its attempts, pages, and waits on locks), with its length
/// for the message of the timeout it ends in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    length: Duration,
}

impl Deadline {
    /// The deadline `length` from now.
    pub(crate) fn after(length: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + length,
            length,
        }
    }

    /// Whether it has passed.
    pub(crate) fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The error of `op` ending here.
    pub(crate) fn timeout(&self, op: &'static str) -> RegistryError {
        let length = self.length;
        RegistryError::new(
            ErrorKind::Timeout,
            op,
            format!("no answer within {length:?}"),
        )
    }

    /// Runs `work` until the deadline; past it, `work` is dropped and `op` times out.
    pub(crate) async fn bound<T>(
        self,
        op: &'static str,
        work: impl Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        tokio::time::timeout_at(self.at, work)
            .await
            .unwrap_or_else(|_| Err(self.timeout(op)))
    }
}
