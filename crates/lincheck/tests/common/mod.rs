//! Histories for the tests: hand-written helpers, and a simulation of clients
//! against a true atomic register.

#![allow(dead_code)] // each test file uses part of this

use std::collections::BTreeSet;

use lincheck::{Op, Operation, Outcome, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// An acknowledged operation.
/// The sequential register: `op` on `state`, and what it answers.
pub fn apply(state: &mut Value, op: &Op) -> Outcome {
    match *op {
        Op::Write(v) => {
            *state = Some(v);
            Outcome::Written
        }
        Op::Cas { expect, new } => {
            let ok = *state == expect;
            if ok {
                *state = Some(new);
            }
            Outcome::Swapped(ok)
        }
        Op::Read => Outcome::Read(*state),
    }
}

pub fn acked(client: u64, op: Op, call: u64, ret: u64, outcome: Outcome) -> Operation {
    Operation {
        client,
        op,
        call_ns: call,
        return_ns: Some(ret),
        outcome,
    }
}

/// An operation without an answer.
pub fn unanswered(client: u64, op: Op, call: u64) -> Operation {
    Operation {
        client,
        op,
        call_ns: call,
        return_ns: None,
        outcome: Outcome::Unknown,
    }
}

pub fn write(client: u64, v: u64, call: u64, ret: u64) -> Operation {
    acked(client, Op::Write(v), call, ret, Outcome::Written)
}

pub fn read(client: u64, seen: Value, call: u64, ret: u64) -> Operation {
    acked(client, Op::Read, call, ret, Outcome::Read(seen))
}

pub fn cas(client: u64, expect: Value, new: u64, ok: bool, call: u64, ret: u64) -> Operation {
    acked(
        client,
        Op::Cas { expect, new },
        call,
        ret,
        Outcome::Swapped(ok),
    )
}

/// Parameters of a simulated history.
#[derive(Debug, Clone, Copy)]
pub struct Sim {
    pub clients: u64,
    pub ops: usize,
    /// How many operations get no answer (their effect applied or not).
    pub unknowns: usize,
    /// Whether those come in bursts (of about `clients` consecutive
    /// operations, as when a partition times every client out) rather than
    /// spread out.
    pub bursts: bool,
    pub seed: u64,
}

/// `sim.ops` operations of `sim.clients` clients against an atomic register
/// starting absent: each takes effect at a random instant inside its
/// [call, return] interval; a few get no answer, took effect (at any time
/// after their call, possibly much later) or not, and their client moves on
/// after a timeout. Values are unique. Linearizable by construction.
pub fn simulate(sim: Sim) -> Vec<Operation> {
    let mut rng = StdRng::seed_from_u64(sim.seed);
    let mut unknown = BTreeSet::new();
    while unknown.len() < sim.unknowns.min(sim.ops) {
        let at = rng.random_range(0..sim.ops);
        let burst = if sim.bursts { sim.clients as usize } else { 1 };
        for i in at..(at + burst).min(sim.ops) {
            if unknown.len() < sim.unknowns {
                unknown.insert(i);
            }
        }
    }
    let mut free = vec![0u64; sim.clients as usize];
    let mut next_value = 1;
    let mut recent: Vec<Value> = vec![None];
    // (operation, instant it takes effect, if it does)
    let mut generated: Vec<(Operation, Option<u64>)> = Vec::with_capacity(sim.ops);
    for i in 0..sim.ops {
        let client = (0..free.len()).min_by_key(|&c| free[c]).unwrap_or(0);
        let call = free[client] + rng.random_range(0..=30);
        let op = match rng.random_range(0..10) {
            0..4 => Op::Read,
            4..7 => {
                next_value += 1;
                recent.push(Some(next_value));
                Op::Write(next_value)
            }
            _ => {
                let back = match rng.random_range(0..10) {
                    0..6 => 1,
                    6..8 => 2,
                    _ => rng.random_range(1..=recent.len()),
                };
                let expect = recent[recent.len().saturating_sub(back)];
                next_value += 1;
                recent.push(Some(next_value));
                Op::Cas {
                    expect,
                    new: next_value,
                }
            }
        };
        let (ret, effect) = if unknown.contains(&i) {
            free[client] = call + 3_000; // the client's timeout
            let effect = rng
                .random_bool(0.5)
                .then(|| call + rng.random_range(0..=20_000));
            (None, effect)
        } else {
            let long = rng.random_bool(0.02);
            let duration = rng.random_range(1..=if long { 5_000 } else { 300 });
            let ret = call + duration;
            free[client] = ret;
            (Some(ret), Some(rng.random_range(call..=ret)))
        };
        let outcome = if ret.is_some() {
            Outcome::Written // placeholder, set when the register runs
        } else {
            Outcome::Unknown
        };
        generated.push((
            Operation {
                client: client as u64,
                op,
                call_ns: call,
                return_ns: ret,
                outcome,
            },
            effect,
        ));
    }
    // Run the register in the order the operations took effect.
    let mut order: Vec<usize> = (0..generated.len())
        .filter(|&i| generated[i].1.is_some())
        .collect();
    order.sort_by_key(|&i| (generated[i].1, i));
    let mut state: Value = None;
    for i in order {
        let (op, _) = &mut generated[i];
        let outcome = apply(&mut state, &op.op);
        if op.outcome != Outcome::Unknown {
            op.outcome = outcome;
        }
    }
    generated.into_iter().map(|(op, _)| op).collect()
}

/// The value an acknowledged operation certainly put, if any.
fn put(op: &Operation) -> Option<(u64, u64)> {
    let ret = op.return_ns?;
    match (&op.op, &op.outcome) {
        (Op::Write(v), Outcome::Written) => Some((*v, ret)),
        (Op::Cas { new, .. }, Outcome::Swapped(true)) => Some((*new, ret)),
        _ => None,
    }
}

/// Changes one acknowledged read to a value that was certainly overwritten
/// before the read was called (its writer returned before an overwriting
/// write was called, which returned before the read was called), so that
/// the history is certainly not linearizable. Returns the read's index, or
/// `None` if no read qualifies. Values must be unique.
pub fn stale_read(history: &mut [Operation], seed: u64) -> Option<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let reads: Vec<usize> = (0..history.len())
        .filter(|&i| matches!(history[i].outcome, Outcome::Read(_)))
        .collect();
    let puts: Vec<(usize, u64, u64)> = history
        .iter()
        .enumerate()
        .filter_map(|(i, op)| put(op).map(|(v, ret)| (i, v, ret)))
        .collect();
    for _ in 0..100 {
        let r = *reads.get(rng.random_range(0..reads.len().max(1)))?;
        let (call, seen) = match history[r].outcome {
            Outcome::Read(seen) => (history[r].call_ns, seen),
            _ => continue,
        };
        // An overwriter X done before the read, and something certainly
        // before X: the initial absence, or a put done before X began.
        let overwriters: Vec<&(usize, u64, u64)> =
            puts.iter().filter(|(_, _, ret)| *ret < call).collect();
        let Some(&&(x, _, _)) = overwriters.get(rng.random_range(0..overwriters.len().max(1)))
        else {
            continue;
        };
        let x_call = history[x].call_ns;
        let older: Vec<Value> = std::iter::once(None)
            .chain(
                puts.iter()
                    .filter(|(i, _, ret)| *i != x && *ret < x_call)
                    .map(|(_, v, _)| Some(*v)),
            )
            .filter(|v| *v != seen)
            .collect();
        if older.is_empty() {
            continue;
        }
        let stale = older[rng.random_range(0..older.len())];
        history[r].outcome = Outcome::Read(stale);
        return Some(r);
    }
    None
}
