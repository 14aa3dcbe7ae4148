//! Three Raft drivers in one process, with real RocksDB storage, on
//! simulated time (`sim`): elections, safety under partitions,
//! check_quorum, the commit index, the lease. Every timing below is on the
//! simulated clock, so it holds exactly whatever the machine's load.

mod sim;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use raft::StateRole;
use sim::{poll_once, Sim};
use zone_proto::v1::{command, command_result, CommandResult, PutRequest};
use zoned::node::{Lease, NodeError, NodeHandle};

fn put_op(k: &str, v: &str) -> command::Op {
    command::Op::Put(PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: false,
    })
}

fn read(n: &NodeHandle, k: &str) -> Option<Vec<u8>> {
    let req = zone_proto::v1::GetRequest {
        key: k.into(),
        serializable: true,
    };
    n.reader().get(&req).unwrap().0.map(|kv| kv.value)
}

/// Proposes a put of `key` on server `id` and runs the zone until it is
/// answered (at most 10 s of simulated time).
fn put(sim: &mut Sim, id: u64, key: &str, value: &str) -> Result<CommandResult, NodeError> {
    let n = sim.node(id);
    let op = put_op(key, value);
    sim.run_until(Duration::from_secs(10), "the put's answer", async move {
        n.propose(op).await
    })
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn one_leader_per_term_and_committed_entries_survive_partitions() {
    let mut sim = Sim::start();
    let ids = sim.ids();
    // Every leader of every term, seen after every step of the zone.
    let mut leaders_by_term: BTreeMap<u64, HashSet<u64>> = BTreeMap::new();
    let mut record = |sim: &Sim| {
        for (id, term) in sim.leaders() {
            leaders_by_term.entry(term).or_default().insert(id);
        }
    };
    let mut acked = Vec::new();
    for round in 0..6u64 {
        let leader = sim.wait_leader(&ids);
        record(&sim);
        for n in 0..5 {
            let key = format!("r{round}-{n}");
            let r = put(&mut sim, leader, &key, "v").unwrap_or_else(|e| panic!("{key}: {e}"));
            assert!(matches!(r.result, Some(command_result::Result::Put(_))));
            acked.push(key);
        }
        // Cut the leader off; the others elect a new one.
        sim.net.isolate(leader, &ids);
        let others: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
        sim.wait(20 * SECOND, "a leader among the others", |s| {
            record(s);
            s.agreed_leader(&others)
        });
        sim.net.heal();
    }
    for (term, leaders) in &leaders_by_term {
        assert_eq!(leaders.len(), 1, "term {term} had leaders {leaders:?}");
    }
    assert!(
        leaders_by_term.len() >= 6,
        "expected a new term per round: {leaders_by_term:?}"
    );
    // Every acknowledged write is on every server once they converge.
    let leader = sim.wait_leader(&ids);
    put(&mut sim, leader, "final", "v").unwrap();
    for id in ids {
        let n = sim.node(id);
        sim.run_until(10 * SECOND, "a read barrier", async {
            n.read_barrier().await
        })
        .unwrap();
        for k in &acked {
            assert!(read(&n, k).is_some(), "server {id} lost {k}");
        }
    }
    assert_eq!(acked.len(), 30);
}

/// Commands that reach the leader together are proposed together (one
/// Raft append for the lot): each caller still gets the answer of its own
/// command at its own revision, and every server applies the same.
#[test]
fn concurrent_writes_each_get_their_own_answer() {
    let mut sim = Sim::start();
    let ids = sim.ids();
    let leader = sim.wait_leader(&ids);
    let leader = sim.node(leader);
    let n = 300;
    let writes = (0..n).map(|i| {
        let node = leader.clone();
        async move {
            let key = format!("c{i:03}");
            let r = node.propose(put_op(&key, &format!("value of {key}"))).await;
            (key, r)
        }
    });
    let answers = sim.run_until(
        10 * SECOND,
        "every answer",
        futures::future::join_all(writes),
    );
    let mut revisions = BTreeMap::new();
    for (key, r) in answers {
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
    let last = revisions.iter().max_by_key(|(_, r)| **r).unwrap().0.clone();
    for id in ids {
        let node = sim.node(id);
        let get = |key: &str| {
            let req = zone_proto::v1::GetRequest {
                key: key.into(),
                serializable: true,
            };
            node.reader().get(&req).unwrap().0
        };
        sim.wait(10 * SECOND, "every write applied", |_| {
            get(&last).map(|_| ())
        });
        for (key, rev) in &revisions {
            let kv = get(key).unwrap_or_else(|| panic!("{key} missing on {id}"));
            assert_eq!(kv.mod_revision, *rev, "{key} on server {id}");
            assert_eq!(kv.value, format!("value of {key}").into_bytes());
        }
    }
}

/// The leader does not send each new commit index on its own
/// (`skip_bcast_commit`): the next append carries it. When no write
/// follows, it must still tell the followers at once, not leave them a
/// write behind until the next heartbeat: a follower's reads and watchers
/// would lag by up to a heartbeat. Heartbeats here are 1 s apart and the
/// network takes 1 ms each way; without that, each of five lone writes
/// would reach the followers up to a second late.
#[test]
fn followers_apply_a_lone_write_without_waiting_for_a_heartbeat() {
    let mut sim = Sim::start_with(|cfg| {
        cfg.raft.heartbeat_ticks = 50;
        cfg.raft.election_ticks = 100;
    });
    sim.net.delay(Duration::from_millis(1));
    let ids = sim.ids();
    let leader = sim.wait_leader(&ids);
    // A follower learns of the commit one way after the leader: 1 ms.
    let limit = Duration::from_millis(2);
    for n in 0..5 {
        let key = format!("lone{n}");
        put(&mut sim, leader, &key, "v").unwrap_or_else(|e| panic!("{key}: {e}"));
        for id in ids.iter().copied().filter(|&i| i != leader) {
            let follower = sim.node(id);
            sim.wait(limit, "the write applied on a follower", |_| {
                read(&follower, &key).map(|_| ())
            });
        }
        // Apart, so that no write's append carries the last one's commit.
        sim.run_for(Duration::from_millis(150));
    }
}

/// Two followers that time out together each grant the other's pre-vote
/// unless one gives way; both would then stand and split the vote, costing
/// a whole election timeout more.
#[test]
fn followers_that_stand_together_elect_in_one_term() {
    let mut sim = Sim::start();
    let ids = sim.ids();
    let old = sim.wait_leader(&ids);
    let term = sim.node(old).view().term;
    sim.net.cross_pre_votes();
    sim.net.isolate(old, &ids);
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let new = sim.wait_leader(&others);
    assert!(
        sim.net.pre_votes_crossed(),
        "the two pre-elections did not cross"
    );
    assert_eq!(
        sim.node(new).view().term,
        term + 1,
        "the crossed pre-elections split the vote"
    );
    assert_eq!(new, others[0], "the lower id should have won the tie");
}

#[test]
fn isolated_leader_cannot_commit_and_steps_down() {
    let mut sim = Sim::start();
    let ids = sim.ids();
    let old = sim.wait_leader(&ids);
    put(&mut sim, old, "before", "1").unwrap();
    let old_term = sim.node(old).view().term;
    sim.net.isolate(old, &ids);

    // The old leader accepts the proposal into its log but cannot commit it.
    let old_node = sim.node(old);
    let mut stuck: Pin<Box<dyn Future<Output = _>>> =
        Box::pin(async move { old_node.propose(put_op("lost", "x")).await });
    assert!(poll_once(&mut stuck).is_none(), "answered before any work");
    // check_quorum: it notices it lost the quorum and steps down by itself,
    // without hearing from anyone.
    let lost = sim.wait(10 * SECOND, "the isolated leader to step down", |s| {
        let answer = poll_once(&mut stuck);
        assert!(
            !matches!(answer, Some(Ok(_))),
            "an isolated leader committed"
        );
        (s.node(old).view().role != StateRole::Leader).then_some(answer)
    });
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let new = sim.wait_leader(&others);
    put(&mut sim, new, "after", "2").unwrap();
    assert!(sim.node(new).view().term > old_term);
    sim.net.heal();
    sim.wait_leader(&ids);
    // The old leader's uncommitted entry was replaced: it never applies,
    // and its caller hears that it was not applied.
    let n = sim.node(old);
    sim.wait(10 * SECOND, "the old leader to catch up", |_| {
        read(&n, "after").map(|_| ())
    });
    let answer = match lost {
        Some(answer) => answer,
        None => sim.run_until(10 * SECOND, "the lost write's answer", stuck),
    };
    assert!(answer.is_err(), "the lost write was answered {answer:?}");
    for id in ids {
        let n = sim.node(id);
        assert!(
            read(&n, "lost").is_none(),
            "server {id} applied an uncommitted write"
        );
        assert!(read(&n, "before").is_some());
    }
}

#[test]
fn follower_behind_compacted_log_catches_up_by_snapshot() {
    // A small retention forces a snapshot when a follower comes back.
    let mut sim = Sim::start_with(|cfg| cfg.raft.log_retention = 20);
    let ids = sim.ids();
    let leader = sim.wait_leader(&ids);
    let lagging = ids.iter().copied().find(|&i| i != leader).unwrap();
    sim.net.isolate(lagging, &ids);
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != lagging).collect();
    let leader = sim.wait_leader(&others);
    for n in 0..100 {
        put(&mut sim, leader, &format!("s{n:03}"), "v").unwrap();
    }
    sim.net.heal();
    let n = sim.node(lagging);
    sim.wait(20 * SECOND, "the lagging follower to catch up", |_| {
        read(&n, "s099").map(|_| ())
    });
    let st = sim
        .run_until(SECOND, "the status", async { n.status().await })
        .unwrap();
    assert!(
        st.snapshots_received >= 1,
        "caught up without a snapshot: {st:?}"
    );
    for k in 0..100 {
        assert!(read(&n, &format!("s{k:03}")).is_some());
    }
}

/// The newest held lease of `id` published since `since_ns`.
fn first_lease_since(sim: &Sim, id: u64, since_ns: u64) -> Option<Lease> {
    sim.leases
        .iter()
        .filter(|(i, l)| *i == id && l.held && l.since_ns > since_ns)
        .map(|(_, l)| *l)
        .min_by_key(|l| l.since_ns)
}

#[test]
fn the_lease_ends_before_any_other_server_can_hold_one() {
    let mut sim = Sim::start();
    let ids = sim.ids();
    for _round in 0..3 {
        let old = sim.wait_leader(&ids);
        // The leader holds a lease that it keeps renewing.
        let first = sim.wait(10 * SECOND, "the leader to hold a lease", |s| {
            let l = *s.node(old).watch_lease().borrow();
            (l.held && l.expires_ns > s.now_ns()).then_some(l)
        });
        sim.wait(5 * SECOND, "the lease to be renewed", |s| {
            let l = *s.node(old).watch_lease().borrow();
            (l.expires_ns > first.expires_ns).then_some(())
        });
        for id in ids.iter().filter(|&&i| i != old) {
            assert!(
                !sim.node(*id).watch_lease().borrow().held,
                "follower {id} holds a lease"
            );
        }
        // Cut the leader off: its lease lapses, then another server leads
        // and gets a lease; the two never overlap on the shared clock.
        let cut_at = sim.now_ns();
        sim.net.isolate(old, &ids);
        let others: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
        let new = sim.wait_leader(&others);
        let new_first = sim.wait(10 * SECOND, "the new leader to hold a lease", |s| {
            first_lease_since(s, new, cut_at)
        });
        let old_last = sim
            .leases
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
        // And the isolated leader did not renew after the cut: its last
        // lease came from a round sent before it.
        assert!(old_last.expires_ns <= cut_at + sim.lease_ns);
        sim.net.heal();
    }
}

/// Round trips of 200 ms, longer than a heartbeat (40 ms) and more than half
/// the lease (340 ms): each renewal arrives late, but rounds overlap, so the
/// lease never lapses while a quorum answers within the lease.
#[test]
fn the_lease_holds_over_round_trips_longer_than_a_heartbeat() {
    let mut sim = Sim::start_with(|cfg| {
        cfg.raft.election_ticks = 20;
        cfg.raft.lease_margin_ms = 40;
    });
    assert_eq!(sim.lease_ns, 340_000_000);
    let ids = sim.ids();
    let leader = sim.wait_leader(&ids);
    let term = sim.node(leader).view().term;
    sim.wait(10 * SECOND, "the leader to hold a lease", |s| {
        s.node(leader).watch_lease().borrow().held.then_some(())
    });
    sim.net.delay(Duration::from_millis(100));
    // Rounds sent before the delay was set arrive quickly; watch from one
    // lease length after.
    sim.run_for(Duration::from_millis(500));
    let from = sim.now_ns();
    sim.run_for(3 * SECOND);
    let to = sim.now_ns();
    assert_eq!(
        sim.node(leader).view().term,
        term,
        "the leader changed under the slow network"
    );
    let mine: Vec<Lease> = sim
        .leases
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
