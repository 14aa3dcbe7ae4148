//! The gRPC services: `zone.v1.KV` and `zone.v1.Cluster` for clients,
//! `zone.v1.Peer` for the other servers.
//!
//! Handlers validate every request before it reaches Raft (bad input gets
//! INVALID_ARGUMENT naming the field, and changes nothing), send writes to
//! the leader (forwarding over the peer port when this server follows), and
//! make reads linearizable with a ReadIndex barrier unless the caller asked
//! for a serializable one. Errors map to gRPC codes in one place,
//! [`ApiError`]'s `From` impl.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use raft::eraftpb::{ConfChangeType, ConfChangeV2};
use raft::StateRole;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use zone_proto::v1::{
    cluster_server::Cluster, command, command_result, compare, kv_server::Kv, manage_request,
    manage_response, peer_server::Peer, request_op, AddServerRequest, CommandResult, Compare,
    DeleteRequest, DeleteResponse, Event, ForwardRequest, GetRequest, GetResponse, ManageRequest,
    ManageResponse, Member, MembersRequest, MembersResponse, NodeStatusRequest, NodeStatusResponse,
    Progress, PutRequest, PutResponse, RaftAck, RaftBatch, RangeRequest, RangeResponse,
    RemoveServerRequest, RemovedAck, RemovedNotice, RequestOp, RequestSnapshotRequest,
    RequestSnapshotResponse, ResetServerRequest, ResetServerResponse, ResponseHeader, Role,
    ServerStatus, SetMaintenanceRequest, SetMaintenanceResponse, SnapshotAck, SnapshotChunk,
    StatusRequest, StatusResponse, TransferLeaderRequest, TransferLeaderResponse, TxnRequest,
    TxnResponse, WatchRequest, WatchResponse,
};

use crate::config::{check_host_port, Config};
use crate::kv;
use crate::node::{Applied, LocalStatus, NodeError, NodeHandle, RETRY_PAUSE};
use crate::storage::StorageFailure;
use crate::transport::{self, GrpcTransport};

/// Metadata key set on errors that guarantee the write was not applied, so
/// a forwarding server may retry it.
const NOT_APPLIED: &str = "zone-not-applied";

/// Every way a request can fail, each with its gRPC code chosen on purpose.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or over a limit; nothing changed.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// No leader, or the leader changed: the write was not applied; retry.
    #[error("{0}")]
    NotApplied(String),
    /// The outcome of a write is unknown (a forwarding hop failed).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Compacted(String),
    /// The zone's state forbids it (maintenance, last voter).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// An error from the server the request was forwarded to, passed on.
    #[error("{}", .0.message())]
    Remote(Status),
    #[error("storage failure")]
    Storage(#[from] StorageFailure),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match &e {
            ApiError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            ApiError::NotApplied(m) => {
                let mut s = Status::unavailable(m.clone());
                s.metadata_mut()
                    .insert(NOT_APPLIED, "1".parse().expect("ascii"));
                s
            }
            ApiError::Unavailable(m) => Status::unavailable(m.clone()),
            ApiError::Timeout(m) => Status::deadline_exceeded(m.clone()),
            ApiError::Compacted(m) => Status::out_of_range(m.clone()),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            ApiError::NotFound(m) => Status::not_found(m.clone()),
            ApiError::AlreadyExists(m) => Status::already_exists(m.clone()),
            ApiError::Remote(status) => status.clone(),
            ApiError::Storage(inner) => {
                tracing::error!(error = %crate::logging::chain(inner), "storage failure serving a request");
                Status::internal(format!("storage failure: {}", crate::logging::chain(inner)))
            }
        }
    }
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Request validation against the configured limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_key: usize,
    pub max_value: usize,
    pub max_txn_ops: usize,
}

