//! The seeded simulation (issue 20's robustness suite, its first part):
//! zones of 3 and 5 servers on the simulated clock under a random schedule
//! of faults (links cut, servers isolated, messages delayed, servers
//! crashed and restarted from their RocksDB) and client writes (puts and
//! compare-and-swaps), all drawn from one seed. After each run, the zone
//! healed: every acknowledged write is there, none was applied twice, each
//! compare-and-swap's answer agrees with the history, every server holds
//! the same data, and no two servers ever held the lease at the same
//! simulated instant.
//!
//! Election timeouts are fixed (raft-rs would draw them from its own
//! random source), so a seed replays the same run: a failure prints
//! `ZONED_SEED=<n> cargo nextest run -p zoned --test seeded` to replay it.

mod sim;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sim::{poll_once, Sim};
use zone_proto::v1::{command, command_result, CommandResult, GetRequest, PutRequest};
use zoned::node::{Lease, NodeError, NodeHandle};

type Answer = Pin<Box<dyn Future<Output = Result<CommandResult, NodeError>>>>;

const SECOND: Duration = Duration::from_secs(1);
const KEYS: u64 = 4;

/// A write and what became of it.
struct Write {
    key: String,
    value: String,
    /// For a compare-and-swap: the version it expects.
    expects: Option<u64>,
    answer: Answer,
    /// Some(revision) once acknowledged; None while unknown.
    acked: Option<u64>,
    /// Whether the acknowledged write changed the key (a compare-and-swap
    /// may not).
    changed: bool,
    failed: bool,
}

fn put_op(k: &str, v: &str) -> command::Op {
    command::Op::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: false,
    })
}

/// Sets `key` to `value` if its version is `version` (0: absent).
fn cas_op(key: &str, version: u64, value: &str) -> command::Op {
    use zone_proto::v1::{compare, request_op, Compare, RequestOp, TxnRequest};
    command::Op::Txn(TxnRequest {
        compare: vec![Compare {
            key: key.into(),
            target: compare::Target::Version as i32,
            op: compare::Op::Equal as i32,
            target_value: Some(compare::TargetValue::Version(version)),
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::Put(PutRequest {
                key: key.into(),
                value: value.into(),
                prev_kv: false,
            })),
        }],
        failure: vec![],
    })
}

fn record(n: &NodeHandle, key: &str) -> Option<zone_proto::v1::KeyValue> {
    let req = GetRequest {
        key: key.into(),
        serializable: true,
    };
    n.reader().get(&req).unwrap().0
}

/// Each server's lease intervals [since, until) on the simulated clock.
fn lease_intervals(leases: &[(u64, Lease)]) -> BTreeMap<u64, Vec<(u64, u64)>> {
    let mut by_server: BTreeMap<u64, Vec<Lease>> = BTreeMap::new();
    for (id, l) in leases {
        by_server.entry(*id).or_default().push(*l);
    }
    by_server
        .into_iter()
        .map(|(id, ls)| {
            let mut out = Vec::new();
            for (i, l) in ls.iter().enumerate() {
                if !l.held {
                    continue;
                }
                let next = ls.get(i + 1).map_or(u64::MAX, |n| n.since_ns);
                out.push((l.since_ns, l.expires_ns.min(next)));
            }
            (id, out)
        })
        .collect()
}

/// Polls a write still unanswered, and records its answer.
fn settle_write(seed: u64, w: &mut Write) {
    if w.acked.is_some() || w.failed {
        return;
    }
    match poll_once(&mut w.answer) {
        Some(Ok(r)) => match r.result {
            Some(command_result::Result::Put(p)) => {
                w.acked = Some(p.header.map_or(0, |h| h.revision));
                w.changed = true;
            }
            Some(command_result::Result::Txn(t)) => {
                w.acked = Some(t.header.map_or(0, |h| h.revision));
                w.changed = t.succeeded;
            }
            other => panic!("seed {seed}: a write answered {other:?}"),
        },
        Some(Err(_)) => w.failed = true,
        None => {}
    }
}

