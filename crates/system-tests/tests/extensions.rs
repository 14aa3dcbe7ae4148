//! System extensions (issue 25) in a zone of real processes on loopback:
//! `zonectl ext add` puts an image on one server, every server fetches it
//! over the peer port, installs it in its extensions directory and merges
//! (here the merge command lists that directory: systemd-sysext itself
//! runs in the QEMU zone), and reports; `rm` removes it everywhere; a
//! server added later, while the image's holder is down, gets it from
//! another. What a server refuses leaves nothing behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testbed::zone::{poll, TestZone};
use zonectl::v1::{extensions_client::ExtensionsClient, ExtensionChunk, PutRequest};

/// Every server's extensions directory is `<dir>/ext`; its merge command
/// writes what that directory holds to `<dir>/merged` (and fails while
/// `<dir>/refuse-merge` exists, saying so on stderr).
const CONFIG: &str = r#"
[extensions]
dir = "{dir}/ext"
refresh_command = ["sh", "-c", "if [ -e {dir}/refuse-merge ]; then echo 'merge refused by the test' >&2; exit 3; fi; ls {dir}/ext > {dir}/merged"]
reload_command = ["true"]
check_merged = false
factory_dir = "{dir}/factory"
[files]
local_root = "{dir}/root"
"#;

/// A payload's default file for the managed root /etc/zoned/managed, in
/// each server's factory directory, and the root with a file of the zone's
/// own that the default must not replace.
fn payload_defaults(zone: &TestZone) {
    for s in &zone.servers {
        let defaults = s.dir.join("factory/etc/zoned/managed");
        std::fs::create_dir_all(defaults.join("conf.d")).unwrap();
        std::fs::write(defaults.join("conf.d/payload.cnf"), "payload default\n").unwrap();
        std::fs::write(defaults.join("zone.cnf"), "payload default\n").unwrap();
        let root = s.dir.join("root/etc/zoned/managed");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("zone.cnf"), "the zone's\n").unwrap();
    }
}

/// A squashfs image as far as zoned can tell (its magic), of `mib` MiB.
fn image(dir: &Path, name: &str, mib: usize, seed: u8) -> PathBuf {
    let mut data: Vec<u8> = (0..mib << 20)
        .map(|i| (i as u32 % 253) as u8 ^ seed)
        .collect();
    data[..4].copy_from_slice(b"hsqs");
    let path = dir.join(format!("{name}.raw"));
    std::fs::write(&path, data).unwrap();
    path
}

