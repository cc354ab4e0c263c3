//! etcd's KV service over the registry prefix. A range of one service (or one node) is a cache
//! lookup decided by the policy, stale answers included; a wider range within the prefix lists
//! what the host knows (the registry's watched copy, with the cache's view of the services it
//! holds over it). Puts are registrations through the registry, kept across etcd faults like the
//! HTTP API's; deletes deregister nodes this host registered. Anything else is refused, naming
//! regcache and the prefix.

use std::collections::BTreeMap;

use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKeyValue,
    PbKvService, PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse,
    PbRangeStreamResponse, PbTxnRequest, PbTxnResponse,
};
use tonic::codegen::tokio_stream;
use tonic::{Request, Response, Status};

use super::{Endpoint, status};
use crate::cache::LookupError;
use crate::model::Service;
use crate::registry::ErrorKind;
use crate::registry::layout::{KeyPlace, Layout, prefix_end};

/// etcd's `RangeRequest.SortOrder.DESCEND`.
const DESCEND: i32 = 2;
/// etcd's `RangeRequest.SortTarget.VALUE`.
const SORT_BY_VALUE: i32 = 4;

/// The key clientv3's health check reads.
const HEALTH_KEY: &[u8] = b"health";

/// What a key range covers.
pub(super) enum Scope {
    /// One node's key.
    Node { service: String, node: String },
    /// Every node of one service.
    Service(String),
    /// Keys in `[start, end)` under the prefix (`end` empty: `start` alone).
    Keys { start: Vec<u8>, end: Vec<u8> },
}

impl Endpoint {
    /// What `[key, range_end)` covers, or why it is not served.
    pub(super) fn scope(&self, key: &[u8], range_end: &[u8]) -> Result<Scope, Status> {
        if key.is_empty() {
            return Err(status::key_not_provided());
        }
        let prefix = self.layout.prefix().as_bytes();
        let outside = || status::outside(self.layout.prefix(), key);
        if !key.starts_with(prefix) {
            return Err(outside());
        }
        let text = std::str::from_utf8(key).map_err(|_| outside())?;
        if range_end.is_empty() {
            return Ok(match self.layout.place(text) {
                KeyPlace::Node { service, node } => Scope::Node {
                    service: service.into(),
                    node: node.into(),
                },
                _ => Scope::Keys {
                    start: key.to_vec(),
                    end: Vec::new(),
                },
            });
        }
        if range_end == prefix_end(key) {
            let rest = &text[prefix.len()..];
            if let Some(service) = rest.strip_suffix('/')
                && !service.is_empty()
                && !service.contains('/')
            {
                return Ok(Scope::Service(service.into()));
            }
        }
        if range_end == [0] || range_end > prefix_end(prefix).as_slice() {
            return Err(outside());
        }
        Ok(Scope::Keys {
            start: key.to_vec(),
            end: range_end.to_vec(),
        })
    }

    /// The nodes in `scope` as (key, service of one node), sorted by key.
    async fn read(&self, scope: &Scope) -> Result<BTreeMap<String, Service>, Status> {
        let services = match scope {
            Scope::Node { service, .. } | Scope::Service(service) => {
                match self.parts.cache.lookup(service).await {
                    Ok(answer) => answer.services().to_vec(),
                    Err(e @ LookupError::NotFound { .. }) => {
                        tracing::trace!("{e}");
                        Vec::new()
                    }
                    Err(e) => return Err(status::lookup(&e)),
                }
            }
            Scope::Keys { .. } => self.known_services().await,
        };
        let mut nodes = BTreeMap::new();
        for service in &services {
            for node in &service.nodes {
                let key = self.layout.node_key(&service.name, &node.id);
                if scope.covers(key.as_bytes(), &*self.layout) {
                    nodes.insert(key, service.with_single_node(node));
                }
            }
        }
        Ok(nodes)
    }

