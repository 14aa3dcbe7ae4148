//! `zone.v1.Peer`, the inbound side of the peer port (7401): Raft message
//! streams and snapshots (handed to [`crate::transport`]), and the requests
//! other servers forward here because they believe this server leads
//! (writes, management) or want its own figures (status). What a request
//! does is the [`ServerContext`]'s; this file only receives it.
//!
//! Every call here comes from a server of the zone, by its certificate
//! ([`crate::tls`]), and is heard only while that server is a member: a removed server, or a certificate of the zone for an id never
//! added, changes nothing here.

use std::time::Instant;

use raft::StateRole;
use tonic::{Request, Response, Status, Streaming};
use zone_proto::v1::{
    peer_server::Peer, CommandResult, ForwardRequest, ManageRequest, ManageResponse,
    NodeStatusRequest, NodeStatusResponse, RaftAck, RaftBatch, RemovedAck, RemovedNotice,
    RenewRequest, RenewResponse, RequestSnapshotRequest, RequestSnapshotResponse, SnapshotAck,
    SnapshotChunk,
};

use crate::api::{ApiError, ServerContext};
use crate::tls::{Caller, PeerCerts};
use crate::transport;

/// `zone.v1.Peer`.
#[derive(Debug, Clone)]
pub struct PeerService(pub ServerContext);

impl PeerService {
    /// The member that made `req`, by its certificate.
    fn member<T>(&self, req: &Request<T>) -> Result<u64, Status> {
        let sender = Caller::server_of(req)?;
        transport::check_member(self.0.transport(), sender)?;
        Ok(sender)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<RaftAck>, Status> {
        let sender = self.member(&req)?;
        transport::receive_stream(self.0.node(), self.0.transport(), sender, req.into_inner()).await
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        let sender = self.member(&req)?;
        let max = self.0.config().limits.max_snapshot_mb << 20;
        transport::receive_snapshot(self.0.node(), sender, max, req.into_inner()).await
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        self.member(&req)?;
        let budget = self.0.budget(&req);
        let cmd = req
            .into_inner()
            .command
            .filter(|c| c.op.is_some())
            .ok_or_else(|| Status::invalid_argument("command: empty"))?;
        Ok(Response::new(self.0.propose_forwarded(cmd, budget).await?))
    }

    /// Safety: the certificate is signed for the key the caller proved it
    /// holds at this call's handshake, and for the id its current
    /// certificate names, and only while it is a member: a removed server
    /// cannot keep its certificate alive.
    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let id = self.member(&req)?;
        let key = req
            .extensions()
            .get::<PeerCerts>()
            .and_then(|p| p.0.as_ref()?.first().cloned())
            .and_then(|der| zone_pki::facts(&der))
            .map(|f| f.public_key)
            .ok_or_else(|| Status::unauthenticated("no certificate was presented"))?;
        let cert = crate::renew::sign(&self.0, id, &key).await?;
        tracing::info!(id, "renewed a server's node certificate");
        Ok(Response::new(RenewResponse { cert_pem: cert }))
    }

    type FetchBundleStream = crate::api::upgrade::FetchStream;

    async fn fetch_bundle(
        &self,
        req: Request<zone_proto::v1::FetchBundleRequest>,
    ) -> Result<Response<Self::FetchBundleStream>, Status> {
        self.member(&req)?;
        Ok(Response::new(
            crate::api::upgrade::serve_fetch(&self.0, req.into_inner()).await?,
        ))
    }

    type FetchExtensionStream = crate::api::upgrade::FetchStream;

    async fn fetch_extension(
        &self,
        req: Request<zone_proto::v1::FetchExtensionRequest>,
    ) -> Result<Response<Self::FetchExtensionStream>, Status> {
        self.member(&req)?;
        Ok(Response::new(
            crate::api::extensions::serve_fetch(&self.0, req.into_inner()).await?,
        ))
    }

    async fn node_status(
        &self,
        req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        self.member(&req)?;
        Ok(Response::new(self.0.node_status().await?))
    }

    async fn manage(
        &self,
        req: Request<ManageRequest>,
    ) -> Result<Response<ManageResponse>, Status> {
        self.member(&req)?;
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
        req: Request<RequestSnapshotRequest>,
    ) -> Result<Response<RequestSnapshotResponse>, Status> {
        self.member(&req)?;
        self.0
            .node()
            .request_snapshot()
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(RequestSnapshotResponse {}))
    }

    async fn removed(&self, req: Request<RemovedNotice>) -> Result<Response<RemovedAck>, Status> {
        let sender = self.member(&req)?;
        let n = req.into_inner();
        // Only the leader that removed this server says so, for itself.
        if sender != n.leader_id {
            return Err(Status::permission_denied(format!(
                "server {sender} cannot give notice of a removal on behalf of server {}",
                n.leader_id
            )));
        }
        tracing::warn!(
            leader = n.leader_id,
            index = n.index,
            "the leader says this server was removed from the zone"
        );
        self.0.node().removed_notice(n.index, n.leader_id);
        Ok(Response::new(RemovedAck {}))
    }
}
