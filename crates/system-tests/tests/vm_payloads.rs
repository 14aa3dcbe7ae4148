//! Payloads (issue 25) in the QEMU zone: a system extension built from
//! Debian packages (`cargo xtask ext build --name mariadb --packages
//! mariadb-server`; README's test command builds it) is added with
//! `zonectl ext add`, merged by systemd-sysext on all three VMs, usable
//! there (its user resolves through nss-systemd, its daemon runs from the
//! merged /usr), merged again by a VM's boot, and removed everywhere.
//! The managed root /etc/mysql (in the identity) is writable on every VM
//! and kept on the data partition: the extension's defaults fill it in, a
//! file pushed with `zonectl config push` lands there, and both are still
//! there after a reboot, while the rest of /etc stays read-only.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::vm::{target_dir, wait_for, Boot, Lab, VIP};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// Leader-only (zone-vip starts it): shows the extension usable on the
/// leader. It fails until the extension is merged, and is tried again.
const PROBE_UNIT: &str = "[Unit]
Description=Zoned test: the mariadb extension is usable
StartLimitIntervalSec=0
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'getent passwd mysql && /usr/sbin/mariadbd --version && test -f /etc/mysql/mariadb.conf.d/50-server.cnf && { if touch /etc/ext-probe 2>/dev/null; then echo ext-probe: etc writable; else echo ext-probe: etc read-only; fi; } && { if grep -qE \"^[0-9a-f]{32}$$\" /etc/machine-id; then echo ext-probe: machine-id kept; else echo ext-probe: machine-id lost; fi; } && echo ext-probe: usable'
Restart=on-failure
RestartSec=3
StandardOutput=journal+console
";

fn extension() -> Result<PathBuf> {
    let p = target_dir().join("ext/mariadb.raw");
    if !p.exists() {
        bail!(
            "{} is missing: build it first with `cargo xtask ext build --name mariadb --packages mariadb-server` (README's test command does)",
            p.display()
        );
    }
    Ok(p)
}

/// Each server's state of extension `name` in `zonectl -o json ext ls`.
fn states(ls: &serde_json::Value, name: &str) -> Vec<(u64, String)> {
    ls["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let state = s["extensions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == name)
                .and_then(|e| e["state"].as_str())
                .unwrap_or("-")
                .to_owned();
            (s["id"].as_u64().unwrap_or(0), state)
        })
        .collect()
}

