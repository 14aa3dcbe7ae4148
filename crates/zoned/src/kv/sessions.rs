//! At-most-once client writes (Raft thesis, 6.3): every client write
//! carries a [`RequestId`] (origin server, its incarnation, a number), the
//! same on each attempt, and the state machine remembers the answer of
//! each write until the origin says it has it. A repeat of an applied
//! write, a retry after a leader stopped answering say, is not applied
//! again: it gets the first answer.
//!
//! One [`ClientSession`] per origin server, in the `sessions` family under
//! the origin's id. It holds only the answers the origin may still ask
//! again for (those at or above its `done_below`), so its size follows the
//! origin's writes in flight, not the write rate, and no clock is involved.
//!
//! Rules, all deterministic (the same on every server, from the log):
//! - a newer incarnation of the origin ends the older one's session; a
//!   write of an older incarnation is refused (its process is gone, its
//!   client was told the outcome is unknown);
//! - a write whose answer is remembered is answered with it;
//! - a write numbered below `done_below` whose answer is not remembered
//!   was answered or given up already: a late copy is refused;
//! - anything else is new: applied, and its answer remembered.
//!
//! Refusals change nothing and say so (a failed precondition).

use std::collections::{BTreeSet, HashMap};

use prost::Message as _;
use rocksdb::WriteBatch;
use zone_proto::v1::{
    command_result, response_op, ClientSession, CommandResult, RememberedAnswer, RequestId,
    ResponseHeader,
};

use crate::storage::{Engine, StorageFailure, CF_SESSIONS};

/// Answers larger than this are not kept: a repeat is told the write was
/// applied, without its answer.
pub const KEEP_ANSWER_BYTES: usize = 4096;

/// What a client write's id says about it.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// Not applied before: apply it.
    New,
    /// Applied before: its first answer (headers as this server gives them).
    Repeat(CommandResult),
    /// Not to be applied, with the reason.
    Refused(String),
}

/// The sessions read so far, kept between batches with the applier's cache
/// (cleared with it when a snapshot replaces the store).
#[derive(Debug, Default)]
pub struct Sessions {
    map: HashMap<u64, ClientSession>,
    /// Changed since the last [`Sessions::stage`].
    dirty: BTreeSet<u64>,
}

impl Sessions {
    pub fn clear(&mut self) {
        self.map.clear();
        self.dirty.clear();
    }

