//! Who answers the neighbours' questions for a VIP (ARP for IPv4, neighbour
//! solicitations for IPv6): this agent, never the kernel.
//!
//! The kernel answers for every address on an interface, at any time,
//! without asking whether a lease still holds. After a VM pause that is the
//! one thing the resumed server does with the VIP before this agent can run:
//! its clocks stood still, its lease seems to run, and the kernel answers
//! the neighbours' questions with its MAC while the new leader holds the
//! address (seen in the QEMU pause test: answers for 100-150 ms after the
//! resume). So:
//!
//! - [`KernelGate`] keeps the kernel from sending any ARP frame that names a
//!   VIP as its sender (an nftables `arp` table, `zone_vip`, hook `output`),
//!   and sets `arp_announce = 2` on the VIP's interface so that the kernel
//!   never picks the VIP as the sender of its own questions. This agent's
//!   frames go out through a packet socket, which that hook does not see.
//!   For IPv6, an `ip6` table of the same name drops the kernel's neighbour
//!   advertisements from a VIP, but for this agent's, which carry its mark
//!   ([`MARK`]).
//! - [`listen`] reads the questions for a VIP (ARP requests from a packet
//!   socket, neighbour solicitations from a raw ICMPv6 socket, one per
//!   interface), and the runner answers each one only under a lease renewed
//!   by a heartbeat round sent after the question arrived (see `runner`),
//!   which a server the zone has moved on from never gets. Solicitations
//!   are taken only with hop limit 255, as the kernel takes them.
//!
//! Left to the kernel: for IPv6, its own solicitations from the VIP (when a
//! leader-only service talks from it to a host it has no entry for), which
//! only the asked host hears; there is no `arp_announce` for IPv6.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::ifaddrs::getifaddrs;
use nix::sys::socket::{
    bind, recv, recvmsg, sendto, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned,
    LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn6,
};
use tokio::sync::mpsc;

use crate::config::Vip;
use zone_proto::boottime_ns;

/// The nftables tables this agent owns (`arp` and `ip6`).
pub const TABLE: &str = "zone_vip";
/// The mark on this agent's neighbour advertisements ("zv"), which the
/// `ip6` table lets through.
pub const MARK: u32 = 0x7a76;

/// A question for a VIP: an ARP request, or a neighbour solicitation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The interface it came in on.
    pub interface: String,
    pub vip: IpAddr,
    /// The asker's MAC (ARP; unused for IPv6, where the kernel resolves
    /// the asker from its solicitation).
    pub asker_mac: [u8; 6],
    /// The unspecified address for a duplicate-address probe (RFC 5227,
    /// RFC 4862), answered too, as the kernel does.
    pub asker_ip: IpAddr,
    /// When it arrived (CLOCK_BOOTTIME ns).
    pub at_ns: u64,
}

/// The request in an ARP frame: `(asker MAC, asker IP, target IP)`, for
/// an Ethernet/IPv4 request that is not an announcement.
pub fn parse_request(f: &[u8]) -> Option<([u8; 6], Ipv4Addr, Ipv4Addr)> {
    if f.len() < 42
        || f[12..14] != [0x08, 0x06]
        || f[14..16] != [0, 1]
        || f[16..18] != [0x08, 0x00]
        || f[18] != 6
        || f[19] != 4
        || f[20..22] != [0, 1]
    {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let (asker, target) = (ip(28), ip(38));
    // An announcement (the sender names its own address) is no question;
    // another server announcing the VIP is exactly what must not be
    // answered.
    if asker == target {
        return None;
    }
    Some((f[22..28].try_into().ok()?, asker, target))
}

/// The ARP reply from `mac` for `vip` to the asker alone.
pub fn answer_frame(mac: [u8; 6], vip: Ipv4Addr, asker_mac: [u8; 6], asker: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&asker_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&asker_mac);
    f.extend_from_slice(&asker.octets());
    f
}

