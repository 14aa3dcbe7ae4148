//! Host figures a server reports about itself in the zone status: load,
//! memory (sysinfo) and the free space of the file system holding the data
//! directory (statvfs). Read on demand; nothing here is cached for long.

use std::path::Path;
use std::sync::Mutex;

use zone_proto::v1::HostFigures;

/// Reads host figures; keeps one sysinfo handle between calls. Figures
/// that cannot be read on this host are reported as 0.
#[derive(Debug)]
pub struct Host {
    system: Option<Mutex<sysinfo::System>>,
    /// The appliance image booted (read once: it changes with a reboot).
    image: String,
}

impl Default for Host {
    fn default() -> Self {
        let system = match sysinfo::System::new() {
            Ok(s) => Some(Mutex::new(s)),
            Err(e) => {
                tracing::warn!(error = %e, "host figures unavailable");
                None
            }
        };
        Host {
            system,
            image: zone_version::image(),
        }
    }
}

impl Host {
    /// os-release's IMAGE_ID and IMAGE_VERSION; empty off the appliance.
    pub fn image_version(&self) -> &str {
        &self.image
    }

    pub fn figures(&self, data_dir: &Path) -> HostFigures {
        let load1 = sysinfo::System::load_average().map_or(0.0, |l| l.one);
        let (memory_total_bytes, memory_available_bytes) =
            match self.system.as_ref().map(|s| s.lock()) {
                Some(Ok(mut sys)) => {
                    sys.refresh_memory();
                    (sys.total_memory(), sys.available_memory())
                }
                _ => (0, 0),
            };
        let (disk_total_bytes, disk_free_bytes) = match nix::sys::statvfs::statvfs(data_dir) {
            Ok(st) => {
                let frag = st.fragment_size();
                (st.blocks() * frag, st.blocks_available() * frag)
            }
            Err(_) => (0, 0),
        };
        HostFigures {
            load1,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_total_bytes,
            memory_available_bytes,
            disk_total_bytes,
            disk_free_bytes,
            software_checksums: !crate::storage::hardware_checksums(),
        }
    }
}
