//! What the `zone-sync` daemon does, over any [`Store`], [`Disk`] and
//! [`Units`]: a pass (the store's files onto the disk, the report back) and
//! a step of the roll (this server's pending restarts, at its turn). The
//! binary calls these on every change, every drift interval, and every
//! second while restarts wait; the unit tests call them on a zone in
//! memory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use zone_files::report::{LastRestart, SyncReport};

use crate::apply::{Applier, Report};
use crate::disk::Disk;
use crate::roll::{restart_all, turn, PeerState, Turn, Units};
use crate::store::{take_lock, Store};

/// How the daemon restarts units.
#[derive(Debug, Clone)]
pub struct RollOptions {
    /// How long a restarted unit has to become active again.
    pub restart_timeout: Duration,
    /// Take turns but only log the restarts.
    pub no_restart: bool,
}

/// The wall clock, seconds and milliseconds since the epoch (reports and
/// the roll's lock carry it; tests set it).
pub trait WallClock {
    fn unix_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// One server's zone-sync.
#[derive(Debug)]
pub struct Daemon<S, D: Disk, U, C = SystemClock> {
    pub store: S,
    pub applier: Applier<D>,
    pub units: U,
    pub clock: C,
    pub roll: RollOptions,
    /// Where the applier's state is saved after every change.
    pub state_path: PathBuf,
    /// The last report stored, stamp left out: a pass that changes nothing
    /// is not worth a Raft write.
    last_report: Option<SyncReport>,
    /// Why the pending restarts wait, as the last roll step decided.
    roll_wait: Option<String>,
    /// Files restored after a change by hand, since this process started.
    drift_restores: u64,
}

impl<S, D, U, C> Daemon<S, D, U, C>
where
    S: Store,
    D: Disk,
    U: Units + Clone + 'static,
    C: WallClock,
{
    pub fn new(
        store: S,
        applier: Applier<D>,
        units: U,
        clock: C,
        roll: RollOptions,
        state_path: PathBuf,
    ) -> Self {
        Daemon {
            store,
            applier,
            units,
            clock,
            roll,
            state_path,
            last_report: None,
            roll_wait: None,
            drift_restores: 0,
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        self.applier
            .state
            .save(&self.state_path)
            .with_context(|| format!("saving {}", self.state_path.display()))
    }

    /// Runs the zone's everywhere units (`zonectl services set
    /// --everywhere`) here: each listed unit not active is started (one
    /// stopped by hand is started again at the next pass, as a file edited
    /// by hand is restored), and those this zone-sync started that the
    /// zone no longer lists are stopped, unless the zone now runs them
    /// leader-only (zone-vip's then). Starts and stops are queued with
    /// systemd, not waited for: a slow unit holds up no file. A unit that
    /// was active without this zone-sync is never stopped by it. With
    /// `no_restart` (a development cluster on a workstation), only logged.
    /// What fails is logged and tried again at the next pass.
    pub async fn everywhere(&mut self) {
        let (leader, want) = match self.store.services().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the zone's services; tried again at the next pass");
                return;
            }
        };
        let want: Vec<String> = want
            .into_iter()
            .filter(|u| {
                let ok = zone_proto::zone_unit_ok(u);
                if !ok {
                    tracing::error!(unit = %u, "not a zone unit's name; not started");
                }
                ok
            })
            .collect();
        let mut changed = false;
        let gone: Vec<String> = self
            .applier
            .state
            .everywhere
            .iter()
            .filter(|u| !want.contains(u))
            .cloned()
            .collect();
        for u in gone.iter().rev() {
            if leader.contains(u) {
                tracing::info!(unit = %u, "the zone now runs this unit leader-only: left to zone-vip");
            } else if self.roll.no_restart {
                tracing::info!(unit = %u, "the zone no longer runs this unit everywhere: would stop it (--no-restart)");
            } else {
                let units = self.units.clone();
                let unit = u.clone();
                match tokio::task::spawn_blocking(move || units.stop(&unit)).await {
                    Ok(Ok(())) => {
                        tracing::info!(unit = %u, "stopped: the zone no longer runs it everywhere")
                    }
                    Ok(Err(e)) => {
                        tracing::error!(unit = %u, error = %e, "cannot stop a unit the zone no longer runs everywhere; tried again at the next pass");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(unit = %u, error = %e, "stopping a unit failed");
                        continue;
                    }
                }
            }
            self.applier.state.everywhere.remove(u);
            changed = true;
        }
        for u in &want {
            if self.roll.no_restart {
                tracing::debug!(unit = %u, "the zone runs this unit everywhere: not started (--no-restart)");
                continue;
            }
            let units = self.units.clone();
            let unit = u.clone();
            let started = tokio::task::spawn_blocking(move || {
                if units.is_active(&unit)? {
                    return Ok(false);
                }
                units.start(&unit).map(|()| true)
            })
            .await;
            match started {
                Ok(Ok(true)) => {
                    tracing::info!(unit = %u, "started: the zone runs it everywhere");
                    if self.applier.state.everywhere.insert(u.clone()) {
                        changed = true;
                    }
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(unit = %u, error = %e, "cannot start a unit the zone runs everywhere; tried again at the next pass")
                }
                Err(e) => tracing::error!(unit = %u, error = %e, "starting a unit failed"),
            }
        }
        if changed {
            if let Err(e) = self.save() {
                tracing::error!(error = %format!("{e:#}"), "cannot record the everywhere units started");
            }
        }
    }

