//! `cargo xtask qemu up` (a three-VM zone to work with) and `cargo xtask
//! bench qemu` (image and boot figures), on testbed's VM harness: the VMs
//! boot the built vm-profile image under TCG on a bridge in a namespace of
//! their own, and are all killed when the command ends.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::vm::{wait_for, Boot, Lab, VIP};

use crate::image::{self, Profile};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// Builds the vm image unless one is there.
fn ensure_image(target: &Path) -> Result<()> {
    if testbed::vm::Image::find().is_err() {
        eprintln!("no vm image yet: building it (cargo xtask image --profile vm)");
        image::build(&image::Options::new(Profile::Vm), target)?;
    }
    Ok(())
}

/// Boots VMs 1..=n of a zone of `n` at once; the time until each answers
/// its health check.
fn boot_zone(name: &str, n: u64) -> Result<(Lab, Vec<Duration>)> {
    let mut lab = Lab::new(name, n)?;
    let t0 = Instant::now();
    for id in 1..=n {
        lab.add_vm(id, Boot::DirectKernel)?;
    }
    let mut ready = Vec::new();
    for i in 0..n as usize {
        let d = lab.wait_ready(i, t0, BOOT_LIMIT)?;
        eprintln!("VM {} ready after {:.1} s", i + 1, d.as_secs_f64());
        ready.push(d);
    }
    Ok((lab, ready))
}

/// The zone through the VIP, once every VM is a voter and one leads.
fn wait_zone(lab: &Lab, n: usize) -> Result<serde_json::Value> {
    let client = lab.client();
    let vip = format!("{VIP}:7400");
    wait_for(Duration::from_secs(120), "a leader behind the VIP", || {
        let v = client.show(&vip)?;
        let servers = v["servers"].as_array()?;
        let leaders = servers
            .iter()
            .filter(|s| s["state"].as_str() == Some("leader"))
            .count();
        (servers.len() == n && leaders == 1 && v["member_id"] == v["leader_id"]).then_some(v)
    })
}

pub fn up(target: &Path) -> Result<()> {
    ensure_image(target)?;
    let (mut lab, _) = boot_zone("qemu-up", 3)?;
    lab.keep_logs();
    wait_zone(&lab, 3)?;
    let zonectl = target.join("debug/zonectl");
    let vip = format!("{VIP}:7400");
    let out = lab.client().zonectl(&vip, &["show"])?;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "Three VMs are up (serial consoles in {}).",
        lab.dir.display()
    );
    println!("Talk to the zone through its VIP from another terminal:");
    let creds = lab.pki.admin_dir();
    println!(
        "  ip netns exec {} {} --credentials {} --endpoints {vip} show",
        lab.ns,
        zonectl.display(),
        creds.display()
    );
    println!(
        "  ip netns exec {} {} --credentials {} --endpoints {vip} kv put hello world",
        lab.ns,
        zonectl.display(),
        creds.display()
    );
    println!(
        "(the zone's certificates are in {}; each VM got its own by fw_cfg)",
        lab.pki.dir.display()
    );
    println!("Ctrl-C stops the VMs and removes the namespace.");
    wait_for_signal()?;
    eprintln!("stopping the VMs");
    Ok(())
}

fn wait_for_signal() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT")?;
    set.wait().context("waiting for SIGINT")?;
    Ok(())
}

/// Time from a kill of the leader's VM to the first write acknowledged
/// through the VIP: a new attempt every 50 ms, each with its own deadline,
/// so the figure is the failover and not a retry interval.
fn failover_once(lab: &mut Lab) -> Result<Duration> {
    let zone = wait_zone(lab, 3)?;
    let leader = zone["leader_id"].as_u64().context("leader id")?;
    let li = lab
        .vms
        .iter()
        .position(|v| v.id == leader)
        .context("leader VM")?;
    let t0 = Instant::now();
    lab.kill(li);
    let creds = lab.pki.admin().clone();
    let took = lab.in_ns(move |rt| {
        rt.block_on(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut every = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if t0.elapsed() > Duration::from_secs(120) {
                            return None;
                        }
                        let tx = tx.clone();
                        let creds = creds.clone();
                        tokio::spawn(async move {
                            if crate::bench::put_fresh(&format!("{VIP}:7400"), Some(&creds), Duration::from_secs(2)).await {
                                let _ = tx.send(t0.elapsed());
                            }
                        });
                    }
                    Some(d) = rx.recv() => return Some(d),
                }
            }
        })
    })?;
    let took = took.context("no write through the VIP within 120 s of the kill")?;
    let t1 = Instant::now();
    lab.boot(li)?;
    lab.wait_ready(li, t1, BOOT_LIMIT)?;
    Ok(took)
}

