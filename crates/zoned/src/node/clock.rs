//! The time the driver reads. On a server it is CLOCK_BOOTTIME, the clock
//! leases are stated in and that every process on the host shares (it goes
//! on counting while the host is suspended, so a lease ends on time even
//! then; see [`zone_proto::boottime_ns`]); an
//! in-process zone under test gives every driver one [`ManualClock`] and
//! moves it itself, so that elections, leases and timeouts run on simulated
//! time instead of waiting on the wall clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A source of monotonic nanoseconds.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

pub use zone_proto::boottime_ns;

/// CLOCK_BOOTTIME: the clock of a server.
///
/// Safety: a leader's lease is measured on it, so time spent suspended
/// counts against the lease. Elections are measured in ticks of it, and the
/// driver never takes more than one tick after a gap (see `Driver::run`):
/// a follower resumed from a suspend has missed ticks, so it refuses votes
/// longer than it needed to, never shorter.
#[derive(Debug, Clone, Copy, Default)]
pub struct Boottime;

impl Clock for Boottime {
    fn now_ns(&self) -> u64 {
        boottime_ns()
    }
}

/// A clock that moves only when told to; clones share the time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that reads `start_ns` until moved.
    pub fn new(start_ns: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(start_ns)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_follow() {
        let c = ManualClock::new(5);
        let other = c.clone();
        assert_eq!(c.now_ns(), 5);
        c.advance(Duration::from_micros(2));
        assert_eq!(other.now_ns(), 2_005);
    }

    #[test]
    fn the_server_clock_never_goes_back() {
        let a = Boottime.now_ns();
        let b = Boottime.now_ns();
        assert!(a > 0 && b >= a);
    }
}
