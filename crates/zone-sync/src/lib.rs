//! zone-sync's core: configuration files kept identical on every server of
//! a zone, the job `onezone serversync` does by hand over root SSH.
//!
//! - [`paths`]: which paths may be managed (under the managed roots, in
//!   normal form, never through a symbolic link on disk);
//! - [`template`]: the per-node parts of a cluster-wide file (`{{id0}}`
//!   for OpenNebula's `SERVER_ID`, per-node blocks);
//! - [`disk`]: atomic writes (temp file, fsync, rename, directory fsync),
//!   backups of replaced versions and drift detection, behind a trait with
//!   a real implementation rooted anywhere and one in memory;
//! - [`apply`]: one pass bringing this server's disk to a store revision,
//!   remembering what it wrote so that nothing is applied twice;
//! - [`roll`]: restarting the units of changed files one server at a
//!   time, followers first and the leader last;
//! - [`keys`]: where managed files live in the store.
//!
//! The `zone-sync` binary watches the store through the local zoned, runs
//! passes and takes its turn in the roll.

pub mod apply;
pub mod disk;
pub mod keys;
pub mod paths;
pub mod roll;
pub mod template;
