//! Which metric names carry which signal, per model-server engine.
//!
//! Built in: `vllm` (default), `sglang`, `trtllm-serve` and
//! `triton-tensorrt-llm`, with the names of GIE's model-server protocol. An
//! endpoint picks its mapping by the pod label
//! `inference.networking.k8s.io/engine-type` (the label key and the default
//! engine are settable). The `core-metrics-extractor` plugin's
//! `engineConfigs` override or add mappings; an empty spec disables a signal.

use std::collections::HashMap;

use serde::Deserialize;

use crate::{
    config::EndpointPickerConfig,
    endpoints::{ENGINE_LABEL, Endpoint},
};

/// A PromQL-style selector: a metric name and exact label matchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl MetricSpec {
    /// Parses `name` or `name{label=value,label2="value"}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (name, rest) = match text.find('{') {
            Some(i) => (&text[..i], Some(&text[i + 1..])),
            None => (text, None),
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("invalid metric name in spec {text:?}"));
        }
        let mut labels = Vec::new();
        if let Some(rest) = rest {
            let inner = rest
                .strip_suffix('}')
                .ok_or_else(|| format!("missing '}}' in spec {text:?}"))?;
            for pair in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("label matcher {pair:?} needs '=' in spec {text:?}"))?;
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                labels.push((k.trim().to_owned(), v.to_owned()));
            }
        }
        Ok(Self {
            name: name.to_owned(),
            labels,
        })
    }

    fn plain(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            labels: Vec::new(),
        }
    }

    fn with(name: &str, key: &str, value: &str) -> Self {
        Self {
            name: name.to_owned(),
            labels: vec![(key.to_owned(), value.to_owned())],
        }
    }
}

/// A set of the signals a scrape reads (see [`EngineMapping::signals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signals(u8);

impl Signals {
    pub const NONE: Self = Self(0);
    pub const WAITING: Self = Self(1);
    pub const RUNNING: Self = Self(2);
    pub const KV_USAGE: Self = Self(4);
    pub const BLOCK_SIZE: Self = Self(8);
    pub const NUM_BLOCKS: Self = Self(16);