impl Limits {
    /// Checks the field `at` + `name` (joined only for an error: this is on
    /// every request's path).
    fn key(&self, at: &str, name: &str, key: &[u8]) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(bad(format!("{at}{name}"), "must not be empty"));
        }
        if key.len() > self.max_key {
            return Err(bad(
                format!("{at}{name}"),
                format!(
                    "{} bytes is over the limit of {} bytes",
                    key.len(),
                    self.max_key
                ),
            ));
        }
        Ok(())
    }

    fn prefix(&self, at: &str, prefix: &[u8]) -> Result<(), ApiError> {
        if prefix.len() > self.max_key {
            return Err(bad(
                format!("{at}prefix"),
                format!(
                    "{} bytes is over the key limit of {} bytes",
                    prefix.len(),
                    self.max_key
                ),
            ));
        }
        Ok(())
    }

    pub fn put(&self, at: &str, r: &PutRequest) -> Result<(), ApiError> {
        self.key(at, "key", &r.key)?;
        if r.value.len() > self.max_value {
            return Err(bad(
                format!("{at}value"),
                format!(
                    "{} bytes is over the limit of {} bytes",
                    r.value.len(),
                    self.max_value
                ),
            ));
        }
        Ok(())
    }

    pub fn delete(&self, at: &str, r: &DeleteRequest) -> Result<(), ApiError> {
        // Even with `prefix`, an empty key (everything) must be meant: it is
        // refused; delete by an explicit prefix instead.
        self.key(at, "key", &r.key)
    }

    pub fn get(&self, at: &str, r: &GetRequest) -> Result<(), ApiError> {
        self.key(at, "key", &r.key)
    }

    pub fn range(&self, at: &str, r: &RangeRequest) -> Result<(), ApiError> {
        self.prefix(at, &r.prefix)
    }

    fn compare(&self, at: &str, c: &Compare) -> Result<(), ApiError> {
        self.key(at, "key", &c.key)?;
        let target = compare::Target::try_from(c.target).map_err(|_| {
            bad(
                format!("{at}target"),
                format!("unknown target {}", c.target),
            )
        })?;
        match compare::Op::try_from(c.op) {
            Ok(compare::Op::Unspecified) | Err(_) => {
                return Err(bad(
                    format!("{at}op"),
                    "must be EQUAL, NOT_EQUAL, LESS or GREATER",
                ))
            }
            Ok(_) => {}
        }
        let value_matches = matches!(
            (target, &c.target_value),
            (compare::Target::Value, Some(compare::TargetValue::Value(_)))
                | (
                    compare::Target::ModRevision,
                    Some(compare::TargetValue::ModRevision(_))
                )
                | (
                    compare::Target::CreateRevision,
                    Some(compare::TargetValue::CreateRevision(_))
                )
                | (
                    compare::Target::Version,
                    Some(compare::TargetValue::Version(_))
                )
        );
        if target == compare::Target::Unspecified {
            return Err(bad(
                format!("{at}target"),
                "must be VALUE, MOD_REVISION, CREATE_REVISION or VERSION",
            ));
        }
        if !value_matches {
            let want = match target {
                compare::Target::Value => "value",
                compare::Target::ModRevision => "mod_revision",
                compare::Target::CreateRevision => "create_revision",
                _ => "version",
            };
            return Err(bad(
                format!("{at}{want}"),
                format!(
                    "target {} needs the field {want} set, and only it",
                    target.as_str_name()
                ),
            ));
        }
        Ok(())
    }

    fn op(&self, at: &str, op: &RequestOp) -> Result<(), ApiError> {
        match &op.request {
            Some(request_op::Request::Put(r)) => self.put(&format!("{at}put."), r),
            Some(request_op::Request::Delete(r)) => self.delete(&format!("{at}delete."), r),
            Some(request_op::Request::Get(r)) => self.get(&format!("{at}get."), r),
            Some(request_op::Request::Range(r)) => self.range(&format!("{at}range."), r),
            None => Err(bad(at.trim_end_matches('.'), "empty operation")),
        }
    }

    pub fn txn(&self, r: &TxnRequest) -> Result<(), ApiError> {
        let ops = r.success.len() + r.failure.len();
        if ops > self.max_txn_ops {
            return Err(bad(
                "success",
                format!(
                    "{ops} operations in both branches is over the limit of {}",
                    self.max_txn_ops
                ),
            ));
        }
        if r.compare.len() > self.max_txn_ops {
            return Err(bad(
                "compare",
                format!("over the limit of {}", self.max_txn_ops),
            ));
        }
        for (i, c) in r.compare.iter().enumerate() {
            self.compare(&format!("compare[{i}]."), c)?;
        }
        for (i, op) in r.success.iter().enumerate() {
            self.op(&format!("success[{i}]."), op)?;
        }
        for (i, op) in r.failure.iter().enumerate() {
            self.op(&format!("failure[{i}]."), op)?;
        }
        Ok(())
    }
}

