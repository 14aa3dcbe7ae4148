//! The `zone.v1` gRPC API, generated from `proto/zone/v1/*.proto`.
//!
//! This crate holds no logic: messages, clients and servers as prost and
//! tonic generate them, plus the encoded descriptor set that `zoned` serves
//! through gRPC reflection so that `grpcurl` works without the .proto files.

#![allow(missing_debug_implementations, clippy::all)]

/// Package `zone.v1`.
pub mod v1 {
    tonic::include_proto!("zone.v1");
}

/// Encoded `FileDescriptorSet` of every `zone.v1` file.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("zone_descriptor");
