//! KV-cache events: what each model server reports it holds, as opposed to
//! the prefix index's guess from routing decisions.
//!
//! vLLM (and SGLang) publish every block they store or evict on a ZeroMQ PUB
//! socket. This subsystem speaks the client side of ZeroMQ (`zmtp`),
//! decodes those batches (`decode`, over the bounded reader in `msgpack`),
//! keys them into a per-rank [`BlockIndex`] (`index`) and runs one
//! subscription per rank (`subscriber`), started and stopped with the
//! endpoints by `supervisor`, published in each endpoint's `kv_events` cell
//! and shown by `metrics`; `readiness` says when the streams let a
//! replica turn ready and which endpoints the approximate index serves. Failures of every part are one
//! [`Error`], whose [`ErrorKind`] says which counter they belong to.
//!
//! SGLang (`python/sglang/srt/disaggregation/kv_events.py` and the radix
//! caches' `_record_store_event`, as read in 2026) publishes the same
//! framing and the same tagged-array schema, with these differences:
//! - the batch is `[ts, events]` without `data_parallel_rank` (the rank is
//!   the port offset, as in vLLM); `BlockStored` is `[tag, block_hashes,
//!   parent_block_hash, token_ids, block_size, lora_id]` and `BlockRemoved`
//!   `[tag, block_hashes]`: no medium (read as GPU), lora_name or
//!   extra_keys. Decoded as is.
//! - one event per page; block hashes are Python `hash()` of the page's
//!   tokens (signed 64-bit ints, read as two's complement), not chained; a
//!   page is `block_size` = its own length, which may be short for the last
//!   page of a node. Decoded as is.
//! - under EAGLE speculative decoding the radix keys are bigrams, so
//!   `token_ids` holds `[token, next]` pairs; the decoder takes the first of
//!   each pair, which is the token at that position.
//! - `parent_block_hash` is nil for every page in the version read (its
//!   condition for linking a page to its parent never holds), so every page
//!   starts a chain of its own in our index: keys from SGLang events only match a prompt's first
//!   block. This is SGLang's schema limit, not something a consumer can
//!   repair; such endpoints get little from the precise index until SGLang
//!   links pages.
//!
//! The scheduler reads it through each endpoint's `KvEventsCell`, matching
//! a tokenized prompt's block keys (`scheduling::precise`).

pub mod decode;
mod error;
pub mod index;
pub mod metrics;
mod msgpack;
pub mod readiness;
pub mod subscriber;
pub mod supervisor;
pub mod zmtp;

pub use decode::{Batch, Event, Medium, decode_into};
pub use error::{Error, ErrorKind};
pub use index::{Applied, BlockIndex, PrefixMatch, block_keys, chain_seed, lora_key};
pub use metrics::KvEventsMetrics;
pub use supervisor::{Supervisor, SupervisorSettings};
