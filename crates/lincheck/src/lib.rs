//! A linearizability checker for one key, modelled as a register with
//! compare-and-set.
//!
//! # Model
//!
//! The key holds a [`Value`]: `None` (absent) or `Some(v)`. Its sequential
//! specification:
//!
//! - `Write(v)`: the key becomes `Some(v)`; the outcome is `Written`.
//! - `Cas { expect, new }`: if the key holds `expect` it becomes `Some(new)`
//!   and the outcome is `Swapped(true)`, otherwise it is unchanged and the
//!   outcome is `Swapped(false)`.
//! - `Read`: the outcome is `Read(current value)`.
//!
//! A history is linearizable if its operations can be put in one order that
//! the specification accepts (each acknowledged operation with the outcome
//! it was acknowledged with) and that respects real time: if `a` returned
//! before `b` was called, `a` comes first. Linearizability is compositional
//! (P-compositional, Horn & Kroening), so a multi-key history is checked by
//! splitting it per key and calling [`check`] once per key.
//!
//! **Real-time convention.** `a` must precede `b` only if
//! `a.return_ns < b.call_ns`, strictly: an operation that returned at the
//! very nanosecond another was called is treated as concurrent with it. This
//! is the conservative choice (it admits more orders, so it never reports a
//! violation that a finer clock could have explained away).
//!
//! **Unknown operations.** An [`Outcome::Unknown`] operation (timed out,
//! connection lost) may or may not have taken effect. It is treated as
//! returning at +infinity, with any outcome acceptable: a `Write` or `Cas`
//! may take effect at any point after its call, or never (which is the same
//! as taking effect after everything else). Its `return_ns` is ignored. An
//! unknown `Read` observes nothing and constrains nothing: it is dropped. An
//! acknowledged operation without a `return_ns` is taken to have returned at
//! +infinity too.
//!
//! # Algorithm
//!
//! The search is Wing & Gong's (J. M. Wing and C. Gong, *Testing and
//! verifying concurrent objects*, JPDC 17, 1993) with the memoisation of
//! G. Lowe (*Testing for linearizability*, Concurrency and Computation 29,
//! 2017), laid out as in Porcupine (A. Athalye, github.com/anishathalye/porcupine):
//! calls and returns are sorted into one doubly linked list; a depth-first
//! search with an explicit stack repeatedly linearizes some pending call
//! that precedes the first remaining return (lifting the call and its return
//! out of the list), and backtracks (relinking them) when none can go next.
//! A set of (linearized operations as a bitset, register state) pairs
//! already explored prunes the search: reaching the same pair again cannot
//! lead anywhere new.
//!
//! Refinements, each exact (it only skips orders or configurations when
//! another order, still explored, succeeds whenever they would):
//!
//! - **Harmless operations go first.** A pending read or refused
//!   compare-and-set that holds in the current state is linearized next
//!   without trying alternatives: it changes nothing, and moving it earlier
//!   (to where it can go next) breaks no real-time order.
//! - **Unknown operations are tried last, and only when useful.** They are
//!   kept in a list of their own (their returns, at +infinity, would never
//!   be reached); the search is done once every acknowledged operation is
//!   linearized (the unknown ones left go after them, or never). An unknown
//!   operation is tried only if it changes the state and some operation that
//!   could go right after it would see the difference (a read of the value
//!   it puts, a compare-and-set expecting that value, or one refused because
//!   the state changed): otherwise it can be moved later, or to never.
//! - **Interchangeable unknown operations.** Unknown operations with the
//!   same effect, or writes of values that no pending operation reads or
//!   expects any more, are tried in call order only (and the memo counts
//!   such writes rather than naming them): k of them make k + 1
//!   configurations, not 2^k.
//! - **Values nobody watches are one value.** A value that no pending
//!   operation reads or expects cannot be told apart from any other such
//!   value by what follows, so the memo records all of them as one state.
//! - **Values that cannot come back.** When the register leaves a value
//!   that at most one operation (or the initial value) produces while an
//!   acknowledged operation still to be linearized needs it (a read of it,
//!   a successful compare-and-set expecting it), the branch is dead. With
//!   the nemesis writing each value once, this cuts short every branch that
//!   overwrote a value a pending read still has to see.
//! - **Pre-checks.** Malformed operations (an outcome that does not fit the
//!   operation, a return before the call) and acknowledged operations that
//!   need a value nothing writes are reported without a search.
//!
//! None of these relies on values being unique; uniqueness only makes them
//! prune more. A naive search over every order agrees with [`check`] on
//! small random histories with repeated values, many unknown operations and
//! ties in time (`tests/brute_force.rs`).
//!
//! The search stops with [`Verdict::Unknown`] when the budget (wall-clock
//! time, looked at every few thousand steps) is spent, or when the memo
//! reaches about 1 GiB.

mod explain;
mod lists;
mod memo;
mod model;
mod search;

use std::time::Duration;

/// Values are unique per write (the nemesis writes each value once), `None`
/// = key absent. (Uniqueness is not needed for correctness, only for speed.)
pub type Value = Option<u64>;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put the value.
    Write(u64),
    /// Put `new` if the key holds `expect`.
    Cas { expect: Value, new: u64 },
    /// Get the value.
    Read,
}

/// What a client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A `Write` acknowledged.
    Written,
    /// A `Cas` acknowledged: whether it applied.
    Swapped(bool),
    /// A `Read` acknowledged, with what it saw.
    Read(Value),
    /// No answer (timeout, connection lost): may or may not have taken effect.
    Unknown,
}

/// One operation of one key's history.
#[derive(Debug, Clone)]
pub struct Operation {
    /// Who issued it (only shown in explanations).
    pub client: u64,
    pub op: Op,
    /// Invocation time (monotonic, ns).
    pub call_ns: u64,
    /// Response time (monotonic, ns); `None` for [`Outcome::Unknown`]
    /// (treated as returning at +infinity).
    pub return_ns: Option<u64>,
    pub outcome: Outcome,
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order exists. `explanation` is human-readable: the longest
    /// linearizable prefix found (its length and its last few operations) and
    /// the operations that could not be placed next, each with client, op,
    /// call/return times and outcome (or, for a pre-check, the offending
    /// operation).
    Violation {
        explanation: String,
    },
    /// The search exceeded the budget (or the memo's memory cap, about
    /// 1 GiB); `explored` states (distinct configurations: linearized set
    /// and register state) visited.
    Unknown {
        explored: u64,
    },
}

/// Whether `history` (one key's operations, in any order) is linearizable
/// for a register with compare-and-set starting at `initial`. Gives up with
/// [`Verdict::Unknown`] once the search has run for `budget`.
pub fn check(history: &[Operation], initial: Value, budget: Duration) -> Verdict {
    let prepared = match model::prepare(history, initial) {
        Ok(prepared) => prepared,
        Err(explanation) => return Verdict::Violation { explanation },
    };
    match search::Search::new(&prepared, history).run(budget) {
        search::Found::Linearizable => Verdict::Linearizable,
        search::Found::Violation(dead_end) => Verdict::Violation {
            explanation: explain::dead_end(history, &prepared, &dead_end),
        },
        search::Found::OutOfBudget { explored } => Verdict::Unknown { explored },
    }
}
