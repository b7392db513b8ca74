//! The result of a run, as written by `--json` and read by `epp-bench report`.
//! Field names are the stable interface between runs and the report writer;
//! add fields with `#[serde(default)]` so older files still load.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::direct::{RestartStats, SplitStats};
use super::stats::LatencySummary;

/// Version of this schema.
pub const SCHEMA_VERSION: u32 = 1;

/// One invocation of a workload (possibly several phases: the seed scenarios,
/// the long-prompt ladder steps).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRun {
    pub schema: u32,
    /// `epp-bench <version>`.
    pub tool: String,
    /// `seed`, `shared-prefix`, `long-prompt` or `multi-turn`.
    pub workload: String,
    /// Policy or setup under test (`--label`; defaults to the target URL).
    pub label: String,
    pub target: String,
    /// The exact command line that produced this run.
    pub command: String,
    pub started_unix_s: u64,
    /// Cores, CPU model and date of the machine that ran it.
    #[serde(default)]
    pub machine: Option<String>,
    /// Workload parameters, as given.
    pub params: serde_json::Value,
    pub phases: Vec<PhaseResult>,
}

/// Prefix-cache counters summed over the pods, as deltas over one phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    pub hit_tokens: f64,
    pub query_tokens: f64,
    /// hit_tokens / query_tokens (0 when nothing was queried).
    pub hit_rate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseResult {
    pub name: String,
    /// Jobs planned (requests; sessions for multi-turn).
    pub planned_jobs: usize,
    pub concurrency: Option<usize>,
    pub rate_rps: Option<f64>,
    /// Wall time from the first send to the last completion.
    pub duration_s: f64,
    /// The phase stopped issuing work because `--max-duration` elapsed.
    pub hit_max_duration: bool,
    pub requests_sent: usize,
    pub requests_ok: usize,
    /// Failures by kind: an HTTP status ("429"), or "connect", "timeout",
    /// "body", "decode", "incomplete".
    pub errors: BTreeMap<String, usize>,
    /// Successful requests per second of `duration_s`.
    pub throughput_rps: f64,
    pub output_tokens_per_s: f64,
    /// Streaming only: to the first SSE event carrying generated text.
    pub ttft_ms: Option<LatencySummary>,
    pub e2e_ms: Option<LatencySummary>,
    /// Successful requests per pod, from the `x-inference-pod` header.
    pub pod_requests: BTreeMap<String, usize>,
    /// Busiest pod over the mean across pods (pods known from
    /// `--pod-metrics`/`--sim-pods` that served nothing count as zero).
    pub pod_load_max_over_mean: Option<f64>,
    /// Fleet prefix-cache hit rate from the pods' /metrics.
    pub prefix_cache: Option<CacheStats>,
    /// Why `prefix_cache` is missing, when it is.
    #[serde(default)]
    pub prefix_cache_error: Option<String>,
    /// Sum of `usage.prompt_tokens_details.cached_tokens` over sum of
    /// `usage.prompt_tokens`, from the responses (a client-side cross-check).
    pub usage_cached_ratio: Option<f64>,
    /// The workload's hit rate if every repeated block were a hit.
    pub ideal_hit_rate: Option<f64>,
    /// Multi-turn: share of follow-up turns served by the pod that served the
    /// session's previous turn.
    pub stickiness: Option<f64>,
    /// LoRA adapter loads and evictions over the phase, from the pods'
    /// `vllm_sim_lora_adapter_*_total` counters (pods that do not export
    /// them, such as real vLLM, give none).
    #[serde(default)]
    pub lora: Option<LoraStats>,
    /// LoRA workload: successful requests per target (adapter name, or the
    /// base model's) and pod.
    #[serde(default)]
    pub target_pods: Option<BTreeMap<String, BTreeMap<String, usize>>>,
    /// With `--direct-fraction`: requests through the picker and around it.
    #[serde(default)]
    pub split: Option<SplitStats>,
    /// With `--restart-pods-at`.
    #[serde(default)]
    pub restart: Option<RestartStats>,
    /// Requests each picker replica routed (its own
    /// `inference_objective_request_total`), with `--epp-replicas` > 1.
    #[serde(default)]
    pub epp_replica_requests: Option<Vec<Option<f64>>>,
    /// The tenants workload: per tenant and priority class, fairness.
    #[serde(default)]
    pub tenants: Option<TenantsStats>,
    /// With `--kill-replica-at`.
    #[serde(default)]
    pub replica_kill: Option<ReplicaKill>,
}

