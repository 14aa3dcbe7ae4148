//! The Raft driver: one thread that owns the `RawNode`, its storage and the
//! state machine, and the handle request handlers use to reach it.
//!
//! Everything that changes Raft state happens on the driver thread, in
//! [`Driver::on_ready`], in the order raft-rs requires. The thread never
//! waits on the network: outgoing messages go to a [`Transport`] that queues
//! them. It waits on the disk once per Ready (one batch, one fsync).
//!
//! A client's write is acknowledged only after its entry is committed and
//! applied and the batch that applied it is written. Proposals are matched
//! to callers by (index, term): an entry applied at a proposal's index with
//! another term means a new leader replaced it, and the caller is told that
//! it was not applied. Linearizable reads batch every waiting caller behind
//! one ReadIndex request and are released once the state machine has
//! applied up to the index the leader confirmed.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use protobuf::Message as PbMessage;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use raft_proto::ConfChangeI;
use rocksdb::WriteBatch;
use tokio::sync::{broadcast, oneshot, watch};
use zone_proto::v1::{command, Command, CommandResult, Event, Member};

use crate::config::Config;
use crate::kv::{self, Applier, KvCache, Reader};
use crate::storage::{Engine, RaftStorage, StorageFailure};

/// Where the driver's outgoing messages go. No method may block.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
    /// The membership changed: these are the servers to talk to now.
    fn set_peers(&self, _members: &[Member]) {}
    /// Tell server `id` that it was removed from the zone at `index`.
    fn notify_removed(&self, _id: u64, _leader: u64, _index: u64) {}
}

/// How a blank data directory starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Bootstrap {
    /// A founding member: the initial voters, the same on every founder.
    Voters(Vec<Member>),
    /// Joining an existing zone that already lists this server: start with
    /// no configuration and wait for the leader's snapshot and log.
    Join(Vec<Member>),
}

/// Why the driver stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Shutdown,
    /// This server was removed from the zone (at this entry index; 0 when
    /// the leader's notice came before the entry).
    Removed {
        index: u64,
    },
}

/// Why a request to the driver did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("this server is not the leader (leader is {leader})")]
    NotLeader { leader: u64 },
    #[error("no leader is elected")]
    NoLeader,
    #[error("leadership changed before the request completed")]
    LeadershipChanged,
    #[error("a new leader replaced the proposed entry; it was not applied")]
    Dropped,
    #[error("the server is shutting down")]
    Stopped,
    #[error("{0}")]
    Rejected(String),
    /// A membership change is still being applied (or a new leader has not
    /// yet applied its log): nothing was proposed; retry shortly.
    #[error("another membership change is still in progress; retry in a moment")]
    ConfBusy,
}

/// What the driver tells watchers after each applied batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The changes of one batch, in revision order.
    Events(Vec<Event>),
    /// The store was replaced by a snapshot at this revision: the changes
    /// before it are not available on this server.
    Snapshot(u64),
}

/// The leader lease as the driver grants it to local agents.
///
/// The leader renews it with a ReadIndex round every heartbeat: when a
/// quorum has answered a round sent at monotonic time `t`, each of those
/// followers reset its election timer after `t`, and with check_quorum they
/// refuse to vote for anyone else for a whole election timeout. No other
/// server can therefore lead before `t + (election_ticks - 1) * tick` (one
/// tick lost to timer phase); the lease ends `raft.lease_margin_ms` earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lease {
    pub held: bool,
    pub term: u64,
    /// CLOCK_MONOTONIC nanoseconds; 0 when not held.
    pub expires_ns: u64,
    /// Increases with every change published.
    pub generation: u64,
    pub leader_id: u64,
    /// CLOCK_MONOTONIC nanoseconds at which this state was published.
    pub since_ns: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock leases are stated in, shared by
/// every process on the host.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// ReadIndex contexts of lease rounds: 9 bytes, `L` then the round number
/// (client read batches use 16: server id and a counter).
fn lease_ctx(round: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(b'L');
    v.extend_from_slice(&round.to_be_bytes());
    v
}

/// The round of a context made by [`lease_ctx`].
fn lease_round(ctx: &[u8]) -> Option<u64> {
    match ctx {
        [b'L', round @ ..] => Some(u64::from_be_bytes(round.try_into().ok()?)),
        _ => None,
    }
}

/// The Raft role and leader as last seen by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftView {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: StateRole,
}

/// The leader's view of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: u64,
    pub matched: u64,
    pub voter: bool,
    pub last_contact_ms: Option<u64>,
}

/// One server's own figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStatus {
    pub id: u64,
    pub role: StateRole,
    pub learner: bool,
    pub term: u64,
    pub vote: u64,
    pub leader_id: u64,
    pub last_index: u64,
    pub commit: u64,
    pub applied: u64,
    pub revision: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Filled only on the leader.
    pub progress: Vec<PeerProgress>,
    pub snapshots_received: u64,
    pub snapshots_built: u64,
    pub members: Vec<Member>,
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

enum Request {
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
    /// Stop granting the lease in this term (before a transfer); `false`
    /// grants it again (the transfer failed).
    RevokeLease {
        revoke: bool,
        reply: Reply<Lease>,
    },
    Shutdown,
}

/// A cheap, cloneable way into the driver.
#[derive(Clone)]
pub struct NodeHandle {
    id: u64,
    tx: std_mpsc::Sender<Request>,
    view: watch::Receiver<RaftView>,
    lease: watch::Receiver<Lease>,
    events: broadcast::Sender<Arc<Applied>>,
    reader: Reader,
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

