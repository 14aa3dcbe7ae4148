//! The Raft node: one driver that owns the `RawNode`, its storage and the
//! state machine, and the handle request handlers use to reach it.
//!
//! Laid out as tikv's raftstore is:
//! - [`handle`]: the cheap, cloneable way in ([`NodeHandle`]);
//! - [`driver`]: the Ready cycle, in the order raft-rs requires, and the
//!   thread that runs it;
//! - `apply`: committed entries into the store, and the answers they settle;
//! - `proposals`, `reads`, [`lease`]: what the driver tracks, as plain
//!   structs with tests of their own;
//! - `membership`: configuration changes, promotion and leadership transfer;
//! - [`zone`]: the zone's record (id and Raft timing) and the servers
//!   that took part;
//! - [`clock`]: the time the driver reads, injected, so that an in-process
//!   zone can run on simulated time.
//!
//! Everything that changes Raft state happens in the driver. It never waits
//! on the network: outgoing messages go to a [`Transport`] that queues them.
//! It waits on the disk once per Ready (one batch, one fsync).
//!
//! A client's write is acknowledged only after its entry is committed and
//! applied and the batch that applied it is written. Proposals are matched
//! to callers by (index, term): an entry applied at a proposal's index with
//! another term means a new leader replaced it, and the caller is told that
//! it was not applied. Linearizable reads batch every waiting caller behind
//! one ReadIndex request and are released once the state machine has
//! applied up to the index the leader confirmed.

mod apply;
pub mod clock;
mod disk;
pub(crate) use disk::hard_floor as disk_hard_floor;
pub mod driver;
pub mod handle;
pub mod lease;
mod membership;
mod proposals;
mod reads;
pub mod zone;

use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::Message;
use raft::{RawNode, StateRole};
use rocksdb::WriteBatch;
use tokio::sync::{broadcast, watch};
use zone_proto::v1::{Event, Member};

use crate::config::Config;
use crate::kv::{self, Reader};
use crate::storage::{Engine, RaftStorage, StorageFailure};

pub use clock::{boottime_ns, Boottime, Clock, ManualClock};
pub use driver::Driver;
pub use handle::{Inbox, NodeHandle, PeerReports};
pub use lease::Lease;

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

/// How a server starts, from what its data directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAs {
    /// It has a configuration (it founded the zone, or joined it): the
    /// stored one wins over the configured voters.
    Member,
    /// It has none and `node.join` is set: it joins through that member,
    /// blank or not. A joiner stopped after it heard the leader's term but
    /// before its first snapshot has Raft state and no configuration; it
    /// must join again, not start as a founder of nothing (whose replies
    /// go nowhere: it never finished joining).
    Joiner,
    /// Blank, without `node.join`: it founds the zone with the voters.
    Founder,
}

/// How the server with `engine`'s data and `config` starts.
pub fn start_as(engine: &Engine, config: &Config) -> Result<StartAs, StorageFailure> {
    if RaftStorage::has_configuration(engine)? {
        Ok(StartAs::Member)
    } else if config.node.join.is_some() {
        Ok(StartAs::Joiner)
    } else if RaftStorage::has_state(engine)? {
        Ok(StartAs::Member)
    } else {
        Ok(StartAs::Founder)
    }
}

/// Why the driver stopped without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    Shutdown,
    /// This server was removed from the zone (at this entry index; 0 when
    /// the leader's notice came before the entry).
    Removed {
        index: u64,
    },
    /// The zone's record, applied here, has another Raft timing than this
    /// server's configuration, or a format level this build cannot read.
    ZoneMismatch(zone::ZoneMismatch),
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
    /// The leader's data directory is below its hard free-space floor:
    /// nothing was proposed.
    #[error("server {id}'s data directory has {free_mib} MiB free, below its hard floor of {floor_mib} MiB (a quarter of limits.min_free_disk_mb): writes that add data are refused until space is freed")]
    NoSpace {
        id: u64,
        free_mib: u64,
        floor_mib: u64,
    },
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
    /// The first index still in the log (entries before it compacted).
    pub first_index: u64,
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
    /// The zone's id, once its record is applied here; else empty.
    pub zone_id: String,
    /// The servers the store records as having taken part in the zone.
    pub took_part: Vec<u64>,
}

/// How long a caller should wait between retries while no leader is known.
pub const RETRY_PAUSE: Duration = Duration::from_millis(50);

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
    #[error(transparent)]
    ZoneMismatch(zone::ZoneMismatch),
}

