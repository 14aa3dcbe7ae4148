//! Three VMs booted from the built image form one zone; the VIP follows the
//! leader across a VM killed outright; acknowledged writes survive the
//! loss of every VM at once. One VM boots the way a real server does:
//! OVMF firmware, then the unified kernel image from the EFI partition.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qemu_tests::{wait_for, Boot, Lab, VIP};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn vip() -> String {
    format!("{VIP}:7400")
}

/// Boots the founders 1..=3 at once and waits for each one's health check.
fn start_zone(name: &str, boots: [Boot; 3]) -> Result<Lab> {
    let mut lab = Lab::new(name, 3)?;
    let t0 = Instant::now();
    for (i, boot) in boots.into_iter().enumerate() {
        lab.add_vm(i as u64 + 1, boot)?;
    }
    for i in 0..3 {
        let took = lab.wait_ready(i, t0, BOOT_LIMIT)?;
        eprintln!(
            "VM {} ({:?}) ready after {:.1} s",
            lab.vms[i].id,
            lab.vms[i].boot,
            took.as_secs_f64()
        );
    }
    Ok(lab)
}

/// The zone as seen through the VIP once it has three voters and a leader
/// that all agree on.
fn wait_zone(lab: &Lab, limit: Duration) -> Result<serde_json::Value> {
    wait_for(limit, "three voters and a leader through the VIP", || {
        let v = lab.show(&vip())?;
        let servers = v["servers"].as_array()?;
        let voters = servers
            .iter()
            .filter(|s| s["voter"].as_bool() == Some(true))
            .count();
        let leaders = servers
            .iter()
            .filter(|s| s["state"].as_str() == Some("leader"))
            .count();
        (voters == 3 && leaders == 1 && v["leader_id"].as_u64().is_some_and(|l| l > 0)).then_some(v)
    })
}

fn put(lab: &Lab, endpoint: &str, key: &str, value: &str) -> bool {
    lab.zonectl(endpoint, &["kv", "put", key, value])
        .is_ok_and(|o| o.status.success())
}

fn get(lab: &Lab, endpoint: &str, key: &str) -> Option<String> {
    let out = lab
        .zonectl(endpoint, &["-o", "json", "kv", "get", key])
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["value"].as_str().map(str::to_owned)
}

#[test]
fn three_vms_form_one_zone_and_the_vip_answers() -> Result<()> {
    // VM 3 boots through UEFI firmware and the unified kernel image.
    let lab = start_zone(
        "three_vms_form_one_zone",
        [Boot::DirectKernel, Boot::DirectKernel, Boot::Uefi],
    )?;
    let zone = wait_zone(&lab, Duration::from_secs(120))?;
    let leader = zone["leader_id"].as_u64().context("leader id")?;
    eprintln!("zone formed; leader {leader}");
    let names: Vec<&str> = zone["servers"]
        .as_array()
        .context("servers")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names.len(), 3, "{zone}");
    // The VIP is the leader's: zonectl through it reaches the leader itself.
    assert_eq!(
        zone["member_id"].as_u64(),
        Some(leader),
        "the VIP did not lead to the leader: {zone}"
    );
    assert!(
        put(&lab, &vip(), "hello", "world"),
        "a write through the VIP failed"
    );
    // Every server has it, the UEFI-booted one included.
    for vm in &lab.vms {
        let ep = vm.endpoint();
        wait_for(Duration::from_secs(30), "the write on every server", || {
            (get(&lab, &ep, "hello").as_deref() == Some("world")).then_some(())
        })?;
    }
    Ok(())
}