    /// Brings the disk to the store's files and reports (when anything
    /// changed since the last report).
    pub async fn pass(&mut self) -> anyhow::Result<Report> {
        let files = self.store.files().await?;
        // Who this server is: the id of the server that answered (the
        // local one), its name and address from the membership.
        let node = self.store.member(files.me).await?;
        let report = self.applier.apply(&files.wanted, files.revision, &node);
        self.drift_restores += report.drift_restored.len() as u64;
        self.save()?;
        let state = &self.applier.state;
        let mut status = SyncReport {
            id: node.id,
            name: node.name.clone(),
            applied_revision: files.revision,
            files: state.files.len() as u64,
            written: report.written.clone(),
            drift_restored: state.drift_seen.keys().cloned().collect(),
            refused: report.refused.clone(),
            pending_restarts: state.pending_restarts.clone(),
            restart_failed: state.restart_failed.clone(),
            last_restart: state.last_restart.clone(),
            roll_wait: None,
            updated_unix: 0,
        };
        if state.pending_restarts.is_empty() {
            self.roll_wait = None;
        }
        status.roll_wait = self.roll_wait.clone();
        if self.last_report.as_ref() == Some(&status) {
            return Ok(report);
        }
        self.last_report = Some(status.clone());
        status.updated_unix = self.clock.unix_ms() / 1000;
        self.store
            .report(&status)
            .await
            .context("reporting status")?;
        if !report.written.is_empty()
            || !report.drift_restored.is_empty()
            || !report.refused.is_empty()
        {
            tracing::info!(
                revision = files.revision,
                written = report.written.len(),
                drift_restored = report.drift_restored.len(),
                refused = report.refused.len(),
                "pass done"
            );
        }
        Ok(report)
    }

    /// This server's figures for zoned's metrics (`Agent.ReportFigures`):
    /// the revision last applied, drift restores, the roll's state.
    pub fn figures(&self) -> zone_proto::v1::AgentFigures {
        let state = &self.applier.state;
        let f = |name: &str, value: f64| zone_proto::v1::AgentFigure {
            name: name.to_owned(),
            value,
        };
        let applied = self.last_report.as_ref().map_or(0, |r| r.applied_revision);
        zone_proto::v1::AgentFigures {
            agent: "zone-sync".into(),
            figures: vec![
                f("sync_applied_revision", applied as f64),
                f("sync_drift_restores", self.drift_restores as f64),
                f("sync_restarts_pending", state.pending_restarts.len() as f64),
                f(
                    "sync_roll_halted",
                    f64::from(u8::from(state.restart_failed.is_some())),
                ),
            ],
        }
    }

