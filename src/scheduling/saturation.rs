//! Saturation: is an endpoint (or the whole pool) too busy to take work that
//! may be shed?
//!
//! Two detectors, GIE's (and llm-d-router's):
//! - `utilization-detector` (the default) reads scraped metrics: an endpoint
//!   is saturated when its metrics are stale, or when fresh metrics show more
//!   than `queueDepthThreshold` waiting requests or more than
//!   `kvCacheUtilThreshold` of its KV cache in use; the pool is saturated
//!   when every candidate is.
//! - `concurrency-detector` reads this picker's own accounting, so it reacts
//!   to a burst before any scrape shows it: requests in flight
//!   (`concurrencyMode: requests`), prompt tokens routed and not yet
//!   prefilled (`tokens`), or both (`hybrid`). The pool is saturated when the
//!   aggregate load reaches the aggregate capacity (`maxConcurrency` or
//!   `maxTokenConcurrency` per endpoint); in hybrid mode when the mean over
//!   endpoints of the larger of the two ratios reaches 1.
//!
//! Only sheddable requests (negative priority) are refused because of the
//! pool's saturation; everything else is still routed to the best endpoint.
//! Either detector used as a filter drops saturated endpoints: the
//! utilization detector keeps all when every one is saturated, the
//! concurrency detector (like llm-d's) drops endpoints at or above
//! `capacity × (1 + headroom)` even if that leaves none.

use serde::Deserialize;

use super::Candidate;

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UtilizationDetector {
    #[serde(default = "default_queue")]
    pub queue_depth_threshold: u32,
    #[serde(default = "default_kv")]
    pub kv_cache_util_threshold: f64,
    /// As a filter, the thresholds are relaxed by this fraction (GIE: room
    /// to follow affinity past the ideal load); shedding ignores it.
    #[serde(default)]
    pub headroom: f64,
}

fn default_queue() -> u32 {
    5
}

fn default_kv() -> f64 {
    0.8
}

impl Default for UtilizationDetector {
    fn default() -> Self {
        Self {
            queue_depth_threshold: default_queue(),
            kv_cache_util_threshold: default_kv(),
            headroom: 0.0,
        }
    }
}

impl UtilizationDetector {
    pub fn is_saturated(&self, c: &Candidate<'_>) -> bool {
        self.over(c, 1.0)
    }

    /// Saturated even with the headroom (what the filter drops).
    pub fn is_over_headroom(&self, c: &Candidate<'_>) -> bool {
        self.over(c, 1.0 + self.headroom.max(0.0))
    }

    fn over(&self, c: &Candidate<'_>, factor: f64) -> bool {
        !c.fresh
            || f64::from(c.waiting) > f64::from(self.queue_depth_threshold) * factor
            || c.kv_usage > self.kv_cache_util_threshold * factor
    }
}

/// What the concurrency detector counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    #[default]
    Requests,
    Tokens,
    Hybrid,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyDetector {
    #[serde(default)]
    pub concurrency_mode: ConcurrencyMode,
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u64,
    #[serde(default = "default_max_token_concurrency")]
    pub max_token_concurrency: u64,
    #[serde(default)]
    pub headroom: f64,
}

fn default_max_concurrency() -> u64 {
    100
}

fn default_max_token_concurrency() -> u64 {
    1_000_000
}

impl Default for ConcurrencyDetector {
    fn default() -> Self {
        Self {
            concurrency_mode: ConcurrencyMode::Requests,
            max_concurrency: default_max_concurrency(),
            max_token_concurrency: default_max_token_concurrency(),
            headroom: 0.0,
        }
    }
}

