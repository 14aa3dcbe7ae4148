//! Three Raft drivers in one process, with real RocksDB storage, joined by
//! a channel transport that can cut links: elections, safety under
//! partitions, and check_quorum.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::poll;
use raft::eraftpb::{Message, MessageType};
use raft::{SnapshotStatus, StateRole};
use zone_proto::v1::{command, command_result, Member, PutRequest};
use zoned::config::{Config, Voter};
use zoned::node::{self, Bootstrap, NodeHandle, Transport};
use zoned::storage::Engine;

/// Delivers messages between in-process drivers unless the link is cut.
#[derive(Default)]
struct Router {
    nodes: Mutex<HashMap<u64, NodeHandle>>,
    cut: Mutex<HashSet<(u64, u64)>>,
    /// While set, pre-vote requests are held back until two servers have
    /// each sent one; then all are delivered at once, so that the two
    /// pre-elections cross, as when two servers time out together.
    cross_pre_votes: Mutex<Option<Vec<Message>>>,
    /// While set, every message is delivered this long after it was sent,
    /// in order, by a thread of its own: a slow network.
    delayed: Mutex<Option<(Duration, std::sync::mpsc::Sender<Delayed>)>>,
}

impl Router {
    fn isolate(&self, id: u64, ids: &[u64]) {
        let mut cut = self.cut.lock().unwrap();
        for &o in ids.iter().filter(|&&o| o != id) {
            cut.insert((id, o));
            cut.insert((o, id));
        }
    }

    fn heal(&self) {
        self.cut.lock().unwrap().clear();
    }

    /// Delays every message from now on by `by` (one way).
    fn delay(self: &Arc<Self>, by: Duration) {
        let (tx, rx) = std::sync::mpsc::channel::<Delayed>();
        let router = Arc::downgrade(self);
        std::thread::spawn(move || {
            // Ends when the router, and with it the sender, is gone.
            while let Ok((due, from, m)) = rx.recv() {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let Some(router) = router.upgrade() else {
                    return;
                };
                router.deliver(from, vec![m]);
            }
        });
        *self.delayed.lock().unwrap() = Some((by, tx));
    }

    fn deliver(&self, from: u64, msgs: Vec<Message>) {
        let nodes = self.nodes.lock().unwrap();
        let cut = self.cut.lock().unwrap();
        for m in msgs {
            let to = m.to;
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let delivered =
                !cut.contains(&(from, to)) && nodes.get(&to).is_some_and(|n| n.step(m).is_ok());
            if snapshot {
                if let Some(me) = nodes.get(&from) {
                    let status = if delivered {
                        SnapshotStatus::Finish
                    } else {
                        SnapshotStatus::Failure
                    };
                    me.report_snapshot(to, status);
                }
            }
        }
    }
}

/// A message on its way through the slow network: (due, from, message).
type Delayed = (Instant, u64, Message);

struct Port {
    router: Arc<Router>,
    from: u64,
}

impl Transport for Port {
    fn send(&self, msgs: Vec<Message>) {
        if let Some((by, tx)) = self.router.delayed.lock().unwrap().as_ref() {
            let due = Instant::now() + *by;
            for m in msgs {
                let _ = tx.send((due, self.from, m));
            }
            return;
        }
        let mut msgs = msgs;
        {
            let cut = self.router.cut.lock().unwrap();
            let mut crossing = self.router.cross_pre_votes.lock().unwrap();
            if let Some(held) = crossing.as_mut() {
                let (pre_votes, rest): (Vec<_>, Vec<_>) = msgs.into_iter().partition(|m| {
                    m.get_msg_type() == MessageType::MsgRequestPreVote
                        && !cut.contains(&(self.from, m.to))
                });
                held.extend(pre_votes);
                msgs = rest;
                let senders: HashSet<u64> = held.iter().map(|m| m.from).collect();
                if senders.len() >= 2 {
                    msgs.extend(crossing.take().unwrap_or_default());
                }
            }
        }
        self.router.deliver(self.from, msgs);
    }
}

struct Cluster {
    router: Arc<Router>,
    nodes: BTreeMap<u64, NodeHandle>,
    threads: Vec<std::thread::JoinHandle<Result<node::Stopped, zoned::storage::StorageFailure>>>,
    _dirs: Vec<tempfile::TempDir>,
    lease_ns: u64,
}

