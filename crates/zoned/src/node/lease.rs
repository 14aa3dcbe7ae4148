//! The leader lease: the state the driver publishes to local agents, and
//! the rounds of ReadIndex that renew it.
//!
//! Safety argument. The leader renews the lease with a ReadIndex round
//! every heartbeat: when a quorum has answered a round sent at monotonic
//! time `t`, each of those followers reset its election timer after `t`, and
//! with check_quorum they refuse to vote for anyone else for a whole
//! election timeout. No other server can therefore lead before
//! `t + (election_ticks - 2) * tick`: one tick is lost to timer phase, and
//! one more when a busy follower handles the heartbeat late and then at
//! once the tick that fell due meanwhile. The lease ends
//! `raft.lease_margin_ms` before `t + (election_ticks - 1) * tick`, and the
//! configuration requires that margin to be at least a tick plus a clock
//! drift allowance (`Config::finish`). So a lease runs from the send
//! time of the round that renewed it, never from the time of its answer, and
//! a round older than a lease length can no longer extend it.

use std::collections::VecDeque;

/// The leader lease as the driver grants it to local agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lease {
    pub held: bool,
    pub term: u64,
    /// CLOCK_BOOTTIME nanoseconds; 0 when not held.
    pub expires_ns: u64,
    /// Increases with every change published.
    pub generation: u64,
    pub leader_id: u64,
    /// CLOCK_BOOTTIME nanoseconds at which this state was published.
    pub since_ns: u64,
    /// While held: when the round that renewed it was sent (a quorum
    /// answered it after); 0 otherwise.
    pub round_sent_ns: u64,
}

/// ReadIndex contexts of lease rounds: 9 bytes, `L` then the round number
/// (client read batches use 16: server id and a counter).
pub(crate) fn round_ctx(round: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(b'L');
    v.extend_from_slice(&round.to_be_bytes());
    v
}

/// The round of a context made by [`round_ctx`].
pub(crate) fn ctx_round(ctx: &[u8]) -> Option<u64> {
    match ctx {
        [b'L', round @ ..] => Some(u64::from_be_bytes(round.try_into().ok()?)),
        _ => None,
    }
}

/// One lease round in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Round {
    number: u64,
    /// The leader's term when it was sent.
    term: u64,
    /// CLOCK_BOOTTIME nanoseconds at which it was sent.
    sent_ns: u64,
}

/// The leader's lease rounds: when to start one, and what a quorum's
/// answer grants. The driver tells it the time, the tick and the term.
#[derive(Debug)]
pub(crate) struct LeaseRounds {
    lease_ns: u64,
    heartbeat_ticks: u64,
    /// Rounds in flight, oldest first. A new one starts every heartbeat
    /// without waiting for the last, so a round trip longer than a heartbeat
    /// delays each renewal but does not space them out.
    in_flight: VecDeque<Round>,
    /// The tick at which the newest round started.
    last_start_tick: Option<u64>,
    next_number: u64,
    /// A term in which the lease must not be granted (a transfer is under
    /// way); 0 for none.
    revoked_term: u64,
}

impl LeaseRounds {
    pub(crate) fn new(lease_ns: u64, heartbeat_ticks: u64) -> LeaseRounds {
        LeaseRounds {
            lease_ns,
            heartbeat_ticks,
            in_flight: VecDeque::new(),
            last_start_tick: None,
            next_number: 1,
            revoked_term: 0,
        }
    }

    /// Whether the lease is revoked in `term`.
    pub(crate) fn revoked_in(&self, term: u64) -> bool {
        self.revoked_term == term
    }

    /// No lease in `term` (before a transfer): rounds in flight are
    /// forgotten, their answers grant nothing.
    pub(crate) fn revoke(&mut self, term: u64) {
        self.revoked_term = term;
        self.in_flight.clear();
    }

    /// The lease may be granted again (the transfer failed).
    pub(crate) fn restore(&mut self) {
        self.revoked_term = 0;
        self.in_flight.clear();
    }

    /// The role or the term changed: no round in flight counts any more.
    pub(crate) fn forget(&mut self) {
        self.in_flight.clear();
    }

    /// On the leader of `term` that has committed an entry of its term, at
    /// `tick` and monotonic time `now_ns`: the context of a round to send
    /// now, if one is due. One is due every heartbeat, and at once for a
    /// leader without a lease (`held` false) that has none in flight.
    pub(crate) fn start(
        &mut self,
        now_ns: u64,
        tick: u64,
        term: u64,
        held: bool,
    ) -> Option<Vec<u8>> {
        if self.revoked_in(term) {
            return None;
        }
        while self
            .in_flight
            .front()
            .is_some_and(|r| now_ns.saturating_sub(r.sent_ns) >= self.lease_ns)
        {
            self.in_flight.pop_front();
        }
        let heartbeat_due = self
            .last_start_tick
            .is_none_or(|t| tick >= t + self.heartbeat_ticks);
        let unheld_and_idle = self.in_flight.is_empty() && !held;
        if !heartbeat_due && !unheld_and_idle {
            return None;
        }
        let number = self.next_number;
        self.next_number += 1;
        self.in_flight.push_back(Round {
            number,
            term,
            sent_ns: now_ns,
        });
        self.last_start_tick = Some(tick);
        Some(round_ctx(number))
    }