impl ConcurrencyDetector {
    /// llm-d's validation: capacities > 0, headroom >= 0.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrency == 0 {
            return Err("maxConcurrency must be strictly positive".into());
        }
        if self.max_token_concurrency == 0 {
            return Err("maxTokenConcurrency must be strictly positive".into());
        }
        if !(self.headroom.is_finite() && self.headroom >= 0.0) {
            return Err("headroom must be a non-negative number".into());
        }
        Ok(())
    }

    fn ratios(&self, c: &Candidate<'_>) -> (f64, f64) {
        (
            f64::from(c.in_flight) / self.max_concurrency as f64,
            c.prefill_backlog as f64 / self.max_token_concurrency as f64,
        )
    }

    /// Whether the endpoint is below its limit (`capacity × (1 + headroom)`).
    pub fn admits(&self, c: &Candidate<'_>) -> bool {
        let (requests, tokens) = self.ratios(c);
        let limit = 1.0 + self.headroom;
        match self.concurrency_mode {
            ConcurrencyMode::Requests => requests < limit,
            ConcurrencyMode::Tokens => tokens < limit,
            ConcurrencyMode::Hybrid => requests < limit && tokens < limit,
        }
    }

    /// Pool saturation, 1.0 meaning full (an empty pool is full).
    pub fn saturation(&self, candidates: &[Candidate<'_>]) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let n = candidates.len() as f64;
        match self.concurrency_mode {
            ConcurrencyMode::Requests => {
                let load: f64 = candidates.iter().map(|c| f64::from(c.in_flight)).sum();
                load / (n * self.max_concurrency as f64)
            }
            ConcurrencyMode::Tokens => {
                let load: f64 = candidates.iter().map(|c| c.prefill_backlog as f64).sum();
                load / (n * self.max_token_concurrency as f64)
            }
            ConcurrencyMode::Hybrid => {
                candidates
                    .iter()
                    .map(|c| {
                        let (r, t) = self.ratios(c);
                        r.max(t)
                    })
                    .sum::<f64>()
                    / n
            }
        }
    }
}

/// The configured detector (the config's `saturationDetector`, else the
/// first detector declared, else the utilization detector's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SaturationDetector {
    Utilization(UtilizationDetector),
    Concurrency(ConcurrencyDetector),
}

impl Default for SaturationDetector {
    fn default() -> Self {
        Self::Utilization(UtilizationDetector::default())
    }
}

impl SaturationDetector {
    /// True when no candidate can take more work (an empty set is saturated).
    pub fn pool_saturated(&self, candidates: &[Candidate<'_>]) -> bool {
        match self {
            Self::Utilization(d) => candidates.iter().all(|c| d.is_saturated(c)),
            Self::Concurrency(d) => d.saturation(candidates) >= 1.0,
        }
    }
}

/// The scheduler's saturation detector, detached from the scheduler so flow
/// control can read the pool's saturation between requests.
#[derive(Debug, Clone, Copy)]
pub struct SaturationProbe {
    detector: SaturationDetector,
    max_scrape_failures: u32,
    staleness: std::time::Duration,
    epoch: std::time::Instant,
}

impl SaturationProbe {
    /// The pool's saturation, 1.0 meaning full: the concurrency detector's
    /// load over capacity; for the utilization detector, the fraction of
    /// ready endpoints it calls saturated (1.0 exactly when it would shed).
    /// A pool with no ready endpoint reads 0: requests are then let through
    /// to scheduling, which answers them at once (503) instead of holding
    /// them until their TTL.
    pub fn saturation(&self, set: &crate::endpoints::EndpointSet) -> f64 {
        let now = std::time::Instant::now();
        let candidates: Vec<Candidate<'_>> = set
            .endpoints()
            .iter()
            .filter(|e| e.metrics.consecutive_failures() < self.max_scrape_failures)
            .map(|e| {
                let fresh = e
                    .metrics
                    .age(now, self.epoch)
                    .is_some_and(|a| a <= self.staleness);
                Candidate::read(e, fresh)
            })
            .collect();
        if candidates.is_empty() {
            return 0.0;
        }
        match self.detector {
            SaturationDetector::Concurrency(d) => d.saturation(&candidates),
            SaturationDetector::Utilization(d) => {
                let saturated = candidates.iter().filter(|c| d.is_saturated(c)).count();
                saturated as f64 / candidates.len() as f64
            }
        }
    }
}

impl super::Scheduler {
    /// What flow control reads to know whether the pool has room.
    pub fn saturation_probe(&self) -> SaturationProbe {
        SaturationProbe {
            detector: self.saturation,
            max_scrape_failures: self.max_scrape_failures,
            staleness: self.staleness,
            epoch: self.epoch,
        }
    }
}
