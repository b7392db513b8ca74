//! Scorers. Each maps every candidate to 0..1, higher is better.
//!
//! GIE's scorers (same type names and formulas):
//! - `queue-scorer`: min-max normalised waiting requests (1 when all equal);
//! - `running-requests-size-scorer`: the same on running requests;
//! - `kv-cache-utilization-scorer`: 1 - KV-cache usage;
//! - `prefix-cache-scorer`: leading prompt blocks held / prompt blocks;
//! - `lora-affinity-scorer`: 1 when the request's model is a LoRA adapter of a
//!   running request there, 0.8 when the endpoint has a free adapter slot,
//!   0.6 when the adapter is waiting to be loaded, else 0.
//!
//! llm-d's `active-request-scorer`, `load-aware-scorer`, `token-load-scorer`,
//! `context-length-aware` and `no-hit-lru-scorer`, and ours,
//! `prefill-cost-scorer` (the built-in default), described on their types.

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

/// [`lower_is_better`] over values already in `out`.
fn lower_is_better_in_place(out: &mut [f64]) {
    let (min, max) = out
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = max - min;
    for o in out.iter_mut() {
        *o = if span > 0.0 { (max - *o) / span } else { 1.0 };
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

/// GIE's formula on the approximate index; an endpoint answered by its KV
/// events scores its cached share of the prompt instead, offloaded tokens
/// weighted as the precise scorer's default.
impl Scorer for PrefixCacheScorer {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(c) {
            *o = cycle.prefix_fraction(c, 1.0, super::precise::DEFAULT_OFFLOAD_WEIGHT);
        }
    }
}

/// GIE's LoRA affinity scorer (v1.5 `scorer/loraaffinity`), tiers as GIE
/// has them, for any model name: an endpoint whose adapters are unknown (no
/// LoRA gauge) has no slot and scores 0, like a full one.
#[derive(Debug, Default)]
pub struct LoraAffinityScorer;

impl Scorer for LoraAffinityScorer {
    fn score(&self, _: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(c) {
            *o = if c.lora.running {
                1.0
            } else if c.lora.free_slot {
                0.8
            } else if c.lora.waiting {
                0.6
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
///      + prefill_request x prefilling  per request of theirs (0 by default)
///      + uncached x uncached_weight    this prompt minus what it caches
///      + decode  x in_flight           the running batch slows every step
///      + foreign x untracked           requests the scrape sees that we did not route
///      + (uncached + kv_request) x kv_pressure
///                                      KV cache nearly full: evictions, preemption
///      + adapter                       LoRA: 0 loaded, lora_load with a free slot,
///                                      lora_evict when a slot must be freed
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
/// The adapter term applies when the request's model is a LoRA adapter (some
/// candidate reports it running or waiting; vLLM serves an adapter under its
/// own model name). Loading one into a free slot costs `loraLoadTokens`;
/// with every slot taken, the request waits until another adapter's
/// requests drain, costing `loraEvictTokens` and always more than any
/// candidate that has the adapter loaded or a slot free, whatever their
/// queues: such an endpoint is the last resort, never preferred.
///
/// What an endpoint caches is [`Cycle::cached_tokens`]: its KV events' answer
/// when they are known (GPU tokens fully, offloaded ones mostly: see
/// `precise`), else the approximate index's.
///
/// `prefillRequestTokens` (ours, 0 by default) charges each request routed
/// to the endpoint and still waiting for its first byte a fixed cost on top
/// of its tokens. vLLM's chunked prefill packs pending prompts into shared
/// steps, so there a prompt costs its tokens and nothing per request. An
/// engine that prefills one request at a time with a fixed cost per prefill
/// (the simulator in bench/ does) makes a short request wait a whole prefill
/// behind each one ahead of it; set the parameter to that fixed cost in
/// tokens, and short requests go to an endpoint whose prefill lane is free.
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
    /// Token-equivalent fixed cost of each request routed to the endpoint
    /// that has not produced its first byte yet.
    #[serde(default)]
    pub prefill_request_tokens: f64,
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
    /// Token-equivalent cost of loading the request's LoRA adapter into a
    /// free slot.
    #[serde(default = "default_lora_load_tokens")]
    pub lora_load_tokens: f64,
    /// Token-equivalent cost of waiting for a slot when all are taken (at
    /// least; see the type's documentation).
    #[serde(default = "default_lora_evict_tokens")]
    pub lora_evict_tokens: f64,
}

fn default_lora_load_tokens() -> f64 {
    512.0
}

fn default_lora_evict_tokens() -> f64 {
    8192.0
}

/// Where the request's adapter stands on an endpoint, for the cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdapterCost {
    /// Not an adapter request, or the adapter is loaded.
    None,
    Load,
    Evict,
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
            prefill_request_tokens: 0.0,
            uncached_weight: default_uncached_weight(),
            decode_tokens_per_request: default_decode_tokens(),
            foreign_tokens_per_request: default_foreign_tokens(),
            kv_high_watermark: default_kv_high(),
            kv_request_tokens: default_kv_request_tokens(),
            lora_load_tokens: default_lora_load_tokens(),
            lora_evict_tokens: default_lora_evict_tokens(),
        }
    }
}

impl fmt::Debug for PrefillCostScorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefillCostScorer")
            .field("backlog_weight", &self.backlog_weight)
            .field("prefill_request_tokens", &self.prefill_request_tokens)
            .field("uncached_weight", &self.uncached_weight)
            .field("decode_tokens_per_request", &self.decode_tokens_per_request)
            .field(
                "foreign_tokens_per_request",
                &self.foreign_tokens_per_request,
            )
            .field("kv_high_watermark", &self.kv_high_watermark)
            .field("kv_request_tokens", &self.kv_request_tokens)
            .field("lora_load_tokens", &self.lora_load_tokens)
            .field("lora_evict_tokens", &self.lora_evict_tokens)
            .finish()
    }
}

