//! ARP on a bridge (a QEMU lab's, or the namespace testbed's), seen from
//! the bridge itself: a capture of every ARP frame the bridge receives, and
//! requests sent from the bridge's own address. Who answers for the VIP,
//! and who announces it, is then a matter of record, not of what one
//! neighbour cache last believed.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::{
    recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag,
    SockProtocol, SockType,
};

use crate::vm::Lab;

/// The bridge every VM's tap is a port of.
const BRIDGE: &str = "br0";

/// One ARP frame, as the bridge received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpFrame {
    pub at: Instant,
    /// 1 request, 2 reply.
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

impl ArpFrame {
    /// An announcement: the sender names its own address as the target.
    pub fn gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }

    fn parse(at: Instant, f: &[u8]) -> Option<ArpFrame> {
        if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[16..18] != [0x08, 0x00] {
            return None;
        }
        let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
        Some(ArpFrame {
            at,
            op: u16::from_be_bytes([f[20], f[21]]),
            sender_mac: f[22..28].try_into().ok()?,
            sender_ip: ip(28),
            target_ip: ip(38),
        })
    }
}

/// One neighbour advertisement (IPv6), as the bridge received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    pub at: Instant,
    pub sender_mac: [u8; 6],
    pub target: Ipv6Addr,
    /// The solicited flag: an answer, not an announcement.
    pub solicited: bool,
}

impl Advertisement {
    fn parse(at: Instant, f: &[u8]) -> Option<Advertisement> {
        // Ethernet, IPv6 with no extension header, ICMPv6 type 136.
        if f.len() < 14 + 40 + 24 || f[12..14] != [0x86, 0xdd] || f[20] != 58 || f[54] != 136 {
            return None;
        }
        let target: [u8; 16] = f[62..78].try_into().ok()?;
        Some(Advertisement {
            at,
            sender_mac: f[6..12].try_into().ok()?,
            target: Ipv6Addr::from(target),
            solicited: f[58] & 0x40 != 0,
        })
    }
}

/// The one's-complement sum of ICMPv6 over its pseudo-header.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + message.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(message.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(message);
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// "52:54:00:79:00:01" as bytes.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(s.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("a MAC address");
    }
    mac
}

/// Records every ARP frame the lab's bridge receives, on a thread of its
/// own, until dropped.
#[derive(Debug)]
pub struct Capture {
    frames: Arc<Mutex<Vec<ArpFrame>>>,
    advertisements: Arc<Mutex<Vec<Advertisement>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A packet socket opened inside namespace `ns` (it stays in it), and the
/// link address there of its `bridge`.
fn bridge_socket(
    ns: &str,
    bridge: &str,
    protocol: Option<SockProtocol>,
) -> Result<(OwnedFd, LinkAddr)> {
    let (path, bridge) = (format!("/run/netns/{ns}"), bridge.to_owned());
    std::thread::spawn(move || -> Result<(OwnedFd, LinkAddr)> {
        let file = std::fs::File::open(&path).with_context(|| path.clone())?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns into the bridge's namespace")?;
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .context("a packet socket (needs root)")?;
        let link = nix::ifaddrs::getifaddrs()?
            .filter(|a| a.interface_name == bridge)
            .find_map(|a| a.address.and_then(|a| a.as_link_addr().copied()))
            .with_context(|| format!("bridge {bridge} has no link address"))?;
        Ok((fd, link))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

impl Capture {
    /// On the lab's bridge.
    pub fn start(lab: &Lab) -> Result<Capture> {
        Capture::start_on(&lab.ns, BRIDGE)
    }

    /// On `bridge` in namespace `ns`.
    pub fn start_on(ns: &str, bridge: &str) -> Result<Capture> {
        let (fd, bridge) = bridge_socket(ns, bridge, Some(SockProtocol::EthAll))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        let frames = Arc::new(Mutex::new(Vec::new()));
        let advertisements = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, out6, done) = (frames.clone(), advertisements.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                let Ok((n, from)) = recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) else {
                    continue;
                };
                // Each frame is seen on its tap, on the bridge and on the
                // other ports; keep the bridge's copy.
                if from.is_none_or(|l| l.ifindex() != bridge.ifindex()) {
                    continue;
                }
                let at = Instant::now();
                if let Some(f) = ArpFrame::parse(at, &buf[..n]) {
                    out.lock().expect("not poisoned").push(f);
                } else if let Some(a) = Advertisement::parse(at, &buf[..n]) {
                    out6.lock().expect("not poisoned").push(a);
                }
            }
        });
        Ok(Capture {
            frames,
            advertisements,
            stop,
            thread: Some(thread),
        })
    }

