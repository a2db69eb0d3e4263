//! Generated protobuf and gRPC code. Nothing else lives here.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The SPIFFE Workload API. The standard proto has no package, so prost names the file `_`.
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Tessera's own APIs (`tessera.v1`).
pub mod tessera {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/tessera.v1.rs"));
    }
}

/// Encoded `FileDescriptorSet` of every proto above, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tessera_descriptor.bin"));
