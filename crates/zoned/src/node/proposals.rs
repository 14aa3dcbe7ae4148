//! Proposals waiting for their entries. Each is matched to its caller by
//! the (index, term) it was appended at: the entry applied at that index
//! settles it, as applied if the term is the same, as not applied (another
//! leader's entry took the index) if not. Answers are held until the batch
//! that applied the entry is written.
//!
//! Safety: that is the only way a proposal is ever told "not applied"
//! (which lets the API retry it). An entry cut from this server's log by
//! another leader is *not* settled then: another server may still hold it
//! and, as leader of a later term, commit it at the same index and term
//! (Raft's log matching makes (index, term) name one entry zone-wide). So
//! a cut proposal stays queued beside the one that took its index here,
//! until whatever is committed at that index is applied, or until an entry
//! of a later term is applied at a lower index: terms never decrease along
//! a Raft log, so once index j holds a term-t' entry in the committed log,
//! every committed entry after j has a term of at least t', and a proposal
//! of an earlier term at or after j can never be committed. Without that
//! rule a proposal cut from a deposed leader's log waited until the zone
//! next wrote at its index, forever in a zone that wrote nothing more (a
//! seeded run found it: the final write after the faults never answered).

use std::collections::VecDeque;

use zone_proto::v1::CommandResult;

use super::handle::Reply;
use super::NodeError;

/// Who waits for a proposal.
#[derive(Debug)]
pub(crate) enum Waiter {
    Command(Reply<CommandResult>),
    Conf(Reply<()>),
}

/// What applying one entry produced, for its proposer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// A command's answer (`None`: the command gave none).
    Command(Option<CommandResult>),
    /// A configuration change, applied or rejected with a reason.
    Conf(Result<(), String>),
    /// A new leader's empty entry, or an entry that could not be decoded.
    Nothing,
}

/// A proposer and what it is told.
pub(crate) type Settled = (Waiter, Result<Outcome, NodeError>);

impl Waiter {
    /// Tells the proposer how its entry ended: an outcome of another kind
    /// than its proposal means the entry at its index was not its own.
    pub(crate) fn answer(self, outcome: Result<Outcome, NodeError>) {
        match self {
            Waiter::Command(reply) => {
                let r = match outcome {
                    Ok(Outcome::Command(Some(r))) => Ok(r),
                    Ok(_) => Err(NodeError::Dropped),
                    Err(e) => Err(e),
                };
                count(r.is_ok());
                let _ = reply.send(r);
            }
            Waiter::Conf(reply) => {
                let r = match outcome {
                    Ok(Outcome::Conf(Ok(()))) => Ok(()),
                    Ok(Outcome::Conf(Err(e))) => Err(NodeError::Rejected(e)),
                    Ok(_) => Err(NodeError::Dropped),
                    Err(e) => Err(e),
                };
                count(r.is_ok());
                let _ = reply.send(r);
            }
        }
    }
}

/// Counts a proposal's end, as its proposer is told it.
fn count(ok: bool) {
    let m = &*crate::metrics::METRICS;
    if ok {
        m.proposals_committed.inc();
    } else {
        m.proposals_failed.inc();
    }
}

/// A proposal waiting for its entry to be applied.
#[derive(Debug)]
struct Pending {
    index: u64,
    term: u64,
    waiter: Waiter,
}

/// The proposals of this server, in index order.
#[derive(Debug, Default)]
pub(crate) struct Proposals {
    queue: VecDeque<Pending>,
    /// The highest term of an entry applied (or a snapshot installed).
    applied_term: u64,
}

impl Proposals {
    /// A proposal appended at `index` in `term`. A proposal of an earlier
    /// term at the same or a later index (cut from this server's log) stays
    /// queued: see the module doc.
    pub(crate) fn push(&mut self, index: u64, term: u64, waiter: Waiter) {
        let at = self
            .queue
            .partition_point(|p| (p.index, p.term) < (index, term));
        assert!(
            self.queue
                .get(at)
                .is_none_or(|p| (p.index, p.term) != (index, term)),
            "two proposals at index {index} in term {term}"
        );
        self.queue.insert(
            at,
            Pending {
                index,
                term,
                waiter,
            },
        );
    }

