//! Health of the Kubernetes watches, as counters `discovery::DiscoveryMetrics`
//! exports (the same pattern as `scrape::ScrapeStats`) and as transition logs.
//!
//! Each watched resource is in one of three states: not yet contacted,
//! healthy, or failing. Errors are counted every time, but logged at `warn`
//! only on the healthy -> failing transition (later errors of the same streak
//! go to `debug`), and the failing -> healthy transition is logged once at
//! `info`. So a disconnected API server produces one warning and one recovery
//! line, not one line per retry.
//!
//! A kube watcher that reconnects successfully emits no event (it resumes
//! from its resourceVersion), so "healthy again" cannot be learned from the
//! event stream alone. [`ObserveLayer`] sits in the client's tower stack and
//! marks a resource healthy whenever a GET (list or watch) for it returns 2xx.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use http::{Method, Request, Response};

/// What discovery talks to the API server about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchedResource {
    InferencePool,
    Pods,
    InferenceObjectives,
    InferenceModelRewrites,
    Lease,
}

impl WatchedResource {
    pub const ALL: [Self; 5] = [
        Self::InferencePool,
        Self::Pods,
        Self::InferenceObjectives,
        Self::InferenceModelRewrites,
        Self::Lease,
    ];

    /// The `resource` label value of the discovery metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::InferencePool => "inferencepool",
            Self::Pods => "pods",
            Self::InferenceObjectives => "inferenceobjectives",
            Self::InferenceModelRewrites => "inferencemodelrewrites",
            Self::Lease => "lease",
        }
    }

    /// The resource a request path is about, from its plural segment
    /// (`/api/v1/namespaces/ns/pods`, `/apis/g/v/namespaces/ns/leases/name`).
    pub fn from_path(path: &str) -> Option<Self> {
        let mut segments = path.split('/').skip_while(|s| *s != "namespaces").skip(2);
        match segments.next()? {
            "inferencepools" => Some(Self::InferencePool),
            "pods" => Some(Self::Pods),
            "inferenceobjectives" => Some(Self::InferenceObjectives),
            "inferencemodelrewrites" => Some(Self::InferenceModelRewrites),
            "leases" => Some(Self::Lease),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

// The state 0 (the `AtomicU8` default) means "not contacted yet".
const HEALTHY: u8 = 1;
const FAILING: u8 = 2;

/// Counters and gauges of Kubernetes discovery, exported by
/// `discovery::DiscoveryMetrics` at render time.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    errors: [AtomicU64; 5],
    health: [AtomicU8; 5],
    /// Whether the InferencePool watch is part of the required set (false in
    /// standalone selector mode).
    pool_mode: AtomicBool,
    /// The first complete endpoint set has been published.
    synced: AtomicBool,
    /// Set when leader election is enabled.
    leader_election: AtomicBool,
    leader: AtomicBool,
}

impl DiscoveryStats {
    /// Errors seen for `resource` since start.
    pub fn errors(&self, resource: WatchedResource) -> u64 {
        self.errors[resource.index()].load(Ordering::Relaxed)
    }

    /// True while the last contact with the API server about `resource`
    /// succeeded.
    pub fn is_healthy(&self, resource: WatchedResource) -> bool {
        self.health[resource.index()].load(Ordering::Relaxed) == HEALTHY
    }

    /// The `epp_discovery_synced` gauge: discovery published a complete view
    /// and every watch it depends on is currently connected. Unlike readiness
    /// (which stays true on a disconnect, serving the last known set), this
    /// drops to false while the API server is unreachable.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
            && self.is_healthy(WatchedResource::Pods)
            && (!self.pool_mode.load(Ordering::Relaxed)
                || self.is_healthy(WatchedResource::InferencePool))
    }

    /// `None` when leader election is off, else whether this replica leads.
    pub fn leader(&self) -> Option<bool> {
        self.leader_election
            .load(Ordering::Relaxed)
            .then(|| self.leader.load(Ordering::Relaxed))
    }

    pub(crate) fn set_pool_mode(&self, on: bool) {
        self.pool_mode.store(on, Ordering::Relaxed);
    }

    pub(crate) fn set_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader_election.store(true, Ordering::Relaxed);
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Records a failed API call or watch; logs only the first of a streak.
    /// `error` is shown as given: kube's errors already name their cause in
    /// their message, ours expose it as `source()` only, so pass those as
    /// `&chain(&e)`.
    pub(crate) fn record_error(&self, resource: WatchedResource, error: &dyn std::fmt::Display) {
        self.errors[resource.index()].fetch_add(1, Ordering::Relaxed);
        let before = self.health[resource.index()].swap(FAILING, Ordering::Relaxed);
        if before == FAILING {
            tracing::debug!(resource = resource.label(), %error, "Kubernetes API call failed again");
        } else {
            tracing::warn!(resource = resource.label(), %error,
                "Kubernetes API call failed; keeping the last known state and retrying with backoff");
        }
    }

    /// Records a successful API call or watch event.
    pub(crate) fn record_ok(&self, resource: WatchedResource) {
        let before = self.health[resource.index()].swap(HEALTHY, Ordering::Relaxed);
        if before == FAILING {
            tracing::info!(
                resource = resource.label(),
                "Kubernetes API connection recovered"
            );
        }
    }

    /// A tower layer for the kube client that marks resources healthy on
    /// every successful GET.
    pub fn layer(self: &Arc<Self>) -> ObserveLayer {
        ObserveLayer {
            stats: Arc::clone(self),
        }
    }
}

