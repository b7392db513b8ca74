//! Builds a [`Scheduler`] from an `EndpointPickerConfig`.
//!
//! Plugin type names are GIE's (and llm-d's) so configs carry over. A plugin
//! is declared once under `plugins` and referenced by name from a profile;
//! scorers without a weight get 1; a profile without a picker gets the
//! max-score picker; a config without profiles gets one profile with every
//! declared scheduling plugin, as GIE does. Which types exist and which are
//! supported is the [`inventory`]'s business: unsupported and unknown types,
//! dangling references and malformed parameters are startup errors, each
//! reported once. Data-layer and parser plugin types are accepted here and
//! read by their own subsystems.
//!
//! KV events ([`SchedulerOptions::kv_events`], the `--kv-events` flag): the
//! config text does not change. The built-in default stays one
//! `prefill-cost-scorer` and the max-score picker; what changes is where its
//! cached tokens come from: for a request with token ids, each endpoint
//! whose events are known answers from them (GPU tokens fully, offloaded
//! ones at `OFFLOADED_TOKEN_CREDIT`), the others from the approximate
//! index, which keeps recording every routed pick as the fallback; and a
//! routed prompt counts as cached on its pick for 2 s until its events
//! arrive (speculation, see `precise`). The same holds for every
//! prefix-aware plugin of any config. A `precise-prefix-cache-scorer`
//! turns the token-exact path on even without the option (its endpoints
//! then have no event data, and it scores from the approximate index); its
//! parameters set the default block size and speculation (llm-d's
//! `speculativeIndexing`, off unless set, overrides the 2 s default).

use std::{sync::Arc, time::Duration, time::Instant};

use serde::{Deserialize, de::DeserializeOwned};

use super::{
    ConcurrencyDetector, Filter, Named, Picker, PrefixSettings, Profile, SaturationDetector,
    Scheduler, Scorer, UtilizationDetector,
    filters::{
        ByLabelFilter, ConcurrencyFilter, HeaderBasedTestingFilter, LabelSelectorFilter,
        PrefixAffinityFilter, UtilizationCapFilter, UtilizationFilter,
    },
    inventory::{self, Kind, Status},
    pickers::{MaxScorePicker, RandomPicker, RoundRobinPicker, WeightedRandomPicker},
    precise::{EventSettings, PreciseParams},
    scorers::{
        ActiveRequestScorer, ContextLengthAware, KvCacheUtilizationScorer, LoadAwareScorer,
        LoraAffinityScorer, NoHitLruParams, NoHitLruScorer, PrefillCostScorer, PrefixCacheScorer,
        QueueScorer, RunningRequestsScorer, TokenLoadScorer,
    },
    session::{SessionAffinityFilter, SessionAffinityScorer, SessionConfigError, SessionParams},
};
use crate::{
    config::{EndpointPickerConfig, PluginSpec},
    prefix::PrefixIndex,
};

/// Settings the scheduler takes from flags rather than the config file.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub fallback_endpoints: usize,
    pub max_scrape_failures: u32,
    pub staleness: Duration,
    /// The endpoint store's epoch (reference of metric timestamps).
    pub epoch: Instant,
    /// KV-cache events are subscribed (`--kv-events`): prefix-aware plugins
    /// read event-based cached tokens where an endpoint's events are known.
    pub kv_events: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error("plugin {name:?} has unknown type {plugin_type:?}; known types: {known}")]
    UnknownType {
        name: String,
        plugin_type: String,
        known: String,
    },
    #[error("plugin type {plugin_type:?} ({what}) is not supported; nearest: {nearest}")]
    Unsupported {
        plugin_type: &'static str,
        what: &'static str,
        nearest: &'static str,
    },
    #[error(
        "profile {profile:?} references plugin {plugin_ref:?}, which is not declared under plugins"
    )]
    UnknownRef { profile: String, plugin_ref: String },
    #[error(
        "profile {profile:?} references {plugin_ref:?} of type {plugin_type:?}, which is not a filter, scorer or picker"
    )]
    NotSchedulable {
        profile: String,
        plugin_ref: String,
        plugin_type: String,
    },
    #[error("profile {0:?} has more than one picker")]
    SeveralPickers(String),
    #[error("{0} scheduling profiles configured; the single-profile handler needs exactly one")]
    ProfileCount(usize),
    #[error("invalid parameters for plugin {name:?}: {message}")]
    Parameters { name: String, message: String },
    #[error("scorer weight for {plugin_ref:?} must be a finite number >= 0")]
    Weight { plugin_ref: String },
}

