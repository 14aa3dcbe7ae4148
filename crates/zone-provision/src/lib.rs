//! A node's identity, and the configuration rendered from it at boot.
//!
//! Every server of a zone boots the same image; what makes one server
//! `zone-2` is a small identity: its id and name, its address on the cluster
//! network, the founding peers, the VIPs. It comes from up to three places,
//! merged field by field, later ones winning:
//!
//! 1. `zoned/identity.toml` on the EFI system partition (FAT, so an operator
//!    can edit it from any OS before or after flashing);
//! 2. QEMU's `-fw_cfg name=opt/zoned/identity.toml,file=...` (same format);
//! 3. `zoned.KEY=VALUE` words on the kernel command line.
//!
//! [`Identity::resolve`] validates the merge (errors name the field and the
//! source to fix) and the `render_*` functions produce zoned's node.toml,
//! zone-vip's vip.toml and a systemd-networkd unit. This module only parses
//! and renders; the binary does the reading and writing.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub mod credentials;
pub mod roots;
pub mod units;

/// The managed root every zone has (zone-sync's default).
pub const DEFAULT_MANAGED_ROOT: &str = "/etc/zoned/managed";

/// Port of zoned's client gRPC on every server.
pub const CLIENT_PORT: u16 = 7400;
/// Port of zoned's peer (Raft) gRPC on every server.
pub const PEER_PORT: u16 = 7401;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{source_name}: {path}: {message}")]
    Parse {
        source_name: String,
        path: String,
        message: String,
    },
    #[error("kernel command line: `zoned.{key}` is not an identity field (known: {known})")]
    UnknownKey { key: String, known: &'static str },
    #[error("identity field `{field}` {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error(
        "no node identity: `{field}` is not set. Put zoned/identity.toml on the EFI partition \
         (see identity.example.toml there), pass it with QEMU -fw_cfg \
         name=opt/zoned/identity.toml,file=..., or set zoned.{field}= on the kernel command line"
    )]
    Missing { field: &'static str },
}

const KNOWN: &str =
    "id, name, interface, address, gateway, dns, ntp, peers, vip, join, join_token, leader_units, managed_roots, tick_ms, watchdog, restore_from (fence_hook: the file only)";

/// Where the identity's `restore_from` file lies on the running appliance:
/// beside identity.toml on the EFI partition.
pub const ESP_ZONED_DIR: &str = "/boot/efi/zoned";

/// The zone's Raft tick when the identity names none (zoned's default).
pub const DEFAULT_TICK_MS: u64 = 50;

/// An identity as one source gives it: any field may be missing.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Raft id, unique in the zone, at least 1.
    pub id: Option<u64>,
    /// Name shown by `zonectl show`, and the host name; default `zone-<id>`.
    pub name: Option<String>,
    /// The cluster network interface: a kernel name (`eth0`) or a MAC
    /// address (`52:54:00:12:34:56`).
    pub interface: Option<String>,
    /// This server's address on it, with prefix: `10.0.0.11/24`.
    pub address: Option<String>,
    pub gateway: Option<String>,
    pub dns: Option<Vec<String>>,
    /// Time servers (addresses or host names) systemd-timesyncd keeps the
    /// clock to; none: the clock is not synchronised (the appliance asks
    /// no server it was not given).
    pub ntp: Option<Vec<String>>,
    /// The founding members as `ID@ADDRESS`, the same list on every server.
    pub peers: Option<Vec<String>>,
    /// Floating addresses held by the leader, with prefix.
    pub vip: Option<Vec<String>>,
    /// Join an existing zone through this member's address instead of
    /// founding one (after `zonectl server add`).
    pub join: Option<String>,
    /// With `join`: the one-time token `zonectl server add` printed, for a
    /// server given no certificates: zoned gets its own with it, and keeps
    /// them on the data partition.
    pub join_token: Option<String>,
    /// systemd units run only on the leader, after the VIP is up.
    pub leader_units: Option<Vec<String>>,
    /// Directories whose files `zonectl config push` may manage, besides
    /// /etc/zoned/managed (such as /etc/one).
    pub managed_roots: Option<Vec<String>>,
    /// The zone's Raft tick in milliseconds, the same on every server
    /// (default 50): heartbeats every 2 ticks, elections after 10-15 ticks
    /// of silence, a lease of 7 ticks. Raise it for servers that stall for
    /// hundreds of milliseconds (emulated or heavily shared VMs, distant
    /// sites): a lease that lapses moves the VIP.
    pub tick_ms: Option<u64>,
    /// Whether the watchdog that fences the leader-only units must be
    /// there: `required`, `automatic` (default) or `off` (zone-vip's
    /// `fence.watchdog_mode`).
    pub watchdog: Option<String>,
    /// A command whose success tells that the old leader is off (IPMI,
    /// Redfish): leader-only units need not wait out the fence delay.
    pub fence_hook: Option<String>,
    /// A backup file (`zonectl snapshot save`) beside identity.toml on the
    /// EFI partition, by name: at the first start with an empty data
    /// partition zoned builds its store from it, this server a founder of
    /// a new zone (restore every founder from the same file); ignored once
    /// a store is in place.
    pub restore_from: Option<String>,
}

