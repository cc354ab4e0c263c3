//! etcd's Lease service, answered from the host's table of client leases ([`super::leases`]):
//! no client lease, grant or keep-alive reaches etcd.

use etcd_client::proto::{
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesRequest, PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseStatus, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::leases::Departed;
use super::{Endpoint, STREAM_QUEUE};
use crate::registry::ErrorKind;

impl Endpoint {
    /// Deregisters the nodes of ended client leases; what etcd cannot take now is retried on
    /// the next expiry tick.
    pub(super) async fn deregister_departed(&self, departed: Vec<Departed>) {
        for node in departed {
            match self.parts.deregister(&node.service, &node.node_id).await {
                Ok(()) => {}
                // Not this host's (any more): nothing of it is left to remove.
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(key = node.key, error = %e, "cannot deregister a client's key yet; retrying");
                    self.leases.retry_later(node);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl PbLeaseService for Endpoint {
    async fn lease_grant(
        &self,
        request: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let (id, ttl) = self.leases.grant(request.id, request.ttl, peer)?;
        Ok(Response::new(PbLeaseGrantResponse {
            header: self.header(),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        let departed = self.leases.revoke(request.into_inner().id)?;
        self.deregister_departed(departed).await;
        Ok(Response::new(PbLeaseRevokeResponse {
            header: self.header(),
        }))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<PbLeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let endpoint = self.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = requests.message() => next,
                    _ = stopping.wait_for(|stop| *stop) => return,
                };
                let id = match next {
                    Ok(Some(request)) => request.id,
                    // The client closed its side, or the connection went.
                    Ok(None) | Err(_) => return,
                };
                // etcd answers a lease it does not have with TTL 0, not an error.
                let ttl = endpoint.leases.keep_alive(id).unwrap_or(0);
                let response = PbLeaseKeepAliveResponse {
                    header: endpoint.header(),
                    id,
                    ttl,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        // etcd answers a lease it does not have with TTL -1, not an error.
        let (ttl, granted_ttl, keys) = match self.leases.time_to_live(request.id) {
            Some(lease) => (
                lease.remaining,
                lease.granted,
                if request.keys {
                    lease.keys.into_iter().map(String::into_bytes).collect()
                } else {
                    Vec::new()
                },
            ),
            None => (-1, 0, Vec::new()),
        };
        Ok(Response::new(PbLeaseTimeToLiveResponse {
            header: self.header(),
            id: request.id,
            ttl,
            granted_ttl,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        Ok(Response::new(PbLeaseLeasesResponse {
            header: self.header(),
            leases: self
                .leases
                .ids()
                .into_iter()
                .map(|id| PbLeaseStatus { id })
                .collect(),
        }))
    }
}
