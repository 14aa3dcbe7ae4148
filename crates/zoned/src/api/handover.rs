//! Storage-aware leadership: the leader's front-end services need its
//! `required` datastores, so a leader whose required datastores stay
//! unhealthy hands leadership to a voter whose are healthy; and a transfer
//! that names no server never picks one with unhealthy required storage.
//!
//! Health comes from each server's zone-mounts report (in its status). A
//! datastore counts against the leader only once it has been unhealthy for
//! its grace period (three probe intervals and a probe timeout): one slow
//! probe moves nothing. A server whose zone-mounts has not reported lately
//! is not known to be healthy, so it is never chosen; a leader whose own
//! report is missing does not act on it. When no other voter is healthy,
//! leadership stays where it is: moving it would only move the outage, and
//! moving it back and forth would add elections to it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use raft::StateRole;
use zone_datastores::healthy;
use zone_proto::v1::{Datastore, DatastoreState, Role, StorageHealth};

use super::{ApiError, ServerContext};

/// How often the leader looks at its own storage.
const EVERY: Duration = Duration::from_secs(1);

/// How long a required datastore may be unhealthy on the leader before
/// leadership moves: three probe intervals and a probe timeout.
pub fn grace(d: &Datastore) -> Duration {
    Duration::from_millis(3 * u64::from(d.probe_interval_ms) + u64::from(d.probe_timeout_ms))
}

/// The names of the `required` datastores not healthy in `st` (all of them
/// when zone-mounts has not reported lately).
fn unhealthy_required(st: Option<&StorageHealth>, required: &[Datastore]) -> Vec<String> {
    let Some(st) = st.filter(|st| st.reported) else {
        return required.iter().map(|d| d.name.clone()).collect();
    };
    required
        .iter()
        .filter(|d| {
            !st.datastores.iter().any(|h| {
                h.name == d.name && h.revision == d.revision && healthy(h.state(), h.exclusive)
            })
        })
        .map(|d| d.name.clone())
        .collect()
}

/// Whether every `required` datastore is healthy in `st` (or none is
/// required), as zone-vip asks before it starts leader-only units.
pub(crate) fn storage_ready(required: &[Datastore], st: &StorageHealth) -> bool {
    unhealthy_required(Some(st), required).is_empty()
}

/// The required datastores declared in the zone, as this server applied
/// them.
pub(crate) fn required_datastores(reader: &crate::kv::Reader) -> Result<Vec<Datastore>, ApiError> {
    let mut all = super::storage::declared(reader)?;
    all.retain(|d| d.required);
    Ok(all)
}

impl ServerContext {
    fn required_datastores(&self) -> Result<Vec<Datastore>, ApiError> {
        required_datastores(self.reader())
    }

