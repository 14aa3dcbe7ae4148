//! The space alarm, like etcd's NOSPACE alarm: every server measures its
//! own room for the zone's data every half second, and raises an alarm through
//! Raft when its data directory's free space falls below
//! `limits.min_free_disk_mb` or its store grows past `limits.max_store_mb`.
//! While any alarm stands, the whole zone refuses what adds data (puts,
//! transactions with a put) with RESOURCE_EXHAUSTED naming the server and
//! its figures; reads, deletes and compaction are served, so an operator
//! can make room (`zonectl compact REV --physical`).
//!
//! Why zone-wide: every server holds the same data, so one that is short
//! of room is short for the zone's next writes too. A zone that wrote on
//! without it would leave it behind, then without the redundancy the
//! operator counts on, silently. The alarm says it on every write instead.
//!
//! The server clears its own alarm once it has room again with a margin
//! (no flapping at the threshold); an operator may clear any alarm
//! (`zonectl alarm disarm`), and a server still short raises its own again
//! within [`REFRESH`]. Below a quarter of `min_free_disk_mb` the Raft
//! driver's hard floor takes over (`node::disk`): a server there takes no
//! put until it has room, so clearing its alarm does not help it; free
//! space on it, or remove it from the zone (then `zonectl alarm disarm
//! --server N` clears the alarm it left: a removed or dead server's alarm
//! stays until cleared).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zone_proto::v1::{Alarm, AlarmKind};

use crate::api::ServerContext;
use crate::storage::Engine;

/// What this build understands of the replicated state beyond the first
/// release's (`ServerStatus.features`).
pub const FEATURES: &[&str] = &[FEATURE];

/// Space alarms and compaction commands.
const FEATURE: &str = "space-alarm";

/// Between measures.
const EVERY: Duration = Duration::from_millis(500);
/// A server short of room raises its alarm again this often, with fresh
/// figures, even when it sees it standing; and no more often when it does
/// not see it yet. What it sees may be stale: a server below the hard
/// floor takes no entry past a put it cannot store, so it may not see its
/// own alarm, or an operator clearing it.
const REFRESH: Duration = Duration::from_secs(10);
/// How long a raise or a clear may take.
const BUDGET: Duration = Duration::from_secs(5);

/// The thresholds, in bytes (0: that check is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub min_free: u64,
    pub max_store: u64,
}

impl Thresholds {
    pub fn from_limits(l: &crate::config::LimitsSection) -> Thresholds {
        Thresholds {
            min_free: l.min_free_disk_mb << 20,
            max_store: l.max_store_mb << 20,
        }
    }

    /// The alarm a server with `free` bytes free and a store of `store`
    /// bytes must have standing, if any; free space first (the disk
    /// filling is the more urgent).
    pub fn short(&self, free: u64, store: u64) -> Option<(AlarmKind, u64)> {
        if self.min_free != 0 && free < self.min_free {
            Some((AlarmKind::NoSpace, self.min_free))
        } else if self.max_store != 0 && store > self.max_store {
            Some((AlarmKind::StoreQuota, self.max_store))
        } else {
            None
        }
    }

    /// Whether an alarm of `kind` may clear: room again with a margin of
    /// an eighth of the threshold (at least 1 MiB).
    pub fn room_again(&self, kind: AlarmKind, free: u64, store: u64) -> bool {
        let margin = |t: u64| (t / 8).max(1 << 20);
        let free_ok = self.min_free == 0 || free >= self.min_free + margin(self.min_free);
        let store_ok =
            self.max_store == 0 || store.saturating_add(margin(self.max_store)) <= self.max_store;
        match kind {
            AlarmKind::NoSpace => free_ok && self.short(free, store).is_none(),
            AlarmKind::StoreQuota => store_ok && self.short(free, store).is_none(),
            AlarmKind::Unspecified => self.short(free, store).is_none(),
        }
    }
}

/// What the monitor does after a measure, given this server's standing
/// alarm (if any).
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    Raise(AlarmKind, u64),
    Clear,
}

/// `raised` is how long ago this server last raised its alarm, if it did.
pub fn step(
    t: &Thresholds,
    standing: Option<AlarmKind>,
    raised: Option<Duration>,
    free: u64,
    store: u64,
) -> Step {
    let due = raised.is_none_or(|ago| ago >= REFRESH);
    match (t.short(free, store), standing) {
        (Some((kind, limit)), None) if due => Step::Raise(kind, limit),
        (Some((kind, limit)), Some(had)) if had != kind || due => Step::Raise(kind, limit),
        (None, Some(had)) if t.room_again(had, free, store) => Step::Clear,
        _ => Step::Nothing,
    }
}

