//! Upgrades on VMs booted by UEFI firmware from flashed disks, as real
//! servers boot: `zonectl upgrade` rolls a zone to a new signed bundle
//! under writes (each server fetches it, writes its other root slot,
//! reboots into it on trial, and is marked good by its boot assessment);
//! a bundle that never becomes healthy rolls back by itself after the
//! loader's three tries; a power cut while a slot is written leaves the
//! server on the slot it ran. (The API's refusals, without VMs:
//! `upgrade_api`.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::vm::{wait_for, Client, Cpu, Image, Lab, VIP};

/// The test bundles `cargo xtask image --test-bundles` writes beside the
/// image (same tree, another version; and one whose zoned never starts).
const NEXT_VERSION: &str = "99.0.0-upgrade-test";
const NEVER_HEALTHY_VERSION: &str = "99.0.1-never-healthy";

fn test_bundle(version: &str, flags: &str) -> Result<PathBuf> {
    let p = testbed::vm::target_dir()
        .join("image")
        .join(format!("zoned-vm-{version}.bundle"));
    if !p.exists() {
        bail!(
            "{} is missing: build the image with `cargo xtask image --profile vm --test-bundles` (or this bundle alone: --bundle-only --version {version}{flags})",
            p.display()
        );
    }
    Ok(p)
}

fn vip() -> String {
    format!("{VIP}:7400")
}

/// `zonectl -o json upgrade status` through the VIP.
fn upgrade_status(client: &Client) -> Option<serde_json::Value> {
    let out = client
        .zonectl(&vip(), &["-o", "json", "upgrade", "status"])
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// The leader and term through the VIP, once three voters agree on one.
fn leader_and_term(client: &Client) -> Option<(u64, u64)> {
    let v = client.show(&vip())?;
    let servers = v["servers"].as_array()?;
    let leader = v["leader_id"].as_u64()?;
    (leader != 0
        && servers.len() == 3
        && servers
            .iter()
            .all(|s| s["error"].as_str().unwrap_or("").is_empty()))
    .then_some((leader, v["term"].as_u64()?))
}

/// Writes `w/<n>` through the VIP until stopped: the keys acknowledged and
/// the longest time between two acknowledgements.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<String>, Gap)>,
}

/// The longest time between two acknowledged writes, when it began (since
/// the writer started), and what the writer's attempts within it saw: how
/// the client met the leader's handoff.
#[derive(Debug, Clone, Default)]
struct Gap {
    longest: Duration,
    began: Duration,
    attempts: Vec<String>,
}

impl Writer {
    fn start(client: Client) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let start = Instant::now();
            let mut last = start;
            let mut gap = Gap::default();
            // The attempts since the last acknowledgement: (began, took,
            // what zonectl said).
            let mut since_last: Vec<String> = Vec::new();
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let key = format!("w/{n:06}");
                let began = Instant::now();
                let out = client.zonectl(&vip(), &["kv", "put", &key, "x"]);
                let ok = out.as_ref().is_ok_and(|o| o.status.success());
                let said = match &out {
                    Ok(_) if ok => "acknowledged".to_owned(),
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                since_last.push(format!(
                    "{:.1} s +{:.1} s: {said}",
                    (began - start).as_secs_f64(),
                    began.elapsed().as_secs_f64()
                ));
                if ok {
                    if last.elapsed() > gap.longest {
                        gap = Gap {
                            longest: last.elapsed(),
                            began: last - start,
                            attempts: std::mem::take(&mut since_last),
                        };
                    }
                    since_last.clear();
                    last = Instant::now();
                    acked.push(key);
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            (acked, gap)
        });
        Writer { stop, handle }
    }

    fn finish(self) -> (Vec<String>, Gap) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("the writer thread")
    }
}

/// `zonectl upgrade` through the VIP with `args`; its output. Stops early,
/// naming the VM, if a VM's firmware hangs after a reset.
fn upgrade(lab: &mut Lab, client: &Client, args: &[&str]) -> Result<std::process::Output> {
    let t = Instant::now();
    let out = lab.zonectl_watching(client, &vip(), &[&["upgrade"][..], args].concat())?;
    eprintln!(
        "zonectl upgrade {} ({:.0} s, {}):\n{}{}",
        args.join(" "),
        t.elapsed().as_secs_f64(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(out)
}

fn server(status: &serde_json::Value, id: u64) -> &serde_json::Value {
    status["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == id))
        .unwrap_or(&serde_json::Value::Null)
}

fn entry_of<'a>(s: &'a serde_json::Value, slot: &str) -> &'a serde_json::Value {
    s["entries"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["slot"] == slot))
        .unwrap_or(&serde_json::Value::Null)
}

