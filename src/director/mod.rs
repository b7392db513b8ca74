//! The director: what happens to one request between the protocol layer and
//! the scheduler, independent of how the request arrived (ext_proc stream or
//! Admin.Explain).
//!
//! parse the body -> resolve the target model (header, then config rule) ->
//! resolve the objective's priority -> schedule on the current endpoint
//! snapshot -> splice the new model name into the body if it changed.
//! Bodiless requests and paths that are not inference APIs are routed by load
//! alone.

use std::{collections::HashMap, sync::Arc, time::Instant};

use arc_swap::ArcSwap;

use crate::{
    config::{EndpointPickerConfig, ModelRewriteSpec},
    endpoints::EndpointStore,
    request::{self, ApiKind, ParseError},
    scheduling::{Decision, Purpose, RequestFacts, ScheduleError, Scheduler},
    telemetry::Metrics,
};

/// What the protocol layer knows about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteInput<'a> {
    pub path: &'a str,
    /// `None` for a request without a body.
    pub body: Option<&'a [u8]>,
    /// `x-gateway-inference-objective`
    pub objective: Option<&'a str>,
    /// `x-gateway-model-name-rewrite`
    pub model_rewrite: Option<&'a str>,
    /// `test-epp-endpoint-selection`
    pub test_selection: Option<&'a str>,
    /// The gateway's subset hint.
    pub subset: Option<&'a [String]>,
}

/// A routed request.
#[derive(Debug)]
pub struct Routed {
    pub decision: Decision,
    pub api: ApiKind,
    /// The model the client asked for ("" when the body was not parsed).
    pub model: String,
    /// The model the request is sent as.
    pub target_model: String,
    /// The body to forward when it had to change (model rewrite).
    pub new_body: Option<Vec<u8>>,
    pub stream: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
}

