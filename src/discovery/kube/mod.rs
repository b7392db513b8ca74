//! Discovery from Kubernetes: an InferencePool and the Pods it selects (or a
//! plain label selector without the CRD), the optional InferenceObjective
//! priorities, and Lease-based leader election.
//!
//! # Algorithm
//!
//! One task owns all state and selects over two kube-runtime watchers (each
//! with `default_backoff()`):
//! - the InferencePool, by name (`fieldSelector=metadata.name=<pool>`), in
//!   pool mode; in selector mode the "pool" is fixed by [`TargetSettings`];
//! - the Pods of the namespace: all of them in pool mode, so a selector change
//!   takes effect at once without a new list; only the selected ones
//!   (server-side `labelSelector`) in selector mode.
//!
//! Each pod is reduced to a small [`PodView`] as it arrives; the endpoint set
//! is the pure function [`endpoints`] of (pool spec, pod views), recomputed
//! and published with `EndpointStore::replace` when an event could change it.
//! Publications are coalesced over a short window (`debounce`, 50 ms by
//! default) so a rollout's burst of pod updates is one publication; the first
//! one is never delayed. A set equal to the last published one is not
//! republished, so endpoint state (scrapes, prefix slots) is never churned
//! by no-op events.
//!
//! InferenceObjectives are watched in a second loop of the same task (module
//! `objectives`: the CRD is optional); leader election is a separate task
//! ([`LeaderElector`]).
//!
//! # Invariants
//!
//! - The store is first published only once the initial pool list and pod
//!   list are both complete and the pool exists, so readiness (`is_synced`)
//!   means "a complete view". A pool missing at start keeps the picker
//!   unready (as GIE's `PoolHasSynced`); a pool deleted later publishes an
//!   empty set (requests get 503) and the picker keeps running.
//! - A watcher relist (`Init`..`InitDone`) is buffered and swapped in whole
//!   (module `mirror`): during a relist, or while the API server is
//!   unreachable, the last known endpoints stay published. Errors never
//!   clear endpoints.
//! - An InferencePool whose spec is invalid keeps the last valid spec (the
//!   same rule as a bad endpoints file).
//! - Errors are counted per resource and logged once per failure streak (see
//!   [`DiscoveryStats`]).

mod leader;
mod mirror;
mod model;
mod policy;
mod stats;
mod watch;

use std::{sync::Arc, time::Duration};

pub use leader::{LeaderElectionConfig, LeaderElector, default_identity, lease_name};
pub use model::{
    ACTIVE_PORTS_ANNOTATION, AppProtocol, LLMD_ACTIVE_PORTS_ANNOTATION, LLMD_GROUP, ModelRewrite,
    Objective, POOL_GROUP_V1, Pod, PodView, PoolSpec, RewriteRule, X_K8S_GROUP, endpoints,
    model_rewrite_resources, objective_resource, objective_resources, parse_model_rewrite,
    parse_objective, parse_pool, parse_selector, pool_resource,
};
pub use policy::{ObjectiveSink, RewriteSink};
pub use stats::{DiscoveryStats, Observe, ObserveLayer, WatchedResource};
pub use watch::KubeDiscovery;

