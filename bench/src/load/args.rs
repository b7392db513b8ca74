//! Flags of the load generator's workloads (clap derive, flattened into the
//! `epp-bench` subcommands).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// POST /v1/completions with a `prompt`.
    Completions,
    /// POST /v1/chat/completions with `messages`.
    Chat,
}

/// Flags every workload takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Base URL of the OpenAI-compatible endpoint (Envoy, or one pod directly).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub target: String,
    /// Model name sent in every request.
    #[arg(long, default_value = "Qwen/Qwen2.5-3B-Instruct")]
    pub model: String,
    /// Pod base URLs whose /metrics give the fleet prefix-cache hit rate
    /// (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub pod_metrics: Vec<String>,
    /// Shorthand for --pod-metrics: N vllm-sim pods on consecutive ports.
    #[arg(long)]
    pub sim_pods: Option<u16>,
    /// First port of the --sim-pods pods.
    #[arg(long, default_value_t = 8000)]
    pub sim_base_port: u16,
    /// Host of the --sim-pods pods.
    #[arg(long, default_value = "127.0.0.1")]
    pub sim_host: String,
    /// Send non-streaming requests (no time to first token is measured).
    #[arg(long)]
    pub no_stream: bool,
    /// Per phase: no request starts after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub max_duration: f64,
    /// Per request, in seconds (counted as a "timeout" error).
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// The pods' KV block size, for the ideal hit rate.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Bytes of generated text per token (the simulator's --chars-per-token).
    #[arg(long, default_value_t = 4)]
    pub chars_per_token: usize,
    /// Seed of the generated text and of Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Name of the setup under test, used by `epp-bench report` (default: the target).
    #[arg(long)]
    pub label: Option<String>,
    /// Write the full result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Append every request to this file as one JSON line (setup, phase,
    /// job, pod, TTFT, E2E, cached tokens or the error).
    #[arg(long)]
    pub records: Option<PathBuf>,
}

impl CommonArgs {
    /// Aims the workload at a stack that `compare` or `local` started: its
    /// gateway, its pods' metrics for the hit rate, and `label` for the
    /// report. Those commands save the results themselves, so no `--json`.
    pub fn point_at(&mut self, gateway: &str, pods: &[String], label: &str) {
        self.target = gateway.to_owned();
        self.pod_metrics = pods.to_vec();
        self.sim_pods = None;
        self.label = Some(label.to_owned());
        self.json = None;
    }
}

/// Closed loop (`--concurrency`) or open loop (`--rate`).
#[derive(Debug, Clone, Args)]
pub struct PaceArgs {
    /// Closed loop: requests (sessions for multi-turn) in flight at once.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: Poisson arrivals per second (sessions for multi-turn).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: cap on jobs in flight (the dispatcher waits beyond it).
    #[arg(long, default_value_t = 10_000)]
    pub max_inflight: usize,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub api: Api,
}

#[derive(Debug, Clone, Args)]
pub struct SharedPrefixArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub pace: PaceArgs,
    /// Groups (distinct system prompts).
    #[arg(long, default_value_t = 150)]
    pub groups: usize,
    /// Prompts per group.
    #[arg(long, default_value_t = 5)]
    pub prompts_per_group: usize,
    /// Tokens of each group's shared system prompt.
    #[arg(long, default_value_t = 4000)]
    pub system_tokens: usize,
    /// Tokens of each prompt's own question (at least 1).
    #[arg(long, default_value_t = 100)]
    pub question_tokens: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    pub output_tokens: usize,
    /// Send prompts in a seeded random order instead of round-robin over groups.
    #[arg(long)]
    pub shuffle: bool,
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub api: Api,
    /// Send this fraction of the requests (0..=1) straight to a pod, drawn
    /// uniformly at random per request, instead of through --target.
    #[arg(long, default_value_t = 0.0)]
    pub direct_fraction: f64,
    /// KV-cache blocks of each pod, for the ideal hit rate of bounded caches
    /// (default: unbounded; `compare` gives the simulated pods' size).
    #[arg(long)]
    pub kv_blocks_per_pod: Option<usize>,
    /// Restart every pod just before this fraction of the requests has been
    /// sent (0.5 or 50%); needs pods in this process (`compare`, `local`).
    #[arg(long, value_parser = super::direct::parse_fraction)]
    pub restart_pods_at: Option<f64>,
    /// How to restart the pods: set by the command that owns them.
    #[arg(skip)]
    pub restarter: Option<crate::sim::FleetRestarter>,
}

