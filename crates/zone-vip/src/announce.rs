//! [`Announcer`] over a raw packet socket: gratuitous ARP for IPv4 (both
//! the request and the reply form, since hosts and switches differ in which
//! they honour) and an unsolicited neighbour advertisement with the
//! override flag for IPv6, sent from the interface's own MAC.
//!
//! No unsafe code: the link-layer destination comes from `getifaddrs`, the
//! interface's own AF_PACKET address (its index and MAC). ARP answers for
//! the VIP go out the same way ([`crate::neighbours`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::sync::mpsc;

use crate::config::Vip;
use crate::effects::Announcer;
use crate::neighbours::{self, Question};

/// Sends announcements and answers with a fresh socket each time (the
/// interface may have come and gone in between; its address is cached for
/// a second, see [`neighbours::link_of`]).
#[derive(Debug, Default)]
pub struct RawAnnouncer;

/// A gratuitous ARP frame: `op` 1 (request) or 2 (reply).
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr, op: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, op]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(if op == 1 { &[0; 6] } else { &[0xff; 6] });
    f.extend_from_slice(&ip.octets());
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An unsolicited neighbour advertisement (override set) to all nodes.
pub fn na_frame(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes: Ipv6Addr = "ff02::1".parse().expect("literal");
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&ip.octets());
    pseudo.extend_from_slice(&all_nodes.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

impl Announcer for RawAnnouncer {
    fn announce(&self, vip: &Vip) -> io::Result<()> {
        neighbours::send_frames(&vip.interface, |mac| match vip.address {
            IpAddr::V4(ip) => vec![garp_frame(mac, ip, 1), garp_frame(mac, ip, 2)],
            IpAddr::V6(ip) => vec![na_frame(mac, ip)],
        })
    }

    fn answer(&self, q: &Question) -> io::Result<()> {
        match (q.vip, q.asker_ip) {
            (IpAddr::V4(vip), IpAddr::V4(asker)) => neighbours::send_frames(&q.interface, |mac| {
                vec![neighbours::answer_frame(mac, vip, q.asker_mac, asker)]
            }),
            (IpAddr::V6(vip), IpAddr::V6(asker)) => {
                neighbours::answer_solicitation(&q.interface, vip, asker)
            }
            _ => Ok(()),
        }
    }

    fn listen(&self, vips: &[Vip], questions: mpsc::Sender<Question>) -> io::Result<()> {
        neighbours::listen(vips, questions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_request_and_reply_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(10, 0, 0, 100);
        let req = garp_frame(mac, ip, 1);
        assert_eq!(req.len(), 42);
        assert_eq!(&req[12..14], &[0x08, 0x06]);
        assert_eq!(req[21], 1);
        assert_eq!(&req[28..32], &ip.octets(), "sender IP");
        assert_eq!(
            &req[38..42],
            &ip.octets(),
            "target IP is the same: gratuitous"
        );
        assert_eq!(garp_frame(mac, ip, 2)[21], 2);
    }

    #[test]
    fn na_checksum_verifies() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip: Ipv6Addr = "fd00::100".parse().unwrap();
        let f = na_frame(mac, ip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(f[54], 136);
        // Checksum over pseudo-header + message, including the stored sum, is 0.
        let icmp = &f[54..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&f[22..38]);
        pseudo.extend_from_slice(&f[38..54]);
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(icmp);
        assert_eq!(checksum(&pseudo), 0);
    }
}
