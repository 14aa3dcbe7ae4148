//! The side effects of the VIP agent, behind small traits: addresses on an
//! interface, announcements, systemd units and hook commands. [`Memory`]
//! implements them all in memory for tests; [`Systemd`] runs `systemctl`
//! and hooks for real. The netlink and ARP implementations live in their
//! own modules.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;

use tokio::sync::mpsc;

use crate::config::Vip;
use crate::neighbours::Question;

/// Adds and removes addresses on interfaces (netlink is asynchronous).
pub trait Addresses: Send + Sync + 'static {
    /// Adds the address, or renews it if it is already there, for at least
    /// `lifetime` from now: past it, the kernel removes the address even if
    /// this agent never runs again (see [`zone_addr`]).
    fn add<'a>(&'a self, vip: &'a Vip, lifetime: Duration) -> BoxFuture<'a, std::io::Result<()>>;
    /// Removes the address; succeeds if it is not there.
    fn remove<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, std::io::Result<()>>;
    /// Resets the TCP connections whose local address is the VIP; how
    /// many (see [`zone_addr::connections`]).
    fn reset_connections(&self, vip: &Vip) -> std::io::Result<usize>;
}

/// Tells the segment where an address now lives, and answers its
/// questions (ARP requests, neighbour solicitations), which the kernel is
/// kept from answering: see [`crate::neighbours`].
pub trait Announcer: Send + Sync + 'static {
    fn announce(&self, vip: &Vip) -> std::io::Result<()>;
    /// Answers one question (the runner decides whether it may).
    fn answer(&self, question: &Question) -> std::io::Result<()>;
    /// Starts reading the questions about `vips`, each sent on `questions`.
    fn listen(&self, vips: &[Vip], questions: mpsc::Sender<Question>) -> std::io::Result<()>;
}

/// Leader-only units and role hooks. Called off the time-critical path.
pub trait Services: Send + Sync + 'static {
    fn start_unit(&self, unit: &str) -> Result<(), String>;
    /// Starts an exclusive datastore's mount unit and waits until it is
    /// mounted.
    fn mount(&self, unit: &str) -> Result<(), String>;
    /// Stops a unit; for a mount unit, this server is no longer fenced
    /// (nothing may mount an exclusive datastore here any more).
    fn stop_unit(&self, unit: &str) -> Result<(), String>;
    /// Unmounts one exclusive datastore while still leading (it was
    /// removed from the zone): the others stay mountable.
    fn release(&self, unit: &str) -> Result<(), String>;
    fn hook(&self, command: &str, role: &str, timeout: Duration) -> Result<(), String>;
    /// The fence hook against server `target` (`ZONE_FENCE_ID`).
    fn fence(&self, command: &str, target: u64, timeout: Duration) -> Result<(), String>;
}

/// Everything in memory, with a log of what happened and when
/// (CLOCK_BOOTTIME nanoseconds), for tests.
#[derive(Debug, Default)]
pub struct Memory {
    pub held: Mutex<BTreeSet<String>>,
    pub log: Mutex<Vec<(u64, String)>>,
    /// Where [`Memory::ask`] sends questions, once the runner listens.
    questions: Mutex<Option<mpsc::Sender<Question>>>,
    /// Units whose stop fails (stuck on a dead NFS server, say).
    pub refuse_stop: Mutex<BTreeSet<String>>,
    /// Mount units whose start fails.
    pub refuse_mount: Mutex<BTreeSet<String>>,
}

impl Memory {
    fn note(&self, s: String) {
        let now = crate::runner::boottime_ns();
        self.log.lock().expect("log poisoned").push((now, s));
    }

    /// The intervals during which `vip` was held: `[added, removed)`, the
    /// last one open (`u64::MAX`) if still held.
    pub fn holding_intervals(&self, vip: &Vip) -> Vec<(u64, u64)> {
        let add = format!("add {vip}");
        let remove = format!("remove {vip}");
        let mut out = Vec::new();
        let mut since = None;
        for (t, e) in self.log.lock().expect("log poisoned").iter() {
            if *e == add && since.is_none() {
                since = Some(*t);
            } else if *e == remove {
                if let Some(s) = since.take() {
                    out.push((s, *t));
                }
            }
        }
        if let Some(s) = since {
            out.push((s, u64::MAX));
        }
        out
    }

