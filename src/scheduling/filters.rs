//! Filters: remove candidates before scoring.
//!
//! - `header-based-testing-filter` (GIE conformance): keep only endpoints
//!   named in the `test-epp-endpoint-selection` request header, as `ip` or
//!   `ip:port`, comma-separated; without the header nothing is kept.
//! - `utilization-detector` used as a filter: drop saturated endpoints,
//!   keeping all when every one is saturated; `concurrency-detector`: drop
//!   endpoints at their in-flight limit (see `saturation`);
//!   `utilization-filter` (llm-d): caps on chosen load metrics.
//! - `prefix-cache-affinity-filter` (GIE): keep the endpoints whose prefix
//!   match is at least `affinityThreshold`, unless none is, or (with
//!   probability `explorationProbability`) to let other endpoints warm up.
//! - llm-d's label filters: `label-selector-filter` (a Kubernetes label
//!   selector), `by-label` and the role filters on `llm-d.ai/role`. Like
//!   llm-d's, they may remove every candidate; the request then fails with
//!   503 rather than going to a pod the operator excluded.

use serde::Deserialize;

use super::{
    Candidate, Cycle, Filter,
    saturation::{ConcurrencyDetector, UtilizationDetector},
};

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
pub struct UtilizationFilter(pub UtilizationDetector);

impl Filter for UtilizationFilter {
    fn filter(&self, _: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        if candidates.iter().any(|c| !self.0.is_over_headroom(c)) {
            candidates.retain(|c| !self.0.is_over_headroom(c));
        }
    }
}

#[derive(Debug)]
pub struct ConcurrencyFilter(pub ConcurrencyDetector);

impl Filter for ConcurrencyFilter {
    fn filter(&self, _: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        candidates.retain(|c| self.0.admits(c));
    }
}

