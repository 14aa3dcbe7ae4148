//! [`Addresses`] over rtnetlink, through [`zone_addr::Netlink`]: the VIP
//! is added and renewed with a kernel lifetime that covers the lease; its
//! TCP connections are reset over sock_diag before a planned removal.

use std::io;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::Vip;
use crate::effects::Addresses;

pub use zone_addr::Netlink;

impl Addresses for Netlink {
    fn add<'a>(&'a self, vip: &'a Vip, lifetime: Duration) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(Netlink::add(self, vip, Some(lifetime)))
    }

    fn remove<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(Netlink::remove(self, vip))
    }

    fn reset_connections(&self, vip: &Vip) -> io::Result<usize> {
        zone_addr::connections::reset_tcp(vip.address)
    }
}