/// Identity of this server as shown in status.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub name: String,
    pub client_endpoint: String,
    pub peer_endpoint: String,
}

/// What every service shares.
#[derive(Clone)]
pub struct Zone {
    host: Arc<crate::host::Host>,
    agents: Arc<crate::agent::AgentRegistry>,
    node: NodeHandle,
    transport: Arc<GrpcTransport>,
    config: Arc<Config>,
    limits: Limits,
    info: ServerInfo,
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone").field("id", &self.node.id()).finish()
    }
}

impl Zone {
    pub fn new(
        node: NodeHandle,
        transport: Arc<GrpcTransport>,
        config: Arc<Config>,
        agents: Arc<crate::agent::AgentRegistry>,
    ) -> Zone {
        let advertise = |addr: std::net::SocketAddr| {
            if addr.ip().is_unspecified() {
                // Listening everywhere: advertise the host from the peer
                // address the zone knows us by.
                let host = config
                    .peer_address(config.node.id)
                    .and_then(|p| p.rsplit_once(':').map(|(h, _)| h.to_owned()))
                    .unwrap_or_else(|| "127.0.0.1".into());
                format!("{host}:{}", addr.port())
            } else {
                addr.to_string()
            }
        };
        let info = ServerInfo {
            name: config.node.name.clone(),
            client_endpoint: advertise(config.node.client_listen),
            peer_endpoint: config
                .peer_address(config.node.id)
                .map(str::to_owned)
                .unwrap_or_else(|| advertise(config.node.peer_listen)),
        };
        Zone {
            host: Arc::default(),
            agents,
            limits: Limits {
                max_key: config.limits.max_key_bytes,
                max_value: config.limits.max_value_bytes,
                max_txn_ops: config.limits.max_txn_ops,
            },
            node,
            transport,
            config,
            info,
        }
    }

    /// How long a request may wait for the zone: the configured timeout,
    /// or less when the client's own deadline (`grpc-timeout`) is nearer,
    /// so that the client hears why rather than a bare cancellation.
    pub(crate) fn budget<T>(&self, req: &Request<T>) -> Duration {
        let configured = self.config.request_timeout();
        match req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
        {
            Some(client) => configured.min(client.mul_f64(0.9)),
            None => configured,
        }
    }

    /// This server's id and name.
    pub(crate) fn identity(&self) -> (u64, &str) {
        (self.node.id(), &self.info.name)
    }

    pub(crate) fn reader(&self) -> &kv::Reader {
        self.node.reader()
    }

