//! Dialing etcd: the client's connection options (timeouts, HTTP/2 pings, token refresh, TLS)
//! and the bounded first connect.

use etcd_client::{Client, ConnectOptions};

use super::EtcdConfig;
use super::error::{Deadline, registry_error};
use crate::registry::{ErrorKind, RegistryError};

/// Largest gRPC message the client accepts. A full list of a large registry (thousands of
/// nodes of a few KiB) exceeds tonic's 4 MiB default; pages keep single answers far below this.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The registry's own client: `config`'s options and credentials (authenticating once if a user
/// is set), dialed within the request timeout. A TLS file that cannot be used fails with
/// [`ErrorKind::InvalidInput`]: trying again would not help.
pub(crate) async fn dial(config: &EtcdConfig) -> Result<Client, RegistryError> {
    let mut options = options(config)?;
    if let Some((user, password)) = config.user.as_ref() {
        options = options.with_user(user.clone(), password.clone());
    }
    let urls = config.endpoint_urls();
    Deadline::after(config.request_timeout)
        .bound("connect", async {
            Client::connect(&urls, Some(options))
                .await
                .map_err(|e| registry_error("connect", &e))
        })
        .await
        // The operator reads which endpoints did not answer.
        .map_err(|mut e| {
            e.message = format!("{} ({})", e.message, urls.join(", "));
            e
        })
}

/// Everything about the connection but the credentials, which only the registry's own client
/// carries (the endpoint probes must not authenticate).
pub(crate) fn options(config: &EtcdConfig) -> Result<ConnectOptions, RegistryError> {
    let (ping, ping_timeout) = (
        config.http2_keepalive_interval,
        config.http2_keepalive_timeout,
    );
    let mut options = ConnectOptions::new()
        // A backstop for every request, streams' opening included; `Shared::call` bounds unary
        // calls more tightly, attempt by attempt.
        .with_timeout(config.request_timeout)
        .with_connect_timeout(config.request_timeout)
        // Without pings a stream to a hung etcd never ends. Idle pings stay off: etcd does not
        // permit pings without streams (GOAWAY), and unary calls have their own timeout.
        .with_keep_alive(ping, ping_timeout)
        .with_keep_alive_while_idle(false)
        // Unary calls that meet an expired token re-authenticate once and retry; concurrent
        // ones share a single Authenticate.
        .with_auto_token_refresh(true);
    if let Some(tls) = config.tls.as_ref() {
        let files = tls
            .load()
            .map_err(|e| RegistryError::new(ErrorKind::InvalidInput, "connect", e.to_string()))?;
        let mut tls_options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(files.ca));
        if let Some((cert, key)) = files.client {
            tls_options = tls_options.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls_options);
    }
    Ok(options)
}
