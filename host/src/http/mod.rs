//! The HTTP API: the only code in regcache that knows JSON request and response shapes.
//!
//! | Route | |
//! |---|---|
//! | `GET /v1/services` | known service names |
//! | `GET /v1/services/{name}` | a lookup: every version and node, with provenance |
//! | `POST /v1/registrations` | register a go-micro service (≥ 1 node) under the host's lease |
//! | `GET /v1/registrations` | what this host registered |
//! | `DELETE /v1/registrations/{service}/{node}` | deregister one node |
//! | `GET /v1/policy` | the active policy and the engine's counters |
//! | `PUT /v1/policy` | swap in a policy (wasm bytes; admin token required); `?replay=recent` first replays the recording in memory, `?mode=shadow` loads it as the shadow instead |
//! | `GET /v1/policy/shadow` | the shadow run: agreements, disagreements with their questions, the candidate's failures and cost (admin) |
//! | `POST /v1/policy/shadow/promote`, `DELETE /v1/policy/shadow` | activate the shadow as a swap would, or drop it (admin) |
//! | `GET /v1/policy/recording` | the questions recorded in memory, as JSON lines (admin) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness |
//!
//! Handlers are a few lines: take the state, call the library, map the result to a status.
//! Every error is JSON (`{"error": "...", "message": "..."}`) with a 4xx status for anything the
//! client got wrong: malformed JSON, odd names, oversized bodies (413), unknown routes (404),
//! wrong methods (405), missing or wrong admin token (401), admin endpoints with no token
//! configured (403: disabled, never open), a registration of a node another host's lease holds
//! (409, the owner's lease in `details`; `?force=true` takes it). 5xx means the registry or the
//! lookup could not answer (503), or etcd did not answer in time (504), never bad input.
//!
//! [`serve`] runs the router: connection limit, header-read, idle and write timeouts, head
//! limits (431, 414), and JSON bodies on the answers hyper gives by itself to unparsable
//! requests.

mod admin;
mod nodes;
mod serve;
mod services;
mod shadow;

pub use serve::{
    ConnectionLimits, ConnectionStats, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_CAP, DEFAULT_WRITE_TIMEOUT, HEADER_READ_TIMEOUT_RANGE,
    IDLE_TIMEOUT_RANGE, MAX_CONNECTIONS_RANGE, RESERVED_DESCRIPTORS, WRITE_TIMEOUT_RANGE,
    default_max_connections, serve,
};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::host::Parts;
use crate::registry::{ErrorKind, RegistryError, lease_hex};

/// Largest request body, policies excepted: a registration is a few KiB.
pub const MAX_BODY: usize = 1024 * 1024;

/// Longest service name or node id accepted.
const MAX_NAME: usize = 253;

/// What the handlers share: the host's parts and the admin token.
pub(crate) struct State {
    parts: Parts,
    /// The admin token; `None` disables the admin endpoints.
    admin_token: Option<String>,
}

impl std::ops::Deref for State {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.parts
    }
}

/// Shared handle on [`State`].
type AppState = Arc<State>;

/// The HTTP API front: its listener, bound at build, and the router it serves.
pub(crate) struct Front {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
}

impl Front {
    /// Binds `address` for the API over `parts`.
    pub(crate) async fn bind(
        address: SocketAddr,
        limits: ConnectionLimits,
        stats: Arc<ConnectionStats>,
        parts: Parts,
        admin_token: Option<String>,
    ) -> anyhow::Result<Front> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        let address = listener.local_addr()?;
        tracing::info!(%address, "listening on http://{address}");
        Ok(Front {
            listener,
            router: router(Arc::new(State { parts, admin_token })),
            limits,
            stats,
        })
    }

    /// Where the API listens.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves until `drain` completes, then lets requests in flight finish ([`serve`]).
    pub(crate) async fn serve(self, drain: impl Future<Output = ()>) {
        serve(self.listener, self.router, self.limits, self.stats, drain).await
    }
}

/// The API's routes over `state`.
fn router(state: AppState) -> axum::Router {
    use axum::routing::{delete, post, put};
    // `PUT /v1/policy` takes what a policy file may hold (`policy.max_size`); validation
    // refuses a larger body too, naming the limit, but the body limit keeps it from being
    // buffered at all.
    let max_policy = state.engine.load_limits().max_size;
    axum::Router::new()
        .route("/v1/services", get(services::list))
        .route("/v1/services/{name}", get(services::lookup))
        .route(
            "/v1/registrations",
            get(services::registrations).post(services::register),
        )
        .route(
            "/v1/registrations/{service}/{node}",
            delete(services::deregister),
        )
        .route(
            "/v1/policy",
            get(admin::policy)
                .merge(put(admin::swap_policy).layer(DefaultBodyLimit::max(max_policy))),
        )
        .route(
            "/v1/policy/shadow",
            get(shadow::report).delete(shadow::remove),
        )
        .route("/v1/policy/shadow/promote", post(shadow::promote))
        .route("/v1/policy/recording", get(shadow::recording))
        .route("/metrics", get(admin::metrics))
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept this method",
    )
}

/// An error answer: a status and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

/// The JSON body of every error.
#[derive(Debug, Serialize)]
struct ErrorBody {
    /// A stable code, e.g. `not_found`.
    error: &'static str,
    /// A human-readable reason.
    message: String,
    /// Extra details (e.g. the policy that stayed active).
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error,
                message: message.into(),
                details: None,
            },
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn with_details(mut self, details: serde_json::Value) -> Self {
        self.body.details = Some(details);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let (status, code) = match e.kind {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "registry_timeout"),
            ErrorKind::Unavailable | ErrorKind::Unauthenticated => {
                (StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable")
            }
            ErrorKind::Conflict => {
                let error = ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string());
                let Some(owner_lease) = e.owner_lease else {
                    return error;
                };
                // Both spellings: etcdctl shows leases in hex, etcd's JSON in decimal.
                return error.with_details(serde_json::json!({
                    "owner_lease": owner_lease,
                    "owner_lease_hex": lease_hex(owner_lease),
                }));
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Body rejections keep their status (413 for an oversized body, 400 otherwise) with a JSON
/// body.
impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

/// Checks a service name or node id: 1 to 253 characters of `A-Z a-z 0-9 . _ - : @`, starting
/// with a letter or digit, which covers go-micro's names (`go.micro.srv.greeter`) and node ids
/// (`greeter-<uuid>`), and keeps keys, logs and URLs unambiguous (no `..`).
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = name
        .as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphanumeric)
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid {what} {name:?}: use 1 to {MAX_NAME} characters among A-Z a-z 0-9 . _ - : @, \
             starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_is_409_with_the_owners_lease_in_both_spellings() {
        let e = ApiError::from(RegistryError::conflict("register", "svc", "n1", 255));
        assert_eq!((e.status, e.body.error), (StatusCode::CONFLICT, "conflict"));
        assert_eq!(
            e.body.details,
            Some(serde_json::json!({"owner_lease": 255, "owner_lease_hex": "00000000000000ff"}))
        );
        assert!(e.body.message.contains("svc/n1"), "{}", e.body.message);
    }

    #[test]
    fn names() {
        for good in [
            "greeter",
            "go.micro.srv.greeter",
            "greeter-1f2e:8080",
            "a@b_c",
        ] {
            assert!(check_name("service", good).is_ok(), "{good}");
        }
        let long = "x".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "a b",
            "a/b",
            "ä",
            "a\0",
            "<script>",
            "..",
            ".hidden",
            "-x",
            long.as_str(),
        ] {
            assert!(check_name("service", bad).is_err(), "{bad:?}");
        }
    }
}