    pub(crate) fn header(&self, revision: u64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            member_id: self.node.id(),
            raft_term: self.node.view().term,
        })
    }

    /// Runs a write on the leader, wherever it is, until `deadline`.
    /// Retries only what is known not to have been applied.
    pub(crate) async fn write(
        &self,
        op: command::Op,
        budget: Duration,
    ) -> Result<CommandResult, ApiError> {
        let r = self.write_any(op, budget).await?;
        if let Some(command_result::Result::FailedPrecondition(m)) = &r.result {
            return Err(ApiError::FailedPrecondition(m.clone()));
        }
        Ok(r)
    }

    /// Refuses a write early while the zone is disabled. Only the leader
    /// asks its own state (a follower's may lag behind a `zone enable`); the
    /// state machine refuses the write anyway when it is applied.
    pub(crate) fn check_enabled(&self) -> Result<(), ApiError> {
        if self.node.view().role == StateRole::Leader && self.node.reader().disabled() {
            return Err(ApiError::FailedPrecondition(kv::DISABLED_MESSAGE.into()));
        }
        Ok(())
    }

    async fn write_any(
        &self,
        op: command::Op,
        budget: Duration,
    ) -> Result<CommandResult, ApiError> {
        let deadline = Instant::now() + budget;
        loop {
            let view = self.node.view();
            // Each branch returns, or falls through when the write was not
            // applied and may be retried.
            if view.leader_id == self.node.id() && view.role == StateRole::Leader {
                match tokio::time::timeout_at(deadline.into(), self.node.propose(op.clone())).await {
                    Ok(Ok(r)) => return Ok(r),
                                        Ok(Err(
                        NodeError::NotLeader { .. }
                        | NodeError::NoLeader
                        | NodeError::Dropped
                        | NodeError::ConfBusy,
                    )) => {}
                    Ok(Err(NodeError::LeadershipChanged)) => {
                        return Err(ApiError::Unavailable(
                            "leadership changed while the write was in flight; it may or may not have been applied".into(),
                        ))
                    }
                    Ok(Err(NodeError::Stopped)) => {
                        return Err(ApiError::Unavailable("server is shutting down".into()))
                    }
                    Ok(Err(NodeError::Rejected(m))) => return Err(ApiError::FailedPrecondition(m)),
                    Err(_) => return Err(write_timeout(budget)),
                }
            } else if view.leader_id != 0 {
                // Boxed: this rare path's future is large (write_any's was
                // 2400 bytes with it inline, 552 boxed), and every write's
                // future is moved a few times before it is pinned.
                match Box::pin(self.forward(view.leader_id, op.clone(), deadline)).await {
                    Ok(r) => return Ok(r),
                    Err(status) if status.metadata().get(NOT_APPLIED).is_some() => {}
                    Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                        return Err(write_timeout(budget))
                    }
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                        ) =>
                    {
                        return Err(ApiError::Unavailable(format!(
                            "forwarding to leader {}: {}; the write may or may not have been applied",
                            view.leader_id,
                            status.message()
                        )))
                    }
                    // The leader's own answer (bad input, say): pass it on.
                    Err(status) => return Err(ApiError::Remote(status)),
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ApiError::NotApplied(format!(
                    "no leader could take the write within {} ms; it was not applied",
                    budget.as_millis()
                )));
            }
            // Wait for a new leader, but not forever on a stale view.
            let _ = tokio::time::timeout(RETRY_PAUSE * 4, self.node.view_changed()).await;
        }
    }

    async fn forward(
        &self,
        leader: u64,
        op: command::Op,
        deadline: Instant,
    ) -> Result<CommandResult, Status> {
        let Some(mut client) = self.transport.client(leader) else {
            return Err(Status::unavailable(format!(
                "no address known for leader {leader}"
            )));
        };
        let mut req = Request::new(ForwardRequest {
            command: Some(zone_proto::v1::Command {
                id: 0,
                op: Some(op),
            }),
        });
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        client.forward(req).await.map(Response::into_inner)
    }

    /// Waits until this server has applied everything committed before now.
    pub(crate) async fn linearize(&self, budget: Duration) -> Result<(), ApiError> {
        let deadline = Instant::now() + budget;
        loop {
            match tokio::time::timeout_at(deadline.into(), self.node.read_barrier()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(NodeError::Stopped)) => {
                    return Err(ApiError::Unavailable("server is shutting down".into()))
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    return Err(ApiError::Timeout(format!(
                        "the zone did not confirm a linearizable read within {} ms; retry, or ask for a serializable read",
                        budget.as_millis()
                    )))
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ApiError::Unavailable(
                    "no leader to confirm a linearizable read".into(),
                ));
            }
            let _ = tokio::time::timeout(RETRY_PAUSE * 4, self.node.view_changed()).await;
        }
    }

    /// This server's own status line plus the leader's progress view.
    async fn node_status(&self) -> Result<NodeStatusResponse, ApiError> {
        let local = self
            .node
            .status()
            .await
            .map_err(|_| ApiError::Unavailable("server is shutting down".into()))?;
        Ok(NodeStatusResponse {
            server: Some(self.server_status(&local)),
            progress: local
                .progress
                .iter()
                .map(|p| Progress {
                    id: p.id,
                    match_index: p.matched,
                    last_contact_ms: p.last_contact_ms,
                    voter: p.voter,
                })
                .collect(),
        })
    }

    fn server_status(&self, s: &LocalStatus) -> ServerStatus {
        let role = if s.learner {
            Role::Learner
        } else {
            match s.role {
                StateRole::Leader => Role::Leader,
                StateRole::Follower => Role::Follower,
                StateRole::Candidate => Role::Candidate,
                StateRole::PreCandidate => Role::PreCandidate,
            }
        };
        ServerStatus {
            id: s.id,
            name: self.info.name.clone(),
            peer_endpoint: self.info.peer_endpoint.clone(),
            client_endpoint: self.info.client_endpoint.clone(),
            role: role as i32,
            term: s.term,
            last_index: s.last_index,
            commit: s.commit,
            applied: s.applied,
            vote: s.vote,
            match_index: 0,
            last_contact_ms: None,
            voter: s.voters.contains(&s.id),
            error: String::new(),
            leader_id: s.leader_id,
            revision: s.revision,
            snapshots_received: s.snapshots_received,
            host: Some(self.host.figures(&self.config.node.data_dir)),
        }
    }

    /// Asks every member for its own figures, concurrently, with a short
    /// deadline; a member that does not answer is listed as unreachable.
    async fn zone_status(&self) -> Result<StatusResponse, ApiError> {
        let local = self
            .node
            .status()
            .await
            .map_err(|_| ApiError::Unavailable("server is shutting down".into()))?;
        let members: BTreeSet<u64> = local
            .voters
            .iter()
            .chain(local.learners.iter())
            .copied()
            .collect();
        let mine = NodeStatusResponse {
            server: Some(self.server_status(&local)),
            progress: Vec::new(),
        };
        let calls = members.iter().map(|&id| {
            let me = self.node.id();
            let client = self.transport.client(id);
            let mine = mine.clone();
            async move {
                if id == me {
                    return (id, Ok(mine));
                }
                let Some(mut client) = client else {
                    return (id, Err("no address known".to_owned()));
                };
                let mut req = Request::new(NodeStatusRequest {});
                req.set_timeout(Duration::from_millis(1000));
                let r = client
                    .node_status(req)
                    .await
                    .map(Response::into_inner)
                    .map_err(|s| s.message().to_owned());
                (id, r)
            }
        });
        let answers = futures::future::join_all(calls).await;
        let leader_progress: Vec<Progress> = if local.role == StateRole::Leader {
            local
                .progress
                .iter()
                .map(|p| Progress {
                    id: p.id,
                    match_index: p.matched,
                    last_contact_ms: p.last_contact_ms,
                    voter: p.voter,
                })
                .collect()
        } else {
            answers
                .iter()
                .find(|(id, _)| *id == local.leader_id)
                .and_then(|(_, r)| r.as_ref().ok())
                .map(|r| r.progress.clone())
                .unwrap_or_default()
        };
        let servers = answers
            .into_iter()
            .map(|(id, r)| {
                let mut s = match r {
                    Ok(resp) => resp.server.unwrap_or_default(),
                    Err(reason) => ServerStatus {
                        id,
                        name: String::new(),
                        peer_endpoint: self.config.peer_address(id).unwrap_or_default().to_owned(),
                        role: Role::Unreachable as i32,
                        voter: local.voters.contains(&id),
                        error: reason,
                        ..ServerStatus::default()
                    },
                };
                if let Some(p) = leader_progress.iter().find(|p| p.id == id) {
                    s.match_index = p.match_index;
                    s.last_contact_ms = p.last_contact_ms;
                }
                s
            })
            .collect();
        Ok(StatusResponse {
            member_id: local.id,
            leader_id: local.leader_id,
            term: local.term,
            servers,
            disabled: self.node.reader().disabled(),
        })
    }
}

