//! Durable state in one RocksDB database, and raft-rs's `Storage` over it.
//!
//! Column families:
//! - `log`: Raft entries, keyed by index (8 bytes, big-endian);
//! - `raft`: hard state, conf state, the truncated point (index and term of
//!   the last entry removed by compaction or covered by a snapshot) and the
//!   applied index;
//! - `kv`, `history`, `meta`: the state machine (see [`crate::kv`]).
//!
//! Laid out as: [`Engine`] (the database, opened) in `engine`, and
//! [`RaftStorage`] (the log, the Raft state, snapshots) in `raft_storage`;
//! the keys and encodings they share here.
//!
//! Writes are never issued one by one: the Raft driver stages everything a
//! Ready produces (appended entries, hard state, applied entries and the new
//! applied index) into one [`WriteBatch`] and commits it with one fsync, so a
//! crash leaves either all of it or none. The in-memory view kept by
//! [`RaftStorage`] is updated while staging; a failed write is fatal for the
//! process (like a failed WAL write in etcd), so the view never outlives a
//! write that did not happen.

mod engine;
mod raft_storage;

use std::path::PathBuf;

use protobuf::Message as PbMessage;

pub use engine::{hardware_checksums, Engine};
pub use raft_storage::{Forced, RaftStorage};

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_RAFT: &str = "raft";
pub(crate) const CF_KV: &str = "kv";
pub(crate) const CF_HISTORY: &str = "history";
pub(crate) const CF_META: &str = "meta";
/// Client sessions: the answers of recent client writes, by origin server
/// (see `kv::sessions`). Replicated state, like `kv`.
pub(crate) const CF_SESSIONS: &str = "sessions";

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_TRUNCATED: &[u8] = b"truncated";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_REMOVED: &[u8] = b"removed";
/// The highest commit index a leader told this server (in its appends),
/// which may lie beyond this server's own log: evidence, for
/// `zoned --force-new-zone`, of entries committed elsewhere.
const KEY_LEADER_COMMIT: &[u8] = b"leader_commit";
/// The last index at which `--force-new-zone` made this server the single
/// voter: with the flag left on its command line after the zone grew
/// again, a restart must not force once more.
const KEY_FORCED: &[u8] = b"forced";

/// Builds the state machine's part of a snapshot from a RocksDB snapshot.
pub type SnapshotData = fn(&Engine, &rocksdb::Snapshot<'_>) -> Result<Vec<u8>, StorageFailure>;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageFailure {
    #[error("cannot open the database in {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot create the data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database write failed")]
    Write(#[source] rocksdb::Error),
    #[error("database read failed")]
    Read(#[source] rocksdb::Error),
    #[error("corrupt record {what}")]
    Corrupt { what: String },
}

/// Where a founding member's log starts: its initial configuration stands
/// as if applied from a snapshot at this index and term, identical on every
/// founder. A server that joins later has no log before it, so the leader
/// sends it a snapshot, which carries the configuration and the membership.
pub const BOOTSTRAP_INDEX: u64 = 5;
pub const BOOTSTRAP_TERM: u64 = 5;

/// Where a founder restored from a backup (`zoned restore`) starts: past a
/// blank founder's point, so that a founder left blank beside restored
/// ones cannot win a restored one's vote (its log is behind) and, led by
/// a restored one, gets the store in a snapshot (the entry it lacks is
/// before the leader's log).
pub const RESTORE_INDEX: u64 = BOOTSTRAP_INDEX + 1;
pub const RESTORE_TERM: u64 = BOOTSTRAP_TERM + 1;

/// The truncated point: index and term, 8 bytes each.
fn encode_truncated(index: u64, term: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&encode_u64(index));
    v[8..].copy_from_slice(&encode_u64(term));
    v
}

fn decode_truncated(bytes: Option<Vec<u8>>) -> Result<(u64, u64), StorageFailure> {
    match bytes {
        Some(b) if b.len() == 16 => Ok((
            decode_u64(&b[..8], "raft/truncated")?,
            decode_u64(&b[8..], "raft/truncated")?,
        )),
        Some(_) => Err(StorageFailure::Corrupt {
            what: "raft/truncated".into(),
        }),
        None => Ok((0, 0)),
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_pb<M: PbMessage>(bytes: &[u8], what: &str) -> Result<M, StorageFailure> {
    M::parse_from_bytes(bytes).map_err(|_| StorageFailure::Corrupt {
        what: what.to_owned(),
    })
}

fn encode_pb<M: PbMessage>(m: &M) -> Vec<u8> {
    m.write_to_bytes()
        .expect("protobuf encoding to memory cannot fail")
}

/// Free bytes on the filesystem holding `path`, for an unprivileged
/// writer (statvfs: available blocks times the fragment size). One measure
/// for the hard floor, the space alarm, the compaction and the metrics.
pub fn free_bytes(path: &std::path::Path) -> Result<u64, nix::Error> {
    nix::sys::statvfs::statvfs(path).map(|st| st.blocks_available() * st.fragment_size())
}

pub(crate) fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, StorageFailure> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StorageFailure::Corrupt {
        what: what.to_owned(),
    })?;
    Ok(u64::from_be_bytes(arr))
}
