//! The gRPC services: `zone.v1.KV` and `zone.v1.Cluster` for clients (the
//! `zone.v1.Peer` service, for the other servers, is [`crate::peer`]).
//!
//! Handlers validate every request before it reaches Raft (bad input gets
//! INVALID_ARGUMENT naming the field, and changes nothing: [`validate`]),
//! run writes and management requests at the leader (forwarding over the
//! peer port when this server follows, and retrying only what is known not
//! to have been applied: [`leader`]), and make reads linearizable with a
//! ReadIndex barrier unless the caller asked for a serializable one. Errors
//! get their gRPC codes in one place, [`error`].
//!
//! - [`error`]: [`ApiError`], its gRPC codes, what each driver error means;
//! - [`validate`]: the request checks ([`Limits`]);
//! - [`leader`]: writes and management at the leader, linearizable reads;
//! - [`admin`]: membership, leadership transfer, reset, maintenance;
//! - [`handover`]: storage-aware leadership;
//! - [`join`]: join tokens, and a new server's certificate for one;
//! - [`users`]: client credentials issued and revoked;
//! - [`logs`]: this server's journal, streamed;
//! - [`status`]: this server's status and the zone's;
//! - [`storage`]: the shared datastores' declarations;
//! - [`watch`]: history replay and live events;
//! - [`upgrade`]: update bundles received, fetched, installed; boot entries;
//! - [`extensions`]: system extension images the zone wants on every server;
//! - [`services`]: the zone's leader-only and everywhere units;
//! - [`transfer`]: large files received and served in chunks;
//! - [`service`]: the tonic service impls, thin.

mod admin;
mod backup;
mod config;
mod error;
pub mod extensions;
pub mod handover;
pub mod join;
mod leader;
mod logs;
mod requests;
mod service;
pub mod services;
mod space;
mod status;
mod storage;
mod transfer;
pub mod upgrade;
pub mod users;
mod validate;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use raft::StateRole;
use tonic::Request;
use zone_proto::v1::{command, command_result, CommandResult, ResponseHeader};

use crate::config::Config;
use crate::kv;
use crate::node::{LocalStatus, NodeHandle};
use crate::transport::GrpcTransport;

pub use config::ConfigService;
pub use error::ApiError;
pub use extensions::ExtensionsService;
pub use join::JoinService;
pub use service::{ClusterService, KvService};
pub use services::ServicesService;
pub use storage::StorageService;
pub use upgrade::UpgradeService;
pub use users::UsersService;
pub use validate::Limits;

/// Identity of this server as shown in status.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub name: String,
    pub client_endpoint: String,
    pub peer_endpoint: String,
}

/// What every service of this server shares: its Raft node, its peers,
/// its configuration and identity. One per server (not the zone: the zone is
/// what the servers make together).
#[derive(Clone)]
pub struct ServerContext {
    host: Arc<crate::host::Host>,
    agents: Arc<crate::agent::AgentRegistry>,
    node: NodeHandle,
    transport: Arc<GrpcTransport>,
    config: Arc<Config>,
    limits: Limits,
    info: ServerInfo,
    /// This server's client writes, numbered.
    requests: Arc<requests::Requests>,
}

impl std::fmt::Debug for ServerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerContext")
            .field("id", &self.node.id())
            .finish()
    }
}

