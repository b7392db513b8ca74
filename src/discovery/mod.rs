//! Discovery: where the endpoint set comes from. Each source publishes the
//! complete set it currently sees into the endpoint store; nothing else
//! writes endpoints.
//!
//! - [`file`](mod@file): a YAML/JSON endpoints file, for running without Kubernetes;
//! - [`kube`]: an InferencePool and the Pods it selects (or a plain label
//!   selector without the CRD), InferenceObjective priorities, and Lease
//!   leader election.

pub mod file;
pub mod kube;
pub mod kv_events;
mod metrics;

pub use file::{FileDiscovery, FileError, parse_endpoints, parse_endpoints_with};
pub use kube::{KubeDiscovery, KubeDiscoveryError, KubeDiscoveryOptions};
pub use kv_events::{KvEventsOverride, KvEventsSettings};
pub use metrics::{DiscoveryMetrics, DiscoverySource};
