//! The checker against a naive search, on many small random histories with
//! few distinct values (so values repeat), many unknown operations, ties in
//! time and outcomes sometimes perturbed: the verdicts must agree. This
//! guards the checker's shortcuts (forced reads, interchangeable unknown
//! operations, canonical states, stranded values).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use lincheck::{check, Op, Operation, Outcome, Value, Verdict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Whether some order of `history` fits the register and real time, by
/// trying every order (with a memo of failed (placed, state) pairs).
fn naive(history: &[Operation], initial: Value) -> bool {
    let ops: Vec<&Operation> = history
        .iter()
        .filter(|o| !(o.op == Op::Read && o.outcome == Outcome::Unknown))
        .collect();
    let known = ops.iter().filter(|o| o.outcome != Outcome::Unknown).count();
    let mut failed = HashSet::new();
    place(
        &ops,
        &mut vec![false; ops.len()],
        initial,
        known,
        &mut failed,
    )
}

fn place(
    ops: &[&Operation],
    placed: &mut Vec<bool>,
    state: Value,
    known_left: usize,
    failed: &mut HashSet<(Vec<bool>, Value)>,
) -> bool {
    if known_left == 0 {
        return true;
    }
    if failed.contains(&(placed.clone(), state)) {
        return false;
    }
    let ret = |o: &Operation| match o.outcome {
        Outcome::Unknown => None,
        _ => o.return_ns,
    };
    for i in 0..ops.len() {
        if placed[i] {
            continue;
        }
        // Everything that returned before `i` was called goes first.
        let blocked = (0..ops.len())
            .any(|j| j != i && !placed[j] && ret(ops[j]).is_some_and(|r| r < ops[i].call_ns));
        if blocked {
            continue;
        }
        let after = match (&ops[i].op, &ops[i].outcome) {
            (Op::Write(v), _) => Some(Some(*v)),
            (Op::Cas { expect, new }, Outcome::Unknown) => {
                Some(if state == *expect { Some(*new) } else { state })
            }
            (Op::Cas { expect, new }, Outcome::Swapped(ok)) => match (state == *expect, ok) {
                (true, true) => Some(Some(*new)),
                (false, false) => Some(state),
                _ => None,
            },
            (Op::Read, Outcome::Read(v)) => (*v == state).then_some(state),
            _ => None,
        };
        let Some(after) = after else { continue };
        placed[i] = true;
        let known = usize::from(ops[i].outcome != Outcome::Unknown);
        let ok = place(ops, placed, after, known_left - known, failed);
        placed[i] = false;
        if ok {
            return true;
        }
    }
    failed.insert((placed.clone(), state));
    false
}

/// A small history: a true register run, then maybe a perturbed outcome.
fn random_history(rng: &mut StdRng, unique: bool) -> Vec<Operation> {
    let n = rng.random_range(1..=10);
    let value = |rng: &mut StdRng, i: usize| {
        if unique {
            i as u64 + 1
        } else {
            rng.random_range(1..=3)
        }
    };
    let mut ops = Vec::new();
    let mut effects = Vec::new();
    for i in 0..n {
        let call = rng.random_range(0..20);
        let ret = call + rng.random_range(0..8);
        let op = match rng.random_range(0..3) {
            0 => Op::Write(value(rng, i)),
            1 => Op::Cas {
                expect: match rng.random_range(0..4) {
                    0 => None,
                    _ if unique => Some(rng.random_range(1..=n as u64)),
                    _ => Some(rng.random_range(1..=3)),
                },
                new: value(rng, i),
            },
            _ => Op::Read,
        };
        let unknown = rng.random_bool(0.3);
        let effect = match unknown {
            true => rng
                .random_bool(0.5)
                .then(|| rng.random_range(call..call + 30)),
            false => Some(rng.random_range(call..=ret)),
        };
        effects.push(effect);
        ops.push(Operation {
            client: i as u64,
            op,
            call_ns: call,
            return_ns: (!unknown).then_some(ret),
            outcome: if unknown {
                Outcome::Unknown
            } else {
                Outcome::Written
            },
        });
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| effects[i].is_some()).collect();
    order.sort_by_key(|&i| (effects[i], rng.random_range(0..1000)));
    let mut state: Value = None;
    for i in order {
        let outcome = common::apply(&mut state, &ops[i].op);
        if ops[i].outcome != Outcome::Unknown {
            ops[i].outcome = outcome;
        }
    }
    if rng.random_bool(0.4) {
        let i = rng.random_range(0..n);
        ops[i].outcome = match ops[i].outcome {
            Outcome::Read(_) => Outcome::Read(match rng.random_range(0..4) {
                0 => None,
                v => Some(v),
            }),
            Outcome::Swapped(ok) => Outcome::Swapped(!ok),
            ref other => other.clone(),
        };
    }
    ops
}

fn compare(unique: bool, seeds: std::ops::Range<u64>) {
    let (mut yes, mut no) = (0, 0);
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let h = random_history(&mut rng, unique);
        let initial = if rng.random_bool(0.2) { Some(1) } else { None };
        let expected = naive(&h, initial);
        let got = check(&h, initial, Duration::from_secs(10));
        match (&got, expected) {
            (Verdict::Linearizable, true) => yes += 1,
            (Verdict::Violation { .. }, false) => no += 1,
            _ => panic!("seed {seed}: naive says {expected}, check says {got:?}\n{h:#?}"),
        }
    }
    println!("{yes} linearizable, {no} not");
    assert!(yes > 100 && no > 100);
}

#[test]
fn agrees_with_naive_search_repeated_values() {
    compare(false, 0..10_000);
}

#[test]
fn agrees_with_naive_search_unique_values() {
    compare(true, 1_000_000..1_010_000);
}
