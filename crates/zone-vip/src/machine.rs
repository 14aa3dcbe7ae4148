//! The VIP agent's decisions, free of side effects and of the clock: given
//! lease states, stream losses and the time, it says what to do, in order.
//!
//! The one rule: act as leader (hold the VIP, run leader-only units) only
//! while holding a lease whose expiry is still in the future. Becoming
//! leader: add the VIPs, announce them, start units, run the leader hook.
//! Leaving: remove the VIPs first (the time-critical part), then stop units
//! and run the follower hook.
//!
//! Leader-only units and the leader hook wait, once the VIP is up, until the
//! lease says this server's required datastores are mounted and healthy
//! (`storage_ready`): a front-end service started before its data is there
//! would fail, or write under the mount point.
//!
//! Damping: after a lease ran out without renewal, a lease that comes back
//! makes this agent leader again only once it has been renewed without a
//! gap for `lease.settle_ms`, so that a lease which keeps lapsing (an
//! overloaded host) does not make the VIP and the units flap. A change of
//! leader (zoned says the lease is not held) ends the wait.

use crate::config::{Config, Vip};

/// Something to do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    AddVip(Vip),
    /// The lease was renewed: renew the address's kernel lifetime with it.
    RenewVip(Vip),
    /// Start announcing (gratuitous ARP / unsolicited NA), `count` times.
    Announce(Vip),
    StartUnit(String),
    LeaderHook(String),
    RemoveVip(Vip),
    /// Stop any announcements still running.
    StopAnnouncing,
    StopUnit(String),
    FollowerHook(String),
}

/// What the lease says, in this agent's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseView {
    pub held: bool,
    /// CLOCK_BOOTTIME nanoseconds.
    pub expires_ns: u64,
    pub generation: u64,
    /// This server's required datastores are mounted and healthy.
    pub storage_ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Follower,
    /// `units`: the leader-only units were started (they wait for the
    /// required datastores).
    Leader {
        expires_ns: u64,
        units: bool,
    },
}

/// Waiting, after a lapse, for the lease to hold without a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settling {
    /// The current run of valid leases: since when, and until when the
    /// last one runs. None before the first or after a gap.
    run: Option<(u64, u64)>,
}

#[derive(Debug)]
pub struct Machine {
    config: Config,
    role: Role,
    settling: Option<Settling>,
}

