//! The depth-first search: Wing & Gong's, with Lowe's memo, over
//! Porcupine's lists ([`crate::lists`]).
//!
//! A configuration is the set of operations linearized so far and the
//! register's state. From one, the candidates are the acknowledged calls
//! before the first acknowledged return, in time order, then the unknown
//! calls before that return. Each refinement below only skips candidates
//! or configurations when some linearization avoiding them exists whenever
//! any does, so the verdict stays exact:
//!
//! - A read or refused compare-and-set that holds in the current state goes
//!   next, alone (it changes nothing; moving it earlier keeps real time).
//! - An unknown operation is skipped if it would not change the state, or
//!   if no candidate that could follow it would see the difference
//!   ([`Search::useful`]): it can then be moved later, or to never.
//! - An operation that would overwrite a value that cannot be written again
//!   while a pending acknowledged operation needs it is a dead branch.
//! - Interchangeable unknown operations (same step; or writes of values no
//!   pending operation watches) are tried earliest-called first only, and
//!   the memo counts such writes instead of naming them.
//! - In the memo, a state no pending operation watches is recorded as
//!   [`UNOBSERVED`]: no pending operation can tell it apart from another.

use std::time::{Duration, Instant};

use crate::lists::{Kind, Lists, KNOWN_HEAD, UNKNOWN_HEAD};
use crate::memo::Memo;
use crate::model::{History, StateId, Step, UNOBSERVED};
use crate::{Op, Operation, Value};

/// How many loop iterations between two looks at the clock.
const CLOCK_EVERY: u64 = 4096;
/// The memo's memory cap: past it the search gives up as if out of time
/// (about ten million configurations).
const MEMO_BYTES_MAX: usize = 1 << 30;
/// How many of the deepest prefix's last operations a dead end keeps.
const RECENT: usize = 6;
/// How many of the operations waiting for a stranded value a dead end keeps.
const WAITING: usize = 3;

/// Why a candidate cannot be linearized next (or `Possible`, when it can
/// but every continuation failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    Possible,
    /// Its outcome is impossible in the current state.
    Impossible,
    /// Unknown, and it would not change the state.
    NoEffect,
    /// It would overwrite a value that can never come back but that a
    /// pending acknowledged operation still needs.
    Strands,
    /// Unknown, and an equivalent unknown operation called earlier is
    /// pending: that one goes first.
    Deferred,
    /// Unknown, and no operation that could go right after it would tell
    /// the value it puts from the current one.
    Useless,
}

/// The deepest point the search reached: a dead end.
#[derive(Debug, Clone)]
pub(crate) struct DeadEnd {
    /// Operations linearized, of which `known` acknowledged.
    pub(crate) depth: usize,
    pub(crate) known: usize,
    /// The register's value there (not canonical).
    pub(crate) state: Value,
    /// The last few operations linearized, oldest first.
    pub(crate) recent: Vec<usize>,
    /// The operations that could have come next, and why each did not.
    pub(crate) candidates: Vec<(usize, Attempt)>,
    /// The acknowledged operation whose return closes the window.
    pub(crate) first_return: Option<usize>,
    /// If a candidate [`Attempt::Strands`]: a few acknowledged operations
    /// not yet linearized that need the current state.
    pub(crate) waiting: Vec<usize>,
}

#[derive(Debug)]
pub(crate) enum Found {
    Linearizable,
    Violation(DeadEnd),
    OutOfBudget { explored: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    /// The call node of the operation linearized.
    node: usize,
    /// The register before it, canonical and real.
    state: StateId,
    real: Value,
    /// Linearized without considering alternatives: if it fails, so does
    /// the configuration before it.
    forced: bool,
}

#[derive(Debug)]
pub(crate) struct Search<'a> {
    history: &'a History,
    ops: &'a [Operation],
    lists: Lists,
    /// The register, canonical and real (for explanations).
    state: StateId,
    real: Value,
    /// Per state: acknowledged operations not yet linearized that need it.
    needed: Vec<usize>,
    /// Per state: operations not yet linearized that watch it.
    watchers: Vec<usize>,
    /// Per state: the unknown compare-and-sets expecting it.
    maybe_swaps: Vec<Vec<usize>>,
    /// Per kind of unknown operation: the rank of the next one to try.
    class_next: Vec<usize>,
    known_left: usize,
    /// Per operation: whether it is linearized.
    linearized: Vec<bool>,
    memo: Memo,
    /// Scratch: the unknown operations' part of a memo key.
    rest: Vec<u64>,
    stack: Vec<Frame>,
    deepest: Option<DeadEnd>,
}

