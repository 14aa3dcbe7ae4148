//! `zone-vip`: keeps the floating IP (VIP) and leader-only services on the
//! server that holds the zone's leader lease, and nowhere else.
//!
//! A separate process from `zoned` on purpose: if `zoned` dies, its lease
//! stream breaks and this agent removes the address at once; if this agent
//! dies, the address goes with it through systemd's `ExecStopPost=`. It
//! never adds an address without an unexpired lease, and removes it the
//! moment the lease ends, is revoked, or cannot be followed.
//!
//! - [`config`]: VIPs, announcements, units and hooks;
//! - [`machine`]: the decisions, pure and unit-tested;
//! - [`effects`]: the side effects behind traits, with in-memory versions;
//! - [`runner`]: the loop that follows zoned's lease;
//! - [`netlink`], [`announce`]: the real address and ARP/NA side effects;
//! - [`neighbours`]: ARP for the VIP answered by this agent, not the kernel;
//! - [`rtc`]: the RTC against CLOCK_BOOTTIME, which tells of a VM pause;
//! - [`watchdog`]: the watchdog that fences the leader-only units.

pub mod announce;
pub mod config;
pub mod effects;
pub mod machine;
pub mod neighbours;
pub mod netlink;
pub mod rtc;
pub mod runner;
pub mod watchdog;