#[test]
fn the_vip_follows_the_leader_when_its_vm_dies_and_no_write_is_lost() -> Result<()> {
    let mut lab = start_zone("vip_follows_the_leader", [Boot::DirectKernel; 3])?;
    let zone = wait_zone(&lab, Duration::from_secs(120))?;
    let leader = zone["leader_id"].as_u64().context("leader id")?;

    // A writer through the VIP, recording every acknowledged write.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let n_before = 5;
    for k in 0..n_before {
        let key = format!("w{k:04}");
        if put(&lab, &vip(), &key, "1") {
            acked.lock().unwrap().push(key);
        }
    }
    assert_eq!(
        acked.lock().unwrap().len(),
        n_before,
        "writes before the kill failed"
    );

    let li = lab
        .vms
        .iter()
        .position(|v| v.id == leader)
        .context("leader VM")?;
    let t0 = Instant::now();
    lab.kill(li);
    eprintln!("killed VM {leader} (the leader)");
    // Writes through the VIP resume on the new leader.
    let mut k = n_before;
    let resumed = wait_for(Duration::from_secs(60), "a write through the VIP", || {
        let key = format!("w{k:04}");
        k += 1;
        put(&lab, &vip(), &key, "1").then(|| {
            acked.lock().unwrap().push(key);
            t0.elapsed()
        })
    })?;
    eprintln!(
        "writes through the VIP resumed {:.1} s after the kill",
        resumed.as_secs_f64()
    );
    let zone = lab.show(&vip()).context("show through the VIP")?;
    let new_leader = zone["leader_id"].as_u64().context("leader")?;
    assert_ne!(new_leader, leader, "the dead VM still leads: {zone}");
    assert_eq!(
        zone["member_id"].as_u64(),
        Some(new_leader),
        "VIP not on the new leader"
    );
    for _ in 0..5 {
        let key = format!("w{k:04}");
        k += 1;
        if put(&lab, &vip(), &key, "1") {
            acked.lock().unwrap().push(key);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    // The killed VM boots again and rejoins as a follower.
    let t1 = Instant::now();
    lab.boot(li)?;
    lab.wait_ready(li, t1, BOOT_LIMIT)?;
    let ep = lab.vms[li].endpoint();
    wait_for(
        Duration::from_secs(60),
        "the rebooted VM to catch up",
        || {
            let v = lab.show(&ep)?;
            let me = v["servers"]
                .as_array()?
                .iter()
                .find(|s| s["id"].as_u64() == Some(leader))?
                .clone();
            (me["state"].as_str() == Some("follower")).then_some(())
        },
    )?;
    let keys = acked.lock().unwrap().clone();
    for key in &keys {
        wait_for(
            Duration::from_secs(30),
            "an acknowledged write on the rebooted VM",
            || get(&lab, &ep, key).map(|_| ()),
        )?;
    }
    eprintln!(
        "{} acknowledged writes all present on the rebooted VM",
        keys.len()
    );
    Ok(())
}

#[test]
fn every_acknowledged_write_survives_all_vms_killed_at_once() -> Result<()> {
    let mut lab = start_zone("all_vms_killed", [Boot::DirectKernel; 3])?;
    wait_zone(&lab, Duration::from_secs(120))?;
    let mut acked = Vec::new();
    for k in 0..20 {
        let key = format!("p{k:04}");
        if put(&lab, &vip(), &key, &format!("v{k}")) {
            acked.push((key, format!("v{k}")));
        }
    }
    assert!(
        acked.len() >= 15,
        "too few writes acknowledged: {}",
        acked.len()
    );
    for i in 0..3 {
        lab.kill(i);
    }
    eprintln!(
        "all three VMs killed after {} acknowledged writes",
        acked.len()
    );
    let t0 = Instant::now();
    for i in 0..3 {
        lab.boot(i)?;
    }
    for i in 0..3 {
        lab.wait_ready(i, t0, BOOT_LIMIT)?;
    }
    wait_zone(&lab, Duration::from_secs(120))?;
    for vm in &lab.vms {
        let ep = vm.endpoint();
        for (key, value) in &acked {
            let got = wait_for(Duration::from_secs(30), "an acknowledged write", || {
                get(&lab, &ep, key)
            })?;
            assert_eq!(&got, value, "VM {}: {key}", vm.id);
        }
    }
    Ok(())
}
