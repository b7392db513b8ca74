//! Filters: remove candidates before scoring.
//!
//! - `header-based-testing-filter` (GIE conformance): keep only endpoints
//!   named in the `test-epp-endpoint-selection` request header, as `ip` or
//!   `ip:port`, comma-separated; without the header nothing is kept.
//! - `utilization-detector` used as a filter: drop saturated endpoints,
//!   keeping all when every one is saturated.
//! - `prefix-cache-affinity-filter` (GIE): keep the endpoints whose prefix
//!   match is at least `affinityThreshold`, unless none is, or (with
//!   probability `explorationProbability`) to let other endpoints warm up.

use serde::Deserialize;

use super::{Candidate, Cycle, Filter, SaturationDetector};

#[derive(Debug, Default)]
pub struct HeaderBasedTestingFilter;

impl Filter for HeaderBasedTestingFilter {
    fn filter(&self, cycle: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        let wanted = cycle.facts.test_selection.unwrap_or("");
        candidates.retain(|c| {
            let host_port = &*c.endpoint.host_port;
            let ip = host_port
                .rsplit_once(':')
                .map_or(host_port, |(ip, _)| ip)
                .trim_start_matches('[')
                .trim_end_matches(']');
            wanted
                .split(',')
                .map(str::trim)
                .any(|w| !w.is_empty() && (w == host_port || w == ip))
        });
    }
}

#[derive(Debug)]
pub struct UtilizationFilter(pub SaturationDetector);

impl Filter for UtilizationFilter {
    fn filter(&self, _: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        if candidates.iter().any(|c| !self.0.is_saturated(c)) {
            candidates.retain(|c| !self.0.is_saturated(c));
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefixAffinityFilter {
    #[serde(default = "default_affinity")]
    pub affinity_threshold: f64,
    #[serde(default)]
    pub exploration_probability: f64,
}

fn default_affinity() -> f64 {
    0.8
}

impl Default for PrefixAffinityFilter {
    fn default() -> Self {
        Self {
            affinity_threshold: default_affinity(),
            exploration_probability: 0.0,
        }
    }
}

impl Filter for PrefixAffinityFilter {
    fn filter(&self, cycle: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        if candidates.len() <= 1 || cycle.prompt_blocks == 0 {
            return;
        }
        if self.exploration_probability > 0.0 && fastrand::f64() < self.exploration_probability {
            return;
        }
        let total = f64::from(cycle.prompt_blocks);
        let sticky =
            |c: &Candidate<'_>| f64::from(c.prefix_blocks) / total >= self.affinity_threshold;
        if candidates.iter().any(sticky) {
            candidates.retain(sticky);
        }
    }
}
