//! A virtual Zoned cluster: VMs booted from the built appliance image under
//! QEMU (TCG: no KVM here), on a bridge inside a network namespace of their
//! own, with the host side of the bridge as the management client.
//!
//! The harness owns everything it starts: every VM is killed and the
//! namespace deleted when the [`Lab`] drops, also when a test panics, and
//! then each VM's serial console log is kept (and its tail printed) for the
//! post-mortem. Readiness is always the gRPC health check answering, never a
//! sleep or console text (TCG garbles the console).
//!
//! Needs root, /dev/net/tun, qemu-system-x86_64 and the image built by
//! `cargo xtask image --profile vm`; a test that lacks one fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The cluster network: VM N is 10.79.0.N, the host side .254, the VIP .100.
pub const NET: &str = "10.79.0";
pub const HOST_ADDR: &str = "10.79.0.254";
pub const VIP: &str = "10.79.0.100";
/// The zone's Raft tick in every VM's identity. QEMU runs here without
/// KVM (TCG: tens of times slower than the hardware), three guests on two
/// host cores, and a guest often waits a few hundred milliseconds for a
/// host core: with the appliance's default 50 ms tick (a 350 ms lease
/// renewed every 100 ms) the leader's lease lapsed every few seconds and
/// the VIP went with it (up to 22 lapses per VM in one test); at 100 ms
/// (a 700 ms lease) the pause test's new holder still lost it once to a
/// half-second stall of its guest (a renewal's netlink call outlasting the
/// lease). An operator on such servers would raise `tick_ms` the same way.
pub const TICK_MS: u64 = 150;
/// Each VM's disk: the image's 2.5 GiB grown to this.
pub const DISK_SIZE: &str = "4G";
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The workspace's target directory (CARGO_TARGET_DIR or ./target), found
/// from the running test executable: target/release/deps/<test>.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .find(|p| {
            p.join("image").is_dir() || p.join("release").is_dir() || p.join("debug").is_dir()
        })
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// The built image and what direct kernel boot needs.
#[derive(Debug, Clone)]
pub struct Image {
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl Image {
    /// The vm profile's image in target/image, or an error saying how to
    /// build it.
    pub fn find() -> Result<Image> {
        Image::find_profile("vm")
    }

    /// The image of `profile` (`vm` or `metal`) in target/image, or an
    /// error saying how to build it.
    pub fn find_profile(profile: &str) -> Result<Image> {
        let dir = target_dir().join("image");
        let manifest = dir.join(format!("manifest-{profile}.json"));
        let text = std::fs::read_to_string(&manifest).with_context(|| {
            format!(
                "{} is missing: build the image first with `cargo xtask image --profile {profile}` (as root)",
                manifest.display()
            )
        })?;
        let m: serde_json::Value = serde_json::from_str(&text)?;
        let image = Image {
            raw: dir.join(format!("zoned-{profile}.raw")),
            qcow2: dir.join(format!("zoned-{profile}.qcow2")),
            kernel: dir.join(format!("zoned-{profile}.vmlinuz")),
            initrd: dir.join(format!("zoned-{profile}.initrd")),
            cmdline: m["kernel_cmdline"]
                .as_str()
                .context("manifest has no kernel_cmdline")?
                .to_owned(),
        };
        for p in [&image.raw, &image.qcow2, &image.kernel, &image.initrd] {
            if !p.exists() {
                bail!(
                    "{} is missing: rebuild with `cargo xtask image --profile {profile}`",
                    p.display()
                );
            }
        }
        Ok(image)
    }
}

/// Fails with the reason when QEMU tests cannot run on this machine.
pub fn require_host() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the QEMU tests need root (network namespace, bridge, tap devices): run them as root"
        );
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing: tap devices for the VMs cannot be made");
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        bail!("qemu-system-x86_64 is missing: run `cargo xtask deps` (Debian package qemu-system-x86)");
    }
    Ok(())
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// How a VM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads the kernel and initrd itself; the identity is on the
    /// kernel command line. Fastest.
    DirectKernel,
    /// OVMF firmware finds EFI/BOOT/BOOTX64.EFI (the unified kernel image)
    /// on the disk, as a real server does; the identity comes by fw_cfg.
    Uefi,
    /// As a server is installed: the raw image copied whole onto the
    /// VM's disk, the identity written into zoned/identity.toml on its EFI
    /// partition with mtools (no fw_cfg, nothing on the command line), and
    /// a UEFI boot.
    Flashed,
}

/// The virtual CPU a VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cpu {
    /// Every feature QEMU's TCG emulates (SSE4.2, PCLMULQDQ, AVX2, ...).
    Max,
    /// QEMU's default model: x86-64's baseline and little more, no SSE4.2
    /// and no PCLMULQDQ, like `kvm64` (the default CPU type of older
    /// Proxmox VE versions).
    Qemu64,
}