/// Errors of Kubernetes discovery and leader election.
///
/// A variant either shows its cause in its message or exposes it as
/// `source()`, never both, so that a printed chain (`anyhow`, or
/// [`crate::telemetry::logging::chain`] in logs) names each cause once.
/// The `String` variants carry our own messages, not flattened errors.
#[derive(Debug, thiserror::Error)]
pub enum KubeDiscoveryError {
    /// The settings do not describe one discovery source.
    #[error("{0}")]
    Config(String),
    #[error("invalid --endpoint-selector: {0}")]
    InvalidSelector(String),
    /// `--endpoint-target-ports` fails the pool spec's checks (the source).
    #[error("invalid --endpoint-target-ports")]
    InvalidTargetPorts(#[source] Box<KubeDiscoveryError>),
    #[error("invalid InferencePool: {0}")]
    InvalidPool(String),
    /// An InferencePool spec that does not have the shape of either API
    /// version.
    #[error("malformed InferencePool spec")]
    MalformedPool(#[source] serde_json::Error),
    #[error("invalid InferenceObjective {0}")]
    InvalidObjective(String),
    #[error("invalid InferenceModelRewrite {0}")]
    InvalidModelRewrite(String),
    #[error("Kubernetes client")]
    Kube(#[from] kube::Error),
    #[error("Kubernetes watch")]
    Watch(#[from] kube::runtime::watcher::Error),
    /// A kube watcher stream ended; they are infinite by construction, so
    /// this is a bug, reported rather than spun on.
    #[error("the {0} watch ended unexpectedly")]
    WatchEnded(&'static str),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// What to discover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An InferencePool of `group` (its API version follows from the group).
    Pool { name: String, group: String },
    /// Standalone: pods matching the selector, on fixed ports.
    Selector(PoolSpec),
}

/// What discovery needs to choose its [`Target`]: its own settings, so this
/// module does not depend on the command line. Each field carries one
/// flag's value as given, unvalidated; the error messages of
/// [`Target::from_settings`] name those flags, since that is what a user
/// has to fix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetSettings {
    /// `--pool-name`: the InferencePool to watch.
    pub pool_name: Option<String>,
    /// `--pool-group`: the API group of that InferencePool.
    pub pool_group: String,
    /// `--endpoint-selector`: standalone mode, a pod label selector.
    pub endpoint_selector: Option<String>,
    /// `--endpoint-target-ports`: standalone mode, the pods' ports.
    pub endpoint_target_ports: Vec<u16>,
}

impl Target {
    /// The target the settings select: `None` when neither a pool name nor
    /// an endpoint selector is given, an error when both are, or when the
    /// selector lacks target ports.
    pub fn from_settings(settings: &TargetSettings) -> Result<Option<Self>, KubeDiscoveryError> {
        match (&settings.pool_name, &settings.endpoint_selector) {
            (Some(_), Some(_)) => Err(KubeDiscoveryError::Config(
                "give either --pool-name or --endpoint-selector, not both".into(),
            )),
            (Some(name), None) => {
                if name.trim().is_empty() {
                    return Err(KubeDiscoveryError::Config("--pool-name is empty".into()));
                }
                Ok(Some(Self::Pool {
                    name: name.clone(),
                    group: settings.pool_group.clone(),
                }))
            }
            (None, Some(selector)) => {
                if settings.endpoint_target_ports.is_empty() {
                    return Err(KubeDiscoveryError::Config(
                        "--endpoint-selector needs --endpoint-target-ports".into(),
                    ));
                }
                let spec = PoolSpec::new(
                    parse_selector(selector)?,
                    settings.endpoint_target_ports.clone(),
                    AppProtocol::Http,
                )
                .map_err(|e| KubeDiscoveryError::InvalidTargetPorts(Box::new(e)))?;
                Ok(Some(Self::Selector(spec)))
            }
            (None, None) => Ok(None),
        }
    }

    /// The `<pool>` part of the leader Lease name: the pool name, or in
    /// standalone mode a digest of the selector and ports, so two standalone
    /// deployments in one namespace do not share a lease.
    pub fn lease_key(&self) -> String {
        match self {
            Self::Pool { name, .. } => name.clone(),
            Self::Selector(spec) => {
                let mut key = String::new();
                for (k, v) in &spec.selector {
                    key.push_str(&format!("{k}={v},"));
                }
                for p in &spec.target_ports {
                    key.push_str(&format!("{p},"));
                }
                format!(
                    "standalone-{:016x}",
                    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
                )
            }
        }
    }
}

/// How discovery runs.
#[derive(Debug, Clone)]
pub struct KubeDiscoveryOptions {
    pub namespace: String,
    pub target: Target,
    /// Window over which a burst of changes becomes one publication.
    pub debounce: Duration,
    /// How often to look again for an InferenceObjective or
    /// InferenceModelRewrite CRD that is not installed (or not readable).
    pub objectives_retry: Duration,
    /// The flags' KV-event settings, which pod annotations override.
    pub kv_events: crate::discovery::kv_events::KvEventsSettings,
}

impl KubeDiscoveryOptions {
    pub fn new(namespace: impl Into<String>, target: Target) -> Self {
        Self {
            namespace: namespace.into(),
            target,
            debounce: Duration::from_millis(50),
            objectives_retry: Duration::from_secs(300),
            kv_events: crate::discovery::kv_events::KvEventsSettings::default(),
        }
    }
}

/// A client from the ambient configuration (in-cluster service account, or
/// the local kubeconfig), with `stats`' layer so reconnections are observed.
pub async fn client(stats: &Arc<DiscoveryStats>) -> Result<kube::Client, KubeDiscoveryError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| KubeDiscoveryError::Kube(kube::Error::InferConfig(e)))?;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&stats.layer())
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::logging::chain;

    /// Settings as the flags give them when only `set` is passed.
    fn settings(set: impl FnOnce(&mut TargetSettings)) -> TargetSettings {
        let mut s = TargetSettings {
            pool_group: POOL_GROUP_V1.into(),
            ..TargetSettings::default()
        };
        set(&mut s);
        s
    }

    fn target(set: impl FnOnce(&mut TargetSettings)) -> Result<Option<Target>, KubeDiscoveryError> {
        Target::from_settings(&settings(set))
    }

    #[test]
    fn exactly_one_target() {
        assert!(target(|_| {}).unwrap().is_none());
        assert_eq!(
            target(|s| s.pool_name = Some("p".into())).unwrap(),
            Some(Target::Pool {
                name: "p".into(),
                group: POOL_GROUP_V1.into()
            })
        );
        let err = target(|s| s.pool_name = Some(" ".into())).unwrap_err();
        assert!(chain(&err).to_string().contains("empty"), "{err}");
        let err = target(|s| {
            s.pool_name = Some("p".into());
            s.endpoint_selector = Some("a=b".into());
        })
        .unwrap_err();
        assert!(chain(&err).to_string().contains("not both"), "{err}");
        let err = target(|s| s.endpoint_selector = Some("a=b".into())).unwrap_err();
        assert!(
            chain(&err).to_string().contains("--endpoint-target-ports"),
            "{err}"
        );
        let err = target(|s| {
            s.endpoint_selector = Some("a".into());
            s.endpoint_target_ports = vec![1];
        })
        .unwrap_err();
        assert!(chain(&err).to_string().contains("key=value"), "{err}");
        let err = target(|s| {
            s.endpoint_selector = Some("a=b".into());
            s.endpoint_target_ports = vec![8000, 8000];
        })
        .unwrap_err();
        let text = chain(&err).to_string();
        assert!(
            text.starts_with("invalid --endpoint-target-ports: ") && text.contains("listed twice"),
            "{text}"
        );
        let Some(Target::Selector(spec)) = target(|s| {
            s.endpoint_selector = Some("app=vllm".into());
            s.endpoint_target_ports = vec![8000, 8001];
        })
        .unwrap() else {
            panic!("selector target expected");
        };
        assert_eq!(spec.target_ports, vec![8000, 8001]);
    }
}