    /// The voter a transfer that names none should go to: 0 (the most
    /// caught-up voter, as Raft picks it) when no datastore is required;
    /// otherwise the most caught-up other voter whose required datastores
    /// are healthy. When there is none: refused if `strict` (an operator's
    /// `leader transfer`), else 0 (a server stopping hands over anyway).
    pub(crate) async fn storage_target(&self, strict: bool) -> Result<u64, ApiError> {
        let required = self.required_datastores()?;
        if required.is_empty() {
            return Ok(0);
        }
        let zone = self.zone_status().await?;
        let me = self.node().id();
        let mut why = BTreeMap::new();
        let best = zone
            .servers
            .iter()
            .filter(|s| s.id != me && s.voter && s.role != Role::Unreachable as i32)
            .filter(|s| {
                let bad = unhealthy_required(s.storage.as_ref(), &required);
                if !bad.is_empty() {
                    why.insert(s.id, bad.join(", "));
                }
                bad.is_empty()
            })
            .max_by_key(|s| (s.match_index, std::cmp::Reverse(s.id)))
            .map(|s| s.id);
        match best {
            Some(id) => Ok(id),
            None if strict => Err(ApiError::FailedPrecondition(format!(
                "no other voter has its required datastores healthy ({}); name a server to move leadership anyway",
                if why.is_empty() {
                    "no other voter answered".to_owned()
                } else {
                    why.iter()
                        .map(|(id, bad)| format!("server {id}: {bad}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            ))),
            None => Ok(0),
        }
    }

    /// The required datastores unhealthy here for longer than their grace,
    /// from this server's own zone-mounts report. When zone-mounts has not
    /// reported lately (dead, stuck), every required datastore counts as
    /// unhealthy since its last report (or zoned's start): zone-vip will
    /// not start the leader-only units here either, so staying would keep
    /// the front-end down.
    fn storage_failing(&self, required: &[Datastore]) -> Vec<(String, Duration)> {
        let st = self.agents.storage();
        if !st.reported {
            let silent = Duration::from_millis(st.age_ms);
            return required
                .iter()
                .filter(|d| silent >= grace(d))
                .map(|d| (format!("{} (zone-mounts silent)", d.name), silent))
                .collect();
        }
        required
            .iter()
            .filter_map(|d| {
                let h = st
                    .datastores
                    .iter()
                    .find(|h| h.name == d.name && h.revision == d.revision)?;
                // As of the report, plus the report's age: still unhealthy
                // as far as anyone knows (reports come every 2 s).
                let down = Duration::from_millis(h.unhealthy_ms + st.age_ms);
                let bad =
                    !healthy(h.state(), h.exclusive) && h.state() != DatastoreState::Unspecified;
                (bad && down >= grace(d)).then(|| (d.name.clone(), down))
            })
            .collect()
    }
}

/// On the leader, every second: if a required datastore has been unhealthy
/// here past its grace, hands leadership to a voter whose are healthy.
pub async fn run(zone: ServerContext) {
    // Logged once per streak of "no healthy voter".
    let mut stuck = false;
    // After a handover that failed (the lease was revoked, the VIP and the
    // units stopped, for nothing), the next try waits longer each time.
    let mut backoff = Duration::ZERO;
    let mut next_try = Instant::now();
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(EVERY).await;
        }
        // On every server: whether zone-vip may start leader-only units
        // here (the lease stream only loads this).
        if let Ok(required) = zone.required_datastores() {
            zone.agents
                .set_storage_ready(storage_ready(&required, &zone.agents.storage()));
        }
        if zone.node().view().role != StateRole::Leader {
            stuck = false;
            continue;
        }
        let Ok(required) = zone.required_datastores() else {
            continue;
        };
        let failing = zone.storage_failing(&required);
        if failing.is_empty() {
            stuck = false;
            backoff = Duration::ZERO;
            continue;
        }
        if Instant::now() < next_try {
            continue;
        }
        let what = failing
            .iter()
            .map(|(n, d)| format!("{n} for {} s", d.as_secs()))
            .collect::<Vec<_>>()
            .join(", ");
        let target = match zone.storage_target(true).await {
            Ok(t) => t,
            Err(e) => {
                if !stuck {
                    tracing::warn!(unhealthy = %what, reason = %e, "required storage unhealthy on the leader; leadership stays here");
                }
                stuck = true;
                continue;
            }
        };
        stuck = false;
        tracing::warn!(unhealthy = %what, to = target, "required storage unhealthy on the leader; handing leadership over");
        let budget = zone.config().tick() * (zone.config().raft.election_ticks as u32 * 2)
            + Duration::from_secs(1);
        match zone.transfer(target, Instant::now() + budget, false).await {
            Ok(r) => {
                backoff = Duration::ZERO;
                tracing::info!(
                    leader = r.leader_id,
                    term = r.term,
                    "leadership handed over for storage"
                )
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_secs(2), Duration::from_secs(60));
                next_try = Instant::now() + backoff;
                tracing::warn!(reason = %e, retry_in = ?backoff, "could not hand leadership over for storage");
            }
        }
    }
}
