//! Requests that must run at the leader, and reads that must wait for it.
//!
//! [`ServerContext::at_leader`] is the one retry loop: it runs a request
//! on this server when it leads, or forwards it to the leader, and tries
//! again, after the leader changes, what is known not to have been applied
//! ([`ApiError::NotApplied`]), or may safely be applied again
//! ([`ApiError::Retry`]: client writes, which the zone applies at most
//! once by their request id). Writes and management requests both go
//! through it; what differs is only how each is run and how a forwarding
//! failure is read.

use std::future::Future;
use std::time::{Duration, Instant};

use raft::StateRole;
use tonic::{Request, Response, Status};
use zone_proto::v1::{command, Command, CommandResult, ForwardRequest};

use super::error::{write_timeout, NOT_APPLIED};
use super::{ApiError, ServerContext};
use crate::node::{NodeError, RETRY_PAUSE};

impl ServerContext {
    /// Runs a request at the leader, wherever it is, within `budget`: with
    /// `here(deadline)` when this server leads, else with
    /// `there(leader, deadline)`. An attempt that fails with
    /// [`ApiError::NotApplied`] or [`ApiError::Retry`] is tried again once
    /// the leader changes (or after a pause, a view may be stale); any
    /// other outcome is the answer. When the budget runs out, `give_up`
    /// gets the last reason heard, if any; if an attempt's outcome was
    /// unknown (`Retry`), the answer says the write may have been applied.
    pub(crate) async fn at_leader<T, H, HF, R, RF>(
        &self,
        budget: Duration,
        mut here: H,
        mut there: R,
        give_up: impl FnOnce(Option<String>) -> ApiError,
    ) -> Result<T, ApiError>
    where
        H: FnMut(Instant) -> HF,
        HF: Future<Output = Result<T, ApiError>>,
        R: FnMut(u64, Instant) -> RF,
        RF: Future<Output = Result<T, ApiError>>,
    {
        let deadline = Instant::now() + budget;
        let mut last = None;
        let mut unknown = false;
        loop {
            let view = self.node.view();
            let attempt = if view.leader_id == self.node.id() && view.role == StateRole::Leader {
                Some(here(deadline).await)
            } else if view.leader_id != 0 {
                Some(there(view.leader_id, deadline).await)
            } else {
                None
            };
            match attempt {
                Some(Err(ApiError::NotApplied(why))) => last = Some(why),
                Some(Err(ApiError::Retry(why))) => {
                    last = Some(why);
                    unknown = true;
                }
                Some(done) => return done,
                None => {}
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(match (unknown, last) {
                    (true, Some(why)) => ApiError::Unavailable(format!(
                        "{why}; no leader confirmed the write within {} ms: it may or may not have been applied",
                        budget.as_millis()
                    )),
                    (_, last) => give_up(last),
                });
            }
            // Wait for a new leader, but not forever on a stale view.
            let _ = tokio::time::timeout(RETRY_PAUSE * 4, self.node.view_changed()).await;
        }
    }

    /// A client write at the leader, wherever it is. It is numbered once
    /// and keeps its number on every attempt, so the zone applies it at
    /// most once: an attempt whose outcome is unknown (a leader that stops
    /// answering, a broken hop) is sent again to the next leader at once.
    pub(crate) async fn write_any(
        &self,
        op: command::Op,
        budget: Duration,
    ) -> Result<CommandResult, ApiError> {
        let ticket = self.requests.begin();
        let ticket = &ticket;
        self.at_leader(
            budget,
            |deadline| {
                let cmd = ticket.command(op.clone());
                async move {
                    let propose = self.node.propose_command(cmd);
                    let me = self.node.id();
                    tokio::select! {
                        r = tokio::time::timeout_at(deadline.into(), propose) => match r {
                            Ok(r) => r.map_err(ApiError::from),
                            Err(_) => Err(write_timeout(budget)),
                        },
                        () = self.leader_other_than(me) => Err(ApiError::Retry(
                            "this server stopped leading before the write was committed".into(),
                        )),
                    }
                }
            },
            |leader, deadline| {
                let cmd = ticket.command(op.clone());
                async move {
                    // Boxed: this rare path's future is large (a write's
                    // was 2400 bytes with it inline, 552 boxed), and every
                    // write's future is moved a few times before it is
                    // pinned.
                    Box::pin(self.forward_to(leader, cmd, deadline, budget)).await
                }
            },
            |_| {
                ApiError::NotApplied(format!(
                    "no leader could take the write within {} ms; it was not applied",
                    budget.as_millis()
                ))
            },
        )
        .await
    }