    fn session(
        &mut self,
        engine: &Engine,
        origin: u64,
    ) -> Result<&mut ClientSession, StorageFailure> {
        match self.map.entry(origin) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let s = match engine.get(CF_SESSIONS, &origin.to_be_bytes())? {
                    Some(b) => {
                        ClientSession::decode(&b[..]).map_err(|_| StorageFailure::Corrupt {
                            what: format!("session of server {origin}"),
                        })?
                    }
                    None => ClientSession {
                        origin,
                        ..ClientSession::default()
                    },
                };
                Ok(e.insert(s))
            }
        }
    }

    /// What `req` is, before its command is applied. `member_id` and
    /// `term` fill a repeated answer's headers, as for a new one.
    pub fn check(
        &mut self,
        engine: &Engine,
        req: &RequestId,
        member_id: u64,
        term: u64,
    ) -> Result<Seen, StorageFailure> {
        let s = self.session(engine, req.origin)?;
        if req.incarnation < s.incarnation {
            return Ok(Seen::Refused(format!(
                "this write reached the zone through server {} before it restarted; it was not applied",
                req.origin
            )));
        }
        if req.incarnation > s.incarnation {
            *s = ClientSession {
                origin: req.origin,
                incarnation: req.incarnation,
                ..ClientSession::default()
            };
            self.dirty.insert(req.origin);
            return Ok(Seen::New);
        }
        if let Ok(i) = s.answers.binary_search_by_key(&req.seq, |a| a.seq) {
            return Ok(Seen::Repeat(match &s.answers[i].result {
                Some(r) => {
                    let mut r = r.clone();
                    set_headers(&mut r, member_id, term);
                    r
                }
                None => CommandResult {
                    result: Some(command_result::Result::FailedPrecondition(format!(
                        "this write was applied already; its answer (over {KEEP_ANSWER_BYTES} bytes) was not kept: read the keys again"
                    ))),
                },
            }));
        }
        if req.seq < s.done_below {
            return Ok(Seen::Refused(
                "a late copy of a write that was answered or given up already; it was not applied"
                    .into(),
            ));
        }
        Ok(Seen::New)
    }

    /// After `req`'s command was applied (or refused): remembers its answer
    /// if it is new (`answer`), and forgets what the origin is done with.
    /// Call [`Sessions::check`] first.
    pub fn record(&mut self, req: &RequestId, answer: Option<&CommandResult>) {
        let Some(s) = self.map.get_mut(&req.origin) else {
            return;
        };
        if req.incarnation != s.incarnation {
            return;
        }
        if let Some(answer) = answer {
            let mut kept = answer.clone();
            // The same bytes on every server: the headers' server and term
            // are filled in when the answer is given again.
            set_headers(&mut kept, 0, 0);
            let result = (kept.encoded_len() <= KEEP_ANSWER_BYTES).then_some(kept);
            let at = s.answers.partition_point(|a| a.seq < req.seq);
            s.answers.insert(
                at,
                RememberedAnswer {
                    seq: req.seq,
                    result,
                },
            );
        }
        if req.done_below > s.done_below {
            s.done_below = req.done_below;
            let keep_from = s.answers.partition_point(|a| a.seq < s.done_below);
            s.answers.drain(..keep_from);
        }
        self.dirty.insert(req.origin);
    }

    /// Stages the sessions changed since the last call into `wb`.
    pub fn stage(&mut self, engine: &Engine, wb: &mut WriteBatch) {
        for origin in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.map.get(&origin) {
                wb.put_cf(
                    engine.cf(CF_SESSIONS),
                    origin.to_be_bytes(),
                    s.encode_to_vec(),
                );
            }
        }
    }
}

/// Every session, as stored (for a snapshot).
pub(super) fn read_all(
    engine: &Engine,
    snap: &rocksdb::Snapshot<'_>,
) -> Result<Vec<ClientSession>, StorageFailure> {
    let mut out = Vec::new();
    for item in snap.iterator_cf(engine.cf(CF_SESSIONS), rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(StorageFailure::Read)?;
        out.push(
            ClientSession::decode(&v[..]).map_err(|_| StorageFailure::Corrupt {
                what: format!("session record {k:?}"),
            })?,
        );
    }
    Ok(out)
}

/// Stages replacing every session with `sessions` (a snapshot's).
pub(super) fn restore(engine: &Engine, wb: &mut WriteBatch, sessions: &[ClientSession]) {
    let cf = engine.cf(CF_SESSIONS);
    wb.delete_range_cf(cf, &[0u8; 8][..], &[0xff; 9][..]);
    for s in sessions {
        wb.put_cf(cf, s.origin.to_be_bytes(), s.encode_to_vec());
    }
}

/// Sets the server and term of every header in `r`.
fn set_headers(r: &mut CommandResult, member_id: u64, term: u64) {
    use command_result::Result as R;
    let set = |h: &mut Option<ResponseHeader>| {
        if let Some(h) = h {
            h.member_id = member_id;
            h.raft_term = term;
        }
    };
    match &mut r.result {
        Some(R::Put(p)) => set(&mut p.header),
        Some(R::Delete(d)) => set(&mut d.header),
        Some(R::Txn(t)) => {
            set(&mut t.header);
            for op in &mut t.responses {
                match &mut op.response {
                    Some(response_op::Response::Put(p)) => set(&mut p.header),
                    Some(response_op::Response::Delete(d)) => set(&mut d.header),
                    Some(response_op::Response::Get(g)) => set(&mut g.header),
                    Some(response_op::Response::Range(g)) => set(&mut g.header),
                    None => {}
                }
            }
        }
        Some(R::Compact(c)) => set(&mut c.header),
        Some(
            R::SetMaintenance(_)
            | R::FailedPrecondition(_)
            | R::ResourceExhausted(_)
            | R::Alarms(_),
        )
        | None => {}
    }
}