    pub fn holds(&self, vip: &Vip) -> bool {
        self.held
            .lock()
            .expect("held poisoned")
            .contains(&vip.to_string())
    }

    /// A neighbour asks for a VIP, as an ARP request would; false if the
    /// runner is not listening (or dropped it: its queue is full).
    pub fn ask(&self, q: Question) -> bool {
        let tx = self.questions.lock().expect("questions poisoned").clone();
        tx.is_some_and(|tx| tx.try_send(q).is_ok())
    }

    pub fn entries(&self) -> Vec<String> {
        self.log
            .lock()
            .expect("log poisoned")
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }
}

impl Addresses for Memory {
    fn add<'a>(&'a self, vip: &'a Vip, _lifetime: Duration) -> BoxFuture<'a, std::io::Result<()>> {
        let new = self
            .held
            .lock()
            .expect("held poisoned")
            .insert(vip.to_string());
        // A renewal changes nothing here (it only moves the kernel lifetime).
        if new {
            self.note(format!("add {vip}"));
        }
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, std::io::Result<()>> {
        self.held
            .lock()
            .expect("held poisoned")
            .remove(&vip.to_string());
        self.note(format!("remove {vip}"));
        Box::pin(async { Ok(()) })
    }

    fn reset_connections(&self, vip: &Vip) -> std::io::Result<usize> {
        self.note(format!("reset connections to {vip}"));
        Ok(0)
    }
}

impl Announcer for Memory {
    fn announce(&self, vip: &Vip) -> std::io::Result<()> {
        self.note(format!("announce {vip}"));
        Ok(())
    }

    fn answer(&self, q: &Question) -> std::io::Result<()> {
        self.note(format!("answer {} to {}", q.vip, q.asker_ip));
        Ok(())
    }

    fn listen(&self, _vips: &[Vip], questions: mpsc::Sender<Question>) -> std::io::Result<()> {
        *self.questions.lock().expect("questions poisoned") = Some(questions);
        Ok(())
    }
}

impl Services for Memory {
    fn start_unit(&self, unit: &str) -> Result<(), String> {
        self.note(format!("start {unit}"));
        Ok(())
    }

    fn mount(&self, unit: &str) -> Result<(), String> {
        if self.refuse_mount.lock().expect("poisoned").contains(unit) {
            self.note(format!("mount {unit} failed"));
            return Err(format!("{unit} did not mount"));
        }
        self.note(format!("mount {unit}"));
        Ok(())
    }

    fn release(&self, unit: &str) -> Result<(), String> {
        if self.refuse_stop.lock().expect("poisoned").contains(unit) {
            self.note(format!("release {unit} failed"));
            return Err(format!("{unit} is in use"));
        }
        self.note(format!("release {unit}"));
        Ok(())
    }

    fn stop_unit(&self, unit: &str) -> Result<(), String> {
        if self.refuse_stop.lock().expect("poisoned").contains(unit) {
            self.note(format!("stop {unit} failed"));
            return Err(format!("{unit} did not stop"));
        }
        self.note(format!("stop {unit}"));
        Ok(())
    }

    fn hook(&self, command: &str, role: &str, _timeout: Duration) -> Result<(), String> {
        self.note(format!("hook {role} {command}"));
        Ok(())
    }

    fn fence(&self, command: &str, target: u64, _timeout: Duration) -> Result<(), String> {
        self.note(format!("fence {target} {command}"));
        Ok(())
    }
}

/// Whether block device `dev` is free: opened with `O_EXCL`, refused
/// (EBUSY) while a file system on it is mounted anywhere. A device not
/// there holds nothing.
fn device_released(dev: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(dev)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{dev} is still in use: {e}")),
    }
}

/// Units through `systemctl`, hooks through `sh -c` with `ZONE_ROLE` set.
#[derive(Debug, Default)]
pub struct Systemd;

impl Services for Systemd {
    fn start_unit(&self, unit: &str) -> Result<(), String> {
        zone_units::Systemctl::default().start_no_block(unit, Duration::from_secs(30))
    }

