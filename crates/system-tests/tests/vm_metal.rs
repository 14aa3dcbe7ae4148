//! The metal image, installed as an operator installs it on a server (the
//! raw image copied onto the disk, the identity written on its EFI
//! partition, UEFI firmware), on QEMU's default CPU model: qemu64 has no
//! SSE4.2 and no PCLMULQDQ, like the kvm64 type of older Proxmox VE
//! versions. zoned runs there (it used to die with SIGILL and be restarted
//! forever), leads its one-server zone, and serves writes through the VIP.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use testbed::vm::{wait_for, Boot, Cpu, Image, Lab, VIP};

#[test]
fn the_metal_image_runs_a_zone_on_qemus_default_cpu() -> Result<()> {
    testbed::vm::require_host()?;
    let image = Image::find_profile("metal")?;
    let mut lab = Lab::with_image("metal_on_qemu64", 1, image)?;
    let t0 = Instant::now();
    lab.add_vm_on(1, Boot::Flashed, Cpu::Qemu64)?;
    let took = lab.wait_ready(0, t0, Duration::from_secs(300))?;
    eprintln!("metal VM (qemu64) ready after {:.1} s", took.as_secs_f64());

    let client = lab.client();
    let vip = format!("{VIP}:7400");
    let zone = wait_for(
        Duration::from_secs(120),
        "the server leading its zone behind the VIP",
        || {
            let v = client.show(&vip)?;
            (v["leader_id"].as_u64() == Some(1) && v["member_id"].as_u64() == Some(1)).then_some(v)
        },
    )?;
    let server = &zone["servers"][0];
    assert_eq!(
        server["name"].as_str(),
        Some("flashed-1"),
        "the identity did not come from the EFI partition: {zone}"
    );
    assert_eq!(
        server["host"]["software_checksums"].as_bool(),
        Some(true),
        "on qemu64 the store's checksums must run from lookup tables: {zone}"
    );
    wait_for(Duration::from_secs(60), "a write through the VIP", || {
        client.put(&vip, "metal", "qemu64").then_some(())
    })?;
    let read = client
        .get(&vip, "metal")
        .context("read back through the VIP")?;
    assert_eq!(read, "qemu64");
    Ok(())
}
