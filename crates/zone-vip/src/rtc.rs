//! A clock that counts a VM pause: the real-time clock chip, read against
//! CLOCK_BOOTTIME.
//!
//! A hypervisor that pauses a VM (QEMU's `stop`, a snapshot, a migration)
//! stops every clock the guest kernel keeps, CLOCK_BOOTTIME included: the
//! resumed VM finds its lease still running while the zone has elected
//! another leader. The emulated RTC is the exception: QEMU's, and libvirt's
//! default `<clock offset='utc'>`, follow the host's time, paused or not.
//! So the RTC running ahead of CLOCK_BOOTTIME says the clocks stood still.
//!
//! The RTC counts whole seconds. A sampler reads it every [`PERIOD`] and
//! keeps the readings; at one where the second had just turned over, the
//! real time is known to within the time since the previous reading. A
//! later reading `R` (the real time is at least `R`) against a sample `S`
//! taken when the real time was below `S + slack`: the real time elapsed
//! exceeds `R - S - slack`. When that exceeds what CLOCK_BOOTTIME counted
//! by more than [`TOLERANCE`], the clocks stood still. A pause of more than
//! about 1.3 s (a second of RTC resolution, a period, the tolerance) is
//! always seen; shorter ones may be. Elections take at least the election
//! timeout (1 to 2 s by default), so a pause long enough for the zone to
//! move on is, at default timing, nearly always seen.
//!
//! A server without a readable RTC (`/sys/class/rtc/rtc0`) has no check;
//! zone-vip says so when it starts. A step of the RTC itself (an operator's
//! `hwclock --systohc` after a clock correction) looks like a pause: the
//! agent steps down once and takes the VIP again with the next fresh lease.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use zone_proto::boottime_ns;

/// How often the sampler reads the RTC.
pub const PERIOD: Duration = Duration::from_millis(50);
/// Allowed excess of the RTC over CLOCK_BOOTTIME: read delays and drift.
pub const TOLERANCE: Duration = Duration::from_millis(200);
/// How far back samples are kept.
const KEEP: Duration = Duration::from_secs(10);
const SECOND_NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    boot_ns: u64,
    rtc_s: u64,
    /// The real time at `boot_ns` was in `[rtc_s, rtc_s + slack_ns)`.
    slack_ns: u64,
}

/// The RTC readings, and what they say about a later one. Pure: the
/// sampler and the tests feed it.
#[derive(Debug, Default)]
pub struct Samples {
    kept: VecDeque<Sample>,
    last: Option<(u64, u64)>,
    /// The last pause seen: when (CLOCK_BOOTTIME ns, after the resume)
    /// and at least how long. Kept when the samples are forgotten.
    pause: Option<(u64, u64)>,
}

impl Samples {
    /// A reading of the RTC (`rtc_s`) at CLOCK_BOOTTIME `boot_ns`.
    pub fn record(&mut self, boot_ns: u64, rtc_s: u64) {
        let slack_ns = match self.last {
            // The second turned over since the previous reading.
            Some((b, r)) if rtc_s == r + 1 && boot_ns > b => (boot_ns - b).min(SECOND_NS),
            _ => SECOND_NS,
        };
        self.last = Some((boot_ns, rtc_s));
        self.kept.push_back(Sample {
            boot_ns,
            rtc_s,
            slack_ns,
        });
        let keep = KEEP.as_nanos() as u64;
        while self
            .kept
            .front()
            .is_some_and(|s| boot_ns.saturating_sub(s.boot_ns) > keep)
        {
            self.kept.pop_front();
        }
    }