    /// A quorum answered round `answered`, and with it every earlier round
    /// (raft-rs answers ReadIndex requests in order). `leader_term` is this
    /// server's term if it still leads; `current` is the lease published.
    /// Returns the new expiry when the answer extends the lease: the round
    /// was sent in the term still led, not revoked, and it ends later than
    /// the lease held now.
    pub(crate) fn confirmed(
        &mut self,
        answered: u64,
        leader_term: Option<u64>,
        current: &Lease,
    ) -> Option<u64> {
        let pos = self.in_flight.iter().position(|r| r.number == answered)?;
        let round = self.in_flight[pos];
        self.in_flight.drain(..=pos);
        let expires = round.sent_ns + self.lease_ns;
        let renews = leader_term == Some(round.term)
            && !self.revoked_in(round.term)
            && !(current.held && current.term == round.term && current.expires_ns >= expires);
        renews.then_some(expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 350;
    const HEARTBEAT: u64 = 2;

    fn held(term: u64, expires_ns: u64) -> Lease {
        Lease {
            held: true,
            term,
            expires_ns,
            ..Lease::default()
        }
    }

    fn number(ctx: Option<Vec<u8>>) -> u64 {
        ctx_round(&ctx.expect("a round is due")).expect("a lease context")
    }

    #[test]
    fn a_lease_context_gives_back_its_round_and_nothing_else_does() {
        for round in [0, 1, 255, 256, u64::MAX] {
            assert_eq!(ctx_round(&round_ctx(round)), Some(round));
        }
        assert_eq!(ctx_round(b""), None);
        assert_eq!(ctx_round(b"L"), None);
        assert_eq!(ctx_round(b"L1234567"), None, "one byte short");
        assert_eq!(ctx_round(b"L123456789"), None, "one byte over");
        assert_eq!(ctx_round(b"R12345678"), None, "a read's context");
    }

    #[test]
    fn a_round_starts_every_heartbeat_and_at_once_for_a_leader_without_a_lease() {
        let mut r = LeaseRounds::new(LEASE, HEARTBEAT);
        assert_eq!(number(r.start(0, 10, 1, false)), 1, "first round at once");
        assert_eq!(
            r.start(1, 10, 1, false),
            None,
            "one in flight, no heartbeat"
        );
        assert_eq!(r.start(2, 11, 1, true), None, "one tick is not a heartbeat");
        assert_eq!(number(r.start(3, 12, 1, true)), 2, "a heartbeat later");
        // Both rounds lost (older than a lease): a leader without a lease
        // starts one at once, heartbeat or not.
        assert_eq!(number(r.start(3 + LEASE, 13, 1, false)), 3);
    }

    #[test]
    fn the_lease_runs_from_the_send_time_of_the_round_answered() {
        let mut r = LeaseRounds::new(LEASE, HEARTBEAT);
        let first = number(r.start(100, 0, 4, false));
        let second = number(r.start(150, 2, 4, true));
        let none = Lease::default();
        // The second answered: the first is settled with it.
        assert_eq!(r.confirmed(second, Some(4), &none), Some(150 + LEASE));
        assert_eq!(r.confirmed(first, Some(4), &none), None, "already drained");
        // An answer that would not extend the lease held grants nothing.
        let third = number(r.start(160, 4, 4, true));
        assert_eq!(r.confirmed(third, Some(4), &held(4, 200 + LEASE)), None);
        let fourth = number(r.start(300, 6, 4, true));
        assert_eq!(
            r.confirmed(fourth, Some(4), &held(4, 200 + LEASE)),
            Some(300 + LEASE)
        );
    }

    #[test]
    fn an_answer_grants_nothing_after_the_term_changed_or_leadership_was_lost() {
        let mut r = LeaseRounds::new(LEASE, HEARTBEAT);
        let old = number(r.start(0, 0, 4, false));
        assert_eq!(
            r.confirmed(old, Some(5), &Lease::default()),
            None,
            "new term"
        );
        let lost = number(r.start(10, 2, 5, false));
        assert_eq!(
            r.confirmed(lost, None, &Lease::default()),
            None,
            "no longer leader"
        );
    }

    #[test]
    fn a_revoked_term_starts_no_round_and_its_answers_grant_nothing() {
        let mut r = LeaseRounds::new(LEASE, HEARTBEAT);
        let before = number(r.start(0, 0, 7, false));
        r.revoke(7);
        assert!(r.revoked_in(7));
        assert_eq!(r.confirmed(before, Some(7), &Lease::default()), None);
        assert_eq!(r.start(10, 10, 7, false), None);
        // The next term is not revoked.
        assert!(r.start(20, 12, 8, false).is_some());
        r.revoke(8);
        r.restore();
        let again = number(r.start(30, 14, 8, false));
        assert_eq!(
            r.confirmed(again, Some(8), &Lease::default()),
            Some(30 + LEASE)
        );
    }

    #[test]
    fn forgotten_rounds_grant_nothing() {
        let mut r = LeaseRounds::new(LEASE, HEARTBEAT);
        let n = number(r.start(0, 0, 2, false));
        r.forget();
        assert_eq!(r.confirmed(n, Some(2), &Lease::default()), None);
    }
}