impl ServerContext {
    /// `incarnation` counts this server's starts
    /// ([`crate::storage::Engine::next_incarnation`]).
    pub fn new(
        node: NodeHandle,
        transport: Arc<GrpcTransport>,
        config: Arc<Config>,
        agents: Arc<crate::agent::AgentRegistry>,
        incarnation: u64,
    ) -> ServerContext {
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
        ServerContext {
            host: Arc::default(),
            agents,
            limits: Limits {
                max_key: config.limits.max_key_bytes,
                max_value: config.limits.max_value_bytes,
                max_txn_ops: config.limits.max_txn_ops,
            },
            requests: Arc::new(requests::Requests::new(node.id(), incarnation)),
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

    /// How long a long-running part of a request (a physical compaction)
    /// may take: the client's own deadline, at most `max`; the configured
    /// request timeout when the client gave none.
    pub(crate) fn client_budget<T>(&self, req: &Request<T>, max: Duration) -> Duration {
        req.metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.config.request_timeout(), |client| {
                client.mul_f64(0.9).min(max)
            })
    }

    /// The appliance image this server booted (`IMAGE_ID IMAGE_VERSION`);
    /// empty off the appliance.
    pub(crate) fn host_image(&self) -> String {
        self.host.image_version().to_owned()
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

    /// The driver's own status of this server.
    pub(crate) async fn local(&self) -> Result<LocalStatus, ApiError> {
        self.node
            .status()
            .await
            .map_err(|_| ApiError::Unavailable("server is shutting down".into()))
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn transport(&self) -> &GrpcTransport {
        &self.transport
    }

    pub(crate) fn node(&self) -> &NodeHandle {
        &self.node
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A client's write: checked against the limits, refused early while
    /// the zone is disabled, then run at the leader.
    pub(crate) async fn client_write(
        &self,
        op: command::Op,
        budget: Duration,
    ) -> Result<CommandResult, ApiError> {
        self.limits.command(&op)?;
        validate::writable(&op)?;
        self.check_enabled()?;
        self.check_space(&op)?;
        self.write(op, budget).await
    }

    /// Runs a write on the leader, wherever it is, within `budget`.
    /// Retries only what is known not to have been applied.
    pub(crate) async fn write(
        &self,
        op: command::Op,
        budget: Duration,
    ) -> Result<CommandResult, ApiError> {
        let r = self.write_any(op, budget).await?;
        match &r.result {
            Some(command_result::Result::FailedPrecondition(m)) => {
                Err(ApiError::FailedPrecondition(m.clone()))
            }
            Some(command_result::Result::ResourceExhausted(m)) => {
                Err(ApiError::ResourceExhausted(m.clone()))
            }
            _ => Ok(r),
        }
    }

    /// Runs `ops` in one transaction if `key`'s mod revision is still
    /// `seen` (0: the key was absent): the revision it committed at, or
    /// None when another change came first. How the services that keep a
    /// generation key (managed files, datastores) serialise their changes.
    pub(crate) async fn write_if_unchanged(
        &self,
        key: &[u8],
        seen: u64,
        ops: Vec<zone_proto::v1::RequestOp>,
        budget: Duration,
    ) -> Result<Option<u64>, ApiError> {
        use zone_proto::v1::{compare, Compare, TxnRequest};
        let txn = TxnRequest {
            compare: vec![Compare {
                key: key.to_vec(),
                target: compare::Target::ModRevision as i32,
                op: compare::Op::Equal as i32,
                target_value: Some(compare::TargetValue::ModRevision(seen)),
            }],
            success: ops,
            failure: Vec::new(),
        };
        self.check_enabled()?;
        let op = command::Op::Txn(txn);
        self.check_space(&op)?;
        let r = self.write(op, budget).await?;
        match r.result {
            Some(command_result::Result::Txn(t)) if t.succeeded => {
                Ok(Some(t.header.map(|h| h.revision).unwrap_or_default()))
            }
            Some(command_result::Result::Txn(_)) => Ok(None),
            other => Err(ApiError::FailedPrecondition(format!(
                "unexpected answer to a guarded change of {}: {other:?}",
                String::from_utf8_lossy(key)
            ))),
        }
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
}

impl ServerContext {
    /// Refuses a write that adds data early while a space alarm stands, on
    /// the leader (as [`ServerContext::check_enabled`]); the state machine
    /// refuses it anyway when applied. Saves the log the write's bytes.
    pub(crate) fn check_space(&self, op: &command::Op) -> Result<(), ApiError> {
        if self.node.view().role == StateRole::Leader && kv::adds_data(op) {
            if let Some(why) = self.node.reader().alarmed() {
                return Err(ApiError::ResourceExhausted(why));
            }
        }
        Ok(())
    }
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
