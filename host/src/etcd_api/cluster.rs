//! etcd's Maintenance.Status and Cluster.MemberList, answered locally: the host presents itself
//! as a one-member cluster at its own endpoint, so that clients that sync their endpoints from
//! the member list (clientv3's auto-sync) keep talking to the host, not to etcd. The rest of
//! both services administers a real cluster and is refused, naming regcache.

use std::future::Future;
use std::pin::Pin;

use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbClusterService, PbDefragmentRequest, PbDefragmentResponse,
    PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest,
    PbHashResponse, PbMaintenanceService, PbMember, PbMemberAddRequest, PbMemberAddResponse,
    PbMemberListRequest, PbMemberListResponse, PbMemberPromoteRequest, PbMemberPromoteResponse,
    PbMemberRemoveRequest, PbMemberRemoveResponse, PbMemberUpdateRequest, PbMemberUpdateResponse,
    PbMoveLeaderRequest, PbMoveLeaderResponse, PbSnapshotRequest, PbSnapshotResponse,
    PbStatusRequest, PbStatusResponse,
};
use tonic::codegen::tokio_stream;
use tonic::{Request, Response, Status};

use super::{Endpoint, status};

/// The etcd API version the endpoint speaks (clients check the major version).
const API_VERSION: &str = "3.5.0";

/// The future an `async_trait` method returns.
type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send + 'a>>;

/// Methods refused as not served, in the shape `async_trait` gives the traits' methods.
macro_rules! unserved {
    ($($method:ident($request:ty) -> $response:ty: $what:literal;)*) => {
        $(
            fn $method<'life0, 'async_trait>(
                &'life0 self,
                _: Request<$request>,
            ) -> Answer<'async_trait, $response>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                let refusal = status::unserved($what, self.layout.prefix());
                Box::pin(async move { Err(refusal) })
            }
        )*
    };
}

impl Endpoint {
    fn member(&self) -> PbMember {
        PbMember {
            id: self.member_id,
            name: "regcache".into(),
            client_ur_ls: vec![self.client_url.clone()],
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl PbMaintenanceService for Endpoint {
    async fn status(
        &self,
        _: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        let revision = self.revision();
        Ok(Response::new(PbStatusResponse {
            header: self.header(),
            version: API_VERSION.into(),
            leader: self.member_id,
            raft_index: revision as u64,
            raft_term: 1,
            raft_applied_index: revision as u64,
            ..Default::default()
        }))
    }

    type SnapshotStream = tokio_stream::Empty<Result<PbSnapshotResponse, Status>>;

    unserved! {
        alarm(PbAlarmRequest) -> PbAlarmResponse: "alarms";
        defragment(PbDefragmentRequest) -> PbDefragmentResponse: "defragmentation";
        hash(PbHashRequest) -> PbHashResponse: "hashes of the store";
        hash_kv(PbHashKvRequest) -> PbHashKvResponse: "hashes of the store";
        snapshot(PbSnapshotRequest) -> Self::SnapshotStream: "snapshots of the store";
        move_leader(PbMoveLeaderRequest) -> PbMoveLeaderResponse: "leader moves";
        downgrade(PbDowngradeRequest) -> PbDowngradeResponse: "downgrades";
    }
}

#[tonic::async_trait]
impl PbClusterService for Endpoint {
    async fn member_list(
        &self,
        _: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        Ok(Response::new(PbMemberListResponse {
            header: self.header(),
            members: vec![self.member()],
        }))
    }

    unserved! {
        member_add(PbMemberAddRequest) -> PbMemberAddResponse: "membership changes";
        member_remove(PbMemberRemoveRequest) -> PbMemberRemoveResponse: "membership changes";
        member_update(PbMemberUpdateRequest) -> PbMemberUpdateResponse: "membership changes";
        member_promote(PbMemberPromoteRequest) -> PbMemberPromoteResponse: "membership changes";
    }
}
