//! The token-exact prefix path: what each endpoint's own KV-cache events say
//! it holds of this prompt, and llm-d's `precise-prefix-cache-scorer`.
//!
//! When the request carries its prompt's token ids and events are enabled,
//! each candidate whose `kv_events` cell has a known rank is asked for the
//! longest cached run of the prompt's block keys (`kv_events::block_keys`,
//! the same chain the event index computes from `BlockStored` token ids),
//! cut with that endpoint's block size: the one its events report, else the
//! one its metrics report, else the configured default. Key chains are
//! computed once per distinct block size per request, into one reused
//! buffer (pods of one pool usually share one size, so usually once).
//!
//! Which index answers, per candidate ([`PrefixSource`]):
//! - `Events`: the candidate's events are known; the approximate index's
//!   guess for it is not consulted, whatever it says;
//! - `Approximate`: no tokens, no events configured for it, or its ranks
//!   are unknown (not subscribed yet, dropped after a gap or restart): the
//!   approximate index answers, as it always did;
//! - `None`: no prefix data (no prompt, or no configured plugin uses it).
//!
//! Tiers: a block on GPU counts fully; a block held only on another tier
//! (CPU, offloaded) must be transferred back before use. Scores weigh it
//! with the scorer's tier weight (0.8 by default, llm-d's `cpu` weight);
//! the prefill cost counts it as [`OFFLOADED_TOKEN_CREDIT`] of a cached
//! token, i.e. loading an offloaded token costs a fifth of prefilling it (a
//! host-to-device copy of its KV is much cheaper than recomputing it, but
//! not free, and it competes with the running batch for the PCIe link).
//!
//! Speculation (llm-d's "speculative indexing"): between routing a request
//! and its `BlockStored` events arriving, the pick's events do not show the
//! prompt yet, so a burst of one prompt would spread over every endpoint.
//! When enabled, a routed request's key chain is remembered for the pick
//! for `ttl` and counted as cached on GPU there (the larger of it and the
//! events' answer). Bounded: the last [`SPECULATIVE_PER_ENDPOINT`] chains
//! per endpoint, at most [`SPECULATIVE_ENTRIES`] in all (when full, expired
//! ones are purged, and if none expired the pick is not speculated), each at
//! most the matched span long; entries expire after `ttl`. Chained keys make
//! a lookup a bisection per entry: two chains agree on block `i` exactly
//! when they agree on every block up to `i`.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

use super::{Candidate, Cycle, Scorer};
use crate::endpoints::Endpoint;

/// What an offloaded (non-GPU) cached token saves of prefilling it, for the
/// prefill cost (see the module header).
pub const OFFLOADED_TOKEN_CREDIT: f64 = 0.8;

/// Score weight of a token cached on a non-GPU tier: llm-d's default `cpu`
/// backend weight.
pub const DEFAULT_OFFLOAD_WEIGHT: f64 = 0.8;

/// Speculative chains remembered at most (per scheduler), and per endpoint.
pub const SPECULATIVE_ENTRIES: usize = 1024;
pub const SPECULATIVE_PER_ENDPOINT: usize = 4;

/// llm-d's default `speculativeTTL`.
pub const DEFAULT_SPECULATIVE_TTL: Duration = Duration::from_secs(2);

/// Which index answered a candidate's prefix query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrefixSource {
    /// No prefix data for this request.
    #[default]
    None,
    /// The approximate index (learned from routing decisions).
    Approximate,
    /// The endpoint's own KV-cache events.
    Events,
}

impl PrefixSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Approximate => "approximate",
            Self::Events => "events",
        }
    }
}

/// A candidate's cached leading run of the prompt, in prompt tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachedPrefix {
    pub source: PrefixSource,
    /// Held in GPU memory (the approximate index's guess counts as GPU).
    pub gpu_tokens: u32,
    /// Held on any tier, GPU or offloaded; `>= gpu_tokens`.
    pub any_tokens: u32,
}

impl CachedPrefix {
    /// Tokens held only on a non-GPU tier.
    pub fn offloaded_tokens(&self) -> u32 {
        self.any_tokens.saturating_sub(self.gpu_tokens)
    }
}

/// How the scheduler uses KV events (present when events are enabled or a
/// precise scorer is configured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventSettings {
    /// Block size when neither an endpoint's events nor its metrics report
    /// one (`tokenProcessorConfig.blockSize`).
    pub block_size_tokens: u32,
    /// How long a routed prompt counts as cached on its pick before its
    /// events arrive; `None` disables speculation.
    pub speculative_ttl: Option<Duration>,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            block_size_tokens: 16,
            speculative_ttl: Some(DEFAULT_SPECULATIVE_TTL),
        }
    }
}

