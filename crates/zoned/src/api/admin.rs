//! Management, always at the leader: servers added (as learners) and
//! removed, leadership handed over (the lease released first, so that two
//! servers' agents never overlap), a server's state reset by snapshot,
//! maintenance mode.

use std::time::{Duration, Instant};

use raft::eraftpb::{ConfChangeType, ConfChangeV2};
use raft::StateRole;
use tonic::{Request, Response, Status};
use zone_proto::v1::{
    command, command_result, manage_request, manage_response, AddServerRequest, ManageRequest,
    ManageResponse, Member, MembersResponse, RequestSnapshotRequest, SetMaintenanceRequest,
    SetMaintenanceResponse, TransferLeaderResponse,
};

use super::error::bad;
use super::{ApiError, ServerContext};
use crate::config::check_host_port;

impl ServerContext {
    /// Runs a management request at the leader, wherever it is, retrying
    /// what is known not to have been applied until `budget` runs out.
    pub(crate) async fn manage(
        &self,
        req: ManageRequest,
        budget: Duration,
    ) -> Result<ManageResponse, ApiError> {
        self.at_leader(
            budget,
            |deadline| self.manage_local(req.clone(), deadline),
            |leader, deadline| {
                let req = req.clone();
                async move {
                    let Some(mut client) = self.transport.client(leader) else {
                        return Err(ApiError::NotApplied(format!(
                            "no address known for leader {leader}"
                        )));
                    };
                    let mut fwd = Request::new(req);
                    fwd.set_timeout(deadline.saturating_duration_since(Instant::now()));
                    client
                        .manage(fwd)
                        .await
                        .map(Response::into_inner)
                        .map_err(ApiError::from_leader)
                }
            },
            |last| {
                ApiError::NotApplied(format!(
                    "{} (after {} ms); nothing changed",
                    last.as_deref()
                        .unwrap_or("no leader could take the request"),
                    budget.as_millis()
                ))
            },
        )
        .await
    }

    /// A membership change, wherever the leader is; answers the members.
    pub(crate) async fn manage_members(
        &self,
        request: manage_request::Request,
        budget: Duration,
    ) -> Result<Response<MembersResponse>, Status> {
        let req = ManageRequest {
            request: Some(request),
        };
        match self.manage(req, budget).await?.response {
            Some(manage_response::Response::Members(m)) => Ok(Response::new(m)),
            _ => Err(Status::internal("unexpected management response")),
        }
    }

    /// A management request on the leader.
    pub(crate) async fn manage_local(
        &self,
        req: ManageRequest,
        deadline: Instant,
    ) -> Result<ManageResponse, ApiError> {
        use zone_proto::v1::{manage_request::Request as Q, manage_response::Response as A};
        let response = match req.request {
            Some(Q::AddServer(a)) => A::Members(self.add_server(a, deadline).await?),
            Some(Q::RemoveServer(r)) => A::Members(self.remove_server(r.id, deadline).await?),
            Some(Q::TransferLeader(t)) => {
                A::TransferLeader(self.transfer(t.target, deadline, true).await?)
            }
            None => return Err(bad("request", "empty management request")),
        };
        Ok(ManageResponse {
            response: Some(response),
        })
    }

    pub(crate) async fn members(&self) -> Result<MembersResponse, ApiError> {
        Ok(MembersResponse {
            members: self.local().await?.members,
        })
    }

    async fn conf_change(&self, cc: ConfChangeV2, deadline: Instant) -> Result<(), ApiError> {
        match tokio::time::timeout_at(deadline.into(), self.node.propose_conf_change(cc)).await {
            Ok(r) => r.map_err(ApiError::from),
            Err(_) => Err(ApiError::Timeout(
                "the membership change was not confirmed in time; check `zonectl show` before retrying".into(),
            )),
        }
    }

