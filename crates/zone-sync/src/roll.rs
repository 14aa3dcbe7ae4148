//! Restarting the units of changed files, one server at a time.
//!
//! A new configuration must never take down every front-end at once. Each
//! server's zone-sync keeps the units whose files it changed as pending,
//! and restarts them only when it is its turn: followers first, in id
//! order, the leader last, one server at a time (a lock in the store,
//! taken and released by transactions), each waiting for its units to be
//! active again. A unit that does not come back stops the roll: the server
//! reports it, keeps it pending, and every other server holds its restarts
//! until a new push clears the failure.
//!
//! [`turn`] is the decision, from every server's last report; [`Units`] is
//! systemctl, behind a trait so that tests record restarts instead.

use std::time::{Duration, Instant};

/// One server's last report, as the roll needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub id: u64,
    /// The store revision its last pass applied.
    pub applied: u64,
    pub pending: bool,
    pub failed: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// Restart now.
    Go,
    /// Not yet: why.
    Wait(String),
    /// A restart failed somewhere: nobody restarts until a new push.
    Halted(String),
}

/// Whether server `me`, whose units became pending at store revision
/// `since`, may restart them now. `peers` are the other servers that can be
/// reached (one that is down restarts at its turn when it is back).
pub fn turn(me: u64, leader: u64, since: u64, peers: &[PeerState]) -> Turn {
    if let Some(p) = peers.iter().find(|p| p.id != me && p.failed.is_some()) {
        return Turn::Halted(format!(
            "server {} could not restart {}",
            p.id,
            p.failed.as_deref().unwrap_or("")
        ));
    }
    if leader == 0 {
        return Turn::Wait("no leader".into());
    }
    // Those who go before me: every follower for the leader, the followers
    // with a lower id for a follower.
    let first = peers
        .iter()
        .filter(|p| p.id != me && p.id != leader && (me == leader || p.id < me));
    let mut waiting = Vec::new();
    for p in first {
        if p.applied < since {
            waiting.push(format!(
                "server {} has not applied revision {since} yet",
                p.id
            ));
        } else if p.pending {
            waiting.push(format!("server {} restarts first", p.id));
        }
    }
    if waiting.is_empty() {
        Turn::Go
    } else {
        Turn::Wait(waiting.join("; "))
    }
}

/// What restarts units.
pub trait Units: Send + Sync {
    fn restart(&self, unit: &str) -> Result<(), String>;
    fn is_active(&self, unit: &str) -> Result<bool, String>;
    /// When the unit last became active, as the service manager says it
    /// (for the report); None when it cannot tell.
    fn active_since(&self, _unit: &str) -> Option<String> {
        None
    }
    /// Queues a start of a unit the zone runs everywhere.
    fn start(&self, unit: &str) -> Result<(), String> {
        Err(format!("cannot start {unit} here"))
    }
    /// Queues a stop of a unit the zone no longer runs everywhere.
    fn stop(&self, unit: &str) -> Result<(), String> {
        Err(format!("cannot stop {unit} here"))
    }
}

/// How long systemctl may take to queue a start or a stop.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(15);

/// Units restarted through `systemctl` (or a stand-in taking the same
/// arguments).
pub use zone_units::Systemctl;

impl Units for Systemctl {
    fn restart(&self, unit: &str) -> Result<(), String> {
        Systemctl::restart(self, unit)
    }

    fn is_active(&self, unit: &str) -> Result<bool, String> {
        Systemctl::is_active(self, unit)
    }

    fn active_since(&self, unit: &str) -> Option<String> {
        Systemctl::active_since(self, unit)
    }

    fn start(&self, unit: &str) -> Result<(), String> {
        Systemctl::start_no_block(self, unit, QUEUE_TIMEOUT)
    }

    fn stop(&self, unit: &str) -> Result<(), String> {
        Systemctl::stop_no_block(self, unit, QUEUE_TIMEOUT)
    }
}

/// Restarts `units` in order, each waited for until active (up to
/// `limit`); the first that fails or does not come back is returned.
pub fn restart_all(units: &dyn Units, names: &[String], limit: Duration) -> Result<(), String> {
    for u in names {
        units.restart(u).map_err(|e| format!("{u}: {e}"))?;
        let deadline = Instant::now() + limit;
        loop {
            if units.is_active(u).map_err(|e| format!("{u}: {e}"))? {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{u}: not active {} s after its restart",
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn p(id: u64, pending: bool) -> PeerState {
        PeerState {
            id,
            applied: 10,
            pending,
            failed: None,
        }
    }

    #[test]
    fn followers_go_first_in_id_order_then_the_leader() {
        // Leader 2; everyone pending.
        let all = [p(1, true), p(2, true), p(3, true)];
        assert_eq!(turn(1, 2, 10, &all), Turn::Go);
        assert!(matches!(turn(3, 2, 10, &all), Turn::Wait(_)));
        assert!(matches!(turn(2, 2, 10, &all), Turn::Wait(_)));
        // 1 done: 3 goes, the leader still waits.
        let after1 = [p(1, false), p(2, true), p(3, true)];
        assert_eq!(turn(3, 2, 10, &after1), Turn::Go);
        assert!(matches!(turn(2, 2, 10, &after1), Turn::Wait(_)));
        // Both followers done: the leader goes.
        let after3 = [p(1, false), p(2, true), p(3, false)];
        assert_eq!(turn(2, 2, 10, &after3), Turn::Go);
        assert!(matches!(turn(1, 0, 10, &all), Turn::Wait(_)), "no leader");
    }

    #[test]
    fn the_leader_waits_for_followers_that_have_not_seen_the_change() {
        // The followers report nothing pending, but from before revision 12.
        let stale = [p(1, false), p(2, true), p(3, false)];
        match turn(2, 2, 12, &stale) {
            Turn::Wait(why) => assert!(why.contains("has not applied revision 12"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failure_elsewhere_halts_everyone() {
        let mut all = [p(1, false), p(2, true), p(3, true)];
        all[0].failed = Some("opennebula.service".into());
        assert!(matches!(turn(3, 2, 10, &all), Turn::Halted(_)));
        assert!(matches!(turn(2, 2, 10, &all), Turn::Halted(_)));
    }

    #[derive(Default)]
    struct Fake {
        log: Mutex<Vec<String>>,
        dead: Vec<String>,
    }

    impl Units for Fake {
        fn restart(&self, unit: &str) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("restart {unit}"));
            Ok(())
        }
        fn is_active(&self, unit: &str) -> Result<bool, String> {
            Ok(!self.dead.iter().any(|d| d == unit))
        }
    }

    #[test]
    fn restarts_in_order_and_stops_at_a_unit_that_does_not_come_back() {
        let f = Fake {
            dead: vec!["b.service".into()],
            ..Fake::default()
        };
        let names: Vec<String> = ["a.service", "b.service", "c.service"]
            .map(String::from)
            .to_vec();
        let e = restart_all(&f, &names, Duration::from_millis(300)).unwrap_err();
        assert!(e.starts_with("b.service: not active"), "{e}");
        assert_eq!(
            *f.log.lock().unwrap(),
            vec!["restart a.service", "restart b.service"]
        );
    }
}