/// Management: membership changes, leadership, snapshots, maintenance.
impl Zone {
    /// Runs a management request at the leader, wherever it is, retrying
    /// what is known not to have been applied until `budget` runs out.
    async fn manage(
        &self,
        req: ManageRequest,
        budget: Duration,
    ) -> Result<ManageResponse, ApiError> {
        let deadline = Instant::now() + budget;
        let mut last = String::from("no leader could take the request");
        loop {
            let view = self.node.view();
            if view.leader_id == self.node.id() && view.role == StateRole::Leader {
                match self.manage_local(req.clone(), deadline).await {
                    Err(ApiError::NotApplied(why)) => last = why,
                    other => return other,
                }
            } else if view.leader_id != 0 {
                if let Some(mut client) = self.transport.client(view.leader_id) {
                    let mut fwd = Request::new(req.clone());
                    fwd.set_timeout(deadline.saturating_duration_since(Instant::now()));
                    match client.manage(fwd).await {
                        Ok(r) => return Ok(r.into_inner()),
                        Err(status) if status.metadata().get(NOT_APPLIED).is_some() => {
                            last = status.message().to_owned()
                        }
                        Err(status) => return Err(ApiError::Remote(status)),
                    }
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ApiError::NotApplied(format!(
                    "{last} (after {} ms); nothing changed",
                    budget.as_millis()
                )));
            }
            let _ = tokio::time::timeout(RETRY_PAUSE * 4, self.node.view_changed()).await;
        }
    }

