//! Human-readable explanations of violations.

use std::fmt::Write as _;

use crate::model::History;
use crate::search::{Attempt, DeadEnd};
use crate::{Operation, Outcome};

/// At most this many unknown candidates are listed one by one.
const UNKNOWN_SHOWN: usize = 5;

/// One operation on one line: client, op, outcome, times.
pub(crate) fn describe(op: &Operation) -> String {
    let times = match (&op.outcome, op.return_ns) {
        (Outcome::Unknown, _) | (_, None) => {
            format!("called at {} ns, no answer", op.call_ns)
        }
        (_, Some(ret)) => format!("called at {} ns, returned at {ret} ns", op.call_ns),
    };
    format!(
        "client {}: {:?} -> {:?}, {times}",
        op.client, op.op, op.outcome
    )
}

fn numbered(ops: &[Operation], index: usize) -> String {
    format!("#{index} {}", describe(&ops[index]))
}

/// Explains the deepest dead end of a failed search.
pub(crate) fn dead_end(ops: &[Operation], history: &History, end: &DeadEnd) -> String {
    let unknown = history.ops.len() - history.known;
    let mut s = format!(
        "not linearizable: no order of the {} ({} acknowledged, {unknown} writes or \
         compare-and-sets without an answer{}) fits a register with compare-and-set and \
         real time.\n",
        count(ops.len()),
        history.known,
        match history.dropped {
            0 => String::new(),
            n => format!(", {n} reads without an answer, ignored"),
        }
    );
    if end.depth == 0 {
        let _ = writeln!(
            s,
            "Not even one operation can go first; the key initially holds {:?}.",
            history.initial_value
        );
    } else {
        let _ = writeln!(
            s,
            "Longest linearizable prefix found: {} ({} of the {} acknowledged ones), \
             after which the key holds {:?}. {}:",
            count(end.depth),
            end.known,
            history.known,
            end.state,
            match end.recent.len() {
                1 => "It is".to_string(),
                n if n == end.depth => "They are".to_string(),
                n => format!("Its last {n}"),
            }
        );
        for &op in &end.recent {
            let _ = writeln!(s, "  {}", numbered(ops, history.ops[op].index));
        }
    }
    match end.first_return {
        Some(op) => {
            let first = &ops[history.ops[op].index];
            let _ = writeln!(
                s,
                "Operations that could go next (called before client {}'s {:?} returned at \
                 {} ns, which must precede everything called after it), none of which can:",
                first.client,
                first.op,
                first
                    .return_ns
                    .map_or("+infinity".to_string(), |r| r.to_string())
            );
        }
        None => {
            let _ = writeln!(s, "Operations that could go next, none of which can:");
        }
    }
    let mut unknown_seen = 0;
    for &(op, attempt) in &end.candidates {
        if !history.ops[op].step.is_known() {
            unknown_seen += 1;
            if unknown_seen > UNKNOWN_SHOWN {
                continue;
            }
        }
        let _ = writeln!(
            s,
            "  {}: {}",
            numbered(ops, history.ops[op].index),
            why(attempt, end)
        );
    }
    if unknown_seen > UNKNOWN_SHOWN {
        let _ = writeln!(
            s,
            "  ... and {} more operations without an answer",
            unknown_seen - UNKNOWN_SHOWN
        );
    }
    if !end.waiting.is_empty() {
        let _ = writeln!(
            s,
            "{:?} cannot come back once overwritten, yet acknowledged operations not yet \
             placed have to see it, such as:",
            end.state
        );
        for &op in &end.waiting {
            let _ = writeln!(s, "  {}", numbered(ops, history.ops[op].index));
        }
    }
    s.truncate(s.trim_end().len());
    s
}

fn count(n: usize) -> String {
    match n {
        1 => "1 operation".to_string(),
        n => format!("{n} operations"),
    }
}

fn why(attempt: Attempt, end: &DeadEnd) -> String {
    match attempt {
        Attempt::Possible => "possible here, but no order of the rest follows it".to_string(),
        Attempt::Impossible => format!("impossible while the key holds {:?}", end.state),
        Attempt::NoEffect => format!("no effect while the key holds {:?}", end.state),
        Attempt::Strands => format!(
            "would overwrite {:?} (see below why it must not)",
            end.state
        ),
        Attempt::Useless => "nothing that could follow it would see the difference".to_string(),
        Attempt::Deferred => {
            "same effect as an earlier pending operation without an answer".to_string()
        }
    }
}
