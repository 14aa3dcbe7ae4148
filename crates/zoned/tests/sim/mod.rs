//! A zone of in-process Raft drivers on simulated time: real RocksDB
//! storage, one thread, one [`ManualClock`] that moves only when the
//! simulation moves it, and a simulated network that can cut links, delay
//! messages and hold some back.
//!
//! The simulation is the drivers' caller: it hands each its requests,
//! ticks it when its tick is due, lets it work, and delivers what it sent.
//! Time jumps from one event (a tick, a message due) to the next, so an
//! election or a lease's lifetime takes no wall-clock time beyond the work
//! and the fsyncs, and every timing is exact: "within one heartbeat" is a
//! statement about the simulated clock, not about the machine's load.
//!
//! Tests drive it with futures of the real [`NodeHandle`] API
//! ([`Sim::run_until`]) and conditions checked after every step
//! ([`Sim::wait`]).
//!
//! Several test binaries include this module, each using part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use raft::eraftpb::{Message, MessageType};
use raft::{SnapshotStatus, StateRole};
use zone_proto::v1::Member;
use zoned::config::{Config, Voter};
use zoned::node::{
    self, Bootstrap, Clock, Driver, Inbox, Lease, ManualClock, NodeHandle, PeerReports, Transport,
};
use zoned::storage::Engine;

/// A message on the simulated network.
struct InFlight {
    due_ns: u64,
    from: u64,
    msg: Message,
}

/// A rule that drops the messages it matches: (from, message).
pub type Rule = Box<dyn Fn(u64, &Message) -> bool + Send>;

/// The simulated network, shared by the drivers' transports.
#[derive(Default)]
pub struct Net {
    in_flight: Mutex<Vec<InFlight>>,
    cut: Mutex<HashSet<(u64, u64)>>,
    /// Messages any of these match are lost, like those on a cut link.
    rules: Mutex<Vec<Rule>>,
    /// Messages these match are held back until [`Net::release_held`].
    hold_rules: Mutex<Vec<Rule>>,
    held: Mutex<Vec<InFlight>>,
    /// One-way delay of every message sent from now on.
    delay: Mutex<Duration>,
    /// While set, pre-vote requests are held back until two servers have
    /// each sent one; then all are delivered at once, so that the two
    /// pre-elections cross, as when two servers time out together.
    crossing_pre_votes: Mutex<Option<Vec<InFlight>>>,
    /// Random loss, duplication and reordering, from a seed.
    chaos: Mutex<Option<Chaos>>,
}

/// Messages lost, duplicated and reordered at random (reordered: each
/// delayed by a random extra up to `jitter`).
#[derive(Debug)]
pub struct Chaos {
    pub rng: rand::rngs::StdRng,
    pub drop: f64,
    pub duplicate: f64,
    pub jitter: Duration,
}

impl Net {
    /// Cuts every link between `id` and the others of `ids`, both ways.
    pub fn isolate(&self, id: u64, ids: &[u64]) {
        let mut cut = self.cut.lock().unwrap();
        for &o in ids.iter().filter(|&&o| o != id) {
            cut.insert((id, o));
            cut.insert((o, id));
        }
    }

    /// Loses every message `rule` matches, from now until [`Net::heal`].
    pub fn drop_when(&self, rule: impl Fn(u64, &Message) -> bool + Send + 'static) {
        self.rules.lock().unwrap().push(Box::new(rule));
    }

    /// Holds back every message `rule` matches (a message stuck in a
    /// socket buffer, a frozen receiver), until [`Net::release_held`].
    pub fn hold_when(&self, rule: impl Fn(u64, &Message) -> bool + Send + 'static) {
        self.hold_rules.lock().unwrap().push(Box::new(rule));
    }

    /// Stops holding messages back; those held are delivered now (due at
    /// `now_ns`), in the order sent.
    pub fn release_held(&self, now_ns: u64) {
        self.hold_rules.lock().unwrap().clear();
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        self.in_flight
            .lock()
            .unwrap()
            .extend(held.into_iter().map(|m| InFlight {
                due_ns: now_ns,
                ..m
            }));
    }

