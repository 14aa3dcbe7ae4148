//! Committed commands into one write batch, deterministically.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message as _;
use rocksdb::WriteBatch;
use zone_proto::v1::{
    command, compare, event::EventType, request_op, response_op, Alarm, AlarmsResponse, Command,
    CommandResult, CompactRequest, CompactResponse, Compare, DeleteRequest, DeleteResponse, Event,
    GetResponse, KeyValue, PutRequest, PutResponse, RangeResponse, ResponseHeader, ResponseOp,
    SetMaintenanceResponse, TxnRequest, TxnResponse, ZoneRecord,
};

use super::sessions::{Seen, Sessions};
use super::*;
use crate::storage::{encode_u64, Engine, StorageFailure, CF_HISTORY, CF_KV, CF_META};

/// The records of recently applied keys (or their absence), kept by the
/// Raft driver between batches so that a write need not search RocksDB for
/// the record it replaces (that search took a tenth of the Raft thread's
/// time under load). Valid while every change to the key space goes
/// through an [`Applier`] given this cache; cleared when a snapshot
/// replaces the store. Bounded in bytes: emptied when full.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) map: HashMap<Vec<u8>, Option<KeyValue>>,
    bytes: usize,
    /// The store's meta (revision, history floor, maintenance flag, whether
    /// the zone has its record) as the last applier left it: four reads
    /// less per batch.
    meta: Option<Meta>,
    /// The client sessions read so far.
    pub(super) sessions: Sessions,
}

#[derive(Debug, Clone)]
struct Meta {
    revision: u64,
    floor: u64,
    disabled: bool,
    has_zone: bool,
    alarms: Vec<Alarm>,
}

/// Bound of [`KvCache`].
const KV_CACHE_BYTES: usize = 32 << 20;

impl KvCache {
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
        self.meta = None;
        self.sessions.clear();
    }

    fn insert(&mut self, key: Vec<u8>, kv: Option<KeyValue>) {
        // Key twice (map and record), the value, and the map's overhead.
        let size = |key_len: usize, kv: &Option<KeyValue>| {
            2 * key_len + kv.as_ref().map_or(0, |kv| kv.value.len()) + 96
        };
        let new = size(key.len(), &kv);
        if self.bytes + new > KV_CACHE_BYTES {
            self.map.clear();
            self.bytes = 0;
        }
        let key_len = key.len();
        if let Some(old) = self.map.insert(key, kv) {
            self.bytes = self.bytes.saturating_sub(size(key_len, &old));
        }
        self.bytes += new;
    }
}

/// Applies committed commands into one write batch.
pub struct Applier<'a> {
    engine: &'a Engine,
    pub(super) cache: &'a mut KvCache,
    member_id: u64,
    term: u64,
    watch_history: u64,
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    revision: u64,
    floor: u64,
    disabled: bool,
    has_zone: bool,
    /// The space alarms standing, as of the commands applied so far.
    alarms: Vec<Alarm>,
    /// Set when this batch raised or cleared an alarm.
    alarms_changed: bool,
    /// Whether this batch applied a `physical` compaction.
    pub compacted_physically: bool,
    dirty_meta: bool,
    /// Events of this batch, in revision order, for live watchers.
    pub events: Vec<Event>,
    /// The zone's record, if this batch founded the zone.
    pub founded: Option<ZoneRecord>,
    /// The servers known to have taken part, once read; `changed` when
    /// this batch added to them.
    took_part: Option<BTreeSet<u64>>,
    took_part_changed: bool,
}

impl std::fmt::Debug for Applier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("revision", &self.revision)
            .finish()
    }
}

