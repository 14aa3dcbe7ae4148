//! This server's client writes, numbered so that the zone applies each at
//! most once however often it is sent (`kv::sessions`): a write keeps its
//! number on every attempt, here or forwarded, and the numbers still in
//! flight tell the state machine which answers it may forget.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use zone_proto::v1::{command, Command, RequestId};

/// The numbering of this server's client writes, for this start.
#[derive(Debug)]
pub(crate) struct Requests {
    origin: u64,
    incarnation: u64,
    next: AtomicU64,
    /// Numbers of writes not yet answered.
    in_flight: Mutex<BTreeSet<u64>>,
}

impl Requests {
    /// `incarnation` must grow with every start of server `origin`.
    pub(crate) fn new(origin: u64, incarnation: u64) -> Requests {
        Requests {
            origin,
            incarnation,
            next: AtomicU64::new(1),
            in_flight: Mutex::default(),
        }
    }

    /// A number for a new write, in flight until the ticket drops.
    pub(crate) fn begin(&self) -> Ticket<'_> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.in_flight.lock().expect("not poisoned").insert(seq);
        Ticket {
            requests: self,
            seq,
        }
    }
}

/// One write's number, from its arrival until it is answered.
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    requests: &'a Requests,
    seq: u64,
}

impl Ticket<'_> {
    /// The write as a command, for one attempt: its id, and the lowest
    /// number still in flight (every answer below it may be forgotten).
    pub(crate) fn command(&self, op: command::Op) -> Command {
        let r = self.requests;
        let done_below = r
            .in_flight
            .lock()
            .expect("not poisoned")
            .first()
            .copied()
            .unwrap_or(self.seq);
        Command {
            op: Some(op),
            request: Some(RequestId {
                origin: r.origin,
                incarnation: r.incarnation,
                seq: self.seq,
                done_below,
            }),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.requests
            .in_flight
            .lock()
            .expect("not poisoned")
            .remove(&self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: &Command) -> (u64, u64) {
        let r = c.request.as_ref().unwrap();
        (r.seq, r.done_below)
    }

    #[test]
    fn a_write_keeps_its_number_and_the_floor_follows_what_is_in_flight() {
        let r = Requests::new(2, 7);
        let op = || command::Op::SetMaintenance(Default::default());
        let a = r.begin();
        let b = r.begin();
        assert_eq!(id(&a.command(op())), (1, 1));
        assert_eq!(id(&b.command(op())), (2, 1));
        drop(a);
        // b again: the same number, and 1 may be forgotten.
        assert_eq!(id(&b.command(op())), (2, 2));
        let c = r.begin();
        drop(b);
        assert_eq!(id(&c.command(op())), (3, 3));
        let req = c.command(op()).request.unwrap();
        assert_eq!((req.origin, req.incarnation), (2, 7));
    }
}
