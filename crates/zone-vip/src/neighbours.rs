//! Who answers ARP for an IPv4 VIP: this agent, never the kernel.
//!
//! The kernel answers ARP for every address on an interface, at any time,
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
//! - [`listen`] reads the ARP requests for a VIP from a packet socket per
//!   interface, and the runner answers each one only under a lease renewed
//!   by a heartbeat round sent after the question arrived (see `runner`),
//!   which a server the zone has moved on from never gets.
//!
//! IPv6 VIPs are still answered by the kernel (neighbour solicitations):
//! not covered yet.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::ifaddrs::getifaddrs;
use nix::sys::socket::{bind, recv, sendto, socket, LinkAddr, MsgFlags};
use tokio::sync::mpsc;

use crate::config::Vip;
use zone_proto::boottime_ns;

/// The nftables table this agent owns.
pub const TABLE: &str = "zone_vip";

/// An ARP request for a VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The interface it came in on.
    pub interface: String,
    pub vip: Ipv4Addr,
    pub asker_mac: [u8; 6],
    /// 0.0.0.0 for a probe (RFC 5227), answered too, as the kernel does.
    pub asker_ip: Ipv4Addr,
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

/// The ARP reply to `q`, from `mac`, sent to the asker alone.
pub fn answer_frame(mac: [u8; 6], q: &Question) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&q.asker_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&q.vip.octets());
    f.extend_from_slice(&q.asker_mac);
    f.extend_from_slice(&q.asker_ip.octets());
    f
}

/// The interface's own AF_PACKET address (its index and MAC).
pub fn link_of(interface: &str) -> io::Result<(LinkAddr, [u8; 6])> {
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
        nix::sys::socket::AddressFamily::Packet,
        nix::sys::socket::SockType::Raw,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    for f in build(mac) {
        sendto(fd.as_raw_fd(), &f, &link, MsgFlags::empty())?;
    }
    Ok(())
}

/// The IPv4 VIPs, by interface.
fn ipv4_by_interface(vips: &[Vip]) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let mut by = BTreeMap::<String, Vec<Ipv4Addr>>::new();
    for v in vips {
        if let IpAddr::V4(ip) = v.address {
            by.entry(v.interface.clone()).or_default().push(ip);
        }
    }
    by
}