fn zonectl(zone: &TestZone, args: &[&str]) -> (bool, String, String) {
    let ep = zone.endpoints().join(",");
    let mut all = vec!["--endpoints", &ep];
    all.extend_from_slice(args);
    let out = zone.zonectl(&all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn installed(zone: &TestZone, i: usize, name: &str) -> Option<Vec<u8>> {
    std::fs::read(zone.servers[i].dir.join("ext").join(format!("{name}.raw"))).ok()
}

fn merged(zone: &TestZone, i: usize) -> String {
    std::fs::read_to_string(zone.servers[i].dir.join("merged")).unwrap_or_default()
}

/// The images a server keeps for the others to fetch.
fn store(zone: &TestZone, i: usize) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(zone.servers[i].dir.join("data/extensions"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".raw") || n.ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_reaches_every_server_and_one_added_later_while_its_holder_is_down() {
    let mut zone = TestZone::start(3, CONFIG);
    zone.wait_leader().await;
    let work = tempfile::tempdir().unwrap();
    let demo = image(work.path(), "demo", 3, 0);
    let demo_bytes = std::fs::read(&demo).unwrap();
    payload_defaults(&zone);

    // Added through server 1 (the first endpoint): every server has it,
    // merged after it was installed, and says so. The merge filled in the
    // payload's defaults the managed root lacked, and kept the zone's.
    let (ok, out, err) = zonectl(&zone, &["ext", "add", demo.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("demo added at revision"), "{out}");
    for i in 0..3 {
        assert_eq!(
            installed(&zone, i, "demo").as_deref(),
            Some(&demo_bytes[..]),
            "server {}",
            i + 1
        );
        assert!(
            merged(&zone, i).contains("demo.raw"),
            "server {}: {}",
            i + 1,
            merged(&zone, i)
        );
        let root = zone.servers[i].dir.join("root/etc/zoned/managed");
        assert_eq!(
            std::fs::read_to_string(root.join("conf.d/payload.cnf"))
                .ok()
                .as_deref(),
            Some("payload default\n"),
            "server {}: the payload's default was not filled in",
            i + 1
        );
        assert_eq!(
            std::fs::read_to_string(root.join("zone.cnf")).unwrap(),
            "the zone's\n",
            "server {}: the payload's default replaced the zone's file",
            i + 1
        );
    }
    // The same image added again is answered again (nothing to fetch).
    let (ok, out, err) = zonectl(
        &zone,
        &["ext", "add", "--wait", "30s", demo.to_str().unwrap()],
    );
    assert!(ok, "the same image added again: {out}\n{err}");
    let (ok, out, err) = zonectl(&zone, &["ext", "ls"]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(line.matches("merged").count(), 3, "{out}");

    // A new version replaces it everywhere; the old image leaves the
    // servers' stores.
    let demo2 = image(work.path(), "demo-v2", 2, 7);
    let demo2_bytes = std::fs::read(&demo2).unwrap();
    let (ok, out, err) = zonectl(
        &zone,
        &["ext", "add", "--name", "demo", demo2.to_str().unwrap()],
    );
    assert!(ok, "{out}\n{err}");
    for i in 0..3 {
        assert_eq!(
            installed(&zone, i, "demo").as_deref(),
            Some(&demo2_bytes[..]),
            "server {}",
            i + 1
        );
        assert_eq!(
            store(&zone, i).len(),
            1,
            "server {}: {:?}",
            i + 1,
            store(&zone, i)
        );
    }

    // A file the zone did not install is left alone; the server that has
    // one says so, and zonectl fails naming it. A merge that fails is
    // reported with its command's words, and tried again.
    std::fs::write(
        zone.servers[1].dir.join("ext/other.raw"),
        b"the operator's own",
    )
    .unwrap();
    std::fs::write(zone.servers[2].dir.join("refuse-merge"), b"").unwrap();
    let other = image(work.path(), "other", 1, 3);
    let (ok, out, err) = zonectl(
        &zone,
        &["ext", "add", "--wait", "60s", other.to_str().unwrap()],
    );
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("server 2 failed") && err.contains("not installed by the zone"),
        "{err}"
    );
    assert!(
        err.contains("server 3 failed") && err.contains("merge refused by the test"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(zone.servers[1].dir.join("ext/other.raw")).unwrap(),
        b"the operator's own"
    );
    // zone-vip holds leader-only units back where the zone's extensions
    // are not all merged (the lease state on the agent socket says so).
    assert!(
        zone.lease_state(2).await.extensions_not_ready,
        "server 3 failed to merge, and its lease state says its extensions are ready"
    );
    assert!(
        !zone.lease_state(0).await.extensions_not_ready,
        "server 1 merged everything, and its lease state says its extensions are not ready"
    );
    std::fs::remove_file(zone.servers[2].dir.join("refuse-merge")).unwrap();
    poll(
        Duration::from_secs(60),
        "server 3 to merge again after its merge failed",
        || async { merged(&zone, 2).contains("other.raw").then_some(()) },
    )
    .await;
    poll(
        Duration::from_secs(30),
        "server 3's lease state to say its extensions are ready",
        || async { (!zone.lease_state(2).await.extensions_not_ready).then_some(()) },
    )
    .await;
    // Removed while server 3's merge fails: it says the extension is not
    // unmerged (zonectl fails naming it), and unmerges once it can.
    std::fs::write(zone.servers[2].dir.join("refuse-merge"), b"").unwrap();
    let (ok, out, err) = zonectl(&zone, &["ext", "rm", "--wait", "60s", "other"]);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("server 3 failed: removed, but not unmerged"),
        "{err}"
    );
    std::fs::remove_file(zone.servers[2].dir.join("refuse-merge")).unwrap();
    poll(
        Duration::from_secs(90),
        "server 3 to unmerge `other` once it can",
        || async { (!merged(&zone, 2).contains("other.raw")).then_some(()) },
    )
    .await;
    assert!(installed(&zone, 0, "other").is_none() && installed(&zone, 2, "other").is_none());
    assert_eq!(
        std::fs::read(zone.servers[1].dir.join("ext/other.raw")).unwrap(),
        b"the operator's own",
        "rm leaves a file the zone did not install"
    );

    // zonectl keeps waiting through a server that does not answer for a
    // while (frozen here; in the QEMU zone, a leader reset by its watchdog
    // after a stall): its List calls fail, are said, and are made again.
    // On the old code the first that failed ended `ext rm` with
    // "Cancelled: Timeout expired".
    let frozen = image(work.path(), "frozen", 1, 9);
    let (ok, out, err) = zonectl(&zone, &["ext", "add", frozen.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    let mut rm = std::process::Command::new(testbed::binary("zonectl"))
        .args(zone.zonectl_credentials())
        .args(["--endpoints", &zone.servers[0].endpoint(), "--timeout", "2"])
        .args(["ext", "rm", "--wait", "90s", "frozen"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(rm.stderr.take().unwrap()));
    let mut said = Vec::new();
    // The removal is in the zone once zonectl says where each server is.
    for l in lines.by_ref() {
        let l = l.unwrap();
        said.push(l.clone());
        if l.contains("server 1:") {
            break;
        }
    }
    zone.signal(0, nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(6)).await;
    zone.signal(0, nix::sys::signal::Signal::SIGCONT);
    said.extend(lines.map_while(Result::ok));
    let status = rm.wait().unwrap();
    let said = said.join("\n");
    assert!(status.success(), "ext rm through a frozen server: {said}");
    assert!(said.contains("the zone did not answer"), "{said}");

    // Refused, naming the field, and nothing kept: not an image, a bad
    // name, an operator's upload, a client's write of the zone's wants.
    let mut ext = ExtensionsClient::new(zone.channel(0).await);
    let junk = vec![7u8; 4096];
    let sha = {
        use sha2::Digest as _;
        zone_bundle::hex(&sha2::Sha256::digest(&junk))
    };
    let chunk = |name: &str| ExtensionChunk {
        name: name.into(),
        data: junk.clone(),
        total_bytes: junk.len() as u64,
        sha256: sha.clone(),
    };
    let e = ext
        .add(tokio_stream::iter([chunk("junk")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("squashfs or erofs"), "{}", e.message());
    let e = ext
        .add(tokio_stream::iter([chunk("../etc")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("name"), "{}", e.message());
    let op = zone.pki.user("olga", zonectl::zone_pki::Role::Operator);
    let e = ExtensionsClient::new(zone.channel_as(0, Some(&op)))
        .add(tokio_stream::iter([chunk("junk")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = zone
        .kv(0)
        .await
        .put(PutRequest {
            key: b"zone/ext/want/junk".to_vec(),
            value: b"x".to_vec(),
            prev_kv: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("zonectl ext add"), "{}", e.message());
    assert_eq!(store(&zone, 0).len(), 1, "{:?}", store(&zone, 0));

    // Server 4 is added while server 1, which received the image, is
    // down: it fetches the image from another server.
    zone.kill9(0);
    let four = zone.prepare_joiner(4, 1);
    let peer = zone.servers[four].peer.to_string();
    poll(Duration::from_secs(30), "the zone to take server 4", || {
        let zone = &zone;
        let peer = peer.clone();
        async move {
            let mut c = zone.cluster(1).await;
            c.add_server(zonectl::v1::AddServerRequest {
                id: 4,
                name: "zone-4".into(),
                peer,
            })
            .await
            .ok()
            .map(|_| ())
        }
    })
    .await;
    zone.launch(four);
    poll(
        Duration::from_secs(60),
        "server 4 to install and merge demo",
        || async {
            (installed(&zone, four, "demo").as_deref() == Some(&demo2_bytes[..])
                && merged(&zone, four).contains("demo.raw"))
            .then_some(())
        },
    )
    .await;
    assert!(
        zone.log(four).contains("fetched an extension image"),
        "{}",
        zone.log(four)
    );

    // Server 3 stopped and its record of what it installed lost: its
    // extension is still known as the zone's (the same file as its image),
    // so it stays merged and goes with `rm`.
    zone.terminate(2);
    std::fs::remove_file(zone.servers[2].dir.join("data/extensions/installed.json")).unwrap();
    zone.launch(2);
    // Removed: gone from every running server's directory and store.
    zone.launch(0);
    let (ok, out, err) = zonectl(&zone, &["ext", "rm", "demo"]);
    assert!(ok, "{out}\n{err}");
    for i in 0..4 {
        assert!(installed(&zone, i, "demo").is_none(), "server {}", i + 1);
        assert!(
            !merged(&zone, i).contains("demo.raw"),
            "server {}: {}",
            i + 1,
            merged(&zone, i)
        );
        assert!(
            store(&zone, i).is_empty(),
            "server {}: {:?}",
            i + 1,
            store(&zone, i)
        );
    }
}
