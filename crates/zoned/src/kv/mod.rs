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
//! revision; `meta` holds the current revision, the oldest revision whose
//! history is kept, the membership, the zone's record and the servers that
//! took part; `sessions` the answers of recent client writes, so that
//! none is applied twice (`sessions`).
//!
//! Laid out as: [`Applier`] (with its [`KvCache`]) in `apply`, [`Reader`]
//! in `read`, snapshots and the membership record in `snapshot`; the
//! encodings and scans they share here.
//!
//! [`Reader`] serves reads from a RocksDB snapshot, so one answer is taken
//! at one revision even while the driver keeps applying.

mod apply;
mod backup;
pub mod compactor;
mod read;
pub mod sessions;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use prost::Message as _;
use rocksdb::ReadOptions;
use zone_proto::v1::KeyValue;

use crate::storage::{decode_u64, Engine, StorageFailure, CF_KV};

pub use apply::{adds_data, no_space_message, Applier, KvCache};
pub use backup::{stage_restored_keys, stage_restored_meta};
pub use read::{HistoryError, Reader};
pub use snapshot::{
    read_alarms, read_members, read_took_part, read_zone, restore, snapshot_data, stage_members,
};

const KEY_REVISION: &[u8] = b"revision";
const KEY_HISTORY_FLOOR: &[u8] = b"history_floor";
const KEY_DISABLED: &[u8] = b"disabled";
const KEY_MEMBERS: &[u8] = b"members";
/// The zone's record (`ZoneRecord`), once applied.
const KEY_ZONE: &[u8] = b"zone";
/// The servers known to have taken part (`ServerIds`).
const KEY_TOOK_PART: &[u8] = b"took_part";
/// The space alarms standing (`AlarmsResponse`).
const KEY_ALARMS: &[u8] = b"alarms";

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
