//! The seeded simulation (issue 20's robustness suite, its first part):
//! zones of 3 and 5 servers on the simulated clock under a random schedule
//! of faults (links cut, servers isolated, messages delayed, lost,
//! duplicated and reordered, a server's disk slow (its driver stalled as in
//! a long sync), servers crashed and restarted from their RocksDB) and
//! clients' puts, compare-and-swaps and linearizable reads, each client
//! one call at a time, all drawn from one seed. After each run, the zone
//! healed: every acknowledged write is there, none was applied twice, each
//! key's history (answers and calls without one) is linearizable as a
//! register with compare-and-set (`lincheck`), every server holds the same
//! data, and no two servers ever held the lease at the same simulated
//! instant.
//!
//! Election timeouts are fixed (raft-rs would draw them from its own
//! random source), so a seed replays the same run: a failure prints
//! `ZONED_SEED=<n> cargo nextest run -p zoned --test seeded` to replay it.

mod sim;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use lincheck::{Op, Operation, Outcome, Verdict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sim::{poll_once, Chaos, Sim};
use zone_proto::v1::{command, command_result, GetRequest, PutRequest};
use zoned::node::{Lease, NodeError, NodeHandle};

type Answer = Pin<Box<dyn Future<Output = Result<(Outcome, u64), NodeError>>>>;

const SECOND: Duration = Duration::from_secs(1);
const KEYS: u64 = 4;

/// An operation of a client and what became of it.
struct Call {
    key: String,
    op: Op,
    call_ns: u64,
    answer: Answer,
    /// (when the answer was seen, the outcome; Unknown if it failed).
    done: Option<(u64, Outcome)>,
}

impl Call {
    /// Whether it was acknowledged and changed the key.
    fn changed(&self) -> bool {
        matches!(
            self.done,
            Some((_, Outcome::Written)) | Some((_, Outcome::Swapped(true)))
        )
    }

    fn is_write(&self) -> bool {
        !matches!(self.op, Op::Read)
    }

    /// As the linearizability checker takes it: no answer (yet) means
    /// indeterminate.
    fn operation(&self, client: u64) -> Operation {
        let (return_ns, outcome) = match &self.done {
            Some((_, Outcome::Unknown)) | None => (None, Outcome::Unknown),
            Some((t, o)) => (Some(*t), o.clone()),
        };
        Operation {
            client,
            op: self.op.clone(),
            call_ns: self.call_ns,
            return_ns,
            outcome,
        }
    }
}

fn put_op(k: &str, v: &str) -> command::Op {
    command::Op::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: false,
    })
}

