//! A server's side of an upgrade: installing a verified update bundle into
//! the root slot that is not running, with systemd-boot's boot counting,
//! and telling which slot runs and how each entry stands.
//!
//! The disk has two root partitions, `zoned-root-a` and `zoned-root-b`; the
//! running one is named by the kernel command line (`root=PARTLABEL=...`).
//! The EFI partition holds systemd-boot and one unified kernel image per
//! slot that may boot (`entries`).
//!
//! Installing (the order is the safety argument, see [`install`]):
//! 1. the whole bundle is verified against the keys this image trusts,
//!    reading it once and writing nothing;
//! 2. every entry of the target slot is removed from the EFI partition:
//!    from here on nothing boots that slot, so a power cut while it is
//!    written leaves a server that boots the running slot, as before;
//! 3. the root image is unpacked onto the target partition, hashed as it
//!    goes, synced, then read back and hashed again;
//! 4. only then is the slot's kernel image written, synced, and renamed to
//!    its entry name with three tries: the next boot tries it.
//!
//! Nothing here reboots, talks to the zone or decides when to upgrade:
//! zoned does (one server at a time, leader last).

pub mod entries;
pub mod install;
mod unzstd;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use entries::{Assessment, Entry};
pub use install::{install, Installed, Progress, Target};

/// A root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }

    pub fn from_name(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The slot's root partition label.
    pub fn partlabel(self) -> String {
        format!("zoned-root-{}", self.name())
    }

    /// The slot's partition device on a running appliance.
    pub fn device(self) -> PathBuf {
        Path::new("/dev/disk/by-partlabel").join(self.partlabel())
    }

    /// The slot a kernel command line mounts as root, if it names one.
    pub fn from_cmdline(cmdline: &str) -> Option<Slot> {
        cmdline.split_whitespace().find_map(|w| {
            let label = w.strip_prefix("root=PARTLABEL=")?;
            label.strip_prefix("zoned-root-").and_then(Slot::from_name)
        })
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an install or a status failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] zone_bundle::Error),
    #[error("{0}")]
    Refused(String),
    #[error("the root image written to {partition} reads back as sha256 {found}, not the bundle's {expected}: the disk did not keep what was written; slot {slot} stays unbootable")]
    ReadBack {
        partition: PathBuf,
        slot: Slot,
        expected: String,
        found: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// How this server boots: the running slot and every entry, in the
/// loader's order.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// None off the appliance (no `root=PARTLABEL=zoned-root-*`).
    pub running: Option<Slot>,
    /// os-release IMAGE_ID and IMAGE_VERSION of the running root.
    pub image: String,
    pub entries: Vec<Entry>,
}

impl Status {
    pub fn read(esp: &Path, cmdline: &str, os_release: &str) -> Result<Status, Error> {
        Ok(Status {
            running: Slot::from_cmdline(cmdline),
            image: zone_version::image_from(os_release),
            entries: entries::list(esp)?,
        })
    }

    /// The entry of the running slot.
    pub fn running_entry(&self) -> Option<&Entry> {
        let r = self.running?;
        self.entries.iter().find(|e| e.slot == r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_slot_comes_from_the_command_line() {
        assert_eq!(
            Slot::from_cmdline("root=PARTLABEL=zoned-root-b ro quiet"),
            Some(Slot::B)
        );
        assert_eq!(Slot::from_cmdline("root=/dev/vda2 ro"), None);
        assert_eq!(Slot::from_cmdline("root=PARTLABEL=zoned-root-c"), None);
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(
            Slot::B.device(),
            Path::new("/dev/disk/by-partlabel/zoned-root-b")
        );
    }
}
