//! The state machine's tests: applying, reading, history, snapshots.

use rocksdb::WriteBatch;
use zone_proto::v1::{
    command, command_result, compare, request_op, Command, CommandResult, Compare, DeleteRequest,
    GetRequest, PutRequest, RangeRequest, RequestOp, SetMaintenanceRequest, TxnRequest,
};

use super::*;
use crate::storage::Engine;

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
    /// What a run left: its answers, the store and its history.
    struct Outcome {
        results: Vec<Option<CommandResult>>,
        disabled: bool,
        floor: u64,
        kvs: Vec<zone_proto::v1::KeyValue>,
        revision: u64,
        history: Vec<zone_proto::v1::Event>,
        /// The cache held records at the end (or was emptied on purpose).
        cache_used: bool,
    }
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
        Outcome {
            results,
            disabled: r.disabled(),
            floor,
            kvs,
            revision: rev,
            history,
            cache_used: !cache.map.is_empty() || mode != 0,
        }
    };
    let warm = run(0);
    assert!(warm.cache_used, "the warm run kept nothing in its cache");
    assert!(warm.revision > 30, "too few revisions: {}", warm.revision);
    assert!(
        warm.floor > 20,
        "the history floor did not move: {}",
        warm.floor
    );
    assert!(!warm.disabled, "the zone was left disabled");
    let refused = warm
        .results
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
        assert_eq!(warm.results, other.results, "results differ (mode {mode})");
        assert_eq!(warm.kvs, other.kvs, "stores differ (mode {mode})");
        assert_eq!(
            warm.revision, other.revision,
            "revisions differ (mode {mode})"
        );
        assert_eq!(
            warm.history, other.history,
            "histories differ (mode {mode})"
        );
        assert_eq!(
            warm.floor, other.floor,
            "history floors differ (mode {mode})"
        );
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
