//! `zone.v1.Peer`, the inbound side of the peer port (7401): Raft message
//! streams and snapshots (handed to [`crate::transport`]), and the requests
//! other servers forward here because they believe this server leads
//! (writes, management) or want its own figures (status). What a request
//! does is the [`ServerContext`]'s; this file only receives it.

use std::time::Instant;

use raft::StateRole;
use tonic::{Request, Response, Status, Streaming};
use zone_proto::v1::{
    peer_server::Peer, CommandResult, ForwardRequest, ManageRequest, ManageResponse,
    NodeStatusRequest, NodeStatusResponse, RaftAck, RaftBatch, RemovedAck, RemovedNotice,
    RequestSnapshotRequest, RequestSnapshotResponse, SnapshotAck, SnapshotChunk,
};

use crate::api::{ApiError, ServerContext};
use crate::transport;

/// `zone.v1.Peer`.
#[derive(Debug, Clone)]
pub struct PeerService(pub ServerContext);

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<RaftAck>, Status> {
        transport::receive_stream(self.0.node(), req.into_inner()).await
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        transport::receive_snapshot(self.0.node(), req.into_inner()).await
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let budget = self.0.budget(&req);
        let cmd = req
            .into_inner()
            .command
            .filter(|c| c.op.is_some())
            .ok_or_else(|| Status::invalid_argument("command: empty"))?;
        Ok(Response::new(self.0.propose_forwarded(cmd, budget).await?))
    }

    async fn node_status(
        &self,
        _req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        Ok(Response::new(self.0.node_status().await?))
    }

    async fn manage(
        &self,
        req: Request<ManageRequest>,
    ) -> Result<Response<ManageResponse>, Status> {
        let budget = self.0.budget(&req);
        if self.0.node().view().role != StateRole::Leader {
            return Err(ApiError::NotApplied("this server is no longer the leader".into()).into());
        }
        let r = self
            .0
            .manage_local(req.into_inner(), Instant::now() + budget)
            .await?;
        Ok(Response::new(r))
    }

    async fn request_snapshot(
        &self,
        _req: Request<RequestSnapshotRequest>,
    ) -> Result<Response<RequestSnapshotResponse>, Status> {
        self.0
            .node()
            .request_snapshot()
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(RequestSnapshotResponse {}))
    }

    async fn removed(&self, req: Request<RemovedNotice>) -> Result<Response<RemovedAck>, Status> {
        let n = req.into_inner();
        tracing::warn!(
            leader = n.leader_id,
            index = n.index,
            "the leader says this server was removed from the zone"
        );
        self.0.node().removed_notice(n.index, n.leader_id);
        Ok(Response::new(RemovedAck {}))
    }
}