impl Cpu {
    pub fn model(self) -> &'static str {
        match self {
            Cpu::Max => "max",
            Cpu::Qemu64 => "qemu64",
        }
    }
}

/// One VM's fixed parts: survive a kill and a new boot.
#[derive(Debug)]
pub struct Vm {
    pub id: u64,
    pub boot: Boot,
    pub cpu: Cpu,
    pub overlay: PathBuf,
    pub serial: PathBuf,
    pub identity: PathBuf,
    /// The VM's certificates (`ca.pem`, `node.pem`, `node.key`, and
    /// `ca.key` for a founder).
    pub tls: PathBuf,
    /// QEMU's QMP socket (the machine monitor: stop, cont).
    pub qmp: PathBuf,
    vars: PathBuf,
    tap: String,
    process: Option<Machine>,
    boots: u32,
    /// Whether a reboot of the guest restarts it (else QEMU exits).
    reboots: bool,
}

impl Vm {
    pub fn addr(&self) -> String {
        format!("{NET}.{}", self.id)
    }

    pub fn endpoint(&self) -> String {
        format!("{}:7400", self.addr())
    }

    pub fn mac(&self) -> String {
        format!("52:54:00:79:00:{:02x}", self.id)
    }

    pub fn running(&mut self) -> bool {
        match &mut self.process {
            Some(Machine::Once(c)) => matches!(c.try_wait(), Ok(None)),
            Some(Machine::Rebooting { thread, .. }) => !thread.is_finished(),
            None => false,
        }
    }
}

/// What a VM that reboots writes on its console log each time its QEMU is
/// started again.
const RESTARTED: &str = "QEMU started again (a cold boot)";

/// A VM's QEMU: one process, or for a VM that reboots, a thread that starts
/// QEMU again each time its guest resets (QEMU runs with `-no-reboot`, so
/// it exits then).
#[derive(Debug)]
enum Machine {
    Once(Child),
    Rebooting {
        /// Whether the VM was killed, and the running QEMU's pid.
        state: std::sync::Arc<std::sync::Mutex<(bool, Option<u32>)>>,
        thread: std::thread::JoinHandle<()>,
    },
}

