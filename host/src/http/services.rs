//! Lookups, the service list and registrations.

use std::collections::BTreeSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::nodes::check_nodes;
use super::{ApiError, AppState, check_name};
use crate::cache::{Answer, LookupError, Source};
use crate::decision::PolicyInfo;
use crate::model::Service;
use crate::registry::{self, ErrorKind, Takeover};

/// `GET /v1/services/{name}`.
#[derive(Serialize)]
pub(super) struct LookupBody<'a> {
    name: &'a str,
    /// Every version with its nodes, in go-micro's shape.
    services: &'a [Service],
    provenance: Provenance<'a>,
}

#[derive(Serialize)]
struct Provenance<'a> {
    /// fresh, stale, registry or negative.
    source: &'static str,
    /// Time since the registry last answered for this service.
    age_ms: Option<u64>,
    suspect_nodes: &'a [String],
    /// The policy's decision.
    decision: &'static str,
    policy: PolicyRef<'a>,
    /// Served from the snapshot written by an earlier run (the registry has not answered
    /// since the start).
    snapshot: bool,
}

#[derive(Serialize)]
pub(super) struct PolicyRef<'a> {
    generation: u64,
    digest: &'a str,
}

impl<'a> PolicyRef<'a> {
    pub(super) fn of(info: &'a PolicyInfo) -> Self {
        PolicyRef {
            generation: info.generation,
            digest: &info.digest,
        }
    }
}

pub(super) async fn lookup(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Found, ApiError> {
    let Path(name) = name?;
    check_name("service name", &name)?;
    let answer = state.cache.lookup(&name).await.map_err(lookup_error)?;
    Ok(Found {
        answer,
        name,
        snapshot: state.serving_snapshot(),
    })
}

/// A lookup's answer, encoded when the response is written.
pub(super) struct Found {
    answer: Answer,
    name: String,
    /// Served while the snapshot marking is on.
    snapshot: bool,
}

impl IntoResponse for Found {
    fn into_response(self) -> Response {
        let Found {
            answer,
            name,
            snapshot,
        } = self;
        // Until the registry answers, everything cached came from the snapshot: stale,
        // whatever its recorded age says.
        let source = match (answer.source, snapshot) {
            (Source::Fresh, true) => Source::Stale,
            (source, _) => source,
        };
        Json(LookupBody {
            name: &name,
            services: answer.services(),
            provenance: Provenance {
                source: source.as_str(),
                age_ms: answer.age.map(|a| a.as_millis() as u64),
                suspect_nodes: answer.suspect_nodes(),
                decision: answer.decision,
                policy: PolicyRef::of(&answer.policy),
                snapshot,
            },
        })
        .into_response()
    }
}

fn lookup_error(e: LookupError) -> ApiError {
    let policy = e.policy().clone();
    let details = |source: &str| {
        serde_json::json!({
            "source": source,
            "policy": { "generation": policy.generation, "digest": policy.digest },
        })
    };
    match &e {
        LookupError::NotFound { provenance, .. } => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
                .with_details(details(provenance.as_str()))
        }
        // The registry did not answer within its timeout, or this lookup's wait ran out
        // before it did: a gateway timeout, as for the registry endpoints.
        LookupError::Unavailable {
            cause: Some(ErrorKind::Timeout),
            ..
        } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "registry_timeout",
            e.to_string(),
        )
        .with_details(details("none")),
        // The registry refused or is unreachable, the policy rejected, or a limit (retry
        // interval, budget) held the refresh back.
        LookupError::Unavailable { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
        .with_details(details("none")),
    }
}

#[derive(Serialize)]
pub(super) struct ServiceList {
    services: Vec<String>,
    /// `registry` when the registry answered, `cache` when it did not and the names come from
    /// the cache.
    source: &'static str,
}

/// `GET /v1/services`: the registry's names, or the cache's when the registry cannot answer.
pub(super) async fn list(State(state): State<AppState>) -> Json<ServiceList> {
    match state.registry.list_services().await {
        Ok(services) => Json(ServiceList {
            services,
            source: "registry",
        }),
        Err(e) => {
            tracing::debug!("listing from the cache: {e}");
            let names: BTreeSet<String> = state
                .cache
                .export()
                .entries
                .into_iter()
                .map(|e| e.service)
                .collect();
            Json(ServiceList {
                services: names.into_iter().collect(),
                source: "cache",
            })
        }
    }
}

