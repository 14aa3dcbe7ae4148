//! Consistent reads for request handlers, from RocksDB snapshots.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message as _;
use zone_proto::v1::{Alarm, Event, GetRequest, KeyValue, RangeRequest};

use super::*;
use crate::storage::{Engine, StorageFailure, CF_HISTORY, CF_KV, CF_META};

/// Why history could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Revisions from `from` on are no longer all kept.
    #[error("revision {from} has been compacted; the oldest revision available is {floor}")]
    Trimmed { from: u64, floor: u64 },
    #[error(transparent)]
    Storage(#[from] StorageFailure),
}

/// Consistent reads for request handlers.
#[derive(Debug, Clone)]
pub struct Reader {
    pub(super) engine: Engine,
    /// The maintenance flag, kept by the Raft driver after each write so
    /// that every write request need not read it from RocksDB.
    disabled: Arc<AtomicBool>,
    /// The space alarms standing, kept the same way.
    alarms: Arc<RwLock<Vec<Alarm>>>,
    /// The physical compactions done here, by the revision they were asked at.
    compactor: super::compactor::Compactor,
}

impl Reader {
    /// Reads the maintenance flag from the store once.
    pub fn new(engine: Engine) -> Result<Reader, StorageFailure> {
        let reader = Reader {
            compactor: super::compactor::Compactor::new(engine.clone()),
            engine,
            disabled: Arc::new(AtomicBool::new(false)),
            alarms: Arc::default(),
        };
        reader.reload()?;
        Ok(reader)
    }

    /// Reads the maintenance flag from the store again (after a snapshot
    /// replaced it).
    pub(crate) fn reload(&self) -> Result<(), StorageFailure> {
        let disabled = read_u64(
            |k| self.engine.db().get_cf(self.engine.cf(CF_META), k),
            KEY_DISABLED,
            0,
        )? != 0;
        self.set_disabled(disabled);
        self.set_alarms(super::snapshot::read_alarms(&self.engine)?);
        Ok(())
    }

    /// Sets what [`Reader::alarms`] answers, once the store holds it.
    pub(crate) fn set_alarms(&self, alarms: Vec<Alarm>) {
        *self.alarms.write().unwrap_or_else(|e| e.into_inner()) = alarms;
    }

    /// The space alarms standing, as this server applied them.
    pub fn alarms(&self) -> Vec<Alarm> {
        self.alarms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The refusal a write that adds data gets while a space alarm stands.
    pub fn alarmed(&self) -> Option<String> {
        let alarms = self.alarms.read().unwrap_or_else(|e| e.into_inner());
        alarms
            .first()
            .map(|a| super::no_space_message(a, alarms.len()))
    }

    /// This server's physical compactions (see [`super::compactor`]).
    pub fn compactor(&self) -> &super::compactor::Compactor {
        &self.compactor
    }

    /// Sets the flag [`Reader::disabled`] answers, once the store holds it.
    pub(crate) fn set_disabled(&self, disabled: bool) {
        self.disabled.store(disabled, Ordering::Release);
    }

    pub fn revision(&self) -> Result<u64, StorageFailure> {
        read_u64(
            |k| self.engine.db().get_cf(self.engine.cf(CF_META), k),
            KEY_REVISION,
            0,
        )
    }

    /// True while the zone is disabled for maintenance.
    pub fn disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    /// Oldest revision whose changes a watcher can still replay.
    pub fn history_floor(&self) -> Result<u64, StorageFailure> {
        read_u64(
            |k| self.engine.db().get_cf(self.engine.cf(CF_META), k),
            KEY_HISTORY_FLOOR,
            1,
        )
    }

    /// One key and the revision it was read at.
    pub fn get(&self, req: &GetRequest) -> Result<(Option<KeyValue>, u64), StorageFailure> {
        let snap = self.engine.db().snapshot();
        let revision = read_u64(|k| snap.get_cf(self.engine.cf(CF_META), k), KEY_REVISION, 0)?;
        let kv = match snap.get_cf(self.engine.cf(CF_KV), &req.key) {
            Ok(Some(b)) => Some(decode_kv(&req.key, &b)?),
            Ok(None) => None,
            Err(e) => return Err(StorageFailure::Read(e)),
        };
        Ok((kv, revision))
    }

    /// Keys under a prefix, the `more` flag, and the revision.
    pub fn range(&self, req: &RangeRequest) -> Result<(Vec<KeyValue>, bool, u64), StorageFailure> {
        let snap = self.engine.db().snapshot();
        let revision = read_u64(|k| snap.get_cf(self.engine.cf(CF_META), k), KEY_REVISION, 0)?;
        let (mut kvs, more) = scan_merged(
            prefix_scan(&self.engine, &req.prefix, Some(&snap)),
            &BTreeMap::new(),
            &req.prefix,
            req.limit,
        )?;
        if req.keys_only {
            kvs.iter_mut().for_each(|kv| kv.value.clear());
        }
        Ok((kvs, more, revision))
    }

    /// History events with revision in `from..=to` under `prefix`, oldest
    /// first, all from one RocksDB snapshot. If history before `from` was
    /// trimmed in that snapshot, [`HistoryError::Trimmed`]: never a part of
    /// the range with the trimmed revisions silently missing. (The floor
    /// moves in the same batch that deletes the history below it.)
    pub fn history(&self, from: u64, to: u64, prefix: &[u8]) -> Result<Vec<Event>, HistoryError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        let snap = self.engine.db().snapshot();
        let floor = read_u64(
            |k| snap.get_cf(self.engine.cf(CF_META), k),
            KEY_HISTORY_FLOOR,
            1,
        )?;
        if from < floor {
            return Err(HistoryError::Trimmed { from, floor });
        }
        let mut it = snap.raw_iterator_cf(self.engine.cf(CF_HISTORY));
        it.seek(history_key(from, 0));
        let end = history_key(to.saturating_add(1), 0);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k >= end.as_slice() {
                break;
            }
            let ev = Event::decode(v).map_err(|_| StorageFailure::Corrupt {
                what: "history event".into(),
            })?;
            if ev.kv.as_ref().is_some_and(|kv| kv.key.starts_with(prefix)) {
                out.push(ev);
            }
            it.next();
        }
        it.status().map_err(StorageFailure::Read)?;
        Ok(out)
    }
}
