//! Scheduling: choose the endpoint (and ordered fallbacks) for one request.
//!
//! Pipeline, run on one immutable endpoint snapshot:
//! 1. candidates: the pool, narrowed by the gateway's subset hint;
//! 2. endpoints whose scrapes keep failing are dropped (not ready);
//! 3. admission: a sheddable request (priority < 0) is refused while every
//!    candidate is saturated;
//! 4. request data: each candidate's LoRA adapters are read against the
//!    model if a LoRA-aware plugin is configured (see `adapters`); the
//!    prompt is hashed into blocks once and matched against the prefix
//!    index, if any configured plugin uses it; with events enabled and the
//!    prompt's token ids known, candidates whose KV events are known are
//!    matched token-exactly instead (see `precise`), each candidate getting
//!    one [`CachedPrefix`] that every prefix-aware plugin reads;
//! 5. filters, in configured order; an empty result is an error;
//! 6. scorers: each gives every candidate a score in 0..1, the total is the
//!    weighted sum (GIE's rule, no normalisation by the sum of weights);
//! 7. the picker orders candidates; the first is the pick, the next ones the
//!    fallbacks; the pick's blocks are recorded in the prefix index (also
//!    for a pick answered by events: the approximate index is the fallback
//!    when its event stream drops), its key chain in the speculative
//!    entries when enabled, and scorers that learn from their decisions are
//!    told the pick (routing only, never when explaining).
//!
//! Nothing here knows about gRPC or HTTP: the input is [`RequestFacts`], the
//! output a [`Decision`] or a [`ScheduleError`] that the protocol layer maps to
//! a status. Plugins are plain synchronous functions over the snapshot.

mod adapters;
pub mod filters;
pub mod inventory;
pub mod pickers;
pub mod precise;
mod registry;
mod saturation;
pub mod scorers;
pub mod session;

use std::{
    cell::RefCell,
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

pub use precise::{CachedPrefix, EventSettings, PrecisePrefixCacheScorer, PrefixSource};
pub use registry::{BuildError, SchedulerOptions, build_scheduler};
pub use saturation::{
    ConcurrencyDetector, ConcurrencyMode, SaturationDetector, SaturationProbe, UtilizationDetector,
};

use crate::{
    endpoints::{Endpoint, EndpointSet, LoraState},
    prefix::{BlockHasher, PrefixIndex, chain_seed},
    request::Prompt,
};

/// Bytes of prompt text per token: the approximation GIE uses instead of a
/// tokenizer.
pub const BYTES_PER_TOKEN: u32 = 4;

/// What scheduling needs to know about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts<'a> {
    /// The model the request will be served as (after any rewrite).
    pub model: &'a str,
    pub prompt: Option<&'a Prompt<'a>>,
    pub cache_salt: Option<&'a str>,
    /// Priority of the request's objective; negative means sheddable.
    pub priority: i32,
    /// The gateway's subset hint: only these `ip:port` may be chosen.
    pub subset: Option<&'a [String]>,
    /// Value of the `test-epp-endpoint-selection` header (conformance).
    pub test_selection: Option<&'a str>,
    /// The session token the client sent back (see `session`).
    pub session_token: Option<&'a str>,
    /// The prompt's token ids (chat template applied), when a tokenizer
    /// exists for the model. The director fills it (`epp::tokenize`); with
    /// it, `prompt_tokens` is exact and events answer token-exactly.
    pub tokens: Option<&'a [u32]>,
}

/// One candidate endpoint with its signals read once for this request.
#[derive(Debug, Clone)]
pub struct Candidate<'s> {
    pub endpoint: &'s Arc<Endpoint>,
    /// Scraped waiting requests plus those routed here since that scrape
    /// and still in flight.
    pub waiting: u32,
    /// Of `waiting`, the requests routed here since the scrape.
    pub dispatched_since_scrape: u32,
    /// Requests of this picker the scrape may count that have finished since.
    pub finished_since_scrape: u32,
    pub running: u32,
    pub kv_usage: f64,
    /// Requests this picker routed here that are still in flight.
    pub in_flight: u32,
    /// Prompt tokens routed here that are not prefilled yet.
    pub prefill_backlog: u64,
    /// Requests routed here that have not answered their first byte yet.
    pub prefilling: u32,
    /// Scraped within the staleness threshold.
    pub fresh: bool,
    /// Leading prompt blocks (of `Cycle::block_tokens`) this endpoint
    /// holds: the approximate index's guess, or for an endpoint answered by
    /// events, its cached share of the prompt in those blocks.
    pub prefix_blocks: u32,
    /// The cached leading run every prefix-aware plugin reads (through
    /// [`Cycle::cached_tokens`] and [`Cycle::prefix_fraction`]), and which
    /// index answered.
    pub cached: CachedPrefix,
    /// The request's model among the endpoint's LoRA adapters (read only
    /// when a LoRA-aware plugin is configured).
    pub lora: LoraFit,
}