    /// Puts `msg` on the wire as if `from` had sent it now (a forged or
    /// malformed message).
    pub fn inject(&self, from: u64, now_ns: u64, msg: Message) {
        self.send(from, now_ns, vec![msg]);
    }

    /// Every link up again, every rule gone, no more chaos.
    pub fn heal(&self) {
        self.cut.lock().unwrap().clear();
        self.rules.lock().unwrap().clear();
        *self.chaos.lock().unwrap() = None;
    }

    /// Loses, duplicates and reorders messages sent from now on, until
    /// [`Net::heal`].
    pub fn chaos(&self, chaos: Chaos) {
        *self.chaos.lock().unwrap() = Some(chaos);
    }

    /// Whether a message from `from` is lost on the way.
    fn lost(&self, from: u64, msg: &Message) -> bool {
        self.cut.lock().unwrap().contains(&(from, msg.to))
            || self.rules.lock().unwrap().iter().any(|r| r(from, msg))
    }

    /// Every message sent from now on arrives `by` later.
    pub fn delay(&self, by: Duration) {
        *self.delay.lock().unwrap() = by;
    }

    /// Holds pre-votes back until two pre-elections can cross.
    pub fn cross_pre_votes(&self) {
        *self.crossing_pre_votes.lock().unwrap() = Some(Vec::new());
    }

    /// Whether pre-votes held back were released.
    pub fn pre_votes_crossed(&self) -> bool {
        self.crossing_pre_votes.lock().unwrap().is_none()
    }

    fn send(&self, from: u64, now_ns: u64, msgs: Vec<Message>) {
        let due_ns = now_ns + self.delay.lock().unwrap().as_nanos() as u64;
        let mut msgs: Vec<InFlight> = match self.chaos.lock().unwrap().as_mut() {
            None => msgs
                .into_iter()
                .map(|msg| InFlight { due_ns, from, msg })
                .collect(),
            Some(c) => {
                use rand::Rng;
                let mut out = Vec::new();
                for msg in msgs {
                    if c.rng.random_bool(c.drop) {
                        continue;
                    }
                    let copies = if c.rng.random_bool(c.duplicate) { 2 } else { 1 };
                    for _ in 0..copies {
                        let extra = c.rng.random_range(0..=c.jitter.as_nanos() as u64);
                        out.push(InFlight {
                            due_ns: due_ns + extra,
                            from,
                            msg: msg.clone(),
                        });
                    }
                }
                out
            }
        };
        let mut crossing = self.crossing_pre_votes.lock().unwrap();
        if let Some(held) = crossing.as_mut() {
            let cut = self.cut.lock().unwrap();
            let (pre_votes, rest): (Vec<_>, Vec<_>) = msgs.into_iter().partition(|m| {
                m.msg.get_msg_type() == MessageType::MsgRequestPreVote
                    && !cut.contains(&(from, m.msg.to))
            });
            held.extend(pre_votes);
            msgs = rest;
            let senders: HashSet<u64> = held.iter().map(|m| m.from).collect();
            if senders.len() >= 2 {
                msgs.extend(crossing.take().unwrap_or_default());
            }
        }
        let hold = self.hold_rules.lock().unwrap();
        if !hold.is_empty() {
            let (held, rest): (Vec<_>, Vec<_>) = msgs
                .into_iter()
                .partition(|m| hold.iter().any(|r| r(m.from, &m.msg)));
            self.held.lock().unwrap().extend(held);
            msgs = rest;
        }
        drop(hold);
        self.in_flight.lock().unwrap().extend(msgs);
    }

    /// The messages due by `now_ns`, in the order sent.
    fn take_due(&self, now_ns: u64) -> Vec<InFlight> {
        let mut in_flight = self.in_flight.lock().unwrap();
        let (due, later) = std::mem::take(&mut *in_flight)
            .into_iter()
            .partition(|m| m.due_ns <= now_ns);
        *in_flight = later;
        due
    }

    fn next_due(&self) -> Option<u64> {
        self.in_flight
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.due_ns)
            .min()
    }
}

/// One driver's way onto the simulated network. Like the real transport,
/// it reaches only the members it was given addresses for
/// ([`Transport::set_peers`]): a message to anyone else is dropped.
struct Port {
    net: Arc<Net>,
    from: u64,
    clock: ManualClock,
    peers: Mutex<HashSet<u64>>,
}

