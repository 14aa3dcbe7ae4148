//! The `zone.v1` gRPC API, generated from `proto/zone/v1/*.proto`.
//!
//! This crate holds no logic: messages, clients and servers as prost and
//! tonic generate them, the encoded descriptor set that `zoned` serves
//! through gRPC reflection so that `grpcurl` works without the .proto files,
//! and the clock the agent protocol states its times in ([`boottime_ns`],
//! with a timer on it, [`BootTimer`]).

#![allow(missing_debug_implementations, clippy::all)]

/// Package `zone.v1`.
pub mod v1 {
    tonic::include_proto!("zone.v1");
}

/// Whether `name` is a valid system extension name (`zone.v1.Extensions`):
/// 1-64 letters, digits, `-`, `_` or `.`, starting with a letter or digit,
/// not ending in `.raw`. systemd-sysext finds the image as `NAME.raw` and
/// checks `extension-release.NAME` inside it; the name is a file name on
/// every server. The one rule for the image builder and the server.
pub fn extension_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.ends_with(".raw")
}

/// What [`extension_name_ok`] asks, for an error message.
pub const EXTENSION_NAME_RULE: &str = "an extension name is 1-64 letters, digits, '-', '_' or '.', starts with a letter or digit, and does not end in .raw";

/// Whether `unit` may be one of the zone's services (`zonectl services
/// set`): a systemd service, socket, timer or path unit name (letters,
/// digits and `-_.@\:`, not starting with `-`, which would read as an
/// option), and not one of the appliance's own (`zone-*`, `zoned*`,
/// `systemd-*`): a leader-only zoned would stop the zone with its leader.
pub fn zone_unit_ok(unit: &str) -> bool {
    let Some((stem, kind)) = unit.rsplit_once('.') else {
        return false;
    };
    !stem.is_empty()
        && unit.len() <= 128
        && !unit.starts_with('-')
        && matches!(kind, "service" | "socket" | "timer" | "path")
        && unit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '\\' | ':'))
        && !unit.starts_with("zone-")
        && !unit.starts_with("zoned")
        && !unit.starts_with("systemd-")
}

/// What [`zone_unit_ok`] asks, for an error message.
pub const ZONE_UNIT_RULE: &str = "a zone service is a systemd .service, .socket, .timer or .path unit (letters, digits and -_.@\\:, not starting with '-'), and not one of the appliance's own (zone-*, zoned*, systemd-*)";

/// Encoded `FileDescriptorSet` of every `zone.v1` file.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("zone_descriptor");

/// CLOCK_BOOTTIME in nanoseconds: the clock the agent protocol's times
/// (`expires_boottime_ns`) and every lease deadline are in, shared by every
/// process on the host, so zoned's lease and zone-vip's deadlines compare
/// directly.
///
/// Not CLOCK_MONOTONIC: that one stops while the host is suspended (and in
/// some hypervisors while the VM is paused), so a holder resumed after the
/// zone moved on would trust a lease the zone has outlived. CLOCK_BOOTTIME
/// counts the suspended time: the lease is over at once on resume.
pub fn boottime_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// A timer on CLOCK_BOOTTIME (a timerfd) for the tokio runtime it was made
/// in. tokio's own timers count CLOCK_MONOTONIC: one armed for a lease's
/// end would, after a suspend, still wait out what was left of the lease;
/// this one fires at once on resume if the deadline passed meanwhile.
///
/// Should the timerfd fail (it cannot be made, or a read fails), it waits
/// on tokio's clock instead: [`BootTimer::is_boottime`] says which.
pub struct BootTimer {
    fd: Option<tokio::io::unix::AsyncFd<TimerFdRaw>>,
}

/// A timerfd as tokio's `AsyncFd` wants it.
struct TimerFdRaw(nix::sys::timerfd::TimerFd);

impl std::os::fd::AsRawFd for TimerFdRaw {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl std::fmt::Debug for BootTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootTimer")
    }
}

