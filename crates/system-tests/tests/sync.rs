//! zone-sync on three real servers, each writing under its own temporary
//! root: a push reaches every server rendered for it; a server whose
//! zone-sync was stopped during three pushes converges to the latest and
//! never writes the versions in between; a hand edit is restored; a push
//! outside the managed roots changes nothing on any disk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testbed::zone::{poll, TestZone};
use zone_proto::v1::{config_client::ConfigClient, ManagedFile, PushFileRequest, RangeRequest};

const EXTRA: &str = "[files]\nmanaged_roots = [\"/etc/zoned/managed\", \"/etc/one\"]\n";

fn zone_sync_bin() -> PathBuf {
    testbed::binary("zone-sync")
}

struct Syncer {
    root: PathBuf,
    /// Leave --root out: zone-sync takes zoned's [files].local_root, which
    /// the test set to `root`.
    root_from_config: bool,
    state: PathBuf,
    child: Option<Child>,
    /// Extra arguments and environment (the systemctl stand-in).
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl Syncer {
    /// zone-sync writing under `root`, keeping its state in `state`,
    /// restarting nothing (never this machine's systemctl).
    fn new(root: PathBuf, state: PathBuf) -> Syncer {
        Syncer {
            root,
            root_from_config: false,
            state,
            child: None,
            extra: vec!["--no-restart".into()],
            env: Vec::new(),
        }
    }

    fn start(&mut self, zone: &TestZone, i: usize) {
        std::fs::create_dir_all(&self.state).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.with_extension("log"))
            .unwrap();
        std::fs::create_dir_all(&self.root).unwrap();
        let root: &[&Path] = if self.root_from_config {
            &[]
        } else {
            &[Path::new("--root"), &self.root]
        };
        self.child = Some(
            Command::new(zone_sync_bin())
                .arg("--config")
                .arg(zone.servers[i].config_path())
                .args(root)
                .arg("--state-dir")
                .arg(&self.state)
                .args(["--drift-interval", "1"])
                .args(&self.extra)
                .envs(self.env.iter().cloned())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn stop(&mut self) {
        testbed::kill9(self.child.take());
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(path.trim_start_matches('/'))).ok()
    }

    /// Waits until `path` on this server holds `want`.
    async fn wait_for(&self, path: &str, want: &str, what: &str) {
        poll(Duration::from_secs(20), what, || async {
            (self.read(path).as_deref() == Some(want)).then_some(())
        })
        .await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }
}

/// One zone-sync for each of the zone's three servers, started.
fn start_syncers(zone: &TestZone, make: impl Fn(usize) -> Syncer) -> Vec<Syncer> {
    (0..3)
        .map(|i| {
            let mut s = make(i);
            s.start(zone, i);
            s
        })
        .collect()
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tree(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if p.is_dir() {
                    walk(&p, base, out);
                }
            }
        }
    }
    let mut v = Vec::new();
    walk(root, root, &mut v);
    v.sort();
    v
}

/// Every server's zone-sync report, as stored.
async fn reports(zone: &TestZone) -> Option<Vec<serde_json::Value>> {
    let r = zone
        .kv(0)
        .await
        .range(RangeRequest {
            prefix: zone_files::keys::STATUS_PREFIX.to_vec(),
            ..RangeRequest::default()
        })
        .await
        .ok()?
        .into_inner();
    r.kvs
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect()
}

async fn push(zone: &TestZone, f: ManagedFile) -> Result<u64, tonic::Status> {
    let mut c = ConfigClient::new(zone.channel(0).await);
    let r = c
        .push(PushFileRequest { file: Some(f) })
        .await?
        .into_inner();
    Ok(r.file.map_or(0, |f| f.revision))
}

/// A file with no unit to restart, pushed to know when every server has
/// handled what came before it.
fn barrier(path: &str, content: &str) -> ManagedFile {
    ManagedFile {
        path: path.into(),
        content: content.as_bytes().to_vec(),
        ..ManagedFile::default()
    }
}