    /// Revokes (or restores) the lease for the current term; returns the
    /// lease state published.
    pub async fn revoke_lease(&self, revoke: bool) -> Result<Lease, NodeError> {
        self.ask(|reply| Request::RevokeLease { revoke, reply })
            .await
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

    pub fn report_unreachable(&self, id: u64) {
        let _ = self.tx.send(Request::Unreachable(id));
    }

    pub fn report_snapshot(&self, id: u64, status: SnapshotStatus) {
        let _ = self.tx.send(Request::SnapshotReport(id, status));
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Proposes a write on this server, which must be the leader; resolves
    /// once it is committed and applied here.
    pub async fn propose(&self, op: command::Op) -> Result<CommandResult, NodeError> {
        let cmd = Command {
            id: 0,
            op: Some(op),
        };
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

/// Who waits for a proposal.
enum Waiter {
    Command(Reply<CommandResult>),
    Conf(Reply<()>),
}

/// A proposal waiting for its entry to be applied.
struct Pending {
    index: u64,
    term: u64,
    waiter: Waiter,
}

/// What applying one entry produced, for its proposer.
enum Outcome {
    Command(Option<CommandResult>),
    Conf(Result<(), String>),
    Nothing,
}

/// Replies held until the batch that produced them is on disk.
#[derive(Default)]
struct Completions {
    writes: Vec<(Waiter, Result<Outcome, NodeError>)>,
    events: Vec<Event>,
    /// The maintenance flag after the applied commands.
    disabled: Option<bool>,
}

struct Driver {
    id: u64,
    raw: RawNode<RaftStorage>,
    engine: Engine,
    rx: std_mpsc::Receiver<Request>,
    transport: Arc<dyn Transport>,
    view_tx: watch::Sender<RaftView>,
    lease_tx: watch::Sender<Lease>,
    events_tx: broadcast::Sender<Arc<Applied>>,
    config: Config,
    proposals: VecDeque<Pending>,
    /// Commands received since the last Ready, proposed together as one
    /// Raft message: one append per follower for the lot instead of one
    /// per command (each costing a message, a step and an ack per peer).
    to_propose: Vec<(Vec<u8>, Reply<CommandResult>)>,
    /// Records of recently applied keys, for the applier.
    kv_cache: KvCache,
    /// The handle's reader: the driver keeps its maintenance flag.
    reader: Reader,
    reads_new: Vec<Reply<()>>,
    /// Read batches sent, by context, with the tick they were sent at.
    reads_inflight: HashMap<Vec<u8>, (u64, Vec<Reply<()>>)>,
    reads_waiting: Vec<(u64, Vec<Reply<()>>)>,
    next_read_ctx: u64,
    last_heard: HashMap<u64, Instant>,
    snapshots_received: u64,
    members: Vec<Member>,
    ticks: u64,
    /// The highest commit index this leader sent to its followers on its
    /// own (see [`Driver::tell_commit`]).
    commit_told: u64,
    /// Lease rounds in flight, oldest first: (round, term, monotonic send
    /// time). A new one starts every heartbeat without waiting for the
    /// last, so a round trip longer than a heartbeat delays each renewal
    /// but does not space them out.
    lease_rounds: VecDeque<(u64, u64, u64)>,
    /// The tick at which the newest round started.
    lease_round_tick: Option<u64>,
    next_lease_round: u64,
    /// A term in which the lease must not be granted (transfer under way).
    lease_revoked_term: u64,
    lease_ns: u64,
    stopping: bool,
    removed: Option<u64>,
}

/// Starts the driver thread over an opened engine. The returned join handle
/// yields the driver's fatal error, if it stopped on one.
pub fn start(
    config: &Config,
    engine: Engine,
    transport: Arc<dyn Transport>,
    bootstrap: Bootstrap,
) -> Result<
    (
        NodeHandle,
        std::thread::JoinHandle<Result<Stopped, StorageFailure>>,
    ),
    StartError,
> {
    if let Some(index) = RaftStorage::removed(&engine)? {
        return Err(StartError::Removed { index });
    }
    let (voters, hint): (Vec<u64>, Vec<Member>) = match bootstrap {
        Bootstrap::Voters(m) => (m.iter().map(|m| m.id).collect(), m),
        Bootstrap::Join(m) => (Vec::new(), m),
    };
    let storage = RaftStorage::open(engine.clone(), &voters, kv::snapshot_data)?;
    let members = match kv::read_members(&engine)? {
        Some(m) => m,
        None if !voters.is_empty() => {
            // Founding member: record the membership with the configuration.
            let mut wb = WriteBatch::default();
            kv::stage_members(&engine, &mut wb, &hint);
            engine.write(wb, true)?;
            hint
        }
        None => hint,
    };
    transport.set_peers(&members);
    let raft_config = raft::Config {
        id: config.node.id,
        election_tick: config.raft.election_ticks,
        min_election_tick: config.raft.election_ticks,
        max_election_tick: config.max_election_ticks(),
        heartbeat_tick: config.raft.heartbeat_ticks,
        applied: storage.applied(),
        max_size_per_msg: config.raft.max_size_per_msg,
        max_inflight_msgs: config.raft.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        // A new commit index is not sent on its own (an empty append per
        // follower for every batch committed) while later entries are in
        // flight: their appends carry it. `Driver::tell_commit` sends the
        // last one when the pipeline drains.
        skip_bcast_commit: true,
        // Appends to one follower produced before the same Ready go as one
        // message.
        batch_append: true,
        ..Default::default()
    };
    raft_config.validate().map_err(StartError::Raft)?;
    let logger = crate::logging::raft_logger(config.node.id);
    let raw = RawNode::new(&raft_config, storage, &logger).map_err(StartError::Raft)?;
    let view = RaftView {
        id: config.node.id,
        leader_id: raw.raft.leader_id,
        term: raw.raft.term,
        role: raw.raft.state,
    };
    let (view_tx, view_rx) = watch::channel(view);
    let (lease_tx, lease_rx) = watch::channel(Lease {
        leader_id: view.leader_id,
        ..Lease::default()
    });
    let (events_tx, _) = broadcast::channel(1024);
    let (tx, rx) = std_mpsc::channel();
    let handle = NodeHandle {
        id: config.node.id,
        tx,
        view: view_rx,
        lease: lease_rx,
        events: events_tx.clone(),
        reader: Reader::new(engine.clone())?,
    };
    let mut driver = Driver {
        id: config.node.id,
        raw,
        engine,
        rx,
        transport,
        view_tx,
        lease_tx,
        events_tx,
        config: config.clone(),
        proposals: VecDeque::new(),
        to_propose: Vec::new(),
        kv_cache: KvCache::default(),
        reader: handle.reader.clone(),
        reads_new: Vec::new(),
        reads_inflight: HashMap::new(),
        reads_waiting: Vec::new(),
        // A random start: contexts must not repeat across restarts, and
        // they carry the server id so that two servers never collide in the
        // leader's pending reads.
        next_read_ctx: rand::random::<u64>() >> 1,
        last_heard: HashMap::new(),
        snapshots_received: 0,
        members,
        ticks: 0,
        commit_told: 0,
        lease_rounds: VecDeque::new(),
        lease_round_tick: None,
        next_lease_round: 1,
        lease_revoked_term: 0,
        lease_ns: config.lease().as_nanos() as u64,
        stopping: false,
        removed: None,
    };
    let thread = std::thread::Builder::new()
        .name(format!("raft-{}", config.node.id))
        .spawn(move || driver.run())
        .map_err(StartError::Thread)?;
    Ok((handle, thread))
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot load Raft state")]
    Storage(#[from] StorageFailure),
    #[error("invalid Raft setup")]
    Raft(#[source] raft::Error),
    #[error("cannot start the Raft thread")]
    Thread(#[source] std::io::Error),
    #[error("this server was removed from the zone (at entry {index}); to rejoin, wipe its data directory and add it again with `zonectl server add`")]
    Removed { index: u64 },
}

impl Driver {
    fn run(&mut self) -> Result<Stopped, StorageFailure> {
        let tick = self.config.tick();
        let mut next_tick = Instant::now() + tick;
        let result = loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(req) => {
                    self.handle(req);
                    // Drain what else is queued so one Ready covers it all.
                    for _ in 0..4096 {
                        match self.rx.try_recv() {
                            Ok(req) => self.handle(req),
                            Err(_) => break,
                        }
                    }
                    self.propose_batch();
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => self.stopping = true,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                self.ticks += 1;
                if self.ticks.is_multiple_of(5) {
                    self.promote_learners();
                }
                self.lease_tick();
                self.expire_reads();
                next_tick += tick;
                if next_tick < now {
                    // The thread fell behind (a slow disk): do not burst ticks.
                    next_tick = now + tick;
                }
            }
            self.flush_reads();
            self.tell_commit();
            if let Err(e) = self.ready_rounds() {
                break Err(e);
            }
            if let Some(index) = self.removed {
                tracing::warn!(
                    index,
                    "this server was removed from the zone; it stops serving and will not campaign"
                );
                break Ok(Stopped::Removed { index });
            }
            if self.stopping {
                break Ok(Stopped::Shutdown);
            }
        };
        if let Err(e) = &result {
            tracing::error!(error = %crate::logging::chain(e), "Raft driver stops on a storage failure");
        }
        self.fail_all(NodeError::Stopped);
        self.engine.flush()?;
        tracing::info!("Raft driver stopped, data flushed");
        result
    }

    /// A pre-vote for the same next term from a server with a higher id
    /// and the same log as ours, while we stand in a pre-election too.
    fn tied_pre_vote(&self, msg: &raft::eraftpb::Message) -> bool {
        let raft = &self.raw.raft;
        msg.get_msg_type() == raft::eraftpb::MessageType::MsgRequestPreVote
            && raft.state == StateRole::PreCandidate
            && msg.from > self.id
            && msg.term == raft.term + 1
            && msg.log_term == raft.raft_log.last_term()
            && msg.index == raft.raft_log.last_index()
    }

    fn handle(&mut self, req: Request) {
        if let Request::Propose { cmd, reply } = req {
            self.to_propose.push((cmd.encode_to_vec(), reply));
            return;
        }
        // Anything else sees the commands received before it proposed.
        self.propose_batch();
        match req {
            Request::Raft(msg) => {
                // Just (re)started, we do not know whether a leader's lease
                // is running that we helped renew: refuse to vote for one
                // election timeout, as a live follower would.
                if self.ticks < self.config.raft.election_ticks as u64
                    && matches!(
                        msg.get_msg_type(),
                        raft::eraftpb::MessageType::MsgRequestVote
                            | raft::eraftpb::MessageType::MsgRequestPreVote
                    )
                    && msg.get_context() != b"CampaignTransfer"
                {
                    tracing::debug!(from = msg.from, "vote request ignored while starting");
                    return;
                }
                if msg.to != self.id {
                    tracing::warn!(
                        to = msg.to,
                        from = msg.from,
                        "dropping a message for another server"
                    );
                    return;
                }
                self.last_heard.insert(msg.from, Instant::now());
                if self.tied_pre_vote(&msg) {
                    // Two servers that time out together each grant the
                    // other's pre-vote, both stand, and the votes split:
                    // one more election timeout before anyone leads. So a
                    // pre-candidate drops a tied pre-vote from a higher id
                    // (losing a message is always safe in Raft) and asks
                    // again: that peer, a pre-candidate itself and so with
                    // no leader, grants ours.
                    tracing::debug!(
                        from = msg.from,
                        "tied pre-vote from a higher id; standing again"
                    );
                    if let Err(e) = self.raw.campaign() {
                        tracing::debug!(error = %e, "campaign failed");
                    }
                    return;
                }
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "step failed");
                }
            }
            Request::Propose { .. } => unreachable!("batched above"),
            Request::Read { reply } => self.reads_new.push(reply),
            Request::Status { reply } => {
                let _ = reply.send(self.local_status());
            }
            Request::Unreachable(id) => self.raw.report_unreachable(id),
            Request::SnapshotReport(id, status) => self.raw.report_snapshot(id, status),
            Request::ProposeConf { cc, reply } => self.propose_conf(cc, reply),
            Request::Transfer { target, reply } => {
                let _ = reply.send(self.transfer(target));
            }
            Request::AskSnapshot { reply } => {
                let r = self
                    .raw
                    .request_snapshot()
                    .map_err(|e| NodeError::Rejected(format!("cannot request a snapshot: {e}")));
                let _ = reply.send(r);
            }
            Request::RevokeLease { revoke, reply } => {
                self.lease_revoked_term = if revoke { self.raw.raft.term } else { 0 };
                self.lease_rounds.clear();
                if revoke {
                    tracing::info!(term = self.raw.raft.term, "lease revoked");
                    self.publish_lease(false, 0);
                } else {
                    self.lease_tick();
                }
                let _ = reply.send(Ok(*self.lease_tx.borrow()));
            }
            Request::Removed { index, leader } => {
                // Believe only the leader we follow, and not a stale notice
                // from before a later re-admission (we applied past it and
                // are a member).
                let cs = self.raw.store().conf_state();
                let member = cs.voters.contains(&self.id) || cs.learners.contains(&self.id);
                let stale = member && self.raw.store().applied() >= index;
                if self.raw.raft.state != StateRole::Leader
                    && leader == self.raw.raft.leader_id
                    && !stale
                {
                    let mut wb = WriteBatch::default();
                    self.raw.mut_store().set_removed(&mut wb, index);
                    if self.engine.write(wb, true).is_ok() {
                        self.removed = Some(index);
                    }
                }
            }
            Request::Shutdown => self.stopping = true,
        }
    }

    /// Handles what raft-rs has ready. A second round sends the commit index
    /// that the first one's acknowledgements made final (bounded:
    /// `tell_commit` only moves forward).
    fn ready_rounds(&mut self) -> Result<(), StorageFailure> {
        for _ in 0..2 {
            if !self.raw.has_ready() {
                break;
            }
            self.on_ready()?;
            // A new leader that just committed its first entry need not
            // wait for the next tick to get its lease.
            if !self.lease_tx.borrow().held {
                self.lease_tick();
            }
            self.tell_commit();
        }
        Ok(())
    }

    /// With `skip_bcast_commit`, raft-rs does not tell followers each new
    /// commit index with an empty append of its own. While entries beyond
    /// it are in flight that costs nothing: their acknowledgements move the
    /// commit on, and the appends of new proposals carry it. Once the
    /// leader's whole log is committed nothing more would carry it, so it is
    /// sent here, at once, as raft-rs would have (followers apply, answer
    /// their watchers and release their reads without waiting for the next
    /// heartbeat).
    fn tell_commit(&mut self) {
        let raft = &mut self.raw.raft;
        if raft.state != StateRole::Leader {
            return;
        }
        let committed = raft.raft_log.committed;
        if committed > self.commit_told && raft.raft_log.last_index() == committed {
            raft.bcast_append();
            self.commit_told = committed;
        }
    }

    /// Why this server cannot take a leader's request, if it cannot.
    fn not_leader(&self) -> Option<NodeError> {
        if self.raw.raft.state == StateRole::Leader {
            return None;
        }
        Some(match self.raw.raft.leader_id {
            0 => NodeError::NoLeader,
            leader => NodeError::NotLeader { leader },
        })
    }

    /// Proposes the commands received so far, in order, as one Raft
    /// message: they take consecutive indexes in the current term.
    fn propose_batch(&mut self) {
        if self.to_propose.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_propose);
        if let Some(err) = self.not_leader() {
            for (_, reply) in batch {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        let n = batch.len() as u64;
        let mut replies = Vec::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        for (data, reply) in batch {
            entries.push(Entry {
                data: data.into(),
                ..Entry::default()
            });
            replies.push(reply);
        }
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.id;
        m.set_entries(entries.into());
        match self.raw.raft.step(m) {
            Ok(()) => {
                let last = self.raw.raft.raft_log.last_index();
                debug_assert_eq!(last, before + n);
                self.drop_overwritten(before + 1);
                let term = self.raw.raft.term;
                for (i, reply) in (before + 1..).zip(replies) {
                    self.proposals.push_back(Pending {
                        index: i,
                        term,
                        waiter: Waiter::Command(reply),
                    });
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, commands = n, "proposal refused");
                // Refused while transferring leadership, or over the
                // uncommitted-size limit: not in the log, safe to retry.
                for reply in replies {
                    let _ = reply.send(Err(NodeError::NotLeader {
                        leader: self.raw.raft.leader_id,
                    }));
                }
            }
        }
    }

    fn propose_conf(&mut self, cc: ConfChangeV2, reply: Reply<()>) {
        if let Some(err) = self.not_leader() {
            let _ = reply.send(Err(err));
            return;
        }
        // raft-rs turns a second concurrent change into an empty entry:
        // refuse it here, with a reason.
        if self.raw.raft.pending_conf_index > self.raw.raft.raft_log.applied {
            let _ = reply.send(Err(NodeError::ConfBusy));
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) if self.raw.raft.raft_log.last_index() > before => {
                let index = self.raw.raft.raft_log.last_index();
                self.drop_overwritten(index);
                self.proposals.push_back(Pending {
                    index,
                    term: self.raw.raft.term,
                    waiter: Waiter::Conf(reply),
                });
            }
            Ok(()) => {
                let _ = reply.send(Err(NodeError::Rejected(
                    "the change was not accepted".into(),
                )));
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Rejected(format!(
                    "membership change refused: {e}"
                ))));
            }
        }
    }

    /// Proposals still queued at or after `index`, from an earlier term of
    /// ours, were cut from our log when another leader overwrote it: they
    /// will never apply.
    fn drop_overwritten(&mut self, index: u64) {
        while self.proposals.back().is_some_and(|p| p.index >= index) {
            let p = self.proposals.pop_back().expect("back exists");
            match p.waiter {
                Waiter::Command(r) => {
                    let _ = r.send(Err(NodeError::Dropped));
                }
                Waiter::Conf(r) => {
                    let _ = r.send(Err(NodeError::Dropped));
                }
            }
        }
    }

    /// The voter other than this one with the highest match index.
    fn most_caught_up_voter(&self) -> Option<u64> {
        let voters = &self.raw.store().conf_state().voters;
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.id && voters.contains(id))
            .max_by_key(|(id, pr)| (pr.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    fn transfer(&mut self, target: u64) -> Result<u64, NodeError> {
        if let Some(err) = self.not_leader() {
            return Err(err);
        }
        let target = if target == 0 {
            self.most_caught_up_voter().ok_or_else(|| {
                NodeError::Rejected("there is no other voter to hand leadership to".into())
            })?
        } else {
            target
        };
        if target == self.id {
            return Ok(target);
        }
        if !self.raw.store().conf_state().voters.contains(&target) {
            return Err(NodeError::Rejected(format!(
                "server {target} is not a voter of the zone; leadership can only go to a voter"
            )));
        }
        tracing::info!(target, "handing leadership over");
        self.raw.transfer_leader(target);
        Ok(target)
    }

    /// On the leader: a learner whose log is close enough to ours becomes a
    /// voter, one change at a time.
    fn promote_learners(&mut self) {
        if self.raw.raft.state != StateRole::Leader
            || self.raw.raft.pending_conf_index > self.raw.raft.raft_log.applied
        {
            return;
        }
        let last = self.raw.raft.raft_log.last_index();
        let within = self.config.raft.promote_within;
        let ready = self
            .raw
            .store()
            .conf_state()
            .learners
            .iter()
            .copied()
            .find(|id| {
                self.raw
                    .raft
                    .prs()
                    .get(*id)
                    .is_some_and(|pr| pr.matched > 0 && pr.matched + within >= last)
            });
        if let Some(id) = ready {
            tracing::info!(id, "learner caught up: promoting it to voter");
            let mut cc = ConfChangeV2::default();
            cc.mut_changes().push(raft_proto::new_conf_change_single(
                id,
                ConfChangeType::AddNode,
            ));
            if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
                tracing::warn!(id, error = %e, "promotion not proposed");
            }
        }
    }

    /// Every heartbeat, the leader starts a lease round (a ReadIndex whose
    /// quorum answer renews the lease), whether or not earlier rounds have
    /// been answered; a leader without a lease starts one at once when none
    /// is in flight. A round older than a lease length can no longer extend
    /// the lease and is forgotten (lost to the network).
    fn lease_tick(&mut self) {
        if self.raw.raft.state != StateRole::Leader
            || self.lease_revoked_term == self.raw.raft.term
            || !self.raw.raft.commit_to_current_term()
        {
            return;
        }
        let now = monotonic_ns();
        while self
            .lease_rounds
            .front()
            .is_some_and(|&(_, _, sent)| now.saturating_sub(sent) >= self.lease_ns)
        {
            self.lease_rounds.pop_front();
        }
        let heartbeat_due = self
            .lease_round_tick
            .is_none_or(|t| self.ticks >= t + self.config.raft.heartbeat_ticks as u64);
        let unheld_and_idle = self.lease_rounds.is_empty() && !self.lease_tx.borrow().held;
        if !heartbeat_due && !unheld_and_idle {
            return;
        }
        let round = self.next_lease_round;
        self.next_lease_round += 1;
        self.lease_rounds
            .push_back((round, self.raw.raft.term, now));
        self.lease_round_tick = Some(self.ticks);
        self.raw.read_index(lease_ctx(round));
    }

    /// A quorum answered lease round `answered`, and with it every earlier
    /// round (raft-rs answers ReadIndex requests in order): the lease runs
    /// from that round's send time.
    fn lease_confirmed(&mut self, answered: u64) {
        let Some(pos) = self
            .lease_rounds
            .iter()
            .position(|&(round, _, _)| round == answered)
        else {
            return;
        };
        let (_, term, sent) = self.lease_rounds[pos];
        self.lease_rounds.drain(..=pos);
        let expires = sent + self.lease_ns;
        let current = *self.lease_tx.borrow();
        if self.raw.raft.state == StateRole::Leader
            && self.raw.raft.term == term
            && self.lease_revoked_term != term
            && !(current.held && current.term == term && current.expires_ns >= expires)
        {
            self.publish_lease(true, expires);
        }
    }

    fn publish_lease(&mut self, held: bool, expires_ns: u64) {
        let leader = self.raw.raft.leader_id;
        self.publish_lease_for(held, expires_ns, leader);
    }

    fn publish_lease_for(&mut self, held: bool, expires_ns: u64, leader_id: u64) {
        let generation = self.lease_tx.borrow().generation + 1;
        self.lease_tx.send_replace(Lease {
            held,
            term: self.raw.raft.term,
            expires_ns: if held { expires_ns } else { 0 },
            generation,
            leader_id,
            since_ns: monotonic_ns(),
        });
    }

    /// One ReadIndex for every read that arrived since the last one.
    fn flush_reads(&mut self) {
        if self.reads_new.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            for w in self.reads_new.drain(..) {
                let _ = w.send(Err(NodeError::NoLeader));
            }
            return;
        }
        // raft-rs drops a ReadIndex on a leader that has not yet committed
        // an entry of its term: hold the reads until it has.
        if self.raw.raft.state == StateRole::Leader && !self.raw.raft.commit_to_current_term() {
            return;
        }
        let waiters = std::mem::take(&mut self.reads_new);
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.id.to_be_bytes());
        ctx.extend_from_slice(&self.next_read_ctx.to_be_bytes());
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.clone());
        self.reads_inflight.insert(ctx, (self.ticks, waiters));
    }

