//! The appliance's A/B boot with systemd-boot's boot counting, on a VM
//! booted by UEFI firmware from a flashed disk, as a real server boots.
//!
//! The disk is prepared by hand here as an install leaves it (the image's
//! update bundle, `zone-upgrade install`'s unit tests cover writing it):
//! slot b's kernel image on the EFI partition as a trial entry
//! (`zoned-0002-b+3.efi`). First with slot b's partition empty: the kernel
//! cannot mount that root, the loader counts three failed tries and then
//! boots slot a by itself (the rollback), and the server serves its zone.
//! Then with the bundle's root filesystem written into slot b and a new
//! trial entry: slot b boots, zone-boot-check.service waits until zoned is
//! SERVING, and systemd-bless-boot marks the entry good.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::vm::{wait_for, Client, Cpu, Image, Lab, VIP};

/// The vm image's manifest.
fn manifest() -> Result<serde_json::Value> {
    let path = testbed::vm::target_dir().join("image/manifest-vm.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| {
            format!(
                "{}: build the image (cargo xtask image --profile vm)",
                path.display()
            )
        })?,
    )?)
}

fn sh(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// `member` of the image's update bundle, into `to`.
fn from_bundle(member: &str, to: &Path) -> Result<()> {
    let m = manifest()?;
    let bundle = testbed::vm::target_dir().join("image").join(
        m["bundle"]["file"]
            .as_str()
            .context("manifest: bundle.file")?,
    );
    let bytes = sh(Command::new("tar").arg("-xOf").arg(&bundle).arg(member))?;
    std::fs::write(to, bytes)?;
    Ok(())
}

/// The EFI partition of a raw disk, for mtools (it starts 1 MiB in).
fn esp(disk: &Path) -> String {
    format!("{}@@1M", disk.display())
}

/// The boot entries on the disk's EFI partition (EFI/Linux), sorted.
fn entries(disk: &Path) -> Result<Vec<String>> {
    let out = sh(Command::new("mdir")
        .args(["-b", "-i"])
        .arg(esp(disk))
        .arg("::/EFI/Linux"))?;
    let mut v: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next().map(str::to_owned))
        .filter(|n| n.ends_with(".efi"))
        .collect();
    v.sort();
    Ok(v)
}

/// Slot b's kernel image, from the bundle, as entry `name`.
fn add_entry(disk: &Path, work: &Path, name: &str) -> Result<()> {
    let uki = work.join("zoned-b.efi");
    if !uki.exists() {
        from_bundle("zoned-b.efi", &uki)?;
    }
    sh(Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(esp(disk))
        .arg(&uki)
        .arg(format!("::/EFI/Linux/{name}")))?;
    Ok(())
}

/// The bundle's root filesystem written into slot b's partition.
fn write_slot_b(disk: &Path, work: &Path) -> Result<()> {
    let m = manifest()?;
    let start = m["partitions"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "zoned-root-b"))
        .and_then(|p| p["start_bytes"].as_u64())
        .context("manifest: no zoned-root-b")?;
    let zst = work.join("root.img.zst");
    from_bundle(zone_bundle::ROOT_IMAGE, &zst)?;
    let img = work.join("root.img");
    sh(Command::new("zstd")
        .args(["-q", "-d", "-f"])
        .arg(&zst)
        .arg("-o")
        .arg(&img))?;
    sh(Command::new("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={}", start >> 20)))?;
    Ok(())
}

/// The journal lines of `unit` on the VM, through the VIP.
fn unit_log(client: &Client, unit: &str) -> Result<String> {
    let out = client.zonectl(&format!("{VIP}:7400"), &["logs", "-u", unit, "-n", "200"])?;
    if !out.status.success() {
        bail!(
            "zonectl logs -u {unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_slot_that_fails_its_tries_rolls_back_and_a_healthy_slot_is_marked_good() -> Result<()> {
    testbed::vm::require_host()?;
    let mut lab = Lab::with_image("upgrade_boot_counting", 1, Image::find()?)?;
    lab.keep_logs();
    let work: PathBuf = testbed::vm::target_dir().join("vm-tests/upgrade_boot_counting/work");
    std::fs::create_dir_all(&work)?;

    // 1. A trial entry for slot b, whose partition is empty.
    let t0 = Instant::now();
    let w = work.clone();
    lab.add_flashed_vm_with(1, Cpu::Max, &move |disk| {
        assert_eq!(
            entries(disk)?,
            ["zoned-0001-a.efi"],
            "the image's EFI partition"
        );
        add_entry(disk, &w, "zoned-0002-b+3.efi")
    })?;
    let took = lab.wait_ready(0, t0, Duration::from_secs(600))?;
    eprintln!(
        "slot b failed its tries, slot a serving after {:.0} s",
        took.as_secs_f64()
    );
    let client = lab.client();
    wait_for(Duration::from_secs(120), "a write through the VIP", || {
        client
            .put(&format!("{VIP}:7400"), "upgrade", "slot-a")
            .then_some(())
    })?;
    lab.kill(0);
    let disk = lab.disk(0).to_owned();
    assert_eq!(
        entries(&disk)?,
        ["zoned-0001-a.efi", "zoned-0002-b+0-3.efi"],
        "three tries counted down, then slot a booted"
    );
    let boots = lab.console_lines("Rebooting automatically due to panic");
    assert!(
        boots.len() >= 3,
        "the three tries of slot b should each have failed to mount its root: {boots:?}"
    );

    // 2. Slot b written with the bundle's root, a new trial entry.
    sh(Command::new("mdel")
        .arg("-i")
        .arg(esp(&disk))
        .arg("::/EFI/Linux/zoned-0002-b+0-3.efi"))?;
    write_slot_b(&disk, &work)?;
    add_entry(&disk, &work, "zoned-0003-b+3.efi")?;
    let t1 = Instant::now();
    lab.boot(0)?;
    let took = lab.wait_ready(0, t1, Duration::from_secs(300))?;
    eprintln!("slot b serving after {:.0} s", took.as_secs_f64());
    // The data written under slot a is there under slot b (the data
    // partition is shared by both).
    let read = wait_for(Duration::from_secs(120), "a read through the VIP", || {
        client.get(&format!("{VIP}:7400"), "upgrade")
    })?;
    assert_eq!(read, "slot-a");
    // The assessment ran on this counted boot and found it healthy, and
    // the entry loses its counter.
    let log = wait_for(
        Duration::from_secs(180),
        "zone-boot-check's verdict",
        || {
            unit_log(&client, "zone-boot-check")
                .ok()
                .filter(|l| l.contains("this boot is good"))
        },
    )?;
    eprintln!("{log}");
    wait_for(Duration::from_secs(120), "the entry marked good", || {
        entries(&disk)
            .ok()
            .filter(|e| e.iter().any(|n| n == "zoned-0003-b.efi"))
    })?;
    lab.kill(0);
    assert_eq!(entries(&disk)?, ["zoned-0001-a.efi", "zoned-0003-b.efi"]);
    Ok(())
}