    /// The frames so far.
    pub fn frames(&self) -> Vec<ArpFrame> {
        self.frames.lock().expect("not poisoned").clone()
    }

    /// The neighbour advertisements so far.
    pub fn advertisements(&self) -> Vec<Advertisement> {
        self.advertisements.lock().expect("not poisoned").clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends ARP requests from the bridge's own address.
#[derive(Debug)]
pub struct Prober {
    fd: OwnedFd,
    bridge: LinkAddr,
    source: Ipv4Addr,
}

impl Prober {
    /// On the lab's bridge.
    pub fn open(lab: &Lab, source: Ipv4Addr) -> Result<Prober> {
        Prober::open_on(&lab.ns, BRIDGE, source)
    }

    /// On `bridge` in namespace `ns`, asking as `source`.
    pub fn open_on(ns: &str, bridge: &str, source: Ipv4Addr) -> Result<Prober> {
        let (fd, bridge) = bridge_socket(ns, bridge, None)?;
        Ok(Prober { fd, bridge, source })
    }

    /// "Who has `target`?", broadcast on the bridge.
    pub fn ask(&self, target: Ipv4Addr) -> Result<()> {
        let mac = self.bridge.addr().context("the bridge's MAC")?;
        let mut f = Vec::with_capacity(42);
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&self.source.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        sendto(self.fd.as_raw_fd(), &f, &self.bridge, MsgFlags::empty())?;
        Ok(())
    }

    /// "Who has `target`?" for IPv6: a neighbour solicitation from
    /// `source`, to the target's solicited-node group, with the bridge's
    /// MAC as the source link-layer address.
    pub fn solicit(&self, target: Ipv6Addr, source: Ipv6Addr) -> Result<()> {
        self.solicit_with_hops(target, source, 255)
    }

    /// As [`Prober::solicit`], with hop limit `hops`: below 255, as if it
    /// had crossed a router, which no host may answer.
    pub fn solicit_with_hops(&self, target: Ipv6Addr, source: Ipv6Addr, hops: u8) -> Result<()> {
        let mac = self.bridge.addr().context("the bridge's MAC")?;
        let t = target.octets();
        let group = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        );
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&t);
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&mac);
        let sum = icmpv6_checksum(source, group, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut f = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, hops]);
        f.extend_from_slice(&source.octets());
        f.extend_from_slice(&group.octets());
        f.extend_from_slice(&icmp);
        sendto(self.fd.as_raw_fd(), &f, &self.bridge, MsgFlags::empty())?;
        Ok(())
    }

    /// Asks for `target` every `every` for `span`; returns how many times.
    pub fn ask_for(&self, target: Ipv4Addr, every: Duration, span: Duration) -> Result<usize> {
        self.repeat(every, span, || self.ask(target))
    }

    /// Solicits `target` from `source` every `every` for `span`; returns
    /// how many times.
    pub fn solicit_for(
        &self,
        target: Ipv6Addr,
        source: Ipv6Addr,
        every: Duration,
        span: Duration,
    ) -> Result<usize> {
        self.repeat(every, span, || self.solicit(target, source))
    }

    fn repeat(&self, every: Duration, span: Duration, f: impl Fn() -> Result<()>) -> Result<usize> {
        let end = Instant::now() + span;
        let mut asked = 0;
        while Instant::now() < end {
            f()?;
            asked += 1;
            std::thread::sleep(every);
        }
        Ok(asked)
    }
}
