//! Endpoint picker (EPP) for the Gateway API Inference Extension.
//!
//! Request path: `extproc` (Envoy's ext_proc stream) -> `director` (parse
//! the OpenAI body with `request`, schedule with `scheduling` over an
//! endpoint snapshot and the `prefix` index) -> back to `extproc` with a
//! destination and a request ticket that lives until the response ends.
//! Data path: `discovery` (file or Kubernetes) -> `endpoints` (the store)
//! <- `scrape` (each endpoint's Prometheus metrics).
//! Around them: `telemetry` (our metrics registry and request-path metrics,
//! the /metrics server, logs), `admin` (gRPC health, admin API), `listener`
//! (binding, accepting, TLS), `config` (flags and the scheduler config
//! file), `text` (byte scanning shared by the parsers), and `server`, which
//! wires everything together. `flow_control` (GIE's `flowControl` gate)
//! queues requests between parsing and scheduling while the pool is saturated.

pub mod admin;
pub mod config;
pub mod director;
pub mod discovery;
pub mod endpoints;
pub mod extproc;
pub mod flow_control;
pub mod kv_events;
pub mod listener;
pub mod prefix;
pub mod request;
pub mod scheduling;
pub mod scrape;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod tokenize;
