//! Scorers. Each maps every candidate to 0..1, higher is better.
//!
//! GIE's scorers (same type names and formulas):
//! - `queue-scorer`: min-max normalised waiting requests (1 when all equal);
//! - `running-requests-size-scorer`: the same on running requests;
//! - `kv-cache-utilization-scorer`: 1 - KV-cache usage;
//! - `prefix-cache-scorer`: leading prompt blocks held / prompt blocks.
//!
//! llm-d's `active-request-scorer` and `load-aware-scorer`, and ours,
//! `prefill-cost-scorer` (the built-in default), described on its type.

use std::fmt;

use serde::Deserialize;

use super::{Candidate, Cycle, Scorer};

/// Min-max normalisation where lower raw values are better: the lowest gets
/// 1, the highest 0, and all get 1 when they are equal.
fn lower_is_better(values: impl Iterator<Item = f64> + Clone, out: &mut [f64]) {
    let (min, max) = values
        .clone()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let span = max - min;
    for (o, v) in out.iter_mut().zip(values) {
        *o = if span > 0.0 { (max - v) / span } else { 1.0 };
    }
}

#[derive(Debug, Default)]
pub struct QueueScorer;

impl Scorer for QueueScorer {
    fn score(&self, _: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        lower_is_better(c.iter().map(|c| f64::from(c.waiting)), out);
    }
}

#[derive(Debug, Default)]
pub struct RunningRequestsScorer;

impl Scorer for RunningRequestsScorer {
    fn score(&self, _: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        lower_is_better(c.iter().map(|c| f64::from(c.running)), out);
    }
}

#[derive(Debug, Default)]
pub struct KvCacheUtilizationScorer;

impl Scorer for KvCacheUtilizationScorer {
    fn score(&self, _: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(c) {
            *o = 1.0 - c.kv_usage;
        }
    }
}

#[derive(Debug, Default)]
pub struct PrefixCacheScorer;

impl Scorer for PrefixCacheScorer {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        let total = f64::from(cycle.prompt_blocks);
        for (o, c) in out.iter_mut().zip(c) {
            *o = if total > 0.0 {
                f64::from(c.prefix_blocks) / total
            } else {
                0.0
            };
        }
    }
}

/// llm-d's active-request scorer: this picker's own in-flight count.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveRequestScorer {
    #[serde(default)]
    pub idle_threshold: u32,
    #[serde(default = "one")]
    pub max_busy_score: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for ActiveRequestScorer {
    fn default() -> Self {
        Self {
            idle_threshold: 0,
            max_busy_score: 1.0,
        }
    }
}

impl Scorer for ActiveRequestScorer {
    fn score(&self, _: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        let max = c.iter().map(|c| c.in_flight).max().unwrap_or(0);
        for (o, c) in out.iter_mut().zip(c) {
            *o = if c.in_flight <= self.idle_threshold || max == 0 {
                1.0
            } else {
                f64::from(max - c.in_flight) / f64::from(max) * self.max_busy_score
            };
        }
    }
}

/// llm-d's load-aware scorer: 0.5 for an empty queue, falling linearly to 0
/// at `threshold` waiting requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadAwareScorer {
    #[serde(default = "default_threshold")]
    pub threshold: u32,
}

fn default_threshold() -> u32 {
    128
}

impl Default for LoadAwareScorer {
    fn default() -> Self {
        Self {
            threshold: default_threshold(),
        }
    }
}

impl Scorer for LoadAwareScorer {
    fn score(&self, _: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        let t = f64::from(self.threshold.max(1));
        for (o, c) in out.iter_mut().zip(c) {
            *o = if c.waiting == 0 {
                0.5
            } else {
                0.5 * (1.0 - f64::from(c.waiting).min(t) / t)
            };
        }
    }
}