impl RouteError {
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Parse(_) => 400,
            Self::Schedule(e) => e.http_status(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Parse(e) => e.code(),
            Self::Schedule(e) => e.code(),
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
    fn new(specs: &[ModelRewriteSpec]) -> Self {
        let mut r = Self::default();
        for s in specs {
            let targets: Vec<(String, f64)> = s
                .targets
                .iter()
                .map(|t| (t.model.clone(), t.weight))
                .collect();
            if s.model == "*" || s.model.is_empty() {
                r.any = Some(targets);
            } else {
                r.exact.insert(s.model.clone(), targets);
            }
        }
        r
    }

    fn target(&self, model: &str) -> Option<&str> {
        let targets = self.exact.get(model).or(self.any.as_ref())?;
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

#[derive(Debug)]
pub struct Director {
    store: Arc<EndpointStore>,
    scheduler: Scheduler,
    /// Priority per objective name. File-configured objectives are the
    /// base; Kubernetes InferenceObjective objects are merged in at runtime.
    objectives: ArcSwap<HashMap<String, i32>>,
    static_objectives: HashMap<String, i32>,
    rewrites: Rewrites,
    metrics: Arc<Metrics>,
}

impl Director {
    pub fn new(
        store: Arc<EndpointStore>,
        scheduler: Scheduler,
        cfg: &EndpointPickerConfig,
        metrics: Arc<Metrics>,
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
            metrics,
        }
    }

    pub fn store(&self) -> &Arc<EndpointStore> {
        &self.store
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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

    /// Routes one request. With [`Purpose::Explain`] nothing is recorded and
    /// no metric is counted.
    pub fn route(&self, input: &RouteInput<'_>, purpose: Purpose) -> Result<Routed, RouteError> {
        let started = Instant::now();
        let result = self.route_inner(input, purpose);
        if purpose != Purpose::Explain {
            let m = &self.metrics;
            m.scheduler_duration
                .observe(started.elapsed().as_secs_f64());
            m.scheduler_attempts
                .with_label_values(&[if result.is_ok() { "success" } else { "failure" }])
                .inc();
            match &result {
                Ok(r) => {
                    let model = m.model_label(&r.model);
                    let target = m.model_label(&r.target_model);
                    m.request_total.with_label_values(&[model, target]).inc();
                    if let Some(body) = input.body {
                        m.request_sizes
                            .with_label_values(&[model, target])
                            .observe(body.len() as f64);
                    }
                    let d = &r.decision;
                    if d.prompt_blocks > 0 {
                        m.prefix_hit_ratio
                            .observe(f64::from(d.matched_blocks) / f64::from(d.prompt_blocks));
                        m.prefix_hit_bytes.observe(f64::from(
                            d.matched_blocks * d.block_tokens * crate::scheduling::BYTES_PER_TOKEN,
                        ));
                    }
                }
                Err(e) => {
                    m.request_error_total
                        .with_label_values(&["", "", e.code()])
                        .inc();
                }
            }
        }
        result
    }

    fn route_inner(&self, input: &RouteInput<'_>, purpose: Purpose) -> Result<Routed, RouteError> {
        let snapshot = self.store.snapshot();
        let api = ApiKind::from_path(input.path);
        let Some(body) = input.body.filter(|_| api != ApiKind::Other) else {
            let decision = self.scheduler.schedule_bodiless(&snapshot, input.subset)?;
            return Ok(Routed {
                decision,
                api,
                model: String::new(),
                target_model: String::new(),
                new_body: None,
                stream: false,
            });
        };
        let req = request::parse(body, api)?;
        let target: &str = input
            .model_rewrite
            .filter(|m| !m.is_empty())
            .or_else(|| self.rewrites.target(&req.model))
            .unwrap_or(&req.model);
        let facts = RequestFacts {
            model: target,
            prompt: Some(&req.prompt),
            cache_salt: req.cache_salt.as_deref(),
            priority: input.objective.map_or(0, |o| self.objective_priority(o)),
            subset: input.subset,
            test_selection: input.test_selection,
        };
        let decision = self.scheduler.schedule(&facts, &snapshot, purpose)?;
        let new_body = match (&req.model_span, target != req.model) {
            (Some(span), true) => Some(request::rewrite_model(body, span.clone(), target)),
            _ => None,
        };
        Ok(Routed {
            target_model: target.to_owned(),
            model: req.model.into_owned(),
            decision,
            api,
            new_body,
            stream: req.stream,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        config::EndpointPickerConfig,
        endpoints::{MetricsSample, testing::store_with},
        prefix::PrefixIndex,
        scheduling::{SchedulerOptions, build_scheduler},
    };

    fn director(cfg: &str) -> Director {
        let store = Arc::new(store_with(&[1, 2], &[MetricsSample::default(); 2]));
        let cfg = EndpointPickerConfig::parse(cfg).unwrap();
        let scheduler = build_scheduler(
            &cfg,
            &SchedulerOptions {
                fallback_endpoints: 1,
                max_scrape_failures: 3,
                staleness: Duration::from_secs(2),
                epoch: store.epoch(),
            },
            Arc::new(PrefixIndex::new()),
        )
        .unwrap();
        Director::new(store, scheduler, &cfg, Arc::new(Metrics::new("p").unwrap()))
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
            .route(
                &input("/v1/completions", br#"{"model":"m","prompt":"hi"}"#),
                Purpose::Route,
            )
            .unwrap();
        assert_eq!(r.decision.endpoints.len(), 2);
        assert!(r.new_body.is_none());
        assert_eq!((r.model.as_str(), r.target_model.as_str()), ("m", "m"));
    }

    #[test]
    fn header_rewrite_wins_over_config_rule() {
        let d = director("modelRewrites:\n- model: m\n  targets:\n  - model: from-config\n");
        let body = br#"{"model":"m","prompt":"hi"}"#;
        let r = d
            .route(&input("/v1/completions", body), Purpose::Route)
            .unwrap();
        assert_eq!(r.target_model, "from-config");
        assert_eq!(
            r.new_body.as_deref(),
            Some(&br#"{"model":"from-config","prompt":"hi"}"#[..])
        );
        let i = RouteInput {
            model_rewrite: Some("from-header"),
            ..input("/v1/completions", body)
        };
        assert_eq!(
            d.route(&i, Purpose::Route).unwrap().target_model,
            "from-header"
        );
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
        let e = d
            .route(&input("/v1/completions", b"{"), Purpose::Route)
            .unwrap_err();
        assert_eq!((e.http_status(), e.code()), (400, "invalid_json"));
        let subset = vec!["10.0.0.1:1".to_owned()];
        let i = RouteInput {
            subset: Some(&subset),
            ..input("/v1/completions", br#"{"model":"m","prompt":"x"}"#)
        };
        assert_eq!(d.route(&i, Purpose::Route).unwrap_err().http_status(), 503);
    }

    #[test]
    fn bodiless_and_other_paths_route_by_load() {
        let d = director(crate::config::DEFAULT_CONFIG);
        let r = d
            .route(
                &RouteInput {
                    path: "/v1/models",
                    ..RouteInput::default()
                },
                Purpose::Route,
            )
            .unwrap();
        assert_eq!(r.api, ApiKind::Other);
        let r = d
            .route(&input("/tokenize", b"not json"), Purpose::Route)
            .unwrap();
        assert!(r.model.is_empty());
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