/// One run; panics with the seed on a broken invariant.
fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = if rng.random_bool(0.5) { 3 } else { 5 };
    let mut sim = Sim::start_n(n, |c| {
        c.raft.max_election_ticks = c.raft.election_ticks + 1;
    });
    let ids = sim.ids();
    let founders_of = |sim: &Sim| -> Vec<zone_proto::v1::Member> {
        sim.ids()
            .iter()
            .map(|&id| zone_proto::v1::Member {
                id,
                peer_endpoint: format!("n{id}:1"),
                ..Default::default()
            })
            .collect()
    };
    let mut writes: Vec<Write> = Vec::new();
    let mut crashed: Vec<(u64, u64)> = Vec::new(); // (server, restart at ns)
    let mut next_value = 0u64;
    let mut faults = BTreeMap::<&str, u64>::new();
    let end = sim.now_ns() + 20 * SECOND.as_nanos() as u64;
    while sim.now_ns() < end {
        // A client write, to whoever leads (as clients find the leader).
        if rng.random_bool(0.6) {
            if let Some((leader, _)) = sim.leaders().into_iter().next() {
                let key = format!("k{}", rng.random_range(0..KEYS));
                next_value += 1;
                let value = next_value.to_string();
                let node = sim.node(leader);
                // A third are compare-and-swaps on the version the leader
                // has applied (often stale: the check is then refused).
                let expects = rng
                    .random_bool(0.33)
                    .then(|| record(&node, &key).map_or(0, |kv| kv.version));
                let op = match expects {
                    Some(v) => cas_op(&key, v, &value),
                    None => put_op(&key, &value),
                };
                let answer: Answer = Box::pin(async move { node.propose(op).await });
                let mut w = Write {
                    key,
                    value,
                    expects,
                    answer,
                    acked: None,
                    changed: false,
                    failed: false,
                };
                // Polled once now, so the request is on its way.
                settle_write(seed, &mut w);
                writes.push(w);
            }
        }
        // A fault, now and then; healing, more often.
        match rng.random_range(0..100) {
            0..4 => {
                let id = ids[rng.random_range(0..ids.len())];
                sim.net.isolate(id, &ids);
                *faults.entry("isolate").or_default() += 1;
            }
            4..7 => {
                let a = ids[rng.random_range(0..ids.len())];
                let b = ids[rng.random_range(0..ids.len())];
                if a != b {
                    sim.net.isolate(a, &[a, b]);
                    *faults.entry("cut link").or_default() += 1;
                }
            }
            7..9 => {
                sim.net
                    .delay(Duration::from_millis(rng.random_range(0..60)));
                *faults.entry("delay").or_default() += 1;
            }
            9..11 => {
                let live = ids.iter().filter(|i| !crashed.iter().any(|(c, _)| c == *i));
                let live: Vec<u64> = live.copied().collect();
                // Never more than a minority down, so the zone can go on.
                if crashed.len() < (n as usize - 1) / 2 && !live.is_empty() {
                    let id = live[rng.random_range(0..live.len())];
                    sim.crash(id);
                    *faults.entry("crash").or_default() += 1;
                    let back = sim.now_ns() + rng.random_range(100..2000) * 1_000_000;
                    crashed.push((id, back));
                }
            }
            11..20 => {
                sim.net.heal();
                sim.net.delay(Duration::ZERO);
            }
            _ => {}
        }
        let now = sim.now_ns();
        let due: Vec<u64> = crashed
            .iter()
            .filter(|(_, t)| *t <= now)
            .map(|(i, _)| *i)
            .collect();
        crashed.retain(|(_, t)| *t > now);
        for id in due {
            let members = founders_of(&sim);
            sim.restart(id, members);
        }
        sim.run_for(Duration::from_millis(rng.random_range(5..60)));
        for w in writes.iter_mut() {
            settle_write(seed, w);
        }
    }

    // Heal everything, bring every server back, and let the zone settle.
    sim.net.heal();
    sim.net.delay(Duration::ZERO);
    for (id, _) in std::mem::take(&mut crashed) {
        let members = founders_of(&sim);
        sim.restart(id, members);
    }
    let leader = sim.wait_leader(&ids);
    let node = sim.node(leader);
    let mut last: Answer = Box::pin(async move { node.propose(put_op("final", "1")).await });
    sim.wait(20 * SECOND, "a final write", |_| poll_once(&mut last))
        .unwrap_or_else(|e| panic!("seed {seed}: the final write failed: {e}"));
    sim.wait(20 * SECOND, "every server to apply the final write", |s| {
        ids.iter()
            .all(|&id| record(&s.node(id), "final").is_some())
            .then_some(())
    });
    sim.run_for(SECOND);

    // Every server holds the same data.
    let first = sim.node(ids[0]);
    for &id in &ids[1..] {
        let other = sim.node(id);
        for k in 0..KEYS {
            let key = format!("k{k}");
            assert_eq!(
                record(&first, &key),
                record(&other, &key),
                "seed {seed}: servers {} and {id} differ on {key}",
                ids[0]
            );
        }
    }
    // Every acknowledged write is there, and none was applied twice: a
    // key's version counts the puts applied to it.
    for k in 0..KEYS {
        let key = format!("k{k}");
        let version = record(&first, &key).map_or(0, |kv| kv.version);
        let acked = writes
            .iter()
            .filter(|w| w.key == key && w.acked.is_some() && w.changed)
            .count() as u64;
        let sent = writes.iter().filter(|w| w.key == key).count() as u64;
        assert!(
            acked <= version && version <= sent,
            "seed {seed}: {key} has version {version}, but {acked} puts were acknowledged and {sent} sent"
        );
    }
    // Each acknowledged compare-and-swap agrees with the history: one that
    // succeeded at revision R made the key's version `expected + 1` with its
    // value at R; one that failed saw another version at its revision.
    let history = first.reader().history(1, u64::MAX - 1, b"k").unwrap();
    let mut swaps = 0;
    for w in writes.iter().filter(|w| w.expects.is_some()) {
        let (Some(rev), Some(expected)) = (w.acked, w.expects) else {
            continue;
        };
        swaps += 1;
        let key = w.key.as_bytes();
        let at = history
            .iter()
            .filter_map(|e| e.kv.as_ref())
            .rfind(|kv| kv.key == key && kv.mod_revision <= rev);
        if w.changed {
            let kv = at.filter(|kv| kv.mod_revision == rev).unwrap_or_else(|| {
                panic!(
                    "seed {seed}: a compare-and-swap on {} succeeded at {rev}, not in the history",
                    w.key
                )
            });
            assert_eq!(
                (kv.version, kv.value.as_slice()),
                (expected + 1, w.value.as_bytes()),
                "seed {seed}: a compare-and-swap on {} at {rev}",
                w.key
            );
        } else {
            // Deletes never happen here: absent means version 0. Values
            // are unique: the key must not hold this one.
            let (version, value) = at.map_or((0, &[][..]), |kv| (kv.version, &kv.value[..]));
            assert!(
                version != expected && value != w.value.as_bytes(),
                "seed {seed}: a compare-and-swap on {} answered failed at {rev}, but the key had version {version} (expected {expected}) and value {:?}",
                w.key,
                String::from_utf8_lossy(value)
            );
        }
    }
    let terms = ids
        .iter()
        .map(|&id| sim.node(id).view().term)
        .max()
        .unwrap_or(0);
    eprintln!(
        "seed {seed}: {n} servers, {} writes ({} acknowledged, {} failed, {swaps} compare-and-swaps checked), faults {faults:?}, last term {terms}",
        writes.len(),
        writes.iter().filter(|w| w.acked.is_some()).count(),
        writes.iter().filter(|w| w.failed).count(),
    );
    // At most one lease holder at any simulated instant.
    let intervals = lease_intervals(&sim.leases);
    let all: Vec<(u64, u64, u64)> = intervals
        .iter()
        .flat_map(|(id, v)| v.iter().map(move |(s, e)| (*id, *s, *e)))
        .collect();
    for (i, &(a, s1, e1)) in all.iter().enumerate() {
        for &(b, s2, e2) in &all[i + 1..] {
            assert!(
                a == b || e1 <= s2 || e2 <= s1,
                "seed {seed}: servers {a} and {b} both held the lease: [{s1}, {e1}) and [{s2}, {e2})"
            );
        }
    }
}