/// The target of a neighbour solicitation (an ICMPv6 message as a raw
/// socket reads it, without the IPv6 header).
pub fn parse_solicitation(m: &[u8]) -> Option<Ipv6Addr> {
    if m.len() < 24 || m[0] != 135 || m[1] != 0 {
        return None;
    }
    let target: [u8; 16] = m[8..24].try_into().ok()?;
    Some(Ipv6Addr::from(target))
}

/// The neighbour advertisement for `vip` from `mac`: solicited unless it
/// answers a duplicate-address probe, override set; the kernel fills in
/// the checksum.
pub fn advertisement(mac: [u8; 6], vip: Ipv6Addr, solicited: bool) -> Vec<u8> {
    let flags = if solicited { 0x60 } else { 0x20 };
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(&[136, 0, 0, 0, flags, 0, 0, 0]);
    m.extend_from_slice(&vip.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&mac);
    m
}

/// Answers a neighbour solicitation for `vip` through a raw ICMPv6 socket
/// on `interface`, from the VIP, with hop limit 255 and this agent's mark;
/// the kernel resolves the asker from its solicitation.
pub fn answer_solicitation(interface: &str, vip: Ipv6Addr, asker: Ipv6Addr) -> io::Result<()> {
    let (fd, link, mac) = icmpv6_socket(interface)?;
    setsockopt(&fd, sockopt::Mark, &MARK)?;
    setsockopt(&fd, sockopt::Ipv6Ttl, &255)?;
    setsockopt(&fd, sockopt::Ipv6MulticastHops, &255)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn6::from(std::net::SocketAddrV6::new(vip, 0, 0, 0)),
    )?;
    let probe = asker.is_unspecified();
    // A probe's answer goes to all nodes (RFC 4861 7.2.4).
    let to = if probe {
        std::net::SocketAddrV6::new(
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            0,
            0,
            link.ifindex() as u32,
        )
    } else {
        std::net::SocketAddrV6::new(asker, 0, 0, link.ifindex() as u32)
    };
    if let Err(e) = sendto(
        fd.as_raw_fd(),
        &advertisement(mac, vip, !probe),
        &SockaddrIn6::from(to),
        MsgFlags::empty(),
    ) {
        forget_link(interface);
        return Err(e.into());
    }
    Ok(())
}

/// How long a looked-up link address is used before it is looked up again.
const LINK_TTL: Duration = Duration::from_secs(1);

type Links = BTreeMap<String, (std::time::Instant, LinkAddr, [u8; 6])>;

/// Link addresses by interface, looked up at most once per [`LINK_TTL`]:
/// every answer needs one, and a burst of questions must not become a
/// netlink dump each on the thread that also follows the lease.
static LINKS: std::sync::Mutex<Links> = std::sync::Mutex::new(BTreeMap::new());

/// The interface's own AF_PACKET address (its index and MAC).
pub fn link_of(interface: &str) -> io::Result<(LinkAddr, [u8; 6])> {
    let mut links = LINKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, link, mac)) = links.get(interface) {
        if at.elapsed() < LINK_TTL {
            return Ok((*link, *mac));
        }
    }
    let (link, mac) = look_up_link(interface)?;
    links.insert(interface.to_owned(), (std::time::Instant::now(), link, mac));
    Ok((link, mac))
}

/// Forgets what [`link_of`] found for `interface` (a send through it
/// failed: the interface may have been made anew).
fn forget_link(interface: &str) {
    LINKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(interface);
}

