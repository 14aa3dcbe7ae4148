//! The opened database: column families, options, writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options,
    WriteBatch, WriteOptions, DB,
};

use super::*;

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

/// Free space a physical compaction leaves untouched ([`Engine::compact_all`]).
pub const COMPACTION_SLACK: u64 = 16 << 20;

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
            ColumnFamilyDescriptor::new(CF_SESSIONS, small()),
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

    /// The database's directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The store's size: every column family's SST files and memtables
    /// (what `limits.max_store_mb` bounds).
    pub fn size(&self) -> u64 {
        self.sizes().iter().map(|(_, b)| b).sum()
    }

    /// Bytes per column family: SST files and memtables (for metrics).
    pub fn sizes(&self) -> Vec<(&'static str, u64)> {
        [CF_LOG, CF_RAFT, CF_KV, CF_HISTORY, CF_META, CF_SESSIONS]
            .into_iter()
            .map(|name| {
                let cf = self.cf(name);
                let prop = |p: &str| {
                    self.db
                        .property_int_value_cf(cf, p)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                };
                (
                    name,
                    prop("rocksdb.total-sst-files-size") + prop("rocksdb.size-all-mem-tables"),
                )
            })
            .collect()
    }

    /// Compacts every column family down to its last level now: tombstones
    /// and overwritten values are dropped and their space given back.
    /// Returns the bytes of files left uncompacted for lack of room.
    ///
    /// A compaction writes its output before it deletes its input, so it
    /// needs room itself, and it runs when room is short. Each step keeps
    /// `keep` bytes free (the hard floor) and [`COMPACTION_SLACK`] more: a
    /// family whose files fit is compacted whole; a larger one one file's
    /// key range at a time, each step counted with every file that range
    /// overlaps (an L0 file may span the family) and the files read again
    /// after each step; a step that does not fit is left for RocksDB's own
    /// compactions (said in the log). When the free space cannot be
    /// measured, everything is compacted whole. (The binding reports no
    /// error: a failed compaction leaves the store as it was and shows as
    /// RocksDB's background error.)
    pub fn compact_all(&self, keep: u64) -> u64 {
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::ForceOptimized);
        let room = || match free_bytes(&self.path) {
            Ok(free) => free.saturating_sub(keep).saturating_sub(COMPACTION_SLACK),
            Err(_) => u64::MAX,
        };
        let files_of = |name: &str| -> Vec<rocksdb::LiveFile> {
            let mut v: Vec<_> = self
                .db
                .live_files()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f.column_family_name == name)
                .collect();
            v.sort_by(|a, b| a.start_key.cmp(&b.start_key));
            v
        };
        // Whether two files' key ranges meet (None: unbounded).
        let overlaps = |a: &rocksdb::LiveFile, b: &rocksdb::LiveFile| {
            let before = |end: &Option<Vec<u8>>, start: &Option<Vec<u8>>| match (end, start) {
                (Some(e), Some(s)) => e < s,
                _ => false,
            };
            !before(&a.end_key, &b.start_key) && !before(&b.end_key, &a.start_key)
        };
        // The history first: trimmed by the compaction command, it gives
        // the most room back, for the others. A second pass for what the
        // first had no room for.
        let mut skipped = 0u64;
        for pass in 0..2 {
            if pass == 1 && skipped == 0 {
                break;
            }
            skipped = self.compact_pass(&opts, &room, &files_of, &overlaps, pass == 1);
        }
        skipped
    }

    /// One pass of [`Engine::compact_all`] over every family; the bytes
    /// left uncompacted.
    fn compact_pass(
        &self,
        opts: &rocksdb::CompactOptions,
        room: &dyn Fn() -> u64,
        files_of: &dyn Fn(&str) -> Vec<rocksdb::LiveFile>,
        overlaps: &dyn Fn(&rocksdb::LiveFile, &rocksdb::LiveFile) -> bool,
        last: bool,
    ) -> u64 {
        let mut skipped = 0u64;
        for name in [CF_HISTORY, CF_LOG, CF_KV, CF_SESSIONS, CF_META, CF_RAFT] {
            let cf = self.cf(name);
            let files = files_of(name);
            let total: u64 = files.iter().map(|f| f.size as u64).sum();
            if total <= room() {
                self.db
                    .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, opts);
                continue;
            }
            // One step per file of the list as it was; each step sizes its
            // range against the files as they are now.
            for step in files {
                let now = files_of(name);
                let Some(f) = now.iter().find(|f| f.name == step.name) else {
                    continue; // compacted away by an earlier step
                };
                let need: u64 = now
                    .iter()
                    .filter(|o| overlaps(f, o))
                    .map(|o| o.size as u64)
                    .sum();
                if need > room() {
                    skipped += f.size as u64;
                    if last {
                        tracing::warn!(
                            cf = name,
                            file = %f.name,
                            need_mib = need >> 20,
                            room_mib = room() >> 20,
                            "not enough room to compact this file's range now; RocksDB compacts it later"
                        );
                    }
                    continue;
                }
                self.db.compact_range_cf_opt(
                    cf,
                    f.start_key.as_deref(),
                    f.end_key.as_deref(),
                    opts,
                );
            }
        }
        skipped
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

    /// Counts this server's starts: the number of this one, stored (synced)
    /// before it is returned, so that no two starts share one. Client
    /// writes are numbered per start (see `kv::sessions`).
    pub fn next_incarnation(&self) -> Result<u64, StorageFailure> {
        const KEY: &[u8] = b"incarnation";
        let n = match self.get(CF_RAFT, KEY)? {
            Some(b) => decode_u64(&b, "raft/incarnation")? + 1,
            None => 1,
        };
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cf(CF_RAFT), KEY, encode_u64(n));
        self.write(wb, true)?;
        Ok(n)
    }

    pub(crate) fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFailure> {
        self.db
            .get_cf(self.cf(cf), key)
            .map_err(StorageFailure::Read)
    }
}
