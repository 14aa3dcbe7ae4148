//! Who may speak to a zone: the bad inputs of the security model, each
//! against a real three-server zone with TLS on both ports (the test
//! zone's own CA, `testbed::pki`).
//!
//! Each test checks both halves: the call is refused with a reason, and
//! nothing changed (no key written, no file pushed, the same leader in the
//! same term, every server still running).

use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rustls_pki_types::pem::PemObject as _;
use testbed::pki::TestPki;
use testbed::zone::TestZone;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use zone_proto::v1::{
    config_client::ConfigClient, join_client::JoinClient, kv_client::KvClient,
    peer_client::PeerClient, AddServerRequest, GetRequest, JoinRequest, JoinResponse,
    JoinTokenRequest, ManagedFile, MembersRequest, PushFileRequest, PutRequest, RaftBatch,
    RemovedNotice, SnapshotChunk,
};
use zonectl::zone_pki::{JoinKey, JoinToken, Role, ZoneCa, SERVER_SUFFIX};

const FILES: &str = "[files]\nmanaged_roots = [\"/etc/zoned/managed\"]\n";

fn put(key: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        prev_kv: false,
    }
}

/// The value of `key` on server `i`, read linearizably as the admin.
async fn value(zone: &TestZone, i: usize, key: &str) -> Option<Vec<u8>> {
    zone.value(i, key, false).await
}

/// A channel to server `i`'s `port` (7400 or 7401) that trusts the test
/// zone's CA and presents the certificate in `dir` (`node.pem`/`node.key`
/// or `client.pem`/`client.key`).
fn channel_with(
    zone: &TestZone,
    i: usize,
    peer: bool,
    ca_pem: &str,
    cert: (&str, &str),
) -> Channel {
    let s = &zone.servers[i];
    let (addr, name) = if peer {
        (s.peer, format!("{}{SERVER_SUFFIX}", s.id))
    } else {
        (s.client, zonectl::zone_pki::ANY_SERVER.to_owned())
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert.0, cert.1))
        .domain_name(name);
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

fn read_pair(dir: &std::path::Path, cert: &str, key: &str) -> (String, String) {
    (
        std::fs::read_to_string(dir.join(cert)).unwrap(),
        std::fs::read_to_string(dir.join(key)).unwrap(),
    )
}

/// A peer client of server `i` as the holder of node certificate `dir`.
fn peer_as(zone: &TestZone, i: usize, dir: &std::path::Path) -> PeerClient<Channel> {
    let (c, k) = read_pair(dir, "node.pem", "node.key");
    PeerClient::new(channel_with(
        zone,
        i,
        true,
        zone.pki.ca.cert_pem(),
        (&c, &k),
    ))
}

/// The leader's id and term as server `i` sees them.
async fn leader_and_term(zone: &TestZone, i: usize) -> (u64, u64) {
    let v = zone.status(i).await.expect("status");
    let term = v.servers.iter().map(|s| s.term).max().unwrap_or(0);
    (v.leader_id, term)
}

