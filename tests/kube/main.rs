//! Kubernetes discovery, leader election and /metrics authentication
//! against a fake API server (see `fake.rs`). No cluster is needed: the kube client talks to an in-process
//! `tower_test` mock.
//!
//! Every test runs on a paused tokio clock, so backoffs, the debounce window,
//! lease durations and retry periods take no real time and tests are
//! deterministic. Waits are on the store's change channel or the leader
//! channel where one exists; other conditions are polled on the paused clock.
//! Every wait is bounded (in virtual time, which a stuck test burns through
//! at once), so a failing test fails within seconds.

// Test code: a failed unwrap is a failed test (clippy.toml allows it in
// #[test] functions; this extends it to the helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod discovery;
mod fake;
mod faults;
mod leader;
mod metrics_auth;

use std::{future::Future, sync::Arc, time::Duration};

use epp::endpoints::EndpointStore;
use serde_json::{Value, json};

/// Longest virtual time a condition may take.
pub const WAIT: Duration = Duration::from_secs(600);

/// A pod with the Ready condition `ready`.
pub fn pod(name: &str, ip: &str, ready: bool, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "labels": labels},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

/// A v1 InferencePool.
pub fn pool(name: &str, selector: Value, ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|p| json!({"number": p})).collect();
    json!({
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": selector},
            "targetPorts": ports,
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    })
}

/// `name@host:port` of every endpoint, sorted.
pub fn endpoint_list(store: &EndpointStore) -> Vec<String> {
    let mut v: Vec<String> = store
        .snapshot()
        .endpoints()
        .iter()
        .map(|e| format!("{}@{}", e.name(), e.host_port))
        .collect();
    v.sort();
    v
}

/// Waits until `cond` holds for the store, re-checking on every publication.
pub async fn wait_store(
    store: &Arc<EndpointStore>,
    what: &str,
    cond: impl Fn(&EndpointStore) -> bool,
) {
    let mut changes = store.subscribe();
    let waited = tokio::time::timeout(WAIT, async {
        while !cond(store) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        waited.is_ok() && cond(store),
        "timed out waiting for {what}; endpoints: {:?}",
        endpoint_list(store)
    );
}

/// Waits until the store holds exactly `want` (as `endpoint_list` prints it).
pub async fn wait_endpoints(store: &Arc<EndpointStore>, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    wait_store(store, &format!("endpoints {want:?}"), |s| {
        s.is_synced() && endpoint_list(s) == want
    })
    .await;
}

/// Polls `cond` on the paused clock (for state with no change channel).
pub async fn poll_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let waited = tokio::time::timeout(WAIT, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}