    #[must_use]
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every signal of `other` is also in `self`.
    pub const fn covers(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Block size and cache size read from labels of an info metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub spec: MetricSpec,
    pub block_size_label: String,
    pub num_blocks_label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMapping {
    pub name: String,
    pub queued: Option<MetricSpec>,
    pub running: Option<MetricSpec>,
    /// Tried in order: the first that is present on the page is used.
    pub kv_usage: Vec<MetricSpec>,
    pub cache_info: Option<CacheInfo>,
    pub block_size: Option<MetricSpec>,
    pub num_blocks: Option<MetricSpec>,
    /// LoRA adapters: a gauge whose labels list running and waiting adapters
    /// and `max_lora`, newest series (largest value) wins (vLLM's
    /// `vllm:lora_requests_info`, GIE's `loraSpec`).
    pub lora: Option<MetricSpec>,
    /// Path override (trtllm-serve serves /prometheus/metrics).
    pub path: Option<String>,
}

impl EngineMapping {
    pub fn vllm() -> Self {
        Self {
            name: "vllm".into(),
            queued: Some(MetricSpec::plain("vllm:num_requests_waiting")),
            running: Some(MetricSpec::plain("vllm:num_requests_running")),
            kv_usage: vec![
                MetricSpec::plain("vllm:kv_cache_usage_perc"),
                // Deprecated name still exported by vLLM 0.8-0.10.
                MetricSpec::plain("vllm:gpu_cache_usage_perc"),
            ],
            cache_info: Some(CacheInfo {
                spec: MetricSpec::plain("vllm:cache_config_info"),
                block_size_label: "block_size".into(),
                num_blocks_label: "num_gpu_blocks".into(),
            }),
            block_size: None,
            num_blocks: None,
            lora: Some(MetricSpec::plain("vllm:lora_requests_info")),
            path: None,
        }
    }

    pub fn sglang() -> Self {
        Self {
            name: "sglang".into(),
            queued: Some(MetricSpec::plain("sglang:num_queue_reqs")),
            running: Some(MetricSpec::plain("sglang:num_running_reqs")),
            kv_usage: vec![MetricSpec::plain("sglang:token_usage")],
            cache_info: Some(CacheInfo {
                spec: MetricSpec::plain("sglang:cache_config_info"),
                block_size_label: "page_size".into(),
                num_blocks_label: "num_pages".into(),
            }),
            block_size: None,
            num_blocks: None,
            lora: None,
            path: None,
        }
    }

    pub fn trtllm_serve() -> Self {
        Self {
            name: "trtllm-serve".into(),
            queued: Some(MetricSpec::plain("trtllm_num_requests_waiting")),
            running: Some(MetricSpec::plain("trtllm_num_requests_running")),
            kv_usage: vec![MetricSpec::plain("trtllm_kv_cache_utilization")],
            cache_info: None,
            block_size: Some(MetricSpec::plain("trtllm_kv_cache_tokens_per_block")),
            num_blocks: Some(MetricSpec::plain("trtllm_kv_cache_max_blocks")),
            lora: None,
            path: Some("/prometheus/metrics".into()),
        }
    }

    pub fn triton_trtllm() -> Self {
        let block = "nv_trt_llm_kv_cache_block_metrics";
        Self {
            name: "triton-tensorrt-llm".into(),
            queued: Some(MetricSpec::with(
                "nv_trt_llm_request_metrics",
                "request_type",
                "waiting",
            )),
            running: Some(MetricSpec::with(
                "nv_trt_llm_request_metrics",
                "request_type",
                "scheduled",
            )),
            kv_usage: vec![MetricSpec::with(block, "kv_cache_block_type", "fraction")],
            cache_info: None,
            block_size: Some(MetricSpec::with(block, "kv_cache_block_type", "tokens_per")),
            num_blocks: Some(MetricSpec::with(block, "kv_cache_block_type", "max")),
            lora: None,
            path: None,
        }
    }

    /// Whether a sample with this metric name can matter.
    pub fn wants(&self, name: &[u8]) -> bool {
        let hit = |s: &MetricSpec| s.name.as_bytes() == name;
        self.queued.iter().any(hit)
            || self.running.iter().any(hit)
            || self.kv_usage.iter().any(hit)
            || self.cache_info.iter().any(|c| hit(&c.spec))
            || self.block_size.iter().any(hit)
            || self.num_blocks.iter().any(hit)
    }

    /// Every metric name this mapping reads, each once, in a fixed order.
    /// Includes the LoRA gauge, which [`wants`](Self::wants) leaves out: it
    /// is read by its own pass, so a malformed LoRA line cannot fail a scrape.
    pub fn metric_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        let specs = self
            .queued
            .iter()
            .chain(&self.running)
            .chain(&self.kv_usage)
            .chain(self.cache_info.iter().map(|c| &c.spec))
            .chain(&self.block_size)
            .chain(&self.num_blocks)
            .chain(&self.lora);
        for spec in specs {
            if !names.contains(&spec.name.as_str()) {
                names.push(&spec.name);
            }
        }
        names
    }

    /// The signals this mapping can produce, to tell a complete page from
    /// one that lacks some of them.
    pub fn signals(&self) -> Signals {
        let mut s = Signals::NONE;
        if self.queued.is_some() {
            s = s.with(Signals::WAITING);
        }
        if self.running.is_some() {
            s = s.with(Signals::RUNNING);
        }
        if !self.kv_usage.is_empty() {
            s = s.with(Signals::KV_USAGE);
        }
        if self.cache_info.is_some() || self.block_size.is_some() {
            s = s.with(Signals::BLOCK_SIZE);
        }
        if self.cache_info.is_some() || self.num_blocks.is_some() {
            s = s.with(Signals::NUM_BLOCKS);
        }
        s
    }

    pub fn describe(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        names.extend(self.queued.iter().map(|s| s.name.as_str()));
        names.extend(self.running.iter().map(|s| s.name.as_str()));
        names.extend(self.kv_usage.iter().map(|s| s.name.as_str()));
        format!("{} engine: {}", self.name, names.join(", "))
    }
}

/// One `engineConfigs` entry of the `core-metrics-extractor` plugin.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EngineConfig {
    name: String,
    queued_requests_spec: Option<String>,
    running_requests_spec: Option<String>,
    kv_usage_spec: Option<String>,
    cache_info_spec: Option<String>,
    cache_block_size_label_name: Option<String>,
    cache_num_blocks_label_name: Option<String>,
    cache_block_size_spec: Option<String>,
    cache_num_blocks_spec: Option<String>,
    lora_spec: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExtractorParams {
    engine_label_key: Option<String>,
    default_engine: Option<String>,
    #[serde(default)]
    engine_configs: Vec<EngineConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceParams {
    scheme: Option<String>,
    path: Option<String>,
}

/// How to scrape: where (path, port override) and which mapping per endpoint.
#[derive(Debug, Clone)]
pub struct ScrapeSettings {
    pub path: String,
    pub port_override: Option<u16>,
    pub engine_label_key: String,
    pub default_engine: String,
    pub engines: HashMap<String, EngineMapping>,
    /// Ask servers for only the metric names the mapping reads (the `name[]`
    /// query parameter of Python's prometheus_client, which vLLM and SGLang
    /// use): a page with only those samples, a small fraction of the full one.
    pub name_filter: bool,
}

impl Default for ScrapeSettings {
    fn default() -> Self {
        let engines = [
            EngineMapping::vllm(),
            EngineMapping::sglang(),
            EngineMapping::trtllm_serve(),
            EngineMapping::triton_trtllm(),
        ]
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
        Self {
            path: "/metrics".into(),
            port_override: None,
            engine_label_key: ENGINE_LABEL.into(),
            default_engine: "vllm".into(),
            engines,
            name_filter: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("metrics scheme {0:?} is not supported (model servers are scraped over plain http)")]
    Scheme(String),
    #[error("invalid {plugin} parameters: {message}")]
    Parameters { plugin: String, message: String },
    #[error("engine {engine:?}: {message}")]
    Spec { engine: String, message: String },
    #[error("default engine {0:?} has no mapping")]
    UnknownDefault(String),
}

impl ScrapeSettings {
    /// Built-in mappings adjusted by the config file's data-layer plugins and
    /// the legacy `--model-server-metrics-*` flags (flags win).
    pub fn from_config(
        cfg: &EndpointPickerConfig,
        scheme_flag: Option<&str>,
        path_flag: Option<&str>,
        port_flag: Option<u16>,
    ) -> Result<Self, SettingsError> {
        let mut s = Self::default();
        if let Some(spec) = cfg.plugin_of_type("metrics-data-source") {
            let p: SourceParams = parse_params(spec.name(), spec.parameters.as_ref())?;
            if let Some(scheme) = p.scheme {
                check_scheme(&scheme)?;
            }
            if let Some(path) = p.path {
                s.path = path;
            }
        }
        if let Some(spec) = cfg.plugin_of_type("core-metrics-extractor") {
            let p: ExtractorParams = parse_params(spec.name(), spec.parameters.as_ref())?;
            if let Some(k) = p.engine_label_key {
                s.engine_label_key = k;
            }
            if let Some(d) = p.default_engine {
                s.default_engine = d;
            }
            for ec in p.engine_configs {
                let mapping = mapping_from(ec)?;
                s.engines.insert(mapping.name.clone(), mapping);
            }
        }
        if let Some(scheme) = scheme_flag {
            check_scheme(scheme)?;
        }
        if let Some(path) = path_flag {
            s.path = path.to_owned();
        }
        s.port_override = port_flag.filter(|&p| p != 0);
        if !s.engines.contains_key(&s.default_engine) {
            return Err(SettingsError::UnknownDefault(s.default_engine));
        }
        Ok(s)
    }

    /// The mapping for an endpoint, by its engine label.
    pub fn mapping_for(&self, e: &Endpoint) -> &EngineMapping {
        e.label(&self.engine_label_key)
            .and_then(|name| self.engines.get(name))
            .or_else(|| self.engines.get(&self.default_engine))
            .unwrap_or_else(|| {
                // from_config guarantees the default exists; Default has vllm.
                self.engines
                    .values()
                    .next()
                    .unwrap_or_else(|| unreachable_mapping())
            })
    }
}

/// A mapping that matches nothing; only reachable if `engines` is empty,
/// which the constructors rule out.
fn unreachable_mapping() -> &'static EngineMapping {
    static EMPTY: std::sync::OnceLock<EngineMapping> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| EngineMapping {
        name: "none".into(),
        queued: None,
        running: None,
        kv_usage: Vec::new(),
        cache_info: None,
        block_size: None,
        num_blocks: None,
        lora: None,
        path: None,
    })
}

fn check_scheme(scheme: &str) -> Result<(), SettingsError> {
    if scheme.eq_ignore_ascii_case("http") {
        Ok(())
    } else {
        Err(SettingsError::Scheme(scheme.to_owned()))
    }
}

fn parse_params<T: for<'de> Deserialize<'de> + Default>(
    plugin: &str,
    v: Option<&serde_json::Value>,
) -> Result<T, SettingsError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| SettingsError::Parameters {
            plugin: plugin.to_owned(),
            message: e.to_string(),
        }),
    }
}

