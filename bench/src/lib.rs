//! Benchmarking tools for the endpoint picker: a vLLM simulator ([`sim`]),
//! a load generator ([`load`]), the local stack of simulated pods, picker
//! and Envoy ([`stack`]), performance measurements ([`perf`]), a soak
//! ([`soak`]) and a report writer ([`report`]).
//!
//! The binaries are thin wrappers over this library, so tests can run pods
//! and workloads in-process. Each `epp-bench` subcommand's flags and run
//! logic sit in the module it drives: the workloads in [`load::cli`],
//! `report` in [`report::cli`], `compare` in [`compare`], `local` in
//! [`stack::cli`], `perf` in [`perf::cli`] and `soak` in [`soak::cli`].

pub mod compare;
pub mod load;
pub mod perf;
pub mod prom;
pub mod report;
pub mod sim;
pub mod soak;
pub mod stack;
