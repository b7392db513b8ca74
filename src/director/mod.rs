//! The director: what happens to one request between the protocol layer and
//! the scheduler, independent of how the request arrived (ext_proc stream or
//! Admin.Explain).
//!
//! parse the body -> resolve the target model (header, then config rule) ->
//! resolve the objective's priority -> schedule on the current endpoint
//! snapshot -> splice the new model name into the body if it changed ->
//! hand back the destination and a [`RequestTicket`] that owns the request
//! until it finishes.
//! Bodiless requests and paths that are not inference APIs are routed by load
//! alone.
//!
//! The director is the protocol layer's only door to scheduling: it counts
//! the request-path metrics, logs each decision (with every candidate's
//! scores at debug level), and answers in terms the protocol needs
//! (a destination, a body, an HTTP status, a response header to set), never
//! in scores.

mod slo;
mod ticket;
mod trace;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tracing::Level;

use slo::Verdict;
pub use slo::{SLO_TTFT_HEADER, SloAdmission, parse_objective as parse_slo_objective};
pub use ticket::RequestTicket;
use ticket::SessionReply;

/// Longest session token read from a request; longer ones are ignored.
pub const MAX_SESSION_TOKEN_BYTES: usize = crate::scheduling::session::MAX_TOKEN_BYTES;

use crate::{
    config::{EndpointPickerConfig, MODEL_REWRITE_HEADER, ModelRewriteSpec, TEST_SELECTION_HEADER},
    endpoints::EndpointStore,
    flow_control::{Admission, Capacity, FlowController, FlowRequest, Rejection, Waiting},
    request::{self, ApiKind, InferenceRequest, ParseError},
    scheduling::{
        BYTES_PER_TOKEN, Decision, Purpose, RequestFacts, SaturationProbe, ScheduleError, Scheduler,
    },
    telemetry::{RequestMetrics, logging::Clip},
    tokenize::Tokenizers,
};

/// What the protocol layer knows about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteInput<'a> {
    pub path: &'a str,
    /// `None` for a request without a body.
    pub body: Option<&'a [u8]>,
    /// `x-gateway-inference-objective`
    pub objective: Option<&'a str>,
    /// `x-gateway-inference-fairness-id` (flow control's flow).
    pub fairness_id: Option<&'a str>,
    /// `x-slo-ttft-ms`, parsed (SLO admission's objective).
    pub slo_ttft_ms: Option<u64>,
    /// `x-gateway-model-name-rewrite`, as the client sent it (honoured only
    /// when the config trusts it).
    pub model_rewrite: Option<&'a str>,
    /// `test-epp-endpoint-selection`, as the client sent it (honoured only
    /// when the config trusts it).
    pub test_selection: Option<&'a str>,
    /// The gateway's subset hint.
    pub subset: Option<&'a [String]>,
    /// The value of [`Director::session_header`], as the client sent it.
    pub session_token: Option<&'a str>,
    /// `x-request-id`, for log lines.
    pub request_id: &'a str,
    /// When the request's headers arrived (now when `None`): the request's
    /// duration counts from there.
    pub arrived: Option<Instant>,
    /// The request's trace span when it is sampled: the decision becomes
    /// a child span of it, and the ticket's response another.
    pub trace: Option<&'a tracing::Span>,
}

/// A routed request: where it goes, the body to forward when it had to
/// change, and the ticket the protocol layer keeps until the request ends.
#[derive(Debug)]
pub struct Routed {
    /// `ip:port[,ip:port...]`, the pick first, then its fallbacks.
    pub destination: String,
    /// The body to forward when it had to change (model rewrite).
    pub new_body: Option<Vec<u8>>,
    pub ticket: RequestTicket,
}

/// How a request would be routed, and why (Admin.Explain).
#[derive(Debug)]
pub struct Explained {
    pub decision: Decision,
    /// The model the client asked for ("" when the body was not parsed).
    pub model: String,
    /// The model the request would be sent as.
    pub target_model: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error(transparent)]
    FlowControl(#[from] Rejection),
    #[error(
        "time to first token objective of {slo_ms} ms cannot be met: predicted {predicted_ms} ms"
    )]
    SloUnattainable { slo_ms: u64, predicted_ms: u64 },
}

impl RouteError {
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Parse(_) => 400,
            Self::BodyTooLarge(_) => 413,
            Self::Schedule(e) => e.http_status(),
            Self::FlowControl(r) => r.http_status(),
            Self::SloUnattainable { .. } => 429,
        }
    }

    /// A stable machine-readable code for the error body and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Parse(e) => e.code(),
            Self::BodyTooLarge(_) => "request_too_large",
            Self::Schedule(e) => e.code(),
            Self::FlowControl(r) => r.code(),
            Self::SloUnattainable { .. } => "slo_ttft_unattainable",
        }
    }

    /// The OpenAI error `type` for the error body.
    pub fn error_type(&self) -> &'static str {
        match self.http_status() {
            400 | 413 => "invalid_request_error",
            429 => "rate_limit_error",
            _ => "service_unavailable",
        }
    }
}