fn mapping_from(ec: EngineConfig) -> Result<EngineMapping, SettingsError> {
    let engine = ec.name.clone();
    let spec = |s: Option<String>| -> Result<Option<MetricSpec>, SettingsError> {
        match s.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => {
                MetricSpec::parse(text)
                    .map(Some)
                    .map_err(|message| SettingsError::Spec {
                        engine: engine.clone(),
                        message,
                    })
            }
        }
    };
    // Start from the built-in of the same name so a partial override works.
    let base = match ec.name.as_str() {
        "vllm" => EngineMapping::vllm(),
        "sglang" => EngineMapping::sglang(),
        "trtllm-serve" => EngineMapping::trtllm_serve(),
        "triton-tensorrt-llm" => EngineMapping::triton_trtllm(),
        _ => EngineMapping {
            name: ec.name.clone(),
            queued: None,
            running: None,
            kv_usage: Vec::new(),
            cache_info: None,
            block_size: None,
            num_blocks: None,
            lora: None,
            path: None,
        },
    };
    let mut m = base;
    if ec.queued_requests_spec.is_some() {
        m.queued = spec(ec.queued_requests_spec)?;
    }
    if ec.running_requests_spec.is_some() {
        m.running = spec(ec.running_requests_spec)?;
    }
    if ec.kv_usage_spec.is_some() {
        m.kv_usage = spec(ec.kv_usage_spec)?.into_iter().collect();
    }
    if ec.cache_info_spec.is_some() {
        m.cache_info = spec(ec.cache_info_spec)?.map(|s| CacheInfo {
            spec: s,
            block_size_label: ec
                .cache_block_size_label_name
                .clone()
                .unwrap_or_else(|| "block_size".into()),
            num_blocks_label: ec
                .cache_num_blocks_label_name
                .clone()
                .unwrap_or_else(|| "num_gpu_blocks".into()),
        });
    }
    if ec.cache_block_size_spec.is_some() {
        m.block_size = spec(ec.cache_block_size_spec)?;
    }
    if ec.cache_num_blocks_spec.is_some() {
        m.num_blocks = spec(ec.cache_num_blocks_spec)?;
    }
    if ec.lora_spec.is_some() {
        m.lora = spec(ec.lora_spec)?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        assert_eq!(MetricSpec::parse("a:b").unwrap(), MetricSpec::plain("a:b"));
        let s = MetricSpec::parse(r#"m{x=y, z="w"}"#).unwrap();
        assert_eq!(
            s.labels,
            vec![("x".into(), "y".into()), ("z".into(), "w".into())]
        );
        assert!(MetricSpec::parse("m{x=y").is_err());
        assert!(MetricSpec::parse("m{x}").is_err());
        assert!(MetricSpec::parse("bad name").is_err());
        assert!(MetricSpec::parse("").is_err());
    }

    #[test]
    fn engine_configs_override_and_add() {
        let cfg = EndpointPickerConfig::parse(
            r#"
plugins:
- type: metrics-data-source
  parameters: {path: /custom}
- type: core-metrics-extractor
  parameters:
    engineLabelKey: engine
    defaultEngine: jetstream
    engineConfigs:
    - name: jetstream
      queuedRequestsSpec: jetstream_queue_size
      kvUsageSpec: 'jetstream_kv{slot="all"}'
    - name: vllm
      kvUsageSpec: ""
"#,
        )
        .unwrap();
        let s = ScrapeSettings::from_config(&cfg, None, None, None).unwrap();
        assert_eq!(s.path, "/custom");
        assert_eq!(s.default_engine, "jetstream");
        let j = &s.engines["jetstream"];
        assert_eq!(j.queued.as_ref().unwrap().name, "jetstream_queue_size");
        assert_eq!(j.kv_usage[0].labels, vec![("slot".into(), "all".into())]);
        assert!(s.engines["vllm"].kv_usage.is_empty(), "empty spec disables");
        assert!(
            s.engines["vllm"].queued.is_some(),
            "partial override keeps the rest"
        );
    }

    #[test]
    fn flags_and_errors() {
        let cfg = EndpointPickerConfig::parse("plugins: []").unwrap();
        let s = ScrapeSettings::from_config(&cfg, Some("http"), Some("/m"), Some(9000)).unwrap();
        assert_eq!((s.path.as_str(), s.port_override), ("/m", Some(9000)));
        assert!(matches!(
            ScrapeSettings::from_config(&cfg, Some("https"), None, None),
            Err(SettingsError::Scheme(_))
        ));
        let cfg = EndpointPickerConfig::parse(
            "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: nope}\n",
        )
        .unwrap();
        assert!(matches!(
            ScrapeSettings::from_config(&cfg, None, None, None),
            Err(SettingsError::UnknownDefault(_))
        ));
    }
}