    /// One attempt of a client write at `leader`: its answer; or, if another
    /// leader is known before it answers, [`ApiError::Retry`] (the write
    /// may be sent again; see [`ServerContext::write_any`]).
    async fn forward_to(
        &self,
        leader: u64,
        cmd: Command,
        deadline: Instant,
        budget: Duration,
    ) -> Result<CommandResult, ApiError> {
        tokio::select! {
            r = self.forward(leader, cmd, deadline) => {
                r.map_err(|status| forwarded_write_error(status, leader, budget))
            }
            () = self.leader_other_than(leader) => Err(ApiError::Retry(format!(
                "leader {leader} did not answer before another was elected"
            ))),
        }
    }

    /// Resolves once this server knows of a leader other than `leader`.
    async fn leader_other_than(&self, leader: u64) {
        let mut view = self.node.watch_view();
        let _ = view
            .wait_for(|v| v.leader_id != 0 && v.leader_id != leader)
            .await;
    }

    async fn forward(
        &self,
        leader: u64,
        cmd: Command,
        deadline: Instant,
    ) -> Result<CommandResult, Status> {
        let Some(mut client) = self.transport.client(leader) else {
            return Err(Status::unavailable(format!(
                "no address known for leader {leader}"
            )));
        };
        let mut req = Request::new(ForwardRequest { command: Some(cmd) });
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        client.forward(req).await.map(Response::into_inner)
    }

    /// A command another server forwarded here, believing this server
    /// leads: checked again (the limits are this server's to enforce too)
    /// and proposed with its request id, or refused as not applied when
    /// this server no longer leads, so that the sender retries at the new
    /// leader.
    pub(crate) async fn propose_forwarded(
        &self,
        cmd: Command,
        budget: Duration,
    ) -> Result<CommandResult, ApiError> {
        if let Some(op) = &cmd.op {
            self.limits.command(op)?;
            // A write through a follower is refused here while an alarm
            // stands, as one sent to the leader is: its bytes never reach
            // the log of a zone short of space.
            self.check_space(op)?;
        }
        if self.node.view().role != StateRole::Leader {
            return Err(ApiError::NotApplied(
                "this server is no longer the leader".into(),
            ));
        }
        match tokio::time::timeout(budget, self.node.propose_command(cmd)).await {
            Ok(r) => r.map_err(ApiError::from),
            Err(_) => Err(write_timeout(budget)),
        }
    }

    /// Waits until this server has applied everything committed before now.
    pub(crate) async fn linearize(&self, budget: Duration) -> Result<(), ApiError> {
        let deadline = Instant::now() + budget;
        loop {
            match tokio::time::timeout_at(deadline.into(), self.node.read_barrier()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(NodeError::Stopped)) => return Err(NodeError::Stopped.into()),
                // No leader, or it changed: a read is always safe to retry.
                Ok(Err(_)) => {}
                Err(_) => {
                    return Err(ApiError::Timeout(format!(
                        "the zone did not confirm a linearizable read within {} ms; retry, or ask for a serializable read",
                        budget.as_millis()
                    )))
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ApiError::Unavailable(
                    "no leader to confirm a linearizable read".into(),
                ));
            }
            let _ = tokio::time::timeout(RETRY_PAUSE * 4, self.node.view_changed()).await;
        }
    }
}

/// How a client write forwarded to `leader` failed: retried when the
/// leader promised it was not applied, and also when a broken hop leaves
/// the outcome unknown (the write carries its request id: sending it again
/// cannot apply it twice); the budget spent is a timeout; the leader's own
/// answer (bad input, say) is passed on.
fn forwarded_write_error(status: Status, leader: u64, budget: Duration) -> ApiError {
    if status.metadata().get(NOT_APPLIED).is_some() {
        return ApiError::from_leader(status);
    }
    match status.code() {
        tonic::Code::DeadlineExceeded => write_timeout(budget),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            ApiError::Retry(format!(
                "forwarding to leader {leader}: {}",
                status.message()
            ))
        }
        _ => ApiError::Remote(status),
    }
}