/// The driver's thread: it yields the driver's fatal error, if it stopped
/// on one.
pub type DriverThread = std::thread::JoinHandle<Result<Stopped, StorageFailure>>;

/// Starts the driver on a thread of its own over an opened engine, on
/// CLOCK_BOOTTIME, ticking every `raft.tick_ms`. Its requests come through
/// `inbox`, to which the transport may already report.
pub fn start(
    config: &Config,
    engine: Engine,
    inbox: Inbox,
    transport: Arc<dyn Transport>,
    bootstrap: Bootstrap,
) -> Result<(NodeHandle, DriverThread), StartError> {
    let clock = Arc::new(Boottime);
    let (handle, driver) = build(config, engine, inbox, transport, bootstrap, clock)?;
    let thread = std::thread::Builder::new()
        .name(format!("raft-{}", config.node.id))
        .spawn(move || driver.run())
        .map_err(StartError::Thread)?;
    Ok((handle, thread))
}

/// Builds the driver over an opened engine without starting it: the caller
/// runs it ([`Driver::run`]) or steps it itself ([`Driver::pump`],
/// [`Driver::tick`], [`Driver::advance`]) on the clock it gives.
/// raft-rs's settings for this server.
fn raft_config(config: &Config, applied: u64) -> raft::Config {
    raft::Config {
        id: config.node.id,
        election_tick: config.raft.election_ticks,
        min_election_tick: config.raft.election_ticks,
        max_election_tick: config.max_election_ticks(),
        heartbeat_tick: config.raft.heartbeat_ticks,
        applied,
        max_size_per_msg: config.raft.max_size_per_msg,
        max_inflight_msgs: config.raft.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        // A new commit index is not sent on its own (an empty append per
        // follower for every batch committed) while later entries are in
        // flight: their appends carry it. `Driver::tell_commit` sends the
        // last one when the pipeline drains.
        skip_bcast_commit: true,
        // Never `batch_append`. In raft-rs 0.7 it merges a new append into
        // one already queued for the same follower if their entries look
        // continuous, and an empty append (a commit notice, index = last)
        // looks continuous with anything: a probe that fell back to an
        // older index then goes out as "after `last`: entries from
        // `next`", the follower finds them all present and acknowledges
        // `last` plus their count, entries it does not have. The leader
        // counts that acknowledgement toward a commit (found by the seeded
        // simulation: a follower acknowledged 202 holding 200). Our
        // proposals already go as one MsgPropose per round, so appends are
        // batched where it matters without it. See `tests::appends_*`.
        batch_append: false,
        ..Default::default()
    }
}

pub fn build(
    config: &Config,
    engine: Engine,
    inbox: Inbox,
    transport: Arc<dyn Transport>,
    bootstrap: Bootstrap,
    clock: Arc<dyn Clock>,
) -> Result<(NodeHandle, Driver), StartError> {
    if let Some(index) = RaftStorage::removed(&engine)? {
        return Err(StartError::Removed { index });
    }
    let (voters, hint): (Vec<u64>, Vec<Member>) = match bootstrap {
        Bootstrap::Voters(m) => (m.iter().map(|m| m.id).collect(), m),
        Bootstrap::Join(m) => (Vec::new(), m),
    };
    // Before the RawNode exists: a server with the wrong timing never
    // answers a vote (see `zone`).
    let zone = kv::read_zone(&engine)?;
    let took_part = kv::read_took_part(&engine)?;
    let leader_commit = RaftStorage::leader_commit(&engine)?;
    if let Some(z) = &zone {
        zone::check(config, z).map_err(StartError::ZoneMismatch)?;
    }
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
    let raft_config = raft_config(config, storage.applied());
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
    let Inbox { tx, rx } = inbox;
    let reader = Reader::new(engine.clone())?;
    let handle = NodeHandle {
        id: config.node.id,
        tx,
        view: view_rx,
        lease: lease_rx,
        events: events_tx.clone(),
        reader: reader.clone(),
    };
    let driver = Driver::new(driver::Parts {
        config: config.clone(),
        raw,
        engine,
        rx,
        transport,
        clock,
        view_tx,
        lease_tx,
        events_tx,
        reader,
        members,
        zone,
        took_part,
        leader_commit,
    });
    Ok((handle, driver))
}

#[cfg(test)]
mod tests;