    /// Everything the host knows: the registry's listing (its watched copy while the watch is
    /// current), with the cache's view of the services it holds over it (suspects kept, as
    /// lookups see them); the cache's alone while the registry cannot answer.
    async fn known_services(&self) -> Vec<Service> {
        let cached = self.parts.cache.cached_services();
        let listed = match self.parts.registry.list_all().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::debug!(error = %e, "listing from the cache alone");
                Vec::new()
            }
        };
        let cached_names: std::collections::HashSet<&str> =
            cached.iter().map(|s| s.name.as_str()).collect();
        let mut all: Vec<Service> = listed
            .iter()
            .filter(|s| !cached_names.contains(s.name.as_str()))
            .cloned()
            .collect();
        all.extend(cached.iter().cloned());
        all
    }

    /// The key-value of `service` (one node) at `key`, as of `revision`: the feed's revision
    /// of its last change, or the current one where the host does not know it.
    pub(super) fn key_value_at(&self, key: String, service: &Service, revision: i64) -> PbKeyValue {
        PbKeyValue {
            lease: self.leases.lease_of(&key),
            value: self.layout.encode(service),
            key: key.into_bytes(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        }
    }

    /// Checks a Range's revision: only the current one is served.
    fn check_revision(&self, revision: i64) -> Result<(), Status> {
        let current = self.revision();
        match revision {
            r if r <= 0 || r == current => Ok(()),
            r if r < current => Err(status::compacted()),
            _ => Err(status::future_revision()),
        }
    }

    /// The registration `value` at `service`/`node`'s key, checked.
    fn registration(&self, service: &str, node: &str, value: &[u8]) -> Result<Service, Status> {
        let decoded = self.layout.decode(value).map_err(status::invalid_value)?;
        let [only] = decoded.nodes.as_slice() else {
            return Err(status::invalid_value(format!(
                "a key holds one node, the value has {}",
                decoded.nodes.len()
            )));
        };
        let key = self.layout.node_key(service, node);
        if self.layout.node_key(&decoded.name, &only.id) != key {
            return Err(status::invalid_value(format!(
                "the value is service {:?} node {:?}, whose key is not {key:?}",
                decoded.name, only.id
            )));
        }
        Ok(decoded)
    }
}

impl Scope {
    pub(super) fn covers(&self, key: &[u8], layout: &dyn Layout) -> bool {
        match self {
            Scope::Node { service, node } => key == layout.node_key(service, node).as_bytes(),
            Scope::Service(service) => key.starts_with(layout.service_prefix(service).as_bytes()),
            Scope::Keys { start, end } if end.is_empty() => key == start.as_slice(),
            Scope::Keys { start, end } => key >= start.as_slice() && key < end.as_slice(),
        }
    }
}

