//! Managed configuration files in the store, on three real servers: every
//! push checked on the server (a refused one changes nothing anywhere),
//! versions and history, rollback, and the same answers from every server.

use testbed::zone::TestZone;
use tonic::Code;
use zone_proto::v1::{
    config_client::ConfigClient, DeleteFileRequest, FileHistoryRequest, GetFileRequest,
    ListFilesRequest, ManagedFile, PushFileRequest, RollbackRequest,
};

const EXTRA: &str = "[files]\nmanaged_roots = [\"/etc/zoned/managed\", \"/etc/one\"]\nmax_file_bytes = 64\nmax_total_bytes = 80\nhistory_per_file = 3\n";

fn file(path: &str, content: &str) -> ManagedFile {
    ManagedFile {
        path: path.into(),
        content: content.as_bytes().to_vec(),
        ..ManagedFile::default()
    }
}

async fn push(
    c: &mut ConfigClient<tonic::transport::Channel>,
    f: ManagedFile,
) -> Result<zone_proto::v1::PushFileResponse, tonic::Status> {
    c.push(PushFileRequest { file: Some(f) })
        .await
        .map(|r| r.into_inner())
}

async fn get(
    c: &mut ConfigClient<tonic::transport::Channel>,
    path: &str,
) -> Result<ManagedFile, tonic::Status> {
    let r = c
        .get(GetFileRequest { path: path.into() })
        .await?
        .into_inner();
    Ok(r.file.unwrap_or_default())
}

async fn rollback(
    c: &mut ConfigClient<tonic::transport::Channel>,
    to_revision: u64,
) -> Result<zone_proto::v1::RollbackResponse, tonic::Status> {
    c.rollback(RollbackRequest { to_revision })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_checked_versioned_and_rolled_back() {
    let mut zone = TestZone::start(3, EXTRA);
    let leader = zone.wait_leader().await;
    let follower = (leader + 1) % 3;
    // Through a follower: it checks, then forwards the write.
    let mut c = ConfigClient::new(zone.channel(follower).await);

    let mut oned = file("/etc/one/oned.conf", "SERVER_ID = {{id0}}\n");
    oned.template = true;
    oned.restart_units = vec!["opennebula.service".into()];
    let r1 = push(&mut c, oned.clone()).await.unwrap();
    assert!(r1.changed);
    let v1 = r1.file.unwrap();
    assert_eq!((v1.version, v1.mode, v1.size), (1, 0o644, 20));
    // The same again: nothing written.
    let again = push(&mut c, oned.clone()).await.unwrap();
    assert!(!again.changed);
    assert_eq!(again.file.unwrap().version, 1);

    // Refused pushes, each naming its field; none changes the store.
    let kv_before = zone.range(leader, b"", false).await;
    let refused = [
        (file("/etc/shadow", "x"), "file.path"),
        (file("/etc/one/../shadow", "x"), "file.path"),
        (file("/etc/onevil/x", "x"), "file.path"),
        (
            file("/etc/one/big", &"x".repeat(65)),
            "files.max_file_bytes",
        ),
        (
            ManagedFile {
                template: true,
                ..file("/etc/one/t", "{{ hostname }}")
            },
            "template line 1, column 1",
        ),
        (
            ManagedFile {
                restart_units: vec!["a/b".into()],
                ..file("/etc/one/u", "x")
            },
            "file.restart_units",
        ),
    ];
    for (f, want) in refused {
        let e = push(&mut c, f.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}: {e:?}", f.path);
        assert!(e.message().contains(want), "{}: {}", f.path, e.message());
    }
    // 20 bytes stored; 64 more is within the file limit but not the total.
    let e = push(&mut c, file("/etc/one/sched.conf", &"y".repeat(64)))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("files.max_total_bytes"),
        "{}",
        e.message()
    );
    let kv_after = zone.range(leader, b"", false).await;
    assert_eq!(
        kv_before.header.unwrap().revision,
        kv_after.header.unwrap().revision,
        "a refused push changed the store"
    );

    // Version 2, then another file, then a deletion.
    let r2 = push(
        &mut c,
        ManagedFile {
            content: b"SERVER_ID = {{id0}}\nLOG = 3\n".to_vec(),
            ..oned.clone()
        },
    )
    .await
    .unwrap();
    let v2 = r2.file.unwrap();
    assert_eq!(v2.version, 2);
    let sched = push(&mut c, file("/etc/one/sched.conf", "LIVE_RESCHEDS = 1\n"))
        .await
        .unwrap()
        .file
        .unwrap();
    let gone = c
        .delete(DeleteFileRequest {
            path: "/etc/one/sched.conf".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.deleted);

    // Every server answers the same.
    for i in 0..3 {
        let mut ci = ConfigClient::new(zone.channel(i).await);
        let list = ci.list(ListFilesRequest {}).await.unwrap().into_inner();
        let paths: Vec<&str> = list.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["/etc/one/oned.conf"], "server {i}");
        assert!(
            list.files[0].content.is_empty(),
            "a listing carries no content"
        );
        let got = get(&mut ci, "/etc/one/oned.conf").await.unwrap();
        assert_eq!(got.content, b"SERVER_ID = {{id0}}\nLOG = 3\n");
        assert_eq!(got.restart_units, vec!["opennebula.service"]);
    }
    let hist = c
        .history(FileHistoryRequest::default())
        .await
        .unwrap()
        .into_inner()
        .versions;
    let seen: Vec<(String, u64, bool)> = hist
        .iter()
        .map(|v| (v.path.clone(), v.version, v.deleted))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("/etc/one/sched.conf".into(), 2, true),
            ("/etc/one/sched.conf".into(), 1, false),
            ("/etc/one/oned.conf".into(), 2, false),
            ("/etc/one/oned.conf".into(), 1, false),
        ]
    );

    // Back to right after sched.conf was created: oned.conf version 2
    // stays (it is older), sched.conf comes back.
    let rb = rollback(&mut c, sched.revision).await.unwrap();
    assert_eq!(rb.changed, vec!["/etc/one/sched.conf"]);
    // Back to version 1: oned.conf restored, sched.conf removed.
    let rb = rollback(&mut c, v1.revision).await.unwrap();
    assert_eq!(
        rb.changed,
        vec!["/etc/one/oned.conf", "/etc/one/sched.conf"]
    );
    let got = get(&mut c, "/etc/one/oned.conf").await.unwrap();
    assert_eq!(got.content, b"SERVER_ID = {{id0}}\n");
    assert_eq!(got.version, 3, "a rollback is a new version");
    let e = get(&mut c, "/etc/one/sched.conf").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Only three versions are kept per file: push two more and the first
    // falls out, so going back before it is refused with the oldest
    // revision that can be restored.
    for n in 0..2 {
        push(&mut c, file("/etc/one/oned.conf", &format!("v{n}\n")))
            .await
            .unwrap();
    }
    let e = rollback(&mut c, v1.revision).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("oldest revision that can be restored"),
        "{}",
        e.message()
    );
}

