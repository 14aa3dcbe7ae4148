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
//! would fail, or write under the mount point; and until it says the
//! zone's system extensions are merged here (`extensions_ready`): a
//! payload's units come from its extension, and a server that joined a
//! moment ago may not have fetched it yet.
//!
//! Fencing: they also wait for the fence delay after this server's first
//! lease (or the fence hook's success), by which time the old holder has
//! stopped its own units or been reset by its watchdog; this server arms
//! its watchdog on taking the lease, pets it with each renewal, and
//! disarms it only once its units have stopped after losing the lease
//! (see [`crate::watchdog`] for the argument). Without leader-only units
//! or exclusive datastores (or with `fence.watchdog_mode = "off"`) there is
//! nothing to fence.
//!
//! Exclusive datastores (a shared block device's file system, which must
//! never be mounted on two servers at once) are systemd mount units that
//! zone-mounts writes and lists ([`Machine::on_exclusive_units`]). They are
//! fenced like the units: mounted (`Mount`) once the delay is over, before
//! the leader-only units, and stopped after the units and the follower hook
//! when the lease ends, before the watchdog is disarmed; a mount that will
//! not go keeps the watchdog armed, and the server is reset. One declared
//! while this server leads is mounted at once if the old holder is fenced
//! already, else after a delay of its own.
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
    /// Mount an exclusive datastore: start its mount unit and wait for it.
    /// The units after it do not start if it fails, nor when the watchdog
    /// is not armed for this leadership (whatever `fence.watchdog_mode`:
    /// a shared block device is never mounted unfenced).
    Mount(String),
    /// Unmount an exclusive datastore removed from the zone while leading,
    /// if it can go (nothing uses it); if not, it goes when the lease ends,
    /// after the units.
    Release(String),
    StartUnit(String),
    LeaderHook(String),
    /// Reset the TCP connections whose local address is the VIP, while it
    /// is still there: after its removal this server can send nothing from
    /// it, and a client waiting for an answer would hear nothing until its
    /// own deadline. Only before a planned handover (see
    /// [`Machine::on_lease`]).
    ResetConnections(Vip),
    RemoveVip(Vip),
    /// Stop any announcements still running.
    StopAnnouncing,
    StopUnit(String),
    FollowerHook(String),
    /// Arm the watchdog for leadership `epoch` (on taking the lease).
    ArmWatchdog {
        epoch: u64,
    },
    /// Pet it (with each renewal, only while the lease is valid).
    PetWatchdog,
    /// Disarm it once the units before this action have stopped, unless
    /// leadership `epoch` is no longer the latest (0: at start).
    DisarmWatchdog {
        epoch: u64,
    },
    /// Run the fence hook against server `target` (the leader this server
    /// last saw) for leadership `epoch`: its success ends the fence delay
    /// early ([`Machine::on_fence_hook`]).
    FenceHook {
        command: String,
        epoch: u64,
        target: u64,
    },
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
    /// The zone's system extensions are merged on this server.
    pub extensions_ready: bool,
    /// The leader this server knows (0: none), and this server's id.
    pub leader_id: u64,
    pub server_id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Follower,
    /// `units`: the leader-only units were started (they wait for the
    /// required datastores).
    Leader {
        expires_ns: u64,
        units: bool,
        /// The latest lease said the required datastores are healthy.
        storage_ready: bool,
        /// The latest lease said the zone's extensions are merged here.
        extensions_ready: bool,
        /// Until when the units wait for the old holder to be fenced
        /// (CLOCK_BOOTTIME ns); 0 once fenced.
        fence_until_ns: u64,
        /// The watchdog was armed for this leadership.
        armed: bool,
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
    /// Counts the times this agent took the lease: the watchdog's arming
    /// and disarming and the fence hook's answer carry it.
    epoch: u64,
    /// The last leader other than this server that the lease states named
    /// (0: none yet): the one the fence hook powers off.
    last_other_leader: u64,
    /// The exclusive datastores' mount units, as zone-mounts lists them.
    exclusive: Vec<String>,
    /// The mount units started in this leadership, in order.
    mounted: Vec<String>,
    /// Mount units that left the list while mounted (or that a previous
    /// run recorded): stopped when the lease ends, and at start.
    released: Vec<String>,
    /// The leader-only units: the zone's (`zonectl services set`, carried
    /// by each lease state) or, while the zone sets none, this agent's
    /// configuration's ([`Machine::on_leader_units`]).
    units: Vec<String>,
    /// The units started in this leadership: stopped when it ends,
    /// whatever the list says by then.
    started: Vec<String>,
    /// Units a previous run recorded as possibly started: stopped at
    /// start.
    recorded_units: Vec<String>,
}

impl Machine {
    pub fn new(config: Config) -> Machine {
        Machine {
            role: Role::Follower,
            settling: None,
            epoch: 0,
            last_other_leader: 0,
            exclusive: Vec::new(),
            mounted: Vec::new(),
            released: Vec::new(),
            units: config.leader.units.clone(),
            started: Vec::new(),
            recorded_units: Vec::new(),
            config,
        }
    }

    /// The mount units a previous run recorded as mounted (read at start,
    /// before [`Machine::startup`]): stopped with the listed ones.
    pub fn on_recorded_mounts(&mut self, units: Vec<String>) {
        for u in units {
            if !self.released.contains(&u) {
                self.released.push(u);
            }
        }
    }