impl Machine {
    /// Starts QEMU (`program` with `args`) again after each exit with
    /// status 0 (a guest reset, or a poweroff: the VMs of these tests do not
    /// power off), until it is killed or fails (its status then on
    /// `console`).
    fn rebooting(
        program: std::ffi::OsString,
        args: Vec<std::ffi::OsString>,
        console: PathBuf,
        stderr: PathBuf,
    ) -> Machine {
        let state = std::sync::Arc::new(std::sync::Mutex::new((false, None)));
        let shared = state.clone();
        let mark = move |line: &str| {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&console)
            {
                let _ = writeln!(f, "\n---- {line} ----");
            }
        };
        let thread = std::thread::spawn(move || loop {
            let mut child = {
                let mut st = shared.lock().expect("the VM's state");
                if st.0 {
                    return;
                }
                let spawned = append_to(&stderr).and_then(|err| {
                    Command::new(&program)
                        .args(&args)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(err)
                        .spawn()
                });
                match spawned {
                    Ok(c) => {
                        st.1 = Some(c.id());
                        c
                    }
                    Err(e) => {
                        mark(&format!("QEMU did not start: {e}"));
                        return;
                    }
                }
            };
            let status = child.wait();
            let mut st = shared.lock().expect("the VM's state");
            st.1 = None;
            if st.0 {
                return;
            }
            match status {
                Ok(s) if s.success() => mark(&format!("the guest reset: {RESTARTED}")),
                other => {
                    mark(&format!("QEMU ended: {other:?}"));
                    return;
                }
            }
        });
        Machine::Rebooting { state, thread }
    }

    /// SIGKILL to QEMU (and no restart); returns once it has exited.
    fn kill(self) {
        match self {
            Machine::Once(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Machine::Rebooting { state, thread } => {
                if let Ok(mut st) = state.lock() {
                    st.0 = true;
                    if let Some(pid) = st.1 {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                let _ = thread.join();
            }
        }
    }
}

/// `path` opened for appending (created if absent), for a child's output.
fn append_to(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}
/// How long a console may stay silent after a reset before the firmware is
/// called hung: OVMF prints within seconds of a start (BdsDxe's lines),
/// 46 s at worst in 60 resets on this machine with both cores busy.
pub const FIRMWARE_QUIET: Duration = Duration::from_secs(240);

impl Vm {
    /// The console log of boot `boot` (1: vmN-serial.log, then
    /// vmN-serial.2.log, ...).
    fn console_path(&self, boot: u32) -> PathBuf {
        if boot <= 1 {
            self.serial.clone()
        } else {
            self.serial.with_extension(format!("{boot}.log"))
        }
    }
}

/// A namespace with a bridge, and the VMs on it.
#[derive(Debug)]
pub struct Lab {
    pub ns: String,
    pub dir: PathBuf,
    pub image: Image,
    pub vms: Vec<Vm>,
    /// The zone's certificates: each VM gets its own (founders with the
    /// CA's key) by fw_cfg or on its EFI partition, as the identity.
    pub pki: crate::pki::TestPki,
    /// The founders' ids: every VM's identity lists them as peers.
    founders: u64,
    /// Every VM's identity's `leader_units` (set before adding VMs).
    pub leader_units: Vec<String>,
    /// Unit files (name, text) given to every VM with its identity (set
    /// before adding VMs): by fw_cfg, or on the EFI partition when flashed.
    pub units: Vec<(String, String)>,
    /// Every VM's identity's `managed_roots` besides /etc/zoned/managed
    /// (set before adding VMs).
    pub managed_roots: Vec<String>,
    /// One raw disk image every VM is given (set before adding VMs, by
    /// [`Lab::add_shared_disk`]): a shared SAN LUN, seen in the guests as
    /// [`SHARED_DISK`].
    pub shared_disk: Option<PathBuf>,
    keep: bool,
}

/// The shared disk's serial number, and so its path in the guests.
pub const SHARED_DISK_SERIAL: &str = "zoned-shared";
/// Where the guests see the shared disk (udev's by-id link).
pub const SHARED_DISK: &str = "/dev/disk/by-id/virtio-zoned-shared";

static LABS: AtomicU32 = AtomicU32::new(0);

/// Changes a flashed VM's raw disk before its first boot.
pub type PrepareDisk = dyn Fn(&Path) -> Result<()>;

impl Lab {
    /// A namespace and bridge for a cluster of `founders` VMs of the vm
    /// image; none is started yet. `name` names the log directory.
    pub fn new(name: &str, founders: u64) -> Result<Lab> {
        // The host first: without root, a missing image is not the news.
        require_host()?;
        Lab::with_image(name, founders, Image::find()?)
    }

    /// [`Lab::new`] with the VMs booting `image`.
    pub fn with_image(name: &str, founders: u64, image: Image) -> Result<Lab> {
        require_host()?;
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let ns = format!("zq{}-{n}", std::process::id());
        let dir = target_dir().join("vm-tests").join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        sh(&["ip", "netns", "add", &ns])?;
        let pki = crate::pki::TestPki::new(&dir.join("pki"));
        let lab = Lab {
            ns,
            dir,
            image,
            vms: Vec::new(),
            pki,
            founders,
            leader_units: Vec::new(),
            units: Vec::new(),
            managed_roots: Vec::new(),
            shared_disk: None,
            keep: false,
        };
        lab.ip(&["link", "set", "lo", "up"])?;
        lab.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.ip(&["addr", "add", &format!("{HOST_ADDR}/24"), "dev", "br0"])?;
        lab.ip(&["link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// [`Lab::units`] written under the lab's directory: (name, path).
    ///
    /// Each boot calls this, while the QEMU of a VM booted a moment before
    /// may still be reading the same files for its fw_cfg: a file written
    /// in place (truncated, then filled) was read empty by it now and then
    /// (zone-provision refused the empty unit, and that VM's zoned never
    /// started). So a file is replaced by a rename, and only when its
    /// content changed.
    fn unit_files(&self) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.dir.join("units");
        std::fs::create_dir_all(&dir)?;
        self.units
            .iter()
            .map(|(name, text)| {
                let path = dir.join(name);
                if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
                    let part = dir.join(format!(".{name}.part"));
                    std::fs::write(&part, text)?;
                    std::fs::rename(&part, &path)?;
                }
                Ok((name.clone(), path))
            })
            .collect()
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut v = vec!["ip", "-n", &self.ns];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// The identity of VM `id`, in the TOML form (for fw_cfg).
    pub fn identity_toml(&self, id: u64) -> String {
        let peers: Vec<String> = (1..=self.founders)
            .map(|p| format!("\"{p}@{NET}.{p}\""))
            .collect();
        let mut s = format!(
            "id = {id}\ninterface = \"eth0\"\naddress = \"{NET}.{id}/24\"\npeers = [{}]\nvip = [\"{VIP}/24\"]\ntick_ms = {TICK_MS}\n",
            peers.join(", ")
        );
        if id > self.founders {
            s.push_str(&format!("join = \"{NET}.1\"\n"));
        }
        if !self.leader_units.is_empty() {
            let units: Vec<String> = self
                .leader_units
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect();
            s.push_str(&format!("leader_units = [{}]\n", units.join(", ")));
        }
        if !self.managed_roots.is_empty() {
            let roots: Vec<String> = self
                .managed_roots
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect();
            s.push_str(&format!("managed_roots = [{}]\n", roots.join(", ")));
        }
        s
    }

    /// The same identity as kernel command line words.
    pub fn identity_cmdline(&self, id: u64) -> String {
        let peers: Vec<String> = (1..=self.founders)
            .map(|p| format!("{p}@{NET}.{p}"))
            .collect();
        let mut s = format!(
            "zoned.id={id} zoned.interface=eth0 zoned.address={NET}.{id}/24 zoned.peers={} zoned.vip={VIP}/24 zoned.tick_ms={TICK_MS}",
            peers.join(",")
        );
        if id > self.founders {
            s.push_str(&format!(" zoned.join={NET}.1"));
        }
        if !self.leader_units.is_empty() {
            s.push_str(&format!(
                " zoned.leader_units={}",
                self.leader_units.join(",")
            ));
        }
        if !self.managed_roots.is_empty() {
            s.push_str(&format!(
                " zoned.managed_roots={}",
                self.managed_roots.join(",")
            ));
        }
        s
    }

    /// Adds VM `id` (its disk is a fresh overlay of the image, or a copy of
    /// the raw image for [`Boot::Flashed`]) and boots it, on [`Cpu::Max`].
    pub fn add_vm(&mut self, id: u64, boot: Boot) -> Result<usize> {
        self.add_vm_on(id, boot, Cpu::Max)
    }

    /// [`Lab::add_vm`] with the VM's CPU model.
    pub fn add_vm_on(&mut self, id: u64, boot: Boot, cpu: Cpu) -> Result<usize> {
        self.add_vm_with(id, boot, cpu, None)
    }

    /// A [`Boot::Flashed`] VM whose raw disk `prepare` changes after the
    /// image and the identity are on it, before it boots (an upgrade's
    /// slot written, an entry added to its EFI partition). Unlike other
    /// VMs, it reboots when its guest does (boot counting needs that).
    pub fn add_flashed_vm_with(
        &mut self,
        id: u64,
        cpu: Cpu,
        prepare: &PrepareDisk,
    ) -> Result<usize> {
        self.add_vm_with(id, Boot::Flashed, cpu, Some(prepare))
    }

    /// VM `i`'s disk (the raw copy of a flashed VM, else its qcow2 overlay).
    pub fn disk(&self, i: usize) -> &Path {
        &self.vms[i].overlay
    }

    fn add_vm_with(
        &mut self,
        id: u64,
        boot: Boot,
        cpu: Cpu,
        prepare: Option<&PrepareDisk>,
    ) -> Result<usize> {
        let identity = self.dir.join(format!("vm{id}-identity.toml"));
        let mut text = self.identity_toml(id);
        if boot == Boot::Flashed {
            // A name no other source gives: seen in the zone, it proves the
            // identity came from the EFI partition.
            text.push_str(&format!("name = \"flashed-{id}\"\n"));
        }
        std::fs::write(&identity, text)?;
        let tls = if id <= self.founders {
            self.pki.founder(id)
        } else {
            self.pki.server(id)
        };
        let overlay = if boot == Boot::Flashed {
            let disk = self.dir.join(format!("vm{id}.raw"));
            sh(&[
                "cp",
                "--sparse=always",
                &self.image.raw.to_string_lossy(),
                &disk.to_string_lossy(),
            ])?;
            // The EFI partition starts 1 MiB into the disk.
            let target = format!("{}@@1M", disk.display());
            sh(&[
                "mcopy",
                "-o",
                "-i",
                &target,
                &identity.to_string_lossy(),
                "::/zoned/identity.toml",
            ])?;
            if let Some(prepare) = prepare {
                prepare(&disk)?;
            }
            if !self.units.is_empty() {
                sh(&["mmd", "-i", &target, "::/zoned/units"])?;
            }
            for (name, path) in self.unit_files()? {
                sh(&[
                    "mcopy",
                    "-o",
                    "-i",
                    &target,
                    &path.to_string_lossy(),
                    &format!("::/zoned/units/{name}"),
                ])?;
            }
            // The certificates beside it, as an operator copies zonectl
            // zone init's server-N/ there.
            sh(&["mmd", "-i", &target, "::/zoned/tls"])?;
            for f in tls_files(&tls)? {
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
                let name = name.unwrap_or_default();
                sh(&[
                    "mcopy",
                    "-o",
                    "-i",
                    &target,
                    &f.to_string_lossy(),
                    &format!("::/zoned/tls/{name}"),
                ])?;
            }
            sh(&[
                "qemu-img",
                "resize",
                "-q",
                "-f",
                "raw",
                &disk.to_string_lossy(),
                DISK_SIZE,
            ])?;
            disk
        } else {
            let overlay = self.dir.join(format!("vm{id}.qcow2"));
            let backing = std::fs::canonicalize(&self.image.qcow2)?;
            sh(&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                &backing.to_string_lossy(),
                &overlay.to_string_lossy(),
                // Bigger than the image, as a server's disk is: the data
                // partition grows into the rest at the first boot.
                DISK_SIZE,
            ])?;
            overlay
        };
        let vars = self.dir.join(format!("vm{id}-vars.fd"));
        if boot != Boot::DirectKernel {
            std::fs::copy(OVMF_VARS, &vars).context("OVMF firmware (Debian package ovmf)")?;
        }
        let tap = format!("tap{id}");
        self.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        self.ip(&["link", "set", &tap, "master", "br0"])?;
        self.ip(&["link", "set", &tap, "up"])?;
        self.vms.push(Vm {
            id,
            boot,
            cpu,
            overlay,
            serial: self.dir.join(format!("vm{id}-serial.log")),
            identity,
            tls,
            qmp: self.dir.join(format!("vm{id}.qmp")),
            vars,
            tap,
            process: None,
            boots: 0,
            reboots: prepare.is_some(),
        });
        let i = self.vms.len() - 1;
        self.boot(i)?;
        Ok(i)
    }

    /// Starts VM `i`'s QEMU (again, after a kill: same disk).
    pub fn boot(&mut self, i: usize) -> Result<()> {
        let cmdline = format!(
            "{} {}",
            self.image.cmdline,
            self.identity_cmdline(self.vms[i].id)
        );
        let (kernel, initrd) = (self.image.kernel.clone(), self.image.initrd.clone());
        let ns = self.ns.clone();
        let units = self.unit_files()?;
        let vm = &mut self.vms[i];
        if vm.running() {
            bail!("VM {} is already running", vm.id);
        }
        vm.boots += 1;
        // Each boot's console goes to its own file: vmN-serial.log, then
        // vmN-serial.2.log, ... (a VM that reboots keeps one across its
        // own resets).
        let serial = vm.console_path(vm.boots);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, "qemu-system-x86_64"])
            .args(["-machine", "q35", "-accel", "tcg", "-cpu", vm.cpu.model()])
            .args(["-smp", "1", "-m", "1024"])
            .args(["-display", "none", "-monitor", "none"])
            // A reboot ends QEMU: the tests see a VM that reset itself.
            // Where the test is about reboots (boot counting), the loop
            // below starts QEMU again.
            .arg("-no-reboot")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", vm.qmp.display()))
            .arg("-chardev")
            .arg(format!(
                "file,id=console,path={},append=on",
                serial.display()
            ))
            .args(["-serial", "chardev:console"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format={},cache=unsafe",
                vm.overlay.display(),
                if vm.boot == Boot::Flashed {
                    "raw"
                } else {
                    "qcow2"
                }
            ))
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                vm.tap
            ))
            .args(self.shared_disk.iter().flat_map(|disk| {
                // share-rw: every VM's QEMU writes the one file, as hosts
                // share a LUN; the host's page cache keeps them coherent.
                [
                    "-drive".to_owned(),
                    format!("file={},if=none,id=shared,format=raw", disk.display()),
                    "-device".to_owned(),
                    format!("virtio-blk-pci,drive=shared,serial={SHARED_DISK_SERIAL},share-rw=on"),
                ]
            }))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={}", vm.mac()));
        if vm.boot != Boot::Flashed {
            cmd.arg("-fw_cfg").arg(format!(
                "name=opt/zoned/identity.toml,file={}",
                vm.identity.display()
            ));
            for f in tls_files(&vm.tls)? {
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
                cmd.arg("-fw_cfg").arg(format!(
                    "name=opt/zoned/tls/{},file={}",
                    name.unwrap_or_default(),
                    f.display()
                ));
            }
            for (name, path) in &units {
                cmd.arg("-fw_cfg").arg(format!(
                    "name=opt/zoned/units/{name},file={}",
                    path.display()
                ));
            }
        }
        match vm.boot {
            Boot::DirectKernel => {
                cmd.arg("-kernel")
                    .arg(&kernel)
                    .arg("-initrd")
                    .arg(&initrd)
                    .arg("-append")
                    .arg(&cmdline);
            }
            Boot::Uefi | Boot::Flashed => {
                cmd.arg("-drive")
                    .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vm.vars.display()));
            }
        }
        // QEMU's own messages (a refused option, a busy tap) for the
        // post-mortem.
        let stderr = serial.with_file_name(format!("vm{}-qemu.log", vm.id));
        vm.process = Some(if vm.reboots {
            // Each reset of the guest is a cold start of a new QEMU on the
            // same disk and firmware variables, as a power cycle. A warm
            // reset (QEMU's own, without -no-reboot) hung OVMF under TCG
            // once in CI: after a guest's `reboot: Restarting system` the
            // firmware printed nothing for 10 minutes, QEMU still running.
            // What the tests check (the loader's boot counting, the
            // assessment, the rollback) lives on the disk and in the
            // variable store, which a cold start keeps.
            Machine::rebooting(
                cmd.get_program().to_owned(),
                cmd.get_args().map(|a| a.to_owned()).collect(),
                serial.clone(),
                stderr,
            )
        } else {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(append_to(&stderr)?);
            Machine::Once(cmd.spawn().context("cannot start qemu-system-x86_64")?)
        });
        Ok(())
    }

    /// The first VM whose console has said nothing for `quiet` since a
    /// reset (`reboot: Restarting system`, or the line written when QEMU
    /// is started again), while its QEMU runs: the firmware
    /// hung. Tests that wait through reboots ask this, to fail with that
    /// rather than at their time limit.
    pub fn silent_after_reset(&mut self, quiet: Duration) -> Option<String> {
        for i in 0..self.vms.len() {
            if !self.vms[i].running() {
                continue;
            }
            let vm = &self.vms[i];
            let path = vm.console_path(vm.boots);
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            let text = String::from_utf8_lossy(&text);
            let last = text.trim_end().lines().last().unwrap_or("");
            let reset = last.contains("reboot: Restarting system") || last.contains(RESTARTED);
            let silent = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if reset && silent >= quiet {
                return Some(format!(
                    "VM {}: nothing on its console for {} s since its reset (`{}`, {}): its firmware hung",
                    vm.id,
                    silent.as_secs(),
                    last.trim(),
                    path.display()
                ));
            }
        }
        None
    }

    /// `zonectl` with `args` through `client`, waited for while watching
    /// the consoles: fails early when a VM's firmware hangs after a reset
    /// (see [`Lab::silent_after_reset`]), killing zonectl.
    pub fn zonectl_watching(
        &mut self,
        client: &Client,
        endpoint: &str,
        args: &[&str],
    ) -> Result<std::process::Output> {
        let child = client
            .command(endpoint, args)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run zonectl")?;
        let pid = child.id();
        let waiter = std::thread::spawn(move || child.wait_with_output());
        loop {
            if waiter.is_finished() {
                return waiter
                    .join()
                    .map_err(|_| anyhow::anyhow!("the zonectl waiter panicked"))?
                    .context("zonectl");
            }
            if let Some(hang) = self.silent_after_reset(FIRMWARE_QUIET) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = waiter.join();
                bail!("zonectl {} stopped: {hang}", args.join(" "));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// A raw disk of `mib` MiB with an empty ext4 file system, given to
    /// every VM added after this (see [`Lab::shared_disk`]); its path.
    pub fn add_shared_disk(&mut self, mib: u64) -> Result<PathBuf> {
        let path = self.dir.join("shared-disk.raw");
        let f = std::fs::File::create(&path)?;
        f.set_len(mib << 20)?;
        drop(f);
        sh(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "shared",
            &path.to_string_lossy(),
        ])?;
        self.shared_disk = Some(path.clone());
        Ok(path)
    }

    /// SIGKILL to VM `i`'s QEMU: the whole machine stops at once, as on a
    /// power cut (`ip netns exec` execs QEMU, so the child is QEMU; a VM
    /// that reboots is not started again).
    pub fn kill(&mut self, i: usize) {
        if let Some(m) = self.vms[i].process.take() {
            m.kill();
        }
    }

    /// Runs one QMP command (`stop`, `cont`, ...) on VM `i`'s QEMU and waits
    /// for its answer. `stop` freezes the whole machine, its clocks
    /// included, as a hypervisor pausing a VM does; `cont` resumes it.
    pub fn qmp(&self, i: usize, command: &str) -> Result<()> {
        use std::io::{BufRead, BufReader, Write};
        let path = &self.vms[i].qmp;
        let stream = std::os::unix::net::UnixStream::connect(path)
            .with_context(|| format!("QMP socket {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = stream.try_clone()?;
        let mut lines = BufReader::new(stream).lines();
        // The greeting, then one answer per command (events may come
        // between: skipped).
        let mut answer = |what: &str| -> Result<()> {
            loop {
                let line = lines
                    .next()
                    .with_context(|| format!("QMP closed before answering {what}"))??;
                let v: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(e) = v.get("error") {
                    bail!("QMP {what}: {e}");
                }
                if v.get("return").is_some() || v.get("QMP").is_some() {
                    return Ok(());
                }
            }
        };
        answer("the greeting")?;
        for c in ["qmp_capabilities", command] {
            writeln!(writer, "{{\"execute\": \"{c}\"}}")?;
            answer(c)?;
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace, with a Tokio runtime.
    pub fn in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| path.clone())?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns into the lab namespace")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(f(&rt))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }

    /// One scrape of the metrics of the VM at `addr` (its port 7402), from
    /// the lab's namespace, as Prometheus there would.
    pub fn scrape(&self, addr: &str) -> Option<String> {
        let at = format!("{addr}:{}", crate::METRICS_PORT).parse().ok()?;
        crate::scrape_in_ns(&self.ns, at)
    }

    /// Whether zoned at `endpoint` answers the gRPC health check as SERVING
    /// (over TLS, without a client certificate, as a load balancer asks).
    pub fn healthy(&self, endpoint: &str) -> bool {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                self.pki.ca.cert_pem(),
            ))
            .domain_name(zonectl::zone_pki::ANY_SERVER)
            .timeout(zonectl::credentials::HANDSHAKE_TIMEOUT);
        self.health(endpoint, Some(tls))
            == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }

    /// The health check's answer from `endpoint`, from the lab's namespace:
    /// over TLS with `tls`, in plaintext (h2c) without; None if nothing
    /// answered within 2 s.
    fn health(
        &self,
        endpoint: &str,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Option<i32> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ep = format!("{scheme}://{endpoint}");
        self.in_ns(move |rt| {
            rt.block_on(async move {
                let mut ep = tonic::transport::Endpoint::from_shared(ep).ok()?;
                if let Some(tls) = tls {
                    ep = ep.tls_config(tls).ok()?;
                }
                let ch = ep
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(2))
                    .connect()
                    .await
                    .ok()?;
                let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
                let req = tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                };
                Some(c.check(req).await.ok()?.into_inner().status)
            })
        })
        .ok()
        .flatten()
    }

    /// Every TCP port of `addr` that accepts a connection (all 65535 tried,
    /// 256 at a time, from the lab's namespace).
    pub fn open_tcp_ports(&self, addr: &str) -> Result<Vec<u16>> {
        let ip: std::net::IpAddr = addr.parse()?;
        self.in_ns(move |rt| {
            rt.block_on(async move {
                use futures::StreamExt as _;
                let mut open: Vec<u16> = futures::stream::iter(1..=u16::MAX)
                    .map(|port| async move {
                        let conn = tokio::net::TcpStream::connect((ip, port));
                        let ok = matches!(
                            tokio::time::timeout(Duration::from_secs(2), conn).await,
                            Ok(Ok(_))
                        );
                        ok.then_some(port)
                    })
                    .buffer_unordered(256)
                    .filter_map(|p| async move { p })
                    .collect()
                    .await;
                open.sort_unstable();
                open
            })
        })
    }

    /// Whether anything at `endpoint` answers a gRPC health check in
    /// plaintext (h2c), as a client without TLS would ask.
    pub fn answers_plaintext(&self, endpoint: &str) -> bool {
        self.health(endpoint, None).is_some()
    }

    /// Waits until VM `i`'s zoned answers its health check; the time from
    /// `since`. Fails early if QEMU exits.
    pub fn wait_ready(&mut self, i: usize, since: Instant, limit: Duration) -> Result<Duration> {
        let endpoint = self.vms[i].endpoint();
        while since.elapsed() < limit {
            if !self.vms[i].running() {
                bail!("VM {} (QEMU) exited during boot", self.vms[i].id);
            }
            if let Some(hang) = self.silent_after_reset(FIRMWARE_QUIET) {
                bail!("{hang}");
            }
            if self.healthy(&endpoint) {
                return Ok(since.elapsed());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "VM {}: zoned did not answer its health check within {} s",
            self.vms[i].id,
            limit.as_secs()
        )
    }

    /// The lines of every VM's serial consoles (each boot's) that contain
    /// `needle`, as (VM id, line).
    pub fn console_lines(&self, needle: &str) -> Vec<(u64, String)> {
        let mut found = Vec::new();
        for vm in &self.vms {
            for boot in 1..=vm.boots.max(1) {
                let path = vm.console_path(boot);
                let text = std::fs::read(&path).unwrap_or_default();
                found.extend(
                    String::from_utf8_lossy(&text)
                        .lines()
                        .filter(|l| l.contains(needle))
                        .map(|l| (vm.id, l.to_owned())),
                );
            }
        }
        found
    }

    /// The guest's clock (seconds since its boot) at which a console line
    /// was printed: `[   80.617624] zone-vip[368]: ...`.
    pub fn console_time(line: &str) -> Option<f64> {
        let rest = line.strip_prefix('[')?;
        rest[..rest.find(']')?].trim().parse().ok()
    }

    /// A management client on the host side of the bridge.
    pub fn client(&self) -> Client {
        Client {
            ns: self.ns.clone(),
            credentials: self.pki.admin_dir(),
        }
    }

    /// Keeps the logs even if the test passes.
    pub fn keep_logs(&mut self) {
        self.keep = true;
    }
}