/// Sets `key` to `value` if it holds `expect` (None: absent).
fn cas_op(key: &str, expect: Option<u64>, value: &str) -> command::Op {
    use zone_proto::v1::{compare, request_op, Compare, RequestOp, TxnRequest};
    let compare = match expect {
        Some(v) => Compare {
            key: key.into(),
            target: compare::Target::Value as i32,
            op: compare::Op::Equal as i32,
            target_value: Some(compare::TargetValue::Value(v.to_string().into_bytes())),
        },
        None => Compare {
            key: key.into(),
            target: compare::Target::Version as i32,
            op: compare::Op::Equal as i32,
            target_value: Some(compare::TargetValue::Version(0)),
        },
    };
    command::Op::Txn(TxnRequest {
        compare: vec![compare],
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

/// A value as the clients write them: decimal numbers.
fn value_of(kv: &zone_proto::v1::KeyValue) -> u64 {
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
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

/// Polls a call still unanswered, and records its answer at `now_ns`.
fn settle(seed: u64, c: &mut Call, now_ns: u64) {
    if c.done.is_some() {
        return;
    }
    match poll_once(&mut c.answer) {
        Some(Ok((outcome, _))) => c.done = Some((now_ns, outcome)),
        Some(Err(_)) => c.done = Some((now_ns, Outcome::Unknown)),
        None => {}
    }
    if let Some((_, Outcome::Read(Some(u64::MAX)))) = c.done {
        panic!(
            "seed {seed}: a read of {} returned a value no client wrote",
            c.key
        );
    }
}

/// Starts a client operation on server `id` (polled once, so the request
/// is on its way): a put, a compare-and-swap (on the value server `id`
/// has applied: often stale, and then refused) or a linearizable read.
fn start_call(sim: &Sim, id: u64, rng: &mut StdRng, next_value: &mut u64) -> Call {
    let key = format!("k{}", rng.random_range(0..KEYS));
    let node = sim.node(id);
    *next_value += 1;
    let value = *next_value;
    let (op, answer): (Op, Answer) = match rng.random_range(0..100) {
        0..40 => {
            let k = key.clone();
            let answer = Box::pin(async move {
                node.read_barrier().await?;
                let (kv, revision) = node
                    .reader()
                    .get(&GetRequest {
                        key: k.into(),
                        serializable: true,
                    })
                    .map_err(|e| NodeError::Rejected(e.to_string()))?;
                Ok((Outcome::Read(kv.as_ref().map(value_of)), revision))
            });
            (Op::Read, answer)
        }
        40..75 => {
            let cmd = put_op(&key, &value.to_string());
            let answer = Box::pin(async move {
                let r = node.propose(cmd).await?;
                match r.result {
                    Some(command_result::Result::Put(p)) => {
                        Ok((Outcome::Written, p.header.map_or(0, |h| h.revision)))
                    }
                    other => panic!("a put answered {other:?}"),
                }
            });
            (Op::Write(value), answer)
        }
        _ => {
            let expect = record(&node, &key).as_ref().map(value_of);
            let cmd = cas_op(&key, expect, &value.to_string());
            let answer = Box::pin(async move {
                let r = node.propose(cmd).await?;
                match r.result {
                    Some(command_result::Result::Txn(t)) => Ok((
                        Outcome::Swapped(t.succeeded),
                        t.header.map_or(0, |h| h.revision),
                    )),
                    other => panic!("a compare-and-swap answered {other:?}"),
                }
            });
            (Op::Cas { expect, new: value }, answer)
        }
    };
    let mut c = Call {
        key,
        op,
        call_ns: sim.now_ns(),
        answer,
        done: None,
    };
    settle(0, &mut c, sim.now_ns());
    c
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
    // Calls by client: client i sends through server ids[i % n], one call
    // at a time.
    let clients = 2 * n as usize;
    let mut calls: Vec<Vec<Call>> = (0..clients).map(|_| Vec::new()).collect();
    let mut crashed: Vec<(u64, u64)> = Vec::new(); // (server, restart at ns)
    let mut next_value = 0u64;
    let mut faults = BTreeMap::<&str, u64>::new();
    let end = sim.now_ns() + 20 * SECOND.as_nanos() as u64;
    while sim.now_ns() < end {
        // Each client whose last call is answered may start another, to
        // whoever leads (as clients find the leader); reads also go to
        // any server.
        for (c, mine) in calls.iter_mut().enumerate() {
            if mine.last().is_some_and(|l| l.done.is_none()) || !rng.random_bool(0.3) {
                continue;
            }
            let via = ids[c % ids.len()];
            if crashed.iter().any(|(id, _)| *id == via) {
                continue;
            }
            let target = match sim.leaders().into_iter().next() {
                Some((leader, _)) if rng.random_bool(0.7) => leader,
                _ => via,
            };
            mine.push(start_call(&sim, target, &mut rng, &mut next_value));
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
            11..13 => {
                sim.net.chaos(Chaos {
                    rng: StdRng::seed_from_u64(rng.random()),
                    drop: rng.random_range(0.0..0.3),
                    duplicate: rng.random_range(0.0..0.2),
                    jitter: Duration::from_millis(rng.random_range(0..40)),
                });
                *faults.entry("drop, duplicate, reorder").or_default() += 1;
            }
            13..15 => {
                // A slow disk: the server's driver busy in a sync.
                let id = ids[rng.random_range(0..ids.len())];
                if !crashed.iter().any(|(c, _)| *c == id) {
                    sim.stall(id, Duration::from_millis(rng.random_range(10..400)));
                    *faults.entry("disk stall").or_default() += 1;
                }
            }
            15..24 => {
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
        let now = sim.now_ns();
        for c in calls.iter_mut().flatten() {
            settle(seed, c, now);
        }
    }

    // Heal everything, bring every server back, and let the zone settle.
    sim.net.heal();
    sim.net.delay(Duration::ZERO);
    for (id, _) in std::mem::take(&mut crashed) {
        let members = founders_of(&sim);
        sim.restart(id, members);
    }
    // A final write, retried as a client would while leadership settles
    // (a server that was stalled may still call an election).
    let mut tries = 0;
    loop {
        let leader = sim.wait_leader(&ids);
        let node = sim.node(leader);
        let mut last: Pin<Box<dyn Future<Output = _>>> =
            Box::pin(async move { node.propose(put_op("final", "1")).await });
        match sim.wait(20 * SECOND, "a final write", |_| poll_once(&mut last)) {
            Ok(_) => break,
            Err(e) if tries < 5 => {
                tries += 1;
                eprintln!("seed {seed}: the final write failed ({e}); again");
            }
            Err(e) => panic!("seed {seed}: the final write failed {tries} times: {e}"),
        }
    }
    sim.wait(20 * SECOND, "every server to apply the final write", |s| {
        ids.iter()
            .all(|&id| record(&s.node(id), "final").is_some())
            .then_some(())
    });
    sim.run_for(SECOND);
    let now = sim.now_ns();
    for c in calls.iter_mut().flatten() {
        settle(seed, c, now);
    }

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
    // key's version counts the writes applied to it.
    let all: Vec<&Call> = calls.iter().flatten().collect();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let version = record(&first, &key).map_or(0, |kv| kv.version);
        let mine = all.iter().filter(|c| c.key == key);
        let acked = mine.clone().filter(|c| c.changed()).count() as u64;
        let sent = mine.filter(|c| c.is_write()).count() as u64;
        assert!(
            acked <= version && version <= sent,
            "seed {seed}: {key} has version {version}, but {acked} writes were acknowledged and {sent} sent"
        );
    }
    // Each key's history, final reads included, is linearizable.
    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for (client, mine) in calls.iter().enumerate() {
        for c in mine {
            by_key
                .entry(&c.key)
                .or_default()
                .push(c.operation(client as u64 + 1));
        }
    }
    let at = sim.now_ns();
    for (key, ops) in by_key.iter_mut() {
        ops.push(Operation {
            client: 0,
            op: Op::Read,
            call_ns: at,
            return_ns: Some(at),
            outcome: Outcome::Read(record(&first, key).as_ref().map(value_of)),
        });
        match lincheck::check(ops, None, Duration::from_secs(20)) {
            Verdict::Linearizable => {}
            v => panic!("seed {seed}: {key}'s history: {v:?}"),
        }
    }
    let terms = ids
        .iter()
        .map(|&id| sim.node(id).view().term)
        .max()
        .unwrap_or(0);
    let count = |f: &dyn Fn(&&Call) -> bool| all.iter().filter(|c| f(c)).count();
    eprintln!(
        "seed {seed}: {n} servers, {} operations ({} writes acknowledged, {} reads answered, {} without answer), faults {faults:?}, last term {terms}",
        all.len(),
        count(&|c| c.is_write() && matches!(c.done, Some((_, ref o)) if *o != Outcome::Unknown)),
        count(&|c| !c.is_write() && matches!(c.done, Some((_, Outcome::Read(_))))),
        count(&|c| matches!(c.done, None | Some((_, Outcome::Unknown)))),
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
/// - 122: a proposal cut from a deposed leader's log waited forever when the
///   zone wrote nothing more at its index (`node::proposals::tests::a_later_*`).
const FAILED_ONCE: &[u64] = &[5873816186893274522, 122];

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