/// The members seen running a build that knows alarms, so that the check
/// before a raise asks the zone only about members not seen yet (asking
/// every member's status takes a moment a fast writer fills the disk in).
/// Refreshed every [`KNOWN_REFRESH`] while there is room, so that it is
/// ready when needed.
#[derive(Debug, Default)]
struct KnownMembers {
    ids: std::collections::BTreeSet<u64>,
    asked: Option<tokio::time::Instant>,
}

const KNOWN_REFRESH: Duration = Duration::from_secs(60);
const UNKNOWN_REFRESH: Duration = Duration::from_secs(2);

impl KnownMembers {
    /// Why this zone cannot take an alarm yet: a member that answers with
    /// a build that does not know alarms (it would apply the writes the
    /// others refuse: its copy of the store would part from theirs). A
    /// member that does not answer does not hold the alarm back: a dead
    /// server, or a learner not booted yet, must not leave the zone without
    /// its alarm (and its disk to the hard floor); it runs the build it
    /// ran, and an older build coming back into a zone with an alarm
    /// standing is the case this leaves open.
    async fn lacking(&mut self, zone: &ServerContext) -> Option<String> {
        if self.complete(zone).await {
            return None;
        }
        self.ask(zone).await
    }

    /// Whether every member was seen with the feature.
    async fn complete(&self, zone: &ServerContext) -> bool {
        zone.local().await.is_ok_and(|local| {
            local
                .voters
                .iter()
                .chain(local.learners.iter())
                .all(|id| self.ids.contains(id))
        })
    }

    async fn ask(&mut self, zone: &ServerContext) -> Option<String> {
        self.asked = Some(tokio::time::Instant::now());
        let status = match zone.zone_status().await {
            Ok(s) => s,
            Err(e) => return Some(format!("the zone's status: {e}")),
        };
        let mut lacking = Vec::new();
        for s in &status.servers {
            if !s.error.is_empty() {
                continue;
            }
            if s.features.iter().any(|f| f == FEATURE) {
                self.ids.insert(s.id);
            } else {
                // A member seen with the feature may have been restarted
                // onto an older build.
                self.ids.remove(&s.id);
                lacking.push(format!(
                    "server {} runs a build without them ({})",
                    s.id, s.version
                ));
            }
        }
        (!lacking.is_empty()).then(|| lacking.join("; "))
    }

    /// Asks again if the last answer is old (while there is room): every
    /// [`KNOWN_REFRESH`], or every [`UNKNOWN_REFRESH`] while some member
    /// was not seen yet (at start the others may not be up; a member down).
    async fn refresh(&mut self, zone: &ServerContext) {
        let since = self.asked.map(|at| at.elapsed());
        // The clock first: the driver is asked for the members only when
        // an answer may be due, not at every measure.
        if since.is_some_and(|s| s < UNKNOWN_REFRESH) {
            return;
        }
        if since.is_some_and(|s| s < KNOWN_REFRESH) && self.complete(zone).await {
            return;
        }
        let _ = self.ask(zone).await;
    }
}