    async fn add_server(
        &self,
        a: AddServerRequest,
        deadline: Instant,
    ) -> Result<MembersResponse, ApiError> {
        if a.id == 0 {
            return Err(bad("id", "must be at least 1"));
        }
        check_host_port(&a.peer).map_err(|r| bad("peer", r))?;
        let st = self.local().await?;
        if let Some(m) = st.members.iter().find(|m| m.id == a.id) {
            return Err(ApiError::AlreadyExists(format!(
                "server {} is already a member ({}, peer {})",
                a.id,
                if m.learner { "learner" } else { "voter" },
                m.peer_endpoint
            )));
        }
        if let Some(m) = st.members.iter().find(|m| m.peer_endpoint == a.peer) {
            return Err(ApiError::AlreadyExists(format!(
                "peer address {} is already used by server {}",
                a.peer, m.id
            )));
        }
        let member = Member {
            id: a.id,
            name: if a.name.is_empty() {
                format!("zone-{}", a.id)
            } else {
                a.name
            },
            peer_endpoint: a.peer,
            learner: true,
        };
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(raft_proto::new_conf_change_single(
            a.id,
            ConfChangeType::AddLearnerNode,
        ));
        cc.context = prost::Message::encode_to_vec(&member).into();
        self.conf_change(cc, deadline).await?;
        tracing::info!(id = member.id, name = %member.name, peer = %member.peer_endpoint, "server added as a learner");
        self.members().await
    }

    async fn remove_server(&self, id: u64, deadline: Instant) -> Result<MembersResponse, ApiError> {
        let st = self.local().await?;
        if !st.members.iter().any(|m| m.id == id) {
            return Err(ApiError::NotFound(format!(
                "server {id} is not a member of the zone (members: {})",
                id_list(st.members.iter().map(|m| m.id))
            )));
        }
        if st.voters == [id] {
            return Err(ApiError::FailedPrecondition(format!(
                "server {id} is the last voter; a zone cannot remove its last voter"
            )));
        }
        if id == self.node.id() {
            // The leader leaves last: hand leadership over, then the new
            // leader removes this server (the caller routes there).
            let target = self.transfer(0, deadline, false).await?;
            return Err(ApiError::NotApplied(format!(
                "leadership handed to server {}; the removal continues there",
                target.leader_id
            )));
        }
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(raft_proto::new_conf_change_single(
            id,
            ConfChangeType::RemoveNode,
        ));
        self.conf_change(cc, deadline).await?;
        tracing::info!(id, "server removed from the zone");
        self.members().await
    }

    /// Hands leadership to `target` and waits until it leads. Target 0:
    /// the most caught-up voter whose required datastores are healthy
    /// ([`ServerContext::storage_target`]; `strict`: refused when there is
    /// none). Runs as a task of its own: a caller that gives up (a
    /// cancelled RPC) must not cut it short between taking the lease away
    /// and giving it back.
    pub(crate) async fn transfer(
        &self,
        target: u64,
        deadline: Instant,
        strict: bool,
    ) -> Result<TransferLeaderResponse, ApiError> {
        let this = self.clone();
        tokio::spawn(async move {
            let target = match target {
                0 => this.storage_target(strict).await?,
                t => t,
            };
            this.transfer_to_end(target, deadline).await
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("the transfer failed: {e}")))?
    }

