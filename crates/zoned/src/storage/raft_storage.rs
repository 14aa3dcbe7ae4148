//! raft-rs's `Storage` over the engine: the log, the Raft state, and
//! snapshots built in the background.

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::WriteBatch;

use super::*;

/// The snapshot last built in the background, and whether one is being built.
#[derive(Debug, Default)]
struct SnapshotSlot {
    building: bool,
    ready: Option<Snapshot>,
    built: u64,
}

/// Writes a founding member's initial Raft state, once.
fn bootstrap(engine: &Engine, voters: &[u64]) -> Result<(), StorageFailure> {
    bootstrap_at(engine, voters, BOOTSTRAP_INDEX, BOOTSTRAP_TERM)
}

/// A founder's initial Raft state at `index` and `term`.
fn bootstrap_at(
    engine: &Engine,
    voters: &[u64],
    index: u64,
    term: u64,
) -> Result<(), StorageFailure> {
    let mut cs = ConfState::default();
    cs.set_voters(voters.to_vec());
    let hs = HardState {
        term,
        vote: 0,
        commit: index,
        ..Default::default()
    };
    let raft = engine.cf(CF_RAFT);
    let mut wb = WriteBatch::default();
    wb.put_cf(raft, KEY_CONF_STATE, encode_pb(&cs));
    wb.put_cf(raft, KEY_HARD_STATE, encode_pb(&hs));
    wb.put_cf(raft, KEY_TRUNCATED, encode_truncated(index, term));
    wb.put_cf(raft, KEY_APPLIED, encode_u64(index));
    engine.write(wb, true)
}

/// What [`RaftStorage::force_single_voter`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forced {
    pub voters_before: Vec<u64>,
    pub learners_before: Vec<u64>,
    /// The commit index this server knew; entries after it, up to `last`,
    /// were made committed.
    pub committed_before: u64,
    pub last: u64,
    /// Membership changes in the log not yet applied, made empty entries.
    pub voided: Vec<u64>,
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

    /// Writes the initial Raft state of a founder restored from a backup
    /// (at [`RESTORE_INDEX`]); the database must hold none.
    pub fn found_restored(engine: &Engine, voters: &[u64]) -> Result<(), StorageFailure> {
        assert!(!RaftStorage::has_state(engine)?, "restore over Raft state");
        bootstrap_at(engine, voters, RESTORE_INDEX, RESTORE_TERM)
    }

    /// The index `--force-new-zone` last forced this server at, if ever.
    pub fn forced(engine: &Engine) -> Result<Option<u64>, StorageFailure> {
        engine
            .get(CF_RAFT, KEY_FORCED)?
            .map(|b| decode_u64(&b, "raft/forced"))
            .transpose()
    }

    /// True once the database holds a configuration (voters or learners):
    /// the server founded the zone or finished joining it. A joiner that
    /// has heard a term but not yet installed its first snapshot has Raft
    /// state and no configuration.
    pub fn has_configuration(engine: &Engine) -> Result<bool, StorageFailure> {
        Ok(match engine.get(CF_RAFT, KEY_CONF_STATE)? {
            Some(b) => {
                let cs: ConfState = decode_pb(&b, "raft/conf_state")?;
                !cs.voters.is_empty() || !cs.learners.is_empty()
            }
            None => false,
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

    /// The highest commit index a leader told this server, as last staged
    /// with [`RaftStorage::set_leader_commit`] (0 if never).
    pub fn leader_commit(engine: &Engine) -> Result<u64, StorageFailure> {
        Ok(engine
            .get(CF_RAFT, KEY_LEADER_COMMIT)?
            .map(|b| decode_u64(&b, "raft/leader_commit"))
            .transpose()?
            .unwrap_or(0))
    }

    pub fn set_leader_commit(&self, wb: &mut WriteBatch, index: u64) {
        wb.put_cf(
            self.engine.cf(CF_RAFT),
            KEY_LEADER_COMMIT,
            encode_u64(index),
        );
    }

    /// Makes this server the single voter of its zone, keeping its log and
    /// store (`zoned --force-new-zone`): every entry in its log counts as
    /// committed (an acknowledged write may be among those whose commit it
    /// had not heard yet, so none is dropped; one never acknowledged may
    /// take effect, as after any failed request); membership changes not
    /// yet applied become empty entries, so the forced configuration is the
    /// one that stands; a joint configuration is left. The caller has
    /// checked that nothing committed elsewhere is missing here.
    /// `wb` holds the caller's part (the membership record), written in
    /// the same batch.
    pub fn force_single_voter(
        &mut self,
        id: u64,
        mut wb: WriteBatch,
    ) -> Result<Forced, StorageFailure> {
        let mut voided = Vec::new();
        for index in self.applied + 1..=self.last_index {
            let mut e = self
                .read_entry(index)
                .map_err(|e| StorageFailure::Corrupt {
                    what: format!("log entry {index}: {e}"),
                })?;
            if e.get_entry_type() != raft::eraftpb::EntryType::EntryNormal {
                e.set_entry_type(raft::eraftpb::EntryType::EntryNormal);
                e.data = Default::default();
                e.context = Default::default();
                wb.put_cf(self.engine.cf(CF_LOG), index_key(index), encode_pb(&e));
                voided.push(index);
            }
        }
        self.cache.clear();
        let before = self.conf_state.clone();
        let mut cs = ConfState::default();
        cs.set_voters(vec![id]);
        self.set_conf_state(&mut wb, &cs);
        let mut hs = self.hard_state.clone();
        let committed_before = hs.commit;
        hs.commit = self.last_index;
        self.set_hard_state(&mut wb, &hs);
        // The old zone's commits are no evidence against this one.
        wb.delete_cf(self.engine.cf(CF_RAFT), KEY_LEADER_COMMIT);
        wb.put_cf(
            self.engine.cf(CF_RAFT),
            KEY_FORCED,
            encode_u64(self.last_index),
        );
        self.engine.write(wb, true)?;
        Ok(Forced {
            voters_before: before.voters.clone(),
            learners_before: before.learners.clone(),
            committed_before,
            last: self.last_index,
            voided,
        })
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
            let meta = snap.get_metadata();
            // Usable if it covers what was asked, the log still continues
            // from it (not compacted past it), and it carries the current
            // configuration: a build that started before a membership
            // change ends with the old one, which a server just added
            // rejects (and is offered again and again).
            if meta.index >= request_index
                && meta.index >= self.truncated.0
                && meta.get_conf_state() == &self.conf_state
            {
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
