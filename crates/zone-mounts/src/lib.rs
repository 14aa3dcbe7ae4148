//! zone-mounts: the shared-storage mount supervisor of one server.
//!
//! It follows the zone's datastore declarations from the local zoned (a
//! linearizable range, then a watch, over the agent socket), mounts each on
//! this server, probes it every interval, and reports every datastore's
//! state to zoned every couple of seconds (`Agent.ReportStorage`), which
//! shows it in `Cluster.Status` and weighs it in leadership.
//!
//! What it must never do is block on a storage server. Every operation that
//! touches a mounted file system (mount, probe, unmount) runs in a child
//! process ([`child`]: this same binary, `zone-mounts helper ...`) with a
//! deadline; a child that misses it is killed and, if the kernel holds it in
//! uninterruptible sleep on a dead NFS server, abandoned: the datastore is
//! `hung` and no second child is started for it until the first has
//! finished. The supervisor itself only reads `/proc/self/mountinfo`, which
//! never waits on a server. A child process rather than a thread: a thread
//! stuck in the kernel would keep the whole supervisor from exiting, and
//! systemd from restarting it.
//!
//! - [`effects`]: mount, unmount, probe and "is it mounted", behind
//!   [`effects::Mounts`] (the real one runs children; tests use one in
//!   memory);
//! - [`child`]: what the helper child does, with nix's `mount(2)`;
//! - [`mountinfo`]: this mount namespace's mounts;
//! - [`supervisor`]: one task per datastore, the health table, removals;
//! - [`follow`]: the declarations and the reports, over the agent socket.

pub mod child;
pub mod effects;
pub mod follow;
pub mod mountinfo;
pub mod supervisor;