#[test]
fn an_extension_is_merged_on_every_vm_kept_across_a_reboot_and_removed_everywhere() -> Result<()> {
    let ext = extension()?;
    let ext_arg = ext.to_str().context("a UTF-8 path")?.to_owned();
    let mut lab = Lab::new("payload-ext", 3)?;
    lab.units = vec![("ext-probe.service".to_owned(), PROBE_UNIT.to_owned())];
    lab.leader_units = vec!["ext-probe.service".to_owned()];
    lab.managed_roots = vec!["/etc/mysql".to_owned()];
    let t0 = Instant::now();
    for id in 1..=3 {
        lab.add_vm(id, Boot::DirectKernel)?;
    }
    for i in 0..3 {
        lab.wait_ready(i, t0, BOOT_LIMIT)?;
    }
    let client = lab.client();
    let vip = format!("{VIP}:7400");
    let ls = |client: &testbed::vm::Client| -> Option<serde_json::Value> {
        let out = client.zonectl(&vip, &["-o", "json", "ext", "ls"]).ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };

    // The VIP answers once the leader's zone-vip holds it, a little after
    // its zoned serves.
    wait_for(BOOT_LIMIT, "the VIP to answer", || {
        lab.healthy(&vip).then_some(())
    })?;

    // Added through the VIP: zonectl waits until every server reports it
    // merged, which zoned says only once the extension's release file
    // shows in the merged /usr.
    let started = Instant::now();
    let out = client.zonectl(&vip, &["ext", "add", &ext_arg])?;
    eprintln!(
        "ext add: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The leader receives the image and serves it to the others: a lease
    // it cannot renew meanwhile shows here (CI once saw it lapse every 3 s
    // for 30 s on a one-vCPU VM, until its watchdog reset it).
    let lapses = lab.console_lines("lease expired without renewal").len();
    let resets = lab.console_lines("softdog: Initiating system reboot");
    if !out.status.success() {
        bail!("zonectl ext add failed ({lapses} lease lapses, watchdog resets: {resets:?})");
    }
    eprintln!(
        "FIGURES: ext add of {} MiB to 3 VMs under TCG, merged everywhere: {:.1} s; lease lapses seen by zone-vip since the boot: {lapses}",
        std::fs::metadata(&ext)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    assert!(
        resets.is_empty(),
        "watchdog resets during ext add: {resets:?}"
    );
    let v = ls(&client).context("zonectl ext ls")?;
    let s = states(&v, "mariadb");
    assert_eq!(
        s.iter().filter(|(_, st)| st == "merged").count(),
        3,
        "{s:?}\n{v:#}"
    );

    // Usable on the leader: the probe (leader-only) resolves the
    // extension's user, runs its daemon and finds its default
    // configuration, filled into the managed root /etc/mysql by the merge.
    let usable = wait_for(
        Duration::from_secs(180),
        "the probe unit on the leader",
        || lab.console_lines("ext-probe: usable").into_iter().next(),
    )?;
    let version = lab.console_lines("mariadbd  Ver");
    let user = lab.console_lines("mysql:x:");
    eprintln!("probe: {usable:?}\n{version:?}\n{user:?}");
    assert!(!version.is_empty(), "mariadbd --version printed nothing");
    assert!(!user.is_empty(), "getent passwd mysql printed nothing");
    assert!(
        !lab.console_lines("ext-probe: etc read-only").is_empty()
            && lab.console_lines("ext-probe: etc writable").is_empty(),
        "/etc outside the managed roots is writable: {:?}",
        lab.console_lines("ext-probe: etc")
    );
    // The overlay made for the mount point did not hide the machine id
    // bound on /etc/machine-id.
    assert!(
        lab.console_lines("ext-probe: machine-id lost").is_empty()
            && !lab.console_lines("ext-probe: machine-id kept").is_empty(),
        "{:?}",
        lab.console_lines("ext-probe: machine-id")
    );

    // A file pushed under the managed root lands on every VM (zoned reads
    // each server's copy for `config diff`: exit 0 when all match).
    let cnf = lab.dir.join("60-zone.cnf");
    std::fs::write(
        &cnf,
        "[mysqld]\n# pushed by the test\nmax_connections = 64\n",
    )?;
    let cnf_arg = cnf.to_str().context("a UTF-8 path")?.to_owned();
    const PUSHED: &str = "/etc/mysql/mariadb.conf.d/60-zone.cnf";
    let out = client.zonectl(&vip, &["config", "push", &cnf_arg, "--path", PUSHED])?;
    if !out.status.success() {
        bail!(
            "zonectl config push: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let on_every_vm = |what: &str| {
        wait_for(Duration::from_secs(90), what, || {
            let out = client.zonectl(&vip, &["config", "diff", PUSHED]).ok()?;
            out.status.success().then_some(())
        })
    };
    on_every_vm("the pushed file on every VM")?;

    // A follower VM cut off and booted again: its boot merges the
    // extension (systemd-sysext.service, before sysinit.target), and its
    // zoned reports it merged again.
    let view = client.show(&vip).context("zonectl show")?;
    let leader = view["leader_id"].as_u64().context("a leader")?;
    let i = lab
        .vms
        .iter()
        .position(|vm| vm.id != leader)
        .context("a follower")?;
    let id = lab.vms[i].id;
    lab.kill(i);
    let down = Instant::now();
    lab.boot(i)?;
    lab.wait_ready(i, Instant::now(), BOOT_LIMIT)?;
    let merged_at_boot: Vec<String> = lab
        .console_lines("Merge System Extension Images")
        .into_iter()
        .filter(|(vm, l)| *vm == id && l.contains("Finished"))
        .map(|(_, l)| l)
        .collect();
    eprintln!("VM {id} after its reboot: {merged_at_boot:?}");
    assert!(
        !merged_at_boot.is_empty(),
        "VM {id}'s boot did not merge the extension (no `Finished ... Merge System Extension Images` on its console)"
    );
    let down_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        - down.elapsed().as_millis() as u64;
    wait_for(Duration::from_secs(120), "the rebooted VM's report", || {
        let v = ls(&client)?;
        let fresh = v["servers"].as_array()?.iter().any(|s| {
            s["id"].as_u64() == Some(id)
                && s["updated_unix_ms"].as_u64().is_some_and(|t| t > down_ms)
        });
        (fresh
            && states(&v, "mariadb")
                .iter()
                .any(|(s, st)| *s == id && st == "merged"))
        .then_some(())
    })?;

    // The managed root persisted: the rebooted VM's zone-provision bound
    // it again and found the defaults filled in before (none to fill), and
    // the pushed file is still the zone's on every VM.
    let roots: Vec<String> = lab
        .console_lines("managed root /etc/mysql: writable")
        .into_iter()
        .filter(|(vm, _)| *vm == id)
        .map(|(_, l)| l)
        .collect();
    eprintln!("VM {id}'s managed root at each boot: {roots:?}");
    assert_eq!(roots.len(), 2, "VM {id}: {roots:?}");
    assert!(
        !roots[1].contains("filled in"),
        "VM {id}'s second boot filled in defaults again: /etc/mysql did not persist: {roots:?}"
    );
    on_every_vm("the pushed file on every VM after the reboot")?;

    // Removed: every server reports it gone.
    let out = client.zonectl(&vip, &["ext", "rm", "mariadb"])?;
    eprintln!(
        "ext rm: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("zonectl ext rm failed");
    }
    let v = ls(&client).context("zonectl ext ls")?;
    assert!(
        v["extensions"].as_array().is_some_and(|a| a.is_empty()),
        "{v:#}"
    );
    assert!(
        states(&v, "mariadb").iter().all(|(_, st)| st == "-"),
        "{v:#}"
    );
    Ok(())
}
