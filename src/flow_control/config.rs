//! The `flowControl` section of the picker config, in GIE's shape
//! (`apix/config/v1alpha1` `FlowControlConfig`), so GIE configs carry over:
//!
//! ```yaml
//! featureGates: [flowControl]
//! flowControl:
//!   maxBytes: 0              # global bound on queued body bytes; 0 = none
//!   maxRequests: 0           # global bound on queued requests; 0 = none
//!   defaultRequestTTL: 30s   # 0 or absent = wait until the client leaves
//!   defaultPriorityBand: {maxBytes: ..., maxRequests: ..., ...}
//!   priorityBands:
//!   - priority: 10
//!     maxBytes: 1000000000   # per band; GIE's default is 1 GB
//!     maxRequests: 0
//!     fairnessPolicyRef: global-strict-fairness-policy
//!     orderingPolicyRef: fcfs-ordering-policy
//! ```
//!
//! Policy references name either a plugin declared under `plugins:` (whose
//! type is one of the policies) or the policy type itself, as GIE registers
//! each policy type under its own name by default.
//!
//! Flow control is on only when `featureGates` lists `flowControl`, as in
//! GIE; a `flowControl` section without the gate is ignored with a warning.
//!
//! Ours, documented as such: `maxFlows` (fairness ids tracked at once; the
//! ids beyond share one overflow flow, so a client inventing ids cannot
//! create unbounded state; default 1024) and `gatewayMaxMessageTimeout`
//! (the `max_message_timeout` of the gateway's ext_proc filter: while a
//! request waits, the picker asks the gateway, once, to extend its per-message
//! timeout up to this; 0 or absent = never ask), and a band's
//! `dispatchHeadroom` (the head of that band may still be dispatched while
//! the pool's saturation is below `1 + dispatchHeadroom`: capacity held back
//! from lower bands so a critical request finds room at once instead of
//! waiting for the next request to finish; default 0, GIE's behaviour; a
//! negative value stops that band short of saturation, which reserves
//! capacity for the bands above in finer steps than `maxConcurrency` allows
//! on a small pool), and `leastServedHeadStart` (how many requests behind
//! the flow served last a flow starts under least-served fairness when its
//! queue was empty: a tenant sending below its fair rate goes ahead of a
//! backlogged one for this many queued requests; larger favours such
//! tenants more and lets a flow returning from idle jump more requests;
//! default [`DEFAULT_HEAD_START`]).

use std::time::Duration;

use serde::Deserialize;

use crate::config::{EndpointPickerConfig, parse_duration};

/// The feature gate GIE uses to turn flow control on.
pub const FEATURE_GATE: &str = "flowControl";

/// GIE's default per-band byte bound (1 GB).
const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
const DEFAULT_MAX_FLOWS: usize = 1024;
/// `leastServedHeadStart` when not set.
pub const DEFAULT_HEAD_START: u64 = 4;

pub const GLOBAL_STRICT: &str = "global-strict-fairness-policy";
pub const ROUND_ROBIN: &str = "round-robin-fairness-policy";
/// Ours: see [`Fairness::LeastServed`].
pub const LEAST_SERVED: &str = "least-served-fairness-policy";
pub const FCFS: &str = "fcfs-ordering-policy";
pub const EDF: &str = "edf-ordering-policy";

/// How a band chooses between its flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fairness {
    /// The best head across all flows of the band, by the ordering policy:
    /// flows do not matter for the order (GIE's default).
    #[default]
    GlobalStrict,
    /// One request per non-empty flow in turn.
    RoundRobin,
    /// Ours: the flow with the fewest requests dispatched from any band
    /// goes first, so what a tenant gets in higher bands counts against
    /// its share in this one (max-min fairness across bands, which round
    /// robin within each band does not give).
    LeastServed,
}

/// How requests of one flow are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Arrival order (GIE's default).
    #[default]
    Fcfs,
    /// Earliest deadline (arrival + TTL) first; requests without one last.
    Edf,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandSettings {
    /// 0 = unbounded.
    pub max_bytes: u64,
    /// 0 = unbounded.
    pub max_requests: u64,
    pub fairness: Fairness,
    pub ordering: Ordering,
    /// Ours: saturation above 1 up to which this band is still dispatched.
    pub dispatch_headroom: f64,
}