impl<'a> Applier<'a> {
    pub fn new(
        engine: &'a Engine,
        cache: &'a mut KvCache,
        member_id: u64,
        term: u64,
        watch_history: u64,
    ) -> Result<Applier<'a>, StorageFailure> {
        let meta = match &cache.meta {
            Some(m) => m.clone(),
            None => {
                let get = |k: &[u8]| engine.db().get_cf(engine.cf(CF_META), k);
                Meta {
                    revision: read_u64(get, KEY_REVISION, 0)?,
                    floor: read_u64(get, KEY_HISTORY_FLOOR, 1)?,
                    disabled: read_u64(get, KEY_DISABLED, 0)? != 0,
                    has_zone: get(KEY_ZONE).map_err(StorageFailure::Read)?.is_some(),
                    alarms: super::snapshot::decode_alarms(
                        get(KEY_ALARMS).map_err(StorageFailure::Read)?,
                    )?,
                }
            }
        };
        Ok(Applier {
            engine,
            cache,
            member_id,
            term,
            watch_history,
            overlay: BTreeMap::new(),
            revision: meta.revision,
            floor: meta.floor,
            disabled: meta.disabled,
            has_zone: meta.has_zone,
            alarms: meta.alarms,
            alarms_changed: false,
            compacted_physically: false,
            dirty_meta: false,
            events: Vec::new(),
            founded: None,
            took_part: None,
            took_part_changed: false,
        })
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The servers known to have taken part, if this batch added to them.
    pub fn took_part(&self) -> Option<&BTreeSet<u64>> {
        self.took_part.as_ref().filter(|_| self.took_part_changed)
    }

    /// True while the zone is disabled, as of the commands applied so far.
    pub fn disabled(&self) -> bool {
        self.disabled
    }