impl Transport for Port {
    fn send(&self, mut msgs: Vec<Message>) {
        let peers = self.peers.lock().unwrap();
        msgs.retain(|m| peers.contains(&m.to));
        drop(peers);
        self.net.send(self.from, self.clock.now_ns(), msgs);
    }

    fn set_peers(&self, members: &[Member]) {
        *self.peers.lock().unwrap() = members.iter().map(|m| m.id).collect();
    }
}

struct SimNode {
    /// Its data directory and configuration: a restart opens them again.
    dir: tempfile::TempDir,
    config: Config,
    handle: NodeHandle,
    reports: PeerReports,
    /// None once stopped.
    driver: Option<Driver>,
    next_tick_ns: u64,
    /// Until then the driver does nothing (a long fsync, a busy host): what
    /// arrives waits in its inbox, and the ticks that fall due are taken
    /// after the messages, all at once.
    stalled_until_ns: u64,
    lease: tokio::sync::watch::Receiver<Lease>,
}

/// A zone of founders on simulated time.
pub struct Sim {
    pub clock: ManualClock,
    pub net: Arc<Net>,
    nodes: BTreeMap<u64, SimNode>,
    tick_ns: u64,
    /// The lease's length, from the configuration.
    pub lease_ns: u64,
    /// Every lease publication seen, as (server, lease), in order.
    pub leases: Vec<(u64, Lease)>,
}

/// Where simulated time starts: far from 0, as CLOCK_BOOTTIME is.
const START_NS: u64 = 1_000_000_000_000;

/// The most rounds of work and delivery in one instant before the
/// simulation decides the zone does not settle.
const ROUNDS_PER_INSTANT: usize = 10_000;

fn founders(ids: &[u64]) -> Bootstrap {
    Bootstrap::Voters(
        ids.iter()
            .map(|&id| Member {
                id,
                peer_endpoint: format!("n{id}:1"),
                ..Member::default()
            })
            .collect(),
    )
}

/// The configuration of server `id` of `ids`: ticks of 20 ms, elections
/// after 10-15 ticks, a heartbeat every 2.
pub fn config(id: u64, ids: &[u64], dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.node.id = id;
    c.node.data_dir = dir.to_owned();
    c.node.client_listen = ([127, 0, 0, 1], 1).into();
    c.node.peer_listen = ([127, 0, 0, 1], 2).into();
    c.voters = ids
        .iter()
        .map(|&v| Voter {
            id: v,
            peer: format!("n{v}:1"),
            name: String::new(),
        })
        .collect();
    c.raft.tick_ms = 20;
    c.raft.election_ticks = 10;
    c.raft.heartbeat_ticks = 2;
    c.finish().unwrap();
    c
}

impl Sim {
    /// Three founders, 1 to 3, with [`config`].
    pub fn start() -> Sim {
        Sim::start_with(|_| {})
    }

    /// Three founders whose configuration `tune` changes first.
    pub fn start_with(tune: impl Fn(&mut Config)) -> Sim {
        Sim::start_n(3, tune)
    }

    /// Founders 1 to `n` whose configuration `tune` changes first.
    pub fn start_n(n: u64, tune: impl Fn(&mut Config)) -> Sim {
        let ids: Vec<u64> = (1..=n).collect();
        let mut sim = Sim {
            clock: ManualClock::new(START_NS),
            net: Arc::new(Net::default()),
            nodes: BTreeMap::new(),
            tick_ns: 0,
            lease_ns: 0,
            leases: Vec::new(),
        };
        for &id in &ids {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(id, &ids, dir.path());
            tune(&mut cfg);
            sim.tick_ns = cfg.tick().as_nanos() as u64;
            sim.lease_ns = cfg.lease().as_nanos() as u64;
            sim.launch(dir, cfg, founders(&ids));
        }
        sim
    }

