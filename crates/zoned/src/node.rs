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
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, SnapshotStatus, StateRole};
use raft_proto::ConfChangeI;
use rocksdb::WriteBatch;
use tokio::sync::{broadcast, oneshot, watch};
use zone_proto::v1::{command, Command, CommandResult, Event};

use crate::config::Config;
use crate::kv::{self, Applier, Reader};
use crate::storage::{Engine, RaftStorage, StorageFailure};

/// Where the driver's outgoing messages go. `send` must not block.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
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
    Campaign,
    Shutdown,
}

/// A cheap, cloneable way into the driver.
#[derive(Clone)]
pub struct NodeHandle {
    id: u64,
    tx: std_mpsc::Sender<Request>,
    view: watch::Receiver<RaftView>,
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

    /// Starts an election now (tests, and an operator's forced campaign).
    pub fn campaign(&self) {
        let _ = self.tx.send(Request::Campaign);
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

/// A write waiting for its entry to be applied.
struct Pending {
    index: u64,
    term: u64,
    reply: Reply<CommandResult>,
}

/// Replies held until the batch that produced them is on disk.
#[derive(Default)]
struct Completions {
    writes: Vec<(Reply<CommandResult>, Result<CommandResult, NodeError>)>,
    events: Vec<Event>,
}

struct Driver {
    id: u64,
    raw: RawNode<RaftStorage>,
    engine: Engine,
    rx: std_mpsc::Receiver<Request>,
    transport: Arc<dyn Transport>,
    view_tx: watch::Sender<RaftView>,
    events_tx: broadcast::Sender<Arc<Applied>>,
    config: Config,
    proposals: VecDeque<Pending>,
    reads_new: Vec<Reply<()>>,
    reads_inflight: HashMap<u64, Vec<Reply<()>>>,
    reads_waiting: Vec<(u64, Vec<Reply<()>>)>,
    next_read_ctx: u64,
    last_heard: HashMap<u64, Instant>,
    snapshots_received: u64,
    stopping: bool,
}

/// Starts the driver thread over an opened engine. The returned join handle
/// yields the driver's fatal error, if it stopped on one.
pub fn start(
    config: &Config,
    engine: Engine,
    transport: Arc<dyn Transport>,
) -> Result<
    (
        NodeHandle,
        std::thread::JoinHandle<Result<(), StorageFailure>>,
    ),
    StartError,
> {
    let voters: Vec<u64> = config.voters.iter().map(|v| v.id).collect();
    let storage = RaftStorage::open(engine.clone(), &voters, kv::snapshot_data)?;
    let raft_config = raft::Config {
        id: config.node.id,
        election_tick: config.raft.election_ticks,
        heartbeat_tick: config.raft.heartbeat_ticks,
        applied: storage.applied(),
        max_size_per_msg: config.raft.max_size_per_msg,
        max_inflight_msgs: config.raft.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
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
    let (events_tx, _) = broadcast::channel(1024);
    let (tx, rx) = std_mpsc::channel();
    let handle = NodeHandle {
        id: config.node.id,
        tx,
        view: view_rx,
        events: events_tx.clone(),
        reader: Reader::new(engine.clone()),
    };
    let mut driver = Driver {
        id: config.node.id,
        raw,
        engine,
        rx,
        transport,
        view_tx,
        events_tx,
        config: config.clone(),
        proposals: VecDeque::new(),
        reads_new: Vec::new(),
        reads_inflight: HashMap::new(),
        reads_waiting: Vec::new(),
        next_read_ctx: 1,
        last_heard: HashMap::new(),
        snapshots_received: 0,
        stopping: false,
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
}

impl Driver {
    fn run(&mut self) -> Result<(), StorageFailure> {
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
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => self.stopping = true,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick += tick;
                if next_tick < now {
                    // The thread fell behind (a slow disk): do not burst ticks.
                    next_tick = now + tick;
                }
            }
            self.flush_reads();
            if self.raw.has_ready() {
                if let Err(e) = self.on_ready() {
                    break Err(e);
                }
            }
            if self.stopping {
                break Ok(());
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

    fn handle(&mut self, req: Request) {
        match req {
            Request::Raft(msg) => {
                if msg.to != self.id {
                    tracing::warn!(
                        to = msg.to,
                        from = msg.from,
                        "dropping a message for another server"
                    );
                    return;
                }
                self.last_heard.insert(msg.from, Instant::now());
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "step failed");
                }
            }
            Request::Propose { cmd, reply } => self.propose(cmd, reply),
            Request::Read { reply } => self.reads_new.push(reply),
            Request::Status { reply } => {
                let _ = reply.send(self.local_status());
            }
            Request::Unreachable(id) => self.raw.report_unreachable(id),
            Request::SnapshotReport(id, status) => self.raw.report_snapshot(id, status),
            Request::Campaign => {
                if let Err(e) = self.raw.campaign() {
                    tracing::warn!(error = %e, "campaign failed");
                }
            }
            Request::Shutdown => self.stopping = true,
        }
    }

    fn propose(&mut self, cmd: Command, reply: Reply<CommandResult>) {
        if self.raw.raft.state != StateRole::Leader {
            let leader = self.raw.raft.leader_id;
            let err = if leader == 0 {
                NodeError::NoLeader
            } else {
                NodeError::NotLeader { leader }
            };
            let _ = reply.send(Err(err));
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose(Vec::new(), cmd.encode_to_vec()) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                debug_assert_eq!(index, before + 1);
                self.proposals.push_back(Pending {
                    index,
                    term: self.raw.raft.term,
                    reply,
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "proposal refused");
                // Refused while transferring leadership, or over the
                // uncommitted-size limit: not in the log, safe to retry.
                let _ = reply.send(Err(NodeError::NotLeader {
                    leader: self.raw.raft.leader_id,
                }));
            }
        }
    }

    /// One ReadIndex for every read that arrived since the last one.
    fn flush_reads(&mut self) {
        if self.reads_new.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.reads_new);
        if self.raw.raft.leader_id == 0 {
            for w in waiters {
                let _ = w.send(Err(NodeError::NoLeader));
            }
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.reads_inflight.insert(ctx, waiters);
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
            let revision = kv::restore(&self.engine, &mut wb, &snap.data)?;
            self.raw.mut_store().apply_snapshot_meta(&mut wb, meta);
            self.engine.write(std::mem::take(&mut wb), true)?;
            let _ = self.events_tx.send(Arc::new(Applied::Snapshot(revision)));
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
                let _ = p.reply.send(Err(NodeError::LeadershipChanged));
            }
        }

        // 4. ReadIndex answers: release those already applied.
        for rs in ready.take_read_states() {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(waiters) = self.reads_inflight.remove(&u64::from_be_bytes(ctx)) {
                self.reads_waiting.push((rs.index, waiters));
            }
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
            for (_, waiters) in self.reads_inflight.drain() {
                for w in waiters {
                    let _ = w.send(Err(NodeError::LeadershipChanged));
                }
            }
            tracing::info!(leader = leader_id, term, role = ?role, "Raft view changed");
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
        let mut applier = Applier::new(
            &engine,
            self.id,
            self.raw.raft.term,
            self.config.limits.watch_history,
        )?;
        for entry in entries {
            let mut result = None;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {} // a new leader's no-op
                EntryType::EntryNormal => match Command::decode(&entry.data[..]) {
                    Ok(cmd) => result = applier.apply(wb, &cmd)?,
                    Err(e) => {
                        tracing::error!(index = entry.index, error = %e, "skipping an undecodable command")
                    }
                },
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data);
                    self.apply_conf_change(wb, entry.index, cc.map(|cc| cc.into_v2()));
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data);
                    self.apply_conf_change(wb, entry.index, cc);
                }
            }
            while self
                .proposals
                .front()
                .is_some_and(|p| p.index <= entry.index)
            {
                let p = self.proposals.pop_front().expect("front exists");
                let outcome = if p.index == entry.index && p.term == entry.term {
                    result.take().ok_or(NodeError::Dropped)
                } else {
                    Err(NodeError::Dropped)
                };
                done.writes.push((p.reply, outcome));
            }
        }
        applier.finish(wb);
        done.events = std::mem::take(&mut applier.events);
        self.raw.mut_store().set_applied(wb, last);
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        wb: &mut WriteBatch,
        index: u64,
        cc: Result<ConfChangeV2, protobuf::ProtobufError>,
    ) {
        let cc = match cc {
            Ok(cc) => cc,
            Err(e) => {
                tracing::error!(index, error = %e, "skipping an undecodable configuration change");
                return;
            }
        };
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                tracing::info!(index, voters = ?cs.voters, learners = ?cs.learners, "configuration changed");
                self.raw.mut_store().set_conf_state(wb, &cs);
            }
            Err(e) => tracing::error!(index, error = %e, "configuration change rejected"),
        }
    }

    /// After a batch is durable: answer writers, wake watchers and readers.
    fn complete(&mut self, done: Completions) {
        for (reply, outcome) in done.writes {
            let _ = reply.send(outcome);
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
            revision: Reader::new(self.engine.clone()).revision().unwrap_or(0),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            progress,
            snapshots_received: self.snapshots_received,
        }
    }

    fn fail_all(&mut self, err: NodeError) {
        for p in self.proposals.drain(..) {
            let _ = p.reply.send(Err(err.clone()));
        }
        for w in self.reads_new.drain(..) {
            let _ = w.send(Err(err.clone()));
        }
        for (_, ws) in self.reads_inflight.drain() {
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
