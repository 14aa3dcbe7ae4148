//! zone-sync's core: configuration files kept identical on every server of
//! a zone, the job `onezone serversync` does by hand over root SSH.
//!
//! - [`disk`]: the server's disk: atomic writes (`zone_files::atomic`),
//!   backups of replaced versions and drift detection, behind a trait with
//!   a real implementation rooted anywhere and one in memory;
//! - [`apply`]: one pass bringing this server's disk to a store revision,
//!   remembering what it wrote so that nothing is applied twice;
//! - [`roll`]: restarting the units of changed files one server at a
//!   time, followers first and the leader last.
//!
//! What a managed file is (keys, paths, templates) is the `zone-files`
//! crate's, shared with zoned and zonectl.
//!
//! The `zone-sync` binary watches the store through the local zoned, runs
//! passes and takes its turn in the roll.

pub mod apply;
pub mod disk;
pub mod roll;