/// How the request's model stands among one endpoint's LoRA adapters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoraFit {
    /// An adapter of a running request: loaded.
    pub running: bool,
    /// An adapter of a waiting request: being loaded, or waiting for a slot.
    pub waiting: bool,
    /// Fewer adapters running and waiting than `max_lora`.
    pub free_slot: bool,
}

impl LoraFit {
    pub fn of(state: Option<&LoraState>, model: &str) -> Self {
        state.map_or_else(Self::default, |s| Self {
            running: s.running.contains(model),
            waiting: s.waiting.contains(model),
            free_slot: s.has_free_slot(),
        })
    }
}

impl<'s> Candidate<'s> {
    fn read(endpoint: &'s Arc<Endpoint>, fresh: bool) -> Self {
        let m = endpoint.metrics.sample_or_default();
        let dispatched = endpoint.dispatched_since_scrape();
        Self {
            endpoint,
            waiting: m.waiting.saturating_add(dispatched),
            dispatched_since_scrape: dispatched,
            finished_since_scrape: endpoint.finished_since_scrape(),
            running: m.running,
            kv_usage: m.kv_usage,
            in_flight: endpoint.in_flight(),
            prefill_backlog: endpoint.prefill_backlog(),
            prefilling: endpoint.prefilling(),
            fresh,
            prefix_blocks: 0,
            cached: CachedPrefix::default(),
            lora: LoraFit::default(),
        }
    }
}

/// Per-request facts shared by all plugins (GIE's cycle state).
#[derive(Debug, Clone, Copy)]
pub struct Cycle<'a> {
    pub facts: &'a RequestFacts<'a>,
    pub now: Instant,
    /// Prompt length in tokens: exact when the request carries its token
    /// ids, else estimated (bytes / [`BYTES_PER_TOKEN`]).
    pub prompt_tokens: u32,
    /// Leading prompt tokens an events-answered match can cover (the prompt,
    /// up to the prefix plugin's match limit): the denominator of an
    /// events-answered prefix score.
    pub match_tokens: u32,
    /// Tokens per prefix block used for this request.
    pub block_tokens: u32,
    /// Prompt blocks hashed (the denominator of the prefix score).
    pub prompt_blocks: u32,
    /// The model names a LoRA adapter: some candidate reports it running or
    /// waiting, or one did for an earlier routed request (vLLM serves an
    /// adapter under its own model name; see `adapters`).
    pub adapter_request: bool,
}

impl Cycle<'_> {
    /// Prompt tokens the candidate's cache saves prefilling: GPU tokens
    /// fully, offloaded ones [`precise::OFFLOADED_TOKEN_CREDIT`] each.
    pub fn cached_tokens(&self, c: &Candidate<'_>) -> u32 {
        let p = &c.cached;
        let offloaded = f64::from(p.offloaded_tokens()) * precise::OFFLOADED_TOKEN_CREDIT;
        p.gpu_tokens.saturating_add(offloaded as u32)
    }

    /// Prompt tokens the candidate would still have to prefill.
    pub fn uncached_tokens(&self, c: &Candidate<'_>) -> u32 {
        self.prompt_tokens.saturating_sub(self.cached_tokens(c))
    }

    /// The prompt's cached share on `c` in 0..1, GPU tokens weighted
    /// `gpu_weight`, offloaded ones `offload_weight`. An approximate answer
    /// is GIE's block ratio (matched blocks / prompt blocks hashed).
    pub fn prefix_fraction(&self, c: &Candidate<'_>, gpu_weight: f64, offload_weight: f64) -> f64 {
        match c.cached.source {
            PrefixSource::None => 0.0,
            PrefixSource::Approximate if self.prompt_blocks == 0 => 0.0,
            PrefixSource::Approximate => {
                gpu_weight * f64::from(c.prefix_blocks) / f64::from(self.prompt_blocks)
            }
            PrefixSource::Events if self.match_tokens == 0 => 0.0,
            PrefixSource::Events => {
                let p = &c.cached;
                (gpu_weight * f64::from(p.gpu_tokens)
                    + offload_weight * f64::from(p.offloaded_tokens()))
                    / f64::from(self.match_tokens)
            }
        }
    }
}

