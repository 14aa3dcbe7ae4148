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

/// A file of the image's root filesystem (partition `zoned-root-a` of the
/// raw image), read with debugfs.
fn root_file(raw: &std::path::Path, manifest: &serde_json::Value, path: &str) -> Result<Vec<u8>> {
    let offset = manifest["partitions"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "zoned-root-a"))
        .and_then(|p| p["start_bytes"].as_u64())
        .context("no zoned-root-a in the manifest's partitions")?;
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(format!("{}?offset={offset}", raw.display()))
        .output()
        .context("debugfs (e2fsprogs)")?;
    anyhow::ensure!(
        out.status.success() && !out.stdout.is_empty(),
        "debugfs cat {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Both images ship the tests' own release binaries and a signed update
/// bundle their root trusts: the bundle verifies with the keys read out of
/// the image, its manifest names the image's version and the release
/// profile, and /usr/bin/zoned in the image is target/release/zoned.
#[test]
fn each_image_ships_the_release_build_and_a_bundle_signed_by_a_key_it_trusts() -> Result<()> {
    testbed::vm::require_host()?;
    let dir = testbed::vm::target_dir().join("image");
    for profile in ["vm", "metal"] {
        let image = Image::find_profile(profile)?;
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(
            dir.join(format!("manifest-{profile}.json")),
        )?)?;
        assert_eq!(manifest["binaries_profile"], "release", "{manifest}");
        // The last console is /dev/console, where systemd's and journald's
        // messages go: a VM's serial port, a server's screen.
        let last_console = manifest["kernel_cmdline"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|a| a.strip_prefix("console="))
            .next_back()
            .map(|c| c.split(',').next().unwrap_or(c).to_owned());
        let expected = if profile == "vm" { "ttyS0" } else { "tty0" };
        assert_eq!(last_console.as_deref(), Some(expected), "{manifest}");

        let mut keys = zone_bundle::TrustedKeys::default();
        let trusted = manifest["bundle"]["trusted_keys"]
            .as_array()
            .context("bundle.trusted_keys")?;
        assert!(!trusted.is_empty(), "{manifest}");
        for id in trusted {
            let id = id.as_str().context("key id")?;
            let text = root_file(
                &image.raw,
                &manifest,
                &format!("/usr/share/zoned/keys/{id}.pub"),
            )?;
            keys.add(id, &String::from_utf8(text)?)?;
        }
        let bundle = dir.join(manifest["bundle"]["file"].as_str().context("bundle.file")?);
        let v = zone_bundle::verify(&bundle, &keys)
            .with_context(|| format!("{} with the image's own keys", bundle.display()))?;
        assert_eq!(v.manifest.binaries_profile, "release");
        assert_eq!(v.manifest.image_id, format!("zoned-{profile}"));
        assert_eq!(
            Some(v.manifest.version.as_str()),
            manifest["image_version"].as_str()
        );
        for f in [zone_bundle::ROOT_IMAGE, "zoned-a.efi", "zoned-b.efi"] {
            assert!(
                v.manifest.file(f).is_some(),
                "{f} missing: {:?}",
                v.manifest
            );
        }
        let os_release =
            String::from_utf8(root_file(&image.raw, &manifest, "/usr/lib/os-release")?)?;
        assert!(
            os_release.contains(&format!("IMAGE_VERSION={}", v.manifest.version)),
            "{os_release}"
        );

        // The image's zoned is the tests' (debug info stripped).
        let ours = tempfile::NamedTempFile::new()?;
        let strip = std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg(testbed::binary("zoned"))
            .arg(ours.path())
            .status()?;
        assert!(strip.success());
        assert!(
            testbed::bin_dir().ends_with("release"),
            "the tests run from {}: run them with --release (README)",
            testbed::bin_dir().display()
        );
        let shipped = root_file(&image.raw, &manifest, "/usr/bin/zoned")?;
        assert!(
            shipped == std::fs::read(ours.path())?,
            "/usr/bin/zoned in the {profile} image is not {}: rebuild the image",
            testbed::binary("zoned").display()
        );
    }
    Ok(())
}