fn look_up_link(interface: &str) -> io::Result<(LinkAddr, [u8; 6])> {
    for ifa in getifaddrs().map_err(io::Error::from)? {
        if ifa.interface_name != interface {
            continue;
        }
        if let Some(link) = ifa.address.as_ref().and_then(|a| a.as_link_addr()) {
            if let Some(mac) = link.addr() {
                return Ok((*link, mac));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("interface {interface} has no link-layer address"),
    ))
}

/// Sends frames on `interface`, built for its MAC, through a packet socket
/// (which the kernel's ARP output hook does not see).
pub fn send_frames(interface: &str, build: impl FnOnce([u8; 6]) -> Vec<Vec<u8>>) -> io::Result<()> {
    let (link, mac) = link_of(interface)?;
    // Protocol 0: this socket only sends.
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    for f in build(mac) {
        if let Err(e) = sendto(fd.as_raw_fd(), &f, &link, MsgFlags::empty()) {
            forget_link(interface);
            return Err(e.into());
        }
    }
    Ok(())
}

/// The VIPs of one family (`v4`), by interface.
fn by_interface(vips: &[Vip], v4: bool) -> BTreeMap<String, Vec<IpAddr>> {
    let mut by = BTreeMap::<String, Vec<IpAddr>>::new();
    for v in vips.iter().filter(|v| v.address.is_ipv4() == v4) {
        by.entry(v.interface.clone()).or_default().push(v.address);
    }
    by
}

/// A raw ICMPv6 socket bound to `interface`, with the interface's link
/// address and MAC.
fn icmpv6_socket(interface: &str) -> io::Result<(std::os::fd::OwnedFd, LinkAddr, [u8; 6])> {
    let (link, mac) = link_of(interface)?;
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::IcmpV6,
    )?;
    setsockopt(
        &fd,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )?;
    Ok((fd, link, mac))
}

/// A raw ICMPv6 socket that receives what comes in on `interface`.
fn icmpv6_listener(interface: &str) -> io::Result<(std::os::fd::OwnedFd, usize)> {
    let (fd, link, _) = icmpv6_socket(interface)?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(1, 0),
    )?;
    setsockopt(&fd, sockopt::Ipv6RecvHopLimit, &true)?;
    Ok((fd, link.ifindex()))
}

/// A packet socket that receives the ARP frames coming in on `interface`.
fn arp_socket(interface: &str) -> io::Result<(socket2::Socket, usize)> {
    let (link, _) = look_up_link(interface)?;
    let proto = i32::from(0x0806u16.to_be());
    let s = socket2::Socket::new(
        socket2::Domain::PACKET,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(proto)),
    )?;
    // Bound to the interface; the link address from getifaddrs has protocol
    // 0, which keeps the socket's own (ARP).
    bind(s.as_raw_fd(), &link)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok((s, link.ifindex()))
}

/// Reads the questions for the VIPs from their interfaces, each on
/// `questions` (dropped when it is full: a flood of requests must not grow
/// this agent). A thread per interface and family; an interface that is
/// missing or goes away is looked for again every second.
pub fn listen(vips: &[Vip], questions: mpsc::Sender<Question>) -> io::Result<()> {
    for v4 in [true, false] {
        for (interface, ips) in by_interface(vips, v4) {
            let tx = questions.clone();
            let name = format!("{}-{interface}", if v4 { "arp" } else { "nd" });
            std::thread::Builder::new()
                .name(name)
                .spawn(move || listen_on(&interface, v4, &ips, &tx))?;
        }
    }
    Ok(())
}

/// One message read from a listening socket, as a question if it is one
/// for `ips`.
fn read_question(
    fd: std::os::fd::RawFd,
    v4: bool,
    interface: &str,
    ips: &[IpAddr],
    buf: &mut [u8],
) -> nix::Result<Option<Question>> {
    let (asker_ip, asker_mac, vip) = if v4 {
        let n = recv(fd, buf, MsgFlags::empty())?;
        let Some((mac, asker, vip)) = parse_request(&buf[..n]) else {
            return Ok(None);
        };
        (IpAddr::V4(asker), mac, IpAddr::V4(vip))
    } else {
        let (n, from, hops) = {
            let mut iov = [std::io::IoSliceMut::new(&mut buf[..])];
            let mut space = nix::cmsg_space!(i32);
            let m = recvmsg::<SockaddrIn6>(fd, &mut iov, Some(&mut space), MsgFlags::empty())?;
            let hops = m.cmsgs()?.find_map(|c| match c {
                ControlMessageOwned::Ipv6HopLimit(h) => Some(h),
                _ => None,
            });
            (m.bytes, m.address, hops)
        };
        // As the kernel does (RFC 4861 7.1.1): a solicitation that crossed
        // a router is forged.
        if hops != Some(255) {
            return Ok(None);
        }
        let Some(vip) = parse_solicitation(&buf[..n]) else {
            return Ok(None);
        };
        let Some(from) = from else {
            return Ok(None);
        };
        (IpAddr::V6(from.ip()), [0; 6], IpAddr::V6(vip))
    };
    Ok(ips.contains(&vip).then(|| Question {
        interface: interface.to_owned(),
        vip,
        asker_mac,
        asker_ip,
        at_ns: boottime_ns(),
    }))
}

