//! Space: each server's data on a tmpfs of its own. Below
//! `limits.min_free_disk_mb` a server raises the space alarm and the whole
//! zone refuses writes that add data (RESOURCE_EXHAUSTED naming the server
//! and its free space) while reads, deletes and compaction are served;
//! below a quarter of it (the hard floor) a server takes nothing that adds
//! data, but deletes and compactions still reach it.
//! Nothing acknowledged is lost, no server exits, and writes resume once
//! space is back, by itself or after deletes and a compaction. Root only
//! (the mounts).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use testbed::fill_disk as fill;
use testbed::zone::{poll, TestZone};
use tonic::Code;
use zonectl::v1::{DeleteRequest, GetRequest, PutRequest, RangeRequest};

/// The tmpfs mounts, unmounted when the test ends (also on a panic).
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// Three servers prepared with `extra` config, each with its data on a
/// tmpfs of `mb` MiB, launched.
fn zone_on_tmpfs(extra: &str, mb: u64) -> (TestZone, Mounts) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs for each server's data: run it as root"
    );
    let mut zone = TestZone::prepare(3, extra);
    let mut mounts = Mounts(Vec::new());
    for i in 0..3 {
        let data = zone.data_dir(i).join("data");
        std::fs::create_dir_all(&data).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs on {}", data.display());
        mounts.0.push(data);
    }
    for i in 0..3 {
        zone.launch(i);
    }
    (zone, mounts)
}

fn put(key: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        prev_kv: false,
    }
}

fn delete(key: &str, prefix: bool) -> DeleteRequest {
    DeleteRequest {
        key: key.into(),
        prefix,
        prev_kv: false,
    }
}

