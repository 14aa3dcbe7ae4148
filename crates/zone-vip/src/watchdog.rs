//! The watchdog that fences the leader-only units: armed by the lease
//! holder, petted only while its lease is valid, disarmed once its units
//! have stopped after losing the lease.
//!
//! Safety argument. A pet is made only after checking that the lease is
//! still valid, so the last one comes before the lease ends, and the
//! watchdog resets this server at most its timeout after that unless it
//! was disarmed, which happens only once every leader-only unit has
//! stopped. Another server's lease starts after ours ended (zoned's lease
//! ends before any other server can be elected), and it starts the units
//! only the fence delay (at least the watchdog's timeout) after its first
//! lease: by then ours are stopped, or this server has been reset. What a
//! watchdog cannot cover: a VM paused by its hypervisor (its emulated
//! watchdog pauses too: on resume the units may run for the moment it
//! takes zone-vip to see the pause and stop them) and a kernel hung with a
//! software watchdog (softdog); the fence hook (power the old leader off)
//! closes both.
//!
//! Arming and disarming carry the leadership's epoch: a disarm queued
//! behind stopping units is dropped if this server took the lease again
//! meanwhile (the check and the close are one step under the lock).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The lease holder's watchdog.
pub trait Watchdog: Send + Sync + 'static {
    /// Arms the watchdog (opening it if needed) with `timeout`, for the
    /// leadership `epoch`, and pets it. Returns the timeout in force; an
    /// error (and nothing armed) when the watchdog cannot fence: it does
    /// not support a magic close, or took a longer timeout than asked.
    fn arm(&self, epoch: u64, timeout: Duration) -> std::io::Result<Duration>;
    /// Pets it, if armed.
    fn pet(&self) -> std::io::Result<()>;
    /// Disarms it if no later leadership armed it since `epoch` (epoch 0:
    /// at start, whatever a previous run of this agent left armed).
    /// Returns whether it was disarmed.
    fn disarm(&self, epoch: u64) -> std::io::Result<bool>;
}

/// The two watchdog ioctls, the only unsafe code of this crate.
#[allow(unsafe_code)]
mod ioctl {
    use std::os::fd::AsRawFd;

    /// `struct watchdog_info`.
    #[repr(C)]
    #[derive(Default)]
    pub struct Info {
        pub options: u32,
        pub firmware_version: u32,
        pub identity: [u8; 32],
    }

