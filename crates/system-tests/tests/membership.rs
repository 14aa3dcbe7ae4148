//! Zone management against real processes on loopback: servers join and
//! leave while a client writes, snapshot catch-up, reset, leader handoff,
//! maintenance mode, and bad management input.

use std::sync::Arc;
use std::time::{Duration, Instant};

use testbed::zone::{poll, TestZone};
use tonic::Code;
use zonectl::v1::{
    request_op, AddServerRequest, MembersRequest, PutRequest, RemoveServerRequest, RequestOp,
    ResetServerRequest, SetMaintenanceRequest, TransferLeaderRequest, TxnRequest,
};

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        prev_kv: false,
    }
}

async fn members(zone: &TestZone, i: usize) -> Vec<(u64, bool)> {
    let r = zone
        .cluster(i)
        .await
        .members(MembersRequest {})
        .await
        .unwrap()
        .into_inner();
    r.members.iter().map(|m| (m.id, m.learner)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_promote_remove_and_transfer_while_a_client_writes() {
    let mut zone = TestZone::start(3, "");
    zone.wait_leader().await;
    let endpoints = Arc::new(std::sync::Mutex::new(zone.endpoints()));
    let writer = testbed::zone::start_writer(endpoints.clone(), zone.pki.admin().clone(), "w");
    writer.wait_more(20).await;

    // Add server 4: it enters as a learner, joins through server 2 with
    // the token an admin got for it (no certificate of its own yet), and
    // is promoted once caught up.
    let four = zone.prepare_token_joiner(4, 1);
    let peer = zone.servers[four].peer.to_string();
    let r = zone
        .cluster(0)
        .await
        .add_server(AddServerRequest {
            id: 4,
            name: "zone-4".into(),
            peer,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.members.iter().any(|m| m.id == 4 && m.learner),
        "{:?}",
        r.members
    );
    let token = zone.join_token(2, 4).await;
    zone.give_token(four, &token);
    zone.launch(four);
    endpoints
        .lock()
        .unwrap()
        .push(zone.servers[four].endpoint());
    poll(
        Duration::from_secs(30),
        "server 4 to be promoted to voter",
        || async {
            let m = members(&zone, 0).await;
            m.contains(&(4, false)).then_some(())
        },
    )
    .await;

    // Remove the current leader (an original server): it hands leadership
    // over first, then leaves and stops.
    let leader = zone.wait_leader().await;
    let gone_id = zone.servers[leader].id;
    let via = (0..3).find(|&i| i != leader).unwrap();
    zone.cluster(via)
        .await
        .remove_server(RemoveServerRequest { id: gone_id })
        .await
        .unwrap();
    let status = zone.wait_exit(leader, Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(3),
        "a removed server exits with status 3"
    );
    assert!(
        zone.log(leader).contains("removed from the zone"),
        "the removed server says why"
    );

    // Transfer leadership twice: to server 4, then to the most caught-up.
    let mut c = zone.cluster(via).await;
    let mut transfer = async |target| {
        let r = c.transfer_leader(TransferLeaderRequest { target }).await;
        r.unwrap().into_inner().leader_id
    };
    assert_eq!(transfer(4).await, 4);
    let last = transfer(0).await;
    assert_ne!(last, 4);
    assert_ne!(last, gone_id);
    // The zone takes writes under its last leader.
    writer.wait_more(20).await;
    let (acked, _errors) = writer.finish().await;
    assert!(
        acked.len() > 50,
        "too few writes acknowledged: {}",
        acked.len()
    );

    // The membership is what was asked: three voters, the removed one gone.
    let live: Vec<usize> = (0..4).filter(|&i| i != leader).collect();
    let mut want: Vec<(u64, bool)> = live.iter().map(|&i| (zone.servers[i].id, false)).collect();
    want.sort();
    for &i in &live {
        assert_eq!(
            members(&zone, i).await,
            want,
            "membership seen by server {}",
            zone.servers[i].id
        );
    }
    // Every acknowledged write is on every member.
    let last_rev = *acked.values().max().unwrap();
    for &i in &live {
        poll(
            Duration::from_secs(20),
            "every member to apply the last write",
            || async { (zone.own_row(i).await?.revision >= last_rev).then_some(()) },
        )
        .await;
        let have = zone.mod_revisions(i, b"w", true).await;
        for (k, rev) in &acked {
            assert_eq!(
                have.get(k),
                Some(rev),
                "server {} lacks {k}",
                zone.servers[i].id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_retained_log_catches_up_by_snapshot() {
    // Appended to the test's [raft] table.
    let mut zone = TestZone::start(3, "log_retention = 50\n");
    let leader = zone.wait_leader().await;
    let f = (leader + 1) % 3;
    zone.terminate(f);
    let mut kv = zone.kv(leader).await;
    for n in 0..300 {
        kv.put(put(&format!("s{n:04}"), "v")).await.unwrap();
    }
    let rev = zone.revision(leader).await;
    zone.launch(f);
    poll(
        Duration::from_secs(30),
        "the follower to catch up",
        || async {
            let row = zone.own_row(f).await?;
            (row.revision >= rev).then_some(row)
        },
    )
    .await;
    let row = zone.own_row(f).await.unwrap();
    assert!(
        row.snapshots_received >= 1,
        "caught up without a snapshot: {row:?}"
    );
}

/// Issue 20's defect 8: two servers added back to back on a large store.
/// A snapshot build that started before the second addition ends with the
/// configuration from before it; on the old code it was offered to the
/// second server, which rejected it, again and again until compaction
/// passed it. (96 MiB builds in about 80 ms, so this test rarely hits that
/// window: `raft_storage`'s unit test holds a build at a gate for it.) It
/// found another defect: raft-rs's debug records were formatted even when
/// not logged, a snapshot message's data included, which stalled each new
/// leader for over a second, and the zone kept electing leaders and never
/// caught the new servers up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_added_back_to_back_on_a_large_store_are_both_promoted() {
    // A short log, so that joiners catch up by snapshot.
    let mut zone = TestZone::start(3, "log_retention = 20\n");
    let leader = zone.wait_leader().await;
    // 96 MiB: 8 writers, each 24 transactions of 8 values of 64 KiB.
    let value = vec![b'x'; 64 << 10];
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let mut kv = zone.kv(leader).await;
        let value = value.clone();
        writers.spawn(async move {
            for t in 0..24 {
                let success = (0..8)
                    .map(|k| RequestOp {
                        request: Some(request_op::Request::Put(PutRequest {
                            key: format!("big/{w}/{t:02}/{k}").into_bytes(),
                            value: value.clone(),
                            prev_kv: false,
                        })),
                    })
                    .collect();
                kv.txn(TxnRequest {
                    compare: vec![],
                    success,
                    failure: vec![],
                })
                .await
                .unwrap();
            }
        });
    }
    writers.join_all().await;
    let rev = zone.revision(leader).await;

    // Each new server added, then started, as an operator would: the
    // leader starts building the first one's snapshot as soon as that one
    // answers, and the second is added meanwhile.
    let joiners: Vec<usize> = [4, 5]
        .iter()
        .map(|&id| zone.prepare_joiner(id, 1))
        .collect();
    let started = Instant::now();
    let mut c = zone.cluster(leader).await;
    for &j in &joiners {
        let id = zone.servers[j].id;
        c.add_server(AddServerRequest {
            id,
            name: format!("zone-{id}"),
            peer: zone.servers[j].peer.to_string(),
        })
        .await
        .unwrap();
        zone.launch(j);
    }
    poll(
        Duration::from_secs(120),
        "servers 4 and 5 promoted to voters",
        || async {
            let m = members(&zone, leader).await;
            (m.contains(&(4, false)) && m.contains(&(5, false))).then_some(())
        },
    )
    .await;
    for &j in &joiners {
        let row = zone.own_row(j).await.unwrap();
        assert!(row.revision >= rev, "server {} is behind: {row:?}", row.id);
        assert!(row.snapshots_received >= 1, "no snapshot: {row:?}");
    }
    eprintln!(
        "both promoted {:?} after the first addition",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_sends_a_fresh_snapshot() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let f = (leader + 2) % 3;
    zone.kv(leader).await.put(put("r", "1")).await.unwrap();
    assert_eq!(zone.own_row(f).await.unwrap().snapshots_received, 0);
    let id = zone.servers[f].id;
    zone.cluster(leader)
        .await
        .reset_server(ResetServerRequest { id })
        .await
        .unwrap();
    poll(
        Duration::from_secs(20),
        "the reset follower to install a snapshot",
        || async { (zone.own_row(f).await?.snapshots_received >= 1).then_some(()) },
    )
    .await;
    // It still serves the data afterwards.
    assert_eq!(zone.value(f, "r", true).await.as_deref(), Some(&b"1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_leader_hands_over_before_it_exits() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let old_id = zone.servers[leader].id;
    let others: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| zone.servers[i].endpoint())
        .collect();
    // Watch the other servers' view of the leader, on the host's clock.
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<Instant>();
    let creds = zone.pki.admin().clone();
    let watcher = tokio::spawn(async move {
        let mut seen_tx = Some(seen_tx);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for ep in &others {
                let ch = zonectl::endpoint(ep, Some(&creds)).unwrap().connect_lazy();
                let mut c = zonectl::v1::cluster_client::ClusterClient::new(ch);
                let mut req = tonic::Request::new(zonectl::v1::StatusRequest {});
                req.set_timeout(Duration::from_millis(500));
                if let Ok(r) = c.status(req).await {
                    let r = r.into_inner();
                    if r.leader_id != 0 && r.leader_id != old_id {
                        if let Some(tx) = seen_tx.take() {
                            let _ = tx.send(Instant::now());
                        }
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let status = tokio::task::block_in_place(|| zone.terminate(leader));
    let exited = Instant::now();
    assert!(status.success(), "{status}");
    let seen = seen_rx.await.expect("no new leader was seen");
    watcher.await.unwrap();
    assert!(
        seen < exited,
        "the new leader appeared {:?} after the old one exited",
        seen - exited
    );
    assert!(zone
        .log(leader)
        .contains("leadership handed over before stopping"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_refuses_writes_and_serves_reads() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let f = (leader + 1) % 3;
    zone.kv(f).await.put(put("m", "before")).await.unwrap();
    let r = zone
        .cluster(f)
        .await
        .set_maintenance(SetMaintenanceRequest { disabled: true })
        .await
        .unwrap();
    assert!(r.into_inner().disabled);
    for i in 0..3 {
        let e = zone.kv(i).await.put(put("m", "during")).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::FailedPrecondition, "zone disabled for maintenance")
        );
        let v = zone.value(i, "m", false).await;
        assert_eq!(v.as_deref(), Some(&b"before"[..]));
        assert!(zone.status(i).await.unwrap().disabled);
    }
    // Management still works while disabled.
    zone.cluster(leader)
        .await
        .transfer_leader(TransferLeaderRequest { target: 0 })
        .await
        .unwrap();
    zone.cluster(0)
        .await
        .set_maintenance(SetMaintenanceRequest { disabled: false })
        .await
        .unwrap();
    zone.kv(leader).await.put(put("m", "after")).await.unwrap();
    assert!(!zone.status(0).await.unwrap().disabled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_management_input_changes_nothing() {
    let mut zone = TestZone::start(3, "");
    zone.wait_leader().await;
    let before = members(&zone, 0).await;
    let mut c = zone.cluster(1).await;
    let peer1 = zone.servers[0].peer.to_string();
    let add = |id: u64, peer: &str| AddServerRequest {
        id,
        name: String::new(),
        peer: peer.into(),
    };

    let e = c.add_server(add(2, "127.0.0.1:1")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        e.message()
            .starts_with("server 2 is already a member (voter"),
        "{}",
        e.message()
    );
    let refused = [
        (
            add(9, &peer1),
            Code::AlreadyExists,
            format!("peer address {peer1} is already used by server 1"),
        ),
        (
            add(0, "h:1"),
            Code::InvalidArgument,
            "id: must be at least 1".into(),
        ),
        (
            add(9, "nowhere"),
            Code::InvalidArgument,
            "peer: 'nowhere' is not host:port".into(),
        ),
    ];
    for (req, code, message) in refused {
        let e = c.add_server(req).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (code, message.as_str()));
    }
    let e = c
        .remove_server(RemoveServerRequest { id: 7 })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::NotFound,
            "server 7 is not a member of the zone (members: 1, 2, 3)"
        )
    );
    let e = c
        .transfer_leader(TransferLeaderRequest { target: 7 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .reset_server(ResetServerRequest { id: 7 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(members(&zone, 0).await, before, "membership changed");

    // A join to a zone that does not list the server is refused at start.
    let j = zone.prepare_joiner(5, 0);
    zone.launch(j);
    let st = zone.wait_exit(j, Duration::from_secs(20));
    assert_eq!(st.code(), Some(2));
    assert!(
        zone.log(j)
            .contains("node.join: server 5 is not a member of the zone at"),
        "{}",
        zone.log(j)
    );
    assert_eq!(members(&zone, 0).await, before, "membership changed");

    // The last voter of a zone cannot be removed.
    let mut single = TestZone::start(1, "");
    single.wait_leader().await;
    let e = single
        .cluster(0)
        .await
        .remove_server(RemoveServerRequest { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::FailedPrecondition,
            "server 1 is the last voter; a zone cannot remove its last voter"
        )
    );
}

/// Issue 20, defect 6: a founder whose data directory was wiped (a
/// reflashed disk, the same identity) must not found the zone again: it
/// would forget its votes and the entries it acknowledged, and with
/// another server lagging a committed write could be lost. It refuses to
/// start (exit code 2) and says how to bring it back. On the old code it
/// started as a blank founder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_whose_data_was_wiped_refuses_to_found_the_zone_again() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let wiped = (leader + 1) % 3;
    zone.kv(leader).await.put(put("w", "1")).await.unwrap();
    let rev = zone.revision(leader).await;
    poll(
        Duration::from_secs(10),
        "the write on every server",
        || async { (zone.own_row(wiped).await?.revision >= rev).then_some(()) },
    )
    .await;
    zone.kill9(wiped);
    let data = zone.data_dir(wiped).join("data");
    std::fs::remove_dir_all(&data).unwrap();
    zone.launch(wiped);
    exits_naming(&mut zone, wiped, "already took part in the zone");
    assert!(zone.log(wiped).contains("zonectl server remove"));
}

/// Issue 20, defect 6, the issue's own sequence: W commits on the leader
/// and server A while server B is down; A is reflashed with the same
/// identity; the leader dies; B comes back; A and B could elect B, whose
/// log lacks W. With the leader gone, no server knows A's progress (the
/// check of `f6adc18` asked the leader for it, so A founded again and W
/// was lost); B's store records that A took part, and A refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_wiped_while_the_leader_is_down_refuses_to_found_the_zone_again() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    zone.kv(leader).await.put(put("v", "1")).await.unwrap();
    let rev = zone.revision(leader).await;
    poll(Duration::from_secs(10), "V on B", || async {
        (zone.own_row(b).await?.revision >= rev).then_some(())
    })
    .await;
    // The leader records who took part every 5 ticks (250 ms here), and
    // B applies that record with the next append.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Down rather than frozen: a frozen server still receives the
    // leader's appends in its socket buffers, and would have W on waking.
    zone.kill9(b);
    zone.kv(leader).await.put(put("w", "1")).await.unwrap();
    let rev = zone.revision(leader).await;
    poll(Duration::from_secs(10), "W on A", || async {
        (zone.own_row(a).await?.revision >= rev).then_some(())
    })
    .await;
    zone.kill9(a);
    std::fs::remove_dir_all(zone.data_dir(a).join("data")).unwrap();
    zone.kill9(leader);
    zone.launch(b);
    poll(Duration::from_secs(10), "B serving again", || async {
        zone.own_row(b).await
    })
    .await;
    zone.launch(a);
    let deadline = Instant::now() + Duration::from_secs(20);
    while zone.servers[a].is_running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if zone.servers[a].is_running() {
        let w = zone.value(b, "w", false).await;
        panic!(
            "the wiped server founded the zone again (W read through server B: {w:?}):\n{}",
            zone.log(a)
        );
    }
    exits_naming(&mut zone, a, "already took part in the zone");
    assert!(zone.log(a).contains("zonectl server remove"));
}

/// A founder that never ran is not a wiped one: started after the others
/// founded the zone (a server booted late), it gets the zone's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_that_starts_late_catches_up() {
    let mut zone = TestZone::prepare(3, "");
    zone.launch(0);
    zone.launch(1);
    let leader = zone.wait_leader().await;
    zone.kv(leader).await.put(put("w", "1")).await.unwrap();
    let rev = zone.revision(leader).await;
    // Until the leader has recorded that servers 1 and 2 took part.
    tokio::time::sleep(Duration::from_millis(500)).await;
    zone.launch(2);
    poll(
        Duration::from_secs(10),
        "the late founder caught up",
        || async { (zone.own_row(2).await?.revision >= rev).then_some(()) },
    )
    .await;
    assert_eq!(zone.value(2, "w", true).await.as_deref(), Some(&b"1"[..]));
}

/// Waits up to 5 s for server `i` to report the zone's id. Not a check
/// (binaries older than the zone's record never report one: the test's
/// assertions then tell how they fail).
async fn wait_for_record(zone: &TestZone, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if zone.own_row(i).await.is_some_and(|r| !r.zone_id.is_empty()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rewrites one line of server `i`'s configuration.
fn set_config_line(zone: &TestZone, i: usize, from: &str, to: &str) {
    let path = zone.servers[i].config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

/// Waits for server `i` to exit on its own; asserts the configuration
/// error's exit code and that its log names `text`.
fn exits_naming(zone: &mut TestZone, i: usize, text: &str) {
    let st = zone.wait_exit(i, Duration::from_secs(30));
    let log = zone.log(i);
    assert_eq!(st.code(), Some(2), "{log}");
    assert!(log.contains(text), "{text:?} not in the log:\n{log}");
}

/// Issue 20, defect 4: the lease timing is the zone's, not each server's.
/// A server restarted with another `election_ticks` would refuse votes for
/// a shorter time than the leader's lease assumes; it refuses to start,
/// naming the field and the zone's value. On the old code it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_with_another_raft_timing_refuses_to_start() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let other = (leader + 1) % 3;
    wait_for_record(&zone, other).await;
    zone.terminate(other);
    set_config_line(&zone, other, "election_ticks = 10", "election_ticks = 12");
    zone.launch(other);
    exits_naming(
        &mut zone,
        other,
        "raft.election_ticks is 12 in this server's configuration, but zone",
    );
    assert!(zone.log(other).contains("runs with 10"));
}

/// A founder configured with another `tick_ms` than the zone its peers
/// founded stops when it applies the zone's record; a joiner with another
/// timing stops when its snapshot brings the record, while still a learner
/// (it never voted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn founders_and_joiners_with_another_raft_timing_stop_on_the_zones_record() {
    let mut zone = TestZone::prepare(3, "");
    set_config_line(&zone, 2, "tick_ms = 50", "tick_ms = 60");
    zone.launch(0);
    zone.launch(1);
    let leader = zone.wait_leader().await;
    wait_for_record(&zone, leader).await;
    zone.launch(2);
    exits_naming(
        &mut zone,
        2,
        "raft.tick_ms is 60 in this server's configuration, but zone",
    );

    let four = zone.prepare_joiner(4, leader);
    set_config_line(&zone, four, "election_ticks = 10", "election_ticks = 14");
    zone.cluster(leader)
        .await
        .add_server(AddServerRequest {
            id: 4,
            name: "zone-4".into(),
            peer: zone.servers[four].peer.to_string(),
        })
        .await
        .unwrap();
    zone.launch(four);
    exits_naming(
        &mut zone,
        four,
        "raft.election_ticks is 14 in this server's configuration, but zone",
    );
    // It never acknowledged the snapshot: still a learner, so the zone's
    // quorum stays two of three. (The leader considers promotion every 5
    // ticks, 250 ms here: four rounds.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = members(&zone, leader).await;
    assert!(m.contains(&(4, true)), "server 4 is not a learner: {m:?}");
}

/// A server down while another was added must follow that one when it
/// leads: the peer port hears only members, and the returning server's
/// applied membership does not have the new one yet. Without asking the
/// other members (transport::check_member), it refused the new leader's
/// every message and never caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_while_another_was_added_follows_it_as_leader() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let behind = (leader + 1) % 3;
    zone.kill9(behind);
    let four = zone.prepare_joiner(4, leader);
    let peer = zone.servers[four].peer.to_string();
    zone.cluster(leader)
        .await
        .add_server(AddServerRequest {
            id: 4,
            name: "zone-4".into(),
            peer,
        })
        .await
        .unwrap();
    zone.launch(four);
    poll(
        Duration::from_secs(30),
        "server 4 promoted to voter",
        || async {
            members(&zone, leader)
                .await
                .contains(&(4, false))
                .then_some(())
        },
    )
    .await;
    let r = zone
        .cluster(leader)
        .await
        .transfer_leader(TransferLeaderRequest { target: 4 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.leader_id, 4);
    zone.kv(four).await.put(put("after", "4")).await.unwrap();
    // The server that was down comes back, knowing members 1-3 only.
    zone.launch(behind);
    let id = zone.servers[behind].id;
    poll(
        Duration::from_secs(30),
        "the returning server to follow server 4 and catch up",
        || async {
            let row = zone.own_row(behind).await?;
            let value = zone.value(behind, "after", true).await;
            (row.state == "follower" && value.as_deref() == Some(&b"4"[..])).then_some(())
        },
    )
    .await;
    assert!(
        zone.log(behind).contains("hearing it"),
        "server {id} caught up without asking about server 4:\n{}",
        zone.log(behind)
    );
}
