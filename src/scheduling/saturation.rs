//! Saturation: is an endpoint (or the whole pool) too busy to take work that
//! may be shed?
//!
//! An endpoint is saturated when its metrics are stale, or when fresh metrics
//! show more than `queueDepthThreshold` waiting requests or more than
//! `kvCacheUtilThreshold` of its KV cache in use. The pool is saturated when
//! every candidate is. Only sheddable requests (negative priority) are refused
//! because of it; everything else is still routed to the best endpoint.

use serde::Deserialize;

use super::Candidate;

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SaturationDetector {
    #[serde(default = "default_queue")]
    pub queue_depth_threshold: u32,
    #[serde(default = "default_kv")]
    pub kv_cache_util_threshold: f64,
}

fn default_queue() -> u32 {
    5
}

fn default_kv() -> f64 {
    0.8
}

impl Default for SaturationDetector {
    fn default() -> Self {
        Self {
            queue_depth_threshold: default_queue(),
            kv_cache_util_threshold: default_kv(),
        }
    }
}

impl SaturationDetector {
    pub fn is_saturated(&self, c: &Candidate<'_>) -> bool {
        !c.fresh
            || c.waiting > self.queue_depth_threshold
            || c.kv_usage > self.kv_cache_util_threshold
    }

    /// True when no candidate can take more work (an empty set is saturated).
    pub fn pool_saturated(&self, candidates: &[Candidate<'_>]) -> bool {
        candidates.iter().all(|c| self.is_saturated(c))
    }
}