    /// Stopped means no process left: a stop job can end with processes
    /// the kernel will not kill (waiting on a dead NFS server), and the
    /// watchdog must then stay armed.
    /// Marks this server fenced first ([`zone_datastores::FENCED_FLAG`]:
    /// the unit asserts it, so that nothing else can start it elsewhere).
    fn mount(&self, unit: &str) -> Result<(), String> {
        let flag = std::path::Path::new(zone_datastores::FENCED_FLAG);
        if let Some(dir) = flag.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(flag, b"").map_err(|e| format!("{}: {e}", flag.display()))?;
        // The unit's own TimeoutSec= ends a mount that hangs first.
        zone_units::Systemctl::default().start(unit, Duration::from_secs(120))
    }

    /// A unit systemd does not know (never installed, or an exclusive
    /// datastore's mount unit removed with its declaration) and not active
    /// is stopped. A mount unit is stopped once nothing is mounted on its
    /// `Where=`.
    ///
    /// An exclusive datastore's device is then opened with `O_EXCL`, which
    /// the kernel refuses while any mount, in any mount namespace, still
    /// holds it (a lazily detached one, a service's private copy): only
    /// then is it stopped.
    fn stop_unit(&self, unit: &str) -> Result<(), String> {
        let systemctl = zone_units::Systemctl::default();
        if unit.ends_with(".mount") {
            // No longer fenced: nothing may mount them again here.
            match std::fs::remove_file(zone_datastores::FENCED_FLAG) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("{}: {e}", zone_datastores::FENCED_FLAG))
                }
                _ => {}
            }
        }
        self.stop_checked(&systemctl, unit)
    }

    fn release(&self, unit: &str) -> Result<(), String> {
        self.stop_checked(&zone_units::Systemctl::default(), unit)
    }

    fn hook(&self, command: &str, role: &str, timeout: Duration) -> Result<(), String> {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", command]).env("ZONE_ROLE", role);
        zone_units::run_with_timeout(c, timeout)
    }

    fn fence(&self, command: &str, target: u64, timeout: Duration) -> Result<(), String> {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", command])
            .env("ZONE_ROLE", "fence")
            .env("ZONE_FENCE_ID", target.to_string());
        zone_units::run_with_timeout(c, timeout)
    }
}

impl Systemd {
    /// `systemctl stop`, then the checks that the unit really stopped.
    fn stop_checked(&self, systemctl: &zone_units::Systemctl, unit: &str) -> Result<(), String> {
        if let Err(e) = systemctl.stop(unit, Duration::from_secs(90)) {
            let load = systemctl.property(unit, "LoadState");
            let active = systemctl.property(unit, "ActiveState");
            if load.as_deref() == Some("not-found") && active.as_deref() == Some("inactive") {
                return Ok(());
            }
            return Err(e);
        }
        if unit.ends_with(".mount") {
            if let Some(at) = systemctl.property(unit, "Where").filter(|w| !w.is_empty()) {
                let info = std::fs::read_to_string("/proc/self/mountinfo")
                    .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
                // Targets with spaces are escaped there; a datastore's
                // never has one (zone-datastores refuses it).
                if info
                    .lines()
                    .any(|l| l.split(' ').nth(4) == Some(at.as_str()))
                {
                    return Err(format!("{unit} stopped but {at} is still mounted"));
                }
            }
            if let Some(dev) = systemctl
                .property(unit, "What")
                .filter(|w| w.starts_with("/dev/"))
            {
                device_released(&dev).map_err(|e| format!("{unit} stopped but {e}"))?;
            }
            return Ok(());
        }
        let out = std::process::Command::new("systemctl")
            .args(["show", "--value", "-p", "ControlGroup", unit])
            .output()
            .map_err(|e| format!("systemctl show {unit}: {e}"))?;
        let group = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if group.is_empty() {
            return Ok(());
        }
        let procs = std::path::Path::new("/sys/fs/cgroup")
            .join(group.trim_start_matches('/'))
            .join("cgroup.procs");
        match std::fs::read_to_string(&procs) {
            Ok(p) if !p.trim().is_empty() => Err(format!(
                "{unit} stopped with processes left in {group}: {}",
                p.split_whitespace().collect::<Vec<_>>().join(" ")
            )),
            _ => Ok(()),
        }
    }
}
