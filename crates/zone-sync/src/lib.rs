//! zone-sync's core: configuration files kept identical on every server of
//! a zone, the job `onezone serversync` does by hand over root SSH.
//!
//! - [`paths`]: which paths may be managed (under the managed roots, in
//!   normal form, never through a symbolic link on disk);
//! - [`template`]: the per-node parts of a cluster-wide file (`{{id0}}`
//!   for OpenNebula's `SERVER_ID`, per-node blocks);
//! - [`disk`]: atomic writes (temp file, fsync, rename, directory fsync),
//!   backups of replaced versions and drift detection, behind a trait with
//!   a real implementation rooted anywhere and one in memory.
//!
//! Nothing here talks to zoned or systemd: the process that watches the
//! store and rolls unit restarts is built on these.

pub mod disk;
pub mod paths;
pub mod template;