fn founders() -> Bootstrap {
    Bootstrap::Voters(
        (1..=3)
            .map(|id| Member {
                id,
                peer_endpoint: format!("n{id}:1"),
                ..Member::default()
            })
            .collect(),
    )
}

fn config(id: u64, dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.node.id = id;
    c.node.data_dir = dir.to_owned();
    c.node.client_listen = ([127, 0, 0, 1], 1).into();
    c.node.peer_listen = ([127, 0, 0, 1], 2).into();
    c.voters = (1..=3)
        .map(|v| Voter {
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

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(|_| {})
    }

    fn start_with(tune: impl Fn(&mut Config)) -> Cluster {
        let router = Arc::new(Router::default());
        let mut nodes = BTreeMap::new();
        let mut threads = Vec::new();
        let mut dirs = Vec::new();
        let mut lease_ns = 0;
        for id in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(id, dir.path());
            tune(&mut cfg);
            lease_ns = cfg.lease().as_nanos() as u64;
            let engine = Engine::open(dir.path()).unwrap();
            let port = Arc::new(Port {
                router: router.clone(),
                from: id,
            });
            let (handle, thread) = node::start(&cfg, engine, port, founders()).unwrap();
            router.nodes.lock().unwrap().insert(id, handle.clone());
            nodes.insert(id, handle);
            threads.push(thread);
            dirs.push(dir);
        }
        Cluster {
            router,
            nodes,
            threads,
            _dirs: dirs,
            lease_ns,
        }
    }

    fn leaders(&self) -> Vec<(u64, u64)> {
        self.nodes
            .values()
            .map(|n| n.view())
            .filter(|v| v.role == StateRole::Leader)
            .map(|v| (v.id, v.term))
            .collect()
    }

    async fn wait_leader(&self, among: &[u64]) -> u64 {
        poll(Duration::from_secs(20), "a leader", || async {
            let views: Vec<_> = among.iter().map(|id| self.nodes[id].view()).collect();
            let l = views.iter().find(|v| v.role == StateRole::Leader)?;
            views
                .iter()
                .all(|v| v.leader_id == l.id && v.term == l.term)
                .then_some(l.id)
        })
        .await
    }
}

impl Drop for Cluster {
    /// Stops every driver and waits for it: RocksDB must not be torn down
    /// under a running thread when the test process exits.
    fn drop(&mut self) {
        for n in self.nodes.values() {
            n.shutdown();
        }
        self.router.nodes.lock().unwrap().clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn put_op(k: &str, v: &str) -> command::Op {
    command::Op::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: false,
    })
}