/// Weighted model-rewrite rules from the config file.
#[derive(Debug, Default)]
struct Rewrites {
    exact: HashMap<String, Vec<(String, f64)>>,
    any: Option<Vec<(String, f64)>>,
}

impl Rewrites {
    /// Config-file rules: a later entry for the same model replaces an
    /// earlier one.
    fn new(specs: &[ModelRewriteSpec]) -> Self {
        Self::build(specs, true)
    }

    /// Rules from InferenceModelRewrite objects, already in precedence
    /// order: the first entry for a model wins.
    fn first_wins(specs: &[ModelRewriteSpec]) -> Self {
        Self::build(specs, false)
    }

    fn build(specs: &[ModelRewriteSpec], last_wins: bool) -> Self {
        let mut r = Self::default();
        for s in specs {
            let targets: Vec<(String, f64)> = s
                .targets
                .iter()
                .map(|t| (t.model.clone(), t.weight))
                .collect();
            if s.model == "*" || s.model.is_empty() {
                if last_wins || r.any.is_none() {
                    r.any = Some(targets);
                }
            } else if last_wins || !r.exact.contains_key(&s.model) {
                r.exact.insert(s.model.clone(), targets);
            }
        }
        r
    }

    #[cfg(test)]
    fn target(&self, model: &str) -> Option<&str> {
        static NONE: std::sync::LazyLock<Rewrites> = std::sync::LazyLock::new(Rewrites::default);
        self.target_with(&NONE, model)
    }

    /// Config rules first, each kind before the cluster's: an exact
    /// config rule, an exact object rule, a config catch-all, an object
    /// catch-all.
    fn target_with<'a>(&'a self, dynamic: &'a Rewrites, model: &str) -> Option<&'a str> {
        let targets = self
            .exact
            .get(model)
            .or_else(|| dynamic.exact.get(model))
            .or(self.any.as_ref())
            .or(dynamic.any.as_ref())?;
        Self::choose(targets)
    }

    fn choose(targets: &[(String, f64)]) -> Option<&str> {
        let total: f64 = targets.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            // All weights zero: uniform, as GIE does.
            return targets
                .get(fastrand::usize(..targets.len().max(1)))
                .map(|(m, _)| m.as_str());
        }
        let mut x = fastrand::f64() * total;
        for (m, w) in targets {
            if x < *w {
                return Some(m);
            }
            x -= w;
        }
        targets.last().map(|(m, _)| m.as_str())
    }
}

/// Token ids a thread keeps between requests (most prompts fit).
const MAX_KEPT_TOKENS: usize = 1 << 16;

/// Request bodies from this size up are tokenized with the worker thread
/// handed over (`block_in_place`): encoding a long uncached prompt takes
/// milliseconds, which on an async worker would stall every other stream
/// it serves. Below it, encoding is short enough that the hand-over (a
/// thread wake-up) would cost more than it saves.
const HAND_OVER_BYTES: usize = 32 * 1024;

