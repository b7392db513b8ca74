//! gRPC health (grpc.health.v1) with the service names the gateway and the
//! kubelet probe:
//! - `liveness`: SERVING while the process runs;
//! - `""`, `readiness`, `envoy.service.ext_proc.v3.ExternalProcessor` and
//!   `inference-extension` (what GIE's chart probes): SERVING once discovery
//!   has synced, while this replica is the leader (when leader election is
//!   on), and until shutdown begins. With `--kv-events`, the first SERVING
//!   also waits for every endpoint's event stream to have connected once,
//!   at most `--kv-events-ready-timeout` after the sync
//!   (`kv_events::readiness` explains why once and why bounded).

use std::sync::Arc;

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{endpoints::EndpointStore, extproc::SERVICE_NAME, kv_events::readiness::StreamsGate};

/// Services that follow readiness.
pub const READINESS_SERVICES: &[&str] = &["", "readiness", SERVICE_NAME, "inference-extension"];

/// Inputs of readiness besides the store.
#[derive(Debug, Clone)]
pub struct ReadinessInputs {
    /// True while this replica may serve (always true without leader election).
    pub leader: watch::Receiver<bool>,
    /// True once shutdown has begun.
    pub shutdown: watch::Receiver<bool>,
    /// With KV events on: how long after the sync readiness may wait for
    /// the event streams to connect.
    pub kv_events_timeout: Option<std::time::Duration>,
}

/// Keeps the health statuses in line with the store, leadership and shutdown.
pub async fn readiness_loop(
    reporter: HealthReporter,
    store: Arc<EndpointStore>,
    mut inputs: ReadinessInputs,
) {
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    let mut changes = store.subscribe();
    let mut gate = inputs.kv_events_timeout.map(StreamsGate::new);
    let mut last = None;
    loop {
        let synced = store.is_synced();
        let streams = match &mut gate {
            Some(g) => g.check(synced, &store.snapshot(), std::time::Instant::now()),
            None => true,
        };
        let ready = synced && streams && *inputs.leader.borrow() && !*inputs.shutdown.borrow();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in READINESS_SERVICES {
                reporter.set_service_status(*service, status).await;
            }
            tracing::info!(ready, "readiness changed");
            last = Some(ready);
        }
        let recheck = gate.as_ref().and_then(StreamsGate::recheck_in);
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(recheck.unwrap_or_default()), if recheck.is_some() => {}
            r = inputs.leader.changed() => if r.is_err() { return },
            r = inputs.shutdown.changed() => if r.is_err() { return },
        }
    }
}