async fn read(n: &NodeHandle, k: &str) -> Option<Vec<u8>> {
    let req = zone_proto::v1::GetRequest {
        key: k.into(),
        serializable: true,
    };
    n.reader().get(&req).unwrap().0.map(|kv| kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_per_term_and_committed_entries_survive_partitions() {
    let c = Cluster::start();
    let ids = [1, 2, 3];
    let mut leaders_by_term: BTreeMap<u64, HashSet<u64>> = BTreeMap::new();
    let mut acked = Vec::new();
    for round in 0..6u64 {
        c.wait_leader(&ids).await;
        for (id, term) in c.leaders() {
            leaders_by_term.entry(term).or_default().insert(id);
        }
        for n in 0..5 {
            // On a loaded machine an election may interrupt a write: try
            // again under a new key (an unacknowledged one may or may not
            // exist, so it is never reused).
            for attempt in 0.. {
                assert!(attempt < 20, "no write acknowledged after 20 attempts");
                let key = format!("r{round}-{n}-{attempt}");
                let leader = c.wait_leader(&ids).await;
                if let Ok(res) = c.nodes[&leader].propose(put_op(&key, "v")).await {
                    assert!(matches!(res.result, Some(command_result::Result::Put(_))));
                    acked.push(key);
                    break;
                }
            }
        }
        let leader = c.wait_leader(&ids).await;
        // Cut the leader off; the others elect a new one.
        c.router.isolate(leader, &ids);
        let others: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
        let sampling = async {
            loop {
                for (id, term) in c.leaders() {
                    leaders_by_term.entry(term).or_default().insert(id);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            _ = sampling => unreachable!(),
            _ = c.wait_leader(&others) => {}
        }
        c.router.heal();
    }
    for (term, leaders) in &leaders_by_term {
        assert_eq!(leaders.len(), 1, "term {term} had leaders {leaders:?}");
    }
    assert!(
        leaders_by_term.len() >= 6,
        "expected a new term per round: {leaders_by_term:?}"
    );
    // Every acknowledged write is on every node once they converge.
    let leader = c.wait_leader(&ids).await;
    c.nodes[&leader]
        .propose(put_op("final", "v"))
        .await
        .unwrap();
    for n in c.nodes.values() {
        n.read_barrier().await.unwrap();
        for k in &acked {
            assert!(read(n, k).await.is_some(), "node {} lost {k}", n.id());
        }
    }
    assert_eq!(acked.len(), 30);
}

/// Commands that reach the leader together are proposed together (one
/// Raft append for the lot): each caller still gets the answer of its own
/// command at its own revision, and every server applies the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_each_get_their_own_answer() {
    let c = Cluster::start();
    let ids = [1, 2, 3];
    let leader = c.wait_leader(&ids).await;
    let n = 300;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let node = c.nodes[&leader].clone();
            tokio::spawn(async move {
                let key = format!("c{i:03}");
                let r = node.propose(put_op(&key, &format!("value of {key}"))).await;
                (key, r)
            })
        })
        .collect();
    let mut revisions = BTreeMap::new();
    for t in tasks {
        let (key, r) = t.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("{key}: {e}"));
        let Some(command_result::Result::Put(p)) = r.result else {
            panic!("{key}: not a put's answer: {r:?}");
        };
        revisions.insert(key, p.header.unwrap().revision);
    }
    let distinct: BTreeSet<u64> = revisions.values().copied().collect();
    assert_eq!(distinct.len(), n, "two writes answered with one revision");
    assert_eq!(
        distinct.last().unwrap() - distinct.first().unwrap() + 1,
        n as u64,
        "the revisions have gaps"
    );
    for node in c.nodes.values() {
        let get = |key: &str| {
            let req = zone_proto::v1::GetRequest {
                key: key.into(),
                serializable: true,
            };
            node.reader().get(&req).unwrap().0
        };
        let last = revisions.iter().max_by_key(|(_, r)| **r).unwrap().0;
        poll(Duration::from_secs(10), "every write applied", || async {
            get(last).map(|_| ())
        })
        .await;
        for (key, rev) in &revisions {
            let kv = get(key).unwrap_or_else(|| panic!("{key} missing on {}", node.id()));
            assert_eq!(kv.mod_revision, *rev, "{key} on server {}", node.id());
            assert_eq!(kv.value, format!("value of {key}").into_bytes());
        }
    }
}

