//! Three VMs booted from the built image form one zone; the VIP follows the
//! leader across a VM killed outright; acknowledged writes survive the
//! loss of every VM at once. Two VMs boot the way a real server does:
//! OVMF firmware, then the unified kernel image from the EFI partition; one
//! of them from the raw image with its identity written on that partition,
//! on QEMU's default CPU model (qemu64: no SSE4.2, no PCLMULQDQ).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testbed::vm::{wait_for, Boot, Client, Cpu, Lab, VIP};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn vip() -> String {
    format!("{VIP}:7400")
}

/// Boots the founders 1..=3 at once and waits for each one's health check.
fn start_zone(name: &str, boots: [Boot; 3]) -> Result<Lab> {
    start_zone_on(name, boots.map(|b| (b, Cpu::Max)))
}

/// [`start_zone`] with each VM's CPU model.
fn start_zone_on(name: &str, vms: [(Boot, Cpu); 3]) -> Result<Lab> {
    let mut lab = Lab::new(name, 3)?;
    let t0 = Instant::now();
    for (i, (boot, cpu)) in vms.into_iter().enumerate() {
        lab.add_vm_on(i as u64 + 1, boot, cpu)?;
    }
    for i in 0..3 {
        let took = lab.wait_ready(i, t0, BOOT_LIMIT)?;
        eprintln!(
            "VM {} ({:?}, cpu {}) ready after {:.1} s",
            lab.vms[i].id,
            lab.vms[i].boot,
            lab.vms[i].cpu.model(),
            took.as_secs_f64()
        );
    }
    Ok(lab)
}

/// Three VMs booted directly, every identity naming `leader_unit` (given
/// as `text`) as the only leader-only unit.
fn start_zone_with_unit(name: &str, leader_unit: &str, text: &str) -> Result<Lab> {
    start_zone_with(name, leader_unit, text, None)
}

/// [`start_zone_with_unit`], every VM also given one disk of `disk_mib`
/// MiB with an empty ext4 file system, if any ([`Lab::add_shared_disk`]).
fn start_zone_with(
    name: &str,
    leader_unit: &str,
    text: &str,
    disk_mib: Option<u64>,
) -> Result<Lab> {
    let mut lab = Lab::new(name, 3)?;
    if let Some(mib) = disk_mib {
        lab.add_shared_disk(mib)?;
    }
    lab.units = vec![(leader_unit.to_owned(), text.to_owned())];
    lab.leader_units = vec![leader_unit.to_owned()];
    let t0 = Instant::now();
    for id in 1..=3 {
        lab.add_vm(id, Boot::DirectKernel)?;
    }
    for i in 0..3 {
        lab.wait_ready(i, t0, BOOT_LIMIT)?;
    }
    Ok(lab)
}

/// The zone as seen through the VIP once it has three voters and a leader
/// that all agree on.
fn wait_zone(lab: &Lab, limit: Duration) -> Result<serde_json::Value> {
    let client = lab.client();
    wait_for(limit, "three voters and a leader through the VIP", || {
        let v = client.show(&vip())?;
        let servers = v["servers"].as_array()?;
        let voters = servers
            .iter()
            .filter(|s| s["voter"].as_bool() == Some(true))
            .count();
        let leaders = servers
            .iter()
            .filter(|s| s["state"].as_str() == Some("leader"))
            .count();
        // ... and the VIP led to the leader itself.
        let leader = v["leader_id"].as_u64().filter(|&l| l > 0)?;
        (voters == 3 && leaders == 1 && v["member_id"].as_u64() == Some(leader)).then_some(v)
    })
}

/// Writes through the VIP in a loop on a thread of its own until stopped,
/// recording every acknowledged key.
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Writer {
    fn start(client: Client, prefix: &'static str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                let key = format!("{prefix}{n:05}");
                n += 1;
                if client.put(&vip(), &key, "1") {
                    acked.push(key);
                    c.store(acked.len(), Ordering::Relaxed);
                }
            }
            acked
        });
        Writer {
            stop,
            count,
            thread,
        }
    }

    /// Waits until `n` writes were acknowledged (a zone that just formed
    /// under TCG may still change leader once or twice).
    fn wait_acked(&self, n: usize) -> Result<()> {
        wait_for(
            Duration::from_secs(90),
            "acknowledged writes through the VIP",
            || (self.count.load(Ordering::Relaxed) >= n).then_some(()),
        )
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("writer thread")
    }
}

/// `zonectl` through the VIP, tried again while no connection could be
/// made (nothing was sent, so nothing applied): right after forming, under
/// TCG, the lease and the VIP with it may still come and go for seconds.
fn through_vip(client: &Client, args: &[&str]) -> Result<std::process::Output> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = client.zonectl(&vip(), args)?;
        let unreachable = String::from_utf8_lossy(&out.stderr).contains("no endpoint answered");
        if out.status.success() || !unreachable || Instant::now() > deadline {
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until a leader other than `not` answers through the VIP; the
/// zone as it shows it.
fn wait_new_leader(client: &Client, not: u64) -> Result<serde_json::Value> {
    wait_for(
        Duration::from_secs(60),
        "a new leader behind the VIP",
        || {
            let v = client.show(&vip())?;
            let l = v["leader_id"].as_u64()?;
            (l != not && v["member_id"].as_u64() == Some(l)).then_some(v)
        },
    )
}

/// Waits until server `id`, asked at `endpoint`, reports itself a follower.
fn wait_follower(client: &Client, endpoint: &str, id: u64, what: &str) -> Result<()> {
    wait_for(Duration::from_secs(60), what, || {
        let v = client.show(endpoint)?;
        let me = v["servers"]
            .as_array()?
            .iter()
            .find(|s| s["id"].as_u64() == Some(id))?
            .clone();
        (me["state"].as_str() == Some("follower")).then_some(())
    })
}

/// `zonectl [global] config push /proc/self/cmdline --path PATH [more]`
/// through the VIP, which must succeed.
fn push_through_vip(
    client: &Client,
    path: &str,
    global: &[&str],
    more: &[&str],
) -> Result<std::process::Output> {
    let push = ["config", "push", "/proc/self/cmdline", "--path", path];
    let out = through_vip(client, &[global, &push[..], more].concat())?;
    assert!(
        out.status.success(),
        "config push {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// `zonectl version` through the VIP: every VM runs the zoned of this
/// tree (as the zonectl built beside it) on the image built from it;
/// `zonectl show` has zone-vip's VIP on the leader alone.
fn versions_and_vip_holder(client: &Client, leader: u64) -> Result<()> {
    let own = client.zonectl(&vip(), &["--version"])?;
    let own = String::from_utf8_lossy(&own.stdout).trim().to_owned();
    let build = own.strip_prefix("zonectl ").context("zonectl --version")?;
    let (version, commit) = build.split_once('+').context("version+commit")?;
    let out = through_vip(client, &["-o", "json", "version"])?;
    assert!(out.status.success(), "zonectl version: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["client"]["build_commit"], commit, "{v}");
    let servers = v["servers"].as_array().context("servers")?;
    assert_eq!(servers.len(), 3, "{v}");
    for s in servers {
        assert_eq!(s["version"], version, "{s}");
        assert_eq!(s["build_commit"], commit, "{s}");
        let image = s["image_version"].as_str().unwrap_or_default();
        assert!(
            image.starts_with("zoned-") && image.ends_with(&format!(" {build}")),
            "server {}: image {image:?}, not one built from {build}",
            s["id"]
        );
    }
    let table = through_vip(client, &["version"])?;
    eprintln!(
        "zonectl version:\n{}",
        String::from_utf8_lossy(&table.stdout)
    );
    // zone-vip tells its zoned what it holds as it acknowledges the lease.
    let vip_address = format!("{VIP}/");
    wait_for(Duration::from_secs(30), "the VIP column", || {
        let v = client.show(&vip())?;
        let holders: Vec<u64> = v["servers"]
            .as_array()?
            .iter()
            .filter(|s| {
                s["vips_held"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x.as_str().is_some_and(|x| x.starts_with(&vip_address)))
                })
            })
            .filter_map(|s| s["id"].as_u64())
            .collect();
        (holders == [leader]).then_some(())
    })?;
    let show = through_vip(client, &["show"])?;
    eprintln!("zonectl show:\n{}", String::from_utf8_lossy(&show.stdout));
    Ok(())
}

/// `zonectl logs`: VM 2's journal read on VM 2 through the VIP.
fn journal_over_the_api(client: &Client, names: &[String]) -> Result<()> {
    let out = through_vip(
        client,
        &[
            "-o", "json", "logs", "--server", "2", "-u", "zoned", "-n", "5000",
        ],
    )?;
    assert!(
        out.status.success(),
        "zonectl logs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("zonectl logs -o json: one object per line")?;
    assert!(!entries.is_empty() && entries.len() <= 5000);
    for e in &entries {
        // zoned's own entries, and systemd's about zoned.service
        // (journalctl -u matches both).
        assert!(
            e["unit"] == "zoned.service" || e["identifier"] == "systemd",
            "not zoned's entry: {e}"
        );
        assert_eq!(e["hostname"], names[1].as_str(), "not VM 2's entry: {e}");
    }
    assert!(
        entries.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.contains("serving metrics"))),
        "zoned's start on VM 2 is not in its journal: {entries:?}"
    );
    let times: Vec<i64> = entries
        .iter()
        .filter_map(|e| e["time_unix_us"].as_i64())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "entries out of order"
    );
    let text = through_vip(client, &["logs", "--server", "2", "-u", "zoned", "-n", "5"])?;
    eprintln!(
        "zonectl logs --server 2 -u zoned -n 5:\n{}",
        String::from_utf8_lossy(&text.stdout)
    );
    // A unit name that is not one is refused, naming the field.
    let bad = through_vip(client, &["logs", "--unit", "zoned;reboot"])?;
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && said.contains("units"), "{said}");
    Ok(())
}

