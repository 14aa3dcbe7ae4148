//! The client-facing tonic services, thin: each handler takes its
//! budget from the request, calls the [`ServerContext`] and shapes the
//! answer.

use tonic::{Request, Response, Status};
use zone_proto::v1::{
    cluster_server::Cluster, command, command_result, kv_server::Kv, manage_request,
    manage_response, AddServerRequest, AlarmsRequest, AlarmsResponse, BackupRequest, CommandResult,
    CompactRequest, CompactResponse, DeleteRequest, DeleteResponse, DisarmAlarmRequest, GetRequest,
    GetResponse, ManageRequest, MembersRequest, MembersResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RemoveServerRequest, ResetServerRequest, ResetServerResponse,
    SetMaintenanceRequest, SetMaintenanceResponse, StatusRequest, StatusResponse,
    TransferLeaderRequest, TransferLeaderResponse, TxnRequest, TxnResponse, WatchRequest,
};

use super::watch::WatchStream;
use super::{ApiError, ServerContext};

/// The applied command's own result, or INTERNAL when it is of another kind.
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
pub struct KvService(pub ServerContext);

impl KvService {
    /// A client's write (put, delete, txn): run at the leader, answered
    /// with the part of the result `pick` takes.
    async fn write<T>(
        &self,
        op: command::Op,
        budget: std::time::Duration,
        pick: fn(command_result::Result) -> Option<T>,
    ) -> Result<Response<T>, Status> {
        let r = self.0.client_write(op, budget).await?;
        Ok(Response::new(unwrap_result(r, pick)?))
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let budget = self.0.budget(&req);
        let op = command::Op::Put(req.into_inner());
        self.write(op, budget, |r| match r {
            command_result::Result::Put(p) => Some(p),
            _ => None,
        })
        .await
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = req.into_inner();
        self.0.limits().get("", &req)?;
        if !req.serializable {
            self.0.linearize(budget).await?;
        }
        let (kv, revision) = self.0.reader().get(&req).map_err(ApiError::from)?;
        Ok(Response::new(GetResponse {
            header: self.0.header(revision),
            kv,
        }))
    }

    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let budget = self.0.budget(&req);
        let req = req.into_inner();
        self.0.limits().range("", &req)?;
        if !req.serializable {
            self.0.linearize(budget).await?;
        }
        let (kvs, more, revision) = self.0.reader().range(&req).map_err(ApiError::from)?;
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
        let op = command::Op::Delete(req.into_inner());
        self.write(op, budget, |r| match r {
            command_result::Result::Delete(d) => Some(d),
            _ => None,
        })
        .await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let budget = self.0.budget(&req);
        let op = command::Op::Txn(req.into_inner());
        self.write(op, budget, |r| match r {
            command_result::Result::Txn(t) => Some(t),
            _ => None,
        })
        .await
    }

    async fn compact(
        &self,
        req: Request<CompactRequest>,
    ) -> Result<Response<CompactResponse>, Status> {
        let budget = self.0.budget(&req);
        let wait = self
            .0
            .client_budget(&req, std::time::Duration::from_secs(3600));
        Ok(Response::new(
            self.0.compact(req.into_inner(), budget, wait).await?,
        ))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = req.extensions().get::<crate::tls::Caller>().cloned();
        let stream = self.0.watch(req.into_inner())?;
        Ok(Response::new(match caller {
            Some(crate::tls::Caller::User { name, serial, .. }) => {
                ends_when_revoked(self.0.clone(), name, serial, stream)
            }
            _ => stream,
        }))
    }
}

/// How often a watch checks that its caller's credential was not revoked.
const REVOCATION_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A user's watch, ended with PERMISSION_DENIED within
/// [`REVOCATION_CHECK`] of its credential's revocation as this server
/// applied it: the gate checks each call when it starts, and a watch lives
/// on.
fn ends_when_revoked(
    zone: ServerContext,
    name: String,
    serial: String,
    mut inner: WatchStream,
) -> WatchStream {
    use tokio_stream::StreamExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REVOCATION_CHECK);
        loop {
            tokio::select! {
                item = inner.next() => match item {
                    Some(item) => {
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    if super::users::is_revoked(&zone, &serial) {
                        let _ = tx
                            .send(Err(Status::permission_denied(format!(
                                "the credential of {name} (serial {serial}) was revoked; the watch ends"
                            ))))
                            .await;
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// `zone.v1.Cluster`.
#[derive(Debug, Clone)]
pub struct ClusterService(pub ServerContext);

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

    async fn alarms(
        &self,
        req: Request<AlarmsRequest>,
    ) -> Result<Response<AlarmsResponse>, Status> {
        let budget = self.0.budget(&req);
        Ok(Response::new(self.0.alarms(budget / 2).await))
    }

    async fn disarm_alarm(
        &self,
        req: Request<DisarmAlarmRequest>,
    ) -> Result<Response<AlarmsResponse>, Status> {
        let budget = self.0.budget(&req);
        Ok(Response::new(
            self.0.disarm_alarm(req.into_inner().server, budget).await?,
        ))
    }

    type BackupStream = super::backup::BackupStream;

    async fn backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let budget = self.0.budget(&req);
        Ok(Response::new(
            self.0.backup(req.into_inner().linearizable, budget).await?,
        ))
    }

    type LogsStream = super::logs::LogsStream;

    async fn logs(
        &self,
        req: Request<zone_proto::v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        Ok(Response::new(self.0.logs(req.into_inner()).await?))
    }
}