    async fn transfer_to_end(
        &self,
        target: u64,
        deadline: Instant,
    ) -> Result<TransferLeaderResponse, ApiError> {
        let st = self.local().await?;
        if target != 0 {
            match st.members.iter().find(|m| m.id == target) {
                None => {
                    return Err(ApiError::NotFound(format!(
                        "server {target} is not a member of the zone (members: {})",
                        id_list(st.members.iter().map(|m| m.id))
                    )))
                }
                Some(m) if m.learner => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "server {target} is a learner; only a voter can lead"
                    )))
                }
                Some(_) => {}
            }
        }
        // Let go of the lease first, and wait until the local agents have
        // released the VIP and leader-only services: the next leader's
        // agents must never overlap ours. After the remaining lease time
        // they would have let go anyway.
        let revoked = self.node.revoke_lease().await?;
        if !self
            .agents
            .wait_released(revoked.generation, self.config.lease())
            .await
        {
            tracing::warn!(
                "an agent did not confirm releasing the lease; the lease has expired meanwhile"
            );
        }
        let chosen = match self.node.transfer_leader(target).await {
            Ok(c) => c,
            Err(e) => {
                let _ = self.node.restore_lease().await;
                return Err(e.into());
            }
        };
        if chosen == self.node.id() {
            // Already the leader: nothing was handed over; the lease comes
            // back at once.
            let _ = self.node.restore_lease().await;
            return Ok(TransferLeaderResponse {
                leader_id: chosen,
                term: self.node.view().term,
            });
        }
        loop {
            let v = self.node.view();
            if v.leader_id == chosen {
                return Ok(TransferLeaderResponse {
                    leader_id: chosen,
                    term: v.term,
                });
            }
            if v.leader_id != 0 && v.leader_id != self.node.id() {
                return Err(ApiError::Unavailable(format!(
                    "leadership went to server {} instead of {chosen}",
                    v.leader_id
                )));
            }
            if Instant::now() >= deadline {
                let _ = self.node.restore_lease().await;
                return Err(ApiError::Unavailable(format!(
                    "server {chosen} did not take leadership in time; the zone keeps its leader"
                )));
            }
            let _ = tokio::time::timeout_at(deadline.into(), self.node.view_changed()).await;
        }
    }

    /// Before a planned stop: if this server leads, hand leadership to the
    /// most caught-up voter so clients see no election timeout. Best effort.
    pub async fn hand_over_leadership(&self) {
        let v = self.node.view();
        if v.role != StateRole::Leader {
            return;
        }
        let budget = self.config.tick() * (self.config.raft.election_ticks as u32 * 2)
            + Duration::from_secs(1);
        match self.transfer(0, Instant::now() + budget, false).await {
            Ok(r) => tracing::info!(
                leader = r.leader_id,
                term = r.term,
                "leadership handed over before stopping"
            ),
            Err(e) => tracing::warn!(reason = %e, "could not hand leadership over before stopping"),
        }
    }

    pub(crate) async fn reset_server(&self, id: u64) -> Result<(), ApiError> {
        let st = self.local().await?;
        if !st.members.iter().any(|m| m.id == id) {
            return Err(ApiError::NotFound(format!(
                "server {id} is not a member of the zone (members: {})",
                id_list(st.members.iter().map(|m| m.id))
            )));
        }
        if id == st.leader_id {
            return Err(ApiError::FailedPrecondition(format!(
                "server {id} is the leader; only a follower or learner can be reset"
            )));
        }
        if id == self.node.id() {
            return Ok(self.node.request_snapshot().await?);
        }
        let mut client = self
            .transport
            .client(id)
            .ok_or_else(|| ApiError::Unavailable(format!("no address known for server {id}")))?;
        let mut req = Request::new(RequestSnapshotRequest {});
        req.set_timeout(Duration::from_secs(5));
        client
            .request_snapshot(req)
            .await
            .map_err(ApiError::Remote)?;
        Ok(())
    }

    pub(crate) async fn set_maintenance(
        &self,
        disabled: bool,
        budget: Duration,
    ) -> Result<SetMaintenanceResponse, ApiError> {
        let r = self
            .write_any(
                command::Op::SetMaintenance(SetMaintenanceRequest { disabled }),
                budget,
            )
            .await?;
        match r.result {
            Some(command_result::Result::SetMaintenance(m)) => {
                tracing::info!(disabled = m.disabled, "maintenance mode set");
                Ok(m)
            }
            _ => Err(ApiError::Unavailable("unexpected result".into())),
        }
    }
}

fn id_list(ids: impl Iterator<Item = u64>) -> String {
    ids.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}
