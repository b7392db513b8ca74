//! The discovery task: pool and pod watchers -> endpoint set (see the module
//! header of `discovery::kube` for the algorithm and its invariants).

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::BoxStream};
use kube::{
    Api, Client,
    core::DynamicObject,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use tokio::{sync::watch, time::Instant};

use super::{
    KubeDiscoveryError, KubeDiscoveryOptions, ObjectiveSink, RewriteSink, Target,
    mirror::Mirror,
    model::{Pod, PodView, PoolSpec, endpoints, parse_pool, pool_resource},
    policy::{self, PolicySinks, PolicyWatch},
    stats::{DiscoveryStats, WatchedResource},
};
use crate::{
    discovery::kv_events::KvEventsSettings,
    endpoints::{EndpointSpec, EndpointStore},
    telemetry::logging::chain,
};

type EventStream<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// Watches the pool and its pods and keeps the endpoint store in line.
pub struct KubeDiscovery {
    client: Client,
    options: KubeDiscoveryOptions,
    store: Arc<EndpointStore>,
    stats: Arc<DiscoveryStats>,
    policy: PolicySinks,
}

impl std::fmt::Debug for KubeDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDiscovery")
            .field("options", &self.options)
            .field("objectives", &self.policy.objectives.is_some())
            .field("rewrites", &self.policy.rewrites.is_some())
            .finish_non_exhaustive()
    }
}

impl KubeDiscovery {
    /// `client` should carry `stats.layer()` (see [`super::client`]) so that
    /// reconnections show in the stats.
    pub fn new(
        client: Client,
        options: KubeDiscoveryOptions,
        store: Arc<EndpointStore>,
        stats: Arc<DiscoveryStats>,
    ) -> Self {
        stats.set_pool_mode(matches!(options.target, Target::Pool { .. }));
        Self {
            client,
            options,
            store,
            stats,
            policy: PolicySinks::default(),
        }
    }

    /// Also watch InferenceObjectives of the pool and hand their priorities
    /// to `sink` (pool mode only; standalone mode has no objectives, as in GIE).
    pub fn with_objectives(mut self, sink: ObjectiveSink) -> Self {
        self.policy.objectives = Some(sink);
        self
    }

    /// Also watch InferenceModelRewrites of the pool and hand their rules to
    /// `sink` (pool mode only).
    pub fn with_rewrites(mut self, sink: RewriteSink) -> Self {
        self.policy.rewrites = Some(sink);
        self
    }

    /// Runs until `shutdown` turns true. Returns an error only if a watcher
    /// stream ends, which kube-runtime watchers never do.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), KubeDiscoveryError> {
        let policy = match &self.options.target {
            Target::Pool { name, .. }
                if self.policy.objectives.is_some() || self.policy.rewrites.is_some() =>
            {
                Some(policy::run(
                    PolicyWatch {
                        client: self.client.clone(),
                        namespace: self.options.namespace.clone(),
                        pool: name.clone(),
                        stats: Arc::clone(&self.stats),
                        retry: self.options.objectives_retry,
                    },
                    self.policy.clone(),
                    shutdown.clone(),
                ))
            }
            _ => None,
        };
        let endpoints = self.run_endpoints(shutdown);
        match policy {
            // Both loops end on shutdown; an error of the endpoint loop is
            // reported at once rather than when the policy loops end.
            Some(policy) => tokio::select! {
                result = endpoints => result,
                () = policy => Ok(()),
            },
            None => endpoints.await,
        }
    }

    async fn run_endpoints(
        &self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), KubeDiscoveryError> {
        let ns = self.options.namespace.as_str();
        let (mut pool_events, mut pool, pod_config) = match &self.options.target {
            Target::Pool { name, group } => {
                let api = Api::<DynamicObject>::namespaced_with(
                    self.client.clone(),
                    ns,
                    &pool_resource(group),
                );
                let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
                let events: EventStream<DynamicObject> =
                    watcher::watcher(api, config).default_backoff().boxed();
                tracing::info!(namespace = ns, pool = %name, group = %group, "watching the InferencePool and its pods");
                (
                    Some(events),
                    PoolTracker::watched(name.clone()),
                    watcher::Config::default(),
                )
            }
            Target::Selector(spec) => {
                let selector = spec
                    .selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                tracing::info!(namespace = ns, selector = %selector, ports = ?spec.target_ports,
                    "watching pods by label selector (standalone, no InferencePool)");
                (
                    None,
                    PoolTracker::fixed(spec.clone()),
                    watcher::Config::default().labels(&selector),
                )
            }
        };
        let mut pod_events: EventStream<Pod> =
            watcher::watcher(Api::<Pod>::namespaced(self.client.clone(), ns), pod_config)
                .default_backoff()
                .boxed();
        let mut pods: Mirror<PodView> = Mirror::default();
        let mut publisher = Publisher::new(
            Arc::clone(&self.store),
            Arc::clone(&self.stats),
            self.options.debounce,
        );
        publisher.kv_events = self.options.kv_events.clone();

        loop {
            let deadline = publisher.pending;
            let dirty = tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return Ok(()),
                event = next_or_pending(&mut pool_events) => {
                    match event.ok_or(KubeDiscoveryError::WatchEnded("InferencePool"))? {
                        Ok(event) => {
                            self.stats.record_ok(WatchedResource::InferencePool);
                            pool.apply(event)
                        }
                        Err(e) => {
                            self.stats.record_error(WatchedResource::InferencePool, &e);
                            false
                        }
                    }
                }
                event = pod_events.next() => {
                    match event.ok_or(KubeDiscoveryError::WatchEnded("pods"))? {
                        Ok(event) => {
                            self.stats.record_ok(WatchedResource::Pods);
                            let spec = pool.spec.as_ref();
                            pods.apply(event, |pod| Some(PodView::from_pod(pod)), |old, new| {
                                spec.is_some_and(|s| {
                                    old.is_some_and(|p| p.serves(s)) || new.is_some_and(|p| p.serves(s))
                                })
                            })
                        }
                        Err(e) => {
                            self.stats.record_error(WatchedResource::Pods, &e);
                            false
                        }
                    }
                }
                () = sleep_until(deadline) => {
                    publisher.publish(&pool, &pods);
                    false
                }
            };
            if dirty {
                publisher.schedule(&pool, &pods);
            }
        }
    }
}

