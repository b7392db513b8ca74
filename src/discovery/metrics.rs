//! Discovery's metrics (`epp_discovery_*`, `epp_leader`), read when /metrics
//! is rendered. "Synced" follows where the endpoints come from: with
//! Kubernetes, [`DiscoveryStats`] (a complete view and connected watches);
//! with the endpoints file, the file was loaded. Errors and leadership follow
//! the Kubernetes stats whenever a client runs (discovery or leader
//! election); without leader election this replica always serves.

use std::sync::Arc;

use prometheus::{IntCounterVec, IntGauge, Opts, core::Collector};

use super::kube::{DiscoveryStats, WatchedResource};
use crate::{
    endpoints::EndpointStore,
    telemetry::{Computed, ComputedMetrics, sync_counter},
};

/// Where the endpoints come from.
#[derive(Debug)]
pub enum DiscoverySource {
    File(Arc<EndpointStore>),
    Kube,
}

#[derive(Debug)]
pub struct DiscoveryMetrics {
    source: DiscoverySource,
    kube: Option<Arc<DiscoveryStats>>,
    errors: IntCounterVec,
    synced: IntGauge,
    leader: IntGauge,
}

impl DiscoveryMetrics {
    /// `kube`: the stats of the Kubernetes client, when one runs.
    pub fn new(
        source: DiscoverySource,
        kube: Option<Arc<DiscoveryStats>>,
    ) -> Result<Computed<Self>, prometheus::Error> {
        Ok(Computed(Self {
            source,
            kube,
            errors: IntCounterVec::new(
                Opts::new(
                    "epp_discovery_errors_total",
                    "Failed Kubernetes API calls and watches of discovery and leader election, by resource.",
                ),
                &["resource"],
            )?,
            synced: IntGauge::new(
                "epp_discovery_synced",
                "1 when discovery has published a complete endpoint set and its watches are connected.",
            )?,
            leader: IntGauge::new(
                "epp_leader",
                "1 when this replica may serve: it holds the leader lease, or leader election is off.",
            )?,
        }))
    }
}

impl ComputedMetrics for DiscoveryMetrics {
    fn metrics(&self) -> Vec<&dyn Collector> {
        vec![&self.errors, &self.synced, &self.leader]
    }

    fn refresh(&self) {
        let kube = self.kube.as_deref();
        let synced = match &self.source {
            DiscoverySource::File(store) => store.is_synced(),
            DiscoverySource::Kube => kube.is_some_and(DiscoveryStats::is_synced),
        };
        self.synced.set(i64::from(synced));
        let leader = kube.and_then(DiscoveryStats::leader).unwrap_or(true);
        self.leader.set(i64::from(leader));
        if let Some(stats) = kube {
            for resource in WatchedResource::ALL {
                let counter = self.errors.with_label_values(&[resource.label()]);
                sync_counter(&counter, stats.errors(resource));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;

    use super::*;
    use crate::{endpoints::testing::store_with, telemetry::render};

    fn registry(source: DiscoverySource, kube: Option<Arc<DiscoveryStats>>) -> Registry {
        let r = Registry::new();
        r.register(Box::new(DiscoveryMetrics::new(source, kube).unwrap()))
            .unwrap();
        r
    }

    #[test]
    fn file_discovery_is_synced_once_loaded_and_always_serves() {
        let store = || Arc::new(store_with(&[1], &[]));
        let text = render(&registry(DiscoverySource::File(store()), None));
        assert!(text.contains("epp_discovery_synced 1"), "{text}");
        assert!(text.contains("epp_leader 1"), "{text}");
        assert!(!text.contains("epp_discovery_errors_total{"), "{text}");

        // With leader election beside the file: leadership from the lease.
        let stats = Arc::new(DiscoveryStats::default());
        stats.set_leader(false);
        let text = render(&registry(DiscoverySource::File(store()), Some(stats)));
        assert!(text.contains("epp_discovery_synced 1"), "{text}");
        assert!(text.contains("epp_leader 0"), "{text}");
    }

    #[test]
    fn kube_discovery_follows_the_stats() {
        let stats = Arc::new(DiscoveryStats::default());
        let r = registry(DiscoverySource::Kube, Some(Arc::clone(&stats)));
        stats.record_error(WatchedResource::Pods, &"down");
        stats.record_error(WatchedResource::Pods, &"down");
        stats.set_leader(false);
        let text = render(&r);
        for needle in [
            "epp_discovery_errors_total{resource=\"pods\"} 2",
            "epp_discovery_errors_total{resource=\"inferencepool\"} 0",
            "epp_discovery_synced 0",
            "epp_leader 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        stats.record_error(WatchedResource::Pods, &"down");
        assert!(render(&r).contains("epp_discovery_errors_total{resource=\"pods\"} 3"));
    }
}
