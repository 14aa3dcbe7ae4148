//! Where managed files live in the zone's key space (the `zone/` prefix is
//! the zone's own). zoned's Config service writes these; zone-sync reads
//! them and reports under `STATUS_PREFIX`.

use zone_proto::v1::KeyValue;

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

/// The key of the current version of `path`.
pub fn file_key(path: &str) -> Vec<u8> {
    [FILE_PREFIX, path.as_bytes()].concat()
}

/// The prefix of every version kept of `path`.
pub fn hist_prefix(path: &str) -> Vec<u8> {
    [HIST_PREFIX, path.as_bytes(), b"\0"].concat()
}

/// The key of the version of `path` recorded by change `seq`.
pub fn hist_key(path: &str, seq: u64) -> Vec<u8> {
    [hist_prefix(path), format!("{seq:020}").into_bytes()].concat()
}

/// The generation key as read: how many changes were made, how many bytes
/// the files take, and the key's revision (every change compares it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gen {
    pub seq: u64,
    pub total: u64,
    pub mod_revision: u64,
}

impl Gen {
    /// The generation in `kv` (none yet: all zero).
    pub fn read(kv: Option<&KeyValue>) -> Gen {
        let Some(kv) = kv else {
            return Gen::default();
        };
        let text = String::from_utf8_lossy(&kv.value);
        let mut it = text
            .split_whitespace()
            .map(|s| s.parse::<u64>().unwrap_or(0));
        Gen {
            seq: it.next().unwrap_or(0),
            total: it.next().unwrap_or(0),
            mod_revision: kv.mod_revision,
        }
    }

    /// The value of the generation key after a change: `seq` and `total`.
    pub fn value(seq: u64, total: u64) -> Vec<u8> {
        format!("{seq} {total}").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_reads_back_what_a_change_wrote() {
        let kv = KeyValue {
            key: GEN_KEY.to_vec(),
            value: Gen::value(7, 4096),
            mod_revision: 42,
            ..KeyValue::default()
        };
        let gen = Gen::read(Some(&kv));
        assert_eq!(
            gen,
            Gen {
                seq: 7,
                total: 4096,
                mod_revision: 42
            }
        );
        assert_eq!(Gen::read(None), Gen::default());
    }

    #[test]
    fn history_keys_sort_by_change_and_stay_under_their_path() {
        let a = hist_key("/etc/one/a", 9);
        let b = hist_key("/etc/one/a", 10);
        assert!(a < b, "zero-padded");
        assert!(a.starts_with(&hist_prefix("/etc/one/a")));
        // `/etc/one/a` is not a prefix of `/etc/one/ab`'s versions.
        assert!(!hist_key("/etc/one/ab", 1).starts_with(&hist_prefix("/etc/one/a")));
        assert_eq!(file_key("/x"), b"zone/config/file/x");
    }
}