fn oned(content: &str) -> ManagedFile {
    ManagedFile {
        path: "/etc/one/oned.conf".into(),
        content: content.as_bytes().to_vec(),
        template: true,
        restart_units: vec!["opennebula.service".into()],
        ..ManagedFile::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_converges_on_the_latest_version() {
    let mut zone = TestZone::start(3, EXTRA);
    zone.wait_leader().await;
    let base = zone.root.path().to_owned();
    let mut syncers = start_syncers(&zone, |i| {
        Syncer::new(
            base.join(format!("sync-{i}/root")),
            base.join(format!("sync-{i}/state")),
        )
    });

    // A push reaches every server, rendered for each.
    let rev = push(&zone, oned("SERVER_ID = {{id0}}\nNAME = {{name}}\n"))
        .await
        .unwrap();
    for (i, s) in syncers.iter().enumerate() {
        let want = format!("SERVER_ID = {i}\nNAME = zone-{}\n", i + 1);
        s.wait_for("/etc/one/oned.conf", &want, "the file on every server")
            .await;
    }
    // Each server reports what it applied.
    poll(Duration::from_secs(20), "three status reports", || async {
        let all = reports(&zone).await?;
        let ok = all.len() == 3
            && all.iter().all(|v| {
                v["applied_revision"].as_u64() >= Some(rev) && v["files"].as_u64() == Some(1)
            });
        ok.then_some(())
    })
    .await;

    // Server 3's zone-sync is down during three pushes; on restart it
    // writes the latest and nothing in between.
    syncers[2].stop();
    for n in 1..=3 {
        push(&zone, oned(&format!("SERVER_ID = {{{{id0}}}}\nV = {n}\n")))
            .await
            .unwrap();
    }
    syncers[0]
        .wait_for(
            "/etc/one/oned.conf",
            "SERVER_ID = 0\nV = 3\n",
            "server 1 at the latest",
        )
        .await;
    assert_eq!(
        syncers[2].read("/etc/one/oned.conf").as_deref(),
        Some("SERVER_ID = 2\nNAME = zone-3\n"),
        "written while its zone-sync was down"
    );
    syncers[2].start(&zone, 2);
    syncers[2]
        .wait_for(
            "/etc/one/oned.conf",
            "SERVER_ID = 2\nV = 3\n",
            "server 3 at the latest",
        )
        .await;
    // One backup, of the version before: V = 1 and V = 2 never reached it.
    let backups = syncers[2].state.join("backups/etc/one/oned.conf");
    let kept: Vec<String> = std::fs::read_dir(&backups)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert_eq!(
        kept,
        vec!["SERVER_ID = 2\nNAME = zone-3\n"],
        "{}",
        syncers[2].log()
    );

    // A hand edit on server 1 is restored.
    std::fs::write(syncers[0].root.join("etc/one/oned.conf"), "SERVER_ID = 9\n").unwrap();
    syncers[0]
        .wait_for(
            "/etc/one/oned.conf",
            "SERVER_ID = 0\nV = 3\n",
            "the hand edit restored",
        )
        .await;
    // zone-sync logs the restore just after the rename that the wait saw.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !syncers[0].log().contains("edited on disk: restored") {
        assert!(
            std::time::Instant::now() < deadline,
            "no restore logged: {}",
            syncers[0].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    poll(
        Duration::from_secs(20),
        "the drift in server 1's report",
        || async {
            let r = zone
                .kv(0)
                .await
                .get(zone_proto::v1::GetRequest {
                    key: [zone_files::keys::STATUS_PREFIX, b"1"].concat(),
                    serializable: false,
                })
                .await
                .ok()?
                .into_inner();
            let v: serde_json::Value = serde_json::from_slice(&r.kv?.value).ok()?;
            (v["drift_restored"][0] == "/etc/one/oned.conf").then_some(())
        },
    )
    .await;
    // zone-sync's figures in its zoned's metrics: the restore counted, the
    // latest revision applied, nothing waiting to restart.
    poll(
        Duration::from_secs(20),
        "zone-sync's figures in server 1's metrics",
        || async {
            let restores = metric(&zone, 0, "zoned_sync_drift_restores_total").await?;
            let applied = metric(&zone, 0, "zoned_sync_applied_revision").await?;
            let pending = metric(&zone, 0, "zoned_sync_restarts_pending").await?;
            (restores >= 1.0 && applied >= rev as f64 && pending == 0.0).then_some(())
        },
    )
    .await;

    // A push outside the managed roots is refused by the zone and changes
    // nothing on any disk.
    let before: Vec<Vec<String>> = syncers.iter().map(|s| tree(&s.root)).collect();
    let e = push(
        &zone,
        ManagedFile {
            path: "/etc/passwd".into(),
            content: b"x".to_vec(),
            ..ManagedFile::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // A barrier: a file pushed after the refusal. Once every server wrote
    // it, each has handled everything before it, and the refused push
    // changed nothing but the barrier on any disk.
    push(&zone, barrier("/etc/one/barrier", "after the refusal"))
        .await
        .unwrap();
    for s in &syncers {
        s.wait_for("/etc/one/barrier", "after the refusal", "the barrier")
            .await;
    }
    let after: Vec<Vec<String>> = syncers.iter().map(|s| tree(&s.root)).collect();
    for (before, after) in before.into_iter().zip(after) {
        let mut expected = before;
        expected.push("etc/one/barrier".into());
        expected.sort();
        assert_eq!(after, expected);
    }

    // The operator's view: one row per server.
    let out = Command::new(zone_sync_bin().with_file_name("zonectl"))
        .args(zone.zonectl_credentials())
        .args([
            "--endpoints",
            &zone.servers[1].endpoint(),
            "config",
            "status",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for name in ["zone-1", "zone-2", "zone-3"] {
        assert!(text.contains(name), "{text}");
    }
    eprintln!("{text}");
}

/// Records restarts as "<server> start|end <unit>" lines in one log, taking
/// half a second each; `is-active` fails on a server while a marker file
/// for it exists.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
case "$1" in
  restart)
    echo "$ZS_NODE start $2" >> "$ZS_LOG"
    sleep 0.5
    echo "$ZS_NODE end $2" >> "$ZS_LOG"
    ;;
  is-active)
    [ -e "$ZS_FAIL.$ZS_NODE" ] && exit 3
    exit 0
    ;;
esac
"#;

/// A stand-in for systemctl that keeps each node's active units as files
/// (`$ZS_ACTIVE.<node>.<unit>`) and logs each start and stop.
const FAKE_UNITS: &str = r#"#!/bin/sh
# The unit is the last argument (after `--`).
for unit; do :; done
case "$1" in
  start)
    echo "$ZS_NODE start $unit" >> "$ZS_LOG"
    touch "$ZS_ACTIVE.$ZS_NODE.$unit"
    ;;
  stop)
    echo "$ZS_NODE stop $unit" >> "$ZS_LOG"
    rm -f "$ZS_ACTIVE.$ZS_NODE.$unit"
    ;;
  is-active)
    [ -e "$ZS_ACTIVE.$ZS_NODE.$unit" ]
    ;;
esac
"#;

/// `zonectl services set --everywhere`: every server's zone-sync starts the
/// units (and not the leader-only ones, which are zone-vip's), starts again
/// one stopped by hand, stops those the zone drops, and remembers what it
/// started across its own restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zones_everywhere_units_run_on_every_server_and_stop_when_dropped() {
    use std::os::unix::fs::PermissionsExt;
    let mut zone = TestZone::start(3, EXTRA);
    zone.wait_leader().await;
    let base = zone.root.path().to_owned();
    let script = base.join("systemctl");
    std::fs::write(&script, FAKE_UNITS).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = base.join("units.log");
    let active = base.join("active");
    let mut syncers = start_syncers(&zone, |i| {
        let mut s = Syncer::new(
            base.join(format!("sync-{i}/root")),
            base.join(format!("sync-{i}/state")),
        );
        s.extra = vec!["--systemctl".into(), script.display().to_string()];
        s.env = vec![
            ("ZS_NODE".into(), (i + 1).to_string()),
            ("ZS_LOG".into(), log.display().to_string()),
            ("ZS_ACTIVE".into(), active.display().to_string()),
        ];
        s
    });
    let entries = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let count = |entry: &str| entries().iter().filter(|e| *e == entry).count();
    let zonectl = |args: &[&str]| {
        let ep = zone.endpoints().join(",");
        let mut all = vec!["--endpoints", ep.as_str()];
        all.extend_from_slice(args);
        let out = zone.zonectl(&all);
        assert!(
            out.status.success(),
            "zonectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    zonectl(&[
        "services",
        "set",
        "--leader",
        "db.service",
        "--everywhere",
        "gate.service",
    ]);
    poll(
        Duration::from_secs(20),
        "gate.service on every server",
        || async {
            (1..=3)
                .all(|n| count(&format!("{n} start gate.service")) == 1)
                .then_some(())
        },
    )
    .await;
    assert!(
        !entries().iter().any(|e| e.contains("db.service")),
        "zone-sync started a leader-only unit: {:?}",
        entries()
    );

    // Stopped by hand on server 2: started again at its next pass.
    std::fs::remove_file(format!("{}.2.gate.service", active.display())).unwrap();
    poll(
        Duration::from_secs(20),
        "gate.service again on server 2",
        || async { (count("2 start gate.service") == 2).then_some(()) },
    )
    .await;

    // Server 3's zone-sync restarts; then the zone drops gate.service for
    // other.service, which server 1 runs already by other means: every
    // server stops the one it started, and servers 2 and 3 start the new
    // one.
    syncers[2].stop();
    syncers[2].start(&zone, 2);
    std::fs::write(format!("{}.1.other.service", active.display()), "").unwrap();
    zonectl(&["services", "set", "--everywhere", "other.service"]);
    poll(
        Duration::from_secs(20),
        "the change on every server",
        || async {
            ((1..=3).all(|n| count(&format!("{n} stop gate.service")) == 1)
                && (2..=3).all(|n| count(&format!("{n} start other.service")) == 1))
            .then_some(())
        },
    )
    .await;
    // `--everywhere` alone keeps the leader-only list.
    let out = zone.zonectl(&[
        "--endpoints",
        &zone.endpoints().join(","),
        "services",
        "status",
    ]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("leader-only: db.service"), "{out}");

    // Cleared: nothing runs everywhere any more; server 1's other.service,
    // which its zone-sync did not start, is left running.
    zonectl(&["services", "clear"]);
    poll(Duration::from_secs(20), "other.service stopped", || async {
        (2..=3)
            .all(|n| count(&format!("{n} stop other.service")) == 1)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count("1 start other.service"), 0, "{:?}", entries());
    assert_eq!(count("1 stop other.service"), 0, "{:?}", entries());
    let mut left: Vec<String> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("active."))
        .collect();
    left.sort();
    assert_eq!(left, ["active.1.other.service"], "{:?}", entries());
}

fn restarts(log: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let id = it.next().unwrap().parse().unwrap();
            (id, it.next().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_roll_one_server_at_a_time_leader_last() {
    use std::os::unix::fs::PermissionsExt;
    let mut zone = TestZone::start(3, EXTRA);
    let leader_i = zone.wait_leader().await;
    let leader = zone.servers[leader_i].id;
    let base = zone.root.path().to_owned();
    let script = base.join("systemctl");
    std::fs::write(&script, FAKE_SYSTEMCTL).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = base.join("restarts.log");
    let fail = base.join("fail");
    let syncers = start_syncers(&zone, |i| {
        let mut s = Syncer::new(
            base.join(format!("sync-{i}/root")),
            base.join(format!("sync-{i}/state")),
        );
        s.extra = vec![
            "--systemctl".into(),
            script.display().to_string(),
            "--restart-timeout".into(),
            "2".into(),
        ];
        s.env = vec![
            ("ZS_NODE".into(), (i + 1).to_string()),
            ("ZS_LOG".into(), log.display().to_string()),
            ("ZS_FAIL".into(), fail.display().to_string()),
        ];
        s
    });
    let mut followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    followers.sort();

    // One push: followers in id order, then the leader, never two at once.
    push(&zone, oned("SERVER_ID = {{id0}}\n")).await.unwrap();
    poll(Duration::from_secs(60), "three restarts", || async {
        (restarts(&log).len() == 6).then_some(())
    })
    .await;
    let order = restarts(&log);
    let expect: Vec<(u64, String)> = [followers[0], followers[1], leader]
        .iter()
        .flat_map(|&id| [(id, "start".to_string()), (id, "end".to_string())])
        .collect();
    assert_eq!(order, expect, "leader {leader}; logs: {}", syncers[0].log());

    // The first follower's unit does not come back: the roll stops there.
    std::fs::write(format!("{}.{}", fail.display(), followers[0]), "").unwrap();
    push(&zone, oned("SERVER_ID = {{id0}}\nV = 2\n"))
        .await
        .unwrap();
    poll(
        Duration::from_secs(60),
        "the failed restart reported",
        || async {
            reports(&zone)
                .await?
                .iter()
                .any(|v| v["id"].as_u64() == Some(followers[0]) && v["restart_failed"].is_string())
                .then_some(())
        },
    )
    .await;
    // A barrier: the two other servers report their roll halted. Their roll
    // steps run one after another, so any restart a step decided before
    // seeing the failure is in the log by then, and none can follow until
    // a new push.
    let others: Vec<u64> = (1..=3).filter(|&id| id != followers[0]).collect();
    poll(
        Duration::from_secs(60),
        "the other servers to report the roll halted",
        || async {
            let reports = reports(&zone).await?;
            others
                .iter()
                .all(|id| {
                    reports.iter().any(|v| {
                        v["id"].as_u64() == Some(*id)
                            && v["roll_wait"]
                                .as_str()
                                .is_some_and(|w| w.starts_with("halted: "))
                    })
                })
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        restarts(&log)[6..],
        [
            (followers[0], "start".to_string()),
            (followers[0], "end".to_string())
        ],
        "others restarted after a failure"
    );

    // Fixed and pushed again: the roll goes on, in order.
    std::fs::remove_file(format!("{}.{}", fail.display(), followers[0])).unwrap();
    push(&zone, oned("SERVER_ID = {{id0}}\nV = 3\n"))
        .await
        .unwrap();
    poll(Duration::from_secs(60), "the roll resumed", || async {
        (restarts(&log).len() == 14).then_some(())
    })
    .await;
    let ids: Vec<u64> = restarts(&log)[8..].iter().map(|r| r.0).collect();
    assert_eq!(
        ids,
        vec![
            followers[0],
            followers[0],
            followers[1],
            followers[1],
            leader,
            leader
        ]
    );
}

fn zonectl(zone: &TestZone, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(zone_sync_bin().with_file_name("zonectl"))
        .args(zone.zonectl_credentials())
        .args(["--endpoints", &zone.servers[0].endpoint(), "config"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "zonectl config {}: {:?}\n{stdout}{stderr}",
        args.join(" "),
        out.status
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// `zonectl config diff` compares the zone's version, rendered for each
/// server, with each server's disk (read by that server's zoned under its
/// own [files].local_root); `import` takes one server's copy into the zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_shows_each_servers_disk_and_import_takes_one_copy() {
    use std::os::unix::fs::PermissionsExt as _;
    let extra = format!("{EXTRA}local_root = \"{{dir}}/root\"\n");
    let mut zone = TestZone::start(3, &extra);
    zone.wait_leader().await;
    let mut syncers = start_syncers(&zone, |i| {
        let dir = &zone.servers[i].dir;
        let mut s = Syncer::new(dir.join("root"), dir.join("sync"));
        s.root_from_config = true;
        s
    });
    push(&zone, oned("SERVER_ID = {{id0}}\nLOG = info\n"))
        .await
        .unwrap();
    for (i, s) in syncers.iter().enumerate() {
        let want = format!("SERVER_ID = {i}\nLOG = info\n");
        s.wait_for(
            "/etc/one/oned.conf",
            &want,
            "the file under every server's local_root",
        )
        .await;
    }
    let (code, out, _) = zonectl(&zone, &["diff"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("3 copies checked (1 file on 3 servers): 0 differ"),
        "{out}"
    );

    // Server 2's zone-sync is stopped and its copy edited by hand.
    syncers[1].stop();
    let on2 = syncers[1].root.join("etc/one/oned.conf");
    std::fs::write(&on2, "SERVER_ID = 1\nLOG = debug\n").unwrap();
    std::fs::set_permissions(&on2, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = zonectl(&zone, &["diff", "/etc/one/oned.conf"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.contains("--- zone /etc/one/oned.conf (version 1, rendered for server 2)"),
        "{out}"
    );
    assert!(
        out.contains("+++ server 2 (zone-2) /etc/one/oned.conf"),
        "{out}"
    );
    assert!(out.contains("-LOG = info\n+LOG = debug"), "{out}");
    assert!(
        out.contains("server 2 (zone-2): /etc/one/oned.conf: mode 600 on disk, 644 in the zone"),
        "{out}"
    );
    assert!(
        !out.contains("server 1 (") && !out.contains("server 3 ("),
        "{out}"
    );
    assert!(out.contains("1 differ"), "{out}");
    assert_eq!(zonectl(&zone, &["diff", "--server", "3"]).0, 0);

    // Import: a file only server 3 has becomes managed, mode kept, and
    // reaches the others.
    let sched = syncers[2].root.join("etc/one/sched.conf");
    std::fs::write(&sched, "MAX_HOST = 1\n").unwrap();
    std::fs::set_permissions(&sched, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, out, err) = zonectl(&zone, &["import", "--from", "3", "/etc/one/sched.conf"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("server 3's copy (13 bytes, mode 640) stored as version 1"),
        "{out}"
    );
    let s1 = &syncers[0];
    s1.wait_for(
        "/etc/one/sched.conf",
        "MAX_HOST = 1\n",
        "the imported file on server 1",
    )
    .await;
    let mode = std::fs::metadata(s1.root.join("etc/one/sched.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    // Once only: a second import must say what it would replace.
    let (code, _, err) = zonectl(&zone, &["import", "--from", "1", "/etc/one/sched.conf"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("already managed") && err.contains("--replace"),
        "{err}"
    );
    let (code, _, err) = zonectl(&zone, &["import", "--from", "3", "/etc/one/absent.conf"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist on server 3"), "{err}");
    // Nothing outside the managed roots can be read through zoned.
    std::fs::write(syncers[0].root.join("etc/shadow-copy"), "secret").unwrap();
    let (code, _, err) = zonectl(&zone, &["import", "--from", "1", "/etc/shadow-copy"]);
    assert_eq!(code, 1);
    assert!(err.contains("outside the managed roots"), "{err}");
    std::os::unix::fs::symlink(
        syncers[0].root.join("etc/shadow-copy"),
        syncers[0].root.join("etc/one/link.conf"),
    )
    .unwrap();
    let (code, _, err) = zonectl(&zone, &["import", "--from", "1", "/etc/one/link.conf"]);
    assert_eq!(code, 1);
    assert!(err.contains("symbolic link"), "{err}");

    // Server 2's zone-sync, back, restores its copy: no difference left.
    syncers[1].start(&zone, 1);
    let s2 = &syncers[1];
    s2.wait_for(
        "/etc/one/oned.conf",
        "SERVER_ID = 1\nLOG = info\n",
        "server 2's copy restored",
    )
    .await;
    poll(Duration::from_secs(20), "no copy differing", || async {
        (zonectl(&zone, &["diff"]).0 == 0).then_some(())
    })
    .await;
}

/// A metric of server `i`'s zoned (one without labels), as scraped.
async fn metric(zone: &TestZone, i: usize, name: &str) -> Option<f64> {
    let addr = std::net::SocketAddr::new(zone.servers[i].client.ip(), testbed::METRICS_PORT);
    let text = testbed::scrape(addr).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}