impl Default for BandSettings {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_BAND_MAX_BYTES,
            max_requests: 0,
            fairness: Fairness::default(),
            ordering: Ordering::default(),
            dispatch_headroom: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlowControlSettings {
    /// 0 = unbounded.
    pub max_bytes: u64,
    /// 0 = unbounded.
    pub max_requests: u64,
    /// `None`: a request waits until dispatched or its client leaves.
    pub default_ttl: Option<Duration>,
    /// Template for priorities no band names.
    pub default_band: BandSettings,
    /// Configured bands, highest priority first.
    pub bands: Vec<(i32, BandSettings)>,
    pub max_flows: usize,
    pub gateway_max_message_timeout: Option<Duration>,
    /// `leastServedHeadStart`, in requests.
    pub least_served_head_start: u64,
}

impl Default for FlowControlSettings {
    fn default() -> Self {
        Self {
            max_bytes: 0,
            max_requests: 0,
            default_ttl: None,
            default_band: BandSettings::default(),
            bands: Vec::new(),
            max_flows: DEFAULT_MAX_FLOWS,
            gateway_max_message_timeout: None,
            least_served_head_start: DEFAULT_HEAD_START,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlowControlConfigError {
    #[error("flowControl: {0}")]
    Syntax(String),
    #[error("flowControl: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("flowControl: priority {0} has two bands")]
    DuplicateBand(i32),
    #[error(
        "flowControl: {field} {reference:?} names neither a declared plugin nor a policy type ({known})"
    )]
    UnknownPolicy {
        field: &'static str,
        reference: String,
        known: &'static str,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    max_bytes: Option<i64>,
    max_requests: Option<i64>,
    #[serde(rename = "defaultRequestTTL")]
    default_request_ttl: Option<String>,
    default_priority_band: Option<RawBand>,
    #[serde(default)]
    priority_bands: Vec<RawBand>,
    max_flows: Option<usize>,
    gateway_max_message_timeout: Option<String>,
    least_served_head_start: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBand {
    #[serde(default)]
    priority: i32,
    max_bytes: Option<i64>,
    max_requests: Option<i64>,
    #[serde(default)]
    fairness_policy_ref: String,
    #[serde(default)]
    ordering_policy_ref: String,
    dispatch_headroom: Option<f64>,
}

impl FlowControlSettings {
    /// The settings when the config turns flow control on, `None` when it is
    /// off (no `flowControl` feature gate).
    pub fn from_config(cfg: &EndpointPickerConfig) -> Result<Option<Self>, FlowControlConfigError> {
        let gated = cfg.feature_gates.iter().any(|g| g == FEATURE_GATE);
        if !gated {
            if cfg.flow_control.is_some() {
                tracing::warn!(
                    "flowControl section ignored: featureGates does not list {FEATURE_GATE}"
                );
            }
            return Ok(None);
        }
        let raw: RawConfig = match &cfg.flow_control {
            None | Some(serde_json::Value::Null) => RawConfig::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| FlowControlConfigError::Syntax(e.to_string()))?,
        };
        let resolve = |field: &'static str, reference: &str| -> Result<String, _> {
            resolve_policy(cfg, field, reference)
        };
        let default_band = match &raw.default_priority_band {
            Some(b) => band(b, &BandSettings::default(), &resolve)?,
            None => BandSettings::default(),
        };
        let mut bands: Vec<(i32, BandSettings)> = Vec::with_capacity(raw.priority_bands.len());
        for b in &raw.priority_bands {
            if bands.iter().any(|(p, _)| *p == b.priority) {
                return Err(FlowControlConfigError::DuplicateBand(b.priority));
            }
            // GIE: a named band falls back to the system defaults, not to
            // the template for unnamed priorities.
            bands.push((b.priority, band(b, &BandSettings::default(), &resolve)?));
        }
        bands.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
        let default_ttl = duration("defaultRequestTTL", raw.default_request_ttl.as_deref())?;
        let gateway_max_message_timeout = duration(
            "gatewayMaxMessageTimeout",
            raw.gateway_max_message_timeout.as_deref(),
        )?;
        if let (Some(ttl), Some(max)) = (default_ttl, gateway_max_message_timeout)
            && ttl >= max
        {
            tracing::warn!(
                ?ttl,
                gateway_max_message_timeout = ?max,
                "flowControl: defaultRequestTTL is not below gatewayMaxMessageTimeout; the gateway may time a waiting request out first"
            );
        }
        let max_flows = raw.max_flows.unwrap_or(DEFAULT_MAX_FLOWS);
        if max_flows == 0 {
            return Err(FlowControlConfigError::Invalid {
                field: "maxFlows".into(),
                reason: "must be positive".into(),
            });
        }
        Ok(Some(Self {
            max_bytes: bound("maxBytes", raw.max_bytes)?.unwrap_or(0),
            max_requests: bound("maxRequests", raw.max_requests)?.unwrap_or(0),
            default_ttl,
            default_band,
            bands,
            max_flows,
            gateway_max_message_timeout,
            least_served_head_start: raw.least_served_head_start.unwrap_or(DEFAULT_HEAD_START),
        }))
    }

    /// The settings of the band for `priority` (the default band's for a
    /// priority no band names).
    pub fn band(&self, priority: i32) -> BandSettings {
        self.bands
            .iter()
            .find(|(p, _)| *p == priority)
            .map_or(self.default_band, |(_, b)| *b)
    }

    /// The largest `dispatchHeadroom` of any band: above `1 +` this, nothing
    /// is dispatched.
    pub fn max_dispatch_headroom(&self) -> f64 {
        self.all_bands()
            .map(|b| b.dispatch_headroom)
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// Whether some band, or the template for priorities no band names,
    /// satisfies `f`.
    pub fn any_band(&self, f: impl Fn(&BandSettings) -> bool) -> bool {
        self.all_bands().any(f)
    }

    /// The named bands and the template.
    fn all_bands(&self) -> impl Iterator<Item = &BandSettings> {
        self.bands
            .iter()
            .map(|(_, b)| b)
            .chain([&self.default_band])
    }
}

fn band(
    b: &RawBand,
    base: &BandSettings,
    resolve: &impl Fn(&'static str, &str) -> Result<String, FlowControlConfigError>,
) -> Result<BandSettings, FlowControlConfigError> {
    let fairness = match b.fairness_policy_ref.as_str() {
        "" => base.fairness,
        r => match resolve("fairnessPolicyRef", r)?.as_str() {
            GLOBAL_STRICT => Fairness::GlobalStrict,
            ROUND_ROBIN => Fairness::RoundRobin,
            LEAST_SERVED => Fairness::LeastServed,
            _ => {
                return Err(FlowControlConfigError::UnknownPolicy {
                    field: "fairnessPolicyRef",
                    reference: r.to_owned(),
                    known: "global-strict-fairness-policy, round-robin-fairness-policy, \
                            least-served-fairness-policy",
                });
            }
        },
    };
    let ordering = match b.ordering_policy_ref.as_str() {
        "" => base.ordering,
        r => match resolve("orderingPolicyRef", r)?.as_str() {
            FCFS => Ordering::Fcfs,
            EDF => Ordering::Edf,
            _ => {
                return Err(FlowControlConfigError::UnknownPolicy {
                    field: "orderingPolicyRef",
                    reference: r.to_owned(),
                    known: "fcfs-ordering-policy, edf-ordering-policy",
                });
            }
        },
    };
    Ok(BandSettings {
        // GIE: 0 or omitted means the default for a band's bytes.
        max_bytes: bound("priorityBands.maxBytes", b.max_bytes)?
            .filter(|&n| n > 0)
            .unwrap_or(base.max_bytes),
        max_requests: bound("priorityBands.maxRequests", b.max_requests)?
            .unwrap_or(base.max_requests),
        fairness,
        ordering,
        dispatch_headroom: match b.dispatch_headroom {
            None => base.dispatch_headroom,
            Some(h) if h.is_finite() && h > -1.0 && h <= 1.0 => h,
            Some(h) => {
                return Err(FlowControlConfigError::Invalid {
                    field: "priorityBands.dispatchHeadroom".into(),
                    reason: format!("{h} is not above -1 and at most 1"),
                });
            }
        },
    })
}

/// The policy type a reference names: a declared plugin's type, else the
/// reference itself.
fn resolve_policy(
    cfg: &EndpointPickerConfig,
    _field: &'static str,
    reference: &str,
) -> Result<String, FlowControlConfigError> {
    Ok(cfg
        .plugin(reference)
        .map_or_else(|| reference.to_owned(), |p| p.plugin_type.clone()))
}

fn bound(field: &str, v: Option<i64>) -> Result<Option<u64>, FlowControlConfigError> {
    match v {
        None => Ok(None),
        Some(n) => u64::try_from(n)
            .map(Some)
            .map_err(|_| FlowControlConfigError::Invalid {
                field: field.to_owned(),
                reason: format!("{n} is negative"),
            }),
    }
}

fn duration(field: &str, v: Option<&str>) -> Result<Option<Duration>, FlowControlConfigError> {
    match v {
        None => Ok(None),
        Some(text) => parse_duration(text)
            .map(|d| (!d.is_zero()).then_some(d))
            .map_err(|reason| FlowControlConfigError::Invalid {
                field: field.to_owned(),
                reason,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<FlowControlSettings>, FlowControlConfigError> {
        FlowControlSettings::from_config(&EndpointPickerConfig::parse(text).unwrap())
    }

    #[test]
    fn off_without_the_feature_gate() {
        assert_eq!(parse("plugins: []\n").unwrap(), None);
        assert_eq!(parse("flowControl: {maxRequests: 3}\n").unwrap(), None);
    }

    #[test]
    fn the_gate_alone_gives_gie_defaults() {
        let s = parse("featureGates: [flowControl]\n").unwrap().unwrap();
        assert_eq!(s, FlowControlSettings::default());
        assert_eq!(s.band(7).max_bytes, 1_000_000_000);
        assert_eq!(s.band(7).fairness, Fairness::GlobalStrict);
        assert_eq!(s.band(7).ordering, Ordering::Fcfs);
    }

    #[test]
    fn gie_shape_with_policy_plugins() {
        let text = "featureGates: [flowControl]
plugins:
- name: rr
  type: round-robin-fairness-policy
flowControl:
  maxBytes: 1000
  maxRequests: 10
  defaultRequestTTL: 30s
  defaultPriorityBand: {maxRequests: 4, orderingPolicyRef: edf-ordering-policy}
  priorityBands:
  - priority: -1
    maxRequests: 2
  - priority: 10
    maxBytes: 500
    fairnessPolicyRef: rr
    dispatchHeadroom: 0.05
  gatewayMaxMessageTimeout: 60s
  leastServedHeadStart: 16
";
        let s = parse(text).unwrap().unwrap();
        assert_eq!(s.least_served_head_start, 16);
        assert_eq!((s.max_bytes, s.max_requests), (1000, 10));
        assert_eq!(s.default_ttl, Some(Duration::from_secs(30)));
        assert_eq!(s.gateway_max_message_timeout, Some(Duration::from_secs(60)));
        assert_eq!(
            s.bands.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            [10, -1],
            "highest first"
        );
        let high = s.band(10);
        assert_eq!(high.fairness, Fairness::RoundRobin);
        assert_eq!(high.max_bytes, 500);
        assert_eq!(
            high.max_requests, 0,
            "a named band starts from the defaults"
        );
        assert_eq!(high.ordering, Ordering::Fcfs);
        assert_eq!(high.dispatch_headroom, 0.05);
        assert_eq!(s.band(-1).dispatch_headroom, 0.0);
        assert_eq!(s.max_dispatch_headroom(), 0.05);
        assert_eq!(s.band(3).ordering, Ordering::Edf, "the template");
        assert_eq!(s.band(-1).max_requests, 2);
        assert_eq!(s.band(3).max_requests, 4);
    }

    #[test]
    fn bad_sections_are_refused() {
        for text in [
            "featureGates: [flowControl]\nflowControl: {maxBytes: -1}\n",
            "featureGates: [flowControl]\nflowControl: {defaultRequestTTL: soon}\n",
            "featureGates: [flowControl]\nflowControl: {unknownField: 1}\n",
            "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1}, {priority: 1}]}\n",
            "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, fairnessPolicyRef: fifo}]}\n",
            "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, orderingPolicyRef: lifo}]}\n",
            "featureGates: [flowControl]\nflowControl: {maxFlows: 0}\n",
            "featureGates: [flowControl]\nflowControl: {leastServedHeadStart: -1}\n",
            "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, dispatchHeadroom: -1}]}\n",
            "featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, dispatchHeadroom: 1.5}]}\n",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
