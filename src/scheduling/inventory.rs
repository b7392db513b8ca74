//! Every plugin type an `EndpointPickerConfig` may name, and what this picker
//! does with it.
//!
//! The list is the union of the types registered by GIE v1.5.0's picker
//! (`cmd/epp/runner/runner.go`, `registerInTreePlugins`) and by
//! llm-d-router's current main (the same function, which also registers the
//! deprecated aliases), plus our own. Each type either works with upstream's
//! parameter names, is accepted because something of ours already behaves
//! the same way (`Mapped`), or is refused at startup with the nearest type we
//! support, so a config written for the Go picker never half-works silently.
//! A type in neither list is refused too, with the list of supported types.
//!
//! The README's plugin table is generated from [`INVENTORY`] and a unit test
//! keeps the two identical.

/// Which project documents and registers a plugin type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// GIE v1.5.0 and llm-d-router both register it.
    Both,
    /// Only GIE v1.5.0 (dropped by llm-d-router).
    Gie,
    /// Only llm-d-router.
    Router,
    /// Ours.
    Ours,
}

impl Origin {
    pub fn label(self) -> &'static str {
        match self {
            Self::Both => "GIE v1.5, llm-d-router",
            Self::Gie => "GIE v1.5",
            Self::Router => "llm-d-router",
            Self::Ours => "ours",
        }
    }
}

/// Where a plugin sits in a scheduling profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Filter,
    Scorer,
    Picker,
    /// Accepted but not referenced from a profile: data layer, parser,
    /// profile handler, producer; configured through its parameters.
    Other,
}

/// What this picker does with a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Implemented, with upstream's parameter names and semantics.
    Works,
    /// Accepted; the behaviour is the named mechanism of ours.
    Mapped(&'static str),
    /// Refused at startup: `what` the plugin does upstream, and the nearest
    /// type (or mechanism) we support.
    Refused {
        what: &'static str,
        nearest: &'static str,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct PluginType {
    pub name: &'static str,
    pub origin: Origin,
    pub kind: Kind,
    pub status: Status,
    /// Parameter names read (others are logged and ignored).
    pub params: &'static [&'static str],
}

const fn works(
    name: &'static str,
    origin: Origin,
    kind: Kind,
    params: &'static [&'static str],
) -> PluginType {
    PluginType {
        name,
        origin,
        kind,
        status: Status::Works,
        params,
    }
}

const fn mapped(
    name: &'static str,
    origin: Origin,
    kind: Kind,
    to: &'static str,
    params: &'static [&'static str],
) -> PluginType {
    PluginType {
        name,
        origin,
        kind,
        status: Status::Mapped(to),
        params,
    }
}

const fn refused(
    name: &'static str,
    origin: Origin,
    what: &'static str,
    nearest: &'static str,
) -> PluginType {
    PluginType {
        name,
        origin,
        kind: Kind::Other,
        status: Status::Refused { what, nearest },
        params: &[],
    }
}

pub const PREFIX_PARAMS: &[&str] = &[
    "blockSizeTokens",
    "blockSize",
    "maxPrefixBlocksToMatch",
    "maxPrefixTokensToMatch",
    "lruCapacityPerServer",
    "autoTune",
];

const PREFILL_COST_PARAMS: &[&str] = &[
    "blockSizeTokens",
    "blockSize",
    "maxPrefixBlocksToMatch",
    "maxPrefixTokensToMatch",
    "lruCapacityPerServer",
    "autoTune",
    "backlogWeight",
    "prefillRequestTokens",
    "uncachedWeight",
    "decodeTokensPerRequest",
    "foreignTokensPerRequest",
    "kvHighWatermark",
    "kvRequestTokens",
    "loraLoadTokens",
    "loraEvictTokens",
];

const PICKER_PARAMS: &[&str] = &["maxNumOfEndpoints"];