impl BootTimer {
    /// A timer, not armed; needs a tokio runtime with I/O enabled.
    pub fn new() -> BootTimer {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let fd = TimerFd::new(
            ClockId::CLOCK_BOOTTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()
        // `AsyncFd::new` is deprecated because a `T: AsRawFd` need not own
        // its descriptor; ours does (the TimerFd inside the AsyncFd closes
        // it on drop, after deregistration), and `register` would need
        // unsafe code, which this workspace denies.
        .and_then(|fd| {
            #[allow(deprecated)]
            let fd = tokio::io::unix::AsyncFd::new(TimerFdRaw(fd));
            fd.ok()
        });
        BootTimer { fd }
    }

    /// Whether it waits on CLOCK_BOOTTIME (else on tokio's clock).
    pub fn is_boottime(&self) -> bool {
        self.fd.is_some()
    }

    /// Waits until [`boottime_ns`] reads `deadline_ns` or more (at once if
    /// it already does). Cancel-safe: a later call re-arms the timer.
    pub async fn sleep_until(&self, deadline_ns: u64) {
        if boottime_ns() >= deadline_ns {
            return;
        }
        if let Some(fd) = &self.fd {
            if Self::wait_fd(fd, deadline_ns).await.is_ok() {
                return;
            }
        }
        let left = deadline_ns.saturating_sub(boottime_ns());
        tokio::time::sleep(std::time::Duration::from_nanos(left)).await;
    }

    async fn wait_fd(
        fd: &tokio::io::unix::AsyncFd<TimerFdRaw>,
        deadline_ns: u64,
    ) -> std::io::Result<()> {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        // 0 would disarm the timer; deadlines are far above it.
        let at = TimeSpec::from_duration(std::time::Duration::from_nanos(deadline_ns.max(1)));
        fd.get_ref().0.set(
            Expiration::OneShot(at),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME,
        )?;
        loop {
            let mut ready = fd.readable().await?;
            match ready.try_io(|fd| {
                let mut buf = [0u8; 8];
                nix::unistd::read(&fd.get_ref().0, &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(r) => return r.map(|_| ()),
                // Not yet (spurious readiness): wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

impl Default for BootTimer {
    fn default() -> BootTimer {
        BootTimer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn zone_units_are_plain_unit_names_and_never_the_appliances_own() {
        for ok in [
            "mariadb.service",
            "opennebula-scheduler.service",
            "getty@tty1.service",
            "one.socket",
            "backup.timer",
            "dev-disk-by\\x2did.path",
        ] {
            assert!(zone_unit_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "mariadb",
            ".service",
            "--help.service",
            "a/b.service",
            "poweroff.target",
            "srv.mount",
            "zoned.service",
            "zone-vip.service",
            "systemd-networkd.service",
            "a b.service",
        ] {
            assert!(!zone_unit_ok(bad), "{bad}");
        }
    }

    #[test]
    fn the_protocol_clock_is_boottime_which_counts_at_least_what_monotonic_does() {
        let read = |c| {
            let ts = nix::time::clock_gettime(c).unwrap();
            ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
        };
        let before = read(nix::time::ClockId::CLOCK_BOOTTIME);
        let ours = boottime_ns();
        let after = read(nix::time::ClockId::CLOCK_BOOTTIME);
        assert!(before <= ours && ours <= after);
        // BOOTTIME = MONOTONIC + the time spent suspended, never less.
        assert!(ours >= read(nix::time::ClockId::CLOCK_MONOTONIC) - 1_000_000);
    }

    #[tokio::test]
    async fn the_timer_fires_at_its_deadline_and_at_once_for_one_passed() {
        let timer = BootTimer::new();
        assert!(timer.is_boottime());
        let deadline = boottime_ns() + 30_000_000;
        timer.sleep_until(deadline).await;
        let now = boottime_ns();
        assert!(now >= deadline, "fired {} ns early", deadline - now);
        assert!(
            now - deadline < 200_000_000,
            "fired {} ms late",
            (now - deadline) / 1_000_000
        );
        // A deadline already passed (as after a suspend): at once.
        let t = std::time::Instant::now();
        timer.sleep_until(boottime_ns() - 1).await;
        timer.sleep_until(1).await;
        assert!(t.elapsed() < Duration::from_millis(5));
        // Re-armed after a cancelled wait, it still fires on time.
        let far = boottime_ns() + 10_000_000_000;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), timer.sleep_until(far))
                .await
                .is_err()
        );
        let near = boottime_ns() + 20_000_000;
        timer.sleep_until(near).await;
        assert!(boottime_ns() >= near);
    }
}
