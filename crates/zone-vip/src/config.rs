//! zone-vip configuration (`/etc/zoned/vip.toml` on the appliance): the
//! VIPs, how they are announced, leader-only units and hooks. Every field
//! but the VIPs has a default; errors name the field.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// One floating address: an address on an interface.
pub use zone_addr::IfAddr as Vip;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VipEntry {
    /// `address/prefix`, IPv4 or IPv6.
    address: String,
    interface: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    socket: PathBuf,
    units_record: PathBuf,
    vip: Vec<VipEntry>,
    announce: Announce,
    lease: LeaseConfig,
    leader: Role,
    follower: Role,
    fence: FenceFile,
    storage: Storage,
}

/// The zone's exclusive datastores, which this agent mounts on the lease
/// holder before the leader-only units (see the crate's `machine`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// The list zone-mounts keeps of their systemd mount units, one per
    /// line (`<zone-mounts --state-dir>/exclusive-units`); read at start
    /// and every second. Missing: none.
    pub exclusive_units: PathBuf,
    /// Where this agent records the mount units it may have mounted, so
    /// that after a restart it unmounts one that has left the list since.
    pub mounted_record: PathBuf,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            exclusive_units: PathBuf::from("/run/zone-mounts/exclusive-units"),
            mounted_record: PathBuf::from("/run/zone-vip/exclusive-mounted"),
        }
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            socket: PathBuf::from("/run/zoned/agent.sock"),
            units_record: PathBuf::from("/run/zone-vip/leader-units"),
            vip: Vec::new(),
            announce: Announce::default(),
            lease: LeaseConfig::default(),
            leader: Role::default(),
            follower: Role::default(),
            fence: FenceFile::default(),
            storage: Storage::default(),
        }
    }
}

/// Whether the watchdog must be there (see [`Fence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchdogMode {
    /// Leader-only units never start on a server whose watchdog cannot be
    /// armed.
    Required,
    /// Used when it opens; without it the units still start after the
    /// fence delay (logged loudly), fencing then resting on this agent
    /// stopping them itself.
    Automatic,
    /// Never used.
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FenceFile {
    watchdog: PathBuf,
    watchdog_mode: WatchdogMode,
    watchdog_timeout_s: u32,
    delay_ms: Option<u64>,
    hook: Option<String>,
    hook_timeout_ms: u64,
}

impl Default for FenceFile {
    fn default() -> Self {
        FenceFile {
            watchdog: PathBuf::from("/dev/watchdog"),
            watchdog_mode: WatchdogMode::Automatic,
            watchdog_timeout_s: 5,
            delay_ms: None,
            hook: None,
            hook_timeout_ms: 30_000,
        }
    }
}

/// Self-fencing of the leader-only units (see the crate's `fence` module):
/// the lease holder arms a watchdog and pets it only while its lease is
/// valid; a new holder starts the units only after the fence delay, by
/// which time the old holder has stopped its own or been reset.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    /// The watchdog device (`/dev/watchdog`).
    pub watchdog: PathBuf,
    pub watchdog_mode: WatchdogMode,
    /// The watchdog resets the server this long after its last pet.
    pub watchdog_timeout: Duration,
    /// How long a new holder waits, from its first lease, before starting
    /// leader-only units; at least twice the watchdog timeout.
    pub delay: Duration,
    /// A command (`sh -c`) that makes sure the old holder is off (IPMI,
    /// Redfish): its success ends the wait early.
    pub hook: Option<String>,
    pub hook_timeout: Duration,
}

/// What the fence delay adds to twice the watchdog timeout by default: the
/// old holder's timer and ours may run a little apart, and its reset takes
/// a moment.
pub const FENCE_MARGIN: Duration = Duration::from_secs(2);

/// Gratuitous ARP (IPv4) or unsolicited neighbour advertisements (IPv6):
/// one burst at once when the VIP is added, then `count - 1` more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Announce {
    /// Announcements in all, the first at once. Default 5.
    pub count: u32,
    /// Between two announcements, in milliseconds. Default 200.
    pub interval_ms: u64,
}

impl Default for Announce {
    fn default() -> Self {
        Announce {
            count: 5,
            interval_ms: 200,
        }
    }
}

/// How the agent treats a lease that ran out without renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// After the lease ran out without renewal (an overloaded host or a
    /// slow network), the VIP and leader units are taken again only once
    /// the lease has been renewed without a gap for this long, in
    /// milliseconds: a lease that keeps lapsing does not make the VIP and
    /// the units flap. A change of leader ends the wait. 0: take them back
    /// at once. Default 1000.
    pub settle_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { settle_ms: 1000 }
    }
}