/// See [`DiscoveryStats::layer`].
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    stats: Arc<DiscoveryStats>,
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            stats: Arc::clone(&self.stats),
        }
    }
}

/// The service [`ObserveLayer`] wraps around the client's transport.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    stats: Arc<DiscoveryStats>,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for Observe<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let resource = if req.method() == Method::GET {
            WatchedResource::from_path(req.uri().path())
        } else {
            None
        };
        let response = self.inner.call(req);
        let stats = Arc::clone(&self.stats);
        Box::pin(async move {
            let response = response.await?;
            if let Some(resource) = resource
                && response.status().is_success()
            {
                stats.record_ok(resource);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_resource() {
        use WatchedResource::*;
        for (path, want) in [
            ("/api/v1/namespaces/ns/pods", Some(Pods)),
            (
                "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools",
                Some(InferencePool),
            ),
            (
                "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/ns/inferenceobjectives",
                Some(InferenceObjectives),
            ),
            (
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/epp-ns-pool",
                Some(Lease),
            ),
            ("/api/v1/namespaces/pods/configmaps", None),
            ("/api/v1/pods", None),
            ("/version", None),
        ] {
            assert_eq!(WatchedResource::from_path(path), want, "{path}");
        }
    }

    #[test]
    fn health_transitions_and_sync_gauge() {
        let s = DiscoveryStats::default();
        s.set_pool_mode(true);
        assert!(!s.is_synced());
        s.record_ok(WatchedResource::Pods);
        s.record_ok(WatchedResource::InferencePool);
        assert!(!s.is_synced(), "not before the first publication");
        s.set_synced();
        assert!(s.is_synced());
        s.record_error(WatchedResource::InferencePool, &"boom");
        s.record_error(WatchedResource::InferencePool, &"boom");
        assert_eq!(s.errors(WatchedResource::InferencePool), 2);
        assert!(!s.is_synced());
        s.record_ok(WatchedResource::InferencePool);
        assert!(s.is_synced());
        s.set_pool_mode(false);
        s.record_error(WatchedResource::InferencePool, &"boom");
        assert!(
            s.is_synced(),
            "the pool watch does not count in selector mode"
        );
        assert_eq!(s.leader(), None);
        s.set_leader(true);
        assert_eq!(s.leader(), Some(true));
    }
}
