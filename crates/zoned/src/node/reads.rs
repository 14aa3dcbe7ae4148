//! Linearizable reads: every caller that arrived since the last ReadIndex
//! waits behind one new one; a batch is released once the leader confirmed
//! its index and this server has applied up to it.

use std::collections::HashMap;

use super::handle::Reply;
use super::NodeError;

type Batch = Vec<Reply<()>>;

/// The reads a driver tracks, from arrival to release.
#[derive(Debug)]
pub(crate) struct Reads {
    id: u64,
    /// Arrived since the last ReadIndex.
    new: Batch,
    /// Batches sent, by context, with the tick they were sent at.
    in_flight: HashMap<Vec<u8>, (u64, Batch)>,
    /// Batches confirmed at an index this server has not applied yet.
    waiting: Vec<(u64, Batch)>,
    next_ctx: u64,
}

impl Reads {
    /// Contexts carry the server id, so that two servers never collide in
    /// the leader's pending reads, and a counter from `first_ctx`, which
    /// must not repeat across restarts (a random start).
    pub(crate) fn new(id: u64, first_ctx: u64) -> Reads {
        Reads {
            id,
            new: Vec::new(),
            in_flight: HashMap::new(),
            waiting: Vec::new(),
            next_ctx: first_ctx,
        }
    }

    pub(crate) fn push(&mut self, reply: Reply<()>) {
        self.new.push(reply);
    }

    /// Whether reads wait for a ReadIndex to be sent.
    pub(crate) fn has_new(&self) -> bool {
        !self.new.is_empty()
    }

    /// The reads that arrived since the last batch become one, sent at
    /// `tick`: the ReadIndex context to send for it, if there were any.
    pub(crate) fn start_batch(&mut self, tick: u64) -> Option<Vec<u8>> {
        if self.new.is_empty() {
            return None;
        }
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.id.to_be_bytes());
        ctx.extend_from_slice(&self.next_ctx.to_be_bytes());
        self.next_ctx += 1;
        self.in_flight
            .insert(ctx.clone(), (tick, std::mem::take(&mut self.new)));
        Some(ctx)
    }

    /// The leader confirmed batch `ctx` at `index`; a context of no batch
    /// of ours (another server's, or one already failed) is ignored.
    pub(crate) fn confirmed(&mut self, ctx: &[u8], index: u64) {
        if let Some((_, batch)) = self.in_flight.remove(ctx) {
            self.waiting.push((index, batch));
        }
    }

    /// Releases every confirmed batch at or below `applied`.
    pub(crate) fn release(&mut self, applied: u64) {
        if self.waiting.is_empty() {
            return;
        }
        let mut still = Vec::new();
        for (index, batch) in self.waiting.drain(..) {
            if index <= applied {
                answer(batch, Ok(()));
            } else {
                still.push((index, batch));
            }
        }
        self.waiting = still;
    }

    /// A batch unanswered for more than `limit` ticks was lost (a leader
    /// that dropped it, a message lost): it fails, and the callers retry.
    pub(crate) fn expire(&mut self, tick: u64, limit: u64) {
        let stale: Vec<Vec<u8>> = self
            .in_flight
            .iter()
            .filter(|(_, (sent, _))| tick.saturating_sub(*sent) > limit)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, batch)) = self.in_flight.remove(&k) {
                answer(batch, Err(NodeError::LeadershipChanged));
            }
        }
    }

    /// Fails the reads not yet sent.
    pub(crate) fn fail_new(&mut self, err: NodeError) {
        answer(std::mem::take(&mut self.new), Err(err));
    }

    /// Fails the batches sent and not confirmed (the leader changed: their
    /// answers may never come).
    pub(crate) fn fail_in_flight(&mut self, err: NodeError) {
        for (_, (_, batch)) in self.in_flight.drain() {
            answer(batch, Err(err.clone()));
        }
    }

    /// Fails every read (the driver stops).
    pub(crate) fn fail_all(&mut self, err: NodeError) {
        self.fail_new(err.clone());
        self.fail_in_flight(err.clone());
        for (_, batch) in self.waiting.drain(..) {
            answer(batch, Err(err.clone()));
        }
    }
}

fn answer(batch: Batch, result: Result<(), NodeError>) {
    for reply in batch {
        let _ = reply.send(result.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot::{self, error::TryRecvError};

    type Rx = oneshot::Receiver<Result<(), NodeError>>;

    fn read(reads: &mut Reads) -> Rx {
        let (tx, rx) = oneshot::channel();
        reads.push(tx);
        rx
    }

    fn pending(rx: &mut Rx) -> bool {
        matches!(rx.try_recv(), Err(TryRecvError::Empty))
    }

    #[test]
    fn reads_wait_for_their_index_to_be_applied() {
        let mut reads = Reads::new(7, 100);
        assert_eq!(reads.start_batch(0), None, "nothing to send");
        let mut a = read(&mut reads);
        let mut b = read(&mut reads);
        let ctx = reads.start_batch(3).unwrap();
        assert_eq!(&ctx[..8], &7u64.to_be_bytes(), "the server id");
        assert_eq!(&ctx[8..], &100u64.to_be_bytes(), "the counter");
        let mut c = read(&mut reads);
        let later = reads.start_batch(3).unwrap();
        assert_ne!(ctx, later);
        reads.confirmed(&ctx, 10);
        reads.confirmed(&later, 12);
        reads.release(9);
        assert!(pending(&mut a) && pending(&mut b) && pending(&mut c));
        reads.release(11);
        assert_eq!(a.try_recv(), Ok(Ok(())));
        assert_eq!(b.try_recv(), Ok(Ok(())));
        assert!(pending(&mut c), "its index is not applied");
        reads.release(12);
        assert_eq!(c.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn a_batch_unanswered_for_longer_than_the_limit_fails() {
        let mut reads = Reads::new(1, 0);
        let mut old = read(&mut reads);
        let ctx = reads.start_batch(5).unwrap();
        let mut young = read(&mut reads);
        reads.start_batch(8);
        reads.expire(15, 10);
        assert!(pending(&mut old), "10 ticks is the limit, not over it");
        reads.expire(16, 10);
        assert_eq!(old.try_recv(), Ok(Err(NodeError::LeadershipChanged)));
        assert!(pending(&mut young));
        // Its answer, arriving late, is ignored.
        reads.confirmed(&ctx, 3);
        reads.release(u64::MAX);
        assert!(pending(&mut young));
    }

    #[test]
    fn a_leader_change_fails_the_batches_in_flight_but_not_the_confirmed_ones() {
        let mut reads = Reads::new(1, 0);
        let mut confirmed = read(&mut reads);
        let ctx = reads.start_batch(0).unwrap();
        reads.confirmed(&ctx, 4);
        let mut in_flight = read(&mut reads);
        reads.start_batch(0);
        let mut unsent = read(&mut reads);
        reads.fail_in_flight(NodeError::LeadershipChanged);
        assert_eq!(in_flight.try_recv(), Ok(Err(NodeError::LeadershipChanged)));
        assert!(pending(&mut confirmed) && pending(&mut unsent));
        reads.fail_new(NodeError::NoLeader);
        assert_eq!(unsent.try_recv(), Ok(Err(NodeError::NoLeader)));
        reads.fail_all(NodeError::Stopped);
        assert_eq!(confirmed.try_recv(), Ok(Err(NodeError::Stopped)));
    }
}
