//! Simulator flags. Defaults are calibrated against the seed deployment
//! (Qwen/Qwen2.5-3B-Instruct on a TPU v6e-4): see bench/README.md for the
//! measured table.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::SimError;

/// Adapters a pod can be configured with: the engine keeps adapter sets as
/// bitmasks of one `u64`. vLLM has no such limit; a benchmark with more
/// adapters than this would need a wider set type.
pub const MAX_LORA_ADAPTERS: usize = 64;

/// The model a request runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Base,
    /// Index into [`SimConfig::lora_adapters`].
    Adapter(usize),
}

/// How KV-event payloads are shaped (both decode the same in the picker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvEventsEncoding {
    /// Current vLLM: the batch `[ts, events, rank?]`, each event a map
    /// keyed by `"type"`.
    Map,
    /// vLLM before its mid-2026 change (and SGLang): batch and events
    /// positional arrays, the event's tag first.
    Array,
}

/// One set of engine and server parameters, shared by every pod of a fleet.
#[derive(Debug, Clone, Args)]
pub struct SimConfig {
    /// Number of independent pods to host in this process.
    #[arg(long, default_value_t = 1)]
    pub pods: u16,
    /// Port of pod 0; pod i listens on base-port + i. 0 picks a free port per pod.
    #[arg(long, default_value_t = 8000)]
    pub base_port: u16,
    /// Address to listen on (loopback unless you mean it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Pods are named <prefix><index>; the name is sent in `x-inference-pod`.
    #[arg(long, default_value = "sim-")]
    pub pod_name_prefix: String,
    /// Served model name (requests naming another model get 404).
    #[arg(long, default_value = "Qwen/Qwen2.5-3B-Instruct")]
    pub model: String,

    /// Running slots: requests decoded concurrently (vLLM --max-num-seqs).
    #[arg(long, default_value_t = 32)]
    pub max_num_seqs: usize,
    /// Waiting-queue capacity; an arrival beyond it gets 429.
    #[arg(long, default_value_t = 1000)]
    pub max_waiting: usize,
    /// Longest prompt + max_tokens accepted, in tokens (longer gets 400).
    #[arg(long, default_value_t = 65536)]
    pub max_model_len: usize,
    /// KV-cache capacity in blocks. The default (131072 tokens) holds a few
    /// long shared prefixes (e.g. 32 system prompts of 4000 tokens) but not
    /// hundreds, so cache-blind routing thrashes it.
    #[arg(long, default_value_t = 8192)]
    pub kv_blocks: usize,
    /// Tokens per KV block (the unit of prefix reuse).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Bytes of prompt text per token.
    #[arg(long, default_value_t = 4)]
    pub chars_per_token: usize,
    /// Output tokens when the request sets neither max_tokens nor max_completion_tokens.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: usize,

    /// Fixed cost of every prefill, in milliseconds.
    #[arg(long, default_value_t = 14.0)]
    pub prefill_overhead_ms: f64,
    /// Prefill cost per uncached prompt token, in microseconds (6000 uncached
    /// tokens cost ~0.7 s at the default).
    #[arg(long, default_value_t = 120.0)]
    pub prefill_us_per_token: f64,
    /// Inter-token latency of decode at a batch of one, in milliseconds.
    #[arg(long, default_value_t = 30.0)]
    pub itl_ms: f64,
    /// F in the load factor 1 + (F-1)(running-1)/(max_num_seqs-1): how much a
    /// full batch slows prefill and decode.
    #[arg(long, default_value_t = 1.18)]
    pub time_factor_under_load: f64,
    /// Standard deviation of the Gaussian jitter on every duration, as a
    /// fraction of its mean (0 disables it; clamped to +-70 % of the mean).
    #[arg(long, default_value_t = 0.05)]
    pub jitter: f64,
    /// RNG seed for the jitter (pod i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw each request's jitter from its own body (hashed with `--seed`)
    /// instead of from the pod's RNG in admission order. The same request
    /// then gets the same jitter on whichever pod serves it, so two routing
    /// policies run over the same workload draw the same noise (common
    /// random numbers) and their difference is what routing and the request
    /// path changed.
    #[arg(long)]
    pub jitter_per_request: bool,