thread_local! {
    /// The prompt's token ids, reused across requests on this thread.
    static TOKENS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

static TOKENIZE_LOG: crate::telemetry::log_limit::LogLimiter =
    crate::telemetry::log_limit::LogLimiter::new(std::time::Duration::from_secs(30));

#[derive(Debug)]
pub struct Director {
    store: Arc<EndpointStore>,
    scheduler: Scheduler,
    /// Priority per objective name. File-configured objectives are the
    /// base; Kubernetes InferenceObjective objects are merged in at runtime.
    objectives: ArcSwap<HashMap<String, i32>>,
    static_objectives: HashMap<String, i32>,
    rewrites: Rewrites,
    /// Rules of the pool's InferenceModelRewrite objects, replaced whole
    /// when they change.
    dynamic_rewrites: ArcSwap<Rewrites>,
    /// Whether the client's routing headers are honoured (`trustedHeaders`).
    trust_model_rewrite: bool,
    trust_test_selection: bool,
    metrics: Arc<RequestMetrics>,
    /// The served models' tokenizers: a request for a model with one is
    /// matched token-exactly against its pods' KV events.
    tokenizers: Arc<Tokenizers>,
    /// Flow control, when the config's feature gate turns it on.
    flow: Option<Arc<FlowController>>,
    /// SLO admission (ours), when the config has `sloAdmission`.
    slo: Option<Arc<SloAdmission>>,
}

/// A scheduled request before it becomes a [`Routed`] or an [`Explained`].
struct Plan {
    decision: Decision,
    model: String,
    target_model: String,
    new_body: Option<Vec<u8>>,
}

impl Director {
    pub fn new(
        store: Arc<EndpointStore>,
        scheduler: Scheduler,
        cfg: &EndpointPickerConfig,
        metrics: Arc<RequestMetrics>,
    ) -> Self {
        let static_objectives: HashMap<String, i32> = cfg
            .objectives
            .iter()
            .map(|o| (o.name.clone(), o.priority))
            .collect();
        Self {
            store,
            scheduler,
            objectives: ArcSwap::from_pointee(static_objectives.clone()),
            static_objectives,
            rewrites: Rewrites::new(&cfg.model_rewrites),
            dynamic_rewrites: ArcSwap::from_pointee(Rewrites::default()),
            trust_model_rewrite: cfg.trusts(MODEL_REWRITE_HEADER),
            trust_test_selection: cfg.trusts(TEST_SELECTION_HEADER),
            metrics,
            tokenizers: Arc::default(),
            flow: None,
            slo: None,
        }
    }

    /// Tokenize prompts of the models these tokenizers serve.
    pub fn with_tokenizers(mut self, tokenizers: Arc<Tokenizers>) -> Self {
        self.tokenizers = tokenizers;
        self
    }

    /// Puts `flow` between parsing and scheduling (see [`Director::admit`]).
    pub fn with_flow_control(mut self, flow: Arc<FlowController>) -> Self {
        self.flow = Some(flow);
        self
    }

    /// Admits requests with a TTFT objective by predicted TTFT (see `slo`).
    pub fn with_slo_admission(mut self, slo: Arc<SloAdmission>) -> Self {
        self.slo = Some(slo);
        self
    }

    pub fn flow_control(&self) -> Option<&Arc<FlowController>> {
        self.flow.as_ref()
    }

    /// The pool's saturation as the configured detector reads it, for flow
    /// control's dispatch decisions.
    pub fn pool_capacity(&self) -> Arc<dyn Capacity> {
        Arc::new(PoolCapacity {
            store: Arc::clone(&self.store),
            probe: self.scheduler.saturation_probe(),
        })
    }

    /// Flow control's admission, asked before [`Director::route`]: `None`
    /// means route now; a [`Waiting`] handle means route once it is
    /// dispatched (late binding: scheduling then sees the pool as it is).
    /// A refusal is counted like every other.
    pub fn admit(&self, input: &RouteInput<'_>) -> Result<Option<Waiting>, RouteError> {
        let max_wait = self.slo_admission(input)?;
        let Some(flow) = &self.flow else {
            return Ok(None);
        };
        let req = FlowRequest {
            fairness_id: input.fairness_id,
            priority: input.objective.map_or(0, |o| self.objective_priority(o)),
            bytes: input.body.map_or(0, |b| b.len() as u64),
        };
        match flow.admit_within(&req, max_wait) {
            Admission::Go => Ok(None),
            Admission::Wait(w) => Ok(Some(w)),
            Admission::Reject(r) => Err(self.flow_rejected(input, r)),
        }
    }

    /// SLO admission: `Err` refuses the request now; `Ok(Some(d))` lets it
    /// wait in flow control's queue at most `d` (the objective minus the
    /// predicted TTFT once dispatched); `Ok(None)` means no objective, or no
    /// prediction yet.
    fn slo_admission(&self, input: &RouteInput<'_>) -> Result<Option<Duration>, RouteError> {
        let (Some(slo), Some(slo_ms)) = (&self.slo, input.slo_ttft_ms) else {
            return Ok(None);
        };
        let tokens = prompt_tokens_estimate(input);
        let best = self
            .store
            .snapshot()
            .endpoints()
            .iter()
            .map(|e| e.prefill_backlog())
            .min()
            .unwrap_or(0);
        let refuse = |predicted_ms: f64| {
            Err(self.rejected(
                input,
                RouteError::SloUnattainable {
                    slo_ms,
                    predicted_ms: predicted_ms.round() as u64,
                },
            ))
        };
        match slo.verdict(slo_ms, tokens, best as f64) {
            Verdict::Unknown => Ok(None),
            Verdict::Meets { max_wait } => Ok(Some(max_wait)),
            // Room will come only through flow control's queue.
            Verdict::Wait { max_wait, .. } if self.flow.is_some() => Ok(Some(max_wait)),
            Verdict::Wait { predicted_ms, .. } | Verdict::Refuse { predicted_ms } => {
                refuse(predicted_ms)
            }
        }
    }

    /// A queued request that flow control gave up on (its TTL), counted
    /// like every refusal.
    pub fn flow_rejected(&self, input: &RouteInput<'_>, r: Rejection) -> RouteError {
        self.rejected(input, r.into())
    }

    pub fn store(&self) -> &Arc<EndpointStore> {
        &self.store
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Whether a request's `x-gateway-model-name-rewrite` is honoured: the
    /// protocol layer then asks for response bodies up front, since the
    /// rewritten name must be restored in them.
    pub fn trusts_model_rewrite_header(&self) -> bool {
        self.trust_model_rewrite
    }

    /// The request header carrying a session token back, and the response
    /// header naming the endpoint that served, when a session-affinity
    /// plugin is configured.
    pub fn session_header(&self) -> Option<&str> {
        self.scheduler.session_header().map(|h| &**h)
    }

    /// Priority of an objective; 0 when unknown (GIE's default).
    pub fn objective_priority(&self, name: &str) -> i32 {
        self.objectives.load().get(name).copied().unwrap_or(0)
    }

    /// Replaces the objectives learned at runtime (Kubernetes
    /// InferenceObjective objects); file-configured ones win on conflict.
    pub fn set_dynamic_objectives(&self, dynamic: HashMap<String, i32>) {
        let mut merged = dynamic;
        merged.extend(self.static_objectives.iter().map(|(k, v)| (k.clone(), *v)));
        self.objectives.store(Arc::new(merged));
    }

    /// Replaces the rewrite rules learned at runtime (Kubernetes
    /// InferenceModelRewrite objects), in precedence order: for a model, the
    /// first rule naming it applies, and the first catch-all (`*`) applies
    /// to models no rule names. Config-file rules win on conflict.
    pub fn set_dynamic_rewrites(&self, rules: &[ModelRewriteSpec]) {
        self.dynamic_rewrites
            .store(Arc::new(Rewrites::first_wins(rules)));
    }

    /// Routes one request: the pick's blocks are recorded in the prefix
    /// index, the request is counted, and the returned ticket holds its
    /// in-flight accounting until it is dropped.
    pub fn route(&self, input: &RouteInput<'_>) -> Result<Routed, RouteError> {
        let started = Instant::now();
        // Flow control, when on, has admitted the request before this
        // (`admit`); the ext_proc stream traces its wait
        // (`traces::names::FLOW_CONTROL_QUEUE`), ended before this span.
        let traced = input.trace.filter(|s| !s.is_disabled());
        let span = traced.map(trace::schedule_span);
        // The per-candidate explanation costs allocations; only build it
        // when it will be logged or traced.
        let purpose = if traced.is_some() || tracing::enabled!(Level::DEBUG) {
            Purpose::RouteExplained
        } else {
            Purpose::Route
        };
        let result = self.plan(input, purpose).and_then(|plan| {
            if plan.decision.endpoints.is_empty() {
                Err(ScheduleError::EmptyPool.into())
            } else {
                Ok(plan)
            }
        });
        if let (Some(span), Some(request)) = (&span, traced) {
            match &result {
                Ok(plan) => trace::record_plan(span, request, plan),
                Err(e) => trace::record_error(span, request, e),
            }
        }
        drop(span);
        let m = &self.metrics;
        m.scheduler_duration
            .observe(started.elapsed().as_secs_f64());
        m.scheduler_attempts
            .with_label_values(&[if result.is_ok() { "success" } else { "failure" }])
            .inc();
        let plan = match result {
            Ok(plan) => plan,
            Err(e) => return Err(self.rejected(input, e)),
        };
        let Plan {
            decision,
            model,
            target_model,
            new_body,
        } = plan;
        let model_label = m.model_label(&model);
        let target_label = m.model_label(&target_model);
        m.request_total
            .with_label_values(&[model_label, target_label])
            .inc();
        if let Some(body) = input.body {
            m.request_sizes
                .with_label_values(&[model_label, target_label])
                .observe(body.len() as f64);
        }
        let d = &decision;
        if d.prompt_blocks > 0 {
            m.prefix_hit_ratio
                .observe(f64::from(d.matched_blocks) / f64::from(d.prompt_blocks));
            m.prefix_hit_bytes.observe(f64::from(
                d.matched_blocks * d.block_tokens * BYTES_PER_TOKEN,
            ));
        }
        let destination = d.destination();
        if let Some(ex) = &d.explanation {
            tracing::debug!(request_id = %Clip(input.request_id), path = %Clip(input.path),
                model = %Clip(&model), target_model = %Clip(&target_model),
                destination = %destination, prompt_blocks = d.prompt_blocks,
                matched_blocks = d.matched_blocks, scores = %ex, "request routed");
        }
        // Not empty: checked above. SLO admission's cost, read before this
        // request adds to the backlog.
        let slo_cost = d.endpoints[0].prefill_backlog() as f64 + prompt_tokens_estimate(input);
        let guard = d.endpoints[0].begin_request(d.prefill_tokens);
        let session = self
            .scheduler
            .session_header()
            .map(|h| SessionReply::new(Arc::clone(h), &d.endpoints));
        let mut ticket = RequestTicket::new(
            Arc::clone(&self.metrics),
            guard,
            model,
            target_model,
            input.arrived.unwrap_or(started),
            session,
        );
        if let Some(request) = traced {
            ticket.trace(request.clone());
        }
        if let Some(flow) = &self.flow {
            ticket.on_release(flow.release_hook());
        }
        if let Some(slo) = &self.slo {
            ticket.on_first_byte(Arc::clone(slo), slo_cost);
        }
        Ok(Routed {
            destination,
            new_body,
            ticket,
        })
    }

    /// How `input` would be routed and why, without recording or counting
    /// anything (Admin.Explain).
    pub fn explain(&self, input: &RouteInput<'_>) -> Result<Explained, RouteError> {
        let plan = self.plan(input, Purpose::Explain)?;
        Ok(Explained {
            decision: plan.decision,
            model: plan.model,
            target_model: plan.target_model,
        })
    }

    /// A request refused before it was routed because its body is larger
    /// than the protocol layer buffers: counted like every refusal.
    pub fn body_too_large(&self, input: &RouteInput<'_>, limit: usize) -> RouteError {
        self.rejected(input, RouteError::BodyTooLarge(limit))
    }

    fn rejected(&self, input: &RouteInput<'_>, e: RouteError) -> RouteError {
        self.metrics
            .request_error_total
            .with_label_values(&["", "", e.code()])
            .inc();
        tracing::debug!(request_id = %Clip(input.request_id), path = %Clip(input.path),
            status = e.http_status(), error = %Clip(&e.to_string()), "request rejected");
        e
    }

    /// Fills `out` with the prompt's token ids when a tokenizer serves the
    /// model: the served (target) model's, else the requested name's, else
    /// the only one configured (a pool serves one base model; its LoRA
    /// adapters share its tokenizer). False means no tokens: the scheduler
    /// then uses the byte estimate and the approximate index, so a prompt
    /// the tokenizer cannot take (a template error, token-id prompts) is
    /// still routed.
    fn tokenize(
        &self,
        req: &InferenceRequest<'_>,
        target: &str,
        body_len: usize,
        out: &mut Vec<u32>,
    ) -> bool {
        out.clear();
        // A pathological prompt must not pin a huge buffer to the thread.
        out.shrink_to(MAX_KEPT_TOKENS);
        if self.tokenizers.is_empty() {
            return false;
        }
        let tokenizer = self
            .tokenizers
            .get(target)
            .or_else(|| self.tokenizers.get(&req.model))
            .or_else(|| {
                let mut all = self.tokenizers.models();
                match (all.next(), all.next()) {
                    (Some(only), None) => self.tokenizers.get(only),
                    _ => None,
                }
            });
        let encode = |t: &crate::tokenize::ModelTokenizer| {
            if body_len >= HAND_OVER_BYTES && on_multi_thread_runtime() {
                tokio::task::block_in_place(|| t.tokenize(req, out))
            } else {
                t.tokenize(req, out)
            }
        };
        let outcome = match tokenizer.map(encode) {
            None => "no_tokenizer",
            Some(Ok(())) => "ok",
            Some(Err(e)) => {
                if let Some(suppressed) = TOKENIZE_LOG.allow(std::time::Instant::now()) {
                    tracing::debug!(error = %crate::telemetry::logging::chain(&e), model = target, suppressed, "prompt not tokenized; routing by the approximate index");
                }
                e.code()
            }
        };
        self.metrics
            .tokenize_total
            .with_label_values(&[outcome])
            .inc();
        if outcome != "ok" {
            out.clear();
        }
        outcome == "ok"
    }

    fn plan(&self, input: &RouteInput<'_>, purpose: Purpose) -> Result<Plan, RouteError> {
        let snapshot = self.store.snapshot();
        let api = ApiKind::from_path(input.path);
        let Some(body) = input.body.filter(|_| api != ApiKind::Other) else {
            let decision = self.scheduler.schedule_bodiless(&snapshot, input.subset)?;
            return Ok(Plan {
                decision,
                model: String::new(),
                target_model: String::new(),
                new_body: None,
            });
        };
        let req = request::parse(body, api)?;
        let dynamic = self.dynamic_rewrites.load();
        let target: &str = input
            .model_rewrite
            .filter(|m| self.trust_model_rewrite && !m.is_empty())
            .or_else(|| self.rewrites.target_with(&dynamic, &req.model))
            .unwrap_or(&req.model);
        let decision = TOKENS.with(|tokens| {
            let mut tokens = tokens.borrow_mut();
            let tokenized = self.tokenize(&req, target, body.len(), &mut tokens);
            let facts = RequestFacts {
                model: target,
                prompt: Some(&req.prompt),
                cache_salt: req.cache_salt.as_deref(),
                priority: input.objective.map_or(0, |o| self.objective_priority(o)),
                subset: input.subset,
                test_selection: input.test_selection.filter(|_| self.trust_test_selection),
                session_token: input.session_token,
                tokens: tokenized.then_some(tokens.as_slice()),
            };
            self.scheduler.schedule(&facts, &snapshot, purpose)
        })?;
        let new_body = match (&req.model_span, target != req.model) {
            (Some(span), true) => Some(request::rewrite_model(body, span.clone(), target)),
            _ => None,
        };
        Ok(Plan {
            target_model: target.to_owned(),
            model: req.model.into_owned(),
            decision,
            new_body,
        })
    }
}

/// Whether `block_in_place` may be used here: on a multi-threaded runtime's
/// worker (it panics on a current-thread runtime; outside a runtime there is
/// nothing to hand over).
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Prompt tokens as SLO admission counts them, the same at admission and
/// when the fit is fed: body bytes over [`BYTES_PER_TOKEN`].
fn prompt_tokens_estimate(input: &RouteInput<'_>) -> f64 {
    (input.body.map_or(0, <[u8]>::len) / BYTES_PER_TOKEN as usize) as f64
}

/// The pool's saturation for flow control: the scheduler's detector over
/// the current snapshot.
#[derive(Debug)]
struct PoolCapacity {
    store: Arc<EndpointStore>,
    probe: SaturationProbe,
}

impl Capacity for PoolCapacity {
    fn saturation(&self) -> f64 {
        self.probe.saturation(&self.store.snapshot())
    }
}

/// A director over a given store, for tests here and in the protocol layer.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    use super::*;
    use crate::{
        prefix::PrefixIndex,
        scheduling::{SchedulerOptions, build_scheduler},
    };

    /// `cfg` is config-file text; the request metrics register in `registry`.
    pub(crate) fn director(
        store: Arc<EndpointStore>,
        cfg: &str,
        registry: &prometheus::Registry,
    ) -> Director {
        let cfg = EndpointPickerConfig::parse(cfg).unwrap();
        let scheduler = build_scheduler(
            &cfg,
            &SchedulerOptions {
                fallback_endpoints: 1,
                max_scrape_failures: 3,
                staleness: Duration::from_secs(2),
                epoch: store.epoch(),
                kv_events: false,
            },
            Arc::new(PrefixIndex::new()),
        )
        .unwrap();
        Director::new(
            store,
            scheduler,
            &cfg,
            Arc::new(RequestMetrics::new(registry).unwrap()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{MetricsSample, testing::store_with};

    fn director(cfg: &str) -> Director {
        let store = Arc::new(store_with(&[1, 2], &[MetricsSample::default(); 2]));
        testing::director(store, cfg, &prometheus::Registry::new())
    }

    fn input<'a>(path: &'a str, body: &'a [u8]) -> RouteInput<'a> {
        RouteInput {
            path,
            body: Some(body),
            ..RouteInput::default()
        }
    }

    #[test]
    fn routes_and_keeps_the_body_when_nothing_changes() {
        let d = director(crate::config::DEFAULT_CONFIG);
        let r = d
            .route(&input("/v1/completions", br#"{"model":"m","prompt":"hi"}"#))
            .unwrap();
        assert_eq!(r.destination.split(',').count(), 2, "{}", r.destination);
        assert!(r.new_body.is_none());
        assert!(!r.ticket.rewrites_response());
        let picked = d
            .store()
            .snapshot()
            .endpoints()
            .iter()
            .find(|e| *e.host_port == *r.ticket.picked())
            .cloned()
            .unwrap();
        assert_eq!(picked.in_flight(), 1, "the ticket holds the request");
        drop(r);
        assert_eq!(picked.in_flight(), 0, "dropping the ticket releases it");
    }

    /// A long prompt is encoded with the worker handed over: a task queued
    /// on the runtime's only worker runs while the encoding is under way,
    /// where it would otherwise wait for the route to return.
    ///
    /// The hand-over starts another thread for the worker; a release build
    /// can encode a short prompt before that thread runs. So the prompt
    /// grows (a bounded number of times) until the encoding outlasts the
    /// thread's start. Without a hand-over the queued task never runs before
    /// the route returns, whatever the prompt's length, and the test fails.
    #[test]
    fn a_long_prompt_does_not_hold_the_runtime_worker() {
        use crate::tokenize::{ModelTokenizer, Tokenizers};
        let dir = crate::tokenize::qwen3_test_dir().unwrap();
        let mut tokenizers = Tokenizers::default();
        // No segment cache: every route encodes the whole prompt.
        tokenizers.insert("m", ModelTokenizer::from_dir(&dir, 0).unwrap());
        let d =
            Arc::new(director(crate::config::DEFAULT_CONFIG).with_tokenizers(Arc::new(tokenizers)));
        let ran_during_encoding = |prompt_bytes: usize| {
            let mut prompt = String::new();
            let mut n = 0u64;
            while prompt.len() < prompt_bytes {
                n += 1;
                prompt.push_str(&format!("word{n} and {} more, ", n * 7919 % 1000));
            }
            let body = serde_json::json!({"model": "m", "prompt": prompt}).to_string();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let d = Arc::clone(&d);
            let (ran_at, done_at) = rt.block_on(async move {
                tokio::spawn(async move {
                    let ran = Arc::new(parking_lot::Mutex::new(None));
                    let mark = Arc::clone(&ran);
                    tokio::spawn(async move { *mark.lock() = Some(Instant::now()) });
                    let routed = d.route(&input("/v1/completions", body.as_bytes())).unwrap();
                    let done_at = Instant::now();
                    drop(routed);
                    // Read before this task yields: only a hand-over let it run.
                    let ran_at = *ran.lock();
                    (ran_at, done_at)
                })
                .await
                .unwrap()
            });
            ran_at.is_some_and(|at| at < done_at)
        };
        let sizes = [2, 8, 32, 128].map(|k| k * HAND_OVER_BYTES);
        assert!(
            sizes.into_iter().any(ran_during_encoding),
            "the queued task never ran while a prompt was encoded"
        );
    }

    #[test]
    fn explaining_records_nothing() {
        let d = director(crate::config::DEFAULT_CONFIG);
        let x = d
            .explain(&input("/v1/completions", br#"{"model":"m","prompt":"hi"}"#))
            .unwrap();
        assert_eq!(x.decision.endpoints.len(), 2);
        assert!(x.decision.explanation.is_some());
        assert_eq!((x.model.as_str(), x.target_model.as_str()), ("m", "m"));
        let snapshot = d.store().snapshot();
        assert!(snapshot.endpoints().iter().all(|e| e.in_flight() == 0));
        assert_eq!(
            d.metrics.request_total.with_label_values(&["m", "m"]).get(),
            0
        );
    }

    #[test]
    fn a_trusted_header_rewrite_wins_over_the_config_rule() {
        let rule = "modelRewrites:\n- model: m\n  targets:\n  - model: from-config\n";
        let trusting = format!("{rule}trustedHeaders: [x-gateway-model-name-rewrite]\n");
        let body = br#"{"model":"m","prompt":"hi"}"#;
        let with_header = RouteInput {
            model_rewrite: Some("from-header"),
            ..input("/v1/completions", body)
        };
        for (cfg, header_wins) in [(rule.to_owned(), false), (trusting, true)] {
            let d = director(&cfg);
            let r = d.route(&input("/v1/completions", body)).unwrap();
            assert!(r.ticket.rewrites_response());
            assert_eq!(
                r.new_body.as_deref(),
                Some(&br#"{"model":"from-config","prompt":"hi"}"#[..])
            );
            let want: &[u8] = if header_wins {
                br#"{"model":"from-header","prompt":"hi"}"#
            } else {
                br#"{"model":"from-config","prompt":"hi"}"#
            };
            assert_eq!(
                d.route(&with_header).unwrap().new_body.as_deref(),
                Some(want)
            );
            assert_eq!(d.trusts_model_rewrite_header(), header_wins);
        }
    }

    #[test]
    fn a_trusted_test_selection_header_names_the_endpoint() {
        let cfg = "plugins:\n- type: header-based-testing-filter\n- type: queue-scorer\n\
                   trustedHeaders: [test-epp-endpoint-selection]\n";
        let d = director(cfg);
        let body = br#"{"model":"m","prompt":"hi"}"#;
        for named in d.store().snapshot().endpoints() {
            let named = named.host_port.to_string();
            let i = RouteInput {
                test_selection: Some(&named),
                ..input("/v1/completions", body)
            };
            for _ in 0..10 {
                let x = d.explain(&i).unwrap();
                assert_eq!(*x.decision.endpoints[0].host_port, named);
            }
        }
    }

    #[test]
    fn the_ticket_carries_the_session_token_of_the_endpoint_that_served() {
        let d = director("plugins:\n- type: session-affinity-scorer\n- type: queue-scorer\n");
        assert_eq!(d.session_header(), Some("x-session-token"));
        let snapshot = d.store().snapshot();
        let token_of = |hp: &str| crate::scheduling::session::token(snapshot.get(hp).unwrap());
        let r = d
            .route(&input("/v1/completions", br#"{"model":"m","prompt":"hi"}"#))
            .unwrap();
        let (pick, fallback) = r.destination.split_once(',').unwrap();
        let (name, token) = r.ticket.session_header(None).unwrap();
        assert_eq!((name, token), ("x-session-token", token_of(pick).as_str()));
        assert_eq!(
            r.ticket.session_header(Some(fallback)).unwrap().1,
            token_of(fallback)
        );
        assert_eq!(
            r.ticket.session_header(Some("10.9.9.9:1")).unwrap().1,
            token_of(pick),
            "an address outside the destination: the pick"
        );
        // The token brings the next request back.
        let back = RouteInput {
            session_token: Some(&token_of(fallback)),
            ..input("/v1/completions", br#"{"model":"m","prompt":"hi"}"#)
        };
        for _ in 0..10 {
            assert!(
                d.explain(&back)
                    .unwrap()
                    .decision
                    .destination()
                    .starts_with(fallback)
            );
        }
        let plain = director(crate::config::DEFAULT_CONFIG);
        assert_eq!(plain.session_header(), None);
        let r = plain
            .route(&input("/v1/completions", br#"{"model":"m","prompt":"hi"}"#))
            .unwrap();
        assert!(r.ticket.session_header(None).is_none());
    }

    #[test]
    fn objectives_set_priority_for_shedding() {
        let d = director("objectives:\n- name: batch\n  priority: -1\n");
        assert_eq!(d.objective_priority("batch"), -1);
        assert_eq!(d.objective_priority("unknown"), 0);
    }

    #[test]
    fn errors_map_to_statuses() {
        let d = director(crate::config::DEFAULT_CONFIG);
        let e = d.route(&input("/v1/completions", b"{")).unwrap_err();
        assert_eq!((e.http_status(), e.code()), (400, "invalid_json"));
        let subset = vec!["10.0.0.1:1".to_owned()];
        let i = RouteInput {
            subset: Some(&subset),
            ..input("/v1/completions", br#"{"model":"m","prompt":"x"}"#)
        };
        assert_eq!(d.route(&i).unwrap_err().http_status(), 503);
        let e = d.body_too_large(&i, 10);
        assert_eq!((e.http_status(), e.code()), (413, "request_too_large"));
        assert_eq!(
            d.metrics
                .request_error_total
                .with_label_values(&["", "", "request_too_large"])
                .get(),
            1
        );
    }

    #[test]
    fn bodiless_and_other_paths_route_by_load() {
        let d = director(crate::config::DEFAULT_CONFIG);
        let r = d
            .explain(&RouteInput {
                path: "/v1/models",
                ..RouteInput::default()
            })
            .unwrap();
        assert!(r.model.is_empty());
        let r = d.explain(&input("/tokenize", b"not json")).unwrap();
        assert!(r.model.is_empty());
        assert_eq!(r.decision.endpoints.len(), 2);
    }

    #[test]
    fn cluster_rewrites_apply_after_the_config_file() {
        let spec = |model: &str, target: &str| ModelRewriteSpec {
            model: model.into(),
            targets: vec![crate::config::RewriteTarget {
                model: target.into(),
                weight: 1.0,
            }],
        };
        let d = director("modelRewrites:\n- model: cfg\n  targets:\n  - model: from-config\n");
        d.set_dynamic_rewrites(&[
            spec("m", "first"),
            spec("m", "second"),
            spec("cfg", "from-cluster"),
            spec("*", "any"),
        ]);
        let sent = |model: &str| {
            let body = format!(r#"{{"model":"{model}","prompt":"hi"}}"#);
            let r = d.route(&input("/v1/completions", body.as_bytes())).unwrap();
            let out: serde_json::Value =
                serde_json::from_slice(r.new_body.as_deref().unwrap_or(body.as_bytes())).unwrap();
            out["model"].as_str().unwrap().to_owned()
        };
        assert_eq!(sent("m"), "first", "the first rule for a model wins");
        assert_eq!(sent("cfg"), "from-config", "the config file wins");
        assert_eq!(sent("other"), "any");
        d.set_dynamic_rewrites(&[]);
        assert_eq!(sent("m"), "m");
    }

    #[test]
    fn weighted_rewrites() {
        let r = Rewrites::new(&EndpointPickerConfig::parse(
            "modelRewrites:\n- model: '*'\n  targets:\n  - {model: a, weight: 0}\n  - {model: b, weight: 1}\n",
        )
        .unwrap()
        .model_rewrites);
        for _ in 0..50 {
            assert_eq!(r.target("anything"), Some("b"));
        }
    }
}