    /// The alarms standing, if this batch raised or cleared one.
    pub fn alarms(&self) -> Option<&[Alarm]> {
        self.alarms_changed.then_some(self.alarms.as_slice())
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision: self.revision,
            member_id: self.member_id,
            raft_term: self.term,
        })
    }

    /// The key's record as of the commands applied so far: this batch's
    /// own changes, else the cache, else RocksDB (then cached).
    fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, StorageFailure> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.cache.map.get(key) {
            return Ok(v.clone());
        }
        let kv = match self.engine.db().get_cf(self.engine.cf(CF_KV), key) {
            Ok(Some(b)) => Some(decode_kv(key, &b)?),
            Ok(None) => None,
            Err(e) => return Err(StorageFailure::Read(e)),
        };
        self.cache.insert(key.to_vec(), kv.clone());
        Ok(kv)
    }

    fn range(&self, prefix: &[u8], limit: u64) -> Result<(Vec<KeyValue>, bool), StorageFailure> {
        scan_merged(
            prefix_scan(self.engine, prefix, None),
            &self.overlay,
            prefix,
            limit,
        )
    }

    /// The revision this command's changes carry: one more than before the
    /// command, the same for all changes of one command.
    fn change_revision(&mut self, started_at: u64) -> u64 {
        if self.revision == started_at {
            self.revision += 1;
            self.dirty_meta = true;
        }
        self.revision
    }

    fn record(&mut self, wb: &mut WriteBatch, event: Event) {
        let rev = self.revision;
        let seq = self
            .events
            .iter()
            .rev()
            .take_while(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision == rev))
            .count() as u32;
        wb.put_cf(
            self.engine.cf(CF_HISTORY),
            history_key(rev, seq),
            event.encode_to_vec(),
        );
        self.events.push(event);
    }

    fn put(
        &mut self,
        wb: &mut WriteBatch,
        req: PutRequest,
        started_at: u64,
    ) -> Result<PutResponse, StorageFailure> {
        let prev = self.get(&req.key)?;
        let rev = self.change_revision(started_at);
        let mut kv = KeyValue {
            key: req.key,
            value: req.value,
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(0, |p| p.version) + 1,
        };
        let record = encode_kv(&mut kv);
        wb.put_cf(self.engine.cf(CF_KV), &kv.key, record);
        self.overlay.insert(kv.key.clone(), Some(kv.clone()));
        let prev_kv = if req.prev_kv { prev.clone() } else { None };
        self.record(
            wb,
            Event {
                r#type: EventType::Put as i32,
                kv: Some(kv),
                prev_kv: prev,
            },
        );
        Ok(PutResponse {
            header: self.header(),
            prev_kv,
        })
    }

    fn delete(
        &mut self,
        wb: &mut WriteBatch,
        req: &DeleteRequest,
        started_at: u64,
    ) -> Result<DeleteResponse, StorageFailure> {
        let victims = if req.prefix {
            self.range(&req.key, 0)?.0
        } else {
            self.get(&req.key)?.into_iter().collect()
        };
        // The history keeps the value a delete removes, for watchers that
        // ask for it; while a space alarm stands it does not (the same on
        // every server: the alarms are replicated), so that a delete makes
        // room instead of taking as much again.
        let keep_values = self.alarms.is_empty();
        for prev in &victims {
            let rev = self.change_revision(started_at);
            wb.delete_cf(self.engine.cf(CF_KV), &prev.key);
            self.overlay.insert(prev.key.clone(), None);
            self.record(
                wb,
                Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(KeyValue {
                        key: prev.key.clone(),
                        mod_revision: rev,
                        ..KeyValue::default()
                    }),
                    prev_kv: keep_values.then(|| prev.clone()),
                },
            );
        }
        Ok(DeleteResponse {
            header: self.header(),
            deleted: victims.len() as u64,
            prev_kvs: if req.prev_kv { victims } else { Vec::new() },
        })
    }

    fn compare(&mut self, c: &Compare) -> Result<bool, StorageFailure> {
        let current = self.get(&c.key)?;
        let op = compare::Op::try_from(c.op).unwrap_or(compare::Op::Unspecified);
        let ord = match (&c.target_value, &current) {
            (Some(compare::TargetValue::Value(want)), Some(kv)) => kv.value.cmp(want),
            // A missing key has no value: only NOT_EQUAL holds.
            (Some(compare::TargetValue::Value(_)), None) => return Ok(op == compare::Op::NotEqual),
            (Some(compare::TargetValue::ModRevision(want)), kv) => {
                kv.as_ref().map_or(0, |kv| kv.mod_revision).cmp(want)
            }
            (Some(compare::TargetValue::CreateRevision(want)), kv) => {
                kv.as_ref().map_or(0, |kv| kv.create_revision).cmp(want)
            }
            (Some(compare::TargetValue::Version(want)), kv) => {
                kv.as_ref().map_or(0, |kv| kv.version).cmp(want)
            }
            // Rejected by validation before proposing; deterministic anyway.
            (None, _) => return Ok(false),
        };
        Ok(match op {
            compare::Op::Equal => ord.is_eq(),
            compare::Op::NotEqual => ord.is_ne(),
            compare::Op::Less => ord.is_lt(),
            compare::Op::Greater => ord.is_gt(),
            compare::Op::Unspecified => false,
        })
    }

    fn txn(
        &mut self,
        wb: &mut WriteBatch,
        req: TxnRequest,
        started_at: u64,
    ) -> Result<TxnResponse, StorageFailure> {
        let mut succeeded = true;
        for c in &req.compare {
            if !self.compare(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { req.success } else { req.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match op.request {
                Some(request_op::Request::Put(p)) => {
                    response_op::Response::Put(self.put(wb, p, started_at)?)
                }
                Some(request_op::Request::Delete(d)) => {
                    response_op::Response::Delete(self.delete(wb, &d, started_at)?)
                }
                Some(request_op::Request::Get(g)) => response_op::Response::Get(GetResponse {
                    header: self.header(),
                    kv: self.get(&g.key)?,
                }),
                Some(request_op::Request::Range(r)) => {
                    let (mut kvs, more) = self.range(&r.prefix, r.limit)?;
                    if r.keys_only {
                        kvs.iter_mut().for_each(|kv| kv.value.clear());
                    }
                    response_op::Response::Range(RangeResponse {
                        header: self.header(),
                        kvs,
                        more,
                    })
                }
                None => continue,
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        // Every header in a transaction carries its final revision.
        let header = self.header();
        for r in &mut responses {
            match &mut r.response {
                Some(response_op::Response::Put(x)) => x.header = header,
                Some(response_op::Response::Delete(x)) => x.header = header,
                Some(response_op::Response::Get(x)) => x.header = header,
                Some(response_op::Response::Range(x)) => x.header = header,
                None => {}
            }
        }
        Ok(TxnResponse {
            header,
            succeeded,
            responses,
        })
    }

    /// Applies one committed command. Returns `None` for a command with no
    /// operation (which changes nothing).
    pub fn apply(
        &mut self,
        wb: &mut WriteBatch,
        mut cmd: Command,
    ) -> Result<Option<CommandResult>, StorageFailure> {
        let Some(req) = cmd.request.take() else {
            return self.apply_op(wb, cmd);
        };
        let seen = self
            .cache
            .sessions
            .check(self.engine, &req, self.member_id, self.term)?;
        let answer = match seen {
            Seen::New => {
                let answer = self.apply_op(wb, cmd)?;
                self.cache.sessions.record(&req, answer.as_ref());
                return Ok(answer);
            }
            Seen::Repeat(first) => first,
            Seen::Refused(why) => CommandResult {
                result: Some(zone_proto::v1::command_result::Result::FailedPrecondition(
                    why,
                )),
            },
        };
        self.cache.sessions.record(&req, None);
        Ok(Some(answer))
    }

    /// Applies a command's operation.
    fn apply_op(
        &mut self,
        wb: &mut WriteBatch,
        cmd: Command,
    ) -> Result<Option<CommandResult>, StorageFailure> {
        use zone_proto::v1::command_result::Result as R;
        let started_at = self.revision;
        if let Some(command::Op::FoundZone(zone)) = cmd.op {
            // The first record applied founds the zone; a later one (a
            // second leader's, proposed before it saw the first) changes
            // nothing. Not a change of the key space: no revision, no event.
            if !self.has_zone {
                self.has_zone = true;
                wb.put_cf(self.engine.cf(CF_META), KEY_ZONE, zone.encode_to_vec());
                self.founded = Some(zone);
            }
            return Ok(None);
        }
        if let Some(command::Op::TookPart(ids)) = cmd.op {
            // A set that only grows (see `node::zone`); no revision, no
            // event. Read once per batch, then kept here: a batch cannot
            // be read back.
            let set = match &mut self.took_part {
                Some(set) => set,
                None => self
                    .took_part
                    .insert(super::snapshot::read_took_part(self.engine)?),
            };
            let before = set.len();
            set.extend(ids.ids);
            if set.len() > before {
                super::snapshot::stage_took_part(self.engine, wb, set);
                self.took_part_changed = true;
            }
            return Ok(None);
        }
        if let Some(command::Op::SetMaintenance(m)) = &cmd.op {
            // Not a change of the key space: no revision, no event.
            self.disabled = m.disabled;
            wb.put_cf(
                self.engine.cf(CF_META),
                KEY_DISABLED,
                encode_u64(u64::from(m.disabled)),
            );
            return Ok(Some(CommandResult {
                result: Some(R::SetMaintenance(SetMaintenanceResponse {
                    disabled: m.disabled,
                })),
            }));
        }
        match cmd.op {
            Some(command::Op::RaiseAlarm(alarm)) => return Ok(Some(self.raise_alarm(wb, alarm))),
            Some(command::Op::DisarmAlarm(d)) => return Ok(Some(self.disarm_alarm(wb, d.server))),
            // Compaction frees space: served in maintenance and under an
            // alarm alike.
            Some(command::Op::Compact(c)) => return Ok(Some(self.compact(wb, &c))),
            _ => {}
        }
        if self.disabled && cmd.op.is_some() {
            return Ok(Some(CommandResult {
                result: Some(R::FailedPrecondition(DISABLED_MESSAGE.to_owned())),
            }));
        }
        if let Some(alarm) = self.alarms.first() {
            // Deterministic like every refusal here: every server holds the
            // same alarms at this entry, so every server refuses it.
            if cmd.op.as_ref().is_some_and(adds_data) {
                return Ok(Some(CommandResult {
                    result: Some(R::ResourceExhausted(no_space_message(
                        alarm,
                        self.alarms.len(),
                    ))),
                }));
            }
        }
        let result = match cmd.op {
            Some(command::Op::Put(p)) => R::Put(self.put(wb, p, started_at)?),
            Some(command::Op::Delete(d)) => R::Delete(self.delete(wb, &d, started_at)?),
            Some(command::Op::Txn(t)) => R::Txn(self.txn(wb, t, started_at)?),
            Some(
                command::Op::SetMaintenance(_)
                | command::Op::FoundZone(_)
                | command::Op::TookPart(_)
                | command::Op::RaiseAlarm(_)
                | command::Op::DisarmAlarm(_)
                | command::Op::Compact(_),
            )
            | None => return Ok(None),
        };
        Ok(Some(CommandResult {
            result: Some(result),
        }))
    }

    /// Records a server's alarm, replacing its earlier one. Not a change of
    /// the key space: no revision, no event.
    fn raise_alarm(&mut self, wb: &mut WriteBatch, alarm: Alarm) -> CommandResult {
        match self.alarms.iter_mut().find(|a| a.server == alarm.server) {
            // Fresh figures; the time it was first raised stays.
            Some(a) if a.kind == alarm.kind => {
                *a = Alarm {
                    raised_unix_ms: a.raised_unix_ms,
                    ..alarm
                }
            }
            Some(a) => *a = alarm,
            None => {
                self.alarms.push(alarm);
                self.alarms.sort_by_key(|a| a.server);
            }
        }
        self.stage_alarms(wb)
    }

    /// Clears `server`'s alarm (0: all of them).
    fn disarm_alarm(&mut self, wb: &mut WriteBatch, server: u64) -> CommandResult {
        self.alarms.retain(|a| server != 0 && a.server != server);
        self.stage_alarms(wb)
    }

    fn stage_alarms(&mut self, wb: &mut WriteBatch) -> CommandResult {
        let list = AlarmsResponse {
            alarms: self.alarms.clone(),
        };
        wb.put_cf(self.engine.cf(CF_META), KEY_ALARMS, list.encode_to_vec());
        self.alarms_changed = true;
        CommandResult {
            result: Some(zone_proto::v1::command_result::Result::Alarms(list)),
        }
    }

    /// Drops the history before `c.revision`. The history floor is each
    /// server's own (its retention is a local setting, and watchers are
    /// served only from it): it moves to the revision if it was below, the
    /// same outcome on every server as far as the revision is concerned.
    fn compact(&mut self, wb: &mut WriteBatch, c: &CompactRequest) -> CommandResult {
        use zone_proto::v1::command_result::Result as R;
        // Up to one past the store's revision: all of the history (the
        // events of the last revision hold the values a delete removed).
        if c.revision > self.revision + 1 {
            return CommandResult {
                result: Some(R::FailedPrecondition(format!(
                    "revision {} is ahead of the store's revision {} (at most {}: all of the history); nothing was compacted",
                    c.revision,
                    self.revision,
                    self.revision + 1
                ))),
            };
        }
        if c.revision > self.floor {
            wb.delete_range_cf(
                self.engine.cf(CF_HISTORY),
                history_key(self.floor, 0),
                history_key(c.revision, 0),
            );
            self.floor = c.revision;
            wb.put_cf(
                self.engine.cf(CF_META),
                KEY_HISTORY_FLOOR,
                encode_u64(self.floor),
            );
        }
        self.compacted_physically |= c.physical;
        CommandResult {
            result: Some(R::Compact(CompactResponse {
                header: self.header(),
                // The asked revision, not this server's floor (its own,
                // with its retention): a remembered answer must be the
                // same bytes on every server.
                compacted: c.revision,
                physical_done: false,
            })),
        }
    }

    /// Stages the revision and trims old history; call once per batch,
    /// after the last command.
    pub fn finish(&mut self, wb: &mut WriteBatch) {
        // The batch is written next (or the driver stops): its changes are
        // what RocksDB will hold.
        for (key, kv) in std::mem::take(&mut self.overlay) {
            self.cache.insert(key, kv);
        }
        self.stage_meta(wb);
        self.cache.sessions.stage(self.engine, wb);
        self.cache.meta = Some(Meta {
            revision: self.revision,
            floor: self.floor,
            disabled: self.disabled,
            has_zone: self.has_zone,
            alarms: self.alarms.clone(),
        });
    }

    fn stage_meta(&mut self, wb: &mut WriteBatch) {
        if !self.dirty_meta {
            return;
        }
        let meta = self.engine.cf(CF_META);
        wb.put_cf(meta, KEY_REVISION, encode_u64(self.revision));
        let step = (self.watch_history / 4).clamp(1, HISTORY_TRIM_STEP);
        if self.revision >= self.floor + self.watch_history + step {
            let new_floor = self.revision + 1 - self.watch_history;
            wb.delete_range_cf(
                self.engine.cf(CF_HISTORY),
                history_key(self.floor, 0),
                history_key(new_floor, 0),
            );
            self.floor = new_floor;
            wb.put_cf(meta, KEY_HISTORY_FLOOR, encode_u64(self.floor));
        }
        self.dirty_meta = false;
    }
}

/// Whether a command adds data to the store: refused while a space alarm
/// stands. Deletes, compaction and the zone's own small records do not; a
/// transaction does if either branch puts (which branch runs is known only
/// once it is applied, and a refusal must not depend on it).
pub fn adds_data(op: &command::Op) -> bool {
    match op {
        command::Op::Put(_) => true,
        command::Op::Txn(t) => t
            .success
            .iter()
            .chain(&t.failure)
            .any(|o| matches!(o.request, Some(request_op::Request::Put(_)))),
        command::Op::Delete(_)
        | command::Op::SetMaintenance(_)
        | command::Op::FoundZone(_)
        | command::Op::TookPart(_)
        | command::Op::RaiseAlarm(_)
        | command::Op::DisarmAlarm(_)
        | command::Op::Compact(_) => false,
    }
}

/// Why a write is refused while `alarm` (the first of `count`) stands:
/// names the server, its free space and the limit it crossed.
pub fn no_space_message(alarm: &Alarm, count: usize) -> String {
    use zone_proto::v1::AlarmKind;
    let who = if alarm.name.is_empty() {
        format!("server {}", alarm.server)
    } else {
        format!("server {} ({})", alarm.server, alarm.name)
    };
    let what = match AlarmKind::try_from(alarm.kind) {
        Ok(AlarmKind::StoreQuota) => format!(
            "{who}'s store is {} MiB, over limits.max_store_mb ({} MiB); {} MiB free on its data directory",
            alarm.store_bytes >> 20,
            alarm.limit_bytes >> 20,
            alarm.free_bytes >> 20,
        ),
        _ => format!(
            "{who} has {} MiB free on its data directory, below limits.min_free_disk_mb ({} MiB)",
            alarm.free_bytes >> 20,
            alarm.limit_bytes >> 20,
        ),
    };
    let others = match count {
        0 | 1 => String::new(),
        n => format!(" ({} more alarm{})", n - 1, if n == 2 { "" } else { "s" }),
    };
    format!(
        "space alarm: {what}{others}; writes that add data are refused until it clears (reads, deletes and compaction are served; see zonectl alarm ls)"
    )
}
