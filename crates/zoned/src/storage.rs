//! Durable state in one RocksDB database, and raft-rs's `Storage` over it.
//!
//! Column families:
//! - `log`: Raft entries, keyed by index (8 bytes, big-endian);
//! - `raft`: hard state, conf state, the truncated point (index and term of
//!   the last entry removed by compaction or covered by a snapshot) and the
//!   applied index;
//! - `kv`, `history`, `meta`: the state machine (see [`crate::kv`]).
//!
//! Writes are never issued one by one: the Raft driver stages everything a
//! Ready produces (appended entries, hard state, applied entries and the new
//! applied index) into one [`WriteBatch`] and commits it with one fsync, so a
//! crash leaves either all of it or none. The in-memory view kept by
//! [`RaftStorage`] is updated while staging; a failed write is fatal for the
//! process (like a failed WAL write in etcd), so the view never outlives a
//! write that did not happen.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options,
    WriteBatch, WriteOptions, DB,
};

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_RAFT: &str = "raft";
pub(crate) const CF_KV: &str = "kv";
pub(crate) const CF_HISTORY: &str = "history";
pub(crate) const CF_META: &str = "meta";

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_TRUNCATED: &[u8] = b"truncated";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_REMOVED: &[u8] = b"removed";

/// Builds the state machine's part of a snapshot from a RocksDB snapshot.
pub type SnapshotData = fn(&Engine, &rocksdb::Snapshot<'_>) -> Result<Vec<u8>, StorageFailure>;

/// The snapshot last built in the background, and whether one is being built.
#[derive(Debug, Default)]
struct SnapshotSlot {
    building: bool,
    ready: Option<Snapshot>,
    built: u64,
}

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

/// Whether RocksDB's checksums run on the CPU's CRC-32C instructions.
///
/// On x86-64 RocksDB is built for the baseline instruction set, and its
/// CRC-32C chooses at run time (`build-support/rocksdb-cxx`): SSE4.2's
/// crc32 with PCLMULQDQ where the CPU has both, lookup tables elsewhere
/// (QEMU's default `qemu64` and `kvm64` CPU models). This asks the same
/// question of the CPU, to say which one runs.
pub fn hardware_checksums() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sse4.2")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    // Elsewhere RocksDB detects its CRC instructions itself (arm64).
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// Says once, at open, which checksum code the store runs on.
fn log_checksums() {
    if hardware_checksums() {
        tracing::info!("store checksums: CRC-32C in hardware (SSE4.2 and PCLMULQDQ)");
    } else {
        tracing::warn!(
            "store checksums: CRC-32C from lookup tables, this CPU has no SSE4.2 or no \
             PCLMULQDQ (a few percent more CPU per write); on a VM, a CPU type of `host`, \
             or a model with both (x86-64-v2-AES, Westmere or later), gives them"
        );
    }
}

/// The opened database, shared by the Raft driver (the only writer) and the
/// request handlers (readers).
#[derive(Clone)]
pub struct Engine {
    db: Arc<DB>,
    path: PathBuf,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("path", &self.path).finish()
    }
}