    /// A membership change, wherever the leader is; answers the members.
    async fn manage_members(
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
    async fn manage_local(
        &self,
        req: ManageRequest,
        deadline: Instant,
    ) -> Result<ManageResponse, ApiError> {
        use zone_proto::v1::{manage_request::Request as Q, manage_response::Response as A};
        let response = match req.request {
            Some(Q::AddServer(a)) => A::Members(self.add_server(a, deadline).await?),
            Some(Q::RemoveServer(r)) => A::Members(self.remove_server(r.id, deadline).await?),
            Some(Q::TransferLeader(t)) => {
                A::TransferLeader(self.transfer(t.target, deadline).await?)
            }
            None => return Err(bad("request", "empty management request")),
        };
        Ok(ManageResponse {
            response: Some(response),
        })
    }

    async fn local(&self) -> Result<LocalStatus, ApiError> {
        self.node
            .status()
            .await
            .map_err(|_| ApiError::Unavailable("server is shutting down".into()))
    }

    async fn members(&self) -> Result<MembersResponse, ApiError> {
        Ok(MembersResponse {
            members: self.local().await?.members,
        })
    }

    async fn conf_change(&self, cc: ConfChangeV2, deadline: Instant) -> Result<(), ApiError> {
        match tokio::time::timeout_at(deadline.into(), self.node.propose_conf_change(cc)).await {
            Ok(Ok(())) => Ok(()),
                        Ok(Err(
                NodeError::NotLeader { .. }
                | NodeError::NoLeader
                | NodeError::Dropped
                | NodeError::ConfBusy,
            )) => Err(ApiError::NotApplied(
                "not applied yet: leadership changed or another change is in progress".into(),
            )),
            Ok(Err(NodeError::Rejected(m))) => Err(ApiError::FailedPrecondition(m)),
            Ok(Err(e)) => Err(ApiError::Unavailable(e.to_string())),
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
            let target = self.transfer(0, deadline).await?;
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

    /// Hands leadership to `target` (0: the most caught-up voter) and waits
    /// until it leads.
    async fn transfer(
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
        let revoked = self
            .node
            .revoke_lease(true)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
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
                let _ = self.node.revoke_lease(false).await;
                return Err(match e {
                    NodeError::Rejected(m) => ApiError::FailedPrecondition(m),
                    NodeError::NotLeader { .. } | NodeError::NoLeader => {
                        ApiError::NotApplied("this server is no longer the leader".into())
                    }
                    e => ApiError::Unavailable(e.to_string()),
                });
            }
        };
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
                let _ = self.node.revoke_lease(false).await;
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
        match self.transfer(0, Instant::now() + budget).await {
            Ok(r) => tracing::info!(
                leader = r.leader_id,
                term = r.term,
                "leadership handed over before stopping"
            ),
            Err(e) => tracing::warn!(reason = %e, "could not hand leadership over before stopping"),
        }
    }

    async fn reset_server(&self, id: u64) -> Result<(), ApiError> {
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
            return self.node.request_snapshot().await.map_err(|e| match e {
                NodeError::Rejected(m) => ApiError::FailedPrecondition(m),
                e => ApiError::Unavailable(e.to_string()),
            });
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

    async fn set_maintenance(
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

fn write_timeout(budget: Duration) -> ApiError {
    ApiError::Timeout(format!(
        "the write was not confirmed within {} ms; it may or may not have been applied",
        budget.as_millis()
    ))
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn unwrap_result<T>(
    r: CommandResult,
    pick: impl FnOnce(command_result::Result) -> Option<T>,
) -> Result<T, Status> {
    r.result
        .and_then(pick)
        .ok_or_else(|| Status::internal("the applied command returned an unexpected result"))
}

/// `zone.v1.KV`.
#[derive(Debug, Clone)]
pub struct KvService(pub Zone);

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = req.into_inner();
        self.0.limits.put("", &req)?;
        self.0.check_enabled()?;
        let r = self.0.write(command::Op::Put(req), budget).await?;
        Ok(Response::new(unwrap_result(r, |r| match r {
            command_result::Result::Put(p) => Some(p),
            _ => None,
        })?))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = req.into_inner();
        self.0.limits.get("", &req)?;
        if !req.serializable {
            self.0.linearize(budget).await?;
        }
        let (kv, revision) = self.0.node.reader().get(&req).map_err(ApiError::from)?;
        Ok(Response::new(GetResponse {
            header: self.0.header(revision),
            kv,
        }))
    }

    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = req.into_inner();
        self.0.limits.range("", &req)?;
        if !req.serializable {
            self.0.linearize(budget).await?;
        }
        let (kvs, more, revision) = self.0.node.reader().range(&req).map_err(ApiError::from)?;
        Ok(Response::new(RangeResponse {
            header: self.0.header(revision),
            kvs,
            more,
        }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = req.into_inner();
        self.0.limits.delete("", &req)?;
        self.0.check_enabled()?;
        let r = self.0.write(command::Op::Delete(req), budget).await?;
        Ok(Response::new(unwrap_result(r, |r| match r {
            command_result::Result::Delete(d) => Some(d),
            _ => None,
        })?))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = req.into_inner();
        self.0.limits.txn(&req)?;
        self.0.check_enabled()?;
        let r = self.0.write(command::Op::Txn(req), budget).await?;
        Ok(Response::new(unwrap_result(r, |r| match r {
            command_result::Result::Txn(t) => Some(t),
            _ => None,
        })?))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = req.into_inner();
        self.0
            .limits
            .range(
                "",
                &RangeRequest {
                    prefix: req.prefix.clone(),
                    ..Default::default()
                },
            )
            .map_err(|_| {
                bad(
                    "prefix",
                    format!("over the key limit of {} bytes", self.0.limits.max_key),
                )
            })?;
        // Subscribe before reading the revision: nothing falls in between.
        let live = self.0.node.subscribe();
        let reader = self.0.node.reader().clone();
        let current = reader.revision().map_err(ApiError::from)?;
        let floor = reader.history_floor().map_err(ApiError::from)?;
        let start = if req.start_revision == 0 {
            current + 1
        } else {
            req.start_revision
        };
        if start < floor {
            return Err(ApiError::Compacted(format!(
                "start_revision {start} has been compacted; the oldest revision available is {floor}"
            ))
            .into());
        }
        let (tx, rx) = mpsc::channel(64);
        let zone = self.0.clone();
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(WatchResponse {
                    header: zone.header(current),
                    events: Vec::new(),
                }))
                .await;
            run_watch(zone, req, start, current, live, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn event_revision(e: &Event) -> u64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// Replays history from `next`, then follows live events; falls back to
/// history when it lags behind the live channel.
async fn run_watch(
    zone: Zone,
    req: WatchRequest,
    mut next: u64,
    mut replay_to: u64,
    mut live: broadcast::Receiver<Arc<Applied>>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let reader = zone.node.reader().clone();
    let shape = |mut e: Event| {
        if !req.prev_kv {
            e.prev_kv = None;
        }
        e
    };
    loop {
        if next <= replay_to {
            let floor = reader.history_floor().unwrap_or(u64::MAX);
            if next < floor {
                let msg = format!("the watcher fell behind to revision {next}, which has been compacted; the oldest revision available is {floor}");
                let _ = tx.send(Err(Status::out_of_range(msg))).await;
                return;
            }
            // Replay in slices so a long history is never held at once.
            while next <= replay_to {
                let to = replay_to.min(next + 999);
                let events = match reader.history(next, to, &req.prefix) {
                    Ok(ev) => ev,
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::from(e).into())).await;
                        return;
                    }
                };
                if !events.is_empty() {
                    let resp = WatchResponse {
                        header: zone.header(to),
                        events: events.into_iter().map(&shape).collect(),
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                next = to + 1;
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            got = live.recv() => match got {
                Ok(applied) => {
                    let batch = match &*applied {
                        Applied::Events(events) => events,
                        Applied::Snapshot(rev) if *rev >= next => {
                            let msg = format!(
                                "this server installed a snapshot at revision {rev}: changes from revision {next} are not available here; read the current state and watch from revision {}",
                                rev + 1
                            );
                            let _ = tx.send(Err(Status::out_of_range(msg))).await;
                            return;
                        }
                        Applied::Snapshot(_) => continue,
                    };
                    let Some(last) = batch.last().map(event_revision) else { continue };
                    let events: Vec<Event> = batch
                        .iter()
                        .filter(|e| event_revision(e) >= next)
                        .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.key.starts_with(&req.prefix)))
                        .cloned()
                        .map(&shape)
                        .collect();
                    next = next.max(last + 1);
                    if !events.is_empty() {
                        let resp = WatchResponse { header: zone.header(last), events };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    replay_to = match reader.revision() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                    };
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tx.send(Err(Status::unavailable("server is shutting down"))).await;
                    return;
                }
            }
        }
    }
}

/// `zone.v1.Cluster`.
#[derive(Debug, Clone)]
pub struct ClusterService(pub Zone);

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.0.zone_status().await?))
    }