/// `strategy` encoded_endpoint_header only; `profileName` must be empty;
/// `sessionIdConfig` belongs to the refused session_id strategy.
const SESSION_PARAMS: &[&str] = &[
    "strategy",
    "profileName",
    "encodedEndpointHeaderConfig",
    "sessionIdConfig",
];

const FLOW_CONTROL: &str = "flow-control policy we do not implement";
const SHEDDING: &str =
    "utilization-detector (sheddable requests get 429 while the pool is saturated)";
const FC_POLICIES: &str = "the flowControl fairness and ordering policies (global-strict, round-robin, least-served, fcfs, edf)";
const PD: &str = "llm-d prefill/decode disaggregation";
const MULTICLUSTER: &str = "llm-d multi-cluster pool aggregation";
const LATENCY: &str = "latency predictor (a trained model of TTFT/TPOT)";

use Kind::{Filter, Other, Picker, Scorer};
use Origin::{Both, Gie, Ours, Router};

/// The inventory, grouped by kind. Sources: GIE v1.5.0 and llm-d-router main
/// `cmd/epp/runner/runner.go` (`registerInTreePlugins`) for the names, each
/// plugin's package (its factory's parameter struct and README) for the
/// parameters.
pub const INVENTORY: &[PluginType] = &[
    // Scorers.
    works("queue-scorer", Both, Scorer, &[]),
    works("kv-cache-utilization-scorer", Both, Scorer, &[]),
    works("running-requests-size-scorer", Both, Scorer, &[]),
    works("prefix-cache-scorer", Both, Scorer, PREFIX_PARAMS),
    works("lora-affinity-scorer", Both, Scorer, &[]),
    works(
        "token-load-scorer",
        Both,
        Scorer,
        &["queueThresholdTokens", "inFlightLoadProducerName"],
    ),
    works(
        "active-request-scorer",
        Router,
        Scorer,
        &["idleThreshold", "maxBusyScore", "requestTimeout"],
    ),
    works("load-aware-scorer", Router, Scorer, &["threshold"]),
    works(
        "no-hit-lru-scorer",
        Router,
        Scorer,
        &[
            "lruSize",
            "prefixPluginType",
            "prefixPluginName",
            "prefixMatchInfoProducerName",
        ],
    ),
    works("session-affinity-scorer", Router, Scorer, SESSION_PARAMS),
    works(
        "context-length-aware",
        Router,
        Scorer,
        &["label", "enableFiltering"],
    ),
    works(
        "precise-prefix-cache-scorer",
        Router,
        Scorer,
        &[
            "tokenProcessorConfig",
            "indexerConfig",
            "kvEventsConfig",
            "speculativeIndexing",
            "speculativeTTL",
        ],
    ),
    refused(
        "mm-embeddings-cache-scorer",
        Router,
        "multimodal embeddings cache affinity",
        "prefix-cache-scorer",
    ),
    refused(
        "header-label-affinity-scorer",
        Router,
        "prefers endpoints whose label equals a request header",
        "label-selector-filter",
    ),
    refused(
        "endpoint-attribute-scorer",
        Router,
        "scores a numeric data-layer endpoint attribute",
        "queue-scorer",
    ),
    refused(
        "topology-affinity-scorer",
        Router,
        "topology (zone, rack) affinity",
        "label-selector-filter",
    ),
    refused("latency-scorer", Both, LATENCY, "prefill-cost-scorer"),
    refused(
        "predicted-latency-scorer",
        Gie,
        LATENCY,
        "prefill-cost-scorer",
    ),
    refused(
        "multicluster-queue-scorer",
        Router,
        MULTICLUSTER,
        "queue-scorer",
    ),
    refused(
        "multicluster-kv-cache-utilization-scorer",
        Router,
        MULTICLUSTER,
        "kv-cache-utilization-scorer",
    ),
    refused(
        "multicluster-prefix-cache-scorer",
        Router,
        MULTICLUSTER,
        "prefix-cache-scorer",
    ),
    works("prefill-cost-scorer", Ours, Scorer, PREFILL_COST_PARAMS),
    // Filters, and the saturation detectors that also filter.
    works("header-based-testing-filter", Both, Filter, &[]),
    works(
        "prefix-cache-affinity-filter",
        Both,
        Filter,
        &[
            "affinityThreshold",
            "explorationProbability",
            "maxTTFTPenaltyMs",
        ],
    ),
    works(
        "utilization-detector",
        Both,
        Filter,
        &["queueDepthThreshold", "kvCacheUtilThreshold", "headroom"],
    ),
    works(
        "concurrency-detector",
        Both,
        Filter,
        &[
            "concurrencyMode",
            "maxConcurrency",
            "maxTokenConcurrency",
            "headroom",
            "inFlightLoadProducerName",
        ],
    ),
    refused(
        "slo-headroom-tier-filter",
        Both,
        LATENCY,
        "prefill-cost-scorer",
    ),
    works(
        "label-selector-filter",
        Router,
        Filter,
        &["matchLabels", "matchExpressions"],
    ),
    mapped(
        "by-label-selector",
        Router,
        Filter,
        "label-selector-filter (deprecated alias)",
        &["matchLabels", "matchExpressions"],
    ),
    works(
        "by-label",
        Router,
        Filter,
        &["label", "validValues", "allowsNoLabel"],
    ),
    works("encode-filter", Router, Filter, &[]),
    works("prefill-filter", Router, Filter, &[]),
    works("decode-filter", Router, Filter, &[]),
    works(
        "utilization-filter",
        Router,
        Filter,
        &["conditions", "fallbackOnEmpty", "inFlightLoadProducerName"],
    ),
    works("session-affinity-filter", Router, Filter, SESSION_PARAMS),
    refused(
        "endpoint-attribute-filter",
        Router,
        "filters on data-layer endpoint attributes",
        "label-selector-filter",
    ),
    refused(
        "topology-affinity-filter",
        Router,
        "topology (zone, rack) affinity",
        "label-selector-filter",
    ),
    refused(
        "multicluster-session-affinity-filter",
        Router,
        MULTICLUSTER,
        "session-affinity-filter",
    ),
    // Pickers.
    works("max-score-picker", Both, Picker, PICKER_PARAMS),
    works("random-picker", Both, Picker, PICKER_PARAMS),
    works("weighted-random-picker", Both, Picker, PICKER_PARAMS),
    works("round-robin-picker", Ours, Picker, PICKER_PARAMS),
    // Profile handlers and prefill/decode disaggregation.
    works("single-profile-handler", Both, Other, &[]),
    refused(
        "disagg-profile-handler",
        Router,
        PD,
        "single-profile-handler",
    ),
    refused("pd-profile-handler", Router, PD, "single-profile-handler"),
    refused(
        "disagg-headers-handler",
        Router,
        PD,
        "single-profile-handler",
    ),
    refused(
        "prefill-header-handler",
        Router,
        PD,
        "single-profile-handler",
    ),
    refused(
        "always-disagg-pd-decider",
        Router,
        PD,
        "single-profile-handler",
    ),
    refused(
        "prefix-based-pd-decider",
        Router,
        PD,
        "single-profile-handler",
    ),
    refused(
        "always-disagg-multimodal-decider",
        Router,
        PD,
        "single-profile-handler",
    ),
    refused(
        "data-parallel-profile-handler",
        Router,
        "llm-d data-parallel rank routing (x-data-parallel-host-port)",
        "single-profile-handler",
    ),
    refused(
        "header-profile-handler",
        Router,
        "scheduling profile chosen by a request header",
        "single-profile-handler",
    ),
    // Request data producers.
    works("approx-prefix-cache-producer", Both, Other, PREFIX_PARAMS),
    mapped(
        "inflight-load-producer",
        Both,
        Other,
        "the endpoint store's own accounting: requests in flight and uncached prompt tokens until the first response byte (addEstimatedOutputTokens is refused)",
        &[
            "addEstimatedOutputTokens",
            "outputRatio",
            "maxEstimatedOutputTokens",
            "prefixMatchInfoProducerName",
            "syncCrossReplicaState",
        ],
    ),
    mapped(
        "token-producer",
        Router,
        Other,
        "the built-in prompt-length estimate (4 bytes per token); a real tokenizer (modelName, vllm, udsTokenizerConfig) is refused",
        &["estimate"],
    ),
    mapped(
        "tokenizer",
        Router,
        Other,
        "token-producer (deprecated alias)",
        &["estimate"],
    ),
    refused(
        "precise-prefix-cache-producer",
        Router,
        "prefix index from vLLM KV-cache events",
        "approx-prefix-cache-producer",
    ),
    refused(
        "burst-prefix-cache-producer",
        Router,
        "spreads bursts of one prefix group over replicas",
        "approx-prefix-cache-producer",
    ),
    refused(
        "p2p-source-producer",
        Router,
        "peer-to-peer KV-cache source for disaggregation",
        "approx-prefix-cache-producer",
    ),
    refused(
        "mm-embeddings-cache-producer",
        Router,
        "multimodal embeddings cache index",
        "approx-prefix-cache-producer",
    ),
    refused(
        "multicluster-approx-prefix-cache-producer",
        Router,
        MULTICLUSTER,
        "approx-prefix-cache-producer",
    ),
    refused(
        "predicted-latency-producer",
        Both,
        LATENCY,
        "prefill-cost-scorer",
    ),
    refused(
        "session-id-producer",
        Router,
        "session id from a header or cookie (session_id affinity)",
        "session-affinity-scorer",
    ),
    // Admission, request and response hooks.
    refused("latency-slo-admitter", Both, LATENCY, SHEDDING),
    refused(
        "probabilistic-admitter",
        Router,
        "probabilistic admission under load",
        SHEDDING,
    ),
    refused(
        "disaggregatedset-rollout-screener",
        Router,
        "keeps prefill and decode pods of one rollout revision together",
        "label-selector-filter",
    ),
    refused(
        "request-attribute-reporter",
        Both,
        "request attributes as Envoy dynamic metadata",
        "none (token usage is exported as inference_objective_*_tokens metrics)",
    ),
    mapped(
        "destination-endpoint-served-verifier",
        Both,
        Other,
        "the x-conformance-test-served-endpoint echo (--echo-served-endpoint)",
        &[],
    ),
    refused(
        "agent-identity",
        Router,
        "agent session identity for flow-control fairness",
        "session-affinity-scorer",
    ),
    // Parsers.
    works("openai-parser", Both, Other, &[]),
    mapped(
        "passthrough-parser",
        Both,
        Other,
        "paths the OpenAI parser does not claim are passed through unparsed and routed by load",
        &[],
    ),
    refused(
        "vllmgrpc-parser",
        Both,
        "vLLM gRPC engine protocol parser",
        "openai-parser",
    ),
    refused(
        "vllmhttp-parser",
        Router,
        "vLLM native HTTP API parser",
        "openai-parser",
    ),
    refused(
        "sglanghttp-parser",
        Router,
        "SGLang native HTTP API parser",
        "openai-parser",
    ),
    refused(
        "anthropic-parser",
        Router,
        "Anthropic Messages API parser",
        "openai-parser",
    ),
    refused(
        "vertexai-parser",
        Router,
        "Vertex AI API parser",
        "openai-parser",
    ),
    // Data layer.
    works(
        "metrics-data-source",
        Both,
        Other,
        &["scheme", "path", "insecureSkipVerify"],
    ),
    works(
        "core-metrics-extractor",
        Both,
        Other,
        &["engineLabelKey", "defaultEngine", "engineConfigs"],
    ),
    refused(
        "k8s-notification-source",
        Both,
        "Kubernetes object events for data-layer extractors",
        "Kubernetes discovery (--pool-name)",
    ),
    refused(
        "endpoint-notification-source",
        Both,
        "endpoint add and remove events for data-layer extractors",
        "the endpoint store (built in)",
    ),
    refused(
        "models-data-source",
        Router,
        "scrapes /v1/models of each server",
        "metrics-data-source",
    ),
    refused(
        "models-data-extractor",
        Router,
        "served models and adapters from /v1/models",
        "core-metrics-extractor",
    ),
    refused(
        "dcgm-data-source",
        Router,
        "NVIDIA DCGM GPU metrics",
        "metrics-data-source",
    ),
    refused(
        "dcgm-extractor",
        Router,
        "NVIDIA DCGM GPU metrics",
        "core-metrics-extractor",
    ),
    refused(
        "topology-extractor",
        Router,
        "endpoint topology from node labels",
        "label-selector-filter",
    ),
    refused(
        "multicluster-metrics-data-source",
        Router,
        MULTICLUSTER,
        "metrics-data-source",
    ),
    refused(
        "multicluster-metrics-extractor",
        Router,
        MULTICLUSTER,
        "core-metrics-extractor",
    ),
    refused(
        "file-discovery",
        Router,
        "endpoints from a file, as a config plugin",
        "the --endpoints-file flag",
    ),
    refused(
        "multicluster-file-discovery",
        Router,
        MULTICLUSTER,
        "the --endpoints-file flag",
    ),
    // Flow control (`featureGates: [flowControl]`, `flowControl.priorityBands`).
    works("global-strict-fairness-policy", Both, Other, &[]),
    works("round-robin-fairness-policy", Both, Other, &[]),
    works("least-served-fairness-policy", Ours, Other, &[]),
    refused("program-aware-fairness", Router, FLOW_CONTROL, FC_POLICIES),
    works("fcfs-ordering-policy", Both, Other, &[]),
    works("edf-ordering-policy", Both, Other, &[]),
    refused(
        "slo-deadline-ordering-policy",
        Both,
        FLOW_CONTROL,
        FC_POLICIES,
    ),
    refused("static-usage-limit-policy", Both, FLOW_CONTROL, FC_POLICIES),
    refused(
        "sheddable-eviction-filter",
        Router,
        FLOW_CONTROL,
        FC_POLICIES,
    ),
    refused(
        "priority-then-time-eviction-order-policy",
        Router,
        FLOW_CONTROL,
        FC_POLICIES,
    ),
    refused(
        "priority-holdback-policy",
        Router,
        FLOW_CONTROL,
        FC_POLICIES,
    ),
    refused(
        "soft-reflective-ceiling-policy",
        Router,
        FLOW_CONTROL,
        FC_POLICIES,
    ),
];

/// The inventory entry of a type.
pub fn lookup(plugin_type: &str) -> Option<&'static PluginType> {
    INVENTORY.iter().find(|t| t.name == plugin_type)
}

/// The types a config may use, for the message about an unknown one.
pub fn supported() -> impl Iterator<Item = &'static str> {
    INVENTORY
        .iter()
        .filter(|t| !matches!(t.status, Status::Refused { .. }))
        .map(|t| t.name)
}

/// The README's plugin table (type, origin, status, parameters).
pub fn markdown_table() -> String {
    let mut out = String::from("| type | origin | status | parameters |\n|---|---|---|---|\n");
    for t in INVENTORY {
        let status = match t.status {
            Status::Works => "works".to_owned(),
            Status::Mapped(to) => format!("mapped to {to}"),
            Status::Refused { what, nearest } => format!("refused ({what}) → {nearest}"),
        };
        let params = if t.params.is_empty() {
            "—".to_owned()
        } else {
            t.params
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | {} | {status} | {params} |\n",
            t.name,
            t.origin.label()
        ));
    }
    out
}
