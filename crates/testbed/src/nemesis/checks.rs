//! The nemesis's verdicts, from what the clients, the watcher and the VIP
//! sampler recorded.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use lincheck::{Op, Outcome, Value, Verdict};
use serde::Serialize;

use super::clients::{Recorded, Recording};

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

fn check(name: &'static str, problems: &[String], ok: String) -> Check {
    Check {
        name,
        passed: problems.is_empty(),
        detail: match problems.len() {
            0 => ok,
            n => format!(
                "{n} problem(s); first: {}",
                problems[..n.min(3)].join(" | ")
            ),
        },
    }
}

/// Each key's history is a register with compare-and-set: is there an
/// order of its operations, consistent with real time, that a single copy
/// would have produced? `budget` is shared by all keys.
pub fn linearizable(rec: &Recording, budget: Duration) -> Check {
    let mut by_key: BTreeMap<&str, Vec<lincheck::Operation>> = BTreeMap::new();
    for r in &rec.ops {
        by_key.entry(&r.key).or_default().push(r.op.clone());
    }
    let deadline = Instant::now() + budget;
    let mut problems = Vec::new();
    let keys = by_key.len();
    for (key, ops) in by_key {
        let left = deadline.saturating_duration_since(Instant::now());
        match lincheck::check(&ops, None, left.max(Duration::from_secs(1))) {
            Verdict::Linearizable => {}
            Verdict::Violation { explanation } => {
                problems.push(format!("{key}: {explanation}"));
            }
            Verdict::Unknown { explored } => {
                problems.push(format!(
                    "{key}: undecided after {explored} states (search budget spent)"
                ));
            }
        }
    }
    check(
        "linearizable (per key)",
        &problems,
        format!("{keys} keys, {} operations", rec.ops.len()),
    )
}

/// The value each acknowledged write put, by key.
fn acked_writes(ops: &[Recorded]) -> Vec<(&str, u64, Option<u64>)> {
    ops.iter()
        .filter_map(|r| match (&r.op.op, &r.op.outcome) {
            (Op::Write(v), Outcome::Written) => Some((r.key.as_str(), *v, r.revision)),
            (Op::Cas { new, .. }, Outcome::Swapped(true)) => {
                Some((r.key.as_str(), *new, r.revision))
            }
            _ => None,
        })
        .collect()
}

/// Every acknowledged write is in the store's history (read after the
/// run by a new watch from revision 1), at the revision it was
/// acknowledged with; no value was written twice (each value is sent
/// once: twice means a command applied twice).
pub fn writes(rec: &Recording) -> (Check, Check) {
    let events = match &rec.history {
        Ok((_, events)) => events,
        Err(why) => {
            let problem = [format!("the store's history could not be read: {why}")];
            return (
                check("no acknowledged write lost", &problem, String::new()),
                check("no write applied twice", &problem, String::new()),
            );
        }
    };
    let mut at: HashMap<(&str, Value), Vec<u64>> = HashMap::new();
    for (rev, key, v) in events {
        at.entry((key.as_str(), *v)).or_default().push(*rev);
    }
    let acked = acked_writes(&rec.ops);
    let mut lost = Vec::new();
    for (key, v, rev) in &acked {
        match at.get(&(*key, Some(*v))) {
            None => lost.push(format!("{key}={v} (acknowledged at revision {rev:?})")),
            Some(revs) if rev.is_some_and(|r| !revs.contains(&r)) => lost.push(format!(
                "{key}={v} acknowledged at revision {rev:?}, applied at {revs:?}"
            )),
            Some(_) => {}
        }
    }
    let twice: Vec<String> = at
        .iter()
        .filter(|((_, v), revs)| v.is_some() && revs.len() > 1)
        .map(|((k, v), revs)| format!("{k}={v:?} at revisions {revs:?}"))
        .collect();
    (
        check(
            "no acknowledged write lost",
            &lost,
            format!("{} acknowledged writes all in the history", acked.len()),
        ),
        check(
            "no write applied twice",
            &twice,
            format!("{} writes in the history, each once", events.len()),
        ),
    )
}

/// A client's operations run one after another: the revisions of their
/// answers never go down.
pub fn client_revisions(rec: &Recording) -> Check {
    // Each client's operations are recorded in the order it ran them.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    let mut problems = Vec::new();
    for r in &rec.ops {
        let Some(rev) = r.revision else { continue };
        let client = r.op.client;
        if client == 0 {
            continue;
        }
        if let Some(prev) = last.get(&client) {
            if rev < *prev {
                problems.push(format!(
                    "client {client}: revision {rev} (via {}) after {prev}",
                    r.via
                ));
            }
        }
        last.insert(client, rev);
    }
    check(
        "revisions never go back for a client",
        &problems,
        format!("{} clients", last.len()),
    )
}

