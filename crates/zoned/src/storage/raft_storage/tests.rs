//! raft-rs storage's tests: reopen, the entry cache, compaction,
//! snapshots.

use std::path::Path;

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage, StorageError};
use rocksdb::WriteBatch;

use super::*;

fn no_data(_: &Engine, _: &rocksdb::Snapshot<'_>) -> Result<Vec<u8>, StorageFailure> {
    Ok(b"state".to_vec())
}

/// Asks until the background build is done.
fn snapshot_now(s: &RaftStorage, request: u64) -> Snapshot {
    for _ in 0..500 {
        match s.snapshot(request, 2) {
            Ok(snap) => return snap,
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("snapshot never built");
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("data-{index}").into_bytes().into(),
        ..Default::default()
    }
}

/// A blank store (a joining server): its log starts at index 1.
fn open(dir: &Path) -> RaftStorage {
    RaftStorage::open(Engine::open(dir).unwrap(), &[], no_data).unwrap()
}

fn write(s: &mut RaftStorage, f: impl FnOnce(&mut RaftStorage, &mut WriteBatch)) {
    let mut wb = WriteBatch::default();
    f(s, &mut wb);
    s.engine().write(wb, true).unwrap();
}

#[test]
fn fresh_storage_has_the_initial_voters() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStorage::open(Engine::open(dir.path()).unwrap(), &[1, 2, 3], no_data).unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(st.hard_state.commit, BOOTSTRAP_INDEX);
    assert_eq!(s.first_index().unwrap(), BOOTSTRAP_INDEX + 1);
    assert_eq!(s.last_index().unwrap(), BOOTSTRAP_INDEX);
    assert_eq!(s.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM);
    assert_eq!(s.applied(), BOOTSTRAP_INDEX);
    // A server that joins later starts blank.
    let blank = tempfile::tempdir().unwrap();
    let j = RaftStorage::open(Engine::open(blank.path()).unwrap(), &[], no_data).unwrap();
    assert!(j.initial_state().unwrap().conf_state.voters.is_empty());
    assert_eq!(j.last_index().unwrap(), 0);
}

