//! The plaintext admin port (gRPC health, the Admin API, reflection) and the
//! TLS setup of the ext_proc port.

pub mod health;
mod service;
pub mod tls;

pub use service::AdminService;

/// Generated code of `proto/epp/admin/v1/admin.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("epp.admin.v1");

    /// Encoded descriptors of the admin API, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));
}
