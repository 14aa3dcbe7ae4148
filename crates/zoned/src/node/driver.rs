//! The driver: the one owner of the `RawNode`, its storage and the state
//! machine, and the Ready cycle in the order raft-rs requires.
//!
//! The driver does not keep time itself. Its caller ticks it
//! ([`Driver::tick`]) and hands it requests ([`Driver::pump`]), then lets it
//! work ([`Driver::advance`]); the time it states leases in and measures
//! peers by comes from the [`Clock`] it was built with. [`Driver::run`] is
//! that caller on a server: a thread that ticks every `raft.tick_ms` on
//! CLOCK_BOOTTIME. A test can be it too, on simulated time.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use raft::eraftpb::{Entry, Message, MessageType};
use raft::{RawNode, StateRole};
use rocksdb::WriteBatch;
use tokio::sync::{broadcast, watch};
use zone_proto::v1::{CommandResult, Member, ZoneRecord};

use super::apply::Completions;
use super::clock::Clock;
use super::handle::{Reply, Request};
use super::lease::{self, Lease, LeaseRounds};
use super::proposals::{Proposals, Waiter};
use super::reads::Reads;
use super::zone::ZoneMismatch;
use super::{Applied, LocalStatus, NodeError, PeerProgress, RaftView, Stopped, Transport};
use crate::config::Config;
use crate::kv::{self, KvCache, Reader};
use crate::storage::{Engine, RaftStorage, StorageFailure};

/// Requests handled at most in one go before the driver gets on with the
/// Ready: they are proposed together, in one append.
const REQUESTS_PER_ROUND: usize = 4096;

/// What [`super::build`] gives the driver.
pub(super) struct Parts {
    pub(super) config: Config,
    pub(super) raw: RawNode<RaftStorage>,
    pub(super) engine: Engine,
    pub(super) rx: std_mpsc::Receiver<Request>,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) view_tx: watch::Sender<RaftView>,
    pub(super) lease_tx: watch::Sender<Lease>,
    pub(super) events_tx: broadcast::Sender<Arc<Applied>>,
    pub(super) reader: Reader,
    pub(super) members: Vec<Member>,
    /// The zone's record, if the store holds one.
    pub(super) zone: Option<ZoneRecord>,
    pub(super) took_part: BTreeSet<u64>,
    /// The highest commit a leader told this server, as stored.
    pub(super) leader_commit: u64,
}

/// One server's Raft node; see the module documentation.
pub struct Driver {
    pub(super) id: u64,
    pub(super) raw: RawNode<RaftStorage>,
    pub(super) engine: Engine,
    rx: std_mpsc::Receiver<Request>,
    pub(super) transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    view_tx: watch::Sender<RaftView>,
    lease_tx: watch::Sender<Lease>,
    pub(super) events_tx: broadcast::Sender<Arc<Applied>>,
    pub(super) config: Config,
    pub(super) proposals: Proposals,
    /// Commands received since the last Ready, proposed together as one
    /// Raft message: one append per follower for the lot instead of one
    /// per command (each costing a message, a step and an ack per peer).
    /// Encoded commands with their callers, and whether each may pass the
    /// hard free-space floor (see [`super::disk`]).
    to_propose: Vec<(Vec<u8>, Reply<CommandResult>, bool)>,
    /// Records of recently applied keys, for the applier.
    pub(super) kv_cache: KvCache,
    /// The handle's reader: the driver keeps its maintenance flag.
    pub(super) reader: Reader,
    pub(super) reads: Reads,
    /// When each peer was last heard from, on the driver's clock.
    last_heard_ns: HashMap<u64, u64>,
    /// The term in which this server, leading, last sent MsgTimeoutNow.
    timeout_now_term: u64,
    snapshots_received: u64,
    pub(super) members: Vec<Member>,
    /// The data directory's free-space floor.
    disk: super::disk::DiskFloor,
    /// Ticks since the driver started.
    ticks: u64,
    /// The highest commit index this leader sent to its followers on its
    /// own (see [`Driver::tell_commit`]).
    commit_told: u64,
    lease: LeaseRounds,
    stopping: bool,
    pub(super) removed: Option<u64>,
    /// The id of the zone's record, once applied here (see [`zone`]).
    pub(super) zone_id: Option<String>,
    /// The term in which this server, leading, proposed the zone's record.
    pub(super) zone_proposed_term: u64,
    /// The applied record's timing is not this server's: it stops.
    pub(super) mismatch: Option<ZoneMismatch>,
    /// The servers the store records as having taken part (see [`zone`]).
    pub(super) took_part: BTreeSet<u64>,
    /// Those this server, leading in that term, proposed to add.
    pub(super) took_part_proposed: (u64, BTreeSet<u64>),
    /// The highest commit index a leader's append carried, and the value
    /// last staged on disk (`RaftStorage::leader_commit`).
    leader_commit: (u64, u64),
    /// The last leader known (never 0 once one was), for the metrics.
    last_leader: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("id", &self.id)
            .field("ticks", &self.ticks)
            .finish_non_exhaustive()
    }
}

