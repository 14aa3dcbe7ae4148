//! [`Addresses`] over rtnetlink, through [`zone_addr::Netlink`]: the VIP
//! is added and renewed with a kernel lifetime that covers the lease.

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
}
