//! Space alarms and compaction: the calls behind `zonectl alarm` and
//! `zonectl compact`, and the write each server's space monitor
//! (`crate::space`) makes to raise or clear its own alarm.
//!
//! All of them are commands through Raft, served while the zone is
//! disabled for maintenance and while an alarm stands (they add no data),
//! and proposed even below the hard free-space floor (`node::disk`).

use std::time::Duration;

use zone_proto::v1::{
    command, command_result, Alarm, AlarmsResponse, CompactRequest, CompactResponse,
    DisarmAlarmRequest,
};

use super::error::bad;
use super::{ApiError, ServerContext};

impl ServerContext {
    /// Drops the history before `req.revision` on every server; with
    /// `physical`, every server also compacts its RocksDB, and the answer
    /// waits for this server's within `wait` (`physical_done` says whether
    /// it finished; it goes on in the background otherwise).
    pub(crate) async fn compact(
        &self,
        req: CompactRequest,
        budget: Duration,
        wait: Duration,
    ) -> Result<CompactResponse, ApiError> {
        if req.revision == 0 {
            return Err(bad("revision", "must be at least 1"));
        }
        let started = tokio::time::Instant::now();
        let physical = req.physical;
        let r = self.write(command::Op::Compact(req), budget).await?;
        let Some(command_result::Result::Compact(mut c)) = r.result else {
            return Err(ApiError::Unavailable(
                "unexpected answer to a compaction".into(),
            ));
        };
        tracing::info!(revision = c.compacted, physical, "history compacted");
        if physical {
            // This server applies the command (a forwarded write is
            // answered by the leader first), then counts its request
            // before it releases reads: after the barrier, a run that
            // started after `target` requests includes this compaction.
            let left = wait.saturating_sub(started.elapsed());
            let done = tokio::time::timeout(left, async {
                self.linearize(left).await?;
                let target = self.reader().compactor().requested();
                Ok::<u64, ApiError>(self.reader().compactor().wait(target).await)
            })
            .await;
            // Done only when the run finished and left nothing for lack
            // of room.
            c.physical_done = matches!(done, Ok(Ok(0)));
            // The server whose compaction the answer speaks of.
            if let Some(h) = &mut c.header {
                h.member_id = self.node().id();
            }
        }
        Ok(c)
    }

    /// Clears `server`'s alarm (0: all); the alarms left. No check that it
    /// has one: what this server sees may lag, the zone's list is the
    /// answer.
    pub(crate) async fn disarm_alarm(
        &self,
        server: u64,
        budget: Duration,
    ) -> Result<AlarmsResponse, ApiError> {
        let alarms = self.disarm(server, budget).await?;
        tracing::warn!(
            server,
            left = alarms.alarms.len(),
            "space alarm disarmed by an operator"
        );
        Ok(alarms)
    }

    /// The alarms standing, as of a read barrier (this server may lag);
    /// this server's own view when the zone cannot confirm one in time.
    pub(crate) async fn alarms(&self, budget: Duration) -> AlarmsResponse {
        let _ = self.linearize(budget).await;
        AlarmsResponse {
            alarms: self.reader().alarms(),
        }
    }

    /// This server's alarm, raised (or its figures replaced).
    pub(crate) async fn raise_alarm(
        &self,
        alarm: Alarm,
        budget: Duration,
    ) -> Result<AlarmsResponse, ApiError> {
        let r = self.write(command::Op::RaiseAlarm(alarm), budget).await?;
        alarms_of(r.result)
    }

    /// This server's own alarm cleared, once it has room again.
    pub(crate) async fn clear_own_alarm(&self, budget: Duration) -> Result<(), ApiError> {
        self.disarm(self.node().id(), budget).await.map(drop)
    }

    /// The disarm command through the leader; the alarms left.
    async fn disarm(&self, server: u64, budget: Duration) -> Result<AlarmsResponse, ApiError> {
        let r = self
            .write(
                command::Op::DisarmAlarm(DisarmAlarmRequest { server }),
                budget,
            )
            .await?;
        alarms_of(r.result)
    }
}

fn alarms_of(r: Option<command_result::Result>) -> Result<AlarmsResponse, ApiError> {
    match r {
        Some(command_result::Result::Alarms(a)) => Ok(a),
        _ => Err(ApiError::Unavailable(
            "unexpected answer to an alarm change".into(),
        )),
    }
}