impl Driver {
    pub(super) fn new(p: Parts) -> Driver {
        let lease = LeaseRounds::new(
            p.config.lease().as_nanos() as u64,
            p.config.raft.heartbeat_ticks as u64,
        );
        let mut disk = super::disk::DiskFloor::new(
            p.config.node.data_dir.clone(),
            super::disk::hard_floor(p.config.limits.min_free_disk_mb),
        );
        disk.refresh(p.clock.now_ns());
        Driver {
            id: p.config.node.id,
            raw: p.raw,
            engine: p.engine,
            rx: p.rx,
            transport: p.transport,
            clock: p.clock,
            view_tx: p.view_tx,
            lease_tx: p.lease_tx,
            events_tx: p.events_tx,
            proposals: Proposals::default(),
            to_propose: Vec::new(),
            kv_cache: KvCache::default(),
            reader: p.reader,
            // A random start: contexts must not repeat across restarts.
            reads: Reads::new(p.config.node.id, rand::random::<u64>() >> 1),
            last_heard_ns: HashMap::new(),
            timeout_now_term: 0,
            snapshots_received: 0,
            members: p.members,
            disk,
            ticks: 0,
            commit_told: 0,
            lease,
            stopping: false,
            removed: None,
            zone_id: p.zone.map(|z| z.id),
            zone_proposed_term: 0,
            mismatch: None,
            took_part: p.took_part,
            took_part_proposed: (0, BTreeSet::new()),
            leader_commit: (p.leader_commit, p.leader_commit),
            last_leader: 0,
            config: p.config,
        }
    }

    /// The driver's thread on a server: waits for requests, ticks every
    /// `raft.tick_ms` on its clock (the elections' and the lease's time
    /// base: see [`super::lease`]), and stops on a shutdown, a removal or a
    /// storage failure, with the data flushed.
    pub fn run(mut self) -> Result<Stopped, StorageFailure> {
        let tick = self.config.tick().as_nanos() as u64;
        let mut next_tick = self.clock.now_ns() + tick;
        let result = loop {
            let wait = Duration::from_nanos(next_tick.saturating_sub(self.clock.now_ns()));
            match self.rx.recv_timeout(wait) {
                Ok(req) => {
                    self.handle(req);
                    // What else is queued, so that one Ready covers it all.
                    self.pump();
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => self.stopping = true,
            }
            let now = self.clock.now_ns();
            if now >= next_tick {
                self.tick();
                next_tick += tick;
                if next_tick < now {
                    // The thread fell behind (a slow disk): do not burst ticks.
                    next_tick = now + tick;
                }
            }
            match self.advance() {
                Ok(None) => {}
                Ok(Some(stopped)) => break Ok(stopped),
                Err(e) => break Err(e),
            }
        };
        self.close(result)
    }

    /// Handles the requests queued for the driver (as many as one round
    /// takes), without waiting, and proposes the commands among them.
    pub fn pump(&mut self) {
        for _ in 0..REQUESTS_PER_ROUND {
            match self.rx.try_recv() {
                Ok(req) => self.handle(req),
                Err(_) => break,
            }
        }
        self.propose_batch();
    }

    /// One Raft tick: elections, heartbeats and check_quorum move on, the
    /// leader renews its lease, and reads unanswered too long fail.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        self.disk.refresh(self.clock.now_ns());
        if self.ticks.is_multiple_of(5) {
            self.promote_learners();
            self.record_took_part();
        }
        self.lease_tick();
        self.reads
            .expire(self.ticks, self.config.raft.election_ticks as u64);
    }

