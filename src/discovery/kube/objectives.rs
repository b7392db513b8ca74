//! InferenceObjective priorities (`inference.networking.x-k8s.io/v1alpha2`).
//!
//! The CRD is optional: GKE 1.34+ installs only the InferencePool CRD. So a
//! 404 (CRD not installed) or 403 (not readable by our service account) on
//! list/watch is not an error of the picker: it is logged once at info (403:
//! warn, since it is a misconfiguration), objectives fall back to those of
//! the config file, and the watch is tried again every `retry` (minutes, not
//! the watcher's seconds-scale backoff). Readiness never depends on it.
//! Other errors are ordinary watch errors: counted, logged once per streak,
//! retried with the watcher's backoff, last known priorities kept.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::StreamExt;
use kube::{
    Api, Client,
    core::DynamicObject,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use crate::telemetry::logging::chain;

use super::{
    ObjectiveSink,
    mirror::Mirror,
    model::{Objective, objective_resource, parse_objective},
    stats::{DiscoveryStats, WatchedResource},
};

/// Why the objective watch stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unavailable {
    /// 404: the CRD is not installed.
    Absent,
    /// 403: RBAC does not let us read it.
    Forbidden,
}

fn unavailable(error: &watcher::Error) -> Option<Unavailable> {
    let code = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return None,
    };
    match code {
        404 => Some(Unavailable::Absent),
        403 => Some(Unavailable::Forbidden),
        _ => None,
    }
}

/// Watches the objectives of `pool` until `shutdown`.
pub(super) async fn run(
    client: Client,
    namespace: String,
    pool: String,
    sink: ObjectiveSink,
    stats: Arc<DiscoveryStats>,
    retry: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api = Api::<DynamicObject>::namespaced_with(client, &namespace, &objective_resource());
    let mut pushed: HashMap<String, i32> = HashMap::new();
    let mut unavailable_since: Option<Unavailable> = None;
    loop {
        let mut events = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut mirror: Mirror<Objective> = Mirror::default();
        let reason = loop {
            let event = tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                event = events.next() => event,
            };
            match event {
                Some(Ok(event)) => {
                    stats.record_ok(WatchedResource::InferenceObjectives);
                    if unavailable_since.take().is_some() {
                        tracing::info!("InferenceObjective CRD is available; watching objectives");
                    }
                    let changed = mirror.apply(
                        event,
                        |obj| match parse_objective(obj) {
                            Ok(o) => Some(o),
                            Err(e) => {
                                tracing::warn!(error = %chain(&e), "InferenceObjective ignored");
                                None
                            }
                        },
                        |old, new| {
                            old.is_some_and(|o| o.pool == pool)
                                || new.is_some_and(|o| o.pool == pool)
                        },
                    );
                    if changed {
                        let ours: HashMap<String, i32> = mirror
                            .current
                            .iter()
                            .filter(|(_, o)| o.pool == pool)
                            .map(|(name, o)| (name.clone(), o.priority))
                            .collect();
                        if ours != pushed {
                            tracing::info!(
                                objectives = ours.len(),
                                "InferenceObjective priorities updated"
                            );
                            sink(ours.clone());
                            pushed = ours;
                        }
                    }
                }
                Some(Err(e)) => match unavailable(&e) {
                    Some(reason) => break reason,
                    None => stats.record_error(WatchedResource::InferenceObjectives, &e),
                },
                // Watchers never end; were one to, look again later.
                None => break Unavailable::Absent,
            }
        };
        drop(events);
        if unavailable_since != Some(reason) {
            match reason {
                Unavailable::Absent => tracing::info!(retry = ?retry,
                    "InferenceObjective CRD not installed; objective priorities come from the config file only"),
                Unavailable::Forbidden => tracing::warn!(retry = ?retry,
                    "not allowed to list InferenceObjectives (RBAC); objective priorities come from the config file only"),
            }
            unavailable_since = Some(reason);
        }
        if !pushed.is_empty() {
            // The objects are gone with their CRD (or out of our sight).
            pushed.clear();
            sink(HashMap::new());
        }
        tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return,
            () = tokio::time::sleep(retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    #[test]
    fn missing_and_forbidden_are_told_apart_from_errors() {
        let api = |code| kube::Error::Api(Box::new(Status::failure("x", "y").with_code(code)));
        assert_eq!(
            unavailable(&watcher::Error::InitialListFailed(api(404))),
            Some(Unavailable::Absent)
        );
        assert_eq!(
            unavailable(&watcher::Error::WatchStartFailed(api(403))),
            Some(Unavailable::Forbidden)
        );
        assert_eq!(
            unavailable(&watcher::Error::InitialListFailed(api(500))),
            None
        );
        assert_eq!(unavailable(&watcher::Error::NoResourceVersion), None);
    }
}