impl Machine {
    pub fn new(config: Config) -> Machine {
        Machine {
            config,
            role: Role::Follower,
            settling: None,
        }
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader { .. })
    }

    /// When the current lease runs out, if leading.
    pub fn deadline_ns(&self) -> Option<u64> {
        match self.role {
            Role::Leader { expires_ns, .. } => Some(expires_ns),
            Role::Follower => None,
        }
    }

    /// At start: whatever a previous run (or a crash) left on the
    /// interfaces goes, before anything else.
    pub fn startup(&self) -> Vec<Action> {
        self.config
            .vips
            .iter()
            .cloned()
            .map(Action::RemoveVip)
            .collect()
    }

    /// A lease state arrived at time `now_ns` (CLOCK_BOOTTIME).
    pub fn on_lease(&mut self, lease: LeaseView, now_ns: u64) -> Vec<Action> {
        let valid = lease.held && lease.expires_ns > now_ns;
        if !lease.held {
            // Another leader, or this one handing over: a new start.
            self.settling = None;
        }
        match (self.role, valid) {
            (Role::Follower, true) => {
                if !self.settled(lease.expires_ns, now_ns) {
                    return Vec::new();
                }
                self.role = Role::Leader {
                    expires_ns: lease.expires_ns,
                    units: lease.storage_ready,
                };
                if !lease.storage_ready {
                    tracing::info!("leader-only units wait for this server's required datastores");
                }
                self.become_leader(lease.storage_ready)
            }
            (Role::Leader { units, .. }, true) => {
                let start = !units && lease.storage_ready;
                self.role = Role::Leader {
                    expires_ns: lease.expires_ns,
                    units: units || lease.storage_ready,
                };
                let mut a: Vec<Action> = self
                    .config
                    .vips
                    .iter()
                    .cloned()
                    .map(Action::RenewVip)
                    .collect();
                if start {
                    tracing::info!(
                        "the required datastores are healthy: starting leader-only units"
                    );
                    a.extend(self.leader_units());
                }
                a
            }
            (Role::Leader { .. }, false) => self.become_follower(),
            (Role::Follower, false) => {
                if let Some(s) = self.settling.as_mut() {
                    s.run = None;
                }
                Vec::new()
            }
        }
    }

    /// Whether a valid lease (until `expires_ns`) may make this agent
    /// leader now: always, unless settling after a lapse.
    fn settled(&mut self, expires_ns: u64, now_ns: u64) -> bool {
        let Some(s) = self.settling.as_mut() else {
            return true;
        };
        let since = match s.run {
            Some((since, until)) if now_ns < until => since,
            _ => now_ns,
        };
        s.run = Some((since, expires_ns));
        if now_ns - since < self.config.lease.settle_ms * 1_000_000 {
            return false;
        }
        tracing::info!(
            settle_ms = self.config.lease.settle_ms,
            "the lease has held without a gap since its lapse; taking over again"
        );
        self.settling = None;
        true
    }

    /// The clock reached `now_ns` with no new lease.
    pub fn on_tick(&mut self, now_ns: u64) -> Vec<Action> {
        match self.role {
            Role::Leader { expires_ns, .. } if now_ns >= expires_ns => {
                if self.config.lease.settle_ms > 0 {
                    tracing::info!(
                        settle_ms = self.config.lease.settle_ms,
                        "leading again once the lease holds without a gap for settle_ms"
                    );
                    self.settling = Some(Settling { run: None });
                }
                self.become_follower()
            }
            _ => Vec::new(),
        }
    }

    /// The lease stream broke or zoned died: no lease can be trusted.
    pub fn on_stream_lost(&mut self) -> Vec<Action> {
        self.settling = None;
        match self.role {
            Role::Leader { .. } => self.become_follower(),
            Role::Follower => Vec::new(),
        }
    }

    fn become_leader(&self, units: bool) -> Vec<Action> {
        let c = &self.config;
        let mut a: Vec<Action> = c.vips.iter().cloned().map(Action::AddVip).collect();
        a.extend(c.vips.iter().cloned().map(Action::Announce));
        if units {
            a.extend(self.leader_units());
        }
        a
    }

    fn leader_units(&self) -> Vec<Action> {
        let c = &self.config;
        let mut a: Vec<Action> = c
            .leader
            .units
            .iter()
            .cloned()
            .map(Action::StartUnit)
            .collect();
        a.extend(c.leader.hook.iter().cloned().map(Action::LeaderHook));
        a
    }

    fn become_follower(&mut self) -> Vec<Action> {
        self.role = Role::Follower;
        let c = &self.config;
        let mut a: Vec<Action> = c.vips.iter().cloned().map(Action::RemoveVip).collect();
        a.push(Action::StopAnnouncing);
        a.extend(c.leader.units.iter().rev().cloned().map(Action::StopUnit));
        a.extend(c.follower.hook.iter().cloned().map(Action::FollowerHook));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "[[vip]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n\
             [leader]\nunits = [\"a.service\", \"b.service\"]\nhook = \"up\"\n\
             [follower]\nhook = \"down\"\n",
        )
        .unwrap()
    }

    fn lease(held: bool, expires_ns: u64) -> LeaseView {
        LeaseView {
            held,
            expires_ns,
            generation: 1,
            storage_ready: true,
        }
    }

    fn vip() -> Vip {
        config().vips[0].clone()
    }

    #[test]
    fn a_valid_lease_makes_a_leader_in_order() {
        let mut m = Machine::new(config());
        let a = m.on_lease(lease(true, 1_000), 500);
        assert_eq!(
            a,
            vec![
                Action::AddVip(vip()),
                Action::Announce(vip()),
                Action::StartUnit("a.service".into()),
                Action::StartUnit("b.service".into()),
                Action::LeaderHook("up".into()),
            ]
        );
        assert_eq!(m.deadline_ns(), Some(1_000));
        // A renewal moves the deadline and the address's kernel lifetime.
        assert_eq!(
            m.on_lease(lease(true, 2_000), 900),
            vec![Action::RenewVip(vip())]
        );
        assert_eq!(m.deadline_ns(), Some(2_000));
    }

    #[test]
    fn leader_units_wait_for_the_required_datastores() {
        let mut m = Machine::new(config());
        let not_ready = |expires_ns| LeaseView {
            storage_ready: false,
            ..lease(true, expires_ns)
        };
        // The VIP at once; the units and the hook not yet.
        assert_eq!(
            m.on_lease(not_ready(1_000), 500),
            vec![Action::AddVip(vip()), Action::Announce(vip())]
        );
        assert_eq!(
            m.on_lease(not_ready(2_000), 900),
            vec![Action::RenewVip(vip())]
        );
        // Healthy: started once, with the renewal.
        assert_eq!(
            m.on_lease(lease(true, 3_000), 1_900),
            vec![
                Action::RenewVip(vip()),
                Action::StartUnit("a.service".into()),
                Action::StartUnit("b.service".into()),
                Action::LeaderHook("up".into()),
            ]
        );
        assert_eq!(
            m.on_lease(lease(true, 4_000), 2_900),
            vec![Action::RenewVip(vip())]
        );
        // Unhealthy again while leading: the units keep running (storage
        // trouble moves leadership instead).
        assert_eq!(
            m.on_lease(not_ready(5_000), 3_900),
            vec![Action::RenewVip(vip())]
        );
    }

    #[test]
    fn an_expired_lease_is_never_acted_on() {
        let mut m = Machine::new(config());
        assert!(m.on_lease(lease(true, 1_000), 1_000).is_empty());
        assert!(m.on_lease(lease(true, 1_000), 5_000).is_empty());
        assert!(!m.is_leader());
    }

    #[test]
    fn expiry_revocation_and_stream_loss_each_step_down_vip_first() {
        let down = vec![
            Action::RemoveVip(vip()),
            Action::StopAnnouncing,
            Action::StopUnit("b.service".into()),
            Action::StopUnit("a.service".into()),
            Action::FollowerHook("down".into()),
        ];
        let mut m = Machine::new(config());
        m.on_lease(lease(true, 1_000), 0);
        assert!(m.on_tick(999).is_empty());
        assert_eq!(m.on_tick(1_000), down);
        assert!(m.on_tick(2_000).is_empty(), "steps down once");

        // (A revocation ends the settling after the lapse.)
        m.on_lease(lease(false, 0), 1_500);
        m.on_lease(lease(true, 3_000), 2_000);
        assert_eq!(m.on_lease(lease(false, 0), 2_100), down);

        m.on_lease(lease(true, 5_000), 4_000);
        assert_eq!(m.on_stream_lost(), down);
        assert!(m.on_stream_lost().is_empty());
    }

    #[test]
    fn a_renewal_that_arrives_late_does_not_resurrect_the_leader() {
        let mut m = Machine::new(config());
        m.on_lease(lease(true, 1_000), 0);
        m.on_tick(1_000);
        // A stale renewal (already expired) is ignored.
        assert!(m.on_lease(lease(true, 1_500), 1_600).is_empty());
        assert!(!m.is_leader());
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn after_a_lapse_the_lease_must_hold_without_a_gap_for_settle_ms() {
        let mut m = Machine::new(config());
        assert_eq!(m.config.lease.settle_ms, 1000);
        m.on_lease(lease(true, 350 * MS), 0);
        assert!(!m.on_tick(350 * MS).is_empty(), "the lapse steps down");
        // Renewals every 100 ms from 400 ms: not yet a second of them.
        for t in (400..1400).step_by(100) {
            assert!(m.on_lease(lease(true, (t + 350) * MS), t * MS).is_empty());
            assert!(!m.is_leader(), "leader again at {t} ms");
        }
        // A gap (the lease ran out at 1650 ms) starts the second again.
        assert!(m.on_lease(lease(true, 2_050 * MS), 1_700 * MS).is_empty());
        assert!(m.on_lease(lease(true, 2_600 * MS), 2_600 * MS).is_empty());
        assert!(m.on_lease(lease(true, 3_000 * MS), 2_650 * MS).is_empty());
        for t in (2_700..3_650).step_by(100) {
            assert!(m.on_lease(lease(true, (t + 350) * MS), t * MS).is_empty());
        }
        // A second without a gap since 2650 ms.
        assert_eq!(
            m.on_lease(lease(true, 4_000 * MS), 3_650 * MS)[0],
            Action::AddVip(vip())
        );
        assert!(m.is_leader());
        // Settled: a later renewal is an ordinary one.
        assert_eq!(
            m.on_lease(lease(true, 4_100 * MS), 3_750 * MS),
            vec![Action::RenewVip(vip())]
        );
        assert!(m.is_leader());
    }

    #[test]
    fn a_change_of_leader_or_of_zoned_ends_the_settling() {
        let mut m = Machine::new(config());
        m.on_lease(lease(true, 350 * MS), 0);
        m.on_tick(350 * MS);
        // zoned says the lease is not held (a new leader elsewhere); when
        // this server leads again, it takes over at once.
        assert!(m.on_lease(lease(false, 0), 400 * MS).is_empty());
        assert!(!m.on_lease(lease(true, 900 * MS), 500 * MS).is_empty());
        m.on_tick(900 * MS);
        assert!(m.on_stream_lost().is_empty());
        assert!(!m.on_lease(lease(true, 1_400 * MS), 1_000 * MS).is_empty());
    }

    #[test]
    fn settle_ms_0_takes_the_lease_back_at_once() {
        let mut c = config();
        c.lease.settle_ms = 0;
        let mut m = Machine::new(c);
        m.on_lease(lease(true, 350 * MS), 0);
        m.on_tick(350 * MS);
        assert!(!m.on_lease(lease(true, 800 * MS), 450 * MS).is_empty());
    }

    #[test]
    fn startup_removes_stale_vips() {
        assert_eq!(
            Machine::new(config()).startup(),
            vec![Action::RemoveVip(vip())]
        );
    }
}
