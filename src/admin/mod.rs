//! The plaintext admin port: gRPC health (what the kubelet and the gateway
//! probe), the `epp.admin.v1.Admin` API (what the picker sees, and why it
//! would route a request where it would) and gRPC reflection.

pub mod health;
mod service;

pub use service::AdminService;

/// Generated code of `proto/epp/admin/v1/admin.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("epp.admin.v1");

    /// Encoded descriptors of the admin API, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));
}
