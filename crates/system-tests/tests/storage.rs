//! Shared datastores on a real three-server zone over loopback: the
//! declarations' checks and roles, and zone-mounts mounting, probing and
//! unmounting with real mount(2) calls, each server's zone-mounts in a
//! mount namespace of its own (as on three machines). The NFS cases, hung
//! servers included, are in `vm_cluster.rs` (this host's kernel has no NFS
//! client; the VMs' has). Root only (mount(2),
//! unshare); the test fails with the reason otherwise.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use testbed::zone::{poll, TestZone};
use tonic::Code;
use zone_proto::v1::{
    storage_client::StorageClient, AddDatastoreRequest, Datastore, ListDatastoresRequest,
    PutRequest, RemoveDatastoreRequest, StatusRequest,
};
use zonectl::zone_pki::Role;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "zone-mounts mounts file systems (mount(2)) in mount namespaces of its own (unshare): run the tests as root"
    );
}

/// Starts server `i`'s zone-mounts in a mount namespace of its own.
fn start_mounts(zone: &TestZone, i: usize) -> Child {
    let s = &zone.servers[i];
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private"])
        .arg(testbed::binary("zone-mounts"))
        .arg("--config")
        .arg(s.config_path())
        .arg("--state-dir")
        .arg(s.dir.join("mounts"))
        .arg("--units-dir")
        .arg(s.dir.join("units"));
    testbed::spawn_logged(cmd, &s.dir.join("zone-mounts.log"))
}

