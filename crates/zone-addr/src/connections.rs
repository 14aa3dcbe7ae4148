//! Resetting the TCP connections whose local address is a VIP, before the
//! VIP leaves a server (sock_diag's `SOCK_DESTROY`, what `ss -K` does).
//!
//! Once an address is removed, the kernel sends nothing from it: a route
//! from a source address that is not local is refused, so an answer, a FIN
//! or a reset on a connection to the old holder never leaves it. A client
//! that sent a request just before the address went then waits, hearing
//! nothing, until its own deadline (seen: a writer through the VIP stalled
//! 10 s, its request timeout, at a planned leadership handover). Reset
//! while the address is still there, the client hears the reset at once and
//! connects again, now to the new holder.
//!
//! Requires a kernel built with `CONFIG_INET_DIAG_DESTROY` (Debian's is)
//! and `CAP_NET_ADMIN`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `struct nlmsghdr`.
const HEADER: usize = 16;
/// `struct inet_diag_sockid`: ports, source, destination, interface,
/// cookie.
const SOCKID: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retransmits, the socket
/// id, then five 32-bit counters.
const DIAG_MSG: usize = 4 + SOCKID + 20;
/// The TCP states whose peer may be waiting on this end (`TCP_ESTABLISHED`
/// 1, `TCP_SYN_RECV` 3, `TCP_FIN_WAIT1` 4, `TCP_FIN_WAIT2` 5,
/// `TCP_CLOSE_WAIT` 8, `TCP_LAST_ACK` 9, `TCP_CLOSING` 11). Not listening
/// sockets (bound to the wildcard address anyway) nor `TIME_WAIT`.
const STATES: u32 = 1 << 1 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11;
/// How long the kernel may take to answer one request: the caller is
/// about to remove an address, which must not wait long.
const ANSWER_WITHIN: Duration = Duration::from_millis(200);

/// One `struct inet_diag_req_v2` request in a netlink message.
fn request(kind: u16, flags: u16, seq: u32, family: u8, states: u32, id: &[u8; SOCKID]) -> Vec<u8> {
    let len = HEADER + 8 + SOCKID;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

/// The local address in a socket id of `family` (IPv4 in the first four
/// bytes of the 16, in network order).
fn local_address(family: u8, id: &[u8; SOCKID]) -> Option<IpAddr> {
    let src: [u8; 16] = id[4..20].try_into().ok()?;
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(src))),
        _ => None,
    }
}

/// Whether a socket's local address is `address`: an IPv4 address also
/// as the IPv4-mapped address of a dual-stack listener's connection.
fn is_local(family: u8, id: &[u8; SOCKID], address: IpAddr) -> bool {
    match (local_address(family, id), address) {
        (Some(IpAddr::V6(found)), IpAddr::V4(want)) => found.to_ipv4_mapped() == Some(want),
        (Some(found), want) => found == want,
        (None, _) => false,
    }
}

/// The netlink messages in `buf`: (type, payload).
fn messages(buf: &[u8]) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
        if len < HEADER || at + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "sock_diag: a message of {len} bytes at {at} of {}",
                    buf.len()
                ),
            ));
        }
        out.push((kind, &buf[at + HEADER..at + len]));
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        at += (len + 3) & !3;
    }
    Ok(out)
}

/// The error an `NLMSG_ERROR` payload carries (0: an acknowledgement).
fn errno_of(payload: &[u8]) -> io::Result<i32> {
    let b: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sock_diag: a short error"))?;
    Ok(-i32::from_ne_bytes(b))
}

