//! The nemesis's faults on the namespace testbed: each applied, held for a
//! while, and healed, one at a time, the kinds taken in shuffled rounds so
//! that each comes up as often as the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use super::clients::Shared;
use crate::{ip_in, Testbed};

/// What the nemesis does to the zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// kill -9 of the leader's zoned, restarted after the hold.
    KillLeader,
    /// kill -9 of a follower's zoned.
    KillFollower,
    /// kill -9 of every zoned at once.
    KillAll,
    /// SIGSTOP of the leader's zoned, SIGCONT after the hold.
    StopZoned,
    /// SIGSTOP of the leader's zone-vip (the agent that holds the VIP).
    StopVip,
    /// A server's link to the bridge down, both ways.
    LinkDown,
    /// A server's data directory filled (its own disk) to below its
    /// free-space floor: the leader's, or a follower's.
    FullDisk,
    /// A server's disk frozen (fsfreeze): its writes and syncs block until
    /// thawed. The leader's, or a follower's.
    DiskStall,
    /// SIGSTOP of the leader's zone-vip and its link down: leadership
    /// moves while the frozen agent still has the VIP on its interface,
    /// until the cut server's zoned removes it (issue 20's defect 2).
    FrozenVipCut,
    /// One-way loss: a server can no longer send to one peer (a blackhole
    /// route in its namespace; the other way still works). The kernel
    /// here has no `sch_netem`, so loss is all or nothing.
    OneWay,
}

pub const KINDS: [Kind; 10] = [
    Kind::KillLeader,
    Kind::KillFollower,
    Kind::KillAll,
    Kind::StopZoned,
    Kind::StopVip,
    Kind::FrozenVipCut,
    Kind::LinkDown,
    Kind::OneWay,
    Kind::FullDisk,
    Kind::DiskStall,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillLeader => "kill -9 leader",
            Kind::KillFollower => "kill -9 follower",
            Kind::KillAll => "kill -9 all",
            Kind::StopZoned => "SIGSTOP zoned",
            Kind::StopVip => "SIGSTOP zone-vip",
            Kind::LinkDown => "link down",
            Kind::OneWay => "one-way loss",
            Kind::FrozenVipCut => "SIGSTOP zone-vip + link down",
            Kind::FullDisk => "full disk",
            Kind::DiskStall => "disk stall",
        }
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub kind: Kind,
    /// Server indexes affected (for one-way loss: from, to).
    pub servers: Vec<usize>,
    /// Whether the first of them led (as last seen) when the fault began.
    pub on_leader: bool,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// What is broken now, so that it can be healed.
#[derive(Debug, Default)]
struct Broken {
    killed: Vec<usize>,
    stopped_zoned: Vec<usize>,
    stopped_vip: Vec<usize>,
    links_down: Vec<usize>,
    /// (from, to): `from` cannot send to `to`.
    routes: Vec<(usize, usize)>,
    /// Files filling a data directory.
    fillers: Vec<std::path::PathBuf>,
    frozen: Vec<usize>,
}

fn signal(child: Option<&std::process::Child>, s: Signal) {
    if let Some(c) = child {
        let _ = crate::signal(c, s);
    }
}

/// The fault loop.
pub struct Nemesis<'a> {
    tb: &'a mut Testbed,
    shared: Arc<Shared>,
    rng: StdRng,
    start: Instant,
    kinds: Vec<Kind>,
    /// The servers' free-space floor (MiB).
    floor_mb: u64,
    round: Vec<Kind>,
    broken: Broken,
    pub log: Vec<Fault>,
    /// Processes that exited without being killed: (server, which, how,
    /// when in ms). Each is restarted.
    pub exits: Vec<(usize, &'static str, String, u64)>,
}