    /// At least how long the clocks stood still between a sample taken at
    /// or before `since_ns` and a reading `now_rtc_s` at `now_ns`: zero if
    /// they did not, or if no sample is that old.
    ///
    /// Safety: a pause seen at or after `since_ns` ([`Samples::paused`])
    /// counts too. The samples from before it are forgotten then, and
    /// without this a question asked about a moment before the pause, just
    /// after the sampler saw it, found no sample that old and heard "no
    /// pause": the QEMU pause test saw a repeated announcement of the VIP
    /// go out 20 ms after the resume, while another VM held it.
    pub fn stood_still(&self, since_ns: u64, now_ns: u64, now_rtc_s: u64) -> Duration {
        let mut most = match self.pause {
            Some((seen_ns, at_least_ns)) if seen_ns >= since_ns => at_least_ns,
            _ => 0,
        };
        for s in self.kept.iter().take_while(|s| s.boot_ns <= since_ns) {
            let real_ns = now_rtc_s.saturating_sub(s.rtc_s) * SECOND_NS;
            let counted = now_ns.saturating_sub(s.boot_ns) + s.slack_ns;
            most = most.max(real_ns.saturating_sub(counted));
        }
        Duration::from_nanos(most)
    }

    /// A pause was seen at `seen_ns`, of at least `at_least`: the samples
    /// from before it say nothing more (they would count it again for every
    /// later moment) and are forgotten; the pause itself is kept for the
    /// questions about moments before it ([`Samples::stood_still`]).
    pub fn paused(&mut self, seen_ns: u64, at_least: Duration) {
        self.clear();
        self.pause = Some((seen_ns, at_least.as_nanos() as u64));
    }

    /// Forgets every sample.
    pub fn clear(&mut self) {
        self.kept.clear();
        self.last = None;
    }
}

/// A pause the sampler saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pause {
    /// When it was seen (CLOCK_BOOTTIME ns, after the resume); 0 for none.
    pub seen_ns: u64,
    /// At least how long the clocks stood still.
    pub at_least: Duration,
}

/// The RTC, sampled in a thread of its own.
#[derive(Debug)]
pub struct Rtc {
    path: PathBuf,
    samples: Mutex<Samples>,
    pauses: watch::Sender<Pause>,
}