async fn next_or_pending<K>(
    events: &mut Option<EventStream<K>>,
) -> Option<Result<Event<K>, watcher::Error>> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The pool as discovery knows it.
#[derive(Debug)]
struct PoolTracker {
    /// `None` in selector mode (the spec is fixed).
    name: Option<String>,
    /// The current valid spec; `None` while the pool does not exist.
    spec: Option<PoolSpec>,
    /// The initial list completed.
    listed: bool,
    /// During a relist: what the list showed so far (`Some(None)`: nothing).
    relist: Option<Option<PoolSpec>>,
}

impl PoolTracker {
    fn watched(name: String) -> Self {
        Self {
            name: Some(name),
            spec: None,
            listed: false,
            relist: None,
        }
    }

    fn fixed(spec: PoolSpec) -> Self {
        Self {
            name: None,
            spec: Some(spec),
            listed: true,
            relist: None,
        }
    }

    /// Applies a pool event; true when the spec changed (or the first list
    /// completed).
    fn apply(&mut self, event: Event<DynamicObject>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(None);
                false
            }
            Event::InitApply(obj) => {
                if self.is_ours(&obj) {
                    let spec = self.parse_or_keep(&obj);
                    self.relist = Some(spec);
                }
                false
            }
            Event::InitDone => {
                let seen = self.relist.take().flatten();
                let first = !self.listed;
                self.listed = true;
                self.set(seen) || first
            }
            Event::Apply(obj) => {
                if !self.is_ours(&obj) {
                    return false;
                }
                let spec = self.parse_or_keep(&obj);
                self.set(spec)
            }
            Event::Delete(obj) => self.is_ours(&obj) && self.set(None),
        }
    }

    fn is_ours(&self, obj: &DynamicObject) -> bool {
        obj.metadata.name.is_some() && obj.metadata.name == self.name
    }

    /// The object's spec, or the last valid one when it is invalid.
    fn parse_or_keep(&self, obj: &DynamicObject) -> Option<PoolSpec> {
        match parse_pool(obj) {
            Ok(spec) => Some(spec),
            Err(e) => {
                tracing::error!(pool = ?self.name, error = %chain(&e),
                    "InferencePool is invalid; keeping the last valid spec");
                self.spec.clone()
            }
        }
    }

    fn set(&mut self, spec: Option<PoolSpec>) -> bool {
        if spec == self.spec {
            return false;
        }
        match (&self.spec, &spec) {
            (_, Some(new)) => tracing::info!(pool = ?self.name, selector = ?new.selector,
                target_ports = ?new.target_ports, app_protocol = ?new.app_protocol, "InferencePool spec applied"),
            (Some(_), None) => tracing::warn!(pool = ?self.name,
                "InferencePool deleted; no endpoints until it is recreated"),
            (None, None) => {}
        }
        self.spec = spec;
        true
    }
}

/// Publishes endpoint sets into the store, coalescing bursts.
struct Publisher {
    store: Arc<EndpointStore>,
    stats: Arc<DiscoveryStats>,
    debounce: Duration,
    /// When the next publication is due, if one is.
    pending: Option<Instant>,
    /// What was last published (`None`: nothing yet).
    published: Option<Vec<EndpointSpec>>,
    /// The "pool not found" warning was given.
    warned_missing: bool,
    /// The flags' event settings, resolved per pod.
    kv_events: KvEventsSettings,
}

impl Publisher {
    fn new(store: Arc<EndpointStore>, stats: Arc<DiscoveryStats>, debounce: Duration) -> Self {
        Self {
            store,
            stats,
            debounce,
            pending: None,
            published: None,
            warned_missing: false,
            kv_events: KvEventsSettings::default(),
        }
    }

