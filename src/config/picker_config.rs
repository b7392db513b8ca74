//! The scheduler configuration file: the `EndpointPickerConfig` shape of
//! GIE (`plugins` + `schedulingProfiles`), so existing configs carry over.
//!
//! This module only reads and checks the document's shape. Turning plugin
//! entries into filters, scorers and pickers is the scheduler's business
//! (`scheduling::registry`), and data-layer plugins are read by the scraper.
//!
//! Three additions of ours, optional top-level lists that GIE configs do
//! not contain: `objectives` (priority per `x-gateway-inference-objective`
//! name, the file-based stand-in for InferenceObjective objects),
//! `modelRewrites` (rewrite the requested model, like InferenceModelRewrite)
//! and `trustedHeaders` (request headers a client may use to change routing;
//! none by default, see [`TRUSTABLE_HEADERS`]).

use std::path::Path;

use serde::Deserialize;

/// Request headers that change routing when the config trusts them:
/// `x-gateway-model-name-rewrite` overrides the model (and the configured
/// rewrites), `test-epp-endpoint-selection` names the endpoint outright
/// (GIE's conformance tests, with `header-based-testing-filter`). Whoever can
/// send a request can set them, so honouring them is a deployment's choice,
/// never a default.
pub const TRUSTABLE_HEADERS: &[&str] = &[MODEL_REWRITE_HEADER, TEST_SELECTION_HEADER];
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
pub const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";

/// API groups accepted in `apiVersion` (GIE's, and llm-d's newer one).
pub const ACCEPTED_API_VERSIONS: &[&str] = &[
    "inference.networking.x-k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
];

/// Our built-in default: the load-aware prefix cost scorer alone. See
/// `scheduling::scorers::PrefillCostScorer` for why it beats a weighted sum.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.yaml");

/// GIE v1.5's default profile (queue 2, kv-cache 2, prefix 3, max-score
/// picker), shipped so it can be selected and compared.
pub const GIE_DEFAULT_CONFIG: &str = include_str!("../../config/gie-default.yaml");

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPickerConfig {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub feature_gates: Vec<String>,
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
    #[serde(default)]
    pub saturation_detector: Option<PluginRef>,
    /// GIE's data layer wiring (sources and extractors). The plugins it names
    /// are configured through their `parameters`; the wiring itself is fixed.
    #[serde(default)]
    pub data_layer: Option<serde_json::Value>,
    /// GIE's flow control (queueing with fairness), read by `flow_control`
    /// when `featureGates` lists `flowControl`.
    #[serde(default)]
    pub flow_control: Option<serde_json::Value>,
    /// Ours: `sloAdmission: {}` admits requests carrying `x-slo-ttft-ms`
    /// by their predicted time to first token (`director::slo`).
    #[serde(default)]
    pub slo_admission: Option<SloAdmissionSpec>,
    #[serde(default)]
    pub parser: Option<PluginRef>,
    /// llm-d's request handler section (parsers). Accepted and ignored: the
    /// OpenAI parser is always used.
    #[serde(default)]
    pub request_handler: Option<serde_json::Value>,
    #[serde(default)]
    pub objectives: Vec<ObjectiveSpec>,
    #[serde(default)]
    pub model_rewrites: Vec<ModelRewriteSpec>,
    /// Names from [`TRUSTABLE_HEADERS`].
    #[serde(default)]
    pub trusted_headers: Vec<String>,
}

/// The `sloAdmission` section (ours): no settings yet; present means on.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SloAdmissionSpec {}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginSpec {
    /// Defaults to the type.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