    /// Starts server `config.node.id` on `dir` (its data, if any, kept).
    fn launch(&mut self, dir: tempfile::TempDir, cfg: Config, bootstrap: Bootstrap) {
        let id = cfg.node.id;
        let engine = Engine::open(dir.path()).unwrap();
        let port = Arc::new(Port {
            net: self.net.clone(),
            from: id,
            clock: self.clock.clone(),
            peers: Mutex::default(),
        });
        let inbox = Inbox::default();
        let reports = inbox.reports();
        let clock_of_node = Arc::new(self.clock.clone());
        let (handle, driver) =
            node::build(&cfg, engine, inbox, port, bootstrap, clock_of_node).unwrap();
        // Servers do not tick in phase: each starts a third of a tick
        // after the one before.
        let next_tick_ns = self.clock.now_ns() + self.tick_ns + (id - 1) * self.tick_ns / 3;
        let lease = handle.watch_lease();
        self.nodes.insert(
            id,
            SimNode {
                dir,
                config: cfg,
                handle,
                reports,
                driver: Some(driver),
                next_tick_ns,
                stalled_until_ns: 0,
                lease,
            },
        );
    }

    /// Starts server `id`, blank, to join the zone whose members (this one
    /// included, as a learner) are `members`; its configuration names a
    /// member to join through and no voters, as a joiner's does.
    pub fn add_joiner(&mut self, id: u64, members: Vec<Member>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(id, &[], dir.path());
        cfg.voters.clear();
        cfg.node.join = Some("n1:1".into());
        self.launch(dir, cfg, Bootstrap::Join(members));
    }

    /// Server `id`'s driver does nothing for `d` (as in a long fsync).
    pub fn stall(&mut self, id: u64, d: Duration) {
        let n = self.nodes.get_mut(&id).expect("a server of the zone");
        n.stalled_until_ns = self.clock.now_ns() + d.as_nanos() as u64;
    }