/// Seeds that once failed, run every time before the others (a seed's
/// schedule changes with the code, so these are a cheap extra, not the
/// regression test: each fix has a test of its own).
/// - 5873816186893274522: raft-rs's `batch_append` had server 2 acknowledge
///   index 202 holding 200 (`node::tests::appends_*`).
const FAILED_ONCE: &[u64] = &[5873816186893274522];

/// As many seeds as fit in `ZONED_SIM_SECONDS` of wall-clock time
/// (default 60; at least 5 seeds), or `ZONED_SEEDS` of them, from
/// `ZONED_SEED_BASE` on; or the one `ZONED_SEED`.
#[test]
fn seeded_runs_keep_every_invariant() {
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    if let Some(seed) = env("ZONED_SEED") {
        run(seed);
        return;
    }
    let budget = Duration::from_secs(env("ZONED_SIM_SECONDS").unwrap_or(60));
    let started = std::time::Instant::now();
    // Seeds 1, 2, 3, ... unless ZONED_SEED_BASE says where to start
    // ("random": anywhere). CI runs the fixed sequence: a seed that fails
    // there fails every run, never at random; exploring new seeds is a
    // separate run.
    let base: u64 = match std::env::var("ZONED_SEED_BASE").ok().as_deref() {
        Some("random") => rand::random(),
        Some(s) => s.parse().expect("ZONED_SEED_BASE: a number or random"),
        None => 1,
    };
    for &seed in FAILED_ONCE {
        if std::panic::catch_unwind(|| run(seed)).is_err() {
            panic!("seed {seed} failed; replay it with ZONED_SEED={seed} cargo nextest run -p zoned --test seeded");
        }
    }
    let mut done = 0u64;
    loop {
        let enough = match env("ZONED_SEEDS") {
            Some(n) => done >= n,
            None => done >= 5 && started.elapsed() >= budget,
        };
        if enough {
            break;
        }
        let seed = base.wrapping_add(done);
        if std::panic::catch_unwind(|| run(seed)).is_err() {
            panic!("seed {seed} failed; replay it with ZONED_SEED={seed} cargo nextest run -p zoned --test seeded");
        }
        done += 1;
    }
    eprintln!("{done} seeds passed in {:?}", started.elapsed());
}