    /// Does what the requests and ticks so far call for: proposes queued
    /// commands, sends reads, handles what raft-rs has ready (sending,
    /// persisting, applying, answering). Returns why the driver stopped,
    /// once it has: it then takes no more requests; call
    /// [`Driver::close`].
    pub fn advance(&mut self) -> Result<Option<Stopped>, StorageFailure> {
        self.found_zone();
        self.propose_batch();
        self.flush_reads();
        self.tell_commit();
        self.ready_rounds()?;
        if let Some(m) = self.mismatch.take() {
            tracing::error!(error = %m, "this server's Raft timing is not the zone's; it stops");
            return Ok(Some(Stopped::ZoneMismatch(m)));
        }
        if let Some(index) = self.removed {
            tracing::warn!(
                index,
                "this server was removed from the zone; it stops serving and will not campaign"
            );
            return Ok(Some(Stopped::Removed { index }));
        }
        Ok(self.stopping.then_some(Stopped::Shutdown))
    }

    /// Ends the driver after `result`: everyone still waiting is told it
    /// stopped, and the store is flushed.
    pub fn close(
        mut self,
        result: Result<Stopped, StorageFailure>,
    ) -> Result<Stopped, StorageFailure> {
        if let Err(e) = &result {
            tracing::error!(error = %crate::logging::chain(e), "Raft driver stops on a storage failure");
        }
        self.fail_all(NodeError::Stopped);
        self.engine.flush()?;
        tracing::info!("Raft driver stopped, data flushed");
        result
    }

    /// A pre-vote for the same next term from a server with a higher id
    /// and the same log as ours, while we stand in a pre-election too, and
    /// could win it ([`Driver::could_win`]).
    fn tied_pre_vote(&self, msg: &Message) -> bool {
        let raft = &self.raw.raft;
        msg.get_msg_type() == MessageType::MsgRequestPreVote
            && raft.state == StateRole::PreCandidate
            && msg.from > self.id
            && msg.term == raft.term + 1
            && msg.log_term == raft.raft_log.last_term()
            && msg.index == raft.raft_log.last_index()
            && self.could_win()
    }

    /// Whether this server could gather a quorum of votes: it is a voter,
    /// and with the voters it heard from within an election timeout it
    /// makes a majority. Dropping a tied pre-vote gains a term only if we
    /// can then win; a server that cannot (cut off from most voters) must
    /// grant it, or it stalls the election that only the other can win.
    fn could_win(&self) -> bool {
        let voters = &self.raw.store().conf_state().voters;
        if !voters.contains(&self.id) {
            return false;
        }
        let now = self.clock.now_ns();
        let window = self.config.tick().as_nanos() as u64 * self.config.raft.election_ticks as u64;
        let heard = voters
            .iter()
            .filter(|&&v| {
                v != self.id
                    && self
                        .last_heard_ns
                        .get(&v)
                        .is_some_and(|&at| now.saturating_sub(at) <= window)
            })
            .count();
        heard + 1 > voters.len() / 2
    }

    fn handle(&mut self, req: Request) {
        if let Request::Propose { cmd, reply } = req {
            let passes = super::disk::passes_floor(&cmd);
            self.to_propose.push((cmd.encode_to_vec(), reply, passes));
            return;
        }
        // Anything else sees the commands received before it proposed.
        self.propose_batch();
        match req {
            Request::Raft(msg) => self.step(*msg),
            Request::Propose { .. } => unreachable!("batched above"),
            Request::Read { reply } => self.reads.push(reply),
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
            Request::RevokeLease { reply } => {
                self.lease.revoke(self.raw.raft.term);
                tracing::info!(term = self.raw.raft.term, "lease revoked");
                self.publish_lease(false, 0);
                let _ = reply.send(Ok(*self.lease_tx.borrow()));
            }
            Request::RestoreLease { reply } => {
                let term = self.raw.raft.term;
                if self.timeout_now_term == term && self.raw.raft.state == StateRole::Leader {
                    // Safety: the transfer's target was told to campaign
                    // (MsgTimeoutNow), and its forced votes skip the
                    // followers' lease check: it may yet win this term's
                    // successor at any moment, lease or not. No lease again
                    // in this term; step down instead, so that the zone
                    // elects a leader (and a lease) anew.
                    tracing::warn!(term, "the transfer's target was told to campaign: stepping down instead of taking the lease back");
                    self.raw.raft.become_follower(term, raft::INVALID_ID);
                } else {
                    self.lease.restore();
                    self.lease_tick();
                }
                let _ = reply.send(Ok(*self.lease_tx.borrow()));
            }
            Request::Removed { index, leader } => self.removed_notice(index, leader),
            Request::Shutdown => self.stopping = true,
        }
    }