/// Key chains of one request, one per distinct block size, in one buffer.
#[derive(Debug, Default)]
pub(super) struct KeyChains {
    keys: Vec<u64>,
    /// (block size, start, len) into `keys`.
    sets: Vec<(u32, u32, u32)>,
    /// The last events answer (any tier, blocks) per set, where the next
    /// candidate's query probes first: a hot prompt is held to the same
    /// depth on many endpoints.
    hints: Vec<u32>,
}

impl KeyChains {
    pub(super) fn clear(&mut self) {
        self.keys.clear();
        self.sets.clear();
        self.hints.clear();
    }

    /// The chain of `tokens` cut in blocks of `block_size` (computed on the
    /// first call for that size), with the set's index and its hint.
    fn get_with_hint(
        &mut self,
        seed: u64,
        tokens: &[u32],
        block_size: u32,
    ) -> (&[u64], usize, usize) {
        let (set, start, len) = match self.sets.iter().position(|s| s.0 == block_size) {
            Some(i) => (i, self.sets[i].1 as usize, self.sets[i].2 as usize),
            None => {
                let start = self.keys.len();
                crate::kv_events::block_keys(seed, tokens, block_size as usize, &mut self.keys);
                let len = self.keys.len() - start;
                self.sets.push((
                    block_size,
                    u32::try_from(start).unwrap_or(u32::MAX),
                    len as u32,
                ));
                self.hints.push(0);
                (self.sets.len() - 1, start, len)
            }
        };
        (
            &self.keys[start..start + len],
            set,
            self.hints[set] as usize,
        )
    }

    /// Every chain computed, with its block size.
    pub(super) fn chains(&self) -> impl Iterator<Item = (u32, &[u64])> {
        self.sets
            .iter()
            .map(|&(bs, s, l)| (bs, &self.keys[s as usize..(s + l) as usize]))
    }
}

#[derive(Debug)]
struct SpecEntry {
    block_size: u32,
    expires: Instant,
    keys: Vec<u64>,
}

/// Recently routed prompts per pick (see the module header).
#[derive(Debug, Default)]
pub(super) struct Speculative {
    inner: Mutex<SpecMap>,
}

#[derive(Debug, Default)]
struct SpecMap {
    /// Endpoint uid -> its last [`SPECULATIVE_PER_ENDPOINT`] routed chains
    /// (a ring: `next` is overwritten next).
    by_uid: std::collections::HashMap<u64, (Vec<SpecEntry>, usize)>,
    entries: usize,
}

impl Speculative {
    /// Remembers `keys` as cached on endpoint `uid` until `now + ttl`.
    pub(super) fn record(
        &self,
        uid: u64,
        block_size: u32,
        keys: &[u64],
        now: Instant,
        ttl: Duration,
    ) {
        if keys.is_empty() {
            return;
        }
        let expires = now + ttl;
        let mut m = self.inner.lock();
        if m.entries >= SPECULATIVE_ENTRIES && !m.by_uid.contains_key(&uid) {
            // Full: forget what expired (endpoints gone, quiet ones); if
            // that frees nothing, this pick goes unspeculated.
            m.by_uid.retain(|_, (ring, _)| {
                ring.retain(|e| e.expires > now);
                !ring.is_empty()
            });
            m.entries = m.by_uid.values().map(|(r, _)| r.len()).sum();
            if m.entries >= SPECULATIVE_ENTRIES {
                return;
            }
        }
        let (ring, next) = m.by_uid.entry(uid).or_default();
        let added = if ring.len() < SPECULATIVE_PER_ENDPOINT {
            ring.push(SpecEntry {
                block_size,
                expires,
                keys: keys.to_vec(),
            });
            1
        } else {
            let e = &mut ring[*next % SPECULATIVE_PER_ENDPOINT];
            *next = (*next + 1) % SPECULATIVE_PER_ENDPOINT;
            e.block_size = block_size;
            e.expires = expires;
            e.keys.clear();
            e.keys.extend_from_slice(keys);
            0
        };
        m.entries += added;
    }

    /// The longest leading run of `keys` speculated on endpoint `uid`.
    pub(super) fn longest(&self, uid: u64, block_size: u32, keys: &[u64], now: Instant) -> usize {
        let m = self.inner.lock();
        let Some((ring, _)) = m.by_uid.get(&uid) else {
            return 0;
        };
        ring.iter()
            .filter(|e| e.block_size == block_size && e.expires > now)
            .map(|e| common_run(&e.keys, keys))
            .max()
            .unwrap_or(0)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner.lock().entries
    }
}