    /// Records why this server's restarts wait in its report: the roll's
    /// state for the operator, and a barrier for tests (once a server
    /// reports itself halted, no restart of its can follow until a new
    /// push). A Raft write only when the reason changed.
    async fn note_roll(&mut self, wait: Option<String>) -> anyhow::Result<()> {
        if self.roll_wait == wait {
            return Ok(());
        }
        self.roll_wait = wait;
        let Some(mut status) = self.last_report.clone() else {
            return Ok(());
        };
        status.roll_wait = self.roll_wait.clone();
        self.last_report = Some(status.clone());
        status.updated_unix = self.clock.unix_ms() / 1000;
        self.store.report(&status).await.context("reporting status")
    }

    /// Restarts this server's pending units if it is its turn in the roll;
    /// returns what it decided, and reports why it waits if it does.
    pub async fn roll_step(&mut self) -> anyhow::Result<Turn> {
        let decision = self.decide_and_restart().await?;
        let wait = match &decision {
            Turn::Wait(why) if !self.applier.state.pending_restarts.is_empty() => {
                Some(format!("waiting: {why}"))
            }
            Turn::Halted(why) => Some(format!("halted: {why}")),
            _ => None,
        };
        self.note_roll(wait).await?;
        Ok(decision)
    }

    async fn decide_and_restart(&mut self) -> anyhow::Result<Turn> {
        let state = &self.applier.state;
        if state.pending_restarts.is_empty() {
            return Ok(Turn::Wait("nothing to restart".into()));
        }
        if let Some(failed) = &state.restart_failed {
            return Ok(Turn::Halted(format!("a restart failed here: {failed}")));
        }
        let Some(me) = self.last_report.as_ref().map(|r| r.id) else {
            return Ok(Turn::Wait("no pass yet".into()));
        };
        let zone = self.store.zone().await?;
        let mut peers = Vec::new();
        for r in self.store.reports().await? {
            if r.id == me || !zone.reachable.contains(&r.id) {
                continue;
            }
            peers.push(PeerState {
                id: r.id,
                applied: r.applied_revision,
                pending: !r.pending_restarts.is_empty(),
                failed: r.restart_failed,
            });
        }
        // A reachable server that never reported has not applied anything.
        for id in &zone.reachable {
            if *id != me && !peers.iter().any(|p| p.id == *id) {
                peers.push(PeerState {
                    id: *id,
                    applied: 0,
                    pending: false,
                    failed: None,
                });
            }
        }
        let decision = turn(me, zone.leader, self.applier.state.pending_since, &peers);
        if decision != Turn::Go {
            tracing::debug!(?decision, "restarts wait");
            return Ok(decision);
        }
        let restart_timeout = self.roll.restart_timeout.max(Duration::from_secs(1));
        let now_unix = self.clock.unix_ms() / 1000;
        let Some(mine) = take_lock(&mut self.store, me, now_unix, restart_timeout * 4).await?
        else {
            return Ok(Turn::Wait("another server holds the roll's lock".into()));
        };
        let units: Vec<String> = self
            .applier
            .state
            .pending_restarts
            .iter()
            .cloned()
            .collect();
        tracing::info!(?units, "restarting, this server's turn in the roll");
        let started_unix_ms = self.clock.unix_ms();
        let (outcome, active_since) = if self.roll.no_restart {
            tracing::info!(?units, "--no-restart: not restarting");
            (Ok(()), Default::default())
        } else {
            let program = self.units.clone();
            let names = units.clone();
            tokio::task::spawn_blocking(move || {
                let r = restart_all(&program, &names, restart_timeout);
                let since = names
                    .iter()
                    .filter_map(|u| program.active_since(u).map(|t| (u.clone(), t)))
                    .collect();
                (r, since)
            })
            .await?
        };
        let state = &mut self.applier.state;
        state.last_restart = Some(LastRestart {
            units: units.clone(),
            started_unix_ms,
            done_unix_ms: self.clock.unix_ms(),
            active_since,
            ok: outcome.is_ok(),
        });
        match outcome {
            Ok(()) => {
                if !self.roll.no_restart {
                    tracing::info!(?units, "restarted and active again");
                }
                state.pending_restarts.clear();
            }
            Err(e) => {
                tracing::error!(error = %e, "a restarted unit did not come back: the roll stops here");
                state.restart_failed = Some(e);
            }
        }
        self.save()?;
        // Report before letting the next server go.
        self.last_report = None;
        self.roll_wait = None;
        self.pass().await?;
        self.store.release_lock(mine).await?;
        Ok(Turn::Go)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{State, Wanted};
    use crate::disk::MemoryDisk;
    use crate::store::{Held, Memory, ZoneNow};
    use std::sync::{Arc, Mutex};
    use zone_files::paths::Roots;
    use zone_files::template::NodeVars;

    /// Units that record restarts; `down` never come back.
    #[derive(Clone, Default)]
    struct Recorded {
        restarted: Arc<Mutex<Vec<String>>>,
        down: Arc<Mutex<Vec<String>>>,
    }

    impl Units for Recorded {
        fn restart(&self, unit: &str) -> Result<(), String> {
            self.restarted.lock().unwrap().push(unit.to_owned());
            Ok(())
        }
        fn is_active(&self, unit: &str) -> Result<bool, String> {
            Ok(!self.down.lock().unwrap().iter().any(|u| u == unit))
        }
    }

    struct Fixed(u64);

    impl WallClock for Fixed {
        fn unix_ms(&self) -> u64 {
            self.0
        }
    }

    fn oned(content: &str) -> Wanted {
        Wanted {
            path: "/etc/one/oned.conf".into(),
            content: content.as_bytes().to_vec(),
            restart_units: vec!["opennebula.service".into()],
            template: true,
            ..Wanted::default()
        }
    }

    /// Server `me` of a zone of three led by `leader`, one file stored.
    fn daemon(
        me: u64,
        leader: u64,
        dir: &std::path::Path,
    ) -> Daemon<Memory, MemoryDisk, Recorded, Fixed> {
        let store = Memory {
            files: vec![oned("SERVER_ID = {{id0}}\n")],
            revision: 10,
            me,
            members: (1..=3)
                .map(|id| {
                    let n =
                        NodeVars::from_member(id, &format!("fe{id}"), &format!("10.0.0.{id}:7401"));
                    (id, n)
                })
                .collect(),
            zone: ZoneNow {
                leader,
                reachable: (1..=3).collect(),
            },
            ..Memory::default()
        };
        let applier = Applier {
            disk: MemoryDisk::default(),
            roots: Roots::new(["/etc/one"]).unwrap(),
            fs_root: "/".into(),
            backups_keep: 2,
            state: State::default(),
        };
        let roll = RollOptions {
            restart_timeout: Duration::from_secs(1),
            no_restart: false,
        };
        Daemon::new(
            store,
            applier,
            Recorded::default(),
            Fixed(1_800_000_000_000),
            roll,
            dir.join("state.json"),
        )
    }

    #[tokio::test]
    async fn a_pass_writes_the_file_rendered_for_this_server_and_reports_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(2, 1, dir.path());
        let r = d.pass().await.unwrap();
        assert_eq!(r.written, vec!["/etc/one/oned.conf".to_owned()]);
        assert_eq!(
            d.applier.disk.read("/etc/one/oned.conf").unwrap().unwrap(),
            b"SERVER_ID = 1\n"
        );
        let report = &d.store.reports[&2];
        assert_eq!(
            (report.name.as_str(), report.applied_revision, report.files),
            ("fe2", 10, 1)
        );
        assert_eq!(report.updated_unix, 1_800_000_000);
        assert!(report.pending_restarts.contains("opennebula.service"));
        // The next pass writes nothing (a new report: `written` is empty);
        // the one after changes nothing, and is not reported.
        d.pass().await.unwrap();
        assert_eq!(d.store.reports_written, 2);
        assert!(d.store.reports[&2].written.is_empty());
        d.pass().await.unwrap();
        assert_eq!(d.store.reports_written, 2);
        assert!(State::load(&dir.path().join("state.json"))
            .unwrap()
            .files
            .contains_key("/etc/one/oned.conf"));
    }

