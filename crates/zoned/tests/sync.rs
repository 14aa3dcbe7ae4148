//! zone-sync on three real servers, each writing under its own temporary
//! root: a push reaches every server rendered for it; a server whose
//! zone-sync was stopped during three pushes converges to the latest and
//! never writes the versions in between; a hand edit is restored; a push
//! outside the managed roots changes nothing on any disk.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{poll, TestZone};
use zone_proto::v1::{config_client::ConfigClient, ManagedFile, PushFileRequest, RangeRequest};

const EXTRA: &str = "[files]\nmanaged_roots = [\"/etc/zoned/managed\", \"/etc/one\"]\n";

fn zone_sync_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = dir.join("zone-sync");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

struct Syncer {
    root: PathBuf,
    state: PathBuf,
    child: Option<Child>,
}

impl Syncer {
    fn start(&mut self, zone: &TestZone, i: usize) {
        std::fs::create_dir_all(&self.state).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.with_extension("log"))
            .unwrap();
        std::fs::create_dir_all(&self.root).unwrap();
        self.child = Some(
            Command::new(zone_sync_bin())
                .arg("--endpoint")
                .arg(zone.servers[i].endpoint())
                .arg("--config")
                .arg(zone.servers[i].config_path())
                .arg("--root")
                .arg(&self.root)
                .arg("--state-dir")
                .arg(&self.state)
                .args(["--drift-interval", "1"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(path.trim_start_matches('/'))).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }
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

async fn push(zone: &TestZone, f: ManagedFile) -> Result<u64, tonic::Status> {
    let mut c = ConfigClient::new(zone.channel(0).await);
    let r = c
        .push(PushFileRequest { file: Some(f) })
        .await?
        .into_inner();
    Ok(r.file.map_or(0, |f| f.revision))
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
    let mut syncers: Vec<Syncer> = (0..3)
        .map(|i| Syncer {
            root: base.join(format!("sync-{i}/root")),
            state: base.join(format!("sync-{i}/state")),
            child: None,
        })
        .collect();
    for (i, s) in syncers.iter_mut().enumerate() {
        s.start(&zone, i);
    }

    // A push reaches every server, rendered for each.
    let rev = push(&zone, oned("SERVER_ID = {{id0}}\nNAME = {{name}}\n"))
        .await
        .unwrap();
    for (i, s) in syncers.iter().enumerate() {
        let want = format!("SERVER_ID = {i}\nNAME = zone-{}\n", i + 1);
        poll(
            Duration::from_secs(20),
            "the file on every server",
            || async {
                (s.read("/etc/one/oned.conf").as_deref() == Some(want.as_str())).then_some(())
            },
        )
        .await;
    }
    // Each server reports what it applied.
    poll(Duration::from_secs(20), "three status reports", || async {
        let r = zone
            .kv(0)
            .await
            .range(RangeRequest {
                prefix: zone_sync::keys::STATUS_PREFIX.to_vec(),
                ..RangeRequest::default()
            })
            .await
            .ok()?
            .into_inner();
        let ok = r.kvs.len() == 3
            && r.kvs.iter().all(|kv| {
                let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
                v["applied_revision"].as_u64() >= Some(rev)
                    && v["pending_restarts"][0] == "opennebula.service"
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
    poll(
        Duration::from_secs(20),
        "server 1 at the latest",
        || async {
            (syncers[0].read("/etc/one/oned.conf").as_deref() == Some("SERVER_ID = 0\nV = 3\n"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        syncers[2].read("/etc/one/oned.conf").as_deref(),
        Some("SERVER_ID = 2\nNAME = zone-3\n"),
        "written while its zone-sync was down"
    );
    syncers[2].start(&zone, 2);
    poll(
        Duration::from_secs(20),
        "server 3 at the latest",
        || async {
            (syncers[2].read("/etc/one/oned.conf").as_deref() == Some("SERVER_ID = 2\nV = 3\n"))
                .then_some(())
        },
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
    poll(
        Duration::from_secs(20),
        "the hand edit restored",
        || async {
            (syncers[0].read("/etc/one/oned.conf").as_deref() == Some("SERVER_ID = 0\nV = 3\n"))
                .then_some(())
        },
    )
    .await;
    assert!(
        syncers[0].log().contains("edited on disk: restored"),
        "{}",
        syncers[0].log()
    );

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
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after: Vec<Vec<String>> = syncers.iter().map(|s| tree(&s.root)).collect();
    assert_eq!(before, after);

    // The operator's view: one row per server.
    let out = Command::new(zone_sync_bin().with_file_name("zonectl"))
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
    assert!(text.contains("opennebula.service"), "{text}");
    eprintln!("{text}");
}