/// Leading blocks two key chains share: chained keys agree at `i` exactly
/// when they agree up to `i`, so bisection finds the boundary.
fn common_run(a: &[u64], b: &[u64]) -> usize {
    let (mut lo, mut hi) = (0usize, a.len().min(b.len()));
    // Invariant: the first `lo` blocks agree; block `hi` (if any) does not.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if a[mid] == b[mid] {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Tokens per block on `e`: what its events report, else its metrics, else
/// the configured default.
pub(super) fn block_size_for(e: &Endpoint, settings: &EventSettings) -> u32 {
    let scraped = e.metrics.block_size();
    e.kv_events
        .block_size()
        .or((scraped > 0).then_some(scraped))
        .unwrap_or(settings.block_size_tokens)
        .max(1)
}

/// Fills `c.cached` (and `c.prefix_blocks`, in the approximate index's
/// blocks, for the hit-ratio metrics) from the candidate's events, when they
/// answer. Returns false when they do not (the approximate answer stays).
#[allow(clippy::too_many_arguments)]
pub(super) fn match_events(
    c: &mut Candidate<'_>,
    settings: &EventSettings,
    chains: &mut KeyChains,
    seed: u64,
    tokens: &[u32],
    speculative: &Speculative,
    now: Instant,
    prompt_blocks: u32,
) -> bool {
    let kv = &c.endpoint.kv_events;
    if !kv.configured() {
        return false;
    }
    let bs = block_size_for(c.endpoint, settings);
    let (keys, set, hint) = chains.get_with_hint(seed, tokens, bs);
    let Some(m) = kv.longest_prefix_near(keys, hint) else {
        return false;
    };
    chains.hints[set] = u32::try_from(m.any).unwrap_or(u32::MAX);
    let keys = &chains.keys[chains.sets[set].1 as usize..][..chains.sets[set].2 as usize];
    let mut gpu = m.gpu;
    let mut any = m.any;
    if settings.speculative_ttl.is_some() {
        let spec = speculative.longest(c.endpoint.uid, bs, keys, now);
        gpu = gpu.max(spec);
        any = any.max(spec);
    }
    let to_tokens =
        |blocks: usize| u32::try_from(blocks.saturating_mul(bs as usize)).unwrap_or(u32::MAX);
    c.cached = CachedPrefix {
        source: PrefixSource::Events,
        gpu_tokens: to_tokens(gpu),
        any_tokens: to_tokens(any),
    };
    // The approximate index's blocks stand for equal shares of the matched
    // span, so the share held converts to a block count.
    let span = (tokens.len() as u64).max(1);
    c.prefix_blocks =
        u32::try_from(u64::from(c.cached.any_tokens).min(span) * u64::from(prompt_blocks) / span)
            .unwrap_or(u32::MAX);
    true
}

/// llm-d's `precise-prefix-cache-scorer`: the prompt's cached share on each
/// endpoint, GPU tokens weighted `gpu_weight` (1) and offloaded ones
/// `offload_weight` (0.8), from the endpoint's KV events, or from the
/// approximate index for an endpoint whose events are unknown (so a config
/// with only this scorer still routes by prefix before events flow).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecisePrefixCacheScorer {
    pub gpu_weight: f64,
    pub offload_weight: f64,
}

impl Default for PrecisePrefixCacheScorer {
    fn default() -> Self {
        Self {
            gpu_weight: 1.0,
            offload_weight: DEFAULT_OFFLOAD_WEIGHT,
        }
    }
}

impl Scorer for PrecisePrefixCacheScorer {
    fn score(&self, cycle: &Cycle<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(c) {
            *o = cycle.prefix_fraction(c, self.gpu_weight, self.offload_weight);
        }
    }
}