pub fn bench(target: &Path, runs: usize, skip_fresh: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the QEMU benchmark builds the image and a network namespace: run it as root");
    }
    let fresh = if skip_fresh {
        None
    } else {
        eprintln!("== image from scratch (a new Debian root tree)");
        Some(image::build(
            &image::Options {
                fresh_root: true,
                ..image::Options::new(Profile::Vm)
            },
            target,
        )?)
    };
    eprintln!("== image from the cached root tree");
    let cached = image::build(&image::Options::new(Profile::Vm), target)?;

    eprintln!("== one VM (a zone of one)");
    let (lab, one) = boot_zone("bench-one", 1)?;
    drop(lab);
    eprintln!("== three VMs at once");
    let (mut lab, three) = boot_zone("bench-three", 3)?;
    let t0 = Instant::now();
    wait_zone(&lab, 3)?;
    let zone_after = three.iter().max().copied().unwrap_or_default() + t0.elapsed();
    let mut failovers = Vec::new();
    for r in 0..runs {
        let d = failover_once(&mut lab)?;
        eprintln!(
            "failover {}/{runs}: first write through the VIP {:.2} s after the leader VM was killed",
            r + 1,
            d.as_secs_f64()
        );
        failovers.push(d.as_secs_f64());
    }
    drop(lab);

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!();
    println!(
        "{:<48} {:>10}",
        "MEASUREMENT (vm profile, TCG, this machine)", "VALUE"
    );
    if let Some(f) = &fresh {
        println!(
            "{:<48} {:>8.0} s",
            "image build, new root tree (mmdebstrap)", f.seconds
        );
        println!(
            "{:<48} {:>8.0} s",
            "  of which the root tree", f.root_tree_seconds
        );
    }
    println!(
        "{:<48} {:>8.0} s",
        "image build, cached root tree", cached.seconds
    );
    println!(
        "{:<48} {:>6.0} MiB",
        "raw image (dd to a disk; sparse)",
        mib(cached.raw_bytes)
    );
    println!(
        "{:<48} {:>6.0} MiB",
        "  allocated on disk",
        mib(cached.raw_allocated_bytes)
    );
    println!("{:<48} {:>6.0} MiB", "qcow2 image", mib(cached.qcow2_bytes));
    println!(
        "{:<48} {:>8.1} s",
        "QEMU start to zoned ready, one VM",
        one[0].as_secs_f64()
    );
    println!(
        "{:<48} {:>8.1} s",
        "QEMU start to zoned ready, three at once (last)",
        three
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
    );
    println!(
        "{:<48} {:>8.1} s",
        "QEMU start to a leader behind the VIP",
        zone_after.as_secs_f64()
    );
    for (i, f) in failovers.iter().enumerate() {
        println!(
            "{:<48} {:>8.2} s",
            format!("failover through the VIP, run {}", i + 1),
            f
        );
    }
    let json = serde_json::json!({
        "image_fresh": fresh,
        "image_cached": cached,
        "ready_one_vm_s": one[0].as_secs_f64(),
        "ready_three_vms_s": three.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "leader_behind_vip_s": zone_after.as_secs_f64(),
        "failover_s": failovers,
    });
    crate::write_results(&target.join("bench"), "qemu", &json)
}

/// Waits until every one of the `n` VMs reports datastore `name` in one of
/// `states`; how long that took.
fn wait_storage(
    lab: &Lab,
    n: usize,
    name: &str,
    states: &[&str],
    limit: Duration,
) -> Result<Duration> {
    let client = lab.client();
    let vip = format!("{VIP}:7400");
    let t0 = Instant::now();
    wait_for(
        limit,
        &format!("datastore {name} {} on every VM", states.join(" or ")),
        || {
            let s = client.storage_states(&vip, name)?;
            (s.len() == n && s.iter().all(|(_, st)| states.contains(&st.as_str()))).then_some(())
        },
    )?;
    Ok(t0.elapsed())
}