    /// What this agent may have mounted and not yet stopped: to record, so
    /// that a restart stops it even once it has left the list.
    pub fn mounted_units(&self) -> Vec<String> {
        let mut all = self.mounted.clone();
        let released: Vec<String> = self
            .released
            .iter()
            .filter(|u| !all.contains(u))
            .cloned()
            .collect();
        all.extend(released);
        all
    }

    /// The leader-only units a previous run recorded (read at start,
    /// before [`Machine::startup`]), which stops them.
    pub fn on_recorded_units(&mut self, units: Vec<String>) {
        for u in units {
            if !self.recorded_units.contains(&u) {
                self.recorded_units.push(u);
            }
        }
    }

    /// What this agent may have started and not yet stopped, and what it
    /// would start: to record, so that a restart stops it even once the
    /// zone has changed its list.
    pub fn units_to_record(&self) -> Vec<String> {
        let mut all = self.units.clone();
        for u in self.started.iter().chain(&self.recorded_units) {
            if !all.contains(u) {
                all.push(u.clone());
            }
        }
        all
    }

    /// The leader-only units the zone sets (`None`: the zone sets none,
    /// and this agent's configuration says), from each lease state, before
    /// [`Machine::on_lease`] for the same state. While leading, the units
    /// started that the list dropped stop at once (and stay recorded until
    /// the lease ends, so that a restart stops them should this stop not
    /// happen); the ones added start with the next lease renewal, under
    /// the same conditions as any leader-only unit (a valid lease, the
    /// required datastores, the extensions, the fence). When there was
    /// nothing to fence at this leadership's start, the watchdog is armed
    /// now and they wait for a fence delay from now, as an exclusive
    /// datastore declared while leading does.
    pub fn on_leader_units(&mut self, units: Option<Vec<String>>, now_ns: u64) -> Vec<Action> {
        let units = units.unwrap_or_else(|| self.config.leader.units.clone());
        if units == self.units {
            return Vec::new();
        }
        tracing::info!(?units, "leader-only units");
        self.units = units;
        let gone: Vec<String> = self
            .started
            .iter()
            .filter(|u| !self.units.contains(u))
            .cloned()
            .collect();
        self.started.retain(|u| !gone.contains(u));
        for u in &gone {
            if !self.recorded_units.contains(u) {
                self.recorded_units.push(u.clone());
            }
        }
        let mut a: Vec<Action> = gone.into_iter().rev().map(Action::StopUnit).collect();
        let fencing = self.fencing();
        let delay = self.config.fence.delay.as_nanos() as u64;
        let epoch = self.epoch;
        let Role::Leader {
            units: running,
            fence_until_ns,
            armed,
            ..
        } = &mut self.role
        else {
            return a;
        };
        if fencing && !*armed {
            *armed = true;
            a.push(Action::ArmWatchdog { epoch });
            if delay > 0 {
                tracing::info!(delay = ?self.config.fence.delay, "leader-only units wait for the fence delay");
                *fence_until_ns = now_ns + delay;
                // Started after the delay, with the leader hook (there was
                // none, or this leadership would have been fenced from its
                // start).
                *running = false;
            }
        }
        a
    }

    /// Whether there is anything to fence: leader-only units (or a leader
    /// hook, or exclusive datastores) and a watchdog mode other than off.
    fn fencing(&self) -> bool {
        let c = &self.config;
        (!self.units.is_empty()
            || !self.recorded_units.is_empty()
            || c.leader.hook.is_some()
            || !self.exclusive.is_empty()
            || !self.released.is_empty())
            && c.fence.watchdog_mode != crate::config::WatchdogMode::Off
    }

    /// The exclusive datastores' mount units, as zone-mounts lists them now
    /// (read at start, before [`Machine::startup`], and every second).
    /// While leading: new ones are mounted at once when the old holder is
    /// fenced and the units run; when nothing was fenced for this
    /// leadership (there was nothing to fence at its start), the watchdog
    /// is armed now and they wait for a fence delay from now. Ones gone
    /// from the list are still stopped when the lease ends (zone-mounts
    /// leaves them to this agent).
    pub fn on_exclusive_units(&mut self, units: Vec<String>, now_ns: u64) -> Vec<Action> {
        if units == self.exclusive {
            return Vec::new();
        }
        tracing::info!(?units, "exclusive datastores' mount units");
        self.exclusive = units;
        // Gone from the zone while mounted here: unmounted now if it can
        // be, and in any case when the lease ends.
        let gone: Vec<String> = self
            .mounted
            .iter()
            .filter(|u| !self.exclusive.contains(u))
            .cloned()
            .collect();
        self.mounted.retain(|u| !gone.contains(u));
        // Back in the zone: mounted again like a new one.
        let listed = self.exclusive.clone();
        self.released.retain(|u| !listed.contains(u));
        self.released.extend(gone.iter().cloned());
        let mut a: Vec<Action> = gone.into_iter().map(Action::Release).collect();
        let fencing = self.fencing();
        let delay = self.config.fence.delay.as_nanos() as u64;
        let epoch = self.epoch;
        let Role::Leader {
            units: started,
            fence_until_ns,
            armed,
            ..
        } = &mut self.role
        else {
            return a;
        };
        if fencing && !*armed {
            *armed = true;
            a.push(Action::ArmWatchdog { epoch });
            if delay > 0 {
                tracing::info!(delay = ?self.config.fence.delay, "exclusive datastores wait for the fence delay");
                *fence_until_ns = now_ns + delay;
                // Mounted after the delay, by the start of the "units"
                // (none other: had there been any, this leadership would
                // have been fenced from its start).
                *started = false;
                return a;
            }
        }
        if *started {
            a.extend(self.pending_mounts());
        }
        a
    }

