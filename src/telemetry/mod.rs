//! Telemetry: the picker's Prometheus metrics, their HTTP endpoint, and logs.

mod http;
pub mod log_limit;
pub mod logging;
mod metrics;

pub use http::serve_metrics;
pub use metrics::{BoundedLabels, MAX_MODEL_LABELS, Metrics, OVERFLOW_LABEL, TelemetryError};