    /// LoRA adapters every pod serves besides the base model, comma-separated
    /// (vLLM's `--enable-lora --lora-modules name=path ...`). A request whose
    /// `model` is one of them runs with that adapter; empty disables LoRA.
    #[arg(long, value_delimiter = ',')]
    pub lora_adapters: Vec<String>,
    /// Adapter slots: distinct adapters a pod can run at once (vLLM's
    /// `--max-loras`, default 1 there too).
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// Time to load an adapter into a slot, in milliseconds. An assumption
    /// to set per experiment: it depends on the adapter's size and where it
    /// is loaded from.
    #[arg(long, default_value_t = 100.0)]
    pub lora_load_ms: f64,

    /// Directory holding the model's `tokenizer.json` and chat template, so
    /// the pods cache the token ids the picker computes. Without it a token
    /// is a `--chars-per-token` chunk of the prompt text.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Publish KV-cache events (vLLM's ZeroMQ PUB) on this port for pod 0,
    /// pod i on port + i; 0 picks a free port per pod. Bound on --host.
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// Serve replays of buffered event batches (vLLM's ROUTER
    /// `replay_endpoint`) on this port for pod 0, pod i on port + i; 0
    /// picks a free port per pod. Needs --kv-events-port.
    #[arg(long)]
    pub kv_events_replay_port: Option<u16>,
    /// Topic frame of every event message (vLLM's `topic`).
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// Payload shape: current vLLM's maps or the older positional arrays.
    #[arg(long, value_enum, default_value_t = KvEventsEncoding::Map)]
    pub kv_events_encoding: KvEventsEncoding,
    /// Batches kept for replay (vLLM's `buffer_steps`).
    #[arg(long, default_value_t = 10000)]
    pub kv_events_buffer: usize,
    /// `data_parallel_rank` written into every batch; omitted when unset.
    #[arg(long)]
    pub kv_events_dp_rank: Option<u32>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            pods: 1,
            base_port: 8000,
            host: "127.0.0.1".to_owned(),
            pod_name_prefix: "sim-".to_owned(),
            model: "Qwen/Qwen2.5-3B-Instruct".to_owned(),
            max_num_seqs: 32,
            max_waiting: 1000,
            max_model_len: 65536,
            kv_blocks: 8192,
            block_size: 16,
            chars_per_token: 4,
            default_max_tokens: 16,
            prefill_overhead_ms: 14.0,
            prefill_us_per_token: 120.0,
            itl_ms: 30.0,
            time_factor_under_load: 1.18,
            jitter: 0.05,
            seed: 0,
            jitter_per_request: false,
            lora_adapters: Vec::new(),
            max_loras: 1,
            lora_load_ms: 100.0,
            tokenizer: None,
            kv_events_port: None,
            kv_events_replay_port: None,
            kv_events_topic: String::new(),
            kv_events_encoding: KvEventsEncoding::Map,
            kv_events_buffer: 10000,
            kv_events_dp_rank: None,
        }
    }
}