    /// The entry at `index` of `term` was applied with `outcome`: it settles
    /// the proposal made at that index in that term, and as not applied the
    /// others made at that index (in other terms: their entries can no
    /// longer be committed anywhere), any still queued before it, and any
    /// queued after it from an earlier term (see the module doc).
    pub(crate) fn applied(
        &mut self,
        index: u64,
        term: u64,
        outcome: Outcome,
        out: &mut Vec<Settled>,
    ) {
        let mut outcome = Some(outcome);
        while self.queue.front().is_some_and(|p| p.index <= index) {
            let p = self.queue.pop_front().expect("front exists");
            let result = if p.index == index && p.term == term {
                outcome.take().ok_or(NodeError::Dropped)
            } else {
                Err(NodeError::Dropped)
            };
            out.push((p.waiter, result));
        }
        // Only when the applied term rose: a proposal is made in its
        // leader's term, never below that of an entry it has applied, so
        // after one scan none is below `applied_term` until that rises (one
        // scan per term, not per entry).
        if term > self.applied_term {
            self.applied_term = term;
        } else {
            return;
        }
        if self.queue.iter().any(|p| p.term < term) {
            let (dead, live): (VecDeque<_>, VecDeque<_>) =
                self.queue.drain(..).partition(|p| p.term < term);
            self.queue = live;
            out.extend(
                dead.into_iter()
                    .map(|p| (p.waiter, Err(NodeError::Dropped))),
            );
        }
    }

    /// A snapshot up to `index` (its last entry of `term`) replaced the
    /// log: the proposals at or below it were replaced or applied
    /// elsewhere, and which cannot be told; those after it of an earlier
    /// term can no longer be committed (see the module doc).
    pub(crate) fn overtaken_by_snapshot(&mut self, index: u64, term: u64, out: &mut Vec<Settled>) {
        while self.queue.front().is_some_and(|p| p.index <= index) {
            let p = self.queue.pop_front().expect("front exists");
            out.push((p.waiter, Err(NodeError::LeadershipChanged)));
        }
        self.applied_term = self.applied_term.max(term);
        let (dead, live): (VecDeque<_>, VecDeque<_>) =
            self.queue.drain(..).partition(|p| p.term < term);
        self.queue = live;
        out.extend(
            dead.into_iter()
                .map(|p| (p.waiter, Err(NodeError::Dropped))),
        );
    }