#[derive(Serialize)]
pub(super) struct Registrations {
    registrations: Vec<Service>,
    /// Those of `registrations` another host's lease holds now: not written back while it
    /// does.
    conflicts: Vec<ConflictBody>,
}

#[derive(Serialize)]
struct ConflictBody {
    service: String,
    node: String,
    owner_lease: i64,
    owner_lease_hex: String,
}

/// `GET /v1/registrations`.
pub(super) async fn registrations(State(state): State<AppState>) -> Json<Registrations> {
    let conflicts = state
        .registry
        .conflicts()
        .into_iter()
        .map(|c| ConflictBody {
            owner_lease_hex: registry::lease_hex(c.owner_lease),
            service: c.service,
            node: c.node_id,
            owner_lease: c.owner_lease,
        })
        .collect();
    Json(Registrations {
        registrations: state.registry.registrations(),
        conflicts,
    })
}

/// `POST /v1/registrations` options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterOptions {
    /// Take over nodes another host's lease holds (else 409).
    #[serde(default)]
    force: bool,
}

#[derive(Serialize)]
pub(super) struct Registered {
    registered: String,
    nodes: Vec<String>,
    /// Why the registration is not in the registry yet (it is kept, and written as soon as
    /// the registry answers); absent once written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pending: Option<String>,
}

/// `POST /v1/registrations[?force=true]` with a go-micro service of at least one node.
pub(super) async fn register(
    State(state): State<AppState>,
    options: Result<Query<RegisterOptions>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    let Query(options) = options?;
    let body = body?;
    // Service::decode is go-micro's tolerant reader (null maps, mixed-case keys); it refuses
    // what is not a JSON object with a name.
    let service = Service::decode(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_name("service name", &service.name)?;
    if service.nodes.is_empty() {
        return Err(ApiError::bad_request(
            "a registration needs at least one node",
        ));
    }
    check_nodes(&service.nodes)?;
    let takeover = if options.force {
        Takeover::Force
    } else {
        Takeover::Refuse
    };
    let (status, pending) = match state.registry.register_with(&service, takeover).await? {
        registry::Registered::Now => (StatusCode::CREATED, None),
        registry::Registered::Later(e) => (StatusCode::ACCEPTED, Some(e.to_string())),
    };
    Ok((
        status,
        Json(Registered {
            registered: service.name.clone(),
            nodes: service.nodes.iter().map(|n| n.id.clone()).collect(),
            pending,
        }),
    ))
}

/// `DELETE /v1/registrations/{service}/{node}`.
pub(super) async fn deregister(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path((service, node)) = path?;
    check_name("service name", &service)?;
    check_name("node id", &node)?;
    let owned = state
        .registry
        .registrations()
        .iter()
        .any(|s| s.name == service && s.nodes.iter().any(|n| n.id == node));
    if !owned {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{service}/{node} is not registered by this host"),
        ));
    }
    state.deregister(&service, &node).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::decision::Settings;

    fn unavailable(cause: Option<ErrorKind>) -> LookupError {
        let second = Duration::from_secs(1);
        LookupError::Unavailable {
            service: "svc".into(),
            reason: "test".into(),
            cause,
            policy: Arc::new(PolicyInfo {
                generation: 1,
                digest: "0".repeat(64),
                source: "test".into(),
                loaded_at: SystemTime::now(),
                settings: Settings {
                    ttl: second,
                    min_retry_interval: second,
                    max_wait: second,
                    negative_ttl: second,
                    registry_budget_per_second: 1,
                    eviction_window: second,
                    max_suspect_hold: second,
                    eviction_batch: second,
                },
            }),
        }
    }

    #[test]
    fn a_registry_timeout_is_a_gateway_timeout() {
        let status = |cause| lookup_error(unavailable(cause)).status;
        assert_eq!(
            status(Some(ErrorKind::Timeout)),
            StatusCode::GATEWAY_TIMEOUT
        );
        for cause in [
            None,
            Some(ErrorKind::Unavailable),
            Some(ErrorKind::Unauthenticated),
        ] {
            assert_eq!(status(cause), StatusCode::SERVICE_UNAVAILABLE, "{cause:?}");
        }
    }
}
