//! Addresses on interfaces over rtnetlink (`ip address add/del` without
//! the `ip` command), for the VIP.
//!
//! An address is added with a **kernel lifetime** (`valid_lft`): if every
//! process that should remove it stops (a frozen host userspace), the
//! kernel removes it itself when the lifetime runs out. The kernel counts
//! lifetimes in whole seconds and checks them up to a quarter of a second
//! late ([`KERNEL_EXPIRY_SLACK_MS`]), so this is a backstop, not the
//! mechanism that keeps failover fast. IPv6 addresses are added with
//! `nodad`: the address is ours by lease, and duplicate detection would
//! delay it by a second or more.
//!
//! [`connections::reset_tcp`] resets the TCP connections on an address,
//! while it is still there, before a planned removal.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, CacheInfo};
use rtnetlink::Handle;

pub mod connections;

/// How late the kernel may remove an address whose lifetime ran out:
/// `check_lifetime` (net/ipv4/devinet.c) and `addrconf_verify`
/// (net/ipv6/addrconf.c) run on a timer rounded up by up to `HZ/4`.
pub const KERNEL_EXPIRY_SLACK_MS: u64 = 250;

/// An address on an interface: `10.0.0.100/24 on eth0`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfAddr {
    pub interface: String,
    pub address: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for IfAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.address, self.prefix, self.interface)
    }
}

/// The kernel lifetime, in whole seconds, that covers at least `left`:
/// rounded up, at least 1 (0 would mean "expired"), at most `u32::MAX - 1`
/// (`u32::MAX` is "forever").
pub fn lifetime_secs(left: Duration) -> u32 {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    secs.clamp(1, u64::from(u32::MAX - 1)) as u32
}

/// A netlink connection, opened once.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

fn io_err(what: String, e: rtnetlink::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl Netlink {
    /// Opens the connection; its driver task runs on the current runtime.
    pub fn open() -> io::Result<Netlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    async fn index(&self, interface: &str) -> io::Result<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(interface.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {interface} not found"),
            )),
            Err(e) => Err(io_err(format!("interface {interface}"), e)),
        }
    }

    /// Adds the address, or renews it if it is there, valid for `lifetime`
    /// (see [`lifetime_secs`]) from now; `None`: no lifetime (forever).
    pub async fn add(&self, a: &IfAddr, lifetime: Option<Duration>) -> io::Result<()> {
        let index = self.index(&a.interface).await?;
        let mut req = self
            .handle
            .address()
            .add(index, a.address, a.prefix)
            .replace();
        let attributes = &mut req.message_mut().attributes;
        if a.address.is_ipv6() {
            attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Some(left) = lifetime {
            let secs = lifetime_secs(left);
            let mut info = CacheInfo::default();
            info.ifa_preferred = secs;
            info.ifa_valid = secs;
            attributes.push(AddressAttribute::CacheInfo(info));
        }
        req.execute()
            .await
            .map_err(|e| io_err(format!("add {a}"), e))
    }

    /// Removes the address; succeeds if it is not there.
    pub async fn remove(&self, a: &IfAddr) -> io::Result<()> {
        let index = match self.index(&a.interface).await {
            Ok(i) => i,
            // No interface, no address on it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(a.address)
            .set_prefix_length_filter(a.prefix)
            .execute();
        while let Some(msg) = found
            .try_next()
            .await
            .map_err(|e| io_err(format!("list {a}"), e))?
        {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|e| io_err(format!("remove {a}"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_round_up_to_whole_seconds_and_never_reach_0_or_forever() {
        assert_eq!(lifetime_secs(Duration::ZERO), 1);
        assert_eq!(lifetime_secs(Duration::from_millis(350)), 1);
        assert_eq!(lifetime_secs(Duration::from_millis(1000)), 1);
        assert_eq!(lifetime_secs(Duration::from_millis(1001)), 2);
        assert_eq!(lifetime_secs(Duration::from_secs(u64::MAX)), u32::MAX - 1);
    }
}
