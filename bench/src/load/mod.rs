//! `epp-bench`'s load generator: workloads ([`workload`]), pacing and
//! measurement ([`runner`], [`client`], [`sse`]), and the result schema
//! ([`result`]) that `--json` writes and the report writer reads.
//!
//! What is measured, per phase: throughput of successful requests over the
//! phase's wall time; time to first token (streaming: until the first SSE
//! event carrying generated text is complete) and end-to-end latency, each
//! with mean/p50/p95/p99; errors by kind; requests per pod from the
//! `x-inference-pod` header; and the fleet prefix-cache hit rate as the delta
//! of `vllm:prefix_cache_hits_total` over `vllm:prefix_cache_queries_total`
//! summed over the pods, scraped right before and right after the phase (so
//! the pods must serve nothing else meanwhile); with the simulator's LoRA
//! counters on the pods, adapter loads and evictions the same way.
//!
//! [`records`] writes each request's own measurements for later analysis.
//!
//! [`args`] holds the workloads' flags, shared by the workload subcommands
//! ([`cli`]), `compare`, `local` and the tests.

pub mod args;
pub mod cli;
pub mod client;
pub mod direct;
pub mod records;
pub mod result;
pub mod run;
pub mod runner;
pub mod sse;
pub mod stats;
pub mod tenants;
pub mod workload;

pub use result::{BenchRun, CacheStats, LoraStats, PhaseResult};
pub use run::{
    run_long_prompt, run_lora, run_multi_turn, run_seed, run_shared_prefix, run_tenants,
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("scraping {url}: {msg}")]
    Scrape { url: String, msg: String },
    #[error("undecodable response: {0}")]
    Decode(String),
    #[error("serializing the result")]
    Serialize(#[source] serde_json::Error),
    #[error("writing {}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