/// What to do on entering a role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Role {
    /// systemd units started on becoming leader and stopped on leaving
    /// (only meaningful under `[leader]`).
    pub units: Vec<String>,
    /// A command run (through `sh -c`) after entering the role; the
    /// generalisation of OpenNebula's RAFT_LEADER_HOOK/RAFT_FOLLOWER_HOOK.
    pub hook: Option<String>,
    /// Longest a hook may run, in milliseconds. Default 30000.
    pub hook_timeout_ms: Option<u64>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: PathBuf,
    pub vips: Vec<Vip>,
    pub announce: Announce,
    pub lease: LeaseConfig,
    pub leader: Role,
    pub follower: Role,
    pub fence: Fence,
    pub storage: Storage,
    /// Where this agent records the leader-only units it may have started
    /// (the zone's list may change while it is down), so that a restart
    /// stops them.
    pub units_record: PathBuf,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|(field, reason)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        })
    }

    /// Parses and validates; on error, the dotted field and the reason.
    pub fn parse(text: &str) -> Result<Config, (String, String)> {
        let file: FileConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let field = e.path().to_string();
                (field, e.into_inner().message().to_owned())
            })?;
        if file.vip.is_empty() {
            return Err(("vip".into(), "at least one [[vip]] is needed".into()));
        }
        let mut vips = Vec::new();
        for (i, v) in file.vip.iter().enumerate() {
            let (addr, prefix) = v.address.split_once('/').ok_or_else(|| {
                (
                    format!("vip[{i}].address"),
                    format!("'{}' is not address/prefix", v.address),
                )
            })?;
            let address: IpAddr = addr.parse().map_err(|_| {
                (
                    format!("vip[{i}].address"),
                    format!("'{addr}' is not an IP address"),
                )
            })?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
                (
                    format!("vip[{i}].address"),
                    format!("prefix '{prefix}' is not between 0 and {max}"),
                )
            })?;
            if v.interface.is_empty() || v.interface.len() > 15 || v.interface.contains('/') {
                return Err((
                    format!("vip[{i}].interface"),
                    format!("'{}' is not an interface name", v.interface),
                ));
            }
            let vip = Vip {
                address,
                prefix,
                interface: v.interface.clone(),
            };
            if vips.iter().any(|o: &Vip| o.address == vip.address) {
                return Err((
                    format!("vip[{i}].address"),
                    format!("{address} is listed twice"),
                ));
            }
            vips.push(vip);
        }
        if file.announce.count == 0 {
            return Err(("announce.count".into(), "must be at least 1".into()));
        }
        if file.announce.interval_ms == 0 && file.announce.count > 1 {
            return Err((
                "announce.interval_ms".into(),
                "must be at least 1 when count > 1".into(),
            ));
        }
        if !file.follower.units.is_empty() {
            return Err((
                "follower.units".into(),
                "units run only on the leader; list them under [leader]".into(),
            ));
        }
        let f = &file.fence;
        if f.watchdog_mode != WatchdogMode::Off && !(1..=600).contains(&f.watchdog_timeout_s) {
            return Err((
                "fence.watchdog_timeout_s".into(),
                format!("{} is not between 1 and 600", f.watchdog_timeout_s),
            ));
        }
        let watchdog_timeout = Duration::from_secs(f.watchdog_timeout_s.into());
        // Safety: the old holder may run its units until its watchdog
        // fires, the timeout after its last pet (made before its lease
        // ended, so before ours began). One more timeout: should its
        // zone-vip die (crash, or killed by systemd's watchdog) before
        // then, the kernel pings the watchdog once as it closes the device
        // without disarming it, and the reset comes a timeout after that.
        let floor = 2 * watchdog_timeout;
        let delay = match f.delay_ms {
            None if f.watchdog_mode == WatchdogMode::Off => Duration::ZERO,
            None => floor + FENCE_MARGIN,
            Some(ms) => {
                let d = Duration::from_millis(ms);
                if f.watchdog_mode != WatchdogMode::Off && d < floor {
                    return Err((
                        "fence.delay_ms".into(),
                        format!(
                            "{ms} is shorter than twice the watchdog's timeout ({} s): a new leader could start the units while the old one still runs them",
                            f.watchdog_timeout_s
                        ),
                    ));
                }
                d
            }
        };
        if f.hook.as_deref().is_some_and(|h| h.trim().is_empty()) {
            return Err(("fence.hook".into(), "is empty".into()));
        }
        let fence = Fence {
            watchdog: f.watchdog.clone(),
            watchdog_mode: f.watchdog_mode,
            watchdog_timeout,
            delay,
            hook: f.hook.clone(),
            hook_timeout: Duration::from_millis(f.hook_timeout_ms),
        };
        Ok(Config {
            fence,
            socket: file.socket,
            vips,
            announce: file.announce,
            lease: file.lease,
            leader: file.leader,
            follower: file.follower,
            storage: file.storage,
            units_record: file.units_record,
        })
    }

    pub fn announce_interval(&self) -> Duration {
        Duration::from_millis(self.announce.interval_ms)
    }

    pub fn example() -> &'static str {
        include_str!("../vip.example.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        let (f, r) = Config::parse(text).unwrap_err();
        format!("{f}: {r}")
    }

    #[test]
    fn example_parses() {
        let c = Config::parse(Config::example()).unwrap();
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[0].to_string(), "10.0.0.100/24 on eth0");
        assert!(c.vips[1].address.is_ipv6());
        assert_eq!(c.announce.count, 5);
        assert_eq!(c.lease.settle_ms, 1000);
        assert_eq!(c.leader.units, vec!["opennebula.service".to_string()]);
        assert_eq!(c.fence.watchdog_timeout, Duration::from_secs(5));
        assert_eq!(c.fence.delay, Duration::from_secs(12));
        assert_eq!(c.fence.watchdog_mode, WatchdogMode::Automatic);
    }

    #[test]
    fn the_fence_delay_covers_the_watchdog() {
        const VIP: &str = "[[vip]]\naddress = \"10.0.0.1/24\"\ninterface = \"eth0\"\n";
        assert_eq!(
            err(&format!("{VIP}[fence]\nwatchdog_timeout_s = 10\ndelay_ms = 15000\n")),
            "fence.delay_ms: 15000 is shorter than twice the watchdog's timeout (10 s): a new leader could start the units while the old one still runs them"
        );
        assert_eq!(
            err(&format!("{VIP}[fence]\nwatchdog_timeout_s = 0\n")),
            "fence.watchdog_timeout_s: 0 is not between 1 and 600"
        );
        assert!(err(&format!("{VIP}[fence]\nwatchdog_mode = \"maybe\"\n"))
            .starts_with("fence.watchdog_mode: unknown variant"));
        let off = Config::parse(&format!("{VIP}[fence]\nwatchdog_mode = \"off\"\n")).unwrap();
        assert_eq!(off.fence.delay, Duration::ZERO);
        let hook = Config::parse(&format!(
            "{VIP}[fence]\nwatchdog_timeout_s = 5\ndelay_ms = 10000\nhook = \"ipmitool power off\"\n"
        ))
        .unwrap();
        assert_eq!(hook.fence.delay, Duration::from_secs(10));
        assert_eq!(hook.fence.hook.as_deref(), Some("ipmitool power off"));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err(""), "vip: at least one [[vip]] is needed");
        assert_eq!(
            err("[[vip]]\naddress = \"10.0.0.1\"\ninterface = \"eth0\"\n"),
            "vip[0].address: '10.0.0.1' is not address/prefix"
        );
        assert_eq!(
            err("[[vip]]\naddress = \"10.0.0.1/33\"\ninterface = \"eth0\"\n"),
            "vip[0].address: prefix '33' is not between 0 and 32"
        );
        assert_eq!(
            err("[[vip]]\naddress = \"10.0.0.300/24\"\ninterface = \"eth0\"\n"),
            "vip[0].address: '10.0.0.300' is not an IP address"
        );
        assert_eq!(
            err("[[vip]]\naddress = \"10.0.0.1/24\"\ninterface = \"a-very-long-interface-name\"\n"),
            "vip[0].interface: 'a-very-long-interface-name' is not an interface name"
        );
        assert!(err("[announce]\ncount = \"x\"\n").starts_with("announce.count: invalid type"));
        assert!(err("[leader]\nunit = []\n").starts_with("leader.unit: unknown field"));
        assert!(err("[lease]\nsettle_ms = -1\n").starts_with("lease.settle_ms: invalid value"));
        assert_eq!(
            err("[[vip]]\naddress = \"10.0.0.1/24\"\ninterface = \"eth0\"\n[follower]\nunits = [\"x\"]\n"),
            "follower.units: units run only on the leader; list them under [leader]"
        );
    }
}