impl<'a> Search<'a> {
    pub(crate) fn new(history: &'a History, ops: &'a [Operation]) -> Search<'a> {
        let mut maybe_swaps = vec![Vec::new(); history.producers.len()];
        for (i, p) in history.ops.iter().enumerate() {
            if let Step::MaybeSwap { expect, .. } = p.step {
                maybe_swaps[expect as usize].push(i);
            }
        }
        Search {
            history,
            ops,
            lists: Lists::new(history),
            state: history.initial,
            real: history.initial_value,
            needed: history.needed.clone(),
            watchers: history.watchers.clone(),
            maybe_swaps,
            class_next: vec![0; history.classes],
            known_left: history.known,
            linearized: vec![false; history.ops.len()],
            memo: Memo::new(history.known),
            rest: Vec::new(),
            stack: Vec::new(),
            deepest: None,
        }
    }

    /// Searches for a linearization; gives up after `budget`.
    pub(crate) fn run(mut self, budget: Duration) -> Found {
        let start = Instant::now();
        let mut iterations: u64 = 0;
        // Just arrived at this configuration (not back from a child).
        let mut fresh = true;
        // The next node to try here; `None`: nothing left, backtrack.
        let mut cursor = None;
        // The position of the first known return: unknown calls after it
        // cannot go next. Valid while the cursor is in the unknown list.
        let mut window_end = usize::MAX;
        // Whether an unknown write of an unwatched value was tried here.
        let mut dead_tried = false;
        loop {
            if self.known_left == 0 {
                return Found::Linearizable;
            }
            iterations += 1;
            if iterations.is_multiple_of(CLOCK_EVERY)
                && (start.elapsed() > budget || self.memo.bytes() > MEMO_BYTES_MAX)
            {
                return Found::OutOfBudget {
                    explored: self.memo.explored(),
                };
            }
            if fresh {
                fresh = false;
                cursor = Some(self.lists.next(KNOWN_HEAD));
                let harmless = self.lists.known_window().find(|&n| {
                    let step = self.history.ops[self.lists.node(n).op].step;
                    matches!(step, Step::Read(_) | Step::Keep { .. })
                        && step.apply(self.state).is_some()
                });
                if let Some(node) = harmless {
                    if self.enter(node, self.state, true) {
                        fresh = true;
                        continue;
                    }
                    cursor = None;
                }
            }
            let candidate = match cursor {
                None => None,
                Some(c) => match self.lists.node(c).kind {
                    Kind::Call => Some(c),
                    Kind::Return | Kind::KnownHead => {
                        window_end = self.lists.node(c).pos;
                        cursor = Some(self.lists.next(UNKNOWN_HEAD));
                        dead_tried = false;
                        continue;
                    }
                    Kind::UnknownCall if self.lists.node(c).pos < window_end => Some(c),
                    Kind::UnknownCall | Kind::UnknownHead => None,
                },
            };
            if let Some(c) = candidate {
                let op = self.lists.node(c).op;
                let skip = self.dead_write(op) && std::mem::replace(&mut dead_tried, true);
                if !skip {
                    if let Ok(after) = self.attempt(op, window_end) {
                        if self.enter(c, after, false) {
                            fresh = true;
                            continue;
                        }
                    }
                }
                cursor = Some(self.lists.next(c));
                continue;
            }
            // Nothing can go next from here: backtrack.
            self.note_dead_end();
            let Some(frame) = self.stack.pop() else {
                let deepest = match self.deepest.take() {
                    Some(deepest) => deepest,
                    None => self.dead_end(),
                };
                return Found::Violation(deepest);
            };
            self.undo(frame);
            let after = self.lists.next(frame.node);
            cursor = (!frame.forced).then_some(after);
            if self.lists.node(frame.node).kind == Kind::UnknownCall {
                window_end = self.lists.window_end();
                dead_tried = self
                    .lists
                    .unknown_before(after)
                    .any(|n| self.dead_write(self.lists.node(n).op));
            }
        }
    }

    /// Whether `op` is an unknown write of a value that no pending
    /// operation watches: all such writes are interchangeable.
    fn dead_write(&self, op: usize) -> bool {
        match self.history.ops[op].step {
            Step::MaybeWrite(v) => self.watchers[v as usize] == 0,
            _ => false,
        }
    }

    /// Whether `op` can be linearized now, and the state after it.
    /// `window_end` is the position of the first known return (only used
    /// for unknown operations, which are only tried after the known ones).
    fn attempt(&self, op: usize, window_end: usize) -> Result<StateId, Attempt> {
        let p = &self.history.ops[op];
        if let Some((class, rank)) = p.class {
            if self.class_next[class] != rank {
                return Err(Attempt::Deferred);
            }
        }
        let after = p.step.apply(self.state).ok_or(Attempt::Impossible)?;
        if after == self.state {
            return if p.step.is_known() {
                Ok(after)
            } else {
                Err(Attempt::NoEffect)
            };
        }
        // Leaving `state`: can it come back, if someone still needs it?
        let from = self.state as usize;
        if self.history.producers[from] <= 1 {
            let own = usize::from(p.step.needs() == Some(self.state));
            if self.needed[from] > own {
                return Err(Attempt::Strands);
            }
        }
        if !p.step.is_known() && !self.useful(op, after, window_end) {
            return Err(Attempt::Useless);
        }
        Ok(after)
    }

    /// Whether linearizing the unknown operation `op`, taking the register
    /// from `self.state` to `after`, can be of use to an operation that
    /// could go right after it.
    ///
    /// If in some linearization nothing between `op` and the next change of
    /// state tells `after` from the state before (a read of `after`, a
    /// compare-and-set expecting `after`, or one refused because the state
    /// was no longer the one before), `op` can be moved to never; otherwise
    /// it can be moved later, to just before the first operation that does
    /// (moving an operation without a return later never breaks real time).
    /// That operation could go next right after `op`, so it is a candidate
    /// now: linearizing an unknown operation does not widen the window.
    fn useful(&self, op: usize, after: StateId, window_end: usize) -> bool {
        let known =
            self.lists
                .known_window()
                .any(|n| match self.history.ops[self.lists.node(n).op].step {
                    Step::Read(v) | Step::Swap { expect: v, .. } => v == after,
                    Step::Keep { expect } => expect == self.state,
                    _ => false,
                });
        known
            || self.maybe_swaps[after as usize]
                .iter()
                .any(|&u| u != op && !self.linearized[u] && self.lists.call_pos(u) < window_end)
    }

    /// Linearizes the candidate at `node`, moving the register to `after`,
    /// unless the configuration that makes was explored already (then
    /// nothing changes and the answer is `false`).
    fn enter(&mut self, node: usize, after: StateId, forced: bool) -> bool {
        self.linearize(node, after, forced);
        let state = if self.watchers[self.state as usize] > 0 {
            self.state
        } else {
            UNOBSERVED
        };
        self.fill_rest();
        if self.memo.visit(state, &self.rest) {
            return true;
        }
        if let Some(frame) = self.stack.pop() {
            self.undo(frame);
        }
        false
    }

    /// The unknown operations' part of the current configuration's memo
    /// key: the linearized ones as a bitset, except the writes of values no
    /// pending operation watches, which are only counted (first word).
    ///
    /// Two configurations with the same acknowledged operations and the same
    /// key have the same pending watchers (unknown compare-and-sets are in
    /// the bitset), so the same dead writes, and as many of them pending.
    /// Those pending differ at most in their call times, and only ones
    /// called before the window's end can differ (a linearized operation
    /// was called before the window's end, which only moves forward): all
    /// available, with return +infinity, they are interchangeable.
    fn fill_rest(&mut self) {
        let known = self.history.known;
        let unknown = self.history.ops.len() - known;
        self.rest.clear();
        if unknown == 0 {
            return;
        }
        self.rest.resize(1 + unknown.div_ceil(64), 0);
        for j in 0..unknown {
            let op = known + j;
            if !self.linearized[op] {
                continue;
            }
            if self.dead_write(op) {
                self.rest[0] += 1;
            } else {
                self.rest[1 + j / 64] |= 1 << (j % 64);
            }
        }
    }

    /// Linearizes the candidate at `node`, moving the register to `after`.
    fn linearize(&mut self, node: usize, after: StateId, forced: bool) {
        let op = self.lists.node(node).op;
        let step = self.history.ops[op].step;
        self.stack.push(Frame {
            node,
            state: self.state,
            real: self.real,
            forced,
        });
        self.state = after;
        self.real = real_apply(self.real, &self.ops[self.history.ops[op].index].op);
        if let Some(needs) = step.needs() {
            self.needed[needs as usize] -= 1;
        }
        if let Some(watched) = step.watches() {
            self.watchers[watched as usize] -= 1;
        }
        if let Some((class, _)) = self.history.ops[op].class {
            self.class_next[class] += 1;
        }
        if step.is_known() {
            self.known_left -= 1;
            self.memo.set(op);
        }
        self.linearized[op] = true;
        self.lists.lift(op);
    }

    /// Reverses the `linearize` that pushed `frame`.
    fn undo(&mut self, frame: Frame) {
        let op = self.lists.node(frame.node).op;
        let step = self.history.ops[op].step;
        self.lists.unlift(op);
        self.linearized[op] = false;
        if step.is_known() {
            self.known_left += 1;
            self.memo.clear(op);
        }
        if let Some((class, _)) = self.history.ops[op].class {
            self.class_next[class] -= 1;
        }
        if let Some(watched) = step.watches() {
            self.watchers[watched as usize] += 1;
        }
        if let Some(needs) = step.needs() {
            self.needed[needs as usize] += 1;
        }
        self.state = frame.state;
        self.real = frame.real;
    }

    /// Keeps the current configuration (where nothing can go next) as the
    /// explanation if it is the deepest dead end so far.
    fn note_dead_end(&mut self) {
        let depth = self.stack.len();
        if self.deepest.as_ref().is_none_or(|d| d.depth < depth) {
            self.deepest = Some(self.dead_end());
        }
    }

    /// The current configuration, as a dead end.
    fn dead_end(&self) -> DeadEnd {
        let depth = self.stack.len();
        let window_end = self.lists.window_end();
        let nodes: Vec<usize> = self
            .lists
            .known_window()
            .chain(
                self.lists
                    .unknown_before(UNKNOWN_HEAD)
                    .take_while(|&n| self.lists.node(n).pos < window_end),
            )
            .collect();
        let candidates: Vec<(usize, Attempt)> = nodes
            .into_iter()
            .map(|n| {
                let op = self.lists.node(n).op;
                let attempt = self.attempt(op, window_end).err();
                (op, attempt.unwrap_or(Attempt::Possible))
            })
            .collect();
        let waiting = if candidates.iter().any(|&(_, a)| a == Attempt::Strands) {
            (0..self.history.known)
                .filter(|&op| {
                    !self.linearized[op] && self.history.ops[op].step.needs() == Some(self.state)
                })
                .take(WAITING)
                .collect()
        } else {
            Vec::new()
        };
        let start = depth.saturating_sub(RECENT);
        DeadEnd {
            depth,
            known: self.history.known - self.known_left,
            state: self.real,
            recent: self.stack[start..]
                .iter()
                .map(|f| self.lists.node(f.node).op)
                .collect(),
            candidates,
            first_return: self.lists.first_return().map(|n| self.lists.node(n).op),
            waiting,
        }
    }
}

/// The register's real value after `op` from `state`. Only called on
/// operations the search found possible, whose outcome therefore matches.
fn real_apply(state: Value, op: &Op) -> Value {
    match op {
        Op::Write(v) => Some(*v),
        Op::Cas { expect, new } if *expect == state => Some(*new),
        Op::Cas { .. } | Op::Read => state,
    }
}