fn kind_of(plugin_type: &str) -> Option<(Kind, &'static str, &'static [&'static str])> {
    inventory::lookup(plugin_type)
        .filter(|t| !matches!(t.status, Status::Refused { .. }))
        .map(|t| (t.kind, t.name, t.params))
}

/// Plugins whose presence means prompts must be hashed and matched.
const PREFIX_USERS: &[&str] = &[
    "prefix-cache-scorer",
    "precise-prefix-cache-scorer",
    "prefill-cost-scorer",
    "prefix-cache-affinity-filter",
    // Tells cold requests from warm ones by their prefix match, as llm-d's
    // reads the approximate prefix producer's match info.
    "no-hit-lru-scorer",
];

/// Plugins that read the endpoints' LoRA adapters.
const LORA_USERS: &[&str] = &["lora-affinity-scorer", "prefill-cost-scorer"];

/// Refuses a known type that is not supported, or a supported one whose
/// parameters ask for something we do not do.
fn check_supported(spec: &PluginSpec) -> Result<(), BuildError> {
    let Some(entry) = inventory::lookup(&spec.plugin_type) else {
        return Err(BuildError::UnknownType {
            name: spec.name().to_owned(),
            plugin_type: spec.plugin_type.clone(),
            known: inventory::supported().collect::<Vec<_>>().join(", "),
        });
    };
    if let Status::Refused { what, nearest } = entry.status {
        return Err(BuildError::Unsupported {
            plugin_type: entry.name,
            what,
            nearest,
        });
    }
    let has = |key: &str| matches!(&spec.parameters, Some(serde_json::Value::Object(m)) if m.contains_key(key));
    if matches!(entry.name, "token-producer" | "tokenizer")
        && ["modelName", "vllm", "udsTokenizerConfig"]
            .iter()
            .any(|k| has(k))
    {
        return Err(BuildError::Unsupported {
            plugin_type: entry.name,
            what: "a real tokenizer: modelName, vllm or udsTokenizerConfig",
            nearest: "token-producer with the estimate backend (4 bytes per token)",
        });
    }
    let flag = |key: &str| {
        matches!(&spec.parameters, Some(serde_json::Value::Object(m))
            if m.get(key).and_then(serde_json::Value::as_bool) == Some(true))
    };
    if entry.name == "inflight-load-producer" && flag("addEstimatedOutputTokens") {
        return Err(BuildError::Unsupported {
            plugin_type: entry.name,
            what: "addEstimatedOutputTokens: output tokens counted as in-flight load",
            nearest: "inflight-load-producer without it (uncached prompt tokens until the first response byte)",
        });
    }
    Ok(())
}

/// Parameters of a plugin that has no defaults for them.
fn params_required<T: DeserializeOwned>(spec: &PluginSpec) -> Result<T, BuildError> {
    let v = spec.parameters.clone().unwrap_or(serde_json::Value::Null);
    serde_json::from_value(v).map_err(|e| invalid(spec, e.to_string()))
}

fn params<T: DeserializeOwned + Default>(spec: &PluginSpec) -> Result<T, BuildError> {
    match &spec.parameters {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| BuildError::Parameters {
            name: spec.name().to_owned(),
            message: e.to_string(),
        }),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PrefixParams {
    block_size_tokens: Option<u32>,
    /// Deprecated in GIE: block size in characters.
    block_size: Option<u32>,
    max_prefix_blocks_to_match: Option<u32>,
    max_prefix_tokens_to_match: Option<u32>,
    lru_capacity_per_server: Option<u32>,
    auto_tune: Option<bool>,
}

impl PrefixParams {
    fn settings(self) -> PrefixSettings {
        let d = PrefixSettings::default();
        let block_size_tokens = self
            .block_size_tokens
            .or(self
                .block_size
                .map(|chars| (chars / super::BYTES_PER_TOKEN).max(1)))
            .filter(|&b| b > 0)
            .unwrap_or(d.block_size_tokens);
        let max_blocks = match self.max_prefix_tokens_to_match {
            Some(tokens) if tokens > 0 => (tokens / block_size_tokens).max(1),
            _ => self.max_prefix_blocks_to_match.unwrap_or(d.max_blocks),
        };
        PrefixSettings {
            block_size_tokens,
            max_blocks,
            lru_capacity_per_server: self
                .lru_capacity_per_server
                .unwrap_or(d.lru_capacity_per_server),
            auto_tune: self.auto_tune.unwrap_or(d.auto_tune),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PickerParams {
    max_num_of_endpoints: Option<usize>,
}

/// Builds the scheduler described by `cfg`.
pub fn build_scheduler(
    cfg: &EndpointPickerConfig,
    opts: &SchedulerOptions,
    index: Arc<PrefixIndex>,
) -> Result<Scheduler, BuildError> {
    for p in &cfg.plugins {
        check_supported(p)?;
        let Some((_, _, accepted)) = kind_of(&p.plugin_type) else {
            continue; // unreachable: check_supported refused it
        };
        if let Some(serde_json::Value::Object(map)) = &p.parameters {
            for key in map.keys().filter(|k| !accepted.contains(&k.as_str())) {
                tracing::warn!(plugin = p.name(), parameter = %key, "unknown plugin parameter ignored");
            }
        }
    }

    let refs: Vec<(String, Option<f64>)> = match cfg.scheduling_profiles.as_slice() {
        [] => cfg
            .plugins
            .iter()
            .filter(|p| matches!(kind_of(&p.plugin_type), Some((k, _, _)) if k != Kind::Other))
            .map(|p| (p.name().to_owned(), None))
            .collect(),
        [one] => one
            .plugins
            .iter()
            .map(|r| (r.plugin_ref.clone(), r.weight))
            .collect(),
        many => return Err(BuildError::ProfileCount(many.len())),
    };
    let profile_name = cfg
        .scheduling_profiles
        .first()
        .map_or_else(|| "default".to_owned(), |p| p.name.clone());

    let detector = saturation_detector(cfg)?;
    let mut filters: Vec<Named<dyn Filter>> = Vec::new();
    let mut scorers: Vec<(Named<dyn Scorer>, f64)> = Vec::new();
    let mut picker: Option<(Named<dyn Picker>, usize)> = None;
    let mut needs_prefix = false;
    let mut lora_aware = false;
    let mut precise: Option<super::precise::PreciseConfig> = None;
    let mut session_header: Option<String> = None;

    for (plugin_ref, weight) in refs {
        let spec = cfg
            .plugin(&plugin_ref)
            .ok_or_else(|| BuildError::UnknownRef {
                profile: profile_name.clone(),
                plugin_ref: plugin_ref.clone(),
            })?;
        let Some((kind, plugin_type, _)) = kind_of(&spec.plugin_type) else {
            continue; // unreachable: every declared type was checked above
        };
        needs_prefix |= PREFIX_USERS.contains(&plugin_type);
        lora_aware |= LORA_USERS.contains(&plugin_type);
        let name = spec.name().to_owned();
        match kind {
            Kind::Filter if plugin_type == "session-affinity-filter" => {
                use_session_header(spec, &mut session_header)?;
                filters.push(Named {
                    name,
                    plugin_type,
                    plugin: Box::new(SessionAffinityFilter),
                });
            }
            Kind::Filter => filters.push(Named {
                name,
                plugin_type,
                plugin: build_filter(spec, plugin_type)?,
            }),
            Kind::Scorer if plugin_type == "context-length-aware" => {
                // Both a scorer and, when asked, a filter (filters run first
                // whatever the order in the profile, as in GIE).
                let plugin: ContextLengthAware = params(spec)?;
                if plugin.label.is_empty() {
                    return Err(invalid(spec, "'label' must be specified"));
                }
                if plugin.enable_filtering {
                    filters.push(Named {
                        name: name.clone(),
                        plugin_type,
                        plugin: Box::new(plugin.clone()),
                    });
                }
                scorers.push((
                    Named {
                        name,
                        plugin_type,
                        plugin: Box::new(plugin),
                    },
                    scorer_weight(weight, plugin_ref)?,
                ));
            }
            Kind::Scorer => {
                let w = scorer_weight(weight, plugin_ref)?;
                let plugin: Box<dyn Scorer> = match plugin_type {
                    "queue-scorer" => Box::new(QueueScorer),
                    "kv-cache-utilization-scorer" => Box::new(KvCacheUtilizationScorer),
                    "prefix-cache-scorer" => Box::new(PrefixCacheScorer),
                    "running-requests-size-scorer" => Box::new(RunningRequestsScorer),
                    "active-request-scorer" => Box::new(params::<ActiveRequestScorer>(spec)?),
                    "load-aware-scorer" => Box::new(params::<LoadAwareScorer>(spec)?),
                    "token-load-scorer" => Box::new(params::<TokenLoadScorer>(spec)?),
                    "lora-affinity-scorer" => Box::new(LoraAffinityScorer),
                    "session-affinity-scorer" => {
                        use_session_header(spec, &mut session_header)?;
                        Box::new(SessionAffinityScorer)
                    }
                    "no-hit-lru-scorer" => {
                        Box::new(NoHitLruScorer::new(&params::<NoHitLruParams>(spec)?))
                    }
                    "prefill-cost-scorer" => Box::new(params::<PrefillCostScorer>(spec)?),
                    "precise-prefix-cache-scorer" => {
                        let mut ignored = Vec::new();
                        let c = params::<PreciseParams>(spec)?
                            .config(&mut ignored)
                            .map_err(|m| invalid(spec, m))?;
                        for (parameter, why) in ignored {
                            tracing::info!(plugin = spec.name(), %parameter, why, "plugin parameter has no effect here");
                        }
                        if precise.is_some_and(|p| {
                            p.block_size_tokens != c.block_size_tokens
                                || p.speculative_ttl != c.speculative_ttl
                        }) {
                            return Err(invalid(
                                spec,
                                "every precise-prefix-cache-scorer must use the same blockSize and speculative indexing",
                            ));
                        }
                        precise = Some(c);
                        Box::new(c.scorer)
                    }
                    other => return Err(unwired(other)),
                };
                scorers.push((
                    Named {
                        name,
                        plugin_type,
                        plugin,
                    },
                    w,
                ));
            }
            Kind::Picker => {
                if picker.is_some() {
                    return Err(BuildError::SeveralPickers(profile_name));
                }
                let p: PickerParams = params(spec)?;
                let plugin: Box<dyn Picker> = match plugin_type {
                    "max-score-picker" => Box::new(MaxScorePicker),
                    "random-picker" => Box::new(RandomPicker),
                    "weighted-random-picker" => Box::new(WeightedRandomPicker),
                    "round-robin-picker" => Box::new(RoundRobinPicker::default()),
                    other => return Err(unwired(other)),
                };
                picker = Some((
                    Named {
                        name,
                        plugin_type,
                        plugin,
                    },
                    p.max_num_of_endpoints.unwrap_or(1).max(1),
                ));
            }
            Kind::Other => {
                return Err(BuildError::NotSchedulable {
                    profile: profile_name,
                    plugin_ref,
                    plugin_type: plugin_type.to_owned(),
                });
            }
        }
    }

    let (picker, picker_min_endpoints) = picker.unwrap_or_else(|| {
        (
            Named {
                name: "max-score-picker".to_owned(),
                plugin_type: "max-score-picker",
                plugin: Box::new(MaxScorePicker),
            },
            1,
        )
    });

    let prefix = if needs_prefix {
        let spec = [
            "prefix-cache-scorer",
            "prefill-cost-scorer",
            "approx-prefix-cache-producer",
        ]
        .iter()
        .find_map(|t| cfg.plugin_of_type(t));
        Some(match spec {
            Some(spec) => params::<PrefixParams>(spec)?.settings(),
            None => PrefixSettings::default(),
        })
    } else {
        None
    };

    let events = (needs_prefix && (opts.kv_events || precise.is_some())).then(|| {
        let d = EventSettings::default();
        EventSettings {
            block_size_tokens: precise
                .and_then(|p| p.block_size_tokens)
                .or(prefix.map(|p| p.block_size_tokens))
                .unwrap_or(d.block_size_tokens),
            speculative_ttl: precise.map_or(d.speculative_ttl, |p| p.speculative_ttl),
        }
    });
    if precise.is_some() && !opts.kv_events {
        tracing::warn!(
            "precise-prefix-cache-scorer without KV events enabled: it scores from the approximate index"
        );
    }
    // An adapter's blocks have their own key chain: tell adapters apart.
    lora_aware |= events.is_some();

    Ok(Scheduler {
        profile: Profile {
            name: profile_name,
            filters,
            scorers,
            picker,
            picker_min_endpoints,
        },
        prefix,
        events,
        speculative: Default::default(),
        index,
        saturation: detector,
        lora_aware,
        session_header: session_header.map(Arc::from),
        adapters: Default::default(),
        fallback_endpoints: opts.fallback_endpoints,
        max_scrape_failures: opts.max_scrape_failures.max(1),
        staleness: opts.staleness,
        epoch: opts.epoch,
    })
}

fn invalid(spec: &PluginSpec, message: impl Into<String>) -> BuildError {
    BuildError::Parameters {
        name: spec.name().to_owned(),
        message: message.into(),
    }
}

/// A type the inventory lists as supported that the registry does not build:
/// a bug, which the inventory test catches.
fn unwired(plugin_type: &'static str) -> BuildError {
    BuildError::Unsupported {
        plugin_type,
        what: "listed as supported but not built by the registry",
        nearest: "prefill-cost-scorer",
    }
}

fn build_filter(
    spec: &PluginSpec,
    plugin_type: &'static str,
) -> Result<Box<dyn Filter>, BuildError> {
    Ok(match plugin_type {
        "header-based-testing-filter" => Box::new(HeaderBasedTestingFilter),
        "prefix-cache-affinity-filter" => Box::new(params::<PrefixAffinityFilter>(spec)?),
        "label-selector-filter" | "by-label-selector" => {
            let f: LabelSelectorFilter = params(spec)?;
            f.validate().map_err(|m| invalid(spec, m))?;
            Box::new(f)
        }
        "by-label" => {
            let f: ByLabelFilter = params(spec)?;
            f.validate().map_err(|m| invalid(spec, m))?;
            Box::new(f)
        }
        role @ ("decode-filter" | "prefill-filter" | "encode-filter") => {
            Box::new(ByLabelFilter::role(role).unwrap_or_default())
        }
        "utilization-filter" => {
            let f: UtilizationCapFilter = params_required(spec)?;
            f.validate().map_err(|m| invalid(spec, m))?;
            Box::new(f)
        }
        "concurrency-detector" => Box::new(ConcurrencyFilter(concurrency(spec)?)),
        "utilization-detector" => Box::new(UtilizationFilter(params::<UtilizationDetector>(spec)?)),
        other => return Err(unwired(other)),
    })
}

/// Reads a session plugin's header; every session plugin must use the same.
fn use_session_header(spec: &PluginSpec, current: &mut Option<String>) -> Result<(), BuildError> {
    let p: SessionParams = params(spec)?;
    let header = p.header().map_err(|e| match e {
        SessionConfigError::Unsupported(what, nearest) => BuildError::Unsupported {
            plugin_type: match spec.plugin_type.as_str() {
                "session-affinity-filter" => "session-affinity-filter",
                _ => "session-affinity-scorer",
            },
            what,
            nearest,
        },
        SessionConfigError::Invalid(m) => invalid(spec, m),
    })?;
    match current {
        Some(h) if *h != header => Err(invalid(
            spec,
            format!(
                "session header {header:?} differs from {h:?}: every session-affinity plugin must use the same"
            ),
        )),
        _ => {
            *current = Some(header);
            Ok(())
        }
    }
}

fn concurrency(spec: &PluginSpec) -> Result<ConcurrencyDetector, BuildError> {
    let d: ConcurrencyDetector = params(spec)?;
    d.validate().map_err(|m| invalid(spec, m))?;
    Ok(d)
}

fn scorer_weight(weight: Option<f64>, plugin_ref: String) -> Result<f64, BuildError> {
    let w = weight.unwrap_or(1.0);
    if w.is_finite() && w >= 0.0 {
        Ok(w)
    } else {
        Err(BuildError::Weight { plugin_ref })
    }
}

fn saturation_detector(cfg: &EndpointPickerConfig) -> Result<SaturationDetector, BuildError> {
    const DETECTORS: [&str; 2] = ["utilization-detector", "concurrency-detector"];
    let spec = match &cfg.saturation_detector {
        Some(r) => {
            let spec = cfg
                .plugin(&r.plugin_ref)
                .ok_or_else(|| BuildError::UnknownRef {
                    profile: "saturationDetector".to_owned(),
                    plugin_ref: r.plugin_ref.clone(),
                })?;
            if !DETECTORS.contains(&spec.plugin_type.as_str()) {
                return Err(invalid(
                    spec,
                    format!(
                        "saturationDetector must be one of {}, not {:?}",
                        DETECTORS.join(", "),
                        spec.plugin_type
                    ),
                ));
            }
            Some(spec)
        }
        None => cfg
            .plugins
            .iter()
            .find(|p| DETECTORS.contains(&p.plugin_type.as_str())),
    };
    Ok(match spec {
        Some(spec) if spec.plugin_type == "concurrency-detector" => {
            SaturationDetector::Concurrency(concurrency(spec)?)
        }
        Some(spec) => SaturationDetector::Utilization(params(spec)?),
        None => SaturationDetector::default(),
    })
}
