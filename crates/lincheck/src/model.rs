//! The history, prepared for the search: each operation reduced to a
//! [`Step`] over canonical states, sorted, and checked for the mistakes that
//! need no search.

use std::collections::HashMap;

use crate::explain::describe;
use crate::{Op, Operation, Outcome, Value};

/// A register state as the search sees it: an index into the values that
/// matter, with [`ABSENT`] and [`UNOBSERVED`] fixed.
pub(crate) type StateId = u32;

/// The key is absent (`None`).
pub(crate) const ABSENT: StateId = 0;
/// The key holds some value that no operation reads or expects: all such
/// values behave the same for every operation, so they are one state.
pub(crate) const UNOBSERVED: StateId = 1;

/// An operation together with its outcome, over canonical states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Step {
    /// An acknowledged `Write`.
    Write(StateId),
    /// An acknowledged `Cas` that applied: needs `expect`, leaves `new`.
    Swap { expect: StateId, new: StateId },
    /// An acknowledged `Cas` that did not apply: needs anything but `expect`.
    Keep { expect: StateId },
    /// An acknowledged `Read`: needs the value it saw.
    Read(StateId),
    /// A `Write` without an answer.
    MaybeWrite(StateId),
    /// A `Cas` without an answer: applies if `expect` holds, else nothing.
    MaybeSwap { expect: StateId, new: StateId },
}

impl Step {
    /// The state after this step from `state`, or `None` if the recorded
    /// outcome is impossible there.
    pub(crate) fn apply(self, state: StateId) -> Option<StateId> {
        match self {
            Step::Write(v) | Step::MaybeWrite(v) => Some(v),
            Step::Swap { expect, new } => (state == expect).then_some(new),
            Step::Keep { expect } => (state != expect).then_some(state),
            Step::Read(v) => (state == v).then_some(state),
            Step::MaybeSwap { expect, new } => Some(if state == expect { new } else { state }),
        }
    }

    /// Whether the operation was acknowledged (and so must be linearized).
    pub(crate) fn is_known(self) -> bool {
        !matches!(self, Step::MaybeWrite(_) | Step::MaybeSwap { .. })
    }

    /// The state an acknowledged operation needs to hold when it is
    /// linearized, if it needs one exact state.
    pub(crate) fn needs(self) -> Option<StateId> {
        match self {
            Step::Swap { expect, .. } => Some(expect),
            Step::Read(v) => Some(v),
            _ => None,
        }
    }

    /// The state whose presence or absence decides this step's outcome.
    pub(crate) fn watches(self) -> Option<StateId> {
        match self {
            Step::Read(v)
            | Step::Swap { expect: v, .. }
            | Step::Keep { expect: v }
            | Step::MaybeSwap { expect: v, .. } => Some(v),
            Step::Write(_) | Step::MaybeWrite(_) => None,
        }
    }

    /// The state this step may produce (if it takes effect).
    fn produces(self) -> Option<StateId> {
        match self {
            Step::Write(v) | Step::MaybeWrite(v) => Some(v),
            Step::Swap { new, .. } | Step::MaybeSwap { new, .. } => Some(new),
            Step::Keep { .. } | Step::Read(_) => None,
        }
    }
}

/// One operation of the prepared history.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// Index into the caller's history.
    pub(crate) index: usize,
    pub(crate) step: Step,
    pub(crate) call: u64,
    /// `None`: +infinity.
    pub(crate) ret: Option<u64>,
    /// For unknown operations: (kind, rank). Unknown operations of one kind
    /// have the same step; rank orders them by call.
    pub(crate) class: Option<(usize, usize)>,
}

/// The prepared history of one key.
#[derive(Debug, Clone)]
pub(crate) struct History {
    /// Acknowledged operations first (`0..known`), then unknown ones; each
    /// part sorted by call time. The position is the operation's bit in the
    /// memo's bitset.
    pub(crate) ops: Vec<Prepared>,
    pub(crate) known: usize,
    pub(crate) initial: StateId,
    /// The caller's initial value (the canonical one may be `UNOBSERVED`).
    pub(crate) initial_value: Value,
    /// Per state: how many sources may produce it (operations, and the
    /// initial value).
    pub(crate) producers: Vec<usize>,
    /// Per state: how many acknowledged operations need it.
    pub(crate) needed: Vec<usize>,
    /// Per state: how many operations watch it ([`Step::watches`]).
    pub(crate) watchers: Vec<usize>,
    /// How many kinds of unknown operations there are.
    pub(crate) classes: usize,
    /// Unknown reads, dropped.
    pub(crate) dropped: usize,
}

/// Why `op` is malformed, if it is.
fn malformed(op: &Operation) -> Option<&'static str> {
    match (&op.op, &op.outcome) {
        (_, Outcome::Unknown) => None,
        (Op::Write(_), Outcome::Written)
        | (Op::Cas { .. }, Outcome::Swapped(_))
        | (Op::Read, Outcome::Read(_)) => match op.return_ns {
            Some(ret) if ret < op.call_ns => Some("it returned before it was called"),
            _ => None,
        },
        _ => Some("its outcome is not one this kind of operation can have"),
    }
}