/// The watch from revision 1 saw every revision, in order, with no gap,
/// up to the final reads' revision, and its last value of each key is what
/// the final reads returned.
pub fn watch(rec: &Recording) -> Check {
    let mut problems = Vec::new();
    let mut prev: Option<u64> = None;
    let mut last_of: BTreeMap<&str, Value> = BTreeMap::new();
    for (rev, key, v) in &rec.watched.events {
        match prev {
            Some(p) if *rev != p + 1 => {
                problems.push(format!("revision {rev} after {p}"));
            }
            None if *rev != 1 => problems.push(format!("first revision {rev}, not 1")),
            _ => {}
        }
        prev = Some(*rev);
        last_of.insert(key, *v);
    }
    let end = prev.unwrap_or(0);
    if end != rec.final_revision {
        problems.push(format!(
            "the watch ended at revision {end}, the final reads were at {}",
            rec.final_revision
        ));
    }
    for (key, (v, _)) in &rec.final_reads {
        let seen = last_of.get(key.as_str()).copied().flatten();
        if seen != *v {
            problems.push(format!(
                "{key}: the watch ended with {seen:?}, the final read returned {v:?}"
            ));
        }
    }
    if !problems.is_empty() {
        problems.insert(
            0,
            format!(
                "the watcher's last reconnections: {}",
                rec.watched.errors.join("; ")
            ),
        );
    }
    check(
        "watch from revision 1: every revision, in order",
        &problems,
        format!(
            "{} events to revision {end}, {} reconnects",
            rec.watched.events.len(),
            rec.watched.reconnects
        ),
    )
}

/// Every server had the same applied index, revision and data within 10 s
/// of the last fault healed.
pub fn converged(rec: &Recording) -> Check {
    let c = &rec.converged;
    match c.after {
        Some(d) => check(
            "servers converge within 10 s of healing",
            &[],
            format!("after {} ms, at {:?}", d.as_millis(), c.last[0]),
        ),
        None => check(
            "servers converge within 10 s of healing",
            &[format!("not after 10 s: {:?}", c.last)],
            String::new(),
        ),
    }
}

/// VIP ownership, sampled in every server's namespace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VipSamples {
    pub samples: u64,
    /// Samples with no holder.
    pub none: u64,
    /// (ms since the start, holders) of every sample with more than one.
    pub overlaps: Vec<(u64, Vec<usize>)>,
}

pub fn vip(s: &VipSamples) -> Check {
    let problems: Vec<String> = s
        .overlaps
        .iter()
        .map(|(ms, h)| format!("at {ms} ms servers {h:?}"))
        .collect();
    check(
        "VIP on at most one server",
        &problems,
        format!("{} samples, {} with no holder", s.samples, s.none),
    )
}

/// A leader's full disk made writes fail with RESOURCE_EXHAUSTED, and
/// writes were acknowledged again after each such fault was healed.
pub fn full_disk(rec: &Recording, faults: &[super::Fault]) -> Check {
    let on_leader: Vec<&super::Fault> = faults
        .iter()
        .filter(|f| f.kind == super::Kind::FullDisk && f.on_leader)
        .collect();
    let refused = rec
        .ops
        .iter()
        .filter(|r| r.error.as_deref() == Some("ResourceExhausted"))
        .count();
    let mut problems = Vec::new();
    if !on_leader.is_empty() && refused == 0 {
        problems.push(format!(
            "{} full disks on the leader, and no write refused with RESOURCE_EXHAUSTED",
            on_leader.len()
        ));
    }
    for f in &on_leader {
        let after = rec.ops.iter().any(|r| {
            r.op.call_ns / 1_000_000 > f.end_ms
                && matches!(r.op.outcome, Outcome::Written | Outcome::Swapped(true))
        });
        if !after {
            problems.push(format!(
                "no write acknowledged after the full disk healed at {} ms",
                f.end_ms
            ));
        }
    }
    check(
        "full disk: writes refused, then taken again",
        &problems,
        format!(
            "{} full disks on the leader, {refused} writes refused with RESOURCE_EXHAUSTED",
            on_leader.len()
        ),
    )
}

pub fn exits(exits: &[(usize, &'static str, String, u64)]) -> Check {
    let problems: Vec<String> = exits
        .iter()
        .map(|(i, what, how, ms)| format!("server {i}'s {what} exited ({how}) at {ms} ms"))
        .collect();
    check(
        "no process exits unless killed",
        &problems,
        "none did".into(),
    )
}
