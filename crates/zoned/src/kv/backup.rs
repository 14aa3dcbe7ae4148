//! The store streamed for a backup file (`Cluster.Backup`, `zonectl
//! snapshot save`; the file's format is `zone_backup`'s).

use zone_backup::{Sealer, BATCH_BYTES, FORMAT};
use zone_proto::v1::{backup_chunk::Part, BackupBatch, BackupChunk, BackupHeader};

use super::snapshot::{decode_members, decode_zone};
use super::*;
use crate::storage::{encode_u64, StorageFailure, CF_META};
use zone_proto::v1::Member;

impl Reader {
    /// Streams the whole store as one RocksDB snapshot sees it: the header
    /// (the key count from a first pass over the same snapshot), the keys
    /// in key order in batches of about [`BATCH_BYTES`], the trailer with
    /// the checksum of every frame before it. `send` returns false once the
    /// receiver is gone, and the scan stops there. Blocks: run it off the
    /// runtime.
    pub fn backup(
        &self,
        server_id: u64,
        taken_unix_ms: i64,
        mut send: impl FnMut(BackupChunk) -> bool,
    ) -> Result<(), StorageFailure> {
        let engine = &self.engine;
        let snap = engine.db().snapshot();
        let meta = |k: &[u8]| snap.get_cf(engine.cf(CF_META), k);
        let revision = read_u64(meta, KEY_REVISION, 0)?;
        let disabled = read_u64(meta, KEY_DISABLED, 0)? != 0;
        let members =
            decode_members(meta(KEY_MEMBERS).map_err(StorageFailure::Read)?)?.unwrap_or_default();
        let zone = decode_zone(meta(KEY_ZONE).map_err(StorageFailure::Read)?)?;
        let mut key_count = 0;
        for item in prefix_scan(engine, b"", Some(&snap)) {
            item?;
            key_count += 1;
        }
        let header = BackupChunk {
            part: Some(Part::Header(BackupHeader {
                format: FORMAT,
                zone_id: zone.map(|z| z.id).unwrap_or_default(),
                revision,
                key_count,
                server_id,
                taken_unix_ms,
                members,
                disabled,
            })),
        };
        let mut sealer = Sealer::default();
        sealer.add(&header);
        if !send(header) {
            return Ok(());
        }
        let mut kvs = Vec::new();
        let mut size = 0;
        for item in prefix_scan(engine, b"", Some(&snap)) {
            let (k, v) = item?;
            size += k.len() + v.len() + 32;
            kvs.push(decode_kv(&k, &v)?);
            if size >= BATCH_BYTES {
                size = 0;
                if !send(batch(&mut kvs, &mut sealer)) {
                    return Ok(());
                }
            }
        }
        if !kvs.is_empty() && !send(batch(&mut kvs, &mut sealer)) {
            return Ok(());
        }
        send(sealer.trailer());
        Ok(())
    }
}

/// Stages a batch of a backup's keys into a store being restored
/// (`zoned restore`), as they were: create and mod revisions, versions.
pub fn stage_restored_keys(engine: &Engine, wb: &mut rocksdb::WriteBatch, kvs: &[KeyValue]) {
    let cf = engine.cf(CF_KV);
    for kv in kvs {
        let mut kv = kv.clone();
        let record = encode_kv(&mut kv);
        wb.put_cf(cf, &kv.key, record);
    }
}

/// Stages the records of a store restored from a backup taken at
/// `revision`: its revision (history before it is not carried: watchers
/// older than it are told so), the maintenance flag, and the new zone's
/// `members`. No zone record (the new zone's first leader makes one, with
/// a new id), nor the old zone's servers or client sessions.
pub fn stage_restored_meta(
    engine: &Engine,
    wb: &mut rocksdb::WriteBatch,
    revision: u64,
    disabled: bool,
    members: &[Member],
) {
    let meta = engine.cf(CF_META);
    wb.put_cf(meta, KEY_REVISION, encode_u64(revision));
    wb.put_cf(meta, KEY_HISTORY_FLOOR, encode_u64(revision + 1));
    wb.put_cf(meta, KEY_DISABLED, encode_u64(u64::from(disabled)));
    super::snapshot::stage_members(engine, wb, members);
}

/// A batch of the keys in `kvs` (taken), counted in the checksum.
fn batch(kvs: &mut Vec<KeyValue>, sealer: &mut Sealer) -> BackupChunk {
    let batch = BackupChunk {
        part: Some(Part::Batch(BackupBatch {
            kvs: std::mem::take(kvs),
        })),
    };
    sealer.add(&batch);
    batch
}