/// A packet socket that receives the ARP frames coming in on `interface`.
fn arp_socket(interface: &str) -> io::Result<(socket2::Socket, usize)> {
    let (link, _) = link_of(interface)?;
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

/// Reads the ARP requests for the IPv4 VIPs from their interfaces, each on
/// `questions` (dropped when it is full: a flood of requests must not grow
/// this agent). A thread per interface; an interface that is missing or
/// goes away is looked for again every second.
pub fn listen(vips: &[Vip], questions: mpsc::Sender<Question>) -> io::Result<()> {
    for (interface, ips) in ipv4_by_interface(vips) {
        let tx = questions.clone();
        std::thread::Builder::new()
            .name(format!("arp-{interface}"))
            .spawn(move || listen_on(&interface, &ips, &tx))?;
    }
    Ok(())
}

fn listen_on(interface: &str, ips: &[Ipv4Addr], tx: &mpsc::Sender<Question>) {
    let mut buf = [0u8; 128];
    let mut complained = false;
    while !tx.is_closed() {
        let (sock, index) = match arp_socket(interface) {
            Ok(s) => s,
            Err(e) => {
                if !complained {
                    tracing::error!(interface, error = %e, "cannot listen for ARP requests for the VIP; trying again every second");
                    complained = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        complained = false;
        while !tx.is_closed() {
            match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => {
                    let at_ns = boottime_ns();
                    let Some((asker_mac, asker_ip, vip)) = parse_request(&buf[..n]) else {
                        continue;
                    };
                    if !ips.contains(&vip) {
                        continue;
                    }
                    let _ = tx.try_send(Question {
                        interface: interface.to_owned(),
                        vip,
                        asker_mac,
                        asker_ip,
                        at_ns,
                    });
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                    // A second without a request: is it still the same
                    // interface?
                    if link_of(interface).map(|(l, _)| l.ifindex()).ok() != Some(index) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(interface, error = %e, "reading ARP requests failed; listening again");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// The kernel kept from sending ARP for the VIPs.
#[derive(Debug)]
pub struct KernelGate;

/// Why the kernel could not be kept from answering ARP for the VIP.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot run nft (the nftables package), which keeps the kernel from answering ARP for the VIP: {0}")]
    NoNft(io::Error),
    #[error("nft refused the zone_vip table: {0}")]
    Refused(String),
}

impl KernelGate {
    /// The nftables ruleset: replaces the table whole, in one transaction.
    pub fn ruleset(vips: &[Vip]) -> String {
        let ips: Vec<String> = vips
            .iter()
            .filter_map(|v| match v.address {
                IpAddr::V4(ip) => Some(ip.to_string()),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut r = format!("table arp {TABLE}\ndelete table arp {TABLE}\n");
        if !ips.is_empty() {
            r.push_str(&format!(
                "table arp {TABLE} {{\n  chain output {{\n    type filter hook output priority filter; policy accept;\n    arp saddr ip {{ {} }} drop comment \"zone-vip answers for the VIP itself, under a fresh lease\"\n  }}\n}}\n",
                ips.join(", ")
            ));
        }
        r
    }

    /// Installs the table, and `arp_announce = 2` on each IPv4 VIP's
    /// interface (a warning if that cannot be set: the interface may come
    /// later; the table alone keeps the kernel silent).
    pub fn install(vips: &[Vip]) -> Result<KernelGate, GateError> {
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
        for interface in ipv4_by_interface(vips).keys() {
            let path = format!("/proc/sys/net/ipv4/conf/{interface}/arp_announce");
            if let Err(e) = std::fs::write(&path, "2") {
                tracing::warn!(interface, error = %e, "cannot set arp_announce = 2: the kernel may name the VIP as the sender of its own ARP requests, which are then dropped");
            }
        }
        Ok(KernelGate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let q = Question {
            interface: "eth0".into(),
            vip: sender,
            asker_mac: [0xff; 6],
            asker_ip: target,
            at_ns: 0,
        };
        // A reply frame has the request's layout but for the operation.
        let mut f = answer_frame([2, 0, 0, 0, 0, 9], &q);
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
        let q = Question {
            interface: "eth0".into(),
            vip: Ipv4Addr::new(10, 0, 0, 100),
            asker_mac: [2, 0, 0, 0, 0, 7],
            asker_ip: Ipv4Addr::new(10, 0, 0, 7),
            at_ns: 0,
        };
        let mine = [2, 0, 0, 0, 0, 1];
        let f = answer_frame(mine, &q);
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &q.asker_mac, "unicast to the asker");
        assert_eq!(&f[6..12], &mine);
        assert_eq!(f[21], 2, "a reply");
        assert_eq!(&f[22..28], &mine, "sender MAC");
        assert_eq!(&f[28..32], &[10, 0, 0, 100], "sender IP: the VIP");
        assert_eq!(&f[32..38], &q.asker_mac);
        assert_eq!(&f[38..42], &[10, 0, 0, 7]);
    }

    #[test]
    fn the_ruleset_drops_the_kernels_arp_for_ipv4_vips_only() {
        let vip = |s: &str, i: &str| Vip {
            address: s.parse().unwrap(),
            prefix: 24,
            interface: i.into(),
        };
        let r = KernelGate::ruleset(&[vip("10.0.0.100", "eth0"), vip("fd00::100", "eth0")]);
        assert!(r.starts_with("table arp zone_vip\ndelete table arp zone_vip\n"));
        assert!(r.contains("hook output"));
        assert!(r.contains("arp saddr ip { 10.0.0.100 } drop"));
        assert!(!r.contains("fd00"));
        // No IPv4 VIP: the table goes.
        let r = KernelGate::ruleset(&[vip("fd00::100", "eth0")]);
        assert_eq!(r, "table arp zone_vip\ndelete table arp zone_vip\n");
    }
}
