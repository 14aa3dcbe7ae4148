//! zone-sync's core: configuration files kept identical on every server of
//! a zone, the job `onezone serversync` does by hand over root SSH.
//!
//! - [`disk`]: the server's disk: atomic writes (`zone_files::atomic`),
//!   backups of replaced versions and drift detection, behind a trait with
//!   a real implementation rooted anywhere and one in memory;
//! - [`apply`]: one pass bringing this server's disk to a store revision,
//!   remembering what it wrote so that nothing is applied twice;
//! - [`roll`]: restarting the units of changed files one server at a
//!   time, followers first and the leader last;
//! - [`store`]: what zone-sync asks of the zone (the local zoned over
//!   gRPC, or a zone in memory for tests);
//! - [`daemon`]: a pass and a step of the roll, over any store, disk and
//!   units: what the binary runs, and what the unit tests drive.
//!
//! What a managed file is (keys, paths, templates) is the `zone-files`
//! crate's, shared with zoned and zonectl.
//!
//! The `zone-sync` binary watches the store through the local zoned and
//! calls the daemon's pass and roll step.

pub mod apply;
pub mod daemon;
pub mod disk;
pub mod roll;
pub mod store;