fn read_rtc(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Rtc {
    /// The first RTC, if it can be read, with its sampler running.
    pub fn open() -> Option<Arc<Rtc>> {
        let path = PathBuf::from("/sys/class/rtc/rtc0/since_epoch");
        read_rtc(&path)?;
        let rtc = Arc::new(Rtc {
            path,
            samples: Mutex::new(Samples::default()),
            pauses: watch::channel(Pause::default()).0,
        });
        let weak = Arc::downgrade(&rtc);
        std::thread::Builder::new()
            .name("rtc-sampler".into())
            .spawn(move || {
                while let Some(rtc) = weak.upgrade() {
                    rtc.sample();
                    drop(rtc);
                    std::thread::sleep(PERIOD);
                }
            })
            .ok()?;
        Some(rtc)
    }

    /// Pauses as the sampler sees them, soon after the resume.
    pub fn pauses(&self) -> watch::Receiver<Pause> {
        self.pauses.subscribe()
    }

    fn sample(&self) {
        let Some(rtc_s) = read_rtc(&self.path) else {
            return;
        };
        let now = boottime_ns();
        let mut samples = self.samples.lock().expect("rtc samples poisoned");
        let gap = samples.stood_still(now, now, rtc_s);
        if gap > TOLERANCE {
            samples.paused(now, gap);
            self.pauses.send_replace(Pause {
                seen_ns: now,
                at_least: gap,
            });
        }
        samples.record(now, rtc_s);
    }

    /// Whether the clocks stood still (for longer than [`TOLERANCE`]) since
    /// `since_ns`, read now: how long, at least. Reads the RTC itself, so
    /// that it answers right after a resume, before the sampler has run.
    pub fn stood_still_since(&self, since_ns: u64) -> Option<Duration> {
        let rtc_s = read_rtc(&self.path)?;
        let now = boottime_ns();
        let gap = self
            .samples
            .lock()
            .expect("rtc samples poisoned")
            .stood_still(since_ns, now, rtc_s);
        (gap > TOLERANCE).then_some(gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Readings every 50 ms of a clock whose second turns over at real
    /// time `phase` ms past each second, from boot time `from` ms for
    /// `span` ms; `real_minus_boot` ms is the real time at boot time 0.
    fn feed(s: &mut Samples, from: u64, span: u64, real_minus_boot: u64) {
        let mut t = from;
        while t < from + span {
            let real = t + real_minus_boot;
            s.record(t * MS, real / 1000);
            t += 50;
        }
    }

    #[test]
    fn steady_clocks_show_no_pause() {
        let mut s = Samples::default();
        feed(&mut s, 0, 5_000, 1_700_000_000_337);
        for now in [5_000u64, 5_020, 5_400, 5_999, 6_800] {
            let real = now + 1_700_000_000_337;
            let gap = s.stood_still(now * MS, now * MS, real / 1000);
            assert_eq!(gap, Duration::ZERO, "at {now} ms");
        }
    }

    #[test]
    fn a_pause_of_more_than_a_second_and_a_third_is_seen_at_once() {
        for phase in [0u64, 1, 170, 499, 730, 999] {
            for pause in [1_300u64, 2_000, 5_000, 60_000] {
                let mut s = Samples::default();
                let offset = 1_700_000_000_000 + phase;
                feed(&mut s, 0, 3_000, offset);
                // Paused at boot time 3000 ms for `pause` ms of real time;
                // read 1 ms after the resume.
                let now = 3_001;
                let real = now + offset + pause;
                let gap = s.stood_still(now * MS, now * MS, real / 1000);
                assert!(
                    gap > TOLERANCE,
                    "phase {phase} pause {pause}: only {gap:?} seen"
                );
                assert!(gap <= Duration::from_millis(pause), "overstated: {gap:?}");
            }
        }
    }

    #[test]
    fn only_samples_older_than_the_reference_count() {
        let mut s = Samples::default();
        let offset = 1_700_000_000_000;
        feed(&mut s, 0, 3_000, offset);
        // A pause of 5 s at 3000 ms, then samples again after it.
        feed(&mut s, 3_000, 2_000, offset + 5_000);
        let now = 5_000;
        let real = now + offset + 5_000;
        assert!(s.stood_still(2_000 * MS, now * MS, real / 1000) > Duration::from_secs(3));
        // Nothing stood still since a reference after the resume.
        s.clear();
        feed(&mut s, 5_000, 1_000, offset + 5_000);
        let now = 6_000;
        let real = now + offset + 5_000;
        assert_eq!(
            s.stood_still(5_500 * MS, now * MS, real / 1000),
            Duration::ZERO
        );
    }

    /// The sampler saw the pause first (it forgot the samples before it):
    /// a question about a moment before the pause, asked after, still
    /// hears of it. On the code before, it heard "no pause" (the QEMU pause
    /// test's repeated announcement 20 ms after the resume).
    #[test]
    fn a_pause_the_sampler_saw_first_is_still_told_of_moments_before_it() {
        let mut s = Samples::default();
        let offset = 1_700_000_000_000;
        feed(&mut s, 0, 3_000, offset);
        // Paused at 3000 ms for 2.7 s; the sampler reads at 3001 ms.
        let due = 2_990;
        let now = 3_001;
        let real = now + offset + 2_700;
        let gap = s.stood_still(now * MS, now * MS, real / 1000);
        assert!(gap > TOLERANCE);
        s.paused(now * MS, gap);
        s.record(now * MS, real / 1000);
        // The announcement that came due at 2990 ms asks at 3003 ms.
        let asked = 3_003;
        let real = asked + offset + 2_700;
        assert!(
            s.stood_still(due * MS, asked * MS, real / 1000) > TOLERANCE,
            "the pause is forgotten"
        );
        // A moment after the pause was seen: nothing stood still since.
        assert_eq!(
            s.stood_still(3_002 * MS, asked * MS, real / 1000),
            Duration::ZERO
        );
    }

    #[test]
    fn no_sample_old_enough_says_nothing() {
        let mut s = Samples::default();
        feed(&mut s, 1_000, 1_000, 0);
        assert_eq!(s.stood_still(500 * MS, 9_000 * MS, 99), Duration::ZERO);
    }
}