/// The built-in default: estimated prefill work ahead of the request.
///
/// A weighted sum of a prefix score and a queue score cannot express the real
/// trade-off: how much waiting is worth a cache hit depends on how long the
/// prompt is and how busy each endpoint already is. So instead of scores, this
/// scorer estimates a cost in prompt tokens for each candidate:
///
/// ```text
/// cost = backlog                       prompt tokens routed there, not yet prefilled
///      + uncached x uncached_weight    this prompt minus the blocks it caches
///      + decode  x in_flight           the running batch slows every step
///      + foreign x untracked           requests the scrape sees that we did not route
///      + (uncached + kv_request) x kv_pressure
///                                      KV cache nearly full: evictions, preemption
/// ```
///
/// `kv_pressure` rises from 0 at `kv_high_watermark` to 1 when the cache is
/// full. Every request pays it, not only long prompts: a short prompt with a
/// long completion needs cache blocks too, and an endpoint out of blocks
/// preempts running requests (recomputing them later) or evicts cached
/// prefixes. `kv_request` is what one more request is assumed to cost there,
/// in prompt tokens. Below the watermark the term is zero, so prefix
/// affinity is untouched by moderate cache usage.
///
/// and scores `1 - (cost - min) / (max - min)`, so alone with the max-score
/// picker it routes to the cheapest endpoint. A cached endpoint wins while the
/// work queued on it is smaller than re-prefilling the prompt elsewhere; when
/// a popular prefix makes it busy, requests spill over and the prefix is
/// replicated on a second endpoint, instead of piling up on one.
///
/// Uncached tokens weigh more than queued ones (`uncached_weight`, 2 by
/// default): a miss does not only delay this request, the prefill it creates
/// delays every later request on that endpoint and evicts cached blocks.
/// Counting it once makes bursts of cold requests push warm ones away from
/// their cache, which costs more than the short wait it saves.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefillCostScorer {
    /// Weight of the prefill backlog (1 = one queued token costs one token).
    #[serde(default = "one")]
    pub backlog_weight: f64,
    /// Weight of this request's own uncached prompt tokens.
    #[serde(default = "default_uncached_weight")]
    pub uncached_weight: f64,
    /// Token-equivalent cost of each request already in flight.
    #[serde(default = "default_decode_tokens")]
    pub decode_tokens_per_request: f64,
    /// Token-equivalent cost of each request the endpoint reports that this
    /// picker did not route (other replicas, direct traffic).
    #[serde(default = "default_foreign_tokens")]
    pub foreign_tokens_per_request: f64,
    /// KV-cache usage above which the pressure term starts.
    #[serde(default = "default_kv_high")]
    pub kv_high_watermark: f64,
    /// Token-equivalent cost of one more request on an endpoint whose KV
    /// cache is full (scaled down linearly to zero at the watermark).
    #[serde(default = "default_kv_request_tokens")]
    pub kv_request_tokens: f64,
}

fn default_uncached_weight() -> f64 {
    2.0
}

fn default_decode_tokens() -> f64 {
    32.0
}

fn default_foreign_tokens() -> f64 {
    256.0
}

fn default_kv_high() -> f64 {
    0.9
}

fn default_kv_request_tokens() -> f64 {
    2048.0
}

impl Default for PrefillCostScorer {
    fn default() -> Self {
        Self {
            backlog_weight: 1.0,
            uncached_weight: default_uncached_weight(),
            decode_tokens_per_request: default_decode_tokens(),
            foreign_tokens_per_request: default_foreign_tokens(),
            kv_high_watermark: default_kv_high(),
            kv_request_tokens: default_kv_request_tokens(),
        }
    }
}

impl fmt::Debug for PrefillCostScorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefillCostScorer")
            .field("backlog_weight", &self.backlog_weight)
            .field("uncached_weight", &self.uncached_weight)
            .field("decode_tokens_per_request", &self.decode_tokens_per_request)
            .field(
                "foreign_tokens_per_request",
                &self.foreign_tokens_per_request,
            )
            .field("kv_high_watermark", &self.kv_high_watermark)
            .field("kv_request_tokens", &self.kv_request_tokens)
            .finish()
    }
}

impl PrefillCostScorer {
    /// The estimated cost in prompt tokens of sending the request to `c`.
    pub fn cost(&self, cycle: &Cycle<'_>, c: &Candidate<'_>) -> f64 {
        let uncached = f64::from(cycle.uncached_tokens(c));
        // What the last scrape saw, minus this picker's requests that were
        // already routed then (still in flight, or finished since): requests
        // someone else sent.
        let scraped = c.waiting - c.dispatched_since_scrape + c.running;
        let ours_then = c
            .in_flight
            .saturating_sub(c.dispatched_since_scrape)
            .saturating_add(c.finished_since_scrape);
        let untracked = f64::from(scraped.saturating_sub(ours_then));
        let pressure = if self.kv_high_watermark < 1.0 {
            ((c.kv_usage - self.kv_high_watermark) / (1.0 - self.kv_high_watermark)).max(0.0)
        } else {
            0.0
        };
        self.backlog_weight * c.prefill_backlog as f64
            + self.uncached_weight * uncached
            + self.decode_tokens_per_request * f64::from(c.in_flight)
            + self.foreign_tokens_per_request * untracked
            + (uncached + self.kv_request_tokens) * pressure
    }
}

impl Scorer for PrefillCostScorer {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        lower_is_better(c.iter().map(|c| self.cost(cycle, c)), out);
    }
}