#[test]
fn entries_and_hard_state_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        write(&mut s, |s, wb| {
            s.append(
                wb,
                &(1..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>(),
            );
            let hs = HardState {
                term: 3,
                vote: 2,
                commit: 7,
                ..Default::default()
            };
            s.set_hard_state(wb, &hs);
            s.set_applied(wb, 6);
        });
    }
    let s = open(dir.path());
    let st = s.initial_state().unwrap();
    assert_eq!(
        (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
        (3, 2, 7)
    );
    assert_eq!(s.applied(), 6);
    assert_eq!(s.last_index().unwrap(), 10);
    assert_eq!(s.term(9).unwrap(), 2);
    let got = s
        .entries(3, 8, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(
        got.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![3, 4, 5, 6, 7]
    );
    assert_eq!(&got[0].data[..], b"data-3");
    assert!(matches!(
        s.term(11),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
}

/// The entry cache answers exactly as RocksDB does: compared with the
/// same log reopened (empty cache), after appends past the cache's
/// bound, a conflicting overwrite and a compaction.
#[test]
fn the_entry_cache_answers_as_the_disk_does() {
    fn answers(s: &RaftStorage, n: u64, last: u64) -> Vec<String> {
        let mut out = Vec::new();
        for lo in [299, 300, 301, 1000, n - 30, n - 21, n - 20, n - 6, last] {
            for hi in [lo + 1, lo + 2, lo + 40, last + 1, last + 2] {
                for max in [None, Some(0), Some(100), Some(1000)] {
                    let r = s.entries(lo, hi, max, GetEntriesContext::empty(false));
                    out.push(format!("entries({lo}, {hi}, {max:?}) = {r:?}"));
                }
            }
            out.push(format!("term({lo}) = {:?}", s.term(lo)));
        }
        out
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let n = CACHE_ENTRIES as u64 + 500;
    write(&mut s, |s, wb| {
        s.append(wb, &(1..=n).map(|i| entry(i, 1)).collect::<Vec<_>>());
        s.set_applied(wb, 1000);
    });
    write(&mut s, |s, wb| {
        s.append(
            wb,
            &(n - 20..=n - 5).map(|i| entry(i, 2)).collect::<Vec<_>>(),
        )
    });
    write(&mut s, |s, wb| s.compact(wb, 300).unwrap());
    let last = s.last_index().unwrap();
    assert_eq!(last, n - 5);
    // The cache holds the newest CACHE_ENTRIES, the overwrite included.
    assert_eq!(s.cache.first(), Some(n - CACHE_ENTRIES as u64 + 1));
    assert_eq!(s.term(n - 5).unwrap(), 2);
    let warm = answers(&s, n, last);
    drop(s);
    let s = open(dir.path());
    assert!(s.cache.first().is_none(), "a reopened log reads RocksDB");
    assert_eq!(warm, answers(&s, n, last));
}

#[test]
fn max_size_limits_but_always_returns_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    write(&mut s, |s, wb| {
        s.append(wb, &(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
    });
    let one = s.entries(1, 6, 1, GetEntriesContext::empty(false)).unwrap();
    assert_eq!(one.len(), 1);
    let size = u64::from(entry(1, 1).compute_size());
    let two = s
        .entries(1, 6, size * 2, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(two.len(), 2);
}

#[test]
fn conflicting_append_truncates_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    write(&mut s, |s, wb| {
        s.append(wb, &(1..=6).map(|i| entry(i, 1)).collect::<Vec<_>>())
    });
    write(&mut s, |s, wb| s.append(wb, &[entry(4, 2)]));
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.last_index().unwrap(), 4);
    assert_eq!(s.term(4).unwrap(), 2);
}

#[test]
fn compaction_removes_the_prefix_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        write(&mut s, |s, wb| {
            s.append(wb, &(1..=10).map(|i| entry(i, i)).collect::<Vec<_>>());
            s.set_applied(wb, 8);
        });
        write(&mut s, |s, wb| s.compact(wb, 6).unwrap());
        assert_eq!(s.first_index().unwrap(), 6);
    }
    let s = open(dir.path());
    assert_eq!(s.first_index().unwrap(), 6);
    assert_eq!(s.last_index().unwrap(), 10);
    assert_eq!(s.term(5).unwrap(), 5, "term of the truncated point is kept");
    assert!(matches!(
        s.term(4),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        s.entries(5, 7, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(
        s.entries(6, 11, None, GetEntriesContext::empty(false))
            .unwrap()
            .len(),
        5
    );
    // Nothing of the compacted range is left on disk.
    let left = s
        .engine()
        .db()
        .iterator_cf(s.engine().cf(CF_LOG), rocksdb::IteratorMode::Start)
        .count();
    assert_eq!(left, 5);
}

#[test]
fn snapshot_is_taken_at_applied_and_installed_on_another_store() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let mut a = open(a_dir.path());
    write(&mut a, |s, wb| {
        s.append(wb, &(1..=10).map(|i| entry(i, 2)).collect::<Vec<_>>());
        let mut cs = ConfState::default();
        cs.set_voters(vec![1, 2, 3]);
        s.set_conf_state(wb, &cs);
        s.set_applied(wb, 9);
    });
    // Built in the background: the first answer is "try again".
    assert!(matches!(
        a.snapshot(0, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));
    let snap = snapshot_now(&a, 0);
    assert_eq!(a.snapshots_built(), 1);
    assert_eq!(snap.get_metadata().index, 9);
    assert_eq!(snap.get_metadata().term, 2);
    assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
    assert_eq!(&snap.data[..], b"state");

    {
        let mut b = open(b_dir.path());
        write(&mut b, |s, wb| s.append(wb, &[entry(1, 1), entry(2, 1)]));
        write(&mut b, |s, wb| {
            s.apply_snapshot_meta(wb, snap.get_metadata())
        });
    }
    let b = open(b_dir.path());
    assert_eq!(b.first_index().unwrap(), 10);
    assert_eq!(b.last_index().unwrap(), 9);
    assert_eq!(b.term(9).unwrap(), 2);
    assert_eq!(b.applied(), 9);
    assert_eq!(b.initial_state().unwrap().hard_state.commit, 9);
    // The old log is gone; appending after the snapshot works.
    let mut b = b;
    write(&mut b, |s, wb| s.append(wb, &[entry(10, 3)]));
    assert_eq!(
        b.entries(10, 11, None, GetEntriesContext::empty(false))
            .unwrap()[0]
            .term,
        3
    );
}

/// Holds snapshot builds back while the test holds it.
static BUILD_GATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gated_data(_: &Engine, _: &rocksdb::Snapshot<'_>) -> Result<Vec<u8>, StorageFailure> {
    drop(BUILD_GATE.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(b"state".to_vec())
}

/// Issue 20, defect 8: a snapshot whose build started before a membership
/// change (a learner added) ends with the old configuration. It must not
/// be handed out: the new learner would reject it, and it would be offered
/// again and again. On the old code it was handed out without the learner.
#[test]
fn a_snapshot_built_across_a_membership_change_is_not_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = RaftStorage::open(Engine::open(dir.path()).unwrap(), &[], gated_data).unwrap();
    let voters = |s: &mut RaftStorage, learners: Vec<u64>, applied: u64| {
        write(s, |s, wb| {
            let mut cs = ConfState::default();
            cs.set_voters(vec![1, 2, 3]);
            cs.set_learners(learners);
            s.set_conf_state(wb, &cs);
            s.set_applied(wb, applied);
        })
    };
    write(&mut s, |s, wb| {
        s.append(wb, &(1..=10).map(|i| entry(i, 2)).collect::<Vec<_>>())
    });
    voters(&mut s, vec![], 9);
    let gate = BUILD_GATE.lock().unwrap();
    // The build starts (reading the store as it is) and waits at the gate.
    assert!(s.snapshot(0, 4).is_err());
    std::thread::sleep(std::time::Duration::from_millis(50));
    // Server 4 is added as a learner meanwhile; then the build finishes.
    voters(&mut s, vec![4], 10);
    drop(gate);
    let snap = snapshot_now(&s, 0);
    assert_eq!(
        snap.get_metadata().get_conf_state().learners,
        vec![4],
        "a snapshot without the learner it is for"
    );
    assert_eq!(snap.get_metadata().index, 10);
}

/// `--force-new-zone`'s storage step: the log kept whole and committed to
/// its end, the unapplied membership change voided, this server the only
/// voter, the leader's commit evidence gone; and all of it after a reopen.
#[test]
fn forcing_a_single_voter_keeps_the_log_commits_it_and_voids_pending_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = RaftStorage::open(Engine::open(dir.path()).unwrap(), &[1, 2, 3], no_data).unwrap();
    let mut change = entry(8, 6);
    change.set_entry_type(raft::eraftpb::EntryType::EntryConfChangeV2);
    let entries = [entry(6, 6), entry(7, 6), change, entry(9, 6)];
    write(&mut s, |s, wb| {
        s.append(wb, &entries);
        s.set_commit(wb, 7);
        s.set_applied(wb, 7);
        s.set_leader_commit(wb, 9);
    });
    assert_eq!(RaftStorage::leader_commit(s.engine()).unwrap(), 9);
    let forced = s.force_single_voter(2, WriteBatch::default()).unwrap();
    assert_eq!(forced.voters_before, vec![1, 2, 3]);
    assert_eq!((forced.committed_before, forced.last), (7, 9));
    assert_eq!(forced.voided, vec![8]);
    let engine = s.engine().clone();
    drop(s);
    let s = RaftStorage::open(engine, &[], no_data).unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!(st.conf_state.voters, vec![2]);
    assert_eq!(st.hard_state.commit, 9);
    assert_eq!(s.last_index().unwrap(), 9);
    let got = s
        .entries(6, 10, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[2].get_entry_type(),
        raft::eraftpb::EntryType::EntryNormal
    );
    assert!(got[2].data.is_empty(), "the change is voided");
    assert_eq!(got[3].data, entries[3].data, "the rest is kept");
    assert_eq!(RaftStorage::leader_commit(s.engine()).unwrap(), 0);
}