    /// Stops server `id` where it stands (what it wrote stays written).
    pub fn crash(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).expect("a server of the zone");
        if let Some(driver) = n.driver.take() {
            let _ = driver.close(Ok(node::Stopped::Shutdown));
        }
    }

    /// Starts a crashed server `id` again on its data, as zoned does: it
    /// joins again (with `members`, what the zone answers) if
    /// [`node::start_as`] says so, else it starts from what it stored.
    pub fn restart(&mut self, id: u64, members: Vec<Member>) {
        let n = self.nodes.remove(&id).expect("a server of the zone");
        assert!(n.driver.is_none(), "server {id} is running");
        let SimNode {
            dir,
            config,
            handle,
            ..
        } = n;
        drop(handle);
        let engine = Engine::open(dir.path()).unwrap();
        let start_as = node::start_as(&engine, &config).unwrap();
        drop(engine);
        let voters: Vec<u64> = config.voters.iter().map(|v| v.id).collect();
        let bootstrap = match start_as {
            node::StartAs::Joiner => Bootstrap::Join(members),
            _ => founders(&voters),
        };
        self.launch(dir, config, bootstrap);
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&self, id: u64) -> NodeHandle {
        self.nodes[&id].handle.clone()
    }

    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// The servers that see themselves as leader, with their terms.
    pub fn leaders(&self) -> Vec<(u64, u64)> {
        self.nodes
            .values()
            .map(|n| n.handle.view())
            .filter(|v| v.role == StateRole::Leader)
            .map(|v| (v.id, v.term))
            .collect()
    }

    /// The leader every server of `among` agrees on, if there is one.
    pub fn agreed_leader(&self, among: &[u64]) -> Option<u64> {
        let views: Vec<_> = among
            .iter()
            .map(|id| self.nodes[id].handle.view())
            .collect();
        let l = views.iter().find(|v| v.role == StateRole::Leader)?;
        views
            .iter()
            .all(|v| v.leader_id == l.id && v.term == l.term)
            .then_some(l.id)
    }

    /// Runs until the servers of `among` agree on a leader (at most 20 s
    /// of simulated time).
    pub fn wait_leader(&mut self, among: &[u64]) -> u64 {
        self.wait(Duration::from_secs(20), "a leader", |s| {
            s.agreed_leader(among)
        })
    }

    /// One instant of the zone, then time moves on to the next event: every
    /// driver takes its requests and works, and what they send that is due
    /// is delivered, until nothing moves; then the clock jumps to the next
    /// tick or message due, and the servers whose tick it is tick.
    pub fn step(&mut self) {
        self.settle();
        let now = self.clock.now_ns();
        // A crashed server has no tick ahead.
        let next_tick = self
            .nodes
            .values()
            .filter(|n| n.driver.is_some())
            .map(|n| n.next_tick_ns.max(n.stalled_until_ns))
            .min();
        let stall_end = self
            .nodes
            .values()
            .map(|n| n.stalled_until_ns)
            .filter(|&t| t > now)
            .min();
        let next = [next_tick, stall_end, self.net.next_due()]
            .into_iter()
            .flatten()
            .min()
            .expect("a running zone always has a tick ahead");
        let now = self.clock.now_ns();
        if next > now {
            self.clock.advance(Duration::from_nanos(next - now));
        }
        let now = self.clock.now_ns();
        let tick_ns = self.tick_ns;
        for n in self.nodes.values_mut() {
            let Some(driver) = n.driver.as_mut() else {
                continue;
            };
            if n.stalled_until_ns > now {
                continue;
            }
            if n.stalled_until_ns != 0 {
                // The stall ends now: the messages that waited are taken
                // first (the next settle), then the ticks that fell due.
                n.stalled_until_ns = 0;
                continue;
            }
            while n.next_tick_ns <= now {
                driver.tick();
                n.next_tick_ns += tick_ns;
            }
        }
    }

    /// Works and delivers at the current instant until nothing moves.
    fn settle(&mut self) {
        for _ in 0..ROUNDS_PER_INSTANT {
            let now = self.clock.now_ns();
            for (id, n) in self.nodes.iter_mut() {
                let Some(driver) = n.driver.as_mut() else {
                    continue;
                };
                if n.stalled_until_ns > now {
                    continue;
                }
                driver.pump();
                match driver.advance() {
                    Ok(None) => {}
                    Ok(Some(stopped)) => {
                        let driver = n.driver.take().expect("running");
                        driver.close(Ok(stopped)).unwrap();
                    }
                    Err(e) => panic!("server {id}: storage failure: {e}"),
                }
                if n.lease.has_changed().unwrap_or(false) {
                    self.leases.push((*id, *n.lease.borrow_and_update()));
                }
            }
            let due = self.net.take_due(self.clock.now_ns());
            if due.is_empty() {
                return;
            }
            for m in due {
                self.deliver(m);
            }
        }
        panic!("the zone did not settle in {ROUNDS_PER_INSTANT} rounds at one instant");
    }

    fn deliver(&self, m: InFlight) {
        let to = m.msg.to;
        let snapshot = m.msg.get_msg_type() == MessageType::MsgSnapshot;
        let delivered = !self.net.lost(m.from, &m.msg)
            && self
                .nodes
                .get(&to)
                .is_some_and(|n| n.driver.is_some() && n.handle.step(m.msg).is_ok());
        if snapshot {
            if let Some(sender) = self.nodes.get(&m.from) {
                let status = if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                sender.reports.snapshot(to, status);
            }
        }
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.clock.now_ns() + d.as_nanos() as u64;
        while self.clock.now_ns() < end {
            self.step();
        }
    }

    /// Runs until `cond` gives a value, checked after every step; panics
    /// naming `what` after `limit` of simulated time.
    pub fn wait<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut(&Sim) -> Option<T>,
    ) -> T {
        let end = self.clock.now_ns() + limit.as_nanos() as u64;
        loop {
            if let Some(v) = cond(self) {
                return v;
            }
            assert!(
                self.clock.now_ns() < end,
                "no {what} after {limit:?} of simulated time"
            );
            self.step();
        }
    }

    /// Runs until `fut` resolves, polled after every step; panics naming
    /// `what` after `limit` of simulated time.
    pub fn run_until<T>(&mut self, limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        self.wait(limit, what, |_| match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    }
}

impl Drop for Sim {
    /// Stops every driver with its data flushed: RocksDB must not be torn
    /// down under a driver.
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            if let Some(driver) = n.driver.take() {
                let _ = driver.close(Ok(node::Stopped::Shutdown));
            }
        }
    }
}

/// Polls `fut` once: its value if it is ready.
pub fn poll_once<T>(fut: &mut std::pin::Pin<Box<dyn Future<Output = T>>>) -> Option<T> {
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