    /// `Mount` for each listed mount unit not started yet in this
    /// leadership, recorded as started.
    fn pending_mounts(&mut self) -> Vec<Action> {
        let new: Vec<String> = self
            .exclusive
            .iter()
            .filter(|u| !self.mounted.contains(u))
            .cloned()
            .collect();
        self.mounted.extend(new.iter().cloned());
        new.into_iter().map(Action::Mount).collect()
    }

    /// When the fence delay ends, while leading and waiting for it.
    pub fn fence_due_ns(&self) -> Option<u64> {
        match self.role {
            Role::Leader { fence_until_ns, .. } if fence_until_ns > 0 => Some(fence_until_ns),
            _ => None,
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
    /// With fencing, the units a previous run may have left running are
    /// stopped and its watchdog disarmed after them (still armed if it
    /// died leading: the kernel keeps the timer running).
    pub fn startup(&self) -> Vec<Action> {
        let mut a: Vec<Action> = self
            .config
            .vips
            .iter()
            .cloned()
            .map(Action::RemoveVip)
            .collect();
        let fencing = self.fencing();
        if fencing {
            a.extend(
                self.units_to_record()
                    .into_iter()
                    .rev()
                    .map(Action::StopUnit),
            );
        } else {
            // Whatever the watchdog's mode: units the zone had this agent
            // start, which it may have dropped since.
            a.extend(
                self.recorded_units
                    .iter()
                    .rev()
                    .cloned()
                    .map(Action::StopUnit),
            );
        }
        // Whatever the watchdog's mode: a shared disk left mounted by a
        // previous run must go before anything else mounts it.
        a.extend(self.all_mounts().into_iter().rev().map(Action::StopUnit));
        if fencing {
            a.push(Action::DisarmWatchdog { epoch: 0 });
        }
        a
    }

    /// Every mount unit this agent may have to stop, in mounting order:
    /// those mounted in this leadership, those released, those listed.
    fn all_mounts(&self) -> Vec<String> {
        let mut all = self.mounted_units();
        let listed: Vec<String> = self
            .exclusive
            .iter()
            .filter(|u| !all.contains(u))
            .cloned()
            .collect();
        all.extend(listed);
        all
    }

    /// A lease state arrived at time `now_ns` (CLOCK_BOOTTIME).
    pub fn on_lease(&mut self, lease: LeaseView, now_ns: u64) -> Vec<Action> {
        let valid = lease.held && lease.expires_ns > now_ns;
        if lease.leader_id != 0 && lease.leader_id != lease.server_id {
            self.last_other_leader = lease.leader_id;
        }
        if !lease.held {
            // Another leader, or this one handing over: a new start.
            self.settling = None;
        }
        match (self.role, valid) {
            (Role::Follower, true) => {
                if !self.settled(lease.expires_ns, now_ns) {
                    return Vec::new();
                }
                self.epoch += 1;
                let fencing = self.fencing();
                let fence_until_ns = if fencing && !self.config.fence.delay.is_zero() {
                    now_ns + self.config.fence.delay.as_nanos() as u64
                } else {
                    0
                };
                self.mounted.clear();
                self.role = Role::Leader {
                    expires_ns: lease.expires_ns,
                    units: false,
                    storage_ready: lease.storage_ready,
                    extensions_ready: lease.extensions_ready,
                    fence_until_ns,
                    armed: fencing,
                };
                if fence_until_ns > 0 {
                    tracing::info!(delay = ?self.config.fence.delay, "leader-only units wait for the fence delay: the old leader stops its own or its watchdog resets it");
                }
                if !lease.storage_ready {
                    tracing::info!("leader-only units wait for this server's required datastores");
                }
                if !lease.extensions_ready {
                    tracing::info!("leader-only units wait for the zone's system extensions to be merged on this server");
                }
                let mut a = self.become_leader();
                // The fence hook's target was the leader before this
                // takeover: once this server led, taking the lease back
                // after its own lapse fences no one (it stopped its units
                // itself), unless another leader is seen meanwhile.
                self.last_other_leader = 0;
                a.extend(self.start_units_if_ready());
                a
            }
            (Role::Leader { .. }, true) => {
                if let Role::Leader {
                    expires_ns,
                    storage_ready,
                    extensions_ready,
                    ..
                } = &mut self.role
                {
                    *expires_ns = lease.expires_ns;
                    *storage_ready = lease.storage_ready;
                    *extensions_ready = lease.extensions_ready;
                }
                let mut a = Vec::new();
                if matches!(self.role, Role::Leader { armed: true, .. }) {
                    a.push(Action::PetWatchdog);
                }
                a.extend(self.config.vips.iter().cloned().map(Action::RenewVip));
                a.extend(self.start_units_if_ready());
                a
            }
            (Role::Leader { .. }, false) => {
                // A handover: zoned revoked the lease while it still leads
                // (before a transfer, or as it stops), so its clients'
                // connections are reset before the VIP goes.
                //
                // Safety: the reset only delays the removal, by a few
                // netlink round trips, and only here. No other server can
                // lead before this lease would have ended (followers refuse
                // votes until then) except by the transfer, which zoned
                // starts only once this agent acknowledged letting go,
                // after the removal, or once its fence removed the address
                // itself (`(raft.lease_margin_ms - raft.tick_ms) / 2` after
                // the revocation), or once its wait gave up after a lease's
                // length (this lease has ended by then). A lease that ran
                // out, another leader or a lost stream removes the VIP at
                // once, with no reset.
                let handover = !lease.held
                    && lease.leader_id != 0
                    && lease.leader_id == lease.server_id
                    && lease.expires_ns == 0;
                self.become_follower(handover)
            }
            (Role::Follower, false) => {
                if let Some(s) = self.settling.as_mut() {
                    s.run = None;
                }
                Vec::new()
            }
        }
    }

    /// The fence hook of leadership `epoch` succeeded: the old holder is
    /// off, the units need not wait out the delay.
    pub fn on_fence_hook(&mut self, epoch: u64) -> Vec<Action> {
        if epoch != self.epoch || self.fence_due_ns().is_none() {
            return Vec::new();
        }
        tracing::info!(
            "the fence hook succeeded: leader-only units need not wait out the fence delay"
        );
        self.fenced()
    }

    /// The old holder is fenced: the units may start.
    fn fenced(&mut self) -> Vec<Action> {
        if let Role::Leader { fence_until_ns, .. } = &mut self.role {
            *fence_until_ns = 0;
        }
        self.start_units_if_ready()
    }

    /// The leader-only units and the leader hook, once the required
    /// datastores are healthy and the old holder is fenced.
    fn start_units_if_ready(&mut self) -> Vec<Action> {
        let Role::Leader {
            units,
            storage_ready,
            extensions_ready,
            fence_until_ns,
            ..
        } = &mut self.role
        else {
            return Vec::new();
        };
        if !*storage_ready || !*extensions_ready || *fence_until_ns > 0 {
            return Vec::new();
        }
        if *units {
            // Running: only units the zone added since, if any (no hook).
            return self.leader_units_to_start();
        }
        *units = true;
        let mut a = self.pending_mounts();
        if !a.is_empty() {
            tracing::info!("mounting the exclusive datastores");
        }
        let units = self.leader_units();
        if !units.is_empty() {
            tracing::info!("starting leader-only units");
        }
        a.extend(units);
        a
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

    /// The clock reached `now_ns` with no new lease: the lease may have
    /// run out, or the fence delay passed.
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
                self.become_follower(false)
            }
            Role::Leader { fence_until_ns, .. }
                if fence_until_ns > 0 && now_ns >= fence_until_ns =>
            {
                tracing::info!(
                    "fence delay over: the old leader has stopped its units or been reset"
                );
                self.fenced()
            }
            _ => Vec::new(),
        }
    }