/// Measures and raises or clears this server's alarm, for the server's
/// life.
pub async fn run(zone: ServerContext, engine: Engine, data_dir: PathBuf, t: Thresholds) {
    if t.min_free == 0 && t.max_store == 0 {
        return;
    }
    let (me, name) = {
        let (id, name) = zone.identity();
        (id, name.to_owned())
    };
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    let mut raised_at: Option<tokio::time::Instant> = None;
    // Said once per episode, not at every refresh.
    let mut warned = false;
    let mut held_back = false;
    let mut known = KnownMembers::default();
    loop {
        tick.tick().await;
        let Ok(free) = crate::storage::free_bytes(&data_dir) else {
            continue;
        };
        let store = engine.size();
        let standing = zone
            .reader()
            .alarms()
            .into_iter()
            .find(|a| a.server == me)
            .map(|a| AlarmKind::try_from(a.kind).unwrap_or(AlarmKind::Unspecified));
        if standing.is_none() && t.short(free, store).is_none() {
            // An episode over (also one whose alarm was held back).
            warned = false;
            held_back = false;
            raised_at = None;
            known.refresh(&zone).await;
        }
        let raised = raised_at.map(|at| at.elapsed());
        let outcome = match step(&t, standing, raised, free, store) {
            Step::Nothing => continue,
            Step::Raise(kind, limit) => {
                if let Some(why) = known.lacking(&zone).await {
                    // Tried again at the next refresh; the hard floor
                    // guards the disk meanwhile.
                    raised_at = Some(tokio::time::Instant::now());
                    if !held_back {
                        tracing::warn!(
                            free_mib = free >> 20,
                            store_mib = store >> 20,
                            "this server is short of space but cannot raise the space alarm: {why}"
                        );
                        held_back = true;
                    }
                    continue;
                }
                let alarm = Alarm {
                    server: me,
                    name: name.clone(),
                    kind: kind as i32,
                    free_bytes: free,
                    store_bytes: store,
                    limit_bytes: limit,
                    raised_unix_ms: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                };
                let why = crate::kv::no_space_message(&alarm, 1);
                let r = zone.raise_alarm(alarm, BUDGET).await;
                if r.is_ok() {
                    if !warned {
                        tracing::warn!("{why}");
                        warned = true;
                    }
                    raised_at = Some(tokio::time::Instant::now());
                }
                r.map(drop)
            }
            Step::Clear => {
                let r = zone.clear_own_alarm(BUDGET).await;
                if r.is_ok() {
                    raised_at = None;
                    warned = false;
                    held_back = false;
                    tracing::info!(
                        free_mib = free >> 20,
                        store_mib = store >> 20,
                        "room again: space alarm cleared"
                    );
                }
                r
            }
        };
        // Not being heard (no leader, a removed server) is said once.
        match outcome {
            Ok(()) => last_error = None,
            Err(e) => {
                let e = e.to_string();
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "could not change this server's space alarm; trying again");
                }
                last_error = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SECOND: Option<Duration> = Some(Duration::from_secs(1));

    fn t() -> Thresholds {
        Thresholds {
            min_free: 256 * MIB,
            max_store: 1024 * MIB,
        }
    }

    #[test]
    fn raised_below_the_floor_or_over_the_quota() {
        assert_eq!(step(&t(), None, None, 300 * MIB, 10 * MIB), Step::Nothing);
        assert_eq!(
            step(&t(), None, None, 100 * MIB, 10 * MIB),
            Step::Raise(AlarmKind::NoSpace, 256 * MIB)
        );
        assert_eq!(
            step(&t(), None, None, 300 * MIB, 1025 * MIB),
            Step::Raise(AlarmKind::StoreQuota, 1024 * MIB)
        );
        // Both: the disk first.
        assert_eq!(
            step(&t(), None, None, 100 * MIB, 1025 * MIB),
            Step::Raise(AlarmKind::NoSpace, 256 * MIB)
        );
    }

    #[test]
    fn cleared_only_with_a_margin() {
        let no_space = Some(AlarmKind::NoSpace);
        assert_eq!(step(&t(), no_space, SECOND, 100 * MIB, 0), Step::Nothing);
        // Above the floor, within the margin (an eighth): kept.
        assert_eq!(step(&t(), no_space, None, 270 * MIB, 0), Step::Nothing);
        assert_eq!(step(&t(), no_space, None, 288 * MIB, 0), Step::Clear);
        let quota = Some(AlarmKind::StoreQuota);
        assert_eq!(
            step(&t(), quota, SECOND, 300 * MIB, 1000 * MIB),
            Step::Nothing
        );
        assert_eq!(step(&t(), quota, None, 300 * MIB, 896 * MIB), Step::Clear);
    }

    #[test]
    fn a_standing_alarm_of_the_other_kind_is_replaced() {
        assert_eq!(
            step(
                &t(),
                Some(AlarmKind::StoreQuota),
                SECOND,
                100 * MIB,
                1025 * MIB
            ),
            Step::Raise(AlarmKind::NoSpace, 256 * MIB)
        );
        // Quota alarm, the disk now fine but the store still over: kept.
        assert_eq!(
            step(
                &t(),
                Some(AlarmKind::StoreQuota),
                SECOND,
                300 * MIB,
                1025 * MIB
            ),
            Step::Nothing
        );
    }

    /// What a server sees may be stale: a standing alarm is raised again
    /// every few seconds while the server is short, and at once by a
    /// server that has not raised it itself (after a restart).
    #[test]
    fn a_standing_alarm_is_refreshed() {
        let no_space = Some(AlarmKind::NoSpace);
        let raise = Step::Raise(AlarmKind::NoSpace, 256 * MIB);
        assert_eq!(step(&t(), no_space, SECOND, 100 * MIB, 0), Step::Nothing);
        assert_eq!(step(&t(), no_space, Some(REFRESH), 100 * MIB, 0), raise);
        assert_eq!(step(&t(), no_space, None, 100 * MIB, 0), raise);
        // Raised a second ago and not seen yet (this server lags): not
        // raised again at every measure.
        assert_eq!(step(&t(), None, SECOND, 100 * MIB, 0), Step::Nothing);
        assert_eq!(step(&t(), None, Some(REFRESH), 100 * MIB, 0), raise);
    }

    #[test]
    fn zero_thresholds_never_raise() {
        let off = Thresholds {
            min_free: 0,
            max_store: 0,
        };
        assert_eq!(step(&off, None, None, 0, u64::MAX), Step::Nothing);
    }
}