    /// Fails every proposal (the driver stops).
    pub(crate) fn fail_all(&mut self, err: NodeError) {
        for p in self.queue.drain(..) {
            p.waiter.answer(Err(err.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot::{self, error::TryRecvError};
    use zone_proto::v1::{command_result, PutResponse, ResponseHeader};

    type Rx = oneshot::Receiver<Result<CommandResult, NodeError>>;

    fn command(p: &mut Proposals, index: u64, term: u64) -> Rx {
        let (tx, rx) = oneshot::channel();
        p.push(index, term, Waiter::Command(tx));
        rx
    }

    /// A command's answer, told apart by its revision.
    fn result(revision: u64) -> CommandResult {
        CommandResult {
            result: Some(command_result::Result::Put(PutResponse {
                header: Some(ResponseHeader {
                    revision,
                    ..ResponseHeader::default()
                }),
                prev_kv: None,
            })),
        }
    }

    fn answer_all(settled: Vec<Settled>) {
        for (w, r) in settled {
            w.answer(r);
        }
    }

    #[test]
    fn a_proposal_is_settled_by_the_entry_at_its_index_and_term_only() {
        let mut p = Proposals::default();
        let mut mine = command(&mut p, 5, 2);
        let mut replaced = command(&mut p, 6, 2);
        let mut later = command(&mut p, 7, 2);
        let mut out = Vec::new();
        p.applied(5, 2, Outcome::Command(Some(result(1))), &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(later.try_recv(), Err(TryRecvError::Empty)));
        // Index 6 carries another leader's entry (term 3): the term-2
        // proposal at 7 cannot be committed after it either.
        p.applied(6, 3, Outcome::Command(Some(result(2))), &mut out);
        assert_eq!(out.len(), 3);
        answer_all(out);
        assert_eq!(mine.try_recv(), Ok(Ok(result(1))));
        assert_eq!(replaced.try_recv(), Ok(Err(NodeError::Dropped)));
        assert_eq!(later.try_recv(), Ok(Err(NodeError::Dropped)));
    }

    #[test]
    fn an_entry_settles_the_proposals_left_behind_it_as_not_applied() {
        let mut p = Proposals::default();
        let mut skipped = command(&mut p, 3, 1);
        let mut mine = command(&mut p, 9, 4);
        let mut out = Vec::new();
        p.applied(9, 4, Outcome::Command(Some(result(7))), &mut out);
        answer_all(out);
        assert_eq!(skipped.try_recv(), Ok(Err(NodeError::Dropped)));
        assert_eq!(mine.try_recv(), Ok(Ok(result(7))));
    }

    #[test]
    fn an_outcome_of_another_kind_is_not_the_proposal_own() {
        let mut p = Proposals::default();
        let mut cmd = command(&mut p, 2, 1);
        let (tx, mut conf) = oneshot::channel();
        p.push(3, 1, Waiter::Conf(tx));
        let (tx, mut rejected) = oneshot::channel();
        p.push(4, 1, Waiter::Conf(tx));
        let mut out = Vec::new();
        p.applied(2, 1, Outcome::Nothing, &mut out);
        p.applied(3, 1, Outcome::Conf(Ok(())), &mut out);
        p.applied(4, 1, Outcome::Conf(Err("no".into())), &mut out);
        answer_all(out);
        assert_eq!(cmd.try_recv(), Ok(Err(NodeError::Dropped)));
        assert_eq!(conf.try_recv(), Ok(Ok(())));
        assert_eq!(
            rejected.try_recv(),
            Ok(Err(NodeError::Rejected("no".into())))
        );
    }

    #[test]
    fn a_later_terms_entry_settles_earlier_terms_proposals_after_it() {
        // A term-15 leader proposed at 524-526 and was deposed; the term-16
        // leader's empty entry at 524 is applied, and the zone writes
        // nothing more. Before, the proposals at 525 and 526 waited forever.
        let mut p = Proposals::default();
        let mut at524 = command(&mut p, 524, 15);
        let mut at525 = command(&mut p, 525, 15);
        let mut at526 = command(&mut p, 526, 15);
        // This server's own proposal of the new term stays queued.
        let mut ours = command(&mut p, 525, 16);
        let mut out = Vec::new();
        p.applied(524, 16, Outcome::Nothing, &mut out);
        assert_eq!(out.len(), 3);
        answer_all(out);
        for rx in [&mut at524, &mut at525, &mut at526] {
            assert_eq!(rx.try_recv(), Ok(Err(NodeError::Dropped)));
        }
        assert!(matches!(ours.try_recv(), Err(TryRecvError::Empty)));
        let mut out = Vec::new();
        p.applied(525, 16, Outcome::Command(Some(result(3))), &mut out);
        answer_all(out);
        assert_eq!(ours.try_recv(), Ok(Ok(result(3))));
    }

    #[test]
    fn a_proposal_cut_from_the_log_waits_for_what_is_applied_at_its_index() {
        // Term 2 proposed at 5 and 6; a term-3 leader cut both here and this
        // server, leading term 4, proposed at 5 again. Another server may
        // still commit the term-2 entries: nothing is settled yet.
        let mut p = Proposals::default();
        let mut cut5 = command(&mut p, 5, 2);
        let mut cut6 = command(&mut p, 6, 2);
        let mut new5 = command(&mut p, 5, 4);
        assert!(matches!(cut5.try_recv(), Err(TryRecvError::Empty)));
        assert!(matches!(cut6.try_recv(), Err(TryRecvError::Empty)));
        // The term-2 entry was committed at 5 after all (by a leader that
        // had it): it was applied, and the term-4 one was not.
        let mut out = Vec::new();
        p.applied(5, 2, Outcome::Command(Some(result(9))), &mut out);
        answer_all(out);
        assert_eq!(cut5.try_recv(), Ok(Ok(result(9))));
        assert_eq!(new5.try_recv(), Ok(Err(NodeError::Dropped)));
        assert!(matches!(cut6.try_recv(), Err(TryRecvError::Empty)));
        let mut out = Vec::new();
        p.overtaken_by_snapshot(6, 2, &mut out);
        answer_all(out);
        assert_eq!(cut6.try_recv(), Ok(Err(NodeError::LeadershipChanged)));
        let mut next = command(&mut p, 7, 5);
        p.fail_all(NodeError::Stopped);
        assert_eq!(next.try_recv(), Ok(Err(NodeError::Stopped)));
    }
}
