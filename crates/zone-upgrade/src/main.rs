//! `zone-upgrade`: install a bundle into the other root slot, show how this
//! server boots. zoned runs it during a zone upgrade; an operator can run
//! it by hand on a server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use zone_upgrade::{install, Progress, Slot, Status, Target};

#[derive(Debug, Parser)]
#[command(version = zone_version::LONG, about, long_about = None)]
struct Args {
    /// The EFI system partition's mount point.
    #[arg(long, default_value = "/boot/efi", global = true)]
    esp: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify BUNDLE (its signature by a key this image trusts, then every
    /// file), write it to the root slot that is not running, and make that
    /// slot boot next on trial (three tries; marked good once the server is
    /// healthy in its zone, else the loader returns to this slot). Does not
    /// reboot.
    Install {
        bundle: PathBuf,
        /// The directory of trusted minisign public keys.
        #[arg(long, default_value = "/usr/share/zoned/keys")]
        keys: PathBuf,
    },
    /// Verify BUNDLE only: signature and every file; writes nothing.
    Verify {
        bundle: PathBuf,
        #[arg(long, default_value = "/usr/share/zoned/keys")]
        keys: PathBuf,
    },
    /// The running slot and every boot entry, in the loader's order (JSON).
    Status,
    /// Boot assessment (zone-boot-check.service, on a boot that systemd-boot
    /// counts): waits until zoned is SERVING (SERVING_FILE present) and
    /// every unit in --units is active, both holding for --hold seconds;
    /// exits 1 if that has not happened within --timeout seconds, or at
    /// once when one of the units has failed for good (the unit
    /// then reboots the server, and the loader counts a failed try).
    Check {
        #[arg(long, default_value = "/run/zoned/serving")]
        serving_file: PathBuf,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "zoned.service,zone-vip.service,zone-sync.service,zone-mounts.service"
        )]
        units: Vec<String>,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long, default_value_t = 10)]
        hold: u64,
    },
    /// On a counted boot (zone-boot-deadline.service): reboots unless
    /// boot-complete.target is reached within --seconds, whatever stopped
    /// the boot before zone-boot-check could judge it.
    Deadline {
        #[arg(long, default_value_t = 900)]
        seconds: u64,
    },
}

/// What keeps this boot from being good now, if anything; `Err` when it
/// never can be (a unit failed: systemd gave up restarting it).
fn unhealthy(serving_file: &std::path::Path, units: &[String]) -> Result<Option<String>, String> {
    let mut waiting = None;
    if !serving_file.exists() {
        waiting = Some(format!(
            "zoned is not SERVING ({} absent): not a member, no leader, or not caught up",
            serving_file.display()
        ));
    }
    for u in units {
        // ActiveState, then ConditionResult: a unit its condition skipped
        // (zone-vip on a server with no VIP) is not a failure.
        let out = std::process::Command::new("systemctl")
            .args([
                "show",
                "-p",
                "ActiveState",
                "-p",
                "ConditionResult",
                "--value",
                u,
            ])
            .output();
        let text = out
            .as_ref()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut lines = text.lines();
        let (state, condition) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        if state == "failed" {
            return Err(format!(
                "{u} failed (systemd gave up restarting it): this boot cannot become healthy"
            ));
        }
        if waiting.is_none() && state != "active" && !(state == "inactive" && condition == "no") {
            waiting = Some(format!(
                "{u} is {}",
                if state.is_empty() { "unknown" } else { state }
            ));
        }
    }
    Ok(waiting)
}

/// On a counted boot: reboots if boot-complete.target is not reached within
/// `seconds` (the boot stuck before zone-boot-check could run, or in
/// emergency mode: the loader then counts the try as failed).
fn deadline(seconds: u64) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let reached = std::process::Command::new("systemctl")
            .args(["is-active", "--quiet", "boot-complete.target"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if reached {
            println!("boot-complete.target reached: the deadline is off");
            return Ok(());
        }
        if start.elapsed().as_secs() >= seconds {
            eprintln!("boot-complete.target not reached within {seconds} s: rebooting (this try of the new slot failed)");
            let st = std::process::Command::new("systemctl")
                .arg("reboot")
                .status()?;
            anyhow::ensure!(st.success(), "systemctl reboot failed: {st}");
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
}

fn check(serving_file: &std::path::Path, units: &[String], timeout: u64, hold: u64) -> Result<()> {
    let start = std::time::Instant::now();
    let mut good_since: Option<std::time::Instant> = None;
    let mut last_reason = String::new();
    loop {
        match unhealthy(serving_file, units).map_err(anyhow::Error::msg)? {
            None => {
                let since = *good_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed().as_secs() >= hold {
                    println!(
                        "healthy in the zone for {hold} s, {:.0} s after the check started: this boot is good",
                        start.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
            }
            Some(reason) => {
                good_since = None;
                if reason != last_reason {
                    eprintln!("not yet healthy: {reason}");
                    last_reason = reason;
                }
            }
        }
        if start.elapsed().as_secs() >= timeout {
            anyhow::bail!(
                "this boot is not healthy in the zone after {timeout} s ({last_reason}): it is not marked good"
            );
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Check {
            serving_file,
            units,
            timeout,
            hold,
        } => check(&serving_file, &units, timeout, hold)?,
        Command::Deadline { seconds } => deadline(seconds)?,
        Command::Status => {
            let s = Status::read(
                &args.esp,
                &read("/proc/cmdline")?,
                &read("/usr/lib/os-release")?,
            )?;
            println!("{}", serde_json::to_string_pretty(&s)?);
        }
        Command::Verify { bundle, keys } => {
            let keys = zone_bundle::TrustedKeys::load_dir(&keys)?;
            let v = zone_bundle::verify(&bundle, &keys)?;
            println!(
                "{}: {} {} (commit {}), signed by key {}",
                bundle.display(),
                v.manifest.image_id,
                v.manifest.version,
                v.manifest.commit,
                v.key_id
            );
        }
        Command::Install { bundle, keys } => {
            let keys = zone_bundle::TrustedKeys::load_dir(&keys)?;
            let cmdline = read("/proc/cmdline")?;
            let running = Slot::from_cmdline(&cmdline).with_context(|| {
                format!("the kernel command line names no root slot (root=PARTLABEL=zoned-root-a|b): {cmdline}")
            })?;
            let os_release = read("/usr/lib/os-release")?;
            let image_id = os_release
                .lines()
                .find_map(|l| l.strip_prefix("IMAGE_ID="))
                .map(|v| v.trim_matches('"').to_owned())
                .context("/usr/lib/os-release has no IMAGE_ID: not the appliance")?;
            let target = Target {
                esp: args.esp,
                partitions: [Slot::A.device(), Slot::B.device()],
                running,
                image_id,
            };
            let mut last = None;
            let done = install(&bundle, &keys, &target, &mut |p| {
                let (what, done, total) = match p {
                    Progress::Verifying { done, total } => ("verifying", done, total),
                    Progress::Writing { done, total } => ("writing", done, total),
                    Progress::ReadingBack { done, total } => ("reading back", done, total),
                };
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if last != Some((what, pct / 10)) {
                    last = Some((what, pct / 10));
                    eprintln!("{what}: {pct}% of {} MiB", total >> 20);
                }
            })?;
            println!(
                "installed {} in slot {} ({}), signed by key {}: the next boot tries it",
                done.version, done.slot, done.entry, done.key_id
            );
        }
    }
    Ok(())
}