/// `zonectl` (the workspace's binary) run inside the lab's namespace, as
/// an operator on the management network would. Cheap to clone and to send
/// to a writer thread.
#[derive(Debug, Clone)]
pub struct Client {
    ns: String,
    /// The zone's admin credential (`zonectl --credentials`).
    credentials: PathBuf,
}

/// How the QEMU test and the storage benchmark declare their NFS
/// datastore's health checks: probed every second, hung after 4 s, on a
/// soft mount that gives up after two 2 s retries.
pub const NFS_BENCH_OPTIONS: &[&str] = &[
    "--options",
    "soft,timeo=20,retrans=2",
    "--required",
    "--probe-interval",
    "1s",
    "--probe-timeout",
    "4s",
];

impl Client {
    /// `zonectl storage add NAME --type nfs4` of `nfs`'s export at
    /// `target`, with `more`, at `endpoint`. The same declaration again
    /// changes nothing: asked until answered (under TCG, three VMs loading
    /// the NFS modules at once may delay the zone's heartbeats past an
    /// election timeout).
    pub fn add_nfs_datastore(
        &self,
        endpoint: &str,
        nfs: &crate::nfs::Ganesha,
        name: &str,
        target: &str,
        more: &[&str],
    ) -> Result<()> {
        let source = nfs.source();
        let add = [
            &[
                "storage", "add", name, "--type", "nfs4", "--source", &source, "--target", target,
            ][..],
            more,
        ]
        .concat();
        wait_for(Duration::from_secs(120), "`storage add` answered", || {
            let out = self.zonectl(endpoint, &add).ok()?;
            if !out.status.success() {
                eprintln!(
                    "storage add: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            out.status.success().then_some(())
        })
    }

    pub fn zonectl(&self, endpoint: &str, args: &[&str]) -> Result<std::process::Output> {
        self.command(endpoint, args)?
            .output()
            .context("cannot run zonectl")
    }

    /// zonectl with `args` at `endpoint`, in the lab's namespace.
    pub fn command(&self, endpoint: &str, args: &[&str]) -> Result<Command> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .arg(zonectl_bin()?)
            .arg("--credentials")
            .arg(&self.credentials)
            .args(["--endpoints", endpoint, "--timeout", "10"])
            .args(args);
        Ok(c)
    }

    /// `zonectl` started with `args` at `endpoint`, its stdout piped, for a
    /// command that streams (`logs -f`); the caller kills it.
    pub fn zonectl_child(&self, endpoint: &str, args: &[&str]) -> Result<std::process::Child> {
        self.command(endpoint, args)?
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot run zonectl")
    }

    /// `zonectl` started with `args` at `endpoint`, its stderr piped (the
    /// progress of `upgrade`), stdout discarded; the caller waits for it.
    pub fn zonectl_child_stderr(
        &self,
        endpoint: &str,
        args: &[&str],
    ) -> Result<std::process::Child> {
        self.command(endpoint, args)?
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot run zonectl")
    }

    /// `zonectl -o json show` through `endpoint`, parsed.
    pub fn show(&self, endpoint: &str) -> Option<serde_json::Value> {
        let out = self.zonectl(endpoint, &["-o", "json", "show"]).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// One write; true when acknowledged.
    pub fn put(&self, endpoint: &str, key: &str, value: &str) -> bool {
        self.zonectl(endpoint, &["kv", "put", key, value])
            .is_ok_and(|o| o.status.success())
    }

    /// Each server's state of datastore `name` (`zonectl storage status -o
    /// json` through `endpoint`): (server id, state), for the servers whose
    /// zone-mounts reported lately and know the datastore.
    pub fn storage_states(&self, endpoint: &str, name: &str) -> Option<Vec<(u64, String)>> {
        let out = self
            .zonectl(endpoint, &["-o", "json", "storage", "status"])
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let mut states = Vec::new();
        for s in v.as_array()? {
            let st = &s["storage"];
            if st["reported"].as_bool() != Some(true) {
                continue;
            }
            if let Some(d) = st["datastores"]
                .as_array()?
                .iter()
                .find(|d| d["name"] == name)
            {
                states.push((s["id"].as_u64()?, d["state"].as_str()?.to_owned()));
            }
        }
        Some(states)
    }

    /// A linearizable read of `key` through `endpoint`.
    pub fn get(&self, endpoint: &str, key: &str) -> Option<String> {
        let out = self
            .zonectl(endpoint, &["-o", "json", "kv", "get", key])
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["value"].as_str().map(str::to_owned)
    }
}

/// The certificate files in a VM's `tls` directory.
fn tls_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    Ok(files)
}

fn zonectl_bin() -> Result<PathBuf> {
    let p = crate::bin_dir().join("zonectl");
    if !p.exists() {
        bail!(
            "{} is missing: build the binaries first (cargo build --release --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.vms.len() {
            self.kill(i);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        if std::thread::panicking() {
            eprintln!("VM logs kept in {}", self.dir.display());
            for vm in &self.vms {
                let text = std::fs::read(&vm.serial).unwrap_or_default();
                let text = String::from_utf8_lossy(&text);
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("---- VM {} serial console (last 40 lines) ----", vm.id);
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        } else if !self.keep {
            // The overlays are large; the logs are small, keep those.
            for vm in &self.vms {
                let _ = std::fs::remove_file(&vm.overlay);
            }
        }
    }
}

/// Polls `f` until it gives a value or `limit` passes.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {} s waiting for {what}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