    /// Something changed: publish now if this is the first complete view,
    /// else within the debounce window.
    fn schedule(&mut self, pool: &PoolTracker, pods: &Mirror<PodView>) {
        if !pool.listed || !pods.listed {
            return;
        }
        if self.published.is_none() {
            if pool.spec.is_none() {
                if !self.warned_missing {
                    tracing::warn!(pool = ?pool.name,
                        "InferencePool not found; not ready until it exists");
                    self.warned_missing = true;
                }
                return;
            }
            self.publish(pool, pods);
        } else if self.pending.is_none() {
            self.pending = Some(Instant::now() + self.debounce);
        }
    }

    fn publish(&mut self, pool: &PoolTracker, pods: &Mirror<PodView>) {
        self.pending = None;
        let specs = match &pool.spec {
            Some(spec) => endpoints(spec, pods.current.values(), &self.kv_events),
            None => Vec::new(),
        };
        if self.published.as_ref() == Some(&specs) {
            return;
        }
        let count = specs.len();
        match self.store.replace(specs.clone()) {
            Ok(()) => {
                let before = self.published.as_ref().map(Vec::len);
                if before != Some(count) {
                    tracing::info!(endpoints = count, previously = ?before, "endpoints updated");
                } else {
                    tracing::debug!(endpoints = count, "endpoints updated");
                }
                self.published = Some(specs);
                self.stats.set_synced();
            }
            Err(e) => {
                tracing::error!(error = %e, "endpoint set rejected; keeping the last published one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::discovery::kube::model::tests::{dynamic, pod_json};

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn pool_obj(name: &str, port: u16) -> DynamicObject {
        dynamic(json!({"metadata": {"name": name}, "spec": {
            "selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": port}]}}))
    }

    fn always(_: Option<&PodView>, _: Option<&PodView>) -> bool {
        true
    }

    #[test]
    fn pool_tracker_follows_the_pool_and_keeps_the_last_valid_spec() {
        let mut t = PoolTracker::watched("p".into());
        t.apply(Event::Init);
        assert!(
            t.apply(Event::InitDone),
            "the first list completes even without a pool"
        );
        assert!(t.listed && t.spec.is_none());
        assert!(t.apply(Event::Apply(pool_obj("p", 8000))));
        assert_eq!(t.spec.as_ref().unwrap().target_ports, vec![8000]);
        assert!(
            !t.apply(Event::Apply(pool_obj("other", 9000))),
            "not our pool"
        );
        let invalid = dynamic(json!({"metadata": {"name": "p"}, "spec": {"targetPorts": []}}));
        assert!(!t.apply(Event::Apply(invalid)));
        assert_eq!(t.spec.as_ref().unwrap().target_ports, vec![8000]);
        assert!(t.apply(Event::Apply(pool_obj("p", 8001))));
        // A relist that no longer shows the pool means it was deleted meanwhile.
        t.apply(Event::Init);
        assert!(t.apply(Event::InitDone));
        assert!(t.spec.is_none());
        t.apply(Event::Init);
        t.apply(Event::InitApply(pool_obj("p", 8002)));
        assert!(t.spec.is_none(), "not before InitDone");
        assert!(t.apply(Event::InitDone));
        assert!(t.apply(Event::Delete(pool_obj("p", 8002))));
        assert!(t.spec.is_none());
    }

    #[tokio::test]
    async fn first_publication_waits_for_both_lists_and_the_pool() {
        let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
        let stats = Arc::new(DiscoveryStats::default());
        let mut p = Publisher::new(
            Arc::clone(&store),
            Arc::clone(&stats),
            Duration::from_millis(50),
        );
        let mut pool = PoolTracker::watched("p".into());
        let mut pods: Mirror<PodView> = Mirror::default();
        let project = |p: &Pod| Some(PodView::from_pod(p));
        pods.apply(Event::<Pod>::Init, project, always);
        pods.apply(
            Event::InitApply(pod(pod_json("a", "10.0.0.1", true, json!({"app": "vllm"})))),
            project,
            always,
        );
        pods.apply(Event::<Pod>::InitDone, project, always);
        p.schedule(&pool, &pods);
        assert!(!store.is_synced(), "pool not listed yet");
        pool.apply(Event::Init);
        pool.apply(Event::InitDone);
        p.schedule(&pool, &pods);
        assert!(!store.is_synced(), "pool absent");
        pool.apply(Event::Apply(pool_obj("p", 8000)));
        p.schedule(&pool, &pods);
        assert!(store.is_synced(), "published at once, not debounced");
        assert!(p.pending.is_none());
        assert_eq!(store.snapshot().len(), 1);
        assert!(
            !stats.is_synced(),
            "the gauge also needs the watches to have reported healthy"
        );

        pool.apply(Event::Delete(pool_obj("p", 8000)));
        p.schedule(&pool, &pods);
        assert!(p.pending.is_some(), "later changes are coalesced");
        let generation = store.snapshot().generation();
        p.publish(&pool, &pods);
        assert!(
            store.snapshot().is_empty(),
            "a deleted pool has no endpoints"
        );
        p.publish(&pool, &pods);
        assert_eq!(
            store.snapshot().generation(),
            generation + 1,
            "no-op publications are skipped"
        );
    }
}