    /// A read batch unanswered for an election timeout was lost (a leader
    /// that dropped it, a message lost): fail it, and the caller retries.
    fn expire_reads(&mut self) {
        let limit = self.config.raft.election_ticks as u64;
        let now = self.ticks;
        let stale: Vec<Vec<u8>> = self
            .reads_inflight
            .iter()
            .filter(|(_, (sent, _))| now.saturating_sub(*sent) > limit)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, waiters)) = self.reads_inflight.remove(&k) {
                for w in waiters {
                    let _ = w.send(Err(NodeError::LeadershipChanged));
                }
            }
        }
    }

    /// The Ready cycle, in the order raft-rs requires.
    fn on_ready(&mut self) -> Result<(), StorageFailure> {
        let mut ready = self.raw.ready();
        let span = tracing::trace_span!("ready", number = ready.number());
        let _enter = span.enter();

        // 1. A leader may send appends before persisting them (Raft thesis
        //    10.2.1): the network and the disk then work in parallel.
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }

        // 2. Role or leader changed: publish it; outstanding reads may be
        //    lost with the old leader, so fail them for the caller to retry.
        if let Some(ss) = ready.ss() {
            self.publish_view(ss.leader_id, ss.raft_state);
        }

        let mut wb = WriteBatch::default();
        let mut done = Completions::default();

        // 3. A snapshot from the leader replaces the log and the store. It
        //    is written on its own so that entries applied after it read the
        //    restored store.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let meta = snap.get_metadata();
            self.kv_cache.clear();
            let revision = kv::restore(&self.engine, &mut wb, &snap.data)?;
            self.raw.mut_store().apply_snapshot_meta(&mut wb, meta);
            self.engine.write(std::mem::take(&mut wb), true)?;
            self.reader.reload()?;
            let _ = self.events_tx.send(Arc::new(Applied::Snapshot(revision)));
            if let Some(members) = kv::read_members(&self.engine)? {
                self.members = members;
                self.transport.set_peers(&self.members);
            }
            self.snapshots_received += 1;
            tracing::info!(index = meta.index, term = meta.term, "installed snapshot");
            // Proposals at or below the snapshot were replaced or applied
            // elsewhere; we cannot tell which.
            while self
                .proposals
                .front()
                .is_some_and(|p| p.index <= meta.index)
            {
                let p = self.proposals.pop_front().expect("front exists");
                done.writes
                    .push((p.waiter, Err(NodeError::LeadershipChanged)));
            }
        }

        // 4. ReadIndex answers: release those already applied. Of lease
        //    rounds, the last answered (the newest) is the one that counts.
        let mut lease_answer = None;
        for rs in ready.take_read_states() {
            if let Some(round) = lease_round(&rs.request_ctx) {
                lease_answer = Some(round);
                continue;
            }
            if let Some((_, waiters)) = self.reads_inflight.remove(&rs.request_ctx) {
                self.reads_waiting.push((rs.index, waiters));
            }
        }
        if let Some(round) = lease_answer {
            self.lease_confirmed(round);
        }

        // 5. Committed entries: applied into the same batch as the new
        //    applied index.
        self.apply_entries(&mut wb, ready.take_committed_entries(), &mut done)?;

        // 6. New entries and hard state.
        if !ready.entries().is_empty() {
            self.raw.mut_store().append(&mut wb, ready.entries());
        }
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().set_hard_state(&mut wb, hs);
            if hs.term != self.view_tx.borrow().term {
                let (leader, role) = (self.raw.raft.leader_id, self.raw.raft.state);
                self.publish_view(leader, role);
            }
        }

        // 7. One write, one fsync, for all of it; then the results.
        let sync = ready.must_sync() || !ready.entries().is_empty();
        if !wb.is_empty() {
            self.engine.write(wb, sync)?;
        }
        self.complete(done);

        // 8. Messages that must follow persistence (votes, append acks).
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }

        // 9. Advance; what became committed meanwhile is applied now. The
        //    log entries are already durable, so this batch needs no fsync:
        //    lost, it is re-applied from the log, never twice (the applied
        //    index moves in the same batch).
        let mut light = self.raw.advance(ready);
        let mut wb = WriteBatch::default();
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(&mut wb, commit);
        }
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        let mut done = Completions::default();
        self.apply_entries(&mut wb, light.take_committed_entries(), &mut done)?;
        if !wb.is_empty() {
            self.engine.write(wb, false)?;
        }
        self.complete(done);
        self.raw.advance_apply();
        self.compact_log()?;
        Ok(())
    }

    fn publish_view(&mut self, leader_id: u64, role: StateRole) {
        let term = self.raw.raft.term;
        let old = *self.view_tx.borrow();
        if old.leader_id != leader_id || old.term != term {
            for (_, (_, waiters)) in self.reads_inflight.drain() {
                for w in waiters {
                    let _ = w.send(Err(NodeError::LeadershipChanged));
                }
            }
            tracing::info!(leader = leader_id, term, role = ?role, "Raft view changed");
        }
        if role != StateRole::Leader || old.term != term {
            self.lease_rounds.clear();
            let l = *self.lease_tx.borrow();
            if l.held || l.leader_id != leader_id {
                self.publish_lease_for(false, 0, leader_id);
            }
        }
        self.view_tx.send_replace(RaftView {
            id: self.id,
            leader_id,
            term,
            role,
        });
    }

    fn apply_entries(
        &mut self,
        wb: &mut WriteBatch,
        entries: Vec<Entry>,
        done: &mut Completions,
    ) -> Result<(), StorageFailure> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let engine = self.engine.clone();
        // Taken out of self for the applier's lifetime (apply_conf_change
        // needs self); put back below. On a storage failure the driver
        // stops, and the cache with it.
        let mut cache = std::mem::take(&mut self.kv_cache);
        let mut applier = Applier::new(
            &engine,
            &mut cache,
            self.id,
            self.raw.raft.term,
            self.config.limits.watch_history,
        )?;
        for entry in entries {
            let outcome = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Outcome::Nothing, // a new leader's no-op
                EntryType::EntryNormal => match Command::decode(&entry.data[..]) {
                    Ok(cmd) => Outcome::Command(applier.apply(wb, cmd)?),
                    Err(e) => {
                        tracing::error!(index = entry.index, error = %e, "skipping an undecodable command");
                        Outcome::Nothing
                    }
                },
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data);
                    Outcome::Conf(self.apply_conf_change(
                        wb,
                        entry.index,
                        cc.map(|cc| cc.into_v2()),
                    ))
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data);
                    Outcome::Conf(self.apply_conf_change(wb, entry.index, cc))
                }
            };
            let mut outcome = Some(outcome);
            while self
                .proposals
                .front()
                .is_some_and(|p| p.index <= entry.index)
            {
                let p = self.proposals.pop_front().expect("front exists");
                let result = if p.index == entry.index && p.term == entry.term {
                    outcome.take().ok_or(NodeError::Dropped)
                } else {
                    Err(NodeError::Dropped)
                };
                done.writes.push((p.waiter, result));
            }
        }
        applier.finish(wb);
        done.events = std::mem::take(&mut applier.events);
        done.disabled = Some(applier.disabled());
        drop(applier);
        self.kv_cache = cache;
        self.raw.mut_store().set_applied(wb, last);
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        wb: &mut WriteBatch,
        index: u64,
        cc: Result<ConfChangeV2, protobuf::ProtobufError>,
    ) -> Result<(), String> {
        let cc = match cc {
            Ok(cc) => cc,
            Err(e) => {
                tracing::error!(index, error = %e, "skipping an undecodable configuration change");
                return Err(format!("undecodable configuration change: {e}"));
            }
        };
        let before = self.raw.store().conf_state().clone();
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::error!(index, error = %e, "configuration change rejected");
                return Err(format!("configuration change rejected: {e}"));
            }
        };
        tracing::info!(index, voters = ?cs.voters, learners = ?cs.learners, "configuration changed");
        self.raw.mut_store().set_conf_state(wb, &cs);
        // The membership table follows the configuration; a new server's
        // name and address travel in the change's context.
        let added: Option<Member> = prost::Message::decode(&cc.context[..]).ok();
        self.members = members_after(&self.members, &cs, added);
        kv::stage_members(&self.engine, wb, &self.members);
        let was_member = before.voters.contains(&self.id) || before.learners.contains(&self.id);
        let is_member = cs.voters.contains(&self.id) || cs.learners.contains(&self.id);
        if was_member && !is_member {
            self.raw.mut_store().set_removed(wb, index);
            self.removed = Some(index);
        }
        if self.raw.raft.state == StateRole::Leader {
            for gone in before.voters.iter().chain(&before.learners) {
                if !cs.voters.contains(gone) && !cs.learners.contains(gone) && *gone != self.id {
                    self.transport.notify_removed(*gone, self.id, index);
                }
            }
        }
        // After the notices: they still need the removed servers' links.
        self.transport.set_peers(&self.members);
        Ok(())
    }

    /// After a batch is durable: answer writers, wake watchers and readers.
    /// Answers what the batch just written settled.
    fn complete(&mut self, done: Completions) {
        if let Some(disabled) = done.disabled {
            self.reader.set_disabled(disabled);
        }
        for (waiter, outcome) in done.writes {
            match waiter {
                Waiter::Command(reply) => {
                    let r = match outcome {
                        Ok(Outcome::Command(Some(r))) => Ok(r),
                        Ok(_) => Err(NodeError::Dropped),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
                Waiter::Conf(reply) => {
                    let r = match outcome {
                        Ok(Outcome::Conf(Ok(()))) => Ok(()),
                        Ok(Outcome::Conf(Err(e))) => Err(NodeError::Rejected(e)),
                        Ok(_) => Err(NodeError::Dropped),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
            }
        }
        if !done.events.is_empty() {
            let _ = self.events_tx.send(Arc::new(Applied::Events(done.events)));
        }
        let applied = self.raw.store().applied();
        if !self.reads_waiting.is_empty() {
            let mut still = Vec::new();
            for (index, waiters) in self.reads_waiting.drain(..) {
                if index <= applied {
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                } else {
                    still.push((index, waiters));
                }
            }
            self.reads_waiting = still;
        }
    }

    /// Keeps `log_retention` applied entries; the rest go.
    fn compact_log(&mut self) -> Result<(), StorageFailure> {
        let store = self.raw.store();
        let applied = store.applied();
        let retention = self.config.raft.log_retention;
        // Compact in steps of a tenth of the retention, not every Ready.
        let step = (retention / 10).max(1);
        if applied < store.first() + retention + step {
            return Ok(());
        }
        let to = applied + 1 - retention;
        let mut wb = WriteBatch::default();
        self.raw.mut_store().compact(&mut wb, to)?;
        self.engine.write(wb, false)?;
        tracing::debug!(first_index = to, "log compacted");
        Ok(())
    }

    fn local_status(&self) -> LocalStatus {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let cs = store.conf_state();
        let mut progress = Vec::new();
        if raft.state == StateRole::Leader {
            for (id, pr) in raft.prs().iter() {
                progress.push(PeerProgress {
                    id: *id,
                    matched: pr.matched,
                    voter: cs.voters.contains(id),
                    last_contact_ms: if *id == self.id {
                        None
                    } else {
                        self.last_heard
                            .get(id)
                            .map(|t| t.elapsed().as_millis() as u64)
                    },
                });
            }
            progress.sort_by_key(|p| p.id);
        }
        LocalStatus {
            id: self.id,
            role: raft.state,
            learner: cs.learners.contains(&self.id),
            term: raft.term,
            vote: raft.vote,
            leader_id: raft.leader_id,
            last_index: raft.raft_log.last_index(),
            commit: raft.raft_log.committed,
            applied: store.applied(),
            revision: self.reader.revision().unwrap_or(0),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            progress,
            snapshots_received: self.snapshots_received,
            snapshots_built: store.snapshots_built(),
            members: self.members.clone(),
        }
    }

    fn fail_all(&mut self, err: NodeError) {
        for (_, reply) in self.to_propose.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
        for p in self.proposals.drain(..) {
            match p.waiter {
                Waiter::Command(r) => {
                    let _ = r.send(Err(err.clone()));
                }
                Waiter::Conf(r) => {
                    let _ = r.send(Err(err.clone()));
                }
            }
        }
        for w in self.reads_new.drain(..) {
            let _ = w.send(Err(err.clone()));
        }
        for (_, (_, ws)) in self.reads_inflight.drain() {
            for w in ws {
                let _ = w.send(Err(err.clone()));
            }
        }
        for (_, ws) in self.reads_waiting.drain(..) {
            for w in ws {
                let _ = w.send(Err(err.clone()));
            }
        }
    }
}

/// How long a caller should wait between retries while no leader is known.
pub const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The membership table after a configuration change: members keep their
/// entry, a new one comes from the change's context, and the learner flag
/// follows the configuration.
fn members_after(old: &[Member], cs: &ConfState, added: Option<Member>) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    for id in cs.voters.iter().chain(&cs.learners) {
        let mut m = old
            .iter()
            .find(|m| m.id == *id)
            .cloned()
            .or_else(|| added.clone().filter(|a| a.id == *id))
            .unwrap_or(Member {
                id: *id,
                ..Member::default()
            });
        if let Some(a) = added.as_ref().filter(|a| a.id == *id) {
            if !a.peer_endpoint.is_empty() {
                m.peer_endpoint = a.peer_endpoint.clone();
            }
            if !a.name.is_empty() {
                m.name = a.name.clone();
            }
        }
        m.learner = cs.learners.contains(id);
        out.push(m);
    }
    out.sort_by_key(|m| m.id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_context_gives_back_its_round_and_nothing_else_does() {
        for round in [0, 1, 255, 256, u64::MAX] {
            assert_eq!(lease_round(&lease_ctx(round)), Some(round));
        }
        assert_eq!(lease_round(b""), None);
        assert_eq!(lease_round(b"L"), None);
        assert_eq!(lease_round(b"L1234567"), None, "one byte short");
        assert_eq!(lease_round(b"L123456789"), None, "one byte over");
        assert_eq!(lease_round(b"R12345678"), None, "a read's context");
    }
}