/// A journal stream ends on the server when its client goes away: one
/// more follower than the server runs at once (4), each killed after its
/// first entry, then a plain read is still served.
fn journal_streams_end_with_their_client(client: &Client, endpoint: &str) -> Result<()> {
    for _ in 0..5 {
        let f = Follower::start(client, endpoint, &["-o", "json", "logs", "-n", "1", "-f"])?;
        let got = f.wait_line(Duration::from_secs(30), 0, |_| true);
        let said = f.stop();
        assert!(got, "a follower got no entry: {said:?}");
    }
    let out = client.zonectl(endpoint, &["logs", "-n", "3"])?;
    assert!(
        out.status.success(),
        "after 5 followers went away: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `zonectl ... logs -f -o json` running, its entries collected.
struct Follower {
    child: std::process::Child,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Follower {
    fn start(client: &Client, endpoint: &str, args: &[&str]) -> Result<Follower> {
        let mut child = client.zonectl_child(endpoint, args)?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(l);
            }
        });
        Ok(Follower { child, lines })
    }

    /// Waits until an entry after the first `skip` matches `want`.
    fn wait_line(
        &self,
        within: Duration,
        skip: usize,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .skip(skip)
                .any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|e| want(&e)));
            if found {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Kills zonectl (as Ctrl-C would); the lines it printed.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        let lines = self.lines.lock().unwrap().clone();
        lines
    }
}