/// Issue 20, defect 11: the managed files' records are the Config
/// service's alone. A key-value write there (a put, a delete, a delete by
/// a prefix covering them, inside a transaction too) would bypass every
/// file check; it is refused with PERMISSION_DENIED naming the field, and
/// changes nothing. zone-sync's reports beside them stay writable. On the
/// old code the put was applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_writes_to_the_managed_files_records_are_refused() {
    use zone_proto::v1::{request_op, DeleteRequest, PutRequest, RequestOp, TxnRequest};
    let mut zone = TestZone::start(3, EXTRA);
    let leader = zone.wait_leader().await;
    let mut c = ConfigClient::new(zone.channel(leader).await);
    push(&mut c, file("/etc/one/oned.conf", "A = 1\n"))
        .await
        .unwrap();
    let before = zone.revision(leader).await;
    let put = |k: &str| PutRequest {
        key: k.into(),
        value: b"x".to_vec(),
        prev_kv: false,
    };
    let del = |k: &str, prefix: bool| DeleteRequest {
        key: k.into(),
        prefix,
        prev_kv: false,
    };
    let mut kv = zone.kv((leader + 1) % 3).await;
    let e = kv
        .put(put("zone/config/file/etc/one/oned.conf"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .starts_with("key: 'zone/config/file/etc/one/oned.conf'"),
        "{}",
        e.message()
    );
    for (what, e) in [
        ("gen", kv.put(put("zone/config/gen")).await.unwrap_err()),
        (
            "hist",
            kv.delete(del("zone/config/hist", true)).await.unwrap_err(),
        ),
        ("zone/", kv.delete(del("zone/", true)).await.unwrap_err()),
        (
            "file",
            kv.delete(del("zone/config/file/etc/one/oned.conf", false))
                .await
                .unwrap_err(),
        ),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    }
    let txn = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::Put(put("zone/config/file/etc/one/x"))),
        }],
        ..TxnRequest::default()
    };
    let e = kv.txn(txn).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().starts_with("success[0].put.key: "),
        "{}",
        e.message()
    );
    assert_eq!(
        zone.revision(leader).await,
        before,
        "a refused write changed the store"
    );
    let f = get(&mut c, "/etc/one/oned.conf").await.unwrap();
    assert_eq!(f.content, b"A = 1\n");
    // zone-sync's report keys are not the Config service's.
    kv.put(put("zone/config/status/9")).await.unwrap();
    kv.put(put("zone/other")).await.unwrap();
}