/// Canonical state ids: the values that some operation reads or expects get
/// one each; every other value is [`UNOBSERVED`].
#[derive(Debug)]
struct States {
    ids: HashMap<u64, StateId>,
}

impl States {
    fn new(history: &[Operation]) -> States {
        let mut ids = HashMap::new();
        for op in history {
            let seen = match (&op.op, &op.outcome) {
                (Op::Read, Outcome::Read(Some(v))) => Some(*v),
                (
                    Op::Cas {
                        expect: Some(v), ..
                    },
                    _,
                ) => Some(*v),
                _ => None,
            };
            if let Some(v) = seen {
                let next = StateId::try_from(ids.len() + 2).unwrap_or(StateId::MAX);
                ids.entry(v).or_insert(next);
            }
        }
        States { ids }
    }

    fn id(&self, value: Value) -> StateId {
        match value {
            None => ABSENT,
            Some(v) => self.ids.get(&v).copied().unwrap_or(UNOBSERVED),
        }
    }

    fn count(&self) -> usize {
        self.ids.len() + 2
    }
}

/// Prepares `history` for the search, or explains why it is not
/// linearizable without one (malformed operations, impossible values).
pub(crate) fn prepare(history: &[Operation], initial: Value) -> Result<History, String> {
    if history.len() >= (StateId::MAX as usize) {
        return Err(format!(
            "history too long: {} operations (at most {} per key)",
            history.len(),
            StateId::MAX - 1
        ));
    }
    for (index, op) in history.iter().enumerate() {
        if let Some(why) = malformed(op) {
            return Err(format!(
                "malformed operation #{index}, {why}: {}",
                describe(op)
            ));
        }
    }
    let states = States::new(history);
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    let mut dropped = 0;
    for (index, op) in history.iter().enumerate() {
        let step = match (&op.op, &op.outcome) {
            (Op::Read, Outcome::Unknown) => {
                dropped += 1;
                continue;
            }
            (Op::Read, Outcome::Read(v)) => Step::Read(states.id(*v)),
            (Op::Write(v), Outcome::Unknown) => Step::MaybeWrite(states.id(Some(*v))),
            (Op::Write(v), _) => Step::Write(states.id(Some(*v))),
            (Op::Cas { expect, new }, Outcome::Unknown) => Step::MaybeSwap {
                expect: states.id(*expect),
                new: states.id(Some(*new)),
            },
            (Op::Cas { expect, new }, Outcome::Swapped(true)) => Step::Swap {
                expect: states.id(*expect),
                new: states.id(Some(*new)),
            },
            (Op::Cas { expect, .. }, _) => Step::Keep {
                expect: states.id(*expect),
            },
            // Ruled out by `malformed` above.
            (Op::Read, _) => return Err(format!("malformed operation #{index}")),
        };
        let prepared = Prepared {
            index,
            step,
            call: op.call_ns,
            ret: if step.is_known() { op.return_ns } else { None },
            class: None,
        };
        if step.is_known() {
            known.push(prepared);
        } else {
            unknown.push(prepared);
        }
    }
    known.sort_by_key(|p| (p.call, p.ret.unwrap_or(u64::MAX), p.index));
    unknown.sort_by_key(|p| (p.call, p.index));

    // Unknown operations with the same step are interchangeable.
    let mut classes: HashMap<Step, (usize, usize)> = HashMap::new();
    for p in &mut unknown {
        let next = classes.len();
        let entry = classes.entry(p.step).or_insert((next, 0));
        p.class = Some(*entry);
        entry.1 += 1;
    }

    let initial_id = states.id(initial);
    let mut producers = vec![0; states.count()];
    let mut needed = vec![0; states.count()];
    let mut watchers = vec![0; states.count()];
    producers[initial_id as usize] += 1;
    for p in known.iter().chain(&unknown) {
        if let Some(s) = p.step.produces() {
            producers[s as usize] += 1;
        }
        if let Some(s) = p.step.needs() {
            needed[s as usize] += 1;
        }
        if let Some(s) = p.step.watches() {
            watchers[s as usize] += 1;
        }
    }
    for p in &known {
        if let Some(s) = p.step.needs() {
            if producers[s as usize] == 0 {
                let op = &history[p.index];
                let value = match (&op.op, &op.outcome) {
                    (Op::Cas { expect, .. }, _) => *expect,
                    (_, Outcome::Read(v)) => *v,
                    _ => None,
                };
                return Err(format!(
                    "operation #{} needs the key to hold {value:?}, which no operation \
                     writes and which is not the initial value ({initial:?}): {}",
                    p.index,
                    describe(op)
                ));
            }
        }
    }
    let known_count = known.len();
    known.extend(unknown);
    Ok(History {
        ops: known,
        known: known_count,
        initial: initial_id,
        initial_value: initial,
        producers,
        needed,
        watchers,
        classes: classes.len(),
        dropped,
    })
}