impl std::fmt::Debug for Nemesis<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nemesis")
            .field("faults", &self.log.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Nemesis<'a> {
    pub fn new(
        tb: &'a mut Testbed,
        shared: Arc<Shared>,
        rng: StdRng,
        start: Instant,
        kinds: Vec<Kind>,
        floor_mb: u64,
    ) -> Self {
        Nemesis {
            tb,
            kinds,
            floor_mb,
            shared,
            rng,
            start,
            round: Vec::new(),
            broken: Broken::default(),
            log: Vec::new(),
            exits: Vec::new(),
        }
    }

    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The leader's index as last seen, else any server.
    fn leader(&mut self) -> usize {
        let seen = *self.shared.leader.lock().unwrap();
        seen.unwrap_or_else(|| self.rng.random_range(0..self.tb.nodes.len()))
    }

    /// The leader with probability `p`, else any server.
    fn leader_or_any(&mut self, p: f64) -> usize {
        if self.rng.random_bool(p) {
            self.leader()
        } else {
            self.rng.random_range(0..self.tb.nodes.len())
        }
    }

    fn other_than(&mut self, i: usize) -> usize {
        let n = self.tb.nodes.len();
        (i + self.rng.random_range(1..n)) % n
    }

    /// Runs faults until `until`: a quiet spell, a fault, its hold, healing.
    pub fn run_until(&mut self, until: Instant, progress: &mut dyn FnMut(&[Fault])) {
        while Instant::now() < until {
            let quiet = Duration::from_millis(self.rng.random_range(200..800));
            std::thread::sleep(quiet.min(until.saturating_duration_since(Instant::now())));
            if Instant::now() >= until {
                break;
            }
            if self.round.is_empty() {
                self.round = self.kinds.clone();
                self.round.shuffle(&mut self.rng);
            }
            let kind = self.round.pop().expect("a kind");
            let start_ms = self.ms();
            let leader = *self.shared.leader.lock().unwrap();
            let servers = self.apply(kind);
            let on_leader = leader.is_some() && servers.first() == leader.as_ref();
            let hold = Duration::from_millis(self.rng.random_range(300..2000));
            std::thread::sleep(hold);
            self.heal();
            let end_ms = self.ms();
            self.log.push(Fault {
                kind,
                servers,
                on_leader,
                start_ms,
                end_ms,
            });
            progress(&self.log);
        }
    }

    fn apply(&mut self, kind: Kind) -> Vec<usize> {
        let n = self.tb.nodes.len();
        match kind {
            Kind::KillLeader | Kind::KillFollower => {
                let leader = self.leader();
                let i = if kind == Kind::KillLeader {
                    leader
                } else {
                    self.other_than(leader)
                };
                self.tb.kill9_zoned(i);
                self.broken.killed.push(i);
                vec![i]
            }
            Kind::KillAll => {
                for i in 0..n {
                    self.tb.kill9_zoned(i);
                    self.broken.killed.push(i);
                }
                (0..n).collect()
            }
            Kind::StopZoned => {
                let i = self.leader();
                signal(self.tb.nodes[i].zoned.as_ref(), Signal::SIGSTOP);
                self.broken.stopped_zoned.push(i);
                vec![i]
            }
            Kind::StopVip => {
                let i = self.leader();
                signal(self.tb.nodes[i].vip_agent.as_ref(), Signal::SIGSTOP);
                self.broken.stopped_vip.push(i);
                vec![i]
            }
            Kind::FrozenVipCut => {
                let i = self.leader();
                signal(self.tb.nodes[i].vip_agent.as_ref(), Signal::SIGSTOP);
                self.broken.stopped_vip.push(i);
                self.tb.set_link(i, false);
                self.broken.links_down.push(i);
                vec![i]
            }
            Kind::FullDisk => {
                let i = self.leader_or_any(0.67);
                let filler = crate::fill_disk(&self.tb.data_dir(i), (self.floor_mb << 20) / 2);
                self.broken.fillers.push(filler);
                vec![i]
            }
            Kind::DiskStall => {
                let i = self.leader_or_any(0.67);
                self.tb.freeze_disk(i);
                self.broken.frozen.push(i);
                vec![i]
            }
            Kind::LinkDown => {
                let i = self.leader_or_any(0.5);
                self.tb.set_link(i, false);
                self.broken.links_down.push(i);
                vec![i]
            }
            Kind::OneWay => {
                let from = self.leader_or_any(0.5);
                let to = self.other_than(from);
                let ip = format!("{}/32", self.tb.nodes[to].ip);
                ip_in(&self.tb.nodes[from].ns, &["route", "add", "blackhole", &ip]);
                self.broken.routes.push((from, to));
                vec![from, to]
            }
        }
    }

    /// Undoes every fault in place.
    pub fn heal(&mut self) {
        let b = std::mem::take(&mut self.broken);
        for i in b.frozen {
            self.tb.thaw_disk(i);
        }
        for i in b.stopped_zoned {
            signal(self.tb.nodes[i].zoned.as_ref(), Signal::SIGCONT);
        }
        for i in b.stopped_vip {
            signal(self.tb.nodes[i].vip_agent.as_ref(), Signal::SIGCONT);
        }
        for f in b.fillers {
            let _ = std::fs::remove_file(f);
        }
        for i in b.links_down {
            self.tb.set_link(i, true);
        }
        for (from, to) in b.routes {
            let ip = format!("{}/32", self.tb.nodes[to].ip);
            ip_in(&self.tb.nodes[from].ns, &["route", "del", "blackhole", &ip]);
        }
        for i in b.killed {
            if self.tb.nodes[i].zoned.is_none() {
                self.tb.start_zoned(i);
            }
        }
        self.restart_exited();
    }

    /// Restarts (and records) any zoned or zone-vip that exited on its own.
    fn restart_exited(&mut self) {
        let ms = self.ms();
        for i in 0..self.tb.nodes.len() {
            let node = &mut self.tb.nodes[i];
            if let Some(st) = node
                .zoned
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.exits.push((i, "zoned", st.to_string(), ms));
                node.zoned = None;
                self.tb.start_zoned(i);
            }
            let node = &mut self.tb.nodes[i];
            if let Some(st) = node
                .vip_agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.exits.push((i, "zone-vip", st.to_string(), ms));
                node.vip_agent = None;
                self.tb.start_agent(i);
            }
        }
    }
}