impl Engine {
    /// Opens (creating if needed) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Engine, StorageFailure> {
        log_checksums();
        let path = dir.join("db");
        std::fs::create_dir_all(&path).map_err(|source| StorageFailure::CreateDir {
            path: path.clone(),
            source,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        opts.set_max_total_wal_size(256 << 20);
        opts.increase_parallelism(2);

        // The Raft log is written once, read rarely and deleted in ranges:
        // no compression, small blocks are not worth it.
        let mut log_opts = Options::default();
        log_opts.set_compression_type(DBCompressionType::None);
        log_opts.set_write_buffer_size(16 << 20);

        // Small memtables where keys arrive out of order. A skiplist insert
        // that does not follow the previous one searches from the top, and
        // its cost grows with the entries held: the KV family (keys in any
        // order) and the Raft and meta families (the same few keys
        // rewritten every Ready) took an eighth of the leader's Raft thread
        // with 8 and 1 MiB memtables. The log and history families are
        // written in key order and keep larger ones. More memtables may
        // wait for their flush, so that a flush thread starved by a busy
        // host stalls no write.
        let memtables = |o: &mut Options, bytes: usize| {
            o.set_write_buffer_size(bytes);
            o.set_max_write_buffer_number(4);
        };
        let mut kv_opts = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        kv_opts.set_block_based_table_factory(&table);
        kv_opts.set_compression_type(DBCompressionType::Lz4);
        memtables(&mut kv_opts, 2 << 20);
        kv_opts.set_memtable_whole_key_filtering(true);
        kv_opts.set_memtable_prefix_bloom_ratio(0.05);

        let small = || {
            let mut o = Options::default();
            memtables(&mut o, 256 << 10);
            o
        };
        let mut history_opts = Options::default();
        history_opts.set_write_buffer_size(16 << 20);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_RAFT, small()),
            ColumnFamilyDescriptor::new(CF_KV, kv_opts),
            ColumnFamilyDescriptor::new(CF_HISTORY, history_opts),
            ColumnFamilyDescriptor::new(CF_META, small()),
        ];
        let db =
            DB::open_cf_descriptors(&opts, &path, cfs).map_err(|source| StorageFailure::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Engine {
            db: Arc::new(db),
            path,
        })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        // Every family is created at open; a missing one is a programming error.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Commits a batch; with `sync` it is on disk (fsync) when this returns.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageFailure> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(StorageFailure::Write)
    }

    /// Syncs the write-ahead log, for a clean shutdown.
    pub fn flush(&self) -> Result<(), StorageFailure> {
        self.db.flush_wal(true).map_err(StorageFailure::Write)
    }

    pub(crate) fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFailure> {
        self.db
            .get_cf(self.cf(cf), key)
            .map_err(StorageFailure::Read)
    }
}

/// Where a founding member's log starts: its initial configuration stands
/// as if applied from a snapshot at this index and term, identical on every
/// founder. A server that joins later has no log before it, so the leader
/// sends it a snapshot, which carries the configuration and the membership.
pub const BOOTSTRAP_INDEX: u64 = 5;
pub const BOOTSTRAP_TERM: u64 = 5;

/// Writes a founding member's initial Raft state, once.
fn bootstrap(engine: &Engine, voters: &[u64]) -> Result<(), StorageFailure> {
    let mut cs = ConfState::default();
    cs.set_voters(voters.to_vec());
    let hs = HardState {
        term: BOOTSTRAP_TERM,
        vote: 0,
        commit: BOOTSTRAP_INDEX,
        ..Default::default()
    };
    let raft = engine.cf(CF_RAFT);
    let mut wb = WriteBatch::default();
    wb.put_cf(raft, KEY_CONF_STATE, encode_pb(&cs));
    wb.put_cf(raft, KEY_HARD_STATE, encode_pb(&hs));
    wb.put_cf(
        raft,
        KEY_TRUNCATED,
        encode_truncated(BOOTSTRAP_INDEX, BOOTSTRAP_TERM),
    );
    wb.put_cf(raft, KEY_APPLIED, encode_u64(BOOTSTRAP_INDEX));
    engine.write(wb, true)
}

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