/// Three servers flashed with the image (version 1) and booted by their
/// firmware:
/// 1. the power of a server cut while its inactive slot is being written
///    (`zonectl upgrade --server`, the bundle of 2.): it boots the slot it
///    ran and records the cut install as failed; meanwhile another
///    server's install was refused, one at a time;
/// 2. `zonectl upgrade --bundle` of the same tree with another version,
///    a writer through the VIP all along: every server on slot b, running
///    it, marked good, the one whose install was cut included (the same
///    upgrade run again succeeds); leadership moved exactly once (the term
///    rose by one: no election, one transfer); every acknowledged write
///    present;
/// 3. a bundle whose zoned never starts: the first follower tries it three
///    times, its loader boots slot b again by itself, the server records
///    the rollback, and the roll stops with the reason, the other servers
///    untouched; the tries' journal is read after the rollback (`zonectl
///    logs`: one machine id, so one journal, across boots).
///
/// (The power cut comes first so that the roll is the upgrade run again:
/// a separate run again on one server was a fourth install, ~4-5 min of
/// CI under TCG.)
#[test]
fn a_zone_rolls_to_a_new_bundle_under_writes_and_a_bad_one_rolls_back_by_itself() -> Result<()> {
    testbed::vm::require_host()?;
    let next = test_bundle(NEXT_VERSION, "")?;
    let never = test_bundle(NEVER_HEALTHY_VERSION, " --never-healthy")?;
    let mut lab = Lab::with_image("upgrade_roll", 3, Image::find()?)?;
    let t0 = Instant::now();
    for id in 1..=3 {
        lab.add_flashed_vm_with(id, Cpu::Max, &|_| Ok(()))?;
    }
    for i in 0..3 {
        let took = lab.wait_ready(i, t0, Duration::from_secs(600))?;
        eprintln!("VM {} ready after {:.0} s", i + 1, took.as_secs_f64());
    }
    let client = lab.client();
    let (leader0, _) = wait_for(Duration::from_secs(180), "a leader of three", || {
        leader_and_term(&client)
    })?;
    let v1 = upgrade_status(&client).context("upgrade status")?;
    let v1_image = server(&v1, 1)["image"].as_str().unwrap_or("").to_owned();
    for id in 1..=3 {
        let s = server(&v1, id);
        assert_eq!(s["running_slot"], "a", "{s}");
        assert_eq!(s["image"], v1_image.as_str(), "{s}");
        assert_eq!(s["last_upgrade"], serde_json::Value::Null, "{s}");
    }

    // 1. The power cut while slot b is written.
    let victim = (1..=3).find(|&id| id != leader0).unwrap_or(1);
    let mut child = client.zonectl_child_stderr(
        &vip(),
        &[
            "upgrade",
            "--server",
            &victim.to_string(),
            "--bundle",
            next.to_str().unwrap(),
        ],
    )?;
    let stderr = child.stderr.take().context("zonectl's stderr")?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    loop {
        let Some(Ok(line)) = lines.next() else {
            bail!("zonectl ended before server {victim} wrote its slot: {seen:?}");
        };
        seen.push(line.clone());
        if line.starts_with(&format!("server {victim}: writing")) {
            break;
        }
    }
    // One server at a time: another's install is refused while this one's
    // is not settled.
    let other = (1..=3)
        .find(|&id| id != victim && id != leader0)
        .unwrap_or(leader0);
    let out = upgrade(
        &mut lab,
        &client,
        &[
            "--server",
            &other.to_string(),
            "--bundle",
            next.to_str().unwrap(),
        ],
    )?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("server {victim} is being upgraded")),
        "{err}"
    );
    lab.kill(victim as usize - 1);
    let _ = child.kill();
    let _ = child.wait();
    let t1 = Instant::now();
    lab.boot(victim as usize - 1)?;
    lab.wait_ready(victim as usize - 1, t1, Duration::from_secs(300))?;
    let st = wait_for(Duration::from_secs(180), "the cut install recorded", || {
        upgrade_status(&client).filter(|st| server(st, victim)["last_upgrade"]["state"] == "failed")
    })?;
    let s = server(&st, victim);
    assert_eq!(s["running_slot"], "a", "{s}");
    assert_eq!(s["image"], v1_image.as_str(), "{s}");
    assert_eq!(
        entry_of(s, "b"),
        &serde_json::Value::Null,
        "no entry boots the cut slot: {s}"
    );
    let (leader0, term0) = wait_for(Duration::from_secs(180), "a leader of three", || {
        leader_and_term(&client)
    })?;

    // 2. The roll, under writes: for the victim of 1., the same upgrade
    // run again.
    let writer = Writer::start(client.clone());
    std::thread::sleep(Duration::from_secs(5));
    let t = Instant::now();
    let out = upgrade(&mut lab, &client, &["--bundle", next.to_str().unwrap()])?;
    let roll = t.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let (acked, gap) = writer.finish();
    assert!(out.status.success(), "the roll failed");
    let said = String::from_utf8_lossy(&out.stderr);
    let order: Vec<u64> = said
        .lines()
        .filter_map(|l| l.strip_prefix("server ")?.split(':').next()?.parse().ok())
        .fold(Vec::new(), |mut v, id| {
            if v.last() != Some(&id) {
                v.push(id);
            }
            v
        });
    assert_eq!(
        order.iter().filter(|&&id| id == leader0).count(),
        1,
        "the leader's lines come together: {order:?}"
    );
    assert_eq!(order.last(), Some(&leader0), "the leader last: {order:?}");
    let next_image = format!("zoned-vm {NEXT_VERSION}");
    let after = upgrade_status(&client).context("upgrade status")?;
    for id in 1..=3 {
        let s = server(&after, id);
        assert_eq!(s["running_slot"], "b", "{s}");
        assert_eq!(s["image"], next_image.as_str(), "{s}");
        assert_eq!(entry_of(s, "b")["assessment"], "good", "{s}");
        assert_eq!(s["last_upgrade"]["state"], "good", "{s}");
        assert_eq!(s["last_upgrade"]["from_version"], v1_image.as_str(), "{s}");
    }
    let (leader1, term1) = wait_for(Duration::from_secs(60), "a leader of three", || {
        leader_and_term(&client)
    })?;
    assert_ne!(leader1, leader0, "leadership left the last server upgraded");
    assert_eq!(
        term1,
        term0 + 1,
        "leadership moved exactly once (one transfer, no election)"
    );
    let stored = client.zonectl(&vip(), &["-o", "json", "kv", "range", "w/", "--keys-only"])?;
    assert!(stored.status.success());
    let stored: serde_json::Value = serde_json::from_slice(&stored.stdout)?;
    let keys: std::collections::HashSet<String> = stored["kvs"]
        .as_array()
        .context("kvs")?
        .iter()
        .filter_map(|kv| kv["key"].as_str().map(str::to_owned))
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|k| !keys.contains(*k)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "FIGURES rolling upgrade of 3 VMs under TCG: {:.0} s; {} writes acknowledged, longest gap between two {:.1} s, from {:.0} s into the roll",
        roll.as_secs_f64(),
        acked.len(),
        gap.longest.as_secs_f64(),
        gap.began.as_secs_f64() - 5.0
    );
    // Times are since the writer started, 5 s before the roll.
    eprintln!("the writer's attempts in that gap:");
    for a in &gap.attempts {
        eprintln!("  {a}");
    }

    // 3. A bundle that never becomes healthy.
    let first_follower = (1..=3).find(|&id| id != leader1).unwrap_or(1);
    let out = upgrade(&mut lab, &client, &["--bundle", never.to_str().unwrap()])?;
    assert_eq!(out.status.code(), Some(1), "the roll must stop");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "server {first_follower}: the upgrade to zoned-vm {NEVER_HEALTHY_VERSION} rolled back"
        )),
        "{err}"
    );
    assert!(err.contains("tries"), "the reason names the tries: {err}");
    let st = upgrade_status(&client).context("upgrade status")?;
    let s = server(&st, first_follower);
    assert_eq!(s["running_slot"], "b", "{s}");
    assert_eq!(s["image"], next_image.as_str(), "{s}");
    assert_eq!(s["last_upgrade"]["state"], "rolled back", "{s}");
    assert_eq!(entry_of(s, "a")["assessment"], "bad", "{s}");
    for id in (1..=3).filter(|&id| id != first_follower) {
        let s = server(&st, id);
        assert_eq!(s["image"], next_image.as_str(), "untouched: {s}");
        assert_eq!(s["last_upgrade"]["state"], "good", "untouched: {s}");
    }
    let text = client.zonectl(&vip(), &["upgrade", "status"])?;
    eprintln!("{}", String::from_utf8_lossy(&text.stdout));
    // Why the tries failed is still in the server's journal after the
    // rollback: its machine id is kept on its data partition, so the
    // journal of every boot is one journal (with a machine id made up at
    // each boot, `zonectl logs` reads the running boot's alone).
    let server_id = first_follower.to_string();
    let out = client.zonectl(
        &vip(),
        &["logs", "--server", &server_id, "-u", "zoned", "-n", "20000"],
    )?;
    assert!(
        out.status.success(),
        "zonectl logs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let journal = String::from_utf8_lossy(&out.stdout);
    let tries = journal
        .lines()
        .filter(|l| l.contains("this root was built with --never-healthy"))
        .count();
    assert!(
        tries >= 3,
        "server {first_follower}'s journal after the rollback has {tries} of the 3 failed tries' zoned lines"
    );

    lab.kill(0);
    lab.kill(1);
    lab.kill(2);
    Ok(())
}