/// `bench storage`: three VMs and nfs-ganesha on the host side of their
/// bridge; one NFS datastore (`required`, probe every 1 s, timeout 4 s).
/// Times, over `runs` runs each: the NFS server stopped (SIGSTOP) until
/// every VM reports the datastore hung or failed; and only the leader's
/// path to the server cut until another VM leads behind the VIP.
pub fn bench_storage(target: &Path, runs: usize, leader_runs: usize) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the storage benchmark boots VMs in a network namespace: run it as root");
    }
    ensure_image(target)?;
    let (lab, _) = boot_zone("bench-storage", 3)?;
    wait_zone(&lab, 3)?;
    let nfs = testbed::nfs::Ganesha::start(&lab.ns, testbed::vm::HOST_ADDR, &lab.dir.join("nfs"))?;
    let client = lab.client();
    let vip = format!("{VIP}:7400");
    let (interval_ms, timeout_ms) = (1000, 4000);
    client.add_nfs_datastore(
        &vip,
        &nfs,
        "images",
        "/var/lib/one/datastores/100",
        testbed::vm::NFS_BENCH_OPTIONS,
    )?;
    let limit = Duration::from_secs(120);
    let mounted = wait_storage(&lab, 3, "images", &["mounted"], limit)?;
    eprintln!(
        "mounted on the three VMs {:.1} s after `storage add`",
        mounted.as_secs_f64()
    );
    let mut detect = Vec::new();
    for r in 0..runs {
        nfs.pause();
        let d = wait_storage(&lab, 3, "images", &["hung", "failed"], limit)?;
        nfs.resume();
        let back = wait_storage(&lab, 3, "images", &["mounted"], limit)?;
        eprintln!(
            "run {}/{runs}: NFS server stopped, every VM reported it after {:.2} s; healthy again {:.2} s after it continued",
            r + 1,
            d.as_secs_f64(),
            back.as_secs_f64()
        );
        detect.push(d.as_secs_f64());
    }
    let mut moves = Vec::new();
    for r in 0..leader_runs {
        let zone = wait_zone(&lab, 3)?;
        let leader = zone["leader_id"].as_u64().context("leader id")?;
        let addr = format!("{}.{leader}", testbed::vm::NET);
        nfs.cut(&addr, true)?;
        let t0 = Instant::now();
        let moved = wait_for(limit, "another VM leading behind the VIP", || {
            let v = client.show(&vip)?;
            let l = v["leader_id"].as_u64()?;
            (l != leader && v["member_id"].as_u64() == Some(l)).then_some(l)
        });
        let took = t0.elapsed();
        nfs.cut(&addr, false)?;
        let new = moved?;
        wait_storage(&lab, 3, "images", &["mounted"], limit)?;
        eprintln!(
            "run {}/{leader_runs}: VM {leader} alone lost its path to the NFS server; VM {new} led behind the VIP {:.2} s later",
            r + 1,
            took.as_secs_f64()
        );
        moves.push(took.as_secs_f64());
    }
    drop(nfs);
    drop(lab);
    let sorted = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v
    };
    let pct = |v: &[f64], p: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
    };
    let (d, m) = (sorted(&detect), sorted(&moves));
    println!();
    println!(
        "{:<64} {:>8} {:>8} {:>8}",
        "MEASUREMENT (3 VMs, TCG, probe 1 s / timeout 4 s)", "p50", "p99", "runs"
    );
    println!(
        "{:<64} {:>6.2} s {:>6.2} s {:>8}",
        "NFS server stopped -> every VM reports it hung/failed",
        pct(&d, 50.0),
        pct(&d, 99.0),
        d.len()
    );
    println!(
        "{:<64} {:>6.2} s {:>6.2} s {:>8}",
        "leader alone loses NFS -> another VM leads behind the VIP",
        pct(&m, 50.0),
        pct(&m, 99.0),
        m.len()
    );
    let json = serde_json::json!({
        "probe_interval_ms": interval_ms,
        "probe_timeout_ms": timeout_ms,
        "mounted_after_add_s": mounted.as_secs_f64(),
        "detect_hung_s": detect,
        "leader_moved_s": moves,
    });
    crate::write_results(&target.join("bench"), "storage", &json)
}