pub(crate) fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, StorageFailure> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StorageFailure::Corrupt {
        what: what.to_owned(),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// raft-rs `Storage` over [`Engine`], with the small in-memory view Raft asks
/// for on every step (first and last index, hard and conf state).
#[derive(Debug)]
pub struct RaftStorage {
    engine: Engine,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry no longer in the log.
    truncated: (u64, u64),
    last_index: u64,
    applied: u64,
    snapshot_data: SnapshotData,
    snapshot: Arc<Mutex<SnapshotSlot>>,
    /// The log's tail, as written: raft-rs reads recent entries (to send
    /// appends, to check terms) on every step, and from RocksDB each read
    /// was a memtable search (a third of the Raft thread's time under load).
    cache: EntryCache,
}

/// The newest entries of the log, contiguous, ending at the last index
/// whenever not empty; bounded in count and bytes, oldest dropped first.
#[derive(Debug, Default)]
struct EntryCache {
    entries: std::collections::VecDeque<(Entry, u64)>,
    bytes: u64,
}

/// Bounds of [`EntryCache`].
const CACHE_ENTRIES: usize = 4096;
const CACHE_BYTES: u64 = 32 << 20;

impl EntryCache {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Adds `entries` (contiguous), dropping any cached entry at or after
    /// the first of them.
    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        while let Some((e, size)) = self.entries.back() {
            if e.index < first {
                break;
            }
            self.bytes -= size;
            self.entries.pop_back();
        }
        if self
            .entries
            .back()
            .is_some_and(|(e, _)| e.index + 1 != first)
        {
            self.clear();
        }
        for e in entries {
            let size = u64::from(e.compute_size());
            self.bytes += size;
            self.entries.push_back((e.clone(), size));
        }
        while self.entries.len() > CACHE_ENTRIES
            || (self.bytes > CACHE_BYTES && self.entries.len() > 1)
        {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries before `index`.
    fn compact(&mut self, index: u64) {
        while let Some((e, size)) = self.entries.front() {
            if e.index >= index {
                break;
            }
            self.bytes -= size;
            self.entries.pop_front();
        }
    }

    fn get(&self, index: u64) -> Option<&(Entry, u64)> {
        let first = self.first()?;
        self.entries
            .get(usize::try_from(index.checked_sub(first)?).ok()?)
    }
}

impl RaftStorage {
    /// Loads the Raft state from `engine`. An empty database gets
    /// `initial_voters` as its configuration, identical on every initial
    /// node, so the zone can elect without a bootstrap step.
    pub fn open(
        engine: Engine,
        initial_voters: &[u64],
        snapshot_data: SnapshotData,
    ) -> Result<RaftStorage, StorageFailure> {
        if !initial_voters.is_empty() && !RaftStorage::has_state(&engine)? {
            bootstrap(&engine, initial_voters)?;
        }
        let hard_state = match engine.get(CF_RAFT, KEY_HARD_STATE)? {
            Some(b) => decode_pb(&b, "raft/hard_state")?,
            None => HardState::default(),
        };
        let conf_state = match engine.get(CF_RAFT, KEY_CONF_STATE)? {
            Some(b) => decode_pb(&b, "raft/conf_state")?,
            None => ConfState::default(),
        };
        let truncated = decode_truncated(engine.get(CF_RAFT, KEY_TRUNCATED)?)?;
        let applied = match engine.get(CF_RAFT, KEY_APPLIED)? {
            Some(b) => decode_u64(&b, "raft/applied")?,
            None => truncated.0,
        };
        let last_index = {
            let mut it = engine.db().raw_iterator_cf(engine.cf(CF_LOG));
            it.seek_to_last();
            let last = match it.key() {
                Some(k) => decode_u64(k, "log key")?,
                None => truncated.0,
            };
            it.status().map_err(StorageFailure::Read)?;
            last.max(truncated.0)
        };
        Ok(RaftStorage {
            engine,
            hard_state,
            conf_state,
            truncated,
            last_index,
            applied,
            snapshot_data,
            snapshot: Arc::default(),
            cache: EntryCache::default(),
        })
    }

    /// True once the database holds Raft state: it is not a blank server.
    pub fn has_state(engine: &Engine) -> Result<bool, StorageFailure> {
        Ok(engine.get(CF_RAFT, KEY_HARD_STATE)?.is_some()
            || engine.get(CF_RAFT, KEY_CONF_STATE)?.is_some())
    }

    /// The entry index at which this server learned it was removed, if it was.
    pub fn removed(engine: &Engine) -> Result<Option<u64>, StorageFailure> {
        engine
            .get(CF_RAFT, KEY_REMOVED)?
            .map(|b| decode_u64(&b, "raft/removed"))
            .transpose()
    }

    pub fn set_removed(&mut self, wb: &mut WriteBatch, index: u64) {
        wb.put_cf(self.engine.cf(CF_RAFT), KEY_REMOVED, encode_u64(index));
    }

    /// Snapshots built by this server since it started.
    pub fn snapshots_built(&self) -> u64 {
        self.snapshot.lock().map(|s| s.built).unwrap_or(0)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn first(&self) -> u64 {
        self.truncated.0 + 1
    }

    pub fn last(&self) -> u64 {
        self.last_index
    }

    pub fn truncated(&self) -> (u64, u64) {
        self.truncated
    }

    /// Stages `entries` at their indexes, replacing any conflicting tail.
    pub fn append(&mut self, wb: &mut WriteBatch, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(
            first.index > self.truncated.0,
            "append at {} overwrites compacted log (truncated at {})",
            first.index,
            self.truncated.0
        );
        assert!(
            first.index <= self.last_index + 1,
            "append at {} leaves a gap after {}",
            first.index,
            self.last_index
        );
        let cf = self.engine.cf(CF_LOG);
        for e in entries {
            wb.put_cf(cf, index_key(e.index), encode_pb(e));
        }
        self.cache.append(entries);
        let new_last = entries.last().map_or(self.last_index, |e| e.index);
        if new_last < self.last_index {
            // A leader overwrote our tail: drop what lies beyond the new end.
            wb.delete_range_cf(cf, index_key(new_last + 1), index_key(self.last_index + 1));
        }
        self.last_index = new_last;
    }

    pub fn set_hard_state(&mut self, wb: &mut WriteBatch, hs: &HardState) {
        wb.put_cf(self.engine.cf(CF_RAFT), KEY_HARD_STATE, encode_pb(hs));
        self.hard_state = hs.clone();
    }

    pub fn set_commit(&mut self, wb: &mut WriteBatch, commit: u64) {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(wb, &hs);
    }

    pub fn set_conf_state(&mut self, wb: &mut WriteBatch, cs: &ConfState) {
        wb.put_cf(self.engine.cf(CF_RAFT), KEY_CONF_STATE, encode_pb(cs));
        self.conf_state = cs.clone();
        // A snapshot built before this change lacks it: a server just added
        // would refuse it (raft-rs rejects a snapshot that does not list it).
        if let Ok(mut slot) = self.snapshot.lock() {
            slot.ready = None;
        }
    }

    pub fn set_applied(&mut self, wb: &mut WriteBatch, applied: u64) {
        wb.put_cf(self.engine.cf(CF_RAFT), KEY_APPLIED, encode_u64(applied));
        self.applied = applied;
    }

    fn set_truncated(&mut self, wb: &mut WriteBatch, index: u64, term: u64) {
        wb.put_cf(
            self.engine.cf(CF_RAFT),
            KEY_TRUNCATED,
            encode_truncated(index, term),
        );
        self.truncated = (index, term);
    }

    /// Stages removal of every entry before `index` (which must be applied).
    pub fn compact(&mut self, wb: &mut WriteBatch, index: u64) -> Result<(), StorageFailure> {
        if index <= self.first() {
            return Ok(());
        }
        assert!(
            index <= self.applied + 1,
            "compact to {index} beyond applied {}",
            self.applied
        );
        let term = raft::Storage::term(self, index - 1).map_err(|e| StorageFailure::Corrupt {
            what: format!("term of entry {}: {e}", index - 1),
        })?;
        wb.delete_range_cf(
            self.engine.cf(CF_LOG),
            index_key(self.first()),
            index_key(index),
        );
        self.set_truncated(wb, index - 1, term);
        self.cache.compact(index);
        Ok(())
    }

    /// Stages the Raft part of installing a snapshot: the whole log goes, the
    /// snapshot point becomes the truncated point and the applied index, the
    /// configuration is the snapshot's. The state machine part is
    /// [`crate::kv::restore`], staged into the same batch by the caller.
    pub fn apply_snapshot_meta(&mut self, wb: &mut WriteBatch, meta: &SnapshotMetadata) {
        wb.delete_range_cf(
            self.engine.cf(CF_LOG),
            index_key(0),
            index_key(self.last_index.max(meta.index) + 1),
        );
        self.cache.clear();
        self.set_truncated(wb, meta.index, meta.term);
        self.last_index = meta.index;
        self.set_conf_state(wb, meta.get_conf_state());
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.set_hard_state(wb, &hs);
        self.set_applied(wb, meta.index);
    }

    fn read_entry(&self, index: u64) -> raft::Result<Entry> {
        match self.engine.get(CF_LOG, &index_key(index)) {
            Ok(Some(b)) => decode_pb(&b, &format!("log entry {index}")).map_err(other),
            Ok(None) => Err(raft::Error::Store(StorageError::Unavailable)),
            Err(e) => Err(other(e)),
        }
    }
}

fn other(e: StorageFailure) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        // A hint only: a large one made every call a fresh mmap of ~128 KiB.
        let mut out = Vec::with_capacity((high - low).min(64) as usize);
        let mut size = 0u64;
        if self.cache.first().is_some_and(|f| f <= low) {
            for index in low..high {
                let Some((e, bytes)) = self.cache.get(index) else {
                    break;
                };
                size += bytes;
                if !out.is_empty() && size > max_size {
                    break;
                }
                out.push(e.clone());
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
        let cf = self.engine.cf(CF_LOG);
        let mut it = self.engine.db().raw_iterator_cf(cf);
        it.seek(index_key(low));
        let mut expect = low;
        while expect < high {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k != index_key(expect) {
                break;
            }
            let e: Entry = decode_pb(v, &format!("log entry {expect}")).map_err(other)?;
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e);
            expect += 1;
            it.next();
        }
        it.status().map_err(|e| other(StorageFailure::Read(e)))?;
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if let Some((e, _)) = self.cache.get(idx) {
            return Ok(e.term);
        }
        Ok(self.read_entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// Hands out the last snapshot built if it is recent enough, else
    /// starts building one in the background and asks Raft to retry: a big
    /// store never stalls the driver (and so writes) while it is read.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut slot = self.snapshot.lock().expect("snapshot slot poisoned");
        if let Some(snap) = &slot.ready {
            let index = snap.get_metadata().index;
            // Usable if it covers what was asked and the log still continues
            // from it (not compacted past it).
            if index >= request_index && index >= self.truncated.0 {
                return Ok(snap.clone());
            }
        }
        if !slot.building {
            slot.building = true;
            let engine = self.engine.clone();
            let data = self.snapshot_data;
            let shared = self.snapshot.clone();
            let spawned = std::thread::Builder::new()
                .name("snapshot".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    let built = build_snapshot(&engine, data);
                    let mut slot = shared.lock().expect("snapshot slot poisoned");
                    slot.building = false;
                    match built {
                        Ok(snap) => {
                            tracing::info!(
                                index = snap.get_metadata().index,
                                bytes = snap.data.len(),
                                ms = started.elapsed().as_millis() as u64,
                                for_peer = to,
                                "snapshot built"
                            );
                            slot.built += 1;
                            slot.ready = Some(snap);
                        }
                        Err(e) => tracing::error!(error = %crate::logging::chain(&e), "snapshot build failed"),
                    }
                });
            if let Err(e) = spawned {
                slot.building = false;
                tracing::error!(error = %e, "cannot start the snapshot thread");
            }
        }
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

/// Reads everything a snapshot needs from one RocksDB snapshot: the applied
/// index and its term, the configuration, and the state machine, all
/// written together by the driver, so they agree with each other.
fn build_snapshot(engine: &Engine, data: SnapshotData) -> Result<Snapshot, StorageFailure> {
    let view = engine.db().snapshot();
    let get = |key: &[u8]| {
        view.get_cf(engine.cf(CF_RAFT), key)
            .map_err(StorageFailure::Read)
    };
    let truncated = decode_truncated(get(KEY_TRUNCATED)?)?;
    let applied = match get(KEY_APPLIED)? {
        Some(b) => decode_u64(&b, "raft/applied")?,
        None => truncated.0,
    };
    let term = if applied == truncated.0 {
        truncated.1
    } else {
        let bytes = view
            .get_cf(engine.cf(CF_LOG), index_key(applied))
            .map_err(StorageFailure::Read)?
            .ok_or_else(|| StorageFailure::Corrupt {
                what: format!("log entry {applied} (the applied index) is missing"),
            })?;
        decode_pb::<Entry>(&bytes, "log entry")?.term
    };
    let conf_state: ConfState = match get(KEY_CONF_STATE)? {
        Some(b) => decode_pb(&b, "raft/conf_state")?,
        None => ConfState::default(),
    };
    let mut snap = Snapshot::default();
    snap.set_data(data(engine, &view)?.into());
    let meta = snap.mut_metadata();
    meta.index = applied;
    meta.term = term;
    meta.set_conf_state(conf_state);
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn no_data(_: &Engine, _: &rocksdb::Snapshot<'_>) -> Result<Vec<u8>, StorageFailure> {
        Ok(b"state".to_vec())
    }

    /// Asks until the background build is done.
    fn snapshot_now(s: &RaftStorage, request: u64) -> Snapshot {
        for _ in 0..500 {
            match s.snapshot(request, 2) {
                Ok(snap) => return snap,
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("snapshot never built");
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("data-{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    /// A blank store (a joining server): its log starts at index 1.
    fn open(dir: &Path) -> RaftStorage {
        RaftStorage::open(Engine::open(dir).unwrap(), &[], no_data).unwrap()
    }

    fn write(s: &mut RaftStorage, f: impl FnOnce(&mut RaftStorage, &mut WriteBatch)) {
        let mut wb = WriteBatch::default();
        f(s, &mut wb);
        s.engine().write(wb, true).unwrap();
    }

    #[test]
    fn fresh_storage_has_the_initial_voters() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStorage::open(Engine::open(dir.path()).unwrap(), &[1, 2, 3], no_data).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(st.hard_state.commit, BOOTSTRAP_INDEX);
        assert_eq!(s.first_index().unwrap(), BOOTSTRAP_INDEX + 1);
        assert_eq!(s.last_index().unwrap(), BOOTSTRAP_INDEX);
        assert_eq!(s.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM);
        assert_eq!(s.applied(), BOOTSTRAP_INDEX);
        // A server that joins later starts blank.
        let blank = tempfile::tempdir().unwrap();
        let j = RaftStorage::open(Engine::open(blank.path()).unwrap(), &[], no_data).unwrap();
        assert!(j.initial_state().unwrap().conf_state.voters.is_empty());
        assert_eq!(j.last_index().unwrap(), 0);
    }

    #[test]
    fn entries_and_hard_state_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path());
            write(&mut s, |s, wb| {
                s.append(
                    wb,
                    &(1..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>(),
                );
                let hs = HardState {
                    term: 3,
                    vote: 2,
                    commit: 7,
                    ..Default::default()
                };
                s.set_hard_state(wb, &hs);
                s.set_applied(wb, 6);
            });
        }
        let s = open(dir.path());
        let st = s.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (3, 2, 7)
        );
        assert_eq!(s.applied(), 6);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.term(9).unwrap(), 2);
        let got = s
            .entries(3, 8, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![3, 4, 5, 6, 7]
        );
        assert_eq!(&got[0].data[..], b"data-3");
        assert!(matches!(
            s.term(11),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
    }

    /// The entry cache answers exactly as RocksDB does: compared with the
    /// same log reopened (empty cache), after appends past the cache's
    /// bound, a conflicting overwrite and a compaction.
    #[test]
    fn the_entry_cache_answers_as_the_disk_does() {
        fn answers(s: &RaftStorage, n: u64, last: u64) -> Vec<String> {
            let mut out = Vec::new();
            for lo in [299, 300, 301, 1000, n - 30, n - 21, n - 20, n - 6, last] {
                for hi in [lo + 1, lo + 2, lo + 40, last + 1, last + 2] {
                    for max in [None, Some(0), Some(100), Some(1000)] {
                        let r = s.entries(lo, hi, max, GetEntriesContext::empty(false));
                        out.push(format!("entries({lo}, {hi}, {max:?}) = {r:?}"));
                    }
                }
                out.push(format!("term({lo}) = {:?}", s.term(lo)));
            }
            out
        }
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let n = CACHE_ENTRIES as u64 + 500;
        write(&mut s, |s, wb| {
            s.append(wb, &(1..=n).map(|i| entry(i, 1)).collect::<Vec<_>>());
            s.set_applied(wb, 1000);
        });
        write(&mut s, |s, wb| {
            s.append(
                wb,
                &(n - 20..=n - 5).map(|i| entry(i, 2)).collect::<Vec<_>>(),
            )
        });
        write(&mut s, |s, wb| s.compact(wb, 300).unwrap());
        let last = s.last_index().unwrap();
        assert_eq!(last, n - 5);
        // The cache holds the newest CACHE_ENTRIES, the overwrite included.
        assert_eq!(s.cache.first(), Some(n - CACHE_ENTRIES as u64 + 1));
        assert_eq!(s.term(n - 5).unwrap(), 2);
        let warm = answers(&s, n, last);
        drop(s);
        let s = open(dir.path());
        assert!(s.cache.first().is_none(), "a reopened log reads RocksDB");
        assert_eq!(warm, answers(&s, n, last));
    }

    #[test]
    fn max_size_limits_but_always_returns_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        write(&mut s, |s, wb| {
            s.append(wb, &(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
        });
        let one = s.entries(1, 6, 1, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(one.len(), 1);
        let size = u64::from(entry(1, 1).compute_size());
        let two = s
            .entries(1, 6, size * 2, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(two.len(), 2);
    }

    #[test]
    fn conflicting_append_truncates_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        write(&mut s, |s, wb| {
            s.append(wb, &(1..=6).map(|i| entry(i, 1)).collect::<Vec<_>>())
        });
        write(&mut s, |s, wb| s.append(wb, &[entry(4, 2)]));
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
    }

    #[test]
    fn compaction_removes_the_prefix_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(dir.path());
            write(&mut s, |s, wb| {
                s.append(wb, &(1..=10).map(|i| entry(i, i)).collect::<Vec<_>>());
                s.set_applied(wb, 8);
            });
            write(&mut s, |s, wb| s.compact(wb, 6).unwrap());
            assert_eq!(s.first_index().unwrap(), 6);
        }
        let s = open(dir.path());
        assert_eq!(s.first_index().unwrap(), 6);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.term(5).unwrap(), 5, "term of the truncated point is kept");
        assert!(matches!(
            s.term(4),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(
            s.entries(5, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            s.entries(6, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            5
        );
        // Nothing of the compacted range is left on disk.
        let left = s
            .engine()
            .db()
            .iterator_cf(s.engine().cf(CF_LOG), rocksdb::IteratorMode::Start)
            .count();
        assert_eq!(left, 5);
    }

    #[test]
    fn snapshot_is_taken_at_applied_and_installed_on_another_store() {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let mut a = open(a_dir.path());
        write(&mut a, |s, wb| {
            s.append(wb, &(1..=10).map(|i| entry(i, 2)).collect::<Vec<_>>());
            let mut cs = ConfState::default();
            cs.set_voters(vec![1, 2, 3]);
            s.set_conf_state(wb, &cs);
            s.set_applied(wb, 9);
        });
        // Built in the background: the first answer is "try again".
        assert!(matches!(
            a.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        let snap = snapshot_now(&a, 0);
        assert_eq!(a.snapshots_built(), 1);
        assert_eq!(snap.get_metadata().index, 9);
        assert_eq!(snap.get_metadata().term, 2);
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        assert_eq!(&snap.data[..], b"state");

        {
            let mut b = open(b_dir.path());
            write(&mut b, |s, wb| s.append(wb, &[entry(1, 1), entry(2, 1)]));
            write(&mut b, |s, wb| {
                s.apply_snapshot_meta(wb, snap.get_metadata())
            });
        }
        let b = open(b_dir.path());
        assert_eq!(b.first_index().unwrap(), 10);
        assert_eq!(b.last_index().unwrap(), 9);
        assert_eq!(b.term(9).unwrap(), 2);
        assert_eq!(b.applied(), 9);
        assert_eq!(b.initial_state().unwrap().hard_state.commit, 9);
        // The old log is gone; appending after the snapshot works.
        let mut b = b;
        write(&mut b, |s, wb| s.append(wb, &[entry(10, 3)]));
        assert_eq!(
            b.entries(10, 11, None, GetEntriesContext::empty(false))
                .unwrap()[0]
                .term,
            3
        );
    }
}
