//! The replicated state machine: an ordered key-value store with one global
//! revision, a change history for watchers, and snapshots.
//!
//! [`Applier`] applies committed commands into the Raft driver's write
//! batch. It must be deterministic: every server applies the same commands
//! in the same order and must reach the same bytes, so it reads only the
//! store and the batch's own earlier changes (kept in an overlay, since a
//! RocksDB batch cannot be read back), never the clock or local settings
//! other than history retention, which only affects what a watcher on that
//! server can still replay.
//!
//! Layout: `kv` maps a key to its [`KeyValue`] (key field empty); `history`
//! maps `revision (8 bytes) ++ sequence (4 bytes)` to the [`Event`]s of that
//! revision; `meta` holds the current revision and the oldest revision whose
//! history is kept.
//!
//! [`Reader`] serves reads from a RocksDB snapshot, so one answer is taken
//! at one revision even while the driver keeps applying.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prost::Message as _;
use rocksdb::{ReadOptions, WriteBatch};
use zone_proto::v1::{
    command, compare, event::EventType, request_op, response_op, Command, CommandResult, Compare,
    DeleteRequest, DeleteResponse, Event, GetRequest, GetResponse, KeyValue, Member,
    MembersResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    ResponseOp, SetMaintenanceResponse, StoreSnapshot, TxnRequest, TxnResponse,
};

use crate::storage::{decode_u64, encode_u64, Engine, StorageFailure, CF_HISTORY, CF_KV, CF_META};

const KEY_REVISION: &[u8] = b"revision";
const KEY_HISTORY_FLOOR: &[u8] = b"history_floor";
const KEY_DISABLED: &[u8] = b"disabled";
const KEY_MEMBERS: &[u8] = b"members";

/// The message a write gets while the zone is disabled for maintenance.
pub const DISABLED_MESSAGE: &str = "zone disabled for maintenance";

/// History is trimmed in steps of a quarter of the retention, at most this
/// many revisions, not at every write.
const HISTORY_TRIM_STEP: u64 = 1024;

fn history_key(revision: u64, seq: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&revision.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn decode_kv(key: &[u8], bytes: &[u8]) -> Result<KeyValue, StorageFailure> {
    let mut kv = KeyValue::decode(bytes).map_err(|_| StorageFailure::Corrupt {
        what: format!("kv record for key {}", String::from_utf8_lossy(key)),
    })?;
    kv.key = key.to_vec();
    Ok(kv)
}

fn encode_kv(kv: &mut KeyValue) -> Vec<u8> {
    // The key is the RocksDB key; do not store it twice (lent out for the
    // encoding rather than copied: this is on every write's path).
    let key = std::mem::take(&mut kv.key);
    let bytes = kv.encode_to_vec();
    kv.key = key;
    bytes
}

fn read_u64(
    get: impl FnOnce(&[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error>,
    key: &[u8],
    default: u64,
) -> Result<u64, StorageFailure> {
    match get(key).map_err(StorageFailure::Read)? {
        Some(b) => decode_u64(&b, &format!("meta/{}", String::from_utf8_lossy(key))),
        None => Ok(default),
    }
}

/// Merges a sorted store scan with the batch overlay (which wins on equal
/// keys; `None` there means deleted) and returns up to `limit` live pairs
/// under `prefix` (0 = no limit), plus whether more exist.
fn scan_merged(
    store: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StorageFailure>>,
    overlay: &BTreeMap<Vec<u8>, Option<KeyValue>>,
    prefix: &[u8],
    limit: u64,
) -> Result<(Vec<KeyValue>, bool), StorageFailure> {
    let mut store = store.peekable();
    let mut over = overlay
        .range(prefix.to_vec()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .peekable();
    let mut out = Vec::new();
    loop {
        let next: Option<KeyValue> = match (store.peek(), over.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) => {
                return Err(store.next().and_then(Result::err).expect("peeked error"))
            }
            (Some(Ok((sk, _))), Some((ok, _))) if sk.as_slice() >= ok.as_slice() => {
                if sk == *ok {
                    store.next();
                }
                over.next().and_then(|(_, v)| v.clone())
            }
            (Some(Ok(_)), _) => {
                let (k, v) = store.next().expect("peeked").expect("peeked ok");
                Some(decode_kv(&k, &v)?)
            }
            (None, Some(_)) => over.next().and_then(|(_, v)| v.clone()),
        };
        if let Some(kv) = next {
            if limit != 0 && out.len() as u64 == limit {
                return Ok((out, true));
            }
            out.push(kv);
        }
    }
    Ok((out, false))
}

/// A sorted scan of the `kv` family from `prefix`, stopping past it.
fn prefix_scan<'a>(
    engine: &'a Engine,
    prefix: &'a [u8],
    snapshot: Option<&'a rocksdb::Snapshot<'a>>,
) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StorageFailure>> + 'a {
    let mut ro = ReadOptions::default();
    if let Some(s) = snapshot {
        ro.set_snapshot(s);
    }
    let mut it = engine.db().raw_iterator_cf_opt(engine.cf(CF_KV), ro);
    it.seek(prefix);
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match (it.key(), it.value()) {
            (Some(k), Some(v)) if k.starts_with(prefix) => {
                let item = (k.to_vec(), v.to_vec());
                it.next();
                Some(Ok(item))
            }
            _ => {
                done = true;
                it.status().err().map(|e| Err(StorageFailure::Read(e)))
            }
        }
    })
}