impl PluginSpec {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.plugin_type)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileSpec {
    pub name: String,
    #[serde(default)]
    pub plugins: Vec<ProfilePluginRef>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfilePluginRef {
    pub plugin_ref: String,
    /// Scorers only; defaults to 1 as in GIE.
    #[serde(default)]
    pub weight: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginRef {
    pub plugin_ref: String,
}

/// Priority of an objective named by `x-gateway-inference-objective`.
/// Negative means sheddable: refused with 429 while the pool is saturated.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectiveSpec {
    pub name: String,
    #[serde(default)]
    pub priority: i32,
}

/// Requests for `model` (or any model when it is `*`) are sent to one of the
/// targets, chosen at random by weight.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRewriteSpec {
    pub model: String,
    pub targets: Vec<RewriteTarget>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteTarget {
    pub model: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_weight() -> f64 {
    1.0
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Syntax(String),
    #[error("unsupported apiVersion {0:?} (expected one of {ACCEPTED_API_VERSIONS:?})")]
    ApiVersion(String),
    #[error("unsupported kind {0:?} (expected EndpointPickerConfig)")]
    Kind(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl EndpointPickerConfig {
    /// Parses YAML or JSON text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self =
            yaml_serde::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        if let Some(v) = &cfg.api_version
            && !ACCEPTED_API_VERSIONS.contains(&v.as_str())
        {
            return Err(ConfigError::ApiVersion(v.clone()));
        }
        if let Some(k) = &cfg.kind
            && k != "EndpointPickerConfig"
        {
            return Err(ConfigError::Kind(k.clone()));
        }
        let mut names = std::collections::HashSet::new();
        for p in &cfg.plugins {
            if !names.insert(p.name()) {
                return Err(ConfigError::Invalid(format!(
                    "plugin name {:?} is declared twice",
                    p.name()
                )));
            }
        }
        for h in &cfg.trusted_headers {
            if !TRUSTABLE_HEADERS.iter().any(|t| t.eq_ignore_ascii_case(h)) {
                return Err(ConfigError::Invalid(format!(
                    "trustedHeaders: {h:?} is not a header the picker can trust (known: {})",
                    TRUSTABLE_HEADERS.join(", ")
                )));
            }
        }
        if cfg
            .plugins
            .iter()
            .any(|p| p.plugin_type == "header-based-testing-filter")
            && !cfg.trusts(TEST_SELECTION_HEADER)
        {
            // Without the header the filter keeps no endpoint: every
            // request would fail. Say why at startup instead.
            return Err(ConfigError::Invalid(format!(
                "header-based-testing-filter routes by the client's {TEST_SELECTION_HEADER} header; \
                 add `trustedHeaders: [{TEST_SELECTION_HEADER}]` to allow it (for conformance tests only)"
            )));
        }
        for o in &cfg.model_rewrites {
            if o.targets.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "modelRewrites entry for {:?} has no targets",
                    o.model
                )));
            }
            if o.targets
                .iter()
                .any(|t| t.weight.is_nan() || t.weight < 0.0 || t.model.is_empty())
            {
                return Err(ConfigError::Invalid(format!(
                    "modelRewrites entry for {:?} needs non-empty target models with weights >= 0",
                    o.model
                )));
            }
        }
        Ok(cfg)
    }

    /// Whether requests may set `header` (one of [`TRUSTABLE_HEADERS`]).
    pub fn trusts(&self, header: &str) -> bool {
        self.trusted_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(header))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The built-in default (part of the binary; a unit test keeps it valid).
    pub fn builtin() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG)
    }

    /// The plugin declared under `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.name() == name)
    }

    /// The first plugin of a type, e.g. to read data-layer parameters.
    pub fn plugin_of_type(&self, plugin_type: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.plugin_type == plugin_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_headers_are_none_by_default_and_checked() {
        let cfg = EndpointPickerConfig::builtin().unwrap();
        assert!(TRUSTABLE_HEADERS.iter().all(|h| !cfg.trusts(h)));
        let cfg =
            EndpointPickerConfig::parse("trustedHeaders: [X-Gateway-Model-Name-Rewrite]").unwrap();
        assert!(cfg.trusts(MODEL_REWRITE_HEADER));
        assert!(!cfg.trusts(TEST_SELECTION_HEADER));
        let e = EndpointPickerConfig::parse("trustedHeaders: [x-gateway-destination-endpoint]")
            .unwrap_err();
        assert!(
            e.to_string().contains("not a header the picker can trust"),
            "{e}"
        );
    }

    #[test]
    fn builtin_configs_parse() {
        let ours = EndpointPickerConfig::builtin().unwrap();
        assert!(!ours.scheduling_profiles.is_empty());
        let gie = EndpointPickerConfig::parse(GIE_DEFAULT_CONFIG).unwrap();
        let weights: Vec<(String, f64)> = gie.scheduling_profiles[0]
            .plugins
            .iter()
            .map(|p| (p.plugin_ref.clone(), p.weight.unwrap_or(1.0)))
            .collect();
        assert_eq!(
            weights,
            vec![
                ("queue-scorer".into(), 2.0),
                ("kv-cache-utilization-scorer".into(), 2.0),
                ("prefix-cache-scorer".into(), 3.0)
            ]
        );
    }

    #[test]
    fn json_is_accepted_too() {
        let cfg = EndpointPickerConfig::parse(
            r#"{"apiVersion":"inference.networking.x-k8s.io/v1alpha1","kind":"EndpointPickerConfig",
               "plugins":[{"type":"queue-scorer"}],
               "schedulingProfiles":[{"name":"default","plugins":[{"pluginRef":"queue-scorer"}]}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.plugins[0].name(), "queue-scorer");
    }

    #[test]
    fn rejects_bad_documents() {
        for (text, needle) in [
            ("apiVersion: v9\n", "apiVersion"),
            ("kind: Pod\n", "kind"),
            ("plugins: [{type: a}, {type: a}]\n", "twice"),
            ("pluginz: []\n", "unknown field"),
            ("plugins: [{type: a, bogus: 1}]\n", "unknown field"),
            ("modelRewrites: [{model: a, targets: []}]\n", "no targets"),
            ("- just a list\n", "invalid"),
        ] {
            let err = EndpointPickerConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn objectives_and_rewrites() {
        let cfg = EndpointPickerConfig::parse(
            "objectives:\n- name: batch\n  priority: -1\nmodelRewrites:\n- model: a\n  targets:\n  - model: b\n",
        )
        .unwrap();
        assert_eq!(cfg.objectives[0].priority, -1);
        assert_eq!(cfg.model_rewrites[0].targets[0].weight, 1.0);
    }
}
