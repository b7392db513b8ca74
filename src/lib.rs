//! Endpoint picker (EPP) for the Gateway API Inference Extension.
//!
//! Request path: `extproc` (Envoy's ext_proc stream) -> `request` (parse the
//! OpenAI body) -> `scheduling` (filters, scorers, picker over an endpoint
//! snapshot, with the `prefix` index) -> back to `extproc`.
//! Data path: `discovery` (file or Kubernetes) -> `endpoints` (the store)
//! <- `scrape` (each endpoint's Prometheus metrics).
//! Around them: `telemetry` (our /metrics, logs), `admin` (gRPC health,
//! admin API, TLS), `config` (flags and the scheduler config file), `text`
//! (byte scanning shared by the two parsers), and `server`, which wires
//! everything together.

pub mod admin;
pub mod config;
pub mod director;
pub mod discovery;
pub mod endpoints;
pub mod extproc;
pub mod prefix;
pub mod request;
pub mod scheduling;
pub mod scrape;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod text;