    /// The lease stream broke or zoned died: no lease can be trusted.
    pub fn on_stream_lost(&mut self) -> Vec<Action> {
        self.settling = None;
        match self.role {
            Role::Leader { .. } => self.become_follower(false),
            Role::Follower => Vec::new(),
        }
    }

    /// The VIP at once; the watchdog armed before any unit can start, and
    /// the fence hook started.
    fn become_leader(&self) -> Vec<Action> {
        let c = &self.config;
        let mut a: Vec<Action> = c.vips.iter().cloned().map(Action::AddVip).collect();
        a.extend(c.vips.iter().cloned().map(Action::Announce));
        if matches!(self.role, Role::Leader { armed: true, .. }) {
            a.push(Action::ArmWatchdog { epoch: self.epoch });
            // Not against an unknown server, nor against this one (taking
            // the lease back after its own lapse: it stopped its units).
            if let Some(command) = &c.fence.hook {
                if self.fence_due_ns().is_some() && self.last_other_leader != 0 {
                    a.push(Action::FenceHook {
                        command: command.clone(),
                        epoch: self.epoch,
                        target: self.last_other_leader,
                    });
                }
            }
        }
        a
    }

    fn leader_units(&mut self) -> Vec<Action> {
        let mut a = self.leader_units_to_start();
        a.extend(
            self.config
                .leader
                .hook
                .iter()
                .cloned()
                .map(Action::LeaderHook),
        );
        a
    }

    /// `StartUnit` for each leader-only unit not started yet in this
    /// leadership, recorded as started.
    fn leader_units_to_start(&mut self) -> Vec<Action> {
        let new: Vec<String> = self
            .units
            .iter()
            .filter(|u| !self.started.contains(u))
            .cloned()
            .collect();
        self.started.extend(new.iter().cloned());
        new.into_iter().map(Action::StartUnit).collect()
    }