/// The records of recently applied keys (or their absence), kept by the
/// Raft driver between batches so that a write need not search RocksDB for
/// the record it replaces (that search took a tenth of the Raft thread's
/// time under load). Valid while every change to the key space goes
/// through an [`Applier`] given this cache; cleared when a snapshot
/// replaces the store. Bounded in bytes: emptied when full.
#[derive(Debug, Default)]
pub struct KvCache {
    map: HashMap<Vec<u8>, Option<KeyValue>>,
    bytes: usize,
    /// The store's meta (revision, history floor, maintenance flag) as the
    /// last applier left it: three reads less per batch.
    meta: Option<Meta>,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    revision: u64,
    floor: u64,
    disabled: bool,
}

/// Bound of [`KvCache`].
const KV_CACHE_BYTES: usize = 32 << 20;

impl KvCache {
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
        self.meta = None;
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
    cache: &'a mut KvCache,
    member_id: u64,
    term: u64,
    watch_history: u64,
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    revision: u64,
    floor: u64,
    disabled: bool,
    dirty_meta: bool,
    /// Events of this batch, in revision order, for live watchers.
    pub events: Vec<Event>,
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
        let meta = match cache.meta {
            Some(m) => m,
            None => {
                let get = |k: &[u8]| engine.db().get_cf(engine.cf(CF_META), k);
                Meta {
                    revision: read_u64(get, KEY_REVISION, 0)?,
                    floor: read_u64(get, KEY_HISTORY_FLOOR, 1)?,
                    disabled: read_u64(get, KEY_DISABLED, 0)? != 0,
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
            dirty_meta: false,
            events: Vec::new(),
        })
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// True while the zone is disabled, as of the commands applied so far.
    pub fn disabled(&self) -> bool {
        self.disabled
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
                    prev_kv: Some(prev.clone()),
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
        cmd: Command,
    ) -> Result<Option<CommandResult>, StorageFailure> {
        use zone_proto::v1::command_result::Result as R;
        let started_at = self.revision;
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
        if self.disabled && cmd.op.is_some() {
            return Ok(Some(CommandResult {
                result: Some(R::FailedPrecondition(DISABLED_MESSAGE.to_owned())),
            }));
        }
        let result = match cmd.op {
            Some(command::Op::Put(p)) => R::Put(self.put(wb, p, started_at)?),
            Some(command::Op::Delete(d)) => R::Delete(self.delete(wb, &d, started_at)?),
            Some(command::Op::Txn(t)) => R::Txn(self.txn(wb, t, started_at)?),
            Some(command::Op::SetMaintenance(_)) | None => return Ok(None),
        };
        Ok(Some(CommandResult {
            result: Some(result),
        }))
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
        self.cache.meta = Some(Meta {
            revision: self.revision,
            floor: self.floor,
            disabled: self.disabled,
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

/// Serialises the whole store as seen by a RocksDB snapshot: every key,
/// the revision, the membership and the maintenance flag.
pub fn snapshot_data(
    engine: &Engine,
    snap: &rocksdb::Snapshot<'_>,
) -> Result<Vec<u8>, StorageFailure> {
    let meta = |k: &[u8]| snap.get_cf(engine.cf(CF_META), k);
    let revision = read_u64(meta, KEY_REVISION, 0)?;
    let disabled = read_u64(meta, KEY_DISABLED, 0)? != 0;
    let members =
        decode_members(meta(KEY_MEMBERS).map_err(StorageFailure::Read)?)?.unwrap_or_default();
    let mut kvs = Vec::new();
    for item in prefix_scan(engine, b"", Some(snap)) {
        let (k, v) = item?;
        kvs.push(decode_kv(&k, &v)?);
    }
    Ok(StoreSnapshot {
        revision,
        kvs,
        members,
        disabled,
    }
    .encode_to_vec())
}

fn decode_members(bytes: Option<Vec<u8>>) -> Result<Option<Vec<Member>>, StorageFailure> {
    match bytes {
        None => Ok(None),
        Some(b) => MembersResponse::decode(&b[..])
            .map(|m| Some(m.members))
            .map_err(|_| StorageFailure::Corrupt {
                what: "meta/members".into(),
            }),
    }
}

/// The replicated membership (addresses and names), if any was recorded.
pub fn read_members(engine: &Engine) -> Result<Option<Vec<Member>>, StorageFailure> {
    decode_members(engine.get(CF_META, KEY_MEMBERS)?)
}

/// Stages the membership, in the batch that applies the change.
pub fn stage_members(engine: &Engine, wb: &mut WriteBatch, members: &[Member]) {
    let bytes = MembersResponse {
        members: members.to_vec(),
    }
    .encode_to_vec();
    wb.put_cf(engine.cf(CF_META), KEY_MEMBERS, bytes);
}

/// Stages replacing the whole store with a snapshot's contents. History
/// before the snapshot is not carried: watchers older than it are told the
/// oldest revision available.
pub fn restore(engine: &Engine, wb: &mut WriteBatch, data: &[u8]) -> Result<u64, StorageFailure> {
    let snap = StoreSnapshot::decode(data).map_err(|_| StorageFailure::Corrupt {
        what: "snapshot data".into(),
    })?;
    let kv = engine.cf(CF_KV);
    for item in prefix_scan(engine, b"", None) {
        let (k, _) = item?;
        wb.delete_cf(kv, k);
    }
    let mut snap = snap;
    for pair in &mut snap.kvs {
        let record = encode_kv(pair);
        wb.put_cf(kv, &pair.key, record);
    }
    wb.delete_range_cf(
        engine.cf(CF_HISTORY),
        history_key(0, 0),
        history_key(u64::MAX, u32::MAX),
    );
    let meta = engine.cf(CF_META);
    wb.put_cf(meta, KEY_REVISION, encode_u64(snap.revision));
    wb.put_cf(meta, KEY_HISTORY_FLOOR, encode_u64(snap.revision + 1));
    wb.put_cf(meta, KEY_DISABLED, encode_u64(u64::from(snap.disabled)));
    stage_members(engine, wb, &snap.members);
    Ok(snap.revision)
}

/// Consistent reads for request handlers.
#[derive(Debug, Clone)]
pub struct Reader {
    engine: Engine,
    /// The maintenance flag, kept by the Raft driver after each write so
    /// that every write request need not read it from RocksDB.
    disabled: Arc<AtomicBool>,
}

impl Reader {
    /// Reads the maintenance flag from the store once.
    pub fn new(engine: Engine) -> Result<Reader, StorageFailure> {
        let reader = Reader {
            engine,
            disabled: Arc::new(AtomicBool::new(false)),
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
        Ok(())
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
    /// first.
    pub fn history(&self, from: u64, to: u64, prefix: &[u8]) -> Result<Vec<Event>, StorageFailure> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        let mut it = self.engine.db().raw_iterator_cf(self.engine.cf(CF_HISTORY));
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

#[cfg(test)]
mod tests {
    use super::*;
    use zone_proto::v1::{command_result, RequestOp, SetMaintenanceRequest};

    fn put(key: &str, value: &str) -> Command {
        Command {
            id: 0,
            op: Some(command::Op::Put(PutRequest {
                key: key.into(),
                value: value.into(),
                prev_kv: true,
            })),
        }
    }

    fn apply_all(engine: &Engine, cmds: &[Command]) -> Vec<Option<CommandResult>> {
        let mut wb = WriteBatch::default();
        let mut cache = KvCache::default();
        let mut a = Applier::new(engine, &mut cache, 1, 1, 100).unwrap();
        let out = cmds
            .iter()
            .map(|c| a.apply(&mut wb, c.clone()).unwrap())
            .collect();
        a.finish(&mut wb);
        engine.write(wb, true).unwrap();
        out
    }

    #[test]
    fn revisions_versions_and_overlay_within_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        apply_all(&engine, &[put("a", "1"), put("a", "2"), put("b", "x")]);
        let r = Reader::new(engine.clone()).unwrap();
        let (kv, rev) = r
            .get(&GetRequest {
                key: b"a".to_vec(),
                serializable: false,
            })
            .unwrap();
        let kv = kv.unwrap();
        assert_eq!(rev, 3);
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
        assert_eq!(kv.value, b"2");
        let events = r.history(1, 3, b"").unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1].prev_kv.as_ref().unwrap().value, b"1");
    }

    /// A cache kept across batches gives the answers and the bytes that
    /// RocksDB alone gives: the same commands, applied in batches with one
    /// warm cache, a cache emptied before every batch, and a cache that
    /// overflows at every other write, leave identical results, stores and
    /// histories.
    #[test]
    fn the_applied_records_cache_changes_nothing() {
        let del = |k: &str, prefix: bool| Command {
            id: 0,
            op: Some(command::Op::Delete(DeleteRequest {
                key: k.into(),
                prefix,
                prev_kv: true,
            })),
        };
        let cas = |k: &str, version: u64, v: &str| Command {
            id: 0,
            op: Some(command::Op::Txn(TxnRequest {
                compare: vec![Compare {
                    key: k.into(),
                    target: compare::Target::Version as i32,
                    op: compare::Op::Equal as i32,
                    target_value: Some(compare::TargetValue::Version(version)),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::Put(PutRequest {
                        key: k.into(),
                        value: v.into(),
                        prev_kv: true,
                    })),
                }],
                failure: vec![],
            })),
        };
        let batches: Vec<Vec<Command>> = (0..12)
            .map(|b| {
                let mut cmds = vec![put(&format!("p/{}", b % 4), &format!("v{b}"))];
                cmds.push(put("a", &format!("a{b}")));
                cmds.push(cas("a", b + 1, &format!("cas{b}")));
                if b % 3 == 2 {
                    cmds.push(del("p/", true));
                }
                if b % 4 == 3 {
                    cmds.push(del("a", false));
                }
                cmds.push(put(&format!("p/{}", (b + 1) % 4), "late"));
                if b == 5 || b == 7 {
                    // Disabled, then enabled again: the commands between
                    // are refused, whatever the cache holds.
                    cmds.insert(
                        1,
                        Command {
                            id: 0,
                            op: Some(command::Op::SetMaintenance(SetMaintenanceRequest {
                                disabled: b == 5,
                            })),
                        },
                    );
                }
                cmds
            })
            .collect();
        let run = |mode: u8| {
            let dir = tempfile::tempdir().unwrap();
            let engine = Engine::open(dir.path()).unwrap();
            let mut cache = KvCache::default();
            let mut results = Vec::new();
            for cmds in &batches {
                if mode == 1 {
                    cache.clear();
                }
                let mut wb = WriteBatch::default();
                // A short history, so that the floor moves too.
                let mut a = Applier::new(&engine, &mut cache, 1, 1, 16).unwrap();
                for c in cmds {
                    results.push(a.apply(&mut wb, c.clone()).unwrap());
                    if mode == 2 {
                        // As if the cache had filled up mid-batch.
                        a.cache.clear();
                    }
                }
                a.finish(&mut wb);
                engine.write(wb, true).unwrap();
            }
            let r = Reader::new(engine.clone()).unwrap();
            let (kvs, _, rev) = r.range(&RangeRequest::default()).unwrap();
            let floor = r.history_floor().unwrap();
            let history = r.history(floor, rev, b"").unwrap();
            (
                results,
                r.disabled(),
                floor,
                kvs,
                rev,
                history,
                !cache.map.is_empty() || mode != 0,
            )
        };
        let warm = run(0);
        assert!(warm.6, "the warm run kept nothing in its cache");
        assert!(warm.4 > 30, "too few revisions: {}", warm.4);
        assert!(warm.2 > 20, "the history floor did not move: {}", warm.2);
        assert!(!warm.1, "the zone was left disabled");
        let refused = warm
            .0
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Some(CommandResult {
                        result: Some(command_result::Result::FailedPrecondition(_))
                    })
                )
            })
            .count();
        assert!(
            refused >= 4,
            "only {refused} commands were refused while disabled"
        );
        for mode in [1, 2] {
            let other = run(mode);
            assert_eq!(warm.0, other.0, "results differ (mode {mode})");
            assert_eq!(warm.3, other.3, "stores differ (mode {mode})");
            assert_eq!(warm.4, other.4, "revisions differ (mode {mode})");
            assert_eq!(warm.5, other.5, "histories differ (mode {mode})");
            assert_eq!(warm.2, other.2, "history floors differ (mode {mode})");
        }
    }

    #[test]
    fn txn_compares_and_deletes_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        apply_all(
            &engine,
            &[put("cfg/a", "1"), put("cfg/b", "2"), put("other", "3")],
        );
        let txn = |compare_rev: u64| Command {
            id: 0,
            op: Some(command::Op::Txn(TxnRequest {
                compare: vec![Compare {
                    key: b"cfg/a".to_vec(),
                    target: compare::Target::ModRevision as i32,
                    op: compare::Op::Equal as i32,
                    target_value: Some(compare::TargetValue::ModRevision(compare_rev)),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::Delete(DeleteRequest {
                        key: b"cfg/".to_vec(),
                        prefix: true,
                        prev_kv: false,
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::Range(RangeRequest {
                        prefix: b"cfg/".to_vec(),
                        ..Default::default()
                    })),
                }],
            })),
        };
        let out = apply_all(&engine, &[txn(7), txn(1)]);
        let unwrap_txn = |r: &Option<CommandResult>| match r.as_ref().unwrap().result.as_ref() {
            Some(zone_proto::v1::command_result::Result::Txn(t)) => t.clone(),
            _ => panic!("not a txn"),
        };
        let failed = unwrap_txn(&out[0]);
        assert!(!failed.succeeded);
        assert_eq!(
            failed.header.unwrap().revision,
            3,
            "a failed compare changes nothing"
        );
        let ok = unwrap_txn(&out[1]);
        assert!(ok.succeeded);
        assert_eq!(
            ok.header.unwrap().revision,
            4,
            "one revision for the whole txn"
        );
        let r = Reader::new(engine).unwrap();
        let (kvs, more, rev) = r.range(&RangeRequest::default()).unwrap();
        assert_eq!((kvs.len(), more, rev), (1, false, 4));
        assert_eq!(r.history(4, 4, b"").unwrap().len(), 2);
    }

    #[test]
    fn range_limit_sets_more() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        apply_all(
            &engine,
            &[put("p/1", ""), put("p/2", ""), put("p/3", ""), put("q", "")],
        );
        let r = Reader::new(engine).unwrap();
        let req = RangeRequest {
            prefix: b"p/".to_vec(),
            limit: 2,
            ..Default::default()
        };
        let (kvs, more, _) = r.range(&req).unwrap();
        assert_eq!(kvs.len(), 2);
        assert!(more);
        let req = RangeRequest {
            prefix: b"p/".to_vec(),
            limit: 3,
            ..Default::default()
        };
        assert!(!r.range(&req).unwrap().1);
    }