/// One tenant's requests of one objective (the tenants workload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassStats {
    /// The fairness id sent.
    pub tenant: String,
    /// The objective sent (`x-gateway-inference-objective`).
    pub objective: String,
    pub sent: usize,
    pub ok: usize,
    pub errors: BTreeMap<String, usize>,
    /// Successful requests completed within the arrival window, per second.
    pub goodput_rps: f64,
    pub ttft_ms: Option<LatencySummary>,
    /// With a TTFT objective: successful requests whose TTFT met it, over
    /// the successful ones.
    pub slo_met: Option<f64>,
}

/// A tenant's share of the phase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TenantShare {
    /// Its arrival rate.
    pub offered_rps: f64,
    pub goodput_rps: f64,
    /// Its max-min fair share of the total goodput, given the offered rates.
    pub fair_share_rps: f64,
}

/// The tenants workload's figures over the whole phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantsStats {
    /// Successful requests completed within the arrival window, per second
    /// of it.
    #[serde(default)]
    pub goodput_rps: f64,
    /// The arrival window (the workload's --duration), seconds.
    #[serde(default)]
    pub window_s: f64,
    pub classes: Vec<ClassStats>,
    /// TTFT of the successful requests of each objective, all tenants.
    pub ttft_by_objective: BTreeMap<String, LatencySummary>,
    pub tenants: BTreeMap<String, TenantShare>,
    /// Jain's index over the tenants' goodput.
    pub jain_goodput: Option<f64>,
    /// Jain's index over goodput / max-min fair share (1 when every tenant
    /// gets its fair share).
    pub jain_of_fair_share: Option<f64>,
    /// Refused by the picker with a code of its own (flow control's queue
    /// full or TTL, shedding, SLO admission): never admitted.
    pub refused: usize,
    /// Every other failure (timeouts, resets, the pods' errors): requests
    /// that were admitted and then lost.
    pub lost: usize,
    /// The TTFT objective sent with every request, if any.
    pub slo_ttft_ms: Option<u64>,
    /// Successful requests meeting the TTFT objective over all sent.
    pub slo_met_of_sent: Option<f64>,
    /// Successful requests meeting the TTFT objective over the successful.
    pub slo_met_of_ok: Option<f64>,
    /// The picker's TTFT prediction error (SLO admission's model), from its
    /// `epp_slo_ttft_prediction_ratio` histogram at the end of the run.
    #[serde(default)]
    pub prediction: Option<PredictionStats>,
}

/// Observed over predicted TTFT, from the picker's histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PredictionStats {
    /// Observations compared with a prediction.
    pub count: f64,
    /// Share with observed / predicted within (0.8, 1.25].
    pub within_25pct: f64,
    /// Share within (0.5, 2].
    pub within_2x: f64,
    /// The upper bound of the bucket holding the median ratio.
    pub median_ratio_le: f64,
}

/// One picker replica killed (SIGKILL) mid-run: the fleet's prefix-cache
/// hit rate before and after, from the pods' counters at the kill.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplicaKill {
    /// Seconds after the workload started.
    pub at_s: f64,
    /// Index of the replica killed (0-based, as in `epp_replica_requests`).
    pub replica: usize,
    /// False when the run ended first (nothing was killed).
    pub happened: bool,
    pub before: Option<CacheStats>,
    pub after: Option<CacheStats>,
}

/// Adapter swaps summed over the pods, as deltas over one phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraStats {
    /// Adapters loaded into a slot (the first load of an adapter on a pod
    /// counts too).
    pub loads: f64,
    /// Loads that had to evict an idle adapter.
    pub evictions: f64,
    /// `loads` per 1,000 successful requests.
    pub loads_per_1k_requests: f64,
}

impl PhaseResult {
    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }
}
