//! Committed entries into the store, in the same batch as the new applied
//! index, and the answers they settle once that batch is written.

use std::sync::Arc;

use prost::Message as _;
use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType};
use raft_proto::ConfChangeI;
use rocksdb::WriteBatch;
use zone_proto::v1::{Command, Event};

use super::driver::Driver;
use super::proposals::{Outcome, Settled};
use super::Applied;
use crate::kv::Applier;
use crate::storage::StorageFailure;

/// Answers held until the batch that produced them is on disk.
#[derive(Default)]
pub(super) struct Completions {
    pub(super) writes: Vec<Settled>,
    events: Vec<Event>,
    /// The maintenance flag after the applied commands.
    disabled: Option<bool>,
    /// The space alarms, if the applied commands changed them.
    alarms: Option<Vec<zone_proto::v1::Alarm>>,
    /// A physical compaction applied.
    compact: bool,
}

impl Driver {
    /// Applies `entries` into `wb` and moves the applied index with them.
    /// Durability: the batch holds both, so a crash before it is written
    /// re-applies the entries from the log, and never applies one twice.
    pub(super) fn apply_entries(
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
            self.proposals
                .applied(entry.index, entry.term, outcome, &mut done.writes);
        }
        applier.finish(wb);
        if let Some(record) = applier.founded.take() {
            self.zone_applied(&record);
        }
        if let Some(set) = applier.took_part() {
            self.took_part = set.clone();
        }
        done.events = std::mem::take(&mut applier.events);
        done.disabled = Some(applier.disabled());
        if let Some(alarms) = applier.alarms() {
            done.alarms = Some(alarms.to_vec());
        }
        done.compact |= applier.compacted_physically;
        drop(applier);
        self.kv_cache = cache;
        self.raw.mut_store().set_applied(wb, last);
        Ok(())
    }

    /// After a batch is durable: answers what it settled, wakes watchers and
    /// releases the reads it made applied.
    pub(super) fn complete(&mut self, done: Completions) {
        if let Some(disabled) = done.disabled {
            self.reader.set_disabled(disabled);
        }
        if let Some(alarms) = done.alarms {
            self.reader.set_alarms(alarms);
        }
        if done.compact {
            // After the batch is durable: the history it trimmed is gone
            // from what the compaction reads.
            self.reader.compactor().request();
        }
        for (waiter, outcome) in done.writes {
            waiter.answer(outcome);
        }
        if !done.events.is_empty() {
            let _ = self.events_tx.send(Arc::new(Applied::Events(done.events)));
        }
        self.reads.release(self.raw.store().applied());
    }

    /// Keeps `log_retention` applied entries; the rest go.
    pub(super) fn compact_log(&mut self) -> Result<(), StorageFailure> {
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
}
