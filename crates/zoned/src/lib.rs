//! `zoned`, the Zoned control daemon: a replicated key-value store with
//! revisions and watches, kept by tikv raft-rs over RocksDB and served over
//! gRPC.
//!
//! Layers, each behind its own module so it can be tested alone:
//! - [`config`]: the node's TOML configuration and its validation;
//! - [`storage`]: RocksDB column families and raft-rs `Storage`;
//! - [`kv`]: the deterministic state machine and consistent reads;
//! - [`node`]: the Raft driver (the one Ready loop), its handle, and what it
//!   tracks: proposals, reads, the lease, membership;
//! - [`transport`]: Raft messages between servers over gRPC;
//! - [`peer`]: the peer port's gRPC service (inbound Raft, forwarded requests);
//! - [`api`]: the client gRPC services, and what every request does;
//! - [`agent`]: the leader lease for local agents, on a unix socket;
//! - [`tls`]: who may call what, on which port; [`join`]: a new server's
//!   certificate for its join token; [`renew`]: certificates renewed;
//! - [`server`]: wiring and clean shutdown; [`recovery`]: a zone restored
//!   from a backup, or forced onto the survivor of a quorum loss;
//! - [`coalesce`]: one socket write per connection per scheduler round;
//! - [`metrics`]: Prometheus metrics on HTTP;
//! - [`host`]: host figures for the zone status; [`health`]: the gRPC
//!   health status, worked out from the Raft state.
//!
//! Safety rules kept here: a write is acknowledged only once committed,
//! applied and written; reads are linearizable unless asked otherwise; bad
//! input is refused before it reaches the log.

pub mod agent;
pub mod api;
pub mod coalesce;
pub mod config;
pub mod health;
pub mod host;
pub mod join;
pub mod kv;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod recovery;
pub mod renew;
pub mod server;
pub mod space;
pub mod storage;
pub mod tls;
pub mod transport;