#[tonic::async_trait]
impl PbKvService for Endpoint {
    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let request = request.into_inner();
        self.check_revision(request.revision)?;
        // `etcdctl endpoint health` reads this key and takes anything but etcd's own errors
        // (or an answer) as unhealthy: it is answered, empty.
        if request.key == HEALTH_KEY && request.range_end.is_empty() {
            return Ok(Response::new(PbRangeResponse {
                header: self.header(),
                ..Default::default()
            }));
        }
        let scope = self.scope(&request.key, &request.range_end)?;
        let revision = self.revision();
        let nodes = self.read(&scope).await?;
        let count = nodes.len() as i64;
        let limit = usize::try_from(request.limit).unwrap_or(0);
        let more = limit > 0 && nodes.len() > limit;
        let kvs = if request.count_only {
            Vec::new()
        } else {
            let limit = if limit > 0 { limit } else { usize::MAX };
            // Every key has the same revisions and version here: only the key and the value
            // order them. Sorted by key already, so only a sort by value encodes what the
            // limit then drops.
            let mut kvs: Vec<PbKeyValue> = if request.sort_target == SORT_BY_VALUE {
                let mut kvs: Vec<PbKeyValue> = nodes
                    .into_iter()
                    .map(|(key, service)| self.key_value_at(key, &service, revision))
                    .collect();
                kvs.sort_by(|a, b| a.value.cmp(&b.value));
                if request.sort_order == DESCEND {
                    kvs.reverse();
                }
                kvs.truncate(limit);
                kvs
            } else {
                let mut nodes: Vec<(String, Service)> = nodes.into_iter().collect();
                if request.sort_order == DESCEND {
                    nodes.reverse();
                }
                nodes.truncate(limit);
                nodes
                    .into_iter()
                    .map(|(key, service)| self.key_value_at(key, &service, revision))
                    .collect()
            };
            if request.keys_only {
                kvs.iter_mut().for_each(|kv| kv.value.clear());
            }
            kvs
        };
        Ok(Response::new(PbRangeResponse {
            header: self.header(),
            kvs,
            more,
            count,
        }))
    }

    async fn put(&self, request: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        let request = request.into_inner();
        if request.ignore_value || request.ignore_lease {
            return Err(status::unserved(
                "puts with ignore_value or ignore_lease",
                self.layout.prefix(),
            ));
        }
        let Scope::Node { service, node } = self.scope(&request.key, &[])? else {
            return Err(status::invalid_value(format!(
                "registrations are put at {}<service>/<node id>",
                self.layout.prefix()
            )));
        };
        let registration = self.registration(&service, &node, &request.value)?;
        if request.lease != 0 && !self.leases.exists(request.lease) {
            return Err(status::lease_not_found());
        }
        // Kept and written later if etcd does not answer now, as the HTTP API's are.
        self.parts
            .registry
            .register(&registration)
            .await
            .map_err(|e| status::registry(&e))?;
        let key = self.layout.node_key(&service, &node);
        let previous = match self.leases.attach(&key, request.lease, registration) {
            Ok(previous) => previous,
            Err(lease_gone) => {
                // It expired while the registration was written: take it back, as its expiry
                // would have.
                let _ = self.parts.deregister(&service, &node).await;
                return Err(lease_gone);
            }
        };
        let prev_kv = if request.prev_kv {
            previous.map(|p| self.key_value_at(key, &p.service, self.revision()))
        } else {
            None
        };
        Ok(Response::new(PbPutResponse {
            header: self.header(),
            prev_kv,
        }))
    }

    async fn delete_range(
        &self,
        request: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let request = request.into_inner();
        let scope = self.scope(&request.key, &request.range_end)?;
        // Only this host's registrations: a host never deletes another's node.
        let mine: Vec<(String, Service)> = self
            .parts
            .registry
            .registrations()
            .into_iter()
            .filter_map(|s| {
                let node = s.nodes.first()?;
                let key = self.layout.node_key(&s.name, &node.id);
                scope
                    .covers(key.as_bytes(), &*self.layout)
                    .then_some((key, s))
            })
            .collect();
        let mut prev_kvs = Vec::new();
        let mut deleted = 0;
        for (key, service) in mine {
            let node = &service.nodes[0].id;
            match self.parts.deregister(&service.name, node).await {
                Ok(()) => {
                    deleted += 1;
                    self.leases.detach(&key);
                    if request.prev_kv {
                        prev_kvs.push(self.key_value_at(key, &service, self.revision()));
                    }
                }
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(status::registry(&e)),
            }
        }
        Ok(Response::new(PbDeleteResponse {
            header: self.header(),
            deleted,
            prev_kvs,
        }))
    }

    type RangeStreamStream = tokio_stream::Empty<Result<PbRangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(status::unserved(
            "streamed ranges (RangeStream)",
            self.layout.prefix(),
        ))
    }

    async fn txn(&self, _: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        Err(status::unserved("transactions (Txn)", self.layout.prefix()))
    }

    async fn compact(
        &self,
        _: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        Err(status::unserved("compaction", self.layout.prefix()))
    }
}
