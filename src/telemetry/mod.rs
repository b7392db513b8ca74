//! Telemetry: the picker's Prometheus registry and request-path metrics,
//! their HTTP endpoint, and logs. A leaf: it knows nothing of the subsystems
//! that find endpoints, scrape them or schedule requests; they export their
//! own metrics through [`ComputedMetrics`]. Also who may read /metrics
//! (`metrics_auth`) and OpenTelemetry traces (`traces`).

mod http;
pub mod log_limit;
pub mod logging;
mod metrics;
pub mod metrics_auth;
pub mod traces;

pub use http::serve_metrics;
pub use metrics::{
    BoundedLabels, Computed, ComputedMetrics, MAX_MODEL_LABELS, OVERFLOW_LABEL, RequestMetrics,
    TelemetryError, register, register_build_info, render, size_buckets, sync_counter,
};
