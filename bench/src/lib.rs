//! Benchmarking tools for the endpoint picker: a vLLM simulator ([`sim`]), a
//! load generator ([`load`]) and a report writer ([`report`]).
//!
//! Both binaries are thin wrappers over this library so tests can run pods and
//! workloads in-process.

pub mod load;
pub mod perf;
pub mod prom;
pub mod report;
pub mod sim;
pub mod soak;
pub mod stack;