/// Every server runs, under the same leader in the same term as before,
/// and a write is read everywhere.
async fn zone_unaffected(zone: &mut TestZone, before: (u64, u64), key: &str) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..zone.servers.len() {
        assert!(
            zone.servers[i].is_running(),
            "server {} exited; its log:\n{}",
            zone.servers[i].id,
            zone.log(i)
        );
    }
    let l = zone.wait_leader().await;
    assert_eq!(
        leader_and_term(zone, l).await,
        before,
        "the leader or the term changed"
    );
    zone.kv(l)
        .await
        .put(put(key))
        .await
        .expect("a write after the forgeries");
    for i in 0..zone.servers.len() {
        assert_eq!(value(zone, i, key).await.as_deref(), Some(&b"v"[..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_only_health_answers() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let anonymous = zone.channel_as(l, None);
    let health = tonic_health::pb::health_client::HealthClient::new(anonymous.clone());
    // Health is worked out a moment after the election (a read barrier).
    testbed::zone::poll(
        Duration::from_secs(10),
        "SERVING without a certificate",
        || {
            let mut health = health.clone();
            async move {
                let r = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .expect("health answers without a certificate")
                    .into_inner();
                (r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                    .then_some(())
            }
        },
    )
    .await;
    let e = KvClient::new(anonymous.clone())
        .get(GetRequest {
            key: b"k".to_vec(),
            ..GetRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("needs a client credential"),
        "{}",
        e.message()
    );
    let e = KvClient::new(anonymous).put(put("anon")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(value(&zone, l, "anon").await, None);
}

/// The call failed below gRPC: the connection was closed at the TLS
/// handshake, and no server answered it (a gRPC refusal would carry a
/// status from the server, with its headers).
fn refused_at_handshake(e: &tonic::Status) {
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{e:?}"
    );
    assert!(e.metadata().is_empty(), "a server answered: {e:?}");
    assert!(
        std::error::Error::source(e).is_some(),
        "not a transport error: {e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_zone_is_refused_at_the_handshake_on_both_ports() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let before = leader_and_term(&zone, l).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestPki::new(other_dir.path());
    // Client port: an admin credential of another zone.
    let admin = other.admin();
    let ch = channel_with(
        &zone,
        l,
        false,
        zone.pki.ca.cert_pem(),
        (&admin.cert_pem, &admin.key_pem),
    );
    let e = KvClient::new(ch).put(put("foreign")).await.unwrap_err();
    refused_at_handshake(&e);
    // Peer port: a node certificate of another zone naming a member's id.
    let f = (l + 1) % 3;
    let foreign = other.server(zone.servers[f].id);
    let e = removal_as(&zone, l, &foreign, zone.servers[l].id).await;
    refused_at_handshake(&e);
    // And zonectl says so in a sentence.
    let out = std::process::Command::new(testbed::binary("zonectl"))
        .arg("--credentials")
        .arg(other_dir.path().join("user-admin"))
        .args(["--endpoints", &zone.servers[l].endpoint(), "kv", "get", "x"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not signed by the zone CA"), "{stderr}");
    zone_unaffected(&mut zone, before, "after-foreign").await;
    assert_eq!(value(&zone, l, "foreign").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_refused_what_it_does_not_cover_and_nothing_changes() {
    let mut zone = TestZone::start(3, FILES);
    let l = zone.wait_leader().await;
    let reader = zone.pki.user("rita", Role::Reader);
    let ch = zonectl::endpoint(&zone.servers[l].endpoint(), Some(&reader))
        .unwrap()
        .connect_lazy();
    // A reader reads...
    zone.kv(l).await.put(put("seen")).await.unwrap();
    let r = KvClient::new(ch.clone())
        .get(GetRequest {
            key: b"seen".to_vec(),
            ..GetRequest::default()
        })
        .await
        .expect("a reader reads");
    assert_eq!(r.into_inner().kv.unwrap().value, b"v");
    // ...but neither writes nor pushes configuration.
    let e = KvClient::new(ch.clone())
        .put(put("by-reader"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "zone.v1.KV/Put needs the operator role; rita has reader"
    );
    let e = ConfigClient::new(ch)
        .push(PushFileRequest {
            file: Some(ManagedFile {
                path: "/etc/zoned/managed/x.conf".into(),
                content: b"x=1\n".to_vec(),
                ..ManagedFile::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("needs the operator role"),
        "{}",
        e.message()
    );
    assert_eq!(value(&zone, l, "by-reader").await, None);
    let files = ConfigClient::new(zone.channel(l).await)
        .list(zone_proto::v1::ListFilesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(files.files.is_empty(), "a reader's push landed: {files:?}");
    // An operator writes but does not change the membership.
    let operator = zone.pki.user("otto", Role::Operator);
    let ch = zonectl::endpoint(&zone.servers[l].endpoint(), Some(&operator))
        .unwrap()
        .connect_lazy();
    KvClient::new(ch.clone())
        .put(put("by-operator"))
        .await
        .expect("an operator writes");
    let e = zone_proto::v1::cluster_client::ClusterClient::new(ch)
        .add_server(AddServerRequest {
            id: 7,
            name: "zone-7".into(),
            peer: "127.0.0.1:7401".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "zone.v1.Cluster/AddServer needs the admin role; otto has operator"
    );
    let members = zone
        .cluster(l)
        .await
        .members(zone_proto::v1::MembersRequest {})
        .await
        .unwrap();
    assert_eq!(members.into_inner().members.len(), 3);
    // The zonectl binary says the same.
    let out = std::process::Command::new(testbed::binary("zonectl"))
        .arg("--credentials")
        .arg(zone.pki.user_dir("rita", Role::Reader))
        .args([
            "--endpoints",
            &zone.servers[l].endpoint(),
            "kv",
            "put",
            "k",
            "v",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("PermissionDenied: zone.v1.KV/Put needs the operator role; rita has reader"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_servers_are_each_refused_on_the_others_port() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let before = leader_and_term(&zone, l).await;
    let f = (l + 1) % 3;
    // An admin's credential on a follower's peer port, telling it it was
    // removed: the one call that made a server exit for good.
    let admin = zone.pki.admin().clone();
    let ch = channel_with(
        &zone,
        f,
        true,
        zone.pki.ca.cert_pem(),
        (&admin.cert_pem, &admin.key_pem),
    );
    let e = PeerClient::new(ch)
        .removed(RemovedNotice {
            index: u64::MAX,
            leader_id: zone.servers[l].id,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("takes only the zone's servers"),
        "{}",
        e.message()
    );
    // A member's node certificate used as a client, to write.
    let node = zone.pki.server(zone.servers[f].id);
    let (c, k) = read_pair(&node, "node.pem", "node.key");
    let ch = channel_with(&zone, l, false, zone.pki.ca.cert_pem(), (&c, &k));
    let e = KvClient::new(ch).put(put("by-node")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("node certificate is not a client credential"),
        "{}",
        e.message()
    );
    zone_unaffected(&mut zone, before, "after-ports").await;
    assert_eq!(value(&zone, l, "by-node").await, None);
}

/// Sends `msg` on server `i`'s peer port as the holder of `dir`'s node
/// certificate; the refusal it must get.
async fn raft_as(zone: &TestZone, i: usize, dir: &std::path::Path, msg: Message) -> tonic::Status {
    let batch = RaftBatch {
        messages: vec![msg.write_to_bytes().unwrap()],
    };
    let r = peer_as(zone, i, dir)
        .raft(tokio_stream::iter(vec![batch]))
        .await;
    r.expect_err("a forged Raft message was taken")
}

/// Tells server `i`, as the holder of `dir`, that it was removed by
/// `leader_id`; the refusal it must get.
async fn removal_as(
    zone: &TestZone,
    i: usize,
    dir: &std::path::Path,
    leader_id: u64,
) -> tonic::Status {
    let r = peer_as(zone, i, dir)
        .removed(RemovedNotice {
            index: u64::MAX,
            leader_id,
        })
        .await;
    r.expect_err("a forged removal was taken")
}

fn message(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_removal_votes_and_appends_change_nothing() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let before = leader_and_term(&zone, l).await;
    let (leader_id, term) = before;
    let f = (l + 1) % 3;
    let g = (l + 2) % 3;
    let (fid, gid) = (zone.servers[f].id, zone.servers[g].id);

    // A certificate of this zone for a server that was never added.
    let stranger = zone.pki.server(9);
    let e = removal_as(&zone, f, &stranger, leader_id).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(e.message(), "server 9 is not a member of the zone");
    let mut vote = message(MessageType::MsgRequestVote, 9, fid, term + 100);
    vote.log_term = term + 100;
    vote.index = 1 << 40;
    let e = raft_as(&zone, f, &stranger, vote).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut append = message(MessageType::MsgAppend, 9, fid, term + 100);
    append.commit = 1 << 40;
    let e = raft_as(&zone, f, &stranger, append).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A member speaking for another: follower g sends, as the leader, an
    // append with a commit far ahead, and a vote in the transfer's name
    // (the context that skipped the lease check).
    let member = zone.pki.server(gid);
    let mut append = message(MessageType::MsgAppend, leader_id, fid, term);
    append.commit = 1 << 40;
    let e = raft_as(&zone, f, &member, append).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("speaks only for itself"),
        "{}",
        e.message()
    );
    let mut vote = message(MessageType::MsgRequestVote, leader_id, fid, term + 1);
    vote.context = b"CampaignTransfer".to_vec().into();
    let e = raft_as(&zone, f, &member, vote).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A member giving notice of a removal in the leader's name.
    let e = removal_as(&zone, f, &member, leader_id).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("on behalf of server"),
        "{}",
        e.message()
    );
    zone_unaffected(&mut zone, before, "after-forgeries").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_peer_message_and_a_huge_snapshot_announcement_are_refused() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let before = leader_and_term(&zone, l).await;
    let (leader_id, term) = before;
    let f = (l + 1) % 3;
    let fid = zone.servers[f].id;
    let me = zone.pki.server(leader_id);
    // One message larger than the peer port takes (256 MiB).
    let huge = RaftBatch {
        messages: vec![vec![0u8; 257 << 20]],
    };
    let e = peer_as(&zone, f, &me)
        .max_encoding_message_size(usize::MAX)
        .raft(tokio_stream::iter(vec![huge]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange
                | Code::ResourceExhausted
                | Code::Internal
                | Code::Unknown
                | Code::Cancelled
        ),
        "{e:?}"
    );
    // A snapshot announced as 2^63 bytes: refused before its data is read.
    let mut header = message(MessageType::MsgSnapshot, leader_id, fid, term);
    header.mut_snapshot().mut_metadata().index = 1 << 40;
    header.mut_snapshot().mut_metadata().term = term;
    let chunk = |total_size: u64, data: Vec<u8>| SnapshotChunk {
        message: header.write_to_bytes().unwrap(),
        data,
        total_size,
    };
    let e = peer_as(&zone, f, &me)
        .snapshot(tokio_stream::iter(vec![chunk(1 << 63, vec![7u8; 1024])]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("over this server's limits.max_snapshot_mb (4096 MiB)"),
        "{}",
        e.message()
    );
    // Within the limit, but sending more than it announced: cut off at
    // the announced size.
    let e = peer_as(&zone, f, &me)
        .snapshot(tokio_stream::iter(vec![
            chunk(2048, vec![7u8; 1024]),
            chunk(2048, vec![7u8; 4096]),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("more data than announced"),
        "{}",
        e.message()
    );
    zone_unaffected(&mut zone, before, "after-oversize").await;
}

/// Runs the zonectl binary against server `i` with the credentials in `dir`.
fn zonectl_as(
    zone: &TestZone,
    i: usize,
    dir: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(testbed::binary("zonectl"))
        .arg("--credentials")
        .arg(dir)
        .args(["--endpoints", &zone.servers[i].endpoint()])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_credential_works_within_its_role_until_revoked() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let f = (l + 1) % 3;
    let admin = zone.pki.admin_dir();
    let out = zone.root.path().join("rita");
    // An admin issues a reader credential through a follower (it signs:
    // founders hold the CA's key).
    let o = zonectl_as(
        &zone,
        f,
        &admin,
        &[
            "-o",
            "json",
            "user",
            "issue",
            "--name",
            "rita",
            "--role",
            "reader",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let issued: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let serial = issued["serial"].as_str().unwrap().to_owned();
    assert_eq!(issued["role"], "reader");
    assert_eq!(issued["issued_by"], "admin");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("client.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // It reads, and is refused a write.
    zone.kv(l).await.put(put("k")).await.unwrap();
    let o = zonectl_as(&zone, l, &out, &["kv", "get", "k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = zonectl_as(&zone, l, &out, &["kv", "put", "k", "w"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs the operator role; rita has reader"));
    // A reader cannot issue or list; a write under zone/users/ is refused
    // to anyone, the admin included (it could clear a revocation).
    let o = zonectl_as(&zone, l, &out, &["user", "ls"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs the admin role"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let e = zone
        .kv(l)
        .await
        .put(put(&format!("zone/users/{serial}")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Listed.
    let o = zonectl_as(&zone, l, &admin, &["user", "ls"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains(&serial) && table.contains("rita") && table.contains("valid"),
        "{table}"
    );
    // A watch rita opened before the revocation, on another server.
    let rita = zonectl::Credentials::from_dir(&out, "rita").unwrap();
    let ch = zonectl::endpoint(&zone.servers[l].endpoint(), Some(&rita))
        .unwrap()
        .connect_lazy();
    let mut watch = KvClient::new(ch)
        .watch(zone_proto::v1::WatchRequest {
            prefix: b"w/".to_vec(),
            start_revision: 0,
            prev_kv: false,
        })
        .await
        .expect("a reader watches")
        .into_inner();
    watch.message().await.expect("the watch's first answer");
    // Revoked through a follower: refused there on its next call (it
    // answers once it applied the revocation itself), and on every server
    // once it applied it.
    let o = zonectl_as(&zone, f, &admin, &["user", "revoke", &serial]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = zonectl_as(&zone, f, &out, &["kv", "get", "k"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("was revoked"),
        "{stderr}"
    );
    for i in 0..3 {
        testbed::zone::poll(
            Duration::from_secs(5),
            "the revocation on every server",
            || async {
                let o = zonectl_as(&zone, i, &out, &["kv", "get", "k"]);
                String::from_utf8_lossy(&o.stderr)
                    .contains("was revoked")
                    .then_some(())
            },
        )
        .await;
    }
    // The watch opened before ends, within a second or so.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked reader's watch went on");
    let e = ended.expect_err("the watch ended without an error");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("was revoked"), "{}", e.message());
    let o = zonectl_as(&zone, l, &admin, &["user", "ls"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // An unknown serial revokes nothing unless said to be unlisted.
    let o = zonectl_as(&zone, l, &admin, &["user", "revoke", "abcdef"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("32 hex digits"), "{stderr}");
    let unknown = "0123456789abcdef0123456789abcdef";
    let o = zonectl_as(&zone, l, &admin, &["user", "revoke", unknown]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
    let o = zonectl_as(&zone, l, &admin, &["user", "ls"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(unknown),
        "an unknown serial was recorded"
    );
    let mallory = zone.pki.user_dir("mallory", Role::Operator);
    let cert = std::fs::read_to_string(mallory.join("client.pem")).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let m_serial = zonectl::zone_pki::presented(&der).unwrap().serial;
    assert!(zonectl_as(&zone, l, &mallory, &["kv", "get", "k"])
        .status
        .success());
    let o = zonectl_as(
        &zone,
        l,
        &admin,
        &["user", "revoke", &m_serial, "--unlisted"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = zonectl_as(&zone, l, &mallory, &["kv", "get", "k"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("was revoked"));
    let _ = zone.wait_leader().await;
}

/// A Join call as a server without a certificate makes it: TLS to server
/// `i`'s client port (checked against the test CA), no client certificate.
async fn join_as(
    zone: &TestZone,
    i: usize,
    token: &str,
    id: u64,
    key: &JoinKey,
) -> Result<JoinResponse, tonic::Status> {
    let proof = match token.parse::<JoinToken>() {
        Ok(t) => key.prove(&t).unwrap(),
        Err(_) => b"no token to sign".to_vec(),
    };
    JoinClient::new(zone.channel_as(i, None))
        .join(JoinRequest {
            token: token.to_owned(),
            id,
            public_key: key.public_key(),
            proof,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn denied_for(r: Result<JoinResponse, tonic::Status>, reason: &str) {
    let e = r.expect_err("the join was let through");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(reason),
        "expected {reason:?} in: {}",
        e.message()
    );
}

async fn issue_token(zone: &TestZone, i: usize, id: u64, ttl_seconds: u64) -> String {
    JoinClient::new(zone.channel(i).await)
        .issue_token(JoinTokenRequest { id, ttl_seconds })
        .await
        .expect("an admin gets a join token")
        .into_inner()
        .token
}

async fn add(zone: &TestZone, i: usize, id: u64, peer: String) {
    zone.add_server(i, id, peer).await;
}

/// Join tokens: a garbled token, another zone's, one for another server,
/// one never issued, a signing request whose signature does not match,
/// an expired token and a replaced one are each refused with its reason
/// and spend nothing (the real token still admits its server afterwards);
/// the server joins with it, gets a certificate for the key it made, and
/// is promoted; the token then refuses another key (used) but signs again
/// for the same one (a lost answer); a zoned started with a spent token
/// exits 2 saying so, and one given another zone's token refuses the
/// member at the handshake, before sending it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_admit_one_server_once_and_bad_tokens_are_refused_with_their_reason() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let via = (l + 1) % 3;
    let four = zone.prepare_token_joiner(4, via);
    add(&zone, l, 4, zone.servers[four].peer.to_string()).await;
    let key = JoinKey::generate().unwrap();

    // Only an admin gets a token.
    let e = JoinClient::new(zone.channel_as(l, Some(&zone.pki.user("otto", Role::Operator))))
        .issue_token(JoinTokenRequest {
            id: 4,
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = JoinClient::new(zone.channel_as(l, None))
        .issue_token(JoinTokenRequest {
            id: 4,
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Not for a server that is not a member.
    let e = JoinClient::new(zone.channel(l).await)
        .issue_token(JoinTokenRequest {
            id: 9,
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Expired: a token of one second, tried after two.
    let short = issue_token(&zone, l, 4, 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    denied_for(join_as(&zone, via, &short, 4, &key).await, "expired token");

    let token = issue_token(&zone, via, 4, 0).await;
    let parsed: JoinToken = token.parse().unwrap();
    assert_eq!(parsed.ca_fingerprint, zone.pki.ca.fingerprint());
    // Replaced: the short one is no longer server 4's token.
    denied_for(
        join_as(&zone, via, &short, 4, &key).await,
        "unknown token: it is not server 4's current join token",
    );
    denied_for(
        join_as(&zone, via, "zjoin1.4.garbage", 4, &key).await,
        "not a join token",
    );
    denied_for(
        join_as(&zone, via, &token, 5, &key).await,
        "wrong server: the token was issued for server 4, and this server is 5",
    );
    let other_zone = ZoneCa::generate().unwrap();
    let foreign = JoinToken::generate(4, &other_zone.fingerprint()).unwrap();
    denied_for(
        join_as(&zone, via, &foreign.to_string(), 4, &key).await,
        "another zone's token",
    );
    let never = JoinToken::generate(4, &zone.pki.ca.fingerprint()).unwrap();
    denied_for(
        join_as(&zone, via, &never.to_string(), 4, &key).await,
        "unknown token",
    );
    // A signing request whose signature is not the key's.
    let thief = JoinKey::generate().unwrap();
    let e = JoinClient::new(zone.channel_as(via, None))
        .join(JoinRequest {
            token: token.clone(),
            id: 4,
            public_key: thief.public_key(),
            proof: key.prove(&parsed).unwrap(),
        })
        .await;
    denied_for(
        e.map(tonic::Response::into_inner),
        "signature does not verify",
    );
    // Nobody writes the records through the key-value API.
    let e = zone.kv(l).await.put(put("zone/join/4")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("the join tokens"), "{}", e.message());

    // The real server joins with the token, none the worse for the
    // refusals above.
    zone.give_token(four, &token);
    zone.launch(four);
    testbed::zone::poll(
        Duration::from_secs(30),
        "server 4 to be a voter",
        || async {
            let r = zone
                .cluster(l)
                .await
                .members(MembersRequest {})
                .await
                .ok()?;
            r.into_inner()
                .members
                .iter()
                .any(|m| m.id == 4 && !m.learner)
                .then_some(())
        },
    )
    .await;
    let tls = zone.tls_dir(four);
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(tls.join(p)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode("node.key"), 0o600);
    assert_eq!(
        zonectl::zone_pki::verify(
            zone.pki.ca.cert_pem(),
            &std::fs::read_to_string(tls.join("node.pem")).unwrap(),
            "server 4's certificate"
        )
        .unwrap(),
        zonectl::zone_pki::Holder::Server(4)
    );
    assert!(
        zone.log(four)
            .contains("joined: this server's node certificate is written"),
        "{}",
        zone.log(four)
    );
    zone.kv(four).await.put(put("after-join")).await.unwrap();
    assert_eq!(
        value(&zone, four, "after-join").await.as_deref(),
        Some(&b"v"[..])
    );

    // Used: another key is refused; the joiner's own key is signed again.
    denied_for(join_as(&zone, l, &token, 4, &key).await, "used token");
    let own = JoinKey::from_pem(&std::fs::read_to_string(tls.join("node.key")).unwrap()).unwrap();
    let again = join_as(&zone, l, &token, 4, &own)
        .await
        .expect("the joiner asking again gets its certificate again");
    assert_eq!(
        zonectl::zone_pki::facts_pem(&again.cert_pem)
            .unwrap()
            .public_key,
        own.public_key()
    );

    // A zoned whose token was spent meanwhile exits 2, naming why.
    let five = zone.prepare_token_joiner(5, via);
    add(&zone, l, 5, zone.servers[five].peer.to_string()).await;
    let token5 = issue_token(&zone, l, 5, 0).await;
    join_as(&zone, via, &token5, 5, &JoinKey::generate().unwrap())
        .await
        .expect("someone else spends server 5's token first");
    zone.give_token(five, &token5);
    zone.launch(five);
    let status = zone.wait_exit(five, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{}", zone.log(five));
    assert!(zone.log(five).contains("used token"), "{}", zone.log(five));
    assert!(!zone.tls_dir(five).join("node.pem").exists());

    // Another zone's token: the member is refused at the handshake (its
    // CA is not the one the token names) and the token never sent.
    let six = zone.prepare_token_joiner(6, via);
    zone.give_token(
        six,
        &JoinToken::generate(6, &other_zone.fingerprint())
            .unwrap()
            .to_string(),
    );
    zone.launch(six);
    let status = zone.wait_exit(six, Duration::from_secs(20));
    assert_ne!(status.code(), Some(0));
    assert!(
        zone.log(six)
            .contains("did not present the zone CA the token names"),
        "{}",
        zone.log(six)
    );
}

/// The certificate server `i`'s client port presents on a new connection
/// (checked against the test CA; no client certificate).
async fn presented(zone: &TestZone, i: usize) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls_pki_types::CertificateDer::from_pem_slice(zone.pki.ca.cert_pem().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(zone.servers[i].client)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(zonectl::zone_pki::ANY_SERVER).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Node certificates with a third of their life left are renewed while
/// the servers run: server 2 holds the CA's key and signs its own; server
/// 3 does not, and a member signs it over the peer port. Each keeps its
/// key, writes the new certificate to node.pem, presents it on the next
/// handshake without a restart, and reports its expiry in the zone's
/// status (zonectl show's column).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_near_their_end_are_renewed_without_a_restart() {
    let mut zone = TestZone::prepare(3, "");
    let hour = Duration::from_secs(3600);
    for id in [2, 3] {
        zone.pki.server_expiring(id, hour, 24 * hour);
    }
    std::fs::remove_file(zone.pki.server(3).join("ca.key")).unwrap();
    let keys: Vec<Vec<u8>> = [2, 3]
        .iter()
        .map(|id| {
            let pem = std::fs::read_to_string(zone.pki.server(*id).join("node.pem")).unwrap();
            zonectl::zone_pki::facts_pem(&pem).unwrap().public_key
        })
        .collect();
    for i in 0..3 {
        zone.launch(i);
    }
    zone.wait_leader().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let soon = now + 2 * 3600;
    assert!(
        zonectl::zone_pki::facts(&presented(&zone, 2).await)
            .unwrap()
            .not_after_unix
            < soon,
        "server 3 starts with its short certificate"
    );
    let year_on = now + 300 * 86_400;
    testbed::zone::poll(
        Duration::from_secs(30),
        "servers 2 and 3 to report renewed certificates",
        || async {
            let v = zone.status(0).await?;
            let renewed = |id| {
                v.servers
                    .iter()
                    .any(|s| s.id == id && s.cert_expires_unix.is_some_and(|t| t > year_on))
            };
            (renewed(2) && renewed(3)).then_some(())
        },
    )
    .await;
    for (i, id) in [(1, 2), (2, 3)] {
        let pem = std::fs::read_to_string(zone.pki.server(id).join("node.pem")).unwrap();
        let facts = zonectl::zone_pki::facts_pem(&pem).unwrap();
        assert!(facts.not_after_unix > year_on, "server {id}'s node.pem");
        assert_eq!(facts.public_key, keys[i - 1], "server {id} keeps its key");
        let seen = zonectl::zone_pki::facts(&presented(&zone, i).await).unwrap();
        assert!(
            seen.not_after_unix > year_on,
            "server {id} presents the renewed certificate"
        );
        assert!(
            zone.log(i)
                .contains("renewed this server's node certificate"),
            "{}",
            zone.log(i)
        );
        assert!(zone.servers[i].is_running(), "server {id} restarted");
    }
    assert!(zone.log(0).contains("renewed a server's node certificate"));
    // The zone works on: server 3 takes a write, every server reads it.
    zone.kv(2).await.put(put("renewed")).await.unwrap();
    for i in 0..3 {
        assert_eq!(value(&zone, i, "renewed").await.as_deref(), Some(&b"v"[..]));
    }
}
