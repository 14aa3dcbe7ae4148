//! The cheap, cloneable way into the driver: requests go over a channel the
//! driver drains, answers come back on oneshot channels, and what everyone
//! watches (the Raft view, the lease, applied events) is published on watch
//! and broadcast channels.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use raft::eraftpb::{ConfChangeV2, Message};
use raft::SnapshotStatus;
use tokio::sync::{broadcast, oneshot, watch};
use zone_proto::v1::{command, Command, CommandResult};

use super::{Applied, Lease, LocalStatus, NodeError, RaftView};
use crate::kv::Reader;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// What the driver is asked to do.
pub(crate) enum Request {
    Raft(Box<Message>),
    Propose {
        cmd: Command,
        reply: Reply<CommandResult>,
    },
    Read {
        reply: Reply<()>,
    },
    Status {
        reply: oneshot::Sender<LocalStatus>,
    },
    Unreachable(u64),
    SnapshotReport(u64, SnapshotStatus),
    ProposeConf {
        cc: ConfChangeV2,
        reply: Reply<()>,
    },
    Transfer {
        target: u64,
        reply: Reply<u64>,
    },
    AskSnapshot {
        reply: Reply<()>,
    },
    Removed {
        index: u64,
        leader: u64,
    },
    /// Stop granting the lease in this term (before a transfer).
    RevokeLease {
        reply: Reply<Lease>,
    },
    /// Grant the lease again (the transfer failed).
    RestoreLease {
        reply: Reply<Lease>,
    },
    Shutdown,
}

/// The driver's request channel, made before the driver, so that what the
/// driver is built with (its transport) can report to it from the start.
#[derive(Debug)]
pub struct Inbox {
    pub(super) tx: std_mpsc::Sender<Request>,
    pub(super) rx: std_mpsc::Receiver<Request>,
}

impl Default for Inbox {
    fn default() -> Inbox {
        let (tx, rx) = std_mpsc::channel();
        Inbox { tx, rx }
    }
}

impl Inbox {
    /// The way for the transport to tell the driver about its peers.
    pub fn reports(&self) -> PeerReports {
        PeerReports {
            tx: self.tx.clone(),
        }
    }
}

/// What the transport tells the driver about its peers: Raft then stops
/// pipelining to an unreachable peer, and learns how a snapshot it sent
/// ended.
#[derive(Debug, Clone)]
pub struct PeerReports {
    tx: std_mpsc::Sender<Request>,
}

impl PeerReports {
    /// Messages to `id` could not be delivered.
    pub fn unreachable(&self, id: u64) {
        let _ = self.tx.send(Request::Unreachable(id));
    }

    /// How the snapshot sent to `id` ended.
    pub fn snapshot(&self, id: u64, status: SnapshotStatus) {
        let _ = self.tx.send(Request::SnapshotReport(id, status));
    }
}

/// A cheap, cloneable way into the driver.
#[derive(Clone)]
pub struct NodeHandle {
    pub(super) id: u64,
    pub(super) tx: std_mpsc::Sender<Request>,
    pub(super) view: watch::Receiver<RaftView>,
    pub(super) lease: watch::Receiver<Lease>,
    pub(super) events: broadcast::Sender<Arc<Applied>>,
    pub(super) reader: Reader,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle").field("id", &self.id).finish()
    }
}

impl NodeHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    pub fn view(&self) -> RaftView {
        *self.view.borrow()
    }

    /// Resolves when the view changes (or the driver stops).
    pub async fn view_changed(&self) {
        let mut rx = self.view.clone();
        let _ = rx.changed().await;
    }

    pub fn watch_view(&self) -> watch::Receiver<RaftView> {
        self.view.clone()
    }

    /// The leader lease, updated at every grant, renewal and revocation.
    pub fn watch_lease(&self) -> watch::Receiver<Lease> {
        self.lease.clone()
    }

    /// Stops granting the lease in the current term (before a transfer);
    /// returns the lease state published.
    pub async fn revoke_lease(&self) -> Result<Lease, NodeError> {
        self.ask(|reply| Request::RevokeLease { reply }).await
    }

    /// Grants the lease again after [`NodeHandle::revoke_lease`] (the
    /// transfer failed); returns the lease state published.
    pub async fn restore_lease(&self) -> Result<Lease, NodeError> {
        self.ask(|reply| Request::RestoreLease { reply }).await
    }

    /// Live events of every applied batch, for watchers.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Applied>> {
        self.events.subscribe()
    }

    /// Hands a message from a peer to Raft.
    pub fn step(&self, msg: Message) -> Result<(), NodeError> {
        self.tx
            .send(Request::Raft(Box::new(msg)))
            .map_err(|_| NodeError::Stopped)
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Proposes a write on this server, which must be the leader; resolves
    /// once it is committed and applied here.
    pub async fn propose(&self, op: command::Op) -> Result<CommandResult, NodeError> {
        self.propose_command(Command {
            op: Some(op),
            request: None,
        })
        .await
    }

    /// [`NodeHandle::propose`] for a whole command: a client write with its
    /// request id, applied at most once however often it is proposed.
    pub async fn propose_command(&self, cmd: Command) -> Result<CommandResult, NodeError> {
        self.ask(|reply| Request::Propose { cmd, reply }).await
    }

    /// Resolves once this server has applied everything committed before
    /// the call (ReadIndex): reads after it are linearizable.
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        self.ask(|reply| Request::Read { reply }).await
    }

    /// Proposes a membership change on this server, which must be the
    /// leader; resolves once it is applied here.
    pub async fn propose_conf_change(&self, cc: ConfChangeV2) -> Result<(), NodeError> {
        self.ask(|reply| Request::ProposeConf { cc, reply }).await
    }

    /// Starts handing leadership to `target` (0: the most caught-up voter);
    /// returns the chosen target. The caller watches the view for the result.
    pub async fn transfer_leader(&self, target: u64) -> Result<u64, NodeError> {
        self.ask(|reply| Request::Transfer { target, reply }).await
    }

    /// As a follower, asks the leader for a fresh snapshot.
    pub async fn request_snapshot(&self) -> Result<(), NodeError> {
        self.ask(|reply| Request::AskSnapshot { reply }).await
    }

    /// The leader says this server was removed.
    pub fn removed_notice(&self, index: u64, leader: u64) {
        let _ = self.tx.send(Request::Removed { index, leader });
    }

    pub async fn status(&self) -> Result<LocalStatus, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Status { reply })
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Asks the driver to stop after the Ready in hand; its thread's join
    /// handle tells when the data is flushed.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Request::Shutdown);
    }
}
