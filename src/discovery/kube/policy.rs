//! The pool's optional policy objects: InferenceObjective priorities and
//! InferenceModelRewrite rules, each watched in GIE v1.5's group
//! (`inference.networking.x-k8s.io/v1alpha2`) and in llm-d-router's
//! (`llm-d.ai`, `v1` or else `v1alpha2`).
//!
//! Every one of these CRDs is optional: GKE 1.34+ installs only the
//! InferencePool CRD, and a cluster has GIE's, llm-d's, both or neither. So
//! for each kind and group one loop tries the group's versions newest first;
//! a 404 (CRD not installed) or 403 (not readable by our service account)
//! on every version is not an error of the picker: it is logged once at
//! info (403: warn, since it is a misconfiguration), that group contributes
//! nothing, and the versions are tried again every `retry` (minutes, not the
//! watcher's seconds-scale backoff), so a CRD installed after startup is
//! picked up. Readiness never depends on them. Other errors are ordinary
//! watch errors: counted, logged once per streak, retried with the watcher's
//! backoff, last known objects kept.
//!
//! Invariants: only objects whose pool refs name our pool count; the sinks
//! get the merged view of both groups (an objective named in both takes
//! llm-d.ai's priority, the newer API) and are called only when it changed.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt, future::OptionFuture};
use kube::{
    Api, Client,
    core::DynamicObject,
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{
    KubeDiscoveryError,
    mirror::Mirror,
    model::{
        ModelRewrite, Objective, RewriteRule, VersionedResource, model_rewrite_resources,
        objective_resources, parse_model_rewrite, parse_objective, rewrite_rules_for,
    },
    stats::{DiscoveryStats, WatchedResource},
};
use crate::telemetry::logging::chain;

/// Receives the priorities of the InferenceObjectives of our pool (name ->
/// priority), replacing the previous map; `Director::set_dynamic_objectives`
/// in the server.
pub type ObjectiveSink = Arc<dyn Fn(HashMap<String, i32>) + Send + Sync>;

/// Receives the InferenceModelRewrite rules of our pool, in the order they
/// apply (see [`rewrite_rules_for`]), replacing the previous list.
pub type RewriteSink = Arc<dyn Fn(Vec<RewriteRule>) + Send + Sync>;

/// Why a group's resource is not watched.
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

/// Where the loops report to.
#[derive(Clone, Default)]
pub(super) struct PolicySinks {
    pub objectives: Option<ObjectiveSink>,
    pub rewrites: Option<RewriteSink>,
}

/// What every loop shares.
#[derive(Clone)]
pub(super) struct PolicyWatch {
    pub client: Client,
    pub namespace: String,
    pub pool: String,
    pub stats: Arc<DiscoveryStats>,
    pub retry: Duration,
}

/// Watches the policy objects of the pool until `shutdown`.
pub(super) async fn run(w: PolicyWatch, sinks: PolicySinks, shutdown: watch::Receiver<bool>) {
    let objectives = sinks.objectives.map(|sink| {
        watch_merged(
            &w,
            objective_resources(),
            parse_objective,
            WatchedResource::InferenceObjectives,
            &shutdown,
            |all: &[Named<Objective>], pool: &str| -> HashMap<String, i32> {
                // Later slots (llm-d.ai) win on a name both groups define.
                all.iter()
                    .flatten()
                    .filter(|(_, o)| o.is_for(pool))
                    .map(|(name, o)| (name.clone(), o.priority))
                    .collect()
            },
            move |map| {
                tracing::info!(
                    objectives = map.len(),
                    "InferenceObjective priorities updated"
                );
                sink(map);
            },
        )
    });
    let rewrites = sinks.rewrites.map(|sink| {
        watch_merged(
            &w,
            model_rewrite_resources(),
            parse_model_rewrite,
            WatchedResource::InferenceModelRewrites,
            &shutdown,
            |all: &[Named<ModelRewrite>], pool: &str| {
                let objects: Vec<&ModelRewrite> = all.iter().flatten().map(|(_, r)| r).collect();
                rewrite_rules_for(pool, &objects)
            },
            move |rules| {
                tracing::info!(rules = rules.len(), "InferenceModelRewrite rules updated");
                sink(rules);
            },
        )
    });
    futures_util::future::join(OptionFuture::from(objectives), OptionFuture::from(rewrites)).await;
}

/// One loop per group of `resources`, their objects merged into one view
/// that `push` receives whenever it changes.
fn watch_merged<T, V>(
    w: &PolicyWatch,
    resources: Vec<VersionedResource>,
    parse: fn(&DynamicObject) -> Result<T, KubeDiscoveryError>,
    stat: WatchedResource,
    shutdown: &watch::Receiver<bool>,
    merge: impl Fn(&[Named<T>], &str) -> V + Send + Sync + 'static,
    push: impl Fn(V) + Send + Sync + 'static,
) -> impl Future<Output = ()>
where
    T: Clone + PartialEq + Send + 'static,
    V: PartialEq + Clone + Default + Send + 'static,
{
    let merged = Arc::new(Merged::new(resources.len(), merge));
    let push = Arc::new(push);
    let loops = resources.into_iter().enumerate().map(|(slot, res)| {
        let merged = Arc::clone(&merged);
        let push = Arc::clone(&push);
        watch_one(
            w.clone(),
            res,
            parse,
            stat,
            shutdown.clone(),
            move |objects, pool| {
                if let Some(view) = merged.set(slot, objects, pool) {
                    push(view);
                }
            },
        )
    });
    futures_util::future::join_all(loops).map(|_| ())
}

/// The objects each group's loop last saw, and the view merged from them
/// that was last pushed (at first the empty view, which the receiver
/// already assumes, so an empty view is never pushed first).
struct Merged<T, V, F> {
    state: Mutex<(Vec<Named<T>>, V)>,
    merge: F,
}

/// One group's objects, by name.
type Named<T> = Vec<(String, T)>;

impl<T, V, F> Merged<T, V, F>
where
    V: PartialEq + Clone + Default,
    F: Fn(&[Named<T>], &str) -> V,
{
    fn new(slots: usize, merge: F) -> Self {
        Self {
            state: Mutex::new(((0..slots).map(|_| Vec::new()).collect(), V::default())),
            merge,
        }
    }

    /// Replaces `slot`'s objects; the merged view, when it differs from the
    /// last one pushed.
    fn set(&self, slot: usize, objects: Named<T>, pool: &str) -> Option<V> {
        let mut state = self.state.lock();
        let (slots, pushed) = &mut *state;
        if let Some(s) = slots.get_mut(slot) {
            *s = objects;
        }
        let view = (self.merge)(slots, pool);
        if *pushed == view {
            return None;
        }
        *pushed = view.clone();
        Some(view)
    }
}

/// Watches one kind in one group (trying its versions newest first) and
/// calls `publish` with every object it parsed, whenever they change; with
/// nothing when the group is unavailable.
async fn watch_one<T, P>(
    w: PolicyWatch,
    res: VersionedResource,
    parse: fn(&DynamicObject) -> Result<T, KubeDiscoveryError>,
    stat: WatchedResource,
    mut shutdown: watch::Receiver<bool>,
    mut publish: P,
) where
    T: Clone + PartialEq,
    P: FnMut(Vec<(String, T)>, &str),
{
    let Some(group) = res.candidates.first().map(|r| r.group.clone()) else {
        return;
    };
    let kind = res.kind;
    let mut unavailable_since: Option<Unavailable> = None;
    let mut published = false;
    loop {
        let mut reason = Unavailable::Absent;
        for api_resource in &res.candidates {
            let api =
                Api::<DynamicObject>::namespaced_with(w.client.clone(), &w.namespace, api_resource);
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            let mut mirror: Mirror<T> = Mirror::default();
            reason = loop {
                let event = tokio::select! {
                    _ = crate::shutdown::requested(&mut shutdown) => return,
                    event = events.next() => event,
                };
                match event {
                    Some(Ok(event)) => {
                        w.stats.record_ok(stat);
                        if unavailable_since.take().is_some() {
                            tracing::info!(kind, api_version = %api_resource.api_version,
                                "CRD is available; watching it");
                        }
                        let changed = mirror.apply(
                            event,
                            |obj| match parse(obj) {
                                Ok(o) => Some(o),
                                Err(e) => {
                                    tracing::warn!(kind, error = %chain(&e), "object ignored");
                                    None
                                }
                            },
                            |_, _| true,
                        );
                        if changed {
                            let mut objects: Vec<(String, T)> = mirror
                                .current
                                .iter()
                                .map(|(name, o)| (name.clone(), o.clone()))
                                .collect();
                            objects.sort_by(|a, b| a.0.cmp(&b.0));
                            publish(objects, &w.pool);
                            published = true;
                        }
                    }
                    Some(Err(e)) => match unavailable(&e) {
                        Some(reason) => break reason,
                        None => w.stats.record_error(stat, &e),
                    },
                    // Watchers never end; were one to, look again later.
                    None => break Unavailable::Absent,
                }
            };
            if reason == Unavailable::Forbidden {
                // Another version will not be more readable.
                break;
            }
        }
        if unavailable_since != Some(reason) {
            match reason {
                Unavailable::Absent => tracing::info!(kind, group = %group, retry = ?w.retry,
                    "CRD not installed in this group; looking again later"),
                Unavailable::Forbidden => tracing::warn!(kind, group = %group, retry = ?w.retry,
                    "not allowed to list these objects (RBAC); looking again later"),
            }
            unavailable_since = Some(reason);
        }
        if published {
            // The objects are gone with their CRD (or out of our sight).
            published = false;
            publish(Vec::new(), &w.pool);
        }
        tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return,
            () = tokio::time::sleep(w.retry) => {}
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

    #[test]
    fn merged_views_prefer_the_later_group_and_push_only_changes() {
        let merged = Merged::new(2, |all: &[Vec<(String, i32)>], _pool: &str| {
            let map: HashMap<String, i32> = all.iter().flatten().cloned().collect();
            map
        });
        assert!(
            merged.set(0, Vec::new(), "p").is_none(),
            "nothing to say yet"
        );
        let map = merged.set(0, vec![("a".into(), 1)], "p").unwrap();
        assert_eq!(map, HashMap::from([("a".into(), 1)]));
        let map = merged.set(1, vec![("a".into(), 5)], "p").unwrap();
        assert_eq!(map["a"], 5, "the later group wins");
        assert!(
            merged.set(1, vec![("a".into(), 5)], "p").is_none(),
            "unchanged"
        );
        let map = merged.set(1, Vec::new(), "p").unwrap();
        assert_eq!(map["a"], 1);
    }
}
