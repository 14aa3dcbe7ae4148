//! Three real `zoned` processes on loopback, real gRPC, RocksDB on disk.

use std::time::Duration;

use testbed::zone::{poll, TestZone};
use tonic::Code;
use zonectl::v1::{
    compare, request_op, Compare, GetRequest, PutRequest, RequestOp, TxnRequest, WatchRequest,
};

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        prev_kv: false,
    }
}

fn get(key: &str, serializable: bool) -> GetRequest {
    GetRequest {
        key: key.into(),
        serializable,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_server_are_read_everywhere() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    for i in 0..3 {
        let r = zone
            .kv(i)
            .await
            .put(put(&format!("from-{i}"), &format!("v{i}")))
            .await;
        let r = r.unwrap_or_else(|e| panic!("put through server {i} (leader is {leader}): {e}"));
        assert!(r.into_inner().header.unwrap().revision >= 1);
    }
    for i in 0..3 {
        for j in 0..3 {
            let v = zone.value(i, &format!("from-{j}"), false).await;
            assert_eq!(
                v.as_deref(),
                Some(format!("v{j}").as_bytes()),
                "server {i} reading key of {j}"
            );
        }
    }
    // Status lists three voters, one leader, everyone caught up eventually.
    let view = zone.status(1).await.unwrap();
    assert_eq!(view.servers.len(), 3);
    assert_eq!(
        view.servers.iter().filter(|s| s.state == "leader").count(),
        1
    );
    assert!(view
        .servers
        .iter()
        .all(|s| s.voter && s.name.starts_with("zone-")));
    let leader_row = view.leader().unwrap();
    assert!(
        leader_row.index >= 4,
        "three writes and a no-op: {leader_row:?}"
    );
    poll(
        Duration::from_secs(10),
        "followers to report their match index",
        || async {
            let v = zone.status(0).await?;
            v.servers.iter().all(|s| s.lag == Some(0)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_loses_no_acknowledged_write() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    // A client writes continuously, trying the servers in turn on failure,
    // and remembers only what was acknowledged.
    let endpoints = std::sync::Arc::new(std::sync::Mutex::new(zone.endpoints()));
    let writer = testbed::zone::start_writer(endpoints, zone.pki.admin().clone(), "k");
    // The leader dies under load: once a hundred writes are acknowledged.
    writer.wait_more(100).await;
    zone.kill9(leader);
    let new_leader = zone.wait_leader().await;
    assert_ne!(new_leader, leader);
    // Writes resume under the new leader.
    let before = zone
        .status(new_leader)
        .await
        .unwrap()
        .leader()
        .unwrap()
        .commit;
    poll(
        Duration::from_secs(15),
        "writes to resume after the leader died",
        || async {
            let now = zone.status(new_leader).await?.leader()?.commit;
            (now >= before + 20).then_some(())
        },
    )
    .await;
    let (acked, errors) = writer.finish().await;
    assert!(
        acked.len() > 20,
        "too few writes acknowledged: {} (errors {errors})",
        acked.len()
    );

    // Every acknowledged write is readable on both survivors.
    for i in (0..3).filter(|&i| i != leader) {
        let have = zone.mod_revisions(i, b"k", false).await;
        for (k, rev) in &acked {
            assert_eq!(
                have.get(k),
                Some(rev),
                "server {i} lost acknowledged write {k}"
            );
        }
    }

    // The killed server restarts, catches up, and serves the same data.
    zone.launch(leader);
    let target_rev = zone
        .status(new_leader)
        .await
        .unwrap()
        .leader()
        .unwrap()
        .revision;
    poll(
        Duration::from_secs(30),
        "the restarted server to catch up",
        || async {
            let v = zone.status(leader).await?;
            let me = v.servers.iter().find(|s| s.id == zone.servers[leader].id)?;
            (me.state == "follower" && me.revision >= target_rev).then_some(())
        },
    )
    .await;
    for (k, _) in acked.iter().step_by(7) {
        assert!(
            zone.value(leader, k, true).await.is_some(),
            "restarted server misses {k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_stop_and_start_keeps_every_acknowledged_write() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let mut kv = zone.kv(leader).await;
    for n in 0..50 {
        kv.put(put(&format!("p{n:03}"), &n.to_string()))
            .await
            .unwrap();
    }
    let rev = zone.revision(leader).await;
    // No clean shutdown: SIGKILL all three at once.
    for i in 0..3 {
        zone.kill9(i);
    }
    for i in 0..3 {
        zone.launch(i);
    }
    zone.wait_leader().await;
    for i in 0..3 {
        let r = zone.range(i, b"p", false).await;
        assert_eq!(r.kvs.len(), 50, "server {i} after restart");
        assert!(r.header.unwrap().revision >= rev);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let mut zone = TestZone::start(3, "[limits]\nmax_value_bytes = 1000\n");
    let leader = zone.wait_leader().await;
    let follower = (leader + 1) % 3;
    let mut kv = zone.kv(follower).await;
    kv.put(put("keep", "original")).await.unwrap();
    let rev = |r: Option<zonectl::v1::ResponseHeader>| r.unwrap().revision;
    let before = rev(kv
        .get(get("keep", false))
        .await
        .unwrap()
        .into_inner()
        .header);

    let e = kv.put(put("keep", &"x".repeat(1001))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "value: 1001 bytes is over the limit of 1000 bytes"
    );

    let e = kv.put(put("", "v")).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "key: must not be empty")
    );

    let e = kv.put(put(&"k".repeat(4097), "v")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("key: 4097 bytes"),
        "{}",
        e.message()
    );

    let malformed = TxnRequest {
        compare: vec![Compare {
            key: b"keep".to_vec(),
            target: compare::Target::Value as i32,
            op: compare::Op::Equal as i32,
            target_value: Some(compare::TargetValue::ModRevision(1)),
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::Put(put("keep", "changed"))),
        }],
        failure: vec![],
    };
    let e = kv.txn(malformed).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "compare[0].value: target VALUE needs the field value set, and only it"
    );
    let no_op = TxnRequest {
        compare: vec![Compare {
            key: b"keep".to_vec(),
            target: compare::Target::Version as i32,
            op: compare::Op::Unspecified as i32,
            target_value: Some(compare::TargetValue::Version(1)),
        }],
        ..Default::default()
    };
    let e = kv.txn(no_op).await.unwrap_err();
    assert_eq!(
        e.message(),
        "compare[0].op: must be EQUAL, NOT_EQUAL, LESS or GREATER"
    );
    let bad_branch = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::Put(put("", "x"))),
        }],
        ..Default::default()
    };
    let e = kv.txn(bad_branch).await.unwrap_err();
    assert_eq!(e.message(), "success[0].put.key: must not be empty");

    // Nothing changed, on any server, and every server still serves.
    for i in 0..3 {
        let r = zone
            .kv(i)
            .await
            .get(get("keep", false))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.kv.unwrap().value, b"original");
        assert_eq!(rev(r.header), before, "server {i}: revision moved");
        assert!(zone.servers[i].is_running());
    }

    // A watch from a compacted revision names the oldest one available:
    // covered in the unit tests of kv; here, a watch from the future waits
    // and a watch from 1 replays.
    let mut w = kv
        .watch(WatchRequest {
            prefix: b"kee".to_vec(),
            start_revision: 1,
            prev_kv: false,
        })
        .await
        .unwrap()
        .into_inner();
    let first = w.message().await.unwrap().unwrap();
    assert!(
        first.events.is_empty(),
        "the first message confirms the watch"
    );
    let replay = w.message().await.unwrap().unwrap();
    assert_eq!(replay.events[0].kv.as_ref().unwrap().key, b"keep");
    kv.put(put("keeper", "live")).await.unwrap();
    let live = w.message().await.unwrap().unwrap();
    assert_eq!(live.events[0].kv.as_ref().unwrap().value, b"live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_names_the_oldest() {
    let mut zone = TestZone::start(1, "[limits]\nwatch_history = 8\n");
    zone.wait_leader().await;
    let mut kv = zone.kv(0).await;
    for n in 0..40 {
        kv.put(put("w", &n.to_string())).await.unwrap();
    }
    let e = kv
        .watch(WatchRequest {
            prefix: b"w".to_vec(),
            start_revision: 2,
            prev_kv: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    let floor: u64 = e
        .message()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no revision at the end of: {}", e.message()));
    assert!(e
        .message()
        .starts_with("start_revision 2 has been compacted; the oldest revision available is "));
    assert!((30..=40).contains(&floor), "floor {floor}");
    // From the floor itself, the watch works and replays up to 40.
    let mut w = kv
        .watch(WatchRequest {
            prefix: b"w".to_vec(),
            start_revision: floor,
            prev_kv: false,
        })
        .await
        .unwrap()
        .into_inner();
    w.message().await.unwrap().unwrap();
    let replay = w.message().await.unwrap().unwrap();
    assert_eq!(replay.events.len() as u64, 40 - floor + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_clean_sigterm() {
    let mut zone = TestZone::start(1, "");
    zone.wait_leader().await;
    let ch = zone.channel(0).await;
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    // Health is worked out a moment after the election (a read barrier).
    for service in ["", "zone.v1.KV", "zone.v1.Cluster"] {
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        testbed::zone::poll(Duration::from_secs(10), service, || {
            let mut h = health.clone();
            async move {
                let r = h
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (r.status == serving).then_some(())
            }
        })
        .await;
    }
    // Reflection, v1 and v1alpha, lists what this port serves, and only
    // that (not the peer port's zone.v1.Peer, nor the agent socket's).
    let served = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "zone.v1.Cluster",
        "zone.v1.Config",
        "zone.v1.Join",
        "zone.v1.KV",
        "zone.v1.Storage",
        "zone.v1.Users",
    ];
    // The same call in both versions: their generated types differ.
    macro_rules! list_services {
        ($version:ident, $ch:expr) => {{
            use tonic_reflection::pb::$version::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut resp = ServerReflectionClient::new($ch)
                .server_reflection_info(tokio_stream::iter(vec![req]))
                .await
                .expect(concat!("reflection ", stringify!($version), " is served"))
                .into_inner();
            let Some(MessageResponse::ListServicesResponse(list)) =
                resp.message().await.unwrap().unwrap().message_response
            else {
                panic!("not a service list");
            };
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }};
    }
    assert_eq!(list_services!(v1, ch.clone()), served, "reflection v1");
    assert_eq!(list_services!(v1alpha, ch), served, "reflection v1alpha");

    zone.kv(0).await.put(put("before-term", "1")).await.unwrap();
    let status = zone.terminate(0);
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(zone.log(0).contains("zoned stopped cleanly"));
    zone.launch(0);
    zone.wait_leader().await;
    assert_eq!(
        zone.value(0, "before-term", false).await.as_deref(),
        Some(&b"1"[..])
    );
}

#[test]
fn malformed_config_is_rejected_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let cases = [
        (
            "[raft]\ntick_ms = \"fast\"\n",
            "raft.tick_ms: invalid type: string \"fast\", expected u64",
        ),
        ("[node]\nid = 0\n", "node.id: must be at least 1"),
        (
            "[raft]\nelection_ticks = 1\n",
            "raft.election_ticks: must be greater than raft.heartbeat_ticks (2)",
        ),
        ("[nodes]\nid = 1\n", "nodes: unknown field `nodes`"),
    ];
    for (text, want) in cases {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(testbed::binary("zoned"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(
            stderr.contains(want),
            "for {text:?}: wanted {want:?} in {stderr:?}"
        );
    }
    // Nothing was created for a rejected config.
    assert!(!dir.path().join("db").exists());
}

#[test]
fn voters_given_as_flags_replace_the_configured_ones() {
    let dir = tempfile::tempdir().unwrap();
    let run = |voters: &[&str]| {
        let mut cmd = std::process::Command::new(testbed::binary("zoned"));
        cmd.args(["--id", "2", "--data-dir"])
            .arg(dir.path().join("data"));
        for v in voters {
            cmd.args(["--voters", v]);
        }
        let out = cmd.arg("--check-config").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    // A list, and the flag given again.
    let (code, stdout, stderr) = run(&["1=127.0.0.1:7401,2=127.0.0.2:7401", "3=127.0.0.3:7401"]);
    assert_eq!(code, Some(0), "{stderr}");
    let config: toml::Value = toml::from_str(&stdout).unwrap();
    let voters: Vec<(i64, &str)> = config["voters"]
        .as_array()
        .expect("voters in the effective configuration")
        .iter()
        .map(|v| (v["id"].as_integer().unwrap(), v["peer"].as_str().unwrap()))
        .collect();
    assert_eq!(
        voters,
        [
            (1, "127.0.0.1:7401"),
            (2, "127.0.0.2:7401"),
            (3, "127.0.0.3:7401")
        ]
    );
    // A bad one is named, and nothing starts.
    let (code, _, stderr) = run(&["1=127.0.0.1:7401,x=127.0.0.2:7401"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--voters") && stderr.contains("'x' is not a node id"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_read_is_served_by_an_isolated_follower_only_when_asked() {
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    zone.kv(leader).await.put(put("s", "1")).await.unwrap();
    let f = (leader + 1) % 3;
    poll(Duration::from_secs(10), "follower to apply", || async {
        (zone.value(f, "s", true).await.as_deref() == Some(&b"1"[..])).then_some(())
    })
    .await;
    // Stop the two others: the follower has no quorum.
    for i in (0..3).filter(|&i| i != f) {
        zone.kill9(i);
    }
    assert_eq!(zone.value(f, "s", true).await.as_deref(), Some(&b"1"[..]));
    let mut req = tonic::Request::new(get("s", false));
    req.set_timeout(Duration::from_secs(3));
    let e = zone.kv(f).await.get(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "a linearizable read without quorum must fail: {e:?}"
    );
}

/// Issue 20, defect 1: a write through a follower whose leader freezes
/// (SIGSTOP: a hung process, a paused VM) is sent again to the next leader
/// as soon as there is one (it carries a request id, so it cannot be
/// applied twice), instead of waiting out its whole deadline; and it is
/// applied once. On the old code it waited until the deadline and failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_of_a_frozen_leader_goes_to_the_next_one_once() {
    use nix::sys::signal::Signal;
    let mut zone = TestZone::start(3, "");
    let leader = zone.wait_leader().await;
    let follower = (leader + 1) % 3;
    let mut kv = zone.kv(follower).await;
    kv.put(put("warm", "1")).await.unwrap();
    zone.signal(leader, Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let mut req = tonic::Request::new(put("during-freeze", "1"));
    req.set_timeout(Duration::from_secs(8));
    let r = kv.put(req).await;
    let took = started.elapsed();
    zone.signal(leader, Signal::SIGCONT);
    eprintln!("the write through server {follower} took {took:?}");
    r.unwrap_or_else(|e| panic!("the write failed after {took:?}: {e}"));
    // An election takes 0.5-1 s here (ticks of 50 ms, 10 to 20 of them).
    assert!(
        took < Duration::from_secs(4),
        "the write waited {took:?} for a frozen leader"
    );
    let rev = zone.revision(follower).await;
    for i in 0..3 {
        poll(
            Duration::from_secs(20),
            "every server to catch up",
            || async { (zone.own_row(i).await?.revision >= rev).then_some(()) },
        )
        .await;
        let r = zone.range(i, b"during-freeze", true).await;
        assert_eq!(r.kvs.len(), 1);
        assert_eq!(r.kvs[0].version, 1, "server {i}: applied more than once");
    }
}