impl PrefillCostScorer {
    fn adapter(cycle: &Cycle<'_>, c: &Candidate<'_>) -> AdapterCost {
        if !cycle.adapter_request || c.lora.running {
            AdapterCost::None
        } else if c.lora.free_slot {
            AdapterCost::Load
        } else {
            AdapterCost::Evict
        }
    }

    /// The estimated cost in prompt tokens of sending the request to `c`
    /// (before an evicting endpoint is raised above every other; see
    /// [`Scorer::score`]).
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
            + self.prefill_request_tokens * f64::from(c.prefilling)
            + self.uncached_weight * uncached
            + self.decode_tokens_per_request * f64::from(c.in_flight)
            + self.foreign_tokens_per_request * untracked
            + (uncached + self.kv_request_tokens) * pressure
            + match Self::adapter(cycle, c) {
                AdapterCost::None => 0.0,
                AdapterCost::Load => self.lora_load_tokens,
                AdapterCost::Evict => self.lora_evict_tokens,
            }
    }
}

impl Scorer for PrefillCostScorer {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(c) {
            *o = self.cost(cycle, c);
        }
        if cycle.adapter_request {
            // An endpoint that must free a slot ranks after every endpoint
            // that has the adapter or a free slot.
            let others = c
                .iter()
                .zip(out.iter())
                .filter(|(c, _)| Self::adapter(cycle, c) != AdapterCost::Evict)
                .map(|(_, &cost)| cost)
                .fold(f64::NEG_INFINITY, f64::max);
            if others.is_finite() {
                for (o, c) in out.iter_mut().zip(c) {
                    if Self::adapter(cycle, c) == AdapterCost::Evict {
                        *o = o.max(others + 1.0);
                    }
                }
            }
        }
        lower_is_better_in_place(out);
    }
}