    /// `handover`: the clients' connections to the VIP are reset first
    /// (see [`Action::ResetConnections`]).
    fn become_follower(&mut self, handover: bool) -> Vec<Action> {
        let armed = matches!(self.role, Role::Leader { armed: true, .. });
        self.role = Role::Follower;
        // Every unit of the list (a stop of one not active is no work),
        // any started in this leadership that left it since, and any a
        // previous run recorded.
        let stop = self.units_to_record();
        self.started.clear();
        self.recorded_units.clear();
        let c = &self.config;
        let mut a: Vec<Action> = Vec::new();
        if handover {
            a.extend(c.vips.iter().cloned().map(Action::ResetConnections));
        }
        a.extend(c.vips.iter().cloned().map(Action::RemoveVip));
        a.push(Action::StopAnnouncing);
        a.extend(stop.into_iter().rev().map(Action::StopUnit));
        a.extend(c.follower.hook.iter().cloned().map(Action::FollowerHook));
        // The exclusive datastores last, once nothing runs on them: those
        // mounted in this leadership and any listed (a stop of a unit not
        // active is no work).
        let mounts = self.all_mounts();
        self.mounted.clear();
        self.released.clear();
        a.extend(mounts.into_iter().rev().map(Action::StopUnit));
        if armed {
            // After the units and the follower hook (which may be what
            // undoes the leader hook's work): the watchdog stays armed
            // (unpetted) until they are done, and resets this server if
            // they take longer than its timeout or a unit fails to stop.
            a.push(Action::DisarmWatchdog { epoch: self.epoch });
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units and hooks, no fencing (the tests of fencing add it).
    fn config() -> Config {
        with_fence("watchdog_mode = \"off\"\n")
    }

    fn with_fence(fence: &str) -> Config {
        Config::parse(&format!(
            "[[vip]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n\
             [leader]\nunits = [\"a.service\", \"b.service\"]\nhook = \"up\"\n\
             [follower]\nhook = \"down\"\n[fence]\n{fence}"
        ))
        .unwrap()
    }

    const S: u64 = 1_000_000_000;

    fn units() -> Vec<Action> {
        vec![
            Action::StartUnit("a.service".into()),
            Action::StartUnit("b.service".into()),
            Action::LeaderHook("up".into()),
        ]
    }

    #[test]
    fn units_wait_for_the_fence_delay_under_a_watchdog_armed_first_and_disarmed_after_them() {
        // The default: a 10 s watchdog, a 12 s delay.
        let mut m = Machine::new(with_fence(""));
        assert_eq!(
            m.startup(),
            vec![
                Action::RemoveVip(vip()),
                Action::StopUnit("b.service".into()),
                Action::StopUnit("a.service".into()),
                Action::DisarmWatchdog { epoch: 0 },
            ]
        );
        assert_eq!(
            m.on_lease(lease(true, 100 * S), 10 * S),
            vec![
                Action::AddVip(vip()),
                Action::Announce(vip()),
                Action::ArmWatchdog { epoch: 1 },
            ]
        );
        assert_eq!(m.fence_due_ns(), Some(22 * S));
        assert_eq!(
            m.on_lease(lease(true, 101 * S), 11 * S),
            vec![Action::PetWatchdog, Action::RenewVip(vip())]
        );
        assert!(m.on_tick(22 * S - 1).is_empty());
        assert_eq!(m.on_tick(22 * S), units());
        assert_eq!(m.fence_due_ns(), None);
        assert_eq!(
            m.on_lease(lease(true, 102 * S), 23 * S),
            vec![Action::PetWatchdog, Action::RenewVip(vip())]
        );
        assert_eq!(
            m.on_lease(lease(false, 0), 24 * S),
            vec![
                Action::RemoveVip(vip()),
                Action::StopAnnouncing,
                Action::StopUnit("b.service".into()),
                Action::StopUnit("a.service".into()),
                Action::FollowerHook("down".into()),
                Action::DisarmWatchdog { epoch: 1 },
            ]
        );
        // The next leadership waits again, under a new epoch.
        assert_eq!(
            m.on_lease(lease(true, 200 * S), 30 * S)[2],
            Action::ArmWatchdog { epoch: 2 }
        );
        assert_eq!(m.fence_due_ns(), Some(42 * S));
    }

    #[test]
    fn the_fence_hook_ends_the_wait_for_its_own_leadership_only() {
        let mut m = Machine::new(with_fence("hook = \"ipmitool power off\"\n"));
        let hook = |epoch, target| Action::FenceHook {
            command: "ipmitool power off".into(),
            epoch,
            target,
        };
        // No other leader seen yet: no one to fence, the delay runs.
        assert_eq!(m.on_lease(lease(true, 100 * S), S).len(), 3);
        m.on_stream_lost();
        // Server 2 led; then this server takes the lease.
        m.on_lease(lease(false, 0), 5 * S);
        assert_eq!(m.on_lease(lease(true, 100 * S), 10 * S)[3], hook(2, 2));
        assert!(m.on_fence_hook(1).is_empty());
        assert_eq!(m.on_fence_hook(2), units());
        assert!(m.on_fence_hook(2).is_empty(), "started once");
        assert!(m.on_tick(22 * S).is_empty(), "the delay's end adds nothing");
        m.on_stream_lost();
        let third = LeaseView {
            leader_id: 3,
            ..lease(false, 0)
        };
        m.on_lease(third, 25 * S);
        assert_eq!(m.on_lease(lease(true, 100 * S), 30 * S)[3], hook(3, 3));
        assert!(
            m.on_fence_hook(2).is_empty(),
            "an older leadership's answer"
        );
        assert_eq!(m.on_tick(42 * S), units());
        // Its own lease lapses and comes back (no other leader meanwhile):
        // no one to fence, the delay runs.
        assert!(!m.on_tick(100 * S).is_empty(), "the lapse steps down");
        m.on_lease(lease(true, 200 * S), 101 * S);
        let again = m.on_lease(lease(true, 200 * S), 103 * S);
        assert_eq!(again.len(), 3, "no fence hook: {again:?}");
        assert_eq!(m.fence_due_ns(), Some(115 * S));
    }

    fn mounts(units: &[&str]) -> Vec<String> {
        units.iter().map(|u| format!("{u}.mount")).collect()
    }

    #[test]
    fn exclusive_datastores_mount_after_the_fence_before_the_units_and_go_after_them() {
        let mut m = Machine::new(with_fence(""));
        assert!(m
            .on_exclusive_units(mounts(&["srv-db", "srv-logs"]), 0)
            .is_empty());
        // A previous run's mounts stop at start, after its units.
        assert_eq!(
            m.startup()[3..],
            [
                Action::StopUnit("srv-logs.mount".into()),
                Action::StopUnit("srv-db.mount".into()),
                Action::DisarmWatchdog { epoch: 0 },
            ]
        );
        m.on_lease(lease(true, 100 * S), 10 * S);
        assert!(m.on_tick(22 * S - 1).is_empty());
        assert_eq!(
            m.on_tick(22 * S),
            [
                vec![
                    Action::Mount("srv-db.mount".into()),
                    Action::Mount("srv-logs.mount".into()),
                ],
                units()
            ]
            .concat()
        );
        // One declared while leading, fenced already: mounted at once;
        // one removed: released now, and stopped again at the end.
        assert_eq!(
            m.on_exclusive_units(mounts(&["srv-db", "srv-new"]), 23 * S),
            vec![
                Action::Release("srv-logs.mount".into()),
                Action::Mount("srv-new.mount".into())
            ]
        );
        assert_eq!(
            m.mounted_units(),
            mounts(&["srv-db", "srv-new", "srv-logs"]),
            "recorded for a restart"
        );
        assert_eq!(
            m.on_lease(lease(false, 0), 24 * S),
            vec![
                Action::RemoveVip(vip()),
                Action::StopAnnouncing,
                Action::StopUnit("b.service".into()),
                Action::StopUnit("a.service".into()),
                Action::FollowerHook("down".into()),
                Action::StopUnit("srv-logs.mount".into()),
                Action::StopUnit("srv-new.mount".into()),
                Action::StopUnit("srv-db.mount".into()),
                Action::DisarmWatchdog { epoch: 1 },
            ]
        );
        assert!(m.mounted_units().is_empty());
        // A follower mounts nothing, whatever is declared.
        assert!(m.on_exclusive_units(mounts(&["srv-db"]), 25 * S).is_empty());
    }

    #[test]
    fn a_removed_datastore_declared_again_is_mounted_again_and_a_restart_stops_what_was_recorded() {
        let mut m = Machine::new(with_fence(""));
        m.on_exclusive_units(mounts(&["srv-db"]), 0);
        m.on_lease(lease(true, 100 * S), 10 * S);
        m.on_tick(22 * S);
        assert_eq!(
            m.on_exclusive_units(Vec::new(), 23 * S),
            vec![Action::Release("srv-db.mount".into())]
        );
        assert_eq!(
            m.on_exclusive_units(mounts(&["srv-db"]), 24 * S),
            vec![Action::Mount("srv-db.mount".into())]
        );
        // A restart (a crash) after it left the list again: the record
        // has it, and startup stops it, whatever the watchdog's mode.
        let mut m = Machine::new(with_fence("watchdog_mode = \"off\"\n"));
        m.on_recorded_mounts(mounts(&["srv-old"]));
        m.on_exclusive_units(mounts(&["srv-db"]), 0);
        assert_eq!(
            m.startup(),
            vec![
                Action::RemoveVip(vip()),
                Action::StopUnit("srv-db.mount".into()),
                Action::StopUnit("srv-old.mount".into()),
            ]
        );
    }

    #[test]
    fn an_exclusive_datastore_alone_is_fenced_and_one_declared_later_waits_a_delay_of_its_own() {
        // No leader-only units: the datastore alone makes a fence.
        let bare = |fence: &str| {
            Config::parse(&format!(
                "[[vip]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n[fence]\n{fence}"
            ))
            .unwrap()
        };
        let mut m = Machine::new(bare(""));
        m.on_exclusive_units(mounts(&["srv-db"]), 0);
        assert_eq!(
            m.on_lease(lease(true, 100 * S), 10 * S)[2..],
            [Action::ArmWatchdog { epoch: 1 }]
        );
        assert_eq!(
            m.on_tick(22 * S),
            vec![Action::Mount("srv-db.mount".into())]
        );
        // Without any at the start of a leadership, nothing was fenced: one
        // declared later arms the watchdog and waits a delay from then.
        let mut m = Machine::new(bare(""));
        assert_eq!(
            m.on_lease(lease(true, 100 * S), 10 * S).len(),
            2,
            "VIP only"
        );
        assert_eq!(
            m.on_lease(lease(true, 101 * S), 11 * S),
            vec![Action::RenewVip(vip())],
            "nothing to pet"
        );
        assert_eq!(
            m.on_exclusive_units(mounts(&["srv-db"]), 30 * S),
            vec![Action::ArmWatchdog { epoch: 1 }]
        );
        assert_eq!(m.fence_due_ns(), Some(42 * S));
        assert_eq!(
            m.on_lease(lease(true, 102 * S), 31 * S),
            vec![Action::PetWatchdog, Action::RenewVip(vip())]
        );
        assert_eq!(
            m.on_tick(42 * S),
            vec![Action::Mount("srv-db.mount".into())]
        );
        assert_eq!(
            m.on_stream_lost()[2..],
            [
                Action::StopUnit("srv-db.mount".into()),
                Action::DisarmWatchdog { epoch: 1 },
            ]
        );
        // With the watchdog off: no fence delay; the mount is asked for with
        // the units at once, and the runner refuses it (no watchdog armed).
        let mut m = Machine::new(bare("watchdog_mode = \"off\"\n"));
        m.on_exclusive_units(mounts(&["srv-db"]), 0);
        assert_eq!(
            m.on_lease(lease(true, 100 * S), 10 * S)[2..],
            [Action::Mount("srv-db.mount".into())]
        );
        assert_eq!(
            m.on_stream_lost()[2..],
            [Action::StopUnit("srv-db.mount".into())]
        );
    }

    #[test]
    fn units_need_both_the_fence_and_the_storage() {
        let mut m = Machine::new(with_fence("watchdog_timeout_s = 1\ndelay_ms = 2000\n"));
        let not_ready = |expires_ns| LeaseView {
            storage_ready: false,
            ..lease(true, expires_ns)
        };
        m.on_lease(not_ready(100 * S), 10 * S);
        assert!(m.on_tick(12 * S).is_empty(), "fenced, storage not ready");
        assert_eq!(
            m.on_lease(lease(true, 101 * S), 13 * S),
            [vec![Action::PetWatchdog, Action::RenewVip(vip())], units()].concat()
        );
    }

    #[test]
    fn nothing_to_fence_without_leader_units() {
        let c =
            Config::parse("[[vip]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n").unwrap();
        let mut m = Machine::new(c);
        assert_eq!(m.startup(), vec![Action::RemoveVip(vip())]);
        assert_eq!(
            m.on_lease(lease(true, 100 * S), 10 * S),
            vec![Action::AddVip(vip()), Action::Announce(vip())]
        );
        assert_eq!(m.fence_due_ns(), None);
        assert_eq!(
            m.on_lease(lease(true, 101 * S), 11 * S),
            vec![Action::RenewVip(vip())]
        );
    }

    /// A lease state of server 1, led by server 1 when held, else by 2.
    fn lease(held: bool, expires_ns: u64) -> LeaseView {
        LeaseView {
            held,
            expires_ns,
            generation: 1,
            storage_ready: true,
            extensions_ready: true,
            leader_id: if held { 1 } else { 2 },
            server_id: 1,
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
    fn leader_units_wait_for_the_zones_extensions() {
        let mut m = Machine::new(config());
        let not_merged = |expires_ns| LeaseView {
            extensions_ready: false,
            ..lease(true, expires_ns)
        };
        // The VIP at once; the units and the hook once the extensions are
        // merged here.
        assert_eq!(
            m.on_lease(not_merged(1_000), 500),
            vec![Action::AddVip(vip()), Action::Announce(vip())]
        );
        assert_eq!(
            m.on_lease(not_merged(2_000), 900),
            vec![Action::RenewVip(vip())]
        );
        assert_eq!(
            m.on_lease(lease(true, 3_000), 1_900),
            vec![
                Action::RenewVip(vip()),
                Action::StartUnit("a.service".into()),
                Action::StartUnit("b.service".into()),
                Action::LeaderHook("up".into()),
            ]
        );
        // An extension added while leading: the running units are left
        // alone.
        assert_eq!(
            m.on_lease(not_merged(4_000), 2_900),
            vec![Action::RenewVip(vip())]
        );
    }

    #[test]
    fn the_zones_leader_units_replace_the_configurations() {
        let mut m = Machine::new(config());
        let zone = |u: &[&str]| Some(u.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        // Known before the lease: the zone's units start, not the
        // configuration's.
        assert!(m.on_leader_units(zone(&["db.service"]), 0).is_empty());
        assert_eq!(
            m.on_lease(lease(true, 1_000), 500)[2..],
            [
                Action::StartUnit("db.service".into()),
                Action::LeaderHook("up".into())
            ]
        );
        // Changed while they run: the new start with the next renewal
        // (none between), the gone stop at once.
        assert!(m
            .on_leader_units(zone(&["web.service", "db.service"]), 600)
            .is_empty());
        assert_eq!(
            m.on_lease(lease(true, 2_000), 650),
            vec![
                Action::RenewVip(vip()),
                Action::StartUnit("web.service".into())
            ]
        );
        assert_eq!(
            m.on_leader_units(zone(&["web.service"]), 700),
            vec![Action::StopUnit("db.service".into())]
        );
        // Recorded until the lease ends: a restart stops it should this
        // stop not happen.
        assert_eq!(m.units_to_record(), ["web.service", "db.service"]);
        // The same list again: nothing.
        assert!(m.on_leader_units(zone(&["web.service"]), 800).is_empty());
        // Cleared: the configuration's again.
        assert_eq!(
            m.on_leader_units(None, 900),
            vec![Action::StopUnit("web.service".into())]
        );
        assert_eq!(
            m.on_lease(lease(true, 3_000), 920),
            vec![
                Action::RenewVip(vip()),
                Action::StartUnit("a.service".into()),
                Action::StartUnit("b.service".into()),
            ]
        );
        // Leaving stops them in the reverse order, and those dropped.
        assert_eq!(
            m.on_lease(lease(false, 0), 950)[2..6],
            [
                Action::StopUnit("web.service".into()),
                Action::StopUnit("db.service".into()),
                Action::StopUnit("b.service".into()),
                Action::StopUnit("a.service".into()),
            ]
        );
        assert_eq!(m.units_to_record(), ["a.service", "b.service"]);
    }

    #[test]
    fn units_added_while_leading_wait_for_the_datastores_and_the_extensions() {
        let mut m = Machine::new(config());
        m.on_lease(lease(true, 1_000), 500);
        let not_ready = |expires_ns| LeaseView {
            storage_ready: false,
            ..lease(true, expires_ns)
        };
        // b.service dropped: stopped at once; db.service added: waits.
        assert_eq!(
            m.on_leader_units(Some(vec!["a.service".into(), "db.service".into()]), 600),
            vec![Action::StopUnit("b.service".into())]
        );
        assert_eq!(
            m.on_lease(not_ready(2_000), 700),
            vec![Action::RenewVip(vip())]
        );
        let no_ext = LeaseView {
            extensions_ready: false,
            ..lease(true, 3_000)
        };
        assert_eq!(m.on_lease(no_ext, 800), vec![Action::RenewVip(vip())]);
        assert_eq!(
            m.on_lease(lease(true, 4_000), 900),
            vec![
                Action::RenewVip(vip()),
                Action::StartUnit("db.service".into())
            ]
        );
    }

    #[test]
    fn units_set_while_leading_with_nothing_to_fence_wait_for_a_fence_delay() {
        let c = Config::parse(
            "[[vip]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n[fence]\nwatchdog_timeout_s = 1\ndelay_ms = 2000\n",
        )
        .unwrap();
        let mut m = Machine::new(c);
        assert_eq!(m.on_lease(lease(true, 100 * S), 10 * S).len(), 2);
        assert_eq!(
            m.on_leader_units(Some(vec!["db.service".into()]), 11 * S),
            vec![Action::ArmWatchdog { epoch: 1 }]
        );
        // Renewals before the delay's end start nothing.
        assert_eq!(
            m.on_lease(lease(true, 101 * S), 12 * S),
            vec![Action::PetWatchdog, Action::RenewVip(vip())]
        );
        assert!(m.on_tick(13 * S - 1).is_empty());
        assert_eq!(
            m.on_tick(13 * S),
            vec![Action::StartUnit("db.service".into())]
        );
    }

    #[test]
    fn units_a_previous_run_recorded_are_stopped_at_start() {
        let mut m = Machine::new(with_fence(""));
        m.on_recorded_units(vec!["old.service".into(), "a.service".into()]);
        assert_eq!(
            m.startup(),
            vec![
                Action::RemoveVip(vip()),
                Action::StopUnit("old.service".into()),
                Action::StopUnit("b.service".into()),
                Action::StopUnit("a.service".into()),
                Action::DisarmWatchdog { epoch: 0 },
            ]
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

    /// A planned handover (zoned revoked the lease and still leads):
    /// the clients' connections are reset while the VIP is still there,
    /// then it goes. A lease that ran out, another leader known or a lost
    /// stream: the VIP goes at once, nothing before it.
    #[test]
    fn connections_are_reset_before_the_vip_goes_on_a_handover_only() {
        let revoked = LeaseView {
            held: false,
            expires_ns: 0,
            generation: 2,
            storage_ready: true,
            extensions_ready: true,
            leader_id: 1,
            server_id: 1,
        };
        let mut m = Machine::new(config());
        m.on_lease(lease(true, 100 * S), 10 * S);
        let a = m.on_lease(revoked, 11 * S);
        assert_eq!(
            a[..2],
            [Action::ResetConnections(vip()), Action::RemoveVip(vip())]
        );

        let mut m = Machine::new(config());
        m.on_lease(lease(true, 100 * S), 10 * S);
        assert_eq!(
            m.on_lease(lease(false, 0), 11 * S)[0],
            Action::RemoveVip(vip())
        );

        let mut m = Machine::new(config());
        m.on_lease(lease(true, 100 * S), 10 * S);
        assert_eq!(m.on_tick(100 * S)[0], Action::RemoveVip(vip()));

        let mut m = Machine::new(config());
        m.on_lease(lease(true, 100 * S), 10 * S);
        assert_eq!(m.on_stream_lost()[0], Action::RemoveVip(vip()));
    }

    #[test]
    fn startup_removes_stale_vips() {
        assert_eq!(
            Machine::new(config()).startup(),
            vec![Action::RemoveVip(vip())]
        );
    }
}
