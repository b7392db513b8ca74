//! Prefix-cache awareness: hashing prompts into chained block hashes and the
//! index of which endpoint holds which blocks.
//!
//! The picker cannot see the model servers' KV caches, so it approximates
//! them: a request's blocks are assumed cached on the endpoint it was routed
//! to, and forgotten in LRU order once that endpoint's cache would be full.

mod hash;
mod index;
mod metrics;

pub use hash::{BlockHasher, BlockKeyMap, IdentityHasher, chain_seed};
pub use index::PrefixIndex;
pub use metrics::IndexMetrics;