/// llm-d's token-load scorer: `1 - min(tokens, queueThresholdTokens) /
/// queueThresholdTokens`, where `tokens` is the prompt tokens routed to the
/// endpoint and not yet prefilled plus this request's own uncached tokens
/// there (llm-d-router adds the request's tokens; GIE v1.5 did not). Our
/// endpoint accounting is llm-d's in-flight load producer: uncached prompt
/// tokens, released at the first response byte.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenLoadScorer {
    #[serde(default = "default_queue_threshold_tokens")]
    pub queue_threshold_tokens: i64,
}

fn default_queue_threshold_tokens() -> i64 {
    // 128 requests of 32K tokens, llm-d's default.
    4_194_304
}

impl Default for TokenLoadScorer {
    fn default() -> Self {
        Self {
            queue_threshold_tokens: default_queue_threshold_tokens(),
        }
    }
}

impl Scorer for TokenLoadScorer {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        let threshold = if self.queue_threshold_tokens > 0 {
            self.queue_threshold_tokens as f64
        } else {
            default_queue_threshold_tokens() as f64
        };
        for (o, c) in out.iter_mut().zip(c) {
            let tokens = c.prefill_backlog as f64 + f64::from(cycle.uncached_tokens(c));
            *o = 1.0 - tokens.min(threshold) / threshold;
        }
    }
}

/// The pod label llm-d's context-length-aware plugin reads by default.
pub const CONTEXT_LENGTH_LABEL: &str = "llm-d.ai/context-length-range";

/// llm-d's `context-length-aware` scorer (and, with `enableFiltering`,
/// filter). Each pod may declare the prompt lengths it is meant for in a
/// label, `"min-max"` tokens (e.g. `"0-2048"`). Scores, as llm-d's:
/// - in range: above 0.3 up to 1, higher for a narrow range and for more
///   room left above the prompt (`0.3 + 0.7 × (0.7 × 1/(1 + width/10000) +
///   0.3 × (max - len)/width)`, 1 for a zero-width range);
/// - out of range: below 0.3, by distance to the range
///   (`0.3 / (1 + distance/1000)`), so a too-long prompt goes to the pod
///   whose range ends closest;
/// - no label: 0.5; an unparsable label: 0.
///
/// The filter keeps pods without the label and pods whose range holds the
/// prompt. Prompt length is the usual estimate, 4 bytes per token (llm-d's
/// default `estimate` token producer does the same).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextLengthAware {
    #[serde(default = "default_context_label")]
    pub label: String,
    #[serde(default)]
    pub enable_filtering: bool,
}

fn default_context_label() -> String {
    CONTEXT_LENGTH_LABEL.to_owned()
}

impl Default for ContextLengthAware {
    fn default() -> Self {
        Self {
            label: default_context_label(),
            enable_filtering: false,
        }
    }
}

/// Parses `"min-max"` (non-negative integers, min <= max).
pub fn parse_context_range(text: &str) -> Option<(u64, u64)> {
    let (lo, hi) = text.split_once('-')?;
    let lo: u64 = lo.trim().parse().ok()?;
    let hi: u64 = hi.trim().parse().ok()?;
    (lo <= hi).then_some((lo, hi))
}

impl ContextLengthAware {
    fn range_score(len: u64, (lo, hi): (u64, u64)) -> f64 {
        const FALLBACK: f64 = 0.3;
        if (lo..=hi).contains(&len) {
            let width = (hi - lo) as f64;
            if width == 0.0 {
                return 1.0;
            }
            let narrow = 1.0 / (1.0 + width / 10_000.0);
            let room = (hi - len) as f64 / width;
            FALLBACK + (0.7 * narrow + 0.3 * room) * (1.0 - FALLBACK)
        } else {
            let distance = if len > hi { len - hi } else { lo - len };
            FALLBACK / (1.0 + distance as f64 / 1000.0)
        }
    }
}

impl Scorer for ContextLengthAware {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        let len = u64::from(cycle.prompt_tokens);
        for (o, c) in out.iter_mut().zip(c) {
            *o = match c.endpoint.label(&self.label) {
                None => 0.5,
                Some(text) => parse_context_range(text).map_or(0.0, |r| Self::range_score(len, r)),
            };
        }
    }
}