impl SimConfig {
    /// Rejects combinations the engine model cannot honour, so a typo fails at
    /// start-up instead of as a stuck or panicking pod.
    pub fn validate(&self) -> Result<(), SimError> {
        let err = |m: &str| Err(SimError::Config(m.to_owned()));
        if self.pods == 0 {
            return err("--pods must be at least 1");
        }
        if self.max_num_seqs == 0 {
            return err("--max-num-seqs must be at least 1");
        }
        if self.block_size == 0 || self.chars_per_token == 0 {
            return err("--block-size and --chars-per-token must be at least 1");
        }
        if self.kv_blocks == 0 {
            return err("--kv-blocks must be at least 1");
        }
        if self.time_factor_under_load < 1.0 {
            return err("--time-factor-under-load must be >= 1");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return err("--jitter must be within 0..=1");
        }
        for (v, name) in [
            (self.prefill_overhead_ms, "--prefill-overhead-ms"),
            (self.prefill_us_per_token, "--prefill-us-per-token"),
            (self.itl_ms, "--itl-ms"),
            (self.lora_load_ms, "--lora-load-ms"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(SimError::Config(format!("{name} must be >= 0")));
            }
        }
        if self.max_loras == 0 {
            return err("--max-loras must be at least 1");
        }
        if self.lora_adapters.len() > MAX_LORA_ADAPTERS {
            return Err(SimError::Config(format!(
                "--lora-adapters: at most {MAX_LORA_ADAPTERS} adapters"
            )));
        }
        for (i, a) in self.lora_adapters.iter().enumerate() {
            if a.is_empty() || a.contains(',') || *a == self.model {
                return Err(SimError::Config(format!(
                    "--lora-adapters: {a:?} is not a usable adapter name"
                )));
            }
            if self.lora_adapters[..i].contains(a) {
                return Err(SimError::Config(format!(
                    "--lora-adapters: {a:?} is listed twice"
                )));
            }
        }
        for (port, name) in [
            (Some(self.base_port), "--base-port"),
            (self.kv_events_port, "--kv-events-port"),
            (self.kv_events_replay_port, "--kv-events-replay-port"),
        ] {
            if let Some(p) = port
                && p != 0
                && u32::from(p) + u32::from(self.pods) - 1 > 65535
            {
                return Err(SimError::Config(format!("{name} + --pods exceeds 65535")));
            }
        }
        if self.kv_events_replay_port.is_some() && self.kv_events_port.is_none() {
            return err("--kv-events-replay-port needs --kv-events-port");
        }
        Ok(())
    }

    /// Batch load factor for `running` admitted requests.
    pub fn load_factor(&self, running: usize) -> f64 {
        if self.max_num_seqs <= 1 || running <= 1 {
            return 1.0;
        }
        let r = (running.min(self.max_num_seqs) - 1) as f64;
        1.0 + (self.time_factor_under_load - 1.0) * r / (self.max_num_seqs - 1) as f64
    }

    /// Unscaled prefill time for `uncached` prompt tokens.
    pub fn prefill_base(&self, uncached: usize) -> Duration {
        let us = self.prefill_overhead_ms * 1000.0 + self.prefill_us_per_token * uncached as f64;
        Duration::from_secs_f64(us / 1e6)
    }

    pub fn itl_base(&self) -> Duration {
        Duration::from_secs_f64(self.itl_ms / 1000.0)
    }

    /// What a request's `model` names, `None` when the pod serves no such
    /// model.
    pub fn resolve_model(&self, model: &str) -> Option<Served> {
        if model == self.model {
            return Some(Served::Base);
        }
        self.lora_adapters
            .iter()
            .position(|a| a == model)
            .map(Served::Adapter)
    }

    pub fn lora_load_base(&self) -> Duration {
        Duration::from_secs_f64(self.lora_load_ms / 1000.0)
    }

    /// Tokens in `bytes` bytes of prompt text.
    pub fn tokens_for_bytes(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.chars_per_token)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimConfig,
    }

    #[test]
    fn default_matches_flag_defaults() {
        let parsed = Cli::parse_from(["vllm-sim"]).sim;
        assert_eq!(format!("{parsed:?}"), format!("{:?}", SimConfig::default()));
        assert!(parsed.validate().is_ok());
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            SimConfig {
                pods: 0,
                ..SimConfig::default()
            },
            SimConfig {
                time_factor_under_load: 0.5,
                ..SimConfig::default()
            },
            SimConfig {
                jitter: 2.0,
                ..SimConfig::default()
            },
            SimConfig {
                itl_ms: -1.0,
                ..SimConfig::default()
            },
            SimConfig {
                base_port: 65535,
                pods: 2,
                ..SimConfig::default()
            },
            SimConfig {
                max_loras: 0,
                ..SimConfig::default()
            },
            SimConfig {
                lora_adapters: vec!["a".into(), "a".into()],
                ..SimConfig::default()
            },
            SimConfig {
                lora_adapters: vec![SimConfig::default().model],
                ..SimConfig::default()
            },
            SimConfig {
                lora_adapters: (0..65).map(|i| format!("a{i}")).collect(),
                ..SimConfig::default()
            },
            SimConfig {
                lora_load_ms: f64::NAN,
                ..SimConfig::default()
            },
            SimConfig {
                kv_events_replay_port: Some(0),
                ..SimConfig::default()
            },
            SimConfig {
                kv_events_port: Some(65535),
                pods: 2,
                ..SimConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