    #[tokio::test]
    async fn a_follower_restarts_at_its_turn_and_reports_before_releasing_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(2, 3, dir.path());
        d.pass().await.unwrap();
        // Follower 1 has not applied the change yet: 2 waits.
        d.store.reports.insert(
            1,
            SyncReport {
                id: 1,
                applied_revision: 9,
                ..SyncReport::default()
            },
        );
        assert!(matches!(d.roll_step().await.unwrap(), Turn::Wait(_)));
        assert!(d.units.restarted.lock().unwrap().is_empty());
        // Applied, nothing pending there: 2 goes.
        d.store.reports.insert(
            1,
            SyncReport {
                id: 1,
                applied_revision: 10,
                ..SyncReport::default()
            },
        );
        assert_eq!(d.roll_step().await.unwrap(), Turn::Go);
        assert_eq!(
            *d.units.restarted.lock().unwrap(),
            vec!["opennebula.service".to_owned()]
        );
        let report = &d.store.reports[&2];
        assert!(report.pending_restarts.is_empty(), "reported done");
        assert!(report.last_restart.as_ref().is_some_and(|l| l.ok));
        assert_eq!(d.store.lock, None, "released");
    }

    #[tokio::test]
    async fn the_leader_waits_for_the_followers_and_a_failure_halts_the_roll() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(1, 1, dir.path());
        d.pass().await.unwrap();
        let pending = SyncReport {
            applied_revision: 10,
            pending_restarts: ["opennebula.service".to_owned()].into(),
            ..SyncReport::default()
        };
        d.store.reports.insert(
            2,
            SyncReport {
                id: 2,
                ..pending.clone()
            },
        );
        d.store.reports.insert(
            3,
            SyncReport {
                id: 3,
                applied_revision: 10,
                ..SyncReport::default()
            },
        );
        assert!(
            matches!(d.roll_step().await.unwrap(), Turn::Wait(w) if w.contains("server 2 restarts first"))
        );
        assert!(d.store.reports[&1]
            .roll_wait
            .as_deref()
            .is_some_and(|w| w.starts_with("waiting: server 2 restarts first")));
        d.store.reports.insert(
            2,
            SyncReport {
                id: 2,
                restart_failed: Some("x: not active".into()),
                ..pending
            },
        );
        assert!(matches!(d.roll_step().await.unwrap(), Turn::Halted(_)));
        assert!(d.store.reports[&1]
            .roll_wait
            .as_deref()
            .is_some_and(|w| w.starts_with("halted: server 2 could not restart")));
        assert!(d.units.restarted.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_unit_that_does_not_come_back_stops_the_roll_here() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(2, 1, dir.path());
        d.units
            .down
            .lock()
            .unwrap()
            .push("opennebula.service".into());
        d.pass().await.unwrap();
        assert_eq!(d.roll_step().await.unwrap(), Turn::Go);
        let report = &d.store.reports[&2];
        assert!(report
            .restart_failed
            .as_deref()
            .is_some_and(|e| e.contains("opennebula.service")));
        assert!(!report.pending_restarts.is_empty(), "still pending");
        assert!(matches!(d.roll_step().await.unwrap(), Turn::Halted(_)));
        assert_eq!(
            d.units.restarted.lock().unwrap().len(),
            1,
            "not restarted again"
        );
    }

    #[tokio::test]
    async fn a_held_lock_makes_the_turn_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(2, 1, dir.path());
        d.pass().await.unwrap();
        d.store.lock = Some(Held {
            value: b"3 1800000000".to_vec(),
            revision: 4,
        });
        assert!(matches!(d.roll_step().await.unwrap(), Turn::Wait(w) if w.contains("lock")));
        assert!(d.units.restarted.lock().unwrap().is_empty());
    }
}
