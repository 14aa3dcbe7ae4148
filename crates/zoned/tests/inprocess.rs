//! Three Raft drivers in one process, with real RocksDB storage, joined by
//! a channel transport that can cut links: elections, safety under
//! partitions, and check_quorum.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

struct Port {
    router: Arc<Router>,
    from: u64,
}

impl Transport for Port {
    fn send(&self, msgs: Vec<Message>) {
        let nodes = self.router.nodes.lock().unwrap();
        let cut = self.router.cut.lock().unwrap();
        for m in msgs {
            let to = m.to;
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let delivered = !cut.contains(&(self.from, to))
                && nodes.get(&to).is_some_and(|n| n.step(m).is_ok());
            if snapshot {
                if let Some(me) = nodes.get(&self.from) {
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

struct Cluster {
    router: Arc<Router>,
    nodes: BTreeMap<u64, NodeHandle>,
    _dirs: Vec<tempfile::TempDir>,
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
        let router = Arc::new(Router::default());
        let mut nodes = BTreeMap::new();
        let mut dirs = Vec::new();
        for id in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(id, dir.path());
            let engine = Engine::open(dir.path()).unwrap();
            let port = Arc::new(Port {
                router: router.clone(),
                from: id,
            });
            let (handle, _thread) = node::start(&cfg, engine, port, founders()).unwrap();
            router.nodes.lock().unwrap().insert(id, handle.clone());
            nodes.insert(id, handle);
            dirs.push(dir);
        }
        Cluster {
            router,
            nodes,
            _dirs: dirs,
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
    fn drop(&mut self) {
        for n in self.nodes.values() {
            n.shutdown();
        }
        self.router.nodes.lock().unwrap().clear();
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
    let router = Arc::new(Router::default());
    let mut nodes = BTreeMap::new();
    let mut dirs = Vec::new();
    for id in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(id, dir.path());
        cfg.raft.log_retention = 20;
        let engine = Engine::open(dir.path()).unwrap();
        let port = Arc::new(Port {
            router: router.clone(),
            from: id,
        });
        let (handle, _thread) = node::start(&cfg, engine, port, founders()).unwrap();
        router.nodes.lock().unwrap().insert(id, handle.clone());
        nodes.insert(id, handle);
        dirs.push(dir);
    }
    let c = Cluster {
        router,
        nodes,
        _dirs: dirs,
    };
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
