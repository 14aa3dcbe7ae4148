//! The system tests' harness. [`zone`]: zones of real `zoned` processes on
//! loopback. The rest: a network-namespace testbed, node namespaces and a client namespace on
//! one bridge (in a namespace of its own, so the host's network is never
//! touched), each node running `zoned` and `zone-vip` for real. Needs root
//! and iproute2; a test that cannot build it fails and says why.
//!
//! Everything is torn down on drop, also when a test panics: processes
//! killed, namespaces deleted (which deletes their interfaces).

pub mod arp;
pub mod nemesis;
pub mod nfs;
pub mod pki;
mod probe;
pub mod vm;
pub mod zone;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use probe::{ClientProbe, PROBE_ATTEMPT_TIMEOUT, PROBE_EVERY};

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n NS ARGS...`, panicking with its output if it fails.
pub fn ip_in(ns: &str, args: &[&str]) -> String {
    sh(&[&["ip", "-n", ns], args].concat())
}

/// Sends signal `s` to `child` (SIGSTOP, SIGCONT, ...).
pub fn signal(child: &Child, s: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), s)
}

/// SIGTERM to `child`, then its exit status; SIGKILL and a panic naming
/// `what` if it has not exited within `timeout`.
pub fn terminate(child: &mut Child, what: &str, timeout: Duration) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_exit(child, &format!("{what} after SIGTERM"), timeout)
}

/// Waits for `child` to exit; SIGKILL and a panic naming `what` if it has
/// not within `timeout`.
pub fn wait_exit(child: &mut Child, what: &str, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test server's zoned configuration file.
#[derive(Debug, Default)]
pub struct ZonedConfig {
    pub id: u64,
    /// Holds the data directory and the agent socket.
    pub dir: PathBuf,
    pub client: String,
    pub peer: String,
    /// A member's client address, for a server that joins.
    pub join: Option<String>,
    /// With `join`: a one-time token, for a server without certificates.
    pub join_token: Option<String>,
    /// More tables, after [node].
    pub extra: String,
    /// The founders, as (id, peer address).
    pub voters: Vec<(u64, String)>,
    /// `[tls] dir`: the server's certificates (None: plaintext).
    pub tls: Option<PathBuf>,
}

impl ZonedConfig {
    pub fn render(&self) -> String {
        let id = self.id;
        let mut text = format!(
            "[node]\nid = {id}\nname = \"zone-{id}\"\ndata_dir = \"{}\"\nagent_socket = \"{}\"\nclient_listen = \"{}\"\npeer_listen = \"{}\"\n",
            self.dir.join("data").display(),
            self.dir.join("agent.sock").display(),
            self.client,
            self.peer,
        );
        if let Some(join) = &self.join {
            text.push_str(&format!("join = \"{join}\"\n"));
        }
        if let Some(token) = &self.join_token {
            text.push_str(&format!("join_token = \"{token}\"\n"));
        }
        text.push_str(&format!("\n{}\n", self.extra));
        if let Some(dir) = &self.tls {
            text.push_str(&format!("[tls]\ndir = \"{}\"\n", dir.display()));
        }
        for (id, peer) in &self.voters {
            text.push_str(&format!("[[voters]]\nid = {id}\npeer = \"{peer}\"\n"));
        }
        text
    }
}

/// Starts a server process for a test: its output appended to `log`,
/// logging at info, and not to journald even when the test runs under it.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    cmd.env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()))
}

/// SIGKILL, and reaps it: a crash, as far as the process can tell.
pub fn kill9(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The directory holding the workspace's binaries: `ZONED_BIN_DIR`, else
/// found from the running executable (target/release/deps/<test>, or
/// target/release/<tool>): the binaries of the tests' own profile.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ZONED_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_owned()
    } else {
        dir.to_owned()
    }
}

pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --release --workspace --bins)",
        p.display()
    );
    p
}

/// Fails the test with a reason when the testbed cannot run here.
pub fn require_root_and_netns() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the namespace testbed needs root (ip netns, veth, bridge); run the tests as root"
    );
    assert!(
        Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success()),
        "the namespace testbed needs iproute2's `ip` (cargo xtask deps installs it)"
    );
    assert!(
        Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "the namespace testbed needs nftables' `nft`: zone-vip keeps the kernel from answering ARP for the VIP with it (cargo xtask deps installs it)"
    );
}

/// What moves the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipManager {
    /// zone-vip, following zoned's leader lease.
    ZoneVip,
    /// keepalived with VRRP as operators commonly set it up (advert_int 1,
    /// priorities 100/90/80, preemption on), independent of Raft.
    Keepalived,
}

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    pub ns: String,
    pub ip: String,
    pub dir: PathBuf,
    pub zoned: Option<Child>,
    pub vip_agent: Option<Child>,
}

#[derive(Debug)]
pub struct Testbed {
    pub prefix: String,
    pub bridge_ns: String,
    pub client_ns: String,
    pub nodes: Vec<Node>,
    pub vip: String,
    pub manager: VipManager,
    pub root: tempfile::TempDir,
    /// Appended to every zoned configuration (a `[limits]` table, say).
    pub extra_config: String,
    /// Each server's own disk (see [`Testbed::start_on_own_disks`]): (loop
    /// device, mount point), detached on drop.
    pub disks: Vec<(String, PathBuf)>,
    /// The zone's certificates: zoned runs with TLS on both ports, and
    /// the testbed's clients are its admin.
    pub pki: pki::TestPki,
}

const SUBNET: &str = "10.77.0";
const SUBNET6: &str = "fd77";

impl Testbed {
    /// Builds the network and starts `n` nodes (zoned + zone-vip each).
    pub fn start(n: u64) -> Testbed {
        Testbed::start_with(n, VipManager::ZoneVip)
    }

    /// Builds the network and starts `n` nodes: zoned, and the VIP manager.
    pub fn start_with(n: u64, manager: VipManager) -> Testbed {
        let mut tb = Testbed::build(n, manager);
        tb.start_all();
        tb
    }

    /// As [`Testbed::start`], with each server's data directory on a disk
    /// of its own: an ext4 filesystem of `size_mb` on a loop device (its
    /// image in the testbed's directory), so that a disk can fill up
    /// ([`fill_disk`]) or stall ([`Testbed::freeze_disk`]: writes and syncs
    /// block in the kernel, as on a storage hiccup), with
    /// `limits.min_free_disk_mb = floor_mb`.
    pub fn start_on_own_disks(n: u64, size_mb: u64, floor_mb: u64) -> Testbed {
        let mut tb = Testbed::build(n, VipManager::ZoneVip);
        tb.extra_config = format!("[limits]\nmin_free_disk_mb = {floor_mb}\n");
        for i in 0..tb.nodes.len() {
            let image = tb.root.path().join(format!("disk-{}.img", tb.nodes[i].id));
            let image = image.to_str().expect("a UTF-8 path").to_owned();
            sh(&["truncate", "-s", &format!("{size_mb}M"), &image]);
            let dev = sh(&["losetup", "-f", "--show", &image]).trim().to_owned();
            let data = tb.data_dir(i);
            tb.disks.push((dev.clone(), data.clone()));
            sh(&["mkfs.ext4", "-q", "-F", &dev]);
            std::fs::create_dir_all(&data).unwrap();
            sh(&["mount", &dev, data.to_str().expect("a UTF-8 path")]);
        }
        tb.start_all();
        tb
    }

    /// Freezes server `i`'s disk (fsfreeze): its writes and syncs block
    /// until [`Testbed::thaw_disk`].
    pub fn freeze_disk(&self, i: usize) {
        sh(&[
            "fsfreeze",
            "-f",
            self.disks[i].1.to_str().expect("a UTF-8 path"),
        ]);
    }

    pub fn thaw_disk(&self, i: usize) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.disks[i].1)
            .status();
    }

    /// Server `i`'s zoned data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("data")
    }

    fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.write_configs(i);
            self.start_zoned(i);
            self.start_agent(i);
        }
    }

    /// The network and the nodes' directories; nothing started.
    fn build(n: u64, manager: VipManager) -> Testbed {
        require_root_and_netns();
        // Short, unique names: interface names are limited to 15 bytes.
        let prefix = format!("z{}{}", std::process::id() % 100_000, rand_suffix());
        let root = tempfile::tempdir().unwrap();
        let bridge_ns = format!("{prefix}b");
        let client_ns = format!("{prefix}c");
        let pki = pki::TestPki::new(&root.path().join("pki"));
        let mut tb = Testbed {
            prefix: prefix.clone(),
            bridge_ns: bridge_ns.clone(),
            client_ns: client_ns.clone(),
            nodes: Vec::new(),
            vip: format!("{SUBNET}.100"),
            manager,
            root,
            extra_config: String::new(),
            disks: Vec::new(),
            pki,
        };
        sh(&["ip", "netns", "add", &bridge_ns]);
        sh(&[
            "ip", "-n", &bridge_ns, "link", "add", "br0", "type", "bridge",
        ]);
        sh(&["ip", "-n", &bridge_ns, "link", "set", "br0", "up"]);
        tb.attach(&client_ns, &format!("{SUBNET}.10"), "c");
        for id in 1..=n {
            let ns = format!("{prefix}n{id}");
            let ip = format!("{SUBNET}.{id}");
            tb.attach(&ns, &ip, &format!("n{id}"));
            let dir = tb.root.path().join(format!("node-{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            tb.nodes.push(Node {
                id,
                ns,
                ip,
                dir,
                zoned: None,
                vip_agent: None,
            });
        }
        tb
    }

    /// A namespace with `eth0` (address `ip/24`) plugged into the bridge.
    fn attach(&self, ns: &str, ip: &str, tag: &str) {
        let host_end = format!("{}{tag}", self.prefix);
        sh(&["ip", "netns", "add", ns]);
        ip_in(
            &self.bridge_ns,
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        );
        ip_in(
            &self.bridge_ns,
            &["link", "set", &host_end, "master", "br0", "up"],
        );
        ip_in(ns, &["link", "set", "lo", "up"]);
        ip_in(ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        let host = ip.rsplit('.').next().expect("dotted address");
        let ip6 = format!("{SUBNET6}::{host}/64");
        ip_in(ns, &["addr", "add", &ip6, "dev", "eth0", "nodad"]);
        ip_in(ns, &["link", "set", "eth0", "up"]);
    }

    /// Clients listen everywhere: they must be reachable on the VIP too.
    /// Raft timing is zoned's default: what operators get.
    fn write_configs(&self, i: usize) {
        let node = &self.nodes[i];
        let zoned = ZonedConfig {
            id: node.id,
            dir: node.dir.clone(),
            client: "0.0.0.0:7400".into(),
            peer: format!("{}:7401", node.ip),
            voters: self
                .nodes
                .iter()
                .map(|v| (v.id, format!("{}:7401", v.ip)))
                .collect(),
            extra: self.extra_config.clone(),
            tls: Some(self.pki.server(node.id)),
            ..ZonedConfig::default()
        }
        .render();
        std::fs::write(node.dir.join("node.toml"), zoned).unwrap();
        // Never the host's watchdog: these agents share its /dev (a
        // zone-vip killed while armed would reset the machine).
        let vip = format!(
            "socket = \"{}\"\nunits_record = \"{}\"\n[[vip]]\naddress = \"{}/24\"\ninterface = \"eth0\"\n[[vip]]\naddress = \"{}/64\"\ninterface = \"eth0\"\n[announce]\ncount = 3\ninterval_ms = 100\n[fence]\nwatchdog_mode = \"off\"\n",
            node.dir.join("agent.sock").display(),
            node.dir.join("leader-units").display(),
            self.vip,
            self.vip6()
        );
        std::fs::write(node.dir.join("vip.toml"), vip).unwrap();
        let keepalived = format!(
            "global_defs {{\n  router_id zone-{id}\n  script_user root\n}}\nvrrp_instance zone {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {prio}\n  advert_int 1\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n",
            id = node.id,
            prio = 110 - 10 * node.id,
            vip = self.vip
        );
        std::fs::write(node.dir.join("keepalived.conf"), keepalived).unwrap();
    }

    fn spawn_in(&self, i: usize, bin: &Path, args: &[&str], log: &str) -> Child {
        let node = &self.nodes[i];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns]).arg(bin).args(args);
        spawn_logged(cmd, &node.dir.join(log))
    }

    pub fn start_zoned(&mut self, i: usize) {
        let cfg = self.nodes[i].dir.join("node.toml");
        let child = self.spawn_in(
            i,
            &binary("zoned"),
            &["--config", cfg.to_str().unwrap()],
            "zoned.log",
        );
        self.nodes[i].zoned = Some(child);
    }

    /// Starts the node's VIP manager (zone-vip, or keepalived).
    pub fn start_agent(&mut self, i: usize) {
        let dir = self.nodes[i].dir.clone();
        let child = match self.manager {
            VipManager::ZoneVip => {
                let cfg = dir.join("vip.toml");
                self.spawn_in(
                    i,
                    &binary("zone-vip"),
                    &["--config", cfg.to_str().unwrap()],
                    "zone-vip.log",
                )
            }
            VipManager::Keepalived => {
                let arg = |name: &str| dir.join(name).to_str().unwrap().to_owned();
                let (cfg, pid, vrrp) = (
                    arg("keepalived.conf"),
                    arg("keepalived.pid"),
                    arg("vrrp.pid"),
                );
                self.spawn_in(
                    i,
                    Path::new("/usr/sbin/keepalived"),
                    &[
                        "--dont-fork",
                        "--log-console",
                        "--no-syslog",
                        "--vrrp",
                        "-f",
                        &cfg,
                        "-p",
                        &pid,
                        "-r",
                        &vrrp,
                    ],
                    "keepalived.log",
                )
            }
        };
        self.nodes[i].vip_agent = Some(child);
    }

    /// SIGTERM to the node's VIP manager; waits for it to exit.
    pub fn terminate_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].vip_agent.take() {
            terminate(&mut c, "the VIP manager", Duration::from_secs(10));
        }
    }

    pub fn kill9_zoned(&mut self, i: usize) {
        kill9(self.nodes[i].zoned.take());
    }

    pub fn kill9_agent(&mut self, i: usize) {
        kill9(self.nodes[i].vip_agent.take());
    }

    /// What systemd does when zone-vip's main process dies: run the unit's
    /// `ExecStopPost=zone-vip --remove-all` (rootfs/ carries that unit).
    pub fn exec_stop_post(&self, i: usize) {
        let cfg = self.nodes[i].dir.join("vip.toml");
        let st = Command::new("ip")
            .args(["netns", "exec", &self.nodes[i].ns])
            .arg(binary("zone-vip"))
            .args(["--config", cfg.to_str().unwrap(), "--remove-all"])
            .status()
            .expect("run zone-vip --remove-all");
        assert!(st.success(), "zone-vip --remove-all failed: {st}");
    }

    /// SIGTERM to the node's zoned; waits for it to exit.
    pub fn terminate_zoned(&mut self, i: usize) -> std::process::ExitStatus {
        let mut c = self.nodes[i].zoned.take().expect("zoned running");
        terminate(&mut c, "zoned", Duration::from_secs(20))
    }

    /// Cuts (or restores) node `i`'s link to the bridge.
    pub fn set_link(&self, i: usize, up: bool) {
        let host_end = format!("{}n{}", self.prefix, self.nodes[i].id);
        let state = if up { "up" } else { "down" };
        ip_in(&self.bridge_ns, &["link", "set", &host_end, state]);
    }

    /// Waits until node `i`'s eth0 no longer holds the VIP.
    pub fn wait_released(&self, i: usize, timeout: Duration, what: &str) {
        wait_for(timeout, what, || {
            (!self.holders().contains(&i)).then_some(())
        });
    }

    /// Indexes of the nodes whose eth0 holds the VIP now.
    pub fn holders(&self) -> Vec<usize> {
        holders_of(&self.namespaces(), &self.vip)
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.ns.clone()).collect()
    }

    /// Runs `zonectl` inside the client namespace, as the zone's admin.
    pub fn zonectl(&self, endpoint: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.client_ns])
            .arg(binary("zonectl"))
            .arg("--credentials")
            .arg(self.pki.admin_dir())
            .args(["--endpoints", endpoint])
            .args(args)
            .output()
            .expect("run zonectl")
    }

    /// Server `i`'s metrics, scraped from the client's namespace.
    pub fn scrape(&self, i: usize) -> Option<String> {
        let addr = format!("{}:{METRICS_PORT}", self.nodes[i].ip)
            .parse()
            .ok()?;
        scrape_in_ns(&self.client_ns, addr)
    }

    /// Runs `zonectl` inside server `i`'s own namespace, as the zone's
    /// admin: it reaches that server even while its link is down.
    pub fn zonectl_in(&self, i: usize, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.nodes[i].ns])
            .arg(binary("zonectl"))
            .arg("--credentials")
            .arg(self.pki.admin_dir())
            .args(["--timeout", "2", "--endpoints"])
            .arg(format!("{}:7400", self.nodes[i].ip))
            .args(args)
            .output()
            .expect("run zonectl")
    }

    /// The IPv6 VIP (zone-vip only; keepalived runs the IPv4 one).
    pub fn vip6(&self) -> String {
        format!("{SUBNET6}::100")
    }

    /// The client namespace's IPv6 neighbour entry (MAC) for the IPv6 VIP.
    pub fn client_neighbour6_mac(&self) -> Option<String> {
        let out = sh(&[
            "ip",
            "-n",
            &self.client_ns,
            "-6",
            "neigh",
            "show",
            &self.vip6(),
        ]);
        out.split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_owned)
    }

    /// Gives the client a (stale) IPv6 neighbour entry for the VIP: Linux
    /// applies an unsolicited advertisement only to an entry it has.
    pub fn seed_client_neighbour6(&self, mac: &str) {
        let vip6 = self.vip6();
        sh(&[
            "ip",
            "-n",
            &self.client_ns,
            "-6",
            "neigh",
            "replace",
            &vip6,
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "stale",
        ]);
    }

    /// The client namespace's neighbour entry (MAC) for the VIP, if any.
    pub fn client_neighbour_mac(&self) -> Option<String> {
        let out = sh(&["ip", "-n", &self.client_ns, "neigh", "show", &self.vip]);
        out.split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .map(str::to_owned)
    }

    pub fn mac_of(&self, i: usize) -> String {
        let out = sh(&["ip", "-n", &self.nodes[i].ns, "-o", "link", "show", "eth0"]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("eth0 has a MAC")
            .to_owned()
    }

    pub fn log(&self, i: usize, name: &str) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join(name)).unwrap_or_default()
    }
}

/// Indexes of the namespaces whose eth0 holds `vip` now.
pub fn holders_of(namespaces: &[String], vip: &str) -> Vec<usize> {
    (0..namespaces.len())
        .filter(|&i| {
            let out = Command::new("ip")
                .args([
                    "-n",
                    &namespaces[i],
                    "-o",
                    "-4",
                    "addr",
                    "show",
                    "dev",
                    "eth0",
                ])
                .output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {vip}/")))
        })
        .collect()
}

fn rand_suffix() -> String {
    format!("{:03x}", rand::random::<u16>() % 0x1000)
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // A process blocked on a frozen disk dies only once it thaws.
        for i in 0..self.disks.len() {
            self.thaw_disk(i);
        }
        for i in 0..self.nodes.len() {
            self.kill9_agent(i);
            self.kill9_zoned(i);
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                for log in ["zoned.log", "zone-vip.log"] {
                    let text = std::fs::read_to_string(n.dir.join(log)).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("---- node {} {log} (last 30 lines) ----", n.id);
                    for l in &lines[lines.len().saturating_sub(30)..] {
                        eprintln!("{l}");
                    }
                }
            }
        }
        let mut all: Vec<String> = self.nodes.iter().map(|n| n.ns.clone()).collect();
        all.push(self.client_ns.clone());
        all.push(self.bridge_ns.clone());
        for ns in all {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        for (dev, mount) in &self.disks {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

/// Fills the filesystem holding `dir` with one file until `leave` bytes
/// are free; the file (remove it to free the space). Allocated, not
/// sparse: tmpfs counts only pages written or allocated.
pub fn fill_disk(dir: &Path, leave: u64) -> PathBuf {
    use std::os::fd::AsFd;
    let st = nix::sys::statvfs::statvfs(dir)
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", dir.display()));
    let free = st.blocks_available() * st.fragment_size();
    let path = dir.join("filler");
    let f =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    nix::fcntl::fallocate(
        f.as_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        free.saturating_sub(leave) as i64,
    )
    .unwrap_or_else(|e| panic!("fallocate {}: {e}", path.display()));
    path
}

/// Polls until `f` holds, with a deadline.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The port zoned serves Prometheus metrics on by default.
pub const METRICS_PORT: u16 = 7402;

/// One scrape of zoned's metrics at `addr` (`GET /metrics`, HTTP/1.1, as
/// Prometheus or curl asks): the body, or None if nothing answered 200
/// within a few seconds.
pub async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(addr);
    let mut s = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: zoned\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// [`scrape`] from inside network namespace `ns` (a thread of its own
/// enters it), as a Prometheus there would.
pub fn scrape_in_ns(ns: &str, addr: std::net::SocketAddr) -> Option<String> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).ok()?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(scrape(addr))
    })
    .join()
    .ok()
    .flatten()
}
