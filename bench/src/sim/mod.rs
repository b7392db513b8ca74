//! `vllm-sim`: a stand-in for a vLLM pod, faithful where routing quality is
//! decided (queueing, prefix-cache reuse and eviction, prefill cost) and crude
//! everywhere else (the generated text is filler).
//!
//! # Engine model (one per pod; pods never share state)
//!
//! * **Tokens.** A prompt's text is measured in bytes; one token is
//!   `--chars-per-token` bytes (default 4), rounded up. Chat requests are
//!   rendered to text first (`<|im_start|>{role}\n{content}<|im_end|>\n` per
//!   message, in order, then `<|im_start|>assistant\n`), so a conversation
//!   that grows turn by turn has a stable prefix.
//! * **Slots and queue.** At most `--max-num-seqs` requests run at once. Every
//!   other accepted request waits in one FIFO queue of at most `--max-waiting`
//!   entries; an arrival that finds it full gets HTTP 429. Admission is
//!   strictly in arrival order: if the head of the queue does not fit, nobody
//!   behind it is admitted (vLLM's FCFS scheduler).
//! * **KV cache.** `--kv-blocks` blocks of `--block-size` tokens. The prompt's
//!   full blocks are identified by chained hashes (each block's hash covers the
//!   block's token ids and its parent's hash, so equal hashes mean equal prefixes).
//!   On admission a request references: the longest run of its leading blocks
//!   already in the cache (hits), new hashed blocks for the rest of its full
//!   prompt blocks, and private blocks for the partial last prompt block plus
//!   all `max_tokens` output tokens (reserved up front, so nothing is ever
//!   preempted). As in vLLM the last prompt token is always computed, so a
//!   fully cached prompt still misses its last block. A request that cannot get
//!   enough free blocks waits. When it finishes, its hashed blocks stay cached
//!   but unreferenced, and are evicted least-recently-used first when space is
//!   needed, tail blocks of a prompt before its head blocks (vLLM frees in
//!   reverse order). Blocks referenced by a running request are never evicted.
//!   Output tokens are not hashed: a follow-up turn reuses the previous turn's
//!   prompt blocks, not the reply's.
//! * **Timing.** Time to first token = queue wait + prefill wait + prefill.
//!   Prefill = `--prefill-overhead-ms` + uncached prompt tokens x
//!   `--prefill-us-per-token`. A pod runs one prefill at a time (prefill is
//!   compute-bound), in admission order: a request's prefill starts when the
//!   previous admitted request's prefill ends. Every output token after the
//!   first then takes `--itl-ms`. Both are scaled by the batch load factor
//!   `1 + (F - 1) * (running - 1) / (max_num_seqs - 1)`, F =
//!   `--time-factor-under-load`, with `running` sampled when the prefill is
//!   scheduled and again at each token. Each duration gets Gaussian jitter of
//!   standard deviation `--jitter` x mean, clamped to +-70 %, from a per-pod
//!   RNG seeded by `--seed` and the pod index, so a run with the same arrival
//!   order is reproducible. With `--jitter-per-request` each request draws
//!   its jitter from a hash of its body and `--seed` instead: the same
//!   request is as slow on any pod, whatever else the pod served, so two
//!   routing policies compared on one workload see the same noise.
//!
//! * **LoRA adapters** (with `--lora-adapters`). A request whose `model`
//!   is an adapter's name runs with that adapter; the base model needs none.
//!   A pod has `--max-loras` adapter slots. At admission a request needs
//!   its adapter in a slot: resident already (free), else loaded into an
//!   empty slot, else loaded in place of the least recently used adapter
//!   that no running request uses (an eviction). A load takes
//!   `--lora-load-ms` (jittered) in the prefill lane, before the request's
//!   prefill, so it also delays the prefills queued behind it (vLLM loads
//!   adapters inside the engine step). When every slot holds an adapter in
//!   use the request cannot start: it is passed over, and requests behind it
//!   that can start do (vLLM's scheduler skips it for the step); a shortage
//!   of running slots or KV blocks still stops admission in FCFS order. An
//!   adapter's prompt blocks are hashed in a chain of its own, so adapters
//!   never share cached blocks with each other or the base model (vLLM puts
//!   the adapter in the block hash). The page exports vLLM's
//!   `vllm:lora_requests_info` and counters of loads and evictions of the
//!   simulator's own ([`metrics`]).
//!
//! * **Token ids and KV events.** The cache works on blocks of token ids
//!   ([`tokens`]: text chunks, or the model's tokenizer once
//!   `epp::tokenize` lands), hashed in a chain from a per-start random seed.
//!   With `--kv-events-port` each pod publishes vLLM's ZeroMQ KV events
//!   ([`kv_events`]); `POST /admin/restart` restarts its engine in place.
//!
//! Decode does not stall during another request's prefill (vLLM's chunked
//! prefill interleaves them); the load factor stands for that interference.
//!
//! # Invariants
//! * `referenced blocks + unreferenced cached blocks + private blocks <=
//!   kv_blocks` at all times.
//! * A request holds its blocks, its slot and its adapter's slot from
//!   admission until its response is finished or abandoned (client gone):
//!   [`engine::Ticket`] releases them on drop, so a cancelled request never
//!   leaks capacity.
//! * An adapter a running request uses is never evicted; at most
//!   `--max-loras` distinct adapters are in slots.

pub mod api;
pub mod config;
pub mod engine;
pub mod kv;
pub mod kv_events;
pub mod lora;
pub mod metrics;
pub mod server;
pub mod tokens;

pub use config::SimConfig;
pub use server::{FleetRestarter, SimFleet, SimPodHandle, spawn_fleet};

/// Errors of the simulator: start-up failures, and the engine's refusals
/// (turned into HTTP errors by the server).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("binding {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the waiting queue is full")]
    QueueFull,
    #[error("the pod dropped a queued request")]
    LostInQueue,
    #[error("the engine restarted")]
    Restarted,
    #[error("the pod's metrics registry")]
    Metrics(#[source] prometheus::Error),
}