impl Identity {
    /// Parses the TOML form; `source_name` says where it came from in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Identity, Error> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| Error::Parse {
            source_name: source_name.to_owned(),
            path: e.path().to_string(),
            message: e.inner().message().to_owned(),
        })
    }

    /// The `zoned.KEY=VALUE` words of a kernel command line; lists are
    /// comma-separated. Other words are ignored.
    pub fn from_cmdline(cmdline: &str) -> Result<Identity, Error> {
        let mut id = Identity::default();
        for word in cmdline.split_whitespace() {
            let Some(rest) = word.strip_prefix("zoned.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let list = || -> Vec<String> {
                value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            let number = || -> Result<u64, Error> {
                value.parse().map_err(|_| Error::Parse {
                    source_name: "kernel command line".into(),
                    path: format!("zoned.{key}"),
                    message: format!("`{value}` is not a number"),
                })
            };
            match key {
                "id" => id.id = Some(number()?),
                "name" => id.name = Some(value.to_owned()),
                "interface" => id.interface = Some(value.to_owned()),
                "address" => id.address = Some(value.to_owned()),
                "gateway" => id.gateway = Some(value.to_owned()),
                "dns" => id.dns = Some(list()),
                "ntp" => id.ntp = Some(list()),
                "peers" => id.peers = Some(list()),
                "vip" => id.vip = Some(list()),
                "join" => id.join = Some(value.to_owned()),
                "join_token" => id.join_token = Some(value.to_owned()),
                "leader_units" => id.leader_units = Some(list()),
                "managed_roots" => id.managed_roots = Some(list()),
                "watchdog" => id.watchdog = Some(value.to_owned()),
                "tick_ms" => id.tick_ms = Some(number()?),
                "restore_from" => id.restore_from = Some(value.to_owned()),
                _ => {
                    return Err(Error::UnknownKey {
                        key: key.to_owned(),
                        known: KNOWN,
                    })
                }
            }
        }
        Ok(id)
    }

    /// `over`'s fields where it has them, ours elsewhere.
    pub fn merge(self, over: Identity) -> Identity {
        Identity {
            id: over.id.or(self.id),
            name: over.name.or(self.name),
            interface: over.interface.or(self.interface),
            address: over.address.or(self.address),
            gateway: over.gateway.or(self.gateway),
            dns: over.dns.or(self.dns),
            ntp: over.ntp.or(self.ntp),
            peers: over.peers.or(self.peers),
            vip: over.vip.or(self.vip),
            join: over.join.or(self.join),
            join_token: over.join_token.or(self.join_token),
            leader_units: over.leader_units.or(self.leader_units),
            managed_roots: over.managed_roots.or(self.managed_roots),
            tick_ms: over.tick_ms.or(self.tick_ms),
            watchdog: over.watchdog.or(self.watchdog),
            fence_hook: over.fence_hook.or(self.fence_hook),
            restore_from: over.restore_from.or(self.restore_from),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Identity::default()
    }

    /// Checks every field and fills in defaults.
    pub fn resolve(&self) -> Result<Resolved, Error> {
        let id = self.id.ok_or(Error::Missing { field: "id" })?;
        if id == 0 {
            return Err(invalid("id", "must be at least 1".into()));
        }
        let name = match &self.name {
            Some(n) => {
                let ok = !n.is_empty()
                    && n.len() <= 63
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !n.starts_with('-');
                if !ok {
                    return Err(invalid(
                        "name",
                        format!("`{n}` is not a host name (letters, digits and '-', at most 63)"),
                    ));
                }
                n.clone()
            }
            None => format!("zone-{id}"),
        };
        let interface = match &self.interface {
            None => return Err(Error::Missing { field: "interface" }),
            Some(i) if is_mac(i) => Interface::Mac(i.to_ascii_lowercase()),
            Some(i)
                if !i.is_empty()
                    && i.len() < 16
                    && !i.contains(['/', ' ', ':'])
                    && i != "."
                    && i != ".." =>
            {
                Interface::Name(i.clone())
            }
            Some(i) => {
                return Err(invalid(
                    "interface",
                    format!("`{i}` is neither an interface name nor a MAC address"),
                ))
            }
        };
        let address = match &self.address {
            None => return Err(Error::Missing { field: "address" }),
            Some(a) => Cidr::parse(a).map_err(|p| invalid("address", p))?,
        };
        let gateway = match &self.gateway {
            None => None,
            Some(g) => Some(
                g.parse::<IpAddr>()
                    .map_err(|_| invalid("gateway", format!("`{g}` is not an IP address")))?,
            ),
        };
        let dns = self
            .dns
            .iter()
            .flatten()
            .map(|d| {
                d.parse::<IpAddr>()
                    .map_err(|_| invalid("dns", format!("`{d}` is not an IP address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ntp = self
            .ntp
            .iter()
            .flatten()
            .map(|n| {
                let host = !n.is_empty()
                    && n.len() <= 253
                    && n.split('.').all(|l| {
                        !l.is_empty()
                            && !l.starts_with('-')
                            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    });
                if n.parse::<IpAddr>().is_ok() || host {
                    Ok(n.clone())
                } else {
                    Err(invalid(
                        "ntp",
                        format!("`{n}` is neither an IP address nor a host name"),
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut peers = Vec::new();
        let mut seen = BTreeSet::new();
        for p in self.peers.iter().flatten() {
            let Some((pid, host)) = p.split_once('@') else {
                return Err(invalid("peers", format!("`{p}` is not ID@ADDRESS")));
            };
            let pid: u64 =
                pid.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    invalid("peers", format!("`{p}`: the id must be a number ≥ 1"))
                })?;
            let host: IpAddr = host
                .parse()
                .map_err(|_| invalid("peers", format!("`{p}`: `{host}` is not an IP address")))?;
            if !seen.insert(pid) {
                return Err(invalid("peers", format!("id {pid} is listed twice")));
            }
            peers.push(Peer {
                id: pid,
                address: host,
            });
        }
        let join = match &self.join {
            None => None,
            Some(j) => Some(
                j.parse::<IpAddr>()
                    .map_err(|_| invalid("join", format!("`{j}` is not an IP address")))?,
            ),
        };
        let restore_from = match &self.restore_from {
            None => None,
            Some(f) => {
                let plain = !f.is_empty()
                    && !f.starts_with('.')
                    && f.len() <= 128
                    && f.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                if !plain {
                    return Err(invalid(
                        "restore_from",
                        format!(
                            "`{f}` is not a file name (letters, digits, `.`, `_`, `-`; the file lies beside identity.toml)"
                        ),
                    ));
                }
                if join.is_some() {
                    return Err(invalid(
                        "restore_from",
                        "a restored server founds a new zone: it cannot also `join` one".into(),
                    ));
                }
                Some(f.clone())
            }
        };
        let join_token = match &self.join_token {
            None => None,
            Some(t) => {
                let token: zone_pki::JoinToken = t.parse().map_err(|e| invalid("join_token", e))?;
                if join.is_none() {
                    return Err(invalid(
                        "join_token",
                        "needs `join`: the address of the member to join through".into(),
                    ));
                }
                if token.server_id != id {
                    return Err(invalid(
                        "join_token",
                        format!(
                            "is for server {}, and this server's id is {id}",
                            token.server_id
                        ),
                    ));
                }
                Some(t.trim().to_owned())
            }
        };
        if join.is_none() && !peers.is_empty() {
            match peers.iter().find(|p| p.id == id) {
                None => {
                    return Err(invalid(
                        "peers",
                        format!("does not list this server's id {id}: a founder must be a peer"),
                    ))
                }
                Some(me) if me.address != address.addr => {
                    return Err(invalid(
                        "peers",
                        format!(
                            "gives {} for this server's id {id}, but `address` is {}",
                            me.address, address.addr
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let vip = self
            .vip
            .iter()
            .flatten()
            .map(|v| Cidr::parse(v).map_err(|p| invalid("vip", p)))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(v) = vip.iter().find(|v| v.addr == address.addr) {
            return Err(invalid(
                "vip",
                format!("{} is this server's own address", v.addr),
            ));
        }
        let leader_units = self.leader_units.clone().unwrap_or_default();
        if let Some(u) = leader_units
            .iter()
            .find(|u| u.is_empty() || u.contains('/'))
        {
            return Err(invalid("leader_units", format!("`{u}` is not a unit name")));
        }
        let mut managed_roots = vec![DEFAULT_MANAGED_ROOT.to_owned()];
        for r in self.managed_roots.iter().flatten() {
            let normal = r.starts_with('/')
                && r.len() > 1
                && !r.ends_with('/')
                && !r.contains("//")
                && r.split('/').all(|c| c != "." && c != "..");
            if !normal {
                return Err(invalid(
                    "managed_roots",
                    format!("`{r}` is not an absolute directory in normal form"),
                ));
            }
            if !managed_roots.contains(r) {
                managed_roots.push(r.clone());
            }
        }
        let tick_ms = self.tick_ms.unwrap_or(DEFAULT_TICK_MS);
        if !(MIN_TICK_MS..=MAX_TICK_MS).contains(&tick_ms) {
            return Err(invalid(
                "tick_ms",
                format!("{tick_ms} is out of range: {MIN_TICK_MS} to {MAX_TICK_MS} milliseconds"),
            ));
        }
        let watchdog = self.watchdog.clone().unwrap_or_else(|| "automatic".into());
        if !["required", "automatic", "off"].contains(&watchdog.as_str()) {
            return Err(invalid(
                "watchdog",
                format!("`{watchdog}` is not one of required, automatic, off"),
            ));
        }
        if self
            .fence_hook
            .as_deref()
            .is_some_and(|h| h.trim().is_empty())
        {
            return Err(invalid("fence_hook", "is empty".into()));
        }
        Ok(Resolved {
            watchdog,
            fence_hook: self.fence_hook.clone(),
            restore_from,
            tick_ms,
            managed_roots,
            id,
            name,
            interface,
            address,
            gateway,
            dns,
            ntp,
            peers,
            vip,
            join,
            join_token,
            leader_units,
        })
    }
}

fn invalid(field: &'static str, problem: String) -> Error {
    Error::Invalid { field, problem }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` needs a prefix length, as in 10.0.0.11/24"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("`{p}` is not a prefix length (0-{max})"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface {
    Name(String),
    Mac(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    pub address: IpAddr,
}

/// A complete, checked identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub id: u64,
    pub name: String,
    pub interface: Interface,
    pub address: Cidr,
    pub gateway: Option<IpAddr>,
    pub dns: Vec<IpAddr>,
    pub ntp: Vec<String>,
    pub peers: Vec<Peer>,
    pub vip: Vec<Cidr>,
    pub join: Option<IpAddr>,
    pub join_token: Option<String>,
    pub leader_units: Vec<String>,
    /// Always starts with /etc/zoned/managed.
    pub managed_roots: Vec<String>,
    pub tick_ms: u64,
    pub watchdog: String,
    pub fence_hook: Option<String>,
    /// A file name under [`ESP_ZONED_DIR`].
    pub restore_from: Option<String>,
}

/// The range of `tick_ms`: below 10 ms a loaded server misses heartbeats;
/// above 1 s an election takes tens of seconds.
pub const MIN_TICK_MS: u64 = 10;
pub const MAX_TICK_MS: u64 = 1000;

fn host_port(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

#[derive(Serialize)]
struct NodeFile {
    node: NodeSection,
    files: FilesEntry,
    tls: TlsEntry,
    extensions: ExtensionsEntry,
    #[serde(skip_serializing_if = "Option::is_none")]
    raft: Option<RaftEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    voters: Vec<VoterEntry>,
}

/// The zone's timing, written only when the identity changes the tick.
#[derive(Serialize)]
struct RaftEntry {
    tick_ms: u64,
    lease_margin_ms: u64,
}

/// Where the zone's system extensions go: the directory systemd-sysext
/// merges from, on the data partition.
#[derive(Serialize)]
struct ExtensionsEntry {
    dir: String,
}

/// The appliance's extensions directory (zoned's default is none).
pub const EXTENSIONS_DIR: &str = "/var/lib/extensions";

#[derive(Serialize)]
struct TlsEntry {
    dir: String,
}

#[derive(Serialize)]
struct FilesEntry {
    managed_roots: Vec<String>,
}

#[derive(Serialize)]
struct NodeSection {
    id: u64,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    join: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    join_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restore_from: Option<String>,
    serving_file: String,
}

/// The file zoned keeps while it is SERVING, which the boot assessment of
/// an upgrade (zone-boot-check.service) waits for.
pub const SERVING_FILE: &str = "/run/zoned/serving";

#[derive(Serialize)]
struct VoterEntry {
    id: u64,
    peer: String,
}

#[derive(Serialize)]
struct VipFile {
    vip: Vec<VipEntry>,
    leader: LeaderSection,
    fence: FenceSection,
}

#[derive(Serialize)]
struct FenceSection {
    watchdog_mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hook: Option<String>,
}

#[derive(Serialize)]
struct VipEntry {
    address: String,
    interface: String,
}

#[derive(Serialize)]
struct LeaderSection {
    units: Vec<String>,
}

const HEADER: &str = "# Written at boot by zone-provision from the node identity; edits here are\n\
                      # lost at the next boot: change zoned/identity.toml on the EFI partition.\n";

/// zoned's node.toml: everything not written here keeps zoned's default.
/// `tls`: where the server's certificates were installed, or where zoned
/// writes those it gets with the join token (`with_token`).
pub fn render_node(r: &Resolved, tls: &std::path::Path, with_token: bool) -> String {
    let file = NodeFile {
        node: NodeSection {
            id: r.id,
            name: r.name.clone(),
            join: r.join.map(|j| host_port(j, CLIENT_PORT)),
            join_token: r.join_token.clone().filter(|_| with_token),
            restore_from: r
                .restore_from
                .as_ref()
                .map(|f| format!("{ESP_ZONED_DIR}/{f}")),
            serving_file: SERVING_FILE.to_owned(),
        },
        files: FilesEntry {
            managed_roots: r.managed_roots.clone(),
        },
        tls: TlsEntry {
            dir: tls.display().to_string(),
        },
        extensions: ExtensionsEntry {
            dir: EXTENSIONS_DIR.to_owned(),
        },
        // The lease margin scales with the tick, as zoned's default (100 ms
        // for 50): zoned requires at least a tick plus drift, and the lease
        // stays 7 ticks long.
        raft: (r.tick_ms != DEFAULT_TICK_MS).then_some(RaftEntry {
            tick_ms: r.tick_ms,
            lease_margin_ms: 2 * r.tick_ms,
        }),
        voters: if r.join.is_some() {
            Vec::new()
        } else {
            r.peers
                .iter()
                .map(|p| VoterEntry {
                    id: p.id,
                    peer: host_port(p.address, PEER_PORT),
                })
                .collect()
        },
    };
    format!(
        "{HEADER}{}",
        toml::to_string(&file).expect("plain structs serialise")
    )
}

/// zone-vip's vip.toml, or None when the identity has no VIP.
pub fn render_vip(r: &Resolved, interface: &str) -> Option<String> {
    if r.vip.is_empty() {
        return None;
    }
    let file = VipFile {
        vip: r
            .vip
            .iter()
            .map(|v| VipEntry {
                address: v.to_string(),
                interface: interface.to_owned(),
            })
            .collect(),
        leader: LeaderSection {
            units: r.leader_units.clone(),
        },
        fence: FenceSection {
            watchdog_mode: r.watchdog.clone(),
            hook: r.fence_hook.clone(),
        },
    };
    Some(format!(
        "{HEADER}{}",
        toml::to_string(&file).expect("plain structs serialise")
    ))
}

/// A systemd-networkd unit giving the interface its static address.
pub fn render_network(r: &Resolved, interface: &str) -> String {
    let mut s = format!(
        "{HEADER}[Match]\nName={interface}\n\n[Network]\nAddress={}\n",
        r.address
    );
    if let Some(g) = r.gateway {
        s.push_str(&format!("Gateway={g}\n"));
    }
    for d in &r.dns {
        s.push_str(&format!("DNS={d}\n"));
    }
    // systemd-timesyncd takes the link's time servers from networkd.
    for n in &r.ntp {
        s.push_str(&format!("NTP={n}\n"));
    }
    // No router advertisements or DHCP: a control plane's addresses are
    // what the identity says, nothing else.
    s.push_str("DHCP=no\nIPv6AcceptRA=no\nLinkLocalAddressing=ipv6\n");
    s
}

/// /etc/resolv.conf's content (a link to /run/zoned/resolv.conf).
pub fn render_resolv(r: &Resolved) -> String {
    let mut s = String::from("# Written at boot by zone-provision from the node identity.\n");
    for d in &r.dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three(id: u64) -> Identity {
        Identity::from_toml(
            &format!(
                r#"
                id = {id}
                interface = "eth0"
                address = "10.0.0.1{id}/24"
                peers = ["1@10.0.0.11", "2@10.0.0.12", "3@10.0.0.13"]
                vip = ["10.0.0.10/24"]
                "#
            ),
            "test",
        )
        .unwrap()
    }

    const TLS_DIR: &str = "/var/lib/zoned/tls";

    /// A backup named by the identity becomes node.restore_from beside
    /// identity.toml; a path, a hidden name and a joiner are refused.
    #[test]
    fn restore_from_names_a_file_beside_the_identity() {
        let mut i = three(2);
        i.restore_from = Some("zone-2026.backup".into());
        let node = render_node(&i.resolve().unwrap(), TLS_DIR.as_ref(), false);
        let parsed: toml::Value = toml::from_str(&node).unwrap();
        assert_eq!(
            parsed["node"]["restore_from"].as_str(),
            Some("/boot/efi/zoned/zone-2026.backup"),
            "{node}"
        );
        for bad in ["../etc/shadow", "a/b", ".hidden", ""] {
            i.restore_from = Some(bad.into());
            let e = i.resolve().unwrap_err().to_string();
            assert!(
                e.contains("identity field `restore_from`") && e.contains("not a file name"),
                "{bad}: {e}"
            );
        }
        i.restore_from = Some("zone.backup".into());
        i.join = Some("10.0.0.11".into());
        let e = i.resolve().unwrap_err().to_string();
        assert!(e.contains("cannot also `join`"), "{e}");
        let from_cmdline = Identity::from_cmdline("zoned.restore_from=zone.backup").unwrap();
        assert_eq!(from_cmdline.restore_from.as_deref(), Some("zone.backup"));
        let plain = render_node(&three(2).resolve().unwrap(), TLS_DIR.as_ref(), false);
        assert!(!plain.contains("restore_from"), "{plain}");
    }

    #[test]
    fn renders_a_founder() {
        let r = three(2).resolve().unwrap();
        let node = render_node(&r, TLS_DIR.as_ref(), false);
        let parsed: toml::Value = toml::from_str(&node).unwrap();
        assert_eq!(parsed["node"]["id"].as_integer(), Some(2));
        assert_eq!(parsed["node"]["name"].as_str(), Some("zone-2"));
        let voters = parsed["voters"].as_array().unwrap();
        assert_eq!(voters.len(), 3);
        assert_eq!(voters[2]["peer"].as_str(), Some("10.0.0.13:7401"));
        let vip: toml::Value = toml::from_str(&render_vip(&r, "eth0").unwrap()).unwrap();
        assert_eq!(vip["vip"][0]["address"].as_str(), Some("10.0.0.10/24"));
        assert_eq!(vip["vip"][0]["interface"].as_str(), Some("eth0"));
        let net = render_network(&r, "eth0");
        assert!(net.contains("Name=eth0\n"), "{net}");
        assert!(net.contains("Address=10.0.0.12/24\n"), "{net}");
        assert_eq!(parsed["tls"]["dir"].as_str(), Some("/var/lib/zoned/tls"));
    }

    #[test]
    fn time_servers_go_to_the_network_unit_and_bad_ones_are_refused() {
        let mut i = three(1);
        let none = render_network(&i.resolve().unwrap(), "eth0");
        assert!(!none.contains("NTP="), "{none}");
        i.ntp = Some(vec![
            "10.0.0.1".into(),
            "ntp.example.org".into(),
            "fd00::1".into(),
        ]);
        let net = render_network(&i.resolve().unwrap(), "eth0");
        assert!(
            net.contains("NTP=10.0.0.1\nNTP=ntp.example.org\nNTP=fd00::1\n"),
            "{net}"
        );
        for bad in ["ntp example", "", "-x.org", "a..b", "x;reboot"] {
            i.ntp = Some(vec![bad.into()]);
            let e = i.resolve().unwrap_err().to_string();
            assert!(e.contains("identity field `ntp`"), "{bad}: {e}");
        }
        let c = Identity::from_cmdline("zoned.ntp=10.0.0.1,10.0.0.2").unwrap();
        assert_eq!(c.ntp, Some(vec!["10.0.0.1".into(), "10.0.0.2".into()]));
    }

    #[test]
    fn a_joiner_has_no_voters_and_names_its_contact() {
        let mut i = three(4);
        i.address = Some("10.0.0.14/24".into());
        i.join = Some("10.0.0.11".into());
        let node = render_node(&i.resolve().unwrap(), TLS_DIR.as_ref(), false);
        let parsed: toml::Value = toml::from_str(&node).unwrap();
        assert_eq!(parsed["node"]["join"].as_str(), Some("10.0.0.11:7400"));
        assert!(parsed.get("voters").is_none(), "{node}");
        assert!(parsed["node"].get("join_token").is_none(), "{node}");

        // A join token: checked for this server, and written for zoned.
        let ca = zone_pki::ZoneCa::generate().unwrap();
        let mine = zone_pki::JoinToken::generate(4, &ca.fingerprint()).unwrap();
        i.join_token = Some(mine.to_string());
        let node = render_node(&i.resolve().unwrap(), TLS_DIR.as_ref(), true);
        let parsed: toml::Value = toml::from_str(&node).unwrap();
        assert_eq!(
            parsed["node"]["join_token"].as_str(),
            Some(&*mine.to_string())
        );
        let other = zone_pki::JoinToken::generate(5, &ca.fingerprint()).unwrap();
        i.join_token = Some(other.to_string());
        let e = i.resolve().unwrap_err().to_string();
        assert_eq!(
            e,
            "identity field `join_token` is for server 5, and this server's id is 4"
        );
        i.join_token = Some("zjoin1.4.nope".into());
        let e = i.resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("identity field `join_token` not a join token"),
            "{e}"
        );
        i.join_token = Some(mine.to_string());
        i.join = None;
        let e = i.resolve().unwrap_err().to_string();
        assert!(e.contains("needs `join`"), "{e}");
    }

    #[test]
    fn later_sources_win_field_by_field() {
        let file = three(1);
        let cmd = Identity::from_cmdline(
            "root=PARTLABEL=zoned-root-a ro zoned.id=3 zoned.address=10.0.0.13/24 quiet",
        )
        .unwrap();
        let r = file.merge(cmd).resolve().unwrap();
        assert_eq!(r.id, 3);
        assert_eq!(r.address.to_string(), "10.0.0.13/24");
        assert_eq!(r.peers.len(), 3, "peers kept from the file");
    }

    #[test]
    fn the_command_line_alone_is_enough() {
        let r = Identity::from_cmdline(
            "zoned.id=1 zoned.interface=52:54:00:AB:cd:01 zoned.address=fd00::1/64 \
             zoned.peers=1@fd00::1,2@fd00::2 zoned.vip=fd00::100/64,10.1.0.9/16 \
             zoned.managed_roots=/etc/one",
        )
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(r.interface, Interface::Mac("52:54:00:ab:cd:01".into()));
        assert_eq!(r.vip.len(), 2);
        let node = render_node(&r, TLS_DIR.as_ref(), false);
        assert!(node.contains("\"[fd00::2]:7401\""), "{node}");
        let parsed: toml::Value = toml::from_str(&node).unwrap();
        assert_eq!(
            parsed["files"]["managed_roots"],
            toml::Value::from(vec!["/etc/zoned/managed", "/etc/one"])
        );
    }

    #[test]
    fn the_tick_sets_the_zones_timing_and_scales_the_lease_margin() {
        let default = render_node(&three(1).resolve().unwrap(), TLS_DIR.as_ref(), false);
        let parsed: toml::Value = toml::from_str(&default).unwrap();
        assert!(parsed.get("raft").is_none(), "{default}");
        let slow = three(1)
            .merge(Identity::from_cmdline("zoned.tick_ms=100").unwrap())
            .resolve()
            .unwrap();
        let node = render_node(&slow, TLS_DIR.as_ref(), false);
        let parsed: toml::Value = toml::from_str(&node).unwrap();
        assert_eq!(parsed["raft"]["tick_ms"].as_integer(), Some(100), "{node}");
        assert_eq!(parsed["raft"]["lease_margin_ms"].as_integer(), Some(200));
        for bad in ["zoned.tick_ms=5", "zoned.tick_ms=1001"] {
            let e = three(1)
                .merge(Identity::from_cmdline(bad).unwrap())
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(e.contains("`tick_ms`") && e.contains("out of range"), "{e}");
        }
        let e = Identity::from_cmdline("zoned.tick_ms=fast").unwrap_err();
        assert!(e.to_string().contains("zoned.tick_ms"), "{e}");
    }

    #[test]
    fn the_watchdog_mode_and_the_fence_hook_reach_zone_vip() {
        let vip = |r: &Resolved| -> toml::Value {
            toml::from_str(&render_vip(r, "eth0").unwrap()).unwrap()
        };
        let v = vip(&three(1).resolve().unwrap());
        assert_eq!(v["fence"]["watchdog_mode"].as_str(), Some("automatic"));
        assert!(v["fence"].get("hook").is_none());
        let mut id = three(1);
        id.fence_hook = Some("ipmitool -H bmc-2 chassis power off".into());
        id.watchdog = Some("required".into());
        let v = vip(&id.resolve().unwrap());
        assert_eq!(v["fence"]["watchdog_mode"].as_str(), Some("required"));
        assert_eq!(
            v["fence"]["hook"].as_str(),
            Some("ipmitool -H bmc-2 chassis power off")
        );
        let e = three(1)
            .merge(Identity::from_cmdline("zoned.watchdog=maybe").unwrap())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("`watchdog`"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let bad = |text: &str| {
            three(1)
                .merge(Identity::from_cmdline(text).unwrap())
                .resolve()
        };
        let msg = |e: Error| e.to_string();
        assert!(msg(bad("zoned.address=10.0.0.11").unwrap_err()).contains("`address`"));
        assert!(msg(bad("zoned.address=10.0.0.11/33").unwrap_err()).contains("prefix length"));
        assert!(msg(bad("zoned.peers=1@10.0.0.11,1@10.0.0.12").unwrap_err()).contains("twice"));
        assert!(msg(bad("zoned.peers=2@10.0.0.12,3@10.0.0.13").unwrap_err())
            .contains("does not list this server's id 1"));
        assert!(msg(bad("zoned.address=10.0.0.99/24").unwrap_err()).contains("but `address`"));
        assert!(msg(bad("zoned.vip=10.0.0.11/24").unwrap_err()).contains("own address"));
        assert!(msg(bad("zoned.interface=a/b").unwrap_err()).contains("`interface`"));
        assert!(msg(bad("zoned.name=-x").unwrap_err()).contains("`name`"));
        assert!(
            msg(bad("zoned.managed_roots=/etc/one/..").unwrap_err()).contains("`managed_roots`")
        );
        assert!(matches!(
            Identity::from_cmdline("zoned.vips=1.2.3.4/32"),
            Err(Error::UnknownKey { .. })
        ));
        let e = Identity::from_toml("id = \"one\"", "identity.toml").unwrap_err();
        assert!(msg(e).starts_with("identity.toml: id:"));
        let e = Identity::from_toml("idd = 1", "identity.toml").unwrap_err();
        assert!(msg(e).contains("idd"));
        let missing = Identity::default().resolve().unwrap_err();
        assert!(msg(missing).contains("`id` is not set"));
    }

    #[test]
    fn the_example_file_parses_and_resolves() {
        let text = include_str!("../identity.example.toml");
        let r = Identity::from_toml(text, "identity.example.toml")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(r.id, 1);
    }
}
