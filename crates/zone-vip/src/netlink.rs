//! [`Addresses`] over rtnetlink: `ip address add/del`, without the `ip`
//! command. IPv6 VIPs are added with `nodad`: the address is ours by lease,
//! and duplicate detection would delay it by a second or more.

use std::io;

use futures::future::BoxFuture;
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::Handle;

use crate::config::Vip;
use crate::effects::Addresses;

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
}

impl Addresses for Netlink {
    fn add<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let index = self.index(&vip.interface).await?;
            let mut req = self
                .handle
                .address()
                .add(index, vip.address, vip.prefix)
                .replace();
            if vip.address.is_ipv6() {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(|e| io_err(format!("add {vip}"), e))
        })
    }

    fn remove<'a>(&'a self, vip: &'a Vip) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let index = match self.index(&vip.interface).await {
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
                .set_address_filter(vip.address)
                .set_prefix_length_filter(vip.prefix)
                .execute();
            while let Some(msg) = found
                .try_next()
                .await
                .map_err(|e| io_err(format!("list {vip}"), e))?
            {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| io_err(format!("remove {vip}"), e))?;
            }
            Ok(())
        })
    }
}