/// The parameters llm-d's plugin takes (see the registry for which apply).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreciseParams {
    #[serde(default)]
    pub token_processor_config: Option<TokenProcessorConfig>,
    #[serde(default)]
    pub indexer_config: Option<IndexerConfig>,
    /// Subscriptions are configured by the server's flags, not here.
    #[serde(default)]
    pub kv_events_config: Option<serde_json::Value>,
    #[serde(default)]
    pub speculative_indexing: Option<bool>,
    #[serde(default, rename = "speculativeTTL")]
    pub speculative_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenProcessorConfig {
    pub block_size: Option<u32>,
    /// Seeds llm-d's FNV chain to reproduce the engine's hashes; our keys
    /// are our own (see `kv_events::index`), so it has no use here.
    pub hash_seed: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexerConfig {
    #[serde(default)]
    pub kv_cache_backend_configs: Option<Vec<BackendConfig>>,
    /// Everything else (tokenizer pool, index backend, prefix store): ours
    /// come from flags and the event index.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub weight: f64,
}

/// What a precise scorer's parameters configure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreciseConfig {
    pub scorer: PrecisePrefixCacheScorer,
    pub block_size_tokens: Option<u32>,
    /// `None`: speculation off (llm-d's default for this plugin).
    pub speculative_ttl: Option<Duration>,
}

impl PreciseParams {
    /// Checks and applies the parameters; `ignored` gets each accepted
    /// parameter that has no effect here, with why.
    pub fn config(
        self,
        ignored: &mut Vec<(String, &'static str)>,
    ) -> Result<PreciseConfig, String> {
        let mut scorer = PrecisePrefixCacheScorer::default();
        let mut block_size_tokens = None;
        if let Some(tp) = self.token_processor_config {
            if let Some(bs) = tp.block_size {
                if bs == 0 {
                    return Err("tokenProcessorConfig.blockSize must be > 0".into());
                }
                block_size_tokens = Some(bs);
            }
            if tp.hash_seed.is_some() {
                ignored.push((
                    "tokenProcessorConfig.hashSeed".into(),
                    "block keys are computed from token ids, not the engine's hashes",
                ));
            }
        }
        if let Some(ix) = self.indexer_config {
            for b in ix.kv_cache_backend_configs.unwrap_or_default() {
                if !(b.weight.is_finite() && b.weight >= 0.0) {
                    return Err(format!(
                        "backend {:?}: weight must be a finite number >= 0",
                        b.name
                    ));
                }
                match b.name.to_ascii_lowercase().as_str() {
                    "gpu" => scorer.gpu_weight = b.weight,
                    "cpu" => scorer.offload_weight = b.weight,
                    other => {
                        return Err(format!(
                            "indexerConfig.kvCacheBackendConfigs: unknown tier {other:?} (gpu or cpu)"
                        ));
                    }
                }
            }
            for key in ix.other.keys() {
                ignored.push((
                    format!("indexerConfig.{key}"),
                    "tokenizers and the event index are configured by the server's flags",
                ));
            }
        }
        if self.kv_events_config.is_some() {
            ignored.push((
                "kvEventsConfig".into(),
                "event subscriptions are configured by the server's --kv-events flags",
            ));
        }
        let ttl = match self.speculative_ttl.as_deref() {
            Some(t) => {
                crate::config::parse_duration(t).map_err(|e| format!("speculativeTTL: {e}"))?
            }
            None => DEFAULT_SPECULATIVE_TTL,
        };
        let speculative_ttl =
            (self.speculative_indexing == Some(true) && !ttl.is_zero()).then_some(ttl);
        Ok(PreciseConfig {
            scorer,
            block_size_tokens,
            speculative_ttl,
        })
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn common_run_is_the_shared_leading_run() {
        assert_eq!(common_run(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_run(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(common_run(&[5], &[1]), 0);
        assert_eq!(common_run(&[], &[1]), 0);
    }

    #[test]
    fn speculation_is_bounded_and_expires() {
        let s = Speculative::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(2);
        for i in 0..10u64 {
            s.record(7, 16, &[i, i + 1], now, ttl);
        }
        assert_eq!(s.len(), SPECULATIVE_PER_ENDPOINT, "per endpoint");
        assert_eq!(s.longest(7, 16, &[0, 1], now), 0, "the oldest overwritten");
        assert_eq!(s.longest(7, 16, &[9, 10, 11], now), 2);
        assert_eq!(s.longest(7, 32, &[9, 10], now), 0, "other block size");
        assert_eq!(s.longest(8, 16, &[9, 10], now), 0, "other endpoint");
        assert_eq!(s.longest(7, 16, &[9, 10], now + ttl), 0, "expired");
        for uid in 0..(SPECULATIVE_ENTRIES as u64 * 2) {
            s.record(1000 + uid, 16, &[uid], now, ttl);
        }
        assert_eq!(s.len(), SPECULATIVE_ENTRIES, "in all");
        // Once the old ones expire, new picks are remembered again.
        let later = now + ttl;
        s.record(1, 16, &[5], later, ttl);
        assert_eq!(s.len(), 1);
        assert_eq!(s.longest(1, 16, &[5], later), 1);
    }
}
