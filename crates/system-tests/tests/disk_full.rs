//! A server whose data directory runs out of space: each server's data on
//! a tmpfs of its own, filled by a file. Below `limits.min_free_disk_mb`
//! the leader refuses writes with RESOURCE_EXHAUSTED (through any server)
//! and a follower takes no new entries; nothing acknowledged is lost, no
//! server exits, and everything resumes once the file is gone. Root only
//! (the mounts).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use testbed::fill_disk as fill;
use testbed::zone::{poll, TestZone};
use tonic::Code;
use zonectl::v1::PutRequest;

/// The tmpfs mounts, unmounted when the test ends (also on a panic).
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn put(key: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        prev_kv: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_loses_nothing_and_resumes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs for each server's data: run it as root"
    );
    let mut zone = TestZone::prepare(3, "[limits]\nmin_free_disk_mb = 24\n");
    let mut mounts = Mounts(Vec::new());
    for i in 0..3 {
        let data = zone.data_dir(i).join("data");
        std::fs::create_dir_all(&data).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs on {}", data.display());
        mounts.0.push(data);
    }
    for i in 0..3 {
        zone.launch(i);
    }
    let leader = zone.wait_leader().await;
    let follower = (leader + 1) % 3;
    for k in 0..20 {
        zone.kv(leader)
            .await
            .put(put(&format!("before/{k}")))
            .await
            .unwrap();
    }

    // The leader's disk below the floor: writes refused, through the
    // leader and through a follower, naming the floor; reads go on.
    let filler = fill(&mounts.0[leader], 8 << 20);
    // Until the floor is measured (every 100 ms) writes still go in: each
    // try has a key of its own, and the refused one must never appear.
    let tries = std::sync::atomic::AtomicU64::new(0);
    let (refused, refused_key) = poll(Duration::from_secs(5), "a refused write", || async {
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
    assert!(
        refused.message().contains("min_free_disk_mb"),
        "{}",
        refused.message()
    );
    let via_follower = zone.kv(follower).await.put(put("refused")).await;
    assert_eq!(zone.value(leader, "refused", false).await, None);
    assert_eq!(
        via_follower.map_err(|s| s.code()).err(),
        Some(Code::ResourceExhausted),
        "a write through a follower"
    );
    assert!(zone.value(follower, "before/19", false).await.is_some());
    std::fs::remove_file(&filler).unwrap();
    poll(Duration::from_secs(5), "writes taken again", || async {
        zone.kv(leader).await.put(put("after/leader")).await.ok()
    })
    .await;

    // A follower's disk below the floor: the zone writes on without it, and
    // it catches up once space is freed.
    let filler = fill(&mounts.0[follower], 8 << 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for k in 0..20 {
        zone.kv(leader)
            .await
            .put(put(&format!("during/{k}")))
            .await
            .unwrap();
    }
    assert_eq!(
        zone.value(follower, "during/19", true).await,
        None,
        "a follower below its floor took new entries"
    );
    std::fs::remove_file(&filler).unwrap();
    poll(
        Duration::from_secs(10),
        "the follower caught up",
        || async { zone.value(follower, "during/19", true).await.map(|_| ()) },
    )
    .await;

    for i in 0..3 {
        assert!(zone.servers[i].is_running(), "server {i} exited");
        for k in [
            "before/0",
            "before/19",
            "after/leader",
            "during/0",
            "during/19",
        ] {
            assert!(
                zone.value(i, k, true).await.is_some(),
                "server {i} lacks {k}"
            );
        }
        assert_eq!(zone.value(i, "refused", true).await, None);
        assert_eq!(zone.value(i, &refused_key, true).await, None);
    }
}