    async fn members(
        &self,
        _req: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(self.0.members().await?))
    }

    async fn add_server(
        &self,
        req: Request<AddServerRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = manage_request::Request::AddServer(req.into_inner());
        self.0.manage_members(req, budget).await
    }

    async fn remove_server(
        &self,
        req: Request<RemoveServerRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = manage_request::Request::RemoveServer(req.into_inner());
        self.0.manage_members(req, budget).await
    }

    async fn reset_server(
        &self,
        req: Request<ResetServerRequest>,
    ) -> Result<Response<ResetServerResponse>, Status> {
        self.0.reset_server(req.into_inner().id).await?;
        Ok(Response::new(ResetServerResponse {}))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = ManageRequest {
            request: Some(manage_request::Request::TransferLeader(req.into_inner())),
        };
        match self.0.manage(req, budget).await?.response {
            Some(manage_response::Response::TransferLeader(t)) => Ok(Response::new(t)),
            _ => Err(Status::internal("unexpected management response")),
        }
    }

    async fn set_maintenance(
        &self,
        req: Request<SetMaintenanceRequest>,
    ) -> Result<Response<SetMaintenanceResponse>, Status> {
        let budget = self.0.budget(&req);
        Ok(Response::new(
            self.0
                .set_maintenance(req.into_inner().disabled, budget)
                .await?,
        ))
    }
}

