//! The `zone.v1` gRPC API, generated from `proto/zone/v1/*.proto`.
//!
//! This crate holds no logic: messages, clients and servers as prost and
//! tonic generate them, the encoded descriptor set that `zoned` serves
//! through gRPC reflection so that `grpcurl` works without the .proto files,
//! and the clock the agent protocol states its times in ([`monotonic_ns`]).

#![allow(missing_debug_implementations, clippy::all)]

/// Package `zone.v1`.
pub mod v1 {
    tonic::include_proto!("zone.v1");
}

/// Encoded `FileDescriptorSet` of every `zone.v1` file.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("zone_descriptor");

/// CLOCK_MONOTONIC in nanoseconds: the clock the agent protocol's times
/// (`expires_monotonic_ns`) are in, shared by every process on the host,
/// so zoned's lease and zone-vip's deadlines compare directly.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