/// Removes candidates. Must keep the relative order of the others.
pub trait Filter: Send + Sync + fmt::Debug {
    fn filter(&self, cycle: &Cycle<'_>, candidates: &mut Vec<Candidate<'_>>);
}

/// Scores every candidate in 0..1 (higher is better); `out[i]` is for
/// `candidates[i]`.
pub trait Scorer: Send + Sync + fmt::Debug {
    fn score(&self, cycle: &Cycle<'_>, candidates: &[Candidate<'_>], out: &mut [f64]);

    /// A routed request went to `candidates[pick]` (never called when only
    /// explaining). For scorers that learn from their own decisions.
    fn picked(&self, _cycle: &Cycle<'_>, _candidates: &[Candidate<'_>], _pick: usize) {}
}

/// Orders up to `count` candidate indices, best first, from their totals.
pub trait Picker: Send + Sync + fmt::Debug {
    fn pick(&self, totals: &[f64], count: usize, out: &mut Vec<usize>);
}

/// A plugin instance with the name and type it was configured under.
#[derive(Debug)]
pub struct Named<T: ?Sized> {
    pub name: String,
    pub plugin_type: &'static str,
    pub plugin: Box<T>,
}

/// Filters, weighted scorers and a picker: one scheduling profile.
#[derive(Debug)]
pub struct Profile {
    pub name: String,
    pub filters: Vec<Named<dyn Filter>>,
    pub scorers: Vec<(Named<dyn Scorer>, f64)>,
    pub picker: Named<dyn Picker>,
    /// How many endpoints the picker should return at least.
    pub picker_min_endpoints: usize,
}

/// How prompts are cut and indexed, from the prefix plugin's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixSettings {
    /// Block size when no endpoint reports one.
    pub block_size_tokens: u32,
    pub max_blocks: u32,
    /// Blocks remembered per endpoint when it does not report its cache size.
    pub lru_capacity_per_server: u32,
    /// Take block size and capacity from what endpoints report.
    pub auto_tune: bool,
}

impl Default for PrefixSettings {
    fn default() -> Self {
        Self {
            block_size_tokens: 16,
            max_blocks: 256,
            lru_capacity_per_server: 31_250,
            auto_tune: true,
        }
    }
}

/// Why no destination was chosen. The protocol layer maps these to HTTP
/// statuses (503 or 429).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no endpoints in the pool")]
    EmptyPool,
    #[error("no endpoint of the pool matches the subset hint")]
    SubsetMismatch,
    #[error("no ready endpoint: every candidate's metrics are failing")]
    NoReadyEndpoint,
    #[error("filter {0} removed every candidate endpoint")]
    Filtered(String),
    #[error("pool is saturated; sheddable request dropped")]
    Shed,
}

impl ScheduleError {
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Shed => 429,
            _ => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::EmptyPool | Self::NoReadyEndpoint => "no_ready_endpoint",
            Self::SubsetMismatch => "no_subset_match",
            Self::Filtered(_) => "no_eligible_endpoint",
            Self::Shed => "pool_saturated",
        }
    }
}

/// The outcome of scheduling one request.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The pick first, then fallbacks, all distinct.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Estimated prompt tokens the pick still has to prefill.
    pub prefill_tokens: u32,
    /// Prompt length in tokens (exact with token ids, else estimated).
    pub prompt_tokens: u32,
    pub prompt_blocks: u32,
    /// Leading prompt blocks the pick probably holds.
    pub matched_blocks: u32,
    pub block_tokens: u32,
    /// The pick's cached leading run and which index answered.
    pub cached: CachedPrefix,
    pub explanation: Option<Explanation>,
}