#[derive(Debug, Clone, Args)]
pub struct LongPromptArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Prompt size in KiB.
    #[arg(long, default_value_t = 220)]
    pub prompt_kb: usize,
    /// Concurrency ladder, one phase per step.
    #[arg(long, value_delimiter = ',', default_value = "20,60,100,150")]
    pub ladder: Vec<usize>,
    /// Requests per ladder step.
    #[arg(long, default_value_t = 300)]
    pub requests_per_step: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    pub output_tokens: usize,
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub api: Api,
}

#[derive(Debug, Clone, Args)]
pub struct MultiTurnArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub pace: PaceArgs,
    /// Conversations.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Turns per conversation (each resends the whole history).
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Tokens of each session's system prompt.
    #[arg(long, default_value_t = 1000)]
    pub system_tokens: usize,
    /// Tokens of each user message.
    #[arg(long, default_value_t = 200)]
    pub user_tokens: usize,
    /// Output tokens per turn.
    #[arg(long, default_value_t = 64)]
    pub output_tokens: usize,
    /// Pause between a reply and the session's next turn, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub think_time_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct LoraArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub pace: PaceArgs,
    /// Requests.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// LoRA adapters, named lora-0 .. lora-(N-1); the pods must serve them
    /// (vllm-sim --lora-adapters; `compare lora` sets it).
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    /// Exponent of the adapters' Zipf popularity (adapter k has weight
    /// 1/(k+1)^s; 0 is uniform).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Share of requests for the base model (no adapter), 0..=1.
    #[arg(long, default_value_t = 0.1)]
    pub base_share: f64,
    /// Tokens of each adapter's (and the base model's) system prompt.
    #[arg(long, default_value_t = 500)]
    pub system_tokens: usize,
    /// Tokens of each request's own question (at least 1).
    #[arg(long, default_value_t = 100)]
    pub question_tokens: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 32)]
    pub output_tokens: usize,
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub api: Api,
}

/// The tenants workload: tenants at their own Poisson rates, each request
/// tagged with its tenant's fairness id and an objective (critical or
/// standard), optionally with a TTFT objective.
#[derive(Debug, Clone, Args)]
pub struct TenantsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Tenants as NAME=RATE (Poisson arrivals per second), comma-separated;
    /// NAME is sent as `x-gateway-inference-fairness-id`.
    #[arg(long, value_delimiter = ',', default_value = "heavy=8,light=2")]
    pub tenants: Vec<String>,
    /// Seconds of arrivals.
    #[arg(long, default_value_t = 40.0)]
    pub duration: f64,
    /// Share (0..=1) of every tenant's requests sent with --critical-objective;
    /// the rest carry --standard-objective.
    #[arg(long, default_value_t = 0.1)]
    pub critical_share: f64,
    /// `x-gateway-inference-objective` of the critical requests.
    #[arg(long, default_value = "critical")]
    pub critical_objective: String,
    /// `x-gateway-inference-objective` of the other requests.
    #[arg(long, default_value = "standard")]
    pub standard_objective: String,
    /// Prompt tokens per request (distinct prompts, no shared prefix).
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 32)]
    pub output_tokens: usize,
    /// Send `x-slo-ttft-ms` with this value on every request, and report
    /// the share of requests meeting it.
    #[arg(long)]
    pub slo_ttft_ms: Option<u64>,
    /// Cap on requests in flight (the dispatcher waits beyond it).
    #[arg(long, default_value_t = 10_000)]
    pub max_inflight: usize,
    #[arg(long, value_enum, default_value_t = Api::Completions)]
    pub api: Api,
}