impl Drop for Follower {
    /// A test that fails leaves no zonectl behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The zone formed, the API and the VIP checked; then, on the same three
/// VMs (a 3-VM boot under TCG is 1.5-2.5 min of CI), three failures in
/// turn, each leaving the zone whole for the next: the leader paused and
/// resumed, the leader killed and booted again, all three killed at once
/// and booted again.
#[test]
fn three_vms_form_one_zone_the_vip_answers_and_it_rides_out_leader_failures() -> Result<()> {
    let mut lab = three_vms_form_one_zone_and_the_vip_answers()?;
    eprintln!("== the leader paused, then resumed");
    all_vms_up(&mut lab)?;
    a_resumed_leader_vm_neither_announces_nor_answers_for_the_vip(&lab)?;
    eprintln!("== the leader killed, then booted again");
    all_vms_up(&mut lab)?;
    the_vip_follows_the_leader_when_its_vm_dies_and_no_write_is_lost(&mut lab)?;
    eprintln!("== all three killed at once, then booted again");
    all_vms_up(&mut lab)?;
    every_acknowledged_write_survives_all_vms_killed_at_once(&mut lab)?;
    all_vms_up(&mut lab)?;
    Ok(())
}

/// Every VM's QEMU runs and no watchdog ever reset one: each phase starts
/// on a whole zone. (A VM a phase left dead would show only as a later
/// phase's quorum timeout: the zone still lists it as a voter.)
fn all_vms_up(lab: &mut Lab) -> Result<()> {
    for vm in &mut lab.vms {
        if !vm.running() {
            bail!("VM {} is not running", vm.id);
        }
    }
    let resets = lab.console_lines("softdog: Initiating system reboot");
    if !resets.is_empty() {
        bail!("watchdog resets: {resets:?}");
    }
    Ok(())
}

fn three_vms_form_one_zone_and_the_vip_answers() -> Result<Lab> {
    // VM 2 is installed as a server is: the raw image on its disk, its
    // identity on the EFI partition, UEFI boot, on QEMU's default CPU model
    // (no SSE4.2: zoned's store must still run there). VM 3 boots through
    // UEFI firmware and the unified kernel image too, its identity by
    // fw_cfg.
    let lab = start_zone_on(
        "three_vms_form_one_zone",
        [
            (Boot::DirectKernel, Cpu::Max),
            (Boot::Flashed, Cpu::Qemu64),
            (Boot::Uefi, Cpu::Max),
        ],
    )?;
    let zone = wait_zone(&lab, Duration::from_secs(120))?;
    let leader = zone["leader_id"].as_u64().context("leader id")?;
    eprintln!("zone formed; leader {leader}");
    // A server's name arrives with its own answer to the leader, which may
    // come a moment after the zone formed: ask until all three have one.
    let client = lab.client();
    let names: Vec<String> = wait_for(Duration::from_secs(60), "every server's name", || {
        let v = client.show(&vip())?;
        let names: Vec<String> = v["servers"]
            .as_array()?
            .iter()
            .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        (names.len() == 3 && names.iter().all(|n| !n.is_empty())).then_some(names)
    })?;
    assert!(
        names.iter().any(|n| n == "flashed-2"),
        "the flashed VM did not take its identity from its EFI partition: {names:?}"
    );
    // Each VM's disk is 4 GiB, the image 2.5: the data partition (1 GiB in
    // the image) was grown to the end of the disk at the first boot. Each
    // server's figures arrive with its answer to the leader: ask until all
    // three have answered.
    let grown = wait_for(
        Duration::from_secs(60),
        "every server's disk figures",
        || {
            let v = client.show(&vip())?;
            let totals: Vec<u64> = v["servers"]
                .as_array()?
                .iter()
                .map(|s| s["host"]["disk_total_bytes"].as_u64())
                .collect::<Option<_>>()?;
            (totals.len() == 3).then_some(totals)
        },
    )?;
    for (i, total) in grown.iter().enumerate() {
        assert!(
            *total > 2 * 1024 * 1024 * 1024,
            "server {}: the data partition was not grown ({total} bytes)",
            i + 1
        );
    }
    // The qemu64 VM's store runs its checksums from lookup tables, the
    // others' on the CPU's CRC-32C instructions, as each server reports.
    let v = client.show(&vip()).context("zonectl show")?;
    for s in v["servers"].as_array().context("servers")? {
        let id = s["id"].as_u64().context("server id")?;
        assert_eq!(
            s["host"]["software_checksums"].as_bool(),
            Some(id == 2),
            "server {id}'s checksums (VM 2 alone is on qemu64): {s}"
        );
    }
    // On each VM the only open TCP ports are zoned's: its two gRPC ports,
    // TLS only (a plaintext gRPC call gets no answer), and its metrics,
    // plain HTTP as Prometheus scrapes, figures only; health answers over
    // TLS without a client certificate. The console lists the sockets
    // (zone-ports.service).
    for vm in &lab.vms {
        let open = lab.open_tcp_ports(&vm.addr())?;
        assert_eq!(open, [7400, 7401, 7402], "VM {}: open TCP ports", vm.id);
        for port in [7400, 7401] {
            let ep = format!("{}:{port}", vm.addr());
            assert!(!lab.answers_plaintext(&ep), "{ep} answers in plaintext");
        }
        let metrics = wait_for(Duration::from_secs(30), "a scrape of the metrics", || {
            lab.scrape(&vm.addr())
        })?;
        let shown: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                let name = l.split(' ').next().unwrap_or_default();
                [
                    "zoned_raft_term",
                    "zoned_raft_is_leader",
                    "zoned_raft_commit_index",
                    "zoned_lease_held",
                    "zoned_disk_wal_fsync_duration_seconds_count",
                ]
                .contains(&name)
            })
            .collect();
        assert_eq!(shown.len(), 5, "VM {}: metrics:\n{metrics}", vm.id);
        eprintln!(
            "VM {}: GET http://{}:7402/metrics from the lab's namespace:\n{}",
            vm.id,
            vm.addr(),
            shown.join("\n")
        );
        // SERVING needs a read barrier through the leader: asked until it
        // answers so (a TCG guest may be slow for a moment).
        wait_for(Duration::from_secs(30), "health SERVING over TLS", || {
            lab.healthy(&vm.endpoint()).then_some(())
        })?;
        let console = std::fs::read_to_string(&vm.serial).unwrap_or_default();
        let listening: Vec<&str> = console
            .lines()
            .filter(|l| l.contains("LISTEN") || l.contains("Netid"))
            .collect();
        eprintln!(
            "VM {} (ss -ltnup on its console):\n{}",
            vm.id,
            listening.join("\n")
        );
    }
    // The VIP is the leader's: zonectl through it reaches the leader itself.
    assert_eq!(
        zone["member_id"].as_u64(),
        Some(leader),
        "the VIP did not lead to the leader: {zone}"
    );
    // Right after forming, under TCG, leadership may still move once:
    // the VIP then answers again within moments.
    wait_for(Duration::from_secs(60), "a write through the VIP", || {
        client.put(&vip(), "hello", "world").then_some(())
    })?;
    // Every server has it, the UEFI-booted one included.
    for vm in &lab.vms {
        let ep = vm.endpoint();
        wait_for(Duration::from_secs(30), "the write on every server", || {
            (client.get(&ep, "hello").as_deref() == Some("world")).then_some(())
        })?;
    }
    // A managed file pushed through the VIP is written on every VM by its
    // zone-sync, which reports the revision it applied.
    let pushed = push_through_vip(
        &client,
        "/etc/zoned/managed/probe.conf",
        &["-o", "json"],
        &[],
    )?;
    let rev = serde_json::from_slice::<serde_json::Value>(&pushed.stdout)?["revision"]
        .as_u64()
        .context("push revision")?;
    wait_for(Duration::from_secs(60), "zone-sync on every VM", || {
        let out = client
            .zonectl(&vip(), &["-o", "json", "config", "status"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let servers = v["servers"].as_array()?;
        (servers.len() == 3
            && servers.iter().all(|s| {
                s["applied_revision"].as_u64() >= Some(rev) && s["files"].as_u64() == Some(1)
            }))
        .then_some(())
    })?;
    // Each VM's zoned reads its own copy for `config diff`: all match.
    let diff = through_vip(&client, &["config", "diff"])?;
    let text = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff.status.success() && text.contains("3 copies checked (1 file on 3 servers): 0 differ"),
        "config diff: {text}{}",
        String::from_utf8_lossy(&diff.stderr)
    );

    versions_and_vip_holder(&client, leader)?;
    journal_over_the_api(&client, &names)?;
    // zone-vip's entries on VM 3, followed while the roll below restarts it.
    let follower = Follower::start(
        &client,
        &lab.vms[2].endpoint(),
        &["-o", "json", "logs", "-u", "zone-vip", "-n", "1", "-f"],
    )?;
    // Its first entry (the last one before) says the stream runs.
    assert!(
        follower.wait_line(Duration::from_secs(30), 0, |_| true),
        "zonectl logs -f printed nothing"
    );

    // A file whose change restarts zone-vip: the roll restarts it on each
    // VM, followers first, the leader last (the VIP blinks then).
    push_through_vip(
        &client,
        "/etc/zoned/managed/vip-extra.conf",
        &[],
        &["--restart", "zone-vip.service"],
    )?;
    let ep1 = lab.vms[0].endpoint();
    let restarts = wait_for(Duration::from_secs(120), "the roll on every VM", || {
        let out = client
            .zonectl(&ep1, &["-o", "json", "config", "status"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let servers = v["servers"].as_array()?.clone();
        (servers.len() == 3
            && servers.iter().all(|s| {
                s["last_restart"]["ok"].as_bool() == Some(true)
                    && s["last_restart"]["units"][0] == "zone-vip.service"
                    && s["last_restart"]["active_since"]["zone-vip.service"].is_string()
                    && s["pending_restarts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty())
            }))
        .then_some(servers)
    })?;
    let leader_restart = restarts
        .iter()
        .find(|s| s["id"].as_u64() == Some(leader))
        .context("the leader's report")?;
    // The follower saw systemd restart zone-vip on VM 3 as it happened
    // (after its first entry, the last one from before the push).
    let seen = follower.wait_line(Duration::from_secs(30), 1, |e| {
        e["identifier"] == "systemd"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Started zone-vip.service"))
    });
    let lines = follower.stop();
    assert!(
        seen,
        "`zonectl logs -f -u zone-vip` on VM 3 did not show its restart:\n{}",
        lines.join("\n")
    );
    eprintln!(
        "zonectl logs -u zone-vip -f on VM 3 during the roll ({} entries), the last:\n{}",
        lines.len(),
        lines.last().map_or("", String::as_str)
    );
    journal_streams_end_with_their_client(&client, &lab.vms[2].endpoint())?;
    for s in &restarts {
        eprintln!(
            "VM {} restarted zone-vip: {} - {} ms (active since {})",
            s["id"],
            s["last_restart"]["started_unix_ms"],
            s["last_restart"]["done_unix_ms"],
            s["last_restart"]["active_since"]["zone-vip.service"]
        );
        if s["id"].as_u64() != Some(leader) {
            // VM clocks come from the host's at boot and may drift apart a
            // little under TCG: allow a second.
            let done = s["last_restart"]["done_unix_ms"]
                .as_u64()
                .unwrap_or(u64::MAX);
            let leader_started = leader_restart["last_restart"]["started_unix_ms"]
                .as_u64()
                .unwrap_or(0);
            assert!(
                leader_started + 1000 >= done,
                "the leader restarted before follower {}: {restarts:?}",
                s["id"]
            );
        }
    }
    // No unit of ours was killed by systemd's watchdog on the way (zone-vip
    // was, on every VM while booting, when its watchdog counted from the
    // exec rather than from READY=1).
    let killed = lab.console_lines("Failed with result 'watchdog'");
    assert!(
        killed.is_empty(),
        "units killed by systemd's watchdog: {killed:?}"
    );
    let lapses = lab.console_lines("lease expired without renewal");
    eprintln!("lease lapses seen by zone-vip: {}", lapses.len());
    Ok(lab)
}

fn the_vip_follows_the_leader_when_its_vm_dies_and_no_write_is_lost(lab: &mut Lab) -> Result<()> {
    let zone = wait_zone(lab, Duration::from_secs(120))?;
    let leader = zone["leader_id"].as_u64().context("leader id")?;
    let client = lab.client();
    let writer = Writer::start(client.clone(), "w");
    writer.wait_acked(5)?;

    let li = lab
        .vms
        .iter()
        .position(|v| v.id == leader)
        .context("leader VM")?;
    let at_kill = writer.count.load(Ordering::Relaxed);
    lab.kill(li);
    let t0 = Instant::now();
    eprintln!("killed VM {leader} (the leader)");
    // The VIP moves to a new leader, which then answers through it.
    let zone = wait_new_leader(&client, leader)?;
    eprintln!(
        "VIP on the new leader {} {:.1} s after the kill",
        zone["leader_id"],
        t0.elapsed().as_secs_f64()
    );
    // Writes through the VIP go on: five more acknowledged after the kill.
    writer.wait_acked(at_kill + 5)?;
    let acked = writer.finish();

    // The killed VM boots again and rejoins as a follower with every
    // acknowledged write.
    let t1 = Instant::now();
    lab.boot(li)?;
    let took = lab.wait_ready(li, t1, BOOT_LIMIT)?;
    eprintln!("VM {leader} ready again after {:.1} s", took.as_secs_f64());
    let ep = lab.vms[li].endpoint();
    wait_follower(&client, &ep, leader, "the rebooted VM to follow")?;
    for key in &acked {
        wait_for(
            Duration::from_secs(30),
            "an acknowledged write on the rebooted VM",
            || client.get(&ep, key).map(|_| ()),
        )?;
    }
    eprintln!(
        "{} acknowledged writes all present on the rebooted VM",
        acked.len()
    );
    Ok(())
}

fn every_acknowledged_write_survives_all_vms_killed_at_once(lab: &mut Lab) -> Result<()> {
    wait_zone(lab, Duration::from_secs(120))?;
    let client = lab.client();
    let writer = Writer::start(client.clone(), "p");
    writer.wait_acked(10)?;
    // Killed while writes are in flight: only what was acknowledged counts.
    for i in 0..3 {
        lab.kill(i);
    }
    let acked = writer.finish();
    assert!(
        acked.len() >= 5,
        "too few writes acknowledged: {}",
        acked.len()
    );
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
    wait_zone(lab, Duration::from_secs(120))?;
    for vm in &lab.vms {
        let ep = vm.endpoint();
        for key in &acked {
            let got = wait_for(Duration::from_secs(30), "an acknowledged write", || {
                client.get(&ep, key)
            })?;
            assert_eq!(got, "1", "VM {}: {key}", vm.id);
        }
    }
    Ok(())
}

/// Issue 20, defect 3, on a real hypervisor's pause: a leader VM is
/// stopped through QEMU's monitor (its clocks with it) just after it took
/// the VIP, while its repeated announcements are still due, and kept
/// stopped for longer than the election timeout while the zone elects
/// another leader, which takes the VIP. Then it is resumed. The clocks its
/// kernel keeps tell it nothing (the pause froze them, as QEMU and most
/// hypervisors do); the RTC, which follows the host's time, does. From the
/// resume on it must neither announce nor answer for the VIP: zone-vip
/// answers ARP itself (the kernel is kept from it), each answer and each
/// repeated announcement only under a lease round sent after it came due
/// and with the RTC showing no pause since. ARP is recorded on the bridge
/// throughout, and asked for the VIP every 20 ms from the resume on. On
/// the code before, the kernel answered for the VIP 100-150 ms after the
/// resume, and a repeated announcement went out on one run of four.
fn a_resumed_leader_vm_neither_announces_nor_answers_for_the_vip(lab: &Lab) -> Result<()> {
    use testbed::arp::{parse_mac, Capture, Prober};
    let zone = wait_zone(lab, Duration::from_secs(120))?;
    let first = zone["leader_id"].as_u64().context("leader id")?;
    let index = |id: u64| lab.vms.iter().position(|v| v.id == id);
    let mac_of = |id: u64| parse_mac(&lab.vms[index(id).expect("a VM")].mac());
    let vip_ip: std::net::Ipv4Addr = VIP.parse()?;
    let capture = Capture::start(lab)?;
    let prober = Prober::open(lab, testbed::vm::HOST_ADDR.parse()?)?;
    let client = lab.client();

    // The first leader paused: another takes the VIP, and is paused at its
    // first announcement. An announcement is two frames, a gratuitous
    // request then a gratuitous reply, sent one after the other: the pause
    // waits for the reply, the last of them. Paused on the request (as
    // before), the guest could be stopped between the two sends and finish
    // the same announcement, decided under its lease before the pause, tens
    // of milliseconds after the resume (CI on `a703d93`: its reply 33 ms
    // after the resume, the repeats due 200 ms later not sent).
    lab.qmp(index(first).context("leader VM")?, "stop")?;
    let t0 = Instant::now();
    let (paused, announced_at) = wait_for(
        Duration::from_secs(60),
        "another VM to announce the VIP",
        || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(500) {
                let f = capture.frames().into_iter().find(|f| {
                    f.at > t0
                        && f.sender_ip == vip_ip
                        && f.gratuitous()
                        && f.op == 2
                        && f.sender_mac != mac_of(first)
                });
                if let Some(f) = f {
                    let id = u64::from(f.sender_mac[5]);
                    return Some((id, f.at));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        },
    )?;
    let pi = index(paused).context("the announcing VM")?;
    lab.qmp(pi, "stop")?;
    eprintln!(
        "VM {first} (the leader) paused; VM {paused} announced the VIP {:.1} s later and was paused {:?} after that",
        announced_at.duration_since(t0).as_secs_f64(),
        announced_at.elapsed()
    );
    // The first leader back: with the third VM it elects a leader, which
    // takes the VIP while VM `paused` is still stopped.
    lab.qmp(index(first).context("leader VM")?, "cont")?;
    let t1 = Instant::now();
    let zone = wait_new_leader(&client, paused)?;
    let new_leader = zone["leader_id"].as_u64().context("leader id")?;
    eprintln!(
        "VIP on VM {new_leader} {:.1} s after VM {first} resumed",
        t1.elapsed().as_secs_f64()
    );

    lab.qmp(pi, "cont")?;
    let resumed = Instant::now();
    eprintln!(
        "VM {paused} resumed after {:.1} s",
        resumed.duration_since(announced_at).as_secs_f64()
    );
    // Asked for 5 s: under TCG the new leader may take the VIP 2-3 s after
    // the resume (a second failover, when the next holder was paused too).
    let span = Duration::from_secs(5);
    let asked = prober.ask_for(vip_ip, Duration::from_millis(20), span)?;
    let frames = capture.frames();
    let after: Vec<_> = frames.iter().filter(|f| f.at >= resumed).collect();
    let paused_mac = mac_of(paused);
    let announced: Vec<Duration> = after
        .iter()
        .filter(|f| f.sender_mac == paused_mac && f.sender_ip == vip_ip && f.gratuitous())
        .map(|f| f.at.duration_since(resumed))
        .collect();
    eprintln!("after the resume: the resumed VM's announcements of the VIP: {announced:?}");
    // Frames the guest had queued before the pause leave the moment QEMU
    // runs it again; nothing it does after the resume can be that quick.
    let queued = Duration::from_millis(10);
    assert!(
        announced.iter().all(|at| *at < queued),
        "the resumed VM announced the VIP after the resume: {announced:?}"
    );
    let answers = |mac: [u8; 6]| {
        after
            .iter()
            .filter(|f| {
                f.op == 2 && f.sender_mac == mac && f.sender_ip == vip_ip && !f.gratuitous()
            })
            .map(|f| f.at.duration_since(resumed))
            .collect::<Vec<_>>()
    };
    let (old, new) = (answers(paused_mac), answers(mac_of(new_leader)));
    eprintln!(
        "after the resume: asked {asked} times; {} ARP answers for the VIP from the resumed VM (the last {:?} after it), {} from VM {new_leader}",
        old.len(),
        old.last(),
        new.len()
    );
    assert!(
        old.iter().all(|at| *at < queued),
        "the resumed VM answered for the VIP after the resume: {old:?}"
    );
    // The new holder answers, still does in the span's last second, and
    // answers at least a tenth of the questions after its first answer
    // (asked evenly over the span, from about the resume on). Each answer
    // waits for a lease round sent after its question; under TCG on this
    // project's 2-core machine the rounds right after a second failover
    // come unevenly: 44 of ~223 questions answered on the code of stop 34
    // (whose CI, on another machine, saw 232 of 238), 60 of ~157 and 78 of
    // ~159 on the code after it. Half was asked before; a tenth, with the
    // last second, still fails a holder that answers once and stops.
    let first = *new
        .first()
        .with_context(|| format!("VM {new_leader} never answered for the VIP"))?;
    let last = *new.last().expect("one answer at least");
    assert!(
        last + Duration::from_secs(1) >= span,
        "VM {new_leader} stopped answering for the VIP {last:?} after the resume (asked for {span:?})"
    );
    let asked_since = asked as f64 * span.saturating_sub(first).as_secs_f64() / span.as_secs_f64();
    assert!(
        new.len() as f64 * 10.0 >= asked_since,
        "VM {new_leader} answered for the VIP only {} times of the ~{asked_since:.0} questions after its first answer ({first:?} after the resume)",
        new.len()
    );

    // The resumed VM follows the new leader.
    wait_follower(
        &client,
        &lab.vms[pi].endpoint(),
        paused,
        "the resumed VM to follow",
    )?;
    Ok(())
}

/// Once the zone formed and its leader started its leader-only units,
/// moves leadership to the next server; the old leader's id.
fn transfer_from_a_leader_running_its_units(lab: &Lab, client: &Client) -> Result<u64> {
    let first = wait_zone(lab, Duration::from_secs(120))?["leader_id"]
        .as_u64()
        .context("leader id")?;
    wait_for(Duration::from_secs(90), "the first leader's units", || {
        (!console_times(lab, first, STARTED).is_empty()).then_some(())
    })?;
    let target = first % 3 + 1;
    let out = through_vip(client, &["leader", "transfer", &target.to_string()])?;
    assert!(
        out.status.success(),
        "leader transfer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(first)
}

/// The guest-clock times at which VM `id` printed lines containing
/// `needle` on its console.
fn console_times(lab: &Lab, id: u64, needle: &str) -> Vec<f64> {
    lab.console_lines(needle)
        .iter()
        .filter(|(vm, _)| *vm == id)
        .filter_map(|(_, l)| Lab::console_time(l))
        .collect()
}

/// The fence around a graceful transfer of the lease from `first` to
/// `second` (a test of its own once, on a zone of its own; now a step of
/// the exclusive datastore's test, whose leader-only units are a writer
/// and the datastore's mount): the old leader stops its units, then
/// disarms its watchdog, and is not reset; every start of the units on
/// every VM, the new leader's included, comes the fence delay after that
/// VM's takeover, under an armed watchdog. Each VM's watchdog is the
/// kernel's softdog (the cloud kernel has no driver for QEMU's emulated
/// ones); zone-vip's defaults: a 5 s timeout, a 12 s fence delay.
fn leader_only_units_wait_for_the_fence_delay_and_the_old_leader_disarms_its_watchdog(
    lab: &mut Lab,
    first: u64,
    second: u64,
) -> Result<()> {
    let started = |lab: &Lab, id| console_times(lab, id, STARTED);
    wait_for(Duration::from_secs(90), "the second leader's units", || {
        (!started(lab, second).is_empty()).then_some(())
    })?;
    let first_started = *started(lab, first).last().context("first leader's start")?;
    let disarmed: Vec<f64> = console_times(lab, first, "watchdog disarmed")
        .into_iter()
        .filter(|&t| t > first_started)
        .collect();
    assert!(
        !disarmed.is_empty(),
        "the old leader did not disarm its watchdog: {:?}",
        lab.console_lines("watchdog")
    );
    // Every start of the units on every VM came at least the fence delay
    // after that VM's last takeover of the lease (logged just before the
    // VIP is added), under an armed watchdog.
    for id in 1..=3 {
        let armed = console_times(lab, id, "watchdog armed");
        for t in started(lab, id) {
            let took = takeover_before(lab, id, t)?;
            eprintln!(
                "VM {id}: units started {:.2} s after taking the lease",
                t - took
            );
            assert!(
                t - took >= FENCE_DELAY_SEEN,
                "VM {id} started its units {:.2} s after taking the lease, within the fence delay",
                t - took
            );
            assert!(
                armed.iter().any(|&a| a >= took && a <= t),
                "VM {id} started its units with no watchdog armed: {:?}",
                lab.console_lines("watchdog")
            );
        }
    }
    // Disarmed for real: a softdog left armed resets its VM 5 s after the
    // last pet, and QEMU, run with -no-reboot, then exits.
    std::thread::sleep(Duration::from_secs(15));
    assert!(
        lab.vms[first as usize - 1].running(),
        "VM {first} was reset after losing the lease"
    );
    let killed = lab.console_lines("Failed with result 'watchdog'");
    assert!(killed.is_empty(), "{killed:?}");
    Ok(())
}

/// When VM `id` last took the lease (zone-vip's line, logged just before
/// it adds the VIP) at or before guest time `t`.
fn takeover_before(lab: &Lab, id: u64, t: f64) -> Result<f64> {
    console_times(lab, id, "units wait for the fence delay")
        .into_iter()
        .filter(|&a| a <= t)
        .reduce(f64::max)
        .with_context(|| format!("VM {id} logged no takeover before {t:.2} s"))
}

/// zone-vip's default fence delay (12 s) as two console lines can show
/// it. Each line's time is when journald took it from zone-vip's socket,
/// not when zone-vip wrote it: under load the takeover's line can wait
/// there longer than the start's (CI saw 11.998 s, then 11.65 s with the
/// machine's two cores shared by three VMs and stolen by its host). The
/// margin is far below the delay: a start without it shows as ~0 s.
const FENCE_DELAY_SEEN: f64 = 12.0 - 1.0;

/// What zone-vip logs when it starts the leader-only units.
const STARTED: &str = "starting leader-only units";

/// A leader-only unit whose stop never ends (stuck, as on a dead NFS
/// server), given to the VMs with their identity.
const STUCK_UNIT: &str = "[Unit]\nDescription=Zoned test: a leader-only unit that will not stop\n\
[Service]\nExecStart=/bin/sleep infinity\nExecStop=/bin/sleep infinity\nTimeoutStopSec=infinity\n";

#[test]
fn a_leader_only_unit_that_will_not_stop_gets_its_vm_reset_by_the_watchdog() -> Result<()> {
    let mut lab = start_zone_with_unit("fence_stuck", "zoned-test-stuck.service", STUCK_UNIT)?;
    let client = lab.client();
    let first = transfer_from_a_leader_running_its_units(&lab, &client)?;
    let moved = Instant::now();
    // The old leader cannot stop its unit, so it never disarms, and no
    // longer pets (its lease is gone): its softdog resets it 5 s after the
    // last pet, and QEMU, run with -no-reboot, exits.
    let i = first as usize - 1;
    wait_for(
        Duration::from_secs(60),
        "the old leader's VM to be reset",
        || (!lab.vms[i].running()).then_some(()),
    )?;
    eprintln!(
        "VM {first} reset {:.1} s after the transfer; its console: {:?}",
        moved.elapsed().as_secs_f64(),
        lab.console_lines("softdog")
            .iter()
            .chain(lab.console_lines("watchdog").iter())
            .filter(|(vm, _)| *vm == first)
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
    );
    assert!(
        console_times(&lab, first, "watchdog disarmed")
            .iter()
            .all(|&t| console_times(&lab, first, STARTED).iter().all(|&s| t < s)),
        "the old leader disarmed its watchdog with its unit still running"
    );
    // The zone goes on with the other two; the new leader runs the unit.
    let second = wait_new_leader(&client, first)?["leader_id"]
        .as_u64()
        .context("leader id")?;
    wait_for(Duration::from_secs(90), "the new leader's unit", || {
        (!console_times(&lab, second, STARTED).is_empty()).then_some(())
    })?;
    Ok(())
}

/// A leader-only unit appending `<host name> <n>` to a log on the NFS
/// datastore every 200 ms (`$$`: a literal `$` for systemd).
const WRITER_UNIT: &str = "[Unit]\nDescription=Zoned test: a leader-only writer on shared storage\n\
[Service]\nExecStart=/bin/sh -c 'n=0; while :; do n=$$((n+1)); echo \"$$(cat /proc/sys/kernel/hostname) $$n\" >> /var/lib/one/datastores/0/log; sleep 0.2; done'\n";

#[test]
fn a_leader_only_writer_on_nfs_moves_after_the_fence_delay_and_never_interleaves() -> Result<()> {
    let mut lab = start_zone_with_unit("fence_writer", "zoned-test-writer.service", WRITER_UNIT)?;
    let client = lab.client();
    wait_zone(&lab, Duration::from_secs(120))?;
    let nfs = testbed::nfs::Ganesha::start(&lab.ns, testbed::vm::HOST_ADDR, &lab.dir.join("nfs"))?;
    client.add_nfs_datastore(
        &vip(),
        &nfs,
        "shared",
        "/var/lib/one/datastores/0",
        &["--required"],
    )?;
    let log = nfs.export.join("log");
    // The host names in the log, in order, and how many lines each run.
    let runs = || -> Vec<(String, usize)> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut runs: Vec<(String, usize)> = Vec::new();
        for host in text.lines().filter_map(|l| l.split(' ').next()) {
            match runs.last_mut() {
                Some((h, n)) if h == host => *n += 1,
                _ => runs.push((host.to_owned(), 1)),
            }
        }
        runs
    };
    let first = wait_for(Duration::from_secs(120), "the leader writing", || {
        let r = runs();
        (r.len() == 1 && r[0].1 >= 10).then(|| r[0].0.clone())
    })?;
    let id: u64 = first
        .strip_prefix("zone-")
        .and_then(|n| n.parse().ok())
        .context("writer's host name")?;
    // The writer's VM dies; the new leader starts the writer only after
    // the fence delay.
    lab.kill(id as usize - 1);
    let killed = Instant::now();
    let second = wait_for(Duration::from_secs(120), "the new leader writing", || {
        let r = runs();
        (r.len() >= 2 && r[1].1 >= 10).then(|| r[1].0.clone())
    })?;
    eprintln!(
        "{second} writing {:.1} s after {first} was killed; runs in the log: {:?}",
        killed.elapsed().as_secs_f64(),
        runs()
    );
    assert_eq!(
        runs().len(),
        2,
        "entries of two servers interleaved: {:?}",
        runs()
    );
    assert!(killed.elapsed() >= Duration::from_secs(12));
    let new: u64 = second
        .strip_prefix("zone-")
        .and_then(|n| n.parse().ok())
        .context("writer's host name")?;
    let took = console_times(&lab, new, "units wait for the fence delay");
    let started = console_times(&lab, new, STARTED);
    let (Some(&took), Some(&started)) = (took.last(), started.last()) else {
        bail!("VM {new} logged no takeover or no start of its units");
    };
    assert!(
        started - took >= FENCE_DELAY_SEEN,
        "VM {new} started the writer {:.1} s after its takeover",
        started - took
    );
    Ok(())
}

/// Where the test's exclusive datastore is mounted (under /var: the root
/// file system is read-only, and the mount makes its mount point).
const DB_TARGET: &str = "/var/lib/one/db";

/// A leader-only unit appending `<host> <n>` to a log on the exclusive
/// datastore every 300 ms, each line synced to the disk, then printed
/// (`wrote ...`, on the console through the journal). Before the datastore
/// exists (the zone's first leader starts it before the test declares the
/// datastore) it exits, and systemd starts it again a second later, for as
/// long as it takes.
const DB_WRITER_UNIT: &str = "[Unit]\nDescription=Zoned test: a leader-only writer on an exclusive datastore\n\
StartLimitIntervalSec=0\n[Service]\nRestart=always\nRestartSec=1\n\
ExecStart=/bin/sh -c 'mountpoint -q /var/lib/one/db || exit 1; n=0; while :; do n=$$((n+1)); l=\"$$(cat /proc/sys/kernel/hostname) $$n\"; echo \"$$l\" >> /var/lib/one/db/log && sync /var/lib/one/db/log && echo \"wrote $$l\"; sleep 0.3; done'\n";

/// The mount unit zone-mounts writes for [`DB_TARGET`].
const DB_UNIT: &str = "var-lib-one-db.mount";

/// The lines VM `id` wrote (`wrote <host> <n>` on its console).
fn wrote(lab: &Lab, id: u64) -> usize {
    lab.console_lines("wrote zone-")
        .iter()
        .filter(|(vm, _)| *vm == id)
        .count()
}

/// Issue 22: an `exclusive` datastore, ext4 on one virtual disk all three
/// VMs are attached to (a shared LUN), under a leader-only writer. It is
/// mounted on the lease holder alone: by a graceful transfer, the old
/// leader stops the writer and unmounts before the new one mounts, after
/// the fence delay (and the fence's other checks around that transfer:
/// [`leader_only_units_wait_for_the_fence_delay_and_the_old_leader_disarms_its_watchdog`]);
/// when the holder's VM is killed, the next mounts only
/// after the fence delay; when the holder loses quorum, it stops the writer
/// and unmounts by itself. Then, on the host, the file system is clean
/// (`e2fsck -fn`), and the log on it holds one run of lines per holder, in
/// order, never two interleaved.
#[test]
fn an_exclusive_datastore_on_a_shared_disk_is_mounted_on_the_lease_holder_alone() -> Result<()> {
    let mut lab = start_zone_with(
        "exclusive_disk",
        "zoned-test-db-writer.service",
        DB_WRITER_UNIT,
        Some(64),
    )?;
    let disk = lab.shared_disk.clone().context("the shared disk")?;
    let client = lab.client();
    let first = wait_zone(&lab, Duration::from_secs(120))?["leader_id"]
        .as_u64()
        .context("leader id")?;
    let add = [
        "storage",
        "add",
        "db",
        "--type",
        "ext4",
        "--source",
        testbed::vm::SHARED_DISK,
        "--target",
        DB_TARGET,
        "--exclusive",
        "--required",
    ];
    wait_for(Duration::from_secs(60), "`storage add` answered", || {
        let out = client.zonectl(&vip(), &add).ok()?;
        if !out.status.success() {
            eprintln!(
                "storage add: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        out.status.success().then_some(())
    })?;
    // Mounted on the leader alone; the others see the disk and leave it.
    let expect = |leader: u64| -> Result<()> {
        let t0 = Instant::now();
        wait_for(
            Duration::from_secs(90),
            "the datastore on the leader alone",
            || {
                let s = client.storage_states(&vip(), "db")?;
                let ok = s.len() == 3
                    && s.iter().all(|(id, st)| {
                        st == if *id == leader {
                            "mounted"
                        } else {
                            "unmounted"
                        }
                    });
                ok.then_some(())
            },
        )?;
        eprintln!(
            "datastore mounted on VM {leader} alone after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    };
    expect(first)?;
    let table = client.zonectl(&vip(), &["storage", "status"])?;
    eprintln!(
        "zonectl storage status:\n{}",
        String::from_utf8_lossy(&table.stdout)
    );
    wait_for(Duration::from_secs(60), "the first leader writing", || {
        (wrote(&lab, first) >= 5).then_some(())
    })?;

    // 1. A graceful transfer.
    let second = first % 3 + 1;
    let out = through_vip(&client, &["leader", "transfer", &second.to_string()])?;
    assert!(
        out.status.success(),
        "leader transfer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(90), "the second leader writing", || {
        (wrote(&lab, second) >= 5).then_some(())
    })?;
    expect(second)?;
    leader_only_units_wait_for_the_fence_delay_and_the_old_leader_disarms_its_watchdog(
        &mut lab, first, second,
    )?;
    // 2. The holder's VM killed.
    let killed_at = Instant::now();
    lab.kill(second as usize - 1);
    let third = wait_new_leader(&client, second)?["leader_id"]
        .as_u64()
        .context("leader id")?;
    // Not writing yet: it waits for the fence delay.
    let before = wrote(&lab, third);
    wait_for(Duration::from_secs(90), "the next leader writing", || {
        (wrote(&lab, third) >= before + 5).then_some(())
    })?;
    eprintln!(
        "VM {third} writing {:.1} s after VM {second} was killed",
        killed_at.elapsed().as_secs_f64()
    );
    // Each mount came the fence delay after that VM's takeover.
    let mut holders = vec![first, second, third];
    holders.sort_unstable();
    holders.dedup();
    for id in [second, third] {
        assert!(
            !console_times(&lab, id, "mounting the exclusive datastores").is_empty(),
            "VM {id} wrote without its mount logged"
        );
    }
    for id in holders {
        for t in console_times(&lab, id, "mounting the exclusive datastores") {
            let since = takeover_before(&lab, id, t)?;
            eprintln!("VM {id}: mounted {:.2} s after taking the lease", t - since);
            assert!(
                t - since >= FENCE_DELAY_SEEN,
                "VM {id} mounted the datastore {:.2} s after taking the lease",
                t - since
            );
        }
    }
    // The first leader unmounted after the transfer, its writer stopped.
    assert!(
        !console_times(&lab, first, "Unmounted var-lib-one-db.mount").is_empty(),
        "VM {first} never unmounted: {:?}",
        lab.console_lines(DB_UNIT)
    );
    // 3. The holder loses quorum: the other VM left is killed.
    let other = (1..=3)
        .find(|&id| id != second && id != third)
        .context("a follower")?;
    // systemd says an unmount twice: the unit going inactive once the file
    // system is unmounted, then its job's end. Under TCG the holder's stop
    // and unmount can outlast its watchdog's timeout (5 s, unpetted since
    // the lease ended), which then resets it as designed: between the two
    // lines (CI, this test: `Deactivated successfully`, then `softdog:
    // Initiating system reboot`), or before either (CI again: the unmount
    // began 3.8 s after the lease's end, the reset came 0.2 s later).
    // Either line ends the holder's mount, and so does the reset once the
    // unmount began: the fence the design counts on. The disk is checked
    // below either way.
    // The reset counts only once the unmount began: a holder that never
    // tried to unmount (its stop broken) is reset by its watchdog as well,
    // and that must fail here.
    let unmounts = |lab: &Lab| {
        console_times(lab, third, "var-lib-one-db.mount: Deactivated successfully").len()
            + console_times(lab, third, "Unmounted var-lib-one-db.mount").len()
    };
    let unmounting = |lab: &Lab| console_times(lab, third, "Unmounting var-lib-one-db.mount").len();
    let resets = |lab: &Lab| console_times(lab, third, "softdog: Initiating system reboot").len();
    let (lost, began, reset) = (unmounts(&lab), unmounting(&lab), resets(&lab));
    lab.kill(other as usize - 1);
    wait_for(
        Duration::from_secs(60),
        "the holder without quorum to unmount",
        || {
            (unmounts(&lab) > lost || (unmounting(&lab) > began && resets(&lab) > reset))
                .then_some(())
        },
    )?;
    if resets(&lab) > reset {
        // Reset before its unmount ended: the journal is replayed as the
        // next holder's mount would (that alone, no repair), then the file
        // system must be clean.
        eprintln!("VM {third}'s watchdog reset it before its unmount ended");
        lab.kill(third as usize - 1);
        let replay = std::process::Command::new("e2fsck")
            .args(["-p", "-E", "journal_only"])
            .arg(&disk)
            .output()?;
        assert!(
            replay.status.code().is_some_and(|c| c <= 1),
            "e2fsck -p -E journal_only after the reset: {}\n{}",
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&replay.stderr)
        );
    }
    // On the host: a clean file system, one run per holder.
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&disk)
        .output()?;
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /log"])
        .arg(&disk)
        .output()?;
    let text = String::from_utf8_lossy(&cat.stdout);
    let mut runs: Vec<(String, usize)> = Vec::new();
    for host in text.lines().filter_map(|l| l.split(' ').next()) {
        match runs.last_mut() {
            Some((h, n)) if h == host => *n += 1,
            _ => runs.push((host.to_owned(), 1)),
        }
    }
    eprintln!("runs in the log on the shared disk: {runs:?}");
    let hosts: Vec<String> = [first, second, third]
        .iter()
        .map(|id| format!("zone-{id}"))
        .collect();
    assert_eq!(
        runs.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>(),
        hosts,
        "the holders' lines, in order, one run each: {runs:?}"
    );
    assert!(runs.iter().all(|(_, n)| *n >= 5), "{runs:?}");
    Ok(())
}

/// Waits until every one of the three VMs reports datastore `name` in one
/// of `states`; how long it took.
fn wait_storage(client: &Client, name: &str, states: &[&str], what: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let mut last = None;
    wait_for(Duration::from_secs(90), what, || {
        let s = client.storage_states(&vip(), name);
        if s != last {
            eprintln!("{:>6.1} s: {s:?}", t0.elapsed().as_secs_f64());
            last = s.clone();
        }
        let s = s?;
        (s.len() == 3 && s.iter().all(|(_, st)| states.contains(&st.as_str()))).then_some(())
    })?;
    Ok(t0.elapsed())
}

/// A real NFS server (nfs-ganesha on the host side of the bridge) and a
/// datastore declared once: mounted on all three VMs, each VM's write probe
/// reaching the server; the server stopped: hung or failed on every VM
/// within the probe timeout, while the zone answers; continued: healthy
/// again by itself; only the leader's path to it cut: leadership and the
/// VIP move to a VM whose storage is healthy; stopped again and the
/// datastore removed: unmounted on every VM all the same.
#[test]
fn an_nfs_datastore_is_mounted_everywhere_reported_hung_when_its_server_stops_and_removed_while_hung(
) -> Result<()> {
    let lab = start_zone("nfs_datastore", [Boot::DirectKernel; 3])?;
    let client = lab.client();
    wait_zone(&lab, Duration::from_secs(120))?;
    let nfs = testbed::nfs::Ganesha::start(&lab.ns, testbed::vm::HOST_ADDR, &lab.dir.join("nfs"))?;
    client.add_nfs_datastore(
        &vip(),
        &nfs,
        "images",
        "/var/lib/one/datastores/100",
        testbed::vm::NFS_BENCH_OPTIONS,
    )?;
    let took = wait_storage(
        &client,
        "images",
        &["mounted"],
        "the datastore mounted on every VM",
    )?;
    eprintln!(
        "mounted and probed on all three VMs {:.1} s after `storage add`",
        took.as_secs_f64()
    );
    let table = |client: &Client| {
        client
            .zonectl(&vip(), &["storage", "status"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    eprintln!("zonectl storage status:\n{}", table(&client));
    // Each VM wrote its probe on the NFS server itself.
    for id in 1..=3 {
        let dir = nfs.export.join(format!(".zoned-probe/{id}"));
        assert!(
            dir.is_dir(),
            "VM {id} left no probe directory on the server"
        );
    }
    // The server stops answering, its connections open.
    nfs.pause();
    let took = wait_storage(
        &client,
        "images",
        &["hung", "failed"],
        "the datastore hung or failed on every VM",
    )?;
    eprintln!(
        "NFS server stopped: every VM reported it after {:.1} s (probe timeout 4 s)",
        took.as_secs_f64()
    );
    eprintln!("zonectl storage status:\n{}", table(&client));
    // Nothing blocks: the zone answers and takes writes.
    let t = Instant::now();
    assert!(
        client.put(&vip(), "while-nfs-hangs", "yes"),
        "a write while NFS hangs"
    );
    assert!(
        client.show(&vip()).is_some(),
        "zonectl show while NFS hangs"
    );
    eprintln!(
        "write and show through the VIP while NFS hangs: {:?}",
        t.elapsed()
    );
    nfs.resume();
    let took = wait_storage(&client, "images", &["mounted"], "healthy again on every VM")?;
    eprintln!(
        "NFS server continued: healthy everywhere after {:.1} s",
        took.as_secs_f64()
    );
    // Only the leader loses its path to the NFS server: leadership moves
    // to a VM whose storage is healthy, and the VIP with it.
    let zone = wait_zone(&lab, Duration::from_secs(60))?;
    let leader = zone["leader_id"].as_u64().context("leader id")?;
    nfs.cut(&format!("{}.{leader}", testbed::vm::NET), true)?;
    let t = Instant::now();
    let moved = wait_new_leader(&client, leader)?;
    let took = t.elapsed();
    let new_leader = moved["leader_id"].as_u64().context("leader id")?;
    eprintln!(
        "VM {leader} alone lost its path to the NFS server: VM {new_leader} leads behind the VIP {:.1} s later (probe timeout 4 s, grace 7 s)",
        took.as_secs_f64()
    );
    let states = client
        .storage_states(&vip(), "images")
        .context("storage status")?;
    assert!(
        states.contains(&(new_leader, "mounted".to_owned())),
        "leadership went to a VM whose storage is not healthy: {states:?}"
    );
    nfs.cut(&format!("{}.{leader}", testbed::vm::NET), false)?;
    wait_storage(&client, "images", &["mounted"], "healthy again on every VM")?;
    // Stopped again, and removed while hung: unmounted everywhere.
    nfs.pause();
    wait_storage(
        &client,
        "images",
        &["hung", "failed"],
        "hung again on every VM",
    )?;
    let rm = through_vip(&client, &["storage", "rm", "images"])?;
    assert!(
        rm.status.success(),
        "storage rm: {}",
        String::from_utf8_lossy(&rm.stderr)
    );
    wait_for(
        Duration::from_secs(60),
        "unmounted on every VM while hung",
        || {
            let out = client
                .zonectl(&vip(), &["-o", "json", "storage", "status"])
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let servers = v.as_array()?;
            (servers.len() == 3
                && servers.iter().all(|s| {
                    s["storage"]["reported"].as_bool() == Some(true)
                        && s["storage"]["datastores"]
                            .as_array()
                            .is_some_and(|d| d.is_empty())
                        && s["storage"].get("unmounting").is_none()
                }))
            .then_some(())
        },
    )?;
    nfs.resume();
    Ok(())
}