impl Decision {
    /// The destination value: `ip:port[,ip:port...]`, pick first.
    pub fn destination(&self) -> String {
        let mut out = String::with_capacity(self.endpoints.len() * 22);
        for (i, e) in self.endpoints.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&e.host_port);
        }
        out
    }
}

/// Why each candidate scored what it did (for Admin.Explain and debug logs).
#[derive(Debug, Clone, Default)]
pub struct Explanation {
    pub candidates: Vec<ExplainedCandidate>,
}

#[derive(Debug, Clone, Default)]
pub struct ExplainedCandidate {
    pub name: String,
    pub address: String,
    /// (scorer name, score before weighting)
    pub scores: Vec<(String, f64)>,
    pub total: f64,
    /// The filter (or built-in check) that removed it, if any.
    pub filtered_by: Option<String>,
    /// Its cached leading run of the prompt and which index answered
    /// (default for a filtered candidate).
    pub cached: CachedPrefix,
}

impl fmt::Display for Explanation {
    /// Compact one-line form for the per-request debug log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.candidates.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}", c.address)?;
            if let Some(by) = &c.filtered_by {
                write!(f, " filtered by {by}")?;
                continue;
            }
            write!(f, " total={:.3}", c.total)?;
            if c.cached.source != PrefixSource::None {
                write!(
                    f,
                    " prefix={}:{}/{}",
                    c.cached.source.as_str(),
                    c.cached.gpu_tokens,
                    c.cached.any_tokens
                )?;
            }
            for (name, s) in &c.scores {
                write!(f, " {name}={s:.3}")?;
            }
        }
        Ok(())
    }
}

/// Reused per-thread buffers, so a decision allocates only its result.
#[derive(Default)]
struct Scratch {
    hasher: BlockHasher,
    hashes: Vec<u64>,
    chains: precise::KeyChains,
    slots: Vec<(u16, u64)>,
    matches: Vec<u32>,
    scores: Vec<f64>,
    totals: Vec<f64>,
    order: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// What a scheduling call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Route the request: the pick's blocks are recorded in the prefix index.
    Route,
    /// Route, and also return an [`Explanation`] (for debug logs).
    RouteExplained,
    /// Only explain (Admin.Explain): nothing is recorded.
    Explain,
}

impl Purpose {
    fn records(self) -> bool {
        self != Self::Explain
    }

    fn explains(self) -> bool {
        self != Self::Route
    }
}

/// The configured scheduler.
#[derive(Debug)]
pub struct Scheduler {
    profile: Profile,
    prefix: Option<PrefixSettings>,
    /// Token-exact matching against KV events (see `precise`).
    events: Option<EventSettings>,
    speculative: precise::Speculative,
    index: Arc<PrefixIndex>,
    saturation: SaturationDetector,
    /// Some plugin reads the endpoints' LoRA adapters.
    lora_aware: bool,
    /// The session header, when a session-affinity plugin is configured.
    session_header: Option<Arc<str>>,
    adapters: adapters::KnownAdapters,
    fallback_endpoints: usize,
    max_scrape_failures: u32,
    staleness: Duration,
    epoch: Instant,
}