/// llm-d's `utilization-filter`: keep the endpoints whose every listed
/// metric is at most its `maxValue`; with `fallbackOnEmpty`, keep all when
/// none passes. `active-requests` is this picker's in-flight count,
/// `waiting-queue` the scraped queue plus requests routed since the scrape.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UtilizationCapFilter {
    pub conditions: Vec<Cap>,
    #[serde(default)]
    pub fallback_on_empty: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cap {
    pub metric: CapMetric,
    pub max_value: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapMetric {
    ActiveRequests,
    RunningRequests,
    WaitingQueue,
    KvCacheUtilization,
}

impl UtilizationCapFilter {
    /// llm-d's checks: at least one condition, each with a maxValue >= 0
    /// (at most 1 for the KV-cache fraction).
    pub fn validate(&self) -> Result<(), String> {
        if self.conditions.is_empty() {
            return Err("utilization filter requires at least one condition".into());
        }
        for c in &self.conditions {
            match c.max_value {
                None => return Err(format!("condition for {:?} requires maxValue", c.metric)),
                Some(v) if v.is_nan() || v < 0.0 => {
                    return Err(format!("condition for {:?} needs maxValue >= 0", c.metric));
                }
                Some(v) if c.metric == CapMetric::KvCacheUtilization && v > 1.0 => {
                    return Err("kv-cache-utilization maxValue is a fraction, at most 1".into());
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn passes(&self, c: &Candidate<'_>) -> bool {
        self.conditions.iter().all(|cap| {
            let value = match cap.metric {
                CapMetric::ActiveRequests => f64::from(c.in_flight),
                CapMetric::RunningRequests => f64::from(c.running),
                CapMetric::WaitingQueue => f64::from(c.waiting),
                CapMetric::KvCacheUtilization => c.kv_usage,
            };
            value <= cap.max_value.unwrap_or(f64::INFINITY)
        })
    }
}

impl Filter for UtilizationCapFilter {
    fn filter(&self, _: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        if self.fallback_on_empty && !candidates.iter().any(|c| self.passes(c)) {
            return;
        }
        candidates.retain(|c| self.passes(c));
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
        let sticky = |c: &Candidate<'_>| {
            cycle.prefix_fraction(c, 1.0, super::precise::DEFAULT_OFFLOAD_WEIGHT)
                >= self.affinity_threshold
        };
        if candidates.iter().any(sticky) {
            candidates.retain(sticky);
        }
    }
}

/// llm-d's `label-selector-filter` (and its deprecated alias
/// `by-label-selector`): a Kubernetes `LabelSelector` on the endpoint's pod
/// labels. `matchLabels` must all be equal; each of `matchExpressions` must
/// hold (`In`, `NotIn`, `Exists`, `DoesNotExist`, as Kubernetes defines
/// them). An empty selector keeps every endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorFilter {
    #[serde(default)]
    pub match_labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<LabelRequirement>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: LabelOperator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelectorFilter {
    /// Kubernetes' validation: `In`/`NotIn` need values, the others none.
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.match_expressions {
            let needs_values = matches!(r.operator, LabelOperator::In | LabelOperator::NotIn);
            if needs_values == r.values.is_empty() {
                return Err(format!(
                    "matchExpressions key {:?}: operator {:?} {} values",
                    r.key,
                    r.operator,
                    if needs_values { "needs" } else { "takes no" }
                ));
            }
        }
        Ok(())
    }

    fn matches(&self, c: &Candidate<'_>) -> bool {
        let label = |k: &str| c.endpoint.label(k);
        self.match_labels
            .iter()
            .all(|(k, v)| label(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| {
                let value = label(&r.key);
                let listed = value.is_some_and(|v| r.values.iter().any(|w| w == v));
                match r.operator {
                    LabelOperator::In => listed,
                    LabelOperator::NotIn => !listed,
                    LabelOperator::Exists => value.is_some(),
                    LabelOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

impl Filter for LabelSelectorFilter {
    fn filter(&self, _: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        candidates.retain(|c| self.matches(c));
    }
}

/// The pod label llm-d's role filters read.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

/// llm-d's `by-label` filter (deprecated there, still registered): keep the
/// endpoints whose `label` has one of `validValues`, and those without the
/// label when `allowsNoLabel`. Also the role filters, which are fixed
/// instances of it on `llm-d.ai/role`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ByLabelFilter {
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub valid_values: Vec<String>,
    #[serde(default)]
    pub allows_no_label: bool,
}

impl ByLabelFilter {
    /// llm-d's factory checks.
    pub fn validate(&self) -> Result<(), String> {
        if self.label.is_empty() {
            return Err("'label' must be specified".into());
        }
        if self.valid_values.is_empty() && !self.allows_no_label {
            return Err(
                "either 'validValues' must be non-empty or 'allowsNoLabel' must be true".into(),
            );
        }
        Ok(())
    }

    /// `decode-filter`, `prefill-filter`, `encode-filter`: the roles each
    /// stage accepts (llm-d's `bylabel/roles.go`). Only decode keeps
    /// unlabelled pods, so a pool without roles still serves.
    pub fn role(plugin_type: &str) -> Option<Self> {
        let (values, allows_no_label): (&[&str], bool) = match plugin_type {
            "decode-filter" => (
                &["decode", "prefill-decode", "both", "encode-prefill-decode"],
                true,
            ),
            "prefill-filter" => (
                &[
                    "prefill",
                    "encode-prefill",
                    "prefill-decode",
                    "both",
                    "encode-prefill-decode",
                ],
                false,
            ),
            "encode-filter" => (
                &["encode", "encode-prefill", "encode-prefill-decode"],
                false,
            ),
            _ => return None,
        };
        Some(Self {
            label: ROLE_LABEL.to_owned(),
            valid_values: values.iter().map(|v| (*v).to_owned()).collect(),
            allows_no_label,
        })
    }
}

impl Filter for ByLabelFilter {
    fn filter(&self, _: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        candidates.retain(|c| match c.endpoint.label(&self.label) {
            Some(v) => self.valid_values.iter().any(|w| w == v),
            None => self.allows_no_label,
        });
    }
}