/// The mount targets in the mount namespace of process `pid`.
fn targets_of(pid: u32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

fn bind(name: &str, source: &Path, target: &str) -> Datastore {
    Datastore {
        name: name.into(),
        r#type: "bind".into(),
        source: source.to_str().unwrap().into(),
        target: target.into(),
        write_probe: true,
        probe_interval_ms: 300,
        probe_timeout_ms: 2000,
        required: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_declarations_are_refused_naming_the_field_and_nothing_is_stored() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let mut c = StorageClient::new(zone.channel(l).await);
    let good = bind(
        "images",
        Path::new("/srv/images-source"),
        "/srv/zoned-test/images",
    );
    let cases: Vec<(Datastore, &str)> = vec![
        (
            Datastore {
                r#type: "fuse.sshfs".into(),
                ..good.clone()
            },
            "datastore.type: unknown file system type `fuse.sshfs`",
        ),
        (
            Datastore {
                target: "srv/x".into(),
                ..good.clone()
            },
            "datastore.target: `srv/x` is not an absolute path",
        ),
        (
            Datastore {
                target: "/".into(),
                ..good.clone()
            },
            "datastore.target: `/` is the root file system",
        ),
        (
            Datastore {
                target: "/etc".into(),
                ..good.clone()
            },
            "datastore.target: `/etc` is `/etc`",
        ),
        (
            Datastore {
                target: "/usr/share/x".into(),
                ..good.clone()
            },
            "datastore.target: `/usr/share/x` is under `/usr`",
        ),
        (
            Datastore {
                target: "/boot/efi".into(),
                ..good.clone()
            },
            "datastore.target: `/boot/efi` is under `/boot`",
        ),
        (
            Datastore {
                target: "/var/lib/zoned/data".into(),
                ..good.clone()
            },
            "datastore.target: `/var/lib/zoned/data` is under `/var/lib/zoned`",
        ),
        (
            Datastore {
                options: "rw,hard\nro".into(),
                ..good.clone()
            },
            "datastore.options: option 2 `hard\\nro`",
        ),
        (
            Datastore {
                options: "rw -o remount".into(),
                ..good.clone()
            },
            "datastore.options: option 1 `rw -o remount`",
        ),
        (
            Datastore {
                options: "remount,ro".into(),
                ..good.clone()
            },
            "datastore.options: option 1 `remount`: changes another mount",
        ),
        (
            Datastore {
                name: "Images!".into(),
                ..good.clone()
            },
            "datastore.name: `Images!` is not a datastore name",
        ),
        (
            Datastore {
                r#type: "nfs4".into(),
                source: "nas".into(),
                ..good.clone()
            },
            "datastore.source: `nas` is not HOST:/EXPORT",
        ),
    ];
    for (ds, want) in cases {
        let e = c
            .add(AddDatastoreRequest {
                datastore: Some(ds.clone()),
            })
            .await
            .expect_err(&format!("accepted {ds:?}"));
        assert_eq!(e.code(), Code::InvalidArgument, "{ds:?}: {e:?}");
        assert!(
            e.message().starts_with(want),
            "`{}` does not start with `{want}`",
            e.message()
        );
    }
    // Duplicates: the same name differently, the same target, one inside
    // another.
    c.add(AddDatastoreRequest {
        datastore: Some(good.clone()),
    })
    .await
    .unwrap();
    let again = c
        .add(AddDatastoreRequest {
            datastore: Some(good.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.changed, "the same declaration again changes nothing");
    for (ds, want) in [
        (
            Datastore {
                target: "/srv/zoned-test/other".into(),
                ..good.clone()
            },
            "datastore.name: a datastore named `images` is declared already",
        ),
        (
            Datastore {
                name: "copy".into(),
                ..good.clone()
            },
            "datastore.target: `/srv/zoned-test/images` is datastore `images`'s target already",
        ),
        (
            Datastore {
                name: "inner".into(),
                target: "/srv/zoned-test/images/inner".into(),
                ..good.clone()
            },
            "datastore.target: `/srv/zoned-test/images/inner` and datastore `images`'s target",
        ),
        (
            Datastore {
                name: "outer".into(),
                target: "/srv/zoned-test".into(),
                ..good.clone()
            },
            "datastore.target: `/srv/zoned-test` and datastore `images`'s target",
        ),
    ] {
        let e = c
            .add(AddDatastoreRequest {
                datastore: Some(ds),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with(want),
            "`{}` does not start with `{want}`",
            e.message()
        );
    }
    // Roles: a reader lists but does not declare; an operator declares.
    let reader = zone.channel_as(l, Some(&zone.pki.user("rita", Role::Reader)));
    let e = StorageClient::new(reader.clone())
        .add(AddDatastoreRequest {
            datastore: Some(bind("r", Path::new("/srv/r"), "/srv/zoned-test/r")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "zone.v1.Storage/Add needs the operator role; rita has reader"
    );
    let e = StorageClient::new(reader.clone())
        .remove(RemoveDatastoreRequest {
            name: "images".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let operator = zone.channel_as(l, Some(&zone.pki.user("otto", Role::Operator)));
    StorageClient::new(operator.clone())
        .add(AddDatastoreRequest {
            datastore: Some(bind("o", Path::new("/srv/o"), "/srv/zoned-test/o")),
        })
        .await
        .expect("an operator declares");
    StorageClient::new(operator)
        .remove(RemoveDatastoreRequest { name: "o".into() })
        .await
        .expect("an operator removes");
    // The declarations cannot be written around the checks.
    let e = zone_proto::v1::kv_client::KvClient::new(zone.channel(l).await)
        .put(PutRequest {
            key: b"zone/storage/ds/evil".to_vec(),
            value: b"x".to_vec(),
            prev_kv: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .remove(RemoveDatastoreRequest {
            name: "absent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Only the good one is stored, on every server.
    for i in 0..3 {
        let list = StorageClient::new(zone.channel(i).await)
            .list(ListDatastoresRequest {})
            .await
            .unwrap()
            .into_inner();
        let names: Vec<_> = list.datastores.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["images"], "server {}", i + 1);
        assert_eq!(list.datastores[0].probe_interval_ms, 300);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_mounts_mounts_a_declared_datastore_on_every_server_and_unmounts_it_when_removed() {
    require_root();
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let mut agents: Vec<Child> = (0..3).map(|i| start_mounts(&zone, i)).collect();
    let source = zone.root.path().join("shared");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("hello"), "from the source").unwrap();
    // A target under the test's own directory: nothing outside it is touched.
    let target = zone.root.path().join("mnt/images");
    let target = target.to_str().unwrap().to_owned();
    let mut c = StorageClient::new(zone.channel(l).await);
    c.add(AddDatastoreRequest {
        datastore: Some(bind("images", &source, &target)),
    })
    .await
    .unwrap();
    // Mounted and probed healthy on all three, as Status says.
    poll(
        Duration::from_secs(20),
        "the datastore mounted on every server",
        || async {
            let s = zone
                .cluster(l)
                .await
                .status(StatusRequest {})
                .await
                .ok()?
                .into_inner();
            let ok = s.servers.iter().all(|x| {
                x.storage.as_ref().is_some_and(|st| {
                    st.reported
                        && st.datastores.iter().any(|d| {
                            d.name == "images"
                                && d.state() == zone_proto::v1::DatastoreState::Mounted
                                && d.latency_us > 0
                        })
                })
            });
            ok.then_some(())
        },
    )
    .await;
    for a in &agents {
        assert!(
            targets_of(a.id()).contains(&target),
            "not mounted in zone-mounts' namespace"
        );
        let seen = std::fs::read_to_string(format!("/proc/{}/root{target}/hello", a.id())).unwrap();
        assert_eq!(seen, "from the source");
    }
    // Each server's write probe used its own directory, and left no file.
    for id in 1..=3 {
        let dir = source.join(format!(".zoned-probe/{id}"));
        assert!(dir.is_dir(), "{} missing", dir.display());
    }
    // Not mounted in the test's own namespace: each server's is its own.
    assert!(!std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&target));
    // zonectl show has the STORAGE column.
    let out = std::process::Command::new(testbed::binary("zonectl"))
        .args(zone.zonectl_credentials())
        .args(["--endpoints", &zone.servers[l].endpoint(), "show"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .any(|h| h == "STORAGE"),
        "{table}"
    );
    assert_eq!(table.matches("ok 1/1").count(), 3, "{table}");
    // Removed: unmounted everywhere, and gone from the reports.
    c.remove(RemoveDatastoreRequest {
        name: "images".into(),
    })
    .await
    .unwrap();
    poll(
        Duration::from_secs(20),
        "the datastore unmounted on every server",
        || async {
            agents
                .iter()
                .all(|a| !targets_of(a.id()).contains(&target))
                .then_some(())
        },
    )
    .await;
    poll(
        Duration::from_secs(10),
        "the datastore gone from every report",
        || async {
            let s = zone
                .cluster(l)
                .await
                .status(StatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.servers
                .iter()
                .all(|x| {
                    x.storage.as_ref().is_some_and(|st| {
                        st.reported && st.datastores.is_empty() && st.unmounting.is_empty()
                    })
                })
                .then_some(())
        },
    )
    .await;
    for a in &mut agents {
        assert!(a.try_wait().unwrap().is_none(), "zone-mounts exited");
        let _ = a.kill();
        let _ = a.wait();
    }
}

/// An ext4 file system on a loop device, mounted in the test's namespace
/// (before the zone-mounts start: each copies it into its own); frozen, its
/// writers block in the kernel as on a storage server that stopped
/// answering. Detached on drop.
struct FreezableDisk {
    dev: String,
    mnt: std::path::PathBuf,
}

impl FreezableDisk {
    fn new(dir: &Path) -> FreezableDisk {
        let image = dir.join("disk.img");
        let mnt = dir.join("disk");
        std::fs::create_dir_all(&mnt).unwrap();
        testbed::sh(&["truncate", "-s", "64M", image.to_str().unwrap()]);
        let dev = testbed::sh(&["losetup", "-f", "--show", image.to_str().unwrap()])
            .trim()
            .to_owned();
        testbed::sh(&["mkfs.ext4", "-q", "-F", &dev]);
        testbed::sh(&["mount", &dev, mnt.to_str().unwrap()]);
        FreezableDisk { dev, mnt }
    }

    /// Freezes, or thaws (a disk not frozen stays as it is).
    fn freeze(&self, frozen: bool) {
        if frozen {
            testbed::sh(&["fsfreeze", "-f", self.mnt.to_str().unwrap()]);
        } else {
            let _ = std::process::Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        self.freeze(false);
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// The state of datastore `name` on every server, as Status says (None for
/// a server that did not report it lately).
async fn states(
    zone: &TestZone,
    via: usize,
    name: &str,
) -> Vec<Option<zone_proto::v1::DatastoreState>> {
    let Ok(s) = zone.cluster(via).await.status(StatusRequest {}).await else {
        return vec![None; 3];
    };
    let mut servers = s.into_inner().servers;
    servers.sort_by_key(|x| x.id);
    servers
        .iter()
        .map(|x| {
            let st = x.storage.as_ref().filter(|st| st.reported)?;
            st.datastores
                .iter()
                .find(|d| d.name == name)
                .map(|d| d.state())
        })
        .collect()
}

/// Storage that stops answering (writes blocked in the kernel, as behind a
/// dead NFS server): every server says `hung` within the probe timeout,
/// while zoned and zone-mounts keep answering; thawed, healthy again with
/// nobody's help; removed while hung, detached everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_that_stops_answering_is_hung_everywhere_blocks_nothing_and_recovers() {
    use zone_proto::v1::DatastoreState::{Hung, Mounted};
    require_root();
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let disk = FreezableDisk::new(zone.root.path());
    let source = disk.mnt.join("shared");
    std::fs::create_dir_all(&source).unwrap();
    let mut agents: Vec<Child> = (0..3).map(|i| start_mounts(&zone, i)).collect();
    let target = zone
        .root
        .path()
        .join("mnt/images")
        .to_str()
        .unwrap()
        .to_owned();
    let mut c = StorageClient::new(zone.channel(l).await);
    let ds = Datastore {
        probe_interval_ms: 300,
        probe_timeout_ms: 1500,
        ..bind("images", &source, &target)
    };
    c.add(AddDatastoreRequest {
        datastore: Some(ds),
    })
    .await
    .unwrap();
    poll(Duration::from_secs(20), "mounted everywhere", || async {
        (states(&zone, l, "images").await == [Some(Mounted); 3]).then_some(())
    })
    .await;
    disk.freeze(true);
    let frozen_at = std::time::Instant::now();
    poll(Duration::from_secs(15), "hung everywhere", || async {
        (states(&zone, l, "images").await == [Some(Hung); 3]).then_some(())
    })
    .await;
    let detected = frozen_at.elapsed();
    // Nothing blocks: the zone answers at once, writes included, and every
    // zone-mounts keeps reporting (a stale report would show as None).
    for i in 0..3 {
        let asked = std::time::Instant::now();
        let st = states(&zone, i, "images").await;
        assert_eq!(st, [Some(Hung); 3], "asked server {}", i + 1);
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "Status took {:?}",
            asked.elapsed()
        );
    }
    zone.kv(l)
        .await
        .put(PutRequest {
            key: b"still-writing".to_vec(),
            value: b"yes".to_vec(),
            prev_kv: false,
        })
        .await
        .expect("the zone takes writes while the storage hangs");
    // The probe children are stuck in the kernel, and only one per server.
    let stuck = testbed::sh(&[
        "sh",
        "-c",
        "ps -eo stat,args | grep '^D.*zone-mounts helper probe' | grep -v grep || true",
    ]);
    let stuck_count = stuck.lines().filter(|l| l.contains(&target)).count();
    assert!(
        (1..=3).contains(&stuck_count),
        "expected one probe stuck per server at most, in D state: {stuck}"
    );
    let s = zone
        .cluster(l)
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    for x in &s.servers {
        let d = &x.storage.as_ref().unwrap().datastores[0];
        assert!(
            d.error.contains("did not finish within 1500 ms"),
            "{}",
            d.error
        );
    }
    // Thawed: healthy again without anyone's help.
    disk.freeze(false);
    poll(
        Duration::from_secs(20),
        "healthy again everywhere",
        || async { (states(&zone, l, "images").await == [Some(Mounted); 3]).then_some(()) },
    )
    .await;
    // Hung again, then removed: detached everywhere all the same.
    disk.freeze(true);
    poll(Duration::from_secs(15), "hung everywhere again", || async {
        (states(&zone, l, "images").await == [Some(Hung); 3]).then_some(())
    })
    .await;
    c.remove(RemoveDatastoreRequest {
        name: "images".into(),
    })
    .await
    .unwrap();
    poll(
        Duration::from_secs(15),
        "detached on every server while hung",
        || async {
            agents
                .iter()
                .all(|a| !targets_of(a.id()).contains(&target))
                .then_some(())
        },
    )
    .await;
    disk.freeze(false);
    for a in &mut agents {
        assert!(a.try_wait().unwrap().is_none(), "zone-mounts exited");
        let _ = a.kill();
        let _ = a.wait();
    }
    eprintln!("storage that stopped answering was reported hung on all three servers after {detected:?} (probe timeout 1.5 s, interval 0.3 s)");
}

/// Starts server `i`'s zone-mounts in a mount namespace of its own in which
/// `disk` is mounted on `at`: the same path on every server, a different
/// disk behind it on each (so that one server's storage can fail alone).
fn start_mounts_over(zone: &TestZone, i: usize, disk: &FreezableDisk, at: &Path) -> Child {
    let s = &zone.servers[i];
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && exec "$3" --config "$4" --state-dir "$5" --units-dir "$5/units""#)
        .arg("sh")
        .arg(&disk.mnt)
        .arg(at)
        .arg(testbed::binary("zone-mounts"))
        .arg(s.config_path())
        .arg(s.dir.join("mounts"));
    testbed::spawn_logged(cmd, &s.dir.join("zone-mounts.log"))
}

/// The leader's id and term as server `via` sees them.
async fn leader_of(zone: &TestZone, via: usize) -> Option<(u64, u64)> {
    let v = zone.status(via).await?;
    (v.leader_id != 0).then_some((v.leader_id, v.term))
}

async fn transfer(zone: &TestZone, via: usize) -> Result<u64, tonic::Status> {
    zone.cluster(via)
        .await
        .transfer_leader(zone_proto::v1::TransferLeaderRequest { target: 0 })
        .await
        .map(|r| r.into_inner().leader_id)
}

/// A leader whose required datastore stays hung hands leadership to a
/// server whose is healthy; a transfer that names no server never picks
/// one with unhealthy storage; when no server is healthy, leadership stays
/// where it is; a leader made by an operator's named transfer starts its
/// leader-only units only once its storage is healthy. Each server has its
/// own disk behind the datastore's source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_follows_healthy_required_storage_and_stays_when_none_is() {
    use zone_proto::v1::DatastoreState::{Hung, Mounted};
    require_root();
    let mut zone = TestZone::start(3, "");
    zone.wait_leader().await;
    let disks: Vec<FreezableDisk> = (1..=3)
        .map(|id| {
            let d = zone.root.path().join(format!("disk-{id}"));
            std::fs::create_dir_all(&d).unwrap();
            FreezableDisk::new(&d)
        })
        .collect();
    let source = zone.root.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let mut agents: Vec<Child> = (0..3)
        .map(|i| start_mounts_over(&zone, i, &disks[i], &source))
        .collect();
    let vips = start_vips(&zone);
    let target = zone
        .root
        .path()
        .join("mnt/images")
        .to_str()
        .unwrap()
        .to_owned();
    let ds = Datastore {
        probe_interval_ms: 300,
        probe_timeout_ms: 1500,
        ..bind("images", &source, &target)
    };
    let mut c = StorageClient::new(zone.channel(0).await);
    c.add(AddDatastoreRequest {
        datastore: Some(ds),
    })
    .await
    .unwrap();
    let all = |want: zone_proto::v1::DatastoreState| {
        let zone = &zone;
        move || async move { (states(zone, 0, "images").await == [Some(want); 3]).then_some(()) }
    };
    poll(Duration::from_secs(20), "mounted everywhere", all(Mounted)).await;
    // Each server mounted its own disk: server 1's probe directory is on
    // disk 1 alone.
    assert!(disks[0].mnt.join(".zoned-probe/1").is_dir());
    assert!(!disks[1].mnt.join(".zoned-probe/1").exists());

    // One follower's storage hangs: transfers that name no server avoid it.
    let (l, _) = poll(Duration::from_secs(10), "a leader", || leader_of(&zone, 0)).await;
    let sick = (1..=3u64).find(|&id| id != l).unwrap();
    disks[sick as usize - 1].freeze(true);
    poll(
        Duration::from_secs(15),
        "the follower's storage hung",
        || async {
            (states(&zone, 0, "images").await[sick as usize - 1] == Some(Hung)).then_some(())
        },
    )
    .await;
    for _ in 0..2 {
        let (l, _) = poll(Duration::from_secs(10), "a leader", || leader_of(&zone, 0)).await;
        let to = transfer(&zone, l as usize - 1)
            .await
            .expect("a transfer to a healthy voter");
        assert_ne!(
            to, sick,
            "leadership went to server {sick}, whose storage hangs"
        );
        assert_ne!(to, l);
    }
    disks[sick as usize - 1].freeze(false);
    poll(
        Duration::from_secs(20),
        "healthy again everywhere",
        all(Mounted),
    )
    .await;

    // The leader's storage hangs: leadership moves to a healthy server.
    let (l, term) = poll(Duration::from_secs(10), "a leader", || leader_of(&zone, 0)).await;
    disks[l as usize - 1].freeze(true);
    let t0 = std::time::Instant::now();
    let (moved_to, _) = poll(
        Duration::from_secs(30),
        "leadership off the hung leader",
        || async {
            let v = leader_of(&zone, 0).await?;
            (v.0 != l && v.1 > term).then_some(v)
        },
    )
    .await;
    let took = t0.elapsed();
    let states_now = states(&zone, 0, "images").await;
    assert_eq!(
        states_now[moved_to as usize - 1],
        Some(Mounted),
        "moved to a server whose storage is healthy: {states_now:?}"
    );
    eprintln!("the leader's storage hung: leadership moved from {l} to {moved_to} {took:?} after the freeze (probe timeout 1.5 s, grace 2.4 s)");
    assert!(zone
        .log(l as usize - 1)
        .contains("required storage unhealthy on the leader; handing leadership over"));
    disks[l as usize - 1].freeze(false);
    poll(
        Duration::from_secs(20),
        "healthy again everywhere",
        all(Mounted),
    )
    .await;

    // Every server's storage hangs: leadership stays, and a transfer that
    // names no server is refused with the reason.
    for d in &disks {
        d.freeze(true);
    }
    poll(Duration::from_secs(15), "hung everywhere", all(Hung)).await;
    let (l, term) = poll(Duration::from_secs(10), "a leader", || leader_of(&zone, 0)).await;
    let e = transfer(&zone, l as usize - 1)
        .await
        .expect_err("a transfer to an unhealthy voter");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .starts_with("no other voter has its required datastores healthy (server "),
        "{}",
        e.message()
    );
    // Well past the grace: no election, no move.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        leader_of(&zone, 0).await,
        Some((l, term)),
        "leadership moved while no server was healthy"
    );
    assert!(zone.log(l as usize - 1).contains("leadership stays here"));
    // An operator moves leadership anyway, naming a server whose storage
    // hangs: its VIP comes up, its leader-only units wait until its
    // required datastores are healthy.
    let to = (1..=3u64).find(|&id| id != l).unwrap();
    zone.cluster(l as usize - 1)
        .await
        .transfer_leader(zone_proto::v1::TransferLeaderRequest { target: to })
        .await
        .expect("a transfer that names its server");
    let vip = &vips.config.vips[0];
    let m = &vips.mem[to as usize - 1];
    poll(
        Duration::from_secs(10),
        "the VIP on the named server",
        || async { m.holds(vip).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let since_add = |m: &zone_vip::effects::Memory| {
        let e = m.entries();
        let last_add = e.iter().rposition(|x| x.starts_with("add ")).unwrap();
        e[last_add..].to_vec()
    };
    assert!(
        !since_add(m)
            .iter()
            .any(|e| e == "start leader-only.service"),
        "a leader-only unit started on storage that hangs: {:?}",
        since_add(m)
    );
    disks[to as usize - 1].freeze(false);
    poll(
        Duration::from_secs(20),
        "the leader-only unit started once its storage is healthy",
        || async {
            since_add(m)
                .iter()
                .any(|e| e == "start leader-only.service")
                .then_some(())
        },
    )
    .await;
    for d in &disks {
        d.freeze(false);
    }
    poll(
        Duration::from_secs(20),
        "healthy again everywhere",
        all(Mounted),
    )
    .await;
    // The leader's zone-mounts dies: its storage is no longer known to be
    // healthy (zone-vip would not start the units there), so leadership
    // moves once the report is stale (10 s) and the grace has passed.
    let (l, term) = poll(Duration::from_secs(10), "a leader", || leader_of(&zone, 0)).await;
    let a = &mut agents[l as usize - 1];
    let _ = a.kill();
    let _ = a.wait();
    poll(
        Duration::from_secs(40),
        "leadership off the server whose zone-mounts died",
        || async {
            let v = leader_of(&zone, 0).await?;
            (v.0 != l && v.1 > term).then_some(())
        },
    )
    .await;
    assert!(zone.log(l as usize - 1).contains("zone-mounts silent"));
    let _ = vips.stop.send(true);
    for a in &mut agents {
        let _ = a.kill();
        let _ = a.wait();
    }
}

/// zone-vip runners (their side effects in memory) beside each server,
/// with one leader-only unit.
struct Vips {
    mem: Vec<std::sync::Arc<zone_vip::effects::Memory>>,
    config: zone_vip::config::Config,
    stop: tokio::sync::watch::Sender<bool>,
}

fn start_vips(zone: &TestZone) -> Vips {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut mem = Vec::new();
    let mut config = None;
    for s in &zone.servers {
        let text = format!(
            "socket = \"{}\"\nunits_record = \"{}\"\n[[vip]]\naddress = \"10.99.0.100/24\"\ninterface = \"vip0\"\n[leader]\nunits = [\"leader-only.service\"]\n[fence]\nwatchdog_mode = \"off\"\n",
            s.dir.join("agent.sock").display(),
            s.dir.join("leader-units").display()
        );
        let c = zone_vip::config::Config::parse(&text).unwrap();
        let m = std::sync::Arc::new(zone_vip::effects::Memory::default());
        let effects = zone_vip::runner::Effects {
            addresses: m.clone(),
            announcer: m.clone(),
            services: m.clone(),
            rtc: None,
            watchdog: std::sync::Arc::new(zone_vip::watchdog::MemoryWatchdog::default()),
        };
        tokio::spawn(zone_vip::runner::run(c.clone(), effects, stop_rx.clone()));
        mem.push(m);
        config = Some(c);
    }
    Vips {
        mem,
        config: config.unwrap(),
        stop,
    }
}