struct Diag {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Diag {
    fn open() -> io::Result<Diag> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(0, ANSWER_WITHIN.as_micros() as _),
        )?;
        Ok(Diag {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        sendto(
            self.fd.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(())
    }

    fn recv(&mut self) -> io::Result<&[u8]> {
        let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
        Ok(&self.buf[..n])
    }

    /// The TCP sockets of `family` whose local address is `address`:
    /// (state, socket id).
    fn find(&mut self, family: u8, address: IpAddr) -> io::Result<Vec<(u8, [u8; SOCKID])>> {
        self.send(&request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            family,
            STATES,
            &[0; SOCKID],
        ))?;
        let mut found = Vec::new();
        loop {
            for (kind, payload) in messages(self.recv()?)? {
                match kind {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => {
                        let errno = errno_of(payload)?;
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno));
                        }
                    }
                    SOCK_DIAG_BY_FAMILY if payload.len() >= DIAG_MSG => {
                        let id: [u8; SOCKID] = payload[4..4 + SOCKID].try_into().expect("48");
                        if is_local(payload[0], &id, address) {
                            found.push((payload[1], id));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Destroys one socket (the peer gets a reset); false if it was gone.
    fn destroy(&mut self, family: u8, state: u8, id: &[u8; SOCKID], seq: u32) -> io::Result<bool> {
        let states = 1u32.checked_shl(u32::from(state)).unwrap_or(STATES);
        self.send(&request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            states,
            id,
        ))?;
        for (kind, payload) in messages(self.recv()?)? {
            if kind == NLMSG_ERROR {
                return match errno_of(payload)? {
                    0 => Ok(true),
                    // Closed meanwhile.
                    e if e == nix::errno::Errno::ENOENT as i32 => Ok(false),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
        }
        Ok(true)
    }
}

/// Resets every TCP connection whose local address is `address` (the
/// peers get a reset); how many. An IPv4 address is looked for among
/// IPv6 sockets too, as the IPv4-mapped address of a dual-stack listener.
pub fn reset_tcp(address: IpAddr) -> io::Result<usize> {
    let mut diag = Diag::open()?;
    let families: &[u8] = if address.is_ipv4() {
        &[AF_INET, AF_INET6]
    } else {
        &[AF_INET6]
    };
    let mut reset = 0;
    let mut seq = 2;
    for &family in families {
        for (state, id) in diag.find(family, address)? {
            seq += 1;
            if diag.destroy(family, state, &id, seq)? {
                reset += 1;
            }
        }
    }
    Ok(reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_with_source(src: [u8; 16]) -> [u8; SOCKID] {
        let mut id = [0; SOCKID];
        id[4..20].copy_from_slice(&src);
        id
    }

    #[test]
    fn the_local_address_matches_in_both_families_and_as_ipv4_mapped() {
        let v4: IpAddr = "10.0.0.100".parse().unwrap();
        let mut src = [0; 16];
        src[..4].copy_from_slice(&[10, 0, 0, 100]);
        assert!(is_local(AF_INET, &id_with_source(src), v4));
        src[3] = 101;
        assert!(!is_local(AF_INET, &id_with_source(src), v4));
        let mapped = "::ffff:10.0.0.100".parse::<Ipv6Addr>().unwrap().octets();
        assert!(is_local(AF_INET6, &id_with_source(mapped), v4));
        let v6: IpAddr = "fd00::100".parse().unwrap();
        let octets = "fd00::100".parse::<Ipv6Addr>().unwrap().octets();
        assert!(is_local(AF_INET6, &id_with_source(octets), v6));
        assert!(!is_local(AF_INET6, &id_with_source(mapped), v6));
    }

    #[test]
    fn requests_are_inet_diag_req_v2_in_one_netlink_message() {
        let id = [7; SOCKID];
        let m = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            AF_INET,
            1 << 1,
            &id,
        );
        assert_eq!(m.len(), HEADER + 56);
        let parsed = messages(&m).unwrap();
        assert_eq!(parsed.len(), 1);
        let (kind, payload) = parsed[0];
        assert_eq!(kind, SOCK_DESTROY);
        assert_eq!(&payload[..4], &[AF_INET, IPPROTO_TCP, 0, 0]);
        assert_eq!(u32::from_ne_bytes(payload[4..8].try_into().unwrap()), 2);
        assert_eq!(&payload[8..], &id);
    }

    #[test]
    fn a_truncated_answer_is_an_error_not_a_panic() {
        let mut m = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST,
            1,
            AF_INET,
            STATES,
            &[0; 48],
        );
        m.truncate(40);
        assert!(messages(&m).is_err());
    }
}