impl super::Filter for ContextLengthAware {
    fn filter(&self, cycle: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>) {
        let len = u64::from(cycle.prompt_tokens);
        candidates.retain(|c| match c.endpoint.label(&self.label) {
            None => true,
            Some(text) => {
                parse_context_range(text).is_some_and(|(lo, hi)| (lo..=hi).contains(&len))
            }
        });
    }
}

/// llm-d's `no-hit-lru-scorer`: spreads cold requests. A request is cold
/// when no candidate holds any of its prefix blocks; it will create new
/// cache blocks wherever it goes, so it should go where cold requests went
/// least recently, and the cache grows evenly. Cold requests rank
/// candidates: never used for a cold request first (in candidate order,
/// `1 - i/(n-1)`), then by the last cold request routed there, oldest
/// first; warm requests score 0.5 everywhere, leaving the choice to the
/// prefix scorers. Only a routed request's pick is recorded.
///
/// Ranks count the candidates only (llm-d counts every endpoint in its LRU,
/// so endpoints filtered out can push all used candidates to 0). At most
/// `lruSize` endpoints are remembered; the least recent is forgotten first.
#[derive(Debug)]
pub struct NoHitLruScorer {
    lru_size: usize,
    cold: parking_lot::Mutex<ColdUses>,
}

#[derive(Debug, Default)]
struct ColdUses {
    clock: u64,
    /// Endpoint uid -> clock value of its last cold request.
    last: std::collections::HashMap<u64, u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoHitLruParams {
    #[serde(default)]
    pub lru_size: i64,
}

impl NoHitLruScorer {
    pub const DEFAULT_LRU_SIZE: usize = 1024;

    pub fn new(p: &NoHitLruParams) -> Self {
        let lru_size = usize::try_from(p.lru_size)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(Self::DEFAULT_LRU_SIZE);
        Self {
            lru_size,
            cold: parking_lot::Mutex::new(ColdUses::default()),
        }
    }

    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.cold.lock().last.len()
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.lru_size
    }

    fn is_cold(c: &[Candidate<'_>]) -> bool {
        c.iter()
            .all(|c| c.prefix_blocks == 0 && c.cached.any_tokens == 0)
    }
}

impl Scorer for NoHitLruScorer {
    fn score(&self, _: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        if !Self::is_cold(c) {
            out.iter_mut().for_each(|o| *o = 0.5);
            return;
        }
        let n = c.len();
        if n <= 1 {
            out.iter_mut().for_each(|o| *o = 1.0);
            return;
        }
        let span = (n - 1) as f64;
        let mut used: Vec<(u64, usize)> = Vec::new();
        let mut never = 0usize;
        {
            let cold = self.cold.lock();
            for (i, (o, c)) in out.iter_mut().zip(c).enumerate() {
                match cold.last.get(&c.endpoint.uid) {
                    Some(&at) => used.push((at, i)),
                    None => {
                        *o = 1.0 - never as f64 / span;
                        never += 1;
                    }
                }
            }
        }
        used.sort_unstable();
        for (rank, (_, i)) in used.into_iter().enumerate() {
            out[i] = (1.0 - (never + rank) as f64 / span).max(0.0);
        }
    }

    fn picked(&self, _: &Cycle<'_>, c: &[Candidate<'_>], pick: usize) {
        let Some(p) = c.get(pick) else { return };
        if !Self::is_cold(c) {
            return;
        }
        let mut cold = self.cold.lock();
        cold.clock += 1;
        let now = cold.clock;
        cold.last.insert(p.endpoint.uid, now);
        if cold.last.len() > self.lru_size
            && let Some((&oldest, _)) = cold.last.iter().min_by_key(|&(_, &at)| at)
        {
            cold.last.remove(&oldest);
        }
    }
}