    #[test]
    fn history_is_trimmed_and_floor_advances() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let cmds: Vec<_> = (0..1200)
            .map(|i| put(&format!("k{}", i % 7), "v"))
            .collect();
        apply_all(&engine, &cmds);
        let r = Reader::new(engine).unwrap();
        // Retention 100, trimmed in steps of 25: between 100 and 125
        // revisions are kept, and nothing older.
        let floor = r.history_floor().unwrap();
        assert!((1200 - 124..=1200 - 99).contains(&floor), "floor {floor}");
        assert!(r.history(1, floor - 1, b"").unwrap().is_empty());
        assert_eq!(
            r.history(floor, 1200, b"").unwrap().len() as u64,
            1200 - floor + 1
        );
    }

    #[test]
    fn snapshot_round_trip() {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let a = Engine::open(a_dir.path()).unwrap();
        let b = Engine::open(b_dir.path()).unwrap();
        apply_all(&a, &[put("x", "1"), put("y", "2")]);
        apply_all(&b, &[put("stale", "gone")]);
        let data = snapshot_data(&a, &a.db().snapshot()).unwrap();
        let mut wb = WriteBatch::default();
        assert_eq!(restore(&b, &mut wb, &data).unwrap(), 2);
        b.write(wb, true).unwrap();
        let r = Reader::new(b).unwrap();
        let (kvs, _, rev) = r.range(&RangeRequest::default()).unwrap();
        assert_eq!(rev, 2);
        assert_eq!(
            kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
            vec![b"x".to_vec(), b"y".to_vec()]
        );
        assert_eq!(r.history_floor().unwrap(), 3);
    }
}