fn listen_on(interface: &str, v4: bool, ips: &[IpAddr], tx: &mpsc::Sender<Question>) {
    let mut buf = [0u8; 256];
    let mut complained = false;
    while !tx.is_closed() {
        let opened = if v4 {
            arp_socket(interface).map(|(s, i)| (std::os::fd::OwnedFd::from(s), i))
        } else {
            icmpv6_listener(interface)
        };
        let (sock, index) = match opened {
            Ok(s) => s,
            Err(e) => {
                if !complained {
                    tracing::error!(interface, error = %e, "cannot listen for questions for the VIP (ARP or neighbour solicitations); trying again every second");
                    complained = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        complained = false;
        while !tx.is_closed() {
            match read_question(sock.as_raw_fd(), v4, interface, ips, &mut buf) {
                Ok(Some(q)) => {
                    let _ = tx.try_send(q);
                }
                Ok(None) => {}
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                    // A second without a request: is it still the same
                    // interface?
                    if look_up_link(interface).map(|(l, _)| l.ifindex()).ok() != Some(index) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(interface, error = %e, "reading questions for the VIP failed; listening again");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// The kernel kept from answering for the VIPs (see the module doc).
#[derive(Debug)]
pub struct KernelGate;

/// Why the kernel could not be kept from answering for the VIP.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot run nft (the nftables package), which keeps the kernel from answering for the VIP: {0}")]
    NoNft(io::Error),
    #[error("nft refused the zone_vip tables: {0}")]
    Refused(String),
}

impl KernelGate {
    /// The nftables ruleset: replaces both tables whole, in one
    /// transaction.
    pub fn ruleset(vips: &[Vip]) -> String {
        let ips = |v4: bool| {
            vips.iter()
                .filter(|v| v.address.is_ipv4() == v4)
                .map(|v| v.address.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let comment = "comment \"zone-vip answers for the VIP itself, under a fresh lease\"";
        let chain = |rule: String| {
            format!("  chain output {{\n    type filter hook output priority filter; policy accept;\n    {rule} drop {comment}\n  }}\n")
        };
        let mut r = String::new();
        for (family, ips, rule) in [
            ("arp", ips(true), "arp saddr ip"),
            (
                "ip6",
                ips(false),
                "meta mark != 0x7a76 icmpv6 type nd-neighbor-advert ip6 saddr",
            ),
        ] {
            r.push_str(&format!(
                "table {family} {TABLE}\ndelete table {family} {TABLE}\n"
            ));
            if !ips.is_empty() {
                r.push_str(&format!(
                    "table {family} {TABLE} {{\n{}}}\n",
                    chain(format!("{rule} {{ {ips} }}"))
                ));
            }
        }
        r
    }

    /// Installs the table, and `arp_announce = 2` on each IPv4 VIP's
    /// interface (a warning if that cannot be set: the interface may come
    /// later; the table alone keeps the kernel silent).
    pub fn install(vips: &[Vip]) -> Result<(), GateError> {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(GateError::NoNft)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(Self::ruleset(vips).as_bytes())
                .map_err(GateError::NoNft)?;
        }
        let out = child.wait_with_output().map_err(GateError::NoNft)?;
        if !out.status.success() {
            return Err(GateError::Refused(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        for interface in by_interface(vips, true).keys() {
            let path = format!("/proc/sys/net/ipv4/conf/{interface}/arp_announce");
            if let Err(e) = std::fs::write(&path, "2") {
                tracing::warn!(interface, error = %e, "cannot set arp_announce = 2: the kernel may name the VIP as the sender of its own ARP requests, which are then dropped");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        // A reply frame has the request's layout but for the operation.
        let mut f = answer_frame([2, 0, 0, 0, 0, 9], sender, [0xff; 6], target);
        f[21] = 1;
        f
    }

    #[test]
    fn a_request_is_parsed_and_an_announcement_is_not_a_question() {
        let asker = Ipv4Addr::new(10, 0, 0, 7);
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        let (mac, a, t) = parse_request(&request(asker, vip)).unwrap();
        assert_eq!((mac, a, t), ([2, 0, 0, 0, 0, 9], asker, vip));
        assert_eq!(parse_request(&request(vip, vip)), None, "announcement");
        let mut reply = request(asker, vip);
        reply[21] = 2;
        assert_eq!(parse_request(&reply), None, "a reply");
        assert_eq!(parse_request(&reply[..40]), None, "short");
    }

    #[test]
    fn the_answer_goes_to_the_asker_and_names_the_vip() {
        let asker_mac = [2, 0, 0, 0, 0, 7];
        let mine = [2, 0, 0, 0, 0, 1];
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        let f = answer_frame(mine, vip, asker_mac, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &asker_mac, "unicast to the asker");
        assert_eq!(&f[6..12], &mine);
        assert_eq!(f[21], 2, "a reply");
        assert_eq!(&f[22..28], &mine, "sender MAC");
        assert_eq!(&f[28..32], &[10, 0, 0, 100], "sender IP: the VIP");
        assert_eq!(&f[32..38], &asker_mac);
        assert_eq!(&f[38..42], &[10, 0, 0, 7]);
    }

    #[test]
    fn a_solicitation_names_its_target_and_the_advertisement_answers_it() {
        let vip: Ipv6Addr = "fd00::100".parse().unwrap();
        let mac = [2, 0, 0, 0, 0, 1];
        let mut ns = advertisement(mac, vip, true);
        ns[0] = 135;
        assert_eq!(parse_solicitation(&ns), Some(vip));
        assert_eq!(parse_solicitation(&ns[..20]), None, "short");
        let na = advertisement(mac, vip, true);
        assert_eq!(parse_solicitation(&na), None, "not a solicitation");
        assert_eq!(na.len(), 32);
        assert_eq!(na[4], 0x60, "solicited, override");
        assert_eq!(
            advertisement(mac, vip, false)[4],
            0x20,
            "a probe's: override only"
        );
        assert_eq!(&na[8..24], &vip.octets());
        assert_eq!(
            &na[24..32],
            &[2, 1, 2, 0, 0, 0, 0, 1],
            "target link-layer address"
        );
    }

    #[test]
    fn the_ruleset_drops_the_kernels_answers_for_the_vips() {
        let vip = |s: &str, i: &str| Vip {
            address: s.parse().unwrap(),
            prefix: 24,
            interface: i.into(),
        };
        let r = KernelGate::ruleset(&[vip("10.0.0.100", "eth0"), vip("fd00::100", "eth0")]);
        assert!(r.starts_with("table arp zone_vip\ndelete table arp zone_vip\n"));
        assert!(r.contains("hook output"));
        assert!(r.contains("arp saddr ip { 10.0.0.100 } drop"));
        assert!(r.contains(
            "meta mark != 0x7a76 icmpv6 type nd-neighbor-advert ip6 saddr { fd00::100 } drop"
        ));
        assert_eq!(format!("{MARK:#x}"), "0x7a76");
        // No IPv4 VIP: the arp table goes.
        let r = KernelGate::ruleset(&[vip("fd00::100", "eth0")]);
        assert!(r.starts_with("table arp zone_vip\ndelete table arp zone_vip\ntable ip6"));
    }
}
