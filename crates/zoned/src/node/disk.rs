//! The hard free-space floor of the data directory: a quarter of
//! `limits.min_free_disk_mb`.
//!
//! RocksDB that meets a full disk in the middle of a write stops the
//! driver (a storage failure), and the server with it. The space alarm
//! (`crate::space`) comes first: below `min_free_disk_mb` a server raises
//! it and the zone refuses what adds data, while deletes and compaction,
//! which need a little room themselves (a delete records the old value in
//! the history), go on. This floor is the last guard, for a disk filled by
//! something else or faster than the alarm takes effect: below it, the
//! leader refuses every proposal that adds data before proposing it
//! (RESOURCE_EXHAUSTED: nothing was applied, the client may
//! try again later) and a follower takes no such log entries. Nothing
//! already acknowledged is touched, reads go on, and everything resumes by
//! itself once space is freed.

use std::path::PathBuf;

use raft::eraftpb::{Entry, EntryType};
use zone_proto::v1::Command;

/// The hard floor, in bytes, for `limits.min_free_disk_mb`.
pub(crate) fn hard_floor(min_free_disk_mb: u64) -> u64 {
    (min_free_disk_mb << 20) / 4
}

/// Whether a command may be proposed below the hard floor: anything that
/// adds no data (`kv::adds_data`): deletes, which record no values while
/// the alarm stands (`kv::apply`), compactions, alarms, the zone's small
/// records. Puts wait: the Raft log is in order, and a put a follower
/// cannot take holds back everything behind it, so letting the rest
/// through keeps deletes and compactions reaching every server. A delete
/// still writes a tombstone and a history event per key (with the old
/// value when no alarm stands yet): a prefix delete of very many keys
/// below the floor takes room in proportion; the floor leaves a quarter
/// of `min_free_disk_mb` for that.
pub(super) fn passes_floor(cmd: &Command) -> bool {
    cmd.op.as_ref().is_none_or(|op| !crate::kv::adds_data(op))
}

/// Whether a follower below the hard floor takes this log entry: an empty
/// one (a new leader's), a membership change, or a command that passes.
/// An entry that does not decode is taken (the applier reports it).
pub(super) fn entry_passes_floor(e: &Entry) -> bool {
    use prost::Message as _;
    e.get_entry_type() != EntryType::EntryNormal
        || e.data.is_empty()
        || Command::decode(&e.data[..]).map_or(true, |c| passes_floor(&c))
}

/// How often the free space is measured (a statvfs call).
const CHECK_EVERY_NS: u64 = 100_000_000;

#[derive(Debug)]
pub(super) struct DiskFloor {
    path: PathBuf,
    /// Bytes to keep free; 0: no floor.
    min_free: u64,
    checked_ns: Option<u64>,
    /// Free bytes when below the floor.
    low: Option<u64>,
}

impl DiskFloor {
    pub(super) fn new(path: PathBuf, min_free: u64) -> DiskFloor {
        DiskFloor {
            path,
            min_free,
            checked_ns: None,
            low: None,
        }
    }

    /// Measures again if the last measure is older than [`CHECK_EVERY_NS`].
    pub(super) fn refresh(&mut self, now_ns: u64) {
        if self.min_free == 0
            || self
                .checked_ns
                .is_some_and(|t| now_ns.saturating_sub(t) < CHECK_EVERY_NS)
        {
            return;
        }
        self.checked_ns = Some(now_ns);
        match crate::storage::free_bytes(&self.path) {
            Ok(free) => self.observe(free),
            // Not knowing is not a reason to stop the zone: the write
            // itself reports a real failure.
            Err(e) => tracing::debug!(error = %e, path = %self.path.display(), "statvfs failed"),
        }
    }

    /// Takes a measure of the free bytes.
    pub(super) fn observe(&mut self, free: u64) {
        let low = free < self.min_free;
        match (self.low.is_some(), low) {
            (false, true) => tracing::warn!(
                free_mib = free >> 20,
                floor_mib = self.min_free >> 20,
                path = %self.path.display(),
                "the data directory's free space is below its hard floor: refusing every write that adds data until space is freed"
            ),
            (true, false) => tracing::info!(
                free_mib = free >> 20,
                "free space is back above the hard floor"
            ),
            _ => {}
        }
        self.low = low.then_some(free);
    }

    /// Free and floor bytes, when below the floor.
    pub(super) fn low(&self) -> Option<(u64, u64)> {
        self.low.map(|free| (free, self.min_free))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_floor_until_space_is_freed() {
        let mut d = DiskFloor::new("/".into(), 64 << 20);
        d.observe(100 << 20);
        assert_eq!(d.low(), None);
        d.observe(10 << 20);
        assert_eq!(d.low(), Some((10 << 20, 64 << 20)));
        d.observe(64 << 20);
        assert_eq!(d.low(), None);
    }

    #[test]
    fn a_zero_floor_never_measures() {
        let mut d = DiskFloor::new("/nonexistent".into(), 0);
        d.refresh(0);
        assert_eq!(d.checked_ns, None);
        assert_eq!(d.low(), None);
    }

    #[test]
    fn measures_at_most_every_tenth_of_a_second() {
        let mut d = DiskFloor::new(std::env::temp_dir(), 1 << 20);
        d.refresh(1_000);
        assert_eq!(d.checked_ns, Some(1_000));
        d.refresh(50_000_000);
        assert_eq!(d.checked_ns, Some(1_000));
        d.refresh(200_000_000);
        assert_eq!(d.checked_ns, Some(200_000_000));
    }
}
