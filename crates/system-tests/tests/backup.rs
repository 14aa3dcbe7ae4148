//! Operations (issue 23) against a zone of real processes: backups
//! (`zonectl snapshot save`, `zonectl snapshot status`, what damaged files
//! get), `zonectl version`, and who may read a server's journal
//! (`zonectl logs`; the journal itself is read in the QEMU zone, whose
//! servers run under systemd).

use std::process::{Command, Output};

use testbed::zone::TestZone;
use zonectl::v1::{DeleteRequest, KeyValue, PutRequest};

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "zonectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("zonectl's JSON")
}

/// 3000 keys of 1 KiB (three batches of the backup), every seventh written
/// twice, every eleventh deleted; a backup from a follower holds every key
/// with its value and revisions as a read at its revision saw them,
/// `status` checks it; an existing file is not
/// overwritten, and a truncated or altered copy is refused by `status`
/// with what is wrong, and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_every_key_at_its_revision_and_a_damaged_copy_is_refused() {
    let mut zone = TestZone::start(3, "");
    zone.wait_leader().await;
    let mut kv = zone.kv(0).await;
    let put = |i: u32, round: u8| PutRequest {
        key: format!("k{i:05}").into_bytes(),
        value: vec![b'a' + round; 1024],
        ..Default::default()
    };
    for i in 0..3000 {
        kv.put(put(i, 0)).await.unwrap();
    }
    for i in (0..3000).step_by(7) {
        kv.put(put(i, 1)).await.unwrap();
    }
    for i in (0..3000).step_by(11) {
        kv.delete(DeleteRequest {
            key: format!("k{i:05}").into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let before = zone.range(0, b"", false).await;
    let revision = before.header.as_ref().unwrap().revision;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zone.backup");
    let f = file.to_str().unwrap();
    let follower = zone.servers[1].endpoint();
    let saved = json(&zone.zonectl(&[
        "--endpoints",
        &follower,
        "-o",
        "json",
        "snapshot",
        "save",
        f,
    ]));
    assert_eq!(saved["revision"], revision, "{saved}");
    assert_eq!(saved["keys"], before.kvs.len() as u64, "{saved}");
    assert_eq!(saved["zone_id"].as_str().map(str::len), Some(32), "{saved}");
    assert_eq!(saved["server_id"], zone.servers[1].id, "{saved}");
    let status = json(&zone.zonectl(&["-o", "json", "snapshot", "status", f]));
    assert_eq!(status["revision"], revision);
    assert_eq!(status["sha256"], saved["sha256"]);
    let mut kvs: Vec<KeyValue> = Vec::new();
    let summary = zone_backup::read(std::fs::File::open(&file).unwrap(), |b| {
        kvs.extend(b.iter().cloned())
    })
    .unwrap();
    assert_eq!(summary.keys, before.kvs.len() as u64);
    assert!(
        kvs == before.kvs,
        "the backup's keys differ from a read at revision {revision}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no .part left"
    );

    // An existing file is not overwritten.
    let out = zone.zonectl(&["snapshot", "save", f]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    assert_eq!(
        zone_backup::read(std::fs::File::open(&file).unwrap(), |_| {})
            .unwrap()
            .sha256,
        summary.sha256
    );
    // Truncated, or one byte changed: refused, saying what is wrong.
    let whole = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.backup");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let out = zone.zonectl(&["snapshot", "status", cut.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("truncated"), "{err}");
    let mut bad = whole.clone();
    let at = whole.len() / 3;
    bad[at] ^= 0x40;
    let altered = dir.path().join("altered.backup");
    std::fs::write(&altered, &bad).unwrap();
    let out = zone.zonectl(&["snapshot", "status", altered.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && (err.contains("checksum") || err.contains("corrupt")),
        "{err}"
    );
    eprintln!("a changed byte: {}", err.trim());
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "not a backup\n").unwrap();
    let out = zone.zonectl(&["snapshot", "status", other.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Zoned backup"));
}

/// `zonectl version` and `show` name every server's build (the zoned of
/// this tree, as the zonectl beside it) and image; `zonectl logs` needs
/// the admin role, checks its request before anything runs, and on a
/// server without a journal says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_who_reads_the_journal() {
    let mut zone = TestZone::start(3, "");
    let l = zone.wait_leader().await;
    let endpoints = zone.endpoints().join(",");
    let ctl = |args: &[&str]| zone.zonectl(&[&["--endpoints", &endpoints][..], args].concat());
    let own = ctl(&["--version"]);
    let own = String::from_utf8_lossy(&own.stdout).trim().to_owned();
    let build = own.strip_prefix("zonectl ").expect("zonectl --version");
    let (version, commit) = build.split_once('+').expect("version+commit");
    assert_eq!(
        (version, commit),
        (zone_version::VERSION, zone_version::COMMIT)
    );
    let v = json(&ctl(&["-o", "json", "version"]));
    assert_eq!(v["client"]["build_commit"], commit, "{v}");
    let servers = v["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 3, "{v}");
    for s in servers {
        assert_eq!(s["version"], version, "{s}");
        assert_eq!(s["build_commit"], commit, "{s}");
        // This host's os-release, as the server read it (empty off the
        // appliance).
        assert_eq!(s["image_version"], zone_version::image(), "{s}");
        assert_eq!(s["error"], "", "{s}");
    }
    let table = ctl(&["version"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with(&format!("client {build}\nID")), "{text}");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    for r in &rows {
        assert_eq!(r.get(2..4), Some(&[version, commit][..]), "{text}");
    }
    let show = ctl(&["show"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.lines().next().unwrap().ends_with("STORAGE  VERSION"),
        "{text}"
    );
    assert_eq!(
        text.matches(&format!("{version}+{}", &commit[..7])).count(),
        3,
        "{text}"
    );

    // Logs: the admin's request with a bad unit is refused naming it.
    let out = ctl(&["logs", "--unit", "zoned;reboot"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && said.contains("InvalidArgument: units:"),
        "{said}"
    );
    let out = ctl(&["logs", "--server", "9"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("server 9 is not a member of the zone (members: 1, 2, 3)"),
        "{said}"
    );
    // A well-formed one is served where there is a journal (a directory
    // of journald's in /run/log/journal or /var/log/journal), refused
    // saying there is none elsewhere (a host without journald, as CI's).
    let journal = ["/run/log/journal", "/var/log/journal"]
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()));
    let out = ctl(&["logs", "--server", "2", "-n", "3"]);
    let said = String::from_utf8_lossy(&out.stderr);
    if journal {
        assert!(out.status.success(), "{said}");
    } else {
        assert!(
            out.status.code() == Some(1)
                && said.contains("FailedPrecondition: server 2 keeps no systemd journal"),
            "{said}"
        );
    }
    // A reader may not read the journal (it may hold anything).
    let reader = zone.pki.user_dir("rita", zonectl::zone_pki::Role::Reader);
    let out = Command::new(testbed::binary("zonectl"))
        .arg("--credentials")
        .arg(&reader)
        .args(["--endpoints", &zone.servers[l].endpoint(), "logs"])
        .output()
        .expect("run zonectl");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(
            "PermissionDenied: zone.v1.Cluster/Logs needs the admin role; rita has reader"
        ),
        "{said}"
    );
}
