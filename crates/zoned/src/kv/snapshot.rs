//! The whole store as a snapshot, its restore, and the membership record.

use prost::Message as _;
use rocksdb::WriteBatch;
use std::collections::BTreeSet;

use zone_proto::v1::{
    Alarm, AlarmsResponse, Member, MembersResponse, ServerIds, StoreSnapshot, ZoneRecord,
};

use super::*;
use crate::storage::{encode_u64, Engine, StorageFailure, CF_HISTORY, CF_KV, CF_META};

/// Serialises the whole store as seen by a RocksDB snapshot: every key,
/// the revision, the membership, the maintenance flag and the zone's record.
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
        sessions: sessions::read_all(engine, snap)?,
        zone: decode_zone(meta(KEY_ZONE).map_err(StorageFailure::Read)?)?,
        took_part: decode_took_part(meta(KEY_TOOK_PART).map_err(StorageFailure::Read)?)?
            .into_iter()
            .collect(),
        alarms: decode_alarms(meta(KEY_ALARMS).map_err(StorageFailure::Read)?)?,
    }
    .encode_to_vec())
}

pub(super) fn decode_members(
    bytes: Option<Vec<u8>>,
) -> Result<Option<Vec<Member>>, StorageFailure> {
    match bytes {
        None => Ok(None),
        Some(b) => MembersResponse::decode(&b[..])
            .map(|m| Some(m.members))
            .map_err(|_| StorageFailure::Corrupt {
                what: "meta/members".into(),
            }),
    }
}

pub(super) fn decode_zone(bytes: Option<Vec<u8>>) -> Result<Option<ZoneRecord>, StorageFailure> {
    bytes
        .map(|b| {
            ZoneRecord::decode(&b[..]).map_err(|_| StorageFailure::Corrupt {
                what: "meta/zone".into(),
            })
        })
        .transpose()
}

pub(super) fn decode_alarms(bytes: Option<Vec<u8>>) -> Result<Vec<Alarm>, StorageFailure> {
    match bytes {
        None => Ok(Vec::new()),
        Some(b) => AlarmsResponse::decode(&b[..])
            .map(|a| a.alarms)
            .map_err(|_| StorageFailure::Corrupt {
                what: "meta/alarms".into(),
            }),
    }
}

/// The space alarms standing, as this server applied them.
pub fn read_alarms(engine: &Engine) -> Result<Vec<Alarm>, StorageFailure> {
    decode_alarms(engine.get(CF_META, KEY_ALARMS)?)
}

pub(super) fn decode_took_part(bytes: Option<Vec<u8>>) -> Result<BTreeSet<u64>, StorageFailure> {
    match bytes {
        None => Ok(BTreeSet::new()),
        Some(b) => ServerIds::decode(&b[..])
            .map(|s| s.ids.into_iter().collect())
            .map_err(|_| StorageFailure::Corrupt {
                what: "meta/took_part".into(),
            }),
    }
}

pub(super) fn stage_took_part(engine: &Engine, wb: &mut WriteBatch, ids: &BTreeSet<u64>) {
    let bytes = ServerIds {
        ids: ids.iter().copied().collect(),
    }
    .encode_to_vec();
    wb.put_cf(engine.cf(CF_META), KEY_TOOK_PART, bytes);
}

/// The servers this store records as having taken part in the zone.
pub fn read_took_part(engine: &Engine) -> Result<BTreeSet<u64>, StorageFailure> {
    decode_took_part(engine.get(CF_META, KEY_TOOK_PART)?)
}

/// The zone's record, once one was applied on this server.
pub fn read_zone(engine: &Engine) -> Result<Option<ZoneRecord>, StorageFailure> {
    decode_zone(engine.get(CF_META, KEY_ZONE)?)
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
    match &snap.zone {
        Some(zone) => wb.put_cf(meta, KEY_ZONE, zone.encode_to_vec()),
        None => wb.delete_cf(meta, KEY_ZONE),
    }
    stage_took_part(engine, wb, &snap.took_part.iter().copied().collect());
    wb.put_cf(
        meta,
        KEY_ALARMS,
        AlarmsResponse {
            alarms: snap.alarms.clone(),
        }
        .encode_to_vec(),
    );
    sessions::restore(engine, wb, &snap.sessions);
    Ok(snap.revision)
}