    /// Notes the term in which this leader told a transfer's target to
    /// campaign (see `Request::RestoreLease`).
    fn note_timeout_now(&mut self, msgs: &[Message]) {
        if msgs
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgTimeoutNow)
        {
            self.timeout_now_term = self.raw.raft.term;
        }
    }

    /// A message from a peer.
    fn step(&mut self, msg: Message) {
        // Just (re)started, we do not know whether a leader's lease is
        // running that we helped renew: refuse to vote for one election
        // timeout, as a live follower would.
        if self.ticks < self.config.raft.election_ticks as u64
            && matches!(
                msg.get_msg_type(),
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
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
        if let Some(why) = malformed_append(&msg) {
            // raft-rs takes an append's entries as following the entry it
            // names and acknowledges that index plus their count without
            // looking: a malformed one would have this server acknowledge
            // entries it does not hold, counted toward a commit. Dropping a
            // message is always safe in Raft.
            tracing::warn!(
                from = msg.from,
                index = msg.index,
                why,
                "dropping a malformed append"
            );
            return;
        }
        self.last_heard_ns.insert(msg.from, self.clock.now_ns());
        if msg.get_msg_type() == MessageType::MsgAppend {
            self.leader_commit.0 = self.leader_commit.0.max(msg.commit);
        }
        if self.disk.low().is_some()
            && (msg.get_msg_type() == MessageType::MsgSnapshot
                || (msg.get_msg_type() == MessageType::MsgAppend
                    && !msg.entries.iter().all(super::disk::entry_passes_floor)))
        {
            // Below the hard free-space floor: no snapshot and no entry
            // that adds data to write (deletes, compactions and alarms
            // are taken: they make room or say the zone lacks it).
            // Dropping an append is always safe in Raft; the leader sends
            // it again (the others carry the zone meanwhile), and once
            // space is freed this server catches up.
            tracing::debug!(
                from = msg.from,
                "append dropped: the disk is below its floor"
            );
            return;
        }
        if self.tied_pre_vote(&msg) {
            // Two servers that time out together each grant the other's
            // pre-vote, both stand, and the votes split: one more election
            // timeout before anyone leads. So a pre-candidate that could win
            // drops a tied pre-vote from a higher id (losing a message is
            // always safe in Raft) and asks again: that peer, a
            // pre-candidate itself and so with no leader, grants ours.
            tracing::debug!(
                from = msg.from,
                "tied pre-vote from a higher id; standing again"
            );
            if let Err(e) = self.raw.campaign() {
                tracing::debug!(error = %e, "campaign failed");
            }
            return;
        }
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(error = %e, "step failed");
        }
    }

    /// Handles what raft-rs has ready. A second round sends the commit index
    /// that the first one's acknowledgements made final (bounded:
    /// `tell_commit` only moves forward).
    fn ready_rounds(&mut self) -> Result<(), StorageFailure> {
        for _ in 0..2 {
            if !self.raw.has_ready() || self.mismatch.is_some() {
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
    pub(super) fn not_leader(&self) -> Option<NodeError> {
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
        let mut batch = std::mem::take(&mut self.to_propose);
        if let Some(err) = self.not_leader() {
            for (_, reply, _) in batch {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        if let Some((free, floor)) = self.disk.low() {
            // Below the hard floor only what adds no data is written:
            // deletes, compactions, alarms (see `super::disk`).
            let err = NodeError::NoSpace {
                id: self.id,
                free_mib: free >> 20,
                floor_mib: floor >> 20,
            };
            let (pass, refused): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| p.2);
            for (_, reply, _) in refused {
                let _ = reply.send(Err(err.clone()));
            }
            batch = pass;
            if batch.is_empty() {
                return;
            }
        }
        let before = self.raw.raft.raft_log.last_index();
        let n = batch.len() as u64;
        let mut replies = Vec::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        for (data, reply, _) in batch {
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
                // The answers below are matched by index: a step that
                // appended anything else would answer the wrong callers.
                assert_eq!(
                    last,
                    before + n,
                    "a proposal appended other than its entries"
                );
                let term = self.raw.raft.term;
                for (i, reply) in (before + 1..).zip(replies) {
                    self.proposals.push(i, term, Waiter::Command(reply));
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

    /// On the leader, at every tick and whenever it has no lease: starts a
    /// lease round if one is due (see [`LeaseRounds::start`]).
    fn lease_tick(&mut self) {
        let raft = &self.raw.raft;
        // No lease before the zone's record is applied here: it is then
        // held by a quorum, whose members run with its timing or stop (see
        // [`zone`]).
        if raft.state != StateRole::Leader
            || !raft.commit_to_current_term()
            || self.zone_id.is_none()
        {
            return;
        }
        let held = self.lease_tx.borrow().held;
        if let Some(ctx) = self
            .lease
            .start(self.clock.now_ns(), self.ticks, raft.term, held)
        {
            self.raw.read_index(ctx);
        }
    }

    /// A quorum answered lease round `round`.
    fn lease_confirmed(&mut self, round: u64) {
        let raft = &self.raw.raft;
        let leader_term = (raft.state == StateRole::Leader).then_some(raft.term);
        let current = *self.lease_tx.borrow();
        if let Some(expires) = self.lease.confirmed(round, leader_term, &current) {
            self.publish_lease(true, expires);
        }
    }

    fn publish_lease(&mut self, held: bool, expires_ns: u64) {
        let leader = self.raw.raft.leader_id;
        self.publish_lease_for(held, expires_ns, leader);
    }

    fn publish_lease_for(&mut self, held: bool, expires_ns: u64, leader_id: u64) {
        let before = *self.lease_tx.borrow();
        let generation = before.generation + 1;
        let m = &*crate::metrics::METRICS;
        if held {
            m.lease_renewals.inc();
        }
        if before.held && self.clock.now_ns() > before.expires_ns {
            // Renewed late, or given up, after it had expired.
            m.lease_lapses.inc();
        }
        // Every held lease comes from a round: it ends a lease after the
        // round was sent.
        let round_sent_ns = if held {
            expires_ns.saturating_sub(self.config.lease().as_nanos() as u64)
        } else {
            0
        };
        self.lease_tx.send_replace(Lease {
            round_sent_ns,
            held,
            term: self.raw.raft.term,
            expires_ns: if held { expires_ns } else { 0 },
            generation,
            leader_id,
            since_ns: self.clock.now_ns(),
        });
    }

    /// One ReadIndex for every read that arrived since the last one.
    fn flush_reads(&mut self) {
        if !self.reads.has_new() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            self.reads.fail_new(NodeError::NoLeader);
            return;
        }
        // raft-rs drops a ReadIndex on a leader that has not yet committed
        // an entry of its term: hold the reads until it has.
        if self.raw.raft.state == StateRole::Leader && !self.raw.raft.commit_to_current_term() {
            return;
        }
        if let Some(ctx) = self.reads.start_batch(self.ticks) {
            self.raw.read_index(ctx);
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
            let msgs = ready.take_messages();
            self.note_timeout_now(&msgs);
            self.transport.send(msgs);
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
            match kv::read_zone(&self.engine)? {
                Some(record) => self.zone_applied(&record),
                None => self.zone_id = None,
            }
            self.took_part = kv::read_took_part(&self.engine)?;
            let _ = self.events_tx.send(Arc::new(Applied::Snapshot(revision)));
            if let Some(members) = kv::read_members(&self.engine)? {
                self.members = members;
                self.transport.set_peers(&self.members);
            }
            self.snapshots_received += 1;
            crate::metrics::METRICS.snapshots_received.inc();
            tracing::info!(index = meta.index, term = meta.term, "installed snapshot");
            self.proposals
                .overtaken_by_snapshot(meta.index, meta.term, &mut done.writes);
            if self.mismatch.is_some() {
                // A server that must not run in this zone stops before it
                // acknowledges the snapshot: a learner's acknowledgement
                // gets it promoted, to a voter that then stops (a zone of
                // three with one such joiner needs three of four). What it
                // would send is dropped, which Raft always tolerates; the
                // snapshot is on disk, and with it the server refuses to
                // start.
                self.complete(done);
                return Ok(());
            }
        }

        // 4. ReadIndex answers: release those already applied. Of lease
        //    rounds, the last answered (the newest) is the one that counts.
        let mut lease_answer = None;
        for rs in ready.take_read_states() {
            match lease::ctx_round(&rs.request_ctx) {
                Some(round) => lease_answer = Some(round),
                None => self.reads.confirmed(&rs.request_ctx, rs.index),
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

        // Evidence for a later `--force-new-zone`: what the leader said was
        // committed, which may lie beyond this log (one small key, written
        // with the batch, only when it moved).
        if self.leader_commit.0 > self.leader_commit.1 {
            self.leader_commit.1 = self.leader_commit.0;
            self.raw
                .store()
                .set_leader_commit(&mut wb, self.leader_commit.0);
        }

        // 7. One write, one fsync, for all of it; then the results.
        let sync = ready.must_sync() || !ready.entries().is_empty();
        if !wb.is_empty() {
            let started = std::time::Instant::now();
            self.engine.write(wb, sync)?;
            if sync {
                crate::metrics::METRICS
                    .wal_fsync
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        self.complete(done);
        if self.mismatch.is_some() {
            // As above: the record is on disk; no vote or acknowledgement
            // from a server with the wrong timing.
            return Ok(());
        }

        // 8. Messages that must follow persistence (votes, append acks).
        if !ready.persisted_messages().is_empty() {
            let msgs = ready.take_persisted_messages();
            self.note_timeout_now(&msgs);
            self.transport.send(msgs);
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
            let msgs = light.take_messages();
            self.note_timeout_now(&msgs);
            self.transport.send(msgs);
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
        // A new leader, not a pre-candidate's "none" (raft-rs forgets the
        // leader while it stands) nor the same one found again.
        if leader_id != 0 && leader_id != self.last_leader {
            if self.last_leader != 0 {
                crate::metrics::METRICS.leader_changes.inc();
            }
            self.last_leader = leader_id;
        }
        if old.leader_id != leader_id || old.term != term {
            self.reads.fail_in_flight(NodeError::LeadershipChanged);
            tracing::info!(leader = leader_id, term, role = ?role, "Raft view changed");
        }
        if role != StateRole::Leader || old.term != term {
            self.lease.forget();
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

    fn local_status(&self) -> LocalStatus {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let cs = store.conf_state();
        let now = self.clock.now_ns();
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
                        self.last_heard_ns
                            .get(id)
                            .map(|t| now.saturating_sub(*t) / 1_000_000)
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
            first_index: store.first(),
            commit: raft.raft_log.committed,
            applied: store.applied(),
            revision: self.reader.revision().unwrap_or(0),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            progress,
            snapshots_received: self.snapshots_received,
            snapshots_built: store.snapshots_built(),
            members: self.members.clone(),
            zone_id: self.zone_id.clone().unwrap_or_default(),
            took_part: self.took_part.iter().copied().collect(),
        }
    }

    fn fail_all(&mut self, err: NodeError) {
        for (_, reply, _) in self.to_propose.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
        self.proposals.fail_all(err.clone());
        self.reads.fail_all(err);
    }
}

/// Why an append cannot be taken as it says, if it cannot: its entries must
/// follow the entry it names, one index after another, in terms that never
/// go down from the named entry's.
fn malformed_append(msg: &Message) -> Option<&'static str> {
    if msg.get_msg_type() != MessageType::MsgAppend {
        return None;
    }
    let (mut index, mut term) = (msg.index, msg.log_term);
    for e in msg.entries.iter() {
        if e.index != index + 1 {
            return Some("entries do not follow the entry named");
        }
        if e.term < term {
            return Some("an entry's term goes down");
        }
        (index, term) = (e.index, e.term);
    }
    None
}