/// The leader does not send each new commit index on its own
/// (`skip_bcast_commit`): the next append carries it. When no write
/// follows, it must still tell the followers at once, not leave them a
/// write behind until the next heartbeat: a follower's reads and watchers
/// would lag by up to a heartbeat. Heartbeats here are 1 s apart; without
/// that, each of five lone writes would reach the followers after 0-1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_apply_a_lone_write_without_waiting_for_a_heartbeat() {
    let c = Cluster::start_with(|cfg| {
        cfg.raft.heartbeat_ticks = 50;
        cfg.raft.election_ticks = 100;
    });
    let ids = [1, 2, 3];
    let leader = c.wait_leader(&ids).await;
    let limit = Duration::from_millis(300);
    for n in 0..5 {
        let key = format!("lone{n}");
        c.nodes[&leader]
            .propose(put_op(&key, "v"))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        let acked = Instant::now();
        for id in ids.into_iter().filter(|&i| i != leader) {
            while read(&c.nodes[&id], &key).await.is_none() {
                assert!(
                    acked.elapsed() < limit,
                    "server {id} had not applied {key} {limit:?} after the leader answered"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        // Apart, so that no write's append carries the last one's commit.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Two followers that time out together each grant the other's pre-vote
/// unless one gives way; both would then stand and split the vote, costing
/// a whole election timeout more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_that_stand_together_elect_in_one_term() {
    let c = Cluster::start();
    let ids = [1, 2, 3];
    let old = c.wait_leader(&ids).await;
    let term = c.nodes[&old].view().term;
    *c.router.cross_pre_votes.lock().unwrap() = Some(Vec::new());
    c.router.isolate(old, &ids);
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let new = c.wait_leader(&others).await;
    assert!(
        c.router.cross_pre_votes.lock().unwrap().is_none(),
        "the two pre-elections did not cross"
    );
    assert_eq!(
        c.nodes[&new].view().term,
        term + 1,
        "the crossed pre-elections split the vote"
    );
    assert_eq!(new, others[0], "the lower id should have won the tie");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_cannot_commit_and_steps_down() {
    let c = Cluster::start();
    let ids = [1, 2, 3];
    let old = c.wait_leader(&ids).await;
    c.nodes[&old].propose(put_op("before", "1")).await.unwrap();
    let old_term = c.nodes[&old].view().term;
    c.router.isolate(old, &ids);

    // The old leader accepts the proposal into its log but cannot commit it.
    let stuck = {
        let n = c.nodes[&old].clone();
        tokio::spawn(async move { n.propose(put_op("lost", "x")).await })
    };
    // check_quorum: it notices it lost the quorum and steps down by itself,
    // without hearing from anyone.
    poll(
        Duration::from_secs(10),
        "the isolated leader to step down",
        || async { (c.nodes[&old].view().role != StateRole::Leader).then_some(()) },
    )
    .await;
    assert!(
        !stuck.is_finished() || stuck.await.unwrap().is_err(),
        "an isolated leader committed"
    );

    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let new = c.wait_leader(&others).await;
    c.nodes[&new].propose(put_op("after", "2")).await.unwrap();
    assert!(c.nodes[&new].view().term > old_term);
    c.router.heal();
    c.wait_leader(&ids).await;
    // The old leader's uncommitted entry was replaced: it never applies,
    // and its caller hears that it was not applied.
    let n = &c.nodes[&old];
    poll(
        Duration::from_secs(10),
        "the old leader to catch up",
        || async { read(n, "after").await.map(|_| ()) },
    )
    .await;
    for n in c.nodes.values() {
        assert!(
            read(n, "lost").await.is_none(),
            "node {} applied an uncommitted write",
            n.id()
        );
        assert!(read(n, "before").await.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_compacted_log_catches_up_by_snapshot() {
    // A small retention forces a snapshot when a follower comes back.
    let c = Cluster::start_with(|cfg| cfg.raft.log_retention = 20);
    let ids = [1, 2, 3];
    let leader = c.wait_leader(&ids).await;
    let lagging = ids.into_iter().find(|&i| i != leader).unwrap();
    c.router.isolate(lagging, &ids);
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != lagging).collect();
    let leader = c.wait_leader(&others).await;
    for n in 0..100 {
        c.nodes[&leader]
            .propose(put_op(&format!("s{n:03}"), "v"))
            .await
            .unwrap();
    }
    c.router.heal();
    let n = &c.nodes[&lagging];
    poll(
        Duration::from_secs(20),
        "the lagging follower to catch up",
        || async { read(n, "s099").await.map(|_| ()) },
    )
    .await;
    let st = n.status().await.unwrap();
    assert!(
        st.snapshots_received >= 1,
        "caught up without a snapshot: {st:?}"
    );
    for k in 0..100 {
        assert!(read(n, &format!("s{k:03}")).await.is_some());
    }
}

/// Every lease publication of one node, as (node, lease).
fn record_leases(c: &Cluster) -> Arc<Mutex<Vec<(u64, zoned::node::Lease)>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    for n in c.nodes.values() {
        let mut rx = n.watch_lease();
        let log = log.clone();
        let id = n.id();
        tokio::spawn(async move {
            loop {
                let l = *rx.borrow_and_update();
                log.lock().unwrap().push((id, l));
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_ends_before_any_other_server_can_hold_one() {
    let c = Cluster::start();
    let ids = [1, 2, 3];
    let log = record_leases(&c);
    for _round in 0..3 {
        let old = c.wait_leader(&ids).await;
        // The leader holds a lease that it keeps renewing.
        let first = poll(
            Duration::from_secs(10),
            "the leader to hold a lease",
            || async {
                let l = *c.nodes[&old].watch_lease().borrow();
                (l.held && l.expires_ns > zoned::node::monotonic_ns()).then_some(l)
            },
        )
        .await;
        poll(
            Duration::from_secs(5),
            "the lease to be renewed",
            || async {
                let l = *c.nodes[&old].watch_lease().borrow();
                (l.expires_ns > first.expires_ns).then_some(())
            },
        )
        .await;
        for id in ids.iter().filter(|&&i| i != old) {
            assert!(
                !c.nodes[id].watch_lease().borrow().held,
                "follower {id} holds a lease"
            );
        }
        // Cut the leader off: its lease lapses, then another server leads
        // and gets a lease; the two never overlap on the shared clock.
        let cut_at = zoned::node::monotonic_ns();
        c.router.isolate(old, &ids);
        let others: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
        let new = c.wait_leader(&others).await;
        // Waits on the recorded log, not on the watch: the recorder task
        // may not have run yet when the watch already shows the lease.
        let new_first = poll(
            Duration::from_secs(10),
            "the new leader to hold a lease",
            || async {
                log.lock()
                    .unwrap()
                    .iter()
                    .filter(|(id, l)| *id == new && l.held && l.since_ns > cut_at)
                    .map(|(_, l)| *l)
                    .min_by_key(|l| l.since_ns)
            },
        )
        .await;
        let entries = log.lock().unwrap().clone();
        let old_last = entries
            .iter()
            .filter(|(id, l)| *id == old && l.held)
            .map(|(_, l)| *l)
            .max_by_key(|l| l.expires_ns)
            .expect("the old leader held a lease");
        assert!(
            old_last.expires_ns <= new_first.since_ns,
            "overlap: old lease until {} ns, new lease from {} ns ({} ms)",
            old_last.expires_ns,
            new_first.since_ns,
            (old_last.expires_ns - new_first.since_ns) / 1_000_000
        );
        // And the isolated leader did not renew after the cut by more than
        // one round in flight.
        assert!(old_last.expires_ns <= cut_at + c.lease_ns + 50_000_000);
        c.router.heal();
    }
}

/// Round trips of 200 ms, longer than a heartbeat (40 ms) and more than half
/// the lease (360 ms): each renewal arrives late, but rounds overlap, so the
/// lease never lapses while a quorum answers within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holds_over_round_trips_longer_than_a_heartbeat() {
    let c = Cluster::start_with(|cfg| {
        cfg.raft.election_ticks = 20;
        cfg.raft.lease_margin_ms = 20;
    });
    assert_eq!(c.lease_ns, 360_000_000);
    let ids = [1, 2, 3];
    let leader = c.wait_leader(&ids).await;
    let term = c.nodes[&leader].view().term;
    let log = record_leases(&c);
    poll(
        Duration::from_secs(10),
        "the leader to hold a lease",
        || async { c.nodes[&leader].watch_lease().borrow().held.then_some(()) },
    )
    .await;
    c.router.delay(Duration::from_millis(100));
    // Rounds sent before the delay was set may arrive quickly; watch from
    // one lease length after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = zoned::node::monotonic_ns();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let to = zoned::node::monotonic_ns();
    assert_eq!(
        c.nodes[&leader].view().term,
        term,
        "the leader changed under the slow network"
    );
    let entries = log.lock().unwrap().clone();
    let mine: Vec<_> = entries
        .iter()
        .filter(|(id, _)| *id == leader)
        .map(|(_, l)| *l)
        .collect();
    // The publication in force at `from`, and every one after it until `to`.
    let start = mine
        .iter()
        .rposition(|l| l.since_ns <= from)
        .expect("a lease before the window");
    let window: Vec<_> = mine[start..].iter().filter(|l| l.since_ns <= to).collect();
    assert!(
        window.len() >= 10,
        "only {} renewals in 3 s: {window:?}",
        window.len()
    );
    let mut until = from;
    for l in &window {
        assert!(l.held, "the lease was let go under a slow network: {l:?}");
        assert!(
            l.since_ns <= until,
            "the lease lapsed for {} ms before it was renewed",
            (l.since_ns - until) / 1_000_000
        );
        until = until.max(l.expires_ns);
    }
    assert!(until >= to, "the lease lapsed at the end of the window");
}