/// zonectl's answer (stdout), which must have succeeded.
fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "zonectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The ids of the servers with an alarm standing, as `zonectl alarm ls`
/// says through server `via`.
fn alarmed(zone: &TestZone, via: usize) -> Vec<u64> {
    let ep = zone.servers[via].client.to_string();
    let out = ok(zone.zonectl(&["--endpoints", &ep, "-o", "json", "alarm", "ls"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["server"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_raises_the_alarm_refuses_writes_loses_nothing_and_resumes() {
    let (mut zone, mounts) = zone_on_tmpfs("[limits]\nmin_free_disk_mb = 24\n", 256);
    let leader = zone.wait_leader().await;
    let follower = (leader + 1) % 3;
    let leader_id = zone.servers[leader].id;
    let follower_id = zone.servers[follower].id;
    let ep = zone.servers[follower].client.to_string();
    for k in 0..20 {
        zone.kv(leader)
            .await
            .put(put(&format!("before/{k}")))
            .await
            .unwrap();
    }

    // The leader's disk below the alarm's threshold (above the hard
    // floor): writes refused, through the leader and through a follower,
    // naming the leader and its free space; reads and deletes served.
    let filler = fill(&mounts.0[leader], 12 << 20);
    // Until the alarm is raised (measured every half second) writes still go
    // in: each try has a key of its own, and the refused one must never
    // appear.
    let tries = std::sync::atomic::AtomicU64::new(0);
    let (refused, refused_key) = poll(Duration::from_secs(10), "a refused write", || async {
        let key = format!(
            "try/{}",
            tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        match zone.kv(leader).await.put(put(&key)).await {
            Err(s) if s.code() == Code::ResourceExhausted => Some((s, key)),
            _ => None,
        }
    })
    .await;
    let why = refused.message();
    assert!(
        why.contains(&format!("server {leader_id} ("))
            && why.contains("MiB free")
            && why.contains("limits.min_free_disk_mb (24 MiB)"),
        "{why}"
    );
    let via_follower = zone.kv(follower).await.put(put("refused")).await;
    assert_eq!(
        via_follower.map_err(|s| s.code()).err(),
        Some(Code::ResourceExhausted),
        "a write through a follower"
    );
    assert!(zone.value(follower, "before/19", false).await.is_some());
    zone.kv(follower)
        .await
        .delete(delete("before/0", false))
        .await
        .expect("a delete is served while the alarm stands");
    assert_eq!(alarmed(&zone, follower), vec![leader_id]);
    let table = ok(zone.zonectl(&["--endpoints", &ep, "alarm", "ls"]));
    eprintln!("$ zonectl alarm ls\n{table}");
    assert!(
        table.starts_with("SERVER") && table.contains("no-space"),
        "{table}"
    );
    let show = ok(zone.zonectl(&["--endpoints", &ep, "show"]));
    eprintln!("$ zonectl show\n{show}");
    assert!(
        show.contains(&format!("ALARM server {leader_id} (")) && show.contains("free on its data"),
        "{show}"
    );
    std::fs::remove_file(&filler).unwrap();
    poll(
        Duration::from_secs(10),
        "the alarm cleared by itself and writes taken",
        || async { zone.kv(leader).await.put(put("after/leader")).await.ok() },
    )
    .await;
    assert!(alarmed(&zone, leader).is_empty());

    // A follower's disk below the hard floor (a quarter, 6 MiB): its alarm
    // still reaches the zone, writes are refused naming it; a delete is
    // taken even there (it records no value while the alarm stands), so
    // deletes and compactions reach every server.
    let filler = fill(&mounts.0[follower], 3 << 20);
    poll(Duration::from_secs(10), "the follower's alarm", || async {
        (alarmed(&zone, leader) == vec![follower_id]).then_some(())
    })
    .await;
    let refused = zone.kv(leader).await.put(put("refused")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains(&format!("server {follower_id} (")),
        "{}",
        refused.message()
    );
    zone.kv(leader)
        .await
        .delete(delete("before/1", false))
        .await
        .unwrap();
    poll(
        Duration::from_secs(10),
        "the delete applied on the follower below its hard floor",
        || async {
            // Its own copy, and a read that must succeed (a failed read is
            // not an absent key).
            zone.kv(follower)
                .await
                .get(GetRequest {
                    key: b"before/1".to_vec(),
                    serializable: true,
                })
                .await
                .expect("a read on the follower")
                .into_inner()
                .kv
                .is_none()
                .then_some(())
        },
    )
    .await;
    // An operator's disarm clears it; a server still short raises it again.
    let said = ok(zone.zonectl(&[
        "--endpoints",
        &ep,
        "alarm",
        "disarm",
        "--server",
        &follower_id.to_string(),
    ]));
    assert!(
        said.contains(&format!("server {follower_id}'s alarm cleared")),
        "{said}"
    );
    poll(
        Duration::from_secs(25),
        "the alarm raised again",
        || async { (alarmed(&zone, leader) == vec![follower_id]).then_some(()) },
    )
    .await;
    std::fs::remove_file(&filler).unwrap();
    poll(Duration::from_secs(10), "writes taken again", || async {
        zone.kv(leader).await.put(put("after/follower")).await.ok()
    })
    .await;
    poll(
        Duration::from_secs(10),
        "the follower caught up",
        || async { zone.value(follower, "after/follower", true).await.map(drop) },
    )
    .await;
    let none = ok(zone.zonectl(&["--endpoints", &ep, "alarm", "ls"]));
    assert!(none.starts_with("no alarm"), "{none}");

    for i in 0..3 {
        assert!(zone.servers[i].is_running(), "server {i} exited");
        let mut want = vec!["after/leader".to_owned(), "after/follower".to_owned()];
        want.extend((2..20).map(|k| format!("before/{k}")));
        for k in &want {
            assert!(
                zone.value(i, k, true).await.is_some(),
                "server {i} lacks {k}"
            );
        }
        for k in ["refused", refused_key.as_str(), "before/0", "before/1"] {
            assert_eq!(zone.value(i, k, true).await, None, "server {i} has {k}");
        }
    }
}

/// Bytes that do not compress (RocksDB compresses the store).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every server running, holding exactly `acked` under `w/`.
async fn check_all(zone: &mut TestZone, acked: &[(String, Vec<u8>)]) {
    let want: std::collections::BTreeMap<_, _> = acked.iter().cloned().collect();
    for i in 0..3 {
        assert!(zone.servers[i].is_running(), "server {i} exited");
        let got: std::collections::BTreeMap<_, _> = zone
            .kv(i)
            .await
            .max_decoding_message_size(usize::MAX)
            .range(RangeRequest {
                prefix: b"w/".to_vec(),
                serializable: true,
                ..RangeRequest::default()
            })
            .await
            .unwrap_or_else(|e| panic!("range on server {i}: {e}"))
            .into_inner()
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8(kv.key).unwrap(), kv.value))
            .collect();
        assert_eq!(got.len(), want.len(), "server {i}: keys");
        assert!(got == want, "server {i}: a value differs");
    }
}

/// The test: the store itself fills the disk. Writes of 64 KiB
/// until refused: refused cleanly (RESOURCE_EXHAUSTED naming a server), no
/// server exits, every acknowledged write readable on every server; half
/// the keys deleted (served under the alarm), the history compacted and
/// RocksDB compacted (`zonectl compact now --physical`): the alarm clears
/// by itself and writes resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_filling_its_disk_is_refused_cleanly_and_resumes_after_deletes_and_compaction() {
    let (mut zone, mounts) = zone_on_tmpfs("[limits]\nmin_free_disk_mb = 256\n", 512);
    let leader = zone.wait_leader().await;
    let ep = zone.servers[leader].client.to_string();
    let free = |i: usize| {
        let st = nix::sys::statvfs::statvfs(&mounts.0[i]).unwrap();
        st.blocks_available() * st.fragment_size()
    };
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let mut kv = zone.kv(leader).await;
    let refused = loop {
        assert!(
            acked.len() < 4000,
            "4000 writes of 64 KiB and none refused; free: {:?}",
            (0..3).map(free).collect::<Vec<_>>()
        );
        let i = acked.len();
        let key = format!("w/{}/{i:05}", if i.is_multiple_of(2) { "a" } else { "b" });
        let value = noise(i as u64, 64 << 10);
        match kv
            .put(PutRequest {
                key: key.clone().into(),
                value: value.clone(),
                prev_kv: false,
            })
            .await
        {
            Ok(_) => acked.push((key, value)),
            Err(s) if s.code() == Code::ResourceExhausted => break s,
            Err(s) => panic!("write {i} failed otherwise: {s}"),
        }
    };
    eprintln!(
        "{} writes of 64 KiB acknowledged, then refused: {}; free MiB {:?}",
        acked.len(),
        refused.message(),
        (0..3).map(|i| free(i) >> 20).collect::<Vec<_>>()
    );
    assert!(
        refused.message().contains("MiB free on its data directory")
            || refused.message().contains("hard floor"),
        "{}",
        refused.message()
    );
    // Every server has applied everything the leader acknowledged.
    poll(
        Duration::from_secs(10),
        "the followers caught up",
        || async {
            let n = acked.len();
            for i in 0..3 {
                let keys = zone
                    .kv(i)
                    .await
                    .range(RangeRequest {
                        prefix: b"w/".to_vec(),
                        serializable: true,
                        keys_only: true,
                        ..RangeRequest::default()
                    })
                    .await
                    .ok()?;
                if keys.into_inner().kvs.len() != n {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    check_all(&mut zone, &acked).await;

    // Half the keys deleted, through the alarm; the history compacted and
    // RocksDB with it on every server.
    zone.kv(leader)
        .await
        .delete(delete("w/a/", true))
        .await
        .expect("a delete is served while the alarm stands");
    acked.retain(|(k, _)| k.starts_with("w/b/"));
    // Deletes record the values they remove in the history: until the
    // compaction, they take room rather than give it back.
    let still = zone.kv(leader).await.put(put("w/refused")).await;
    eprintln!(
        "after the deletes, before the compaction: free MiB {:?}, a write: {:?}",
        (0..3).map(|i| free(i) >> 20).collect::<Vec<_>>(),
        still.as_ref().map(drop).map_err(|s| s.code())
    );
    if still.is_ok() {
        acked.push(("w/refused".into(), b"v".to_vec()));
    }
    let said = ok(zone.zonectl(&[
        "--endpoints",
        &ep,
        "--timeout",
        "120",
        "compact",
        "now",
        "--physical",
    ]));
    eprintln!("$ zonectl compact now --physical\n{said}");
    assert!(
        said.contains("history compacted") && said.contains("store compacted on server"),
        "{said}"
    );
    poll(
        Duration::from_secs(30),
        "the alarms cleared and a write taken",
        || async {
            zone.kv(leader)
                .await
                .put(PutRequest {
                    key: "w/after".into(),
                    value: b"resumed".to_vec(),
                    prev_kv: false,
                })
                .await
                .ok()
        },
    )
    .await;
    eprintln!(
        "after the deletes and the compaction: free MiB {:?}",
        (0..3).map(|i| free(i) >> 20).collect::<Vec<_>>()
    );
    acked.push(("w/after".into(), b"resumed".to_vec()));
    poll(
        Duration::from_secs(10),
        "the followers caught up",
        || async {
            for i in 0..3 {
                zone.value(i, "w/after", true).await?;
            }
            Some(())
        },
    )
    .await;
    check_all(&mut zone, &acked).await;
}
