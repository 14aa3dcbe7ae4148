//! Where managed files live in the zone's key space (the `zone/` prefix is
//! the zone's own). zoned's Config service writes these; zone-sync reads
//! them and reports under `STATUS_PREFIX`.

/// `zone/config/file<path>`: the current version of each file (prost
/// `ManagedFile`).
pub const FILE_PREFIX: &[u8] = b"zone/config/file";
/// `zone/config/hist<path>\0<seq>`: the versions kept, deletions included.
pub const HIST_PREFIX: &[u8] = b"zone/config/hist";
/// `<seq> <total bytes>`, rewritten by every change.
pub const GEN_KEY: &[u8] = b"zone/config/gen";
/// `zone/config/status/<id>`: each server's zone-sync report (JSON).
pub const STATUS_PREFIX: &[u8] = b"zone/config/status/";
/// The roll's lock: `<server id> <unix seconds>` while a server restarts.
pub const ROLL_LOCK: &[u8] = b"zone/config/roll-lock";