/// `zone.v1.Peer`.
#[derive(Debug, Clone)]
pub struct PeerService(pub Zone);

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<RaftAck>, Status> {
        transport::receive_stream(&self.0.node, req.into_inner()).await
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        transport::receive_snapshot(&self.0.node, req.into_inner()).await
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let budget = self.0.budget(&req);
        let op = req
            .into_inner()
            .command
            .and_then(|c| c.op)
            .ok_or_else(|| Status::invalid_argument("command: empty"))?;
        // Validate again: the limits are this server's to enforce too.
        match &op {
            command::Op::Put(r) => self.0.limits.put("", r)?,
            command::Op::Delete(r) => self.0.limits.delete("", r)?,
            command::Op::Txn(r) => self.0.limits.txn(r)?,
            command::Op::SetMaintenance(_) => {}
        }
        if self.0.node.view().role != StateRole::Leader {
            return Err(ApiError::NotApplied("this server is no longer the leader".into()).into());
        }
        match tokio::time::timeout(budget, self.0.node.propose(op)).await {
            Ok(Ok(r)) => Ok(Response::new(r)),
            Ok(Err(NodeError::NotLeader { .. } | NodeError::NoLeader | NodeError::Dropped)) => {
                Err(ApiError::NotApplied("this server is no longer the leader".into()).into())
            }
            Ok(Err(e)) => Err(ApiError::Unavailable(e.to_string()).into()),
            Err(_) => Err(write_timeout(budget).into()),
        }
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
        let v = self.0.node.view();
        if v.role != StateRole::Leader {
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
        self.0.node.request_snapshot().await.map_err(|e| match e {
            NodeError::Rejected(m) => ApiError::FailedPrecondition(m),
            e => ApiError::Unavailable(e.to_string()),
        })?;
        Ok(Response::new(RequestSnapshotResponse {}))
    }

    async fn removed(&self, req: Request<RemovedNotice>) -> Result<Response<RemovedAck>, Status> {
        let n = req.into_inner();
        tracing::warn!(
            leader = n.leader_id,
            index = n.index,
            "the leader says this server was removed from the zone"
        );
        self.0.node.removed_notice(n.index, n.leader_id);
        Ok(Response::new(RemovedAck {}))
    }
}