impl Scheduler {
    pub fn index(&self) -> &Arc<PrefixIndex> {
        &self.index
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub fn prefix_settings(&self) -> Option<PrefixSettings> {
        self.prefix
    }

    /// How events are used; `None` when they are not.
    pub fn event_settings(&self) -> Option<EventSettings> {
        self.events
    }

    /// The request and response header carrying session tokens, when a
    /// session-affinity plugin is configured.
    pub fn session_header(&self) -> Option<&Arc<str>> {
        self.session_header.as_ref()
    }

    /// Whether any configured filter is the conformance header filter.
    pub fn has_filter_type(&self, plugin_type: &str) -> bool {
        self.profile
            .filters
            .iter()
            .any(|f| f.plugin_type == plugin_type)
    }

    /// Schedules a request with a body.
    pub fn schedule(
        &self,
        facts: &RequestFacts<'_>,
        set: &EndpointSet,
        purpose: Purpose,
    ) -> Result<Decision, ScheduleError> {
        SCRATCH.with(|scratch| self.schedule_with(&mut scratch.borrow_mut(), facts, set, purpose))
    }

    fn schedule_with(
        &self,
        s: &mut Scratch,
        facts: &RequestFacts<'_>,
        set: &EndpointSet,
        purpose: Purpose,
    ) -> Result<Decision, ScheduleError> {
        let now = Instant::now();
        let mut explanation = purpose.explains().then(Explanation::default);
        let mut candidates = self.eligible(set, facts, now, explanation.as_mut())?;

        if facts.priority < 0 && self.saturation.pool_saturated(&candidates) {
            return Err(ScheduleError::Shed);
        }

        let prompt_tokens = match facts.tokens {
            Some(t) => u32::try_from(t.len()).unwrap_or(u32::MAX),
            None => facts.prompt.map_or(0, |p| {
                u32::try_from(p.len()).unwrap_or(u32::MAX) / BYTES_PER_TOKEN
            }),
        };
        let mut adapter_request = false;
        if self.lora_aware {
            for c in &mut candidates {
                c.lora = c.endpoint.lora.with(|s| LoraFit::of(s, facts.model));
                adapter_request |= c.lora.running || c.lora.waiting;
            }
            if adapter_request && purpose.records() {
                self.adapters.learn(facts.model);
            }
            adapter_request = adapter_request || self.adapters.contains(facts.model);
        }
        let mut cycle = Cycle {
            facts,
            now,
            prompt_tokens,
            match_tokens: 0,
            block_tokens: 0,
            prompt_blocks: 0,
            adapter_request,
        };
        if let (Some(settings), Some(prompt)) = (self.prefix, facts.prompt) {
            self.match_prefix(s, &settings, prompt, &mut cycle, &mut candidates);
        }

        for f in &self.profile.filters {
            let before = explanation.as_ref().map(|_| addresses(&candidates));
            f.plugin.filter(&cycle, &mut candidates);
            if let (Some(ex), Some(before)) = (explanation.as_mut(), before) {
                for addr in before {
                    if !candidates.iter().any(|c| *c.endpoint.host_port == *addr)
                        && let Some(e) = set.get(&addr)
                    {
                        ex.candidates.push(filtered(e, &f.name));
                    }
                }
            }
            if candidates.is_empty() {
                return Err(ScheduleError::Filtered(f.name.clone()));
            }
        }

        let n = candidates.len();
        s.totals.clear();
        s.totals.resize(n, 0.0);
        s.scores.clear();
        s.scores.resize(n, 0.0);
        let mut per_scorer: Vec<Vec<f64>> = Vec::new();
        for (scorer, weight) in &self.profile.scorers {
            s.scores.iter_mut().for_each(|x| *x = 0.0);
            scorer.plugin.score(&cycle, &candidates, &mut s.scores);
            for (t, sc) in s.totals.iter_mut().zip(&s.scores) {
                *t += weight * sc.clamp(0.0, 1.0);
            }
            if explanation.is_some() {
                per_scorer.push(s.scores.clone());
            }
        }

        let want = (1 + self.fallback_endpoints)
            .max(self.profile.picker_min_endpoints)
            .min(n);
        s.order.clear();
        self.profile
            .picker
            .plugin
            .pick(&s.totals, want, &mut s.order);
        if s.order.is_empty() {
            // A picker must return at least one index for a non-empty set;
            // fall back to the first candidate rather than fail the request.
            s.order.push(0);
        }
        let pick = &candidates[s.order[0]];
        let decision_prefill = cycle.uncached_tokens(pick);

        if purpose.records() {
            for (scorer, _) in &self.profile.scorers {
                scorer.plugin.picked(&cycle, &candidates, s.order[0]);
            }
        }
        if purpose.records() && cycle.prompt_blocks > 0 {
            let capacity = self.capacity_for(pick.endpoint);
            self.index
                .record(pick.endpoint.slot, pick.endpoint.uid, capacity, &s.hashes);
        }
        if purpose.records()
            && pick.cached.source == PrefixSource::Events
            && let Some(ttl) = self.events.and_then(|e| e.speculative_ttl)
        {
            self.speculate(s, pick, now, ttl);
        }

        if let Some(ex) = explanation.as_mut() {
            for (i, c) in candidates.iter().enumerate() {
                ex.candidates.push(ExplainedCandidate {
                    name: c.endpoint.name().to_owned(),
                    address: c.endpoint.host_port.to_string(),
                    scores: self
                        .profile
                        .scorers
                        .iter()
                        .zip(&per_scorer)
                        .map(|((sc, _), v)| (sc.name.clone(), v[i]))
                        .collect(),
                    total: s.totals[i],
                    filtered_by: None,
                    cached: c.cached,
                });
            }
        }

        Ok(Decision {
            endpoints: s
                .order
                .iter()
                .map(|&i| Arc::clone(candidates[i].endpoint))
                .collect(),
            prefill_tokens: decision_prefill,
            prompt_tokens: cycle.prompt_tokens,
            prompt_blocks: cycle.prompt_blocks,
            matched_blocks: pick.prefix_blocks,
            block_tokens: cycle.block_tokens,
            cached: pick.cached,
            explanation,
        })
    }

    /// Routes a request without a body (GET /v1/models, /health): the least
    /// loaded ready endpoint, random among equals, with fallbacks.
    pub fn schedule_bodiless(
        &self,
        set: &EndpointSet,
        subset: Option<&[String]>,
    ) -> Result<Decision, ScheduleError> {
        let facts = RequestFacts {
            subset,
            ..RequestFacts::default()
        };
        let candidates = self.eligible(set, &facts, Instant::now(), None)?;
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        fastrand::shuffle(&mut order);
        order.sort_by_key(|&i| {
            let c = &candidates[i];
            u64::from(c.in_flight) + u64::from(c.waiting) + u64::from(c.running)
        });
        order.truncate(1 + self.fallback_endpoints);
        Ok(Decision {
            endpoints: order
                .iter()
                .map(|&i| Arc::clone(candidates[i].endpoint))
                .collect(),
            prefill_tokens: 0,
            prompt_tokens: 0,
            prompt_blocks: 0,
            matched_blocks: 0,
            block_tokens: 0,
            cached: CachedPrefix::default(),
            explanation: None,
        })
    }

    /// Steps 1-2: the pool narrowed by the subset hint, minus endpoints whose
    /// scrapes keep failing.
    fn eligible<'s>(
        &self,
        set: &'s EndpointSet,
        facts: &RequestFacts<'_>,
        now: Instant,
        mut explanation: Option<&mut Explanation>,
    ) -> Result<Vec<Candidate<'s>>, ScheduleError> {
        if set.is_empty() {
            return Err(ScheduleError::EmptyPool);
        }
        let mut out = Vec::with_capacity(set.len());
        let mut any_in_subset = false;
        for e in set.endpoints() {
            if let Some(subset) = facts.subset
                && !subset.iter().any(|s| s.as_str() == &*e.host_port)
            {
                continue;
            }
            any_in_subset = true;
            if e.metrics.consecutive_failures() >= self.max_scrape_failures {
                if let Some(ex) = explanation.as_deref_mut() {
                    ex.candidates.push(filtered(e, "scrape-failures"));
                }
                continue;
            }
            let fresh = e
                .metrics
                .age(now, self.epoch)
                .is_some_and(|a| a <= self.staleness);
            out.push(Candidate::read(e, fresh));
        }
        if !any_in_subset {
            return Err(ScheduleError::SubsetMismatch);
        }
        if out.is_empty() {
            return Err(ScheduleError::NoReadyEndpoint);
        }
        Ok(out)
    }

    fn match_prefix(
        &self,
        s: &mut Scratch,
        settings: &PrefixSettings,
        prompt: &Prompt<'_>,
        cycle: &mut Cycle<'_>,
        candidates: &mut [Candidate<'_>],
    ) {
        let block_tokens = if settings.auto_tune {
            candidates
                .iter()
                .map(|c| c.endpoint.metrics.block_size())
                .find(|&b| b > 0)
                .unwrap_or(settings.block_size_tokens)
        } else {
            settings.block_size_tokens
        };
        let block_bytes = block_tokens.saturating_mul(BYTES_PER_TOKEN) as usize;
        let seed = chain_seed(cycle.facts.model, cycle.facts.cache_salt);
        s.hasher.hash_prompt(
            prompt,
            seed,
            block_bytes,
            settings.max_blocks as usize,
            &mut s.hashes,
        );
        cycle.block_tokens = block_tokens;
        cycle.prompt_blocks = u32::try_from(s.hashes.len()).unwrap_or(u32::MAX);
        if !s.hashes.is_empty() {
            s.slots.clear();
            s.slots
                .extend(candidates.iter().map(|c| (c.endpoint.slot, c.endpoint.uid)));
            self.index
                .longest_matches(&s.hashes, &s.slots, &mut s.matches);
        }
        // The approximate index's blocks stand for text; with token ids the
        // prompt's real token count scales them.
        let prompt_bytes = u64::try_from(prompt.len()).unwrap_or(u64::MAX).max(1);
        let block_bytes = block_bytes as u64;
        for (i, c) in candidates.iter_mut().enumerate() {
            let m = s
                .matches
                .get(i)
                .copied()
                .filter(|_| !s.hashes.is_empty())
                .unwrap_or(0);
            c.prefix_blocks = m;
            let tokens = match cycle.facts.tokens {
                None => m.saturating_mul(block_tokens),
                Some(_) => {
                    let bytes = (u64::from(m) * block_bytes).min(prompt_bytes);
                    u32::try_from(bytes * u64::from(cycle.prompt_tokens) / prompt_bytes)
                        .unwrap_or(u32::MAX)
                }
            };
            c.cached = CachedPrefix {
                source: PrefixSource::Approximate,
                gpu_tokens: tokens,
                any_tokens: tokens,
            };
        }

        let (Some(events), Some(tokens)) = (self.events.as_ref(), cycle.facts.tokens) else {
            return;
        };
        // Matched span: the prompt up to the prefix plugin's limit, as the
        // approximate index hashes at most `max_blocks` blocks.
        let limit = (settings.max_blocks as usize).saturating_mul(block_tokens.max(1) as usize);
        let tokens = &tokens[..tokens.len().min(limit)];
        cycle.match_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        s.chains.clear();
        let seed = events_seed(cycle);
        for c in candidates.iter_mut() {
            precise::match_events(
                c,
                events,
                &mut s.chains,
                seed,
                tokens,
                &self.speculative,
                cycle.now,
                cycle.prompt_blocks,
            );
        }
    }

    /// Remembers the pick's key chain as cached there until its events
    /// arrive (see `precise`).
    fn speculate(&self, s: &Scratch, pick: &Candidate<'_>, now: Instant, ttl: Duration) {
        let Some(events) = &self.events else { return };
        let bs = precise::block_size_for(pick.endpoint, events);
        if let Some((bs, keys)) = s.chains.chains().find(|(b, _)| *b == bs) {
            self.speculative
                .record(pick.endpoint.uid, bs, keys, now, ttl);
        }
    }

    /// Blocks the index may keep for an endpoint: its reported KV-cache size
    /// when auto-tuning, else the configured per-server capacity.
    fn capacity_for(&self, e: &Endpoint) -> u32 {
        let settings = self.prefix.unwrap_or_default();
        let reported = e.metrics.num_blocks();
        if settings.auto_tune && reported > 0 {
            reported
        } else {
            settings.lru_capacity_per_server
        }
    }
}

/// The first key of an events chain: the base model's, or the request's
/// LoRA adapter's (vLLM names an adapter's blocks by its served name, the
/// request's model). Cache salts join the chain here when the event index
/// keys them.
fn events_seed(cycle: &Cycle<'_>) -> u64 {
    let lora = cycle
        .adapter_request
        .then(|| crate::kv_events::lora_key(cycle.facts.model));
    crate::kv_events::chain_seed(lora, cycle.facts.cache_salt.map(str::as_bytes))
}

fn addresses(c: &[Candidate<'_>]) -> Vec<Arc<str>> {
    c.iter()
        .map(|c| Arc::clone(&c.endpoint.host_port))
        .collect()
}

fn filtered(e: &Endpoint, by: &str) -> ExplainedCandidate {
    ExplainedCandidate {
        name: e.name().to_owned(),
        address: e.host_port.to_string(),
        filtered_by: Some(by.to_owned()),
        ..ExplainedCandidate::default()
    }
}

#[cfg(test)]
mod destination_tests;
#[cfg(test)]
mod plugin_tests;
#[cfg(test)]
mod precise_tests;
#[cfg(test)]
mod tests;