    // include/uapi/linux/watchdog.h
    nix::ioctl_read!(wdioc_getsupport, b'W', 0, Info);
    nix::ioctl_read!(wdioc_keepalive, b'W', 5, nix::libc::c_int);
    nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, nix::libc::c_int);

    pub const WDIOF_SETTIMEOUT: u32 = 0x0080;
    pub const WDIOF_MAGICCLOSE: u32 = 0x0100;
    pub const WDIOF_KEEPALIVEPING: u32 = 0x8000;

    /// What the driver supports, and its name.
    pub fn support(f: &std::fs::File) -> nix::Result<(u32, String)> {
        let mut info = Info::default();
        // SAFETY: `f` is open, so its fd is valid for the call; `info` is
        // a struct watchdog_info the kernel fills (the ioctl's ABI).
        unsafe { wdioc_getsupport(f.as_raw_fd(), &mut info) }?;
        let end = info.identity.iter().position(|&b| b == 0).unwrap_or(32);
        Ok((
            info.options,
            String::from_utf8_lossy(&info.identity[..end]).into_owned(),
        ))
    }

    /// Sets the timeout in seconds; returns the one the driver set.
    pub fn set_timeout(f: &std::fs::File, secs: nix::libc::c_int) -> nix::Result<nix::libc::c_int> {
        let mut v = secs;
        // SAFETY: `f` is open, so its fd is valid for the call; the
        // argument is a c_int that lives across it, which the kernel reads
        // and overwrites with the timeout it set (the ioctl's ABI).
        unsafe { wdioc_settimeout(f.as_raw_fd(), &mut v) }?;
        Ok(v)
    }

    pub fn keepalive(f: &std::fs::File) -> nix::Result<()> {
        let mut dummy: nix::libc::c_int = 0;
        // SAFETY: as above; KEEPALIVE writes at most the one c_int.
        unsafe { wdioc_keepalive(f.as_raw_fd(), &mut dummy) }?;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct DeviceState {
    file: Option<File>,
    epoch: u64,
}

/// A Linux watchdog device (`/dev/watchdog`): opening it starts the timer,
/// `WDIOC_KEEPALIVE` pets it, writing `V` before closing stops it (the
/// "magic close"; a driver built with nowayout never stops: then this
/// server is reset after every leadership it loses, and README says not to
/// use one).
#[derive(Debug)]
pub struct Device {
    path: PathBuf,
    state: Mutex<DeviceState>,
}

impl Device {
    pub fn new(path: PathBuf) -> Device {
        Device {
            path,
            state: Mutex::new(DeviceState::default()),
        }
    }

    /// Whether sysfs says the watchdog is not running (false when it
    /// cannot tell). `/dev/watchdog` is the first one's other name.
    fn inactive(&self) -> bool {
        let name = match self.path.file_name().and_then(|n| n.to_str()) {
            Some("watchdog") => "watchdog0",
            Some(n) => n,
            None => return false,
        };
        std::fs::read_to_string(Path::new("/sys/class/watchdog").join(name).join("state"))
            .is_ok_and(|s| s.trim() == "inactive")
    }

    fn open(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

fn ioctl_error(call: &str, e: nix::Error) -> std::io::Error {
    std::io::Error::other(format!("{call}: {e}"))
}

/// Whether the watchdog open as `f` can fence, with `timeout` set.
fn check(f: &File, timeout: Duration) -> Result<(), String> {
    let (options, name) = ioctl::support(f).map_err(|e| format!("WDIOC_GETSUPPORT: {e}"))?;
    for (flag, what) in [
        (
            ioctl::WDIOF_MAGICCLOSE,
            "stops on any close (no magic close): a crash of zone-vip would disarm it",
        ),
        (ioctl::WDIOF_SETTIMEOUT, "cannot have its timeout set"),
        (ioctl::WDIOF_KEEPALIVEPING, "cannot be petted"),
    ] {
        if options & flag == 0 {
            return Err(format!("{name} {what}"));
        }
    }
    let asked = nix::libc::c_int::try_from(timeout.as_secs()).unwrap_or(nix::libc::c_int::MAX);
    let set = ioctl::set_timeout(f, asked).map_err(|e| format!("WDIOC_SETTIMEOUT: {e}"))?;
    if set > asked {
        return Err(format!(
            "{name} took a {set} s timeout for the {asked} s asked: set fence.watchdog_timeout_s to one it takes"
        ));
    }
    Ok(())
}

impl Watchdog for Device {
    fn arm(&self, epoch: u64, timeout: Duration) -> std::io::Result<Duration> {
        let mut st = self.state.lock().expect("watchdog poisoned");
        st.epoch = epoch;
        if st.file.is_none() {
            let f = self.open()?;
            // A watchdog that cannot fence is disarmed at once and
            // refused: one that stops on any close (a crash would disarm
            // it), or whose timeout cannot be set or is longer than asked
            // (the fence delay rests on it).
            if let Err(e) = check(&f, timeout) {
                let mut f = f;
                let _ = f.write_all(b"V");
                return Err(std::io::Error::other(format!(
                    "{}: {e}",
                    self.path.display()
                )));
            }
            st.file = Some(f);
        }
        let f = st.file.as_ref().expect("just opened");
        ioctl::keepalive(f).map_err(|e| ioctl_error("WDIOC_KEEPALIVE", e))?;
        Ok(timeout)
    }

    fn pet(&self) -> std::io::Result<()> {
        let st = self.state.lock().expect("watchdog poisoned");
        match st.file.as_ref() {
            Some(f) => ioctl::keepalive(f).map_err(|e| ioctl_error("WDIOC_KEEPALIVE", e)),
            None => Ok(()),
        }
    }

    fn disarm(&self, epoch: u64) -> std::io::Result<bool> {
        let mut st = self.state.lock().expect("watchdog poisoned");
        if st.epoch != epoch {
            return Ok(false);
        }
        let mut file = match st.file.take() {
            Some(f) => f,
            // At start: a previous run may have died with it armed (the
            // kernel keeps the timer running after an unexpected close).
            // Only then is it opened: opening starts it, and a driver
            // built with nowayout would never stop it again.
            None if epoch == 0 && self.inactive() => return Ok(false),
            None if epoch == 0 => match self.open() {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            },
            None => return Ok(false),
        };
        file.write_all(b"V")?;
        drop(file);
        Ok(true)
    }
}

/// In memory, for tests: what was done, in order.
#[derive(Debug, Default)]
pub struct MemoryWatchdog {
    /// (armed, epoch)
    state: Mutex<(bool, u64)>,
    pub log: Mutex<Vec<String>>,
    /// Arming fails (no device).
    pub missing: std::sync::atomic::AtomicBool,
}

impl MemoryWatchdog {
    pub fn armed(&self) -> bool {
        self.state.lock().expect("poisoned").0
    }

    fn note(&self, s: String) {
        self.log.lock().expect("poisoned").push(s);
    }
}

impl Watchdog for MemoryWatchdog {
    fn arm(&self, epoch: u64, timeout: Duration) -> std::io::Result<Duration> {
        if self.missing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "/dev/watchdog: No such file or directory",
            ));
        }
        *self.state.lock().expect("poisoned") = (true, epoch);
        self.note(format!("arm {epoch}"));
        Ok(timeout)
    }

    fn pet(&self) -> std::io::Result<()> {
        if self.armed() {
            self.note("pet".into());
        }
        Ok(())
    }

    fn disarm(&self, epoch: u64) -> std::io::Result<bool> {
        let mut st = self.state.lock().expect("poisoned");
        if st.1 != epoch || !st.0 {
            return Ok(false);
        }
        st.0 = false;
        drop(st);
        self.note(format!("disarm {epoch}"));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disarm_from_an_older_leadership_is_dropped() {
        let w = MemoryWatchdog::default();
        w.arm(1, Duration::from_secs(10)).unwrap();
        w.arm(2, Duration::from_secs(10)).unwrap();
        assert!(!w.disarm(1).unwrap());
        assert!(w.armed());
        assert!(w.disarm(2).unwrap());
        assert!(!w.armed());
    }

    #[test]
    fn a_missing_device_is_named() {
        let d = Device::new(PathBuf::from("/nonexistent/watchdog"));
        let e = d.arm(1, Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/watchdog"), "{e}");
        // At start, no device is nothing to disarm.
        assert!(!d.disarm(0).unwrap());
    }
}
